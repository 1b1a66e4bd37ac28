//! Per request: run it here, wait for its slot, forward it to the node that
//! serves it, split it over several nodes, or send the client there.
//!
//! The rules (docs/PROTOCOL.md, "Cluster"):
//!
//! - A command whose keys all hash to one slot runs where that slot is
//!   served. Plain clients are served by forwarding (one hop over a pooled
//!   peer link; the reply is passed through untouched). Clients that asked
//!   for redirects (READONLY, READWRITE, ASKING, or a CLUSTER SLOTS / SHARDS /
//!   NODES on the same connection), and every client when `cluster-redirect`
//!   is on, get Redis Cluster's `-MOVED slot host:port` instead.
//! - MGET, MSET, DEL, UNLINK, EXISTS and TOUCH whose keys span slots are split
//!   per slot and their replies joined (not atomic across slots, as in any
//!   Redis Cluster client that splits them). Other commands spanning slots get
//!   `-CROSSSLOT`, as from Redis Cluster.
//! - WATCH and MULTI bind the connection to one slot (`-CROSSSLOT` otherwise).
//!   A WATCH on a slot served elsewhere is placed there over a connection of
//!   its own, so the watch lives where the key lives; EXEC then sends the
//!   queued commands over it. A transaction without WATCH is sent as one
//!   `MULTI ... EXEC` batch to the slot's server at EXEC time.
//! - A command forwarded by a peer is never forwarded again: a node that does
//!   not serve the slot answers `-MOVED` to the forwarder, which follows it (a
//!   few hops at most, while a slot is changing hands).
//! - Keyspace-wide commands (DBSIZE, KEYS, SCAN, RANDOMKEY, FLUSHALL, FLUSHDB)
//!   act on the node they are sent to, as in Redis Cluster.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::peer::{parse_reply, LinkError};
use super::slot::key_slot;
use super::{Cluster, Route};
use crate::command::spec::{self, Lookup, Spec};
use crate::command::{self, NOT_QUEUED};
use crate::reply::{Protocol, Reply};
use crate::session::Session;
use crate::shared::Shared;

/// Commands whose keys may span slots: split per slot, replies joined.
const SPLITTABLE: &[&str] = &["mget", "mset", "del", "unlink", "exists", "touch"];
/// MOVED replies followed for one request before giving up with TRYAGAIN.
const MAX_HOPS: usize = 5;
/// How long a request waits for its slot to finish moving here.
const MAX_WAIT: Duration = Duration::from_secs(30);

fn crossslot() -> Reply {
    Reply::error("CROSSSLOT Keys in request don't hash to the same slot")
}

fn moved(slot: u16, addr: &str) -> Reply {
    Reply::error(format!("MOVED {slot} {addr}"))
}

fn tryagain(slot: u16) -> Reply {
    Reply::error(format!(
        "TRYAGAIN slot {slot} is moving between nodes; retry the command"
    ))
}

fn down() -> Reply {
    Reply::error("CLUSTERDOWN Hash slot not served")
}

fn link_error(e: LinkError) -> Reply {
    match e {
        LinkError::Connect(..) | LinkError::Timeout(..) => Reply::error(format!("CLUSTERDOWN {e}")),
        LinkError::Lost(_) => Reply::error(format!("ERR {e}")),
    }
}

/// The address in a `-MOVED slot addr` reply frame.
fn moved_target(frame: &[u8]) -> Option<String> {
    let text = frame.strip_prefix(b"-MOVED ")?;
    let text = std::str::from_utf8(text).ok()?.trim_end();
    let (_, addr) = text.split_once(' ')?;
    Some(addr.to_string())
}

