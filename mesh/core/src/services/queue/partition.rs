//! `QueuePartition`: the messages of one partition of one queue, each visible, leased
//! or dead, with the indexes that make every operation logarithmic.
//!
//! A partition holds no reference to any other partition: it is the unit a later layout
//! can move to a Raft group of its own. Sequence numbers are per partition and follow
//! enqueue order, so "the oldest visible message" (of a key, or of the partition) is the
//! smallest visible sequence number, which keeps first deliveries FIFO per key.

use super::{Delivery, Field, MsgId};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

/// Messages per chunk of a [`MessageStore`].
const CHUNK: u64 = 1024;

/// A partition's messages by sequence number, in shared chunks of [`CHUNK`] consecutive
/// sequence numbers. A snapshot view shares every chunk; a write after it copies only
/// the chunk it touches. (One map of a million messages was copied whole by the first
/// write after each snapshot, on the node's loop: half a second, an election.)
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct MessageStore {
    chunks: BTreeMap<u64, Arc<BTreeMap<u64, Message>>>,
    len: usize,
}

impl MessageStore {
    pub(super) fn len(&self) -> usize {
        self.len
    }

    pub(super) fn get(&self, seq: &u64) -> Option<&Message> {
        self.chunks.get(&(seq / CHUNK))?.get(seq)
    }

    pub(super) fn get_mut(&mut self, seq: &u64) -> Option<&mut Message> {
        let chunk = self.chunks.get_mut(&(seq / CHUNK))?;
        if !chunk.contains_key(seq) {
            return None;
        }
        Arc::make_mut(chunk).get_mut(seq)
    }

    pub(super) fn insert(&mut self, seq: u64, message: Message) {
        let chunk = self.chunks.entry(seq / CHUNK).or_default();
        if Arc::make_mut(chunk).insert(seq, message).is_none() {
            self.len += 1;
        }
    }

    pub(super) fn remove(&mut self, seq: &u64) -> Option<Message> {
        let id = seq / CHUNK;
        let chunk = self.chunks.get_mut(&id)?;
        if !chunk.contains_key(seq) {
            return None;
        }
        let removed = Arc::make_mut(chunk).remove(seq);
        if chunk.is_empty() {
            self.chunks.remove(&id);
        }
        self.len -= usize::from(removed.is_some());
        removed
    }

    /// Every message, by sequence number.
    pub(super) fn iter(&self) -> impl Iterator<Item = (&u64, &Message)> {
        self.chunks.values().flat_map(|c| c.iter())
    }

    pub(super) fn values(&self) -> impl Iterator<Item = &Message> {
        self.iter().map(|(_, m)| m)
    }

    pub(super) fn keys(&self) -> impl Iterator<Item = &u64> {
        self.iter().map(|(s, _)| s)
    }
}

/// A lease in progress.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Lease {
    /// Lock time at which the message becomes visible again.
    pub(super) until_ms: u64,
}

/// A set of sequence numbers in shared chunks, like [`MessageStore`]: a write after a
/// snapshot view copies the one chunk it touches.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct SeqSet {
    chunks: BTreeMap<u64, Arc<BTreeSet<u64>>>,
    len: usize,
}

impl SeqSet {
    pub(super) fn len(&self) -> usize {
        self.len
    }

    pub(super) fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub(super) fn contains(&self, seq: &u64) -> bool {
        self.chunks
            .get(&(seq / CHUNK))
            .is_some_and(|c| c.contains(seq))
    }

    pub(super) fn first(&self) -> Option<&u64> {
        self.chunks.values().next()?.first()
    }

    pub(super) fn insert(&mut self, seq: u64) {
        let chunk = self.chunks.entry(seq / CHUNK).or_default();
        if !chunk.contains(&seq) && Arc::make_mut(chunk).insert(seq) {
            self.len += 1;
        }
    }

