//! `syncmesh bench queue-state`: what a big queue costs a node, measured in-process on
//! the replicated state itself (no cluster): memory per message, the snapshot view the
//! node core hands its shell (taken on the node's loop), the first write after it, and
//! encoding and restoring the snapshot (done off the loop).

use anyhow::{bail, Result};
use mesh_core::services::envelope::{Command, Envelope, Services};
use mesh_core::services::queue::{Field, NewMessage, QueueCommand, DEFAULT_QUEUE, MAX_BATCH};
use mesh_core::services::StateMachine;
use std::time::Instant;

/// Options of `bench queue-state`.
#[derive(clap::Args, Debug)]
pub(crate) struct QueueStateArgs {
    /// Messages to store.
    #[arg(long, default_value_t = 1_000_000)]
    messages: u64,
    /// Bytes per value.
    #[arg(long, default_value_t = 128)]
    value_size: usize,
}

/// Resident memory of this process, in bytes (Linux).
fn rss_bytes() -> u64 {
    let pages = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .nth(1)
                .and_then(|p| p.parse::<u64>().ok())
        })
        .unwrap_or(0);
    pages * 4096
}

fn enqueue(index: u64, first: u64, n: u64, value: &[u8]) -> Envelope {
    let messages = (first..first + n)
        .map(|i| NewMessage {
            key: format!("user:{}", i % 10_000),
            value: value.to_vec(),
            field: Field::Value,
            dedup_id: None,
        })
        .collect();
    let _ = index;
    Envelope::new(
        0,
        0,
        0,
        Command::Queue(QueueCommand::Enqueue {
            queue: DEFAULT_QUEUE.to_string(),
            messages,
        }),
    )
}

pub(crate) fn run(args: &QueueStateArgs) -> Result<()> {
    if args.messages == 0 || args.messages > 50_000_000 {
        bail!("--messages must be 1..=50000000");
    }
    if args.value_size < 2 || args.value_size > 64 * 1024 {
        bail!("--value-size must be 2..=65536");
    }
    // A JSON string of the given size.
    let value = format!("\"{}\"", "x".repeat(args.value_size - 2)).into_bytes();
    let mut s = Services::default();
    let rss0 = rss_bytes();
    let started = Instant::now();
    let mut index = 0;
    let mut stored = 0;
    while stored < args.messages {
        let n = (args.messages - stored).min(MAX_BATCH as u64);
        index += 1;
        s.apply(index, enqueue(index, stored, n, &value));
        stored += n;
    }
    let fill = started.elapsed();
    let rss1 = rss_bytes();
    let (visible, _, _) = s.queues().counts();
    if visible != args.messages {
        bail!("stored {visible} of {} messages", args.messages);
    }
    let per_message = (rss1.saturating_sub(rss0)) as f64 / args.messages as f64;
    println!(
        "queue state: {} messages of {} bytes stored in {:.2?} ({:.0} messages/s applied)",
        args.messages,
        args.value_size,
        fill,
        args.messages as f64 / fill.as_secs_f64()
    );
    println!(
        "  memory: {:.0} MiB resident for the queue, {per_message:.0} bytes per message ({} of them key and value)",
        (rss1.saturating_sub(rss0)) as f64 / (1 << 20) as f64,
        args.value_size + "user:1234".len()
    );
    let t = Instant::now();
    let view = s.clone();
    println!(
        "  snapshot view on the node's loop (copy-on-write partitions): {:.2?}",
        t.elapsed()
    );
    let t = Instant::now();
    index += 1;
    s.apply(index, enqueue(index, stored, 1, &value));
    println!(
        "  first enqueue after the view (copies the chunks it writes: 1,024 messages, one key shard): {:.2?}",
        t.elapsed()
    );
    let t = Instant::now();
    index += 1;
    s.apply(index, enqueue(index, stored + 1, 1, &value));
    println!("  next enqueue to the same partition: {:.2?}", t.elapsed());
    let t = Instant::now();
    let bytes = view.snapshot();
    let encode = t.elapsed();
    println!(
        "  snapshot encode (off the loop): {encode:.2?}, {:.1} MiB, {:.0} bytes per message",
        bytes.len() as f64 / (1 << 20) as f64,
        bytes.len() as f64 / args.messages as f64
    );
    let t = Instant::now();
    let mut restored = Services::default();
    restored.restore(&bytes)?;
    println!("  snapshot restore: {:.2?}", t.elapsed());
    if restored != view {
        bail!("the restored state differs from the snapshot view");
    }
    Ok(())
}

