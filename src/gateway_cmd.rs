//! `syncmesh gateway`: the HTTP/JSON gateway in front of the cluster.

use anyhow::{anyhow, Result};
use clap::Args;
use mesh_core::wire::parse_node_name;
use std::net::SocketAddr;
use std::path::PathBuf;

/// Options of `syncmesh gateway`.
#[derive(Args, Debug)]
pub(crate) struct GatewayArgs {
    /// HTTP address to serve on.
    #[arg(
        long,
        env = "SYNCMESH_GATEWAY_LISTEN",
        default_value = "127.0.0.1:8000"
    )]
    listen: SocketAddr,
    /// Certificates directory.
    #[arg(long, env = "SYNCMESH_CERTS_DIR", default_value = ".syncmesh/certs")]
    certs_dir: PathBuf,
    /// Client certificate to present to the nodes.
    #[arg(long, default_value = "gateway")]
    cert: String,
    /// The nodes: NAME=HOST:PORT, comma-separated.
    #[arg(
        long,
        env = "SYNCMESH_NODES",
        value_delimiter = ',',
        default_value = "node1=127.0.0.1:7001,node2=127.0.0.1:7002,node3=127.0.0.1:7003"
    )]
    nodes: Vec<String>,
    /// The node whose view /health reports (default: the first).
    #[arg(long)]
    home: Option<String>,
    /// Request body limit in bytes.
    #[arg(long, default_value_t = gateway::DEFAULT_MAX_BODY)]
    max_body: usize,
}

pub(crate) fn run(args: GatewayArgs) -> Result<()> {
    let nodes = crate::ctl_cmd::parse_nodes(&args.nodes)?;
    let home = match &args.home {
        Some(name) => parse_node_name(name).ok_or_else(|| anyhow!("invalid --home {name:?}"))?,
        None => *nodes
            .keys()
            .next()
            .ok_or_else(|| anyhow!("--nodes is empty"))?,
    };
    if !nodes.contains_key(&home) {
        return Err(anyhow!("--home is not one of --nodes"));
    }
    let cfg = gateway::GatewayConfig {
        listen: args.listen,
        certs_dir: args.certs_dir,
        cert: args.cert,
        nodes,
        home,
        max_body: args.max_body.clamp(1024, 64 << 20),
        // A gateway on its own owns no process: no fault routes.
        faults: None,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(gateway::serve(cfg, crate::node_cmd::shutdown_signal()))?;
    Ok(())
}
