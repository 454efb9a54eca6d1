//! `syncmesh`: the one binary: certificates, nodes, the local cluster, benchmarks.

mod bench;
mod certs_cmd;

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
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Certs(cmd) => certs_cmd::run(cmd),
        Command::Bench(cmd) => bench::run(cmd),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
