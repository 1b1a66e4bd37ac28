//! `fsclient`: the dictfs file system from the command line.

use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use fsclient::dict::RespDict;
use fsclient::fstab;
use fsclient::history;
use fsclient::links;
use fsclient::object::{Content, Entry, Hash, Inodes};
use fsclient::store::BlobStore;
use fsclient::tree::{self, Chunking, FsError, FsResult};
use fsclient::volume::Volume;

/// fsclient — a file system kept as a content-addressed Merkle tree in any
/// Redis-speaking store (kvd, redis-server, Valkey).
///
/// Every change is one commit that atomically swaps the volume's root pointer;
/// concurrent writers are merged, never lost. Examples:
///
///     fsclient mkfs
///     fsclient put ./photos /photos
///     fsclient ls -l /photos
///     fsclient get /photos/cat.jpg ./cat.jpg
///     fsclient log
#[derive(Parser)]
#[command(version, about, long_about, verbatim_doc_comment)]
struct Cli {
    /// The store: redis://[:password@]host:port (kvd listens on 7379 by default).
    #[arg(long, env = "DICTFS_STORE", default_value = "redis://127.0.0.1:7379")]
    store: String,
    /// The volume: one file system tree (several can share a store).
    #[arg(long, env = "DICTFS_VOLUME", default_value = "main")]
    volume: String,
    /// Prefix of every key this file system writes, so several can share a store.
    #[arg(long, default_value = "dfs:")]
    prefix: String,
    /// Memory for the cache of blobs read (MiB). Blobs never change, so the
    /// cache is never stale; a bigger one helps random reads of large files.
    #[arg(long, default_value_t = 256)]
    cache_mib: usize,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create the volume (an empty root directory).
    ///
    /// Files are cut into content-defined chunks of about --chunk-avg bytes
    /// (between --chunk-min and --chunk-max); fixed for the volume's life.
    /// Sizes take K and M suffixes (powers of 2).
    #[command(verbatim_doc_comment)]
    Mkfs {
        #[arg(long, default_value = "256K", value_parser = parse_size)]
        chunk_min: u32,
        #[arg(long, default_value = "1M", value_parser = parse_size)]
        chunk_avg: u32,
        #[arg(long, default_value = "4M", value_parser = parse_size)]
        chunk_max: u32,
    },
    /// List a directory (or show a file).
    Ls {
        #[arg(default_value = "/")]
        path: String,
        /// Long format: kind, mode, size, mtime, name.
        #[arg(short)]
        long: bool,
    },
    /// Show an entry's metadata.
    Stat { path: String },
    /// Print files to standard output.
    Cat {
        #[arg(required = true)]
        paths: Vec<String>,
        /// Read from this version instead of the current one.
        #[arg(long)]
        at: Option<String>,
    },
    /// Copy a local file or directory tree into the volume (one commit).
    Put { local: PathBuf, remote: String },
    /// Copy a file or directory tree out of the volume.
    Get { remote: String, local: PathBuf },
    /// Create a directory.
    Mkdir {
        path: String,
        /// Create missing parents, and do not fail if it exists.
        #[arg(short)]
        parents: bool,
    },
    /// Remove a file (or, with -r, a directory tree).
    Rm {
        path: String,
        #[arg(short)]
        recursive: bool,
    },
    /// Move or rename.
    Mv { from: String, to: String },
    /// Make a symbolic link (`ln -s TARGET PATH`).
    Ln {
        #[arg(short, required = true)]
        symbolic: bool,
        target: String,
        path: String,
    },
    /// Show the commit history, newest first.
    Log {
        #[arg(short = 'n', default_value_t = 20)]
        count: usize,
    },
    /// Total size of the files under a path.
    Du {
        #[arg(default_value = "/")]
        path: String,
    },
    /// The volume's size, and what the store reports about its own space.
    Df,
    /// Named snapshots: versions kept under a name.
    Snapshot {
        #[command(subcommand)]
        action: SnapshotAction,
    },
    /// Paths that differ between two versions (HEAD, HEAD~N, a snapshot name, a
    /// commit hash); the second defaults to HEAD.
    Diff { from: String, to: Option<String> },
    /// Bring back a path as it was in a version (as a new commit).
    Restore {
        path: String,
        /// The version to take it from (a snapshot name, HEAD~N, a commit hash).
        #[arg(long)]
        from: String,
    },
    /// Mount the volume at a directory (FUSE): `fsclient mount [URL] DIR`.
    ///
    /// Runs in the foreground until unmounted (Ctrl-C, SIGTERM, or
    /// `fsclient umount DIR`); everything written is committed first.
    /// Changes are committed on fsync, on close of a written file, and every
    /// --commit-interval; other clients' commits show up as often.
    #[command(verbatim_doc_comment)]
    Mount {
        /// `[URL] MOUNTPOINT`: the store URL (else --store) and the directory.
        #[arg(num_args = 1..=2, required = true, value_names = ["URL", "MOUNTPOINT"])]
        args: Vec<String>,
        /// Detach: return once the file system is mounted, serve in the background.
        #[arg(long)]
        daemon: bool,
        /// With --daemon, write the log here (else it is discarded).
        #[arg(long)]
        log_file: Option<PathBuf>,
        /// Let other users use the mount (FUSE's allow_other; needs root or
        /// user_allow_other in /etc/fuse.conf).
        #[arg(long)]
        allow_other: bool,
        /// Milliseconds between commits and checks for other clients' commits.
        #[arg(long, default_value_t = 1000)]
        commit_interval_ms: u64,
        /// Threads serving the kernel's requests.
        #[arg(long, default_value_t = 4)]
        threads: usize,
        /// Do not commit on every close of a written file (faster for many
        /// small files; their commit then waits for the interval or fsync).
        #[arg(long)]
        no_commit_on_close: bool,
        /// Keep no access times (`noatime`). By default they follow Linux's
        /// `relatime`: a read updates a file's access time when it is older
        /// than its last change or a day old, carried in the next commit.
        #[arg(long)]
        noatime: bool,
        /// Serve Prometheus metrics at http://HOST:PORT/metrics: operations
        /// by kind and their latency, bytes, commits, cache, uploads pending.
        #[arg(long, value_name = "HOST:PORT")]
        metrics_addr: Option<String>,
        /// Also write the line to /etc/fstab that mounts this volume here at
        /// boot with these options (replacing one for the same directory);
        /// needs `mount.fuse.fsclient` installed (docs/OPERATIONS.md).
        #[arg(long)]
        update_fstab: bool,
    },
    /// Unmount a mounted volume, committing what is written first.
    Umount { mountpoint: PathBuf },
    /// One screen: the store's nodes and their state (up, suspect, down),
    /// data short of its copies, the volume's size and last commits, a
    /// running mount's uploads (--mount-metrics), and what to do about
    /// anything wrong.
    Status {
        /// A running mount's --metrics-addr, for its commits and pending uploads.
        #[arg(long, value_name = "HOST:PORT")]
        mount_metrics: Option<String>,
        /// Leave out the volume's sizes (they read every directory).
        #[arg(long)]
        quick: bool,
    },
    /// Sizes of a version (default HEAD): logical bytes, bytes its distinct
    /// blobs take in the store, dedup ratio, blobs by type, history length.
    Stats {
        #[arg(long, default_value = "HEAD")]
        at: String,
    },
    /// Read and check every blob reachable from a version (default HEAD);
    /// report damage by path. Exits 1 if anything is damaged.
    Fsck {
        #[arg(long, default_value = "HEAD")]
        at: String,
        /// Rename each damaged file or directory of HEAD to NAME.damaged (one
        /// commit), so that nothing mistakes it for intact data. The store has no
        /// second copy to fetch a good one from (kvd replication is not built yet).
        #[arg(long, conflicts_with = "at")]
        repair: bool,
    },
    /// Delete the blobs no kept version of any volume needs (all volumes under
    /// --prefix: blobs are shared between them).
    ///
    /// Kept: every volume's current version, its named snapshots, and the
    /// versions the retention rules pick (below); the commit records of the rest
    /// stay (so `log` is whole), their files go. Safe while other clients read
    /// and write: a writer's new or reused blobs are leased, and writers pause
    /// only during the short deletion windows. Examples:
    ///
    ///     fsclient gc --dry-run
    ///     fsclient gc --keep-within 1d --keep-daily 30
    ///
    /// --keep-within must be longer than any client works from an old version
    /// (a mount refreshes every commit interval): 0 suits tests and idle stores.
    #[command(verbatim_doc_comment)]
    Gc {
        /// Report what would be deleted and the bytes freed; delete nothing.
        #[arg(long)]
        dry_run: bool,
        /// Keep every version younger than this (90s, 15m, 2h, 7d).
        #[arg(long, default_value = "1h", value_parser = fsclient::gc::policy::parse_duration)]
        keep_within: std::time::Duration,
        /// Keep the newest version of each of the last N hours that have one.
        #[arg(long, default_value_t = 24)]
        keep_hourly: u32,
        /// Keep the newest version of each of the last N days that have one.
        #[arg(long, default_value_t = 7)]
        keep_daily: u32,
        /// Candidates examined per deletion window (writers wait while one is open).
        #[arg(long, default_value_t = 20_000)]
        window: usize,
    },
}

