//! The gateway's HTTP contract (DESIGN.md section 4) against a real cluster.

use crate::support::{http, TestCluster};
use serde_json::Value;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

fn post(gw: SocketAddr, path: &str, body: &str) -> (u16, Value) {
    http(gw, "POST", path, body.as_bytes())
}

fn acquire(gw: SocketAddr, key: &str, client: &str, mode: &str, wait_ms: u64) -> (u16, Value) {
    let body = format!(
        r#"{{"key": "{key}", "mode": "{mode}", "client_id": "{client}", "wait_ms": {wait_ms}}}"#
    );
    post(gw, "/lock/acquire", &body)
}

fn release(gw: SocketAddr, key: &str, client: &str) -> (u16, Value) {
    post(
        gw,
        "/lock/release",
        &format!(r#"{{"key": "{key}", "client_id": "{client}"}}"#),
    )
}

fn code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("")
}

/// Start an acquire in the background; give it time to queue before the next one.
fn acquire_later(
    gw: SocketAddr,
    key: &str,
    client: &str,
    mode: &str,
    wait_ms: u64,
) -> std::thread::JoinHandle<(u16, Value)> {
    let (key, client, mode) = (key.to_string(), client.to_string(), mode.to_string());
    let handle = std::thread::spawn(move || acquire(gw, &key, &client, &mode, wait_ms));
    std::thread::sleep(Duration::from_millis(150));
    handle
}

#[test]
fn the_seed_requests_work_byte_for_byte() {
    let mut c = TestCluster::start("gw-seed", 3);
    c.wait_for_leader(Duration::from_secs(10));
    let gw = c.start_gateway();
    let (status, health) = http(gw, "GET", "/health", b"");
    assert_eq!(status, 200);
    assert_eq!(health["ok"], true);
    assert!(
        health["id"].is_string() && health["role"].is_u64() && health["term"].is_u64(),
        "{health}"
    );
    assert!(health["leader"].is_string(), "{health}");
    let (status, body) = post(
        gw,
        "/lock/acquire",
        r#"{"key": "A", "mode": "X", "client_id": "client1"}"#,
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["ok"], true);
    assert!(body["token"].as_u64().is_some_and(|t| t > 0), "{body}");
    let (status, body) = post(
        gw,
        "/lock/release",
        r#"{"key": "A", "client_id": "client1"}"#,
    );
    assert_eq!((status, body), (200, serde_json::json!({"ok": true})));
}

#[test]
fn locks_follow_the_compatibility_matrix_fifo_and_fencing_order() {
    let mut c = TestCluster::start("gw-locks", 3);
    c.wait_for_leader(Duration::from_secs(10));
    let gw = c.start_gateway();
    // S + S granted; S + X and X + X refused with the holders named.
    assert_eq!(acquire(gw, "m", "a", "S", 0).0, 200);
    assert_eq!(acquire(gw, "m", "b", "S", 0).0, 200);
    let (status, body) = acquire(gw, "m", "c", "X", 0);
    assert_eq!((status, code(&body)), (409, "conflict"), "{body}");
    assert_eq!(body["error"]["holders"].as_array().map(Vec::len), Some(2));
    assert_eq!(acquire(gw, "x", "a", "X", 0).0, 200);
    assert_eq!(code(&acquire(gw, "x", "b", "X", 0).1), "conflict");

    // FIFO: a waiting X is not passed by later S requests, which then go together.
    let (_, first) = acquire(gw, "f", "holder", "S", 0);
    let w1 = acquire_later(gw, "f", "w1", "X", 20_000);
    let w2 = acquire_later(gw, "f", "w2", "S", 20_000);
    let w3 = acquire_later(gw, "f", "w3", "S", 20_000);
    let (_, state) = http(gw, "GET", "/lock/state?key=f", b"");
    let order: Vec<&str> = state["waiters"]
        .as_array()
        .expect("waiters")
        .iter()
        .filter_map(|w| w["client_id"].as_str())
        .collect();
    assert_eq!(order, ["w1", "w2", "w3"], "{state}");
    assert_eq!(release(gw, "f", "holder").0, 200);
    let (status, granted1) = w1.join().expect("w1");
    assert_eq!(status, 200, "{granted1}");
    assert!(
        granted1["token"].as_u64() > first["token"].as_u64(),
        "fencing tokens increase"
    );
    assert_eq!(release(gw, "f", "w1").0, 200);
    for w in [w2, w3] {
        let (status, body) = w.join().expect("S waiter");
        assert_eq!(status, 200, "{body}");
        assert!(body["token"].as_u64() > granted1["token"].as_u64());
    }
}

