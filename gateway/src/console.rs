//! The console's side of the gateway: its files at `/` (built by `build.rs` and
//! embedded in the binary), `GET /api/cluster` (one [`ClusterView`]) and
//! `GET /api/events` (Server-Sent Events: a `state` event with a fresh view every
//! [`FEED_EVERY`]).
//!
//! One poller per gateway builds the views, only while someone follows the feed, and
//! hands them to every follower through a `watch` channel: a hundred open consoles cost
//! one set of reads, and a slow browser only ever misses views, never queues them.

use crate::{cache, AppState};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use mesh_core::raft::NodeId;
use mesh_core::services::cache::{CacheAnswer, CacheCall, Mesi};
use mesh_core::services::envelope::{Query, QueryReply};
use mesh_core::services::lock::Mode;
use mesh_core::wire::{node_name, ClientResponse};
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;
use web::model::{
    CacheNode, ClusterView, DeadlockRow, LockHolder, LockRow, LockWaiter, LocksPart, NodeCard,
    PartitionRow, QueueRow, ServiceRate,
};

/// How often the feed sends a view.
pub(crate) const FEED_EVERY: Duration = Duration::from_millis(500);
/// Most lock keys and cache lines per node in a view.
const VIEW_LIMIT: usize = 200;
/// How long one view may take to read before its parts are reported missing.
const READ_DEADLINE: Duration = Duration::from_secs(2);

/// The feed shared by every follower.
pub(crate) struct ConsoleFeed {
    views: watch::Sender<Option<Arc<str>>>,
    polling: AtomicBool,
    traffic: Mutex<Traffic>,
    last_seen: Mutex<BTreeMap<NodeId, u64>>,
}

impl ConsoleFeed {
    pub(crate) fn new() -> Self {
        Self {
            views: watch::Sender::new(None),
            polling: AtomicBool::new(false),
            traffic: Mutex::new(Traffic::default()),
            last_seen: Mutex::new(BTreeMap::new()),
        }
    }
}

// The files. `build.rs` leaves them in OUT_DIR.
#[cfg(not(console_skipped))]
mod files {
    pub(super) const INDEX: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/console/index.html"));
    pub(super) const JS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/console/web.js"));
    pub(super) const WASM: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/console/web_bg.wasm"));
}

fn asset(body: &'static [u8], content_type: &'static str) -> Response {
    if body.is_empty() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "this binary was built without the console (SYNCMESH_SKIP_CONSOLE)",
        )
            .into_response();
    }
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

#[cfg(not(console_skipped))]
const FILES: [&[u8]; 3] = [files::INDEX, files::JS, files::WASM];
#[cfg(console_skipped)]
const FILES: [&[u8]; 3] = [b"", b"", b""];

/// `GET /`.
pub(crate) async fn index() -> Response {
    asset(FILES[0], "text/html; charset=utf-8")
}

/// `GET /web.js`.
pub(crate) async fn script() -> Response {
    asset(FILES[1], "text/javascript")
}

/// `GET /web_bg.wasm`.
pub(crate) async fn wasm() -> Response {
    asset(FILES[2], "application/wasm")
}

/// `GET /api/cluster`: a view read now.
pub(crate) async fn cluster(State(state): State<Arc<AppState>>) -> Response {
    let view = read_view(&state, false).await;
    axum::Json(view).into_response()
}

