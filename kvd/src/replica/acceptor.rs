//! The acceptor half of per-key CASPaxos, kept in the node's storage engine.
//!
//! Every key of a replicated node is stored as an acceptor *record*: the
//! ballot of the value accepted last and that value (or its absence: a deleted
//! key is a record too, a tombstone, or a stale replica's older value could
//! come back). The record is one value in the storage engine, so the ballot
//! and the value it names are written together, atomically and durably as
//! `--appendfsync` says.
//!
//! Promises are kept in memory, above a durable *floor*: this node promises only
//! ballots whose counter is below the limit recorded in `<dir>/paxos-floor`, and
//! raises that limit (written and synced first) when a higher ballot comes. After
//! a restart every ballot below the recorded limit is refused, for every key, so a
//! promise forgotten in the crash can never be broken.
//!
//! Invariant: an accepted record is in the log (written, and fsynced with
//! `--appendfsync always`) before the stripe lock is released, and every phase
//! reads under that lock, so no answer ever names a record a crash can undo.
//!
//! Record encoding: `0xAD | accepted counter u64 | accepted proposer u64 |
//! present u8 | expiry ms u64 (0: none) | base counter u64 | base proposer
//! u64 | value`; records written before the base was kept start `0xAC` and
//! lack the two base fields (both are read). A record locked by a
//! transaction over several keys ([`Lock`], [`super::txn`]) starts `0xAE`
//! and has, between the base and the value, `status key length u32 |
//! status key | locked at ms u64`. The storage engine's own
//! expiry is not used (an expired key keeps its ballot until it is overwritten).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use bytes::{BufMut, Bytes, BytesMut};
use parking_lot::Mutex;

use crate::cluster::paxos::Ballot;
use crate::cluster::slot::{key_slot, SLOTS};
use crate::db::Db;
use crate::store::{Entry, StoreError, Update};

/// A record without its base (written before the base was kept).
const MAGIC_NO_BASE: u8 = 0xAC;
const MAGIC: u8 = 0xAD;
/// A record with its base and a transaction's lock.
const MAGIC_LOCKED: u8 = 0xAE;
/// The bytes every record starts with: enough for its [`Head`].
const HEADER: usize = 1 + 8 + 8 + 1 + 8;
/// The header of a record with its base.
const HEADER_WITH_BASE: usize = HEADER + 8 + 8;
/// How far the durable floor is raised at a time (one fsync per this many ballots).
const FLOOR_STEP: u64 = 1 << 20;
/// Lock stripes serializing prepare and accept per key.
const STRIPES: usize = 1024;
/// Promises kept per stripe; past that they are folded into the stripe's floor.
const STRIPE_PROMISES: usize = 1024;

/// What an acceptor holds for a key: the accepted ballot and value.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Record {
    pub accepted: Ballot,
    pub entry: Option<Entry>,
    /// The ballot of the record this value was made from: the one a round
    /// found highest and ran its command on (for a copy, the copied record's).
    /// A proposer whose write fell short learns from it whether a later
    /// record was built on its write ([`super::proposer`]'s settling round).
    /// `None`: not known (a record from before bases were kept).
    pub base: Option<Ballot>,
    /// The transaction that holds this key, if one does: until its status
    /// is decided, the entry is the value before it ([`super::txn`]).
    pub lock: Option<Lock>,
}

/// A transaction's hold on a key: which status key decides it, and when it
/// took the key (a transaction undecided long after that may be aborted by
/// anyone who meets its lock).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lock {
    pub status: Bytes,
    pub since_ms: u64,
}

impl Record {
    /// A record of `entry` accepted at `accepted`, made from the record at `base`.
    pub fn new(accepted: Ballot, entry: Option<Entry>, base: Option<Ballot>) -> Record {
        Record {
            accepted,
            entry,
            base,
            lock: None,
        }
    }

    /// This record with `lock` as its lock.
    pub fn locked(mut self, lock: Option<Lock>) -> Record {
        self.lock = lock;
        self
    }

