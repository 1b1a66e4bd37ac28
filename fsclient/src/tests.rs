//! Core tests on the in-memory dict: operations against a model, merges, damage.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use proptest::prelude::*;

use crate::dict::{Dict, MemoryDict};
use crate::object::{Content, Hash};
use crate::store::BlobStore;
use crate::tree::{self, Chunking, FsError};
use crate::volume::Volume;

/// Chunk sizes small enough that test files span many chunks (shared by the
/// crate's test modules).
pub(crate) fn small() -> Chunking {
    Chunking {
        min: 64,
        avg: 256,
        max: 1024,
    }
}

fn setup() -> (Arc<MemoryDict>, Volume) {
    let dict = Arc::new(MemoryDict::new());
    let store = BlobStore::new(dict.clone(), "t:", 1 << 20);
    let v = Volume::new(store, "vol");
    v.create().unwrap();
    (dict, v)
}

fn p(path: &str) -> Vec<Vec<u8>> {
    tree::split_path(path).unwrap()
}

fn read(v: &Volume, path: &str) -> Result<Vec<u8>, FsError> {
    let root = v.root()?;
    match tree::lookup(&v.store, root, &p(path))? {
        Some(e) => match e.content {
            Content::File { manifest, .. } => tree::read_to_vec(&v.store, &manifest),
            _ => Err(FsError::IsDir),
        },
        None => Err(FsError::IsDir),
    }
}

fn write(v: &Volume, path: &str, data: &[u8]) -> Result<Hash, FsError> {
    v.change("write", |s, root| {
        tree::write_file(s, root, &p(path), data, 0o644, small())
    })
}

#[test]
fn files_and_directories() {
    let (_, v) = setup();
    v.change("mkdir", |s, r| tree::mkdir(s, r, &p("/docs"), 0o755))
        .unwrap();
    write(&v, "/docs/a.txt", b"hello").unwrap();
    assert_eq!(read(&v, "/docs/a.txt").unwrap(), b"hello");
    assert!(matches!(
        v.change("mkdir", |s, r| tree::mkdir(s, r, &p("/docs"), 0o755)),
        Err(FsError::Exists)
    ));
    assert!(matches!(write(&v, "/nope/a", b"x"), Err(FsError::NotFound)));
    assert!(matches!(write(&v, "/docs/a.txt/x", b"x"), Err(FsError::NotDir)));
    assert!(matches!(
        v.change("rmdir", |s, r| tree::rmdir(s, r, &p("/docs"))),
        Err(FsError::NotEmpty)
    ));
    v.change("mv", |s, r| tree::rename(s, r, &p("/docs/a.txt"), &p("/b.txt")))
        .unwrap();
    assert_eq!(read(&v, "/b.txt").unwrap(), b"hello");
    assert!(matches!(read(&v, "/docs/a.txt"), Err(FsError::NotFound)));
    v.change("rmdir", |s, r| tree::rmdir(s, r, &p("/docs"))).unwrap();
    assert!(matches!(
        v.change("mv", |s, r| tree::rename(s, r, &p("/"), &p("/x"))),
        Err(FsError::Invalid)
    ));
    v.change("ln", |s, r| tree::symlink(s, r, &p("/l"), b"b.txt"))
        .unwrap();
    let names: Vec<_> = tree::list(&v.store, v.root().unwrap(), &[])
        .unwrap()
        .into_keys()
        .collect();
    assert_eq!(names, vec![b"b.txt".to_vec(), b"l".to_vec()]);
    assert!(v.log(100).unwrap().len() >= 6);
}

#[test]
fn identical_data_is_stored_once_and_an_edit_touches_few_chunks() {
    let (dict, v) = setup();
    let data: Vec<u8> = (0..200_000u32)
        .flat_map(|i| (i.wrapping_mul(2654435761)).to_le_bytes())
        .collect();
    write(&v, "/a", &data).unwrap();
    let before = dict.keys().len();
    write(&v, "/b", &data).unwrap();
    // A second copy adds only directory, manifest-free and commit blobs.
    assert!(dict.keys().len() - before <= 3, "a copy stored new chunks");
    let mut edited = data.clone();
    edited.splice(400_000..400_000, vec![7u8; 1024]);
    let before = dict.keys().len();
    write(&v, "/c", &edited).unwrap();
    let added = dict.keys().len() - before;
    // New chunks near the edit, plus manifest, directory and commit.
    assert!(added <= 3 + 4, "an edit in the middle stored {added} new blobs");
}

