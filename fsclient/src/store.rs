//! Blobs and root pointers on top of a [`Dict`]: key naming, verification of
//! every blob read against its key, and an immutable-blob cache.
//!
//! Keys (readable in redis-cli): a blob is `<prefix>b:<64 hex of SHA-256>`, a
//! volume's root pointer `<prefix>v:<volume>:root`, holding the hex hash of the
//! volume's current commit.

use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;

use crate::codec::{Codec, CodecError, Sealed};
use crate::dict::{Dict, DictError};
use crate::object::{self, Commit, Dir, FormatError, Hash, Manifest};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Dict(#[from] DictError),
    #[error("blob {key} is missing from the store")]
    Missing { key: String },
    #[error("blob {key} is corrupt: its content does not match its hash")]
    Corrupt { key: String },
    #[error("blob {key} cannot be read: {error}")]
    Unreadable { key: String, error: CodecError },
    #[error("blob {key} is malformed: {error}")]
    Malformed { key: String, error: FormatError },
    #[error("volume '{0}' does not exist (create it with `fsclient mkfs`)")]
    NoVolume(String),
    #[error("volume root pointer is malformed: {0}")]
    BadRoot(String),
}

pub type StoreResult<T> = Result<T, StoreError>;

/// A least-recently-used cache of immutable blobs, bounded by total bytes.
/// Blobs never change, so a cached blob is never stale: reads may always use
/// it. Whether a cached blob is still *stored* is another matter (a garbage
/// collection may have deleted it since): [`BlobStore::put_known`] trusts
/// only entries cached since the last collection this client saw.
struct Cache {
    limit: usize,
    used: usize,
    /// Each blob with the [`Cache::era`] it was cached in.
    lru: lru::LruCache<Hash, (Bytes, u64)>,
    /// Counts the collections this client has seen (each seen by a lease).
    era: u64,
}

impl Cache {
    fn get(&mut self, h: &Hash) -> Option<Bytes> {
        self.lru.get(h).map(|(b, _)| b.clone())
    }

    /// Whether `h` is cached and was stored since the last collection seen.
    fn known_stored(&mut self, h: &Hash) -> bool {
        let era = self.era;
        self.lru.get(h).is_some_and(|(_, e)| *e == era)
    }

    fn insert(&mut self, h: Hash, b: Bytes) {
        // A blob bigger than a quarter of the cache would evict too much.
        if b.len() > self.limit / 4 || self.lru.contains(&h) {
            return;
        }
        self.used += b.len();
        self.lru.put(h, (b, self.era));
        while self.used > self.limit {
            let Some((_, (old, _))) = self.lru.pop_lru() else {
                break;
            };
            self.used -= old.len();
        }
    }
}

/// Leases blobs (see [`crate::lease`]); if a collection ran since the
/// last lease, empties the cache, whose blobs may no longer be stored.
fn lease<'h>(
    dict: &dyn Dict,
    leases: &crate::lease::Leases,
    cache: &Mutex<Cache>,
    kind: crate::lease::Kind,
    hashes: impl IntoIterator<Item = &'h Hash>,
) -> Result<(), DictError> {
    let mut records = Vec::new();
    for h in hashes {
        crate::lease::record(kind, h, &mut records);
    }
    if records.is_empty() {
        return Ok(());
    }
    if leases.protect(dict, &records)? {
        // What was cached before may have been collected since: no longer
        // trusted as stored (still good to read: blobs never change).
        cache.lock().era += 1;
    }
    Ok(())
}

/// Directories with more entries than this are split into parts.
pub const SPLIT_ABOVE: usize = 1024;

/// Whether a part of a large directory ends after `name`: about one name in 256,
/// decided by the name alone (salted by the tree level), so the same entries always
/// split the same way, whatever order they were added in. An encrypted volume
/// decides with a keyed hash ([`Codec::split_hash`]), so the sizes of a
/// directory's parts do not tell which names it holds.
fn boundary(codec: &Codec, name: &[u8], level: u8) -> bool {
    let mut salted = Vec::with_capacity(name.len() + 1);
    salted.push(level);
    salted.extend_from_slice(name);
    codec.split_hash(&salted)[0] == 0
}

/// Names of sealed tree blobs remembered ([`BlobStore::put_known`]).
const SEALED_NAMES: usize = 4096;