#[derive(Subcommand)]
enum SnapshotAction {
    /// Name the current version (or --at another one).
    Create {
        name: String,
        #[arg(long)]
        at: Option<String>,
    },
    List,
    Delete {
        name: String,
    },
}

/// An error worded as coreutils words it: `cannot stat 'x': No such file or directory`.
struct Failure(String);

fn fail(what: &str, path: &str, e: FsError) -> Failure {
    Failure(format!("{what} '{path}': {e}"))
}

/// `4096`, `256K`, `1M`.
fn parse_size(s: &str) -> Result<u32, String> {
    let (digits, shift) = match s.strip_suffix(['K', 'k']) {
        Some(d) => (d, 10),
        None => match s.strip_suffix(['M', 'm']) {
            Some(d) => (d, 20),
            None => (s, 0),
        },
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("'{s}' is not a size like 4096, 256K or 1M"))?;
    u32::try_from(n << shift).map_err(|_| format!("'{s}' is too large"))
}

fn p(path: &str) -> FsResult<Vec<Vec<u8>>> {
    tree::split_path(path)
}

fn kind_char(e: &Entry) -> char {
    match e.content {
        Content::File { .. } => '-',
        Content::Dir { .. } => 'd',
        Content::Symlink { .. } => 'l',
        Content::Fifo | Content::Inode { .. } => 'p',
        Content::Device { kind, .. } => match kind {
            fsclient::object::DeviceKind::Char => 'c',
            fsclient::object::DeviceKind::Block => 'b',
            fsclient::object::DeviceKind::Socket => 's',
        },
    }
}