#[test]
fn concurrent_writers_from_one_base_both_survive() {
    let (dict, a) = setup();
    let b = Volume::new(
        BlobStore::new(dict.clone() as Arc<dyn Dict>, "t:", 1 << 20),
        "vol",
    );
    // While b works on its change, a commits: b's root swap fails, and b merges
    // and retries.
    b.change("b", |s, root| {
        a.change("a", |s, r| {
            tree::write_file(s, r, &p("/from-a"), &b"A"[..], 0o644, small())
        })?;
        tree::write_file(s, root, &p("/from-b"), &b"B"[..], 0o644, small())
    })
    .unwrap();
    assert_eq!(a.log(10).unwrap()[0].1.message, "b", "b committed on top of a");
    assert_eq!(read(&a, "/from-a").unwrap(), b"A");
    assert_eq!(read(&a, "/from-b").unwrap(), b"B");
}

#[test]
fn the_same_file_changed_on_both_sides_keeps_both() {
    let (dict, a) = setup();
    write(&a, "/f", b"base").unwrap();
    let b = Volume::new(
        BlobStore::new(dict.clone() as Arc<dyn Dict>, "t:", 1 << 20),
        "vol",
    );
    let base_root = b.root().unwrap();
    write(&a, "/f", b"theirs").unwrap();
    let ours = tree::write_file(&b.store, base_root, &p("/f"), &b"ours"[..], 0o644, small()).unwrap();
    // Simulate b's commit from the old base.
    let merged = crate::merge::merge(&b.store, Some(base_root), ours, a.root().unwrap(), &b.writer).unwrap();
    let dir = tree::list(&b.store, merged, &[]).unwrap();
    assert_eq!(dir.len(), 2);
    let names: Vec<String> = dir
        .keys()
        .map(|k| String::from_utf8_lossy(k).into_owned())
        .collect();
    assert!(names[1].starts_with("f.conflict-"), "{names:?}");
    let content = |name: &[u8]| match &dir[name].content {
        Content::File { manifest, .. } => tree::read_to_vec(&b.store, manifest).unwrap(),
        _ => panic!(),
    };
    assert_eq!(content(b"f"), b"theirs");
    assert_eq!(content(names[1].as_bytes()), b"ours");
}

#[test]
fn a_corrupt_blob_fails_only_its_file_naming_the_key() {
    let (dict, v) = setup();
    write(&v, "/good", b"fine").unwrap();
    write(&v, "/bad", b"will rot").unwrap();
    let root = v.root().unwrap();
    let Some(e) = tree::lookup(&v.store, root, &p("/bad")).unwrap() else {
        panic!()
    };
    let Content::File { manifest, .. } = e.content else {
        panic!()
    };
    let chunk = v.store.manifest(&manifest).unwrap().chunks[0].0;
    let key = v.store.blob_key(&chunk);
    dict.overwrite(&key, Bytes::from_static(b"\x01\x01garbage"));
    // A fresh store (empty cache) sees the damage.
    let fresh = Volume::new(
        BlobStore::new(dict.clone() as Arc<dyn Dict>, "t:", 1 << 20),
        "vol",
    );
    let err = read(&fresh, "/bad").unwrap_err();
    assert!(err.to_string().contains(&key), "{err}");
    assert_eq!(err.errno(), 5);
    assert_eq!(read(&fresh, "/good").unwrap(), b"fine");
}

