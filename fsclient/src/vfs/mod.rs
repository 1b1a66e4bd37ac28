//! A live, writable view of a volume with inode numbers and open handles: what
//! a mount needs, without any FUSE types (the adapter in [`crate::mount`]
//! translates).
//!
//! The view is a tree of nodes loaded on demand from the volume's current
//! commit. Changes are made to the nodes (a dirty overlay; file bytes go to a
//! per-file overlay, see [`file`]) and become one commit when [`Vfs::commit`]
//! runs: on fsync, on close of a written file, and every commit interval. A
//! commit that loses the root swap is merged ([`crate::merge`]) and the view
//! adopts the merged tree, keeping the inode numbers of everything that is
//! still there. Other clients' commits are adopted by [`Vfs::sync`].
//!
//! Locking: one mutex guards the node table (`State`); each file's bytes have
//! their own mutex, always taken after the state's, never before. Reads copy
//! what they need and fetch chunks with no lock held; uploads of a file's
//! bytes hold only that file's lock.
//!
//! Invariants:
//! - a directory node is `dirty` if its listing or any entry below it changed
//!   since its `tree` was stored; a dirty directory's parent is dirty too, so a
//!   commit walks only dirty directories;
//! - a node is in its parent's `children` exactly when `linked`; an unlinked
//!   node lives on only while the kernel remembers it or a handle is open.

pub mod file;
mod offer;
mod prefetch;
mod recycle;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use crate::links::{self, Tree};
use crate::object::{self, Content, Dir, Entry, Hash, Inodes, Meta, Time};
use crate::store::BlobStore;
use crate::tree::{self, Chunking, FsError, FsResult};
use crate::volume::Volume;
use file::FileData;
pub use offer::{CacheOffer, Kept};

/// An inode number, as the kernel sees it. Never reused within a mount.
pub type Ino = u64;
/// The root directory's inode number (FUSE's).
pub const ROOT: Ino = 1;
/// Read-only views of old versions in the root directory: every named
/// snapshot, and the latest commits by time.
pub const VIEWS: [&[u8]; 2] = [b".snapshots", b".history"];
/// Commits listed in `.history`.
pub const HISTORY_LEN: usize = 100;

/// `2026-11-25T07:50:01Z` for a time (UTC), for `.history`.
fn utc_name(t: Time) -> String {
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
    let days = t.secs.div_euclid(86_400);
    let secs = t.secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// Longest name a directory entry may have (as on Linux).
pub const NAME_MAX: usize = 255;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Fifo,
    CharDevice,
    BlockDevice,
    Socket,
}

/// What `stat` shows.
#[derive(Clone, Debug)]
pub struct Attr {
    pub ino: Ino,
    pub kind: Kind,
    pub size: u64,
    /// Permission bits, with setuid/setgid/sticky.
    pub perm: u16,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: Time,
    pub ctime: Time,
    pub atime: Time,
    /// A device's number (0 for everything else).
    pub rdev: u64,
}

/// Who is asking (new files are theirs).
#[derive(Clone, Copy, Debug)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
}

#[derive(Clone, Copy, Debug)]
pub enum TimeSet {
    Now,
    At(Time),
}

/// The changes of a `setattr`; `None` leaves a field alone.
#[derive(Clone, Debug, Default)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<TimeSet>,
    pub mtime: Option<TimeSet>,
    pub ctime: Option<Time>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RenameMode {
    /// rename(2): replace the target if there is one.
    Replace,
    /// RENAME_NOREPLACE: fail with EEXIST if the target exists.
    NoReplace,
    /// RENAME_EXCHANGE: swap the two, which must both exist.
    Exchange,
}

/// Something the kernel may have cached that another client's commit changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Invalidate {
    /// The name in a directory now means something else (or nothing).
    Entry { parent: Ino, name: Vec<u8> },
    /// A node's attributes or content changed.
    Inode(Ino),
}

/// When the store was asked its (total, free) bytes, and what it said.
type Capacity = (std::time::Instant, Option<(u64, u64)>);

/// One line of a directory listing.
#[derive(Clone, Debug)]
pub struct DirEntry {
    pub ino: Ino,
    pub kind: Kind,
    pub name: Vec<u8>,
}

#[derive(Clone, Copy, Debug)]
pub struct Statfs {
    pub block_size: u32,
    pub blocks: u64,
    pub blocks_free: u64,
    pub files: u64,
    pub files_free: u64,
}

#[derive(Clone, Debug)]
pub struct Options {
    pub chunking: Chunking,
    /// Commit when a handle that wrote is closed (close-to-open consistency
    /// across machines); otherwise such writes wait for the interval.
    pub commit_on_close: bool,
    /// A file's unstored bytes past this are cut into chunks and stored (not
    /// yet committed), so memory stays bounded however large the file.
    pub spill_bytes: usize,
    /// Chunks fetched ahead of a sequential reader (8 read a cold 1 GiB
    /// file about 25% faster than 4 here, 16 no faster than 8).
    pub readahead_chunks: usize,
    pub readahead_threads: usize,
    /// Keep access times with Linux's `relatime` rules (`false`: `noatime`,
    /// and an entry's access time shows its last recorded one or its mtime).
    pub relatime: bool,
    /// Bytes of writes the mount holds in memory, over all its files, before
    /// a writer is refused with the store's error while the store refuses
    /// uploads (ENOSPC for a full store). Each file also spills past
    /// `spill_bytes`; this bounds many small files, each under that.
    pub held_bytes: usize,
    /// The page size of the cache that offers go to (the kernel's): an offer
    /// also carries the whole pages at its chunk's edges, which the kernel
    /// keeps only whole ([`offer::Fringes`]).
    pub cache_page: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            chunking: Chunking::default(),
            commit_on_close: true,
            spill_bytes: 64 << 20,
            readahead_chunks: 8,
            readahead_threads: 4,
            held_bytes: 256 << 20,
            relatime: true,
            cache_page: offer::system_page_size(),
        }
    }
}

enum Body {
    Dir(DirNode),
    /// A regular file: its stored manifest and size until someone reads or
    /// writes it, then its bytes.
    File {
        manifest: Hash,
        size: u64,
        data: Option<Arc<Mutex<FileData>>>,
    },
    Symlink(Vec<u8>),
    Fifo,
    Device(object::DeviceKind, u64),
}

struct DirNode {
    /// The stored directory this node was loaded from or last committed as.
    tree: Hash,
    /// Children by name, once loaded.
    children: Option<BTreeMap<Vec<u8>, Ino>>,
    dirty: bool,
    /// How many children are directories (for nlink), once counted; reset
    /// whenever a directory child comes or goes.
    subdirs: Option<u32>,
}

struct Node {
    parent: Ino,
    name: Vec<u8>,
    meta: Meta,
    body: Body,
    /// How many times the kernel was told of this node and not yet told to forget.
    lookups: u64,
    /// Open handles.
    open: u32,
    /// Open handles that may write (see [`offer`]).
    writers: u32,
    linked: bool,
    /// For a file with several names (hard links): its inode id, and how
    /// many names it has. Its entry then lives in the inode table.
    link: Option<u64>,
    nlink: u32,
    /// Part of a read-only view of an old version (`.snapshots`, `.history`):
    /// that version's inode table. Names of its hard-linked files resolve to
    /// their entries but are separate nodes (they show their link count).
    old: Option<Arc<Inodes>>,
}

impl Node {
    fn kind(&self) -> Kind {
        match self.body {
            Body::Dir(_) => Kind::Dir,
            Body::File { .. } => Kind::File,
            Body::Symlink(_) => Kind::Symlink,
            Body::Fifo => Kind::Fifo,
            Body::Device(kind, _) => device_kind(kind),
        }
    }

    fn dir(&mut self) -> FsResult<&mut DirNode> {
        match &mut self.body {
            Body::Dir(d) => Ok(d),
            _ => Err(FsError::NotDir),
        }
    }
}

