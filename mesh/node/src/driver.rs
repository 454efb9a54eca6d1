//! The node driver: one tokio task that feeds the node core and executes its actions.
//!
//! ```text
//!  select! { wake-up | raft inbox | client inbox | persist done | snapshot encoded/decoded | shutdown }
//!    └─> node core (mesh-core `node`) ──actions──> Persist  -> storage thread (write + fdatasync)
//!                                                  Send     -> transport
//!                                                  Reply    -> the caller's oneshot
//!                                                  Snapshot -> encode on a blocking thread
//!                                                  Restore  -> decode on a blocking thread
//!                                                  Compact  -> snapshot writer, then
//!                                                              purge on the storage thread
//!                                                  WakeAt   -> the next sleep
//! ```
//! Everything a node decides happens in the node core; this loop only moves bytes and
//! names no service. While the storage thread writes one persist, inputs keep flowing
//! into the core, and the next persist takes all of them: that is the group commit.

use crate::admin::Health;
use crate::metrics::NodeMetrics;
use crate::storage::{FileLog, LogStore, SnapshotFiles, StorageError};
use crate::transport::{ClientCall, Transport};
use mesh_core::node::{
    Action, CallId, Node, NodeEvent, Persist, RestoreJob, Restored, SnapshotView, Time,
};
use mesh_core::raft::{LogIndex, Message, MessageBody, NodeId, Role, Snapshot};
use mesh_core::wire::{node_name, ClientResponse};
use std::collections::BTreeMap;
use std::future::Future;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};

/// Inputs handled per wake-up before executing actions.
const INPUT_BATCH: usize = 1024;
/// How often calls whose caller went away are looked for.
const CANCEL_SWEEP: Duration = Duration::from_millis(50);
/// How long a stopping node waits for what only it holds to reach the quorum.
const DRAIN_LIMIT: Duration = Duration::from_secs(2);

/// A failure that stops the node.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// Storage failed (fatal: the node must restart and recover from disk).
    #[error("storage: {0}")]
    Storage(#[from] StorageError),
    /// The storage thread is gone.
    #[error("storage thread stopped")]
    StorageGone,
    /// The node core cannot go on (e.g. a snapshot from the leader that does not decode).
    #[error("{0}")]
    Fatal(String),
}

/// Driver construction parameters.
pub struct DriverParts {
    /// The node core, restored from storage.
    pub node: Node,
    /// The log it was restored from.
    pub log: FileLog,
    /// The started transport.
    pub transport: Transport,
    /// Metrics.
    pub metrics: NodeMetrics,
    /// Where `/health` reads from.
    pub health: watch::Sender<Health>,
}

/// What the storage thread is asked to do, in order.
enum StorageOp {
    Persist(Persist),
    /// The snapshot file at this index is durable: drop what it covers.
    Purge(LogIndex),
}

/// What the storage thread reports.
enum StorageDone {
    Persisted(u64),
    Failed(StorageError),
}

/// Monotonic and wall time for the core.
#[derive(Clone, Copy)]
struct Clock {
    start: Instant,
}

impl Clock {
    fn now(&self) -> Time {
        let wall_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        Time {
            mono_ms: self.start.elapsed().as_millis() as u64,
            wall_ms,
        }
    }

    fn instant(&self, mono_ms: u64) -> tokio::time::Instant {
        tokio::time::Instant::from_std(self.start + Duration::from_millis(mono_ms))
    }
}