#[derive(Debug, Clone)]
enum Op {
    Write(u8, Vec<u8>),
    Remove(u8),
    Rename(u8, u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u8..6, proptest::collection::vec(any::<u8>(), 0..3000)).prop_map(|(n, d)| Op::Write(n, d)),
        (0u8..6).prop_map(Op::Remove),
        (0u8..6, 0u8..6).prop_map(|(a, b)| Op::Rename(a, b)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]
    /// Random operations applied to the tree and to a map of paths agree.
    #[test]
    fn random_operations_match_a_model(ops in proptest::collection::vec(op(), 1..25)) {
        let (_, v) = setup();
        v.change("mkdir", |s, r| tree::mkdir(s, r, &p("/d"), 0o755)).unwrap();
        let mut model: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        let name = |n: u8| format!("/d/f{n}");
        for op in ops {
            match op {
                Op::Write(n, data) => {
                    write(&v, &name(n), &data).unwrap();
                    model.insert(name(n), data);
                }
                Op::Remove(n) => {
                    let r = v.change("rm", |s, root| tree::unlink(s, root, &p(&name(n))));
                    prop_assert_eq!(r.is_ok(), model.remove(&name(n)).is_some());
                }
                Op::Rename(a, b) => {
                    let r = v.change("mv", |s, root| tree::rename(s, root, &p(&name(a)), &p(&name(b))));
                    prop_assert_eq!(r.is_ok(), model.contains_key(&name(a)));
                    if let Some(d) = model.remove(&name(a)) {
                        model.insert(name(b), d);
                    }
                }
            }
        }
        let listed: Vec<String> = tree::list(&v.store, v.root().unwrap(), &p("/d")).unwrap()
            .into_keys().map(|k| format!("/d/{}", String::from_utf8_lossy(&k))).collect();
        prop_assert_eq!(listed, model.keys().cloned().collect::<Vec<_>>());
        for (path, data) in &model {
            prop_assert_eq!(&read(&v, path).unwrap(), data);
        }
    }
}

#[derive(Debug, Clone)]
enum Edit {
    Write(u8),
    Remove(u8),
    /// `f<from>` to `f<to>`, or into `d/` when `into_dir` (replacing what is there).
    Rename(u8, u8, bool),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (0u8..5).prop_map(Edit::Write),
        (0u8..5).prop_map(Edit::Remove),
        (0u8..5, 0u8..5, any::<bool>()).prop_map(|(a, b, d)| Edit::Rename(a, b, d)),
    ]
}

fn top(n: u8) -> Vec<Vec<u8>> {
    vec![format!("f{n}").into_bytes()]
}

/// Applies edits to a tree, every write with content no other write has;
/// returns the new root.
fn apply(store: &BlobStore, mut root: Hash, edits: &[Edit], side: u8) -> Hash {
    for (i, e) in edits.iter().enumerate() {
        match e {
            Edit::Write(n) => {
                let data = [side, i as u8, *n];
                root = tree::write_file(store, root, &top(*n), &data[..], 0o644, small()).unwrap();
            }
            Edit::Remove(n) => {
                if let Ok(r) = tree::unlink(store, root, &top(*n)) {
                    root = r;
                }
            }
            Edit::Rename(a, b, into_dir) => {
                let to = if *into_dir {
                    if !matches!(tree::lookup(store, root, &p("/d")), Ok(Some(_))) {
                        root = tree::mkdir(store, root, &p("/d"), 0o755).unwrap();
                    }
                    vec![b"d".to_vec(), format!("f{b}").into_bytes()]
                } else {
                    top(*b)
                };
                if let Ok(r) = tree::rename(store, root, &top(*a), &to) {
                    root = r;
                }
            }
        }
    }
    root
}