fn kind_of(content: &Content) -> Kind {
    match content {
        Content::File { .. } => Kind::File,
        Content::Dir { .. } => Kind::Dir,
        Content::Symlink { .. } => Kind::Symlink,
        // What it is is in the inode table; an inode is never a directory.
        Content::Fifo | Content::Inode { .. } => Kind::Fifo,
        Content::Device { kind, .. } => device_kind(*kind),
    }
}

fn device_kind(kind: object::DeviceKind) -> Kind {
    match kind {
        object::DeviceKind::Char => Kind::CharDevice,
        object::DeviceKind::Block => Kind::BlockDevice,
        object::DeviceKind::Socket => Kind::Socket,
    }
}

struct Handle {
    ino: Ino,
    append: bool,
    /// Opened for writing.
    writes: bool,
    wrote: bool,
    /// A directory handle's listing, taken when reading starts, so offsets
    /// stay meaningful while the directory changes.
    listing: Option<Arc<Vec<DirEntry>>>,
}

struct State {
    nodes: HashMap<Ino, Node>,
    next_ino: Ino,
    /// The commit the view is based on, and its tree.
    base_commit: Hash,
    base: Tree,
    /// That commit's inode table (entries of inodes not loaded as nodes).
    inodes: Inodes,
    /// Nodes of hard-linked files, by inode id.
    links: HashMap<u64, Ino>,
    /// Whether anything changed since `base_commit`.
    dirty: bool,
    /// Files written since their bytes were last stored (a hint for commit).
    dirty_files: HashSet<Ino>,
    handles: HashMap<u64, Handle>,
    next_fh: u64,
    /// Collected while adopting other clients' commits, for the kernel.
    invalidations: Vec<Invalidate>,
    /// The root's read-only views of old versions, once looked at.
    views: HashMap<&'static [u8], View>,
}

/// A view of old versions (`.snapshots`, `.history`).
struct View {
    ino: Ino,
    listed: std::time::Instant,
    /// The commit each child node shows.
    commits: HashMap<Ino, Hash>,
}

pub struct Vfs {
    volume: Volume,
    opts: Options,
    state: Mutex<State>,
    /// One commit at a time.
    commit_lock: Mutex<()>,
    /// Held while bytes offered to the kernel's cache are kept ([`offer`]).
    cache_gate: Mutex<()>,
    /// The edges of chunks offered lately, to complete the pages offers
    /// share with their neighbours.
    fringes: Mutex<offer::Fringes>,
    /// The store's capacity when last asked.
    capacity: Mutex<Option<Capacity>>,
    prefetch: prefetch::Prefetcher,
    /// Bytes of writes held in memory by all files ([`Options::held_bytes`]).
    held: Arc<std::sync::atomic::AtomicUsize>,
    metrics: Arc<crate::metrics::Metrics>,
}

fn check_name(name: &[u8]) -> FsResult<()> {
    if name.len() > NAME_MAX {
        return Err(FsError::NameTooLong);
    }
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') || name.contains(&0) {
        return Err(FsError::Invalid);
    }
    Ok(())
}

/// How long reads of a file skip checking its access time after one did.
const ATIME_RECHECK: std::time::Duration = std::time::Duration::from_secs(60);

/// Linux's `relatime`: an access updates the access time only if it is not
/// later than the last modification or change, or is a day old.
fn relatime_due(meta: &Meta, now: Time) -> bool {
    let atime = meta.atime();
    atime <= meta.mtime || atime <= meta.ctime || now.secs - atime.secs >= 24 * 3600
}

fn now_meta(meta: &mut Meta) {
    let now = Time::now();
    meta.mtime = now;
    meta.ctime = now;
}

impl State {
    fn node(&self, ino: Ino) -> FsResult<&Node> {
        self.nodes.get(&ino).ok_or(FsError::Stale)
    }

    fn node_mut(&mut self, ino: Ino) -> FsResult<&mut Node> {
        self.nodes.get_mut(&ino).ok_or(FsError::Stale)
    }

    fn add_node(&mut self, parent: Ino, name: Vec<u8>, entry: Entry) -> Ino {
        if let Some(old) = self.nodes.get(&parent).and_then(|p| p.old.clone()) {
            let nlink = match entry.content {
                Content::Inode { id } => old.get(&id).map_or(1, |(_, n)| *n),
                _ => 1,
            };
            let ino = self.add_plain(parent, name, links::resolve(&old, entry));
            let node = self.nodes.get_mut(&ino).expect("just added");
            node.old = Some(old);
            node.nlink = nlink;
            return ino;
        }
        let Content::Inode { id } = entry.content else {
            return self.add_plain(parent, name, entry);
        };
        // Every name of a hard-linked file is the same node.
        if let Some(&ino) = self.links.get(&id) {
            if self.nodes.contains_key(&ino) {
                return ino;
            }
        }
        let nlink = self.inodes.get(&id).map_or(1, |(_, n)| *n);
        let ino = self.add_plain(parent, name, links::resolve(&self.inodes, entry));
        let node = self.nodes.get_mut(&ino).expect("just added");
        node.link = Some(id);
        node.nlink = nlink;
        self.links.insert(id, ino);
        ino
    }

    fn add_plain(&mut self, parent: Ino, name: Vec<u8>, entry: Entry) -> Ino {
        let ino = self.next_ino;
        self.next_ino += 1;
        let body = match entry.content {
            Content::File { manifest, size } => Body::File {
                manifest,
                size,
                data: None,
            },
            Content::Dir { tree } => Body::Dir(DirNode {
                tree,
                children: None,
                dirty: false,
                subdirs: None,
            }),
            Content::Symlink { target } => Body::Symlink(target),
            Content::Fifo | Content::Inode { .. } => Body::Fifo,
            Content::Device { kind, rdev } => Body::Device(kind, rdev),
        };
        self.nodes.insert(
            ino,
            Node {
                parent,
                name,
                meta: entry.meta,
                body,
                lookups: 0,
                open: 0,
                writers: 0,
                linked: true,
                link: None,
                nlink: 1,
                old: None,
            },
        );
        ino
    }

    /// Loads a directory's children (reading its blobs) if not loaded yet.
    fn load(&mut self, store: &BlobStore, ino: Ino) -> FsResult<()> {
        let d = self.node_mut(ino)?.dir()?;
        if d.children.is_some() {
            return Ok(());
        }
        let tree = d.tree;
        let entries = store.dir(&tree)?;
        let mut children = BTreeMap::new();
        for (name, entry) in entries {
            let child = self.add_node(ino, name.clone(), entry);
            children.insert(name, child);
        }
        self.node_mut(ino)?.dir()?.children = Some(children);
        Ok(())
    }

    fn children(&mut self, store: &BlobStore, ino: Ino) -> FsResult<&mut BTreeMap<Vec<u8>, Ino>> {
        self.load(store, ino)?;
        Ok(self
            .node_mut(ino)?
            .dir()?
            .children
            .as_mut()
            .expect("loaded above"))
    }

    /// Whether `ino` may go where something of the other kind is expected to
    /// go (unlink/rmdir, and the target of a rename): a directory only for a
    /// directory, and only if empty.
    fn removable_as(&mut self, store: &BlobStore, ino: Ino, as_dir: bool) -> FsResult<()> {
        match (self.node(ino)?.kind() == Kind::Dir, as_dir) {
            (true, false) => Err(FsError::IsDir),
            (false, true) => Err(FsError::NotDir),
            (true, true) if !self.children(store, ino)?.is_empty() => Err(FsError::NotEmpty),
            _ => Ok(()),
        }
    }

    /// Records a node's new place after a rename.
    fn place(&mut self, ino: Ino, parent: Ino, name: &[u8]) -> FsResult<()> {
        let node = self.node_mut(ino)?;
        node.parent = parent;
        node.name = name.to_vec();
        node.meta.ctime = Time::now();
        Ok(())
    }

    /// A read of `ino`'s content (a file read, a directory listed): its
    /// access time moves to now if `relatime` says so. The change rides in
    /// the next commit; it is never a commit of its own, and never a
    /// change of the ctime. Views of old versions are left alone.
    fn accessed(&mut self, ino: Ino) {
        let Ok(node) = self.node_mut(ino) else { return };
        let now = Time::now();
        if node.old.is_some() || !relatime_due(&node.meta, now) {
            return;
        }
        node.meta.atime = Some(now);
        self.entry_changed(ino);
    }

