//! `LockTable`: shared (S) and exclusive (X) locks on string keys, as a deterministic
//! state machine applied from the Raft log.
//!
//! ```text
//!   acquire ──compatible & nobody queued──> granted (token = Raft index of the grant)
//!      │ wait_ms = 0 ─────────────────────> conflict (holders named)
//!      │ would close a wait-for cycle ────> deadlock (cycle named)
//!      └──> queued FIFO ──release/expiry──> granted ──lease ends──> released
//!                     ├──deadline passes──> timed out
//!                     └──withdrawn───────> cancelled (a grant that raced it is released)
//! ```
//! Time is *lock time* (DESIGN.md section 6), handed in by the caller with every command
//! and computed from committed entries only, never a clock of this node; the table
//! keeps the largest it has seen. A release hands the lock to the next waiters in the
//! same apply, so a hot key moves from holder to holder in one commit each. Fencing
//! tokens are Raft indexes, so they increase strictly per key (and globally).
//!
//! Every queued request has a [`WaitId`] (the index of the acquire that queued it): its
//! grant, time-out or withdrawal names that id, so the node answers exactly the call
//! that waited, never another call of the same client on the same key.

#[cfg(test)]
mod tests;

use crate::raft::LogIndex;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// Longest key, in bytes.
pub const MAX_KEY_BYTES: usize = 256;
/// Longest client id, in bytes.
pub const MAX_CLIENT_BYTES: usize = 256;
/// Waiters per key at most.
pub const MAX_WAITERS_PER_KEY: usize = 4096;
/// Lease of a grant when the request names none.
pub const DEFAULT_TTL_MS: u64 = 30_000;
/// Longest lease and longest wait.
pub const MAX_TTL_MS: u64 = 24 * 3600 * 1000;

/// Names one queued request: the log index of the acquire that queued it.
pub type WaitId = LogIndex;

/// Lock mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Mode {
    /// Shared: any number of S holders together.
    S,
    /// Exclusive: one holder, nobody else.
    X,
}

/// A change to the lock table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LockCommand {
    /// Take `key` in `mode` for `client`, holding it `ttl_ms`; wait up to `wait_ms`.
    Acquire {
        /// Key.
        key: String,
        /// Client.
        client: String,
        /// Mode.
        mode: Mode,
        /// Lease.
        ttl_ms: u64,
        /// How long to wait in the queue (0: answer at once).
        wait_ms: u64,
    },
    /// Give up `key`.
    Release {
        /// Key.
        key: String,
        /// Client.
        client: String,
    },
    /// Extend every lease `client` holds by its own ttl.
    Renew {
        /// Client.
        client: String,
    },
}

/// Who holds a key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    /// Client.
    pub client: String,
    /// Mode held.
    pub mode: Mode,
    /// Fencing token.
    pub token: u64,
    /// Leader time at which the lease ends.
    pub expires_ms: u64,
}

/// The immediate answer to a command.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LockReply {
    /// Granted now.
    Granted {
        /// Fencing token.
        token: u64,
        /// Mode held (X if an X holder asked for S).
        mode: Mode,
        /// Lock time at which the lease ends.
        expires_ms: u64,
        /// Lease left when it was granted (the holder counts it from its own request).
        expires_in_ms: u64,
        /// The hold's own lease length: what a renewal extends it by.
        ttl_ms: u64,
    },
    /// Queued; a [`LockEvent::Granted`] or [`LockEvent::TimedOut`] naming `wait`
    /// follows, unless the request is withdrawn first.
    Queued {
        /// The queued request.
        wait: WaitId,
    },
    /// Not grantable and the caller would not wait.
    Conflict {
        /// Current holders.
        holders: Vec<Holder>,
    },
    /// Waiting would close a cycle of waiters; refused.
    Deadlock {
        /// The cycle: the requester, whom it would wait for, ..., the requester.
        cycle: Vec<String>,
    },
    /// Released.
    Released,
    /// The client does not hold the key.
    NotHeld {
        /// Current holders.
        holders: Vec<Holder>,
    },
    /// Leases extended.
    Renewed {
        /// Locks renewed.
        locks: usize,
    },
    /// The command is invalid.
    Invalid(String),
    /// Too many waiters on the key.
    Busy,
    /// A queued request gave up waiting (the final answer of a [`LockEvent::TimedOut`]).
    TimedOut {
        /// Holders at the time.
        holders: Vec<Holder>,
    },
}

