//! The engine's file-system operations that decide what survives power loss:
//! creating, syncing, renaming and removing files, and syncing the directory.
//!
//! In production ([`OsFiles`]) they are the system calls. Tests use
//! [`CrashFiles`], which does the same and also models what a power cut would
//! leave: a file's content is what it held at its last sync, and a file
//! created, renamed or removed counts only once its directory has been synced
//! since (until then the creation or rename is undone and the removed file is
//! back, with its last synced content). [`CrashFiles::cut_power`] turns the
//! directory into that image, so a test can reopen the store on it and check
//! what an acknowledged write promised. The model is the pessimistic one
//! POSIX allows (ext4 with `data=writeback`, say): unsynced bytes and
//! directory entries are all lost, never half-kept.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

use parking_lot::Mutex;

/// The operations whose durability the engine depends on. Reads, writes and
/// truncation go to the `File` itself: they matter only once synced.
pub trait Files: Send + Sync + 'static {
    /// Creates a new, empty file for reading and writing (fails if it exists).
    fn create_new(&self, path: &Path) -> io::Result<File>;
    /// Makes the file's data (and the metadata needed to read it) durable.
    fn sync(&self, path: &Path, file: &File) -> io::Result<()>;
    /// Makes the directory's entries (creations, renames, removals) durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    fn remove(&self, path: &Path) -> io::Result<()>;
}

/// The real thing.
pub struct OsFiles;

impl Files for OsFiles {
    fn create_new(&self, path: &Path) -> io::Result<File> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
    }

    fn sync(&self, _path: &Path, file: &File) -> io::Result<()> {
        file.sync_data()
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }
}

/// What power loss would leave of one path.
#[derive(Clone, Debug)]
struct Durable {
    /// The content a power cut leaves under this name: `None` if no file.
    content: Option<Vec<u8>>,
    /// The file now under the name, if its name is not yet durable (created
    /// or renamed here since the last directory sync), and what it last synced.
    pending: Option<Option<Vec<u8>>>,
}

/// [`OsFiles`] that also keeps, per path, what would survive a power cut.
/// Paths it never saw are taken as durable as they are.
#[derive(Default)]
pub struct CrashFiles {
    paths: Mutex<BTreeMap<PathBuf, Durable>>,
    /// Set by [`CrashFiles::power_off`]: from then on nothing more becomes
    /// durable (the store may go on writing until it is dropped).
    off: std::sync::atomic::AtomicBool,
    /// A broken engine on purpose: syncs of files are not made (and so not
    /// recorded), to show that the power-cut checks catch it.
    skip_file_syncs: bool,
}

impl CrashFiles {
    /// A model whose file syncs do nothing: an engine with its sync removed.
    pub fn skipping_file_syncs() -> CrashFiles {
        CrashFiles {
            skip_file_syncs: true,
            ..Default::default()
        }
    }

    fn entry<'a>(paths: &'a mut BTreeMap<PathBuf, Durable>, path: &Path) -> &'a mut Durable {
        paths.entry(path.to_path_buf()).or_insert_with(|| Durable {
            // First seen now: whatever is there is taken as durable.
            content: std::fs::read(path).ok(),
            pending: None,
        })
    }

    /// The moment of the power cut: nothing done from now on becomes durable.
    /// Drop the store afterwards, then call [`CrashFiles::cut_power`].
    pub fn power_off(&self) {
        self.off.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    fn is_off(&self) -> bool {
        self.off.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Turns the directory into what a power cut at [`CrashFiles::power_off`]
    /// (or now, if it was not called) would leave. Call with the store
    /// dropped (nothing may write after).
    pub fn cut_power(&self) -> io::Result<()> {
        let paths = std::mem::take(&mut *self.paths.lock());
        for (path, d) in paths {
            match d.content {
                Some(bytes) => std::fs::write(&path, bytes)?,
                None => match std::fs::remove_file(&path) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                },
            }
        }
        Ok(())
    }

    /// The image of the directory as a power cut now would leave it, without
    /// changing anything (path -> content), for tests that compare.
    pub fn image(&self) -> BTreeMap<PathBuf, Option<Vec<u8>>> {
        self.paths
            .lock()
            .iter()
            .map(|(p, d)| (p.clone(), d.content.clone()))
            .collect()
    }
}

