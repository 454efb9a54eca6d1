//! Group commit for concurrent proposers: one writer thread owns the log; every proposal
//! that arrives while an fsync is under way joins the next frame, so N waiting proposers
//! share one fdatasync.
//!
//! This is the storage half of the node's write path, measured on its own by
//! `syncmesh bench log`. (The Raft driver gets the same effect from `Ready`: every entry
//! proposed while the previous Ready was being persisted goes out in the next one.)

use super::{FileLog, LogStore};
use mesh_core::raft::{Entry, EntryPayload, HardState, LogIndex, Term};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;

/// Proposals waiting for the writer at most; beyond it `append` blocks (backpressure).
const QUEUE_DEPTH: usize = 4096;
/// Proposals in one frame at most.
const MAX_BATCH: usize = 4096;

/// Why an append did not become durable.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GroupCommitError {
    /// The writer failed (the store is poisoned) or has stopped.
    #[error("log writer failed: {0}")]
    Writer(String),
}

struct Job {
    payload: Vec<u8>,
    reply: SyncSender<Result<LogIndex, GroupCommitError>>,
}

/// Counters of the writer.
#[derive(Debug, Default)]
pub struct GroupStats {
    /// fdatasync calls (one per frame).
    pub fsyncs: AtomicU64,
    /// Entries made durable.
    pub entries: AtomicU64,
}

/// A handle for appending entries through the group-commit writer. Clone it per proposer.
#[derive(Clone)]
pub struct GroupCommitLog {
    tx: SyncSender<Job>,
    stats: Arc<GroupStats>,
}

impl GroupCommitLog {
    /// Start the writer thread over `log`, appending after `last_index` in `term`. The
    /// thread ends when every handle is dropped.
    pub fn start(log: FileLog, term: Term, last_index: LogIndex) -> Result<Self, GroupCommitError> {
        let (tx, rx) = sync_channel(QUEUE_DEPTH);
        let stats = Arc::new(GroupStats::default());
        let worker_stats = Arc::clone(&stats);
        std::thread::Builder::new()
            .name("wal-writer".into())
            .spawn(move || writer(log, rx, term, last_index, &worker_stats))
            .map_err(|e| GroupCommitError::Writer(format!("cannot start writer thread: {e}")))?;
        Ok(Self { tx, stats })
    }

    /// Append one entry and wait until it is durable. Returns its index.
    pub fn append(&self, payload: Vec<u8>) -> Result<LogIndex, GroupCommitError> {
        let stopped = || GroupCommitError::Writer("writer stopped".into());
        let (reply, done) = sync_channel(1);
        let mut job = Job { payload, reply };
        loop {
            match self.tx.try_send(job) {
                Ok(()) => break,
                Err(TrySendError::Full(j)) => {
                    job = j;
                    std::thread::yield_now();
                }
                Err(TrySendError::Disconnected(_)) => return Err(stopped()),
            }
        }
        done.recv().map_err(|_| stopped())?
    }

    /// The writer's counters.
    pub fn stats(&self) -> &GroupStats {
        &self.stats
    }
}

fn writer(mut log: FileLog, rx: Receiver<Job>, term: Term, mut last: LogIndex, stats: &GroupStats) {
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        while jobs.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        let entries: Vec<Entry> = jobs
            .iter_mut()
            .enumerate()
            .map(|(i, job)| Entry {
                term,
                index: last + 1 + i as u64,
                payload: EntryPayload::Command(std::mem::take(&mut job.payload)),
            })
            .collect();
        let hs = HardState {
            term,
            vote: None,
            commit: last,
        };
        let result = log
            .persist(None, &entries, Some(hs))
            .map_err(|e| GroupCommitError::Writer(e.to_string()));
        if result.is_ok() {
            stats.fsyncs.fetch_add(1, Ordering::Relaxed);
            stats
                .entries
                .fetch_add(entries.len() as u64, Ordering::Relaxed);
        }
        for (job, entry) in jobs.into_iter().zip(&entries) {
            // A proposer that gave up waiting is not an error for the others.
            let _ = job.reply.send(result.clone().map(|()| entry.index));
        }
        if result.is_err() {
            return;
        }
        last += entries.len() as u64;
    }
}
