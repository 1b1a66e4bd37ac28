//! Anti-entropy: brings every replica of every key up to date in the background,
//! so a node that was away (or missed a write) holds all its keys again
//! without waiting for them to be read.
//!
//! A pass starts by comparing slot digests with every other member
//! (`KVD.DIGESTS`; [`super::acceptor::Acceptor::digests`]): the keys of a
//! slot every answering holder agrees on are skipped. Of the rest, each node
//! walks its own keys in batches of a thousand and first compares
//! record headers (ballot, presence, expiry; no values) with every other
//! holder, one `KVD.HEADS` call per holder per batch
//! ([`Replicas::keys_to_repair`]): replicas in agreement cost nothing more,
//! so a node back from an absence re-reads only what changed. For a key
//! whose replicas differ it asks all of them what they accepted (waiting for
//! every reachable one), and where one is behind —
//! an older ballot, or nothing — sends it the highest record's accept again at
//! that record's own ballot ([`Replicas::relay`]: it promises nothing, so it
//! never cuts off a write under way). Only a replica that refuses that (it
//! promised a higher ballot) gets a repair round: prepare with a fresh ballot,
//! then accept the highest value at it on every replica. That is an ordinary
//! CASPaxos round whose change is the identity, so it is as safe as any write. A key a node does not hold at all is found by the nodes that do.
//! A replica that refuses (after a restart it refuses ballots below its floor)
//! is caught on a later pass, once the proposer's ballots have risen past it.
//!
//! After a reconfiguration, a node drops the keys of slots it no longer holds
//! (their records were copied to the new holders before the new membership
//! was activated).
//!
//! **Purging dead records.** A deleted key is a tombstone, not nothing (a
//! replica that missed the delete would otherwise bring the old value back),
//! so without a purge every key ever deleted — every blob `fsclient gc`
//! collects — would hold a record on R disks forever. The rule: when every
//! one of a key's replicas answers with the same dead record (a tombstone, or
//! a value expired more than a minute ago), each replica deletes its copy if
//! it still holds exactly that record (`KVD.PURGE`), and promises that
//! record's ballot for the key. Why nothing comes back:
//! - no replica holds an older value: all answered with the dead record, and
//!   an acceptor's record only moves to higher ballots;
//! - no older accept can land later (a delayed message, a relay): the
//!   promise refuses every ballot below the dead record's, and after a
//!   restart the durable floor does (it was raised past that ballot when the
//!   record was accepted);
//! - a write racing the purge is at a higher ballot: a replica that took it
//!   first no longer holds exactly the dead record and keeps it; one that
//!   purged first takes it (its promise is lower);
//! - a replica that does not answer blocks the purge (a later pass tries);
//!   a replica that purged while others did not answers "nothing", which is
//!   older than the dead record, so a read or a pass delivers the record to
//!   it again (harmless: it is purged on a later pass).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use futures::stream::{self, StreamExt};

use super::acceptor::{Head, Record};
use super::layout::Layout;
use super::network::NodeNetwork;
use super::proposer::{highest_of, Msg};
use super::Replicas;
use crate::cluster::paxos::{majority, Ballot};
use crate::cluster::slot::{key_slot, SLOTS};
use crate::db::now_ms;
use crate::reply::Reply;
use crate::shared::Shared;
use crate::store::Entry;

/// How long past its expiry a value counts as dead (clock differences
/// between nodes must not make one node purge what another still serves).
const EXPIRED_GRACE_MS: u64 = 60_000;

/// A record nothing can read: a tombstone (a deleted key), or a value
/// expired well in the past. The empty record (no write ever) is not one.
fn is_dead(r: &Record, now: u64) -> bool {
    Head {
        accepted: r.accepted,
        present: r.entry.is_some(),
        expires_at: r.entry.as_ref().and_then(|e| e.expires_at),
        locked: r.lock.is_some(),
    }
    .is_dead(now)
}

impl Head {
    /// [`is_dead`], from the header alone.
    /// A locked record is not dead: its transaction may yet give it a value.
    fn is_dead(&self, now: u64) -> bool {
        self.accepted != Ballot::default()
            && !self.locked
            && (!self.present || self.expires_at.is_some_and(|t| t + EXPIRED_GRACE_MS <= now))
    }
}

