//! The lock workload of `syncmesh bench`: closed-loop clients, each with its own
//! keep-alive HTTP/1.1 connection to the gateway, doing acquire X + release as one
//! operation.

use crate::cluster_cmd::{ClusterArgs, LocalCluster};
use anyhow::{bail, Result};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// What to measure.
pub(crate) struct LockBench {
    pub(crate) gateway: Option<SocketAddr>,
    pub(crate) clients: Vec<usize>,
    pub(crate) seconds: f64,
    pub(crate) runs: usize,
    pub(crate) hot_only: bool,
    pub(crate) dir: PathBuf,
}

struct RunResult {
    ops: u64,
    errors: u64,
    latencies_us: Vec<u32>,
    seconds: f64,
}

fn one_run(
    gateway: SocketAddr,
    clients: usize,
    hot: bool,
    duration: Duration,
) -> Result<RunResult> {
    let start = Instant::now();
    let deadline = start + duration;
    let workers: Vec<_> = (0..clients)
        .map(|c| {
            std::thread::spawn(move || -> Result<(u64, u64, Vec<u32>)> {
                let agent = crate::http::agent(Duration::from_secs(60));
                let acquire_url = format!("http://{gateway}/lock/acquire");
                let release_url = format!("http://{gateway}/lock/release");
                let key = if hot {
                    "bench-hot".to_string()
                } else {
                    format!("bench-{c}")
                };
                let client = format!("bench-client-{c}");
                let acquire = format!(
                    r#"{{"key":"{key}","mode":"X","client_id":"{client}","wait_ms":30000}}"#
                );
                let release = format!(r#"{{"key":"{key}","client_id":"{client}"}}"#);
                let (mut ops, mut errors, mut lat) = (0, 0, Vec::new());
                while Instant::now() < deadline {
                    let t = Instant::now();
                    let ok = crate::http::post(&agent, &acquire_url, &acquire)? == 200
                        && crate::http::post(&agent, &release_url, &release)? == 200;
                    if ok {
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

fn percentile(sorted: &[u32], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    f64::from(sorted[((sorted.len() as f64 * q) as usize).min(sorted.len() - 1)]) / 1000.0
}

/// The gateway to measure: `gateway` if given, else a fresh local 3-node cluster in
/// `dir` (returned, to be stopped) with its gateway on 127.0.0.1:48000.
pub(crate) fn scratch_cluster(
    gateway: Option<SocketAddr>,
    dir: &std::path::Path,
) -> Result<(Option<LocalCluster>, SocketAddr)> {
    if let Some(g) = gateway {
        return Ok((None, g));
    }
    let _ = std::fs::remove_dir_all(dir);
    let args = ClusterArgs {
        nodes: 3,
        dir: dir.to_path_buf(),
        quic_port: 47001,
        admin_port: 49001,
        gateway_port: 48000,
        wait_secs: 30,
        seed_ports: false,
        seed_ports_base: 8000,
        fault_injection: false,
    };
    let c = LocalCluster::start(args)?;
    let start = Instant::now();
    while c.agreed_leader().is_none()
        || crate::http::get(([127, 0, 0, 1], 48000).into(), "/health")
            .map_or(true, |(s, _)| s != 200)
    {
        if start.elapsed() > Duration::from_secs(30) {
            bail!("the scratch cluster did not come up");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok((Some(c), ([127, 0, 0, 1], 48000).into()))
}

pub(crate) fn percentile_ms(sorted: &[u32], q: f64) -> f64 {
    percentile(sorted, q)
}

pub(crate) fn run(b: &LockBench) -> Result<()> {
    if b.clients.is_empty() || b.clients.iter().any(|&c| c == 0 || c > 1024) {
        bail!("--clients takes counts between 1 and 1024");
    }
    if !(0.5..=600.0).contains(&b.seconds) || b.runs == 0 || b.runs > 20 {
        bail!("--seconds must be 0.5..600 and --runs 1..20");
    }
    let (cluster, gateway) = scratch_cluster(b.gateway, &b.dir)?;
    println!(
        "lock acquire X + release through the gateway at {gateway}; median of {} runs of {} s",
        b.runs, b.seconds
    );
    println!("workload            clients      ops/s    p50 ms    p99 ms   errors");
    let workloads: &[bool] = if b.hot_only { &[true] } else { &[false, true] };
    for &hot in workloads {
        for &clients in &b.clients {
            let mut runs = Vec::new();
            for _ in 0..b.runs {
                runs.push(one_run(
                    gateway,
                    clients,
                    hot,
                    Duration::from_secs_f64(b.seconds),
                )?);
            }
            runs.sort_by(|x, y| (x.ops as f64 / x.seconds).total_cmp(&(y.ops as f64 / y.seconds)));
            let median = &runs[runs.len() / 2];
            println!(
                "{:<18} {:>8} {:>10.0} {:>9.2} {:>9.2} {:>8}",
                if hot { "one hot key" } else { "distinct keys" },
                clients,
                median.ops as f64 / median.seconds,
                percentile(&median.latencies_us, 0.50),
                percentile(&median.latencies_us, 0.99),
                runs.iter().map(|r| r.errors).sum::<u64>()
            );
        }
    }
    if let Some(mut c) = cluster {
        c.stop_all();
        let _ = std::fs::remove_dir_all(&b.dir);
    }
    Ok(())
}
