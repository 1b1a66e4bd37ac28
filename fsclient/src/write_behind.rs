//! Uploads of blobs in the background, so that cutting and hashing the next
//! chunks overlaps with sending the last ones, and many small blobs (a
//! directory of new files) go out in a few pipelined round trips.
//!
//! This is where the commit rule is kept: *a root swap happens only after the
//! store has acknowledged every blob the new root reaches.* Invariants:
//! - a blob handed over stays in `pending` (and is served to readers from
//!   there) until the store has acknowledged it, so it is never unreadable;
//! - a blob leaves the queue only when the store has acknowledged it: a round
//!   that fails goes back to the front of the queue and is sent again (with a
//!   growing pause while the store keeps refusing) until it is stored. Nothing
//!   handed over is ever dropped;
//! - [`WriteBehind::flush`] returns `Ok` only when every blob handed over
//!   before it has been acknowledged; while uploads fail it returns the error
//!   of a fresh attempt. A commit calls it before swapping the root, so no root
//!   ever names a blob that is not stored. (An earlier version took the error
//!   out of the queue before its one retry, so the commit after a failed retry
//!   found no error and published a root naming blobs the store never had.)
//! - every round is leased against garbage collection (the hook given to
//!   [`WriteBehind::with_lease`]) before any of it is sent, in one round trip
//!   for the whole round: the lease rule (lease, then upload) is kept here, so
//!   a writer hands blobs over without a round trip of its own;
//! - at most [`QUEUE_BYTES`] wait to be sent: beyond that writers wait while
//!   the store accepts, and are refused with the store's error while it
//!   refuses (a full store is `ENOSPC` to the writer, not memory without
//!   bound).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::{Condvar, Mutex};

use crate::dict::{Dict, DictError};
use crate::object::Hash;

type Item = (Hash, String, Bytes);

/// Bytes queued at most before writers wait (or, while the store refuses
/// uploads, are refused).
const QUEUE_BYTES: usize = 64 << 20;
/// Bytes sent in one pipelined round trip at most.
const ROUND_BYTES: usize = 16 << 20;
/// How long the uploader waits for more blobs before sending a round that is
/// not full, unless a flush wants it now.
const LINGER: Duration = Duration::from_millis(2);
/// The pause after a failed round, doubled after each further failure up to
/// [`RETRY_MAX`]; a flush (a commit, an fsync) asks for an attempt at once.
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(2);

#[derive(Default)]
struct Queue {
    /// Blobs not yet acknowledged by the store and not being sent.
    items: VecDeque<Item>,
    bytes: usize,
    /// Items taken by the uploader and not yet finished.
    sending: usize,
    /// The error of the last round while uploads fail; cleared by a round
    /// that succeeds.
    failing: Option<DictError>,
    /// Rounds finished (stored or failed), so a flush can wait for a fresh one.
    rounds: u64,
    /// A flush wants the next attempt now, not after the pause.
    hurry: bool,
    /// Callers waiting in [`WriteBehind::flush`]: the uploader does not
    /// linger for more blobs while anyone waits.
    flushing: usize,
    /// Rounds the store refused, since start (for the metrics).
    failed_rounds: u64,
}

#[derive(Default)]
struct Shared {
    pending: Mutex<HashMap<Hash, Bytes>>,
    queue: Mutex<Queue>,
    changed: Condvar,
}

/// Leases a round's blobs (by hash) before they are sent; an error fails the
/// round (it is sent again later, leased again first).
pub type LeaseHook = Arc<dyn Fn(&[Hash]) -> Result<(), DictError> + Send + Sync>;

pub struct WriteBehind {
    shared: Arc<Shared>,
    started: OnceLock<()>,
    lease: LeaseHook,
}

/// Uploads with no lease taken (for stores nothing collects, and tests).
impl Default for WriteBehind {
    fn default() -> WriteBehind {
        WriteBehind::with_lease(Arc::new(|_: &[Hash]| Ok(())))
    }
}

