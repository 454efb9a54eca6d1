//! A cluster of real `syncmesh node` processes on loopback for integration tests.

use serde_json::Value;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub(crate) fn syncmesh() -> Command {
    Command::new(env!("CARGO_BIN_EXE_syncmesh"))
}

/// A directory removed when dropped.
pub(crate) struct TempDir(pub(crate) PathBuf);

impl TempDir {
    pub(crate) fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("syncmesh-it-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Ports for test processes come from 10000..32000, below Linux's ephemeral range
/// (32768..60999): a port found free by binding port 0 and then released can be taken
/// by any outgoing connection or `bind(0)` before the node binds it, and a node whose
/// admin port was taken that way exits at start (seen in CI as "no agreed leader").
/// Each test process starts at its own offset and hands out blocks in turn.
const PORT_LOW: u16 = 10_000;
const PORT_HIGH: u16 = 32_000;

/// A block of `len` consecutive ports, each free for both TCP and UDP right now: the
/// first port.
pub(crate) fn free_port_block(len: u16) -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let span = u32::from(PORT_HIGH - PORT_LOW);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        (std::process::id().wrapping_mul(7919)) % span,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    for _ in 0..2_000 {
        let at = NEXT.fetch_add(u32::from(len), Ordering::SeqCst) % span;
        if at + u32::from(len) > span {
            continue;
        }
        let base = PORT_LOW + at as u16;
        let free = (base..base + len).all(|port| {
            TcpListener::bind(("127.0.0.1", port)).is_ok()
                && UdpSocket::bind(("127.0.0.1", port)).is_ok()
        });
        if free {
            return base;
        }
    }
    panic!("no free block of {len} ports in {PORT_LOW}..{PORT_HIGH}");
}

fn free_udp() -> SocketAddr {
    ([127, 0, 0, 1], free_port_block(1)).into()
}

fn free_tcp() -> SocketAddr {
    ([127, 0, 0, 1], free_port_block(1)).into()
}

/// The project's one HTTP client (ureq), answering every status as a response.
pub(crate) fn agent(timeout: Duration) -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(timeout))
        .http_status_as_error(false)
        .build()
        .into()
}

/// GET: status and body (`None` if nothing answers).
pub(crate) fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut r = agent(Duration::from_secs(2))
        .get(&format!("http://{addr}{path}"))
        .call()
        .ok()?;
    let status = r.status().as_u16();
    Some((status, r.body_mut().read_to_string().ok()?))
}

pub(crate) struct TestNode {
    pub(crate) name: String,
    pub(crate) quic: SocketAddr,
    pub(crate) admin: SocketAddr,
    /// The node's own HTTP API (in-process, `--http`).
    pub(crate) http: SocketAddr,
    child: Option<Child>,
}

pub(crate) struct TestCluster {
    gateway: Option<(SocketAddr, Child)>,
    pub(crate) dir: TempDir,
    pub(crate) nodes: Vec<TestNode>,
    /// Passed to every node as `--snapshot-every` when set.
    pub(crate) snapshot_every: Option<u64>,
}

impl TestCluster {
    /// Certificates and `n` running nodes.
    pub(crate) fn start(name: &str, n: usize) -> Self {
        Self::start_with(name, n, None)
    }

    /// Like `start`, with snapshots every `every` applied entries.
    pub(crate) fn start_with_snapshots(name: &str, n: usize, every: u64) -> Self {
        Self::start_with(name, n, Some(every))
    }

    fn start_with(name: &str, n: usize, snapshot_every: Option<u64>) -> Self {
        let dir = TempDir::new(name);
        let out = syncmesh()
            .args(["certs", "init", "--nodes", &n.to_string(), "--dir"])
            .arg(dir.0.join("certs"))
            .output()
            .expect("run certs init");
        assert!(
            out.status.success(),
            "certs init: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let nodes = (1..=n)
            .map(|i| TestNode {
                name: format!("node{i}"),
                quic: free_udp(),
                admin: free_tcp(),
                http: free_tcp(),
                child: None,
            })
            .collect();
        let mut cluster = Self {
            gateway: None,
            dir,
            nodes,
            snapshot_every,
        };
        for i in 0..n {
            cluster.start_node(i);
        }
        cluster
    }

    pub(crate) fn certs_dir(&self) -> PathBuf {
        self.dir.0.join("certs")
    }

    pub(crate) fn log_path(&self, i: usize) -> PathBuf {
        self.dir.0.join(format!("{}.log", self.nodes[i].name))
    }

    pub(crate) fn start_node(&mut self, i: usize) {
        let cmd = self.node_command(i);
        self.spawn_node(i, cmd);
    }

    /// Start node `i` with extra environment (a shifted clock, say).
    pub(crate) fn start_node_with_env(&mut self, i: usize, env: &[(&str, String)]) {
        let mut cmd = self.node_command(i);
        for (k, v) in env {
            cmd.env(k, v);
        }
        self.spawn_node(i, cmd);
    }

    fn node_command(&self, i: usize) -> Command {
        let node = &self.nodes[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(i))
            .expect("log file");
        let mut cmd = syncmesh();
        cmd.args([
            "node",
            "--id",
            &node.name,
            "--listen",
            &node.quic.to_string(),
            "--admin",
            &node.admin.to_string(),
            "--http",
            &node.http.to_string(),
        ])
        .arg("--data-dir")
        .arg(self.dir.0.join(&node.name))
        .arg("--certs-dir")
        .arg(self.certs_dir())
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log);
        if let Some(every) = self.snapshot_every {
            cmd.args(["--snapshot-every", &every.to_string()]);
        }
        for peer in self.nodes.iter().filter(|p| p.name != node.name) {
            cmd.arg("--peer")
                .arg(format!("{}={}", peer.name, peer.quic));
        }
        cmd
    }

