//! A pure Raft core in the style of etcd-io/raft and tikv/raft-rs.
//!
//! The caller drives it: [`Raft::step`] for every message received, [`Raft::tick`] at a
//! fixed interval, [`Raft::propose`] / [`Raft::read_index`] for clients. Then
//! [`Raft::ready`] returns a [`Ready`] that the caller executes strictly in order:
//!
//! ```text
//!  1. persist  ready.snapshot, ready.entries, ready.hard_state   (one fsync if must_sync)
//!  2. send     ready.messages                                     (only after 1 is durable)
//!  3. apply    ready.snapshot (restore), ready.committed_entries  (in log order)
//!  4. serve    ready.read_states once applied >= read_state.index
//!  5. raft.advance(ready.persisted_marker())
//! ```
//!
//! Implemented: randomized elections with PreVote and CheckQuorum (thesis 9.6, 6.2),
//! pipelined and batched replication with fast backtracking, commit by counting only the
//! leader's own term (5.4.2), ReadIndex (6.4), chunked InstallSnapshot (7), one-server
//! membership changes with learners (4.1, 4.2.2), and leadership transfer (3.10).

mod election;
mod log;
mod membership;
mod progress;
mod read_index;
mod replication;
mod snapshot;
mod types;

pub use types::*;

use log::RaftLog;
use progress::Progress;
use read_index::ReadOnly;
use std::collections::BTreeMap;

/// Static parameters of one node.
#[derive(Clone, Debug)]
pub struct Config {
    /// This node's id.
    pub id: NodeId,
    /// Ticks without hearing from a leader before a follower campaigns; the actual
    /// timeout is drawn uniformly from `[election_ticks, 2 * election_ticks)`.
    pub election_ticks: u32,
    /// Ticks between a leader's heartbeats.
    pub heartbeat_ticks: u32,
    /// Entries per AppendEntries at most.
    pub max_entries_per_msg: usize,
    /// Bytes of entries per AppendEntries at most (one entry may exceed it alone).
    pub max_bytes_per_msg: usize,
    /// Pipelined AppendEntries per follower at most.
    pub max_inflight_msgs: usize,
    /// Bytes of proposed but uncommitted entries at most; beyond it proposals are refused.
    pub max_uncommitted_bytes: usize,
    /// Bytes of one proposal at most.
    pub max_proposal_bytes: usize,
    /// Bytes of snapshot per InstallSnapshot chunk.
    pub snapshot_chunk_bytes: usize,
    /// Bytes of committed entries handed out per Ready at most.
    pub max_apply_bytes: usize,
    /// Run a pre-vote round before raising the term (thesis 9.6).
    pub pre_vote: bool,
    /// Leaders step down without a quorum; followers ignore votes while they hear a leader.
    pub check_quorum: bool,
    /// Seed of the node's random number generator (election timeouts).
    pub seed: u64,
}

impl Config {
    /// Defaults suited to a 10 ms tick: elections after 150-300 ms of silence.
    pub fn new(id: NodeId) -> Self {
        Self {
            id,
            election_ticks: 15,
            heartbeat_ticks: 3,
            max_entries_per_msg: 512,
            max_bytes_per_msg: 1 << 20,
            max_inflight_msgs: 64,
            max_uncommitted_bytes: 64 << 20,
            max_proposal_bytes: 4 << 20,
            snapshot_chunk_bytes: 1 << 20,
            max_apply_bytes: 16 << 20,
            pre_vote: true,
            check_quorum: true,
            seed: id,
        }
    }