/// An empty memory of sealed names.
fn sealed_names() -> Arc<Mutex<lru::LruCache<Hash, Hash>>> {
    Arc::new(Mutex::new(lru::LruCache::new(
        std::num::NonZeroUsize::new(SEALED_NAMES).expect("not zero"),
    )))
}

/// Below this many bytes, blobs are sealed or opened on the calling thread.
const PARALLEL_BYTES: usize = 2 << 20;

/// `f` over `items` on up to every core, in contiguous groups; results in order.
fn on_cores<T: Send, U: Send>(items: Vec<T>, f: impl Fn(T) -> U + Sync) -> Vec<U> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per = items.len().div_ceil(cores.max(1)).max(1);
    let mut groups: Vec<Vec<T>> = Vec::new();
    let mut rest = items.into_iter();
    loop {
        let group: Vec<T> = rest.by_ref().take(per).collect();
        if group.is_empty() {
            break;
        }
        groups.push(group);
    }
    let f = &f;
    std::thread::scope(|s| {
        let running: Vec<_> = groups
            .into_iter()
            .map(|group| s.spawn(move || group.into_iter().map(f).collect::<Vec<U>>()))
            .collect();
        running
            .into_iter()
            .flat_map(|r| r.join().expect("a sealing thread panicked"))
            .collect()
    })
}

#[derive(Clone)]
pub struct BlobStore {
    dict: Arc<dyn Dict>,
    prefix: String,
    /// Plain or encrypted: what blobs become in the store ([`crate::codec`]).
    codec: Arc<Codec>,
    /// Plain blobs, by name.
    cache: Arc<Mutex<Cache>>,
    /// An encrypted volume's names of tree blobs sealed lately, by the
    /// SHA-256 of their plain bytes ([`BlobStore::put_known`]).
    sealed_names: Arc<Mutex<lru::LruCache<Hash, Hash>>>,
    behind: Arc<crate::write_behind::WriteBehind>,
    leases: Arc<crate::lease::Leases>,
    fetching: Arc<Mutex<std::collections::HashMap<Hash, Arc<Flight>>>>,
    /// Blob reads answered from memory (the cache, or an upload not yet
    /// stored) and from the store.
    hits: Arc<std::sync::atomic::AtomicU64>,
    misses: Arc<std::sync::atomic::AtomicU64>,
}

/// A store's figures for the metrics ([`crate::metrics`]).
pub struct StoreStats {
    pub cache_hits: u64,
    pub cache_misses: u64,
    pub upload_failures: u64,
    pub uploads_pending_bytes: usize,
    pub uploads_failing: bool,
}

/// A fetch in progress, which others wanting the same blob wait for.
#[derive(Default)]
struct Flight {
    /// `Some(Some(blob))` when fetched, `Some(None)` when that failed.
    done: Mutex<Option<Option<Bytes>>>,
    cv: parking_lot::Condvar,
}

impl BlobStore {
    pub fn new(dict: Arc<dyn Dict>, prefix: &str, cache_bytes: usize) -> Self {
        let cache = Arc::new(Mutex::new(Cache {
            limit: cache_bytes,
            used: 0,
            lru: lru::LruCache::unbounded(),
            era: 0,
        }));
        let leases = Arc::new(crate::lease::Leases::new(prefix));
        // The uploader leases each round before sending it: one round trip
        // for everything a commit stores, instead of one per blob put.
        let hook: crate::write_behind::LeaseHook = {
            let (dict, cache, leases) = (dict.clone(), cache.clone(), leases.clone());
            Arc::new(move |hashes: &[Hash]| {
                lease(&*dict, &leases, &cache, crate::lease::Kind::Blob, hashes.iter())
            })
        };
        BlobStore {
            dict,
            prefix: prefix.to_string(),
            codec: Arc::default(),
            cache,
            sealed_names: sealed_names(),
            behind: Arc::new(crate::write_behind::WriteBehind::with_lease(hook)),
            leases,
            fetching: Default::default(),
            hits: Default::default(),
            misses: Default::default(),
        }
    }