impl LockReply {
    /// Whether the call that got this reply still waits for its outcome.
    pub fn is_waiting(&self) -> bool {
        matches!(self, Self::Queued { .. })
    }
}

/// Something that happened to a waiter or holder as a side effect of a command.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LockEvent {
    /// A queued request was granted.
    Granted {
        /// The request.
        wait: WaitId,
        /// Key.
        key: String,
        /// Client.
        client: String,
        /// Fencing token.
        token: u64,
        /// Mode.
        mode: Mode,
        /// Lease end (lock time).
        expires_ms: u64,
        /// Lease left at the grant.
        expires_in_ms: u64,
        /// The hold's own lease length.
        ttl_ms: u64,
    },
    /// A queued request gave up waiting.
    TimedOut {
        /// The request.
        wait: WaitId,
        /// Key.
        key: String,
        /// Client.
        client: String,
        /// Holders at the time.
        holders: Vec<Holder>,
    },
    /// A lease ran out and the lock was released.
    Expired {
        /// Key.
        key: String,
        /// Client.
        client: String,
        /// Token of the expired grant.
        token: u64,
    },
}

impl Hold {
    /// A grant at lock time `now`. An upgrade (the client held S) keeps at least the
    /// lease its S hold had, both what is left of it and its length (what a renewal
    /// extends by): the holder may not have heard of the upgrade, and counts on its S
    /// hold still.
    fn granted(mode: Mode, token: u64, ttl_ms: u64, now: u64, upgrades: Option<&Self>) -> Self {
        let expires_ms = now.saturating_add(ttl_ms);
        Self {
            mode,
            token,
            ttl_ms: upgrades.map_or(ttl_ms, |h| h.ttl_ms.max(ttl_ms)),
            expires_ms: upgrades.map_or(expires_ms, |h| h.expires_ms.max(expires_ms)),
            upgraded_from: upgrades.map(|h| (h.token, h.ttl_ms)),
            upgraded_from_reported: upgrades.is_some_and(|h| h.reported_again),
            reported_again: false,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Hold {
    mode: Mode,
    token: u64,
    ttl_ms: u64,
    expires_ms: u64,
    /// For an X hold that upgraded an S hold: that S hold's token and lease length,
    /// restored if the upgrade is withdrawn.
    upgraded_from: Option<(u64, u64)>,
    /// That S hold was also answered to a later call (see `reported_again`).
    #[serde(default)]
    upgraded_from_reported: bool,
    /// This grant was also answered to a later call of the same client (an acquire of
    /// what it holds): withdrawing the call it was made for must not release it.
    #[serde(default)]
    reported_again: bool,
}

/// A queued request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Waiter {
    /// Which request it is.
    pub id: WaitId,
    /// Client.
    pub client: String,
    /// Mode wanted.
    pub mode: Mode,
    /// Lease it will get.
    pub ttl_ms: u64,
    /// Leader time at which it gives up.
    pub deadline_ms: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct KeyState {
    holders: BTreeMap<String, Hold>,
    waiters: VecDeque<Waiter>,
}

impl KeyState {
    fn mode(&self) -> Option<Mode> {
        self.holders.values().map(|h| h.mode).max()
    }

    fn holders(&self) -> Vec<Holder> {
        self.holders
            .iter()
            .map(|(c, h)| Holder {
                client: c.clone(),
                mode: h.mode,
                token: h.token,
                expires_ms: h.expires_ms,
            })
            .collect()
    }

    /// Could `client` hold `mode` alongside the current holders?
    fn compatible(&self, client: &str, mode: Mode) -> bool {
        let others = self.holders.iter().filter(|(c, _)| c.as_str() != client);
        match mode {
            Mode::X => others.count() == 0,
            Mode::S => others.into_iter().all(|(_, h)| h.mode == Mode::S),
        }
    }
}

/// A read of the table for `/lock/state` and the console.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyView {
    /// Key.
    pub key: String,
    /// Strongest mode held, if any.
    pub mode: Option<Mode>,
    /// Holders.
    pub holders: Vec<Holder>,
    /// Waiters in order.
    pub waiters: Vec<Waiter>,
}

/// Counts of what happened, kept in the replicated state (for metrics, the console and
/// the simulator's coverage report).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockStats {
    /// Requests refused for deadlock.
    pub deadlocks: u64,
    /// Queued requests that were granted.
    pub waits_granted: u64,
    /// Queued requests whose wait ran out.
    pub waits_timed_out: u64,
    /// Leases that ran out.
    pub leases_expired: u64,
    /// Upgrades (an S holder asking X) that had to wait.
    pub upgrades_waited: u64,
    /// Queued requests withdrawn before their grant.
    pub waits_withdrawn: u64,
    /// Grants released because the call they answered had been withdrawn.
    pub grants_withdrawn: u64,
}

/// Deadlock refusals the table remembers (the newest), for the console.
pub const RECENT_DEADLOCKS: usize = 8;

/// A request refused because waiting would have closed a cycle.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadlockRefusal {
    /// Lock time of the refusal, ms.
    pub at_ms: u64,
    /// The key asked for.
    pub key: String,
    /// The cycle: the requester, whom it would wait for, ..., the requester.
    pub cycle: Vec<String>,
}

