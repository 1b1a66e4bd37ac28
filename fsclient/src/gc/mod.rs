//! Garbage collection: deleting the blobs that no kept version needs, while
//! other clients go on writing.
//!
//! The collector ([`collect`]) lists every blob (the candidates), marks what the
//! retention [`policy`] keeps in every volume of the store (blobs are shared
//! across volumes by dedup), and deletes the unmarked candidates that no
//! writer has leased ([`lease`]), in short *deletion windows*: the epoch counter
//! is odd while a window is open. Writers lease a blob before uploading it or
//! relying on it, atomically with reading the epoch, and wait while a window is
//! open. docs/FORMAT.md, "Garbage collection", gives the argument in full; the
//! rules that carry it are repeated where the code keeps them.
//!
//! Memory: the mark set holds interior blobs exactly and chunks in a Bloom
//! filter ([`markset`]); the candidate list streams through a temporary file.

pub mod markset;
pub mod policy;

use std::collections::HashSet;
use std::io::{BufReader, BufWriter, Read, Write};
use std::time::{Duration, Instant};

use crate::dict::DictError;
use crate::lease::{self, Keys};
use crate::object::{self, Content, Hash, Tag, Time};
use crate::store::{BlobStore, StoreError};
use crate::volume::Volume;
use crate::volume_key::Lock;
use markset::MarkSet;
pub use policy::Policy;

#[derive(Debug, thiserror::Error)]
pub enum GcError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("another garbage collection is running (its lock {0} is held); try again later")]
    Busy(String),
    #[error("the lock {0} was lost to another collector; stopped")]
    LockLost(String),
    #[error("a kept version needs {key}, which cannot be read ({error}); nothing was deleted — run `fsclient fsck`")]
    Damaged { key: String, error: String },
    #[error("volume '{0}' is encrypted, and the collector needs its key to see what it references (run gc with --volume {0} and its key); nothing was deleted")]
    NeedsKey(String),
    #[error("temporary file for the candidate list: {0}")]
    Temp(#[from] std::io::Error),
}

impl From<DictError> for GcError {
    fn from(e: DictError) -> Self {
        GcError::Store(StoreError::Dict(e))
    }
}

pub type GcResult<T> = Result<T, GcError>;

#[derive(Clone, Debug)]
pub struct Options {
    pub policy: Policy,
    /// Count what would be deleted, delete nothing.
    pub dry_run: bool,
    /// Candidates examined per deletion window (writers wait while one is open).
    pub window: usize,
    /// Draw progress bars (on a terminal).
    pub progress: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            policy: Policy::default(),
            dry_run: false,
            window: 20_000,
            progress: false,
        }
    }
}

/// What a collection did (or, dry, would do).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub volumes: u64,
    pub candidates: u64,
    /// Distinct interior blobs (commits, directories, inode tables) marked.
    pub marked_interior: u64,
    /// File manifests and chunks marked, with repeats (a chunk shared by two
    /// files counts twice).
    pub marked_leaves: u64,
    pub kept_commits: u64,
    /// Commits whose files the policy let go (their commit blobs stay).
    pub pruned_commits: u64,
    /// Candidates spared only because a writer leased them.
    pub leased: u64,
    pub deleted: u64,
    pub bytes_freed: u64,
    pub windows: u64,
    pub mark_set_bytes: u64,
}

/// How long the collector's lock lives unless renewed (once per window).
const LOCK_TTL: Duration = Duration::from_secs(120);
/// The least pause between two deletion windows.
const WINDOW_GAP: Duration = Duration::from_millis(10);
/// Blobs fetched per round trip while marking.
const FETCH_BATCH: usize = 256;

/// Collects the garbage of every volume under the store's prefix.
pub fn collect(store: &BlobStore, opts: &Options) -> GcResult<Report> {
    let keys = Keys::new(store.prefix());
    let token = format!("{:016x}", rand::random::<u64>());
    if !store
        .dict()
        .put_expiring(&keys.lock, token.as_bytes(), LOCK_TTL, true)?
    {
        return Err(GcError::Busy(keys.lock.clone()));
    }
    let mut gc = Collector {
        store,
        keys,
        token,
        opts: opts.clone(),
        marks: MarkSet::new(0),
        chains: HashSet::new(),
        report: Report::default(),
        volumes: Vec::new(),
        lock_renewed: Instant::now(),
    };
    let result = gc.run();
    // Release the lock if it is still ours.
    if let Ok(Some(v)) = store.dict().get(&gc.keys.lock) {
        if v == gc.token.as_bytes() {
            let _ = store.dict().delete(&gc.keys.lock);
        }
    }
    result.map(|()| gc.report)
}

