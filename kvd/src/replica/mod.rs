//! Replication: every key on R nodes, every change a round of per-key CASPaxos.
//!
//! A replicated cluster is a list of nodes, versioned ([`layout`]): the
//! `--peers` list to begin with, changed by `KVD.RECONFIGURE`
//! ([`reconfigure`]). Each hash slot lives on the first R distinct nodes of
//! its consistent-hash preference list ([`crate::cluster::ring`]); those nodes
//! are the *acceptors* of every key in the slot ([`acceptor`]). Any node can
//! *propose* ([`proposer`]): the node a client talks to runs the client's
//! command as one CASPaxos round on the key — prepare on the key's acceptors,
//! take the value a majority shows with the highest ballot, run the command on
//! it, and have a majority accept the result — so every node serves every key,
//! and a command succeeds while a majority of its key's replicas answer.
//! docs/PROTOCOL.md, "Replication", says what is guaranteed.
//!
//! [`repair`] brings replicas that fell behind up to date in the background,
//! and drops what a node no longer holds after a reconfiguration.
//!
//! A MULTI/EXEC over several keys of one slot is atomic: [`txn`] locks its
//! keys and decides it in one round on a status key.

pub mod acceptor;
pub mod cluster_view;
pub mod dispatch;
pub mod gossip;
pub mod health;
pub mod key_locks;
pub mod layout;
pub mod network;
pub mod proposer;
pub mod reconfigure;
pub mod repair;
pub mod txn;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;

use crate::cluster::paxos::Ballot;
use crate::cluster::peer::Peers;
use crate::cluster::slot;
use crate::reply::Reply;
use acceptor::Acceptor;
pub use layout::FirstStart;
use layout::{Layout, Membership};
use proposer::Proposer;

/// How a replicated node starts: from the command line.
#[derive(Clone)]
pub struct Options {
    /// This node's address, as the other nodes reach it.
    pub me: String,
    /// What to do when `dir` records no membership: found a cluster (of the
    /// `--peers` list, or alone) or wait to be added.
    pub first_start: FirstStart,
    pub replicas: usize,
    pub secret: String,
    pub dir: std::path::PathBuf,
    /// Members to ask to be added by, while this node is not one (`--seed`).
    pub seeds: Vec<String>,
    /// TLS for the links to peers (`tls-replication yes`).
    pub tls: Option<tokio_rustls::TlsConnector>,
    /// How long a member may not answer before it is down and its replicas
    /// are re-homed (`--down-after`; [`health`]).
    pub down_after: std::time::Duration,
    /// This node's ports for clients, gossiped so that CLUSTER SLOTS can
    /// answer each client with the port of its kind.
    pub client_ports: gossip::ClientPorts,
}

impl crate::shared::ClusterInfo for Replicas {
    fn info(&self) -> String {
        Replicas::info(self)
    }
}

/// Counters for INFO (the proposer keeps its own: [`proposer::Stats`]).
#[derive(Default)]
pub struct Stats {
    /// Anti-entropy: keys checked, whole passes over this node's keys, and
    /// keys found with a replica behind in the last finished pass.
    pub repair_scanned: AtomicU64,
    pub repair_passes: AtomicU64,
    /// Slots whose every answering holder had this node's digest at the
    /// start of the last pass (their keys were not compared one by one).
    pub slots_in_agreement: AtomicU64,
    pub behind_last_pass: AtomicU64,
    /// Keys of slots this node no longer holds, dropped after a reconfiguration.
    pub dropped: AtomicU64,
    /// Dead records (tombstones, long-expired values) purged from every
    /// replica by this node's anti-entropy.
    pub purged: AtomicU64,
    /// Transactions over several keys whose coordinator stopped after the
    /// commit, finished by this node's anti-entropy ([`txn::Txns::sweep`]).
    pub txns_finished: AtomicU64,
    /// Members this node took out of the membership because they were down,
    /// and how long the last such re-homing took.
    pub down_removed: AtomicU64,
    pub last_rehome_ms: AtomicU64,
    /// Slots whose records a reconfiguration run from this node copied, and
    /// the keys it installed.
    pub slots_moved: AtomicU64,
    pub keys_copied: AtomicU64,
}

