//! Tests of the live view on the in-memory dict: file bytes against a model,
//! re-chunking against a fresh chunking, namespace operations, two clients.

use std::sync::Arc;

use proptest::prelude::*;

use super::file::FileData;
use super::*;
use crate::dict::MemoryDict;
use crate::object::Manifest;
use crate::tests::{small, Hooked};

fn store() -> BlobStore {
    BlobStore::new(Arc::new(MemoryDict::new()), "t:", 1 << 22)
}

fn opts() -> Options {
    Options {
        chunking: small(),
        spill_bytes: 4096,
        readahead_threads: 1,
        ..Default::default()
    }
}

fn vfs_on(dict: &Arc<MemoryDict>, create: bool) -> Vfs {
    let v = Volume::new(BlobStore::new(dict.clone(), "t:", 1 << 22), "vol");
    if create {
        v.create().unwrap();
    }
    Vfs::new(v, opts()).unwrap()
}

/// A view of a new volume whose store runs through a [`Hooked`] dict (for
/// tests of races), with the plain dict under it for other views.
fn hooked_vfs(opts: Options) -> (Arc<MemoryDict>, Arc<Hooked>, Vfs) {
    let dict = Arc::new(MemoryDict::new());
    let hooked = Arc::new(Hooked::new(dict.clone()));
    let volume = Volume::new(BlobStore::new(hooked.clone(), "t:", 1 << 22), "vol");
    volume.create().unwrap();
    (dict, hooked, Vfs::new(volume, opts).unwrap())
}

const ME: Caller = Caller { uid: 1000, gid: 1000 };

/// A directory's listing (with `.` and `..`), by name.
fn listing(vfs: &Vfs, dir: Ino) -> Vec<Vec<u8>> {
    let fh = vfs.opendir(dir).unwrap();
    let names = vfs
        .readdir(fh, 0)
        .unwrap()
        .iter()
        .map(|e| e.name.clone())
        .collect();
    vfs.releasedir(fh);
    names
}

#[derive(Clone, Debug)]
enum FileOp {
    Write(u64, Vec<u8>),
    Truncate(u64),
    Materialize,
    Spill,
    SpillBehind,
    Snapshot,
}

fn file_op() -> impl Strategy<Value = FileOp> {
    prop_oneof![
        4 => (0u64..6000, proptest::collection::vec(any::<u8>(), 1..700)).prop_map(|(o, d)| FileOp::Write(o, d)),
        1 => (0u64..6000).prop_map(FileOp::Truncate),
        1 => Just(FileOp::Materialize),
        1 => Just(FileOp::Spill),
        1 => Just(FileOp::SpillBehind),
        1 => Just(FileOp::Snapshot),
    ]
}

fn read_all(f: &FileData, store: &BlobStore) -> Vec<u8> {
    f.view(0, u64::MAX / 2).read(store).unwrap().bytes.to_vec()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    /// Writes, truncations and stores of a file agree with a byte vector, and
    /// every stored manifest is exactly what chunking the whole content afresh
    /// gives (re-chunking only around changes must not change the result).
    #[test]
    fn file_bytes_match_a_model(
        initial in proptest::collection::vec(any::<u8>(), 0..5000),
        ops in proptest::collection::vec(file_op(), 1..30),
    ) {
        let store = store();
        let (h, size) = tree::store_data(&store, &initial[..], small()).unwrap();
        prop_assert_eq!(size, initial.len() as u64);
        let mut f = FileData::new(h, &store.manifest(&h).unwrap());
        let mut model = initial.clone();
        for op in ops {
            match op {
                FileOp::Write(o, d) => {
                    let end = o as usize + d.len();
                    if model.len() < end {
                        model.resize(end, 0);
                    }
                    model[o as usize..end].copy_from_slice(&d);
                    f.write(o, &d);
                }
                FileOp::Truncate(n) => {
                    model.resize(n as usize, 0);
                    f.truncate(n);
                }
                FileOp::Materialize => {
                    f.materialize(&store, small()).unwrap();
                    let (fresh, _) = tree::store_data(&store, &model[..], small()).unwrap();
                    prop_assert_eq!(f.manifest, fresh, "re-chunked manifest differs from a fresh chunking");
                }
                FileOp::Spill => f.spill(&store, small()).unwrap(),
                // The job runs while the next operations do.
                FileOp::SpillBehind => f.spill_behind(&store, small()).unwrap(),
                FileOp::Snapshot => {
                    let file = Mutex::new(f);
                    FileData::store_snapshot(&file, &store, small()).unwrap();
                    f = file.into_inner();
                    let (manifest, size) = f.committable().expect("stored");
                    prop_assert_eq!(size, model.len() as u64);
                    let (fresh, _) = tree::store_data(&store, &model[..], small()).unwrap();
                    prop_assert_eq!(manifest, fresh, "snapshot differs from a fresh chunking");
                    prop_assert!(!f.changed);
                }
            }
            prop_assert_eq!(f.size, model.len() as u64);
            prop_assert_eq!(&read_all(&f, &store), &model);
        }
        f.materialize(&store, small()).unwrap();
        prop_assert_eq!(tree::read_to_vec(&store, &f.manifest).unwrap(), model);
    }
}

/// A background spill holds bytes the file is still being written and read
/// through: writes landing over them while it runs, and more appended after
/// them, must win over and follow what it stores, and the file must be cut
/// exactly as a fresh chunking of the final content.
#[test]
fn writes_and_reads_during_a_background_spill_see_the_newest_bytes() {
    let hooked = Arc::new(Hooked::new(Arc::new(MemoryDict::new())));
    let store = BlobStore::new(hooked.clone(), "t:", 1 << 22);
    let bytes = |n: usize, seed: u32| -> Vec<u8> {
        (0..n as u32)
            .map(|i| (i.wrapping_add(seed).wrapping_mul(2654435761) >> 11) as u8)
            .collect()
    };
    let mut f = FileData::empty(store.empty_manifest_name());
    let mut model = Vec::new();
    let append = |f: &mut FileData, model: &mut Vec<u8>, data: &[u8]| {
        f.write(model.len() as u64, data);
        model.extend_from_slice(data);
    };
    for round in 0..4u32 {
        append(&mut f, &mut model, &bytes(20_000, round));
        // (The last round's job is done before its hook is armed again.)
        f.settle();
        // The spill's job stops before storing anything until released.
        let (release, wait) = std::sync::mpsc::channel::<()>();
        let (entered, started) = std::sync::mpsc::channel::<()>();
        *hooked.before_lease.lock() = Some(Box::new(move || {
            entered.send(()).unwrap();
            wait.recv().unwrap();
        }));
        f.spill_behind(&store, small()).unwrap();
        started.recv().unwrap();
        // Over the held bytes (the start, the middle, and across their end
        // or just past it, leaving a hole) and after them.
        let len = model.len();
        let last = if round % 2 == 0 { len - 50 } else { len + 10 };
        for (at, n) in [(len - 20_000, 100), (len - 9_000, 3_000), (last, 700)] {
            let d = bytes(n, round + 100);
            f.write(at as u64, &d);
            if model.len() < at + n {
                model.resize(at + n, 0);
            }
            model[at..at + n].copy_from_slice(&d);
        }
        append(&mut f, &mut model, &bytes(5_000, round + 200));
        assert!(read_all(&f, &store) == model, "read while the spill runs");
        release.send(()).unwrap();
        // The next write takes in the finished spill, whenever it finishes.
        append(&mut f, &mut model, &bytes(1_000, round + 300));
        assert!(read_all(&f, &store) == model, "read after the spill");
    }
    f.materialize(&store, small()).unwrap();
    let (fresh, _) = tree::store_data(&store, &model[..], small()).unwrap();
    assert_eq!(f.manifest, fresh, "cut as a fresh chunking of the content");
    assert!(tree::read_to_vec(&store, &f.manifest).unwrap() == model);
}

