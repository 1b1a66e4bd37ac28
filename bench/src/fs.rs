//! `bench fs`: fsclient's put and get through kvd and through redis-server in the
//! same run, an encrypted volume against a plain one (both on kvd), hashing +
//! chunking against `sha256sum` (the ceiling), and dedup.

use std::io::Write;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use fsclient::dict::RespDict;
use fsclient::object::{Content, Hash};
use fsclient::store::BlobStore;
use fsclient::tree::{self, Chunking};
use fsclient::volume::Volume;
use protocol_tests::{require_redis, Server};
use rand::{Rng, SeedableRng};
use serde::Serialize;

#[derive(Serialize)]
pub struct Report {
    rows: Vec<Row>,
    /// The same figures for an encrypted volume (ours) against a plain one
    /// (the peer), both through kvd.
    encrypted: Vec<Row>,
    hashing: Hashing,
    dedup: Dedup,
}

/// One figure, fsclient through kvd against fsclient through redis-server.
#[derive(Serialize)]
struct Row {
    figure: String,
    #[serde(flatten)]
    compared: crate::rounds::Compared,
}

#[derive(Serialize)]
struct Hashing {
    mb: u64,
    chunk_and_hash_mb_s: f64,
    sha256sum_mb_s: f64,
    ratio: f64,
}

#[derive(Serialize)]
struct Dedup {
    file_mib: u64,
    inserted_bytes: u64,
    new_chunks: usize,
    new_chunk_bytes: u64,
    /// What the store grew by with the edited copy: every blob it took (new
    /// chunks, the manifest, directories, the commit), the figure to set
    /// beside restic's repository growth.
    store_growth_bytes: u64,
    /// What restic's repository grew by when backing up the edited copy after
    /// the original (None if restic is not installed).
    restic_second_backup_bytes: Option<u64>,
}

fn dir_bytes(dir: &std::path::Path) -> u64 {
    let mut total = 0;
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let Ok(m) = e.metadata() else { continue };
        total += if m.is_dir() { dir_bytes(&e.path()) } else { m.len() };
    }
    total
}

/// Backs up `a`, then `b`, with restic into a fresh repository; returns how
/// much the second backup added.
fn restic_second_backup(a: &[u8], b: &[u8]) -> Result<Option<u64>> {
    use std::process::Command;
    if Command::new("restic").arg("version").output().is_err() {
        return Ok(None);
    }
    let tmp = tempfile::tempdir()?;
    let repo = tmp.path().join("repo");
    std::fs::create_dir(tmp.path().join("a"))?;
    std::fs::create_dir(tmp.path().join("b"))?;
    std::fs::write(tmp.path().join("a/file"), a)?;
    std::fs::write(tmp.path().join("b/file"), b)?;
    let restic = |args: &[&str]| -> Result<()> {
        let out = Command::new("restic")
            .arg("--repo")
            .arg(&repo)
            .args(["--quiet", "--no-cache"])
            .args(args)
            .env("RESTIC_PASSWORD", "bench")
            .current_dir(tmp.path())
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "restic {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    };
    restic(&["init"])?;
    restic(&["backup", "a"])?;
    let before = dir_bytes(&repo);
    restic(&["backup", "b"])?;
    Ok(Some(dir_bytes(&repo) - before))
}

fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v = vec![0u8; len];
    rng.fill(&mut v[..]);
    v
}

/// How a bench volume's blobs are stored: plain, or encrypted with a key file.
#[derive(Clone, Copy)]
enum Sealing<'a> {
    Plain,
    Encrypted(&'a std::path::Path),
}

/// A client of the bench volume at `port`, with an empty cache.
fn store(port: u16, sealing: Sealing) -> Result<(BlobStore, Option<fsclient::volume_key::Lock>)> {
    let dict = RespDict::open(&format!("redis://127.0.0.1:{port}"))?;
    let store = BlobStore::new(Arc::new(dict), "bench:", 64 << 20);
    Ok(match sealing {
        Sealing::Plain => (store, None),
        Sealing::Encrypted(key) => {
            let source = fsclient::volume_key::KeySource::File(key.to_path_buf());
            let (lock, keys) = fsclient::volume_key::Lock::create(&source).map_err(anyhow::Error::msg)?;
            let codec = fsclient::codec::Codec::Encrypted(Box::new(keys));
            (store.with_codec(codec), Some(lock))
        }
    })
}

fn volume(port: u16, sealing: Sealing) -> Result<Volume> {
    let (store, lock) = store(port, sealing)?;
    let v = Volume::new(store, "bench");
    v.create_encrypted(Chunking::default(), lock.as_ref())?;
    Ok(v)
}

fn file_manifest(v: &Volume, path: &str) -> Result<Hash> {
    let root = v.root()?;
    match tree::lookup(&v.store, root, &tree::split_path(path)?)? {
        Some(e) => match e.content {
            Content::File { manifest, .. } => Ok(manifest),
            _ => anyhow::bail!("{path} is not a file"),
        },
        None => anyhow::bail!("{path} is the root"),
    }
}

