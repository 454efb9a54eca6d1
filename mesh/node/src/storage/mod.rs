//! Durable storage for one node: the write-ahead log, hard state and snapshots.
//!
//! ```text
//!  data dir/
//!    wal-0000000000000001.log   segment: header, then frames [len u32][crc32c u32][postcard]
//!    wal-0000000000000002.log   a new segment starts with the current hard state
//!    snap-00000000000000004096.snap   latest snapshot: written to .tmp, fsynced, renamed
//! ```
//!
//! # Durability contract
//!
//! [`LogStore::persist`] returns only once everything it was given is on disk
//! (`fdatasync`), so the caller may then send the messages of the same Raft `Ready`:
//! votes and append acknowledgements never precede the state they promise. One call
//! writes one frame and issues one fsync however many entries it carries (group commit).
//! Files are created, renamed and deleted with an fsync of the directory.
//!
//! # Recovery
//!
//! On open, frames are read back in order. A frame that fails its length or CRC check at
//! the very end of the newest segment is a torn write from a crash: it is cut off and
//! reported. A bad frame anywhere else, or one followed by a valid frame, is corruption:
//! opening fails with [`StorageError::Corrupt`] rather than silently dropping data that
//! was acknowledged.

mod codec;
pub mod group;
mod mem;
mod wal;

#[cfg(test)]
mod tests;

pub use codec::{decode_frame, encode_frame, FrameError, MAX_FRAME_BYTES};
pub use mem::MemLog;
pub use wal::{FileLog, SnapshotFiles, WalOptions};

use mesh_core::raft::{Entry, HardState, InitialState, Membership, Snapshot, SnapshotMeta};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// One record inside a WAL frame. Variants are only ever appended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WalRecord {
    /// Term, vote and commit.
    HardState(HardState),
    /// The log restarts after this snapshot (installed from the leader).
    Reset(SnapshotMeta),
    /// Contiguous entries; the first may overwrite the stored log from its index on.
    Entries(Vec<Entry>),
}

/// What storage held when it was opened.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Recovered {
    /// Latest hard state.
    pub hard_state: HardState,
    /// Latest snapshot.
    pub snapshot: Option<Snapshot>,
    /// Entries after the snapshot, contiguous.
    pub entries: Vec<Entry>,
    /// What recovery found and did.
    pub report: RecoveryReport,
}

impl Recovered {
    /// The Raft core's starting state; `bootstrap` is the founding membership (ignored
    /// once the log or a snapshot carries one).
    pub fn into_initial_state(self, bootstrap: Membership) -> InitialState {
        InitialState {
            hard_state: self.hard_state,
            snapshot: self.snapshot,
            entries: self.entries,
            membership: bootstrap,
        }
    }
}

/// Facts about a recovery, for the log line a node prints at start.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Segments read.
    pub segments: usize,
    /// Frames read.
    pub frames: usize,
    /// A torn tail that was cut off: (segment file, offset, bytes dropped).
    pub torn_tail: Option<(PathBuf, u64, u64)>,
}

/// Storage failures. Any of them while writing is fatal for the node: after a failed
/// fsync the kernel may have dropped the dirty pages, so retrying proves nothing.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// An operating-system error, with what was being done.
    #[error("{context}: {source}")]
    Io {
        /// What failed.
        context: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// Data on disk fails its checks somewhere a crash cannot explain.
    #[error("corrupt storage in {path}: {detail}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong and where.
        detail: String,
    },
    /// A batch too large for one frame.
    #[error("write of {0} bytes exceeds the frame limit")]
    TooLarge(usize),
    /// An earlier write failed; the store refuses further writes.
    #[error("storage failed earlier and is read-only until restart")]
    Poisoned,
}

impl StorageError {
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let context = context.into();
        move |source| Self::Io { context, source }
    }
}

/// Durable storage of a Raft log, with two implementations (`FileLog`, `MemLog`) held to
/// one conformance suite.
pub trait LogStore {
    /// Durably store what a Ready asks for, in this order: an installed snapshot (the log
    /// restarts after it), then `entries` (overwriting from the first one's index), then
    /// `hard_state`. Returns once all of it is synced.
    fn persist(
        &mut self,
        snapshot: Option<&Snapshot>,
        entries: &[Entry],
        hard_state: Option<HardState>,
    ) -> Result<(), StorageError>;

    /// Keep an application snapshot and drop the log it covers (which must be stored).
    fn compact(&mut self, snapshot: &Snapshot) -> Result<(), StorageError>;
}
