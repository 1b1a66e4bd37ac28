//! File system operations as pure functions on immutable trees.
//!
//! Every operation takes the hash of a root directory and returns the hash of a
//! new one; only the directories on the changed path are rewritten (path
//! copying), everything else is shared by hash. Nothing here knows about FUSE,
//! volumes or commits.

use std::io::{Read, Write};

use crate::object::{self, Content, Dir, Entry, Hash, Manifest, Meta, Time};
use crate::store::{BlobStore, StoreError};

/// Errors with the errno a Linux file system would give.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("No such file or directory")]
    NotFound,
    #[error("File exists")]
    Exists,
    #[error("Not a directory")]
    NotDir,
    #[error("Is a directory")]
    IsDir,
    #[error("Directory not empty")]
    NotEmpty,
    #[error("File name too long")]
    NameTooLong,
    #[error("Invalid argument")]
    Invalid,
    #[error("Operation not permitted")]
    NotPermitted,
    #[error("No data available")]
    NoData,
    #[error("Numerical result out of range")]
    Range,
    #[error("Operation not supported")]
    NotSupported,
    #[error("Bad file descriptor")]
    BadHandle,
    #[error("Stale file handle")]
    Stale,
    #[error("Read-only file system")]
    ReadOnly,
    #[error("Input/output error: {0}")]
    Store(#[from] StoreError),
    #[error("Input/output error: {0}")]
    Io(#[from] std::io::Error),
}

impl FsError {
    /// The errno Linux file systems return for this error.
    pub fn errno(&self) -> i32 {
        match self {
            FsError::NotFound => 2,
            FsError::Exists => 17,
            FsError::NotDir => 20,
            FsError::IsDir => 21,
            FsError::NotEmpty => 39,
            FsError::NameTooLong => 36,
            FsError::Invalid => 22,
            FsError::NotPermitted => 1,
            FsError::NoData => 61,
            FsError::Range => 34,
            FsError::NotSupported => 95,
            FsError::BadHandle => 9,
            FsError::Stale => 116,
            FsError::ReadOnly => 30,
            // A full store is a full disk to the writer.
            FsError::Store(StoreError::Dict(crate::dict::DictError::Full(_))) => 28,
            FsError::Store(_) | FsError::Io(_) => 5,
        }
    }
}

pub type FsResult<T> = Result<T, FsError>;

/// Chunking parameters: content-defined, so an edit changes only nearby chunks.
#[derive(Clone, Copy, Debug)]
pub struct Chunking {
    pub min: u32,
    pub avg: u32,
    pub max: u32,
}

impl Default for Chunking {
    /// 1 MiB on average, between 256 KiB and 4 MiB.
    fn default() -> Self {
        Chunking {
            min: 256 * 1024,
            avg: 1024 * 1024,
            max: 4 * 1024 * 1024,
        }
    }
}

impl Chunking {
    /// Checks the bounds FastCDC accepts (and min < avg < max).
    pub fn validate(self) -> Result<Chunking, String> {
        use fastcdc::v2020::{AVERAGE_MAX, AVERAGE_MIN, MAXIMUM_MAX, MAXIMUM_MIN, MINIMUM_MAX, MINIMUM_MIN};
        let ok = (MINIMUM_MIN..=MINIMUM_MAX).contains(&self.min)
            && (AVERAGE_MIN..=AVERAGE_MAX).contains(&self.avg)
            && (MAXIMUM_MIN..=MAXIMUM_MAX).contains(&self.max)
            && self.min < self.avg
            && self.avg < self.max;
        if ok {
            Ok(self)
        } else {
            Err(format!(
                "bad chunk sizes min={} avg={} max={}: need {MINIMUM_MIN} <= min <= {MINIMUM_MAX}, \
                 {AVERAGE_MIN} <= avg <= {AVERAGE_MAX}, {MAXIMUM_MIN} <= max <= {MAXIMUM_MAX}, min < avg < max",
                self.min, self.avg, self.max
            ))
        }
    }

    /// The text kept in a volume's config key: `min=N avg=N max=N`.
    pub fn to_config(self) -> String {
        format!("min={} avg={} max={}", self.min, self.avg, self.max)
    }

    pub fn from_config(text: &str) -> Result<Chunking, String> {
        let mut c = Chunking::default();
        for field in text.split_whitespace() {
            let (k, v) = field
                .split_once('=')
                .ok_or_else(|| format!("bad volume config field '{field}'"))?;
            let slot = match k {
                "min" => &mut c.min,
                "avg" => &mut c.avg,
                "max" => &mut c.max,
                // Other settings (encryption: crate::volume_key; those of
                // later versions) are not the chunker's.
                _ => continue,
            };
            *slot = v
                .parse()
                .map_err(|_| format!("bad volume config value '{field}'"))?;
        }
        c.validate()
    }
}

/// Splits a path like `/a/b/c` into its names, checking each.
pub fn split_path(path: &str) -> FsResult<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    for part in path.split('/').filter(|p| !p.is_empty() && *p != ".") {
        if part == ".." {
            return Err(FsError::Invalid);
        }
        if part.len() > 255 {
            return Err(FsError::NameTooLong);
        }
        out.push(part.as_bytes().to_vec());
    }
    Ok(out)
}

