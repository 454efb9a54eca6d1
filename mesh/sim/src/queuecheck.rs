//! The queue checker: what producers and consumers were told, held against DESIGN.md
//! section 6.
//!
//! - every enqueue answered ok is delivered at least once, or is still stored when the
//!   run ends (visible, leased or dead), and it is gone only once acked;
//! - a message acked is never delivered again: no delivery of it has a receipt (the index
//!   of the entry that leased it) above the acked delivery's;
//! - an ack is accepted only for the latest delivery of a message;
//! - first deliveries of one key come in enqueue order (FIFO per key): among messages
//!   whose earliest delivery seen reports `deliveries: 1`, receipt order is enqueue
//!   order;
//! - an enqueue repeating a `dedup_id` is answered with the first message's id, and its
//!   own value is never stored;
//! - a delivery carries the key and value its message was enqueued with.

use mesh_core::services::queue::{Delivery, MsgId};
use std::collections::{BTreeMap, BTreeSet};

/// One message as the producer sent it.
#[derive(Clone, Debug)]
pub(crate) struct Sent {
    pub(crate) key: String,
    pub(crate) value: u64,
    pub(crate) dedup: Option<String>,
}

/// What the clients were told about the queue.
#[derive(Debug, Default)]
pub(crate) struct QueueHistory {
    /// Acknowledged enqueues: message -> (key, value).
    stored: BTreeMap<MsgId, (String, u64)>,
    /// Values that must never be delivered (repeats of a dedup id).
    not_stored: BTreeSet<u64>,
    /// dedup id -> the message it named first.
    dedup: BTreeMap<String, MsgId>,
    /// Every delivery seen: message -> receipts.
    delivered: BTreeMap<MsgId, BTreeSet<u64>>,
    /// Acked: message -> the receipt acked.
    acked: BTreeMap<MsgId, u64>,
    /// Earliest delivery seen per message, by key: (receipt, position in its answer,
    /// its delivery count).
    first: BTreeMap<String, BTreeMap<MsgId, (u64, usize, u32)>>,
    /// Long polls answered with messages.
    pub(crate) polls_woken: u64,
    pub(crate) violation: Option<String>,
}

fn value_of(d: &Delivery) -> Option<u64> {
    std::str::from_utf8(&d.value).ok()?.parse().ok()
}

impl QueueHistory {
    fn fail(&mut self, why: String) {
        if self.violation.is_none() {
            self.violation = Some(why);
        }
    }

    /// An enqueue of `sent` was answered with `ids` (per message: id, duplicate).
    pub(crate) fn enqueued(&mut self, sent: &[Sent], ids: &[(MsgId, bool)]) {
        if sent.len() != ids.len() {
            self.fail(format!(
                "enqueue of {} answered {} ids",
                sent.len(),
                ids.len()
            ));
            return;
        }
        for (m, &(id, duplicate)) in sent.iter().zip(ids) {
            if let Some(d) = &m.dedup {
                match self.dedup.get(d) {
                    Some(first) if *first != id => {
                        self.fail(format!("dedup id {d} stored twice: {first} and {id}"));
                    }
                    Some(_) => {}
                    None if duplicate => {
                        // A retry of this very enqueue may be answered as a repeat of
                        // the first time it applied; that id is the message.
                        self.dedup.insert(d.clone(), id);
                    }
                    None => {
                        self.dedup.insert(d.clone(), id);
                    }
                }
            }
            if duplicate {
                if self.stored.get(&id).is_none_or(|(_, v)| *v != m.value) {
                    self.not_stored.insert(m.value);
                }
            } else {
                self.stored.insert(id, (m.key.clone(), m.value));
            }
        }
    }

    /// Messages were delivered to a consumer.
    pub(crate) fn delivered(&mut self, messages: &[Delivery], waited: bool) {
        if waited && !messages.is_empty() {
            self.polls_woken += 1;
        }
        for (pos, d) in messages.iter().enumerate() {
            let Some(value) = value_of(d) else {
                self.fail(format!("message {} carries a value that is not ours", d.id));
                continue;
            };
            if self.not_stored.contains(&value) {
                self.fail(format!(
                    "value {value} of a repeated dedup id was delivered"
                ));
            }
            if let Some((key, v)) = self.stored.get(&d.id) {
                if *key != d.key || *v != value {
                    self.fail(format!(
                        "message {} delivered as ({}, {value}), enqueued as ({key}, {v})",
                        d.id, d.key
                    ));
                }
            }
            if let Some(&r) = self.acked.get(&d.id) {
                if d.receipt > r {
                    self.fail(format!(
                        "message {} delivered (receipt {}) after its ack of receipt {r}",
                        d.id, d.receipt
                    ));
                }
            }
            self.delivered.entry(d.id).or_default().insert(d.receipt);
            let first = self.first.entry(d.key.clone()).or_default();
            let e = first.entry(d.id).or_insert((d.receipt, pos, d.deliveries));
            if (d.receipt, pos) < (e.0, e.1) {
                *e = (d.receipt, pos, d.deliveries);
            }
        }
    }

    /// An ack of `id` under `receipt` was accepted.
    pub(crate) fn acked(&mut self, id: MsgId, receipt: u64) {
        let latest = self
            .delivered
            .get(&id)
            .and_then(|r| r.last().copied())
            .unwrap_or(0);
        if latest > receipt {
            self.fail(format!(
                "ack of {id} under receipt {receipt} accepted after a later delivery ({latest})"
            ));
        }
        self.acked.insert(id, receipt);
    }

    /// The end of a run: `left` holds every message still stored on the most advanced
    /// replica.
    pub(crate) fn check(&self, left: &BTreeSet<MsgId>) -> Result<(), String> {
        if let Some(v) = &self.violation {
            return Err(v.clone());
        }
        for (id, (key, value)) in &self.stored {
            if !self.delivered.contains_key(id) && !left.contains(id) {
                return Err(format!(
                    "message {id} ({key}, {value}) was enqueued with ok, never delivered, and is gone"
                ));
            }
        }
        // At least once *until acked*: a message is acked, or still stored.
        for (id, (key, value)) in &self.stored {
            if !self.acked.contains_key(id) && !left.contains(id) {
                return Err(format!(
                    "message {id} ({key}, {value}) was enqueued with ok, never acked, and is gone"
                ));
            }
        }
        for id in self.acked.keys() {
            if left.contains(id) {
                return Err(format!("message {id} was acked and is still stored"));
            }
        }
        for (key, firsts) in &self.first {
            // In receipt order, the sequence numbers (enqueue order) must rise.
            // Only a message whose earliest delivery seen says it was its first counts: a
            // delivery whose caller gave up happened unseen (and a requeue restarts the
            // count).
            // Order is (receipt, position in the answer): one dequeue's messages share a
            // receipt, and their order in the answer is the order they were leased.
            let mut order: Vec<((u64, usize), u64)> = firsts
                .iter()
                .filter(|(_, (_, _, n))| *n == 1)
                .map(|(id, (r, pos, _))| ((*r, *pos), id.seq))
                .collect();
            order.sort_unstable();
            if let Some(w) = order.windows(2).find(|w| w[1].1 < w[0].1) {
                return Err(format!(
                    "key {key}: first delivery of seq {} ({:?}) came after seq {} ({:?})",
                    w[1].1, w[1].0, w[0].1, w[0].0
                ));
            }
        }
        Ok(())
    }

    /// Counts for the coverage line: (stored, delivered, acked).
    pub(crate) fn counts(&self) -> (usize, usize, usize) {
        (self.stored.len(), self.delivered.len(), self.acked.len())
    }
}
