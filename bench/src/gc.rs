//! `bench gc`: `fsclient gc` on a large store (throughput and the collector's
//! peak memory), and `fsclient diff` between two versions of a 100,000-file
//! tree that differ in one file, against reading the whole tree.
//!
//! The stores are built directly (pipelined SETs of encoded blobs into a
//! redis-server), not through fsclient's write path: building ten million blobs
//! file by file would take far longer than what is measured.

use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use fsclient::dict::RespDict;
use fsclient::object::{self, Content, Dir, Entry, Hash, Manifest};
use fsclient::store::BlobStore;
use fsclient::volume::Volume;
use protocol_tests::{fsclient_bin, require_redis, Server};
use serde::Serialize;

#[derive(Serialize)]
pub struct Report {
    gc: Collect,
    diff: DiffRow,
}

#[derive(Serialize)]
struct Collect {
    blobs_in_store: u64,
    live_blobs: u64,
    garbage_blobs: u64,
    deleted: u64,
    seconds: f64,
    /// Marks (directories, commits, file manifests, chunks) per second over the
    /// whole run (listing, marking, deleting).
    marked_per_s: f64,
    candidates_per_s: f64,
    peak_rss_mib: f64,
    peak_rss_bytes_per_blob: f64,
    /// What redis-server used to hold the store (its used_memory), for scale.
    store_memory_mib: f64,
}

#[derive(Serialize)]
struct DiffRow {
    files: u64,
    diff_ms: f64,
    changes: usize,
    /// Reading every blob of the tree (`fsclient fsck`), for scale.
    full_walk_ms: f64,
    full_walk_over_diff: f64,
}

/// A file entry whose content is the chunk `data` (one chunk, one manifest).
fn file(data: &[u8], blobs: &mut Vec<(Hash, Bytes)>) -> Entry {
    let chunk = object::encode_chunk(data);
    let ch = Hash::of(&chunk);
    blobs.push((ch, chunk));
    let manifest = object::encode_manifest(&Manifest {
        chunks: vec![(ch, data.len() as u32)],
    });
    let mh = Hash::of(&manifest);
    blobs.push((mh, manifest));
    Entry {
        meta: fsclient::tree::new_meta(0o644),
        content: Content::File {
            manifest: mh,
            size: data.len() as u64,
        },
    }
}

fn upload(conn: &mut redis::Connection, blobs: &mut Vec<(Hash, Bytes)>) -> Result<()> {
    if blobs.is_empty() {
        return Ok(());
    }
    let mut pipe = redis::pipe();
    for (h, b) in blobs.drain(..) {
        pipe.cmd("SET")
            .arg(format!("dfs:b:{}", h.hex()))
            .arg(&b[..])
            .ignore();
    }
    pipe.query::<()>(conn)?;
    Ok(())
}

/// A volume `name` of `dirs` directories of `per_dir` one-chunk files, with
/// `garbage` unreferenced chunks beside it. Returns the blobs it needs.
fn build(url: &str, store: &BlobStore, name: &str, dirs: u64, per_dir: u64, garbage: u64) -> Result<u64> {
    let mut conn = redis::Client::open(url)?.get_connection()?;
    let mut blobs = Vec::new();
    let mut root = Dir::new();
    let mut live = 0u64;
    for d in 0..dirs {
        let mut dir = Dir::new();
        for f in 0..per_dir {
            let data = format!("{name} file {d}/{f}");
            dir.insert(format!("f{f}").into_bytes(), file(data.as_bytes(), &mut blobs));
        }
        live += 2 * per_dir;
        if blobs.len() >= 20_000 {
            upload(&mut conn, &mut blobs)?;
        }
        let tree = store.put_dir(&dir)?;
        live += store.dir_parts(&tree)?.len() as u64 + (store.dir_parts(&tree)? != [tree]) as u64;
        root.insert(
            format!("d{d}").into_bytes(),
            Entry {
                meta: fsclient::tree::new_meta(0o755),
                content: Content::Dir { tree },
            },
        );
    }
    for g in 0..garbage {
        let chunk = object::encode_chunk(format!("{name} garbage {g}").as_bytes());
        blobs.push((Hash::of(&chunk), chunk));
        if blobs.len() >= 20_000 {
            upload(&mut conn, &mut blobs)?;
        }
    }
    upload(&mut conn, &mut blobs)?;
    let root = store.put_dir(&root)?;
    let v = Volume::new(store.clone(), name);
    v.create()?;
    v.change("bench tree", |_, _| Ok(root))?;
    Ok(live)
}