/// The driver's state.
pub struct Driver {
    node: Node,
    storage_tx: std::sync::mpsc::Sender<StorageOp>,
    /// Local snapshots to write (then purge through the storage thread).
    snapshot_writer: std::sync::mpsc::Sender<Snapshot>,
    storage_rx: mpsc::UnboundedReceiver<StorageDone>,
    snapshot_tx: mpsc::UnboundedSender<(u64, Vec<u8>)>,
    snapshot_rx: mpsc::UnboundedReceiver<(u64, Vec<u8>)>,
    restored_tx: mpsc::UnboundedSender<Restored>,
    restored_rx: mpsc::UnboundedReceiver<Restored>,
    transport: Transport,
    metrics: NodeMetrics,
    health: watch::Sender<Health>,
    clock: Clock,
    wake: tokio::time::Instant,
    calls: BTreeMap<CallId, oneshot::Sender<ClientResponse>>,
    next_call: CallId,
    rpc_sent: BTreeMap<(NodeId, &'static str), Instant>,
}

fn rpc_op(body: &MessageBody) -> Option<(&'static str, bool)> {
    match body {
        MessageBody::RequestVote {
            pre_vote: false, ..
        } => Some(("request_vote", true)),
        MessageBody::RequestVoteResp {
            pre_vote: false, ..
        } => Some(("request_vote", false)),
        MessageBody::AppendEntries { .. } => Some(("append_entries", true)),
        MessageBody::AppendEntriesResp { .. } => Some(("append_entries", false)),
        MessageBody::InstallSnapshot { .. } => Some(("install_snapshot", true)),
        MessageBody::InstallSnapshotResp { .. } => Some(("install_snapshot", false)),
        _ => None,
    }
}

/// The storage thread: executes persists and compactions strictly in order.
fn storage_thread(
    mut log: FileLog,
    ops: std::sync::mpsc::Receiver<StorageOp>,
    done: mpsc::UnboundedSender<StorageDone>,
    metrics: NodeMetrics,
) {
    while let Ok(op) = ops.recv() {
        let result = match op {
            StorageOp::Persist(p) => {
                let started = Instant::now();
                let r = log.persist(p.snapshot.as_ref(), &p.entries, p.hard_state);
                metrics
                    .storage_fsync
                    .observe(started.elapsed().as_secs_f64());
                r.map(|()| Some(p.token))
            }
            StorageOp::Purge(index) => log.purge_covered(index).map(|()| None),
        };
        let report = match result {
            Ok(Some(token)) => StorageDone::Persisted(token),
            Ok(None) => continue,
            Err(e) => StorageDone::Failed(e),
        };
        let failed = matches!(report, StorageDone::Failed(_));
        if done.send(report).is_err() || failed {
            return;
        }
    }
}

/// The snapshot writer: writes local snapshots in order, each durable before the storage
/// thread drops the log it covers. Log persists go on meanwhile: a big snapshot takes a
/// second or more to write, and a leader whose persists waited behind it sent no
/// heartbeats for that long (an election at every snapshot of a million messages).
fn snapshot_writer_thread(
    files: &SnapshotFiles,
    snapshots: &std::sync::mpsc::Receiver<Snapshot>,
    purges: &std::sync::mpsc::Sender<StorageOp>,
    failures: &mpsc::UnboundedSender<StorageDone>,
) {
    while let Ok(mut s) = snapshots.recv() {
        // Snapshots taken while the last one was written: the newest covers them all.
        while let Ok(newer) = snapshots.try_recv() {
            s = newer;
        }
        let started = Instant::now();
        if let Err(e) = files.write(&s) {
            let _ = failures.send(StorageDone::Failed(e));
            return;
        }
        tracing::debug!(
            index = s.meta.index,
            ms = started.elapsed().as_millis() as u64,
            "snapshot written"
        );
        if purges.send(StorageOp::Purge(s.meta.index)).is_err() {
            return;
        }
    }
}

impl Driver {
    /// A driver over restored parts; starts the storage thread and the snapshot writer.
    pub fn new(p: DriverParts, clock_start: Instant) -> Self {
        let (storage_tx, ops) = std::sync::mpsc::channel();
        let (done_tx, storage_rx) = mpsc::unbounded_channel();
        let metrics = p.metrics.clone();
        let log = p.log;
        let files = log.snapshot_files();
        let (snapshot_writer, snapshots) = std::sync::mpsc::channel();
        let (purges, failures) = (storage_tx.clone(), done_tx.clone());
        std::thread::Builder::new()
            .name("storage".into())
            .spawn(move || storage_thread(log, ops, done_tx, metrics))
            .map_err(|e| tracing::error!("cannot start the storage thread: {e}"))
            .ok();
        std::thread::Builder::new()
            .name("snapshot-writer".into())
            .spawn(move || snapshot_writer_thread(&files, &snapshots, &purges, &failures))
            .map_err(|e| tracing::error!("cannot start the snapshot writer: {e}"))
            .ok();
        let (snapshot_tx, snapshot_rx) = mpsc::unbounded_channel();
        let (restored_tx, restored_rx) = mpsc::unbounded_channel();
        let clock = Clock { start: clock_start };
        Self {
            node: p.node,
            storage_tx,
            snapshot_writer,
            storage_rx,
            snapshot_tx,
            snapshot_rx,
            restored_tx,
            restored_rx,
            transport: p.transport,
            metrics: p.metrics,
            health: p.health,
            wake: clock.instant(0),
            clock,
            calls: BTreeMap::new(),
            next_call: 0,
            rpc_sent: BTreeMap::new(),
        }
    }

