//! The command line's grammar: every subcommand, option and help text of
//! `fsclient`, as clap definitions. The binary parses with them, and the same
//! definitions generate the shell completions and manual pages
//! ([`completions`], [`man_pages`]), so the three never disagree.

use std::path::{Path, PathBuf};

use clap::{CommandFactory, Parser, Subcommand};

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
pub struct Cli {
    /// The store: redis://[:password@]host:port (kvd listens on 7379 by default).
    #[arg(long, env = "DICTFS_STORE", default_value = "redis://127.0.0.1:7379")]
    pub store: String,
    /// The volume: one file system tree (several can share a store).
    #[arg(long, env = "DICTFS_VOLUME", default_value = "main")]
    pub volume: String,
    /// Prefix of every key this file system writes, so several can share a store.
    #[arg(long, default_value = "dfs:")]
    pub prefix: String,
    /// Memory for the cache of blobs read (MiB). Blobs never change, so the
    /// cache is never stale; a bigger one helps random reads of large files.
    #[arg(long, default_value_t = 256)]
    pub cache_mib: usize,
    /// An encrypted volume's key file (`fsclient keygen FILE` makes one).
    /// A volume made with a passphrase takes it from DICTFS_PASSPHRASE, or
    /// asks on a terminal.
    #[arg(long, env = "DICTFS_KEY_FILE", global = true)]
    pub key_file: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Create the volume (an empty root directory).
    ///
    /// Files are cut into content-defined chunks of about --chunk-avg bytes
    /// (between --chunk-min and --chunk-max); fixed for the volume's life.
    /// Sizes take K and M suffixes (powers of 2).
    ///
    /// With --encrypt, everything the volume stores (file contents, names,
    /// sizes, times, the history) is encrypted and authenticated on this
    /// machine first; equal files still share their chunks. The key is
    /// --key-file (see `fsclient keygen`) or else a passphrase (DICTFS_PASSPHRASE,
    /// or asked twice on a terminal). Without the key the volume cannot be
    /// read, or recovered: keep it safe.
    #[command(verbatim_doc_comment)]
    Mkfs {
        /// Encrypt the volume (docs/FORMAT.md: the construction, what it hides).
        #[arg(long)]
        encrypt: bool,
        #[arg(long, default_value = "256K", value_parser = parse_size)]
        chunk_min: u32,
        #[arg(long, default_value = "1M", value_parser = parse_size)]
        chunk_avg: u32,
        #[arg(long, default_value = "4M", value_parser = parse_size)]
        chunk_max: u32,
    },
    /// Write a new random key file for `mkfs --encrypt --key-file FILE`
    /// (64 hex digits, readable by you alone); never overwrites one.
    Keygen { file: PathBuf },
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
        /// commit), so that nothing mistakes it for intact data. (A replicated
        /// kvd repairs a damaged copy from the others by itself; this is for
        /// data no copy of which is left.)
        #[arg(long, conflicts_with = "at")]
        repair: bool,
        /// Check every blob under the prefix against its name instead, and
        /// report damage by key: needs no key, so anyone keeping an encrypted
        /// volume's store can run it.
        #[arg(long, conflicts_with_all = ["at", "repair"])]
        blobs: bool,
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
        #[arg(long, default_value = "1h", value_parser = crate::gc::policy::parse_duration)]
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
    /// Print a shell's completion script for fsclient to standard output.
    ///
    ///     fsclient completions bash > /etc/bash_completion.d/fsclient
    ///     fsclient completions zsh > /usr/local/share/zsh/site-functions/_fsclient
    ///     fsclient completions fish > ~/.config/fish/completions/fsclient.fish
    #[command(verbatim_doc_comment)]
    Completions { shell: clap_complete::Shell },
    /// Write the manual pages (fsclient.1, fsclient-mount.1, ...) into a directory.
    ///
    ///     fsclient man /usr/local/share/man/man1 && mandb -q
    #[command(verbatim_doc_comment)]
    Man { dir: PathBuf },
}

#[derive(Subcommand)]
pub enum SnapshotAction {
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

/// `4096`, `256K`, `1M`.
pub fn parse_size(s: &str) -> Result<u32, String> {
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

/// Writes `shell`'s completion script for fsclient to `out`.
pub fn completions(shell: clap_complete::Shell, out: &mut dyn std::io::Write) {
    clap_complete::generate(shell, &mut Cli::command(), "fsclient", out);
}

/// Writes `fsclient.1` and a page for every subcommand (`fsclient-mount.1`,
/// `fsclient-snapshot-create.1`, ...) into `dir`; returns the files written,
/// sorted.
pub fn man_pages(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let cmd = Cli::command().name("fsclient").version(env!("CARGO_PKG_VERSION"));
    clap_mangen::generate_to(cmd, dir)?;
    let mut written: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension().is_some_and(|x| x == "1")
                && p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("fsclient"))
        })
        .collect();
    written.sort();
    Ok(written)
}
