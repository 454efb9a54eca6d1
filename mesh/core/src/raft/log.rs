//! The in-memory Raft log: entries after the last snapshot, plus what is durable.
//!
//! The core owns the log tail since the last snapshot; the shell's storage mirrors it on
//! disk. `persisted` is the highest index known durable locally, and `unpersisted_from`
//! the lowest index the next [`super::Ready`] must (re)write. A truncation moves both back.

use super::types::{Entry, LogIndex, SnapshotMeta, Term};

/// Entries after `snapshot.index`, with commit, apply and persistence marks.
#[derive(Debug, Default)]
pub(crate) struct RaftLog {
    /// The snapshot the log starts after.
    pub(crate) snapshot: SnapshotMeta,
    /// `entries[i].index == snapshot.index + 1 + i`.
    entries: Vec<Entry>,
    /// Highest index known committed.
    pub(crate) committed: LogIndex,
    /// Highest index handed to the application for applying.
    pub(crate) applied: LogIndex,
    /// Highest index known durable on this node.
    pub(crate) persisted: LogIndex,
    /// Lowest index not yet handed out for persisting.
    pub(crate) unpersisted_from: LogIndex,
}

impl RaftLog {
    /// A log restored from storage: everything given is already durable.
    pub(crate) fn restore(snapshot: SnapshotMeta, entries: Vec<Entry>, commit: LogIndex) -> Self {
        let base = snapshot.index;
        let mut log = Self {
            snapshot,
            entries: Vec::new(),
            committed: base,
            applied: base,
            persisted: base,
            unpersisted_from: base + 1,
        };
        for entry in entries.into_iter().filter(|e| e.index > base) {
            assert_eq!(entry.index, log.last_index() + 1, "storage returned a gap");
            log.entries.push(entry);
        }
        log.persisted = log.last_index();
        log.unpersisted_from = log.last_index() + 1;
        log.committed = commit.clamp(base, log.last_index());
        log
    }

    pub(crate) fn first_index(&self) -> LogIndex {
        self.snapshot.index + 1
    }

    pub(crate) fn last_index(&self) -> LogIndex {
        self.snapshot.index + self.entries.len() as u64
    }

    pub(crate) fn last_term(&self) -> Term {
        self.entries.last().map_or(self.snapshot.term, |e| e.term)
    }

    /// Term of the entry at `index`, if the log still knows it (the snapshot's own index
    /// counts; anything before it is compacted away).
    pub(crate) fn term(&self, index: LogIndex) -> Option<Term> {
        if index == self.snapshot.index {
            return Some(self.snapshot.term);
        }
        self.entry(index).map(|e| e.term)
    }

    pub(crate) fn entry(&self, index: LogIndex) -> Option<&Entry> {
        if index <= self.snapshot.index {
            return None;
        }
        self.entries.get((index - self.snapshot.index - 1) as usize)
    }

    /// Whether the log holds an entry at `index` with `term`.
    pub(crate) fn matches(&self, index: LogIndex, term: Term) -> bool {
        self.term(index) == Some(term)
    }

    /// Raft 5.4.1: is a log ending at (`index`, `term`) at least as up-to-date as ours?
    pub(crate) fn is_up_to_date(&self, index: LogIndex, term: Term) -> bool {
        term > self.last_term() || (term == self.last_term() && index >= self.last_index())
    }

    /// Append one entry at the end.
    pub(crate) fn push(&mut self, entry: Entry) {
        assert_eq!(
            entry.index,
            self.last_index() + 1,
            "log append must be contiguous"
        );
        self.entries.push(entry);
    }

    /// Remove every entry from `index` on. Committed entries are never removed.
    pub(crate) fn truncate_from(&mut self, index: LogIndex) {
        assert!(
            index > self.committed,
            "truncating committed entry {index} (commit {})",
            self.committed
        );
        let keep = (index - self.snapshot.index - 1) as usize;
        self.entries.truncate(keep);
        self.persisted = self.persisted.min(index - 1);
        self.unpersisted_from = self.unpersisted_from.min(index);
    }

    /// Entries in `[from, to]`, at most `max_entries` of them and no more than `max_bytes`
    /// (but always at least one if the range is non-empty).
    pub(crate) fn slice(
        &self,
        from: LogIndex,
        to: LogIndex,
        max_entries: usize,
        max_bytes: usize,
    ) -> Vec<Entry> {
        let mut out = Vec::new();
        let mut bytes = 0;
        let mut index = from;
        while index <= to && out.len() < max_entries {
            let Some(entry) = self.entry(index) else {
                break;
            };
            bytes += entry.size_bytes();
            if !out.is_empty() && bytes > max_bytes {
                break;
            }
            out.push(entry.clone());
            index += 1;
        }
        out
    }

    /// The first index of the run of entries with the same term as `index` (used for
    /// fast backtracking), never lower than `floor`.
    pub(crate) fn first_index_of_term_at(&self, index: LogIndex, floor: LogIndex) -> LogIndex {
        let Some(term) = self.term(index) else {
            return index;
        };
        let mut first = index;
        while first > floor && first > self.first_index() && self.term(first - 1) == Some(term) {
            first -= 1;
        }
        first
    }

    /// The last index holding an entry of `term`, if any.
    pub(crate) fn last_index_of_term(&self, term: Term) -> Option<LogIndex> {
        self.entries
            .iter()
            .rev()
            .find(|e| e.term == term)
            .map(|e| e.index)
            .or((self.snapshot.term == term).then_some(self.snapshot.index))
    }

    /// Drop every entry up to and including `meta.index`, which must be applied.
    pub(crate) fn compact(&mut self, meta: SnapshotMeta) {
        assert!(meta.index <= self.applied, "compacting unapplied entries");
        assert!(
            meta.index >= self.snapshot.index,
            "compaction moved backwards"
        );
        let drop = (meta.index - self.snapshot.index) as usize;
        self.entries.drain(..drop.min(self.entries.len()));
        self.snapshot = meta;
    }

    /// Replace the whole log with a snapshot received from the leader.
    pub(crate) fn install(&mut self, meta: SnapshotMeta) {
        assert!(
            meta.index > self.committed,
            "installing a snapshot behind commit"
        );
        self.entries.clear();
        self.committed = meta.index;
        self.applied = meta.index;
        self.persisted = self.persisted.min(meta.index);
        self.unpersisted_from = meta.index + 1;
        self.snapshot = meta;
    }

    /// Entries not yet handed out for persisting; marks them handed out.
    pub(crate) fn take_unpersisted(&mut self) -> Vec<Entry> {
        let from = self.unpersisted_from.max(self.first_index());
        let out = self.slice(from, self.last_index(), usize::MAX, usize::MAX);
        self.unpersisted_from = self.last_index() + 1;
        out
    }

    /// Committed entries not yet handed out for applying; marks them handed out.
    pub(crate) fn take_committed(&mut self, max_bytes: usize) -> Vec<Entry> {
        let to = self.committed.min(self.persisted.max(self.applied));
        let out = self.slice(self.applied + 1, to, usize::MAX, max_bytes);
        if let Some(last) = out.last() {
            self.applied = last.index;
        }
        out
    }

    pub(crate) fn has_committed_to_apply(&self) -> bool {
        self.committed.min(self.persisted) > self.applied
    }
}
