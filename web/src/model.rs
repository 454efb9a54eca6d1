//! What the console shows, and how it changes: the view types the gateway sends
//! (`GET /api/cluster`, the `state` events of `GET /api/events`) and the console's
//! state as a reducer over actions.
//!
//! This half of the crate builds on every target, so the gateway serializes the very
//! types the browser parses, and the reducer is tested on the host with plain
//! `cargo test`. The reducer is the only place console state changes (STYLE principle
//! 4): the Yew components only dispatch [`Action`]s and render [`Console`].

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, VecDeque};

/// Timeline entries kept (term and leader changes, lock grants and refusals).
pub const MAX_TIMELINE: usize = 64;
/// Answers to the action forms kept.
pub const MAX_ANSWERS: usize = 16;
/// Points kept per sparkline.
pub const MAX_POINTS: usize = 60;

/// One snapshot of the cluster, as the gateway saw it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ClusterView {
    /// The gateway's wall clock when the snapshot was taken, in ms since the epoch.
    pub at_ms: u64,
    /// Every node, in id order.
    pub nodes: Vec<NodeCard>,
    /// The lock table (`None`: it could not be read for this snapshot; see `problems`).
    pub locks: Option<LocksPart>,
    /// Every queue (`None`: not read for this snapshot).
    pub queues: Option<Vec<QueueRow>>,
    /// Every node's cache.
    pub cache: Vec<CacheNode>,
    /// Calls per second and p99 latency through this gateway, per service.
    pub rates: Vec<ServiceRate>,
    /// Whether the fault-injection endpoints exist (`/api/fault/*`).
    pub faults: bool,
    /// Parts of the snapshot that could not be read, and why.
    pub problems: Vec<String>,
}

/// The lock table as one snapshot read it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocksPart {
    /// Every lock key held or waited on (up to the gateway's limit).
    pub keys: Vec<LockRow>,
    /// Lock requests refused for deadlock, since the cluster began.
    pub deadlocks: u64,
    /// The newest of them, oldest first, with their cycles.
    pub recent_deadlocks: Vec<DeadlockRow>,
}

/// A lock request refused because waiting would have closed a cycle.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadlockRow {
    /// The key asked for.
    pub key: String,
    /// The requester, whom it would wait for, ..., the requester.
    pub cycle: Vec<String>,
    /// How long ago, by the lock table's clock, ms.
    pub ago_ms: u64,
}

impl DeadlockRow {
    /// `c1 → c2 → c1`.
    pub fn cycle_text(&self) -> String {
        self.cycle.join(" → ")
    }
}

/// One node's card.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeCard {
    /// `node1`, ...
    pub id: String,
    /// It answered this snapshot's status call.
    pub up: bool,
    /// `leader`, `candidate`, `follower` (empty when down).
    pub role: String,
    /// Its current term.
    pub term: u64,
    /// The leader it knows.
    pub leader: Option<String>,
    /// Commit index.
    pub commit: u64,
    /// Applied index.
    pub applied: u64,
    /// When it last answered, gateway wall clock ms (0: never).
    pub last_seen_ms: u64,
}

/// One lock key.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockRow {
    /// The key.
    pub key: String,
    /// The strongest mode held (`X`, `S`), if any.
    pub mode: Option<String>,
    /// Holders.
    pub holders: Vec<LockHolder>,
    /// Waiters, in the order they will be granted.
    pub waiters: Vec<LockWaiter>,
}

/// A holder of a lock.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockHolder {
    /// Who.
    pub client_id: String,
    /// `X` or `S`.
    pub mode: String,
    /// The fencing token of its grant.
    pub token: u64,
    /// Lease left at the snapshot, ms.
    pub lease_left_ms: u64,
}

/// A caller waiting for a lock.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockWaiter {
    /// Who.
    pub client_id: String,
    /// `X` or `S`.
    pub mode: String,
}

/// One queue.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct QueueRow {
    /// Its name.
    pub queue: String,
    /// Messages ready.
    pub depth: u64,
    /// Messages delivered and not yet acked.
    pub inflight: u64,
    /// Dead letters.
    pub dead_letters: u64,
    /// Its partitions on the ring.
    pub partitions: Vec<PartitionRow>,
}

