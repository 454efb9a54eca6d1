//! `FileLog`: the segmented write-ahead log on a real file system.
//!
//! Every [`LogStore::persist`] writes one frame to the active segment and `fdatasync`s it
//! before returning, so at most one frame (the last) can ever be torn by a crash: a bad
//! frame followed by any valid frame can only be corruption. Segments roll at
//! `segment_bytes`; each new one starts with the current hard state, so deleting old
//! segments after a snapshot never loses the vote.

use super::codec::{check_frame, decode_frame, encode_frame, FrameError};
use super::{LogStore, Recovered, RecoveryReport, StorageError, WalRecord};
use mesh_core::raft::{Entry, HardState, LogIndex, Snapshot};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

const SEGMENT_MAGIC: [u8; 8] = *b"SMWAL\0v1";
const SEGMENT_HEADER_BYTES: usize = 16;
const SNAPSHOT_MAGIC: [u8; 8] = *b"SMSNAPv1";

/// Tunables of the file log.
#[derive(Clone, Debug)]
pub struct WalOptions {
    /// Roll to a new segment once the active one exceeds this size.
    pub segment_bytes: u64,
}

impl Default for WalOptions {
    fn default() -> Self {
        Self {
            segment_bytes: 64 << 20,
        }
    }
}

#[derive(Debug)]
struct Segment {
    seq: u64,
    path: PathBuf,
    /// Highest entry index written into this segment (0: none).
    max_index: LogIndex,
}

/// The write-ahead log of one node. See the module docs of [`super`] for the format.
#[derive(Debug)]
pub struct FileLog {
    dir: PathBuf,
    opts: WalOptions,
    active: File,
    active_len: u64,
    segments: Vec<Segment>,
    hard_state: HardState,
    poisoned: bool,
    fsyncs: u64,
}

fn sync_dir(dir: &Path) -> Result<(), StorageError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(StorageError::io(format!(
            "fsync directory {}",
            dir.display()
        )))
}

fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("wal-{seq:016}.log"))
}

fn snapshot_path(dir: &Path, index: LogIndex) -> PathBuf {
    dir.join(format!("snap-{index:020}.snap"))
}

/// Parse `prefix<digits>suffix` file names.
fn numbered(name: &str, prefix: &str, suffix: &str) -> Option<u64> {
    name.strip_prefix(prefix)?
        .strip_suffix(suffix)?
        .parse()
        .ok()
}

fn corrupt(path: &Path, detail: impl Into<String>) -> StorageError {
    StorageError::Corrupt {
        path: path.to_path_buf(),
        detail: detail.into(),
    }
}

