//! `/queue/*`: enqueue, dequeue (long polls, batches), ack, nack, extend, stats, dead
//! letters and requeue, over the replicated queue service.
//!
//! Values are any JSON and travel as the producer's own text (never re-encoded, so a
//! payload comes back byte for byte). A producer that sent the value as `body` gets it
//! back as `body`. Message ids are `"PARTITION-SEQ"` strings; receipts are strings too.

use crate::groups::EnqueueGroups;
use crate::{ApiError, AppState};
use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query as UrlQuery, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use mesh_client::CallOptions;
use mesh_core::services::envelope::{Command, Query, QueryReply, Reply, SessionRefusal};
use mesh_core::services::queue::{
    DeadView, Delivery, Field, MsgId, NewMessage, QueueCommand, QueueReply, QueueSettings,
    DEFAULT_QUEUE, MAX_BATCH, MAX_KEY_BYTES, MAX_VALUE_BYTES, MAX_WAIT_MS,
};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a call may take beyond its own wait (leader changes, retries).
const CALL_SLACK: Duration = Duration::from_secs(10);

/// A JSON value kept as the producer's text.
type Raw = Box<RawValue>;

/// A present field as its raw text, `null` included (plain `Option` reads `null` as
/// absent).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Raw>, D::Error> {
    Raw::deserialize(d).map(Some)
}

#[derive(Deserialize)]
struct EnqBody {
    key: Option<String>,
    #[serde(default, deserialize_with = "present")]
    value: Option<Raw>,
    #[serde(default, deserialize_with = "present")]
    body: Option<Raw>,
    queue: Option<String>,
    dedup_id: Option<String>,
}

#[derive(Deserialize, Default)]
struct DeqBody {
    queue: Option<String>,
    key: Option<String>,
    visibility_ms: Option<u64>,
    wait_ms: Option<u64>,
    max: Option<u32>,
}

/// A msg id or receipt, as a string or a number.
#[derive(Deserialize, Clone)]
#[serde(untagged)]
enum Token {
    Text(String),
    Number(u64),
}

impl Token {
    fn text(&self) -> String {
        match self {
            Self::Text(s) => s.clone(),
            Self::Number(n) => n.to_string(),
        }
    }
}

#[derive(Deserialize)]
struct AckBody {
    queue: Option<String>,
    msg_id: Option<Token>,
    message_id: Option<Token>,
    msg_ids: Option<Vec<Token>>,
    receipt: Option<Token>,
    receipts: Option<Vec<Token>>,
    visibility_ms: Option<u64>,
}

#[derive(Deserialize, Default)]
struct RequeueBody {
    queue: Option<String>,
    msg_ids: Option<Vec<Token>>,
    max: Option<u32>,
}

#[derive(Deserialize)]
struct CreateBody {
    queue: String,
    partitions: Option<u32>,
    visibility_ms: Option<u64>,
    max_deliveries: Option<u32>,
    dedup_window_ms: Option<u64>,
    max_messages: Option<u64>,
    max_bytes: Option<u64>,
}

/// `POST /queue/limits`: the caps over all queues (a field left out keeps its value).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsBody {
    max_messages: Option<u64>,
    max_bytes: Option<u64>,
}

#[derive(Deserialize)]
pub(crate) struct QueueParam {
    queue: Option<String>,
    limit: Option<usize>,
}

