//! The set of blobs found reachable, in bounded memory.
//!
//! Directories, indexes, commits and inode tables ("interior" blobs: the walk
//! must know exactly which it has visited, or it would skip a subtree) are kept
//! exactly, about 40 bytes each. Chunks and file manifests, the great majority
//! of blobs, go into a Bloom filter sized for the number of candidates: 10 bits
//! per candidate, under 1% false positives. A false positive only keeps a garbage chunk until the next
//! collection (each run salts the filter differently); it never deletes a live one.

use std::collections::HashSet;

use crate::object::Hash;

pub struct MarkSet {
    interior: HashSet<Hash>,
    bits: Vec<u64>,
    salt: u64,
    leaves: u64,
}

/// Probes per chunk: optimal for ~10 bits per element.
const PROBES: u64 = 7;

impl MarkSet {
    /// A set sized for `expected` chunks.
    pub fn new(expected: u64) -> MarkSet {
        let words = (expected.max(1024) * 10).div_ceil(64) as usize;
        MarkSet {
            interior: HashSet::new(),
            bits: vec![0; words],
            salt: rand::random(),
            leaves: 0,
        }
    }

    /// The filter positions of a chunk: double hashing over two words of its
    /// SHA-256 (uniform already), mixed with this run's salt.
    fn positions(&self, h: &Hash) -> impl Iterator<Item = usize> {
        let word = |i: usize| u64::from_le_bytes(h.0[i..i + 8].try_into().expect("8 bytes"));
        let a = word(0) ^ self.salt;
        let b = (word(8) ^ self.salt.rotate_left(32)) | 1;
        let n = self.bits.len() as u64 * 64;
        (0..PROBES).map(move |i| (a.wrapping_add(i.wrapping_mul(b)) % n) as usize)
    }

    /// Records an interior blob; false if it was recorded already (its subtree
    /// has been, or is being, walked).
    pub fn insert_interior(&mut self, h: Hash) -> bool {
        self.interior.insert(h)
    }

    pub fn insert_leaf(&mut self, h: &Hash) {
        let positions: Vec<usize> = self.positions(h).collect();
        for p in positions {
            self.bits[p / 64] |= 1 << (p % 64);
        }
        self.leaves += 1;
    }

    /// Whether `h` may be reachable: exact for interior blobs, "maybe" for chunks.
    pub fn contains(&self, h: &Hash) -> bool {
        self.interior.contains(h)
            || self
                .positions(h)
                .all(|p| self.bits[p / 64] & (1 << (p % 64)) != 0)
    }

    pub fn interior_len(&self) -> u64 {
        self.interior.len() as u64
    }

    /// Chunk references recorded (with repeats).
    pub fn leaf_marks(&self) -> u64 {
        self.leaves
    }

    /// Bytes the set holds (for the report).
    pub fn memory_bytes(&self) -> u64 {
        (self.bits.len() * 8 + self.interior.capacity() * (32 + 8)) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_forgets_and_rarely_imagines() {
        let mut m = MarkSet::new(10_000);
        let inserted: Vec<Hash> = (0..10_000u32).map(|i| Hash::of(&i.to_le_bytes())).collect();
        for h in &inserted {
            m.insert_leaf(h);
        }
        assert!(
            inserted.iter().all(|h| m.contains(h)),
            "a marked chunk must never look unmarked"
        );
        let false_positives = (10_000..110_000u32)
            .filter(|i| m.contains(&Hash::of(&i.to_le_bytes())))
            .count();
        assert!(
            false_positives < 3_000,
            "{false_positives} false positives in 100,000"
        );
        assert!(m.insert_interior(Hash::of(b"dir")));
        assert!(!m.insert_interior(Hash::of(b"dir")));
        assert!(m.contains(&Hash::of(b"dir")));
    }
}
