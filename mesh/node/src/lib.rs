//! mesh-node: the I/O shell around mesh-core.
//!
//! [`storage`] keeps the Raft log, hard state and snapshots durable (segmented
//! write-ahead log with CRC32C per frame, group commit, torn-tail recovery); the
//! transport moves frames over mutually authenticated QUIC; the driver feeds the node
//! core and carries out its actions; admin serves `/health` and `/metrics`; faults are
//! what tests may inject into a running process.

pub mod admin;
pub mod driver;
pub mod faults;
pub mod metrics;
pub mod node;
pub mod storage;
pub mod transport;
