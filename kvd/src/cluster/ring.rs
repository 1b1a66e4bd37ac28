//! Placement: which nodes hold each hash slot, computed from the membership
//! alone, so every node that knows the same members computes the same map.
//!
//! The method is consistent hashing with bounded loads (Mirrokni, Thorup and
//! Zadimoghaddam, 2017; used by Google Cloud Pub/Sub and Vimeo): every node has
//! `VNODES` points on a 64-bit ring, every slot a point of its own, and a slot
//! goes to the first node clockwise from its point that still has room under
//! the cap `max(⌈mean⌉, ⌊(1 + ε)·mean⌋)`. The ring alone makes a join or leave
//! move about 1/n of the slots; the cap bounds the most loaded node at about
//! (1 + ε) times the mean, which plain rings (max/mean ≈ 1.3–2 with few points)
//! cannot promise. Slots are placed in ring order, so a join disturbs only the
//! arcs where the capacity changed hands.
//!
//! A slot maps to an ordered list of distinct nodes: the owner first, then the
//! nodes that follow it clockwise — the replicas of the replication issue.
//!
//! The hash functions are fixed here (FNV-1a then a SplitMix64 finaliser), never
//! a process-seeded hasher: the map must be identical on every node and across
//! versions, or nodes would disagree on where keys live.

use super::slot::SLOTS;

/// Points per node on the ring.
pub const VNODES: u64 = 128;
/// The load bound's slack: no node holds more than about (1 + ε) × the mean.
pub const EPSILON: f64 = 0.1;

/// Which nodes hold each slot, as indexes into the member list it was computed from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    /// `holders[slot]`: up to `replicas` distinct member indexes, owner first.
    holders: Vec<Vec<u32>>,
}

impl Placement {
    /// The placement of all slots over `members` (node ids; their order does not
    /// matter) with `replicas` holders per slot (fewer if there are fewer members).
    pub fn compute(members: &[&str], replicas: usize) -> Placement {
        if members.is_empty() {
            return Placement {
                holders: vec![Vec::new(); SLOTS],
            };
        }
        let n = members.len();
        let mut ring: Vec<(u64, u32)> = Vec::with_capacity(n * VNODES as usize);
        for (i, id) in members.iter().enumerate() {
            let base = fnv1a(id.as_bytes());
            for v in 0..VNODES {
                ring.push((mix(base ^ mix(v + 1)), i as u32));
            }
        }
        // Ties between points are broken by node id, not member order, so the
        // map does not depend on the order the members were listed in.
        ring.sort_unstable_by(|a, b| {
            a.0.cmp(&b.0)
                .then_with(|| members[a.1 as usize].cmp(members[b.1 as usize]))
        });
        let mean = SLOTS as f64 / n as f64;
        let cap = (mean.ceil() as usize).max(((1.0 + EPSILON) * mean).floor() as usize);
        let mut load = vec![0usize; n];
        let mut order: Vec<(u64, u16)> = (0..SLOTS as u16).map(|s| (slot_point(s), s)).collect();
        order.sort_unstable();
        let replicas = replicas.clamp(1, n);
        let mut holders = vec![Vec::new(); SLOTS];
        for (point, slot) in order {
            let start = ring.partition_point(|&(p, _)| p < point);
            let mut list: Vec<u32> = Vec::with_capacity(replicas);
            // The owner: the first node clockwise with room. `cap * n >= SLOTS`,
            // so some node always has room and the walk ends within one turn.
            for k in 0..ring.len() {
                let node = ring[(start + k) % ring.len()].1;
                if load[node as usize] < cap {
                    load[node as usize] += 1;
                    list.push(node);
                    break;
                }
            }
            // The replicas: the next distinct nodes clockwise from the owner's point.
            let mut k = 0;
            while list.len() < replicas && k < ring.len() {
                let node = ring[(start + k) % ring.len()].1;
                if !list.contains(&node) {
                    list.push(node);
                }
                k += 1;
            }
            holders[slot as usize] = list;
        }
        Placement { holders }
    }

    /// The holders of `slot`, owner first (empty when there are no members).
    pub fn holders(&self, slot: u16) -> &[u32] {
        &self.holders[slot as usize]
    }

    /// The owner of `slot`.
    pub fn owner(&self, slot: u16) -> Option<u32> {
        self.holders[slot as usize].first().copied()
    }
}