    /// Fails with EROFS for a node of an old version's view.
    fn writable(&self, ino: Ino) -> FsResult<()> {
        match self.node(ino)?.old {
            Some(_) => Err(FsError::ReadOnly),
            None => Ok(()),
        }
    }

    /// Fails if a new name would hide one of the root's views of old versions.
    fn free_name(&self, parent: Ino, name: &[u8]) -> FsResult<()> {
        if parent == ROOT && VIEWS.contains(&name) {
            return Err(FsError::Exists);
        }
        Ok(())
    }

    fn child(&mut self, store: &BlobStore, parent: Ino, name: &[u8]) -> FsResult<Option<Ino>> {
        Ok(self.children(store, parent)?.get(name).copied())
    }

    /// Marks a directory and those above it as needing a rewrite.
    fn mark_dirty(&mut self, mut ino: Ino) {
        self.dirty = true;
        while let Some(node) = self.nodes.get_mut(&ino) {
            let parent = node.parent;
            match &mut node.body {
                Body::Dir(d) if !d.dirty => d.dirty = true,
                _ => return,
            }
            if ino == ROOT || !node.linked {
                return;
            }
            ino = parent;
        }
    }

    /// Records that a node's own entry changed (its metadata or content).
    fn entry_changed(&mut self, ino: Ino) {
        let Some(node) = self.nodes.get(&ino) else { return };
        // A hard-linked file's entry is in the inode table, not a directory.
        if node.linked && ino != ROOT && node.link.is_none() {
            let parent = node.parent;
            self.mark_dirty(parent);
        }
        self.dirty = true;
    }

    /// A directory's listing changed: its times, and it needs a rewrite.
    fn listing_changed(&mut self, dir: Ino) {
        if let Some(node) = self.nodes.get_mut(&dir) {
            now_meta(&mut node.meta);
        }
        self.mark_dirty(dir);
        self.entry_changed(dir);
    }

    /// A directory child of `dir` was added or removed.
    fn subdirs_changed(&mut self, dir: Ino) {
        if let Some(Node {
            body: Body::Dir(d), ..
        }) = self.nodes.get_mut(&dir)
        {
            d.subdirs = None;
        }
    }

    fn nlink(&mut self, store: &BlobStore, ino: Ino) -> FsResult<u32> {
        let node = self.node(ino)?;
        if !node.linked {
            return Ok(0);
        }
        match &node.body {
            Body::Dir(DirNode { subdirs: Some(n), .. }) => return Ok(2 + n),
            Body::Dir(_) => {}
            _ => return Ok(node.nlink),
        }
        let children: Vec<Ino> = self.children(store, ino)?.values().copied().collect();
        let n = children
            .iter()
            .filter(|c| matches!(self.nodes.get(c).map(|n| &n.body), Some(Body::Dir(_))))
            .count() as u32;
        self.node_mut(ino)?.dir()?.subdirs = Some(n);
        Ok(2 + n)
    }

    fn attr(&mut self, store: &BlobStore, ino: Ino) -> FsResult<Attr> {
        let nlink = self.nlink(store, ino)?;
        let node = self.node(ino)?;
        let size = match &node.body {
            Body::File { data: Some(d), .. } => d.lock().size,
            Body::File { size, .. } => *size,
            Body::Symlink(t) => t.len() as u64,
            Body::Dir(_) => 4096,
            Body::Fifo | Body::Device(..) => 0,
        };
        let rdev = match node.body {
            Body::Device(_, rdev) => rdev,
            _ => 0,
        };
        Ok(Attr {
            ino,
            kind: node.kind(),
            size,
            perm: (node.meta.mode & 0o7777) as u16,
            nlink,
            uid: node.meta.uid,
            gid: node.meta.gid,
            mtime: node.meta.mtime,
            ctime: node.meta.ctime,
            atime: node.meta.atime(),
            rdev,
        })
    }

    /// Takes a node out of the tree; it is dropped once nothing refers to it.
    fn unlink_node(&mut self, ino: Ino) {
        if let Some(n) = self.nodes.get_mut(&ino) {
            n.linked = false;
        }
        self.drop_if_unused(ino);
    }

    /// One name of a node is gone: a hard-linked file loses a link (and
    /// leaves the tree with its last); anything else leaves the tree.
    fn drop_name(&mut self, ino: Ino) {
        if let Some(n) = self.nodes.get_mut(&ino) {
            if n.link.is_some() {
                n.nlink = n.nlink.saturating_sub(1);
                n.meta.ctime = Time::now();
                self.dirty = true;
                if n.nlink > 0 {
                    return;
                }
            }
        }
        self.unlink_node(ino);
    }

    fn drop_if_unused(&mut self, ino: Ino) {
        let Some(n) = self.nodes.get(&ino) else { return };
        if n.linked || n.lookups > 0 || n.open > 0 || ino == ROOT {
            return;
        }
        let node = self.nodes.remove(&ino).expect("checked above");
        if let Some(id) = node.link {
            if self.links.get(&id) == Some(&ino) {
                self.links.remove(&id);
                // Gone with its last name: not in the next table either.
                self.inodes.remove(&id);
            }
        }
        self.dirty_files.remove(&ino);
        if let Body::Dir(DirNode {
            children: Some(children),
            ..
        }) = node.body
        {
            for child in children.into_values() {
                self.unlink_node(child);
            }
        }
    }

    /// The stored entry for a node, storing what changed below it first.
    fn entry(&mut self, store: &BlobStore, chunking: Chunking, ino: Ino) -> FsResult<Entry> {
        if let Some(id) = self.node(ino)?.link {
            return Ok(Entry {
                meta: Meta::default(),
                content: Content::Inode { id },
            });
        }
        self.plain_entry(store, chunking, ino)
    }

    /// The entry with the node's own metadata and content.
    fn plain_entry(&mut self, store: &BlobStore, chunking: Chunking, ino: Ino) -> FsResult<Entry> {
        let content = match &self.node(ino)?.body {
            Body::Dir(_) => Content::Dir {
                tree: self.build(store, chunking, ino)?,
            },
            // The version the commit stored before it took the state's lock
            // (bytes written since go in the next one: see `Vfs::commit`).
            Body::File { data: Some(data), .. } => {
                let mut f = data.lock();
                let (manifest, size) = match f.committable() {
                    Some(stored) => stored,
                    None => {
                        f.materialize(store, chunking)?;
                        (f.manifest, f.size)
                    }
                };
                Content::File { manifest, size }
            }
            Body::File { manifest, size, .. } => Content::File {
                manifest: *manifest,
                size: *size,
            },
            Body::Symlink(target) => Content::Symlink {
                target: target.clone(),
            },
            Body::Fifo => Content::Fifo,
            Body::Device(kind, rdev) => Content::Device {
                kind: *kind,
                rdev: *rdev,
            },
        };
        Ok(Entry {
            meta: self.node(ino)?.meta.clone(),
            content,
        })
    }

    /// Stores a directory if it is dirty; returns its tree.
    fn build(&mut self, store: &BlobStore, chunking: Chunking, ino: Ino) -> FsResult<Hash> {
        let d = self.node_mut(ino)?.dir()?;
        let (true, Some(children)) = (d.dirty, &d.children) else {
            return Ok(d.tree);
        };
        let children: Vec<(Vec<u8>, Ino)> = children.iter().map(|(n, &i)| (n.clone(), i)).collect();
        let mut dir = Dir::new();
        for (name, child) in children {
            dir.insert(name, self.entry(store, chunking, child)?);
        }
        let tree = store.put_dir(&dir)?;
        let d = self.node_mut(ino)?.dir()?;
        d.tree = tree;
        d.dirty = false;
        Ok(tree)
    }

