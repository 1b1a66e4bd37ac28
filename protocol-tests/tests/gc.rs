//! `fsclient gc` end to end: real stores (kvd, redis-server, a kvd cluster),
//! real processes, real mounts racing the collector.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use protocol_tests::{fsclient_at, require_redis, Mount, Server, Value};

fn url(server: &Server) -> String {
    format!("redis://127.0.0.1:{}", server.port)
}

fn ok(url: &str, args: &[&str]) -> String {
    protocol_tests::fsclient_ok(url, args)
}

/// Keep only heads and snapshots: everything else is garbage at once.
const KEEP_NOTHING: [&str; 7] = [
    "gc",
    "--keep-within",
    "0",
    "--keep-hourly",
    "0",
    "--keep-daily",
    "0",
];

/// Bytes of every blob the nodes hold, each blob once (a kvd cluster keeps
/// it on several nodes; each node's KEYS lists its own, as in Redis Cluster).
fn blob_bytes(nodes: &[&Server]) -> u64 {
    let mut seen = std::collections::HashSet::new();
    let mut total = 0;
    for node in nodes {
        let mut c = node.connect().unwrap();
        let Value::Array(keys) = c.cmd("KEYS dfs:b:*").unwrap() else {
            panic!("KEYS answers an array")
        };
        for k in keys {
            if seen.insert(k.as_str()) {
                total += c.call(&["STRLEN", &k.as_str()]).unwrap().as_int().unwrap() as u64;
            }
        }
    }
    total
}

/// `stored bytes:` of `fsclient stats --at VERSION`.
fn stored_bytes(url: &str, version: &str) -> u64 {
    field(&ok(url, &["stats", "--at", version]), "stored bytes:")
}

fn field(report: &str, name: &str) -> u64 {
    protocol_tests::report_field(report, name).unwrap_or_else(|| panic!("no {name} in {report}"))
}

fn random(seed: u64, len: usize) -> Vec<u8> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..len).map(|_| rng.gen()).collect()
}

/// Writes, overwrites and deletes files around a snapshot; collects; checks
/// that what is left is what the head and the snapshot need (plus the commit
/// records) and that both still read intact; then drops the snapshot and
/// checks its files are collected too.
fn space_comes_back(url: &str, nodes: &[&Server]) {
    ok(url, &["mkfs"]);
    let dir = tempfile::tempdir().unwrap();
    let put = |name: &str, seed: u64| {
        let path = dir.path().join(name);
        std::fs::write(&path, random(seed, 600_000)).unwrap();
        ok(url, &["put", path.to_str().unwrap(), &format!("/{name}")]);
    };
    for i in 0..6 {
        put(&format!("f{i}"), i);
    }
    ok(url, &["snapshot", "create", "keep"]);
    for round in 1..4 {
        for i in 0..3 {
            put(&format!("f{i}"), 100 * round + i);
        }
    }
    ok(url, &["rm", "/f5"]);
    let before = blob_bytes(nodes);

    let report = ok(url, &KEEP_NOTHING);
    let after = blob_bytes(nodes);
    // What must stay: the head's f0..f4 and the snapshot's f0..f5, of which
    // f3 and f4 are the same in both (stats counts them in each).
    let live = stored_bytes(url, "HEAD") + stored_bytes(url, "keep") - 2 * 600_002;
    assert!(field(&report, "deleted:") > 0, "{report}");
    assert!(after < before, "nothing came back: {before} -> {after}");
    // Within 2% (plus a few KiB of commit records) of that.
    assert!(after >= live - live / 50, "deleted live data: {after} < {live}");
    assert!(
        after <= live + live / 50 + 8192,
        "garbage left: {after} > {live} ({before} before)"
    );
    assert!(ok(url, &["fsck"]).contains(", 0 damaged paths"));
    assert!(ok(url, &["fsck", "--at", "keep"]).contains(", 0 damaged paths"));
    // The snapshot's files are the old ones, byte for byte.
    let old = fsclient_at(url, &["cat", "--at", "keep", "/f0"]);
    assert!(old.status.success() && old.stdout == random(0, 600_000));
    let out = dir.path().join("out");
    ok(url, &["restore", "/f5", "--from", "keep"]);
    ok(url, &["get", "/f5", out.to_str().unwrap()]);
    assert_eq!(std::fs::read(&out).unwrap(), random(5, 600_000));

    // Without the snapshot, the old versions of f0..f2 go as well.
    ok(url, &["snapshot", "delete", "keep"]);
    ok(url, &KEEP_NOTHING);
    let last = blob_bytes(nodes);
    let live = stored_bytes(url, "HEAD");
    assert!(last <= live + live / 50 + 8192, "garbage left: {last} > {live}");
    assert!(ok(url, &["fsck"]).contains(", 0 damaged paths"));
    // History is listed whole, saying which versions' files were collected:
    // all but the head's and the one before `rm /f5` (restoring f5 made the
    // same tree again, so that version's files are all there).
    let log = ok(url, &["log", "-n", "100"]);
    let commits = log.lines().filter(|l| l.starts_with("commit ")).count();
    assert_eq!(commits, 18, "{log}");
    assert_eq!(log.matches("(files collected)").count(), commits - 2, "{log}");
}

#[test]
fn space_comes_back_on_kvd() {
    let kvd = Server::kvd(&[]).unwrap();
    space_comes_back(&url(&kvd), &[&kvd]);
    // A mount's .history shows only versions whose files are still there.
    let mut m = Mount::start(&url(&kvd), "main", &[]).unwrap();
    let history: Vec<_> = std::fs::read_dir(m.path().join(".history")).unwrap().collect();
    assert_eq!(history.len(), 2, "{history:?}");
    let newest = history.iter().map(|e| e.as_ref().unwrap().path()).max().unwrap();
    // (A directory entry keeps its directory open: let go before unmounting.)
    drop(history);
    assert_eq!(std::fs::read(newest.join("f1")).unwrap(), random(301, 600_000));
    assert!(m.stop());
}

