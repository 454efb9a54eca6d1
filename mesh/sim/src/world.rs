//! The simulated world: N copies of the real node core (mesh-core `node`) over simulated
//! disks, a network that loses, duplicates, delays and partitions, clocks that drift
//! and step, clients with a recorded history, and a nemesis that crashes, restarts,
//! partitions, reconfigures, transfers leadership and steps wall clocks.
//!
//! Everything happens on one thread in virtual time; the only randomness is the run's
//! seed. One step is one event taken from the queue; the node core's actions are
//! executed the way the tokio driver executes them (persist then report, send, reply,
//! wake at), and the invariants are checked after each step.

use crate::cachecheck::{CacheClient, CacheHistory, CACHE_CLIENT_BASE};
use crate::client::{Client, ClientEvent};
use crate::invariants::{Invariants, NodeMarks};
use crate::kv::Fnv;
use crate::linearizability::{self, Operation};
use crate::lockcheck::HoldInterval;
use crate::params::SimParams;
use crate::rng::SimRng;
use mesh_core::node::{Action, CallId, Node, NodeConfig, NodeEvent, Persist, RestoreJob, Time};
use mesh_core::raft::{ConfChange, Membership, Message, NodeId, Role};
use mesh_core::wire::{ClientRequest, ClientResponse};
use mesh_node::storage::{LogStore, MemLog};
use std::collections::{BTreeMap, BTreeSet};

pub(crate) const TICK_MS: u64 = 10;
const LIVENESS_BUDGET_MS: u64 = 30_000;
/// Wall clocks start here (2023-11-14), so that steps back stay positive.
const EPOCH_MS: u64 = 1_700_000_000_000;

#[derive(Debug)]
pub(crate) enum Event {
    Wake {
        node: NodeId,
        incarnation: u64,
        generation: u64,
    },
    Deliver(Message),
    PersistDone {
        node: NodeId,
        incarnation: u64,
        token: u64,
    },
    /// A client's call reaches a node.
    Call {
        node: NodeId,
        call: CallId,
        request: ClientRequest,
    },
    /// A client gives up on a call at a node (its connection closed).
    Cancel {
        node: NodeId,
        call: CallId,
    },
    Client(ClientEvent),
    /// A cache client starts its next operation.
    CacheStart(u64),
    /// A cache client stops waiting for its `attempt`.
    CacheGiveUp {
        client: u64,
        attempt: u64,
    },
    Nemesis,
    /// A snapshot from the leader has been decoded off the node's loop (the job decodes
    /// when this is handled; meanwhile the node goes on taking messages and ticks).
    Restored {
        node: NodeId,
        incarnation: u64,
        job: RestoreJob,
    },
}

/// A node's clocks: monotonic time runs at `1 + drift_ppm / 1e6` of virtual time, and
/// the wall clock is monotonic time plus an offset the nemesis steps.
#[derive(Clone, Copy, Debug)]
struct SimClock {
    drift_ppm: i64,
    wall_offset_ms: i64,
}

impl SimClock {
    fn mono(&self, now: u64) -> u64 {
        let scaled = i128::from(now) * (1_000_000 + i128::from(self.drift_ppm)) / 1_000_000;
        scaled.max(0) as u64
    }

    /// The first virtual time at which the monotonic clock reads `mono` or more.
    fn virtual_at(&self, mono: u64) -> u64 {
        let rate = 1_000_000 + i128::from(self.drift_ppm);
        let v = (i128::from(mono) * 1_000_000 + rate - 1) / rate;
        v.max(0) as u64
    }

    fn time(&self, now: u64) -> Time {
        let mono_ms = self.mono(now);
        Time {
            mono_ms,
            wall_ms: (EPOCH_MS as i64 + mono_ms as i64 + self.wall_offset_ms).max(0) as u64,
        }
    }
}

struct SimNode {
    id: NodeId,
    bootstrap: Membership,
    node: Option<Node>,
    /// The node's disk: the same LogStore twin that the storage conformance suite holds
    /// to FileLog's behaviour. Only completed persists reach it.
    disk: MemLog,
    incarnation: u64,
    pending: Option<Persist>,
    /// Compactions ordered after the pending persist (the storage thread runs them in
    /// order).
    compactions: Vec<mesh_core::raft::Snapshot>,
    clock: SimClock,
    wake_generation: u64,
    marks: NodeMarks,
}

