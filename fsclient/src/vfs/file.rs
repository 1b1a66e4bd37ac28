//! A file's content while it is being read and written: the stored manifest
//! plus an overlay of bytes written since, turned back into chunks by
//! [`FileData::materialize`].
//!
//! Invariants (kept by every method here):
//! - `extents` never overlap, and every extent ends at or before `size`.
//!   Writes join the extents they touch; bytes a background spill hands back
//!   are kept as an extent of their own, which may touch the next one.
//! - A byte at offset `x < size` is: the extent covering `x` if there is one;
//!   else the byte of a background spill's extents covering it; else the
//!   base's byte if `x < valid`; else zero. `valid <= base_size`, and
//!   `valid < base_size` only after a truncation (bytes past it are gone) or
//!   where the base's bytes past `valid` are stored zeros.
//! - `base_size` is the size of the chunk map `map`; `manifest` names it
//!   unless a partial store ran since (then `changed` is set).
//! - While a background spill runs (or a commit's snapshot store, the same
//!   kind of job run on the committing thread), the base and `valid` do not
//!   change: every operation but write and read waits for it first.
//! - `committable`, once set, names a stored manifest of the whole file as it
//!   was when its store began, so a commit can name the file while it is
//!   being written; `changed` is clear only when it is the current content.
//! - `base_final` only while no byte at or before `base_size` was written or
//!   cut off since a partial store made the last cut.

use std::collections::BTreeMap;
use std::io::Read;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::{Condvar, Mutex};

use super::recycle::SPARES;
use crate::object::{self, Hash, Manifest};
use crate::store::{BlobStore, StoreError};
use crate::tree::{Chunking, FsResult};

/// A manifest with the offset of each chunk, for finding a byte's chunk.
#[derive(Debug, Default)]
pub struct ChunkMap {
    /// `(hash, start offset, length)` of each chunk, in order.
    pub chunks: Vec<(Hash, u64, u32)>,
}

impl ChunkMap {
    pub fn new(m: &Manifest) -> ChunkMap {
        let mut at = 0u64;
        let chunks = m
            .chunks
            .iter()
            .map(|&(h, len)| {
                let c = (h, at, len);
                at += len as u64;
                c
            })
            .collect();
        ChunkMap { chunks }
    }

    pub fn size(&self) -> u64 {
        self.chunks.last().map_or(0, |&(_, s, l)| s + l as u64)
    }

    /// Index of the chunk holding byte `offset` (`None` past the end).
    pub fn find(&self, offset: u64) -> Option<usize> {
        let i = self.chunks.partition_point(|&(_, s, _)| s <= offset);
        (i > 0 && offset < self.size()).then(|| i - 1)
    }

    fn manifest(&self) -> Manifest {
        Manifest {
            chunks: self.chunks.iter().map(|&(h, _, l)| (h, l)).collect(),
        }
    }
}

/// A chunk's data, checked against its expected length.
pub fn chunk_data(store: &BlobStore, h: &Hash, len: u32) -> FsResult<Bytes> {
    let blob = store.get(h)?;
    let data = object::decode_chunk(&blob).map_err(|error| StoreError::Malformed {
        key: store.blob_key(h),
        error,
    })?;
    if data.len() != len as usize {
        return Err(StoreError::Corrupt {
            key: store.blob_key(h),
        }
        .into());
    }
    Ok(data)
}

/// Written bytes: extents by start offset.
type Extents = BTreeMap<u64, Vec<u8>>;

pub struct FileData {
    /// The manifest the overlay is on top of.
    pub manifest: Hash,
    map: Arc<ChunkMap>,
    base_size: u64,
    valid: u64,
    pub size: u64,
    extents: Extents,
    /// Bytes held in `extents`.
    held: Held,
    /// Whether the content differs from `manifest` (writes or truncation).
    pub changed: bool,
    /// Whether the base's last cut is final: it was made by the chunker having
    /// seen a whole window past it (a partial store), and no byte at or before
    /// `base_size` has been written or cut off since. A later store then
    /// starts cutting at `base_size` instead of re-reading the last chunks.
    base_final: bool,
    /// Bytes being stored by a background spill (read beneath `extents`).
    behind: Option<Spill>,
    /// Where the last read ended: a read near it continues a sequential one.
    next_read: u64,
    /// When a read last checked the file's access time (`relatime`): reads
    /// skip the check for a while, so a stream of reads costs no lock of the
    /// mount's state each. A write clears it.
    pub atime_checked: Option<std::time::Instant>,
    /// Counts changes of the bytes (writes, truncations), so that bytes read
    /// earlier can be told apart from the current ones.
    version: u64,
    /// A stored manifest of the whole file as it was at some moment, and the
    /// size then (see [`FileData::store_snapshot`]).
    committable: Option<(Hash, u64)>,
}

/// Writes at least this large that start an extent of their own take a spare
/// buffer (sequential writers send 128 KiB to 1 MiB; a small random write
/// should not hold a large buffer).
const RECYCLE_FROM: usize = if cfg!(test) { 1 << 10 } else { 64 << 10 };

/// How far from where the last read ended a read still counts as the next
/// one of a sequential reader (the kernel sends several at once, in any order).
/// Small in unit tests, whose files are small.
const SEQUENTIAL_SLACK: u64 = if cfg!(test) { 2 << 10 } else { 4 << 20 };

