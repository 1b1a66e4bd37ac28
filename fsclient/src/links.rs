//! Hard links: a file with more than one name lives in the commit's inode
//! table (tag 6, id -> entry and link count); each of its names is a directory
//! entry `Content::Inode { id }` with all-zero metadata.
//!
//! Invariants, kept at every commit:
//! - every `Inode { id }` entry in the tree has `id` in the table;
//! - a table entry's link count is the number of such entries in the tree,
//!   and entries whose count would be zero are not in the table;
//! - a table entry is never a directory or another inode reference.
//!
//! The vfs keeps counts as it links and unlinks; after a merge (where both
//! sides' names are combined entry by entry) or a command-line change the
//! counts are recomputed by walking the tree ([`fix_counts`]), which only
//! happens when the table is not empty.

use std::collections::BTreeMap;

use crate::object::{self, Content, Entry, Hash, Inodes, Meta, Time};
use crate::store::BlobStore;
use crate::tree::FsResult;

pub use crate::object::Tree;

/// The root's metadata after a merge: a side's change if only one side
/// changed it, else the later change (by ctime; ours on a tie).
fn merge_root_meta(base: Option<&Meta>, ours: Option<Meta>, theirs: Option<Meta>) -> Option<Meta> {
    if ours == theirs || ours.as_ref() == base {
        return theirs;
    }
    if theirs.as_ref() == base {
        return ours;
    }
    match (ours, theirs) {
        (Some(o), Some(t)) => Some(if t.ctime > o.ctime { t } else { o }),
        (o, t) => o.or(t),
    }
}

pub fn load(store: &BlobStore, h: Option<Hash>) -> FsResult<Inodes> {
    match h {
        None => Ok(Inodes::new()),
        Some(h) => {
            let blob = store.get(&h)?;
            Ok(
                object::decode_inodes(&blob).map_err(|error| crate::store::StoreError::Malformed {
                    key: store.blob_key(&h),
                    error,
                })?,
            )
        }
    }
}

/// Stores a table; an empty one is no table.
pub fn store(store: &BlobStore, inodes: &Inodes) -> FsResult<Option<Hash>> {
    if inodes.is_empty() {
        return Ok(None);
    }
    Ok(Some(store.put(object::encode_inodes(inodes))?))
}

/// The entry a name stands for: its own, or its inode's.
pub fn resolve(inodes: &Inodes, e: Entry) -> Entry {
    match e.content {
        Content::Inode { id } => match inodes.get(&id) {
            Some((entry, _)) => entry.clone(),
            None => {
                tracing::error!("a name refers to inode {id}, which is not in the inode table");
                Entry {
                    meta: Meta::default(),
                    content: Content::Fifo,
                }
            }
        },
        _ => e,
    }
}

/// How many names each inode has in the tree under `root`.
pub fn count(store: &BlobStore, root: Hash) -> FsResult<BTreeMap<u64, u32>> {
    let mut counts = BTreeMap::new();
    let mut todo = vec![root];
    while let Some(dir) = todo.pop() {
        for e in store.dir(&dir)?.into_values() {
            match e.content {
                Content::Dir { tree } => todo.push(tree),
                Content::Inode { id } => *counts.entry(id).or_insert(0) += 1,
                _ => {}
            }
        }
    }
    Ok(counts)
}

/// Sets every link count from the tree, dropping inodes with no name left.
pub fn fix_counts(store: &BlobStore, root: Hash, inodes: &mut Inodes) -> FsResult<()> {
    if inodes.is_empty() {
        return Ok(());
    }
    let counts = count(store, root)?;
    inodes.retain(|id, (_, nlink)| match counts.get(id) {
        Some(&n) => {
            *nlink = n;
            true
        }
        None => false,
    });
    Ok(())
}

/// Three-way merge of inode tables, by inode. An inode changed on both sides
/// keeps theirs; ours is returned to be kept as a plain file under a
/// conflict name (nothing either side wrote is lost).
pub fn merge(base: &Inodes, ours: &Inodes, theirs: &Inodes) -> (Inodes, Vec<(u64, Entry)>) {
    let mut out = Inodes::new();
    let mut conflicts = Vec::new();
    let ids: std::collections::BTreeSet<u64> = base
        .keys()
        .chain(ours.keys())
        .chain(theirs.keys())
        .copied()
        .collect();
    let entry = |t: &Inodes, id| t.get(&id).map(|(e, _)| e.clone());
    for id in ids {
        let (b, o, t) = (entry(base, id), entry(ours, id), entry(theirs, id));
        let chosen = if o == t || b == o {
            t
        } else if b == t {
            o
        } else {
            match (o, t) {
                (Some(o), Some(t)) => {
                    conflicts.push((id, o));
                    Some(t)
                }
                // Deleted on one side, changed on the other: keep the change.
                (o, t) => o.or(t),
            }
        };
        if let Some(e) = chosen {
            // Counts are recomputed from the merged tree.
            out.insert(id, (e, 0));
        }
    }
    (out, conflicts)
}

/// Merges two commits' trees (see [`crate::merge`]) and their inode tables.
pub fn merge_trees(
    store: &BlobStore,
    base: Option<Tree>,
    ours: Tree,
    theirs: Tree,
    writer: &str,
) -> FsResult<Tree> {
    let base_root = base.as_ref().map(|b| b.root);
    let root_meta = merge_root_meta(
        base.as_ref().and_then(|b| b.root_meta.as_ref()),
        ours.root_meta.clone(),
        theirs.root_meta.clone(),
    );
    let aligned = crate::merge::align_renames(store, base_root, ours.root, theirs.root)?;
    let mut root = crate::merge::merge(store, base_root, aligned.ours, aligned.theirs, writer)?;
    root = crate::merge::drop_rename_copies(store, root, &aligned.crossed)?;
    if ours.inodes.is_none() && theirs.inodes.is_none() {
        return Ok(Tree {
            root,
            inodes: None,
            root_meta,
        });
    }
    let (mut inodes, conflicts) = merge(
        &load(store, base.as_ref().and_then(|b| b.inodes))?,
        &load(store, ours.inodes)?,
        &load(store, theirs.inodes)?,
    );
    if !conflicts.is_empty() {
        // Our version of a file both sides changed, as a plain file at the top.
        let mut dir = store.dir(&root)?;
        let secs = Time::now().secs;
        for (id, e) in conflicts {
            let name = format!("inode-{id}.conflict-{}-{secs}", writer.replace(['/', ':'], "_"));
            tracing::warn!("conflict on a hard-linked file (inode {id}): ours saved as '/{name}'");
            dir.insert(name.into_bytes(), e);
        }
        root = store.put_dir(&dir)?;
    }
    fix_counts(store, root, &mut inodes)?;
    Ok(Tree {
        root,
        inodes: self::store(store, &inodes)?,
        root_meta,
    })
}

/// An entry with every hard link in it (itself, or below it if a directory)
/// turned into a plain entry: for copying a version's entry into another
/// version whose inode table is different.
pub fn detach(store: &BlobStore, inodes: &Inodes, e: Entry) -> FsResult<Entry> {
    let mut e = resolve(inodes, e);
    if inodes.is_empty() {
        return Ok(e);
    }
    if let Content::Dir { tree } = e.content {
        let mut dir = store.dir(&tree)?;
        for child in dir.values_mut() {
            *child = detach(store, inodes, child.clone())?;
        }
        e.content = Content::Dir {
            tree: store.put_dir(&dir)?,
        };
    }
    Ok(e)
}