/// The lock table.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockTable {
    keys: BTreeMap<String, KeyState>,
    /// Every lease end and wait deadline, by time: a key is looked at when one of its
    /// times passes (entries left behind by releases and renewals are harmless).
    deadlines: BTreeSet<(u64, String)>,
    now_ms: u64,
    stats: LockStats,
    /// The newest deadlock refusals, oldest first (at most [`RECENT_DEADLOCKS`]).
    recent_deadlocks: VecDeque<DeadlockRefusal>,
    /// Check every deadlock decision against [`LockTable::reference_cycle`] (the
    /// simulator's oracle; costly, off in production). Not replicated state.
    #[serde(skip)]
    audit: bool,
    /// Decisions the reference search disagreed with.
    #[serde(skip)]
    audit_failures: u64,
}

fn validate(key: &str, client: &str) -> Result<(), String> {
    if key.is_empty() || key.len() > MAX_KEY_BYTES {
        return Err(format!("key must be 1 to {MAX_KEY_BYTES} bytes"));
    }
    if client.is_empty() || client.len() > MAX_CLIENT_BYTES {
        return Err(format!("client_id must be 1 to {MAX_CLIENT_BYTES} bytes"));
    }
    Ok(())
}

/// Whether a request in mode `want` must wait for someone holding (or queued for) `other`.
fn blocks(want: Mode, other: Mode) -> bool {
    want == Mode::X || other == Mode::X
}

impl LockTable {
    /// Apply one command at Raft `index` at lock time `now_ms`.
    pub fn apply(
        &mut self,
        index: LogIndex,
        now_ms: u64,
        cmd: LockCommand,
    ) -> (LockReply, Vec<LockEvent>) {
        let mut events = self.advance(index, now_ms);
        let reply = match cmd {
            LockCommand::Acquire {
                key,
                client,
                mode,
                ttl_ms,
                wait_ms,
            } => self.acquire(index, key, client, mode, ttl_ms, wait_ms),
            LockCommand::Release { key, client } => self.release(index, &key, &client, &mut events),
            LockCommand::Renew { client } => self.renew(&client),
        };
        (reply, events)
    }

    /// Move lock time to `now_ms` (never back): expire the leases and waits that ended.
    pub fn advance(&mut self, index: LogIndex, now_ms: u64) -> Vec<LockEvent> {
        self.now_ms = self.now_ms.max(now_ms);
        self.expire(index)
    }

    /// Lock time as this table knows it.
    pub fn now_ms(&self) -> u64 {
        self.now_ms
    }

    /// Deadlocks refused so far.
    pub fn deadlocks(&self) -> u64 {
        self.stats.deadlocks
    }

    /// The newest deadlock refusals, oldest first.
    pub fn recent_deadlocks(&self) -> impl Iterator<Item = &DeadlockRefusal> {
        self.recent_deadlocks.iter()
    }

    /// What happened so far.
    pub fn stats(&self) -> &LockStats {
        &self.stats
    }

    /// The earliest lease end or wait deadline still pending: when it passes, the leader
    /// proposes a `Tick` so that expiry happens even without other traffic.
    pub fn next_deadline_ms(&self) -> Option<u64> {
        self.deadlines.first().map(|(t, _)| *t)
    }

