//! The node driver: one tokio task that feeds the Raft core and executes its Readies.
//!
//! ```text
//!  select! { tick | raft inbox | client inbox | shutdown }
//!    └─> while has_ready: persist (one fdatasync, on a blocking thread)
//!                         -> send -> restore/apply -> serve reads -> advance -> compact
//! ```
//! Everything that arrives while a Ready is being persisted waits in the bounded inboxes
//! and goes into the next Ready together: that is the node's group commit.

use crate::admin::Health;
use crate::metrics::NodeMetrics;
use crate::storage::{FileLog, LogStore, StorageError};
use crate::transport::{ClientCall, Transport};
use mesh_core::raft::{
    EntryPayload, LogIndex, Message, MessageBody, NodeId, ProposeError, Raft, Role, Term,
};
use mesh_core::services::envelope::{Command, Envelope, Reply, Services};
use mesh_core::services::lock::{LockCommand, LockEvent, LockReply};
use mesh_core::services::StateMachine;
use mesh_core::wire::{node_name, ClientRequest, ClientResponse, NodeStatus};
use std::collections::BTreeMap;
use std::future::Future;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};

/// Calls waiting for commit or for a read, at most; beyond it calls are refused.
const MAX_PENDING: usize = 100_000;
/// A call still unanswered after this is answered with a retryable error.
const PENDING_TIMEOUT: Duration = Duration::from_secs(10);
/// A queued lock acquire is abandoned after this (the gateway caps waits well below it).
const LOCK_WAIT_LIMIT: Duration = Duration::from_secs(120);
/// Inputs handled per wake-up before executing a Ready.
const INPUT_BATCH: usize = 1024;

/// A failure that stops the node.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// Storage failed (fatal: the node must restart and recover from disk).
    #[error("storage: {0}")]
    Storage(#[from] StorageError),
    /// A snapshot from the leader does not decode.
    #[error("snapshot restore: {0}")]
    Restore(String),
    /// A blocking task died.
    #[error("storage thread: {0}")]
    Join(String),
}

