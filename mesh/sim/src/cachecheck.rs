//! The simulator's cache workload and what it checks.
//!
//! Cache clients are what a cache user does through one node's port: gets, puts
//! (write-back, durable, with a TTL), deletes and evictions, each at a node picked at
//! random, each given up on after a while (and some of them early, their connection
//! closed). Every answer is recorded; after the run the history is checked:
//!
//! - per key, linearizable (Wing & Gong, `linearizability`): a delete writes "no
//!   value" (0), a miss reads it. An acknowledged write-back put counts as certainly
//!   applied unless its writer later crashed or lost its lines by lease expiry (DESIGN
//!   section 6: what a crashed or cut-off writer acknowledged within its write-back
//!   window may be lost); then it may or may not have taken effect, and reads of
//!   write-back keys served by a node that later lost its lines constrain nothing (a
//!   loss is not bounded in time here: the HTTP kill -9 and cut-off tests measure the
//!   window). Durable puts, deletes, and every read of a durable key never get that
//!   allowance.
//! - every value any get returned (at any node, those dropped above included) was put
//!   to that key, by a put that was not refused and began before the get returned.
//! - keys written with a TTL (write-back and durable puts): a get never returns a value older than one an earlier,
//!   completed get returned, or older than a put that completed before it began, and
//!   after a miss never one put before the miss began (a TTL or an eviction never
//!   brings back an older value).
//!
//! After every step the world checks the single-writer rule on every node's own clock:
//! if a node serves a key in M or E, no other node serves it at all.

use crate::linearizability::{self, Operation, RegisterOp};
use crate::world::{Event, World};
use mesh_core::node::CallId;
use mesh_core::raft::NodeId;
use mesh_core::services::cache::{CacheAnswer, CacheCall, CacheError};
use mesh_core::wire::{ClientRequest, ClientResponse};
use std::collections::BTreeMap;

/// Cache client ids start here (below are the session clients).
pub(crate) const CACHE_CLIENT_BASE: u64 = 1 << 32;
/// Keys whose puts are write-back, durable, and with a TTL.
pub(crate) const WRITE_BACK_KEYS: u64 = 4;
const DURABLE_KEYS: u64 = 2;
const TTL_KEYS: u64 = 2;
/// A call not answered within this is given up on (the node's own cache call timeout is
/// 3 s).
const GIVE_UP_MS: u64 = 4_000;

/// Every key the workload touches, by its number.
pub(crate) fn all_keys() -> impl Iterator<Item = u64> {
    0..WRITE_BACK_KEYS + DURABLE_KEYS + TTL_KEYS
}

pub(crate) fn key_name(key: u64) -> String {
    format!("C{key}")
}

fn is_durable(key: u64) -> bool {
    (WRITE_BACK_KEYS..WRITE_BACK_KEYS + DURABLE_KEYS).contains(&key)
}

fn is_ttl(key: u64) -> bool {
    key >= WRITE_BACK_KEYS + DURABLE_KEYS
}

#[derive(Clone, Copy, Debug)]
enum CacheOpKind {
    Get,
    Put { value: u64, durable: bool },
    Delete,
    Evict,
}

#[derive(Clone, Debug)]
struct InFlight {
    key: u64,
    kind: CacheOpKind,
    node: NodeId,
    call: CallId,
    /// Index in the cache history.
    entry: Option<usize>,
}

/// One simulated cache user.
#[derive(Clone, Debug, Default)]
pub(crate) struct CacheClient {
    current: Option<InFlight>,
    attempt: u64,
}

impl CacheClient {
    pub(crate) fn busy(&self) -> bool {
        self.current.is_some()
    }
}

/// One recorded operation.
#[derive(Clone, Copy, Debug)]
struct Entry {
    key: u64,
    /// Write(0) is a delete; Read(Some(0)) a miss.
    op: RegisterOp,
    invoked: u64,
    returned: Option<u64>,
    /// The node that served it.
    node: NodeId,
    /// A write-back put (may be lost if its writer crashed or lapsed afterwards).
    write_back: bool,
    /// Refused before it did anything: not part of the history.
    refused: bool,
}

/// What the cache clients did and were told.
#[derive(Clone, Debug, Default)]
pub(crate) struct CacheHistory {
    entries: Vec<Entry>,
    /// History clock times at which each node lost what it held (a crash, or its lines
    /// revoked because its lease ran out).
    losses: BTreeMap<NodeId, Vec<u64>>,
    /// Coverage: gets served, puts acknowledged, local-hit gets.
    pub(crate) gets: u64,
    pub(crate) puts: u64,
    pub(crate) misses: u64,
}