    /// Run until `shutdown` resolves; a leader then hands over leadership first.
    pub async fn run(
        mut self,
        mut raft_rx: mpsc::Receiver<Message>,
        mut client_rx: mpsc::Receiver<ClientCall>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), DriverError> {
        tokio::pin!(shutdown);
        // Stopping: since when, and whether leadership has been handed over yet (first
        // the node drains what only it holds, such as unwritten cache lines).
        let mut stopping: Option<(Instant, bool)> = None;
        let mut sweep = tokio::time::interval(CANCEL_SWEEP);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let now = self.clock.now();
        self.node.tick(now);
        self.execute()?;
        loop {
            tokio::select! {
                () = &mut shutdown, if stopping.is_none() => {
                    stopping = Some((Instant::now(), false));
                    let now = self.clock.now();
                    self.node.begin_stop(now);
                    tracing::info!("shutting down: draining");
                }
                () = tokio::time::sleep_until(self.wake) => {
                    let now = self.clock.now();
                    self.node.tick(now);
                }
                _ = sweep.tick() => {
                    self.sweep_cancelled();
                    // Health and gauges every 50 ms, not on every message.
                    self.publish();
                    self.metrics.set_services(&self.node.gauges());
                }
                Some(m) = raft_rx.recv() => {
                    self.node.begin_batch();
                    self.on_message(m);
                    for _ in 0..INPUT_BATCH {
                        let Ok(m) = raft_rx.try_recv() else { break };
                        self.on_message(m);
                    }
                    for _ in 0..INPUT_BATCH {
                        let Ok(call) = client_rx.try_recv() else { break };
                        self.on_call(call);
                    }
                    let now = self.clock.now();
                    self.node.end_batch(now);
                }
                Some(call) = client_rx.recv() => {
                    self.node.begin_batch();
                    self.on_call(call);
                    for _ in 0..INPUT_BATCH {
                        let Ok(call) = client_rx.try_recv() else { break };
                        self.on_call(call);
                    }
                    for _ in 0..INPUT_BATCH {
                        let Ok(m) = raft_rx.try_recv() else { break };
                        self.on_message(m);
                    }
                    let now = self.clock.now();
                    self.node.end_batch(now);
                }
                Some(done) = self.storage_rx.recv() => match done {
                    StorageDone::Persisted(token) => {
                        let now = self.clock.now();
                        self.node.persisted(now, token);
                    }
                    StorageDone::Failed(e) => return Err(e.into()),
                },
                Some((index, data)) = self.snapshot_rx.recv() => {
                    let now = self.clock.now();
                    self.node.snapshot_encoded(now, index, data);
                }
                Some(restored) = self.restored_rx.recv() => {
                    let now = self.clock.now();
                    self.node.snapshot_restored(now, restored);
                }
            }
            self.execute()?;
            match stopping {
                Some((since, false)) if self.node.drained() || since.elapsed() > DRAIN_LIMIT => {
                    stopping = Some((Instant::now(), true));
                    let now = self.clock.now();
                    if !self.node.handover(now) {
                        break;
                    }
                    self.execute()?;
                    tracing::info!("shutting down: transferring leadership");
                }
                Some((since, true)) => {
                    let leads = self.node.raft().role() == Role::Leader;
                    if !leads || since.elapsed() > Duration::from_secs(1) {
                        break;
                    }
                }
                _ => {}
            }
        }
        tracing::info!(node = %node_name(self.node.raft().id()), "stopping");
        self.transport.close().await;
        Ok(())
    }

    fn on_message(&mut self, m: Message) {
        if let Some((op, false)) = rpc_op(&m.body) {
            if let Some(sent) = self.rpc_sent.remove(&(m.from, op)) {
                self.metrics.observe_rpc(op, sent.elapsed().as_secs_f64());
            }
        }
        let now = self.clock.now();
        self.node.step(now, m);
    }

    fn on_call(&mut self, (request, reply): ClientCall) {
        self.next_call += 1;
        let id = self.next_call;
        self.calls.insert(id, reply);
        let now = self.clock.now();
        self.node.call(now, id, request);
    }

    /// Calls whose caller went away (the stream closed) are cancelled in the core.
    fn sweep_cancelled(&mut self) {
        let gone: Vec<CallId> = self
            .calls
            .iter()
            .filter(|(_, tx)| tx.is_closed())
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            self.calls.remove(&id);
            let now = self.clock.now();
            self.node.cancel(now, id);
        }
        self.rpc_sent
            .retain(|_, t| t.elapsed() < Duration::from_secs(10));
    }