/// The driver's state.
pub struct Driver {
    raft: Raft,
    log: Option<FileLog>,
    sm: Services,
    transport: Transport,
    metrics: NodeMetrics,
    health: watch::Sender<Health>,
    tick: Duration,
    snapshot_every: u64,
    proposals: BTreeMap<LogIndex, Proposal>,
    /// Lock acquires that were queued, by (client, key), until granted or timed out.
    lock_waits: BTreeMap<(String, String), Vec<Waiting>>,
    /// The last leader time stamped into a proposal (stamps never go backwards).
    last_stamp_ms: u64,
    /// When this node last proposed a lock Tick.
    last_tick_proposal: Option<Instant>,
    reads: BTreeMap<u64, (Vec<u8>, oneshot::Sender<ClientResponse>, Instant)>,
    read_ready: Vec<(LogIndex, u64)>,
    next_read: u64,
    rpc_sent: BTreeMap<(NodeId, &'static str), Instant>,
    last_leader: Option<NodeId>,
}

/// Driver construction parameters.
pub struct DriverParts {
    /// The core, restored from storage.
    pub raft: Raft,
    /// The log it was restored from.
    pub log: FileLog,
    /// The services, restored from the snapshot.
    pub sm: Services,
    /// The started transport.
    pub transport: Transport,
    /// Metrics.
    pub metrics: NodeMetrics,
    /// Where `/health` reads from.
    pub health: watch::Sender<Health>,
    /// Tick interval.
    pub tick: Duration,
    /// Applied entries between snapshots.
    pub snapshot_every: u64,
}

/// A queued lock acquire's caller and when it asked.
type Waiting = (oneshot::Sender<ClientResponse>, Instant);

/// A client's proposal waiting for its entry to apply.
struct Proposal {
    term: Term,
    reply: oneshot::Sender<ClientResponse>,
    started: Instant,
    /// For a lock acquire that may queue: (client, key).
    waits_for: Option<(String, String)>,
}

fn wall_clock_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn applied(index: LogIndex, reply: &Reply) -> ClientResponse {
    ClientResponse::Applied {
        index,
        result: postcard::to_stdvec(reply).unwrap_or_default(),
    }
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

impl Driver {
    /// A driver over restored parts.
    pub fn new(p: DriverParts) -> Self {
        Self {
            raft: p.raft,
            log: Some(p.log),
            sm: p.sm,
            transport: p.transport,
            metrics: p.metrics,
            health: p.health,
            tick: p.tick,
            snapshot_every: p.snapshot_every,
            proposals: BTreeMap::new(),
            lock_waits: BTreeMap::new(),
            last_stamp_ms: 0,
            last_tick_proposal: None,
            reads: BTreeMap::new(),
            read_ready: Vec::new(),
            next_read: 0,
            rpc_sent: BTreeMap::new(),
            last_leader: None,
        }
    }

    /// Run until `shutdown` resolves; a leader then hands over leadership first.
    pub async fn run(
        mut self,
        mut raft_rx: mpsc::Receiver<Message>,
        mut client_rx: mpsc::Receiver<ClientCall>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), DriverError> {
        let mut ticker = tokio::time::interval(self.tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        let mut stopping: Option<Instant> = None;
        loop {
            tokio::select! {
                () = &mut shutdown, if stopping.is_none() => {
                    stopping = Some(Instant::now());
                    if !self.begin_handover() {
                        break;
                    }
                }
                _ = ticker.tick() => {
                    self.raft.tick();
                    self.expire_pending();
                    self.maybe_tick_locks();
                }
                Some(m) = raft_rx.recv() => {
                    self.on_message(m);
                    for _ in 0..INPUT_BATCH {
                        let Ok(m) = raft_rx.try_recv() else { break };
                        self.on_message(m);
                    }
                }
                Some(call) = client_rx.recv() => {
                    self.on_call(call);
                    for _ in 0..INPUT_BATCH {
                        let Ok(call) = client_rx.try_recv() else { break };
                        self.on_call(call);
                    }
                }
            }
            self.process_ready().await?;
            self.publish();
            if let Some(since) = stopping {
                if self.raft.role() != Role::Leader || since.elapsed() > Duration::from_secs(1) {
                    break;
                }
            }
        }
        tracing::info!(node = %node_name(self.raft.id()), "stopping");
        self.transport.close().await;
        Ok(())
    }

    /// A leader that is asked to stop first hands leadership to its most up-to-date
    /// follower, so the cluster does not wait out an election timeout.
    /// Returns whether a transfer started (and is worth waiting for).
    fn begin_handover(&mut self) -> bool {
        let Some(target) = self.raft.transfer_candidate() else {
            return false;
        };
        match self.raft.transfer_leader(target) {
            Ok(()) => {
                tracing::info!(to = %node_name(target), "shutting down: transferring leadership");
                true
            }
            Err(e) => {
                tracing::warn!("shutting down: leadership transfer refused: {e}");
                false
            }
        }
    }

    fn on_message(&mut self, m: Message) {
        if let Some((op, false)) = rpc_op(&m.body) {
            if let Some(sent) = self.rpc_sent.remove(&(m.from, op)) {
                self.metrics.observe_rpc(op, sent.elapsed().as_secs_f64());
            }
        }
        self.raft.step(m);
    }

    fn on_call(&mut self, (request, reply): ClientCall) {
        if self.proposals.len() + self.reads.len() >= MAX_PENDING {
            let _ = reply.send(ClientResponse::Error {
                message: "too many calls in flight".into(),
                retry: true,
            });
            return;
        }
        match request {
            ClientRequest::Propose(data) => self.propose_envelope(&data, reply),
            ClientRequest::Read(query) => {
                self.next_read += 1;
                let id = self.next_read;
                match self.raft.read_index(id.to_le_bytes().to_vec()) {
                    Ok(()) => {
                        self.reads.insert(id, (query, reply, Instant::now()));
                    }
                    Err(e) => {
                        let _ = reply.send(refusal(e));
                    }
                }
            }
            ClientRequest::Status => {
                let st = self.raft.status();
                let _ = reply.send(ClientResponse::Status(NodeStatus {
                    id: st.id,
                    role: st.role.code(),
                    term: st.term,
                    leader: st.leader,
                    commit: st.commit,
                    applied: st.applied,
                }));
            }
        }
    }

    /// The leader's clock for a new proposal: wall time, never behind the last stamp.
    fn stamp(&mut self) -> u64 {
        self.last_stamp_ms = self.last_stamp_ms.max(wall_clock_ms());
        self.last_stamp_ms
    }

    /// Stamp the leader's time into a client's envelope and propose it.
    fn propose_envelope(&mut self, data: &[u8], reply: oneshot::Sender<ClientResponse>) {
        let Ok(mut envelope) = postcard::from_bytes::<Envelope>(data) else {
            let _ = reply.send(ClientResponse::Error {
                message: "malformed command".into(),
                retry: false,
            });
            return;
        };
        envelope.now_ms = self.stamp();
        let waits_for = match &envelope.command {
            Command::Lock(LockCommand::Acquire {
                key,
                client,
                wait_ms,
                ..
            }) if *wait_ms > 0 => Some((client.clone(), key.clone())),
            _ => None,
        };
        let bytes = postcard::to_stdvec(&envelope).unwrap_or_default();
        match self.raft.propose(bytes) {
            Ok(index) => {
                let term = self.raft.term();
                let proposal = Proposal {
                    term,
                    reply,
                    started: Instant::now(),
                    waits_for,
                };
                if let Some(old) = self.proposals.insert(index, proposal) {
                    let _ = old.reply.send(lost());
                }
            }
            Err(e) => {
                let _ = reply.send(refusal(e));
            }
        }
    }

    /// When a lease or wait deadline has passed, the leader proposes a Tick so the lock
    /// table expires it even without other traffic (at most every 10 ms).
    fn maybe_tick_locks(&mut self) {
        if self.raft.role() != Role::Leader {
            return;
        }
        let Some(deadline) = self.sm.locks().next_deadline_ms() else {
            return;
        };
        if self
            .last_tick_proposal
            .is_some_and(|t| t.elapsed() < Duration::from_millis(10))
        {
            return;
        }
        if wall_clock_ms() < deadline {
            return;
        }
        let envelope = Envelope {
            session: 0,
            seq: 0,
            now_ms: self.stamp(),
            command: Command::Lock(LockCommand::Tick),
        };
        if self
            .raft
            .propose(postcard::to_stdvec(&envelope).unwrap_or_default())
            .is_ok()
        {
            self.last_tick_proposal = Some(Instant::now());
        }
    }

    async fn process_ready(&mut self) -> Result<(), DriverError> {
        while self.raft.has_ready() {
            let mut rd = self.raft.ready();
            let marker = rd.persisted_marker();
            if rd.snapshot.is_some() || !rd.entries.is_empty() || rd.must_sync {
                let snapshot = rd.snapshot.clone();
                let entries = std::mem::take(&mut rd.entries);
                let hard_state = rd.hard_state;
                self.persist(move |log| log.persist(snapshot.as_ref(), &entries, hard_state))
                    .await?;
            }
            for m in rd.messages {
                if let Some((op, true)) = rpc_op(&m.body) {
                    self.rpc_sent.entry((m.to, op)).or_insert_with(Instant::now);
                }
                self.transport.send(m);
            }
            if let Some(s) = &rd.snapshot {
                self.sm
                    .restore(&s.data)
                    .map_err(|e| DriverError::Restore(e.to_string()))?;
                tracing::info!(
                    index = s.meta.index,
                    bytes = s.data.len(),
                    "installed snapshot from the leader"
                );
                let later = self.proposals.split_off(&(s.meta.index + 1));
                for (_, p) in std::mem::replace(&mut self.proposals, later) {
                    let _ = p.reply.send(lost());
                }
            }
            for e in rd.committed_entries {
                self.apply_entry(&e);
            }
            for rs in rd.read_states {
                if let Ok(bytes) = <[u8; 8]>::try_from(rs.ctx.as_slice()) {
                    self.read_ready.push((rs.index, u64::from_le_bytes(bytes)));
                }
            }
            self.serve_reads();
            self.raft.advance(marker);
            self.maybe_compact().await?;
        }
        Ok(())
    }

    fn apply_entry(&mut self, e: &mesh_core::raft::Entry) {
        let (reply, events) = match &e.payload {
            EntryPayload::Command(data) => {
                let (reply, events) = self.sm.apply_bytes(e.index, data);
                (Some(reply), events)
            }
            EntryPayload::Noop | EntryPayload::Config(_) => {
                self.sm.skip(e.index);
                (None, Vec::new())
            }
        };
        if let Some(p) = self.proposals.remove(&e.index) {
            match reply {
                Some(r) if p.term == e.term => {
                    self.metrics
                        .observe_rpc("propose", p.started.elapsed().as_secs_f64());
                    self.answer(e.index, r, p);
                }
                _ => {
                    let _ = p.reply.send(lost());
                }
            }
        }
        for event in events {
            self.on_lock_event(e.index, event);
        }
    }

    /// Answer a proposal; a queued lock acquire waits for its grant instead.
    fn answer(&mut self, index: LogIndex, reply: Reply, p: Proposal) {
        let (Reply::Lock(LockReply::Queued), Some((client, key))) = (&reply, p.waits_for) else {
            let _ = p.reply.send(applied(index, &reply));
            return;
        };
        // A retried acquire may answer "queued" from the session cache after its wait
        // already ended: then the table says whether it holds the lock now or gave up.
        let view = self.sm.locks().view(&key);
        if let Some(h) = view.holders.iter().find(|h| h.client == client) {
            let granted = Reply::Lock(LockReply::Granted {
                token: h.token,
                mode: h.mode,
                expires_ms: h.expires_ms,
            });
            let _ = p.reply.send(applied(index, &granted));
            return;
        }
        if !view.waiters.iter().any(|w| w.client == client) {
            let timed_out = Reply::Lock(LockReply::TimedOut {
                holders: view.holders,
            });
            let _ = p.reply.send(applied(index, &timed_out));
            return;
        }
        self.lock_waits
            .entry((client, key))
            .or_default()
            .push((p.reply, p.started));
    }

    fn on_lock_event(&mut self, index: LogIndex, event: LockEvent) {
        let (client, key, reply) = match event {
            LockEvent::Granted {
                key,
                client,
                token,
                mode,
                expires_ms,
            } => (
                client,
                key,
                LockReply::Granted {
                    token,
                    mode,
                    expires_ms,
                },
            ),
            LockEvent::TimedOut {
                key,
                client,
                holders,
            } => (client, key, LockReply::TimedOut { holders }),
            LockEvent::Expired { .. } => return,
        };
        for (tx, _) in self.lock_waits.remove(&(client, key)).unwrap_or_default() {
            let _ = tx.send(applied(index, &Reply::Lock(reply.clone())));
        }
    }

    async fn persist(
        &mut self,
        write: impl FnOnce(&mut FileLog) -> Result<(), StorageError> + Send + 'static,
    ) -> Result<(), DriverError> {
        let Some(mut log) = self.log.take() else {
            return Err(DriverError::Join("log already failed".into()));
        };
        let started = Instant::now();
        let (log, result) = tokio::task::spawn_blocking(move || {
            let r = write(&mut log);
            (log, r)
        })
        .await
        .map_err(|e| DriverError::Join(e.to_string()))?;
        self.log = Some(log);
        self.metrics
            .storage_fsync
            .observe(started.elapsed().as_secs_f64());
        result.map_err(DriverError::from)
    }

    fn serve_reads(&mut self) {
        let applied = self.raft.status().applied;
        let (now, later): (Vec<_>, Vec<_>) =
            self.read_ready.drain(..).partition(|(i, _)| *i <= applied);
        self.read_ready = later;
        for (_, id) in now {
            if let Some((query, tx, _)) = self.reads.remove(&id) {
                let reply = self.sm.query_bytes(&query);
                let _ = tx.send(ClientResponse::Read(
                    postcard::to_stdvec(&reply).unwrap_or_default(),
                ));
            }
        }
    }

    async fn maybe_compact(&mut self) -> Result<(), DriverError> {
        let st = self.raft.status();
        if self.snapshot_every == 0 || st.applied < st.snapshot_index + self.snapshot_every {
            return Ok(());
        }
        if self.raft.compact(st.applied, self.sm.snapshot()).is_err() {
            return Ok(());
        }
        let Some(snapshot) = self.raft.snapshot().cloned() else {
            return Ok(());
        };
        tracing::info!(
            index = snapshot.meta.index,
            bytes = snapshot.data.len(),
            "snapshot taken"
        );
        self.persist(move |log| log.compact(&snapshot)).await
    }

    fn expire_pending(&mut self) {
        let expired = |t: &Instant| t.elapsed() > PENDING_TIMEOUT;
        let stale: Vec<LogIndex> = self
            .proposals
            .iter()
            .filter(|(_, p)| expired(&p.started))
            .map(|(i, _)| *i)
            .collect();
        for i in stale {
            if let Some(p) = self.proposals.remove(&i) {
                let _ = p.reply.send(lost());
            }
        }
        // Lock waits end by their own deadline in the table; this only drops waits whose
        // caller went away or that outlived any deadline the gateway allows.
        self.lock_waits.retain(|_, waits| {
            waits.retain(|(tx, started)| !tx.is_closed() && started.elapsed() < LOCK_WAIT_LIMIT);
            !waits.is_empty()
        });
        let stale: Vec<u64> = self
            .reads
            .iter()
            .filter(|(_, r)| expired(&r.2))
            .map(|(i, _)| *i)
            .collect();
        for i in stale {
            if let Some((_, tx, _)) = self.reads.remove(&i) {
                let _ = tx.send(ClientResponse::Error {
                    message: "read not confirmed in time".into(),
                    retry: true,
                });
            }
        }
        self.rpc_sent.retain(|_, t| t.elapsed() < PENDING_TIMEOUT);
    }

    fn publish(&mut self) {
        let st = self.raft.status();
        if st.leader != self.last_leader {
            if st.leader.is_some() {
                self.metrics.raft_leader_changes.inc();
                tracing::info!(term = st.term, leader = ?st.leader.map(node_name), "leader changed");
            }
            self.last_leader = st.leader;
        }
        self.metrics.raft_term.set(st.term as i64);
        self.metrics.raft_role.set(i64::from(st.role.code()));
        self.metrics.raft_commit_index.set(st.commit as i64);
        self.metrics.raft_applied_index.set(st.applied as i64);
        let (shared, exclusive, waiters) = self.sm.locks().counts();
        self.metrics
            .set_locks(shared, exclusive, waiters, self.sm.locks().deadlocks());
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

/// The answer to a call the core refused.
fn refusal(e: ProposeError) -> ClientResponse {
    match e {
        ProposeError::NotLeader { leader } => ClientResponse::NotLeader { leader },
        ProposeError::Busy | ProposeError::TransferInProgress => ClientResponse::Error {
            message: e.to_string(),
            retry: true,
        },
        other => ClientResponse::Error {
            message: other.to_string(),
            retry: false,
        },
    }
}

/// The answer to a call whose entry was overwritten or whose leader stepped down: it may
/// or may not have been applied, so the client must retry (sessions make that safe).
fn lost() -> ClientResponse {
    ClientResponse::Error {
        message: "leadership changed before the entry committed; retry".into(),
        retry: true,
    }
}