    /// State of one key.
    pub fn view(&self, key: &str) -> KeyView {
        let state = self.keys.get(key);
        KeyView {
            key: key.to_string(),
            mode: state.and_then(KeyState::mode),
            holders: state.map(KeyState::holders).unwrap_or_default(),
            waiters: state
                .map(|s| s.waiters.iter().cloned().collect())
                .unwrap_or_default(),
        }
    }

    /// Every key with holders or waiters, up to `limit`.
    pub fn list(&self, limit: usize) -> Vec<KeyView> {
        self.keys.keys().take(limit).map(|k| self.view(k)).collect()
    }

    /// The table's own invariants: an X holder is alone; no key is kept without holders
    /// or waiters; a waiter never holds the key it waits for in the mode it asks; the
    /// head of a queue is never grantable (it would have been granted).
    pub fn check(&self) -> Result<(), String> {
        for (key, state) in &self.keys {
            let x = state.holders.values().filter(|h| h.mode == Mode::X).count();
            if x > 0 && state.holders.len() > 1 {
                return Err(format!(
                    "key {key}: an X holder is not alone ({} holders)",
                    state.holders.len()
                ));
            }
            if state.holders.is_empty() && state.waiters.is_empty() {
                return Err(format!("key {key}: kept with neither holders nor waiters"));
            }
            if let Some(w) = state.waiters.iter().find(|w| {
                state
                    .holders
                    .get(&w.client)
                    .is_some_and(|h| h.mode >= w.mode)
            }) {
                return Err(format!("key {key}: {} waits for what it holds", w.client));
            }
            if let Some(head) = state.waiters.front() {
                if state.compatible(&head.client, head.mode) {
                    return Err(format!(
                        "key {key}: {} waits at the head although it is grantable",
                        head.client
                    ));
                }
            }
        }
        Ok(())
    }

    /// Counts for metrics: (S holders, X holders, waiters).
    pub fn counts(&self) -> (usize, usize, usize) {
        let mut s = 0;
        let mut x = 0;
        let mut w = 0;
        for state in self.keys.values() {
            for h in state.holders.values() {
                match h.mode {
                    Mode::S => s += 1,
                    Mode::X => x += 1,
                }
            }
            w += state.waiters.len();
        }
        (s, x, w)
    }

    /// Withdraw queued request `wait` on `key` (its caller went away). Its removal may let
    /// the requests behind it go: their grants are among the events. `None`: it was no
    /// longer queued.
    pub fn withdraw_wait(
        &mut self,
        index: LogIndex,
        key: &str,
        wait: WaitId,
    ) -> Option<Vec<LockEvent>> {
        let state = self.keys.get_mut(key)?;
        let pos = state.waiters.iter().position(|w| w.id == wait)?;
        state.waiters.remove(pos);
        self.stats.waits_withdrawn += 1;
        let mut events = Vec::new();
        self.promote(index, key, &mut events);
        Some(events)
    }

    /// Release `client`'s hold of `key` if it is still the grant of `mode` with fencing
    /// `token` (a grant that raced the withdrawal of the call it answered). A later grant
    /// to the same client has another token and is left alone; a withdrawn upgrade goes
    /// back to the S hold it upgraded. An S grant that another call has since upgraded
    /// stays under the X hold (that call holds it), but is no longer what withdrawing the
    /// upgrade goes back to. The mode matters because one entry can grant a client S and
    /// upgrade it to X (two waiting calls of one client), both under that entry's token.
    /// `None`: no such grant.
    pub fn withdraw_grant(
        &mut self,
        index: LogIndex,
        key: &str,
        client: &str,
        token: u64,
        mode: Mode,
    ) -> Option<Vec<LockEvent>> {
        let state = self.keys.get_mut(key)?;
        let hold = state.holders.get_mut(client)?;
        if hold.mode != mode || hold.token != token {
            if mode == Mode::S
                && !hold.upgraded_from_reported
                && hold.upgraded_from.is_some_and(|(t, _)| t == token)
            {
                // Nothing is released (the X hold covers it): not counted as a withdrawn
                // grant.
                hold.upgraded_from = None;
                return Some(Vec::new());
            }
            return None;
        }
        if hold.reported_again {
            return None;
        }
        match (hold.upgraded_from.take(), hold.upgraded_from_reported) {
            (Some((token, ttl_ms)), reported) => {
                hold.mode = Mode::S;
                hold.token = token;
                hold.ttl_ms = ttl_ms;
                hold.reported_again = reported;
                hold.upgraded_from_reported = false;
            }
            (None, _) => {
                state.holders.remove(client);
            }
        }
        self.stats.grants_withdrawn += 1;
        let mut events = Vec::new();
        self.promote(index, key, &mut events);
        Some(events)
    }

