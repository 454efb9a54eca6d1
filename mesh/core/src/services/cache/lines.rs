//! `CacheLines`: one node's cache lines, the local half of the MESI cache.
//!
//! Each node holds, per key, a line: the value, its MESI state, the directory version
//! and ownership epoch it was filled or written under, and its TTL. The table is bounded
//! in entries and in bytes and evicts the least recently used line first. It is pure: the
//! node's monotonic milliseconds come in with every call, and what must happen because
//! of a call (an M line evicted must be written back first) comes out as a value for the
//! caller to act on. Nothing here is replicated: a node that restarts starts empty,
//! every line I, which is what MESI needs from a node that forgot what it held.
//!
//! Coherence (who may hold what) is the directory's business; this table only keeps
//! what one node was granted, serves hits from memory, and refuses a local write on a
//! line it does not own.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// A line's MESI state. A key with no line is Invalid.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Mesi {
    /// Owned and changed since it was last written back.
    Modified,
    /// Owned, equal to the written-back value.
    Exclusive,
    /// A read-only copy; other nodes may hold one too.
    Shared,
    /// No valid copy.
    Invalid,
}

impl Mesi {
    /// The letter the API answers (`"M"`, `"E"`, `"S"`, `"I"`).
    pub fn letter(self) -> &'static str {
        match self {
            Self::Modified => "M",
            Self::Exclusive => "E",
            Self::Shared => "S",
            Self::Invalid => "I",
        }
    }

    /// Whether the node owns the line (a write needs no directory traffic).
    pub fn owned(self) -> bool {
        matches!(self, Self::Modified | Self::Exclusive)
    }
}

/// One line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Line {
    /// The value's JSON text.
    pub value: Vec<u8>,
    /// Modified, Exclusive or Shared (an Invalid line is not stored).
    pub state: Mesi,
    /// The directory version the value was filled at or last written back under.
    pub version: u64,
    /// The ownership epoch of the grant the line is held under; a write-back carries it
    /// and the directory refuses a stale one.
    pub epoch: u64,
    /// Node-monotonic milliseconds after which the line is a miss (`None`: no TTL).
    pub expires_at_ms: Option<u64>,
    /// When the oldest local write not yet written back was made (Modified only).
    pub dirty_since_ms: Option<u64>,
    /// The write stamp of the line's latest local write (the node's own increasing
    /// counter): a write-back names the write it carries by it, so a write made after
    /// the write-back left keeps the line dirty even if it wrote the same bytes again.
    pub stamp: u64,
    /// The stamp of the latest periodic write-back sent while the line stays owned.
    sent_stamp: Option<u64>,
    /// When the first write after `sent_stamp` was made: once that write-back is
    /// recorded, the line is dirty since then (not since its first write ever), so a
    /// key written without pause keeps the write-back window open.
    dirty_after_sent_ms: Option<u64>,
    /// Recency stamp: the LRU order.
    touched: u64,
}

impl Line {
    fn bytes(&self, key: &str) -> u64 {
        (key.len() + self.value.len()) as u64
    }

    pub(crate) fn live_at(&self, now_ms: u64) -> bool {
        self.expires_at_ms.is_none_or(|t| now_ms < t)
    }
}

/// A line that left the table to make room; a Modified one must be written back first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Evicted {
    /// Its key.
    pub key: String,
    /// The line as it was.
    pub line: Line,
}

/// Why a fill or a local write was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LineError {
    /// One line does not fit the byte bound on its own.
    #[error("a line of {bytes} bytes is over the cache's {max} bytes")]
    TooLarge {
        /// The line's key and value bytes.
        bytes: u64,
        /// The bound.
        max: u64,
    },
    /// A local write needs the line in M or E.
    #[error("the line is {}, not owned", .0.letter())]
    NotOwned(Mesi),
}

/// What the table counts, for `GET /cache/stats` and the metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LineStats {
    /// Gets answered from a valid line.
    pub hits: u64,
    /// Gets with no valid line (absent, or its TTL ran out).
    pub misses: u64,
    /// Lines dropped because the directory invalidated them.
    pub invalidations: u64,
    /// Lines dropped to stay within the bounds (or evicted on request).
    pub evictions: u64,
    /// Lines dropped because their TTL ran out.
    pub expirations: u64,
    /// Lines filled from the directory.
    pub fills: u64,
}

