//! The on-disk engine: a Bitcask-style log.
//!
//! Every write appends a [`record`] to the active [`segment`]; an in-memory
//! [`Index`] maps each key to where its newest record is (`Loc`); reads come from
//! memory-mapped segment files. Deletes, expiry and FLUSHALL append tombstones.
//! Full segments are sealed (with a hint file listing their records, so start-up
//! need not read values) and a new one is started. Compaction rewrites the live
//! records of segments that are mostly dead, then deletes them.
//!
//! Invariants (each kept where noted):
//! * **The index points at the newest record of each live key.** Records carry a
//!   sequence number from one counter; recovery keeps, per key, the record with
//!   the highest one ([`Recovery::apply`]), so it does not matter which file a
//!   record is in or in which order files are read.
//! * **An acknowledged write is in the file before the reply is sent** (and
//!   fsynced, with `appendfsync always`): connections call [`Store::flush`] after
//!   each batch and send nothing if it fails.
//! * **Compaction never loses a racing write.** It moves a record only if the
//!   index still points at the old copy, checked under the key's shard lock
//!   ([`DiskStore::compact_segment`]); a write that happened meanwhile has a
//!   higher sequence number and wins, in the index and in recovery.
//! * **A reader never sees a deleted segment vanish.** Readers take the segment's
//!   `Arc` while holding the key's shard lock, and compaction repoints every key
//!   (under those locks) before it drops a segment from the table; an unlinked
//!   file stays mapped while an `Arc` exists.

pub mod files;
pub mod record;
pub mod segment;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};

use super::index::{Index, Indexed};
use super::{Entry, Store, StoreError, Update};
use files::{Files, OsFiles};
use record::{Kind, HEADER};
use segment::{Segment, SegmentRef};

pub use crate::config::Fsync;

/// Engine settings.
#[derive(Clone, Debug)]
pub struct Options {
    pub fsync: Fsync,
    /// A segment is sealed once it holds this many bytes.
    pub segment_size: u64,
    /// A sealed segment is compacted when this fraction of it is dead.
    pub compact_dead_fraction: f64,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            fsync: Fsync::EverySec,
            segment_size: 64 * 1024 * 1024,
            compact_dead_fraction: 0.5,
        }
    }
}

/// Where a key's newest record is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Loc {
    pub segment: u64,
    pub offset: u64,
    pub key_len: u32,
    pub value_len: u32,
    pub expires_at: Option<u64>,
    pub seq: u64,
}

impl Loc {
    fn record_len(&self) -> u64 {
        HEADER as u64 + self.key_len as u64 + self.value_len as u64
    }
}

impl Indexed for Loc {
    fn expires_at(&self) -> Option<u64> {
        self.expires_at
    }

