//! The node core driven by hand: exact actions for one input at a time.

use super::*;
use crate::raft::Membership;
use crate::services::envelope::Envelope;
use crate::services::lock::{LockCommand, LockReply, Mode};

fn t(ms: u64) -> Time {
    Time {
        mono_ms: ms,
        wall_ms: 1_700_000_000_000 + ms,
    }
}

/// A few nodes wired by hand: messages are delivered and persists completed only when
/// the test says so.
struct Cluster {
    nodes: Vec<Node>,
    now: u64,
    /// Undelivered messages.
    wire: Vec<Message>,
    /// Outstanding persist tokens, per node.
    persists: Vec<Option<u64>>,
    replies: Vec<(NodeId, CallId, ClientResponse)>,
    /// Test client number -> the session the log assigned it.
    sessions: BTreeMap<u64, u64>,
    next_call: CallId,
    /// Snapshot views the nodes asked to have encoded, not yet handed back.
    views: Vec<(NodeId, SnapshotView)>,
}

impl Cluster {
    fn new(n: u64) -> Self {
        Self::with_config(n, |_| {})
    }

    fn with_config(n: u64, set: impl Fn(&mut NodeConfig)) -> Self {
        let voters = Membership::with_voters(1..=n);
        let nodes = (1..=n)
            .map(|id| {
                let mut cfg = NodeConfig::new(id);
                cfg.raft.seed = id;
                set(&mut cfg);
                let state = InitialState {
                    hard_state: HardState::default(),
                    snapshot: None,
                    entries: Vec::new(),
                    membership: voters.clone(),
                };
                Node::new(cfg, state, t(0)).expect("valid")
            })
            .collect();
        Self {
            nodes,
            now: 0,
            wire: Vec::new(),
            persists: vec![None; n as usize],
            replies: Vec::new(),
            sessions: BTreeMap::new(),
            next_call: 1_000,
            views: Vec::new(),
        }
    }

    fn node(&mut self, id: NodeId) -> &mut Node {
        &mut self.nodes[(id - 1) as usize]
    }

    /// Collect a node's actions; returns them too.
    fn collect(&mut self, id: NodeId) -> Vec<Action> {
        let actions = self.node(id).take_actions();
        for a in &actions {
            match a {
                Action::Send(m) => self.wire.push(m.clone()),
                Action::Persist(p) => self.persists[(id - 1) as usize] = Some(p.token),
                Action::Reply { call, response } => {
                    self.replies.push((id, *call, response.clone()))
                }
                Action::Snapshot(view) => self.views.push((id, view.clone())),
                _ => {}
            }
        }
        actions
    }

    /// Deliver everything and complete every persist until quiet.
    fn settle(&mut self) {
        for _ in 0..1000 {
            let mut busy = false;
            for id in 1..=self.nodes.len() as u64 {
                self.collect(id);
                if let Some(token) = self.persists[(id - 1) as usize].take() {
                    let now = t(self.now);
                    self.node(id).persisted(now, token);
                    busy = true;
                }
            }
            for m in std::mem::take(&mut self.wire) {
                let now = t(self.now);
                self.node(m.to).step(now, m);
                busy = true;
            }
            if !busy {
                return;
            }
        }
        panic!("cluster did not settle");
    }

    fn elect(&mut self) -> NodeId {
        for _ in 0..200 {
            self.now += 10;
            for id in 1..=self.nodes.len() as u64 {
                let now = t(self.now);
                self.node(id).tick(now);
            }
            self.settle();
            if let Some(n) = self.nodes.iter().find(|n| n.raft().role() == Role::Leader) {
                let id = n.raft().id();
                // Let the leader apply its own no-op, so it knows its term's base.
                self.settle();
                return id;
            }
        }
        panic!("no leader");
    }

    /// The session of test client `client`, opened through the log on first use.
    fn session(&mut self, node: NodeId, client: u64) -> u64 {
        if let Some(&s) = self.sessions.get(&client) {
            return s;
        }
        self.next_call += 1;
        let id = self.next_call;
        let bytes =
            postcard::to_stdvec(&Envelope::new(0, 0, 0, Command::OpenSession)).expect("encode");
        let now = t(self.now);
        self.node(node).call(now, id, ClientRequest::Propose(bytes));
        self.settle();
        let Some(Reply::SessionOpened { session }) = self.reply_to(id) else {
            panic!("no session opened");
        };
        self.sessions.insert(client, session);
        session
    }

    fn call(&mut self, node: NodeId, id: CallId, client: u64, seq: u64, command: Command) {
        let session = self.session(node, client);
        let e = Envelope::new(session, seq, seq, command);
        let bytes = postcard::to_stdvec(&e).expect("encode");
        let now = t(self.now);
        self.node(node).call(now, id, ClientRequest::Propose(bytes));
    }