    /// Check the parameters make sense together.
    pub fn validate(&self) -> Result<(), InitError> {
        let bad = |why: &'static str| Err(InitError::Config(why));
        if self.id == 0 {
            return bad("node id 0 is reserved");
        }
        if self.heartbeat_ticks == 0 || self.election_ticks <= self.heartbeat_ticks {
            return bad("need 0 < heartbeat_ticks < election_ticks");
        }
        if self.max_entries_per_msg == 0 || self.max_inflight_msgs == 0 {
            return bad("max_entries_per_msg and max_inflight_msgs must be positive");
        }
        if self.snapshot_chunk_bytes == 0 || self.max_bytes_per_msg == 0 {
            return bad("byte limits must be positive");
        }
        Ok(())
    }
}

/// Why a node cannot start.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InitError {
    /// The [`Config`] is inconsistent.
    #[error("invalid raft config: {0}")]
    Config(&'static str),
    /// The stored state contradicts itself (storage must never hand this over).
    #[error("inconsistent stored state: {0}")]
    Storage(String),
}

/// Why a proposal, read or transfer was refused. None of these are fatal: the caller
/// retries elsewhere or later.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProposeError {
    /// This node is not the leader; `leader` is its best guess.
    #[error("not the leader (leader: {leader:?})")]
    NotLeader {
        /// The leader this node knows of, if any.
        leader: Option<NodeId>,
    },
    /// A leadership transfer is under way; retry on the new leader.
    #[error("leadership transfer in progress")]
    TransferInProgress,
    /// The proposal exceeds `max_proposal_bytes`.
    #[error("proposal of {size} bytes exceeds the limit of {max}")]
    TooLarge {
        /// Size of the proposal.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// Too many uncommitted bytes; back off and retry.
    #[error("too many uncommitted entries, try again")]
    Busy,
    /// A membership change is still uncommitted (one at a time).
    #[error("a membership change is already in progress")]
    ConfChangePending,
    /// The membership change itself is invalid.
    #[error(transparent)]
    InvalidConfChange(#[from] ConfChangeError),
    /// Leadership transfer to a node that cannot lead.
    #[error("node {0} is not a voter")]
    NotVoter(NodeId),
}

/// Why a snapshot could not be taken.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CompactError {
    /// Only applied entries can be covered by a snapshot.
    #[error("index {index} is not applied yet (applied {applied})")]
    NotApplied {
        /// Requested index.
        index: LogIndex,
        /// Applied index.
        applied: LogIndex,
    },
    /// The log is already compacted to at least that index.
    #[error("already compacted to {0}")]
    AlreadyCompacted(LogIndex),
}

/// What durable storage held when the node (re)started.
#[derive(Clone, Debug, Default)]
pub struct InitialState {
    /// Term, vote and commit.
    pub hard_state: HardState,
    /// The latest snapshot, if any.
    pub snapshot: Option<Snapshot>,
    /// Entries after the snapshot, contiguous.
    pub entries: Vec<Entry>,
    /// Membership before any log entry: the bootstrap cluster for its founding members,
    /// empty for a node that will join by being added.
    pub membership: Membership,
}

/// Everything the caller must do after feeding inputs, in the order of the fields.
#[derive(Debug, Default)]
#[must_use = "a Ready must be executed and then passed to advance"]
pub struct Ready {
    /// A snapshot received from the leader: persist it (the log restarts after it), then
    /// restore the state machine from it before applying `committed_entries`.
    pub snapshot: Option<Snapshot>,
    /// Entries to append; the first may overwrite (truncate) the stored log from its index.
    pub entries: Vec<Entry>,
    /// Hard state to persist, if changed.
    pub hard_state: Option<HardState>,
    /// Whether the persist step needs an fsync (term, vote, entries or snapshot changed).
    pub must_sync: bool,
    /// Messages to send once everything above is durable.
    pub messages: Vec<Message>,
    /// Committed entries to apply, in order.
    pub committed_entries: Vec<Entry>,
    /// Linearizable reads that may be served once applied reaches their index.
    pub read_states: Vec<ReadState>,
}

