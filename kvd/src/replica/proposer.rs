//! The proposer half of per-key CASPaxos: one round per client command.
//!
//! A change is `f(current) -> (reply, new)`: prepare with a fresh ballot on the
//! key's replicas; with promises from a majority take the record with the
//! highest accepted ballot, compute `f`, and have a majority accept the result.
//! Reads skip the promise: they ask a majority what it accepted, and if all
//! those answers name the same ballot, that value is chosen (a majority holds
//! it) and no later-acknowledged write can be missing from it; otherwise they
//! run the full round, writing the highest value back (a repair).
//!
//! A change after a change of our own skips phase 1: each accept also promises
//! this proposer's next ballot for the key (the CASPaxos paper's one-round-trip
//! optimization), so while nobody else prepares the key, the next change is
//! one accept. Anyone else's prepare makes that accept fail where it matters,
//! and the full round runs.
//!
//! Retrying is safe only when every replica refused the attempt or never got
//! it: a value accepted by even one replica may still be chosen by a later
//! round, so after an accept phase that fell short the proposer waits for every
//! replica's answer (or timeout), and if any may have accepted, answers an
//! error that says the outcome is unknown instead of running again. (The
//! linearizability test found the version that retried after only a majority
//! had refused.)
//!
//! This module is the proposer's rules and nothing else: it reaches acceptors
//! only through the [`Network`] trait, as openraft's engine reaches the world
//! through its network and storage traits. The running node's network is
//! [`super::network::NodeNetwork`] (this node's acceptor, peer links, the
//! membership); the simulation in `protocol-tests/tests/paxos_sim.rs` drives
//! these very rules, with real [`super::acceptor::Acceptor`]s, through a
//! simulated network that delays, loses and reorders messages and crashes
//! nodes, and checks every history for linearizability.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};
use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::acceptor::{Lock, Record};
use super::key_locks::KeyLocks;
use super::layout::{epoch, Layout};
use crate::cluster::paxos::{majority, Ballot};
use crate::db::now_ms;
use crate::reply::Reply;
use crate::store::Entry;

/// Settling rounds ([`Proposer::settle`]) beaten by other proposers before
/// the answer stays "may or may not".
const SETTLE_ATTEMPTS: usize = 3;
/// Attempts beaten by other proposers before giving up.
const ATTEMPTS: usize = 20;
/// Keys remembered for one-round-trip changes (forgotten all at once past this).
const FAST_KEYS: usize = 100_000;
/// Queries a read makes while the key keeps changing under it, before it
/// prepares (which cuts off a write under way).
const READ_TRIES: usize = 5;
/// How long a command waits for its key's slot to finish moving (a
/// reconfiguration copies about 100 MB a second) before answering TRYAGAIN.
const MOVE_WAIT: Duration = Duration::from_secs(10);
/// How an acceptor's refusal for a slot being moved begins ([`Replicas::admit`]).
pub(super) const MOVING: &str = "TRYAGAIN slot ";
/// The answer to a command whose rounds kept meeting another membership.
const MEMBERSHIP_CHANGING: &str =
    "TRYAGAIN the cluster's membership kept changing during this command; try again";
/// Rounds refused for another membership version before giving up.
const VERSION_RETRIES: usize = 4;

/// What a command made of a key's current record.
pub struct Change {
    pub reply: Reply,
    /// The key's live value after the command (the one it was given when it
    /// changed nothing).
    pub value: Option<Entry>,
    /// The command touched the key even if the value stayed the same, as a
    /// SET of the same value does: Redis fails a WATCH of it, so the round
    /// writes it at a new ballot instead of leaving the key alone.
    pub touched: bool,
    /// The transaction lock the key holds afterwards ([`super::txn`]):
    /// `None` for a command's change (it runs on the key as its
    /// transaction, if any, decided it, and the write clears the lock).
    pub lock: Option<Lock>,
}

impl Change {
    /// A command that left `current` as it was (a read).
    pub fn none(reply: Reply, current: &Record) -> Change {
        Change {
            reply,
            value: current.live(now_ms()).cloned(),
            touched: false,
            lock: current.lock.clone(),
        }
    }

    /// Whether writing this change would change `current`.
    fn changes(&self, current: &Record) -> bool {
        self.touched || self.value.as_ref() != current.live(now_ms()) || self.lock != current.lock
    }
}

