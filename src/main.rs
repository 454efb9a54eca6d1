//! `syncmesh`: the one binary: certificates, nodes, the local cluster, benchmarks.

mod bench;
mod bench_cache;
mod bench_lock;
mod bench_queue;
mod certs_cmd;
mod cluster_cmd;
mod ctl_cmd;
mod gateway_cmd;
mod http;
mod node_cmd;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// syncmesh: distributed locks, a durable queue and a MESI-coherent cache on one Raft cluster.
#[derive(Parser, Debug)]
#[command(version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run one node.
    Node(node_cmd::NodeArgs),
    /// Run the HTTP/JSON gateway.
    Gateway(gateway_cmd::GatewayArgs),
    /// Run a local cluster (certificates, nodes, gateway) until Ctrl-C.
    Cluster(cluster_cmd::ClusterArgs),
    /// Call the cluster: put, get, stats.
    Ctl(ctl_cmd::CtlArgs),
    /// Make and extend the cluster's certificates.
    #[command(subcommand)]
    Certs(certs_cmd::CertsCommand),
    /// Measure syncmesh on this machine.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Node(args) => node_cmd::run(args),
        Command::Gateway(args) => gateway_cmd::run(args),
        Command::Cluster(args) => cluster_cmd::run(args),
        Command::Ctl(args) => ctl_cmd::run(args),
        Command::Certs(cmd) => certs_cmd::run(cmd),
        Command::Bench(cmd) => bench::run(cmd),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", describe(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, skipping causes already quoted by the message
/// before them (many of our errors include their source in their own text).
fn describe(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if parts.last().is_some_and(|p| p.contains(&text)) {
            continue;
        }
        parts.push(text);
    }
    parts.join(": ")
}