/// A file's bytes held in its extents, kept equal to their sum and added to
/// a total shared by every file of the mount: what bounds the memory of many
/// small files written while the store refuses them (see `Vfs::write`).
/// Dropping a file (deleted, or forgotten after a commit) takes its bytes out.
#[derive(Default)]
struct Held {
    n: usize,
    total: Arc<AtomicUsize>,
}

impl Held {
    fn add(&mut self, k: usize) {
        self.n += k;
        self.total.fetch_add(k, Ordering::Relaxed);
    }

    fn sub(&mut self, k: usize) {
        self.n -= k;
        self.total.fetch_sub(k, Ordering::Relaxed);
    }

    fn clear(&mut self) {
        self.sub(self.n);
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.total.fetch_sub(self.n, Ordering::Relaxed);
    }
}

/// A background spill: the extents it took over (which reads still see) and
/// its outcome once it has one.
struct Spill {
    frozen: Arc<Extents>,
    job: Arc<SpillJob>,
}

#[derive(Default)]
struct SpillJob {
    done: Mutex<JobState>,
    cv: Condvar,
}

#[derive(Default)]
struct JobState {
    finished: bool,
    /// The chunks stored (the base up to a final cut, or the whole file for
    /// a snapshot) or the error, until the file takes it in.
    outcome: Option<FsResult<Cut>>,
}

impl SpillJob {
    fn finish(&self, outcome: FsResult<Cut>) {
        *self.done.lock() = JobState {
            finished: true,
            outcome: Some(outcome),
        };
        self.cv.notify_all();
    }

    fn finished(&self) -> bool {
        self.done.lock().finished
    }

    /// Waits until the job has finished (its outcome may be taken in by then).
    fn wait(&self) {
        let mut done = self.done.lock();
        while !done.finished {
            self.cv.wait(&mut done);
        }
    }
}

/// What a job cuts from, taken by [`FileData::freeze`].
struct Frozen {
    map: Arc<ChunkMap>,
    valid: u64,
    extents: Arc<Extents>,
    job: Arc<SpillJob>,
}

impl Frozen {
    fn source(&self) -> Source<'_> {
        Source {
            map: &self.map,
            valid: self.valid,
            extents: &self.extents,
        }
    }

    /// Tells the file the outcome. The bytes are let go of first: the file
    /// takes them back, and would have to copy them while shared.
    fn finish(self, outcome: FsResult<Cut>) {
        drop(self.extents);
        self.job.finish(outcome);
    }
}

/// What a store decided before it cuts, under the file's lock.
struct Plan {
    /// Chunks of the old base kept as they are.
    from_chunk: usize,
    /// Where cutting starts (the start of chunk `from_chunk`).
    from: u64,
    /// Where the bytes to cut end.
    limit: u64,
    /// End of the last written extent.
    last_change: u64,
    /// Whether old boundaries may be re-joined (old bytes all still there).
    may_rejoin: bool,
    partial: bool,
}

/// The bytes a store cuts: a base manifest (`valid` bytes of it), zeros up
/// to `size`, and extents over both.
struct Source<'a> {
    map: &'a ChunkMap,
    valid: u64,
    extents: &'a Extents,
}

/// A finished cut: the chunks, and whether it ended by re-joining old
/// boundaries (so its end is the old base's end, not a cut of its own).
struct Cut {
    map: ChunkMap,
    rejoined: bool,
    /// For a cut of the whole file (a snapshot), its stored manifest.
    manifest: Option<Hash>,
}

/// What a read needs, taken under the file's lock and used after it is let go,
/// so a slow fetch from the store does not block writers of the file.
pub struct ReadView {
    map: Arc<ChunkMap>,
    valid: u64,
    /// The requested range clamped to the file size.
    start: u64,
    end: u64,
    /// Overlay pieces inside the range: (offset, bytes), later ones over
    /// earlier ones.
    overlay: Vec<(u64, Vec<u8>)>,
    /// Whether no written byte lies over the base anywhere in the file (so a
    /// whole stored chunk is the file's content for its range).
    only_base: bool,
    /// The file's [`FileData::version`] when the view was taken.
    pub version: u64,
}

/// What [`ReadView::read`] found.
pub struct ReadOut {
    /// The bytes of the range.
    pub bytes: Bytes,
    /// The index of the last chunk read (for read-ahead).
    pub last_chunk: Option<usize>,
    /// When the range lies in one stored chunk with nothing written over it:
    /// that whole chunk and its offset (the rest of it is the file's content
    /// too, already fetched and checked).
    pub whole_chunk: Option<(u64, Bytes)>,
}

impl FileData {
    /// A file with the given stored manifest (decoded by the caller).
    pub fn new(manifest: Hash, m: &Manifest) -> FileData {
        let map = Arc::new(ChunkMap::new(m));
        let size = map.size();
        FileData {
            manifest,
            map,
            base_size: size,
            valid: size,
            size,
            extents: BTreeMap::new(),
            held: Held::default(),
            changed: false,
            base_final: false,
            behind: None,
            next_read: 0,
            atime_checked: None,
            version: 0,
            committable: Some((manifest, size)),
        }
    }

    /// Bytes held in memory for writes not yet stored (the extents).
    pub fn dirty_bytes(&self) -> usize {
        self.held.n
    }

