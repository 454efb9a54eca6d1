//! `Services`: every replicated service behind one state machine, and the envelope their
//! commands travel in.
//!
//! An [`Envelope`] carries the leader's clock (`now_ms`, stamped when it proposes; the
//! services never read a clock) and the caller's session and sequence number. A command
//! retried after a leader change may end up in the log twice; the second copy answers
//! with the reply of the first and changes nothing (Raft thesis 6.3). Replies are kept per
//! session for the latest `SESSION_REPLIES` sequence numbers; sessions idle for
//! `SESSION_IDLE_MS` of leader time are forgotten.

use super::lock::{KeyView, LockCommand, LockEvent, LockReply, LockTable};
use super::register::{Register, RegisterCommand, RegisterQuery, RegisterReply};
use super::StateMachine;
use crate::raft::LogIndex;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Replies remembered per session.
pub const SESSION_REPLIES: usize = 4096;
/// A session idle this long (leader time) is forgotten.
pub const SESSION_IDLE_MS: u64 = 3_600_000;

/// A command of some service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// The register service.
    Register(RegisterCommand),
    /// The lock service.
    Lock(LockCommand),
}

/// How a command travels in the log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// The caller's session (0: no deduplication).
    pub session: u64,
    /// The caller's sequence number within the session.
    pub seq: u64,
    /// The leader's clock when it proposed the command.
    pub now_ms: u64,
    /// What to do.
    pub command: Command,
}

/// The reply to a command.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    /// From the register.
    Register(RegisterReply),
    /// From the lock table.
    Lock(LockReply),
    /// The entry did not decode.
    Invalid(String),
}

/// A read of some service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Query {
    /// The register.
    Register(RegisterQuery),
    /// One lock key.
    LockState {
        /// Key.
        key: String,
    },
    /// Every key held or waited on, up to `limit`.
    LockList {
        /// Most keys returned.
        limit: usize,
    },
    /// Counts of holders, waiters and deadlocks.
    LockStats,
}

/// The answer to a query.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum QueryReply {
    /// From the register.
    Register(RegisterReply),
    /// One key.
    LockState(KeyView),
    /// Many keys.
    LockList(Vec<KeyView>),
    /// The query did not decode.
    Invalid(String),
    /// Lock counts.
    LockStats {
        /// Shared holds.
        shared: u64,
        /// Exclusive holds.
        exclusive: u64,
        /// Queued requests.
        waiters: u64,
        /// Requests refused for deadlock so far.
        deadlocks: u64,
    },
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Session {
    replies: BTreeMap<u64, Reply>,
    last_ms: u64,
}

/// Every service, as one state machine.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Services {
    register: Register,
    locks: LockTable,
    sessions: BTreeMap<u64, Session>,
    applied: LogIndex,
    last_sweep_ms: u64,
}

/// Snapshot bytes that do not decode.
#[derive(Debug, thiserror::Error)]
#[error("services snapshot does not decode: {0}")]
pub struct ServicesRestoreError(String);

impl Services {
    /// The lock table (for metrics and reads).
    pub fn locks(&self) -> &LockTable {
        &self.locks
    }

    /// A hash of the services' state (not the session caches), to compare replicas.
    pub fn digest(&self) -> u64 {
        let mut h: u64 = 0xCBF2_9CE4_8422_2325;
        let bytes =
            postcard::to_stdvec(&(&self.register, &self.locks, self.applied)).unwrap_or_default();
        for b in bytes {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01B3);
        }
        h
    }

    /// Last applied index.
    pub fn applied(&self) -> LogIndex {
        self.applied
    }

    /// Note an applied entry that carried no command.
    pub fn skip(&mut self, index: LogIndex) {
        self.applied = index;
    }

    /// Apply encoded envelope bytes: the reply and any lock events.
    pub fn apply_bytes(&mut self, index: LogIndex, bytes: &[u8]) -> (Reply, Vec<LockEvent>) {
        match postcard::from_bytes::<Envelope>(bytes) {
            Ok(envelope) => self.apply(index, envelope),
            Err(e) => {
                self.applied = index;
                (Reply::Invalid(e.to_string()), Vec::new())
            }
        }
    }

    /// Answer encoded query bytes.
    pub fn query_bytes(&self, bytes: &[u8]) -> QueryReply {
        match postcard::from_bytes::<Query>(bytes) {
            Ok(Query::Register(q)) => QueryReply::Register(self.register.query(&q)),
            Ok(Query::LockState { key }) => QueryReply::LockState(self.locks.view(&key)),
            Ok(Query::LockList { limit }) => {
                QueryReply::LockList(self.locks.list(limit.min(10_000)))
            }
            Ok(Query::LockStats) => {
                let (shared, exclusive, waiters) = self.locks.counts();
                QueryReply::LockStats {
                    shared: shared as u64,
                    exclusive: exclusive as u64,
                    waiters: waiters as u64,
                    deadlocks: self.locks.deadlocks(),
                }
            }
            Err(e) => QueryReply::Invalid(e.to_string()),
        }
    }

    fn sweep_sessions(&mut self, now_ms: u64) {
        if now_ms < self.last_sweep_ms + 60_000 {
            return;
        }
        self.last_sweep_ms = now_ms;
        self.sessions
            .retain(|_, s| s.last_ms + SESSION_IDLE_MS > now_ms);
    }
}