    fn reply_to(&self, call: CallId) -> Option<Reply> {
        self.replies
            .iter()
            .find(|r| r.1 == call)
            .map(|r| match &r.2 {
                ClientResponse::Applied { result, .. } => {
                    postcard::from_bytes(result).expect("reply")
                }
                other => panic!("call {call}: {other:?}"),
            })
    }
}

fn acquire(key: &str, client: &str, mode: Mode, wait_ms: u64) -> Command {
    Command::Lock(LockCommand::Acquire {
        key: key.into(),
        client: client.into(),
        mode,
        ttl_ms: 60_000,
        wait_ms,
    })
}

/// Regression (an upgrade answered as granted): c1 and c2 hold S; c1 asks X with a
/// wait. Nothing is answered while c2 holds S; c2's release answers that very call with
/// X.
#[test]
fn an_upgrade_is_answered_only_once_it_holds_x() {
    let mut c = Cluster::new(3);
    let l = c.elect();
    c.call(l, 1, 1, 1, acquire("U", "c1", Mode::S, 0));
    c.call(l, 2, 2, 1, acquire("U", "c2", Mode::S, 0));
    c.settle();
    c.call(l, 3, 1, 2, acquire("U", "c1", Mode::X, 1_500));
    c.settle();
    assert_eq!(c.reply_to(3), None, "no answer while c2 still holds S");
    c.call(
        l,
        4,
        2,
        2,
        Command::Lock(LockCommand::Release {
            key: "U".into(),
            client: "c2".into(),
        }),
    );
    c.settle();
    assert!(matches!(
        c.reply_to(3),
        Some(Reply::Lock(LockReply::Granted { mode: Mode::X, .. }))
    ));
}

#[test]
fn a_cancelled_waiting_call_is_withdrawn_through_the_log() {
    let mut c = Cluster::new(3);
    let l = c.elect();
    c.call(l, 1, 1, 1, acquire("A", "h", Mode::X, 0));
    c.call(l, 2, 2, 1, acquire("A", "w", Mode::X, 10_000));
    c.settle();
    assert_eq!(c.nodes[0].services().locks().view("A").waiters.len(), 1);
    let now = t(c.now);
    c.node(l).cancel(now, 2);
    c.settle();
    for n in &c.nodes {
        assert!(
            n.services().locks().view("A").waiters.is_empty(),
            "withdrawn everywhere"
        );
    }
    assert_eq!(c.reply_to(2), None, "nobody to answer");
}

/// Raft thesis 10.2.1: the leader sends its appends before its own fsync; a follower
/// answers an append only after the entries are durable.
#[test]
fn leader_appends_leave_before_its_fsync_follower_answers_after() {
    let mut c = Cluster::new(3);
    let l = c.elect();
    c.call(l, 1, 1, 1, Command::Tick);
    let actions = c.collect(l);
    let persist = actions.iter().position(|a| matches!(a, Action::Persist(_)));
    let append = actions.iter().position(
        |a| matches!(a, Action::Send(m) if matches!(m.body, MessageBody::AppendEntries { .. })),
    );
    assert!(persist.is_some() && append.is_some(), "{actions:?}");
    let f = if l == 1 { 2 } else { 1 };
    let to_f: Vec<Message> = c.wire.iter().filter(|m| m.to == f).cloned().collect();
    c.wire.retain(|m| m.to != f);
    for m in to_f {
        let now = t(c.now);
        c.node(f).step(now, m);
    }
    let actions = c.collect(f);
    assert!(actions.iter().any(|a| matches!(a, Action::Persist(_))));
    assert!(
        !actions.iter().any(|a| matches!(a, Action::Send(_))),
        "no answer before the follower's persist: {actions:?}"
    );
    let token = c.persists[(f - 1) as usize].take().expect("persist");
    let now = t(c.now);
    c.node(f).persisted(now, token);
    let actions = c.collect(f);
    assert!(actions.iter().any(
        |a| matches!(a, Action::Send(m) if matches!(m.body, MessageBody::AppendEntriesResp { .. }))
    ));
}