/// Counts of what a run exercised.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Coverage {
    /// Queued lock requests that were granted.
    pub waits_granted: u64,
    /// Leases that ran out.
    pub leases_expired: u64,
    /// Withdrawals that released a grant which had raced them.
    pub cancels_raced_grant: u64,
    /// Queued requests withdrawn before their grant.
    pub waits_withdrawn: u64,
    /// Requests refused for deadlock.
    pub deadlocks: u64,
    /// Upgrades (S holder asking X) that waited.
    pub upgrades_waited: u64,
    /// Wall-clock steps.
    pub clocks_stepped: u64,
    /// Answers lost on their way to a client.
    pub answers_lost: u64,
    /// Prompt calls sent to two nodes at once.
    pub hedges: u64,
    /// Queue deliveries after a message's first.
    pub queue_redeliveries: u64,
    /// Messages that became dead letters.
    pub queue_dead_letters: u64,
    /// Enqueues answered with an earlier message by their dedup id.
    pub queue_deduplicated: u64,
    /// Long polls answered with messages.
    pub queue_polls_woken: u64,
    /// Acks accepted.
    pub queue_acked: u64,
    /// Input batches (begin_batch .. end_batch) handed to a node.
    pub batches: u64,
    /// Snapshots from a leader decoded off a node's loop and handed back to it.
    pub snapshots_restored: u64,
    /// Cache gets answered.
    pub cache_gets: u64,
    /// Cache gets answered from a node's memory (no directory traffic).
    pub cache_local_hits: u64,
    /// Cache lines revoked because their holder's lease ran out.
    pub cache_lease_expiries: u64,
}

impl Coverage {
    /// Add another run's counts.
    pub fn add(&mut self, o: &Self) {
        self.waits_granted += o.waits_granted;
        self.leases_expired += o.leases_expired;
        self.cancels_raced_grant += o.cancels_raced_grant;
        self.waits_withdrawn += o.waits_withdrawn;
        self.deadlocks += o.deadlocks;
        self.upgrades_waited += o.upgrades_waited;
        self.clocks_stepped += o.clocks_stepped;
        self.answers_lost += o.answers_lost;
        self.hedges += o.hedges;
        self.queue_redeliveries += o.queue_redeliveries;
        self.queue_dead_letters += o.queue_dead_letters;
        self.queue_deduplicated += o.queue_deduplicated;
        self.queue_polls_woken += o.queue_polls_woken;
        self.queue_acked += o.queue_acked;
        self.batches += o.batches;
        self.snapshots_restored += o.snapshots_restored;
        self.cache_gets += o.cache_gets;
        self.cache_local_hits += o.cache_local_hits;
        self.cache_lease_expiries += o.cache_lease_expiries;
    }
}

/// Events that arrive this close together at one node may form one batch.
const BATCH_WINDOW_MS: u64 = 3;
/// Most events in one batch beyond the first.
const MAX_BATCH_EVENTS: usize = 32;

/// The node a message, call or cancel is for (what a node's driver would drain).
fn target_of(e: &Event) -> Option<NodeId> {
    match e {
        Event::Deliver(m) => Some(m.to),
        Event::Call { node, .. } | Event::Cancel { node, .. } => Some(*node),
        _ => None,
    }
}

/// Summary of a finished run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunReport {
    /// Events processed.
    pub steps: u64,
    /// Virtual milliseconds elapsed.
    pub virtual_ms: u64,
    /// Client operations completed.
    pub ops_completed: usize,
    /// Distinct committed entries.
    pub committed: usize,
    /// Terms that had a leader.
    pub leader_terms: usize,
    /// What the run exercised.
    pub coverage: Coverage,
    /// Hash of every event processed, for the determinism check.
    pub trace: u64,
}

/// A simulated cluster under test.
pub struct World {
    pub(crate) params: SimParams,
    pub(crate) rng: SimRng,
    pub(crate) now: u64,
    order: u64,
    queue: BTreeMap<(u64, u64), Event>,
    nodes: Vec<SimNode>,
    blocked: BTreeSet<(NodeId, NodeId)>,
    pub(crate) clients: Vec<Client>,
    /// Which client a call at a node belongs to.
    pub(crate) routes: BTreeMap<(NodeId, CallId), u64>,
    pub(crate) next_call: CallId,
    /// Logical clock for the register history.
    pub(crate) clock: u64,
    pub(crate) history: Vec<Operation>,
    pub(crate) holds: Vec<HoldInterval>,
    /// What each application holds, as it was told.
    pub(crate) app_holds: crate::client::AppHolds,
    /// A client saw an answer no correct cluster gives; reported at the next step.
    pub(crate) violation: Option<String>,
    invariants: Invariants,
    trace: Fnv,
    pub(crate) faults: bool,
    pub(crate) next_value: u64,
    pub(crate) coverage: Coverage,
    pub(crate) lock_ops: usize,
    /// What producers and consumers were told.
    pub(crate) queue_history: crate::queuecheck::QueueHistory,
    pub(crate) cache_clients: Vec<CacheClient>,
    pub(crate) cache_history: CacheHistory,
    /// Per node, its registration and the lease-expiry revokes of its lines seen so far
    /// (counted per registration).
    lapses_seen: BTreeMap<NodeId, (Option<u64>, u64)>,
    verbose: bool,
}