/// `GET /api/events`: the current view at once, then every new one.
pub(crate) async fn events(
    State(state): State<Arc<AppState>>,
) -> Sse<impl futures_util::Stream<Item = Result<Event, Infallible>>> {
    let mut rx = state.console.views.subscribe();
    rx.mark_changed();
    start_polling(&state);
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.changed().await.ok()?;
        let text = rx.borrow_and_update().clone();
        let event = match text {
            Some(text) => Event::default().event("state").data(&*text),
            None => Event::default().comment("waiting for the first view"),
        };
        Some((Ok(event), rx))
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

/// Start the poller unless it runs; it stops once nobody follows.
fn start_polling(state: &Arc<AppState>) {
    if state.console.polling.swap(true, Ordering::AcqRel) {
        return;
    }
    let state = state.clone();
    tokio::spawn(async move {
        loop {
            let started = Instant::now();
            let view = read_view(&state, true).await;
            if let Ok(text) = serde_json::to_string(&view) {
                state.console.views.send_replace(Some(text.into()));
            }
            if state.console.views.receiver_count() == 0 {
                state.console.polling.store(false, Ordering::Release);
                // A follower that came in just now started no poller (this one still
                // ran): carry on for it.
                if state.console.views.receiver_count() == 0
                    || state.console.polling.swap(true, Ordering::AcqRel)
                {
                    return;
                }
            }
            tokio::time::sleep(FEED_EVERY.saturating_sub(started.elapsed())).await;
        }
    });
}

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn mode_letter(mode: Mode) -> String {
    match mode {
        Mode::X => "X",
        Mode::S => "S",
    }
    .to_owned()
}

/// Read everything the console shows, all parts at once. A part that fails is `None`
/// (the console keeps the last one read) and named in `problems`. `rates`: also measure the traffic since the last
/// view (only the poller does, so two readers do not split one interval).
async fn read_view(state: &Arc<AppState>, rates: bool) -> ClusterView {
    let nodes = state.caller.cluster().mesh().nodes();
    let statuses = futures_util::future::join_all(nodes.iter().map(|n| {
        let cluster = state.caller.cluster();
        async move { tokio::time::timeout(READ_DEADLINE, cluster.status_of(*n)).await }
    }));
    let locks = state.read(Query::LockListAt { limit: VIEW_LIMIT }, READ_DEADLINE);
    let queues = state.read(Query::QueueStats { queue: None }, READ_DEADLINE);
    let cache_stats = cache::ask_every_node(state, &nodes, &CacheCall::Stats);
    let cache_lines = cache::ask_every_node(state, &nodes, &CacheCall::Lines { limit: VIEW_LIMIT });
    let (statuses, locks, queues, cache_stats, cache_lines) =
        tokio::join!(statuses, locks, queues, cache_stats, cache_lines);

    let at_ms = wall_ms();
    let mut view = ClusterView {
        at_ms,
        faults: state.faults.is_some(),
        ..ClusterView::default()
    };
    let mut seen = state
        .console
        .last_seen
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    for (node, status) in nodes.iter().zip(statuses) {
        let id = node_name(*node);
        let card = match status {
            Ok(Ok(ClientResponse::Status(s))) => {
                seen.insert(*node, at_ms);
                NodeCard {
                    id,
                    up: true,
                    role: match s.role {
                        2 => "leader",
                        1 => "candidate",
                        _ => "follower",
                    }
                    .to_owned(),
                    term: s.term,
                    leader: s.leader.map(node_name),
                    commit: s.commit,
                    applied: s.applied,
                    last_seen_ms: at_ms,
                }
            }
            _ => NodeCard {
                id,
                last_seen_ms: seen.get(node).copied().unwrap_or(0),
                ..NodeCard::default()
            },
        };
        view.nodes.push(card);
    }
    drop(seen);

    match locks {
        Ok(QueryReply::LockListAt {
            now_ms,
            deadlocks,
            recent_deadlocks,
            keys,
        }) => {
            let recent_deadlocks = recent_deadlocks
                .into_iter()
                .map(|d| DeadlockRow {
                    ago_ms: now_ms.saturating_sub(d.at_ms),
                    key: d.key,
                    cycle: d.cycle,
                })
                .collect();
            let keys = keys
                .into_iter()
                .map(|k| LockRow {
                    key: k.key,
                    mode: k.mode.map(mode_letter),
                    holders: k
                        .holders
                        .into_iter()
                        .map(|h| LockHolder {
                            client_id: h.client,
                            mode: mode_letter(h.mode),
                            token: h.token,
                            lease_left_ms: h.expires_ms.saturating_sub(now_ms),
                        })
                        .collect(),
                    waiters: k
                        .waiters
                        .into_iter()
                        .map(|w| LockWaiter {
                            client_id: w.client,
                            mode: mode_letter(w.mode),
                        })
                        .collect(),
                })
                .collect();
            view.locks = Some(LocksPart {
                keys,
                deadlocks,
                recent_deadlocks,
            });
        }
        Ok(other) => view
            .problems
            .push(format!("locks: unexpected reply {other:?}")),
        Err(e) => view.problems.push(format!("locks: {}", e.message)),
    }

    match queues {
        Ok(QueryReply::QueueStats { queues, .. }) => {
            let queues = queues
                .into_iter()
                .map(|q| QueueRow {
                    depth: q.partitions.iter().map(|p| p.depth).sum(),
                    inflight: q.partitions.iter().map(|p| p.inflight).sum(),
                    dead_letters: q.dead,
                    partitions: q
                        .partitions
                        .iter()
                        .map(|p| PartitionRow {
                            partition: p.partition,
                            depth: p.depth,
                            inflight: p.inflight,
                            ring_share: p.ring_share_ppm as f64 / 1e6,
                        })
                        .collect(),
                    queue: q.name,
                })
                .collect();
            view.queues = Some(queues);
        }
        Ok(other) => view
            .problems
            .push(format!("queues: unexpected reply {other:?}")),
        Err(e) => view.problems.push(format!("queues: {}", e.message)),
    }

    for ((node, stats), lines) in nodes.iter().zip(cache_stats).zip(cache_lines) {
        let mut entry = CacheNode {
            node: node_name(*node),
            ..CacheNode::default()
        };
        if let Ok(CacheAnswer::Stats(s)) = stats {
            entry.up = true;
            entry.hits = s.hits;
            entry.misses = s.misses;
            entry.invalidations = s.invalidations;
            entry.writebacks = s.writebacks;
            entry.evictions = s.evictions;
        }
        if let Ok(CacheAnswer::Lines(lines)) = lines {
            entry.lines = Some(
                lines
                    .into_iter()
                    .map(|(k, s)| (k, letter(s).to_owned()))
                    .collect(),
            );
        }
        view.cache.push(entry);
    }

    if rates {
        let mut traffic = state
            .console
            .traffic
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        view.rates = traffic.measure(&state.http_duration, Instant::now());
    }
    view
}

fn letter(state: Mesi) -> &'static str {
    state.letter()
}