/// Keys examined per batch, and the pause between batches (none after a
/// batch that found replicas behind: catching up goes at full speed).
const BATCH: usize = 1000;
const PAUSE: Duration = Duration::from_millis(100);
/// The pause after a whole pass over this node's keys.
const PASS_PAUSE: Duration = Duration::from_secs(2);
/// Keys repaired at once.
const REPAIRS_IN_FLIGHT: usize = 16;
/// How long a holder may take to answer a batch's `KVD.HEADS`.
const HEADS_TIMEOUT: Duration = Duration::from_secs(2);

pub fn spawn(shared: Arc<Shared>, rep: Arc<Replicas>) {
    tokio::spawn(async move {
        let mut cursor = 0u64;
        let mut behind_this_pass = 0u64;
        let mut behind_last_batch = 0u64;
        let mut agreeing: Vec<bool> = Vec::new();
        loop {
            let pause = match (cursor, behind_last_batch) {
                (0, _) => PASS_PAUSE,
                (_, 0) => PAUSE,
                _ => Duration::ZERO,
            };
            tokio::select! {
                _ = shared.shutdown.cancelled() => return,
                _ = tokio::time::sleep(pause) => {}
            }
            if rep.came_back.swap(false, Ordering::Relaxed) {
                // The pass so far skipped the node that is back: start over.
                cursor = 0;
                behind_this_pass = 0;
            }
            let layout = rep.layout();
            if cursor == 0 {
                // A pass starts by comparing slot digests: the keys of slots
                // every other holder agrees on need no comparing one by one.
                agreeing = rep.agreeing_slots(&layout).await;
                rep.stats
                    .slots_in_agreement
                    .store(agreeing.iter().filter(|a| **a).count() as u64, Ordering::Relaxed);
            }
            let mut batch: Vec<(Bytes, Entry)> = Vec::new();
            cursor = shared.dbs.zero().store().scan(cursor, BATCH, &mut batch);
            let now = now_ms();
            let mut ours = Vec::with_capacity(batch.len());
            // Status keys of transactions over several keys: a committed one
            // whose coordinator stopped before the end is finished by the
            // first holder of its slot ([`super::txn::Txns::sweep`]).
            let mut finished = Vec::new();
            let zero = shared.dbs.zero();
            for (key, _) in batch {
                if layout.version > 0 && !layout.me.is_some_and(|me| layout.holders(&key).contains(&me)) {
                    // Not ours since a reconfiguration copied it to its new holders.
                    if rep.drop_unheld(&shared, &key) {
                        rep.stats.dropped.fetch_add(1, Ordering::Relaxed);
                    }
                    continue;
                }
                if super::txn::is_status_key(&key) && layout.holders(&key).first() == layout.me.as_ref() {
                    finished.push(key.clone());
                }
                // A dead record is compared even where the slot agrees: all
                // holding it is what lets it be purged.
                // (A scan's entries carry no value on the disk engine: the
                // header is read for it.)
                let agreed = agreeing.get(key_slot(&key) as usize).copied().unwrap_or(false)
                    && !rep
                        .acceptor
                        .head(&zero, &key)
                        .ok()
                        .flatten()
                        .and_then(|h| Record::decode_head(&h))
                        .is_some_and(|h| h.is_dead(now));
                if layout.holders(&key).len() >= 2 && !agreed {
                    ours.push(key);
                }
            }
            rep.stats
                .repair_scanned
                .fetch_add(ours.len() as u64, Ordering::Relaxed);
            let suspect = rep.keys_to_repair(&shared, &layout, ours).await;
            let repaired: Vec<bool> = stream::iter(suspect)
                .map(|key| {
                    let (rep, shared, layout) = (rep.clone(), shared.clone(), layout.clone());
                    async move { rep.repair(&shared, &layout, &key).await }
                })
                .buffer_unordered(REPAIRS_IN_FLIGHT)
                .collect()
                .await;
            behind_last_batch = repaired.iter().filter(|b| **b).count() as u64;
            let net = NodeNetwork::new(&rep, &shared);
            for status in finished {
                if rep.txns.sweep(&rep.proposer, &net, &status).await {
                    rep.stats.txns_finished.fetch_add(1, Ordering::Relaxed);
                }
            }
            behind_this_pass += behind_last_batch;
            if cursor == 0 {
                rep.stats
                    .behind_last_pass
                    .store(behind_this_pass, Ordering::Relaxed);
                rep.stats.repair_passes.fetch_add(1, Ordering::Relaxed);
                behind_this_pass = 0;
            }
        }
    });
}

