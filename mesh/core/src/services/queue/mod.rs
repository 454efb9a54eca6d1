//! `QueueSet`: named durable queues, partitioned by consistent hashing, with leased
//! (at-least-once) delivery, dead letters and deduplication, as a deterministic state
//! machine applied from the Raft log.
//!
//! ```text
//!   enq ──> visible ──deq──> leased ──ack──────────────────────> gone
//!             ^                │ nack, or the lease ran out
//!             │                ├── deliveries < max_deliveries ─> visible again
//!             └──requeue── dead letter <── deliveries = max ────┘
//! ```
//! A key hashes onto one partition ([`HashRing`]); a partition delivers its oldest
//! visible message first, so first deliveries are FIFO per key. A dequeue without a key
//! takes from the partitions in turn. Every delivery has a receipt (the index of the
//! entry that leased it): an ack, nack or extend naming an older delivery of a message
//! that was delivered again is refused as stale, so a slow consumer never acks away
//! another consumer's lease.
//!
//! Time is lock time (DESIGN.md section 6), handed in with every command: leases, long
//! polls and the deduplication window run on it, never on a node's clock. A dequeue that
//! waits gets a [`WaitId`] (the index of its entry); whatever later makes a message
//! visible (an enqueue, a nack, a lease that ran out, a requeue) hands it to the oldest
//! waiter in the same apply, and a [`QueueEvent`] names the wait.

mod partition;
pub mod ring;
#[cfg(test)]
mod tests;

use crate::raft::LogIndex;
use partition::{Message, QueuePartition};
pub use ring::HashRing;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;

/// Names one waiting dequeue: the log index of the entry that queued it.
pub type WaitId = LogIndex;

/// Partitions of a queue created without a count.
pub const DEFAULT_PARTITIONS: u32 = 16;
/// Most partitions of one queue.
pub const MAX_PARTITIONS: u32 = 1024;
/// Lease of a delivery when the dequeue names none.
pub const DEFAULT_VISIBILITY_MS: u64 = 30_000;
/// Longest lease (12 hours, as SQS).
pub const MAX_VISIBILITY_MS: u64 = 12 * 3600 * 1000;
/// Deliveries after which a message that is still not acked becomes a dead letter.
pub const DEFAULT_MAX_DELIVERIES: u32 = 5;
/// Window in which a repeated `dedup_id` is stored once (JetStream's default).
pub const DEFAULT_DEDUP_WINDOW_MS: u64 = 120_000;
/// Longest dedup window (a day).
pub const MAX_DEDUP_WINDOW_MS: u64 = 24 * 3600 * 1000;
/// Dedup ids remembered per queue at most; past it an enqueue with a new one is refused
/// (429) rather than the window silently shortened.
pub const MAX_DEDUP_IDS: usize = 1_000_000;
/// Dedup ids remembered over all queues at most (each is up to [`MAX_KEY_BYTES`]).
pub const MAX_TOTAL_DEDUP_IDS: usize = 4_000_000;
/// The highest the caps over all queues may be set to (`POST /queue/limits`): a node
/// holds about 520 bytes of memory per queued message besides its value.
pub const CEILING_MAX_MESSAGES: u64 = 50_000_000;
/// The highest the byte cap over all queues may be set to.
pub const CEILING_MAX_BYTES: u64 = 32 << 30;
/// Longest long poll.
pub const MAX_WAIT_MS: u64 = 60_000;
/// Most messages one dequeue leases, or one enqueue or ack carries.
pub const MAX_BATCH: usize = 1000;
/// Longest key, queue name or dedup id, in bytes.
pub const MAX_KEY_BYTES: usize = 256;
/// Largest value (its JSON text), in bytes.
pub const MAX_VALUE_BYTES: usize = 256 * 1024;
/// Most queues.
pub const MAX_QUEUES: usize = 1024;
/// Most waiting dequeues per queue.
pub const MAX_WAITERS: usize = 10_000;
/// Messages (live and dead) kept over all queues, unless configured.
pub const DEFAULT_MAX_MESSAGES: u64 = 5_000_000;
/// Bytes of keys and values kept over all queues, unless configured.
pub const DEFAULT_MAX_BYTES: u64 = 2 << 30;
/// Name of the queue a request that names none uses.
pub const DEFAULT_QUEUE: &str = "default";

/// A message, named by its partition and its sequence number there (`"3-17"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct MsgId {
    /// Partition.
    pub partition: u32,
    /// Sequence number within the partition.
    pub seq: u64,
}

impl fmt::Display for MsgId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.partition, self.seq)
    }
}

impl std::str::FromStr for MsgId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("msg_id {s:?} is not of the form PARTITION-SEQ");
        let (p, q) = s.split_once('-').ok_or_else(bad)?;
        Ok(Self {
            partition: p.parse().map_err(|_| bad())?,
            seq: q.parse().map_err(|_| bad())?,
        })
    }
}

/// Which field name the producer used for the value (answered back the same way).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Field {
    /// `value` (the seed's API).
    #[default]
    Value,
    /// `body` (other implementations of the same API).
    Body,
}

/// Settings of one queue, fixed when it is created (the partition count) or changed by
/// a later `Configure` (the rest).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSettings {
    /// Partitions (fixed at creation; see docs/queue.md for the migration). 0 in a
    /// `Configure`: keep the queue's count, or the default for a new queue.
    pub partitions: u32,
    /// Lease of a delivery when the dequeue names none.
    pub visibility_ms: u64,
    /// Deliveries before a message becomes a dead letter.
    pub max_deliveries: u32,
    /// Deduplication window.
    pub dedup_window_ms: u64,
    /// Messages (live and dead) kept in this queue at most.
    pub max_messages: u64,
    /// Bytes kept in this queue at most.
    pub max_bytes: u64,
}

