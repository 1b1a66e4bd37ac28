//! Read-ahead: a few threads that fetch the chunks after the one just read into
//! the blob cache, so a sequential reader finds them there.

use std::collections::HashSet;
use std::sync::mpsc;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::object::Hash;
use crate::store::BlobStore;

pub struct Prefetcher {
    store: BlobStore,
    queue: Mutex<mpsc::Sender<Hash>>,
    /// Chunks queued or being fetched, so each is fetched once.
    inflight: Arc<Mutex<HashSet<Hash>>>,
}

impl Prefetcher {
    pub fn new(store: BlobStore, threads: usize) -> Prefetcher {
        let (tx, rx) = mpsc::channel::<Hash>();
        let rx = Arc::new(Mutex::new(rx));
        let inflight = Arc::new(Mutex::new(HashSet::new()));
        for i in 0..threads {
            let (rx, store, inflight) = (rx.clone(), store.clone(), inflight.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("readahead-{i}"))
                .spawn(move || loop {
                    // The lock is held only to take one item; the sender going
                    // away (the Prefetcher dropped) ends the thread.
                    let next = rx.lock().recv();
                    let Ok(h) = next else { return };
                    if let Err(e) = store.get(&h) {
                        tracing::debug!("read-ahead of {} failed: {e}", h.hex());
                    }
                    inflight.lock().remove(&h);
                });
            if let Err(e) = spawned {
                tracing::warn!("no read-ahead thread: {e}");
            }
        }
        Prefetcher {
            store,
            queue: Mutex::new(tx),
            inflight,
        }
    }

    /// Asks for these chunks to be fetched into the cache, unless they are
    /// there or on their way.
    pub fn want(&self, hashes: impl IntoIterator<Item = Hash>) {
        for h in hashes {
            if self.store.is_cached(&h) || !self.inflight.lock().insert(h) {
                continue;
            }
            if self.queue.lock().send(h).is_err() {
                self.inflight.lock().remove(&h);
            }
        }
    }
}
