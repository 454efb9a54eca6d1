//! 16 clients contend on 4 hot keys through the gateway while the leader is killed with
//! kill -9, twice. Afterwards the recorded holds (from the grant's response to the
//! release's request, by fencing token) of each key must not overlap, and the cluster must
//! have served again within 2 seconds of each kill.

use crate::support::{http, TestCluster};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
struct Hold {
    key: usize,
    client: usize,
    token: u64,
    from: Instant,
    until: Instant,
}

#[test]
fn exclusive_holds_never_overlap_across_leader_kills() {
    let mut c = TestCluster::start("contention", 3);
    c.wait_for_leader(Duration::from_secs(10));
    let gw = c.start_gateway();
    let stop = Arc::new(AtomicBool::new(false));
    let holds = Arc::new(Mutex::new(Vec::<Hold>::new()));
    let successes = Arc::new(Mutex::new(Vec::<Instant>::new()));
    let workers: Vec<_> = (0..16)
        .map(|client| {
            let (stop, holds, successes) = (stop.clone(), holds.clone(), successes.clone());
            std::thread::spawn(move || {
                let mut round = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    round += 1;
                    let key = (client + round) % 4;
                    let body = format!(
                        r#"{{"key": "hot{key}", "mode": "X", "client_id": "c{client}", "ttl_ms": 20000, "wait_ms": 1000}}"#
                    );
                    let (status, reply) = http(gw, "POST", "/lock/acquire", body.as_bytes());
                    if status != 200 {
                        std::thread::sleep(Duration::from_millis(20));
                        continue;
                    }
                    let from = Instant::now();
                    successes.lock().expect("lock").push(from);
                    let token = reply["token"].as_u64().expect("token");
                    std::thread::sleep(Duration::from_millis(5));
                    let until = Instant::now();
                    let release = format!(r#"{{"key": "hot{key}", "client_id": "c{client}"}}"#);
                    // The hold ends when the client lets go; retry until the cluster agrees.
                    for _ in 0..200 {
                        let (status, reply) = http(gw, "POST", "/lock/release", release.as_bytes());
                        if status == 200 || reply["error"]["code"] == "not_held" {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    holds.lock().expect("lock").push(Hold { key, client, token, from, until });
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1500));
    let mut recoveries = Vec::new();
    for _ in 0..2 {
        let (leader, _) = c.wait_for_leader(Duration::from_secs(10));
        let killed_at = Instant::now();
        c.kill9(leader);
        let start = Instant::now();
        let served = loop {
            let next = successes
                .lock()
                .expect("lock")
                .iter()
                .copied()
                .find(|t| *t > killed_at);
            if let Some(t) = next {
                break t;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "no lock granted for 10 s after the kill"
            );
            std::thread::sleep(Duration::from_millis(5));
        };
        recoveries.push(served - killed_at);
        c.start_node(leader);
        std::thread::sleep(Duration::from_millis(1500));
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().expect("client thread");
    }
    let holds = holds.lock().expect("lock").clone();
    eprintln!(
        "{} holds recorded; served again after {recoveries:?}",
        holds.len()
    );
    assert!(
        holds.len() > 50,
        "too little happened: {} holds",
        holds.len()
    );
    for key in 0..4 {
        let mut on_key: Vec<&Hold> = holds.iter().filter(|h| h.key == key).collect();
        on_key.sort_by_key(|h| h.token);
        for pair in on_key.windows(2) {
            let (a, b) = (pair[0], pair[1]);
            assert!(
                a.token < b.token,
                "key {key}: token {} granted twice",
                a.token
            );
            assert!(
                a.until <= b.from,
                "key {key}: c{} (token {}) still held it when c{} (token {}) was granted",
                a.client,
                a.token,
                b.client,
                b.token
            );
        }
    }
    for r in recoveries {
        assert!(r < Duration::from_secs(2), "served again only after {r:?}");
    }
}