    pub fn encode(&self) -> Bytes {
        let value = self.entry.as_ref().map(|e| &e.value[..]).unwrap_or_default();
        let lock_len = self.lock.as_ref().map_or(0, |l| 4 + l.status.len() + 8);
        let mut b = BytesMut::with_capacity(HEADER_WITH_BASE + lock_len + value.len());
        // A lock needs the base's place: a locked record always has one.
        let base = match (&self.lock, self.base) {
            (Some(_), base) => Some(base.unwrap_or_default()),
            (None, base) => base,
        };
        b.put_u8(match (&self.lock, base) {
            (Some(_), _) => MAGIC_LOCKED,
            (None, Some(_)) => MAGIC,
            (None, None) => MAGIC_NO_BASE,
        });
        b.put_u64_le(self.accepted.counter);
        b.put_u64_le(self.accepted.proposer);
        b.put_u8(self.entry.is_some() as u8);
        b.put_u64_le(self.entry.as_ref().and_then(|e| e.expires_at).unwrap_or(0));
        if let Some(base) = base {
            b.put_u64_le(base.counter);
            b.put_u64_le(base.proposer);
        }
        if let Some(lock) = &self.lock {
            b.put_u32_le(lock.status.len() as u32);
            b.put_slice(&lock.status);
            b.put_u64_le(lock.since_ms);
        }
        b.put_slice(value);
        b.freeze()
    }

    /// A stored record; `None` for bytes that are not one (a value written
    /// before the node was replicated).
    pub fn decode(raw: &Bytes) -> Option<Record> {
        let head = Record::decode_head(raw)?;
        let u64_at = |at: usize| u64::from_le_bytes(raw[at..at + 8].try_into().expect("8 bytes"));
        let (base, mut header) = match raw[0] {
            MAGIC | MAGIC_LOCKED if raw.len() >= HEADER_WITH_BASE => (
                Some(Ballot {
                    counter: u64_at(HEADER),
                    proposer: u64_at(HEADER + 8),
                }),
                HEADER_WITH_BASE,
            ),
            MAGIC | MAGIC_LOCKED => return None,
            _ => (None, HEADER),
        };
        let mut lock = None;
        if raw[0] == MAGIC_LOCKED {
            let len_end = header.checked_add(4).filter(|&e| e <= raw.len())?;
            let len = u32::from_le_bytes(raw[header..len_end].try_into().expect("4 bytes")) as usize;
            let status_end = len_end.checked_add(len).filter(|&e| e + 8 <= raw.len())?;
            lock = Some(Lock {
                status: raw.slice(len_end..status_end),
                since_ms: u64_at(status_end),
            });
            header = status_end + 8;
        }
        let entry = head.present.then(|| Entry {
            value: raw.slice(header..),
            expires_at: head.expires_at,
        });
        Some(Record {
            accepted: head.accepted,
            entry,
            base,
            lock,
        })
    }

    /// The header of a stored record (the bytes before its value): enough
    /// to compare replicas without their values.
    pub fn decode_head(raw: &[u8]) -> Option<Head> {
        if raw.len() < HEADER || ![MAGIC, MAGIC_NO_BASE, MAGIC_LOCKED].contains(&raw[0]) {
            return None;
        }
        let u64_at = |at: usize| u64::from_le_bytes(raw[at..at + 8].try_into().expect("8 bytes"));
        Some(Head {
            accepted: Ballot {
                counter: u64_at(1),
                proposer: u64_at(9),
            },
            present: raw[17] == 1,
            expires_at: Some(u64_at(18)).filter(|&t| t != 0),
            locked: raw[0] == MAGIC_LOCKED,
        })
    }

    /// The bytes [`Record::encode`] stores for it.
    pub fn stored_len(&self) -> usize {
        let header = if self.base.is_some() || self.lock.is_some() {
            HEADER_WITH_BASE
        } else {
            HEADER
        };
        let lock = self.lock.as_ref().map_or(0, |l| 4 + l.status.len() + 8);
        header + lock + self.entry.as_ref().map_or(0, |e| e.value.len())
    }

    /// The entry as a reader sees it at `now`: expired is absent.
    pub fn live(&self, now: u64) -> Option<&Entry> {
        self.entry
            .as_ref()
            .filter(|e| e.expires_at.is_none_or(|t| t > now))
    }
}

/// A record without its value ([`Record::decode_head`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Head {
    pub accepted: Ballot,
    pub present: bool,
    pub expires_at: Option<u64>,
    /// A transaction holds the key (its value may be about to change).
    pub locked: bool,
}