    fn acquire(
        &mut self,
        index: LogIndex,
        key: String,
        client: String,
        mode: Mode,
        ttl_ms: u64,
        wait_ms: u64,
    ) -> LockReply {
        if let Err(why) = validate(&key, &client) {
            return LockReply::Invalid(why);
        }
        let ttl_ms = if ttl_ms == 0 {
            DEFAULT_TTL_MS
        } else {
            ttl_ms.min(MAX_TTL_MS)
        };
        let now = self.now_ms;
        if let Some(reply) = self.already(&key, &client, mode, wait_ms) {
            return reply;
        }
        let state = self.keys.entry(key.clone()).or_default();
        let held = state.holders.get(&client).map(|h| h.mode);
        let queued_ahead = !state.waiters.is_empty();
        if !queued_ahead && state.compatible(&client, mode) {
            // Grant (or upgrade S to X for the only holder) with a fresh token.
            let hold = Hold::granted(mode, index, ttl_ms, now, state.holders.get(&client));
            let reply = LockReply::Granted {
                token: index,
                mode,
                expires_ms: hold.expires_ms,
                expires_in_ms: hold.expires_ms - now,
                ttl_ms: hold.ttl_ms,
            };
            state.holders.insert(client, hold.clone());
            self.deadlines.insert((hold.expires_ms, key));
            return reply;
        }
        if wait_ms == 0 {
            let holders = state.holders();
            self.drop_if_idle(&key);
            return LockReply::Conflict { holders };
        }
        if state.waiters.len() >= MAX_WAITERS_PER_KEY {
            return LockReply::Busy;
        }
        let cycle = self.cycle_if_waiting(&key, &client, mode);
        if self.audit && cycle.is_some() != self.reference_cycle(&key, &client, mode) {
            self.audit_failures += 1;
        }
        if let Some(cycle) = cycle {
            self.stats.deadlocks += 1;
            if self.recent_deadlocks.len() >= RECENT_DEADLOCKS {
                self.recent_deadlocks.pop_front();
            }
            self.recent_deadlocks.push_back(DeadlockRefusal {
                at_ms: self.now_ms,
                key: key.clone(),
                cycle: cycle.clone(),
            });
            self.drop_if_idle(&key);
            return LockReply::Deadlock { cycle };
        }
        if held.is_some() {
            self.stats.upgrades_waited += 1;
        }
        let deadline_ms = now.saturating_add(wait_ms.min(MAX_TTL_MS));
        let state = self.keys.entry(key.clone()).or_default();
        state.waiters.push_back(Waiter {
            id: index,
            client,
            mode,
            ttl_ms,
            deadline_ms,
        });
        self.deadlines.insert((deadline_ms, key));
        LockReply::Queued { wait: index }
    }

    /// Check every deadlock decision against the reference search from now on.
    pub fn set_audit(&mut self, on: bool) {
        self.audit = on;
    }

    /// Deadlock decisions the reference search disagreed with (with the audit on).
    pub fn audit_failures(&self) -> u64 {
        self.audit_failures
    }

    /// The reference for [`LockTable::cycle_if_waiting`]: build the whole wait-for graph
    /// and search it. A waiter waits for the holders whose mode it cannot share and for
    /// the waiters ahead of it that it cannot be granted together with.
    pub fn reference_cycle(&self, key: &str, client: &str, mode: Mode) -> bool {
        let mut edges: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        for st in self.keys.values() {
            for (i, w) in st.waiters.iter().enumerate() {
                let holders = st
                    .holders
                    .iter()
                    .filter(|(_, h)| blocks(w.mode, h.mode))
                    .map(|(c, _)| c.as_str());
                let ahead = st.waiters.iter().take(i);
                let ahead = ahead
                    .filter(|a| blocks(w.mode, a.mode))
                    .map(|a| a.client.as_str());
                let out = edges.entry(w.client.as_str()).or_default();
                out.extend(holders.chain(ahead).filter(|c| *c != w.client));
            }
        }
        let Some(st) = self.keys.get(key) else {
            return false;
        };
        let first = st
            .holders
            .iter()
            .filter(|(_, h)| blocks(mode, h.mode))
            .map(|(c, _)| c.as_str())
            .chain(
                st.waiters
                    .iter()
                    .filter(|w| blocks(mode, w.mode))
                    .map(|w| w.client.as_str()),
            )
            .filter(|c| *c != client);
        let mut stack: Vec<&str> = first.collect();
        let mut seen: BTreeSet<&str> = stack.iter().copied().collect();
        while let Some(n) = stack.pop() {
            if n == client {
                return true;
            }
            for &m in edges.get(n).into_iter().flatten() {
                if seen.insert(m) {
                    stack.push(m);
                }
            }
        }
        false
    }