    pub(super) fn remove(&mut self, seq: &u64) {
        let id = seq / CHUNK;
        let Some(chunk) = self.chunks.get_mut(&id) else {
            return;
        };
        if chunk.contains(seq) && Arc::make_mut(chunk).remove(seq) {
            self.len -= 1;
            if chunk.is_empty() {
                self.chunks.remove(&id);
            }
        }
    }
}

/// Shards of a [`KeyIndex`].
const KEY_SHARDS: usize = 64;

/// The visible messages of each key, in [`KEY_SHARDS`] shared shards by a hash of the
/// key: a write after a snapshot view copies one shard, however many keys there are.
/// Within a shard, keys are found by their 64-bit hash and then compared once: ordered
/// by the string itself, a lookup compared the key with a dozen others (a fifth of a
/// follower's apply time under a 64-client enqueue load was `memcmp` here).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct KeyIndex {
    shards: Vec<Arc<KeyShard>>,
}

/// One shard of a [`KeyIndex`]: key hash → the keys with that hash (almost always one).
type KeyShard = BTreeMap<u64, Vec<(String, SeqSet)>>;

impl Default for KeyIndex {
    fn default() -> Self {
        Self {
            shards: vec![Arc::default(); KEY_SHARDS],
        }
    }
}

impl KeyIndex {
    /// The key's hash and its shard. Any fixed hash: the same on every node and run.
    fn locate(&self, key: &str) -> (u64, usize) {
        let hash = super::ring::stable_hash(key.as_bytes());
        let shard = (hash.rotate_left(17) % self.shards.len().max(1) as u64) as usize;
        (hash, shard)
    }

    pub(super) fn contains_key(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    pub(super) fn get(&self, key: &str) -> Option<&SeqSet> {
        let (hash, shard) = self.locate(key);
        self.shards
            .get(shard)?
            .get(&hash)?
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, set)| set)
    }

    pub(super) fn insert(&mut self, key: &str, seq: u64) {
        let (hash, i) = self.locate(key);
        if let Some(shard) = self.shards.get_mut(i) {
            let bucket = Arc::make_mut(shard).entry(hash).or_default();
            match bucket.iter_mut().find(|(k, _)| k == key) {
                Some((_, set)) => set.insert(seq),
                None => {
                    let mut set = SeqSet::default();
                    set.insert(seq);
                    bucket.push((key.to_owned(), set));
                }
            }
        }
    }

    pub(super) fn remove(&mut self, key: &str, seq: u64) {
        let (hash, i) = self.locate(key);
        if !self.get(key).is_some_and(|set| set.contains(&seq)) {
            return;
        }
        let Some(shard) = self.shards.get_mut(i) else {
            return;
        };
        let shard = Arc::make_mut(shard);
        let Some(bucket) = shard.get_mut(&hash) else {
            return;
        };
        if let Some(at) = bucket.iter().position(|(k, _)| k == key) {
            bucket[at].1.remove(&seq);
            if bucket[at].1.is_empty() {
                bucket.swap_remove(at);
            }
        }
        if bucket.is_empty() {
            shard.remove(&hash);
        }
    }

    pub(super) fn values(&self) -> impl Iterator<Item = &SeqSet> {
        self.shards
            .iter()
            .flat_map(|s| s.values())
            .flat_map(|bucket| bucket.iter().map(|(_, set)| set))
    }
}

/// One stored message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Message {
    pub(super) key: String,
    /// The value's JSON text, as the producer sent it.
    pub(super) value: Vec<u8>,
    pub(super) field: Field,
    /// Deliveries so far, over the message's whole life.
    pub(super) deliveries: u32,
    /// Deliveries it had when it was last requeued from the dead letters: the budget of
    /// `max_deliveries` starts again there, the count does not.
    pub(super) requeued_at: u32,
    /// Receipt of the latest delivery (0: never delivered).
    pub(super) receipt: u64,
    pub(super) lease: Option<Lease>,
    /// Lock time of the enqueue.
    pub(super) enqueued_ms: u64,
}

impl Message {
    /// Bytes counted against the queue's byte cap.
    pub(super) fn size(&self) -> u64 {
        (self.key.len() + self.value.len()) as u64
    }
}

