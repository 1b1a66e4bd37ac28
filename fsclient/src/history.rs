//! Using a volume's history: named snapshots, resolving versions, comparing
//! them, and checking that everything a version needs is intact.
//!
//! Snapshots are a list kept under `<prefix>v:<volume>:snapshots` (one
//! `name hex` line per snapshot, sorted), changed only by compare-and-swap, so
//! two clients naming snapshots at once both succeed.

use std::collections::BTreeMap;

use crate::object::{Content, Dir, Entry, Hash};
use crate::store::{BlobStore, StoreError};
use crate::tree::{FsError, FsResult};
use crate::volume::Volume;

fn snapshots_key(v: &Volume) -> String {
    format!(
        "{}:snapshots",
        v.store.root_key(&v.name).trim_end_matches(":root")
    )
}

/// The named snapshots of a volume: name -> commit.
pub fn snapshots(v: &Volume) -> FsResult<BTreeMap<String, Hash>> {
    let raw = v.store.dict().get(&snapshots_key(v)).map_err(StoreError::from)?;
    parse_snapshots(v, raw.as_deref())
}

/// An encrypted volume's snapshot list starts with this byte (a plain list
/// starts with a name, which is never empty), then the list sealed as a blob
/// is ([`crate::codec`]): names are the user's words, kept from the store.
const SEALED_LIST: u8 = b'\n';

fn parse_snapshots(v: &Volume, raw: Option<&[u8]>) -> FsResult<BTreeMap<String, Hash>> {
    let text = match raw {
        Some([SEALED_LIST, sealed @ ..]) => v
            .store
            .codec()
            .open_trusted(bytes::Bytes::copy_from_slice(sealed))
            .map_err(|error| StoreError::Unreadable {
                key: snapshots_key(v),
                error,
            })?
            .to_vec(),
        Some(plain) => plain.to_vec(),
        None => Vec::new(),
    };
    let mut out = BTreeMap::new();
    for line in String::from_utf8_lossy(&text).lines() {
        let Some((name, hex)) = line.rsplit_once(' ') else {
            continue;
        };
        if let Some(h) = Hash::from_hex(hex) {
            out.insert(name.to_string(), h);
        }
    }
    Ok(out)
}

fn change_snapshots(v: &Volume, f: &dyn Fn(&mut BTreeMap<String, Hash>) -> FsResult<()>) -> FsResult<()> {
    let key = snapshots_key(v);
    for _ in 0..50 {
        let raw = v.store.dict().get(&key).map_err(StoreError::from)?;
        let mut list = parse_snapshots(v, raw.as_deref())?;
        f(&mut list)?;
        let text: String = list.iter().map(|(n, h)| format!("{n} {}\n", h.hex())).collect();
        let value = match v.store.codec() {
            crate::codec::Codec::Plain => text.into_bytes(),
            sealing => [&[SEALED_LIST][..], &sealing.seal(text.into()).stored].concat(),
        };
        if v.store
            .dict()
            .compare_and_swap(&key, raw.as_deref(), &value)
            .map_err(StoreError::from)?
        {
            return Ok(());
        }
    }
    Err(FsError::Io(std::io::Error::other("snapshot list kept changing")))
}

/// Names the current commit (or `commit`) `name`.
pub fn create_snapshot(v: &Volume, name: &str, commit: Option<Hash>) -> FsResult<Hash> {
    if name.is_empty() || name.contains(char::is_whitespace) || name.contains('/') {
        return Err(FsError::Invalid);
    }
    let commit = match commit {
        Some(c) => c,
        None => v.head()?.0,
    };
    change_snapshots(v, &|list| {
        if list.contains_key(name) {
            return Err(FsError::Exists);
        }
        list.insert(name.to_string(), commit);
        Ok(())
    })?;
    Ok(commit)
}

pub fn delete_snapshot(v: &Volume, name: &str) -> FsResult<()> {
    change_snapshots(v, &|list| list.remove(name).map(|_| ()).ok_or(FsError::NotFound))
}

/// A version: `HEAD`, `HEAD~N` (N commits back), a snapshot name, or a commit's
/// full hex hash.
pub fn resolve(v: &Volume, version: &str) -> FsResult<Hash> {
    if let Some(back) = version.strip_prefix("HEAD") {
        let steps: usize = match back.strip_prefix('~') {
            Some(n) => n.parse().map_err(|_| FsError::Invalid)?,
            None if back.is_empty() => 0,
            None => return Err(FsError::Invalid),
        };
        let log = v.log(steps + 1)?;
        return log.get(steps).map(|(h, _)| *h).ok_or(FsError::NotFound);
    }
    if let Some(h) = snapshots(v)?.get(version) {
        return Ok(*h);
    }
    Hash::from_hex(version).ok_or(FsError::NotFound)
}

/// One difference between two trees.
#[derive(Debug, PartialEq, Eq)]
pub enum Change {
    Added(String),
    Removed(String),
    Modified(String),
}

