//! Encrypted volumes end to end (`fsclient mkfs --encrypt`), on real stores:
//! kvd, redis-server and a kvd cluster, through the CLI and a FUSE mount.
//! What lands in the store's own files is checked byte by byte: no file name,
//! no marker and no 16-byte window of a secret file may appear there, while
//! the same files in a plain volume of the same store are found by the same
//! scan (so the scan would see them).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Output;

use protocol_tests::{
    fsclient_at, fsclient_ok as ok, require_redis, same_trees, Conn, Mount, Replicated, Server,
};
use rand::{Rng, SeedableRng};

const NAME_MARKER: &str = "NameMarker-5c1f9e";
const CONTENT_MARKER: &[u8] = b"ContentMarker-a83d27";
const SNAPSHOT_MARKER: &str = "SnapshotMarker-e07b";

fn run(url: &str, args: &[&str]) -> Output {
    fsclient_at(url, args)
}

fn fails(url: &str, args: &[&str]) -> String {
    let out = run(url, args);
    assert!(!out.status.success(), "fsclient {args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn random(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..len).map(|_| rng.gen()).collect()
}

/// Every 16-byte window of some secret bytes, found in a scan of files.
struct Windows {
    set: HashSet<[u8; 16]>,
    /// A bit per 3-byte start of a window (a quick no for most positions).
    first: Vec<u64>,
}

fn start(win: &[u8]) -> usize {
    (win[0] as usize) << 16 | (win[1] as usize) << 8 | win[2] as usize
}

impl Windows {
    fn of(secrets: &[&[u8]]) -> Windows {
        let mut w = Windows {
            set: HashSet::new(),
            first: vec![0; (1 << 24) / 64],
        };
        for s in secrets {
            for win in s.windows(16) {
                w.first[start(win) / 64] |= 1 << (start(win) % 64);
                w.set.insert(win.try_into().unwrap());
            }
        }
        w
    }

    /// The first file under `root` holding a window, and where.
    fn find_under(&self, root: &Path) -> Option<(PathBuf, usize)> {
        let mut todo = vec![root.to_path_buf()];
        while let Some(p) = todo.pop() {
            let Ok(meta) = std::fs::symlink_metadata(&p) else {
                continue;
            };
            if meta.is_dir() {
                for e in std::fs::read_dir(&p).unwrap().flatten() {
                    todo.push(e.path());
                }
            } else if meta.is_file() {
                let Ok(bytes) = std::fs::read(&p) else { continue };
                if let Some(at) = bytes.windows(16).position(|win| {
                    self.first[start(win) / 64] & (1 << (start(win) % 64)) != 0 && self.set.contains(win)
                }) {
                    return Some((p, at));
                }
            }
        }
        None
    }
}

/// A store under test: where fsclient reaches it, a connection to count its
/// blobs, and the directory its server keeps its data in.
struct Target<'a> {
    url: String,
    conn: Box<dyn Fn() -> Conn + 'a>,
    data: PathBuf,
}

