//! The simulator's clients: what users (and the gateway on their behalf) do.
//!
//! Each client is one caller slot of a gateway: a session of its own with one call in
//! flight, whose every call acknowledges the ones before it. It puts and reads
//! registers, and takes locks the way applications do: acquires that wait, short leases
//! that run out, renewals, releases (also of locks it does not hold), S/X mixes with
//! upgrades, and lock orders that close real deadlock cycles. It retries a call with the
//! same sequence number after a lost answer or a timeout, sometimes asks two nodes at
//! once (a hedge), and sometimes gives up on a waiting acquire: it closes the call and
//! withdraws it, as the gateway does when its HTTP caller goes away.

use crate::linearizability::{Operation, RegisterOp};
use crate::lockcheck::HoldInterval;
use crate::world::{Event, World};
use mesh_core::node::CallId;
use mesh_core::raft::NodeId;
use mesh_core::services::envelope::{Command, Envelope, Query, QueryReply, Reply};
use mesh_core::services::lock::{LockCommand, LockReply, Mode};
use mesh_core::services::queue::{
    Field, MsgId, NewMessage, QueueCommand, QueueReply, QueueSettings, DEFAULT_QUEUE,
};
use mesh_core::services::register::{RegisterCommand, RegisterQuery, RegisterReply};
use mesh_core::wire::{ClientRequest, ClientResponse};
use std::collections::BTreeMap;

/// How long a client waits for an answer beyond the call's own wait.
const CLIENT_TIMEOUT_MS: u64 = 400;

/// Something that happens to a client.
#[derive(Debug)]
pub(crate) enum ClientEvent {
    Start(u64),
    Answer {
        client: u64,
        node: NodeId,
        call: CallId,
        response: ClientResponse,
    },
    Timeout {
        client: u64,
        attempt: u64,
    },
    Retry {
        client: u64,
        attempt: u64,
    },
    GiveUp {
        client: u64,
        seq: u64,
    },
}

#[derive(Clone, Copy, Debug)]
enum Op {
    OpenSession,
    Put {
        key: u64,
        value: u64,
    },
    Get {
        key: u64,
    },
    Acquire {
        key: u64,
        mode: Mode,
        ttl_ms: u64,
        wait_ms: u64,
    },
    Release {
        key: u64,
    },
    Renew,
    /// Enqueue `n` messages with values from `value` (one message with a dedup id when
    /// `dedup` is given).
    Enq {
        key: u64,
        value: u64,
        n: u64,
        dedup: Option<u64>,
    },
    Deq {
        key: Option<u64>,
        max: u32,
        visibility_ms: u64,
        wait_ms: u64,
    },
    /// Ack the messages in `Current::queue_ids`.
    Ack,
    /// Nack the message in `Current::queue_ids`.
    Nack,
    /// Move dead letters back.
    Requeue,
    /// Make messages dead letters after two deliveries.
    Configure,
    /// Withdraw call `seq` of this client's session, which it gave up on; like the
    /// gateway's caller slot, the client makes no other call until it is applied.
    Withdraw {
        seq: u64,
    },
}

impl Op {
    /// Whether the answer comes promptly (no wait): only those are hedged.
    fn prompt(&self) -> bool {
        self.wait_ms() == 0
    }

    fn wait_ms(&self) -> u64 {
        match self {
            Self::Acquire { wait_ms, .. } | Self::Deq { wait_ms, .. } => *wait_ms,
            _ => 0,
        }
    }
}

struct Current {
    seq: u64,
    op: Op,
    /// Index in the register history.
    history: Option<usize>,
    attempt: u64,
    first_sent: u64,
    /// For a release: the hold it gives up, which ends when the release is sent.
    releasing: Option<Held>,
    /// Attempts in flight: (node, call).
    live: Vec<(NodeId, CallId)>,
    /// For an ack or nack: the deliveries it names (id, receipt).
    queue_ids: Vec<(MsgId, u64)>,
}

/// The locks each application (a lock client id) holds, as it was told.
pub(crate) type AppHolds = BTreeMap<u64, BTreeMap<u64, Held>>;

#[derive(Clone, Copy, Debug)]
pub(crate) struct Held {
    mode: Mode,
    token: u64,
    ttl_ms: u64,
    start: u64,
    lease_end: u64,
}