/// The paths that differ between two root directories. Subtrees with the same
/// hash are skipped without being read, so the cost follows the size of the
/// change, not of the tree.
pub fn diff(store: &BlobStore, a: Hash, b: Hash) -> FsResult<Vec<Change>> {
    let mut out = Vec::new();
    diff_dirs(store, a, b, "", &mut out)?;
    Ok(out)
}

fn diff_dirs(store: &BlobStore, a: Hash, b: Hash, path: &str, out: &mut Vec<Change>) -> FsResult<()> {
    if a == b {
        return Ok(());
    }
    // A part present on both sides holds the same entries on both, and a name
    // lives in exactly one part per side, so only the other parts need reading.
    let (pa, pb) = (store.dir_parts(&a)?, store.dir_parts(&b)?);
    let shared: std::collections::HashSet<Hash> = pa.iter().filter(|h| pb.contains(h)).copied().collect();
    let read = |parts: &[Hash]| -> FsResult<Dir> {
        let mut dir = Dir::new();
        for part in parts.iter().filter(|h| !shared.contains(h)) {
            dir.extend(store.dir(part)?);
        }
        Ok(dir)
    };
    let (da, db) = (read(&pa)?, read(&pb)?);
    let names: std::collections::BTreeSet<&Vec<u8>> = da.keys().chain(db.keys()).collect();
    for name in names {
        let p = format!("{path}/{}", String::from_utf8_lossy(name));
        match (da.get(name), db.get(name)) {
            // An access time alone is no change.
            (Some(x), Some(y)) if x.same_but_atime(y) => {}
            (
                Some(Entry {
                    content: Content::Dir { tree: ta },
                    ..
                }),
                Some(Entry {
                    content: Content::Dir { tree: tb },
                    ..
                }),
            ) => diff_dirs(store, *ta, *tb, &p, out)?,
            (Some(_), Some(_)) => out.push(Change::Modified(p)),
            (Some(_), None) => out.push(Change::Removed(p)),
            (None, Some(_)) => out.push(Change::Added(p)),
            (None, None) => {}
        }
    }
    Ok(())
}

/// For each commit, whether its files are still stored: garbage collection
/// keeps every commit record but lets the files of old ones go (their root
/// directory is then missing). One round trip; a store that cannot tell says
/// every commit is whole.
pub fn whole(store: &BlobStore, commits: &[crate::object::Commit]) -> Vec<bool> {
    let keys: Vec<String> = commits.iter().map(|c| store.blob_key(&c.root)).collect();
    match store.dict().sizes(&keys) {
        Ok(sizes) => sizes.iter().map(Option::is_some).collect(),
        Err(_) => vec![true; commits.len()],
    }
}

/// What `fsck` found.
#[derive(Debug, Default)]
pub struct Check {
    pub blobs: u64,
    pub bytes: u64,
    /// (path, problem) for everything that cannot be read back intact.
    pub damaged: Vec<(String, String)>,
}

/// Reads every blob stored under the store's prefix and checks it against its
/// name (the SHA-256 of its bytes), reporting damage by key. It reads no tree,
/// so it needs no key: what a store's keeper can check of an encrypted volume.
pub fn verify_blobs(store: &BlobStore) -> Result<Check, StoreError> {
    let mut check = Check::default();
    let prefix = format!("{}b:", store.prefix());
    let dict = store.dict();
    dict.scan_prefix(&prefix, &mut |keys| {
        for (key, value) in keys.iter().zip(dict.get_many(&keys)?) {
            // Gone since the scan listed it (a collection): nothing to check.
            let Some(value) = value else { continue };
            check.blobs += 1;
            check.bytes += value.len() as u64;
            let named = key.strip_prefix(&prefix).and_then(Hash::from_hex);
            if named != Some(Hash::of(&value)) {
                check
                    .damaged
                    .push((key.clone(), "its content does not match its hash".into()));
            }
        }
        Ok(())
    })?;
    Ok(check)
}

/// Reads every blob reachable from `root` and checks it (presence, hash,
/// format, sizes), reporting damage by path and carrying on past it. A blob
/// shared by several paths is read once; if it is damaged, every path that
/// needs it is reported.
pub fn fsck(store: &BlobStore, tree: crate::links::Tree) -> Check {
    let mut walk = Walk {
        store,
        check: Check::default(),
        verdicts: std::collections::HashMap::new(),
        inodes: Default::default(),
    };
    match crate::links::load(store, tree.inodes) {
        Ok(inodes) => {
            walk.check.blobs += tree.inodes.is_some() as u64;
            walk.inodes = inodes;
        }
        Err(e) => walk
            .check
            .damaged
            .push(("(inode table: every hard-linked file)".into(), e.to_string())),
    }
    walk.dir(tree.root, "/");
    walk.check
}

struct Walk<'a> {
    store: &'a BlobStore,
    check: Check,
    /// Directories and files already checked: `None` if intact, else the problem.
    verdicts: std::collections::HashMap<Hash, Option<String>>,
    inodes: crate::object::Inodes,
}