impl World {
    /// A world for one seed.
    pub fn new(seed: u64, params: SimParams, verbose: bool) -> Self {
        let mut rng = SimRng::new(seed);
        let founders = Membership::with_voters(1..=params.initial_voters);
        let drift = params.drift_ppm;
        let nodes = (1..=params.nodes)
            .map(|id| SimNode {
                id,
                bootstrap: if founders.is_voter(id) {
                    founders.clone()
                } else {
                    Membership::default()
                },
                node: None,
                disk: MemLog::new(),
                incarnation: 0,
                pending: None,
                compactions: Vec::new(),
                clock: SimClock {
                    drift_ppm: rng.range(0, 2 * drift) as i64 - drift as i64,
                    wall_offset_ms: 0,
                },
                wake_generation: 0,
                marks: NodeMarks::default(),
            })
            .collect();
        let cache_clients = params.cache_clients as usize;
        let clients = (0..params.clients)
            .map(|c| {
                let app = if params.shared_ids { c / 2 } else { c };
                Client::new(c, app, 1 + c % params.nodes)
            })
            .collect();
        let mut world = Self {
            rng,
            params,
            now: 0,
            order: 0,
            queue: BTreeMap::new(),
            nodes,
            blocked: BTreeSet::new(),
            clients,
            routes: BTreeMap::new(),
            next_call: 0,
            clock: 0,
            history: Vec::new(),
            holds: Vec::new(),
            app_holds: BTreeMap::new(),
            violation: None,
            invariants: Invariants::default(),
            trace: Fnv::default(),
            faults: true,
            next_value: 0,
            coverage: Coverage::default(),
            lock_ops: 0,
            queue_history: crate::queuecheck::QueueHistory::default(),
            cache_clients: vec![CacheClient::default(); cache_clients],
            cache_history: CacheHistory::default(),
            lapses_seen: BTreeMap::new(),
            verbose,
        };
        for id in 1..=world.params.nodes {
            let offset = world.rng.range(0, TICK_MS - 1);
            world.now = offset;
            // Cannot fail: a fresh, empty disk and the simulator's own valid config.
            world.start_node(id).expect("a fresh node starts");
        }
        world.now = 0;
        for c in 0..world.params.clients {
            let delay = world.rng.range(0, 50);
            world.schedule(delay, Event::Client(ClientEvent::Start(c)));
        }
        for c in 0..world.params.cache_clients {
            let delay = world.rng.range(200, 400);
            world.schedule(delay, Event::CacheStart(CACHE_CLIENT_BASE + c));
        }
        let first = world.params.nemesis_every_ms;
        world.schedule(first, Event::Nemesis);
        world
    }

    pub(crate) fn schedule(&mut self, delay_ms: u64, event: Event) {
        self.order += 1;
        self.queue.insert((self.now + delay_ms, self.order), event);
    }

    fn node_config(&self, id: NodeId) -> NodeConfig {
        let mut cfg = NodeConfig::new(id);
        // Each process of a node registers its cache anew (the driver picks a random
        // nonce; here the incarnation makes it unique).
        cfg.cache_nonce = (id << 32) | (self.nodes[(id - 1) as usize].incarnation + 1);
        cfg.cache.call_timeout_ms = 3_000;
        cfg.raft.election_ticks = 10;
        cfg.raft.heartbeat_ticks = 2;
        cfg.raft.max_entries_per_msg = self.params.max_entries_per_msg;
        cfg.raft.max_bytes_per_msg = 256;
        cfg.raft.max_inflight_msgs = self.params.max_inflight;
        cfg.raft.snapshot_chunk_bytes = self.params.snapshot_chunk_bytes;
        cfg.raft.seed = self.rng.clone().next_u64() ^ id;
        cfg.tick_ms = TICK_MS;
        cfg.snapshot_every = self.params.snapshot_every;
        // Both snapshot rules run: by entry count alone on the busiest setting, and with
        // the production default (log growth in proportion to the state) on the others.
        cfg.snapshot_log_growth_pct = if self.params.snapshot_every == 10 {
            0
        } else {
            100
        };
        cfg.call_timeout_ms = 2_000;
        cfg.wait_limit_ms = 5_000;
        cfg.trace_applies = true;
        cfg
    }

    fn start_node(&mut self, id: NodeId) -> Result<(), String> {
        let cfg = self.node_config(id);
        let now = self.now;
        let n = &mut self.nodes[(id - 1) as usize];
        let recovered = n.disk.recover();
        let term = recovered.hard_state.term;
        let state = recovered.into_initial_state(n.bootstrap.clone());
        let time = n.clock.time(now);
        let mut node = Node::new(cfg, state, time).map_err(|e| format!("node {id}: {e}"))?;
        node.tick(time);
        n.node = Some(node);
        n.incarnation += 1;
        n.pending = None;
        n.compactions.clear();
        n.marks = NodeMarks {
            term,
            ..NodeMarks::default()
        };
        self.run_actions(id)
    }

