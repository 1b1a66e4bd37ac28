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
//! Retrying is safe only while no acceptor has accepted anything of this
//! attempt: a value accepted by a minority may still be chosen by a later
//! round, so a command whose accept phase fell short answers an error that
//! says its outcome is unknown instead of running again.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};

use super::acceptor::Record;
use super::Replicas;
use crate::cluster::paxos::{majority, Ballot};
use crate::db::now_ms;
use crate::reply::Reply;
use crate::server::Shared;
use crate::store::{Entry, StoreError};

/// How long a replica may take to answer one phase.
const PHASE_TIMEOUT: Duration = Duration::from_millis(1000);
/// Attempts beaten by other proposers before giving up.
const ATTEMPTS: usize = 20;

#[derive(Clone)]
pub enum Msg {
    Query,
    Prepare(Ballot),
    Accept(Ballot, Option<Entry>),
}

/// One replica's answer.
enum Answer {
    Record(Record),
    Accepted,
    Beaten(Ballot),
}

fn ballot_error(b: Ballot) -> Reply {
    Reply::error(format!("BALLOT {} {}", b.counter, b.proposer))
}

fn store_error(e: StoreError) -> Reply {
    Reply::error(e.to_string())
}

/// Runs a phase on this node's own acceptor; the reply a peer would send.
pub fn local(shared: &Shared, rep: &Replicas, key: &Bytes, msg: &Msg) -> Reply {
    let acceptor = &rep.acceptor;
    match msg {
        Msg::Query => match acceptor.query(&shared.db, key) {
            Ok(r) => Reply::Bulk(r.encode()),
            Err(e) => store_error(e),
        },
        Msg::Prepare(b) => match acceptor.prepare(&shared.db, key, *b) {
            Ok(r) => Reply::Bulk(r.encode()),
            Err(Ok(beaten)) => ballot_error(beaten),
            Err(Err(e)) => store_error(e),
        },
        Msg::Accept(b, entry) => match acceptor.accept(&shared.db, key, *b, entry.clone()) {
            Ok(()) => Reply::OK,
            Err(Ok(beaten)) => ballot_error(beaten),
            Err(Err(e)) => store_error(e),
        },
    }
}

/// The request a phase is sent to a peer as.
pub fn request(key: &Bytes, msg: &Msg) -> Vec<Bytes> {
    let n = |v: u64| Bytes::from(v.to_string());
    match msg {
        Msg::Query => vec![Bytes::from_static(b"KVD.QUERY"), key.clone()],
        Msg::Prepare(b) => vec![
            Bytes::from_static(b"KVD.PREPARE"),
            key.clone(),
            n(b.counter),
            n(b.proposer),
        ],
        Msg::Accept(b, entry) => vec![
            Bytes::from_static(b"KVD.ACCEPT"),
            key.clone(),
            n(b.counter),
            n(b.proposer),
            Record {
                accepted: *b,
                entry: entry.clone(),
            }
            .encode(),
        ],
    }
}

fn answer(reply: Reply) -> Result<Answer, String> {
    match reply {
        Reply::Bulk(raw) => Record::decode(&raw)
            .map(Answer::Record)
            .ok_or_else(|| "a replica answered a malformed record".into()),
        Reply::Simple("OK") => Ok(Answer::Accepted),
        Reply::Status(s) if s == "OK" => Ok(Answer::Accepted),
        Reply::Error(e) => {
            let mut words = e.strip_prefix("BALLOT ").unwrap_or("").split(' ');
            match (
                words.next().and_then(|w| w.parse().ok()),
                words.next().and_then(|w| w.parse().ok()),
            ) {
                (Some(counter), Some(proposer)) => Ok(Answer::Beaten(Ballot { counter, proposer })),
                _ => Err(e),
            }
        }
        other => Err(format!("a replica answered {other:?}")),
    }
}

/// What a phase gathered.
struct Gathered {
    records: Vec<Record>,
    accepted: usize,
    beaten: Option<Ballot>,
    failures: Vec<String>,
}

impl Replicas {
    async fn ask(
        self: &Arc<Self>,
        shared: &Arc<Shared>,
        node: usize,
        key: &Bytes,
        msg: &Msg,
    ) -> Result<Answer, String> {
        if node == self.me {
            return answer(local(shared, self, key, msg));
        }
        let addr = &self.nodes[node];
        let request = request(key, msg);
        let call = self.peers.call(addr, &request);
        match tokio::time::timeout(PHASE_TIMEOUT, call).await {
            Ok(Ok(reply)) => answer(reply),
            Ok(Err(e)) => Err(format!("{addr}: {e}")),
            Err(_) => Err(format!("{addr}: no answer within {PHASE_TIMEOUT:?}")),
        }
    }

