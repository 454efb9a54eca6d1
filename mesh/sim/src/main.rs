//! `mesh-sim`: run many seeds of the deterministic simulator, or replay one.

use clap::Parser;
use std::process::ExitCode;

/// Deterministic simulation of a syncmesh Raft cluster under faults.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// How many seeds to run.
    #[arg(long, default_value_t = 1000)]
    seeds: u64,
    /// First seed.
    #[arg(long, default_value_t = 0)]
    start_seed: u64,
    /// Replay one seed, printing every nemesis action, then its report.
    #[arg(long)]
    replay: Option<u64>,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(seed) = args.replay {
        eprintln!("params: {:?}", mesh_sim::params::SimParams::from_seed(seed));
        return match mesh_sim::run_seed(seed, true) {
            Ok(report) => {
                println!("seed {seed} passed: {report:?}");
                ExitCode::SUCCESS
            }
            Err(f) => {
                println!("{f}");
                ExitCode::FAILURE
            }
        };
    }
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
    let started = std::time::Instant::now();
    let t = mesh_sim::run_seeds(args.start_seed, args.seeds, threads);
    for f in &t.failures {
        println!("{f}");
    }
    println!(
        "seeds {}..{}: {} run, {} failed, {} steps, {} client ops, {:.1}s",
        args.start_seed,
        args.start_seed + args.seeds,
        t.seeds,
        t.failures.len(),
        t.steps,
        t.ops,
        started.elapsed().as_secs_f64()
    );
    println!("{}", t.coverage_line());
    if t.failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
