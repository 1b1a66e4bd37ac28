//! The fsclient CLI end to end against a real kvd and a real redis-server.

use std::path::Path;
use std::process::{Command, Output};

use protocol_tests::{fsclient_bin, require_redis, same_trees, Server};

fn fsclient(server: &Server, args: &[&str]) -> Output {
    protocol_tests::fsclient_at(&format!("redis://127.0.0.1:{}", server.port), args)
}

fn ok(server: &Server, args: &[&str]) -> String {
    protocol_tests::fsclient_ok(&format!("redis://127.0.0.1:{}", server.port), args)
}

/// A tree of files: small, empty, larger than one chunk, nested, a symlink.
fn make_tree(dir: &Path) {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    std::fs::create_dir_all(dir.join("a/b/c")).unwrap();
    std::fs::write(dir.join("empty"), b"").unwrap();
    std::fs::write(dir.join("small.txt"), b"hello dictfs\n").unwrap();
    let big: Vec<u8> = (0..5 * 1024 * 1024).map(|_| rng.gen()).collect();
    std::fs::write(dir.join("a/big.bin"), &big).unwrap();
    for i in 0..50 {
        let len = rng.gen_range(0..20_000);
        let data: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
        std::fs::write(dir.join(format!("a/b/c/f{i}")), data).unwrap();
    }
    std::os::unix::fs::symlink("small.txt", dir.join("link")).unwrap();
}

