//! `syncmesh certs`: make and extend the cluster's certificates.

use anyhow::{bail, Result};
use certs::{IssueOptions, PeerKind};
use clap::{Args, Subcommand};
use std::path::PathBuf;

/// Certificate commands.
#[derive(Subcommand, Debug)]
pub(crate) enum CertsCommand {
    /// Make a cluster CA, node certificates node1..nodeN and client certificates.
    Init {
        #[command(flatten)]
        common: Common,
        /// Number of node certificates (node1..nodeN).
        #[arg(long, default_value_t = 3)]
        nodes: u32,
        /// Client certificates to make.
        #[arg(long, value_delimiter = ',', default_value = "gateway,admin")]
        clients: Vec<String>,
    },
    /// Sign a certificate for a new node with the existing CA.
    AddNode {
        /// Node name, e.g. node4.
        name: String,
        #[command(flatten)]
        common: Common,
    },
    /// Sign a certificate for a new client with the existing CA.
    AddClient {
        /// Client name, e.g. ops.
        name: String,
        #[command(flatten)]
        common: Common,
    },
}

/// Options every certs command takes.
#[derive(Args, Debug)]
pub(crate) struct Common {
    /// Directory of the certificates.
    #[arg(long, env = "SYNCMESH_CERTS_DIR", default_value = ".syncmesh/certs")]
    dir: PathBuf,
    /// Days of validity.
    #[arg(long, default_value_t = 825)]
    days: u32,
    /// Extra SANs for node certificates (DNS names or IPs), comma-separated.
    #[arg(long, value_delimiter = ',')]
    san: Vec<String>,
    /// Replace existing files (replacing the CA invalidates every certificate).
    #[arg(long)]
    force: bool,
}

impl Common {
    fn options(&self) -> Result<IssueOptions> {
        if self.days == 0 || self.days > 36_500 {
            bail!("--days must be between 1 and 36500");
        }
        Ok(IssueOptions {
            extra_sans: self.san.clone(),
            force: self.force,
            ..IssueOptions::valid_for_days(self.days)
        })
    }
}

pub(crate) fn run(cmd: CertsCommand) -> Result<()> {
    match cmd {
        CertsCommand::Init {
            common,
            nodes,
            clients,
        } => {
            if nodes == 0 || nodes > 1000 {
                bail!("--nodes must be between 1 and 1000");
            }
            let opts = common.options()?;
            certs::init_ca(&common.dir, &opts)?;
            println!("made cluster CA {}", common.dir.join("ca.pem").display());
            for i in 1..=nodes {
                let path = certs::issue(&common.dir, PeerKind::Node, &format!("node{i}"), &opts)?;
                println!("made node certificate {}", path.display());
            }
            for name in &clients {
                let path = certs::issue(&common.dir, PeerKind::Client, name, &opts)?;
                println!("made client certificate {}", path.display());
            }
        }
        CertsCommand::AddNode { name, common } => {
            let path = certs::issue(&common.dir, PeerKind::Node, &name, &common.options()?)?;
            println!("made node certificate {}", path.display());
        }
        CertsCommand::AddClient { name, common } => {
            let path = certs::issue(&common.dir, PeerKind::Client, &name, &common.options()?)?;
            println!("made client certificate {}", path.display());
        }
    }
    Ok(())
}