/// One node's cache lines, bounded in entries and bytes, least recently used first out.
#[derive(Clone, Debug)]
pub struct CacheLines {
    lines: BTreeMap<String, Line>,
    /// Recency stamp → key; the first entry is the least recently used line.
    lru: BTreeMap<u64, String>,
    /// (dirty since, key) of every line with an unwritten write: the oldest first.
    dirty: BTreeSet<(u64, String)>,
    next_touch: u64,
    bytes: u64,
    /// Lines in M, E and S: kept as lines come, go and change state, since the
    /// metrics read them often and a scan of every line would cost as much.
    by_state: [usize; 3],
    max_entries: usize,
    max_bytes: u64,
    stats: LineStats,
}

impl CacheLines {
    /// An empty table of at most `max_entries` lines and `max_bytes` key and value bytes
    /// (each at least 1).
    pub fn new(max_entries: usize, max_bytes: u64) -> Self {
        Self {
            lines: BTreeMap::new(),
            lru: BTreeMap::new(),
            dirty: BTreeSet::new(),
            next_touch: 0,
            bytes: 0,
            by_state: [0; 3],
            max_entries: max_entries.max(1),
            max_bytes: max_bytes.max(1),
            stats: LineStats::default(),
        }
    }

    /// Lines held.
    pub fn len(&self) -> usize {
        self.lines.len()
    }