/// After `addr` answered `-MOVED next`: counts the hop and says where to send
/// the request now — `Some(None)` to look the route up again, after a pause,
/// when the answer points back at this node or at `addr` itself (the other
/// node's view lags ours, or a hand-off is under way); `None` when out of hops.
async fn follow_moved(
    cluster: &Cluster,
    addr: &str,
    next: String,
    hops: &mut usize,
) -> Option<Option<String>> {
    *hops += 1;
    if *hops > MAX_HOPS {
        return None;
    }
    if next == cluster.addr || next == addr {
        tokio::time::sleep(Duration::from_millis(20 * *hops as u64)).await;
        return Some(None);
    }
    Some(Some(next))
}

/// Runs one request in a cluster node.
pub async fn dispatch(
    shared: &Arc<Shared>,
    cluster: &Arc<Cluster>,
    session: &mut Session,
    args: &[Bytes],
) -> Reply {
    if args[0].len() > 4 && args[0][..4].eq_ignore_ascii_case(b"kvd.") {
        return super::commands::internal(shared, cluster, session, args).await;
    }
    let spec = match spec::lookup(args) {
        Lookup::Found(s)
            if s.arity_ok(args.len()) && session.authenticated && !session.in_resp2_subscribed_mode() =>
        {
            s
        }
        _ => return command::execute(shared, session, args),
    };
    match spec.name {
        "watch" => return watch(shared, cluster, session, args).await,
        "exec" => return exec(shared, cluster, session, args).await,
        "discard" | "reset" => {
            session.cluster.end_transaction();
            return command::execute(shared, session, args);
        }
        "unwatch" if session.multi.is_none() => {
            session.cluster.end_transaction();
            return command::execute(shared, session, args);
        }
        "readonly" | "readwrite" | "asking" if session.multi.is_none() => {
            session.cluster.aware = true;
            return Reply::OK;
        }
        "publish" if session.multi.is_none() => {
            super::commands::broadcast_publish(cluster, &args[1], &args[2]);
            return command::execute(shared, session, args);
        }
        name if name.starts_with("cluster|") && session.multi.is_none() => {
            return super::commands::cluster(shared, cluster, session, spec, args).await;
        }
        _ => {}
    }
    if spec.keys(args.len()).next().is_none() {
        return command::execute_found(shared, session, spec, args);
    }
    if let Some(slot) = one_slot(spec, args).filter(|_| session.multi.is_none()) {
        return single(shared, cluster, session, spec, slot, args, session.proto).await;
    }
    let positions = spec.key_positions(args.len());
    let slots: Vec<u16> = positions.iter().map(|&i| key_slot(&args[i])).collect();
    let first = slots[0];
    let same = slots.iter().all(|&s| s == first);
    if session.multi.is_some() && !NOT_QUEUED.contains(&spec.name) {
        // Queued: it must share the transaction's slot.
        if !same || session.cluster.txn_slot.is_some_and(|s| s != first) {
            return session.reject(crossslot());
        }
        session.cluster.txn_slot = Some(first);
        return command::execute(shared, session, args);
    }
    if same {
        return single(shared, cluster, session, spec, first, args, session.proto).await;
    }
    if !SPLITTABLE.contains(&spec.name) {
        return crossslot();
    }
    // Malformed requests get Redis's error before anything is split
    // (`MSET a 1 b`: the pairs would not split).
    if let Some(Err(reply)) = crate::command::data::DataCommand::parse(spec.name, args) {
        return reply;
    }
    if session.cluster.peer.is_some() {
        // A forwarder splits; a peer only runs what it serves whole.
        let auth = cluster.authority();
        for &s in &slots {
            match cluster.route(&auth, s) {
                Route::Local => {}
                Route::Remote(addr) => return moved(s, &addr),
                Route::Wait => return tryagain(s),
                Route::Down => return down(),
            }
        }
        return command::execute(shared, session, args);
    }
    split(shared, cluster, session, spec, args, &positions, &slots).await
}

/// A request to forward whose reply has not been read yet. A connection
/// collects the forwards of a whole pipeline and sends those for one link as
/// one job ([`finish_all`]), so forwarding costs one round trip and one wake-up
/// per batch rather than per command.
pub struct Pending {
    args: Vec<Bytes>,
    link: Arc<super::peer::Link>,
    /// Whether the client gets the reply (CLIENT REPLY OFF or SKIP may say
    /// no); decided when the request is read, as for a local command.
    pub send: bool,
}

