//! `syncmesh ctl`: talk to the cluster over mutually authenticated QUIC with a client
//! certificate (default `admin`).

use anyhow::{anyhow, bail, Context, Result};
use certs::TlsMaterial;
use clap::{Args, Subcommand};
use mesh_core::raft::NodeId;
use mesh_core::services::envelope::{Command, Envelope, Query, QueryReply, Reply};
use mesh_core::services::register::{RegisterCommand, RegisterQuery, RegisterReply};
use mesh_core::wire::{parse_node_name, ClientRequest, ClientResponse};
use mesh_node::transport::MeshClient;
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
    let request = match &args.command {
        CtlCommand::Put { key, value } => {
            let put = RegisterCommand::Put {
                key: key.as_bytes().to_vec(),
                value: value.as_bytes().to_vec(),
            };
            let envelope = Envelope {
                session: 0,
                seq: 0,
                now_ms: 0,
                command: Command::Register(put),
            };
            ClientRequest::Propose(postcard::to_stdvec(&envelope)?)
        }
        CtlCommand::Get { key } => {
            let query = Query::Register(RegisterQuery::Get {
                key: key.as_bytes().to_vec(),
            });
            ClientRequest::Read(postcard::to_stdvec(&query)?)
        }
        CtlCommand::Stats => {
            ClientRequest::Read(postcard::to_stdvec(&Query::Register(RegisterQuery::Stats))?)
        }
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let response = runtime.block_on(async {
        let client = MeshClient::new(&tls, nodes)?;
        client
            .call(&request, Duration::from_secs(args.timeout_secs))
            .await
    })?;
    let (index, reply) = match response {
        ClientResponse::Applied { index, result } => match postcard::from_bytes::<Reply>(&result) {
            Ok(Reply::Register(r)) => (Some(index), r),
            other => bail!("unexpected reply {other:?}"),
        },
        ClientResponse::Read(bytes) => match postcard::from_bytes::<QueryReply>(&bytes) {
            Ok(QueryReply::Register(r)) => (None, r),
            other => bail!("unexpected reply {other:?}"),
        },
        ClientResponse::Error { message, .. } => bail!("{message}"),
        ClientResponse::NotLeader { .. } => bail!("no leader answered"),
        ClientResponse::Status(_) => bail!("unexpected status reply"),
    };
    match (reply, index) {
        (RegisterReply::Written { .. }, Some(index)) => println!("ok index={index}"),
        (RegisterReply::Value(Some(v)), _) => println!("{}", String::from_utf8_lossy(&v)),
        (RegisterReply::Value(None), _) => bail!("not found"),
        (RegisterReply::Stats { keys, applied }, _) => println!("keys={keys} applied={applied}"),
        (other, _) => bail!("unexpected reply {other:?}"),
    }
    Ok(())
}