impl<'a> Target<'a> {
    /// A single server.
    fn of(server: &'a Server) -> Target<'a> {
        Target {
            url: format!("redis://127.0.0.1:{}", server.port),
            conn: Box::new(move || server.connect().unwrap()),
            data: server.data.clone(),
        }
    }

    /// Each blob key with its size.
    fn blobs(&self) -> Vec<(String, i64)> {
        let mut conn = (self.conn)();
        let keys = conn.call(&["KEYS", "dfs:b:*"]).unwrap().text();
        keys.split_whitespace()
            .map(|k| {
                let size = conn.call(&["STRLEN", k]).unwrap().as_int().unwrap();
                (k.to_string(), size)
            })
            .collect()
    }

    fn root(&self, volume: &str) -> String {
        (self.conn)()
            .call(&["GET", &format!("dfs:v:{volume}:root")])
            .unwrap()
            .text()
    }
}

/// A local tree with both markers: a file named with the name marker holding
/// the content marker and a secret, and a file of several chunks.
fn local_tree(dir: &Path, secret: &[u8], big: &[u8]) {
    let mut content = CONTENT_MARKER.to_vec();
    content.extend_from_slice(secret);
    std::fs::create_dir_all(dir.join("docs")).unwrap();
    std::fs::write(dir.join(format!("docs/{NAME_MARKER}.txt")), content).unwrap();
    std::fs::write(dir.join("big.bin"), big).unwrap();
}

/// The whole check on one store.
fn hides_names_and_contents(t: &Target) {
    let url = t.url.as_str();
    let keys = tempfile::tempdir().unwrap();
    let key = keys.path().join("key");
    let wrong = keys.path().join("wrong");
    let (key_s, wrong_s) = (key.to_str().unwrap(), wrong.to_str().unwrap());
    ok(url, &["keygen", key_s]);
    ok(url, &["keygen", wrong_s]);
    let enc = |args: &[&str]| -> Vec<String> {
        let mut v = vec!["--key-file".to_string(), key_s.to_string()];
        v.extend(args.iter().map(|s| s.to_string()));
        v
    };
    let call = |args: Vec<String>| ok(url, &args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(call(enc(&["mkfs", "--encrypt"])).contains("encrypted volume"));

    let secret = random(64 << 10, 1);
    let big = random(5 << 20, 2);
    let src = tempfile::tempdir().unwrap();
    local_tree(src.path(), &secret, &big);
    call(enc(&["put", src.path().to_str().unwrap(), "/d"]));

    // Read back with the key.
    let out = tempfile::tempdir().unwrap();
    call(enc(&["get", "/d", out.path().join("d").to_str().unwrap()]));
    same_trees(src.path(), &out.path().join("d"));
    let listed = call(enc(&["ls", "/d/docs"]));
    assert!(listed.contains(NAME_MARKER), "{listed}");

    // Snapshot names are the user's words too.
    call(enc(&["snapshot", "create", SNAPSHOT_MARKER]));
    assert!(call(enc(&["snapshot", "list"])).contains(SNAPSHOT_MARKER));
    call(enc(&["snapshot", "create", "second"]));
    let listed = call(enc(&["snapshot", "list"]));
    assert!(
        listed.contains(SNAPSHOT_MARKER) && listed.contains("second"),
        "{listed}"
    );

    // Without the key, or with another: a clear error, and nothing changed.
    let root = t.root("main");
    let e = fails(url, &["ls", "/d"]);
    assert!(e.contains("volume 'main' is encrypted"), "{e}");
    let e = fails(
        url,
        &["--key-file", wrong_s, "put", src.path().to_str().unwrap(), "/e"],
    );
    assert!(e.contains("wrong key for encrypted volume 'main'"), "{e}");
    let e = fails(url, &["--key-file", wrong_s, "mount", "/nonexistent-mountpoint"]);
    assert!(e.contains("wrong key"), "{e}");
    assert_eq!(t.root("main"), root, "a refused client changed the volume");

    // The same file again stores no chunk again: only the directories, the
    // commit (and nothing the size of a chunk).
    let before: HashSet<String> = t.blobs().into_iter().map(|(k, _)| k).collect();
    let copy = src.path().join("big.bin");
    call(enc(&["put", copy.to_str().unwrap(), "/again.bin"]));
    let new: Vec<(String, i64)> = t
        .blobs()
        .into_iter()
        .filter(|(k, _)| !before.contains(k))
        .collect();
    assert!(
        new.len() <= 3 && new.iter().all(|(_, size)| *size < 4096),
        "a second copy stored {new:?}"
    );

    // Nothing readable in the server's files ...
    let windows = Windows::of(&[
        &secret,
        NAME_MARKER.as_bytes(),
        CONTENT_MARKER,
        SNAPSHOT_MARKER.as_bytes(),
        &big[1 << 20..(1 << 20) + 4096],
    ]);
    if let Some((file, at)) = windows.find_under(&t.data) {
        panic!("plain text of the encrypted volume in {} at {at}", file.display());
    }
    // fsck: with the key, the whole tree; without it, every blob against its
    // name, and a damaged one named by its key.
    assert!(call(enc(&["fsck"])).contains(", 0 damaged paths"));
    let out = ok(url, &["fsck", "--blobs"]);
    assert!(out.contains(", 0 damaged"), "{out}");
    let (victim, _) = t.blobs().into_iter().max_by_key(|(_, size)| *size).unwrap();
    (t.conn)().call(&["SET", &victim, "damaged"]).unwrap();
    let out = run(url, &["fsck", "--blobs"]);
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("damaged: {victim}:")), "{text}");
    // (The largest blob is a chunk of big.bin: the key names a path now.)
    let out = run(
        url,
        &enc(&["fsck"]).iter().map(String::as_str).collect::<Vec<_>>(),
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("damaged: /"));

    // ... while a plain volume's files are found by the same scan.
    ok(url, &["--volume", "plain", "mkfs"]);
    ok(
        url,
        &["--volume", "plain", "put", src.path().to_str().unwrap(), "/d"],
    );
    let found = Windows::of(&[NAME_MARKER.as_bytes()]).find_under(&t.data);
    assert!(found.is_some(), "the scan finds a plain volume's names");
    assert!(Windows::of(&[&secret]).find_under(&t.data).is_some());
}