/// Takes `args` for forwarding when that is the whole story: one slot, served
/// by another node we have a link to, for a plain client outside a
/// transaction. Anything else is `None`, and the caller runs [`dispatch`]
/// (after [`finish_all`], to keep replies in order).
pub fn start_forward(cluster: &Cluster, session: &Session, args: &[Bytes]) -> Option<Pending> {
    if session.multi.is_some() || redirects(cluster, session) || !session.authenticated {
        return None;
    }
    let Lookup::Found(spec) = spec::lookup(args) else {
        return None;
    };
    if !spec.arity_ok(args.len()) || spec.name == "watch" || session.in_resp2_subscribed_mode() {
        return None;
    }
    let slot = one_slot(spec, args)?;
    let Route::Remote(addr) = cluster.route(&cluster.authority(), slot) else {
        return None;
    };
    let link = cluster.peers.pooled(&addr, session.proto)?;
    Some(Pending {
        args: args.to_vec(),
        link,
        send: true,
    })
}

/// The slot of a command's keys when they all share one (no allocation).
fn one_slot(spec: &Spec, args: &[Bytes]) -> Option<u16> {
    let mut keys = spec.keys(args.len());
    let slot = key_slot(&args[keys.next()?]);
    keys.all(|i| key_slot(&args[i]) == slot).then_some(slot)
}

/// How long a forwarded request waits for the node that serves its slot. A
/// node that is stopped (SIGSTOP, a desktop going to sleep) accepts and never
/// answers; without a bound every client of every node forwarding to it
/// stalled with it (20 s for a 20 s stop).
const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);

/// Sends the collected forwards and hands their replies to `emit` in request
/// order, with whether each is sent ([`Pending::send`]); a
/// reply that is not a plain answer (a MOVED while a slot moves, a lost link)
/// is redone the slow way.
///
/// All of a batch's requests for one node go in **one** job on one link, in
/// request order. (They went in one job per run of requests on the same
/// pooled link, and the pool hands out its links in turn, so `SET k v1`, `GET
/// k`, `SET k v2`, `GET k` could travel on different connections and run out
/// of order: `v2, v2`.) Requests for different nodes are for different slots,
/// so their order does not matter; they still go out together.
pub async fn finish_all(
    shared: &Arc<Shared>,
    cluster: &Arc<Cluster>,
    session: &mut Session,
    pending: &mut Vec<Pending>,
    mut emit: impl FnMut(Reply, bool),
) {
    // (destination, the link used for it, indices into `pending` in order)
    let mut groups: Vec<(String, Arc<super::peer::Link>, Vec<usize>)> = Vec::new();
    for (i, p) in pending.iter().enumerate() {
        match groups.iter_mut().find(|(addr, _, _)| addr == p.link.addr()) {
            Some((_, _, members)) => members.push(i),
            None => groups.push((p.link.addr().to_string(), p.link.clone(), vec![i])),
        }
    }
    let jobs: Vec<_> = groups
        .iter()
        .map(|(_, link, members)| {
            let requests: Vec<&[Bytes]> = members.iter().map(|&i| pending[i].args.as_slice()).collect();
            link.start_batch(&requests)
        })
        .collect();
    // Each request's outcome: its reply frame, or the error of its job.
    let mut outcomes: Vec<Option<Result<Bytes, LinkError>>> = vec![None; pending.len()];
    for ((addr, _, members), rx) in groups.iter().zip(jobs) {
        let lost = || LinkError::Lost(addr.clone());
        let frames = match rx {
            Some(rx) => match tokio::time::timeout(FORWARD_TIMEOUT, rx).await {
                Ok(answer) => answer.unwrap_or_else(|_| Err(lost())),
                Err(_) => Err(LinkError::Timeout(addr.clone(), FORWARD_TIMEOUT.as_secs())),
            },
            None => Err(lost()),
        };
        match frames {
            Ok(frames) => {
                for (&i, frame) in members.iter().zip(frames) {
                    outcomes[i] = Some(Ok(frame));
                }
            }
            Err(e) => {
                for &i in members {
                    outcomes[i] = Some(Err(e.clone()));
                }
            }
        }
    }
    for (p, outcome) in pending.iter().zip(outcomes) {
        let reply = match outcome.unwrap_or_else(|| Err(LinkError::Lost(p.link.addr().to_string()))) {
            Ok(frame) if moved_target(&frame).is_none() => {
                cluster.stats.forwarded.fetch_add(1, Ordering::Relaxed);
                Reply::Raw(frame)
            }
            // Not executed there (the slot moved): route it again.
            Ok(_) => dispatch(shared, cluster, session, &p.args).await,
            // A node that does not answer: say so at once, never wait again.
            Err(e @ LinkError::Timeout(..)) => link_error(e),
            Err(e) => {
                // Writes may or may not have run there: say so, never rerun them.
                // Reads are safe to send again (the slow path reports the peer's state).
                let read = matches!(spec::lookup(&p.args), Lookup::Found(s) if s.flags.contains(&"readonly"));
                if read {
                    dispatch(shared, cluster, session, &p.args).await
                } else {
                    link_error(e)
                }
            }
        };
        emit(reply, p.send);
    }
    pending.clear();
}