    /// The inode table as it is now: the base's, with the entries of the
    /// hard-linked nodes (their bytes stored first), without dropped ones.
    fn build_inodes(&mut self, store: &BlobStore, chunking: Chunking) -> FsResult<(Option<Hash>, Inodes)> {
        let mut table = self.inodes.clone();
        let nodes: Vec<(u64, Ino)> = self.links.iter().map(|(&id, &ino)| (id, ino)).collect();
        for (id, ino) in nodes {
            let node = self.node(ino)?;
            if !node.linked || node.nlink == 0 {
                table.remove(&id);
                continue;
            }
            let nlink = node.nlink;
            table.insert(id, (self.plain_entry(store, chunking, ino)?, nlink));
        }
        Ok((links::store(store, &table)?, table))
    }

    /// Adopts another commit's inode table: the hard-linked nodes take their
    /// entries and link counts from it (or leave the tree if not in it).
    fn adopt_inodes(&mut self, store: &BlobStore) -> FsResult<()> {
        let nodes: Vec<(u64, Ino)> = self.links.iter().map(|(&id, &ino)| (id, ino)).collect();
        for (id, ino) in nodes {
            match self.inodes.get(&id).cloned() {
                Some((entry, nlink)) => {
                    self.adopt_entry(store, ino, entry)?;
                    if let Some(n) = self.nodes.get_mut(&ino) {
                        n.nlink = nlink;
                    }
                }
                None => self.unlink_node(ino),
            }
        }
        Ok(())
    }

    /// Makes the view show `tree` (after a merge, or another client's commit).
    fn adopt(&mut self, store: &BlobStore, tree: Tree) -> FsResult<()> {
        // The table first: names met while adopting the tree resolve in it.
        self.inodes = links::load(store, tree.inodes)?;
        if let (Some(meta), Ok(root)) = (tree.root_meta, self.node_mut(ROOT)) {
            root.meta = meta;
        }
        self.adopt_dir(store, ROOT, tree.root)?;
        self.adopt_inodes(store)
    }

    /// Makes a clean directory node show `tree`, keeping the inode numbers of
    /// names that are still there with the same kind.
    fn adopt_dir(&mut self, store: &BlobStore, ino: Ino, tree: Hash) -> FsResult<()> {
        let d = self.node_mut(ino)?.dir()?;
        if d.tree == tree && !d.dirty {
            return Ok(());
        }
        d.tree = tree;
        d.dirty = false;
        d.subdirs = None;
        let Some(old) = d.children.take() else {
            return Ok(());
        };
        let entries = store.dir(&tree)?;
        let mut children = BTreeMap::new();
        self.invalidations.push(Invalidate::Inode(ino));
        for (name, &child) in &old {
            if !entries.contains_key(name) {
                self.drop_name(child);
                self.invalidations.push(Invalidate::Entry {
                    parent: ino,
                    name: name.clone(),
                });
            }
        }
        for (name, entry) in entries {
            let same = old
                .get(&name)
                .copied()
                .filter(|c| match (self.nodes.get(c), &entry.content) {
                    // A name of the same hard-linked file (adopt_inodes updates it).
                    (Some(n), Content::Inode { id }) => n.link == Some(*id),
                    (Some(n), content) => n.link.is_none() && n.kind() == kind_of(content),
                    (None, _) => false,
                });
            let child = match same {
                Some(c) if matches!(entry.content, Content::Inode { .. }) => c,
                Some(c) => {
                    self.adopt_entry(store, c, entry)?;
                    c
                }
                None => {
                    if let Some(&c) = old.get(&name) {
                        self.drop_name(c);
                        self.invalidations.push(Invalidate::Entry {
                            parent: ino,
                            name: name.clone(),
                        });
                    }
                    self.add_node(ino, name.clone(), entry)
                }
            };
            children.insert(name, child);
        }
        self.node_mut(ino)?.dir()?.children = Some(children);
        Ok(())
    }

    fn adopt_entry(&mut self, store: &BlobStore, ino: Ino, entry: Entry) -> FsResult<()> {
        let node = self.node_mut(ino)?;
        let meta_changed = node.meta != entry.meta;
        node.meta = entry.meta;
        match (entry.content, &mut node.body) {
            (Content::Dir { tree }, Body::Dir(_)) => self.adopt_dir(store, ino, tree)?,
            (
                Content::File { manifest, size },
                Body::File {
                    manifest: m,
                    size: s,
                    data,
                },
            ) => {
                let unchanged = match data {
                    Some(d) => {
                        let d = d.lock();
                        d.changed || d.manifest == manifest
                    }
                    None => *m == manifest,
                };
                if !unchanged {
                    *m = manifest;
                    *s = size;
                    *data = None;
                    self.invalidations.push(Invalidate::Inode(ino));
                }
            }
            (Content::Symlink { target }, Body::Symlink(t)) => *t = target,
            _ => {}
        }
        if meta_changed {
            self.invalidations.push(Invalidate::Inode(ino));
        }
        Ok(())
    }

    fn handle(&mut self, fh: u64) -> FsResult<&mut Handle> {
        self.handles.get_mut(&fh).ok_or(FsError::BadHandle)
    }

    fn open_handle(&mut self, ino: Ino, append: bool, writes: bool) -> FsResult<u64> {
        let node = self.node_mut(ino)?;
        node.open += 1;
        node.writers += writes as u32;
        let fh = self.next_fh;
        self.next_fh += 1;
        self.handles.insert(
            fh,
            Handle {
                ino,
                append,
                writes,
                wrote: false,
                listing: None,
            },
        );
        Ok(fh)
    }

    fn is_ancestor(&self, maybe_ancestor: Ino, mut ino: Ino) -> bool {
        loop {
            if ino == maybe_ancestor {
                return true;
            }
            match self.nodes.get(&ino) {
                Some(n) if ino != ROOT && n.linked => ino = n.parent,
                _ => return false,
            }
        }
    }
}

impl Vfs {
    /// Opens a view of the volume's current commit.
    pub fn new(volume: Volume, opts: Options) -> FsResult<Vfs> {
        let (base_commit, commit) = volume.head()?;
        let mut nodes = HashMap::new();
        nodes.insert(
            ROOT,
            Node {
                parent: ROOT,
                name: Vec::new(),
                // Kept in the commit; a volume from before that shows 0755.
                meta: commit.root_meta.clone().unwrap_or_else(|| tree::new_meta(0o755)),
                body: Body::Dir(DirNode {
                    tree: commit.root,
                    children: None,
                    dirty: false,
                    subdirs: None,
                }),
                lookups: 1,
                open: 0,
                writers: 0,
                linked: true,
                link: None,
                nlink: 1,
                old: None,
            },
        );
        let inodes = links::load(&volume.store, commit.inodes)?;
        let prefetch = prefetch::Prefetcher::new(volume.store.clone(), opts.readahead_threads);
        let volume_store = volume.store.clone();
        let fringes = offer::Fringes::new(opts.cache_page);
        Ok(Vfs {
            state: Mutex::new(State {
                nodes,
                next_ino: ROOT + 1,
                base_commit,
                base: commit.tree(),
                inodes,
                links: HashMap::new(),
                dirty: false,
                dirty_files: HashSet::new(),
                handles: HashMap::new(),
                next_fh: 1,
                invalidations: Vec::new(),
                views: HashMap::new(),
            }),
            volume,
            opts,
            commit_lock: Mutex::new(()),
            cache_gate: Mutex::new(()),
            fringes: Mutex::new(fringes),
            capacity: Mutex::new(None),
            held: Default::default(),
            metrics: Arc::new(crate::metrics::Metrics::new(volume_store)),
            prefetch,
        })
    }

    fn store(&self) -> &BlobStore {
        &self.volume.store
    }

    pub fn volume(&self) -> &Volume {
        &self.volume
    }

    pub fn options(&self) -> &Options {
        &self.opts
    }

