//! What the leader knows about each follower's log, and how fast it may send to it.
//!
//! ```text
//!            reject / unreachable               snapshot needed
//!   Replicate ───────────────────> Probe ──────────────────────> Snapshot
//!       ^  success                  │ ^                              │
//!       └───────────────────────────┘ └──────── installed ───────────┘
//! ```
//! In `Probe` one AppendEntries is outstanding at a time while the match point is found;
//! in `Replicate` up to `max_inflight` are pipelined; in `Snapshot` chunks go one at a
//! time, each waiting for its acknowledgement.

use super::types::LogIndex;
use std::collections::VecDeque;

/// How the leader is currently sending to a follower.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum ProgressState {
    /// Searching for the match point; one message in flight.
    Probe,
    /// Streaming entries optimistically.
    Replicate,
    /// Sending a snapshot, a window of chunks at a time.
    Snapshot {
        /// Index of the snapshot being sent.
        index: LogIndex,
        /// Offset of the next chunk to send.
        offset: u64,
        /// Bytes the follower has confirmed (everything before is stored there).
        acked: u64,
    },
}

/// Heartbeat answers a leader sees without the follower confirming more of the snapshot
/// before it sends again from what was confirmed (go-back-N). A heartbeat answer proves
/// the follower is reachable but not that a chunk was lost: a big chunk is often still
/// on its way. Sending again at every heartbeat queued copies of megabyte chunks ahead
/// of the next one (a 14 MB snapshot took 100 s on loopback).
pub(crate) const SNAPSHOT_CHUNK_PATIENCE: u32 = 4;

/// Snapshot chunks in flight to one follower at most: one round trip per chunk made a
/// transfer over a slow link take one round trip per megabyte.
pub(crate) const SNAPSHOT_WINDOW_CHUNKS: u64 = 8;

/// The leader's view of one follower.
#[derive(Clone, Debug)]
pub(crate) struct Progress {
    pub(crate) match_index: LogIndex,
    pub(crate) next_index: LogIndex,
    pub(crate) state: ProgressState,
    /// Last index of each pipelined AppendEntries not yet acknowledged.
    pub(crate) inflight: VecDeque<LogIndex>,
    /// In Probe or Snapshot: a message is outstanding; wait for its answer or a heartbeat.
    pub(crate) paused: bool,
    /// In Snapshot: heartbeat answers since the outstanding chunk went out (it is sent
    /// again only after [`SNAPSHOT_CHUNK_PATIENCE`] of them).
    pub(crate) chunk_waits: u32,
    /// Heard from since the last CheckQuorum round.
    pub(crate) recent_active: bool,
    /// Highest ReadIndex round this follower has confirmed.
    pub(crate) read_seq: u64,
}

impl Progress {
    pub(crate) fn new(next_index: LogIndex) -> Self {
        Self {
            match_index: 0,
            next_index,
            state: ProgressState::Probe,
            inflight: VecDeque::new(),
            paused: false,
            chunk_waits: 0,
            recent_active: false,
            read_seq: 0,
        }
    }

    pub(crate) fn is_paused(&self, max_inflight: usize) -> bool {
        match self.state {
            ProgressState::Probe | ProgressState::Snapshot { .. } => self.paused,
            ProgressState::Replicate => self.inflight.len() >= max_inflight,
        }
    }

    pub(crate) fn become_probe(&mut self) {
        // After a snapshot, resume right after it rather than where we were.
        if let ProgressState::Snapshot { index, .. } = self.state {
            self.next_index = self.next_index.max(index + 1).max(self.match_index + 1);
        } else {
            self.next_index = self.match_index + 1;
        }
        self.state = ProgressState::Probe;
        self.inflight.clear();
        self.paused = false;
    }

    pub(crate) fn become_replicate(&mut self) {
        self.state = ProgressState::Replicate;
        self.next_index = self.match_index + 1;
        self.inflight.clear();
        self.paused = false;
    }

    pub(crate) fn become_snapshot(&mut self, index: LogIndex) {
        self.state = ProgressState::Snapshot {
            index,
            offset: 0,
            acked: 0,
        };
        self.inflight.clear();
        self.paused = false;
    }

    /// Record a successful match at `index`. Returns whether anything moved.
    pub(crate) fn update_match(&mut self, index: LogIndex) -> bool {
        let moved = index > self.match_index;
        if moved {
            self.match_index = index;
            self.paused = false;
        }
        self.next_index = self.next_index.max(index + 1);
        while self.inflight.front().is_some_and(|&last| last <= index) {
            self.inflight.pop_front();
        }
        moved
    }

    /// A rejection of the AppendEntries whose prev index was `rejected_prev`; retry from
    /// `hint`. Returns false when the rejection is stale and was ignored.
    pub(crate) fn retreat(&mut self, rejected_prev: LogIndex, hint: LogIndex) -> bool {
        match self.state {
            ProgressState::Replicate => {
                if rejected_prev <= self.match_index {
                    return false;
                }
                self.become_probe();
                self.next_index = hint.max(self.match_index + 1);
                true
            }
            ProgressState::Probe => {
                if rejected_prev + 1 != self.next_index {
                    return false;
                }
                self.next_index = hint.clamp(self.match_index + 1, self.next_index.max(1));
                self.paused = false;
                true
            }
            ProgressState::Snapshot { .. } => false,
        }
    }
}
