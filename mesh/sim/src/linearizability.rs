//! A linearizability checker for register histories (Wing & Gong, with the memoization
//! of Lowe and of porcupine).
//!
//! Operations are checked per key (a history of independent registers is linearizable
//! iff each register's sub-history is). The search walks the history in time order,
//! tentatively linearizing any call whose effect is consistent with the register's
//! current value, and backtracks when it meets the return of an operation it has not
//! linearized yet. States already explored, (set of linearized operations, value), are
//! cached so each is visited once.

use std::collections::{BTreeMap, HashSet};
use std::hash::Hash;

/// A sequential specification: what each operation does to the state, and whether the
/// result it returned is one the object could have given.
pub trait Model {
    /// The object's state.
    type State: Clone + Eq + Hash;
    /// An operation together with the result it returned.
    type Op;
    /// The state before any operation.
    fn init(&self) -> Self::State;
    /// The state after `op`, if `op`'s result is consistent with `state`.
    fn step(&self, state: &Self::State, op: &Self::Op) -> Option<Self::State>;
}

/// One call with its real-time interval (`ret: None` if it never returned).
#[derive(Clone, Debug)]
pub struct Call<Op> {
    /// Operation and result.
    pub op: Op,
    /// Invocation time.
    pub call: u64,
    /// Return time.
    pub ret: Option<u64>,
}

/// What a client did to a register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegisterOp {
    /// Set the value.
    Write(u64),
    /// Read the value; `None` while the read has not returned.
    Read(Option<u64>),
}

/// One operation with its real-time interval. Times are event sequence numbers, so no
/// two events share one.
#[derive(Clone, Copy, Debug)]
pub struct Operation {
    /// Register.
    pub key: u64,
    /// What was done.
    pub op: RegisterOp,
    /// When it was invoked.
    pub call: u64,
    /// When it returned; `None` if it never did (it may or may not have taken effect).
    pub ret: Option<u64>,
}

/// Why a history is not linearizable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// The register whose history has no valid order.
    pub key: u64,
    /// Number of operations on it.
    pub ops: usize,
}

/// Check a whole history, register by register.
pub fn check(history: &[Operation], initial: u64) -> Result<(), Violation> {
    let mut by_key: BTreeMap<u64, Vec<Operation>> = BTreeMap::new();
    for op in history {
        // A read that never returned constrains nothing.
        if op.ret.is_none() && matches!(op.op, RegisterOp::Read(_)) {
            continue;
        }
        by_key.entry(op.key).or_default().push(*op);
    }
    for (key, ops) in by_key {
        if !check_register(&ops, initial) {
            return Err(Violation {
                key,
                ops: ops.len(),
            });
        }
    }
    Ok(())
}

#[derive(Clone, Copy)]
struct Event {
    op: usize,
    is_call: bool,
    prev: usize,
    next: usize,
}

/// Doubly linked list of call/return events with a sentinel head at index 0.
struct EventList {
    events: Vec<Event>,
    /// Index of each op's call and return event.
    call_of: Vec<usize>,
    ret_of: Vec<usize>,
}

impl EventList {
    fn new(times: &[(u64, Option<u64>)]) -> Self {
        let mut order: Vec<(u64, usize, bool)> = Vec::new();
        for (i, (call, ret)) in times.iter().enumerate() {
            order.push((*call, i, true));
            order.push((ret.unwrap_or(u64::MAX), i, false));
        }
        order.sort_unstable_by_key(|&(t, i, is_call)| (t, !is_call, i));
        let n = order.len();
        let mut events = vec![Event {
            op: usize::MAX,
            is_call: false,
            prev: 0,
            next: 1,
        }];
        let mut call_of = vec![0; times.len()];
        let mut ret_of = vec![0; times.len()];
        for (k, &(_, op, is_call)) in order.iter().enumerate() {
            let idx = k + 1;
            events.push(Event {
                op,
                is_call,
                prev: idx - 1,
                next: idx + 1,
            });
            if is_call {
                call_of[op] = idx;
            } else {
                ret_of[op] = idx;
            }
        }
        // The last event's next is n + 1, meaning "end".
        events[0].next = if n == 0 { usize::MAX } else { 1 };
        if let Some(last) = events.last_mut() {
            if n > 0 {
                last.next = usize::MAX;
            }
        }
        Self {
            events,
            call_of,
            ret_of,
        }
    }

    fn head(&self) -> usize {
        self.events[0].next
    }

    fn unlink(&mut self, idx: usize) {
        let Event { prev, next, .. } = self.events[idx];
        self.events[prev].next = next;
        if next != usize::MAX {
            self.events[next].prev = prev;
        }
    }

    fn relink(&mut self, idx: usize) {
        let Event { prev, next, .. } = self.events[idx];
        self.events[prev].next = idx;
        if next != usize::MAX {
            self.events[next].prev = idx;
        }
    }

    /// Take an op's call and return out of the list (it is linearized).
    fn lift(&mut self, op: usize) {
        self.unlink(self.call_of[op]);
        self.unlink(self.ret_of[op]);
    }

