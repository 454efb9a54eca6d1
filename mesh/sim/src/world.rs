//! The simulated world: nodes running the real core over simulated disks, a network
//! that loses, duplicates, delays and partitions, clients with a recorded history, and a
//! nemesis that crashes, restarts, partitions, reconfigures and transfers leadership.
//!
//! Everything happens on one thread in virtual time; the only randomness is the run's
//! seed. One step is one event taken from the queue, and the invariants are checked
//! after each.

use crate::invariants::{Invariants, NodeMarks};
use crate::kv::{decode_words, Fnv};
use crate::linearizability::{self, Operation, RegisterOp};
use crate::lockcheck::{LockCall, LockOp, LockOutcome};
use crate::params::SimParams;
use crate::rng::SimRng;
use mesh_core::raft::{
    ConfChange, Config, Entry, EntryPayload, LogIndex, Membership, Message, NodeId, ProposeError,
    Raft, Ready, Role, Snapshot, Term,
};
use mesh_core::services::envelope::{Command, Envelope, Query, QueryReply, Reply, Services};
use mesh_core::services::lock::{LockCommand, LockReply, Mode, MAX_TTL_MS};
use mesh_core::services::register::{RegisterCommand, RegisterQuery, RegisterReply};
use mesh_core::services::StateMachine;
use mesh_node::storage::{LogStore, MemLog};
use std::collections::{BTreeMap, BTreeSet};

const TICK_MS: u64 = 10;
const CLIENT_TIMEOUT_MS: u64 = 400;
const LIVENESS_BUDGET_MS: u64 = 30_000;

#[derive(Clone, Copy, Debug)]
enum ClientOp {
    Put { key: u64, value: u64 },
    Get { key: u64 },
    Acquire { key: u64, mode: Mode },
    Release { key: u64 },
}

/// What a completed operation returned.
#[derive(Clone, Debug)]
enum Answer {
    Written,
    Value(u64),
    Lock(LockReply),
}

#[derive(Clone, Debug)]
enum Outcome {
    Done(Answer),
    Redirect(Option<NodeId>),
    Retry,
}

/// Where a client's current operation is recorded.
#[derive(Clone, Copy, Debug)]
enum HistRef {
    Register(usize),
    Lock(usize),
}

#[derive(Debug)]
enum Event {
    Tick(NodeId),
    Deliver(Message),
    PersistDone {
        node: NodeId,
        incarnation: u64,
    },
    Request {
        node: NodeId,
        client: u64,
        seq: u64,
        op: ClientOp,
    },
    Response {
        client: u64,
        seq: u64,
        outcome: Outcome,
    },
    ClientRetry {
        client: u64,
        attempt: u64,
    },
    ClientStart(u64),
    Nemesis,
}

struct SimNode {
    id: NodeId,
    bootstrap: Membership,
    raft: Option<Raft>,
    /// The node's disk: the same LogStore twin that the storage conformance suite holds
    /// to FileLog's behaviour. Only completed persists reach it.
    disk: MemLog,
    sm: Services,
    incarnation: u64,
    persisting: Option<Ready>,
    proposals: BTreeMap<LogIndex, (Term, u64, u64)>,
    reads: Vec<(LogIndex, u64, u64, u64)>,
    marks: NodeMarks,
}

struct Current {
    seq: u64,
    op: ClientOp,
    history: HistRef,
    attempt: u64,
}

struct Client {
    target: NodeId,
    seq: u64,
    current: Option<Current>,
    /// Locks this client holds, as the cluster told it.
    held: BTreeMap<u64, Mode>,
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
    /// Hash of every event processed, for the determinism check.
    pub trace: u64,
}

/// A simulated cluster under test.
pub struct World {
    params: SimParams,
    rng: SimRng,
    now: u64,
    clock: u64,
    queue: BTreeMap<(u64, u64), Event>,
    nodes: Vec<SimNode>,
    blocked: BTreeSet<(NodeId, NodeId)>,
    clients: Vec<Client>,
    history: Vec<Operation>,
    lock_history: Vec<LockOp>,
    /// A client saw an answer no correct cluster gives; reported at the next step.
    violation: Option<String>,
    invariants: Invariants,
    trace: Fnv,
    faults: bool,
    next_value: u64,
    verbose: bool,
}

