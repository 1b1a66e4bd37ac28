//! Uploads of blobs in the background, so that cutting and hashing the next
//! chunks overlaps with sending the last ones.
//!
//! Invariants:
//! - a blob handed over stays in `pending` (and is served to readers from
//!   there) until the store has acknowledged it, so it is never unreadable;
//! - [`WriteBehind::flush`] returns `Ok` only when every blob handed over
//!   before it is in the store: a commit calls it before swapping the root, so
//!   no root ever names a blob that is not stored;
//! - a failed upload is not dropped: its blobs stay pending and `flush` sends
//!   them again (and reports the error if that fails too).

use std::collections::HashMap;
use std::sync::mpsc;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use parking_lot::{Condvar, Mutex};

use crate::dict::{Dict, DictError};
use crate::object::Hash;

type Batch = Vec<(Hash, String, Bytes)>;

#[derive(Default)]
struct Shared {
    pending: Mutex<HashMap<Hash, Bytes>>,
    /// Batches sent and not yet finished, with the last error seen.
    state: Mutex<(usize, Option<String>)>,
    done: Condvar,
}

pub struct WriteBehind {
    shared: Arc<Shared>,
    queue: OnceLock<Mutex<mpsc::SyncSender<Batch>>>,
}

/// Batches queued at most (each up to ~16 MiB): bounds the memory in flight.
const QUEUE: usize = 4;

impl Default for WriteBehind {
    fn default() -> Self {
        WriteBehind::new()
    }
}

impl WriteBehind {
    pub fn new() -> WriteBehind {
        WriteBehind {
            shared: Arc::new(Shared::default()),
            queue: OnceLock::new(),
        }
    }

    fn sender(&self, dict: &Arc<dyn Dict>) -> &Mutex<mpsc::SyncSender<Batch>> {
        self.queue.get_or_init(|| {
            let (tx, rx) = mpsc::sync_channel::<Batch>(QUEUE);
            let (shared, dict) = (self.shared.clone(), dict.clone());
            std::thread::Builder::new()
                .name("uploader".into())
                .spawn(move || {
                    for batch in rx {
                        let items = batch.iter().map(|(_, k, b)| (k.clone(), b.clone())).collect();
                        let result = dict.put_many_if_absent(items);
                        if result.is_ok() {
                            let mut pending = shared.pending.lock();
                            for (h, _, _) in &batch {
                                pending.remove(h);
                            }
                        }
                        let mut state = shared.state.lock();
                        state.0 -= 1;
                        if let Err(e) = result {
                            tracing::warn!("background upload failed (will retry at commit): {e}");
                            state.1 = Some(e.to_string());
                        }
                        shared.done.notify_all();
                    }
                })
                .expect("spawning the uploader thread");
            Mutex::new(tx)
        })
    }

    /// Hands blobs (with their keys) to the uploader; blocks only while the
    /// queue is full.
    pub fn put(&self, dict: &Arc<dyn Dict>, batch: Batch) {
        if batch.is_empty() {
            return;
        }
        {
            let mut pending = self.shared.pending.lock();
            for (h, _, b) in &batch {
                pending.insert(*h, b.clone());
            }
        }
        self.shared.state.lock().0 += 1;
        let sender = self.sender(dict);
        if let Err(mpsc::SendError(batch)) = sender.lock().send(batch) {
            // The uploader is gone (cannot happen while we hold the sender);
            // leave the blobs pending for flush to send.
            drop(batch);
            let mut state = self.shared.state.lock();
            state.0 -= 1;
            state.1 = Some("uploader stopped".into());
        }
    }

    /// A blob handed over and not yet acknowledged.
    pub fn get(&self, h: &Hash) -> Option<Bytes> {
        self.shared.pending.lock().get(h).cloned()
    }

    /// Waits for every upload handed over so far; sends again what failed.
    pub fn flush(&self, dict: &Arc<dyn Dict>, key_of: impl Fn(&Hash) -> String) -> Result<(), DictError> {
        let mut state = self.shared.state.lock();
        while state.0 > 0 {
            self.shared.done.wait(&mut state);
        }
        if state.1.take().is_none() {
            return Ok(());
        }
        drop(state);
        let retry: Vec<(Hash, Bytes)> = self
            .shared
            .pending
            .lock()
            .iter()
            .map(|(h, b)| (*h, b.clone()))
            .collect();
        dict.put_many_if_absent(retry.iter().map(|(h, b)| (key_of(h), b.clone())).collect())?;
        let mut pending = self.shared.pending.lock();
        for (h, _) in retry {
            pending.remove(&h);
        }
        Ok(())
    }
}