pub fn empty_dir(store: &BlobStore) -> FsResult<Hash> {
    Ok(store.put(object::encode_dir(&Dir::new()))?)
}

/// Metadata for something new, owned by this process's user.
pub fn new_meta(mode: u32) -> Meta {
    let now = Time::now();
    Meta {
        mode,
        uid: current_uid(),
        gid: current_gid(),
        mtime: now,
        ctime: now,
        atime: None,
        xattrs: Default::default(),
    }
}

fn current_uid() -> u32 {
    std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
        .unwrap_or(0)
}

fn current_gid() -> u32 {
    std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::gid(&m))
        .unwrap_or(0)
}

/// The entry at `path` (`None` for the root itself, which has no entry).
pub fn lookup(store: &BlobStore, root: Hash, path: &[Vec<u8>]) -> FsResult<Option<Entry>> {
    let mut dir = root;
    for (i, name) in path.iter().enumerate() {
        let entries = store.dir(&dir)?;
        let entry = entries.get(name).ok_or(FsError::NotFound)?;
        if i + 1 == path.len() {
            return Ok(Some(entry.clone()));
        }
        match &entry.content {
            Content::Dir { tree } => dir = *tree,
            _ => return Err(FsError::NotDir),
        }
    }
    Ok(None)
}

/// The directory listing at `path`.
pub fn list(store: &BlobStore, root: Hash, path: &[Vec<u8>]) -> FsResult<Dir> {
    match lookup(store, root, path)? {
        None => Ok(store.dir(&root)?),
        Some(Entry {
            content: Content::Dir { tree },
            ..
        }) => Ok(store.dir(&tree)?),
        Some(_) => Err(FsError::NotDir),
    }
}

/// Replaces the entry named by the last component of `path` with what `f`
/// returns (`None` removes it), rewriting the directories above it. The parent
/// must exist. Each rewritten directory's mtime/ctime is set to now.
pub fn update(
    store: &BlobStore,
    root: Hash,
    path: &[Vec<u8>],
    f: &mut dyn FnMut(Option<&Entry>) -> FsResult<Option<Entry>>,
) -> FsResult<Hash> {
    let Some((name, rest)) = path.split_first() else {
        return Err(FsError::Invalid); // the root itself cannot be replaced
    };
    let mut dir = store.dir(&root)?;
    if rest.is_empty() {
        match f(dir.get(name))? {
            Some(e) => {
                dir.insert(name.clone(), e);
            }
            None => {
                dir.remove(name);
            }
        }
    } else {
        let child = dir.get_mut(name).ok_or(FsError::NotFound)?;
        let Content::Dir { tree } = child.content else {
            return Err(FsError::NotDir);
        };
        let new_tree = update(store, tree, rest, f)?;
        if new_tree == tree {
            return Ok(root);
        }
        child.content = Content::Dir { tree: new_tree };
        if rest.len() == 1 {
            // The child directory's own listing changed.
            let now = Time::now();
            child.meta.mtime = now;
            child.meta.ctime = now;
        }
    }
    Ok(store.put_dir(&dir)?)
}

pub fn mkdir(store: &BlobStore, root: Hash, path: &[Vec<u8>], mode: u32) -> FsResult<Hash> {
    let tree = empty_dir(store)?;
    update(store, root, path, &mut |e| match e {
        Some(_) => Err(FsError::Exists),
        None => Ok(Some(Entry {
            meta: new_meta(mode),
            content: Content::Dir { tree },
        })),
    })
}

/// The lengths of the chunks `data` is cut into (for measuring the chunker).
pub fn chunk_boundaries(data: &[u8], chunking: Chunking) -> impl Iterator<Item = usize> + '_ {
    fastcdc::v2020::FastCDC::new(data, chunking.min, chunking.avg, chunking.max).map(|c| c.length)
}

