//! A volume: a named root pointer and its history of commits.
//!
//! A change is a function from the current root tree to a new one. [`Volume::change`]
//! applies it, stores the new commit, and swaps the root pointer from the commit
//! it started from. If another client swapped first, it merges (three-way, see
//! [`crate::merge`]) with what is there now and tries again, backing off with
//! jitter. A change either lands, merged with everything committed before it,
//! or returns an error; it is never silently dropped.

use std::time::Duration;

use crate::links::{self, Tree};
use crate::object::{self, Commit, Hash, Time};
use crate::store::{BlobStore, StoreError};
use crate::tree::{self, Chunking, FsError, FsResult};
use crate::volume_key::Lock;

/// The key holding a volume's settings: `<prefix>v:<volume>:config`.
pub fn config_key(prefix: &str, volume: &str) -> String {
    format!("{prefix}v:{volume}:config")
}

pub struct Volume {
    pub store: BlobStore,
    pub name: String,
    /// Who this client is, recorded in commits and conflict names.
    pub writer: String,
}

/// Attempts before a change gives up (each conflict is merged and retried).
const MAX_ATTEMPTS: u32 = 50;

impl Volume {
    pub fn new(store: BlobStore, name: &str) -> Volume {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        Volume {
            store,
            name: name.to_string(),
            writer: format!("{}:{}", host.trim(), std::process::id()),
        }
    }

    /// Creates the volume with an empty root directory. Fails if it exists.
    pub fn create(&self) -> FsResult<Hash> {
        self.create_with(Chunking::default())
    }

    /// The key holding the volume's settings (chosen at creation).
    pub fn config_key(&self) -> String {
        config_key(self.store.prefix(), &self.name)
    }

    /// Creates the volume, cutting its files with `chunking`.
    pub fn create_with(&self, chunking: Chunking) -> FsResult<Hash> {
        self.create_encrypted(chunking, None)
    }

    /// Creates the volume; with `lock`, an encrypted one (the store must be
    /// sealing with the lock's keys: [`BlobStore::with_codec`]).
    pub fn create_encrypted(&self, chunking: Chunking, lock: Option<&Lock>) -> FsResult<Hash> {
        assert_eq!(
            lock.is_some(),
            self.store.codec().is_encrypted(),
            "the store seals as the volume says"
        );
        let chunking = chunking
            .validate()
            .map_err(|e| FsError::Io(std::io::Error::new(std::io::ErrorKind::InvalidInput, e)))?;
        // Not a guard (the root swap below is), but it spares an existing
        // volume a new config and the store a stray empty directory.
        if self.store.root(&self.name)?.is_some() {
            return Err(FsError::Exists);
        }
        {
            // Written before the root: a volume never exists without it. A
            // leftover from a failed mkfs of the same name is replaced.
            let (dict, key) = (self.store.dict(), self.config_key());
            let set = || -> Result<bool, crate::dict::DictError> {
                let current = dict.get(&key)?;
                let mut config = chunking.to_config();
                if let Some(lock) = lock {
                    config = format!("{config} {}", lock.to_config());
                }
                dict.compare_and_swap(&key, current.as_deref(), config.as_bytes())
            };
            set().map_err(crate::store::StoreError::from)?;
        }
        let root = tree::empty_dir(&self.store)?;
        let commit = self.store.put(object::encode_commit(&Commit {
            root,
            parent: None,
            time: Time::now(),
            writer: self.writer.clone(),
            message: "mkfs".into(),
            inodes: None,
            root_meta: None,
        }))?;
        self.store.flush_writes()?;
        let sealed = self.store.seal_leases();
        let created = self.store.swap_root(&self.name, None, commit)?;
        // Either way the lease has done its work: the blobs are in a root, or garbage.
        self.store.release_leases(sealed)?;
        if !created {
            return Err(FsError::Exists);
        }
        Ok(commit)
    }

    /// How the volume's files are cut into chunks (its config, else the default).
    pub fn chunking(&self) -> FsResult<Chunking> {
        match self
            .store
            .dict()
            .get(&self.config_key())
            .map_err(crate::store::StoreError::from)?
        {
            None => Ok(Chunking::default()),
            Some(text) => Chunking::from_config(&String::from_utf8_lossy(&text))
                .map_err(|e| FsError::Io(std::io::Error::new(std::io::ErrorKind::InvalidData, e))),
        }
    }

