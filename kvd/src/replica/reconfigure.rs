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
//!    holders. Each moving slot is then copied by one of its frozen holders
//!    (`KVD.COPYSLOTS`; the step's turn-holder where it holds the slot, so
//!    the steps of a change spread the copying over the surviving holders;
//!    the coordinator stands in for one that fails): the copier reads the
//!    slot's records from a
//!    majority of its holders (`KVD.SLOTRECORDS`), keeps for each key
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
//! A change that moves more than [`layout::STEP_SLOTS`] slots (a node joining
//! a 3-node cluster with R=3 moves three quarters of them) runs as several
//! such versions: transitional layouts in which the slots below a boundary
//! have their new holders and the rest their old ones
//! ([`Layout::next_step`]). Commands on a frozen slot wait for its step's
//! activation (a copy of about a second for 100 MB; `TRYAGAIN` only past
//! the proposer's wait); every other slot is served throughout, so a join
//! never stops the whole cluster. If a step fails, the slots it froze stay
//! unavailable until `KVD.RECONFIGURE` runs again (with any list: the vote
//! makes it finish the interrupted step first, and a transition is always
//! carried to its end before another change starts); a change that rests
//! half-way is finished by the coordinator ([`super::health`]). After each
//! activation each node drops, in the background, the keys of slots it no
//! longer holds ([`super::repair`]).

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
/// How long a holder asked to copy slots may take (1 GiB at 15 MB/s is
/// about 70 s); past it this node copies them itself.
const DELEGATE_TIMEOUT: Duration = Duration::from_secs(300);
/// How long one may take to a node already found silent.
const SUSPECT_CALL_TIMEOUT: Duration = Duration::from_millis(500);
/// Slots copied per pass over the holders' keys (the coordinator keeps one
/// pass's records in memory; kvd has no per-slot index, so each pass costs
/// each holder one scan of its keys).
const COPY_SLOTS: usize = 2048;
/// Keys a holder examines per `KVD.SLOTRECORDS` page.
const PAGE: usize = 1024;
/// Keys sent to a node in one `KVD.INSTALL`.
const INSTALL_BATCH: usize = 64;
/// `KVD.INSTALL` batches in flight at once.
const INSTALLS_IN_FLIGHT: usize = 8;
/// Vote attempts beaten by another reconfiguration before giving up.
const VOTE_ATTEMPTS: usize = 5;

fn args(parts: &[&[u8]]) -> Vec<Bytes> {
    parts.iter().map(|p| Bytes::copy_from_slice(p)).collect()
}