impl Walk<'_> {
    fn dir(&mut self, tree: Hash, path: &str) {
        if let Some(verdict) = self.verdicts.get(&tree) {
            if let Some(problem) = verdict.clone() {
                self.check.damaged.push((path.to_string(), problem));
            }
            return;
        }
        let dir: Dir = match self.store.dir(&tree) {
            Ok(d) => d,
            Err(e) => {
                self.verdicts.insert(tree, Some(e.to_string()));
                self.check.damaged.push((path.to_string(), e.to_string()));
                return;
            }
        };
        self.verdicts.insert(tree, None);
        self.check.blobs += 1;
        for (name, e) in dir {
            let p = format!(
                "{}/{}",
                path.trim_end_matches('/'),
                String::from_utf8_lossy(&name)
            );
            let e = match e.content {
                Content::Inode { id } if !self.inodes.contains_key(&id) => {
                    let problem = format!("hard link to inode {id}, which is not in the inode table");
                    self.check.damaged.push((p, problem));
                    continue;
                }
                _ => crate::links::resolve(&self.inodes, e),
            };
            match e.content {
                Content::Dir { tree } => self.dir(tree, &p),
                Content::File { manifest, size } => self.file(manifest, size, &p),
                Content::Symlink { .. } | Content::Fifo | Content::Device { .. } | Content::Inode { .. } => {}
            }
        }
    }

    fn file(&mut self, manifest: Hash, size: u64, path: &str) {
        let verdict = match self.verdicts.get(&manifest) {
            Some(v) => v.clone(),
            None => {
                let v = self.read_file(manifest, size).err().map(|e| e.to_string());
                self.verdicts.insert(manifest, v.clone());
                v
            }
        };
        if let Some(problem) = verdict {
            self.check.damaged.push((path.to_string(), problem));
        }
    }

    fn read_file(&mut self, manifest: Hash, size: u64) -> Result<(), StoreError> {
        let store = self.store;
        let m = store.manifest(&manifest)?;
        self.check.blobs += 1;
        if m.size() != size {
            return Err(StoreError::Corrupt {
                key: store.blob_key(&manifest),
            });
        }
        for (h, len) in &m.chunks {
            let data = store.chunk(h)?;
            if data.len() != *len as usize {
                return Err(StoreError::Corrupt {
                    key: store.blob_key(h),
                });
            }
            self.check.blobs += 1;
            self.check.bytes += data.len() as u64;
        }
        Ok(())
    }
}

/// What `fsclient stats` reports about one version.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Stats {
    /// Bytes of file content, counting every name (as `du --apparent-size -l`).
    pub logical_bytes: u64,
    /// Bytes of the distinct blobs the version needs (what it costs to store).
    pub stored_bytes: u64,
    pub files: u64,
    pub dirs: u64,
    pub chunks: u64,
    pub chunk_bytes: u64,
    pub manifests: u64,
    /// Directory blobs (parts and indexes of large directories included).
    pub dir_blobs: u64,
    pub hard_linked_files: u64,
}

/// Walks a version, counting each distinct blob once.
pub fn stats(store: &BlobStore, tree: crate::links::Tree) -> Result<Stats, crate::tree::FsError> {
    use std::collections::HashSet;
    let mut s = Stats::default();
    let mut seen: HashSet<Hash> = HashSet::new();
    let inodes = crate::links::load(store, tree.inodes)?;
    if let Some(h) = tree.inodes {
        s.stored_bytes += store.get(&h)?.len() as u64;
        s.hard_linked_files = inodes.len() as u64;
    }
    let mut todo = vec![tree.root];
    while let Some(dir) = todo.pop() {
        let parts = store.dir_parts(&dir)?;
        if parts != [dir] && seen.insert(dir) {
            // The index of a large directory.
            s.dir_blobs += 1;
            s.stored_bytes += store.get(&dir)?.len() as u64;
        }
        for part in parts {
            if seen.insert(part) {
                s.dir_blobs += 1;
                s.stored_bytes += store.get(&part)?.len() as u64;
            }
        }
        for e in store.dir(&dir)?.into_values() {
            match crate::links::resolve(&inodes, e).content {
                Content::Dir { tree } => {
                    s.dirs += 1;
                    todo.push(tree);
                }
                Content::File { manifest, size } => {
                    s.files += 1;
                    s.logical_bytes += size;
                    if seen.insert(manifest) {
                        s.manifests += 1;
                        s.stored_bytes += store.get(&manifest)?.len() as u64;
                        for (h, len) in store.manifest(&manifest)?.chunks {
                            if seen.insert(h) {
                                s.chunks += 1;
                                s.chunk_bytes += len as u64;
                                // A chunk blob is its bytes and a 2-byte header.
                                s.stored_bytes += len as u64 + 2;
                            }
                        }
                    }
                }
                _ => {}
            }
        }
    }
    Ok(s)
}