impl StateMachine for Services {
    type Command = Envelope;
    type Reply = (Reply, Vec<LockEvent>);
    type RestoreError = ServicesRestoreError;

    fn apply(&mut self, index: LogIndex, e: Envelope) -> (Reply, Vec<LockEvent>) {
        self.applied = index;
        let now = e.now_ms.max(self.locks.now_ms());
        self.sweep_sessions(now);
        if e.session != 0 {
            if let Some(reply) = self
                .sessions
                .get(&e.session)
                .and_then(|s| s.replies.get(&e.seq))
            {
                return (reply.clone(), Vec::new());
            }
        }
        let (reply, events) = match e.command {
            Command::Register(cmd) => {
                (Reply::Register(self.register.apply(index, cmd)), Vec::new())
            }
            Command::Lock(cmd) => {
                let (r, events) = self.locks.apply(index, now, cmd);
                (Reply::Lock(r), events)
            }
        };
        if e.session != 0 {
            let session = self.sessions.entry(e.session).or_default();
            session.last_ms = now;
            session.replies.insert(e.seq, reply.clone());
            while session.replies.len() > SESSION_REPLIES {
                session.replies.pop_first();
            }
        }
        (reply, events)
    }

    fn snapshot(&self) -> Vec<u8> {
        // Encoding maps of plain data into a Vec cannot fail.
        postcard::to_stdvec(self).unwrap_or_default()
    }

    fn restore(&mut self, data: &[u8]) -> Result<(), ServicesRestoreError> {
        *self = postcard::from_bytes(data).map_err(|e| ServicesRestoreError(e.to_string()))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::services::lock::Mode;

    fn acquire(session: u64, seq: u64, client: &str) -> Envelope {
        Envelope {
            session,
            seq,
            now_ms: 1_000,
            command: Command::Lock(LockCommand::Acquire {
                key: "A".into(),
                client: client.into(),
                mode: Mode::X,
                ttl_ms: 0,
                wait_ms: 0,
            }),
        }
    }

    #[test]
    fn a_retried_command_is_applied_once() {
        let mut s = Services::default();
        let (first, _) = s.apply(1, acquire(7, 1, "c1"));
        let release = Envelope {
            session: 7,
            seq: 2,
            now_ms: 1_001,
            command: Command::Lock(LockCommand::Release {
                key: "A".into(),
                client: "c1".into(),
            }),
        };
        assert_eq!(
            s.apply(2, release.clone()).0,
            Reply::Lock(LockReply::Released)
        );
        // The same release again (a retry after a leader change) answers the same and
        // does not count as a second release.
        assert_eq!(s.apply(3, release).0, Reply::Lock(LockReply::Released));
        // And a retried acquire answers its original grant, not a new one.
        assert_eq!(s.apply(4, acquire(7, 1, "c1")).0, first);
        assert!(s.locks().view("A").holders.is_empty());
    }

    #[test]
    fn snapshot_round_trip_and_bad_bytes() {
        let mut s = Services::default();
        s.apply(1, acquire(1, 1, "c1"));
        let mut copy = Services::default();
        copy.restore(&s.snapshot()).expect("restore");
        assert_eq!(copy, s);
        assert!(matches!(
            s.apply_bytes(2, &[0xFF, 0x01]).0,
            Reply::Invalid(_)
        ));
        assert!(matches!(s.query_bytes(&[0xFF]), QueryReply::Invalid(_)));
    }
}
