//! Elections: role changes, PreVote, RequestVote, CheckQuorum and leadership transfer.
//!
//! ```text
//!              timeout                 pre-votes from a quorum
//!  Follower ────────────> PreCandidate ─────────────────────────> Candidate ──> Leader
//!     ^   (or TimeoutNow: straight to Candidate, skipping the pre-vote)  votes
//!     └──────────── higher term, or a leader of our term ───────────────┘
//! ```
//! A pre-vote asks peers whether they would vote without anyone raising a term, so a node
//! that was cut off cannot depose a healthy leader when it returns (thesis 9.6). With
//! CheckQuorum a leader that has not heard from a quorum for an election timeout steps
//! down, and followers that hear a leader ignore vote requests (4.2.3).

use super::progress::Progress;
use super::{EntryPayload, MessageBody, NodeId, ProposeError, Raft, Role, Term};

impl Raft {
    pub(super) fn reset_election_timer(&mut self) {
        self.election_elapsed = 0;
        self.heartbeat_elapsed = 0;
        let base = self.cfg.election_ticks;
        self.randomized_election_ticks = base + self.rng.below(base);
    }

    /// Whether this node may campaign: it must be a voter in its own latest membership.
    pub(super) fn promotable(&self) -> bool {
        self.membership().is_voter(self.cfg.id)
    }

    /// Whether a leader was heard from within the last election timeout.
    pub(super) fn in_lease(&self) -> bool {
        self.cfg.check_quorum
            && self.leader.is_some()
            && self.election_elapsed < self.cfg.election_ticks
    }

    pub(super) fn become_follower(&mut self, term: Term, leader: Option<NodeId>) {
        if term > self.term {
            self.term = term;
            self.vote = None;
        }
        self.role = Role::Follower;
        self.leader = leader;
        self.votes.clear();
        self.transferee = None;
        self.progress.clear();
        self.reads.clear();
        self.broadcast_pending = false;
        self.reset_election_timer();
    }

    fn become_pre_candidate(&mut self) {
        self.role = Role::PreCandidate;
        self.leader = None;
        self.votes.clear();
        self.reset_election_timer();
    }

    fn become_candidate(&mut self) {
        self.term += 1;
        self.vote = Some(self.cfg.id);
        self.role = Role::Candidate;
        self.leader = None;
        self.votes.clear();
        self.reset_election_timer();
    }

    pub(super) fn become_leader(&mut self) {
        assert!(
            matches!(self.role, Role::Candidate),
            "only a candidate becomes leader"
        );
        self.role = Role::Leader;
        self.leader = Some(self.cfg.id);
        self.transferee = None;
        self.uncommitted_bytes = 0;
        self.reads.clear();
        self.reset_election_timer();
        let next = self.log.last_index() + 1;
        self.progress = self
            .membership()
            .members()
            .filter(|&id| id != self.cfg.id)
            .map(|id| (id, Progress::new(next)))
            .collect();
        // No membership change until an entry of this term commits: this closes the
        // single-server-change bug described on raft-dev (Ongaro, 2015).
        self.pending_conf_index = next;
        self.append_as_leader(EntryPayload::Noop);
    }

    pub(super) fn tick_election(&mut self) {
        self.election_elapsed = self.election_elapsed.saturating_add(1);
        // Only a node that may campaign restarts its timer. One that may not (a learner,
        // or a voter whose log is too stale to know it was promoted) must let its lease
        // on the old leader lapse, or it would ignore the votes that the leader's
        // successor needs from it (the latest config may count it as a voter).
        if self.promotable() && self.election_elapsed >= self.randomized_election_ticks {
            self.election_elapsed = 0;
            self.campaign(self.cfg.pre_vote, false);
        }
    }

    pub(super) fn tick_leader(&mut self) {
        self.heartbeat_elapsed += 1;
        self.election_elapsed += 1;
        if self.election_elapsed >= self.cfg.election_ticks {
            self.election_elapsed = 0;
            if self.cfg.check_quorum && !self.quorum_recently_active() {
                self.become_follower(self.term, None);
                return;
            }
            // A transfer that has not finished within an election timeout is abandoned.
            self.transferee = None;
        }
        if self.heartbeat_elapsed >= self.cfg.heartbeat_ticks {
            self.heartbeat_elapsed = 0;
            self.broadcast_heartbeat();
        }
    }

