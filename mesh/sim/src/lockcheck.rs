//! Checks of the lock history recorded by the simulator's clients.
//!
//! With leases far longer than a run and no waiting, a key's lock is a plain sequential
//! object: an acquire is granted exactly when the mode is compatible with the other
//! holders (re-acquiring what one holds is granted again, an S holder alone upgrades), and
//! a release succeeds exactly when the client holds the key. Every key's history must be
//! linearizable against that object, and a fencing token names one grant only.

use crate::linearizability::{check_calls, Call, Model};
use mesh_core::services::lock::Mode;
use std::collections::BTreeMap;

/// What a client asked of a lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockCall {
    /// Acquire in a mode.
    Acquire(Mode),
    /// Release.
    Release,
}

/// What the cluster answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockOutcome {
    /// Granted, holding `mode`, with a fencing token.
    Granted {
        /// Mode held.
        mode: Mode,
        /// Fencing token.
        token: u64,
    },
    /// Refused: incompatible holders.
    Conflict,
    /// Released.
    Released,
    /// The client did not hold it.
    NotHeld,
}

/// One recorded lock operation.
#[derive(Clone, Debug)]
pub struct LockOp {
    /// Lock key.
    pub key: u64,
    /// Client.
    pub client: u64,
    /// What was asked.
    pub call: LockCall,
    /// The answer (`None`: never answered).
    pub outcome: Option<LockOutcome>,
    /// Invocation time.
    pub invoked: u64,
    /// Return time.
    pub returned: Option<u64>,
}

struct LockModel;

type Holders = BTreeMap<u64, Mode>;

impl Model for LockModel {
    type State = Holders;
    type Op = (u64, LockCall, Option<LockOutcome>);

    fn init(&self) -> Holders {
        Holders::new()
    }

    fn step(&self, holders: &Holders, &(client, call, outcome): &Self::Op) -> Option<Holders> {
        let mut next = holders.clone();
        let expected = match call {
            LockCall::Acquire(mode) => match holders.get(&client) {
                Some(&held) if held >= mode => LockOutcome::Granted {
                    mode: held,
                    token: 0,
                },
                _ => {
                    let others = holders.iter().filter(|(c, _)| **c != client);
                    let compatible = match mode {
                        Mode::X => others.count() == 0,
                        Mode::S => others.into_iter().all(|(_, m)| *m == Mode::S),
                    };
                    if compatible {
                        next.insert(client, mode);
                        LockOutcome::Granted { mode, token: 0 }
                    } else {
                        LockOutcome::Conflict
                    }
                }
            },
            LockCall::Release => {
                if next.remove(&client).is_some() {
                    LockOutcome::Released
                } else {
                    LockOutcome::NotHeld
                }
            }
        };
        let matches = match (outcome, expected) {
            (None, _) => true,
            (Some(LockOutcome::Granted { mode, .. }), LockOutcome::Granted { mode: m, .. }) => {
                mode == m
            }
            (Some(got), want) => got == want,
        };
        matches.then_some(next)
    }
}

/// Check every key's history, and that each fencing token belongs to one grant.
pub fn check(history: &[LockOp]) -> Result<(), String> {
    let mut by_key: BTreeMap<u64, Vec<&LockOp>> = BTreeMap::new();
    for op in history {
        by_key.entry(op.key).or_default().push(op);
    }
    for (key, ops) in by_key {
        let mut owners: BTreeMap<u64, u64> = BTreeMap::new();
        for op in &ops {
            if let Some(LockOutcome::Granted { token, .. }) = op.outcome {
                if let Some(other) = owners.insert(token, op.client) {
                    if other != op.client {
                        return Err(format!(
                            "lock {key}: fencing token {token} granted to clients {other} and {}",
                            op.client
                        ));
                    }
                }
            }
        }
        let calls: Vec<Call<(u64, LockCall, Option<LockOutcome>)>> = ops
            .iter()
            .map(|o| Call {
                op: (o.client, o.call, o.outcome),
                call: o.invoked,
                ret: o.returned,
            })
            .collect();
        if !check_calls(&LockModel, &calls) {
            return Err(format!(
                "lock {key}: history of {} operations is not linearizable",
                calls.len()
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(client: u64, call: LockCall, outcome: LockOutcome, t: u64) -> LockOp {
        LockOp {
            key: 0,
            client,
            call,
            outcome: Some(outcome),
            invoked: t,
            returned: Some(t + 1),
        }
    }

    #[test]
    fn a_correct_history_passes() {
        let h = [
            op(
                1,
                LockCall::Acquire(Mode::X),
                LockOutcome::Granted {
                    mode: Mode::X,
                    token: 5,
                },
                0,
            ),
            op(2, LockCall::Acquire(Mode::S), LockOutcome::Conflict, 10),
            op(1, LockCall::Release, LockOutcome::Released, 20),
            op(
                2,
                LockCall::Acquire(Mode::S),
                LockOutcome::Granted {
                    mode: Mode::S,
                    token: 9,
                },
                30,
            ),
            op(
                3,
                LockCall::Acquire(Mode::S),
                LockOutcome::Granted {
                    mode: Mode::S,
                    token: 10,
                },
                40,
            ),
        ];
        assert_eq!(check(&h), Ok(()));
    }

    #[test]
    fn two_exclusive_holders_fail() {
        let h = [
            op(
                1,
                LockCall::Acquire(Mode::X),
                LockOutcome::Granted {
                    mode: Mode::X,
                    token: 5,
                },
                0,
            ),
            op(
                2,
                LockCall::Acquire(Mode::X),
                LockOutcome::Granted {
                    mode: Mode::X,
                    token: 6,
                },
                10,
            ),
        ];
        assert!(check(&h).is_err());
    }

    #[test]
    fn a_token_names_one_grant() {
        let h = [
            op(
                1,
                LockCall::Acquire(Mode::S),
                LockOutcome::Granted {
                    mode: Mode::S,
                    token: 5,
                },
                0,
            ),
            op(
                2,
                LockCall::Acquire(Mode::S),
                LockOutcome::Granted {
                    mode: Mode::S,
                    token: 5,
                },
                10,
            ),
        ];
        assert!(check(&h).unwrap_err().contains("fencing token"));
    }
}
