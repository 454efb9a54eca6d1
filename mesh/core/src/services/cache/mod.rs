//! The MESI-coherent cache: every node holds lines under leases, and a replicated
//! directory decides who may hold what.
//!
//! Built in steps. Here so far: [`lines::CacheLines`], the node-local line table (bounded
//! LRU with TTLs, served from memory). The replicated directory, the leases and the
//! node core's driving of both come next; nothing is wired to the API yet.

pub mod lines;

pub use lines::{CacheLines, Evicted, Fill, Line, LineError, LineStats, Mesi};
