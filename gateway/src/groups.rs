//! `EnqueueGroups`: single enqueues to one queue that arrive together travel as one
//! proposal, group commit one level above the log.
//!
//! Every HTTP enqueue of one message would otherwise be a call of its own: a session
//! slot, a stream to the leader, a log entry, an answer. Under load most of that cost is
//! per call, not per message (a batch of 100 messages costs about what one does). So a
//! queue's single enqueues go to its group: a task that takes whatever is waiting (up
//! to [`MAX_GROUP`] messages, [`MAX_GROUP_BYTES`]) and proposes it as one batch, with at
//! most [`GROUPS_IN_FLIGHT`] batches of a queue in flight; while they are, the next
//! batch fills. Nobody waits for a batch to fill: a lone enqueue goes at once.
//!
//! Nothing about durability changes: each caller is answered only when its message is
//! committed (quorum fsync) and applied, with its own `msg_id`. A caller that waits for
//! its answer before the next enqueue keeps its order. Dedup ids are per message, as
//! before. If the service refuses a batch as a whole (the queue is full), its messages
//! are tried one by one so that each caller gets its own answer.

use crate::{ApiError, AppState};
use mesh_core::services::queue::{MsgId, NewMessage, QueueCommand, QueueReply};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, Semaphore};

/// Messages in one grouped proposal at most.
pub(crate) const MAX_GROUP: usize = 256;
/// Value bytes in one grouped proposal at most (one message over it goes alone).
pub(crate) const MAX_GROUP_BYTES: usize = 1 << 20;
/// Grouped proposals of one queue in flight at once.
pub(crate) const GROUPS_IN_FLIGHT: usize = 2;
/// Enqueues waiting for a queue's group at most; past it they are proposed alone.
const PENDING_PER_QUEUE: usize = 8192;
/// Queues with a group at once; others' enqueues are proposed alone.
const MAX_GROUPED_QUEUES: usize = 1024;
/// A group idle this long ends (the next enqueue starts a new one).
const IDLE: Duration = Duration::from_secs(10);

/// What one enqueue is answered: its id and whether it repeated an earlier dedup id.
pub(crate) type Enqueued = Result<(MsgId, bool), ApiError>;

struct Pending {
    message: NewMessage,
    reply: oneshot::Sender<Enqueued>,
}

/// The groups of a gateway, one per queue with recent single enqueues.
pub(crate) struct EnqueueGroups {
    queues: Mutex<BTreeMap<String, mpsc::Sender<Pending>>>,
    /// Messages per grouped proposal (`gateway_enqueue_group_messages`).
    sizes: prometheus::Histogram,
    /// From a group's proposal to its answer (`gateway_enqueue_group_seconds`).
    latency: prometheus::Histogram,
}

impl EnqueueGroups {
    /// Groups whose sizes are observed in `registry`.
    pub(crate) fn new(registry: &prometheus::Registry) -> Result<Self, prometheus::Error> {
        let sizes = histogram(
            registry,
            "gateway_enqueue_group_messages",
            "Single enqueues proposed together as one batch",
            prometheus::exponential_buckets(1.0, 2.0, 9)?,
        )?;
        let latency = histogram(
            registry,
            "gateway_enqueue_group_seconds",
            "From a grouped proposal to its answer (a quorum fsync and the apply)",
            prometheus::exponential_buckets(0.000_125, 2.0, 16)?,
        )?;
        Ok(Self {
            queues: Mutex::new(BTreeMap::new()),
            sizes,
            latency,
        })
    }

    /// Enqueue one message to `queue` with whatever else arrives for it meanwhile.
    pub(crate) async fn enqueue(
        state: &Arc<AppState>,
        queue: String,
        message: NewMessage,
    ) -> Enqueued {
        let (reply, answer) = oneshot::channel();
        let pending = Pending { message, reply };
        let pending = match state.groups.sender(state, &queue) {
            Some(tx) => match tx.try_send(pending) {
                Ok(()) => None,
                Err(mpsc::error::TrySendError::Full(p) | mpsc::error::TrySendError::Closed(p)) => {
                    Some(p)
                }
            },
            None => Some(pending),
        };
        if let Some(p) = pending {
            // No group to join (too many queues, a full group, one that just ended).
            propose_alone(state, &queue, p).await;
        }
        answer
            .await
            .unwrap_or_else(|_| Err(ApiError::internal("the enqueue group stopped")))
    }

