//! Changing a replicated cluster's node list: `KVD.RECONFIGURE node [node ...]`.
//!
//! Adding or removing nodes changes the holders of some slots. Run on any
//! member, the command takes the cluster from membership version v to v+1 in
//! three steps, stopping with an error (and changing nothing more) if any step
//! cannot reach the majorities it needs:
//!
//! 1. **Vote.** The next membership is decided by single-decree Paxos among
//!    the nodes of version v (`KVD.VOTE`, then `KVD.FREEZE` as the accept
//!    phase): a node promises one ballot at a time and reports the layout it
//!    accepted, and a coordinator that learns of one finishes that layout
//!    instead of its own. So two reconfigurations started at once cannot both
//!    take effect, and one interrupted half-way is finished by the next.
//! 2. **Freeze and copy.** The accept phase also *freezes*, on every node,
//!    the slots it holds whose holders change: a frozen acceptor takes no
//!    prepare, accept or query on them at version v. Once a majority of each
//!    moving slot's holders is frozen, no value can be chosen for it at
//!    version v any more, and every value chosen before is on a majority of its
//!    holders. The coordinator reads the records of those slots from a
//!    majority of each slot's holders (`KVD.SLOTRECORDS`), keeps for each key
//!    the one with the highest ballot (deleted keys included), and installs it
//!    on a majority of the key's new holders (`KVD.INSTALL`) at the ballot
//!    `(epoch v+1, 0)`: above anything version v ever wrote, below anything a
//!    proposer writes at v+1 ([`super::layout`]).
//! 3. **Activate.** The coordinator adopts version v+1 and sends it to every
//!    node (`KVD.CONFIG SET`). A node that misses it learns it on its next
//!    exchange with a node that has it: every CASPaxos message carries its
//!    version, and a mismatch is answered with `KVDCONFIG <version>`, after
//!    which the side behind is brought up to date.
//!
//! Requests for moving slots answer `TRYAGAIN` from the freeze until the
//! activation (a copy of about a second for 100 MB); other slots are served
//! throughout. If a step fails, the slots frozen so far stay unavailable until
//! `KVD.RECONFIGURE` runs again (with any list: the vote makes it finish the
//! interrupted change first). After the activation each node drops, in the
//! background, the keys of slots it no longer holds ([`super::repair`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::join_all;
use futures::stream::{self, StreamExt};

use super::acceptor::Record;
use super::layout::{self, install_ballot, Layout};
use super::Replicas;
use crate::cluster::paxos::{majority, Ballot};
use crate::cluster::slot::{format_ranges, key_slot, parse_ranges, ranges, SLOTS};
use crate::reply::Reply;
use crate::shared::Shared;

/// How long one call of a reconfiguration may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Slots copied per pass over the holders' keys (the coordinator keeps one
/// pass's records in memory; kvd has no per-slot index, so each pass costs
/// each holder one scan of its keys).
const COPY_SLOTS: usize = 2048;
/// Keys a holder examines per `KVD.SLOTRECORDS` page.
const PAGE: usize = 256;
/// Keys being installed at once.
const INSTALLS_IN_FLIGHT: usize = 32;
/// Vote attempts beaten by another reconfiguration before giving up.
const VOTE_ATTEMPTS: usize = 5;

fn args(parts: &[&[u8]]) -> Vec<Bytes> {
    parts.iter().map(|p| Bytes::copy_from_slice(p)).collect()
}

fn accepted(r: &Result<Reply, String>) -> bool {
    matches!(r, Ok(reply) if !reply.is_error())
}

fn describe(addr: &str, r: &Result<Reply, String>) -> String {
    match r {
        Ok(Reply::Error(e)) => format!("{addr}: {e}"),
        Ok(other) => format!("{addr}: {other:?}"),
        Err(e) => e.clone(),
    }
}

/// `KVDCONFIG <n>`'s version, from a reply.
fn other_version(r: &Result<Reply, String>) -> Option<u64> {
    match r {
        Ok(Reply::Error(e)) => e.strip_prefix("KVDCONFIG ")?.parse().ok(),
        _ => None,
    }
}

