//! `CacheAgent`: one node's half of the MESI cache, driven by the node core.
//!
//! ```text
//!  call(get/put/del/evict) ─┐                           ┌─> Reply(call, answer)
//!  applied(directory events)┼──> CacheAgent { lines,    ├─> Propose(CacheCommand): the node
//!  tick(now)               ─┘     lease, requests in    │   core proposes it (leader) or
//!                                 flight, write-backs } │   forwards it to the leader
//! ```
//! A get on a line held in M, E or S, and a write-back put on a line held in M or E, are
//! answered from memory with no directory traffic, but only while the node's lease is
//! valid by its own monotonic clock. The lease is renewed for all lines at once: a
//! renewal sent at `t` with the node's applied index, once it counts, makes the lease
//! valid until `t + lease × (1 − margin)` (the directory counts its lease from when the
//! renewal applied, later than `t`; the margin covers clocks that run at different
//! rates). Everything else is a request to the directory, numbered, resent under the
//! same number until its outcome arrives, and answered when this node applies that
//! outcome: the agent learns every answer from the log it applies anyway.
//!
//! Write-back puts are acknowledged only while the oldest write not yet confirmed
//! written back is younger than `writeback_ms`; dirty lines are written back once they
//! are a quarter of that old, so a node that can still reach the leader never stalls,
//! and one cut off stops acknowledging within the window: a crash or a partition loses
//! at most `writeback_ms` of acknowledged writes.
//!
//! It is pure: time comes in with every call, and nothing here reads a clock, a socket
//! or a disk. A restarted node's agent starts empty (every line I) and registers anew,
//! which makes the directory forget what the earlier process held.

use super::directory::{
    CacheCommand, CacheDirectory, CacheEvent, CacheOp, CacheRefusal, Grant, Keep, KeyDirView,
    Outcome, RevokeMode, WriteBackLine, WriteBackRefusal, Written, MAX_KEY_BYTES, MAX_VALUE_BYTES,
};
use super::lines::{CacheLines, Evicted, Fill, Line, Mesi};
use crate::raft::{LogIndex, NodeId};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, VecDeque};

/// Directory requests one agent has in flight at most.
pub const MAX_PENDING: usize = 10_000;
/// Calls waiting (for the lease, the write-back window, or a line being written back).
pub const MAX_WAITING_CALLS: usize = 10_000;
/// Given-up lines held here until the directory applied their write-back. Past it, a
/// call that needs a new line waits (hits on held lines and deletes still go on): lines given up
/// are values in memory outside the LRU bound, so they are bounded too.
pub const MAX_RELEASING: usize = 4096;
/// Evict calls that wait on one given-up line at most (past it, 429): with
/// `MAX_RELEASING` this bounds every evict call held here.
pub const MAX_EVICTS_PER_LINE: usize = 64;
/// Lines one write-back command carries at most.
const MAX_LINES_PER_WRITEBACK: usize = 256;
/// Value bytes one write-back command carries at most (one line may exceed it alone).
const MAX_WRITEBACK_BYTES: usize = 1 << 20;
/// Renewals remembered (by number, with when they were sent).
const RENEWALS_KEPT: usize = 64;

/// Settings of a node's cache.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CacheConfig {
    /// Lines held at most.
    pub max_entries: usize,
    /// Key and value bytes held at most.
    pub max_bytes: u64,
    /// A write-back put is acknowledged only while the oldest write not yet written
    /// back is younger than this.
    pub writeback_ms: u64,
    /// How much of the lease the node gives up for clock-rate differences, in percent.
    pub clock_margin_pct: u64,
    /// Puts are durable unless they say otherwise.
    pub durable_default: bool,
    /// A call waits at most this long.
    pub call_timeout_ms: u64,
    /// A request or write-back not answered within this is sent again.
    pub resend_ms: u64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            max_entries: 100_000,
            max_bytes: 256 << 20,
            writeback_ms: 100,
            clock_margin_pct: 10,
            durable_default: false,
            call_timeout_ms: 5_000,
            resend_ms: 300,
        }
    }
}

/// A call to a node's cache (what `POST /cache/*` asks).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CacheCall {
    /// Read a key.
    Get {
        /// The key.
        key: String,
    },
    /// Write a key.
    Put {
        /// The key.
        key: String,
        /// The value's JSON text.
        value: Vec<u8>,
        /// Time to live.
        ttl_ms: Option<u64>,
        /// Acknowledge only once committed in the directory (default: the node's).
        durable: Option<bool>,
    },
    /// Delete a key everywhere.
    Delete {
        /// The key.
        key: String,
    },
    /// Flush one line from this node (written back first if M).
    Evict {
        /// The key.
        key: String,
    },
    /// This node's line of a key, and the directory's record as this node applied it.
    State {
        /// The key.
        key: String,
    },
    /// This node's counters.
    Stats,
    /// This node's valid lines (key, state), keys in order, up to `limit` (at most
    /// [`MAX_LINES_LISTED`]): the console's matrix.
    Lines {
        /// Most lines returned.
        limit: usize,
    },
}

/// Most lines one [`CacheCall::Lines`] answers.
pub const MAX_LINES_LISTED: usize = 1024;

/// Why a cache call failed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum CacheError {
    /// Not done; try again (no leader, the node's lease is not valid, not registered).
    #[error("{0}")]
    Unavailable(String),
    /// It may or may not have been done.
    #[error("{0}")]
    Unknown(String),
    /// A bound is reached.
    #[error("{0}")]
    Full(String),
    /// Malformed.
    #[error("{0}")]
    Invalid(String),
}

/// This node's line of a key, for `GET /cache/state`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LineView {
    /// Its state (Invalid while the lease is not valid).
    pub state: Mesi,
    /// The version it was filled at or last written back under.
    pub version: u64,
    /// The ownership epoch it is held under.
    pub epoch: u64,
    /// Whether it holds a write not yet written back.
    pub dirty: bool,
}

/// What a node's cache counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheStats {
    /// Gets answered from memory.
    pub hits: u64,
    /// Gets that went to the directory.
    pub misses: u64,
    /// Lines dropped because the directory revoked them.
    pub invalidations: u64,
    /// Values written back and accepted.
    pub writebacks: u64,
    /// Write-backs refused (stale epoch, or the directory full).
    pub writeback_refusals: u64,
    /// Lines evicted (LRU or on request).
    pub evictions: u64,
    /// Lines whose TTL ran out here.
    pub expirations: u64,
    /// Lines filled from the directory.
    pub fills: u64,
    /// Puts acknowledged from memory (no directory traffic).
    pub local_puts: u64,
    /// Requests sent to the directory (first sends, not resends).
    pub requests: u64,
    /// Renewals that counted.
    pub renewals: u64,
    /// Lines held now: M, E, S.
    pub lines: [u64; 3],
    /// Whether the lease is valid now.
    pub lease_valid: bool,
}

/// The answer to a [`CacheCall`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CacheAnswer {
    /// A get.
    Got {
        /// Whether there was a value.
        hit: bool,
        /// It.
        value: Option<Vec<u8>>,
        /// The line's state here after the get.
        state: Mesi,
    },
    /// A put was acknowledged; the line's state here.
    Put {
        /// M (write-back) or E (durable).
        state: Mesi,
    },
    /// The key is deleted everywhere.
    Deleted,
    /// The line left this node (written back first if it was M).
    Evicted {
        /// What it was.
        was: Mesi,
        /// Its writes were not stored: the directory refused the write-back as stale
        /// (the node's lease had run out and the key was granted on).
        lost: bool,
    },
    /// A key's state.
    State {
        /// This node's line (`None`: I).
        line: Option<LineView>,
        /// The directory's record, as this node applied it.
        directory: Option<KeyDirView>,
    },
    /// The counters.
    Stats(CacheStats),
    /// Valid lines, keys in order.
    Lines(Vec<(String, Mesi)>),
    /// Failed.
    Error(CacheError),
}

/// What the agent asks the node core to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AgentOutput {
    /// Answer a call.
    Reply {
        /// The call.
        call: u64,
        /// The answer.
        answer: CacheAnswer,
    },
    /// Propose this command (at the leader), or forward it to the leader.
    Propose(CacheCommand),
}

/// What a call waits for before it can go on.
#[derive(Clone, Debug)]
enum Task {
    Get {
        key: String,
    },
    Put {
        key: String,
        value: Vec<u8>,
        ttl_ms: Option<u64>,
        durable: bool,
    },
    Delete {
        key: String,
    },
    /// A write granted M: acknowledged once the lease and the window allow, if the line
    /// still holds this write.
    Ack {
        key: String,
        stamp: u64,
    },
}

impl Task {
    fn key(&self) -> &str {
        match self {
            Self::Get { key } | Self::Put { key, .. } | Self::Delete { key } => key,
            Self::Ack { key, .. } => key,
        }
    }
}

#[derive(Clone, Debug)]
struct Waiting {
    call: u64,
    task: Task,
    deadline_ms: u64,
}