/// Keeps `record` for `key` unless `best` holds one at a ballot as high.
fn keep_highest(best: &mut HashMap<Bytes, Record>, key: Bytes, record: Record) {
    match best.get(&key) {
        Some(have) if have.accepted >= record.accepted => {}
        _ => {
            best.insert(key, record);
        }
    }
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
    /// like any other), bounded in time: [`CALL_TIMEOUT`], or
    /// [`SUSPECT_CALL_TIMEOUT`] for a suspect node (its last call failed, or
    /// its heartbeat stands still; a change that takes out a sleeping node
    /// asks it at every step, and the majorities it needs do not include it).
    async fn ask(&self, addr: &str, request: Vec<Bytes>) -> Result<Reply, String> {
        if self.is_cut_off(addr) {
            return Err(format!("{addr}: cut off (KVD.PARTITION)"));
        }
        let timeout = match self.is_suspect(addr) {
            true => SUSPECT_CALL_TIMEOUT,
            false => CALL_TIMEOUT,
        };
        match tokio::time::timeout(timeout, self.peers.call(addr, &request)).await {
            Ok(Ok(reply)) => {
                self.reached(addr, true);
                Ok(reply)
            }
            Ok(Err(e)) => {
                self.reached(addr, false);
                Err(e.to_string())
            }
            Err(_) => {
                self.reached(addr, false);
                Err(format!("{addr}: no answer within {timeout:?}"))
            }
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

    /// `KVD.RECONFIGURE node ...`: makes `nodes` the cluster's node list, in
    /// steps of at most [`layout::STEP_SLOTS`] moving slots (each a membership
    /// version of its own: vote, freeze, copy, activate), so that no key
    /// waits longer than one step's copy. A change under way (this node's or
    /// one another coordinator left half-done) is finished first.
    pub async fn reconfigure(self: &Arc<Self>, nodes: Vec<String>) -> Reply {
        let Ok(_one) = self.reconfiguring.try_lock() else {
            return Reply::error("ERR a reconfiguration is already running on this node");
        };
        let start = self.layout();
        if start.version == 0 {
            return Reply::error(
                "ERR this node is not in a replicated cluster yet: run KVD.RECONFIGURE on a member",
            );
        }
        if let Err(e) = layout::check_nodes(&nodes) {
            return Reply::error(format!("ERR {e}"));
        }
        // A node to be added must answer, and must not be a member of a later
        // version (of this cluster or, with the same secret, another one).
        for addr in nodes.iter().filter(|n| !start.nodes.contains(n)) {
            match self.ask(addr, args(&[b"KVD.CONFIG"])).await {
                Ok(Reply::Bulk(text)) => {
                    let version: u64 = String::from_utf8_lossy(&text)
                        .split(' ')
                        .next()
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(u64::MAX);
                    if version > start.version {
                        return Reply::error(format!(
                            "ERR {addr} is at membership version {version}, this cluster at {}: is it in another cluster?",
                            start.version
                        ));
                    }
                }
                other => return Reply::error(format!("ERR cannot add {addr} ({})", describe(addr, &other))),
            }
        }
        let mut finished_other = false;
        loop {
            let old = self.layout();
            let voted = self.membership.read().voted.is_some();
            let step = match old.next_step(&nodes, &self.addr) {
                Some(step) => step,
                // A vote accepted here and never activated (an interrupted
                // change): the vote below finds it and finishes it; if the
                // majority that answers never saw it, a version with the same
                // nodes ends it as harmlessly.
                None if voted => {
                    Layout::new(old.version + 1, old.target().to_vec(), old.replicas, &self.addr)
                }
                None => break,
            };
            let (target, moved) = match self.step(&old, &step).await {
                Ok(done) => done,
                Err(reply) => return reply,
            };
            finished_other |= target.encode() != step.encode();
            if finished_other && !target.in_transition() && !layout::same_nodes(&target.nodes, &nodes) {
                return Reply::error(format!(
                    "ERR finished an interrupted reconfiguration first (now version {}: {}); \
                     run KVD.RECONFIGURE again for yours",
                    target.version,
                    target.encode()
                ));
            }
            tracing::info!(
                version = target.version,
                slots = moved,
                "reconfigured: {}",
                target.encode()
            );
            if target.in_transition() && crate::failpoint::failpoint_once("reconfigure-one-step") {
                return Reply::error("ERR stopped after one step (KVD_FAILPOINTS=reconfigure-one-step)");
            }
        }
        Reply::OK
    }

    /// One step from `old` to `step` (or to the layout a vote at `old`'s
    /// version already accepted): vote, freeze and copy the slots whose
    /// holders change, activate. Answers the layout now in force and how many
    /// slots moved.
    async fn step(self: &Arc<Self>, old: &Layout, step: &Layout) -> Result<(Layout, usize), Reply> {
        let (ballot, target_text) = self.vote(old, step).await?;
        let Some(target) = Layout::decode(&target_text, &self.addr) else {
            return Err(Reply::error(format!(
                "ERR the vote chose a malformed layout '{target_text}'"
            )));
        };
        if super::failpoint("reconfigure-after-vote") {
            return Err(Reply::error(
                "ERR stopped after the vote (KVD_FAILPOINTS=reconfigure-after-vote)",
            ));
        }
        let moved = self.move_slots(old, &target, ballot, &target_text).await?;
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
        self.adopt(target.clone())?;
        let request = args(&[b"KVD.CONFIG", b"SET", target_text.as_bytes()]);
        join_all(everyone.iter().map(|addr| self.ask(addr, request.clone()))).await;
        Ok((target, moved))
    }

    /// Step 1's prepare: a ballot promised by a majority of the current nodes,
    /// and the layout to finish (one already accepted by some node, or ours).
    async fn vote(&self, old: &Layout, wanted: &Layout) -> Result<(Ballot, String), Reply> {
        let need = majority(old.nodes.len());
        for attempt in 0..VOTE_ATTEMPTS {
            let b = self.proposer.next_ballot(old);
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
                            self.proposer.saw(Ballot { counter, proposer });
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
        let version = old.version.to_string();
        let (c, p) = (ballot.counter.to_string(), ballot.proposer.to_string());
        let freezes = old.nodes.iter().enumerate().map(|(i, addr)| {
            let slots = format_ranges(&ranges(old.held_by(i, &moving)));
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
        if super::failpoint("reconfigure-after-freeze") {
            return Err(Reply::error(
                "ERR stopped after freezing (KVD_FAILPOINTS=reconfigure-after-freeze)",
            ));
        }
        // Each slot is copied by one of its frozen old holders instead of
        // through this node (Ceph's parallel recovery): the step's turn-holder
        // (the next frozen node after the version's turn) where it holds the
        // slot, else one of the slot's holders in turn. Steps take turns, so a
        // change's copies come from every surviving holder; within a step one
        // copier does most, because each copier's reads cost every holder a
        // scan of its keys (there is no per-slot index). A delegate that
        // fails is stood in for by this node.
        let n = old.nodes.len();
        let turn = (0..n)
            .map(|k| (old.version as usize + k) % n)
            .find(|&i| frozen[i]);
        let mut by_delegate: HashMap<usize, Vec<u16>> = HashMap::new();
        for &s in &moving {
            let holders: Vec<usize> = old.slot_holders(s).into_iter().filter(|&i| frozen[i]).collect();
            let copier = match turn {
                Some(t) if holders.contains(&t) => t,
                _ => holders[s as usize % holders.len()],
            };
            by_delegate.entry(copier).or_default().push(s);
        }
        let frozen_addrs: Vec<&str> = old
            .nodes
            .iter()
            .zip(&frozen)
            .filter(|(_, f)| **f)
            .map(|(a, _)| a.as_str())
            .collect();
        let frozen_addrs = frozen_addrs.join(",");
        let (frozen, frozen_addrs) = (&frozen, &frozen_addrs);
        let copies = by_delegate.into_iter().map(|(i, slots)| async move {
            let addr = &old.nodes[i];
            if *addr != self.addr {
                match self.delegate_copy(addr, old.version, target_text, frozen_addrs, &slots).await {
                    Ok(()) => return Ok(()),
                    Err(e) => tracing::warn!(delegate = %addr, "copying slots through another holder failed ({e}); copying them from here"),
                }
            }
            self.copy_slots(old, target, frozen, &slots).await
        });
        for copied in join_all(copies).await {
            copied?;
        }
        Ok(moving.len())
    }

    /// Asks the old holder at `addr` to copy `slots` to their holders in
    /// `target` (`KVD.COPYSLOTS`), over a link of its own: a copy takes
    /// longer than the calls a pooled link carries, which would wait behind it.
    async fn delegate_copy(
        &self,
        addr: &str,
        version: u64,
        target_text: &str,
        frozen: &str,
        slots: &[u16],
    ) -> Result<(), String> {
        if self.is_cut_off(addr) {
            return Err(format!("{addr}: cut off (KVD.PARTITION)"));
        }
        let request = args(&[
            b"KVD.COPYSLOTS",
            version.to_string().as_bytes(),
            target_text.as_bytes(),
            frozen.as_bytes(),
            format_ranges(&ranges(slots.iter().copied())).as_bytes(),
        ]);
        let copy = async {
            let link = self
                .peers
                .dedicated(addr, crate::reply::Protocol::Resp2)
                .await
                .map_err(|e| e.to_string())?;
            let frame = link.call(&request).await.map_err(|e| e.to_string())?;
            crate::cluster::peer::parse_reply(&frame).ok_or_else(|| format!("{addr}: a malformed reply"))
        };
        match tokio::time::timeout(DELEGATE_TIMEOUT, copy).await {
            Ok(Ok(Reply::Error(e))) => Err(format!("{addr}: {e}")),
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(format!("{addr}: no answer within {DELEGATE_TIMEOUT:?}")),
        }
    }

    /// `KVD.COPYSLOTS version target frozen slots`, on an old holder the
    /// coordinator chose: copies the slots, frozen at `version` (this node's)
    /// on the nodes listed in `frozen`, to their holders in `target`, as the
    /// coordinator would.
    pub async fn copy_slots_for(
        self: &Arc<Self>,
        version: u64,
        target_text: &str,
        frozen: &str,
        slots: &[u16],
    ) -> Reply {
        let old = self.layout();
        if old.version != version {
            return super::version_refusal(old.version);
        }
        let Some(target) = Layout::decode(target_text, &self.addr) else {
            return Reply::error("ERR KVD.COPYSLOTS: a malformed layout");
        };
        let frozen: Vec<bool> = old
            .nodes
            .iter()
            .map(|n| frozen.split(',').any(|f| f == n))
            .collect();
        match self.copy_slots(&old, &target, &frozen, slots).await {
            Ok(()) => Reply::OK,
            Err(reply) => reply,
        }
    }

    /// Reads `slots` from every old holder that froze them, keeps each key's
    /// record with the highest ballot, and installs it on its holders in
    /// `target`, [`COPY_SLOTS`] slots per pass.
    async fn copy_slots(
        &self,
        old: &Layout,
        target: &Layout,
        frozen: &[bool],
        slots: &[u16],
    ) -> Result<(), Reply> {
        for chunk in slots.chunks(COPY_SLOTS) {
            let started = std::time::Instant::now();
            let mut best: HashMap<Bytes, Record> = HashMap::new();
            let mut complete = vec![false; old.nodes.len()];
            let mut failures = Vec::new();
            // Every frozen holder at once; the records merge as they come.
            let reads = old
                .nodes
                .iter()
                .enumerate()
                .filter(|(i, _)| frozen[*i])
                .map(|(i, addr)| (i, addr, old.held_by(i, chunk)))
                .filter(|(_, _, slots)| !slots.is_empty())
                .map(|(i, addr, slots)| async move {
                    let mut records = HashMap::new();
                    let read = self.read_slots(addr, old.version, &slots, &mut records).await;
                    (i, read, records)
                });
            for (i, read, records) in join_all(reads).await {
                match read {
                    Ok(()) => complete[i] = true,
                    Err(e) => failures.push(e),
                }
                for (key, record) in records {
                    keep_highest(&mut best, key, record);
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
            let (records, read) = (best.len(), started.elapsed());
            self.install_all(target, best).await?;
            tracing::info!(
                slots = chunk.len(),
                records,
                "moving slots: records read in {read:?}, installed on their new replicas in {:?}",
                started.elapsed() - read
            );
        }
        Ok(())
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
                keep_highest(best, key.clone(), record);
            }
            cursor = String::from_utf8_lossy(next).into_owned();
            if cursor == "0" {
                return Ok(());
            }
        }
    }

    /// Installs each record on a majority (and as many as answer) of its key's
    /// holders in `target`, at the install ballot of `target`'s version. Each
    /// node gets its keys in batches of [`INSTALL_BATCH`], several batches in
    /// flight: one call per key cost more than the copy itself.
    async fn install_all(&self, target: &Layout, records: HashMap<Bytes, Record>) -> Result<(), Reply> {
        let ballot = install_ballot(target.version);
        self.stats
            .keys_copied
            .fetch_add(records.len() as u64, std::sync::atomic::Ordering::Relaxed);
        let keys: Vec<(Bytes, Bytes)> = records
            .into_iter()
            .map(|(key, record)| {
                // The same value (and transaction lock) at the install ballot:
                // made from the record copied.
                let raw = Record::new(ballot, record.entry, Some(record.accepted))
                    .locked(record.lock)
                    .encode();
                (key, raw)
            })
            .collect();
        // Per node, the indexes of the keys it is to hold.
        let mut per_node: Vec<Vec<usize>> = vec![Vec::new(); target.nodes.len()];
        for (k, (key, _)) in keys.iter().enumerate() {
            for i in target.holders(key) {
                per_node[i].push(k);
            }
        }
        // Built beforehand, so each call owns what it sends.
        let mut calls = Vec::new();
        for (node, ks) in per_node.iter().enumerate() {
            for batch in ks.chunks(INSTALL_BATCH) {
                let mut request = Vec::with_capacity(1 + 2 * batch.len());
                request.push(Bytes::from_static(b"KVD.INSTALL"));
                for &k in batch {
                    request.push(keys[k].0.clone());
                    request.push(keys[k].1.clone());
                }
                calls.push((node, batch.to_vec(), target.nodes[node].clone(), request));
            }
        }
        let answers: Vec<(usize, Vec<usize>, Result<Reply, String>)> = stream::iter(calls)
            .map(|(node, batch, addr, request)| async move { (node, batch, self.ask(&addr, request).await) })
            .buffer_unordered(INSTALLS_IN_FLIGHT)
            .collect()
            .await;
        let mut took = vec![0usize; keys.len()];
        let mut why: Vec<Vec<String>> = vec![Vec::new(); keys.len()];
        for (node, batch, answer) in answers {
            let addr = &target.nodes[node];
            match &answer {
                Ok(Reply::Array(each)) if each.len() == batch.len() => {
                    for (&k, reply) in batch.iter().zip(each) {
                        match reply {
                            Reply::Error(e) => why[k].push(format!("{addr}: {e}")),
                            _ => took[k] += 1,
                        }
                    }
                }
                other => {
                    for &k in &batch {
                        why[k].push(describe(addr, other));
                    }
                }
            }
        }
        let short = keys
            .iter()
            .enumerate()
            .find(|(k, (key, _))| took[*k] < majority(target.holders(key).len()));
        if let Some((k, (key, _))) = short {
            return Err(Reply::error(format!(
                "CLUSTERDOWN key '{}' reached fewer than a majority of its new replicas: {}; \
                 slots frozen so far stay unavailable until KVD.RECONFIGURE runs again",
                String::from_utf8_lossy(key),
                why[k].join("; ")
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
