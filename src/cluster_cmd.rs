//! `syncmesh cluster`: a local cluster for development, as DESIGN.md section 2 lays out.
//! Makes certificates if missing, starts `node1..nodeN` as child processes and the
//! gateway (with the console) in this process, waits until they agree on a leader,
//! prints the addresses, and stops every child on Ctrl-C or SIGTERM. It restarts
//! nothing by itself; with fault injection on (the default: everything listens on
//! loopback only) the console's buttons stop, restart, isolate and heal nodes, and this
//! process, which owns them, carries that out.

use crate::http;
use crate::node_cmd::NodeArgs;
use anyhow::{bail, Context, Result};
use clap::Args;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Options of `syncmesh cluster`.
#[derive(Args, Debug, Clone)]
pub(crate) struct ClusterArgs {
    /// Number of nodes.
    #[arg(long, default_value_t = 3)]
    pub(crate) nodes: u16,
    /// Directory for certificates and node data.
    #[arg(long, default_value = ".syncmesh")]
    pub(crate) dir: PathBuf,
    /// QUIC port of node1 (node i gets base + i - 1).
    #[arg(long, default_value_t = 7001)]
    pub(crate) quic_port: u16,
    /// Admin HTTP port of node1 (node i gets base + i - 1).
    #[arg(long, default_value_t = 9001)]
    pub(crate) admin_port: u16,
    /// HTTP port of the gateway (0: no gateway).
    #[arg(long, default_value_t = 8000)]
    pub(crate) gateway_port: u16,
    /// Seconds to wait for a leader before giving up.
    #[arg(long, default_value_t = 30)]
    pub(crate) wait_secs: u64,
    /// Serve the seed's ports too: node i answers the whole HTTP API in-process on
    /// BASE+i-1 (for i > 1; BASE itself is the gateway), BASE+100+i-1 and BASE+200+i-1.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub(crate) seed_ports: bool,
    /// BASE of the seed's ports (lock API 8000-8002, queue 8100-8102, cache 8200-8202).
    #[arg(long, default_value_t = 8000)]
    pub(crate) seed_ports_base: u16,
    /// Let the console stop, restart, isolate and heal nodes (`POST /api/fault/*` on the
    /// gateway; every port is on loopback). `false`: those routes do not exist.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub(crate) fault_injection: bool,
}

/// Node processes on loopback, started from this binary.
pub(crate) struct LocalCluster {
    args: ClusterArgs,
    children: Vec<Option<Child>>,
    gateway: Option<Child>,
}

fn addr(port: u16) -> SocketAddr {
    ([127, 0, 0, 1], port).into()
}

impl LocalCluster {
    /// Make certificates if missing and start every node, and the gateway as a child
    /// process (the benchmarks' way: its CPU is not the load generator's).
    pub(crate) fn start(args: ClusterArgs) -> Result<Self> {
        let mut cluster = Self::start_nodes(args)?;
        if cluster.args.gateway_port != 0 {
            cluster.start_gateway()?;
        }
        Ok(cluster)
    }

    /// Make certificates if missing and start every node.
    pub(crate) fn start_nodes(args: ClusterArgs) -> Result<Self> {
        if args.nodes == 0 || args.nodes > 99 {
            bail!("--nodes must be between 1 and 99");
        }
        let names: Vec<String> = (1..=args.nodes).map(|i| format!("node{i}")).collect();
        let certs_dir = args.dir.join("certs");
        let made =
            certs::ensure_cluster(&certs_dir, &names, &["gateway".into(), "admin".into()], 825)?;
        if !made.is_empty() {
            println!(
                "made {} certificate files in {}",
                made.len(),
                certs_dir.display()
            );
        }
        let mut cluster = Self {
            children: (0..args.nodes).map(|_| None).collect(),
            args,
            gateway: None,
        };
        for i in 0..cluster.args.nodes as usize {
            cluster.start_node(i)?;
        }
        Ok(cluster)
    }

    pub(crate) fn name(i: usize) -> String {
        format!("node{}", i + 1)
    }

    pub(crate) fn admin(&self, i: usize) -> SocketAddr {
        addr(self.args.admin_port + i as u16)
    }