/// The bytes of every key under `prefix` in the store at `port`.
fn prefix_bytes(port: u16, prefix: &str) -> Result<u64> {
    let mut c = protocol_tests::Conn::connect(port)?;
    let mut cursor = "0".to_string();
    let mut total = 0;
    loop {
        let reply = c.call(&["SCAN", &cursor, "MATCH", &format!("{prefix}*"), "COUNT", "1000"])?;
        let protocol_tests::Value::Array(parts) = reply else {
            anyhow::bail!("SCAN: {reply:?}")
        };
        cursor = parts[0].as_str();
        if let protocol_tests::Value::Array(keys) = &parts[1] {
            for k in keys {
                total += c.call(&["STRLEN", &k.as_str()])?.as_int().unwrap_or(0) as u64;
            }
        }
        if cursor == "0" {
            return Ok(total);
        }
    }
}

/// One round's figures through the store at `port` (emptied first).
fn measure(port: u16, big: &[u8], small: usize, sealing: Sealing) -> Result<Vec<(String, f64)>> {
    protocol_tests::Conn::connect(port)?.cmd("FLUSHALL")?;
    let v = volume(port, sealing)?;
    let mb = big.len() as f64 / 1e6;
    let t = Instant::now();
    v.change("big", |s, r| {
        tree::write_file(s, r, &tree::split_path("/big")?, big, 0o644, Chunking::default())
    })?;
    let big_put = mb / t.elapsed().as_secs_f64();
    let manifest = file_manifest(&v, "/big")?;
    // A fresh store: nothing cached.
    let fresh = store(port, sealing)?.0;
    let t = Instant::now();
    let mut sink = std::io::sink();
    let n = tree::read_file(&fresh, &manifest, &mut sink)?;
    sink.flush()?;
    anyhow::ensure!(n == big.len() as u64, "read back {n} bytes");
    let big_get = mb / t.elapsed().as_secs_f64();

    let files: Vec<Vec<u8>> = (0..small).map(|i| random_bytes(4096, 1000 + i as u64)).collect();
    let t = Instant::now();
    v.change("small", |s, root| {
        let root = tree::mkdir(s, root, &tree::split_path("/small")?, 0o755)?;
        let mut dir = fsclient::object::Dir::new();
        for (i, data) in files.iter().enumerate() {
            dir.insert(
                format!("f{i}").into_bytes(),
                tree::file_entry(s, &data[..], 0o644, Chunking::default())?,
            );
        }
        tree::insert_many(s, root, &tree::split_path("/small")?, dir)
    })?;
    let small_put = small as f64 / t.elapsed().as_secs_f64();
    let fresh = store(port, sealing)?.0;
    let root = v.root()?;
    let t = Instant::now();
    for (name, e) in tree::list(&fresh, root, &tree::split_path("/small")?)? {
        if let Content::File { manifest, .. } = e.content {
            tree::read_to_vec(&fresh, &manifest)?;
        } else {
            anyhow::bail!("{} is not a file", tree::show(&name));
        }
    }
    let small_get = small as f64 / t.elapsed().as_secs_f64();
    Ok(vec![
        ("large file put, MB/s".into(), big_put),
        ("large file get, MB/s".into(), big_get),
        ("4 KiB files put, files/s".into(), small_put),
        ("4 KiB files get, files/s".into(), small_get),
    ])
}

fn hashing(data: &[u8]) -> Result<Hashing> {
    // Chunking + SHA-256 of every chunk blob, no store: the client's CPU cost.
    let t = Instant::now();
    let mut n = 0;
    let c = Chunking::default();
    for chunk in fastcdc_chunks(data, c) {
        n += Hash::of(&fsclient::object::encode_chunk(chunk)).0[0] as usize;
    }
    let ours = data.len() as f64 / 1e6 / t.elapsed().as_secs_f64();
    std::hint::black_box(n);
    let file = tempfile::NamedTempFile::new()?;
    std::fs::write(file.path(), data)?;
    // Warm the page cache so sha256sum measures hashing, not the disk.
    std::fs::read(file.path())?;
    let t = Instant::now();
    let status = std::process::Command::new("sha256sum")
        .arg(file.path())
        .stdout(std::process::Stdio::null())
        .status()?;
    anyhow::ensure!(status.success(), "sha256sum failed");
    let theirs = data.len() as f64 / 1e6 / t.elapsed().as_secs_f64();
    Ok(Hashing {
        mb: data.len() as u64 / 1_000_000,
        chunk_and_hash_mb_s: ours,
        sha256sum_mb_s: theirs,
        ratio: ours / theirs,
    })
}

/// The chunks `data` is cut into.
fn fastcdc_chunks(data: &[u8], c: Chunking) -> impl Iterator<Item = &[u8]> {
    let mut pos = 0usize;
    tree::chunk_boundaries(data, c).map(move |len| {
        let s = &data[pos..pos + len];
        pos += len;
        s
    })
}

