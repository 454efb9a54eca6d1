//! The admin HTTP server of a node: `GET /health` (DESIGN.md section 4) and `GET /metrics`.

use crate::metrics::NodeMetrics;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use std::future::Future;
use tokio::sync::watch;

/// What `/health` reports.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Health {
    /// Always true while the process serves.
    pub ok: bool,
    /// This node, e.g. `node1`.
    pub id: String,
    /// 0 follower, 1 candidate, 2 leader.
    pub role: u8,
    /// `follower`, `pre_candidate`, `candidate` or `leader`.
    pub role_name: String,
    /// Current term.
    pub term: u64,
    /// The leader this node knows of.
    pub leader: Option<String>,
    /// Commit index.
    pub commit_index: u64,
    /// Applied index.
    pub applied_index: u64,
    /// Last log index.
    pub last_index: u64,
    /// Voters of the current membership.
    pub voters: Vec<String>,
}

#[derive(Clone)]
struct AdminState {
    health: watch::Receiver<Health>,
    metrics: NodeMetrics,
}

async fn health(State(state): State<AdminState>) -> Json<Health> {
    Json(state.health.borrow().clone())
}

async fn metrics(State(state): State<AdminState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}

/// Serve on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    health_rx: watch::Receiver<Health>,
    node_metrics: NodeMetrics,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .with_state(AdminState {
            health: health_rx,
            metrics: node_metrics,
        });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}
