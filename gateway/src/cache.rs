//! `/cache/*`: put, get, del, evict, state, stats, and the REST aliases `/cache/{key}`.
//!
//! Every call goes to one node's cache: the node named by `node`, or by default the
//! node this API is served for (a node's own port, or a gateway's home node). That
//! node answers it itself: a hit from memory, anything else through the directory it
//! reaches over the log. Nothing here waits for the leader.

use crate::{ApiError, AppState};
use axum::body::Body;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query as UrlQuery, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use mesh_core::raft::NodeId;
use mesh_core::services::cache::directory::{KeyDirView, MAX_KEY_BYTES, MAX_VALUE_BYTES};
use mesh_core::services::cache::{CacheAnswer, CacheCall, CacheError, CacheStats, Mesi};
use mesh_core::wire::{node_name, parse_node_name, ClientRequest, ClientResponse};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::sync::Arc;
use std::time::Duration;

/// How long a cache call may take (the node gives up on its own after 5 s).
const CACHE_DEADLINE: Duration = Duration::from_secs(7);
/// The longest TTL a put may ask for (a year).
const MAX_TTL_MS: u64 = 365 * 24 * 3_600_000;

#[derive(Deserialize)]
pub(crate) struct PutBody {
    key: String,
    val: Value,
    node: Option<String>,
    ttl_ms: Option<u64>,
    durable: Option<bool>,
}

#[derive(Deserialize)]
pub(crate) struct KeyBody {
    key: String,
    node: Option<String>,
}

#[derive(Deserialize)]
pub(crate) struct KeyParams {
    key: Option<String>,
}

#[derive(Deserialize)]
pub(crate) struct RestParams {
    node: Option<String>,
    ttl_ms: Option<u64>,
    durable: Option<bool>,
}

fn check_key(key: &str) -> Result<(), ApiError> {
    if key.is_empty() || key.len() > MAX_KEY_BYTES {
        return Err(ApiError::bad_request(
            "invalid_key",
            format!(
                "key is {} bytes; a key is 1 to {MAX_KEY_BYTES} bytes",
                key.len()
            ),
        ));
    }
    Ok(())
}

fn check_ttl(ttl_ms: Option<u64>) -> Result<(), ApiError> {
    match ttl_ms {
        Some(0) => Err(ApiError::bad_request(
            "invalid_ttl",
            "ttl_ms must be at least 1 (leave it out for no TTL)",
        )),
        Some(t) if t > MAX_TTL_MS => Err(ApiError::bad_request(
            "invalid_ttl",
            format!("ttl_ms is at most {MAX_TTL_MS} (a year)"),
        )),
        _ => Ok(()),
    }
}