    pub(crate) fn quic(&self, i: usize) -> SocketAddr {
        addr(self.args.quic_port + i as u16)
    }

    /// The HTTP addresses node `i` serves in-process (the seed's ports).
    pub(crate) fn http(&self, i: usize) -> Vec<SocketAddr> {
        if !self.args.seed_ports {
            return Vec::new();
        }
        let base = self.args.seed_ports_base;
        let i = i as u16;
        let mut ports = Vec::new();
        if i > 0 {
            ports.push(base + i);
        }
        ports.push(base + 100 + i);
        ports.push(base + 200 + i);
        ports.into_iter().map(addr).collect()
    }

    pub(crate) fn len(&self) -> usize {
        self.children.len()
    }

    fn log_path(&self, i: usize) -> PathBuf {
        self.args.dir.join(Self::name(i)).join("node.log")
    }

    /// Start (or restart) node `i`.
    pub(crate) fn start_node(&mut self, i: usize) -> Result<()> {
        let exe = std::env::current_exe().context("locate the syncmesh binary")?;
        let peers = (0..self.len())
            .filter(|&j| j != i)
            .map(|j| format!("{}={}", Self::name(j), self.quic(j)))
            .collect();
        let name = Self::name(i);
        let http = self.http(i);
        let flags = NodeArgs::local(
            &name,
            self.quic(i),
            self.admin(i),
            peers,
            &http,
            &self.args.dir,
        );
        std::fs::create_dir_all(self.args.dir.join(&name))?;
        let log_path = self.log_path(i);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("open {}", log_path.display()))?;
        let mut cmd = Command::new(&exe);
        if self.args.fault_injection {
            cmd.env("SYNCMESH_FAULT_INJECTION", "1");
        }
        let child = cmd
            .args(&flags)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("start {name}"))?;
        self.children[i] = Some(child);
        Ok(())
    }

    fn start_gateway(&mut self) -> Result<()> {
        let exe = std::env::current_exe().context("locate the syncmesh binary")?;
        let nodes: Vec<String> = (0..self.len())
            .map(|j| format!("{}={}", Self::name(j), self.quic(j)))
            .collect();
        let log_path = self.args.dir.join("gateway.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("open {}", log_path.display()))?;
        let child = Command::new(exe)
            .args([
                "gateway",
                "--listen",
                &addr(self.args.gateway_port).to_string(),
                "--nodes",
                &nodes.join(","),
            ])
            .arg("--certs-dir")
            .arg(self.args.dir.join("certs"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("start the gateway")?;
        self.gateway = Some(child);
        Ok(())
    }

    /// kill -9 node `i`.
    pub(crate) fn kill9(&mut self, i: usize) {
        if let Some(mut c) = self.children[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Carry out one of the console's faults on node `id` (1-based): what was done, or
    /// why not.
    pub(crate) fn inject(&mut self, fault: gateway::Fault, id: u64) -> Result<String, String> {
        let name = format!("node{id}");
        let i = usize::try_from(id)
            .ok()
            .and_then(|id| id.checked_sub(1))
            .filter(|&i| i < self.len())
            .ok_or_else(|| format!("{name} is not a node of this cluster"))?;
        let running = self.children[i].is_some();
        match fault {
            gateway::Fault::Stop if !running => Err(format!("{name} is not running")),
            gateway::Fault::Stop => {
                self.kill9(i);
                Ok(format!("{name} stopped (kill -9)"))
            }
            gateway::Fault::Restart => {
                self.kill9(i);
                self.start_node(i).map_err(|e| format!("{name}: {e:#}"))?;
                Ok(format!(
                    "{name} {}",
                    if running {
                        "killed and restarted"
                    } else {
                        "started"
                    }
                ))
            }
            gateway::Fault::Isolate | gateway::Fault::Heal if !running => {
                Err(format!("{name} is not running"))
            }
            gateway::Fault::Isolate | gateway::Fault::Heal => {
                let (path, done) = if fault == gateway::Fault::Isolate {
                    ("/fault/isolate", "cut off from its peers")
                } else {
                    ("/fault/heal", "reaches its peers again")
                };
                let url = format!("http://{}{path}", self.admin(i));
                match http::post(&http::agent(Duration::from_secs(2)), &url, "") {
                    Ok(200) => Ok(format!("{name} {done}")),
                    Ok(status) => Err(format!("{name} answered {status} to {path}")),
                    Err(e) => Err(format!("{name} did not answer {path}: {e}")),
                }
            }
        }
    }

    /// `/health` of node `i`, as (leader, term, commit index).
    pub(crate) fn health(&self, i: usize) -> Option<(String, u64, u64)> {
        let (status, body) = http::get(self.admin(i), "/health").ok()?;
        if status != 200 {
            return None;
        }
        let field = |name: &str| -> Option<&str> {
            let rest = body.split(&format!("\"{name}\":")).nth(1)?;
            Some(rest.split([',', '}']).next()?.trim_matches('"'))
        };
        Some((
            field("leader")?.to_string(),
            field("term")?.parse().ok()?,
            field("commit_index")?.parse().ok()?,
        ))
    }

    /// The leader, term and its commit index, once every running node agrees.
    pub(crate) fn agreed_leader(&self) -> Option<(usize, u64, u64)> {
        let mut agreed: Option<(String, u64)> = None;
        let mut commit = 0;
        for i in (0..self.len()).filter(|&i| self.children[i].is_some()) {
            let (leader, term, c) = self.health(i)?;
            if agreed.get_or_insert_with(|| (leader.clone(), term)) != &(leader.clone(), term) {
                return None;
            }
            if Self::name(i) == leader {
                commit = c;
            }
        }
        let (leader, term) = agreed?;
        let idx =
            (0..self.len()).find(|&i| Self::name(i) == leader && self.children[i].is_some())?;
        Some((idx, term, commit))
    }

    /// A child that exited on its own, as an error naming its log; with `survive`, a
    /// node that exited is only reported.
    pub(crate) fn check_children(&mut self, survive: bool) -> Result<()> {
        if let Some(Ok(Some(status))) = self.gateway.as_mut().map(Child::try_wait) {
            bail!(
                "the gateway exited ({status}); see {}",
                self.args.dir.join("gateway.log").display()
            );
        }
        for i in 0..self.len() {
            if let Some(Ok(Some(status))) = self.children[i].as_mut().map(Child::try_wait) {
                if !survive {
                    bail!(
                        "{} exited ({status}); see {}",
                        Self::name(i),
                        self.log_path(i).display()
                    );
                }
                // The console can start it again, and the others go on without it: a
                // cluster is there to survive one node.
                self.children[i] = None;
                println!(
                    "{} exited ({status}); see {}; the console's restart button starts it again",
                    Self::name(i),
                    self.log_path(i).display()
                );
            }
        }
        Ok(())
    }

    /// SIGTERM every node (a leader hands over), then SIGKILL what is left after 5 s.
    pub(crate) fn stop_all(&mut self) {
        if let Some(mut gw) = self.gateway.take() {
            let _ = gw.kill();
            let _ = gw.wait();
        }
        for child in self.children.iter().flatten() {
            if let Ok(pid) = i32::try_from(child.id()) {
                // SAFETY: kill(2) on a process we spawned, with a valid signal number.
                unsafe {
                    libc::kill(pid, libc::SIGTERM);
                }
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for slot in &mut self.children {
            if let Some(mut child) = slot.take() {
                while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                    std::thread::sleep(Duration::from_millis(20));
                }
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }

    fn print_addresses(&self, leader: usize) {
        println!(
            "syncmesh cluster is up: {} nodes, leader {}",
            self.len(),
            Self::name(leader)
        );
        for i in 0..self.len() {
            println!(
                "  {:<7} quic {}  admin http://{}/health  log {}",
                Self::name(i),
                self.quic(i),
                self.admin(i),
                self.log_path(i).display()
            );
            let http: Vec<String> = self.http(i).iter().map(|a| format!("http://{a}")).collect();
            if !http.is_empty() {
                println!("          HTTP API in-process on {}", http.join(" "));
            }
        }
        if self.args.gateway_port != 0 {
            println!(
                "  console http://{}/  (the gateway's HTTP API on the same port, in this \
                 process; fault injection {})",
                addr(self.args.gateway_port),
                if self.args.fault_injection {
                    "on"
                } else {
                    "off"
                }
            );
        }
        println!(
            "  certificates in {}",
            self.args.dir.join("certs").display()
        );
        println!("Ctrl-C stops every node.");
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        self.stop_all();
    }
}

pub(crate) fn run(args: ClusterArgs) -> Result<()> {
    // Two workers: the gateway serves the console while the supervisor waits.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut cluster = LocalCluster::start_nodes(args)?;
    let result = runtime.block_on(async {
        let (faults, requests) = tokio::sync::mpsc::channel(4);
        let (stop_gateway, stopped) = tokio::sync::oneshot::channel::<()>();
        let gateway = match cluster.args.gateway_port {
            0 => None,
            port => {
                let (app, listener) = bind_gateway(&cluster, port, faults).await?;
                Some(tokio::spawn(gateway::serve_listener(
                    app,
                    listener,
                    1,
                    async {
                        let _ = stopped.await;
                    },
                )))
            }
        };
        let result = supervise(&mut cluster, requests).await;
        let _ = stop_gateway.send(());
        if let Some(task) = gateway {
            let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
        }
        result
    });
    cluster.stop_all();
    println!("every node stopped");
    result
}

/// The gateway's router, and its port bound now: a port taken is an error before the
/// cluster is announced.
async fn bind_gateway(
    cluster: &LocalCluster,
    port: u16,
    faults: gateway::FaultSender,
) -> Result<(axum::Router, tokio::net::TcpListener)> {
    let nodes = (0..cluster.len())
        .map(|j| (j as u64 + 1, cluster.quic(j)))
        .collect();
    let cfg = gateway::GatewayConfig {
        listen: addr(port),
        certs_dir: cluster.args.dir.join("certs"),
        cert: "gateway".into(),
        nodes,
        home: 1,
        max_body: gateway::DEFAULT_MAX_BODY,
        faults: cluster.args.fault_injection.then_some(faults),
    };
    let app = gateway::router(&cfg).context("start the gateway")?;
    let listener = gateway::bind(cfg.listen)
        .await
        .with_context(|| format!("the gateway's port (--gateway-port {port})"))?;
    Ok((app, listener))
}

async fn supervise(
    cluster: &mut LocalCluster,
    mut faults: tokio::sync::mpsc::Receiver<gateway::FaultRequest>,
) -> Result<()> {
    let signal = crate::node_cmd::shutdown_signal();
    tokio::pin!(signal);
    let deadline = Instant::now() + Duration::from_secs(cluster.args.wait_secs);
    let mut announced = false;
    loop {
        if !announced {
            if let Some((l, _, _)) = tokio::task::block_in_place(|| cluster.agreed_leader()) {
                cluster.print_addresses(l);
                announced = true;
            } else if Instant::now() > deadline {
                bail!(
                    "no leader after {} s; see the node logs under {}",
                    cluster.args.wait_secs,
                    cluster.args.dir.display()
                );
            }
        }
        // Until the cluster is announced, look for its leader every 100 ms.
        let pause = Duration::from_millis(if announced { 500 } else { 100 });
        tokio::select! {
            () = &mut signal => return Ok(()),
            // Once the cluster is up, and the console can restart a node, one that exits
            // is reported, not the end of everything.
            () = tokio::time::sleep(pause) => {
                let survive = announced
                    && cluster.args.fault_injection
                    && cluster.args.gateway_port != 0;
                cluster.check_children(survive)?;
            }
            // Faults are carried out from the start (a console may be open before the
            // nodes agree on a leader, or while they elect one again).
            Some(req) = faults.recv() => {
                if req.reply.is_closed() {
                    // Its caller gave up (the gateway answered "not answered"): doing it
                    // now would break a node nobody asked to break any more.
                    println!("console: dropped a {:?} of node{} its caller gave up on", req.fault, req.node);
                    continue;
                }
                let done = tokio::task::block_in_place(|| cluster.inject(req.fault, req.node));
                match &done {
                    Ok(what) => println!("console: {what}"),
                    Err(why) => println!("console: refused: {why}"),
                }
                let _ = req.reply.send(done);
            }
        }
    }
}
