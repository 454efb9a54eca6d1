//! The nouns of the Raft paper: terms, indexes, entries, messages, hard state, snapshots.
//!
//! Every type here crosses a process boundary (the wire or the disk), so all of them are
//! serde types with plain layouts: enums only ever gain variants at the end.

use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// A node's identity within the cluster.
pub type NodeId = u64;
/// A Raft term (election epoch).
pub type Term = u64;
/// A position in the replicated log; the first entry has index 1.
pub type LogIndex = u64;

/// One entry of the replicated log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Term of the leader that created the entry.
    pub term: Term,
    /// Position in the log.
    pub index: LogIndex,
    /// What the entry carries.
    pub payload: EntryPayload,
}

impl Entry {
    /// Approximate encoded size, used for byte caps on messages and the uncommitted tail.
    pub fn size_bytes(&self) -> usize {
        24 + match &self.payload {
            EntryPayload::Noop => 0,
            EntryPayload::Command(data) => data.len(),
            EntryPayload::Config(m) => 8 * (m.voters.len() + m.learners.len()),
        }
    }
}

/// The content of a log entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryPayload {
    /// Appended by every new leader so that it can commit entries of its own term.
    Noop,
    /// An opaque application command.
    Command(Vec<u8>),
    /// The complete cluster membership after a single-server change. It takes effect as
    /// soon as it is appended to a log (Raft thesis 4.1), committed or not.
    Config(Membership),
}

/// Who is in the cluster: voters elect and form quorums; learners only replicate.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Membership {
    /// Nodes that vote and count towards quorums.
    pub voters: BTreeSet<NodeId>,
    /// Nodes that receive the log but neither vote nor count.
    pub learners: BTreeSet<NodeId>,
}

/// One single-server membership change.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConfChange {
    /// Start replicating to a new node, without a vote.
    AddLearner(NodeId),
    /// Give an existing learner a vote.
    PromoteLearner(NodeId),
    /// Remove a voter or learner (possibly the leader itself).
    RemoveNode(NodeId),
}

/// Why a membership change is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfChangeError {
    /// The node is already a member.
    #[error("node {0} is already a member")]
    AlreadyMember(NodeId),
    /// The node is not a learner, so it cannot be promoted.
    #[error("node {0} is not a learner")]
    NotLearner(NodeId),
    /// The node is not a member, so it cannot be removed.
    #[error("node {0} is not a member")]
    NotMember(NodeId),
    /// Removing the last voter would leave a cluster that can never elect a leader.
    #[error("cannot remove the last voter {0}")]
    LastVoter(NodeId),
}

impl Membership {
    /// A membership of the given voters and no learners.
    pub fn with_voters(voters: impl IntoIterator<Item = NodeId>) -> Self {
        Self {
            voters: voters.into_iter().collect(),
            learners: BTreeSet::new(),
        }
    }

    /// Whether `id` votes.
    pub fn is_voter(&self, id: NodeId) -> bool {
        self.voters.contains(&id)
    }

    /// Whether `id` is a voter or a learner.
    pub fn contains(&self, id: NodeId) -> bool {
        self.voters.contains(&id) || self.learners.contains(&id)
    }

    /// Every member, voters and learners, in id order.
    pub fn members(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.voters.union(&self.learners).copied()
    }

    /// Votes needed for a majority of the voters.
    pub fn quorum(&self) -> usize {
        self.voters.len() / 2 + 1
    }

    /// The membership after one change, or why the change is invalid.
    pub fn apply(&self, change: ConfChange) -> Result<Self, ConfChangeError> {
        let mut next = self.clone();
        match change {
            ConfChange::AddLearner(id) => {
                if self.contains(id) {
                    return Err(ConfChangeError::AlreadyMember(id));
                }
                next.learners.insert(id);
            }
            ConfChange::PromoteLearner(id) => {
                if !next.learners.remove(&id) {
                    return Err(ConfChangeError::NotLearner(id));
                }
                next.voters.insert(id);
            }
            ConfChange::RemoveNode(id) => {
                if !self.contains(id) {
                    return Err(ConfChangeError::NotMember(id));
                }
                if self.voters.len() == 1 && self.is_voter(id) {
                    return Err(ConfChangeError::LastVoter(id));
                }
                next.voters.remove(&id);
                next.learners.remove(&id);
            }
        }
        Ok(next)
    }
}

/// State that must be durable before the node answers anyone: the current term and the
/// vote cast in it. `commit` rides along so a restart re-applies without waiting for a
/// leader; losing it is harmless.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HardState {
    /// Latest term this node has seen.
    pub term: Term,
    /// Candidate voted for in `term`, if any.
    pub vote: Option<NodeId>,
    /// Highest index known committed.
    pub commit: LogIndex,
}

/// Where a snapshot stands in the log, and the membership as of that point.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotMeta {
    /// Index of the last entry the snapshot covers.
    pub index: LogIndex,
    /// Term of that entry.
    pub term: Term,
    /// Membership as of `index`.
    pub membership: Membership,
}

/// A snapshot of the application state machine at `meta.index`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Position and membership.
    pub meta: SnapshotMeta,
    /// The state machine's own bytes, shared: a snapshot of a big state is hundreds of
    /// megabytes, and the log, the storage and the transfer to a follower each hold it
    /// (a copy on the node's loop took long enough to miss heartbeats). Encoded as plain
    /// bytes.
    pub data: std::sync::Arc<Vec<u8>>,
}

