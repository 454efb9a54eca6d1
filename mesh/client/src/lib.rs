//! mesh-client: how a gateway, `syncmesh ctl` or a benchmark calls a syncmesh cluster.
//!
//! ```text
//!  Caller::propose(command) ── a free session slot (opened through the log once)
//!      │                       Envelope { session, seq, ack = seq, command }
//!      └─> Cluster::call ──> the node in this process, if the caller runs in one and it leads
//!                        └─> MeshClient: mTLS QUIC to the leader, following redirects,
//!                            retrying the same (session, seq) until it is answered
//! ```
//! Every call carries a session and a sequence number (Raft thesis 6.3), so a retry after
//! a lost answer or a leader change is answered with the first answer and never applied
//! twice. A caller slot has one call in flight, and each call acknowledges the ones
//! before it: what the cluster keeps is bounded by the calls in flight, however long one
//! of them waits. A call whose caller gives up (its future is dropped, or its deadline
//! passes) while it may wait is withdrawn through the log.

pub mod framed;
mod mesh;
mod session;

pub use mesh::{CallError, MeshClient};
pub use session::{CallOptions, Caller, Outcome};

use certs::TlsMaterial;
use mesh_core::raft::NodeId;
use mesh_core::wire::{ClientRequest, ClientResponse};
use quinn::Endpoint;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// How long a call may wait for a node's answer (a lock acquire may wait in its queue;
/// the gateway caps waits below this).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(90);

/// A call handed to a node in the same process: the request and where to answer.
/// Dropping the receiver before the answer cancels the call.
pub type ClientCall = (ClientRequest, oneshot::Sender<ClientResponse>);

/// quinn transport settings with an idle timeout and keep-alives.
pub fn quic_transport(idle: Duration, keep_alive: Duration) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.max_idle_timeout(idle.try_into().ok());
    t.keep_alive_interval(Some(keep_alive));
    Arc::new(t)
}

/// For clients: a call in flight to a leader that died must fail fast so it is retried
/// on the new one; keep-alives keep a quiet call (a queued lock) alive.
fn client_transport() -> Arc<quinn::TransportConfig> {
    quic_transport(Duration::from_millis(1000), Duration::from_millis(200))
}

/// A client-only quinn endpoint bound to `bind`, presenting `tls`.
pub fn client_endpoint(tls: &TlsMaterial, bind: SocketAddr) -> Result<Endpoint, CallError> {
    let setup = |e: &dyn std::fmt::Display| CallError::Setup(e.to_string());
    let client_tls = quinn::crypto::rustls::QuicClientConfig::try_from(
        tls.client_config().map_err(|e| setup(&e))?,
    )
    .map_err(|e| setup(&e))?;
    let mut client = quinn::ClientConfig::new(Arc::new(client_tls));
    client.transport_config(client_transport());
    let mut endpoint = Endpoint::client(bind).map_err(|e| setup(&e))?;
    endpoint.set_default_client_config(client);
    Ok(endpoint)
}

/// The node of this process, called in-process.
#[derive(Clone, Debug)]
pub struct LocalNode {
    /// Its id.
    pub id: NodeId,
    /// Its driver's call inbox.
    pub calls: mpsc::Sender<ClientCall>,
}

/// How long a node's own status may take in-process.
const STATUS_TIMEOUT: Duration = Duration::from_secs(5);

/// Why an in-process call got no answer.
enum LocalError {
    /// The node's inbox was full: the call never reached it.
    Overloaded,
    /// Handed over, then no answer: it may have been carried out.
    Lost(&'static str),
}

impl LocalNode {
    /// Hand `request` to the node and wait up to `deadline` for its answer.
    async fn call(
        &self,
        request: ClientRequest,
        deadline: Duration,
    ) -> Result<ClientResponse, LocalError> {
        let (tx, rx) = oneshot::channel();
        self.calls
            .try_send((request, tx))
            .map_err(|_| LocalError::Overloaded)?;
        match tokio::time::timeout(deadline.min(CALL_TIMEOUT), rx).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(_)) => Err(LocalError::Lost("node stopped before answering")),
            Err(_) => Err(LocalError::Lost("no answer in time")),
        }
    }
}