impl Default for QueueSettings {
    fn default() -> Self {
        Self {
            partitions: DEFAULT_PARTITIONS,
            visibility_ms: DEFAULT_VISIBILITY_MS,
            max_deliveries: DEFAULT_MAX_DELIVERIES,
            dedup_window_ms: DEFAULT_DEDUP_WINDOW_MS,
            max_messages: DEFAULT_MAX_MESSAGES,
            max_bytes: DEFAULT_MAX_BYTES,
        }
    }
}

impl QueueSettings {
    fn check(&self) -> Result<(), String> {
        if self.partitions == 0 || self.partitions > MAX_PARTITIONS {
            return Err(format!("partitions must be 1..={MAX_PARTITIONS}"));
        }
        if self.visibility_ms == 0 || self.visibility_ms > MAX_VISIBILITY_MS {
            return Err(format!("visibility_ms must be 1..={MAX_VISIBILITY_MS}"));
        }
        if self.dedup_window_ms > MAX_DEDUP_WINDOW_MS {
            return Err(format!(
                "dedup_window_ms must be at most {MAX_DEDUP_WINDOW_MS}"
            ));
        }
        if self.max_deliveries == 0 {
            return Err("max_deliveries must be at least 1".into());
        }
        if self.max_messages == 0 || self.max_bytes == 0 {
            return Err("max_messages and max_bytes must be positive".into());
        }
        Ok(())
    }
}

/// One message to enqueue.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewMessage {
    /// Key (picks the partition; FIFO per key).
    pub key: String,
    /// The value's JSON text.
    pub value: Vec<u8>,
    /// The field name the producer used.
    pub field: Field,
    /// Stored once within the dedup window.
    pub dedup_id: Option<String>,
}

/// A queue command.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum QueueCommand {
    /// Create a queue with these settings (an existing queue: its settings other than
    /// the partition count are changed).
    Configure {
        /// Queue.
        queue: String,
        /// Settings.
        settings: QueueSettings,
    },
    /// Store messages (all or none).
    Enqueue {
        /// Queue (created with the defaults on first use).
        queue: String,
        /// Messages, stored in this order.
        messages: Vec<NewMessage>,
    },
    /// Lease up to `max` visible messages (of `key`, if given).
    Dequeue {
        /// Queue.
        queue: String,
        /// Only messages of this key.
        key: Option<String>,
        /// Most messages.
        max: u32,
        /// Lease (`None`: the queue's).
        visibility_ms: Option<u64>,
        /// Wait this long for a message when none is visible.
        wait_ms: u64,
    },
    /// Delete delivered messages.
    Ack {
        /// Queue.
        queue: String,
        /// Messages, each with the receipt of the delivery meant (`None`: the latest).
        ids: Vec<(MsgId, Option<u64>)>,
    },
    /// Make a delivered message visible again at once.
    Nack {
        /// Queue.
        queue: String,
        /// Message.
        id: MsgId,
        /// Delivery meant (`None`: the latest).
        receipt: Option<u64>,
    },
    /// Let the lease of a delivered message run on for `visibility_ms` from now.
    Extend {
        /// Queue.
        queue: String,
        /// Message.
        id: MsgId,
        /// Delivery meant (`None`: the latest).
        receipt: Option<u64>,
        /// New lease from now.
        visibility_ms: u64,
    },
    /// Move dead letters back into the queue (`ids` empty: the oldest `max`).
    Requeue {
        /// Queue.
        queue: String,
        /// Dead letters named.
        ids: Vec<MsgId>,
        /// Most moved when none is named.
        max: u32,
    },
    /// Change the caps over all queues (`None`: keep). They are replicated state, not
    /// node flags, so every node refuses the same enqueue; a cap set below what is
    /// stored keeps every message and refuses enqueues until it is under again.
    Limits {
        /// Messages over all queues (dead letters count).
        max_messages: Option<u64>,
        /// Value and key bytes over all queues.
        max_bytes: Option<u64>,
    },
}

/// One delivered message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    /// The message.
    pub id: MsgId,
    /// Its key.
    pub key: String,
    /// Its value's JSON text.
    pub value: Vec<u8>,
    /// The producer's field name.
    pub field: Field,
    /// Deliveries so far, this one included.
    pub deliveries: u32,
    /// Names this delivery (unique: a replicated counter of leases).
    pub receipt: u64,
}

/// The reply to a queue command.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum QueueReply {
    /// Stored; per message its id and whether it was a repeat of a dedup id.
    Enqueued {
        /// (id, duplicate) per message, in order.
        ids: Vec<(MsgId, bool)>,
    },
    /// Leased (empty: nothing visible, and the caller would not wait, or the wait ran
    /// out).
    Delivered {
        /// The deliveries, oldest first per partition.
        messages: Vec<Delivery>,
    },
    /// Waiting; a [`QueueEvent`] naming `wait` follows unless it is withdrawn first.
    Waiting {
        /// The waiting dequeue.
        wait: WaitId,
    },
    /// Acks applied; `missing` names unknown or already acked ids, `stale` ids whose
    /// named delivery was superseded by a later one, `undelivered` ids of messages no
    /// consumer has received yet (none of these was acked).
    Acked {
        /// Acked.
        acked: u32,
        /// Unknown ids.
        missing: Vec<MsgId>,
        /// Stale receipts.
        stale: Vec<MsgId>,
        /// Never delivered: an ack is for a message a consumer received, so an id that
        /// names a waiting message (a typo, an id computed by hand) must not delete it.
        undelivered: Vec<MsgId>,
    },
    /// Nacked or extended.
    Done,
    /// Unknown (or already acked) message.
    NotFound {
        /// The id.
        id: MsgId,
    },
    /// The message is not leased (never delivered, or its lease ran out).
    NotLeased {
        /// The id.
        id: MsgId,
    },
    /// The receipt names a delivery superseded by a later one.
    StaleReceipt {
        /// The id.
        id: MsgId,
        /// The receipt of the latest delivery.
        latest: u64,
    },
    /// Dead letters moved back.
    Requeued {
        /// How many.
        count: u32,
    },
    /// The caps over all queues now, and what they hold.
    Limits {
        /// Messages at most.
        max_messages: u64,
        /// Bytes at most.
        max_bytes: u64,
        /// Messages stored.
        messages: u64,
        /// Bytes stored.
        bytes: u64,
    },
    /// Created or reconfigured.
    Configured {
        /// The settings now.
        settings: QueueSettings,
    },
    /// A bound was reached; nothing was stored.
    Full {
        /// Which bound (`queue_full`, `too_many_queues`, `too_many_waiters`).
        code: String,
        /// The bound, explained.
        message: String,
    },
    /// The command is invalid.
    Invalid(String),
}