impl WriteBehind {
    /// Uploads each round after `lease` has leased it.
    pub fn with_lease(lease: LeaseHook) -> WriteBehind {
        WriteBehind {
            shared: Default::default(),
            started: OnceLock::new(),
            lease,
        }
    }

    fn start(&self, dict: &Arc<dyn Dict>) {
        self.started.get_or_init(|| {
            let (shared, dict, lease) = (self.shared.clone(), dict.clone(), self.lease.clone());
            std::thread::Builder::new()
                .name("uploader".into())
                .spawn(move || upload_loop(&shared, &*dict, &*lease))
                .expect("spawning the uploader thread");
        });
    }

    /// Hands blobs (with their keys) to the uploader. Waits while more than
    /// [`QUEUE_BYTES`] are waiting to be sent; refuses the batch with the
    /// store's error if the store is refusing uploads meanwhile (the caller
    /// keeps the bytes: nothing of a refused batch was taken).
    pub fn put(&self, dict: &Arc<dyn Dict>, batch: Vec<Item>) -> Result<(), DictError> {
        if batch.is_empty() {
            return Ok(());
        }
        self.start(dict);
        let mut q = self.shared.queue.lock();
        while q.bytes > QUEUE_BYTES {
            if let Some(e) = &q.failing {
                return Err(e.clone());
            }
            self.shared.changed.wait(&mut q);
        }
        {
            let mut pending = self.shared.pending.lock();
            for (h, _, b) in &batch {
                pending.insert(*h, b.clone());
            }
        }
        for item in batch {
            q.bytes += item.2.len();
            q.items.push_back(item);
        }
        self.shared.changed.notify_all();
        Ok(())
    }

    /// A blob handed over and not yet acknowledged.
    pub fn get(&self, h: &Hash) -> Option<Bytes> {
        self.shared.pending.lock().get(h).cloned()
    }

    /// For the metrics: bytes handed over and not yet acknowledged, rounds
    /// refused since start, and whether uploads are failing now.
    pub fn stats(&self) -> (usize, u64, bool) {
        let pending = self.shared.pending.lock().values().map(Bytes::len).sum();
        let q = self.shared.queue.lock();
        (pending, q.failed_rounds, q.failing.is_some())
    }

    /// The store's error while uploads are failing.
    pub fn failing(&self) -> Option<DictError> {
        self.shared.queue.lock().failing.clone()
    }

    /// Returns `Ok` once every blob handed over before this call is in the
    /// store. While uploads fail, waits for one fresh attempt (made at once)
    /// and returns its error if blobs are still unacknowledged.
    pub fn flush(&self) -> Result<(), DictError> {
        let mut q = self.shared.queue.lock();
        q.flushing += 1;
        self.shared.changed.notify_all();
        let result = self.wait_stored(&mut q);
        q.flushing -= 1;
        result
    }

    fn wait_stored(&self, q: &mut parking_lot::MutexGuard<'_, Queue>) -> Result<(), DictError> {
        let mut tried_since = None;
        loop {
            if q.items.is_empty() && q.sending == 0 {
                return Ok(());
            }
            if let Some(e) = &q.failing {
                match tried_since {
                    // A round has failed since we asked for a fresh attempt.
                    Some(r) if q.rounds > r && q.sending == 0 => return Err(e.clone()),
                    Some(_) => {}
                    None => {
                        tried_since = Some(q.rounds + u64::from(q.sending > 0));
                        q.hurry = true;
                        self.shared.changed.notify_all();
                    }
                }
            }
            self.shared.changed.wait(q);
        }
    }
}