/// A version of the volume, for reading: its root and its inode table.
struct Version {
    root: Hash,
    inodes: Inodes,
}

impl Version {
    fn of(store: &BlobStore, commit: &fsclient::object::Commit) -> FsResult<Version> {
        Ok(Version {
            root: commit.root,
            inodes: links::load(store, commit.inodes)?,
        })
    }

    fn head(v: &Volume) -> FsResult<Version> {
        Version::of(&v.store, &v.head()?.1)
    }

    /// The entry at a path, hard links resolved (`None` for the root).
    fn lookup(&self, store: &BlobStore, names: &[Vec<u8>]) -> FsResult<Option<Entry>> {
        Ok(tree::lookup(store, self.root, names)?.map(|e| links::resolve(&self.inodes, e)))
    }
}

fn size_of(e: &Entry) -> u64 {
    match &e.content {
        Content::File { size, .. } => *size,
        Content::Symlink { target } => target.len() as u64,
        _ => 0,
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
        let mut dir = fsclient::object::Dir::new();
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
            .map(|rd| rd.filter_map(Result::ok).map(|e| local_size(&e.path())).sum())
            .unwrap_or(0),
        Ok(m) if m.is_file() => m.len(),
        _ => 0,
    }
}

/// `put`: into an existing directory, the local directory's children are added
/// (replacing same names); anywhere else the local tree becomes the entry.
fn put_tree(
    store: &BlobStore,
    root: Hash,
    local: &Path,
    remote: &[Vec<u8>],
    chunking: Chunking,
) -> FsResult<Hash> {
    let progress = indicatif::ProgressBar::new(local_size(local));
    progress.set_style(
        indicatif::ProgressStyle::with_template("{bytes}/{total_bytes} {wide_bar} {bytes_per_sec} {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let built = build_entry(store, local, chunking, &progress);
    progress.finish_and_clear();
    let built = built?;
    let target = match tree::lookup(store, root, remote) {
        Ok(e) => Some(e),
        Err(FsError::NotFound) => None,
        Err(e) => return Err(e),
    };
    match (target, &built.content) {
        // The root, or an existing directory, receiving a directory's children.
        (Some(None), Content::Dir { tree })
        | (
            Some(Some(Entry {
                content: Content::Dir { .. },
                ..
            })),
            Content::Dir { tree },
        ) => tree::insert_many(store, root, remote, store.dir(tree)?),
        (Some(None), _) => Err(FsError::IsDir),
        (
            Some(Some(Entry {
                content: Content::Dir { .. },
                ..
            })),
            _,
        ) => Err(FsError::IsDir),
        _ => tree::update(store, root, remote, &mut |_| Ok(Some(built.clone()))),
    }
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
        // Not recreated on `get`: making device nodes needs root, and a socket
        // is only a name.
        Content::Fifo | Content::Device { .. } | Content::Inode { .. } => {}
    }
    Ok(())
}

fn du(store: &BlobStore, inodes: &Inodes, tree: Hash) -> FsResult<u64> {
    let mut total = 0;
    for e in store.dir(&tree)?.into_values() {
        let e = links::resolve(inodes, e);
        total += match e.content {
            Content::Dir { tree } => du(store, inodes, tree)?,
            _ => size_of(&e),
        };
    }
    Ok(total)
}

/// Whether `dir` is a dictfs mount (per /proc/self/mounts).
fn is_mounted(dir: &Path) -> bool {
    let Ok(dir) = std::fs::canonicalize(dir) else {
        return false;
    };
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    mounts.lines().any(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        f.len() > 2 && Path::new(f[1]) == dir && f[0].starts_with("dictfs:") && f[2].starts_with("fuse")
    })
}