    /// Looks up a name; the kernel now remembers the node (see [`Vfs::forget`]).
    pub fn lookup(&self, parent: Ino, name: &[u8]) -> FsResult<Attr> {
        if name.len() > NAME_MAX {
            return Err(FsError::NameTooLong);
        }
        let view = VIEWS.iter().find(|v| parent == ROOT && **v == name);
        let ino = match view {
            Some(view) => Some(self.view(view)?),
            None => {
                self.refresh_if_view(parent)?;
                None
            }
        };
        let mut st = self.state.lock();
        let ino = match ino {
            Some(ino) => ino,
            None => st.child(self.store(), parent, name)?.ok_or(FsError::NotFound)?,
        };
        let attr = st.attr(self.store(), ino)?;
        st.node_mut(ino)?.lookups += 1;
        Ok(attr)
    }

    /// The node of a view of old versions (`.snapshots`, `.history`), its
    /// listing brought up to date (at most once a second).
    fn view(&self, name: &'static [u8]) -> FsResult<Ino> {
        let now = std::time::Instant::now();
        {
            let st = self.state.lock();
            if let Some(v) = st.views.get(name) {
                if st.nodes.contains_key(&v.ino) && now.duration_since(v.listed) < Duration::from_secs(1) {
                    return Ok(v.ino);
                }
            }
        }
        // What the view lists now, read with no lock held.
        let wanted: Vec<(Vec<u8>, Hash)> = if name == b".snapshots" {
            crate::history::snapshots(&self.volume)?
                .into_iter()
                .map(|(n, h)| (n.into_bytes(), h))
                .collect()
        } else {
            let mut out: Vec<(Vec<u8>, Hash)> = Vec::new();
            let log = self.volume.log(HISTORY_LEN)?;
            let commits: Vec<_> = log.iter().map(|(_, c)| c.clone()).collect();
            let whole = crate::history::whole(self.store(), &commits);
            // Versions whose files were collected are not shown.
            for ((h, c), _) in log.into_iter().zip(whole).filter(|(_, w)| *w) {
                let mut n = utc_name(c.time);
                // Several commits in one second: the older get a suffix.
                let mut k = 1;
                while out.iter().any(|(o, _)| *o == n.as_bytes()) {
                    k += 1;
                    n = format!("{}-{k}", utc_name(c.time));
                }
                out.push((n.into_bytes(), h));
            }
            out
        };
        let mut versions = Vec::new();
        for (n, h) in wanted {
            let c = self.store().commit(&h)?;
            versions.push((
                n,
                h,
                c.root,
                c.time,
                Arc::new(links::load(self.store(), c.inodes)?),
            ));
        }
        let mut st = self.state.lock();
        let ino = match st
            .views
            .get(name)
            .map(|v| v.ino)
            .filter(|i| st.nodes.contains_key(i))
        {
            Some(ino) => ino,
            None => {
                let empty = self.store().empty_dir_name();
                let mut meta = tree::new_meta(0o555);
                meta.uid = 0;
                meta.gid = 0;
                let ino = st.add_plain(
                    ROOT,
                    name.to_vec(),
                    Entry {
                        meta,
                        content: Content::Dir { tree: empty },
                    },
                );
                let node = st.node_mut(ino)?;
                node.old = Some(Arc::new(Inodes::new()));
                node.dir()?.children = Some(BTreeMap::new());
                let view = View {
                    ino,
                    listed: now,
                    commits: HashMap::new(),
                };
                st.views.insert(name, view);
                ino
            }
        };
        let mut commits = st
            .views
            .get_mut(name)
            .map(|v| std::mem::take(&mut v.commits))
            .unwrap_or_default();
        let old: BTreeMap<Vec<u8>, Ino> =
            std::mem::take(st.node_mut(ino)?.dir()?.children.get_or_insert_default());
        let mut children = BTreeMap::new();
        for (n, h, root, time, inodes) in versions {
            let keep = old.get(&n).copied().filter(|c| commits.get(c) == Some(&h));
            let child = match keep {
                Some(c) => c,
                None => {
                    let mut meta = tree::new_meta(0o755);
                    meta.mtime = time;
                    meta.ctime = time;
                    let c = st.add_plain(
                        ino,
                        n.clone(),
                        Entry {
                            meta,
                            content: Content::Dir { tree: root },
                        },
                    );
                    st.node_mut(c)?.old = Some(inodes);
                    commits.insert(c, h);
                    c
                }
            };
            children.insert(n, child);
        }
        for (n, c) in old {
            if children.get(&n) != Some(&c) {
                commits.remove(&c);
                st.unlink_node(c);
                st.invalidations.push(Invalidate::Entry { parent: ino, name: n });
            }
        }
        st.node_mut(ino)?.dir()?.children = Some(children);
        st.node_mut(ino)?.dir()?.subdirs = None;
        let view = View {
            ino,
            listed: now,
            commits,
        };
        st.views.insert(name, view);
        Ok(ino)
    }

    fn refresh_if_view(&self, ino: Ino) -> FsResult<()> {
        let view = {
            let st = self.state.lock();
            st.views.iter().find(|(_, v)| v.ino == ino).map(|(n, _)| *n)
        };
        match view {
            Some(name) => self.view(name).map(|_| ()),
            None => Ok(()),
        }
    }

    /// The kernel forgets `n` lookups of a node.
    pub fn forget(&self, ino: Ino, n: u64) {
        let mut st = self.state.lock();
        if let Some(node) = st.nodes.get_mut(&ino) {
            node.lookups = node.lookups.saturating_sub(n);
        }
        st.drop_if_unused(ino);
    }

    pub fn getattr(&self, ino: Ino) -> FsResult<Attr> {
        self.state.lock().attr(self.store(), ino)
    }

    /// The bytes of a file, loaded on first use.
    fn file_data(&self, ino: Ino) -> FsResult<Arc<Mutex<FileData>>> {
        let manifest = match &self.state.lock().node(ino)?.body {
            Body::File { data: Some(d), .. } => return Ok(d.clone()),
            Body::File { manifest, .. } => *manifest,
            Body::Dir(_) => return Err(FsError::IsDir),
            _ => return Err(FsError::Invalid),
        };
        // Fetched with no lock held; another caller may install it first.
        let m = self.store().manifest(&manifest)?;
        let mut st = self.state.lock();
        match &mut st.node_mut(ino)?.body {
            Body::File { data: Some(d), .. } => Ok(d.clone()),
            Body::File { data, .. } => {
                let mut f = FileData::new(manifest, &m);
                f.count_in(&self.held);
                let d = Arc::new(Mutex::new(f));
                *data = Some(d.clone());
                Ok(d)
            }
            _ => Err(FsError::Stale),
        }
    }

    pub fn setattr(&self, ino: Ino, set: SetAttr) -> FsResult<Attr> {
        self.state.lock().writable(ino)?;
        let data = match set.size {
            Some(_) => Some(self.file_data(ino)?),
            None => None,
        };
        let mut st = self.state.lock();
        let node = st.node_mut(ino)?;
        if let Some(mode) = set.mode {
            node.meta.mode = mode & 0o7777;
        }
        if let Some(uid) = set.uid {
            node.meta.uid = uid;
        }
        if let Some(gid) = set.gid {
            node.meta.gid = gid;
        }
        let now = Time::now();
        if let (Some(size), Some(data)) = (set.size, &data) {
            data.lock().truncate(size);
            node.meta.mtime = now;
        }
        match set.mtime {
            Some(TimeSet::Now) => node.meta.mtime = now,
            Some(TimeSet::At(t)) => node.meta.mtime = t,
            None => {}
        }
        match set.atime {
            Some(TimeSet::Now) => node.meta.atime = Some(now),
            Some(TimeSet::At(t)) => node.meta.atime = Some(t),
            None => {}
        }
        node.meta.ctime = set.ctime.unwrap_or(now);
        if data.is_some() {
            st.dirty_files.insert(ino);
        }
        st.entry_changed(ino);
        let attr = st.attr(self.store(), ino);
        drop(st);
        if data.is_some() {
            self.wait_for_keeps();
        }
        attr
    }

    pub fn readlink(&self, ino: Ino) -> FsResult<Vec<u8>> {
        match &self.state.lock().node(ino)?.body {
            Body::Symlink(t) => Ok(t.clone()),
            _ => Err(FsError::Invalid),
        }
    }

