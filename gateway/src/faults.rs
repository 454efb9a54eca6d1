//! `POST /api/fault/{stop,restart,isolate,heal}` with `{"node": "node2"}`: the console's
//! fault buttons. The gateway owns no process, so it only passes the request on to
//! whoever does (`syncmesh cluster`, through a [`FaultSender`]) and answers what that
//! says. Without one the routes do not exist (a gateway deployed on its own cannot
//! break its cluster), and the console shows no buttons.

use crate::{ApiError, AppState};
use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use mesh_core::raft::NodeId;
use mesh_core::wire::{node_name, parse_node_name};
use serde::Deserialize;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// What a fault button asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// kill -9 the node's process.
    Stop,
    /// Start the node again (kill -9 first if it runs).
    Restart,
    /// Cut the node off from every peer.
    Isolate,
    /// Let it reach its peers again.
    Heal,
}

impl Fault {
    fn parse(s: &str) -> Option<Self> {
        match s {
            "stop" => Some(Self::Stop),
            "restart" => Some(Self::Restart),
            "isolate" => Some(Self::Isolate),
            "heal" => Some(Self::Heal),
            _ => None,
        }
    }
}

/// One fault to inject, and where to say how it went (`Ok`: what was done, for a
/// person; `Err`: why not).
#[derive(Debug)]
pub struct FaultRequest {
    /// The fault.
    pub fault: Fault,
    /// The node.
    pub node: NodeId,
    /// The answer.
    pub reply: oneshot::Sender<Result<String, String>>,
}

/// Where the gateway sends fault requests (bounded: a person presses buttons).
pub type FaultSender = mpsc::Sender<FaultRequest>;

/// How long the owner of the processes may take to answer.
const ANSWER_WITHIN: Duration = Duration::from_secs(10);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FaultBody {
    node: String,
}

pub(crate) async fn inject(
    State(state): State<Arc<AppState>>,
    action: Result<Path<String>, PathRejection>,
    body: Body,
) -> Result<Response, ApiError> {
    let Path(action) = action?;
    let Some(faults) = &state.faults else {
        return Err(ApiError::not_found("fault injection is off"));
    };
    let fault = Fault::parse(&action).ok_or_else(|| {
        ApiError::not_found(format!(
            "no fault {action:?}: stop, restart, isolate or heal"
        ))
    })?;
    let FaultBody { node } = state.json(body).await?;
    let id = parse_node_name(&node)
        .filter(|id| state.caller.cluster().mesh().nodes().contains(id))
        .ok_or_else(|| {
            ApiError::bad_request(
                "unknown_node",
                format!("{node:?} is not a node of this cluster"),
            )
        })?;
    let (reply, answer) = oneshot::channel();
    faults
        .try_send(FaultRequest {
            fault,
            node: id,
            reply,
        })
        .map_err(|_| ApiError::too_many("faults_busy", "a fault is being injected; try again"))?;
    match tokio::time::timeout(ANSWER_WITHIN, answer).await {
        Ok(Ok(Ok(done))) => {
            tracing::warn!(node = %node_name(id), ?fault, "fault injected: {done}");
            Ok(
                axum::Json(serde_json::json!({"ok": true, "node": node_name(id), "done": done}))
                    .into_response(),
            )
        }
        Ok(Ok(Err(why))) => Err(ApiError::conflict("fault_refused", why)),
        Ok(Err(_)) | Err(_) => Err(ApiError::unavailable(
            "fault_unanswered",
            "the cluster's launcher did not answer",
        )),
    }
}