    fn crash_node(&mut self, id: NodeId) {
        self.cache_history.loss(id, self.clock);
        let n = &mut self.nodes[(id - 1) as usize];
        n.node = None;
        n.pending = None;
        n.compactions.clear();
        n.incarnation += 1;
    }

    pub(crate) fn log(&self, what: impl FnOnce() -> String) {
        if self.verbose {
            eprintln!("[{:>7}ms] {}", self.now, what());
        }
    }

    /// Run the fault phase, then heal and require liveness, then check the histories.
    pub fn run(&mut self) -> Result<RunReport, String> {
        let mut steps = 0;
        while steps < self.params.steps {
            self.step()?;
            steps += 1;
        }
        self.heal()?;
        let deadline = self.now + LIVENESS_BUDGET_MS;
        while !self.converged() {
            if self.now > deadline {
                return Err(format!(
                    "liveness: not converged {LIVENESS_BUDGET_MS} ms after healing ({})",
                    self.describe()
                ));
            }
            self.step()?;
            steps += 1;
        }
        self.finish_holds();
        crate::lockcheck::check(&self.holds).map_err(|e| format!("locks: {e}"))?;
        let left = self
            .nodes
            .iter()
            .filter_map(|n| n.node.as_ref())
            .max_by_key(|n| n.services().applied())
            .map(|n| {
                n.services()
                    .queues()
                    .message_ids(mesh_core::services::queue::DEFAULT_QUEUE)
            })
            .unwrap_or_default();
        self.queue_history
            .check(&left)
            .map_err(|e| format!("queue: {e}"))?;
        linearizability::check(&self.history, 0).map_err(|v| {
            format!(
                "linearizability: history of key {} ({} ops) has no valid order",
                v.key, v.ops
            )
        })?;
        self.cache_history.check()?;
        self.collect_coverage();
        Ok(RunReport {
            steps,
            virtual_ms: self.now,
            ops_completed: self.history.iter().filter(|o| o.ret.is_some()).count() + self.lock_ops,
            committed: self.invariants.committed_count(),
            leader_terms: self.invariants.leader_terms(),
            coverage: self.coverage.clone(),
            trace: self.trace.0,
        })
    }

    /// The lock counters of the most advanced replica.
    fn collect_coverage(&mut self) {
        let best = self
            .nodes
            .iter()
            .filter_map(|n| n.node.as_ref())
            .max_by_key(|n| n.services().applied());
        if let Some(n) = best {
            let s = n.services().lock_stats();
            self.coverage.waits_granted = s.waits_granted;
            self.coverage.leases_expired = s.leases_expired;
            self.coverage.cancels_raced_grant = s.grants_withdrawn;
            self.coverage.waits_withdrawn = s.waits_withdrawn;
            self.coverage.deadlocks = s.deadlocks;
            self.coverage.upgrades_waited = s.upgrades_waited;
            let q = n.services().queues().stats();
            self.coverage.queue_redeliveries = q.redeliveries;
            self.coverage.queue_dead_letters = q.dead_lettered;
            self.coverage.queue_deduplicated = q.deduplicated;
        }
        self.coverage.queue_polls_woken = self.queue_history.polls_woken;
        self.coverage.cache_gets = self.cache_history.gets;
        self.coverage.cache_local_hits = self
            .nodes
            .iter()
            .filter_map(|n| n.node.as_ref())
            .map(|n| n.cache().stats(0).hits)
            .sum::<u64>();
        self.coverage.queue_acked = self.queue_history.counts().2 as u64;
    }

    fn describe(&self) -> String {
        let nodes: Vec<String> = self
            .nodes
            .iter()
            .map(|n| match &n.node {
                Some(node) => {
                    let r = node.raft();
                    let s = r.status();
                    format!(
                        "n{}:{}@t{} leader {:?} last {} c{} a{} voters {:?} calls {}",
                        n.id,
                        s.role.name(),
                        s.term,
                        s.leader,
                        s.last_index,
                        s.commit,
                        node.services().applied(),
                        s.membership.voters,
                        node.calls_in_flight()
                    )
                }
                None => format!("n{}:down", n.id),
            })
            .collect();
        let busy = self.clients.iter().filter(|c| c.busy()).count();
        format!("{}; {busy} clients busy", nodes.join("; "))
    }

    fn heal(&mut self) -> Result<(), String> {
        self.log(|| "heal: faults stop, every node restarts".into());
        self.faults = false;
        self.blocked.clear();
        for id in 1..=self.params.nodes {
            if self.nodes[(id - 1) as usize].node.is_none() {
                self.start_node(id)?;
            }
        }
        Ok(())
    }