fn dedup(port: u16, mib: u64) -> Result<Dedup> {
    let dict = RespDict::open(&format!("redis://127.0.0.1:{port}"))?;
    let v = Volume::new(BlobStore::new(Arc::new(dict), "dedup:", 64 << 20), "dedup");
    v.create()?;
    let data = random_bytes((mib << 20) as usize, 99);
    v.change("a", |s, r| {
        tree::write_file(
            s,
            r,
            &tree::split_path("/a")?,
            &data[..],
            0o644,
            Chunking::default(),
        )
    })?;
    let mut edited = data.clone();
    let mid = edited.len() / 2;
    edited.splice(mid..mid, random_bytes(1024, 5));
    let before = prefix_bytes(port, "dedup:")?;
    v.change("b", |s, r| {
        tree::write_file(
            s,
            r,
            &tree::split_path("/b")?,
            &edited[..],
            0o644,
            Chunking::default(),
        )
    })?;
    let a = v.store.manifest(&file_manifest(&v, "/a")?)?;
    let b = v.store.manifest(&file_manifest(&v, "/b")?)?;
    let known: std::collections::HashSet<Hash> = a.chunks.iter().map(|(h, _)| *h).collect();
    let new: Vec<&(Hash, u32)> = b.chunks.iter().filter(|(h, _)| !known.contains(h)).collect();
    Ok(Dedup {
        file_mib: mib,
        inserted_bytes: 1024,
        new_chunks: new.len(),
        new_chunk_bytes: new.iter().map(|(_, l)| *l as u64).sum(),
        store_growth_bytes: prefix_bytes(port, "dedup:")? - before,
        restic_second_backup_bytes: restic_second_backup(&data, &edited)?,
    })
}

pub fn run(big_mib: u64, small: usize, rounds: usize) -> Result<Report> {
    require_redis();
    let big = random_bytes((big_mib << 20) as usize, 42);
    // The same durability on both sides: kvd's default (everysec) and Redis's AOF
    // with everysec.
    let kvd = Server::kvd(&[])?;
    let redis = Server::redis(&["--appendonly", "yes", "--appendfsync", "everysec"])?;
    let ports = [kvd.port, redis.port];
    let runs = crate::rounds::run(2, rounds, |side| {
        measure(ports[side], &big, small, Sealing::Plain)
    })?;
    let rows = compare(&runs);
    let keys = tempfile::tempdir()?;
    let key = keys.path().join("key");
    fsclient::volume_key::keygen(&key).map_err(anyhow::Error::msg)?;
    let sealings = [Sealing::Encrypted(&key), Sealing::Plain];
    let runs = crate::rounds::run(2, rounds, |side| measure(kvd.port, &big, small, sealings[side]))?;
    let encrypted = compare(&runs);
    println!("fsclient through kvd and through redis-server (AOF everysec), {big_mib} MiB file, {small} files of 4 KiB, median of {rounds} rounds' ratios");
    show(&rows, "kvd", "redis");
    println!("an encrypted volume against a plain one, both on kvd");
    show(&encrypted, "encrypted", "plain");
    let hashing = hashing(&big)?;
    println!(
        "chunking + SHA-256: {:.0} MB/s; sha256sum: {:.0} MB/s (ratio {:.2})",
        hashing.chunk_and_hash_mb_s, hashing.sha256sum_mb_s, hashing.ratio
    );
    let dedup = dedup(kvd.port, 256)?;
    println!(
        "dedup: {} MiB file, then a copy with 1 KiB inserted in the middle: {} new chunks ({} bytes); the store grew {} bytes",
        dedup.file_mib, dedup.new_chunks, dedup.new_chunk_bytes, dedup.store_growth_bytes
    );
    match dedup.restic_second_backup_bytes {
        Some(n) => println!("restic, same two files: the second backup added {n} bytes to its repository"),
        None => println!("restic is not installed (scripts/setup.sh installs it): no comparison"),
    }
    Ok(Report {
        rows,
        encrypted,
        hashing,
        dedup,
    })
}

/// Prints rows of side `ours` against side `peer`.
fn show(rows: &[Row], ours: &str, peer: &str) {
    for r in rows {
        let (lo, hi) = r.compared.spread();
        println!(
            "{:<26} {ours} {:>9.0}  {peer} {:>9.0}  {ours}/{peer} {:.2} ({lo:.2}-{hi:.2})",
            r.figure, r.compared.ours, r.compared.peer, r.compared.ratio
        );
    }
}

/// Each figure of side 0 against side 1.
fn compare(runs: &crate::rounds::Runs) -> Vec<Row> {
    runs.tests()
        .into_iter()
        .map(|figure| Row {
            compared: runs.compare(&figure, 0, 1),
            figure,
        })
        .collect()
}
