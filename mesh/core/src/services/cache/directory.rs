//! `CacheDirectory`: the replicated half of the MESI cache, applied from the log.
//!
//! Per key it records who may hold what: the owner (the one node in M or E), the
//! sharers (S), the ownership epoch, the version and the written-back value (the backing
//! store every miss reads). Per node it records the node's cache agent: its registration
//! (the log index that names one process's incarnation), the last request it applied and
//! its lease.
//!
//! ```text
//!   Request { node, seq, key, op } ──> the key's FIFO queue ──> head runs once no copy
//!        Read  ─ owner elsewhere? revoke it (downgrade: it writes back, keeps S)      is
//!              ─ nobody holds it? Granted E; sharers only? Granted S; no value? Miss  being
//!        Write ─ every other copy revoked (invalidate) ─> Granted M (or E, durable)   revoked
//!        Delete─ every copy revoked ─> Deleted
//!   a revoke ends when its holder confirms it (Renew with applied ≥ the revoke's index,
//!   or its WriteBack), or when the holder's lease has run out (lock time)
//! ```
//!
//! **Why a revoke may end at lease expiry** (DESIGN.md section 6): a node serves hits
//! and acknowledges local writes only while its own lease is valid, and its lease is
//! shorter, by its own monotonic clock counted from before it asked, than the lease the
//! directory records from when the renewal applied. So once lock time passes the
//! recorded lease the node stopped serving, whatever became of it. A renewal counts
//! only if the node had applied every revoke of its lines when it sent it, so a node
//! that is alive but behind cannot keep a revoked copy valid.
//!
//! Everything here is deterministic: time is lock time, handed in by the caller; maps
//! are ordered. Requests are deduplicated by (registration, sequence number): a node's
//! agent numbers its requests, resends one that went unanswered under the same number,
//! and learns every outcome by applying the log itself (the directory's events), so no
//! answer has to be kept, only which numbers above the agent's acknowledged floor were
//! applied (Raft thesis 6.3, without the kept answers). Write-backs are deduplicated per key by the write stamp they
//! carry: an older write never overwrites a newer one.

use crate::raft::{LogIndex, NodeId};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// Cache agents (nodes) the directory keeps at most.
pub const MAX_AGENTS: usize = 256;
/// The longest key.
pub const MAX_KEY_BYTES: usize = 1024;
/// The largest value.
pub const MAX_VALUE_BYTES: usize = 1 << 20;
/// Requests waiting on one key at most.
pub const MAX_WAITING_PER_KEY: usize = 1024;
/// Requests waiting over all keys at most.
pub const MAX_WAITING: usize = 100_000;
/// Request numbers one agent may have applied above its acknowledged floor.
pub const MAX_APPLIED_ABOVE_FLOOR: usize = 65_536;

/// The directory's bounds and the lease it grants.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirectoryLimits {
    /// Keys at most.
    pub max_keys: usize,
    /// Key and written-back value bytes at most.
    pub max_bytes: u64,
    /// How long a counted renewal keeps a node's lines (lock time).
    pub lease_ms: u64,
}

impl Default for DirectoryLimits {
    fn default() -> Self {
        Self {
            max_keys: 1_000_000,
            max_bytes: 1 << 30,
            lease_ms: 2_000,
        }
    }
}

/// What a request asks for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CacheOp {
    /// A read miss: a copy (E if nobody else holds the key, else S).
    Read,
    /// Ownership, every other copy invalid. With a value (a durable put) the value is
    /// stored and the line is granted E; without (a write-back put) the line is granted
    /// M and the value stays at the node until it writes it back.
    Write {
        /// The value, for a durable put.
        value: Option<Vec<u8>>,
        /// Time to live of a durable put's value.
        ttl_ms: Option<u64>,
        /// The write stamp of a durable put: a write-back of an older write of the same
        /// node, still on its way, must not overwrite it.
        stamp: u64,
    },
    /// Remove the key: every copy invalid, the value gone.
    Delete,
}

/// How a write-back leaves the writer's copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Keep {
    /// It stays the owner (a periodic write-back).
    Owner,
    /// It keeps a Shared copy (it answers a downgrade, or gives up writing).
    Shared,
    /// It keeps nothing (an eviction, or it answers a downgrade without the line).
    Nothing,
}

/// What a write-back carries for one key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Written {
    /// No new value (the line was clean).
    Unchanged,
    /// The line's value.
    Value {
        /// The value.
        value: Vec<u8>,
        /// Time to live left.
        ttl_ms: Option<u64>,
    },
    /// The line's TTL ran out at the node: the key has no value any more (the older
    /// written-back value must not come back).
    Expired,
}

/// One line of a write-back.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteBackLine {
    /// The key.
    pub key: String,
    /// The ownership epoch the node holds the line under; a stale one is refused.
    pub epoch: u64,
    /// The write stamp of the value carried; an older one than the last accepted is
    /// refused.
    pub stamp: u64,
    /// What is written.
    pub written: Written,
    /// What the node keeps.
    pub keep: Keep,
}

/// A command of the cache directory. Every one names the node whose agent sent it;
/// the leader proposes only what that node sent itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CacheCommand {
    /// A node's agent starts (a new process): what an earlier incarnation held is
    /// dropped (a restarted node holds every line I). `nonce` lets the agent recognise
    /// its own registration when it applies it.
    Register {
        /// The node.
        node: NodeId,
        /// Chosen by the agent.
        nonce: u64,
    },
    /// Confirm the revokes the node has applied and, if it applied all of them, renew
    /// the lease of all its lines at once.
    Renew {
        /// The node.
        node: NodeId,
        /// Its registration.
        session: LogIndex,
        /// The agent's number for this renewal (it knows when it sent it).
        renew: u64,
        /// The node's applied index when it sent this.
        applied: LogIndex,
    },
    /// A miss, a write or a delete that needs the directory.
    Request {
        /// The node.
        node: NodeId,
        /// Its registration.
        session: LogIndex,
        /// Increasing per registration; a resend carries the same number and is
        /// applied once.
        seq: u64,
        /// The agent's lowest number it still waits for: numbers below are forgotten,
        /// and refused as stale if they arrive late.
        ack: u64,
        /// The key.
        key: String,
        /// What it asks for.
        op: CacheOp,
    },
    /// Values of lines the node owns (or owned), and what it keeps.
    WriteBack {
        /// The node.
        node: NodeId,
        /// Its registration.
        session: LogIndex,
        /// The node's applied index when it sent this: a write-back answers a revoke
        /// only if the node had applied the revoke (one sent before says nothing about
        /// what the node does after it).
        applied: LogIndex,
        /// The lines.
        lines: Vec<WriteBackLine>,
    },
}

impl CacheCommand {
    /// The node whose agent sent it.
    pub fn node(&self) -> NodeId {
        match self {
            Self::Register { node, .. }
            | Self::Renew { node, .. }
            | Self::Request { node, .. }
            | Self::WriteBack { node, .. } => *node,
        }
    }
}

/// The state a request was granted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Grant {
    /// Owned, dirty at the node (a write-back put).
    Modified,
    /// Owned, equal to the stored value.
    Exclusive,
    /// A read-only copy.
    Shared,
}