fn upload_loop(
    shared: &Shared,
    dict: &dyn Dict,
    lease: &(dyn Fn(&[Hash]) -> Result<(), DictError> + Send + Sync),
) {
    let mut pause = RETRY_MIN;
    let mut lingering: Option<Instant> = None;
    loop {
        let round: Vec<Item> = {
            let mut q = shared.queue.lock();
            loop {
                if q.items.is_empty() {
                    shared.changed.wait(&mut q);
                    continue;
                }
                if q.failing.is_some() && !q.hurry {
                    // The store refused the last round: pause before the next,
                    // unless a flush wants an answer now.
                    if shared.changed.wait_for(&mut q, pause).timed_out() {
                        break;
                    }
                    continue;
                }
                // Linger a moment unless someone waits or a round is full: a
                // commit hands over its blobs one by one (chunks, manifest,
                // directories, inode table, commit) and then flushes, and
                // they should go out as one round (one lease, one pipeline),
                // not one round each.
                let first = *lingering.get_or_insert_with(Instant::now);
                if q.flushing == 0 && q.bytes < ROUND_BYTES && first.elapsed() < LINGER {
                    shared
                        .changed
                        .wait_for(&mut q, LINGER.saturating_sub(first.elapsed()));
                    continue;
                }
                break;
            }
            lingering = None;
            q.hurry = false;
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
        let hashes: Vec<Hash> = round.iter().map(|(h, _, _)| *h).collect();
        let result = lease(&hashes).and_then(|()| {
            dict.put_many_if_absent(round.iter().map(|(_, k, b)| (k.clone(), b.clone())).collect())
        });
        if result.is_ok() {
            let mut pending = shared.pending.lock();
            for (h, _, _) in &round {
                pending.remove(h);
            }
        }
        let mut q = shared.queue.lock();
        q.sending = 0;
        q.rounds += 1;
        match result {
            Ok(()) => {
                if q.failing.take().is_some() {
                    tracing::info!("uploads to the store succeed again");
                }
                pause = RETRY_MIN;
            }
            Err(e) => {
                if q.failing.is_none() {
                    tracing::warn!("upload to the store failed (kept, and sent again until stored): {e}");
                }
                // Back to the front, in order: sent again before anything newer.
                for item in round.into_iter().rev() {
                    q.bytes += item.2.len();
                    q.items.push_front(item);
                }
                q.failing = Some(e);
                q.failed_rounds += 1;
                pause = (pause * 2).min(RETRY_MAX);
            }
        }
        shared.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dict::MemoryDict;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A store that refuses every upload while `refusals` is above zero.
    struct Refusing {
        inner: MemoryDict,
        refusals: AtomicUsize,
    }

    impl Dict for Refusing {
        fn get(&self, key: &str) -> crate::dict::DictResult<Option<Bytes>> {
            self.inner.get(key)
        }
        fn put_if_absent(&self, key: &str, value: Bytes) -> crate::dict::DictResult<()> {
            if self
                .refusals
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                return Err(DictError::Full("OOM command not allowed".into()));
            }
            self.inner.put_if_absent(key, value)
        }
        fn delete(&self, key: &str) -> crate::dict::DictResult<()> {
            self.inner.delete(key)
        }
        fn contains(&self, key: &str) -> crate::dict::DictResult<bool> {
            self.inner.contains(key)
        }
        fn compare_and_swap(
            &self,
            key: &str,
            expected: Option<&[u8]>,
            new: &[u8],
        ) -> crate::dict::DictResult<bool> {
            self.inner.compare_and_swap(key, expected, new)
        }
    }

    fn item(i: u8) -> Item {
        let b = Bytes::from(vec![i; 10]);
        (Hash::of(&b), format!("k{i}"), b)
    }

    /// The issue-24 sequence: a round fails, the flush after it fails (its
    /// fresh attempt fails too), and the flush after that must not answer Ok
    /// while the blob is still not stored.
    #[test]
    fn flush_is_ok_only_once_every_blob_is_stored_however_often_uploads_fail() {
        let dict = Arc::new(Refusing {
            inner: MemoryDict::default(),
            refusals: AtomicUsize::new(3),
        });
        let d: Arc<dyn Dict> = dict.clone();
        let wb = WriteBehind::default();
        wb.put(&d, vec![item(1)]).unwrap();
        let mut errors = 0;
        loop {
            match wb.flush() {
                Ok(()) => break,
                Err(DictError::Full(_)) => errors += 1,
                Err(e) => panic!("unexpected {e}"),
            }
            assert!(!dict.inner.contains("k1").unwrap() || dict.refusals.load(Ordering::SeqCst) == 0);
            assert!(errors < 10, "flush never succeeded");
        }
        assert!(errors >= 1, "the refusals were never seen");
        assert!(
            dict.inner.contains("k1").unwrap(),
            "flush said Ok with the blob not stored"
        );
        assert!(wb.get(&item(1).0).is_none());
        assert!(wb.failing().is_none());
    }

    /// While the store refuses, the uploader keeps sending by itself (no
    /// commit needed), and the blob stays readable from memory meanwhile.
    #[test]
    fn a_refused_blob_is_sent_again_until_stored_and_readable_meanwhile() {
        let dict = Arc::new(Refusing {
            inner: MemoryDict::default(),
            refusals: AtomicUsize::new(2),
        });
        let d: Arc<dyn Dict> = dict.clone();
        let wb = WriteBehind::default();
        wb.put(&d, vec![item(7)]).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !dict.inner.contains("k7").unwrap() {
            assert!(wb.get(&item(7).0).is_some(), "an unstored blob became unreadable");
            assert!(std::time::Instant::now() < deadline, "never sent again");
            std::thread::sleep(Duration::from_millis(20));
        }
        wb.flush().unwrap();
    }

    /// A store that refuses everything: writers are refused once the queue is
    /// full, instead of the queue growing without bound.
    #[test]
    fn writers_are_refused_with_the_store_error_once_the_queue_is_full() {
        let dict = Arc::new(Refusing {
            inner: MemoryDict::default(),
            refusals: AtomicUsize::new(usize::MAX),
        });
        let d: Arc<dyn Dict> = dict.clone();
        let wb = WriteBehind::default();
        let big = Bytes::from(vec![1u8; 8 << 20]);
        let mut refused = None;
        for i in 0..32u32 {
            let mut b = big.to_vec();
            b[..4].copy_from_slice(&i.to_le_bytes());
            let b = Bytes::from(b);
            if let Err(e) = wb.put(&d, vec![(Hash::of(&b), format!("big{i}"), b)]) {
                refused = Some((i, e));
                break;
            }
            let _ = wb.flush();
        }
        let (at, e) = refused.expect("never refused");
        assert!(matches!(e, DictError::Full(_)), "{e}");
        assert!(
            at as usize * (8 << 20) <= QUEUE_BYTES + (16 << 20),
            "refused only after {at} blobs"
        );
    }

    /// The lease rule: no blob reaches the store before it is leased. A hook
    /// that refuses (say, the store briefly away) fails the round, and
    /// nothing of it is sent until a later lease succeeds.
    #[test]
    fn every_round_is_leased_before_any_of_it_is_sent() {
        let dict = Arc::new(MemoryDict::default());
        let d: Arc<dyn Dict> = dict.clone();
        let leased = Arc::new(Mutex::new(Vec::<Hash>::new()));
        let refusals = Arc::new(AtomicUsize::new(2));
        let hook: LeaseHook = {
            let (dict, leased, refusals) = (dict.clone(), leased.clone(), refusals.clone());
            Arc::new(move |hashes: &[Hash]| {
                for h in hashes {
                    let key = format!("k{}", (0..=255u8).find(|i| item(*i).0 == *h).expect("ours"));
                    assert!(!dict.contains(&key).unwrap(), "{key} was sent before its lease");
                }
                if refusals
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok()
                {
                    return Err(DictError::Backend("lease refused".into()));
                }
                leased.lock().extend_from_slice(hashes);
                Ok(())
            })
        };
        let wb = WriteBehind::with_lease(hook);
        wb.put(&d, (1..=5).map(item).collect()).unwrap();
        wb.put(&d, vec![item(9)]).unwrap();
        while wb.flush().is_err() {}
        assert_eq!(refusals.load(Ordering::SeqCst), 0, "the refusals were never seen");
        for i in [1, 2, 3, 4, 5, 9] {
            assert!(dict.contains(&format!("k{i}")).unwrap(), "k{i} not stored");
            assert!(leased.lock().contains(&item(i).0), "k{i} stored without a lease");
        }
    }
}
