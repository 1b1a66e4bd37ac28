//! The key index both engines share: keys in a fixed hash order, split into
//! shards that each have their own lock.
//!
//! Invariant: a key's position (`Pos`: a seeded hash of the key, then the key)
//! never depends on what else is in the index. SCAN's cursor is a hash position,
//! so inserting or removing other keys never moves a key past the cursor, and a
//! key present for a whole scan is returned at least once. A hash map that
//! resizes (such as `dashmap`) cannot promise that, which is why the index is
//! ordered. The shard is the top bits of the hash, so shard order is scan order.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::BuildHasher;

use bytes::Bytes;
use foldhash::fast::RandomState;
use parking_lot::{RwLock, RwLockReadGuard, RwLockWriteGuard};

/// What the index needs to know about the values it holds.
pub trait Indexed: Clone {
    /// Absolute expiry in Unix milliseconds.
    fn expires_at(&self) -> Option<u64>;
    /// Bytes accounted to this entry (key excluded).
    fn size(&self) -> u64;
}

/// Position of a key in scan order.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Pos {
    pub hash: u64,
    pub key: Bytes,
}

/// One shard: entries in position order, plus an expiry index.
pub struct Shard<V> {
    map: BTreeMap<Pos, V>,
    /// (expiry time, position) of every entry with an expiry, so active expiry
    /// finds due keys without scanning.
    expiring: BTreeSet<(u64, Pos)>,
    bytes: u64,
}

impl<V> Default for Shard<V> {
    fn default() -> Self {
        Shard {
            map: BTreeMap::new(),
            expiring: BTreeSet::new(),
            bytes: 0,
        }
    }
}

impl<V: Indexed> Shard<V> {
    pub fn get(&self, pos: &Pos) -> Option<&V> {
        self.map.get(pos)
    }

    /// Removes the entry at `pos`, returning it.
    pub fn remove(&mut self, pos: &Pos) -> Option<V> {
        let (stored, old) = self.map.remove_entry(pos)?;
        if let Some(t) = old.expires_at() {
            self.expiring.remove(&(t, stored.clone()));
        }
        self.bytes -= stored.key.len() as u64 + old.size();
        Some(old)
    }

    /// Stores `value` at `pos`, returning the value it replaced. Invariant: a
    /// stored key owns its memory. Keys arrive as slices of a connection's read
    /// buffer; keeping such a slice would pin the whole buffer for as long as the
    /// key lives, so a new key is copied.
    pub fn insert(&mut self, pos: &Pos, value: V) -> Option<V> {
        if let Some(current) = self.map.get_mut(pos) {
            // Overwrite in place: the key stays, only the value and expiry change.
            if current.expires_at() != value.expires_at() {
                if let Some(t) = current.expires_at() {
                    self.expiring.remove(&(t, pos.clone()));
                }
                if let Some(t) = value.expires_at() {
                    self.expiring.insert((t, pos.clone()));
                }
            }
            self.bytes = self.bytes - current.size() + value.size();
            return Some(std::mem::replace(current, value));
        }
        let pos = Pos {
            hash: pos.hash,
            key: Bytes::copy_from_slice(&pos.key),
        };
        if let Some(t) = value.expires_at() {
            self.expiring.insert((t, pos.clone()));
        }
        self.bytes += pos.key.len() as u64 + value.size();
        self.map.insert(pos, value);
        None
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&Pos, &V)> {
        self.map.iter()
    }
}

const SHARD_BITS: u32 = 6;
const SHARDS: usize = 1 << SHARD_BITS;

/// Keys in hash order across 64 independently locked shards.
pub struct Index<V> {
    hasher: RandomState,
    shards: Vec<RwLock<Shard<V>>>,
}

impl<V: Indexed> Default for Index<V> {
    fn default() -> Self {
        Index {
            hasher: RandomState::default(),
            shards: (0..SHARDS).map(|_| RwLock::new(Shard::default())).collect(),
        }
    }
}

impl<V: Indexed> Index<V> {
    pub fn pos(&self, key: &Bytes) -> Pos {
        Pos {
            hash: self.hasher.hash_one(&key[..]),
            key: key.clone(),
        }
    }

    fn shard_of(hash: u64) -> usize {
        (hash >> (64 - SHARD_BITS)) as usize
    }

    pub fn read(&self, pos: &Pos) -> RwLockReadGuard<'_, Shard<V>> {
        self.shards[Self::shard_of(pos.hash)].read()
    }

    pub fn write(&self, pos: &Pos) -> RwLockWriteGuard<'_, Shard<V>> {
        self.shards[Self::shard_of(pos.hash)].write()
    }

    pub fn get(&self, key: &Bytes) -> Option<V> {
        let pos = self.pos(key);
        self.read(&pos).get(&pos).cloned()
    }

    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.read().len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn expiring_len(&self) -> usize {
        self.shards.iter().map(|s| s.read().expiring.len()).sum()
    }

    pub fn bytes(&self) -> u64 {
        self.shards.iter().map(|s| s.read().bytes).sum()
    }

    /// Appends up to about `count` entries from hash position `cursor` on and
    /// returns the next cursor, 0 when done. Keys sharing a hash are returned
    /// together, so a cursor (a hash) never splits them.
    pub fn scan(&self, cursor: u64, count: usize, out: &mut Vec<(Bytes, V)>) -> u64 {
        let start = Pos {
            hash: cursor,
            key: Bytes::new(),
        };
        let mut taken = 0usize;
        for shard in &self.shards[Self::shard_of(cursor)..] {
            let shard = shard.read();
            let mut last_hash = None;
            for (pos, value) in shard.map.range(&start..) {
                if taken >= count && last_hash != Some(pos.hash) {
                    return pos.hash;
                }
                out.push((pos.key.clone(), value.clone()));
                taken += 1;
                last_hash = Some(pos.hash);
            }
        }
        0
    }

    /// Keys whose expiry time is at or before `now`, at most `limit`.
    pub fn expired(&self, now: u64, limit: usize) -> Vec<Bytes> {
        let mut due = Vec::new();
        for shard in &self.shards {
            let shard = shard.read();
            for (t, pos) in &shard.expiring {
                if *t > now || due.len() >= limit {
                    break;
                }
                due.push(pos.key.clone());
            }
            if due.len() >= limit {
                break;
            }
        }
        due
    }

    pub fn random_key(&self) -> Option<Bytes> {
        use rand::Rng;
        let mut rng = rand::thread_rng();
        let start = rng.gen_range(0..SHARDS);
        for i in 0..SHARDS {
            let shard = self.shards[(start + i) % SHARDS].read();
            if shard.map.is_empty() {
                continue;
            }
            let probe = Pos {
                hash: rng.gen(),
                key: Bytes::new(),
            };
            let found = shard
                .map
                .range(&probe..)
                .next()
                .or_else(|| shard.map.iter().next());
            return found.map(|(p, _)| p.key.clone());
        }
        None
    }

    /// Removes everything, shard by shard.
    pub fn clear(&self) {
        for shard in &self.shards {
            *shard.write() = Shard::default();
        }
    }

    /// Every shard's write lock, in order: nothing else can touch the index
    /// while the guards live.
    pub fn lock_all(&self) -> Vec<RwLockWriteGuard<'_, Shard<V>>> {
        self.shards.iter().map(|s| s.write()).collect()
    }
}