/// A message between two Raft nodes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// Sender.
    pub from: NodeId,
    /// Receiver.
    pub to: NodeId,
    /// Sender's term (for a pre-vote request: the term it would campaign in).
    pub term: Term,
    /// What the message says.
    pub body: MessageBody,
}

/// The Raft RPCs and their answers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MessageBody {
    /// RequestVote, or PreVote when `pre_vote` is set (thesis 9.6).
    RequestVote {
        /// A pre-vote asks "would you vote for me?" without changing anyone's term.
        pre_vote: bool,
        /// Candidate's last log index.
        last_log_index: LogIndex,
        /// Candidate's last log term.
        last_log_term: Term,
        /// Set by a leadership transfer: overrides the leader-lease check.
        force: bool,
    },
    /// Answer to RequestVote / PreVote.
    RequestVoteResp {
        /// Whether this answers a pre-vote.
        pre_vote: bool,
        /// Whether the vote is granted.
        granted: bool,
    },
    /// AppendEntries.
    AppendEntries {
        /// Index of the entry just before `entries`.
        prev_log_index: LogIndex,
        /// Term of that entry.
        prev_log_term: Term,
        /// Entries to append (may be empty).
        entries: Vec<Entry>,
        /// Leader's commit index.
        leader_commit: LogIndex,
    },
    /// Answer to AppendEntries.
    AppendEntriesResp {
        /// Whether the log matched at `prev_log_index`.
        success: bool,
        /// On success: the last index known to match the leader.
        match_index: LogIndex,
        /// On failure: the `prev_log_index` of the rejected request (to spot stale replies).
        rejected_prev: LogIndex,
        /// On failure: where the leader should retry from.
        conflict_index: LogIndex,
        /// On failure: the follower's term at `rejected_prev`, if it has that entry.
        conflict_term: Option<Term>,
    },
    /// Heartbeat: asserts leadership, carries the commit index and a read sequence.
    Heartbeat {
        /// min(leader commit, follower's match index): never past what the follower holds.
        commit: LogIndex,
        /// ReadIndex round this heartbeat confirms.
        read_seq: u64,
    },
    /// Answer to a heartbeat.
    HeartbeatResp {
        /// The read round echoed back.
        read_seq: u64,
    },
    /// One chunk of a snapshot.
    InstallSnapshot {
        /// Which snapshot.
        meta: SnapshotMeta,
        /// Byte offset of `data` within the snapshot.
        offset: u64,
        /// The chunk.
        data: Vec<u8>,
        /// Whether this is the last chunk.
        done: bool,
    },
    /// Answer to one snapshot chunk.
    InstallSnapshotResp {
        /// Index of the snapshot acknowledged.
        index: LogIndex,
        /// Next byte offset the follower expects.
        next_offset: u64,
        /// Whether the follower installed (or already had) the whole snapshot.
        done: bool,
    },
    /// Leadership transfer: start an election now.
    TimeoutNow,
    /// Not a Raft RPC: a command a node asks the leader to propose for it (its cache
    /// agent's requests). The node core takes it before Raft would see it; the leader
    /// proposes it only if it names the node that sent it.
    Forward {
        /// The encoded command.
        command: Vec<u8>,
    },
}

impl MessageBody {
    /// Short name, for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::RequestVote { pre_vote: true, .. } => "pre_vote",
            Self::RequestVote { .. } => "request_vote",
            Self::RequestVoteResp { pre_vote: true, .. } => "pre_vote_resp",
            Self::RequestVoteResp { .. } => "request_vote_resp",
            Self::AppendEntries { .. } => "append_entries",
            Self::AppendEntriesResp { .. } => "append_entries_resp",
            Self::Heartbeat { .. } => "heartbeat",
            Self::HeartbeatResp { .. } => "heartbeat_resp",
            Self::InstallSnapshot { .. } => "install_snapshot",
            Self::InstallSnapshotResp { .. } => "install_snapshot_resp",
            Self::TimeoutNow => "timeout_now",
            Self::Forward { .. } => "forward",
        }
    }
}

/// A linearizable read that may now be served: once the state machine has applied
/// `index`, reading it reflects every write committed before the read was requested.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadState {
    /// The commit index at the time of the request.
    pub index: LogIndex,
    /// The caller's context, returned unchanged.
    pub ctx: Vec<u8>,
}

/// A node's role.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// Follows a leader (or waits for one).
    Follower,
    /// Asking whether it could win an election, without raising its term.
    PreCandidate,
    /// Campaigning in a new term.
    Candidate,
    /// Leads its term.
    Leader,
}

impl Role {
    /// The number used by `/health`: 0 follower, 1 candidate (or pre-candidate), 2 leader.
    pub fn code(self) -> u8 {
        match self {
            Self::Follower => 0,
            Self::PreCandidate | Self::Candidate => 1,
            Self::Leader => 2,
        }
    }

    /// Lower-case name for logs and `/health`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Follower => "follower",
            Self::PreCandidate => "pre_candidate",
            Self::Candidate => "candidate",
            Self::Leader => "leader",
        }
    }
}
