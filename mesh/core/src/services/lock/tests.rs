//! Model tests of the lock table: one command in, the exact reply and events out.

use super::*;
use std::collections::{BTreeMap, BTreeSet};

struct Table {
    t: LockTable,
    index: LogIndex,
    now: u64,
}

impl Table {
    fn new() -> Self {
        Self {
            t: LockTable::default(),
            index: 0,
            now: 1_000,
        }
    }

    fn apply(&mut self, cmd: LockCommand) -> (LockReply, Vec<LockEvent>) {
        self.index += 1;
        self.t.apply(self.index, self.now, cmd)
    }

    fn acquire(&mut self, key: &str, client: &str, mode: Mode, wait_ms: u64) -> LockReply {
        let cmd = LockCommand::Acquire {
            key: key.into(),
            client: client.into(),
            mode,
            ttl_ms: 10_000,
            wait_ms,
        };
        self.apply(cmd).0
    }

    fn release(&mut self, key: &str, client: &str) -> (LockReply, Vec<LockEvent>) {
        self.apply(LockCommand::Release {
            key: key.into(),
            client: client.into(),
        })
    }

    fn tick(&mut self, advance_ms: u64) -> Vec<LockEvent> {
        self.now += advance_ms;
        self.index += 1;
        self.t.advance(self.index, self.now)
    }
}

fn granted(r: &LockReply) -> Option<u64> {
    match r {
        LockReply::Granted { token, .. } => Some(*token),
        _ => None,
    }
}

fn granted_clients(events: &[LockEvent]) -> Vec<&str> {
    events
        .iter()
        .filter_map(|e| match e {
            LockEvent::Granted { client, .. } => Some(client.as_str()),
            _ => None,
        })
        .collect()
}

#[test]
fn compatibility_matrix() {
    for (first, second, compatible) in [
        (Mode::S, Mode::S, true),
        (Mode::S, Mode::X, false),
        (Mode::X, Mode::S, false),
        (Mode::X, Mode::X, false),
    ] {
        let mut t = Table::new();
        assert!(granted(&t.acquire("A", "c1", first, 0)).is_some());
        let r = t.acquire("A", "c2", second, 0);
        assert_eq!(
            granted(&r).is_some(),
            compatible,
            "{first:?} then {second:?}: {r:?}"
        );
        if !compatible {
            assert!(matches!(r, LockReply::Conflict { ref holders } if holders[0].client == "c1"));
        }
    }
}

#[test]
fn reacquire_is_idempotent_and_x_covers_s() {
    let mut t = Table::new();
    let token = granted(&t.acquire("A", "c1", Mode::X, 0));
    assert_eq!(granted(&t.acquire("A", "c1", Mode::X, 0)), token);
    assert_eq!(granted(&t.acquire("A", "c1", Mode::S, 0)), token);
}

#[test]
fn sole_shared_holder_upgrades_others_must_wait() {
    let mut t = Table::new();
    t.acquire("A", "c1", Mode::S, 0);
    let up = granted(&t.acquire("A", "c1", Mode::X, 0)).expect("sole holder upgrades");
    assert_eq!(t.t.view("A").mode, Some(Mode::X));
    assert!(up > 1, "the upgrade gets a fresh token");
    let mut t = Table::new();
    t.acquire("A", "c1", Mode::S, 0);
    t.acquire("A", "c2", Mode::S, 0);
    assert!(matches!(
        t.acquire("A", "c1", Mode::X, 0),
        LockReply::Conflict { .. }
    ));
}

#[test]
fn waiters_are_served_fifo_without_barging() {
    let mut t = Table::new();
    t.acquire("A", "holder", Mode::S, 0);
    assert!(matches!(
        t.acquire("A", "w1", Mode::X, 5_000),
        LockReply::Queued { .. }
    ));
    // A later S request is compatible with the S holder but must not pass the waiting X.
    assert!(matches!(
        t.acquire("A", "w2", Mode::S, 5_000),
        LockReply::Queued { .. }
    ));
    assert!(matches!(
        t.acquire("A", "w3", Mode::S, 5_000),
        LockReply::Queued { .. }
    ));
    let (_, events) = t.release("A", "holder");
    assert_eq!(granted_clients(&events), vec!["w1"]);
    let (_, events) = t.release("A", "w1");
    assert_eq!(
        granted_clients(&events),
        vec!["w2", "w3"],
        "consecutive S waiters go together"
    );
}