/// One partition of a queue.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PartitionRow {
    /// Its number.
    pub partition: u32,
    /// Messages ready.
    pub depth: u64,
    /// Delivered, not acked.
    pub inflight: u64,
    /// Its share of the hash ring, 0..1.
    pub ring_share: f64,
}

/// One node's cache.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheNode {
    /// The node.
    pub node: String,
    /// It answered the counters call (when not, the counters are the last read).
    pub up: bool,
    /// Counters since the node started.
    pub hits: u64,
    /// Misses.
    pub misses: u64,
    /// Lines invalidated by the directory.
    pub invalidations: u64,
    /// Write-backs sent.
    pub writebacks: u64,
    /// Lines evicted.
    pub evictions: u64,
    /// Its lines (key, `M`/`E`/`S`), most recently used first, up to the gateway's limit
    /// (`None`: not read for this snapshot).
    pub lines: Option<Vec<(String, String)>>,
}

/// Traffic of one service through this gateway over the last interval.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ServiceRate {
    /// `lock`, `queue`, `cache`.
    pub service: String,
    /// Calls per second.
    pub ops_per_s: f64,
    /// 99th percentile latency, ms (0 with no calls).
    pub p99_ms: f64,
}

/// Whether the live feed is connected.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Link {
    /// Not yet heard from.
    #[default]
    Connecting,
    /// Receiving snapshots.
    Live,
    /// Lost; the browser is reconnecting by itself.
    Reconnecting,
}

/// Something that happened, derived from two snapshots in a row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TimelineEvent {
    /// Gateway wall clock ms of the snapshot that showed it.
    pub at_ms: u64,
    /// What.
    pub what: String,
    /// A leader change (drawn stronger).
    pub leadership: bool,
}

/// The answer to one action form.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    /// What was asked (`POST /lock/acquire {...}`).
    pub asked: String,
    /// HTTP status (0: no answer).
    pub status: u16,
    /// The body, as text.
    pub body: String,
}

/// Everything the console shows.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Console {
    /// The live feed's state.
    pub link: Link,
    /// The latest snapshot.
    pub view: Option<ClusterView>,
    /// Term and leader changes, lock events: newest first.
    pub timeline: VecDeque<TimelineEvent>,
    /// Per service: ops/s and p99 points, oldest first.
    pub series: BTreeMap<String, VecDeque<(f64, f64)>>,
    /// Cache cells (key, node) whose state changed in the latest snapshot.
    pub flashes: Vec<(String, String)>,
    /// Answers to the forms, newest first.
    pub answers: VecDeque<Answer>,
}

/// What changes the console.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// A snapshot arrived.
    Snapshot(ClusterView),
    /// The feed was lost.
    LinkLost,
    /// A form's call answered.
    Answered(Answer),
}

impl Console {
    /// The one place console state changes.
    pub fn reduce(&mut self, action: Action) {
        match action {
            Action::Snapshot(mut view) => {
                // After the feed was lost the gateway may be another one (the cluster
                // restarted): its first snapshot is a new baseline, not a change.
                let old = self
                    .view
                    .as_ref()
                    .filter(|_| self.link != Link::Reconnecting);
                if let Some(old) = old {
                    keep_unread_parts(old, &mut view);
                    for event in changes(old, &view) {
                        push_bounded(&mut self.timeline, event, MAX_TIMELINE);
                    }
                    self.flashes = cache_changes(old, &view);
                } else {
                    self.flashes.clear();
                }
                for rate in &view.rates {
                    let points = self.series.entry(rate.service.clone()).or_default();
                    points.push_back((rate.ops_per_s, rate.p99_ms));
                    while points.len() > MAX_POINTS {
                        points.pop_front();
                    }
                }
                self.view = Some(view);
                self.link = Link::Live;
            }
            Action::LinkLost => self.link = Link::Reconnecting,
            Action::Answered(answer) => push_bounded(&mut self.answers, answer, MAX_ANSWERS),
        }
    }

    /// The node every reachable node agrees leads, if exactly one claims it.
    pub fn leader(&self) -> Option<&NodeCard> {
        let view = self.view.as_ref()?;
        let mut leaders = view.nodes.iter().filter(|n| n.up && n.role == "leader");
        let first = leaders.next()?;
        leaders.next().is_none().then_some(first)
    }

