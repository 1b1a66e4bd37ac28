//! The numbered databases of SELECT: 0 to `databases - 1` (16 by default, as
//! in Redis), each a [`Db`] over a store of its own.
//!
//! Database 0 is the server's main store (the data directory itself); the
//! others live in `<dir>/db<N>/` and are opened when first used, or at start
//! if their directory exists. A node of a cluster keeps database 0 only, as a
//! Redis Cluster node does (the dispatcher refuses SELECT there).
//!
//! Invariants:
//! * **One gate for all databases.** A transaction may SELECT another database
//!   between its commands, and MOVE and SWAPDB change two databases at once;
//!   with one gate, EXEC and those commands are atomic against every client
//!   whatever database it uses (see [`crate::db`] for the gate itself).
//! * **Watches stay with the index.** SWAPDB exchanges the two databases'
//!   contents for every client at once, but a client that WATCHed a key of
//!   database 1 keeps watching database 1's key (as in Redis): the watch tables
//!   are swapped back, and every watched key that exists on either side is
//!   touched, so a transaction built on the old contents aborts.
//! * **A swap survives a restart.** Which directory holds which database is
//!   recorded in `<dir>/databases`, written and synced before SWAPDB answers.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::RwLock;

use crate::db::{Db, ExclusiveGuard, Gate, KeyspaceStats};
use crate::store::{Store, StoreError};

/// Opens (creating if needed) the store of the database kept in the named
/// directory, relative to the data directory ("" is the data directory).
pub type Opener = Box<dyn Fn(&str) -> std::io::Result<Arc<dyn Store>> + Send + Sync>;

/// The mapping file's name, in the data directory.
const MAPPING: &str = "databases";

pub struct Databases {
    open: Opener,
    state: RwLock<State>,
    /// Where the index → directory mapping is recorded (none for memory storage).
    mapping: Option<PathBuf>,
    gate: Gate,
    /// Bumped by every SWAPDB: sessions that cached a database look it up again.
    generation: std::sync::atomic::AtomicU64,
    /// Hits, misses and expired keys over every database (INFO stats, as Redis
    /// counts them server-wide).
    pub stats: Arc<KeyspaceStats>,
}

struct State {
    dbs: Vec<Option<Arc<Db>>>,
    /// The directory of each database, relative to the data directory.
    dirs: Vec<String>,
}

fn default_dir(index: usize) -> String {
    if index == 0 {
        String::new()
    } else {
        format!("db{index}")
    }
}

