//! The keyspace as Redis clients see it: a [`Store`] plus logical expiry, WATCH
//! invalidation and the gate that makes transactions atomic.
//!
//! Invariants:
//! * **Expired keys do not exist.** A key whose expiry time has passed is never
//!   returned, whether or not the active expiry task has removed it yet; the first
//!   access removes it (counting it in `expired_keys` and touching its watchers).
//! * **Every change touches the key.** Each method that changes a key marks the
//!   WATCH flags of every client watching it, before the caller's gate is released,
//!   so an EXEC (which holds the gate exclusively) sees every change made before it
//!   and none made during it.
//! * **Nothing interleaves with EXEC.** Ordinary commands hold the gate shared
//!   (they run in parallel, each atomic per key through [`Store::update`]); EXEC
//!   and multi-key writes (MSET, MSETNX, FLUSHALL, RENAME...) hold it exclusively.
//!   The gate is taken once per command by the dispatcher, never inside this
//!   module, so nothing re-enters it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use parking_lot::{Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::store::{Entry, Store, StoreError, Update};

/// A change made to a key, recorded for keyspace notifications (see
/// [`Db::recording`] and [`crate::notify`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub key: Bytes,
    pub kind: ChangeKind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangeKind {
    /// A value put where there was none.
    Created,
    /// A value (or its expiry) replaced.
    Updated,
    Removed,
    /// Found expired and removed.
    Expired,
}

thread_local! {
    /// The changes of the command running on this thread, while one is
    /// recorded. Commands run without awaiting, so a command's changes are
    /// all made on the thread that started it.
    static RECORDED: std::cell::RefCell<Option<Vec<Change>>> = const { std::cell::RefCell::new(None) };
}

fn record(key: &Bytes, kind: ChangeKind) {
    RECORDED.with(|r| {
        if let Some(changes) = r.borrow_mut().as_mut() {
            changes.push(Change {
                key: key.clone(),
                kind,
            });
        }
    });
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn live(entry: Option<&Entry>, now: u64) -> Option<&Entry> {
    entry.filter(|e| e.expires_at.is_none_or(|t| t > now))
}

/// A client's WATCH state: one flag, set when any watched key is touched.
#[derive(Debug, Default)]
pub struct WatchFlag {
    dirty: AtomicBool,
}

impl WatchFlag {
    pub fn is_dirty(&self) -> bool {
        self.dirty.load(Ordering::Acquire)
    }
}

/// Who watches which key.
#[derive(Default)]
struct Watches {
    /// Number of (key, client) registrations, so writes skip the lock when nobody
    /// watches anything (the common case).
    count: AtomicUsize,
    map: Mutex<HashMap<Bytes, Vec<Weak<WatchFlag>>>>,
}

/// Keyspace counters reported by INFO stats.
#[derive(Default)]
pub struct KeyspaceStats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub expired: AtomicU64,
}

/// Number of independent reader slots in the gate; more than any expected core
/// count, so readers on different threads rarely share one.
const GATE_SLOTS: usize = 16;

/// One gate slot on its own cache line, so readers on different cores do not
/// bounce a shared lock word between them.
#[repr(align(128))]
#[derive(Default)]
struct GateSlot(RwLock<()>);

/// The transaction gate: a reader-writer lock split into slots. A reader locks
/// the slot of its thread; a writer locks every slot, in index order (so two
/// writers cannot deadlock and a writer excludes every reader).
pub struct Gate {
    slots: Vec<GateSlot>,
}

/// Held while a command that needs the whole keyspace to itself runs.
pub struct ExclusiveGuard<'a> {
    _slots: Vec<RwLockWriteGuard<'a, ()>>,
}

impl Default for Gate {
    fn default() -> Self {
        Gate::new()
    }
}

impl Gate {
    pub fn new() -> Self {
        Gate {
            slots: (0..GATE_SLOTS).map(|_| GateSlot::default()).collect(),
        }
    }