/// What a round may assume about the key.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Mode {
    /// A read: tries one query round first.
    Read,
    /// A write: one round trip when this node made the key's last change.
    Write,
    /// A write whose decision rests on the key's state now (EXEC under WATCH):
    /// always prepares, so it decides on what a majority holds rather than on
    /// this node's memory of its own last change. On the short path, another
    /// node's write since is noticed only by the replicas' refusal, and if a
    /// lagging replica took ours meanwhile the answer could only be "may or may
    /// not have taken effect" where the transaction should simply abort.
    Guarded,
}

/// The record with the highest accepted ballot among `records` (none: the
/// empty record): the key's value as those replicas show it.
pub(super) fn highest_of(records: &[Record]) -> Record {
    records
        .iter()
        .max_by_key(|r| r.accepted)
        .cloned()
        .unwrap_or_default()
}

/// What a settling round found out about a write that fell short
/// ([`Proposer::settle`]).
enum Settled {
    /// The write is in the value a majority holds at this ballot.
    Applied(Ballot),
    /// The write never took effect, and never will.
    Lost,
    /// A majority shows records that cannot tell.
    Unknown,
    /// No majority answered: replicas down, or (`moving`) the key's slot
    /// frozen for a move or the membership changed under the write, which
    /// is over soon and leaves records that can tell.
    Unreachable { moving: bool },
}

/// How one round ended.
enum Round {
    Done(Reply, Ballot),
    /// Refused, with nothing accepted, by replicas at another membership version.
    OtherVersion(Vec<(String, u64)>),
    /// A write accepted at `ours` by some replicas as its slot began to
    /// move: whether it took effect is known once the move is over
    /// ([`Proposer::settle_after_move`]); `reply` if it did, `uncertain` if
    /// that cannot be learned.
    AfterMove {
        ours: Ballot,
        reply: Reply,
        uncertain: Reply,
    },
}

#[derive(Clone)]
pub enum Msg {
    /// What did you accept? (At a membership version: a node of another
    /// version may not hold the key any more.)
    Query(u64),
    Prepare(Ballot),
    /// Accept the record (at its ballot), and promise the second ballot next.
    Accept(Record, Option<Ballot>),
}

/// One replica's answer.
pub enum Answer {
    Record(Record),
    Accepted,
    Beaten(Ballot),
    /// The acceptor is at another membership version (it acted on nothing).
    Version(u64),
    /// The key's slot is being moved (it acted on nothing): `TRYAGAIN ...`.
    Frozen(String),
}

/// Why a replica gave no answer, and whether the message may have arrived.
pub struct Failure {
    pub text: String,
    /// A lost link or a timeout may come after the acceptor acted; a node
    /// that could not be reached at all never got the message.
    pub maybe_delivered: bool,
}

/// What a proposer needs from the node it runs on: the membership, its own
/// acceptor and the others'. Nothing else of the node is visible to the
/// rules here, so the simulation can put a network of its own behind them.
pub trait Network: Send + Sync {
    /// The membership as this node knows it now.
    fn layout(&self) -> Arc<Layout>;
    /// One phase on this node's own acceptor (no network between).
    fn local(&self, key: &Bytes, msg: &Msg) -> Result<Answer, Failure>;
    /// One phase on the acceptor at `addr`. The call goes on after the
    /// proposer stops waiting (every reachable replica gets every message),
    /// so it owns what it needs.
    fn ask(
        &self,
        addr: &str,
        key: &Bytes,
        msg: &Msg,
    ) -> impl Future<Output = Result<Answer, Failure>> + Send + 'static;
    /// Replicas answered at other membership versions than `version`
    /// (nothing was accepted there): bring whichever side is behind up to
    /// date, if this node is still at `version`.
    fn sync_versions(
        &self,
        version: u64,
        others: Vec<(String, u64)>,
    ) -> impl Future<Output = ()> + Send + 'static;
    /// Milliseconds since the Unix epoch, as the cluster's clocks tell them
    /// (a transaction's lock records when it was taken, and anyone may abort
    /// it some seconds later: [`super::txn`]). A simulation tells its own.
    fn now_ms(&self) -> u64 {
        now_ms()
    }
}

/// Counters for INFO.
#[derive(Default)]
pub struct Stats {
    pub rounds: AtomicU64,
    /// Changes that took one round trip (phase 1 skipped).
    pub fast: AtomicU64,
    pub conflicts: AtomicU64,
    pub repairs: AtomicU64,
    /// Commands that waited for their key's slot to finish moving.
    pub waited_for_moves: AtomicU64,
    /// Lagging replicas brought up to date by sending them the highest
    /// record's accept again (by a read or by anti-entropy), with no new ballot.
    pub relayed: AtomicU64,
    /// Writes that fell short of a majority whose outcome a settling round
    /// made known (yes or no) instead of "may or may not take effect".
    pub settled: AtomicU64,
    pub unavailable: AtomicU64,
}