/// A directory request in flight.
#[derive(Clone, Debug)]
struct Pending {
    /// `None`: its caller was answered already (timed out, or went away).
    call: Option<u64>,
    key: String,
    op: CacheOp,
    /// For a write-back put, the value to hold once granted.
    put: Option<(Vec<u8>, Option<u64>)>,
    first_sent_ms: u64,
    sent_ms: u64,
    /// Times sent again.
    resends: u32,
    deadline_ms: u64,
}

/// A line given up (evicted) whose write-back is not confirmed yet.
#[derive(Clone, Debug)]
struct Releasing {
    /// The latest line given up (a durable grant that raced an eviction may give up a
    /// second one before the first is confirmed: the key is held back until the latest
    /// is).
    line: Line,
    /// Evict calls answered once it is confirmed (at most `MAX_EVICTS_PER_LINE`).
    calls: Vec<EvictCall>,
}

/// An evict call waiting for its line's write-back to be confirmed.
#[derive(Clone, Copy, Debug)]
struct EvictCall {
    call: u64,
    deadline_ms: u64,
    /// The state of the line this call evicted (not necessarily the latest one given up).
    was: Mesi,
}

/// One node's cache agent. See the module docs.
#[derive(Clone, Debug)]
pub struct CacheAgent {
    cfg: CacheConfig,
    node: NodeId,
    nonce: u64,
    session: Option<LogIndex>,
    register_sent_ms: Option<u64>,
    next_seq: u64,
    next_renew: u64,
    next_stamp: u64,
    lines: CacheLines,
    /// Monotonic ms the lease is valid until (0: none).
    lease_until_ms: u64,
    renewals: VecDeque<(u64, u64)>,
    last_renew_ms: Option<u64>,
    renew_due: bool,
    pending: BTreeMap<u64, Pending>,
    waiting: VecDeque<Waiting>,
    releasing: BTreeMap<String, Releasing>,
    /// Write-back lines sent and not yet applied, by key: (line, sent at).
    /// (line, when to send it again, sends so far).
    unconfirmed: BTreeMap<String, (WriteBackLine, u64, u32)>,
    outbox: Vec<WriteBackLine>,
    last_expiry_sweep_ms: u64,
    /// The node is stopping: local puts are no longer acknowledged.
    stopping: bool,
    stats: CacheStats,
    out: Vec<AgentOutput>,
}

fn ttl_left(line: &Line, now_ms: u64) -> Option<u64> {
    line.expires_at_ms.map(|t| t.saturating_sub(now_ms))
}

/// What a write-back of `line` carries: its value if it is dirty.
fn written_of(line: &Line, now_ms: u64) -> Written {
    if line.dirty_since_ms.is_some() {
        Written::Value {
            value: line.value.clone(),
            ttl_ms: ttl_left(line, now_ms),
        }
    } else {
        Written::Unchanged
    }
}

impl CacheAgent {
    /// The agent of `node`; `nonce` must grow from one of its processes to the next (the
    /// shell takes the wall clock; the directory refuses a lower one and says which
    /// nonce to go above).
    pub fn new(cfg: CacheConfig, node: NodeId, nonce: u64) -> Self {
        Self {
            lines: CacheLines::new(cfg.max_entries, cfg.max_bytes),
            cfg,
            node,
            nonce,
            session: None,
            register_sent_ms: None,
            next_seq: 0,
            next_renew: 0,
            next_stamp: 0,
            lease_until_ms: 0,
            renewals: VecDeque::new(),
            last_renew_ms: None,
            renew_due: false,
            pending: BTreeMap::new(),
            waiting: VecDeque::new(),
            releasing: BTreeMap::new(),
            unconfirmed: BTreeMap::new(),
            outbox: Vec::new(),
            last_expiry_sweep_ms: 0,
            stopping: false,
            stats: CacheStats::default(),
            out: Vec::new(),
        }
    }

    /// What to do, in order.
    pub fn take_outputs(&mut self) -> Vec<AgentOutput> {
        std::mem::take(&mut self.out)
    }

    /// Whether there is output to take.
    pub fn has_outputs(&self) -> bool {
        !self.out.is_empty()
    }

    /// The line table (read only: tests, the simulator's invariants).
    pub fn lines(&self) -> &CacheLines {
        &self.lines
    }

    /// Whether the lease is valid at `now_ms`.
    pub fn lease_valid(&self, now_ms: u64) -> bool {
        now_ms < self.lease_until_ms
    }

    /// The state this node would serve `key` in at `now_ms`: its line's, while the
    /// lease is valid; Invalid otherwise.
    pub fn serving_state(&self, key: &str, now_ms: u64) -> Mesi {
        if self.lease_valid(now_ms) {
            self.lines.state(key, now_ms)
        } else {
            Mesi::Invalid
        }
    }

    /// The registration, once applied.
    pub fn session(&self) -> Option<LogIndex> {
        self.session
    }

    /// The counters at `now_ms`.
    pub fn stats(&self, now_ms: u64) -> CacheStats {
        let mut s = self.stats;
        let l = self.lines.stats();
        s.evictions = l.evictions;
        s.expirations = l.expirations;
        s.invalidations = l.invalidations;
        let (m, e, sh) = self.lines.counts();
        s.lines = [m as u64, e as u64, sh as u64];
        s.lease_valid = self.lease_valid(now_ms);
        s
    }

    /// The evict calls waiting on a given-up line: it left this node (`lost`: its
    /// writes were not stored).
    fn answer_evicts(&mut self, r: Releasing, lost: bool) {
        for c in r.calls {
            self.reply(c.call, CacheAnswer::Evicted { was: c.was, lost });
        }
    }

    fn reply(&mut self, call: u64, answer: CacheAnswer) {
        self.out.push(AgentOutput::Reply { call, answer });
    }

    fn fail(&mut self, call: u64, e: CacheError) {
        self.reply(call, CacheAnswer::Error(e));
    }

    /// This node's valid lines, keys in order, up to `limit` (the console's matrix).
    /// Without a valid lease no line here may be read: none is listed.
    fn valid_lines(&self, now_ms: u64, limit: usize) -> Vec<(String, Mesi)> {
        if !self.lease_valid(now_ms) {
            return Vec::new();
        }
        self.lines
            .keys()
            .map(|k| (k, self.lines.state(k, now_ms)))
            .filter(|(_, s)| *s != Mesi::Invalid)
            .take(limit.min(MAX_LINES_LISTED))
            .map(|(k, s)| (k.to_owned(), s))
            .collect()
    }

    /// A call from a client at `now_ms`.
    pub fn call(&mut self, now_ms: u64, call: u64, request: CacheCall, dir: &CacheDirectory) {
        let deadline_ms = now_ms + self.cfg.call_timeout_ms;
        let task = match request {
            CacheCall::Get { key } => Task::Get { key },
            CacheCall::Put {
                key,
                value,
                ttl_ms,
                durable,
            } => {
                if value.len() > MAX_VALUE_BYTES {
                    return self.fail(
                        call,
                        CacheError::Invalid(format!(
                            "a value is at most {MAX_VALUE_BYTES} bytes; this one is {}",
                            value.len()
                        )),
                    );
                }
                Task::Put {
                    key,
                    value,
                    ttl_ms,
                    durable: durable.unwrap_or(self.cfg.durable_default),
                }
            }
            CacheCall::Delete { key } => Task::Delete { key },
            CacheCall::Evict { key } => return self.evict(now_ms, call, key),
            CacheCall::State { key } => {
                let line = self.lines.peek(&key).map(|l| LineView {
                    state: if self.lease_valid(now_ms)
                        && self.lines.state(&key, now_ms) != Mesi::Invalid
                    {
                        l.state
                    } else {
                        Mesi::Invalid
                    },
                    version: l.version,
                    epoch: l.epoch,
                    dirty: l.dirty_since_ms.is_some(),
                });
                let answer = CacheAnswer::State {
                    line,
                    directory: dir.view(&key),
                };
                return self.reply(call, answer);
            }
            CacheCall::Stats => {
                let stats = self.stats(now_ms);
                return self.reply(call, CacheAnswer::Stats(stats));
            }
            CacheCall::Lines { limit } => {
                let lines = self.valid_lines(now_ms, limit);
                return self.reply(call, CacheAnswer::Lines(lines));
            }
        };
        let key = task.key();
        if key.is_empty() || key.len() > MAX_KEY_BYTES {
            return self.fail(
                call,
                CacheError::Invalid(format!("a key is 1 to {MAX_KEY_BYTES} bytes")),
            );
        }
        let w = Waiting {
            call,
            task,
            deadline_ms,
        };
        if let Some(w) = self.attempt(now_ms, w) {
            self.park(w);
        }
    }

    /// The caller of `call` went away: it is not answered. What it asked the directory
    /// for still happens (it may already have).
    pub fn cancel(&mut self, call: u64) {
        self.waiting.retain(|w| w.call != call);
        for p in self.pending.values_mut() {
            if p.call == Some(call) {
                p.call = None;
            }
        }
        for r in self.releasing.values_mut() {
            r.calls.retain(|c| c.call != call);
        }
    }

