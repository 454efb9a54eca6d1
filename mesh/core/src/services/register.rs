//! `Register`: a replicated map of byte strings, the service a bare node runs.
//!
//! It exists so the mesh can be exercised end to end (propose, commit, apply, read)
//! before the lock, queue and cache services arrive, and stays as the simplest example of
//! the [`StateMachine`] shape.

use super::StateMachine;
use crate::raft::LogIndex;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A write.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RegisterCommand {
    /// Set `key` to `value`.
    Put {
        /// Key.
        key: Vec<u8>,
        /// Value.
        value: Vec<u8>,
    },
}

/// A read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RegisterQuery {
    /// The value of `key`.
    Get {
        /// Key.
        key: Vec<u8>,
    },
    /// Number of keys and the last applied index.
    Stats,
}

/// Answers of reads and writes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RegisterReply {
    /// A write was applied; the previous value.
    Written {
        /// The value replaced, if any.
        previous: Option<Vec<u8>>,
    },
    /// A value (absent: `None`).
    Value(Option<Vec<u8>>),
    /// Size and position.
    Stats {
        /// Keys held.
        keys: u64,
        /// Last applied index.
        applied: LogIndex,
    },
    /// The command or query bytes did not decode.
    Invalid(String),
}

/// Snapshot bytes that do not decode.
#[derive(Debug, thiserror::Error)]
#[error("register snapshot does not decode: {0}")]
pub struct RegisterRestoreError(String);

/// The replicated map.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Register {
    values: BTreeMap<Vec<u8>, Vec<u8>>,
    applied: LogIndex,
}

impl Register {
    /// Answer a query from the current state.
    pub fn query(&self, query: &RegisterQuery) -> RegisterReply {
        match query {
            RegisterQuery::Get { key } => RegisterReply::Value(self.values.get(key).cloned()),
            RegisterQuery::Stats => RegisterReply::Stats {
                keys: self.values.len() as u64,
                applied: self.applied,
            },
        }
    }

    /// Note an applied entry that carried no command (no-op, membership).
    pub fn skip(&mut self, index: LogIndex) {
        self.applied = index;
    }

    /// Apply encoded command bytes; undecodable bytes are answered, not fatal.
    pub fn apply_bytes(&mut self, index: LogIndex, bytes: &[u8]) -> RegisterReply {
        match postcard::from_bytes::<RegisterCommand>(bytes) {
            Ok(cmd) => self.apply(index, cmd),
            Err(e) => {
                self.applied = index;
                RegisterReply::Invalid(e.to_string())
            }
        }
    }

    /// Answer encoded query bytes.
    pub fn query_bytes(&self, bytes: &[u8]) -> RegisterReply {
        match postcard::from_bytes::<RegisterQuery>(bytes) {
            Ok(q) => self.query(&q),
            Err(e) => RegisterReply::Invalid(e.to_string()),
        }
    }
}

impl StateMachine for Register {
    type Command = RegisterCommand;
    type Reply = RegisterReply;
    type RestoreError = RegisterRestoreError;

    fn apply(&mut self, index: LogIndex, cmd: RegisterCommand) -> RegisterReply {
        self.applied = index;
        match cmd {
            RegisterCommand::Put { key, value } => RegisterReply::Written {
                previous: self.values.insert(key, value),
            },
        }
    }

    fn snapshot(&self) -> Vec<u8> {
        // Encoding a BTreeMap of byte vectors into a Vec cannot fail.
        postcard::to_stdvec(self).unwrap_or_default()
    }

    fn restore(&mut self, data: &[u8]) -> Result<(), RegisterRestoreError> {
        *self = postcard::from_bytes(data).map_err(|e| RegisterRestoreError(e.to_string()))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_get_snapshot_restore() {
        let mut r = Register::default();
        let put = |k: &str, v: &str| RegisterCommand::Put {
            key: k.into(),
            value: v.into(),
        };
        assert_eq!(
            r.apply(1, put("a", "1")),
            RegisterReply::Written { previous: None }
        );
        assert_eq!(
            r.apply(2, put("a", "2")),
            RegisterReply::Written {
                previous: Some(b"1".to_vec())
            }
        );
        assert_eq!(
            r.query(&RegisterQuery::Get { key: b"a".to_vec() }),
            RegisterReply::Value(Some(b"2".to_vec()))
        );
        let mut copy = Register::default();
        copy.restore(&r.snapshot()).expect("restore");
        assert_eq!(copy, r);
        assert!(copy.restore(&[0xFF, 0xFF, 0xFF]).is_err());
        assert!(matches!(
            r.apply_bytes(3, &[0xFF]),
            RegisterReply::Invalid(_)
        ));
        assert_eq!(
            r.query(&RegisterQuery::Stats),
            RegisterReply::Stats {
                keys: 1,
                applied: 3
            }
        );
    }
}