/// One node's proposer: its ballots, what it remembers of its own last
/// changes, and one proposal per key at a time.
pub struct Proposer {
    id: u64,
    /// The highest ballot counter this node has seen or used.
    counter: AtomicU64,
    /// Keys this node changed last: the next ballot the acceptors promised us
    /// with that change, and the record they accepted.
    fast: Mutex<HashMap<Bytes, (Ballot, Record)>>,
    /// Since when (at which membership version) commands have been refused
    /// because their slot is moving (see `moves_stuck`).
    moving_since: Mutex<Option<(u64, Instant)>>,
    /// One proposal per key at a time from this node ([`super::key_locks`]).
    pub key_locks: KeyLocks,
    /// The jitter of back-offs after a conflict, seeded by the proposer's id
    /// so a simulated run replays from its seed.
    jitter: Mutex<StdRng>,
    pub stats: Stats,
}

/// When a phase stops waiting for answers (each peer's call goes on
/// regardless, so every reachable replica gets every message).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Until {
    /// A majority succeeded, or can no longer succeed.
    Majority,
    /// A majority succeeded, or every holder answered or timed out: a new
    /// proposal's accept that fell short may be retried only if none of them
    /// may have taken it.
    MajorityOrSettled,
    /// Every holder answered or timed out.
    Every,
}

/// What a phase gathered.
struct Gathered {
    records: Vec<Record>,
    accepted: usize,
    beaten: Option<Ballot>,
    failures: Vec<String>,
    /// Failures after which the message may have arrived (a lost link, a
    /// timeout), as opposed to never sent (the node could not be reached).
    maybe_delivered: usize,
    /// Replicas at another membership version, and theirs.
    other_version: Vec<(String, u64)>,
    /// A replica's refusal because the key's slot is moving.
    frozen: Option<String>,
}

impl Gathered {
    /// Whether a phase that fell short did so because replicas are at another
    /// membership version (rather than down or beaten).
    fn stale(&self) -> bool {
        !self.other_version.is_empty()
    }
}

impl Proposer {
    /// A proposer whose ballots are `id`'s, above `floor` (its own acceptor's:
    /// nothing below it is taken there after a restart).
    pub fn new(id: u64, floor: u64) -> Proposer {
        Proposer {
            id,
            counter: AtomicU64::new(floor),
            fast: Mutex::default(),
            moving_since: Mutex::default(),
            key_locks: KeyLocks::default(),
            jitter: Mutex::new(StdRng::seed_from_u64(id)),
            stats: Stats::default(),
        }
    }