/// One simulated caller.
pub(crate) struct Client {
    id: u64,
    /// The application this caller slot works for: its lock client id. With shared ids,
    /// two slots serve one application, which then has two calls in flight at once
    /// (waiting for one lock while asking for another).
    app: u64,
    target: NodeId,
    seq: u64,
    /// The session the cluster assigned (opened by the first call).
    session: Option<u64>,
    current: Option<Current>,
    /// Messages delivered to this consumer and not yet acked or nacked.
    inbox: Vec<(MsgId, u64)>,
}

impl Client {
    pub(crate) fn new(id: u64, app: u64, target: NodeId) -> Self {
        Self {
            id,
            app,
            target,
            seq: 0,
            session: None,
            current: None,
            inbox: Vec::new(),
        }
    }

    pub(crate) fn busy(&self) -> bool {
        self.current.is_some()
    }
}

fn lock_client(app: u64) -> String {
    format!("c{app}")
}

impl Op {
    fn lock_key(&self) -> Option<u64> {
        match self {
            Self::Acquire { key, .. } | Self::Release { key } => Some(*key),
            _ => None,
        }
    }
}

fn lock_key(key: u64) -> String {
    format!("L{key}")
}

fn queue_key(key: u64) -> String {
    format!("Q{key}")
}

impl World {
    pub(crate) fn handle_client(&mut self, e: ClientEvent) {
        match e {
            ClientEvent::Start(c) => self.start_op(c),
            ClientEvent::Answer {
                client,
                node,
                call,
                response,
            } => self.handle_answer(client, node, call, response),
            ClientEvent::Timeout { client, attempt } => {
                if self.current_attempt(client) == Some(attempt) {
                    self.close_attempts(client);
                    self.clients[client as usize].target = self.rng.range(1, self.params.nodes);
                    self.send_attempt(client);
                }
            }
            ClientEvent::Retry { client, attempt } => {
                let idle = self.clients[client as usize]
                    .current
                    .as_ref()
                    .is_some_and(|c| c.live.is_empty());
                if self.current_attempt(client) == Some(attempt) && idle {
                    self.send_attempt(client);
                }
            }
            ClientEvent::GiveUp { client, seq } => self.give_up(client, seq),
        }
    }

    fn current_attempt(&self, client: u64) -> Option<u64> {
        self.clients[client as usize]
            .current
            .as_ref()
            .map(|c| c.attempt)
    }

    /// The lease a client may count on, by its own clock, for `ttl_ms` of lock time: the
    /// leader's clock may run fast by up to the drift bound, and clocks tick in whole
    /// milliseconds.
    fn client_lease(&self, ttl_ms: u64) -> u64 {
        let ppm = self.params.drift_ppm;
        (ttl_ms * (1_000_000 - ppm) / 1_000_000).saturating_sub(2)
    }

    fn start_op(&mut self, client: u64) {
        self.drop_lapsed_holds(client);
        if !self.faults {
            return;
        }
        let op = if self.clients[client as usize].session.is_none() {
            Op::OpenSession
        } else if self.params.queue && self.rng.chance(0.4) {
            self.pick_queue_op(client)
        } else if self.params.locks
            && self
                .rng
                .chance(if self.params.shared_ids { 0.85 } else { 0.6 })
        {
            self.pick_lock_op(client)
        } else {
            let key = self.rng.range(0, self.params.keys - 1);
            if self.rng.chance(0.5) {
                self.next_value += 1;
                Op::Put {
                    key,
                    value: self.next_value,
                }
            } else {
                Op::Get { key }
            }
        };
        self.clock += 1;
        let history = match op {
            Op::Put { key, value } => Some((key, RegisterOp::Write(value))),
            Op::Get { key } => Some((key, RegisterOp::Read(None))),
            _ => None,
        }
        .map(|(key, op)| {
            self.history.push(Operation {
                key,
                op,
                call: self.clock,
                ret: None,
            });
            self.history.len() - 1
        });
        let c = &mut self.clients[client as usize];
        c.seq += 1;
        c.current = Some(Current {
            seq: c.seq,
            op,
            history,
            attempt: 0,
            first_sent: self.now,
            releasing: None,
            live: Vec::new(),
            queue_ids: Vec::new(),
        });
        let seq = c.seq;
        if matches!(op, Op::Ack | Op::Nack) {
            let n = if matches!(op, Op::Nack) {
                1
            } else {
                c.inbox.len().min(4)
            };
            let ids: Vec<(MsgId, u64)> = c.inbox.drain(..n.min(c.inbox.len())).collect();
            if let Some(cur) = c.current.as_mut() {
                cur.queue_ids = ids;
            }
        }
        if let Op::Release { key } = op {
            // The hold ends, as the application sees it, when it sends the release.
            if let Some(h) = self.holds_of(client).remove(&key) {
                let now = self.now;
                self.close_hold(client, key, h, now);
                if let Some(cur) = self.clients[client as usize].current.as_mut() {
                    cur.releasing = Some(h);
                }
            }
        }
        if op.wait_ms() > 0 && self.rng.chance(self.params.give_up) {
            let after = self.rng.range(1, op.wait_ms());
            self.schedule(after, Event::Client(ClientEvent::GiveUp { client, seq }));
        }
        self.send_attempt(client);
    }

