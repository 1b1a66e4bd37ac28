//! Transactions over several keys of one slot (MULTI/EXEC), atomic over
//! per-key CASPaxos: Percolator's locks and commit point, with a
//! transaction *status key* as the commit point.
//!
//! Every key is its own CASPaxos register, so no single round can change two
//! keys. A transaction over keys `k1 < k2 < ...` (all in one slot, as Redis
//! Cluster requires) runs in four steps:
//!
//! 1. **Lock** each key in order, one round each: the record keeps its value
//!    and gains a [`Lock`] naming the transaction's status key `S` (a fresh
//!    key in the same slot, hidden from SCAN and KEYS). A WATCHed key whose
//!    ballot moved aborts here, as Redis aborts.
//! 2. **Run** the queued commands on the values the locks were taken on.
//! 3. **Commit**: one round on `S` that writes the outcome — every key's new
//!    value — only if `S` is still empty. That round is the transaction's
//!    single point of decision.
//! 4. **Roll forward**: each key's record gets its new value and loses the
//!    lock; then `S` is deleted.
//!
//! Anyone meeting a locked key (a read, a write, another transaction) first
//! learns the transaction's outcome from `S` ([`Txns::propose`]): committed
//! — the key's value is the one `S` names; aborted — the value before. While
//! `S` is empty the transaction is undecided: the reader waits, and once the
//! lock is older than [`TIMEOUT`] writes "aborted" into `S` by the same
//! compare-and-set, so a coordinator that died never blocks a key for long,
//! and one that was only slow finds its commit refused and starts again.
//!
//! Why it is atomic: `S` is decided once (a CASPaxos register written only
//! when empty), every locked key is read through `S`, and a key loses its
//! lock only by a write that applied `S`'s outcome; `S` is deleted only
//! after every key lost its lock on a majority of its replicas. Why it cannot
//! deadlock: keys are locked in order, and an undecided lock is aborted
//! after [`TIMEOUT`].
//!
//! A transaction whose commands only read takes no locks: it reads every
//! key twice and answers if no ballot moved in between ([`Txns::read`]).
//!
//! A status key whose coordinator died after committing is finished by
//! anti-entropy ([`Txns::sweep`]). Left out: one whose coordinator died
//! undecided (a reader aborted it) stays in the store, a few dozen bytes:
//! deleting it is safe only once that coordinator can no longer commit it,
//! which nothing here can know.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use parking_lot::Mutex;
use tokio::time::Instant;

use super::acceptor::{Lock, Record};
use super::proposer::{Change, Mode, Network, Proposer};
use crate::cluster::paxos::Ballot;
use crate::cluster::slot::{key_slot, SLOTS};
use crate::reply::Reply;
use crate::store::Entry;

/// How long a transaction may hold a lock undecided before anyone who meets
/// it may abort it.
pub const TIMEOUT: Duration = Duration::from_secs(5);
/// How long a command waits on a locked key for its transaction's outcome
/// (past [`TIMEOUT`], so a dead coordinator's lock is aborted first).
const LEARN_WAIT: Duration = Duration::from_secs(8);
/// Times a transaction starts again after a slow commit was refused.
const ATTEMPTS: usize = 4;
/// Double collects a read-only transaction tries before it takes locks.
const COLLECTS: usize = 3;
/// Rounds a command runs on one key that keeps meeting new locks.
const LOCKED_ROUNDS: usize = 64;
/// Decided outcomes remembered (they never change; this only bounds memory).
const OUTCOMES: usize = 10_000;
/// Every status key starts with this (bytes no client key is likely to).
const STATUS_PREFIX: &[u8] = b"\xff\xfekvd-txn{";

/// A transaction's decision, as its status key holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Every key's value after the transaction (`None`: deleted).
    Committed(Arc<HashMap<Bytes, Option<Entry>>>),
    Aborted,
}

impl Outcome {
    /// `A`, or `C` then per key: `key length u32 | key | present u8 |
    /// expiry ms u64 | value length u32 | value`.
    fn encode(&self) -> Bytes {
        let Outcome::Committed(writes) = self else {
            return Bytes::from_static(b"A");
        };
        let mut b = BytesMut::new();
        b.put_u8(b'C');
        for (key, entry) in writes.iter() {
            b.put_u32_le(key.len() as u32);
            b.put_slice(key);
            b.put_u8(entry.is_some() as u8);
            b.put_u64_le(entry.as_ref().and_then(|e| e.expires_at).unwrap_or(0));
            let value = entry.as_ref().map(|e| &e.value[..]).unwrap_or_default();
            b.put_u32_le(value.len() as u32);
            b.put_slice(value);
        }
        b.freeze()
    }