    /// A new ballot above everything this node has seen.
    pub fn next_ballot(&self, layout: &Layout) -> Ballot {
        let first = layout.first_counter();
        let counter = self
            .counter
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |c| Some(c.max(first) + 1))
            .expect("always Some")
            .max(first)
            + 1;
        Ballot {
            counter,
            proposer: self.id,
        }
    }

    /// Notes a ballot seen elsewhere, so the next one of ours is above it.
    pub fn saw(&self, b: Ballot) {
        self.counter.fetch_max(b.counter, Ordering::SeqCst);
    }

    /// Forgets the next ballots acceptors promised with our last changes
    /// (they belong to a membership that is no longer this node's).
    pub fn forget_promises(&self) {
        self.fast.lock().clear();
    }

    /// Sends a phase to every holder; returns once a majority has succeeded, or
    /// a majority can no longer succeed and (for an accept) every holder has
    /// answered or timed out: whether a failed accept may be retried depends on
    /// all of them.
    async fn phase(
        &self,
        net: &impl Network,
        layout: &Layout,
        holders: &[usize],
        key: &Bytes,
        msg: &Msg,
    ) -> Gathered {
        let until = match msg {
            Msg::Accept(..) => Until::MajorityOrSettled,
            _ => Until::Majority,
        };
        self.gather(net, layout, holders, key, msg, until).await
    }

    /// Sends `msg` to every holder and gathers answers until `until` says.
    async fn gather(
        &self,
        net: &impl Network,
        layout: &Layout,
        holders: &[usize],
        key: &Bytes,
        msg: &Msg,
        until: Until,
    ) -> Gathered {
        let need = majority(holders.len());
        // Each peer's call is a task of its own: it goes on after a majority has
        // answered, so every reachable replica gets every message.
        type Call = tokio::task::JoinHandle<(String, Result<Answer, Failure>)>;
        let mut pending: FuturesUnordered<Call> = holders
            .iter()
            .filter(|&&n| Some(n) != layout.me)
            .map(|&n| {
                let addr = layout.nodes[n].clone();
                let call = net.ask(&addr, key, msg);
                tokio::spawn(async move { (addr, call.await) })
            })
            .collect();
        let mut g = Gathered {
            records: Vec::new(),
            accepted: 0,
            beaten: None,
            failures: Vec::new(),
            maybe_delivered: 0,
            other_version: Vec::new(),
            frozen: None,
        };
        let mut local = layout
            .me
            .filter(|me| holders.contains(me))
            .map(|me| (layout.nodes[me].clone(), net.local(key, msg)));
        loop {
            let (addr, a) = match local.take() {
                Some(a) => a,
                None => match pending.next().await {
                    Some(joined) => joined.unwrap_or_else(|e| {
                        let failure = Failure {
                            text: format!("a replica call failed: {e}"),
                            maybe_delivered: true,
                        };
                        (String::new(), Err(failure))
                    }),
                    None => break,
                },
            };
            match a {
                Ok(Answer::Record(r)) => g.records.push(r),
                Ok(Answer::Accepted) => g.accepted += 1,
                Ok(Answer::Beaten(b)) => {
                    self.saw(b);
                    g.beaten = g.beaten.max(Some(b));
                }
                Ok(Answer::Version(v)) => g.other_version.push((addr, v)),
                Ok(Answer::Frozen(text)) => g.frozen = Some(text),
                Err(f) => {
                    g.maybe_delivered += f.maybe_delivered as usize;
                    g.failures.push(f.text);
                }
            }
            let ok = g.records.len() + g.accepted;
            let lost = holders.len() - ok - pending.len();
            let done = match until {
                Until::Every => false,
                Until::MajorityOrSettled => ok >= need,
                Until::Majority => ok >= need || holders.len() - lost < need,
            };
            if done {
                break;
            }
        }
        g
    }

    /// Runs `f` on the key's current record as one CASPaxos round and answers
    /// its reply; `f` answers the reply and the key's new value (the live value
    /// it was given, unchanged, when it changes nothing). See [`Mode`].
    ///
    /// A round refused because replicas are at another membership version
    /// (nothing of it was accepted) runs again once the side behind is brought
    /// up to date. One refused because the key's slot is being moved (a
    /// reconfiguration froze it; nothing of it was accepted either) runs again
    /// when the move is done, for up to [`MOVE_WAIT`]: a client sees a slower
    /// answer during a re-homing, not `TRYAGAIN`. A write that some replicas
    /// took before the freeze is settled once the move is done
    /// ([`Proposer::settle_after_move`]).
    pub async fn propose_at(
        &self,
        net: &impl Network,
        key: &Bytes,
        mode: Mode,
        f: &mut (dyn FnMut(&Record) -> Change + Send),
    ) -> (Reply, Ballot) {
        let _turn = self.key_locks.lock(key).await;
        let started = std::time::Instant::now();
        loop {
            let (reply, ballot) = match self.propose_locked(net, key, mode, f).await {
                Round::AfterMove {
                    ours,
                    reply,
                    uncertain,
                } => {
                    match self.settle_after_move(net, key, ours, started).await {
                        Settled::Applied(at) => return (reply, at),
                        // Nothing was made of it: the command runs again.
                        Settled::Lost => continue,
                        _ => {
                            self.stats.unavailable.fetch_add(1, Ordering::Relaxed);
                            return (uncertain, Ballot::default());
                        }
                    }
                }
                Round::Done(reply, ballot) => (reply, ballot),
                // `propose_locked` brings versions up to date itself; were
                // one to come back, the membership changed under the command.
                Round::OtherVersion(_) => (Reply::error(MEMBERSHIP_CHANGING), Ballot::default()),
            };
            // Only `unavailable` answers this, and only when nothing of the
            // round was accepted anywhere: running it again is safe.
            let moving = matches!(&reply, Reply::Error(e) if e.starts_with(MOVING));
            if moving && started.elapsed() < MOVE_WAIT && !self.moves_stuck(net.layout().version) {
                self.stats.waited_for_moves.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            return (reply, ballot);
        }
    }

    /// Settles a write that some replicas accepted as its slot began to
    /// move, once the move is over (waiting for it up to [`MOVE_WAIT`] from
    /// the command's start). The new holders got the highest record the old
    /// ones held, installed with that record's ballot as its base, so the
    /// settling round at the new membership tells whether it was this write
    /// (a yes), or an older one (a no: the old holders take nothing any
    /// more, so this write can never take effect).
    async fn settle_after_move(
        &self,
        net: &impl Network,
        key: &Bytes,
        ours: Ballot,
        started: std::time::Instant,
    ) -> Settled {
        while started.elapsed() < MOVE_WAIT {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let layout = net.layout();
            let holders = layout.holders(key);
            match self.settle(net, &layout, &holders, key, ours).await {
                Settled::Unreachable { moving: true } => {
                    self.stats.waited_for_moves.fetch_add(1, Ordering::Relaxed);
                }
                Settled::Unreachable { .. } => return Settled::Unknown,
                known => return known,
            }
        }
        Settled::Unknown
    }

    /// Whether slots have been refused as moving for longer than
    /// [`MOVE_WAIT`] at this membership version: a reconfiguration that
    /// stopped half-way (its slots stay frozen until the next one). Commands
    /// then answer TRYAGAIN at once instead of each waiting in vain.
    fn moves_stuck(&self, version: u64) -> bool {
        let mut since = self.moving_since.lock();
        match *since {
            Some((v, t)) if v == version => t.elapsed() >= MOVE_WAIT,
            _ => {
                *since = Some((version, std::time::Instant::now()));
                false
            }
        }
    }

    /// [`Proposer::propose_at`] with the key's turn held, without waiting out a move.
    async fn propose_locked(
        &self,
        net: &impl Network,
        key: &Bytes,
        mode: Mode,
        f: &mut (dyn FnMut(&Record) -> Change + Send),
    ) -> Round {
        for _ in 0..VERSION_RETRIES {
            let layout = net.layout();
            if layout.version == 0 {
                return Round::Done(
                    Reply::error(
                        "CLUSTERDOWN this node is not in a replicated cluster yet: add it with \
                         KVD.RECONFIGURE on a member",
                    ),
                    Ballot::default(),
                );
            }
            match self.round(net, &layout, key, mode, f).await {
                Round::OtherVersion(others) => net.sync_versions(layout.version, others).await,
                done => return done,
            }
        }
        Round::Done(Reply::error(MEMBERSHIP_CHANGING), Ballot::default())
    }

    async fn round(
        &self,
        net: &impl Network,
        layout: &Layout,
        key: &Bytes,
        mode: Mode,
        f: &mut (dyn FnMut(&Record) -> Change + Send),
    ) -> Round {
        let none = Ballot::default();
        let holders = layout.holders(key);
        let need = majority(holders.len());
        self.stats.rounds.fetch_add(1, Ordering::Relaxed);
        if mode == Mode::Read {
            // A majority naming one ballot: that value is chosen. Answers that
            // differ are most often a write still on its way to some replicas:
            // deliver it (see `relay`) rather than prepare a higher ballot,
            // which would cut that write off after one replica took it. A relay
            // refused because the key moved on is a newer write: ask again.
            // Refused twice for the same record (a replica that promised
            // higher, such as one restarted above its old ballots), the full
            // round below settles it.
            let mut refused = None;
            for _ in 0..READ_TRIES {
                let g = self
                    .phase(net, layout, &holders, key, &Msg::Query(layout.version))
                    .await;
                if g.records.len() < need {
                    break;
                }
                if g.records.iter().all(|r| r.accepted == g.records[0].accepted) {
                    Self::catch_up(net, layout, &g);
                    return Round::Done(f(&g.records[0]).reply, g.records[0].accepted);
                }
                let highest = highest_of(&g.records);
                if self.relay(net, layout, &holders, key, &highest, false).await {
                    self.stats.relayed.fetch_add(1, Ordering::Relaxed);
                    return Round::Done(f(&highest).reply, highest.accepted);
                }
                if refused == Some(highest.accepted) {
                    break;
                }
                refused = Some(highest.accepted);
            }
        }
        // One round trip when this node made the key's last change and nobody
        // prepared since: the acceptors promised our next ballot with it, so
        // phase 1 is done; if someone did prepare, the accept is refused
        // everywhere that matters and the full round below runs.
        let cached = match mode {
            Mode::Guarded => None,
            _ => self.fast.lock().remove(key),
        };
        if let Some((next, last)) = cached.filter(|(next, _)| epoch(*next) == layout.version) {
            let change = f(&last);
            if change.changes(&last) {
                let reply = change.reply;
                let follow = self.next_ballot(layout);
                let record = Record::new(next, change.value, Some(last.accepted)).locked(change.lock);
                let msg = Msg::Accept(record.clone(), Some(follow));
                let g = self.phase(net, layout, &holders, key, &msg).await;
                if g.accepted >= need {
                    self.stats.fast.fetch_add(1, Ordering::Relaxed);
                    Self::catch_up(net, layout, &g);
                    self.remember(key, follow, record);
                    return Round::Done(reply, next);
                }
                if g.accepted > 0 || g.maybe_delivered > 0 {
                    let settled = self.settle(net, layout, &holders, key, next).await;
                    // Lost: nothing was made of it, and the full round below runs.
                    if let Some(end) = self.settled_round(settled, &g, holders.len(), next, reply) {
                        return end;
                    }
                } else if g.stale() {
                    return Round::OtherVersion(g.other_version);
                }
            }
        }
        for attempt in 0..ATTEMPTS {
            let b = self.next_ballot(layout);
            let g = self.phase(net, layout, &holders, key, &Msg::Prepare(b)).await;
            if g.records.len() < need {
                if g.stale() {
                    return Round::OtherVersion(g.other_version);
                }
                if g.beaten.is_some() {
                    self.stats.conflicts.fetch_add(1, Ordering::Relaxed);
                    self.backoff(attempt).await;
                    continue;
                }
                return Round::Done(unavailable(self, &g), none);
            }
            Self::catch_up(net, layout, &g);
            let highest = highest_of(&g.records);
            let agree = g.records.iter().all(|r| r.accepted == highest.accepted);
            let change = f(&highest);
            if !change.changes(&highest) && agree {
                // Nothing to change, and a majority holds this value: it is chosen.
                return Round::Done(change.reply, highest.accepted);
            }
            // Writing back the value as it is (a read's repair) changes nothing
            // however often it lands, so it may always be tried again.
            let identity = change.value.as_ref() == highest.live(now_ms()) && change.lock == highest.lock;
            let reply = change.reply;
            if identity {
                self.stats.repairs.fetch_add(1, Ordering::Relaxed);
            }
            let follow = self.next_ballot(layout);
            let record = Record::new(b, change.value, Some(highest.accepted)).locked(change.lock);
            let g = self
                .phase(
                    net,
                    layout,
                    &holders,
                    key,
                    &Msg::Accept(record.clone(), Some(follow)),
                )
                .await;
            if g.accepted >= need {
                Self::catch_up(net, layout, &g);
                self.remember(key, follow, record);
                return Round::Done(reply, b);
            }
            if identity || (g.accepted == 0 && g.maybe_delivered == 0) {
                // Every replica refused this attempt or never got it (nothing of
                // it can ever be chosen), or it changed nothing: safe to run again.
                if g.stale() {
                    return Round::OtherVersion(g.other_version);
                }
                if g.beaten.is_none() {
                    return Round::Done(unavailable(self, &g), none);
                }
                self.stats.conflicts.fetch_add(1, Ordering::Relaxed);
                self.backoff(attempt).await;
                continue;
            }
            let settled = self.settle(net, layout, &holders, key, b).await;
            if let Some(end) = self.settled_round(settled, &g, holders.len(), b, reply) {
                return end;
            }
            // Lost: beaten by another writer, and nothing was made of ours.
            self.stats.conflicts.fetch_add(1, Ordering::Relaxed);
            self.backoff(attempt).await;
        }
        self.stats.unavailable.fetch_add(1, Ordering::Relaxed);
        Round::Done(
            Reply::error("TRYAGAIN too many concurrent writers to this key; try again"),
            none,
        )
    }

    /// How a round whose accept at `ours` reached some replicas but no
    /// majority (`g`) ends, once [`Proposer::settle`] answered: done (the
    /// write took effect; or nobody can tell, and the client hears so),
    /// waiting for the slot's move, or `None` when nothing was made of it
    /// and the command may run again.
    fn settled_round(
        &self,
        settled: Settled,
        g: &Gathered,
        holders: usize,
        ours: Ballot,
        reply: Reply,
    ) -> Option<Round> {
        match settled {
            Settled::Applied(at) => Some(Round::Done(reply, at)),
            Settled::Lost => None,
            Settled::Unreachable { moving: true } => Some(Round::AfterMove {
                ours,
                reply,
                uncertain: uncertain(g, holders),
            }),
            Settled::Unknown | Settled::Unreachable { .. } => {
                Some(Round::Done(self.unsettled(g, holders), Ballot::default()))
            }
        }
    }

    /// A phase succeeded although some replicas are at another version: bring
    /// them (or us) up to date in the background.
    fn catch_up(net: &impl Network, layout: &Layout, g: &Gathered) {
        if g.stale() {
            tokio::spawn(net.sync_versions(layout.version, g.other_version.clone()));
        }
    }

    /// [`Proposer::propose_at`] without the ballot.
    pub async fn propose(
        &self,
        net: &impl Network,
        key: &Bytes,
        mode: Mode,
        f: &mut (dyn FnMut(&Record) -> Change + Send),
    ) -> Reply {
        self.propose_at(net, key, mode, f).await.0
    }
}