impl Head {
    /// Whether a reader at `now` sees a key: present and not expired.
    pub fn live(&self, now: u64) -> bool {
        self.present && self.expires_at.is_none_or(|t| t > now)
    }
}

pub struct Acceptor {
    floor_path: PathBuf,
    /// Ballots with a counter below this may be promised without touching disk.
    limit: AtomicU64,
    /// Below this, nothing is promised or accepted (the limit before the last start).
    floor: u64,
    promises: Vec<Mutex<Stripe>>,
    /// Per slot, the XOR of [`record_hash`] over every record held: replicas
    /// of a slot whose digests are equal hold the same records (but for a
    /// 2^-64 chance), so anti-entropy does not compare their keys one by one
    /// ([`super::repair`]). Kept by every change of a record, under its key's
    /// stripe lock; counted from the stored records once at start
    /// ([`Acceptor::count_stored`]).
    digests: Vec<AtomicU64>,
    /// Per slot, the records held and their stored bytes (headers and values),
    /// kept beside the digests: what a change of membership has left to copy
    /// ([`Acceptor::held`]).
    sizes: Vec<(AtomicI64, AtomicI64)>,
}

/// A record's share of its slot's digest: the first 8 bytes of SHA-256 over
/// the key and the ballot (a ballot names one value, so the pair names the
/// record).
fn record_hash(key: &[u8], b: Ballot) -> u64 {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(key);
    h.update(b.counter.to_le_bytes());
    h.update(b.proposer.to_le_bytes());
    let out = h.finalize();
    u64::from_le_bytes(out[..8].try_into().expect("32 bytes"))
}

/// The promises of the keys of one lock stripe.
#[derive(Default)]
struct Stripe {
    promises: HashMap<Bytes, Ballot>,
    /// Every key of the stripe counts as promised this much: promises dropped
    /// to bound memory are folded in here, so none is ever broken (at worst a
    /// proposer of another key is refused once and tries a higher ballot).
    floor: Ballot,
}

impl Stripe {
    fn promised(&self, key: &Bytes) -> Ballot {
        self.promises
            .get(key)
            .copied()
            .unwrap_or_default()
            .max(self.floor)
    }

    fn promise(&mut self, key: &Bytes, b: Ballot) {
        if self.promises.len() >= STRIPE_PROMISES && !self.promises.contains_key(key) {
            let highest = self.promises.drain().map(|(_, b)| b).max().unwrap_or_default();
            self.floor = self.floor.max(highest);
        }
        self.promises.insert(key.clone(), b);
    }
}

impl Acceptor {
    /// Opens the acceptor of `dir`: everything below the recorded limit is refused.
    pub fn open(dir: &std::path::Path) -> std::io::Result<Acceptor> {
        let floor_path = dir.join("paxos-floor");
        let floor = match std::fs::read_to_string(&floor_path) {
            Ok(s) => s.trim().parse().unwrap_or(0),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(e),
        };
        Ok(Acceptor {
            floor_path,
            limit: AtomicU64::new(floor),
            floor,
            promises: (0..STRIPES).map(|_| Mutex::new(Stripe::default())).collect(),
            digests: (0..SLOTS).map(|_| AtomicU64::new(0)).collect(),
            sizes: (0..SLOTS)
                .map(|_| (AtomicI64::new(0), AtomicI64::new(0)))
                .collect(),
        })
    }

    /// Counts the record of `key` at `b`, `bytes` long as stored, into
    /// (`sign` 1) or out of (-1) its slot's digest and size; no record (the
    /// default ballot) counts nothing. (The digest is an XOR: in and out are
    /// the same step for it.)
    fn count(&self, key: &[u8], b: Ballot, bytes: usize, sign: i64) {
        if b != Ballot::default() {
            let slot = key_slot(key) as usize;
            self.digests[slot].fetch_xor(record_hash(key, b), Ordering::Relaxed);
            let (records, total) = &self.sizes[slot];
            records.fetch_add(sign, Ordering::Relaxed);
            total.fetch_add(sign * bytes as i64, Ordering::Relaxed);
        }
    }