    /// The current commit's hash and content.
    pub fn head(&self) -> FsResult<(Hash, Commit)> {
        let h = self
            .store
            .root(&self.name)?
            .ok_or_else(|| StoreError::NoVolume(self.name.clone()))?;
        Ok((h, self.store.commit(&h)?))
    }

    /// The current root directory.
    pub fn root(&self) -> FsResult<Hash> {
        Ok(self.head()?.1.root)
    }

    /// Applies `op` to the current tree and commits the result.
    pub fn change(
        &self,
        message: &str,
        op: impl FnOnce(&BlobStore, Hash) -> FsResult<Hash>,
    ) -> FsResult<Hash> {
        let (base_hash, base) = self.head()?;
        let root = op(&self.store, base.root)?;
        // A change by path may have removed names of hard-linked files.
        let mut inodes = links::load(&self.store, base.inodes)?;
        links::fix_counts(&self.store, root, &mut inodes)?;
        let ours = Tree {
            root,
            inodes: links::store(&self.store, &inodes)?,
            // A change by path leaves the root's own metadata as it was.
            root_meta: base.root_meta.clone(),
        };
        // Everything this change leased is in `ours` (or garbage). Its
        // blobs are leased as the uploader sends them: stored first, so that
        // their leases are sealed here and released by this commit (a
        // command-line process makes no later commit to release them).
        self.store.flush_writes()?;
        let sealed = self.store.seal_leases();
        Ok(self.commit_tree(base_hash, base.tree(), ours, message, sealed)?.0)
    }

    /// Commits the tree `ours`, made from the commit `base_hash` (whose tree is
    /// `base`): swaps the root pointer from `base_hash`, and if another
    /// client swapped first, merges with theirs and tries again. Returns the
    /// commit that landed and its tree (`ours`, or the merge of it).
    ///
    /// `sealed` is what [`BlobStore::seal_leases`] answered before anything in
    /// `ours` was made: once the root names `ours`, those leases are released.
    pub fn commit_tree(
        &self,
        mut base_hash: Hash,
        mut base: Tree,
        mut ours: Tree,
        message: &str,
        sealed: u64,
    ) -> FsResult<(Hash, Tree)> {
        for attempt in 0..MAX_ATTEMPTS {
            if ours == base {
                // Nothing to swap, but what was handed over is stored when
                // this returns (an fsync relies on it).
                self.store.flush_writes()?;
                self.store.release_leases(sealed)?;
                return Ok((base_hash, base));
            }
            let commit = self.store.put(object::encode_commit(&Commit {
                root: ours.root,
                parent: Some(base_hash),
                time: Time::now(),
                writer: self.writer.clone(),
                message: message.to_string(),
                inodes: ours.inodes,
                root_meta: ours.root_meta.clone(),
            }))?;
            if self.store.swap_root(&self.name, Some(base_hash), commit)? {
                self.store.release_leases(sealed)?;
                return Ok((commit, ours));
            }
            // Someone committed first. Pause (growing, with jitter, so clients
            // that collided spread out), then merge with the newest head and
            // swap at once: a pause between reading the head and swapping would
            // let the others move it again meanwhile, and a steady stream of
            // their commits could starve this one.
            let backoff = 1u64 << attempt.min(6);
            let jitter = rand::random::<u64>() % (backoff * 1000);
            std::thread::sleep(Duration::from_micros(backoff * 500 + jitter));
            let (theirs_hash, theirs) = self.head()?;
            ours = links::merge_trees(&self.store, Some(base), ours, theirs.tree(), &self.writer)?;
            base_hash = theirs_hash;
            base = theirs.tree();
        }
        Err(FsError::Io(std::io::Error::other(
            "could not commit: the volume root kept changing (too many concurrent writers)",
        )))
    }

    /// Commits from the head back to the first, newest first.
    pub fn log(&self, limit: usize) -> FsResult<Vec<(Hash, Commit)>> {
        let (mut h, mut c) = self.head()?;
        let mut out = Vec::new();
        loop {
            let parent = c.parent;
            out.push((h, c));
            match parent {
                Some(p) if out.len() < limit => {
                    h = p;
                    c = self.store.commit(&p)?;
                }
                _ => return Ok(out),
            }
        }
    }
}