impl FileLog {
    /// Open (or create) the log in `dir`, recovering what it holds.
    pub fn open(dir: &Path, opts: WalOptions) -> Result<(Self, Recovered), StorageError> {
        let created = !dir.exists();
        fs::create_dir_all(dir).map_err(StorageError::io(format!("create {}", dir.display())))?;
        if created {
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                sync_dir(parent)?;
            }
        }
        let (mut seqs, snaps) = Self::scan_dir(dir, true)?;
        seqs.sort_unstable();
        let snapshot = match snaps.iter().max() {
            Some(&index) => Some(read_snapshot(&snapshot_path(dir, index))?),
            None => None,
        };
        let mut replay = Replay::default();
        let mut segments = Vec::new();
        let mut report = RecoveryReport::default();
        for (i, &seq) in seqs.iter().enumerate() {
            let path = segment_path(dir, seq);
            let is_last = i + 1 == seqs.len();
            let max_index = replay.read_segment(&path, seq, is_last, &mut report)?;
            segments.push(Segment {
                seq,
                path,
                max_index,
            });
        }
        report.segments = segments.len();
        let entries = replay.reconcile(snapshot.as_ref(), dir)?;
        let hard_state = replay.hard_state;
        let mut log = Self::open_active(dir, opts, segments, hard_state)?;
        // Older snapshots than the one loaded are garbage from a crash mid-cleanup.
        log.remove_snapshots_before(snapshot.as_ref().map_or(0, |s| s.meta.index))?;
        if let Some((path, offset, dropped)) = &report.torn_tail {
            tracing::warn!(
                segment = %path.display(),
                offset,
                dropped_bytes = dropped,
                "write-ahead log ended in a torn write (a crash mid-write); cut it off"
            );
        }
        let recovered = Recovered {
            hard_state,
            snapshot,
            entries,
            report,
        };
        Ok((log, recovered))
    }

    /// Segments and snapshots in `dir`. At open (`sweep`), leftovers of snapshot writes
    /// that never finished are removed; later, a `.tmp` may be one the snapshot writer
    /// is writing right now, and is left alone.
    fn scan_dir(dir: &Path, sweep: bool) -> Result<(Vec<u64>, Vec<u64>), StorageError> {
        let mut segments = Vec::new();
        let mut snapshots = Vec::new();
        let listing =
            fs::read_dir(dir).map_err(StorageError::io(format!("list {}", dir.display())))?;
        for item in listing {
            let item = item.map_err(StorageError::io(format!("list {}", dir.display())))?;
            let name = item.file_name().to_string_lossy().into_owned();
            if name.ends_with(".tmp") {
                if sweep {
                    // A snapshot that never finished: it was never renamed into place.
                    let _ = fs::remove_file(item.path());
                }
            } else if let Some(seq) = numbered(&name, "wal-", ".log") {
                segments.push(seq);
            } else if let Some(index) = numbered(&name, "snap-", ".snap") {
                snapshots.push(index);
            }
        }
        Ok((segments, snapshots))
    }

    fn open_active(
        dir: &Path,
        opts: WalOptions,
        mut segments: Vec<Segment>,
        hard_state: HardState,
    ) -> Result<Self, StorageError> {
        let (active, active_len) = match segments.last() {
            Some(seg) => {
                let file = OpenOptions::new()
                    .append(true)
                    .open(&seg.path)
                    .map_err(StorageError::io(format!("open {}", seg.path.display())))?;
                let len = file
                    .metadata()
                    .map_err(StorageError::io(format!("stat {}", seg.path.display())))?
                    .len();
                (file, len)
            }
            None => {
                let (file, seg) = create_segment(dir, 1)?;
                segments.push(seg);
                (file, SEGMENT_HEADER_BYTES as u64)
            }
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            opts,
            active,
            active_len,
            segments,
            hard_state,
            poisoned: false,
            fsyncs: 0,
        })
    }

    /// Number of fdatasync calls on segments since open.
    pub fn fsyncs(&self) -> u64 {
        self.fsyncs
    }

    /// Segment files currently kept.
    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    fn roll(&mut self) -> Result<(), StorageError> {
        let seq = self.segments.last().map_or(1, |s| s.seq + 1);
        let (file, seg) = create_segment(&self.dir, seq)?;
        self.active = file;
        self.active_len = SEGMENT_HEADER_BYTES as u64;
        self.segments.push(seg);
        // Every segment opens with the hard state, so purging older ones never loses it.
        let hs = self.hard_state;
        self.write_frame(&[WalRecord::HardState(hs)], 0)
    }

    fn write_frame(
        &mut self,
        records: &[WalRecord],
        max_index: LogIndex,
    ) -> Result<(), StorageError> {
        if self.poisoned {
            return Err(StorageError::Poisoned);
        }
        let frame = encode_frame(records).map_err(|e| match e {
            FrameError::BadLength(n) => StorageError::TooLarge(n),
            other => corrupt(&self.dir, other.to_string()),
        })?;
        // Until the write and the fsync both succeed the store is unusable: after a
        // failed fsync the page cache may no longer hold what we wrote.
        self.poisoned = true;
        let path = || {
            self.segments
                .last()
                .map_or_else(PathBuf::new, |s| s.path.clone())
        };
        self.active
            .write_all(&frame)
            .map_err(StorageError::io(format!("write {}", path().display())))?;
        self.active
            .sync_data()
            .map_err(StorageError::io(format!("fdatasync {}", path().display())))?;
        self.poisoned = false;
        self.fsyncs += 1;
        self.active_len += frame.len() as u64;
        if let Some(seg) = self.segments.last_mut() {
            seg.max_index = seg.max_index.max(max_index);
        }
        Ok(())
    }

    fn write_snapshot_file(&mut self, snapshot: &Snapshot) -> Result<(), StorageError> {
        write_snapshot_file(&self.dir, snapshot)
    }

    /// Where this log's snapshot files go, for writing them from another thread.
    pub fn snapshot_files(&self) -> SnapshotFiles {
        SnapshotFiles {
            dir: self.dir.clone(),
        }
    }

    /// Drop the segments and older snapshots that the snapshot at `index` (already
    /// durable, written by [`SnapshotFiles::write`]) covers.
    pub fn purge_covered(&mut self, index: LogIndex) -> Result<(), StorageError> {
        self.purge(index)
    }

    fn remove_snapshots_before(&mut self, index: LogIndex) -> Result<(), StorageError> {
        let (_, snaps) = Self::scan_dir(&self.dir, false)?;
        let mut removed = false;
        for old in snaps.into_iter().filter(|&i| i < index) {
            let path = snapshot_path(&self.dir, old);
            fs::remove_file(&path)
                .map_err(StorageError::io(format!("remove {}", path.display())))?;
            removed = true;
        }
        if removed {
            sync_dir(&self.dir)?;
        }
        Ok(())
    }

    /// Delete leading segments whose entries the snapshot at `index` covers.
    fn purge(&mut self, index: LogIndex) -> Result<(), StorageError> {
        self.remove_snapshots_before(index)?;
        let mut removed = false;
        while self.segments.len() > 1 && self.segments[0].max_index <= index {
            let seg = self.segments.remove(0);
            fs::remove_file(&seg.path)
                .map_err(StorageError::io(format!("remove {}", seg.path.display())))?;
            removed = true;
        }
        if removed {
            sync_dir(&self.dir)?;
        }
        Ok(())
    }
}

