//! The command line's operations on a volume, as a library: `fsclient`'s
//! subcommands only parse their arguments, call these and print what they
//! return, so tests, the bench and other programs get the same behaviour
//! without running the binary.
//!
//! Paths are volume paths (`/photos/cat.jpg`); `local` paths are the host's.
//! Every change is one commit ([`Volume::change`]) with the message the
//! command line would write (`put /photos`, `rm /x`), so `fsclient log`
//! reads the same whoever made it. Errors are worded as coreutils words them
//! (`cannot stat '/x': No such file or directory`): [`Error`]'s text is what
//! a person sees.

use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::history;
use crate::links;
use crate::object::{Commit, Content, DeviceKind, Entry, Hash, Inodes};
use crate::store::BlobStore;
use crate::tree::{self, Chunking, FsError, FsResult};
use crate::volume::Volume;

/// What went wrong, as one line for a person: the action, the path, the cause.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error(pub String);

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

pub type Result<T> = std::result::Result<T, Error>;

/// `cannot stat '/x': No such file or directory`.
pub fn fail(what: &str, path: &str, e: FsError) -> Error {
    Error(format!("{what} '{path}': {e}"))
}

/// An error with no path to name (the store, the history).
fn plain(e: impl std::fmt::Display) -> Error {
    Error(e.to_string())
}

/// The names of a volume path, for `what` failing on it.
fn names(what: &str, path: &str) -> Result<Vec<Vec<u8>>> {
    tree::split_path(path).map_err(|e| fail(what, path, e))
}

/// A version of the volume, for reading: its root and its inode table.
pub struct Version {
    pub root: Hash,
    pub inodes: Inodes,
}

impl Version {
    pub fn of(store: &BlobStore, commit: &Commit) -> FsResult<Version> {
        Ok(Version {
            root: commit.root,
            inodes: links::load(store, commit.inodes)?,
        })
    }

    /// The volume's current version.
    pub fn head(v: &Volume) -> FsResult<Version> {
        Version::of(&v.store, &v.head()?.1)
    }

    /// A version by name: HEAD, HEAD~N, a snapshot, a commit hash.
    pub fn at(v: &Volume, name: &str) -> FsResult<Version> {
        let commit = v.store.commit(&history::resolve(v, name)?)?;
        Version::of(&v.store, &commit)
    }

    /// The entry at a path, hard links resolved (`None` for the root).
    pub fn lookup(&self, store: &BlobStore, names: &[Vec<u8>]) -> FsResult<Option<Entry>> {
        Ok(tree::lookup(store, self.root, names)?.map(|e| links::resolve(&self.inodes, e)))
    }
}

/// An entry's size as `ls` shows it: a file's bytes, a symlink's target length.
pub fn size_of(e: &Entry) -> u64 {
    match &e.content {
        Content::File { size, .. } => *size,
        Content::Symlink { target } => target.len() as u64,
        _ => 0,
    }
}

/// The kind letter `ls -l` prints first.
pub fn kind_char(e: &Entry) -> char {
    match e.content {
        Content::File { .. } => '-',
        Content::Dir { .. } => 'd',
        Content::Symlink { .. } => 'l',
        Content::Fifo | Content::Inode { .. } => 'p',
        Content::Device { kind, .. } => match kind {
            DeviceKind::Char => 'c',
            DeviceKind::Block => 'b',
            DeviceKind::Socket => 's',
        },
    }
}

/// The kind as `stat` names it.
pub fn kind_name(e: &Entry) -> &'static str {
    match e.content {
        Content::File { .. } => "regular file",
        Content::Dir { .. } => "directory",
        Content::Symlink { .. } => "symbolic link",
        Content::Fifo | Content::Inode { .. } => "fifo",
        Content::Device { kind, .. } => match kind {
            DeviceKind::Char => "character special file",
            DeviceKind::Block => "block special file",
            DeviceKind::Socket => "socket",
        },
    }
}