impl Proposer {
    /// The records of every holder that answers a query or prepare.
    pub(super) async fn phase_all(
        &self,
        net: &impl Network,
        layout: &Layout,
        holders: &[usize],
        key: &Bytes,
        msg: &Msg,
    ) -> Vec<Record> {
        let g = self.gather(net, layout, holders, key, msg, Until::Every).await;
        // The background pass is how a node nobody else talks to (one removed
        // while it was down) learns the membership changed.
        Self::catch_up(net, layout, &g);
        g.records
    }

    /// Accepts `entry` at `b` on every holder; whether a majority took it.
    pub(super) async fn accept_all(
        &self,
        net: &impl Network,
        layout: &Layout,
        holders: &[usize],
        key: &Bytes,
        record: Record,
    ) -> bool {
        let g = self
            .gather(
                net,
                layout,
                holders,
                key,
                &Msg::Accept(record, None),
                Until::Every,
            )
            .await;
        g.accepted >= majority(holders.len())
    }

    /// Sends `record`'s accept again, at its own ballot, to the key's replicas;
    /// whether a majority (with `every`, every replica that answered) now
    /// holds it.
    ///
    /// Why this is safe: a ballot names one value (each proposer proposes one
    /// value per ballot, and ballots are unique to proposers), so this is the
    /// proposer's own accept message, delayed or duplicated — which any
    /// network may do. It promises nothing new, so unlike a prepare it cannot
    /// cut off a write under way: a replica that promised a higher ballot
    /// refuses it, and the caller falls back to a full round. Once a majority
    /// holds the record at its ballot the value is chosen, so a read may
    /// answer it.
    pub(super) async fn relay(
        &self,
        net: &impl Network,
        layout: &Layout,
        holders: &[usize],
        key: &Bytes,
        record: &Record,
        every: bool,
    ) -> bool {
        let msg = Msg::Accept(record.clone(), None);
        // A relay that falls short is harmless (it is a copy of an accept
        // already sent), so unlike a new proposal's accept it need not wait
        // for the replicas that are slow to answer.
        let until = if every { Until::Every } else { Until::Majority };
        let g = self.gather(net, layout, holders, key, &msg, until).await;
        if every {
            g.accepted > 0 && g.beaten.is_none() && g.other_version.is_empty() && g.frozen.is_none()
        } else {
            g.accepted >= majority(holders.len())
        }
    }

