//! `/lock/*`: acquire, release, renew, state, list.

use crate::{ApiError, AppState};
use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query as UrlQuery, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use mesh_client::CallOptions;
use mesh_core::services::envelope::{Command, Query, QueryReply, Reply, SessionRefusal};
use mesh_core::services::lock::{
    Holder, KeyView, LockCommand, LockReply, Mode, Waiter, MAX_CLIENT_BYTES, MAX_KEY_BYTES,
};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

/// Longest wait a request may ask for.
pub(crate) const MAX_WAIT_MS: u64 = 60_000;
/// How long a call may take beyond its own wait (leader changes, retries).
const CALL_SLACK: Duration = Duration::from_secs(10);

#[derive(Deserialize)]
pub(crate) struct AcquireBody {
    key: String,
    mode: String,
    client_id: String,
    ttl_ms: Option<u64>,
    wait_ms: Option<u64>,
}

#[derive(Deserialize)]
pub(crate) struct ReleaseBody {
    key: String,
    client_id: String,
}

#[derive(Deserialize)]
pub(crate) struct RenewBody {
    client_id: String,
}

#[derive(Deserialize)]
pub(crate) struct KeyParam {
    key: Option<String>,
}

fn check_key(key: &str) -> Result<(), ApiError> {
    if key.is_empty() {
        return Err(ApiError::bad_request(
            "invalid_key",
            "key must not be empty",
        ));
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(ApiError::bad_request(
            "invalid_key",
            format!("key is {} bytes; the limit is {MAX_KEY_BYTES}", key.len()),
        ));
    }
    Ok(())
}

fn check_client(client: &str) -> Result<(), ApiError> {
    if client.is_empty() || client.len() > MAX_CLIENT_BYTES {
        return Err(ApiError::bad_request(
            "invalid_client_id",
            format!("client_id must be 1 to {MAX_CLIENT_BYTES} bytes"),
        ));
    }
    Ok(())
}

fn mode_name(mode: Mode) -> &'static str {
    match mode {
        Mode::S => "S",
        Mode::X => "X",
    }
}

fn holders_json(holders: &[Holder]) -> Value {
    holders
        .iter()
        .map(|h| json!({"client_id": h.client, "mode": mode_name(h.mode), "token": h.token, "expires_ms": h.expires_ms}))
        .collect()
}

fn waiters_json(waiters: &[Waiter]) -> Value {
    waiters.iter().map(|w| json!({"client_id": w.client, "mode": mode_name(w.mode), "deadline_ms": w.deadline_ms, "wait": w.id})).collect()
}

fn view_json(v: &KeyView) -> Value {
    json!({"key": v.key, "mode": v.mode.map(mode_name), "holders": holders_json(&v.holders), "waiters": waiters_json(&v.waiters)})
}

/// Propose a lock command and return the lock table's reply, with the answering node's
/// wall clock (for the lease's estimated end).
async fn propose(
    state: &AppState,
    command: LockCommand,
    deadline: Duration,
) -> Result<(LockReply, u64), ApiError> {
    // An acquire that may wait in the queue cannot be hedged (it answers late on
    // purpose), and is withdrawn if its caller goes away or its deadline passes.
    let waits = matches!(command, LockCommand::Acquire { wait_ms, .. } if wait_ms > 0);
    let acquires = matches!(command, LockCommand::Acquire { .. });
    let opts = CallOptions {
        deadline,
        prompt: !waits,
        withdraw_if_abandoned: acquires,
    };
    // What is left of the wait is counted from what was asked, once.
    let asked = match &command {
        LockCommand::Acquire { wait_ms, .. } => *wait_ms,
        _ => 0,
    };
    let started = std::time::Instant::now();
    let mut command = command;
    loop {
        let outcome = state.propose(Command::Lock(command.clone()), opts).await?;
        match outcome.reply {
            Reply::Lock(r) => return Ok((r, outcome.wall_ms)),
            // A node lost our connection while the acquire waited and withdrew it; the
            // call was not granted. Ask again for the time that is left.
            Reply::Withdrawn if started.elapsed() < deadline => {
                if let LockCommand::Acquire { wait_ms, .. } = &mut command {
                    *wait_ms = asked.saturating_sub(started.elapsed().as_millis() as u64);
                }
            }
            Reply::Withdrawn => {
                return Err(ApiError::conflict("timeout", "the wait was withdrawn"));
            }
            Reply::Session(SessionRefusal::TooManyCalls { limit }) => {
                return Err(ApiError::too_many(
                    "too_many_calls",
                    format!("{limit} calls in flight in one session"),
                ))
            }
            other => return Err(ApiError::internal(format!("unexpected reply {other:?}"))),
        }
    }
}

