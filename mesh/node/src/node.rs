//! One node, assembled: storage recovery, core, service, transport, admin HTTP, driver.

use crate::admin::{self, Health};
use crate::driver::{Driver, DriverError, DriverParts};
use crate::faults::AnswerFaults;
use crate::metrics::NodeMetrics;
use crate::storage::{FileLog, WalOptions};
use crate::transport::{ClientCall, Transport, TransportConfig, TransportError};
use certs::TlsMaterial;
use mesh_core::node::{Node, NodeConfig as CoreConfig, Time};
use mesh_core::raft::{Membership, NodeId};
use mesh_core::wire::{node_name, MAX_FRAME_BYTES};
use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
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
    /// A snapshot also waits until the log since the last one is this percentage of
    /// its size (0: count entries only).
    pub snapshot_log_growth_pct: u64,
    /// Serve the fault endpoints tests use (see [`crate::faults`]); never in production.
    pub fault_injection: bool,
    /// This node's cache.
    pub cache: mesh_core::services::cache::CacheConfig,
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
    #[error("stored state: {0}")]
    Init(#[from] mesh_core::node::NodeInitError),
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

/// Calls queued for the driver at most.
const CALL_INBOX: usize = 8192;

/// The inbox of a node's calls: give the sender to in-process callers (an HTTP API in
/// the same process), the receiver to [`run`].
pub fn call_inbox() -> (mpsc::Sender<ClientCall>, mpsc::Receiver<ClientCall>) {
    mpsc::channel(CALL_INBOX)
}

/// Run a node until `shutdown` resolves (a leader hands over first). `calls` is its call
/// inbox (see [`call_inbox`]); the transport feeds it too.
pub async fn run(
    cfg: NodeConfig,
    calls: (mpsc::Sender<ClientCall>, mpsc::Receiver<ClientCall>),
    shutdown: impl Future<Output = ()>,
) -> Result<(), NodeError> {
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
    let founders = Membership::with_voters(cfg.peers.keys().copied().chain([cfg.id]));
    let mut core_cfg = CoreConfig::new(cfg.id);
    core_cfg.raft.seed = u64::from(std::process::id()) ^ cfg.id.rotate_left(32);
    core_cfg.tick_ms = cfg.tick.as_millis().max(1) as u64;
    core_cfg.snapshot_every = cfg.snapshot_every;
    core_cfg.snapshot_log_growth_pct = cfg.snapshot_log_growth_pct;
    core_cfg.cache = cfg.cache.clone();
    // Tells this process's cache registration from an earlier one's, and orders them:
    // the directory takes a registration only above the nonce on record (one process
    // per data dir, started later, reads a later clock; if the clock went back, the
    // directory says so and the agent registers above the old nonce).
    core_cfg.cache_nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64);
    let clock_start = std::time::Instant::now();
    let start = Time {
        mono_ms: 0,
        wall_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
    };
    let core = Node::new(core_cfg, recovered.into_initial_state(founders), start)?;

    let faults = cfg.fault_injection.then(|| {
        tracing::warn!(node = %name, "fault injection is on: /fault/* can make this node lose answers");
        Arc::new(AnswerFaults::default())
    });
    let (raft_tx, raft_rx) = mpsc::channel(8192);
    let (client_tx, client_rx) = calls;
    let transport_cfg = TransportConfig {
        id: cfg.id,
        listen: cfg.listen,
        peers: cfg.peers.clone(),
        max_frame_bytes: MAX_FRAME_BYTES,
        faults: faults.clone(),
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
        faults,
        async move {
            let _ = admin_stopped.await;
        },
    ));
    tracing::info!(node = %name, quic = %cfg.listen, admin = %cfg.admin, "node started");
    let driver = Driver::new(
        DriverParts {
            node: core,
            log,
            transport,
            metrics,
            health: health_tx,
        },
        clock_start,
    );
    let result = driver.run(raft_rx, client_rx, shutdown).await;
    let _ = stop_admin.send(());
    let _ = admin_task.await;
    result.map_err(NodeError::from)
}