    /// Counts this file's held bytes in `total` (the mount's, shared by all
    /// its files) from now on.
    pub fn count_in(&mut self, total: &Arc<AtomicUsize>) {
        total.fetch_add(self.held.n, Ordering::Relaxed);
        let old = std::mem::replace(&mut self.held.total, total.clone());
        old.fetch_sub(self.held.n, Ordering::Relaxed);
    }

    /// A new empty file, not stored yet (its empty manifest, named `name` in
    /// its store, is stored by [`FileData::materialize`]).
    pub fn empty(name: Hash) -> FileData {
        let m = Manifest::default();
        let mut f = FileData::new(name, &m);
        f.changed = true;
        f.committable = None;
        f
    }

    /// Counts changes of the bytes: differs from an earlier value once a
    /// write or truncation ran since.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// How many bytes from the start are stored as chunks of the base.
    pub fn stored_len(&self) -> u64 {
        self.base_size
    }

    /// Notes a read of `len` bytes at `offset`; whether it continues a
    /// sequential reader (and so earns read-ahead: for a random reader, the
    /// chunks after the one it read are only work and memory wasted).
    pub fn note_read(&mut self, offset: u64, len: u64) -> bool {
        let sequential = offset.abs_diff(self.next_read) <= SEQUENTIAL_SLACK;
        self.next_read = offset + len;
        sequential
    }

    /// Takes what is needed to read `len` bytes at `offset`.
    pub fn view(&self, offset: u64, len: u64) -> ReadView {
        let start = offset.min(self.size);
        let end = offset.saturating_add(len).min(self.size);
        let mut overlay = Vec::new();
        if let Some(spill) = &self.behind {
            overlay_pieces(&spill.frozen, start, end, &mut overlay);
        }
        overlay_pieces(&self.extents, start, end, &mut overlay);
        ReadView {
            map: self.map.clone(),
            valid: self.valid,
            start,
            end,
            overlay,
            only_base: self.extents.is_empty() && self.behind.is_none(),
            version: self.version,
        }
    }