    fn park(&mut self, w: Waiting) {
        // An Ack is a put already granted (its value is in the line): it is answered,
        // never refused as if it had not been done.
        if self.waiting.len() >= MAX_WAITING_CALLS && !matches!(w.task, Task::Ack { .. }) {
            return self.fail(
                w.call,
                CacheError::Full(format!(
                    "{MAX_WAITING_CALLS} cache calls are waiting on this node"
                )),
            );
        }
        self.waiting.push_back(w);
    }

    /// Try to carry out `w` now; `Some` if it must wait.
    fn attempt(&mut self, now_ms: u64, w: Waiting) -> Option<Waiting> {
        let Some(session) = self.session else {
            return Some(w);
        };
        if self.releasing.contains_key(w.task.key()) && !matches!(w.task, Task::Ack { .. }) {
            // Nothing more is asked of a key while its given-up line is being written
            // back: a read must not fetch the older stored value meanwhile.
            return Some(w);
        }
        if self.releasing.len() >= MAX_RELEASING
            && !matches!(w.task, Task::Ack { .. } | Task::Delete { .. })
            && self.lines.peek(w.task.key()).is_none()
        {
            // Evicting for a new line would add to what is held back: wait for the
            // directory to take what is on its way.
            return Some(w);
        }
        match &w.task {
            Task::Get { .. } => self.attempt_get(now_ms, session, w),
            Task::Put { .. } => self.attempt_put(now_ms, session, w),
            Task::Delete { .. } => {
                self.request(now_ms, session, w, CacheOp::Delete, None);
                None
            }
            Task::Ack { .. } => self.attempt_ack(now_ms, w),
        }
    }

    fn attempt_get(&mut self, now_ms: u64, session: LogIndex, w: Waiting) -> Option<Waiting> {
        let key = w.task.key().to_owned();
        let lease = self.lease_valid(now_ms);
        let state = self.lines.state(&key, now_ms);
        if state != Mesi::Invalid && lease {
            self.stats.hits += 1;
            let line = self.lines.get(&key, now_ms).ok()?;
            let answer = CacheAnswer::Got {
                hit: true,
                value: Some(line.value.clone()),
                state: line.state,
            };
            self.reply(w.call, answer);
            return None;
        }
        if state.owned() {
            // Only this node has the latest value, and it may not serve it now.
            return Some(w);
        }
        if let Some(line) = self.lines.peek(&key) {
            if line.state.owned() {
                // Its TTL ran out here. While the lease is valid nobody else holds the
                // key, so the answer is a miss, and the directory must drop its older
                // value too.
                if !lease {
                    return Some(w);
                }
                if let Err(Some(gone)) = self.lines.get(&key, now_ms) {
                    self.give_up(*gone, Written::Expired, None);
                }
                self.stats.misses += 1;
                let answer = CacheAnswer::Got {
                    hit: false,
                    value: None,
                    state: Mesi::Invalid,
                };
                self.reply(w.call, answer);
                return None;
            }
            if state == Mesi::Invalid {
                // Its TTL ran out: dropped, and read again below.
                let _ = self.lines.get(&key, now_ms);
            }
        }
        self.stats.misses += 1;
        self.request(now_ms, session, w, CacheOp::Read, None);
        None
    }

    fn attempt_put(&mut self, now_ms: u64, session: LogIndex, w: Waiting) -> Option<Waiting> {
        let Task::Put {
            key,
            value,
            ttl_ms,
            durable,
        } = &w.task
        else {
            return None;
        };
        if *durable {
            self.next_stamp += 1;
            let op = CacheOp::Write {
                value: Some(value.clone()),
                ttl_ms: *ttl_ms,
                stamp: self.next_stamp,
            };
            self.request(now_ms, session, w, op, None);
            return None;
        }
        if !self.lines.state(key, now_ms).owned() {
            let put = Some((value.clone(), *ttl_ms));
            let op = CacheOp::Write {
                value: None,
                ttl_ms: None,
                stamp: 0,
            };
            self.request(now_ms, session, w, op, put);
            return None;
        }
        if !self.lease_valid(now_ms) || !self.window_open(now_ms) {
            return Some(w);
        }
        self.next_stamp += 1;
        let stamp = self.next_stamp;
        match self
            .lines
            .write_owned(key, value.clone(), *ttl_ms, now_ms, stamp)
        {
            Ok(evicted) => {
                self.stats.local_puts += 1;
                self.evicted(now_ms, evicted);
                let answer = CacheAnswer::Put {
                    state: Mesi::Modified,
                };
                self.reply(w.call, answer);
            }
            Err(e) => self.fail(w.call, CacheError::Invalid(e.to_string())),
        }
        None
    }

    fn attempt_ack(&mut self, now_ms: u64, w: Waiting) -> Option<Waiting> {
        let Task::Ack { key, stamp } = &w.task else {
            return None;
        };
        let holds = self
            .lines
            .peek(key)
            .is_some_and(|l| l.stamp == *stamp && l.state.owned());
        if !holds {
            let why = "the write was granted, then another node took the line before it could \
                       be acknowledged";
            self.fail(w.call, CacheError::Unknown(why.into()));
            return None;
        }
        if !self.lease_valid(now_ms) || !self.window_open(now_ms) {
            return Some(w);
        }
        let answer = CacheAnswer::Put {
            state: Mesi::Modified,
        };
        self.reply(w.call, answer);
        None
    }

    /// The node is stopping: every dirty line is written back now, and no local put is
    /// acknowledged from here on (they wait, and fail when the node is gone).
    pub fn begin_stop(&mut self, now_ms: u64) {
        self.stopping = true;
        let lines: Vec<WriteBackLine> = self
            .lines
            .dirty_since(u64::MAX)
            .into_iter()
            .filter(|(_, l)| l.state.owned())
            .map(|(key, line)| WriteBackLine {
                key: key.to_owned(),
                epoch: line.epoch,
                stamp: line.stamp,
                written: Written::Value {
                    value: line.value.clone(),
                    ttl_ms: ttl_left(line, now_ms),
                },
                keep: Keep::Owner,
            })
            .collect();
        self.outbox.extend(lines);
    }

    /// Whether every acknowledged write is in the directory (nothing dirty here, nothing
    /// given up still on its way).
    pub fn drained(&self) -> bool {
        self.lines.dirty_count() == 0 && self.releasing.is_empty()
    }

    /// Whether a write-back put may be acknowledged: the oldest write not yet written
    /// back is younger than `writeback_ms`.
    fn window_open(&self, now_ms: u64) -> bool {
        if self.stopping {
            return false;
        }
        let oldest = [
            self.lines.oldest_dirty_ms(),
            self.releasing
                .values()
                .filter_map(|r| r.line.dirty_since_ms)
                .min(),
        ]
        .into_iter()
        .flatten()
        .min();
        oldest.is_none_or(|t| now_ms.saturating_sub(t) < self.cfg.writeback_ms)
    }

    fn request(
        &mut self,
        now_ms: u64,
        session: LogIndex,
        w: Waiting,
        op: CacheOp,
        put: Option<(Vec<u8>, Option<u64>)>,
    ) {
        if self.pending.len() >= MAX_PENDING {
            return self.fail(
                w.call,
                CacheError::Full(format!(
                    "{MAX_PENDING} cache requests are in flight from this node"
                )),
            );
        }
        self.next_seq += 1;
        self.stats.requests += 1;
        let key = w.task.key().to_owned();
        self.pending.insert(
            self.next_seq,
            Pending {
                call: Some(w.call),
                key: key.clone(),
                op: op.clone(),
                put,
                first_sent_ms: now_ms,
                sent_ms: now_ms,
                resends: 0,
                deadline_ms: w.deadline_ms,
            },
        );
        let ack = self.ack();
        self.out.push(AgentOutput::Propose(CacheCommand::Request {
            node: self.node,
            session,
            seq: self.next_seq,
            ack,
            key,
            op,
        }));
    }

    /// The lowest request number a caller still waits for (the directory forgets the
    /// ones below).
    fn ack(&self) -> u64 {
        self.pending
            .iter()
            .find(|(_, p)| p.call.is_some())
            .map_or(self.next_seq + 1, |(seq, _)| *seq)
    }

    fn evict(&mut self, now_ms: u64, call: u64, key: String) {
        let deadline_ms = now_ms + self.cfg.call_timeout_ms;
        match self.lines.evict(&key) {
            None => {
                if let Some(r) = self.releasing.get_mut(&key) {
                    if r.calls.len() >= MAX_EVICTS_PER_LINE {
                        return self.fail(
                            call,
                            CacheError::Full(format!(
                                "{MAX_EVICTS_PER_LINE} evictions already wait for this \
                                 key's write-back"
                            )),
                        );
                    }
                    let was = r.line.state;
                    r.calls.push(EvictCall {
                        call,
                        deadline_ms,
                        was,
                    });
                } else {
                    self.reply(
                        call,
                        CacheAnswer::Evicted {
                            was: Mesi::Invalid,
                            lost: false,
                        },
                    );
                }
            }
            Some(gone) => {
                let was = gone.line.state;
                let written = written_of(&gone.line, now_ms);
                if was.owned() {
                    let call = EvictCall {
                        call,
                        deadline_ms,
                        was,
                    };
                    self.give_up(gone, written, Some(call));
                } else {
                    // A Shared copy holds nothing the directory lacks: it is dropped here
                    // and the directory is not told (a release could not be told from
                    // one of an earlier copy under the same epoch); the next writer's
                    // revoke finds no line and is confirmed at once.
                    self.reply(call, CacheAnswer::Evicted { was, lost: false });
                }
            }
        }
    }