    /// The sender of `queue`'s group, starting the group if there is none.
    fn sender(&self, state: &Arc<AppState>, queue: &str) -> Option<mpsc::Sender<Pending>> {
        let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = queues.get(queue).filter(|tx| !tx.is_closed()) {
            return Some(tx.clone());
        }
        queues.retain(|_, tx| !tx.is_closed());
        if queues.len() >= MAX_GROUPED_QUEUES {
            return None;
        }
        let (tx, rx) = mpsc::channel(PENDING_PER_QUEUE);
        queues.insert(queue.to_owned(), tx.clone());
        tokio::spawn(run_group(state.clone(), queue.to_owned(), rx));
        Some(tx)
    }

    fn forget(&self, queue: &str) {
        let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        if queues.get(queue).is_some_and(mpsc::Sender::is_closed) {
            queues.remove(queue);
        }
    }
}

/// A histogram registered in `registry`.
fn histogram(
    registry: &prometheus::Registry,
    name: &str,
    help: &str,
    buckets: Vec<f64>,
) -> Result<prometheus::Histogram, prometheus::Error> {
    let h = prometheus::Histogram::with_opts(
        prometheus::HistogramOpts::new(name, help).buckets(buckets),
    )?;
    registry.register(Box::new(h.clone()))?;
    Ok(h)
}

/// One queue's group: take what waits, propose it, repeat; end when idle.
async fn run_group(state: Arc<AppState>, queue: String, mut rx: mpsc::Receiver<Pending>) {
    let in_flight = Arc::new(Semaphore::new(GROUPS_IN_FLIGHT));
    loop {
        let first = match tokio::time::timeout(IDLE, rx.recv()).await {
            Ok(Some(p)) => p,
            _ => {
                // Senders that raced the end find the channel closed and go alone; what
                // is already in it is still proposed.
                rx.close();
                let mut rest = Vec::new();
                while let Ok(p) = rx.try_recv() {
                    rest.push(p);
                }
                state.groups.forget(&queue);
                if !rest.is_empty() {
                    propose_group(&state, &queue, rest).await;
                }
                return;
            }
        };
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            return;
        };
        // Whatever arrived while the previous batches were in flight goes together.
        let mut group = vec![first];
        let mut bytes = group[0].message.value.len();
        while group.len() < MAX_GROUP && bytes < MAX_GROUP_BYTES {
            match rx.try_recv() {
                Ok(p) => {
                    bytes += p.message.value.len();
                    group.push(p);
                }
                Err(_) => break,
            }
        }
        let (state, queue) = (state.clone(), queue.clone());
        tokio::spawn(async move {
            let _permit = permit;
            propose_group(&state, &queue, group).await;
        });
    }
}

async fn propose_group(state: &Arc<AppState>, queue: &str, group: Vec<Pending>) {
    state.groups.sizes.observe(group.len() as f64);
    let _timer = state.groups.latency.start_timer();
    if group.len() == 1 {
        for p in group {
            propose_alone(state, queue, p).await;
        }
        return;
    }
    let messages = group.iter().map(|p| p.message.clone()).collect();
    let command = QueueCommand::Enqueue {
        queue: queue.to_owned(),
        messages,
    };
    match crate::queues::propose_enqueue(state, command).await {
        Ok(QueueReply::Enqueued { ids }) if ids.len() == group.len() => {
            for (p, id) in group.into_iter().zip(ids) {
                let _ = p.reply.send(Ok(id));
            }
        }
        // Refused as a whole (a cap, one bad message): each message on its own, for its
        // own answer. Nothing of the batch was stored, so none is stored twice.
        Ok(QueueReply::Full { .. } | QueueReply::Invalid(_)) => {
            let mut alone = tokio::task::JoinSet::new();
            for p in group {
                let (state, queue) = (state.clone(), queue.to_owned());
                alone.spawn(async move { propose_alone(&state, &queue, p).await });
            }
            while alone.join_next().await.is_some() {}
        }
        // Anything else is a bug; whether the batch was stored is unknown, so no message
        // is proposed again.
        Ok(other) => {
            let e =
                ApiError::internal(format!("unexpected answer to a grouped enqueue: {other:?}"));
            for p in group {
                let _ = p.reply.send(Err(e.clone()));
            }
        }
        Err(e) => {
            for p in group {
                let _ = p.reply.send(Err(e.clone()));
            }
        }
    }
}

async fn propose_alone(state: &Arc<AppState>, queue: &str, p: Pending) {
    let command = QueueCommand::Enqueue {
        queue: queue.to_owned(),
        messages: vec![p.message],
    };
    let answer = match crate::queues::propose_enqueue(state, command).await {
        Ok(QueueReply::Enqueued { ids }) if ids.len() == 1 => Ok(ids[0]),
        Ok(other) => Err(crate::queues::refusal(other)),
        Err(e) => Err(e),
    };
    let _ = p.reply.send(answer);
}
