//! One segment file of the log: appended to while active, read-only once sealed.
//!
//! Writes are buffered in memory (`Tail`) and written to the file by `flush`,
//! which every connection calls once per batch of requests, so many writers share
//! one `write` and, with `appendfsync always`, one `fsync` (group commit). Reads
//! come from a shared memory map of the file; bytes not yet written are served
//! from the buffer.
//!
//! Invariants:
//! * `written` only grows, and every byte below it is in the file (and so visible
//!   through the map, which shares the page cache). Readers use the map only
//!   below `written`, which is never past the end of the file, so the map is
//!   never touched beyond the file's end (which would fault).
//! * The file is preallocated (sparse) to `capacity` while active, and cut to
//!   `written` when sealed; nothing is appended after `sealed` is set.
//! * The map is never unmapped while an `Arc<Segment>` exists, so a reader that
//!   holds one may read even after compaction has deleted the file.

use bytes::Bytes;
use memmap2::{Mmap, MmapOptions};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::sync::{io_point, Arc, AtomicBool, AtomicU64, Mutex, Ordering};

use super::files::Files;
use super::record;

/// Values shorter than this are copied out of the map; longer ones are handed
/// out as zero-copy views that keep the segment alive.
const COPY_BELOW: usize = 4096;
/// Records with values this large are written to the file directly.
const DIRECT_WRITE: usize = 128 * 1024;

struct Tail {
    /// Encoded records not yet written to the file.
    buf: Vec<u8>,
    /// File offset of `buf[0]`.
    base: u64,
    sealed: bool,
}

pub struct Segment {
    pub id: u64,
    pub path: PathBuf,
    file: File,
    /// Where syncs go (the system, or the power-loss model in tests).
    files: std::sync::Arc<dyn Files>,
    map: Option<Mmap>,
    capacity: u64,
    tail: Mutex<Tail>,
    written: AtomicU64,
    synced: AtomicU64,
    sync_lock: Mutex<()>,
    /// Bytes of records the index points to, and of all records.
    pub live: AtomicU64,
    pub total: AtomicU64,
    /// Set when the segment is being compacted away, so it is picked only once.
    pub compacting: AtomicBool,
    /// Delete and clear records in the segment: while there are none and nothing
    /// is live, compaction can drop the segment without reading it.
    pub tombstones: AtomicU64,
    /// Set once the work that follows sealing (fsync, hint file) is done.
    /// Until then compaction leaves the segment alone, so a hint file is never
    /// written for a segment already deleted.
    pub settled: AtomicBool,
}

/// A shared segment (its `Arc` comes from [`crate::sync`], so the model checker
/// can follow it).
pub type SegmentRef = Arc<Segment>;

/// File name of segment `id` in the data directory.
pub fn file_name(id: u64) -> String {
    format!("segment-{id:010}.log")
}

pub fn hint_name(id: u64) -> String {
    format!("segment-{id:010}.hint")
}

/// The id in a segment file name, if it is one.
pub fn parse_file_name(name: &str) -> Option<u64> {
    name.strip_prefix("segment-")?.strip_suffix(".log")?.parse().ok()
}

/// The id in a hint file name, if it is one.
pub fn parse_hint_name(name: &str) -> Option<u64> {
    name.strip_prefix("segment-")?.strip_suffix(".hint")?.parse().ok()
}

fn map(file: &File, len: u64) -> std::io::Result<Option<Mmap>> {
    if len == 0 {
        return Ok(None);
    }
    // SAFETY: the file belongs to this process's data directory. It is only ever
    // extended, or cut to a length below which every read stays (see the module
    // invariants), so no access through the map reaches past the file's end.
    unsafe { MmapOptions::new().len(len as usize).map(file) }.map(Some)
}

impl Segment {
    /// Creates a new, empty active segment able to hold `capacity` bytes.
    /// The caller makes its directory entry durable (see `DiskStore::rotate`).
    pub fn create(
        dir: &Path,
        id: u64,
        capacity: u64,
        files: std::sync::Arc<dyn Files>,
    ) -> std::io::Result<Segment> {
        let path = dir.join(file_name(id));
        let file = files.create_new(&path)?;
        file.set_len(capacity)?;
        let map = map(&file, capacity)?;
        Ok(Segment::new(id, path, file, files, map, capacity, 0, false))
    }