    /// The cache matrix: every key some node holds, with its state per node (`I` where
    /// a node has no line), keys in order.
    pub fn cache_matrix(&self) -> Vec<(String, Vec<String>)> {
        let Some(view) = &self.view else {
            return Vec::new();
        };
        let mut keys: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for (i, node) in view.cache.iter().enumerate() {
            for (key, state) in node.lines.iter().flatten() {
                let row = keys
                    .entry(key)
                    .or_insert_with(|| vec!["I".to_owned(); view.cache.len()]);
                row[i].clone_from(state);
            }
        }
        keys.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
    }
}

/// A part of the snapshot the gateway could not read (a slow or lost node, no leader)
/// says nothing changed: it keeps the last one read, so that a read failure is neither
/// drawn as empty tables nor logged as releases and invalidations.
fn keep_unread_parts(old: &ClusterView, new: &mut ClusterView) {
    if new.locks.is_none() {
        new.locks.clone_from(&old.locks);
    }
    if new.queues.is_none() {
        new.queues.clone_from(&old.queues);
    }
    for node in &mut new.cache {
        let Some(before) = old.cache.iter().find(|c| c.node == node.node) else {
            continue;
        };
        // A node that does not answer at all (stopped, crashed) holds nothing anyone
        // can read: its lines are not kept, or the matrix would show a second owner
        // once the directory gives its keys to another node.
        let answering = new.nodes.iter().any(|n| n.id == node.node && n.up);
        if node.lines.is_none() && answering {
            node.lines.clone_from(&before.lines);
        }
        if !node.up {
            node.hits = before.hits;
            node.misses = before.misses;
            node.invalidations = before.invalidations;
            node.writebacks = before.writebacks;
            node.evictions = before.evictions;
        }
    }
}

fn push_bounded<T>(list: &mut VecDeque<T>, item: T, cap: usize) {
    list.push_front(item);
    list.truncate(cap);
}

/// Term and leader changes, lock grants, releases and new waiters, newest last.
fn changes(old: &ClusterView, new: &ClusterView) -> Vec<TimelineEvent> {
    let mut out = Vec::new();
    let leader_of = |v: &ClusterView| {
        v.nodes
            .iter()
            .filter(|n| n.up && n.role == "leader")
            .max_by_key(|n| n.term)
            .map(|n| (n.id.clone(), n.term))
    };
    let (was, is) = (leader_of(old), leader_of(new));
    if was != is {
        let what = match &is {
            Some((id, term)) => format!("{id} leads in term {term}"),
            None => "no leader".to_owned(),
        };
        out.push(TimelineEvent {
            at_ms: new.at_ms,
            what,
            leadership: true,
        });
    }
    for node in &new.nodes {
        let before = old.nodes.iter().find(|n| n.id == node.id);
        if before.is_some_and(|b| b.up && !node.up) {
            out.push(event(new, format!("{} stopped answering", node.id)));
        }
        if before.is_some_and(|b| !b.up && node.up) {
            out.push(event(new, format!("{} is back", node.id)));
        }
    }
    let holders = |v: &ClusterView| {
        v.locks
            .iter()
            .flat_map(|l| &l.keys)
            .flat_map(|l| {
                l.holders.iter().map(move |h| {
                    (
                        (l.key.clone(), h.client_id.clone()),
                        (h.mode.clone(), h.token),
                    )
                })
            })
            .collect::<BTreeMap<_, _>>()
    };
    // The first lock table read is the baseline, as the first snapshot is.
    let (before, after) = if old.locks.is_some() {
        (holders(old), holders(new))
    } else {
        Default::default()
    };
    for ((key, client), (mode, token)) in &after {
        if before.get(&(key.clone(), client.clone())) != Some(&(mode.clone(), *token)) {
            out.push(event(
                new,
                format!("{client} holds {key} ({mode}, token {token})"),
            ));
        }
    }
    for (key, client) in before.keys() {
        if !after.contains_key(&(key.clone(), client.clone())) {
            out.push(event(new, format!("{client} released {key}")));
        }
    }
    let deadlocks = |v: &ClusterView| v.locks.as_ref().map_or(0, |l| l.deadlocks);
    let recent: &[DeadlockRow] = new.locks.as_ref().map_or(&[], |l| &l.recent_deadlocks);
    if old.locks.is_some() && deadlocks(new) > deadlocks(old) {
        let n = deadlocks(new) - deadlocks(old);
        let shown = recent.len().min(n as usize);
        for d in &recent[recent.len() - shown..] {
            out.push(event(
                new,
                format!("deadlock refused: {} (asking {})", d.cycle_text(), d.key),
            ));
        }
        if n as usize > shown {
            out.push(event(
                new,
                format!(
                    "{} more lock request(s) refused: deadlock",
                    n as usize - shown
                ),
            ));
        }
    }
    out
}

