//! Asleep versus gone: which members answer, and what the cluster does about
//! one that stops.
//!
//! Members learn of each other by gossip ([`super::gossip`]): heartbeats
//! passed on each second. A member is *suspect* when this node's last call
//! to it failed (every phase counts) or its heartbeat has stood still longer
//! than gossip needs to bring it: nothing changes, its slots keep serving
//! from the other replicas (a write needs a majority of each slot's replicas,
//! not all). Desktops sleep and reboot, so only when its heartbeat has stood
//! still for `--down-after` is it *down*: then the *coordinator* — the first
//! member in the membership's order that this node can reach (itself
//! included) — calls it once more itself and, with no answer, takes it out
//! of the membership with an ordinary reconfiguration
//! ([`super::reconfigure`]), which re-homes its replicas on live nodes and
//! copies them from the surviving ones. A member that the coordinator cannot
//! reach but others can is not down: its heartbeat comes round through them. It does so only if the live members
//! can hold every slot's R copies: with fewer, removing the node would only
//! lower the number of copies, so it stays a (down) member until a new node
//! joins. Two nodes that both think they coordinate (a partition) are safe:
//! the reconfiguration's vote lets one membership win.
//!
//! A node that is not a member — a new one started with `--seed`, or one
//! taken out while it was away (asleep or switched off past `--down-after`,
//! whether it restarts or just wakes up) — asks a seed (or a member it
//! remembers) to add it (`KVD.JOIN`); the member runs the reconfiguration. A
//! seed that is not a member itself answers with the membership it knows,
//! whose members the node asks next. A node told to leave while it runs
//! (`CLUSTER LEAVE` on it, or `CLUSTER FORGET` of it from a member, which
//! tells it with `KVD.FORGOTTEN`) does not ask until it is restarted. A
//! returning node's old records serve only as a source: the reconfiguration
//! installs what it now holds above them, and it drops the rest.
//!

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::Replicas;
use crate::reply::Reply;
use crate::shared::Shared;

/// How often a node gossips (its heartbeat's period).
pub const GOSSIP_EVERY: Duration = Duration::from_secs(1);
/// How long a call to confirm a member is gone, or to ask for the
/// membership, may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// How often a node outside the membership asks to be added.
const JOIN_EVERY: Duration = Duration::from_secs(2);
/// How long a change may rest half-way before the coordinator finishes it
/// (well above one step's copy, so it does not race a driver still at work).
const STALLED_AFTER: Duration = Duration::from_secs(30);

pub fn spawn(shared: Arc<Shared>, rep: Arc<Replicas>) {
    tokio::spawn(async move {
        let mut last_join = None::<Instant>;
        let mut unchanged_since = (0u64, Instant::now());
        loop {
            tokio::select! {
                _ = shared.shutdown.cancelled() => return,
                _ = tokio::time::sleep(GOSSIP_EVERY) => {}
            }
            let layout = rep.layout();
            if layout.me.is_none() {
                let told_to_leave = rep.left.load(Ordering::Relaxed);
                if !told_to_leave && last_join.is_none_or(|t| t.elapsed() >= JOIN_EVERY) {
                    last_join = Some(Instant::now());
                    rep.ask_to_join().await;
                }
                continue;
            }
            rep.gossip().await;
            rep.take_out_the_down().await;
            rep.finish_a_stalled_change(&mut unchanged_since).await;
        }
    });
}

impl Replicas {
    /// Members whose heartbeat has stood still for `--down-after`, and one
    /// period more: a member may have run for up to a period after the beat
    /// last heard, so none is down sooner than `--down-after` after it
    /// stopped.
    pub fn down_members(&self) -> Vec<String> {
        let layout = self.layout();
        let beats = self.heartbeats.lock();
        let now = Instant::now();
        let patience = self.down_after + GOSSIP_EVERY;
        layout
            .nodes
            .iter()
            .filter(|n| beats.silent_for(n, now).is_some_and(|s| s >= patience))
            .cloned()
            .collect()
    }

    /// Suspect members ([`Replicas::is_suspect`]), down ones included.
    pub fn suspect_members(&self) -> Vec<String> {
        let layout = self.layout();
        layout
            .nodes
            .iter()
            .filter(|n| self.is_suspect(n))
            .cloned()
            .collect()
    }