impl World {
    /// A world for one seed.
    pub fn new(seed: u64, params: SimParams, verbose: bool) -> Self {
        let founders = Membership::with_voters(1..=params.initial_voters);
        let nodes = (1..=params.nodes)
            .map(|id| SimNode {
                id,
                bootstrap: if founders.is_voter(id) {
                    founders.clone()
                } else {
                    Membership::default()
                },
                raft: None,
                disk: MemLog::new(),
                sm: Services::default(),
                incarnation: 0,
                persisting: None,
                proposals: BTreeMap::new(),
                reads: Vec::new(),
                marks: NodeMarks::default(),
            })
            .collect();
        let clients = (0..params.clients)
            .map(|c| Client {
                target: 1 + c % params.nodes,
                seq: 0,
                current: None,
                held: BTreeMap::new(),
            })
            .collect();
        let mut world = Self {
            rng: SimRng::new(seed),
            params,
            now: 0,
            clock: 0,
            queue: BTreeMap::new(),
            nodes,
            blocked: BTreeSet::new(),
            clients,
            history: Vec::new(),
            lock_history: Vec::new(),
            violation: None,
            invariants: Invariants::default(),
            trace: Fnv::default(),
            faults: true,
            next_value: 0,
            verbose,
        };
        for id in 1..=world.params.nodes {
            world.start_node(id);
            let offset = world.rng.range(0, TICK_MS - 1);
            world.schedule(offset, Event::Tick(id));
        }
        for c in 0..world.params.clients {
            let delay = world.rng.range(0, 50);
            world.schedule(delay, Event::ClientStart(c));
        }
        let first = world.params.nemesis_every_ms;
        world.schedule(first, Event::Nemesis);
        world
    }

    fn schedule(&mut self, delay_ms: u64, event: Event) {
        self.clock += 1;
        self.queue.insert((self.now + delay_ms, self.clock), event);
    }

    fn raft_config(&self, id: NodeId) -> Config {
        let mut cfg = Config::new(id);
        cfg.election_ticks = 10;
        cfg.heartbeat_ticks = 2;
        cfg.max_entries_per_msg = self.params.max_entries_per_msg;
        cfg.max_bytes_per_msg = 256;
        cfg.max_inflight_msgs = self.params.max_inflight;
        cfg.snapshot_chunk_bytes = self.params.snapshot_chunk_bytes;
        cfg.seed = self.rng.clone().next_u64() ^ id;
        cfg
    }

    fn start_node(&mut self, id: NodeId) {
        let cfg = self.raft_config(id);
        let node = &mut self.nodes[(id - 1) as usize];
        let recovered = node.disk.recover();
        let term = recovered.hard_state.term;
        let snapshot_data = recovered.snapshot.as_ref().map(|s| s.data.clone());
        let state = recovered.into_initial_state(node.bootstrap.clone());
        // The config is the simulator's own and always valid.
        node.raft = Some(Raft::new(cfg, state).expect("simulator raft config is valid"));
        node.sm = Services::default();
        if let Some(data) = snapshot_data {
            // Snapshots on the simulated disk were produced by Services itself.
            node.sm.restore(&data).expect("own snapshot decodes");
        }
        node.incarnation += 1;
        node.marks = NodeMarks {
            term,
            ..NodeMarks::default()
        };
    }

    fn crash_node(&mut self, id: NodeId) {
        let node = &mut self.nodes[(id - 1) as usize];
        node.raft = None;
        node.persisting = None;
        node.proposals.clear();
        node.reads.clear();
        node.incarnation += 1;
    }

    fn log(&self, what: impl FnOnce() -> String) {
        if self.verbose {
            eprintln!("[{:>7}ms] {}", self.now, what());
        }
    }