impl QueueReply {
    /// Whether the call that got this reply still waits for its outcome.
    pub fn is_waiting(&self) -> bool {
        matches!(self, Self::Waiting { .. })
    }
}

/// What became of a waiting dequeue as a side effect of another command.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum QueueEvent {
    /// Messages were leased to it.
    Delivered {
        /// The wait.
        wait: WaitId,
        /// The deliveries.
        messages: Vec<Delivery>,
    },
    /// Its wait ran out with nothing visible.
    TimedOut {
        /// The wait.
        wait: WaitId,
    },
}

/// A waiting dequeue.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct DeqWait {
    key: Option<String>,
    max: u32,
    visibility_ms: u64,
    until_ms: u64,
}

/// A dead letter: a message delivered `max_deliveries` times without an ack.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct DeadLetter {
    message: Message,
    died_ms: u64,
}

/// One named queue.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Queue {
    settings: QueueSettings,
    /// Shared with snapshot views until written (copy on write): a snapshot of a
    /// million messages costs the loop a pointer copy per partition, and a write after
    /// it copies only the partition it touches.
    partitions: Vec<Arc<QueuePartition>>,
    dead: BTreeMap<MsgId, DeadLetter>,
    dead_bytes: u64,
    /// dedup id -> (first message, window end).
    dedup: BTreeMap<String, (MsgId, u64)>,
    dedup_ends: BTreeSet<(u64, String)>,
    waiters: BTreeMap<WaitId, DeqWait>,
    wait_ends: BTreeSet<(u64, WaitId)>,
    /// The partition a dequeue without a key looks at first.
    cursor: u32,
}

/// Counters over all queues, for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueStats {
    /// Messages stored (not counting dedup repeats).
    pub enqueued: u64,
    /// Messages acked.
    pub acked: u64,
    /// Deliveries after the first.
    pub redeliveries: u64,
    /// Messages that became dead letters.
    pub dead_lettered: u64,
    /// Enqueues answered with an earlier message by their dedup id.
    pub deduplicated: u64,
    /// Leases made; the latest is the receipt of the newest delivery.
    pub receipts: u64,
}

/// One partition, for `GET /queue/stats`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionView {
    /// Partition.
    pub partition: u32,
    /// Visible messages.
    pub depth: u64,
    /// Leased messages.
    pub inflight: u64,
    /// Age of the oldest live message in lock time (0: none).
    pub oldest_age_ms: u64,
    /// Share of the hash ring this partition owns, in parts per million.
    pub ring_share_ppm: u32,
}

/// One queue, for `GET /queue/stats`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueView {
    /// Name.
    pub name: String,
    /// Settings.
    pub settings: QueueSettings,
    /// Per partition.
    pub partitions: Vec<PartitionView>,
    /// Dead letters.
    pub dead: u64,
    /// Waiting dequeues.
    pub waiters: u64,
    /// Ring points per partition.
    pub vnodes: u32,
}

/// A dead letter, for `GET /queue/dead`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadView {
    /// The message.
    pub id: MsgId,
    /// Key.
    pub key: String,
    /// Value's JSON text.
    pub value: Vec<u8>,
    /// Producer's field name.
    pub field: Field,
    /// Deliveries it had.
    pub deliveries: u32,
    /// Lock time it died.
    pub died_ms: u64,
}

/// Every queue.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSet {
    queues: BTreeMap<String, Queue>,
    /// Bounds over all queues.
    max_messages: u64,
    max_bytes: u64,
    messages: u64,
    bytes: u64,
    stats: QueueStats,
    now_ms: u64,
}

impl Default for QueueSet {
    fn default() -> Self {
        Self::with_limits(DEFAULT_MAX_MESSAGES, DEFAULT_MAX_BYTES)
    }
}

fn check_name(what: &str, name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err(format!("{what} is empty"));
    }
    if name.len() > MAX_KEY_BYTES {
        return Err(format!("{what} is over {MAX_KEY_BYTES} bytes"));
    }
    Ok(())
}

/// Whether `new_ids` more dedup ids fit in queue `name` (which has `in_queue`) and over
/// all queues (`in_all`).
fn dedup_room(
    name: &str,
    in_queue: usize,
    in_all: usize,
    new_ids: usize,
) -> Result<(), QueueReply> {
    if new_ids > 0 && in_queue + new_ids > MAX_DEDUP_IDS {
        return Err(QueueReply::Full {
            code: "queue_full".into(),
            message: format!("queue {name} remembers {MAX_DEDUP_IDS} dedup ids within its window"),
        });
    }
    if new_ids > 0 && in_all + new_ids > MAX_TOTAL_DEDUP_IDS {
        return Err(QueueReply::Full {
            code: "queue_full".into(),
            message: format!(
                "the queues remember {MAX_TOTAL_DEDUP_IDS} dedup ids within their windows"
            ),
        });
    }
    Ok(())
}

/// Check messages to enqueue before anything is stored.
fn check_new(messages: &[NewMessage]) -> Result<(), String> {
    if messages.is_empty() || messages.len() > MAX_BATCH {
        return Err(format!("an enqueue carries 1..={MAX_BATCH} messages"));
    }
    for m in messages {
        check_name("key", &m.key)?;
        if m.value.len() > MAX_VALUE_BYTES {
            return Err(format!("value is over {MAX_VALUE_BYTES} bytes"));
        }
        if let Some(d) = &m.dedup_id {
            check_name("dedup_id", d)?;
        }
    }
    Ok(())
}

