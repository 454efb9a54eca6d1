//! The simulator's test service: a map of registers with client sessions.
//!
//! Writes carry a client id and sequence number; a retried write that was already applied
//! is recognised and not applied again (Raft thesis 6.3), which is what lets clients retry
//! freely across leader changes and still get a linearizable history.

use mesh_core::raft::LogIndex;
use mesh_core::services::StateMachine;
use std::collections::BTreeMap;

/// A client's write: `key := value`, as operation `seq` of `client`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Put {
    /// Client id.
    pub client: u64,
    /// Client's sequence number.
    pub seq: u64,
    /// Register.
    pub key: u64,
    /// New value.
    pub value: u64,
}

impl Put {
    /// Fixed little-endian encoding.
    pub fn encode(&self) -> Vec<u8> {
        [self.client, self.seq, self.key, self.value]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect()
    }

    /// Inverse of [`Put::encode`].
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let words = decode_words(bytes)?;
        let [client, seq, key, value] = <[u64; 4]>::try_from(words).ok()?;
        Some(Self {
            client,
            seq,
            key,
            value,
        })
    }
}

pub(crate) fn decode_words(bytes: &[u8]) -> Option<Vec<u64>> {
    if !bytes.len().is_multiple_of(8) {
        return None;
    }
    Some(
        bytes
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect(),
    )
}

/// Snapshot bytes that do not decode.
#[derive(Debug)]
pub struct BadSnapshot;

impl std::error::Error for BadSnapshot {}

impl std::fmt::Display for BadSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("malformed kv snapshot")
    }
}

/// Registers plus the last sequence number applied per client.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KvStore {
    /// Register values; absent means 0.
    pub values: BTreeMap<u64, u64>,
    /// Last applied sequence number per client.
    pub sessions: BTreeMap<u64, u64>,
    /// Index of the last applied entry.
    pub applied: LogIndex,
}

impl KvStore {
    /// A register's value.
    pub fn read(&self, key: u64) -> u64 {
        self.values.get(&key).copied().unwrap_or(0)
    }

    /// Note that a non-command entry (no-op, membership) was applied.
    pub fn skip(&mut self, index: LogIndex) {
        self.applied = index;
    }

    /// A hash of the whole state, to compare replicas.
    pub fn digest(&self) -> u64 {
        let mut h = Fnv::default();
        for (k, v) in &self.values {
            h.write(*k);
            h.write(*v);
        }
        for (c, s) in &self.sessions {
            h.write(*c);
            h.write(*s);
        }
        h.write(self.applied);
        h.0
    }
}

impl StateMachine for KvStore {
    type Command = Put;
    /// Whether the write took effect now (false: a duplicate of one already applied).
    type Reply = bool;
    type RestoreError = BadSnapshot;

    fn apply(&mut self, index: LogIndex, put: Put) -> bool {
        self.applied = index;
        let last = self.sessions.entry(put.client).or_insert(0);
        if put.seq <= *last {
            return false;
        }
        *last = put.seq;
        self.values.insert(put.key, put.value);
        true
    }

    fn snapshot(&self) -> Vec<u8> {
        let mut words = vec![self.applied, self.values.len() as u64];
        words.extend(self.values.iter().flat_map(|(k, v)| [*k, *v]));
        words.extend(self.sessions.iter().flat_map(|(c, s)| [*c, *s]));
        words.iter().flat_map(|w| w.to_le_bytes()).collect()
    }

    fn restore(&mut self, data: &[u8]) -> Result<(), BadSnapshot> {
        let words = decode_words(data).ok_or(BadSnapshot)?;
        let (&applied, rest) = words.split_first().ok_or(BadSnapshot)?;
        let (&n, rest) = rest.split_first().ok_or(BadSnapshot)?;
        let n = usize::try_from(n).map_err(|_| BadSnapshot)?;
        if !rest.len().is_multiple_of(2) || rest.len() / 2 < n {
            return Err(BadSnapshot);
        }
        let (values, sessions) = rest.split_at(2 * n);
        self.values = values.chunks_exact(2).map(|p| (p[0], p[1])).collect();
        self.sessions = sessions.chunks_exact(2).map(|p| (p[0], p[1])).collect();
        self.applied = applied;
        Ok(())
    }
}

/// FNV-1a over 64-bit words: stable across runs and platforms.
#[derive(Clone, Debug)]
pub struct Fnv(pub u64);

impl Default for Fnv {
    fn default() -> Self {
        Self(0xCBF2_9CE4_8422_2325)
    }
}

impl Fnv {
    /// Mix in one word.
    pub fn write(&mut self, v: u64) {
        for b in v.to_le_bytes() {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01B3);
        }
    }

    /// Mix in bytes.
    pub fn write_bytes(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01B3);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicate_writes_apply_once_and_snapshots_round_trip() {
        let mut kv = KvStore::default();
        let put = Put {
            client: 1,
            seq: 1,
            key: 7,
            value: 42,
        };
        assert_eq!(Put::decode(&put.encode()), Some(put));
        assert!(kv.apply(1, put));
        assert!(
            !kv.apply(2, Put { value: 43, ..put }),
            "retry of seq 1 must not apply"
        );
        assert_eq!(kv.read(7), 42);
        let mut restored = KvStore::default();
        restored
            .restore(&kv.snapshot())
            .expect("own snapshot decodes");
        assert_eq!(restored, kv);
        assert!(restored.restore(&[1, 2, 3]).is_err());
        assert!(restored.restore(&[]).is_err());
    }
}