    /// The holds of the application `client` works for.
    fn holds_of(&mut self, client: u64) -> &mut BTreeMap<u64, Held> {
        let app = self.clients[client as usize].app;
        self.app_holds.entry(app).or_default()
    }

    /// Keys another slot of `client`'s application has a call in flight on.
    fn busy_keys(&self, client: u64) -> Vec<u64> {
        let app = self.clients[client as usize].app;
        self.clients
            .iter()
            .filter(|c| c.app == app && c.id != client)
            .filter_map(|c| c.current.as_ref().and_then(|cur| cur.op.lock_key()))
            .collect()
    }

    /// Whether another slot of `client`'s application waits for a key other than `key`.
    fn app_waits_elsewhere(&self, client: u64, key: u64) -> bool {
        let app = self.clients[client as usize].app;
        self.clients.iter().any(|c| {
            c.app == app
                && c.id != client
                && c.current.as_ref().is_some_and(|cur| {
                    matches!(cur.op, Op::Acquire { key: k, wait_ms, .. } if k != key && wait_ms > 0)
                })
        })
    }

    fn pick_lock_op(&mut self, client: u64) -> Op {
        let op = self.pick_lock_op_any(client);
        // One call per application and key at a time: an application that releases a
        // key while asking for it again cannot know what it holds.
        match op.lock_key() {
            Some(k) if self.busy_keys(client).contains(&k) => Op::Renew,
            _ => op,
        }
    }

    fn pick_lock_op_any(&mut self, client: u64) -> Op {
        let held: Vec<u64> = self.holds_of(client).keys().copied().collect();
        if !held.is_empty() && self.rng.chance(0.35) {
            return Op::Release {
                key: self.rng.pick(&held),
            };
        }
        if !held.is_empty() && self.rng.chance(0.1) {
            return Op::Renew;
        }
        let key = self.rng.range(0, self.params.keys - 1);
        if self.rng.chance(0.05) {
            return Op::Release { key };
        }
        let holds_s = self
            .holds_of(client)
            .get(&key)
            .is_some_and(|h| h.mode == Mode::S);
        let mut mode = if (holds_s && self.rng.chance(0.5)) || self.rng.chance(0.5) {
            Mode::X
        } else {
            Mode::S
        };
        // Applications that hold one lock and wait for another, in both modes: the
        // orders that make wait-for cycles, real ones and ones that only look like it.
        let holds_x = self
            .holds_of(client)
            .iter()
            .any(|(k, h)| *k != key && h.mode == Mode::X);
        let other_waits = self.app_waits_elsewhere(client, key);
        if self.params.shared_ids && (holds_x || other_waits) && self.rng.chance(0.9) {
            mode = if other_waits { Mode::X } else { Mode::S };
            let ttl_ms = self.rng.pick(&[2_000, 60_000]);
            let wait_ms = self.rng.range(200, 600);
            return Op::Acquire {
                key,
                mode,
                ttl_ms,
                wait_ms,
            };
        }
        let ttl_ms = self.rng.pick(&[30, 100, 400, 2_000, 60_000]);
        let wait_ms = if self.rng.chance(0.4) {
            0
        } else {
            self.rng.range(10, 600)
        };
        Op::Acquire {
            key,
            mode,
            ttl_ms,
            wait_ms,
        }
    }

