//! `bench mount`: the mounted file system, with fio, against bindfs over tmpfs
//! (a pass-through FUSE file system over memory: what FUSE itself allows on this
//! machine) and local disk, over kvd and over redis-server, in one run.
//!
//! Rows: sequential write of a file (bs 1 MiB, ending with fsync), sequential
//! read of it and 4 KiB random reads (after dropping the page cache and, for
//! dictfs, remounting so its blob cache is cold too), and a metadata run
//! (create, stat and delete N files in one directory, timed here).

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
    /// Each row is the median of this many rounds.
    rounds: usize,
    rows: Vec<Row>,
    /// Every round's rows, per target (in `rows`' order): what the medians
    /// and ratios come from.
    round_rows: Vec<Vec<Row>>,
    /// dictfs ÷ bindfs, per target and measure: the median of the per-round
    /// ratios (each round measured every target back to back).
    ratios: Vec<Ratio>,
}

#[derive(Serialize, Clone)]
struct Row {
    target: String,
    seq_write_mb_s: f64,
    seq_read_mb_s: f64,
    rand_read_4k_iops: f64,
    creates_s: f64,
    stats_s: f64,
    deletes_s: f64,
}

#[derive(Serialize)]
struct Ratio {
    target: String,
    seq_write: f64,
    seq_read: f64,
    rand_read_4k: f64,
    metadata: f64,
    /// Each round's ratios, in the same order of measures.
    per_round: Vec<[f64; 4]>,
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
    mount: Option<Mount>,
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
        self.mount = Some(Mount::start(&self.url, "bench", &[])?);
        Ok(())
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

fn metadata(dir: &Path, files: usize) -> Result<(f64, f64, f64)> {
    let d = dir.join("meta");
    std::fs::create_dir(&d)?;
    let names: Vec<PathBuf> = (0..files).map(|i| d.join(format!("file{i:06}"))).collect();
    let t = Instant::now();
    for n in &names {
        std::fs::File::create(n)?;
    }
    let creates = files as f64 / t.elapsed().as_secs_f64();
    let t = Instant::now();
    for n in &names {
        std::fs::metadata(n)?;
    }
    let stats = files as f64 / t.elapsed().as_secs_f64();
    let t = Instant::now();
    for n in &names {
        std::fs::remove_file(n)?;
    }
    let deletes = files as f64 / t.elapsed().as_secs_f64();
    std::fs::remove_dir(&d)?;
    Ok((creates, stats, deletes))
}

fn measure(t: &mut dyn Target, file_mib: u64, files: usize) -> Result<Row> {
    let size = format!("--size={file_mib}M");
    let w = fio(&t.dir(), &["--rw=write", "--bs=1M", &size, "--end_fsync=1"])?;
    let seq_write = job_stat(&w, "write", "bw_bytes") / 1e6;
    t.cold()?;
    drop_page_cache();
    let r = fio(&t.dir(), &["--rw=read", "--bs=1M", &size])?;
    let seq_read = job_stat(&r, "read", "bw_bytes") / 1e6;
    t.cold()?;
    drop_page_cache();
    let rr = fio(
        &t.dir(),
        &[
            "--rw=randread",
            "--bs=4k",
            &size,
            "--time_based",
            "--runtime=10",
            "--randrepeat=1",
        ],
    )?;
    let iops = job_stat(&rr, "read", "iops");
    std::fs::remove_file(t.dir().join("bench.dat"))?;
    let (creates, stats, deletes) = metadata(&t.dir(), files)?;
    let row = Row {
        target: t.name(),
        seq_write_mb_s: seq_write,
        seq_read_mb_s: seq_read,
        rand_read_4k_iops: iops,
        creates_s: creates,
        stats_s: stats,
        deletes_s: deletes,
    };
    eprintln!(
        "{:<14} write {:>7.0} MB/s  read {:>7.0} MB/s  4k randread {:>8.0} IOPS  create {:>6.0}/s  stat {:>7.0}/s  delete {:>6.0}/s",
        row.target, row.seq_write_mb_s, row.seq_read_mb_s, row.rand_read_4k_iops, row.creates_s, row.stats_s, row.deletes_s
    );
    Ok(row)
}

/// Harmonic mean of the three metadata rates (the rate of the whole run).
fn meta_rate(r: &Row) -> f64 {
    3.0 / (1.0 / r.creates_s + 1.0 / r.stats_s + 1.0 / r.deletes_s)
}

/// Each figure's median over the rounds.
fn median_row(samples: &[Row]) -> Row {
    let m = |f: fn(&Row) -> f64| crate::median(samples.iter().map(f).collect());
    Row {
        target: samples[0].target.clone(),
        seq_write_mb_s: m(|r| r.seq_write_mb_s),
        seq_read_mb_s: m(|r| r.seq_read_mb_s),
        rand_read_4k_iops: m(|r| r.rand_read_4k_iops),
        creates_s: m(|r| r.creates_s),
        stats_s: m(|r| r.stats_s),
        deletes_s: m(|r| r.deletes_s),
    }
}

pub fn run(file_mib: u64, files: usize, rounds: usize) -> Result<Report> {
    require_redis();
    for tool in ["fio", "bindfs"] {
        if Command::new(tool).arg("--version").output().is_err() {
            bail!("{tool} is missing; run scripts/setup.sh");
        }
    }
    let local = tempfile::Builder::new().prefix("bench-local").tempdir_in(
        std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("target")),
    )?;
    let kvd = Server::kvd(&[])?;
    let redis = Server::redis(&["--appendonly", "yes", "--appendfsync", "everysec"])?;
    let mut targets: Vec<Box<dyn Target>> = vec![
        Box::new(Plain {
            name: "local disk",
            dir: local.path().to_path_buf(),
        }),
        Box::new(Bindfs::start()?),
    ];
    for (name, server) in [("dictfs/kvd", &kvd), ("dictfs/redis", &redis)] {
        let url = format!("redis://127.0.0.1:{}", server.port);
        targets.push(Box::new(Dictfs {
            name,
            url: url.clone(),
            mount: Some(Mount::start(&url, "bench", &[])?),
        }));
    }
    // The machine's speed drifts (a VM): rounds, each starting with another
    // target, and the median of each figure.
    let mut samples: Vec<Vec<Row>> = vec![Vec::new(); targets.len()];
    for round in 0..rounds {
        for k in 0..targets.len() {
            let i = (k + round) % targets.len();
            samples[i].push(measure(targets[i].as_mut(), file_mib, files)?);
        }
    }
    let rows: Vec<Row> = samples.iter().map(|s| median_row(s)).collect();
    let ratios = (2..rows.len())
        .map(|t| {
            let per_round: Vec<[f64; 4]> = (0..rounds)
                .map(|k| {
                    let (r, b) = (&samples[t][k], &samples[1][k]);
                    [
                        r.seq_write_mb_s / b.seq_write_mb_s,
                        r.seq_read_mb_s / b.seq_read_mb_s,
                        r.rand_read_4k_iops / b.rand_read_4k_iops,
                        meta_rate(r) / meta_rate(b),
                    ]
                })
                .collect();
            let m = |i: usize| crate::median(per_round.iter().map(|r| r[i]).collect());
            Ratio {
                target: rows[t].target.clone(),
                seq_write: m(0),
                seq_read: m(1),
                rand_read_4k: m(2),
                metadata: m(3),
                per_round,
            }
        })
        .collect::<Vec<_>>();
    println!(
        "{:<14} {:>10} {:>10} {:>14} {:>10}   (x bindfs/tmpfs; targets: read >= 0.8, write >= 0.6, metadata >= 0.5)",
        "target", "seq write", "seq read", "4k rand read", "metadata"
    );
    for r in &ratios {
        println!(
            "{:<14} {:>10.2} {:>10.2} {:>14.2} {:>10.2}",
            r.target, r.seq_write, r.seq_read, r.rand_read_4k, r.metadata
        );
    }
    Ok(Report {
        file_mib,
        files,
        rounds,
        rows,
        round_rows: samples,
        ratios,
    })
}
