//! The console in a real browser: headless Chromium, driven over WebDriver (the W3C
//! protocol, spoken by chromedriver, over the project's one HTTP client), against a
//! cluster started by `syncmesh cluster` as a user starts it. Each step waits for what
//! the page must show and fails naming the step; screenshots go to
//! `target/console-e2e/`.
//!
//! chromedriver and chromium come from Debian (`.ci/run` installs them). Outside CI a
//! machine without them skips this test and says so; under `CI=true` their absence is
//! a failure.

use crate::support::{agent, free_port_block, syncmesh, TempDir};
use serde_json::{json, Value};
use std::io::BufRead;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

/// The first of `names` found on PATH.
fn on_path(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    names.iter().find_map(|name| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    })
}

/// A chromedriver process and one browser session.
struct Browser {
    driver: Child,
    base: String,
    session: String,
    http: ureq::Agent,
}

impl Browser {
    fn start(chromedriver: &Path, chromium: &Path) -> Self {
        let port = free_port_block(1);
        let driver = std::process::Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let base = format!("http://127.0.0.1:{port}");
        let http = agent(Duration::from_secs(30));
        let started = Instant::now();
        while http.get(&format!("{base}/status")).call().is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "chromedriver did not answer on {base}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:loggingPrefs": {"browser": "ALL"},
            "goog:chromeOptions": {
                "binary": chromium,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu",
                    "--disable-dev-shm-usage", "--disable-background-networking",
                    "--disable-extensions", "--no-first-run", "--window-size=1280,800",
                ],
            },
        }}});
        let mut b = Self {
            driver,
            base,
            session: String::new(),
            http,
        };
        let v = b.send("POST", "/session", &caps);
        b.session = v["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no browser session: {v}"))
            .to_owned();
        b
    }

    /// One WebDriver command: its `value`.
    fn send(&self, method: &str, path: &str, body: &Value) -> Value {
        let url = if path == "/session" {
            format!("{}{path}", self.base)
        } else {
            format!("{}/session/{}{path}", self.base, self.session)
        };
        let answer = match method {
            "GET" => self.http.get(&url).call(),
            _ => self
                .http
                .post(&url)
                .header("content-type", "application/json")
                .send(body.to_string().as_bytes()),
        };
        let mut answer = answer.unwrap_or_else(|e| panic!("WebDriver {method} {path}: {e}"));
        let text = answer
            .body_mut()
            .with_config()
            .limit(64 << 20)
            .read_to_string()
            .unwrap_or_default();
        let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        v["value"].clone()
    }

    fn goto(&self, url: &str) {
        self.send("POST", "/url", &json!({ "url": url }));
    }

    /// Run `script` in the page: what it returns.
    fn js(&self, script: &str) -> Value {
        self.send(
            "POST",
            "/execute/sync",
            &json!({ "script": script, "args": [] }),
        )
    }

    /// Click the element `css` selects (it must be there).
    fn click(&self, css: &str) {
        let found = self.send(
            "POST",
            "/element",
            &json!({"using": "css selector", "value": css}),
        );
        // (The W3C name of an element reference's key.)
        let Some(id) = found["element-6066-11e4-a52e-4f735466cecf"].as_str() else {
            let shot = std::env::temp_dir().join("syncmesh-console-no-element.png");
            self.screenshot(&shot);
            panic!("no element {css}: {found}; see {}", shot.display());
        };
        let clicked = self.send("POST", &format!("/element/{id}/click"), &json!({}));
        assert!(clicked.is_null(), "click {css}: {clicked}");
    }

    /// Set a form field's value as a person typing it would leave it.
    fn set(&self, id: &str, value: &str) {
        self.js(&format!(
            "document.getElementById({}).value = {};",
            json!(id),
            json!(value)
        ));
    }

    /// Messages the page logged at level SEVERE (JavaScript errors, failed loads).
    fn errors(&self) -> Vec<String> {
        let log = self.send("POST", "/se/log", &json!({"type": "browser"}));
        let Some(entries) = log.as_array() else {
            panic!("chromedriver gave no browser log: {log}");
        };
        entries
            .iter()
            .filter(|e| e["level"] == "SEVERE")
            .map(|e| e["message"].as_str().unwrap_or_default().to_owned())
            .collect()
    }

    fn screenshot(&self, path: &Path) {
        let b64 = self.send("GET", "/screenshot", &Value::Null);
        let png = base64_decode(b64.as_str().unwrap_or_default());
        assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
        std::fs::write(path, png).expect("write screenshot");
    }

    /// The whole page, top to bottom, at 1280 wide (the window grows to the page's
    /// height for the shot, then goes back to 1280×800).
    fn full_screenshot(&self, path: &Path) {
        let height = self
            .js("window.scrollTo(0, 0); return document.documentElement.scrollHeight;")
            .as_u64()
            .unwrap_or(800)
            .clamp(800, 6000);
        let rect = |h: u64| json!({"x": 0, "y": 0, "width": 1280, "height": h});
        self.send("POST", "/window/rect", &rect(height + 140));
        self.screenshot(path);
        self.send("POST", "/window/rect", &rect(800));
    }

    /// Wait until `probe` (a script returning a value) gives what `ok` accepts: that
    /// value. Fails naming `step`, with a screenshot of what the page showed.
    fn wait_for(
        &self,
        step: &str,
        shots: &Path,
        probe: &str,
        ok: impl Fn(&Value) -> bool,
    ) -> Value {
        self.wait_for_within(step, shots, probe, ok, Duration::from_secs(20))
    }

    /// [`Self::wait_for`], failing after `limit`.
    fn wait_for_within(
        &self,
        step: &str,
        shots: &Path,
        probe: &str,
        ok: impl Fn(&Value) -> bool,
        limit: Duration,
    ) -> Value {
        let started = Instant::now();
        loop {
            let v = self.js(probe);
            if ok(&v) {
                return v;
            }
            if started.elapsed() > limit {
                let shot = shots.join("failed.png");
                self.screenshot(&shot);
                panic!(
                    "the console never showed {step} (last: {v}); see {}",
                    shot.display()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = self
                .http
                .delete(&format!("{}/session/{}", self.base, self.session))
                .call();
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// Standard base64 (what WebDriver's screenshots are in).
fn base64_decode(s: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    };
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0);
    for v in s.bytes().filter_map(value) {
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

/// `syncmesh cluster` on free ports, stopped (SIGTERM) when dropped.
pub(crate) struct Launcher {
    child: Child,
    /// The gateway (with the console).
    pub(crate) gateway: SocketAddr,
    /// node1's admin port (node i: + i - 1).
    pub(crate) admin: u16,
    _dir: TempDir,
}

impl Launcher {
    /// `name`: the test's own, for its temporary directory.
    pub(crate) fn start(name: &str) -> Self {
        let dir = TempDir::new(name);
        let quic = free_port_block(3);
        let admin = free_port_block(3);
        let gateway = free_port_block(1);
        let mut child = syncmesh()
            .current_dir(&dir.0)
            .args([
                "cluster",
                "--nodes",
                "3",
                "--dir",
                "c",
                "--seed-ports",
                "false",
            ])
            .args(["--quic-port", &quic.to_string()])
            .args(["--admin-port", &admin.to_string()])
            .args(["--gateway-port", &gateway.to_string()])
            // A line stays M until its periodic write-back (a quarter of the window),
            // then it is clean, E: with the default 100 ms window that is shorter than
            // the console's 500 ms feed, so the test widens it to see M.
            .env("SYNCMESH_CACHE_WRITEBACK_MS", "20000")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start syncmesh cluster");
        let stdout = child.stdout.take().expect("stdout");
        // From here a panic still stops the launcher (and with it every node).
        let launcher = Self {
            child,
            gateway: ([127, 0, 0, 1], gateway).into(),
            admin,
            _dir: dir,
        };
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                // Read to the end even once nobody listens: a closed pipe would make
                // the launcher's next line fail.
                let _ = tx.send(line);
            }
        });
        let mut out = String::new();
        loop {
            match rx.recv_timeout(Duration::from_secs(60)) {
                Ok(line) => {
                    out.push_str(&line);
                    out.push('\n');
                    if line.contains("Ctrl-C stops every node") {
                        break;
                    }
                }
                Err(_) => panic!("syncmesh cluster never came up: {out}"),
            }
        }
        assert!(out.contains("fault injection on"), "{out}");
        launcher
    }
}

impl Drop for Launcher {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
        let _ = self.child.wait();
    }
}

