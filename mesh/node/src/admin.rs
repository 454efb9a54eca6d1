//! The admin HTTP server of a node: `GET /health` (DESIGN.md section 4) and `GET /metrics`;
//! with fault injection on, `POST /fault/hold-answers`, `/fault/lose-held`, `/fault/isolate`
//! and `/fault/heal` (see
//! [`crate::faults`]).

use crate::faults::AnswerFaults;
use crate::metrics::NodeMetrics;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;
use std::future::Future;
use std::sync::Arc;
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

async fn hold_answers(State(faults): State<Arc<AnswerFaults>>) -> Json<serde_json::Value> {
    faults.hold_next();
    Json(serde_json::json!({"ok": true}))
}

async fn lose_held(State(faults): State<Arc<AnswerFaults>>) -> Json<serde_json::Value> {
    let lost = faults.lose_held();
    Json(serde_json::json!({"ok": true, "lost": lost}))
}

async fn fault_state(State(faults): State<Arc<AnswerFaults>>) -> Json<serde_json::Value> {
    let (holding, held) = faults.holding();
    Json(
        serde_json::json!({"holding": holding, "held_request": held, "isolated": faults.isolated()}),
    )
}

async fn isolate(State(faults): State<Arc<AnswerFaults>>) -> Json<serde_json::Value> {
    faults.set_isolated(true);
    tracing::warn!("fault injection: cut off from every peer");
    Json(serde_json::json!({"ok": true, "isolated": true}))
}

async fn heal(State(faults): State<Arc<AnswerFaults>>) -> Json<serde_json::Value> {
    faults.set_isolated(false);
    tracing::warn!("fault injection: peers reachable again");
    Json(serde_json::json!({"ok": true, "isolated": false}))
}

/// Serve on `listener` until `shutdown` completes; the fault endpoints only with
/// `faults`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    health_rx: watch::Receiver<Health>,
    node_metrics: NodeMetrics,
    faults: Option<Arc<AnswerFaults>>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let mut app = Router::new();
    if let Some(faults) = faults {
        app = app.merge(
            Router::new()
                .route("/fault/hold-answers", post(hold_answers))
                .route("/fault/lose-held", post(lose_held))
                .route("/fault/isolate", post(isolate))
                .route("/fault/heal", post(heal))
                .route("/fault", get(fault_state))
                .with_state(faults),
        );
    }
    let app = app
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
