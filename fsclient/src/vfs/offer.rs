//! Offers of fetched bytes to a cache outside the core (a mount hands them to
//! the kernel's page cache).
//!
//! A random reader asks for 4 KiB, but the store holds whole chunks (about
//! 1 MiB), so the whole chunk was fetched and checked anyway. Offering all of
//! it lets the next reads near it be answered by the kernel without a trip
//! through FUSE and the store: 4 KiB random reads of a large file went from
//! about 900 to tens of thousands a second once its chunks had been met.
//!
//! The danger is keeping bytes older than a write. The rules that exclude it:
//! - an offer is made and kept only while no handle in this mount has the
//!   file open for writing (`Node::writers`), so no write can run meanwhile
//!   (a write, fallocate or writable mapping needs such a handle);
//! - an offer carries the file's content version and its `FileData`; a
//!   truncation changes the version, another client's commit replaces the
//!   `FileData`, and either makes the offer stale;
//! - [`Vfs::keep_if_current`] holds the cache gate while the bytes are kept;
//!   opening a file for writing and truncating wait for the gate before they
//!   return ([`Vfs::wait_for_keeps`]), so no write or truncation returns
//!   before bytes kept under the old content are in place, where the kernel's
//!   own handling of the change then replaces them;
//! - that wait is bounded ([`CHANGE_WAITS_FOR_KEEP`]): keeping may wait on
//!   the kernel for pages a pending read holds, and if every request thread
//!   waited at the gate, nothing would answer that read. A change that stops
//!   waiting, or another client's commit (whose invalidation may race with the
//!   keeping), is seen by the check after keeping, and what was kept is
//!   dropped again ([`Kept::Spoiled`]).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;

use super::file::FileData;
use super::{Body, Ino, Vfs};

/// How long opening for writing or truncating waits for bytes being kept.
const CHANGE_WAITS_FOR_KEEP: Duration = if cfg!(test) {
    Duration::from_millis(50)
} else {
    Duration::from_secs(1)
};

/// A file's bytes at `offset` (a whole stored chunk) that may be kept outside
/// the core while they are current: see [`Vfs::keep_if_current`].
pub struct CacheOffer {
    pub ino: Ino,
    pub offset: u64,
    pub bytes: Bytes,
    file: Arc<Mutex<FileData>>,
    version: u64,
}

/// What became of an offer.
#[derive(Debug, PartialEq, Eq)]
pub enum Kept {
    /// Not current any more: not kept.
    No,
    Yes,
    /// Kept, but the content changed while it was being kept: drop it again.
    Spoiled,
}

impl Vfs {
    /// An offer of `bytes` at `offset` of `file` (read under `version`), if no
    /// handle in this mount has the file open for writing.
    pub(super) fn offer(
        &self,
        ino: Ino,
        file: &Arc<Mutex<FileData>>,
        version: u64,
        (offset, bytes): (u64, Bytes),
    ) -> Option<CacheOffer> {
        let writers = self.state.lock().node(ino).map_or(1, |n| n.writers);
        (writers == 0).then(|| CacheOffer {
            ino,
            offset,
            bytes,
            file: file.clone(),
            version,
        })
    }

    /// Runs `keep` (which puts the offer's bytes in the outside cache) if they
    /// are still the file's content, holding off local changes of file
    /// contents while it runs (see the module's rules).
    pub fn keep_if_current(&self, offer: &CacheOffer, keep: impl FnOnce()) -> Kept {
        let _gate = self.cache_gate.lock();
        if !self.is_current(offer) {
            return Kept::No;
        }
        keep();
        if self.is_current(offer) {
            Kept::Yes
        } else {
            Kept::Spoiled
        }
    }

    fn is_current(&self, offer: &CacheOffer) -> bool {
        let st = self.state.lock();
        let Ok(node) = st.node(offer.ino) else {
            return false;
        };
        let same_data = matches!(&node.body, Body::File { data: Some(d), .. } if Arc::ptr_eq(d, &offer.file));
        node.writers == 0 && same_data && offer.file.lock().version() == offer.version
    }

    /// Called by a change of a file's contents (opening for writing,
    /// truncation) before it returns, holding no lock: waits for bytes being
    /// kept, for at most [`CHANGE_WAITS_FOR_KEEP`].
    pub(super) fn wait_for_keeps(&self) {
        drop(self.cache_gate.try_lock_for(CHANGE_WAITS_FOR_KEEP));
    }
}
