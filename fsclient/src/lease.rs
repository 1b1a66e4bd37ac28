//! The writer's half of garbage collection: before a client uploads a blob, or
//! relies on one that is already stored, it records the blob's hash in a lease
//! that the collector reads, and it reads the collector's epoch in the same
//! atomic step. docs/FORMAT.md, "Garbage collection", argues why this is enough.
//!
//! Invariant kept here: a blob hash passed to [`Leases::protect`] is leased at a
//! moment when no deletion window was open (the epoch read with it was even).
//! Any window that opens later reads the lease first and spares the blob; a
//! window that was open is waited out and the lease taken again.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::dict::{Dict, DictResult};
use crate::object::Hash;

/// How long a lease protects what it names: far longer than any client takes
/// from an upload to the commit that references it (a mount commits every
/// second, a command line write when it finishes).
pub const LEASE_TTL: Duration = Duration::from_secs(2 * 3600);
/// How long a writer waits on an open window before checking whether the
/// collector that opened it is still alive.
const STALE_AFTER: Duration = Duration::from_secs(5);
/// How often a waiting writer looks at the epoch: the collector pauses at
/// least 10 ms between windows.
const POLL: Duration = Duration::from_millis(2);
/// Records remembered as leased in the current generation (37 bytes each).
const REMEMBERED: usize = 100_000;

/// What a lease record asks the collector to keep.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The blob itself.
    Blob = 0,
    /// The blob and everything reachable from it (a directory or file that a
    /// client puts back into a tree without uploading it, e.g. by `restore`).
    Tree = 1,
}

/// A lease record: the kind, then the 32-byte hash.
pub const RECORD: usize = 33;

pub fn record(kind: Kind, h: &Hash, out: &mut Vec<u8>) {
    out.push(kind as u8);
    out.extend_from_slice(&h.0);
}

/// What a lease key holds once every lease in it was released: one byte, not
/// a deleted key (a key's absence tells the collector that its name may leave
/// the registry). Leases taken later are appended after it, so a value may
/// start with it; no record does (a record starts with its [`Kind`], 0 or 1).
pub const EMPTY: u8 = b'-';

/// Splits a lease key's value into its records (a torn tail is ignored).
pub fn records(raw: &[u8]) -> impl Iterator<Item = (Kind, Hash)> + '_ {
    // Records appended after the empty mark start one byte in: read from the
    // mark's end, or every hash would be read one byte out of step.
    let raw = raw.strip_prefix(&[EMPTY]).unwrap_or(raw);
    raw.chunks_exact(RECORD).map(|r| {
        let kind = if r[0] == Kind::Tree as u8 {
            Kind::Tree
        } else {
            Kind::Blob
        };
        (kind, Hash(r[1..].try_into().expect("32 bytes")))
    })
}

/// The keys of the protocol, all under the `{gc}` hash tag so that the epoch
/// and every lease live in one cluster slot (one atomic transaction).
#[derive(Clone, Debug)]
pub struct Keys {
    pub epoch: String,
    pub lock: String,
    /// Every lease key starts with this.
    pub leases: String,
    /// The names of the lease keys, one per line, each added before its key is
    /// first used, so the collector finds every lease without a SCAN.
    pub registry: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Keys {
        Keys {
            epoch: format!("{prefix}{{gc}}:epoch"),
            lock: format!("{prefix}{{gc}}:lock"),
            leases: format!("{prefix}{{gc}}:lease:"),
            registry: format!("{prefix}{{gc}}:leases"),
        }
    }
}

/// One client's leases: one key per process, listed once in the registry.
///
/// Lifecycle: a hash is leased before its blob is uploaded or relied on; a
/// commit first [`Leases::seal`]s the leases taken so far (all of them are for
/// content the commit will reference, or for garbage), and after its root
/// swap [`Leases::release`]s them: the blobs are reachable from a root now,
/// which the collector reads after the leases. Leases taken meanwhile (files
/// being written during the commit) stay for the next commit. A client that
/// dies leaves its lease until it expires.
pub struct Leases {
    keys: Keys,
    key: String,
    /// The epoch seen by the last lease (`u64::MAX`: none yet).
    seen: AtomicU64,
    /// Held shared while leasing, exclusively while rewriting the key on
    /// release, so that no append is lost to a rewrite.
    held: parking_lot::RwLock<()>,
    /// What the key holds: (generation, record) in the order appended.
    records: parking_lot::Mutex<Vec<(u64, [u8; RECORD])>>,
    generation: AtomicU64,
    /// Records leased in the current generation outside a deletion window
    /// (up to [`REMEMBERED`]): leasing one again would change nothing, as
    /// both are released by the same commit. Cleared by [`Leases::seal`].
    /// (A commit of many new empty files stores one manifest for all.)
    leased_now: parking_lot::Mutex<HashSet<[u8; RECORD]>>,
    /// When this client last added its key to the registry.
    registered: parking_lot::Mutex<Option<Instant>>,
}