fn event(view: &ClusterView, what: String) -> TimelineEvent {
    TimelineEvent {
        at_ms: view.at_ms,
        what,
        leadership: false,
    }
}

/// Cache cells whose state differs between two snapshots.
fn cache_changes(old: &ClusterView, new: &ClusterView) -> Vec<(String, String)> {
    // Only nodes whose lines were read before: a first read is a baseline.
    let known = |n: &&CacheNode| {
        old.cache
            .iter()
            .any(|o| o.node == n.node && o.lines.is_some())
    };
    let cells = |v: &ClusterView| {
        v.cache
            .iter()
            .filter(known)
            .flat_map(|n| {
                n.lines
                    .iter()
                    .flatten()
                    .map(move |(k, s)| ((k.clone(), n.node.clone()), s.clone()))
            })
            .collect::<BTreeMap<_, _>>()
    };
    let (before, after) = (cells(old), cells(new));
    let mut out: Vec<(String, String)> = after
        .iter()
        .filter(|(cell, state)| before.get(*cell) != Some(state))
        .map(|(cell, _)| cell.clone())
        .collect();
    out.extend(before.keys().filter(|c| !after.contains_key(*c)).cloned());
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str, role: &str, term: u64) -> NodeCard {
        NodeCard {
            id: id.to_owned(),
            up: true,
            role: role.to_owned(),
            term,
            ..NodeCard::default()
        }
    }

    fn view(at_ms: u64, nodes: Vec<NodeCard>) -> ClusterView {
        ClusterView {
            at_ms,
            nodes,
            ..ClusterView::default()
        }
    }

    #[test]
    fn a_leader_change_is_one_timeline_event_with_the_new_term() {
        let mut c = Console::default();
        c.reduce(Action::Snapshot(view(
            1,
            vec![node("node1", "leader", 2), node("node2", "follower", 2)],
        )));
        assert!(c.timeline.is_empty(), "the first snapshot is the baseline");
        assert_eq!(c.leader().map(|n| n.id.as_str()), Some("node1"));
        let mut down = node("node1", "", 0);
        down.up = false;
        c.reduce(Action::Snapshot(view(
            2,
            vec![down, node("node2", "leader", 3)],
        )));
        assert_eq!(c.leader().map(|n| n.id.as_str()), Some("node2"));
        let leadership: Vec<_> = c.timeline.iter().filter(|e| e.leadership).collect();
        assert_eq!(leadership.len(), 1);
        assert_eq!(leadership[0].what, "node2 leads in term 3");
        assert!(c
            .timeline
            .iter()
            .any(|e| e.what == "node1 stopped answering"));
    }

    #[test]
    fn two_nodes_claiming_to_lead_show_no_leader() {
        let mut c = Console::default();
        c.reduce(Action::Snapshot(view(
            1,
            vec![node("node1", "leader", 2), node("node2", "leader", 3)],
        )));
        assert!(c.leader().is_none());
    }

    #[test]
    fn the_cache_matrix_fills_missing_cells_with_i_and_flashes_changes() {
        let cache = |lines1: Vec<(&str, &str)>, lines2: Vec<(&str, &str)>| {
            let own = |l: Vec<(&str, &str)>| {
                l.into_iter()
                    .map(|(k, s)| (k.to_owned(), s.to_owned()))
                    .collect()
            };
            vec![
                CacheNode {
                    node: "node1".into(),
                    up: true,
                    lines: Some(own(lines1)),
                    ..CacheNode::default()
                },
                CacheNode {
                    node: "node2".into(),
                    up: true,
                    lines: Some(own(lines2)),
                    ..CacheNode::default()
                },
            ]
        };
        let mut c = Console::default();
        c.reduce(Action::Snapshot(ClusterView {
            cache: cache(vec![("k", "M")], vec![]),
            ..ClusterView::default()
        }));
        assert_eq!(
            c.cache_matrix(),
            vec![("k".to_owned(), vec!["M".to_owned(), "I".to_owned()])]
        );
        assert!(c.flashes.is_empty());
        c.reduce(Action::Snapshot(ClusterView {
            cache: cache(vec![("k", "S")], vec![("k", "S")]),
            ..ClusterView::default()
        }));
        assert_eq!(
            c.cache_matrix(),
            vec![("k".to_owned(), vec!["S".to_owned(), "S".to_owned()])]
        );
        assert_eq!(
            c.flashes,
            vec![
                ("k".to_owned(), "node1".to_owned()),
                ("k".to_owned(), "node2".to_owned())
            ]
        );
        c.reduce(Action::Snapshot(ClusterView {
            cache: cache(vec![], vec![("k", "S")]),
            ..ClusterView::default()
        }));
        assert_eq!(
            c.flashes,
            vec![("k".to_owned(), "node1".to_owned())],
            "a line that left flashes too"
        );
    }

    #[test]
    fn lock_grants_releases_and_deadlocks_reach_the_timeline() {
        let held = |client: &str, token: u64| LockRow {
            key: "A".into(),
            mode: Some("X".into()),
            holders: vec![LockHolder {
                client_id: client.into(),
                mode: "X".into(),
                token,
                lease_left_ms: 1000,
            }],
            waiters: vec![],
        };
        let mut c = Console::default();
        c.reduce(Action::Snapshot(ClusterView {
            locks: Some(LocksPart::default()),
            ..ClusterView::default()
        }));
        c.reduce(Action::Snapshot(ClusterView {
            locks: Some(LocksPart {
                keys: vec![held("c1", 7)],
                ..LocksPart::default()
            }),
            ..ClusterView::default()
        }));
        assert_eq!(c.timeline[0].what, "c1 holds A (X, token 7)");
        c.reduce(Action::Snapshot(ClusterView {
            locks: Some(LocksPart {
                deadlocks: 3,
                recent_deadlocks: vec![DeadlockRow {
                    key: "B".into(),
                    cycle: vec!["c2".into(), "c1".into(), "c2".into()],
                    ago_ms: 10,
                }],
                ..LocksPart::default()
            }),
            ..ClusterView::default()
        }));
        let whats: Vec<&str> = c.timeline.iter().map(|e| e.what.as_str()).collect();
        assert_eq!(
            whats[..3],
            [
                "2 more lock request(s) refused: deadlock",
                "deadlock refused: c2 → c1 → c2 (asking B)",
                "c1 released A"
            ]
        );
    }

    /// A part the gateway could not read (its node slow, no leader) keeps the last one
    /// read: no false releases or invalidations, no blank tables.
    #[test]
    fn an_unread_part_keeps_the_last_one_read() {
        let read = |lines: Option<Vec<(String, String)>>, hits| ClusterView {
            locks: Some(LocksPart {
                keys: vec![LockRow {
                    key: "A".into(),
                    mode: Some("X".into()),
                    holders: vec![LockHolder {
                        client_id: "c1".into(),
                        mode: "X".into(),
                        token: 1,
                        lease_left_ms: 1000,
                    }],
                    waiters: vec![],
                }],
                deadlocks: 2,
                recent_deadlocks: vec![],
            }),
            queues: Some(vec![QueueRow {
                queue: "q".into(),
                depth: 5,
                ..QueueRow::default()
            }]),
            cache: vec![CacheNode {
                node: "node1".into(),
                up: hits > 0,
                hits,
                lines,
                ..CacheNode::default()
            }],
            nodes: vec![node("node1", "leader", 1)],
            ..ClusterView::default()
        };
        let lines = Some(vec![("k".to_owned(), "M".to_owned())]);
        let mut c = Console::default();
        c.reduce(Action::Snapshot(read(lines.clone(), 9)));
        let first = c.view.clone();
        c.reduce(Action::Snapshot(ClusterView {
            problems: vec!["locks: no leader".into()],
            cache: vec![CacheNode {
                node: "node1".into(),
                ..CacheNode::default()
            }],
            nodes: vec![node("node1", "leader", 1)],
            ..ClusterView::default()
        }));
        assert!(c.timeline.is_empty(), "nothing happened: {:?}", c.timeline);
        assert!(c.flashes.is_empty());
        let view = c.view.as_ref().expect("a view");
        assert_eq!(view.locks, first.as_ref().and_then(|v| v.locks.clone()));
        assert_eq!(view.queues.as_ref().map(|q| q[0].depth), Some(5));
        assert_eq!(view.cache[0].hits, 9, "the last counters read");
        assert!(!view.cache[0].up, "shown as not answering");
        assert_eq!(
            c.cache_matrix(),
            vec![("k".to_owned(), vec!["M".to_owned()])]
        );
        // Read again and changed: that is an event.
        c.reduce(Action::Snapshot(ClusterView {
            locks: Some(LocksPart::default()),
            ..read(Some(vec![]), 9)
        }));
        let whats: Vec<&str> = c.timeline.iter().map(|e| e.what.as_str()).collect();
        assert_eq!(whats, ["c1 released A"]);
        assert_eq!(c.flashes, vec![("k".to_owned(), "node1".to_owned())]);
    }

    /// A node that answers nothing (stopped) keeps no lines: shown kept, they would read
    /// as a second owner once its keys go to another node. A node's first lines read are
    /// a baseline, and so is the first snapshot after the feed was lost.
    #[test]
    fn a_stopped_node_keeps_no_lines_and_first_reads_are_baselines() {
        let with = |up: bool, lines: Option<Vec<(&str, &str)>>| {
            let mut card = node("node1", "follower", 1);
            card.up = up;
            ClusterView {
                nodes: vec![card],
                cache: vec![CacheNode {
                    node: "node1".into(),
                    up,
                    lines: lines.map(|l| {
                        l.into_iter()
                            .map(|(k, s)| (k.to_owned(), s.to_owned()))
                            .collect()
                    }),
                    ..CacheNode::default()
                }],
                ..ClusterView::default()
            }
        };
        let mut c = Console::default();
        c.reduce(Action::Snapshot(with(true, None)));
        c.reduce(Action::Snapshot(with(true, Some(vec![("k", "M")]))));
        assert!(c.flashes.is_empty(), "a first read is a baseline");
        c.reduce(Action::Snapshot(with(false, None)));
        assert_eq!(c.cache_matrix(), vec![], "a stopped node shows no lines");
        assert_eq!(c.flashes, vec![("k".to_owned(), "node1".to_owned())]);
        c.reduce(Action::Snapshot(with(true, Some(vec![("k", "S")]))));
        c.reduce(Action::LinkLost);
        c.reduce(Action::Snapshot(with(true, Some(vec![("j", "E")]))));
        assert!(c.flashes.is_empty(), "after a lost feed, a new baseline");
        assert!(c.timeline.iter().all(|e| !e.what.contains("released")));
    }

    #[test]
    fn the_lists_stay_bounded() {
        let mut c = Console::default();
        for i in 0..(MAX_POINTS as u64 + 10) {
            let rates = vec![ServiceRate {
                service: "lock".into(),
                ops_per_s: i as f64,
                p99_ms: 1.0,
            }];
            c.reduce(Action::Snapshot(ClusterView {
                at_ms: i,
                locks: Some(LocksPart {
                    deadlocks: i,
                    ..LocksPart::default()
                }),
                rates,
                ..ClusterView::default()
            }));
            c.reduce(Action::Answered(Answer {
                asked: "x".into(),
                status: 200,
                body: String::new(),
            }));
        }
        assert_eq!(c.series["lock"].len(), MAX_POINTS);
        assert_eq!(
            c.series["lock"].back().map(|p| p.0),
            Some((MAX_POINTS + 9) as f64)
        );
        assert_eq!(c.timeline.len(), MAX_TIMELINE);
        assert_eq!(c.answers.len(), MAX_ANSWERS);
    }

    #[test]
    fn a_lost_feed_says_reconnecting_until_the_next_snapshot() {
        let mut c = Console::default();
        assert_eq!(c.link, Link::Connecting);
        c.reduce(Action::LinkLost);
        assert_eq!(c.link, Link::Reconnecting);
        c.reduce(Action::Snapshot(ClusterView::default()));
        assert_eq!(c.link, Link::Live);
    }
}
