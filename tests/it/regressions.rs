//! The five faults found in the unsimulated node code, each tried over HTTP against a
//! real cluster the way a new user found it; every test here failed on the code before
//! the node core.

use crate::support::{eventually, http, http_on, TestCluster};
use mesh_client::{CallOptions, Caller, Cluster, MeshClient};
use mesh_core::services::envelope::{Command, Envelope, Reply};
use mesh_core::services::lock::{LockCommand, LockReply, Mode};
use mesh_core::wire::{parse_node_name, ClientRequest, ClientResponse};
use serde_json::Value;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

fn acquire_body(key: &str, client: &str, mode: &str, wait_ms: u64, ttl_ms: u64) -> String {
    format!(
        r#"{{"key": "{key}", "mode": "{mode}", "client_id": "{client}", "wait_ms": {wait_ms}, "ttl_ms": {ttl_ms}}}"#
    )
}

fn acquire(api: SocketAddr, key: &str, client: &str, mode: &str, wait_ms: u64) -> (u16, Value) {
    let body = acquire_body(key, client, mode, wait_ms, 30_000);
    http(api, "POST", "/lock/acquire", body.as_bytes())
}

fn release(api: SocketAddr, key: &str, client: &str) -> (u16, Value) {
    let body = format!(r#"{{"key": "{key}", "client_id": "{client}"}}"#);
    http(api, "POST", "/lock/release", body.as_bytes())
}

fn holders(api: SocketAddr, key: &str) -> Vec<String> {
    let (_, state) = http(api, "GET", &format!("/lock/state?key={key}"), b"");
    state["holders"]
        .as_array()
        .map(|h| {
            h.iter()
                .filter_map(|x| x["client_id"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// How many wait behind `key`.
fn waiters(api: SocketAddr, key: &str) -> usize {
    let (_, state) = http(api, "GET", &format!("/lock/state?key={key}"), b"");
    state["waiters"].as_array().map_or(0, Vec::len)
}

fn in_background<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    std::thread::spawn(f)
}

/// (1) c1 and c2 hold S on U; c1 asks X with a wait. It used to be answered at once
/// `{"ok":true,"mode":"S"}` while c2 still held S; it must wait, time out with 409
/// `timeout` while c2 holds S, and be granted X once c2 releases.
#[test]
fn an_upgrade_waits_until_it_holds_x() {
    let mut c = TestCluster::start("re-upgrade", 3);
    c.wait_for_leader(Duration::from_secs(10));
    let gw = c.start_gateway();
    assert_eq!(acquire(gw, "U", "c1", "S", 0).0, 200);
    assert_eq!(acquire(gw, "U", "c2", "S", 0).0, 200);
    let (status, body) = acquire(gw, "U", "c1", "X", 1500);
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "timeout", "{body}");
    assert_eq!(holders(gw, "U").len(), 2, "both S holds remain");
    let upgrade = in_background(move || acquire(gw, "U", "c1", "X", 10_000));
    eventually("the upgrade to queue", Duration::from_secs(5), || {
        waiters(gw, "U") == 1
    });
    assert_eq!(release(gw, "U", "c2").0, 200);
    let (status, body) = upgrade.join().expect("upgrade");
    assert_eq!((status, body["mode"].as_str()), (200, Some("X")), "{body}");
    assert_eq!(holders(gw, "U"), vec!["c1".to_string()]);
}

/// (2) H holds K(X); A waits for K(S); B holds M(X) and waits for K(S) behind A; A asks
/// M(X). That was refused as a deadlock A -> B -> A; there is none: when H releases K,
/// A and B get S together, B releases M, and A gets M.
#[test]
fn compatible_waiters_are_no_deadlock() {
    let mut c = TestCluster::start("re-deadlock", 3);
    c.wait_for_leader(Duration::from_secs(10));
    // This one goes through node1's own in-process API.
    let api = c.nodes[0].http;
    eventually("node1's HTTP API", Duration::from_secs(10), || {
        crate::support::http_get(api, "/health").is_some()
    });
    assert_eq!(acquire(api, "K", "H", "X", 0).0, 200);
    assert_eq!(acquire(api, "M", "B", "X", 0).0, 200);
    let a_k = in_background(move || acquire(api, "K", "A", "S", 20_000));
    eventually("A to queue on K", Duration::from_secs(5), || {
        waiters(api, "K") == 1
    });
    let b_k = in_background(move || acquire(api, "K", "B", "S", 20_000));
    eventually("B to queue on K", Duration::from_secs(5), || {
        waiters(api, "K") == 2
    });
    let a_m = in_background(move || acquire(api, "M", "A", "X", 20_000));
    eventually("A to queue on M", Duration::from_secs(5), || {
        waiters(api, "M") == 1
    });
    assert_eq!(release(api, "K", "H").0, 200);
    let (s, body) = a_k.join().expect("A on K");
    assert_eq!(s, 200, "{body}");
    let (s, body) = b_k.join().expect("B on K");
    assert_eq!(s, 200, "{body}");
    assert_eq!(release(api, "M", "B").0, 200);
    let (s, body) = a_m.join().expect("A on M");
    assert_eq!((s, body["mode"].as_str()), (200, Some("X")), "{body}");
}

/// (3) A waiting acquire whose HTTP caller closes its connection used to stay queued and
/// be granted to nobody for its whole lease. It is withdrawn: a fresh client gets the
/// lock within a second of the release.
#[test]
fn a_waiter_whose_caller_went_away_does_not_keep_the_lock() {
    let mut c = TestCluster::start("re-ghost", 3);
    c.wait_for_leader(Duration::from_secs(10));
    let gw = c.start_gateway();
    assert_eq!(acquire(gw, "G", "holder", "X", 0).0, 200);
    // The ghost waits up to 20 s with a 60 s lease, but its caller gives up after 300 ms
    // and closes the connection.
    let impatient = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_millis(300)))
        .build();
    let impatient: ureq::Agent = impatient.into();
    let body = acquire_body("G", "ghost", "X", 20_000, 60_000);
    let gone = impatient
        .post(&format!("http://{gw}/lock/acquire"))
        .header("content-type", "application/json")
        .send(body.as_str());
    assert!(gone.is_err(), "the impatient caller timed out");
    eventually(
        "the ghost's wait to be withdrawn",
        Duration::from_secs(5),
        || waiters(gw, "G") == 0,
    );
    assert_eq!(release(gw, "G", "holder").0, 200);
    let started = Instant::now();
    let (status, body) = acquire(gw, "G", "fresh", "X", 5_000);
    assert_eq!(status, 200, "{body}");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "granted {:?} after the release",
        started.elapsed()
    );
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn mesh(c: &TestCluster) -> MeshClient {
    let tls = certs::TlsMaterial::load(&c.certs_dir(), "admin").expect("admin certificate");
    let nodes = c
        .nodes
        .iter()
        .map(|n| (parse_node_name(&n.name).expect("name"), n.quic))
        .collect();
    MeshClient::new(&tls, nodes).expect("client")
}

fn lock_reply(r: ClientResponse) -> LockReply {
    match r {
        ClientResponse::Applied { result, .. } => match postcard::from_bytes(&result) {
            Ok(Reply::Lock(l)) => l,
            other => panic!("reply {other:?}"),
        },
        other => panic!("answer {other:?}"),
    }
}

/// (5) A release retried after its answer was lost (the same session and sequence
/// number, sent again) used to be applied again once its answer had left the last 4,096:
/// 409 `not_held`, or the loss of a newer hold of the same client id. It answers the
/// first answer and leaves the later hold alone, however many calls came in between.
#[test]
fn a_retried_release_answers_once_and_never_touches_a_later_hold() {
    let mut c = TestCluster::start("re-retry", 3);
    c.wait_for_leader(Duration::from_secs(10));
    runtime().block_on(async {
        let client = mesh(&c);
        let caller = Caller::new(Cluster::remote(client.clone()), 16);
        let opts = CallOptions {
            deadline: Duration::from_secs(10),
            prompt: true,
            withdraw_if_abandoned: false,
        };
        let opened = caller
            .propose(Command::OpenSession, opts)
            .await
            .expect("open");
        let Reply::SessionOpened { session } = opened.reply else {
            panic!("{opened:?}");
        };
        let call = |seq: u64, ack: u64, command: LockCommand| {
            let e = Envelope::new(session, seq, ack, Command::Lock(command));
            ClientRequest::Propose(postcard::to_stdvec(&e).expect("encode"))
        };
        let acquire = LockCommand::Acquire {
            key: "R".into(),
            client: "c1".into(),
            mode: Mode::X,
            ttl_ms: 60_000,
            wait_ms: 0,
        };
        let release = LockCommand::Release {
            key: "R".into(),
            client: "c1".into(),
        };
        let d = Duration::from_secs(10);
        let r = client
            .call(&call(1, 1, acquire.clone()), d)
            .await
            .expect("acquire");
        assert!(matches!(lock_reply(r), LockReply::Granted { .. }));
        let the_release = call(2, 1, release);
        let first = lock_reply(client.call(&the_release, d).await.expect("release"));
        assert_eq!(first, LockReply::Released);
        // The same client id holds R again, and 5,000 other calls go by.
        let r = client.call(&call(3, 2, acquire), d).await.expect("again");
        let LockReply::Granted { token: later, .. } = lock_reply(r) else {
            panic!("re-acquire");
        };
        // Other callers of the same gateway make 5,120 calls meanwhile (each caller slot
        // is a session of its own), more than the old per-gateway window of 4,096.
        let others = std::sync::Arc::new(Caller::new(Cluster::remote(client.clone()), 16));
        let mut tasks = Vec::new();
        for _ in 0..16 {
            let others = others.clone();
            tasks.push(tokio::spawn(async move {
                for _ in 0..320 {
                    others.propose(Command::Tick, opts).await.expect("tick");
                }
            }));
        }
        for t in tasks {
            t.await.expect("caller task");
        }
        // The answer of call 2 was "lost": the client sends it again.
        let again = lock_reply(client.call(&the_release, d).await.expect("retry"));
        assert_eq!(again, LockReply::Released, "the first answer, once");
        let view = client
            .call(
                &ClientRequest::Read(
                    postcard::to_stdvec(&mesh_core::services::envelope::Query::LockState {
                        key: "R".into(),
                    })
                    .expect("encode"),
                ),
                d,
            )
            .await
            .expect("read");
        let ClientResponse::Read(bytes) = view else {
            panic!("read")
        };
        let view: mesh_core::services::envelope::QueryReply =
            postcard::from_bytes(&bytes).expect("decode");
        let mesh_core::services::envelope::QueryReply::LockState(v) = view else {
            panic!("{view:?}")
        };
        assert_eq!(v.holders.len(), 1, "the later hold is untouched");
        assert_eq!(v.holders[0].token, later);
    });
}

/// (5) over HTTP: the leader carries out a release and its answer is lost (the node
/// holds it back, then resets the stream, as a node that dies after applying would).
/// Meanwhile the same client id takes the lock again and other callers of the same
/// gateway make more calls than the old per-gateway window of 4,096 answers. The
/// gateway's retry of the release is answered with the first answer, 200 once, and the
/// later hold stays.
#[test]
fn over_http_a_release_whose_answer_was_lost_answers_once_and_spares_a_later_hold() {
    let mut c = TestCluster::start("re-retry-http", 3);
    for i in 0..3 {
        c.kill9(i);
        c.start_node_with_env(i, &[("SYNCMESH_FAULT_INJECTION", "1".to_string())]);
    }
    let (leader, _) = c.wait_for_leader(Duration::from_secs(10));
    let gw = c.start_gateway();
    assert_eq!(acquire(gw, "R", "c1", "X", 0).0, 200);
    let admin = c.nodes[leader].admin;
    let (status, body) = http(admin, "POST", "/fault/hold-answers", b"");
    assert_eq!(status, 200, "fault injection is on: {body}");
    let the_release = in_background(move || release(gw, "R", "c1"));
    eventually(
        "the release to be carried out",
        Duration::from_secs(10),
        || holders(gw, "R").is_empty(),
    );
    let (status, body) = acquire(gw, "R", "c1", "X", 0);
    assert_eq!(status, 200, "{body}");
    let later = body["token"].as_u64().expect("token");
    // 64 callers x 65 renewals: 4,160 calls, each a log entry with an answer.
    let started = Instant::now();
    let others: Vec<_> = (0..64)
        .map(|t| {
            in_background(move || {
                let agent = crate::support::agent(Duration::from_secs(30));
                let body = format!(r#"{{"client_id": "other-{t}"}}"#);
                for _ in 0..65 {
                    let (status, _) = http_on(&agent, gw, "POST", "/lock/renew", body.as_bytes());
                    assert_eq!(status, 200);
                }
            })
        })
        .collect();
    for t in others {
        t.join().expect("other caller");
    }
    eprintln!("4,160 other calls in {:?}", started.elapsed());
    let (_, faults) = http(admin, "GET", "/fault", b"");
    assert_eq!(faults["held_request"], true, "{faults}");
    let (_, lost) = http(admin, "POST", "/fault/lose-held", b"");
    assert!(lost["lost"].as_u64() >= Some(1), "{lost}");
    let (status, body) = the_release.join().expect("release");
    assert_eq!((status, &body["ok"]), (200, &Value::Bool(true)), "{body}");
    let (_, state) = http(gw, "GET", "/lock/state?key=R", b"");
    assert_eq!(
        state["holders"].as_array().map(Vec::len),
        Some(1),
        "{state}"
    );
    assert_eq!(state["holders"][0]["client_id"], "c1", "{state}");
    assert_eq!(
        state["holders"][0]["token"].as_u64(),
        Some(later),
        "{state}"
    );
}

/// (4) Lock time used to be the leader's wall clock: a step forward expired every lease,
/// a step back froze them. Every node runs under a wall clock we step by an hour forward
/// and back in the middle of a hold (libfaketime, monotonic time left alone, as NTP
/// leaves it): the lease is neither shortened nor frozen beyond its 3 s.
#[test]
fn wall_clock_steps_neither_shorten_nor_freeze_a_lease() {
    let lib = ["/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("libfaketime is installed (Debian package faketime; .ci/run installs it)");
    let mut c = TestCluster::start("re-wallclock", 3);
    let clock = c.dir.0.join("faketime");
    std::fs::write(&clock, "+0\n").expect("clock file");
    let env = [
        ("LD_PRELOAD", lib.to_string()),
        ("FAKETIME_TIMESTAMP_FILE", clock.display().to_string()),
        ("FAKETIME_NO_CACHE", "1".to_string()),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1".to_string()),
    ];
    for i in 0..3 {
        c.kill9(i);
        c.start_node_with_env(i, &env);
    }
    c.wait_for_leader(Duration::from_secs(10));
    let gw = c.start_gateway();
    let body = acquire_body("W", "holder", "X", 0, 3_000);
    let (status, granted) = http(gw, "POST", "/lock/acquire", body.as_bytes());
    assert_eq!(status, 200, "{granted}");
    let held_at = Instant::now();
    std::fs::write(&clock, "+3600s\n").expect("step forward");
    // The step took effect: a grant's wall-clock estimate, read off the answering
    // node's clock, is an hour ahead of ours (if faketime did not load, this fails).
    let real_ms = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    };
    eventually(
        "the nodes' wall clocks to step",
        Duration::from_secs(5),
        || {
            let body = acquire_body("probe", "prober", "S", 0, 1_000);
            let (status, v) = http(gw, "POST", "/lock/acquire", body.as_bytes());
            status == 200 && v["expires_at_ms"].as_u64().unwrap_or(0) > real_ms() + 3_000_000
        },
    );
    assert_eq!(
        holders(gw, "W"),
        vec!["holder".to_string()],
        "a step forward does not end the lease"
    );
    std::fs::write(&clock, "-3600s\n").expect("step back");
    // The lease ends by lock time, 3 s after the grant (plus the expiry tick's commit).
    eventually("the lease to end", Duration::from_secs(6), || {
        holders(gw, "W").is_empty()
    });
    let lasted = held_at.elapsed();
    assert!(
        lasted >= Duration::from_millis(2_900),
        "the lease lasted only {lasted:?}"
    );
    assert!(
        lasted < Duration::from_millis(4_500),
        "the lease was frozen: {lasted:?}"
    );
}
