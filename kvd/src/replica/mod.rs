//! Replication: every key on R nodes, every change a round of per-key CASPaxos.
//!
//! A replicated cluster is a fixed list of nodes (`--replicas R --peers
//! A,B,C`, the same list on every node). Each hash slot lives on the first R
//! distinct nodes of its consistent-hash preference list ([`crate::cluster::ring`]);
//! those nodes are the *acceptors* of every key in the slot ([`acceptor`]). Any
//! node can *propose* ([`proposer`]): the node a client talks to runs the
//! client's command as one CASPaxos round on the key — prepare on the key's
//! acceptors, take the value a majority shows with the highest ballot, run the
//! command on it, and have a majority accept the result — so every node serves
//! every key, and a command succeeds while a majority of its key's replicas
//! answer. docs/PROTOCOL.md, "Replication", says what is guaranteed.
//!
//! [`repair`] brings replicas that fell behind up to date in the background.
//!
//! Not built yet (the replication issue stays open): changing the node list
//! (joins and leaves; the list is fixed at start) and atomic transactions over
//! several keys.

pub mod acceptor;
pub mod dispatch;
pub mod proposer;
pub mod repair;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;

use crate::cluster::paxos::Ballot;
use crate::cluster::peer::Peers;
use crate::cluster::ring::Placement;
use crate::cluster::slot;
use acceptor::Acceptor;

/// How a replicated node starts: from the command line.
#[derive(Clone, Debug)]
pub struct Options {
    /// This node's address in `nodes`.
    pub me: String,
    /// Every node of the cluster, `host:port`, the same list everywhere.
    pub nodes: Vec<String>,
    pub replicas: usize,
    pub secret: String,
    pub dir: std::path::PathBuf,
}

/// Counters for INFO.
#[derive(Default)]
pub struct Stats {
    pub rounds: AtomicU64,
    /// Changes that took one round trip (phase 1 skipped).
    pub fast: AtomicU64,
    pub conflicts: AtomicU64,
    pub repairs: AtomicU64,
    pub unavailable: AtomicU64,
    /// Anti-entropy: keys checked, whole passes over this node's keys, and
    /// keys found with a replica behind in the last finished pass.
    pub repair_scanned: AtomicU64,
    pub repair_passes: AtomicU64,
    pub behind_last_pass: AtomicU64,
}

pub struct Replicas {
    pub me: usize,
    pub nodes: Vec<String>,
    pub replicas: usize,
    pub secret: String,
    placement: Placement,
    pub peers: Peers,
    pub acceptor: Acceptor,
    proposer_id: u64,
    /// The highest ballot counter this node has seen or used.
    counter: AtomicU64,
    /// Keys this node changed last: the next ballot the acceptors promised us
    /// with that change, and the record they accepted (see `proposer`).
    fast: parking_lot::Mutex<std::collections::HashMap<Bytes, (Ballot, acceptor::Record)>>,
    pub stats: Stats,
}

impl Replicas {
    pub fn start(options: Options) -> anyhow::Result<Arc<Replicas>> {
        let me = options
            .nodes
            .iter()
            .position(|n| *n == options.me)
            .ok_or_else(|| anyhow::anyhow!("--peers must list this node's own address {}", options.me))?;
        let mut sorted = options.nodes.clone();
        sorted.sort();
        sorted.dedup();
        if sorted.len() != options.nodes.len() {
            anyhow::bail!("--peers lists a node twice");
        }
        let replicas = options.replicas.clamp(1, options.nodes.len());
        let ids: Vec<&str> = options.nodes.iter().map(String::as_str).collect();
        let acceptor = Acceptor::open(&options.dir)?;
        let proposer_id = crate::cluster::ring::fnv1a(options.me.as_bytes()) | 1;
        Ok(Arc::new(Replicas {
            me,
            placement: Placement::compute(&ids, replicas),
            peers: Peers::new(options.me.clone(), options.secret.clone()),
            counter: AtomicU64::new(acceptor.floor()),
            acceptor,
            nodes: options.nodes,
            replicas,
            secret: options.secret,
            proposer_id,
            fast: Default::default(),
            stats: Stats::default(),
        }))
    }

    /// The nodes (indices into `nodes`) that hold `key`.
    pub fn holders(&self, key: &[u8]) -> Vec<usize> {
        self.placement
            .holders(slot::key_slot(key))
            .iter()
            .map(|&i| i as usize)
            .collect()
    }

    /// A new ballot above everything this node has seen.
    fn next_ballot(&self) -> Ballot {
        let counter = self.counter.fetch_add(1, Ordering::SeqCst) + 1;
        Ballot {
            counter,
            proposer: self.proposer_id,
        }
    }

    /// Notes a ballot seen elsewhere, so the next one of ours is above it.
    fn saw(&self, b: Ballot) {
        self.counter.fetch_max(b.counter, Ordering::SeqCst);
    }

    pub fn info(&self) -> String {
        let s = &self.stats;
        format!(
            "kvd_replicas:{}\r\nkvd_replica_nodes:{}\r\nkvd_paxos_rounds:{}\r\nkvd_paxos_one_round_trip:{}\r\nkvd_paxos_conflicts:{}\r\nkvd_paxos_repairs:{}\r\nkvd_paxos_unavailable:{}\r\nkvd_repair_keys_checked:{}\r\nkvd_repair_passes:{}\r\nkvd_repair_keys_behind_last_pass:{}\r\n",
            self.replicas,
            self.nodes.len(),
            s.rounds.load(Ordering::Relaxed),
            s.fast.load(Ordering::Relaxed),
            s.conflicts.load(Ordering::Relaxed),
            s.repairs.load(Ordering::Relaxed),
            s.unavailable.load(Ordering::Relaxed),
            s.repair_scanned.load(Ordering::Relaxed),
            s.repair_passes.load(Ordering::Relaxed),
            s.behind_last_pass.load(Ordering::Relaxed),
        )
    }
}

fn number(args: &[Bytes], i: usize) -> Option<u64> {
    std::str::from_utf8(&args[i]).ok()?.parse().ok()
}
