//! The kvd cluster: several nodes serving one keyspace.
//!
//! - [`slot`]: Redis Cluster's 16,384 hash slots (CRC16, `{hash tags}`).
//! - [`ring`]: placement, the slot → nodes map every node computes alike from
//!   the membership (consistent hashing with bounded loads).
//! - [`membership`]: who is in the cluster, by gossip (chitchat).
//! - [`authority`]: which slots this node may execute, persisted; the one
//!   invariant that keeps data correct while slots move.
//! - [`peer`]: authenticated, pooled, pipelined links to other nodes.
//! - [`dispatch`]: per request, run it here, wait, forward it, split it or
//!   redirect the client.
//! - [`migrate`]: the background mover that brings slots to where placement
//!   says they belong.
//! - [`commands`]: `CLUSTER ...` and the internal `KVD.*` peer commands.
//! - [`paxos`]: CASPaxos's rules and ballots, which replication
//!   ([`crate::replica`], a mode of its own for now) runs per key.

pub mod authority;
pub mod commands;
pub mod dispatch;
pub mod membership;
pub mod migrate;
pub mod paxos;
pub mod peer;
pub mod ring;
pub mod slot;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock, RwLockReadGuard};
use tokio::sync::Notify;

use crate::shared::Shared;
use authority::{Authority, SlotState};
use membership::{Member, Membership, Status};
use ring::Placement;
use slot::SLOTS;

/// How a node joins: from the command line.
#[derive(Clone, Debug)]
pub struct Options {
    /// host:port clients and peers reach this node at.
    pub announce: String,
    /// UDP address gossip listens on (the client port + 10,000 by default, like
    /// Redis Cluster's bus port).
    pub gossip: SocketAddr,
    /// Gossip addresses of nodes already in the cluster; none founds a new one.
    pub seeds: Vec<String>,
    pub secret: String,
    pub dir: PathBuf,
    /// Answer -MOVED to every client instead of forwarding.
    pub redirect: bool,
}

/// Counters for INFO cluster and CLUSTER INFO.
#[derive(Default)]
pub struct Stats {
    pub forwarded: AtomicU64,
    pub forwards_per_sec: AtomicU64,
    pub moved_replies: AtomicU64,
    pub keys_moved_in: AtomicU64,
    pub keys_dropped: AtomicU64,
    pub slots_moved_in: AtomicU64,
}

/// The membership as last seen, and what follows from it.
pub struct View {
    /// Every known node, sorted by id.
    pub members: Vec<Member>,
    /// Placement over the nodes with status `member`.
    placement: Placement,
    /// placement index → `members` index.
    placed: Vec<usize>,
    /// slot → index in `members` of the node gossip says serves it.
    served: Vec<Option<u32>>,
    /// A digest of the placement membership: equal on nodes that agree on it.
    pub epoch: u64,
    /// When the placement membership last changed here.
    pub since: Instant,
}

impl View {
    fn build(members: Vec<Member>, previous: Option<&View>) -> View {
        let placed: Vec<usize> = (0..members.len())
            .filter(|&i| members[i].status == Status::Member)
            .collect();
        let ids: Vec<&str> = placed.iter().map(|&i| members[i].id.as_str()).collect();
        let epoch = ids.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, id| {
            id.bytes()
                .chain(std::iter::once(0))
                .fold(h, |h, b| (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3))
        }) >> 1;
        let (placement, since) = match previous {
            Some(p) if p.epoch == epoch => (p.placement.clone(), p.since),
            _ => (Placement::compute(&ids, 1), Instant::now()),
        };
        let mut served = vec![None; SLOTS];
        for (i, m) in members.iter().enumerate() {
            for &(a, b) in &m.serves {
                for s in a..=b {
                    served[s as usize] = Some(i as u32);
                }
            }
        }
        View {
            members,
            placement,
            placed,
            served,
            epoch,
            since,
        }
    }

    /// Where placement says the slot belongs.
    pub fn owner(&self, slot: u16) -> Option<&Member> {
        self.placement
            .owner(slot)
            .map(|i| &self.members[self.placed[i as usize]])
    }

    /// Who gossip says serves the slot now.
    pub fn server(&self, slot: u16) -> Option<&Member> {
        self.served[slot as usize].map(|i| &self.members[i as usize])
    }

    pub fn member(&self, id: &str) -> Option<&Member> {
        self.members
            .binary_search_by(|m| m.id.as_str().cmp(id))
            .ok()
            .map(|i| &self.members[i])
    }
}