    /// The records held in `slots`, and their stored bytes.
    pub fn held(&self, slots: impl IntoIterator<Item = u16>) -> (u64, u64) {
        slots.into_iter().fold((0, 0), |(n, b), s| {
            let (records, total) = &self.sizes[s as usize];
            (
                n + records.load(Ordering::Relaxed).max(0) as u64,
                b + total.load(Ordering::Relaxed).max(0) as u64,
            )
        })
    }

    /// Every slot's digest, as the records held now give it.
    pub fn digests(&self) -> Vec<u64> {
        self.digests.iter().map(|d| d.load(Ordering::Relaxed)).collect()
    }

    /// Counts the records `db` holds into the digests: once, at start, before
    /// anything is served (a change counted twice would undo itself).
    pub fn count_stored(&self, db: &Db) {
        let mut cursor = 0;
        let mut batch = Vec::new();
        loop {
            batch.clear();
            cursor = db.store().scan(cursor, 4096, &mut batch);
            // A scan's entries carry no value on the disk engine: read each
            // record's header.
            for (key, _) in &batch {
                if let Some(head) = self
                    .head(db, key)
                    .ok()
                    .flatten()
                    .and_then(|h| Record::decode_head(&h))
                {
                    let bytes = db.store().value_len(key).unwrap_or(HEADER);
                    self.count(key, head.accepted, bytes, 1);
                }
            }
            if cursor == 0 {
                return;
            }
        }
    }

    /// The lowest counter this acceptor takes at all (proposers start above it).
    pub fn floor(&self) -> u64 {
        self.floor
    }

    fn stripe(&self, key: &Bytes) -> &Mutex<Stripe> {
        &self.promises[crate::cluster::ring::fnv1a(key) as usize % STRIPES]
    }

    /// Makes sure promising `b` survives a crash: raises the durable limit first.
    fn cover(&self, b: Ballot) -> std::io::Result<()> {
        if b.counter < self.limit.load(Ordering::SeqCst) {
            return Ok(());
        }
        let new = b.counter + FLOOR_STEP;
        crate::durable::replace(&self.floor_path, format!("{new}\n").as_bytes())?;
        self.limit.fetch_max(new, Ordering::SeqCst);
        Ok(())
    }

    fn read(db: &Db, key: &Bytes) -> Result<Record, StoreError> {
        Ok(db
            .store()
            .get(key)?
            .and_then(|e| Record::decode(&e.value))
            .unwrap_or_default())
    }

    /// Stores `record` for `key`, with the durable floor raised past `covers`
    /// first. Called with the key's stripe lock held, and the record is in the
    /// log before it returns: the storage engine buffers writes until a flush,
    /// and an acceptor that reported a value and then lost it in a crash
    /// (SIGKILL loses the buffer) would break Paxos. The stripe lock is held
    /// until then, and every phase takes it.
    fn write(
        &self,
        db: &Db,
        key: &Bytes,
        old: &Record,
        record: &Record,
        covers: Ballot,
    ) -> Result<(), StoreError> {
        self.cover(covers)
            .map_err(|e| StoreError::Write(format!("recording a ballot: {e}")))?;
        let raw = record.encode();
        db.store().update(key, false, &mut |_| {
            Update::Put(Entry {
                value: raw.clone(),
                expires_at: None,
            })
        })?;
        self.count(key, old.accepted, old.stored_len(), -1);
        self.count(key, record.accepted, raw.len(), 1);
        db.store().flush()
    }

    /// The stored header of `key`'s record (`None`: no record), read without
    /// the value and without the stripe lock: for comparing replicas, which
    /// read the whole record when they differ.
    pub fn head(&self, db: &Db, key: &Bytes) -> Result<Option<Bytes>, StoreError> {
        db.store().value_prefix(key, HEADER)
    }

    /// Whether this node holds `key` as a live key at `now`. A deleted key
    /// keeps a tombstone record (its ballot orders later rounds) and an
    /// expired one keeps its record, so a stored record is not a key; the
    /// header says which (read without the value: the disk engine's scan
    /// leaves values out). Bytes that are not a record (written before the
    /// node was replicated) are a key.
    pub fn holds_live(&self, db: &Db, key: &Bytes, now: u64) -> bool {
        match self.head(db, key) {
            Ok(Some(raw)) => Record::decode_head(&raw).is_none_or(|h| h.live(now)),
            _ => false,
        }
    }

