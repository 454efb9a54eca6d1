//! mesh-core: the pure heart of syncmesh.
//!
//! Nothing in this crate performs I/O, reads a clock or draws entropy. The Raft core
//! ([`raft`]) is driven by its caller: messages, ticks and proposals go in; a
//! [`raft::Ready`] comes out, listing what to persist, what to send once that is durable
//! and what to apply. Replicated services ([`services`]) are deterministic state machines
//! fed from committed entries, so the same log gives the same state on every node.
//!
//! ```text
//!   step(msg) ─┐                        ┌─> persist snapshot, entries, hard state (one fsync)
//!   tick()    ─┼─> Raft ── ready() ─────┼─> then send messages
//!   propose() ─┤                        ├─> then apply committed entries, answer reads
//!   read_index┘                         └─> advance(persisted) ──> Raft
//! ```
#![deny(missing_docs)]
#![warn(clippy::too_many_lines, clippy::cognitive_complexity)]

pub mod node;
pub mod raft;
pub mod services;
pub mod wire;