/// Lock leases run on the leader's monotonic time: a wall clock that jumps an hour
/// forward (or back) changes nothing; the lease ends after its ttl of monotonic time.
#[test]
fn wall_clock_steps_change_no_lease() {
    let mut c = Cluster::new(1);
    let l = c.elect();
    c.call(
        l,
        1,
        1,
        1,
        Command::Lock(LockCommand::Acquire {
            key: "A".into(),
            client: "c1".into(),
            mode: Mode::X,
            ttl_ms: 1_000,
            wait_ms: 0,
        }),
    );
    c.settle();
    let start = c.now;
    for step in 1..=9 {
        c.now = start + step * 100;
        let wall = if step % 2 == 0 { 3_600_000 } else { 0 };
        let now = Time {
            mono_ms: c.now,
            wall_ms: 1_700_000_000_000 + c.now + wall,
        };
        c.node(l).tick(now);
        c.settle();
        assert_eq!(
            c.nodes[0].services().locks().view("A").holders.len(),
            1,
            "{step}"
        );
    }
    c.now = start + 1_050;
    let now = t(c.now);
    c.node(l).tick(now);
    c.settle();
    assert!(
        c.nodes[0].services().locks().view("A").holders.is_empty(),
        "expired by its ttl"
    );
}

/// A snapshot from the leader that does not decode stops the node with an error (the
/// shell exits cleanly) instead of a panic, and nothing of it is persisted.
#[test]
fn an_undecodable_snapshot_from_the_leader_is_an_error_not_a_panic() {
    let mut c = Cluster::new(3);
    let l = c.elect();
    let f = if l == 1 { 2 } else { 1 };
    let m = install_snapshot(&c, l, f, vec![0xFF; 16]);
    let now = t(c.now);
    c.node(f).step(now, m);
    let actions = c.node(f).take_actions();
    let job = restore_job(&actions);
    let now = t(c.now);
    c.node(f).snapshot_restored(now, job.decode());
    let actions = c.node(f).take_actions();
    assert!(c.nodes[(f - 1) as usize]
        .fatal()
        .is_some_and(|w| w.contains("does not decode")));
    assert!(
        !actions.iter().any(|a| matches!(a, Action::Persist(_))),
        "nothing persisted: {actions:?}"
    );
}

/// A follower decodes a snapshot from the leader off its loop: meanwhile it takes the
/// leader's heartbeats and its ticks, never stands for election, and persists nothing of
/// the snapshot; once it is back, the snapshot is persisted and installed.
#[test]
fn a_snapshot_from_the_leader_is_decoded_off_the_loop_while_heartbeats_go_on() {
    let mut c = Cluster::new(3);
    let l = c.elect();
    let f = if l == 1 { 2 } else { 1 };
    let data = c.nodes[(l - 1) as usize].services().snapshot();
    let m = install_snapshot(&c, l, f, data);
    let now = t(c.now);
    c.node(f).step(now, m);
    let actions = c.node(f).take_actions();
    let job = restore_job(&actions);
    assert!(!actions.iter().any(|a| matches!(a, Action::Persist(_))));
    // A second of heartbeats and ticks while the job runs elsewhere: 3 to 6 election
    // timeouts. The other two nodes run as usual.
    for _ in 0..100 {
        c.now += 10;
        let now = t(c.now);
        for id in 1..=3 {
            c.node(id).tick(now);
        }
        for _ in 0..100 {
            let mut wire = Vec::new();
            for id in (1..=3).filter(|&id| id != f) {
                for a in c.node(id).take_actions() {
                    match a {
                        Action::Send(m) => wire.push(m),
                        Action::Persist(p) => c.node(id).persisted(now, p.token),
                        _ => {}
                    }
                }
            }
            let actions = c.node(f).take_actions();
            assert!(
                !actions.iter().any(|a| match a {
                    Action::Persist(_) | Action::Restore(_) => true,
                    // (The cache agent's forwards to the leader go on.)
                    Action::Send(m) => !matches!(m.body, MessageBody::Forward { .. }),
                    _ => false,
                }),
                "no Raft answer until the snapshot is back: {actions:?}"
            );
            if wire.is_empty() {
                break;
            }
            for m in wire {
                let to = m.to;
                c.node(to).step(now, m);
            }
        }
        assert_eq!(c.nodes[(f - 1) as usize].raft().role(), Role::Follower);
        assert_eq!(c.nodes[(f - 1) as usize].raft().leader(), Some(l));
    }
    let now = t(c.now);
    c.node(f).snapshot_restored(now, job.decode());
    let actions = c.node(f).take_actions();
    assert!(
        actions.iter().any(
            |a| matches!(a, Action::Persist(p) if p.snapshot.as_ref().is_some_and(|s| s.meta.index == 50))
        ),
        "persisted once decoded: {actions:?}"
    );
    assert!(actions.iter().any(|a| matches!(
        a,
        Action::Event(NodeEvent::SnapshotInstalled { index: 50, .. })
    )));
    assert!(c.nodes[(f - 1) as usize].fatal().is_none());
}

