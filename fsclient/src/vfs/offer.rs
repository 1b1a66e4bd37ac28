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
//!
//! The kernel keeps only whole pages of what it is given (a page it is handed
//! part of stays unread), and chunk boundaries fall anywhere in a page. So an
//! offer also carries the pages at its chunk's edges, completed from the
//! edges of the neighbouring chunks ([`Fringes`]): without them one page per
//! chunk boundary stayed out of the cache, and each read of one cost two whole
//! chunks fetched from the store; steady 4 KiB random reads of a 1 GiB file
//! ran at a quarter (plain) to a tenth (encrypted) of the page cache's speed.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;

use super::file::{FileData, ReadView};
use super::{Body, Ino, Vfs};
use crate::object::Hash;

/// How long opening for writing or truncating waits for bytes being kept.
const CHANGE_WAITS_FOR_KEEP: Duration = if cfg!(test) {
    Duration::from_millis(50)
} else {
    Duration::from_secs(1)
};

/// A file's bytes (a whole stored chunk, and the whole pages at its edges)
/// that may be kept outside the core while they are current: see
/// [`Vfs::keep_if_current`].
pub struct CacheOffer {
    pub ino: Ino,
    /// `(offset, bytes)`: the chunk first, then the pages at its edges that
    /// could be completed.
    pub pieces: Vec<(u64, Bytes)>,
    file: Arc<Mutex<FileData>>,
    version: u64,
}

impl CacheOffer {
    /// The file range the pieces span, as `(offset, length)`.
    pub fn span(&self) -> (u64, u64) {
        let start = self.pieces.iter().map(|p| p.0).min().unwrap_or(0);
        let end = self
            .pieces
            .iter()
            .map(|p| p.0 + p.1.len() as u64)
            .max()
            .unwrap_or(0);
        (start, end - start)
    }
}

/// The page size of this machine's page cache.
pub fn system_page_size() -> usize {
    // SAFETY: sysconf reads a constant of the running system.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(n).ok().filter(|&n| n > 0).unwrap_or(4096)
}

/// Memory the fringes may take (each chunk's first and last page).
const FRINGE_BYTES: usize = 16 << 20;

/// The first and last page of each chunk offered lately, so that a chunk's
/// offer can complete the page it shares with a neighbour that was offered
/// before it. Each page a chunk boundary falls in is completed when the
/// second of its two chunks is offered, whichever comes first.
pub(super) struct Fringes {
    page: usize,
    /// By chunk hash: (its first page of bytes, its last page of bytes).
    edges: lru::LruCache<Hash, (Bytes, Bytes)>,
}

impl Fringes {
    pub(super) fn new(page: usize) -> Fringes {
        let page = page.max(1);
        let entries = (FRINGE_BYTES / (2 * page)).max(16);
        Fringes {
            page,
            edges: lru::LruCache::new(std::num::NonZeroUsize::new(entries).expect("at least 16")),
        }
    }

    /// The pieces to offer for chunk `i` of `view`, starting at `start` with
    /// bytes `data` (the whole chunk, with nothing written over the file's
    /// base): the chunk, then each page at its edges whose bytes are all
    /// known. Notes the chunk's own edges for its neighbours.
    pub(super) fn widen(
        &mut self,
        view: &ReadView,
        i: usize,
        (start, data): (u64, Bytes),
    ) -> Vec<(u64, Bytes)> {
        let page = self.page as u64;
        let end = start + data.len() as u64;
        if let Some((h, _, _)) = view.chunk(i) {
            if !self.edges.contains(&h) {
                let n = self.page.min(data.len());
                let head = Bytes::copy_from_slice(&data[..n]);
                let tail = Bytes::copy_from_slice(&data[data.len() - n..]);
                self.edges.put(h, (head, tail));
            }
        }
        // The known bytes around the chunk: [from, to) = the previous chunk's
        // last page, the chunk, the next chunk's first page (where known).
        let prev = i.checked_sub(1).and_then(|j| view.chunk(j));
        let next = view.chunk(i + 1);
        let before = prev
            .filter(|&(_, s, l)| s + l as u64 == start)
            .and_then(|(h, _, _)| self.edges.get(&h).map(|(_, tail)| tail.clone()))
            .unwrap_or_default();
        let after = next
            .filter(|&(_, s, _)| s == end)
            .and_then(|(h, _, _)| self.edges.get(&h).map(|(head, _)| head.clone()))
            .unwrap_or_default();
        let from = start - before.len() as u64;
        let to = end + after.len() as u64;
        // Only the stored base's bytes: past them lies what a truncation cut.
        let limit = view.base_end();
        let page_at = |p: u64| -> Option<(u64, Bytes)> {
            let p_end = (p + page).min(limit);
            if p < from || p_end > to || p_end <= p {
                return None;
            }
            let mut bytes = Vec::with_capacity((p_end - p) as usize);
            for (at, part) in [(from, &before), (start, &data), (end, &after)] {
                let lo = p.max(at);
                let hi = p_end.min(at + part.len() as u64);
                if lo < hi {
                    bytes.extend_from_slice(&part[(lo - at) as usize..(hi - at) as usize]);
                }
            }
            Some((p, bytes.into()))
        };
        let first = start / page * page;
        let last = end / page * page;
        let mut pieces = vec![(start, data.clone())];
        if first < start {
            pieces.extend(page_at(first));
        }
        if !end.is_multiple_of(page) && end < limit && (last != first || first == start) {
            pieces.extend(page_at(last));
        }
        pieces
    }
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
    /// An offer of `pieces` of `file` (read under `version`), if no handle in
    /// this mount has the file open for writing.
    pub(super) fn offer(
        &self,
        ino: Ino,
        file: &Arc<Mutex<FileData>>,
        version: u64,
        pieces: Vec<(u64, Bytes)>,
    ) -> Option<CacheOffer> {
        let writers = self.state.lock().node(ino).map_or(1, |n| n.writers);
        (writers == 0).then(|| CacheOffer {
            ino,
            pieces,
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