    /// A leader exists, every client is idle and every member has applied its commit.
    fn converged(&self) -> bool {
        if self.clients.iter().any(Client::busy) || self.cache_clients.iter().any(CacheClient::busy)
        {
            return false;
        }
        let Some(leader) = self
            .nodes
            .iter()
            .filter_map(|n| n.node.as_ref())
            .find(|n| n.raft().role() == Role::Leader)
        else {
            return false;
        };
        let st = leader.status();
        let converged = st.membership.members().all(|id| {
            self.nodes[(id - 1) as usize]
                .node
                .as_ref()
                .is_some_and(|n| {
                    n.status().commit == st.commit && n.services().applied() == st.commit
                })
        });
        converged
    }

    fn step(&mut self) -> Result<(), String> {
        let Some(((time, _), event)) = self.queue.pop_first() else {
            return Err("event queue ran dry".into());
        };
        self.now = time;
        self.trace.write(time);
        match target_of(&event) {
            Some(node) if self.params.batching && self.rng.chance(0.5) => {
                self.handle_batch(node, event)?;
            }
            _ => {
                if let Some(id) = self.handle(event)? {
                    self.run_actions(id)?;
                }
            }
        }
        if let Some(v) = self.violation.take() {
            return Err(v);
        }
        self.check_all()
    }

    /// Hand `node` the event and everything else for it that arrives within
    /// [`BATCH_WINDOW_MS`] as one batch, as the driver does with what it drained while
    /// it was busy.
    fn handle_batch(&mut self, node: NodeId, first: Event) -> Result<(), String> {
        let Some(n) = self.node_mut(node) else {
            return self.handle(first).map(|_| ());
        };
        n.begin_batch();
        self.handle(first)?;
        let until = (self.now + BATCH_WINDOW_MS, u64::MAX);
        let more: Vec<(u64, u64)> = self
            .queue
            .range((self.now, 0)..=until)
            .filter(|(_, e)| target_of(e) == Some(node))
            .map(|(k, _)| *k)
            .take(MAX_BATCH_EVENTS)
            .collect();
        for key in more {
            if let Some(e) = self.queue.remove(&key) {
                self.handle(e)?;
            }
        }
        let time = self.time_of(node);
        if let Some(n) = self.node_mut(node) {
            n.end_batch(time);
        }
        self.coverage.batches += 1;
        self.run_actions(node)
    }

    fn check_all(&mut self) -> Result<(), String> {
        for n in &mut self.nodes {
            if let Some(node) = &n.node {
                self.invariants.check_node(node.raft(), &mut n.marks)?;
                let locks = node.services().locks();
                locks
                    .check()
                    .map_err(|e| format!("node {}: lock table: {e}", n.id))?;
                node.services()
                    .queues()
                    .check()
                    .map_err(|e| format!("node {}: queues: {e}", n.id))?;
                if locks.audit_failures() > 0 {
                    return Err(format!(
                        "node {}: a deadlock decision disagrees with the reference search",
                        n.id
                    ));
                }
                node.services()
                    .cache()
                    .check()
                    .map_err(|e| format!("node {}: cache directory: {e}", n.id))?;
            }
        }
        self.check_cache()
    }

    /// The cache's single-writer rule, on every node's own clock (DESIGN section 6): a
    /// node that serves a key in M or E is the only node serving it. And each node's
    /// lease-expiry losses, for the history check.
    fn check_cache(&mut self) -> Result<(), String> {
        if self.params.cache_clients == 0 {
            return Ok(());
        }
        for key in crate::cachecheck::all_keys() {
            let name = crate::cachecheck::key_name(key);
            let mut owner = None;
            let mut serving = Vec::new();
            for n in &self.nodes {
                let Some(node) = &n.node else { continue };
                let state = node.cache().serving_state(&name, n.clock.mono(self.now));
                if state != mesh_core::services::cache::Mesi::Invalid {
                    serving.push((n.id, state));
                    if state.owned() {
                        owner = Some(n.id);
                    }
                }
            }
            if owner.is_some() && serving.len() > 1 {
                return Err(format!(
                    "cache: {name} is served by {serving:?}: an owner must be alone"
                ));
            }
        }
        let best = self
            .nodes
            .iter()
            .filter_map(|n| n.node.as_ref())
            .max_by_key(|n| n.services().applied());
        if let Some(best) = best {
            for id in 1..=self.params.nodes {
                let dir = best.services().cache();
                let (session, lapsed) = (dir.session_of(id), dir.lapsed_of(id));
                let seen = self.lapses_seen.entry(id).or_default();
                if seen.0 != session {
                    *seen = (session, 0);
                }
                if lapsed > seen.1 {
                    seen.1 = lapsed;
                    self.cache_history.loss(id, self.clock);
                    self.coverage.cache_lease_expiries += 1;
                }
            }
        }
        Ok(())
    }