#[test]
fn space_comes_back_on_redis_server() {
    require_redis();
    let redis = Server::redis(&[]).unwrap();
    space_comes_back(&url(&redis), &[&redis]);
}

#[test]
fn space_comes_back_on_a_kvd_cluster() {
    // Blobs are spread over the nodes: the collector lists every node's.
    let cluster = protocol_tests::Replicated::start(4, 3);
    let nodes: Vec<&Server> = (0..4).map(|i| cluster.server(i)).collect();
    space_comes_back(&url(cluster.server(0)), &nodes);
}

#[test]
fn a_dry_run_frees_nothing_and_tells_what_it_would() {
    let kvd = Server::kvd(&[]).unwrap();
    let url = url(&kvd);
    ok(&url, &["mkfs"]);
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("f");
    std::fs::write(&f, random(1, 300_000)).unwrap();
    ok(&url, &["put", f.to_str().unwrap(), "/f"]);
    ok(&url, &["rm", "/f"]);
    let before = blob_bytes(&[&kvd]);
    let mut dry = KEEP_NOTHING.to_vec();
    dry.push("--dry-run");
    let report = ok(&url, &dry);
    assert_eq!(blob_bytes(&[&kvd]), before);
    let would = field(&report, "would delete:");
    assert!(would > 0, "{report}");
    let report = ok(&url, &KEEP_NOTHING);
    assert_eq!(field(&report, "deleted:"), would);
}

/// Two mounts of one volume write files continuously (a few contents over and
/// over, so deleted files' chunks come back through dedup) and delete some,
/// reading back their own earlier files as they go, while `fsclient gc` runs
/// back to back with small deletion windows. No read ever fails, and at the
/// end every file each writer left reads back intact through the CLI.
#[test]
fn collections_racing_two_mounts_lose_nothing() {
    let kvd = Server::kvd(&[]).unwrap();
    let url = url(&kvd);
    let mounts = [
        Mount::start(&url, "main", &[]).unwrap(),
        Mount::start(&url, "main", &[]).unwrap(),
    ];
    let contents: Vec<Vec<u8>> = (0..5).map(|i| random(i, 400_000)).collect();
    let contents = Arc::new(contents);
    let stop = Arc::new(AtomicBool::new(false));
    let collector = {
        let (url, stop) = (url.clone(), stop.clone());
        std::thread::spawn(move || {
            let (mut runs, mut deleted) = (0, 0);
            while !stop.load(Ordering::SeqCst) {
                let report = ok(
                    &url,
                    &[
                        "gc",
                        "--keep-within",
                        "3s",
                        "--keep-hourly",
                        "0",
                        "--keep-daily",
                        "0",
                        "--window",
                        "20",
                    ],
                );
                runs += 1;
                deleted += field(&report, "deleted:");
            }
            (runs, deleted)
        })
    };
    let writers: Vec<_> = mounts
        .iter()
        .enumerate()
        .map(|(w, m)| {
            let dir = m.path().join(format!("w{w}"));
            std::fs::create_dir_all(&dir).unwrap();
            let contents = contents.clone();
            std::thread::spawn(move || {
                let mut live: BTreeMap<String, usize> = BTreeMap::new();
                let until = Instant::now() + Duration::from_secs(12);
                let mut i = 0usize;
                while Instant::now() < until {
                    i += 1;
                    let name = format!("f{}", i % 11);
                    let which = (i * 7 + w) % contents.len();
                    std::fs::write(dir.join(&name), &contents[which]).unwrap();
                    live.insert(name, which);
                    if i.is_multiple_of(4) {
                        let gone = format!("f{}", (i + 5) % 11);
                        if live.remove(&gone).is_some() {
                            std::fs::remove_file(dir.join(&gone)).unwrap();
                        }
                    }
                    // Read back an earlier file of ours.
                    let (name, which) = live.iter().nth(i % live.len()).unwrap();
                    let read =
                        std::fs::read(dir.join(name)).unwrap_or_else(|e| panic!("reading {name}: {e}"));
                    assert!(
                        read == contents[*which],
                        "{name} read back wrong while collecting"
                    );
                }
                live
            })
        })
        .collect();
    let lives: Vec<_> = writers.into_iter().map(|w| w.join().unwrap()).collect();
    for mut m in mounts {
        assert!(m.stop(), "unmount");
    }
    stop.store(true, Ordering::SeqCst);
    let (runs, deleted) = collector.join().unwrap();
    assert!(
        runs >= 2 && deleted > 0,
        "the collector must have raced: {runs} runs deleted {deleted}"
    );
    // Collect once more, then check every file from a fresh client.
    ok(&url, &KEEP_NOTHING);
    let scratch = tempfile::tempdir().unwrap();
    let out = scratch.path().join("out");
    for (w, live) in lives.iter().enumerate() {
        for (name, which) in live {
            ok(&url, &["get", &format!("/w{w}/{name}"), out.to_str().unwrap()]);
            assert!(std::fs::read(&out).unwrap() == contents[*which], "/w{w}/{name}");
        }
        let listed = ok(&url, &["ls", &format!("/w{w}")]);
        assert_eq!(listed.lines().count(), live.len(), "/w{w}: {listed}");
    }
    assert!(ok(&url, &["fsck"]).contains(", 0 damaged paths"));
}