#[cfg(test)]
impl FileLog {
    pub(super) fn write_snapshot_file_for_test(&mut self, snapshot: &Snapshot) {
        self.write_snapshot_file(snapshot)
            .expect("write snapshot file");
    }
}

impl LogStore for FileLog {
    fn persist(
        &mut self,
        snapshot: Option<&Snapshot>,
        entries: &[Entry],
        hard_state: Option<HardState>,
    ) -> Result<(), StorageError> {
        if let Some(s) = snapshot {
            self.write_snapshot_file(s)?;
        }
        let mut records = Vec::with_capacity(3);
        if let Some(s) = snapshot {
            records.push(WalRecord::Reset(s.meta.clone()));
        }
        if !entries.is_empty() {
            records.push(WalRecord::Entries(entries.to_vec()));
        }
        if let Some(hs) = hard_state {
            records.push(WalRecord::HardState(hs));
        }
        if records.is_empty() {
            return Ok(());
        }
        if self.active_len > self.opts.segment_bytes {
            self.roll()?;
        }
        let max_index = entries.last().map_or(0, |e| e.index);
        self.write_frame(&records, max_index)?;
        if let Some(hs) = hard_state {
            self.hard_state = hs;
        }
        if let Some(s) = snapshot {
            self.purge(s.meta.index)?;
        }
        Ok(())
    }

    fn compact(&mut self, snapshot: &Snapshot) -> Result<(), StorageError> {
        self.write_snapshot_file(snapshot)?;
        self.purge(snapshot.meta.index)
    }
}

/// Snapshot files of one log, written off the storage thread: a snapshot of a big state
/// takes a second or more to write and fsync, and log persists must not wait behind it.
#[derive(Clone, Debug)]
pub struct SnapshotFiles {
    dir: PathBuf,
}

impl SnapshotFiles {
    /// Write `snapshot` durably (temporary file, fsync, rename, directory fsync).
    pub fn write(&self, snapshot: &Snapshot) -> Result<(), StorageError> {
        write_snapshot_file(&self.dir, snapshot)
    }
}