    /// Adds a new entry to a directory; fails if the name is taken.
    fn make(&self, caller: Caller, parent: Ino, name: &[u8], mode: u32, content: Content) -> FsResult<Attr> {
        check_name(name)?;
        let mut st = self.state.lock();
        st.writable(parent)?;
        st.free_name(parent, name)?;
        if st.child(self.store(), parent, name)?.is_some() {
            return Err(FsError::Exists);
        }
        let mut meta = tree::new_meta(mode & 0o7777);
        meta.uid = caller.uid;
        meta.gid = caller.gid;
        // A setgid directory gives its group to what is made in it, and its
        // setgid bit to new directories (as ext4 and xfs do).
        let parent_meta = &st.node(parent)?.meta;
        if parent_meta.mode & 0o2000 != 0 {
            meta.gid = parent_meta.gid;
            if matches!(content, Content::Dir { .. }) {
                meta.mode |= 0o2000;
            }
        }
        let is_file = matches!(content, Content::File { .. });
        let ino = st.add_node(parent, name.to_vec(), Entry { meta, content });
        if is_file {
            // Its (empty) manifest is stored with the commit.
            let mut f = FileData::empty(self.store().empty_manifest_name());
            f.count_in(&self.held);
            if let Body::File { data, .. } = &mut st.node_mut(ino)?.body {
                *data = Some(Arc::new(Mutex::new(f)));
            }
            st.dirty_files.insert(ino);
        }
        if let Body::Dir(d) = &mut st.node_mut(ino)?.body {
            d.children = Some(BTreeMap::new());
            d.dirty = true;
            d.subdirs = Some(0);
            st.subdirs_changed(parent);
        }
        st.children(self.store(), parent)?.insert(name.to_vec(), ino);
        st.listing_changed(parent);
        st.mark_dirty(ino);
        let attr = st.attr(self.store(), ino)?;
        st.node_mut(ino)?.lookups += 1;
        Ok(attr)
    }

    /// mknod(2): regular files, FIFOs, character and block devices (with
    /// their device number `rdev`) and sockets. Only the name and the number
    /// are stored: opening a device node on the mount reaches the local device
    /// with that number, as on any file system (unless mounted `nodev`).
    pub fn mknod(&self, caller: Caller, parent: Ino, name: &[u8], mode: u32, rdev: u64) -> FsResult<Attr> {
        let device = |kind| Content::Device { kind, rdev };
        let content = match mode & libc::S_IFMT {
            libc::S_IFREG | 0 => Content::File {
                manifest: self.store().empty_manifest_name(),
                size: 0,
            },
            libc::S_IFIFO => Content::Fifo,
            libc::S_IFCHR => device(object::DeviceKind::Char),
            libc::S_IFBLK => device(object::DeviceKind::Block),
            libc::S_IFSOCK => Content::Device {
                kind: object::DeviceKind::Socket,
                rdev: 0,
            },
            _ => return Err(FsError::Invalid),
        };
        self.make(caller, parent, name, mode, content)
    }

    pub fn mkdir(&self, caller: Caller, parent: Ino, name: &[u8], mode: u32) -> FsResult<Attr> {
        let tree = self.store().empty_dir_name();
        self.make(caller, parent, name, mode, Content::Dir { tree })
    }

    pub fn symlink(&self, caller: Caller, parent: Ino, name: &[u8], target: &[u8]) -> FsResult<Attr> {
        if target.len() > 4095 {
            return Err(FsError::NameTooLong);
        }
        let content = Content::Symlink {
            target: target.to_vec(),
        };
        self.make(caller, parent, name, 0o777, content)
    }

    /// link(2): another name for a file. The file moves into the inode table
    /// (see [`crate::links`]) on its second name.
    pub fn link(&self, ino: Ino, parent: Ino, name: &[u8]) -> FsResult<Attr> {
        check_name(name)?;
        let mut st = self.state.lock();
        st.writable(parent)?;
        st.writable(ino)?;
        st.free_name(parent, name)?;
        let node = st.node(ino)?;
        if node.kind() == Kind::Dir {
            return Err(FsError::NotPermitted);
        }
        if !node.linked {
            return Err(FsError::NotFound);
        }
        if st.child(self.store(), parent, name)?.is_some() {
            return Err(FsError::Exists);
        }
        if st.node(ino)?.link.is_none() {
            let id = loop {
                let id = rand::random::<u64>() >> 1;
                if id != 0 && !st.inodes.contains_key(&id) && !st.links.contains_key(&id) {
                    break id;
                }
            };
            // Its first name's entry becomes a reference to the table.
            let first_parent = st.node(ino)?.parent;
            st.mark_dirty(first_parent);
            let node = st.node_mut(ino)?;
            node.link = Some(id);
            node.nlink = 1;
            st.links.insert(id, ino);
        }
        let node = st.node_mut(ino)?;
        node.nlink += 1;
        node.meta.ctime = Time::now();
        st.children(self.store(), parent)?.insert(name.to_vec(), ino);
        st.listing_changed(parent);
        st.dirty = true;
        let attr = st.attr(self.store(), ino)?;
        st.node_mut(ino)?.lookups += 1;
        Ok(attr)
    }

    fn remove(&self, parent: Ino, name: &[u8], dir: bool) -> FsResult<()> {
        check_name(name)?;
        let mut st = self.state.lock();
        st.writable(parent)?;
        let ino = st.child(self.store(), parent, name)?.ok_or(FsError::NotFound)?;
        st.removable_as(self.store(), ino, dir)?;
        st.children(self.store(), parent)?.remove(name);
        st.drop_name(ino);
        st.listing_changed(parent);
        if dir {
            st.subdirs_changed(parent);
        }
        Ok(())
    }

    pub fn unlink(&self, parent: Ino, name: &[u8]) -> FsResult<()> {
        self.remove(parent, name, false)
    }

    pub fn rmdir(&self, parent: Ino, name: &[u8]) -> FsResult<()> {
        self.remove(parent, name, true)
    }

    pub fn rename(
        &self,
        parent: Ino,
        name: &[u8],
        to_parent: Ino,
        to_name: &[u8],
        mode: RenameMode,
    ) -> FsResult<()> {
        check_name(name)?;
        check_name(to_name)?;
        let store = self.store();
        let mut st = self.state.lock();
        st.writable(parent)?;
        st.writable(to_parent)?;
        st.free_name(to_parent, to_name)?;
        let from = st.child(store, parent, name)?.ok_or(FsError::NotFound)?;
        // Loads the target directory (and checks it is one).
        let to = st.child(store, to_parent, to_name)?;
        if to == Some(from) {
            return Ok(());
        }
        let from_dir = st.node(from)?.kind() == Kind::Dir;
        if from_dir && st.is_ancestor(from, to_parent) {
            return Err(FsError::Invalid);
        }
        let to_dir = match to {
            Some(t) => st.node(t)?.kind() == Kind::Dir,
            None => false,
        };
        if from_dir || to_dir {
            st.subdirs_changed(parent);
            st.subdirs_changed(to_parent);
        }
        match (mode, to) {
            (RenameMode::Exchange, None) => return Err(FsError::NotFound),
            (RenameMode::Exchange, Some(to)) => {
                if st.node(to)?.kind() == Kind::Dir && st.is_ancestor(to, parent) {
                    return Err(FsError::Invalid);
                }
                st.children(store, parent)?.insert(name.to_vec(), to);
                st.children(store, to_parent)?.insert(to_name.to_vec(), from);
                st.place(to, parent, name)?;
                st.place(from, to_parent, to_name)?;
                st.listing_changed(parent);
                st.listing_changed(to_parent);
                return Ok(());
            }
            (RenameMode::NoReplace, Some(_)) => return Err(FsError::Exists),
            (RenameMode::Replace, Some(to)) => {
                st.removable_as(store, to, from_dir)?;
                st.drop_name(to);
            }
            (_, None) => {}
        }
        st.children(store, parent)?.remove(name);
        st.children(store, to_parent)?.insert(to_name.to_vec(), from);
        st.place(from, to_parent, to_name)?;
        st.listing_changed(parent);
        st.listing_changed(to_parent);
        Ok(())
    }

