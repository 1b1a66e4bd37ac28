//! Garbage collection on the in-memory dict: what is kept, what goes, and the
//! races the leases and deletion windows exist for.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;

use super::{collect, Options, Policy};
use crate::dict::{Dict, MemoryDict};
use crate::object::{Content, Entry, Hash};
use crate::store::BlobStore;
use crate::tests::{small, Hooked};
use crate::tree::{self, FsError};
use crate::volume::Volume;

const PREFIX: &str = "t:";

/// Keep nothing but heads and snapshots.
fn keep_nothing() -> Options {
    Options {
        policy: Policy {
            within: Duration::ZERO,
            hourly: 0,
            daily: 0,
        },
        window: 7,
        ..Options::default()
    }
}

fn p(path: &str) -> Vec<Vec<u8>> {
    tree::split_path(path).unwrap()
}

fn data(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn volume(dict: Arc<dyn Dict>) -> Volume {
    Volume::new(BlobStore::new(dict, PREFIX, 1 << 20), "vol")
}

fn write(v: &Volume, path: &str, bytes: &[u8]) {
    v.change("write", |s, root| {
        tree::write_file(s, root, &p(path), bytes, 0o644, small())
    })
    .unwrap();
}

fn read_at(v: &Volume, root: Hash, path: &str) -> Result<Vec<u8>, FsError> {
    match tree::lookup(&v.store, root, &p(path))? {
        Some(Entry {
            content: Content::File { manifest, .. },
            ..
        }) => tree::read_to_vec(&v.store, &manifest),
        _ => Err(FsError::NotFound),
    }
}

fn blob_keys(dict: &MemoryDict) -> HashSet<String> {
    dict.keys()
        .into_iter()
        .filter(|k| k.starts_with(&format!("{PREFIX}b:")))
        .collect()
}

/// Every blob a tree needs, found by a plain walk (independent of the collector).
fn reachable(store: &BlobStore, root: Hash, out: &mut HashSet<String>) {
    for part in dir_blobs(store, root) {
        out.insert(store.blob_key(&part));
    }
    for e in store.dir(&root).unwrap().into_values() {
        match e.content {
            Content::Dir { tree } => reachable(store, tree, out),
            Content::File { manifest, .. } => {
                out.insert(store.blob_key(&manifest));
                for (chunk, _) in store.manifest(&manifest).unwrap().chunks {
                    out.insert(store.blob_key(&chunk));
                }
            }
            _ => {}
        }
    }
}

/// A directory's own blobs: itself, and for a split one its index and parts.
fn dir_blobs(store: &BlobStore, root: Hash) -> Vec<Hash> {
    let mut v = store.dir_parts(&root).unwrap();
    v.push(root);
    v
}

/// A volume encrypted with a new key file in `dir`, and its codec's twin.
fn encrypted_volume(dict: Arc<dyn Dict>, dir: &std::path::Path) -> Volume {
    let key = dir.join("key");
    crate::volume_key::keygen(&key).unwrap();
    let source = crate::volume_key::KeySource::File(key);
    let (lock, keys) = crate::volume_key::Lock::create(&source).unwrap();
    let store =
        BlobStore::new(dict, PREFIX, 1 << 20).with_codec(crate::codec::Codec::Encrypted(Box::new(keys)));
    let v = Volume::new(store, "vol");
    v.create_encrypted(small(), Some(&lock)).unwrap();
    v
}

#[test]
fn space_comes_back_and_kept_versions_stay_whole() {
    let dict = Arc::new(MemoryDict::new());
    let v = volume(dict.clone());
    v.create().unwrap();
    space_comes_back(&dict, v);
}

/// The collector reads an encrypted volume's trees with its key, and keeps
/// exactly what it keeps of a plain one.
#[test]
fn an_encrypted_volume_is_collected_like_a_plain_one() {
    let dict = Arc::new(MemoryDict::new());
    let dir = tempfile::tempdir().unwrap();
    space_comes_back(&dict, encrypted_volume(dict.clone(), dir.path()));
}

/// Without the key, the collector cannot see what an encrypted volume
/// references: it deletes nothing.
#[test]
fn an_encrypted_volume_is_not_collected_without_its_key() {
    let dict = Arc::new(MemoryDict::new());
    let dir = tempfile::tempdir().unwrap();
    let v = encrypted_volume(dict.clone(), dir.path());
    write(&v, "/a", &data(1, 5000));
    write(&v, "/a", &data(2, 5000));
    let before = blob_keys(&dict);
    let keyless = BlobStore::new(dict.clone(), PREFIX, 1 << 20);
    match collect(&keyless, &keep_nothing()) {
        Err(super::GcError::NeedsKey(name)) => assert_eq!(name, "vol"),
        other => panic!("collected without the key: {other:?}"),
    }
    assert_eq!(blob_keys(&dict), before);
    assert!(collect(&v.store, &keep_nothing()).unwrap().deleted > 0);
}

fn space_comes_back(dict: &Arc<MemoryDict>, v: Volume) {
    let (a1, b, a2, c) = (data(1, 5000), data(2, 3000), data(3, 4000), data(4, 2000));
    write(&v, "/a", &a1);
    write(&v, "/b", &b);
    crate::history::create_snapshot(&v, "before", None).unwrap();
    write(&v, "/a", &a2);
    v.change("rm", |s, r| tree::unlink(s, r, &p("/b"))).unwrap();
    write(&v, "/c", &c);
    let before = blob_keys(dict).len();

    let r = collect(&v.store, &keep_nothing()).unwrap();
    assert_eq!(r.volumes, 1);
    assert!(r.windows >= 2, "small windows: {r:?}");
    // The head and the snapshot read back; the snapshot still has the old files.
    let head = v.head().unwrap().1.root;
    assert_eq!(read_at(&v, head, "/a").unwrap(), a2);
    assert_eq!(read_at(&v, head, "/c").unwrap(), c);
    let snap = v
        .store
        .commit(&crate::history::resolve(&v, "before").unwrap())
        .unwrap()
        .root;
    assert_eq!(read_at(&v, snap, "/a").unwrap(), a1);
    assert_eq!(read_at(&v, snap, "/b").unwrap(), b);
    // What is left is exactly what the head, the snapshot and the history's
    // commit records need.
    let mut expected = HashSet::new();
    reachable(&v.store, head, &mut expected);
    reachable(&v.store, snap, &mut expected);
    for (h, _) in v.log(usize::MAX).unwrap() {
        expected.insert(v.store.blob_key(&h));
    }
    assert_eq!(blob_keys(dict), expected);
    assert_eq!(r.deleted as usize, before - expected.len());
    assert!(r.deleted > 0 && r.bytes_freed > 0);
    // The whole history can still be listed.
    assert_eq!(v.log(usize::MAX).unwrap().len(), 6);

    // Without the snapshot, its files go too.
    crate::history::delete_snapshot(&v, "before").unwrap();
    let r = collect(&v.store, &keep_nothing()).unwrap();
    assert!(r.deleted > 0);
    let mut expected = HashSet::new();
    reachable(&v.store, head, &mut expected);
    for (h, _) in v.log(usize::MAX).unwrap() {
        expected.insert(v.store.blob_key(&h));
    }
    assert_eq!(blob_keys(dict), expected);
    assert!(crate::history::fsck(&v.store, v.head().unwrap().1.tree())
        .damaged
        .is_empty());
}

#[test]
fn a_dry_run_deletes_nothing_and_says_what_would_go() {
    let dict = Arc::new(MemoryDict::new());
    let v = volume(dict.clone());
    v.create().unwrap();
    write(&v, "/a", &data(1, 5000));
    v.change("rm", |s, r| tree::unlink(s, r, &p("/a"))).unwrap();
    let keys = blob_keys(&dict);
    let dry = collect(
        &v.store,
        &Options {
            dry_run: true,
            ..keep_nothing()
        },
    )
    .unwrap();
    assert_eq!(blob_keys(&dict), keys);
    assert!(dry.deleted > 0);
    let real = collect(&v.store, &keep_nothing()).unwrap();
    assert_eq!((real.deleted, real.bytes_freed), (dry.deleted, dry.bytes_freed));
}

#[test]
fn the_default_policy_keeps_recent_history() {
    let dict = Arc::new(MemoryDict::new());
    let v = volume(dict.clone());
    v.create().unwrap();
    let old = data(1, 5000);
    write(&v, "/a", &old);
    write(&v, "/a", &data(2, 5000));
    let r = collect(&v.store, &Options::default()).unwrap();
    assert_eq!((r.pruned_commits, r.deleted), (0, 0));
    let previous = v.log(2).unwrap()[1].1.root;
    assert_eq!(read_at(&v, previous, "/a").unwrap(), old);
}

#[test]
fn a_second_collector_is_refused_while_one_runs() {
    let dict = Arc::new(MemoryDict::new());
    let v = volume(dict.clone());
    v.create().unwrap();
    let lock = format!("{PREFIX}{{gc}}:lock");
    dict.put_expiring(&lock, b"someone", Duration::from_secs(60), true)
        .unwrap();
    assert!(matches!(
        collect(&v.store, &keep_nothing()),
        Err(super::GcError::Busy(_))
    ));
    dict.delete(&lock).unwrap();
    collect(&v.store, &keep_nothing()).unwrap();
}

/// A writer stores a file whose chunks are garbage in the store (a deleted
/// file had the same bytes: dedup finds them present and uploads nothing),
/// after the collector marked but before it deletes, and commits afterwards.
/// With its lease the file survives; with the lease taken away, the same
/// interleaving loses it — the lease is what carries the guarantee.
///
/// `committed_before`: the writer has committed already, the last time with
/// nothing to swap, so every lease it took was released and its lease key
/// holds the empty mark.
fn revive_during_collection(drop_lease: bool, committed_before: bool) -> Result<Vec<u8>, FsError> {
    let inner = Arc::new(MemoryDict::new());
    let setup = volume(inner.clone());
    setup.create().unwrap();
    let bytes = data(7, 6000);
    write(&setup, "/x", &bytes);
    setup.change("rm", |s, r| tree::unlink(s, r, &p("/x"))).unwrap();

    let writer = volume(inner.clone());
    if committed_before {
        write(&writer, "/y", &data(8, 100));
        // A commit that changes nothing (as a mount's can) releases all.
        writer.change("nothing", |_, root| Ok(root)).unwrap();
    }
    let entry: Arc<Mutex<Option<Entry>>> = Default::default();
    let hooked = Arc::new(Hooked::new(inner.clone()));
    {
        let (writer_store, entry, inner) = (writer.store.clone(), entry.clone(), inner.clone());
        *hooked.before_incr.lock() = Some(Box::new(move || {
            let e = tree::file_entry(&writer_store, &bytes[..], 0o644, small()).unwrap();
            // Leased and stored (the uploader's round) before the window opens.
            writer_store.flush_writes().unwrap();
            *entry.lock() = Some(e);
            if drop_lease {
                for k in inner.keys().into_iter().filter(|k| k.contains("{gc}:lease:")) {
                    inner.delete(&k).unwrap();
                }
            }
        }));
    }
    let collector = BlobStore::new(hooked.clone(), PREFIX, 1 << 20);
    let r = collect(&collector, &keep_nothing()).unwrap();
    assert!(r.deleted > 0, "the deleted file's blobs were garbage: {r:?}");
    let e = entry.lock().clone().expect("the hook ran");
    writer
        .change("late commit", |s, r| {
            tree::update(s, r, &p("/x"), &mut |_| Ok(Some(e.clone())))
        })
        .unwrap();
    // Read by another client: what the store holds, not the writer's cache.
    let reader = volume(inner.clone());
    read_at(&reader, reader.head().unwrap().1.root, "/x")
}

#[test]
fn a_lease_taken_before_a_deletion_window_saves_a_revived_blob() {
    assert_eq!(revive_during_collection(false, false).unwrap(), data(7, 6000));
    assert!(
        revive_during_collection(true, false).is_err(),
        "without the lease the revived file must be lost, or this test shows nothing"
    );
}

/// A regression: a commit that released every lease left the key holding
/// the one-byte empty mark, the next leases were appended after it, and the
/// collector read them one byte out of step (as hashes that name nothing):
/// a file written after a client's first commit was unprotected.
#[test]
fn a_lease_taken_after_a_client_released_all_its_leases_still_protects() {
    assert_eq!(revive_during_collection(false, true).unwrap(), data(7, 6000));
}

/// A regression: a client names its lease key in the registry before its
/// first lease; a collection that tidied the registry in between found the
/// key absent and dropped the name, and no later collection read that
/// client's leases (it names itself again only after an hour).
#[test]
fn a_collection_between_a_clients_registration_and_first_lease_keeps_it_listed() {
    let inner = Arc::new(MemoryDict::new());
    volume(inner.clone()).create().unwrap();
    let collector = BlobStore::new(inner.clone(), PREFIX, 1 << 20);
    let hooked = Arc::new(Hooked::new(inner.clone()));
    {
        let collector = collector.clone();
        *hooked.before_lease.lock() = Some(Box::new(move || {
            collect(&collector, &keep_nothing()).unwrap();
        }));
    }
    let writer = volume(hooked.clone());
    // Uploaded and not yet committed: its lease is all that keeps it.
    let h = writer
        .store
        .put(Bytes::from_static(b"\x01\x01uploaded, not yet committed"))
        .unwrap();
    writer.store.flush_writes().unwrap();
    assert!(hooked.before_lease.lock().is_none(), "the collection ran");
    collect(&collector, &keep_nothing()).unwrap();
    assert!(
        inner.contains(&writer.store.blob_key(&h)).unwrap(),
        "a leased upload was collected"
    );
}

#[test]
fn writers_wait_while_a_deletion_window_is_open() {
    let dict = Arc::new(MemoryDict::new());
    let v = volume(dict.clone());
    v.create().unwrap();
    let epoch = format!("{PREFIX}{{gc}}:epoch");
    assert_eq!(dict.incr(&epoch).unwrap() % 2, 1);
    let (tx, rx) = std::sync::mpsc::channel();
    let store = v.store.clone();
    let late = Bytes::from_static(b"\x01\x01late");
    let late_key = v.store.blob_key(&crate::object::Hash::of(&late));
    std::thread::spawn(move || {
        // Handed over at once; leased and stored by the uploader, which
        // waits for the window like any writer.
        let r = store.put(late).and_then(|_| store.flush_writes());
        tx.send(r.is_ok()).unwrap();
    });
    assert!(
        rx.recv_timeout(Duration::from_millis(300)).is_err(),
        "a writer leased while a window was open"
    );
    assert!(!dict.contains(&late_key).unwrap(), "a blob was stored unleased");
    dict.incr(&epoch).unwrap();
    assert!(rx.recv_timeout(Duration::from_secs(10)).unwrap());
    assert!(dict.contains(&late_key).unwrap());
}

#[test]
fn a_window_left_open_by_a_dead_collector_is_closed_by_a_writer() {
    let dict = Arc::new(MemoryDict::new());
    let v = volume(dict.clone());
    v.create().unwrap();
    let epoch = format!("{PREFIX}{{gc}}:epoch");
    dict.incr(&epoch).unwrap(); // odd, and no lock: its collector is gone
    v.store.put(Bytes::from_static(b"\x01\x01x")).unwrap();
    v.store.flush_writes().unwrap();
    assert_eq!(dict.get(&epoch).unwrap().unwrap(), "2");
}

/// Two writers commit files continuously for five seconds (reusing a few contents, so deleted
/// files' chunks come back through dedup) and delete some, while collections
/// with small windows run back to back. Every file a writer was told is
/// committed, and did not delete, reads back intact.
#[test]
fn collections_racing_writers_never_lose_a_committed_file() {
    let dict = Arc::new(MemoryDict::new());
    volume(dict.clone()).create().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let collector = {
        let (dict, stop) = (dict.clone(), stop.clone());
        std::thread::spawn(move || {
            let store = BlobStore::new(dict, PREFIX, 1 << 20);
            let (mut runs, mut deleted) = (0, 0);
            while !stop.load(Ordering::SeqCst) {
                // Versions go after two seconds: long after any writer here
                // last read them, so a writer never finds its base gone.
                let mut opts = Options {
                    window: 3,
                    ..keep_nothing()
                };
                opts.policy.within = Duration::from_secs(2);
                match collect(&store, &opts) {
                    Ok(r) => {
                        runs += 1;
                        deleted += r.deleted;
                    }
                    Err(e) => panic!("collection failed: {e}"),
                }
            }
            (runs, deleted)
        })
    };
    let writers: Vec<_> = (0..2u64)
        .map(|w| {
            let dict = dict.clone();
            std::thread::spawn(move || {
                let v = volume(dict);
                let mut live: BTreeMap<String, Vec<u8>> = BTreeMap::new();
                let until = std::time::Instant::now() + Duration::from_secs(5);
                let mut i = 0u64;
                while std::time::Instant::now() < until {
                    i += 1;
                    // At the pace of a busy client, not of a loop on memory
                    // (two writers with no pause at all starve each other's
                    // root swaps, with or without a collector).
                    std::thread::sleep(Duration::from_millis(15));
                    let path = format!("/w{w}-{}", i % 9);
                    let bytes = data(i % 4, 1500 + (i % 3) as usize * 700);
                    write(&v, &path, &bytes);
                    live.insert(path, bytes);
                    if i % 5 == 4 {
                        let gone = format!("/w{w}-{}", (i + 3) % 9);
                        if live.remove(&gone).is_some() {
                            v.change("rm", |s, r| tree::unlink(s, r, &p(&gone))).unwrap();
                        }
                    }
                }
                (v, live)
            })
        })
        .collect();
    let results: Vec<_> = writers.into_iter().map(|w| w.join().unwrap()).collect();
    stop.store(true, Ordering::SeqCst);
    let (runs, deleted) = collector.join().unwrap();
    assert!(
        runs >= 2 && deleted > 0,
        "the collector must have raced: {runs} runs, {deleted} deleted"
    );
    for (v, live) in &results {
        let head = v.head().unwrap().1;
        for (path, bytes) in live {
            assert_eq!(&read_at(v, head.root, path).unwrap(), bytes, "{path}");
        }
        assert!(crate::history::fsck(&v.store, head.tree()).damaged.is_empty());
    }
}
