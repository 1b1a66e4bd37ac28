//! Benchmarks: kvd measured against its peer in the same run, reported as ratios.
//!
//! `bench kvd` starts a release kvd and a redis-server (no persistence, the in-memory
//! peer for the in-memory engine) on loopback ports, runs `redis-benchmark` against
//! each with the same settings over a keyspace of 100,000 keys, and prints
//! requests/second and the kvd/redis ratio per row. Every comparison runs in
//! rounds, alternating which side goes first, and reports the median of the
//! per-round ratios ([`rounds`]). Results, every round included, are written as
//! JSON to `bench/results/`; `bench tables` prints the tables the docs quote
//! from them.

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
    /// values, 100,000 random keys, 50 clients, pipeline 1 and 16.
    Kvd {
        /// Requests per redis-benchmark run without pipelining (16x this with).
        #[arg(long, default_value_t = 200_000)]
        requests: u64,
        /// Alternating rounds; each row is the median of its per-round ratios.
        #[arg(long, default_value_t = 5)]
        rounds: usize,
    },
    /// kvd vs redis-server, both in memory and both on a TLS-only port with
    /// certificates made the same way (RSA 2048, one CA each): the GET/SET
    /// rows of `kvd`, through `redis-benchmark --tls`.
    Tls {
        /// Requests per redis-benchmark run without pipelining (16x this with).
        #[arg(long, default_value_t = 100_000)]
        requests: u64,
        /// Alternating rounds; each row is the median of its per-round ratios.
        #[arg(long, default_value_t = 5)]
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
        /// Alternating rounds; each figure is the median of its per-round ratios.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// A 3-node replicated kvd with R = 1 and R = 3: SET and compare-and-swap
    /// throughput and latency, and the longest pause in acknowledged writes
    /// while a node is killed.
    /// Routed SET/GET (redis-benchmark --cluster, pipeline 1 and 16): a
    /// 3-node kvd cluster with R = 3 against a Redis Cluster of 3 masters with
    /// one replica each, both persisting with appendfsync everysec.
    Routed {
        /// Requests per run (times the pipeline depth).
        #[arg(long, default_value_t = 200_000)]
        requests: u64,
        /// Alternating rounds; each ratio is the median of its per-round ratios.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// The replicated placement simulated at 3 to 10,000 nodes (R = 3): the
    /// share of replicas a join and a node's loss move, and how many nodes
    /// the copying could be spread over. No processes.
    Placement,
    Replication {
        /// SET requests per redis-benchmark run.
        #[arg(long, default_value_t = 200_000)]
        requests: u64,
        /// Alternating rounds; each ratio is the median of its per-round ratios.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// `fsclient gc` on a store of many blobs (throughput, the collector's peak
    /// memory), and `fsclient diff` of a one-file change in a 100,000-file tree
    /// against reading the whole tree.
    Gc {
        /// Blobs in the store (nine tenths live, one tenth garbage).
        #[arg(long, default_value_t = 10_000_000)]
        blobs: u64,
    },
    /// Prints the tables docs/*.md quote, from bench/results/*.json (a test
    /// checks the docs contain them, so docs and results cannot drift).
    Tables,
    /// The mounted file system (over kvd and over redis-server) beside JuiceFS
    /// on redis-server, bindfs over tmpfs and the local disk: sequential write
    /// and read and 4 KiB random reads (fio), creating, stat-ing and deleting
    /// many files in one directory, unpacking a source tree and `git clone`.
    /// Needs root, /dev/fuse, fio, bindfs and JuiceFS (scripts/setup.sh
    /// installs them; without JuiceFS its column is skipped, saying so).
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
    keyspace: u64,
    #[serde(flatten)]
    compared: rounds::Compared,
}

/// Distinct keys the GET/SET rows use (redis-benchmark `-r`): a keyspace, so
/// a row measures a store, not one key.
pub(crate) const KEYSPACE: u64 = 100_000;

mod fs;
mod gc;
mod mount;
mod placement;
mod replication;
mod rounds;
mod routed;
mod storage;
mod tables;

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
            "-r",
            &KEYSPACE.to_string(),
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

/// One redis-benchmark run: `size`-byte values, `clients` connections, random
/// keys from a keyspace of `keyspace` (`-r`). Returns requests/second per test.
fn redis_benchmark_with(
    port: u16,
    tests: &str,
    requests: u64,
    pipeline: u32,
    size: usize,
    clients: u32,
    keyspace: u64,
) -> Result<Vec<(String, f64)>> {
    let out = Command::new("redis-benchmark")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-t", tests])
        .args(["-d", &size.to_string(), "-c", &clients.to_string()])
        .args(["-r", &keyspace.to_string()])
        .args(["-n", &requests.to_string(), "-P", &pipeline.to_string(), "--csv"])
        .output()
        .context("running redis-benchmark (scripts/setup.sh installs it)")?;
    parse_csv(&out)
}

fn median(v: Vec<f64>) -> f64 {
    rounds::median(v)
}

fn bench_kvd(requests: u64, rounds: usize) -> Result<Vec<Row>> {
    require_redis();
    // Like for like: both in memory (the disk engine has its own bench).
    let kvd = Server::kvd(&["--storage", "memory"])?;
    let redis = Server::redis(&[])?;
    compare_get_set([kvd.port, redis.port], [Vec::new(), Vec::new()], requests, rounds)
}

/// `bench kvd`'s rows with both servers behind TLS.
fn bench_tls(requests: u64, rounds: usize) -> Result<Vec<Row>> {
    require_redis();
    let kvd = protocol_tests::tls_server("kvd", "no", &["--storage", "memory"]);
    let redis = protocol_tests::tls_server("redis-server", "no", &[]);
    let tls = |dir: &std::path::Path| {
        vec![
            "--tls".to_string(),
            "--cacert".to_string(),
            dir.join("ca.crt").display().to_string(),
        ]
    };
    let extra = [tls(kvd.dir.path()), tls(redis.dir.path())];
    compare_get_set([kvd.port, redis.port], extra, requests, rounds)
}

/// redis-benchmark's SET and GET (64-byte values, 50 clients, a keyspace),
/// pipelined 1 and 16, against two servers in alternating rounds; `extra`
/// are each side's further redis-benchmark options.
fn compare_get_set(
    ports: [u16; 2],
    extra: [Vec<String>; 2],
    requests: u64,
    rounds: usize,
) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for pipeline in [1u32, 16] {
        let n = requests * pipeline as u64;
        let runs = rounds::run(2, rounds, |side| {
            let extra: Vec<&str> = extra[side].iter().map(String::as_str).collect();
            redis_benchmark_args(ports[side], &extra, "set,get", n, pipeline)
        })?;
        for test in runs.tests() {
            rows.push(Row {
                test: test.clone(),
                pipeline,
                keyspace: KEYSPACE,
                compared: runs.compare(&test, 0, 1),
            });
        }
    }
    Ok(rows)
}

/// Prints SET/GET rows (`ratio`: the ratio column's title) and saves them as
/// results/`name`.json.
fn show_and_save(name: &str, ratio: &str, rows: &[Row]) -> Result<()> {
    println!(
        "{:<6} {:>8} {:>14} {:>14} {:>10}  per round",
        "test", "pipeline", "kvd req/s", "redis req/s", ratio
    );
    for r in rows {
        let (lo, hi) = r.compared.spread();
        println!(
            "{:<6} {:>8} {:>14.0} {:>14.0} {:>10.2}  {lo:.2}-{hi:.2}",
            r.test, r.pipeline, r.compared.ours, r.compared.peer, r.compared.ratio
        );
    }
    let path = save(name, &rows)?;
    println!("saved {}", path.display());
    Ok(())
}

fn save(name: &str, rows: &impl Serialize) -> Result<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("results");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("{name}.json"));
    std::fs::write(&path, serde_json::to_string_pretty(rows)?)?;
    Ok(path)
}