pub struct Replicas {
    /// This node's address.
    pub addr: String,
    pub secret: String,
    membership: parking_lot::RwLock<Membership>,
    pub peers: Peers,
    pub acceptor: Acceptor,
    pub proposer: Proposer,
    /// Transactions over several keys: the outcomes this node has learned.
    pub txns: txn::Txns,
    /// One reconfiguration at a time from this node.
    pub(crate) reconfiguring: tokio::sync::Mutex<()>,
    /// Nodes this node's last call to failed, since when (cleared by the
    /// next answer): suspect, and down past `down_after` ([`health`]).
    unreachable: parking_lot::Mutex<std::collections::HashMap<String, std::time::Instant>>,
    /// Every member's heartbeat as last heard ([`gossip`]).
    heartbeats: parking_lot::Mutex<gossip::Heartbeats>,
    seeds: Vec<String>,
    /// Set when this node was told to leave: `CLUSTER LEAVE` on it, or
    /// `CLUSTER FORGET` of it from a member while it ran (`KVD.FORGOTTEN`).
    /// Until it restarts it does not ask to be added again; a node taken out
    /// only because it was away (down) asks as soon as it is back.
    pub(crate) left: std::sync::atomic::AtomicBool,
    /// Set when a member that did not answer answers again: the catch-up
    /// pass starts over at once instead of finishing a pass that skipped it.
    pub(crate) came_back: std::sync::atomic::AtomicBool,
    down_after: std::time::Duration,
    /// Fault injection for tests (`KVD.PARTITION`, with `KVD_FAILPOINTS=partition`):
    /// nodes this node's peer calls pretend they cannot reach.
    cut_off: parking_lot::RwLock<std::collections::HashSet<String>>,
    pub stats: Stats,
}

impl Replicas {
    pub fn start(options: Options) -> anyhow::Result<Arc<Replicas>> {
        let acceptor = Acceptor::open(&options.dir)?;
        let membership = Membership::open(&options.dir, &options.me, &options.first_start, options.replicas)?;
        if let Some(nodes) = (membership.layout.version > 0).then(|| &membership.layout.nodes) {
            if membership.layout.me.is_none() {
                tracing::warn!(
                    "this node ({}) is not in the cluster's node list ({}): it proposes but holds no keys",
                    options.me,
                    nodes.join(",")
                );
            }
            // A member asks no seed anything: a seed outside its membership
            // may be a node of another cluster (two founders), which this
            // node will not join by itself.
            let strangers: Vec<&String> = options.seeds.iter().filter(|s| !nodes.contains(s)).collect();
            if membership.layout.me.is_some()
                && !strangers.is_empty()
                && strangers.len() == options.seeds.len()
            {
                tracing::warn!(
                    "--seed {} is not a member of this node's cluster ({}), recorded in {}: the seed is ignored and this node stays in its own cluster. To join the seed's cluster instead, start this node with an empty --dir; to make the two clusters one, run KVD.RECONFIGURE on a member of either, listing every node",
                    strangers.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(","),
                    nodes.join(","),
                    options.dir.join("replica-config").display()
                );
            }
        }
        let generation = gossip::generation(&options.dir)?;
        let proposer_id = crate::cluster::ring::fnv1a(options.me.as_bytes()) | 1;
        Ok(Arc::new(Replicas {
            proposer: Proposer::new(proposer_id, acceptor.floor()),
            txns: txn::Txns::default(),
            heartbeats: parking_lot::Mutex::new(gossip::Heartbeats::new(
                &options.me,
                generation,
                options.client_ports,
            )),
            acceptor,
            membership: parking_lot::RwLock::new(membership),
            peers: Peers::new(options.me.clone(), options.secret.clone(), options.tls.clone()),
            addr: options.me,
            secret: options.secret,
            reconfiguring: tokio::sync::Mutex::new(()),
            unreachable: Default::default(),
            seeds: options.seeds,
            left: std::sync::atomic::AtomicBool::new(false),
            came_back: std::sync::atomic::AtomicBool::new(false),
            down_after: options.down_after,
            cut_off: Default::default(),
            stats: Stats::default(),
        }))
    }

    /// Sends a PUBLISHed message to every other member, for its subscribers
    /// (`KVD.PUBLISH`), in the background: delivery is at most once, as
    /// Redis Cluster's.
    pub fn broadcast(self: &Arc<Self>, channel: &Bytes, message: &Bytes) {
        let layout = self.layout();
        let request = [
            Bytes::from_static(b"KVD.PUBLISH"),
            channel.clone(),
            message.clone(),
        ];
        for addr in layout.nodes.iter().filter(|a| **a != self.addr) {
            let (rep, addr, request) = (self.clone(), addr.clone(), request.clone());
            tokio::spawn(async move {
                let _ =
                    tokio::time::timeout(std::time::Duration::from_secs(1), rep.peers.call(&addr, &request))
                        .await;
            });
        }
    }

    /// The membership as this node knows it now.
    pub fn layout(&self) -> Arc<Layout> {
        self.membership.read().layout.clone()
    }