    /// CheckQuorum: have a majority of voters (counting ourselves) been heard from since
    /// the last check? Resets the activity flags for the next round.
    fn quorum_recently_active(&mut self) -> bool {
        let me = self.cfg.id;
        let membership = self.membership().clone();
        let mut active = usize::from(membership.is_voter(me));
        for (id, pr) in &mut self.progress {
            if membership.is_voter(*id) && pr.recent_active {
                active += 1;
            }
            pr.recent_active = false;
        }
        active >= membership.quorum()
    }

    /// Start a (pre-)election. `force` marks a leadership transfer, which overrides the
    /// peers' leader lease.
    pub(super) fn campaign(&mut self, pre_vote: bool, force: bool) {
        let term = if pre_vote {
            self.become_pre_candidate();
            self.term + 1
        } else {
            self.become_candidate();
            self.term
        };
        let me = self.cfg.id;
        if self.record_vote(me, true) {
            return;
        }
        let voters: Vec<NodeId> = self.membership().voters.iter().copied().collect();
        for id in voters.into_iter().filter(|&id| id != me) {
            let body = MessageBody::RequestVote {
                pre_vote,
                last_log_index: self.log.last_index(),
                last_log_term: self.log.last_term(),
                force,
            };
            self.send_with_term(id, term, body);
        }
    }

    /// Count a vote; on a decisive result move on. Returns whether the election ended.
    fn record_vote(&mut self, from: NodeId, granted: bool) -> bool {
        if !self.membership().is_voter(from) {
            return false;
        }
        self.votes.entry(from).or_insert(granted);
        let quorum = self.membership().quorum();
        let yes = self.votes.values().filter(|&&g| g).count();
        let no = self.votes.len() - yes;
        if yes >= quorum {
            match self.role {
                Role::PreCandidate => self.campaign(false, false),
                Role::Candidate => self.become_leader(),
                _ => {}
            }
            true
        } else if no >= quorum {
            self.become_follower(self.term, None);
            true
        } else {
            false
        }
    }

    pub(super) fn handle_request_vote(
        &mut self,
        from: NodeId,
        term: Term,
        pre_vote: bool,
        last_log_index: u64,
        last_log_term: Term,
    ) {
        // We may vote if we already voted for this node in this term, or have voted for
        // nobody and know no leader; a pre-vote for a future term binds nothing.
        let can_vote = self.vote == Some(from)
            || (self.vote.is_none() && self.leader.is_none())
            || (pre_vote && term > self.term);
        let granted = can_vote && self.log.is_up_to_date(last_log_index, last_log_term);
        if granted && !pre_vote {
            self.vote = Some(from);
            self.election_elapsed = 0;
        }
        // A granted pre-vote answers in the term asked about; everything else in ours.
        let reply_term = if granted { term } else { self.term };
        self.send_with_term(
            from,
            reply_term,
            MessageBody::RequestVoteResp { pre_vote, granted },
        );
    }

    pub(super) fn handle_request_vote_resp(
        &mut self,
        from: NodeId,
        term: Term,
        pre_vote: bool,
        granted: bool,
    ) {
        let expected = match self.role {
            Role::PreCandidate if pre_vote => self.term + 1,
            Role::Candidate if !pre_vote => self.term,
            _ => return,
        };
        if granted && term != expected {
            return;
        }
        self.record_vote(from, granted);
    }

    /// Leadership transfer (thesis 3.10): refuse new proposals, bring `to` up to date,
    /// then tell it to campaign at once.
    pub fn transfer_leader(&mut self, to: NodeId) -> Result<(), ProposeError> {
        self.check_can_propose()?;
        if to == self.cfg.id {
            return Ok(());
        }
        if !self.membership().is_voter(to) {
            return Err(ProposeError::NotVoter(to));
        }
        self.transferee = Some(to);
        self.election_elapsed = 0;
        let up_to_date = self
            .progress
            .get(&to)
            .is_some_and(|pr| pr.match_index == self.log.last_index());
        if up_to_date {
            self.send(to, MessageBody::TimeoutNow);
        } else {
            self.send_append(to, true);
        }
        Ok(())
    }

    /// The voter (other than this leader) whose log matches the most, the natural
    /// target of a leadership transfer. `None` when not leader or alone.
    pub fn transfer_candidate(&self) -> Option<NodeId> {
        if self.role != Role::Leader {
            return None;
        }
        let membership = self.membership();
        self.progress
            .iter()
            .filter(|(id, _)| membership.is_voter(**id))
            .max_by_key(|(id, pr)| (pr.match_index, std::cmp::Reverse(**id)))
            .map(|(id, _)| *id)
    }

    pub(super) fn handle_timeout_now(&mut self, from: NodeId) {
        if self.leader == Some(from) && self.promotable() {
            self.campaign(false, true);
        }
    }
}