    /// Cache hits and misses since start, and the uploads' state.
    pub fn stats(&self) -> StoreStats {
        use std::sync::atomic::Ordering::Relaxed;
        let (pending, failures, failing) = self.behind.stats();
        StoreStats {
            cache_hits: self.hits.load(Relaxed),
            cache_misses: self.misses.load(Relaxed),
            upload_failures: failures,
            uploads_pending_bytes: pending,
            uploads_failing: failing,
        }
    }

    /// The same store, sealing and opening blobs with `codec` (an encrypted
    /// volume's keys). Set before the store is shared: clones made earlier keep
    /// the codec they had.
    pub fn with_codec(mut self, codec: Codec) -> Self {
        self.codec = Arc::new(codec);
        self.sealed_names = sealed_names();
        self
    }

    pub fn codec(&self) -> &Codec {
        &self.codec
    }

    /// A blob's stored form and name ([`Codec::seal`]).
    pub fn seal(&self, plain: Bytes) -> Sealed {
        self.codec.seal(plain)
    }

    /// Seals many blobs ([`BlobStore::seal`]), in order; an encrypted
    /// volume's on every core when there is enough of them (sealing costs an
    /// HMAC, the cipher and the name's SHA-256 over each byte, where a plain
    /// blob costs the SHA-256 alone, which one core keeps up with: measured).
    pub fn seal_many(&self, blobs: Vec<Bytes>) -> Vec<Sealed> {
        let bytes: usize = blobs.iter().map(Bytes::len).sum();
        if !self.codec.is_encrypted() || bytes < PARALLEL_BYTES {
            return blobs.into_iter().map(|b| self.seal(b)).collect();
        }
        on_cores(blobs, |b| self.codec.seal(b))
    }

    /// The name a blob is stored under.
    pub fn name_of(&self, plain: &[u8]) -> Hash {
        self.codec.name(plain)
    }

    /// The name of the empty directory (which every new directory starts as).
    pub fn empty_dir_name(&self) -> Hash {
        self.name_of(&object::encode_dir(&Dir::new()))
    }

    /// The name of the empty file's manifest.
    pub fn empty_manifest_name(&self) -> Hash {
        self.name_of(&object::encode_manifest(&Manifest::default()))
    }

    /// Turns bytes read from the store under `h` back into the blob.
    pub fn open(&self, h: &Hash, stored: Bytes) -> StoreResult<Bytes> {
        self.codec.open(h, stored).map_err(|error| {
            let key = self.blob_key(h);
            if error == CodecError::Corrupt {
                tracing::error!(%key, "blob content does not match its hash");
                return StoreError::Corrupt { key };
            }
            tracing::error!(%key, "blob cannot be read: {error}");
            StoreError::Unreadable { key, error }
        })
    }

    /// A blob from the uploads not yet acknowledged (sealed here).
    fn pending(&self, h: &Hash) -> Option<Bytes> {
        let stored = self.behind.get(h)?;
        self.codec.open_trusted(stored).ok()
    }

    pub fn dict(&self) -> &Arc<dyn Dict> {
        &self.dict
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Leases blobs against garbage collection before they are uploaded or
    /// relied on (see [`crate::lease`]). If a collection ran since the
    /// last lease, what the cache holds is no longer trusted as stored (see
    /// [`Cache`]); it is still read from.
    pub fn protect<'h>(
        &self,
        kind: crate::lease::Kind,
        hashes: impl IntoIterator<Item = &'h Hash>,
    ) -> StoreResult<()> {
        Ok(lease(&*self.dict, &self.leases, &self.cache, kind, hashes)?)
    }

    /// Starts a commit: the blobs leased so far are for it (see
    /// [`crate::lease::Leases::seal`]); pass the answer to
    /// [`BlobStore::release_leases`] after the root swap.
    pub fn seal_leases(&self) -> u64 {
        self.leases.seal()
    }

    /// After a successful root swap: what the commit references is reachable
    /// now, and needs no lease.
    pub fn release_leases(&self, sealed: u64) -> StoreResult<()> {
        Ok(self.leases.release(self.dict.as_ref(), sealed)?)
    }

    pub fn blob_key(&self, h: &Hash) -> String {
        format!("{}b:{}", self.prefix, h.hex())
    }

    pub fn root_key(&self, volume: &str) -> String {
        format!("{}v:{}:root", self.prefix, volume)
    }