/// Chunks `data` (streamed: memory stays bounded by a chunk and a batch) and
/// stores it; returns the manifest's hash and the size.
pub fn store_data(store: &BlobStore, data: impl Read, chunking: Chunking) -> FsResult<(Hash, u64)> {
    let mut manifest = Manifest::default();
    let mut batch = Vec::new();
    let mut batch_bytes = 0usize;
    let chunker = fastcdc::v2020::StreamCDC::new(data, chunking.min, chunking.avg, chunking.max);
    for chunk in chunker {
        let chunk = chunk.map_err(|e| FsError::Io(std::io::Error::other(e.to_string())))?;
        let blob = object::encode_chunk(&chunk.data);
        // Named when its batch is sealed (below).
        manifest.chunks.push((Hash([0; 32]), chunk.length as u32));
        batch_bytes += blob.len();
        batch.push(blob);
        if batch_bytes >= 16 * 1024 * 1024 {
            seal_into(store, &mut manifest, std::mem::take(&mut batch))?;
            batch_bytes = 0;
        }
    }
    seal_into(store, &mut manifest, batch)?;
    let size = manifest.size();
    Ok((store.put(object::encode_manifest(&manifest))?, size))
}

/// Seals the last `batch.len()` chunks of `manifest`, names them there, and
/// hands them to the uploads.
fn seal_into(store: &BlobStore, manifest: &mut Manifest, batch: Vec<bytes::Bytes>) -> FsResult<()> {
    let sealed = store.seal_many(batch);
    let first = manifest.chunks.len() - sealed.len();
    for (place, blob) in manifest.chunks[first..].iter_mut().zip(&sealed) {
        place.0 = blob.hash;
    }
    store.put_sealed_behind(sealed)?;
    Ok(())
}

/// A new file entry holding `data` (stored).
pub fn file_entry(store: &BlobStore, data: impl Read, mode: u32, chunking: Chunking) -> FsResult<Entry> {
    let (manifest, size) = store_data(store, data, chunking)?;
    Ok(Entry {
        meta: new_meta(mode),
        content: Content::File { manifest, size },
    })
}

/// Stores a directory built in memory; returns its entry.
pub fn dir_entry(store: &BlobStore, dir: &Dir, mode: u32) -> FsResult<Entry> {
    Ok(Entry {
        meta: new_meta(mode),
        content: Content::Dir {
            tree: store.put_dir(dir)?,
        },
    })
}

/// Adds (or replaces) many entries in the directory at `dir_path` with one
/// rewrite of it, instead of one per entry.
pub fn insert_many(store: &BlobStore, root: Hash, dir_path: &[Vec<u8>], entries: Dir) -> FsResult<Hash> {
    if dir_path.is_empty() {
        let mut dir = store.dir(&root)?;
        dir.extend(entries);
        return Ok(store.put_dir(&dir)?);
    }
    update(store, root, dir_path, &mut |e| match e {
        Some(Entry {
            content: Content::Dir { tree },
            meta,
        }) => {
            let mut dir = store.dir(tree)?;
            dir.extend(entries.clone());
            let mut meta = meta.clone();
            let now = Time::now();
            meta.mtime = now;
            meta.ctime = now;
            Ok(Some(Entry {
                meta,
                content: Content::Dir {
                    tree: store.put_dir(&dir)?,
                },
            }))
        }
        Some(_) => Err(FsError::NotDir),
        None => Err(FsError::NotFound),
    })
}

/// Creates or replaces the regular file at `path` with `data`.
pub fn write_file(
    store: &BlobStore,
    root: Hash,
    path: &[Vec<u8>],
    data: impl Read,
    mode: u32,
    chunking: Chunking,
) -> FsResult<Hash> {
    let (manifest, size) = store_data(store, data, chunking)?;
    update(store, root, path, &mut |e| match e {
        Some(Entry {
            content: Content::Dir { .. },
            ..
        }) => Err(FsError::IsDir),
        Some(old) => {
            let mut meta = old.meta.clone();
            let now = Time::now();
            meta.mtime = now;
            meta.ctime = now;
            Ok(Some(Entry {
                meta,
                content: Content::File { manifest, size },
            }))
        }
        None => Ok(Some(Entry {
            meta: new_meta(mode),
            content: Content::File { manifest, size },
        })),
    })
}