/// The benches start the kvd and fsclient binaries beside this one, and
/// `cargo run -p bench` builds only the bench: build them from the same
/// sources first, in the same profile, so a run never measures a stale
/// server (one did: a re-homing bench ran a kvd from before the change it
/// measured). `KVD_BIN` set means the caller chose the binaries.
fn build_servers() -> Result<()> {
    if std::env::var_os("KVD_BIN").is_some() {
        return Ok(());
    }
    let exe = std::env::current_exe()?;
    let release = exe
        .parent()
        .and_then(|d| d.file_name())
        .is_some_and(|n| n == "release");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = std::process::Command::new(cargo);
    build.args(["build", "-p", "kvd", "-p", "fsclient"]);
    if release {
        build.arg("--release");
    }
    let status = build.status()?;
    if !status.success() {
        anyhow::bail!("building kvd and fsclient failed: {status}");
    }
    Ok(())
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    if !matches!(cli.which, Which::Tables) {
        build_servers()?;
    }
    match cli.which {
        Which::Kvd { requests, rounds } => show_and_save("kvd", "kvd/redis", &bench_kvd(requests, rounds)?)?,
        Which::Tls { requests, rounds } => {
            show_and_save("tls", "kvd/redis (both TLS)", &bench_tls(requests, rounds)?)?
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
        Which::Mount {
            file_mib,
            files,
            rounds,
        } => {
            let report = mount::run(file_mib, files, rounds.max(1))?;
            let path = save("mount", &report)?;
            println!("saved {}", path.display());
        }
        Which::Routed { requests, rounds } => {
            let report = routed::run(requests, rounds.max(1))?;
            let path = save("routed", &report)?;
            println!("saved {}", path.display());
        }
        Which::Placement => {
            let report = placement::run()?;
            let path = save("placement", &report)?;
            println!("saved {}", path.display());
        }
        Which::Replication { requests, rounds } => {
            let report = replication::run(requests, rounds.max(1))?;
            let path = save("replication", &report)?;
            println!("saved {}", path.display());
        }
        Which::Gc { blobs } => {
            let report = gc::run(blobs)?;
            let path = save("gc", &report)?;
            println!("saved {}", path.display());
        }
        Which::Tables => print!("{}", tables::all()?),
        Which::Fs {
            big_mib,
            small,
            rounds,
        } => {
            let report = fs::run(big_mib, small, rounds.max(1))?;
            let path = save("fs", &report)?;
            println!("saved {}", path.display());
        }
    }
    Ok(())
}