    /// The ballot at which a majority of the key's replicas holds its current
    /// value (WATCH): a read round, which writes the value back first if the
    /// replicas disagree, so the answer is what a later EXEC finds unless the
    /// key changes.
    pub async fn chosen_ballot(&self, net: &impl Network, key: &Bytes) -> Result<Ballot, Reply> {
        let mut same = |r: &Record| Change::none(Reply::OK, r);
        match self.propose_at(net, key, Mode::Read, &mut same).await {
            (reply, _) if reply.is_error() => Err(reply),
            (_, ballot) => Ok(ballot),
        }
    }

    /// A write accepted at `ours` reached some replicas but no majority
    /// (another writer's prepare beat it, or replicas did not answer): finds
    /// out whether it took effect, and makes that answer final, so that the
    /// client hears yes or no rather than "may or may not".
    ///
    /// It prepares a new ballot on a majority and looks at the highest record
    /// there:
    /// - ours, or one made from ours (its `base`): the write is in the value;
    /// - one older than ours, or made from a record older than ours: nothing
    ///   was made from ours. (Had ours been chosen, every later round's
    ///   majority would have shown it or something made from it. A purge
    ///   removes records, but only one every replica holds, and it promises
    ///   that record's ballot, so no record older than ours survives or
    ///   comes back after one; no record at all, or one made from none, is
    ///   therefore no evidence.)
    /// - one made from a record newer than ours: whether that one was made
    ///   from ours is not recorded: still unknown.
    ///
    /// Either known answer is made final by accepting the highest record's
    /// value at the new ballot on a majority (an identity round, as a read's
    /// repair): from then on every majority holds a record at or above that
    /// ballot, so ours can never again be the highest a round finds, and a
    /// write not in the value now can never be adopted later.
    async fn settle(
        &self,
        net: &impl Network,
        layout: &Layout,
        holders: &[usize],
        key: &Bytes,
        ours: Ballot,
    ) -> Settled {
        let need = majority(holders.len());
        for attempt in 0..SETTLE_ATTEMPTS {
            let b = self.next_ballot(layout);
            let g = self.phase(net, layout, holders, key, &Msg::Prepare(b)).await;
            if g.records.len() < need {
                if g.beaten.is_none() {
                    if g.stale() {
                        net.sync_versions(layout.version, g.other_version.clone()).await;
                    }
                    let moving = g.frozen.is_some() || g.stale();
                    return Settled::Unreachable { moving };
                }
                self.backoff(attempt).await;
                continue;
            }
            let highest = highest_of(&g.records);
            // A purge removes a dead record from every replica (`super::repair`),
            // and with it the chain of bases through it: no record, or one
            // made from no record, says nothing about an older write.
            let none = Ballot::default();
            let applied = highest.accepted == ours || highest.base == Some(ours);
            let lost = (highest.accepted != none && highest.accepted < ours)
                || highest.base.is_some_and(|base| base != none && base < ours);
            if !applied && !lost {
                return Settled::Unknown;
            }
            let follow = self.next_ballot(layout);
            let record =
                Record::new(b, highest.entry.clone(), Some(highest.accepted)).locked(highest.lock.clone());
            let msg = Msg::Accept(record.clone(), Some(follow));
            if self.phase(net, layout, holders, key, &msg).await.accepted < need {
                // An identity that fell short may be tried again.
                self.backoff(attempt).await;
                continue;
            }
            self.remember(key, follow, record);
            self.stats.settled.fetch_add(1, Ordering::Relaxed);
            return match applied {
                true => Settled::Applied(b),
                false => Settled::Lost,
            };
        }
        Settled::Unknown
    }