    /// The answer to an acquire that `client` already holds (an idempotent re-acquire,
    /// or S asked by an X holder: the same grant) or already waits for (another call of
    /// the same request).
    fn already(&mut self, key: &str, client: &str, mode: Mode, wait_ms: u64) -> Option<LockReply> {
        let now_ms = self.now_ms;
        let state = self.keys.get_mut(key)?;
        if let Some(hold) = state.holders.get_mut(client).filter(|h| h.mode >= mode) {
            hold.reported_again = true;
            return Some(LockReply::Granted {
                token: hold.token,
                mode: hold.mode,
                expires_ms: hold.expires_ms,
                expires_in_ms: hold.expires_ms.saturating_sub(now_ms),
                ttl_ms: hold.ttl_ms,
            });
        }
        let holders = state.holders();
        let w = state
            .waiters
            .iter_mut()
            .find(|w| w.client == client && w.mode == mode)?;
        if wait_ms == 0 {
            // A caller that would not wait is told the lock is taken, not handed the
            // other request's wait.
            return Some(LockReply::Conflict { holders });
        }
        // The request waits as long as its longest caller wants; a shorter caller's own
        // deadline withdraws only its call.
        let until = now_ms.saturating_add(wait_ms.min(MAX_TTL_MS));
        let id = w.id;
        if until > w.deadline_ms {
            w.deadline_ms = until;
            self.deadlines.insert((until, key.to_owned()));
        }
        Some(LockReply::Queued { wait: id })
    }

    /// If `client` queued on `key` in `mode` now, would the wait-for graph get a cycle?
    /// The cycle.
    ///
    /// The graph is exact (no false cycles): a request waits for the holders whose mode
    /// it cannot share (never itself: an S holder asking X waits only for the others),
    /// and for the requests queued ahead of it that it cannot be granted together with
    /// (an S request behind another S request does not wait for it: compatible waiters
    /// are granted in one run). A search from the requester therefore needs, per key, how
    /// far into its queue it has looked for each mode: every queue entry and holder is
    /// visited at most twice, without building the whole graph.
    fn cycle_if_waiting(&self, key: &str, client: &str, mode: Mode) -> Option<Vec<String>> {
        let state = self.keys.get(key)?;
        // Where each client waits: (key, position in that key's queue, mode).
        let mut waits_on: BTreeMap<&str, Vec<(&str, usize, Mode)>> = BTreeMap::new();
        for (k, st) in &self.keys {
            for (pos, w) in st.waiters.iter().enumerate() {
                waits_on
                    .entry(w.client.as_str())
                    .or_default()
                    .push((k.as_str(), pos, w.mode));
            }
        }
        let root = client;
        // The requester's own blockers are found with a memo of their own: the root is
        // among a key's holders when it upgrades, and the search must still find it
        // there when it reaches that key again from a waiter.
        let first = Search::default().blockers(key, state, state.waiters.len(), mode);
        let mut search = Search::default();
        for t in first.into_iter().filter(|t| *t != root) {
            search.reach(t, root);
        }
        while let Some(node) = search.queue.pop_front() {
            for &(k, pos, m) in waits_on.get(node).map(Vec::as_slice).unwrap_or(&[]) {
                let Some(st) = self.keys.get(k) else { continue };
                for n in search.blockers(k, st, pos, m) {
                    if n == root {
                        return Some(search.cycle(root, node));
                    }
                    if n != node {
                        search.reach(n, node);
                    }
                }
            }
        }
        None
    }