/// Starts this program again without --daemon, detached, and waits until the
/// file system is mounted (or the child fails).
fn daemonize(mountpoint: &Path, log_file: Option<&Path>) -> Result<(), Failure> {
    use std::os::unix::process::CommandExt;
    let args: Vec<std::ffi::OsString> = ARGS
        .get()
        .expect("set by main")
        .iter()
        .filter(|a| *a != "--daemon")
        .cloned()
        .collect();
    let log = match log_file {
        Some(p) => std::process::Stdio::from(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|e| Failure(format!("cannot open log file '{}': {e}", p.display())))?,
        ),
        None => std::process::Stdio::null(),
    };
    let exe = std::env::current_exe().map_err(|e| Failure(format!("cannot find own executable: {e}")))?;
    let mut cmd = std::process::Command::new(exe);
    cmd.args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log);
    // SAFETY: setsid is async-signal-safe; it only detaches from the terminal.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|e| Failure(format!("cannot start: {e}")))?;
    for _ in 0..300 {
        if is_mounted(mountpoint) {
            println!("mounted at {} (pid {})", mountpoint.display(), child.id());
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(Failure(format!(
                "mount failed ({status}); see the log (--log-file)"
            )));
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let _ = child.kill();
    Err(Failure(format!(
        "'{}' was not mounted within 15 s",
        mountpoint.display()
    )))
}

/// Writes (or replaces) the fstab line for this mount: in /etc/fstab, or the
/// file `FSCLIENT_FSTAB` names.
fn write_fstab(store: &str, volume: &str, mountpoint: &Path, options: &[String]) -> Result<(), Failure> {
    let path = std::env::var_os("FSCLIENT_FSTAB").map_or_else(|| PathBuf::from("/etc/fstab"), PathBuf::from);
    let dir = std::fs::canonicalize(mountpoint).map_err(|e| {
        Failure(format!(
            "cannot use '{}' as a mountpoint: {e}",
            mountpoint.display()
        ))
    })?;
    let line = fstab::fstab_line(store, volume, &dir.to_string_lossy(), options);
    let old = match std::fs::read_to_string(&path) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(Failure(format!("cannot read {}: {e}", path.display()))),
    };
    // Written beside it and renamed over it: a crash leaves the old or the new.
    let tmp = path.with_extension("fsclient-new");
    std::fs::write(&tmp, fstab::with_line(&old, &line))
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(|e| Failure(format!("cannot write {}: {e}", path.display())))?;
    eprintln!("fsclient: {} now has: {line}", path.display());
    Ok(())
}

fn umount(mountpoint: &Path) -> Result<(), Failure> {
    let shown = mountpoint.display();
    if !is_mounted(mountpoint) {
        return Err(Failure(format!("cannot unmount '{shown}': not a dictfs mount")));
    }
    // fsync on the root directory commits everything written so far.
    if let Err(e) = std::fs::File::open(mountpoint).and_then(|d| d.sync_all()) {
        eprintln!("fsclient: warning: could not commit before unmounting '{shown}': {e}");
    }
    let fusermount = std::process::Command::new("fusermount3")
        .arg("-u")
        .arg(mountpoint)
        .status();
    if matches!(fusermount, Ok(s) if s.success()) {
        return Ok(());
    }
    let c = std::ffi::CString::new(mountpoint.as_os_str().as_bytes())
        .map_err(|_| Failure(format!("cannot unmount '{shown}': bad path")))?;
    // SAFETY: a valid NUL-terminated path.
    if unsafe { libc::umount2(c.as_ptr(), 0) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(Failure(format!("cannot unmount '{shown}': {e}")));
    }
    Ok(())
}

