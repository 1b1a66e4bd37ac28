//! Three-way merge of directory trees, at entry granularity.
//!
//! Used when a commit loses the root swap: `base` is the tree both sides started
//! from, `ours` what this client made of it, `theirs` what is in the store now.
//!
//! Invariant: **nothing either side wrote is lost.** Changes to different names
//! merge cleanly; the same directory changed on both sides is merged
//! recursively; anything else changed on both sides keeps theirs under the name
//! and ours under a conflict name (`name.conflict-<writer>-<time>`), including a
//! file one side deleted and the other changed (the change is kept).

use crate::object::{Content, Dir, Entry, Hash, Time};
use crate::store::BlobStore;
use crate::tree::FsResult;

fn dir_of(store: &BlobStore, h: Option<Hash>) -> FsResult<Dir> {
    match h {
        Some(h) => Ok(store.dir(&h)?),
        None => Ok(Dir::new()),
    }
}

fn tree_of(e: Option<&Entry>) -> Option<Hash> {
    match e.map(|e| &e.content) {
        Some(Content::Dir { tree }) => Some(*tree),
        _ => None,
    }
}

/// A name for our side of a conflict that is not taken in `dir`.
fn conflict_name(dir: &Dir, name: &[u8], writer: &str, time: Time) -> Vec<u8> {
    let safe: String = writer
        .chars()
        .map(|c| if c.is_alphanumeric() { c } else { '_' })
        .collect();
    let mut n = 0;
    loop {
        let mut candidate = name.to_vec();
        candidate.extend_from_slice(format!(".conflict-{safe}-{}", time.secs).as_bytes());
        if n > 0 {
            candidate.extend_from_slice(format!("-{n}").as_bytes());
        }
        if !dir.contains_key(&candidate) {
            return candidate;
        }
        n += 1;
    }
}

/// Merges directory trees; returns the merged tree's hash.
pub fn merge(
    store: &BlobStore,
    base: Option<Hash>,
    ours: Hash,
    theirs: Hash,
    writer: &str,
) -> FsResult<Hash> {
    if ours == theirs || base == Some(ours) {
        return Ok(theirs);
    }
    if base == Some(theirs) {
        return Ok(ours);
    }
    let b = dir_of(store, base)?;
    let o = dir_of(store, Some(ours))?;
    let t = dir_of(store, Some(theirs))?;
    let mut out = Dir::new();
    let mut conflicts = Vec::new();
    let names: std::collections::BTreeSet<&Vec<u8>> = b.keys().chain(o.keys()).chain(t.keys()).collect();
    for name in names {
        let (be, oe, te) = (b.get(name), o.get(name), t.get(name));
        let chosen = if oe == te || be == oe {
            te.cloned()
        } else if be == te {
            oe.cloned()
        } else if let (Some(od), Some(td)) = (tree_of(oe), tree_of(te)) {
            // A directory changed on both sides: merge inside it.
            let merged = merge(store, tree_of(be), od, td, writer)?;
            let mut e = oe.cloned().expect("ours is a directory");
            e.content = Content::Dir { tree: merged };
            Some(e)
        } else {
            match (oe, te) {
                // One side deleted, the other changed: keep the change.
                (None, Some(t)) => Some(t.clone()),
                (Some(o), None) => Some(o.clone()),
                (Some(o), Some(t)) => {
                    conflicts.push((name.clone(), o.clone()));
                    Some(t.clone())
                }
                (None, None) => None,
            }
        };
        if let Some(e) = chosen {
            out.insert(name.clone(), e);
        }
    }
    let now = Time::now();
    for (name, ours) in conflicts {
        let n = conflict_name(&out, &name, writer, now);
        tracing::warn!(
            "conflict on '{}': kept theirs, ours saved as '{}'",
            String::from_utf8_lossy(&name),
            String::from_utf8_lossy(&n)
        );
        out.insert(n, ours);
    }
    Ok(store.put_dir(&out)?)
}