/// Options of `bench enq` and `bench deq-ack`.
#[derive(clap::Args, Debug)]
pub(crate) struct QueueBenchArgs {
    /// A running gateway to measure; without it a fresh local cluster is started.
    #[arg(long)]
    gateway: Option<std::net::SocketAddr>,
    /// Client counts to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    clients: Vec<usize>,
    /// Messages per request (enqueue batch, or dequeue `max` and ack `msg_ids`).
    #[arg(long, value_delimiter = ',', default_value = "1,100")]
    batch: Vec<usize>,
    /// Seconds per run.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Runs per configuration (the median is reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Bytes per value.
    #[arg(long, default_value_t = 128)]
    value_size: usize,
    /// Directory for the scratch cluster (deleted before and after).
    #[arg(long, default_value = ".syncmesh/bench-queue")]
    dir: std::path::PathBuf,
}

/// Which queue workload.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum QueueWorkload {
    /// Enqueue, acknowledged after a quorum fsync.
    Enq,
    /// Dequeue then ack what was delivered (both committed).
    DeqAck,
}

struct Run {
    messages: u64,
    errors: u64,
    latencies_us: Vec<u32>,
    seconds: f64,
}

fn enq_body(client: usize, n: usize, seq: &mut u64, value: &str) -> String {
    let items: Vec<String> = (0..n)
        .map(|_| {
            *seq += 1;
            format!(
                r#"{{"key":"bench-{client}-{}","value":"{value}"}}"#,
                *seq % 64
            )
        })
        .collect();
    if n == 1 {
        items.concat()
    } else {
        format!("[{}]", items.join(","))
    }
}

