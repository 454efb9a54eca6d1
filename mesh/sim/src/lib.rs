//! mesh-sim: a deterministic simulator that runs syncmesh's real Raft core.
//!
//! One seed fixes everything: the cluster's size and parameters (swarm testing), the
//! network's losses, duplicates, delays and partitions, crashes that lose whatever was not
//! fsynced, membership changes, leadership transfers, snapshots, and the clients' operations.
//! The Raft invariants are checked after every step; at the end the faults heal, the
//! cluster must converge within a bounded virtual time, and the clients' history must be
//! linearizable. A failure names the seed; `--replay SEED` runs it again, step for step.

mod cachecheck;
mod client;
pub mod invariants;
pub mod kv;
pub mod linearizability;
pub mod lockcheck;
pub mod params;
mod queuecheck;
pub mod rng;
pub mod world;

use params::SimParams;
use std::panic::{catch_unwind, AssertUnwindSafe};
use world::{Coverage, RunReport, World};

/// A seed that failed, and why.
#[derive(Clone, Debug)]
pub struct SeedFailure {
    /// The seed.
    pub seed: u64,
    /// What went wrong.
    pub reason: String,
}

impl std::fmt::Display for SeedFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "seed {} failed: {}\n  params: {:?}\n  replay: just sim-repro {0}   (cargo run -p mesh-sim --release -- --replay {0})",
            self.seed,
            self.reason,
            SimParams::from_seed(self.seed)
        )
    }
}

/// Run one seed. A panic inside the core (a broken assertion) counts as a failure.
pub fn run_seed(seed: u64, verbose: bool) -> Result<RunReport, SeedFailure> {
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        World::new(seed, SimParams::from_seed(seed), verbose).run()
    }));
    match outcome {
        Ok(Ok(report)) => Ok(report),
        Ok(Err(reason)) => Err(SeedFailure { seed, reason }),
        Err(panic) => {
            let reason = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panic".into());
            Err(SeedFailure {
                seed,
                reason: format!("panic: {reason}"),
            })
        }
    }
}

/// Totals over many seeds.
#[derive(Clone, Debug, Default)]
pub struct Totals {
    /// Seeds run.
    pub seeds: u64,
    /// Steps over all seeds.
    pub steps: u64,
    /// Completed client operations over all seeds.
    pub ops: u64,
    /// What the seeds exercised, summed.
    pub coverage: Coverage,
    /// Seeds that saw each kind of event: waits granted, leases expired, cancels that
    /// raced a grant, deadlocks, upgrades that waited, wall-clock steps.
    pub seeds_seeing: [u64; 13],
    /// Failures, in seed order.
    pub failures: Vec<SeedFailure>,
}

/// Run `count` seeds from `start` on `threads` threads.
pub fn run_seeds(start: u64, count: u64, threads: usize) -> Totals {
    let next = std::sync::atomic::AtomicU64::new(start);
    let end = start + count;
    let totals = std::sync::Mutex::new(Totals::default());
    std::thread::scope(|scope| {
        for _ in 0..threads.max(1) {
            scope.spawn(|| loop {
                let seed = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if seed >= end {
                    return;
                }
                let result = run_seed(seed, false);
                // A poisoned lock means another worker panicked outside run_seed's guard.
                let mut t = totals.lock().unwrap_or_else(|p| p.into_inner());
                t.seeds += 1;
                match result {
                    Ok(r) => {
                        t.steps += r.steps;
                        t.ops += r.ops_completed as u64;
                        t.coverage.add(&r.coverage);
                        let c = &r.coverage;
                        let seen = [
                            c.waits_granted,
                            c.leases_expired,
                            c.cancels_raced_grant,
                            c.deadlocks,
                            c.upgrades_waited,
                            c.clocks_stepped,
                            c.queue_redeliveries,
                            c.queue_dead_letters,
                            c.queue_deduplicated,
                            c.queue_polls_woken,
                            c.queue_acked,
                            c.batches,
                            c.snapshots_restored,
                        ];
                        for (n, v) in t.seeds_seeing.iter_mut().zip(seen) {
                            *n += u64::from(v > 0);
                        }
                    }
                    Err(f) => t.failures.push(f),
                }
            });
        }
    });
    let mut t = totals.into_inner().unwrap_or_else(|p| p.into_inner());
    t.failures.sort_by_key(|f| f.seed);
    t
}