impl CacheHistory {
    /// `node` lost its lines at history time `at`.
    pub(crate) fn loss(&mut self, node: NodeId, at: u64) {
        self.losses.entry(node).or_default().push(at);
    }

    fn lost_after(&self, node: NodeId, at: u64) -> bool {
        self.losses
            .get(&node)
            .is_some_and(|l| l.iter().any(|t| *t > at))
    }

    /// Check the history (see the module docs).
    pub(crate) fn check(&self) -> Result<(), String> {
        let mut ops = Vec::new();
        for e in &self.entries {
            if is_ttl(e.key) || e.refused {
                continue;
            }
            let mut op = Operation {
                key: e.key,
                op: e.op,
                call: e.invoked,
                ret: e.returned,
            };
            let shaky = self.lost_after(e.node, e.invoked);
            match e.op {
                RegisterOp::Write(_) if e.write_back && shaky => op.ret = None,
                // (Durable keys get no write-back puts: a read of one is checked
                // whatever became of the node that served it.)
                RegisterOp::Read(_) if shaky && !is_durable(e.key) => continue,
                _ => {}
            }
            ops.push(op);
        }
        linearizability::check(&ops, 0).map_err(|v| {
            let shown: Vec<String> = self
                .entries
                .iter()
                .filter(|e| e.key == v.key && !e.refused)
                .map(|e| {
                    format!(
                        "{:?}@n{} [{}..{}]{}{}",
                        e.op,
                        e.node,
                        e.invoked,
                        e.returned.map_or("-".into(), |r| r.to_string()),
                        if e.write_back { " wb" } else { "" },
                        if self.lost_after(e.node, e.invoked) {
                            " lost-able"
                        } else {
                            ""
                        },
                    )
                })
                .collect();
            format!(
                "cache: history of key {} ({} ops) is not linearizable: {}",
                key_name(v.key),
                v.ops,
                shown.join(", ")
            )
        })?;
        self.check_every_hit_was_written()?;
        self.check_ttl_keys()
    }

    /// Every value a get returned, at any node and of any key (those whose reads the
    /// linearizability check drops because their node lost its lines afterwards
    /// included), was put to that key by a put that was not refused and that began
    /// before the get returned: a cache never invents, tears, crosses keys or
    /// resurrects a refused write, whatever became of the node that served it.
    fn check_every_hit_was_written(&self) -> Result<(), String> {
        let puts: BTreeMap<u64, &Entry> = self
            .entries
            .iter()
            .filter_map(|e| match e.op {
                RegisterOp::Write(v) if v != 0 => Some((v, e)),
                _ => None,
            })
            .collect();
        for r in &self.entries {
            let (RegisterOp::Read(Some(v)), Some(done)) = (r.op, r.returned) else {
                continue;
            };
            if v == 0 {
                continue;
            }
            let fault = match puts.get(&v) {
                None => "which was never put",
                Some(p) if p.key != r.key => "which was put to another key",
                Some(p) if p.refused => "whose put was refused",
                Some(p) if p.invoked > done => "whose put began after the get returned",
                Some(_) => continue,
            };
            return Err(format!(
                "cache: a get of {} at n{} read {v}, {fault}",
                key_name(r.key),
                r.node
            ));
        }
        Ok(())
    }

