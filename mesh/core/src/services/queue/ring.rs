//! `HashRing`: consistent hashing of message keys onto a queue's partitions.
//!
//! Each partition owns [`VNODES`] points on a 64-bit ring; a key belongs to the first
//! point at or after its hash (wrapping). The points depend only on the partition count,
//! so every replica, and every future version, maps a key to the same partition, and a
//! later change of the partition count moves only the keys whose nearest point changed
//! (about 1/P of them per partition added), which is what a documented migration needs.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock};

/// The ring of `partitions` partitions, built once per process: a pure function of the
/// count, cached (deterministic, and no state a replica could disagree on).
pub fn shared(partitions: u32) -> Arc<HashRing> {
    static RINGS: OnceLock<Mutex<BTreeMap<u32, Arc<HashRing>>>> = OnceLock::new();
    let rings = RINGS.get_or_init(|| Mutex::new(BTreeMap::new()));
    // The map is only inserted into; a panic elsewhere cannot leave it half-written.
    let mut rings = rings
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    rings
        .entry(partitions)
        .or_insert_with(|| Arc::new(HashRing::new(partitions)))
        .clone()
}

/// Points per partition on the ring.
pub const VNODES: u32 = 64;

/// 64-bit FNV-1a followed by a SplitMix64 finalizer: stable across platforms and
/// versions (the std hasher is neither), and well spread for short keys.
pub fn stable_hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xCBF2_9CE4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01B3);
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    h ^ (h >> 31)
}

/// The ring of one queue.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HashRing {
    /// (point, partition), sorted by point.
    points: Vec<(u64, u32)>,
}

impl HashRing {
    /// The ring of `partitions` partitions (at least 1).
    pub fn new(partitions: u32) -> Self {
        let partitions = partitions.max(1);
        let mut points: Vec<(u64, u32)> = (0..partitions)
            .flat_map(|p| {
                (0..VNODES).map(move |v| {
                    (
                        stable_hash(format!("partition-{p}/vnode-{v}").as_bytes()),
                        p,
                    )
                })
            })
            .collect();
        points.sort_unstable();
        points.dedup_by_key(|(point, _)| *point);
        Self { points }
    }

    /// The partition that owns `key`.
    pub fn partition(&self, key: &str) -> u32 {
        let h = stable_hash(key.as_bytes());
        let i = self.points.partition_point(|(point, _)| *point < h);
        self.points
            .get(i)
            .or_else(|| self.points.first())
            .map_or(0, |(_, p)| *p)
    }

    /// The points, in ring order.
    pub fn points(&self) -> &[(u64, u32)] {
        &self.points
    }

    /// The share of the hash space each partition owns (sums to 1).
    pub fn shares(&self, partitions: u32) -> Vec<f64> {
        let mut owned = vec![0u128; partitions.max(1) as usize];
        let Some(&(last, _)) = self.points.last() else {
            return vec![0.0; owned.len()];
        };
        // The arc ending at a point belongs to that point's partition.
        let mut previous = last;
        for &(point, p) in &self.points {
            let arc = point.wrapping_sub(previous);
            if let Some(o) = owned.get_mut(p as usize) {
                *o += u128::from(arc);
            }
            previous = point;
        }
        let total = owned.iter().sum::<u128>().max(1) as f64;
        owned.into_iter().map(|o| o as f64 / total).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_key_same_partition_and_every_partition_gets_keys() {
        let ring = HashRing::new(16);
        let mut counts = [0u32; 16];
        for i in 0..16_000 {
            let key = format!("user:{i}");
            let p = ring.partition(&key);
            assert_eq!(p, HashRing::new(16).partition(&key));
            counts[p as usize] += 1;
        }
        // 64 points per partition spread keys within a factor of two of the mean.
        for c in counts {
            assert!((500..2000).contains(&c), "{counts:?}");
        }
        let shares = ring.shares(16);
        assert!((shares.iter().sum::<f64>() - 1.0).abs() < 1e-9);
    }

    #[test]
    fn adding_a_partition_moves_few_keys() {
        let (a, b) = (HashRing::new(16), HashRing::new(17));
        let moved = (0..10_000)
            .filter(|i| {
                let k = format!("k{i}");
                a.partition(&k) != b.partition(&k)
            })
            .count();
        // Ideal is 1/17 (about 590); a modulo hash would move about 94%.
        assert!(moved < 1_200, "{moved} of 10000 keys moved");
    }

    #[test]
    fn the_hash_is_stable() {
        // Pinned: a change here re-partitions every stored queue.
        assert_eq!(stable_hash(b"user:42"), 15_459_934_360_431_365_172);
        assert_eq!(HashRing::new(16).partition("user:42"), 6);
    }
}