fn check_queue_name(name: &str) -> Result<(), String> {
    check_name("queue", name)?;
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
    {
        return Err("queue names use letters, digits and - _ . :".into());
    }
    Ok(())
}

impl Queue {
    /// The queue's ring: derived from the partition count alone, so it is neither
    /// stored nor shipped in snapshots.
    fn ring(&self) -> Arc<HashRing> {
        ring::shared(self.settings.partitions)
    }

    fn new(settings: QueueSettings) -> Self {
        Self {
            partitions: (0..settings.partitions)
                .map(|_| Arc::new(QueuePartition::default()))
                .collect(),
            settings,
            dead: BTreeMap::new(),
            dead_bytes: 0,
            dedup: BTreeMap::new(),
            dedup_ends: BTreeSet::new(),
            waiters: BTreeMap::new(),
            wait_ends: BTreeSet::new(),
            cursor: 0,
        }
    }

    fn live_messages(&self) -> u64 {
        self.partitions
            .iter()
            .map(|p| p.messages.len() as u64)
            .sum::<u64>()
            + self.dead.len() as u64
    }

    fn live_bytes(&self) -> u64 {
        self.partitions.iter().map(|p| p.bytes).sum::<u64>() + self.dead_bytes
    }

    /// Lease up to `max` messages (of `key`) taking from the partitions in turn.
    fn lease(
        &mut self,
        key: Option<&str>,
        max: u32,
        until_ms: u64,
        stats: &mut QueueStats,
    ) -> Vec<Delivery> {
        // Every lease gets a receipt of its own (two leases can apply in one entry: a
        // lease that ran out handed on, then the command's own).
        stats.receipts += 1;
        let receipt = stats.receipts;
        let mut out = Vec::new();
        let max = max as usize;
        if let Some(k) = key {
            let p = self.ring().partition(k);
            if let Some(part) = self.partitions.get_mut(p as usize).map(Arc::make_mut) {
                while out.len() < max {
                    let Some(d) = part.lease_oldest(p, Some(k), until_ms, receipt) else {
                        break;
                    };
                    out.push(d);
                }
            }
        } else {
            let n = self.partitions.len() as u32;
            // Rounds over the partitions, one message from each that has one, so no
            // partition starves another.
            'rounds: while out.len() < max {
                let mut took = false;
                for i in 0..n {
                    let p = (self.cursor + i) % n;
                    // Look before writing: a write copies a partition a snapshot shares.
                    if !self
                        .partitions
                        .get(p as usize)
                        .is_some_and(|x| x.has_visible(None))
                    {
                        continue;
                    }
                    let Some(part) = self.partitions.get_mut(p as usize).map(Arc::make_mut) else {
                        continue;
                    };
                    if let Some(d) = part.lease_oldest(p, None, until_ms, receipt) {
                        out.push(d);
                        took = true;
                        if out.len() >= max {
                            self.cursor = (p + 1) % n;
                            break 'rounds;
                        }
                    }
                }
                if !took {
                    break;
                }
            }
        }
        stats.redeliveries += out.iter().filter(|d| d.deliveries > 1).count() as u64;
        out
    }

    fn has_visible(&self, key: Option<&str>) -> bool {
        match key {
            Some(k) => self
                .partitions
                .get(self.ring().partition(k) as usize)
                .is_some_and(|p| p.has_visible(Some(k))),
            None => self.partitions.iter().any(|p| p.has_visible(None)),
        }
    }

    /// End a delivery without an ack: visible again, or a dead letter after the last.
    fn end_delivery(&mut self, p: u32, seq: u64, now_ms: u64, stats: &mut QueueStats) {
        let Some(part) = self.partitions.get_mut(p as usize).map(Arc::make_mut) else {
            return;
        };
        let Some(m) = part.messages.get(&seq) else {
            return;
        };
        if m.deliveries - m.requeued_at.min(m.deliveries) >= self.settings.max_deliveries {
            if let Some(mut message) = part.remove(seq) {
                message.lease = None;
                self.dead_bytes += message.size();
                self.dead.insert(
                    MsgId { partition: p, seq },
                    DeadLetter {
                        message,
                        died_ms: now_ms,
                    },
                );
                stats.dead_lettered += 1;
            }
        } else {
            part.end_lease(seq);
        }
    }

    /// Store messages that fit: per message its id and whether it repeated a dedup id;
    /// then how many were stored and their bytes.
    fn store(&mut self, messages: Vec<NewMessage>, now: u64) -> (Vec<(MsgId, bool)>, u64, u64) {
        let window = self.settings.dedup_window_ms;
        let mut ids = Vec::with_capacity(messages.len());
        let (mut stored, mut bytes) = (0u64, 0u64);
        for m in messages {
            if let Some(&(first, _)) = m.dedup_id.as_ref().and_then(|d| self.dedup.get(d)) {
                ids.push((first, true));
                continue;
            }
            let p = self.ring().partition(&m.key);
            let Some(part) = self.partitions.get_mut(p as usize).map(Arc::make_mut) else {
                continue;
            };
            let message = Message {
                key: m.key,
                value: m.value,
                field: m.field,
                deliveries: 0,
                requeued_at: 0,
                receipt: 0,
                lease: None,
                enqueued_ms: now,
            };
            bytes += message.size();
            let seq = part.push(message);
            let id = MsgId { partition: p, seq };
            if let Some(d) = m.dedup_id {
                let end = now.saturating_add(window);
                self.dedup_ends.insert((end, d.clone()));
                self.dedup.insert(d, (id, end));
            }
            stored += 1;
            ids.push((id, false));
        }
        (ids, stored, bytes)
    }

    fn next_deadline_ms(&self) -> Option<u64> {
        let leases = self
            .partitions
            .iter()
            .filter_map(|p| p.next_lease_end())
            .min();
        let waits = self.wait_ends.first().map(|(until, _)| *until);
        [leases, waits].into_iter().flatten().min()
    }
}

