//! Safety properties checked after every step of a simulation.
//!
//! Each check cites the property of the Raft paper (figure 3) it enforces:
//! - Election Safety: at most one leader per term.
//! - Log Matching: two entries with the same index and term are identical, and so are
//!   the logs before them. Checked incrementally: (index, term) must always map to the
//!   same content and the same previous term, which by induction fixes the whole prefix.
//! - Leader Completeness: a new leader holds every entry committed before its term.
//! - State Machine Safety: every node applies the same entry at each index and reaches
//!   the same state there (also across snapshots).
//! - Monotonic commit and term on every node while it runs.

use crate::kv::Fnv;
use mesh_core::raft::{Entry, EntryPayload, LogIndex, NodeId, Raft, Term};
use std::collections::BTreeMap;

/// A content hash of an entry, stable across runs.
pub fn entry_hash(e: &Entry) -> u64 {
    let mut h = Fnv::default();
    h.write(e.term);
    h.write(e.index);
    match &e.payload {
        EntryPayload::Noop => h.write(0),
        EntryPayload::Command(data) => {
            h.write(1);
            h.write_bytes(data);
        }
        EntryPayload::Config(m) => {
            h.write(2);
            m.voters.iter().for_each(|v| h.write(*v));
            h.write(u64::MAX);
            m.learners.iter().for_each(|v| h.write(*v));
        }
    }
    h.0
}

/// What the checker has learned so far across all nodes.
#[derive(Debug, Default)]
pub struct Invariants {
    leaders: BTreeMap<Term, NodeId>,
    positions: BTreeMap<(LogIndex, Term), (u64, Term)>,
    committed: BTreeMap<LogIndex, (Term, u64)>,
    digests: BTreeMap<LogIndex, u64>,
}

/// Per-node marks for the monotonicity checks, reset when the node restarts.
#[derive(Clone, Debug, Default)]
pub struct NodeMarks {
    /// Commit index at the last check.
    pub commit: LogIndex,
    /// Term at the last check.
    pub term: Term,
    /// Term in which the node was last seen leading.
    pub led: Option<Term>,
}

impl Invariants {
    /// Entries a node is about to persist: Log Matching.
    pub fn check_written(&mut self, raft: &Raft, entries: &[Entry]) -> Result<(), String> {
        let Some(first) = entries.first() else {
            return Ok(());
        };
        let mut prev_term = raft.term_at(first.index - 1).ok_or_else(|| {
            format!(
                "node {} writes entry {} after a gap",
                raft.id(),
                first.index
            )
        })?;
        for e in entries {
            let fact = (entry_hash(e), prev_term);
            match self.positions.get(&(e.index, e.term)) {
                Some(known) if *known != fact => {
                    return Err(format!(
                        "log matching: node {} holds a different entry at index {} term {}",
                        raft.id(),
                        e.index,
                        e.term
                    ))
                }
                Some(_) => {}
                None => {
                    self.positions.insert((e.index, e.term), fact);
                }
            }
            prev_term = e.term;
        }
        Ok(())
    }

    /// After every step, for one running node.
    pub fn check_node(&mut self, raft: &Raft, marks: &mut NodeMarks) -> Result<(), String> {
        let st = raft.status();
        let id = st.id;
        if st.term < marks.term {
            return Err(format!(
                "node {id}: term went back from {} to {}",
                marks.term, st.term
            ));
        }
        if st.commit < marks.commit {
            return Err(format!(
                "node {id}: commit went back from {} to {}",
                marks.commit, st.commit
            ));
        }
        if st.commit > st.last_index || st.commit < st.snapshot_index {
            return Err(format!(
                "node {id}: commit {} outside log [{}, {}]",
                st.commit, st.snapshot_index, st.last_index
            ));
        }
        for index in marks.commit.max(st.snapshot_index) + 1..=st.commit {
            let Some(e) = raft.entry(index) else { continue };
            self.record_committed(id, e)?;
        }
        marks.commit = st.commit;
        marks.term = st.term;
        if st.role == mesh_core::raft::Role::Leader {
            if let Some(&other) = self.leaders.get(&st.term) {
                if other != id {
                    return Err(format!(
                        "election safety: nodes {other} and {id} both lead term {}",
                        st.term
                    ));
                }
            }
            self.leaders.insert(st.term, id);
            if marks.led != Some(st.term) {
                marks.led = Some(st.term);
                self.check_leader_complete(raft, st.snapshot_index)?;
            }
        }
        Ok(())
    }

    fn record_committed(&mut self, id: NodeId, e: &Entry) -> Result<(), String> {
        let fact = (e.term, entry_hash(e));
        match self.committed.get(&e.index) {
            Some(known) if *known != fact => Err(format!(
                "committed entries differ at index {}: node {id} has term {} but term {} was committed",
                e.index, e.term, known.0
            )),
            Some(_) => Ok(()),
            None => {
                self.committed.insert(e.index, fact);
                Ok(())
            }
        }
    }

    fn check_leader_complete(&self, raft: &Raft, snapshot_index: LogIndex) -> Result<(), String> {
        for (&index, &(term, hash)) in self.committed.range(snapshot_index + 1..) {
            let ok = raft
                .entry(index)
                .is_some_and(|e| e.term == term && entry_hash(e) == hash);
            if !ok {
                return Err(format!(
                    "leader completeness: node {} leads term {} without committed entry {index} (term {term})",
                    raft.id(),
                    raft.term()
                ));
            }
        }
        Ok(())
    }

    /// A node applied `entry` and its state machine now has `digest`.
    pub fn check_applied(&mut self, id: NodeId, e: &Entry, digest: u64) -> Result<(), String> {
        self.record_committed(id, e).map_err(|why| {
            format!("state machine safety: node {id} applied an uncommitted entry: {why}")
        })?;
        self.check_digest(id, e.index, digest)
    }

    /// A node's state machine reached `index` with `digest` (by applying or restoring).
    pub fn check_digest(&mut self, id: NodeId, index: LogIndex, digest: u64) -> Result<(), String> {
        match self.digests.get(&index) {
            Some(&known) if known != digest => Err(format!(
                "state machine safety: node {id} reached a different state at index {index}"
            )),
            Some(_) => Ok(()),
            None => {
                self.digests.insert(index, digest);
                Ok(())
            }
        }
    }

    /// Number of distinct committed entries seen.
    pub fn committed_count(&self) -> usize {
        self.committed.len()
    }

    /// Number of terms that had a leader.
    pub fn leader_terms(&self) -> usize {
        self.leaders.len()
    }
}