    /// Run the fault phase, then heal and require liveness, then check the history.
    pub fn run(&mut self) -> Result<RunReport, String> {
        let mut steps = 0;
        while steps < self.params.steps {
            self.step()?;
            steps += 1;
        }
        self.heal();
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
        crate::lockcheck::check(&self.lock_history).map_err(|e| format!("locks: {e}"))?;
        linearizability::check(&self.history, 0).map_err(|v| {
            format!(
                "linearizability: history of key {} ({} ops) has no valid order",
                v.key, v.ops
            )
        })?;
        Ok(RunReport {
            steps,
            virtual_ms: self.now,
            ops_completed: self.history.iter().filter(|o| o.ret.is_some()).count()
                + self
                    .lock_history
                    .iter()
                    .filter(|o| o.returned.is_some())
                    .count(),
            committed: self.invariants.committed_count(),
            leader_terms: self.invariants.leader_terms(),
            trace: self.trace.0,
        })
    }

    fn describe(&self) -> String {
        let nodes: Vec<String> = self
            .nodes
            .iter()
            .map(|n| match &n.raft {
                Some(r) => {
                    let s = r.status();
                    let last_term = r.term_at(s.last_index).unwrap_or(0);
                    format!(
                        "n{}:{}@t{} vote {:?} leader {:?} last {}@t{} c{} a{} voters {:?} learners {:?}",
                        n.id,
                        s.role.name(),
                        s.term,
                        s.vote,
                        s.leader,
                        s.last_index,
                        last_term,
                        s.commit,
                        n.sm.applied(),
                        s.membership.voters,
                        s.membership.learners
                    )
                }
                None => format!("n{}:down", n.id),
            })
            .collect();
        let busy = self.clients.iter().filter(|c| c.current.is_some()).count();
        format!("{}; {busy} clients busy", nodes.join("; "))
    }

    fn heal(&mut self) {
        self.log(|| "heal: faults stop, every node restarts".into());
        self.faults = false;
        self.blocked.clear();
        for id in 1..=self.params.nodes {
            if self.nodes[(id - 1) as usize].raft.is_none() {
                self.start_node(id);
            }
        }
    }

    /// A leader exists, every client is idle and every member has applied its commit.
    fn converged(&self) -> bool {
        if self.clients.iter().any(|c| c.current.is_some()) {
            return false;
        }
        let Some(leader) = self
            .nodes
            .iter()
            .filter_map(|n| n.raft.as_ref())
            .find(|r| r.role() == Role::Leader)
        else {
            return false;
        };
        let st = leader.status();
        let converged = st.membership.members().all(|id| {
            let n = &self.nodes[(id - 1) as usize];
            n.raft
                .as_ref()
                .is_some_and(|r| r.status().commit == st.commit)
                && n.sm.applied() == st.commit
        });
        converged
    }

    fn step(&mut self) -> Result<(), String> {
        let Some(((time, _), event)) = self.queue.pop_first() else {
            return Err("event queue ran dry".into());
        };
        self.now = time;
        self.trace.write(time);
        let touched = self.handle(event)?;
        if let Some(v) = self.violation.take() {
            return Err(v);
        }
        if let Some(id) = touched {
            self.drive(id)?;
        }
        self.check_all()
    }

    fn check_all(&mut self) -> Result<(), String> {
        for node in &mut self.nodes {
            if let Some(raft) = &node.raft {
                self.invariants.check_node(raft, &mut node.marks)?;
            }
        }
        Ok(())
    }