impl QueueSet {
    /// An empty set bounded at `max_messages` messages and `max_bytes` bytes overall.
    pub fn with_limits(max_messages: u64, max_bytes: u64) -> Self {
        Self {
            queues: BTreeMap::new(),
            max_messages,
            max_bytes,
            messages: 0,
            bytes: 0,
            stats: QueueStats::default(),
            now_ms: 0,
        }
    }

    /// Counters for metrics.
    pub fn stats(&self) -> &QueueStats {
        &self.stats
    }

    /// The earliest lock time at which a lease or a wait runs out.
    pub fn next_deadline_ms(&self) -> Option<u64> {
        self.queues
            .values()
            .filter_map(Queue::next_deadline_ms)
            .min()
    }

    /// (visible, leased, dead) over all queues.
    pub fn counts(&self) -> (u64, u64, u64) {
        let mut c = (0, 0, 0);
        for q in self.queues.values() {
            for p in &q.partitions {
                c.0 += p.visible_count() as u64;
                c.1 += p.leased_count() as u64;
            }
            c.2 += q.dead.len() as u64;
        }
        c
    }

    /// Apply one command at `index`, at lock time `now_ms`.
    pub fn apply(
        &mut self,
        index: LogIndex,
        now_ms: u64,
        command: QueueCommand,
    ) -> (QueueReply, Vec<QueueEvent>) {
        let mut events = self.advance(now_ms);
        let reply = match command {
            QueueCommand::Configure { queue, settings } => self.configure(queue, settings),
            QueueCommand::Enqueue { queue, messages } => {
                self.enqueue(&queue, messages, &mut events)
            }
            QueueCommand::Dequeue {
                queue,
                key,
                max,
                visibility_ms,
                wait_ms,
            } => self.dequeue(index, queue, key, max, visibility_ms, wait_ms),
            QueueCommand::Ack { queue, ids } => self.ack(&queue, &ids),
            QueueCommand::Nack { queue, id, receipt } => {
                self.nack(&queue, id, receipt, &mut events)
            }
            QueueCommand::Extend {
                queue,
                id,
                receipt,
                visibility_ms,
            } => self.extend(&queue, id, receipt, visibility_ms),
            QueueCommand::Requeue { queue, ids, max } => {
                self.requeue(&queue, &ids, max, &mut events)
            }
            QueueCommand::Limits {
                max_messages,
                max_bytes,
            } => self.set_limits(max_messages, max_bytes),
        };
        (reply, events)
    }

    /// Advance lock time to `now_ms`: leases that ran out end, waits that ran out are
    /// answered empty, dedup windows close.
    pub fn advance(&mut self, now_ms: u64) -> Vec<QueueEvent> {
        self.now_ms = self.now_ms.max(now_ms);
        let now = self.now_ms;
        let mut events = Vec::new();
        let stats = &mut self.stats;
        for queue in self.queues.values_mut() {
            while let Some((end, id)) = queue.dedup_ends.first().cloned() {
                if end > now {
                    break;
                }
                queue.dedup_ends.remove(&(end, id.clone()));
                queue.dedup.remove(&id);
            }
            let mut freed = false;
            for p in 0..queue.partitions.len() as u32 {
                let lapsed = queue.partitions[p as usize].lapsed(now);
                for seq in lapsed {
                    queue.end_delivery(p, seq, now, stats);
                    freed = true;
                }
            }
            while let Some(&(end, wait)) = queue.wait_ends.first() {
                if end > now {
                    break;
                }
                queue.wait_ends.remove(&(end, wait));
                queue.waiters.remove(&wait);
                events.push(QueueEvent::TimedOut { wait });
            }
            if freed {
                queue.serve_waiters_at(now, stats, &mut events);
            }
        }
        // Dead letters stay counted; leases that ended changed no totals.
        events
    }

    fn set_limits(&mut self, max_messages: Option<u64>, max_bytes: Option<u64>) -> QueueReply {
        if max_messages == Some(0) || max_bytes == Some(0) {
            return QueueReply::Invalid("a cap over all queues is at least 1".into());
        }
        if max_messages.is_some_and(|m| m > CEILING_MAX_MESSAGES)
            || max_bytes.is_some_and(|b| b > CEILING_MAX_BYTES)
        {
            return QueueReply::Invalid(format!(
                "the caps over all queues are at most {CEILING_MAX_MESSAGES} messages and {CEILING_MAX_BYTES} bytes"
            ));
        }
        self.max_messages = max_messages.unwrap_or(self.max_messages);
        self.max_bytes = max_bytes.unwrap_or(self.max_bytes);
        QueueReply::Limits {
            max_messages: self.max_messages,
            max_bytes: self.max_bytes,
            messages: self.messages,
            bytes: self.bytes,
        }
    }

    fn configure(&mut self, name: String, mut settings: QueueSettings) -> QueueReply {
        // Partitions 0: keep the queue's count (or the default for a new queue).
        if settings.partitions == 0 {
            settings.partitions = self
                .queues
                .get(&name)
                .map_or(DEFAULT_PARTITIONS, |q| q.settings.partitions);
        }
        if let Err(e) = check_queue_name(&name).and_then(|()| settings.check()) {
            return QueueReply::Invalid(e);
        }
        match self.queues.get_mut(&name) {
            Some(q) => {
                if settings.partitions != q.settings.partitions {
                    return QueueReply::Invalid(format!(
                        "queue {name} has {} partitions; the count is fixed when a queue is created (see docs/queue.md for moving to a new queue)",
                        q.settings.partitions
                    ));
                }
                q.settings = settings;
                QueueReply::Configured { settings }
            }
            None => {
                if self.queues.len() >= MAX_QUEUES {
                    return QueueReply::Full {
                        code: "too_many_queues".into(),
                        message: format!("at most {MAX_QUEUES} queues"),
                    };
                }
                self.queues.insert(name, Queue::new(settings));
                QueueReply::Configured { settings }
            }
        }
    }