impl Files for CrashFiles {
    fn create_new(&self, path: &Path) -> io::Result<File> {
        let mut paths = self.paths.lock();
        let d = Self::entry(&mut paths, path);
        let file = OsFiles.create_new(path)?;
        // A new name: a cut before the directory is synced leaves no file
        // here (or the one that was durably here before).
        d.pending = Some(None);
        Ok(file)
    }

    fn sync(&self, path: &Path, file: &File) -> io::Result<()> {
        if self.skip_file_syncs {
            return Ok(());
        }
        let mut paths = self.paths.lock();
        OsFiles.sync(path, file)?;
        if self.is_off() {
            return Ok(());
        }
        let now = std::fs::read(path)?;
        let d = Self::entry(&mut paths, path);
        match &mut d.pending {
            Some(synced) => *synced = Some(now),
            None => d.content = Some(now),
        }
        Ok(())
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut paths = self.paths.lock();
        OsFiles.sync_dir(dir)?;
        if self.is_off() {
            return Ok(());
        }
        for (path, d) in paths.iter_mut() {
            if path.parent() != Some(dir) {
                continue;
            }
            if let Some(synced) = d.pending.take() {
                // The name is durable now; its content is what it last synced
                // (a file never synced is there, empty).
                d.content = Some(synced.unwrap_or_default());
            } else if !path.exists() {
                // A durable removal.
                d.content = None;
            }
        }
        Ok(())
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut paths = self.paths.lock();
        // Both first seen before the rename, so what they durably were is known.
        Self::entry(&mut paths, to);
        let moved = Self::entry(&mut paths, from).clone();
        OsFiles.rename(from, to)?;
        // What `from` holds in the durable image stays until a directory sync;
        // `to` gets the file, pending, with what it last synced.
        let synced = moved.pending.clone().unwrap_or(moved.content.clone());
        let target = Self::entry(&mut paths, to);
        target.pending = Some(synced);
        let source = Self::entry(&mut paths, from);
        source.pending = None;
        Ok(())
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        let mut paths = self.paths.lock();
        let d = Self::entry(&mut paths, path);
        OsFiles.remove(path)?;
        // Until the directory is synced the durable image keeps the file (a
        // file created and removed without a sync in between was never there).
        d.pending = None;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn the_model_keeps_only_what_was_synced() {
        let dir = tempfile::tempdir().unwrap();
        let files = CrashFiles::default();
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        // Created and synced, but its name never synced: gone.
        let mut f = files.create_new(&a).unwrap();
        f.write_all(b"one").unwrap();
        files.sync(&a, &f).unwrap();
        assert_eq!(files.image()[&a], None);
        // The directory synced: there, with what was synced, not what came after.
        files.sync_dir(dir.path()).unwrap();
        f.write_all(b" two").unwrap();
        assert_eq!(files.image()[&a].as_deref(), Some(&b"one"[..]));
        // Renamed without a directory sync: still under the old name.
        files.rename(&a, &b).unwrap();
        assert_eq!(files.image()[&a].as_deref(), Some(&b"one"[..]));
        assert_eq!(files.image()[&b], None);
        files.sync_dir(dir.path()).unwrap();
        assert_eq!(files.image()[&a], None);
        assert_eq!(files.image()[&b].as_deref(), Some(&b"one"[..]));
        // Removed without a directory sync: back after the cut.
        files.remove(&b).unwrap();
        files.cut_power().unwrap();
        assert_eq!(std::fs::read(&b).unwrap(), b"one");
        assert!(!a.exists());
    }
}