    /// Stores an encoded blob (if absent) and returns its hash. Like every
    /// put, it is handed to the uploader ([`crate::write_behind`]): readable
    /// through this store at once, in the store (leased first) by the next
    /// [`BlobStore::flush_writes`], which every root swap waits for. A tree
    /// blob (a directory, a manifest, a commit) is kept in the cache too:
    /// it is read again soon.
    pub fn put(&self, blob: Bytes) -> StoreResult<Hash> {
        self.put_sealed(self.seal(blob))
    }

    fn put_sealed(&self, blob: Sealed) -> StoreResult<Hash> {
        let h = blob.hash;
        self.cache.lock().insert(h, blob.plain);
        self.behind
            .put(&self.dict, vec![(h, self.blob_key(&h), blob.stored)])?;
        Ok(h)
    }

    /// Stores many encoded blobs (see [`BlobStore::put`]), uploaded in as
    /// few round trips as their size allows.
    pub fn put_many(&self, blobs: Vec<Bytes>) -> StoreResult<Vec<Hash>> {
        self.put_many_behind(blobs)
    }

    /// Reads a blob and checks it against its hash. A mismatch is an error naming
    /// the key, logged, never bytes returned as good.
    pub fn get(&self, h: &Hash) -> StoreResult<Bytes> {
        use std::sync::atomic::Ordering::Relaxed;
        if let Some(b) = self.cache.lock().get(h).or_else(|| self.pending(h)) {
            self.hits.fetch_add(1, Relaxed);
            return Ok(b);
        }
        self.misses.fetch_add(1, Relaxed);
        // One fetch per blob at a time: a reader that wants a chunk the
        // read-ahead is already fetching waits for it instead of fetching and
        // hashing it again.
        let (flight, leader) = {
            let mut fetching = self.fetching.lock();
            match fetching.get(h) {
                Some(f) => (f.clone(), false),
                None => {
                    let f = Arc::new(Flight::default());
                    fetching.insert(*h, f.clone());
                    (f, true)
                }
            }
        };
        if !leader {
            let mut done = flight.done.lock();
            while done.is_none() {
                flight.cv.wait(&mut done);
            }
            if let Some(Some(b)) = done.as_ref() {
                return Ok(b.clone());
            }
            // The other fetch failed: fetch ourselves, for our own error.
            return self.fetch(h);
        }
        let result = self.fetch(h);
        *flight.done.lock() = Some(result.as_ref().ok().cloned());
        flight.cv.notify_all();
        self.fetching.lock().remove(h);
        result
    }

    fn fetch(&self, h: &Hash) -> StoreResult<Bytes> {
        let key = self.blob_key(h);
        let stored = self.dict.get(&key)?.ok_or_else(|| {
            tracing::error!(%key, "blob missing");
            StoreError::Missing { key: key.clone() }
        })?;
        let blob = self.open(h, stored)?;
        self.cache.lock().insert(*h, blob.clone());
        Ok(blob)
    }

    /// Stores encoded blobs in the background (see [`crate::write_behind`]):
    /// readable at once through this store, in the store itself after
    /// [`BlobStore::flush_writes`]. Returns their hashes.
    pub fn put_many_behind(&self, blobs: Vec<Bytes>) -> StoreResult<Vec<Hash>> {
        let sealed = self.seal_many(blobs);
        self.put_sealed_behind(sealed)
    }

    /// [`BlobStore::put_many_behind`] for blobs the caller has just sealed
    /// ([`BlobStore::seal`]: hashing is the most expensive part of writing,
    /// and is done where the caller's threads are).
    pub fn put_sealed_behind(&self, blobs: Vec<Sealed>) -> StoreResult<Vec<Hash>> {
        let hashes = blobs.iter().map(|b| b.hash).collect();
        {
            // Small blobs just written (manifests, small files) are likely read
            // again soon, and stay readable while the store is away. Big chunks
            // are not kept: a large write would only churn the cache (and the
            // allocator: measured, peak memory doubles writing 1.5 GiB).
            let mut cache = self.cache.lock();
            for b in blobs.iter().filter(|b| b.plain.len() <= 64 << 10) {
                cache.insert(b.hash, b.plain.clone());
            }
        }
        let batch = blobs
            .into_iter()
            .map(|b| (b.hash, self.blob_key(&b.hash), b.stored))
            .collect();
        self.behind.put(&self.dict, batch)?;
        Ok(hashes)
    }

