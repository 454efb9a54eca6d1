//! Storage tests: one conformance suite run against both `FileLog` and `MemLog`, then
//! the file log's crash and corruption cases.

use super::*;
use mesh_core::raft::{EntryPayload, LogIndex, SnapshotMeta, Term};
use std::path::Path;

fn entry(index: LogIndex, term: Term) -> Entry {
    Entry {
        term,
        index,
        payload: EntryPayload::Command(format!("cmd-{index}-{term}").into_bytes()),
    }
}

fn entries(from: LogIndex, to: LogIndex, term: Term) -> Vec<Entry> {
    (from..=to).map(|i| entry(i, term)).collect()
}

fn snapshot(index: LogIndex, term: Term) -> Snapshot {
    Snapshot {
        meta: SnapshotMeta {
            index,
            term,
            membership: Membership::with_voters([1, 2, 3]),
        },
        data: std::sync::Arc::new(format!("state@{index}").into_bytes()),
    }
}

fn hs(term: Term, vote: Option<u64>, commit: LogIndex) -> HardState {
    HardState { term, vote, commit }
}

/// The behaviour every LogStore must have. `reopen` simulates a restart: it returns a
/// fresh store over the same durable state and what recovery found there.
fn conformance<S: LogStore>(mut reopen: impl FnMut() -> (S, Recovered)) {
    let (mut store, rec) = reopen();
    assert_eq!(rec.hard_state, HardState::default());
    assert!(rec.entries.is_empty() && rec.snapshot.is_none());

    store
        .persist(None, &entries(1, 10, 1), Some(hs(1, Some(2), 3)))
        .expect("append");
    let (mut store, rec) = reopen();
    assert_eq!(rec.entries, entries(1, 10, 1));
    assert_eq!(rec.hard_state, hs(1, Some(2), 3));

    // A new leader overwrites the uncommitted suffix from 6.
    store
        .persist(None, &entries(6, 8, 2), Some(hs(2, None, 5)))
        .expect("overwrite");
    let (mut store, rec) = reopen();
    let mut expect = entries(1, 5, 1);
    expect.extend(entries(6, 8, 2));
    assert_eq!(rec.entries, expect);

    // Application snapshot at 4: the log keeps what follows.
    store.compact(&snapshot(4, 1)).expect("compact");
    let (mut store, rec) = reopen();
    assert_eq!(rec.snapshot, Some(snapshot(4, 1)));
    assert_eq!(rec.entries, expect[4..].to_vec());

    // A snapshot installed from the leader replaces the whole log.
    store
        .persist(
            Some(&snapshot(20, 3)),
            &entries(21, 22, 3),
            Some(hs(3, Some(1), 20)),
        )
        .expect("install");
    let (mut store, rec) = reopen();
    assert_eq!(rec.snapshot, Some(snapshot(20, 3)));
    assert_eq!(rec.entries, entries(21, 22, 3));
    assert_eq!(rec.hard_state, hs(3, Some(1), 20));

    // Hard state alone.
    store
        .persist(None, &[], Some(hs(4, Some(3), 21)))
        .expect("vote");
    let (_, rec) = reopen();
    assert_eq!(rec.hard_state, hs(4, Some(3), 21));
    assert_eq!(rec.entries, entries(21, 22, 3));
}

