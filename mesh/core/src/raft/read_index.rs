//! ReadIndex: linearizable reads without writing to the log (thesis 6.4).
//!
//! The leader notes its commit index when a read arrives, then confirms it is still
//! leader by a heartbeat round answered by a quorum; the read may then be served by any
//! state machine that has applied up to that index. A new leader first waits for an
//! entry of its own term to commit, since only then is its commit index current.

use super::{ProposeError, Raft, ReadState, Role};
use std::collections::VecDeque;

/// A read waiting for its heartbeat round.
#[derive(Debug)]
struct PendingRead {
    seq: u64,
    index: u64,
    ctx: Vec<u8>,
}

/// The leader's outstanding reads.
#[derive(Debug, Default)]
pub(crate) struct ReadOnly {
    /// Latest heartbeat round number.
    pub(crate) seq: u64,
    pending: VecDeque<PendingRead>,
    /// Reads that arrived before an entry of this term committed.
    waiting: Vec<Vec<u8>>,
}

impl ReadOnly {
    pub(crate) fn clear(&mut self) {
        self.pending.clear();
        self.waiting.clear();
    }
}

impl Raft {
    /// Request a linearizable read. The answer comes back as a [`ReadState`] with `ctx` in
    /// a later Ready; if leadership is lost first the read is dropped and the caller
    /// retries after its own timeout.
    pub fn read_index(&mut self, ctx: Vec<u8>) -> Result<(), ProposeError> {
        if self.role != Role::Leader {
            return Err(ProposeError::NotLeader {
                leader: self.leader,
            });
        }
        if self.log.term(self.log.committed) == Some(self.term) {
            self.start_read(ctx);
        } else {
            self.reads.waiting.push(ctx);
        }
        Ok(())
    }

    fn start_read(&mut self, ctx: Vec<u8>) {
        let index = self.log.committed;
        let membership = self.membership();
        if membership.voters.len() == 1 && membership.is_voter(self.cfg.id) {
            self.read_states.push(ReadState { index, ctx });
            return;
        }
        self.reads.seq += 1;
        let seq = self.reads.seq;
        self.reads
            .pending
            .push_back(PendingRead { seq, index, ctx });
        // The round starts now: only answers to heartbeats sent from here on count.
        self.broadcast_heartbeat();
    }

    /// An entry of our term committed: reads that waited for it can start.
    pub(super) fn start_waiting_reads(&mut self) {
        for ctx in std::mem::take(&mut self.reads.waiting) {
            self.start_read(ctx);
        }
    }

    /// Release every read whose heartbeat round a quorum of voters has answered.
    pub(super) fn release_reads(&mut self) {
        let membership = self.membership().clone();
        let me = self.cfg.id;
        while let Some(front) = self.reads.pending.front() {
            let acks = membership
                .voters
                .iter()
                .filter(|&&id| {
                    id == me
                        || self
                            .progress
                            .get(&id)
                            .is_some_and(|pr| pr.read_seq >= front.seq)
                })
                .count();
            if acks < membership.quorum() {
                break;
            }
            // Checked non-empty by the loop condition.
            let Some(read) = self.reads.pending.pop_front() else {
                break;
            };
            self.read_states.push(ReadState {
                index: read.index,
                ctx: read.ctx,
            });
        }
    }
}
