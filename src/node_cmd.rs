//! `syncmesh node`: run one node. Settings come from flags, then `SYNCMESH_*`
//! environment variables, then a TOML file (`--config`), then defaults.

use anyhow::{anyhow, bail, Context, Result};
use certs::TlsMaterial;
use clap::Args;
use mesh_client::{Cluster, LocalNode, MeshClient};
use mesh_core::raft::NodeId;
use mesh_core::wire::{node_name, parse_node_name};
use mesh_node::node::NodeConfig;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Options of `syncmesh node`.
#[derive(Args, Debug, Default)]
pub(crate) struct NodeArgs {
    /// This node's id: node1, node2, ...
    #[arg(long, env = "SYNCMESH_NODE_ID")]
    id: Option<String>,
    /// QUIC (UDP) address to listen on.
    #[arg(long, env = "SYNCMESH_LISTEN")]
    listen: Option<SocketAddr>,
    /// Admin HTTP address (/health, /metrics).
    #[arg(long, env = "SYNCMESH_ADMIN")]
    admin: Option<SocketAddr>,
    /// Another founding node: NAME=HOST:PORT (repeat, or comma-separate).
    #[arg(long = "peer", env = "SYNCMESH_PEERS", value_delimiter = ',')]
    peers: Vec<String>,
    /// Data directory (default .syncmesh/<id>).
    #[arg(long, env = "SYNCMESH_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Certificates directory.
    #[arg(long, env = "SYNCMESH_CERTS_DIR")]
    certs_dir: Option<PathBuf>,
    /// Tick interval in milliseconds (elections after 15-30 ticks of silence).
    #[arg(long, env = "SYNCMESH_TICK_MS")]
    tick_ms: Option<u64>,
    /// Applied entries between snapshots.
    #[arg(long, env = "SYNCMESH_SNAPSHOT_EVERY")]
    snapshot_every: Option<u64>,
    /// A snapshot also waits until the log written since the last one is this many
    /// percent of the last snapshot's size, so a big state is not encoded again every
    /// few thousand entries (0: count entries only; at most 1000) [default: 100].
    #[arg(long, env = "SYNCMESH_SNAPSHOT_LOG_GROWTH_PCT")]
    snapshot_log_growth_pct: Option<u64>,
    /// Cache lines this node holds at most (least recently used go first) [default: 100000].
    #[arg(long, env = "SYNCMESH_CACHE_MAX_ENTRIES")]
    cache_max_entries: Option<usize>,
    /// Cache key and value bytes this node holds at most [default: 268435456].
    #[arg(long, env = "SYNCMESH_CACHE_MAX_BYTES")]
    cache_max_bytes: Option<u64>,
    /// A write-back cache put is acknowledged only while this node's oldest write not yet
    /// written back is younger than this: what a crash or a partition can lose
    /// [default: 100].
    #[arg(long, env = "SYNCMESH_CACHE_WRITEBACK_MS")]
    cache_writeback_ms: Option<u64>,
    /// Cache puts are durable (acknowledged once committed) unless they say
    /// `"durable": false`.
    #[arg(long, env = "SYNCMESH_CACHE_DURABLE")]
    cache_durable: Option<bool>,
    /// Serve the whole HTTP API (DESIGN section 4) in this process on ADDR, calling this
    /// node in-process (repeat for several addresses).
    #[arg(long = "http", env = "SYNCMESH_HTTP", value_delimiter = ',')]
    http: Vec<SocketAddr>,
    /// TOML file with any of the settings above (flags win).
    #[arg(long, env = "SYNCMESH_CONFIG")]
    config: Option<PathBuf>,
}

/// The TOML form of the settings.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct NodeFile {
    id: Option<String>,
    listen: Option<SocketAddr>,
    admin: Option<SocketAddr>,
    #[serde(default)]
    peers: BTreeMap<String, SocketAddr>,
    data_dir: Option<PathBuf>,
    certs_dir: Option<PathBuf>,
    tick_ms: Option<u64>,
    snapshot_every: Option<u64>,
    snapshot_log_growth_pct: Option<u64>,
    cache_max_entries: Option<usize>,
    cache_max_bytes: Option<u64>,
    cache_writeback_ms: Option<u64>,
    cache_durable: Option<bool>,
    #[serde(default)]
    http: Vec<SocketAddr>,
}

fn node_id(name: &str) -> Result<NodeId> {
    parse_node_name(name)
        .ok_or_else(|| anyhow!("invalid node id {name:?}: expected node1, node2, ..."))
}