fn write_snapshot_file(dir: &Path, snapshot: &Snapshot) -> Result<(), StorageError> {
    let path = snapshot_path(dir, snapshot.meta.index);
    let tmp = path.with_extension("snap.tmp");
    let payload = postcard::to_stdvec(snapshot)
        .map_err(|e| corrupt(&path, format!("encode snapshot: {e}")))?;
    let len = u32::try_from(payload.len()).map_err(|_| StorageError::TooLarge(payload.len()))?;
    let mut header = Vec::with_capacity(16);
    header.extend_from_slice(&SNAPSHOT_MAGIC);
    header.extend_from_slice(&len.to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&len.to_le_bytes()), &payload);
    header.extend_from_slice(&crc.to_le_bytes());
    let mut file =
        File::create(&tmp).map_err(StorageError::io(format!("create {}", tmp.display())))?;
    file.write_all(&header)
        .and_then(|()| file.write_all(&payload))
        .and_then(|()| file.sync_all())
        .map_err(StorageError::io(format!("write {}", tmp.display())))?;
    fs::rename(&tmp, &path).map_err(StorageError::io(format!("rename {}", tmp.display())))?;
    sync_dir(dir)
}

fn create_segment(dir: &Path, seq: u64) -> Result<(File, Segment), StorageError> {
    let path = segment_path(dir, seq);
    let mut file = OpenOptions::new()
        .create_new(true)
        .append(true)
        .open(&path)
        .map_err(StorageError::io(format!("create {}", path.display())))?;
    let mut header = [0u8; SEGMENT_HEADER_BYTES];
    header[..8].copy_from_slice(&SEGMENT_MAGIC);
    header[8..].copy_from_slice(&seq.to_le_bytes());
    file.write_all(&header)
        .and_then(|()| file.sync_all())
        .map_err(StorageError::io(format!("write {}", path.display())))?;
    sync_dir(dir)?;
    Ok((
        file,
        Segment {
            seq,
            path,
            max_index: 0,
        },
    ))
}

fn read_snapshot(path: &Path) -> Result<Snapshot, StorageError> {
    let bytes = fs::read(path).map_err(StorageError::io(format!("read {}", path.display())))?;
    if bytes.len() < 16 || bytes[..8] != SNAPSHOT_MAGIC {
        return Err(corrupt(
            path,
            "not a syncmesh snapshot (bad magic or short file)",
        ));
    }
    let len_bytes = [bytes[8], bytes[9], bytes[10], bytes[11]];
    let len = u32::from_le_bytes(len_bytes) as usize;
    let crc = u32::from_le_bytes([bytes[12], bytes[13], bytes[14], bytes[15]]);
    let payload = &bytes[16..];
    if payload.len() != len || crc != crc32c::crc32c_append(crc32c::crc32c(&len_bytes), payload) {
        return Err(corrupt(path, "snapshot fails its length or checksum"));
    }
    let (snapshot, rest) = postcard::take_from_bytes::<Snapshot>(payload)
        .map_err(|e| corrupt(path, format!("snapshot does not decode: {e}")))?;
    if !rest.is_empty() {
        return Err(corrupt(path, "trailing bytes after snapshot"));
    }
    Ok(snapshot)
}

/// Rebuilds the log from frames in write order.
#[derive(Default)]
struct Replay {
    hard_state: HardState,
    /// Index the entries follow; unknown until the first entry or reset.
    base: Option<LogIndex>,
    entries: Vec<Entry>,
}

impl Replay {
    /// Read one segment; returns the highest entry index it holds.
    fn read_segment(
        &mut self,
        path: &Path,
        seq: u64,
        is_last: bool,
        report: &mut RecoveryReport,
    ) -> Result<LogIndex, StorageError> {
        let data = fs::read(path).map_err(StorageError::io(format!("read {}", path.display())))?;
        if data.len() < SEGMENT_HEADER_BYTES {
            if !is_last {
                return Err(corrupt(path, "segment shorter than its header"));
            }
            // Crashed while creating the newest segment: give it its header again.
            rewrite_header(path, seq)?;
            report.torn_tail = Some((path.to_path_buf(), 0, data.len() as u64));
            return Ok(0);
        }
        if data[..8] != SEGMENT_MAGIC || data[8..16] != seq.to_le_bytes() {
            return Err(corrupt(path, "bad segment header"));
        }
        let mut offset = SEGMENT_HEADER_BYTES;
        let mut max_index = 0;
        while offset < data.len() {
            match check_frame(&data[offset..]) {
                Ok(_) => {
                    let (records, total) = decode_frame(&data[offset..])
                        .map_err(|e| corrupt(path, format!("frame at offset {offset}: {e}")))?;
                    for record in records {
                        max_index = max_index.max(self.apply(record, path)?);
                    }
                    report.frames += 1;
                    offset += total;
                }
                Err(e) => {
                    self.handle_bad_frame(path, &data, offset, is_last, e, report)?;
                    break;
                }
            }
        }
        Ok(max_index)
    }