async fn query(state: &AppState, q: Query) -> Result<QueryReply, ApiError> {
    state.read(q, CALL_SLACK).await
}

/// The refusals every lock reply may be.
fn refusal(reply: LockReply, key: &str) -> ApiError {
    match reply {
        LockReply::Conflict { holders } => ApiError::conflict("conflict", format!("{key} is held"))
            .with("holders", holders_json(&holders)),
        LockReply::TimedOut { holders } => {
            ApiError::conflict("timeout", format!("timed out waiting for {key}"))
                .with("holders", holders_json(&holders))
        }
        LockReply::Deadlock { cycle } => ApiError::conflict(
            "deadlock",
            format!("waiting would deadlock: {}", cycle.join(" -> ")),
        )
        .with("cycle", json!(cycle)),
        LockReply::NotHeld { holders } => {
            ApiError::conflict("not_held", format!("{key} is not held by this client"))
                .with("holders", holders_json(&holders))
        }
        LockReply::Invalid(why) => ApiError::bad_request("invalid_request", why),
        LockReply::Busy => {
            ApiError::too_many("too_many_waiters", format!("too many waiters on {key}"))
        }
        other => ApiError::internal(format!("unexpected lock reply {other:?}")),
    }
}

pub(crate) async fn acquire(
    State(state): State<Arc<AppState>>,
    body: Body,
) -> Result<Response, ApiError> {
    let req: AcquireBody = state.json(body).await?;
    check_key(&req.key)?;
    check_client(&req.client_id)?;
    let mode = match req.mode.as_str() {
        "X" | "x" => Mode::X,
        "S" | "s" => Mode::S,
        other => {
            return Err(ApiError::bad_request(
                "invalid_mode",
                format!("unknown mode {other:?}: use \"X\" or \"S\""),
            ))
        }
    };
    let wait_ms = req.wait_ms.unwrap_or(0);
    if wait_ms > MAX_WAIT_MS {
        return Err(ApiError::bad_request(
            "invalid_wait",
            format!("wait_ms is at most {MAX_WAIT_MS}"),
        ));
    }
    let ttl_ms = req.ttl_ms.unwrap_or(0);
    let cmd = LockCommand::Acquire {
        key: req.key.clone(),
        client: req.client_id,
        mode,
        ttl_ms,
        wait_ms,
    };
    match propose(&state, cmd, Duration::from_millis(wait_ms) + CALL_SLACK).await? {
        (
            LockReply::Granted {
                token,
                mode,
                expires_in_ms,
                ttl_ms,
                ..
            },
            wall_ms,
        ) => Ok(Json(json!({
            "ok": true,
            "token": token,
            "mode": mode_name(mode),
            // The lease left when granted: count it from when the request was sent.
            "expires_in_ms": expires_in_ms,
            "ttl_ms": ttl_ms,
            // An estimate on the answering node's wall clock, for people to read.
            "expires_at_ms": wall_ms.saturating_add(expires_in_ms),
        }))
        .into_response()),
        (other, _) => Err(refusal(other, &req.key)),
    }
}

pub(crate) async fn release(
    State(state): State<Arc<AppState>>,
    body: Body,
) -> Result<Response, ApiError> {
    let req: ReleaseBody = state.json(body).await?;
    check_key(&req.key)?;
    check_client(&req.client_id)?;
    let cmd = LockCommand::Release {
        key: req.key.clone(),
        client: req.client_id,
    };
    match propose(&state, cmd, CALL_SLACK).await?.0 {
        LockReply::Released => Ok(Json(json!({"ok": true})).into_response()),
        other => Err(refusal(other, &req.key)),
    }
}