/// Every file in a tree: path -> content (directories walked).
fn files(store: &BlobStore, root: Hash) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![(String::new(), root)];
    while let Some((prefix, dir)) = stack.pop() {
        for (name, e) in store.dir(&dir).unwrap() {
            let path = format!("{prefix}/{}", String::from_utf8_lossy(&name));
            match e.content {
                Content::File { manifest, .. } => {
                    out.insert(path, tree::read_to_vec(store, &manifest).unwrap());
                }
                Content::Dir { tree } => stack.push((path, tree)),
                _ => {}
            }
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]
    /// Two writers edit, delete, rename and move files of one base
    /// concurrently (every write's content is unique, so a content names a
    /// file). After the merge (the one commits use):
    /// - every content either side holds that it wrote is there (no write lost);
    /// - every base file both sides still hold, wherever, is there (a file both
    ///   renamed is not lost);
    /// - a base file one side deleted and the other left where it was is gone
    ///   (a deletion does not come back);
    /// - no content is there twice (a file both renamed is one file; before the
    ///   rename rule, each side's new name kept a copy).
    #[test]
    fn merging_concurrent_edits_and_renames_loses_nothing_and_duplicates_nothing(
        base_edits in proptest::collection::vec((0u8..5).prop_map(Edit::Write), 0..6),
        ours_edits in proptest::collection::vec(edit(), 0..8),
        theirs_edits in proptest::collection::vec(edit(), 0..8),
    ) {
        let store = BlobStore::new(Arc::new(MemoryDict::new()), "m:", 1 << 20);
        let base = apply(&store, tree::empty_dir(&store).unwrap(), &base_edits, 0);
        let ours = apply(&store, base, &ours_edits, 1);
        let theirs = apply(&store, base, &theirs_edits, 2);
        let tree = |root| crate::links::Tree {
            root,
            inodes: None,
            root_meta: None,
        };
        let merged = crate::links::merge_trees(&store, Some(tree(base)), tree(ours), tree(theirs), "writer").unwrap().root;
        let (b, o, t, m) = (files(&store, base), files(&store, ours), files(&store, theirs), files(&store, merged));
        let holds = |side: &BTreeMap<String, Vec<u8>>, c: &Vec<u8>| side.values().any(|v| v == c);
        let count = |c: &Vec<u8>| m.values().filter(|v| *v == c).count();
        for (side, name) in [(&o, "ours"), (&t, "theirs")] {
            for c in side.values().filter(|c| !holds(&b, c)) {
                prop_assert!(holds(&m, c), "{} wrote {:?}, lost; merged {:?}", name, c, m);
            }
        }
        for (path, c) in &b {
            if holds(&o, c) && holds(&t, c) {
                prop_assert!(holds(&m, c), "base {} ({:?}) held by both sides, lost; merged {:?}", path, c, m);
            }
            let untouched = |side: &BTreeMap<String, Vec<u8>>| side.get(path) == Some(c);
            if (!holds(&o, c) && untouched(&t)) || (!holds(&t, c) && untouched(&o)) {
                prop_assert!(!holds(&m, c), "base {} deleted on one side came back; merged {:?}", path, m);
            }
        }
        for c in m.values() {
            prop_assert_eq!(count(c), 1, "{:?} is there twice: {:?}", c, m);
        }
    }
}

#[test]
fn a_large_directory_is_split_and_one_new_name_stores_few_blobs() {
    let (dict, v) = setup();
    v.change("mkdir", |s, r| tree::mkdir(s, r, &p("/big"), 0o755))
        .unwrap();
    let empty_file = tree::file_entry(&v.store, &b""[..], 0o644, small()).unwrap();
    let names: crate::object::Dir = (0..20_000)
        .map(|i| (format!("file-{i:06}").into_bytes(), empty_file.clone()))
        .collect();
    v.change("fill", |s, r| tree::insert_many(s, r, &p("/big"), names.clone()))
        .unwrap();
    let root = v.root().unwrap();
    let Some(e) = tree::lookup(&v.store, root, &p("/big")).unwrap() else {
        panic!()
    };
    let Content::Dir { tree: big } = e.content else {
        panic!()
    };
    let blob = v.store.get(&big).unwrap();
    assert_eq!(
        blob[0],
        crate::object::Tag::DirIndex as u8,
        "a 20,000-entry directory is an index"
    );
    assert!(blob.len() < 64 * 1024, "the index is small: {} bytes", blob.len());
    assert_eq!(tree::list(&v.store, root, &p("/big")).unwrap(), names);
    // A fresh client (empty cache) adds one name.
    let fresh = Volume::new(
        BlobStore::new(dict.clone() as Arc<dyn Dict>, "t:", 1 << 20),
        "vol",
    );
    let before = dict.keys().len();
    write(&fresh, "/big/new-name", b"x").unwrap();
    let added = dict.keys().len() - before;
    // The new file's chunk and manifest, the changed part, the index, the root
    // directory and the commit.
    assert!(added <= 8, "adding one name stored {added} blobs");
    assert_eq!(read(&fresh, "/big/new-name").unwrap(), b"x");
    assert_eq!(
        tree::list(&fresh.store, fresh.root().unwrap(), &p("/big"))
            .unwrap()
            .len(),
        20_001
    );
}

#[test]
fn split_directories_do_not_depend_on_history() {
    let store = BlobStore::new(Arc::new(MemoryDict::new()), "h:", 1 << 20);
    let e = tree::file_entry(&store, &b"x"[..], 0o644, small()).unwrap();
    let all: crate::object::Dir = (0..5000)
        .map(|i| (format!("n{i}").into_bytes(), e.clone()))
        .collect();
    let mut partial = all.clone();
    partial.remove(b"n77".as_slice());
    let one = store.put_dir(&all).unwrap();
    let mut grown = store.dir(&store.put_dir(&partial).unwrap()).unwrap();
    grown.insert(b"n77".to_vec(), e.clone());
    assert_eq!(store.put_dir(&grown).unwrap(), one);
}

