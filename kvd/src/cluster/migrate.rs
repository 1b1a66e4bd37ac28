//! Moving slots to where placement says they belong, in the background.
//!
//! Every node runs this loop. As an importer it looks for slots placement
//! gives it that it does not serve, finds who serves them (gossip), and takes
//! them over by the hand-off in [`super::authority`]: record `Importing`, ask
//! the source to hand off, copy the keys, record `Owned`. As a source it drops
//! its copy of a slot it handed off once gossip shows the new owner serving it.
//!
//! Imports wait until the membership has been stable for `SETTLE`, so a node
//! that is still learning the cluster does not pull slots it would give away
//! again a moment later.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::authority::SlotState;
use super::commands::keys_in_slots;
use super::membership::Status;
use super::slot::{format_ranges, parse_ranges, ranges, SLOTS};
use super::Cluster;
use crate::reply::Reply;
use crate::shared::Shared;

const TICK: Duration = Duration::from_millis(250);
const SETTLE: Duration = Duration::from_secs(1);
/// Slots taken from one source in one hand-off. Requests for slots of the
/// batch wait until the whole batch is copied, so batches are small enough to
/// copy in about a second on ordinary stores (256 slots of a 10 GB store are
/// ~160 MB); each batch costs the source one scan of its keys (kvd keeps no
/// per-slot index), which is what keeps batches from being single slots.
const BATCH_SLOTS: usize = 256;

