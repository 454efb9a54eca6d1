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

/// A lease in progress.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Lease {
    /// Lock time at which the message becomes visible again.
    pub(super) until_ms: u64,
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
    pub(super) messages: BTreeMap<u64, Message>,
    /// Visible messages, oldest first.
    visible: BTreeSet<u64>,
    /// Visible messages per key, oldest first.
    visible_by_key: BTreeMap<String, BTreeSet<u64>>,
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
        self.visible_by_key
            .entry(key.to_owned())
            .or_default()
            .insert(seq);
    }

    fn unmark_visible(&mut self, seq: u64, key: &str) {
        self.visible.remove(&seq);
        if let Some(set) = self.visible_by_key.get_mut(key) {
            set.remove(&seq);
            if set.is_empty() {
                self.visible_by_key.remove(key);
            }
        }
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
        for (seq, m) in &self.messages {
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
        let by_key: usize = self.visible_by_key.values().map(BTreeSet::len).sum();
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