    /// Sends a phase to every holder; returns once a majority has succeeded or
    /// a majority can no longer succeed.
    async fn phase(
        self: &Arc<Self>,
        shared: &Arc<Shared>,
        holders: &[usize],
        key: &Bytes,
        msg: &Msg,
    ) -> Gathered {
        let need = majority(holders.len());
        let mut pending: FuturesUnordered<_> =
            holders.iter().map(|&n| self.ask(shared, n, key, msg)).collect();
        let mut g = Gathered {
            records: Vec::new(),
            accepted: 0,
            beaten: None,
            failures: Vec::new(),
        };
        while let Some(a) = pending.next().await {
            match a {
                Ok(Answer::Record(r)) => g.records.push(r),
                Ok(Answer::Accepted) => g.accepted += 1,
                Ok(Answer::Beaten(b)) => {
                    self.saw(b);
                    g.beaten = g.beaten.max(Some(b));
                }
                Err(e) => g.failures.push(e),
            }
            let ok = g.records.len() + g.accepted;
            let lost = holders.len() - ok - pending.len();
            if ok >= need || holders.len() - lost < need {
                break;
            }
        }
        g
    }

    /// Runs `f` on the key's current record as one CASPaxos round and answers
    /// its reply; `f` answers the reply and the key's new value (the live value
    /// it was given, unchanged, when it changes nothing). `read_only` commands
    /// try the cheaper read first.
    pub async fn propose(
        self: &Arc<Self>,
        shared: &Arc<Shared>,
        key: &Bytes,
        read_only: bool,
        f: &mut (dyn FnMut(&Record) -> (Reply, Option<Entry>) + Send),
    ) -> Reply {
        let holders = self.holders(key);
        let need = majority(holders.len());
        self.stats.rounds.fetch_add(1, Ordering::Relaxed);
        if read_only {
            let g = self.phase(shared, &holders, key, &Msg::Query).await;
            if g.records.len() >= need && g.records.iter().all(|r| r.accepted == g.records[0].accepted) {
                return f(&g.records[0]).0;
            }
        }
        for attempt in 0..ATTEMPTS {
            let b = self.next_ballot();
            let g = self.phase(shared, &holders, key, &Msg::Prepare(b)).await;
            if g.records.len() < need {
                if g.beaten.is_some() {
                    self.stats.conflicts.fetch_add(1, Ordering::Relaxed);
                    backoff(attempt).await;
                    continue;
                }
                return unavailable(self, &g.failures);
            }
            let highest = g
                .records
                .iter()
                .max_by_key(|r| r.accepted)
                .cloned()
                .unwrap_or_default();
            let agree = g.records.iter().all(|r| r.accepted == highest.accepted);
            let current = highest.live(now_ms()).cloned();
            let (reply, new) = f(&highest);
            if new == current && agree {
                // Nothing to change, and a majority holds this value: it is chosen.
                return reply;
            }
            if new == current {
                self.stats.repairs.fetch_add(1, Ordering::Relaxed);
            }
            let g = self.phase(shared, &holders, key, &Msg::Accept(b, new)).await;
            if g.accepted >= need {
                return reply;
            }
            if g.accepted == 0 && g.beaten.is_some() {
                // Nothing of this attempt was accepted anywhere: safe to run again.
                self.stats.conflicts.fetch_add(1, Ordering::Relaxed);
                backoff(attempt).await;
                continue;
            }
            self.stats.unavailable.fetch_add(1, Ordering::Relaxed);
            return Reply::error(format!(
                "ERR the write reached {} of {} replicas, fewer than a majority: it may or may not take effect ({})",
                g.accepted,
                holders.len(),
                g.failures.join("; ")
            ));
        }
        self.stats.unavailable.fetch_add(1, Ordering::Relaxed);
        Reply::error("TRYAGAIN too many concurrent writers to this key; try again")
    }
}

fn unavailable(rep: &Replicas, failures: &[String]) -> Reply {
    rep.stats.unavailable.fetch_add(1, Ordering::Relaxed);
    Reply::error(format!(
        "CLUSTERDOWN a majority of this key's replicas did not answer ({}); nothing was changed",
        failures.join("; ")
    ))
}

async fn backoff(attempt: usize) {
    let base = 1u64 << attempt.min(6);
    let jitter = rand::random::<u64>() % (base * 1000);
    tokio::time::sleep(Duration::from_micros(base * 200 + jitter)).await;
}