    /// Writes `data` at `offset`, growing the file if it ends past the end.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        self.atime_checked = None;
        if data.is_empty() {
            return;
        }
        self.version += 1;
        self.adopt_finished_spill();
        if offset <= self.base_size {
            self.base_final = false;
        }
        let end = offset + data.len() as u64;
        // Appending to the extent that ends exactly here (sequential writes).
        let nothing_after = self.extents.range(offset..=end).next().is_none();
        if let Some((&s, ext)) = self.extents.range_mut(..offset).next_back() {
            if s + ext.len() as u64 == offset && nothing_after {
                ext.extend_from_slice(data);
                self.held.add(data.len());
                self.grow(end);
                return;
            }
        }
        // Otherwise join every extent that overlaps or touches [offset, end].
        let touching: Vec<u64> = self
            .extents
            .range(..=end)
            .rev()
            .take_while(|(&s, e)| s + e.len() as u64 >= offset)
            .map(|(&s, _)| s)
            .collect();
        if touching.is_empty() && data.len() >= RECYCLE_FROM {
            // A new extent, likely the start of a sequential run (the first
            // write, or the first after a spill took the last extent): in a
            // spare buffer, whose pages are already mapped (see `recycle`).
            let mut fresh = SPARES.take();
            fresh.extend_from_slice(data);
            self.held.add(data.len());
            self.extents.insert(offset, fresh);
            self.grow(end);
            return;
        }
        let lo = touching.iter().copied().min().unwrap_or(offset).min(offset);
        let hi = touching
            .iter()
            .map(|s| s + self.extents[s].len() as u64)
            .max()
            .unwrap_or(end)
            .max(end);
        let mut joined = vec![0u8; (hi - lo) as usize];
        for s in touching {
            let old = self.extents.remove(&s).expect("listed above");
            self.held.sub(old.len());
            joined[(s - lo) as usize..(s - lo) as usize + old.len()].copy_from_slice(&old);
        }
        joined[(offset - lo) as usize..(end - lo) as usize].copy_from_slice(data);
        self.held.add(joined.len());
        self.extents.insert(lo, joined);
        self.grow(end);
    }

    /// Puts `data` at `offset` beneath the extents: only where no extent
    /// covers a byte does it show. Used to hand back bytes a background spill
    /// held, after writes landed over them.
    fn write_under(&mut self, offset: u64, data: Vec<u8>) {
        let end = offset + data.len() as u64;
        let mut over = Vec::new();
        overlay_pieces(&self.extents, offset, end, &mut over);
        if over.is_empty() {
            // The common case (the rest of a sequential write): kept as its
            // own extent, touching the next one, rather than copying that
            // one (it may be large) to join them.
            self.held.add(data.len());
            self.extents.insert(offset, data);
            return;
        }
        self.write(offset, &data);
        for (s, d) in over {
            self.write(s, &d);
        }
    }

    fn grow(&mut self, end: u64) {
        self.size = self.size.max(end);
        self.changed = true;
    }

    /// Sets the size: cuts what is past it, or extends with zeros.
    pub fn truncate(&mut self, size: u64) {
        self.settle();
        self.version += 1;
        self.base_final = false;
        if size < self.size {
            let cut: Vec<u64> = self.extents.range(..).map(|(&s, _)| s).collect();
            for s in cut {
                let len = self.extents[&s].len() as u64;
                if s >= size {
                    self.held.sub(len as usize);
                    self.extents.remove(&s);
                } else if s + len > size {
                    let e = self.extents.get_mut(&s).expect("listed above");
                    self.held.sub((s + len - size) as usize);
                    e.truncate((size - s) as usize);
                }
            }
            self.valid = self.valid.min(size);
        }
        if size != self.size {
            self.size = size;
            self.changed = true;
        }
    }

    /// Stores the content as chunks and a manifest, and makes that the new base
    /// (the overlay is emptied). Only the chunks around changed bytes are
    /// re-cut: chunks ending before the first change are kept, and after the last
    /// change the chunker re-joins the old boundaries (content-defined cuts
    /// depend only on the bytes since the previous cut), keeping the rest.
    pub fn materialize(&mut self, store: &BlobStore, chunking: Chunking) -> FsResult<()> {
        self.settle();
        if self.changed {
            self.store_content(store, chunking, false)?;
        }
        Ok(())
    }

    /// Stores the written bytes up to a cut point some way before the end of
    /// the last written extent, and keeps the rest in the overlay: what a
    /// large sequential write needs to keep memory bounded without re-reading
    /// and re-hashing everything after it (a file extended by fallocate or
    /// truncate would otherwise be chunked to its end at every spill).
    pub fn spill(&mut self, store: &BlobStore, chunking: Chunking) -> FsResult<()> {
        self.settle();
        self.forget_zero_tail(store, chunking);
        if self.changed && !self.store_content(store, chunking, true)? {
            self.store_content(store, chunking, false)?;
        }
        Ok(())
    }

    /// [`FileData::spill`] on another thread: the extents are handed to a
    /// background job (reads still see them), and writes go on into new
    /// ones meanwhile, so cutting and hashing overlap with receiving the
    /// next bytes. One job at a time: a second call waits for the first.
    /// Where only a whole store would do, it is done here and now.
    pub fn spill_behind(&mut self, store: &BlobStore, chunking: Chunking) -> FsResult<()> {
        self.settle();
        if !self.changed {
            return Ok(());
        }
        self.forget_zero_tail(store, chunking);
        let Some(plan) = self.plan(chunking, true) else {
            return self.store_content(store, chunking, false).map(|_| ());
        };
        let frozen = self.freeze();
        let job_store = store.clone();
        let run = move || {
            let result = cut(&job_store, chunking, &frozen.source(), &plan);
            frozen.finish(result);
        };
        if let Err(e) = std::thread::Builder::new().name("spill".into()).spawn(run) {
            // No thread to be had: the job's extents go back, and the bytes
            // are stored here instead.
            tracing::warn!("no spill thread ({e}); storing in the writer's thread");
            self.unfreeze();
            return self.spill(store, chunking);
        }
        Ok(())
    }

    /// The stored manifest and size of the whole file at some moment: after
    /// [`FileData::store_snapshot`] (or a full store), holding every byte
    /// written before it. `None` for a new file never stored.
    pub fn committable(&self) -> Option<(Hash, u64)> {
        self.committable
    }

    /// Stores the whole file as it is now, like [`FileData::materialize`],
    /// but holds its lock only to take the written bytes and to take the
    /// result in: writes and reads go on (into and over a new overlay) while
    /// the bytes are cut, hashed and stored, as in a background spill. What
    /// is stored is [`FileData::committable`] afterwards; bytes written
    /// meanwhile leave the file `changed`.
    pub fn store_snapshot(file: &Mutex<FileData>, store: &BlobStore, chunking: Chunking) -> FsResult<()> {
        // One job at a time: a background spill is waited for unlocked.
        let mut f = loop {
            let f = file.lock();
            match f.behind.as_ref().map(|s| s.job.clone()) {
                Some(job) if !job.finished() => {
                    drop(f);
                    job.wait();
                }
                _ => break f,
            }
        };
        f.adopt_finished_spill();
        if !f.changed {
            return Ok(());
        }
        let Some(plan) = f.plan(chunking, false) else {
            return f.materialize(store, chunking);
        };
        let frozen = f.freeze();
        drop(f);
        let result = cut(store, chunking, &frozen.source(), &plan).and_then(|mut c| {
            let encoded = object::encode_manifest(&c.map.manifest());
            c.manifest = Some(store.put_many_behind(vec![encoded])?[0]);
            Ok(c)
        });
        let (told, outcome) = match result {
            Ok(c) => (Ok(c), Ok(())),
            // The file hands the bytes back and logs this copy; the caller
            // gets the error itself.
            Err(e) => (Err(std::io::Error::other(e.to_string()).into()), Err(e)),
        };
        frozen.finish(told);
        file.lock().adopt_finished_spill();
        outcome
    }

    /// Hands the written extents to a job (a background spill or a snapshot
    /// store): reads see them beneath newer writes until the outcome is taken
    /// in (see [`FileData::adopt_finished_spill`]).
    fn freeze(&mut self) -> Frozen {
        let extents = Arc::new(std::mem::take(&mut self.extents));
        self.held.clear();
        let job = Arc::new(SpillJob::default());
        self.behind = Some(Spill {
            frozen: extents.clone(),
            job: job.clone(),
        });
        Frozen {
            map: self.map.clone(),
            valid: self.valid,
            extents,
            job,
        }
    }

    /// Waits for a background spill and takes in its outcome.
    pub fn settle(&mut self) {
        if let Some(spill) = &self.behind {
            spill.job.wait();
        }
        self.adopt_finished_spill();
    }

    /// Takes in a finished background spill: its chunks become the base, and
    /// what it held past its last cut goes back beneath the extents. A failed
    /// one hands all its bytes back (nothing is lost; the next store tries
    /// again and reports the error).
    fn adopt_finished_spill(&mut self) {
        let Some(spill) = &self.behind else { return };
        let Some(result) = spill.job.done.lock().outcome.take() else {
            return;
        };
        match result {
            Ok(cut) if cut.map.size() >= self.valid => {
                let spill = self.behind.take().expect("checked above");
                let end = cut.map.size();
                let snapshot = cut.manifest;
                // Base bytes at or before the cut are final only if no write
                // since the freeze reached them (and a snapshot's last cut is
                // the end of the bytes, not a cut of the content).
                let untouched = self.extents.range(..=end).next().is_none();
                self.set_partial_base(cut, untouched && snapshot.is_none());
                if let Some(m) = snapshot {
                    self.manifest = m;
                    self.committable = Some((m, end));
                    // Nothing written since: the base is the file again.
                    if self.extents.is_empty() && self.size == end {
                        self.changed = false;
                    }
                }
                let frozen = Arc::try_unwrap(spill.frozen).unwrap_or_else(|shared| (*shared).clone());
                for (s, mut e) in frozen {
                    let e_end = s + e.len() as u64;
                    if e_end <= end {
                        // Stored: the buffer can hold the next extent.
                        SPARES.give(e);
                        continue;
                    }
                    if s < end {
                        e.drain(..(end - s) as usize);
                    }
                    self.write_under(s.max(end), e);
                }
            }
            Ok(_) => self.unfreeze(),
            Err(e) => {
                tracing::warn!("background store of written bytes failed (kept in memory): {e}");
                self.unfreeze();
            }
        }
    }

    /// Hands a background spill's bytes back to the extents, beneath them.
    fn unfreeze(&mut self) {
        let Some(spill) = self.behind.take() else { return };
        self.base_final = false;
        let frozen = Arc::try_unwrap(spill.frozen).unwrap_or_else(|shared| (*shared).clone());
        for (s, e) in frozen {
            self.write_under(s, e);
        }
    }

    /// Lowers `valid` to where the base's trailing run of zero chunks starts:
    /// those bytes read as zeros either way, and a partial store, which can
    /// keep no old byte past its cut, is then possible. This is the pre-sized
    /// file (fio, databases, downloaders set the size first): once committed,
    /// its unwritten part is stored zeros, and without this every later spill
    /// would have to store the whole file.
    fn forget_zero_tail(&mut self, store: &BlobStore, chunking: Chunking) {
        // Only where old bytes stand in a partial store's way (this hashes
        // a short last chunk's worth of zeros to recognise it).
        if self.valid + (chunking.max as u64) < self.written_end().min(self.size) {
            return;
        }
        let zero = zero_chunk(store, chunking);
        let chunks = &self.map.chunks;
        let mut start = self.base_size;
        for (i, &(h, s, len)) in chunks.iter().enumerate().rev() {
            let zeros =
                h == zero.hash || (i + 1 == chunks.len() && len < zero.len && h == zeros_hash(store, len));
            if !zeros {
                break;
            }
            start = s;
        }
        if start < self.valid {
            self.valid = start;
            self.base_final = false;
        }
    }

    /// Makes a partial cut the base (the extents past it stay).
    fn set_partial_base(&mut self, cut: Cut, untouched: bool) {
        let end = cut.map.size();
        self.base_final = if cut.rejoined { self.base_final } else { untouched };
        // `manifest` is stale until the next full store (`changed` stays).
        self.base_size = end;
        self.valid = end;
        self.map = Arc::new(cut.map);
    }

    /// The end of the last written extent (0 if none).
    fn written_end(&self) -> u64 {
        self.extents
            .iter()
            .next_back()
            .map_or(0, |(&s, e)| s + e.len() as u64)
    }

    fn source(&self) -> Source<'_> {
        Source {
            map: &self.map,
            valid: self.valid,
            extents: &self.extents,
        }
    }

    /// Decides what a store re-cuts; `None` if a partial store cannot keep
    /// anything (too little written past the start of the re-cut).
    fn plan(&self, chunking: Chunking, partial: bool) -> Option<Plan> {
        let old = &self.map;
        let max = chunking.max as u64;
        let last_change = self.written_end();
        let (from_chunk, from) = if self.base_final {
            // Nothing at or before the base's end changed, and its last cut
            // is final: the cut goes on from there.
            (old.chunks.len(), self.base_size)
        } else {
            let first_change = self
                .extents
                .keys()
                .next()
                .copied()
                .unwrap_or(u64::MAX)
                .min(self.valid);
            let first_change = if self.size != self.base_size {
                first_change.min(self.base_size.min(self.size))
            } else {
                first_change
            };
            // Re-cut from the start of the chunk holding the byte *before* the
            // first change: FastCDC decides a cut after looking at the byte at the
            // cut, so a chunk's end depends on the first byte of the next one.
            // Past the old end, that is the old last chunk (which the end of the
            // file cut, not its content).
            let by_change = old
                .find(first_change.saturating_sub(1).min(old.size().saturating_sub(1)))
                .unwrap_or(0);
            // And a cut also depends on how many bytes follow the chunk's start
            // when that is less than `max` (the chunker's window is shortened near
            // the end): chunks that close to the old or new end are re-cut too.
            let window_end = self.base_size.min(self.size);
            let by_end = old.chunks.partition_point(|&(_, s, _)| s + max <= window_end);
            let from_chunk = by_change.min(by_end);
            let from = old.chunks.get(from_chunk).map_or(0, |c| c.1).min(self.size);
            (from_chunk, from)
        };
        tracing::debug!(
            from,
            from_chunk,
            base = self.base_size,
            valid = self.valid,
            size = self.size,
            "re-cutting"
        );
        // A partial store reads up to the end of the written bytes and keeps
        // only chunks the chunker saw a whole window (max size) past the start
        // of: FastCDC's cut depends on up to `max` bytes and one more. It must
        // also end past every old byte it cannot keep (`valid`).
        let limit = if partial {
            last_change.min(self.size)
        } else {
            self.size
        };
        if partial && (limit < from + max + 1 || limit < self.valid + max + 1) {
            return None;
        }
        Some(Plan {
            from_chunk,
            from,
            limit,
            last_change,
            // Old boundaries are reusable only where old bytes are still there.
            may_rejoin: self.valid == self.base_size && self.size == self.base_size,
            partial,
        })
    }

    /// Re-cuts and stores; with `partial`, only up to a cut that the bytes
    /// after it cannot move (and returns false, changing nothing, if that
    /// would drop old bytes the overlay does not hold).
    fn store_content(&mut self, store: &BlobStore, chunking: Chunking, partial: bool) -> FsResult<bool> {
        debug_assert!(self.behind.is_none(), "settled first");
        let Some(plan) = self.plan(chunking, partial) else {
            return Ok(false);
        };
        let cut = cut(store, chunking, &self.source(), &plan)?;
        if partial {
            let end = cut.map.size();
            if end < self.valid {
                return Ok(false);
            }
            // The base now ends at `end`; what is written past it stays.
            let keys: Vec<u64> = self.extents.range(..end).map(|(&k, _)| k).collect();
            for k in keys {
                let mut e = self.extents.remove(&k).expect("listed above");
                self.held.sub(e.len());
                let e_end = k + e.len() as u64;
                if e_end > end {
                    // The rest moves to the front of the same buffer: a
                    // sequential writer keeps appending to memory already
                    // allocated and touched, instead of a fresh one per spill.
                    e.drain(..(end - k) as usize);
                    self.held.add(e.len());
                    self.extents.insert(end, e);
                }
            }
            // What is left starts at or after the cut and holds the bytes the
            // chunker saw: the cut is final.
            self.set_partial_base(cut, true);
            return Ok(true);
        }
        let map = cut.map;
        debug_assert_eq!(map.size(), self.size);
        let manifest = store.put_many_behind(vec![object::encode_manifest(&map.manifest())])?[0];
        self.manifest = manifest;
        self.base_size = map.size();
        self.valid = self.base_size;
        self.size = self.base_size;
        self.map = Arc::new(map);
        self.extents.clear();
        self.held.clear();
        self.changed = false;
        self.base_final = false;
        self.committable = Some((manifest, self.size));
        Ok(true)
    }
}