/// `ls`: a directory's entries, or the file itself (named by its last name).
pub fn list(v: &Volume, path: &str) -> Result<Vec<(Vec<u8>, Entry)>> {
    let what = "cannot access";
    let names = names(what, path)?;
    let version = Version::head(v).map_err(|e| fail(what, path, e))?;
    let entry = version
        .lookup(&v.store, &names)
        .map_err(|e| fail(what, path, e))?;
    Ok(match entry {
        Some(e) if !matches!(e.content, Content::Dir { .. }) => {
            vec![(names.last().cloned().unwrap_or_default(), e)]
        }
        _ => tree::list(&v.store, version.root, &names)
            .map_err(|e| fail(what, path, e))?
            .into_iter()
            .map(|(n, e)| (n, links::resolve(&version.inodes, e)))
            .collect(),
    })
}

/// `stat`: a path's entry (`None` for the volume's root).
pub fn stat(v: &Volume, path: &str) -> Result<Option<Entry>> {
    let what = "cannot stat";
    let names = names(what, path)?;
    let version = Version::head(v).map_err(|e| fail(what, path, e))?;
    version.lookup(&v.store, &names).map_err(|e| fail(what, path, e))
}

/// `cat`: writes the files' bytes to `out`, in order, from the current
/// version or the one `at` names.
pub fn cat(v: &Volume, paths: &[String], at: Option<&str>, out: &mut dyn Write) -> Result<()> {
    let version = match at {
        None => Version::head(v),
        Some(at) => Version::at(v, at),
    }
    .map_err(plain)?;
    for path in paths {
        let failed = |e: FsError| Error(format!("{path}: {e}"));
        let names = tree::split_path(path).map_err(failed)?;
        match version.lookup(&v.store, &names).map_err(failed)? {
            Some(Entry {
                content: Content::File { manifest, .. },
                ..
            }) => {
                tree::read_file(&v.store, &manifest, &mut *out).map_err(failed)?;
            }
            _ => return Err(failed(FsError::IsDir)),
        }
    }
    Ok(())
}