    fn pick_queue_op(&mut self, client: u64) -> Op {
        // A consumer that crashes forgets what it was given: its leases run out.
        if self.rng.chance(0.03) {
            self.clients[client as usize].inbox.clear();
        }
        let has = !self.clients[client as usize].inbox.is_empty();
        let keys = self.params.keys.max(2);
        match self.rng.range(0, 99) {
            0..=1 => Op::Configure,
            2..=4 => Op::Requeue,
            5..=34 => {
                let n = if self.rng.chance(0.3) {
                    self.rng.range(2, 4)
                } else {
                    1
                };
                let value = self.next_value + 1;
                self.next_value += n;
                // A dedup id is fresh, or repeats a recent one (a producer's retry).
                let dedup = self.rng.chance(0.2).then(|| {
                    if self.rng.chance(0.5) && value > 10 {
                        value - self.rng.range(1, 10)
                    } else {
                        value
                    }
                });
                Op::Enq {
                    key: self.rng.range(0, keys - 1),
                    value,
                    n: if dedup.is_some() { 1 } else { n },
                    dedup,
                }
            }
            35..=49 if has => Op::Nack,
            50..=74 if has => Op::Ack,
            _ => Op::Deq {
                key: self.rng.chance(0.2).then(|| self.rng.range(0, keys - 1)),
                max: if self.rng.chance(0.3) {
                    self.rng.range(2, 5) as u32
                } else {
                    1
                },
                visibility_ms: self.rng.pick(&[50, 200, 1_000]),
                wait_ms: if self.rng.chance(0.5) {
                    0
                } else {
                    self.rng.range(10, 500)
                },
            },
        }
    }

    fn queue_command(op: Op, ids: &[(MsgId, u64)]) -> Option<Command> {
        let queue = DEFAULT_QUEUE.to_string();
        let cmd = match op {
            Op::Enq {
                key,
                value,
                n,
                dedup,
            } => QueueCommand::Enqueue {
                queue,
                messages: (0..n)
                    .map(|i| NewMessage {
                        key: queue_key(key + i),
                        value: (value + i).to_string().into_bytes(),
                        field: Field::Value,
                        dedup_id: dedup.map(|d| format!("d{d}")),
                    })
                    .collect(),
            },
            Op::Deq {
                key,
                max,
                visibility_ms,
                wait_ms,
            } => QueueCommand::Dequeue {
                queue,
                key: key.map(queue_key),
                max,
                visibility_ms: Some(visibility_ms),
                wait_ms,
            },
            Op::Ack => QueueCommand::Ack {
                queue,
                ids: ids.iter().map(|(id, r)| (*id, Some(*r))).collect(),
            },
            Op::Nack => {
                let (id, receipt) = *ids.first()?;
                QueueCommand::Nack {
                    queue,
                    id,
                    receipt: Some(receipt),
                }
            }
            Op::Requeue => QueueCommand::Requeue {
                queue,
                ids: Vec::new(),
                max: 3,
            },
            Op::Configure => QueueCommand::Configure {
                queue,
                settings: QueueSettings {
                    partitions: 0,
                    max_deliveries: 2,
                    ..QueueSettings::default()
                },
            },
            _ => return None,
        };
        Some(Command::Queue(cmd))
    }

    fn request(&self, client: u64) -> Option<ClientRequest> {
        let c = &self.clients[client as usize];
        let cur = c.current.as_ref()?;
        let command = match cur.op {
            Op::Withdraw { seq } => {
                let e = Envelope::new(
                    0,
                    0,
                    0,
                    Command::Withdraw {
                        session: c.session?,
                        seq,
                        release_grant: true,
                    },
                );
                return Some(ClientRequest::Propose(postcard::to_stdvec(&e).ok()?));
            }
            Op::OpenSession => {
                let e = Envelope::new(0, 0, 0, Command::OpenSession);
                return Some(ClientRequest::Propose(postcard::to_stdvec(&e).ok()?));
            }
            Op::Get { key } => {
                let q = Query::Register(RegisterQuery::Get {
                    key: key.to_le_bytes().to_vec(),
                });
                return Some(ClientRequest::Read(postcard::to_stdvec(&q).ok()?));
            }
            Op::Put { key, value } => Command::Register(RegisterCommand::Put {
                key: key.to_le_bytes().to_vec(),
                value: value.to_le_bytes().to_vec(),
            }),
            Op::Acquire {
                key,
                mode,
                ttl_ms,
                wait_ms,
            } => Command::Lock(LockCommand::Acquire {
                key: lock_key(key),
                client: lock_client(c.app),
                mode,
                ttl_ms,
                wait_ms,
            }),
            Op::Release { key } => Command::Lock(LockCommand::Release {
                key: lock_key(key),
                client: lock_client(c.app),
            }),
            Op::Renew => Command::Lock(LockCommand::Renew {
                client: lock_client(c.app),
            }),
            queue_op => Self::queue_command(queue_op, &cur.queue_ids)?,
        };
        // One call in flight per session: every call acknowledges all before it.
        let e = Envelope::new(c.session?, cur.seq, cur.seq, command);
        Some(ClientRequest::Propose(postcard::to_stdvec(&e).ok()?))
    }

