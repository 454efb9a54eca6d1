//! Checks of the locks as the simulator's clients saw them (DESIGN.md section 6).
//!
//! A client holds a lock from the moment it hears the grant until it sends the release,
//! or until its lease ends *by its own clock*, counted from when it sent the acquire (or
//! the renew that extended it) and shortened by the clock-rate bound the cluster is run
//! with. Over every key:
//! - no two clients hold incompatible modes at the same instant (X with anything);
//! - fencing tokens increase in grant order: of two holds that exclude each other, the
//!   one that ended before the other began has the smaller token, so a storage server that refuses smaller tokens refuses a
//!   holder whose lease is over.

use mesh_core::services::lock::Mode;
use std::collections::BTreeMap;

/// One hold as its client saw it, in virtual milliseconds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HoldInterval {
    /// Lock key.
    pub key: u64,
    /// Client.
    pub client: u64,
    /// Mode held.
    pub mode: Mode,
    /// Fencing token of the grant.
    pub token: u64,
    /// When the client heard the grant.
    pub start: u64,
    /// When it sent the release, or its lease ended by its clock.
    pub end: u64,
}

/// Check every key's holds.
pub fn check(holds: &[HoldInterval]) -> Result<(), String> {
    let mut by_key: BTreeMap<u64, Vec<&HoldInterval>> = BTreeMap::new();
    for h in holds.iter().filter(|h| h.start < h.end) {
        by_key.entry(h.key).or_default().push(h);
    }
    for (key, hs) in by_key {
        for (i, a) in hs.iter().enumerate() {
            for b in &hs[i + 1..] {
                if a.client == b.client {
                    continue;
                }
                if a.mode == Mode::S && b.mode == Mode::S {
                    // Shared holds may overlap, and their tokens fence nothing between them.
                    continue;
                }
                let overlap = a.start < b.end && b.start < a.end;
                if overlap {
                    return Err(format!(
                        "lock {key}: client {} held {:?} over [{}, {}) while client {} held {:?} over [{}, {})",
                        a.client, a.mode, a.start, a.end, b.client, b.mode, b.start, b.end
                    ));
                }
                let (first, second) = if a.end <= b.start { (a, b) } else { (b, a) };
                if first.end <= second.start && first.token >= second.token {
                    return Err(format!(
                        "lock {key}: fencing token {} of client {} ({:?}, held until {}) is not below token {} of client {} ({:?}, held from {})",
                        first.token, first.client, first.mode, first.end, second.token, second.client, second.mode, second.start
                    ));
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hold(client: u64, mode: Mode, token: u64, start: u64, end: u64) -> HoldInterval {
        HoldInterval {
            key: 0,
            client,
            mode,
            token,
            start,
            end,
        }
    }

    #[test]
    fn sequential_and_shared_holds_pass() {
        let h = [
            hold(1, Mode::X, 5, 0, 10),
            hold(2, Mode::S, 9, 10, 30),
            hold(3, Mode::S, 10, 12, 40),
            hold(1, Mode::X, 20, 41, 50),
        ];
        assert_eq!(check(&h), Ok(()));
    }

    #[test]
    fn overlapping_exclusive_holds_fail() {
        let h = [hold(1, Mode::X, 5, 0, 10), hold(2, Mode::S, 6, 9, 20)];
        assert!(check(&h).unwrap_err().contains("held"));
    }

    #[test]
    fn a_later_hold_with_a_smaller_token_fails() {
        let h = [hold(1, Mode::X, 7, 0, 10), hold(2, Mode::X, 6, 11, 20)];
        assert!(check(&h).unwrap_err().contains("fencing token"));
    }
}