struct Collector<'a> {
    store: &'a BlobStore,
    keys: Keys,
    token: String,
    opts: Options,
    marks: MarkSet,
    /// Commits whose whole parent chain has been walked.
    chains: HashSet<Hash>,
    report: Report,
    volumes: Vec<String>,
    lock_renewed: Instant,
}

/// A blob to walk. Interior blobs are walked once (the set of them is exact).
/// A manifest is walked whenever a newly walked directory names it and is
/// marked in the Bloom filter: its children are chunks, so walking it twice
/// costs a read and is never wrong, and an exact set of millions of manifests
/// would be most of the collector's memory.
#[derive(Clone, Copy)]
enum Walk {
    Interior(Hash),
    Manifest(Hash),
}

fn bar(show: bool, len: Option<u64>, what: &'static str) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let b = match len {
        Some(n) => indicatif::ProgressBar::new(n).with_style(
            indicatif::ProgressStyle::with_template("{msg:>10} [{bar:40}] {pos}/{len} ({per_sec}, {eta})")
                .expect("valid template"),
        ),
        None => indicatif::ProgressBar::new_spinner().with_style(
            indicatif::ProgressStyle::with_template("{msg:>10} {spinner} {pos} ({per_sec})")
                .expect("valid template"),
        ),
    };
    b.with_message(what)
}

