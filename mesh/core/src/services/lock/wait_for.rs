//! `WaitForGraph`: who waits for whom, built from the lock table, to refuse a request
//! that would close a cycle of waiters (a deadlock) the moment it is made.
//!
//! A waiter waits for every holder of its key and for every waiter queued ahead of it
//! (FIFO: they are served first). A new request from `c` that would wait on clients `T`
//! closes a cycle iff some client in `T` can already reach `c`.

use std::collections::{BTreeMap, BTreeSet};

/// Directed edges waiter -> client it waits for.
#[derive(Debug, Default)]
pub(crate) struct WaitForGraph {
    edges: BTreeMap<String, BTreeSet<String>>,
}

impl WaitForGraph {
    pub(crate) fn add(&mut self, waiter: &str, waits_for: &str) {
        if waiter != waits_for {
            self.edges
                .entry(waiter.to_string())
                .or_default()
                .insert(waits_for.to_string());
        }
    }

    /// A path from any of `from` to `to`, as the list of clients on it (starting with the
    /// one in `from`, ending with `to`), if one exists.
    pub(crate) fn path_to(&self, from: &BTreeSet<String>, to: &str) -> Option<Vec<String>> {
        let mut parent: BTreeMap<&str, &str> = BTreeMap::new();
        let mut queue: std::collections::VecDeque<&str> = from.iter().map(String::as_str).collect();
        let mut seen: BTreeSet<&str> = from.iter().map(String::as_str).collect();
        while let Some(node) = queue.pop_front() {
            if node == to {
                let mut path = vec![node.to_string()];
                let mut cur = node;
                while let Some(&p) = parent.get(cur) {
                    path.push(p.to_string());
                    cur = p;
                }
                path.reverse();
                return Some(path);
            }
            for next in self.edges.get(node).into_iter().flatten() {
                if seen.insert(next) {
                    parent.insert(next, node);
                    queue.push_back(next);
                }
            }
        }
        None
    }
}