impl Replicas {
    /// One call to `addr` (this node's own address included: over its port,
    /// like any other), bounded in time.
    async fn ask(&self, addr: &str, request: Vec<Bytes>) -> Result<Reply, String> {
        if self.is_cut_off(addr) {
            return Err(format!("{addr}: cut off (KVD.PARTITION)"));
        }
        match tokio::time::timeout(CALL_TIMEOUT, self.peers.call(addr, &request)).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("{addr}: no answer within {CALL_TIMEOUT:?}")),
        }
    }

    /// Brings whichever side is behind up to date: fetches a newer membership
    /// from a node that has one, sends ours to a node that is older.
    pub(super) async fn sync_versions(&self, layout: &Layout, others: &[(String, u64)]) {
        for (addr, version) in others {
            if *version > layout.version {
                if let Ok(Reply::Bulk(text)) = self.ask(addr, args(&[b"KVD.CONFIG"])).await {
                    let newer = std::str::from_utf8(&text)
                        .ok()
                        .and_then(|t| Layout::decode(t, &self.addr));
                    if let Some(newer) = newer {
                        if let Err(e) = self.adopt(newer) {
                            tracing::warn!("{e:?}");
                        }
                    }
                }
            } else if *version < layout.version {
                let request = args(&[b"KVD.CONFIG", b"SET", layout.encode().as_bytes()]);
                if let Err(e) = self.ask(addr, request).await {
                    tracing::debug!("sending membership version {} to {addr}: {e}", layout.version);
                }
            }
        }
    }

    /// Drops this node's copy of a key it does not hold in the current
    /// membership; whether it did.
    pub fn drop_unheld(&self, shared: &Shared, key: &Bytes) -> bool {
        let version = self.layout().version;
        self.acceptor
            .forget(&shared.dbs.zero(), key, version)
            .unwrap_or(false)
    }

    /// `KVD.RECONFIGURE node ...`: makes `nodes` the cluster's node list.
    pub async fn reconfigure(self: &Arc<Self>, nodes: Vec<String>) -> Reply {
        let Ok(_one) = self.reconfiguring.try_lock() else {
            return Reply::error("ERR a reconfiguration is already running on this node");
        };
        let old = self.layout();
        if old.version == 0 {
            return Reply::error(
                "ERR this node is not in a replicated cluster yet: run KVD.RECONFIGURE on a member",
            );
        }
        if let Err(e) = layout::check_nodes(&nodes) {
            return Reply::error(format!("ERR {e}"));
        }
        let wanted = Layout::new(old.version + 1, nodes, old.replicas, &self.addr);
        let (mut a, mut b) = (old.nodes.clone(), wanted.nodes.clone());
        a.sort();
        b.sort();
        if a == b && self.membership.read().voted.is_none() {
            return Reply::OK;
        }
        // A node to be added must answer, and must not be a member of a later
        // version (of this cluster or, with the same secret, another one).
        for addr in wanted.nodes.iter().filter(|n| !old.nodes.contains(n)) {
            match self.ask(addr, args(&[b"KVD.CONFIG"])).await {
                Ok(Reply::Bulk(text)) => {
                    let version: u64 = String::from_utf8_lossy(&text)
                        .split(' ')
                        .next()
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(u64::MAX);
                    if version > old.version {
                        return Reply::error(format!(
                            "ERR {addr} is at membership version {version}, this cluster at {}: is it in another cluster?",
                            old.version
                        ));
                    }
                }
                other => return Reply::error(format!("ERR cannot add {addr} ({})", describe(addr, &other))),
            }
        }
        let (ballot, target_text) = match self.vote(&old, &wanted).await {
            Ok(v) => v,
            Err(reply) => return reply,
        };
        let Some(target) = Layout::decode(&target_text, &self.addr) else {
            return Reply::error(format!("ERR the vote chose a malformed layout '{target_text}'"));
        };
        if super::failpoint("reconfigure-after-vote") {
            return Reply::error("ERR stopped after the vote (KVD_FAILPOINTS=reconfigure-after-vote)");
        }
        let moved = match self.move_slots(&old, &target, ballot, &target_text).await {
            Ok(n) => n,
            Err(reply) => return reply,
        };
        self.stats
            .slots_moved
            .fetch_add(moved as u64, std::sync::atomic::Ordering::Relaxed);
        // Activate: here first, then everywhere (best effort; a node that
        // misses it learns it at its next exchange with one that has it).
        let everyone: Vec<String> = old
            .nodes
            .iter()
            .chain(target.nodes.iter())
            .filter(|n| **n != self.addr)
            .cloned()
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let finished_other = target_text != wanted.encode();
        let version = target.version;
        if let Err(reply) = self.adopt(target) {
            return reply;
        }
        let request = args(&[b"KVD.CONFIG", b"SET", target_text.as_bytes()]);
        join_all(everyone.iter().map(|addr| self.ask(addr, request.clone()))).await;
        tracing::info!(version, slots = moved, "reconfigured: {target_text}");
        if finished_other {
            return Reply::error(format!(
                "ERR finished an interrupted reconfiguration first (now version {version}: {target_text}); \
                 run KVD.RECONFIGURE again for yours"
            ));
        }
        Reply::OK
    }

    /// Step 1's prepare: a ballot promised by a majority of the current nodes,
    /// and the layout to finish (one already accepted by some node, or ours).
    async fn vote(&self, old: &Layout, wanted: &Layout) -> Result<(Ballot, String), Reply> {
        let need = majority(old.nodes.len());
        for attempt in 0..VOTE_ATTEMPTS {
            let b = self.next_ballot(old);
            let version = old.version.to_string();
            let (c, p) = (b.counter.to_string(), b.proposer.to_string());
            let request = args(&[b"KVD.VOTE", version.as_bytes(), c.as_bytes(), p.as_bytes()]);
            let answers = join_all(old.nodes.iter().map(|a| self.ask(a, request.clone()))).await;
            let mut promised = 0;
            let mut beaten = false;
            let mut highest: Option<(Ballot, String)> = None;
            let mut failures = Vec::new();
            for (addr, answer) in old.nodes.iter().zip(&answers) {
                if let Some(v) = other_version(answer).filter(|&v| v > old.version) {
                    self.sync_versions(old, &[(addr.clone(), v)]).await;
                    return Err(Reply::error(format!(
                        "ERR the membership changed meanwhile (now version {v}); check INFO cluster and run again"
                    )));
                }
                match answer {
                    Ok(Reply::Bulk(text)) => {
                        promised += 1;
                        let text = String::from_utf8_lossy(text);
                        let mut words = text.splitn(3, ' ');
                        let ballot = (words.next(), words.next(), words.next());
                        if let (Some(c), Some(p), Some(layout)) = ballot {
                            if let (Ok(counter), Ok(proposer)) = (c.parse(), p.parse()) {
                                let voted = Ballot { counter, proposer };
                                if highest.as_ref().is_none_or(|(h, _)| voted > *h) {
                                    highest = Some((voted, layout.to_string()));
                                }
                            }
                        }
                    }
                    Ok(Reply::Error(e)) if e.starts_with("BALLOT ") => {
                        // The next attempt goes above the ballot that won.
                        let mut words = e["BALLOT ".len()..].split(' ').map(|w| w.parse().ok());
                        if let (Some(Some(counter)), Some(Some(proposer))) = (words.next(), words.next()) {
                            self.saw(Ballot { counter, proposer });
                        }
                        beaten = true;
                        failures.push(format!("{addr}: {e}"));
                    }
                    other => failures.push(describe(addr, other)),
                }
            }
            if promised >= need {
                return Ok((b, highest.map(|(_, l)| l).unwrap_or_else(|| wanted.encode())));
            }
            if !beaten {
                return Err(Reply::error(format!(
                    "CLUSTERDOWN a majority of the nodes did not answer the vote on the new membership ({}); \
                     nothing was changed",
                    failures.join("; ")
                )));
            }
            tokio::time::sleep(Duration::from_millis(20 << attempt)).await;
        }
        Err(Reply::error(
            "TRYAGAIN another reconfiguration is running in this cluster; try again",
        ))
    }

    /// Step 2: freezes the moving slots (the vote's accept phase), copies their
    /// records to their new holders; how many slots moved.
    async fn move_slots(
        &self,
        old: &Layout,
        target: &Layout,
        ballot: Ballot,
        target_text: &str,
    ) -> Result<usize, Reply> {
        let moving: Vec<u16> = (0..SLOTS as u16)
            .filter(|&s| old.holder_addrs(s) != target.holder_addrs(s))
            .collect();
        let held_by = |i: usize, slots: &[u16]| -> Vec<u16> {
            slots
                .iter()
                .copied()
                .filter(|&s| old.slot_holders(s).contains(&i))
                .collect()
        };
        let version = old.version.to_string();
        let (c, p) = (ballot.counter.to_string(), ballot.proposer.to_string());
        let freezes = old.nodes.iter().enumerate().map(|(i, addr)| {
            let slots = format_ranges(&ranges(held_by(i, &moving)));
            let request = args(&[
                b"KVD.FREEZE",
                version.as_bytes(),
                c.as_bytes(),
                p.as_bytes(),
                target_text.as_bytes(),
                slots.as_bytes(),
            ]);
            self.ask(addr, request)
        });
        let answers = join_all(freezes).await;
        let frozen: Vec<bool> = answers.iter().map(accepted).collect();
        let failures: Vec<String> = old
            .nodes
            .iter()
            .zip(&answers)
            .filter(|(_, a)| !accepted(a))
            .map(|(addr, a)| describe(addr, a))
            .collect();
        let stuck = |what: String| {
            Reply::error(format!(
                "CLUSTERDOWN {what} ({}); slots frozen so far stay unavailable until KVD.RECONFIGURE runs again",
                failures.join("; ")
            ))
        };
        if frozen.iter().filter(|f| **f).count() < majority(old.nodes.len()) {
            return Err(stuck(
                "a majority of the nodes did not accept the new membership".into(),
            ));
        }
        for &s in &moving {
            let holders = old.slot_holders(s);
            if holders.iter().filter(|&&i| frozen[i]).count() < majority(holders.len()) {
                return Err(stuck(format!(
                    "a majority of slot {s}'s replicas could not be frozen"
                )));
            }
        }
        for chunk in moving.chunks(COPY_SLOTS) {
            let mut best: HashMap<Bytes, Record> = HashMap::new();
            let mut complete = vec![false; old.nodes.len()];
            let mut failures = Vec::new();
            for (i, addr) in old.nodes.iter().enumerate().filter(|(i, _)| frozen[*i]) {
                let slots = held_by(i, chunk);
                if slots.is_empty() {
                    continue;
                }
                match self.read_slots(addr, old.version, &slots, &mut best).await {
                    Ok(()) => complete[i] = true,
                    Err(e) => failures.push(e),
                }
            }
            for &s in chunk {
                let holders = old.slot_holders(s);
                if holders.iter().filter(|&&i| complete[i]).count() < majority(holders.len()) {
                    return Err(Reply::error(format!(
                        "CLUSTERDOWN could not read slot {s} from a majority of its replicas ({}); \
                         slots frozen so far stay unavailable until KVD.RECONFIGURE runs again",
                        failures.join("; ")
                    )));
                }
            }
            if super::failpoint("reconfigure-after-freeze") {
                return Err(Reply::error(
                    "ERR stopped after freezing (KVD_FAILPOINTS=reconfigure-after-freeze)",
                ));
            }
            self.install_all(target, best).await?;
        }
        Ok(moving.len())
    }

    /// Reads every record of `slots` from the frozen node at `addr` into
    /// `best`, keeping per key the record with the highest ballot.
    async fn read_slots(
        &self,
        addr: &str,
        version: u64,
        slots: &[u16],
        best: &mut HashMap<Bytes, Record>,
    ) -> Result<(), String> {
        let version = version.to_string();
        let slots = format_ranges(&ranges(slots.iter().copied()));
        let page = PAGE.to_string();
        let mut cursor = "0".to_string();
        loop {
            let request = args(&[
                b"KVD.SLOTRECORDS",
                version.as_bytes(),
                cursor.as_bytes(),
                page.as_bytes(),
                slots.as_bytes(),
            ]);
            let reply = self.ask(addr, request).await;
            let Ok(Reply::Array(parts)) = &reply else {
                return Err(describe(addr, &reply));
            };
            let [Reply::Bulk(next), Reply::Array(items)] = &parts[..] else {
                return Err(format!("{addr}: a malformed KVD.SLOTRECORDS reply"));
            };
            for pair in items.chunks(2) {
                let [Reply::Bulk(key), Reply::Bulk(raw)] = pair else {
                    return Err(format!("{addr}: a malformed KVD.SLOTRECORDS reply"));
                };
                let Some(record) = Record::decode(raw) else {
                    return Err(format!("{addr}: a malformed record"));
                };
                match best.get(key) {
                    Some(have) if have.accepted >= record.accepted => {}
                    _ => {
                        best.insert(key.clone(), record);
                    }
                }
            }
            cursor = String::from_utf8_lossy(next).into_owned();
            if cursor == "0" {
                return Ok(());
            }
        }
    }

    /// Installs each record on a majority (and as many as answer) of its key's
    /// holders in `target`, at the install ballot of `target`'s version.
    async fn install_all(&self, target: &Layout, records: HashMap<Bytes, Record>) -> Result<(), Reply> {
        let ballot = install_ballot(target.version);
        self.stats
            .keys_copied
            .fetch_add(records.len() as u64, std::sync::atomic::Ordering::Relaxed);
        let results: Vec<Result<(), String>> = stream::iter(records)
            .map(|(key, record)| async move {
                let holders = target.holders(&key);
                let raw = Record {
                    accepted: ballot,
                    entry: record.entry,
                }
                .encode();
                let calls = holders.iter().map(|&i| {
                    let request = vec![Bytes::from_static(b"KVD.INSTALL"), key.clone(), raw.clone()];
                    self.ask(&target.nodes[i], request)
                });
                let answers = join_all(calls).await;
                if answers.iter().filter(|a| accepted(a)).count() >= majority(holders.len()) {
                    return Ok(());
                }
                let why: Vec<String> = holders
                    .iter()
                    .zip(&answers)
                    .filter(|(_, a)| !accepted(a))
                    .map(|(&i, a)| describe(&target.nodes[i], a))
                    .collect();
                Err(format!(
                    "key '{}' reached fewer than a majority of its new replicas: {}",
                    String::from_utf8_lossy(&key),
                    why.join("; ")
                ))
            })
            .buffer_unordered(INSTALLS_IN_FLIGHT)
            .collect()
            .await;
        if let Some(Err(e)) = results.into_iter().find(Result::is_err) {
            return Err(Reply::error(format!(
                "CLUSTERDOWN {e}; slots frozen so far stay unavailable until KVD.RECONFIGURE runs again"
            )));
        }
        Ok(())
    }
}