    fn send_attempt(&mut self, client: u64) {
        let Some(request) = self.request(client) else {
            return;
        };
        let target = self.clients[client as usize].target;
        let Some(cur) = self.clients[client as usize].current.as_mut() else {
            return;
        };
        cur.attempt += 1;
        let (attempt, op) = (cur.attempt, cur.op);
        let call = self.send_call(client, target, request.clone());
        let mut live = vec![(target, call)];
        if op.prompt() && self.params.nodes > 1 && self.rng.chance(self.params.hedge) {
            let other = 1 + (target + self.rng.range(0, self.params.nodes - 2)) % self.params.nodes;
            live.push((other, self.send_call(client, other, request)));
            self.coverage.hedges += 1;
        }
        if let Some(cur) = self.clients[client as usize].current.as_mut() {
            cur.live.extend(live);
        }
        let timeout = CLIENT_TIMEOUT_MS + op.wait_ms();
        self.schedule(
            timeout,
            Event::Client(ClientEvent::Timeout { client, attempt }),
        );
    }

    /// Close every attempt in flight (the client's connections to them close).
    fn close_attempts(&mut self, client: u64) {
        let live = self.clients[client as usize]
            .current
            .as_mut()
            .map(|c| std::mem::take(&mut c.live))
            .unwrap_or_default();
        for (node, call) in live {
            self.cancel_call(node, call);
        }
    }

    /// The caller gives up on a waiting acquire: close the call and withdraw it.
    fn give_up(&mut self, client: u64, seq: u64) {
        let c = &self.clients[client as usize];
        if c.current.as_ref().is_none_or(|cur| cur.seq != seq) {
            return;
        }
        self.log(|| format!("client {client}: gives up on call {seq}"));
        self.close_attempts(client);
        let Some(session) = self.clients[client as usize].session else {
            return;
        };
        let _ = session;
        // The withdrawal becomes the slot's call; the next call waits for it, as the
        // gateway's caller slot does (mesh-client's SlotGuard).
        let now = self.now;
        self.clients[client as usize].current = Some(Current {
            seq,
            op: Op::Withdraw { seq },
            history: None,
            attempt: 0,
            first_sent: now,
            releasing: None,
            live: Vec::new(),
            queue_ids: Vec::new(),
        });
        self.send_attempt(client);
    }

    fn handle_answer(&mut self, client: u64, node: NodeId, call: CallId, response: ClientResponse) {
        if client >= crate::cachecheck::CACHE_CLIENT_BASE {
            return self.cache_answer(client, call, response);
        }
        let nodes = self.params.nodes;
        let Some(cur) = self.clients[client as usize].current.as_mut() else {
            return;
        };
        let Some(pos) = cur.live.iter().position(|a| *a == (node, call)) else {
            return;
        };
        cur.live.remove(pos);
        let (attempt, others) = (cur.attempt, !cur.live.is_empty());
        match response {
            ClientResponse::Applied { result, .. } => {
                match postcard::from_bytes::<Reply>(&result) {
                    Ok(reply) => self.finish(client, Some(reply), None),
                    Err(e) => self.violation = Some(format!("client {client}: bad reply: {e}")),
                }
            }
            ClientResponse::Read(bytes) => match postcard::from_bytes::<QueryReply>(&bytes) {
                Ok(QueryReply::Register(RegisterReply::Value(v))) => {
                    let value = v
                        .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
                        .map_or(0, u64::from_le_bytes);
                    self.finish(client, None, Some(value));
                }
                other => self.violation = Some(format!("client {client}: read answered {other:?}")),
            },
            ClientResponse::NotLeader { leader } if !others => {
                let c = &mut self.clients[client as usize];
                c.target = match leader {
                    Some(l) if l != c.target => l,
                    _ => self.rng.range(1, nodes),
                };
                let backoff = if leader.is_some() {
                    1
                } else {
                    self.rng.range(10, 40)
                };
                self.schedule(
                    backoff,
                    Event::Client(ClientEvent::Retry { client, attempt }),
                );
            }
            ClientResponse::Error {
                retry: false,
                message,
            } => {
                self.violation = Some(format!("client {client}: refused: {message}"));
            }
            _ if others => {}
            _ => {
                self.clients[client as usize].target = self.rng.range(1, nodes);
                let backoff = self.rng.range(10, 40);
                self.schedule(
                    backoff,
                    Event::Client(ClientEvent::Retry { client, attempt }),
                );
            }
        }
    }