    /// The node `id`'s time now.
    fn time_of(&self, id: NodeId) -> Time {
        self.nodes[(id - 1) as usize].clock.time(self.now)
    }

    fn node_mut(&mut self, id: NodeId) -> Option<&mut Node> {
        self.nodes
            .get_mut((id.max(1) - 1) as usize)
            .and_then(|n| n.node.as_mut())
    }

    fn handle(&mut self, event: Event) -> Result<Option<NodeId>, String> {
        match event {
            Event::Wake {
                node,
                incarnation,
                generation,
            } => {
                self.trace.write(1 + (node << 8));
                let n = &self.nodes[(node - 1) as usize];
                if n.incarnation != incarnation || n.wake_generation != generation {
                    return Ok(None);
                }
                let time = self.time_of(node);
                Ok(self.node_mut(node).map(|n| n.tick(time)).map(|()| node))
            }
            Event::Deliver(m) => {
                self.trace.write(2 + (m.from << 8) + (m.to << 16));
                if self.blocked.contains(&(m.from, m.to)) {
                    return Ok(None);
                }
                let to = m.to;
                let time = self.time_of(to);
                Ok(self.node_mut(to).map(|n| n.step(time, m)).map(|()| to))
            }
            Event::PersistDone {
                node,
                incarnation,
                token,
            } => {
                self.trace.write(3 + (node << 8));
                self.complete_persist(node, incarnation, token)
            }
            Event::Restored {
                node,
                incarnation,
                job,
            } => {
                self.trace.write(9 + (node << 8));
                if self.nodes[(node - 1) as usize].incarnation != incarnation {
                    return Ok(None);
                }
                let restored = job.decode();
                self.coverage.snapshots_restored += 1;
                let time = self.time_of(node);
                Ok(self
                    .node_mut(node)
                    .map(|n| n.snapshot_restored(time, restored))
                    .map(|()| node))
            }
            Event::Call {
                node,
                call,
                request,
            } => {
                self.trace.write(4 + (node << 8) + (call << 16));
                let time = self.time_of(node);
                Ok(self
                    .node_mut(node)
                    .map(|n| n.call(time, call, request))
                    .map(|()| node))
            }
            Event::Cancel { node, call } => {
                self.trace.write(5 + (node << 8) + (call << 16));
                let time = self.time_of(node);
                Ok(self
                    .node_mut(node)
                    .map(|n| n.cancel(time, call))
                    .map(|()| node))
            }
            Event::Client(e) => {
                self.trace.write(6);
                self.handle_client(e);
                Ok(None)
            }
            Event::CacheStart(client) => {
                self.trace.write(10);
                self.start_cache_op(client);
                Ok(None)
            }
            Event::CacheGiveUp { client, attempt } => {
                self.trace.write(11);
                self.cache_give_up(client, attempt);
                Ok(None)
            }
            Event::Nemesis => {
                self.trace.write(8);
                if self.faults {
                    self.nemesis()?;
                    let gap = self.params.nemesis_every_ms;
                    let next = self.rng.range(gap / 2, gap * 3 / 2);
                    self.schedule(next, Event::Nemesis);
                }
                Ok(None)
            }
        }
    }

    fn complete_persist(
        &mut self,
        id: NodeId,
        incarnation: u64,
        token: u64,
    ) -> Result<Option<NodeId>, String> {
        let n = &mut self.nodes[(id - 1) as usize];
        if n.incarnation != incarnation {
            return Ok(None);
        }
        let Some(p) = n.pending.take().filter(|p| p.token == token) else {
            return Ok(None);
        };
        n.disk
            .persist(p.snapshot.as_ref(), &p.entries, p.hard_state)
            .map_err(|e| format!("node {id}: {e}"))?;
        for s in std::mem::take(&mut n.compactions) {
            n.disk.compact(&s).map_err(|e| format!("node {id}: {e}"))?;
        }
        let time = self.time_of(id);
        Ok(self
            .node_mut(id)
            .map(|n| n.persisted(time, token))
            .map(|()| id))
    }

    /// Execute a node's actions the way the driver does, until it has none.
    fn run_actions(&mut self, id: NodeId) -> Result<(), String> {
        loop {
            let Some(node) = self.node_mut(id) else {
                return Ok(());
            };
            if let Some(why) = node.fatal() {
                return Err(format!("node {id} stopped: {why}"));
            }
            let actions = node.take_actions();
            if actions.is_empty() {
                return Ok(());
            }
            for action in actions {
                self.execute(id, action)?;
            }
        }
    }