/// Where a request on one slot goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// This node serves the slot: execute (while holding the authority guard).
    Local,
    /// The slot is being copied here: wait for it.
    Wait,
    /// Another node serves it (or should): its client address.
    Remote(String),
    /// Nobody known serves it.
    Down,
}

/// A node's cluster state.
pub struct Cluster {
    pub id: String,
    pub addr: String,
    pub secret: String,
    authority: RwLock<Authority>,
    /// Woken whenever this node's slot authority changes.
    pub changed: Notify,
    view: RwLock<Arc<View>>,
    pub peers: peer::Peers,
    membership: Membership,
    status: Mutex<Status>,
    pub stats: Stats,
    /// Answer `-MOVED` to every client instead of forwarding (`cluster-redirect`).
    pub redirect: AtomicBool,
    /// Set when authority changed and gossip has not been told yet.
    publish_pending: AtomicBool,
}

/// This node's id: 40 hex characters like a Redis Cluster node id, created on
/// first start and kept in `<dir>/cluster-node-id`.
fn node_id(dir: &std::path::Path) -> std::io::Result<String> {
    let path = dir.join("cluster-node-id");
    match std::fs::read_to_string(&path) {
        Ok(id) if id.trim().len() == 40 && id.trim().bytes().all(|b| b.is_ascii_hexdigit()) => {
            Ok(id.trim().to_string())
        }
        Ok(_) => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{} does not hold a node id", path.display()),
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            use rand::RngCore;
            let mut b = [0u8; 20];
            rand::thread_rng().fill_bytes(&mut b);
            let id = hex::encode(b);
            std::fs::write(&path, format!("{id}\n"))?;
            Ok(id)
        }
        Err(e) => Err(e),
    }
}

impl Cluster {
    /// Joins (or founds) the cluster and starts the background work.
    pub async fn start(options: Options, shared: Arc<Shared>) -> anyhow::Result<Arc<Cluster>> {
        std::fs::create_dir_all(&options.dir)?;
        let id = node_id(&options.dir)?;
        let authority = Authority::open(&options.dir, options.seeds.is_empty())
            .map_err(|e| anyhow::anyhow!("cannot load the slot authority: {e}"))?;
        let serves = slot::format_ranges(&slot::ranges(authority.slots_where(|s| *s == SlotState::Owned)));
        let membership = Membership::start(
            &id,
            &options.announce,
            options.gossip,
            options.seeds.clone(),
            &options.secret,
            serves,
            Status::Member,
        )
        .await?;
        let members = membership.members().await;
        let cluster = Arc::new(Cluster {
            peers: peer::Peers::new(id.clone(), options.secret.clone(), None),
            id,
            addr: options.announce.clone(),
            secret: options.secret,
            authority: RwLock::new(authority),
            changed: Notify::new(),
            view: RwLock::new(Arc::new(View::build(members, None))),
            membership,
            status: Mutex::new(Status::Member),
            stats: Stats::default(),
            redirect: AtomicBool::new(options.redirect),
            publish_pending: AtomicBool::new(false),
        });
        tracing::info!(
            "cluster node {} at {} ({} slots served here, gossip on {})",
            cluster.id,
            cluster.addr,
            cluster.authority.read().owned_count(),
            options.gossip
        );
        tokio::spawn(refresh_loop(cluster.clone(), shared.clone()));
        tokio::spawn(migrate::run(cluster.clone(), shared));
        Ok(cluster)
    }

    pub fn view(&self) -> Arc<View> {
        self.view.read().clone()
    }

    pub fn status(&self) -> Status {
        *self.status.lock()
    }