    /// The current operation completed with `reply` (or, for a read, `value`).
    fn finish(&mut self, client: u64, reply: Option<Reply>, value: Option<u64>) {
        self.close_attempts(client);
        let Some(cur) = self.clients[client as usize].current.take() else {
            return;
        };
        self.clock += 1;
        match (cur.op, reply, value) {
            (Op::Get { .. }, None, Some(v)) => {
                if let Some(i) = cur.history {
                    self.history[i].op = RegisterOp::Read(Some(v));
                    self.history[i].ret = Some(self.clock);
                }
            }
            (Op::OpenSession, Some(Reply::SessionOpened { session }), _) => {
                self.clients[client as usize].session = Some(session);
            }
            (Op::Put { .. }, Some(Reply::Register(RegisterReply::Written { .. })), _) => {
                if let Some(i) = cur.history {
                    self.history[i].ret = Some(self.clock);
                }
            }
            (op, Some(Reply::Lock(r)), _) => {
                self.lock_ops += 1;
                self.record_lock(client, &cur, op, r);
            }
            (Op::Acquire { .. } | Op::Deq { .. }, Some(Reply::Withdrawn), _) => {
                self.lock_ops += 1;
            }
            (Op::Withdraw { .. }, Some(Reply::Withdrawn), _) => self.lock_ops += 1,
            (op, Some(Reply::Queue(r)), _) => {
                self.lock_ops += 1;
                self.record_queue(client, &cur, op, r);
            }
            (op, reply, _) => {
                self.violation = Some(format!(
                    "client {client}: {op:?} answered {reply:?} / {value:?}"
                ));
            }
        }
        let think = self.rng.range(0, 20);
        self.schedule(think, Event::Client(ClientEvent::Start(client)));
    }

    fn record_lock(&mut self, client: u64, cur: &Current, op: Op, r: LockReply) {
        let now = self.now;
        self.log(|| {
            format!(
                "client {client}: call {} {op:?} (sent {}) answered {r:?}",
                cur.seq, cur.first_sent
            )
        });
        match (op, r) {
            (
                Op::Acquire { key, mode, .. },
                LockReply::Granted {
                    mode: got,
                    token,
                    expires_in_ms,
                    ttl_ms,
                    ..
                },
            ) => {
                if got < mode {
                    self.violation = Some(format!(
                        "client {client}: asked {mode:?} on {key}, answered ok holding {got:?}"
                    ));
                    return;
                }
                // The lease left when the grant applied (an acquire of what one holds
                // answers the same grant, not a fresh lease), counted from the send.
                let lease_end = cur.first_sent + self.client_lease(expires_in_ms);
                let held = self.holds_of(client);
                if held.get(&key).is_some_and(|h| h.token == token) {
                    return;
                }
                if let Some(old) = held.remove(&key) {
                    self.close_hold(client, key, old, now);
                }
                let h = Held {
                    mode: got,
                    token,
                    ttl_ms,
                    start: now,
                    lease_end,
                };
                self.holds_of(client).insert(key, h);
            }
            (Op::Acquire { .. }, LockReply::Invalid(why)) => {
                self.violation = Some(format!("client {client}: acquire invalid: {why}"));
            }
            (Op::Acquire { .. }, _) => {}
            (Op::Release { .. }, LockReply::Released) => {}
            (Op::Release { key }, LockReply::NotHeld { .. }) => {
                if let Some(old) = cur.releasing {
                    // The release applied before its answer came; if that was still
                    // inside the lease by the holder's clock, the lease ended early.
                    if old.lease_end > now {
                        self.violation = Some(format!(
                            "client {client}: lock {key} (token {}) was gone by {now} although its lease by the holder's clock ran to {}",
                            old.token, old.lease_end
                        ));
                    }
                }
            }
            (Op::Renew, LockReply::Renewed { .. }) => {
                let live: Vec<(u64, u64)> = self
                    .holds_of(client)
                    .iter()
                    .filter(|(_, h)| h.lease_end > now)
                    .map(|(k, h)| (*k, h.ttl_ms))
                    .collect();
                let renewed: Vec<(u64, u64)> = live
                    .into_iter()
                    .map(|(k, ttl)| (k, cur.first_sent + self.client_lease(ttl)))
                    .collect();
                for (key, end) in renewed {
                    if let Some(h) = self.holds_of(client).get_mut(&key) {
                        h.lease_end = h.lease_end.max(end);
                    }
                }
            }
            (op, r) => {
                self.violation = Some(format!("client {client}: {op:?} answered {r:?}"));
            }
        }
    }

