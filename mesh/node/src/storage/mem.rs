//! `MemLog`: the in-memory twin of [`super::FileLog`], for tests and simulation. Its
//! "disk" is shared between clones, so a clone taken before a simulated crash recovers
//! exactly what was persisted.

use super::{LogStore, Recovered, StorageError};
use mesh_core::raft::{Entry, HardState, Snapshot};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// An in-memory log store.
#[derive(Clone, Debug, Default)]
pub struct MemLog {
    durable: Arc<Mutex<Recovered>>,
}

impl MemLog {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// What a restart would load.
    pub fn recover(&self) -> Recovered {
        // A poisoned lock only means a test thread panicked; the data is still whole.
        self.durable
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl LogStore for MemLog {
    fn persist(
        &mut self,
        snapshot: Option<&Snapshot>,
        entries: &[Entry],
        hard_state: Option<HardState>,
    ) -> Result<(), StorageError> {
        let mut d = self.durable.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = snapshot {
            d.snapshot = Some(s.clone());
            d.entries.clear();
        }
        if let Some(first) = entries.first() {
            let base = d.snapshot.as_ref().map_or(0, |s| s.meta.index);
            let next = base + d.entries.len() as u64 + 1;
            if first.index > next || first.index <= base {
                return Err(StorageError::Corrupt {
                    path: PathBuf::from("<memory>"),
                    detail: format!(
                        "append at {} does not continue the log ending at {}",
                        first.index,
                        next - 1
                    ),
                });
            }
            d.entries.truncate((first.index - base - 1) as usize);
            d.entries.extend_from_slice(entries);
        }
        if let Some(hs) = hard_state {
            d.hard_state = hs;
        }
        Ok(())
    }

    fn compact(&mut self, snapshot: &Snapshot) -> Result<(), StorageError> {
        let mut d = self.durable.lock().unwrap_or_else(|p| p.into_inner());
        let index = snapshot.meta.index;
        d.entries.retain(|e| e.index > index);
        d.snapshot = Some(snapshot.clone());
        Ok(())
    }
}