    fn decode(raw: &Bytes) -> Option<Outcome> {
        match raw.first()? {
            b'A' if raw.len() == 1 => Some(Outcome::Aborted),
            b'C' => {
                let mut writes = HashMap::new();
                let mut at = 1;
                let take = |at: &mut usize, n: usize| -> Option<Bytes> {
                    let end = at.checked_add(n).filter(|&e| e <= raw.len())?;
                    let out = raw.slice(*at..end);
                    *at = end;
                    Some(out)
                };
                while at < raw.len() {
                    let len = u32::from_le_bytes(take(&mut at, 4)?[..].try_into().ok()?) as usize;
                    let key = take(&mut at, len)?;
                    let present = take(&mut at, 1)?[0] == 1;
                    let expiry = u64::from_le_bytes(take(&mut at, 8)?[..].try_into().ok()?);
                    let len = u32::from_le_bytes(take(&mut at, 4)?[..].try_into().ok()?) as usize;
                    let value = take(&mut at, len)?;
                    let entry = present.then(|| Entry {
                        value,
                        expires_at: Some(expiry).filter(|&t| t != 0),
                    });
                    writes.insert(key, entry);
                }
                Some(Outcome::Committed(Arc::new(writes)))
            }
            _ => None,
        }
    }
}

/// For each slot, a short hash tag that hashes to it: a status key
/// `\xff\xfekvd-txn{TAG}...` lives in the slot of its transaction's keys.
fn slot_tags() -> &'static [String] {
    static TAGS: OnceLock<Vec<String>> = OnceLock::new();
    TAGS.get_or_init(|| {
        let mut tags = vec![String::new(); SLOTS];
        let mut left = SLOTS;
        // About 170,000 tries find every slot (the coupon collector's n ln n).
        for i in 0u64.. {
            let tag = i.to_string();
            let slot = key_slot(tag.as_bytes()) as usize;
            if tags[slot].is_empty() {
                tags[slot] = tag;
                left -= 1;
                if left == 0 {
                    break;
                }
            }
        }
        tags
    })
}

/// A fresh status key in `slot`.
fn status_key(slot: u16) -> Bytes {
    let mut key = STATUS_PREFIX.to_vec();
    key.extend_from_slice(slot_tags()[slot as usize].as_bytes());
    key.extend_from_slice(format!("}}{:032x}", rand::random::<u128>()).as_bytes());
    Bytes::from(key)
}

/// Whether `key` is a transaction's status key (kept out of SCAN, KEYS,
/// DBSIZE and RANDOMKEY).
pub fn is_status_key(key: &[u8]) -> bool {
    key.starts_with(STATUS_PREFIX)
}

/// This node's transactions' shared state: the outcomes it has learned.
#[derive(Default)]
pub struct Txns {
    outcomes: Mutex<HashMap<Bytes, Outcome>>,
}

/// What a transaction's commands made of its keys: the EXEC reply and each
/// key's value afterwards.
pub type Ran = (Reply, Vec<(Bytes, Option<Entry>)>);

/// The values a transaction's locks were taken on, in its keys' order.
pub type Values = [(Bytes, Option<Entry>)];

impl Txns {
    fn outcome(&self, status: &Bytes) -> Option<Outcome> {
        self.outcomes.lock().get(status).cloned()
    }

    fn learned(&self, status: &Bytes, outcome: Outcome) {
        let mut outcomes = self.outcomes.lock();
        if outcomes.len() >= OUTCOMES {
            outcomes.clear();
        }
        outcomes.insert(status.clone(), outcome);
    }

