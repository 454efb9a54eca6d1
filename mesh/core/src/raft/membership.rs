//! Membership changes, one server at a time (thesis 4.1, 4.2.2, 4.2.3).
//!
//! A change is a Config entry holding the complete new membership; it takes effect on
//! every node as soon as it is appended. The leader allows one uncommitted change at a
//! time, and none before an entry of its own term has committed. New nodes join as
//! learners (they replicate but do not vote) and are promoted once they have caught up.
//! A leader that removes itself keeps leading, without counting itself, until the change
//! commits, then steps down and hands over to the most up-to-date voter.

use super::progress::Progress;
use super::{
    ConfChange, EntryPayload, LogIndex, Membership, MessageBody, ProposeError, Raft, Role,
};

impl Raft {
    /// Propose a single-server membership change. Returns the index of its entry.
    pub fn propose_conf_change(&mut self, change: ConfChange) -> Result<LogIndex, ProposeError> {
        self.check_can_propose()?;
        if self.pending_conf_index > self.log.committed {
            return Err(ProposeError::ConfChangePending);
        }
        let next = self.membership().apply(change)?;
        let index = self.append_as_leader(EntryPayload::Config(next));
        self.pending_conf_index = index;
        Ok(index)
    }

    /// The membership in force at `index` (the latest Config entry at or before it).
    pub(super) fn membership_at(&self, index: LogIndex) -> Membership {
        self.memberships
            .iter()
            .rev()
            .find(|(i, _)| *i <= index)
            .map_or_else(|| self.memberships[0].1.clone(), |(_, m)| m.clone())
    }

    /// The latest membership changed (appended or truncated away): a leader starts or
    /// stops replicating to the nodes concerned.
    pub(super) fn on_membership_changed(&mut self) {
        if self.role != Role::Leader {
            return;
        }
        let membership = self.membership().clone();
        let me = self.cfg.id;
        self.progress.retain(|id, _| membership.contains(*id));
        let next = self.log.last_index() + 1;
        for id in membership.members().filter(|&id| id != me) {
            self.progress
                .entry(id)
                .or_insert_with(|| Progress::new(next));
        }
        if self.transferee.is_some_and(|t| !membership.is_voter(t)) {
            self.transferee = None;
        }
        self.maybe_commit();
    }

    /// After the change that removed this leader commits, step down and let the most
    /// up-to-date voter campaign at once.
    pub(super) fn maybe_step_down_after_removal(&mut self) {
        let (config_index, membership) = &self.memberships[self.memberships.len() - 1];
        if self.role != Role::Leader
            || membership.is_voter(self.cfg.id)
            || *config_index > self.log.committed
        {
            return;
        }
        let last = self.log.last_index();
        let successor = membership.voters.iter().copied().find(|id| {
            self.progress
                .get(id)
                .is_some_and(|pr| pr.match_index == last)
        });
        // The new commit index must reach the others before we fall silent.
        self.broadcast_append();
        if let Some(id) = successor {
            self.send(id, MessageBody::TimeoutNow);
        }
        self.become_follower(self.term, None);
    }
}