/// What a revoke asks of a copy's holder.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RevokeMode {
    /// Drop it (a writer with its own value, a delete, a lapsed lease). Confirmed by a
    /// renewal sent after the node applied the revoke.
    Invalidate,
    /// Write it back and keep it Shared (a reader). Confirmed by the write-back.
    Downgrade,
    /// Write it back and drop it (a write-back writer: until the new owner writes back,
    /// the stored value must be the latest acknowledged one, so the old owner's dirty
    /// value is saved first). Confirmed by the write-back.
    Flush,
}

/// Why the directory refused a request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CacheRefusal {
    /// The directory is at a bound (keys, bytes or waiting requests): 429.
    Full(String),
    /// The request is malformed (key or value too long): 400.
    Invalid(String),
    /// Below the agent's acknowledged floor: it no longer waits for it.
    Stale,
    /// The registration is not (or no longer) the node's.
    NotRegistered,
}

/// The outcome of a request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// The node may hold the key in `grant`.
    Granted {
        /// The state.
        grant: Grant,
        /// The ownership epoch.
        epoch: u64,
        /// The stored value's version.
        version: u64,
        /// The stored value (for a read; `None` for a write).
        value: Option<Vec<u8>>,
        /// Time to live left of that value.
        ttl_ms: Option<u64>,
    },
    /// A read of a key with no value.
    Miss,
    /// The key is deleted.
    Deleted,
    /// Refused.
    Refused(CacheRefusal),
}

/// Why a write-back line was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WriteBackRefusal {
    /// The node no longer holds the line under that epoch (its ownership was revoked,
    /// by a writer elsewhere or by its lease running out).
    Stale,
    /// A later write of the line was accepted already (a resent write-back).
    Superseded,
    /// The directory is at its byte bound.
    Full,
}

/// What applying a command tells the nodes. Every node applies every entry and acts on
/// the events that name it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CacheEvent {
    /// `node`'s agent registered as `session` (the entry's index).
    Registered {
        /// The node.
        node: NodeId,
        /// The agent's nonce.
        nonce: u64,
        /// The registration.
        session: LogIndex,
    },
    /// A registration with a nonce below the one on record was refused: it can only be
    /// a late copy from an earlier process of the node, or a process whose nonce source
    /// went back (its clock); that one registers again with a nonce above `above`.
    RegisterRefused {
        /// The node.
        node: NodeId,
        /// The refused nonce.
        nonce: u64,
        /// The nonce on record.
        above: u64,
    },
    /// A renewal applied; `counted`: the lease was extended.
    Renewed {
        /// The node.
        node: NodeId,
        /// Its registration.
        session: LogIndex,
        /// The agent's number for it.
        renew: u64,
        /// Whether it counted.
        counted: bool,
    },
    /// `node` must give up its copy of `key` as `mode` says.
    Revoke {
        /// The node.
        node: NodeId,
        /// The key.
        key: String,
        /// The epoch of the copy revoked.
        epoch: u64,
        /// What the node must do.
        mode: RevokeMode,
    },
    /// A request was answered.
    Answered {
        /// The node.
        node: NodeId,
        /// Its registration.
        session: LogIndex,
        /// The request.
        seq: u64,
        /// The key.
        key: String,
        /// The outcome.
        outcome: Outcome,
    },
    /// A write-back line applied.
    WrittenBack {
        /// The node.
        node: NodeId,
        /// Its registration.
        session: LogIndex,
        /// The key.
        key: String,
        /// The epoch it carried.
        epoch: u64,
        /// The stamp it carried.
        stamp: u64,
        /// What it said the node keeps.
        keep: Keep,
        /// The key's version after it.
        version: u64,
        /// `None`: accepted.
        refused: Option<WriteBackRefusal>,
    },
}

/// A node's cache agent, as the directory knows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct AgentRecord {
    /// The index of its registration.
    session: LogIndex,
    /// The nonce it registered with (a resent registration of the same process is
    /// recognised by it).
    nonce: u64,
    /// Request numbers below this are forgotten (the agent waits for none of them).
    floor: u64,
    /// Request numbers at or above `floor` applied.
    applied: BTreeSet<u64>,
    /// Request numbers at or above `floor`, up to this one, not applied are refused:
    /// the cap on `applied` refused one of them, and a copy of it still in the log (a
    /// resend) must not apply once the cap frees, after its caller heard 429.
    refused_through: u64,
    /// Lock time its lines are held until.
    lease_until_ms: u64,
    /// The index of the latest revoke of one of its lines: a renewal counts only if the
    /// node had applied it.
    last_revoke: LogIndex,
    /// Keys it owns, shares or is being revoked from.
    holds: BTreeSet<String>,
    /// Revokes of its lines not yet confirmed.
    revoking: usize,
    /// Revokes of its lines that ended because its lease had run out, ever (what it held
    /// dirty then is lost).
    lapsed: u64,
}

/// A revoke in progress.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Revoking {
    /// The entry that issued it.
    index: LogIndex,
    /// What was asked.
    mode: RevokeMode,
}

/// A request waiting for its turn on a key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Queued {
    node: NodeId,
    session: LogIndex,
    seq: u64,
    op: CacheOp,
}

impl Queued {
    /// The bytes of the value a durable write brings (0 for anything else).
    fn value_len(&self) -> usize {
        match &self.op {
            CacheOp::Write {
                value: Some(value), ..
            } => value.len(),
            _ => 0,
        }
    }
}

/// One key's record.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct KeyRecord {
    /// The written-back value (`None`: no value).
    value: Option<Vec<u8>>,
    /// Raised by every change of the stored value.
    version: u64,
    /// Lock time the stored value expires at.
    expires_ms: Option<u64>,
    /// Raised by every grant of ownership.
    epoch: u64,
    /// The last write stamp accepted under this epoch.
    stamp: u64,
    /// The node in M or E.
    owner: Option<NodeId>,
    /// Nodes in S.
    sharers: BTreeSet<NodeId>,
    /// Copies being revoked (no longer owner or sharer).
    revoking: BTreeMap<NodeId, Revoking>,
    /// Requests in arrival order; the head runs once `revoking` is empty.
    queue: VecDeque<Queued>,
}

impl KeyRecord {
    fn holders(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.owner.into_iter().chain(self.sharers.iter().copied())
    }

    fn is_idle(&self) -> bool {
        self.value.is_none()
            && self.owner.is_none()
            && self.sharers.is_empty()
            && self.revoking.is_empty()
            && self.queue.is_empty()
    }

    /// Key, stored value and the values of durable writes waiting in the queue: a
    /// waiting value is held in memory as much as a stored one, so the byte bound
    /// counts it.
    fn bytes(&self, key: &str) -> u64 {
        let waiting: usize = self.queue.iter().map(Queued::value_len).sum();
        (key.len() + self.value.as_ref().map_or(0, Vec::len) + waiting) as u64
    }
}

/// What a node's line looks like in the directory, for `GET /cache/state`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyDirView {
    /// The owner.
    pub owner: Option<NodeId>,
    /// The sharers.
    pub sharers: Vec<NodeId>,
    /// Nodes being revoked.
    pub revoking: Vec<NodeId>,
    /// The ownership epoch.
    pub epoch: u64,
    /// The stored value's version.
    pub version: u64,
    /// Whether a value is stored.
    pub has_value: bool,
    /// Requests waiting.
    pub waiting: usize,
}