    /// The record as a command sees it: a lock whose outcome is known is
    /// applied (the committed value, or the value before an abort, and no
    /// lock); a lock of `own` (the caller's transaction) is left as it is;
    /// `Err` names a lock whose outcome must be learned first.
    fn view<'r>(&self, key: &Bytes, r: &'r Record, own: Option<&Bytes>) -> Result<Cow<'r, Record>, Lock> {
        let Some(lock) = &r.lock else {
            return Ok(Cow::Borrowed(r));
        };
        if own == Some(&lock.status) {
            return Ok(Cow::Borrowed(r));
        }
        let mut resolved = r.clone();
        resolved.lock = None;
        match self.outcome(&lock.status) {
            Some(Outcome::Aborted) => Ok(Cow::Owned(resolved)),
            Some(Outcome::Committed(writes)) => {
                if let Some(entry) = writes.get(key) {
                    resolved.entry = entry.clone();
                }
                Ok(Cow::Owned(resolved))
            }
            None => Err(lock.clone()),
        }
    }

    /// [`Proposer::propose`] for a command on `key`, seeing the key as its
    /// transaction (if one holds it) decided it: `f` never sees another
    /// transaction's lock. `own`: the caller's transaction, whose locks `f`
    /// does see.
    pub async fn propose(
        &self,
        proposer: &Proposer,
        net: &impl Network,
        key: &Bytes,
        mode: Mode,
        own: Option<&Bytes>,
        f: &mut (dyn FnMut(&Record) -> Change + Send),
    ) -> Reply {
        for _ in 0..LOCKED_ROUNDS {
            let mut blocked = None;
            let reply = {
                let mut viewed = |r: &Record| match self.view(key, r, own) {
                    Ok(view) => f(&view),
                    Err(lock) => {
                        // Nothing is written: the record stays as it is.
                        blocked = Some(lock);
                        Change::none(Reply::Nil, r)
                    }
                };
                proposer.propose(net, key, mode, &mut viewed).await
            };
            let Some(lock) = blocked else {
                return reply;
            };
            if let Err(reply) = self.learn(proposer, net, &lock).await {
                return reply;
            }
        }
        Reply::error("TRYAGAIN the key kept being locked by new transactions; try again")
    }

    /// Learns the outcome of the transaction that holds `lock` (waiting
    /// while it is undecided, aborting it once it is older than [`TIMEOUT`]).
    async fn learn(&self, proposer: &Proposer, net: &impl Network, lock: &Lock) -> Result<(), Reply> {
        let started = Instant::now();
        loop {
            if self.outcome(&lock.status).is_some() {
                return Ok(());
            }
            if let Some(outcome) = read_outcome(proposer, net, &lock.status).await? {
                self.learned(&lock.status, outcome);
                return Ok(());
            }
            // Undecided (or decided, rolled forward and its status deleted:
            // then the lock met was stale, and aborting the empty status key
            // changes nothing that any record still names).
            if net.now_ms() >= lock.since_ms.saturating_add(TIMEOUT.as_millis() as u64) {
                let reply = decide(proposer, net, &lock.status, &Outcome::Aborted).await;
                if reply.is_err() {
                    return reply.map(|_| ());
                }
                continue;
            }
            if started.elapsed() > LEARN_WAIT {
                return Err(Reply::error(
                    "TRYAGAIN a transaction holding the key is undecided; try again",
                ));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Runs a transaction over `keys` (one slot; `watched` keys among them,
    /// with the ballots WATCH saw): locks them, calls `run` with their
    /// values (in `keys`' order), commits what it answers, rolls it forward.
    /// The reply is `run`'s, or a null array if a watched key changed.
    pub async fn exec(
        &self,
        proposer: &Proposer,
        net: &impl Network,
        mut keys: Vec<Bytes>,
        watched: &[(Bytes, Ballot)],
        run: &mut (dyn FnMut(&Values) -> Ran + Send),
    ) -> Reply {
        keys.sort();
        keys.dedup();
        let Some(first) = keys.first() else {
            return run(&[]).0;
        };
        let slot = key_slot(first);
        for _ in 0..ATTEMPTS {
            let status = status_key(slot);
            let lock = Lock {
                status: status.clone(),
                since_ms: net.now_ms(),
            };
            // 1. Lock, in order.
            let mut values = Vec::with_capacity(keys.len());
            let mut failure = None;
            let mut locked = Vec::new();
            for key in &keys {
                let expected = watched.iter().find(|(k, _)| k == key).map(|(_, b)| *b);
                let (mut seen, mut moved) = (None, false);
                let reply = self
                    .propose(
                        proposer,
                        net,
                        key,
                        Mode::Guarded,
                        Some(&status),
                        &mut |r: &Record| {
                            moved = expected.is_some_and(|b| b != r.accepted);
                            if moved {
                                return Change::none(Reply::NilArray, r);
                            }
                            seen = Some(r.live(net.now_ms()).cloned());
                            Change {
                                reply: Reply::OK,
                                value: r.live(net.now_ms()).cloned(),
                                touched: false,
                                lock: Some(lock.clone()),
                            }
                        },
                    )
                    .await;
                if reply.is_error() || moved {
                    // An error may have left the lock on some replicas.
                    locked.push(key.clone());
                    failure = Some(if moved { Reply::NilArray } else { reply });
                    break;
                }
                locked.push(key.clone());
                values.push((key.clone(), seen.flatten()));
            }
            if let Some(reply) = failure {
                self.abort(proposer, net, &status, &locked).await;
                return reply;
            }
            if crate::failpoint::failpoint_once("txn-pause-after-lock") {
                tokio::time::sleep(TIMEOUT + Duration::from_secs(2)).await;
            }
            if crate::failpoint::failpoint("txn-abandon-locked") {
                return Reply::error("ERR failpoint: the coordinator stopped after locking");
            }
            // 2. Run.
            let (reply, writes) = run(&values);
            let outcome = Outcome::Committed(Arc::new(writes.into_iter().collect()));
            // 3. Commit.
            match decide(proposer, net, &status, &outcome).await {
                Err(reply) => return reply,
                Ok(Outcome::Aborted) => {
                    // Someone found us undecided past the timeout. This
                    // status key is ours alone to forget: we never decide it
                    // again, so once no key names it, it may go.
                    self.learned(&status, Outcome::Aborted);
                    if self.release(proposer, net, &keys).await {
                        forget(proposer, net, &status).await;
                    }
                    if !watched.is_empty() {
                        return Reply::NilArray;
                    }
                    continue;
                }
                Ok(committed) => self.learned(&status, committed),
            }
            if crate::failpoint::failpoint("txn-abandon-committed") {
                return Reply::error("ERR failpoint: the coordinator stopped after committing");
            }
            // 4. Roll forward; the status key goes once no key names it.
            if self.release(proposer, net, &keys).await {
                forget(proposer, net, &status).await;
            }
            return reply;
        }
        Reply::error("TRYAGAIN the transaction kept being aborted as too slow; try again")
    }

    /// Answers a transaction whose commands only read, without locks, by a
    /// double collect: read every key, read them all again, and if no key's
    /// ballot moved in between, every key held the value first read at any
    /// moment between the two collects, so the answer is the one the
    /// commands give on those values at that moment. (Each read is a
    /// linearizable read of a chosen value, and a write chosen in between
    /// would show a higher ballot on one replica of any majority, so a
    /// majority agreeing on the same ballot twice rules it out.) It writes
    /// nothing, so unlike a locking transaction it moves no ballot and aborts
    /// no one's WATCH, as reads in Redis do not. `None`: the keys kept
    /// changing ([`COLLECTS`] times); lock them instead ([`Txns::exec`]).
    pub async fn read(
        &self,
        proposer: &Proposer,
        net: &impl Network,
        mut keys: Vec<Bytes>,
        watched: &[(Bytes, Ballot)],
        run: &mut (dyn FnMut(&Values) -> Ran + Send),
    ) -> Option<Reply> {
        keys.sort();
        keys.dedup();
        for _ in 0..COLLECTS {
            let first = match self.collect(proposer, net, &keys).await {
                Ok(first) => first,
                Err(reply) => return Some(reply),
            };
            let moved = watched.iter().any(|(key, seen)| {
                keys.iter()
                    .zip(&first)
                    .any(|(k, (ballot, _))| k == key && ballot != seen)
            });
            if moved {
                return Some(Reply::NilArray);
            }
            let at = net.now_ms();
            let second = match self.collect(proposer, net, &keys).await {
                Ok(second) => second,
                Err(reply) => return Some(reply),
            };
            if first.iter().map(|(b, _)| b).eq(second.iter().map(|(b, _)| b)) {
                let values: Vec<(Bytes, Option<Entry>)> = keys
                    .iter()
                    .cloned()
                    .zip(first)
                    .map(|(key, (_, entry))| (key, entry.filter(|e| e.expires_at.is_none_or(|t| t > at))))
                    .collect();
                return Some(run(&values).0);
            }
        }
        None
    }

    /// Each key's ballot and value as a majority shows them (a lock seen as
    /// its transaction decided it), in `keys`' order.
    async fn collect(
        &self,
        proposer: &Proposer,
        net: &impl Network,
        keys: &[Bytes],
    ) -> Result<Vec<(Ballot, Option<Entry>)>, Reply> {
        let mut out = Vec::with_capacity(keys.len());
        for key in keys {
            let mut seen = None;
            let reply = self
                .propose(proposer, net, key, Mode::Read, None, &mut |r: &Record| {
                    seen = Some((r.accepted, r.entry.clone()));
                    Change::none(Reply::OK, r)
                })
                .await;
            if reply.is_error() {
                return Err(reply);
            }
            out.push(seen.ok_or_else(|| Reply::error("ERR the read round ran nothing"))?);
        }
        Ok(out)
    }

    /// Aborts an undecided transaction of ours: decides its status (aborted,
    /// unless ... it cannot be committed: only we commit it) and releases
    /// the keys that may hold its lock.
    async fn abort(&self, proposer: &Proposer, net: &impl Network, status: &Bytes, keys: &[Bytes]) {
        if let Ok(outcome) = decide(proposer, net, status, &Outcome::Aborted).await {
            self.learned(status, outcome);
            if self.release(proposer, net, keys).await {
                forget(proposer, net, status).await;
            }
        }
    }

    /// Finishes a committed transaction whose coordinator stopped before it
    /// deleted its status key (anti-entropy meets such keys,
    /// [`super::repair`]): rolls every key forward, then deletes the status
    /// key; whether it did. An undecided or aborted one is left alone: its
    /// coordinator may still be at work, and a status key decided aborted
    /// must never be empty again while that coordinator could still commit
    /// it (only the coordinator itself forgets one).
    pub async fn sweep(&self, proposer: &Proposer, net: &impl Network, status: &Bytes) -> bool {
        let Ok(Some(Outcome::Committed(writes))) = read_outcome(proposer, net, status).await else {
            return false;
        };
        let keys: Vec<Bytes> = writes.keys().cloned().collect();
        self.learned(status, Outcome::Committed(writes));
        self.release(proposer, net, &keys).await && forget(proposer, net, status).await
    }

    /// Writes each key's decided value in place of its lock (the view does:
    /// the outcome is known); whether every key was written.
    async fn release(&self, proposer: &Proposer, net: &impl Network, keys: &[Bytes]) -> bool {
        let mut all = true;
        for key in keys {
            let reply = self
                .propose(proposer, net, key, Mode::Write, None, &mut |r: &Record| {
                    Change::none(Reply::OK, r)
                })
                .await;
            all &= !reply.is_error();
        }
        all
    }
}

/// What the status key `status` holds now (`None`: undecided, or deleted).
async fn read_outcome(
    proposer: &Proposer,
    net: &impl Network,
    status: &Bytes,
) -> Result<Option<Outcome>, Reply> {
    let mut seen = None;
    let reply = proposer
        .propose(net, status, Mode::Read, &mut |r: &Record| {
            seen = r.live(net.now_ms()).cloned();
            Change::none(Reply::OK, r)
        })
        .await;
    if reply.is_error() {
        return Err(reply);
    }
    Ok(seen.and_then(|e| Outcome::decode(&e.value)))
}

/// Deletes a status key no record names any more; whether it is gone.
async fn forget(proposer: &Proposer, net: &impl Network, status: &Bytes) -> bool {
    let reply = proposer
        .propose(net, status, Mode::Write, &mut |r: &Record| Change {
            reply: Reply::OK,
            value: None,
            touched: false,
            lock: r.lock.clone(),
        })
        .await;
    !reply.is_error()
}

/// Writes `outcome` into the empty status key `status`; the outcome it
/// holds afterwards (ours, or the one someone else decided first).
async fn decide(
    proposer: &Proposer,
    net: &impl Network,
    status: &Bytes,
    outcome: &Outcome,
) -> Result<Outcome, Reply> {
    let encoded = outcome.encode();
    let mut held = None;
    let reply = proposer
        .propose(net, status, Mode::Guarded, &mut |r: &Record| match r
            .live(net.now_ms())
            .and_then(|e| Outcome::decode(&e.value))
        {
            Some(decided) => {
                held = Some(decided);
                Change::none(Reply::OK, r)
            }
            None => {
                held = Some(outcome.clone());
                Change {
                    reply: Reply::OK,
                    value: Some(Entry {
                        value: encoded.clone(),
                        expires_at: None,
                    }),
                    touched: false,
                    lock: None,
                }
            }
        })
        .await;
    if reply.is_error() {
        return Err(reply);
    }
    held.ok_or_else(|| Reply::error("ERR the transaction's status round ran nothing"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_slot_has_a_status_key_in_it() {
        for slot in [0u16, 1, 777, 16383] {
            let key = status_key(slot);
            assert_eq!(key_slot(&key), slot);
            assert!(is_status_key(&key));
        }
        assert!(!is_status_key(b"user key"));
    }

    #[test]
    fn outcomes_read_back() {
        let mut writes = HashMap::new();
        writes.insert(Bytes::from_static(b"a"), None);
        writes.insert(
            Bytes::from_static(b"b"),
            Some(Entry {
                value: Bytes::from_static(b"\x00value"),
                expires_at: Some(12345),
            }),
        );
        let committed = Outcome::Committed(Arc::new(writes));
        assert_eq!(Outcome::decode(&committed.encode()), Some(committed));
        assert_eq!(
            Outcome::decode(&Outcome::Aborted.encode()),
            Some(Outcome::Aborted)
        );
        assert_eq!(Outcome::decode(&Bytes::from_static(b"C\x05\x00")), None);
    }
}