fn run(cli: Cli) -> Result<(), Failure> {
    let cli = match cli.command {
        Command::Umount { mountpoint } => return umount(&mountpoint),
        Command::Mount { ref args, .. } if args.len() == 2 => Cli {
            store: args[0].clone(),
            ..cli
        },
        _ => cli,
    };
    let dict = Arc::new(
        RespDict::open(&cli.store).map_err(|e| Failure(format!("cannot reach {}: {e}", cli.store)))?,
    );
    let store = BlobStore::new(dict.clone(), &cli.prefix, cli.cache_mib.max(16) << 20);
    let v = Volume::new(store.clone(), &cli.volume);
    match cli.command {
        Command::Umount { .. } => unreachable!("handled above"),
        Command::Mount {
            args,
            daemon,
            log_file,
            allow_other,
            commit_interval_ms,
            threads,
            no_commit_on_close,
            noatime,
            metrics_addr,
            update_fstab,
        } => {
            let mountpoint = PathBuf::from(args.last().expect("clap requires one"));
            if update_fstab {
                let mut options = Vec::new();
                if commit_interval_ms != 1000 {
                    options.push(format!("commit_interval_ms={commit_interval_ms}"));
                }
                if threads != 4 {
                    options.push(format!("threads={threads}"));
                }
                if let Some(addr) = &metrics_addr {
                    options.push(format!("metrics_addr={addr}"));
                }
                for (on, name) in [
                    (allow_other, "allow_other"),
                    (noatime, "noatime"),
                    (no_commit_on_close, "no_commit_on_close"),
                ] {
                    if on {
                        options.push(name.to_string());
                    }
                }
                write_fstab(&cli.store, &cli.volume, &mountpoint, &options)?;
            }
            if daemon {
                return daemonize(&mountpoint, log_file.as_deref());
            }
            let chunking = v
                .chunking()
                .map_err(|e| Failure(format!("cannot read volume settings: {e}")))?;
            let opts = fsclient::vfs::Options {
                chunking,
                commit_on_close: !no_commit_on_close,
                relatime: !noatime,
                ..Default::default()
            };
            let vfs = fsclient::vfs::Vfs::new(v, opts).map_err(|e| {
                Failure(format!(
                    "cannot open volume '{}' in {}: {e}",
                    cli.volume, cli.store
                ))
            })?;
            let mount = fsclient::mount::MountOptions {
                mountpoint: mountpoint.clone(),
                allow_other,
                threads,
                commit_interval: std::time::Duration::from_millis(commit_interval_ms.max(10)),
            };
            let vfs = Arc::new(vfs);
            if let Some(addr) = &metrics_addr {
                fsclient::metrics::serve(vfs.metrics().clone(), addr).map_err(|e| Failure(e.to_string()))?;
            }
            let shown = mountpoint.display().to_string();
            let mounted = std::cell::Cell::new(false);
            fsclient::mount::serve(vfs, &mount, || {
                mounted.set(true);
                eprintln!(
                    "fsclient: volume '{}' mounted at {shown}; Ctrl-C unmounts",
                    cli.volume
                )
            })
            .map_err(|e| match mounted.get() {
                // It served, and failed on the way out (the store gone).
                true => Failure(format!(
                    "'{shown}' is unmounted, but what was written since the last commit is not in the store: {e}"
                )),
                false => Failure(format!("cannot mount at '{shown}': {e}")),
            })?;
        }
        Command::Mkfs {
            chunk_min,
            chunk_avg,
            chunk_max,
        } => {
            let chunking = Chunking {
                min: chunk_min,
                avg: chunk_avg,
                max: chunk_max,
            };
            v.create_with(chunking).map_err(|e| match e {
                FsError::Exists => Failure(format!("volume '{}' already exists", cli.volume)),
                e => Failure(format!("cannot create volume '{}': {e}", cli.volume)),
            })?;
            println!("created volume '{}' in {}", cli.volume, cli.store);
        }
        Command::Ls { path, long } => {
            let names = p(&path).map_err(|e| fail("cannot access", &path, e))?;
            let version = Version::head(&v).map_err(|e| fail("cannot access", &path, e))?;
            let entry = version
                .lookup(&store, &names)
                .map_err(|e| fail("cannot access", &path, e))?;
            let listing: Vec<(Vec<u8>, Entry)> = match entry {
                Some(e) if !matches!(e.content, Content::Dir { .. }) => {
                    vec![(names.last().cloned().unwrap_or_default(), e)]
                }
                _ => tree::list(&store, version.root, &names)
                    .map_err(|e| fail("cannot access", &path, e))?
                    .into_iter()
                    .map(|(n, e)| (n, links::resolve(&version.inodes, e)))
                    .collect(),
            };
            let mut out = std::io::stdout().lock();
            for (name, e) in listing {
                let name = tree::show(&name);
                let line = if long {
                    format!(
                        "{}{:04o} {:>12} {} {}",
                        kind_char(&e),
                        e.meta.mode & 0o7777,
                        size_of(&e),
                        e.meta.mtime.secs,
                        name
                    )
                } else {
                    name
                };
                let _ = writeln!(out, "{line}");
            }
        }
        Command::Stat { path } => {
            let names = p(&path).map_err(|e| fail("cannot stat", &path, e))?;
            let version = Version::head(&v).map_err(|e| fail("cannot stat", &path, e))?;
            match version
                .lookup(&store, &names)
                .map_err(|e| fail("cannot stat", &path, e))?
            {
                None => println!("  File: {path}\n  Type: directory (volume root)"),
                Some(e) => {
                    let kind = match e.content {
                        Content::File { .. } => "regular file",
                        Content::Dir { .. } => "directory",
                        Content::Symlink { .. } => "symbolic link",
                        Content::Fifo | Content::Inode { .. } => "fifo",
                        Content::Device { kind, .. } => match kind {
                            fsclient::object::DeviceKind::Char => "character special file",
                            fsclient::object::DeviceKind::Block => "block special file",
                            fsclient::object::DeviceKind::Socket => "socket",
                        },
                    };
                    println!(
                        "  File: {path}\n  Size: {}\n  Type: {kind}\n  Mode: {:04o}  Uid: {}  Gid: {}\nModify: {}.{:09}\nChange: {}.{:09}",
                        size_of(&e),
                        e.meta.mode,
                        e.meta.uid,
                        e.meta.gid,
                        e.meta.mtime.secs,
                        e.meta.mtime.nanos,
                        e.meta.ctime.secs,
                        e.meta.ctime.nanos
                    );
                }
            }
        }
        Command::Cat { paths, at } => {
            let version = match at {
                None => Version::head(&v),
                Some(at) => history::resolve(&v, &at).and_then(|c| Version::of(&store, &store.commit(&c)?)),
            }
            .map_err(|e| Failure(e.to_string()))?;
            let mut out = std::io::stdout().lock();
            for path in paths {
                let names = p(&path).map_err(|e| Failure(format!("{path}: {e}")))?;
                match version
                    .lookup(&store, &names)
                    .map_err(|e| Failure(format!("{path}: {e}")))?
                {
                    Some(Entry {
                        content: Content::File { manifest, .. },
                        ..
                    }) => {
                        tree::read_file(&store, &manifest, &mut out)
                            .map_err(|e| Failure(format!("{path}: {e}")))?;
                    }
                    _ => return Err(Failure(format!("{path}: {}", FsError::IsDir))),
                }
            }
        }
        Command::Put { local, remote } => {
            let names = p(&remote).map_err(|e| fail("cannot create", &remote, e))?;
            let chunking = v.chunking().map_err(|e| fail("cannot copy to", &remote, e))?;
            v.change(&format!("put {remote}"), |s, root| {
                put_tree(s, root, &local, &names, chunking)
            })
            .map_err(|e| fail("cannot copy to", &remote, e))?;
        }
        Command::Get { remote, local } => {
            let names = p(&remote).map_err(|e| fail("cannot stat", &remote, e))?;
            let version = Version::head(&v).map_err(|e| fail("cannot stat", &remote, e))?;
            let entry = version
                .lookup(&store, &names)
                .map_err(|e| fail("cannot stat", &remote, e))?;
            get_tree(&store, &version, entry, &local).map_err(|e| fail("cannot copy", &remote, e))?;
        }
        Command::Mkdir { path, parents } => {
            let names = p(&path).map_err(|e| fail("cannot create directory", &path, e))?;
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
            .map_err(|e| fail("cannot create directory", &path, e))?;
        }
        Command::Rm { path, recursive } => {
            let names = p(&path).map_err(|e| fail("cannot remove", &path, e))?;
            v.change(&format!("rm {path}"), |s, root| {
                if recursive {
                    tree::remove_all(s, root, &names)
                } else {
                    tree::unlink(s, root, &names)
                }
            })
            .map_err(|e| fail("cannot remove", &path, e))?;
        }
        Command::Mv { from, to } => {
            let (f, t) = (p(&from), p(&to));
            let what = format!("cannot move '{from}' to");
            let (f, t) = (
                f.map_err(|e| fail(&what, &to, e))?,
                t.map_err(|e| fail(&what, &to, e))?,
            );
            v.change(&format!("mv {from} {to}"), |s, root| {
                tree::rename(s, root, &f, &t)
            })
            .map_err(|e| fail(&what, &to, e))?;
        }
        Command::Ln { target, path, .. } => {
            let names = p(&path).map_err(|e| fail("failed to create symbolic link", &path, e))?;
            v.change(&format!("ln -s {target} {path}"), |s, root| {
                tree::symlink(s, root, &names, target.as_bytes())
            })
            .map_err(|e| fail("failed to create symbolic link", &path, e))?;
        }
        Command::Log { count } => {
            let log = v.log(count).map_err(|e| Failure(e.to_string()))?;
            let commits: Vec<_> = log.iter().map(|(_, c)| c.clone()).collect();
            for ((h, c), whole) in log.into_iter().zip(history::whole(&store, &commits)) {
                println!(
                    "commit {}{}\nwriter {}\ntime   {}.{:09}\n\n    {}\n",
                    h.hex(),
                    if whole { "" } else { " (files collected)" },
                    c.writer,
                    c.time.secs,
                    c.time.nanos,
                    c.message
                );
            }
        }
        Command::Du { path } => {
            let names = p(&path).map_err(|e| fail("cannot access", &path, e))?;
            let version = Version::head(&v).map_err(|e| fail("cannot access", &path, e))?;
            let total = match version
                .lookup(&store, &names)
                .map_err(|e| fail("cannot access", &path, e))?
            {
                None => du(&store, &version.inodes, version.root),
                Some(Entry {
                    content: Content::Dir { tree },
                    ..
                }) => du(&store, &version.inodes, tree),
                Some(e) => Ok(size_of(&e)),
            }
            .map_err(|e| fail("cannot access", &path, e))?;
            println!("{total}\t{path}");
        }
        Command::Df => {
            let version = Version::head(&v).map_err(|e| Failure(e.to_string()))?;
            let files = du(&store, &version.inodes, version.root).map_err(|e| Failure(e.to_string()))?;
            println!("volume {}: {files} bytes in files", cli.volume);
            let mut fields = Vec::new();
            for section in ["memory", "persistence"] {
                let info = dict.server_info(section).map_err(|e| Failure(e.to_string()))?;
                for line in info.lines() {
                    let wanted = [
                        "used_memory_human",
                        "kvd_storage_engine",
                        "kvd_live_bytes",
                        "kvd_dead_bytes",
                        "kvd_dir",
                    ];
                    if wanted.iter().any(|w| line.starts_with(&format!("{w}:"))) {
                        fields.push(line.trim().replacen(':', " ", 1));
                    }
                }
            }
            println!("store {}: {}", cli.store, fields.join(", "));
        }
        Command::Snapshot { action } => match action {
            SnapshotAction::Create { name, at } => {
                let commit = at
                    .map(|a| history::resolve(&v, &a))
                    .transpose()
                    .map_err(|e| Failure(format!("cannot find that version: {e}")))?;
                let h = history::create_snapshot(&v, &name, commit)
                    .map_err(|e| fail("cannot create snapshot", &name, e))?;
                println!("snapshot '{name}' = commit {}", h.hex());
            }
            SnapshotAction::List => {
                for (name, h) in history::snapshots(&v).map_err(|e| Failure(e.to_string()))? {
                    let time = store.commit(&h).map(|c| c.time.secs).unwrap_or(0);
                    println!("{name}\t{}\t{time}", h.hex());
                }
            }
            SnapshotAction::Delete { name } => {
                history::delete_snapshot(&v, &name).map_err(|e| fail("cannot delete snapshot", &name, e))?;
            }
        },
        Command::Diff { from, to } => {
            let to = to.unwrap_or_else(|| "HEAD".into());
            let root_of = |version: &str| -> Result<Hash, Failure> {
                let c = history::resolve(&v, version).map_err(|e| fail("cannot find version", version, e))?;
                Ok(store.commit(&c).map_err(|e| Failure(e.to_string()))?.root)
            };
            let (a, b) = (root_of(&from)?, root_of(&to)?);
            for change in history::diff(&store, a, b).map_err(|e| Failure(e.to_string()))? {
                match change {
                    history::Change::Added(p) => println!("+ {p}"),
                    history::Change::Removed(p) => println!("- {p}"),
                    history::Change::Modified(p) => println!("M {p}"),
                }
            }
        }
        Command::Restore { path, from } => {
            let names = p(&path).map_err(|e| fail("cannot restore", &path, e))?;
            let c = history::resolve(&v, &from).map_err(|e| fail("cannot find version", &from, e))?;
            let old = store
                .commit(&c)
                .map_err(FsError::from)
                .and_then(|c| Version::of(&store, &c))
                .map_err(|e| Failure(e.to_string()))?;
            // Hard links inside what is restored come back as plain files.
            let entry = old
                .lookup(&store, &names)
                .and_then(|e| e.map(|e| links::detach(&store, &old.inodes, e)).transpose())
                .map_err(|e| fail(&format!("cannot restore (in {from})"), &path, e))?
                .ok_or_else(|| Failure("cannot restore the root itself; restore its entries".into()))?;
            // The old version may be collected meanwhile; the lease keeps what
            // the restored entry needs until the commit references it.
            if let Some(h) = entry.content.blob() {
                store
                    .protect(fsclient::gc::lease::Kind::Tree, [&h])
                    .map_err(|e| Failure(e.to_string()))?;
            }
            v.change(&format!("restore {path} from {from}"), |s, root| {
                tree::update(s, root, &names, &mut |_| Ok(Some(entry.clone())))
            })
            .map_err(|e| fail("cannot restore", &path, e))?;
        }
        Command::Status { mount_metrics, quick } => {
            use fsclient::status;
            let topology = status::topology(&dict, &cli.store).map_err(Failure)?;
            let sizes = if quick {
                None
            } else {
                let (_, head) = v.head().map_err(|e| Failure(e.to_string()))?;
                Some(history::stats(&store, head.tree()).map_err(|e| Failure(e.to_string()))?)
            };
            let mount = match mount_metrics {
                Some(addr) => Some(status::mount_figures(
                    &status::fetch_metrics(&addr).map_err(Failure)?,
                )),
                None => None,
            };
            print!(
                "{}",
                status::render(&topology, &v, sizes.as_ref(), mount.as_ref()).map_err(Failure)?
            );
        }
        Command::Stats { at } => {
            let c = history::resolve(&v, &at).map_err(|e| fail("cannot find version", &at, e))?;
            let tree = store.commit(&c).map_err(|e| Failure(e.to_string()))?.tree();
            let s = history::stats(&store, tree).map_err(|e| Failure(e.to_string()))?;
            let history = v.log(usize::MAX).map_err(|e| Failure(e.to_string()))?.len();
            let snapshots = history::snapshots(&v).map_err(|e| Failure(e.to_string()))?.len();
            let ratio = s.logical_bytes as f64 / s.chunk_bytes.max(1) as f64;
            println!("version:          {at} ({})", c.hex());
            println!(
                "files:            {} ({} with several names), {} directories",
                s.files, s.hard_linked_files, s.dirs
            );
            println!("logical bytes:    {}", s.logical_bytes);
            println!(
                "stored bytes:     {} (distinct blobs of this version)",
                s.stored_bytes
            );
            println!("dedup ratio:      {ratio:.2} (file bytes / distinct chunk bytes)");
            println!(
                "blobs:            {} chunks ({} bytes), {} manifests, {} directory blobs",
                s.chunks, s.chunk_bytes, s.manifests, s.dir_blobs
            );
            println!("history:          {history} commits, {snapshots} snapshots");
        }
        Command::Gc {
            dry_run,
            keep_within,
            keep_hourly,
            keep_daily,
            window,
        } => {
            let opts = fsclient::gc::Options {
                policy: fsclient::gc::Policy {
                    within: keep_within,
                    hourly: keep_hourly,
                    daily: keep_daily,
                },
                dry_run,
                window,
                progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
            };
            let started = std::time::Instant::now();
            let r = fsclient::gc::collect(&store, &opts).map_err(|e| Failure(format!("gc: {e}")))?;
            let secs = started.elapsed().as_secs_f64();
            let verb = if dry_run { "would delete" } else { "deleted" };
            println!("volumes:          {}", r.volumes);
            println!(
                "versions kept:    {} (files of {} older ones let go)",
                r.kept_commits, r.pruned_commits
            );
            println!("blobs in store:   {}", r.candidates);
            println!(
                "marked:           {} directories and commits, {} files and chunks ({:.0}/s, mark set {} KiB)",
                r.marked_interior,
                r.marked_leaves,
                (r.marked_interior + r.marked_leaves) as f64 / secs.max(1e-9),
                r.mark_set_bytes >> 10
            );
            println!("leased by writers: {}", r.leased);
            println!(
                "{verb}:{} {} blobs, {} bytes",
                " ".repeat(16 - verb.len()),
                r.deleted,
                r.bytes_freed
            );
            println!("took:             {secs:.2}s ({} deletion windows)", r.windows);
        }
        Command::Fsck { at, repair } => {
            let c = history::resolve(&v, &at).map_err(|e| fail("cannot find version", &at, e))?;
            let tree = store.commit(&c).map_err(|e| Failure(e.to_string()))?.tree();
            let check = history::fsck(&store, tree);
            for (path, problem) in &check.damaged {
                println!("damaged: {path}: {problem}");
            }
            println!(
                "{} blobs checked ({} bytes of file data), {} damaged paths",
                check.blobs,
                check.bytes,
                check.damaged.len()
            );
            if repair && !check.damaged.is_empty() {
                let mut marked = Vec::new();
                v.change("fsck --repair", |s, mut root| {
                    marked.clear();
                    for (path, _) in &check.damaged {
                        let Ok(from) = p(path) else { continue };
                        let Some((name, parent)) = from.split_last() else {
                            continue;
                        };
                        let mut to = parent.to_vec();
                        to.push([name.as_slice(), b".damaged"].concat());
                        // A damaged path under a damaged directory cannot be reached.
                        if let Ok(r) = tree::rename(s, root, &from, &to) {
                            root = r;
                            marked.push(path.clone());
                        }
                    }
                    Ok(root)
                })
                .map_err(|e| Failure(format!("fsck --repair: {e}")))?;
                for path in &marked {
                    println!("renamed: {path} -> {path}.damaged");
                }
            }
            if !check.damaged.is_empty() {
                return Err(Failure(format!("{} damaged paths", check.damaged.len())));
            }
        }
    }
    Ok(())
}