    fn record_queue(&mut self, client: u64, cur: &Current, op: Op, r: QueueReply) {
        self.log(|| format!("client {client}: call {} {op:?} answered {r:?}", cur.seq));
        match (op, r) {
            (
                Op::Enq {
                    key,
                    value,
                    n,
                    dedup,
                },
                QueueReply::Enqueued { ids },
            ) => {
                let sent: Vec<crate::queuecheck::Sent> = (0..n)
                    .map(|i| crate::queuecheck::Sent {
                        key: queue_key(key + i),
                        value: value + i,
                        dedup: dedup.map(|d| format!("d{d}")),
                    })
                    .collect();
                self.queue_history.enqueued(&sent, &ids);
            }
            // A full queue refuses; the simulator's caps are far away.
            (Op::Deq { wait_ms, .. }, QueueReply::Delivered { messages }) => {
                self.queue_history.delivered(&messages, wait_ms > 0);
                let c = &mut self.clients[client as usize];
                c.inbox.extend(messages.iter().map(|m| (m.id, m.receipt)));
            }
            (
                Op::Ack,
                QueueReply::Acked {
                    missing,
                    stale,
                    undelivered,
                    ..
                },
            ) => {
                for &(id, receipt) in &cur.queue_ids {
                    if !missing.contains(&id) && !stale.contains(&id) && !undelivered.contains(&id)
                    {
                        self.queue_history.acked(id, receipt);
                    }
                }
            }
            (
                Op::Nack,
                QueueReply::Done
                | QueueReply::NotLeased { .. }
                | QueueReply::StaleReceipt { .. }
                | QueueReply::NotFound { .. },
            )
            | (Op::Requeue, QueueReply::Requeued { .. })
            | (Op::Configure, QueueReply::Configured { .. }) => {}
            (op, r) => {
                self.violation = Some(format!("client {client}: {op:?} answered {r:?}"));
            }
        }
    }

    fn close_hold(&mut self, client: u64, key: u64, h: Held, at: u64) {
        let app = self.clients[client as usize].app;
        self.holds.push(HoldInterval {
            key,
            client: app,
            mode: h.mode,
            token: h.token,
            start: h.start,
            end: at.min(h.lease_end),
        });
    }

    /// Holds whose lease ran out by the client's clock end there.
    fn drop_lapsed_holds(&mut self, client: u64) {
        let now = self.now;
        let lapsed: Vec<(u64, Held)> = self
            .holds_of(client)
            .iter()
            .filter(|(_, h)| h.lease_end <= now)
            .map(|(k, h)| (*k, *h))
            .collect();
        for (key, h) in lapsed {
            self.holds_of(client).remove(&key);
            self.close_hold(client, key, h, h.lease_end);
        }
    }

    /// At the end of a run, every hold still open ends with its lease.
    pub(crate) fn finish_holds(&mut self) {
        for client in 0..self.clients.len() as u64 {
            let held = std::mem::take(self.holds_of(client));
            for (key, h) in held {
                self.close_hold(client, key, h, h.lease_end);
            }
        }
    }
}
