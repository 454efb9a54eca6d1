//! Swarm testing: every run's parameters are drawn from its seed, so across many seeds
//! the simulator explores quiet networks and hostile ones, small and large batches,
//! frequent and rare snapshots, with and without membership changes.

use crate::rng::SimRng;

/// Everything that shapes one simulated run.
#[derive(Clone, Debug)]
pub struct SimParams {
    /// Nodes in the world (3 or 5).
    pub nodes: u64,
    /// How many of them form the bootstrap cluster; the rest are spares to add later.
    pub initial_voters: u64,
    /// Steps (processed events) of the fault phase.
    pub steps: u64,
    /// Probability that a message is lost.
    pub drop: f64,
    /// Probability that a message is delivered twice.
    pub duplicate: f64,
    /// Message delay bounds in virtual milliseconds (reordering follows from the spread).
    pub delay_ms: (u64, u64),
    /// Delay of an fsync in virtual milliseconds.
    pub fsync_ms: (u64, u64),
    /// Mean virtual milliseconds between two nemesis actions.
    pub nemesis_every_ms: u64,
    /// Allowed nemesis actions.
    pub crashes: bool,
    /// Partitions (symmetric, asymmetric, leader isolation).
    pub partitions: bool,
    /// Membership changes (add learner, promote, remove).
    pub conf_changes: bool,
    /// Leadership transfers.
    pub transfers: bool,
    /// Applied entries between two snapshots (0: never).
    pub snapshot_every: u64,
    /// Raft batching and pipelining limits.
    pub max_entries_per_msg: usize,
    /// Pipelined appends per follower.
    pub max_inflight: usize,
    /// Snapshot chunk size.
    pub snapshot_chunk_bytes: usize,
    /// Concurrent clients.
    pub clients: u64,
    /// Keys the clients work on.
    pub keys: u64,
    /// Half the client operations are lock acquires and releases.
    pub locks: bool,
    /// Bound on how far a node's monotonic clock runs fast or slow, in parts per million.
    pub drift_ppm: u64,
    /// The nemesis may step nodes' wall clocks forward and back.
    pub wall_steps: bool,
    /// Probability that an answer to a client is lost on its way.
    pub answer_loss: f64,
    /// Probability that a prompt call is sent to two nodes at once (a hedge).
    pub hedge: f64,
    /// Probability that a waiting acquire's caller gives up before its wait ends.
    pub give_up: f64,
    /// Two caller slots share one lock client id (an application with two threads).
    pub shared_ids: bool,
    /// Clients also produce and consume queue messages.
    pub queue: bool,
    /// Nodes take what arrives close together as one batch (the driver's group
    /// commit: `begin_batch` .. `end_batch`).
    pub batching: bool,
    /// Cache clients (0: no cache workload).
    pub cache_clients: u64,
}

impl SimParams {
    /// The parameters a seed stands for.
    pub fn from_seed(seed: u64) -> Self {
        let mut rng = SimRng::new(seed.wrapping_mul(0xA24B_AED4_963E_E407));
        let nodes = if rng.chance(0.5) { 3 } else { 5 };
        let conf_changes = rng.chance(0.4);
        let initial_voters = if conf_changes && nodes == 5 && rng.chance(0.5) {
            3
        } else {
            nodes
        };
        let hostile = rng.chance(0.3);
        let shared_ids = rng.chance(0.7);
        Self {
            nodes,
            initial_voters,
            steps: rng.range(10_000, 40_000),
            drop: if hostile {
                rng.range(5, 25) as f64 / 100.0
            } else {
                rng.range(0, 5) as f64 / 100.0
            },
            duplicate: rng.range(0, 10) as f64 / 100.0,
            delay_ms: (1, rng.pick(&[3, 10, 30, 60])),
            fsync_ms: (0, rng.pick(&[0, 1, 3])),
            nemesis_every_ms: rng.pick(&[40, 120, 400]),
            crashes: rng.chance(0.8),
            partitions: rng.chance(0.8),
            conf_changes,
            transfers: rng.chance(0.5),
            snapshot_every: rng.pick(&[0, 10, 40, 150]),
            max_entries_per_msg: rng.pick(&[1, 3, 64]),
            max_inflight: rng.pick(&[1, 4, 32]),
            snapshot_chunk_bytes: rng.pick(&[7, 64, 4096]),
            clients: if shared_ids {
                rng.range(4, 8)
            } else {
                rng.range(2, 6)
            },
            keys: if shared_ids {
                rng.range(2, 3)
            } else {
                rng.range(1, 4)
            },
            locks: shared_ids || rng.chance(0.5),
            drift_ppm: rng.pick(&[0, 1_000, 10_000]),
            wall_steps: rng.chance(0.6),
            answer_loss: rng.pick(&[0.0, 0.02, 0.1]),
            hedge: rng.pick(&[0.0, 0.1, 0.3]),
            give_up: rng.pick(&[0.0, 0.1, 0.3]),
            shared_ids,
            queue: rng.chance(0.6),
            batching: rng.chance(0.5),
            cache_clients: if rng.chance(0.6) { rng.range(2, 5) } else { 0 },
        }
    }
}