    fn size(&self) -> u64 {
        self.value_len as u64
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// What the last compaction did, for INFO.
#[derive(Default, Clone)]
struct CompactionStats {
    runs: u64,
    last_unix_secs: u64,
    last_reclaimed: u64,
    in_progress: bool,
}

pub struct DiskStore {
    /// This store's own `Arc`, for background work started from `&self`.
    me: Weak<DiskStore>,
    dir: PathBuf,
    options: Options,
    fsync: AtomicU8,
    /// Dead percentage at which the background compacts a segment.
    compact_percent: AtomicU8,
    index: Index<Loc>,
    segments: RwLock<BTreeMap<u64, SegmentRef>>,
    active: RwLock<SegmentRef>,
    next_seq: AtomicU64,
    next_segment: AtomicU64,
    /// Sealed segments whose last writes may not be fsynced yet. Flushes with
    /// `always`, the once-a-second fsync and compaction sync them.
    unsynced: Mutex<Vec<SegmentRef>>,
    /// Set while writes to disk fail; writes are refused until a retry succeeds.
    write_error: Mutex<Option<String>>,
    compaction: Mutex<CompactionStats>,
    /// Serialises compactions and FLUSHALL.
    maintenance: Mutex<()>,
    stop: AtomicBool,
    startup: StartupStats,
    /// Held (locked) for the store's life: one process per data directory.
    /// Where the durability-deciding file operations go.
    files: Arc<dyn Files>,
    _lock: std::fs::File,
}

/// What recovery found, for the log and INFO.
#[derive(Default, Clone, Debug)]
pub struct StartupStats {
    pub segments: usize,
    pub from_hints: usize,
    pub records: u64,
    pub truncated_bytes: u64,
    pub skipped_bytes: u64,
    pub millis: u64,
}

fn io_err(context: &str, e: std::io::Error) -> StoreError {
    StoreError::Write(format!("{context}: {e}"))
}

impl DiskStore {
    /// Opens (or creates) the log in `dir`, recovering the index from hint files
    /// and segment scans, and starts the background fsync / compaction thread.
    pub fn open(dir: &Path, options: Options) -> std::io::Result<Arc<DiskStore>> {
        DiskStore::open_with(dir, options, Arc::new(OsFiles))
    }

    /// [`DiskStore::open`] with its durability-deciding file operations going
    /// through `files` (tests pass the power-loss model, [`files::CrashFiles`]).
    pub fn open_with(dir: &Path, options: Options, files: Arc<dyn Files>) -> std::io::Result<Arc<DiskStore>> {
        std::fs::create_dir_all(dir)?;
        let lock = std::fs::File::create(dir.join("LOCK"))?;
        // A previous owner that is just stopping (a restart, or a store being
        // dropped while its storage thread finishes an fsync) releases the lock
        // within moments; only one that keeps it is an error.
        let deadline = Instant::now() + Duration::from_secs(3);
        while lock.try_lock().is_err() {
            if Instant::now() > deadline {
                return Err(std::io::Error::other(format!(
                    "data directory {} is in use by another kvd",
                    dir.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let started = Instant::now();
        let mut recovery = Recovery::default();
        let mut segments = BTreeMap::new();
        let mut ids: Vec<u64> = std::fs::read_dir(dir)?
            .filter_map(|e| e.ok())
            .filter_map(|e| segment::parse_file_name(&e.file_name().to_string_lossy()))
            .collect();
        ids.sort_unstable();
        remove_stray_hints(dir, &ids);
        for &id in &ids {
            let path = dir.join(segment::file_name(id));
            let len = std::fs::metadata(&path)?.len();
            // Recovery reads with read(2), not through a map: a damaged or sparse
            // file then gives an error or zeros, never a fault that kills the
            // process (reading a hole of a full tmpfs through a map does).
            let end = match hints::read(dir, id, len) {
                Some(entries) => {
                    recovery.stats.from_hints += 1;
                    for h in entries {
                        recovery.apply(id, h.offset, h.header, h.key);
                    }
                    len
                }
                None => {
                    let data = std::fs::read(&path)?;
                    let end = recovery.scan(id, &data);
                    if data[end as usize..].iter().any(|&b| b != 0) {
                        tracing::warn!(
                            segment = id,
                            offset = end,
                            bytes = len - end,
                            "torn or corrupt tail: truncating; every record before it is kept"
                        );
                        recovery.stats.truncated_bytes += len - end;
                    }
                    end
                }
            };
            if end < len {
                let file = std::fs::OpenOptions::new().write(true).open(&path)?;
                file.set_len(end)?;
                files.sync(&path, &file)?;
                let _ = std::fs::remove_file(dir.join(segment::hint_name(id)));
            }
            let seg = Segment::open_sealed(path, id, files.clone())?;
            seg.total.store(end, Ordering::Relaxed);
            let tombstones = recovery.tombstones.get(&id).copied().unwrap_or(0);
            seg.tombstones.store(tombstones, Ordering::Relaxed);
            recovery.stats.segments += 1;
            segments.insert(id, SegmentRef::new(seg));
        }
        let index = Index::default();
        let mut stats = std::mem::take(&mut recovery.stats);
        let max_seq = recovery.finish(&index, &segments);
        let next_segment = ids.last().map_or(1, |id| id + 1);
        let active = SegmentRef::new(Segment::create(
            dir,
            next_segment,
            options.segment_size,
            files.clone(),
        )?);
        // A segment's name must be durable before anything written in it is
        // acknowledged: a power cut would otherwise take the whole file.
        files.sync_dir(dir)?;
        segments.insert(next_segment, active.clone());
        stats.millis = started.elapsed().as_millis() as u64;
        tracing::info!(
            segments = stats.segments,
            from_hints = stats.from_hints,
            keys = index.len(),
            ms = stats.millis,
            "storage recovered from {}",
            dir.display()
        );
        let store = Arc::new_cyclic(|me| DiskStore {
            me: me.clone(),
            dir: dir.to_path_buf(),
            fsync: AtomicU8::new(options.fsync as u8),
            compact_percent: AtomicU8::new((options.compact_dead_fraction * 100.0).clamp(1.0, 100.0) as u8),
            options,
            index,
            segments: RwLock::new(segments),
            active: RwLock::new(active),
            next_seq: AtomicU64::new(max_seq + 1),
            next_segment: AtomicU64::new(next_segment + 1),
            unsynced: Mutex::new(Vec::new()),
            write_error: Mutex::new(None),
            compaction: Mutex::new(CompactionStats::default()),
            maintenance: Mutex::new(()),
            stop: AtomicBool::new(false),
            startup: stats,
            files,
            _lock: lock,
        });
        // Segments recovered without a hint file get one now.
        for seg in store.segments.read().values() {
            if seg.id != next_segment && !store.dir.join(segment::hint_name(seg.id)).exists() {
                hints::write(&store.dir, seg, &*store.files);
            }
        }
        start_threads(&store)?;
        Ok(store)
    }

    pub fn startup_stats(&self) -> &StartupStats {
        &self.startup
    }

    pub fn set_fsync(&self, policy: Fsync) {
        self.fsync.store(policy as u8, Ordering::Relaxed);
    }

    fn fsync_policy(&self) -> Fsync {
        Fsync::from_u8(self.fsync.load(Ordering::Relaxed))
    }

    fn segment(&self, id: u64) -> Option<SegmentRef> {
        self.segments.read().get(&id).cloned()
    }

    /// Reads and verifies the value a location points at. Called with the key's
    /// shard lock held, so compaction cannot have dropped the segment. Every read
    /// checks the record's CRC: damage on disk is an error naming the key, never
    /// bytes handed out as if they were good.
    fn read_value(&self, key: &Bytes, loc: &Loc) -> Result<Bytes, StoreError> {
        let corrupt = |why: &str| {
            tracing::error!(
                segment = loc.segment,
                offset = loc.offset,
                key = %String::from_utf8_lossy(key),
                "{why}"
            );
            StoreError::Corrupt(String::from_utf8_lossy(key).into_owned())
        };
        // Read under the table's guard rather than a clone of the segment's
        // `Arc`: the guard keeps the segment alive just the same, without two
        // reference-count updates per read.
        let segments = self.segments.read();
        let Some(seg) = segments.get(&loc.segment) else {
            return Err(corrupt("index points at a missing segment"));
        };
        let head_len = HEADER + loc.key_len as usize;
        Segment::read_verified(seg, loc.offset, head_len, loc.value_len as usize)
            .ok_or_else(|| corrupt("stored record fails its checksum"))
    }

    /// Records a failed write: writes are refused until one succeeds again.
    fn write_failed(&self, e: std::io::Error) -> StoreError {
        let text = e.to_string();
        tracing::error!("write to the data directory failed: {text}; refusing writes until it succeeds");
        *self.write_error.lock() = Some(text.clone());
        StoreError::Write(text)
    }

    fn check_writable(&self) -> Result<(), StoreError> {
        let mut err = self.write_error.lock();
        if err.is_some() {
            // Retry: a freed-up disk clears the error.
            match self.active.read().clone().flush() {
                Ok(()) => *err = None,
                Err(e) => return Err(StoreError::Write(e.to_string())),
            }
        }
        Ok(())
    }

    /// Appends a new record to the active segment (with the next sequence
    /// number), rotating when it is full. Returns the new record's location.
    fn append(
        &self,
        kind: Kind,
        key: &[u8],
        value: &[u8],
        expires_at: Option<u64>,
    ) -> Result<Loc, StoreError> {
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        self.append_with_seq(kind, seq, expires_at, key, value)
    }

    /// Appends a record with a given sequence number: a new one, or a copy made
    /// by compaction (which keeps the original's number).
    fn append_with_seq(
        &self,
        kind: Kind,
        seq: u64,
        expires_at: Option<u64>,
        key: &[u8],
        value: &[u8],
    ) -> Result<Loc, StoreError> {
        let header = record::header(kind, seq, expires_at, key, value);
        let len = (HEADER + key.len() + value.len()) as u64;
        loop {
            let active = self.active.read().clone();
            let placed = active
                .append(&header, key, value)
                .map_err(|e| self.write_failed(e))?;
            if let Some(offset) = placed {
                if kind != Kind::Put {
                    active.tombstones.fetch_add(1, Ordering::Relaxed);
                }
                return Ok(Loc {
                    segment: active.id,
                    offset,
                    key_len: key.len() as u32,
                    value_len: value.len() as u32,
                    expires_at,
                    seq,
                });
            }
            self.rotate(&active, len)?;
        }
    }

    /// Replaces `full` as the active segment (if it still is) with a new one big
    /// enough for a record of `need` bytes, and seals `full`.
    fn rotate(&self, full: &SegmentRef, need: u64) -> Result<(), StoreError> {
        let mut active = self.active.write();
        if !SegmentRef::ptr_eq(&active, full) {
            return Ok(()); // someone else rotated
        }
        let id = self.next_segment.fetch_add(1, Ordering::Relaxed);
        let capacity = self.options.segment_size.max(need);
        let fresh = SegmentRef::new(
            Segment::create(&self.dir, id, capacity, self.files.clone())
                .map_err(|e| io_err("creating a segment", e))?,
        );
        // Durable before anything in it is acknowledged (under the active
        // lock: one directory fsync per segment, every 64 MiB by default).
        self.files
            .sync_dir(&self.dir)
            .map_err(|e| io_err("syncing the data directory", e))?;
        self.segments.write().insert(id, fresh.clone());
        *active = fresh;
        drop(active);
        full.seal().map_err(|e| io_err("sealing a segment", e))?;
        self.unsynced.lock().push(full.clone());
        let sealed = full.clone();
        let dir = self.dir.clone();
        let files = self.files.clone();
        // Syncing a whole segment and writing its hint file need not delay
        // writers; until the sync is done the segment stays on `unsynced`, so an
        // `always` flush still waits for it.
        std::thread::spawn(move || {
            if let Err(e) = sealed.sync() {
                tracing::error!(segment = sealed.id, "fsync of a sealed segment failed: {e}");
            }
            hints::write(&dir, &sealed, &*files);
            sealed.settled.store(true, Ordering::Release);
        });
        Ok(())
    }

    /// Account a record that the index no longer points at.
    fn retire(&self, old: &Loc) {
        if let Some(seg) = self.segment(old.segment) {
            seg.live.fetch_sub(old.record_len(), Ordering::Relaxed);
        }
    }

    fn adopt(&self, loc: &Loc) {
        if let Some(seg) = self.segment(loc.segment) {
            seg.live.fetch_add(loc.record_len(), Ordering::Relaxed);
        }
    }

    /// Live and total bytes over all segments.
    fn space(&self) -> (u64, u64) {
        let segs = self.segments.read();
        segs.values().fold((0, 0), |(l, t), s| {
            (
                l + s.live.load(Ordering::Relaxed),
                t + s.total.load(Ordering::Relaxed),
            )
        })
    }

    /// Sealed segments, other than the active one, whose post-seal work is done
    /// and that `pick` accepts.
    fn settled_segments(&self, pick: impl Fn(&Segment) -> bool) -> Vec<SegmentRef> {
        let active_id = self.active.read().id;
        self.segments
            .read()
            .values()
            .filter(|s| s.id != active_id && s.is_sealed() && s.settled.load(Ordering::Acquire))
            .filter(|s| !s.compacting.load(Ordering::Acquire) && pick(s))
            .cloned()
            .collect()
    }

    /// Deletes the segments with nothing live and no deletes to carry over,
    /// without reading them (a sealed segment never gains live records). One
    /// sync first makes durable what superseded their records: else a crash
    /// could lose a key's old value and its new one, not just the last
    /// second's writes. Returns the bytes reclaimed.
    ///
    /// Cheap, so the background thread does it every tick, not only at
    /// compaction. Why promptly: a workload that overwrites its keys leaves
    /// whole segments dead, and their page-cache pages are freed only when the
    /// file goes. Freed soon, they are what the next appends write into; left
    /// for seconds, the appends take fresh memory instead, which on a VM whose
    /// balloon takes back free pages costs a fault on the host for every page
    /// (1 MiB SETs ran at half the rate).
    fn drop_dead_segments(&self) -> Result<u64, StoreError> {
        let dead = self.settled_segments(|s| {
            s.live.load(Ordering::Acquire) == 0 && s.tombstones.load(Ordering::Acquire) == 0
        });
        let dead: Vec<SegmentRef> = dead
            .into_iter()
            .filter(|s| !s.compacting.swap(true, Ordering::AcqRel))
            .collect();
        if dead.is_empty() {
            return Ok(0);
        }
        if let Err(e) = self.flush_and_sync() {
            for seg in &dead {
                seg.compacting.store(false, Ordering::Release);
            }
            return Err(io_err("syncing before dropping a dead segment", e));
        }
        let reclaimed = dead.iter().map(|seg| self.drop_segment(seg)).sum();
        self.sync_removals();
        Ok(reclaimed)
    }

    /// Makes segment removals durable: a removal a power cut undid would bring
    /// back old records, which recovery must then outrank (it does, by sequence
    /// number), but the space would come back too.
    fn sync_removals(&self) {
        if let Err(e) = self.files.sync_dir(&self.dir) {
            tracing::warn!("syncing the data directory after removing segments: {e}");
        }
    }

    /// Drops dead segments and compacts every other sealed segment whose dead
    /// fraction passes `threshold`. Returns the bytes reclaimed.
    pub fn compact_now(&self, threshold: f64) -> Result<u64, StoreError> {
        let _one = self.maintenance.lock();
        self.compaction.lock().in_progress = true;
        let result = (|| {
            let mut reclaimed = self.drop_dead_segments()?;
            let candidates = self.settled_segments(|s| {
                let total = s.total.load(Ordering::Relaxed).max(s.bytes().len() as u64);
                let live = s.live.load(Ordering::Relaxed);
                total > 0 && (total - live.min(total)) as f64 / total as f64 >= threshold
            });
            for seg in candidates {
                reclaimed += self.compact_segment(&seg)?;
            }
            Ok(reclaimed)
        })();
        self.record_compaction(result.as_ref().copied().unwrap_or(0));
        result
    }

    /// The background tick's share of compaction: only the dead segments, and
    /// only if no compaction is running (the tick must not wait behind one, as
    /// it also runs the everysec fsync).
    fn drop_dead_now(&self) -> Result<u64, StoreError> {
        let Some(_one) = self.maintenance.try_lock() else {
            return Ok(0);
        };
        let reclaimed = self.drop_dead_segments()?;
        if reclaimed > 0 {
            self.record_compaction(reclaimed);
        }
        Ok(reclaimed)
    }

    fn record_compaction(&self, reclaimed: u64) {
        let mut stats = self.compaction.lock();
        stats.in_progress = false;
        stats.runs += 1;
        stats.last_unix_secs = now_ms() / 1000;
        stats.last_reclaimed = reclaimed;
    }

    /// Moves the live records of `seg` to the active segment, then deletes it.
    fn compact_segment(&self, seg: &SegmentRef) -> Result<u64, StoreError> {
        if seg.compacting.swap(true, Ordering::AcqRel) {
            return Ok(0);
        }
        let bytes = seg.bytes();
        let mut offset = 0usize;
        while offset < bytes.len() {
            let Ok(h) = record::parse(&bytes[offset..]) else {
                // Recovery already cut torn tails; skip damage the same way.
                offset = resync(bytes, offset + 1).unwrap_or(bytes.len());
                continue;
            };
            let len = h.record_len() as usize;
            let key = Bytes::copy_from_slice(&bytes[offset + HEADER..offset + HEADER + h.key_len as usize]);
            let value = &bytes[offset + HEADER + h.key_len as usize..offset + len];
            let pos = self.index.pos(&key);
            match h.kind {
                Kind::Put => {
                    let mut shard = self.index.write(&pos);
                    let current = shard.get(&pos);
                    if current.is_some_and(|l| l.segment == seg.id && l.offset == offset as u64) {
                        // Same sequence number: the copy is the same write, not a new one.
                        let moved = self.append_with_seq(h.kind, h.seq, h.expires_at, &key, value)?;
                        self.adopt(&moved);
                        shard.insert(&pos, moved);
                    }
                }
                Kind::Delete => {
                    // Still needed while an older put of the key may survive in
                    // another segment: keep it unless the key lives again.
                    if self.index.read(&pos).get(&pos).is_none() {
                        self.append_with_seq(h.kind, h.seq, h.expires_at, &key, value)?;
                    }
                }
                Kind::Clear => {
                    self.append_with_seq(h.kind, h.seq, h.expires_at, &key, value)?;
                }
            }
            offset += len;
        }
        // The copies must be durable before the originals go. (On failure
        // the segment stays, to be compacted again later: records already
        // copied point elsewhere in the index by then and are skipped.)
        if let Err(e) = self.flush_and_sync() {
            seg.compacting.store(false, Ordering::Release);
            return Err(io_err("syncing compacted data", e));
        }
        let reclaimed = self.drop_segment(seg);
        self.sync_removals();
        Ok(reclaimed)
    }

    /// Removes a compacted segment from the table and deletes its files;
    /// returns its size.
    fn drop_segment(&self, seg: &SegmentRef) -> u64 {
        self.segments.write().remove(&seg.id);
        let reclaimed = seg.len();
        let _ = self.files.remove(&seg.path);
        let _ = self.files.remove(&self.dir.join(segment::hint_name(seg.id)));
        tracing::info!(segment = seg.id, bytes = reclaimed, "compacted");
        reclaimed
    }

    /// Writes and fsyncs everything appended so far, in every segment.
    fn flush_and_sync(&self) -> std::io::Result<()> {
        let active = self.active.read().clone();
        active.flush()?;
        self.sync_sealed()?;
        active.sync()
    }

    /// Fsyncs sealed segments that may still hold unsynced writes.
    fn sync_sealed(&self) -> std::io::Result<()> {
        let pending: Vec<SegmentRef> = self.unsynced.lock().clone();
        for seg in &pending {
            seg.sync()?;
        }
        self.unsynced
            .lock()
            .retain(|s| !pending.iter().any(|p| SegmentRef::ptr_eq(p, s)));
        Ok(())
    }
}

/// Deletes hint files whose segment is gone (a FLUSHALL can delete a segment
/// while its hint file is being written), so none can ever be taken for a later
/// segment's.
fn remove_stray_hints(dir: &Path, segment_ids: &[u64]) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.filter_map(|e| e.ok()) {
        let name = entry.file_name();
        if let Some(id) = segment::parse_hint_name(&name.to_string_lossy()) {
            if segment_ids.binary_search(&id).is_err() {
                tracing::info!(segment = id, "removing the hint file of a deleted segment");
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}

/// The next offset at or after `from` where a valid record starts.
fn resync(bytes: &[u8], from: usize) -> Option<usize> {
    let mut at = from;
    while at < bytes.len() {
        let next = at + memchr::memchr(record::MAGIC, &bytes[at..])?;
        if record::parse(&bytes[next..]).is_ok() {
            return Some(next);
        }
        at = next + 1;
    }
    None
}

impl Store for DiskStore {
    fn get(&self, key: &Bytes) -> Result<Option<Entry>, StoreError> {
        let pos = self.index.pos(key);
        let shard = self.index.read(&pos);
        let Some(loc) = shard.get(&pos) else {
            return Ok(None);
        };
        Ok(Some(Entry {
            value: self.read_value(key, loc)?,
            expires_at: loc.expires_at,
        }))
    }

    fn value_len(&self, key: &Bytes) -> Option<usize> {
        let pos = self.index.pos(key);
        let shard = self.index.read(&pos);
        shard.get(&pos).map(|loc| loc.value_len as usize)
    }

    fn value_prefix(&self, key: &Bytes, len: usize) -> Result<Option<Bytes>, StoreError> {
        let pos = self.index.pos(key);
        let shard = self.index.read(&pos);
        let Some(loc) = shard.get(&pos) else {
            return Ok(None);
        };
        let segments = self.segments.read();
        let Some(seg) = segments.get(&loc.segment) else {
            return Err(StoreError::Corrupt(String::from_utf8_lossy(key).into_owned()));
        };
        let value_at = loc.offset + (HEADER + loc.key_len as usize) as u64;
        Ok(Some(Segment::read(
            seg,
            value_at,
            len.min(loc.value_len as usize),
        )))
    }

    fn expiry(&self, key: &Bytes) -> Option<Option<u64>> {
        let pos = self.index.pos(key);
        self.index.read(&pos).get(&pos).map(|loc| loc.expires_at)
    }

    fn update(
        &self,
        key: &Bytes,
        needs_value: bool,
        f: &mut dyn FnMut(Option<&Entry>) -> Update,
    ) -> Result<(), StoreError> {
        let pos = self.index.pos(key);
        let mut shard = self.index.write(&pos);
        let current = match shard.get(&pos) {
            None => None,
            Some(loc) => Some(Entry {
                value: if needs_value {
                    self.read_value(key, loc)?
                } else {
                    Bytes::new()
                },
                expires_at: loc.expires_at,
            }),
        };
        match f(current.as_ref()) {
            Update::Keep => Ok(()),
            Update::Put(entry) => {
                self.check_writable()?;
                let loc = self.append(Kind::Put, key, &entry.value, entry.expires_at)?;
                self.adopt(&loc);
                if let Some(old) = shard.insert(&pos, loc) {
                    self.retire(&old);
                }
                Ok(())
            }
            Update::Remove => {
                if current.is_none() {
                    return Ok(());
                }
                self.check_writable()?;
                self.append(Kind::Delete, key, b"", None)?;
                if let Some(old) = shard.remove(&pos) {
                    self.retire(&old);
                }
                Ok(())
            }
        }
    }

    fn len(&self) -> usize {
        self.index.len()
    }

    fn expiring_len(&self) -> usize {
        self.index.expiring_len()
    }

    fn scan(&self, cursor: u64, count: usize, out: &mut Vec<(Bytes, Entry)>) -> u64 {
        let mut locs = Vec::new();
        let next = self.index.scan(cursor, count, &mut locs);
        // Values are read lazily by callers that need them (KEYS and SCAN only
        // look at keys and expiry), so hand out empty values here.
        out.extend(locs.into_iter().map(|(k, loc)| {
            (
                k,
                Entry {
                    value: Bytes::new(),
                    expires_at: loc.expires_at,
                },
            )
        }));
        next
    }

    fn expired(&self, now: u64, limit: usize) -> Vec<Bytes> {
        self.index.expired(now, limit)
    }

    fn random_key(&self) -> Option<Bytes> {
        self.index.random_key()
    }

    /// FLUSHALL: a clear record in a fresh segment, then every older segment goes.
    fn clear(&self) -> Result<(), StoreError> {
        self.check_writable()?;
        let _one = self.maintenance.lock();
        let mut shards = self.index.lock_all();
        let old_active = self.active.read().clone();
        self.rotate(&old_active, 0)?;
        self.append(Kind::Clear, b"", b"", None)?;
        self.flush_and_sync().map_err(|e| io_err("writing FLUSHALL", e))?;
        let active_id = self.active.read().id;
        let doomed: Vec<SegmentRef> = {
            let mut segs = self.segments.write();
            let ids: Vec<u64> = segs.keys().copied().filter(|&id| id != active_id).collect();
            ids.iter().filter_map(|id| segs.remove(id)).collect()
        };
        for shard in shards.iter_mut() {
            **shard = Default::default();
        }
        drop(shards);
        for seg in doomed {
            let _ = self.files.remove(&seg.path);
            let _ = self.files.remove(&self.dir.join(segment::hint_name(seg.id)));
        }
        self.sync_removals();
        Ok(())
    }

    fn used_bytes(&self) -> u64 {
        self.index.bytes()
    }

    fn flush(&self) -> Result<(), StoreError> {
        let active = self.active.read().clone();
        let result = active.flush().and_then(|()| {
            if self.fsync_policy() == Fsync::Always {
                // Writes acknowledged by this batch may sit in a segment sealed
                // since they were appended.
                self.sync_sealed()?;
                active.sync()
            } else {
                Ok(())
            }
        });
        result.map_err(|e| self.write_failed(e))
    }

    fn configure(&self, name: &str, config: &crate::config::Config) -> Result<(), String> {
        match name {
            "appendfsync" => self.set_fsync(config.appendfsync),
            "compact-dead-percent" => self
                .compact_percent
                .store(config.compact_dead_percent, Ordering::Relaxed),
            _ => {}
        }
        Ok(())
    }

    fn compact(&self) -> Result<(), StoreError> {
        let store = self.me.clone();
        std::thread::spawn(move || {
            if let Some(store) = store.upgrade() {
                // By hand, any dead space is worth reclaiming.
                if let Err(e) = store.compact_now(f64::MIN_POSITIVE) {
                    tracing::error!("compaction failed: {e}");
                }
            }
        });
        Ok(())
    }

    fn info(&self) -> Vec<(&'static str, String)> {
        let (live, total) = self.space();
        let c = self.compaction.lock().clone();
        let err = self.write_error.lock().clone();
        let (disk_total, disk_free) = disk_space(&self.dir).unwrap_or((0, 0));
        vec![
            ("kvd_storage_engine", "disk".into()),
            ("kvd_dir", self.dir.display().to_string()),
            // The file system holding the data directory: what clients (a
            // dictfs mount's statfs) can report as capacity.
            ("kvd_disk_total_bytes", disk_total.to_string()),
            ("kvd_disk_free_bytes", disk_free.to_string()),
            ("kvd_appendfsync", self.fsync_policy().name().into()),
            ("kvd_segments", self.segments.read().len().to_string()),
            ("kvd_live_bytes", live.to_string()),
            ("kvd_dead_bytes", total.saturating_sub(live).to_string()),
            ("kvd_compactions", c.runs.to_string()),
            ("kvd_compaction_in_progress", (c.in_progress as u8).to_string()),
            ("kvd_last_compaction_time", c.last_unix_secs.to_string()),
            (
                "kvd_last_compaction_reclaimed_bytes",
                c.last_reclaimed.to_string(),
            ),
            ("kvd_startup_ms", self.startup.millis.to_string()),
            (
                "kvd_startup_truncated_bytes",
                self.startup.truncated_bytes.to_string(),
            ),
            (
                "kvd_startup_skipped_bytes",
                self.startup.skipped_bytes.to_string(),
            ),
            (
                "aof_last_write_status",
                if err.is_some() { "err" } else { "ok" }.into(),
            ),
        ]
    }
}

/// Starts the store's two threads. `kvd-storage`: the `everysec` fsync (once a
/// second) and dropping dead segments. `kvd-compaction`: compaction proper,
/// every 5 s, on a thread of its own because copying a segment's live records
/// can take seconds, and the fsync must not wait behind it (a crash could then
/// lose more than the last second of writes).
fn start_threads(store: &Arc<DiskStore>) -> std::io::Result<()> {
    let mut last_sync = Instant::now();
    let mut last_logged: Option<Instant> = None;
    every_tick("kvd-storage", store, move |s| {
        if s.fsync_policy() == Fsync::EverySec && last_sync.elapsed() >= Duration::from_secs(1) {
            last_sync = Instant::now();
            if let Err(e) = s.flush_and_sync() {
                tracing::error!("background fsync failed: {e}");
                *s.write_error.lock() = Some(e.to_string());
            }
        }
        // It fails again at every tick while the disk does (a full disk), so
        // failures are logged at most every 5 s.
        match s.drop_dead_now() {
            Err(e) if last_logged.is_none_or(|t: Instant| t.elapsed() >= Duration::from_secs(5)) => {
                tracing::error!("dropping dead segments failed: {e}");
                last_logged = Some(Instant::now());
            }
            Err(_) => {}
            Ok(_) => last_logged = None,
        }
    })?;
    let mut last_run = Instant::now();
    every_tick("kvd-compaction", store, move |s| {
        if last_run.elapsed() >= Duration::from_secs(5) {
            let threshold = s.compact_percent.load(Ordering::Relaxed) as f64 / 100.0;
            if let Err(e) = s.compact_now(threshold) {
                tracing::error!("compaction failed: {e}");
            }
            last_run = Instant::now();
        }
    })
}

/// Runs `tick` every 100 ms on a thread named `name`, until the store is dropped.
fn every_tick(
    name: &str,
    store: &Arc<DiskStore>,
    mut tick: impl FnMut(&DiskStore) + Send + 'static,
) -> std::io::Result<()> {
    let store = Arc::downgrade(store);
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || loop {
            std::thread::sleep(Duration::from_millis(100));
            let Some(s) = store.upgrade() else {
                return;
            };
            if s.stop.load(Ordering::Relaxed) {
                return;
            }
            tick(&s);
        })?;
    Ok(())
}

impl Drop for DiskStore {
    /// A clean stop leaves everything durable, sealed segments still waiting
    /// for their background fsync included (only the active one was synced
    /// here before: with `everysec`, a power cut soon after a clean shutdown
    /// could lose a sealed segment's last writes).
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Err(e) = self
            .flush_and_sync()
            .and_then(|()| self.files.sync_dir(&self.dir))
        {
            tracing::error!("final flush failed: {e}");
        }
    }
}

/// Rebuilds the index from records, keeping the newest per key.
#[derive(Default)]
struct Recovery {
    /// Newest record per live key.
    latest: HashMap<Bytes, Loc>,
    /// Newest delete per key, so an older put read later does not resurrect it.
    deleted: HashMap<Bytes, u64>,
    clear_seq: u64,
    max_seq: u64,
    /// Delete and clear records per segment.
    tombstones: HashMap<u64, u64>,
    stats: StartupStats,
}

impl Recovery {
    fn apply(&mut self, segment: u64, offset: u64, h: record::Header, key: Bytes) {
        self.stats.records += 1;
        self.max_seq = self.max_seq.max(h.seq);
        if h.kind != Kind::Put {
            *self.tombstones.entry(segment).or_default() += 1;
        }
        match h.kind {
            Kind::Clear => self.clear_seq = self.clear_seq.max(h.seq),
            Kind::Delete => {
                if self.latest.get(&key).is_some_and(|l| l.seq < h.seq) {
                    self.latest.remove(&key);
                }
                let d = self.deleted.entry(key).or_insert(0);
                *d = (*d).max(h.seq);
            }
            Kind::Put => {
                if self.deleted.get(&key).is_some_and(|&d| d > h.seq) {
                    return;
                }
                if self.latest.get(&key).is_some_and(|l| l.seq >= h.seq) {
                    return;
                }
                let loc = Loc {
                    segment,
                    offset,
                    key_len: h.key_len,
                    value_len: h.value_len,
                    expires_at: h.expires_at,
                    seq: h.seq,
                };
                self.latest.insert(key, loc);
            }
        }
    }

    /// Reads every record of segment `id` (its file's bytes); returns where the
    /// valid data ends.
    fn scan(&mut self, id: u64, bytes: &[u8]) -> u64 {
        let mut offset = 0usize;
        while offset < bytes.len() {
            match record::parse(&bytes[offset..]) {
                Ok(h) => {
                    let key =
                        Bytes::copy_from_slice(&bytes[offset + HEADER..offset + HEADER + h.key_len as usize]);
                    self.apply(id, offset as u64, h, key);
                    offset += h.record_len() as usize;
                }
                Err(_) => match resync(bytes, offset + 1) {
                    // Damage with good records after it: skip the damaged bytes.
                    Some(next) => {
                        tracing::warn!(
                            segment = id,
                            offset,
                            bytes = next - offset,
                            "corrupt record skipped; later records are kept"
                        );
                        self.stats.skipped_bytes += (next - offset) as u64;
                        offset = next;
                    }
                    // Nothing valid after it: a torn tail.
                    None => return offset as u64,
                },
            }
        }
        bytes.len() as u64
    }

    /// Loads the surviving records into `index`; returns the highest sequence
    /// number seen.
    fn finish(self, index: &Index<Loc>, segments: &BTreeMap<u64, SegmentRef>) -> u64 {
        let now = now_ms();
        for (key, loc) in self.latest {
            if loc.seq < self.clear_seq || loc.expires_at.is_some_and(|t| t <= now) {
                continue;
            }
            if let Some(seg) = segments.get(&loc.segment) {
                seg.live.fetch_add(loc.record_len(), Ordering::Relaxed);
            }
            let pos = index.pos(&key);
            index.write(&pos).insert(&pos, loc);
        }
        self.max_seq
    }
}

/// Hint files: a sealed segment's records without their values, so start-up
/// reads a few bytes per key instead of every value.
///
/// ```text
/// "KVDHINT1" | segment length u64 | entries | CRC-32C of everything before it
/// entry: kind u8 | seq u64 | expires u64 | key len u32 | value len u32 | offset u64 | key
/// ```
mod hints {
    use super::*;

    pub struct HintEntry {
        pub offset: u64,
        pub header: record::Header,
        pub key: Bytes,
    }

    const MAGIC: &[u8; 8] = b"KVDHINT1";

    /// Writes the hint file of a sealed segment (atomically: temp file + rename).
    ///
    /// Reads the segment with buffered reads that skip over values, not through
    /// the map: touching every page of the map would count the whole segment in
    /// the process's resident memory.
    pub fn write(dir: &Path, seg: &Segment, files: &dyn Files) {
        if let Err(e) = try_write(dir, seg, files) {
            tracing::warn!(segment = seg.id, "could not write hint file: {e}");
        }
    }

    fn try_write(dir: &Path, seg: &Segment, files: &dyn Files) -> std::io::Result<()> {
        use std::io::{BufReader, Read};
        let len = std::fs::metadata(&seg.path)?.len();
        let mut reader = BufReader::with_capacity(256 * 1024, std::fs::File::open(&seg.path)?);
        let mut out = Vec::with_capacity(64 * 1024);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&len.to_le_bytes());
        let mut offset = 0u64;
        let mut head = [0u8; HEADER];
        let mut key = Vec::new();
        while offset + HEADER as u64 <= len {
            reader.read_exact(&mut head)?;
            // Only this process wrote the segment, and it was synced before this
            // runs; a header that does not parse ends the hints here, and the
            // segment (its hint being short) is scanned fully at start-up instead.
            let Ok(h) = record::parse_header(&head) else {
                return Ok(());
            };
            if offset + h.record_len() > len {
                return Ok(());
            }
            key.resize(h.key_len as usize, 0);
            reader.read_exact(&mut key)?;
            reader.seek_relative(h.value_len as i64)?;
            out.push(h.kind as u8);
            out.extend_from_slice(&h.seq.to_le_bytes());
            out.extend_from_slice(&h.expires_at.unwrap_or(0).to_le_bytes());
            out.extend_from_slice(&h.key_len.to_le_bytes());
            out.extend_from_slice(&h.value_len.to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
            out.extend_from_slice(&key);
            offset += h.record_len();
        }
        if offset != len {
            return Ok(());
        }
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        let path = dir.join(segment::hint_name(seg.id));
        let tmp = path.with_extension("hint.tmp");
        // A hint whose rename a power cut undoes is simply missing: start-up
        // then reads the segment itself. So no directory sync is needed here.
        let result = (|| {
            use std::io::Write;
            // A leftover from a write interrupted by a crash.
            let _ = std::fs::remove_file(&tmp);
            let mut file = files.create_new(&tmp)?;
            file.write_all(&out)?;
            files.sync(&tmp, &file)?;
            files.rename(&tmp, &path)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }

    /// Reads a hint file, if present, intact, and written for a segment of
    /// `segment_len` bytes.
    pub fn read(dir: &Path, id: u64, segment_len: u64) -> Option<Vec<HintEntry>> {
        let data = std::fs::read(dir.join(segment::hint_name(id))).ok()?;
        if data.len() < 20 || &data[..8] != MAGIC {
            return None;
        }
        let (body, crc) = data.split_at(data.len() - 4);
        if crc32c::crc32c(body) != u32::from_le_bytes(crc.try_into().ok()?) {
            tracing::warn!(segment = id, "hint file damaged; scanning the segment instead");
            return None;
        }
        if u64::from_le_bytes(body[8..16].try_into().ok()?) != segment_len {
            return None;
        }
        let mut entries = Vec::new();
        let mut at = 16;
        while at < body.len() {
            let fixed = body.get(at..at + 33)?;
            let kind = match fixed[0] {
                1 => Kind::Put,
                2 => Kind::Delete,
                3 => Kind::Clear,
                _ => return None,
            };
            let seq = u64::from_le_bytes(fixed[1..9].try_into().ok()?);
            let expires = u64::from_le_bytes(fixed[9..17].try_into().ok()?);
            let key_len = u32::from_le_bytes(fixed[17..21].try_into().ok()?);
            let value_len = u32::from_le_bytes(fixed[21..25].try_into().ok()?);
            let offset = u64::from_le_bytes(fixed[25..33].try_into().ok()?);
            let key = Bytes::copy_from_slice(body.get(at + 33..at + 33 + key_len as usize)?);
            at += 33 + key_len as usize;
            entries.push(HintEntry {
                offset,
                header: record::Header {
                    kind,
                    seq,
                    expires_at: (expires != 0).then_some(expires),
                    key_len,
                    value_len,
                },
                key,
            });
        }
        Some(entries)
    }
}

#[cfg(test)]
mod tests;

/// Size and space available to this process of the file system holding `dir`.
fn disk_space(dir: &Path) -> Option<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: a valid NUL-terminated path and a zeroed struct statvfs fills.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
        return None;
    }
    let frsize = st.f_frsize as u64;
    Some((st.f_blocks as u64 * frsize, st.f_bavail as u64 * frsize))
}