pub async fn run(cluster: Arc<Cluster>, shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(TICK);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shared.shutdown.cancelled() => return,
        }
        drop_handed_off(&cluster, &shared);
        if let Err(e) = import_step(&cluster, &shared).await {
            tracing::warn!("moving slots to this node: {e}; will retry");
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

/// Source side: forget slots whose new owner now serves them.
fn drop_handed_off(cluster: &Cluster, shared: &Shared) {
    let view = cluster.view();
    // The new owner publishes a slot only after recording it `Owned`, durably.
    let done: Vec<u16> = {
        let auth = cluster.authority();
        (0..SLOTS as u16)
            .filter(|&s| {
                matches!(auth.state(s), SlotState::HandedOff { to }
                    if view.server(s).is_some_and(|m| m.id == *to))
            })
            .collect()
    };
    if done.is_empty() {
        return;
    }
    let set: HashSet<u16> = done.iter().copied().collect();
    let removed = remove_keys(shared, &set);
    if let Err(e) = cluster.set_slots(&done, SlotState::Absent) {
        tracing::warn!("cannot record dropped slots: {e}");
        return;
    }
    cluster
        .stats
        .keys_dropped
        .fetch_add(removed as u64, Ordering::Relaxed);
    tracing::info!(
        "dropped {removed} keys of {} slots now served elsewhere",
        done.len()
    );
}

fn remove_keys(shared: &Shared, slots: &HashSet<u16>) -> usize {
    let keys = keys_in_slots(shared, slots, usize::MAX);
    let _gate = shared.dbs.shared();
    let mut n = 0;
    for k in keys {
        if shared.dbs.zero().remove(&k).unwrap_or(false) {
            n += 1;
        }
    }
    n
}

/// Importer side: resume unfinished imports, then start new ones.
async fn import_step(cluster: &Arc<Cluster>, shared: &Arc<Shared>) -> anyhow::Result<()> {
    let view = cluster.view();
    // Unfinished imports (say, across a restart) first, from where they began.
    let mut by_source: BTreeMap<String, Vec<u16>> = BTreeMap::new();
    {
        let auth = cluster.authority();
        for s in 0..SLOTS as u16 {
            if let SlotState::Importing { from } = auth.state(s) {
                by_source.entry(from.clone()).or_default().push(s);
            }
        }
    }
    if by_source.is_empty() && cluster.status() == Status::Member && view.since.elapsed() >= SETTLE {
        let auth = cluster.authority();
        for s in 0..SLOTS as u16 {
            let mine = view.owner(s).is_some_and(|m| m.id == cluster.id);
            if !mine || matches!(auth.state(s), SlotState::Owned | SlotState::Importing { .. }) {
                continue;
            }
            if let Some(src) = view.server(s).filter(|m| m.id != cluster.id && m.live) {
                by_source.entry(src.id.clone()).or_default().push(s);
            }
        }
    }
    for (source, slots) in by_source {
        for chunk in slots.chunks(BATCH_SLOTS) {
            import(cluster, shared, &source, chunk).await?;
        }
    }
    Ok(())
}

/// Takes `slots` over from `source` (see the hand-off in `authority`).
async fn import(
    cluster: &Arc<Cluster>,
    shared: &Arc<Shared>,
    source: &str,
    slots: &[u16],
) -> anyhow::Result<()> {
    let Some(addr) = cluster.view().member(source).map(|m| m.addr.clone()) else {
        anyhow::bail!("node {source} is not known");
    };
    // 1. Intent, durably; and no stale copy of ours (from an earlier stay here) survives.
    cluster.set_slots(
        slots,
        SlotState::Importing {
            from: source.to_string(),
        },
    )?;
    let set: HashSet<u16> = slots.iter().copied().collect();
    remove_keys(shared, &set);
    // 2. The source stops serving them.
    let list = format_ranges(&ranges(slots.iter().copied()));
    let reply = cluster
        .peers
        .call(&addr, &[Bytes::from_static(b"KVD.HANDOFF"), Bytes::from(list)])
        .await?;
    let accepted: Vec<u16> = match reply {
        Reply::Bulk(b) => parse_ranges(&String::from_utf8_lossy(&b))
            .ok_or_else(|| anyhow::anyhow!("node {source} answered the hand-off with bad ranges"))?
            .into_iter()
            .flat_map(|(a, b)| a..=b)
            .collect(),
        Reply::Error(e) => anyhow::bail!("node {source} refused the hand-off: {e}"),
        other => anyhow::bail!("node {source} answered the hand-off with {other:?}"),
    };
    let accepted_set: HashSet<u16> = accepted.iter().copied().collect();
    let refused: Vec<u16> = slots
        .iter()
        .copied()
        .filter(|s| !accepted_set.contains(s))
        .collect();
    if !refused.is_empty() {
        // It does not serve them (any more): look again when gossip says who does.
        cluster.set_slots(&refused, SlotState::Absent)?;
    }
    if accepted.is_empty() {
        return Ok(());
    }
    // 3. Copy.
    let list = Bytes::from(format_ranges(&ranges(accepted.iter().copied())));
    let mut cursor = 0u64;
    let mut copied = 0u64;
    loop {
        let reply = cluster
            .peers
            .call(
                &addr,
                &[
                    Bytes::from_static(b"KVD.SLOTDUMP"),
                    list.clone(),
                    Bytes::from(cursor.to_string()),
                ],
            )
            .await?;
        let Reply::Array(parts) = reply else {
            anyhow::bail!("node {source} answered SLOTDUMP with {reply:?}");
        };
        let (next, entries) = match <[Reply; 2]>::try_from(parts) {
            Ok([Reply::Bulk(c), Reply::Array(e)]) => (String::from_utf8_lossy(&c).parse::<u64>()?, e),
            _ => anyhow::bail!("node {source} answered SLOTDUMP in an unknown shape"),
        };
        {
            let _gate = shared.dbs.shared();
            for triple in entries.chunks(3) {
                let [Reply::Bulk(k), Reply::Bulk(v), Reply::Int(t)] = triple else {
                    anyhow::bail!("node {source} sent a malformed SLOTDUMP entry");
                };
                let expires = (*t > 0).then_some(*t as u64);
                shared.dbs.zero().set(k, v.clone(), expires)?;
                copied += 1;
            }
        }
        shared.dbs.zero().store().flush()?;
        if next == 0 {
            break;
        }
        cursor = next;
    }
    // 4. Ours: durably, then serve.
    cluster.set_slots(&accepted, SlotState::Owned)?;
    cluster.stats.keys_moved_in.fetch_add(copied, Ordering::Relaxed);
    cluster
        .stats
        .slots_moved_in
        .fetch_add(accepted.len() as u64, Ordering::Relaxed);
    tracing::info!(
        "took over {} slots ({copied} keys) from node {source}",
        accepted.len()
    );
    Ok(())
}