/// The messages of one partition.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct QueuePartition {
    pub(super) next_seq: u64,
    /// Every live message (visible or leased), by sequence number.
    pub(super) messages: MessageStore,
    /// Visible messages, oldest first.
    visible: SeqSet,
    /// Visible messages per key, oldest first.
    visible_by_key: KeyIndex,
    /// Leases in progress: (until, seq).
    leases: BTreeSet<(u64, u64)>,
    pub(super) bytes: u64,
}

impl QueuePartition {
    pub(super) fn visible_count(&self) -> usize {
        self.visible.len()
    }

    pub(super) fn leased_count(&self) -> usize {
        self.leases.len()
    }

    pub(super) fn has_visible(&self, key: Option<&str>) -> bool {
        match key {
            None => !self.visible.is_empty(),
            Some(k) => self.visible_by_key.contains_key(k),
        }
    }

    /// Lock time of the oldest live message.
    pub(super) fn oldest_ms(&self) -> Option<u64> {
        self.messages.values().map(|m| m.enqueued_ms).next()
    }

    pub(super) fn next_lease_end(&self) -> Option<u64> {
        self.leases.first().map(|(until, _)| *until)
    }

    /// Store a new message, visible; its sequence number.
    pub(super) fn push(&mut self, message: Message) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.insert(seq, message);
        seq
    }

    /// Put a message back under its own sequence number (a requeued dead letter).
    pub(super) fn insert(&mut self, seq: u64, message: Message) {
        self.bytes += message.size();
        self.mark_visible(seq, &message.key);
        self.messages.insert(seq, message);
    }

    fn mark_visible(&mut self, seq: u64, key: &str) {
        self.visible.insert(seq);
        self.visible_by_key.insert(key, seq);
    }

    fn unmark_visible(&mut self, seq: u64, key: &str) {
        self.visible.remove(&seq);
        self.visible_by_key.remove(key, seq);
    }

    /// Lease the oldest visible message (of `key`, if given) until `until_ms`.
    pub(super) fn lease_oldest(
        &mut self,
        partition: u32,
        key: Option<&str>,
        until_ms: u64,
        receipt: u64,
    ) -> Option<Delivery> {
        let seq = match key {
            None => self.visible.first().copied()?,
            Some(k) => self.visible_by_key.get(k)?.first().copied()?,
        };
        let message = self.messages.get_mut(&seq)?;
        message.deliveries = message.deliveries.saturating_add(1);
        message.receipt = receipt;
        message.lease = Some(Lease { until_ms });
        let delivery = Delivery {
            id: MsgId { partition, seq },
            key: message.key.clone(),
            value: message.value.clone(),
            field: message.field,
            deliveries: message.deliveries,
            receipt,
        };
        let key = message.key.clone();
        self.unmark_visible(seq, &key);
        self.leases.insert((until_ms, seq));
        Some(delivery)
    }

    /// Remove a live message (acked, or moved to the dead letters).
    pub(super) fn remove(&mut self, seq: u64) -> Option<Message> {
        let message = self.messages.remove(&seq)?;
        self.bytes -= message.size();
        match message.lease {
            Some(lease) => {
                self.leases.remove(&(lease.until_ms, seq));
            }
            None => self.unmark_visible(seq, &message.key),
        }
        Some(message)
    }

    /// End the lease of a leased message: it is visible again.
    pub(super) fn end_lease(&mut self, seq: u64) {
        let Some(message) = self.messages.get_mut(&seq) else {
            return;
        };
        let Some(lease) = message.lease.take() else {
            return;
        };
        let key = message.key.clone();
        self.leases.remove(&(lease.until_ms, seq));
        self.mark_visible(seq, &key);
    }

    /// Move the lease end of a leased message.
    pub(super) fn set_lease_end(&mut self, seq: u64, until_ms: u64) {
        let Some(message) = self.messages.get_mut(&seq) else {
            return;
        };
        let Some(lease) = message.lease.as_mut() else {
            return;
        };
        self.leases.remove(&(lease.until_ms, seq));
        lease.until_ms = until_ms;
        self.leases.insert((until_ms, seq));
    }

    /// The leased messages whose lease ended by `now_ms`, oldest lease first.
    pub(super) fn lapsed(&self, now_ms: u64) -> Vec<u64> {
        self.leases
            .iter()
            .take_while(|(until, _)| *until <= now_ms)
            .map(|(_, seq)| *seq)
            .collect()
    }

    /// Check the indexes against the messages (the simulator's invariant).
    pub(super) fn check(&self) -> Result<(), String> {
        let mut bytes = 0;
        let mut visible = 0;
        for (seq, m) in self.messages.iter() {
            bytes += m.size();
            match m.lease {
                Some(l) if !self.leases.contains(&(l.until_ms, *seq)) => {
                    return Err(format!("leased message {seq} not in the lease index"));
                }
                Some(_) if self.visible.contains(seq) => {
                    return Err(format!("message {seq} is both leased and visible"));
                }
                None if !self.visible.contains(seq) => {
                    return Err(format!("visible message {seq} not in the visible index"));
                }
                None => visible += 1,
                Some(_) => {}
            }
            if *seq >= self.next_seq {
                return Err(format!(
                    "message {seq} at or past next_seq {}",
                    self.next_seq
                ));
            }
        }
        let by_key: usize = self.visible_by_key.values().map(SeqSet::len).sum();
        if bytes != self.bytes || visible != self.visible.len() || by_key != visible {
            return Err(format!(
                "counts disagree: bytes {bytes}/{}, visible {visible}/{}/{by_key}",
                self.bytes,
                self.visible.len()
            ));
        }
        if self.leases.len() + visible != self.messages.len() {
            return Err("a lease names no leased message".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(i: u64) -> Message {
        Message {
            key: format!("k{}", i % 7),
            value: i.to_string().into_bytes(),
            field: Field::Value,
            deliveries: 0,
            requeued_at: 0,
            receipt: 0,
            lease: None,
            enqueued_ms: i,
        }
    }

    /// A copy taken for a snapshot shares every chunk; the first write after it copies
    /// the one chunk it touches, not the partition.
    #[test]
    fn a_write_after_a_snapshot_view_copies_one_chunk() {
        let mut p = QueuePartition::default();
        for i in 0..10 * CHUNK {
            p.push(message(i));
        }
        let view = p.clone();
        let shared = |a: &QueuePartition, b: &QueuePartition| {
            a.messages
                .chunks
                .iter()
                .filter(|(k, c)| b.messages.chunks.get(k).is_some_and(|d| Arc::ptr_eq(c, d)))
                .count()
        };
        assert_eq!(shared(&p, &view), 10);
        p.remove(3 * CHUNK + 5);
        assert_eq!(shared(&p, &view), 9, "only the touched chunk was copied");
        let visible_shared = p
            .visible
            .chunks
            .iter()
            .filter(|(k, c)| {
                view.visible
                    .chunks
                    .get(k)
                    .is_some_and(|d| Arc::ptr_eq(c, d))
            })
            .count();
        assert_eq!(visible_shared, 9, "the visible index too");
        let keys_shared = p
            .visible_by_key
            .shards
            .iter()
            .zip(&view.visible_by_key.shards)
            .filter(|(a, b)| Arc::ptr_eq(a, b))
            .count();
        assert_eq!(
            keys_shared,
            KEY_SHARDS - 1,
            "and one shard of the key index"
        );
        assert_eq!(view.messages.len(), 10 * CHUNK as usize);
        assert_eq!(p.messages.len(), 10 * CHUNK as usize - 1);
        assert!(view.messages.get(&(3 * CHUNK + 5)).is_some());
        assert!(p.messages.get(&(3 * CHUNK + 5)).is_none());
        assert_eq!(
            p.messages.keys().copied().collect::<Vec<_>>().len(),
            p.messages.len()
        );
        p.check().expect("indexes agree");
    }
}
