//! The node core: one syncmesh node as a sans-IO state machine (DESIGN.md section 8).
//!
//! ```text
//!   inputs, each with Time { mono_ms, wall_ms }          outputs: Vec<Action>, in order
//!   step(peer message) ─┐                              ┌─> Persist (then call persisted(token))
//!   tick()             ─┤                              ├─> Send (a leader's appends go out
//!   call(id, request)  ─┼──> Node { Raft, Services,    │   before its own fsync; votes and
//!   cancel(id)         ─┤        calls, waits,         │   follower answers only after it)
//!   persisted(token)   ─┤        leader time }         ├─> Reply(call id, answer)
//!   snapshot_encoded() ─┤                              ├─> Snapshot(view) / Compact(snapshot)
//!   snapshot_restored()─┘                              ├─> Restore(job: decode off the loop)
//!                                                      ├─> WakeAt(mono ms)
//!                                                      └─> Event (metrics, the console)
//! ```
//! Everything a node decides lives here: which call waits for which commit or which
//! service completion, when a waiting call times out or is withdrawn, the leader's
//! office time that lock time is built from, when a service deadline needs a `Tick`, when
//! to snapshot. The shell (the tokio driver, or the simulator) only executes actions:
//! it writes what `Persist` says and reports back, sends what `Send` says, hands each
//! `Reply` to its caller, and calls [`Node::tick`] at `WakeAt`. It never names a service.
//!
//! One persist is in flight at a time. While it is, inputs keep feeding Raft, and the
//! next persist takes everything that arrived (group commit). Messages that promise
//! durability (votes, append answers) are held until the persist that they depend on
//! has completed; the leader's own appends are sent at once (Raft thesis 10.2.1: the
//! leader counts itself towards a quorum only once its entry is durable).
//!
//! Snapshots never stall the loop: a local one is a view the shell encodes elsewhere, and
//! one from the leader is decoded elsewhere too ([`Action::Restore`]). Until it is back,
//! the Ready that carried it waits (nothing of it is persisted, applied or sent), while
//! messages, ticks and calls keep coming in: heartbeats still reach Raft, so the election
//! timer never runs out because a big snapshot is being decoded.

mod calls;
#[cfg(test)]
mod tests;

use crate::raft::{
    ConfChange, Config, Entry, EntryPayload, HardState, InitError, InitialState, LogIndex, Message,
    MessageBody, NodeId, ProposeError, Raft, Ready, Role, Snapshot, Status, Term,
};
use crate::services::cache::{
    AgentOutput, CacheAgent, CacheAnswer, CacheCall, CacheCommand, CacheConfig, CacheError,
};
pub use crate::services::envelope::Gauge;
use crate::services::envelope::{Command, Envelope, Reply, Services};
use crate::services::StateMachine;
use crate::wire::{ClientRequest, ClientResponse, NodeStatus};
use calls::{CallState, CallTable};
use std::collections::BTreeMap;

/// Names a call for the life of one node process (the shell picks it).
pub type CallId = u64;

/// The time an input happens at.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Time {
    /// Monotonic milliseconds: what every decision uses.
    pub mono_ms: u64,
    /// Wall-clock milliseconds since the epoch: only for estimates a person reads.
    pub wall_ms: u64,
}

/// What an applied entry adds to the log besides its payload, for the snapshot rule.
const ENTRY_OVERHEAD_BYTES: u64 = 64;
/// A snapshot is due at the latest after this many times `snapshot_every` entries,
/// whatever the growth rule says.
pub const SNAPSHOT_GROWTH_CEILING: u64 = 20;
/// The highest `snapshot_log_growth_pct` honoured.
pub const MAX_SNAPSHOT_LOG_GROWTH_PCT: u64 = 1000;

/// Settings of the node core.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// The Raft core's.
    pub raft: Config,
    /// Milliseconds per Raft tick.
    pub tick_ms: u64,
    /// Applied entries between snapshots (0: never).
    pub snapshot_every: u64,
    /// A snapshot also waits until the commands applied since the last one add up to
    /// this percentage of the last snapshot's size (0: count entries only). A snapshot
    /// encodes the whole state, so with a big queue a fixed entry count would encode
    /// it again and again (seen: a fifth of a follower's CPU under a 64-client enqueue
    /// load); growth in proportion to the state keeps the cost per logged byte
    /// bounded, and keeps the log between snapshots at most about as big as the last
    /// snapshot. Redis's `auto-aof-rewrite-percentage` is the same rule. At most
    /// [`MAX_SNAPSHOT_LOG_GROWTH_PCT`]; a snapshot is due anyway after
    /// [`SNAPSHOT_GROWTH_CEILING`] times `snapshot_every` entries.
    pub snapshot_log_growth_pct: u64,
    /// A proposal or read not answered within this is answered `Unknown` (or retryable).
    pub call_timeout_ms: u64,
    /// A call waiting for a service completion (a queued lock) is answered `Unknown`
    /// after this; services end their own waits well before.
    pub wait_limit_ms: u64,
    /// Calls in flight at most; beyond it calls are refused (retryable).
    pub max_calls: usize,
    /// Emit [`NodeEvent::Applied`] with a state digest after every entry, and check
    /// every service decision that has a reference implementation against it (the
    /// simulator's oracles; costly, off in production).
    pub trace_applies: bool,
    /// This node's cache.
    pub cache: CacheConfig,
    /// Differs between this node's processes (the shell picks it at random): the cache
    /// agent recognises its own registration by it.
    pub cache_nonce: u64,
}

