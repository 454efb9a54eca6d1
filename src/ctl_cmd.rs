//! `syncmesh ctl`: talk to the cluster over mutually authenticated QUIC with a client
//! certificate (default `admin`).

use anyhow::{anyhow, bail, Context, Result};
use certs::TlsMaterial;
use clap::{Args, Subcommand};
use mesh_client::{CallOptions, Caller, Cluster, MeshClient};
use mesh_core::raft::NodeId;
use mesh_core::services::envelope::{Command, Query, QueryReply, Reply};
use mesh_core::services::register::{RegisterCommand, RegisterQuery, RegisterReply};
use mesh_core::wire::parse_node_name;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Options of `syncmesh ctl`.
#[derive(Args, Debug)]
pub(crate) struct CtlArgs {
    /// Certificates directory.
    #[arg(long, env = "SYNCMESH_CERTS_DIR", default_value = ".syncmesh/certs")]
    certs_dir: PathBuf,
    /// Client certificate to present.
    #[arg(long, default_value = "admin")]
    cert: String,
    /// Nodes to reach: NAME=HOST:PORT, comma-separated (default: the local cluster).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "node1=127.0.0.1:7001,node2=127.0.0.1:7002,node3=127.0.0.1:7003"
    )]
    nodes: Vec<String>,
    /// Seconds to keep trying (leader changes are retried).
    #[arg(long, default_value_t = 10)]
    timeout_secs: u64,
    #[command(subcommand)]
    command: CtlCommand,
}

/// What to do.
#[derive(Subcommand, Debug)]
pub(crate) enum CtlCommand {
    /// Replicate KEY=VALUE in the register service.
    Put {
        /// Key.
        key: String,
        /// Value.
        value: String,
    },
    /// Read KEY linearizably.
    Get {
        /// Key.
        key: String,
    },
    /// Key count and applied index, read linearizably.
    Stats,
}

/// Parse `NAME=HOST:PORT` node specs (`--nodes` of ctl and gateway).
pub(crate) fn parse_nodes(specs: &[String]) -> Result<BTreeMap<NodeId, SocketAddr>> {
    let mut nodes = BTreeMap::new();
    for spec in specs {
        let (name, addr) = spec
            .split_once('=')
            .ok_or_else(|| anyhow!("invalid --nodes entry {spec:?}: expected NAME=HOST:PORT"))?;
        let id = parse_node_name(name).ok_or_else(|| anyhow!("invalid node name {name:?}"))?;
        nodes.insert(
            id,
            addr.parse()
                .with_context(|| format!("invalid address {addr:?}"))?,
        );
    }
    if nodes.is_empty() {
        bail!("--nodes is empty");
    }
    Ok(nodes)
}

pub(crate) fn run(args: CtlArgs) -> Result<()> {
    let nodes = parse_nodes(&args.nodes)?;
    let tls = TlsMaterial::load(&args.certs_dir, &args.cert)?;
    let deadline = Duration::from_secs(args.timeout_secs);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        // ctl is a client of its own: one session, opened through the log, whose call is
        // retried with the same sequence number until it is answered.
        let caller = Caller::new(Cluster::remote(MeshClient::new(&tls, nodes)?), 1);
        match &args.command {
            CtlCommand::Put { key, value } => {
                let put = RegisterCommand::Put {
                    key: key.as_bytes().to_vec(),
                    value: value.as_bytes().to_vec(),
                };
                let opts = CallOptions {
                    deadline,
                    prompt: true,
                    withdraw_if_abandoned: false,
                };
                let outcome = caller.propose(Command::Register(put), opts).await?;
                match outcome.reply {
                    Reply::Register(RegisterReply::Written { .. }) => {
                        println!("ok index={}", outcome.index)
                    }
                    other => bail!("unexpected reply {other:?}"),
                }
            }
            CtlCommand::Get { key } => {
                let query = Query::Register(RegisterQuery::Get {
                    key: key.as_bytes().to_vec(),
                });
                match caller.read(&query, deadline).await? {
                    QueryReply::Register(RegisterReply::Value(Some(v))) => {
                        println!("{}", String::from_utf8_lossy(&v))
                    }
                    QueryReply::Register(RegisterReply::Value(None)) => bail!("not found"),
                    other => bail!("unexpected reply {other:?}"),
                }
            }
            CtlCommand::Stats => match caller
                .read(&Query::Register(RegisterQuery::Stats), deadline)
                .await?
            {
                QueryReply::Register(RegisterReply::Stats { keys, applied }) => {
                    println!("keys={keys} applied={applied}")
                }
                other => bail!("unexpected reply {other:?}"),
            },
        }
        Ok(())
    })
}