/// Runs fsclient with `args`, returning its output and peak RSS in bytes.
fn run_measured(url: &str, args: &[&str]) -> Result<(String, u64)> {
    let child = Command::new(fsclient_bin())
        .args(["--store", url])
        .args(args)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("starting fsclient")?;
    let pid = child.id() as i32;
    let mut stdout = child.stdout.expect("piped");
    let mut out = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut out)?;
    let mut status = 0;
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waiting for our own child, with valid pointers.
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    if r != pid || !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        bail!("fsclient {args:?} failed: {out}");
    }
    Ok((out, usage.ru_maxrss as u64 * 1024))
}

fn field(report: &str, name: &str) -> Result<u64> {
    protocol_tests::report_field(report, name).with_context(|| format!("no {name} in {report}"))
}

pub fn run(blobs: u64) -> Result<Report> {
    require_redis();
    let redis = Server::redis(&[])?;
    let url = format!("redis://127.0.0.1:{}", redis.port);
    let store = BlobStore::new(std::sync::Arc::new(RespDict::open(&url)?), "dfs:", 64 << 20);

    // Nine tenths live (1,000-file directories of one-chunk files), one tenth garbage.
    let per_dir = 1000;
    let dirs = (blobs * 9 / 10 / (2 * per_dir)).max(1);
    let garbage = blobs / 10;
    let t = Instant::now();
    let live = build(&url, &store, "big", dirs, per_dir, garbage)?;
    println!(
        "built {} blobs in {:.0}s",
        live + garbage,
        t.elapsed().as_secs_f64()
    );
    let info = redis.connect()?.cmd("INFO memory")?.text();
    let store_memory = info
        .lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(0.0);

    let t = Instant::now();
    let (out, rss) = run_measured(
        &url,
        &[
            "gc",
            "--keep-within",
            "0",
            "--keep-hourly",
            "0",
            "--keep-daily",
            "0",
        ],
    )?;
    let secs = t.elapsed().as_secs_f64();
    print!("{out}");
    let candidates = field(&out, "blobs in store:")?;
    let marked = field(&out, "marked:")?;
    let refs = out
        .lines()
        .find_map(|l| l.strip_prefix("marked:"))
        .and_then(|r| {
            r.split(',')
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse::<u64>()
                .ok()
        })
        .unwrap_or(0);
    let gc = Collect {
        blobs_in_store: candidates,
        live_blobs: live,
        garbage_blobs: garbage,
        deleted: field(&out, "deleted:")?,
        seconds: secs,
        marked_per_s: (marked + refs) as f64 / secs,
        candidates_per_s: candidates as f64 / secs,
        peak_rss_mib: rss as f64 / (1 << 20) as f64,
        peak_rss_bytes_per_blob: rss as f64 / candidates.max(1) as f64,
        store_memory_mib: store_memory / (1 << 20) as f64,
    };

    // diff: 100 directories of 1,000 files; change one file.
    let files = 100_000;
    build(&url, &store, "difftree", files / 1000, 1000, 0)?;
    let v = Volume::new(store.clone(), "difftree");
    v.change("one file", |s, root| {
        fsclient::tree::write_file(
            s,
            root,
            &[b"d42".to_vec(), b"f7".to_vec()],
            &b"changed"[..],
            0o644,
            fsclient::tree::Chunking::default(),
        )
    })?;
    let t = Instant::now();
    let diff = Command::new(fsclient_bin())
        .args(["--store", &url, "--volume", "difftree", "diff", "HEAD~1", "HEAD"])
        .output()?;
    let diff_ms = t.elapsed().as_secs_f64() * 1e3;
    if !diff.status.success() {
        bail!("diff failed: {}", String::from_utf8_lossy(&diff.stderr));
    }
    let changes = String::from_utf8_lossy(&diff.stdout).lines().count();
    let t = Instant::now();
    let fsck = Command::new(fsclient_bin())
        .args(["--store", &url, "--volume", "difftree", "fsck"])
        .output()?;
    let full_walk_ms = t.elapsed().as_secs_f64() * 1e3;
    if !fsck.status.success() {
        bail!("fsck failed: {}", String::from_utf8_lossy(&fsck.stdout));
    }
    let report = Report {
        gc,
        diff: DiffRow {
            files,
            diff_ms,
            changes,
            full_walk_ms,
            full_walk_over_diff: full_walk_ms / diff_ms,
        },
    };
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(report)
}