    fn enqueue(
        &mut self,
        name: &str,
        messages: Vec<NewMessage>,
        events: &mut Vec<QueueEvent>,
    ) -> QueueReply {
        if let Err(e) = check_new(&messages) {
            return QueueReply::Invalid(e);
        }
        let now = self.now_ms;
        let (total_messages, total_bytes) = (self.messages, self.bytes);
        let (max_messages, max_bytes) = (self.max_messages, self.max_bytes);
        // Only an enqueue that names dedup ids pays for counting them (over at most
        // MAX_QUEUES queues).
        let total_dedup: usize = if messages.iter().any(|m| m.dedup_id.is_some()) {
            self.queues.values().map(|q| q.dedup.len()).sum()
        } else {
            0
        };
        let queue = match Self::queue_entry(&mut self.queues, name) {
            Ok(q) => q,
            Err(reply) => return reply,
        };
        // Which messages are new, and whether they fit: all or none.
        let mut fresh_ids: BTreeSet<&str> = BTreeSet::new();
        let mut add = (0u64, 0u64);
        for m in &messages {
            let repeat = m
                .dedup_id
                .as_deref()
                .is_some_and(|d| queue.dedup.contains_key(d) || !fresh_ids.insert(d));
            if !repeat {
                add.0 += 1;
                add.1 += (m.key.len() + m.value.len()) as u64;
            }
        }
        let new_ids = fresh_ids.len();
        if let Err(full) = dedup_room(name, queue.dedup.len(), total_dedup, new_ids) {
            return full;
        }
        let (queue_messages, queue_bytes) = (queue.live_messages(), queue.live_bytes());
        if queue_messages + add.0 > queue.settings.max_messages
            || queue_bytes + add.1 > queue.settings.max_bytes
        {
            return QueueReply::Full {
                code: "queue_full".into(),
                message: format!(
                    "queue {name} holds {queue_messages} messages, {queue_bytes} bytes (limits {}, {})",
                    queue.settings.max_messages, queue.settings.max_bytes
                ),
            };
        }
        if total_messages + add.0 > max_messages || total_bytes + add.1 > max_bytes {
            return QueueReply::Full {
                code: "queue_full".into(),
                message: format!(
                    "the queues hold {total_messages} messages, {total_bytes} bytes (limits {max_messages}, {max_bytes})"
                ),
            };
        }
        let (ids, stored, stored_bytes) = queue.store(messages, now);
        let deduplicated = ids.len() as u64 - stored;
        queue.serve_waiters_at(now, &mut self.stats, events);
        self.messages += stored;
        self.bytes += stored_bytes;
        self.stats.enqueued += stored;
        self.stats.deduplicated += deduplicated;
        QueueReply::Enqueued { ids }
    }

    fn dequeue(
        &mut self,
        index: LogIndex,
        name: String,
        key: Option<String>,
        max: u32,
        visibility_ms: Option<u64>,
        wait_ms: u64,
    ) -> QueueReply {
        if max == 0 || max as usize > MAX_BATCH {
            return QueueReply::Invalid(format!("max must be 1..={MAX_BATCH}"));
        }
        if let Some(k) = &key {
            if let Err(e) = check_name("key", k) {
                return QueueReply::Invalid(e);
            }
        }
        if visibility_ms.is_some_and(|v| v == 0 || v > MAX_VISIBILITY_MS) {
            return QueueReply::Invalid(format!("visibility_ms must be 1..={MAX_VISIBILITY_MS}"));
        }
        if wait_ms > MAX_WAIT_MS {
            return QueueReply::Invalid(format!("wait_ms must be at most {MAX_WAIT_MS}"));
        }
        let now = self.now_ms;
        if wait_ms == 0 && !self.queues.contains_key(&name) {
            if let Err(e) = check_queue_name(&name) {
                return QueueReply::Invalid(e);
            }
            return QueueReply::Delivered {
                messages: Vec::new(),
            };
        }
        let stats = &mut self.stats;
        let queue = match Self::queue_entry(&mut self.queues, &name) {
            Ok(q) => q,
            Err(reply) => return reply,
        };
        let visibility = visibility_ms.unwrap_or(queue.settings.visibility_ms);
        let until = now.saturating_add(visibility);
        let messages = queue.lease(key.as_deref(), max, until, stats);
        if !messages.is_empty() || wait_ms == 0 {
            return QueueReply::Delivered { messages };
        }
        if queue.waiters.len() >= MAX_WAITERS {
            return QueueReply::Full {
                code: "too_many_waiters".into(),
                message: format!("queue {name} has {MAX_WAITERS} waiting dequeues"),
            };
        }
        let until_ms = now.saturating_add(wait_ms);
        queue.waiters.insert(
            index,
            DeqWait {
                key,
                max,
                visibility_ms: visibility,
                until_ms,
            },
        );
        queue.wait_ends.insert((until_ms, index));
        QueueReply::Waiting { wait: index }
    }