    fn handle(&mut self, event: Event) -> Result<Option<NodeId>, String> {
        match event {
            Event::Tick(id) => {
                self.trace.write(1);
                self.schedule(TICK_MS, Event::Tick(id));
                let raft = self.nodes[(id - 1) as usize].raft.as_mut();
                raft.map(Raft::tick);
                Ok(Some(id))
            }
            Event::Deliver(m) => {
                self.trace.write(2 + (m.from << 8) + (m.to << 16));
                if self.blocked.contains(&(m.from, m.to)) {
                    return Ok(None);
                }
                let to = m.to;
                let Some(raft) = self
                    .nodes
                    .get_mut((to - 1) as usize)
                    .and_then(|n| n.raft.as_mut())
                else {
                    return Ok(None);
                };
                raft.step(m);
                Ok(Some(to))
            }
            Event::PersistDone { node, incarnation } => {
                self.trace.write(3 + (node << 8));
                let n = &mut self.nodes[(node - 1) as usize];
                if n.incarnation != incarnation {
                    return Ok(None);
                }
                let Some(rd) = n.persisting.take() else {
                    return Ok(None);
                };
                self.complete_ready(node, rd)?;
                Ok(Some(node))
            }
            Event::Request {
                node,
                client,
                seq,
                op,
            } => {
                self.trace.write(4 + (node << 8) + (client << 16));
                self.handle_request(node, client, seq, op);
                Ok(Some(node))
            }
            Event::Response {
                client,
                seq,
                outcome,
            } => {
                self.trace.write(5 + (client << 8));
                self.handle_response(client, seq, outcome);
                Ok(None)
            }
            Event::ClientRetry { client, attempt } => {
                self.trace.write(6 + (client << 8));
                let c = &self.clients[client as usize];
                if c.current.as_ref().is_some_and(|cur| cur.attempt == attempt) {
                    self.send_request(client);
                }
                Ok(None)
            }
            Event::ClientStart(client) => {
                self.trace.write(7 + (client << 8));
                self.start_op(client);
                Ok(None)
            }
            Event::Nemesis => {
                self.trace.write(8);
                if self.faults {
                    self.nemesis();
                    let gap = self.params.nemesis_every_ms;
                    let next = self.rng.range(gap / 2, gap * 3 / 2);
                    self.schedule(next, Event::Nemesis);
                }
                Ok(None)
            }
        }
    }

    /// Take and execute Readies until the node has nothing more or waits on an fsync.
    fn drive(&mut self, id: NodeId) -> Result<(), String> {
        loop {
            let n = &mut self.nodes[(id - 1) as usize];
            if n.persisting.is_some() {
                return Ok(());
            }
            let Some(raft) = n.raft.as_mut() else {
                return Ok(());
            };
            if !raft.has_ready() {
                return Ok(());
            }
            let rd = raft.ready();
            self.invariants.check_written(raft, &rd.entries)?;
            let durable =
                rd.snapshot.is_some() || !rd.entries.is_empty() || rd.hard_state.is_some();
            if durable {
                let incarnation = n.incarnation;
                n.persisting = Some(rd);
                let (lo, hi) = self.params.fsync_ms;
                let delay = self.rng.range(lo, hi);
                self.schedule(
                    delay,
                    Event::PersistDone {
                        node: id,
                        incarnation,
                    },
                );
                return Ok(());
            }
            self.complete_ready(id, rd)?;
        }
    }

    /// The Ready is durable: send, apply, serve reads, advance, maybe snapshot.
    fn complete_ready(&mut self, id: NodeId, rd: Ready) -> Result<(), String> {
        let idx = (id - 1) as usize;
        self.nodes[idx]
            .disk
            .persist(rd.snapshot.as_ref(), &rd.entries, rd.hard_state)
            .map_err(|e| format!("node {id}: {e}"))?;
        let marker = rd.persisted_marker();
        for m in rd.messages {
            self.send_message(m);
        }
        if let Some(snapshot) = &rd.snapshot {
            self.restore_snapshot(id, snapshot)?;
        }
        for entry in &rd.committed_entries {
            self.apply(id, entry)?;
        }
        for rs in rd.read_states {
            let Some(words) = decode_words(&rs.ctx) else {
                continue;
            };
            if let [client, seq, key] = words[..] {
                self.nodes[idx].reads.push((rs.index, client, seq, key));
            }
        }
        self.serve_reads(id);
        let node = &mut self.nodes[idx];
        let Some(raft) = node.raft.as_mut() else {
            return Ok(());
        };
        raft.advance(marker);
        let every = self.params.snapshot_every;
        let snap_index = raft.status().snapshot_index;
        if every > 0 && node.sm.applied() >= snap_index + every {
            // applied <= raft's applied and > snapshot index: compaction cannot fail.
            raft.compact(node.sm.applied(), node.sm.snapshot())
                .map_err(|e| format!("compact: {e}"))?;
            if let Some(s) = raft.snapshot() {
                node.disk
                    .compact(s)
                    .map_err(|e| format!("node {id}: {e}"))?;
            }
        }
        Ok(())
    }

