//! The storage engine interface, and the in-memory engine.
//!
//! A [`Store`] is a map from key to [`Entry`] (value plus optional expiry time) with
//! one atomic primitive, [`Store::update`], from which every read-modify-write
//! command is built. It knows nothing of Redis semantics: logical expiry, WATCH
//! and command rules live in [`crate::db`]. Values are [`Bytes`] so an engine can
//! hand out slices of a memory-mapped file without copying.
//!
//! SCAN's guarantee (a key present for the whole scan is returned at least once,
//! whatever else is written meanwhile) comes from iterating in a fixed order that
//! does not depend on what else is in the map: entries are ordered by a hash of
//! the key (then the key), and the cursor is the hash to resume from. Inserting or
//! removing other keys never moves a key's position, unlike iterating a hash table
//! that may resize.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::BuildHasher;

use foldhash::fast::RandomState;

use bytes::Bytes;
use parking_lot::RwLock;

/// A stored value and its absolute expiry time in Unix milliseconds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub value: Bytes,
    pub expires_at: Option<u64>,
}

/// What [`Store::update`]'s closure decides to do with the key.
#[derive(Debug)]
pub enum Update {
    Keep,
    Put(Entry),
    Remove,
}

/// Errors a storage engine can return. The in-memory engine never fails; a disk
/// engine reports full disks and I/O errors here so the client gets an error reply.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0}")]
    Io(String),
}

/// A storage engine. All methods are atomic per key and safe to call from many
/// threads at once.
pub trait Store: Send + Sync + 'static {
    fn get(&self, key: &Bytes) -> Option<Entry>;
    /// Calls `f` with the key's current entry under the key's lock and applies its
    /// decision before any other writer of that key runs.
    fn update(&self, key: &Bytes, f: &mut dyn FnMut(Option<&Entry>) -> Update) -> Result<(), StoreError>;
    /// Number of keys, including ones logically expired but not yet removed.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Number of keys with an expiry time.
    fn expiring_len(&self) -> usize;
    /// Appends up to about `count` entries from `cursor` on to `out` (more when keys
    /// share a hash position) and returns the next cursor, 0 when done.
    fn scan(&self, cursor: u64, count: usize, out: &mut Vec<(Bytes, Entry)>) -> u64;
    /// Keys whose expiry time is at or before `now`, at most `limit`.
    fn expired(&self, now: u64, limit: usize) -> Vec<Bytes>;
    /// Some key, chosen at random, if any.
    fn random_key(&self) -> Option<Bytes>;
    /// Removes every key.
    fn clear(&self) -> Result<(), StoreError>;
    /// Bytes of keys and values held (for INFO memory).
    fn used_bytes(&self) -> u64;
}

/// Values up to this size are copied into their own allocation when stored.
const OWN_BELOW: usize = 64 * 1024;

fn own(value: Bytes) -> Bytes {
    if value.len() < OWN_BELOW {
        Bytes::copy_from_slice(&value)
    } else {
        value
    }
}

const SHARD_BITS: u32 = 6;
const SHARDS: usize = 1 << SHARD_BITS;

/// Position of a key in scan order.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Pos {
    hash: u64,
    key: Bytes,
}

#[derive(Default)]
struct Shard {
    map: BTreeMap<Pos, Entry>,
    /// (expiry time, key position) for every entry with an expiry, so active expiry
    /// finds due keys without scanning.
    expiring: BTreeSet<(u64, Pos)>,
    bytes: u64,
}

impl Shard {
    fn remove(&mut self, pos: &Pos) -> Option<Entry> {
        let old = self.map.remove(pos)?;
        if let Some(t) = old.expires_at {
            self.expiring.remove(&(t, pos.clone()));
        }
        self.bytes -= (pos.key.len() + old.value.len()) as u64;
        Some(old)
    }

    /// Stores `entry` under `pos`. Invariant: stored keys and small values own
    /// their memory. Request arguments arrive as slices of a connection's read
    /// buffer; keeping such a slice would pin the whole buffer for as long as the
    /// key lives, so they are copied here (large values, which fill most of their
    /// buffer anyway, are kept as they are).
    fn insert(&mut self, pos: &Pos, entry: Entry) {
        let entry = Entry {
            value: own(entry.value),
            expires_at: entry.expires_at,
        };
        if let Some(current) = self.map.get_mut(pos) {
            // Overwrite in place: the key stays, only the value and expiry change.
            if current.expires_at != entry.expires_at {
                if let Some(t) = current.expires_at {
                    self.expiring.remove(&(t, pos.clone()));
                }
                if let Some(t) = entry.expires_at {
                    self.expiring.insert((t, pos.clone()));
                }
            }
            self.bytes = self.bytes - current.value.len() as u64 + entry.value.len() as u64;
            *current = entry;
            return;
        }
        let pos = Pos {
            hash: pos.hash,
            key: Bytes::copy_from_slice(&pos.key),
        };
        if let Some(t) = entry.expires_at {
            self.expiring.insert((t, pos.clone()));
        }
        self.bytes += (pos.key.len() + entry.value.len()) as u64;
        self.map.insert(pos, entry);
    }
}

/// The in-memory engine: 64 shards, each an ordered map under its own lock. The
/// shard is the top bits of the key's hash, so shard order is scan order.
pub struct MemStore {
    hasher: RandomState,
    shards: Vec<RwLock<Shard>>,
}

