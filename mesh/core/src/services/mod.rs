//! Replicated services: deterministic state machines applied from committed entries.
//!
//! Every service has the same shape, [`StateMachine`]: it is fed committed commands in log
//! order, never reads a clock (time arrives inside the command, stamped by the leader),
//! and can be captured into and restored from a snapshot. Same log, same state, on every
//! node.

pub mod cache;
pub mod envelope;
pub mod lock;
pub mod queue;
pub mod register;

use crate::raft::LogIndex;

/// A deterministic service replicated through the Raft log.
///
/// # Correctness
///
/// `apply` must be a pure function of the current state, the index and the command: no
/// clock, no randomness, no iteration over hash-ordered containers. `restore(snapshot())`
/// must reproduce a state that answers every later command exactly as the original does.
pub trait StateMachine {
    /// The command carried in a log entry.
    type Command;
    /// What applying a command answers to the client that proposed it.
    type Reply;
    /// Error returned when snapshot bytes cannot be decoded.
    type RestoreError: std::error::Error;

    /// Apply one committed command at `index`.
    fn apply(&mut self, index: LogIndex, command: Self::Command) -> Self::Reply;
    /// Serialize the whole state.
    fn snapshot(&self) -> Vec<u8>;
    /// Replace the whole state with one captured by [`StateMachine::snapshot`].
    fn restore(&mut self, data: &[u8]) -> Result<(), Self::RestoreError>;
}
