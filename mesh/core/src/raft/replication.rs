//! Log replication: AppendEntries, heartbeats and the commit rule.
//!
//! The leader streams entries to each follower according to its [`Progress`] state
//! (probe one at a time, then pipeline up to `max_inflight_msgs`, batches capped in
//! entries and bytes). A rejection carries a hint (the conflicting term and its first
//! index) so the leader skips a whole term per round trip instead of one entry. An entry
//! commits once a quorum of voters stores it and it belongs to the leader's own term
//! (Raft 5.4.2); earlier entries commit with it.
//!
//! [`Progress`]: super::progress::Progress

use super::progress::ProgressState;
use super::{Entry, EntryPayload, LogIndex, MessageBody, NodeId, Raft, Role, Term};

impl Raft {
    /// Append an entry of our term; it goes out with the next Ready.
    pub(super) fn append_as_leader(&mut self, payload: EntryPayload) -> LogIndex {
        let entry = Entry {
            term: self.term,
            index: self.log.last_index() + 1,
            payload,
        };
        let index = entry.index;
        self.uncommitted_bytes += entry.size_bytes();
        self.append_to_log(vec![entry]);
        self.broadcast_pending = true;
        index
    }

    /// Put entries into the log, truncating a conflicting suffix first, and track any
    /// membership they carry. Entries already present with the same term are skipped.
    pub(super) fn append_to_log(&mut self, entries: Vec<Entry>) {
        let mut membership_changed = false;
        for entry in entries {
            match self.log.term(entry.index) {
                Some(term) if term == entry.term => continue,
                Some(_) => {
                    self.log.truncate_from(entry.index);
                    let before = self.memberships.len();
                    self.memberships.retain(|(i, _)| *i < entry.index);
                    membership_changed |= self.memberships.len() != before;
                }
                None => {}
            }
            if let EntryPayload::Config(m) = &entry.payload {
                self.memberships.push((entry.index, m.clone()));
                membership_changed = true;
            }
            self.log.push(entry);
        }
        if membership_changed {
            self.on_membership_changed();
        }
    }

    /// Send AppendEntries to every member (new entries, or at least the commit index).
    pub(super) fn broadcast_append(&mut self) {
        let peers: Vec<NodeId> = self.progress.keys().copied().collect();
        for id in peers {
            self.send_append(id, true);
        }
    }

    pub(super) fn broadcast_heartbeat(&mut self) {
        let read_seq = self.reads.seq;
        let peers: Vec<(NodeId, LogIndex)> = self
            .progress
            .iter()
            .map(|(&id, pr)| (id, pr.match_index))
            .collect();
        for (id, matched) in peers {
            let commit = self.log.committed.min(matched);
            self.send(id, MessageBody::Heartbeat { commit, read_seq });
        }
    }

    /// Send what `to` is missing, as far as its progress state allows. With `allow_empty`
    /// an AppendEntries goes out even with no entries (to carry the commit index, or to
    /// provoke a rejection that reveals a lost message).
    pub(super) fn send_append(&mut self, to: NodeId, allow_empty: bool) {
        let mut allow_empty = allow_empty;
        loop {
            let Some(pr) = self.progress.get(&to) else {
                return;
            };
            if pr.is_paused(self.cfg.max_inflight_msgs) {
                return;
            }
            if matches!(pr.state, ProgressState::Snapshot { .. }) {
                self.send_snapshot_chunk(to);
                return;
            }
            let next = pr.next_index;
            let prev = next - 1;
            let Some(prev_term) = self.log.term(prev) else {
                // The follower needs entries we compacted away.
                self.start_snapshot_transfer(to);
                return;
            };
            let entries = self.log.slice(
                next,
                self.log.last_index(),
                self.cfg.max_entries_per_msg,
                self.cfg.max_bytes_per_msg,
            );
            if entries.is_empty() && !allow_empty {
                return;
            }
            allow_empty = false;
            let last = entries.last().map(|e| e.index);
            let Some(pr) = self.progress.get_mut(&to) else {
                return;
            };
            let pipelining = match pr.state {
                ProgressState::Replicate => {
                    if let Some(last) = last {
                        pr.next_index = last + 1;
                        pr.inflight.push_back(last);
                    }
                    true
                }
                _ => {
                    pr.paused = true;
                    false
                }
            };
            let body = MessageBody::AppendEntries {
                prev_log_index: prev,
                prev_log_term: prev_term,
                entries,
                leader_commit: self.log.committed,
            };
            self.send(to, body);
            // In Replicate keep filling the window while there is more to send.
            if !pipelining || last.is_none() {
                return;
            }
        }
    }

    pub(super) fn handle_append_entries(
        &mut self,
        from: NodeId,
        prev_log_index: LogIndex,
        prev_log_term: Term,
        entries: Vec<Entry>,
        leader_commit: LogIndex,
    ) {
        if prev_log_index < self.log.committed {
            // Everything up to our commit index matches any leader's log (leader
            // completeness); say so and let the leader continue from there.
            let body = Self::append_ok(self.log.committed);
            self.send(from, body);
            return;
        }
        if !self.log.matches(prev_log_index, prev_log_term) {
            let (conflict_index, conflict_term) = self.conflict_hint(prev_log_index);
            let body = MessageBody::AppendEntriesResp {
                success: false,
                match_index: 0,
                rejected_prev: prev_log_index,
                conflict_index,
                conflict_term,
            };
            self.send(from, body);
            return;
        }
        let last_new = prev_log_index + entries.len() as u64;
        if entries
            .iter()
            .enumerate()
            .any(|(i, e)| e.index != prev_log_index + 1 + i as u64)
        {
            return; // Malformed: entries must follow prev contiguously.
        }
        self.append_to_log(entries);
        self.commit_to(leader_commit.min(last_new));
        self.send(from, Self::append_ok(last_new));
    }