impl Ready {
    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.snapshot.is_none()
            && self.entries.is_empty()
            && self.hard_state.is_none()
            && self.messages.is_empty()
            && self.committed_entries.is_empty()
            && self.read_states.is_empty()
    }

    /// The (index, term) that becomes durable once this Ready is persisted: pass it to
    /// [`Raft::advance`].
    pub fn persisted_marker(&self) -> Option<(LogIndex, Term)> {
        match (self.entries.last(), &self.snapshot) {
            (Some(e), _) => Some((e.index, e.term)),
            (None, Some(s)) => Some((s.meta.index, s.meta.term)),
            (None, None) => None,
        }
    }
}

/// A snapshot of the node's state for `/health`, metrics and tests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    /// This node.
    pub id: NodeId,
    /// Current term.
    pub term: Term,
    /// Current role.
    pub role: Role,
    /// Known leader.
    pub leader: Option<NodeId>,
    /// Vote in the current term.
    pub vote: Option<NodeId>,
    /// Commit index.
    pub commit: LogIndex,
    /// Index handed out for applying.
    pub applied: LogIndex,
    /// Last log index.
    pub last_index: LogIndex,
    /// Highest index durable locally.
    pub persisted: LogIndex,
    /// Index of the latest snapshot.
    pub snapshot_index: LogIndex,
    /// Current membership (latest in the log).
    pub membership: Membership,
}

/// splitmix64: a tiny, seedable generator so the core draws no entropy of its own.
#[derive(Clone, Debug)]
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u32) -> u32 {
        (self.next_u64() % u64::from(n.max(1))) as u32
    }
}

/// One Raft node's consensus state. See the module docs for the driving protocol.
#[derive(Debug)]
pub struct Raft {
    cfg: Config,
    term: Term,
    vote: Option<NodeId>,
    role: Role,
    leader: Option<NodeId>,
    log: RaftLog,
    /// Memberships in effect from each index on: `[0]` is the baseline at the snapshot
    /// (or bootstrap), later ones come from Config entries still in the log.
    memberships: Vec<(LogIndex, Membership)>,
    progress: BTreeMap<NodeId, Progress>,
    votes: BTreeMap<NodeId, bool>,
    election_elapsed: u32,
    heartbeat_elapsed: u32,
    randomized_election_ticks: u32,
    rng: Rng,
    transferee: Option<NodeId>,
    /// Index of the latest membership change this leader proposed (or its first entry).
    pending_conf_index: LogIndex,
    uncommitted_bytes: usize,
    reads: ReadOnly,
    /// The latest snapshot (with data), sent to followers that fell behind compaction.
    snapshot: Option<Snapshot>,
    /// A snapshot being received, chunk by chunk.
    incoming: Option<(SnapshotMeta, Vec<u8>)>,
    /// A received snapshot waiting to go out in the next Ready.
    to_install: Option<Snapshot>,
    /// Leader: new entries or a new commit index need sending.
    broadcast_pending: bool,
    msgs: Vec<Message>,
    read_states: Vec<ReadState>,
    last_hard_state: HardState,
}