#[test]
fn release_hands_over_in_the_same_apply_with_a_larger_token() {
    let mut t = Table::new();
    let first = granted(&t.acquire("A", "c1", Mode::X, 0)).expect("granted");
    t.acquire("A", "c2", Mode::X, 5_000);
    let (reply, events) = t.release("A", "c1");
    assert_eq!(reply, LockReply::Released);
    match &events[..] {
        [LockEvent::Granted { client, token, .. }] => {
            assert_eq!(client, "c2");
            assert!(*token > first, "fencing tokens increase");
        }
        other => panic!("expected one grant, got {other:?}"),
    }
}

#[test]
fn fencing_tokens_increase_strictly_per_key() {
    let mut t = Table::new();
    let mut last = 0;
    for i in 0..20 {
        let client = format!("c{i}");
        let token = granted(&t.acquire("A", &client, Mode::X, 0)).expect("free lock");
        assert!(token > last);
        last = token;
        t.release("A", &client);
    }
}

#[test]
fn waits_time_out_by_leader_time() {
    let mut t = Table::new();
    t.acquire("A", "c1", Mode::X, 0);
    assert!(matches!(
        t.acquire("A", "c2", Mode::X, 500),
        LockReply::Queued { .. }
    ));
    assert!(t.tick(499).is_empty());
    let events = t.tick(1);
    assert!(
        matches!(&events[..], [LockEvent::TimedOut { client, holders, .. }] if client == "c2" && holders[0].client == "c1")
    );
    assert!(t.t.view("A").waiters.is_empty());
}

#[test]
fn expired_lease_releases_and_wakes_the_next_waiter() {
    let mut t = Table::new();
    t.apply(LockCommand::Acquire {
        key: "A".into(),
        client: "c1".into(),
        mode: Mode::X,
        ttl_ms: 1_000,
        wait_ms: 0,
    });
    t.acquire("A", "c2", Mode::X, 60_000);
    assert!(t.tick(999).is_empty(), "not yet");
    let events = t.tick(1);
    assert!(matches!(&events[0], LockEvent::Expired { client, .. } if client == "c1"));
    assert_eq!(granted_clients(&events), vec!["c2"]);
}

#[test]
fn renew_extends_every_lease_of_a_client() {
    let mut t = Table::new();
    for key in ["A", "B"] {
        t.apply(LockCommand::Acquire {
            key: key.into(),
            client: "c1".into(),
            mode: Mode::X,
            ttl_ms: 1_000,
            wait_ms: 0,
        });
    }
    t.now += 800;
    assert_eq!(
        t.apply(LockCommand::Renew {
            client: "c1".into()
        })
        .0,
        LockReply::Renewed { locks: 2 }
    );
    assert!(t.tick(800).is_empty(), "renewed at 800 for another 1000");
    assert_eq!(t.tick(200).len(), 2, "both expire at 1800");
}

#[test]
fn time_never_runs_backwards() {
    let mut t = Table::new();
    t.apply(LockCommand::Acquire {
        key: "A".into(),
        client: "c1".into(),
        mode: Mode::X,
        ttl_ms: 1_000,
        wait_ms: 0,
    });
    t.tick(5_000);
    // An older time handed in must not resurrect anything.
    t.now -= 4_000;
    t.tick(0);
    assert_eq!(t.t.now_ms(), 6_000);
    assert!(t.t.view("A").holders.is_empty());
}

#[test]
fn two_client_deadlock_is_refused_naming_the_cycle() {
    let mut t = Table::new();
    t.acquire("A", "c1", Mode::X, 0);
    t.acquire("B", "c2", Mode::X, 0);
    assert!(matches!(
        t.acquire("B", "c1", Mode::X, 5_000),
        LockReply::Queued { .. }
    ));
    match t.acquire("A", "c2", Mode::X, 5_000) {
        LockReply::Deadlock { cycle } => assert_eq!(cycle, vec!["c2", "c1", "c2"]),
        other => panic!("expected deadlock, got {other:?}"),
    }
    assert_eq!(t.t.deadlocks(), 1);
    assert!(
        t.t.view("A").waiters.is_empty(),
        "the refused request does not wait"
    );
}