    /// Waits until every blob stored in the background is in the store.
    pub fn flush_writes(&self) -> StoreResult<()> {
        Ok(self.behind.flush()?)
    }

    /// The store's error while background uploads are being refused.
    pub fn upload_failing(&self) -> Option<DictError> {
        self.behind.failing()
    }

    /// Whether a blob is in the memory cache (a read of it costs no round trip).
    pub fn is_cached(&self, h: &Hash) -> bool {
        self.cache.lock().lru.contains(h)
    }

    /// Reads many blobs in one round trip (those not cached), in order.
    pub fn get_many(&self, hashes: &[Hash]) -> StoreResult<Vec<Bytes>> {
        let mut out: Vec<Option<Bytes>> = hashes
            .iter()
            .map(|h| self.cache.lock().get(h).or_else(|| self.pending(h)))
            .collect();
        let missing: Vec<usize> = (0..hashes.len()).filter(|&i| out[i].is_none()).collect();
        let keys: Vec<String> = missing.iter().map(|&i| self.blob_key(&hashes[i])).collect();
        let fetched = self.dict.get_many(&keys)?;
        let mut stored = Vec::with_capacity(missing.len());
        for ((&i, key), blob) in missing.iter().zip(keys).zip(fetched) {
            stored.push((i, blob.ok_or(StoreError::Missing { key })?));
        }
        // Checked (and decrypted) on every core when there is enough of it.
        let bytes: usize = stored.iter().map(|(_, b)| b.len()).sum();
        let open = |(i, b): (usize, Bytes)| self.open(&hashes[i], b).map(|b| (i, b));
        let opened: Vec<StoreResult<(usize, Bytes)>> = if bytes < PARALLEL_BYTES {
            stored.into_iter().map(open).collect()
        } else {
            on_cores(stored, open)
        };
        for opened in opened {
            let (i, blob) = opened?;
            self.cache.lock().insert(hashes[i], blob.clone());
            out[i] = Some(blob);
        }
        Ok(out.into_iter().map(|b| b.expect("filled above")).collect())
    }

    fn malformed(&self, h: &Hash, error: FormatError) -> StoreError {
        let key = self.blob_key(h);
        tracing::error!(%key, "malformed blob: {error}");
        StoreError::Malformed { key, error }
    }

    /// A whole directory, read through its index if it is a large one.
    pub fn dir(&self, h: &Hash) -> StoreResult<Dir> {
        let blob = self.get(h)?;
        match object::split(&blob).map_err(|e| self.malformed(h, e))?.0 {
            object::Tag::DirIndex => {
                let children = object::decode_dir_index(&blob).map_err(|e| self.malformed(h, e))?;
                let mut dir = Dir::new();
                for child in children {
                    dir.extend(self.dir(&child.blob)?);
                }
                Ok(dir)
            }
            _ => object::decode_dir(&blob).map_err(|e| self.malformed(h, e)),
        }
    }

    /// The blobs holding a directory's entries: itself if it is one blob, else
    /// the parts under its index (reading only the index blobs).
    pub fn dir_parts(&self, h: &Hash) -> StoreResult<Vec<Hash>> {
        let blob = self.get(h)?;
        match object::split(&blob).map_err(|e| self.malformed(h, e))?.0 {
            object::Tag::DirIndex => {
                let mut parts = Vec::new();
                for child in object::decode_dir_index(&blob).map_err(|e| self.malformed(h, e))? {
                    if child.level == 0 {
                        parts.push(child.blob);
                    } else {
                        parts.extend(self.dir_parts(&child.blob)?);
                    }
                }
                Ok(parts)
            }
            _ => Ok(vec![*h]),
        }
    }