/// A file given its size first and committed (its unwritten part stored as
/// zero chunks), then written from the start: each spill stores only what was
/// written, not the whole file, and the result is cut like its content.
#[test]
fn spills_of_a_presized_committed_file_store_only_the_written_part() {
    let store = store();
    let size = 40_000u64;
    let mut f = FileData::empty(store.empty_manifest_name());
    f.truncate(size);
    f.materialize(&store, small()).unwrap();
    let mut model = vec![0u8; size as usize];
    let data: Vec<u8> = (0..4000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 9) as u8)
        .collect();
    for at in (0..20_000usize).step_by(data.len()) {
        f.write(at as u64, &data);
        model[at..at + data.len()].copy_from_slice(&data);
        f.spill_behind(&store, small()).unwrap();
        f.settle();
        assert!(
            f.stored_len() <= (at + data.len()) as u64,
            "stored {} of {size} bytes after writing {}",
            f.stored_len(),
            at + data.len()
        );
        assert!(read_all(&f, &store) == model);
    }
    assert!(f.stored_len() > 10_000, "the spills stored what was written");
    f.materialize(&store, small()).unwrap();
    let (fresh, _) = tree::store_data(&store, &model[..], small()).unwrap();
    assert_eq!(f.manifest, fresh);
}

/// Read-ahead is for sequential readers: reads that jump about fetch only the
/// chunks they read, and a reader going on from where it stopped gets the
/// next chunks fetched ahead of it.
#[test]
fn only_sequential_reads_fetch_ahead() {
    use std::sync::atomic::Ordering::SeqCst;
    let inner = Arc::new(MemoryDict::new());
    let writer = vfs_on(&inner, true);
    let data: Vec<u8> = (0..40_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 9) as u8)
        .collect();
    let (_, fh) = writer.create(ME, ROOT, b"f", 0o644, libc::O_WRONLY).unwrap();
    writer.write(fh, 0, &data).unwrap();
    writer.flush(fh).unwrap();
    let hooked = Arc::new(Hooked::new(inner.clone()));
    let reader = Vfs::new(
        Volume::new(BlobStore::new(hooked.clone(), "t:", 1 << 22), "vol"),
        opts(),
    )
    .unwrap();
    let f = reader.lookup(ROOT, b"f").unwrap();
    let fh = reader.open(f.ino, libc::O_RDONLY).unwrap();
    let before = hooked.gets.load(SeqCst);
    // Far apart (more than the slack), none near where a read ended.
    for at in [30_000u64, 2_000, 16_000] {
        // One byte: one chunk.
        assert_eq!(
            reader.read(f.ino, at, 1).unwrap().to_vec(),
            &data[at as usize..at as usize + 1]
        );
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(
        hooked.gets.load(SeqCst) - before,
        3,
        "random reads fetched more than their chunks"
    );
    // Going on from where the last read ended: the chunks after are fetched.
    let before = hooked.gets.load(SeqCst);
    reader.read(f.ino, 16_001, 100).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while hooked.gets.load(SeqCst) - before < 2 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(
        hooked.gets.load(SeqCst) - before >= 2,
        "a sequential read fetched nothing ahead"
    );
    reader.release(fh);
}