    /// Whether no line is held.
    pub fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }

    /// Key and value bytes held.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The counters.
    pub fn stats(&self) -> LineStats {
        self.stats
    }

    /// Lines per state: (M, E, S).
    pub fn counts(&self) -> (usize, usize, usize) {
        (self.by_state[0], self.by_state[1], self.by_state[2])
    }

    /// The state of `key` at `now_ms` (Invalid when absent or expired), without
    /// touching its recency or the counters.
    pub fn state(&self, key: &str, now_ms: u64) -> Mesi {
        self.lines
            .get(key)
            .filter(|l| l.live_at(now_ms))
            .map_or(Mesi::Invalid, |l| l.state)
    }

    /// Every key held, in order.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.lines.keys().map(String::as_str)
    }

    /// The line of `key`, as it is (tests, the console).
    pub fn peek(&self, key: &str) -> Option<&Line> {
        self.lines.get(key)
    }

    /// A get at `now_ms`: the valid line, counted as a hit and made most recent, or
    /// `None`, counted as a miss. A line whose TTL ran out is dropped (a Modified one is
    /// returned as expired so the caller can tell the directory; its value is not
    /// written back: a TTL ends the value, it does not persist it).
    pub fn get(&mut self, key: &str, now_ms: u64) -> Result<&Line, Option<Box<Evicted>>> {
        match self.lines.get(key) {
            Some(line) if line.live_at(now_ms) => {
                self.stats.hits += 1;
                self.touch(key);
                self.lines.get(key).ok_or(None)
            }
            Some(_) => {
                self.stats.misses += 1;
                self.stats.expirations += 1;
                Err(self.take(key).map(Box::new))
            }
            None => {
                self.stats.misses += 1;
                Err(None)
            }
        }
    }

    /// Hold `key` in `state` with `value`, as the directory granted at `version` and
    /// `epoch`, for `ttl_ms` from `now_ms` (`None`: no TTL). Replaces any line of the
    /// key. Lines evicted to make room come back, least recently used first; a
    /// Modified one among them must be written back before its grant is given up.
    pub fn fill(&mut self, key: &str, fill: Fill, now_ms: u64) -> Result<Vec<Evicted>, LineError> {
        let line = Line {
            value: fill.value,
            state: fill.state,
            version: fill.version,
            epoch: fill.epoch,
            expires_at_ms: fill.ttl_ms.map(|t| now_ms.saturating_add(t)),
            dirty_since_ms: (fill.state == Mesi::Modified).then_some(now_ms),
            stamp: fill.stamp,
            sent_stamp: None,
            dirty_after_sent_ms: None,
            touched: 0,
        };
        let size = line.bytes(key);
        if size > self.max_bytes {
            return Err(LineError::TooLarge {
                bytes: size,
                max: self.max_bytes,
            });
        }
        if fill.state == Mesi::Invalid {
            return Ok(self.take(key).into_iter().collect());
        }
        // The old line of the key is replaced by the new grant; if it held unwritten
        // writes it comes back with the evicted lines, to be written back, never dropped.
        let replaced = self.take(key).filter(|e| e.line.dirty_since_ms.is_some());
        let mut evicted: Vec<Evicted> = replaced.into_iter().collect();
        evicted.extend(self.make_room(size, 1));
        self.stats.fills += 1;
        self.insert(key, line);
        Ok(evicted)
    }

    /// A write at this node on a line it owns (M or E): the line becomes Modified with
    /// `value` and write `stamp`, dirty since `now_ms` if it was clean. Its TTL is
    /// `ttl_ms` from now (`None`: none, as the write says). A line not owned is refused: the write goes
    /// through the directory.
    pub fn write_owned(
        &mut self,
        key: &str,
        value: Vec<u8>,
        ttl_ms: Option<u64>,
        now_ms: u64,
        stamp: u64,
    ) -> Result<Vec<Evicted>, LineError> {
        let state = self.state(key, now_ms);
        if !state.owned() {
            return Err(LineError::NotOwned(state));
        }
        let Some(Evicted { line: old, .. }) = self.take(key) else {
            return Err(LineError::NotOwned(Mesi::Invalid));
        };
        let line = Line {
            value,
            state: Mesi::Modified,
            version: old.version,
            epoch: old.epoch,
            // As a Redis SET: a write without a TTL has none.
            expires_at_ms: ttl_ms.map(|t| now_ms.saturating_add(t)),
            dirty_since_ms: old.dirty_since_ms.or(Some(now_ms)),
            stamp,
            sent_stamp: old.sent_stamp,
            dirty_after_sent_ms: old.dirty_after_sent_ms.or(old.sent_stamp.map(|_| now_ms)),
            touched: 0,
        };
        let size = line.bytes(key);
        if size > self.max_bytes {
            // Put the old line back: a refused write changes nothing.
            self.insert(key, old);
            return Err(LineError::TooLarge {
                bytes: size,
                max: self.max_bytes,
            });
        }
        let evicted = self.make_room(size, 1);
        self.insert(key, line);
        Ok(evicted)
    }

    /// A periodic write-back of the line's current write (`stamp`) was sent: the writes
    /// made from now on are the ones it does not carry.
    pub fn mark_sent(&mut self, key: &str, stamp: u64) {
        if let Some(line) = self.lines.get_mut(key) {
            if line.stamp == stamp
                && line.dirty_since_ms.is_some()
                && line.sent_stamp != Some(stamp)
            {
                line.sent_stamp = Some(stamp);
                line.dirty_after_sent_ms = None;
            }
        }
    }

    /// The directory recorded the write-back of the write `stamp` of `key` at
    /// `version`: the line is clean again (Exclusive, or Shared when `downgrade`). A
    /// line written again since the write-back left (a later stamp) stays dirty, since
    /// its first write after that write-back if that is the one recorded.
    pub fn written_back(&mut self, key: &str, stamp: u64, version: u64, downgrade: bool) {
        let Some(line) = self.lines.get_mut(key) else {
            return;
        };
        if line.stamp == stamp {
            line.version = version;
            if let Some(t) = line.dirty_since_ms.take() {
                self.dirty.remove(&(t, key.to_owned()));
            }
            line.sent_stamp = None;
            line.dirty_after_sent_ms = None;
            let was = line.state;
            line.state = if downgrade {
                Mesi::Shared
            } else if was == Mesi::Modified {
                Mesi::Exclusive
            } else {
                was
            };
            let now = line.state;
            self.count(was, -1);
            self.count(now, 1);
        } else if line.sent_stamp == Some(stamp) {
            // Every write up to `stamp` is stored; the oldest one that is not came
            // after the write-back left.
            line.version = version;
            line.sent_stamp = None;
            if let (Some(old), Some(new)) = (line.dirty_since_ms, line.dirty_after_sent_ms.take()) {
                self.dirty.remove(&(old, key.to_owned()));
                self.dirty.insert((new, key.to_owned()));
                line.dirty_since_ms = Some(new);
            }
        }
    }

    /// The directory granted `key` again under `epoch` while this node holds it owned:
    /// the line (its value and dirtiness) stays, under the new epoch.
    pub fn regrant(&mut self, key: &str, epoch: u64) -> Option<&Line> {
        let line = self.lines.get_mut(key).filter(|l| l.state.owned())?;
        line.epoch = epoch;
        Some(line)
    }

    /// The directory asked for `key` back in Shared (another node reads it): from now
    /// on the line takes no local write. It stays dirty until its value is written
    /// back ([`CacheLines::written_back`]). Whether there was an owned line.
    pub fn downgrade(&mut self, key: &str) -> bool {
        match self.lines.get_mut(key) {
            Some(line) if line.state.owned() => {
                let was = line.state;
                line.state = Mesi::Shared;
                self.count(was, -1);
                self.count(Mesi::Shared, 1);
                true
            }
            _ => false,
        }
    }

    /// The directory invalidated `key` here: the line is dropped (a Modified line's
    /// value comes back so the caller can tell what was lost, which the protocol
    /// prevents by writing back before it invalidates an owner).
    pub fn invalidate(&mut self, key: &str) -> Option<Evicted> {
        let taken = self.take(key);
        if taken.is_some() {
            self.stats.invalidations += 1;
        }
        taken
    }

    /// Evict `key` on request (`POST /cache/evict`): the line, if there was one.
    pub fn evict(&mut self, key: &str) -> Option<Evicted> {
        let taken = self.take(key);
        if taken.is_some() {
            self.stats.evictions += 1;
        }
        taken
    }

    /// Drop every line whose TTL ran out by `now_ms`, oldest first.
    pub fn expire(&mut self, now_ms: u64) -> Vec<Evicted> {
        let expired: Vec<String> = self
            .lines
            .iter()
            .filter(|(_, l)| !l.live_at(now_ms))
            .map(|(k, _)| k.clone())
            .collect();
        self.stats.expirations += expired.len() as u64;
        expired.iter().filter_map(|k| self.take(k)).collect()
    }

    /// Drop every line (a node that lost its lease, or that restarts).
    pub fn clear(&mut self) -> Vec<Evicted> {
        let keys: Vec<String> = self.lines.keys().cloned().collect();
        keys.iter().filter_map(|k| self.take(k)).collect()
    }

    /// Modified lines whose oldest unwritten write is at or before `before_ms`: what a
    /// write-back round must send (oldest first by key order).
    pub fn dirty_since(&self, before_ms: u64) -> Vec<(&str, &Line)> {
        self.dirty
            .iter()
            .take_while(|(t, _)| *t <= before_ms)
            .filter_map(|(_, k)| self.lines.get(k).map(|l| (k.as_str(), l)))
            .collect()
    }

    /// The oldest unwritten local write, if any.
    pub fn oldest_dirty_ms(&self) -> Option<u64> {
        self.dirty.first().map(|(t, _)| *t)
    }

    /// Lines with an unwritten write.
    pub fn dirty_count(&self) -> usize {
        self.dirty.len()
    }

    fn touch(&mut self, key: &str) {
        if let Some(line) = self.lines.get_mut(key) {
            self.lru.remove(&line.touched);
            self.next_touch += 1;
            line.touched = self.next_touch;
            self.lru.insert(self.next_touch, key.to_owned());
        }
    }

    fn insert(&mut self, key: &str, mut line: Line) {
        self.next_touch += 1;
        line.touched = self.next_touch;
        self.bytes += line.bytes(key);
        self.count(line.state, 1);
        if let Some(t) = line.dirty_since_ms {
            self.dirty.insert((t, key.to_owned()));
        }
        self.lru.insert(self.next_touch, key.to_owned());
        self.lines.insert(key.to_owned(), line);
    }

    fn take(&mut self, key: &str) -> Option<Evicted> {
        let line = self.lines.remove(key)?;
        self.lru.remove(&line.touched);
        self.bytes -= line.bytes(key);
        self.count(line.state, -1);
        if let Some(t) = line.dirty_since_ms {
            self.dirty.remove(&(t, key.to_owned()));
        }
        Some(Evicted {
            key: key.to_owned(),
            line,
        })
    }

    fn count(&mut self, state: Mesi, delta: isize) {
        let slot = match state {
            Mesi::Modified => 0,
            Mesi::Exclusive => 1,
            Mesi::Shared => 2,
            Mesi::Invalid => return,
        };
        self.by_state[slot] = self.by_state[slot].saturating_add_signed(delta);
    }

    /// Evict least recently used lines until `bytes` more bytes and `entries` more
    /// lines fit.
    fn make_room(&mut self, bytes: u64, entries: usize) -> Vec<Evicted> {
        let mut out = Vec::new();
        while self.lines.len() + entries > self.max_entries || self.bytes + bytes > self.max_bytes {
            let Some((_, key)) = self.lru.pop_first() else {
                break;
            };
            if let Some(line) = self.lines.remove(&key) {
                self.bytes -= line.bytes(&key);
                self.count(line.state, -1);
                if let Some(t) = line.dirty_since_ms {
                    self.dirty.remove(&(t, key.clone()));
                }
                self.stats.evictions += 1;
                out.push(Evicted { key, line });
            }
        }
        out
    }
}