    /// What this node has accepted for `key` (a read that promises nothing).
    pub fn query(&self, db: &Db, key: &Bytes) -> Result<Record, StoreError> {
        let _stripe = self.stripe(key).lock();
        Self::read(db, key)
    }

    /// Phase 1: promise `b` unless a ballot ≥ `b` was promised (or `b` is under
    /// the floor); answers the accepted record. `Err(Ok(ballot))` is the ballot
    /// that beat `b`.
    pub fn prepare(&self, db: &Db, key: &Bytes, b: Ballot) -> Result<Record, Result<Ballot, StoreError>> {
        let floor = Ballot {
            counter: self.floor,
            proposer: 0,
        };
        let mut stripe = self.stripe(key).lock();
        let promised = stripe.promised(key).max(floor);
        let record = Self::read(db, key).map_err(Err)?;
        // The same prepare again (its reply was lost): the same answer.
        if b == stripe.promised(key) && b > record.accepted && b.counter >= self.floor {
            return Ok(record);
        }
        let promised = promised.max(record.accepted);
        if b <= promised {
            return Err(Ok(promised));
        }
        self.cover(b)
            .map_err(|e| Err(StoreError::Write(format!("recording a ballot: {e}"))))?;
        stripe.promise(key, b);
        Ok(record)
    }

    /// Phase 2: accept `record` at its ballot unless a higher ballot was
    /// promised. With `next`, the same proposer's next ballot is promised at
    /// once (the CASPaxos paper's one-round-trip optimization: its next
    /// change to the key skips phase 1 unless someone else prepared in between).
    pub fn accept(
        &self,
        db: &Db,
        key: &Bytes,
        record: Record,
        next: Option<Ballot>,
    ) -> Result<(), Result<Ballot, StoreError>> {
        let b = record.accepted;
        let floor = Ballot {
            counter: self.floor,
            proposer: 0,
        };
        let mut stripe = self.stripe(key).lock();
        let current = Self::read(db, key).map_err(Err)?;
        if b == current.accepted && b.counter >= self.floor {
            // The same accept again (its reply was lost): a ballot names one value.
            return Ok(());
        }
        let promised = stripe.promised(key).max(floor);
        if b < promised {
            return Err(Ok(promised));
        }
        if b < current.accepted {
            return Err(Ok(current.accepted));
        }
        let next = next.filter(|n| *n > b);
        self.write(db, key, &current, &record, next.unwrap_or(b))
            .map_err(Err)?;
        match next {
            Some(n) => stripe.promise(key, n),
            // The promise is now implied by the accepted ballot.
            None => {
                stripe.promises.remove(key);
            }
        }
        Ok(())
    }
}

impl Acceptor {
    /// A reconfiguration's copy of `record` (at a later membership version's
    /// install ballot, above every ballot of this one): taken unless this
    /// acceptor already holds the key at or above that ballot (a repeated
    /// copy) or promised a higher one.
    pub fn install(&self, db: &Db, key: &Bytes, record: Record) -> Result<(), Result<Ballot, StoreError>> {
        let mut stripe = self.stripe(key).lock();
        let current = Self::read(db, key).map_err(Err)?;
        if current.accepted >= record.accepted {
            return Ok(());
        }
        let promised = stripe.promised(key);
        if promised > record.accepted {
            return Err(Ok(promised));
        }
        let accepted = record.accepted;
        self.write(db, key, &current, &record, accepted).map_err(Err)?;
        if stripe.promised(key) <= accepted {
            stripe.promises.remove(key);
        }
        Ok(())
    }

    /// Purges a dead record: deletes this node's copy of `key` if it is still
    /// exactly `dead` (a tombstone, or a value long expired, at that ballot),
    /// and promises `dead`'s ballot for the key, so no older accept can land
    /// on the empty place later (a delayed or relayed one): with the record
    /// gone, that promise is what keeps an older value from coming back. The
    /// promise is in memory; after a restart the durable floor covers it
    /// (it was raised past `dead`'s ballot when that was accepted). Whether
    /// it purged. See [`super::repair`] for when this is safe.
    pub fn purge(&self, db: &Db, key: &Bytes, dead: &Record) -> Result<bool, StoreError> {
        let mut stripe = self.stripe(key).lock();
        if Self::read(db, key)? != *dead {
            return Ok(false);
        }
        if stripe.promised(key) < dead.accepted {
            stripe.promise(key, dead.accepted);
        }
        db.store().update(key, false, &mut |_| Update::Remove)?;
        self.count(key, dead.accepted, dead.stored_len(), -1);
        db.store().flush()?;
        Ok(true)
    }