    /// Opens a file; `flags` are open(2)'s.
    pub fn open(&self, ino: Ino, flags: i32) -> FsResult<u64> {
        let writes = flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0;
        if writes {
            self.state.lock().writable(ino)?;
        }
        let kind = self.state.lock().node(ino)?.kind();
        if kind == Kind::File {
            // Loaded now, so the bytes stay readable if the name is unlinked.
            self.file_data(ino)?;
        }
        let append = flags & libc::O_APPEND != 0;
        let fh = self.state.lock().open_handle(ino, append, writes)?;
        if writes {
            self.wait_for_keeps();
        }
        Ok(fh)
    }

    /// Creates and opens a regular file.
    pub fn create(
        &self,
        caller: Caller,
        parent: Ino,
        name: &[u8],
        mode: u32,
        flags: i32,
    ) -> FsResult<(Attr, u64)> {
        let attr = self.mknod(caller, parent, name, libc::S_IFREG | (mode & 0o7777), 0)?;
        let fh = self.open(attr.ino, flags)?;
        Ok((attr, fh))
    }

    pub fn read(&self, ino: Ino, offset: u64, size: u32) -> FsResult<bytes::Bytes> {
        self.read_offering(ino, offset, size).map(|(bytes, _)| bytes)
    }

    /// Reads like [`Vfs::read`]; a random read (not the next of a sequential
    /// reader) inside one stored chunk also offers the rest of that chunk to
    /// the kernel's cache ([`offer`]). A sequential reader gets read-ahead
    /// instead, here and from the kernel.
    pub fn read_offering(
        &self,
        ino: Ino,
        offset: u64,
        size: u32,
    ) -> FsResult<(bytes::Bytes, Option<CacheOffer>)> {
        let file = self.file_data(ino)?;
        let (view, sequential, check_atime) = {
            let mut f = file.lock();
            let sequential = f.note_read(offset, size as u64);
            let check_atime =
                self.opts.relatime && f.atime_checked.is_none_or(|t| t.elapsed() >= ATIME_RECHECK);
            if check_atime {
                f.atime_checked = Some(std::time::Instant::now());
            }
            (f.view(offset, size as u64), sequential, check_atime)
        };
        if check_atime {
            self.state.lock().accessed(ino);
        }
        let out = view.read(self.store())?;
        self.metrics.read(out.bytes.len());
        if sequential {
            if let Some(i) = out.last_chunk {
                self.prefetch.want(
                    view.following(i, self.opts.readahead_chunks)
                        .into_iter()
                        .map(|(h, _)| h),
                );
            }
            return Ok((out.bytes, None));
        }
        let offer = match (out.whole_chunk, out.last_chunk) {
            (Some(chunk), Some(i)) => {
                let pieces = self.fringes.lock().widen(&view, i, chunk);
                self.offer(ino, &file, view.version, pieces)
            }
            _ => None,
        };
        Ok((out.bytes, offer))
    }

    pub fn write(&self, fh: u64, offset: u64, data: &[u8]) -> FsResult<u32> {
        let ino = self.state.lock().handle(fh)?.ino;
        let file = self.file_data(ino)?;
        let spill = {
            let mut st = self.state.lock();
            let handle = st.handle(fh)?;
            handle.wrote = true;
            let append = handle.append;
            let mut f = file.lock();
            // While the store refuses uploads, the bytes it refused wait here;
            // past twice the spill size in this file, or `held_bytes` over all
            // files (many small ones), the writer is told (ENOSPC for a full
            // store), as a full disk would, instead of memory growing.
            let held = self.held.load(std::sync::atomic::Ordering::Relaxed);
            if f.dirty_bytes() >= 2 * self.opts.spill_bytes || held >= self.opts.held_bytes {
                if let Some(e) = self.store().upload_failing() {
                    return Err(FsError::Store(e.into()));
                }
            }
            let at = if append { f.size } else { offset };
            f.write(at, data);
            let spill = f.dirty_bytes() > self.opts.spill_bytes;
            drop(f);
            if let Ok(node) = st.node_mut(ino) {
                now_meta(&mut node.meta);
            }
            st.dirty_files.insert(ino);
            st.entry_changed(ino);
            spill
        };
        if spill {
            file.lock().spill_behind(self.store(), self.opts.chunking)?;
        }
        self.metrics.written(data.len());
        Ok(data.len() as u32)
    }

    /// close(2) of a handle (called for each close of each descriptor).
    pub fn flush(&self, fh: u64) -> FsResult<()> {
        let wrote = self.state.lock().handle(fh)?.wrote;
        if wrote && self.opts.commit_on_close {
            self.commit()?;
            if let Ok(h) = self.state.lock().handle(fh) {
                h.wrote = false;
            }
        }
        Ok(())
    }

    /// The last close of an open.
    pub fn release(&self, fh: u64) {
        let mut st = self.state.lock();
        if let Some(h) = st.handles.remove(&fh) {
            if let Some(n) = st.nodes.get_mut(&h.ino) {
                n.open = n.open.saturating_sub(1);
                n.writers = n.writers.saturating_sub(h.writes as u32);
            }
            st.drop_if_unused(h.ino);
        }
    }

    /// fsync(2), fsyncdir, syncfs: everything is committed when this returns.
    pub fn fsync(&self) -> FsResult<()> {
        self.commit()
    }

    pub fn opendir(&self, ino: Ino) -> FsResult<u64> {
        let mut st = self.state.lock();
        st.node_mut(ino)?.dir()?;
        st.open_handle(ino, false, false)
    }

    /// The listing behind a directory handle, with `.` and `..` first. Taken
    /// at the first call (offset 0) and kept until `releasedir`.
    pub fn readdir(&self, fh: u64, offset: u64) -> FsResult<Arc<Vec<DirEntry>>> {
        let ino = {
            let mut st = self.state.lock();
            let h = st.handle(fh)?;
            if let (Some(listing), true) = (&h.listing, offset > 0) {
                return Ok(listing.clone());
            }
            h.ino
        };
        // A view of old versions is listed afresh. The root does not list the
        // views (as ZFS hides .zfs): `find`, `du` or a backup of the whole
        // mount would otherwise walk every old version. They are there when
        // named: `ls .snapshots`.
        self.refresh_if_view(ino)?;
        let mut st = self.state.lock();
        let parent = st.node(ino)?.parent;
        let children: Vec<(Vec<u8>, Ino)> = st
            .children(self.store(), ino)?
            .iter()
            .map(|(n, &i)| (n.clone(), i))
            .collect();
        let mut out = Vec::with_capacity(children.len() + 2);
        out.push(DirEntry {
            ino,
            kind: Kind::Dir,
            name: b".".to_vec(),
        });
        out.push(DirEntry {
            ino: parent,
            kind: Kind::Dir,
            name: b"..".to_vec(),
        });
        for (name, child) in children {
            out.push(DirEntry {
                ino: child,
                kind: st.node(child)?.kind(),
                name,
            });
        }
        let listing = Arc::new(out);
        st.handle(fh)?.listing = Some(listing.clone());
        if self.opts.relatime {
            st.accessed(ino);
        }
        Ok(listing)
    }

    /// The kernel was told of a node by a listing (readdirplus).
    pub fn count_lookup(&self, ino: Ino) {
        if let Some(n) = self.state.lock().nodes.get_mut(&ino) {
            n.lookups += 1;
        }
    }

    pub fn releasedir(&self, fh: u64) {
        self.release(fh)
    }

    /// The store's capacity where it can tell (kvd reports its disk), else
    /// 1 PiB free, as network file systems without quotas do. Asked at most
    /// every few seconds (`df` calls this often).
    pub fn statfs(&self) -> Statfs {
        const PIB: u64 = 1 << 50;
        let mut cached = self.capacity.lock();
        let fresh = cached
            .as_ref()
            .is_some_and(|(at, _)| at.elapsed() < Duration::from_secs(5));
        if !fresh {
            let asked = self.store().dict().capacity().unwrap_or(None);
            *cached = Some((std::time::Instant::now(), asked));
        }
        let (total, mut free) = cached.as_ref().and_then(|(_, c)| *c).unwrap_or((PIB, PIB));
        // A store refusing uploads for want of room is full, whatever it
        // reported: `df` says so, as for a full local disk.
        if matches!(
            self.store().upload_failing(),
            Some(crate::dict::DictError::Full(_))
        ) {
            free = 0;
        }
        Statfs {
            block_size: 4096,
            blocks: total / 4096,
            blocks_free: free / 4096,
            files: 1 << 40,
            files_free: 1 << 40,
        }
    }