impl Default for MemStore {
    fn default() -> Self {
        MemStore {
            hasher: RandomState::default(),
            shards: (0..SHARDS).map(|_| RwLock::new(Shard::default())).collect(),
        }
    }
}

impl MemStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn pos(&self, key: &Bytes) -> Pos {
        Pos {
            hash: self.hasher.hash_one(&key[..]),
            key: key.clone(),
        }
    }

    fn shard_of(hash: u64) -> usize {
        (hash >> (64 - SHARD_BITS)) as usize
    }
}

impl Store for MemStore {
    fn get(&self, key: &Bytes) -> Option<Entry> {
        let pos = self.pos(key);
        self.shards[Self::shard_of(pos.hash)]
            .read()
            .map
            .get(&pos)
            .cloned()
    }

    fn update(&self, key: &Bytes, f: &mut dyn FnMut(Option<&Entry>) -> Update) -> Result<(), StoreError> {
        let pos = self.pos(key);
        let mut shard = self.shards[Self::shard_of(pos.hash)].write();
        match f(shard.map.get(&pos)) {
            Update::Keep => {}
            Update::Put(entry) => shard.insert(&pos, entry),
            Update::Remove => {
                shard.remove(&pos);
            }
        }
        Ok(())
    }

    fn len(&self) -> usize {
        self.shards.iter().map(|s| s.read().map.len()).sum()
    }

    fn expiring_len(&self) -> usize {
        self.shards.iter().map(|s| s.read().expiring.len()).sum()
    }

    fn scan(&self, cursor: u64, count: usize, out: &mut Vec<(Bytes, Entry)>) -> u64 {
        let start = Pos {
            hash: cursor,
            key: Bytes::new(),
        };
        let mut taken = 0usize;
        for shard in &self.shards[Self::shard_of(cursor)..] {
            let shard = shard.read();
            let mut last_hash = None;
            for (pos, entry) in shard.map.range(&start..) {
                // Keys sharing a hash are returned together, so the cursor (a hash)
                // never splits them.
                if taken >= count && last_hash != Some(pos.hash) {
                    return pos.hash;
                }
                out.push((pos.key.clone(), entry.clone()));
                taken += 1;
                last_hash = Some(pos.hash);
            }
        }
        0
    }

    fn expired(&self, now: u64, limit: usize) -> Vec<Bytes> {
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

    fn random_key(&self) -> Option<Bytes> {
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

    fn clear(&self) -> Result<(), StoreError> {
        for shard in &self.shards {
            *shard.write() = Shard::default();
        }
        Ok(())
    }

    fn used_bytes(&self) -> u64 {
        self.shards.iter().map(|s| s.read().bytes).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn put(s: &MemStore, k: &str, v: &str) {
        let entry = Entry {
            value: Bytes::copy_from_slice(v.as_bytes()),
            expires_at: None,
        };
        s.update(&Bytes::copy_from_slice(k.as_bytes()), &mut |_| {
            Update::Put(entry.clone())
        })
        .unwrap();
    }

    fn del(s: &MemStore, k: &str) {
        s.update(&Bytes::copy_from_slice(k.as_bytes()), &mut |_| Update::Remove)
            .unwrap();
    }

    #[test]
    fn scan_returns_every_stable_key_despite_concurrent_changes() {
        let s = MemStore::new();
        for i in 0..2000 {
            put(&s, &format!("stable{i}"), "v");
        }
        let mut seen = HashSet::new();
        let mut cursor = 0;
        let mut round = 0;
        loop {
            let mut out = Vec::new();
            cursor = s.scan(cursor, 10, &mut out);
            seen.extend(out.into_iter().map(|(k, _)| k));
            // Churn between calls: add and remove other keys.
            for j in 0..20 {
                put(&s, &format!("churn{round}-{j}"), "x");
                del(&s, &format!("churn{}-{j}", round.max(1) - 1));
            }
            round += 1;
            if cursor == 0 {
                break;
            }
        }
        for i in 0..2000 {
            assert!(
                seen.contains(&Bytes::from(format!("stable{i}"))),
                "missed stable{i}"
            );
        }
    }

    #[test]
    fn stored_small_values_do_not_share_the_request_buffer() {
        let s = MemStore::new();
        let request = Bytes::from(vec![b'x'; 1000]);
        let key = request.slice(0..3);
        let value = request.slice(3..10);
        s.update(&key, &mut |_| {
            Update::Put(Entry {
                value: value.clone(),
                expires_at: None,
            })
        })
        .unwrap();
        let stored = s.get(&key).unwrap().value;
        assert_eq!(stored, value);
        assert_ne!(
            stored.as_ptr(),
            value.as_ptr(),
            "value still points into the request buffer"
        );
    }

    #[test]
    fn expiry_index_follows_updates() {
        let s = MemStore::new();
        let k = Bytes::from_static(b"k");
        let e = |t| Entry {
            value: Bytes::from_static(b"v"),
            expires_at: t,
        };
        s.update(&k, &mut |_| Update::Put(e(Some(10)))).unwrap();
        assert_eq!(s.expired(10, 10), vec![k.clone()]);
        s.update(&k, &mut |_| Update::Put(e(None))).unwrap();
        assert!(s.expired(u64::MAX, 10).is_empty());
        assert_eq!(s.expiring_len(), 0);
        assert_eq!(s.used_bytes(), 2);
        s.update(&k, &mut |_| Update::Remove).unwrap();
        assert_eq!(s.used_bytes(), 0);
    }
}
