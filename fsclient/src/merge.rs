//! Three-way merge of directory trees, at entry granularity.
//!
//! Used when a commit loses the root swap: `base` is the tree both sides started
//! from, `ours` what this client made of it, `theirs` what is in the store now.
//!
//! Invariant: **nothing either side wrote is lost, and nothing is duplicated
//! that did not diverge.** Changes to different names merge cleanly; the same
//! directory changed on both sides is merged recursively; a file whose
//! *content* both sides changed differently keeps theirs under the name and
//! ours under a conflict name (`name.conflict-<writer>-<time>`), and so does a
//! file one side deleted and the other changed (the change is kept). Where
//! only one side changed the content, or both made the same content (a rename
//! touches only the ctime), there is one file: the content change, or the
//! entry with the later ctime.
//!
//! Renames are recognised across the whole tree ([`align_renames`]): a file
//! both sides moved away from the same place, each to a new name, stays one
//! file under *our* new name. Ours is the commit that lands last (the merge
//! runs because theirs is already in), so the rule is "the last commit's name
//! wins", the same whichever client merges.

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

/// Both sides changed a name's entry, to entries that are not a real
/// conflict: the same content with different metadata (each renamed or
/// touched it: keep the later ctime, theirs on a tie), or a content change on
/// one side against a metadata change on the other (keep the content change).
fn same_file<'a>(
    base: Option<&Entry>,
    ours: Option<&'a Entry>,
    theirs: Option<&'a Entry>,
) -> Option<&'a Entry> {
    let (o, t) = (ours?, theirs?);
    if matches!(o.content, Content::Dir { .. }) || matches!(t.content, Content::Dir { .. }) {
        return None;
    }
    if o.content == t.content {
        return Some(if o.meta.ctime > t.meta.ctime { o } else { t });
    }
    let base = base?;
    if o.content == base.content {
        Some(t)
    } else if t.content == base.content {
        Some(o)
    } else {
        None
    }
}

/// What a rename keeps of an entry: everything but its ctime.
fn same_identity(a: &Entry, b: &Entry) -> bool {
    a.content == b.content
        && a.meta.mode == b.meta.mode
        && a.meta.uid == b.meta.uid
        && a.meta.gid == b.meta.gid
        && a.meta.mtime == b.meta.mtime
        && a.meta.xattrs == b.meta.xattrs
}

type Path = Vec<Vec<u8>>;

/// The entries removed from and added to `from` to make `to`, by path,
/// descending only into subtrees that differ (so a merge costs what changed,
/// not the volume's size). A directory that appears or disappears is listed
/// itself and with everything below it.
fn diff(
    store: &BlobStore,
    from: Option<Hash>,
    to: Option<Hash>,
    path: &mut Path,
    removed: &mut Vec<(Path, Entry)>,
    added: &mut Vec<(Path, Entry)>,
) -> FsResult<()> {
    if from == to {
        return Ok(());
    }
    let (a, b) = (dir_of(store, from)?, dir_of(store, to)?);
    let names: std::collections::BTreeSet<&Vec<u8>> = a.keys().chain(b.keys()).collect();
    for name in names {
        let (ea, eb) = (a.get(name), b.get(name));
        if ea == eb || ea.zip(eb).is_some_and(|(x, y)| x.same_but_atime(y)) {
            continue;
        }
        path.push(name.clone());
        if let Some(e) = ea {
            removed.push((path.clone(), e.clone()));
        }
        if let Some(e) = eb {
            added.push((path.clone(), e.clone()));
        }
        let (ta, tb) = (tree_of(ea), tree_of(eb));
        if ta.is_some() || tb.is_some() {
            diff(store, ta, tb, path, removed, added)?;
        }
        path.pop();
    }
    Ok(())
}