/// One way to call the cluster over two transports: in-process to the node this process
/// runs (when it leads, or for its own status), QUIC to the others.
#[derive(Clone)]
pub struct Cluster {
    mesh: MeshClient,
    local: Option<LocalNode>,
}

impl Cluster {
    /// Over QUIC only.
    pub fn remote(mesh: MeshClient) -> Self {
        Self { mesh, local: None }
    }

    /// In-process to `local` while it leads; QUIC otherwise.
    pub fn with_local(mesh: MeshClient, local: LocalNode) -> Self {
        Self {
            mesh,
            local: Some(local),
        }
    }

    /// The QUIC client.
    pub fn mesh(&self) -> &MeshClient {
        &self.mesh
    }

    /// Call whichever node leads, retrying until `deadline`; `hedge` as in
    /// [`MeshClient::call_hedged`].
    pub async fn call(
        &self,
        request: &ClientRequest,
        deadline: Duration,
        hedge: Option<Duration>,
    ) -> Result<ClientResponse, CallError> {
        let mut may_be_done = false;
        let started = std::time::Instant::now();
        if let Some(local) = &self.local {
            let hint = self.mesh.leader_hint();
            if hint == 0 || hint == local.id {
                match local.call(request.clone(), deadline).await {
                    Ok(ClientResponse::NotLeader { leader }) => {
                        self.mesh.set_leader_hint(leader.unwrap_or(0));
                    }
                    Ok(ClientResponse::Error { retry: true, .. }) => {}
                    // Not answered: the same call is retried at the leader (sessions make
                    // that safe), and it may have been carried out meanwhile.
                    Ok(ClientResponse::Unknown { .. }) | Err(LocalError::Lost(_)) => {
                        may_be_done |= matches!(request, ClientRequest::Propose(_));
                        self.mesh.set_leader_hint(0);
                    }
                    // Never handed to the node: not done.
                    Err(LocalError::Overloaded) => {}
                    Ok(answer) => {
                        self.mesh.set_leader_hint(local.id);
                        return Ok(answer);
                    }
                }
            }
        }
        // What the local attempt used is not given again.
        let left = deadline.saturating_sub(started.elapsed());
        match self.mesh.call_hedged(request, left, hedge).await {
            Err(CallError::Unavailable(why)) if may_be_done => Err(CallError::OutcomeUnknown(why)),
            other => other,
        }
    }

    /// A call `node` answers itself (its cache), in-process when it is this process's
    /// node; `Err` says why it got no answer.
    pub async fn call_at(
        &self,
        node: NodeId,
        request: ClientRequest,
        deadline: Duration,
    ) -> Result<ClientResponse, String> {
        match &self.local {
            Some(local) if local.id == node => {
                local.call(request, deadline).await.map_err(|e| match e {
                    LocalError::Overloaded => "node is overloaded; try again".to_string(),
                    LocalError::Lost(why) => why.to_string(),
                })
            }
            _ => self.mesh.call_at(node, &request, deadline).await,
        }
    }

    /// The node of this process, if it runs one.
    pub fn local_id(&self) -> Option<NodeId> {
        self.local.as_ref().map(|l| l.id)
    }

    /// One node's own view (`Status`), in-process when it is this process's node.
    pub async fn status_of(&self, node: NodeId) -> Result<ClientResponse, String> {
        match &self.local {
            Some(local) if local.id == node => local
                .call(ClientRequest::Status, STATUS_TIMEOUT)
                .await
                .map_err(|e| match e {
                    LocalError::Overloaded => "node is overloaded".to_string(),
                    LocalError::Lost(why) => why.to_string(),
                }),
            _ => self.mesh.call_node(node, &ClientRequest::Status).await,
        }
    }
}