    fn release(
        &mut self,
        index: LogIndex,
        key: &str,
        client: &str,
        events: &mut Vec<LockEvent>,
    ) -> LockReply {
        if let Err(why) = validate(key, client) {
            return LockReply::Invalid(why);
        }
        let Some(state) = self.keys.get_mut(key) else {
            return LockReply::NotHeld {
                holders: Vec::new(),
            };
        };
        if state.holders.remove(client).is_none() {
            return LockReply::NotHeld {
                holders: state.holders(),
            };
        }
        self.promote(index, key, events);
        LockReply::Released
    }

    fn renew(&mut self, client: &str) -> LockReply {
        if client.is_empty() || client.len() > MAX_CLIENT_BYTES {
            return LockReply::Invalid(format!("client_id must be 1 to {MAX_CLIENT_BYTES} bytes"));
        }
        let now = self.now_ms;
        let mut locks = 0;
        for (key, state) in &mut self.keys {
            if let Some(hold) = state.holders.get_mut(client) {
                // A renewal extends, never shortens (an upgraded hold may have kept a
                // longer lease than its own ttl).
                let old = hold.expires_ms;
                hold.expires_ms = old.max(now.saturating_add(hold.ttl_ms));
                let new = hold.expires_ms;
                locks += 1;
                if new == old {
                    continue;
                }
                self.deadlines.insert((new, key.clone()));
                // The old deadline goes unless another hold or wait of the key ends then:
                // left behind, every renewal would leave one more entry (and one more Tick).
                let shared = state.holders.values().any(|h| h.expires_ms == old)
                    || state.waiters.iter().any(|w| w.deadline_ms == old);
                if !shared {
                    self.deadlines.remove(&(old, key.clone()));
                }
            }
        }
        LockReply::Renewed { locks }
    }

    /// Grant the longest compatible run of waiters at the head of `key`'s queue.
    fn promote(&mut self, index: LogIndex, key: &str, events: &mut Vec<LockEvent>) {
        let now = self.now_ms;
        let Some(state) = self.keys.get_mut(key) else {
            return;
        };
        while let Some(w) = state.waiters.front() {
            if !state.compatible(&w.client, w.mode) {
                break;
            }
            let Some(w) = state.waiters.pop_front() else {
                break;
            };
            if let Some(h) = state
                .holders
                .get_mut(&w.client)
                .filter(|h| h.mode >= w.mode)
            {
                // It came to hold what it waited for by another call (an upgrade, or the
                // same client's other request): the same grant answers it, and is never
                // replaced by a weaker one.
                h.reported_again = true;
                events.push(LockEvent::Granted {
                    wait: w.id,
                    key: key.to_string(),
                    client: w.client.clone(),
                    token: h.token,
                    mode: h.mode,
                    expires_ms: h.expires_ms,
                    expires_in_ms: h.expires_ms.saturating_sub(now),
                    ttl_ms: h.ttl_ms,
                });
                continue;
            }
            let hold = Hold::granted(w.mode, index, w.ttl_ms, now, state.holders.get(&w.client));
            let (expires_ms, ttl_ms) = (hold.expires_ms, hold.ttl_ms);
            events.push(LockEvent::Granted {
                wait: w.id,
                key: key.to_string(),
                client: w.client.clone(),
                token: index,
                mode: w.mode,
                expires_ms,
                expires_in_ms: expires_ms - now,
                ttl_ms,
            });
            self.stats.waits_granted += 1;
            let (held_mode, token) = (hold.mode, hold.token);
            let client = w.client;
            state.holders.insert(client.clone(), hold);
            self.deadlines.insert((expires_ms, key.to_string()));
            // The same client's other requests for no more than it now holds are
            // answered with this grant at once, wherever they wait in the queue.
            let mut i = 0;
            while i < state.waiters.len() {
                if state.waiters[i].client == client && state.waiters[i].mode <= held_mode {
                    if let Some(other) = state.waiters.remove(i) {
                        events.push(LockEvent::Granted {
                            wait: other.id,
                            key: key.to_string(),
                            client: client.clone(),
                            token,
                            mode: held_mode,
                            expires_ms,
                            expires_in_ms: expires_ms - now,
                            ttl_ms,
                        });
                    }
                    if let Some(h) = state.holders.get_mut(&client) {
                        h.reported_again = true;
                    }
                } else {
                    i += 1;
                }
            }
        }
        self.drop_if_idle(key);
    }