/// The pieces of `extents` inside `[start, end)`, appended to `out`.
fn overlay_pieces(extents: &Extents, start: u64, end: u64, out: &mut Vec<(u64, Vec<u8>)>) {
    // The extent starting before `start` may reach into the range.
    let first = extents
        .range(..=start)
        .next_back()
        .map(|(&s, _)| s)
        .unwrap_or(start);
    for (&s, data) in extents.range(first..end) {
        let e = s + data.len() as u64;
        if e <= start {
            continue;
        }
        let (a, b) = (s.max(start), e.min(end));
        out.push((a, data[(a - s) as usize..(b - s) as usize].to_vec()));
    }
}

/// Cuts the source's bytes from `plan.from` to `plan.limit` into chunks and
/// stores the new ones; the chunks before `plan.from_chunk` are kept.
fn cut(store: &BlobStore, chunking: Chunking, src: &Source, plan: &Plan) -> FsResult<Cut> {
    let old = src.map;
    let (from, limit, partial) = (plan.from, plan.limit, plan.partial);
    let mut chunks: Vec<(Hash, u64, u32)> = old.chunks[..plan.from_chunk.min(old.chunks.len())].to_vec();
    let mut batch: Vec<(usize, bytes::Bytes)> = Vec::new();
    let mut batch_bytes = 0usize;
    let mut reader = ContentReader {
        store,
        src,
        at: from,
        end: limit,
    };
    let max = chunking.max as usize;
    // The stream is cut with a window of `max` bytes (or what is left), as
    // FastCDC's streaming chunker does, from a buffer reused across calls.
    let mut buf = STREAM_BUFFER.with(|b| std::mem::take(&mut *b.borrow_mut()));
    buf.resize(2 * max, 0);
    let (mut lo, mut hi) = (0usize, 0usize);
    let mut pos = from;
    let mut zero_stored = false;
    let mut rejoined = false;
    let zero = zero_chunk(store, chunking);
    while pos < limit {
        if partial && pos + max as u64 + 1 > limit {
            break;
        }
        let want = (limit - pos).min(max as u64);
        let (hash, len) = if want == max as u64 && src.is_zeros(pos, want, &zero.hash) {
            // A window of nothing but zeros (a hole, or a file extended by
            // truncate/fallocate) cuts and hashes the same everywhere.
            if !zero_stored {
                store.put(zero.blob.clone())?;
                zero_stored = true;
            }
            (lo, hi) = (0, 0);
            reader.at = pos + zero.len as u64;
            (zero.hash, zero.len)
        } else {
            // The window straight from a written extent where one holds all
            // of it (a sequential write): no copy into the stream buffer
            // (what the buffer holds is the same bytes; it is dropped).
            let in_extent = src.extent_slice(pos, want);
            let window = match in_extent {
                Some(w) => w,
                None => {
                    while hi - lo < max && reader.at < limit {
                        if hi == buf.len() {
                            buf.copy_within(lo..hi, 0);
                            (lo, hi) = (0, hi - lo);
                        }
                        hi += reader.read(&mut buf[hi..])?;
                    }
                    &buf[lo..hi.min(lo + max)]
                }
            };
            let cdc = fastcdc::v2020::FastCDC::new(window, chunking.min, chunking.avg, chunking.max);
            let len = cdc.cut(0, window.len()).1;
            let blob = object::encode_chunk(&window[..len]);
            if in_extent.is_some() {
                (lo, hi) = (0, 0);
                reader.at = pos + len as u64;
            } else {
                lo += len;
            }
            batch_bytes += blob.len();
            // Hashed with the rest of its batch, once it is in `chunks` (below).
            batch.push((chunks.len(), blob));
            (Hash([0; 32]), len as u32)
        };
        chunks.push((hash, pos, len));
        pos += len as u64;
        if batch_bytes >= BATCH_BYTES {
            hash_and_store(store, &mut chunks, std::mem::take(&mut batch))?;
            batch_bytes = 0;
        }
        if plan.may_rejoin && pos >= plan.last_change && pos < old.size() {
            // A cut on an old boundary (not the old last one, which the end
            // of the file made): the rest is unchanged.
            if let Some(j) = old.find(pos) {
                if old.chunks[j].1 == pos {
                    chunks.extend_from_slice(&old.chunks[j..]);
                    rejoined = true;
                    break;
                }
            }
        }
    }
    STREAM_BUFFER.with(|b| *b.borrow_mut() = buf);
    hash_and_store(store, &mut chunks, batch)?;
    Ok(Cut {
        map: ChunkMap { chunks },
        rejoined,
        manifest: None,
    })
}