impl Replicas {
    /// Per slot, whether every other holder of it that answers
    /// `KVD.DIGESTS` has the digest this node has (the same records); a
    /// holder this node already finds silent is not asked (nothing could be
    /// sent to it now anyway), one that does not answer makes its slots
    /// compared key by key.
    pub async fn agreeing_slots(self: &Arc<Self>, layout: &Layout) -> Vec<bool> {
        let Some(me) = layout.me else {
            return vec![false; SLOTS];
        };
        let mine = self.acceptor.digests();
        let mut agree = vec![true; SLOTS];
        let asks = layout
            .nodes
            .iter()
            .enumerate()
            .filter(|(n, addr)| *n != me && !self.is_suspect(addr) && !self.is_cut_off(addr))
            .map(|(n, addr)| {
                let request = [Bytes::from_static(b"KVD.DIGESTS")];
                async move {
                    match tokio::time::timeout(HEADS_TIMEOUT, self.peers.call(addr, &request)).await {
                        Ok(Ok(Reply::Bulk(raw))) if raw.len() == SLOTS * 8 => (n, Some(raw)),
                        _ => (n, None),
                    }
                }
            });
        for (n, theirs) in futures::future::join_all(asks).await {
            for (s, agrees) in agree.iter_mut().enumerate() {
                let holders = layout.slot_holders(s as u16);
                if !(holders.contains(&n) && holders.contains(&me)) {
                    continue;
                }
                let same = theirs.as_ref().is_some_and(|raw| {
                    u64::from_le_bytes(raw[s * 8..s * 8 + 8].try_into().expect("8 bytes")) == mine[s]
                });
                *agrees &= same;
            }
        }
        agree
    }

    /// Of `keys` (held here and by others), those whose replicas may differ:
    /// compares the record headers of every holder that answers, a batch
    /// per holder (`KVD.HEADS`), so replicas in agreement cost no per-key
    /// round trip and no value read. A key goes on to [`Replicas::repair`]
    /// when the answering holders name different ballots, or all hold the
    /// same dead record (to purge it). A holder that does not answer is left
    /// for a later pass (nothing can be sent to it now anyway); nodes this
    /// node already finds silent are not asked.
    pub async fn keys_to_repair(
        self: &Arc<Self>,
        shared: &Arc<Shared>,
        layout: &Layout,
        keys: Vec<Bytes>,
    ) -> Vec<Bytes> {
        let zero = shared.dbs.zero();
        let decode = |raw: Option<&Bytes>| raw.and_then(|r| Record::decode_head(r));
        // Each key's heads, this node's first, then one per holder that
        // answered (`None`: no record).
        let mut heads: Vec<Vec<Option<Head>>> = keys
            .iter()
            .map(|k| vec![decode(self.acceptor.head(&zero, k).ok().flatten().as_ref())])
            .collect();
        let mut asked = vec![1usize; keys.len()];
        let mut per_node: Vec<Vec<usize>> = vec![Vec::new(); layout.nodes.len()];
        for (k, key) in keys.iter().enumerate() {
            for n in layout.holders(key) {
                if Some(n) != layout.me {
                    asked[k] += 1;
                    per_node[n].push(k);
                }
            }
        }
        let version = layout.version.to_string();
        let calls = per_node
            .iter()
            .enumerate()
            .filter(|(_, ks)| !ks.is_empty())
            .map(|(n, ks)| {
                let addr = layout.nodes[n].clone();
                let mut request = vec![Bytes::from_static(b"KVD.HEADS"), Bytes::from(version.clone())];
                request.extend(ks.iter().map(|&k| keys[k].clone()));
                async move {
                    if self.is_suspect(&addr) || self.is_cut_off(&addr) {
                        return (n, None);
                    }
                    match tokio::time::timeout(HEADS_TIMEOUT, self.peers.call(&addr, &request)).await {
                        Ok(Ok(Reply::Array(each))) if each.len() == request.len() - 2 => (n, Some(each)),
                        _ => (n, None),
                    }
                }
            });
        for (n, reply) in futures::future::join_all(calls).await {
            let Some(each) = reply else { continue };
            for (&k, head) in per_node[n].iter().zip(each) {
                match head {
                    Reply::Bulk(raw) => heads[k].push(decode(Some(&raw))),
                    Reply::Nil => heads[k].push(None),
                    // A damaged record: let the full check read it.
                    _ => heads[k].push(Some(Head {
                        accepted: Ballot {
                            counter: u64::MAX,
                            proposer: u64::MAX,
                        },
                        present: false,
                        expires_at: None,
                        locked: false,
                    })),
                }
            }
        }
        let now = now_ms();
        keys.into_iter()
            .enumerate()
            .filter(|(k, _)| {
                let hs = &heads[*k];
                let ballot = |h: &Option<Head>| h.map(|h| h.accepted).unwrap_or_default();
                let agree = hs.iter().all(|h| ballot(h) == ballot(&hs[0]));
                let all_dead = hs.len() == asked[*k] && hs[0].is_some_and(|h| h.is_dead(now));
                !agree || all_dead
            })
            .map(|(_, key)| key)
            .collect()
    }