    /// Whether this node is the cluster's coordinator: the first member, in
    /// the membership's order, that it can reach (itself included).
    fn coordinates(&self, layout: &super::layout::Layout) -> bool {
        let suspects = self.suspect_members();
        let coordinator = layout
            .nodes
            .iter()
            .find(|n| **n == self.addr || !suspects.contains(n));
        coordinator == Some(&self.addr)
    }

    /// If this node coordinates and a member is down, takes it out of the
    /// membership (when the live members can hold R copies of every slot).
    async fn take_out_the_down(self: &Arc<Self>) {
        let down = self.down_members();
        if down.is_empty() {
            return;
        }
        let layout = self.layout();
        if !self.coordinates(&layout) {
            return;
        }
        // Gossip says they are gone; before acting, the coordinator checks
        // for itself (one that answers is only slow to gossip).
        let answers = futures::future::join_all(down.iter().map(|addr| self.answers(addr))).await;
        let down: Vec<String> = down
            .into_iter()
            .zip(answers)
            .filter(|(_, answered)| !answered)
            .map(|(addr, _)| addr)
            .collect();
        if down.is_empty() {
            return;
        }
        let live: Vec<String> = layout
            .target()
            .iter()
            .filter(|n| !down.contains(n))
            .cloned()
            .collect();
        if live.len() < layout.replicas {
            return;
        }
        tracing::warn!(
            down = down.join(","),
            "members down for {:?}: re-homing their replicas on {}",
            self.down_after,
            live.join(",")
        );
        let started = Instant::now();
        let reply = self.reconfigure(live).await;
        if reply.is_error() {
            tracing::warn!("taking out down members failed (tried again in a second): {reply:?}");
            return;
        }
        self.stats
            .down_removed
            .fetch_add(down.len() as u64, Ordering::Relaxed);
        self.stats
            .last_rehome_ms
            .store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// If the membership has stayed half-way through a change (a
    /// transitional layout, [`super::layout::Layout::next_step`]) for
    /// [`STALLED_AFTER`] — its coordinator stopped or was cut off — and this
    /// node coordinates, finishes the change. Nothing waits on a stalled
    /// change (every slot is served by one side or the other), but its
    /// leaving nodes cannot be switched off until it ends.
    async fn finish_a_stalled_change(self: &Arc<Self>, unchanged_since: &mut (u64, Instant)) {
        let layout = self.layout();
        if layout.version != unchanged_since.0 {
            *unchanged_since = (layout.version, Instant::now());
            return;
        }
        if !layout.in_transition() || unchanged_since.1.elapsed() < STALLED_AFTER {
            return;
        }
        if !self.coordinates(&layout) {
            return;
        }
        tracing::warn!(
            version = layout.version,
            "a membership change stopped half-way {:?} ago; finishing it",
            unchanged_since.1.elapsed()
        );
        let reply = self.reconfigure(layout.target().to_vec()).await;
        if reply.is_error() {
            tracing::warn!("finishing the change failed (tried again later): {reply:?}");
        }
        *unchanged_since = (self.layout().version, Instant::now());
    }

    /// Asks a seed, or a member this node remembers, to add it.
    async fn ask_to_join(self: &Arc<Self>) {
        let layout = self.layout();
        let mut contacts: Vec<String> = self.seeds.clone();
        contacts.extend(layout.nodes.iter().cloned());
        contacts.retain(|c| *c != self.addr);
        contacts.dedup();
        let request = vec![Bytes::from_static(b"KVD.JOIN"), Bytes::from(self.addr.clone())];
        for contact in contacts {
            match tokio::time::timeout(PROBE_TIMEOUT * 5, self.peers.call(&contact, &request)).await {
                Ok(Ok(reply)) if !reply.is_error() => {
                    // Added already, or being added: take the membership as
                    // the contact has it (the activation message may have
                    // been missed, and nothing else would tell us).
                    self.learn_membership_from(&contact).await;
                    return;
                }
                Ok(Ok(reply)) => {
                    tracing::info!("{contact} did not add this node yet: {reply:?}");
                    // A contact that is no member itself (a seed taken out
                    // since) still knows who is: ask them next time.
                    self.learn_membership_from(&contact).await;
                }
                Ok(Err(e)) => tracing::debug!("{contact}: {e}"),
                Err(_) => tracing::debug!("{contact}: no answer"),
            }
        }
    }

    /// Whether `addr` answers a call now (and, if it does, the membership it
    /// answers, when newer, is taken).
    async fn answers(&self, addr: &str) -> bool {
        if self.is_cut_off(addr) {
            return false;
        }
        let ask = [Bytes::from_static(b"KVD.CONFIG")];
        let answer = tokio::time::timeout(PROBE_TIMEOUT, self.peers.call(addr, &ask)).await;
        let answered = matches!(answer, Ok(Ok(Reply::Bulk(_))));
        if let Ok(Ok(Reply::Bulk(text))) = &answer {
            self.adopt_if_newer(text);
        }
        self.reached(addr, answered);
        answered
    }

    /// Adopts `contact`'s membership if it is newer than this node's.
    pub(super) async fn learn_membership_from(&self, contact: &str) {
        let ask = [Bytes::from_static(b"KVD.CONFIG")];
        let config = self.peers.call(contact, &ask);
        if let Ok(Ok(Reply::Bulk(text))) = tokio::time::timeout(PROBE_TIMEOUT, config).await {
            self.adopt_if_newer(&text);
        }
    }

    /// Adopts the membership a peer's `KVD.CONFIG` answered, if it is newer
    /// than this node's.
    fn adopt_if_newer(&self, config: &[u8]) {
        let newer = std::str::from_utf8(config)
            .ok()
            .and_then(|t| super::layout::Layout::decode(t, &self.addr))
            .filter(|l| l.version > self.layout().version);
        if let Some(newer) = newer {
            let _ = self.adopt(newer);
        }
    }

    /// `KVD.JOIN addr` on a member: adds the node, in the background (the
    /// joiner learns the new membership when it is activated, or asks again).
    pub fn join(self: &Arc<Self>, addr: String) -> Reply {
        let layout = self.layout();
        if layout.version == 0 || layout.me.is_none() {
            return Reply::error("ERR this node is not a member of a replicated cluster");
        }
        if layout.target().contains(&addr) {
            return Reply::OK;
        }
        let mut nodes = layout.target().to_vec();
        nodes.push(addr);
        let rep = self.clone();
        tokio::spawn(async move {
            let reply = rep.reconfigure(nodes).await;
            if reply.is_error() {
                tracing::info!("adding a node failed (it asks again): {reply:?}");
            }
        });
        Reply::Simple("OK")
    }

    /// `CLUSTER FORGET addr` / `CLUSTER LEAVE` (this node): takes a member out
    /// at once, re-homing its replicas.
    pub async fn forget(self: &Arc<Self>, addr: &str) -> Reply {
        let layout = self.layout();
        if !layout.nodes.iter().any(|n| n == addr) {
            return Reply::error(format!("ERR Unknown node {addr}"));
        }
        let rest: Vec<String> = layout.target().iter().filter(|n| *n != addr).cloned().collect();
        if rest.is_empty() {
            return Reply::error("ERR a cluster cannot forget its last node");
        }
        // Told to leave, it does not ask to be added again (one that does
        // not answer now, being away, will ask when it is back). It is told
        // first: told after the change, it could learn that it is no member
        // in between and ask to be added back (seen in a CI run).
        self.tell_leaving(addr, true).await;
        let reply = self.reconfigure(rest).await;
        if reply.is_error() {
            self.tell_leaving(addr, false).await;
        }
        if super::failpoint("forget-slowly") {
            tokio::time::sleep(Duration::from_secs(3)).await;
        }
        reply
    }

    /// Tells `addr` (this node, or a peer: `KVD.FORGOTTEN [NO]`) whether it
    /// is being taken out for good.
    async fn tell_leaving(&self, addr: &str, leaving: bool) {
        if addr == self.addr {
            self.left.store(leaving, Ordering::Relaxed);
            return;
        }
        let mut tell = vec![Bytes::from_static(b"KVD.FORGOTTEN")];
        if !leaving {
            tell.push(Bytes::from_static(b"NO"));
        }
        let _ = tokio::time::timeout(PROBE_TIMEOUT, self.peers.call(addr, &tell)).await;
    }
}