impl ReadView {
    /// The bytes of the range, fetching chunks from the store as needed.
    pub fn read(&self, store: &BlobStore) -> FsResult<ReadOut> {
        // The common case, a read inside one stored chunk with nothing written
        // over it: the chunk's own bytes, not copied.
        if self.overlay.is_empty() && self.end <= self.valid && self.start < self.end {
            if let Some(i) = self.map.find(self.start) {
                let (h, cs, cl) = self.map.chunks[i];
                if self.end <= cs + cl as u64 {
                    let data = chunk_data(store, &h, cl)?;
                    let bytes = data.slice((self.start - cs) as usize..(self.end - cs) as usize);
                    let whole = self.only_base && cs + cl as u64 <= self.valid;
                    return Ok(ReadOut {
                        bytes,
                        last_chunk: Some(i),
                        whole_chunk: whole.then_some((cs, data)),
                    });
                }
            }
        }
        let mut out = vec![0u8; (self.end - self.start) as usize];
        let base_end = self.end.min(self.valid);
        let mut at = self.start;
        let mut last = None;
        while at < base_end {
            // Skip the base where the overlay covers it anyway.
            if let Some((s, d)) = self
                .overlay
                .iter()
                .find(|(s, d)| *s <= at && at < s + d.len() as u64)
            {
                at = s + d.len() as u64;
                continue;
            }
            let Some(i) = self.map.find(at) else { break };
            let (h, cs, cl) = self.map.chunks[i];
            let data = chunk_data(store, &h, cl)?;
            let to = (cs + cl as u64).min(base_end);
            out[(at - self.start) as usize..(to - self.start) as usize]
                .copy_from_slice(&data[(at - cs) as usize..(to - cs) as usize]);
            last = Some(i);
            at = to;
        }
        for (s, d) in &self.overlay {
            let o = (s - self.start) as usize;
            out[o..o + d.len()].copy_from_slice(d);
        }
        Ok(ReadOut {
            bytes: out.into(),
            last_chunk: last,
            whole_chunk: None,
        })
    }