impl Raft {
    /// A node restored from `state`. Fails if the config is invalid or the stored state
    /// contradicts itself (entries not contiguous after the snapshot, or of a term later
    /// than the stored current term).
    pub fn new(cfg: Config, state: InitialState) -> Result<Self, InitError> {
        cfg.validate()?;
        Self::check_initial_state(&state)?;
        let meta = state
            .snapshot
            .as_ref()
            .map(|s| s.meta.clone())
            .unwrap_or_default();
        let baseline = match &state.snapshot {
            Some(s) => (s.meta.index, s.meta.membership.clone()),
            None => (0, state.membership),
        };
        let log = RaftLog::restore(meta, state.entries, state.hard_state.commit);
        let mut raft = Self {
            rng: Rng(cfg.seed ^ cfg.id.wrapping_mul(0x2545_F491_4F6C_DD1D)),
            cfg,
            term: state.hard_state.term,
            vote: state.hard_state.vote,
            role: Role::Follower,
            leader: None,
            log,
            memberships: vec![baseline],
            progress: BTreeMap::new(),
            votes: BTreeMap::new(),
            election_elapsed: 0,
            heartbeat_elapsed: 0,
            randomized_election_ticks: 0,
            transferee: None,
            pending_conf_index: 0,
            uncommitted_bytes: 0,
            reads: ReadOnly::default(),
            snapshot: state.snapshot,
            incoming: None,
            to_install: None,
            broadcast_pending: false,
            msgs: Vec::new(),
            read_states: Vec::new(),
            last_hard_state: state.hard_state,
        };
        raft.last_hard_state.commit = raft.log.committed;
        let first = raft.log.first_index();
        for index in first..=raft.log.last_index() {
            if let Some(Entry {
                payload: EntryPayload::Config(m),
                ..
            }) = raft.log.entry(index)
            {
                raft.memberships.push((index, m.clone()));
            }
        }
        raft.reset_election_timer();
        Ok(raft)
    }

    fn check_initial_state(state: &InitialState) -> Result<(), InitError> {
        let base = state.snapshot.as_ref().map_or(0, |s| s.meta.index);
        let after_snapshot = state.entries.iter().filter(|e| e.index > base);
        for (expected, e) in (base + 1..).zip(after_snapshot) {
            if e.index != expected {
                return Err(InitError::Storage(format!(
                    "entry {} where {expected} was due",
                    e.index
                )));
            }
        }
        let last_term = state.entries.last().map(|e| e.term);
        let snap_term = state.snapshot.as_ref().map(|s| s.meta.term);
        let newest = last_term.max(snap_term).unwrap_or(0);
        if newest > state.hard_state.term {
            return Err(InitError::Storage(format!(
                "log holds term {newest} but the current term is {}",
                state.hard_state.term
            )));
        }
        Ok(())
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.cfg.id
    }

    /// Current role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// Current term.
    pub fn term(&self) -> Term {
        self.term
    }

    /// The leader this node knows of.
    pub fn leader(&self) -> Option<NodeId> {
        self.leader
    }

    /// The latest membership in the log.
    pub fn membership(&self) -> &Membership {
        // The vector always holds the baseline.
        &self.memberships[self.memberships.len() - 1].1
    }

    /// The entry at `index`, if the log still holds it.
    pub fn entry(&self, index: LogIndex) -> Option<&Entry> {
        self.log.entry(index)
    }

    /// Term of the entry at `index`, if known (the snapshot's own index included).
    pub fn term_at(&self, index: LogIndex) -> Option<Term> {
        self.log.term(index)
    }

    /// The latest snapshot this node holds.
    pub fn snapshot(&self) -> Option<&Snapshot> {
        self.snapshot.as_ref()
    }

    /// Whether this leader is sending a snapshot to some follower.
    pub fn sending_snapshot(&self) -> bool {
        self.role == Role::Leader
            && self
                .progress
                .values()
                .any(|p| matches!(p.state, progress::ProgressState::Snapshot { .. }))
    }

    /// Index of the latest snapshot (cheaper than [`Raft::status`]).
    pub fn snapshot_index(&self) -> LogIndex {
        self.log.snapshot.index
    }

    /// Where the node stands.
    pub fn status(&self) -> Status {
        Status {
            id: self.cfg.id,
            term: self.term,
            role: self.role,
            leader: self.leader,
            vote: self.vote,
            commit: self.log.committed,
            applied: self.log.applied,
            last_index: self.log.last_index(),
            persisted: self.log.persisted,
            snapshot_index: self.log.snapshot.index,
            membership: self.membership().clone(),
        }
    }

    /// Advance logical time by one tick.
    pub fn tick(&mut self) {
        match self.role {
            Role::Leader => self.tick_leader(),
            _ => self.tick_election(),
        }
    }