    /// Checks one key's replicas and repairs those behind (an older ballot, or
    /// nothing); whether any was. Replicas that do not answer wait for a later pass.
    pub async fn repair(self: &Arc<Self>, shared: &Arc<Shared>, layout: &Layout, key: &Bytes) -> bool {
        let holders = layout.holders(key);
        let net = NodeNetwork::new(self, shared);
        // Most often the highest record is a write still on its way to the
        // others, or one a replica missed while away: deliver it at its own
        // ballot, which cannot cut off a write under way (a fresh prepare
        // would). A refusal because the key moved on means its writers are
        // at work and keep it replicated: a later pass looks again. Only a
        // replica that refuses the same record twice (it promised higher,
        // such as one restarted above its old ballots) gets a full round.
        let mut refused = None;
        let mut behind = false;
        for _ in 0..2 {
            let records = self
                .proposer
                .phase_all(&net, layout, &holders, key, &Msg::Query(layout.version))
                .await;
            let Some(highest) = records.iter().max_by_key(|r| r.accepted).cloned() else {
                return behind;
            };
            if records.iter().all(|r| r.accepted == highest.accepted) {
                if records.len() == holders.len() && is_dead(&highest, now_ms()) {
                    self.purge(shared, layout, &holders, key, &highest).await;
                }
                return behind;
            }
            behind = true;
            if self
                .proposer
                .relay(&net, layout, &holders, key, &highest, true)
                .await
            {
                self.proposer.stats.relayed.fetch_add(1, Ordering::Relaxed);
                return true;
            }
            if refused == Some(highest.accepted) {
                self.write_back(shared, layout, &holders, key).await;
                return true;
            }
            refused = Some(highest.accepted);
        }
        behind
    }

    /// Purges a dead record every replica holds (see the module's notes):
    /// each replica deletes it if it still holds exactly that record.
    async fn purge(
        self: &Arc<Self>,
        shared: &Arc<Shared>,
        layout: &Layout,
        holders: &[usize],
        key: &Bytes,
        dead: &Record,
    ) {
        let request = vec![Bytes::from_static(b"KVD.PURGE"), key.clone(), dead.encode()];
        let mut purged = 0;
        for &n in holders {
            let done = if Some(n) == layout.me {
                self.acceptor
                    .purge(&shared.dbs.zero(), key, dead)
                    .unwrap_or(false)
            } else {
                let call = self.peers.call(&layout.nodes[n], &request);
                matches!(
                    tokio::time::timeout(Duration::from_secs(1), call).await,
                    Ok(Ok(Reply::Int(1)))
                )
            };
            purged += done as usize;
        }
        if purged == holders.len() {
            self.stats.purged.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// One identity round that accepts on every replica (no shortcut).
    async fn write_back(
        self: &Arc<Self>,
        shared: &Arc<Shared>,
        layout: &Layout,
        holders: &[usize],
        key: &Bytes,
    ) {
        // A proposal of this node like any other: its prepare must not cut
        // off this node's own clients' rounds on the key.
        let _turn = self.proposer.key_locks.lock(key).await;
        let b = self.proposer.next_ballot(layout);
        let net = NodeNetwork::new(self, shared);
        let records = self
            .proposer
            .phase_all(&net, layout, holders, key, &Msg::Prepare(b))
            .await;
        if records.len() < majority(holders.len()) {
            return;
        }
        let highest = highest_of(&records);
        // The value as it is (an expired one stays expired: its entry is kept).
        if self
            .proposer
            .accept_all(
                &net,
                layout,
                holders,
                key,
                Record::new(b, highest.entry, Some(highest.accepted)).locked(highest.lock),
            )
            .await
        {
            self.proposer.stats.repairs.fetch_add(1, Ordering::Relaxed);
        }
    }
}
