//! `Services`: every replicated service behind one state machine, the envelope their
//! commands travel in, the client sessions that make every call apply once, and lock
//! time.
//!
//! ```text
//!  Envelope { session, seq, ack, elapsed_ms, command }
//!     │ session 0: applied as is (ticks, withdrawals, opening a session)
//!     ├ unknown session (expired, never opened) ─> refused: open a new one
//!     ├ seq below the session's floor ──────────> refused: discarded (never re-executed)
//!     ├ seq already answered ───────────────────> the kept answer (Raft thesis 6.3)
//!     └ new: floor := ack (drops the answers the client has seen), apply, keep answer
//! ```
//! A call that waits (a queued lock acquire) keeps a *waiting* answer; when a later entry
//! grants, times out or withdraws it, the kept answer is replaced by the final one and a
//! [`Completion`] names the call, so the node answers exactly that call and a retry of
//! it gets the final answer. What is kept is bounded by the calls in flight: a client
//! acknowledges every answer below `ack`.
//!
//! **Lock time** (DESIGN.md section 6) is computed here from committed entries only: the
//! first entry of a new term fixes the term's base at the lock time reached so far, and
//! every command of that term carries the leader's monotonic milliseconds since it took
//! office. Lock time is `max(previous, base + elapsed)`: it never runs backwards, a
//! failover only lengthens leases, and no node's wall clock enters it.

use super::cache::{CacheCommand, CacheDirectory, CacheEvent};
use super::lock::{
    DeadlockRefusal, KeyView, LockCommand, LockEvent, LockReply, LockStats, LockTable, WaitId,
};
use super::queue::{DeadView, MsgId, QueueCommand, QueueEvent, QueueReply, QueueSet, QueueView};
use super::register::{Register, RegisterCommand, RegisterQuery, RegisterReply};
use super::StateMachine;
use crate::raft::{LogIndex, Term};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// A session idle this long (lock time) is forgotten.
pub const SESSION_IDLE_MS: u64 = 3_600_000;
/// Sessions kept at most; beyond it the least recently used is forgotten.
pub const MAX_SESSIONS: usize = 100_000;
/// Queues whose partitions get a `queue_depth` series each.
const MAX_QUEUES_IN_METRICS: usize = 32;
/// Unacknowledged calls one session may have at most.
pub const MAX_CALLS_PER_SESSION: usize = 1024;

/// A command of some service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// The register service.
    Register(RegisterCommand),
    /// The lock service.
    Lock(LockCommand),
    /// The queue service.
    Queue(QueueCommand),
    /// The cache directory (sent by a node's cache agent, with session 0: the
    /// directory numbers a node's requests itself).
    Cache(CacheCommand),
    /// Withdraw call (`session`, `seq`): what it waits for is given up.
    ///
    /// With `release_grant` its caller gave up on it for good (the gateway's HTTP caller
    /// went away, or its deadline passed): a grant that raced the withdrawal is released
    /// by its fencing token, and a call that has not arrived yet is answered "withdrawn"
    /// when it does, never applied. Without it (a node lost the connection the call came
    /// on, and the client may still be retrying it elsewhere) only a call that is still
    /// queued is withdrawn; a grant stays, since a retry may have reported it.
    Withdraw {
        /// The call's session.
        session: u64,
        /// The call's sequence number.
        seq: u64,
        /// Also release a grant that raced the withdrawal.
        release_grant: bool,
    },
    /// Only advance lock time: expire the leases and waits that ran out.
    Tick,
    /// Open a client session (propose it with session 0): the answer names it.
    OpenSession,
}

/// How a command travels in the log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// The caller's session (0: no deduplication).
    pub session: u64,
    /// The caller's sequence number within the session (from 1).
    pub seq: u64,
    /// The caller's lowest unanswered sequence number: every answer below it was seen
    /// and may be discarded.
    pub ack: u64,
    /// Stamped by the leader: its monotonic milliseconds since it took office.
    pub elapsed_ms: u64,
    /// What to do.
    pub command: Command,
}

impl Envelope {
    /// A call of `session` (callers leave the leader's stamp at 0).
    pub fn new(session: u64, seq: u64, ack: u64, command: Command) -> Self {
        Self {
            session,
            seq,
            ack,
            elapsed_ms: 0,
            command,
        }
    }
}

