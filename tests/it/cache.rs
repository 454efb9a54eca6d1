//! The cache over HTTP against real processes: the seed's requests, the MESI walk of
//! DESIGN.md section 6, and the documented refusals.

use crate::support::{agent, eventually, http, TestCluster};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

fn post(at: SocketAddr, path: &str, body: &Value) -> (u16, Value) {
    http(at, "POST", path, body.to_string().as_bytes())
}

fn put(at: SocketAddr, key: &str, val: Value) -> Value {
    let (status, body) = post(at, "/cache/put", &json!({ "key": key, "val": val }));
    assert_eq!(status, 200, "put {key}: {body}");
    body
}

fn get(at: SocketAddr, key: &str) -> Value {
    let (status, body) = post(at, "/cache/get", &json!({ "key": key }));
    assert_eq!(status, 200, "get {key}: {body}");
    body
}

/// The state of `key` on every node, as `GET /cache/state` reports it.
fn states(at: SocketAddr, key: &str) -> Vec<String> {
    let (status, body) = http(at, "GET", &format!("/cache/state?key={key}"), b"");
    assert_eq!(status, 200, "{body}");
    (1..=3)
        .map(|i| {
            body["nodes"][format!("node{i}")]["state"]
                .as_str()
                .unwrap_or("?")
                .to_string()
        })
        .collect()
}

fn stat(at: SocketAddr, node: &str, field: &str) -> u64 {
    let (status, body) = http(at, "GET", "/cache/stats", b"");
    assert_eq!(status, 200, "{body}");
    body["nodes"][node][field]
        .as_u64()
        .unwrap_or_else(|| panic!("no {field} for {node}: {body}"))
}

