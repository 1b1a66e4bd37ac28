//! One proposal at a time per key from this node.
//!
//! Two clients of the same node writing the same key would otherwise run two
//! CASPaxos rounds that beat each other's ballots: the second prepares above
//! the first's accept, which then reaches one replica (this node's own, asked
//! first) and no majority, and its client hears "may or may not take effect"
//! although nobody outside this node touched the key. Redis serializes such
//! commands; queueing them here does the same and costs nothing when keys
//! differ. Rounds from other nodes still race, as they must: that is what the
//! ballots are for.
//!
//! Invariant: a key's entry exists while someone holds or waits for its lock
//! (the map's `Arc` plus theirs); the last guard out removes it, under the map
//! lock, so the map holds only keys with proposals under way.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;

type Slot = Arc<tokio::sync::Mutex<()>>;

#[derive(Default)]
pub struct KeyLocks {
    held: Mutex<HashMap<Bytes, Slot>>,
}

/// Holds a key's lock; releases it (and forgets the key if nobody waits) on drop.
pub struct KeyGuard<'a> {
    locks: &'a KeyLocks,
    key: Bytes,
    slot: Slot,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl KeyLocks {
    /// Waits until no other proposal of this node holds `key`.
    pub async fn lock(&self, key: &Bytes) -> KeyGuard<'_> {
        let slot = self.held.lock().entry(key.clone()).or_default().clone();
        let guard = slot.clone().lock_owned().await;
        KeyGuard {
            locks: self,
            key: key.clone(),
            slot,
            guard: Some(guard),
        }
    }

    /// Keys with a proposal under way or waiting.
    pub fn len(&self) -> usize {
        self.held.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for KeyGuard<'_> {
    fn drop(&mut self) {
        self.guard.take();
        let mut held = self.locks.held.lock();
        // The map's reference and ours: nobody else holds or waits.
        if Arc::strong_count(&self.slot) <= 2 {
            held.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_holder_per_key_and_the_map_empties() {
        let locks = Arc::new(KeyLocks::default());
        let inside: Arc<[AtomicUsize; 2]> = Arc::default();
        let tasks: Vec<_> = (0..32)
            .map(|i| {
                let (locks, inside) = (locks.clone(), inside.clone());
                tokio::spawn(async move {
                    let key = Bytes::from(format!("k{}", i % 2));
                    for _ in 0..50 {
                        let _g = locks.lock(&key).await;
                        assert_eq!(
                            inside[i % 2].fetch_add(1, Ordering::SeqCst),
                            0,
                            "two holders of one key"
                        );
                        tokio::task::yield_now().await;
                        inside[i % 2].fetch_sub(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        assert!(locks.is_empty(), "{} keys left behind", locks.len());
    }

    #[tokio::test]
    async fn a_key_waits_for_its_holder_and_others_do_not() {
        let locks = KeyLocks::default();
        let (a, b) = (Bytes::from_static(b"a"), Bytes::from_static(b"b"));
        let held = locks.lock(&a).await;
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(20), locks.lock(&a))
                .await
                .is_err(),
            "a second holder of the same key"
        );
        let _other = locks.lock(&b).await;
        drop(held);
        let _again = locks.lock(&a).await;
        assert_eq!(locks.len(), 2);
    }
}
