//! A file's content while it is being read and written: the stored manifest
//! plus an overlay of bytes written since, turned back into chunks by
//! [`FileData::materialize`].
//!
//! Invariants (kept by every method here):
//! - `extents` never overlap and never touch (adjacent writes are joined), and
//!   every extent ends at or before `size`.
//! - A byte at offset `x < size` is: the extent covering `x` if there is one;
//!   else the manifest's byte if `x < valid`; else zero. `valid <= base_size`,
//!   and `valid < base_size` only after a truncation (bytes past it are gone).
//! - `base_size` is the size of the manifest `manifest`.

use std::collections::BTreeMap;
use std::io::Read;
use std::sync::Arc;

use bytes::Bytes;

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

pub struct FileData {
    /// The manifest the overlay is on top of.
    pub manifest: Hash,
    map: Arc<ChunkMap>,
    base_size: u64,
    valid: u64,
    pub size: u64,
    extents: BTreeMap<u64, Vec<u8>>,
    /// Bytes held in `extents`.
    pub dirty_bytes: usize,
    /// Whether the content differs from `manifest` (writes or truncation).
    pub changed: bool,
}

/// What a read needs, taken under the file's lock and used after it is let go,
/// so a slow fetch from the store does not block writers of the file.
pub struct ReadView {
    map: Arc<ChunkMap>,
    valid: u64,
    /// The requested range clamped to the file size.
    start: u64,
    end: u64,
    /// Overlay pieces inside the range: (offset, bytes).
    overlay: Vec<(u64, Vec<u8>)>,
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
            dirty_bytes: 0,
            changed: false,
        }
    }

    /// A new empty file, not stored yet (its empty manifest is stored by
    /// [`FileData::materialize`]).
    pub fn empty() -> FileData {
        let m = Manifest::default();
        let mut f = FileData::new(Hash::of(&object::encode_manifest(&m)), &m);
        f.changed = true;
        f
    }

    pub fn debug_base(&self) -> (u64, u64, u64, usize) {
        (self.base_size, self.valid, self.size, self.map.chunks.len())
    }
    pub fn debug_ext(&self) -> Vec<(u64, usize)> {
        self.extents.iter().map(|(k, v)| (*k, v.len())).collect()
    }
    /// Takes what is needed to read `len` bytes at `offset`.
    pub fn view(&self, offset: u64, len: u64) -> ReadView {
        let start = offset.min(self.size);
        let end = offset.saturating_add(len).min(self.size);
        let mut overlay = Vec::new();
        // The extent starting before `start` may reach into the range.
        let first = self
            .extents
            .range(..=start)
            .next_back()
            .map(|(&s, _)| s)
            .unwrap_or(start);
        for (&s, data) in self.extents.range(first..end) {
            let e = s + data.len() as u64;
            if e <= start {
                continue;
            }
            let (a, b) = (s.max(start), e.min(end));
            overlay.push((a, data[(a - s) as usize..(b - s) as usize].to_vec()));
        }
        ReadView {
            map: self.map.clone(),
            valid: self.valid,
            start,
            end,
            overlay,
        }
    }

    /// Writes `data` at `offset`, growing the file if it ends past the end.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        let end = offset + data.len() as u64;
        // Appending to the extent that ends exactly here (sequential writes).
        let nothing_after = self.extents.range(offset..=end).next().is_none();
        if let Some((&s, ext)) = self.extents.range_mut(..offset).next_back() {
            if s + ext.len() as u64 == offset && nothing_after {
                ext.extend_from_slice(data);
                self.dirty_bytes += data.len();
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
            self.dirty_bytes -= old.len();
            joined[(s - lo) as usize..(s - lo) as usize + old.len()].copy_from_slice(&old);
        }
        joined[(offset - lo) as usize..(end - lo) as usize].copy_from_slice(data);
        self.dirty_bytes += joined.len();
        self.extents.insert(lo, joined);
        self.grow(end);
    }

    fn grow(&mut self, end: u64) {
        self.size = self.size.max(end);
        self.changed = true;
    }

    /// Sets the size: cuts what is past it, or extends with zeros.
    pub fn truncate(&mut self, size: u64) {
        if size < self.size {
            let cut: Vec<u64> = self.extents.range(..).map(|(&s, _)| s).collect();
            for s in cut {
                let len = self.extents[&s].len() as u64;
                if s >= size {
                    self.dirty_bytes -= len as usize;
                    self.extents.remove(&s);
                } else if s + len > size {
                    let e = self.extents.get_mut(&s).expect("listed above");
                    self.dirty_bytes -= (s + len - size) as usize;
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
        if self.changed && !self.store_content(store, chunking, true)? {
            self.store_content(store, chunking, false)?;
        }
        Ok(())
    }

    /// Re-cuts and stores; with `partial`, only up to a cut that the bytes
    /// after it cannot move (and returns false, changing nothing, if that
    /// would drop old bytes the overlay does not hold).
    fn store_content(&mut self, store: &BlobStore, chunking: Chunking, partial: bool) -> FsResult<bool> {
        let old = self.map.clone();
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
        let by_end = old
            .chunks
            .partition_point(|&(_, s, _)| s + chunking.max as u64 <= window_end);
        let from_chunk = by_change.min(by_end);
        let from = old.chunks.get(from_chunk).map_or(0, |c| c.1).min(self.size);
        tracing::debug!(
            from,
            from_chunk,
            first_change,
            base = self.base_size,
            valid = self.valid,
            size = self.size,
            "re-cutting"
        );
        let last_change = self
            .extents
            .iter()
            .next_back()
            .map_or(0, |(&s, e)| s + e.len() as u64);
        // Old boundaries are reusable only where old bytes are still there.
        let may_rejoin = self.valid == self.base_size && self.size == self.base_size;
        // A partial store reads up to the end of the written bytes and keeps
        // only chunks the chunker saw a whole window (max size) past the start
        // of: FastCDC's cut depends on up to `max` bytes and one more.
        let limit = if partial {
            last_change.min(self.size)
        } else {
            self.size
        };
        if partial && (limit < from + chunking.max as u64 + 1 || limit < self.valid) {
            return Ok(false);
        }

        let mut chunks: Vec<(Hash, u64, u32)> = old.chunks[..from_chunk.min(old.chunks.len())].to_vec();
        let mut batch: Vec<(usize, bytes::Bytes)> = Vec::new();
        let mut batch_bytes = 0usize;
        let mut reader = ContentReader {
            store,
            file: self,
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
        let zero = zero_chunk(chunking);
        while pos < limit {
            if partial && pos + max as u64 + 1 > limit {
                break;
            }
            let (hash, len) = if pos + max as u64 <= limit && self.is_zeros(pos, max as u64, &zero.hash) {
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
                while hi - lo < max && reader.at < limit {
                    if hi == buf.len() {
                        buf.copy_within(lo..hi, 0);
                        (lo, hi) = (0, hi - lo);
                    }
                    hi += reader.read(&mut buf[hi..])?;
                }
                let window = &buf[lo..hi.min(lo + max)];
                let cdc = fastcdc::v2020::FastCDC::new(window, chunking.min, chunking.avg, chunking.max);
                let len = cdc.cut(0, window.len()).1;
                let blob = object::encode_chunk(&window[..len]);
                lo += len;
                batch_bytes += blob.len();
                // Hashed with the rest of its batch, on several threads, once
                // it is in `chunks` (below).
                batch.push((chunks.len(), blob));
                (Hash([0; 32]), len as u32)
            };
            chunks.push((hash, pos, len));
            pos += len as u64;
            if batch_bytes >= BATCH_BYTES {
                hash_and_store(store, &mut chunks, std::mem::take(&mut batch))?;
                batch_bytes = 0;
            }
            if may_rejoin && pos >= last_change && pos < self.base_size {
                // A cut on an old boundary (not the old last one, which the end
                // of the file made): the rest is unchanged.
                if let Some(j) = old.find(pos) {
                    if old.chunks[j].1 == pos {
                        chunks.extend_from_slice(&old.chunks[j..]);
                        break;
                    }
                }
            }
        }
        STREAM_BUFFER.with(|b| *b.borrow_mut() = buf);
        hash_and_store(store, &mut chunks, batch)?;
        let map = ChunkMap { chunks };
        if partial {
            let cut = map.size();
            if cut < self.valid {
                return Ok(false);
            }
            // The base now ends at `cut`; what is written past it stays.
            let keys: Vec<u64> = self.extents.range(..cut).map(|(&k, _)| k).collect();
            for k in keys {
                let mut e = self.extents.remove(&k).expect("listed above");
                self.dirty_bytes -= e.len();
                let end = k + e.len() as u64;
                if end > cut {
                    // The rest moves to the front of the same buffer: a
                    // sequential writer keeps appending to memory already
                    // allocated and touched, instead of a fresh one per spill.
                    e.drain(..(cut - k) as usize);
                    self.dirty_bytes += e.len();
                    self.extents.insert(cut, e);
                }
            }
            // `manifest` is stale until the next full store (`changed` stays).
            self.base_size = cut;
            self.valid = cut;
            self.map = Arc::new(map);
            return Ok(true);
        }
        debug_assert_eq!(map.size(), self.size);
        let manifest = store.put_many_behind(vec![object::encode_manifest(&map.manifest())])?[0];
        self.manifest = manifest;
        self.base_size = map.size();
        self.valid = self.base_size;
        self.size = self.base_size;
        self.map = Arc::new(map);
        self.extents.clear();
        self.dirty_bytes = 0;
        self.changed = false;
        Ok(true)
    }
}

impl ReadView {
    /// The bytes of the range, fetching chunks from the store as needed.
    /// Also returns the index of the last chunk read (for read-ahead).
    pub fn read(&self, store: &BlobStore) -> FsResult<(Bytes, Option<usize>)> {
        // The common case, a read inside one stored chunk with nothing written
        // over it: the chunk's own bytes, not copied.
        if self.overlay.is_empty() && self.end <= self.valid && self.start < self.end {
            if let Some(i) = self.map.find(self.start) {
                let (h, cs, cl) = self.map.chunks[i];
                if self.end <= cs + cl as u64 {
                    let data = chunk_data(store, &h, cl)?;
                    let bytes = data.slice((self.start - cs) as usize..(self.end - cs) as usize);
                    return Ok((bytes, Some(i)));
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
        Ok((out.into(), last))
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
    let hashed = batch
        .into_iter()
        .map(|(i, blob)| {
            let h = Hash::of(&blob);
            chunks[i].0 = h;
            (h, blob)
        })
        .collect();
    store.put_hashed_behind(hashed)?;
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

fn zero_chunk(c: Chunking) -> ZeroChunk {
    type Known = Vec<((u32, u32, u32), ZeroChunk)>;
    static CACHE: std::sync::OnceLock<parking_lot::Mutex<Known>> = std::sync::OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let key = (c.min, c.avg, c.max);
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
        hash: Hash::of(&blob),
        blob,
    };
    cache.lock().push((key, z.clone()));
    z
}

impl FileData {
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
    file: &'a FileData,
    at: u64,
    end: u64,
}

impl Read for ContentReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let f = self.file;
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
