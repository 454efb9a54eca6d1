//! The HTTP/JSON gateway: DESIGN.md section 4 over the mesh.
//!
//! ```text
//!  HTTP JSON ──> parse + validate (400/413) ──> Envelope{session, seq} ──> MeshClient
//!                                                   (mTLS QUIC, follows the leader)
//!  HTTP JSON <── ApiError / reply mapping  <────────── committed + applied reply
//! ```
//! It keeps no state of its own beyond its client sessions (one per caller slot, see
//! mesh-client), so any number of gateways can run. A call retried after a leader change
//! carries the same session and sequence number; the services answer a duplicate with
//! the first reply, so nothing is applied twice. The same router runs standalone over
//! QUIC, or inside a node (`syncmesh node --http`), calling that node in-process.

mod cache;
mod console;
mod error;
mod faults;
mod groups;
mod locks;
mod queues;

pub use error::ApiError;
pub use faults::{Fault, FaultRequest, FaultSender};

use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use certs::TlsMaterial;
use mesh_client::{CallError, CallOptions, Caller, Cluster, MeshClient, Outcome};
use mesh_core::raft::NodeId;
use mesh_core::services::envelope::{Command, Query, QueryReply};
use mesh_core::wire::{node_name, ClientResponse};
use serde::de::DeserializeOwned;
use serde_json::json;
use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Calls in flight at most per gateway (each holds one client session slot).
pub const MAX_IN_FLIGHT: usize = 4096;

/// Default request body limit.
pub const DEFAULT_MAX_BODY: usize = 1 << 20;
/// How much of a body over the limit is read and dropped before answering 413.
const DRAIN_LIMIT: usize = 16 << 20;