    /// Opens an existing segment read-only (for recovery); `len` is its length.
    pub fn open_sealed(path: PathBuf, id: u64, files: std::sync::Arc<dyn Files>) -> std::io::Result<Segment> {
        let file = OpenOptions::new().read(true).write(true).open(&path)?;
        let len = file.metadata()?.len();
        let map = map(&file, len)?;
        Ok(Segment::new(id, path, file, files, map, len, len, true))
    }

    #[allow(clippy::too_many_arguments)]
    fn new(
        id: u64,
        path: PathBuf,
        file: File,
        files: std::sync::Arc<dyn Files>,
        map: Option<Mmap>,
        capacity: u64,
        len: u64,
        sealed: bool,
    ) -> Self {
        Segment {
            id,
            path,
            file,
            files,
            map,
            capacity,
            tail: Mutex::new(Tail {
                buf: Vec::new(),
                base: len,
                sealed,
            }),
            written: AtomicU64::new(len),
            synced: AtomicU64::new(len),
            sync_lock: Mutex::new(()),
            live: AtomicU64::new(0),
            total: AtomicU64::new(0),
            compacting: AtomicBool::new(false),
            tombstones: AtomicU64::new(0),
            // A segment opened at start-up gets its hint file (if missing)
            // before the store is handed out.
            settled: AtomicBool::new(sealed),
        }
    }

    /// The file's bytes below `written` (the whole file once sealed).
    pub fn bytes(&self) -> &[u8] {
        let len = self.written.load(Ordering::Acquire) as usize;
        self.map.as_ref().map_or(&[][..], |m| &m[..len])
    }

    /// Appends a record; returns its offset, or `None` if the segment is sealed
    /// or too full (the caller rotates). Small records are buffered until the
    /// next `flush`; a large one is written at once, straight from `value`, which
    /// saves copying it through the buffer.
    pub fn append(
        &self,
        header: &[u8; record::HEADER],
        key: &[u8],
        value: &[u8],
    ) -> std::io::Result<Option<u64>> {
        let len = (record::HEADER + key.len() + value.len()) as u64;
        let mut tail = self.tail.lock();
        let offset = tail.base + tail.buf.len() as u64;
        if tail.sealed || offset + len > self.capacity {
            return Ok(None);
        }
        if value.len() < DIRECT_WRITE {
            tail.buf.reserve(len as usize);
            tail.buf.extend_from_slice(header);
            tail.buf.extend_from_slice(key);
            tail.buf.extend_from_slice(value);
        } else {
            // Everything before it first, so the file has no gap.
            if !tail.buf.is_empty() {
                io_point();
                self.file.write_all_at(&tail.buf, tail.base)?;
                tail.buf.clear();
            }
            let mut head = Vec::with_capacity(record::HEADER + key.len());
            head.extend_from_slice(header);
            head.extend_from_slice(key);
            io_point();
            self.file.write_all_at(&head, offset)?;
            io_point();
            self.file.write_all_at(value, offset + head.len() as u64)?;
            tail.base = offset + len;
            self.written.store(tail.base, Ordering::Release);
        }
        self.total.fetch_add(len, Ordering::Relaxed);
        Ok(Some(offset))
    }

    /// Whether nothing has been appended since creation.
    pub fn is_empty(&self) -> bool {
        let tail = self.tail.lock();
        tail.base == 0 && tail.buf.is_empty()
    }

    /// Writes buffered records to the file. On error the records stay buffered
    /// (nothing is lost while the process runs) and the next call retries.
    pub fn flush(&self) -> std::io::Result<()> {
        let mut tail = self.tail.lock();
        if tail.buf.is_empty() {
            return Ok(());
        }
        io_point();
        self.file.write_all_at(&tail.buf, tail.base)?;
        let new_base = tail.base + tail.buf.len() as u64;
        tail.base = new_base;
        tail.buf.clear();
        if tail.buf.capacity() > 4 * 1024 * 1024 {
            tail.buf = Vec::new();
        }
        self.written.store(new_base, Ordering::Release);
        Ok(())
    }