/// An encrypted volume cuts large directories by a keyed rule: where the
/// parts end differs from the public rule and from another key's, and still
/// depends only on the names present.
#[test]
fn an_encrypted_volume_cuts_large_directories_by_a_keyed_rule() {
    use crate::codec::{Codec, Keys};
    let keyed = |master: &[u8]| {
        BlobStore::new(Arc::new(MemoryDict::new()), "h:", 1 << 20).with_codec(Codec::Encrypted(Box::new(
            Keys::from_master(master, crate::codec::Format::Deterministic),
        )))
    };
    let plain = BlobStore::new(Arc::new(MemoryDict::new()), "h:", 1 << 20);
    let e = tree::file_entry(&plain, &b"x"[..], 0o644, small()).unwrap();
    let all: crate::object::Dir = (0..5000)
        .map(|i| (format!("n{i}").into_bytes(), e.clone()))
        .collect();
    // The first name of every part.
    let cuts = |s: &BlobStore| -> Vec<Vec<u8>> {
        let h = s.put_dir(&all).unwrap();
        assert_eq!(s.dir(&h).unwrap(), all);
        let parts = s.dir_parts(&h).unwrap();
        assert!(parts.len() > 5, "{} parts", parts.len());
        parts
            .iter()
            .filter_map(|p| s.dir(p).ok()?.keys().next().cloned())
            .collect()
    };
    let (a, b) = (keyed(b"key a"), keyed(b"key b"));
    assert_ne!(cuts(&plain), cuts(&a));
    assert_ne!(cuts(&a), cuts(&b));
    let mut partial = all.clone();
    partial.remove(b"n77".as_slice());
    let mut grown = a.dir(&a.put_dir(&partial).unwrap()).unwrap();
    grown.insert(b"n77".to_vec(), e.clone());
    assert_eq!(a.put_dir(&grown).unwrap(), a.put_dir(&all).unwrap());
}

#[test]
fn diff_reads_only_what_changed() {
    let (dict, v) = setup();
    v.change("mkdir", |s, r| tree::mkdir(s, r, &p("/a"), 0o755))
        .unwrap();
    let names: crate::object::Dir = (0..3000)
        .map(|i| {
            (
                format!("f{i}").into_bytes(),
                tree::file_entry(&v.store, format!("{i}").as_bytes(), 0o644, small()).unwrap(),
            )
        })
        .collect();
    v.change("fill", |s, r| tree::insert_many(s, r, &p("/a"), names.clone()))
        .unwrap();
    let before = v.root().unwrap();
    write(&v, "/a/f17", b"changed").unwrap();
    let after = v.root().unwrap();
    // A client with an empty cache counts its reads.
    let counting = Arc::new(Hooked::new(dict.clone()));
    let store = BlobStore::new(counting.clone(), "t:", 1 << 20);
    let changes = crate::history::diff(&store, before, after).unwrap();
    assert_eq!(changes, vec![crate::history::Change::Modified("/a/f17".into())]);
    let gets = counting.gets.load(std::sync::atomic::Ordering::Relaxed);
    assert!(gets <= 12, "diff read {gets} blobs");
}

type Hook = Box<dyn FnOnce() + Send>;

/// A dict that counts reads and runs a hook once at a chosen moment, for
/// tests of races: just before the next INCR (the collector opening a
/// deletion window), before the next lease, or just after the next read of a key ending in a given
/// suffix (a reader that got its answer and then lost the processor).
pub(crate) struct Hooked {
    inner: Arc<MemoryDict>,
    pub gets: std::sync::atomic::AtomicUsize,
    pub before_incr: parking_lot::Mutex<Option<Hook>>,
    pub after_get: parking_lot::Mutex<Option<(String, Hook)>>,
    /// Runs before the next lease (a writer about to store new blobs).
    pub before_lease: parking_lot::Mutex<Option<Hook>>,
    /// Leases taken (round trips to the lease key).
    pub leases: std::sync::atomic::AtomicUsize,
    /// Calls that are round trips to a Redis-speaking store (a pipeline of
    /// puts is one; a compare-and-swap is two: WATCH with GET, then EXEC).
    pub round_trips: std::sync::atomic::AtomicUsize,
    /// Writes of file chunks still to refuse as a full store would (each
    /// refused write counts one down; other blobs pass): uploads that fail at
    /// chosen points, the background ones and their retries alike, while the
    /// commit's own small blobs and the root swap go through, as when only
    /// the node holding the chunks is full or away.
    pub refuse_puts: std::sync::atomic::AtomicUsize,
}