    fn check_ttl_keys(&self) -> Result<(), String> {
        for key in all_keys().filter(|k| is_ttl(*k)) {
            let reads: Vec<&Entry> = self
                .entries
                .iter()
                .filter(|e| e.key == key && e.returned.is_some())
                .filter(|e| matches!(e.op, RegisterOp::Read(Some(v)) if v != 0))
                .collect();
            // A get that began after another returned must not see a value whose put
            // completed before the put of the value the first one saw began (an older
            // one), unless the newer one may have been lost.
            let put_of = |v: u64| {
                self.entries
                    .iter()
                    .find(|e| e.key == key && e.op == RegisterOp::Write(v))
            };
            for a in &reads {
                let (RegisterOp::Read(Some(va)), Some(done)) = (a.op, a.returned) else {
                    continue;
                };
                let Some(newer) = put_of(va) else { continue };
                if self.value_may_be_lost(key, va) {
                    continue;
                }
                for b in reads.iter().filter(|b| b.invoked > done) {
                    let RegisterOp::Read(Some(vb)) = b.op else {
                        continue;
                    };
                    let older = put_of(vb).and_then(|p| p.returned);
                    if older.is_some_and(|t| t < newer.invoked) {
                        return Err(format!(
                            "cache: {} read {vb} after an earlier get read the newer {va}",
                            key_name(key)
                        ));
                    }
                }
            }
            // Nor, after a miss, a value that was put before the miss began: the miss
            // saw it expire (only an owner answers a miss on its own; it tells the
            // directory, and every copy elsewhere expires before the directory's).
            let misses = self.entries.iter().filter(|e| {
                e.key == key && e.op == RegisterOp::Read(Some(0)) && e.returned.is_some()
            });
            // (A miss at a node that lost its lines afterwards constrains nothing: the
            // expiry it sent the directory may have been lost with them.)
            let misses = misses.filter(|m| !self.lost_after(m.node, m.invoked));
            for m in misses {
                let Some(m_done) = m.returned else { continue };
                for b in reads.iter().filter(|b| b.invoked > m_done) {
                    let RegisterOp::Read(Some(vb)) = b.op else {
                        continue;
                    };
                    let before = put_of(vb)
                        .and_then(|p| p.returned)
                        .is_some_and(|r| r < m.invoked);
                    if before && !self.value_may_be_lost(key, vb) {
                        return Err(format!(
                            "cache: {} read {vb} after a miss that began once it was put",
                            key_name(key)
                        ));
                    }
                }
            }
            // Nor a value older than a put that completed before the get began.
            for b in &reads {
                let RegisterOp::Read(Some(vb)) = b.op else {
                    continue;
                };
                let Some(older) = put_of(vb).and_then(|p| p.returned) else {
                    continue;
                };
                let newer = self.entries.iter().find(|p| {
                    p.key == key
                        && !p.refused
                        && matches!(p.op, RegisterOp::Write(w) if w != vb
                            && !self.value_may_be_lost(key, w))
                        && p.invoked > older
                        && p.returned.is_some_and(|r| r < b.invoked)
                });
                if let Some(p) = newer {
                    return Err(format!(
                        "cache: {} read {vb} after the newer put {:?} completed",
                        key_name(key),
                        p.op
                    ));
                }
            }
        }
        Ok(())
    }

    /// Whether the write of `value` to `key` may have been lost: it was a write-back put
    /// and its writer lost its lines afterwards (a durable put is never lost, and a value
    /// another node read was written back first).
    fn value_may_be_lost(&self, key: u64, value: u64) -> bool {
        self.entries.iter().any(|e| {
            e.key == key
                && e.write_back
                && e.op == RegisterOp::Write(value)
                && self.lost_after(e.node, e.invoked)
        })
    }
}

fn decode_value(bytes: &[u8]) -> Option<u64> {
    std::str::from_utf8(bytes).ok()?.parse().ok()
}

impl World {
    /// Start a cache client's next operation.
    pub(crate) fn start_cache_op(&mut self, client: u64) {
        let idx = (client - CACHE_CLIENT_BASE) as usize;
        if !self.faults || self.cache_clients[idx].busy() {
            return;
        }
        let key = self
            .rng
            .range(0, WRITE_BACK_KEYS + DURABLE_KEYS + TTL_KEYS - 1);
        let node = self.rng.range(1, self.params.nodes);
        let kind = match self.rng.range(0, 99) {
            0..=49 => CacheOpKind::Get,
            50..=87 => {
                self.next_value += 1;
                // TTL keys get both kinds of put: a durable one stores its TTL in the
                // directory, a write-back one carries what is left of it.
                let durable = is_durable(key) || (is_ttl(key) && self.rng.chance(0.3));
                CacheOpKind::Put {
                    value: self.next_value,
                    durable,
                }
            }
            88..=93 if !is_ttl(key) => CacheOpKind::Delete,
            _ => CacheOpKind::Evict,
        };
        let call = match kind {
            CacheOpKind::Get => CacheCall::Get { key: key_name(key) },
            CacheOpKind::Put { value, durable } => CacheCall::Put {
                key: key_name(key),
                value: value.to_string().into_bytes(),
                ttl_ms: is_ttl(key).then(|| self.rng.range(20, 1_500)),
                durable: Some(durable),
            },
            CacheOpKind::Delete => CacheCall::Delete { key: key_name(key) },
            CacheOpKind::Evict => CacheCall::Evict { key: key_name(key) },
        };
        self.clock += 1;
        let invoked = self.clock;
        let entry = match kind {
            CacheOpKind::Get => Some(RegisterOp::Read(None)),
            CacheOpKind::Put { value, .. } => Some(RegisterOp::Write(value)),
            CacheOpKind::Delete => Some(RegisterOp::Write(0)),
            CacheOpKind::Evict => None,
        }
        .map(|op| {
            self.cache_history.entries.push(Entry {
                key,
                op,
                invoked,
                returned: None,
                node,
                write_back: matches!(kind, CacheOpKind::Put { durable: false, .. }),
                refused: false,
            });
            self.cache_history.entries.len() - 1
        });
        let bytes = postcard::to_stdvec(&call).unwrap_or_default();
        let call_id = self.send_call(client, node, ClientRequest::Local(bytes));
        let c = &mut self.cache_clients[idx];
        c.attempt += 1;
        let attempt = c.attempt;
        c.current = Some(InFlight {
            key,
            kind,
            node,
            call: call_id,
            entry,
        });
        // Some callers give up early and close the connection.
        let after = if self.rng.chance(self.params.give_up) {
            self.rng.range(1, 600)
        } else {
            GIVE_UP_MS
        };
        self.schedule(after, Event::CacheGiveUp { client, attempt });
    }