    /// Makes everything written so far durable. Concurrent callers share one
    /// fsync: whoever finds the bytes it needs already synced returns at once.
    pub fn sync(&self) -> std::io::Result<()> {
        let target = self.written.load(Ordering::Acquire);
        if self.synced.load(Ordering::Acquire) >= target {
            return Ok(());
        }
        let _one_at_a_time = self.sync_lock.lock();
        let target = self.written.load(Ordering::Acquire);
        if self.synced.load(Ordering::Acquire) >= target {
            return Ok(());
        }
        self.files.sync(&self.path, &self.file)?;
        // Only one syncer at a time (sync_lock), so a load and store suffice.
        if self.synced.load(Ordering::Acquire) < target {
            self.synced.store(target, Ordering::Release);
        }
        Ok(())
    }

    /// Stops appends, writes what is buffered and cuts the preallocated space.
    /// Returns the final length. Does not fsync: that is the caller's to
    /// schedule (an inline fsync of a whole segment would stall writers).
    pub fn seal(&self) -> std::io::Result<u64> {
        let mut tail = self.tail.lock();
        tail.sealed = true;
        if !tail.buf.is_empty() {
            io_point();
            self.file.write_all_at(&tail.buf, tail.base)?;
            tail.base += tail.buf.len() as u64;
            tail.buf = Vec::new();
            self.written.store(tail.base, Ordering::Release);
        }
        self.file.set_len(tail.base)?;
        Ok(tail.base)
    }

    /// Bytes known to be on disk (for tests of the fsync schedule).
    #[cfg(test)]
    pub fn synced_len(&self) -> u64 {
        self.synced.load(Ordering::Acquire)
    }

    pub fn is_sealed(&self) -> bool {
        self.tail.lock().sealed
    }

    pub fn len(&self) -> u64 {
        let tail = self.tail.lock();
        tail.base + tail.buf.len() as u64
    }

    /// Reads `len` bytes at `offset` (within one record).
    /// (An associated function, not a method: `self: &Arc<Self>` is not
    /// allowed for the model checker's `Arc`.)
    pub fn read(this: &SegmentRef, offset: u64, len: usize) -> Bytes {
        let end = offset + len as u64;
        if end <= this.written.load(Ordering::Acquire) {
            return Segment::read_mapped(this, offset as usize, len);
        }
        let tail = this.tail.lock();
        if offset >= tail.base {
            let start = (offset - tail.base) as usize;
            return Bytes::copy_from_slice(&tail.buf[start..start + len]);
        }
        drop(tail);
        // Flushed between the two checks.
        Segment::read_mapped(this, offset as usize, len)
    }

    fn read_mapped(this: &SegmentRef, offset: usize, len: usize) -> Bytes {
        let Some(map) = this.map.as_ref() else {
            return Bytes::new();
        };
        if len < COPY_BELOW {
            return Bytes::copy_from_slice(&map[offset..offset + len]);
        }
        Bytes::from_owner(MappedSlice {
            segment: this.clone(),
            start: offset,
            end: offset + len,
        })
    }
}

/// Values from this size on are announced to the kernel (`MADV_WILLNEED`)
/// before they are read from the map.
const WILLNEED_FROM: usize = 64 << 10;

impl Segment {
    /// Reads the value of the record at `offset` (header and key `head_len`
    /// bytes, then `value_len` bytes of value) after checking the record's CRC;
    /// `None` if the check fails. Checks in place, so a small value is copied
    /// once and a large one not at all.
    pub fn read_verified(this: &SegmentRef, offset: u64, head_len: usize, value_len: usize) -> Option<Bytes> {
        let end = offset + (head_len + value_len) as u64;
        let value_at = offset as usize + head_len;
        if end <= this.written.load(Ordering::Acquire) {
            let map = this.map.as_ref()?;
            if value_len >= WILLNEED_FROM {
                // A large value not in the page cache would otherwise be
                // read a fault at a time as the CRC check walks it; asking
                // for the whole range first makes it one read-ahead.
                let _ = map.advise_range(memmap2::Advice::WillNeed, offset as usize, head_len + value_len);
            }
            let record = &map[offset as usize..end as usize];
            if !record::verify(&record[..head_len], &record[head_len..]) {
                return None;
            }
            return Some(Segment::read_mapped(this, value_at, value_len));
        }
        let tail = this.tail.lock();
        if offset >= tail.base {
            let start = (offset - tail.base) as usize;
            let record = &tail.buf[start..start + head_len + value_len];
            if !record::verify(&record[..head_len], &record[head_len..]) {
                return None;
            }
            return Some(Bytes::copy_from_slice(&record[head_len..]));
        }
        drop(tail);
        // Flushed between the two checks: now below `written`.
        Segment::read_verified(this, offset, head_len, value_len)
    }
}