    /// Lines evicted to make room: owned ones are given up through a write-back,
    /// Shared ones dropped.
    fn evicted(&mut self, now_ms: u64, evicted: Vec<Evicted>) {
        for gone in evicted {
            let written = written_of(&gone.line, now_ms);
            // (Shared lines are dropped without a word: see `evict`.)
            if gone.line.state.owned() {
                self.give_up(gone, written, None);
            }
        }
    }

    /// Give up an owned line: write it back (or say it expired) and keep nothing; until
    /// the directory applied that, the key is held back here.
    fn give_up(&mut self, gone: Evicted, written: Written, call: Option<EvictCall>) {
        let line = WriteBackLine {
            key: gone.key.clone(),
            epoch: gone.line.epoch,
            stamp: gone.line.stamp,
            written,
            keep: Keep::Nothing,
        };
        let newer = gone.line.epoch;
        // A write-back of an older line of the key not sent yet can only be refused (the
        // directory moved past its epoch): it goes, so nothing can raise it later.
        self.outbox
            .retain(|l| l.key != gone.key || l.epoch >= newer);
        self.outbox.push(line);
        let mut over_cap = None;
        match self.releasing.entry(gone.key) {
            std::collections::btree_map::Entry::Occupied(mut o) => {
                // A line granted while an earlier one was on its way back (a durable
                // grant that raced the eviction): it is the one to wait for now, and
                // each call keeps the state of the line it evicted.
                let r = o.get_mut();
                r.line = gone.line;
                match call {
                    Some(c) if r.calls.len() >= MAX_EVICTS_PER_LINE => over_cap = Some(c.call),
                    c => r.calls.extend(c),
                }
            }
            std::collections::btree_map::Entry::Vacant(v) => {
                v.insert(Releasing {
                    line: gone.line,
                    calls: call.into_iter().collect(),
                });
            }
        }
        if let Some(call) = over_cap {
            self.fail(
                call,
                CacheError::Full(format!(
                    "{MAX_EVICTS_PER_LINE} evictions already wait for this key's write-back"
                )),
            );
        }
    }

    /// Time passed: register, renew, write back, resend, time out.
    pub fn tick(&mut self, now_ms: u64, dir: &CacheDirectory) {
        let Some(session) = self.session else {
            if self
                .register_sent_ms
                .is_none_or(|t| now_ms.saturating_sub(t) >= 1_000)
            {
                self.register_sent_ms = Some(now_ms);
                self.out.push(AgentOutput::Propose(CacheCommand::Register {
                    node: self.node,
                    nonce: self.nonce,
                }));
            }
            self.expire_calls(now_ms);
            return;
        };
        // A lease is only worth renewing for lines held or calls waiting: an idle node
        // adds nothing to the log.
        let lease_ms = dir.limits().lease_ms;
        let busy = !self.lines.is_empty() || !self.waiting.is_empty() || !self.releasing.is_empty();
        if busy
            && self
                .last_renew_ms
                .is_none_or(|t| now_ms.saturating_sub(t) >= lease_ms / 3)
        {
            self.renew_due = true;
        }
        self.write_back_due(now_ms);
        self.resend_requests(now_ms, session);
        if now_ms >= self.last_expiry_sweep_ms + 1_000 {
            self.last_expiry_sweep_ms = now_ms;
            for gone in self.lines.expire(now_ms) {
                if gone.line.state.owned() {
                    self.give_up(gone, Written::Expired, None);
                }
            }
        }
        self.expire_calls(now_ms);
        self.retry_waiting(now_ms);
    }

    /// Write back what is a quarter of the window old, so the window never closes on a
    /// node that reaches the leader; send again what was not heard of.
    fn write_back_due(&mut self, now_ms: u64) {
        let due = now_ms.saturating_sub(self.cfg.writeback_ms / 4);
        let mut lines = Vec::new();
        for (key, line) in self.lines.dirty_since(due) {
            let sent = self
                .unconfirmed
                .get(key)
                .is_some_and(|(l, _, _)| l.stamp == line.stamp && l.epoch == line.epoch);
            // (A dirty Shared line is answering a downgrade: that write-back is sent
            // and resent on its own.)
            if sent || !line.state.owned() {
                continue;
            }
            lines.push(WriteBackLine {
                key: key.to_owned(),
                epoch: line.epoch,
                stamp: line.stamp,
                written: Written::Value {
                    value: line.value.clone(),
                    ttl_ms: ttl_left(line, now_ms),
                },
                keep: Keep::Owner,
            });
            if lines.len() >= 4 * MAX_LINES_PER_WRITEBACK {
                break;
            }
        }
        for line in &lines {
            self.lines.mark_sent(&line.key, line.stamp);
        }
        self.outbox.extend(lines);
        // Lines sent and not heard of again.
        let resend: Vec<WriteBackLine> = self
            .unconfirmed
            .values()
            .filter(|(_, due, _)| now_ms >= *due)
            .map(|(l, _, _)| l.clone())
            .collect();
        self.outbox.extend(resend);
    }

    fn resend_requests(&mut self, now_ms: u64, session: LogIndex) {
        let ack = self.ack();
        for (seq, p) in &mut self.pending {
            // Backing off: when commits are slow, resends must not add to the load.
            let gap = self.cfg.resend_ms << p.resends.min(3);
            if p.call.is_some() && now_ms >= p.sent_ms + gap {
                p.sent_ms = now_ms;
                p.resends += 1;
                self.out.push(AgentOutput::Propose(CacheCommand::Request {
                    node: self.node,
                    session,
                    seq: *seq,
                    ack,
                    key: p.key.clone(),
                    op: p.op.clone(),
                }));
            }
        }
    }

    fn expire_calls(&mut self, now_ms: u64) {
        let mut answers = Vec::new();
        for r in self.releasing.values_mut() {
            r.calls.retain(|c| {
                if now_ms < c.deadline_ms {
                    return true;
                }
                answers.push((
                    c.call,
                    CacheError::Unknown(
                        "the line left this node, but its write-back was not confirmed in \
                         time"
                            .into(),
                    ),
                ));
                false
            });
        }
        self.waiting.retain(|w| {
            if now_ms < w.deadline_ms {
                return true;
            }
            let why = match w.task {
                Task::Ack { .. } => CacheError::Unknown(
                    "the write was granted but the node's lease or write-back window did not \
                     allow acknowledging it in time"
                        .into(),
                ),
                _ => CacheError::Unavailable(
                    "this node's cache lease is not valid (no leader, or cut off from it); \
                     try again"
                        .into(),
                ),
            };
            answers.push((w.call, why));
            false
        });
        let mut dropped = Vec::new();
        for (seq, p) in &mut self.pending {
            if now_ms < p.deadline_ms {
                continue;
            }
            if let Some(call) = p.call.take() {
                let why = match p.op {
                    CacheOp::Read => CacheError::Unavailable(
                        "the cache directory did not answer in time; try again".into(),
                    ),
                    _ => CacheError::Unknown(
                        "the cache directory did not answer in time; the write may or may not \
                         have been applied"
                            .into(),
                    ),
                };
                answers.push((call, why));
            }
            // Kept a while for its late outcome (a grant nobody waits for is handed
            // back), then forgotten.
            if now_ms >= p.deadline_ms + 4 * self.cfg.call_timeout_ms {
                dropped.push(*seq);
            }
        }
        for seq in dropped {
            self.pending.remove(&seq);
        }
        for (call, why) in answers {
            self.fail(call, why);
        }
    }

    fn retry_waiting(&mut self, now_ms: u64) {
        let parked = std::mem::take(&mut self.waiting);
        for w in parked {
            if let Some(w) = self.attempt(now_ms, w) {
                self.waiting.push_back(w);
            }
        }
    }

