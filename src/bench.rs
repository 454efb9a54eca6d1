//! `syncmesh bench`: load generators that print throughput and latency figures.
//!
//! `bench log` measures the storage layer alone: the raw fdatasync rate of the disk, then
//! the write-ahead log under 1, 16 and 64 concurrent proposers through group commit, with
//! appends per second, entries per fdatasync and append latency percentiles.

use crate::cluster_cmd::{ClusterArgs, LocalCluster};
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use mesh_node::storage::group::GroupCommitLog;
use mesh_node::storage::{FileLog, WalOptions};
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Benchmarks.
#[derive(Subcommand, Debug)]
pub(crate) enum BenchCommand {
    /// Durable appends per second of the write-ahead log, with group commit.
    Log(LogArgs),
    /// Time from kill -9 of the leader until a new leader commits, over several kills.
    Failover(FailoverArgs),
    /// Lock acquire + release through the gateway: N clients, distinct keys or one hot key.
    Lock(LockBenchArgs),
    /// What a big queue costs a node: memory per message, snapshot view, encode, restore.
    QueueState(crate::bench_queue::QueueStateArgs),
    /// Queue enqueues through the gateway: N clients, single messages and batches.
    Enq(crate::bench_queue::QueueBenchArgs),
    /// Queue dequeue + ack through the gateway: N clients, single messages and batches.
    DeqAck(crate::bench_queue::QueueBenchArgs),
    /// Cache gets and puts (owned, moving, durable) on a node's own port and through the
    /// gateway of a fresh local cluster.
    Cache(crate::bench_cache::CacheBenchArgs),
}

/// Options of `bench lock`.
#[derive(Args, Debug)]
pub(crate) struct LockBenchArgs {
    /// A running gateway to measure; without it a fresh local cluster is started.
    #[arg(long)]
    gateway: Option<std::net::SocketAddr>,
    /// Client counts to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    clients: Vec<usize>,
    /// Seconds per run.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Runs per configuration (the median is reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Only the hot-key workload (default: distinct keys, then one hot key).
    #[arg(long)]
    hot_only: bool,
    /// Directory for the scratch cluster.
    #[arg(long, default_value = ".syncmesh/bench-lock")]
    dir: PathBuf,
}

/// Options of `bench failover`.
#[derive(Args, Debug)]
pub(crate) struct FailoverArgs {
    /// Leader kills to measure.
    #[arg(long, default_value_t = 10)]
    kills: u32,
    /// Before the kills, watch the quiet cluster this many seconds for spurious elections.
    #[arg(long, default_value_t = 10)]
    quiet_secs: u64,
    /// Directory for the scratch cluster.
    #[arg(long, default_value = ".syncmesh/bench-failover")]
    dir: PathBuf,
    /// QUIC port of node1 of the scratch cluster.
    #[arg(long, default_value_t = 27001)]
    quic_port: u16,
    /// Admin port of node1 of the scratch cluster.
    #[arg(long, default_value_t = 29001)]
    admin_port: u16,
}

/// Options of `bench log`.
#[derive(Args, Debug)]
pub(crate) struct LogArgs {
    /// Seconds per measurement.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Concurrent proposer counts to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    proposers: Vec<usize>,
    /// Payload bytes per entry.
    #[arg(long, default_value_t = 128)]
    payload: usize,
    /// Directory for the scratch logs (on the disk to measure; not tmpfs).
    #[arg(long, default_value = ".syncmesh/bench-log")]
    dir: PathBuf,
}

pub(crate) fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Log(args) => bench_log(&args),
        BenchCommand::Failover(args) => bench_failover(&args),
        BenchCommand::Lock(args) => crate::bench_lock::run(&args.into()),
        BenchCommand::QueueState(args) => crate::bench_queue::run(&args),
        BenchCommand::Enq(args) => {
            crate::bench_queue::run_workload(crate::bench_queue::QueueWorkload::Enq, &args)
        }
        BenchCommand::DeqAck(args) => {
            crate::bench_queue::run_workload(crate::bench_queue::QueueWorkload::DeqAck, &args)
        }
        BenchCommand::Cache(args) => crate::bench_cache::run(&args),
    }
}

fn bench_log(args: &LogArgs) -> Result<()> {
    if !(0.1..=600.0).contains(&args.seconds) {
        bail!("--seconds must be between 0.1 and 600");
    }
    if args.proposers.is_empty() || args.proposers.iter().any(|&p| p == 0 || p > 4096) {
        bail!("--proposers takes counts between 1 and 4096");
    }
    if args.payload > 1 << 20 {
        bail!("--payload is at most 1 MiB");
    }
    let _ = std::fs::remove_dir_all(&args.dir);
    std::fs::create_dir_all(&args.dir).with_context(|| format!("create {}", args.dir.display()))?;
    let duration = Duration::from_secs_f64(args.seconds);
    let raw = raw_fdatasync(&args.dir, args.payload, duration)?;
    println!("disk: {}", args.dir.display());
    println!(
        "raw fdatasync (write {} B + fdatasync, 1 thread): {:>9.0} /s   mean {:>6.0} µs",
        args.payload,
        raw,
        1e6 / raw
    );
    println!();
    println!("proposers   appends/s   entries/fsync   fsyncs/s   p50 µs    p99 µs   vs raw");
    for &p in &args.proposers {
        let r = group_commit(&args.dir.join(format!("p{p}")), p, args.payload, duration)?;
        println!(
            "{:>9} {:>11.0} {:>15.1} {:>10.0} {:>8} {:>9} {:>7.1}x",
            p,
            r.appends_per_sec,
            r.entries_per_fsync,
            r.fsyncs_per_sec,
            r.p50_us,
            r.p99_us,
            r.appends_per_sec / raw
        );
    }
    let _ = std::fs::remove_dir_all(&args.dir);
    Ok(())
}