fn parse_peer(spec: &str) -> Result<(NodeId, SocketAddr)> {
    let (name, addr) = spec.split_once('=').ok_or_else(|| {
        anyhow!("invalid --peer {spec:?}: expected NAME=HOST:PORT, e.g. node2=127.0.0.1:7002")
    })?;
    let addr = addr
        .parse()
        .with_context(|| format!("invalid address in --peer {spec:?}"))?;
    Ok((node_id(name)?, addr))
}

fn read_file(path: &Path) -> Result<NodeFile> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("read config {}", path.display()))?;
    if text.len() > 1 << 20 {
        bail!("config {} is larger than 1 MiB", path.display());
    }
    toml::from_str(&text).with_context(|| format!("parse config {}", path.display()))
}

impl NodeArgs {
    /// Flags for a node of the local cluster.
    pub(crate) fn local(
        id: &str,
        listen: SocketAddr,
        admin: SocketAddr,
        peers: Vec<String>,
        http: &[SocketAddr],
        dir: &Path,
    ) -> Vec<String> {
        let mut args = vec![
            "node".to_string(),
            "--id".into(),
            id.into(),
            "--listen".into(),
            listen.to_string(),
            "--admin".into(),
            admin.to_string(),
            "--data-dir".into(),
            dir.join(id).display().to_string(),
            "--certs-dir".into(),
            dir.join("certs").display().to_string(),
        ];
        for p in peers {
            args.push("--peer".into());
            args.push(p);
        }
        for a in http {
            args.push("--http".into());
            args.push(a.to_string());
        }
        args
    }

    fn resolve(self) -> Result<(NodeConfig, Vec<SocketAddr>)> {
        let file = match &self.config {
            Some(path) => read_file(path)?,
            None => NodeFile::default(),
        };
        let name = self
            .id
            .or(file.id)
            .ok_or_else(|| anyhow!("--id is required (e.g. --id node1)"))?;
        let id = node_id(&name)?;
        let mut peers = BTreeMap::new();
        for (peer, addr) in &file.peers {
            peers.insert(node_id(peer)?, *addr);
        }
        for spec in &self.peers {
            let (peer, addr) = parse_peer(spec)?;
            peers.insert(peer, addr);
        }
        peers.remove(&id);
        let tick_ms = self.tick_ms.or(file.tick_ms).unwrap_or(10);
        if !(1..=1000).contains(&tick_ms) {
            bail!("--tick-ms must be between 1 and 1000");
        }
        let mut http = self.http;
        if http.is_empty() {
            http = file.http;
        }
        let mut cache = mesh_core::services::cache::CacheConfig::default();
        cache.max_entries = match self.cache_max_entries.or(file.cache_max_entries) {
            None => cache.max_entries,
            Some(n @ 1..=100_000_000) => n,
            Some(n) => bail!("cache_max_entries must be between 1 and 100000000 (got {n})"),
        };
        cache.max_bytes = match self.cache_max_bytes.or(file.cache_max_bytes) {
            None => cache.max_bytes,
            Some(n @ 1024..=1_099_511_627_776) => n,
            Some(n) => bail!("cache_max_bytes must be between 1024 and 1 TiB (got {n})"),
        };
        cache.writeback_ms = match self.cache_writeback_ms.or(file.cache_writeback_ms) {
            None => cache.writeback_ms,
            Some(n @ 4..=60_000) => n,
            Some(n) => bail!("cache_writeback_ms must be between 4 and 60000 (got {n})"),
        };
        cache.durable_default = self.cache_durable.or(file.cache_durable).unwrap_or(false);
        let cfg = NodeConfig {
            id,
            listen: self
                .listen
                .or(file.listen)
                .unwrap_or_else(|| ([127, 0, 0, 1], 7000 + id as u16).into()),
            admin: self
                .admin
                .or(file.admin)
                .unwrap_or_else(|| ([127, 0, 0, 1], 9000 + id as u16).into()),
            data_dir: self
                .data_dir
                .or(file.data_dir)
                .unwrap_or_else(|| PathBuf::from(".syncmesh").join(&name)),
            certs_dir: self
                .certs_dir
                .or(file.certs_dir)
                .unwrap_or_else(|| PathBuf::from(".syncmesh/certs")),
            peers,
            tick: Duration::from_millis(tick_ms),
            snapshot_every: self
                .snapshot_every
                .or(file.snapshot_every)
                .unwrap_or(10_000),
            snapshot_log_growth_pct: match self
                .snapshot_log_growth_pct
                .or(file.snapshot_log_growth_pct)
                .unwrap_or(100)
            {
                pct @ 0..=1000 => pct,
                pct => bail!("snapshot_log_growth_pct must be between 0 and 1000 (got {pct})"),
            },
            fault_injection: std::env::var_os("SYNCMESH_FAULT_INJECTION").is_some_and(|v| v == "1"),
            cache,
        };
        Ok((cfg, http))
    }
}