/// Logs to stderr, filtered by `FSCLIENT_LOG` (else `RUST_LOG`, else `warn`;
/// tracing's env-filter syntax). Colour only on a terminal: a log file or a
/// journal gets plain text. `FSCLIENT_LOG_FORMAT=json` writes one JSON object
/// per line instead, for log collectors.
fn init_logging() {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_env("FSCLIENT_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| "warn".into());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::env::var("FSCLIENT_LOG_FORMAT").is_ok_and(|f| f == "json") {
        logs.json().init();
    } else {
        logs.with_ansi(std::io::stderr().is_terminal()).init();
    }
}

/// This process's arguments after the program name, as `fsclient` reads them
/// (a mount helper's translated): what `--daemon` starts again.
static ARGS: std::sync::OnceLock<Vec<std::ffi::OsString>> = std::sync::OnceLock::new();

fn main() -> ExitCode {
    init_logging();
    let program = std::env::args_os().next().unwrap_or_default();
    let args: Vec<std::ffi::OsString> = if Path::new(&program).file_name() == Some(fstab::HELPER.as_ref()) {
        // Run by mount(8) for `mount -t fuse.fsclient` or an fstab line.
        let raw: Vec<String> = std::env::args().skip(1).collect();
        match fstab::helper_mount(&raw) {
            Ok(m) => m.args().into_iter().map(Into::into).collect(),
            Err(e) => {
                eprintln!("{}: {e}", fstab::HELPER);
                return ExitCode::FAILURE;
            }
        }
    } else {
        std::env::args_os().skip(1).collect()
    };
    let cli = Cli::parse_from(std::iter::once("fsclient".into()).chain(args.iter().cloned()));
    ARGS.set(args).expect("set once");
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(message)) => {
            eprintln!("fsclient: {message}");
            ExitCode::FAILURE
        }
    }
}