/// A zero-copy view of part of a segment's map; keeps the segment alive.
struct MappedSlice {
    segment: Arc<Segment>,
    start: usize,
    end: usize,
}

impl AsRef<[u8]> for MappedSlice {
    fn as_ref(&self) -> &[u8] {
        match &self.segment.map {
            Some(m) => &m[self.start..self.end],
            None => &[],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn append(seg: &Segment, key: &[u8], value: &[u8]) -> Option<u64> {
        let h = record::header(record::Kind::Put, 1, None, key, value);
        seg.append(&h, key, value).unwrap()
    }

    #[test]
    fn buffered_direct_and_flushed_reads_are_identical() {
        let dir = tempfile::tempdir().unwrap();
        let seg = Arc::new(
            Segment::create(
                dir.path(),
                1,
                1 << 20,
                std::sync::Arc::new(super::super::files::OsFiles),
            )
            .unwrap(),
        );
        let big = vec![7u8; 200_000];
        let a = append(&seg, b"k", b"abc").unwrap() + record::HEADER as u64 + 1;
        assert_eq!(Segment::read(&seg, a, 3), "abc", "read from the buffer");
        let b = append(&seg, b"k", &big).unwrap() + record::HEADER as u64 + 1;
        assert_eq!(
            Segment::read(&seg, a, 3),
            "abc",
            "written ahead of the direct record"
        );
        assert_eq!(Segment::read(&seg, b, big.len()), big);
        let c = append(&seg, b"k", b"xyz").unwrap() + record::HEADER as u64 + 1;
        seg.flush().unwrap();
        assert_eq!(Segment::read(&seg, c, 3), "xyz");
        let len = seg.seal().unwrap();
        assert_eq!(len, 3 * (record::HEADER as u64 + 1) + 6 + big.len() as u64);
        assert_eq!(std::fs::metadata(&seg.path).unwrap().len(), len);
        assert!(
            append(&seg, b"k", b"v").is_none(),
            "sealed segments take no appends"
        );
        // Every record reads back whole and checks.
        let bytes = seg.bytes();
        let mut at = 0;
        while at < bytes.len() {
            at += record::parse(&bytes[at..]).unwrap().record_len() as usize;
        }
    }

    #[test]
    fn a_full_segment_refuses_appends() {
        let dir = tempfile::tempdir().unwrap();
        let seg = Segment::create(
            dir.path(),
            1,
            60,
            std::sync::Arc::new(super::super::files::OsFiles),
        )
        .unwrap();
        assert!(append(&seg, b"k", b"v").is_some());
        assert!(append(&seg, b"k", b"v").is_none());
    }
}

/// Model checks of the append / flush / read / seal / sync protocol: loom runs the
/// real `Segment` code in every interleaving of the threads below (bounded), on
/// real files. Built only with `--cfg loom`; `scripts/loom.sh` runs them.
#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use std::sync::atomic::AtomicUsize as StdCounter;

    static NEXT_ID: StdCounter = StdCounter::new(1);

    fn fresh(dir: &Path) -> SegmentRef {
        let id = NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed) as u64;
        SegmentRef::new(
            Segment::create(
                dir,
                id,
                1 << 20,
                std::sync::Arc::new(super::super::files::OsFiles),
            )
            .unwrap(),
        )
    }

    fn append(seg: &Segment, value: &[u8]) -> Option<u64> {
        let h = record::header(record::Kind::Put, 1, None, b"k", value);
        seg.append(&h, b"k", value)
            .unwrap()
            .map(|o| o + record::HEADER as u64 + 1)
    }