    /// After a batch of inputs: send the renewal and the write-backs they called for.
    /// `applied` is the node's applied index now.
    pub fn flush(&mut self, now_ms: u64, applied: LogIndex) {
        let Some(session) = self.session else {
            self.outbox.clear();
            return;
        };
        if self.renew_due {
            self.renew_due = false;
            self.next_renew += 1;
            self.renewals.push_back((self.next_renew, now_ms));
            if self.renewals.len() > RENEWALS_KEPT {
                self.renewals.pop_front();
            }
            self.last_renew_ms = Some(now_ms);
            self.out.push(AgentOutput::Propose(CacheCommand::Renew {
                node: self.node,
                session,
                renew: self.next_renew,
                applied,
            }));
        }
        if self.outbox.is_empty() {
            return;
        }
        let lines = std::mem::take(&mut self.outbox);
        let mut batch = Vec::new();
        let mut bytes = 0usize;
        for line in lines {
            // Every line hears back (accepted or refused); until then it is resent, less
            // and less often.
            let tries = self
                .unconfirmed
                .get(&line.key)
                .filter(|(l, _, _)| l == &line)
                .map_or(0, |(_, _, n)| n + 1);
            let due = now_ms + (self.cfg.resend_ms << tries.min(3));
            self.unconfirmed
                .insert(line.key.clone(), (line.clone(), due, tries));
            let size = match &line.written {
                Written::Value { value, .. } => value.len(),
                _ => 0,
            } + line.key.len();
            if !batch.is_empty()
                && (batch.len() >= MAX_LINES_PER_WRITEBACK || bytes + size > MAX_WRITEBACK_BYTES)
            {
                self.out.push(AgentOutput::Propose(CacheCommand::WriteBack {
                    node: self.node,
                    session,
                    applied,
                    lines: std::mem::take(&mut batch),
                }));
                bytes = 0;
            }
            bytes += size;
            batch.push(line);
        }
        if !batch.is_empty() {
            self.out.push(AgentOutput::Propose(CacheCommand::WriteBack {
                node: self.node,
                session,
                applied,
                lines: batch,
            }));
        }
    }

    /// The events of one applied entry, with the directory as it is after it.
    pub fn applied(&mut self, now_ms: u64, events: &[CacheEvent], dir: &CacheDirectory) {
        for event in events {
            match event {
                CacheEvent::Registered {
                    node,
                    nonce,
                    session,
                } if *node == self.node && *nonce == self.nonce && self.session.is_none() => {
                    self.session = Some(*session);
                    self.renew_due = true;
                }
                CacheEvent::RegisterRefused { node, nonce, above }
                    if *node == self.node && *nonce == self.nonce && self.session.is_none() =>
                {
                    // Our nonce is below one on record (our nonce source went back):
                    // register again above it.
                    self.nonce = above.saturating_add(1);
                    self.register_sent_ms = None;
                }
                CacheEvent::Registered { node, nonce, .. }
                    if *node == self.node && *nonce != self.nonce && self.session.is_some() =>
                {
                    // Another registration in this node's name replaced ours (only a
                    // stale one of an earlier process can): the directory no longer
                    // records what we hold, so nothing is served from it; start over.
                    self.reconcile(now_ms, dir);
                }
                CacheEvent::Renewed {
                    node,
                    session,
                    renew,
                    counted: true,
                } if *node == self.node && Some(*session) == self.session => {
                    if let Some((_, sent)) = self.renewals.iter().find(|(r, _)| r == renew) {
                        let lease = dir.limits().lease_ms;
                        let kept =
                            lease.saturating_mul(100 - self.cfg.clock_margin_pct.min(90)) / 100;
                        self.lease_until_ms = self.lease_until_ms.max(sent + kept);
                        self.stats.renewals += 1;
                    }
                }
                CacheEvent::Revoke {
                    node,
                    key,
                    epoch,
                    mode,
                } if *node == self.node && self.session.is_some() => {
                    self.revoked(now_ms, key, *epoch, *mode);
                }
                CacheEvent::Answered {
                    node,
                    session,
                    seq,
                    key,
                    outcome,
                } if *node == self.node && Some(*session) == self.session => {
                    self.answered(now_ms, *seq, key, outcome);
                }
                CacheEvent::WrittenBack {
                    node,
                    session,
                    key,
                    epoch,
                    stamp,
                    keep,
                    version,
                    refused,
                } if *node == self.node && Some(*session) == self.session => {
                    self.written_back(key, (*epoch, *stamp, *keep), *version, *refused);
                }
                _ => {}
            }
        }
        self.retry_waiting(now_ms);
    }

    fn revoked(&mut self, now_ms: u64, key: &str, epoch: u64, mode: RevokeMode) {
        self.renew_due = true;
        if mode == RevokeMode::Invalidate {
            self.lines.invalidate(key);
            self.unconfirmed.remove(key);
            if let Some(r) = self.releasing.remove(key) {
                // A later write or delete elsewhere replaced it: overwritten, not lost;
                // but if our lease ran out, this is the lapse, and its writes are gone.
                let lost = r.line.dirty_since_ms.is_some() && !self.lease_valid(now_ms);
                self.answer_evicts(r, lost);
            }
            return;
        }
        // Asked again (a snapshot carried the revoke we answered already): the answer
        // on its way is sent again, never replaced by an emptier one.
        let answered = self
            .unconfirmed
            .get(key)
            .filter(|(l, _, _)| l.epoch == epoch && l.keep != Keep::Owner)
            .map(|(l, _, _)| l.clone());
        if let Some(line) = answered {
            self.outbox.push(line);
            return;
        }
        let held = self.lines.peek(key).filter(|l| l.epoch == epoch).cloned();
        if mode == RevokeMode::Flush && held.is_some() {
            // Written back and given up: held back here until the directory has it.
            if let Some(gone) = self.lines.invalidate(key) {
                let written = written_of(&gone.line, now_ms);
                self.unconfirmed.remove(key);
                self.give_up(gone, written, None);
            }
            return;
        }
        let line = match (held, self.releasing.get(key)) {
            (Some(line), _) if line.state.owned() || line.dirty_since_ms.is_some() => {
                self.lines.downgrade(key);
                WriteBackLine {
                    key: key.to_owned(),
                    epoch,
                    stamp: line.stamp,
                    written: written_of(&line, now_ms),
                    keep: Keep::Shared,
                }
            }
            (None, Some(r)) if r.line.epoch == epoch => WriteBackLine {
                key: key.to_owned(),
                epoch,
                stamp: r.line.stamp,
                written: written_of(&r.line, now_ms),
                keep: Keep::Nothing,
            },
            _ => {
                // Nothing held under that epoch: answer so the reader need not wait for
                // the lease to run out.
                self.lines.invalidate(key);
                WriteBackLine {
                    key: key.to_owned(),
                    epoch,
                    stamp: 0,
                    written: Written::Unchanged,
                    keep: Keep::Nothing,
                }
            }
        };
        self.unconfirmed.remove(key);
        self.outbox.push(line);
    }

    fn answered(&mut self, now_ms: u64, seq: u64, key: &str, outcome: &Outcome) {
        let Some(p) = self.pending.remove(&seq) else {
            // Nobody waits for it any more: a grant is handed back.
            if let Outcome::Granted { grant, epoch, .. } = outcome {
                if *grant != Grant::Shared && self.lines.peek(key).is_none_or(|l| l.epoch != *epoch)
                {
                    self.hand_back(key, *epoch);
                }
            }
            return;
        };
        let call = p.call;
        let answer = match outcome {
            Outcome::Granted {
                grant,
                epoch,
                version,
                value,
                ttl_ms,
            } => self.granted(
                now_ms,
                &p,
                *grant,
                *epoch,
                *version,
                value.as_ref(),
                *ttl_ms,
            ),
            Outcome::Miss => Some(CacheAnswer::Got {
                hit: false,
                value: None,
                state: Mesi::Invalid,
            }),
            Outcome::Deleted => {
                self.lines.invalidate(key);
                Some(CacheAnswer::Deleted)
            }
            // Below our floor: nobody here waits for it any more.
            Outcome::Refused(CacheRefusal::Stale) => Some(CacheAnswer::Error(CacheError::Unknown(
                "the cache request arrived after it was given up".into(),
            ))),
            Outcome::Refused(CacheRefusal::Full(why)) => {
                Some(CacheAnswer::Error(CacheError::Full(why.clone())))
            }
            Outcome::Refused(CacheRefusal::Invalid(why)) => {
                Some(CacheAnswer::Error(CacheError::Invalid(why.clone())))
            }
            Outcome::Refused(CacheRefusal::NotRegistered) => Some(CacheAnswer::Error(
                CacheError::Unavailable("this node's cache is registering; try again".into()),
            )),
        };
        if let (Some(call), Some(answer)) = (call, answer) {
            self.reply(call, answer);
        }
    }