/// Writes a file's content to `out`, fetching chunks a few at a time.
pub fn read_file(store: &BlobStore, manifest: &Hash, mut out: impl Write) -> FsResult<u64> {
    let m = store.manifest(manifest)?;
    let mut written = 0u64;
    for group in m.chunks.chunks(8) {
        let hashes: Vec<Hash> = group.iter().map(|(h, _)| *h).collect();
        let blobs = store.get_many(&hashes)?;
        for (blob, (h, len)) in blobs.into_iter().zip(group) {
            let data = object::decode_chunk(&blob).map_err(|error| StoreError::Malformed {
                key: store.blob_key(h),
                error,
            })?;
            if data.len() != *len as usize {
                return Err(StoreError::Corrupt {
                    key: store.blob_key(h),
                }
                .into());
            }
            out.write_all(&data)?;
            written += data.len() as u64;
        }
    }
    Ok(written)
}

/// A whole file's content, for small files and tests.
pub fn read_to_vec(store: &BlobStore, manifest: &Hash) -> FsResult<Vec<u8>> {
    let mut v = Vec::new();
    read_file(store, manifest, &mut v)?;
    Ok(v)
}

/// Removes a non-directory.
pub fn unlink(store: &BlobStore, root: Hash, path: &[Vec<u8>]) -> FsResult<Hash> {
    update(store, root, path, &mut |e| match e {
        None => Err(FsError::NotFound),
        Some(Entry {
            content: Content::Dir { .. },
            ..
        }) => Err(FsError::IsDir),
        Some(_) => Ok(None),
    })
}

/// Removes an empty directory.
pub fn rmdir(store: &BlobStore, root: Hash, path: &[Vec<u8>]) -> FsResult<Hash> {
    let empty = store.empty_dir_name();
    update(store, root, path, &mut |e| match e {
        None => Err(FsError::NotFound),
        Some(Entry {
            content: Content::Dir { tree },
            ..
        }) if *tree == empty => Ok(None),
        Some(Entry {
            content: Content::Dir { .. },
            ..
        }) => Err(FsError::NotEmpty),
        Some(_) => Err(FsError::NotDir),
    })
}

/// Removes `path` and everything below it.
pub fn remove_all(store: &BlobStore, root: Hash, path: &[Vec<u8>]) -> FsResult<Hash> {
    update(store, root, path, &mut |e| match e {
        None => Err(FsError::NotFound),
        Some(_) => Ok(None),
    })
}

/// Moves `from` to `to`, replacing `to` as rename(2) does: a file may replace a
/// file, a directory an empty directory; a directory cannot move into itself.
pub fn rename(store: &BlobStore, root: Hash, from: &[Vec<u8>], to: &[Vec<u8>]) -> FsResult<Hash> {
    if from.is_empty() || to.is_empty() {
        return Err(FsError::Invalid);
    }
    if from == to {
        lookup(store, root, from)?.ok_or(FsError::NotFound)?;
        return Ok(root);
    }
    if to.len() > from.len() && to[..from.len()] == *from {
        return Err(FsError::Invalid);
    }
    let moving = lookup(store, root, from)?.ok_or(FsError::NotFound)?;
    let moving_is_dir = matches!(moving.content, Content::Dir { .. });
    let empty = store.empty_dir_name();
    let without = update(store, root, from, &mut |_| Ok(None))?;
    update(store, without, to, &mut |target| {
        match (target.map(|t| &t.content), moving_is_dir) {
            (None, _) => {}
            (Some(Content::Dir { tree }), true) if *tree == empty => {}
            (Some(Content::Dir { .. }), true) => return Err(FsError::NotEmpty),
            (Some(Content::Dir { .. }), false) => return Err(FsError::IsDir),
            (Some(_), true) => return Err(FsError::NotDir),
            (Some(_), false) => {}
        }
        let mut e = moving.clone();
        e.meta.ctime = Time::now();
        Ok(Some(e))
    })
}

pub fn symlink(store: &BlobStore, root: Hash, path: &[Vec<u8>], target: &[u8]) -> FsResult<Hash> {
    update(store, root, path, &mut |e| match e {
        Some(_) => Err(FsError::Exists),
        None => Ok(Some(Entry {
            meta: new_meta(0o777),
            content: Content::Symlink {
                target: target.to_vec(),
            },
        })),
    })
}

/// Changes an entry's metadata with `f`.
pub fn set_meta(
    store: &BlobStore,
    root: Hash,
    path: &[Vec<u8>],
    f: &mut dyn FnMut(&mut Meta),
) -> FsResult<Hash> {
    update(store, root, path, &mut |e| {
        let mut e = e.ok_or(FsError::NotFound)?.clone();
        f(&mut e.meta);
        e.meta.ctime = Time::now();
        Ok(Some(e))
    })
}

/// Bytes as a UTF-8-lossy display string, for messages.
pub fn show(name: &[u8]) -> String {
    String::from_utf8_lossy(name).into_owned()
}
