//! Anti-entropy: brings every replica of every key up to date in the background,
//! so a node that was away (or missed a write) holds all its keys again
//! without waiting for them to be read.
//!
//! Each node walks its own keys in batches, asks all of a key's replicas what
//! they accepted (waiting for every reachable one), and where one is behind —
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

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::acceptor::Record;
use super::layout::Layout;
use super::proposer::Msg;
use super::Replicas;
use crate::cluster::paxos::majority;
use crate::server::Shared;
use crate::store::Entry;

/// Keys examined per batch, and the pause between batches.
const BATCH: usize = 200;
const PAUSE: Duration = Duration::from_millis(100);
/// The pause after a whole pass over this node's keys.
const PASS_PAUSE: Duration = Duration::from_secs(2);

pub fn spawn(shared: Arc<Shared>, rep: Arc<Replicas>) {
    tokio::spawn(async move {
        let mut cursor = 0u64;
        let mut behind_this_pass = 0u64;
        loop {
            tokio::select! {
                _ = shared.shutdown.cancelled() => return,
                _ = tokio::time::sleep(if cursor == 0 { PASS_PAUSE } else { PAUSE }) => {}
            }
            let mut batch: Vec<(Bytes, Entry)> = Vec::new();
            cursor = shared.dbs.zero().store().scan(cursor, BATCH, &mut batch);
            let layout = rep.layout();
            for (key, _) in batch {
                if layout.version > 0 && !layout.me.is_some_and(|me| layout.holders(&key).contains(&me)) {
                    // Not ours since a reconfiguration copied it to its new holders.
                    if rep.drop_unheld(&shared, &key) {
                        rep.stats.dropped.fetch_add(1, Ordering::Relaxed);
                    }
                    continue;
                }
                if layout.holders(&key).len() < 2 {
                    continue;
                }
                rep.stats.repair_scanned.fetch_add(1, Ordering::Relaxed);
                if rep.repair(&shared, &layout, &key).await {
                    behind_this_pass += 1;
                }
            }
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
    /// Checks one key's replicas and repairs those behind (an older ballot, or
    /// nothing); whether any was. Replicas that do not answer wait for a later pass.
    pub async fn repair(self: &Arc<Self>, shared: &Arc<Shared>, layout: &Layout, key: &Bytes) -> bool {
        let holders = layout.holders(key);
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
                .phase_all(shared, layout, &holders, key, &Msg::Query(layout.version))
                .await;
            let Some(highest) = records.iter().max_by_key(|r| r.accepted).cloned() else {
                return behind;
            };
            if records.iter().all(|r| r.accepted == highest.accepted) {
                return behind;
            }
            behind = true;
            if self.relay(shared, layout, &holders, key, &highest, true).await {
                self.stats.relayed.fetch_add(1, Ordering::Relaxed);
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
        let _turn = self.key_locks.lock(key).await;
        let b = self.next_ballot(layout);
        let records = self
            .phase_all(shared, layout, holders, key, &Msg::Prepare(b))
            .await;
        if records.len() < majority(holders.len()) {
            return;
        }
        let highest: Record = records
            .iter()
            .max_by_key(|r| r.accepted)
            .cloned()
            .unwrap_or_default();
        // The value as it is (an expired one stays expired: its entry is kept).
        if self
            .accept_all(shared, layout, holders, key, b, highest.entry)
            .await
        {
            self.stats.repairs.fetch_add(1, Ordering::Relaxed);
        }
    }
}
