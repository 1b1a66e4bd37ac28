//! The proposer's network on a running node ([`proposer::Network`]): this
//! node's own acceptor, admitted by the membership, and the peer links to
//! the others; and the wire form of a phase (`KVD.QUERY`, `KVD.PREPARE`,
//! `KVD.ACCEPT`) both ways. The rules of a round live in [`proposer`] and
//! never see any of this.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::acceptor::{Acceptor, Record};
use super::layout::{epoch, Layout};
use super::proposer::{self, Answer, Failure, Msg};
use super::Replicas;
use crate::cluster::paxos::Ballot;
use crate::db::Db;
use crate::reply::Reply;
use crate::shared::Shared;
use crate::store::StoreError;

/// How long a replica may take to answer one phase.
const PHASE_TIMEOUT: Duration = Duration::from_millis(1000);
/// How long a replica this node already finds suspect (its last call
/// failed, or its heartbeat stands still) may take. A phase that fell short
/// of a majority among the others waits for every holder (an accept beaten on one replica
/// may still win on the suspect one), so with the full timeout every
/// contended write would stall a second while a node sleeps. Short, not
/// zero: a suspect node that answers is back at once (and loses the flag).
const SUSPECT_TIMEOUT: Duration = Duration::from_millis(150);
/// A running node as its proposer sees it.
pub struct NodeNetwork {
    rep: Arc<Replicas>,
    shared: Arc<Shared>,
}

impl NodeNetwork {
    pub fn new(rep: &Arc<Replicas>, shared: &Arc<Shared>) -> NodeNetwork {
        NodeNetwork {
            rep: rep.clone(),
            shared: shared.clone(),
        }
    }
}

impl proposer::Network for NodeNetwork {
    fn layout(&self) -> Arc<Layout> {
        self.rep.layout()
    }

    fn local(&self, key: &Bytes, msg: &Msg) -> Result<Answer, Failure> {
        answer(local(&self.shared, &self.rep, key, msg)).map_err(|text| Failure {
            text,
            maybe_delivered: false,
        })
    }

    fn ask(
        &self,
        addr: &str,
        key: &Bytes,
        msg: &Msg,
    ) -> impl std::future::Future<Output = Result<Answer, Failure>> + Send + 'static {
        let (rep, addr, key, msg) = (self.rep.clone(), addr.to_string(), key.clone(), msg.clone());
        rep.ask_peer(addr, key, msg)
    }

    fn sync_versions(
        &self,
        version: u64,
        others: Vec<(String, u64)>,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let rep = self.rep.clone();
        async move {
            let layout = rep.layout();
            if layout.version == version {
                rep.sync_versions(&layout, &others).await;
            }
        }
    }
}

impl Replicas {
    /// One phase on a peer. A link found broken is replaced and the message sent
    /// once more: acceptors answer a repeated prepare or accept as they did the
    /// first time, so a message that did arrive before the link broke is harmless.
    pub(super) async fn ask_peer(
        self: Arc<Self>,
        addr: String,
        key: Bytes,
        msg: Msg,
    ) -> Result<Answer, Failure> {
        let addr = &addr;
        if self.is_cut_off(addr) {
            self.reached(addr, false);
            return Err(Failure {
                text: format!("{addr}: cut off (KVD.PARTITION)"),
                maybe_delivered: false,
            });
        }
        let request = request(&key, &msg);
        let mut last = Failure {
            text: String::new(),
            maybe_delivered: false,
        };
        let timeout = match self.is_suspect(addr) {
            true => SUSPECT_TIMEOUT,
            false => PHASE_TIMEOUT,
        };
        for _ in 0..2 {
            match tokio::time::timeout(timeout, self.peers.call(addr, &request)).await {
                Ok(Ok(reply)) => {
                    self.reached(addr, true);
                    return answer(reply).map_err(|text| Failure {
                        text,
                        maybe_delivered: true,
                    });
                }
                Ok(Err(e)) => {
                    self.reached(addr, false);
                    let maybe = last.maybe_delivered || matches!(e, crate::cluster::peer::LinkError::Lost(_));
                    last = Failure {
                        text: format!("{addr}: {e}"),
                        maybe_delivered: maybe,
                    };
                }
                Err(_) => {
                    self.reached(addr, false);
                    return Err(Failure {
                        text: format!("{addr}: no answer within {timeout:?}"),
                        maybe_delivered: true,
                    });
                }
            }
        }
        Err(last)
    }
}

/// An acceptor's refusal: the ballot it promised, which beat the proposer's.
pub(super) fn ballot_error(b: Ballot) -> Reply {
    Reply::error(format!("BALLOT {} {}", b.counter, b.proposer))
}

fn store_error(e: StoreError) -> Reply {
    Reply::error(e.to_string())
}

/// Runs a phase on this node's own acceptor, if the membership admits it
/// ([`Replicas::admit`]); the reply a peer would send.
pub fn local(shared: &Shared, rep: &Replicas, key: &Bytes, msg: &Msg) -> Reply {
    let version = match msg {
        Msg::Query(v) => *v,
        Msg::Prepare(b) => epoch(*b),
        Msg::Accept(r, _) => epoch(r.accepted),
    };
    let _admitted = match rep.admit(key, version) {
        Ok(guard) => guard,
        Err(refusal) => return refusal,
    };
    serve(&rep.acceptor, &shared.dbs.zero(), key, msg)
}

/// What an acceptor answers to a phase: its side of the wire, the same for a
/// peer's request and this node's own proposer (and for the simulation).
pub fn serve(acceptor: &Acceptor, db: &Db, key: &Bytes, msg: &Msg) -> Reply {
    match msg {
        Msg::Query(_) => match acceptor.query(db, key) {
            Ok(r) => Reply::Bulk(r.encode()),
            Err(e) => store_error(e),
        },
        Msg::Prepare(b) => match acceptor.prepare(db, key, *b) {
            Ok(r) => Reply::Bulk(r.encode()),
            Err(Ok(beaten)) => ballot_error(beaten),
            Err(Err(e)) => store_error(e),
        },
        Msg::Accept(record, next) => match acceptor.accept(db, key, record.clone(), *next) {
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
        Msg::Query(v) => vec![Bytes::from_static(b"KVD.QUERY"), key.clone(), n(*v)],
        Msg::Prepare(b) => vec![
            Bytes::from_static(b"KVD.PREPARE"),
            key.clone(),
            n(b.counter),
            n(b.proposer),
        ],
        Msg::Accept(record, next) => {
            let b = record.accepted;
            let mut args = vec![
                Bytes::from_static(b"KVD.ACCEPT"),
                key.clone(),
                n(b.counter),
                n(b.proposer),
                record.encode(),
            ];
            if let Some(next) = next {
                args.push(n(next.counter));
                args.push(n(next.proposer));
            }
            args
        }
    }
}

/// A phase's reply as the proposer reads it.
pub fn answer(reply: Reply) -> Result<Answer, String> {
    match reply {
        Reply::Bulk(raw) => Record::decode(&raw)
            .map(Answer::Record)
            .ok_or_else(|| "a replica answered a malformed record".into()),
        Reply::Simple("OK") => Ok(Answer::Accepted),
        Reply::Status(s) if s == "OK" => Ok(Answer::Accepted),
        Reply::Error(e) if e.starts_with("TRYAGAIN ") => Ok(Answer::Frozen(e)),
        Reply::Error(e) if e.starts_with("KVDCONFIG ") => e["KVDCONFIG ".len()..]
            .parse()
            .map(Answer::Version)
            .map_err(|_| e.clone()),
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