pub(crate) async fn renew(
    State(state): State<Arc<AppState>>,
    body: Body,
) -> Result<Response, ApiError> {
    let req: RenewBody = state.json(body).await?;
    check_client(&req.client_id)?;
    match propose(
        &state,
        LockCommand::Renew {
            client: req.client_id,
        },
        CALL_SLACK,
    )
    .await?
    .0
    {
        LockReply::Renewed { locks } => {
            Ok(Json(json!({"ok": true, "renewed": locks})).into_response())
        }
        other => Err(refusal(other, "")),
    }
}

pub(crate) async fn state(
    State(state): State<Arc<AppState>>,
    p: Result<UrlQuery<KeyParam>, QueryRejection>,
) -> Result<Response, ApiError> {
    let UrlQuery(p) = p?;
    let key = p
        .key
        .ok_or_else(|| ApiError::bad_request("invalid_key", "query parameter key is required"))?;
    check_key(&key)?;
    match query(&state, Query::LockState { key }).await? {
        QueryReply::LockState(view) => {
            let mut body = view_json(&view);
            body["ok"] = json!(true);
            Ok(Json(body).into_response())
        }
        other => Err(ApiError::internal(format!("unexpected reply {other:?}"))),
    }
}

pub(crate) async fn list(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
    match query(&state, Query::LockList { limit: 1000 }).await? {
        QueryReply::LockList(views) => {
            let locks: Vec<Value> = views.iter().map(view_json).collect();
            Ok(Json(json!({"ok": true, "locks": locks})).into_response())
        }
        other => Err(ApiError::internal(format!("unexpected reply {other:?}"))),
    }
}

/// `lock_held{mode}`, `lock_waiters` and `lock_deadlocks_total` in Prometheus text.
pub(crate) async fn metrics_text(state: &AppState) -> Option<String> {
    let QueryReply::LockStats {
        shared,
        exclusive,
        waiters,
        deadlocks,
    } = query(state, Query::LockStats).await.ok()?
    else {
        return None;
    };
    Some(format!(
        "# HELP lock_held Locks held, by mode\n# TYPE lock_held gauge\nlock_held{{mode=\"S\"}} {shared}\nlock_held{{mode=\"X\"}} {exclusive}\n\
         # HELP lock_waiters Queued lock requests\n# TYPE lock_waiters gauge\nlock_waiters {waiters}\n\
         # HELP lock_deadlocks_total Lock requests refused for deadlock\n# TYPE lock_deadlocks_total counter\nlock_deadlocks_total {deadlocks}\n"
    ))
}