    /// Whether this node's acceptor may act on a message about `key` made at
    /// membership `version`; the refusal to answer if not. Another version is
    /// `KVDCONFIG <ours>` (the proposer brings the side behind up to date), a
    /// slot being moved is `TRYAGAIN`.
    ///
    /// The caller holds the returned guard while it acts: a freeze or a new
    /// membership (which take the lock exclusively) then waits for the act to
    /// finish, so nothing is accepted on a slot after its freeze was
    /// acknowledged — the copy a reconfiguration makes next would miss it.
    pub fn admit(
        &self,
        key: &[u8],
        version: u64,
    ) -> Result<parking_lot::RwLockReadGuard<'_, Membership>, Reply> {
        let m = self.membership.read();
        if version != m.layout.version {
            return Err(version_refusal(m.layout.version));
        }
        let slot = slot::key_slot(key);
        if m.is_frozen(slot) {
            return Err(Reply::error(format!(
                "TRYAGAIN slot {slot} is moving to other replicas (the cluster's membership is changing); try again"
            )));
        }
        Ok(m)
    }

    /// The vote on the next membership, phase 1: promise `b` and answer the
    /// vote this node accepted, if any ([`layout::Membership::promise`]).
    pub fn vote_promise(&self, version: u64, b: Ballot) -> Result<Option<(Ballot, String)>, Reply> {
        let mut m = self.membership.write();
        if version != m.layout.version {
            return Err(version_refusal(m.layout.version));
        }
        match m.promise(b) {
            Ok(Ok(voted)) => Ok(voted),
            Ok(Err(beaten)) => Err(network::ballot_error(beaten)),
            Err(e) => Err(Reply::error(format!("ERR recording the vote: {e}"))),
        }
    }

    /// The vote, phase 2, with the freeze of `slots` it carries: from now on
    /// this acceptor takes nothing on them at `version`.
    pub fn freeze(&self, version: u64, b: Ballot, target: &str, slots: &[(u16, u16)]) -> Result<(), Reply> {
        let mut m = self.membership.write();
        if version != m.layout.version {
            return Err(version_refusal(m.layout.version));
        }
        match m.freeze(b, target, slots) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(beaten)) => Err(network::ballot_error(beaten)),
            Err(e) => Err(Reply::error(format!("ERR recording frozen slots: {e}"))),
        }
    }

    pub fn is_frozen(&self, slot: u16) -> bool {
        self.membership.read().is_frozen(slot)
    }

    /// Takes a newer membership (durably); whether it was newer.
    pub fn adopt(&self, layout: Layout) -> Result<bool, Reply> {
        let version = layout.version;
        let newer = self
            .membership
            .write()
            .adopt(layout)
            .map_err(|e| Reply::error(format!("ERR recording the membership: {e}")))?;
        if newer {
            // Promised next ballots belong to the old version.
            self.proposer.forget_promises();
            tracing::info!(version, "adopted a new cluster membership");
        }
        Ok(newer)
    }

    /// Records whether a call to `addr` got through (for INFO).
    pub(crate) fn reached(&self, addr: &str, ok: bool) {
        let mut unreachable = self.unreachable.lock();
        if ok {
            if unreachable.remove(addr).is_some() {
                // Back from an absence: catch-up starts a pass now.
                self.came_back.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        } else if !unreachable.contains_key(addr) {
            unreachable.insert(addr.to_string(), std::time::Instant::now());
        }
    }

    /// Whether this node's last call to `addr` failed.
    pub(crate) fn failed_last_call(&self, addr: &str) -> bool {
        self.unreachable.lock().contains_key(addr)
    }

    /// Whether `addr` is suspect: this node's last call to it failed, or its
    /// heartbeat has stood still longer than gossip takes to bring it
    /// ([`gossip`]).
    pub(crate) fn is_suspect(&self, addr: &str) -> bool {
        if self.failed_last_call(addr) {
            return true;
        }
        let beats = self.heartbeats.lock();
        let patience = beats.suspect_after(health::GOSSIP_EVERY);
        beats
            .silent_for(addr, std::time::Instant::now())
            .is_some_and(|silent| silent >= patience)
    }

    /// Whether a test has cut this node off from `addr` (`KVD.PARTITION`).
    pub(crate) fn is_cut_off(&self, addr: &str) -> bool {
        let cut = self.cut_off.read();
        !cut.is_empty() && cut.contains(addr)
    }

    /// `KVD.PARTITION [addr ...]`: from now on this node's calls to these
    /// nodes fail as if the network between them were cut (none: healed).
    pub fn partition(&self, addrs: Vec<String>) {
        *self.cut_off.write() = addrs.into_iter().collect();
    }

    /// Slots with a holder this node last found unreachable, and how many
    /// such nodes there are.
    fn under_replicated(&self, layout: &Layout) -> (usize, usize) {
        let down: Vec<usize> = (0..layout.nodes.len())
            .filter(|&i| self.is_suspect(&layout.nodes[i]))
            .collect();
        if down.is_empty() {
            return (0, 0);
        }
        let slots = (0..slot::SLOTS as u16)
            .filter(|&s| layout.slot_holders(s).iter().any(|h| down.contains(h)))
            .count();
        (slots, down.len())
    }

    pub fn info(&self) -> String {
        let s = &self.stats;
        let p = &self.proposer.stats;
        let (layout, frozen, frozen_slots) = {
            let m = self.membership.read();
            let frozen_slots: Vec<u16> = (0..slot::SLOTS as u16).filter(|&s| m.is_frozen(s)).collect();
            (m.layout.clone(), m.frozen_count, frozen_slots)
        };
        let (under_replicated, unreachable) = self.under_replicated(&layout);
        let health = format!(
            "kvd_replica_suspect_nodes:{}\r\nkvd_replica_down_nodes:{}\r\nkvd_down_after_seconds:{}\r\nkvd_down_members_removed:{}\r\nkvd_last_rehome_ms:{}\r\n",
            self.suspect_members().join(","),
            self.down_members().join(","),
            self.down_after.as_secs(),
            s.down_removed.load(Ordering::Relaxed),
            s.last_rehome_ms.load(Ordering::Relaxed),
        );
        // A change of membership under way: the list it is heading to (the
        // members above include the nodes it is taking out until its end).
        // What this node holds of the slots still to move (the step being
        // copied, frozen, and those of later steps): what it may have to send
        // (each slot is copied from one of its holders).
        let to_move = layout.slots_to_move();
        let mut copying = to_move.clone();
        copying.extend(&frozen_slots);
        copying.sort_unstable();
        copying.dedup();
        let me = layout.nodes.iter().position(|n| *n == self.addr);
        let held = me.map_or(Vec::new(), |i| layout.held_by(i, &copying));
        let (keys, bytes) = self.acceptor.held(held);
        let change = format!(
            "kvd_replica_change_in_progress:{}\r\nkvd_replica_target_members:{}\r\nkvd_replica_slots_left_to_move:{}\r\nkvd_replica_keys_to_copy:{keys}\r\nkvd_replica_bytes_to_copy:{bytes}\r\n",
            layout.in_transition() as u8,
            layout.target().join(","),
            to_move.len(),
        );
        health + &change + &format!(
            "kvd_under_replicated_slots:{under_replicated}\r\nkvd_replica_nodes_unreachable:{unreachable}\r\nkvd_replicas:{}\r\nkvd_replica_nodes:{}\r\nkvd_replica_members:{}\r\nkvd_replica_config_version:{}\r\nkvd_replica_frozen_slots:{}\r\nkvd_repair_keys_dropped:{}\r\nkvd_tombstones_purged:{}\r\nkvd_txns_finished:{}\r\nkvd_reconfigure_slots_moved:{}\r\nkvd_reconfigure_keys_copied:{}\r\nkvd_paxos_rounds:{}\r\nkvd_paxos_one_round_trip:{}\r\nkvd_paxos_conflicts:{}\r\nkvd_paxos_repairs:{}\r\nkvd_paxos_relayed:{}\r\nkvd_paxos_settled:{}\r\nkvd_commands_waited_for_moves:{}\r\nkvd_paxos_unavailable:{}\r\nkvd_repair_keys_checked:{}\r\nkvd_repair_passes:{}\r\nkvd_repair_keys_behind_last_pass:{}\r\nkvd_repair_slots_in_agreement:{}\r\n",
            layout.replicas,
            layout.nodes.len(),
            layout.nodes.join(","),
            layout.version,
            frozen,
            s.dropped.load(Ordering::Relaxed),
            s.purged.load(Ordering::Relaxed),
            s.txns_finished.load(Ordering::Relaxed),
            s.slots_moved.load(Ordering::Relaxed),
            s.keys_copied.load(Ordering::Relaxed),
            p.rounds.load(Ordering::Relaxed),
            p.fast.load(Ordering::Relaxed),
            p.conflicts.load(Ordering::Relaxed),
            p.repairs.load(Ordering::Relaxed),
            p.relayed.load(Ordering::Relaxed),
            p.settled.load(Ordering::Relaxed),
            p.waited_for_moves.load(Ordering::Relaxed),
            p.unavailable.load(Ordering::Relaxed),
            s.repair_scanned.load(Ordering::Relaxed),
            s.repair_passes.load(Ordering::Relaxed),
            s.behind_last_pass.load(Ordering::Relaxed),
            s.slots_in_agreement.load(Ordering::Relaxed),
        )
    }
}

pub(crate) use crate::failpoint::failpoint;

/// An acceptor's refusal of a message made at another membership version
/// than its own, `version` (the proposer parses it: [`proposer`]).
pub(crate) fn version_refusal(version: u64) -> Reply {
    Reply::error(format!("KVDCONFIG {version}"))
}

fn number(args: &[Bytes], i: usize) -> Option<u64> {
    std::str::from_utf8(&args[i]).ok()?.parse().ok()
}
