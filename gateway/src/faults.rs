//! `POST /api/fault/{stop,restart,isolate,heal}` with `{"node": "node2"}`: the console's
//! fault buttons. The gateway owns no process, so it only passes the request on to
//! whoever does (`syncmesh cluster`, through a [`FaultSender`]) and answers what that
//! says. Without one the routes do not exist (a gateway deployed on its own cannot
//! break its cluster), and the console shows no buttons.
//!
//! Any web page a person has open can make their browser POST to localhost (CSRF), and
//! one whose name is re-pointed at 127.0.0.1 can even read the answers (DNS rebinding).
//! So a fault is carried out only for a JSON call (a cross-site page cannot send one
//! without a CORS preflight, which this gateway never grants) addressed to a loopback
//! name (`Host`) from the console's own origin (`Origin`, when the browser sends one).

use crate::{ApiError, AppState};
use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap};
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

/// `Host` without its port names this machine's loopback.
fn loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Refuse a call another site's page could have made (see the module docs).
fn check_caller(headers: &HeaderMap) -> Result<(), ApiError> {
    let text = |name| {
        headers
            .get(name)
            .map(|v: &axum::http::HeaderValue| v.to_str().unwrap_or("\u{fffd}"))
    };
    let host = text(header::HOST).unwrap_or("");
    if !loopback_host(host) {
        return Err(ApiError::forbidden(
            "not_loopback",
            format!("faults are injected only through a loopback address, not Host {host:?}"),
        ));
    }
    if let Some(origin) = text(header::ORIGIN) {
        if origin != format!("http://{host}") {
            return Err(ApiError::forbidden(
                "foreign_origin",
                format!("faults are injected only from the console's own page, not {origin:?}"),
            ));
        }
    }
    let json = text(header::CONTENT_TYPE).is_some_and(|t| {
        t.split(';')
            .next()
            .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
    });
    if !json {
        return Err(ApiError::bad_request(
            "not_json",
            "a fault request is a JSON body with Content-Type: application/json",
        ));
    }
    Ok(())
}

pub(crate) async fn inject(
    State(state): State<Arc<AppState>>,
    action: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let Path(action) = action?;
    let Some(faults) = &state.faults else {
        return Err(ApiError::not_found("fault injection is off"));
    };
    check_caller(&headers)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(header::HeaderName, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in pairs {
            h.insert(name.clone(), value.parse().expect("a header value"));
        }
        h
    }

    #[test]
    fn only_a_same_origin_json_call_to_a_loopback_name_injects_a_fault() {
        let json = (header::CONTENT_TYPE, "application/json");
        for host in [
            "127.0.0.1:8000",
            "localhost:8000",
            "[::1]:8000",
            "LOCALHOST",
        ] {
            let ok = headers(&[(header::HOST, host), json.clone()]);
            assert!(check_caller(&ok).is_ok(), "{host}");
            let origin = format!("http://{host}");
            let same = headers(&[
                (header::HOST, host),
                (header::ORIGIN, &origin),
                json.clone(),
            ]);
            assert!(check_caller(&same).is_ok(), "{host} from its own page");
        }
        let code = |pairs: &[(header::HeaderName, &str)]| {
            check_caller(&headers(pairs)).map_err(|e| (e.status.as_u16(), e.code))
        };
        // DNS rebinding: the page's own name resolves to 127.0.0.1.
        assert_eq!(
            code(&[(header::HOST, "evil.example:8000"), json.clone()]),
            Err((403, "not_loopback"))
        );
        assert_eq!(
            code(std::slice::from_ref(&json)),
            Err((403, "not_loopback"))
        );
        assert_eq!(
            code(&[(header::HOST, "127.0.0.1.evil.example"), json.clone()]),
            Err((403, "not_loopback"))
        );
        // CSRF: another page posts to the console's address.
        assert_eq!(
            code(&[
                (header::HOST, "127.0.0.1:8000"),
                (header::ORIGIN, "https://evil.example"),
                json.clone()
            ]),
            Err((403, "foreign_origin"))
        );
        // A form post needs no preflight, so it must not do anything either.
        assert_eq!(
            code(&[
                (header::HOST, "127.0.0.1:8000"),
                (header::CONTENT_TYPE, "text/plain")
            ]),
            Err((400, "not_json"))
        );
        assert_eq!(
            code(&[
                (header::HOST, "127.0.0.1:8000"),
                (header::CONTENT_TYPE, "application/json; charset=utf-8")
            ]),
            Ok(())
        );
    }
}