impl Collector<'_> {
    fn run(&mut self) -> GcResult<()> {
        let started = Instant::now();
        let (mut file, count) = self.list_candidates()?;
        self.report.candidates = count;
        self.marks = MarkSet::new(count);
        self.list_volumes()?;
        let marking = bar(self.opts.progress, None, "marking");
        let now = Time::now();
        for name in self.volumes.clone() {
            self.mark_volume(&name, Some(now), &marking)?;
        }
        marking.finish_and_clear();
        tracing::info!(
            "marked {} directories and commits and {} files and chunks in {:.1}s",
            self.marks.interior_len(),
            self.marks.leaf_marks(),
            started.elapsed().as_secs_f64()
        );
        file.rewind_for_reading()?;
        let deleting = bar(self.opts.progress, Some(count), "deleting");
        let window = self.opts.window.max(1);
        loop {
            let batch = file.next_batch(window)?;
            if batch.is_empty() {
                break;
            }
            deleting.inc(batch.len() as u64);
            if self.opts.dry_run {
                let leased = self.read_leases(&deleting)?;
                self.sweep(&batch, &leased, false)?;
            } else {
                self.window(&batch, &deleting)?;
            }
        }
        deleting.finish_and_clear();
        self.report.marked_interior = self.marks.interior_len();
        self.report.marked_leaves = self.marks.leaf_marks();
        self.report.mark_set_bytes = self.marks.memory_bytes();
        if !self.opts.dry_run {
            self.tidy_registry()?;
        }
        Ok(())
    }

    /// Every blob key now in the store, as hashes in a temporary file.
    fn list_candidates(&mut self) -> GcResult<(Candidates, u64)> {
        let mut file = Candidates::create()?;
        let blob_prefix = format!("{}b:", self.store.prefix());
        let listing = bar(self.opts.progress, None, "listing");
        let mut count = 0u64;
        let mut failure = None;
        self.store.dict().scan_prefix(&blob_prefix, &mut |keys| {
            for k in keys {
                if let Some(h) = k.strip_prefix(&blob_prefix).and_then(Hash::from_hex) {
                    if let Err(e) = file.push(&h) {
                        failure = Some(e);
                    }
                    count += 1;
                }
            }
            listing.set_position(count);
            Ok(())
        })?;
        listing.finish_and_clear();
        if let Some(e) = failure {
            return Err(e.into());
        }
        Ok((file, count))
    }

    fn list_volumes(&mut self) -> GcResult<()> {
        let vprefix = format!("{}v:", self.store.prefix());
        let mut names = Vec::new();
        self.store.dict().scan_prefix(&vprefix, &mut |keys| {
            names.extend(keys.iter().filter_map(|k| {
                k.strip_prefix(&vprefix)?
                    .strip_suffix(":root")
                    .map(str::to_string)
            }));
            Ok(())
        })?;
        names.sort();
        names.dedup();
        self.report.volumes = names.len() as u64;
        self.volumes = names;
        Ok(())
    }

    /// Marks what a volume keeps: its history's commit blobs, the files of the
    /// commits the policy keeps (with `now`; without, of every commit not seen
    /// before: a later pass keeps all that is new), and its snapshots.
    fn mark_volume(
        &mut self,
        name: &str,
        now: Option<Time>,
        progress: &indicatif::ProgressBar,
    ) -> GcResult<()> {
        // An encrypted volume's trees are readable with its key alone; without
        // them nothing it references could be marked.
        let config = self
            .store
            .dict()
            .get(&crate::volume::config_key(self.store.prefix(), name))?;
        let lock = config.and_then(|c| Lock::from_config(&String::from_utf8_lossy(&c)).ok().flatten());
        if lock.is_some_and(|lock| !lock.opens_with(self.store.codec())) {
            return Err(GcError::NeedsKey(name.to_string()));
        }
        let volume = Volume::new(self.store.clone(), name);
        let mut todo = Vec::new();
        let mut keeper = now.map(|now| self.opts.policy.keeper(now));
        let mut next = self.store.root(name)?;
        while let Some(h) = next {
            if !self.chains.insert(h) {
                break;
            }
            self.marks.insert_interior(h);
            let c = self.store.commit(&h).map_err(|e| damaged(self.store, &h, e))?;
            if keeper.as_mut().is_none_or(|k| k.keep(c.time)) {
                self.report.kept_commits += 1;
                todo.push(Walk::Interior(c.root));
                todo.extend(c.inodes.map(Walk::Interior));
            } else {
                self.report.pruned_commits += 1;
            }
            next = c.parent;
        }
        let snapshots = crate::history::snapshots(&volume).map_err(|e| GcError::Damaged {
            key: format!("{}v:{name}:snapshots", self.store.prefix()),
            error: e.to_string(),
        })?;
        // A snapshot's commit may be on the chain with its files pruned: its
        // tree is pushed here, not left to the (already marked) commit blob.
        for h in snapshots.into_values() {
            self.marks.insert_interior(h);
            let c = self.store.commit(&h).map_err(|e| damaged(self.store, &h, e))?;
            todo.push(Walk::Interior(c.root));
            todo.extend(c.inodes.map(Walk::Interior));
        }
        self.mark_from(todo, progress)
    }

    /// Marks everything reachable from `todo` that is not marked yet. A blob
    /// that cannot be read stops the collection: its subtree would go unmarked.
    fn mark_from(&mut self, mut todo: Vec<Walk>, progress: &indicatif::ProgressBar) -> GcResult<()> {
        while !todo.is_empty() {
            let take = todo.len().min(FETCH_BATCH);
            let batch: Vec<Hash> = todo
                .split_off(todo.len() - take)
                .into_iter()
                .filter_map(|w| match w {
                    Walk::Interior(h) => self.marks.insert_interior(h).then_some(h),
                    Walk::Manifest(h) => {
                        self.marks.insert_leaf(&h);
                        Some(h)
                    }
                })
                .collect();
            // Straight from the store, not through the blob cache: a walk of
            // everything would only churn it (and grow the collector's memory).
            let keys: Vec<String> = batch.iter().map(|h| self.store.blob_key(h)).collect();
            let mut blobs = Vec::with_capacity(batch.len());
            let fetched = self.store.dict().get_many(&keys)?;
            for ((h, key), blob) in batch.iter().zip(keys).zip(fetched) {
                match blob {
                    Some(b) => blobs.push(self.store.open(h, b).map_err(|e| damaged(self.store, h, e))?),
                    None => {
                        return Err(GcError::Damaged {
                            key,
                            error: "missing".into(),
                        })
                    }
                }
            }
            progress.inc(batch.len() as u64);
            for (h, blob) in batch.iter().zip(blobs) {
                self.children(h, &blob, &mut todo)?;
            }
        }
        Ok(())
    }

    /// Pushes the interior children of a blob on `todo`; marks its chunks.
    fn children(&mut self, h: &Hash, blob: &[u8], todo: &mut Vec<Walk>) -> GcResult<()> {
        let bad = |e: object::FormatError| GcError::Damaged {
            key: self.store.blob_key(h),
            error: e.to_string(),
        };
        let (tag, _) = object::split(blob).map_err(bad)?;
        let file_or_dir = |content: &Content, todo: &mut Vec<Walk>| match content {
            Content::File { manifest, .. } => todo.push(Walk::Manifest(*manifest)),
            Content::Dir { tree } => todo.push(Walk::Interior(*tree)),
            Content::Symlink { .. } | Content::Fifo | Content::Device { .. } | Content::Inode { .. } => {}
        };
        match tag {
            // Reached as a leased tree root; chunks otherwise come from manifests.
            Tag::Chunk => self.marks.insert_leaf(h),
            Tag::File => {
                for (chunk, _) in object::decode_manifest(blob).map_err(bad)?.chunks {
                    self.marks.insert_leaf(&chunk);
                }
            }
            Tag::Dir => {
                for e in object::decode_dir(blob).map_err(bad)?.values() {
                    file_or_dir(&e.content, todo);
                }
            }
            Tag::DirIndex => todo.extend(
                object::decode_dir_index(blob)
                    .map_err(bad)?
                    .into_iter()
                    .map(|c| Walk::Interior(c.blob)),
            ),
            Tag::Commit => {
                let c = object::decode_commit(blob).map_err(bad)?;
                todo.push(Walk::Interior(c.root));
                todo.extend(c.inodes.map(Walk::Interior));
            }
            Tag::Inodes => {
                for (e, _) in object::decode_inodes(blob).map_err(bad)?.values() {
                    file_or_dir(&e.content, todo);
                }
            }
        }
        Ok(())
    }

    /// The hashes every writer has leased; leased trees are marked as well.
    fn read_leases(&mut self, progress: &indicatif::ProgressBar) -> GcResult<HashSet<Hash>> {
        let dict = self.store.dict();
        let registry = dict.get(&self.keys.registry)?.unwrap_or_default();
        let names: Vec<String> = String::from_utf8_lossy(&registry)
            .lines()
            .filter(|l| l.starts_with(&self.keys.leases))
            .map(str::to_string)
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        let mut leased = HashSet::new();
        let mut trees = Vec::new();
        for value in dict.get_many(&names)?.into_iter().flatten() {
            for (kind, h) in lease::records(&value) {
                leased.insert(h);
                if kind == lease::Kind::Tree {
                    trees.push(h);
                }
            }
        }
        // A leased tree that is gone already cannot be brought back; skip it.
        let keys: Vec<String> = trees.iter().map(|h| self.store.blob_key(h)).collect();
        let present: Vec<Hash> = trees
            .into_iter()
            .zip(dict.sizes(&keys)?)
            .filter_map(|(h, size)| size.map(|_| h))
            .collect();
        self.mark_from(present.into_iter().map(Walk::Interior).collect(), progress)?;
        Ok(leased)
    }

    /// One deletion window over `batch`. While the epoch is odd, writers wait
    /// before leasing; so a writer's lease either came before this window read
    /// the leases (the blob is spared) or comes after the window closes.
    fn window(&mut self, batch: &[Hash], progress: &indicatif::ProgressBar) -> GcResult<()> {
        self.renew_lock()?;
        let opened = Instant::now();
        let dict = self.store.dict();
        let mut epoch = dict.incr(&self.keys.epoch)?;
        if epoch % 2 == 0 {
            // A collector that stopped left a window open; this one counts from here.
            epoch = dict.incr(&self.keys.epoch)?;
        }
        let result = (|| {
            // Order matters: leases first, then the roots (a writer drops nothing
            // from a lease, but its commit may land between the two reads).
            let leased = self.read_leases(progress)?;
            for name in self.volumes.clone() {
                self.mark_volume(&name, None, progress)?;
            }
            self.sweep(batch, &leased, true)
        })();
        let closed = dict.incr(&self.keys.epoch);
        self.report.windows += 1;
        tracing::debug!("deletion window {epoch} closed");
        result?;
        closed?;
        // Writers waiting on this window get at least as long to go on (they
        // poll every few milliseconds), or back-to-back windows starve them.
        std::thread::sleep(opened.elapsed().max(WINDOW_GAP));
        Ok(())
    }

    /// Deletes (or, dry, counts) the candidates in `batch` that are neither
    /// marked nor leased.
    fn sweep(&mut self, batch: &[Hash], leased: &HashSet<Hash>, delete: bool) -> GcResult<()> {
        let mut doomed = Vec::new();
        for h in batch {
            if self.marks.contains(h) {
                continue;
            }
            if leased.contains(h) {
                self.report.leased += 1;
                continue;
            }
            doomed.push(self.store.blob_key(h));
        }
        for keys in doomed.chunks(1000) {
            if delete {
                self.check_lock_time()?;
            }
            let sizes = self.store.dict().sizes(keys)?;
            self.report.bytes_freed += sizes.iter().flatten().sum::<u64>();
            self.report.deleted += sizes.iter().flatten().count() as u64;
            if delete {
                self.store.dict().delete_many(keys)?;
            }
        }
        Ok(())
    }

    /// Renews the lock, unless another collector holds it now.
    fn renew_lock(&mut self) -> GcResult<()> {
        let dict = self.store.dict();
        if dict.get(&self.keys.lock)?.as_deref() != Some(self.token.as_bytes()) {
            return Err(GcError::LockLost(self.keys.lock.clone()));
        }
        dict.put_expiring(&self.keys.lock, self.token.as_bytes(), LOCK_TTL, false)?;
        self.lock_renewed = Instant::now();
        Ok(())
    }

    /// Writers close a window whose collector's lock expired; a collector so
    /// slow that its lock may have expired must not delete any more.
    fn check_lock_time(&self) -> GcResult<()> {
        if self.lock_renewed.elapsed() > LOCK_TTL / 2 {
            return Err(GcError::LockLost(self.keys.lock.clone()));
        }
        Ok(())
    }

    /// Drops the names of expired lease keys from the registry.
    fn tidy_registry(&mut self) -> GcResult<()> {
        let dict = self.store.dict();
        for _ in 0..10 {
            let raw = dict.get(&self.keys.registry)?;
            let names: Vec<String> = String::from_utf8_lossy(raw.as_deref().unwrap_or_default())
                .lines()
                .map(str::to_string)
                .collect();
            let present = dict.sizes(&names)?;
            let kept: String = names
                .iter()
                .zip(present)
                .filter(|(_, size)| size.is_some())
                .map(|(n, _)| format!("{n}\n"))
                .collect();
            if dict.compare_and_swap(&self.keys.registry, raw.as_deref(), kept.as_bytes())? {
                return Ok(());
            }
        }
        Ok(())
    }
}