impl Leases {
    pub fn new(prefix: &str) -> Leases {
        let keys = Keys::new(prefix);
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        let client = format!(
            "{}:{}:{:08x}",
            host.trim(),
            std::process::id(),
            rand::random::<u32>()
        );
        Leases {
            key: format!("{}{client}", keys.leases),
            keys,
            seen: AtomicU64::new(u64::MAX),
            held: Default::default(),
            records: Default::default(),
            generation: AtomicU64::new(0),
            leased_now: Default::default(),
            registered: Default::default(),
        }
    }

    /// Leases `records` (see [`record`]); returns once they are leased outside
    /// any deletion window. The answer says whether the collector has run since
    /// the previous call: if so, blobs this client remembers as stored may be
    /// gone, and it must not skip uploading them on that memory.
    pub fn protect(&self, dict: &dyn Dict, records: &[u8]) -> DictResult<bool> {
        // The collector drops a name from the registry once its key is absent
        // (expired: two hours without a write); naming the key again every
        // hour, before the append, keeps it listed whenever it holds anything.
        // The key is made to exist (or to live two more hours) first: a
        // collector that reads the name then finds the key, where one that
        // tidied between a name and its key's first write dropped the name,
        // and with it every lease this client took in the next hour.
        let mut registered = self.registered.lock();
        if registered.is_none_or(|at| at.elapsed() > LEASE_TTL / 2) {
            dict.read_and_append(&self.keys.epoch, &self.key, &[], LEASE_TTL)?;
            dict.append(&self.keys.registry, format!("{}\n", self.key).as_bytes())?;
            *registered = Some(Instant::now());
        }
        drop(registered);
        let started = Instant::now();
        loop {
            let held = self.held.read();
            let generation = self.generation.load(Ordering::SeqCst);
            let fresh: Vec<[u8; RECORD]> = {
                let now = self.leased_now.lock();
                records
                    .chunks_exact(RECORD)
                    .map(|r| r.try_into().expect("record size"))
                    .filter(|r| !now.contains(r))
                    .collect()
            };
            if fresh.is_empty() {
                return Ok(false);
            }
            let epoch = dict.read_and_append(&self.keys.epoch, &self.key, fresh.as_flattened(), LEASE_TTL)?;
            self.records.lock().extend(fresh.iter().map(|r| (generation, *r)));
            if epoch % 2 == 0 {
                let mut now = self.leased_now.lock();
                if now.len() + fresh.len() <= REMEMBERED {
                    now.extend(fresh);
                }
            }
            drop(held);
            if epoch % 2 == 0 {
                let before = self.seen.swap(epoch, Ordering::SeqCst);
                // (The first lease also answers true: what was cached before it
                // is of unknown age.)
                return Ok(before != epoch);
            }
            // A deletion window is open. It is short, unless its collector died
            // (its lock then expires): close the window for it.
            if started.elapsed() > STALE_AFTER && !dict.contains(&self.keys.lock)? {
                let odd = epoch.to_string();
                let even = (epoch + 1).to_string();
                if dict.compare_and_swap(&self.keys.epoch, Some(odd.as_bytes()), even.as_bytes())? {
                    tracing::warn!("closed the deletion window of a garbage collector that stopped");
                }
            }
            // Wait for the window to close, watching the epoch alone (cheap),
            // then lease again.
            while started.elapsed() <= STALE_AFTER || dict.contains(&self.keys.lock)? {
                std::thread::sleep(POLL);
                let now = dict.get(&self.keys.epoch)?;
                if now.as_deref() != Some(epoch.to_string().as_bytes()) {
                    break;
                }
            }
        }
    }

    /// Starts a commit: the leases taken so far belong to it. Returns what to
    /// pass to [`Leases::release`] once the commit's root swap succeeded.
    pub fn seal(&self) -> u64 {
        let _exclusive = self.held.write();
        self.leased_now.lock().clear();
        self.generation.fetch_add(1, Ordering::SeqCst)
    }

    /// Drops the leases sealed by `generation` and earlier.
    pub fn release(&self, dict: &dyn Dict, generation: u64) -> DictResult<()> {
        let _exclusive = self.held.write();
        let mut records = self.records.lock();
        let before = records.len();
        records.retain(|(g, _)| *g > generation);
        if records.len() == before {
            return Ok(());
        }
        let mut rest: Vec<u8> = records.iter().flat_map(|(_, r)| r.iter().copied()).collect();
        if rest.is_empty() {
            rest.push(EMPTY);
        }
        dict.put_expiring(&self.key, &rest, LEASE_TTL, false).map(|_| ())
    }
}
