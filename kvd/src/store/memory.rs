//! The in-memory engine: the shared [`Index`] holding values directly. Nothing
//! survives a restart.

use bytes::Bytes;

use super::index::{Index, Indexed};
use super::{Entry, Store, StoreError, Update};

impl Indexed for Entry {
    fn expires_at(&self) -> Option<u64> {
        self.expires_at
    }

    fn size(&self) -> u64 {
        self.value.len() as u64
    }
}

/// Values up to this size are copied into their own allocation when stored:
/// request arguments are slices of a connection's read buffer, and a small slice
/// would pin the whole buffer. Large values fill most of their buffer anyway.
const OWN_BELOW: usize = 64 * 1024;

pub(crate) fn own(value: Bytes) -> Bytes {
    if value.len() < OWN_BELOW {
        Bytes::copy_from_slice(&value)
    } else {
        value
    }
}

#[derive(Default)]
pub struct MemStore {
    index: Index<Entry>,
}

impl MemStore {
    pub fn new() -> Self {
        Self::default()
    }
}

impl Store for MemStore {
    fn get(&self, key: &Bytes) -> Result<Option<Entry>, StoreError> {
        Ok(self.index.get(key))
    }

    fn expiry(&self, key: &Bytes) -> Option<Option<u64>> {
        let pos = self.index.pos(key);
        self.index.read(&pos).get(&pos).map(|e| e.expires_at)
    }

    fn update(
        &self,
        key: &Bytes,
        _needs_value: bool,
        f: &mut dyn FnMut(Option<&Entry>) -> Update,
    ) -> Result<(), StoreError> {
        let pos = self.index.pos(key);
        let mut shard = self.index.write(&pos);
        match f(shard.get(&pos)) {
            Update::Keep => {}
            Update::Put(entry) => {
                let entry = Entry {
                    value: own(entry.value),
                    expires_at: entry.expires_at,
                };
                shard.insert(&pos, entry);
            }
            Update::Remove => {
                shard.remove(&pos);
            }
        }
        Ok(())
    }

    fn len(&self) -> usize {
        self.index.len()
    }

    fn expiring_len(&self) -> usize {
        self.index.expiring_len()
    }

    fn scan(&self, cursor: u64, count: usize, out: &mut Vec<(Bytes, Entry)>) -> u64 {
        self.index.scan(cursor, count, out)
    }

    fn expired(&self, now: u64, limit: usize) -> Vec<Bytes> {
        self.index.expired(now, limit)
    }

    fn random_key(&self) -> Option<Bytes> {
        self.index.random_key()
    }

    fn clear(&self) -> Result<(), StoreError> {
        self.index.clear();
        Ok(())
    }

    fn used_bytes(&self) -> u64 {
        self.index.bytes()
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
        s.update(&Bytes::copy_from_slice(k.as_bytes()), false, &mut |_| {
            Update::Put(entry.clone())
        })
        .unwrap();
    }

    fn del(s: &MemStore, k: &str) {
        s.update(&Bytes::copy_from_slice(k.as_bytes()), false, &mut |_| {
            Update::Remove
        })
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
        s.update(&key, false, &mut |_| {
            Update::Put(Entry {
                value: value.clone(),
                expires_at: None,
            })
        })
        .unwrap();
        let stored = s.get(&key).unwrap().unwrap().value;
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
        s.update(&k, false, &mut |_| Update::Put(e(Some(10)))).unwrap();
        assert_eq!(s.expired(10, 10), vec![k.clone()]);
        s.update(&k, false, &mut |_| Update::Put(e(None))).unwrap();
        assert!(s.expired(u64::MAX, 10).is_empty());
        assert_eq!(s.expiring_len(), 0);
        assert_eq!(s.used_bytes(), 2);
        s.update(&k, false, &mut |_| Update::Remove).unwrap();
        assert_eq!(s.used_bytes(), 0);
    }
}