    fn append_ok(match_index: LogIndex) -> MessageBody {
        MessageBody::AppendEntriesResp {
            success: true,
            match_index,
            rejected_prev: 0,
            conflict_index: 0,
            conflict_term: None,
        }
    }

    /// Where the leader should retry after our log failed to match at `prev`.
    fn conflict_hint(&self, prev: LogIndex) -> (LogIndex, Option<Term>) {
        if prev > self.log.last_index() {
            return (self.log.last_index() + 1, None);
        }
        let term = self.log.term(prev);
        let first = self
            .log
            .first_index_of_term_at(prev, self.log.committed + 1);
        (first, term)
    }

    pub(super) fn handle_append_entries_resp(
        &mut self,
        from: NodeId,
        success: bool,
        match_index: LogIndex,
        rejected_prev: LogIndex,
        conflict_index: LogIndex,
        conflict_term: Option<Term>,
    ) {
        if self.role != Role::Leader {
            return;
        }
        let last_index = self.log.last_index();
        let hint = self.retry_index(rejected_prev, conflict_index, conflict_term);
        let Some(pr) = self.progress.get_mut(&from) else {
            return;
        };
        pr.recent_active = true;
        if !success {
            if pr.retreat(rejected_prev, hint) {
                self.send_append(from, true);
            }
            return;
        }
        let match_index = match_index.min(last_index);
        let moved = pr.update_match(match_index);
        match pr.state {
            ProgressState::Probe => {
                pr.become_replicate();
            }
            ProgressState::Snapshot { index, .. } if pr.match_index >= index => pr.become_probe(),
            _ => {}
        }
        let caught_up = pr.match_index == last_index;
        if moved {
            self.maybe_commit();
        }
        if caught_up && self.transferee == Some(from) {
            self.send(from, MessageBody::TimeoutNow);
        }
        self.send_append(from, false);
    }

    /// The next index to try after a rejection, from the follower's hint.
    fn retry_index(
        &self,
        rejected_prev: LogIndex,
        conflict_index: LogIndex,
        conflict_term: Option<Term>,
    ) -> LogIndex {
        let hint = match conflict_term.and_then(|t| self.log.last_index_of_term(t)) {
            // We share entries of that term: resume right after our last one of it.
            Some(last_of_term) => last_of_term + 1,
            None => conflict_index,
        };
        hint.min(rejected_prev).max(1)
    }

    pub(super) fn handle_heartbeat(&mut self, from: NodeId, commit: LogIndex, read_seq: u64) {
        self.commit_to(commit);
        self.send(from, MessageBody::HeartbeatResp { read_seq });
    }

    pub(super) fn handle_heartbeat_resp(&mut self, from: NodeId, read_seq: u64) {
        if self.role != Role::Leader {
            return;
        }
        let last_index = self.log.last_index();
        let Some(pr) = self.progress.get_mut(&from) else {
            return;
        };
        pr.recent_active = true;
        pr.read_seq = pr.read_seq.max(read_seq);
        // A lost message leaves a probe paused or a pipeline window full: the heartbeat
        // round trip proves the follower is reachable, so let one more message go. A
        // snapshot chunk gets a few heartbeats' time first (it may be big, and still on
        // its way).
        let chunk_out = matches!(pr.state, ProgressState::Snapshot { .. }) && pr.paused;
        if chunk_out {
            pr.chunk_waits += 1;
        }
        if !chunk_out || pr.chunk_waits >= super::progress::SNAPSHOT_CHUNK_PATIENCE {
            pr.paused = false;
            // Nothing confirmed for a while: send again from what the follower has.
            if let ProgressState::Snapshot { offset, acked, .. } = &mut pr.state {
                *offset = *acked;
            }
        }
        if pr.inflight.len() >= self.cfg.max_inflight_msgs {
            pr.inflight.pop_front();
        }
        if pr.match_index < last_index {
            self.send_append(from, true);
        }
        self.release_reads();
    }

    /// Commit the highest index stored on a quorum of voters, if it is of our term.
    pub(super) fn maybe_commit(&mut self) {
        let membership = self.membership();
        let mut matched: Vec<LogIndex> = membership
            .voters
            .iter()
            .map(|&id| {
                if id == self.cfg.id {
                    self.log.persisted
                } else {
                    self.progress.get(&id).map_or(0, |pr| pr.match_index)
                }
            })
            .collect();
        if matched.is_empty() {
            return;
        }
        matched.sort_unstable_by(|a, b| b.cmp(a));
        let candidate = matched[membership.quorum() - 1];
        if candidate > self.log.committed && self.log.term(candidate) == Some(self.term) {
            self.commit_to(candidate);
            self.on_leader_commit();
        }
    }

    /// The leader's commit index moved.
    fn on_leader_commit(&mut self) {
        self.broadcast_pending = true;
        self.uncommitted_bytes = (self.log.committed + 1..=self.log.last_index())
            .filter_map(|i| self.log.entry(i))
            .map(Entry::size_bytes)
            .sum();
        self.start_waiting_reads();
        self.maybe_step_down_after_removal();
    }
}