/// Per service: total calls and cumulative bucket counts (upper bound, count).
type Totals = BTreeMap<&'static str, (u64, Vec<(f64, u64)>)>;

/// Calls and latency per service through this gateway, from the HTTP histogram: each
/// view takes the difference from the last one.
#[derive(Default)]
struct Traffic {
    last: Option<(Instant, Totals)>,
}

impl Traffic {
    fn measure(&mut self, hist: &prometheus::HistogramVec, now: Instant) -> Vec<ServiceRate> {
        let totals = totals(hist);
        let out = match &self.last {
            Some((then, before)) => {
                let secs = now.duration_since(*then).as_secs_f64().max(1e-3);
                totals
                    .iter()
                    .map(|(service, (count, buckets))| {
                        let (count0, buckets0) =
                            before.get(service).cloned().unwrap_or((0, Vec::new()));
                        let calls = count.saturating_sub(count0);
                        let p99 = quantile(buckets, &buckets0, calls, 0.99);
                        ServiceRate {
                            service: (*service).to_owned(),
                            ops_per_s: calls as f64 / secs,
                            p99_ms: p99 * 1000.0,
                        }
                    })
                    .collect()
            }
            None => Vec::new(),
        };
        self.last = Some((now, totals));
        out
    }
}

/// Per service: total calls and cumulative bucket counts (upper bound, count).
fn totals(hist: &prometheus::HistogramVec) -> Totals {
    use prometheus::core::Collector;
    let mut out: Totals = ["lock", "queue", "cache"]
        .into_iter()
        .map(|s| (s, (0, Vec::new())))
        .collect();
    for family in hist.collect() {
        for metric in family.get_metric() {
            let route = metric
                .get_label()
                .iter()
                .find(|l| l.name() == "route")
                .map(|l| l.value().to_owned())
                .unwrap_or_default();
            let service = if route.starts_with("/lock/") {
                "lock"
            } else if route.starts_with("/queue/") {
                "queue"
            } else if route.starts_with("/cache") {
                "cache"
            } else {
                continue;
            };
            let h = metric.get_histogram();
            let entry = out.entry(service).or_default();
            entry.0 += h.get_sample_count();
            let buckets = h.get_bucket();
            if entry.1.is_empty() {
                entry.1 = buckets.iter().map(|b| (b.upper_bound(), 0)).collect();
            }
            for (slot, b) in entry.1.iter_mut().zip(buckets) {
                slot.1 += b.cumulative_count();
            }
        }
    }
    out
}

/// The upper bound of the bucket that holds quantile `q` of the calls between two
/// cumulative readings (seconds; 0 with no calls).
fn quantile(now: &[(f64, u64)], before: &[(f64, u64)], calls: u64, q: f64) -> f64 {
    if calls == 0 {
        return 0.0;
    }
    let want = (calls as f64 * q).ceil() as u64;
    for (i, (bound, count)) in now.iter().enumerate() {
        let earlier = before.get(i).map_or(0, |b| b.1);
        if count.saturating_sub(earlier) >= want {
            return *bound;
        }
    }
    now.last().map_or(0.0, |b| b.0)
}

#[cfg(test)]
mod tests {
    use super::quantile;

    #[test]
    fn the_quantile_is_the_bucket_of_the_calls_since_the_last_reading() {
        let before = [(0.001, 90), (0.01, 100), (0.1, 100)];
        // 100 new calls: 1 at <= 1 ms, 98 more at <= 10 ms, 1 at <= 100 ms.
        let now = [(0.001, 91), (0.01, 199), (0.1, 200)];
        assert_eq!(quantile(&now, &before, 100, 0.99), 0.01);
        assert_eq!(quantile(&now, &before, 100, 1.0), 0.1);
        assert_eq!(quantile(&now, &before, 0, 0.99), 0.0);
    }
}