/// The table remembers the newest refusals with their cycles, for the console, and no
/// more than [`RECENT_DEADLOCKS`] of them.
#[test]
fn the_newest_deadlock_refusals_are_kept_with_their_cycles() {
    let mut t = Table::new();
    t.acquire("A", "c1", Mode::X, 0);
    t.acquire("B", "c2", Mode::X, 0);
    t.acquire("B", "c1", Mode::X, 5_000);
    for _ in 0..RECENT_DEADLOCKS + 2 {
        assert!(matches!(
            t.acquire("A", "c2", Mode::X, 5_000),
            LockReply::Deadlock { .. }
        ));
    }
    let recent: Vec<&DeadlockRefusal> = t.t.recent_deadlocks().collect();
    assert_eq!(recent.len(), RECENT_DEADLOCKS);
    assert_eq!(t.t.deadlocks(), RECENT_DEADLOCKS as u64 + 2);
    assert_eq!(recent[0].key, "A");
    assert_eq!(recent[0].cycle, vec!["c2", "c1", "c2"]);
}

#[test]
fn three_client_deadlock_is_refused_naming_the_cycle() {
    let mut t = Table::new();
    for (key, client) in [("A", "c1"), ("B", "c2"), ("C", "c3")] {
        t.acquire(key, client, Mode::X, 0);
    }
    assert!(matches!(
        t.acquire("B", "c1", Mode::X, 5_000),
        LockReply::Queued { .. }
    ));
    assert!(matches!(
        t.acquire("C", "c2", Mode::X, 5_000),
        LockReply::Queued { .. }
    ));
    match t.acquire("A", "c3", Mode::X, 5_000) {
        LockReply::Deadlock { cycle } => assert_eq!(cycle, vec!["c3", "c1", "c2", "c3"]),
        other => panic!("expected deadlock, got {other:?}"),
    }
}

#[test]
fn shared_upgrades_by_two_holders_deadlock() {
    let mut t = Table::new();
    t.acquire("A", "c1", Mode::S, 0);
    t.acquire("A", "c2", Mode::S, 0);
    assert!(matches!(
        t.acquire("A", "c1", Mode::X, 5_000),
        LockReply::Queued { .. }
    ));
    assert!(matches!(
        t.acquire("A", "c2", Mode::X, 5_000),
        LockReply::Deadlock { .. }
    ));
}

#[test]
fn release_of_a_lock_not_held_names_the_holders() {
    let mut t = Table::new();
    assert_eq!(
        t.release("A", "c1").0,
        LockReply::NotHeld { holders: vec![] }
    );
    t.acquire("A", "c2", Mode::X, 0);
    assert!(
        matches!(t.release("A", "c1").0, LockReply::NotHeld { ref holders } if holders[0].client == "c2")
    );
}

#[test]
fn invalid_input_is_refused() {
    let mut t = Table::new();
    assert!(matches!(
        t.acquire("", "c1", Mode::X, 0),
        LockReply::Invalid(_)
    ));
    assert!(matches!(
        t.acquire(&"k".repeat(MAX_KEY_BYTES + 1), "c1", Mode::X, 0),
        LockReply::Invalid(_)
    ));
    assert!(matches!(
        t.acquire("A", "", Mode::X, 0),
        LockReply::Invalid(_)
    ));
}

#[test]
fn state_survives_a_snapshot() {
    let mut t = Table::new();
    t.acquire("A", "c1", Mode::X, 0);
    t.acquire("A", "c2", Mode::S, 5_000);
    let bytes = postcard::to_stdvec(&t.t).expect("encode");
    let mut restored: LockTable = postcard::from_bytes(&bytes).expect("decode");
    assert_eq!(restored, t.t);
    let (_, events) = restored.apply(
        100,
        t.now,
        LockCommand::Release {
            key: "A".into(),
            client: "c1".into(),
        },
    );
    assert_eq!(granted_clients(&events), vec!["c2"]);
}