fn raw_fdatasync(dir: &Path, payload: usize, duration: Duration) -> Result<f64> {
    let path = dir.join("raw.dat");
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("create {}", path.display()))?;
    let buf = vec![0xA5u8; payload];
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < duration {
        file.write_all(&buf).context("write")?;
        file.sync_data().context("fdatasync")?;
        n += 1;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

struct GroupResult {
    appends_per_sec: f64,
    entries_per_fsync: f64,
    fsyncs_per_sec: f64,
    p50_us: u64,
    p99_us: u64,
}

fn group_commit(
    dir: &Path,
    proposers: usize,
    payload: usize,
    duration: Duration,
) -> Result<GroupResult> {
    let (log, _) = FileLog::open(dir, WalOptions::default())
        .with_context(|| format!("open {}", dir.display()))?;
    let group = GroupCommitLog::start(log, 1, 0)?;
    let start = Instant::now();
    let deadline = start + duration;
    let workers: Vec<_> = (0..proposers)
        .map(|_| {
            let g = group.clone();
            std::thread::spawn(move || -> Result<Vec<u32>> {
                let mut latencies = Vec::new();
                while Instant::now() < deadline {
                    let t = Instant::now();
                    g.append(vec![0x5A; payload])?;
                    latencies.push(t.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
                }
                Ok(latencies)
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for w in workers {
        let lat = w
            .join()
            .map_err(|_| anyhow::anyhow!("proposer thread panicked"))??;
        latencies.extend(lat);
    }
    let elapsed = start.elapsed().as_secs_f64();
    latencies.sort_unstable();
    let pct = |q: f64| {
        latencies
            .get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    let fsyncs = group.stats().fsyncs.load(Ordering::Relaxed);
    let entries = group.stats().entries.load(Ordering::Relaxed);
    Ok(GroupResult {
        appends_per_sec: entries as f64 / elapsed,
        entries_per_fsync: entries as f64 / fsyncs.max(1) as f64,
        fsyncs_per_sec: fsyncs as f64 / elapsed,
        p50_us: u64::from(pct(0.50)),
        p99_us: u64::from(pct(0.99)),
    })
}

impl From<LockBenchArgs> for crate::bench_lock::LockBench {
    fn from(a: LockBenchArgs) -> Self {
        Self {
            gateway: a.gateway,
            clients: a.clients,
            seconds: a.seconds,
            runs: a.runs,
            hot_only: a.hot_only,
            dir: a.dir,
        }
    }
}

fn wait_agreed(cluster: &LocalCluster, timeout: Duration) -> Result<(usize, u64, u64)> {
    let start = Instant::now();
    loop {
        if let Some(l) = cluster.agreed_leader() {
            return Ok(l);
        }
        if start.elapsed() > timeout {
            bail!("no agreed leader within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn bench_failover(args: &FailoverArgs) -> Result<()> {
    if args.kills == 0 || args.kills > 1000 {
        bail!("--kills must be between 1 and 1000");
    }
    let _ = std::fs::remove_dir_all(&args.dir);
    let mut cluster = LocalCluster::start(ClusterArgs {
        nodes: 3,
        dir: args.dir.clone(),
        quic_port: args.quic_port,
        admin_port: args.admin_port,
        gateway_port: 0,
        wait_secs: 30,
        seed_ports: false,
        seed_ports_base: 8000,
        fault_injection: false,
    })?;
    let (_, first_term, _) = wait_agreed(&cluster, Duration::from_secs(30))?;
    if args.quiet_secs > 0 {
        std::thread::sleep(Duration::from_secs(args.quiet_secs));
        let (_, term, _) = wait_agreed(&cluster, Duration::from_secs(5))?;
        println!(
            "quiet cluster for {} s: term {first_term} -> {term} ({} spurious elections)",
            args.quiet_secs,
            term - first_term
        );
    }
    let mut took = Vec::new();
    for round in 1..=args.kills {
        let (leader, term, commit) = wait_agreed(&cluster, Duration::from_secs(30))?;
        let killed = Instant::now();
        cluster.kill9(leader);
        // A new leader has committed once the survivors agree on it in a later term and
        // its commit index passed the old one (its no-op entry of the new term).
        loop {
            if let Some((l, t, c)) = cluster.agreed_leader() {
                if l != leader && t > term && c > commit {
                    break;
                }
            }
            if killed.elapsed() > Duration::from_secs(30) {
                bail!("round {round}: no new leader committed within 30 s");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let elapsed = killed.elapsed();
        println!(
            "kill {round:>2}: {} killed, new leader committed after {:>5.0} ms",
            LocalCluster::name(leader),
            elapsed.as_secs_f64() * 1e3
        );
        took.push(elapsed);
        cluster.start_node(leader)?;
        std::thread::sleep(Duration::from_millis(1500));
    }
    took.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "failover over {} kills: median {:.0} ms, best {:.0} ms, worst {:.0} ms",
        took.len(),
        ms(took[took.len() / 2]),
        ms(took[0]),
        ms(took[took.len() - 1])
    );
    cluster.stop_all();
    let _ = std::fs::remove_dir_all(&args.dir);
    Ok(())
}