#[test]
fn an_encrypted_volume_on_kvd_hides_names_and_contents() {
    let kvd = Server::kvd(&[]).unwrap();
    hides_names_and_contents(&Target::of(&kvd));
}

#[test]
fn an_encrypted_volume_on_redis_server_hides_names_and_contents() {
    require_redis();
    let redis = Server::redis(&["--appendonly", "yes"]).unwrap();
    hides_names_and_contents(&Target::of(&redis));
}

#[test]
fn an_encrypted_volume_on_a_kvd_cluster_hides_names_and_contents() {
    // Three nodes, every key on each: one node's KEYS counts every blob.
    let cluster = Replicated::start(3, 3);
    hides_names_and_contents(&Target {
        url: format!("redis://127.0.0.1:{}", cluster.ports[1]),
        conn: Box::new(|| cluster.conn(0)),
        data: cluster.data_root().to_path_buf(),
    });
}

/// A partial update of a large encrypted file stores only the chunks around
/// the change (content-defined chunks survive encryption: each chunk's
/// ciphertext depends only on its own bytes).
#[test]
fn an_insert_in_a_large_encrypted_file_stores_little() {
    let kvd = Server::kvd(&[]).unwrap();
    let url = format!("redis://127.0.0.1:{}", kvd.port);
    let t = Target::of(&kvd);
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    let key_s = key.to_str().unwrap();
    ok(&url, &["keygen", key_s]);
    ok(&url, &["--key-file", key_s, "mkfs", "--encrypt"]);
    let mut data = random(64 << 20, 3);
    std::fs::write(dir.path().join("v1"), &data).unwrap();
    ok(
        &url,
        &[
            "--key-file",
            key_s,
            "put",
            dir.path().join("v1").to_str().unwrap(),
            "/f",
        ],
    );
    let before: HashSet<String> = t.blobs().into_iter().map(|(k, _)| k).collect();
    let insert = random(1024, 4);
    data.splice(32 << 20..32 << 20, insert);
    std::fs::write(dir.path().join("v2"), &data).unwrap();
    ok(
        &url,
        &[
            "--key-file",
            key_s,
            "put",
            dir.path().join("v2").to_str().unwrap(),
            "/f",
        ],
    );
    let new_bytes: i64 = t
        .blobs()
        .into_iter()
        .filter(|(k, _)| !before.contains(k))
        .map(|(_, s)| s)
        .sum();
    assert!(new_bytes <= 8 << 20, "1 KiB inserted stored {new_bytes} bytes");
    let back = tempfile::tempdir().unwrap();
    let out = back.path().join("f");
    ok(&url, &["--key-file", key_s, "get", "/f", out.to_str().unwrap()]);
    assert!(std::fs::read(&out).unwrap() == data);
}

/// Through a FUSE mount: files written in the mount are stored encrypted,
/// read back through another client with the key, and a second mount with a
/// wrong key is refused before mounting.
#[test]
fn a_mounted_encrypted_volume_writes_only_ciphertext() {
    let kvd = Server::kvd(&[]).unwrap();
    let url = format!("redis://127.0.0.1:{}", kvd.port);
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    let key_s = key.to_str().unwrap();
    ok(&url, &["keygen", key_s]);
    ok(&url, &["--key-file", key_s, "mkfs", "--encrypt"]);
    let secret = random(256 << 10, 5);
    {
        let m = Mount::start(&url, "main", &["--key-file", key_s]).unwrap();
        let mut content = CONTENT_MARKER.to_vec();
        content.extend_from_slice(&secret);
        let path = m.dir.path().join(format!("{NAME_MARKER}.bin"));
        std::fs::write(&path, &content).unwrap();
        std::fs::File::open(&path).unwrap().sync_all().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), content);
    }
    let listed = ok(&url, &["--key-file", key_s, "ls", "/"]);
    assert!(listed.contains(NAME_MARKER), "{listed}");
    let cat = run(
        &url,
        &["--key-file", key_s, "cat", &format!("/{NAME_MARKER}.bin")],
    );
    assert!(cat.status.success());
    assert_eq!(&cat.stdout[CONTENT_MARKER.len()..], &secret[..]);
    let windows = Windows::of(&[&secret, NAME_MARKER.as_bytes(), CONTENT_MARKER]);
    if let Some((file, at)) = windows.find_under(&kvd.data) {
        panic!(
            "plain text of the mounted encrypted volume in {} at {at}",
            file.display()
        );
    }
}
