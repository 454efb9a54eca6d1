//! `LockTable`: shared (S) and exclusive (X) locks on string keys, as a deterministic
//! state machine applied from the Raft log.
//!
//! ```text
//!   acquire ──compatible & nobody queued──> granted (token = Raft index of the grant)
//!      │ wait_ms = 0 ─────────────────────> conflict (holders named)
//!      │ would close a wait-for cycle ────> deadlock (cycle named)
//!      └──> queued FIFO ──release/expiry──> granted ──lease ends──> released
//!                     └──deadline passes──> timed out
//! ```
//! Time comes only from the commands (the leader's clock, never this node's), and it
//! never runs backwards here: the table keeps the largest time it has seen. A release
//! hands the lock to the next waiters in the same apply, so a hot key moves from holder
//! to holder in one commit each. Fencing tokens are Raft indexes, so they increase
//! strictly per key (and globally).

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
    /// Only advance time: expire leases and waits that ran out.
    Tick,
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
        /// Leader time at which the lease ends.
        expires_ms: u64,
    },
    /// Queued; a [`LockEvent::Granted`] or [`LockEvent::TimedOut`] follows.
    Queued,
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
    /// Time advanced.
    Ticked,
    /// The command is invalid.
    Invalid(String),
    /// Too many waiters on the key.
    Busy,
    /// A queued request gave up waiting (answered by the node from a
    /// [`LockEvent::TimedOut`]).
    TimedOut {
        /// Holders at the time.
        holders: Vec<Holder>,
    },
}