    pub fn getxattr(&self, ino: Ino, name: &[u8]) -> FsResult<Vec<u8>> {
        let st = self.state.lock();
        st.node(ino)?
            .meta
            .xattrs
            .get(name)
            .cloned()
            .ok_or(FsError::NoData)
    }

    /// Names, each followed by a NUL, as listxattr(2) returns them.
    pub fn listxattr(&self, ino: Ino) -> FsResult<Vec<u8>> {
        let st = self.state.lock();
        let mut out = Vec::new();
        for name in st.node(ino)?.meta.xattrs.keys() {
            out.extend_from_slice(name);
            out.push(0);
        }
        Ok(out)
    }

    /// setxattr(2); `flags` may be XATTR_CREATE or XATTR_REPLACE.
    pub fn setxattr(&self, ino: Ino, name: &[u8], value: &[u8], flags: i32) -> FsResult<()> {
        if name.is_empty() || name.len() > 255 {
            return Err(FsError::Range);
        }
        if value.len() > 65536 {
            return Err(FsError::Range);
        }
        // ACLs and security labels would need enforcing; they are not kept.
        if name.starts_with(b"system.") || name.starts_with(b"security.") {
            return Err(FsError::NotSupported);
        }
        let mut st = self.state.lock();
        st.writable(ino)?;
        let node = st.node_mut(ino)?;
        let exists = node.meta.xattrs.contains_key(name);
        if flags & libc::XATTR_CREATE != 0 && exists {
            return Err(FsError::Exists);
        }
        if flags & libc::XATTR_REPLACE != 0 && !exists {
            return Err(FsError::NoData);
        }
        node.meta.xattrs.insert(name.to_vec(), value.to_vec());
        node.meta.ctime = Time::now();
        st.entry_changed(ino);
        Ok(())
    }

    pub fn removexattr(&self, ino: Ino, name: &[u8]) -> FsResult<()> {
        let mut st = self.state.lock();
        st.writable(ino)?;
        let node = st.node_mut(ino)?;
        node.meta.xattrs.remove(name).ok_or(FsError::NoData)?;
        node.meta.ctime = Time::now();
        st.entry_changed(ino);
        Ok(())
    }

    /// What the kernel should forget because other clients' commits were
    /// adopted since the last call (see [`Invalidate`]).
    pub fn take_invalidations(&self) -> Vec<Invalidate> {
        std::mem::take(&mut self.state.lock().invalidations)
    }

    /// Whether anything is waiting to be committed.
    pub fn is_dirty(&self) -> bool {
        self.state.lock().dirty
    }

    /// Commits every change made so far as one commit (merged with whatever
    /// other clients committed meanwhile), and adopts the result. Files are
    /// stored first, each holding its lock only to take its written bytes
    /// ([`FileData::store_snapshot`]): a writer goes on meanwhile, and bytes
    /// written after their file's snapshot go in the next commit.
    pub fn commit(&self) -> FsResult<()> {
        let _one = self.commit_lock.lock();
        let started = std::time::Instant::now();
        match self.commit_locked() {
            Ok(None) => Ok(()),
            Ok(Some(merged)) => {
                self.metrics.commit(started.elapsed(), Ok(merged));
                Ok(())
            }
            Err(e) => {
                self.metrics.commit(started.elapsed(), Err(()));
                Err(e)
            }
        }
    }

    /// The mount's metrics (see [`crate::metrics`]).
    pub fn metrics(&self) -> &Arc<crate::metrics::Metrics> {
        &self.metrics
    }

    /// [`Vfs::commit`] with the commit lock held: `None` if there was
    /// nothing to commit, else whether another client's changes were merged.
    fn commit_locked(&self) -> FsResult<Option<bool>> {
        let store = self.store();
        // Whatever was leased until now is for this commit (every dirty file is
        // materialized below); leases taken from here on wait for the next.
        let sealed = store.seal_leases();
        // The bulk of the bytes first, holding only each file's own lock.
        let files: Vec<Arc<Mutex<FileData>>> = {
            let st = self.state.lock();
            st.dirty_files
                .iter()
                .filter_map(|i| match st.nodes.get(i).map(|n| &n.body) {
                    Some(Body::File { data: Some(d), .. }) => Some(d.clone()),
                    _ => None,
                })
                .collect()
        };
        for f in files {
            FileData::store_snapshot(&f, store, self.opts.chunking)?;
        }
        // The files' bytes into the store now, with no lock held: writers go
        // on meanwhile. What is left for the root swap to wait for (under the
        // node table's lock) is the tree's own few small blobs.
        store.flush_writes()?;
        let mut st = self.state.lock();
        if !st.dirty {
            return Ok(None);
        }
        let root = st.build(store, self.opts.chunking, ROOT)?;
        let (inodes, table) = st.build_inodes(store, self.opts.chunking)?;
        let ours = Tree {
            root,
            inodes,
            root_meta: Some(st.node(ROOT)?.meta.clone()),
        };
        let (base_commit, base) = (st.base_commit, st.base.clone());
        let (commit, tree) = self
            .volume
            .commit_tree(base_commit, base, ours.clone(), "mount", sealed)?;
        st.base_commit = commit;
        st.base = tree.clone();
        st.dirty = false;
        // Files written after their snapshot above stay dirty for the next.
        let written_since: Vec<Ino> = std::mem::take(&mut st.dirty_files)
            .into_iter()
            .filter(|ino| match st.nodes.get(ino).map(|n| &n.body) {
                Some(Body::File { data: Some(d), .. }) => d.lock().changed,
                _ => false,
            })
            .collect();
        let merged = tree != ours;
        if merged {
            st.adopt(store, tree)?;
        } else {
            st.inodes = table;
        }
        for ino in written_since {
            st.dirty_files.insert(ino);
            st.entry_changed(ino);
        }
        Ok(Some(merged))
    }

    /// Commits local changes, or else adopts other clients' newer commit.
    pub fn sync(&self) -> FsResult<()> {
        if self.is_dirty() {
            return self.commit();
        }
        let head = self.volume.store.root(&self.volume.name)?;
        let Some(head) = head else { return Ok(()) };
        if head == self.state.lock().base_commit {
            return Ok(());
        }
        let _one = self.commit_lock.lock();
        // Read the head again under the commit lock: a commit of ours may have
        // landed since the read above, and adopting the head read before it
        // would take the view back to an older tree.
        let Some(head) = self.volume.store.root(&self.volume.name)? else {
            return Ok(());
        };
        if head == self.state.lock().base_commit {
            return Ok(());
        }
        let tree = self.store().commit(&head)?.tree();
        let mut st = self.state.lock();
        if st.dirty {
            drop(st);
            drop(_one);
            return self.commit();
        }
        st.adopt(self.store(), tree.clone())?;
        st.base_commit = head;
        st.base = tree;
        Ok(())
    }
}

/// Runs [`Vfs::sync`] every `every` until `stop` is set.
pub fn spawn_syncer(vfs: Arc<Vfs>, every: Duration, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let step = Duration::from_millis(20).min(every);
        let mut waited = Duration::ZERO;
        while !stop.load(Ordering::Relaxed) {
            std::thread::sleep(step);
            waited += step;
            if waited < every {
                continue;
            }
            waited = Duration::ZERO;
            recycle::SPARES.trim();
            // A bug must not end the commits of a mount: log it, try again.
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| vfs.sync())) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!("commit or refresh failed (will retry): {e}"),
                Err(_) => tracing::error!("bug: a commit or refresh panicked (will retry)"),
            }
        }
    })
}