    /// Waits after a conflict, longer after each: random, so two proposers
    /// that beat each other do not keep meeting.
    async fn backoff(&self, attempt: usize) {
        let base = 1u64 << attempt.min(6);
        let jitter = self.jitter.lock().gen_range(0..base * 1000);
        tokio::time::sleep(Duration::from_micros(base * 200 + jitter)).await;
    }

    /// Notes that a majority accepted `record` and promised `next`.
    fn remember(&self, key: &Bytes, next: Ballot, record: Record) {
        let mut fast = self.fast.lock();
        if fast.len() >= FAST_KEYS {
            fast.clear();
        }
        fast.insert(key.clone(), (next, record));
    }

    /// [`uncertain`], counted: the answer a write gets when settling it
    /// failed.
    fn unsettled(&self, g: &Gathered, replicas: usize) -> Reply {
        self.stats.unavailable.fetch_add(1, Ordering::Relaxed);
        uncertain(g, replicas)
    }
}

/// A write that reached some replicas but not a majority. The reasons
/// list every replica that did not accept: a failure, a higher ballot it
/// had promised (another writer of the key, or a repair), or another
/// membership version.
fn uncertain(g: &Gathered, replicas: usize) -> Reply {
    let mut reasons = g.failures.clone();
    if let Some(b) = g.beaten {
        reasons.push(format!(
            "replicas had promised a higher ballot ({}.{}): a concurrent write or repair of the key",
            b.counter, b.proposer
        ));
    }
    for (addr, v) in &g.other_version {
        reasons.push(format!("{addr}: at membership version {v}"));
    }
    if let Some(frozen) = &g.frozen {
        reasons.push(format!("the key's slot is being moved ({frozen})"));
    }
    Reply::error(format!(
        "ERR the write reached {} of {} replicas, fewer than a majority: it may or may not take effect ({})",
        g.accepted,
        replicas,
        reasons.join("; ")
    ))
}

fn unavailable(rep: &Proposer, g: &Gathered) -> Reply {
    rep.stats.unavailable.fetch_add(1, Ordering::Relaxed);
    if let Some(frozen) = &g.frozen {
        return Reply::error(frozen.clone());
    }
    let failures = &g.failures;
    Reply::error(format!(
        "CLUSTERDOWN a majority of this key's replicas did not answer ({}); nothing was changed",
        failures.join("; ")
    ))
}
