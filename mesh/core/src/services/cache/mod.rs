//! The MESI-coherent cache: every node holds lines under leases, and a replicated
//! directory decides who may hold what.
//!
//! ```text
//!   node A                         the log (every node applies it)            node B
//!   CacheAgent ── Request/Renew/ ──> CacheDirectory: owner, sharers, epoch, ──> CacheAgent
//!   CacheLines    WriteBack          version, written-back value; leases       CacheLines
//!        ^                                │ events: Granted, Revoke, ...           ^
//!        └────────────────────────────────┴────────────────────────────────────────┘
//! ```
//! [`lines::CacheLines`] is one node's line table (bounded LRU with TTLs, served from
//! memory); [`directory::CacheDirectory`] is the replicated record of who holds what;
//! [`agent::CacheAgent`] is the node's side of the protocol, run by the node core.

pub mod agent;
pub mod directory;
pub mod lines;

pub use agent::{
    AgentOutput, CacheAgent, CacheAnswer, CacheCall, CacheConfig, CacheError, CacheStats, LineView,
};
pub use directory::{
    CacheCommand, CacheDirectory, CacheEvent, CacheOp, CacheRefusal, DirectoryLimits, Grant, Keep,
    Outcome, RevokeMode, WriteBackLine, WriteBackRefusal, Written,
};
pub use lines::{CacheLines, Evicted, Fill, Line, LineError, LineStats, Mesi};