/// What the page shows of a node card: (role, term).
const NODE_CARDS: &str = "return [...document.querySelectorAll('article.node')].map(n => \
     [n.id.slice(5), n.dataset.role || '', Number(n.dataset.term || 0)]);";

fn cell_probe(key: &str) -> String {
    format!(
        "return Object.fromEntries([...document.querySelectorAll('#cache-matrix td.cell')]\
         .filter(c => c.dataset.key === {}).map(c => [c.dataset.node, c.dataset.state]));",
        json!(key)
    )
}

#[test]
fn the_console_in_headless_chromium_shows_and_drives_the_cluster() {
    let tools = (
        on_path(&["chromedriver"]),
        on_path(&["chromium", "chromium-browser", "google-chrome"]),
    );
    let (Some(chromedriver), Some(chromium)) = tools else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must have chromium and chromium-driver (.ci/run installs them)"
        );
        eprintln!(
            "SKIPPED: the console's browser test needs chromium and chromedriver on PATH \
             (Debian: apt-get install chromium chromium-driver)"
        );
        return;
    };
    let shots = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/console-e2e");
    std::fs::create_dir_all(&shots).expect("screenshot dir");
    let cluster = Launcher::start("browser");
    let browser = Browser::start(&chromedriver, &chromium);
    let page = format!("http://{}/", cluster.gateway);
    let loaded = Instant::now();
    browser.goto(&page);

    // Three nodes, exactly one leader.
    let cards = browser.wait_for("three nodes and one leader", &shots, NODE_CARDS, |v| {
        let cards = v.as_array().cloned().unwrap_or_default();
        cards.len() == 3 && cards.iter().filter(|c| c[1] == "leader").count() == 1
    });
    println!("first full view {:?} after navigating", loaded.elapsed());
    let link = browser.js("return document.getElementById('link').textContent;");
    assert_eq!(link, "live", "the feed is live");
    let (leader, term) = cards
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c[1] == "leader")
        .map(|c| {
            (
                c[0].as_str().unwrap_or_default().to_owned(),
                c[2].as_u64().unwrap_or(0),
            )
        })
        .expect("a leader");
    browser.screenshot(&shots.join("1-nodes.png"));

    // An acquire through the form shows the holder and its token.
    browser.set("lock-key", "orders");
    browser.set("lock-client", "alice");
    browser.click("#lock-acquire");
    let holders = browser.wait_for(
        "the lock's holder and token",
        &shots,
        "const r = document.querySelector('#locks tr[data-key=\"orders\"] .holders'); \
         return r ? r.textContent : '';",
        |v| {
            v.as_str()
                .is_some_and(|t| t.contains("alice") && t.contains('#'))
        },
    );
    assert!(
        holders.as_str().is_some_and(|t| t.starts_with("alice X #")),
        "an X holder: {holders}"
    );

    // A deadlock refused through the API shows with its cycle.
    let gw = cluster.gateway;
    let acquire = move |key: &str, client: &str, wait_ms: u64| {
        // (A long lease: c2 must still hold dl-b when the test releases it.)
        let body = json!({"key": key, "mode": "X", "client_id": client, "wait_ms": wait_ms,
                          "ttl_ms": 120_000});
        let mut r = agent(Duration::from_millis(wait_ms) + Duration::from_secs(10))
            .post(&format!("http://{gw}/lock/acquire"))
            .send(body.to_string().as_bytes())
            .expect("acquire");
        let v: Value = serde_json::from_str(&r.body_mut().read_to_string().unwrap_or_default())
            .unwrap_or(Value::Null);
        v
    };
    assert_eq!(acquire("dl-a", "c1", 0)["ok"], true);
    assert_eq!(acquire("dl-b", "c2", 0)["ok"], true);
    // (A long wait: under load the page may take seconds to show the waiter, and the
    // cycle exists only while c1 waits. c2's release below ends it.)
    let waiter = std::thread::spawn(move || acquire("dl-b", "c1", 60_000));
    browser.wait_for(
        "c1 waiting on dl-b",
        &shots,
        "const r = document.querySelector('#locks tr[data-key=\"dl-b\"]'); \
         return r ? r.textContent : '';",
        |v| v.as_str().is_some_and(|t| t.contains("c1 X")),
    );
    let refused = acquire("dl-a", "c2", 3_000);
    assert_eq!(refused["error"]["code"], "deadlock", "{refused}");
    browser.wait_for(
        "the deadlock refusal with its cycle",
        &shots,
        "const l = document.querySelector('#deadlocks li[data-key=\"dl-a\"]'); \
         return l ? l.textContent : '';",
        |v| v.as_str().is_some_and(|t| t.contains("c2 → c1 → c2")),
    );
    let release = json!({"key": "dl-b", "client_id": "c2"}).to_string();
    let (status, body) = crate::support::http(gw, "POST", "/lock/release", release.as_bytes());
    assert_eq!(status, 200, "{body}");
    let granted = waiter.join().expect("the waiter");
    assert_eq!(
        granted["ok"], true,
        "c1 is granted dl-b once c2 released: {granted}"
    );

    // An enqueue raises its partition's depth.
    browser.set("queue-name", "jobs");
    browser.set("queue-key", "k1");
    browser.click("#queue-enq");
    browser.wait_for(
        "the partition's depth raised by the enqueue",
        &shots,
        "return [...document.querySelectorAll('#queues tr.partition')]\
         .filter(r => r.dataset.partition.startsWith('jobs/'))\
         .map(r => Number(r.querySelector('.depth').textContent))\
         .reduce((a, b) => a + b, 0);",
        |v| v.as_u64() == Some(1),
    );

    // A put at node1 turns its cell M; a get at node2 turns both S.
    browser.set("cache-key", "user:42");
    browser.set("cache-val", "{\"name\":\"Arya\"}");
    browser.set("cache-node", "node1");
    browser.click("#cache-put");
    browser.wait_for("user:42 M at node1", &shots, &cell_probe("user:42"), |v| {
        v["node1"] == "M"
    });
    browser.set("cache-node", "node2");
    browser.click("#cache-get");
    browser.wait_for(
        "user:42 S at node1 and node2",
        &shots,
        &cell_probe("user:42"),
        |v| v["node1"] == "S" && v["node2"] == "S",
    );
    browser.full_screenshot(&shots.join("2-busy.png"));

    // Stopping the leader through the console: a new leader, in a higher term.
    // "Within a few seconds": an election timeout or two, the feed's 500 ms, and the
    // slack a loaded CI machine needs (3.1 s measured with both cores busy).
    browser.click(&format!("#stop-{leader}"));
    let stopped_at = Instant::now();
    let cards = browser.wait_for_within(
        "a new leader in a higher term after stopping the leader",
        &shots,
        NODE_CARDS,
        |v| {
            v.as_array()
                .into_iter()
                .flatten()
                .any(|c| c[1] == "leader" && c[0] != leader.as_str() && c[2].as_u64() > Some(term))
        },
        Duration::from_secs(8),
    );
    println!(
        "{:?} after stopping {leader} (term {term}): {cards}",
        stopped_at.elapsed()
    );
    browser.full_screenshot(&shots.join("3-failover.png"));
    let answers = browser
        .js("return [...document.querySelectorAll('#answers li')].map(l => l.dataset.status);");
    assert!(
        answers.as_array().into_iter().flatten().all(|s| s == "200"),
        "every action was answered 200: {answers}"
    );
    // Phone-sized: the page reflows to one column and never scrolls sideways (wide
    // tables scroll inside their own section); every control is reachable by Tab.
    browser.send(
        "POST",
        "/window/rect",
        &json!({"x": 0, "y": 0, "width": 390, "height": 844}),
    );
    browser.wait_for(
        "the page without sideways scrolling at 390 px",
        &shots,
        "return document.documentElement.scrollWidth - window.innerWidth;",
        |v| v.as_i64().is_some_and(|over| over <= 0),
    );
    browser.screenshot(&shots.join("4-phone.png"));
    let unreachable = browser.js(
        "return [...document.querySelectorAll('button, input, select')]\
         .filter(e => e.tabIndex < 0 || e.disabled).map(e => e.id);",
    );
    assert_eq!(unreachable, json!([]), "controls out of the Tab order");
    let errors = browser.errors();
    assert!(errors.is_empty(), "the page logged errors: {errors:?}");
}