impl NodeConfig {
    /// Defaults for node `id`.
    pub fn new(id: NodeId) -> Self {
        Self {
            raft: Config::new(id),
            tick_ms: 10,
            snapshot_every: 10_000,
            snapshot_log_growth_pct: 100,
            call_timeout_ms: 10_000,
            wait_limit_ms: 120_000,
            max_calls: 100_000,
            trace_applies: false,
            cache: CacheConfig::default(),
            cache_nonce: id,
        }
    }
}

/// What to write before reporting [`Node::persisted`] with `token`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Persist {
    /// Pass back to [`Node::persisted`] once durable.
    pub token: u64,
    /// A snapshot received from the leader (the log restarts after it).
    pub snapshot: Option<Snapshot>,
    /// Entries to append; the first may overwrite the stored log from its index.
    pub entries: Vec<Entry>,
    /// Hard state to store, if changed.
    pub hard_state: Option<HardState>,
    /// Whether an fsync is needed before reporting (term, vote, entries or snapshot).
    pub sync: bool,
}

/// An immutable view of the services at `index`, for the shell to encode off the loop.
#[derive(Clone, Debug)]
pub struct SnapshotView {
    /// The index the view is of.
    pub index: LogIndex,
    services: Box<Services>,
}

impl SnapshotView {
    /// The snapshot bytes; pass them to [`Node::snapshot_encoded`].
    pub fn encode(&self) -> Vec<u8> {
        self.services.snapshot()
    }
}

/// A snapshot from the leader to decode off the loop: [`RestoreJob::decode`], then pass
/// the result to [`Node::snapshot_restored`].
#[derive(Clone, Debug)]
pub struct RestoreJob {
    snapshot: Snapshot,
}

impl RestoreJob {
    /// The index the snapshot is of.
    pub fn index(&self) -> LogIndex {
        self.snapshot.meta.index
    }

    /// Decode the services' state (the slow part; drop the job afterwards).
    pub fn decode(&self) -> Restored {
        let mut services = Services::default();
        let result = services.restore(&self.snapshot.data);
        Restored {
            index: self.index(),
            services: result
                .map(|()| Box::new(services))
                .map_err(|e| e.to_string()),
        }
    }
}

/// A decoded snapshot, for [`Node::snapshot_restored`].
#[derive(Debug)]
pub struct Restored {
    index: LogIndex,
    services: Result<Box<Services>, String>,
}

impl Restored {
    /// The result for the snapshot at `index` whose decode could not run (its thread
    /// died): the node stops with `why` instead of waiting for it forever.
    pub fn failed(index: LogIndex, why: String) -> Self {
        Self {
            index,
            services: Err(why),
        }
    }
}

/// Something that happened, for metrics, logs and the console.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeEvent {
    /// The known leader changed.
    LeaderChanged {
        /// Term.
        term: Term,
        /// The new leader, if known.
        leader: Option<NodeId>,
    },
    /// A snapshot from the leader replaced the services' state.
    SnapshotInstalled {
        /// Its index.
        index: LogIndex,
        /// Its size.
        bytes: usize,
    },
    /// A local snapshot was taken and the log compacted up to it.
    SnapshotTaken {
        /// Its index.
        index: LogIndex,
        /// Its size.
        bytes: usize,
    },
    /// A snapshot view could not be encoded: nothing was compacted, and the next one is
    /// tried when it is due again.
    SnapshotFailed {
        /// The view's index.
        index: LogIndex,
        /// Why.
        why: String,
    },
    /// A proposal was answered after this long.
    Committed {
        /// Milliseconds from the call to its answer.
        latency_ms: u64,
    },
    /// An entry was applied (only with [`NodeConfig::trace_applies`]).
    Applied {
        /// Index.
        index: LogIndex,
        /// Term.
        term: Term,
        /// [`Services::digest`] after it.
        digest: u64,
    },
}

