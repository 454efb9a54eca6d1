//! `CallTable`: every call a node has in flight, and what each one waits for.
//!
//! ```text
//!  call ──propose──> Proposed{index, term} ──applied, same term──> answered
//!    │                  │  └─applied, reply waits──> Waiting{session call} ──completion──> answered
//!    │                  └─other term at index / leadership lost / deadline──> Unknown
//!    └──read_index──> Reading ──applied reaches its index──> answered
//! ```
//! A waiting call is keyed by the session call it belongs to, so a completion answers
//! exactly the calls of that (session, seq): two waits of one client on one key are two
//! calls, never confused. Several calls may wait on one proposed entry: a client that
//! sends the same call again (a hedge, a retry) while its entry is in the log joins
//! that entry ([`CallTable::join`]), and every call on it hears the entry's answer.

use super::CallId;
use crate::raft::{LogIndex, Term};
use crate::services::envelope::CallRef;
use std::collections::{BTreeMap, BTreeSet};

/// What a call waits for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum CallState {
    /// Its entry to apply.
    Proposed {
        /// Where it was proposed.
        index: LogIndex,
    },
    /// A service completion of this session call.
    Waiting {
        /// The session call.
        call: CallRef,
    },
    /// Applied to reach the read's index (`None`: not confirmed yet).
    Reading {
        /// The query bytes.
        query: Vec<u8>,
        /// The confirmed read index.
        index: Option<LogIndex>,
    },
}

#[derive(Clone, Debug)]
struct Call {
    started_ms: u64,
    deadline_ms: u64,
    state: CallState,
    term: Term,
    cancelled: bool,
}

/// A proposed call whose entry was applied.
#[derive(Clone, Copy, Debug)]
pub(super) struct Proposed {
    /// The term it was proposed in.
    pub(super) term: Term,
    /// When it was called.
    pub(super) started_ms: u64,
    /// Its caller went away.
    pub(super) cancelled: bool,
}

/// See the module docs.
#[derive(Debug, Default)]
pub(super) struct CallTable {
    calls: BTreeMap<CallId, Call>,
    /// The calls answered by the entry at each index (more than one: joined copies).
    proposals: BTreeMap<LogIndex, BTreeSet<CallId>>,
    waiting: BTreeMap<CallRef, BTreeSet<CallId>>,
    deadlines: BTreeSet<(u64, CallId)>,
    /// Reads in flight (so serving them costs nothing when there are none).
    reads_in_flight: usize,
}

impl CallTable {
    pub(super) fn len(&self) -> usize {
        self.calls.len()
    }

    fn insert(&mut self, id: CallId, call: Call) {
        self.deadlines.insert((call.deadline_ms, id));
        if let Some(old) = self.calls.insert(id, call) {
            self.deadlines.remove(&(old.deadline_ms, id));
        }
    }

    /// Remove every call of `ids`; returns them.
    fn remove_all(&mut self, ids: Vec<CallId>) -> Vec<CallId> {
        for id in &ids {
            self.remove(*id);
        }
        ids
    }

    /// Remove a call wherever it is.
    pub(super) fn remove(&mut self, id: CallId) -> Option<CallState> {
        let call = self.calls.remove(&id)?;
        self.deadlines.remove(&(call.deadline_ms, id));
        match &call.state {
            CallState::Proposed { index } => {
                if let Some(ids) = self.proposals.get_mut(index) {
                    ids.remove(&id);
                    if ids.is_empty() {
                        self.proposals.remove(index);
                    }
                }
            }
            CallState::Waiting { call: c } => {
                if let Some(ids) = self.waiting.get_mut(c) {
                    ids.remove(&id);
                    if ids.is_empty() {
                        self.waiting.remove(c);
                    }
                }
            }
            CallState::Reading { .. } => self.reads_in_flight -= 1,
        }
        Some(call.state)
    }

    /// A new entry proposed at `index`. Returns the calls of the entry it replaced
    /// there (one of an earlier term), which will never be applied.
    pub(super) fn propose(
        &mut self,
        id: CallId,
        index: LogIndex,
        term: Term,
        started_ms: u64,
        deadline_ms: u64,
    ) -> Vec<CallId> {
        let old = self.remove_all(
            self.proposals
                .get(&index)
                .map(|ids| ids.iter().copied().collect())
                .unwrap_or_default(),
        );
        self.join(id, index, term, started_ms, deadline_ms);
        old
    }

    /// Call `id` waits on the entry already proposed at `index` (the same session call
    /// sent again): it is answered with the calls already there, none of them is
    /// dropped.
    pub(super) fn join(
        &mut self,
        id: CallId,
        index: LogIndex,
        term: Term,
        started_ms: u64,
        deadline_ms: u64,
    ) {
        self.proposals.entry(index).or_default().insert(id);
        self.insert(
            id,
            Call {
                started_ms,
                deadline_ms,
                state: CallState::Proposed { index },
                term,
                cancelled: false,
            },
        );
    }

    /// A read waiting for its index to be confirmed.
    pub(super) fn read(&mut self, id: CallId, query: Vec<u8>, started_ms: u64, deadline_ms: u64) {
        self.reads_in_flight += 1;
        let call = Call {
            started_ms,
            deadline_ms,
            state: CallState::Reading { query, index: None },
            term: 0,
            cancelled: false,
        };
        self.insert(id, call);
    }

    /// The read of call `id` may be served once `index` is applied.
    pub(super) fn read_ready(&mut self, id: CallId, at: LogIndex) {
        if let Some(Call {
            state: CallState::Reading { index, .. },
            ..
        }) = self.calls.get_mut(&id)
        {
            *index = Some(at);
        }
    }

