//! Benchmarks: kvd measured against its peer in the same run, reported as ratios.
//!
//! `bench kvd` starts a release kvd and a redis-server (no persistence, the in-memory
//! peer for the in-memory engine) on loopback ports, runs `redis-benchmark` against
//! each with the same settings, and prints requests/second and the kvd/redis ratio
//! per row. Each row is the median of several rounds, alternating servers, so a
//! passing load on the machine does not favour one side. Results are also written as
//! JSON to `bench/results/`.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use protocol_tests::{require_redis, Server};
use serde::Serialize;

#[derive(Parser)]
#[command(about = "dictfs benchmarks: kvd and fsclient against their peers, as ratios")]
struct Cli {
    #[command(subcommand)]
    which: Which,
}

#[derive(Subcommand)]
enum Which {
    /// kvd vs redis-server, both in memory: redis-benchmark GET/SET, 64-byte
    /// values, 50 clients, pipeline 1 and 16.
    Kvd {
        /// Requests per redis-benchmark run without pipelining (16x this with).
        #[arg(long, default_value_t = 200_000)]
        requests: u64,
        /// Rounds per row; the median is reported.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// kvd's disk engine vs redis-server with `appendonly yes, appendfsync
    /// everysec`: 64 B and 1 MiB SET/GET, memory after loading large values,
    /// start-up time, and `appendfsync always` against the disk's dsync ceiling.
    Storage {
        /// GiB of 1 MiB values loaded for the memory measurement.
        #[arg(long, default_value_t = 4)]
        load_gib: u64,
        /// Keys for the start-up measurement.
        #[arg(long, default_value_t = 1_000_000)]
        startup_keys: u64,
        /// Alternating rounds per row; each row is their median.
        #[arg(long, default_value_t = 5)]
        rounds: usize,
    },
    /// fsclient through kvd and through redis-server: put/get of a large file and
    /// of many small files; chunking + SHA-256 against sha256sum; dedup.
    Fs {
        /// Size of the large file, MiB.
        #[arg(long, default_value_t = 1024)]
        big_mib: u64,
        /// Number of 4 KiB files.
        #[arg(long, default_value_t = 10_000)]
        small: usize,
    },
    /// The kvd cluster: GET/SET through a 3-node cluster (forwarded and routed
    /// by a cluster-aware client) against one kvd node and a 3-node Redis
    /// Cluster, and a placement simulation of 1,000 and 10,000 nodes.
    Cluster {
        /// Requests per run (times the pipeline depth). Runs shorter than a few
        /// seconds are not measurable: redis-benchmark --cluster reports in
        /// coarse time steps.
        #[arg(long, default_value_t = 1_000_000)]
        requests: u64,
        #[arg(long, default_value_t = 1)]
        rounds: usize,
    },
    /// A 3-node replicated kvd with R = 1 and R = 3: SET and compare-and-swap
    /// throughput and latency, and the longest pause in acknowledged writes
    /// while a node is killed.
    Replication {
        /// SET requests per redis-benchmark run.
        #[arg(long, default_value_t = 200_000)]
        requests: u64,
    },
    /// `fsclient gc` on a store of many blobs (throughput, the collector's peak
    /// memory), and `fsclient diff` of a one-file change in a 100,000-file tree
    /// against reading the whole tree.
    Gc {
        /// Blobs in the store (nine tenths live, one tenth garbage).
        #[arg(long, default_value_t = 10_000_000)]
        blobs: u64,
    },
    /// The mounted file system (over kvd and over redis-server) against bindfs
    /// over tmpfs and local disk, with fio: sequential write and read, 4 KiB
    /// random reads, and creating/stat-ing/deleting many files in one directory.
    /// Needs root, /dev/fuse, fio and bindfs (scripts/setup.sh installs them).
    Mount {
        /// Size of the file written and read, MiB.
        #[arg(long, default_value_t = 1024)]
        file_mib: u64,
        /// Files created, stat-ed and deleted.
        #[arg(long, default_value_t = 10_000)]
        files: usize,
        /// Rounds over all targets, each starting with another; every figure
        /// is the median of its rounds.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
}

#[derive(Serialize)]
struct Row {
    test: String,
    pipeline: u32,
    kvd_rps: f64,
    redis_rps: f64,
    ratio: f64,
}

mod cluster;
mod fs;
mod gc;
mod mount;
mod replication;
mod storage;

/// Runs redis-benchmark once (64-byte values, 50 clients); returns
/// requests/second per test name.
fn redis_benchmark(port: u16, tests: &str, requests: u64, pipeline: u32) -> Result<Vec<(String, f64)>> {
    redis_benchmark_with(port, tests, requests, pipeline, 64, 50)
}

/// Runs redis-benchmark with a value size and client count.
pub(crate) fn redis_benchmark_args(
    port: u16,
    extra: &[&str],
    tests: &str,
    requests: u64,
    pipeline: u32,
) -> Result<Vec<(String, f64)>> {
    let out = Command::new("redis-benchmark")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-t", tests])
        .args(extra)
        .args([
            "-d",
            "64",
            "-c",
            "50",
            "-n",
            &requests.to_string(),
            "-P",
            &pipeline.to_string(),
            "--csv",
        ])
        .output()
        .context("running redis-benchmark (scripts/setup.sh installs it)")?;
    parse_csv(&out)
}

fn parse_csv(out: &std::process::Output) -> Result<Vec<(String, f64)>> {
    if !out.status.success() {
        bail!("redis-benchmark failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut rows = Vec::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split(',').map(|f| f.trim_matches('"')).collect();
        if fields.len() >= 2 {
            if let Ok(rps) = fields[1].parse() {
                rows.push((fields[0].to_string(), rps));
            }
        }
    }
    if rows.is_empty() {
        bail!("no results in redis-benchmark output: {text}");
    }
    Ok(rows)
}

fn redis_benchmark_with(
    port: u16,
    tests: &str,
    requests: u64,
    pipeline: u32,
    size: usize,
    clients: u32,
) -> Result<Vec<(String, f64)>> {
    let out = Command::new("redis-benchmark")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-t", tests])
        .args(["-d", &size.to_string(), "-c", &clients.to_string()])
        .args(["-n", &requests.to_string(), "-P", &pipeline.to_string(), "--csv"])
        .output()
        .context("running redis-benchmark (scripts/setup.sh installs it)")?;
    parse_csv(&out)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn bench_kvd(requests: u64, rounds: usize) -> Result<Vec<Row>> {
    require_redis();
    // Like for like: both in memory (the disk engine has its own bench).
    let kvd = Server::kvd(&["--storage", "memory"])?;
    let redis = Server::redis(&[])?;
    let mut rows = Vec::new();
    for pipeline in [1u32, 16] {
        let n = requests * pipeline as u64;
        let mut kvd_runs: Vec<Vec<(String, f64)>> = Vec::new();
        let mut redis_runs = Vec::new();
        for _ in 0..rounds {
            kvd_runs.push(redis_benchmark(kvd.port, "set,get", n, pipeline)?);
            redis_runs.push(redis_benchmark(redis.port, "set,get", n, pipeline)?);
        }
        for (i, (test, _)) in kvd_runs[0].iter().enumerate() {
            let kvd_rps = median(kvd_runs.iter().map(|r| r[i].1).collect());
            let redis_rps = median(redis_runs.iter().map(|r| r[i].1).collect());
            rows.push(Row {
                test: test.clone(),
                pipeline,
                kvd_rps,
                redis_rps,
                ratio: kvd_rps / redis_rps,
            });
        }
    }
    Ok(rows)
}

fn save(name: &str, rows: &impl Serialize) -> Result<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("results");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("{name}.json"));
    std::fs::write(&path, serde_json::to_string_pretty(rows)?)?;
    Ok(path)
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.which {
        Which::Kvd { requests, rounds } => {
            let rows = bench_kvd(requests, rounds)?;
            println!(
                "{:<6} {:>8} {:>14} {:>14} {:>10}",
                "test", "pipeline", "kvd req/s", "redis req/s", "kvd/redis"
            );
            for r in &rows {
                println!(
                    "{:<6} {:>8} {:>14.0} {:>14.0} {:>10.2}",
                    r.test, r.pipeline, r.kvd_rps, r.redis_rps, r.ratio
                );
            }
            let path = save("kvd", &rows)?;
            println!("saved {}", path.display());
        }
        Which::Storage {
            load_gib,
            startup_keys,
            rounds,
        } => {
            let report = storage::run(load_gib, startup_keys, rounds)?;
            let path = save("storage", &report)?;
            println!("saved {}", path.display());
        }
        Which::Cluster { requests, rounds } => {
            let report = cluster::run(requests, rounds)?;
            let path = save("cluster", &report)?;
            println!("saved {}", path.display());
        }
        Which::Mount {
            file_mib,
            files,
            rounds,
        } => {
            let report = mount::run(file_mib, files, rounds.max(1))?;
            let path = save("mount", &report)?;
            println!("saved {}", path.display());
        }
        Which::Replication { requests } => {
            let report = replication::run(requests)?;
            let path = save("replication", &report)?;
            println!("saved {}", path.display());
        }
        Which::Gc { blobs } => {
            let report = gc::run(blobs)?;
            let path = save("gc", &report)?;
            println!("saved {}", path.display());
        }
        Which::Fs { big_mib, small } => {
            let report = fs::run(big_mib, small)?;
            let path = save("fs", &report)?;
            println!("saved {}", path.display());
        }
    }
    Ok(())
}
