//! `fsclient`: the dictfs file system from the command line. This file only
//! parses (the grammar is [`fsclient::cli`]), calls the library
//! ([`fsclient::ops`] and the modules it names) and prints.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use fsclient::cli::{Cli, Command, SnapshotAction};
use fsclient::codec::Codec;
use fsclient::dict::RespDict;
use fsclient::history;
use fsclient::object::Hash;
use fsclient::ops::{self, fail, Error as Failure};
use fsclient::store::BlobStore;
use fsclient::tree::{self, Chunking, FsError};
use fsclient::volume::Volume;
use fsclient::volume_key::{self, KeySource, Lock};
use fsclient::{daemon, fstab};

fn run(cli: Cli) -> Result<(), Failure> {
    let cli = match cli.command {
        Command::Umount { mountpoint } => return daemon::umount(&mountpoint).map_err(Failure),
        Command::Completions { shell } => {
            fsclient::cli::completions(shell, &mut std::io::stdout().lock());
            return Ok(());
        }
        Command::Man { dir } => {
            let pages = fsclient::cli::man_pages(&dir)
                .map_err(|e| Failure(format!("cannot write manual pages to '{}': {e}", dir.display())))?;
            println!("wrote {} manual pages to {}", pages.len(), dir.display());
            return Ok(());
        }
        Command::Keygen { file } => {
            volume_key::keygen(&file).map_err(Failure)?;
            println!(
                "wrote a new key to {} (keep a copy: without it, a volume encrypted with it cannot be read)",
                file.display()
            );
            return Ok(());
        }
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
    // An encrypted volume's keys, before anything reads it (mkfs makes its own).
    let (store, lock) = match &cli.command {
        Command::Mkfs { encrypt: true, .. } => {
            let source = key_source(&cli, true)?;
            let (lock, keys) = Lock::create(&source).map_err(Failure)?;
            (store.with_codec(Codec::Encrypted(Box::new(keys))), Some(lock))
        }
        Command::Mkfs { .. } => {
            if cli.key_file.is_some() {
                eprintln!(
                    "fsclient: a key file was given without --encrypt: the volume will not be encrypted"
                );
            }
            (store, None)
        }
        // Checks blobs by their names alone: no key needed.
        Command::Fsck { blobs: true, .. } => (store, None),
        _ => (store.with_codec(open_codec(dict.as_ref(), &cli)?), None),
    };
    let v = Volume::new(store.clone(), &cli.volume);
    match cli.command {
        Command::Umount { .. } | Command::Completions { .. } | Command::Man { .. } | Command::Keygen { .. } => {
            unreachable!("handled above")
        }
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
                if let Some(file) = &cli.key_file {
                    options.push(format!("key_file={}", file.display()));
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
                let (file, line) = fstab::update(&cli.store, &cli.volume, &mountpoint, &options).map_err(Failure)?;
                eprintln!("fsclient: {} now has: {line}", file.display());
            }
            if daemon {
                let args: Vec<std::ffi::OsString> = ARGS
                    .get()
                    .expect("set by main")
                    .iter()
                    .filter(|a| *a != "--daemon")
                    .cloned()
                    .collect();
                let typed = TYPED_PASSPHRASE.get().map(|p| ("DICTFS_PASSPHRASE", p.as_str()));
                let env: Vec<_> = typed.into_iter().collect();
                let pid = daemon::start_detached(&args, &env, &mountpoint, log_file.as_deref()).map_err(Failure)?;
                println!("mounted at {} (pid {pid})", mountpoint.display());
                return Ok(());
            }
            let settings = ops::MountSettings {
                mount: fsclient::mount::MountOptions {
                    mountpoint,
                    allow_other,
                    threads,
                    commit_interval: std::time::Duration::from_millis(commit_interval_ms.max(10)),
                },
                commit_on_close: !no_commit_on_close,
                relatime: !noatime,
                metrics_addr,
            };
            let store_url = cli.store.clone();
            ops::mount(v, &store_url, settings, |shown| {
                eprintln!(
                    "fsclient: volume '{}' mounted at {shown}; Ctrl-C unmounts",
                    cli.volume
                )
            })?;
        }
        Command::Mkfs {
            encrypt: _,
            chunk_min,
            chunk_avg,
            chunk_max,
        } => {
            let chunking = Chunking {
                min: chunk_min,
                avg: chunk_avg,
                max: chunk_max,
            };
            v.create_encrypted(chunking, lock.as_ref()).map_err(|e| match e {
                FsError::Exists => Failure(format!("volume '{}' already exists", cli.volume)),
                e => Failure(format!("cannot create volume '{}': {e}", cli.volume)),
            })?;
            let how = if lock.is_some() { "encrypted volume" } else { "volume" };
            println!("created {how} '{}' in {}", cli.volume, cli.store);
        }
        Command::Ls { path, long } => {
            let mut out = std::io::stdout().lock();
            for (name, e) in ops::list(&v, &path)? {
                let name = tree::show(&name);
                let line = if long {
                    format!(
                        "{}{:04o} {:>12} {} {}",
                        ops::kind_char(&e),
                        e.meta.mode & 0o7777,
                        ops::size_of(&e),
                        e.meta.mtime.secs,
                        name
                    )
                } else {
                    name
                };
                let _ = writeln!(out, "{line}");
            }
        }
        Command::Stat { path } => match ops::stat(&v, &path)? {
            None => println!("  File: {path}\n  Type: directory (volume root)"),
            Some(e) => println!(
                "  File: {path}\n  Size: {}\n  Type: {}\n  Mode: {:04o}  Uid: {}  Gid: {}\nModify: {}.{:09}\nChange: {}.{:09}",
                ops::size_of(&e),
                ops::kind_name(&e),
                e.meta.mode,
                e.meta.uid,
                e.meta.gid,
                e.meta.mtime.secs,
                e.meta.mtime.nanos,
                e.meta.ctime.secs,
                e.meta.ctime.nanos
            ),
        },
        Command::Cat { paths, at } => ops::cat(&v, &paths, at.as_deref(), &mut std::io::stdout().lock())?,
        Command::Put { local, remote } => {
            let progress = std::io::IsTerminal::is_terminal(&std::io::stderr());
            ops::put(&v, &local, &remote, progress)?
        }
        Command::Get { remote, local } => ops::get(&v, &remote, &local)?,
        Command::Mkdir { path, parents } => ops::mkdir(&v, &path, parents)?,
        Command::Rm { path, recursive } => ops::rm(&v, &path, recursive)?,
        Command::Mv { from, to } => ops::mv(&v, &from, &to)?,
        Command::Ln { target, path, .. } => ops::symlink(&v, &target, &path)?,
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
        Command::Du { path } => println!("{}\t{path}", ops::du(&v, &path)?),
        Command::Df => {
            let files = ops::du(&v, "/")?;
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
        Command::Restore { path, from } => ops::restore(&v, &path, &from)?,
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
            let ops::Stats {
                commit: c,
                sizes: s,
                commits: history,
                snapshots,
            } = ops::stats(&v, &at)?;
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
        Command::Fsck { blobs: true, .. } => {
            let check = history::verify_blobs(&store).map_err(|e| Failure(format!("cannot check the blobs: {e}")))?;
            for (key, problem) in &check.damaged {
                println!("damaged: {key}: {problem}");
            }
            println!(
                "{} blobs checked against their names ({} bytes), {} damaged",
                check.blobs,
                check.bytes,
                check.damaged.len()
            );
            if !check.damaged.is_empty() {
                return Err(Failure(format!("{} damaged blobs", check.damaged.len())));
            }
        }
        Command::Fsck { at, repair, .. } => {
            let ops::Fsck { check, renamed } = ops::fsck(&v, &at, repair)?;
            for (path, problem) in &check.damaged {
                println!("damaged: {path}: {problem}");
            }
            println!(
                "{} blobs checked ({} bytes of file data), {} damaged paths",
                check.blobs,
                check.bytes,
                check.damaged.len()
            );
            for path in &renamed {
                println!("renamed: {path} -> {path}.damaged");
            }
            if !check.damaged.is_empty() {
                return Err(Failure(format!("{} damaged paths", check.damaged.len())));
            }
        }
    }
    Ok(())
}

/// The keys of the volume the command names, if it is encrypted: read from
/// its config first, so a plain volume never asks for a key.
fn open_codec(dict: &dyn fsclient::dict::Dict, cli: &Cli) -> Result<Codec, Failure> {
    let key = fsclient::volume::config_key(&cli.prefix, &cli.volume);
    let text = dict
        .get(&key)
        .map_err(|e| Failure(format!("cannot read the volume's settings ({key}): {e}")))?
        .map(|b| String::from_utf8_lossy(&b).into_owned());
    volume_key::codec_for(&cli.volume, text.as_deref(), || {
        key_source(cli, false).map_err(|Failure(e)| e)
    })
    .map_err(Failure)
}

/// A passphrase typed at the prompt: handed to a mount started with --daemon.
static TYPED_PASSPHRASE: std::sync::OnceLock<zeroize::Zeroizing<String>> = std::sync::OnceLock::new();

/// Where this run's key comes from: --key-file (or DICTFS_KEY_FILE), else the
/// passphrase in DICTFS_PASSPHRASE, else one typed on a terminal (twice for a
/// new volume).
fn key_source(cli: &Cli, new: bool) -> Result<KeySource, Failure> {
    use std::io::IsTerminal;
    if let Some(file) = &cli.key_file {
        return Ok(KeySource::File(file.clone()));
    }
    if let Ok(phrase) = std::env::var("DICTFS_PASSPHRASE") {
        return Ok(KeySource::Passphrase(zeroize::Zeroizing::new(phrase)));
    }
    if !std::io::stdin().is_terminal() {
        return Err(Failure(format!(
            "volume '{}' is encrypted{}: give its key with --key-file (or DICTFS_KEY_FILE), or its passphrase in DICTFS_PASSPHRASE",
            cli.volume,
            if new { " (mkfs --encrypt)" } else { "" }
        )));
    }
    let ask = |prompt: &str| {
        rpassword::prompt_password(prompt)
            .map(zeroize::Zeroizing::new)
            .map_err(|e| Failure(format!("cannot read the passphrase: {e}")))
    };
    let phrase = ask(&format!("passphrase for volume '{}': ", cli.volume))?;
    let _ = TYPED_PASSPHRASE.set(phrase.clone());
    if new {
        if phrase.len() < 8 {
            return Err(Failure("a passphrase needs at least 8 characters".into()));
        }
        if *ask("the same passphrase again: ")? != *phrase {
            return Err(Failure("the two passphrases differ".into()));
        }
    }
    Ok(KeySource::Passphrase(phrase))
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