    /// Reads that can be served with `applied` entries applied: removed, with their query.
    pub(super) fn reads_ready(&mut self, applied: LogIndex) -> Vec<(CallId, Vec<u8>)> {
        if self.reads_in_flight == 0 {
            return Vec::new();
        }
        let ready: Vec<CallId> = self
            .calls
            .iter()
            .filter(|(_, c)| {
                matches!(c.state, CallState::Reading { index: Some(i), .. } if i <= applied)
            })
            .map(|(id, _)| *id)
            .collect();
        let mut out = Vec::new();
        for id in ready {
            if let Some(CallState::Reading { query, .. }) = self.remove(id) {
                out.push((id, query));
            }
        }
        out
    }

    /// Every read in flight, removed (the node stopped leading).
    pub(super) fn reads(&mut self) -> Vec<CallId> {
        if self.reads_in_flight == 0 {
            return Vec::new();
        }
        let ids: Vec<CallId> = self
            .calls
            .iter()
            .filter(|(_, c)| matches!(c.state, CallState::Reading { .. }))
            .map(|(id, _)| *id)
            .collect();
        self.remove_all(ids)
    }

    /// The calls proposed at `index`, removed: those whose caller is still there
    /// first, so a cancelled copy never withdraws a wait another copy takes up.
    pub(super) fn take_proposals(&mut self, index: LogIndex) -> Vec<(CallId, Proposed)> {
        let Some(ids) = self.proposals.remove(&index) else {
            return Vec::new();
        };
        let mut out: Vec<(CallId, Proposed)> = ids
            .into_iter()
            .filter_map(|id| {
                let call = self.calls.get(&id)?;
                Some((
                    id,
                    Proposed {
                        term: call.term,
                        started_ms: call.started_ms,
                        cancelled: call.cancelled,
                    },
                ))
            })
            .collect();
        for (id, _) in &out {
            self.remove(*id);
        }
        out.sort_by_key(|(id, p)| (p.cancelled, *id));
        out
    }

    /// Call `id`, applied, now waits for a completion of `call`. Returns whether the
    /// session call must be withdrawn: its caller went away and no other call here
    /// waits for it.
    pub(super) fn wait(
        &mut self,
        id: CallId,
        proposed: Proposed,
        call: CallRef,
        deadline_ms: u64,
    ) -> bool {
        if proposed.cancelled {
            return call.0 != 0 && !self.waiting.contains_key(&call);
        }
        self.waiting.entry(call).or_default().insert(id);
        self.insert(
            id,
            Call {
                started_ms: proposed.started_ms,
                deadline_ms,
                state: CallState::Waiting { call },
                term: proposed.term,
                cancelled: false,
            },
        );
        false
    }

    /// Every call waiting for `call`, removed.
    pub(super) fn complete(&mut self, call: CallRef) -> Vec<CallId> {
        self.remove_all(
            self.waiting
                .get(&call)
                .map(|s| s.iter().copied().collect())
                .unwrap_or_default(),
        )
    }

    /// Every waiting call, removed (the node stopped leading).
    pub(super) fn waiting_all(&mut self) -> Vec<CallId> {
        let ids: Vec<CallId> = self.waiting.values().flatten().copied().collect();
        self.remove_all(ids)
    }

    /// The session calls waited for, with their calls.
    pub(super) fn waiting_refs(&self) -> Vec<(CallRef, Vec<CallId>)> {
        self.waiting
            .iter()
            .map(|(c, ids)| (*c, ids.iter().copied().collect()))
            .collect()
    }

    /// The caller of `id` went away. Returns the session call to withdraw, if any: a
    /// waiting call that no other call here waits for. A call still being proposed is
    /// marked, and withdrawn if it turns out to wait.
    pub(super) fn cancel(&mut self, id: CallId) -> Option<CallRef> {
        let call = self.calls.get_mut(&id)?;
        match call.state {
            CallState::Proposed { .. } => {
                call.cancelled = true;
                None
            }
            CallState::Waiting { call: c } => {
                self.remove(id);
                (c.0 != 0 && !self.waiting.contains_key(&c)).then_some(c)
            }
            CallState::Reading { .. } => {
                self.remove(id);
                None
            }
        }
    }

    /// Proposals at or below `index`, removed (a snapshot replaced them).
    pub(super) fn proposed_up_to(&mut self, index: LogIndex) -> Vec<CallId> {
        let later = self.proposals.split_off(&(index + 1));
        let ids: Vec<CallId> = std::mem::replace(&mut self.proposals, later)
            .into_values()
            .flatten()
            .collect();
        self.remove_all(ids)
    }

    /// Proposals above `commit`, removed (this node stopped leading).
    pub(super) fn proposed_after(&mut self, commit: LogIndex) -> Vec<CallId> {
        let ids: Vec<CallId> = self
            .proposals
            .range(commit + 1..)
            .flat_map(|(_, ids)| ids.iter().copied())
            .collect();
        self.remove_all(ids)
    }

    /// Calls whose deadline passed, removed, with what they waited for.
    pub(super) fn expire(&mut self, now_ms: u64) -> Vec<(CallId, CallState)> {
        let mut out = Vec::new();
        while let Some(&(deadline, id)) = self.deadlines.first() {
            if deadline > now_ms {
                break;
            }
            self.deadlines.pop_first();
            if let Some(state) = self.remove(id) {
                out.push((id, state));
            }
        }
        out
    }

    /// The earliest call deadline.
    pub(super) fn next_deadline(&self) -> Option<u64> {
        self.deadlines.first().map(|(d, _)| *d)
    }
}
