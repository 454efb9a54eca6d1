//! One node, assembled: storage recovery, core, service, transport, admin HTTP, driver.

use crate::admin::{self, Health};
use crate::driver::{Driver, DriverError, DriverParts};
use crate::metrics::NodeMetrics;
use crate::storage::{FileLog, WalOptions};
use crate::transport::{Transport, TransportConfig, TransportError};
use certs::TlsMaterial;
use mesh_core::raft::{Config, Membership, NodeId, Raft};
use mesh_core::services::envelope::Services;
use mesh_core::services::StateMachine;
use mesh_core::wire::{node_name, MAX_FRAME_BYTES};
use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// Everything a node needs to start.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// This node.
    pub id: NodeId,
    /// QUIC (UDP) address.
    pub listen: SocketAddr,
    /// Admin HTTP address (`/health`, `/metrics`).
    pub admin: SocketAddr,
    /// The other founding nodes and their QUIC addresses.
    pub peers: BTreeMap<NodeId, SocketAddr>,
    /// Where the log and snapshots live.
    pub data_dir: PathBuf,
    /// Where `ca.pem` and `node<id>.pem/.key` are.
    pub certs_dir: PathBuf,
    /// Tick interval (election timeout is 15-30 ticks).
    pub tick: Duration,
    /// Applied entries between snapshots.
    pub snapshot_every: u64,
}

/// Why a node could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// Certificates.
    #[error("certificates: {0}")]
    Cert(#[from] certs::CertError),
    /// Storage could not be opened.
    #[error("storage: {0}")]
    Storage(#[from] crate::storage::StorageError),
    /// The stored state or config is unusable.
    #[error("raft: {0}")]
    Init(#[from] mesh_core::raft::InitError),
    /// The stored snapshot does not decode.
    #[error("snapshot: {0}")]
    Snapshot(String),
    /// Transport.
    #[error("transport: {0}")]
    Transport(#[from] TransportError),
    /// Metrics registry.
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// Admin HTTP.
    #[error("admin http on {addr}: {source}")]
    Admin {
        /// Address.
        addr: SocketAddr,
        /// Error.
        #[source]
        source: std::io::Error,
    },
    /// The driver failed.
    #[error(transparent)]
    Driver(#[from] DriverError),
}

/// Run a node until `shutdown` resolves (a leader hands over first).
pub async fn run(cfg: NodeConfig, shutdown: impl Future<Output = ()>) -> Result<(), NodeError> {
    let name = node_name(cfg.id);
    let metrics = NodeMetrics::new(&name)?;
    let tls = TlsMaterial::load(&cfg.certs_dir, &name)?;
    let (log, recovered) = FileLog::open(&cfg.data_dir.join("raft"), WalOptions::default())?;
    tracing::info!(
        node = %name,
        term = recovered.hard_state.term,
        entries = recovered.entries.len(),
        snapshot = recovered.snapshot.as_ref().map_or(0, |s| s.meta.index),
        "recovered storage"
    );
    let mut sm = Services::default();
    if let Some(s) = &recovered.snapshot {
        sm.restore(&s.data)
            .map_err(|e| NodeError::Snapshot(e.to_string()))?;
    }
    let founders = Membership::with_voters(cfg.peers.keys().copied().chain([cfg.id]));
    let mut raft_cfg = Config::new(cfg.id);
    raft_cfg.seed = u64::from(std::process::id()) ^ cfg.id.rotate_left(32);
    let raft = Raft::new(raft_cfg, recovered.into_initial_state(founders))?;

    let (raft_tx, raft_rx) = mpsc::channel(8192);
    let (client_tx, client_rx) = mpsc::channel(8192);
    let transport_cfg = TransportConfig {
        id: cfg.id,
        listen: cfg.listen,
        peers: cfg.peers.clone(),
        max_frame_bytes: MAX_FRAME_BYTES,
    };
    let transport = Transport::start(&transport_cfg, &tls, raft_tx, client_tx, metrics.clone())?;
    let (health_tx, health_rx) = watch::channel(Health::default());
    let admin_listener = tokio::net::TcpListener::bind(cfg.admin)
        .await
        .map_err(|source| NodeError::Admin {
            addr: cfg.admin,
            source,
        })?;
    let (stop_admin, admin_stopped) = tokio::sync::oneshot::channel::<()>();
    let admin_task = tokio::spawn(admin::serve(
        admin_listener,
        health_rx,
        metrics.clone(),
        async move {
            let _ = admin_stopped.await;
        },
    ));
    tracing::info!(node = %name, quic = %cfg.listen, admin = %cfg.admin, "node started");
    let driver = Driver::new(DriverParts {
        raft,
        log,
        sm,
        transport,
        metrics,
        health: health_tx,
        tick: cfg.tick,
        snapshot_every: cfg.snapshot_every,
    });
    let result = driver.run(raft_rx, client_rx, shutdown).await;
    let _ = stop_admin.send(());
    let _ = admin_task.await;
    result.map_err(NodeError::from)
}