/// One thing for the shell to do. Execute the actions of one input in order.
#[derive(Clone, Debug)]
pub enum Action {
    /// Write and (if `sync`) fsync, then call [`Node::persisted`]. At most one is
    /// outstanding: the next comes only after it was reported.
    Persist(Persist),
    /// Send to a peer now (anything that needed a persist first comes after it).
    Send(Message),
    /// Answer a call.
    Reply {
        /// The call.
        call: CallId,
        /// The answer.
        response: ClientResponse,
    },
    /// Encode the view (off the loop), then call [`Node::snapshot_encoded`].
    Snapshot(SnapshotView),
    /// Decode a snapshot from the leader (off the loop), then call
    /// [`Node::snapshot_restored`]. Nothing is persisted until then.
    Restore(RestoreJob),
    /// Store this snapshot durably, then drop the log it covers. Its entries are all
    /// persisted already, so the shell may write it beside later persists (the driver
    /// does, on a thread of its own); only dropping the log waits for the file.
    Compact(Snapshot),
    /// Call [`Node::tick`] at this monotonic time (the latest `WakeAt` replaces earlier
    /// ones).
    WakeAt(u64),
    /// For metrics and logs.
    Event(NodeEvent),
}

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum NodeInitError {
    /// The stored Raft state or the config.
    #[error(transparent)]
    Raft(#[from] InitError),
    /// The stored snapshot does not decode.
    #[error("stored snapshot does not decode: {0}")]
    Snapshot(String),
}

/// A persist in flight: what waits for it.
#[derive(Debug)]
struct InFlight {
    token: u64,
    marker: Option<(LogIndex, Term)>,
    held: Vec<Message>,
}

/// The leader's term of office, in its own monotonic time.
#[derive(Clone, Copy, Debug)]
struct Office {
    term: Term,
    since_ms: u64,
}

/// One node. See the module docs.
#[derive(Debug)]
pub struct Node {
    cfg: NodeConfig,
    raft: Raft,
    services: Services,
    /// This node's half of the cache (not replicated: a restart starts it empty).
    cache: CacheAgent,
    now: Time,
    last_tick_ms: u64,
    office: Option<Office>,
    calls: CallTable,
    /// Calls of client sessions this leader proposed and has not applied yet, by
    /// (session, seq) and by index: a retry of one (its caller timed out and sent the
    /// same call again) waits on the entry already in the log instead of appending
    /// another, so a slow log is not slowed further by its own retries.
    in_log: BTreeMap<(u64, u64), (LogIndex, Term)>,
    in_log_by_index: BTreeMap<LogIndex, (u64, u64)>,
    persisting: Option<InFlight>,
    next_token: u64,
    snapshotting: bool,
    /// Command bytes applied since the last snapshot view (or install): with the last
    /// snapshot's size, when the next one is due.
    applied_bytes_since_snapshot: u64,
    /// A Ready with a snapshot from the leader, waiting for the snapshot to be decoded.
    restoring: Option<(Ready, Snapshot)>,
    /// The index of this leader's outstanding `Tick` proposal.
    tick_proposed: Option<LogIndex>,
    last_leader: Option<NodeId>,
    last_wake: Option<u64>,
    actions: Vec<Action>,
    /// Inside [`Node::begin_batch`]: inputs feed Raft, one Ready comes at the end.
    batching: bool,
    /// Why the node must stop, if it must: the shell stops it with this error.
    fatal: Option<String>,
}

/// Messages that may leave before this node's own persist completes: a leader's
/// appends, heartbeats and snapshot chunks. Everything else (votes, append and
/// heartbeat answers) may promise what the persist makes durable.
fn may_send_before_persist(m: &Message) -> bool {
    matches!(
        m.body,
        MessageBody::AppendEntries { .. }
            | MessageBody::Heartbeat { .. }
            | MessageBody::InstallSnapshot { .. }
            | MessageBody::TimeoutNow
    )
}

fn encode_answer(answer: &CacheAnswer) -> Vec<u8> {
    // Encoding plain data into a Vec cannot fail.
    postcard::to_stdvec(answer).unwrap_or_default()
}

fn encode_reply(reply: &Reply) -> Vec<u8> {
    // Encoding plain data into a Vec cannot fail.
    postcard::to_stdvec(reply).unwrap_or_default()
}

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

fn unknown(message: &str) -> ClientResponse {
    ClientResponse::Unknown {
        message: message.into(),
    }
}

impl Node {
    /// A node restored from stored state at time `now`.
    pub fn new(cfg: NodeConfig, state: InitialState, now: Time) -> Result<Self, NodeInitError> {
        let mut services = Services::default();
        if let Some(s) = &state.snapshot {
            services
                .restore(&s.data)
                .map_err(|e| NodeInitError::Snapshot(e.to_string()))?;
        }
        services.set_audit(cfg.trace_applies);
        let raft = Raft::new(cfg.raft.clone(), state)?;
        Ok(Self {
            cache: CacheAgent::new(cfg.cache.clone(), cfg.raft.id, cfg.cache_nonce),
            raft,
            services,
            now,
            last_tick_ms: now.mono_ms,
            office: None,
            calls: CallTable::default(),
            in_log: BTreeMap::new(),
            in_log_by_index: BTreeMap::new(),
            persisting: None,
            next_token: 0,
            snapshotting: false,
            applied_bytes_since_snapshot: 0,
            restoring: None,
            tick_proposed: None,
            last_leader: None,
            last_wake: None,
            actions: Vec::new(),
            batching: false,
            fatal: None,
            cfg,
        })
    }

    /// The actions produced so far, in order; the shell executes them all.
    pub fn take_actions(&mut self) -> Vec<Action> {
        std::mem::take(&mut self.actions)
    }

    /// Why the node must stop (a state it cannot continue from); the shell stops it
    /// with this error. Once set, the node does nothing more.
    pub fn fatal(&self) -> Option<&str> {
        self.fatal.as_deref()
    }

    /// The Raft core (read only).
    pub fn raft(&self) -> &Raft {
        &self.raft
    }

    /// The services' state (read only).
    pub fn services(&self) -> &Services {
        &self.services
    }

    /// Where Raft stands.
    pub fn status(&self) -> Status {
        self.raft.status()
    }

    /// Gauges of the services and of this node's cache, for metrics.
    pub fn gauges(&self) -> Vec<Gauge> {
        let mut out = self.services.gauges();
        let s = self.cache.stats(self.now.mono_ms);
        let counter = |name: &'static str, help: &'static str, value: u64| Gauge {
            name,
            counter: true,
            help,
            labels: Vec::new(),
            value: value as f64,
        };
        out.push(counter(
            "cache_hits_total",
            "Cache gets served from this node's memory",
            s.hits,
        ));
        out.push(counter(
            "cache_misses_total",
            "Cache gets that went to the directory",
            s.misses,
        ));
        out.push(counter(
            "cache_invalidations_total",
            "Cache lines this node dropped because the directory revoked them",
            s.invalidations,
        ));
        out.push(counter(
            "cache_writebacks_total",
            "Cache values this node wrote back (accepted by the directory)",
            s.writebacks,
        ));
        out.push(counter(
            "cache_evictions_total",
            "Cache lines evicted at this node (LRU or on request)",
            s.evictions,
        ));
        out.push(counter(
            "cache_fills_total",
            "Cache lines filled from the directory",
            s.fills,
        ));
        for (state, n) in ["M", "E", "S"].into_iter().zip(s.lines) {
            out.push(Gauge {
                name: "cache_lines",
                counter: false,
                help: "Cache lines this node holds, by MESI state",
                labels: vec![("state", state.to_string())],
                value: n as f64,
            });
        }
        out.push(Gauge {
            name: "cache_lease_valid",
            counter: false,
            help: "Whether this node's cache lease is valid (1) or not (0)",
            labels: Vec::new(),
            value: f64::from(u8::from(s.lease_valid)),
        });
        out
    }

    /// This node's cache agent (read only: tests, the simulator's invariants).
    pub fn cache(&self) -> &CacheAgent {
        &self.cache
    }

    /// Calls in flight.
    pub fn calls_in_flight(&self) -> usize {
        self.calls.len()
    }

    /// Start a batch: the inputs until [`Node::end_batch`] go into one Ready (the
    /// shell's group commit: everything that arrived while it was busy is one round).
    pub fn begin_batch(&mut self) {
        self.batching = true;
    }

    /// End a batch and act on everything in it.
    pub fn end_batch(&mut self, now: Time) {
        self.now = now;
        self.batching = false;
        self.drive();
    }

    /// A message from a peer.
    pub fn step(&mut self, now: Time, m: Message) {
        self.now = now;
        if let MessageBody::Forward { command } = &m.body {
            if m.to == self.raft.id() {
                self.forwarded(m.from, command);
            }
        } else {
            self.raft.step(m);
        }
        self.drive();
    }

    /// A command `from` asks this leader to propose: only one that names `from` (a
    /// node speaks for itself alone), and only while leading (the sender resends).
    fn forwarded(&mut self, from: NodeId, bytes: &[u8]) {
        let Ok(command) = postcard::from_bytes::<CacheCommand>(bytes) else {
            return;
        };
        if command.node() == from {
            let _ = self.propose_envelope(Envelope::new(0, 0, 0, Command::Cache(command)));
        }
    }

    /// Time passed: run the Raft ticks that are due, time out calls, propose a service
    /// `Tick` when a deadline passed.
    pub fn tick(&mut self, now: Time) {
        self.now = now;
        let due = now.mono_ms.saturating_sub(self.last_tick_ms) / self.cfg.tick_ms.max(1);
        // After a long stall, catch up a few ticks only: the rest is lost, as a process
        // that was paused would lose it.
        for _ in 0..due.min(3) {
            self.raft.tick();
        }
        if due > 0 {
            self.last_tick_ms = if due > 3 {
                now.mono_ms
            } else {
                self.last_tick_ms + due * self.cfg.tick_ms
            };
        }
        self.cache.tick(now.mono_ms, self.services.cache());
        for (id, state) in self.calls.expire(now.mono_ms) {
            let response = match state {
                CallState::Reading { .. } => ClientResponse::Error {
                    message: "read not confirmed in time".into(),
                    retry: true,
                },
                _ => unknown("no outcome in time; retry the same call to learn it"),
            };
            self.reply(id, response);
        }
        self.drive();
    }

    /// A client's call.
    pub fn call(&mut self, now: Time, id: CallId, request: ClientRequest) {
        self.now = now;
        if self.calls.len() >= self.cfg.max_calls {
            self.reply(
                id,
                ClientResponse::Error {
                    message: format!("{} calls in flight; try again", self.cfg.max_calls),
                    retry: true,
                },
            );
            return;
        }
        match request {
            ClientRequest::Propose(bytes) => self.propose_call(id, &bytes),
            ClientRequest::Read(query) => self.read_call(id, query),
            ClientRequest::Status => {
                let st = self.raft.status();
                let status = NodeStatus {
                    id: st.id,
                    role: st.role.code(),
                    term: st.term,
                    leader: st.leader,
                    commit: st.commit,
                    applied: st.applied,
                };
                self.reply(id, ClientResponse::Status(status));
            }
            ClientRequest::Local(bytes) => match postcard::from_bytes::<CacheCall>(&bytes) {
                Ok(call) => self
                    .cache
                    .call(now.mono_ms, id, call, self.services.cache()),
                Err(e) => self.reply(
                    id,
                    ClientResponse::Local(encode_answer(&CacheAnswer::Error(CacheError::Invalid(
                        format!("malformed cache call: {e}"),
                    )))),
                ),
            },
        }
        self.drive();
    }

    /// The caller of `id` went away (its connection closed). A call that waits for a
    /// service completion is withdrawn through the log if it is still queued; a call
    /// still waiting for its commit is withdrawn if it turns out to queue. A grant is
    /// never released here: the client may be retrying the same call elsewhere and may
    /// have heard of it. A client that gives up for good withdraws with
    /// `release_grant` itself.
    pub fn cancel(&mut self, now: Time, id: CallId) {
        self.now = now;
        self.cache.cancel(id);
        if let Some(call) = self.calls.cancel(id) {
            self.withdraw(call);
        }
        self.drive();
    }

    /// The persist with `token` is durable.
    pub fn persisted(&mut self, now: Time, token: u64) {
        self.now = now;
        if self.persisting.as_ref().is_some_and(|p| p.token == token) {
            if let Some(done) = self.persisting.take() {
                for m in done.held {
                    self.actions.push(Action::Send(m));
                }
                self.raft.advance(done.marker);
            }
        }
        self.drive();
    }

    /// The view of [`Action::Snapshot`] at `index` was encoded into `data` (empty: the
    /// encode failed or died; nothing is compacted).
    pub fn snapshot_encoded(&mut self, now: Time, index: LogIndex, data: Vec<u8>) {
        self.now = now;
        self.snapshotting = false;
        if data.is_empty() {
            // The services never encode to nothing (a state snapshot has a header): an
            // encode that failed or died must not become the base of the log.
            self.actions.push(Action::Event(NodeEvent::SnapshotFailed {
                index,
                why: "the state did not encode (the encoder failed or died)".into(),
            }));
            self.drive();
            return;
        }
        let bytes = data.len();
        if self.raft.compact(index, data).is_ok() {
            if let Some(s) = self.raft.snapshot() {
                self.actions.push(Action::Compact(s.clone()));
                self.actions
                    .push(Action::Event(NodeEvent::SnapshotTaken { index, bytes }));
            }
        }
        self.drive();
    }

    /// The node is about to stop: what only it holds (cache lines not yet written back)
    /// goes to the log now, and no new such thing is acknowledged. Then wait for
    /// [`Node::drained`] (a while), then [`Node::handover`].
    pub fn begin_stop(&mut self, now: Time) {
        self.now = now;
        self.cache.begin_stop(now.mono_ms);
        self.drive();
    }

    /// Whether nothing acknowledged lives only in this node any more.
    pub fn drained(&self) -> bool {
        self.cache.drained()
    }

    /// Hand leadership to the most up-to-date follower (before a shutdown). Whether a
    /// transfer started.
    pub fn handover(&mut self, now: Time) -> bool {
        self.now = now;
        let started = self
            .raft
            .transfer_candidate()
            .is_some_and(|to| self.raft.transfer_leader(to).is_ok());
        self.drive();
        started
    }

    /// Ask the leader to hand over to `to`.
    pub fn transfer_leader(&mut self, now: Time, to: NodeId) -> Result<(), ProposeError> {
        self.now = now;
        let r = self.raft.transfer_leader(to);
        self.drive();
        r
    }

    /// Propose a membership change.
    pub fn propose_conf_change(
        &mut self,
        now: Time,
        change: ConfChange,
    ) -> Result<LogIndex, ProposeError> {
        self.now = now;
        let r = self.raft.propose_conf_change(change);
        self.drive();
        r
    }

    fn reply(&mut self, call: CallId, response: ClientResponse) {
        self.actions.push(Action::Reply { call, response });
    }

    fn applied_response(&self, index: LogIndex, reply: &Reply) -> ClientResponse {
        ClientResponse::Applied {
            index,
            result: encode_reply(reply),
            wall_ms: self.now.wall_ms,
        }
    }

    /// The leader's monotonic milliseconds in office, if it leads.
    fn office_elapsed(&self) -> Option<u64> {
        let office = self.office?;
        (office.term == self.raft.term()).then(|| self.now.mono_ms.saturating_sub(office.since_ms))
    }

    /// Stamp and propose an envelope. The index it occupies.
    fn propose_envelope(&mut self, mut envelope: Envelope) -> Result<LogIndex, ProposeError> {
        let Some(elapsed) = self.office_elapsed() else {
            return Err(ProposeError::NotLeader {
                leader: self.raft.leader(),
            });
        };
        envelope.elapsed_ms = elapsed;
        // Encoding plain data into a Vec cannot fail.
        let bytes = postcard::to_stdvec(&envelope).unwrap_or_default();
        self.raft.propose(bytes)
    }

    fn propose_call(&mut self, id: CallId, bytes: &[u8]) {
        let Ok(envelope) = postcard::from_bytes::<Envelope>(bytes) else {
            self.reply(
                id,
                ClientResponse::Error {
                    message: "malformed command".into(),
                    retry: false,
                },
            );
            return;
        };
        if matches!(envelope.command, Command::Cache(_)) {
            // The cache directory hears only from nodes' own agents (a forwarded one
            // names the node it came from): a client could otherwise renew another
            // node's lease or confirm its revokes.
            self.reply(
                id,
                ClientResponse::Error {
                    message: "cache directory commands come only from the nodes' own agents".into(),
                    retry: false,
                },
            );
            return;
        }
        let key = (envelope.session, envelope.seq);
        let deadline = self.now.mono_ms + self.cfg.call_timeout_ms;
        if let Some(index) = self.proposed_already(key) {
            // A hedge or a retry of a call whose entry is in the log: it waits on that
            // entry beside the copy already there (which may be the one that answers
            // first, so it must not be dropped).
            let term = self.raft.term();
            self.calls.join(id, index, term, self.now.mono_ms, deadline);
            return;
        }
        match self.propose_envelope(envelope) {
            Ok(index) => {
                let term = self.raft.term();
                if key.0 != 0 {
                    self.in_log.insert(key, (index, term));
                    self.in_log_by_index.insert(index, key);
                }
                for old in self
                    .calls
                    .propose(id, index, term, self.now.mono_ms, deadline)
                {
                    self.reply(old, unknown("its log entry was replaced"));
                }
            }
            Err(e) => self.reply(id, refusal(e)),
        }
    }

    /// The index of `key`'s entry if this leader proposed it in its current term and
    /// has not applied it yet (and it is still in the log).
    fn proposed_already(&mut self, key: (u64, u64)) -> Option<LogIndex> {
        let applied = self.services.applied();
        let later = self.in_log_by_index.split_off(&(applied + 1));
        for k in std::mem::replace(&mut self.in_log_by_index, later).into_values() {
            self.in_log.remove(&k);
        }
        if key.0 == 0 || self.office_elapsed().is_none() {
            return None;
        }
        let &(index, term) = self.in_log.get(&key)?;
        let current =
            term == self.raft.term() && self.raft.entry(index).is_some_and(|e| e.term == term);
        current.then_some(index)
    }

    fn read_call(&mut self, id: CallId, query: Vec<u8>) {
        match self.raft.read_index(id.to_le_bytes().to_vec()) {
            Ok(()) => {
                let deadline = self.now.mono_ms + self.cfg.call_timeout_ms;
                self.calls.read(id, query, self.now.mono_ms, deadline);
            }
            Err(e) => self.reply(id, refusal(e)),
        }
    }

    /// Withdraw a queued session call whose caller went away, through the log. Only the
    /// leader can; elsewhere the caller's client withdraws it itself.
    fn withdraw(&mut self, call: (u64, u64)) {
        let envelope = Envelope::new(
            0,
            0,
            0,
            Command::Withdraw {
                session: call.0,
                seq: call.1,
                release_grant: false,
            },
        );
        let _ = self.propose_envelope(envelope);
    }

    /// Take and execute Readies until Raft has nothing more or waits on a persist; then
    /// do the leader's duties and say when to wake.
    fn drive(&mut self) {
        if self.batching || self.fatal.is_some() {
            return;
        }
        loop {
            self.note_leadership();
            self.leader_duties();
            self.cache_duties();
            if self.persisting.is_some() || self.restoring.is_some() || !self.raft.has_ready() {
                break;
            }
            let rd = self.raft.ready();
            self.execute(rd);
        }
        self.maybe_snapshot();
        self.schedule_wake();
    }

    fn execute(&mut self, mut rd: Ready) {
        if let Some(s) = rd.snapshot.take() {
            // Decoded off the loop; this Ready goes on once it is back. (A clone of a
            // snapshot shares its bytes.)
            self.actions.push(Action::Restore(RestoreJob {
                snapshot: s.clone(),
            }));
            self.restoring = Some((rd, s));
            return;
        }
        self.execute_decoded(rd);
    }

    /// The snapshot of [`Action::Restore`] was decoded: install it, and go on with the
    /// Ready that brought it. A result for another snapshot than the one awaited is
    /// ignored; one that does not decode stops the node (see [`Node::fatal`]) before
    /// anything of it is persisted.
    pub fn snapshot_restored(&mut self, now: Time, restored: Restored) {
        self.now = now;
        let awaited = self
            .restoring
            .as_ref()
            .is_some_and(|(_, s)| s.meta.index == restored.index);
        if self.fatal.is_some() || !awaited {
            return;
        }
        let Some((mut rd, snapshot)) = self.restoring.take() else {
            return;
        };
        match restored.services {
            Ok(services) => self.install_snapshot(*services, &snapshot),
            Err(e) => {
                // The leader's snapshot is produced by the same code; bytes that do not
                // decode mean a corrupted transfer or a bug: the node must not run on,
                // but it stops with an error, never a panic, and its disk is untouched.
                self.fatal = Some(format!(
                    "the snapshot from the leader at index {} does not decode: {e}",
                    snapshot.meta.index
                ));
                return;
            }
        }
        rd.snapshot = Some(snapshot);
        self.execute_decoded(rd);
        self.drive();
    }

    fn execute_decoded(&mut self, rd: Ready) {
        let marker = rd.persisted_marker();
        let needs_persist = rd.snapshot.is_some() || !rd.entries.is_empty() || rd.must_sync;
        let (now, held): (Vec<Message>, Vec<Message>) =
            rd.messages.into_iter().partition(may_send_before_persist);
        if needs_persist {
            self.next_token += 1;
            self.actions.push(Action::Persist(Persist {
                token: self.next_token,
                snapshot: rd.snapshot,
                entries: rd.entries,
                hard_state: rd.hard_state,
                sync: rd.must_sync,
            }));
        }
        for m in now {
            self.actions.push(Action::Send(m));
        }
        for entry in &rd.committed_entries {
            self.apply(entry);
        }
        for rs in rd.read_states {
            if let Ok(bytes) = <[u8; 8]>::try_from(rs.ctx.as_slice()) {
                self.calls.read_ready(u64::from_le_bytes(bytes), rs.index);
            }
        }
        self.serve_reads();
        if needs_persist {
            self.persisting = Some(InFlight {
                token: self.next_token,
                marker,
                held,
            });
        } else {
            for m in held {
                self.actions.push(Action::Send(m));
            }
            self.raft.advance(marker);
        }
    }

    /// Replace the services with `restored`, decoded from the leader's snapshot `s`.
    fn install_snapshot(&mut self, mut restored: Services, s: &Snapshot) {
        restored.set_audit(self.cfg.trace_applies);
        self.services = restored;
        self.applied_bytes_since_snapshot = 0;
        self.actions
            .push(Action::Event(NodeEvent::SnapshotInstalled {
                index: s.meta.index,
                bytes: s.data.len(),
            }));
        // The events in between were skipped: the cache keeps what the directory still
        // grants it.
        self.cache
            .reconcile(self.now.mono_ms, self.services.cache());
        self.in_log.clear();
        self.in_log_by_index.clear();
        for id in self.calls.proposed_up_to(s.meta.index) {
            self.reply(id, unknown("a snapshot replaced the log before the answer"));
        }
        // Waiting calls learn their outcome from the sessions the snapshot carries.
        for (call, ids) in self.calls.waiting_refs() {
            match self.services.kept_reply(call).cloned() {
                Some(r) if r.is_waiting() => {}
                Some(r) => {
                    let response = self.applied_response(s.meta.index, &r);
                    for id in self.calls.complete(call) {
                        self.reply(id, response.clone());
                    }
                }
                None => {
                    for id in ids {
                        self.calls.remove(id);
                        self.reply(id, unknown("a snapshot replaced the call's answer"));
                    }
                }
            }
        }
    }

    fn apply(&mut self, entry: &Entry) {
        let payload = match &entry.payload {
            EntryPayload::Command(data) => Some(data.as_slice()),
            EntryPayload::Noop | EntryPayload::Config(_) => None,
        };
        // An entry costs about its payload plus its framing and index in the log.
        self.applied_bytes_since_snapshot = self
            .applied_bytes_since_snapshot
            .saturating_add(payload.map_or(0, |p| p.len() as u64) + ENTRY_OVERHEAD_BYTES);
        let applied = self.services.apply_entry(entry.index, entry.term, payload);
        if !applied.cache.is_empty() {
            self.cache
                .applied(self.now.mono_ms, &applied.cache, self.services.cache());
        }
        if self.cfg.trace_applies {
            self.actions.push(Action::Event(NodeEvent::Applied {
                index: entry.index,
                term: entry.term,
                digest: self.services.digest(),
            }));
        }
        if self.tick_proposed.is_some_and(|i| i <= entry.index) {
            self.tick_proposed = None;
        }
        let mut committed_event = true;
        for (id, call) in self.calls.take_proposals(entry.index) {
            match (&applied.reply, applied.call) {
                (Some(reply), Some(call_ref)) if call.term == entry.term => {
                    if reply.is_waiting() {
                        let deadline = self.now.mono_ms + self.cfg.wait_limit_ms;
                        if self.calls.wait(id, call, call_ref, deadline) {
                            self.withdraw(call_ref);
                        }
                    } else {
                        if std::mem::take(&mut committed_event) {
                            let latency_ms = self.now.mono_ms.saturating_sub(call.started_ms);
                            self.actions
                                .push(Action::Event(NodeEvent::Committed { latency_ms }));
                        }
                        if !call.cancelled {
                            let response = self.applied_response(entry.index, reply);
                            self.reply(id, response);
                        }
                    }
                }
                _ => self.reply(id, unknown("another entry took its place in the log")),
            }
        }
        for c in applied.completions {
            let response = self.applied_response(entry.index, &c.reply);
            for id in self.calls.complete(c.call) {
                self.reply(id, response.clone());
            }
        }
    }

    fn serve_reads(&mut self) {
        for (id, query) in self.calls.reads_ready(self.services.applied()) {
            let reply = self.services.query_bytes(&query);
            let bytes = postcard::to_stdvec(&reply).unwrap_or_default();
            self.reply(id, ClientResponse::Read(bytes));
        }
    }

    /// Follow role changes: a new leader starts its office; one that lost leadership
    /// tells its proposers at once, so they retry at the new leader.
    fn note_leadership(&mut self) {
        let leader = self.raft.leader();
        if leader != self.last_leader {
            self.last_leader = leader;
            self.actions.push(Action::Event(NodeEvent::LeaderChanged {
                term: self.raft.term(),
                leader,
            }));
        }
        let leads = self.raft.role() == Role::Leader;
        match self.office {
            Some(o) if leads && o.term == self.raft.term() => {}
            _ if leads => {
                self.office = Some(Office {
                    term: self.raft.term(),
                    since_ms: self.now.mono_ms,
                });
                self.tick_proposed = None;
            }
            Some(_) => {
                self.office = None;
                self.tick_proposed = None;
                let commit = self.raft.status().commit;
                // (Only on losing leadership: status() copies the membership.)
                for id in self.calls.proposed_after(commit) {
                    self.reply(id, unknown("leadership changed before the entry committed"));
                }
                for id in self.calls.reads() {
                    self.reply(id, refusal(ProposeError::NotLeader { leader }));
                }
                // Waiting calls learn their outcome at the new leader: a retry of the same
                // session call finds it waiting there, or its final answer.
                for id in self.calls.waiting_all() {
                    self.reply(id, unknown("leadership changed while the call waited"));
                }
                // Nothing this office proposed can be joined any more.
                self.in_log.clear();
                self.in_log_by_index.clear();
            }
            None => {}
        }
    }

    /// Carry out what the cache agent asks: answer its calls, and send its commands to
    /// the log (proposed here when leading, else forwarded to the leader; without one
    /// they are dropped, and the agent sends them again).
    fn cache_duties(&mut self) {
        self.cache.flush(self.now.mono_ms, self.services.applied());
        for output in self.cache.take_outputs() {
            match output {
                AgentOutput::Reply { call, answer } => {
                    self.reply(call, ClientResponse::Local(encode_answer(&answer)));
                }
                AgentOutput::Propose(command) => {
                    if self.office_elapsed().is_some() {
                        let _ =
                            self.propose_envelope(Envelope::new(0, 0, 0, Command::Cache(command)));
                    } else if let Some(leader) = self.raft.leader() {
                        if leader != self.raft.id() {
                            let command = postcard::to_stdvec(&command).unwrap_or_default();
                            self.actions.push(Action::Send(Message {
                                from: self.raft.id(),
                                to: leader,
                                term: self.raft.term(),
                                body: MessageBody::Forward { command },
                            }));
                        }
                    }
                }
            }
        }
    }

    /// Current lock time as this leader counts it, once it has applied an entry of its
    /// own term (before that it does not know the term's base).
    fn lock_now(&self) -> Option<u64> {
        let clock = self.services.clock();
        let elapsed = self.office_elapsed()?;
        (clock.term == self.raft.term()).then(|| clock.base_ms.saturating_add(elapsed))
    }

    /// Propose a `Tick` once the services' next deadline has passed in lock time.
    fn leader_duties(&mut self) {
        if self.tick_proposed.is_some() {
            return;
        }
        let (Some(now), Some(deadline)) = (self.lock_now(), self.services.next_deadline_ms())
        else {
            return;
        };
        if deadline > now {
            return;
        }
        if let Ok(index) = self.propose_envelope(Envelope::new(0, 0, 0, Command::Tick)) {
            self.tick_proposed = Some(index);
        }
    }

    fn maybe_snapshot(&mut self) {
        let every = self.cfg.snapshot_every;
        let applied = self.services.applied();
        if every == 0
            || self.snapshotting
            || self.restoring.is_some()
            || applied < self.raft.snapshot_index() + every
        {
            return;
        }
        // The growth rule waits for the log to catch up with the last snapshot's size,
        // but never past SNAPSHOT_GROWTH_CEILING times the entry count: after a big
        // queue drains, the state is small and the last snapshot big, and the log
        // must not wait for a whole big snapshot's worth of small commands.
        let ceiling = self.raft.snapshot_index() + every.saturating_mul(SNAPSHOT_GROWTH_CEILING);
        // While a follower receives the snapshot, a newer one would restart its transfer
        // and compact away the entries it needs after it: with a steady trickle of
        // commands (cache lease renewals) and a slow link it would never catch up. The
        // leader waits (as etcd does while it sends snapshots), up to the ceiling.
        if self.raft.sending_snapshot() && applied < ceiling {
            return;
        }
        let last_bytes = self.raft.snapshot().map_or(0, |s| s.data.len() as u64);
        let pct = self
            .cfg
            .snapshot_log_growth_pct
            .min(MAX_SNAPSHOT_LOG_GROWTH_PCT);
        let due_bytes = last_bytes.saturating_mul(pct) / 100;
        if self.applied_bytes_since_snapshot < due_bytes && applied < ceiling {
            return;
        }
        self.applied_bytes_since_snapshot = 0;
        self.snapshotting = true;
        self.actions.push(Action::Snapshot(SnapshotView {
            index: applied,
            services: Box::new(self.services.clone()),
        }));
    }

    fn schedule_wake(&mut self) {
        let mut wake = self.last_tick_ms + self.cfg.tick_ms.max(1);
        if let Some(d) = self.calls.next_deadline() {
            wake = wake.min(d);
        }
        // Lock time runs with this leader's monotonic clock while it is in office.
        if let (Some(now), Some(deadline), None) = (
            self.lock_now(),
            self.services.next_deadline_ms(),
            self.tick_proposed,
        ) {
            // A deadline already passed means the Tick was refused (a transfer, or too
            // many uncommitted bytes): try again at the next Raft tick, never spin.
            if deadline > now {
                wake = wake.min(self.now.mono_ms + (deadline - now));
            }
        }
        if self.last_wake != Some(wake) {
            self.last_wake = Some(wake);
            self.actions.push(Action::WakeAt(wake));
        }
    }
}
