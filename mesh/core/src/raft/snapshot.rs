//! Snapshots: log compaction and InstallSnapshot in chunks (Raft section 7).
//!
//! The application captures its state at an applied index and hands it to
//! [`Raft::compact`]; the log before it is dropped. A follower that needs compacted
//! entries receives the snapshot in `snapshot_chunk_bytes` pieces, one outstanding at a
//! time, resumable from the offset the follower reports. Its log is replaced only when the
//! last chunk arrives, and only if the snapshot is ahead of its commit index.

use super::progress::{ProgressState, SNAPSHOT_WINDOW_CHUNKS};
use super::{CompactError, LogIndex, MessageBody, NodeId, Raft, Role, Snapshot, SnapshotMeta};

impl Raft {
    /// Compact the log up to `index` (which must be applied), keeping `data` as the
    /// snapshot to send to lagging followers. The caller persists the snapshot itself
    /// before calling this.
    pub fn compact(&mut self, index: LogIndex, data: Vec<u8>) -> Result<(), CompactError> {
        if index > self.log.applied {
            return Err(CompactError::NotApplied {
                index,
                applied: self.log.applied,
            });
        }
        if index <= self.log.snapshot.index {
            return Err(CompactError::AlreadyCompacted(self.log.snapshot.index));
        }
        let term = self
            .log
            .term(index)
            .ok_or(CompactError::AlreadyCompacted(self.log.snapshot.index))?;
        let meta = SnapshotMeta {
            index,
            term,
            membership: self.membership_at(index),
        };
        self.log.compact(meta.clone());
        let baseline = (index, meta.membership.clone());
        self.memberships.retain(|(i, _)| *i > index);
        self.memberships.insert(0, baseline);
        self.snapshot = Some(Snapshot {
            meta,
            data: std::sync::Arc::new(data),
        });
        Ok(())
    }

    pub(super) fn start_snapshot_transfer(&mut self, to: NodeId) {
        let Some(index) = self.snapshot.as_ref().map(|s| s.meta.index) else {
            return;
        };
        if let Some(pr) = self.progress.get_mut(&to) {
            pr.become_snapshot(index);
        }
        self.send_snapshot_chunk(to);
    }

    /// Send chunks from the next offset until the window is full or the snapshot is all
    /// out; then wait (paused) for the follower's answers.
    pub(super) fn send_snapshot_chunk(&mut self, to: NodeId) {
        let Some(snapshot) = self.snapshot.clone() else {
            return;
        };
        let chunk = self.cfg.snapshot_chunk_bytes as u64;
        let len = snapshot.data.len() as u64;
        loop {
            let Some(pr) = self.progress.get_mut(&to) else {
                return;
            };
            let ProgressState::Snapshot {
                index,
                offset,
                acked,
            } = &mut pr.state
            else {
                return;
            };
            if *index != snapshot.meta.index {
                // A newer snapshot replaced the one being sent: start over with it.
                *index = snapshot.meta.index;
                *offset = 0;
                *acked = 0;
            }
            let start = (*offset).min(len);
            let window_full = start >= acked.saturating_add(SNAPSHOT_WINDOW_CHUNKS * chunk);
            if window_full || (start == len && len > 0 && *offset > *acked) {
                pr.paused = true;
                return;
            }
            let end = (start + chunk).min(len);
            *offset = end;
            pr.chunk_waits = 0;
            let done = end == len;
            if done {
                pr.paused = true;
            }
            let body = MessageBody::InstallSnapshot {
                meta: snapshot.meta.clone(),
                offset: start,
                data: snapshot.data[start as usize..end as usize].to_vec(),
                done,
            };
            self.send(to, body);
            if done {
                return;
            }
        }
    }

    pub(super) fn handle_install_snapshot(
        &mut self,
        from: NodeId,
        meta: SnapshotMeta,
        offset: u64,
        data: Vec<u8>,
        done: bool,
    ) {
        let index = meta.index;
        if index <= self.log.committed {
            self.incoming = None;
            self.send_snapshot_resp(from, index, 0, true);
            return;
        }
        let expected = match &mut self.incoming {
            Some((m, buf)) if *m == meta && buf.len() as u64 == offset => {
                buf.extend_from_slice(&data);
                true
            }
            _ if offset == 0 => {
                self.incoming = Some((meta.clone(), data));
                true
            }
            _ => false,
        };
        let received = match &self.incoming {
            Some((m, buf)) if *m == meta => buf.len() as u64,
            _ => 0,
        };
        if !expected || !done {
            self.send_snapshot_resp(from, index, received, false);
            return;
        }
        let Some((meta, data)) = self.incoming.take() else {
            return;
        };
        self.install_snapshot(Snapshot {
            meta,
            data: std::sync::Arc::new(data),
        });
        self.send_snapshot_resp(from, index, received, true);
    }

    fn install_snapshot(&mut self, snapshot: Snapshot) {
        let meta = &snapshot.meta;
        if self.log.matches(meta.index, meta.term) {
            // We already hold the entry the snapshot ends at, so our log agrees with it:
            // keep the log and just learn that it is committed.
            self.commit_to(meta.index);
            return;
        }
        self.log.install(meta.clone());
        self.memberships = vec![(meta.index, meta.membership.clone())];
        self.snapshot = Some(snapshot.clone());
        self.to_install = Some(snapshot);
    }

    fn send_snapshot_resp(&mut self, to: NodeId, index: LogIndex, next_offset: u64, done: bool) {
        let body = MessageBody::InstallSnapshotResp {
            index,
            next_offset,
            done,
        };
        self.send(to, body);
    }

    pub(super) fn handle_install_snapshot_resp(
        &mut self,
        from: NodeId,
        index: LogIndex,
        next_offset: u64,
        done: bool,
    ) {
        if self.role != Role::Leader {
            return;
        }
        let Some(pr) = self.progress.get_mut(&from) else {
            return;
        };
        pr.recent_active = true;
        let ProgressState::Snapshot {
            index: sending,
            offset,
            acked,
        } = &mut pr.state
        else {
            return;
        };
        if *sending != index {
            return;
        }
        if done {
            pr.update_match(index);
            pr.become_probe();
            self.maybe_commit();
            self.send_append(from, true);
            return;
        }
        if next_offset == *acked {
            // An answer to a copy, or to a chunk that came out of order: what it names
            // is already on its way (or will be sent again once patience runs out).
            return;
        }
        if next_offset < *acked {
            // The follower lost what it had (it restarted): from there again.
            *offset = next_offset;
        }
        *acked = next_offset;
        *offset = (*offset).max(next_offset);
        pr.paused = false;
        self.send_snapshot_chunk(from);
    }
}
