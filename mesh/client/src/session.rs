//! `Caller`: calls with client sessions, one session per caller slot.
//!
//! A slot is a session of its own with at most one call in flight; every call carries
//! `ack = seq`, acknowledging all answers before it. A slot is opened through the log
//! (the entry's index names the session) the first time it is used, and again after
//! long idleness, before the cluster would forget it. The number of slots is bounded by
//! the calls in flight (a semaphore), so what the cluster keeps for this caller is too.

use crate::{CallError, Cluster};
use mesh_core::raft::LogIndex;
use mesh_core::services::envelope::{Command, Envelope, Query, QueryReply, Reply, SessionRefusal};
use mesh_core::wire::{ClientRequest, ClientResponse};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

/// How long the leader may take to answer a prompt call before every node is asked.
const HEDGE: Duration = Duration::from_millis(300);
/// A slot idle this long opens a new session (the cluster forgets idle ones after an
/// hour of lock time).
const SLOT_IDLE: Duration = Duration::from_secs(30 * 60);
/// How long a withdrawal is tried for.
const WITHDRAW_DEADLINE: Duration = Duration::from_secs(10);

/// How to make one call.
#[derive(Clone, Copy, Debug)]
pub struct CallOptions {
    /// Give up (and report it) after this long.
    pub deadline: Duration,
    /// The call answers promptly (never waits in a service): it may be hedged across
    /// nodes when the leader is slow.
    pub prompt: bool,
    /// If the caller gives up on the call (drops it, or the deadline passes with the
    /// outcome unknown), withdraw it through the log: a wait is given up and a grant
    /// that raced it released.
    pub withdraw_if_abandoned: bool,
}

/// A call's answer.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// What the service answered.
    pub reply: Reply,
    /// The entry that carried (or completed) it.
    pub index: LogIndex,
    /// The answering node's wall clock (for estimates a person reads).
    pub wall_ms: u64,
}

#[derive(Clone, Copy, Debug)]
struct Slot {
    session: Option<u64>,
    next_seq: u64,
    last_used: Instant,
}

/// Calls with sessions, over a [`Cluster`]. Cheap to share.
pub struct Caller {
    cluster: Cluster,
    free: Arc<Mutex<Vec<Slot>>>,
    permits: Arc<Semaphore>,
}

/// A slot in use. When the call ends it goes back to the free list; if its caller gave
/// up on it (the future was dropped, or the outcome is unknown), the call is withdrawn
/// through the log first, and only then is the slot reused: its next call would
/// acknowledge the abandoned one, and the withdrawal of an acknowledged call is ignored.
struct SlotGuard {
    cluster: Cluster,
    free: Arc<Mutex<Vec<Slot>>>,
    slot: Slot,
    /// The session call to withdraw when the guard drops.
    withdraw: Option<(u64, u64)>,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

fn give_back(free: &Mutex<Vec<Slot>>, mut slot: Slot) {
    if slot.session.is_some() {
        slot.last_used = Instant::now();
        free.lock().unwrap_or_else(|p| p.into_inner()).push(slot);
    }
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        let Some((session, seq)) = self.withdraw.take() else {
            give_back(&self.free, self.slot);
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // No runtime to withdraw with: the slot's session is abandoned, never
            // acknowledged past the call (the cluster forgets it when idle).
            return;
        };
        let (cluster, free, slot, permit) = (
            self.cluster.clone(),
            self.free.clone(),
            self.slot,
            self.permit.take(),
        );
        runtime.spawn(async move {
            let _permit = permit;
            let command = Command::Withdraw {
                session,
                seq,
                release_grant: true,
            };
            let e = Envelope::new(0, 0, 0, command);
            let Ok(bytes) = postcard::to_stdvec(&e) else {
                return;
            };
            let request = ClientRequest::Propose(bytes);
            match cluster.call(&request, WITHDRAW_DEADLINE, Some(HEDGE)).await {
                Ok(ClientResponse::Applied { .. }) => {
                    tracing::debug!(session, seq, "withdrew an abandoned call");
                    give_back(&free, slot);
                }
                other => tracing::warn!(
                    session,
                    seq,
                    "could not withdraw an abandoned call ({other:?}); its session is retired"
                ),
            }
        });
    }
}

/// Decode a node's answer to a proposal.
fn applied(response: ClientResponse) -> Result<Outcome, CallError> {
    match response {
        ClientResponse::Applied {
            index,
            result,
            wall_ms,
        } => {
            let reply = postcard::from_bytes::<Reply>(&result)
                .map_err(|e| CallError::Setup(format!("undecodable reply: {e}")))?;
            Ok(Outcome {
                reply,
                index,
                wall_ms,
            })
        }
        ClientResponse::Error {
            message,
            retry: false,
        } => Err(CallError::Refused(message)),
        ClientResponse::Error { message, .. } => Err(CallError::Unavailable(message)),
        ClientResponse::Unknown { message } => Err(CallError::OutcomeUnknown(message)),
        other => Err(CallError::Unavailable(format!(
            "unexpected answer {other:?}"
        ))),
    }
}