    /// Stores a directory: one blob up to [`SPLIT_ABOVE`] entries, else a tree of
    /// parts under index blobs (docs/FORMAT.md, "Large directories"). The same
    /// entries always give the same blobs, so after a change only the parts that
    /// changed are new; parts already known to be stored are not sent again.
    pub fn put_dir(&self, dir: &Dir) -> StoreResult<Hash> {
        if dir.len() <= SPLIT_ABOVE {
            return self.put(object::encode_dir(dir));
        }
        let mut level: Vec<object::IndexChild> = Vec::new();
        let mut part = Dir::new();
        let entries: Vec<_> = dir.iter().collect();
        for (i, (name, entry)) in entries.iter().enumerate() {
            part.insert((*name).clone(), (*entry).clone());
            if boundary(&self.codec, name, 0) || i + 1 == entries.len() {
                let first = part.keys().next().cloned().expect("part is not empty");
                let blob = self.put_known(object::encode_dir(&std::mem::take(&mut part)))?;
                level.push(object::IndexChild {
                    first,
                    blob,
                    level: 0,
                });
            }
        }
        let mut depth = 1;
        while level.len() > SPLIT_ABOVE {
            let mut next = Vec::new();
            let mut group: Vec<object::IndexChild> = Vec::new();
            let n = level.len();
            for (i, child) in level.into_iter().enumerate() {
                let cut = boundary(&self.codec, &child.first, depth);
                group.push(child);
                if (cut && group.len() >= 2) || i + 1 == n {
                    let group = std::mem::take(&mut group);
                    next.push(if group.len() == 1 {
                        group.into_iter().next().expect("one child")
                    } else {
                        object::IndexChild {
                            first: group[0].first.clone(),
                            blob: self.put_known(object::encode_dir_index(&group))?,
                            level: depth,
                        }
                    });
                }
            }
            level = next;
            depth += 1;
        }
        if level.len() == 1 {
            return Ok(level[0].blob);
        }
        self.put_known(object::encode_dir_index(&level))
    }

    /// Like [`BlobStore::put`], skipping the store when the blob is cached (and so
    /// known to be stored already).
    fn put_known(&self, blob: Bytes) -> StoreResult<Hash> {
        // A commit stores every part of a large directory again, most of them
        // unchanged. A plain part's name costs one SHA-256; sealing an
        // encrypted one costs three passes, so its name is remembered by the
        // SHA-256 of its plain bytes (measured: creating 10,000 files in one
        // directory of an encrypted mount ran at 0.41 of a plain one's).
        let plain = self.codec.is_encrypted().then(|| Hash::of(&blob));
        let remembered = plain.and_then(|p| self.sealed_names.lock().get(&p).copied());
        let (h, sealed) = match remembered {
            Some(h) => (h, None),
            None => {
                let sealed = self.seal(blob.clone());
                if let Some(p) = plain {
                    self.sealed_names.lock().put(p, sealed.hash);
                }
                (sealed.hash, Some(sealed))
            }
        };
        // Leased first: the lease is what makes the cache's word trustworthy.
        self.protect(crate::lease::Kind::Blob, [&h])?;
        if self.cache.lock().known_stored(&h) {
            return Ok(h);
        }
        self.put_sealed(sealed.unwrap_or_else(|| self.seal(blob)))
    }

    pub fn manifest(&self, h: &Hash) -> StoreResult<Manifest> {
        object::decode_manifest(&self.get(h)?).map_err(|e| self.malformed(h, e))
    }

    pub fn commit(&self, h: &Hash) -> StoreResult<Commit> {
        object::decode_commit(&self.get(h)?).map_err(|e| self.malformed(h, e))
    }

    pub fn chunk(&self, h: &Hash) -> StoreResult<Bytes> {
        object::decode_chunk(&self.get(h)?).map_err(|e| self.malformed(h, e))
    }

    /// The current commit of a volume, if the volume exists.
    pub fn root(&self, volume: &str) -> StoreResult<Option<Hash>> {
        let Some(raw) = self.dict.get(&self.root_key(volume))? else {
            return Ok(None);
        };
        let text = std::str::from_utf8(&raw).map_err(|_| StoreError::BadRoot("not text".into()))?;
        Hash::from_hex(text)
            .map(Some)
            .ok_or_else(|| StoreError::BadRoot(text.to_string()))
    }

    /// Swaps a volume's root from `expected` to `new`; false if someone else
    /// swapped it first. Waits first until every blob handed over is in the
    /// store: no root ever names a blob still on its way (or refused).
    pub fn swap_root(&self, volume: &str, expected: Option<Hash>, new: Hash) -> StoreResult<bool> {
        self.flush_writes()?;
        let expected = expected.map(|h| h.hex());
        Ok(self.dict.compare_and_swap(
            &self.root_key(volume),
            expected.as_deref().map(str::as_bytes),
            new.hex().as_bytes(),
        )?)
    }
}