    fn handle_bad_frame(
        &self,
        path: &Path,
        data: &[u8],
        offset: usize,
        is_last: bool,
        error: FrameError,
        report: &mut RecoveryReport,
    ) -> Result<(), StorageError> {
        let where_ = format!("frame at offset {offset} of {}: {error}", data.len());
        if !is_last {
            return Err(corrupt(path, format!("{where_}, in a sealed segment")));
        }
        // Each frame was fsynced before the next was written, so a valid frame after a
        // bad one proves the bad one had been durable: that is damage, not a torn write.
        if let Some(next) = (offset + 1..data.len()).find(|&p| check_frame(&data[p..]).is_ok()) {
            return Err(corrupt(
                path,
                format!("{where_}, followed by a valid frame at offset {next}: refusing to drop acknowledged data"),
            ));
        }
        let file = OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(StorageError::io(format!("open {}", path.display())))?;
        file.set_len(offset as u64)
            .and_then(|()| file.sync_all())
            .map_err(StorageError::io(format!("truncate {}", path.display())))?;
        report.torn_tail = Some((
            path.to_path_buf(),
            offset as u64,
            (data.len() - offset) as u64,
        ));
        Ok(())
    }

    /// Apply one record; returns the highest entry index it carried.
    fn apply(&mut self, record: WalRecord, path: &Path) -> Result<LogIndex, StorageError> {
        match record {
            WalRecord::HardState(hs) => self.hard_state = hs,
            WalRecord::Reset(meta) => {
                self.base = Some(meta.index);
                self.entries.clear();
            }
            WalRecord::Entries(entries) => {
                let mut max = 0;
                for e in entries {
                    if e.index == 0 {
                        return Err(corrupt(path, "entry with index 0"));
                    }
                    max = e.index;
                    let base = *self.base.get_or_insert(e.index - 1);
                    if e.index <= base {
                        continue;
                    }
                    let pos = (e.index - base - 1) as usize;
                    if pos > self.entries.len() {
                        return Err(corrupt(
                            path,
                            format!(
                                "gap in the log: entry {} after {}",
                                e.index,
                                base + self.entries.len() as u64
                            ),
                        ));
                    }
                    self.entries.truncate(pos);
                    self.entries.push(e);
                }
                return Ok(max);
            }
        }
        Ok(0)
    }

    /// Fit the replayed log to the newest snapshot: keep only entries after it, and only
    /// if they continue it (a crash between writing an installed snapshot and its reset
    /// record leaves the old, conflicting log behind).
    fn reconcile(
        &mut self,
        snapshot: Option<&Snapshot>,
        dir: &Path,
    ) -> Result<Vec<Entry>, StorageError> {
        let (s_index, s_term) = snapshot.map_or((0, 0), |s| (s.meta.index, s.meta.term));
        let base = self.base.unwrap_or(s_index);
        if base > s_index {
            return Err(corrupt(
                dir,
                format!(
                    "log starts after index {base} but the newest snapshot covers only {s_index}"
                ),
            ));
        }
        let entries = std::mem::take(&mut self.entries);
        if base == s_index {
            return Ok(entries);
        }
        let at = |i: LogIndex| entries.get((i - base - 1) as usize);
        match at(s_index) {
            Some(e) if e.term == s_term => {
                Ok(entries.into_iter().filter(|e| e.index > s_index).collect())
            }
            _ => Ok(Vec::new()),
        }
    }
}

fn rewrite_header(path: &Path, seq: u64) -> Result<(), StorageError> {
    let mut header = [0u8; SEGMENT_HEADER_BYTES];
    header[..8].copy_from_slice(&SEGMENT_MAGIC);
    header[8..].copy_from_slice(&seq.to_le_bytes());
    let mut file = OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .map_err(StorageError::io(format!("open {}", path.display())))?;
    file.write_all(&header)
        .and_then(|()| file.sync_all())
        .map_err(StorageError::io(format!(
            "rewrite header of {}",
            path.display()
        )))
}
