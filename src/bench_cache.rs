//! The cache workloads of `syncmesh bench cache`: closed-loop clients, each with its own
//! keep-alive HTTP/1.1 connection, against node1's own cache port and through the
//! gateway. Gets on a warm key set, write-back puts on lines the node owns, puts on
//! lines that move between two nodes, and durable puts. For the gets it also prints what
//! a local hit costs the cluster: directory requests and mesh messages per get (both 0
//! beyond the idle cluster's heartbeats).

use crate::cluster_cmd::{ClusterArgs, LocalCluster};
use anyhow::{bail, Context, Result};
use clap::Args;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Options of `bench cache`.
#[derive(Args, Debug)]
pub(crate) struct CacheBenchArgs {
    /// Client counts to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    clients: Vec<usize>,
    /// Seconds per run.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Runs per configuration (the median is reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Keys of the warm set the gets read.
    #[arg(long, default_value_t = 10_000)]
    keys: usize,
    /// Value bytes.
    #[arg(long, default_value_t = 16)]
    value_size: usize,
    /// Directory for the scratch cluster (created, and removed afterwards; it must not
    /// exist yet).
    #[arg(long, default_value = ".syncmesh/bench-cache")]
    dir: PathBuf,
}

/// Ports of the scratch cluster: the seed ports moved to 38000 (node1's cache port is
/// 38200), the gateway on 48100.
const SEED_BASE: u16 = 38000;
const GATEWAY: u16 = 48100;

#[derive(Clone, Copy, Debug)]
enum Workload {
    Get,
    PutOwned,
    PutMoving,
    PutDurable,
}

struct RunResult {
    ops: u64,
    errors: u64,
    latencies_us: Vec<u32>,
    seconds: f64,
}