/// `put`: copies a local file, symlink or directory tree into the volume in
/// one commit. Into an existing directory, a local directory's children are
/// added (replacing same names); anywhere else the local tree becomes the
/// entry. `progress` shows a bar of bytes copied.
pub fn put(v: &Volume, local: &Path, remote: &str, progress: bool) -> Result<()> {
    let names = names("cannot create", remote)?;
    let chunking = v.chunking().map_err(|e| fail("cannot copy to", remote, e))?;
    let bar = if progress {
        let bar = indicatif::ProgressBar::new(local_size(local));
        bar.set_style(
            indicatif::ProgressStyle::with_template("{bytes}/{total_bytes} {wide_bar} {bytes_per_sec} {eta}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };
    v.change(&format!("put {remote}"), |s, root| {
        let built = build_entry(s, local, chunking, &bar);
        bar.finish_and_clear();
        place(s, root, &names, &built?)
    })
    .map_err(|e| fail("cannot copy to", remote, e))?;
    Ok(())
}

/// Where `put` puts a built entry (see [`put`]).
fn place(store: &BlobStore, root: Hash, remote: &[Vec<u8>], built: &Entry) -> FsResult<Hash> {
    let target = match tree::lookup(store, root, remote) {
        Ok(e) => Some(e),
        Err(FsError::NotFound) => None,
        Err(e) => return Err(e),
    };
    let target_is_dir = |t: &Option<Entry>| {
        matches!(
            t,
            None | Some(Entry {
                content: Content::Dir { .. },
                ..
            })
        )
    };
    match (target, &built.content) {
        // The root, or an existing directory, receiving a directory's children.
        (Some(t), Content::Dir { tree }) if target_is_dir(&t) => {
            tree::insert_many(store, root, remote, store.dir(tree)?)
        }
        (Some(t), _) if target_is_dir(&t) => Err(FsError::IsDir),
        _ => tree::update(store, root, remote, &mut |_| Ok(Some(built.clone()))),
    }
}

/// Builds the entry for a local file, symlink or directory tree, storing its
/// blobs bottom-up: each directory blob is written once, whatever its size.
fn build_entry(
    store: &BlobStore,
    local: &Path,
    chunking: Chunking,
    progress: &indicatif::ProgressBar,
) -> FsResult<Entry> {
    let meta = std::fs::symlink_metadata(local)?;
    let mode = std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o7777;
    if meta.is_dir() {
        let mut dir = crate::object::Dir::new();
        for child in std::fs::read_dir(local)? {
            let child = child?;
            let name = child.file_name().as_encoded_bytes().to_vec();
            dir.insert(name, build_entry(store, &child.path(), chunking, progress)?);
        }
        tree::dir_entry(store, &dir, mode)
    } else if meta.file_type().is_symlink() {
        let target = std::fs::read_link(local)?;
        Ok(Entry {
            meta: tree::new_meta(0o777),
            content: Content::Symlink {
                target: target.as_os_str().as_encoded_bytes().to_vec(),
            },
        })
    } else {
        let file = progress.wrap_read(std::fs::File::open(local)?);
        tree::file_entry(store, file, mode, chunking)
    }
}

/// Bytes of regular files under `local` (for the progress bar).
fn local_size(local: &Path) -> u64 {
    match std::fs::symlink_metadata(local) {
        Ok(m) if m.is_dir() => std::fs::read_dir(local)
            .map(|rd| rd.filter_map(|e| e.ok()).map(|e| local_size(&e.path())).sum())
            .unwrap_or(0),
        Ok(m) if m.is_file() => m.len(),
        _ => 0,
    }
}

/// `get`: copies a file or directory tree (the root: the whole volume) out
/// to `local`. Device nodes, fifos and sockets are not recreated: making
/// them needs root, and a socket is only a name.
pub fn get(v: &Volume, remote: &str, local: &Path) -> Result<()> {
    let names = names("cannot stat", remote)?;
    let version = Version::head(v).map_err(|e| fail("cannot stat", remote, e))?;
    let entry = version
        .lookup(&v.store, &names)
        .map_err(|e| fail("cannot stat", remote, e))?;
    get_tree(&v.store, &version, entry, local).map_err(|e| fail("cannot copy", remote, e))
}

fn get_tree(store: &BlobStore, version: &Version, entry: Option<Entry>, local: &Path) -> FsResult<()> {
    let content = match entry {
        None => Content::Dir { tree: version.root },
        Some(e) => links::resolve(&version.inodes, e).content,
    };
    match content {
        Content::File { manifest, .. } => {
            let mut out = std::io::BufWriter::new(std::fs::File::create(local)?);
            tree::read_file(store, &manifest, &mut out)?;
            out.flush()?;
        }
        Content::Dir { tree } => {
            std::fs::create_dir_all(local)?;
            for (name, e) in store.dir(&tree)? {
                let child = local.join(std::ffi::OsStr::from_bytes(&name));
                get_tree(store, version, Some(e), &child)?;
            }
        }
        Content::Symlink { target } => {
            std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(&target), local)?;
        }
        Content::Fifo | Content::Device { .. } | Content::Inode { .. } => {}
    }
    Ok(())
}

/// `mkdir [-p]`.
pub fn mkdir(v: &Volume, path: &str, parents: bool) -> Result<()> {
    let what = "cannot create directory";
    let names = names(what, path)?;
    v.change(&format!("mkdir {path}"), |s, mut root| {
        if !parents {
            return tree::mkdir(s, root, &names, 0o755);
        }
        for i in 1..=names.len() {
            match tree::mkdir(s, root, &names[..i], 0o755) {
                Ok(r) => root = r,
                Err(FsError::Exists) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(root)
    })
    .map_err(|e| fail(what, path, e))?;
    Ok(())
}

/// `rm [-r]`.
pub fn rm(v: &Volume, path: &str, recursive: bool) -> Result<()> {
    let names = names("cannot remove", path)?;
    v.change(&format!("rm {path}"), |s, root| {
        if recursive {
            tree::remove_all(s, root, &names)
        } else {
            tree::unlink(s, root, &names)
        }
    })
    .map_err(|e| fail("cannot remove", path, e))?;
    Ok(())
}

/// `mv`.
pub fn mv(v: &Volume, from: &str, to: &str) -> Result<()> {
    let what = format!("cannot move '{from}' to");
    let f = names(&what, from)?;
    let t = names(&what, to)?;
    v.change(&format!("mv {from} {to}"), |s, root| {
        tree::rename(s, root, &f, &t)
    })
    .map_err(|e| fail(&what, to, e))?;
    Ok(())
}

/// `ln -s TARGET PATH`.
pub fn symlink(v: &Volume, target: &str, path: &str) -> Result<()> {
    let what = "failed to create symbolic link";
    let names = names(what, path)?;
    v.change(&format!("ln -s {target} {path}"), |s, root| {
        tree::symlink(s, root, &names, target.as_bytes())
    })
    .map_err(|e| fail(what, path, e))?;
    Ok(())
}

/// `du`: bytes of the files under a path (a file: its own size).
pub fn du(v: &Volume, path: &str) -> Result<u64> {
    let what = "cannot access";
    let names = names(what, path)?;
    let version = Version::head(v).map_err(|e| fail(what, path, e))?;
    match version
        .lookup(&v.store, &names)
        .map_err(|e| fail(what, path, e))?
    {
        None => du_tree(&v.store, &version.inodes, version.root),
        Some(Entry {
            content: Content::Dir { tree },
            ..
        }) => du_tree(&v.store, &version.inodes, tree),
        Some(e) => Ok(size_of(&e)),
    }
    .map_err(|e| fail(what, path, e))
}

fn du_tree(store: &BlobStore, inodes: &Inodes, tree: Hash) -> FsResult<u64> {
    let mut total = 0;
    for e in store.dir(&tree)?.into_values() {
        let e = links::resolve(inodes, e);
        total += match e.content {
            Content::Dir { tree } => du_tree(store, inodes, tree)?,
            _ => size_of(&e),
        };
    }
    Ok(total)
}

/// `restore PATH --from VERSION`: brings back a path as it was, as a new
/// commit. Hard links inside what is restored come back as plain files.
pub fn restore(v: &Volume, path: &str, from: &str) -> Result<()> {
    let names = names("cannot restore", path)?;
    let old = Version::at(v, from).map_err(|e| fail("cannot find version", from, e))?;
    let entry = old
        .lookup(&v.store, &names)
        .and_then(|e| e.map(|e| links::detach(&v.store, &old.inodes, e)).transpose())
        .map_err(|e| fail(&format!("cannot restore (in {from})"), path, e))?
        .ok_or_else(|| Error("cannot restore the root itself; restore its entries".into()))?;
    // The old version may be collected meanwhile; the lease keeps what the
    // restored entry needs until the commit references it.
    if let Some(h) = entry.content.blob() {
        v.store.protect(crate::lease::Kind::Tree, [&h]).map_err(plain)?;
    }
    v.change(&format!("restore {path} from {from}"), |s, root| {
        tree::update(s, root, &names, &mut |_| Ok(Some(entry.clone())))
    })
    .map_err(|e| fail("cannot restore", path, e))?;
    Ok(())
}

/// What `fsck` found, and what `--repair` renamed.
pub struct Fsck {
    pub check: history::Check,
    /// Damaged paths renamed to `NAME.damaged` (with `repair`).
    pub renamed: Vec<String>,
}

/// `fsck [--at VERSION] [--repair]`: reads and checks every blob a version
/// reaches. With `repair` (HEAD only), renames each damaged path to
/// `NAME.damaged` in one commit, so nothing mistakes it for intact data.
pub fn fsck(v: &Volume, at: &str, repair: bool) -> Result<Fsck> {
    let c = history::resolve(v, at).map_err(|e| fail("cannot find version", at, e))?;
    let tree = v.store.commit(&c).map_err(plain)?.tree();
    let check = history::fsck(&v.store, tree);
    let mut renamed = Vec::new();
    if repair && !check.damaged.is_empty() {
        v.change("fsck --repair", |s, mut root| {
            renamed.clear();
            for (path, _) in &check.damaged {
                let Ok(from) = tree::split_path(path) else {
                    continue;
                };
                let Some((name, parent)) = from.split_last() else {
                    continue;
                };
                let mut to = parent.to_vec();
                to.push([name.as_slice(), b".damaged"].concat());
                // A damaged path under a damaged directory cannot be reached.
                if let Ok(r) = tree::rename(s, root, &from, &to) {
                    root = r;
                    renamed.push(path.clone());
                }
            }
            Ok(root)
        })
        .map_err(|e| Error(format!("fsck --repair: {e}")))?;
    }
    Ok(Fsck { check, renamed })
}

/// `stats`: a version's sizes, with the lengths of its history.
pub struct Stats {
    pub commit: Hash,
    pub sizes: history::Stats,
    pub commits: usize,
    pub snapshots: usize,
}

pub fn stats(v: &Volume, at: &str) -> Result<Stats> {
    let commit = history::resolve(v, at).map_err(|e| fail("cannot find version", at, e))?;
    let tree = v.store.commit(&commit).map_err(plain)?.tree();
    Ok(Stats {
        commit,
        sizes: history::stats(&v.store, tree).map_err(plain)?,
        commits: v.log(usize::MAX).map_err(plain)?.len(),
        snapshots: history::snapshots(v).map_err(plain)?.len(),
    })
}

/// How `fsclient mount` serves a volume.
pub struct MountSettings {
    pub mount: crate::mount::MountOptions,
    /// Commit on the close of a written file (close-to-open).
    pub commit_on_close: bool,
    /// Access times with Linux's relatime rules (else none: `noatime`).
    pub relatime: bool,
    /// Serve Prometheus metrics at this `HOST:PORT`.
    pub metrics_addr: Option<String>,
}

/// `mount`: serves volume `v` (of the store at `store_url`, for messages) at
/// the mountpoint until it is unmounted; `mounted` is called with the
/// mountpoint once the kernel has it. An error after that means the mount
/// stopped with writes not in the store, and says so.
pub fn mount(v: Volume, store_url: &str, settings: MountSettings, mounted: impl FnOnce(&str)) -> Result<()> {
    let chunking = v
        .chunking()
        .map_err(|e| Error(format!("cannot read volume settings: {e}")))?;
    let name = v.name.clone();
    let opts = crate::vfs::Options {
        chunking,
        commit_on_close: settings.commit_on_close,
        relatime: settings.relatime,
        ..Default::default()
    };
    let vfs = crate::vfs::Vfs::new(v, opts)
        .map_err(|e| Error(format!("cannot open volume '{name}' in {store_url}: {e}")))?;
    let vfs = std::sync::Arc::new(vfs);
    if let Some(addr) = &settings.metrics_addr {
        crate::metrics::serve(vfs.metrics().clone(), addr).map_err(plain)?;
    }
    let shown = settings.mount.mountpoint.display().to_string();
    let served = std::cell::Cell::new(false);
    let mut mounted = Some(mounted);
    crate::mount::serve(vfs, &settings.mount, || {
        served.set(true);
        if let Some(f) = mounted.take() {
            f(&shown)
        }
    })
    .map_err(|e| match served.get() {
        // It served, and failed on the way out (the store gone).
        true => Error(format!(
            "'{shown}' is unmounted, but what was written since the last commit is not in the store: {e}"
        )),
        false => Error(format!("cannot mount at '{shown}': {e}")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dict::{Dict, MemoryDict};
    use std::sync::Arc;

    /// A client of the volume `main` in `dict`, with a cache of its own.
    fn client(dict: &Arc<MemoryDict>) -> Volume {
        Volume::new(BlobStore::new(dict.clone(), "t:", 16 << 20), "main")
    }

    fn volume() -> Volume {
        let v = client(&Arc::new(MemoryDict::new()));
        v.create().unwrap();
        v
    }

    fn cat_all(v: &Volume, path: &str) -> Vec<u8> {
        let mut out = Vec::new();
        cat(v, &[path.to_string()], None, &mut out).unwrap();
        out
    }

    #[test]
    fn put_and_get_round_trip_a_local_tree() {
        let v = volume();
        let src = tempfile::tempdir().unwrap();
        std::fs::create_dir(src.path().join("sub")).unwrap();
        std::fs::write(src.path().join("a"), b"alpha").unwrap();
        std::fs::write(src.path().join("sub/b"), vec![7u8; 300_000]).unwrap();
        std::os::unix::fs::symlink("a", src.path().join("link")).unwrap();
        put(&v, src.path(), "/t", false).unwrap();
        assert_eq!(cat_all(&v, "/t/a"), b"alpha");
        assert_eq!(du(&v, "/t").unwrap(), 5 + 300_000 + 1);
        let names: Vec<String> = list(&v, "/t")
            .unwrap()
            .iter()
            .map(|(n, _)| tree::show(n))
            .collect();
        assert_eq!(names, ["a", "link", "sub"]);
        assert_eq!(kind_char(&stat(&v, "/t/link").unwrap().unwrap()), 'l');

        let dst = tempfile::tempdir().unwrap();
        get(&v, "/t", &dst.path().join("out")).unwrap();
        assert_eq!(
            std::fs::read(dst.path().join("out/sub/b")).unwrap(),
            vec![7u8; 300_000]
        );
        assert_eq!(
            std::fs::read_link(dst.path().join("out/link")).unwrap(),
            Path::new("a")
        );

        // Into an existing directory, a directory's children are added.
        let more = tempfile::tempdir().unwrap();
        std::fs::write(more.path().join("c"), b"gamma").unwrap();
        put(&v, more.path(), "/t", false).unwrap();
        assert_eq!(cat_all(&v, "/t/c"), b"gamma");
        assert_eq!(cat_all(&v, "/t/a"), b"alpha");
        // A file onto a directory is refused, as cp refuses it.
        let err = put(&v, &more.path().join("c"), "/t", false).unwrap_err();
        assert!(err.0.starts_with("cannot copy to '/t': "), "{err}");
    }

    #[test]
    fn each_change_is_one_commit_and_errors_read_like_coreutils() {
        let v = volume();
        mkdir(&v, "/a/b/c", true).unwrap();
        mkdir(&v, "/a/b/c", true).unwrap();
        assert!(mkdir(&v, "/a", false)
            .unwrap_err()
            .0
            .starts_with("cannot create directory '/a': "));
        symlink(&v, "b", "/a/l").unwrap();
        mv(&v, "/a/l", "/a/m").unwrap();
        assert_eq!(
            stat(&v, "/a/l").unwrap_err(),
            Error(format!("cannot stat '/a/l': {}", FsError::NotFound))
        );
        assert!(rm(&v, "/a", false).is_err());
        rm(&v, "/a", true).unwrap();
        assert!(list(&v, "/").unwrap().is_empty());
        // The second `mkdir -p` changed nothing, so it made no commit.
        let log = v.log(10).unwrap();
        let messages: Vec<&str> = log.iter().map(|(_, c)| c.message.as_str()).collect();
        assert_eq!(
            messages,
            ["rm /a", "mv /a/l /a/m", "ln -s b /a/l", "mkdir /a/b/c", "mkfs"]
        );
    }

    #[test]
    fn restore_brings_back_a_removed_file_and_stats_count_history() {
        let v = volume();
        let src = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(src.path(), b"kept").unwrap();
        put(&v, src.path(), "/f", false).unwrap();
        rm(&v, "/f", false).unwrap();
        restore(&v, "/f", "HEAD~1").unwrap();
        assert_eq!(cat_all(&v, "/f"), b"kept");
        let mut old = Vec::new();
        cat(&v, &["/f".into()], Some("HEAD~2"), &mut old).unwrap();
        assert_eq!(old, b"kept");
        let s = stats(&v, "HEAD").unwrap();
        assert_eq!((s.sizes.files, s.commits, s.snapshots), (1, 4, 0));
    }

    #[test]
    fn fsck_repair_renames_what_is_damaged() {
        let dict = Arc::new(MemoryDict::new());
        let v = client(&dict);
        v.create().unwrap();
        let src = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(src.path(), b"to be lost").unwrap();
        put(&v, src.path(), "/lost", false).unwrap();
        put(&v, src.path(), "/other", false).unwrap();
        assert!(fsck(&v, "HEAD", false).unwrap().check.damaged.is_empty());
        // Both names share one chunk; take it away from the store, and check
        // as a client that never cached it.
        let chunk = Hash::of(&crate::object::encode_chunk(b"to be lost"));
        dict.delete(&v.store.blob_key(&chunk)).unwrap();
        let v = client(&dict);
        let report = fsck(&v, "HEAD", true).unwrap();
        assert_eq!(report.check.damaged.len(), 2);
        assert_eq!(report.renamed, ["/lost", "/other"]);
        let names: Vec<String> = list(&v, "/")
            .unwrap()
            .iter()
            .map(|(n, _)| tree::show(n))
            .collect();
        assert_eq!(names, ["lost.damaged", "other.damaged"]);
    }
}