#[test]
fn the_seed_cache_requests_work_on_a_node_port_and_through_the_gateway() {
    let mut c = TestCluster::start("cache-seed", 3);
    c.wait_for_leader(Duration::from_secs(10));
    let gw = c.start_gateway();
    let seed_val = json!({"name": "Arya", "score": 99});
    for at in [c.nodes[0].http, gw] {
        let (status, body) = http(
            at,
            "POST",
            "/cache/put",
            br#"{"key": "user:42", "val": {"name": "Arya", "score": 99}}"#,
        );
        assert_eq!((status, body), (200, json!({"ok": true, "state": "M"})));
        let (status, body) = http(at, "POST", "/cache/get", br#"{"key": "user:42"}"#);
        assert_eq!(
            (status, body),
            (200, json!({"hit": true, "val": seed_val, "state": "M"}))
        );
    }
}

/// The scripted walk of the cache issue: M at the writer, S at both after a read
/// elsewhere, I elsewhere after a write, a miss for a key nowhere, E for a read of an
/// evicted key, a write to an owned line with no directory traffic, E after a durable
/// put, and a miss everywhere after a TTL.
#[test]
fn the_mesi_walk_over_http() {
    let mut c = TestCluster::start("cache-walk", 3);
    c.wait_for_leader(Duration::from_secs(10));
    let n: Vec<SocketAddr> = c.nodes.iter().map(|n| n.http).collect();
    assert_eq!(
        put(n[0], "k", json!("one")),
        json!({"ok": true, "state": "M"})
    );
    assert_eq!(states(n[1], "k"), ["M", "I", "I"]);
    assert_eq!(
        get(n[1], "k"),
        json!({"hit": true, "val": "one", "state": "S"})
    );
    assert_eq!(states(n[2], "k"), ["S", "S", "I"]);
    assert_eq!(
        put(n[2], "k", json!("three")),
        json!({"ok": true, "state": "M"})
    );
    assert_eq!(states(n[0], "k"), ["I", "I", "M"]);
    assert_eq!(
        get(n[0], "k"),
        json!({"hit": true, "val": "three", "state": "S"})
    );
    assert_eq!(
        get(n[1], "nowhere"),
        json!({"hit": false, "val": null, "state": "I"})
    );
    // Put at node2, evicted there, read at node1: E with the written-back value.
    put(n[1], "e", json!({"v": 1}));
    let (status, body) = post(n[1], "/cache/evict", &json!({"key": "e"}));
    assert_eq!(
        (status, &body["ok"], &body["was"]),
        (200, &json!(true), &json!("M"))
    );
    assert_eq!(states(n[0], "e"), ["I", "I", "I"]);
    assert_eq!(
        get(n[0], "e"),
        json!({"hit": true, "val": {"v": 1}, "state": "E"})
    );
    // A put at node1 on it is M with no directory traffic (`node` picks the cache).
    let before = stat(n[2], "node1", "directory_requests");
    let local_before = stat(n[2], "node1", "local_puts");
    let (status, body) = post(
        n[2],
        "/cache/put",
        &json!({"key": "e", "val": 2, "node": "node1"}),
    );
    assert_eq!((status, body), (200, json!({"ok": true, "state": "M"})));
    assert_eq!(
        stat(n[2], "node1", "directory_requests"),
        before,
        "no directory request"
    );
    assert_eq!(stat(n[2], "node1", "local_puts"), local_before + 1);
    // A durable put leaves E.
    let (status, body) = post(
        n[0],
        "/cache/put",
        &json!({"key": "d", "val": 5, "durable": true}),
    );
    assert_eq!((status, body), (200, json!({"ok": true, "state": "E"})));
    // The REST aliases.
    let (status, _) = http(n[0], "PUT", "/cache/rest", br#"{"a": [1, 2]}"#);
    assert_eq!(status, 200);
    let (status, body) = http(n[1], "GET", "/cache/rest", b"");
    assert_eq!(
        (status, body),
        (
            200,
            json!({"hit": true, "val": {"a": [1, 2]}, "state": "S"})
        )
    );
    let (status, _) = http(n[1], "DELETE", "/cache/rest", b"");
    assert_eq!(status, 200);
    for at in &n {
        let (_, body) = http(*at, "GET", "/cache/rest", b"");
        assert_eq!(body["hit"], false, "deleted everywhere: {body}");
    }
    // A TTL makes the key a miss everywhere; the value before it does not come back.
    put(n[0], "t", json!("old"));
    let (status, _) = post(
        n[0],
        "/cache/put",
        &json!({"key": "t", "val": "new", "ttl_ms": 800}),
    );
    assert_eq!(status, 200);
    assert_eq!(get(n[1], "t")["val"], "new");
    let miss = json!({"hit": false, "val": null, "state": "I"});
    eventually(
        "the TTL to end the key everywhere",
        Duration::from_secs(5),
        || n.iter().all(|at| get(*at, "t") == miss),
    );
    for at in &n {
        assert_eq!(get(*at, "t"), miss, "and it stays gone");
    }
    assert!(stat(n[0], "node1", "invalidations") >= 1);
    assert!(stat(n[0], "node2", "writebacks") >= 1);
}

#[test]
fn bad_cache_input_gets_its_documented_4xx() {
    let mut c = TestCluster::start("cache-bad", 3);
    c.wait_for_leader(Duration::from_secs(10));
    let at = c.nodes[0].http;
    let long_key = "k".repeat(2_000);
    for (path, body, status, code) in [
        (
            "/cache/put",
            r#"{"key": "a"}"#.to_string(),
            400,
            "invalid_request",
        ),
        (
            "/cache/put",
            r#"{"val": 1}"#.to_string(),
            400,
            "invalid_request",
        ),
        (
            "/cache/put",
            r#"{"key": "", "val": 1}"#.to_string(),
            400,
            "invalid_key",
        ),
        (
            "/cache/put",
            format!(r#"{{"key": "{long_key}", "val": 1}}"#),
            400,
            "invalid_key",
        ),
        (
            "/cache/put",
            r#"{"key": "a", "val": 1, "ttl_ms": 0}"#.to_string(),
            400,
            "invalid_ttl",
        ),
        (
            "/cache/put",
            r#"{"key": "a", "val": 1, "node": "node9"}"#.to_string(),
            400,
            "unknown_node",
        ),
        (
            "/cache/get",
            r#"{"key": "a", "node": "nodeX"}"#.to_string(),
            400,
            "unknown_node",
        ),
        ("/cache/get", "{not json".to_string(), 400, "malformed_json"),
        ("/cache/get", String::new(), 400, "malformed_json"),
        (
            "/cache/evict",
            r#"{"key": 5}"#.to_string(),
            400,
            "invalid_request",
        ),
    ] {
        let (got, reply) = http(at, "POST", path, body.as_bytes());
        assert_eq!(
            (got, reply["error"]["code"].as_str().unwrap_or("")),
            (status, code),
            "{path} {body:.60}: {reply}"
        );
        assert_eq!(reply["ok"], false);
    }
    let big = format!(r#"{{"key": "a", "val": "{}"}}"#, "x".repeat(1 << 20));
    let (got, _) = http(at, "POST", "/cache/put", big.as_bytes());
    assert_eq!(got, 413);
    let (got, reply) = http(at, "GET", "/cache/state", b"");
    assert_eq!((got, &reply["error"]["code"]), (400, &json!("invalid_key")));
    // A key in the path that is not UTF-8 once decoded.
    let (got, reply) = http(at, "GET", "/cache/%FF%FE", b"");
    assert_eq!(
        (got, &reply["error"]["code"]),
        (400, &json!("invalid_path")),
        "{reply}"
    );
    // A query string that does not parse gets the JSON error body too, not plain text.
    for path in ["/cache/a?ttl_ms=soon", "/cache/a?durable=maybe"] {
        let (got, reply) = http(at, "PUT", path, b"1");
        assert_eq!(
            (got, &reply["error"]["code"]),
            (400, &json!("invalid_query")),
            "{path}: {reply}"
        );
    }
}

/// A writer that keeps putting `keys` at `at` (values 1, 2, ... round the keys, every
/// eighth one a durable put to `durable_key`) until `stop` is set or its node stops
/// answering; every acknowledged put with when it was acknowledged.
fn writer(
    at: SocketAddr,
    keys: &'static [&'static str],
    durable_key: &'static str,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    acks: std::sync::Arc<std::sync::atomic::AtomicUsize>,
) -> std::thread::JoinHandle<Vec<(&'static str, u64, Instant)>> {
    std::thread::spawn(move || {
        let agent = agent(Duration::from_secs(3));
        let mut acked = Vec::new();
        let mut failures = 0;
        for v in 1u64.. {
            if stop.load(std::sync::atomic::Ordering::Relaxed) || failures > 20 {
                break;
            }
            let durable = v.is_multiple_of(8);
            let key = if durable {
                durable_key
            } else {
                keys[(v as usize) % keys.len()]
            };
            let body = json!({"key": key, "val": v, "durable": durable}).to_string();
            let url = format!("http://{at}/cache/put");
            match agent.post(&url).send(body.as_bytes()) {
                Ok(r) if r.status() == 200 => {
                    acked.push((key, v, Instant::now()));
                    acks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                other => {
                    if failures == 0 {
                        println!("writer at {at}: put {v} failed: {other:?}");
                    }
                    failures += 1;
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
        acked
    })
}

/// A running writer: every acknowledged put, with when.
type Writer = std::thread::JoinHandle<Vec<(&'static str, u64, Instant)>>;

/// A [`writer`] at `at`, once it has 100 acknowledged puts (a kill or a cut before
/// that would test nothing): what stops it, and the writer.
fn start_writer(
    at: SocketAddr,
    keys: &'static [&'static str],
    durable_key: &'static str,
) -> (std::sync::Arc<std::sync::atomic::AtomicBool>, Writer) {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    let stop = Arc::new(AtomicBool::new(false));
    let acks = Arc::new(AtomicUsize::new(0));
    let w = writer(at, keys, durable_key, stop.clone(), acks.clone());
    eventually(
        "the writer's first 100 puts",
        Duration::from_secs(30),
        || acks.load(Ordering::Relaxed) >= 100,
    );
    (stop, w)
}

/// For each key, the value the others read now, and how long the read took.
fn read_back(at: SocketAddr, keys: &[&str], since: Instant) -> Vec<(String, u64, Duration)> {
    keys.iter()
        .map(|key| {
            let body = get(at, key);
            let v = body["val"].as_u64().unwrap_or(0);
            (key.to_string(), v, since.elapsed())
        })
        .collect()
}

/// Acknowledged write-back puts newer than what was read: (count, the oldest one's age
/// at `cut`, its age at the writer's last acknowledged write-back put). A node
/// acknowledges a write-back put only while its oldest write not yet written back is
/// younger than the window, so every lost put was acknowledged at most one window (and
/// a response's trip) before the last acknowledgement, however late the kill or the cut
/// came after it.
fn lost_puts(
    acked: &[(&'static str, u64, Instant)],
    read: &[(String, u64, Duration)],
    cut: Instant,
) -> (usize, Duration, Duration) {
    let last = acked
        .iter()
        .filter(|a| read.iter().any(|(key, _, _)| key == a.0))
        .map(|a| a.2)
        .max()
        .unwrap_or(cut);
    let (mut lost, mut oldest, mut before_last) = (0, Duration::ZERO, Duration::ZERO);
    for (key, v, _) in read {
        for (k, av, at) in acked {
            if k == key && av > v {
                lost += 1;
                oldest = oldest.max(cut.saturating_duration_since(*at));
                before_last = before_last.max(last.saturating_duration_since(*at));
            }
        }
    }
    (lost, oldest, before_last)
}

/// The write-back window the test cluster runs with, and what a response's trip may add.
const WINDOW: Duration = Duration::from_millis(100);
const SLACK: Duration = Duration::from_millis(150);
/// How long a read at a surviving node may take: the writer's lease (2 s) runs out
/// with its clock margin, then the directory takes the key back.
const WITHIN_LEASE: Duration = Duration::from_millis(3_000);

/// The durable puts to `key` among `acked` were none of them lost: the others read the
/// last acknowledged one or a later durable put of the writer's (sent, its answer lost
/// to the kill or the cut).
fn check_durable(reader: SocketAddr, key: &str, acked: &[(&'static str, u64, Instant)]) {
    let last = acked
        .iter()
        .filter(|a| a.0 == key)
        .map(|a| a.1)
        .max()
        .expect("durable puts were acknowledged");
    let read = get(reader, key)["val"].as_u64().unwrap_or(0);
    assert!(
        read >= last && read.is_multiple_of(8),
        "{key}: read {read}, the last acknowledged durable put was {last}"
    );
}

/// DESIGN section 6 with real processes: a writer holding lines in M is killed (-9), and
/// another is cut off from its peers (a test-only switch on its links). The other nodes
/// read, within the lease time, the last acknowledged durable value and, for write-back
/// puts, a value at most one write-back window old; the cut-off writer stops
/// acknowledging within that window.
#[test]
fn a_killed_or_cut_off_writer_loses_at_most_its_write_back_window() {
    use std::sync::atomic::Ordering;
    let mut c = TestCluster::start("cache-faults", 3);
    for i in 0..3 {
        c.kill9(i);
        c.start_node_with_env(i, &[("SYNCMESH_FAULT_INJECTION", "1".to_string())]);
    }
    let (leader, _) = c.wait_for_leader(Duration::from_secs(10));
    let followers: Vec<usize> = (0..3).filter(|&i| i != leader).collect();
    let (killed, cut) = (followers[0], followers[1]);
    let reader = c.nodes[leader].http;
    for node in &c.nodes {
        let at = node.http;
        eventually(
            "every node to serve its cache",
            Duration::from_secs(10),
            || post(at, "/cache/get", &json!({"key": "warm"})).0 == 200,
        );
    }

    // kill -9 while it writes back, and puts durably now and then.
    const KILL_KEYS: &[&str] = &["k1", "k2", "k3", "k4"];
    // (Its node is killed under it: it stops by itself.)
    let (_stop, w) = start_writer(c.nodes[killed].http, KILL_KEYS, "durable-k");
    c.kill9(killed);
    let killed_at = Instant::now();
    let acked = w.join().expect("writer");
    assert!(
        acked.len() >= 100,
        "the writer was acknowledged: {}",
        acked.len()
    );
    // Counted from the kill: the key is the others' again once the killed node's lease
    // ran out, however long the writer took to notice.
    let read = read_back(reader, KILL_KEYS, killed_at);
    check_durable(reader, "durable-k", &acked);
    for (key, v, took) in &read {
        println!("kill -9: {key} read {v}, {took:?} after the kill");
        assert!(
            *took < WITHIN_LEASE,
            "{key} read in {took:?}, within the lease"
        );
        assert!(*v > 0, "{key}: some write-back arrived before the kill");
    }
    let (lost, oldest, before_last) = lost_puts(&acked, &read, killed_at);
    println!(
        "kill -9: {lost} of {} acknowledged write-back puts lost, the oldest acknowledged \
         {oldest:?} before the kill and {before_last:?} before the last acknowledgement \
         (window {WINDOW:?})",
        acked.len()
    );
    assert!(
        before_last < WINDOW + SLACK,
        "lost puts are within the window: {before_last:?}"
    );

    // Back to three nodes (the restarted one holds every line I), so that cutting one
    // off leaves a quorum.
    c.start_node_with_env(killed, &[("SYNCMESH_FAULT_INJECTION", "1".to_string())]);
    c.wait_for_leader(Duration::from_secs(10));
    let restarted = c.nodes[killed].http;
    eventually(
        "the restarted node to serve its cache",
        Duration::from_secs(10),
        || post(restarted, "/cache/get", &json!({"key": "k1"})).0 == 200,
    );
    assert_eq!(
        post(restarted, "/cache/get", &json!({"key": "k1"})).1["val"],
        read[0].1,
        "the restarted node reads what the others read"
    );

    // Cut off from its peers while it writes: it stops acknowledging within the window.
    const CUT_KEYS: &[&str] = &["p1", "p2", "p3"];
    let (stop, w) = start_writer(c.nodes[cut].http, CUT_KEYS, "durable-p");
    let (status, _) = http(c.nodes[cut].admin, "POST", "/fault/isolate", b"");
    assert_eq!(status, 200, "fault injection is on");
    let cut_at = Instant::now();
    std::thread::sleep(Duration::from_millis(3_000));
    stop.store(true, Ordering::Relaxed);
    let acked = w.join().expect("writer");
    let last_ack = acked.last().map(|a| a.2).expect("acknowledged puts");
    let acked_after = last_ack.saturating_duration_since(cut_at);
    assert!(
        acked_after < WINDOW + SLACK + Duration::from_millis(250),
        "the cut-off node stopped acknowledging within the window ({acked_after:?} after the cut)"
    );
    // (Counted from the reads: the lease ran out during the sleep.)
    let read = read_back(reader, CUT_KEYS, Instant::now());
    check_durable(reader, "durable-p", &acked);
    for (key, v, took) in &read {
        println!("cut off: {key} read {v} in {took:?}");
        assert!(
            *took < WITHIN_LEASE,
            "{key} read in {took:?}, within the lease"
        );
    }
    let (lost, oldest, before_last) = lost_puts(&acked, &read, cut_at);
    println!(
        "cut off: {lost} of {} acknowledged write-back puts lost, the oldest acknowledged \
         {oldest:?} before the cut and {before_last:?} before the last acknowledgement; the \
         last ack came {acked_after:?} after the cut (window {WINDOW:?})",
        acked.len()
    );
    assert!(
        before_last < WINDOW + SLACK,
        "lost puts are within the window: {before_last:?}"
    );
    // Healed, the node drops what it lost and reads what the others read.
    let (status, _) = http(c.nodes[cut].admin, "POST", "/fault/heal", b"");
    assert_eq!(status, 200);
    eventually(
        "the healed node to read what the others read",
        Duration::from_secs(10),
        || {
            CUT_KEYS
                .iter()
                .zip(&read)
                .all(|(key, (_, v, _))| get(c.nodes[cut].http, key)["val"].as_u64() == Some(*v))
        },
    );
}