    fn restore_snapshot(&mut self, id: NodeId, snapshot: &Snapshot) -> Result<(), String> {
        let node = &mut self.nodes[(id - 1) as usize];
        node.sm
            .restore(&snapshot.data)
            .map_err(|e| format!("node {id}: snapshot restore: {e}"))?;
        if node.sm.applied() != snapshot.meta.index {
            return Err(format!(
                "node {id}: snapshot at {} holds state of {}",
                snapshot.meta.index,
                node.sm.applied()
            ));
        }
        let keep = node.proposals.split_off(&(snapshot.meta.index + 1));
        let lost = std::mem::replace(&mut node.proposals, keep);
        let digest = node.sm.digest();
        for (_, (_, client, seq)) in lost {
            self.respond(client, seq, Outcome::Retry);
        }
        self.invariants
            .check_digest(id, snapshot.meta.index, digest)
    }

    fn apply(&mut self, id: NodeId, entry: &Entry) -> Result<(), String> {
        let node = &mut self.nodes[(id - 1) as usize];
        if entry.index != node.sm.applied() + 1 {
            return Err(format!(
                "node {id}: applies {} after {}",
                entry.index,
                node.sm.applied()
            ));
        }
        let reply = match &entry.payload {
            EntryPayload::Command(data) => {
                let (reply, _events) = node.sm.apply_bytes(entry.index, data);
                if let Reply::Invalid(why) = &reply {
                    return Err(format!(
                        "node {id}: undecodable command at {}: {why}",
                        entry.index
                    ));
                }
                Some(reply)
            }
            EntryPayload::Noop | EntryPayload::Config(_) => {
                node.sm.skip(entry.index);
                None
            }
        };
        node.sm
            .locks()
            .check()
            .map_err(|e| format!("node {id}: lock table after {}: {e}", entry.index))?;
        let digest = node.sm.digest();
        let waiting = node.proposals.remove(&entry.index);
        self.invariants.check_applied(id, entry, digest)?;
        if let Some((term, client, seq)) = waiting {
            let outcome = match reply {
                Some(Reply::Register(_)) if term == entry.term => Outcome::Done(Answer::Written),
                Some(Reply::Lock(r)) if term == entry.term => Outcome::Done(Answer::Lock(r)),
                _ => Outcome::Retry,
            };
            self.respond(client, seq, outcome);
        }
        Ok(())
    }