    /// Stored chunk `i` of the view's base: `(hash, start, length)`.
    pub fn chunk(&self, i: usize) -> Option<(Hash, u64, u32)> {
        self.map.chunks.get(i).copied()
    }

    /// Where the stored base's bytes end (a truncation may have cut them).
    pub fn base_end(&self) -> u64 {
        self.valid
    }

    /// Hashes of the `n` chunks after chunk `i`, for read-ahead.
    pub fn following(&self, i: usize, n: usize) -> Vec<(Hash, u32)> {
        self.map
            .chunks
            .iter()
            .skip(i + 1)
            .take(n)
            .map(|&(h, _, l)| (h, l))
            .collect()
    }
}

/// New chunk bytes hashed and handed to the uploads at a time (small in unit
/// tests, so that they cross batch boundaries).
const BATCH_BYTES: usize = if cfg!(test) { 4 << 10 } else { 16 << 20 };

/// Hashes new chunk blobs and hands them to the background uploads (which
/// overlap with cutting the next ones); fills in their hashes at their places
/// in `chunks`. (Hashing on two threads was measured: no faster here, where
/// the store's own work takes the other core.)
fn hash_and_store(
    store: &BlobStore,
    chunks: &mut [(Hash, u64, u32)],
    batch: Vec<(usize, bytes::Bytes)>,
) -> FsResult<()> {
    let (places, blobs): (Vec<usize>, Vec<bytes::Bytes>) = batch.into_iter().unzip();
    let sealed = store.seal_many(blobs);
    for (i, blob) in places.into_iter().zip(&sealed) {
        chunks[i].0 = blob.hash;
    }
    store.put_sealed_behind(sealed)?;
    Ok(())
}