impl Databases {
    /// `count` databases, database 0 over `first`; with `dir`, the others that
    /// already have a directory there are opened now.
    pub fn open(
        first: Arc<dyn Store>,
        count: usize,
        dir: Option<&Path>,
        open: Opener,
    ) -> std::io::Result<Databases> {
        let count = count.max(1);
        let stats = Arc::new(KeyspaceStats::default());
        let mut dirs: Vec<String> = (0..count).map(default_dir).collect();
        let mapping = dir.map(|d| d.join(MAPPING));
        if let Some(path) = &mapping {
            match std::fs::read_to_string(path) {
                Ok(text) => {
                    for line in text.lines() {
                        let mut words = line.split_whitespace();
                        if let (Some(i), Some(name)) =
                            (words.next().and_then(|w| w.parse::<usize>().ok()), words.next())
                        {
                            if i < count {
                                dirs[i] = if name == "." {
                                    String::new()
                                } else {
                                    name.to_string()
                                };
                            }
                        }
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        let mut dbs: Vec<Option<Arc<Db>>> = vec![None; count];
        for (i, name) in dirs.iter().enumerate() {
            if name.is_empty() {
                dbs[i] = Some(Arc::new(Db::with_stats(first.clone(), stats.clone())));
            } else if dir.is_some_and(|d| d.join(name).is_dir()) {
                dbs[i] = Some(Arc::new(Db::with_stats(open(name)?, stats.clone())));
            }
        }
        if dbs[0].is_none() {
            // The data directory itself was swapped into a database beyond
            // `count` (the setting shrank): keep serving it as database 0.
            dirs[0] = String::new();
            dbs[0] = Some(Arc::new(Db::with_stats(first, stats.clone())));
        }
        Ok(Databases {
            open,
            state: RwLock::new(State { dbs, dirs }),
            mapping,
            gate: Gate::new(),
            generation: Default::default(),
            stats,
        })
    }

    /// One database over `store` (tests, and cores that need no SELECT).
    pub fn single(store: Arc<dyn Store>) -> Databases {
        let open: Opener = Box::new(|_| Err(std::io::Error::other("this server has one database")));
        Databases::open(store, 1, None, open).expect("no files are read")
    }

    /// Changes whenever databases move between indexes (SWAPDB).
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }

    /// How many databases SELECT may choose from.
    pub fn count(&self) -> usize {
        self.state.read().dbs.len()
    }

    /// Database 0: always open. (A cluster node has no other; a single node's
    /// database 0 may have been swapped by SWAPDB, which this follows.)
    pub fn zero(&self) -> Arc<Db> {
        self.state.read().dbs[0]
            .clone()
            .expect("database 0 is always open")
    }

    /// Database `index`, opened now if it is its first use. `None`: out of range.
    pub fn get(&self, index: usize) -> Option<Result<Arc<Db>, StoreError>> {
        if let Some(db) = self.state.read().dbs.get(index)? {
            return Some(Ok(db.clone()));
        }
        let mut state = self.state.write();
        if let Some(db) = &state.dbs[index] {
            return Some(Ok(db.clone()));
        }
        let name = state.dirs[index].clone();
        Some(match (self.open)(&name) {
            Ok(store) => {
                let db = Arc::new(Db::with_stats(store, self.stats.clone()));
                state.dbs[index] = Some(db.clone());
                Ok(db)
            }
            Err(e) => Err(StoreError::Write(format!("opening database {index}: {e}"))),
        })
    }

    /// The databases opened so far, with their indexes.
    pub fn opened(&self) -> Vec<(usize, Arc<Db>)> {
        let state = self.state.read();
        state
            .dbs
            .iter()
            .enumerate()
            .filter_map(|(i, db)| db.clone().map(|db| (i, db)))
            .collect()
    }

    /// Held by every command that is atomic on its own.
    pub fn shared(&self) -> parking_lot::RwLockReadGuard<'_, ()> {
        self.gate.shared()
    }

    /// Held by EXEC and by writes of several keys or databases.
    pub fn exclusive(&self) -> ExclusiveGuard<'_> {
        self.gate.exclusive()
    }

    /// Makes every database's buffered writes durable (before replies to
    /// writes are sent).
    pub fn flush_writes(&self) -> Result<(), StoreError> {
        // On every batch of writes: no list is made. The read lock held across
        // the flush only delays opening a database or a SWAPDB.
        for db in self.state.read().dbs.iter().flatten() {
            db.store().flush()?;
        }
        Ok(())
    }

    /// SWAPDB: exchanges the contents of databases `a` and `b` for every
    /// client. Called with the gate held exclusively.
    pub fn swap(&self, a: usize, b: usize) -> Result<(), StoreError> {
        let (da, db) = match (self.get(a), self.get(b)) {
            (Some(da), Some(db)) => (da?, db?),
            _ => return Err(StoreError::Write("DB index is out of range".into())),
        };
        if a == b {
            return Ok(());
        }
        let mut state = self.state.write();
        let mut dirs = state.dirs.clone();
        dirs.swap(a, b);
        if let Some(path) = &self.mapping {
            let text: String = dirs
                .iter()
                .enumerate()
                .map(|(i, d)| format!("{i} {}\n", if d.is_empty() { "." } else { d }))
                .collect();
            crate::durable::replace(path, text.as_bytes()).map_err(|e| {
                StoreError::Write(format!("recording the swap of databases {a} and {b}: {e}"))
            })?;
        }
        state.dirs = dirs;
        state.dbs.swap(a, b);
        self.generation.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        // The watches belong to the index, not the contents.
        da.swap_watches(&db);
        da.touch_watched_existing_in(&db);
        db.touch_watched_existing_in(&da);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::WatchFlag;
    use crate::store::MemStore;
    use bytes::Bytes;

    fn on_disk(dir: &Path, count: usize) -> Databases {
        let options = crate::store::disk::Options::default();
        let first = crate::store::disk::DiskStore::open(dir, options.clone()).unwrap();
        let root = dir.to_path_buf();
        let open: Opener = Box::new(move |name| {
            let path = root.join(name);
            std::fs::create_dir_all(&path)?;
            Ok(crate::store::disk::DiskStore::open(&path, options.clone())? as Arc<dyn Store>)
        });
        Databases::open(first, count, Some(dir), open).unwrap()
    }

    fn get(dbs: &Databases, i: usize, key: &str) -> Option<Bytes> {
        let db = dbs.get(i).unwrap().unwrap();
        db.get(&Bytes::from(key.to_string())).unwrap().map(|e| e.value)
    }

    fn set(dbs: &Databases, i: usize, key: &str, value: &str) {
        let db = dbs.get(i).unwrap().unwrap();
        db.set(
            &Bytes::from(key.to_string()),
            Bytes::from(value.to_string()),
            None,
        )
        .unwrap();
        db.store().flush().unwrap();
    }

    #[test]
    fn databases_are_separate_opened_on_use_and_reopened_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        {
            let dbs = on_disk(dir.path(), 16);
            assert_eq!(dbs.opened().len(), 1);
            set(&dbs, 0, "k", "zero");
            set(&dbs, 3, "k", "three");
            assert_eq!(get(&dbs, 0, "k").as_deref(), Some(&b"zero"[..]));
            assert_eq!(get(&dbs, 3, "k").as_deref(), Some(&b"three"[..]));
            assert_eq!(get(&dbs, 5, "k"), None);
            assert!(dbs.get(16).is_none(), "index 16 of 16 is out of range");
        }
        let dbs = on_disk(dir.path(), 16);
        // Databases with a directory are open at start (their keys expire, INFO lists them).
        let opened: Vec<usize> = dbs.opened().into_iter().map(|(i, _)| i).collect();
        assert_eq!(opened, [0, 3, 5]);
        assert_eq!(get(&dbs, 3, "k").as_deref(), Some(&b"three"[..]));
    }

    #[test]
    fn a_swap_is_seen_by_everyone_survives_a_restart_and_breaks_watches_by_index() {
        let dir = tempfile::tempdir().unwrap();
        let flag = Arc::new(WatchFlag::default());
        let other = Arc::new(WatchFlag::default());
        {
            let dbs = on_disk(dir.path(), 16);
            set(&dbs, 0, "k", "zero");
            set(&dbs, 1, "only-in-one", "x");
            // A watcher of database 0's key that exists on one side, and one of
            // a key that exists on neither.
            dbs.get(0)
                .unwrap()
                .unwrap()
                .watch(&Bytes::from("only-in-one"), &flag);
            dbs.get(0)
                .unwrap()
                .unwrap()
                .watch(&Bytes::from("nowhere"), &other);
            let _gate = dbs.exclusive();
            dbs.swap(0, 1).unwrap();
            assert_eq!(get(&dbs, 0, "only-in-one").as_deref(), Some(&b"x"[..]));
            assert_eq!(get(&dbs, 1, "k").as_deref(), Some(&b"zero"[..]));
            assert!(
                flag.is_dirty(),
                "a watched key that exists after the swap is touched"
            );
            assert!(!other.is_dirty(), "a watched key on neither side is not");
            // The watch stayed with index 0: a write there touches it.
            let after = Arc::new(WatchFlag::default());
            dbs.get(0).unwrap().unwrap().watch(&Bytes::from("w"), &after);
            drop(_gate);
            set(&dbs, 0, "w", "1");
            assert!(after.is_dirty());
        }
        let dbs = on_disk(dir.path(), 16);
        assert_eq!(get(&dbs, 0, "only-in-one").as_deref(), Some(&b"x"[..]));
        assert_eq!(get(&dbs, 1, "k").as_deref(), Some(&b"zero"[..]));
        assert_eq!(get(&dbs, 0, "k"), None);
    }

    #[test]
    fn a_single_database_refuses_others() {
        let dbs = Databases::single(Arc::new(MemStore::new()));
        assert_eq!(dbs.count(), 1);
        assert!(dbs.get(1).is_none());
        assert!(dbs.get(0).unwrap().is_ok());
    }
}