/// The naive wait-for search, over the whole graph, from the public view of the table:
/// a waiter waits for the holders whose mode it cannot share and for the waiters ahead of
/// it that it cannot be granted together with (never for a compatible waiter ahead).
fn naive_deadlock(t: &LockTable, key: &str, client: &str, mode: Mode) -> bool {
    let conflicts = |want: Mode, other: Mode| want == Mode::X || other == Mode::X;
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for v in t.list(usize::MAX) {
        for (i, w) in v.waiters.iter().enumerate() {
            let holders = v
                .holders
                .iter()
                .filter(|h| conflicts(w.mode, h.mode))
                .map(|h| &h.client);
            let ahead = v.waiters[..i]
                .iter()
                .filter(|a| conflicts(w.mode, a.mode))
                .map(|a| &a.client);
            for target in holders.chain(ahead).filter(|c| **c != w.client) {
                edges
                    .entry(w.client.clone())
                    .or_default()
                    .insert(target.clone());
            }
        }
    }
    let view = t.view(key);
    let mut stack: Vec<String> = view
        .holders
        .iter()
        .filter(|h| conflicts(mode, h.mode))
        .map(|h| h.client.clone())
        .chain(
            view.waiters
                .iter()
                .filter(|w| conflicts(mode, w.mode))
                .map(|w| w.client.clone()),
        )
        .filter(|c| c != client)
        .collect();
    let mut seen: BTreeSet<String> = stack.iter().cloned().collect();
    while let Some(n) = stack.pop() {
        if n == client {
            return true;
        }
        for m in edges.get(&n).into_iter().flatten() {
            if seen.insert(m.clone()) {
                stack.push(m.clone());
            }
        }
    }
    false
}

/// Regression: H holds K(X); A waits for K(S); B holds M(X) and waits for K(S) behind A.
/// A asking M(X) is no deadlock: when H releases K, A and B get S together, and B then
/// releases M. (The old search gave every waiter an edge to every waiter ahead of it and
/// refused A with the cycle A -> B -> A.)
#[test]
fn compatible_waiters_do_not_wait_for_each_other() {
    let mut t = Table::new();
    t.acquire("K", "H", Mode::X, 0);
    assert!(matches!(
        t.acquire("K", "A", Mode::S, 5_000),
        LockReply::Queued { .. }
    ));
    t.acquire("M", "B", Mode::X, 0);
    assert!(matches!(
        t.acquire("K", "B", Mode::S, 5_000),
        LockReply::Queued { .. }
    ));
    assert!(!naive_deadlock(&t.t, "M", "A", Mode::X));
    let r = t.acquire("M", "A", Mode::X, 5_000);
    assert!(matches!(r, LockReply::Queued { .. }), "{r:?}");
    let (_, events) = t.release("K", "H");
    assert_eq!(granted_clients(&events), vec!["A", "B"]);
    let (_, events) = t.release("M", "B");
    assert_eq!(granted_clients(&events), vec!["A"]);
    // An X request does wait for the S waiter ahead of it: that cycle is real.
    let mut t = Table::new();
    t.acquire("K", "H", Mode::X, 0);
    t.acquire("M", "B", Mode::X, 0);
    t.acquire("K", "A", Mode::S, 5_000);
    t.acquire("K", "B", Mode::X, 5_000);
    assert!(matches!(
        t.acquire("M", "A", Mode::X, 5_000),
        LockReply::Deadlock { .. }
    ));
}

#[test]
fn a_withdrawn_wait_lets_the_next_go_and_a_raced_grant_is_released_by_token() {
    let mut t = Table::new();
    t.acquire("A", "h", Mode::S, 0);
    let LockReply::Queued { wait } = t.acquire("A", "x", Mode::X, 5_000) else {
        panic!("X waits behind S");
    };
    assert!(matches!(
        t.acquire("A", "s", Mode::S, 5_000),
        LockReply::Queued { .. }
    ));
    t.index += 1;
    let events = t.t.withdraw_wait(t.index, "A", wait).expect("was queued");
    assert_eq!(
        granted_clients(&events),
        vec!["s"],
        "S behind the withdrawn X goes"
    );
    assert!(t.t.withdraw_wait(t.index, "A", wait).is_none());
    // A grant that raced its withdrawal is released; a later hold of the same client
    // under another token is not touched.
    let token = granted(&t.acquire("B", "c", Mode::X, 0)).expect("free");
    t.release("B", "c");
    let later = granted(&t.acquire("B", "c", Mode::X, 0)).expect("free");
    t.index += 1;
    assert!(t
        .t
        .withdraw_grant(t.index, "B", "c", token, Mode::X)
        .is_none());
    assert_eq!(t.t.view("B").holders[0].token, later);
    assert!(t
        .t
        .withdraw_grant(t.index, "B", "c", later, Mode::X)
        .is_some());
    assert!(t.t.view("B").holders.is_empty());
    assert_eq!(t.t.stats().grants_withdrawn, 1);
    assert_eq!(t.t.stats().waits_withdrawn, 1);
}