impl AppState {
    /// The node a cache call acts at: `node` if given (it must be a member), else this
    /// API's own node.
    fn cache_node(&self, node: Option<&str>) -> Result<NodeId, ApiError> {
        let Some(name) = node else {
            return Ok(self.home);
        };
        let known = self.caller.cluster().mesh().nodes();
        match parse_node_name(name) {
            Some(id) if known.contains(&id) => Ok(id),
            _ => Err(ApiError::bad_request(
                "unknown_node",
                format!(
                    "no node {name:?} in this cluster; nodes are {}",
                    known
                        .iter()
                        .map(|n| node_name(*n))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )),
        }
    }

    /// Hand `call` to `node`'s cache; refusals mapped to HTTP.
    async fn cache_call(&self, node: NodeId, call: &CacheCall) -> Result<CacheAnswer, ApiError> {
        // Encoding plain data into a Vec cannot fail.
        let bytes = postcard::to_stdvec(call).unwrap_or_default();
        let response = self
            .caller
            .cluster()
            .call_at(node, ClientRequest::Local(bytes), CACHE_DEADLINE)
            .await
            .map_err(|why| {
                ApiError::unavailable("node_unreachable", format!("{}: {why}", node_name(node)))
            })?;
        let ClientResponse::Local(bytes) = response else {
            return Err(ApiError::unavailable(
                "node_unreachable",
                format!("{} gave no cache answer: {response:?}", node_name(node)),
            ));
        };
        let answer: CacheAnswer = postcard::from_bytes(&bytes).map_err(|e| {
            ApiError::internal(format!(
                "{}'s cache answer does not decode: {e}",
                node_name(node)
            ))
        })?;
        match answer {
            CacheAnswer::Error(e) => Err(cache_error(node, e)),
            other => Ok(other),
        }
    }
}

fn cache_error(node: NodeId, e: CacheError) -> ApiError {
    let at = node_name(node);
    match e {
        CacheError::Unavailable(why) => {
            ApiError::unavailable("cache_unavailable", format!("{at}: {why}"))
        }
        CacheError::Unknown(why) => ApiError::outcome_unknown(format!("{at}: {why}")),
        CacheError::Full(why) => ApiError::too_many("cache_full", format!("{at}: {why}")),
        CacheError::Invalid(why) => {
            ApiError::bad_request("invalid_request", format!("{at}: {why}"))
        }
    }
}

fn unexpected(answer: &CacheAnswer) -> ApiError {
    ApiError::internal(format!("unexpected cache answer {answer:?}"))
}

fn encode_value(val: &Value) -> Result<Vec<u8>, ApiError> {
    let bytes = serde_json::to_vec(val)
        .map_err(|e| ApiError::bad_request("invalid_value", e.to_string()))?;
    if bytes.len() > MAX_VALUE_BYTES {
        return Err(ApiError::bad_request(
            "invalid_value",
            format!(
                "the value is {} bytes; the limit is {MAX_VALUE_BYTES}",
                bytes.len()
            ),
        ));
    }
    Ok(bytes)
}

fn got_json(answer: CacheAnswer) -> Result<Value, ApiError> {
    let CacheAnswer::Got { hit, value, state } = answer else {
        return Err(unexpected(&answer));
    };
    let val = match value {
        Some(bytes) => serde_json::from_slice(&bytes)
            .map_err(|e| ApiError::internal(format!("a cached value is not JSON: {e}")))?,
        None => Value::Null,
    };
    Ok(json!({ "hit": hit, "val": val, "state": state.letter() }))
}

async fn do_put(
    state: &AppState,
    key: String,
    val: &Value,
    node: Option<&str>,
    ttl_ms: Option<u64>,
    durable: Option<bool>,
) -> Result<Response, ApiError> {
    check_key(&key)?;
    check_ttl(ttl_ms)?;
    let node = state.cache_node(node)?;
    let call = CacheCall::Put {
        key,
        value: encode_value(val)?,
        ttl_ms,
        durable,
    };
    match state.cache_call(node, &call).await? {
        CacheAnswer::Put { state } => {
            Ok(Json(json!({ "ok": true, "state": state.letter() })).into_response())
        }
        other => Err(unexpected(&other)),
    }
}

async fn do_get(state: &AppState, key: String, node: Option<&str>) -> Result<Response, ApiError> {
    check_key(&key)?;
    let node = state.cache_node(node)?;
    let answer = state.cache_call(node, &CacheCall::Get { key }).await?;
    Ok(Json(got_json(answer)?).into_response())
}

async fn do_delete(
    state: &AppState,
    key: String,
    node: Option<&str>,
) -> Result<Response, ApiError> {
    check_key(&key)?;
    let node = state.cache_node(node)?;
    match state.cache_call(node, &CacheCall::Delete { key }).await? {
        CacheAnswer::Deleted => Ok(Json(json!({ "ok": true })).into_response()),
        other => Err(unexpected(&other)),
    }
}

/// `POST /cache/put`.
pub(crate) async fn put(
    State(state): State<Arc<AppState>>,
    body: Body,
) -> Result<Response, ApiError> {
    let b: PutBody = state.json(body).await?;
    do_put(
        &state,
        b.key,
        &b.val,
        b.node.as_deref(),
        b.ttl_ms,
        b.durable,
    )
    .await
}

/// `POST /cache/get`.
pub(crate) async fn get(
    State(state): State<Arc<AppState>>,
    body: Body,
) -> Result<Response, ApiError> {
    let b: KeyBody = state.json(body).await?;
    do_get(&state, b.key, b.node.as_deref()).await
}

/// `POST /cache/del`: the key is gone everywhere.
pub(crate) async fn del(
    State(state): State<Arc<AppState>>,
    body: Body,
) -> Result<Response, ApiError> {
    let b: KeyBody = state.json(body).await?;
    do_delete(&state, b.key, b.node.as_deref()).await
}

/// `POST /cache/evict`: one node gives up its line (written back first if M).
pub(crate) async fn evict(
    State(state): State<Arc<AppState>>,
    body: Body,
) -> Result<Response, ApiError> {
    let b: KeyBody = state.json(body).await?;
    check_key(&b.key)?;
    let node = state.cache_node(b.node.as_deref())?;
    match state
        .cache_call(node, &CacheCall::Evict { key: b.key })
        .await?
    {
        CacheAnswer::Evicted { was, lost } => Ok(Json(json!({
            "ok": true,
            "node": node_name(node),
            "was": was.letter(),
            "lost": lost,
        }))
        .into_response()),
        other => Err(unexpected(&other)),
    }
}

fn dir_json(view: &KeyDirView) -> Value {
    json!({
        "owner": view.owner.map(node_name),
        "sharers": view.sharers.iter().map(|n| node_name(*n)).collect::<Vec<_>>(),
        "revoking": view.revoking.iter().map(|n| node_name(*n)).collect::<Vec<_>>(),
        "epoch": view.epoch,
        "version": view.version,
        "has_value": view.has_value,
        "waiting": view.waiting,
    })
}

/// `GET /cache/state?key=`: the key's line on every node, and the directory's record.
pub(crate) async fn state(
    State(state): State<Arc<AppState>>,
    q: Result<UrlQuery<KeyParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let UrlQuery(q) = q?;
    let Some(key) = q.key else {
        return Err(ApiError::bad_request(
            "invalid_key",
            "key is required: /cache/state?key=...",
        ));
    };
    check_key(&key)?;
    let nodes = state.caller.cluster().mesh().nodes();
    let call = CacheCall::State { key: key.clone() };
    let answers = ask_every_node(&state, &nodes, &call).await;
    let mut per_node = Map::new();
    let mut directory = Value::Null;
    for (node, answer) in nodes.iter().zip(answers) {
        let entry = match answer {
            Ok(CacheAnswer::State { line, directory: d }) => {
                if directory.is_null() {
                    if let Some(d) = &d {
                        directory = dir_json(d);
                    }
                }
                match line {
                    Some(l) => json!({
                        "state": l.state.letter(),
                        "version": l.version,
                        "epoch": l.epoch,
                        "dirty": l.dirty,
                    }),
                    None => json!({ "state": Mesi::Invalid.letter() }),
                }
            }
            Ok(other) => json!({ "state": null, "error": format!("{other:?}") }),
            Err(e) => json!({ "state": null, "error": e.message }),
        };
        per_node.insert(node_name(*node), entry);
    }
    Ok(Json(json!({ "key": key, "nodes": per_node, "directory": directory })).into_response())
}

fn stats_json(s: &CacheStats) -> Value {
    json!({
        "hits": s.hits,
        "misses": s.misses,
        "invalidations": s.invalidations,
        "writebacks": s.writebacks,
        "writeback_refusals": s.writeback_refusals,
        "evictions": s.evictions,
        "expirations": s.expirations,
        "fills": s.fills,
        "local_puts": s.local_puts,
        "directory_requests": s.requests,
        "lines": { "M": s.lines[0], "E": s.lines[1], "S": s.lines[2] },
        "lease_valid": s.lease_valid,
    })
}

/// `GET /cache/stats`: every node's counters.
pub(crate) async fn stats(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
    let nodes = state.caller.cluster().mesh().nodes();
    let answers = ask_every_node(&state, &nodes, &CacheCall::Stats).await;
    let mut per_node = Map::new();
    for (node, answer) in nodes.iter().zip(answers) {
        let entry = match answer {
            Ok(CacheAnswer::Stats(s)) => stats_json(&s),
            Ok(other) => json!({ "error": format!("{other:?}") }),
            Err(e) => json!({ "error": e.message }),
        };
        per_node.insert(node_name(*node), entry);
    }
    Ok(Json(json!({ "nodes": per_node })).into_response())
}

/// Ask every node at once.
pub(crate) async fn ask_every_node(
    state: &Arc<AppState>,
    nodes: &[NodeId],
    call: &CacheCall,
) -> Vec<Result<CacheAnswer, ApiError>> {
    let mut set = tokio::task::JoinSet::new();
    for (i, node) in nodes.iter().copied().enumerate() {
        let (state, call) = (state.clone(), call.clone());
        set.spawn(async move { (i, state.cache_call(node, &call).await) });
    }
    let mut out: Vec<Result<CacheAnswer, ApiError>> = nodes
        .iter()
        .map(|_| Err(ApiError::internal("no answer")))
        .collect();
    while let Some(joined) = set.join_next().await {
        if let Ok((i, r)) = joined {
            out[i] = r;
        }
    }
    out
}

/// `GET /cache/{key}`.
pub(crate) async fn rest_get(
    State(state): State<Arc<AppState>>,
    key: Result<Path<String>, PathRejection>,
    q: Result<UrlQuery<RestParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Path(key) = key?;
    let UrlQuery(q) = q?;
    do_get(&state, key, q.node.as_deref()).await
}

/// `PUT /cache/{key}`: the body is the value.
pub(crate) async fn rest_put(
    State(state): State<Arc<AppState>>,
    key: Result<Path<String>, PathRejection>,
    q: Result<UrlQuery<RestParams>, QueryRejection>,
    body: Body,
) -> Result<Response, ApiError> {
    let Path(key) = key?;
    let UrlQuery(q) = q?;
    let val: Value = state.json(body).await?;
    do_put(&state, key, &val, q.node.as_deref(), q.ttl_ms, q.durable).await
}

/// `DELETE /cache/{key}`.
pub(crate) async fn rest_delete(
    State(state): State<Arc<AppState>>,
    key: Result<Path<String>, PathRejection>,
    q: Result<UrlQuery<RestParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Path(key) = key?;
    let UrlQuery(q) = q?;
    do_delete(&state, key, q.node.as_deref()).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::StatusCode;

    /// Every refusal a node's cache gives has its documented status and code (the
    /// caps behind `Full` are too large to reach over HTTP in a test: the agent's own
    /// tests reach them).
    #[test]
    fn every_cache_error_maps_to_its_documented_status() {
        for (e, status, code) in [
            (
                CacheError::Unavailable("no lease".into()),
                StatusCode::SERVICE_UNAVAILABLE,
                "cache_unavailable",
            ),
            (
                CacheError::Unknown("timed out".into()),
                StatusCode::GATEWAY_TIMEOUT,
                "outcome_unknown",
            ),
            (
                CacheError::Full("the directory holds 1000000 keys".into()),
                StatusCode::TOO_MANY_REQUESTS,
                "cache_full",
            ),
            (
                CacheError::Invalid("bad key".into()),
                StatusCode::BAD_REQUEST,
                "invalid_request",
            ),
        ] {
            let why = format!("{e:?}");
            let got = cache_error(2, e);
            assert_eq!((got.status, got.code), (status, code), "{why}");
            assert!(got.message.starts_with("node2: "), "{}", got.message);
        }
    }
}