#[test]
fn mem_log_conforms() {
    let mem = MemLog::new();
    conformance(|| (mem.clone(), mem.recover()));
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("syncmesh-storage-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn open(dir: &Path) -> (FileLog, Recovered) {
    FileLog::open(dir, WalOptions::default()).expect("open file log")
}

#[test]
fn file_log_conforms() {
    let dir = temp_dir("conformance");
    conformance(|| open(&dir));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn file_log_conforms_with_tiny_segments() {
    let dir = temp_dir("conformance-tiny");
    conformance(|| FileLog::open(&dir, WalOptions { segment_bytes: 64 }).expect("open"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn segments_roll_and_snapshots_purge_them_without_losing_the_vote() {
    let dir = temp_dir("purge");
    let opts = WalOptions { segment_bytes: 300 };
    let (mut log, _) = FileLog::open(&dir, opts.clone()).expect("open");
    log.persist(None, &[], Some(hs(7, Some(2), 0)))
        .expect("vote");
    for i in 1..=60 {
        log.persist(None, &[entry(i, 7)], None).expect("append");
    }
    assert!(
        log.segment_count() >= 4,
        "segments rolled: {}",
        log.segment_count()
    );
    let before = log.segment_count();
    log.compact(&snapshot(50, 7)).expect("compact");
    assert!(log.segment_count() < before, "old segments deleted");
    drop(log);
    let (_, rec) = FileLog::open(&dir, opts).expect("reopen");
    assert_eq!(
        rec.hard_state,
        hs(7, Some(2), 0),
        "vote survives segment deletion"
    );
    assert_eq!(rec.snapshot.map(|s| s.meta.index), Some(50));
    assert_eq!(rec.entries, entries(51, 60, 7));
    let _ = std::fs::remove_dir_all(&dir);
}

fn newest_segment(dir: &Path) -> PathBuf {
    let mut segs: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("list")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    segs.sort();
    segs.pop().expect("a segment")
}

/// Write `frames` frames of one entry each; return the segment's bytes and where the
/// last frame starts.
fn write_frames(dir: &Path, frames: u64) -> (Vec<u8>, usize) {
    let (mut log, _) = open(dir);
    for i in 1..frames {
        log.persist(None, &[entry(i, 1)], Some(hs(1, Some(1), i - 1)))
            .expect("append");
    }
    let before = std::fs::metadata(newest_segment(dir)).expect("stat").len() as usize;
    log.persist(None, &[entry(frames, 1)], Some(hs(1, Some(1), frames - 1)))
        .expect("append");
    (std::fs::read(newest_segment(dir)).expect("read"), before)
}

#[test]
fn crash_at_every_byte_of_the_last_record_recovers_the_previous_ones() {
    let dir = temp_dir("torn");
    let (bytes, last_start) = write_frames(&dir, 5);
    let seg = newest_segment(&dir);
    for cut in last_start..bytes.len() {
        std::fs::write(&seg, &bytes[..cut]).expect("truncate");
        let (_, rec) = open(&dir);
        assert_eq!(rec.entries, entries(1, 4, 1), "cut at byte {cut}");
        assert_eq!(rec.hard_state, hs(1, Some(1), 3));
        let torn = cut > last_start;
        assert_eq!(rec.report.torn_tail.is_some(), torn, "cut at byte {cut}");
        // Recovery cut the file back to the last whole frame.
        assert_eq!(
            std::fs::metadata(&seg).expect("stat").len() as usize,
            last_start
        );
    }
    // Appending after a recovered torn tail works and survives another restart.
    let (mut log, _) = open(&dir);
    log.persist(None, &[entry(5, 2)], None)
        .expect("append after recovery");
    let (_, rec) = open(&dir);
    assert_eq!(rec.entries.last(), Some(&entry(5, 2)));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn zeroed_tail_from_preallocation_is_a_torn_write() {
    let dir = temp_dir("zeros");
    let (mut bytes, _) = write_frames(&dir, 3);
    bytes.extend_from_slice(&[0u8; 4096]);
    std::fs::write(newest_segment(&dir), &bytes).expect("write");
    let (_, rec) = open(&dir);
    assert_eq!(rec.entries, entries(1, 3, 1));
    assert!(rec.report.torn_tail.is_some());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn flipped_bit_in_the_middle_refuses_to_start() {
    let dir = temp_dir("bitflip");
    let (bytes, last_start) = write_frames(&dir, 6);
    let seg = newest_segment(&dir);
    // Every bit of the second frame's payload and header, one at a time.
    let second = 16 + check_len(&bytes[16..]);
    for pos in second..second + 24 {
        for bit in 0..8 {
            let mut damaged = bytes.clone();
            damaged[pos] ^= 1 << bit;
            std::fs::write(&seg, &damaged).expect("write");
            match FileLog::open(&dir, WalOptions::default()) {
                Err(StorageError::Corrupt { detail, .. }) => {
                    assert!(detail.contains("refusing"), "clear reason: {detail}")
                }
                Ok((_, rec)) => panic!("bit {bit} of byte {pos} accepted: {:?}", rec.report),
                Err(other) => panic!("unexpected error {other}"),
            }
        }
    }
    assert!(last_start > second + 24);
    let _ = std::fs::remove_dir_all(&dir);
}

fn check_len(buf: &[u8]) -> usize {
    codec::check_frame(buf).expect("valid frame")
}

#[test]
fn damage_in_a_sealed_segment_refuses_to_start() {
    let dir = temp_dir("sealed");
    let opts = WalOptions { segment_bytes: 200 };
    let (mut log, _) = FileLog::open(&dir, opts.clone()).expect("open");
    for i in 1..=20 {
        log.persist(None, &[entry(i, 1)], None).expect("append");
    }
    drop(log);
    let first = dir.join("wal-0000000000000001.log");
    let mut bytes = std::fs::read(&first).expect("read");
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    std::fs::write(&first, &bytes).expect("write");
    let err = FileLog::open(&dir, opts).expect_err("must refuse");
    assert!(err.to_string().contains("sealed segment"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn corrupt_snapshot_refuses_to_start() {
    let dir = temp_dir("badsnap");
    let (mut log, _) = open(&dir);
    log.persist(None, &entries(1, 5, 1), None).expect("append");
    log.compact(&snapshot(3, 1)).expect("compact");
    drop(log);
    let path = dir.join(format!("snap-{:020}.snap", 3));
    let mut bytes = std::fs::read(&path).expect("read");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    std::fs::write(&path, &bytes).expect("write");
    let err = FileLog::open(&dir, WalOptions::default()).expect_err("must refuse");
    assert!(matches!(err, StorageError::Corrupt { .. }), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn crash_between_installed_snapshot_and_its_reset_drops_the_conflicting_log() {
    let dir = temp_dir("install-crash");
    let (mut log, _) = open(&dir);
    log.persist(None, &entries(1, 30, 1), Some(hs(1, None, 5)))
        .expect("append");
    // What persist(Some(snapshot)) does first, before its frame: write the file.
    log.write_snapshot_file_for_test(&snapshot(20, 2));
    drop(log);
    let (_, rec) = open(&dir);
    assert_eq!(rec.snapshot.map(|s| s.meta.index), Some(20));
    assert!(
        rec.entries.is_empty(),
        "entries of term 1 conflict with the snapshot's term 2"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn leftover_temp_files_are_removed() {
    let dir = temp_dir("tmpfiles");
    let (mut log, _) = open(&dir);
    log.persist(None, &entries(1, 2, 1), None).expect("append");
    drop(log);
    std::fs::write(dir.join("snap-00000000000000000009.snap.tmp"), b"half").expect("write");
    let (_, rec) = open(&dir);
    assert_eq!(rec.entries.len(), 2);
    assert!(!dir.join("snap-00000000000000000009.snap.tmp").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

/// The snapshot writer's file in progress is not a leftover: a purge on the storage
/// thread meanwhile leaves it alone (it used to be deleted mid-write, and the node
/// stopped when the rename found nothing).
#[test]
fn a_purge_leaves_a_snapshot_being_written_alone() {
    let dir = temp_dir("tmp-in-progress");
    let (mut log, _) = open(&dir);
    log.persist(None, &entries(1, 6, 1), None).expect("append");
    let files = log.snapshot_files();
    files.write(&snapshot(3, 1)).expect("first snapshot");
    let in_progress = dir.join("snap-00000000000000000005.snap.tmp");
    std::fs::write(&in_progress, b"being written").expect("write");
    log.purge_covered(3).expect("purge");
    assert!(in_progress.exists(), "the writer's file survives a purge");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn frame_codec_round_trips_and_rejects_garbage() {
    let records = vec![
        WalRecord::HardState(hs(1, Some(2), 3)),
        WalRecord::Entries(entries(1, 3, 1)),
    ];
    let frame = encode_frame(&records).expect("encode");
    let (decoded, used) = decode_frame(&frame).expect("decode");
    assert_eq!((decoded, used), (records, frame.len()));
    for cut in 0..frame.len() {
        assert!(
            decode_frame(&frame[..cut]).is_err(),
            "prefix of {cut} bytes"
        );
    }
    let mut seed = 0x1234_5678_u64;
    for len in 0..512 {
        let junk: Vec<u8> = (0..len)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect();
        assert!(decode_frame(&junk).is_err());
    }
    let huge = [0xFF, 0xFF, 0xFF, 0x7F, 0, 0, 0, 0];
    assert_eq!(
        decode_frame(&huge).map(|_| ()),
        Err(FrameError::BadLength(0x7FFF_FFFF))
    );
}

#[test]
fn group_commit_shares_fsyncs_between_concurrent_proposers() {
    let dir = temp_dir("group");
    let (log, _) = open(&dir);
    let group = group::GroupCommitLog::start(log, 1, 0).expect("start writer");
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let g = group.clone();
            std::thread::spawn(move || {
                (0..50)
                    .map(|_| g.append(vec![7; 32]).expect("append"))
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut indexes: Vec<LogIndex> = threads
        .into_iter()
        .flat_map(|t| t.join().expect("thread"))
        .collect();
    indexes.sort_unstable();
    assert_eq!(
        indexes,
        (1..=400).collect::<Vec<_>>(),
        "every append got its own index"
    );
    let stats = group.stats();
    let fsyncs = stats.fsyncs.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(
        stats.entries.load(std::sync::atomic::Ordering::Relaxed),
        400
    );
    assert!(fsyncs <= 400);
    drop(group);
    let (_, rec) = open(&dir);
    assert_eq!(rec.entries.len(), 400);
    let _ = std::fs::remove_dir_all(&dir);
}
