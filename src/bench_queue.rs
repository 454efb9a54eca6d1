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
        "  first enqueue after the view (copies the one partition it writes, 1/16 of the queue): {:.2?}",
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
