//! Storage engines and the interface they share.
//!
//! A [`Store`] is a map from key to [`Entry`] (value plus optional expiry time)
//! with one atomic primitive, [`Store::update`], from which every
//! read-modify-write command is built. It knows nothing of Redis semantics:
//! logical expiry, WATCH and command rules live in [`crate::db`]. Values are
//! [`Bytes`] so an engine can hand out slices of a memory-mapped file without
//! copying.
//!
//! Engines: [`memory::MemStore`] (nothing persisted) and [`disk::DiskStore`] (the
//! default: an append-only log of segments). Both keep keys in the hash-ordered
//! [`index::Index`], which is what makes SCAN's guarantee hold.

pub mod disk;
pub mod index;
pub mod memory;

use bytes::Bytes;

pub use disk::DiskStore;
pub use memory::MemStore;

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

/// Errors a storage engine returns; they become error replies.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Writing to the data directory failed (full disk, I/O error). Writes are
    /// refused with this until a retry succeeds.
    #[error("MISCONF kvd could not write to its data directory: {0}")]
    Write(String),
    /// A stored value failed its checksum.
    #[error(
        "ERR the stored value of key '{0}' is corrupt (checksum mismatch); it can be overwritten or deleted"
    )]
    Corrupt(String),
}

/// A storage engine. All methods are atomic per key and safe to call from many
/// threads at once.
pub trait Store: Send + Sync + 'static {
    /// The key's entry. An engine that checksums what it stores answers
    /// [`StoreError::Corrupt`] rather than return damaged bytes.
    fn get(&self, key: &Bytes) -> Result<Option<Entry>, StoreError>;
    /// Whether the key is stored, and its expiry time, without reading its value.
    fn expiry(&self, key: &Bytes) -> Option<Option<u64>>;
    /// The first `len` bytes of the key's value (all of it if shorter),
    /// without reading the rest and without the checksum check: for callers
    /// that compare a small header and read the value properly when it
    /// matters (the replicated engine's catch-up compares ballots this way,
    /// so a node with large values does not read them all on every pass).
    fn value_prefix(&self, key: &Bytes, len: usize) -> Result<Option<Bytes>, StoreError> {
        Ok(self.get(key)?.map(|e| e.value.slice(..len.min(e.value.len()))))
    }
    /// The length of the key's value, without reading it.
    fn value_len(&self, key: &Bytes) -> Option<usize> {
        self.get(key).ok().flatten().map(|e| e.value.len())
    }
    /// Calls `f` with the key's current entry under the key's lock and applies its
    /// decision before any other writer of that key runs. With `needs_value`
    /// false the entry's value may be left empty (a blind write such as SET or
    /// DEL decides on existence and expiry only), which spares an engine a read
    /// and lets a damaged value be overwritten; with it true, a damaged value is
    /// [`StoreError::Corrupt`].
    fn update(
        &self,
        key: &Bytes,
        needs_value: bool,
        f: &mut dyn FnMut(Option<&Entry>) -> Update,
    ) -> Result<(), StoreError>;
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
    /// Bytes of keys and values held (for INFO).
    fn used_bytes(&self) -> u64;
    /// Makes every write done so far as durable as the engine promises (written
    /// to the OS, and fsynced with `appendfsync always`) before the caller
    /// acknowledges it. Called once per batch of requests, so concurrent writers
    /// share one write and one fsync (group commit).
    fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }
    /// Starts a background compaction, if the engine has one (BGREWRITEAOF).
    fn compact(&self) -> Result<(), StoreError> {
        Ok(())
    }
    /// Applies a setting changed by CONFIG SET that concerns the engine.
    /// Settings the engine does not have are an error (`appendfsync` on the
    /// memory engine), so nothing is silently ignored.
    fn configure(&self, name: &str, config: &crate::config::Config) -> Result<(), String> {
        let _ = config;
        match name {
            "appendfsync" | "compact-dead-percent" => Err(format!("{name} needs the disk storage engine")),
            _ => Ok(()),
        }
    }
    /// `field:value` lines for INFO persistence.
    fn info(&self) -> Vec<(&'static str, String)> {
        vec![("kvd_storage_engine", "memory".into())]
    }
}
