//! `syncmesh cluster`: a local cluster for development, as DESIGN.md section 2 lays out.
//! Makes certificates if missing, starts `node1..nodeN` as child processes, waits until
//! they agree on a leader, prints the addresses, and stops every child on Ctrl-C or
//! SIGTERM. It restarts nothing by itself.

use crate::http_get;
use crate::node_cmd::NodeArgs;
use anyhow::{bail, Context, Result};
use clap::Args;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Options of `syncmesh cluster`.
#[derive(Args, Debug)]
pub(crate) struct ClusterArgs {
    /// Number of nodes.
    #[arg(long, default_value_t = 3)]
    nodes: u16,
    /// Directory for certificates and node data.
    #[arg(long, default_value = ".syncmesh")]
    dir: PathBuf,
    /// QUIC port of node1 (node i gets base + i - 1).
    #[arg(long, default_value_t = 7001)]
    quic_port: u16,
    /// Admin HTTP port of node1 (node i gets base + i - 1).
    #[arg(long, default_value_t = 9001)]
    admin_port: u16,
    /// Seconds to wait for a leader before giving up.
    #[arg(long, default_value_t = 30)]
    wait_secs: u64,
}

struct Member {
    name: String,
    admin: SocketAddr,
    child: Child,
}

fn addr(port: u16) -> SocketAddr {
    ([127, 0, 0, 1], port).into()
}

fn start_members(args: &ClusterArgs) -> Result<Vec<Member>> {
    let exe = std::env::current_exe().context("locate the syncmesh binary")?;
    let n = args.nodes;
    let names: Vec<String> = (1..=n).map(|i| format!("node{i}")).collect();
    let mut members = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let i = i as u16;
        let peers = names
            .iter()
            .enumerate()
            .filter(|(j, _)| *j as u16 != i)
            .map(|(j, p)| format!("{p}={}", addr(args.quic_port + j as u16)))
            .collect();
        let admin = addr(args.admin_port + i);
        let flags = NodeArgs::local(name, addr(args.quic_port + i), admin, peers, &args.dir);
        std::fs::create_dir_all(args.dir.join(name))?;
        let log_path = args.dir.join(name).join("node.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("open {}", log_path.display()))?;
        let child = Command::new(&exe)
            .args(&flags)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("start {name}"))?;
        members.push(Member {
            name: name.clone(),
            admin,
            child,
        });
    }
    Ok(members)
}

/// The leader every member reports, once they all agree.
fn agreed_leader(members: &[Member]) -> Option<String> {
    let mut leader = None;
    for m in members {
        let (status, body) = http_get::get(m.admin, "/health").ok()?;
        if status != 200 {
            return None;
        }
        let l = body
            .split("\"leader\":\"")
            .nth(1)?
            .split('"')
            .next()?
            .to_string();
        if leader.get_or_insert_with(|| l.clone()) != &l {
            return None;
        }
    }
    leader
}

fn stop_all(members: &mut [Member]) {
    for m in members.iter() {
        // SIGTERM lets a leader hand over and every node flush; SIGKILL follows if not.
        if let Ok(pid) = i32::try_from(m.child.id()) {
            // SAFETY: kill(2) with a pid we spawned and a valid signal number.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    for m in members.iter_mut() {
        while Instant::now() < deadline {
            if matches!(m.child.try_wait(), Ok(Some(_))) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = m.child.kill();
        let _ = m.child.wait();
    }
}

fn print_addresses(args: &ClusterArgs, members: &[Member], leader: &str) {
    println!(
        "syncmesh cluster is up: {} nodes, leader {leader}",
        members.len()
    );
    for (i, m) in members.iter().enumerate() {
        println!(
            "  {:<7} quic {}  admin http://{}/health  log {}",
            m.name,
            addr(args.quic_port + i as u16),
            m.admin,
            args.dir.join(&m.name).join("node.log").display()
        );
    }
    println!("  certificates in {}", args.dir.join("certs").display());
    println!("Ctrl-C stops every node.");
}

pub(crate) fn run(args: ClusterArgs) -> Result<()> {
    if args.nodes == 0 || args.nodes > 99 {
        bail!("--nodes must be between 1 and 99");
    }
    let names: Vec<String> = (1..=args.nodes).map(|i| format!("node{i}")).collect();
    let made = certs::ensure_cluster(
        &args.dir.join("certs"),
        &names,
        &["gateway".into(), "admin".into()],
        825,
    )?;
    if !made.is_empty() {
        println!(
            "made {} certificate files in {}",
            made.len(),
            args.dir.join("certs").display()
        );
    }
    let mut members = start_members(&args)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let result = runtime.block_on(supervise(&args, &mut members));
    stop_all(&mut members);
    println!("every node stopped");
    result
}

async fn supervise(args: &ClusterArgs, members: &mut [Member]) -> Result<()> {
    let signal = crate::node_cmd::shutdown_signal();
    tokio::pin!(signal);
    let deadline = Instant::now() + Duration::from_secs(args.wait_secs);
    let leader = loop {
        if let Some(l) = agreed_leader(members) {
            break l;
        }
        check_children(members, &args.dir)?;
        if Instant::now() > deadline {
            bail!(
                "no leader after {} s; see the node logs under {}",
                args.wait_secs,
                args.dir.display()
            );
        }
        tokio::select! {
            () = &mut signal => return Ok(()),
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    };
    print_addresses(args, members, &leader);
    loop {
        tokio::select! {
            () = &mut signal => return Ok(()),
            () = tokio::time::sleep(Duration::from_millis(500)) => check_children(members, &args.dir)?,
        }
    }
}

fn check_children(members: &mut [Member], dir: &Path) -> Result<()> {
    for m in members.iter_mut() {
        if let Ok(Some(status)) = m.child.try_wait() {
            bail!(
                "{} exited ({status}); see {}",
                m.name,
                dir.join(&m.name).join("node.log").display()
            );
        }
    }
    Ok(())
}