    /// Put them back, in reverse order of removal.
    fn unlift(&mut self, op: usize) {
        self.relink(self.ret_of[op]);
        self.relink(self.call_of[op]);
    }
}

/// The register as a [`Model`].
struct RegisterModel(u64);

impl Model for RegisterModel {
    type State = u64;
    type Op = RegisterOp;

    fn init(&self) -> u64 {
        self.0
    }

    fn step(&self, state: &u64, op: &RegisterOp) -> Option<u64> {
        match *op {
            RegisterOp::Write(v) => Some(v),
            RegisterOp::Read(Some(v)) => (v == *state).then_some(*state),
            RegisterOp::Read(None) => Some(*state),
        }
    }
}

fn check_register(ops: &[Operation], initial: u64) -> bool {
    let calls: Vec<Call<RegisterOp>> = ops
        .iter()
        .map(|o| Call {
            op: o.op,
            call: o.call,
            ret: o.ret,
        })
        .collect();
    check_calls(&RegisterModel(initial), &calls)
}

/// Whether `calls` (all on one object) are linearizable with respect to `model`.
pub fn check_calls<M: Model>(model: &M, calls: &[Call<M::Op>]) -> bool {
    let times: Vec<(u64, Option<u64>)> = calls.iter().map(|c| (c.call, c.ret)).collect();
    let mut list = EventList::new(&times);
    let words = calls.len().div_ceil(64);
    let mut linearized = vec![0u64; words];
    let mut cache: HashSet<(Vec<u64>, M::State)> = HashSet::new();
    let mut stack: Vec<(usize, M::State)> = Vec::new();
    let mut state = model.init();
    let mut cursor = list.head();
    loop {
        if list.head() == usize::MAX || cursor == usize::MAX {
            return true;
        }
        let event = list.events[cursor];
        if event.is_call {
            if let Some(next_state) = model.step(&state, &calls[event.op].op) {
                let (w, b) = (event.op / 64, event.op % 64);
                linearized[w] |= 1 << b;
                if cache.insert((linearized.clone(), next_state.clone())) {
                    stack.push((event.op, std::mem::replace(&mut state, next_state)));
                    list.lift(event.op);
                    cursor = list.head();
                    continue;
                }
                linearized[w] &= !(1 << b);
            }
            cursor = event.next;
        } else if calls[event.op].ret.is_none() {
            // Returns of pending calls sort last: reaching one means every completed call
            // is linearized, and the pending ones need not be.
            return true;
        } else {
            let Some((op, previous)) = stack.pop() else {
                return false;
            };
            state = previous;
            linearized[op / 64] &= !(1 << (op % 64));
            list.unlift(op);
            cursor = list.events[list.call_of[op]].next;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(op: RegisterOp, call: u64, ret: u64) -> Operation {
        Operation {
            key: 0,
            op,
            call,
            ret: Some(ret),
        }
    }

    #[test]
    fn sequential_history_is_linearizable() {
        let h = [
            op(RegisterOp::Write(1), 1, 2),
            op(RegisterOp::Read(Some(1)), 3, 4),
        ];
        assert_eq!(check(&h, 0), Ok(()));
    }

    #[test]
    fn stale_read_after_completed_write_is_not() {
        let h = [
            op(RegisterOp::Write(1), 1, 2),
            op(RegisterOp::Read(Some(0)), 3, 4),
        ];
        assert_eq!(check(&h, 0), Err(Violation { key: 0, ops: 2 }));
    }

    #[test]
    fn concurrent_read_may_see_either_value() {
        for seen in [0, 1] {
            let h = [
                op(RegisterOp::Write(1), 1, 10),
                op(RegisterOp::Read(Some(seen)), 2, 3),
            ];
            assert_eq!(check(&h, 0), Ok(()), "read of {seen} overlapping the write");
        }
    }

    #[test]
    fn reads_must_not_go_back_in_time() {
        // w(1) overlaps both reads, but once one read saw 1 a later read cannot see 0.
        let h = [
            op(RegisterOp::Write(1), 1, 20),
            op(RegisterOp::Read(Some(1)), 2, 3),
            op(RegisterOp::Read(Some(0)), 4, 5),
        ];
        assert!(check(&h, 0).is_err());
    }

    #[test]
    fn pending_write_may_or_may_not_take_effect() {
        let pending = Operation {
            key: 0,
            op: RegisterOp::Write(5),
            call: 1,
            ret: None,
        };
        for seen in [0, 5] {
            let h = [pending, op(RegisterOp::Read(Some(seen)), 2, 3)];
            assert_eq!(check(&h, 0), Ok(()));
        }
        let h = [pending, op(RegisterOp::Read(Some(6)), 2, 3)];
        assert!(check(&h, 0).is_err());
    }

    #[test]
    fn keys_are_checked_independently() {
        let mut h = vec![op(RegisterOp::Write(1), 1, 2)];
        h.push(Operation {
            key: 9,
            op: RegisterOp::Read(Some(1)),
            call: 3,
            ret: Some(4),
        });
        assert_eq!(check(&h, 0), Err(Violation { key: 9, ops: 1 }));
    }
}