    /// A request was granted: fill the line; the answer, unless the call waits on.
    #[allow(clippy::too_many_arguments)]
    fn granted(
        &mut self,
        now_ms: u64,
        p: &Pending,
        grant: Grant,
        epoch: u64,
        version: u64,
        value: Option<&Vec<u8>>,
        ttl_ms: Option<u64>,
    ) -> Option<CacheAnswer> {
        let margin = |t: u64| t.saturating_mul(100 - self.cfg.clock_margin_pct.min(90)) / 100;
        // The TTL left was counted when the directory granted, after the request left:
        // counted here from when it left, it ends before the directory's.
        let ttl_from_now = |t: u64| (p.first_sent_ms + margin(t)).saturating_sub(now_ms).max(1);
        match (&p.op, grant) {
            (CacheOp::Read, Grant::Exclusive) if self.lines.state(&p.key, now_ms).owned() => {
                // Granted to us again while we hold it (a put of ours was granted first,
                // while this read waited): our line holds the later write. It stays, under
                // the new epoch, and answers the read.
                let line = self.lines.regrant(&p.key, epoch)?;
                Some(CacheAnswer::Got {
                    hit: true,
                    value: Some(line.value.clone()),
                    state: line.state,
                })
            }
            (CacheOp::Read, Grant::Exclusive)
                if self.lines.peek(&p.key).is_some_and(|l| l.state.owned()) =>
            {
                Some(self.regranted_expired(now_ms, &p.key, epoch))
            }
            (CacheOp::Read, Grant::Exclusive)
                if self
                    .releasing
                    .get(&p.key)
                    .is_some_and(|r| r.line.state.owned() && r.line.epoch < epoch) =>
            {
                // (No line of the key is held: a newer one would have ended the
                // release; see `hold`.)
                self.regranted_while_releasing(now_ms, &p.key, epoch)
            }
            (CacheOp::Read, g) => {
                let value = value.cloned().unwrap_or_default();
                let state = if g == Grant::Shared {
                    Mesi::Shared
                } else {
                    Mesi::Exclusive
                };
                let fill = Fill {
                    value: value.clone(),
                    state,
                    version,
                    epoch,
                    ttl_ms: ttl_ms.map(ttl_from_now),
                    stamp: 0,
                };
                let state = self.hold(now_ms, &p.key, fill);
                Some(CacheAnswer::Got {
                    hit: true,
                    value: Some(value),
                    state,
                })
            }
            (
                CacheOp::Write {
                    value: Some(v),
                    ttl_ms,
                    stamp,
                },
                _,
            ) => {
                let fill = Fill {
                    value: v.clone(),
                    state: Mesi::Exclusive,
                    version,
                    epoch,
                    // The directory counts the TTL from when the put applied, after it
                    // left: counted here from when it left, the line ends first.
                    ttl_ms: ttl_ms.map(ttl_from_now),
                    stamp: *stamp,
                };
                let state = self.hold(now_ms, &p.key, fill);
                Some(CacheAnswer::Put { state })
            }
            (CacheOp::Write { value: None, .. }, _) => {
                self.granted_modified(now_ms, p, epoch, version)
            }
            (CacheOp::Delete, _) => Some(CacheAnswer::Deleted),
        }
    }

    /// Our own read granted the key to us again while our line's TTL ran out (a live
    /// one answers the read): the key's latest value here has expired. The read misses,
    /// and the expiry goes to the directory under the new epoch (under the old one it
    /// would be refused, and an older stored value outlive it).
    fn regranted_expired(&mut self, now_ms: u64, key: &str, epoch: u64) -> CacheAnswer {
        self.lines.regrant(key, epoch);
        if let Err(Some(gone)) = self.lines.get(key, now_ms) {
            self.give_up(*gone, Written::Expired, None);
        }
        CacheAnswer::Got {
            hit: false,
            value: None,
            state: Mesi::Invalid,
        }
    }

    /// A read of ours granted the key to us again while our given-up line is on its way
    /// back: nobody else owned it since (that takes a revoke, which ends the release), so
    /// the line holds the latest write and the stored value is older. Its write-back goes
    /// under the new epoch (under the old one it would be refused as stale and the write
    /// lost), and the read answers its value. The line stays given up.
    fn regranted_while_releasing(
        &mut self,
        now_ms: u64,
        key: &str,
        epoch: u64,
    ) -> Option<CacheAnswer> {
        let r = self.releasing.get_mut(key)?;
        let (old_epoch, stamp) = (r.line.epoch, r.line.stamp);
        r.line.epoch = epoch;
        // (Its TTL ran out since it was given up: a miss; its write-back still goes.)
        let value = r.line.live_at(now_ms).then(|| r.line.value.clone());
        // Only the write-back of the line held back moves: an older line's, still
        // waiting beside it, would be stored under the new epoch over the newer value.
        let same = |l: &WriteBackLine| l.key == key && l.epoch == old_epoch && l.stamp == stamp;
        for l in self.outbox.iter_mut().filter(|l| same(l)) {
            l.epoch = epoch;
        }
        if let Some((l, due, _)) = self.unconfirmed.get_mut(key) {
            if same(l) && l.epoch < epoch {
                l.epoch = epoch;
                *due = now_ms;
            }
        }
        Some(CacheAnswer::Got {
            hit: value.is_some(),
            value,
            state: Mesi::Invalid,
        })
    }

    /// A write-back put was granted M: the line holds it, and the put is acknowledged
    /// once the lease and the write-back window allow.
    fn granted_modified(
        &mut self,
        now_ms: u64,
        p: &Pending,
        epoch: u64,
        version: u64,
    ) -> Option<CacheAnswer> {
        let (value, ttl) = p.put.clone().unwrap_or_default();
        self.next_stamp += 1;
        let stamp = self.next_stamp;
        let fill = Fill {
            value,
            state: Mesi::Modified,
            version,
            epoch,
            ttl_ms: ttl,
            stamp,
        };
        if self.hold(now_ms, &p.key, fill) == Mesi::Invalid {
            return Some(CacheAnswer::Error(CacheError::Invalid(format!(
                "the value does not fit this node's cache of {} bytes",
                self.cfg.max_bytes
            ))));
        }
        let call = p.call?;
        let w = Waiting {
            call,
            task: Task::Ack {
                key: p.key.clone(),
                stamp,
            },
            deadline_ms: p.deadline_ms,
        };
        if let Some(w) = self.attempt(now_ms, w) {
            self.park(w);
        }
        None
    }

    /// Hold `key` as granted; the state it is held in (Invalid: it does not fit, and
    /// what was granted is handed back).
    fn hold(&mut self, now_ms: u64, key: &str, fill: Fill) -> Mesi {
        let (state, epoch) = (fill.state, fill.epoch);
        if state.owned() {
            self.superseded(key, epoch);
        }
        match self.lines.fill(key, fill, now_ms) {
            Ok(evicted) => {
                self.stats.fills += 1;
                // A line of the key itself that this grant replaces held an older write
                // of ours: the grant supersedes it.
                let others = evicted.into_iter().filter(|e| e.key != key).collect();
                self.evicted(now_ms, others);
                state
            }
            Err(_) => {
                if state.owned() {
                    self.hand_back(key, epoch);
                }
                Mesi::Invalid
            }
        }
    }

    /// The directory granted `key` to us under `epoch` (a put of ours) while a line we
    /// gave up is on its way back: the directory moved past that line's epoch, so its
    /// write-back can only be refused now, and the new grant's value supersedes its
    /// writes. Its release ends here; waiting on it would hold the key back until the
    /// new line is given up too (its write-back resent by nobody: one line per key is
    /// resent, and the new line's replaces it).
    fn superseded(&mut self, key: &str, epoch: u64) {
        let older = |l: &WriteBackLine| l.key == key && l.epoch < epoch;
        self.outbox.retain(|l| !older(l));
        if self.unconfirmed.get(key).is_some_and(|(l, _, _)| older(l)) {
            self.unconfirmed.remove(key);
        }
        if self
            .releasing
            .get(key)
            .is_some_and(|r| r.line.epoch < epoch)
        {
            if let Some(r) = self.releasing.remove(key) {
                self.answer_evicts(r, false);
            }
        }
    }

    /// Give back ownership granted under `epoch` that this node does not keep.
    fn hand_back(&mut self, key: &str, epoch: u64) {
        self.outbox.push(WriteBackLine {
            key: key.to_owned(),
            epoch,
            stamp: 0,
            written: Written::Unchanged,
            keep: Keep::Nothing,
        });
    }

    fn written_back(
        &mut self,
        key: &str,
        (epoch, stamp, keep): (u64, u64, Keep),
        version: u64,
        refused: Option<WriteBackRefusal>,
    ) {
        // Only the very line heard of is done: a periodic write-back of the same stamp
        // is not the answer to a revoke that is still on its way.
        if self
            .unconfirmed
            .get(key)
            .is_some_and(|(l, _, _)| l.epoch == epoch && l.stamp == stamp && l.keep == keep)
            && refused != Some(WriteBackRefusal::Full)
        {
            self.unconfirmed.remove(key);
        }
        match refused {
            None => {
                if stamp != 0 {
                    self.stats.writebacks += 1;
                }
                if self.lines.peek(key).is_some_and(|l| l.epoch == epoch) {
                    self.lines.written_back(key, stamp, version, false);
                }
            }
            Some(WriteBackRefusal::Superseded) => {}
            Some(WriteBackRefusal::Stale) => {
                self.stats.writeback_refusals += 1;
                if self.lines.peek(key).is_some_and(|l| l.epoch == epoch) {
                    self.lines.invalidate(key);
                }
            }
            Some(WriteBackRefusal::Full) => {
                // Kept dirty and sent again; the window closes on new writes meanwhile.
                self.stats.writeback_refusals += 1;
                return;
            }
        }
        let done = self
            .releasing
            .get(key)
            .is_some_and(|r| r.line.epoch == epoch && r.line.stamp == stamp);
        if done {
            if let Some(r) = self.releasing.remove(key) {
                // Refused as stale because our own later grant moved the epoch (we hold
                // the key again): overwritten by our own write, not lost.
                let regranted = self
                    .lines
                    .peek(key)
                    .is_some_and(|l| l.state.owned() && l.epoch > r.line.epoch);
                let lost = refused == Some(WriteBackRefusal::Stale)
                    && r.line.dirty_since_ms.is_some()
                    && !regranted;
                self.answer_evicts(r, lost);
            }
        }
    }