    /// The queue `name`, created with the defaults if it does not exist.
    fn queue_entry<'a>(
        queues: &'a mut BTreeMap<String, Queue>,
        name: &str,
    ) -> Result<&'a mut Queue, QueueReply> {
        if let Err(e) = check_queue_name(name) {
            return Err(QueueReply::Invalid(e));
        }
        if !queues.contains_key(name) {
            if queues.len() >= MAX_QUEUES {
                return Err(QueueReply::Full {
                    code: "too_many_queues".into(),
                    message: format!("at most {MAX_QUEUES} queues"),
                });
            }
            queues.insert(name.to_owned(), Queue::new(QueueSettings::default()));
        }
        queues
            .get_mut(name)
            .ok_or_else(|| QueueReply::Invalid("queue vanished".into()))
    }

    fn ack(&mut self, name: &str, ids: &[(MsgId, Option<u64>)]) -> QueueReply {
        if ids.is_empty() || ids.len() > MAX_BATCH {
            return QueueReply::Invalid(format!("an ack names 1..={MAX_BATCH} messages"));
        }
        let mut missing = Vec::new();
        let mut stale = Vec::new();
        let mut undelivered = Vec::new();
        let mut acked = 0u32;
        let Some(queue) = self.queues.get_mut(name) else {
            return QueueReply::Acked {
                acked: 0,
                missing: ids.iter().map(|(id, _)| *id).collect(),
                stale,
                undelivered,
            };
        };
        let mut seen = BTreeSet::new();
        for &(id, receipt) in ids {
            // The same id twice in one ack is one ack.
            if !seen.insert(id) {
                continue;
            }
            let Some(part) = queue
                .partitions
                .get_mut(id.partition as usize)
                .map(Arc::make_mut)
            else {
                missing.push(id);
                continue;
            };
            let Some(m) = part.messages.get(&id.seq) else {
                // An ack of a dead letter deletes it.
                match queue.dead.remove(&id) {
                    Some(d) if receipt.is_none_or(|r| r == d.message.receipt) => {
                        let size = d.message.size();
                        queue.dead_bytes -= size;
                        self.messages -= 1;
                        self.bytes -= size;
                        acked += 1;
                    }
                    Some(d) => {
                        queue.dead.insert(id, d);
                        stale.push(id);
                    }
                    None => missing.push(id),
                }
                continue;
            };
            if receipt.is_some_and(|r| r != m.receipt) {
                stale.push(id);
                continue;
            }
            // Not delivered since it entered the queue (or was requeued).
            if m.deliveries <= m.requeued_at {
                undelivered.push(id);
                continue;
            }
            if let Some(m) = part.remove(id.seq) {
                self.messages -= 1;
                self.bytes -= m.size();
                acked += 1;
            }
        }
        self.stats.acked += u64::from(acked);
        QueueReply::Acked {
            acked,
            missing,
            stale,
            undelivered,
        }
    }

    /// The leased message `id` whose latest delivery is `receipt` (if named).
    fn leased(queue: &mut Queue, id: MsgId, receipt: Option<u64>) -> Result<(), QueueReply> {
        let m = queue
            .partitions
            .get(id.partition as usize)
            .and_then(|p| p.messages.get(&id.seq))
            .ok_or(QueueReply::NotFound { id })?;
        if receipt.is_some_and(|r| r != m.receipt) {
            return Err(QueueReply::StaleReceipt {
                id,
                latest: m.receipt,
            });
        }
        if m.lease.is_none() {
            return Err(QueueReply::NotLeased { id });
        }
        Ok(())
    }

    fn nack(
        &mut self,
        name: &str,
        id: MsgId,
        receipt: Option<u64>,
        events: &mut Vec<QueueEvent>,
    ) -> QueueReply {
        let now = self.now_ms;
        let Some(queue) = self.queues.get_mut(name) else {
            return QueueReply::NotFound { id };
        };
        if let Err(reply) = Self::leased(queue, id, receipt) {
            return reply;
        }
        queue.end_delivery(id.partition, id.seq, now, &mut self.stats);
        queue.serve_waiters_at(now, &mut self.stats, events);
        QueueReply::Done
    }

    fn extend(
        &mut self,
        name: &str,
        id: MsgId,
        receipt: Option<u64>,
        visibility_ms: u64,
    ) -> QueueReply {
        if visibility_ms == 0 || visibility_ms > MAX_VISIBILITY_MS {
            return QueueReply::Invalid(format!("visibility_ms must be 1..={MAX_VISIBILITY_MS}"));
        }
        let now = self.now_ms;
        let Some(queue) = self.queues.get_mut(name) else {
            return QueueReply::NotFound { id };
        };
        if let Err(reply) = Self::leased(queue, id, receipt) {
            return reply;
        }
        if let Some(p) = queue
            .partitions
            .get_mut(id.partition as usize)
            .map(Arc::make_mut)
        {
            p.set_lease_end(id.seq, now.saturating_add(visibility_ms));
        }
        QueueReply::Done
    }

    fn requeue(
        &mut self,
        name: &str,
        ids: &[MsgId],
        max: u32,
        events: &mut Vec<QueueEvent>,
    ) -> QueueReply {
        if ids.len() > MAX_BATCH || max as usize > MAX_BATCH {
            return QueueReply::Invalid(format!("a requeue moves at most {MAX_BATCH} messages"));
        }
        let now = self.now_ms;
        let Some(queue) = self.queues.get_mut(name) else {
            return QueueReply::Requeued { count: 0 };
        };
        let chosen: Vec<MsgId> = if ids.is_empty() {
            queue
                .dead
                .keys()
                .take(max.max(1) as usize)
                .copied()
                .collect()
        } else {
            ids.to_vec()
        };
        let mut count = 0;
        for id in chosen {
            let Some(dead) = queue.dead.remove(&id) else {
                continue;
            };
            let mut message = dead.message;
            queue.dead_bytes -= message.size();
            message.requeued_at = message.deliveries;
            message.lease = None;
            // Receipts of deliveries before it died name nothing now (no receipt is 0):
            // a consumer that comes back with one must not ack the requeued message.
            message.receipt = 0;
            if let Some(part) = queue
                .partitions
                .get_mut(id.partition as usize)
                .map(Arc::make_mut)
            {
                part.insert(id.seq, message);
                count += 1;
            }
        }
        queue.serve_waiters_at(now, &mut self.stats, events);
        QueueReply::Requeued { count }
    }

    /// Withdraw a waiting dequeue; whether it was still waiting.
    pub fn withdraw_wait(&mut self, queue: &str, wait: WaitId) -> bool {
        let Some(q) = self.queues.get_mut(queue) else {
            return false;
        };
        match q.waiters.remove(&wait) {
            Some(w) => {
                q.wait_ends.remove(&(w.until_ms, wait));
                true
            }
            None => false,
        }
    }

    /// Give back deliveries whose caller gave up before the answer: each message still
    /// leased under that receipt is visible again at once. The delivery still counts
    /// (towards `max_deliveries`, and in the count the next delivery reports): it
    /// happened, and a later message of the key may have been delivered meanwhile, so
    /// the next one is not a first delivery.
    pub fn withdraw_deliveries(
        &mut self,
        queue: &str,
        delivered: &[(MsgId, u64)],
    ) -> Vec<QueueEvent> {
        let now = self.now_ms;
        let mut events = Vec::new();
        let Some(q) = self.queues.get_mut(queue) else {
            return events;
        };
        for &(id, receipt) in delivered {
            let Some(part) = q
                .partitions
                .get_mut(id.partition as usize)
                .map(Arc::make_mut)
            else {
                continue;
            };
            let Some(m) = part.messages.get_mut(&id.seq) else {
                continue;
            };
            if m.receipt != receipt || m.lease.is_none() {
                continue;
            }
            part.end_lease(id.seq);
        }
        q.serve_waiters_at(now, &mut self.stats, &mut events);
        events
    }

    /// Every queue, for stats.
    pub fn views(&self) -> Vec<QueueView> {
        self.first_views(usize::MAX)
    }

    /// The first `n` queues (by name), for stats.
    pub fn first_views(&self, n: usize) -> Vec<QueueView> {
        self.queues
            .iter()
            .take(n)
            .map(|(name, q)| self.view_of(name, q))
            .collect()
    }

    /// One queue, for stats.
    pub fn view(&self, name: &str) -> Option<QueueView> {
        self.queues.get(name).map(|q| self.view_of(name, q))
    }

    fn view_of(&self, name: &str, q: &Queue) -> QueueView {
        let shares = q.ring().shares(q.settings.partitions);
        QueueView {
            name: name.to_owned(),
            settings: q.settings,
            partitions: q
                .partitions
                .iter()
                .enumerate()
                .map(|(i, p)| PartitionView {
                    partition: i as u32,
                    depth: p.visible_count() as u64,
                    inflight: p.leased_count() as u64,
                    oldest_age_ms: p.oldest_ms().map_or(0, |t| self.now_ms.saturating_sub(t)),
                    ring_share_ppm: (shares.get(i).copied().unwrap_or(0.0) * 1e6).round() as u32,
                })
                .collect(),
            dead: q.dead.len() as u64,
            waiters: q.waiters.len() as u64,
            vnodes: ring::VNODES,
        }
    }

    /// The ring points of a queue.
    pub fn ring(&self, name: &str) -> Option<Arc<HashRing>> {
        self.queues.get(name).map(Queue::ring)
    }

    /// Dead letters of a queue, oldest first, at most `limit`.
    pub fn dead(&self, name: &str, limit: usize) -> Vec<DeadView> {
        let Some(q) = self.queues.get(name) else {
            return Vec::new();
        };
        q.dead
            .iter()
            .take(limit)
            .map(|(id, d)| DeadView {
                id: *id,
                key: d.message.key.clone(),
                value: d.message.value.clone(),
                field: d.message.field,
                deliveries: d.message.deliveries,
                died_ms: d.died_ms,
            })
            .collect()
    }

    /// Every message a queue still stores (visible, leased or dead).
    pub fn message_ids(&self, name: &str) -> BTreeSet<MsgId> {
        let Some(q) = self.queues.get(name) else {
            return BTreeSet::new();
        };
        let live = q.partitions.iter().enumerate().flat_map(|(p, part)| {
            part.messages.keys().map(move |&seq| MsgId {
                partition: p as u32,
                seq,
            })
        });
        live.chain(q.dead.keys().copied()).collect()
    }

    /// Check every index against the messages (the simulator's invariant).
    pub fn check(&self) -> Result<(), String> {
        let (mut messages, mut bytes) = (0, 0);
        for (name, q) in &self.queues {
            for (i, p) in q.partitions.iter().enumerate() {
                p.check()
                    .map_err(|e| format!("queue {name} partition {i}: {e}"))?;
                for m in p.messages.values() {
                    if q.ring().partition(&m.key) != i as u32 {
                        return Err(format!("queue {name}: key {} in partition {i}", m.key));
                    }
                }
            }
            let dead_bytes: u64 = q.dead.values().map(|d| d.message.size()).sum();
            if dead_bytes != q.dead_bytes {
                return Err(format!(
                    "queue {name}: dead bytes {dead_bytes} != {}",
                    q.dead_bytes
                ));
            }
            if q.waiters.len() != q.wait_ends.len() {
                return Err(format!("queue {name}: waiter index disagrees"));
            }
            messages += q.live_messages();
            bytes += q.live_bytes();
        }
        if messages != self.messages || bytes != self.bytes {
            return Err(format!(
                "totals disagree: {messages}/{} messages, {bytes}/{} bytes",
                self.messages, self.bytes
            ));
        }
        Ok(())
    }
}

impl Queue {
    /// Hand visible messages to waiting dequeues; their leases run from `now_ms`.
    fn serve_waiters_at(
        &mut self,
        now_ms: u64,
        stats: &mut QueueStats,
        events: &mut Vec<QueueEvent>,
    ) {
        if self.waiters.is_empty() {
            return;
        }
        let waiting: Vec<WaitId> = self.waiters.keys().copied().collect();
        for wait in waiting {
            if !self.partitions.iter().any(|p| p.has_visible(None)) {
                break;
            }
            let Some(w) = self.waiters.get(&wait) else {
                continue;
            };
            if !self.has_visible(w.key.as_deref()) {
                continue;
            }
            let Some(w) = self.waiters.remove(&wait) else {
                continue;
            };
            self.wait_ends.remove(&(w.until_ms, wait));
            let until = now_ms.saturating_add(w.visibility_ms);
            let messages = self.lease(w.key.as_deref(), w.max, until, stats);
            events.push(QueueEvent::Delivered { wait, messages });
        }
    }
}
