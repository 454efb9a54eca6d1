//! Real processes, real QUIC with mutual TLS, real disks: elections, kill -9, restarts.

use crate::support::{http, syncmesh, TestCluster};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

#[test]
fn three_nodes_elect_one_leader_and_agree_on_it() {
    let mut c = TestCluster::start("elect3", 3);
    let (leader, term) = c.wait_for_leader(Duration::from_secs(10));
    for i in 0..3 {
        let h = c.health(i).expect("health");
        assert_eq!(h["ok"], true);
        assert_eq!(h["id"], c.nodes[i].name.as_str());
        assert_eq!(h["term"], term);
        assert_eq!(h["leader"], c.nodes[leader].name.as_str());
        assert_eq!(h["role"], if i == leader { 2 } else { 0 });
    }
    let metrics = c.metrics(leader);
    for series in [
        "raft_term",
        "raft_role",
        "raft_commit_index",
        "raft_applied_index",
        "storage_fsync_seconds",
        "rpc_latency_seconds",
    ] {
        assert!(metrics.contains(series), "{series} missing from /metrics");
    }
}

#[test]
fn killing_the_leader_elects_another_and_loses_nothing_committed() {
    let mut c = TestCluster::start("kill9", 3);
    let (leader, term) = c.wait_for_leader(Duration::from_secs(10));
    for i in 0..20 {
        c.put(&format!("k{i}"), &format!("v{i}"));
    }
    let killed_at = Instant::now();
    c.kill9(leader);
    let (new_leader, new_term) = c.wait_for_leader(Duration::from_secs(5));
    let took = killed_at.elapsed();
    eprintln!("new leader {} after {took:?}", c.nodes[new_leader].name);
    assert_ne!(new_leader, leader);
    assert!(new_term > term);
    assert!(took < Duration::from_secs(2), "new leader took {took:?}");
    for i in 0..20 {
        assert_eq!(
            c.get(&format!("k{i}")).as_deref(),
            Some(format!("v{i}").as_str()),
            "k{i} survived"
        );
    }
    c.put("after", "failover");
    // The old leader comes back and catches up.
    c.start_node(leader);
    let target = c.health(new_leader).expect("health")["commit_index"]
        .as_u64()
        .expect("commit");
    let start = Instant::now();
    loop {
        let caught_up = c
            .health(leader)
            .and_then(|h| h["applied_index"].as_u64())
            .is_some_and(|a| a >= target);
        if caught_up {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "restarted node did not catch up to {target}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (_, _) = c.wait_for_leader(Duration::from_secs(5));
}

#[test]
fn a_full_cluster_restart_keeps_every_committed_entry() {
    let mut c = TestCluster::start("restart", 3);
    c.wait_for_leader(Duration::from_secs(10));
    for i in 0..10 {
        c.put(&format!("r{i}"), &format!("x{i}"));
    }
    for i in 0..3 {
        c.kill9(i);
    }
    for i in 0..3 {
        c.start_node(i);
    }
    c.wait_for_leader(Duration::from_secs(10));
    for i in 0..10 {
        assert_eq!(
            c.get(&format!("r{i}")).as_deref(),
            Some(format!("x{i}").as_str())
        );
    }
}

#[test]
fn sigterm_on_the_leader_hands_over_and_exits_cleanly() {
    let mut c = TestCluster::start("sigterm", 3);
    let (leader, _) = c.wait_for_leader(Duration::from_secs(10));
    c.put("before", "stop");
    let pid = c.pid(leader);
    // SAFETY: kill(2) on a child we spawned.
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let code = c.wait_exit(leader, Duration::from_secs(5));
    assert_eq!(code, Some(0), "a stopped node exits 0");
    assert!(
        c.log(leader).contains("transferring leadership"),
        "{}",
        c.log(leader)
    );
    let (new_leader, _) = c.wait_for_leader(Duration::from_secs(3));
    assert_ne!(new_leader, leader);
    assert_eq!(c.get("before").as_deref(), Some("stop"));
}

#[test]
fn five_node_cluster_command_elects_a_leader_and_serves_the_seed_ports() {
    use std::io::BufRead;
    let dir = crate::support::TempDir::new("cluster5");
    // The launcher's ports, away from a running `syncmesh cluster`: B..B+4, B+100..B+104
    // and B+200..B+204 for the seed's ports, a QUIC and an admin range 1000 apart.
    let base = crate::support::free_port_block(205);
    let nodes = crate::support::free_port_block(1005);
    let mut child = syncmesh()
        .current_dir(&dir.0)
        .args(["cluster", "--nodes", "5", "--dir", "c5"])
        .args(["--quic-port", &nodes.to_string()])
        .args(["--admin-port", &(nodes + 1000).to_string()])
        .args(["--gateway-port", &base.to_string()])
        .args(["--seed-ports-base", &base.to_string()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start cluster");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let mut out = String::new();
    let up = loop {
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(line) => {
                out.push_str(&line);
                out.push('\n');
                if line.contains("syncmesh cluster is up: 5 nodes") {
                    break true;
                }
            }
            Err(_) => break false,
        }
    };
    // Every node agrees with the launcher's report.
    let leaders: Vec<Option<String>> = (0..5)
        .map(|i| {
            let (_, body) =
                crate::support::http_get(([127, 0, 0, 1], nodes + 1000 + i).into(), "/health")?;
            let v: serde_json::Value = serde_json::from_str(&body).ok()?;
            v["leader"].as_str().map(str::to_string)
        })
        .collect();
    // The seed's ports: node2 serves the whole API in-process on B+1 and B+101.
    let at = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
    let wait_until = |port: u16| {
        let start = Instant::now();
        while crate::support::http_get(at(port), "/health").is_none() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "port {port} never answered"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    wait_until(base + 101);
    let (status, health) = http(at(base + 101), "GET", "/health", b"");
    let (acq_status, acquired) = http(
        at(base + 1),
        "POST",
        "/lock/acquire",
        br#"{"key": "A", "mode": "X", "client_id": "client1"}"#,
    );
    let (cache_status, _) = http(at(base + 201), "GET", "/health", b"");
    // The seed's queue requests on the seed's queue ports, across three nodes.
    wait_until(base + 100);
    wait_until(base + 102);
    let (enq_status, enq) = http(
        at(base + 101),
        "POST",
        "/queue/enq",
        br#"{"key": "user:42", "value": "hello"}"#,
    );
    let (_, deq) = http(at(base + 100), "POST", "/queue/deq", b"");
    let ack = format!(r#"{{"msg_id": {}}}"#, deq["msg_id"]);
    let (ack_status, _) = http(at(base + 102), "POST", "/queue/ack", ack.as_bytes());
    let (again_status, _) = http(at(base + 102), "POST", "/queue/ack", ack.as_bytes());
    let (_, empty) = http(at(base + 101), "POST", "/queue/deq", b"");
    // SIGTERM the launcher: it stops every child.
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let status_exit = child.wait().expect("wait cluster");
    reader.join().expect("reader");
    out.extend(rx.try_iter().map(|l| l + "\n"));
    assert!(up, "the launcher never reported the cluster up: {out}");
    assert!(
        leaders.iter().all(|l| l.is_some() && *l == leaders[0]),
        "{leaders:?}"
    );
    assert_eq!(
        (status, health["id"].as_str()),
        (200, Some("node2")),
        "{health}"
    );
    assert_eq!(acq_status, 200, "{acquired}");
    assert_eq!(acquired["mode"], "X");
    assert_eq!(cache_status, 200);
    assert_eq!(
        (enq_status, &enq["ok"]),
        (200, &serde_json::Value::Bool(true)),
        "{enq}"
    );
    assert_eq!(deq["msg_id"], enq["msg_id"], "{deq}");
    assert_eq!(deq["payload"]["value"], "hello", "{deq}");
    assert_eq!((ack_status, again_status), (200, 404));
    assert!(empty["msg_id"].is_null(), "{empty}");
    assert!(out.contains("every node stopped"), "{out}");
    assert!(status_exit.success(), "cluster exits 0 on SIGTERM");
}

#[test]
fn a_node_that_fell_behind_compaction_catches_up_by_snapshot() {
    let mut c = TestCluster::start_with_snapshots("snapshot", 3, 8);
    let (leader, _) = c.wait_for_leader(Duration::from_secs(10));
    let follower = (leader + 1) % 3;
    c.kill9(follower);
    for i in 0..40 {
        c.put(&format!("s{i}"), &format!("v{i}"));
    }
    let target = c.health(leader).expect("health")["commit_index"]
        .as_u64()
        .expect("commit");
    c.start_node(follower);
    let start = Instant::now();
    while c
        .health(follower)
        .and_then(|h| h["applied_index"].as_u64())
        .is_none_or(|a| a < target)
    {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "follower did not catch up:\n{}",
            c.log(follower)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        c.log(follower)
            .contains("installed snapshot from the leader"),
        "follower:\n{}\nleader:\n{}",
        c.log(follower),
        c.log(leader)
    );
    // The caught-up node serves as part of a quorum: stop another and read everything.
    let other = (0..3)
        .find(|&i| i != leader && i != follower)
        .expect("third node");
    c.kill9(other);
    for i in (0..40).step_by(7) {
        assert_eq!(
            c.get(&format!("s{i}")).as_deref(),
            Some(format!("v{i}").as_str())
        );
    }
}