impl Hooked {
    pub fn new(inner: Arc<MemoryDict>) -> Hooked {
        Hooked {
            inner,
            gets: Default::default(),
            before_incr: Default::default(),
            after_get: Default::default(),
            before_lease: Default::default(),
            leases: Default::default(),
            round_trips: Default::default(),
            refuse_puts: Default::default(),
        }
    }
}

impl Hooked {
    fn trip(&self, n: usize) {
        self.round_trips
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }

    fn put_refusable(&self, key: &str, value: Bytes) -> crate::dict::DictResult<()> {
        use std::sync::atomic::Ordering::SeqCst;
        let chunk = value.first() == Some(&(crate::object::Tag::Chunk as u8));
        if chunk
            && self
                .refuse_puts
                .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1))
                .is_ok()
        {
            return Err(crate::dict::DictError::Full(
                "OOM command not allowed (test)".into(),
            ));
        }
        self.inner.put_if_absent(key, value)
    }
}

impl Dict for Hooked {
    fn get(&self, key: &str) -> crate::dict::DictResult<Option<Bytes>> {
        self.trip(1);
        self.gets.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let value = self.inner.get(key);
        let hook = {
            let mut armed = self.after_get.lock();
            match armed.take() {
                Some((suffix, hook)) if key.ends_with(&suffix) => Some(hook),
                other => {
                    *armed = other;
                    None
                }
            }
        };
        if let Some(hook) = hook {
            hook();
        }
        value
    }
    fn put_if_absent(&self, key: &str, value: Bytes) -> crate::dict::DictResult<()> {
        self.trip(1);
        self.put_refusable(key, value)
    }
    fn put_many_if_absent(&self, items: Vec<(String, Bytes)>) -> crate::dict::DictResult<()> {
        self.trip(1);
        items.into_iter().try_for_each(|(k, v)| self.put_refusable(&k, v))
    }
    fn delete(&self, key: &str) -> crate::dict::DictResult<()> {
        self.trip(1);
        self.inner.delete(key)
    }
    fn contains(&self, key: &str) -> crate::dict::DictResult<bool> {
        self.trip(1);
        self.inner.contains(key)
    }
    fn compare_and_swap(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        new: &[u8],
    ) -> crate::dict::DictResult<bool> {
        self.trip(2);
        self.inner.compare_and_swap(key, expected, new)
    }
    fn scan_prefix(
        &self,
        prefix: &str,
        each: &mut dyn FnMut(Vec<String>) -> crate::dict::DictResult<()>,
    ) -> crate::dict::DictResult<()> {
        self.inner.scan_prefix(prefix, each)
    }
    fn sizes(&self, keys: &[String]) -> crate::dict::DictResult<Vec<Option<u64>>> {
        self.inner.sizes(keys)
    }
    fn append(&self, key: &str, value: &[u8]) -> crate::dict::DictResult<()> {
        self.trip(1);
        self.inner.append(key, value)
    }
    fn incr(&self, key: &str) -> crate::dict::DictResult<u64> {
        let hook = self.before_incr.lock().take();
        if let Some(hook) = hook {
            hook();
        }
        self.inner.incr(key)
    }
    fn put_expiring(
        &self,
        key: &str,
        value: &[u8],
        ttl: std::time::Duration,
        nx: bool,
    ) -> crate::dict::DictResult<bool> {
        self.trip(1);
        self.inner.put_expiring(key, value, ttl, nx)
    }
    fn read_and_append(
        &self,
        counter: &str,
        log: &str,
        record: &[u8],
        ttl: std::time::Duration,
    ) -> crate::dict::DictResult<u64> {
        self.trip(1);
        self.leases.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let hook = self.before_lease.lock().take();
        if let Some(hook) = hook {
            hook();
        }
        self.inner.read_and_append(counter, log, record, ttl)
    }
}