/// Settings of a gateway.
#[derive(Clone, Debug)]
pub struct GatewayConfig {
    /// HTTP address.
    pub listen: SocketAddr,
    /// Certificates directory.
    pub certs_dir: PathBuf,
    /// Client certificate name (default `gateway`).
    pub cert: String,
    /// The nodes and their QUIC addresses.
    pub nodes: BTreeMap<NodeId, SocketAddr>,
    /// The node whose view `/health` reports.
    pub home: NodeId,
    /// Request body limit in bytes.
    pub max_body: usize,
    /// Who injects the console's faults (`syncmesh cluster`, which owns the node
    /// processes); `None`: the `/api/fault/*` routes do not exist.
    pub faults: Option<FaultSender>,
}

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// Certificates.
    #[error("certificates: {0}")]
    Cert(#[from] certs::CertError),
    /// The mesh client.
    #[error("mesh client: {0}")]
    Client(#[from] CallError),
    /// HTTP listener.
    #[error("listen on {addr}: {source}")]
    Listen {
        /// Address.
        addr: SocketAddr,
        /// Error.
        #[source]
        source: std::io::Error,
    },
    /// Metrics registry.
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// Shared by every handler.
pub(crate) struct AppState {
    caller: Caller,
    home: NodeId,
    max_body: usize,
    registry: prometheus::Registry,
    http_duration: prometheus::HistogramVec,
    groups: groups::EnqueueGroups,
    console: console::ConsoleFeed,
    faults: Option<FaultSender>,
}

/// Map a failed call: not done (503, retry) or outcome unknown (504).
fn call_error(e: CallError) -> ApiError {
    match e {
        CallError::OutcomeUnknown(why) => ApiError::outcome_unknown(why),
        CallError::Unavailable(why) => ApiError::unavailable("no_leader", why),
        CallError::Refused(why) => ApiError::bad_request("refused", why),
        CallError::Setup(why) => ApiError::internal(why),
    }
}

impl AppState {
    /// The body, up to the limit. A body over it is still read (up to
    /// [`DRAIN_LIMIT`]) and dropped before the 413 goes out, so a client that is still
    /// sending sees the answer instead of a reset connection.
    pub(crate) async fn read_body(&self, mut body: Body) -> Result<Vec<u8>, ApiError> {
        use http_body_util::BodyExt;
        let mut bytes = Vec::new();
        let mut seen = 0usize;
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else {
                return Err(ApiError::bad_request(
                    "malformed_body",
                    "the body could not be read",
                ));
            };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            seen += data.len();
            if seen <= self.max_body {
                bytes.extend_from_slice(&data);
            } else if seen > DRAIN_LIMIT {
                break;
            }
        }
        if seen > self.max_body {
            return Err(ApiError::too_large(self.max_body));
        }
        Ok(bytes)
    }

    /// Read and parse a JSON body, with the errors of DESIGN.md section 4.
    pub(crate) async fn json<T: DeserializeOwned>(&self, body: Body) -> Result<T, ApiError> {
        let bytes = self.read_body(body).await?;
        if bytes.is_empty() {
            return Err(ApiError::bad_request(
                "malformed_json",
                "request body is empty; a JSON object is required",
            ));
        }
        serde_json::from_slice(&bytes).map_err(|e| match e.classify() {
            serde_json::error::Category::Data => {
                ApiError::bad_request("invalid_request", e.to_string())
            }
            _ => ApiError::bad_request("malformed_json", e.to_string()),
        })
    }

    /// Replicate a command; failures mapped to HTTP.
    pub(crate) async fn propose(
        &self,
        command: Command,
        opts: CallOptions,
    ) -> Result<Outcome, ApiError> {
        self.caller.propose(command, opts).await.map_err(call_error)
    }

    /// A linearizable read; failures mapped to HTTP.
    pub(crate) async fn read(
        &self,
        query: Query,
        deadline: Duration,
    ) -> Result<QueryReply, ApiError> {
        self.caller.read(&query, deadline).await.map_err(call_error)
    }
}

/// The router of a standalone gateway, calling the nodes over QUIC.
pub fn router(cfg: &GatewayConfig) -> Result<Router, GatewayError> {
    let tls = TlsMaterial::load(&cfg.certs_dir, &cfg.cert)?;
    let client = MeshClient::new(&tls, cfg.nodes.clone())?;
    router_with(
        Cluster::remote(client),
        cfg.home,
        cfg.max_body,
        cfg.faults.clone(),
    )
}

/// The router over any way of calling the cluster (QUIC, or a node in this process);
/// `home` is the node whose view `/health` reports.
pub fn router_over(
    cluster: Cluster,
    home: NodeId,
    max_body: usize,
) -> Result<Router, GatewayError> {
    router_with(cluster, home, max_body, None)
}

fn router_with(
    cluster: Cluster,
    home: NodeId,
    max_body: usize,
    faults: Option<FaultSender>,
) -> Result<Router, GatewayError> {
    let registry = prometheus::Registry::new();
    let http_duration = prometheus::HistogramVec::new(
        prometheus::HistogramOpts::new(
            "http_request_duration_seconds",
            "HTTP requests by route and status",
        )
        .buckets(prometheus::exponential_buckets(0.000_1, 2.0, 18)?),
        &["route", "status"],
    )?;
    registry.register(Box::new(http_duration.clone()))?;
    let groups = groups::EnqueueGroups::new(&registry)?;
    let state = Arc::new(AppState {
        caller: Caller::new(cluster, MAX_IN_FLIGHT),
        home,
        max_body,
        registry,
        http_duration,
        groups,
        console: console::ConsoleFeed::new(),
        faults: faults.clone(),
    });
    let mut router = Router::new();
    if faults.is_some() {
        router = router.route("/api/fault/{action}", post(faults::inject));
    }
    Ok(router
        .route("/", get(console::index))
        .route("/index.html", get(console::index))
        .route("/web.js", get(console::script))
        .route("/web_bg.wasm", get(console::wasm))
        .route("/api/cluster", get(console::cluster))
        .route("/api/events", get(console::events))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
        .route("/lock/acquire", post(locks::acquire))
        .route("/lock/release", post(locks::release))
        .route("/lock/renew", post(locks::renew))
        .route("/lock/state", get(locks::state))
        .route("/lock/list", get(locks::list))
        .route("/queue/enq", post(queues::enqueue))
        .route("/queue/enqueue", post(queues::enqueue))
        .route("/queue/deq", post(queues::dequeue))
        .route("/queue/dequeue", post(queues::dequeue))
        .route("/queue/ack", post(queues::ack))
        .route("/queue/nack", post(queues::nack))
        .route("/queue/extend", post(queues::extend))
        .route("/queue/create", post(queues::create))
        .route("/queue/limits", post(queues::limits))
        .route("/queue/stats", get(queues::stats))
        .route("/queue/dead", get(queues::dead))
        .route("/queue/dead/requeue", post(queues::requeue))
        .route("/cache/put", post(cache::put))
        .route("/cache/get", post(cache::get))
        .route("/cache/del", post(cache::del))
        .route("/cache/evict", post(cache::evict))
        .route("/cache/state", get(cache::state))
        .route("/cache/stats", get(cache::stats))
        .route(
            "/cache/{key}",
            get(cache::rest_get)
                .put(cache::rest_put)
                .delete(cache::rest_delete),
        )
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(state.clone(), observe))
        .layer(axum::extract::DefaultBodyLimit::disable())
        .with_state(state))
}

