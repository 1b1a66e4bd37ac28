//! Uploads of blobs in the background, so that cutting and hashing the next
//! chunks overlaps with sending the last ones, and many small blobs (a
//! directory of new files) go out in a few pipelined round trips.
//!
//! Invariants:
//! - a blob handed over stays in `pending` (and is served to readers from
//!   there) until the store has acknowledged it, so it is never unreadable;
//! - [`WriteBehind::flush`] returns `Ok` only when every blob handed over
//!   before it is in the store: a commit calls it before swapping the root, so
//!   no root ever names a blob that is not stored;
//! - a failed upload is not dropped: its blobs stay pending and `flush` sends
//!   them again (and reports the error if that fails too);
//! - at most [`QUEUE_BYTES`] wait to be sent (writers block beyond that), so
//!   memory stays bounded.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use parking_lot::{Condvar, Mutex};

use crate::dict::{Dict, DictError};
use crate::object::Hash;

type Item = (Hash, String, Bytes);

/// Bytes queued at most before writers wait.
const QUEUE_BYTES: usize = 64 << 20;
/// Bytes sent in one pipelined round trip at most.
const ROUND_BYTES: usize = 16 << 20;

#[derive(Default)]
struct Queue {
    items: VecDeque<Item>,
    bytes: usize,
    /// Items taken by the uploader and not yet finished.
    sending: usize,
    /// The last upload error, until `flush` sees it.
    error: Option<String>,
}

#[derive(Default)]
struct Shared {
    pending: Mutex<HashMap<Hash, Bytes>>,
    queue: Mutex<Queue>,
    changed: Condvar,
}

#[derive(Default)]
pub struct WriteBehind {
    shared: Arc<Shared>,
    started: OnceLock<()>,
}

impl WriteBehind {
    pub fn new() -> WriteBehind {
        WriteBehind::default()
    }

    fn start(&self, dict: &Arc<dyn Dict>) {
        self.started.get_or_init(|| {
            let (shared, dict) = (self.shared.clone(), dict.clone());
            std::thread::Builder::new()
                .name("uploader".into())
                .spawn(move || upload_loop(&shared, &*dict))
                .expect("spawning the uploader thread");
        });
    }

    /// Hands blobs (with their keys) to the uploader; blocks only while more
    /// than [`QUEUE_BYTES`] are waiting.
    pub fn put(&self, dict: &Arc<dyn Dict>, batch: Vec<Item>) {
        if batch.is_empty() {
            return;
        }
        self.start(dict);
        {
            let mut pending = self.shared.pending.lock();
            for (h, _, b) in &batch {
                pending.insert(*h, b.clone());
            }
        }
        let mut q = self.shared.queue.lock();
        while q.bytes > QUEUE_BYTES {
            self.shared.changed.wait(&mut q);
        }
        for item in batch {
            q.bytes += item.2.len();
            q.items.push_back(item);
        }
        self.shared.changed.notify_all();
    }

    /// A blob handed over and not yet acknowledged.
    pub fn get(&self, h: &Hash) -> Option<Bytes> {
        self.shared.pending.lock().get(h).cloned()
    }

    /// Waits for every upload handed over so far; sends again what failed.
    pub fn flush(&self, dict: &Arc<dyn Dict>, key_of: impl Fn(&Hash) -> String) -> Result<(), DictError> {
        let mut q = self.shared.queue.lock();
        while !q.items.is_empty() || q.sending > 0 {
            self.shared.changed.wait(&mut q);
        }
        if q.error.take().is_none() {
            return Ok(());
        }
        drop(q);
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

fn upload_loop(shared: &Shared, dict: &dyn Dict) {
    loop {
        let round: Vec<Item> = {
            let mut q = shared.queue.lock();
            while q.items.is_empty() {
                shared.changed.wait(&mut q);
            }
            let mut round = Vec::new();
            let mut bytes = 0;
            while let Some(item) = q.items.front() {
                if !round.is_empty() && bytes + item.2.len() > ROUND_BYTES {
                    break;
                }
                bytes += item.2.len();
                round.push(q.items.pop_front().expect("peeked"));
            }
            q.bytes -= bytes;
            q.sending = round.len();
            shared.changed.notify_all();
            round
        };
        let result = dict.put_many_if_absent(round.iter().map(|(_, k, b)| (k.clone(), b.clone())).collect());
        if result.is_ok() {
            let mut pending = shared.pending.lock();
            for (h, _, _) in &round {
                pending.remove(h);
            }
        }
        let mut q = shared.queue.lock();
        q.sending = 0;
        if let Err(e) = result {
            tracing::warn!("background upload failed (will retry at commit): {e}");
            q.error = Some(e.to_string());
        }
        shared.changed.notify_all();
    }
}