/// `clients` closed loops for `duration`, each sending what `request(client, i)` says.
fn closed_loop(
    clients: usize,
    duration: Duration,
    request: Arc<dyn Fn(usize, u64) -> (String, String) + Send + Sync>,
) -> Result<RunResult> {
    let start = Instant::now();
    let deadline = start + duration;
    let workers: Vec<_> = (0..clients)
        .map(|c| {
            let request = request.clone();
            std::thread::spawn(move || -> Result<(u64, u64, Vec<u32>)> {
                let agent = crate::http::agent(Duration::from_secs(30));
                let (mut ops, mut errors, mut lat) = (0, 0, Vec::new());
                let mut i = 0u64;
                while Instant::now() < deadline {
                    let (url, body) = request(c, i);
                    i += 1;
                    let t = Instant::now();
                    if crate::http::post(&agent, &url, &body)? == 200 {
                        ops += 1;
                        lat.push(t.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
                    } else {
                        errors += 1;
                    }
                }
                Ok((ops, errors, lat))
            })
        })
        .collect();
    let mut result = RunResult {
        ops: 0,
        errors: 0,
        latencies_us: Vec::new(),
        seconds: 0.0,
    };
    for w in workers {
        let (ops, errors, lat) = w
            .join()
            .map_err(|_| anyhow::anyhow!("client thread panicked"))??;
        result.ops += ops;
        result.errors += errors;
        result.latencies_us.extend(lat);
    }
    result.seconds = start.elapsed().as_secs_f64();
    result.latencies_us.sort_unstable();
    Ok(result)
}

/// The mesh messages every node has sent so far.
fn messages_sent(cluster: &LocalCluster) -> u64 {
    (0..cluster.len())
        .filter_map(|i| crate::http::get(cluster.admin(i), "/metrics").ok())
        .map(|(_, text)| {
            text.lines()
                .filter(|l| l.starts_with("mesh_messages_sent_total"))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>() as u64
        })
        .sum()
}

/// node1's directory requests so far (`GET /cache/stats`).
fn directory_requests(node1: SocketAddr) -> Result<u64> {
    let (_, text) = crate::http::get(node1, "/cache/stats").context("cache stats")?;
    let v: serde_json::Value = serde_json::from_str(&text).context("cache stats JSON")?;
    v["nodes"]["node1"]["directory_requests"]
        .as_u64()
        .context("no directory_requests for node1")
}

fn url(port: u16, path: &str) -> String {
    format!("http://127.0.0.1:{port}{path}")
}

pub(crate) fn run(args: &CacheBenchArgs) -> Result<()> {
    if args.clients.is_empty() || args.clients.iter().any(|&c| c == 0 || c > 1024) {
        bail!("--clients takes counts between 1 and 1024");
    }
    if !(0.5..=600.0).contains(&args.seconds) || args.runs == 0 || args.runs > 20 {
        bail!("--seconds must be 0.5..600 and --runs 1..20");
    }
    if args.keys == 0 || args.keys > 1_000_000 || args.value_size > 64 << 10 {
        bail!("--keys must be 1..1000000 and --value-size at most 64 KiB");
    }
    if args.dir.exists() {
        bail!(
            "{} exists; bench cache makes a scratch cluster there and removes it afterwards: \
             pass a --dir that does not exist",
            args.dir.display()
        );
    }
    let mut cluster = LocalCluster::start(ClusterArgs {
        nodes: 3,
        dir: args.dir.clone(),
        quic_port: 37001,
        admin_port: 39001,
        gateway_port: GATEWAY,
        wait_secs: 30,
        seed_ports: true,
        seed_ports_base: SEED_BASE,
        fault_injection: false,
    })?;
    let result = measure(args, &cluster);
    cluster.stop_all();
    let _ = std::fs::remove_dir_all(&args.dir);
    result
}

fn measure(args: &CacheBenchArgs, cluster: &LocalCluster) -> Result<()> {
    let node1 = SEED_BASE + 200;
    let node2 = SEED_BASE + 201;
    let start = Instant::now();
    while crate::http::get(([127, 0, 0, 1], GATEWAY).into(), "/health")
        .map_or(true, |(s, _)| s != 200)
        || cluster.agreed_leader().is_none()
    {
        if start.elapsed() > Duration::from_secs(30) {
            bail!("the scratch cluster did not come up");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let value = "v".repeat(args.value_size);
    // The warm set: put at node1 (its lines, M, then written back: E).
    let keys = args.keys;
    let _ = prefill(node1, keys, &value)?;
    println!(
        "cache on node1's own port :{node1} and through the gateway :{GATEWAY}; {} keys, {} B values; median of {} runs of {} s",
        keys, args.value_size, args.runs, args.seconds
    );
    println!(
        "workload                                  clients      ops/s    p50 ms    p99 ms   errors"
    );
    let duration = Duration::from_secs_f64(args.seconds);
    for (name, workload, port) in [
        ("get, warm keys, node's own port", Workload::Get, node1),
        (
            "get, warm keys, through the gateway",
            Workload::Get,
            GATEWAY,
        ),
        (
            "put on owned lines, node's own port",
            Workload::PutOwned,
            node1,
        ),
        (
            "put on owned lines, through the gateway",
            Workload::PutOwned,
            GATEWAY,
        ),
        (
            "put on lines moving between 2 nodes",
            Workload::PutMoving,
            node1,
        ),
        ("durable put, node's own port", Workload::PutDurable, node1),
    ] {
        for &clients in &args.clients {
            let value = value.clone();
            let request: Arc<dyn Fn(usize, u64) -> (String, String) + Send + Sync> = match workload
            {
                Workload::Get => Arc::new(move |c, i| {
                    let k = (c as u64 * 7919 + i * 104_729) % keys as u64;
                    (url(port, "/cache/get"), format!(r#"{{"key":"w{k}"}}"#))
                }),
                Workload::PutOwned => Arc::new(move |c, i| {
                    let k = (c as u64 * 7919 + i * 104_729) % keys as u64;
                    (
                        url(port, "/cache/put"),
                        format!(r#"{{"key":"w{k}","val":"{value}"}}"#),
                    )
                }),
                Workload::PutMoving => Arc::new(move |c, i| {
                    let at = if i % 2 == 0 { node1 } else { node2 };
                    (
                        url(at, "/cache/put"),
                        format!(r#"{{"key":"mv{c}","val":"{value}"}}"#),
                    )
                }),
                Workload::PutDurable => Arc::new(move |c, i| {
                    (
                        url(port, "/cache/put"),
                        format!(
                            r#"{{"key":"d{c}-{}","val":"{value}","durable":true}}"#,
                            i % 1000
                        ),
                    )
                }),
            };
            let before = (messages_sent(cluster), directory_requests(url_addr(node1))?);
            let mut runs = Vec::new();
            for _ in 0..args.runs {
                runs.push(closed_loop(clients, duration, request.clone())?);
            }
            let after = (messages_sent(cluster), directory_requests(url_addr(node1))?);
            runs.sort_by(|x, y| (x.ops as f64 / x.seconds).total_cmp(&(y.ops as f64 / y.seconds)));
            let median = &runs[runs.len() / 2];
            println!(
                "{:<41} {:>8} {:>10.0} {:>9.2} {:>9.2} {:>8}",
                name,
                clients,
                median.ops as f64 / median.seconds,
                crate::bench_lock::percentile_ms(&median.latencies_us, 0.50),
                crate::bench_lock::percentile_ms(&median.latencies_us, 0.99),
                runs.iter().map(|r| r.errors).sum::<u64>()
            );
            if matches!(workload, Workload::Get) && port == node1 {
                let ops: u64 = runs.iter().map(|r| r.ops).sum();
                let seconds: f64 = runs.iter().map(|r| r.seconds).sum();
                let idle = idle_messages(cluster, Duration::from_secs_f64(seconds))?;
                let frames = (after.0 - before.0).saturating_sub(idle);
                println!(
                    "    per local-hit get: {:.4} directory requests, {:.4} mesh messages beyond \
                     the idle cluster's ({} in the runs, {idle} idle over as long)",
                    (after.1 - before.1) as f64 / ops.max(1) as f64,
                    frames as f64 / ops.max(1) as f64,
                    after.0 - before.0,
                );
            }
        }
    }
    Ok(())
}

fn url_addr(port: u16) -> SocketAddr {
    ([127, 0, 0, 1], port).into()
}

/// The mesh messages the cluster sends idle (heartbeats, lease renewals) over `d`.
fn idle_messages(cluster: &LocalCluster, d: Duration) -> Result<u64> {
    let before = messages_sent(cluster);
    std::thread::sleep(d.min(Duration::from_secs(60)));
    Ok(messages_sent(cluster) - before)
}

/// Put every key of the warm set at node1, once.
fn prefill(node1: u16, keys: usize, value: &str) -> Result<u64> {
    let value = value.to_string();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let workers: Vec<_> = (0..16)
        .map(|_| {
            let (next, value) = (next.clone(), value.clone());
            std::thread::spawn(move || -> Result<u64> {
                let agent = crate::http::agent(Duration::from_secs(30));
                let mut ok = 0;
                loop {
                    let k = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if k >= keys {
                        return Ok(ok);
                    }
                    let body = format!(r#"{{"key":"w{k}","val":"{value}"}}"#);
                    if crate::http::post(&agent, &url(node1, "/cache/put"), &body)? == 200 {
                        ok += 1;
                    }
                }
            })
        })
        .collect();
    let mut ok = 0;
    for w in workers {
        ok += w
            .join()
            .map_err(|_| anyhow::anyhow!("fill thread panicked"))??;
    }
    if ok < keys as u64 {
        bail!("filled {ok} of {keys} keys");
    }
    Ok(ok)
}