#[test]
fn waits_time_out_leases_expire_and_deadlocks_are_refused() {
    let mut c = TestCluster::start("gw-time", 3);
    c.wait_for_leader(Duration::from_secs(10));
    let gw = c.start_gateway();
    // Timeout.
    assert_eq!(acquire(gw, "t", "holder", "X", 0).0, 200);
    let started = Instant::now();
    let (status, body) = acquire(gw, "t", "late", "X", 300);
    assert_eq!((status, code(&body)), (409, "timeout"), "{body}");
    assert!(started.elapsed() >= Duration::from_millis(300));
    // An expired lease releases the lock and wakes the waiter.
    let (status, _) = post(
        gw,
        "/lock/acquire",
        r#"{"key": "l", "mode": "X", "client_id": "brief", "ttl_ms": 400}"#,
    );
    assert_eq!(status, 200);
    let started = Instant::now();
    let (status, body) = acquire(gw, "l", "patient", "X", 10_000);
    assert_eq!(status, 200, "{body}");
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "granted only once the lease ran out"
    );
    assert_eq!(code(&release(gw, "l", "brief").1), "not_held");
    // Two clients.
    assert_eq!(acquire(gw, "d1", "p", "X", 0).0, 200);
    assert_eq!(acquire(gw, "d2", "q", "X", 0).0, 200);
    let p_waits = acquire_later(gw, "d2", "p", "X", 5_000);
    let (status, body) = acquire(gw, "d1", "q", "X", 5_000);
    assert_eq!((status, code(&body)), (409, "deadlock"), "{body}");
    assert_eq!(body["error"]["cycle"], serde_json::json!(["q", "p", "q"]));
    assert_eq!(release(gw, "d2", "q").0, 200);
    assert_eq!(
        p_waits.join().expect("p").0,
        200,
        "after q gives up d2, p gets it"
    );
    // Three clients.
    for (key, client) in [("e1", "u"), ("e2", "v"), ("e3", "w")] {
        assert_eq!(acquire(gw, key, client, "X", 0).0, 200);
    }
    let _u = acquire_later(gw, "e2", "u", "X", 2_000);
    let _v = acquire_later(gw, "e3", "v", "X", 2_000);
    let (status, body) = acquire(gw, "e1", "w", "X", 2_000);
    assert_eq!((status, code(&body)), (409, "deadlock"), "{body}");
    assert_eq!(
        body["error"]["cycle"],
        serde_json::json!(["w", "u", "v", "w"])
    );
}

#[test]
fn bad_requests_get_their_documented_status_and_the_cluster_keeps_serving() {
    let mut c = TestCluster::start("gw-bad", 3);
    c.wait_for_leader(Duration::from_secs(10));
    let gw = c.start_gateway();
    let long_key = "k".repeat(10 * 1024);
    let cases: Vec<(String, u16, &str)> = vec![
        (
            r#"{"key": "A", "client_id": "c1""#.into(),
            400,
            "malformed_json",
        ),
        ("".into(), 400, "malformed_json"),
        (
            r#"{"key": 5, "mode": "X", "client_id": "c1"}"#.into(),
            400,
            "invalid_request",
        ),
        (
            r#"{"key": "A", "mode": "X"}"#.into(),
            400,
            "invalid_request",
        ),
        (
            r#"{"key": "A", "mode": "Q", "client_id": "c1"}"#.into(),
            400,
            "invalid_mode",
        ),
        (
            r#"{"key": "", "mode": "X", "client_id": "c1"}"#.into(),
            400,
            "invalid_key",
        ),
        (
            format!(r#"{{"key": "{long_key}", "mode": "X", "client_id": "c1"}}"#),
            400,
            "invalid_key",
        ),
        (
            format!(
                r#"{{"key": "A", "mode": "X", "client_id": "{}"}}"#,
                "x".repeat(2 << 20)
            ),
            413,
            "body_too_large",
        ),
    ];
    for (body, status, expected) in cases {
        let (got, json) = post(gw, "/lock/acquire", &body);
        assert_eq!(
            (got, code(&json)),
            (status, expected),
            "body starting {:?}",
            &body[..body.len().min(60)]
        );
        assert_eq!(json["ok"], false);
    }
    let (status, json) = release(gw, "never", "c1");
    assert_eq!((status, code(&json)), (409, "not_held"));
    assert_eq!(http(gw, "GET", "/no/such/route", b"").0, 404);
    assert_eq!(http(gw, "GET", "/openapi.json", b"").0, 200);
    // Still serving.
    assert_eq!(acquire(gw, "after", "c1", "X", 0).0, 200);
    let metrics = crate::support::http_get(gw, "/metrics")
        .map(|(_, b)| b)
        .unwrap_or_default();
    assert!(
        metrics.contains(
            "http_request_duration_seconds_count{route=\"/lock/acquire\",status=\"400\"}"
        ),
        "{metrics}"
    );
    assert!(metrics.contains("lock_held{mode=\"X\"} 1"), "{metrics}");
    assert!(metrics.contains("lock_waiters 0"), "{metrics}");
}