    /// The authority, held for reading while a command executes locally: a
    /// hand-off (which takes it for writing) then cannot interleave.
    pub fn authority(&self) -> RwLockReadGuard<'_, Authority> {
        self.authority.read()
    }

    /// Where a request on `slot` goes, given the authority guard the caller holds.
    pub fn route(&self, auth: &Authority, slot: u16) -> Route {
        match auth.state(slot) {
            SlotState::Owned => Route::Local,
            SlotState::Importing { .. } => Route::Wait,
            SlotState::HandedOff { to } => match self.view().member(to) {
                Some(m) => Route::Remote(m.addr.clone()),
                None => Route::Down,
            },
            SlotState::Absent => {
                let view = self.view();
                let target = view
                    .server(slot)
                    .filter(|m| m.id != self.id)
                    .or_else(|| view.owner(slot).filter(|m| m.id != self.id));
                match target {
                    Some(m) => Route::Remote(m.addr.clone()),
                    None => Route::Down,
                }
            }
        }
    }

    /// Changes slot states (persisted), wakes waiters, and schedules gossip.
    pub fn set_slots(&self, slots: &[u16], state: SlotState) -> std::io::Result<()> {
        self.authority.write().set(slots, state)?;
        self.after_authority_change();
        Ok(())
    }

    /// Runs `f` with the authority held for writing (no command executes
    /// meanwhile), then wakes waiters and schedules gossip.
    pub fn with_authority<R>(&self, f: impl FnOnce(&mut Authority) -> R) -> R {
        let r = f(&mut self.authority.write());
        self.after_authority_change();
        r
    }

    fn after_authority_change(&self) {
        self.publish_pending.store(true, Ordering::Release);
        self.changed.notify_waiters();
    }

    /// Starts leaving: placement stops counting this node, the others take
    /// its slots, and once it serves none its status becomes `left`.
    pub async fn leave(&self) {
        *self.status.lock() = Status::Leaving;
        self.membership
            .publish("status", Status::Leaving.as_str().into())
            .await;
    }

    async fn publish(&self) {
        if self.publish_pending.swap(false, Ordering::AcqRel) {
            let (serves, settled) = {
                let auth = self.authority.read();
                let owned = auth.slots_where(|s| *s == SlotState::Owned);
                // Nothing served and nothing in flight either way.
                let settled = owned.is_empty() && auth.slots_where(|s| *s != SlotState::Absent).is_empty();
                (slot::format_ranges(&slot::ranges(owned)), settled)
            };
            self.membership.publish("slots", serves).await;
            let leaving = *self.status.lock() == Status::Leaving;
            if leaving && settled {
                *self.status.lock() = Status::Left;
                self.membership
                    .publish("status", Status::Left.as_str().into())
                    .await;
                tracing::info!("this node serves no slots any more: it has left the cluster");
            }
        }
    }
}

/// Follows gossip: refreshes the view, publishes our slots, samples counters.
async fn refresh_loop(cluster: Arc<Cluster>, shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(membership::GOSSIP_INTERVAL);
    let mut last = (Instant::now(), 0u64);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shared.shutdown.cancelled() => return,
        }
        cluster.publish().await;
        let members = cluster.membership.members().await;
        let changed = cluster.view.read().members != members;
        if changed {
            let view = View::build(members, Some(&cluster.view()));
            *cluster.view.write() = Arc::new(view);
        }
        if last.0.elapsed() >= Duration::from_secs(1) {
            let now = cluster.stats.forwarded.load(Ordering::Relaxed);
            let rate = (now.saturating_sub(last.1) as f64 / last.0.elapsed().as_secs_f64()) as u64;
            cluster.stats.forwards_per_sec.store(rate, Ordering::Relaxed);
            last = (Instant::now(), now);
            // Leaving with nothing left to hand off: say so (publish decides).
            if cluster.status() == Status::Leaving {
                cluster.publish_pending.store(true, Ordering::Release);
            }
        }
    }
}

/// Per-connection cluster state.
#[derive(Default)]
pub struct SessionState {
    /// The challenge sent to a connecting peer, awaiting its proof.
    pub challenge: Option<String>,
    /// Set once the connection proved it is a peer node (its id).
    pub peer: Option<String>,
    /// The client asked for cluster redirects (READONLY/READWRITE/ASKING or a
    /// topology query): answer `-MOVED` rather than forwarding.
    pub aware: bool,
    /// The slot the current WATCH/MULTI is bound to.
    pub txn_slot: Option<u16>,
    /// A WATCH placed on another node, over a connection of its own.
    pub txn_link: Option<(String, peer::Link)>,
    /// Replicated nodes: each watched key and its accepted ballot at WATCH.
    pub watched: Vec<(bytes::Bytes, paxos::Ballot)>,
}

impl SessionState {
    pub fn end_transaction(&mut self) {
        self.txn_slot = None;
        self.txn_link = None;
    }
}
