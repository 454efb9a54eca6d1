//! mesh-node: the I/O shell around mesh-core.
//!
//! [`storage`] keeps the Raft log, hard state and snapshots durable (segmented
//! write-ahead log with CRC32C per frame, group commit, torn-tail recovery). The
//! transport and the driver that ties core, storage and network together arrive with the
//! secure-mesh issue.

pub mod admin;
pub mod driver;
pub mod metrics;
pub mod node;
pub mod storage;
pub mod transport;