/// The OpenAPI document of the routes this gateway serves.
pub(crate) const OPENAPI: &str = r#"{
  "openapi": "3.0.3",
  "info": {"title": "syncmesh gateway", "version": "1"},
  "paths": {
    "/health": {"get": {"summary": "The home node's view: role, term, leader", "responses": {"200": {"description": "ok"}, "503": {"description": "home node unreachable"}}}},
    "/lock/acquire": {"post": {"summary": "Take a lock (X or S) with a lease; optionally wait in FIFO order",
      "requestBody": {"required": true, "content": {"application/json": {"schema": {"type": "object", "required": ["key", "mode", "client_id"],
        "properties": {"key": {"type": "string", "minLength": 1, "maxLength": 256}, "mode": {"type": "string", "enum": ["X", "S"]},
          "client_id": {"type": "string", "minLength": 1, "maxLength": 256}, "ttl_ms": {"type": "integer", "minimum": 0}, "wait_ms": {"type": "integer", "minimum": 0, "maximum": 60000}}}}}},
      "responses": {"200": {"description": "granted: {ok, token, mode, expires_in_ms, ttl_ms, expires_at_ms}"}, "400": {"description": "invalid input"}, "409": {"description": "conflict, timeout or deadlock"}, "413": {"description": "body too large"}, "429": {"description": "too many waiters"}, "503": {"description": "no leader: not carried out"}, "504": {"description": "outcome unknown"}}}},
    "/lock/release": {"post": {"summary": "Release a lock", "requestBody": {"required": true, "content": {"application/json": {"schema": {"type": "object", "required": ["key", "client_id"],
        "properties": {"key": {"type": "string"}, "client_id": {"type": "string"}}}}}},
      "responses": {"200": {"description": "released"}, "409": {"description": "not held"}}}},
    "/lock/renew": {"post": {"summary": "Extend every lease of a client", "requestBody": {"required": true, "content": {"application/json": {"schema": {"type": "object", "required": ["client_id"],
        "properties": {"client_id": {"type": "string"}}}}}}, "responses": {"200": {"description": "renewed: {ok, renewed}"}}}},
    "/lock/state": {"get": {"summary": "Holders and waiters of one key (linearizable)", "parameters": [{"name": "key", "in": "query", "required": true, "schema": {"type": "string"}}],
      "responses": {"200": {"description": "state"}}}},
    "/lock/list": {"get": {"summary": "Every key held or waited on (linearizable)", "responses": {"200": {"description": "locks"}}}},
    "/cache/put": {"post": {"summary": "Put a value in one node's cache (write-back: M; durable: E)",
      "requestBody": {"required": true, "content": {"application/json": {"schema": {"type": "object", "required": ["key", "val"],
        "properties": {"key": {"type": "string", "minLength": 1, "maxLength": 1024}, "val": {}, "node": {"type": "string"},
          "ttl_ms": {"type": "integer", "minimum": 1}, "durable": {"type": "boolean"}}}}}},
      "responses": {"200": {"description": "{ok, state}"}, "400": {"description": "invalid input"}, "413": {"description": "body too large"}, "429": {"description": "cache full"}, "503": {"description": "not done: no leader or no lease"}, "504": {"description": "outcome unknown"}}}},
    "/cache/get": {"post": {"summary": "Get a value from one node's cache (a miss is 200 with hit false)",
      "requestBody": {"required": true, "content": {"application/json": {"schema": {"type": "object", "required": ["key"],
        "properties": {"key": {"type": "string"}, "node": {"type": "string"}}}}}},
      "responses": {"200": {"description": "{hit, val, state}"}, "400": {"description": "invalid input"}, "503": {"description": "not done"}}}},
    "/cache/del": {"post": {"summary": "Delete a key everywhere", "requestBody": {"required": true, "content": {"application/json": {"schema": {"type": "object", "required": ["key"],
        "properties": {"key": {"type": "string"}, "node": {"type": "string"}}}}}}, "responses": {"200": {"description": "{ok}"}}}},
    "/cache/evict": {"post": {"summary": "Flush one line from one node (written back first if M)", "requestBody": {"required": true, "content": {"application/json": {"schema": {"type": "object", "required": ["key"],
        "properties": {"key": {"type": "string"}, "node": {"type": "string"}}}}}}, "responses": {"200": {"description": "{ok, node, was}"}}}},
    "/cache/state": {"get": {"summary": "A key's line on every node and the directory's record", "parameters": [{"name": "key", "in": "query", "required": true, "schema": {"type": "string"}}],
      "responses": {"200": {"description": "{key, nodes, directory}"}}}},
    "/cache/stats": {"get": {"summary": "Hits, misses, invalidations, write-backs, evictions per node", "responses": {"200": {"description": "{nodes}"}}}},
    "/cache/{key}": {"parameters": [{"name": "key", "in": "path", "required": true, "schema": {"type": "string"}}],
      "get": {"summary": "As POST /cache/get", "responses": {"200": {"description": "{hit, val, state}"}}},
      "put": {"summary": "As POST /cache/put; the body is the value", "requestBody": {"required": true, "content": {"application/json": {"schema": {}}}}, "responses": {"200": {"description": "{ok, state}"}}},
      "delete": {"summary": "As POST /cache/del", "responses": {"200": {"description": "{ok}"}}}},
    "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {"description": "text"}}}}
  }
}"#;