    /// A cache client stops waiting for its call.
    pub(crate) fn cache_give_up(&mut self, client: u64, attempt: u64) {
        let idx = (client - CACHE_CLIENT_BASE) as usize;
        if self.cache_clients[idx].attempt != attempt {
            return;
        }
        if let Some(cur) = self.cache_clients[idx].current.take() {
            self.cancel_call(cur.node, cur.call);
            // Not answered: a write may or may not have happened (it stays `None`), a
            // read constrains nothing.
            self.next_cache_op(client);
        }
    }

    /// A cache call was answered.
    pub(crate) fn cache_answer(&mut self, client: u64, call: CallId, response: ClientResponse) {
        let idx = (client - CACHE_CLIENT_BASE) as usize;
        let Some(cur) = self.cache_clients[idx].current.clone() else {
            return;
        };
        if cur.call != call {
            return;
        }
        self.cache_clients[idx].current = None;
        self.clock += 1;
        let now = self.clock;
        let answer = match response {
            ClientResponse::Local(bytes) => postcard::from_bytes::<CacheAnswer>(&bytes).ok(),
            _ => None,
        };
        let Some(answer) = answer else {
            self.violation = Some(format!(
                "cache: a node answered a cache call with {answer:?}"
            ));
            return;
        };
        let record = |w: &mut Self, op: RegisterOp| {
            if let Some(i) = cur.entry {
                let e = &mut w.cache_history.entries[i];
                e.op = op;
                e.returned = Some(now);
            }
        };
        match (cur.kind, answer) {
            (CacheOpKind::Get, CacheAnswer::Got { hit, value, .. }) => {
                let v = if hit {
                    match value.as_deref().and_then(decode_value) {
                        Some(v) => v,
                        None => {
                            self.violation = Some(format!(
                                "cache: {} read a value that is not one the workload wrote",
                                key_name(cur.key)
                            ));
                            return;
                        }
                    }
                } else {
                    self.cache_history.misses += 1;
                    0
                };
                self.cache_history.gets += 1;
                record(self, RegisterOp::Read(Some(v)));
            }
            (CacheOpKind::Put { value, .. }, CacheAnswer::Put { .. }) => {
                self.cache_history.puts += 1;
                record(self, RegisterOp::Write(value));
            }
            (CacheOpKind::Delete, CacheAnswer::Deleted) => record(self, RegisterOp::Write(0)),
            (CacheOpKind::Evict, CacheAnswer::Evicted { .. }) => {}
            (kind, CacheAnswer::Error(e)) => {
                let not_done = matches!(
                    e,
                    CacheError::Unavailable(_) | CacheError::Full(_) | CacheError::Invalid(_)
                );
                if not_done {
                    if let (Some(i), CacheOpKind::Put { .. } | CacheOpKind::Delete) =
                        (cur.entry, kind)
                    {
                        // Refused before anything happened: it took no effect.
                        self.cache_history.entries[i].refused = true;
                    }
                }
            }
            (kind, answer) => {
                self.violation = Some(format!(
                    "cache: {kind:?} of {} answered {answer:?}",
                    key_name(cur.key)
                ));
                return;
            }
        }
        self.next_cache_op(client);
    }

    fn next_cache_op(&mut self, client: u64) {
        let delay = self.rng.range(0, 30);
        self.schedule(delay, Event::CacheStart(client));
    }
}