/// Whether this connection is answered with redirects rather than forwarding.
fn redirects(cluster: &Cluster, session: &Session) -> bool {
    session.cluster.peer.is_some() || session.cluster.aware || cluster.redirect.load(Ordering::Relaxed)
}

/// Runs a request on one slot wherever it is served. Replies from other nodes
/// come back in `proto` (the session's, unless the caller wants to read them).
async fn single(
    shared: &Arc<Shared>,
    cluster: &Arc<Cluster>,
    session: &mut Session,
    spec: &'static Spec,
    slot: u16,
    args: &[Bytes],
    proto: Protocol,
) -> Reply {
    let deadline = Instant::now() + MAX_WAIT;
    let mut hops = 0;
    let mut retried = false;
    let mut target: Option<String> = None;
    loop {
        let notified = cluster.changed.notified();
        let route = match target.take() {
            Some(addr) => Route::Remote(addr),
            None => {
                let auth = cluster.authority();
                let route = cluster.route(&auth, slot);
                if route == Route::Local {
                    return command::execute_found(shared, session, spec, args);
                }
                route
            }
        };
        match route {
            Route::Local => unreachable!("executed above, under the authority guard"),
            Route::Wait => {
                if Instant::now() >= deadline {
                    return tryagain(slot);
                }
                let _ = tokio::time::timeout(Duration::from_millis(100), notified).await;
            }
            Route::Down => return down(),
            Route::Remote(addr) if redirects(cluster, session) => {
                cluster.stats.moved_replies.fetch_add(1, Ordering::Relaxed);
                return moved(slot, &addr);
            }
            Route::Remote(addr) => {
                let frame = match cluster.peers.link(&addr, proto).await {
                    Ok(link) => link.call(args).await,
                    Err(e) => Err(e),
                };
                let frame = match frame {
                    Ok(f) => f,
                    // A read that met a link dying (its peer just went down) is
                    // safe to send again, which now reports the peer's state.
                    Err(LinkError::Lost(_)) if spec.flags.contains(&"readonly") && !retried => {
                        retried = true;
                        continue;
                    }
                    Err(e) => return link_error(e),
                };
                match moved_target(&frame) {
                    Some(next) => match follow_moved(cluster, &addr, next, &mut hops).await {
                        Some(next) => target = next,
                        None => return tryagain(slot),
                    },
                    None => {
                        cluster.stats.forwarded.fetch_add(1, Ordering::Relaxed);
                        return Reply::Raw(frame);
                    }
                }
            }
        }
    }
}