/// Why a session refused a call.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum SessionRefusal {
    /// The call's answer was acknowledged and discarded; it is not executed again.
    #[error(
        "call {seq} is below the session's acknowledged mark {floor}: its answer was discarded"
    )]
    Discarded {
        /// The call.
        seq: u64,
        /// The session's floor.
        floor: u64,
    },
    /// The session is unknown: it expired (idle for an hour, or the least recently used
    /// of too many), or was never opened. The call may be a retry of one whose answer
    /// is gone, so it is not executed: open a new session.
    #[error("session {session} is unknown or expired; open a new one")]
    Unknown {
        /// The session.
        session: u64,
    },
    /// Too many calls of the session are unacknowledged.
    #[error("session has {limit} unacknowledged calls")]
    TooManyCalls {
        /// The limit.
        limit: usize,
    },
}

/// The reply to a command.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    /// From the register.
    Register(RegisterReply),
    /// From the lock table.
    Lock(LockReply),
    /// From the queues.
    Queue(QueueReply),
    /// The cache directory applied a command (its outcomes are events every node
    /// sees, not a reply).
    Cached,
    /// The call was withdrawn (its caller went away), or a withdrawal was applied.
    Withdrawn,
    /// Time advanced.
    Ticked,
    /// A session was opened: use this id (the index of the entry that opened it).
    SessionOpened {
        /// The session.
        session: u64,
    },
    /// The session refused the call.
    Session(SessionRefusal),
    /// The entry did not decode.
    Invalid(String),
}

impl Reply {
    /// Whether the call that got this reply still waits for its outcome.
    pub fn is_waiting(&self) -> bool {
        match self {
            Self::Lock(r) => r.is_waiting(),
            Self::Queue(r) => r.is_waiting(),
            _ => false,
        }
    }
}

/// A read of some service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Query {
    /// The register.
    Register(RegisterQuery),
    /// One lock key.
    LockState {
        /// Key.
        key: String,
    },
    /// Every key held or waited on, up to `limit`.
    LockList {
        /// Most keys returned.
        limit: usize,
    },
    /// Counts of holders, waiters and deadlocks.
    LockStats,
    /// Queues (one, or every queue) with their partitions and ring.
    QueueStats {
        /// Only this queue.
        queue: Option<String>,
    },
    /// Dead letters of a queue, oldest first.
    QueueDead {
        /// Queue.
        queue: String,
        /// Most returned.
        limit: usize,
    },
    /// Every key held or waited on, up to `limit`, with the lock table's clock, so a
    /// reader can tell how much of each lease is left (the console's countdown).
    LockListAt {
        /// Most keys returned.
        limit: usize,
    },
}

/// The answer to a query.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum QueryReply {
    /// From the register.
    Register(RegisterReply),
    /// One key.
    LockState(KeyView),
    /// Many keys.
    LockList(Vec<KeyView>),
    /// The query did not decode.
    Invalid(String),
    /// Queues.
    QueueStats {
        /// Per queue.
        queues: Vec<QueueView>,
        /// The ring of the queue asked for: (point, partition) in ring order.
        ring: Vec<(u64, u32)>,
    },
    /// Dead letters.
    QueueDead(Vec<DeadView>),
    /// Lock counts.
    LockStats {
        /// Shared holds.
        shared: u64,
        /// Exclusive holds.
        exclusive: u64,
        /// Queued requests.
        waiters: u64,
        /// Requests refused for deadlock so far.
        deadlocks: u64,
    },
    /// Many keys, at the lock table's clock.
    LockListAt {
        /// The leader time of the last applied lock entry, ms (leases end at
        /// `expires_ms` on this clock).
        now_ms: u64,
        /// Requests refused for deadlock so far.
        deadlocks: u64,
        /// The newest of them, oldest first, with their cycles.
        recent_deadlocks: Vec<DeadlockRefusal>,
        /// The keys.
        keys: Vec<KeyView>,
    },
}

/// A call named by its session and sequence number (session 0: by its log index).
pub type CallRef = (u64, u64);

/// A call of an earlier entry that an applied entry answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Completion {
    /// The call.
    pub call: CallRef,
    /// Its final reply.
    pub reply: Reply,
}

/// What applying one entry produced.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// The call that proposed the entry (`None`: the entry carried no command).
    pub call: Option<CallRef>,
    /// Its reply.
    pub reply: Option<Reply>,
    /// Calls of earlier entries answered now.
    pub completions: Vec<Completion>,
    /// What the cache directory tells the nodes' cache agents.
    pub cache: Vec<CacheEvent>,
}