    /// Deletes this node's copy of `key` if its record was made at membership
    /// `version` or before (not by a reconfiguration to a later version that
    /// makes this node a holder again); whether it did.
    pub fn forget(&self, db: &Db, key: &Bytes, version: u64) -> Result<bool, StoreError> {
        let mut stripe = self.stripe(key).lock();
        let Some(raw) = db.store().get(key)? else {
            return Ok(false);
        };
        let head = Record::decode_head(&raw.value);
        if head.is_some_and(|h| super::layout::epoch(h.accepted) > version) {
            return Ok(false);
        }
        db.store().update(key, false, &mut |_| Update::Remove)?;
        if let Some(h) = head {
            self.count(key, h.accepted, raw.value.len(), -1);
        }
        stripe.promises.remove(key);
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(counter: u64, proposer: u64) -> Ballot {
        Ballot { counter, proposer }
    }

    /// The digests kept change by change equal the digests counted afresh
    /// from the stored records, through accepts, repeats, installs, purges
    /// and forgets of keys sharing slots; and two acceptors that took the
    /// same records in another order agree.
    #[test]
    fn slot_digests_follow_every_change_of_a_record() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::new(std::sync::Arc::new(crate::store::MemStore::new()));
        let a = Acceptor::open(dir.path()).unwrap();
        let entry = |v: &'static [u8]| {
            Some(Entry {
                value: Bytes::from_static(v),
                expires_at: None,
            })
        };
        let keys: Vec<Bytes> = (0..40)
            .map(|i| Bytes::from(format!("{{t{}}}k{i}", i % 4)))
            .collect();
        for (i, key) in keys.iter().enumerate() {
            let n = 10 + i as u64;
            a.accept(&db, key, Record::new(b(n, 1), entry(b"v1"), None), None)
                .unwrap();
            a.accept(&db, key, Record::new(b(n, 1), entry(b"v1"), None), None)
                .unwrap(); // a repeat
            a.accept(
                &db,
                key,
                Record::new(b(n + 1, 2), entry(b"v2"), Some(b(n, 1))),
                None,
            )
            .unwrap();
        }
        for key in &keys[..10] {
            a.install(&db, key, Record::new(b(1 << 40, 0), entry(b"moved"), None))
                .unwrap();
        }
        for key in &keys[10..20] {
            let dead = Record::new(b(100, 3), None, None);
            a.accept(&db, key, dead.clone(), None).unwrap();
            assert!(a.purge(&db, key, &dead).unwrap());
        }
        for key in &keys[20..25] {
            assert!(a.forget(&db, key, u64::MAX).unwrap());
        }
        let (dir2, dir3) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let fresh = Acceptor::open(dir2.path()).unwrap();
        fresh.count_stored(&db);
        assert_eq!(a.digests(), fresh.digests());
        assert!(
            a.digests().iter().filter(|&&d| d != 0).count() >= 3,
            "the slots of the keys left"
        );
        // The same records taken in another order: the same digests.
        let db2 = Db::new(std::sync::Arc::new(crate::store::MemStore::new()));
        let other = Acceptor::open(dir3.path()).unwrap();
        for key in keys.iter().rev() {
            if let Ok(r) = a.query(&db, key) {
                if r.accepted != Ballot::default() {
                    other.install(&db2, key, r).unwrap();
                }
            }
        }
        assert_eq!(a.digests(), other.digests());
        // Counted from the disk engine, whose scans carry no values, after a
        // restart: the same digests.
        let disk_dir = tempfile::tempdir().unwrap();
        let disk = || {
            let store = crate::store::disk::DiskStore::open(disk_dir.path(), Default::default()).unwrap();
            Db::new(store)
        };
        {
            let on_disk = disk();
            let writer = Acceptor::open(disk_dir.path()).unwrap();
            for key in &keys {
                let r = a.query(&db, key).unwrap();
                if r.accepted != Ballot::default() {
                    writer.install(&on_disk, key, r).unwrap();
                }
            }
            on_disk.store().flush().unwrap();
        }
        let restarted = Acceptor::open(disk_dir.path()).unwrap();
        restarted.count_stored(&disk());
        assert_eq!(a.digests(), restarted.digests());
        // One record different: its slot's digest differs, no other.
        other
            .accept(
                &db2,
                &keys[30],
                Record::new(b(1 << 50, 9), entry(b"newer"), None),
                None,
            )
            .unwrap();
        let differ: Vec<usize> = (0..SLOTS)
            .filter(|&s| a.digests()[s] != other.digests()[s])
            .collect();
        assert_eq!(differ, vec![key_slot(&keys[30]) as usize]);
    }

    #[test]
    fn records_round_trip() {
        for r in [
            Record::default(),
            Record {
                accepted: b(7, 3),
                entry: Some(Entry {
                    value: Bytes::from_static(b"hello"),
                    expires_at: Some(99),
                }),
                base: None,
                lock: None,
            },
            Record {
                accepted: b(7, 3),
                entry: Some(Entry {
                    value: Bytes::from_static(b"hello"),
                    expires_at: Some(99),
                }),
                base: Some(b(6, 2)),
                lock: None,
            },
            Record {
                accepted: b(1, 1),
                entry: Some(Entry {
                    value: Bytes::new(),
                    expires_at: None,
                }),
                base: Some(Ballot::default()),
                lock: None,
            },
            Record::new(b(3, 1), None, Some(b(2, 2))),
            // Locked by a transaction, with a value and without.
            Record::new(
                b(4, 1),
                Some(Entry {
                    value: Bytes::from_static(b"before"),
                    expires_at: Some(5),
                }),
                Some(b(3, 1)),
            )
            .locked(Some(Lock {
                status: Bytes::from_static(b"\xff\xfekvd-txn{7}00"),
                since_ms: 1_700_000_000_000,
            })),
            Record::new(b(5, 1), None, Some(b(4, 1))).locked(Some(Lock {
                status: Bytes::from_static(b"s"),
                since_ms: 1,
            })),
        ] {
            assert_eq!(Record::decode(&r.encode()), Some(r));
        }
        assert_eq!(Record::decode(&Bytes::from_static(b"plain value")), None);
    }

    #[test]
    fn promises_only_go_up_and_survive_a_restart_as_a_floor() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::new(std::sync::Arc::new(crate::store::MemStore::new()));
        let key = Bytes::from_static(b"k");
        let a = Acceptor::open(dir.path()).unwrap();
        assert_eq!(a.prepare(&db, &key, b(5, 1)).unwrap(), Record::default());
        assert_eq!(a.prepare(&db, &key, b(4, 2)).unwrap_err().unwrap(), b(5, 1));
        assert_eq!(
            a.accept(&db, &key, Record::new(b(4, 2), None, None), None)
                .unwrap_err()
                .unwrap(),
            b(5, 1)
        );
        let v = Some(Entry {
            value: Bytes::from_static(b"v"),
            expires_at: None,
        });
        a.accept(&db, &key, Record::new(b(5, 1), v.clone(), None), Some(b(9, 1)))
            .unwrap();
        assert_eq!(a.query(&db, &key).unwrap().entry, v);
        // The next ballot came promised with the accept: lower ones are refused,
        // and it is accepted without a prepare.
        assert_eq!(a.prepare(&db, &key, b(8, 2)).unwrap_err().unwrap(), b(9, 1));
        a.accept(&db, &key, Record::new(b(9, 1), v.clone(), Some(b(5, 1))), None)
            .unwrap();
        // A restart forgets promises but not the floor: an old ballot is refused
        // even for a key never promised anything.
        drop(a);
        let a = Acceptor::open(dir.path()).unwrap();
        assert!(a.floor() > 5);
        let other = Bytes::from_static(b"other");
        assert!(a.prepare(&db, &other, b(6, 1)).is_err());
        assert!(a.prepare(&db, &other, b(a.floor() + 1, 1)).is_ok());
    }
}