/// The replicated cache directory. See the module docs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheDirectory {
    agents: BTreeMap<NodeId, AgentRecord>,
    keys: BTreeMap<String, KeyRecord>,
    /// (expiry in lock time, key) of every stored value with a TTL.
    expiries: BTreeSet<(u64, String)>,
    bytes: u64,
    waiting: usize,
    limits: DirectoryLimits,
    /// Write-back lines refused as stale, ever.
    stale_writebacks: u64,
    /// Revokes that ended because the holder's lease ran out, ever.
    lease_expiries: u64,
    /// The last ownership epoch granted, over all keys: a key whose record was
    /// removed and made again never reuses an epoch a write-back on its way may carry.
    last_epoch: u64,
}

impl CacheDirectory {
    /// Keys recorded.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether no key is recorded.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Key and value bytes stored.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The bounds.
    pub fn limits(&self) -> DirectoryLimits {
        self.limits
    }

    /// Write-back lines refused as stale, and revokes ended by lease expiry.
    pub fn counters(&self) -> (u64, u64) {
        (self.stale_writebacks, self.lease_expiries)
    }

    /// `node`'s registration, if it has one.
    pub fn session_of(&self, node: NodeId) -> Option<LogIndex> {
        self.agents.get(&node).map(|a| a.session)
    }

    /// Whether `node` holds `key` in the directory's view (owner or sharer) under
    /// `epoch` (for an owner; any epoch for a sharer), and how.
    pub fn holds(&self, node: NodeId, key: &str) -> Option<(Grant, u64)> {
        let rec = self.keys.get(key)?;
        if rec.owner == Some(node) {
            Some((Grant::Exclusive, rec.epoch))
        } else if rec.sharers.contains(&node) {
            Some((Grant::Shared, rec.epoch))
        } else {
            None
        }
    }

    /// Keys whose copy at `node` is being revoked, with the epoch and whether it is a
    /// downgrade (an agent that skipped the events, by a snapshot, answers them).
    pub fn revokes_of(&self, node: NodeId) -> Vec<(String, u64, RevokeMode)> {
        let Some(agent) = self.agents.get(&node) else {
            return Vec::new();
        };
        agent
            .holds
            .iter()
            .filter_map(|k| {
                let rec = self.keys.get(k)?;
                rec.revoking
                    .get(&node)
                    .map(|r| (k.clone(), rec.epoch, r.mode))
            })
            .collect()
    }

    /// The record of `key`, for `GET /cache/state`.
    pub fn view(&self, key: &str) -> Option<KeyDirView> {
        self.keys.get(key).map(|rec| KeyDirView {
            owner: rec.owner,
            sharers: rec.sharers.iter().copied().collect(),
            revoking: rec.revoking.keys().copied().collect(),
            epoch: rec.epoch,
            version: rec.version,
            has_value: rec.value.is_some(),
            waiting: rec.queue.len(),
        })
    }

    /// The stored value's version of `key` (0: no record).
    pub fn version_of(&self, key: &str) -> u64 {
        self.keys.get(key).map_or(0, |r| r.version)
    }

    /// The stored value of `key` (tests and the simulator).
    pub fn value(&self, key: &str) -> Option<&[u8]> {
        self.keys.get(key).and_then(|r| r.value.as_deref())
    }

    /// Every (key, owner, sharers): the simulator's invariants.
    pub fn holders(&self) -> impl Iterator<Item = (&str, Option<NodeId>, &BTreeSet<NodeId>)> {
        self.keys
            .iter()
            .map(|(k, r)| (k.as_str(), r.owner, &r.sharers))
    }

    /// Revokes of `node`'s lines that ended by its lease running out, ever.
    pub fn lapsed_of(&self, node: NodeId) -> u64 {
        self.agents.get(&node).map_or(0, |a| a.lapsed)
    }

    /// Check the directory's own bookkeeping (the simulator runs this after every step):
    /// an owner is no sharer, a copy being revoked is neither, every agent's index of
    /// what it holds and of its revokes matches the keys, and the counts match.
    pub fn check(&self) -> Result<(), String> {
        let mut holds: BTreeMap<NodeId, BTreeSet<&str>> = BTreeMap::new();
        let mut revoking: BTreeMap<NodeId, usize> = BTreeMap::new();
        let (mut waiting, mut bytes) = (0, 0);
        for (key, rec) in &self.keys {
            if rec.owner.is_some_and(|o| rec.sharers.contains(&o)) {
                return Err(format!("{key}: the owner is also a sharer"));
            }
            for n in rec.revoking.keys() {
                if rec.owner == Some(*n) || rec.sharers.contains(n) {
                    return Err(format!("{key}: node{n} is revoked and still holds it"));
                }
                *revoking.entry(*n).or_default() += 1;
            }
            for n in rec.holders().chain(rec.revoking.keys().copied()) {
                holds.entry(n).or_default().insert(key);
            }
            if rec.is_idle() {
                return Err(format!("{key}: an idle record is kept"));
            }
            waiting += rec.queue.len();
            bytes += rec.bytes(key);
        }
        for (node, agent) in &self.agents {
            let want = holds.remove(node).unwrap_or_default();
            let have: BTreeSet<&str> = agent.holds.iter().map(String::as_str).collect();
            if want != have {
                return Err(format!("node{node}: holds {have:?}, the keys say {want:?}"));
            }
            if agent.revoking != revoking.remove(node).unwrap_or(0) {
                return Err(format!("node{node}: the revoke count is off"));
            }
        }
        if let Some((node, keys)) = holds.into_iter().next() {
            return Err(format!("node{node} holds {keys:?} but has no agent record"));
        }
        if waiting != self.waiting || bytes != self.bytes {
            return Err(format!(
                "counts: waiting {} (keys say {waiting}), bytes {} (keys say {bytes})",
                self.waiting, self.bytes
            ));
        }
        Ok(())
    }

    /// The lease of `node` in lock time (0: none).
    pub fn lease_until(&self, node: NodeId) -> u64 {
        self.agents.get(&node).map_or(0, |a| a.lease_until_ms)
    }