fn damaged(store: &BlobStore, h: &Hash, e: StoreError) -> GcError {
    match e {
        StoreError::Dict(d) => GcError::Store(StoreError::Dict(d)),
        other => GcError::Damaged {
            key: store.blob_key(h),
            error: other.to_string(),
        },
    }
}

/// The candidate list: 32-byte hashes in a temporary file, removed when dropped.
struct Candidates {
    path: std::path::PathBuf,
    writer: Option<BufWriter<std::fs::File>>,
    reader: Option<BufReader<std::fs::File>>,
}

impl Candidates {
    fn create() -> std::io::Result<Candidates> {
        let path = std::env::temp_dir().join(format!(
            "fsclient-gc-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        let file = std::fs::OpenOptions::new()
            .create_new(true)
            .write(true)
            .read(true)
            .open(&path)?;
        Ok(Candidates {
            path,
            writer: Some(BufWriter::new(file)),
            reader: None,
        })
    }

    fn push(&mut self, h: &Hash) -> std::io::Result<()> {
        self.writer.as_mut().expect("writing").write_all(&h.0)
    }

    fn rewind_for_reading(&mut self) -> std::io::Result<()> {
        let w = self.writer.take().expect("written once");
        let mut file = w.into_inner().map_err(|e| e.into_error())?;
        use std::io::Seek;
        file.seek(std::io::SeekFrom::Start(0))?;
        self.reader = Some(BufReader::new(file));
        Ok(())
    }

    fn next_batch(&mut self, n: usize) -> std::io::Result<Vec<Hash>> {
        let reader = self.reader.as_mut().expect("rewound");
        let mut out = Vec::with_capacity(n.min(1 << 16));
        let mut buf = [0u8; 32];
        while out.len() < n {
            match reader.read_exact(&mut buf) {
                Ok(()) => out.push(Hash(buf)),
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }
}

impl Drop for Candidates {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests;