    pub fn shared(&self) -> RwLockReadGuard<'_, ()> {
        thread_local! {
            static SLOT: usize = {
                static NEXT: AtomicUsize = AtomicUsize::new(0);
                NEXT.fetch_add(1, Ordering::Relaxed) % GATE_SLOTS
            };
        }
        self.slots[SLOT.with(|s| *s)].0.read()
    }

    pub fn exclusive(&self) -> ExclusiveGuard<'_> {
        ExclusiveGuard {
            _slots: self.slots.iter().map(|s| s.0.write()).collect(),
        }
    }
}

/// One database: a store with logical expiry and WATCH. The transaction
/// gate is shared by all databases and lives in
/// [`crate::databases::Databases`].
pub struct Db {
    store: Arc<dyn Store>,
    watches: Watches,
    pub stats: Arc<KeyspaceStats>,
}

impl Db {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Db::with_stats(store, Arc::default())
    }

    /// A database counting hits, misses and expiries in `stats` (shared by
    /// every database of a server).
    pub fn with_stats(store: Arc<dyn Store>, stats: Arc<KeyspaceStats>) -> Self {
        Db {
            store,
            watches: Watches::default(),
            stats,
        }
    }

    pub fn store(&self) -> &dyn Store {
        &*self.store
    }

    /// The live entry for `key`, removing it first if it has expired.
    pub fn get(&self, key: &Bytes) -> Result<Option<Entry>, StoreError> {
        let Some(entry) = self.store.get(key)? else {
            return Ok(None);
        };
        if entry.expires_at.is_some_and(|t| t <= now_ms()) {
            self.expire(key);
            return Ok(None);
        }
        Ok(Some(entry))
    }

    /// Like [`Db::get`], counting a keyspace hit or miss (GET, MGET, ...).
    pub fn lookup_read(&self, key: &Bytes) -> Result<Option<Entry>, StoreError> {
        let found = self.get(key)?;
        let counter = if found.is_some() {
            &self.stats.hits
        } else {
            &self.stats.misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
        Ok(found)
    }

    /// Whether `key` exists and has not expired; its expiry time if so. Reads no
    /// value. Removes the key if it has expired.
    pub fn expiry(&self, key: &Bytes) -> Option<Option<u64>> {
        let expires_at = self.store.expiry(key)?;
        if expires_at.is_some_and(|t| t <= now_ms()) {
            self.expire(key);
            return None;
        }
        Some(expires_at)
    }

    pub fn exists(&self, key: &Bytes) -> bool {
        self.expiry(key).is_some()
    }

    /// Atomically reads and changes one key. `f` sees the live entry (`None` if the
    /// key is absent or expired) and returns the change and a result. Watchers are
    /// touched if the change is not `Keep`.
    pub fn update<R>(
        &self,
        key: &Bytes,
        f: impl FnMut(Option<&Entry>) -> (Update, R),
    ) -> Result<R, StoreError> {
        self.update_with(key, true, f)
    }

    /// Like [`Db::update`] for a change that does not depend on the current
    /// value (only on whether the key exists, and its expiry): the closure may see
    /// an empty value.
    pub fn update_blind<R>(
        &self,
        key: &Bytes,
        f: impl FnMut(Option<&Entry>) -> (Update, R),
    ) -> Result<R, StoreError> {
        self.update_with(key, false, f)
    }

    fn update_with<R>(
        &self,
        key: &Bytes,
        needs_value: bool,
        mut f: impl FnMut(Option<&Entry>) -> (Update, R),
    ) -> Result<R, StoreError> {
        let mut result = None;
        let mut changed = false;
        let mut expired_now = false;
        let mut kind = None;
        self.store.update(key, needs_value, &mut |entry| {
            // The clock is read only for keys that can expire.
            let live_entry = match entry {
                Some(e) if e.expires_at.is_some() => live(entry, now_ms()),
                other => other,
            };
            expired_now = entry.is_some() && live_entry.is_none();
            let (update, r) = f(live_entry);
            result = Some(r);
            changed = !matches!(update, Update::Keep);
            kind = match &update {
                Update::Put(_) if live_entry.is_some() => Some(ChangeKind::Updated),
                Update::Put(_) => Some(ChangeKind::Created),
                Update::Remove if live_entry.is_some() => Some(ChangeKind::Removed),
                _ => None,
            };
            match update {
                // An expired entry that the command left alone is removed anyway.
                Update::Keep if expired_now => Update::Remove,
                other => other,
            }
        })?;
        if expired_now {
            self.stats.expired.fetch_add(1, Ordering::Relaxed);
            record(key, ChangeKind::Expired);
        }
        if let Some(kind) = kind {
            record(key, kind);
        }
        if changed || expired_now {
            self.touch(key);
        }
        Ok(result.expect("Store::update calls its closure exactly once"))
    }

    /// Sets a key unconditionally.
    pub fn set(&self, key: &Bytes, value: Bytes, expires_at: Option<u64>) -> Result<(), StoreError> {
        self.update_blind(key, |_| {
            (
                Update::Put(Entry {
                    value: value.clone(),
                    expires_at,
                }),
                (),
            )
        })
    }

    /// Removes a key; whether it existed (and was live).
    pub fn remove(&self, key: &Bytes) -> Result<bool, StoreError> {
        self.update_blind(key, |e| match e {
            Some(_) => (Update::Remove, true),
            None => (Update::Keep, false),
        })
    }

    /// Removes `key` if it is (still) expired.
    pub fn expire(&self, key: &Bytes) {
        // `update` removes an expired entry and counts it whatever the closure says.
        let _ = self.update_blind(key, |_| (Update::Keep, ()));
    }

    /// Removes every key, touching the watchers of keys that existed.
    pub fn flush(&self) -> Result<(), StoreError> {
        self.touch_existing_watched();
        self.store.clear()
    }

    /// Runs `f`, recording every change it makes to a key (on this thread),
    /// for keyspace notifications.
    pub fn recording<R>(&self, f: impl FnOnce() -> R) -> (R, Vec<Change>) {
        /// Stops the recording however `f` ends.
        struct Stop;
        impl Drop for Stop {
            fn drop(&mut self) {
                RECORDED.with(|r| r.borrow_mut().take());
            }
        }
        RECORDED.with(|r| *r.borrow_mut() = Some(Vec::new()));
        let stop = Stop;
        let out = f();
        let changes = RECORDED.with(|r| r.borrow_mut().take()).unwrap_or_default();
        drop(stop);
        (out, changes)
    }

    /// Number of keys (as DBSIZE counts them: not yet removed expired keys included,
    /// as in Redis).
    pub fn len(&self) -> usize {
        self.store.len()
    }

    pub fn is_empty(&self) -> bool {
        self.store.is_empty()
    }

    /// Removes up to `limit` expired keys; returns how many. Called with the
    /// gate held shared.
    pub fn expire_some(&self, limit: usize) -> usize {
        let due = self.store.expired(now_ms(), limit);
        for key in &due {
            self.expire(key);
        }
        due.len()
    }

    // ---- WATCH ----

    /// Registers `flag` as watching `key`. Returns the key's expiry time if it is
    /// live now, so EXEC can tell whether it expired since.
    pub fn watch(&self, key: &Bytes, flag: &Arc<WatchFlag>) -> Option<Option<u64>> {
        self.watches
            .map
            .lock()
            .entry(key.clone())
            .or_default()
            .push(Arc::downgrade(flag));
        self.watches.count.fetch_add(1, Ordering::AcqRel);
        self.expiry(key)
    }

    /// Drops `flag`'s registrations for `keys`.
    pub fn unwatch(&self, keys: &[Bytes], flag: &Arc<WatchFlag>) {
        let mut map = self.watches.map.lock();
        for key in keys {
            if let Some(list) = map.get_mut(key) {
                let before = list.len();
                list.retain(|w| !std::ptr::eq(w.as_ptr(), Arc::as_ptr(flag)) && w.strong_count() > 0);
                self.watches
                    .count
                    .fetch_sub(before - list.len(), Ordering::AcqRel);
                if list.is_empty() {
                    map.remove(key);
                }
            }
        }
    }

    /// Number of keys watched by at least one client (INFO `watching_clients` family).
    pub fn watched_keys(&self) -> usize {
        self.watches.map.lock().len()
    }

    fn touch(&self, key: &Bytes) {
        if self.watches.count.load(Ordering::Acquire) == 0 {
            return;
        }
        if let Some(list) = self.watches.map.lock().get(key) {
            for flag in list.iter().filter_map(Weak::upgrade) {
                flag.dirty.store(true, Ordering::Release);
            }
        }
    }

    /// Marks every watcher of a key matching `pred` as touched: a slot leaving
    /// this node breaks the WATCHes on its keys, since EXEC can no longer run here.
    pub fn touch_watched_where(&self, pred: impl Fn(&Bytes) -> bool) {
        if self.watches.count.load(Ordering::Acquire) == 0 {
            return;
        }
        let map = self.watches.map.lock();
        for (_, list) in map.iter().filter(|(k, _)| pred(k)) {
            for flag in list.iter().filter_map(Weak::upgrade) {
                flag.dirty.store(true, Ordering::Release);
            }
        }
    }

    /// SWAPDB: exchanges the watch tables of two databases, so that watches
    /// stay with the database index while the contents move.
    pub fn swap_watches(&self, other: &Db) {
        if std::ptr::eq(self, other) {
            return;
        }
        // Only under the exclusive gate, so nothing else takes these locks;
        // the address order keeps it deadlock-free regardless.
        let (first, second) = if (self as *const Db) < (other as *const Db) {
            (self, other)
        } else {
            (other, self)
        };
        let mut a = first.watches.map.lock();
        let mut b = second.watches.map.lock();
        std::mem::swap(&mut *a, &mut *b);
        let (ca, cb) = (
            first.watches.count.load(Ordering::Acquire),
            second.watches.count.load(Ordering::Acquire),
        );
        first.watches.count.store(cb, Ordering::Release);
        second.watches.count.store(ca, Ordering::Release);
    }

    /// Marks the watchers of every watched key that exists here or in
    /// `other` (SWAPDB: the key's value may have changed either way).
    pub fn touch_watched_existing_in(&self, other: &Db) {
        if self.watches.count.load(Ordering::Acquire) == 0 {
            return;
        }
        let map = self.watches.map.lock();
        for (key, list) in map.iter() {
            if self.store.expiry(key).is_some() || other.store.expiry(key).is_some() {
                for flag in list.iter().filter_map(Weak::upgrade) {
                    flag.dirty.store(true, Ordering::Release);
                }
            }
        }
    }

    fn touch_existing_watched(&self) {
        if self.watches.count.load(Ordering::Acquire) == 0 {
            return;
        }
        let map = self.watches.map.lock();
        for (key, list) in map.iter() {
            if self.store.expiry(key).is_some() {
                for flag in list.iter().filter_map(Weak::upgrade) {
                    flag.dirty.store(true, Ordering::Release);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemStore;

    fn db() -> Db {
        Db::new(Arc::new(MemStore::new()))
    }

    #[test]
    fn expired_keys_are_gone_and_counted() {
        let db = db();
        let k = Bytes::from_static(b"k");
        db.set(&k, Bytes::from_static(b"v"), Some(now_ms() - 1)).unwrap();
        assert!(db.get(&k).unwrap().is_none());
        assert_eq!(db.len(), 0);
        assert_eq!(db.stats.expired.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_write_dirties_watchers_and_a_read_does_not() {
        let db = db();
        let k = Bytes::from_static(b"k");
        let flag = Arc::new(WatchFlag::default());
        db.watch(&k, &flag);
        db.get(&k).unwrap();
        assert!(!flag.is_dirty());
        db.set(&k, Bytes::from_static(b"v"), None).unwrap();
        assert!(flag.is_dirty());
        db.unwatch(std::slice::from_ref(&k), &flag);
        assert_eq!(db.watched_keys(), 0);
    }

    #[test]
    fn flush_dirties_only_watchers_of_existing_keys() {
        let db = db();
        let (a, b) = (Bytes::from_static(b"a"), Bytes::from_static(b"b"));
        db.set(&a, Bytes::from_static(b"v"), None).unwrap();
        let fa = Arc::new(WatchFlag::default());
        let fb = Arc::new(WatchFlag::default());
        db.watch(&a, &fa);
        db.watch(&b, &fb);
        db.flush().unwrap();
        assert!(fa.is_dirty());
        assert!(!fb.is_dirty());
    }
}
