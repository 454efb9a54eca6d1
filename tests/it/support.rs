//! A cluster of real `syncmesh node` processes on loopback for integration tests.

use serde_json::Value;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
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

fn free_udp() -> SocketAddr {
    UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("free udp port")
}

fn free_tcp() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("free tcp port")
}

/// GET over plain HTTP/1.1: status and body.
pub(crate) fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(300)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, text.split_once("\r\n\r\n")?.1.to_string()))
}

pub(crate) struct TestNode {
    pub(crate) name: String,
    pub(crate) quic: SocketAddr,
    pub(crate) admin: SocketAddr,
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
            assert!(
                start.elapsed() < timeout,
                "no agreed leader after {timeout:?}: {views:?}"
            );
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

/// One HTTP/1.1 request with a body: status and the parsed JSON body (Null if not JSON).
pub(crate) fn http(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> (u16, Value) {
    let mut s =
        TcpStream::connect_timeout(&addr, Duration::from_secs(2)).expect("connect to gateway");
    s.set_read_timeout(Some(Duration::from_secs(90)))
        .expect("timeout");
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).expect("write head");
    // The server may answer (413) before reading a large body and close; that is fine.
    let _ = s.write_all(body);
    let mut text = Vec::new();
    let _ = s.read_to_end(&mut text);
    let text = String::from_utf8_lossy(&text);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status line");
    let json = text
        .split_once("\r\n\r\n")
        .and_then(|(_, b)| serde_json::from_str(b).ok())
        .unwrap_or(Value::Null);
    (status, json)
}