    /// Feed one message from a peer. Messages for another node, or from a stale term,
    /// are ignored (or answered so the sender learns the term); none can panic the node.
    pub fn step(&mut self, m: Message) {
        if m.to != self.cfg.id || m.from == self.cfg.id {
            return;
        }
        if m.term > self.term {
            if !self.accept_higher_term(&m) {
                return;
            }
        } else if m.term < self.term {
            self.answer_stale(&m);
            return;
        }
        self.dispatch(m);
    }

    /// A message from a higher term: decide whether it moves us to that term. Returns
    /// false when the message must be dropped altogether.
    fn accept_higher_term(&mut self, m: &Message) -> bool {
        if let MessageBody::RequestVote { force, .. } = m.body {
            // Leader stickiness (thesis 4.2.3): while we hear from a live leader, a vote
            // request is a disruption from a node that lost touch, not a real election.
            if self.in_lease() && !force {
                return false;
            }
        }
        match m.body {
            MessageBody::RequestVote { pre_vote: true, .. } => {}
            MessageBody::RequestVoteResp {
                pre_vote: true,
                granted: true,
            } => {}
            MessageBody::AppendEntries { .. }
            | MessageBody::Heartbeat { .. }
            | MessageBody::InstallSnapshot { .. } => self.become_follower(m.term, Some(m.from)),
            _ => self.become_follower(m.term, None),
        }
        true
    }

    /// A message from a lower term: tell a stale leader or pre-candidate our term.
    fn answer_stale(&mut self, m: &Message) {
        match m.body {
            MessageBody::AppendEntries { .. } | MessageBody::Heartbeat { .. }
                if self.cfg.check_quorum || self.cfg.pre_vote =>
            {
                self.send(m.from, MessageBody::HeartbeatResp { read_seq: 0 });
            }
            MessageBody::RequestVote { pre_vote: true, .. } => {
                let body = MessageBody::RequestVoteResp {
                    pre_vote: true,
                    granted: false,
                };
                self.send(m.from, body);
            }
            _ => {}
        }
    }

    fn dispatch(&mut self, m: Message) {
        let from = m.from;
        match m.body {
            MessageBody::RequestVote {
                pre_vote,
                last_log_index,
                last_log_term,
                ..
            } => self.handle_request_vote(from, m.term, pre_vote, last_log_index, last_log_term),
            MessageBody::RequestVoteResp { pre_vote, granted } => {
                self.handle_request_vote_resp(from, m.term, pre_vote, granted)
            }
            MessageBody::AppendEntries {
                prev_log_index,
                prev_log_term,
                entries,
                leader_commit,
            } => {
                self.follow(from);
                self.handle_append_entries(
                    from,
                    prev_log_index,
                    prev_log_term,
                    entries,
                    leader_commit,
                );
            }
            MessageBody::AppendEntriesResp {
                success,
                match_index,
                rejected_prev,
                conflict_index,
                conflict_term,
            } => self.handle_append_entries_resp(
                from,
                success,
                match_index,
                rejected_prev,
                conflict_index,
                conflict_term,
            ),
            MessageBody::Heartbeat { commit, read_seq } => {
                self.follow(from);
                self.handle_heartbeat(from, commit, read_seq);
            }
            MessageBody::HeartbeatResp { read_seq } => self.handle_heartbeat_resp(from, read_seq),
            MessageBody::InstallSnapshot {
                meta,
                offset,
                data,
                done,
            } => {
                self.follow(from);
                self.handle_install_snapshot(from, meta, offset, data, done);
            }
            MessageBody::InstallSnapshotResp {
                index,
                next_offset,
                done,
            } => self.handle_install_snapshot_resp(from, index, next_offset, done),
            MessageBody::TimeoutNow => self.handle_timeout_now(from),
            // The node core's, never handed to Raft.
            MessageBody::Forward { .. } => {}
        }
    }