/// `KVD.SLOTRECORDS version cursor count slots`: one page of the records this
/// node holds in `slots`, which must be frozen here (a copy of slots still
/// changing would miss changes): `[next cursor, [key, record, ...]]`.
pub fn slot_records(shared: &Shared, rep: &Replicas, args: &[Bytes]) -> Reply {
    let number = |i: usize| -> Option<u64> { std::str::from_utf8(&args[i]).ok()?.parse().ok() };
    let (Some(version), Some(cursor), Some(count)) = (number(1), number(2), number(3)) else {
        return Reply::error("ERR wrong arguments for 'kvd.slotrecords'");
    };
    let Some(wanted) = std::str::from_utf8(&args[4]).ok().and_then(parse_ranges) else {
        return Reply::error("ERR wrong arguments for 'kvd.slotrecords'");
    };
    let layout = rep.layout();
    if version != layout.version {
        return super::version_refusal(layout.version);
    }
    let mut in_set = vec![false; SLOTS];
    for (a, b) in wanted {
        for s in a..=b {
            if !rep.is_frozen(s) {
                return Reply::error(format!("ERR slot {s} is not frozen here"));
            }
            in_set[s as usize] = true;
        }
    }
    let mut batch = Vec::new();
    let next = shared
        .dbs
        .zero()
        .store()
        .scan(cursor, count.clamp(1, 10_000) as usize, &mut batch);
    let mut items = Vec::new();
    for (key, _) in batch {
        if !in_set[key_slot(&key) as usize] {
            continue;
        }
        match rep.acceptor.query(&shared.dbs.zero(), &key) {
            Ok(r) if r != Record::default() => {
                items.push(Reply::Bulk(key));
                items.push(Reply::Bulk(r.encode()));
            }
            Ok(_) => {}
            Err(e) => return Reply::error(e.to_string()),
        }
    }
    Reply::Array(vec![
        Reply::Bulk(Bytes::from(next.to_string())),
        Reply::Array(items),
    ])
}