/// A gauge or counter for metrics, named as in DESIGN.md section 7.
#[derive(Clone, Debug, PartialEq)]
pub struct Gauge {
    /// Metric name.
    pub name: &'static str,
    /// A counter (only grows) rather than a gauge.
    pub counter: bool,
    /// Help text.
    pub help: &'static str,
    /// Labels (name, value); every gauge of one name has the same label names.
    pub labels: Vec<(&'static str, String)>,
    /// Value.
    pub value: f64,
}

/// What a kept call needs to be withdrawn later.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum Handle {
    /// A lock acquire; `granted` is the token of a grant made *for this call* (not the
    /// earlier grant an acquire of what one holds answers with), the only one a
    /// withdrawal may release.
    Lock {
        key: String,
        client: String,
        granted: Option<u64>,
    },
    /// A dequeue; `delivered` is what was leased to this call alone (a withdrawal makes
    /// it visible again).
    Queue {
        queue: String,
        delivered: Vec<(MsgId, u64)>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct KeptCall {
    reply: Reply,
    handle: Option<Handle>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Session {
    /// Calls below this were acknowledged; their answers are gone.
    floor: u64,
    calls: BTreeMap<u64, KeptCall>,
    last_ms: u64,
}

/// Lock time, from committed entries only (see the module docs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockClock {
    /// Term of the latest applied entry.
    pub term: Term,
    /// Lock time when that term's first entry applied.
    pub base_ms: u64,
    /// Lock time now.
    pub now_ms: u64,
}

/// Every service, as one state machine.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Services {
    register: Register,
    locks: LockTable,
    queues: QueueSet,
    cache: CacheDirectory,
    sessions: BTreeMap<u64, Session>,
    /// (last use, session): the least recently used session first.
    sessions_by_use: BTreeSet<(u64, u64)>,
    /// The calls each queued lock request or waiting dequeue answers (both are named
    /// by the index of the entry that queued them, so they never collide).
    waits: BTreeMap<WaitId, Vec<CallRef>>,
    clock: LockClock,
    applied: LogIndex,
}

/// Snapshot bytes that do not decode.
#[derive(Debug, thiserror::Error)]
#[error("services snapshot does not decode: {0}")]
pub struct ServicesRestoreError(String);

/// The first bytes of every state snapshot.
const SNAPSHOT_MAGIC: &[u8; 4] = b"SMST";
/// The layout of the state after [`SNAPSHOT_MAGIC`]: raised whenever a change to any
/// service's state changes its encoding, so that a node never decodes a snapshot into
/// the wrong fields (postcard is not self-describing) but says which build it needs.
pub const SNAPSHOT_FORMAT: u16 = 4;

/// Fold lock events into completions of the calls they answer.
fn lock_completions(
    waits: &mut BTreeMap<WaitId, Vec<CallRef>>,
    sessions: &mut BTreeMap<u64, Session>,
    events: Vec<LockEvent>,
    out: &mut Vec<Completion>,
) {
    for event in events {
        let (wait, reply) = match event {
            LockEvent::Granted {
                wait,
                token,
                mode,
                expires_ms,
                expires_in_ms,
                ttl_ms,
                ..
            } => (
                wait,
                LockReply::Granted {
                    token,
                    mode,
                    expires_ms,
                    expires_in_ms,
                    ttl_ms,
                },
            ),
            LockEvent::TimedOut { wait, holders, .. } => (wait, LockReply::TimedOut { holders }),
            LockEvent::Expired { .. } => continue,
        };
        complete(waits, sessions, wait, &Reply::Lock(reply), out);
    }
}

/// Fold queue events into completions of the calls they answer.
fn queue_completions(
    waits: &mut BTreeMap<WaitId, Vec<CallRef>>,
    sessions: &mut BTreeMap<u64, Session>,
    events: Vec<QueueEvent>,
    out: &mut Vec<Completion>,
) {
    for event in events {
        let (wait, messages) = match event {
            QueueEvent::Delivered { wait, messages } => (wait, messages),
            QueueEvent::TimedOut { wait } => (wait, Vec::new()),
        };
        complete(
            waits,
            sessions,
            wait,
            &Reply::Queue(QueueReply::Delivered { messages }),
            out,
        );
    }
}

/// Answer every call waiting on `wait` with `reply`, and keep it as their answer.
fn complete(
    waits: &mut BTreeMap<WaitId, Vec<CallRef>>,
    sessions: &mut BTreeMap<u64, Session>,
    wait: WaitId,
    reply: &Reply,
    out: &mut Vec<Completion>,
) {
    let calls = waits.remove(&wait).unwrap_or_default();
    // A grant heard by several calls (the same request made twice) belongs to none of
    // them alone: withdrawing one of them must not release it.
    let single = calls.len() == 1;
    let token = match reply {
        Reply::Lock(LockReply::Granted { token, .. }) if single => Some(*token),
        _ => None,
    };
    for call in calls {
        if let Some(kept) = sessions
            .get_mut(&call.0)
            .and_then(|s| s.calls.get_mut(&call.1))
        {
            kept.reply = reply.clone();
            match (&mut kept.handle, reply) {
                (Some(Handle::Lock { granted, .. }), _) => *granted = token,
                (
                    Some(Handle::Queue { delivered, .. }),
                    Reply::Queue(QueueReply::Delivered { messages }),
                ) if single => {
                    *delivered = messages.iter().map(|m| (m.id, m.receipt)).collect();
                }
                _ => {}
            }
        }
        out.push(Completion {
            call,
            reply: reply.clone(),
        });
    }
}

impl Services {
    /// The lock table (for reads).
    pub fn locks(&self) -> &LockTable {
        &self.locks
    }