/// Resolves when the process gets SIGTERM or Ctrl-C.
pub(crate) async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = ctrl_c.await;
        }
    }
}

pub(crate) fn run(args: NodeArgs) -> Result<()> {
    let (cfg, http) = args.resolve()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("start the async runtime")?;
    runtime.block_on(run_node(cfg, http))
}

/// The node, and its HTTP API on every `http` address (in-process calls to this node).
async fn run_node(cfg: NodeConfig, http: Vec<SocketAddr>) -> Result<()> {
    let (calls_tx, calls_rx) = mesh_node::node::call_inbox();
    let (stop_http, stopped) = tokio::sync::watch::channel(false);
    let mut servers = Vec::new();
    if !http.is_empty() {
        let name = node_name(cfg.id);
        let tls = TlsMaterial::load(&cfg.certs_dir, &name)
            .with_context(|| format!("load {name}'s certificate for the HTTP API"))?;
        let mut nodes = cfg.peers.clone();
        let own = if cfg.listen.ip().is_unspecified() {
            SocketAddr::from(([127, 0, 0, 1], cfg.listen.port()))
        } else {
            cfg.listen
        };
        nodes.insert(cfg.id, own);
        let mesh = MeshClient::new(&tls, nodes)?;
        let local = LocalNode {
            id: cfg.id,
            calls: calls_tx.clone(),
        };
        let app = gateway::router_over(
            Cluster::with_local(mesh, local),
            cfg.id,
            gateway::DEFAULT_MAX_BODY,
        )?;
        for addr in http {
            // Bind before the node starts, so a port in use is a clear error at once.
            let listener = gateway::bind(addr).await?;
            let mut stopped = stopped.clone();
            let shutdown = async move {
                let _ = stopped.wait_for(|s| *s).await;
            };
            let serve = gateway::serve_listener(app.clone(), listener, cfg.id, shutdown);
            servers.push(tokio::spawn(serve));
        }
    }
    let result = mesh_node::node::run(cfg, (calls_tx, calls_rx), shutdown_signal()).await;
    let _ = stop_http.send(true);
    for s in servers {
        if let Ok(Err(e)) = s.await {
            tracing::error!("HTTP API: {e}");
        }
    }
    Ok(result?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_the_config_file() {
        let dir = std::env::temp_dir().join(format!("syncmesh-nodecfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let path = dir.join("node.toml");
        std::fs::write(
            &path,
            "id = \"node2\"\nlisten = \"127.0.0.1:7102\"\n[peers]\nnode1 = \"127.0.0.1:7101\"\n",
        )
        .expect("write");
        let args = NodeArgs {
            config: Some(path.clone()),
            admin: Some("127.0.0.1:9999".parse().expect("addr")),
            ..NodeArgs::default()
        };
        let (cfg, _) = args.resolve().expect("resolve");
        assert_eq!(cfg.id, 2);
        assert_eq!(cfg.listen.port(), 7102);
        assert_eq!(cfg.admin.port(), 9999);
        assert_eq!(cfg.peers.get(&1).map(|a| a.port()), Some(7101));
        std::fs::write(&path, "id = \"node2\"\nbogus = 1\n").expect("write");
        let err = NodeArgs {
            config: Some(path),
            ..NodeArgs::default()
        }
        .resolve()
        .expect_err("unknown key");
        assert!(format!("{err:#}").contains("bogus"), "{err:#}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn bad_ids_and_peers_are_clear_errors() {
        assert!(NodeArgs::default().resolve().is_err());
        let bad = NodeArgs {
            id: Some("gateway".into()),
            ..NodeArgs::default()
        };
        assert!(format!("{:#}", bad.resolve().expect_err("bad id")).contains("node1"));
        let bad = NodeArgs {
            id: Some("node1".into()),
            peers: vec!["node2:7002".into()],
            ..NodeArgs::default()
        };
        assert!(format!("{:#}", bad.resolve().expect_err("bad peer")).contains("NAME=HOST:PORT"));
    }
}