/// A reply from [`single`] in RESP2, parsed so its parts can be joined.
fn parsed(reply: Reply) -> Reply {
    match reply {
        Reply::Raw(frame) => {
            parse_reply(&frame).unwrap_or_else(|| Reply::error("ERR malformed reply from a peer node"))
        }
        other => other,
    }
}

/// MGET, MSET, DEL, UNLINK, EXISTS, TOUCH over keys of several slots: one
/// request per slot, replies joined in key order.
async fn split(
    shared: &Arc<Shared>,
    cluster: &Arc<Cluster>,
    session: &mut Session,
    spec: &'static Spec,
    args: &[Bytes],
    positions: &[usize],
    slots: &[u16],
) -> Reply {
    let pairs = spec.name == "mset";
    let mut groups: BTreeMap<u16, Vec<usize>> = BTreeMap::new();
    for (i, &s) in slots.iter().enumerate() {
        groups.entry(s).or_default().push(i);
    }
    let mut values: Vec<Reply> = vec![Reply::Nil; positions.len()];
    let mut sum = 0i64;
    for (slot, members) in groups {
        let mut sub = vec![args[0].clone()];
        for &i in &members {
            sub.push(args[positions[i]].clone());
            if pairs {
                sub.push(args[positions[i] + 1].clone());
            }
        }
        match parsed(single(shared, cluster, session, spec, slot, &sub, Protocol::Resp2).await) {
            Reply::Error(e) => return Reply::Error(e),
            Reply::Int(n) => sum += n,
            Reply::Array(items) if items.len() == members.len() => {
                for (&i, item) in members.iter().zip(items) {
                    values[i] = item;
                }
            }
            Reply::Simple(_) | Reply::Status(_) => {}
            other => {
                return Reply::error(format!(
                    "ERR unexpected reply to a split {}: {other:?}",
                    spec.name
                ))
            }
        }
    }
    match spec.name {
        "mget" => Reply::Array(values),
        "mset" => Reply::OK,
        _ => Reply::Int(sum),
    }
}

/// WATCH: placed where the slot is served, bound to it for the transaction.
async fn watch(shared: &Arc<Shared>, cluster: &Arc<Cluster>, session: &mut Session, args: &[Bytes]) -> Reply {
    if session.multi.is_some() {
        return command::execute(shared, session, args);
    }
    let slot = key_slot(&args[1]);
    if args[2..].iter().any(|k| key_slot(k) != slot) || session.cluster.txn_slot.is_some_and(|s| s != slot) {
        return crossslot();
    }
    let deadline = Instant::now() + MAX_WAIT;
    let mut target: Option<String> = None;
    let mut hops = 0;
    loop {
        if session.cluster.txn_link.is_none() && target.is_none() {
            let notified = cluster.changed.notified();
            let route = {
                let auth = cluster.authority();
                let route = cluster.route(&auth, slot);
                if route == Route::Local {
                    session.cluster.txn_slot = Some(slot);
                    return command::execute(shared, session, args);
                }
                route
            };
            match route {
                Route::Local => unreachable!("executed above"),
                Route::Wait if Instant::now() < deadline => {
                    let _ = tokio::time::timeout(Duration::from_millis(100), notified).await;
                    continue;
                }
                Route::Wait => return tryagain(slot),
                Route::Down => return down(),
                Route::Remote(addr) if redirects(cluster, session) => return moved(slot, &addr),
                Route::Remote(addr) => target = Some(addr),
            }
        }
        if session.cluster.txn_link.is_none() {
            let addr = target.take().expect("set above");
            match cluster.peers.dedicated(&addr, session.proto).await {
                Ok(link) => session.cluster.txn_link = Some((addr, link)),
                Err(e) => return link_error(e),
            }
        }
        let (_, link) = session.cluster.txn_link.as_ref().expect("set above");
        let frame = match link.call(args).await {
            Ok(f) => f,
            Err(e) => {
                session.cluster.end_transaction();
                return link_error(e);
            }
        };
        if let Some(next) = moved_target(&frame) {
            // Not served there (any more). A first WATCH can go elsewhere; a
            // later one cannot join watches that stayed behind on that node.
            let (addr, _) = session.cluster.txn_link.take().expect("set above");
            let followed = match session.cluster.txn_slot {
                None => follow_moved(cluster, &addr, next, &mut hops).await,
                Some(_) => None,
            };
            let Some(next) = followed else {
                session.cluster.end_transaction();
                return tryagain(slot);
            };
            target = next;
            continue;
        }
        session.cluster.txn_slot = Some(slot);
        return Reply::Raw(frame);
    }
}