    /// The cache directory (for the nodes' cache agents and reads).
    pub fn cache(&self) -> &CacheDirectory {
        &self.cache
    }

    /// Lock time as committed entries define it.
    pub fn clock(&self) -> LockClock {
        self.clock
    }

    /// Sessions kept.
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// Answers kept over every session.
    pub fn kept_calls(&self) -> usize {
        self.sessions.values().map(|s| s.calls.len()).sum()
    }

    /// Check every deadlock decision against the reference search (the simulator's
    /// oracle); see [`LockTable::set_audit`].
    pub fn set_audit(&mut self, on: bool) {
        self.locks.set_audit(on);
    }

    /// The queues (for reads).
    pub fn queues(&self) -> &QueueSet {
        &self.queues
    }

    /// Lock statistics.
    pub fn lock_stats(&self) -> &LockStats {
        self.locks.stats()
    }

    /// The kept answer of a call, if any.
    pub fn kept_reply(&self, call: CallRef) -> Option<&Reply> {
        self.sessions
            .get(&call.0)
            .and_then(|s| s.calls.get(&call.1))
            .map(|c| &c.reply)
    }

    /// A hash of the whole replicated state (sessions and lock time included), to
    /// compare replicas.
    pub fn digest(&self) -> u64 {
        let mut h: u64 = 0xCBF2_9CE4_8422_2325;
        for b in postcard::to_stdvec(self).unwrap_or_default() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01B3);
        }
        h
    }

    /// Last applied index.
    pub fn applied(&self) -> LogIndex {
        self.applied
    }

    /// The earliest lock time at which some service has something to expire: the leader
    /// proposes a [`Command::Tick`] once it has passed.
    pub fn next_deadline_ms(&self) -> Option<u64> {
        [
            self.locks.next_deadline_ms(),
            self.queues.next_deadline_ms(),
            self.cache.next_deadline_ms(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Gauges for metrics.
    pub fn gauges(&self) -> Vec<Gauge> {
        let (shared, exclusive, waiters) = self.locks.counts();
        let g = |name: &'static str, help, labels: &[(&'static str, &str)], value: f64| Gauge {
            name,
            counter: name.ends_with("_total"),
            help,
            labels: labels.iter().map(|(k, v)| (*k, (*v).to_owned())).collect(),
            value,
        };
        let (_, inflight, dead) = self.queues.counts();
        let q = self.queues.stats();
        let mut out = vec![
            g(
                "lock_held",
                "Locks held, by mode",
                &[("mode", "S")],
                shared as f64,
            ),
            g(
                "lock_held",
                "Locks held, by mode",
                &[("mode", "X")],
                exclusive as f64,
            ),
            g("lock_waiters", "Queued lock requests", &[], waiters as f64),
            g(
                "lock_deadlocks_total",
                "Lock requests refused for deadlock",
                &[],
                self.locks.deadlocks() as f64,
            ),
            g(
                "sessions",
                "Client sessions kept",
                &[],
                self.sessions.len() as f64,
            ),
            g(
                "queue_inflight",
                "Messages leased and not yet acked",
                &[],
                inflight as f64,
            ),
            g(
                "queue_dead_letters",
                "Messages in the dead-letter lists",
                &[],
                dead as f64,
            ),
            g(
                "queue_enqueued_total",
                "Messages stored",
                &[],
                q.enqueued as f64,
            ),
            g("queue_acked_total", "Messages acked", &[], q.acked as f64),
            g(
                "queue_redeliveries_total",
                "Deliveries after a message's first",
                &[],
                q.redeliveries as f64,
            ),
        ];
        self.queue_depths(&mut out);
        out
    }

    /// `queue_depth` per partition, for the first queues only: a series per partition
    /// of a thousand queues would swamp a scrape.
    fn queue_depths(&self, out: &mut Vec<Gauge>) {
        for view in self.queues.first_views(MAX_QUEUES_IN_METRICS) {
            for p in &view.partitions {
                out.push(Gauge {
                    name: "queue_depth",
                    counter: false,
                    help: "Visible messages, by queue and partition",
                    labels: vec![
                        ("queue", view.name.clone()),
                        ("partition", p.partition.to_string()),
                    ],
                    value: p.depth as f64,
                });
            }
        }
    }

    /// Apply the entry at `index` of `term`; `payload` is its command bytes (`None`: an
    /// entry that carries no command, a no-op or a membership change).
    pub fn apply_entry(&mut self, index: LogIndex, term: Term, payload: Option<&[u8]>) -> Applied {
        self.applied = index;
        if term > self.clock.term {
            self.clock.term = term;
            self.clock.base_ms = self.clock.now_ms;
        }
        let Some(bytes) = payload else {
            return Applied::default();
        };
        match postcard::from_bytes::<Envelope>(bytes) {
            Ok(envelope) => self.apply_envelope(index, envelope),
            Err(e) => Applied {
                call: None,
                reply: Some(Reply::Invalid(e.to_string())),
                ..Applied::default()
            },
        }
    }

    /// Answer encoded query bytes.
    pub fn query_bytes(&self, bytes: &[u8]) -> QueryReply {
        match postcard::from_bytes::<Query>(bytes) {
            Ok(Query::Register(q)) => QueryReply::Register(self.register.query(&q)),
            Ok(Query::LockState { key }) => QueryReply::LockState(self.locks.view(&key)),
            Ok(Query::LockList { limit }) => {
                QueryReply::LockList(self.locks.list(limit.min(10_000)))
            }
            Ok(Query::LockListAt { limit }) => QueryReply::LockListAt {
                now_ms: self.locks.now_ms(),
                deadlocks: self.locks.deadlocks(),
                recent_deadlocks: self.locks.recent_deadlocks().cloned().collect(),
                keys: self.locks.list(limit.min(10_000)),
            },
            Ok(Query::LockStats) => {
                let (shared, exclusive, waiters) = self.locks.counts();
                QueryReply::LockStats {
                    shared: shared as u64,
                    exclusive: exclusive as u64,
                    waiters: waiters as u64,
                    deadlocks: self.locks.deadlocks(),
                }
            }
            Ok(Query::QueueStats { queue }) => {
                let queues = match &queue {
                    Some(name) => self.queues.view(name).into_iter().collect(),
                    None => self.queues.views(),
                };
                let ring = queue
                    .as_deref()
                    .and_then(|name| self.queues.ring(name))
                    .map(|r| r.points().to_vec())
                    .unwrap_or_default();
                QueryReply::QueueStats { queues, ring }
            }
            Ok(Query::QueueDead { queue, limit }) => {
                QueryReply::QueueDead(self.queues.dead(&queue, limit.min(1_000)))
            }
            Err(e) => QueryReply::Invalid(e.to_string()),
        }
    }

    fn apply_envelope(&mut self, index: LogIndex, e: Envelope) -> Applied {
        let stamped = self.clock.base_ms.saturating_add(e.elapsed_ms);
        self.clock.now_ms = self.clock.now_ms.max(stamped);
        let now = self.clock.now_ms;
        let mut completions = Vec::new();
        self.expire_sessions(index, now, &mut completions);
        let events = self.locks.advance(index, now);
        lock_completions(
            &mut self.waits,
            &mut self.sessions,
            events,
            &mut completions,
        );
        let events = self.queues.advance(now);
        queue_completions(
            &mut self.waits,
            &mut self.sessions,
            events,
            &mut completions,
        );
        let mut cache = Vec::new();
        self.cache.advance(index, now, &mut cache);
        if let Command::Cache(cmd) = e.command {
            // Not a session call: the directory deduplicates a node's requests itself.
            self.cache.apply(index, now, cmd, &mut cache);
            return Applied {
                call: Some((0, index)),
                reply: Some(Reply::Cached),
                completions,
                cache,
            };
        }
        let call = if e.session == 0 {
            (0, index)
        } else {
            (e.session, e.seq)
        };
        let reply = if e.session == 0 {
            self.execute(index, call, e.command, &mut completions).0
        } else {
            self.apply_in_session(index, now, e, &mut completions)
        };
        Applied {
            call: Some(call),
            reply: Some(reply),
            completions,
            cache,
        }
    }

    fn apply_in_session(
        &mut self,
        index: LogIndex,
        now: u64,
        e: Envelope,
        completions: &mut Vec<Completion>,
    ) -> Reply {
        if !self.sessions.contains_key(&e.session) {
            return Reply::Session(SessionRefusal::Unknown { session: e.session });
        }
        self.touch_session(e.session, now);
        let Some(session) = self.sessions.get(&e.session) else {
            return Reply::Session(SessionRefusal::Unknown { session: e.session });
        };
        if e.seq < session.floor {
            return Reply::Session(SessionRefusal::Discarded {
                seq: e.seq,
                floor: session.floor,
            });
        }
        if let Some(kept) = session.calls.get(&e.seq) {
            return kept.reply.clone();
        }
        self.acknowledge(index, e.session, e.ack.min(e.seq), completions);
        if self
            .sessions
            .get(&e.session)
            .is_some_and(|s| s.calls.len() >= MAX_CALLS_PER_SESSION)
        {
            return Reply::Session(SessionRefusal::TooManyCalls {
                limit: MAX_CALLS_PER_SESSION,
            });
        }
        let call = (e.session, e.seq);
        let (reply, handle) = self.execute(index, call, e.command, completions);
        if let Some(session) = self.sessions.get_mut(&e.session) {
            session.calls.insert(
                e.seq,
                KeptCall {
                    reply: reply.clone(),
                    handle,
                },
            );
        }
        reply
    }

    /// Run one command for `call`: its reply, and what would withdraw it later.
    fn execute(
        &mut self,
        index: LogIndex,
        call: CallRef,
        command: Command,
        completions: &mut Vec<Completion>,
    ) -> (Reply, Option<Handle>) {
        let now = self.clock.now_ms;
        match command {
            Command::Register(cmd) => (Reply::Register(self.register.apply(index, cmd)), None),
            Command::Lock(cmd) => {
                let mut handle = match &cmd {
                    LockCommand::Acquire { key, client, .. } => Some(Handle::Lock {
                        key: key.clone(),
                        client: client.clone(),
                        granted: None,
                    }),
                    _ => None,
                };
                let (reply, events) = self.locks.apply(index, now, cmd);
                if let (LockReply::Granted { token, .. }, Some(Handle::Lock { granted, .. })) =
                    (&reply, &mut handle)
                {
                    // Tokens are the index of the granting entry: this entry granted it.
                    *granted = (*token == index).then_some(index);
                }
                if let LockReply::Queued { wait } = reply {
                    self.waits.entry(wait).or_default().push(call);
                }
                lock_completions(&mut self.waits, &mut self.sessions, events, completions);
                (Reply::Lock(reply), handle)
            }
            Command::Queue(cmd) => {
                let mut handle = match &cmd {
                    QueueCommand::Dequeue { queue, .. } => Some(Handle::Queue {
                        queue: queue.clone(),
                        delivered: Vec::new(),
                    }),
                    _ => None,
                };
                let (reply, events) = self.queues.apply(index, now, cmd);
                match (&reply, &mut handle) {
                    (QueueReply::Delivered { messages }, Some(Handle::Queue { delivered, .. })) => {
                        *delivered = messages.iter().map(|m| (m.id, m.receipt)).collect();
                    }
                    (QueueReply::Waiting { wait }, _) => {
                        self.waits.entry(*wait).or_default().push(call);
                    }
                    _ => {}
                }
                queue_completions(&mut self.waits, &mut self.sessions, events, completions);
                (Reply::Queue(reply), handle)
            }
            Command::Withdraw {
                session,
                seq,
                release_grant,
            } => {
                self.withdraw(index, (session, seq), release_grant, completions);
                (Reply::Withdrawn, None)
            }
            Command::Tick => (Reply::Ticked, None),
            // Applied before sessions are looked at (see `apply_envelope`).
            Command::Cache(_) => (Reply::Cached, None),
            Command::OpenSession => {
                self.open_session(index, index, now, completions);
                (Reply::SessionOpened { session: index }, None)
            }
        }
    }

    /// Withdraw call `target` (see [`Command::Withdraw`]).
    fn withdraw(
        &mut self,
        index: LogIndex,
        target: CallRef,
        release_grant: bool,
        completions: &mut Vec<Completion>,
    ) {
        let (session_id, seq) = target;
        if session_id == 0
            || (!release_grant && self.kept_reply(target).is_none_or(|r| !r.is_waiting()))
        {
            return;
        }
        let Some(session) = self.sessions.get_mut(&session_id) else {
            return;
        };
        if seq < session.floor {
            return;
        }
        let Some(kept) = session.calls.get_mut(&seq) else {
            // Not arrived yet: when it does, it is answered "withdrawn" and not applied.
            // Only for a call that can still come (a client has at most
            // MAX_CALLS_PER_SESSION in flight above its floor), and within the session's
            // bound, so withdrawals naming made-up calls cannot grow the table.
            let window = session.floor.saturating_add(MAX_CALLS_PER_SESSION as u64);
            if seq >= window || session.calls.len() >= MAX_CALLS_PER_SESSION {
                return;
            }
            session.calls.insert(
                seq,
                KeptCall {
                    reply: Reply::Withdrawn,
                    handle: None,
                },
            );
            return;
        };
        let previous = std::mem::replace(&mut kept.reply, Reply::Withdrawn);
        let handle = kept.handle.take();
        match handle {
            Some(Handle::Lock {
                key,
                client,
                granted,
            }) => {
                let grant = granted.map(|token| (client, token));
                self.withdraw_lock(index, target, previous, &key, grant, completions);
            }
            Some(Handle::Queue { queue, delivered }) => {
                self.withdraw_dequeue(target, previous, &queue, &delivered, completions);
            }
            None => kept.reply = previous,
        }
    }

    /// Withdraw a lock acquire whose kept answer was `previous`; `grant` is the
    /// (client, token) of a grant made for this call alone.
    fn withdraw_lock(
        &mut self,
        index: LogIndex,
        target: CallRef,
        previous: Reply,
        key: &str,
        grant: Option<(String, u64)>,
        completions: &mut Vec<Completion>,
    ) {
        let (session_id, seq) = target;
        let events = match previous {
            Reply::Lock(LockReply::Queued { wait }) => {
                // Only this call gives up; another call of the same request still waits.
                completions.push(Completion {
                    call: target,
                    reply: Reply::Withdrawn,
                });
                if self.leave_wait(wait, target) {
                    self.locks.withdraw_wait(index, key, wait)
                } else {
                    None
                }
            }
            Reply::Lock(LockReply::Granted { mode, .. }) => match grant {
                Some((client, token)) => {
                    self.locks.withdraw_grant(index, key, &client, token, mode)
                }
                // It answered a grant made before it: that one belongs to another call.
                None => None,
            },
            other => {
                if let Some(kept) = self
                    .sessions
                    .get_mut(&session_id)
                    .and_then(|s| s.calls.get_mut(&seq))
                {
                    kept.reply = other;
                }
                None
            }
        };
        lock_completions(
            &mut self.waits,
            &mut self.sessions,
            events.unwrap_or_default(),
            completions,
        );
    }

    /// `call` stops waiting on `wait`: whether no call waits on it any more (then the
    /// service's own wait is to be withdrawn too).
    fn leave_wait(&mut self, wait: WaitId, call: CallRef) -> bool {
        let Some(calls) = self.waits.get_mut(&wait) else {
            return false;
        };
        calls.retain(|c| *c != call);
        let last = calls.is_empty();
        if last {
            self.waits.remove(&wait);
        }
        last
    }

    /// Withdraw a dequeue whose kept answer was `previous`: a waiting one stops waiting;
    /// one that was delivered gives its messages back (nobody received them).
    fn withdraw_dequeue(
        &mut self,
        target: CallRef,
        previous: Reply,
        queue: &str,
        delivered: &[(MsgId, u64)],
        completions: &mut Vec<Completion>,
    ) {
        match previous {
            Reply::Queue(QueueReply::Waiting { wait }) => {
                completions.push(Completion {
                    call: target,
                    reply: Reply::Withdrawn,
                });
                if self.leave_wait(wait, target) {
                    self.queues.withdraw_wait(queue, wait);
                }
            }
            Reply::Queue(QueueReply::Delivered { .. }) => {
                let events = self.queues.withdraw_deliveries(queue, delivered);
                queue_completions(&mut self.waits, &mut self.sessions, events, completions);
            }
            other => {
                if let Some(kept) = self
                    .sessions
                    .get_mut(&target.0)
                    .and_then(|s| s.calls.get_mut(&target.1))
                {
                    kept.reply = other;
                }
            }
        }
    }

    /// The client saw every answer below `ack`: drop them. A call dropped while it still
    /// waits was given up by its client: its wait is withdrawn.
    fn acknowledge(
        &mut self,
        index: LogIndex,
        session_id: u64,
        ack: u64,
        completions: &mut Vec<Completion>,
    ) {
        let Some(session) = self.sessions.get_mut(&session_id) else {
            return;
        };
        if ack <= session.floor {
            return;
        }
        session.floor = ack;
        let kept = session.calls.split_off(&ack);
        let dropped = std::mem::replace(&mut session.calls, kept);
        for (seq, call) in dropped {
            self.abandon(index, (session_id, seq), call, completions);
        }
    }

    /// A kept call is forgotten; if it still waits, nobody will hear its outcome.
    fn abandon(
        &mut self,
        index: LogIndex,
        call: CallRef,
        kept: KeptCall,
        completions: &mut Vec<Completion>,
    ) {
        let (wait, key) = match (kept.reply, kept.handle) {
            (Reply::Lock(LockReply::Queued { wait }), Some(Handle::Lock { key, .. })) => {
                (wait, key)
            }
            (Reply::Queue(QueueReply::Waiting { wait }), Some(Handle::Queue { queue, .. })) => {
                if self.leave_wait(wait, call) {
                    self.queues.withdraw_wait(&queue, wait);
                }
                return;
            }
            _ => return,
        };
        if self.leave_wait(wait, call) {
            let events = self.locks.withdraw_wait(index, &key, wait);
            lock_completions(
                &mut self.waits,
                &mut self.sessions,
                events.unwrap_or_default(),
                completions,
            );
        }
    }

    fn open_session(
        &mut self,
        index: LogIndex,
        session: u64,
        now: u64,
        completions: &mut Vec<Completion>,
    ) {
        while self.sessions.len() >= MAX_SESSIONS {
            let Some((_, oldest)) = self.sessions_by_use.first().copied() else {
                break;
            };
            self.close_session(index, oldest, completions);
        }
        self.sessions.insert(
            session,
            Session {
                floor: 1,
                calls: BTreeMap::new(),
                last_ms: now,
            },
        );
        self.sessions_by_use.insert((now, session));
    }

    fn touch_session(&mut self, session: u64, now: u64) {
        if let Some(s) = self.sessions.get_mut(&session) {
            self.sessions_by_use.remove(&(s.last_ms, session));
            s.last_ms = now;
            self.sessions_by_use.insert((now, session));
        }
    }

    fn close_session(&mut self, index: LogIndex, session: u64, completions: &mut Vec<Completion>) {
        let Some(s) = self.sessions.remove(&session) else {
            return;
        };
        self.sessions_by_use.remove(&(s.last_ms, session));
        for (seq, call) in s.calls {
            // A call still waiting is answered now: nobody would answer it later.
            if call.reply.is_waiting() {
                completions.push(Completion {
                    call: (session, seq),
                    reply: Reply::Session(SessionRefusal::Unknown { session }),
                });
            }
            self.abandon(index, (session, seq), call, completions);
        }
    }

    /// Forget sessions idle for [`SESSION_IDLE_MS`] of lock time.
    fn expire_sessions(&mut self, index: LogIndex, now: u64, completions: &mut Vec<Completion>) {
        while let Some(&(last, session)) = self.sessions_by_use.first() {
            if last.saturating_add(SESSION_IDLE_MS) > now {
                break;
            }
            self.close_session(index, session, completions);
        }
    }
}