    fn drop_if_idle(&mut self, key: &str) {
        if self
            .keys
            .get(key)
            .is_some_and(|s| s.holders.is_empty() && s.waiters.is_empty())
        {
            self.keys.remove(key);
        }
    }

    /// Expire leases and waits that ended by now; wake whoever can go next.
    fn expire(&mut self, index: LogIndex) -> Vec<LockEvent> {
        let now = self.now_ms;
        let mut due = BTreeSet::new();
        while let Some(first) = self.deadlines.first() {
            if first.0 > now {
                break;
            }
            if let Some((_, key)) = self.deadlines.pop_first() {
                due.insert(key);
            }
        }
        let mut events = Vec::new();
        for key in due {
            let Some(state) = self.keys.get_mut(&key) else {
                continue;
            };
            let expired: Vec<String> = state
                .holders
                .iter()
                .filter(|(_, h)| h.expires_ms <= now)
                .map(|(c, _)| c.clone())
                .collect();
            for client in expired {
                if let Some(h) = state.holders.remove(&client) {
                    self.stats.leases_expired += 1;
                    events.push(LockEvent::Expired {
                        key: key.clone(),
                        client,
                        token: h.token,
                    });
                }
            }
            let holders = state.holders();
            let stats = &mut self.stats;
            state.waiters.retain(|w| {
                let late = w.deadline_ms <= now;
                if late {
                    stats.waits_timed_out += 1;
                    events.push(LockEvent::TimedOut {
                        wait: w.id,
                        key: key.clone(),
                        client: w.client.clone(),
                        holders: holders.clone(),
                    });
                }
                !late
            });
            self.promote(index, &key, &mut events);
        }
        events
    }
}

/// The state of one deadlock search: who was reached from whom, and how much of each
/// key has been looked at already.
#[derive(Default)]
struct Search<'a> {
    parent: BTreeMap<&'a str, &'a str>,
    queue: VecDeque<&'a str>,
    /// Per key: waiters before this position looked at by an X request (all of them)...
    reached_all: BTreeMap<&'a str, usize>,
    /// ... and by an S request (only the X waiters among them).
    reached_x: BTreeMap<&'a str, usize>,
    /// Keys whose holders were looked at by an X request (all) or an S request (X ones).
    holders_all: BTreeSet<&'a str>,
    holders_x: BTreeSet<&'a str>,
}

impl<'a> Search<'a> {
    /// Those not yet looked at whom a request in `mode` at `pos` of `key`'s queue waits for.
    fn blockers(&mut self, key: &'a str, st: &'a KeyState, pos: usize, mode: Mode) -> Vec<&'a str> {
        let mut out: Vec<&'a str> = Vec::new();
        let all = mode == Mode::X;
        let (holders_seen, reached) = if all {
            (&mut self.holders_all, &mut self.reached_all)
        } else {
            (&mut self.holders_x, &mut self.reached_x)
        };
        if holders_seen.insert(key) {
            out.extend(
                st.holders
                    .iter()
                    .filter(|(_, h)| blocks(mode, h.mode))
                    .map(|(c, _)| c.as_str()),
            );
        }
        let from = reached.get(key).copied().unwrap_or(0);
        if pos > from {
            out.extend(
                st.waiters
                    .iter()
                    .take(pos)
                    .skip(from)
                    .filter(|w| blocks(mode, w.mode))
                    .map(|w| w.client.as_str()),
            );
            reached.insert(key, pos);
        }
        if all {
            // What an X request saw covers what an S request would see.
            self.holders_x.insert(key);
            let x = self.reached_x.entry(key).or_insert(0);
            *x = (*x).max(pos);
        }
        out
    }

    fn reach(&mut self, node: &'a str, from: &'a str) {
        if !self.parent.contains_key(node) {
            self.parent.insert(node, from);
            self.queue.push_back(node);
        }
    }

    /// The cycle root -> ... -> last -> root, through the parents.
    fn cycle(&self, root: &str, last: &'a str) -> Vec<String> {
        let mut path = vec![last.to_string()];
        let mut cur = last;
        while let Some(&p) = self.parent.get(cur) {
            if p == root {
                break;
            }
            path.push(p.to_string());
            cur = p;
        }
        path.reverse();
        let mut cycle = vec![root.to_string()];
        cycle.extend(path);
        cycle.push(root.to_string());
        cycle
    }
}
