//! The console's HTTP side against real processes: its files at `/`, the snapshot at
//! `/api/cluster` and the live feed at `/api/events`. (What a browser shows of them is
//! the headless-Chromium test's.)

use crate::browser::Launcher;
use crate::support::{agent, eventually, http, TestCluster};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::time::Duration;

fn cluster_view(at: std::net::SocketAddr) -> Value {
    let (status, body) = http(at, "GET", "/api/cluster", b"");
    assert_eq!(status, 200, "{body}");
    body
}

/// The cache cell of `key` at `node` in a view (`I` when the node has no line).
fn cell(view: &Value, key: &str, node: &str) -> String {
    let Some(nodes) = view["cache"].as_array() else {
        return "?".into();
    };
    nodes
        .iter()
        .find(|n| n["node"] == node)
        .and_then(|n| n["lines"].as_array())
        .and_then(|lines| lines.iter().find(|l| l[0] == key))
        .and_then(|l| l[1].as_str())
        .unwrap_or("I")
        .to_owned()
}

#[test]
fn the_gateway_serves_the_console_a_snapshot_and_a_live_feed() {
    let mut c = TestCluster::start("console", 3);
    c.wait_for_leader(Duration::from_secs(10));
    let gw = c.start_gateway();
    let client = agent(Duration::from_secs(10));

    // The page, its script and its wasm, with the types a browser needs.
    let mut page = client.get(&format!("http://{gw}/")).call().expect("GET /");
    assert_eq!(page.status().as_u16(), 200);
    let html = page.body_mut().read_to_string().expect("html");
    assert!(html.contains("import init from \"./web.js\""), "{html}");
    let js = client
        .get(&format!("http://{gw}/web.js"))
        .call()
        .expect("GET /web.js");
    assert_eq!(js.headers()["content-type"], "text/javascript");
    let mut wasm = client
        .get(&format!("http://{gw}/web_bg.wasm"))
        .call()
        .expect("GET /web_bg.wasm");
    assert_eq!(wasm.headers()["content-type"], "application/wasm");
    let bytes = wasm
        .body_mut()
        .with_config()
        .limit(16 << 20)
        .read_to_vec()
        .expect("wasm");
    assert_eq!(&bytes[..4], b"\0asm", "a WebAssembly module");

    // Three nodes, exactly one leader, all on its term.
    let view = cluster_view(gw);
    let nodes = view["nodes"].as_array().expect("nodes");
    assert_eq!(nodes.len(), 3, "{view}");
    let leaders: Vec<&Value> = nodes.iter().filter(|n| n["role"] == "leader").collect();
    assert_eq!(leaders.len(), 1, "{view}");
    assert!(nodes.iter().all(|n| n["up"] == true), "{view}");

    // A gateway on its own owns no process: no fault routes, no buttons.
    assert_eq!(view["faults"], false, "{view}");
    let (status, body) = http(gw, "POST", "/api/fault/stop", br#"{"node":"node1"}"#);
    assert_eq!(status, 404, "{body}");

    // A held lock with its token and lease, a queued message, cache states.
    let (status, grant) = http(
        gw,
        "POST",
        "/lock/acquire",
        json!({"key": "A", "mode": "X", "client_id": "c1", "ttl_ms": 30_000})
            .to_string()
            .as_bytes(),
    );
    assert_eq!(status, 200, "{grant}");
    let (status, body) = http(
        gw,
        "POST",
        "/queue/enq",
        br#"{"key":"user:42","value":"hello"}"#,
    );
    assert_eq!(status, 200, "{body}");
    let (status, body) = http(
        gw,
        "POST",
        "/cache/put",
        br#"{"key":"k","val":1,"node":"node1"}"#,
    );
    assert_eq!(status, 200, "{body}");
    let view = cluster_view(gw);
    let lock = &view["locks"]["keys"][0];
    assert_eq!(lock["key"], "A", "{view}");
    assert_eq!(lock["holders"][0]["client_id"], "c1");
    assert_eq!(lock["holders"][0]["token"], grant["token"]);
    let lease = lock["holders"][0]["lease_left_ms"].as_u64().unwrap_or(0);
    assert!(lease > 20_000 && lease <= 30_000, "lease left {lease}");
    let depth: u64 = view["queues"]
        .as_array()
        .expect("queues")
        .iter()
        .map(|q| q["depth"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(depth, 1, "{view}");
    assert_eq!(cell(&view, "k", "node1"), "M", "{view}");
    assert_eq!(cell(&view, "k", "node2"), "I", "{view}");
    let (status, body) = http(gw, "POST", "/cache/get", br#"{"key":"k","node":"node2"}"#);
    assert_eq!(status, 200, "{body}");
    eventually(
        "k to be S at node1 and node2",
        Duration::from_secs(5),
        || {
            let v = cluster_view(gw);
            cell(&v, "k", "node1") == "S" && cell(&v, "k", "node2") == "S"
        },
    );

    // The feed: a `state` event carrying a whole view, then more of them.
    let response = client
        .get(&format!("http://{gw}/api/events"))
        .call()
        .expect("GET /api/events");
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut lines = BufReader::new(response.into_body().into_reader()).lines();
    let mut views = Vec::new();
    let mut event = String::new();
    while views.len() < 2 {
        let line = lines.next().expect("the feed goes on").expect("a line");
        if let Some(name) = line.strip_prefix("event: ") {
            event = name.to_owned();
        } else if let Some(data) = line.strip_prefix("data: ") {
            assert_eq!(event, "state");
            let v: Value = serde_json::from_str(data).expect("a view");
            assert_eq!(v["nodes"].as_array().map(Vec::len), Some(3), "{v}");
            views.push(v["at_ms"].as_u64().unwrap_or(0));
        }
    }
    assert!(views[1] > views[0], "a newer view follows: {views:?}");
}

/// The only leader every answering node agrees on: (id, term).
fn agreed_leader(view: &Value) -> Option<(String, u64)> {
    let up: Vec<&Value> = view["nodes"]
        .as_array()?
        .iter()
        .filter(|n| n["up"] == true)
        .collect();
    let leaders: Vec<&&Value> = up.iter().filter(|n| n["role"] == "leader").collect();
    let [leader] = leaders[..] else {
        return None;
    };
    let id = leader["id"].as_str()?.to_owned();
    up.iter()
        .all(|n| n["leader"] == id.as_str())
        .then(|| (id, leader["term"].as_u64().unwrap_or(0)))
}

/// The console's fault routes under `syncmesh cluster`: they refuse what a person did
/// not mean (an unknown fault or node, a body that is not JSON, another site's page),
/// and stop, restart, isolate and heal the node they name.
#[test]
fn the_console_s_fault_routes_refuse_bad_calls_and_break_what_they_name() {
    let cluster = Launcher::start("console-faults");
    let gw = cluster.gateway;
    let fault = |action: &str, node: &str| {
        let body = json!({ "node": node }).to_string();
        http(gw, "POST", &format!("/api/fault/{action}"), body.as_bytes())
    };
    let mut leader = None;
    eventually("a leader", Duration::from_secs(20), || {
        leader = agreed_leader(&cluster_view(gw));
        leader.is_some()
    });
    let (leader, term) = leader.unwrap_or_default();
    assert_eq!(cluster_view(gw)["faults"], true);

    // Refused, and nothing is done.
    let (status, body) = fault("explode", "node1");
    assert_eq!(status, 404, "{body}");
    let (status, body) = fault("stop", "node9");
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("unknown_node"))
    );
    let (status, body) = http(gw, "POST", "/api/fault/stop", b"{not json");
    assert_eq!(status, 400, "{body}");
    let raw = |content_type: &str, origin: Option<&str>| {
        let mut request = agent(Duration::from_secs(10))
            .post(&format!("http://{gw}/api/fault/stop"))
            .header("content-type", content_type);
        if let Some(origin) = origin {
            request = request.header("origin", origin);
        }
        let mut r = request
            .send(json!({ "node": leader }).to_string().as_bytes())
            .expect("an answer");
        let body = r.body_mut().read_to_string().unwrap_or_default();
        (r.status().as_u16(), body)
    };
    let (status, body) = raw("text/plain", None);
    assert_eq!(status, 400, "a form's post: {body}");
    let (status, body) = raw("application/json", Some("http://evil.example"));
    assert_eq!(status, 403, "another site's page: {body}");
    let view = cluster_view(gw);
    assert!(
        view["nodes"]
            .as_array()
            .into_iter()
            .flatten()
            .all(|n| n["up"] == true),
        "no node was stopped: {view}"
    );

    // Isolate the leader: the others elect one in a higher term; healed, one leader.
    let index = |id: &str| id.trim_start_matches("node").parse::<u16>().unwrap_or(1) - 1;
    let fault_state = |id: &str| {
        let admin = std::net::SocketAddr::from(([127, 0, 0, 1], cluster.admin + index(id)));
        http(admin, "GET", "/fault", b"").1
    };
    let (status, body) = fault("isolate", &leader);
    assert_eq!(status, 200, "{body}");
    assert_eq!(fault_state(&leader)["isolated"], true);
    eventually(
        "a new leader once the old one is cut off",
        Duration::from_secs(20),
        || {
            cluster_view(gw)["nodes"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|n| {
                    n["role"] == "leader"
                        && n["id"] != leader.as_str()
                        && n["term"].as_u64() > Some(term)
                })
        },
    );
    let (status, body) = fault("heal", &leader);
    assert_eq!(status, 200, "{body}");
    assert_eq!(fault_state(&leader)["isolated"], false);
    eventually("one leader again", Duration::from_secs(20), || {
        agreed_leader(&cluster_view(gw)).is_some()
    });

    // Stop a node (twice: the second is refused), restart it, restart a running one.
    let (status, body) = fault("stop", "node3");
    assert_eq!(status, 200, "{body}");
    let (status, body) = fault("stop", "node3");
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("fault_refused"))
    );
    let up = |id: &str| {
        cluster_view(gw)["nodes"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|n| n["id"] == id && n["up"] == true)
    };
    eventually("node3 to stop answering", Duration::from_secs(10), || {
        !up("node3")
    });
    let (status, body) = fault("restart", "node3");
    assert_eq!(
        (status, body["done"].as_str()),
        (200, Some("node3 started"))
    );
    eventually("node3 to answer again", Duration::from_secs(20), || {
        up("node3")
    });
    let (status, body) = fault("restart", "node2");
    assert_eq!(
        (status, body["done"].as_str()),
        (200, Some("node2 killed and restarted"))
    );
    eventually(
        "three nodes and one leader",
        Duration::from_secs(20),
        || {
            let view = cluster_view(gw);
            agreed_leader(&view).is_some()
                && view["nodes"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .all(|n| n["up"] == true)
        },
    );
}