    /// Execute the core's actions in order until it has none.
    fn execute(&mut self) -> Result<(), DriverError> {
        if let Some(why) = self.node.fatal() {
            return Err(DriverError::Fatal(why.to_string()));
        }
        loop {
            let actions = self.node.take_actions();
            if actions.is_empty() {
                return Ok(());
            }
            for action in actions {
                self.execute_one(action)?;
            }
        }
    }

    fn execute_one(&mut self, action: Action) -> Result<(), DriverError> {
        match action {
            Action::Persist(p) => self
                .storage_tx
                .send(StorageOp::Persist(p))
                .map_err(|_| DriverError::StorageGone)?,
            Action::Compact(s) => self
                .snapshot_writer
                .send(s)
                .map_err(|_| DriverError::StorageGone)?,
            Action::Send(m) => {
                if let Some((op, true)) = rpc_op(&m.body) {
                    self.rpc_sent.entry((m.to, op)).or_insert_with(Instant::now);
                }
                if let Ok(c) = self
                    .metrics
                    .messages_sent
                    .get_metric_with_label_values(&[m.body.kind()])
                {
                    c.inc();
                }
                self.transport.send(m);
            }
            Action::Reply { call, response } => {
                if let Some(tx) = self.calls.remove(&call) {
                    let _ = tx.send(response);
                }
            }
            Action::Snapshot(view) => self.encode_snapshot(view),
            Action::Restore(job) => self.decode_snapshot(job),
            Action::WakeAt(mono) => self.wake = self.clock.instant(mono),
            Action::Event(e) => self.on_event(e),
        }
        Ok(())
    }

    /// Encode a snapshot view off the loop; the core compacts once it is back.
    fn encode_snapshot(&self, view: SnapshotView) {
        let tx = self.snapshot_tx.clone();
        let index = view.index;
        let encoding = tokio::task::spawn_blocking(move || view.encode());
        tokio::spawn(async move {
            // The core waits for this answer before it takes another snapshot: an encode
            // that died is reported as no bytes, never left unanswered.
            let data = encoding.await.unwrap_or_default();
            let _ = tx.send((index, data));
        });
    }

    /// Decode a snapshot from the leader off the loop; the core installs it once back.
    fn decode_snapshot(&self, job: RestoreJob) {
        let tx = self.restored_tx.clone();
        let index = job.index();
        let decoding = tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let restored = job.decode();
            tracing::info!(
                index,
                ms = started.elapsed().as_millis() as u64,
                "decoded the leader's snapshot"
            );
            restored
        });
        tokio::spawn(async move {
            let restored = match decoding.await {
                Ok(r) => r,
                // The core waits for this answer: a decode that died is an error, not
                // a node that never goes on.
                Err(e) => Restored::failed(index, format!("decoding died: {e}")),
            };
            let _ = tx.send(restored);
        });
    }

    fn on_event(&self, e: NodeEvent) {
        match e {
            NodeEvent::LeaderChanged { term, leader } => {
                if leader.is_some() {
                    self.metrics.raft_leader_changes.inc();
                }
                tracing::info!(term, leader = ?leader.map(node_name), "leader changed");
            }
            NodeEvent::SnapshotInstalled { index, bytes } => {
                tracing::info!(index, bytes, "installed snapshot from the leader");
            }
            NodeEvent::SnapshotTaken { index, bytes } => {
                tracing::info!(index, bytes, "snapshot taken");
            }
            NodeEvent::SnapshotFailed { index, why } => {
                tracing::error!(index, why, "snapshot failed; the log is kept whole");
            }
            NodeEvent::Committed { latency_ms } => {
                self.metrics
                    .observe_rpc("propose", latency_ms as f64 / 1000.0);
            }
            NodeEvent::Applied { .. } => {}
        }
    }

    fn publish(&mut self) {
        let st = self.node.status();
        self.metrics.raft_term.set(st.term as i64);
        self.metrics.raft_role.set(i64::from(st.role.code()));
        self.metrics.raft_commit_index.set(st.commit as i64);
        self.metrics.raft_applied_index.set(st.applied as i64);
        let health = Health {
            ok: true,
            id: node_name(st.id),
            role: st.role.code(),
            role_name: st.role.name().into(),
            term: st.term,
            leader: st.leader.map(node_name),
            commit_index: st.commit,
            applied_index: st.applied,
            last_index: st.last_index,
            voters: st.membership.voters.iter().map(|&v| node_name(v)).collect(),
        };
        self.health.send_if_modified(|h| {
            let changed = *h != health;
            *h = health;
            changed
        });
    }
}