impl Caller {
    /// A caller with at most `max_in_flight` calls at once (more wait for a slot).
    pub fn new(cluster: Cluster, max_in_flight: usize) -> Self {
        Self {
            cluster,
            free: Arc::new(Mutex::new(Vec::new())),
            permits: Arc::new(Semaphore::new(max_in_flight.max(1))),
        }
    }

    /// The cluster it calls.
    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    /// Sessions this caller keeps open and idle.
    pub fn sessions(&self) -> usize {
        self.free.lock().map_or(0, |f| f.len())
    }

    fn take_slot(&self) -> Slot {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        free.pop().unwrap_or(Slot {
            session: None,
            next_seq: 1,
            last_used: Instant::now(),
        })
    }

    async fn open_session(&self, deadline: Duration) -> Result<u64, CallError> {
        let e = Envelope::new(0, 0, 0, Command::OpenSession);
        let bytes = postcard::to_stdvec(&e).map_err(|e| CallError::Setup(e.to_string()))?;
        let request = ClientRequest::Propose(bytes);
        let answer = self.cluster.call(&request, deadline, Some(HEDGE)).await;
        match applied(answer?)?.reply {
            Reply::SessionOpened { session } => Ok(session),
            other => Err(CallError::Setup(format!(
                "opening a session answered {other:?}"
            ))),
        }
    }

    /// Replicate `command` and answer what the service replied.
    pub async fn propose(&self, command: Command, opts: CallOptions) -> Result<Outcome, CallError> {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| CallError::Setup("caller closed".into()))?;
        let mut guard = SlotGuard {
            cluster: self.cluster.clone(),
            free: self.free.clone(),
            slot: self.take_slot(),
            withdraw: None,
            permit: Some(permit),
        };
        self.propose_in(&mut guard, command, opts).await
    }

    async fn propose_in(
        &self,
        guard: &mut SlotGuard,
        command: Command,
        opts: CallOptions,
    ) -> Result<Outcome, CallError> {
        let slot = &mut guard.slot;
        let fresh = slot.session.is_none() || slot.last_used.elapsed() >= SLOT_IDLE;
        let started = Instant::now();
        let mut opts = opts;
        if fresh {
            // The call itself is not sent yet: whatever happened to the opening, it is
            // not done (503, never 504).
            let session = self
                .open_session(opts.deadline)
                .await
                .map_err(|e| match e {
                    CallError::OutcomeUnknown(why) => CallError::Unavailable(why),
                    e => e,
                })?;
            // One deadline for the opening and the call together.
            opts.deadline = opts.deadline.saturating_sub(started.elapsed());
            *slot = Slot {
                session: Some(session),
                next_seq: 1,
                last_used: Instant::now(),
            };
        }
        let Some(session) = slot.session else {
            return Err(CallError::Setup("no session".into()));
        };
        let seq = slot.next_seq;
        slot.next_seq += 1;
        let e = Envelope::new(session, seq, seq, command);
        let bytes = postcard::to_stdvec(&e).map_err(|e| CallError::Setup(e.to_string()))?;
        guard.withdraw = opts.withdraw_if_abandoned.then_some((session, seq));
        let hedge = opts.prompt.then_some(HEDGE);
        let request = ClientRequest::Propose(bytes);
        let answer = self.cluster.call(&request, opts.deadline, hedge).await;
        if !matches!(answer, Err(CallError::OutcomeUnknown(_))) {
            // Answered, or never carried out: nothing to withdraw.
            guard.withdraw = None;
        }
        let outcome = applied(answer?)?;
        if let Reply::Session(SessionRefusal::Unknown { .. }) = outcome.reply {
            // The cluster forgot the session: the call was not run now, but an earlier
            // attempt of it may have run before the session was forgotten.
            guard.slot.session = None;
            return Err(CallError::OutcomeUnknown(
                "the cluster forgot this caller's session".into(),
            ));
        }
        Ok(outcome)
    }

    /// A linearizable read.
    pub async fn read(&self, query: &Query, deadline: Duration) -> Result<QueryReply, CallError> {
        let bytes = postcard::to_stdvec(query).map_err(|e| CallError::Setup(e.to_string()))?;
        let request = ClientRequest::Read(bytes);
        match self.cluster.call(&request, deadline, Some(HEDGE)).await? {
            ClientResponse::Read(bytes) => postcard::from_bytes(&bytes)
                .map_err(|e| CallError::Setup(format!("undecodable read: {e}"))),
            other => Err(CallError::Unavailable(format!(
                "unexpected answer {other:?}"
            ))),
        }
    }
}