    fn execute(&mut self, id: NodeId, action: Action) -> Result<(), String> {
        let idx = (id - 1) as usize;
        match action {
            Action::Persist(p) => {
                if let Some(node) = &self.nodes[idx].node {
                    self.invariants.check_written(node.raft(), &p.entries)?;
                }
                let token = p.token;
                if self.nodes[idx].pending.replace(p).is_some() {
                    return Err(format!(
                        "node {id}: a second persist while one is in flight"
                    ));
                }
                let (lo, hi) = self.params.fsync_ms;
                let delay = self.rng.range(lo, hi);
                let incarnation = self.nodes[idx].incarnation;
                self.schedule(
                    delay,
                    Event::PersistDone {
                        node: id,
                        incarnation,
                        token,
                    },
                );
            }
            Action::Send(m) => self.send_message(m),
            Action::Reply { call, response } => self.route_reply(id, call, response),
            Action::Snapshot(view) => {
                let data = view.encode();
                let time = self.time_of(id);
                if let Some(n) = self.node_mut(id) {
                    n.snapshot_encoded(time, view.index, data);
                }
            }
            Action::Restore(job) => {
                // Decoding a big snapshot takes a while: inputs arrive meanwhile.
                let delay = self.rng.range(0, 20);
                let incarnation = self.nodes[idx].incarnation;
                self.schedule(
                    delay,
                    Event::Restored {
                        node: id,
                        incarnation,
                        job,
                    },
                );
            }
            Action::Compact(s) => {
                let n = &mut self.nodes[idx];
                if n.pending.is_some() {
                    n.compactions.push(s);
                } else {
                    n.disk.compact(&s).map_err(|e| format!("node {id}: {e}"))?;
                }
            }
            Action::WakeAt(mono) => {
                let n = &mut self.nodes[idx];
                n.wake_generation += 1;
                let at = n.clock.virtual_at(mono).max(self.now);
                let event = Event::Wake {
                    node: id,
                    incarnation: n.incarnation,
                    generation: n.wake_generation,
                };
                let delay = at - self.now;
                self.schedule(delay, event);
            }
            Action::Event(e) => self.node_event(id, e)?,
        }
        Ok(())
    }

    fn node_event(&mut self, id: NodeId, e: NodeEvent) -> Result<(), String> {
        match e {
            NodeEvent::Applied {
                index,
                term,
                digest,
            } => {
                if self.verbose {
                    if let Some(n) = self.nodes[(id - 1) as usize].node.as_ref() {
                        let c = n.services().clock();
                        self.log(|| {
                            format!(
                                "n{id} applied {index}@t{term}: lock time {} (base {} of t{})",
                                c.now_ms, c.base_ms, c.term
                            )
                        });
                    }
                }
                let entry = self.nodes[(id - 1) as usize]
                    .node
                    .as_ref()
                    .and_then(|n| n.raft().entry(index).cloned());
                match entry {
                    Some(entry) if entry.term == term => {
                        self.invariants.check_applied(id, &entry, digest)
                    }
                    _ => self.invariants.check_digest(id, index, digest),
                }
            }
            NodeEvent::SnapshotInstalled { index, .. } => {
                let digest = self.nodes[(id - 1) as usize]
                    .node
                    .as_ref()
                    .map(|n| n.services().digest());
                match digest {
                    Some(d) => self.invariants.check_digest(id, index, d),
                    None => Ok(()),
                }
            }
            NodeEvent::SnapshotFailed { index, why } => {
                Err(format!("n{id}: the snapshot at {index} failed: {why}"))
            }
            _ => Ok(()),
        }
    }