/// Slots sit evenly spaced on the ring in slot order, so a node's arc is a run
/// of consecutive slots: CLUSTER SLOTS stays a few hundred ranges, not thousands.
fn slot_point(slot: u16) -> u64 {
    (slot as u64) << 50
}

/// FNV-1a: a fast, stable 64-bit hash of short byte strings.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// SplitMix64's finaliser: a fixed, well-mixing 64-bit permutation.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// What a membership change does to the placement: the numbers the cluster
/// simulation reports.
#[derive(Debug, Clone, Copy)]
pub struct ChangeStats {
    /// Slots whose owner changed.
    pub moved: usize,
    /// `moved / SLOTS`.
    pub moved_fraction: f64,
    /// Most slots owned by one node, over the mean, after the change.
    pub max_over_mean: f64,
}

/// Owner counts of a placement over `n` members: (max/mean).
pub fn balance(p: &Placement, n: usize) -> f64 {
    let mut load = vec![0usize; n];
    for s in 0..SLOTS as u16 {
        if let Some(o) = p.owner(s) {
            load[o as usize] += 1;
        }
    }
    let max = load.iter().copied().max().unwrap_or(0);
    max as f64 / (SLOTS as f64 / n as f64)
}

/// Slots whose owner differs between two placements, comparing owners by id.
pub fn moved(before: (&Placement, &[&str]), after: (&Placement, &[&str])) -> usize {
    (0..SLOTS as u16)
        .filter(|&s| {
            let a = before.0.owner(s).map(|i| before.1[i as usize]);
            let b = after.0.owner(s).map(|i| after.1[i as usize]);
            a != b
        })
        .count()
}

/// Simulates one node joining a cluster of `n` and one of the `n + 1` leaving.
pub fn simulate(n: usize) -> (ChangeStats, ChangeStats) {
    let ids: Vec<String> = (0..=n).map(|i| format!("node-{i:05}")).collect();
    let before: Vec<&str> = ids[..n].iter().map(String::as_str).collect();
    let joined: Vec<&str> = ids.iter().map(String::as_str).collect();
    let left: Vec<&str> = joined.iter().copied().filter(|id| *id != ids[n / 2]).collect();
    let (p0, p1, p2) = (
        Placement::compute(&before, 1),
        Placement::compute(&joined, 1),
        Placement::compute(&left, 1),
    );
    let stats = |a: (&Placement, &[&str]), b: (&Placement, &[&str]), members: usize| {
        let m = moved(a, b);
        ChangeStats {
            moved: m,
            moved_fraction: m as f64 / SLOTS as f64,
            max_over_mean: balance(b.0, members),
        }
    };
    (
        stats((&p0, &before), (&p1, &joined), n + 1),
        stats((&p1, &joined), (&p2, &left), n),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("{:040x}", i * 7919 + 1)).collect()
    }

    #[test]
    fn every_slot_has_distinct_holders_and_the_map_ignores_member_order() {
        let ids = ids(5);
        let a: Vec<&str> = ids.iter().map(String::as_str).collect();
        let mut b = a.clone();
        b.reverse();
        let (pa, pb) = (Placement::compute(&a, 3), Placement::compute(&b, 3));
        for s in 0..SLOTS as u16 {
            let ha: Vec<&str> = pa.holders(s).iter().map(|&i| a[i as usize]).collect();
            let hb: Vec<&str> = pb.holders(s).iter().map(|&i| b[i as usize]).collect();
            assert_eq!(ha, hb, "slot {s}");
            assert_eq!(ha.len(), 3);
            let mut d = ha.clone();
            d.dedup();
            d.sort();
            d.dedup();
            assert_eq!(d.len(), 3, "holders of {s} repeat");
        }
        assert_eq!(Placement::compute(&a[..2], 3).holders(7).len(), 2);
        assert!(Placement::compute(&[], 3).owner(7).is_none());
    }

    #[test]
    fn load_is_bounded_and_a_join_moves_about_one_nth() {
        for n in [3usize, 10, 100] {
            let (join, leave) = simulate(n);
            let ideal = 1.0 / (n + 1) as f64;
            assert!(join.max_over_mean <= 1.1 + 1e-9, "n={n}: {join:?}");
            assert!(leave.max_over_mean <= 1.1 + 1e-9, "n={n}: {leave:?}");
            // Bounded loads cost some extra movement over the ideal 1/n.
            assert!(join.moved_fraction < 2.5 * ideal, "n={n}: {join:?} ideal {ideal}");
            assert!(leave.moved_fraction < 2.5 / n as f64, "n={n}: {leave:?}");
        }
    }
}