/// An InstallSnapshot at index 50 from `l` to `f` carrying `data`, in one chunk.
fn install_snapshot(c: &Cluster, l: NodeId, f: NodeId, data: Vec<u8>) -> Message {
    use crate::raft::SnapshotMeta;
    let meta = SnapshotMeta {
        index: 50,
        term: c.nodes[(l - 1) as usize].raft().term(),
        membership: Membership::with_voters(1..=3),
    };
    Message {
        from: l,
        to: f,
        term: meta.term,
        body: MessageBody::InstallSnapshot {
            meta,
            offset: 0,
            data,
            done: true,
        },
    }
}

fn restore_job(actions: &[Action]) -> RestoreJob {
    actions
        .iter()
        .find_map(|a| match a {
            Action::Restore(job) => Some(job.clone()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("a restore job: {actions:?}"))
}

/// Apply `n` small commands through `l` as client 9 (sequence numbers from `seq`).
fn ticks(c: &mut Cluster, l: NodeId, seq: &mut u64, n: u64) {
    for _ in 0..n {
        *seq += 1;
        let id = 50_000 + *seq;
        c.call(l, id, 9, *seq, Command::Tick);
        c.settle();
    }
}

/// Encode and hand back every snapshot view the leader asked for: how many there were.
fn take_snapshots(c: &mut Cluster, l: NodeId) -> usize {
    let views: Vec<SnapshotView> = std::mem::take(&mut c.views)
        .into_iter()
        .filter(|(id, _)| *id == l)
        .map(|(_, v)| v)
        .collect();
    for v in &views {
        let now = t(c.now);
        c.node(l).snapshot_encoded(now, v.index, v.encode());
        c.settle();
    }
    views.len()
}

/// A big state is not encoded again every `snapshot_every` entries: the next snapshot
/// waits until the log since the last one is as big as it (the growth rule), and at
/// most 20 times `snapshot_every` entries; with the rule off, entries alone count.
#[test]
fn a_big_state_is_snapshotted_when_the_log_has_grown_by_its_size() {
    use crate::services::queue::{Field, NewMessage, QueueCommand};
    for pct in [100, 0] {
        let mut c = Cluster::with_config(3, |cfg| {
            cfg.snapshot_every = 5;
            cfg.snapshot_log_growth_pct = pct;
        });
        let l = c.elect();
        let big = Command::Queue(QueueCommand::Enqueue {
            queue: "q".into(),
            messages: vec![NewMessage {
                key: "k".into(),
                value: format!("\"{}\"", "v".repeat(100_000)).into_bytes(),
                field: Field::Value,
                dedup_id: None,
            }],
        });
        c.call(l, 1, 1, 1, big);
        c.settle();
        let mut seq = 0;
        ticks(&mut c, l, &mut seq, 6);
        assert_eq!(
            take_snapshots(&mut c, l),
            1,
            "the first snapshot is due by count"
        );
        let first = c.node(l).raft().snapshot_index();
        ticks(&mut c, l, &mut seq, 10);
        let taken = take_snapshots(&mut c, l);
        if pct == 0 {
            assert!(taken >= 1, "by entry count alone");
            continue;
        }
        assert_eq!(taken, 0, "ten small entries are not 100 kB of log");
        // The ceiling: 20 x 5 entries after the last snapshot at the latest.
        ticks(&mut c, l, &mut seq, 5 * SNAPSHOT_GROWTH_CEILING);
        assert_eq!(take_snapshots(&mut c, l), 1, "due by the ceiling");
        assert!(c.node(l).raft().snapshot_index() >= first + 5 * SNAPSHOT_GROWTH_CEILING);
    }
}

/// An encode that failed (no bytes) compacts nothing, and a later snapshot is taken.
#[test]
fn a_failed_snapshot_encode_compacts_nothing_and_snapshots_go_on() {
    let mut c = Cluster::with_config(3, |cfg| cfg.snapshot_every = 5);
    let l = c.elect();
    let mut seq = 0;
    ticks(&mut c, l, &mut seq, 6);
    let views = std::mem::take(&mut c.views);
    let view = views
        .into_iter()
        .find(|(id, _)| *id == l)
        .map(|(_, v)| v)
        .expect("a view");
    let now = t(c.now);
    c.node(l).snapshot_encoded(now, view.index, Vec::new());
    let actions = c.collect(l);
    assert!(
        actions
            .iter()
            .any(|a| matches!(a, Action::Event(NodeEvent::SnapshotFailed { .. }))),
        "{actions:?}"
    );
    assert!(!actions.iter().any(|a| matches!(a, Action::Compact(_))));
    assert_eq!(c.node(l).raft().snapshot_index(), 0, "nothing compacted");
    ticks(&mut c, l, &mut seq, 1);
    assert_eq!(take_snapshots(&mut c, l), 1, "the next snapshot is taken");
    assert!(c.node(l).raft().snapshot_index() > 0);
}

// --- The cache: the MESI protocol through three node cores -------------------------

use crate::services::cache::{CacheAnswer, CacheCall, CacheCommand, CacheStats, Mesi};

impl Cluster {
    /// Let `ms` pass in ticks of 10 ms, delivering everything.
    fn run_ms(&mut self, ms: u64) {
        for _ in 0..ms / 10 {
            self.now += 10;
            for id in 1..=self.nodes.len() as u64 {
                let now = t(self.now);
                self.node(id).tick(now);
            }
            self.settle();
        }
    }

    /// A cache call at node `at`, run until answered (at most 10 s of ticks).
    fn cache(&mut self, at: NodeId, call: CacheCall) -> CacheAnswer {
        self.next_call += 1;
        let id = self.next_call;
        let bytes = postcard::to_stdvec(&call).expect("encode");
        let now = t(self.now);
        self.node(at).call(now, id, ClientRequest::Local(bytes));
        for _ in 0..1_000 {
            self.settle();
            if let Some(r) = self.replies.iter().find(|r| r.1 == id) {
                let ClientResponse::Local(bytes) = &r.2 else {
                    panic!("cache call {id}: {:?}", r.2);
                };
                return postcard::from_bytes(bytes).expect("answer");
            }
            self.run_ms(10);
        }
        panic!("cache call {id} at node{at} not answered");
    }

    fn put(&mut self, at: NodeId, key: &str, val: &str) -> CacheAnswer {
        self.cache(
            at,
            CacheCall::Put {
                key: key.into(),
                value: val.as_bytes().to_vec(),
                ttl_ms: None,
                durable: None,
            },
        )
    }

    fn get(&mut self, at: NodeId, key: &str) -> CacheAnswer {
        self.cache(at, CacheCall::Get { key: key.into() })
    }

    /// The state `key` is served in at every node.
    fn states(&self, key: &str) -> Vec<Mesi> {
        self.nodes
            .iter()
            .map(|n| n.cache().serving_state(key, self.now))
            .collect()
    }

    /// One tick of 10 ms with everything to or from `cut` lost.
    fn tick_without(&mut self, cut: NodeId) {
        self.now += 10;
        for n in 1..=self.nodes.len() as u64 {
            let now = t(self.now);
            self.node(n).tick(now);
        }
        for _ in 0..50 {
            for n in 1..=self.nodes.len() as u64 {
                self.collect(n);
                if let Some(token) = self.persists[(n - 1) as usize].take() {
                    let now = t(self.now);
                    self.node(n).persisted(now, token);
                }
            }
            let wire: Vec<Message> = std::mem::take(&mut self.wire)
                .into_iter()
                .filter(|m| m.from != cut && m.to != cut)
                .collect();
            if wire.is_empty() {
                break;
            }
            for m in wire {
                let now = t(self.now);
                self.node(m.to).step(now, m);
            }
        }
    }

    /// `key` stored as `val` by a durable put at `at`, then evicted there: nobody holds it.
    fn store_unheld(&mut self, at: NodeId, key: &str, val: &str) {
        let durable = CacheCall::Put {
            key: key.into(),
            value: val.as_bytes().to_vec(),
            ttl_ms: None,
            durable: Some(true),
        };
        assert_eq!(
            self.cache(at, durable),
            CacheAnswer::Put {
                state: Mesi::Exclusive
            }
        );
        self.cache(at, CacheCall::Evict { key: key.into() });
    }

    /// The answer to cache call `id`, if it came.
    fn cache_answer(&self, id: CallId) -> Option<CacheAnswer> {
        self.replies.iter().find(|r| r.1 == id).map(|r| match &r.2 {
            ClientResponse::Local(bytes) => postcard::from_bytes(bytes).expect("answer"),
            other => panic!("{other:?}"),
        })
    }

    fn stats(&self, id: NodeId) -> CacheStats {
        self.nodes[(id - 1) as usize].cache().stats(self.now)
    }
}

fn got(val: &str, state: Mesi) -> CacheAnswer {
    CacheAnswer::Got {
        hit: true,
        value: Some(val.as_bytes().to_vec()),
        state,
    }
}

/// The protocol walk of the cache's issue, through the node cores: M at the writer,
/// S at both after a read elsewhere, I everywhere else after a write elsewhere, E for a
/// read nobody else holds, and no directory traffic for a write to an owned line.
#[test]
fn the_mesi_walk_invalidates_downgrades_and_hits_locally() {
    use Mesi::{Exclusive as E, Invalid as I, Modified as M, Shared as S};
    let mut c = Cluster::new(3);
    c.elect();
    c.run_ms(500);
    assert_eq!(c.put(1, "k", "v1"), CacheAnswer::Put { state: M });
    assert_eq!(c.states("k"), [M, I, I]);
    assert_eq!(
        c.get(1, "k"),
        got("v1", M),
        "a hit on the writer's own line"
    );
    assert_eq!(
        c.get(2, "k"),
        got("v1", S),
        "the owner wrote back and shares"
    );
    assert_eq!(c.states("k"), [S, S, I]);
    assert_eq!(c.put(3, "k", "v3"), CacheAnswer::Put { state: M });
    assert_eq!(c.states("k"), [I, I, M]);
    assert_eq!(c.get(1, "k"), got("v3", S));
    assert_eq!(
        c.get(2, "nowhere"),
        CacheAnswer::Got {
            hit: false,
            value: None,
            state: I
        }
    );
    // Evicted at its writer, then read elsewhere: E there, with the written-back value.
    assert_eq!(c.put(2, "e", "w"), CacheAnswer::Put { state: M });
    assert_eq!(
        c.cache(2, CacheCall::Evict { key: "e".into() }),
        CacheAnswer::Evicted {
            was: M,
            lost: false
        }
    );
    assert_eq!(c.states("e"), [I, I, I]);
    assert_eq!(c.get(1, "e"), got("w", E));
    // A write to an owned line needs no directory traffic.
    let before = c.stats(1);
    assert_eq!(c.put(1, "e", "w2"), CacheAnswer::Put { state: M });
    let after = c.stats(1);
    assert_eq!(after.requests, before.requests, "no directory request");
    assert_eq!(after.local_puts, before.local_puts + 1);
    assert_eq!(c.get(3, "e"), got("w2", S));
    // A durable put leaves E.
    assert_eq!(
        c.cache(
            2,
            CacheCall::Put {
                key: "d".into(),
                value: b"x".to_vec(),
                ttl_ms: None,
                durable: Some(true),
            }
        ),
        CacheAnswer::Put { state: E }
    );
    assert_eq!(c.states("d"), [I, E, I]);
    assert_eq!(c.get(3, "d"), got("x", S));
    assert!(c.stats(1).invalidations >= 1 && c.stats(2).writebacks >= 1);
}

/// A TTL makes the key a miss everywhere, and never brings back the value before it.
#[test]
fn a_ttl_makes_the_key_a_miss_everywhere() {
    let mut c = Cluster::new(3);
    c.elect();
    c.run_ms(500);
    assert_eq!(
        c.put(1, "t", "old"),
        CacheAnswer::Put {
            state: Mesi::Modified
        }
    );
    assert_eq!(c.get(2, "t"), got("old", Mesi::Shared));
    let ttl = CacheCall::Put {
        key: "t".into(),
        value: b"new".to_vec(),
        ttl_ms: Some(1_000),
        durable: None,
    };
    assert_eq!(
        c.cache(3, ttl),
        CacheAnswer::Put {
            state: Mesi::Modified
        }
    );
    assert_eq!(c.get(1, "t"), got("new", Mesi::Shared));
    c.run_ms(1_500);
    for at in 1..=3 {
        assert_eq!(
            c.get(at, "t"),
            CacheAnswer::Got {
                hit: false,
                value: None,
                state: Mesi::Invalid
            },
            "node{at} after the TTL"
        );
    }
}

/// A write completes once the other copy is invalid: a holder that cannot be reached
/// stops serving when its own lease runs out, and the write completes once the
/// directory's lease for it ran out, never before.
#[test]
fn a_write_waits_for_an_unreachable_holder_s_lease() {
    let mut c = Cluster::new(3);
    let l = c.elect();
    c.run_ms(500);
    let cut = (1..=3).find(|&n| n != l).expect("a follower");
    let writer = (1..=3).find(|&n| n != l && n != cut).expect("another");
    assert_eq!(
        c.put(cut, "p", "a"),
        CacheAnswer::Put {
            state: Mesi::Modified
        }
    );
    c.run_ms(200);
    // Cut `cut` off: nothing to or from it is delivered.
    let started = c.now;
    c.next_call += 1;
    let id = c.next_call;
    let call = CacheCall::Put {
        key: "p".into(),
        value: b"b".to_vec(),
        ttl_ms: None,
        durable: None,
    };
    let now = t(c.now);
    c.node(writer).call(
        now,
        id,
        ClientRequest::Local(postcard::to_stdvec(&call).expect("encode")),
    );
    let mut stopped_serving = None;
    for _ in 0..400 {
        c.tick_without(cut);
        if stopped_serving.is_none()
            && c.nodes[(cut - 1) as usize]
                .cache()
                .serving_state("p", c.now)
                == Mesi::Invalid
        {
            stopped_serving = Some(c.now);
        }
        if c.replies.iter().any(|r| r.1 == id) {
            break;
        }
    }
    let answered = c.now;
    let stopped = stopped_serving.expect("the cut-off holder stopped serving");
    assert!(
        c.replies.iter().any(|r| r.1 == id),
        "the write completed once the holder's lease ran out"
    );
    assert!(
        stopped < answered,
        "the holder stopped serving ({stopped}) before the write completed ({answered})"
    );
    assert!(
        answered - started >= 1_500,
        "the write waited for the lease ({} ms)",
        answered - started
    );
    let reply = c.replies.iter().find(|r| r.1 == id).map(|r| r.2.clone());
    let Some(ClientResponse::Local(bytes)) = reply else {
        panic!("not a cache answer: {reply:?}");
    };
    let answer: CacheAnswer = postcard::from_bytes(&bytes).expect("answer");
    assert_eq!(
        answer,
        CacheAnswer::Put {
            state: Mesi::Modified
        }
    );
    assert_eq!(c.get(writer, "p"), got("b", Mesi::Modified));
}

/// A clean owned line whose TTL ran out on its holder's clock ends the stored value
/// too: a miss at the holder is never followed by a hit elsewhere with no put between
/// (the holder's expiry comes before the directory's, by the lease margin).
#[test]
fn a_ttl_expiry_at_a_clean_owner_ends_the_stored_value() {
    let mut c = Cluster::new(3);
    c.elect();
    c.run_ms(500);
    let put = CacheCall::Put {
        key: "d".into(),
        value: b"x".to_vec(),
        ttl_ms: Some(1_000),
        durable: Some(true),
    };
    assert_eq!(
        c.cache(1, put),
        CacheAnswer::Put {
            state: Mesi::Exclusive
        }
    );
    let miss = CacheAnswer::Got {
        hit: false,
        value: None,
        state: Mesi::Invalid,
    };
    // Step until the holder answers a miss (its own clock, with its margin).
    let mut at_holder = got("x", Mesi::Exclusive);
    for _ in 0..200 {
        at_holder = c.get(1, "d");
        if at_holder == miss {
            break;
        }
        c.run_ms(10);
    }
    assert_eq!(at_holder, miss, "the holder's line ran out");
    assert_eq!(c.get(2, "d"), miss, "and nobody reads the value back");
}

/// The cache directory hears only from the nodes' own agents: a client that proposes a
/// cache command (here a renewal in another node's name) is refused.
#[test]
fn a_client_cannot_propose_a_cache_command() {
    let mut c = Cluster::new(3);
    let l = c.elect();
    c.run_ms(500);
    c.next_call += 1;
    let id = c.next_call;
    let forged = Envelope::new(
        0,
        0,
        0,
        Command::Cache(CacheCommand::Renew {
            node: 2,
            session: 1,
            renew: 99,
            applied: u64::MAX,
        }),
    );
    let now = t(c.now);
    c.node(l).call(
        now,
        id,
        ClientRequest::Propose(postcard::to_stdvec(&forged).expect("encode")),
    );
    c.settle();
    let reply = c.replies.iter().find(|r| r.1 == id).map(|r| r.2.clone());
    assert!(
        matches!(reply, Some(ClientResponse::Error { retry: false, .. })),
        "refused: {reply:?}"
    );
}

/// A read of ours that waited re-grants the key to us while our given-up (evicted) M
/// line is on its way back: the line's write-back must go under the new epoch, or the
/// directory refuses it as stale and an acknowledged put is lost, and the read must
/// answer the line's value, not the older stored one.
#[test]
fn a_regrant_while_an_evicted_line_is_written_back_keeps_its_write() {
    let mut c = Cluster::new(3);
    let l = c.elect();
    c.run_ms(500);
    let f = (1..=3).find(|&n| n != l).expect("a follower");
    let g = (1..=3).find(|&n| n != l && n != f).expect("another");
    // The key is stored, and nobody holds it.
    c.store_unheld(g, "r", "old");
    // Two gets at the follower at once: two reads go to the leader; the second is held
    // back on the wire.
    let get = postcard::to_stdvec(&CacheCall::Get { key: "r".into() }).expect("encode");
    let (a, b) = (c.next_call + 1, c.next_call + 2);
    c.next_call += 2;
    let now = t(c.now);
    c.node(f).call(now, a, ClientRequest::Local(get.clone()));
    c.node(f).call(now, b, ClientRequest::Local(get));
    c.collect(f);
    let forwards: Vec<usize> = c
        .wire
        .iter()
        .enumerate()
        .filter(|(_, m)| m.from == f && matches!(m.body, MessageBody::Forward { .. }))
        .map(|(i, _)| i)
        .collect();
    assert_eq!(forwards.len(), 2, "two reads forwarded");
    let held = c.wire.remove(forwards[1]);
    c.settle();
    assert_eq!(
        c.states("r")[(f - 1) as usize],
        Mesi::Exclusive,
        "the first read"
    );
    // A local put, then an eviction: the M line is given up and its write-back is due.
    assert_eq!(
        c.put(f, "r", "new"),
        CacheAnswer::Put {
            state: Mesi::Modified
        }
    );
    c.next_call += 1;
    let evict = c.next_call;
    let now = t(c.now);
    c.node(f).call(
        now,
        evict,
        ClientRequest::Local(
            postcard::to_stdvec(&CacheCall::Evict { key: "r".into() }).expect("encode"),
        ),
    );
    // The held read arrives first: it re-grants the key to f.
    c.wire.insert(0, held);
    c.settle();
    c.run_ms(500);
    let answer = |c: &Cluster, id: CallId| c.cache_answer(id);
    match answer(&c, b) {
        Some(CacheAnswer::Got { value, .. }) => {
            assert_eq!(value.as_deref(), Some(&b"new"[..]), "the held read")
        }
        other => panic!("the held read: {other:?}"),
    }
    assert!(
        matches!(
            answer(&c, evict),
            Some(CacheAnswer::Evicted { lost: false, .. })
        ),
        "the evicted line was written back: {:?}",
        answer(&c, evict)
    );
    assert_eq!(
        c.get(g, "r"),
        got("new", Mesi::Exclusive),
        "the put is kept"
    );
}

/// A caller that timed out and sends the same call again (same session and sequence
/// number) while the first copy is still in the leader's log waits on that entry: no
/// second entry is appended, so retries do not slow a slow log further. The retry gets
/// the answer; the copy it replaced hears that it was replaced.
#[test]
fn a_retried_call_waits_on_the_entry_already_in_the_log() {
    // The client hedges a slow call by sending it to every node, the leader included:
    // the copy must join the entry beside the first, and both hear its answer (when
    // the copy replaced the first, the first heard "unknown" at once, and the client
    // took that as its round's answer).
    let mut c = Cluster::new(3);
    let l = c.elect();
    c.run_ms(100);
    let session = c.session(l, 1);
    let envelope = |seq, command| {
        postcard::to_stdvec(&Envelope::new(session, seq, 1, command)).expect("encode")
    };
    let before = c.nodes[(l - 1) as usize].status().last_index;
    let now = t(c.now);
    let bytes = envelope(1, acquire("R", "c1", Mode::X, 0));
    c.node(l)
        .call(now, 1, ClientRequest::Propose(bytes.clone()));
    c.node(l).call(now, 2, ClientRequest::Propose(bytes));
    let after = c.nodes[(l - 1) as usize].status().last_index;
    assert_eq!(after, before + 1, "one entry for both copies");
    c.settle();
    let (first, second) = (c.reply_to(1), c.reply_to(2));
    assert!(
        matches!(first, Some(Reply::Lock(LockReply::Granted { .. }))),
        "{first:?}"
    );
    assert_eq!(first, second, "both copies hear the entry's answer");

    // A copy whose caller went away does not withdraw a wait the other copy takes up.
    let now = t(c.now);
    let bytes = envelope(2, acquire("R", "c2", Mode::X, 5_000));
    c.node(l)
        .call(now, 3, ClientRequest::Propose(bytes.clone()));
    c.node(l).call(now, 4, ClientRequest::Propose(bytes));
    c.node(l).cancel(now, 3);
    c.settle();
    assert!(c.replies.iter().all(|r| r.1 != 3 && r.1 != 4), "both wait");
    let now = t(c.now);
    let release = envelope(
        3,
        Command::Lock(LockCommand::Release {
            key: "R".into(),
            client: "c1".into(),
        }),
    );
    c.node(l).call(now, 5, ClientRequest::Propose(release));
    c.settle();
    assert!(
        matches!(c.reply_to(4), Some(Reply::Lock(LockReply::Granted { .. }))),
        "the copy still there is granted when the holder releases"
    );
    assert!(
        c.replies.iter().all(|r| r.1 != 3),
        "the cancelled copy is not answered"
    );
}