thread_local! {
    /// The chunker's window buffer, kept per thread: fresh memory is slow to
    /// touch on some machines, and a file is re-cut at every commit.
    static STREAM_BUFFER: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The chunk FastCDC cuts from a window of zeros, for a chunking.
#[derive(Clone)]
struct ZeroChunk {
    len: u32,
    hash: Hash,
    blob: bytes::Bytes,
}

fn zero_chunk(store: &BlobStore, c: Chunking) -> ZeroChunk {
    type Known = Vec<((u32, u32, u32, u64), ZeroChunk)>;
    static CACHE: std::sync::OnceLock<parking_lot::Mutex<Known>> = std::sync::OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let key = (c.min, c.avg, c.max, store.codec().id());
    if let Some((_, z)) = cache.lock().iter().find(|(k, _)| *k == key) {
        return z.clone();
    }
    let zeros = vec![0u8; c.max as usize];
    let len = fastcdc::v2020::FastCDC::new(&zeros, c.min, c.avg, c.max)
        .cut(0, zeros.len())
        .1;
    let blob = object::encode_chunk(&zeros[..len]);
    let z = ZeroChunk {
        len: len as u32,
        hash: store.name_of(&blob),
        blob,
    };
    cache.lock().push((key, z.clone()));
    z
}

/// The hash of the chunk of `len` zero bytes (a file's last chunk, cut by its
/// end rather than by its content).
fn zeros_hash(store: &BlobStore, len: u32) -> Hash {
    store.name_of(&object::encode_chunk(&vec![0u8; len as usize]))
}

impl Source<'_> {
    /// The bytes `[at, at + len)` if one extent holds them all.
    fn extent_slice(&self, at: u64, len: u64) -> Option<&[u8]> {
        let (&s, e) = self.extents.range(..=at).next_back()?;
        let o = (at - s) as usize;
        (at + len <= s + e.len() as u64).then(|| &e[o..o + len as usize])
    }

    /// Whether `[at, at + len)` is known to read as zeros without looking:
    /// no extent overlaps it, and below `valid` it lies in stored chunks of
    /// zeros (`zero`), as a pre-sized file's unwritten part does once stored.
    fn is_zeros(&self, at: u64, len: u64, zero: &Hash) -> bool {
        let end = at + len;
        let no_extent = self
            .extents
            .range(..end)
            .next_back()
            .is_none_or(|(&s, e)| s + e.len() as u64 <= at);
        if !no_extent {
            return false;
        }
        if at >= self.valid {
            return true;
        }
        let Some(first) = self.map.find(at) else {
            return false;
        };
        self.map.chunks[first..]
            .iter()
            .take_while(|&&(_, s, _)| s < end.min(self.valid))
            .all(|(h, _, _)| h == zero)
    }
}

/// The file's bytes from `at` to `end`, as a `Read` for the chunker.
struct ContentReader<'a> {
    store: &'a BlobStore,
    src: &'a Source<'a>,
    at: u64,
    end: u64,
}

impl Read for ContentReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let f = self.src;
        if self.at >= self.end {
            return Ok(0);
        }
        // Read up to the next place the source changes (extent, chunk, valid).
        let mut end = (self.at + buf.len() as u64).min(self.end);
        if let Some((&s, e)) = f.extents.range(..=self.at).next_back() {
            let e_end = s + e.len() as u64;
            if self.at < e_end {
                let n = (end.min(e_end) - self.at) as usize;
                let o = (self.at - s) as usize;
                buf[..n].copy_from_slice(&e[o..o + n]);
                self.at += n as u64;
                return Ok(n);
            }
        }
        if let Some((&s, _)) = f.extents.range(self.at..).next() {
            end = end.min(s);
        }
        let n;
        if self.at < f.valid {
            let i = f.map.find(self.at).expect("valid bytes are in the manifest");
            let (h, cs, cl) = f.map.chunks[i];
            end = end.min(cs + cl as u64).min(f.valid);
            let data = chunk_data(self.store, &h, cl).map_err(std::io::Error::other)?;
            n = (end - self.at) as usize;
            let o = (self.at - cs) as usize;
            buf[..n].copy_from_slice(&data[o..o + n]);
        } else {
            n = (end - self.at) as usize;
            buf[..n].fill(0);
        }
        self.at += n as u64;
        Ok(n)
    }
}