    /// A snapshot replaced the directory without the events in between: keep only the
    /// lines the directory still grants this node, and answer the revokes it waits for.
    pub fn reconcile(&mut self, now_ms: u64, dir: &CacheDirectory) {
        if self.session.is_some() && dir.session_of(self.node) != self.session {
            // Our registration is gone (a later one cannot be ours: one process per
            // node): start over.
            self.session = None;
            self.register_sent_ms = None;
            self.lease_until_ms = 0;
            // The directory forgot what that session held: a given-up line can be
            // neither stored nor confirmed now, so it is held back no longer. Its evict
            // calls hear that it left, lost if it held writes not confirmed stored.
            self.outbox.clear();
            self.unconfirmed.clear();
            for r in std::mem::take(&mut self.releasing).into_values() {
                let lost = r.line.dirty_since_ms.is_some();
                self.answer_evicts(r, lost);
            }
            // Its requests too: what the directory applied of them went with the
            // session, so one resent under the next could apply twice (a put stored
            // again over a later one). A write may have been done; a read may be
            // asked again.
            for p in std::mem::take(&mut self.pending).into_values() {
                let Some(call) = p.call else { continue };
                let e = if p.op == CacheOp::Read {
                    CacheError::Unavailable(
                        "this node's cache registration was replaced; try again".into(),
                    )
                } else {
                    CacheError::Unknown(
                        "this node's cache registration was replaced while the call was in flight"
                            .into(),
                    )
                };
                self.fail(call, e);
            }
        }
        let revokes = dir.revokes_of(self.node);
        let keys: Vec<String> = self.lines.keys().map(str::to_owned).collect();
        for key in keys {
            let keep = match (self.lines.peek(&key), dir.holds(self.node, &key)) {
                // Granted to us again in the skipped part (a request of ours that waited)
                // with nothing stored since our line's version: nobody else holds it, and
                // our line has our latest write.
                (Some(l), Some((Grant::Exclusive, e)))
                    if l.state.owned() && l.epoch < e && dir.version_of(&key) == l.version =>
                {
                    self.lines.regrant(&key, e).is_some()
                }
                (Some(l), Some((Grant::Exclusive, e))) => l.state.owned() && l.epoch == e,
                (Some(l), Some((Grant::Shared, e))) => l.state == Mesi::Shared && l.epoch == e,
                // Being revoked: kept for the answer below (a downgrade writes it back).
                (Some(l), None) => revokes.iter().any(|(k, e, _)| *k == key && *e == l.epoch),
                _ => false,
            };
            if !keep || self.session.is_none() {
                self.lines.invalidate(&key);
            }
        }
        if self.session.is_some() {
            for (key, epoch, mode) in revokes {
                self.revoked(now_ms, &key, epoch, mode);
            }
        }
        self.renew_due = true;
    }
}

#[cfg(test)]
mod tests {
    //! One agent beside the directory, with the log in the test's hands: commands the
    //! agent proposes queue up, and the test applies them in the order it picks.
    use super::*;
    use crate::services::cache::directory::CacheEvent;

    struct Rig {
        agent: CacheAgent,
        dir: CacheDirectory,
        index: LogIndex,
        now: u64,
        proposed: VecDeque<CacheCommand>,
        replies: BTreeMap<u64, CacheAnswer>,
    }

    impl Rig {
        /// Node 1, registered and under a lease.
        fn new() -> Self {
            let mut r = Self {
                agent: CacheAgent::new(CacheConfig::default(), 1, 7),
                dir: CacheDirectory::default(),
                index: 0,
                now: 1_000,
                proposed: VecDeque::new(),
                replies: BTreeMap::new(),
            };
            r.agent.tick(r.now, &r.dir);
            r.collect();
            r.apply_all();
            assert!(r.agent.lease_valid(r.now), "the lease");
            r
        }

        fn collect(&mut self) {
            self.agent.flush(self.now, self.index);
            for o in self.agent.take_outputs() {
                match o {
                    AgentOutput::Reply { call, answer } => {
                        self.replies.insert(call, answer);
                    }
                    AgentOutput::Propose(c) => self.proposed.push_back(c),
                }
            }
        }

        /// Apply the `i`th command waiting (0: the oldest).
        fn apply(&mut self, i: usize) {
            let Some(command) = self.proposed.remove(i) else {
                panic!("no command {i} waits: {:?}", self.proposed);
            };
            self.index += 1;
            let mut events: Vec<CacheEvent> = Vec::new();
            self.dir.apply(self.index, self.now, command, &mut events);
            self.agent.applied(self.now, &events, &self.dir);
            self.collect();
        }

        /// Apply the `i`th command waiting without flushing: as the node does for every
        /// entry of one drive, before its one flush.
        fn apply_unflushed(&mut self, i: usize) {
            let Some(command) = self.proposed.remove(i) else {
                panic!("no command {i} waits: {:?}", self.proposed);
            };
            self.index += 1;
            let mut events: Vec<CacheEvent> = Vec::new();
            self.dir.apply(self.index, self.now, command, &mut events);
            self.agent.applied(self.now, &events, &self.dir);
        }

        fn position(&self, what: impl Fn(&CacheCommand) -> bool) -> usize {
            self.proposed
                .iter()
                .position(what)
                .unwrap_or_else(|| panic!("not proposed: {:?}", self.proposed))
        }

        fn apply_all(&mut self) {
            while !self.proposed.is_empty() {
                self.apply(0);
            }
        }

        fn call(&mut self, call: u64, request: CacheCall) {
            self.agent.call(self.now, call, request, &self.dir);
            self.collect();
        }

        fn put(&mut self, call: u64, value: &str, durable: bool) {
            self.call(
                call,
                CacheCall::Put {
                    key: "k".into(),
                    value: value.into(),
                    ttl_ms: None,
                    durable: Some(durable),
                },
            );
        }
    }

    /// A write-back put "a" is held M; a durable put "b" goes to the directory, and
    /// before it is granted the line is evicted. The durable grant arrives before the
    /// eviction's write-back, so the node holds a new line while the first is on its
    /// way back: that line is what the key waits for now.
    fn durable_grant_races_an_eviction() -> Rig {
        let mut r = Rig::new();
        r.put(1, "a", false);
        r.apply_all();
        assert_eq!(
            r.replies.get(&1),
            Some(&CacheAnswer::Put {
                state: Mesi::Modified
            })
        );
        r.put(2, "b", true);
        r.call(3, CacheCall::Evict { key: "k".into() });
        assert!(
            matches!(r.proposed.get(1), Some(CacheCommand::WriteBack { .. })),
            "the durable request, then the write-back: {:?}",
            r.proposed
        );
        r.apply(0);
        assert_eq!(
            r.replies.get(&2),
            Some(&CacheAnswer::Put {
                state: Mesi::Exclusive
            })
        );
        r
    }

    /// Each evict call is answered with the state of the line it evicted, once the
    /// latest line given up is confirmed; the clean E line lost nothing (answered from
    /// the first line, it said M and lost: its write-back was refused as stale).
    #[test]
    fn an_evict_answers_the_state_of_the_line_it_evicted() {
        let mut r = durable_grant_races_an_eviction();
        r.call(4, CacheCall::Evict { key: "k".into() });
        r.apply(0);
        assert_eq!(
            r.replies.get(&4),
            None,
            "the E line's write-back is not applied"
        );
        r.apply_all();
        let evicted = |r: &Rig, call| match r.replies.get(&call) {
            Some(CacheAnswer::Evicted { was, lost }) => (*was, *lost),
            other => panic!("evict {call}: {other:?}"),
        };
        assert_eq!(
            evicted(&r, 3),
            (Mesi::Modified, false),
            "\"a\" was overwritten"
        );
        assert_eq!(evicted(&r, 4), (Mesi::Exclusive, false));
        assert_eq!(r.dir.value("k"), Some(&b"b"[..]));
    }

    /// A line L1 held M ("a", written back only on eviction) is given up; in the same
    /// drive a durable put "b" is granted and acknowledged (line L2), L2 is given up, and
    /// a read of ours sent before all of it is granted: the read re-grants the key while
    /// L2 is held back. Only L2's write-back may move to the read's epoch; when L1's
    /// moved too, its "a" was stored over the acknowledged "b".
    #[test]
    fn a_regrant_moves_only_the_held_back_line_s_write_back() {
        let mut r = Rig::new();
        r.call(1, CacheCall::Get { key: "k".into() });
        r.put(2, "a", false);
        let w1 = r.position(is_request(|o| matches!(o, CacheOp::Write { .. })));
        r.apply(w1);
        assert_eq!(
            r.replies.get(&2),
            Some(&CacheAnswer::Put {
                state: Mesi::Modified
            }),
            "\"a\" is held in M: {:?}",
            r.proposed
        );
        r.put(3, "b", true);
        // One drive: evict L1, apply b's grant, evict L2, apply the read's grant; then
        // the drive's one flush.
        let evict = CacheCall::Evict { key: "k".into() };
        r.agent.call(r.now, 4, evict.clone(), &r.dir);
        let w2 = r.position(is_request(|o| matches!(o, CacheOp::Write { .. })));
        r.apply_unflushed(w2);
        r.agent.call(r.now, 5, evict, &r.dir);
        let read = r.position(is_request(|o| matches!(o, CacheOp::Read)));
        r.apply_unflushed(read);
        r.collect();
        r.apply_all();
        assert_eq!(
            r.replies.get(&3),
            Some(&CacheAnswer::Put {
                state: Mesi::Exclusive
            }),
            "\"b\" was acknowledged"
        );
        assert_eq!(
            r.dir.value("k"),
            Some(&b"b"[..]),
            "the directory keeps the acknowledged \"b\""
        );
        r.call(6, CacheCall::Get { key: "k".into() });
        r.apply_all();
        match r.replies.get(&6) {
            Some(CacheAnswer::Got { value, .. }) => {
                assert_eq!(value.as_deref(), Some(&b"b"[..]), "a later get")
            }
            other => panic!("the later get: {other:?}"),
        }
    }