fn queue_name(q: Option<String>) -> Result<String, ApiError> {
    let name = q.unwrap_or_else(|| DEFAULT_QUEUE.to_owned());
    if name.is_empty() || name.len() > MAX_KEY_BYTES {
        return Err(ApiError::bad_request(
            "invalid_queue",
            format!("queue names are 1..={MAX_KEY_BYTES} bytes"),
        ));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
    {
        return Err(ApiError::bad_request(
            "invalid_queue",
            "queue names use letters, digits and - _ . :",
        ));
    }
    Ok(name)
}

fn msg_id(t: &Token) -> Result<MsgId, ApiError> {
    t.text()
        .parse()
        .map_err(|e: String| ApiError::bad_request("invalid_msg_id", e))
}

fn receipt(t: &Token) -> Result<u64, ApiError> {
    t.text().parse().map_err(|_| {
        ApiError::bad_request(
            "invalid_receipt",
            "a receipt is the string a dequeue answered",
        )
    })
}

/// Propose an enqueue (of one message or of a group).
pub(crate) async fn propose_enqueue(
    state: &AppState,
    command: QueueCommand,
) -> Result<QueueReply, ApiError> {
    propose(state, command, CALL_SLACK).await
}

/// Propose a queue command; a dequeue that waits may be withdrawn when its caller goes
/// away, and is asked again for the time left if a node dropped it.
async fn propose(
    state: &AppState,
    command: QueueCommand,
    deadline: Duration,
) -> Result<QueueReply, ApiError> {
    let (waits, dequeues) = match &command {
        QueueCommand::Dequeue { wait_ms, .. } => (*wait_ms > 0, true),
        _ => (false, false),
    };
    let opts = CallOptions {
        deadline,
        prompt: !waits,
        // A dequeue whose caller went away gives its messages back at once instead of
        // leaving them leased to nobody for the whole visibility timeout.
        withdraw_if_abandoned: dequeues,
    };
    // What is left of the wait is counted from what was asked, once.
    let asked = match &command {
        QueueCommand::Dequeue { wait_ms, .. } => *wait_ms,
        _ => 0,
    };
    let started = Instant::now();
    let mut command = command;
    loop {
        let outcome = state.propose(Command::Queue(command.clone()), opts).await?;
        match outcome.reply {
            Reply::Queue(r) => return Ok(r),
            Reply::Withdrawn if started.elapsed() < deadline => {
                if let QueueCommand::Dequeue { wait_ms, .. } = &mut command {
                    *wait_ms = asked.saturating_sub(started.elapsed().as_millis() as u64);
                }
            }
            Reply::Withdrawn => {
                return Ok(QueueReply::Delivered {
                    messages: Vec::new(),
                })
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

/// The refusals every queue reply may be.
pub(crate) fn refusal(reply: QueueReply) -> ApiError {
    match reply {
        QueueReply::Invalid(why) => ApiError::bad_request("invalid_request", why),
        QueueReply::Full { code, message } => {
            let code = match code.as_str() {
                "too_many_queues" => "too_many_queues",
                "too_many_waiters" => "too_many_waiters",
                _ => "queue_full",
            };
            ApiError::too_many(code, message)
        }
        QueueReply::NotFound { id } => {
            ApiError::not_found(format!("message {id} is unknown or already acked"))
                .with("msg_id", json!(id.to_string()))
        }
        QueueReply::StaleReceipt { id, latest } => ApiError::conflict(
            "stale_receipt",
            format!("message {id} was delivered again after this receipt's delivery"),
        )
        .with("msg_id", json!(id.to_string()))
        .with("receipt", json!(latest.to_string())),
        QueueReply::NotLeased { id } => ApiError::conflict(
            "not_leased",
            format!(
                "message {id} is not delivered now (its lease ran out, or it was never delivered)"
            ),
        )
        .with("msg_id", json!(id.to_string())),
        other => ApiError::internal(format!("unexpected queue reply {other:?}")),
    }
}

/// A value's JSON text back as JSON (it was valid JSON when it was enqueued).
fn raw(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).unwrap_or(Value::Null)
}

fn delivery_json(d: &Delivery) -> Value {
    let field = match d.field {
        Field::Value => "value",
        Field::Body => "body",
    };
    json!({
        "msg_id": d.id.to_string(),
        "message_id": d.id.to_string(),
        "partition": d.id.partition,
        "payload": { "key": d.key, field: raw(&d.value) },
        "deliveries": d.deliveries,
        "receipt": d.receipt.to_string(),
    })
}

fn dead_json(d: &DeadView) -> Value {
    let field = match d.field {
        Field::Value => "value",
        Field::Body => "body",
    };
    json!({
        "msg_id": d.id.to_string(),
        "payload": { "key": d.key, field: raw(&d.value) },
        "deliveries": d.deliveries,
        "died_at_lock_ms": d.died_ms,
    })
}

fn new_message(m: EnqBody, dedup: Option<String>) -> Result<(String, NewMessage), ApiError> {
    let queue = queue_name(m.queue)?;
    let key = m
        .key
        .ok_or_else(|| ApiError::bad_request("invalid_key", "key is required"))?;
    if key.is_empty() || key.len() > MAX_KEY_BYTES {
        return Err(ApiError::bad_request(
            "invalid_key",
            format!("key must be 1..={MAX_KEY_BYTES} bytes"),
        ));
    }
    let (value, field) = match (m.value, m.body) {
        (Some(v), _) => (v, Field::Value),
        (None, Some(b)) => (b, Field::Body),
        (None, None) => {
            return Err(ApiError::bad_request(
                "invalid_value",
                "value (or body) is required: any JSON",
            ))
        }
    };
    let value = value.get().as_bytes().to_vec();
    if value.len() > MAX_VALUE_BYTES {
        return Err(ApiError::too_large(MAX_VALUE_BYTES).with(
            "why",
            json!(format!(
                "a value is at most {MAX_VALUE_BYTES} bytes of JSON"
            )),
        ));
    }
    let dedup_id = m.dedup_id.or(dedup);
    if dedup_id
        .as_ref()
        .is_some_and(|d| d.is_empty() || d.len() > MAX_KEY_BYTES)
    {
        return Err(ApiError::bad_request(
            "invalid_dedup_id",
            format!("dedup_id must be 1..={MAX_KEY_BYTES} bytes"),
        ));
    }
    Ok((
        queue,
        NewMessage {
            key,
            value,
            field,
            dedup_id,
        },
    ))
}

pub(crate) async fn enqueue(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let idempotency = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let bytes = state.read_body(body).await?;
    let batch = bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[');
    let parsed = if batch {
        serde_json::from_slice::<Vec<EnqBody>>(&bytes)
    } else {
        serde_json::from_slice::<EnqBody>(&bytes).map(|m| vec![m])
    };
    let items = parsed.map_err(|e| match e.classify() {
        serde_json::error::Category::Data => {
            ApiError::bad_request("invalid_request", e.to_string())
        }
        _ => ApiError::bad_request("malformed_json", e.to_string()),
    })?;
    if items.is_empty() || items.len() > MAX_BATCH {
        return Err(ApiError::bad_request(
            "invalid_batch",
            format!("a batch carries 1..={MAX_BATCH} messages"),
        ));
    }
    let mut queue = None;
    let mut messages = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        // One Idempotency-Key names a whole batch: message i gets "KEY/i".
        let dedup = idempotency
            .as_ref()
            .map(|k| if batch { format!("{k}/{i}") } else { k.clone() });
        let (q, m) = new_message(item, dedup)?;
        if queue.as_ref().is_some_and(|prev| *prev != q) {
            return Err(ApiError::bad_request(
                "invalid_batch",
                "every message of a batch goes to one queue",
            ));
        }
        queue = Some(q);
        messages.push(m);
    }
    let queue = queue.unwrap_or_else(|| DEFAULT_QUEUE.to_owned());
    if !batch {
        if let Some(message) = messages.pop() {
            let (id, duplicate) = EnqueueGroups::enqueue(&state, queue, message).await?;
            return Ok(Json(json!({
                "ok": true,
                "msg_id": id.to_string(),
                "message_id": id.to_string(),
                "partition": id.partition,
                "duplicate": duplicate,
            }))
            .into_response());
        }
    }
    match propose(
        &state,
        QueueCommand::Enqueue { queue, messages },
        CALL_SLACK,
    )
    .await?
    {
        QueueReply::Enqueued { ids } => Ok(Json(json!({
            "ok": true,
            "msg_ids": ids.iter().map(|(id, _)| id.to_string()).collect::<Vec<_>>(),
            "partitions": ids.iter().map(|(id, _)| id.partition).collect::<Vec<_>>(),
            "duplicates": ids.iter().map(|(_, d)| *d).collect::<Vec<_>>(),
        }))
        .into_response()),
        other => Err(refusal(other)),
    }
}

/// 409 for an ack of a message no consumer received: it stays queued.
fn not_delivered(id: MsgId) -> ApiError {
    ApiError::conflict(
        "not_delivered",
        format!("message {id} was never delivered; an ack is for a message a consumer received, so it stays queued"),
    )
    .with("msg_id", json!(id.to_string()))
}

pub(crate) async fn dequeue(
    State(state): State<Arc<AppState>>,
    body: Body,
) -> Result<Response, ApiError> {
    let bytes = state.read_body(body).await?;
    let req: DeqBody = if bytes.iter().all(u8::is_ascii_whitespace) {
        DeqBody::default()
    } else {
        serde_json::from_slice(&bytes).map_err(|e| match e.classify() {
            serde_json::error::Category::Data => {
                ApiError::bad_request("invalid_request", e.to_string())
            }
            _ => ApiError::bad_request("malformed_json", e.to_string()),
        })?
    };
    let queue = queue_name(req.queue)?;
    let wait_ms = req.wait_ms.unwrap_or(0);
    if wait_ms > MAX_WAIT_MS {
        return Err(ApiError::bad_request(
            "invalid_wait",
            format!("wait_ms is at most {MAX_WAIT_MS}"),
        ));
    }
    let batch = req.max.is_some();
    let max = req.max.unwrap_or(1);
    if max == 0 || max as usize > MAX_BATCH {
        return Err(ApiError::bad_request(
            "invalid_max",
            format!("max must be 1..={MAX_BATCH}"),
        ));
    }
    let cmd = QueueCommand::Dequeue {
        queue,
        key: req.key,
        max,
        visibility_ms: req.visibility_ms,
        wait_ms,
    };
    let deadline = Duration::from_millis(wait_ms) + CALL_SLACK;
    match propose(&state, cmd, deadline).await? {
        QueueReply::Delivered { messages } if batch => {
            let list: Vec<Value> = messages.iter().map(delivery_json).collect();
            Ok(Json(json!({"empty": list.is_empty(), "messages": list})).into_response())
        }
        QueueReply::Delivered { messages } => match messages.first() {
            Some(d) => Ok(Json(delivery_json(d)).into_response()),
            None => {
                Ok(Json(json!({"empty": true, "msg_id": null, "payload": null})).into_response())
            }
        },
        other => Err(refusal(other)),
    }
}

/// The message ids and receipts of an ack, nack or extend body.
fn targets(req: &AckBody) -> Result<Vec<(MsgId, Option<u64>)>, ApiError> {
    let single = req.msg_id.as_ref().or(req.message_id.as_ref());
    match (single, &req.msg_ids) {
        (Some(id), None) => Ok(vec![(
            msg_id(id)?,
            req.receipt.as_ref().map(receipt).transpose()?,
        )]),
        (None, Some(ids)) => {
            if ids.is_empty() || ids.len() > MAX_BATCH {
                return Err(ApiError::bad_request(
                    "invalid_batch",
                    format!("msg_ids names 1..={MAX_BATCH} messages"),
                ));
            }
            if req.receipts.as_ref().is_some_and(|r| r.len() != ids.len()) {
                return Err(ApiError::bad_request(
                    "invalid_request",
                    "receipts must have one entry per msg_ids entry",
                ));
            }
            ids.iter()
                .enumerate()
                .map(|(i, id)| {
                    let r = req
                        .receipts
                        .as_ref()
                        .and_then(|r| r.get(i))
                        .map(receipt)
                        .transpose()?;
                    Ok((msg_id(id)?, r))
                })
                .collect()
        }
        _ => Err(ApiError::bad_request(
            "invalid_msg_id",
            "name the message: msg_id (or message_id), or msg_ids",
        )),
    }
}

pub(crate) async fn ack(
    State(state): State<Arc<AppState>>,
    body: Body,
) -> Result<Response, ApiError> {
    let req: AckBody = state.json(body).await?;
    let ids = targets(&req)?;
    let single = req.msg_ids.is_none();
    let queue = queue_name(req.queue)?;
    match propose(&state, QueueCommand::Ack { queue, ids }, CALL_SLACK).await? {
        QueueReply::Acked {
            acked,
            missing,
            stale,
            undelivered,
        } => {
            let names = |v: &[MsgId]| json!(v.iter().map(ToString::to_string).collect::<Vec<_>>());
            if single {
                if let Some(id) = missing.first() {
                    return Err(refusal(QueueReply::NotFound { id: *id }));
                }
                if let Some(id) = stale.first() {
                    return Err(ApiError::conflict(
                        "stale_receipt",
                        format!("message {id} was delivered again after this receipt's delivery"),
                    )
                    .with("msg_id", json!(id.to_string())));
                }
                if let Some(id) = undelivered.first() {
                    return Err(not_delivered(*id));
                }
            } else if !missing.is_empty() || !stale.is_empty() || !undelivered.is_empty() {
                let e = if !missing.is_empty() {
                    ApiError::not_found("some messages are unknown or already acked")
                } else if !stale.is_empty() {
                    ApiError::conflict("stale_receipt", "some receipts are stale")
                } else {
                    ApiError::conflict(
                        "not_delivered",
                        "some messages were never delivered; an ack is for a message a consumer received",
                    )
                };
                return Err(e
                    .with("acked", json!(acked))
                    .with("missing", names(&missing))
                    .with("stale", names(&stale))
                    .with("undelivered", names(&undelivered)));
            }
            Ok(Json(json!({"ok": true, "acked": acked})).into_response())
        }
        other => Err(refusal(other)),
    }
}

async fn one_target(
    state: &AppState,
    body: Body,
) -> Result<(AckBody, MsgId, Option<u64>), ApiError> {
    let req: AckBody = state.json(body).await?;
    if req.msg_ids.is_some() {
        return Err(ApiError::bad_request(
            "invalid_msg_id",
            "name one message: msg_id",
        ));
    }
    let (id, receipt) = targets(&req)?[0];
    Ok((req, id, receipt))
}

pub(crate) async fn nack(
    State(state): State<Arc<AppState>>,
    body: Body,
) -> Result<Response, ApiError> {
    let (req, id, receipt) = one_target(&state, body).await?;
    let queue = queue_name(req.queue)?;
    match propose(
        &state,
        QueueCommand::Nack { queue, id, receipt },
        CALL_SLACK,
    )
    .await?
    {
        QueueReply::Done => Ok(Json(json!({"ok": true})).into_response()),
        other => Err(refusal(other)),
    }
}

pub(crate) async fn extend(
    State(state): State<Arc<AppState>>,
    body: Body,
) -> Result<Response, ApiError> {
    let (req, id, receipt) = one_target(&state, body).await?;
    let visibility_ms = req
        .visibility_ms
        .ok_or_else(|| ApiError::bad_request("invalid_visibility", "visibility_ms is required"))?;
    let queue = queue_name(req.queue)?;
    let cmd = QueueCommand::Extend {
        queue,
        id,
        receipt,
        visibility_ms,
    };
    match propose(&state, cmd, CALL_SLACK).await? {
        QueueReply::Done => {
            Ok(Json(json!({"ok": true, "visibility_ms": visibility_ms})).into_response())
        }
        other => Err(refusal(other)),
    }
}

/// The caps over all queues: set what the body names, answer what they are and hold.
pub(crate) async fn limits(
    State(state): State<Arc<AppState>>,
    body: Body,
) -> Result<Response, ApiError> {
    let req: LimitsBody = state.json(body).await?;
    let cmd = QueueCommand::Limits {
        max_messages: req.max_messages,
        max_bytes: req.max_bytes,
    };
    match propose(&state, cmd, CALL_SLACK).await? {
        QueueReply::Limits {
            max_messages,
            max_bytes,
            messages,
            bytes,
        } => Ok(Json(json!({
            "ok": true,
            "max_messages": max_messages,
            "max_bytes": max_bytes,
            "messages": messages,
            "bytes": bytes,
        }))
        .into_response()),
        other => Err(refusal(other)),
    }
}

pub(crate) async fn create(
    State(state): State<Arc<AppState>>,
    body: Body,
) -> Result<Response, ApiError> {
    let req: CreateBody = state.json(body).await?;
    let queue = queue_name(Some(req.queue))?;
    // What is not named keeps the queue's current setting (the default for a new queue).
    let d = match state
        .read(
            Query::QueueStats {
                queue: Some(queue.clone()),
            },
            CALL_SLACK,
        )
        .await?
    {
        QueryReply::QueueStats { queues, .. } => queues
            .first()
            .map_or_else(QueueSettings::default, |q| q.settings),
        _ => QueueSettings::default(),
    };
    let settings = QueueSettings {
        partitions: req.partitions.unwrap_or(0),
        visibility_ms: req.visibility_ms.unwrap_or(d.visibility_ms),
        max_deliveries: req.max_deliveries.unwrap_or(d.max_deliveries),
        dedup_window_ms: req.dedup_window_ms.unwrap_or(d.dedup_window_ms),
        max_messages: req.max_messages.unwrap_or(d.max_messages),
        max_bytes: req.max_bytes.unwrap_or(d.max_bytes),
    };
    match propose(
        &state,
        QueueCommand::Configure {
            queue: queue.clone(),
            settings,
        },
        CALL_SLACK,
    )
    .await?
    {
        QueueReply::Configured { settings } => Ok(Json(
            json!({"ok": true, "queue": queue, "settings": settings_json(&settings)}),
        )
        .into_response()),
        other => Err(refusal(other)),
    }
}

fn settings_json(s: &QueueSettings) -> Value {
    json!({
        "partitions": s.partitions,
        "visibility_ms": s.visibility_ms,
        "max_deliveries": s.max_deliveries,
        "dedup_window_ms": s.dedup_window_ms,
        "max_messages": s.max_messages,
        "max_bytes": s.max_bytes,
    })
}

pub(crate) async fn stats(
    State(state): State<Arc<AppState>>,
    p: Result<UrlQuery<QueueParam>, QueryRejection>,
) -> Result<Response, ApiError> {
    let UrlQuery(p) = p?;
    let queue = p.queue.map(|q| queue_name(Some(q))).transpose()?;
    let asked = queue.clone().unwrap_or_else(|| DEFAULT_QUEUE.to_owned());
    // The ring is of the queue asked for (the default queue when none is named).
    let ring_reply = state
        .read(
            Query::QueueStats {
                queue: Some(asked.clone()),
            },
            CALL_SLACK,
        )
        .await?;
    let reply = match queue {
        Some(_) => ring_reply.clone(),
        None => {
            state
                .read(Query::QueueStats { queue: None }, CALL_SLACK)
                .await?
        }
    };
    let (QueryReply::QueueStats { queues, .. }, QueryReply::QueueStats { ring, .. }) =
        (reply, ring_reply)
    else {
        return Err(ApiError::internal("unexpected stats reply"));
    };
    let list: Vec<Value> = queues
        .iter()
        .map(|q| {
            let depth: u64 = q.partitions.iter().map(|p| p.depth).sum();
            let inflight: u64 = q.partitions.iter().map(|p| p.inflight).sum();
            json!({
                "queue": q.name,
                "settings": settings_json(&q.settings),
                "depth": depth,
                "inflight": inflight,
                "dead_letters": q.dead,
                "waiters": q.waiters,
                "vnodes_per_partition": q.vnodes,
                "partitions": q.partitions.iter().map(|p| json!({
                    "partition": p.partition,
                    "depth": p.depth,
                    "inflight": p.inflight,
                    "oldest_age_ms": p.oldest_age_ms,
                    "ring_share": p.ring_share_ppm as f64 / 1e6,
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    Ok(Json(json!({
        "queues": list,
        "ring": {
            "queue": asked,
            "points": ring.iter().map(|(point, p)| json!([point.to_string(), p])).collect::<Vec<_>>(),
        },
    }))
    .into_response())
}

pub(crate) async fn dead(
    State(state): State<Arc<AppState>>,
    p: Result<UrlQuery<QueueParam>, QueryRejection>,
) -> Result<Response, ApiError> {
    let UrlQuery(p) = p?;
    let queue = queue_name(p.queue)?;
    let limit = p.limit.unwrap_or(100).min(1_000);
    match state
        .read(
            Query::QueueDead {
                queue: queue.clone(),
                limit,
            },
            CALL_SLACK,
        )
        .await?
    {
        QueryReply::QueueDead(list) => Ok(Json(json!({
            "queue": queue,
            "dead": list.iter().map(dead_json).collect::<Vec<_>>(),
        }))
        .into_response()),
        _ => Err(ApiError::internal("unexpected dead-letter reply")),
    }
}

pub(crate) async fn requeue(
    State(state): State<Arc<AppState>>,
    body: Body,
) -> Result<Response, ApiError> {
    let bytes = state.read_body(body).await?;
    let req: RequeueBody = if bytes.iter().all(u8::is_ascii_whitespace) {
        RequeueBody::default()
    } else {
        serde_json::from_slice(&bytes)
            .map_err(|e| ApiError::bad_request("invalid_request", e.to_string()))?
    };
    let queue = queue_name(req.queue)?;
    let ids = req
        .msg_ids
        .unwrap_or_default()
        .iter()
        .map(msg_id)
        .collect::<Result<Vec<_>, _>>()?;
    if ids.len() > MAX_BATCH {
        return Err(ApiError::bad_request(
            "invalid_batch",
            format!("msg_ids names at most {MAX_BATCH} messages"),
        ));
    }
    let max = req.max.unwrap_or(MAX_BATCH as u32).min(MAX_BATCH as u32);
    match propose(
        &state,
        QueueCommand::Requeue { queue, ids, max },
        CALL_SLACK,
    )
    .await?
    {
        QueueReply::Requeued { count } => {
            Ok(Json(json!({"ok": true, "requeued": count})).into_response())
        }
        other => Err(refusal(other)),
    }
}