    /// The next lock time at which something here is due: a stored value's TTL, or
    /// the lease of a node whose revoke a request waits for.
    pub fn next_deadline_ms(&self) -> Option<u64> {
        let ttl = self.expiries.first().map(|(t, _)| *t);
        let lease = self
            .agents
            .values()
            .filter(|a| a.revoking > 0)
            .map(|a| a.lease_until_ms)
            .min();
        match (ttl, lease) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Lock time reached `now`: stored values whose TTL ran out are removed (every copy
    /// revoked), and revokes of nodes whose lease ran out end.
    pub fn advance(&mut self, index: LogIndex, now: u64, out: &mut Vec<CacheEvent>) {
        while let Some((t, key)) = self.expiries.first().cloned() {
            if t > now {
                break;
            }
            self.expiries.pop_first();
            self.expire_value(index, now, &key, out);
        }
        let lapsed: Vec<NodeId> = self
            .agents
            .iter()
            .filter(|(_, a)| a.revoking > 0 && a.lease_until_ms <= now)
            .map(|(n, _)| *n)
            .collect();
        for node in lapsed {
            let keys: Vec<String> = self
                .agents
                .get(&node)
                .map(|a| a.holds.iter().cloned().collect())
                .unwrap_or_default();
            for key in keys {
                let epoch = self.keys.get(&key).map_or(0, |r| r.epoch);
                if self.end_revoke(node, &key, false) {
                    self.lease_expiries += 1;
                    if let Some(a) = self.agents.get_mut(&node) {
                        a.lapsed += 1;
                        a.last_revoke = index;
                    }
                    // The node may yet apply the revoke it did not answer (a downgrade
                    // would leave it a Shared copy the directory no longer knows of):
                    // this one drops the line, and its lease counts again only once it
                    // has applied it.
                    out.push(CacheEvent::Revoke {
                        node,
                        key: key.clone(),
                        epoch,
                        mode: RevokeMode::Invalidate,
                    });
                    self.pump(index, now, &key, out);
                }
            }
        }
    }

    /// Apply one command at `index`, lock time `now`.
    pub fn apply(
        &mut self,
        index: LogIndex,
        now: u64,
        command: CacheCommand,
        out: &mut Vec<CacheEvent>,
    ) {
        match command {
            CacheCommand::Register { node, nonce } => self.register(index, now, node, nonce, out),
            CacheCommand::Renew {
                node,
                session,
                renew,
                applied,
            } => self.renew(index, now, node, session, renew, applied, out),
            CacheCommand::Request {
                node,
                session,
                seq,
                ack,
                key,
                op,
            } => self.request(
                index,
                now,
                Queued {
                    node,
                    session,
                    seq,
                    op,
                },
                ack,
                key,
                out,
            ),
            CacheCommand::WriteBack {
                node,
                session,
                applied,
                lines,
            } => {
                if self.session_of(node) != Some(session) {
                    return;
                }
                for line in lines {
                    self.write_back(index, now, (node, session, applied), line, out);
                }
            }
        }
    }

    fn register(
        &mut self,
        index: LogIndex,
        now: u64,
        node: NodeId,
        nonce: u64,
        out: &mut Vec<CacheEvent>,
    ) {
        if !self.agents.contains_key(&node) && self.agents.len() >= MAX_AGENTS {
            return;
        }
        if let Some(a) = self.agents.get(&node).filter(|a| a.nonce > nonce) {
            // Registrations of a node are ordered by nonce: a lower one never replaces a
            // live record (whose holds would go without a revoke or a lease wait).
            out.push(CacheEvent::RegisterRefused {
                node,
                nonce,
                above: a.nonce,
            });
            return;
        }
        if let Some(a) = self.agents.get(&node).filter(|a| a.nonce == nonce) {
            // The same process asked again (its first registration was slow to
            // commit): it keeps its registration and what it holds.
            out.push(CacheEvent::Registered {
                node,
                nonce,
                session: a.session,
            });
            return;
        }
        // What the earlier incarnation held is gone with its memory; its requests
        // still queued are dropped when they reach the head (their session is stale).
        let old = self.agents.insert(
            node,
            AgentRecord {
                session: index,
                nonce,
                last_revoke: index,
                ..AgentRecord::default()
            },
        );
        for key in old.map(|a| a.holds).unwrap_or_default() {
            if let Some(rec) = self.keys.get_mut(&key) {
                if rec.owner == Some(node) {
                    rec.owner = None;
                }
                rec.sharers.remove(&node);
                rec.revoking.remove(&node);
            }
            self.pump(index, now, &key, out);
        }
        out.push(CacheEvent::Registered {
            node,
            nonce,
            session: index,
        });
    }

    #[allow(clippy::too_many_arguments)]
    fn renew(
        &mut self,
        index: LogIndex,
        now: u64,
        node: NodeId,
        session: LogIndex,
        renew: u64,
        applied: LogIndex,
        out: &mut Vec<CacheEvent>,
    ) {
        let Some(agent) = self.agents.get(&node).filter(|a| a.session == session) else {
            return;
        };
        // Only keys being revoked from the node can be confirmed; with none (`revoking`
        // counts them, checked by `check`), the scan of everything it holds is skipped:
        // it cost a lookup per held key on every renewal (a third of a lease), 100,000
        // of them for a node holding 100,000 lines.
        let confirmed: Vec<String> = if agent.revoking == 0 {
            Vec::new()
        } else {
            agent
                .holds
                .iter()
                .filter(|k| {
                    self.keys
                        .get(*k)
                        .and_then(|r| r.revoking.get(&node))
                        .is_some_and(|r| r.mode == RevokeMode::Invalidate && r.index <= applied)
                })
                .cloned()
                .collect()
        };
        for key in &confirmed {
            self.end_revoke(node, key, false);
        }
        let lease_ms = self.limits.lease_ms;
        let mut counted = false;
        if let Some(agent) = self.agents.get_mut(&node) {
            if applied >= agent.last_revoke {
                agent.lease_until_ms = agent.lease_until_ms.max(now.saturating_add(lease_ms));
                counted = true;
            }
        }
        for key in &confirmed {
            self.pump(index, now, key, out);
        }
        out.push(CacheEvent::Renewed {
            node,
            session,
            renew,
            counted,
        });
    }

    #[allow(clippy::too_many_arguments)]
    fn request(
        &mut self,
        index: LogIndex,
        now: u64,
        q: Queued,
        ack: u64,
        key: String,
        out: &mut Vec<CacheEvent>,
    ) {
        let answer = |outcome| CacheEvent::Answered {
            node: q.node,
            session: q.session,
            seq: q.seq,
            key: key.clone(),
            outcome,
        };
        let Some(agent) = self
            .agents
            .get_mut(&q.node)
            .filter(|a| a.session == q.session)
        else {
            out.push(answer(Outcome::Refused(CacheRefusal::NotRegistered)));
            return;
        };
        if ack > agent.floor {
            agent.floor = ack.min(q.seq);
            agent.applied = agent.applied.split_off(&agent.floor);
        }
        if q.seq < agent.floor {
            out.push(answer(Outcome::Refused(CacheRefusal::Stale)));
            return;
        }
        if agent.applied.contains(&q.seq) {
            // A resend of a request applied already: its outcome came (or comes) with
            // the first.
            return;
        }
        if agent.applied.len() >= MAX_APPLIED_ABOVE_FLOOR || q.seq <= agent.refused_through {
            agent.refused_through = agent.refused_through.max(q.seq);
            out.push(answer(Outcome::Refused(CacheRefusal::Full(format!(
                "node has {MAX_APPLIED_ABOVE_FLOOR} cache requests unacknowledged"
            )))));
            return;
        }
        agent.applied.insert(q.seq);
        if let Some(why) = self.refusal(&key, &q.op) {
            out.push(answer(Outcome::Refused(why)));
            return;
        }
        let exists = self.keys.contains_key(&key);
        if !exists {
            match q.op {
                // Nothing to read or delete: no record is made.
                CacheOp::Read => return out.push(answer(Outcome::Miss)),
                CacheOp::Delete => return out.push(answer(Outcome::Deleted)),
                CacheOp::Write { .. } => {}
            }
        }
        let rec = self.keys.entry(key.clone()).or_default();
        if !exists {
            self.bytes += key.len() as u64;
        }
        self.bytes += q.value_len() as u64;
        rec.queue.push_back(q);
        self.waiting += 1;
        self.pump(index, now, &key, out);
    }

    /// Why a request must be refused before it queues, if it must.
    fn refusal(&self, key: &str, op: &CacheOp) -> Option<CacheRefusal> {
        if key.is_empty() || key.len() > MAX_KEY_BYTES {
            return Some(CacheRefusal::Invalid(format!(
                "a key is 1 to {MAX_KEY_BYTES} bytes"
            )));
        }
        let rec = self.keys.get(key);
        let added = match op {
            CacheOp::Write {
                value: Some(value), ..
            } => {
                if value.len() > MAX_VALUE_BYTES {
                    return Some(CacheRefusal::Invalid(format!(
                        "a value is at most {MAX_VALUE_BYTES} bytes"
                    )));
                }
                value.len() as u64 + if rec.is_none() { key.len() as u64 } else { 0 }
            }
            CacheOp::Write { value: None, .. } if rec.is_none() => key.len() as u64,
            _ => 0,
        };
        if rec.is_none() && !matches!(op, CacheOp::Write { .. }) {
            return None;
        }
        if rec.is_none() && self.keys.len() >= self.limits.max_keys {
            return Some(CacheRefusal::Full(format!(
                "the cache directory holds {} keys, its bound",
                self.limits.max_keys
            )));
        }
        // (Only what adds bytes is refused at the bound: reads and deletes go on, and a
        // delete is how a full directory shrinks.)
        if added > 0 && self.bytes.saturating_add(added) > self.limits.max_bytes {
            return Some(CacheRefusal::Full(format!(
                "the cache directory holds {} bytes; its bound is {}",
                self.bytes, self.limits.max_bytes
            )));
        }
        if self.waiting >= MAX_WAITING || rec.is_some_and(|r| r.queue.len() >= MAX_WAITING_PER_KEY)
        {
            return Some(CacheRefusal::Full(
                "too many cache requests are waiting; try again".into(),
            ));
        }
        None
    }

    fn write_back(
        &mut self,
        index: LogIndex,
        now: u64,
        (node, session, applied): (NodeId, LogIndex, LogIndex),
        line: WriteBackLine,
        out: &mut Vec<CacheEvent>,
    ) {
        let refused = self.accept_write_back(now, node, applied, &line);
        if refused == Some(WriteBackRefusal::Stale) {
            self.stale_writebacks += 1;
        }
        let version = self.keys.get(&line.key).map_or(0, |r| r.version);
        out.push(CacheEvent::WrittenBack {
            node,
            session,
            key: line.key.clone(),
            epoch: line.epoch,
            stamp: line.stamp,
            keep: line.keep,
            version,
            refused,
        });
        self.pump(index, now, &line.key, out);
    }

    /// Store what a write-back line carries and follow its `keep`; `Some` if refused.
    fn accept_write_back(
        &mut self,
        now: u64,
        node: NodeId,
        applied: LogIndex,
        line: &WriteBackLine,
    ) -> Option<WriteBackRefusal> {
        let max_bytes = self.limits.max_bytes;
        let too_big =
            matches!(&line.written, Written::Value { value, .. } if value.len() > MAX_VALUE_BYTES);
        if too_big || line.key.len() > MAX_KEY_BYTES {
            return Some(WriteBackRefusal::Stale);
        }
        let rec = match self.keys.get_mut(&line.key) {
            Some(rec) if rec.epoch == line.epoch => rec,
            _ => return Some(WriteBackRefusal::Stale),
        };
        let changes = !matches!(line.written, Written::Unchanged);
        if rec.owner != Some(node) && !rec.revoking.contains_key(&node) {
            return Some(WriteBackRefusal::Stale);
        }
        let revoking = rec.revoking.get(&node).copied();
        // A value already stored (a resend) or overtaken by a later one of the same
        // grant is not stored again, but what the line says about keeping still counts:
        // it may be the answer to a revoke.
        // An expiry is news even at the stored stamp: a clean line (its write stored
        // already) that ran out on its holder's clock ends the stored value too, or
        // another node would read back what its holder just answered as a miss.
        let superseded = changes
            && match line.written {
                Written::Expired => line.stamp < rec.stamp,
                _ => line.stamp <= rec.stamp,
            };
        let value = match &line.written {
            _ if superseded => None,
            Written::Unchanged => None,
            Written::Value { value, ttl_ms } => Some(Some((value.clone(), *ttl_ms))),
            Written::Expired => Some(None),
        };
        if let Some(value) = value {
            let added = value.as_ref().map_or(0, |(v, _)| v.len() as u64);
            let removed = rec.value.as_ref().map_or(0, |v| v.len() as u64);
            // A revoke waits for this value: it is taken even past the bound (it
            // replaces a value of the same key; one line is at most MAX_VALUE_BYTES).
            if revoking.is_none() && (self.bytes + added).saturating_sub(removed) > max_bytes {
                return Some(WriteBackRefusal::Full);
            }
            rec.stamp = line.stamp;
            self.store(now, &line.key, value);
        }
        match revoking {
            // Sent before the node applied the revoke: only the value counts.
            Some(r) if applied < r.index => {}
            // A downgrade ends with this write-back; an invalidation only hears the
            // value (a writer elsewhere takes over, whatever the node wanted to keep).
            Some(r) => {
                let keep_shared = r.mode == RevokeMode::Downgrade && line.keep != Keep::Nothing;
                self.end_revoke(node, &line.key, keep_shared);
            }
            None => match line.keep {
                Keep::Owner => {}
                Keep::Shared => {
                    if let Some(rec) = self.keys.get_mut(&line.key) {
                        rec.owner = None;
                        rec.sharers.insert(node);
                    }
                }
                Keep::Nothing => {
                    if let Some(rec) = self.keys.get_mut(&line.key) {
                        rec.owner = None;
                    }
                    if let Some(a) = self.agents.get_mut(&node) {
                        a.holds.remove(&line.key);
                    }
                }
            },
        }
        None
    }

    /// Store `value` (with its TTL; `None`: no value) as `key`'s written-back value.
    fn store(&mut self, now: u64, key: &str, value: Option<(Vec<u8>, Option<u64>)>) {
        let Some(rec) = self.keys.get_mut(key) else {
            return;
        };
        let old_bytes = rec.bytes(key);
        if let Some(t) = rec.expires_ms.take() {
            self.expiries.remove(&(t, key.to_owned()));
        }
        let (value, ttl_ms) = match value {
            Some((v, ttl)) => (Some(v), ttl),
            None => (None, None),
        };
        rec.value = value;
        rec.version += 1;
        rec.expires_ms = ttl_ms.map(|t| now.saturating_add(t));
        if let Some(t) = rec.expires_ms {
            self.expiries.insert((t, key.to_owned()));
        }
        self.bytes = self.bytes - old_bytes + rec.bytes(key);
    }

    /// The stored value of `key` ran out: it is gone, and every Shared copy of it is
    /// revoked. An owner keeps its line: a dirty one holds a later write than the value
    /// that expired, and a clean one's own TTL, counted from before it asked, ran out
    /// first.
    fn expire_value(&mut self, index: LogIndex, now: u64, key: &str, out: &mut Vec<CacheEvent>) {
        let Some(rec) = self.keys.get_mut(key) else {
            return;
        };
        let old_bytes = rec.bytes(key);
        rec.value = None;
        rec.expires_ms = None;
        rec.version += 1;
        self.bytes -= old_bytes - rec.bytes(key);
        let sharers: Vec<NodeId> = rec.sharers.iter().copied().collect();
        for node in sharers {
            self.revoke(index, now, key, node, RevokeMode::Invalidate, out);
        }
        self.pump(index, now, key, out);
    }

    /// Revoke `node`'s copy of `key`. A node whose lease ran out is past serving it:
    /// its copy ends at once (it still hears the revoke, and drops the line).
    fn revoke(
        &mut self,
        index: LogIndex,
        now: u64,
        key: &str,
        node: NodeId,
        mode: RevokeMode,
        out: &mut Vec<CacheEvent>,
    ) {
        let Some(rec) = self.keys.get_mut(key) else {
            return;
        };
        if rec.owner == Some(node) {
            rec.owner = None;
        }
        rec.sharers.remove(&node);
        let epoch = rec.epoch;
        let Some(agent) = self.agents.get_mut(&node) else {
            return;
        };
        agent.last_revoke = index;
        // A node past its lease is told to drop the line, never to keep a Shared copy
        // the directory no longer counts.
        let mode = if agent.lease_until_ms > now {
            mode
        } else {
            RevokeMode::Invalidate
        };
        if agent.lease_until_ms > now {
            agent.revoking += 1;
            rec.revoking.insert(node, Revoking { index, mode });
        } else {
            agent.holds.remove(key);
            agent.lapsed += 1;
            self.lease_expiries += 1;
        }
        out.push(CacheEvent::Revoke {
            node,
            key: key.to_owned(),
            epoch,
            mode,
        });
    }

    /// End `node`'s revoke of `key` (keeping a Shared copy if `keep_shared`). Whether
    /// there was one.
    fn end_revoke(&mut self, node: NodeId, key: &str, keep_shared: bool) -> bool {
        let Some(rec) = self.keys.get_mut(key) else {
            return false;
        };
        if rec.revoking.remove(&node).is_none() {
            return false;
        }
        if keep_shared {
            rec.sharers.insert(node);
        }
        if let Some(a) = self.agents.get_mut(&node) {
            a.revoking = a.revoking.saturating_sub(1);
            if !keep_shared {
                a.holds.remove(key);
            }
        }
        true
    }

    /// Run the queued requests of `key` for as long as no revoke holds them up.
    fn pump(&mut self, index: LogIndex, now: u64, key: &str, out: &mut Vec<CacheEvent>) {
        loop {
            let Some(rec) = self.keys.get_mut(key) else {
                return;
            };
            if !rec.revoking.is_empty() {
                return;
            }
            let Some(q) = rec.queue.pop_front() else {
                if rec.is_idle() {
                    let bytes = rec.bytes(key);
                    self.bytes -= bytes;
                    self.keys.remove(key);
                }
                return;
            };
            self.waiting -= 1;
            self.bytes -= q.value_len() as u64;
            if self.agents.get(&q.node).map(|a| a.session) != Some(q.session) {
                continue;
            }
            let owner = rec.owner;
            let blockers: Vec<(NodeId, RevokeMode)> = match &q.op {
                CacheOp::Read => owner
                    .filter(|o| *o != q.node)
                    .map(|o| (o, RevokeMode::Downgrade))
                    .into_iter()
                    .collect(),
                // A durable write brings its own value; a write-back one does not, and
                // if its writer never holds the line (its caller gave up), the stored
                // value must still be the latest acknowledged: the old owner's is saved.
                CacheOp::Write { value, .. } => rec
                    .holders()
                    .filter(|n| *n != q.node)
                    .map(|n| {
                        let flush = value.is_none() && Some(n) == owner;
                        (
                            n,
                            if flush {
                                RevokeMode::Flush
                            } else {
                                RevokeMode::Invalidate
                            },
                        )
                    })
                    .collect(),
                CacheOp::Delete => rec.holders().map(|n| (n, RevokeMode::Invalidate)).collect(),
            };
            if !blockers.is_empty() {
                self.bytes += q.value_len() as u64;
                rec.queue.push_front(q);
                self.waiting += 1;
                for (node, mode) in blockers {
                    self.revoke(index, now, key, node, mode, out);
                }
                continue;
            }
            let outcome = self.run(now, key, &q);
            out.push(CacheEvent::Answered {
                node: q.node,
                session: q.session,
                seq: q.seq,
                key: key.to_owned(),
                outcome,
            });
        }
    }

    /// A read that nothing holds up: E if nobody holds the key, S beside others.
    fn run_read(rec: &mut KeyRecord, node: NodeId, now: u64, last_epoch: &mut u64) -> Outcome {
        if rec.value.is_none() {
            return Outcome::Miss;
        }
        // Every grant of ownership is a new epoch, even to the owner again (it lost its
        // line): a write-back or release of the earlier grant still on its way must not
        // count for this one.
        let grant = if rec.owner == Some(node) || rec.owner.is_none() && rec.sharers.is_empty() {
            rec.owner = Some(node);
            *last_epoch += 1;
            rec.epoch = *last_epoch;
            rec.stamp = 0;
            Grant::Exclusive
        } else {
            rec.sharers.insert(node);
            Grant::Shared
        };
        Outcome::Granted {
            grant,
            epoch: rec.epoch,
            version: rec.version,
            value: rec.value.clone(),
            ttl_ms: rec.expires_ms.map(|t| t.saturating_sub(now)),
        }
    }

    /// Run a request that nothing holds up.
    fn run(&mut self, now: u64, key: &str, q: &Queued) -> Outcome {
        let Some(rec) = self.keys.get_mut(key) else {
            return Outcome::Miss;
        };
        let mut held = false;
        let outcome = match &q.op {
            CacheOp::Read => {
                held = rec.value.is_some();
                Self::run_read(rec, q.node, now, &mut self.last_epoch)
            }
            CacheOp::Write {
                value,
                ttl_ms,
                stamp,
            } => {
                rec.owner = Some(q.node);
                self.last_epoch += 1;
                rec.epoch = self.last_epoch;
                rec.stamp = 0;
                if value.is_some() {
                    rec.stamp = rec.stamp.max(*stamp);
                }
                rec.sharers.remove(&q.node);
                held = true;
                let epoch = rec.epoch;
                let grant = match value {
                    Some(v) => {
                        self.store(now, key, Some((v.clone(), *ttl_ms)));
                        Grant::Exclusive
                    }
                    None => Grant::Modified,
                };
                Outcome::Granted {
                    grant,
                    epoch,
                    version: self.keys.get(key).map_or(0, |r| r.version),
                    value: None,
                    ttl_ms: None,
                }
            }
            CacheOp::Delete => {
                self.store(now, key, None);
                Outcome::Deleted
            }
        };
        if held {
            if let Some(a) = self.agents.get_mut(&q.node) {
                a.holds.insert(key.to_owned());
            }
        }
        outcome
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory with two registered nodes (1 and 2), both with a valid lease.
    fn two_nodes(limits: DirectoryLimits) -> (CacheDirectory, Vec<CacheEvent>) {
        let mut d = CacheDirectory {
            limits,
            ..CacheDirectory::default()
        };
        let mut out = Vec::new();
        for (node, index) in [(1, 1), (2, 2)] {
            d.apply(
                index,
                0,
                CacheCommand::Register { node, nonce: 7 },
                &mut out,
            );
            d.apply(
                index + 10,
                0,
                CacheCommand::Renew {
                    node,
                    session: index,
                    renew: 1,
                    applied: index,
                },
                &mut out,
            );
        }
        (d, out)
    }

    fn request(node: NodeId, seq: u64, key: &str, op: CacheOp) -> CacheCommand {
        CacheCommand::Request {
            node,
            session: node,
            seq,
            ack: 1,
            key: key.into(),
            op,
        }
    }

    fn write(value: Option<&str>) -> CacheOp {
        CacheOp::Write {
            value: value.map(|v| v.as_bytes().to_vec()),
            ttl_ms: None,
            stamp: 0,
        }
    }

    fn outcome(out: &[CacheEvent], node: NodeId, seq: u64) -> Option<Outcome> {
        out.iter().find_map(|e| match e {
            CacheEvent::Answered {
                node: n,
                seq: s,
                outcome,
                ..
            } if *n == node && *s == seq => Some(outcome.clone()),
            _ => None,
        })
    }

    fn wb(key: &str, epoch: u64, stamp: u64, value: &str, keep: Keep) -> WriteBackLine {
        WriteBackLine {
            key: key.into(),
            epoch,
            stamp,
            written: Written::Value {
                value: value.as_bytes().to_vec(),
                ttl_ms: None,
            },
            keep,
        }
    }

    /// A write-back sent before its node applied the revoke says nothing about what the
    /// node does afterwards: it stores the value but ends no revoke. One sent after
    /// does; a write-back writer's revoke of the owner needs the owner's value.
    #[test]
    fn only_a_write_back_sent_after_the_revoke_answers_it() {
        let (mut d, _) = two_nodes(DirectoryLimits::default());
        let mut out = Vec::new();
        d.apply(20, 0, request(1, 1, "k", write(None)), &mut out);
        assert!(matches!(
            outcome(&out, 1, 1),
            Some(Outcome::Granted {
                grant: Grant::Modified,
                epoch: 1,
                ..
            })
        ));
        out.clear();
        d.apply(21, 0, request(2, 1, "k", write(None)), &mut out);
        assert!(outcome(&out, 2, 1).is_none(), "waits for node1's copy");
        let early = CacheCommand::WriteBack {
            node: 1,
            session: 1,
            applied: 20,
            lines: vec![wb("k", 1, 5, "v1", Keep::Owner)],
        };
        out.clear();
        d.apply(22, 0, early, &mut out);
        assert!(
            outcome(&out, 2, 1).is_none(),
            "a write-back from before the revoke"
        );
        assert_eq!(d.value("k"), Some(&b"v1"[..]), "its value is kept");
        // The owner's dirty value must reach the store first (a flush): a renewal does
        // not end it; its write-back sent after the revoke does.
        let renew = CacheCommand::Renew {
            node: 1,
            session: 1,
            renew: 2,
            applied: 21,
        };
        out.clear();
        d.apply(23, 0, renew, &mut out);
        assert!(outcome(&out, 2, 1).is_none(), "a flush needs the value");
        let late = CacheCommand::WriteBack {
            node: 1,
            session: 1,
            applied: 21,
            lines: vec![wb("k", 1, 6, "v2", Keep::Nothing)],
        };
        d.apply(24, 0, late, &mut out);
        assert_eq!(
            d.value("k"),
            Some(&b"v2"[..]),
            "the latest acknowledged value"
        );
        assert!(matches!(
            outcome(&out, 2, 1),
            Some(Outcome::Granted {
                grant: Grant::Modified,
                epoch: 2,
                ..
            })
        ));
        d.check().expect("bookkeeping");
    }

    /// A holder that does not answer holds a writer up until its lease runs out (lock
    /// time), never longer; it is then told to drop its line, and a write-back of the
    /// old epoch is refused.
    #[test]
    fn an_unanswered_revoke_ends_when_the_holders_lease_runs_out() {
        let (mut d, _) = two_nodes(DirectoryLimits::default());
        let mut out = Vec::new();
        d.apply(20, 0, request(1, 1, "k", write(None)), &mut out);
        d.apply(21, 100, request(2, 1, "k", write(None)), &mut out);
        assert_eq!(d.next_deadline_ms(), Some(2_000), "node1's lease");
        out.clear();
        d.advance(22, 1_999, &mut out);
        assert!(outcome(&out, 2, 1).is_none());
        d.advance(23, 2_000, &mut out);
        assert!(out.iter().any(|e| matches!(
            e,
            CacheEvent::Revoke {
                node: 1,
                mode: RevokeMode::Invalidate,
                ..
            }
        )));
        assert!(matches!(outcome(&out, 2, 1), Some(Outcome::Granted { .. })));
        assert_eq!(d.lapsed_of(1), 1);
        out.clear();
        let stale = CacheCommand::WriteBack {
            node: 1,
            session: 1,
            applied: 30,
            lines: vec![wb("k", 1, 9, "old", Keep::Owner)],
        };
        d.apply(24, 2_001, stale, &mut out);
        assert!(out.iter().any(|e| matches!(
            e,
            CacheEvent::WrittenBack {
                refused: Some(WriteBackRefusal::Stale),
                ..
            }
        )));
        assert_eq!(d.value("k"), None);
        d.check().expect("bookkeeping");
    }

    /// A registration resent by the same process (same nonce) keeps what it holds; a
    /// write-back writer's flush of the owner is answered even when the value it carries
    /// was stored already by an earlier write-back of the same stamp; epochs never repeat
    /// for a key made again after it was removed.
    #[test]
    fn resent_registrations_superseded_answers_and_remade_keys_keep_the_protocol_safe() {
        let (mut d, _) = two_nodes(DirectoryLimits::default());
        let mut out = Vec::new();
        d.apply(20, 0, request(1, 1, "k", write(None)), &mut out);
        d.apply(
            21,
            0,
            CacheCommand::Register { node: 1, nonce: 7 },
            &mut out,
        );
        assert_eq!(
            d.holds(1, "k").map(|h| h.0),
            Some(Grant::Exclusive),
            "a resent registration forgets nothing"
        );
        assert_eq!(d.session_of(1), Some(1));
        // Node1's periodic write-back of stamp 5, then node2 writes: node1 is flushed.
        let periodic = CacheCommand::WriteBack {
            node: 1,
            session: 1,
            applied: 21,
            lines: vec![wb("k", 1, 5, "v1", Keep::Owner)],
        };
        d.apply(22, 0, periodic, &mut out);
        d.apply(23, 0, request(2, 1, "k", write(None)), &mut out);
        out.clear();
        let answer = CacheCommand::WriteBack {
            node: 1,
            session: 1,
            applied: 23,
            lines: vec![wb("k", 1, 5, "v1", Keep::Nothing)],
        };
        d.apply(24, 0, answer, &mut out);
        let Some(Outcome::Granted { epoch, .. }) = outcome(&out, 2, 1) else {
            panic!("the flush was answered by a write-back of a stored stamp: {out:?}");
        };
        // Deleted (the record goes), then written again: a new epoch, not 1 again.
        d.apply(25, 0, request(2, 2, "k", CacheOp::Delete), &mut out);
        d.apply(
            26,
            0,
            CacheCommand::Renew {
                node: 2,
                session: 2,
                renew: 3,
                applied: 25,
            },
            &mut out,
        );
        out.clear();
        d.apply(27, 0, request(1, 2, "k", write(None)), &mut out);
        let Some(Outcome::Granted { epoch: again, .. }) = outcome(&out, 1, 2) else {
            panic!("granted: {out:?}");
        };
        assert!(again > epoch, "epoch {again} after {epoch}");
        d.check().expect("bookkeeping");
    }

    /// A resent request is applied once; a new registration drops what the earlier
    /// process held; the bounds refuse with Full.
    #[test]
    fn resends_apply_once_registrations_forget_and_bounds_refuse() {
        let limits = DirectoryLimits {
            max_keys: 1,
            ..DirectoryLimits::default()
        };
        let (mut d, _) = two_nodes(limits);
        let mut out = Vec::new();
        d.apply(20, 0, request(1, 1, "a", write(Some("x"))), &mut out);
        d.apply(21, 0, request(1, 1, "a", write(Some("x"))), &mut out);
        let answers = out
            .iter()
            .filter(|e| matches!(e, CacheEvent::Answered { .. }))
            .count();
        assert_eq!(answers, 1, "the resend is not applied again");
        out.clear();
        d.apply(22, 0, request(2, 1, "b", write(None)), &mut out);
        assert!(matches!(
            outcome(&out, 2, 1),
            Some(Outcome::Refused(CacheRefusal::Full(_)))
        ));
        assert_eq!(d.holds(1, "a").map(|h| h.0), Some(Grant::Exclusive));
        out.clear();
        d.apply(
            23,
            0,
            CacheCommand::Register { node: 1, nonce: 8 },
            &mut out,
        );
        assert_eq!(d.holds(1, "a"), None, "a restarted node holds nothing");
        assert_eq!(d.value("a"), Some(&b"x"[..]), "the stored value stays");
        d.check().expect("bookkeeping");
    }

    /// Durable writes queued behind a revoke hold their values in memory; the byte
    /// bound counts them, so a flood of large writes to a held key is refused rather
    /// than queued without limit.
    #[test]
    fn waiting_durable_values_count_against_the_byte_bound() {
        let limits = DirectoryLimits {
            max_bytes: 1000,
            ..DirectoryLimits::default()
        };
        let (mut d, _) = two_nodes(limits);
        let mut out = Vec::new();
        d.apply(20, 0, request(1, 1, "a", write(None)), &mut out);
        assert_eq!(d.holds(1, "a").map(|h| h.0), Some(Grant::Exclusive));
        let big = "v".repeat(600);
        out.clear();
        d.apply(21, 0, request(2, 1, "a", write(Some(&big))), &mut out);
        assert_eq!(outcome(&out, 2, 1), None, "waits for node1's revoke");
        assert_eq!(d.bytes(), 601, "the key and the waiting value");
        d.apply(22, 0, request(2, 2, "a", write(Some(&big))), &mut out);
        assert!(
            matches!(
                outcome(&out, 2, 2),
                Some(Outcome::Refused(CacheRefusal::Full(_)))
            ),
            "a second waiting value passes the bound: {out:?}"
        );
        d.check().expect("bookkeeping");
    }

    /// Registrations are ordered by nonce: a late copy of an earlier process's
    /// registration never replaces the live one (whose holds would vanish without a
    /// revoke or a lease wait); it is refused, naming the nonce on record.
    #[test]
    fn a_lower_nonce_never_replaces_a_live_registration() {
        let (mut d, _) = two_nodes(DirectoryLimits::default());
        let mut out = Vec::new();
        d.apply(20, 0, request(1, 1, "a", write(None)), &mut out);
        assert_eq!(d.holds(1, "a").map(|h| h.0), Some(Grant::Exclusive));
        out.clear();
        d.apply(
            21,
            0,
            CacheCommand::Register { node: 1, nonce: 6 },
            &mut out,
        );
        assert_eq!(
            out,
            vec![CacheEvent::RegisterRefused {
                node: 1,
                nonce: 6,
                above: 7
            }]
        );
        assert_eq!(d.session_of(1), Some(1), "the live registration stays");
        assert_eq!(d.holds(1, "a").map(|h| h.0), Some(Grant::Exclusive));
        d.check().expect("bookkeeping");
    }

    /// A request refused because its node has `MAX_APPLIED_ABOVE_FLOOR` requests applied
    /// above its floor stays refused: a resend of it, applied once the floor moved and
    /// the cap freed, would store a put whose caller heard 429.
    #[test]
    fn a_request_refused_at_the_applied_cap_stays_refused() {
        let (mut d, _) = two_nodes(DirectoryLimits::default());
        let mut out = Vec::new();
        let mut index = 100;
        let mut apply = |d: &mut CacheDirectory, out: &mut Vec<CacheEvent>, c| {
            index += 1;
            out.clear();
            d.apply(index, 0, c, out);
        };
        // Request 1 never completes (the agent's ack stays 1): everything applied after
        // it is above the floor. Reads of absent keys leave no record but their number.
        let cap = MAX_APPLIED_ABOVE_FLOOR as u64;
        for seq in 2..cap + 2 {
            apply(&mut d, &mut out, request(1, seq, "absent", CacheOp::Read));
        }
        let put = |seq, ack| CacheCommand::Request {
            node: 1,
            session: 1,
            seq,
            ack,
            key: "k".into(),
            op: write(Some("v")),
        };
        apply(&mut d, &mut out, put(cap + 2, 1));
        assert!(
            matches!(
                outcome(&out, 1, cap + 2),
                Some(Outcome::Refused(CacheRefusal::Full(_)))
            ),
            "{out:?}"
        );
        // The floor moves on; the cap frees; then the refused put's resend applies.
        apply(
            &mut d,
            &mut out,
            request(1, cap + 3, "absent", CacheOp::Read),
        );
        let mut ack_moved = request(1, cap + 4, "absent", CacheOp::Read);
        if let CacheCommand::Request { ack, .. } = &mut ack_moved {
            *ack = cap;
        }
        apply(&mut d, &mut out, ack_moved);
        assert_eq!(outcome(&out, 1, cap + 4), Some(Outcome::Miss));
        apply(&mut d, &mut out, put(cap + 2, cap));
        assert!(
            matches!(
                outcome(&out, 1, cap + 2),
                Some(Outcome::Refused(CacheRefusal::Full(_)))
            ),
            "the resend: {out:?}"
        );
        assert_eq!(d.value("k"), None, "nothing was stored");
    }
}
