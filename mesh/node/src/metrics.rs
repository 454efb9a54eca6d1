//! Prometheus metrics of one node (DESIGN.md section 7), in a registry of its own so that
//! several nodes can live in one test process.

use mesh_core::node::Gauge;
use prometheus::{
    exponential_buckets, Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter,
    IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// Every series a node exports.
#[derive(Clone)]
pub struct NodeMetrics {
    registry: Registry,
    /// Round trip of Raft RPCs by `op`: request_vote, append_entries, install_snapshot; and
    /// of client proposals (`propose`).
    pub rpc_latency: HistogramVec,
    /// Current term.
    pub raft_term: IntGauge,
    /// 0 follower, 1 candidate, 2 leader.
    pub raft_role: IntGauge,
    /// Commit index.
    pub raft_commit_index: IntGauge,
    /// Applied index.
    pub raft_applied_index: IntGauge,
    /// Times this node saw the leader change.
    pub raft_leader_changes: IntCounter,
    /// Duration of each durable write (write + fdatasync).
    pub storage_fsync: Histogram,
    /// Frames refused by `reason`.
    pub frames_rejected: IntCounterVec,
    /// Connections refused by `reason` (TLS failures, identity mismatches).
    pub connections_refused: IntCounterVec,
    /// Raft messages dropped because a peer's queue was full or it was unreachable.
    pub messages_dropped: IntCounter,
    /// Node-to-node messages handed to the transport, by kind.
    pub messages_sent: IntCounterVec,
    /// The services' own series (locks held, waiters, ...), registered when first
    /// reported.
    services: Arc<Mutex<BTreeMap<&'static str, ServiceMetric>>>,
}

#[derive(Clone)]
enum ServiceMetric {
    Gauge(GaugeVec),
    Counter(IntCounterVec),
}

impl NodeMetrics {
    /// Metrics for node `id`, all labelled `node="<id>"`.
    pub fn new(node: &str) -> Result<Self, prometheus::Error> {
        let labels = std::iter::once(("node".to_string(), node.to_string())).collect();
        let registry = Registry::new_custom(None, Some(labels))?;
        let fast = exponential_buckets(0.000_05, 2.0, 18)?;
        let m = Self {
            rpc_latency: HistogramVec::new(
                HistogramOpts::new("rpc_latency_seconds", "Round trip of mesh RPCs")
                    .buckets(fast.clone()),
                &["op"],
            )?,
            raft_term: IntGauge::new("raft_term", "Current Raft term")?,
            raft_role: IntGauge::new("raft_role", "Raft role: 0 follower, 1 candidate, 2 leader")?,
            raft_commit_index: IntGauge::new("raft_commit_index", "Raft commit index")?,
            raft_applied_index: IntGauge::new("raft_applied_index", "Raft applied index")?,
            raft_leader_changes: IntCounter::new(
                "raft_leader_changes_total",
                "Leader changes seen",
            )?,
            storage_fsync: Histogram::with_opts(
                HistogramOpts::new(
                    "storage_fsync_seconds",
                    "Durable write of one Ready (write + fdatasync)",
                )
                .buckets(fast),
            )?,
            frames_rejected: IntCounterVec::new(
                Opts::new(
                    "mesh_frames_rejected_total",
                    "Malformed or oversized frames refused",
                ),
                &["reason"],
            )?,
            connections_refused: IntCounterVec::new(
                Opts::new("mesh_connections_refused_total", "Connections refused"),
                &["reason"],
            )?,
            messages_dropped: IntCounter::new(
                "mesh_messages_dropped_total",
                "Raft messages dropped (peer queue full or unreachable)",
            )?,
            messages_sent: IntCounterVec::new(
                Opts::new(
                    "mesh_messages_sent_total",
                    "Node-to-node messages sent, by kind",
                ),
                &["kind"],
            )?,
            services: Arc::new(Mutex::new(BTreeMap::new())),
            registry,
        };
        m.registry.register(Box::new(m.rpc_latency.clone()))?;
        m.registry.register(Box::new(m.raft_term.clone()))?;
        m.registry.register(Box::new(m.raft_role.clone()))?;
        m.registry.register(Box::new(m.raft_commit_index.clone()))?;
        m.registry
            .register(Box::new(m.raft_applied_index.clone()))?;
        m.registry
            .register(Box::new(m.raft_leader_changes.clone()))?;
        m.registry.register(Box::new(m.storage_fsync.clone()))?;
        m.registry.register(Box::new(m.frames_rejected.clone()))?;
        m.registry.register(Box::new(m.messages_sent.clone()))?;
        m.registry
            .register(Box::new(m.connections_refused.clone()))?;
        m.registry.register(Box::new(m.messages_dropped.clone()))?;
        Ok(m)
    }

    /// Report the services' gauges and counters (whatever services there are: the
    /// node core lists them, the shell does not know them).
    pub fn set_services(&self, samples: &[Gauge]) {
        let mut known = self.services.lock().unwrap_or_else(|p| p.into_inner());
        for g in samples {
            let metric = match known.get(g.name) {
                Some(m) => m.clone(),
                None => {
                    let labels: Vec<&str> = g.labels.iter().map(|(k, _)| *k).collect();
                    let opts = Opts::new(g.name, g.help);
                    let m = if g.counter {
                        IntCounterVec::new(opts, &labels).map(ServiceMetric::Counter)
                    } else {
                        GaugeVec::new(opts, &labels).map(ServiceMetric::Gauge)
                    };
                    let Ok(m) = m else { continue };
                    let registered = match &m {
                        ServiceMetric::Gauge(v) => self.registry.register(Box::new(v.clone())),
                        ServiceMetric::Counter(v) => self.registry.register(Box::new(v.clone())),
                    };
                    if registered.is_err() {
                        continue;
                    }
                    known.insert(g.name, m.clone());
                    m
                }
            };
            let values: Vec<&str> = g.labels.iter().map(|(_, v)| v.as_str()).collect();
            match metric {
                ServiceMetric::Gauge(v) => {
                    if let Ok(x) = v.get_metric_with_label_values(&values) {
                        x.set(g.value);
                    }
                }
                ServiceMetric::Counter(v) => {
                    if let Ok(x) = v.get_metric_with_label_values(&values) {
                        let target = g.value as u64;
                        if target > x.get() {
                            x.inc_by(target - x.get());
                        }
                    }
                }
            }
        }
    }

    pub fn reject_frame(&self, reason: &str) {
        if let Ok(c) = self.frames_rejected.get_metric_with_label_values(&[reason]) {
            c.inc();
        }
    }

    /// Count a refused connection.
    pub fn refuse_connection(&self, reason: &str) {
        if let Ok(c) = self
            .connections_refused
            .get_metric_with_label_values(&[reason])
        {
            c.inc();
        }
    }

    /// Observe an RPC round trip.
    pub fn observe_rpc(&self, op: &str, seconds: f64) {
        if let Ok(h) = self.rpc_latency.get_metric_with_label_values(&[op]) {
            h.observe(seconds);
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        if TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .is_err()
        {
            return String::new();
        }
        String::from_utf8(out).unwrap_or_default()
    }
}