    fn spawn_node(&mut self, i: usize, mut cmd: Command) {
        let child = cmd.spawn().expect("start node");
        self.nodes[i].child = Some(child);
    }

    /// kill -9.
    pub(crate) fn kill9(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub(crate) fn pid(&self, i: usize) -> u32 {
        self.nodes[i]
            .child
            .as_ref()
            .map(Child::id)
            .expect("node running")
    }

    /// Wait for a node to exit: its exit code.
    pub(crate) fn wait_exit(&mut self, i: usize, timeout: Duration) -> Option<i32> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Some(c) = self.nodes[i].child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    self.nodes[i].child = None;
                    return status.code();
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub(crate) fn health(&self, i: usize) -> Option<Value> {
        let (status, body) = http_get(self.nodes[i].admin, "/health")?;
        (status == 200)
            .then(|| serde_json::from_str(&body).ok())
            .flatten()
    }

    pub(crate) fn metrics(&self, i: usize) -> String {
        http_get(self.nodes[i].admin, "/metrics")
            .map(|(_, b)| b)
            .unwrap_or_default()
    }

    /// For a failure message: each node's process state and the end of its log.
    pub(crate) fn diagnose(&mut self, nodes: &[usize]) -> String {
        let mut out = String::new();
        for &i in nodes {
            let state = match self.nodes[i].child.as_mut().map(Child::try_wait) {
                None => "not started".to_string(),
                Some(Ok(None)) => "running".to_string(),
                Some(Ok(Some(status))) => format!("exited: {status}"),
                Some(Err(e)) => format!("unknown: {e}"),
            };
            let log = self.log(i);
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            out.push_str(&format!(
                "--- {} ({state}), last log lines:\n",
                self.nodes[i].name
            ));
            for line in tail.iter().rev() {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }

    pub(crate) fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.log_path(i)).unwrap_or_default()
    }

    /// Wait until every running node reports the same leader and term: (leader index, term).
    pub(crate) fn wait_for_leader(&mut self, timeout: Duration) -> (usize, u64) {
        let start = Instant::now();
        loop {
            let running: Vec<usize> = (0..self.nodes.len())
                .filter(|&i| self.nodes[i].child.is_some())
                .collect();
            let views: Vec<Option<(String, u64)>> = running
                .iter()
                .map(|&i| {
                    let h = self.health(i)?;
                    Some((h["leader"].as_str()?.to_string(), h["term"].as_u64()?))
                })
                .collect();
            if let Some(Some(first)) = views.first() {
                if views.iter().all(|v| v.as_ref() == Some(first)) {
                    let idx = self.nodes.iter().position(|n| n.name == first.0);
                    if let Some(idx) = idx.filter(|&i| running.contains(&i)) {
                        return (idx, first.1);
                    }
                }
            }
            if start.elapsed() >= timeout {
                panic!(
                    "no agreed leader after {timeout:?}: {views:?}\n{}",
                    self.diagnose(&running)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub(crate) fn nodes_flag(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("{}={}", n.name, n.quic))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// `syncmesh ctl ...` against this cluster with the admin certificate.
    pub(crate) fn ctl(&self, args: &[&str]) -> Output {
        syncmesh()
            .args([
                "ctl",
                "--nodes",
                &self.nodes_flag(),
                "--timeout-secs",
                "15",
                "--certs-dir",
            ])
            .arg(self.certs_dir())
            .args(args)
            .output()
            .expect("run ctl")
    }

    /// Start a gateway in front of the cluster; its HTTP address once it answers.
    pub(crate) fn start_gateway(&mut self) -> SocketAddr {
        let listen = free_tcp();
        let log = std::fs::File::create(self.dir.0.join("gateway.log")).expect("log");
        let child = syncmesh()
            .args([
                "gateway",
                "--listen",
                &listen.to_string(),
                "--nodes",
                &self.nodes_flag(),
                "--certs-dir",
            ])
            .arg(self.certs_dir())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start gateway");
        self.gateway = Some((listen, child));
        let start = Instant::now();
        while http_get(listen, "/health").is_none_or(|(status, _)| status != 200) {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "gateway did not come up"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        listen
    }

    pub(crate) fn put(&self, key: &str, value: &str) {
        let out = self.ctl(&["put", key, value]);
        assert!(
            out.status.success(),
            "put {key}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub(crate) fn get(&self, key: &str) -> Option<String> {
        let out = self.ctl(&["get", key]);
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        if let Some((_, mut gw)) = self.gateway.take() {
            let _ = gw.kill();
            let _ = gw.wait();
        }
        for i in 0..self.nodes.len() {
            self.kill9(i);
        }
    }
}

/// One HTTP request with a body: status and the parsed JSON body (Null if not JSON).
pub(crate) fn http(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> (u16, Value) {
    http_on(&agent(Duration::from_secs(90)), addr, method, path, body)
}

/// [`http`] on `agent` (which keeps its connections alive between requests).
pub(crate) fn http_on(
    agent: &ureq::Agent,
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &[u8],
) -> (u16, Value) {
    let url = format!("http://{addr}{path}");
    let response = match method {
        "GET" => agent.get(&url).call(),
        "POST" => agent
            .post(&url)
            .header("content-type", "application/json")
            .send(body),
        "PUT" => agent
            .put(&url)
            .header("content-type", "application/json")
            .send(body),
        "DELETE" => agent.delete(&url).call(),
        other => panic!("method {other}"),
    };
    let mut r = response.expect("the HTTP API answers");
    let status = r.status().as_u16();
    let text = r
        .body_mut()
        .with_config()
        .limit(16 << 20)
        .read_to_string()
        .unwrap_or_default();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// Wait (not sleep) until `cond` holds.
pub(crate) fn eventually(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