fn round_trip_and_concurrent_writers(server: &Server) {
    ok(server, &["mkfs"]);
    let err = fsclient(server, &["mkfs"]);
    assert!(!err.status.success());
    let src = tempfile::tempdir().unwrap();
    make_tree(src.path());
    ok(server, &["put", src.path().to_str().unwrap(), "/tree"]);
    let dst = tempfile::tempdir().unwrap();
    ok(
        server,
        &["get", "/tree", dst.path().join("out").to_str().unwrap()],
    );
    same_trees(src.path(), &dst.path().join("out"));
    assert_eq!(ok(server, &["cat", "/tree/small.txt"]), "hello dictfs\n");
    let missing = fsclient(server, &["stat", "/tree/nope"]);
    assert_eq!(
        String::from_utf8_lossy(&missing.stderr).trim(),
        "fsclient: cannot stat '/tree/nope': No such file or directory"
    );

    // Two writers at once in one directory: every file of both survives.
    ok(server, &["mkdir", "/shared"]);
    let writers: Vec<_> = ["x", "y"]
        .into_iter()
        .map(|w| {
            let port = server.port;
            std::thread::spawn(move || {
                let file = tempfile::NamedTempFile::new().unwrap();
                std::fs::write(file.path(), w.repeat(100)).unwrap();
                for i in 0..15 {
                    let out = Command::new(fsclient_bin())
                        .args(["--store", &format!("redis://127.0.0.1:{port}")])
                        .args(["put", file.path().to_str().unwrap(), &format!("/shared/{w}{i}")])
                        .output()
                        .unwrap();
                    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    let listing = ok(server, &["ls", "/shared"]);
    let names: Vec<&str> = listing.lines().collect();
    assert_eq!(names.len(), 30, "{listing}");
    assert_eq!(ok(server, &["cat", "/shared/y7"]), "y".repeat(100));
}

#[test]
fn cli_against_kvd() {
    let kvd = Server::kvd(&[]).unwrap();
    round_trip_and_concurrent_writers(&kvd);
}

#[test]
fn cli_against_redis_server() {
    require_redis();
    let redis = Server::redis(&[]).unwrap();
    round_trip_and_concurrent_writers(&redis);
}

#[test]
fn cli_against_a_redis_cluster() {
    require_redis();
    let cluster = protocol_tests::RedisCluster::start(3).unwrap();
    // Talk to one node; fsclient finds the others and routes by slot.
    round_trip_and_concurrent_writers(&cluster.nodes[0]);
    // The blobs really are spread over the nodes.
    for node in &cluster.nodes {
        let keys = node.connect().unwrap().cmd("DBSIZE").unwrap().as_int().unwrap();
        assert!(keys > 0, "node {} holds nothing", node.port);
    }
}

#[test]
fn cli_against_a_kvd_cluster_through_any_node() {
    // Four nodes, every key on three: each node holds about three quarters.
    let cluster = protocol_tests::Replicated::start(4, 3);
    round_trip_and_concurrent_writers(cluster.server(1));
    for i in 0..4 {
        let keys = cluster.conn(i).cmd("DBSIZE").unwrap().as_int().unwrap();
        assert!(keys > 0, "node {i} holds nothing");
    }
    // Every node serves the same file system.
    for i in 0..4 {
        assert_eq!(
            ok(cluster.server(i), &["cat", "/tree/small.txt"]),
            "hello dictfs\n"
        );
    }
}

#[test]
fn a_corrupted_blob_fails_its_file_naming_the_key_and_nothing_else() {
    let kvd = Server::kvd(&[]).unwrap();
    ok(&kvd, &["mkfs"]);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("good"), b"good data").unwrap();
    std::fs::write(dir.path().join("bad"), b"soon corrupt").unwrap();
    ok(&kvd, &["put", dir.path().to_str().unwrap(), "/"]);
    // Find the chunk blob of "bad" (its content is unique) and damage it.
    let mut c = kvd.connect().unwrap();
    let keys = c.cmd("KEYS dfs:b:*").unwrap();
    let protocol_tests::Value::Array(keys) = keys else {
        panic!()
    };
    let mut damaged = None;
    for k in keys {
        let key = k.as_str();
        let v = c.call(&["GET", &key]).unwrap().as_str();
        if v.ends_with("soon corrupt") {
            c.call(&["SET", &key, "\u{1}\u{1}rotten"]).unwrap();
            damaged = Some(key);
        }
    }
    let damaged = damaged.expect("found the chunk");
    let out = fsclient(&kvd, &["cat", "/bad"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&damaged), "error does not name the key: {err}");
    assert_eq!(ok(&kvd, &["cat", "/good"]), "good data");
}

#[test]
fn snapshots_diff_restore_and_fsck() {
    let kvd = Server::kvd(&[]).unwrap();
    ok(&kvd, &["mkfs"]);
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("docs")).unwrap();
    std::fs::write(dir.path().join("docs/plan.txt"), b"version one").unwrap();
    std::fs::write(dir.path().join("keep.txt"), b"unchanged").unwrap();
    ok(&kvd, &["put", dir.path().to_str().unwrap(), "/"]);
    ok(&kvd, &["snapshot", "create", "before"]);
    assert!(!fsclient(&kvd, &["snapshot", "create", "before"]).status.success());

    // Change and delete things after the snapshot.
    std::fs::write(dir.path().join("docs/plan.txt"), b"version two").unwrap();
    ok(
        &kvd,
        &[
            "put",
            dir.path().join("docs/plan.txt").to_str().unwrap(),
            "/docs/plan.txt",
        ],
    );
    ok(&kvd, &["rm", "/keep.txt"]);
    ok(&kvd, &["mkdir", "/new"]);

    // The snapshot still shows the old tree.
    assert_eq!(
        ok(&kvd, &["cat", "--at", "before", "/docs/plan.txt"]),
        "version one"
    );
    assert_eq!(ok(&kvd, &["cat", "--at", "before", "/keep.txt"]), "unchanged");
    assert!(ok(&kvd, &["snapshot", "list"]).starts_with("before\t"));
    let diff = ok(&kvd, &["diff", "before"]);
    let mut lines: Vec<&str> = diff.lines().collect();
    lines.sort();
    assert_eq!(lines, ["+ /new", "- /keep.txt", "M /docs/plan.txt"]);
    assert_eq!(ok(&kvd, &["diff", "HEAD", "HEAD"]), "");

    // Restore brings the deleted file back byte-identical.
    ok(&kvd, &["restore", "/keep.txt", "--from", "before"]);
    assert_eq!(ok(&kvd, &["cat", "/keep.txt"]), "unchanged");
    ok(&kvd, &["snapshot", "delete", "before"]);
    assert_eq!(ok(&kvd, &["snapshot", "list"]), "");

    // fsck: clean, then a chunk damaged by hand is found and named by path.
    assert!(ok(&kvd, &["fsck"]).contains(", 0 damaged paths"));
    let mut c = kvd.connect().unwrap();
    let protocol_tests::Value::Array(keys) = c.cmd("KEYS dfs:b:*").unwrap() else {
        panic!()
    };
    for k in keys {
        let key = k.as_str();
        if c.call(&["GET", &key]).unwrap().as_str().ends_with("version two") {
            c.call(&["DEL", &key]).unwrap();
        }
    }
    let out = fsclient(&kvd, &["fsck"]);
    assert!(!out.status.success());
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        report.contains("damaged: /docs/plan.txt: blob dfs:b:"),
        "{report}"
    );
    assert!(report.contains(", 1 damaged paths"), "{report}");

    // --repair has no second copy to fetch, so it marks the file by its name.
    let out = fsclient(&kvd, &["fsck", "--repair"]);
    assert!(!out.status.success(), "the damage is still there");
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        report.contains("renamed: /docs/plan.txt -> /docs/plan.txt.damaged"),
        "{report}"
    );
    assert_eq!(ok(&kvd, &["ls", "/docs"]).trim(), "plan.txt.damaged");
    let report = String::from_utf8_lossy(&fsclient(&kvd, &["fsck"]).stdout).into_owned();
    assert!(
        report.contains("damaged: /docs/plan.txt.damaged: blob dfs:b:"),
        "{report}"
    );
}

/// fsclient over `rediss://` to redis-server and to kvd, both on a TLS-only
/// port: the server's certificate checked against `SSL_CERT_FILE`, refused
/// when nobody vouches for it, accepted with `#insecure`.
#[test]
fn tls_store_with_rediss_urls() {
    require_redis();
    for program in ["redis-server", "kvd"] {
        let r = protocol_tests::tls_server(program, "no", &[]);
        let url = format!("rediss://127.0.0.1:{}", r.port);
        let ca = r.dir.path().join("ca.crt");
        let run = |url: &str, trust: bool, args: &[&str]| {
            let mut c = Command::new(fsclient_bin());
            if trust {
                c.env("SSL_CERT_FILE", &ca);
            }
            c.args(["--store", url]).args(args).output().unwrap()
        };
        let out = run(&url, true, &["mkfs"]);
        assert!(
            out.status.success(),
            "{program}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let src = tempfile::tempdir().unwrap();
        make_tree(src.path());
        assert!(run(&url, true, &["put", src.path().to_str().unwrap(), "/t"])
            .status
            .success());
        let dst = tempfile::tempdir().unwrap();
        let out = run(&url, true, &["get", "/t", dst.path().join("t").to_str().unwrap()]);
        assert!(
            out.status.success(),
            "{program}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        same_trees(src.path(), &dst.path().join("t"));
        // A certificate nobody vouches for is refused, with the reason.
        let out = run(&url, false, &["ls", "/"]);
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("certificate"));
        // Unless the user says so.
        let out = run(&format!("{url}/#insecure"), false, &["ls", "/"]);
        assert!(
            out.status.success(),
            "{program}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "t");
    }
}

/// Issue 21, item 3: kvd's TLS port with Redis's setting names behaves as
/// redis-server's: with `tls-auth-clients yes`, redis-cli with a client
/// certificate from the CA is served, one without is turned away, a plain
/// connection gets no RESP reply, and `CONFIG GET tls-*` answers; redis-py
/// with `ssl=True` works too, and fsclient with a client certificate
/// (`DICTFS_TLS_CERT_FILE`/`DICTFS_TLS_KEY_FILE`), not without.
#[test]
fn kvd_tls_port_serves_like_redis_server() {
    require_redis();
    let mut seen = Vec::new();
    for program in ["redis-server", "kvd"] {
        let r = protocol_tests::tls_server(program, "yes", &[]);
        let d = r.dir.path();
        let port = r.port.to_string();
        let cli = |cert: bool, args: &[&str]| -> (bool, String) {
            let mut c = Command::new("redis-cli");
            c.args(["-p", &port, "--tls", "--cacert", "ca.crt"]);
            if cert {
                c.args(["--cert", "client.crt", "--key", "client.key"]);
            }
            let out = c.args(args).current_dir(d).output().unwrap();
            (
                out.status.success(),
                String::from_utf8_lossy(&out.stdout).trim().to_string(),
            )
        };
        let set = cli(true, &["set", "k", "over tls"]);
        let get = cli(true, &["get", "k"]);
        let no_cert = cli(false, &["ping"]);
        let auth = cli(true, &["config", "get", "tls-auth-clients"]);
        let plain = Command::new("redis-cli")
            .args(["-p", &port, "ping"])
            .output()
            .unwrap();
        let plain_pong = String::from_utf8_lossy(&plain.stdout).contains("PONG");
        let py = Command::new("python3")
            .arg("-c")
            .arg(format!(
                "import redis; r = redis.Redis(port={port}, ssl=True, ssl_ca_certs='ca.crt', \
                 ssl_certfile='client.crt', ssl_keyfile='client.key'); print(r.get('k').decode())"
            ))
            .current_dir(d)
            .output()
            .unwrap();
        let py = String::from_utf8_lossy(&py.stdout).trim().to_string();
        eprintln!("{program}: set {set:?} get {get:?} without a certificate {no_cert:?} plain PONG {plain_pong} redis-py {py:?}");
        assert_eq!(set.1, "OK", "{program}");
        assert_eq!(get.1, "over tls", "{program}");
        assert_ne!(
            no_cert.1, "PONG",
            "{program} served a client without a certificate"
        );
        assert!(
            !plain_pong,
            "{program} answered a plain connection on its TLS port"
        );
        assert_eq!(auth.1, "tls-auth-clients\nyes", "{program}");
        assert_eq!(py, "over tls", "{program}: redis-py");
        // fsclient with a client certificate (DICTFS_TLS_*), and without one.
        let url = format!("rediss://127.0.0.1:{port}");
        let fs = |cert: bool, args: &[&str]| {
            let mut c = Command::new(fsclient_bin());
            c.env("DICTFS_TLS_CA_CERT_FILE", d.join("ca.crt"));
            if cert {
                c.env("DICTFS_TLS_CERT_FILE", d.join("client.crt"))
                    .env("DICTFS_TLS_KEY_FILE", d.join("client.key"));
            }
            c.args(["--store", &url]).args(args).output().unwrap()
        };
        let mkfs = fs(true, &["mkfs"]);
        assert!(
            mkfs.status.success(),
            "{program}: {}",
            String::from_utf8_lossy(&mkfs.stderr)
        );
        let local = d.join("local");
        std::fs::write(&local, b"file over mutual TLS").unwrap();
        assert!(fs(true, &["put", local.to_str().unwrap(), "/f"]).status.success());
        assert_eq!(fs(true, &["cat", "/f"]).stdout, b"file over mutual TLS");
        assert!(
            !fs(false, &["cat", "/f"]).status.success(),
            "{program}: fsclient without a certificate"
        );
        seen.push((set.1, get.1, no_cert.1 == "PONG", plain_pong, auth.1, py));
    }
    assert_eq!(seen[0], seen[1], "kvd and redis-server differ");
}

/// A client over `maxclients` on kvd's TLS port reads Redis's error (the
/// text redis-server gives on its plain port) inside TLS. kvd wrote it in
/// plain text before the handshake, which a TLS client cannot read;
/// redis-server 7.0 on its TLS port closes such a connection without a
/// readable error, so it is not the reference here.
#[test]
fn a_client_over_maxclients_on_the_tls_port_reads_the_error() {
    {
        let program = "kvd";
        let r = protocol_tests::tls_server(program, "no", &["--maxclients", "1"]);
        // A TLS client that was served, and stays, holds the one slot.
        let mut holder = Command::new("python3")
            .arg("-c")
            .arg(format!(
                "import ssl, socket, sys, time\n\
                 c = ssl.create_default_context(cafile='ca.crt')\n\
                 s = c.wrap_socket(socket.create_connection(('127.0.0.1', {})), server_hostname='localhost')\n\
                 s.sendall(b'PING\\r\\n'); print(s.recv(100)); sys.stdout.flush(); time.sleep(30)",
                r.port
            ))
            .current_dir(r.dir.path())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(holder.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        let out = Command::new("redis-cli")
            .args(["-p", &r.port.to_string(), "--tls", "--cacert", "ca.crt", "ping"])
            .current_dir(r.dir.path())
            .output()
            .unwrap();
        let _ = holder.kill();
        let _ = holder.wait();
        assert!(line.contains("PONG"), "{program}: the first client got {line}");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            text.contains("max number of clients reached"),
            "{program}: {text}"
        );
    }
}

#[test]
fn chunk_sizes_are_chosen_per_volume_at_mkfs() {
    let kvd = Server::kvd(&[]).unwrap();
    let bad = fsclient(&kvd, &["mkfs", "--chunk-min", "1M", "--chunk-avg", "64K"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("bad chunk sizes"));
    ok(
        &kvd,
        &[
            "mkfs",
            "--chunk-min",
            "16K",
            "--chunk-avg",
            "64K",
            "--chunk-max",
            "256K",
        ],
    );
    let dir = tempfile::tempdir().unwrap();
    use rand::{Rng, SeedableRng};
    let data: Vec<u8> = {
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        (0..2 << 20).map(|_| rng.gen()).collect()
    };
    std::fs::write(dir.path().join("f"), &data).unwrap();
    ok(&kvd, &["put", dir.path().join("f").to_str().unwrap(), "/f"]);
    let mut c = kvd.connect().unwrap();
    let keys = c.cmd("KEYS dfs:b:*").unwrap();
    let n = match keys {
        protocol_tests::Value::Array(items) => items.len(),
        other => panic!("{other:?}"),
    };
    // 2 MiB in chunks of 16..256 KiB: at least 8 chunks (the default would
    // give about 2), plus the manifest and two directories.
    assert!(n >= 8 + 3, "{n} blobs");
    assert_eq!(
        c.cmd("GET dfs:v:main:config").unwrap(),
        protocol_tests::Value::Bulk(b"min=16384 avg=65536 max=262144".to_vec())
    );
    let out = fsclient(&kvd, &["cat", "/f"]);
    assert!(out.stdout == data);
}

#[test]
fn stats_count_distinct_blobs_once() {
    let kvd = Server::kvd(&[]).unwrap();
    ok(&kvd, &["mkfs"]);
    let dir = tempfile::tempdir().unwrap();
    let data: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 11) as u8)
        .collect();
    std::fs::write(dir.path().join("f"), &data).unwrap();
    ok(&kvd, &["put", dir.path().join("f").to_str().unwrap(), "/a"]);
    ok(&kvd, &["put", dir.path().join("f").to_str().unwrap(), "/b"]);
    let out = ok(&kvd, &["stats"]);
    assert!(
        out.contains("files:            2 (0 with several names), 0 directories"),
        "{out}"
    );
    assert!(out.contains("logical bytes:    6000000"), "{out}");
    assert!(out.contains("dedup ratio:      2.00"), "{out}");
    assert!(out.contains("history:          3 commits"), "{out}");
}

/// Three clients committing to one volume as fast as they can, through a real
/// store: every commit of every one lands. A client whose root swap loses
/// merges and tries again at once, pausing only before it reads the new head
/// (a pause after reading it would let the others move the root again while
/// it slept, and a steady stream of commits could starve it).
fn writers_without_pause_all_get_through(server: &Server) {
    use fsclient::store::BlobStore;
    use fsclient::volume::Volume;
    use std::sync::Arc;
    let url = format!("redis://127.0.0.1:{}", server.port);
    let open = || {
        let dict = fsclient::dict::RespDict::open(&url).unwrap();
        Volume::new(BlobStore::new(Arc::new(dict), "race:", 1 << 20), "vol")
    };
    open().create().unwrap();
    let writers: Vec<_> = (0..3)
        .map(|w| {
            let v = open();
            std::thread::spawn(move || {
                for i in 0..60 {
                    let path = fsclient::tree::split_path(&format!("/w{w}-{i}")).unwrap();
                    v.change("race", |s, root| {
                        fsclient::tree::write_file(s, root, &path, &b"x"[..], 0o644, Default::default())
                    })
                    .unwrap_or_else(|e| panic!("writer {w}, commit {i}: {e}"));
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    let v = open();
    let names = fsclient::tree::list(&v.store, v.root().unwrap(), &[]).unwrap();
    assert_eq!(names.len(), 180, "every writer's every file is there");
}

#[test]
fn writers_without_pause_all_get_through_on_kvd() {
    writers_without_pause_all_get_through(&Server::kvd(&[]).unwrap());
}

#[test]
fn writers_without_pause_all_get_through_on_redis_server() {
    require_redis();
    writers_without_pause_all_get_through(&Server::redis(&[]).unwrap());
}

/// A store that refuses writes (redis-server out of memory): `put` fails with
/// the server's own error, and the volume is as it was (the root was not
/// swapped to name blobs that are not there).
#[test]
fn a_store_refusing_writes_fails_the_put_with_its_error() {
    require_redis();
    let server = Server::redis(&["--maxmemory", "2mb", "--maxmemory-policy", "noeviction"]).unwrap();
    ok(&server, &["mkfs"]);
    let dir = tempfile::tempdir().unwrap();
    let big: Vec<u8> = (0..8u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(dir.path().join("big"), &big).unwrap();
    let out = fsclient(
        &server,
        &["put", dir.path().join("big").to_str().unwrap(), "/big"],
    );
    assert!(!out.status.success(), "a put into a full store succeeded");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("OOM"), "the error does not say why: {err}");
    let missing = fsclient(&server, &["stat", "/big"]);
    assert!(
        !missing.status.success(),
        "the failed put left /big in the volume"
    );
}

/// `fsclient man DIR` writes a manual page per subcommand that man(1) can
/// render, and `fsclient completions bash` is a script bash loads that
/// completes the subcommands (both generated from the one clap grammar).
#[test]
fn manual_pages_and_shell_completions_are_generated_from_the_grammar() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(fsclient_bin())
        .arg("man")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for page in [
        "fsclient.1",
        "fsclient-mount.1",
        "fsclient-snapshot-create.1",
        "fsclient-gc.1",
    ] {
        let text = std::fs::read_to_string(dir.path().join(page)).unwrap();
        assert!(text.contains(".TH"), "{page} is not a manual page:\n{text}");
    }
    let mount = std::fs::read_to_string(dir.path().join("fsclient-mount.1")).unwrap();
    assert!(mount.contains("update\\-fstab"), "{mount}");
    if Path::new("/usr/bin/man").exists() {
        let shown = Command::new("man")
            .arg("-l")
            .arg(dir.path().join("fsclient-mount.1"))
            .env("MANPAGER", "cat")
            .env("MANWIDTH", "100")
            .output()
            .unwrap();
        let shown = String::from_utf8_lossy(&shown.stdout);
        assert!(shown.contains("fsclient-mount"), "man -l printed: {shown}");
    }

    let script = Command::new(fsclient_bin())
        .args(["completions", "bash"])
        .output()
        .unwrap();
    assert!(script.status.success());
    let file = dir.path().join("fsclient.bash");
    std::fs::write(&file, &script.stdout).unwrap();
    // What bash offers after `fsclient sn<TAB>` and `fsclient mount --up<TAB>`.
    let complete = |words: &str| -> String {
        let probe = format!(
            "source '{}'; COMP_WORDS=({words}); COMP_CWORD=$((${{#COMP_WORDS[@]}}-1)); COMP_LINE='{words}'; COMP_POINT=${{#COMP_LINE}}; _fsclient fsclient \"${{COMP_WORDS[COMP_CWORD]}}\" \"${{COMP_WORDS[COMP_CWORD-1]}}\"; echo \"${{COMPREPLY[*]}}\"",
            file.display()
        );
        let out = Command::new("bash").args(["-c", &probe]).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(complete("fsclient sn"), "snapshot");
    assert_eq!(complete("fsclient mount --up"), "--update-fstab");
}