/// Recognises what both sides renamed, so the per-name merge does not keep a
/// copy under each side's new name: an entry gone from its base place on both
/// sides, and new with the same identity (content, mode, owner, mtime and
/// xattrs) at one place in ours and another in theirs. Returns (ours, theirs)
/// with each such entry under one name on both sides, so the merge sees them
/// agree: our new name where theirs has nothing there (ours wins: it is the
/// commit that lands last), else theirs where ours has nothing there. Where
/// both places are taken on both sides, the pair is returned for
/// [`drop_rename_copies`] to clean up after the merge.
///
/// A new file of theirs that only looks like the moved one (same content and
/// mtime to the nanosecond) would be taken for it.
pub fn align_renames(store: &BlobStore, base: Option<Hash>, ours: Hash, theirs: Hash) -> FsResult<Aligned> {
    if base.is_none() || base == Some(ours) || base == Some(theirs) || ours == theirs {
        return Ok(Aligned {
            ours,
            theirs,
            crossed: Vec::new(),
        });
    }
    let (mut ours_removed, mut ours_added) = (Vec::new(), Vec::new());
    let (mut theirs_removed, mut theirs_added) = (Vec::new(), Vec::new());
    diff(
        store,
        base,
        Some(ours),
        &mut Vec::new(),
        &mut ours_removed,
        &mut ours_added,
    )?;
    diff(
        store,
        base,
        Some(theirs),
        &mut Vec::new(),
        &mut theirs_removed,
        &mut theirs_added,
    )?;
    // Moved away on both sides: removed from the same path in both.
    let gone: Vec<&(Path, Entry)> = ours_removed
        .iter()
        .filter(|(p, e)| theirs_removed.iter().any(|(q, f)| p == q && e == f))
        .collect();
    let mut used_ours = vec![false; ours_added.len()];
    let mut used_theirs = vec![false; theirs_added.len()];
    let (mut ours, mut theirs) = (ours, theirs);
    let mut crossed = Vec::new();
    for (_, old) in gone {
        let Some(o) = (0..ours_added.len()).find(|&i| !used_ours[i] && same_identity(&ours_added[i].1, old))
        else {
            continue;
        };
        let Some(t) = (0..theirs_added.len()).find(|&i| {
            !used_theirs[i] && same_identity(&theirs_added[i].1, old) && theirs_added[i].0 != ours_added[o].0
        }) else {
            continue;
        };
        used_ours[o] = true;
        used_theirs[t] = true;
        let (our_name, their_name) = (&ours_added[o].0, &theirs_added[t].0);
        if let Some(moved) = move_into_free_place(store, theirs, their_name, our_name)? {
            tracing::info!(
                "both sides renamed {}: kept our name {}, not {}",
                show_path(&ours_removed.iter().find(|(_, e)| e == old).expect("gone").0),
                show_path(our_name),
                show_path(their_name)
            );
            theirs = moved;
        } else if let Some(moved) = move_into_free_place(store, ours, our_name, their_name)? {
            tracing::info!(
                "both sides renamed an entry: kept their name {} (ours, {}, is taken on their side)",
                show_path(their_name),
                show_path(our_name)
            );
            ours = moved;
        } else {
            crossed.push((our_name.clone(), their_name.clone(), old.clone()));
        }
    }
    Ok(Aligned {
        ours,
        theirs,
        crossed,
    })
}

/// What [`align_renames`] made of the two sides.
pub struct Aligned {
    pub ours: Hash,
    pub theirs: Hash,
    /// Entries both sides renamed to names taken on the other side: (our
    /// name, their name, the entry).
    pub crossed: Vec<(Path, Path, Entry)>,
}

/// After the merge of crossed renames (see [`Aligned::crossed`]): the entry
/// is then at a plain name and at a conflict name (each side's copy lost its
/// name to the other side's file there). Keeps the copy at a plain name
/// (ours first) and removes the others; the files that took the names stay.
pub fn drop_rename_copies(
    store: &BlobStore,
    mut merged: Hash,
    crossed: &[(Path, Path, Entry)],
) -> FsResult<Hash> {
    for (our_name, their_name, entry) in crossed {
        let mut copies: Vec<Path> = Vec::new();
        for name in [our_name, their_name] {
            let (parent, last) = name.split_at(name.len() - 1);
            let listing = match crate::tree::list(store, merged, parent) {
                Ok(d) => d,
                Err(_) => continue,
            };
            let conflict_prefix = [&last[0][..], b".conflict-"].concat();
            for (n, e) in &listing {
                if (*n == last[0] || n.starts_with(&conflict_prefix)) && same_identity(e, entry) {
                    let mut path = parent.to_vec();
                    path.push(n.clone());
                    if !copies.contains(&path) {
                        copies.push(path);
                    }
                }
            }
        }
        let keep = copies
            .iter()
            .position(|c| c == our_name)
            .or_else(|| copies.iter().position(|c| c == their_name))
            .unwrap_or(0);
        for (i, copy) in copies.iter().enumerate() {
            if i != keep {
                tracing::info!(
                    "both sides renamed the same entry: dropped the copy at {}",
                    show_path(copy)
                );
                merged = crate::tree::remove_all(store, merged, copy)?;
            }
        }
    }
    Ok(merged)
}

/// `root` with `from` renamed to `to`, creating `to`'s missing parents, if
/// nothing is at `to` (a rename would replace it); `None` if it cannot be.
fn move_into_free_place(store: &BlobStore, root: Hash, from: &Path, to: &Path) -> FsResult<Option<Hash>> {
    if crate::tree::lookup(store, root, to).ok().flatten().is_some() {
        return Ok(None);
    }
    let mut with_parents = root;
    for depth in 1..to.len() {
        match crate::tree::lookup(store, with_parents, &to[..depth]) {
            Ok(Some(_)) => {}
            Err(crate::tree::FsError::NotFound) => {
                with_parents = crate::tree::mkdir(store, with_parents, &to[..depth], 0o755)?
            }
            _ => return Ok(None),
        }
    }
    Ok(crate::tree::rename(store, with_parents, from, to).ok())
}

fn show_path(p: &Path) -> String {
    let names: Vec<String> = p
        .iter()
        .map(|n| String::from_utf8_lossy(n).into_owned())
        .collect();
    format!("/{}", names.join("/"))
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
        } else if oe.is_none() && be.zip(te).is_some_and(|(b, t)| same_identity(b, t))
            || te.is_none() && be.zip(oe).is_some_and(|(b, o)| same_identity(b, o))
        {
            // Deleted on one side, only its ctime changed on the other (renamed
            // away and back): the deletion stands.
            None
        } else if let Some(one) = same_file(be, oe, te) {
            Some(one.clone())
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
        if let Some(mut e) = chosen {
            // The last access either side saw (reads are not changes: they
            // never make a conflict, and are not lost to one).
            let latest = [oe, te].into_iter().flatten().filter_map(|x| x.meta.atime).max();
            e.meta.atime = e.meta.atime.max(latest);
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