/// What the directory granted, to [`CacheLines::fill`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fill {
    /// The value's JSON text.
    pub value: Vec<u8>,
    /// The state granted.
    pub state: Mesi,
    /// The directory version of the value.
    pub version: u64,
    /// The ownership epoch of the grant.
    pub epoch: u64,
    /// Time to live from the fill (`None`: none).
    pub ttl_ms: Option<u64>,
    /// The write stamp of a Modified fill (a write granted by the directory); 0
    /// otherwise.
    pub stamp: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fill(value: &str, state: Mesi) -> Fill {
        Fill {
            value: value.as_bytes().to_vec(),
            state,
            version: 1,
            epoch: 1,
            ttl_ms: None,
            stamp: 0,
        }
    }

    fn check(t: &CacheLines) {
        assert_eq!(t.lines.len(), t.lru.len(), "one recency stamp per line");
        let bytes: u64 = t.lines.iter().map(|(k, l)| l.bytes(k)).sum();
        assert_eq!(bytes, t.bytes);
        assert!(t.lines.len() <= t.max_entries && t.bytes <= t.max_bytes);
        for (stamp, key) in &t.lru {
            assert_eq!(t.lines[key].touched, *stamp);
        }
        let dirty: BTreeSet<(u64, String)> = t
            .lines
            .iter()
            .filter_map(|(k, l)| l.dirty_since_ms.map(|d| (d, k.clone())))
            .collect();
        assert_eq!(dirty, t.dirty, "the dirty index is the dirty lines");
        let mut by_state = [0; 3];
        for l in t.lines.values() {
            match l.state {
                Mesi::Modified => by_state[0] += 1,
                Mesi::Exclusive => by_state[1] += 1,
                Mesi::Shared => by_state[2] += 1,
                Mesi::Invalid => {}
            }
        }
        assert_eq!(by_state, t.by_state, "the state counts are the lines'");
    }

    #[test]
    fn a_hit_is_served_from_the_line_and_a_miss_is_counted() {
        let mut t = CacheLines::new(10, 1 << 20);
        assert!(matches!(t.get("user:42", 0), Err(None)));
        t.fill("user:42", fill("{\"score\":99}", Mesi::Exclusive), 0)
            .expect("fill");
        let line = t.get("user:42", 1).expect("hit");
        assert_eq!(
            (line.value.as_slice(), line.state),
            (&b"{\"score\":99}"[..], Mesi::Exclusive)
        );
        assert_eq!(
            (t.stats().hits, t.stats().misses, t.stats().fills),
            (1, 1, 1)
        );
        check(&t);
    }

    #[test]
    fn the_least_recently_used_line_goes_first_by_entries_and_by_bytes() {
        let mut t = CacheLines::new(3, 1 << 20);
        for k in ["a", "b", "c"] {
            t.fill(k, fill("1", Mesi::Shared), 0).expect("fill");
        }
        t.get("a", 1).expect("hit");
        let out = t.fill("d", fill("1", Mesi::Shared), 2).expect("fill");
        assert_eq!(
            out.iter().map(|e| e.key.as_str()).collect::<Vec<_>>(),
            ["b"]
        );
        check(&t);
        // By bytes: a 10-byte bound holds a, c and d (2 B each); e of 6 B pushes out
        // the least recent one only, and then fills the bound exactly.
        let mut t = CacheLines::new(100, 10);
        for k in ["a", "c", "d"] {
            t.fill(k, fill("1", Mesi::Shared), 0).expect("fill");
        }
        let out = t.fill("e", fill("12345", Mesi::Shared), 1).expect("fill");
        assert_eq!(
            out.iter().map(|e| e.key.as_str()).collect::<Vec<_>>(),
            ["a"]
        );
        assert_eq!(t.bytes(), 10);
        check(&t);
        assert!(matches!(
            t.fill("big", fill("0123456789", Mesi::Shared), 2),
            Err(LineError::TooLarge { .. })
        ));
        assert_eq!(t.len(), 3, "a line that cannot fit evicts nothing");
    }

    #[test]
    fn an_evicted_modified_line_comes_back_to_be_written_back() {
        let mut t = CacheLines::new(1, 1 << 20);
        t.fill("a", fill("1", Mesi::Exclusive), 0).expect("fill");
        t.write_owned("a", b"2".to_vec(), None, 5, 5)
            .expect("owned");
        let out = t.fill("b", fill("1", Mesi::Shared), 6).expect("fill");
        assert_eq!(out.len(), 1);
        assert_eq!(
            (
                out[0].key.as_str(),
                out[0].line.state,
                out[0].line.value.as_slice()
            ),
            ("a", Mesi::Modified, &b"2"[..])
        );
        assert_eq!(out[0].line.dirty_since_ms, Some(5));
        check(&t);
    }

    #[test]
    fn a_new_grant_over_a_dirty_line_hands_the_dirty_value_back() {
        let mut t = CacheLines::new(10, 1 << 20);
        t.fill("k", fill("1", Mesi::Exclusive), 0).expect("fill");
        t.write_owned("k", b"2".to_vec(), None, 1, 1)
            .expect("owned");
        let out = t.fill("k", fill("1", Mesi::Shared), 2).expect("fill");
        assert_eq!(
            out.iter()
                .map(|e| (e.key.as_str(), e.line.value.as_slice()))
                .collect::<Vec<_>>(),
            [("k", &b"2"[..])]
        );
        check(&t);
    }

    #[test]
    fn a_local_write_needs_an_owned_line_and_makes_it_modified() {
        let mut t = CacheLines::new(10, 1 << 20);
        assert_eq!(
            t.write_owned("k", b"1".to_vec(), None, 0, 0),
            Err(LineError::NotOwned(Mesi::Invalid))
        );
        t.fill("k", fill("1", Mesi::Shared), 0).expect("fill");
        assert_eq!(
            t.write_owned("k", b"2".to_vec(), None, 1, 1),
            Err(LineError::NotOwned(Mesi::Shared))
        );
        assert_eq!(t.peek("k").map(|l| l.value.clone()), Some(b"1".to_vec()));
        t.fill("k", fill("1", Mesi::Exclusive), 2).expect("fill");
        t.write_owned("k", b"2".to_vec(), None, 3, 3)
            .expect("E is owned");
        t.write_owned("k", b"3".to_vec(), None, 4, 4)
            .expect("M is owned");
        let line = t.peek("k").expect("line");
        assert_eq!(
            (line.state, line.value.as_slice(), line.dirty_since_ms),
            (Mesi::Modified, &b"3"[..], Some(3)),
            "dirty since the first unwritten write"
        );
        assert_eq!(t.oldest_dirty_ms(), Some(3));
        // Written back: clean and Exclusive again; a downgrade makes it Shared.
        t.written_back("k", 4, 2, false);
        let line = t.peek("k").expect("line");
        assert_eq!(
            (line.state, line.version, line.dirty_since_ms),
            (Mesi::Exclusive, 2, None)
        );
        t.write_owned("k", b"4".to_vec(), None, 9, 9)
            .expect("owned");
        t.written_back("k", 4, 3, true);
        assert_eq!(
            t.peek("k").map(|l| (l.state, l.dirty_since_ms)),
            Some((Mesi::Modified, Some(9))),
            "a write-back of an older value leaves a newer write dirty"
        );
        t.written_back("k", 9, 4, true);
        assert_eq!(t.state("k", 10), Mesi::Shared);
        check(&t);
    }

    /// A key written without pause is never clean; once a periodic write-back is
    /// recorded, it is dirty only since the first write after that write-back left.
    #[test]
    fn a_recorded_write_back_moves_the_dirty_time_to_the_first_write_after_it() {
        let mut t = CacheLines::new(10, 1 << 20);
        t.fill("k", fill("0", Mesi::Exclusive), 0).expect("fill");
        t.write_owned("k", b"1".to_vec(), None, 10, 1)
            .expect("owned");
        t.write_owned("k", b"2".to_vec(), None, 20, 2)
            .expect("owned");
        t.mark_sent("k", 2);
        t.write_owned("k", b"3".to_vec(), None, 30, 3)
            .expect("owned");
        t.mark_sent("k", 3);
        t.write_owned("k", b"4".to_vec(), None, 40, 4)
            .expect("owned");
        t.written_back("k", 2, 1, false);
        assert_eq!(
            t.oldest_dirty_ms(),
            Some(10),
            "a write-back older than the latest one sent proves nothing of write 3"
        );
        t.written_back("k", 3, 2, false);
        assert_eq!(
            t.oldest_dirty_ms(),
            Some(40),
            "write 4 is the oldest not stored"
        );
        assert_eq!(t.state("k", 41), Mesi::Modified);
        t.mark_sent("k", 4);
        t.written_back("k", 4, 3, false);
        assert_eq!(
            (t.oldest_dirty_ms(), t.state("k", 42)),
            (None, Mesi::Exclusive)
        );
        check(&t);
    }

    #[test]
    fn a_ttl_makes_the_line_a_miss_and_never_brings_back_the_old_value() {
        let mut t = CacheLines::new(10, 1 << 20);
        let mut f = fill("old", Mesi::Exclusive);
        f.ttl_ms = Some(100);
        t.fill("k", f, 1_000).expect("fill");
        assert!(t.get("k", 1_099).is_ok());
        assert_eq!(t.state("k", 1_100), Mesi::Invalid);
        assert!(matches!(t.get("k", 1_100), Err(Some(_))));
        assert!(matches!(t.get("k", 1_101), Err(None)), "gone, not stale");
        assert_eq!(t.stats().expirations, 1);
        // A write with a TTL starts it again; expire() drops what ran out.
        let mut f = fill("v", Mesi::Exclusive);
        f.ttl_ms = Some(10);
        t.fill("a", f.clone(), 0).expect("fill");
        t.fill("b", f, 0).expect("fill");
        t.write_owned("b", b"w".to_vec(), Some(100), 5, 5)
            .expect("owned");
        let out = t.expire(20);
        assert_eq!(
            out.iter().map(|e| e.key.as_str()).collect::<Vec<_>>(),
            ["a"]
        );
        assert_eq!(t.state("b", 20), Mesi::Modified);
        check(&t);
    }

    #[test]
    fn invalidation_and_clear_leave_every_line_invalid() {
        let mut t = CacheLines::new(10, 1 << 20);
        t.fill("a", fill("1", Mesi::Shared), 0).expect("fill");
        t.fill("b", fill("1", Mesi::Modified), 0).expect("fill");
        assert!(t.invalidate("a").is_some());
        assert!(t.invalidate("a").is_none());
        assert_eq!(t.stats().invalidations, 1);
        assert_eq!(t.state("a", 0), Mesi::Invalid);
        let out = t.clear();
        assert_eq!(out.len(), 1);
        assert!(t.is_empty() && t.bytes() == 0);
        check(&t);
    }

    /// Random operations against the bounds and the index invariants.
    #[test]
    fn bounds_and_indexes_hold_under_random_operations() {
        let mut rng = 0x9E37_79B9_7F4A_7C15_u64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut t = CacheLines::new(16, 200);
        for step in 0..5_000u64 {
            let key = format!("k{}", next() % 40);
            let value = "x".repeat((next() % 30) as usize);
            match next() % 6 {
                0 | 1 => {
                    let state =
                        [Mesi::Modified, Mesi::Exclusive, Mesi::Shared][(next() % 3) as usize];
                    let mut f = fill(&value, state);
                    f.ttl_ms = (next() % 2 == 0).then_some(next() % 50);
                    let _ = t.fill(&key, f, step);
                }
                2 => {
                    let _ = t.write_owned(&key, value.into_bytes(), None, step, step);
                }
                3 => {
                    let _ = t.get(&key, step);
                }
                4 => {
                    let _ = t.invalidate(&key);
                }
                _ => {
                    let _ = t.expire(step);
                }
            }
            check(&t);
        }
        assert!(t.stats().evictions > 0 && t.stats().hits > 0 && t.stats().expirations > 0);
    }
}