#[test]
fn a_middle_edit_of_a_large_file_stores_only_nearby_chunks() {
    let store = store();
    let data: Vec<u8> = (0..200_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let (h, _) = tree::store_data(&store, &data[..], small()).unwrap();
    let before = store.manifest(&h).unwrap();
    let mut f = FileData::new(h, &before);
    f.write(100_000, b"an edit in the middle");
    f.materialize(&store, small()).unwrap();
    let after: Manifest = store.manifest(&f.manifest).unwrap();
    let old: std::collections::HashSet<_> = before.chunks.iter().collect();
    let new_chunks = after.chunks.iter().filter(|c| !old.contains(c)).count();
    assert!(new_chunks <= 3, "{new_chunks} new chunks for a 21-byte edit");
    assert!(before.chunks.len() > 100);
}

#[test]
fn namespace_operations_and_their_errors() {
    let dict = Arc::new(MemoryDict::new());
    let vfs = vfs_on(&dict, true);
    let d = vfs.mkdir(ME, ROOT, b"d", 0o755).unwrap();
    assert_eq!(d.kind, Kind::Dir);
    assert_eq!((d.uid, d.gid, d.perm), (1000, 1000, 0o755));
    assert!(matches!(vfs.mkdir(ME, ROOT, b"d", 0o755), Err(FsError::Exists)));
    assert!(matches!(vfs.lookup(ROOT, b"nope"), Err(FsError::NotFound)));
    assert!(matches!(
        vfs.lookup(ROOT, &[b'x'; 256]),
        Err(FsError::NameTooLong)
    ));
    let (f, fh) = vfs.create(ME, d.ino, b"f", 0o644, libc::O_RDWR).unwrap();
    vfs.write(fh, 0, b"hello world").unwrap();
    assert_eq!(vfs.read(f.ino, 6, 100).unwrap().to_vec(), b"world");
    assert!(matches!(vfs.rmdir(ROOT, b"d"), Err(FsError::NotEmpty)));
    assert!(matches!(vfs.unlink(ROOT, b"d"), Err(FsError::IsDir)));
    assert!(matches!(vfs.rmdir(d.ino, b"f"), Err(FsError::NotDir)));
    assert!(matches!(
        vfs.rename(ROOT, b"d", d.ino, b"inside", RenameMode::Replace),
        Err(FsError::Invalid)
    ));
    vfs.rename(d.ino, b"f", ROOT, b"g", RenameMode::Replace).unwrap();
    assert_eq!(vfs.lookup(ROOT, b"g").unwrap().ino, f.ino);
    assert_eq!(vfs.getattr(ROOT).unwrap().nlink, 3);

    // Unlinked while open: still readable through the handle's inode.
    vfs.unlink(ROOT, b"g").unwrap();
    assert!(matches!(vfs.lookup(ROOT, b"g"), Err(FsError::NotFound)));
    assert_eq!(vfs.read(f.ino, 0, 5).unwrap().to_vec(), b"hello");
    vfs.release(fh);
    vfs.forget(f.ino, 2);
    assert!(matches!(vfs.getattr(f.ino), Err(FsError::Stale)));

    // Commit, then a fresh view of the volume sees the result.
    let (h, fh) = vfs.create(ME, d.ino, b"kept", 0o600, libc::O_WRONLY).unwrap();
    vfs.write(fh, 0, &vec![7u8; 10_000]).unwrap();
    vfs.setxattr(h.ino, b"user.k", b"v", 0).unwrap();
    vfs.flush(fh).unwrap();
    assert!(!vfs.is_dirty());
    let other = vfs_on(&dict, false);
    let dd = other.lookup(ROOT, b"d").unwrap();
    let kept = other.lookup(dd.ino, b"kept").unwrap();
    assert_eq!((kept.size, kept.perm), (10_000, 0o600));
    assert_eq!(other.read(kept.ino, 9_990, 100).unwrap().to_vec(), vec![7u8; 10]);
    assert_eq!(other.getxattr(kept.ino, b"user.k").unwrap(), b"v");
    assert!(matches!(other.lookup(ROOT, b"g"), Err(FsError::NotFound)));
}

#[test]
fn two_views_merge_and_adopt_each_others_commits() {
    let dict = Arc::new(MemoryDict::new());
    let a = vfs_on(&dict, true);
    let b = vfs_on(&dict, false);
    let shared_a = a.mkdir(ME, ROOT, b"shared", 0o755).unwrap();
    a.commit().unwrap();
    b.sync().unwrap();
    let shared_b = b.lookup(ROOT, b"shared").unwrap();
    // Both create files in the same directory without seeing each other.
    for i in 0..20 {
        let name = format!("a{i}");
        let (_, fh) = a
            .create(ME, shared_a.ino, name.as_bytes(), 0o644, libc::O_WRONLY)
            .unwrap();
        a.write(fh, 0, name.as_bytes()).unwrap();
        a.release(fh);
        let name = format!("b{i}");
        let (_, fh) = b
            .create(ME, shared_b.ino, name.as_bytes(), 0o644, libc::O_WRONLY)
            .unwrap();
        b.write(fh, 0, name.as_bytes()).unwrap();
        b.release(fh);
    }
    let kept_ino = a.lookup(shared_a.ino, b"a3").unwrap().ino;
    a.commit().unwrap();
    b.commit().unwrap(); // loses the swap, merges
    a.sync().unwrap(); // adopts the merge
    for v in [&a, &b] {
        let shared = v.lookup(ROOT, b"shared").unwrap().ino;
        let names = listing(v, shared);
        assert_eq!(
            names.len(),
            42,
            "{:?}",
            names.iter().map(|n| tree::show(n)).collect::<Vec<_>>()
        );
        let b7 = v.lookup(shared, b"b7").unwrap();
        assert_eq!(v.read(b7.ino, 0, 10).unwrap().to_vec(), b"b7");
    }
    // Inode numbers of things that stayed are kept across adoption.
    assert_eq!(a.lookup(shared_a.ino, b"a3").unwrap().ino, kept_ino);
}

#[test]
fn a_file_larger_than_the_spill_limit_is_stored_while_written() {
    let dict = Arc::new(MemoryDict::new());
    let vfs = vfs_on(&dict, true);
    let (f, fh) = vfs.create(ME, ROOT, b"big", 0o644, libc::O_WRONLY).unwrap();
    let block: Vec<u8> = (0..1000u32).map(|i| (i * 7 % 251) as u8).collect();
    for i in 0..100u64 {
        vfs.write(fh, i * 1000, &block).unwrap();
        // The overlay never holds much more than the spill limit.
        let data = vfs.file_data(f.ino).unwrap();
        assert!(data.lock().dirty_bytes() <= opts().spill_bytes + block.len());
    }
    vfs.flush(fh).unwrap();
    let other = vfs_on(&dict, false);
    let big = other.lookup(ROOT, b"big").unwrap();
    assert_eq!(big.size, 100_000);
    assert_eq!(other.read(big.ino, 99_000, 1000).unwrap().to_vec(), block);
}

/// Extents of 1 MiB and more go back to the spare buffers once spilled, and the
/// next extents are written into them: no byte of an earlier extent may show.
#[test]
fn sequential_writes_through_recycled_buffers_keep_every_byte() {
    let dict = Arc::new(MemoryDict::new());
    let v = Volume::new(BlobStore::new(dict.clone(), "t:", 1 << 22), "vol");
    v.create().unwrap();
    let options = Options {
        spill_bytes: 3 << 19,
        ..opts()
    };
    let vfs = Vfs::new(v, options).unwrap();
    let (_, fh) = vfs.create(ME, ROOT, b"seq", 0o644, libc::O_WRONLY).unwrap();
    let block = |i: u64| -> Vec<u8> { (0..64u64 << 10).map(|j| ((i * 31 + j * 7) % 251) as u8).collect() };
    let blocks = 96u64; // 6 MiB: four spills
    for i in 0..blocks {
        vfs.write(fh, i << 16, &block(i)).unwrap();
    }
    vfs.flush(fh).unwrap();
    let other = vfs_on(&dict, false);
    let seq = other.lookup(ROOT, b"seq").unwrap();
    assert_eq!(seq.size, blocks << 16);
    for i in 0..blocks {
        assert_eq!(
            other.read(seq.ino, i << 16, 64 << 10).unwrap().to_vec(),
            block(i),
            "block {i}"
        );
    }
}

/// The refresh that adopts other clients' commits reads the head before it
/// takes the commit lock; a commit of this client landing in between must not
/// make it adopt the older head it read (the view would lose what was just
/// committed: an `unlink` of a file written a moment before failed with
/// ENOENT on a mount under load).
#[test]
fn a_refresh_racing_a_commit_never_goes_back_to_an_older_head() {
    let (_, hooked, vfs) = hooked_vfs(opts());
    let vfs = Arc::new(vfs);
    let (_, fh) = vfs.create(ME, ROOT, b"a", 0o644, libc::O_WRONLY).unwrap();
    vfs.write(fh, 0, b"first").unwrap();
    vfs.flush(fh).unwrap();
    vfs.release(fh);
    // Right after the refresh has read the head: this client commits "b".
    let committer = vfs.clone();
    *hooked.after_get.lock() = Some((
        ":root".into(),
        Box::new(move || {
            let (_, fh) = committer.create(ME, ROOT, b"b", 0o644, libc::O_WRONLY).unwrap();
            committer.write(fh, 0, b"second").unwrap();
            committer.flush(fh).unwrap();
            committer.release(fh);
        }),
    ));
    vfs.sync().unwrap();
    assert!(hooked.after_get.lock().is_none(), "the hook ran");
    assert_eq!(
        vfs.lookup(ROOT, b"b").unwrap().size,
        6,
        "the view kept the newer commit"
    );
    assert_eq!(vfs.lookup(ROOT, b"a").unwrap().size, 5);
}

#[test]
fn a_presized_file_is_cut_like_its_content_and_holes_cost_no_reading() {
    let store = store();
    let mut f = FileData::empty(store.empty_manifest_name());
    let mut model = vec![0u8; 50_000];
    f.truncate(50_000);
    let data: Vec<u8> = (0..3000u32).map(|i| (i * 31 % 253) as u8).collect();
    for at in [0usize, 20_000, 47_000] {
        f.write(at as u64, &data);
        model[at..at + data.len()].copy_from_slice(&data);
        f.spill(&store, small()).unwrap();
        f.materialize(&store, small()).unwrap();
        let (fresh, _) = tree::store_data(&store, &model[..], small()).unwrap();
        assert_eq!(f.manifest, fresh);
    }
    assert_eq!(tree::read_to_vec(&store, &f.manifest).unwrap(), model);
}

#[test]
fn hard_links_share_one_inode_across_commits_and_views() {
    let dict = Arc::new(MemoryDict::new());
    let vfs = vfs_on(&dict, true);
    let d = vfs.mkdir(ME, ROOT, b"d", 0o755).unwrap();
    let (f, fh) = vfs.create(ME, ROOT, b"f", 0o640, libc::O_RDWR).unwrap();
    vfs.write(fh, 0, b"one").unwrap();
    assert!(matches!(
        vfs.link(d.ino, ROOT, b"dirlink"),
        Err(FsError::NotPermitted)
    ));
    assert!(matches!(vfs.link(f.ino, ROOT, b"f"), Err(FsError::Exists)));
    let g = vfs.link(f.ino, d.ino, b"g").unwrap();
    assert_eq!((g.ino, g.nlink), (f.ino, 2));
    // Writing through one name shows through the other.
    vfs.write(fh, 3, b" two").unwrap();
    assert_eq!(
        vfs.read(vfs.lookup(d.ino, b"g").unwrap().ino, 0, 100)
            .unwrap()
            .to_vec(),
        b"one two"
    );
    vfs.release(fh);
    vfs.commit().unwrap();

    // A fresh view of the commit: both names, one inode, two links.
    let other = vfs_on(&dict, false);
    let od = other.lookup(ROOT, b"d").unwrap();
    let (a, b) = (
        other.lookup(ROOT, b"f").unwrap(),
        other.lookup(od.ino, b"g").unwrap(),
    );
    assert_eq!(a.ino, b.ino);
    assert_eq!((a.nlink, a.perm, a.size), (2, 0o640, 7));
    assert_eq!(other.read(b.ino, 0, 100).unwrap().to_vec(), b"one two");
    let fh = other.open(a.ino, libc::O_WRONLY).unwrap();
    other.write(fh, 0, b"ONE").unwrap();
    other.release(fh);
    // Removing one name keeps the file under the other.
    other.unlink(ROOT, b"f").unwrap();
    assert_eq!(other.getattr(b.ino).unwrap().nlink, 1);
    other.commit().unwrap();

    let third = vfs_on(&dict, false);
    let td = third.lookup(ROOT, b"d").unwrap();
    let g = third.lookup(td.ino, b"g").unwrap();
    assert_eq!(g.nlink, 1);
    assert_eq!(third.read(g.ino, 0, 100).unwrap().to_vec(), b"ONE two");
    assert!(matches!(third.lookup(ROOT, b"f"), Err(FsError::NotFound)));
    // The first view adopts all of it.
    vfs.sync().unwrap();
    assert_eq!(vfs.getattr(f.ino).unwrap().nlink, 1);
    assert_eq!(vfs.read(f.ino, 0, 100).unwrap().to_vec(), b"ONE two");
    // The last name gone: the inode table is gone too.
    third.unlink(td.ino, b"g").unwrap();
    third.commit().unwrap();
    let (_, head) = third.volume().head().unwrap();
    assert_eq!(head.inodes, None);
}

#[test]
fn hard_links_made_concurrently_with_other_changes_merge() {
    let dict = Arc::new(MemoryDict::new());
    let a = vfs_on(&dict, true);
    let (f, fh) = a.create(ME, ROOT, b"f", 0o644, libc::O_WRONLY).unwrap();
    a.write(fh, 0, b"shared").unwrap();
    a.release(fh);
    a.commit().unwrap();
    let b = vfs_on(&dict, false);
    // A links f; B, not knowing, creates another file and renames f.
    a.link(f.ino, ROOT, b"f2").unwrap();
    a.commit().unwrap();
    b.rename(ROOT, b"f", ROOT, b"renamed", RenameMode::Replace)
        .unwrap();
    let (_, fh) = b.create(ME, ROOT, b"new", 0o644, libc::O_WRONLY).unwrap();
    b.write(fh, 0, b"n").unwrap();
    b.release(fh);
    b.commit().unwrap();
    a.sync().unwrap();
    for v in [&a, &b] {
        let names = listing(v, ROOT);
        assert!(names.contains(&b"new".to_vec()), "{names:?}");
        assert!(names.contains(&b"f2".to_vec()), "{names:?}");
        let f2 = v.lookup(ROOT, b"f2").unwrap();
        assert_eq!(v.read(f2.ino, 0, 100).unwrap().to_vec(), b"shared");
    }
    // Every name the merge kept counts as a link, and the table says so.
    let (_, head) = b.volume().head().unwrap();
    let inodes = links::load(&b.volume().store, head.inodes).unwrap();
    let counts = links::count(&b.volume().store, head.root).unwrap();
    for (id, (_, nlink)) in &inodes {
        assert_eq!(counts.get(id), Some(nlink));
    }
}

#[test]
fn old_versions_are_read_only_views_in_the_root() {
    let dict = Arc::new(MemoryDict::new());
    let vfs = vfs_on(&dict, true);
    let (f, fh) = vfs.create(ME, ROOT, b"f", 0o644, libc::O_WRONLY).unwrap();
    vfs.write(fh, 0, b"version one").unwrap();
    vfs.flush(fh).unwrap();
    vfs.release(fh);
    crate::history::create_snapshot(vfs.volume(), "before", None).unwrap();
    let fh = vfs.open(f.ino, libc::O_WRONLY | libc::O_TRUNC).unwrap();
    vfs.setattr(
        f.ino,
        SetAttr {
            size: Some(0),
            ..Default::default()
        },
    )
    .unwrap();
    vfs.write(fh, 0, b"two").unwrap();
    vfs.flush(fh).unwrap();
    vfs.release(fh);

    let snaps = vfs.lookup(ROOT, b".snapshots").unwrap();
    let before = vfs.lookup(snaps.ino, b"before").unwrap();
    let old = vfs.lookup(before.ino, b"f").unwrap();
    assert_ne!(old.ino, f.ino);
    assert_eq!(vfs.read(old.ino, 0, 100).unwrap().to_vec(), b"version one");
    assert_eq!(vfs.read(f.ino, 0, 100).unwrap().to_vec(), b"two");
    // Nothing in a view can change.
    assert!(matches!(
        vfs.open(old.ino, libc::O_WRONLY),
        Err(FsError::ReadOnly)
    ));
    assert!(matches!(vfs.unlink(before.ino, b"f"), Err(FsError::ReadOnly)));
    assert!(matches!(
        vfs.mkdir(ME, snaps.ino, b"x", 0o755),
        Err(FsError::ReadOnly)
    ));
    assert!(matches!(
        vfs.setxattr(old.ino, b"user.a", b"b", 0),
        Err(FsError::ReadOnly)
    ));
    assert!(matches!(
        vfs.rename(before.ino, b"f", ROOT, b"g", RenameMode::Replace),
        Err(FsError::ReadOnly)
    ));
    // The names are taken in the root.
    assert!(matches!(
        vfs.mkdir(ME, ROOT, b".history", 0o755),
        Err(FsError::Exists)
    ));
    // .history lists commits by time, newest holding the current content.
    let hist = vfs.lookup(ROOT, b".history").unwrap();
    let names = listing(&vfs, hist.ino);
    assert!(names.len() >= 2 + 3, "{names:?}"); // . .. and mkfs + two commits
    assert!(
        names[2].starts_with(b"20") && names[2].ends_with(b"Z"),
        "{names:?}"
    );
    let root = listing(&vfs, ROOT);
    // Hidden from the root's listing (tools walking the tree skip them).
    assert!(!root.contains(&b".snapshots".to_vec()) && !root.contains(&b".history".to_vec()));
    // A snapshot deleted is gone from the view at its next listing.
    crate::history::delete_snapshot(vfs.volume(), "before").unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    assert!(matches!(vfs.lookup(snaps.ino, b"before"), Err(FsError::NotFound)));
}

#[test]
fn utc_names() {
    assert_eq!(utc_name(Time { secs: 0, nanos: 0 }), "1970-01-01T00:00:00Z");
    assert_eq!(
        utc_name(Time {
            secs: 1_795_589_401,
            nanos: 0
        }),
        "2026-11-25T06:50:01Z"
    );
    assert_eq!(
        utc_name(Time {
            secs: 951_782_400,
            nanos: 0
        }),
        "2000-02-29T00:00:00Z"
    );
}

/// A committed file of `len` bytes named `name` in `vfs`, and its bytes.
fn stored_file(vfs: &Vfs, name: &[u8], len: u32) -> (Ino, Vec<u8>) {
    let data: Vec<u8> = (0..len)
        .map(|i| (i.wrapping_mul(2654435761) >> 9) as u8)
        .collect();
    let (attr, fh) = vfs.create(ME, ROOT, name, 0o644, libc::O_WRONLY).unwrap();
    vfs.write(fh, 0, &data).unwrap();
    vfs.flush(fh).unwrap();
    vfs.release(fh);
    (attr.ino, data)
}

#[test]
fn a_random_read_offers_its_whole_chunk_and_a_sequential_one_does_not() {
    let dict = Arc::new(MemoryDict::new());
    let writer = vfs_on(&dict, true);
    let (_, data) = stored_file(&writer, b"f", 40_000);
    let reader = vfs_on(&dict, false);
    let ino = reader.lookup(ROOT, b"f").unwrap().ino;
    // The first read at 0 is a sequential reader's start: read-ahead, no offer.
    let (_, offer) = reader.read_offering(ino, 0, 100).unwrap();
    assert!(offer.is_none());
    let (bytes, offer) = reader.read_offering(ino, 30_000, 10).unwrap();
    assert_eq!(bytes.to_vec(), &data[30_000..30_010]);
    let offer = offer.expect("a random read inside a stored chunk offers it");
    let (offset, bytes) = &offer.pieces[0];
    let (start, end) = (*offset as usize, *offset as usize + bytes.len());
    assert!(
        start <= 30_000 && 30_010 <= end && end - start > 10,
        "{start}..{end}"
    );
    for (offset, bytes) in &offer.pieces {
        assert_eq!(bytes.to_vec(), &data[*offset as usize..][..bytes.len()]);
    }
    let mut kept = Vec::new();
    assert_eq!(
        reader.keep_if_current(&offer, || kept.push(offer.pieces[0].0)),
        Kept::Yes
    );
    assert_eq!(kept, [start as u64]);
}

/// The pages of a file of `size` bytes that the kernel holds after being
/// handed `pieces`, as Linux's FUSE_NOTIFY_STORE keeps them: a page is kept
/// only when a piece covers all of it (or all of it up to the file's end).
fn pages_kept(pieces: &[(u64, bytes::Bytes)], page: u64, size: u64) -> HashMap<u64, Vec<u8>> {
    let mut kept = HashMap::new();
    for (offset, bytes) in pieces {
        let end = offset + bytes.len() as u64;
        let mut p = offset.div_ceil(page) * page;
        while p < end && (p + page <= end || end == size) {
            let to = (p + page).min(end);
            kept.insert(
                p / page,
                bytes[(p - offset) as usize..(to - offset) as usize].to_vec(),
            );
            p += page;
        }
    }
    kept
}

#[test]
fn random_reads_of_every_chunk_put_every_page_of_the_file_in_the_cache() {
    // Chunk boundaries fall anywhere in a page; the kernel keeps only whole
    // pages. Offers complete the page at each edge from the neighbouring
    // chunk's edge, whichever of the two is read first.
    let page = 64u64;
    let dict = Arc::new(MemoryDict::new());
    let writer = vfs_on(&dict, true);
    let (_, data) = stored_file(&writer, b"f", 40_000);
    let v = Volume::new(BlobStore::new(dict.clone(), "t:", 1 << 22), "vol");
    let reader = Vfs::new(
        v,
        Options {
            cache_page: page as usize,
            ..opts()
        },
    )
    .unwrap();
    let ino = reader.lookup(ROOT, b"f").unwrap().ino;
    // One-byte reads 37 bytes apart, in an order where no read follows on
    // from the one before (so none counts as a sequential reader's).
    let lanes = 10u64;
    let lane = 40_000 / lanes;
    let mut pieces = Vec::new();
    for k in 0..lane.div_ceil(37) {
        for l in 0..lanes {
            let at = l * lane + k * 37;
            if at >= (l + 1) * lane {
                continue;
            }
            let (bytes, offer) = reader.read_offering(ino, at, 1).unwrap();
            assert_eq!(bytes[..], data[at as usize..][..1]);
            pieces.extend(offer.into_iter().flat_map(|o| o.pieces));
        }
    }
    let kept = pages_kept(&pieces, page, data.len() as u64);
    for (p, bytes) in &kept {
        assert_eq!(bytes[..], data[(p * page) as usize..][..bytes.len()], "page {p}");
    }
    let missing: Vec<u64> = (0..(data.len() as u64).div_ceil(page))
        .filter(|p| !kept.contains_key(p))
        .collect();
    assert!(missing.is_empty(), "pages never kept: {missing:?}");
}

#[test]
fn offers_are_not_kept_once_the_file_is_opened_for_writing_truncated_or_changed_elsewhere() {
    let dict = Arc::new(MemoryDict::new());
    let vfs = vfs_on(&dict, true);
    let (ino, _) = stored_file(&vfs, b"f", 40_000);
    let random_read = |v: &Vfs, ino| {
        v.read_offering(ino, 0, 1).unwrap();
        v.read_offering(ino, 30_000, 10).unwrap().1.expect("an offer")
    };
    let not_kept =
        |v: &Vfs, offer: &CacheOffer| v.keep_if_current(offer, || panic!("kept bytes that are not current"));

    // A handle open for writing: no offer while it is open, and an earlier
    // one is not kept.
    let offer = random_read(&vfs, ino);
    let fh = vfs.open(ino, libc::O_RDWR).unwrap();
    assert!(vfs.read_offering(ino, 10_000, 10).unwrap().1.is_none());
    assert_eq!(not_kept(&vfs, &offer), Kept::No);
    vfs.release(fh);
    // Read-only handles do not count.
    let ro = vfs.open(ino, libc::O_RDONLY).unwrap();
    let offer = random_read(&vfs, ino);
    assert_eq!(vfs.keep_if_current(&offer, || {}), Kept::Yes);

    // A truncation (no handle needed) makes an earlier offer stale.
    vfs.setattr(
        ino,
        SetAttr {
            size: Some(35_000),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(not_kept(&vfs, &offer), Kept::No);
    vfs.release(ro);
    vfs.commit().unwrap();

    // Another client's commit, once adopted, does too.
    let offer = random_read(&vfs, ino);
    let other = vfs_on(&dict, false);
    let f = other.lookup(ROOT, b"f").unwrap().ino;
    let fh = other.open(f, libc::O_WRONLY).unwrap();
    other.write(fh, 30_000, b"changed").unwrap();
    other.flush(fh).unwrap();
    other.release(fh);
    vfs.sync().unwrap();
    assert_eq!(not_kept(&vfs, &offer), Kept::No);
    assert_eq!(vfs.read(ino, 30_000, 7).unwrap().to_vec(), b"changed");
}

#[test]
fn a_truncation_that_cannot_wait_for_bytes_being_kept_spoils_them() {
    let dict = Arc::new(MemoryDict::new());
    let vfs = vfs_on(&dict, true);
    let (ino, _) = stored_file(&vfs, b"f", 40_000);
    vfs.read_offering(ino, 0, 1).unwrap();
    let offer = vfs.read_offering(ino, 30_000, 10).unwrap().1.expect("an offer");
    // Keeping takes long (as when the kernel waits on a pending read's
    // pages); the truncation waits for it a while, then goes on.
    let kept = vfs.keep_if_current(&offer, || {
        let shrink = SetAttr {
            size: Some(100),
            ..Default::default()
        };
        vfs.setattr(ino, shrink).unwrap();
    });
    assert_eq!(kept, Kept::Spoiled, "bytes older than the truncation stayed kept");
}

/// A commit stores a file's bytes holding only its lock to take them and to
/// take the result in: a writer of that file is not held up by the store,
/// and what it writes meanwhile goes in the next commit.
#[test]
fn writes_go_on_while_a_commit_stores_the_file_and_land_in_the_next_commit() {
    use std::sync::mpsc::channel;
    // (A write past the spill limit would wait for the store: one job at a time.)
    let (dict, hooked, vfs) = hooked_vfs(Options {
        spill_bytes: 1 << 20,
        ..opts()
    });
    let vfs = Arc::new(vfs);
    let bytes = |n: u32, seed: u32| -> Vec<u8> {
        (0..n)
            .map(|i| (i.wrapping_add(seed).wrapping_mul(2654435761) >> 11) as u8)
            .collect()
    };
    let (_, fh) = vfs.create(ME, ROOT, b"f", 0o644, libc::O_WRONLY).unwrap();
    let mut model = bytes(30_000, 1);
    vfs.write(fh, 0, &model).unwrap();
    // The commit's store stops before storing anything until released.
    let (release, held) = channel::<()>();
    let (entered, started) = channel::<()>();
    *hooked.before_lease.lock() = Some(Box::new(move || {
        entered.send(()).unwrap();
        held.recv().unwrap();
    }));
    let committer = {
        let vfs = vfs.clone();
        std::thread::spawn(move || vfs.commit())
    };
    started.recv().unwrap();
    // While it is held: a write over the bytes being stored and one past
    // them both return, and reads see them.
    let (wrote, written) = channel();
    {
        let vfs = vfs.clone();
        let (over, after) = (bytes(500, 2), bytes(10_000, 3));
        std::thread::spawn(move || {
            vfs.write(fh, 1_000, &over).unwrap();
            vfs.write(fh, 30_000, &after).unwrap();
            wrote.send((over, after)).unwrap();
        });
    }
    let (over, after) = written
        .recv_timeout(std::time::Duration::from_secs(10))
        .expect("a write waited for the commit's store");
    let committed = model.clone();
    model[1_000..1_500].copy_from_slice(&over);
    model.extend_from_slice(&after);
    assert!(vfs.read(vfs.lookup(ROOT, b"f").unwrap().ino, 0, 1 << 20).unwrap() == model);
    release.send(()).unwrap();
    committer.join().unwrap().unwrap();
    // The commit holds what was written before it; the next holds the rest.
    let other = vfs_on(&dict, false);
    let f = other.lookup(ROOT, b"f").unwrap().ino;
    assert!(
        other.read(f, 0, 1 << 20).unwrap() == committed,
        "the commit's version"
    );
    assert!(vfs.is_dirty(), "bytes written during the commit were forgotten");
    vfs.commit().unwrap();
    other.sync().unwrap();
    let f = other.lookup(ROOT, b"f").unwrap().ino;
    assert!(
        other.read(f, 0, 1 << 20).unwrap() == model,
        "the next commit's version"
    );
    vfs.release(fh);
}

/// New empty files share one manifest: a commit of many leases and stores it
/// once, not once per file (each was a round trip under the state's lock,
/// holding up every other operation of the mount).
#[test]
fn a_commit_of_many_new_empty_files_leases_their_manifest_once() {
    use std::sync::atomic::Ordering::Relaxed;
    let (dict, hooked, vfs) = hooked_vfs(opts());
    vfs.commit().unwrap();
    let before = hooked.leases.load(Relaxed);
    for i in 0..100 {
        let (_, fh) = vfs
            .create(ME, ROOT, format!("f{i}").as_bytes(), 0o644, libc::O_WRONLY)
            .unwrap();
        vfs.release(fh);
    }
    vfs.commit().unwrap();
    let leases = hooked.leases.load(Relaxed) - before;
    assert!(leases <= 5, "{leases} leases for one commit of 100 empty files");
    let other = vfs_on(&dict, false);
    assert_eq!(listing(&other, ROOT).len(), 102);
    let f = other.lookup(ROOT, b"f99").unwrap();
    assert_eq!(other.read(f.ino, 0, 10).unwrap().len(), 0);
}

/// Closing a small file that was written commits it (close-to-open), and
/// that commit is what unpacking a source tree waits for, file after file.
/// Its blobs (chunk, manifest, directory, commit) go to the store as one
/// leased round, not a lease and a put each: at most two rounds (the file's
/// bytes are stored before the node table is locked), the root swap and the
/// release of the leases. (Before: 4 leases and 12 round trips.)
#[test]
fn closing_a_small_written_file_commits_in_a_few_round_trips() {
    use std::sync::atomic::Ordering::Relaxed;
    let (dict, hooked, vfs) = hooked_vfs(opts());
    let (_, fh) = vfs.create(ME, ROOT, b"warm", 0o644, libc::O_WRONLY).unwrap();
    vfs.write(fh, 0, b"the first lease registers this client")
        .unwrap();
    vfs.flush(fh).unwrap();
    vfs.release(fh);
    let mut worst = (0, 0);
    for i in 0..20 {
        let (leases, trips) = (hooked.leases.load(Relaxed), hooked.round_trips.load(Relaxed));
        let (_, fh) = vfs
            .create(ME, ROOT, format!("f{i}").as_bytes(), 0o644, libc::O_WRONLY)
            .unwrap();
        vfs.write(fh, 0, format!("small file {i}").as_bytes()).unwrap();
        vfs.flush(fh).unwrap();
        vfs.release(fh);
        let now = (
            hooked.leases.load(Relaxed) - leases,
            hooked.round_trips.load(Relaxed) - trips,
        );
        worst = worst.max(now);
    }
    let (leases, trips) = worst;
    assert!(leases <= 2, "{leases} leases for one close");
    assert!(trips <= 7, "{trips} round trips for one close");
    let other = vfs_on(&dict, false);
    let f = other.lookup(ROOT, b"f19").unwrap();
    assert_eq!(other.read(f.ino, 0, 100).unwrap(), &b"small file 19"[..]);
}

/// Issue 24, the commit rule on the in-memory dict: uploads refused at chosen
/// points (the background spill, the commit's own uploads, the retries),
/// commits attempted meanwhile. A commit fails while anything it needs is
/// unstored, with ENOSPC for a full store; once the store accepts again the
/// next commit stores everything; and every commit ever published names only
/// blobs that are in the store (fsck of each, read without any cache).
#[test]
fn no_commit_names_a_blob_the_store_refused_wherever_the_refusals_fall() {
    for refusals_at in [0usize, 1, 2, 3, 5, 8, 13] {
        let (dict, hooked, v) = hooked_vfs(opts());
        let bytes =
            |n: usize, seed: u8| -> Vec<u8> { (0..n).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect() };
        let (_, fa) = v.create(ME, ROOT, b"a", 0o644, libc::O_RDWR).unwrap();
        v.write(fa, 0, &bytes(20_000, 1)).unwrap();
        v.commit().unwrap();
        // From here, the store refuses `refusals_at` blob writes in a row
        // after letting a few through.
        hooked
            .refuse_puts
            .store(refusals_at, std::sync::atomic::Ordering::SeqCst);
        let (_, fb) = v.create(ME, ROOT, b"b", 0o644, libc::O_RDWR).unwrap();
        v.write(fb, 0, &bytes(30_000, 2)).unwrap();
        v.write(fa, 5_000, &bytes(7_000, 3)).unwrap();
        let mut failures = 0;
        loop {
            match v.commit() {
                Ok(()) => break,
                Err(e) => {
                    assert_eq!(e.errno(), 28, "a full store must be ENOSPC, got {e}");
                    failures += 1;
                    assert!(failures < 50, "the commit never succeeded");
                }
            }
        }
        // Every published commit is whole, read from the store itself.
        let fresh = Volume::new(BlobStore::new(dict.clone(), "t:", 0), "vol");
        let log = fresh.log(1000).unwrap();
        assert!(log.len() >= 3, "{refusals_at}: {} commits", log.len());
        for (h, c) in &log {
            let check = crate::history::fsck(&fresh.store, c.tree());
            assert!(
                check.damaged.is_empty(),
                "{refusals_at}: commit {h:?} names missing blobs: {:?}",
                check.damaged
            );
        }
        assert_eq!(hooked.refuse_puts.load(std::sync::atomic::Ordering::SeqCst), 0);
        let mut want_a = bytes(20_000, 1);
        want_a[5_000..12_000].copy_from_slice(&bytes(7_000, 3));
        let reader = Vfs::new(fresh, opts()).unwrap();
        let ra = reader.lookup(ROOT, b"a").unwrap();
        let rb = reader.lookup(ROOT, b"b").unwrap();
        assert_eq!(reader.read(ra.ino, 0, 1 << 20).unwrap().as_ref(), &want_a[..]);
        assert_eq!(
            reader.read(rb.ino, 0, 1 << 20).unwrap().as_ref(),
            &bytes(30_000, 2)[..]
        );
    }
}

/// Issue 24: many small files written while the store refuses uploads (it
/// is full) are held in memory only up to `held_bytes` over all files: past
/// that the writer gets ENOSPC, as from a full disk, instead of the mount's
/// memory growing with every file (each file is far under the per-file spill
/// size, so only the mount-wide bound can stop them). Everything accepted is
/// stored once the store takes uploads again, and the bound is released.
#[test]
fn many_small_files_written_to_a_full_store_stop_at_the_memory_bound() {
    use std::sync::atomic::Ordering::SeqCst;
    let limit = 64 << 10;
    let (dict, hooked, v) = hooked_vfs(Options {
        held_bytes: limit,
        ..opts()
    });
    let body = |i: usize| -> Vec<u8> { (0..1000).map(|j| (i * 7 + j) as u8).collect() };
    hooked.refuse_puts.store(usize::MAX, SeqCst);
    let mut accepted = 0;
    let refusal = loop {
        assert!(
            accepted < 1000,
            "1,000 files held with the store refusing everything"
        );
        let name = format!("f{accepted}");
        let (_, fh) = v.create(ME, ROOT, name.as_bytes(), 0o644, libc::O_RDWR).unwrap();
        let written = v.write(fh, 0, &body(accepted));
        v.release(fh);
        match written {
            Ok(_) => accepted += 1,
            Err(e) => break e,
        }
        if accepted == 10 {
            // The mount's commit (at close or on its interval) finds the
            // store full: from here the store is known to refuse.
            assert_eq!(v.commit().unwrap_err().errno(), 28);
        }
    };
    assert_eq!(refusal.errno(), 28, "a full store is ENOSPC: {refusal}");
    // The first ten went to the upload queue with the failed commit (bounded
    // on its own, at 64 MiB); the files after it are held by the mount.
    let held = (accepted - 10) * 1000;
    assert!(
        held >= limit && held <= limit + 1000,
        "{held} bytes of files held against a bound of {limit}"
    );
    // Room again: everything accepted is stored, and the mount writes again.
    hooked.refuse_puts.store(0, SeqCst);
    v.commit().unwrap();
    let (_, fh) = v.create(ME, ROOT, b"after", 0o644, libc::O_RDWR).unwrap();
    v.write(fh, 0, b"room again").unwrap();
    v.release(fh);
    v.commit().unwrap();
    let reader = vfs_on(&dict, false);
    for i in 0..accepted {
        let f = reader.lookup(ROOT, format!("f{i}").as_bytes()).unwrap();
        assert_eq!(
            reader.read(f.ino, 0, 4096).unwrap().as_ref(),
            &body(i)[..],
            "f{i}"
        );
    }
    // The file whose write was refused exists, empty (its create succeeded).
    let refused = reader.lookup(ROOT, format!("f{accepted}").as_bytes()).unwrap();
    assert_eq!(refused.size, 0);
}

/// Issue 24: access times with Linux's `relatime` rules. A read moves a
/// file's access time to now when it is not later than its mtime or ctime;
/// a read after that does not; a write makes the next read move it again.
/// The change rides in the next commit (a read never commits by itself, and
/// never changes the ctime), another client sees it after that commit, and
/// `fsclient diff` does not call a read a change.
#[test]
fn reads_keep_access_times_with_relatime_rules_in_the_next_commit() {
    let dict = Arc::new(MemoryDict::new());
    let v = vfs_on(&dict, true);
    let (attr, fh) = v.create(ME, ROOT, b"f", 0o644, libc::O_RDWR).unwrap();
    v.write(fh, 0, b"hello").unwrap();
    v.release(fh);
    v.commit().unwrap();
    let written = v.getattr(attr.ino).unwrap();
    assert_eq!(
        written.atime, written.mtime,
        "never read: the atime shows the mtime"
    );
    let commits = v.volume().log(100).unwrap().len();
    let before = v.volume().head().unwrap().1.root;

    std::thread::sleep(std::time::Duration::from_millis(5));
    assert_eq!(v.read(attr.ino, 0, 10).unwrap().as_ref(), b"hello");
    let read = v.getattr(attr.ino).unwrap();
    assert!(read.atime > read.mtime, "{read:?}");
    assert_eq!(read.ctime, written.ctime, "an access is not a change");
    assert!(v.is_dirty(), "the access time waits for the next commit");
    assert_eq!(
        v.volume().log(100).unwrap().len(),
        commits,
        "a read never commits"
    );
    // Later than the mtime now: another read leaves it (even past the
    // read-side recheck pause, which a write clears).
    assert_eq!(v.read(attr.ino, 0, 10).unwrap().as_ref(), b"hello");
    assert_eq!(v.getattr(attr.ino).unwrap().atime, read.atime);

    v.commit().unwrap();
    let other = vfs_on(&dict, false);
    let seen = other.lookup(ROOT, b"f").unwrap();
    assert_eq!(seen.atime, read.atime, "carried by the commit");
    let after = v.volume().head().unwrap().1.root;
    assert!(
        crate::history::diff(&v.volume().store, before, after)
            .unwrap()
            .is_empty(),
        "a read is not a change to diff"
    );

    // A write: the next read moves the access time again.
    std::thread::sleep(std::time::Duration::from_millis(5));
    let fh = v.open(attr.ino, libc::O_WRONLY).unwrap();
    v.write(fh, 0, b"j").unwrap();
    v.release(fh);
    let rewritten = v.getattr(attr.ino).unwrap();
    assert!(rewritten.mtime > read.atime);
    std::thread::sleep(std::time::Duration::from_millis(5));
    v.read(attr.ino, 0, 10).unwrap();
    assert!(v.getattr(attr.ino).unwrap().atime > rewritten.mtime);

    // utimensat / touch -a sets it outright.
    let at = crate::object::Time {
        secs: 1_000_000,
        nanos: 5,
    };
    let set = v
        .setattr(
            attr.ino,
            SetAttr {
                atime: Some(TimeSet::At(at)),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(set.atime, at);
    // Listing a directory is an access of it.
    let root_before = v.getattr(ROOT).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(5));
    listing(&v, ROOT);
    assert!(v.getattr(ROOT).unwrap().atime > root_before.mtime);
    v.commit().unwrap();
    assert!(
        vfs_on(&dict, false).getattr(ROOT).unwrap().atime > root_before.mtime,
        "the root's too"
    );
}

/// `noatime`: reads change nothing, and a read-only session has nothing to
/// commit. Nor does reading an old version in `.snapshots`.
#[test]
fn noatime_and_old_versions_keep_no_access_times() {
    let dict = Arc::new(MemoryDict::new());
    let volume = Volume::new(BlobStore::new(dict.clone(), "t:", 1 << 22), "vol");
    volume.create().unwrap();
    let v = Vfs::new(
        volume,
        Options {
            relatime: false,
            ..opts()
        },
    )
    .unwrap();
    let (attr, fh) = v.create(ME, ROOT, b"f", 0o644, libc::O_RDWR).unwrap();
    v.write(fh, 0, b"hello").unwrap();
    v.release(fh);
    v.commit().unwrap();
    v.read(attr.ino, 0, 10).unwrap();
    listing(&v, ROOT);
    assert!(!v.is_dirty());
    let a = v.getattr(attr.ino).unwrap();
    assert_eq!(a.atime, a.mtime);

    crate::history::create_snapshot(v.volume(), "then", None).unwrap();
    let r = vfs_on(&dict, false);
    let snaps = r.lookup(ROOT, b".snapshots").unwrap();
    let view = r.lookup(snaps.ino, b"then").unwrap();
    let old = r.lookup(view.ino, b"f").unwrap();
    r.read(old.ino, 0, 10).unwrap();
    assert_eq!(r.getattr(old.ino).unwrap().atime, old.mtime);
    assert!(!r.is_dirty(), "reading an old version changes nothing");
}

/// A read on one client and a write on another are not a conflict: one
/// file, the writer's content, the reader's access time.
#[test]
fn a_read_here_and_a_write_there_merge_without_a_conflict_copy() {
    let dict = Arc::new(MemoryDict::new());
    let a = vfs_on(&dict, true);
    let (attr, fh) = a.create(ME, ROOT, b"f", 0o644, libc::O_RDWR).unwrap();
    a.write(fh, 0, b"first").unwrap();
    a.release(fh);
    a.commit().unwrap();
    let b = vfs_on(&dict, false);
    let bf = b.lookup(ROOT, b"f").unwrap();
    let fh = b.open(bf.ino, libc::O_WRONLY).unwrap();
    b.write(fh, 0, b"second").unwrap();
    b.release(fh);
    b.commit().unwrap();
    // A reads (its own, older view) after B's write, and commits last.
    std::thread::sleep(std::time::Duration::from_millis(5));
    a.read(attr.ino, 0, 10).unwrap();
    let read_at = a.getattr(attr.ino).unwrap().atime;
    a.commit().unwrap();
    let c = vfs_on(&dict, false);
    let names = listing(&c, ROOT);
    assert_eq!(names.len(), 3, "one file, no conflict copy: {names:?}");
    let f = c.lookup(ROOT, b"f").unwrap();
    assert_eq!(c.read(f.ino, 0, 10).unwrap().as_ref(), b"second");
    assert!(f.atime >= read_at, "the reader's access time is kept");
}

#[test]
fn relatime_rules() {
    let t = |secs: i64| crate::object::Time { secs, nanos: 0 };
    let meta = |atime: Option<i64>, mtime: i64, ctime: i64| Meta {
        atime: atime.map(t),
        mtime: t(mtime),
        ctime: t(ctime),
        ..Default::default()
    };
    let now = t(10 * 86_400);
    assert!(relatime_due(&meta(None, 100, 100), now), "never accessed");
    assert!(
        relatime_due(&meta(Some(100), 100, 50), now),
        "not after the mtime"
    );
    assert!(
        relatime_due(&meta(Some(100), 50, 200), now),
        "not after the ctime"
    );
    assert!(
        !relatime_due(&meta(Some(now.secs - 3600), 50, 50), now),
        "recent and after both"
    );
    assert!(
        relatime_due(&meta(Some(now.secs - 86_400), 50, 50), now),
        "a day old"
    );
}