    fn send_message(&mut self, m: Message) {
        if self.faults && self.rng.chance(self.params.drop) {
            return;
        }
        let copies = if self.faults && self.rng.chance(self.params.duplicate) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let (lo, hi) = self.params.delay_ms;
            let delay = self.rng.range(lo, hi);
            self.schedule(delay, Event::Deliver(m.clone()));
        }
    }

    /// A node answered a call: the answer travels to the client (or is lost).
    fn route_reply(&mut self, node: NodeId, call: CallId, response: ClientResponse) {
        let Some(client) = self.routes.remove(&(node, call)) else {
            return;
        };
        if self.faults && self.rng.chance(self.params.answer_loss) {
            self.coverage.answers_lost += 1;
            return;
        }
        let delay = self.rng.range(1, 5);
        self.schedule(
            delay,
            Event::Client(ClientEvent::Answer {
                client,
                node,
                call,
                response,
            }),
        );
    }

    /// Send a call from a client to a node.
    pub(crate) fn send_call(
        &mut self,
        client: u64,
        node: NodeId,
        request: ClientRequest,
    ) -> CallId {
        self.next_call += 1;
        let call = self.next_call;
        self.routes.insert((node, call), client);
        let delay = self.rng.range(1, 5);
        self.schedule(
            delay,
            Event::Call {
                node,
                call,
                request,
            },
        );
        call
    }

    /// A client closes its call at a node.
    pub(crate) fn cancel_call(&mut self, node: NodeId, call: CallId) {
        self.routes.remove(&(node, call));
        let delay = self.rng.range(1, 5);
        self.schedule(delay, Event::Cancel { node, call });
    }

    fn live(&self) -> Vec<NodeId> {
        self.nodes
            .iter()
            .filter(|n| n.node.is_some())
            .map(|n| n.id)
            .collect()
    }

    fn leader(&self) -> Option<NodeId> {
        self.nodes
            .iter()
            .filter_map(|n| n.node.as_ref())
            .filter(|n| n.raft().role() == Role::Leader)
            .max_by_key(|n| n.raft().term())
            .map(|n| n.raft().id())
    }

    fn nemesis(&mut self) -> Result<(), String> {
        let all: Vec<NodeId> = (1..=self.params.nodes).collect();
        let live = self.live();
        let down: Vec<NodeId> = all
            .iter()
            .copied()
            .filter(|id| !live.contains(id))
            .collect();
        match self.rng.range(0, 10) {
            0 | 1
                if self.params.crashes
                    && down.len() < (self.params.nodes as usize) / 2 + 1
                    && !live.is_empty() =>
            {
                let id = self.rng.pick(&live);
                self.log(|| format!("nemesis: crash n{id}"));
                self.crash_node(id);
            }
            2 | 3 if !down.is_empty() => {
                let id = self.rng.pick(&down);
                self.log(|| format!("nemesis: restart n{id}"));
                self.start_node(id)?;
            }
            4 if self.params.partitions => {
                self.blocked.clear();
                let side: Vec<bool> = all.iter().map(|_| self.rng.chance(0.5)).collect();
                for &a in &all {
                    for &b in &all {
                        if side[(a - 1) as usize] != side[(b - 1) as usize] {
                            self.blocked.insert((a, b));
                        }
                    }
                }
                self.log(|| format!("nemesis: partition {side:?}"));
            }
            5 if self.params.partitions => {
                let a = self.rng.pick(&all);
                let b = self.rng.pick(&all);
                self.log(|| format!("nemesis: one-way block n{a} -> n{b}"));
                self.blocked.insert((a, b));
            }
            6 if self.params.partitions => {
                if let Some(l) = self.leader() {
                    self.log(|| format!("nemesis: isolate leader n{l}"));
                    for &x in &all {
                        self.blocked.insert((l, x));
                        self.blocked.insert((x, l));
                    }
                }
            }
            7 => {
                self.log(|| "nemesis: heal partitions".into());
                self.blocked.clear();
            }
            8 if self.params.conf_changes => self.change_membership()?,
            9 if self.params.transfers => {
                if let Some(l) = self.leader() {
                    let to = self.rng.pick(&all);
                    let time = self.time_of(l);
                    let result = self.node_mut(l).map(|n| n.transfer_leader(time, to));
                    self.log(|| format!("nemesis: transfer n{l} -> n{to}: {result:?}"));
                    self.run_actions(l)?;
                }
            }
            10 if self.params.wall_steps => self.step_wall_clock(),
            _ => {}
        }
        Ok(())
    }

    /// Step one node's wall clock forward or back by up to an hour (NTP, an operator).
    fn step_wall_clock(&mut self) {
        let id = self.rng.range(1, self.params.nodes);
        let by = self.rng.range(1_000, 3_600_000) as i64;
        let by = if self.rng.chance(0.5) { by } else { -by };
        self.nodes[(id - 1) as usize].clock.wall_offset_ms += by;
        self.coverage.clocks_stepped += 1;
        self.log(|| format!("nemesis: step n{id}'s wall clock by {by} ms"));
    }

    fn change_membership(&mut self) -> Result<(), String> {
        let Some(l) = self.leader() else {
            return Ok(());
        };
        let all: Vec<NodeId> = (1..=self.params.nodes).collect();
        let Some(node) = self.nodes[(l - 1) as usize].node.as_ref() else {
            return Ok(());
        };
        let m = node.raft().membership().clone();
        let outsiders: Vec<NodeId> = all.iter().copied().filter(|id| !m.contains(*id)).collect();
        let learners: Vec<NodeId> = m.learners.iter().copied().collect();
        let members: Vec<NodeId> = m.members().collect();
        let change = if !outsiders.is_empty() && self.rng.chance(0.5) {
            ConfChange::AddLearner(self.rng.pick(&outsiders))
        } else if !learners.is_empty() && self.rng.chance(0.7) {
            ConfChange::PromoteLearner(self.rng.pick(&learners))
        } else if m.voters.len() > 2 {
            ConfChange::RemoveNode(self.rng.pick(&members))
        } else {
            return Ok(());
        };
        let time = self.time_of(l);
        let result = self
            .node_mut(l)
            .map(|n| n.propose_conf_change(time, change));
        self.log(|| format!("nemesis: n{l} proposes {change:?}: {result:?}"));
        self.run_actions(l)
    }
}