fn one_queue_run(
    gateway: std::net::SocketAddr,
    workload: QueueWorkload,
    clients: usize,
    batch: usize,
    value: &str,
    duration: std::time::Duration,
) -> Result<Run> {
    let start = Instant::now();
    let deadline = start + duration;
    let workers: Vec<_> = (0..clients)
        .map(|c| {
            let value = value.to_string();
            std::thread::spawn(move || -> Result<(u64, u64, Vec<u32>)> {
                let agent = crate::http::agent(std::time::Duration::from_secs(60));
                let enq = format!("http://{gateway}/queue/enq");
                let deq = format!("http://{gateway}/queue/deq");
                let ack = format!("http://{gateway}/queue/ack");
                let deq_body = format!(r#"{{"max":{batch}}}"#);
                let (mut messages, mut errors, mut lat, mut seq) = (0, 0, Vec::new(), 0);
                while Instant::now() < deadline {
                    let t = Instant::now();
                    let done = match workload {
                        QueueWorkload::Enq => {
                            let body = enq_body(c, batch, &mut seq, &value);
                            (crate::http::post(&agent, &enq, &body)? == 200).then_some(batch)
                        }
                        QueueWorkload::DeqAck => {
                            let (status, bytes) = crate::http::post_body(&agent, &deq, &deq_body)?;
                            let v: serde_json::Value =
                                serde_json::from_slice(&bytes).unwrap_or_default();
                            let ids: Vec<String> = v["messages"]
                                .as_array()
                                .into_iter()
                                .flatten()
                                .map(|m| m["msg_id"].to_string())
                                .collect();
                            if status != 200 || ids.is_empty() {
                                None
                            } else {
                                let body = format!(r#"{{"msg_ids":[{}]}}"#, ids.join(","));
                                (crate::http::post(&agent, &ack, &body)? == 200)
                                    .then_some(ids.len())
                            }
                        }
                    };
                    match done {
                        Some(n) => {
                            messages += n as u64;
                            lat.push(t.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
                        }
                        None => errors += 1,
                    }
                }
                Ok((messages, errors, lat))
            })
        })
        .collect();
    let mut run = Run {
        messages: 0,
        errors: 0,
        latencies_us: Vec::new(),
        seconds: 0.0,
    };
    for w in workers {
        let (m, e, l) = w
            .join()
            .map_err(|_| anyhow::anyhow!("client thread panicked"))??;
        run.messages += m;
        run.errors += e;
        run.latencies_us.extend(l);
    }
    run.seconds = start.elapsed().as_secs_f64();
    run.latencies_us.sort_unstable();
    Ok(run)
}

/// Fill the queue with `n` messages (batches of 1000) for a dequeue run.
fn fill(gateway: std::net::SocketAddr, n: usize, value: &str) -> Result<()> {
    let agent = crate::http::agent(std::time::Duration::from_secs(60));
    let url = format!("http://{gateway}/queue/enq");
    let mut seq = 0;
    let mut left = n;
    while left > 0 {
        let k = left.min(1000);
        let status = crate::http::post(&agent, &url, &enq_body(0, k.max(2), &mut seq, value))?;
        if status != 200 {
            bail!("filling the queue: enqueue answered {status}");
        }
        left = left.saturating_sub(k.max(2));
    }
    Ok(())
}

pub(crate) fn run_workload(workload: QueueWorkload, b: &QueueBenchArgs) -> Result<()> {
    if b.clients.is_empty() || b.clients.iter().any(|&c| c == 0 || c > 1024) {
        bail!("--clients takes counts between 1 and 1024");
    }
    if b.batch.is_empty() || b.batch.iter().any(|&n| n == 0 || n > MAX_BATCH) {
        bail!("--batch takes sizes between 1 and {MAX_BATCH}");
    }
    if !(0.5..=600.0).contains(&b.seconds) || b.runs == 0 || b.runs > 20 {
        bail!("--seconds must be 0.5..600 and --runs 1..20");
    }
    if !(1..=64 * 1024).contains(&b.value_size) {
        bail!("--value-size must be 1..=65536");
    }
    let (cluster, gateway) = crate::bench_lock::scratch_cluster(b.gateway, &b.dir)?;
    let value = "x".repeat(b.value_size);
    let name = match workload {
        QueueWorkload::Enq => "enqueue (ok after a quorum fsync)",
        QueueWorkload::DeqAck => "dequeue + ack (both committed)",
    };
    println!(
        "queue {name} through the gateway at {gateway}; {} B values; median of {} runs of {} s",
        b.value_size, b.runs, b.seconds
    );
    println!("batch   clients   messages/s   requests/s    p50 ms    p99 ms   errors");
    for &batch in &b.batch {
        for &clients in &b.clients {
            let mut runs = Vec::new();
            for _ in 0..b.runs {
                if workload == QueueWorkload::DeqAck {
                    // Enough for the run at a generous rate, so it never runs dry.
                    let want = (b.seconds * 40_000.0) as usize;
                    fill(gateway, want.clamp(1_000, 400_000), &value)?;
                }
                runs.push(one_queue_run(
                    gateway,
                    workload,
                    clients,
                    batch,
                    &value,
                    std::time::Duration::from_secs_f64(b.seconds),
                )?);
            }
            runs.sort_by(|x, y| {
                (x.messages as f64 / x.seconds).total_cmp(&(y.messages as f64 / y.seconds))
            });
            let m = &runs[runs.len() / 2];
            println!(
                "{:>5} {:>9} {:>12.0} {:>12.0} {:>9.2} {:>9.2} {:>8}",
                batch,
                clients,
                m.messages as f64 / m.seconds,
                m.latencies_us.len() as f64 / m.seconds,
                crate::bench_lock::percentile_ms(&m.latencies_us, 0.50),
                crate::bench_lock::percentile_ms(&m.latencies_us, 0.99),
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