    fn model(f: impl Fn(&Path) + Sync + Send + 'static) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        let mut builder = loom::model::Builder::new();
        builder.preemption_bound = Some(3);
        builder.check(move || f(&path));
    }

    /// A reader racing a flush always gets the bytes that were appended, whether
    /// it finds them in the buffer or in the file.
    #[test]
    fn reads_racing_flushes_see_appended_bytes() {
        model(|dir| {
            let seg = fresh(dir);
            let a = append(&seg, b"first").unwrap();
            let flusher = {
                let seg = seg.clone();
                loom::thread::spawn(move || seg.flush().unwrap())
            };
            let writer = {
                let seg = seg.clone();
                loom::thread::spawn(move || append(&seg, b"second").unwrap())
            };
            assert_eq!(Segment::read(&seg, a, 5), "first");
            let b = writer.join().unwrap();
            assert_eq!(Segment::read(&seg, b, 6), "second");
            flusher.join().unwrap();
            seg.flush().unwrap();
            assert_eq!(Segment::read(&seg, a, 5), "first");
            assert_eq!(Segment::read(&seg, b, 6), "second");
        });
    }

    /// Sealing races appends: every append either lands before the seal (and is
    /// in the sealed file) or is refused; none is lost in between.
    #[test]
    fn seal_racing_appends_loses_no_accepted_record() {
        model(|dir| {
            let seg = fresh(dir);
            let writer = {
                let seg = seg.clone();
                loom::thread::spawn(move || [append(&seg, b"one"), append(&seg, b"two")])
            };
            let len = seg.seal().unwrap();
            let placed = writer.join().unwrap();
            for (offset, value) in placed.iter().zip([&b"one"[..], b"two"]) {
                if let Some(o) = offset {
                    assert!(o + value.len() as u64 <= len, "accepted after the seal");
                    assert_eq!(Segment::read(&seg, *o, value.len()), value);
                }
            }
            assert_eq!(std::fs::metadata(&seg.path).unwrap().len(), len);
        });
    }

    /// The direct write path (values of [`DIRECT_WRITE`] bytes or more go to
    /// the file without the buffer) racing verified reads of a record still in
    /// the buffer, which that path writes out first: the reader gets the
    /// record whole and checksummed, whether from the buffer or the file, and
    /// the large record reads back verified once placed. (Publishing `written`
    /// before the bytes are in the file makes this model fail: the reader then
    /// takes the map's zeros for the record; see docs/STORAGE.md.)
    #[test]
    fn direct_writes_racing_verified_reads_give_whole_records() {
        model(|dir| {
            let seg = fresh(dir);
            let head_len = record::HEADER + 1;
            let small = append(&seg, b"small").unwrap() - head_len as u64;
            let writer = {
                let seg = seg.clone();
                loom::thread::spawn(move || {
                    let big = vec![7u8; DIRECT_WRITE];
                    let h = record::header(record::Kind::Put, 2, None, b"k", &big);
                    seg.append(&h, b"k", &big).unwrap().unwrap()
                })
            };
            let got = Segment::read_verified(&seg, small, head_len, 5).expect("the small record verifies");
            assert_eq!(&got[..], b"small");
            let big_at = writer.join().unwrap();
            let big = Segment::read_verified(&seg, big_at, head_len, DIRECT_WRITE)
                .expect("the large record verifies");
            assert!(big.len() == DIRECT_WRITE && big.iter().all(|&b| b == 7));
        });
    }

    /// Concurrent syncs never report synced bytes that were not written.
    #[test]
    fn concurrent_syncs_cover_what_was_written() {
        model(|dir| {
            let seg = fresh(dir);
            append(&seg, b"a").unwrap();
            let other = {
                let seg = seg.clone();
                loom::thread::spawn(move || {
                    seg.flush().unwrap();
                    seg.sync().unwrap();
                    seg.synced.load(Ordering::Acquire)
                })
            };
            append(&seg, b"b").unwrap();
            seg.flush().unwrap();
            seg.sync().unwrap();
            let mine = seg.synced.load(Ordering::Acquire);
            let theirs = other.join().unwrap();
            let written = seg.written.load(Ordering::Acquire);
            assert!(
                theirs <= written && mine == written,
                "synced {mine}/{theirs} of {written}"
            );
        });
    }
}