    fn serve_reads(&mut self, id: NodeId) {
        let node = &mut self.nodes[(id - 1) as usize];
        let applied = node.sm.applied();
        let (ready, waiting): (Vec<_>, Vec<_>) = node.reads.drain(..).partition(|r| r.0 <= applied);
        node.reads = waiting;
        let answers: Vec<_> = ready
            .iter()
            .map(|&(_, c, s, k)| {
                let query = Query::Register(RegisterQuery::Get {
                    key: k.to_le_bytes().to_vec(),
                });
                let bytes = postcard::to_stdvec(&query).unwrap_or_default();
                let value = match node.sm.query_bytes(&bytes) {
                    QueryReply::Register(RegisterReply::Value(Some(v))) => decode_words(&v)
                        .and_then(|w| w.first().copied())
                        .unwrap_or(0),
                    _ => 0,
                };
                (c, s, value)
            })
            .collect();
        for (client, seq, value) in answers {
            self.respond(client, seq, Outcome::Done(Answer::Value(value)));
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

    fn respond(&mut self, client: u64, seq: u64, outcome: Outcome) {
        let delay = self.rng.range(1, 5);
        self.schedule(
            delay,
            Event::Response {
                client,
                seq,
                outcome,
            },
        );
    }

    fn handle_request(&mut self, id: NodeId, client: u64, seq: u64, op: ClientOp) {
        let now_ms = self.now;
        let node = &mut self.nodes[(id - 1) as usize];
        let Some(raft) = node.raft.as_mut() else {
            return;
        };
        let command = match op {
            ClientOp::Put { key, value } => Some(Command::Register(RegisterCommand::Put {
                key: key.to_le_bytes().to_vec(),
                value: value.to_le_bytes().to_vec(),
            })),
            ClientOp::Acquire { key, mode } => Some(Command::Lock(LockCommand::Acquire {
                key: format!("L{key}"),
                client: format!("c{client}"),
                mode,
                ttl_ms: MAX_TTL_MS,
                wait_ms: 0,
            })),
            ClientOp::Release { key } => Some(Command::Lock(LockCommand::Release {
                key: format!("L{key}"),
                client: format!("c{client}"),
            })),
            ClientOp::Get { .. } => None,
        };
        let result = match (command, op) {
            (Some(command), _) => {
                // The session makes a retried command apply once (Raft thesis 6.3).
                let envelope = Envelope {
                    session: client + 1,
                    seq,
                    now_ms,
                    command,
                };
                let bytes = postcard::to_stdvec(&envelope).unwrap_or_default();
                raft.propose(bytes).map(|index| {
                    // A proposal of an older term at the same index was truncated away.
                    node.proposals.insert(index, (raft.term(), client, seq))
                })
            }
            (None, ClientOp::Get { key }) => {
                let ctx = [client, seq, key]
                    .iter()
                    .flat_map(|w| w.to_le_bytes())
                    .collect();
                raft.read_index(ctx).map(|()| None)
            }
            (None, _) => Ok(None),
        };
        match result {
            Ok(Some((_, old_client, old_seq))) => self.respond(old_client, old_seq, Outcome::Retry),
            Ok(None) => {}
            Err(ProposeError::NotLeader { leader }) => {
                self.respond(client, seq, Outcome::Redirect(leader))
            }
            Err(_) => self.respond(client, seq, Outcome::Retry),
        }
    }

    fn start_op(&mut self, client: u64) {
        if !self.faults {
            return;
        }
        let key = self.rng.range(0, self.params.keys - 1);
        self.clock += 1;
        let (op, history) = if self.params.locks && self.rng.chance(0.5) {
            let held: Vec<u64> = self.clients[client as usize].held.keys().copied().collect();
            let (op, call) = if !held.is_empty() && self.rng.chance(0.5) {
                let key = self.rng.pick(&held);
                (ClientOp::Release { key }, LockCall::Release)
            } else if self.rng.chance(0.1) {
                // Releasing what one may not hold must be answered "not held".
                (ClientOp::Release { key }, LockCall::Release)
            } else {
                let mode = if self.rng.chance(0.5) {
                    Mode::X
                } else {
                    Mode::S
                };
                (ClientOp::Acquire { key, mode }, LockCall::Acquire(mode))
            };
            let lock_key = match op {
                ClientOp::Release { key } | ClientOp::Acquire { key, .. } => key,
                _ => key,
            };
            self.lock_history.push(LockOp {
                key: lock_key,
                client,
                call,
                outcome: None,
                invoked: self.clock,
                returned: None,
            });
            (op, HistRef::Lock(self.lock_history.len() - 1))
        } else {
            let (op, reg) = if self.rng.chance(0.5) {
                self.next_value += 1;
                (
                    ClientOp::Put {
                        key,
                        value: self.next_value,
                    },
                    RegisterOp::Write(self.next_value),
                )
            } else {
                (ClientOp::Get { key }, RegisterOp::Read(None))
            };
            self.history.push(Operation {
                key,
                op: reg,
                call: self.clock,
                ret: None,
            });
            (op, HistRef::Register(self.history.len() - 1))
        };
        let c = &mut self.clients[client as usize];
        c.seq += 1;
        c.current = Some(Current {
            seq: c.seq,
            op,
            history,
            attempt: 0,
        });
        self.send_request(client);
    }

    fn send_request(&mut self, client: u64) {
        let c = &mut self.clients[client as usize];
        let Some(cur) = c.current.as_mut() else {
            return;
        };
        cur.attempt += 1;
        let (node, seq, op, attempt) = (c.target, cur.seq, cur.op, cur.attempt);
        let delay = self.rng.range(1, 5);
        self.schedule(
            delay,
            Event::Request {
                node,
                client,
                seq,
                op,
            },
        );
        self.schedule(CLIENT_TIMEOUT_MS, Event::ClientRetry { client, attempt });
    }

    fn handle_response(&mut self, client: u64, seq: u64, outcome: Outcome) {
        let nodes = self.params.nodes;
        let c = &mut self.clients[client as usize];
        let Some(cur) = c.current.as_ref() else {
            return;
        };
        if cur.seq != seq {
            return;
        }
        let attempt = cur.attempt;
        match outcome {
            Outcome::Done(answer) => {
                self.clock += 1;
                let history = cur.history;
                c.current = None;
                self.record(client, history, answer);
                let think = self.rng.range(0, 20);
                self.schedule(think, Event::ClientStart(client));
            }
            Outcome::Redirect(Some(leader)) if leader != c.target => {
                c.target = leader;
                self.schedule(1, Event::ClientRetry { client, attempt });
            }
            Outcome::Redirect(_) | Outcome::Retry => {
                c.target = self.rng.range(1, nodes);
                let backoff = self.rng.range(10, 40);
                self.schedule(backoff, Event::ClientRetry { client, attempt });
            }
        }
    }

    /// Record a completed operation in the history it belongs to.
    fn record(&mut self, client: u64, history: HistRef, answer: Answer) {
        let now = self.clock;
        match (history, answer) {
            (HistRef::Register(i), Answer::Value(v)) => {
                self.history[i].ret = Some(now);
                self.history[i].op = RegisterOp::Read(Some(v));
            }
            (HistRef::Register(i), Answer::Written) => self.history[i].ret = Some(now),
            (HistRef::Lock(i), Answer::Lock(reply)) => {
                let key = self.lock_history[i].key;
                let held = &mut self.clients[client as usize].held;
                let outcome = match reply {
                    LockReply::Granted { token, mode, .. } => {
                        held.insert(key, mode);
                        LockOutcome::Granted { mode, token }
                    }
                    LockReply::Conflict { .. } => LockOutcome::Conflict,
                    LockReply::Released => {
                        held.remove(&key);
                        LockOutcome::Released
                    }
                    LockReply::NotHeld { .. } => {
                        held.remove(&key);
                        LockOutcome::NotHeld
                    }
                    other => {
                        self.violation =
                            Some(format!("client {client}: unexpected lock reply {other:?}"));
                        return;
                    }
                };
                self.lock_history[i].outcome = Some(outcome);
                self.lock_history[i].returned = Some(now);
            }
            (h, a) => {
                self.violation = Some(format!("client {client}: answer {a:?} to operation {h:?}"))
            }
        }
    }

    fn live(&self) -> Vec<NodeId> {
        self.nodes
            .iter()
            .filter(|n| n.raft.is_some())
            .map(|n| n.id)
            .collect()
    }

    fn leader(&self) -> Option<NodeId> {
        self.nodes
            .iter()
            .filter_map(|n| n.raft.as_ref())
            .filter(|r| r.role() == Role::Leader)
            .max_by_key(|r| r.term())
            .map(Raft::id)
    }

    fn nemesis(&mut self) {
        let all: Vec<NodeId> = (1..=self.params.nodes).collect();
        let live = self.live();
        let down: Vec<NodeId> = all
            .iter()
            .copied()
            .filter(|id| !live.contains(id))
            .collect();
        match self.rng.range(0, 9) {
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
                self.start_node(id);
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
            8 if self.params.conf_changes => self.change_membership(),
            9 if self.params.transfers => {
                if let Some(l) = self.leader() {
                    let to = self.rng.pick(&all);
                    let raft = self.nodes[(l - 1) as usize].raft.as_mut();
                    let result = raft.map(|r| r.transfer_leader(to));
                    self.log(|| format!("nemesis: transfer n{l} -> n{to}: {result:?}"));
                }
            }
            _ => {}
        }
    }

    fn change_membership(&mut self) {
        let Some(l) = self.leader() else { return };
        let all: Vec<NodeId> = (1..=self.params.nodes).collect();
        let Some(raft) = self.nodes[(l - 1) as usize].raft.as_ref() else {
            return;
        };
        let m = raft.membership().clone();
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
            return;
        };
        let raft = self.nodes[(l - 1) as usize].raft.as_mut();
        let result = raft.map(|r| r.propose_conf_change(change));
        self.log(|| format!("nemesis: n{l} proposes {change:?}: {result:?}"));
        let _ = self.drive(l);
    }
}