impl Totals {
    /// The coverage line printed after a run.
    pub fn coverage_line(&self) -> String {
        let c = &self.coverage;
        let s = &self.seeds_seeing;
        format!(
            "waits granted {} ({} seeds), leases expired {} ({}), cancels raced a grant {} ({}), \
             deadlocks refused {} ({}), upgrades waited {} ({}), clocks stepped {} ({}); \
             waits withdrawn {}, answers lost {}, hedged calls {}; queue: redeliveries {} ({}), \
             dead letters {} ({}), dedup repeats {} ({}), long polls woken {} ({}), acks {} ({}); \
             input batches {} ({}), snapshots from a leader decoded off the loop {} ({})",
            c.waits_granted,
            s[0],
            c.leases_expired,
            s[1],
            c.cancels_raced_grant,
            s[2],
            c.deadlocks,
            s[3],
            c.upgrades_waited,
            s[4],
            c.clocks_stepped,
            s[5],
            c.waits_withdrawn,
            c.answers_lost,
            c.hedges,
            c.queue_redeliveries,
            s[6],
            c.queue_dead_letters,
            s[7],
            c.queue_deduplicated,
            s[8],
            c.queue_polls_woken,
            s[9],
            c.queue_acked,
            s[10],
            c.batches,
            s[11],
            c.snapshots_restored,
            s[12]
        )
    }
}

/// Seeds per `cargo test` run: `SYNCMESH_SIM_SEEDS`, default 300.
pub fn seeds_from_env() -> u64 {
    std::env::var("SYNCMESH_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn swarm_of_seeds_holds_every_invariant() {
        let count = seeds_from_env();
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
        let t = run_seeds(0, count, threads);
        for f in &t.failures {
            eprintln!("{f}");
        }
        eprintln!(
            "simulated {} seeds, {} steps, {} client ops",
            t.seeds, t.steps, t.ops
        );
        eprintln!("{}", t.coverage_line());
        assert!(
            t.failures.is_empty(),
            "{} of {} seeds failed",
            t.failures.len(),
            t.seeds
        );
        assert_eq!(t.seeds, count);
        assert!(
            t.steps >= count * 2_000,
            "each seed runs at least 2000 steps"
        );
        assert!(t.ops > count * 10, "clients made progress: {} ops", t.ops);
        // The workload does what users do: every kind of event happens somewhere, and
        // most of them in most seeds.
        for (name, seen) in [
            "waits granted",
            "leases expired",
            "cancels raced a grant",
            "deadlocks refused",
            "upgrades waited",
            "clocks stepped",
            "queue redeliveries",
            "queue dead letters",
            "queue dedup repeats",
            "queue long polls woken",
            "queue acks",
            "input batches",
            "snapshots restored",
        ]
        .iter()
        .zip(t.seeds_seeing)
        {
            assert!(seen > 0, "no seed saw {name}: {}", t.coverage_line());
        }
    }

    #[test]
    fn same_seed_gives_same_trace() {
        for seed in [7, 1234, 99_999] {
            let a = run_seed(seed, false).map_err(|f| f.to_string());
            let b = run_seed(seed, false).map_err(|f| f.to_string());
            assert_eq!(a, b, "seed {seed} is not deterministic");
        }
    }

    #[test]
    fn swarm_covers_both_cluster_sizes_and_every_fault() {
        let params: Vec<SimParams> = (0..300).map(SimParams::from_seed).collect();
        assert!(params.iter().any(|p| p.nodes == 3) && params.iter().any(|p| p.nodes == 5));
        assert!(params
            .iter()
            .any(|p| p.crashes && p.partitions && p.conf_changes && p.transfers));
        assert!(params.iter().any(|p| p.drop > 0.1) && params.iter().any(|p| p.duplicate > 0.0));
        assert!(params
            .iter()
            .any(|p| p.snapshot_every > 0 && p.snapshot_chunk_bytes < 64));
    }
}