/// Serve a standalone gateway until `shutdown` resolves.
pub async fn serve(
    cfg: GatewayConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), GatewayError> {
    let app = router(&cfg)?;
    serve_router(app, cfg.listen, cfg.home, shutdown).await
}

/// Serve `app` on `listen` until `shutdown` resolves.
pub async fn serve_router(
    app: Router,
    listen: SocketAddr,
    home: NodeId,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), GatewayError> {
    let listener = bind(listen).await?;
    serve_listener(app, listener, home, shutdown).await
}

/// Bind an HTTP listener, with an error that names the address.
pub async fn bind(listen: SocketAddr) -> Result<tokio::net::TcpListener, GatewayError> {
    tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| GatewayError::Listen {
            addr: listen,
            source,
        })
}

/// Serve `app` on a bound listener until `shutdown` resolves.
pub async fn serve_listener(
    app: Router,
    listener: tokio::net::TcpListener,
    home: NodeId,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), GatewayError> {
    let listen = listener
        .local_addr()
        .map_err(|source| GatewayError::Listen {
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            source,
        })?;
    tracing::info!(listen = %listen, home = %node_name(home), "HTTP API started");
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(|source| GatewayError::Listen {
            addr: listen,
            source,
        })
}

async fn observe(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let started = Instant::now();
    let response = next.run(req).await;
    let status = response.status().as_u16().to_string();
    if let Ok(h) = state
        .http_duration
        .get_metric_with_label_values(&[&route, &status])
    {
        h.observe(started.elapsed().as_secs_f64());
    }
    response
}

async fn health(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
    let status = state.caller.cluster().status_of(state.home).await;
    let Ok(ClientResponse::Status(s)) = status else {
        return Err(ApiError::unavailable(
            "node_unreachable",
            format!("{} does not answer", node_name(state.home)),
        ));
    };
    let role_name = match s.role {
        2 => "leader",
        1 => "candidate",
        _ => "follower",
    };
    let body = json!({
        "ok": true,
        "id": node_name(s.id),
        "role": s.role,
        "role_name": role_name,
        "term": s.term,
        "leader": s.leader.map(node_name),
        "commit_index": s.commit,
        "applied_index": s.applied,
    });
    Ok(axum::Json(body).into_response())
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let mut out = Vec::new();
    let _ = prometheus::Encoder::encode(
        &prometheus::TextEncoder::new(),
        &state.registry.gather(),
        &mut out,
    );
    // The lock series come from the cluster's applied state (a linearizable read); if
    // the cluster cannot answer, the HTTP series are still served.
    if let Some(text) = locks::metrics_text(&state).await {
        out.extend_from_slice(text.as_bytes());
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

async fn not_found(req: Request) -> ApiError {
    ApiError::not_found(format!(
        "no route for {} {}",
        req.method(),
        req.uri().path()
    ))
}

async fn openapi() -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        locks::OPENAPI,
    )
        .into_response()
}