    /// The session is lost (another registration in this node's name) while a given-up
    /// M line's write-back is still unsent: it can never be stored or confirmed now, so
    /// its evict call hears it was lost, and the key is not held back for ever. A put in
    /// flight is answered "unknown" and not resent under the next session (which would
    /// not know it applied it: helper-15's finding).
    #[test]
    fn a_lost_session_releases_the_lines_held_back() {
        let mut r = Rig::new();
        r.put(1, "a", false);
        r.apply_all();
        // A durable put in flight, never applied in the old session.
        r.call(
            7,
            CacheCall::Put {
                key: "z".into(),
                value: b"1".to_vec(),
                ttl_ms: None,
                durable: Some(true),
            },
        );
        r.proposed.clear();
        r.agent
            .call(r.now, 2, CacheCall::Evict { key: "k".into() }, &r.dir);
        r.proposed
            .push_back(CacheCommand::Register { node: 1, nonce: 99 });
        r.apply_unflushed(0);
        assert_eq!(r.agent.session(), None, "the session is lost");
        r.collect();
        assert!(
            matches!(
                r.replies.get(&7),
                Some(CacheAnswer::Error(CacheError::Unknown(_)))
            ),
            "the put in flight may or may not have been done: {:?}",
            r.replies.get(&7)
        );
        assert_eq!(
            r.replies.get(&2),
            Some(&CacheAnswer::Evicted {
                was: Mesi::Modified,
                lost: true
            })
        );
        // Registered anew (refused once: our nonce is below the one that replaced us),
        // the key is served again.
        for _ in 0..2 {
            r.agent.tick(r.now, &r.dir);
            r.collect();
            r.apply_all();
        }
        assert!(r.agent.session().is_some(), "registered again");
        r.call(3, CacheCall::Get { key: "k".into() });
        r.apply_all();
        assert!(
            matches!(r.replies.get(&3), Some(CacheAnswer::Got { .. })),
            "a get of the key is answered: {:?}",
            r.replies.get(&3)
        );
        // Nothing resends the old session's put under the new one.
        r.now += 10_000;
        r.agent.tick(r.now, &r.dir);
        r.collect();
        r.apply_all();
        assert_eq!(r.dir.value("z"), None, "the put was not sent again");
    }

    /// "a" is stored and nobody holds the key.
    fn stored_a() -> Rig {
        let mut r = Rig::new();
        r.put(10, "a", true);
        r.apply_all();
        r.call(11, CacheCall::Evict { key: "k".into() });
        r.apply_all();
        assert!(r.replies.contains_key(&11) && r.dir.value("k") == Some(&b"a"[..]));
        r
    }

    fn is_request(op: fn(&CacheOp) -> bool) -> impl Fn(&CacheCommand) -> bool {
        move |c: &CacheCommand| matches!(c, CacheCommand::Request { op: o, .. } if op(o))
    }

    /// helper-15's finding: a write-back put sent before a line L1 was granted is
    /// granted M (L2) while L1 is on its way back, and L1's write-back is lost (a leader
    /// change). The grant ends L1's release (its write-back can only be refused now, and
    /// the put supersedes it): the key is served from L2. Held back instead, it waited
    /// for L1's write-back, which nobody resent once L2's periodic one replaced it.
    #[test]
    fn a_newer_grant_of_the_key_ends_the_release_of_the_line_given_up() {
        let mut r = stored_a();
        r.call(1, CacheCall::Get { key: "k".into() });
        r.put(2, "b", false);
        let read = r.position(is_request(|o| matches!(o, CacheOp::Read)));
        r.apply(read);
        assert_eq!(
            r.replies.get(&1),
            Some(&CacheAnswer::Got {
                hit: true,
                value: Some(b"a".to_vec()),
                state: Mesi::Exclusive
            }),
            "the read is granted first"
        );
        r.call(3, CacheCall::Evict { key: "k".into() });
        let lost = r.position(|c| matches!(c, CacheCommand::WriteBack { .. }));
        r.proposed.remove(lost);
        let write = r.position(is_request(|o| matches!(o, CacheOp::Write { .. })));
        r.apply(write);
        assert_eq!(
            r.replies.get(&2),
            Some(&CacheAnswer::Put {
                state: Mesi::Modified
            }),
            "the put is granted M while the first line is given up"
        );
        assert_eq!(
            r.replies.get(&3),
            Some(&CacheAnswer::Evicted {
                was: Mesi::Exclusive,
                lost: false
            }),
            "the first line's release ends: the put superseded it"
        );
        // L2's periodic write-back goes out and is stored.
        r.now += 100;
        r.agent.tick(r.now, &r.dir);
        r.collect();
        r.apply_all();
        assert_eq!(r.dir.value("k"), Some(&b"b"[..]));
        r.call(4, CacheCall::Get { key: "k".into() });
        match r.replies.get(&4) {
            Some(CacheAnswer::Got {
                hit: true, value, ..
            }) => {
                assert_eq!(value.as_deref(), Some(&b"b"[..]))
            }
            other => panic!("the get is served from the new line: {other:?}"),
        }
    }

    /// helper-15's finding: our own read re-grants the key while our newer line L2 has
    /// just expired here and an older line L1 is on its way back. The read misses and the
    /// expiry is stored; it must not answer L1's "a" and store it under the new epoch
    /// over the acknowledged "b".
    #[test]
    fn a_read_regranted_over_an_expired_line_misses_and_stores_the_expiry() {
        let mut r = Rig::new();
        r.call(1, CacheCall::Get { key: "k".into() });
        r.put(2, "a", false);
        let w1 = r.position(is_request(|o| matches!(o, CacheOp::Write { .. })));
        r.apply(w1);
        assert_eq!(
            r.replies.get(&2),
            Some(&CacheAnswer::Put {
                state: Mesi::Modified
            })
        );
        r.call(
            3,
            CacheCall::Put {
                key: "k".into(),
                value: b"b".to_vec(),
                ttl_ms: Some(100),
                durable: Some(true),
            },
        );
        r.call(4, CacheCall::Evict { key: "k".into() });
        let w2 = r.position(is_request(|o| matches!(o, CacheOp::Write { .. })));
        r.apply(w2);
        assert_eq!(
            r.replies.get(&3),
            Some(&CacheAnswer::Put {
                state: Mesi::Exclusive
            })
        );
        // Expired here (the agent counts the TTL with its clock margin), not yet in the
        // directory.
        r.now += 95;
        assert_eq!(r.agent.serving_state("k", r.now), Mesi::Invalid);
        let read = r.position(is_request(|o| matches!(o, CacheOp::Read)));
        r.apply(read);
        assert_eq!(
            r.replies.get(&1),
            Some(&CacheAnswer::Got {
                hit: false,
                value: None,
                state: Mesi::Invalid
            }),
            "the read misses"
        );
        r.apply_all();
        assert_eq!(r.dir.value("k"), None, "the expiry is stored, \"a\" is not");
        r.call(5, CacheCall::Get { key: "k".into() });
        r.apply_all();
        assert!(
            matches!(r.replies.get(&5), Some(CacheAnswer::Got { hit: false, .. })),
            "a later get misses: {:?}",
            r.replies.get(&5)
        );
    }

    /// Evict calls waiting on one given-up line are capped; past the cap, 429.
    #[test]
    fn evict_calls_waiting_on_a_write_back_are_capped() {
        let mut r = Rig::new();
        r.put(1, "a", false);
        r.apply_all();
        for call in 0..MAX_EVICTS_PER_LINE as u64 + 1 {
            r.call(10 + call, CacheCall::Evict { key: "k".into() });
        }
        let last = 10 + MAX_EVICTS_PER_LINE as u64;
        assert!(
            matches!(
                r.replies.get(&last),
                Some(CacheAnswer::Error(CacheError::Full(_)))
            ),
            "{:?}",
            r.replies.get(&last)
        );
        assert_eq!(r.replies.len(), 2, "the others wait");
        r.apply_all();
        assert_eq!(r.replies.len(), 2 + MAX_EVICTS_PER_LINE);
    }
}