/// Seed 19199: one entry granted c's waiting S call and, at once, c's waiting X call
/// (the upgrade of the only holder), both under that entry's token. Withdrawing the S
/// call took the token for the upgrade's and turned the X hold back into S, while the X
/// call's answer said X; another client's S was then granted beside it.
#[test]
fn withdrawing_an_s_grant_upgraded_in_the_same_entry_keeps_the_x_hold() {
    let mut t = Table::new();
    t.acquire("K", "h", Mode::X, 0);
    assert!(matches!(
        t.acquire("K", "c", Mode::S, 5_000),
        LockReply::Queued { .. }
    ));
    assert!(matches!(
        t.acquire("K", "c", Mode::X, 5_000),
        LockReply::Queued { .. }
    ));
    let (_, events) = t.release("K", "h");
    let tokens: Vec<(Mode, u64)> = events
        .iter()
        .filter_map(|e| match e {
            LockEvent::Granted { mode, token, .. } => Some((*mode, *token)),
            _ => None,
        })
        .collect();
    assert_eq!(tokens, vec![(Mode::S, t.index), (Mode::X, t.index)]);
    let token = t.index;
    t.index += 1;
    // The S call gives up: c keeps X (its X call holds it) ...
    assert!(t
        .t
        .withdraw_grant(t.index, "K", "c", token, Mode::S)
        .is_some());
    let view = t.t.view("K");
    assert_eq!(view.holders.len(), 1);
    assert_eq!(view.holders[0].mode, Mode::X);
    assert!(matches!(
        t.acquire("K", "o", Mode::S, 0),
        LockReply::Conflict { .. }
    ));
    // ... and when the X call gives up too, nothing of the hold is left to anyone.
    t.index += 1;
    assert!(t
        .t
        .withdraw_grant(t.index, "K", "c", token, Mode::X)
        .is_some());
    assert!(t.t.view("K").holders.is_empty());
    // Withdrawing the X call alone goes back to the S hold it upgraded.
    t.acquire("L", "c", Mode::S, 0);
    let s = t.index;
    let x = granted(&t.acquire("L", "c", Mode::X, 0)).expect("only holder upgrades");
    t.index += 1;
    assert!(t.t.withdraw_grant(t.index, "L", "c", x, Mode::X).is_some());
    let view = t.t.view("L");
    assert_eq!((view.holders[0].mode, view.holders[0].token), (Mode::S, s));
}

#[test]
fn deadlock_search_agrees_with_the_naive_graph_search() {
    let mut seed = 0x1234_5678_9ABC_DEF1u64;
    let mut next = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let mut deadlocks = 0;
    for _ in 0..200 {
        let mut t = Table::new();
        for _ in 0..60 {
            let key = format!("k{}", next(3));
            let client = format!("c{}", next(5));
            if next(4) == 0 {
                t.release(&key, &client);
                continue;
            }
            let mode = if next(2) == 0 { Mode::X } else { Mode::S };
            let held =
                t.t.view(&key)
                    .holders
                    .iter()
                    .any(|h| h.client == client && h.mode >= mode);
            let would_queue = !held
                && (!t.t.view(&key).waiters.is_empty()
                    || !t
                        .t
                        .view(&key)
                        .holders
                        .iter()
                        .all(|h| h.client == client || (mode == Mode::S && h.mode == Mode::S)));
            let queued_already =
                t.t.view(&key)
                    .waiters
                    .iter()
                    .any(|w| w.client == client && w.mode == mode);
            let expect =
                would_queue && !queued_already && naive_deadlock(&t.t, &key, &client, mode);
            let reply = t.acquire(&key, &client, mode, 60_000);
            assert_eq!(
                matches!(reply, LockReply::Deadlock { .. }),
                expect,
                "{key} {client} {mode:?}: {reply:?}"
            );
            deadlocks += usize::from(expect);
        }
    }
    assert!(
        deadlocks > 20,
        "the workload produced deadlocks to compare: {deadlocks}"
    );
}