/// Something that happened to a waiter or holder as a side effect of a command.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LockEvent {
    /// A queued request was granted.
    Granted {
        /// Key.
        key: String,
        /// Client.
        client: String,
        /// Fencing token.
        token: u64,
        /// Mode.
        mode: Mode,
        /// Lease end.
        expires_ms: u64,
    },
    /// A queued request gave up waiting.
    TimedOut {
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

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Hold {
    mode: Mode,
    token: u64,
    ttl_ms: u64,
    expires_ms: u64,
}

/// A queued request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Waiter {
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

/// The lock table.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockTable {
    keys: BTreeMap<String, KeyState>,
    /// Every lease end and wait deadline, by time: a key is looked at when one of its
    /// times passes (entries left behind by releases and renewals are harmless).
    deadlines: BTreeSet<(u64, String)>,
    now_ms: u64,
    deadlocks: u64,
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

impl LockTable {
    /// Apply one command at Raft `index` with the leader's time `now_ms`.
    pub fn apply(
        &mut self,
        index: LogIndex,
        now_ms: u64,
        cmd: LockCommand,
    ) -> (LockReply, Vec<LockEvent>) {
        self.now_ms = self.now_ms.max(now_ms);
        let mut events = self.expire(index);
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
            LockCommand::Tick => LockReply::Ticked,
        };
        (reply, events)
    }

    /// Leader time as this table knows it.
    pub fn now_ms(&self) -> u64 {
        self.now_ms
    }

    /// Deadlocks refused so far.
    pub fn deadlocks(&self) -> u64 {
        self.deadlocks
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
    /// or waiters; a waiter never holds the key it waits for in the mode it asks.
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
        let state = self.keys.entry(key.clone()).or_default();
        if let Some(hold) = state.holders.get(&client) {
            if hold.mode >= mode {
                // Idempotent re-acquire (or S asked by an X holder): same grant.
                return LockReply::Granted {
                    token: hold.token,
                    mode: hold.mode,
                    expires_ms: hold.expires_ms,
                };
            }
        }
        if state
            .waiters
            .iter()
            .any(|w| w.client == client && w.mode == mode)
        {
            // A retried request that is already waiting.
            return LockReply::Queued;
        }
        let queued_ahead = !state.waiters.is_empty();
        if !queued_ahead && state.compatible(&client, mode) {
            // Grant (or upgrade S to X for the only holder) with a fresh token.
            let hold = Hold {
                mode,
                token: index,
                ttl_ms,
                expires_ms: now.saturating_add(ttl_ms),
            };
            let reply = LockReply::Granted {
                token: index,
                mode,
                expires_ms: hold.expires_ms,
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
        if let Some(cycle) = self.cycle_if_waiting(&key, &client) {
            self.deadlocks += 1;
            self.drop_if_idle(&key);
            return LockReply::Deadlock { cycle };
        }
        let deadline_ms = now.saturating_add(wait_ms.min(MAX_TTL_MS));
        let state = self.keys.entry(key.clone()).or_default();
        state.waiters.push_back(Waiter {
            client,
            mode,
            ttl_ms,
            deadline_ms,
        });
        self.deadlines.insert((deadline_ms, key));
        LockReply::Queued
    }

    /// If `client` queued on `key` now, would the wait-for graph get a cycle? The cycle.
    ///
    /// A waiter at position `i` of a key's queue waits for that key's holders and for the
    /// waiters at positions before `i`. A search from the clients `client` would wait for
    /// therefore only needs, per key, how far into its queue it has reached: each queue
    /// entry and holder is visited once, without building the whole graph.
    fn cycle_if_waiting(&self, key: &str, client: &str) -> Option<Vec<String>> {
        let state = self.keys.get(key)?;
        // Where each client waits: (key, position in that key's queue).
        let mut waits_on: BTreeMap<&str, Vec<(&str, usize)>> = BTreeMap::new();
        for (k, st) in &self.keys {
            for (pos, w) in st.waiters.iter().enumerate() {
                waits_on
                    .entry(w.client.as_str())
                    .or_default()
                    .push((k.as_str(), pos));
            }
        }
        let mut parent: BTreeMap<&str, &str> = BTreeMap::new();
        // Per key: how far into its queue the search has enqueued, and whether its holders
        // have been looked at.
        let mut reached: BTreeMap<&str, usize> = BTreeMap::new();
        let mut holders_done: BTreeSet<&str> = BTreeSet::new();
        let mut queue: VecDeque<&str> = VecDeque::new();
        let root = client;
        let targets = state
            .holders
            .keys()
            .chain(state.waiters.iter().map(|w| &w.client));
        for t in targets.map(String::as_str).filter(|t| *t != root) {
            if !parent.contains_key(t) {
                parent.insert(t, root);
                queue.push_back(t);
            }
        }
        while let Some(node) = queue.pop_front() {
            for &(k, pos) in waits_on.get(node).map(Vec::as_slice).unwrap_or(&[]) {
                let Some(st) = self.keys.get(k) else { continue };
                let from = reached.get(k).copied().unwrap_or(0);
                let mut next: Vec<&str> = Vec::new();
                if holders_done.insert(k) {
                    next.extend(st.holders.keys().map(String::as_str));
                }
                if pos > from {
                    next.extend(
                        st.waiters
                            .iter()
                            .take(pos)
                            .skip(from)
                            .map(|w| w.client.as_str()),
                    );
                    reached.insert(k, pos);
                }
                for n in next {
                    if n == root {
                        let mut cycle = vec![root.to_string(), root.to_string()];
                        let mut cur = node;
                        let mut path = vec![cur.to_string()];
                        while let Some(&p) = parent.get(cur) {
                            if p == root {
                                break;
                            }
                            path.push(p.to_string());
                            cur = p;
                        }
                        path.reverse();
                        cycle.splice(1..1, path);
                        return Some(cycle);
                    }
                    if n != node && !parent.contains_key(n) {
                        parent.insert(n, node);
                        queue.push_back(n);
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
                hold.expires_ms = now.saturating_add(hold.ttl_ms);
                self.deadlines.insert((hold.expires_ms, key.clone()));
                locks += 1;
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
            let expires_ms = now.saturating_add(w.ttl_ms);
            let hold = Hold {
                mode: w.mode,
                token: index,
                ttl_ms: w.ttl_ms,
                expires_ms,
            };
            events.push(LockEvent::Granted {
                key: key.to_string(),
                client: w.client.clone(),
                token: index,
                mode: w.mode,
                expires_ms,
            });
            state.holders.insert(w.client, hold);
            self.deadlines.insert((expires_ms, key.to_string()));
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
                    events.push(LockEvent::Expired {
                        key: key.clone(),
                        client,
                        token: h.token,
                    });
                }
            }
            let holders = state.holders();
            state.waiters.retain(|w| {
                let late = w.deadline_ms <= now;
                if late {
                    let timed_out = LockEvent::TimedOut {
                        key: key.clone(),
                        client: w.client.clone(),
                        holders: holders.clone(),
                    };
                    events.push(timed_out);
                }
                !late
            });
            self.promote(index, &key, &mut events);
        }
        events
    }
}