/// EXEC: runs the queued transaction where its slot is served.
async fn exec(shared: &Arc<Shared>, cluster: &Arc<Cluster>, session: &mut Session, args: &[Bytes]) -> Reply {
    let failed = session.multi.as_ref().is_none_or(|m| m.failed);
    let Some(slot) = session.cluster.txn_slot.filter(|_| !failed) else {
        // No transaction, a doomed one, or one without keys: Redis's own answers, here.
        session.cluster.end_transaction();
        return command::execute(shared, session, args);
    };
    let queue = session.end_multi().map(|m| m.queue).unwrap_or_default();
    let mut batch = Vec::with_capacity(queue.len() + 2);
    batch.push(vec![Bytes::from_static(b"MULTI")]);
    batch.extend(queue.iter().cloned());
    batch.push(args.to_vec());
    if let Some((_, link)) = session.cluster.txn_link.take() {
        // The WATCH lives on that node: the transaction must run there.
        session.cluster.end_transaction();
        return match link.call_batch(&batch).await {
            Ok(mut frames) => match frames.pop() {
                Some(f) if moved_target(&f).is_some() => Reply::NilArray,
                Some(f) => Reply::Raw(f),
                None => Reply::error("ERR no reply to EXEC from the peer node"),
            },
            Err(e) => link_error(e),
        };
    }
    session.cluster.end_transaction();
    let deadline = Instant::now() + MAX_WAIT;
    let mut hops = 0;
    let mut target: Option<String> = None;
    loop {
        let notified = cluster.changed.notified();
        let route = match target.take() {
            Some(addr) => Route::Remote(addr),
            None => {
                let auth = cluster.authority();
                let route = cluster.route(&auth, slot);
                if route == Route::Local {
                    // Put the transaction back and run Redis's EXEC on it.
                    session.begin_multi();
                    if let Some(m) = session.multi.as_mut() {
                        m.queue = queue;
                    }
                    return command::execute(shared, session, args);
                }
                route
            }
        };
        if session.is_watching() {
            // Local WATCHes cannot follow the slot to another node.
            session.unwatch_all(shared);
            return Reply::NilArray;
        }
        match route {
            Route::Local => unreachable!("executed above"),
            Route::Wait if Instant::now() < deadline => {
                let _ = tokio::time::timeout(Duration::from_millis(100), notified).await;
            }
            Route::Wait => return tryagain(slot),
            Route::Down => return down(),
            Route::Remote(addr) if session.cluster.peer.is_some() => return moved(slot, &addr),
            Route::Remote(addr) => {
                let frames = match cluster.peers.link(&addr, session.proto).await {
                    Ok(link) => link.call_batch(&batch).await,
                    Err(e) => Err(e),
                };
                let exec = match frames {
                    Ok(mut f) => f.pop().unwrap_or_default(),
                    Err(e) => return link_error(e),
                };
                match moved_target(&exec) {
                    Some(next) => match follow_moved(cluster, &addr, next, &mut hops).await {
                        Some(next) => target = next,
                        None => return tryagain(slot),
                    },
                    None => {
                        cluster.stats.forwarded.fetch_add(1, Ordering::Relaxed);
                        return Reply::Raw(exec);
                    }
                }
            }
        }
    }
}
