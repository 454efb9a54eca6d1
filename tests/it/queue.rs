//! The queue's HTTP contract (DESIGN.md section 4) against a real cluster: the seed's
//! requests, redelivery after a lease runs out, dead letters, long polls, bad input.

use crate::support::{eventually, http, TestCluster};
use serde_json::Value;
use std::net::SocketAddr;
use std::time::Duration;

fn post(gw: SocketAddr, path: &str, body: &str) -> (u16, Value) {
    http(gw, "POST", path, body.as_bytes())
}

fn code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("")
}

#[test]
fn seed_queue_requests_redelivery_dead_letters_and_long_polls() {
    let mut c = TestCluster::start("queue-seed", 3);
    c.wait_for_leader(Duration::from_secs(10));
    let gw = c.start_gateway();

    // The seed's requests, unchanged.
    let (status, enq) = post(gw, "/queue/enq", r#"{"key": "user:42", "value": "hello"}"#);
    assert_eq!(status, 200, "{enq}");
    assert_eq!(enq["ok"], true);
    assert!(enq["partition"].is_u64(), "{enq}");
    let id = enq["msg_id"].as_str().expect("msg_id").to_string();
    let (status, deq) = http(gw, "POST", "/queue/deq", b"");
    assert_eq!(status, 200, "{deq}");
    assert_eq!(deq["msg_id"], id.as_str());
    assert_eq!(deq["payload"]["key"], "user:42");
    assert_eq!(deq["payload"]["value"], "hello");
    assert_eq!(deq["deliveries"], 1);
    let (status, ack) = post(gw, "/queue/ack", &format!(r#"{{"msg_id": "{id}"}}"#));
    assert_eq!((status, &ack["ok"]), (200, &Value::Bool(true)), "{ack}");
    let (status, again) = post(gw, "/queue/ack", &format!(r#"{{"msg_id": "{id}"}}"#));
    assert_eq!(status, 404, "{again}");
    let (status, empty) = http(gw, "POST", "/queue/deq", b"");
    assert_eq!(status, 200);
    assert!(
        empty["msg_id"].is_null() && empty["payload"].is_null(),
        "{empty}"
    );
    assert_eq!(empty["empty"], true);

    // Other implementations' names: `body`, /queue/enqueue, /queue/dequeue, message_id.
    let (status, enq) = post(
        gw,
        "/queue/enqueue",
        r#"{"key": "k", "body": {"n": 1, "a": [true, null]}}"#,
    );
    assert_eq!(status, 200, "{enq}");
    let (_, deq) = http(gw, "POST", "/queue/dequeue", b"{}");
    assert_eq!(deq["payload"]["body"]["a"][0], true, "{deq}");
    let mid = deq["message_id"].as_str().expect("message_id").to_string();
    let (status, _) = post(gw, "/queue/ack", &format!(r#"{{"message_id": "{mid}"}}"#));
    assert_eq!(status, 200);

    // A consumer that dies without acking: redelivered after its lease, payload intact;
    // its old receipt is stale. After max_deliveries it is a dead letter; requeue.
    let (status, made) = post(
        gw,
        "/queue/create",
        r#"{"queue": "jobs", "partitions": 4, "max_deliveries": 2}"#,
    );
    assert_eq!(status, 200, "{made}");
    // A later create changes what it names and keeps the rest.
    let (status, again) = post(
        gw,
        "/queue/create",
        r#"{"queue": "jobs", "visibility_ms": 20000}"#,
    );
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["settings"]["max_deliveries"], 2, "{again}");
    assert_eq!(again["settings"]["partitions"], 4, "{again}");
    assert_eq!(again["settings"]["visibility_ms"], 20000, "{again}");
    post(
        gw,
        "/queue/enq",
        r#"{"queue": "jobs", "key": "p", "value": {"poison": true}}"#,
    );
    let deq_jobs = r#"{"queue": "jobs", "visibility_ms": 300}"#;
    let (_, first) = post(gw, "/queue/deq", deq_jobs);
    assert_eq!(first["deliveries"], 1, "{first}");
    let mut second = Value::Null;
    eventually(
        "the lease to run out and redeliver",
        Duration::from_secs(5),
        || {
            second = post(gw, "/queue/deq", deq_jobs).1;
            !second["msg_id"].is_null()
        },
    );
    assert_eq!(second["msg_id"], first["msg_id"]);
    assert_eq!(second["deliveries"], 2);
    assert_eq!(second["payload"]["value"]["poison"], true);
    let stale = format!(
        r#"{{"queue": "jobs", "msg_id": {}, "receipt": {}}}"#,
        first["msg_id"], first["receipt"]
    );
    let (status, refused) = post(gw, "/queue/ack", &stale);
    assert_eq!(
        (status, code(&refused)),
        (409, "stale_receipt"),
        "{refused}"
    );
    eventually(
        "the message to reach the dead letters",
        Duration::from_secs(5),
        || {
            let (_, dead) = http(gw, "GET", "/queue/dead?queue=jobs", b"");
            dead["dead"].as_array().is_some_and(|d| d.len() == 1)
        },
    );
    let (status, requeued) = post(gw, "/queue/dead/requeue", r#"{"queue": "jobs"}"#);
    assert_eq!(
        (status, &requeued["requeued"]),
        (200, &Value::from(1)),
        "{requeued}"
    );
    // Back with its payload; the count goes on from the two deliveries it had.
    let (_, back) = post(gw, "/queue/deq", deq_jobs);
    assert_eq!(
        (&back["msg_id"], &back["deliveries"]),
        (&first["msg_id"], &Value::from(3))
    );
    assert_eq!(back["payload"]["value"]["poison"], true);

    // A long poll is answered by the enqueue that makes a message visible.
    let poll = std::thread::spawn(move || post(gw, "/queue/deq", r#"{"wait_ms": 20000}"#));
    eventually("the dequeue to wait", Duration::from_secs(5), || {
        let (_, stats) = http(gw, "GET", "/queue/stats", b"");
        stats["queues"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|q| q["queue"] == "default" && q["waiters"] == 1)
    });
    post(gw, "/queue/enq", r#"{"key": "late", "value": 7}"#);
    let (status, woken) = poll.join().expect("poll thread");
    assert_eq!(status, 200, "{woken}");
    assert_eq!(woken["payload"]["value"], 7);

    // Deduplication: the same dedup_id (or Idempotency-Key) is stored once.
    let (_, a) = post(
        gw,
        "/queue/enq",
        r#"{"key": "d", "value": 1, "dedup_id": "order-9"}"#,
    );
    let (_, b) = post(
        gw,
        "/queue/enq",
        r#"{"key": "d", "value": 1, "dedup_id": "order-9"}"#,
    );
    assert_eq!(a["msg_id"], b["msg_id"]);
    assert_eq!(b["duplicate"], true);

    // A batch is one commit; stats show the ring and every partition.
    let (status, batch) = post(
        gw,
        "/queue/enq",
        r#"[{"key": "b1", "value": 1}, {"key": "b2", "value": 2}, {"key": "b3", "value": 3}]"#,
    );
    assert_eq!(status, 200, "{batch}");
    assert_eq!(batch["msg_ids"].as_array().map(Vec::len), Some(3));
    let (_, many) = post(gw, "/queue/deq", r#"{"max": 10}"#);
    assert_eq!(many["messages"].as_array().map(Vec::len), Some(4), "{many}");
    let (_, stats) = http(gw, "GET", "/queue/stats", b"");
    assert_eq!(
        stats["ring"]["points"].as_array().map(Vec::len),
        Some(16 * 64)
    );
    let default = stats["queues"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|q| q["queue"] == "default")
        .expect("default queue in stats");
    assert_eq!(default["partitions"].as_array().map(Vec::len), Some(16));
    // The four just leased and the one the long poll got.
    assert_eq!(default["inflight"], 5);

    // 32 producers enqueue 25 single messages each, waiting for every answer: the
    // gateway proposes what arrives together as one batch, and still each message has
    // its own id, is stored once, and keeps its producer's order.
    let producers: Vec<_> = (0..32)
        .map(|p| {
            std::thread::spawn(move || {
                let agent = crate::support::agent(Duration::from_secs(30));
                (0..25)
                    .map(|i| {
                        let body =
                            format!(r#"{{"queue": "grouped", "key": "p{p}", "value": {i}}}"#);
                        let (status, v) = crate::support::http_on(
                            &agent,
                            gw,
                            "POST",
                            "/queue/enq",
                            body.as_bytes(),
                        );
                        assert_eq!(status, 200, "{v}");
                        v["msg_id"].as_str().expect("msg_id").to_string()
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let ids: Vec<String> = producers
        .into_iter()
        .flat_map(|t| t.join().expect("producer"))
        .collect();
    let distinct: std::collections::BTreeSet<&String> = ids.iter().collect();
    assert_eq!(distinct.len(), 800, "one id per message");
    let mut next = std::collections::BTreeMap::new();
    let mut seen = 0;
    loop {
        let (_, got) = post(gw, "/queue/deq", r#"{"queue": "grouped", "max": 100}"#);
        let Some(messages) = got["messages"].as_array().filter(|m| !m.is_empty()) else {
            break;
        };
        for m in messages {
            let key = m["payload"]["key"].as_str().expect("key").to_string();
            let value = m["payload"]["value"].as_u64().expect("value");
            let expect = next.entry(key.clone()).or_insert(0);
            assert_eq!(value, *expect, "{key} in its producer's order");
            *expect += 1;
            seen += 1;
        }
    }
    assert_eq!(seen, 800, "every message once");
    let metrics = crate::support::http_get(gw, "/metrics").expect("metrics").1;
    let metric = |name: &str| {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let (proposals, messages) = (
        metric("gateway_enqueue_group_messages_count"),
        metric("gateway_enqueue_group_messages_sum"),
    );
    assert!(messages >= 800.0, "{metrics}");
    assert!(
        proposals < messages,
        "concurrent enqueues shared proposals: {proposals} for {messages}"
    );
}

#[test]
fn bad_queue_input_gets_its_documented_error() {
    let mut c = TestCluster::start("queue-bad", 3);
    c.wait_for_leader(Duration::from_secs(10));
    let gw = c.start_gateway();
    let big = format!(r#"{{"key": "k", "value": "{}"}}"#, "x".repeat(300 * 1024));
    let cases: Vec<(&str, String, u16, &str)> = vec![
        ("/queue/enq", r#"{"value": "v"}"#.into(), 400, "invalid_key"),
        (
            "/queue/enq",
            r#"{"key": "", "value": "v"}"#.into(),
            400,
            "invalid_key",
        ),
        ("/queue/enq", r#"{"key": "k"}"#.into(), 400, "invalid_value"),
        ("/queue/enq", "not json".into(), 400, "malformed_json"),
        ("/queue/enq", "[]".into(), 400, "invalid_batch"),
        ("/queue/enq", big, 413, "body_too_large"),
        (
            "/queue/ack",
            r#"{"msg_id": "0-999999"}"#.into(),
            404,
            "not_found",
        ),
        (
            "/queue/ack",
            r#"{"msg_id": "nonsense"}"#.into(),
            400,
            "invalid_msg_id",
        ),
        ("/queue/ack", "{}".into(), 400, "invalid_msg_id"),
        (
            "/queue/nack",
            r#"{"msg_id": "3-999999"}"#.into(),
            404,
            "not_found",
        ),
        (
            "/queue/deq",
            r#"{"visibility_ms": -5}"#.into(),
            400,
            "invalid_request",
        ),
        (
            "/queue/deq",
            r#"{"visibility_ms": 99999999999}"#.into(),
            400,
            "invalid_request",
        ),
        ("/queue/deq", r#"{"max": 0}"#.into(), 400, "invalid_max"),
        (
            "/queue/deq",
            r#"{"max": 100000}"#.into(),
            400,
            "invalid_max",
        ),
        (
            "/queue/deq",
            r#"{"wait_ms": 600000}"#.into(),
            400,
            "invalid_wait",
        ),
        (
            "/queue/deq",
            r#"{"queue": "no spaces"}"#.into(),
            400,
            "invalid_queue",
        ),
        (
            "/queue/extend",
            r#"{"msg_id": "0-1"}"#.into(),
            400,
            "invalid_visibility",
        ),
        (
            "/queue/create",
            r#"{"queue": "q", "partitions": 100000}"#.into(),
            400,
            "invalid_request",
        ),
        (
            "/queue/limits",
            r#"{"max_msgs": 5}"#.into(),
            400,
            "invalid_request",
        ),
        (
            "/queue/limits",
            r#"{"max_messages": 0}"#.into(),
            400,
            "invalid_request",
        ),
    ];
    // An ack that names a message nobody received leaves it queued.
    let (status, v) = post(
        gw,
        "/queue/enq",
        r#"{"queue": "waiting", "key": "k", "value": 1}"#,
    );
    assert_eq!(status, 200, "{v}");
    let id = v["msg_id"].as_str().expect("msg_id").to_owned();
    let ack = format!(r#"{{"queue": "waiting", "msg_id": "{id}"}}"#);
    let (got, v) = post(gw, "/queue/ack", &ack);
    assert_eq!((got, code(&v)), (409, "not_delivered"), "{v}");
    let (status, v) = post(gw, "/queue/deq", r#"{"queue": "waiting"}"#);
    assert_eq!(
        (status, v["msg_id"].as_str()),
        (200, Some(id.as_str())),
        "{v}"
    );
    // The caps over all queues are set through the log and refuse the same enqueue.
    let (status, v) = post(gw, "/queue/limits", r#"{"max_messages": 1}"#);
    assert_eq!((status, v["max_messages"].as_u64()), (200, Some(1)), "{v}");
    let (got, v) = post(gw, "/queue/enq", r#"{"key": "k", "value": 2}"#);
    assert_eq!((got, code(&v)), (429, "queue_full"), "{v}");
    let (status, v) = post(gw, "/queue/limits", r#"{"max_messages": 1000}"#);
    assert_eq!(status, 200, "{v}");
    for (path, body, status, want) in cases {
        let (got, v) = post(gw, path, &body);
        assert_eq!((got, code(&v)), (status, want), "{path} {body:.80} -> {v}");
    }
    // The cluster keeps serving.
    let (status, v) = post(gw, "/queue/enq", r#"{"key": "k", "value": "still here"}"#);
    assert_eq!(status, 200, "{v}");
}

/// Messages in the kill -9 test: `SYNCMESH_QUEUE_SOAK_MESSAGES`, default 20,000 (CI's
/// soak runs 100,000).
/// A message count from the environment (the soaks of `.ci/run` set more), or `default`.
fn messages_from_env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// Eight producers enqueue while the leader is killed with kill -9 three times; then the
/// whole cluster is killed and started again; consumers drain and ack. Every enqueue
/// that was answered ok is delivered (acknowledged-but-lost must be 0); duplicate
/// deliveries are counted and printed. Producers retry a batch with the same dedup ids,
/// as a careful producer does, so a retry after an unknown outcome is stored once.
#[test]
fn acked_enqueues_survive_leader_kills_and_a_full_restart() {
    const PRODUCERS: usize = 8;
    const BATCH: usize = 10;
    let total = messages_from_env("SYNCMESH_QUEUE_SOAK_MESSAGES", 20_000);
    let mut c = TestCluster::start("queue-kill", 3);
    c.wait_for_leader(Duration::from_secs(10));
    let gw = c.start_gateway();
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let producers: Vec<_> = (0..PRODUCERS)
        .map(|p| {
            let sent = sent.clone();
            std::thread::spawn(move || {
                let mut acked = Vec::new();
                let mine = total / PRODUCERS;
                for start in (0..mine).step_by(BATCH) {
                    let items: Vec<String> = (start..(start + BATCH).min(mine))
                        .map(|i| {
                            format!(
                                r#"{{"key": "k{}", "value": "p{p}-{i}", "dedup_id": "p{p}-{i}"}}"#,
                                i % 50
                            )
                        })
                        .collect();
                    let body = format!("[{}]", items.join(","));
                    let begun = std::time::Instant::now();
                    loop {
                        let (status, v) = post(gw, "/queue/enq", &body);
                        if status == 200 {
                            acked.extend(
                                (start..(start + BATCH).min(mine)).map(|i| format!("p{p}-{i}")),
                            );
                            break;
                        }
                        assert!(
                            matches!(status, 503 | 504)
                                && begun.elapsed() < Duration::from_secs(60),
                            "enqueue answered {status}: {v}"
                        );
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    sent.fetch_add(BATCH, std::sync::atomic::Ordering::Relaxed);
                }
                acked
            })
        })
        .collect();
    for kill in 1..=3 {
        eventually(
            "the producers to progress",
            Duration::from_secs(120),
            || sent.load(std::sync::atomic::Ordering::Relaxed) >= kill * total / 4,
        );
        let (leader, _) = c.wait_for_leader(Duration::from_secs(20));
        c.kill9(leader);
        c.start_node(leader);
    }
    let acked: Vec<String> = producers
        .into_iter()
        .flat_map(|p| p.join().expect("producer"))
        .collect();
    for i in 0..3 {
        c.kill9(i);
    }
    for i in 0..3 {
        c.start_node(i);
    }
    c.wait_for_leader(Duration::from_secs(20));
    let consumers: Vec<_> = (0..4)
        .map(|_| {
            std::thread::spawn(move || {
                let mut got = Vec::new();
                let mut empty_since: Option<std::time::Instant> = None;
                loop {
                    let (status, v) = post(gw, "/queue/deq", r#"{"max": 100, "wait_ms": 200}"#);
                    if status != 200 {
                        std::thread::sleep(Duration::from_millis(50));
                        continue;
                    }
                    let messages = v["messages"].as_array().cloned().unwrap_or_default();
                    if messages.is_empty() {
                        let since = *empty_since.get_or_insert_with(std::time::Instant::now);
                        if since.elapsed() > Duration::from_secs(2) {
                            return got;
                        }
                        continue;
                    }
                    empty_since = None;
                    let ids: Vec<String> =
                        messages.iter().map(|m| m["msg_id"].to_string()).collect();
                    let receipts: Vec<String> =
                        messages.iter().map(|m| m["receipt"].to_string()).collect();
                    let ack = format!(
                        r#"{{"msg_ids": [{}], "receipts": [{}]}}"#,
                        ids.join(","),
                        receipts.join(",")
                    );
                    post(gw, "/queue/ack", &ack);
                    got.extend(
                        messages
                            .iter()
                            .filter_map(|m| m["payload"]["value"].as_str().map(str::to_owned)),
                    );
                }
            })
        })
        .collect();
    let delivered: Vec<String> = consumers
        .into_iter()
        .flat_map(|t| t.join().expect("consumer"))
        .collect();
    let distinct: std::collections::BTreeSet<&String> = delivered.iter().collect();
    let lost: Vec<&String> = acked.iter().filter(|v| !distinct.contains(v)).collect();
    eprintln!(
        "queue kill test: {} enqueues acknowledged, {} deliveries, {} distinct, {} duplicates, {} acknowledged-but-lost",
        acked.len(),
        delivered.len(),
        distinct.len(),
        delivered.len() - distinct.len(),
        lost.len()
    );
    assert!(
        lost.is_empty(),
        "acknowledged but lost: {:?}",
        &lost[..lost.len().min(10)]
    );
    assert_eq!(acked.len(), total / PRODUCERS * PRODUCERS);
}

/// A follower is down while the queue fills with 128-byte messages (100,000 here, a
/// million in `.ci/run`) and the leader compacts its log; started again, it can only
/// catch up by the snapshot. It is shipped in chunks and decoded off the follower's loop:
/// nobody stands for election (no node ever loses its leader, the term stays), and the
/// follower ends with every message.
#[test]
fn a_lagging_follower_catches_up_by_a_big_queue_snapshot_without_an_election() {
    let total = messages_from_env("SYNCMESH_SNAPSHOT_SOAK_MESSAGES", 100_000);
    const BATCH: usize = 1000;
    // A snapshot every quarter of the fill: the leader compacts a few times, and each
    // snapshot holds a large part of the queue.
    let every = (total / BATCH / 4).max(10) as u64;
    let mut c = TestCluster::start_with_snapshots("queue-snap", 3, every);
    let (leader, _) = c.wait_for_leader(Duration::from_secs(10));
    let lagging = (leader + 1) % 3;
    let gw = c.start_gateway();
    c.kill9(lagging);
    let value = format!("\"{}\"", "v".repeat(126));
    let producers: Vec<_> = (0..4)
        .map(|p| {
            let value = value.clone();
            std::thread::spawn(move || {
                let agent = crate::support::agent(Duration::from_secs(60));
                for b in (p * BATCH..total).step_by(4 * BATCH) {
                    let items: Vec<String> = (b..(b + BATCH).min(total))
                        .map(|i| {
                            format!(
                                r#"{{"queue": "big", "key": "k{}", "value": {value}}}"#,
                                i % 64
                            )
                        })
                        .collect();
                    let body = format!("[{}]", items.join(","));
                    let (status, v) =
                        crate::support::http_on(&agent, gw, "POST", "/queue/enq", body.as_bytes());
                    assert_eq!(status, 200, "{v}");
                }
            })
        })
        .collect();
    for p in producers {
        p.join().expect("producer");
    }
    let depth = |c: &TestCluster, i: usize| -> Option<u64> {
        let metrics = c.metrics(i);
        let d = metrics
            .lines()
            .filter(|l| l.starts_with("queue_depth{") && l.contains("queue=\"big\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>();
        Some(d as u64)
    };
    eventually(
        "every message on the leader",
        Duration::from_secs(30),
        || depth(&c, leader) == Some(total as u64),
    );
    eventually("the leader to compact", Duration::from_secs(60), || {
        c.log(leader).contains("snapshot taken")
    });
    // The load may have moved the leadership while the follower was down; from here on
    // it must not move.
    let (leader, term) = c.wait_for_leader(Duration::from_secs(20));
    let changes_before: Vec<usize> = (0..3)
        .map(|i| c.log(i).matches("leader changed").count())
        .collect();
    let started = std::time::Instant::now();
    c.start_node(lagging);
    eventually(
        "the lagging follower to catch up",
        Duration::from_secs(600),
        || depth(&c, lagging) == Some(total as u64),
    );
    let caught_up = started.elapsed();
    let log = c.log(lagging);
    let log = &log[log.rfind("recovered storage").unwrap_or(0)..];
    assert!(
        log.contains("installed snapshot from the leader"),
        "caught up by the snapshot: {log}"
    );
    eprintln!(
        "{total} messages: the lagging follower caught up in {caught_up:?}:\n  {}",
        log.lines()
            .filter(|l| ["snapshot", "started", "leader changed"]
                .iter()
                .any(|w| l.contains(w)))
            .collect::<Vec<_>>()
            .join("\n  ")
    );
    for i in 0..3 {
        let lines: Vec<String> = c
            .log(i)
            .lines()
            .filter(|l| {
                ["leader changed", "snapshot", "WARN", "ERROR"]
                    .iter()
                    .any(|w| l.contains(w))
            })
            .map(str::to_string)
            .collect();
        eprintln!("node {i}:\n  {}", lines.join("\n  "));
    }
    for i in 0..3 {
        let h = c.health(i).expect("health");
        assert_eq!(
            h["term"].as_u64(),
            Some(term),
            "node {i} stayed in term {term}: {h}"
        );
        assert_eq!(h["leader"], c.nodes[leader].name.as_str(), "{h}");
    }
    for i in (0..3).filter(|&i| i != lagging) {
        let changes = c.log(i).matches("leader changed").count();
        assert_eq!(
            changes,
            changes_before[i],
            "node {i} kept its leader: {}",
            c.log(i)
        );
    }
    let lost_leader = log
        .lines()
        .filter(|l| l.contains("leader changed"))
        .any(|l| l.contains("leader=None"));
    assert!(
        !lost_leader,
        "the lagging follower never lost its leader: {log}"
    );
}