impl StateMachine for Services {
    type Command = Envelope;
    type Reply = Applied;
    type RestoreError = ServicesRestoreError;

    /// Apply a command as an entry of the current term (tests and tools; the node calls
    /// [`Services::apply_entry`] with the entry's own term).
    fn apply(&mut self, index: LogIndex, e: Envelope) -> Applied {
        self.applied = index;
        self.apply_envelope(index, e)
    }

    fn snapshot(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        out.extend_from_slice(SNAPSHOT_MAGIC);
        out.extend_from_slice(&SNAPSHOT_FORMAT.to_le_bytes());
        // Encoding maps of plain data into a Vec cannot fail; if it ever did, the empty
        // result is refused by `Node::snapshot_encoded` and nothing is compacted.
        postcard::to_extend(self, out).unwrap_or_default()
    }

    fn restore(&mut self, data: &[u8]) -> Result<(), ServicesRestoreError> {
        let body = data.strip_prefix(SNAPSHOT_MAGIC.as_slice()).ok_or_else(|| {
            ServicesRestoreError(
                "not a syncmesh state snapshot (no format header: written by a build older than format 1, or damaged)".into(),
            )
        })?;
        let (version, body) = body.split_first_chunk::<2>().ok_or_else(|| {
            ServicesRestoreError("the snapshot ends inside its format header".into())
        })?;
        let version = u16::from_le_bytes(*version);
        if version != SNAPSHOT_FORMAT {
            return Err(ServicesRestoreError(format!(
                "the snapshot is in state format {version}; this build reads format {SNAPSHOT_FORMAT} (run the build that wrote it, or one that reads both)"
            )));
        }
        *self = postcard::from_bytes(body).map_err(|e| ServicesRestoreError(e.to_string()))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