    /// A message from the leader of our term: make sure we follow it.
    fn follow(&mut self, leader: NodeId) {
        if self.role != Role::Follower || self.leader != Some(leader) {
            self.become_follower(self.term, Some(leader));
        }
        self.election_elapsed = 0;
    }

    /// Propose an application command. Returns the index it will occupy if committed;
    /// the caller learns the outcome when an entry with that index and the current term
    /// is applied (a different term there means it was lost).
    pub fn propose(&mut self, data: Vec<u8>) -> Result<LogIndex, ProposeError> {
        self.check_can_propose()?;
        if data.len() > self.cfg.max_proposal_bytes {
            return Err(ProposeError::TooLarge {
                size: data.len(),
                max: self.cfg.max_proposal_bytes,
            });
        }
        if self.uncommitted_bytes + data.len() > self.cfg.max_uncommitted_bytes {
            return Err(ProposeError::Busy);
        }
        Ok(self.append_as_leader(EntryPayload::Command(data)))
    }

    fn check_can_propose(&self) -> Result<(), ProposeError> {
        if self.role != Role::Leader {
            return Err(ProposeError::NotLeader {
                leader: self.leader,
            });
        }
        if self.transferee.is_some() {
            return Err(ProposeError::TransferInProgress);
        }
        Ok(())
    }

    /// Whether a Ready has anything in it.
    pub fn has_ready(&self) -> bool {
        self.to_install.is_some()
            || self.log.unpersisted_from <= self.log.last_index()
            || self.hard_state() != self.last_hard_state
            || !self.msgs.is_empty()
            || self.log.has_committed_to_apply()
            || !self.read_states.is_empty()
            || (self.broadcast_pending && self.role == Role::Leader)
    }

    /// Collect everything to persist, send and apply. Execute it in field order, then call
    /// [`Raft::advance`].
    pub fn ready(&mut self) -> Ready {
        if std::mem::take(&mut self.broadcast_pending) && self.role == Role::Leader {
            self.broadcast_append();
        }
        let hs = self.hard_state();
        let hard_state = (hs != self.last_hard_state).then_some(hs);
        let vote_changed =
            hs.term != self.last_hard_state.term || hs.vote != self.last_hard_state.vote;
        self.last_hard_state = hs;
        let snapshot = self.to_install.take();
        let entries = self.log.take_unpersisted();
        let must_sync = vote_changed || snapshot.is_some() || !entries.is_empty();
        Ready {
            committed_entries: self.log.take_committed(self.cfg.max_apply_bytes),
            snapshot,
            entries,
            hard_state,
            must_sync,
            messages: std::mem::take(&mut self.msgs),
            read_states: std::mem::take(&mut self.read_states),
        }
    }

    /// The Ready whose marker is given has been persisted (and its messages sent and
    /// entries applied).
    pub fn advance(&mut self, persisted: Option<(LogIndex, Term)>) {
        if let Some((index, term)) = persisted {
            // A later truncation may have replaced what was written; only an entry that
            // is still in the log with the same term proves the prefix is durable.
            if index > self.log.persisted && self.log.matches(index, term) {
                self.log.persisted = index;
                if self.role == Role::Leader {
                    self.maybe_commit();
                }
            }
        }
    }

    fn hard_state(&self) -> HardState {
        HardState {
            term: self.term,
            vote: self.vote,
            commit: self.log.committed,
        }
    }

    fn send(&mut self, to: NodeId, body: MessageBody) {
        self.send_with_term(to, self.term, body);
    }

    fn send_with_term(&mut self, to: NodeId, term: Term, body: MessageBody) {
        self.msgs.push(Message {
            from: self.cfg.id,
            to,
            term,
            body,
        });
    }

    /// Move the commit index forward (never back).
    fn commit_to(&mut self, index: LogIndex) {
        let index = index.min(self.log.last_index());
        if index > self.log.committed {
            self.log.committed = index;
        }
    }
}

#[cfg(test)]
mod tests;
