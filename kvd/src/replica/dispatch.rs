//! Client and peer requests on a replicated node.
//!
//! A command on one key is one CASPaxos round ([`super::proposer`]), run on a
//! scratch copy of the key made from what a majority of its replicas hold: the
//! typed command code ([`crate::command::data`]) is the same as on a single
//! node. Commands on several keys that Redis Cluster splits (MGET, MSET, DEL,
//! UNLINK, EXISTS, TOUCH) run key by key. A transaction runs as one round
//! when its commands touch one key (the file system's root swap: WATCH key,
//! GET, MULTI, SET, EXEC); EXEC fails, as Redis's does, if a watched key's
//! accepted ballot changed since WATCH.

use std::sync::Arc;

use bytes::Bytes;

use super::acceptor::Record;
use super::layout::{epoch, Layout};
use super::network::{self, NodeNetwork};
use super::proposer::{Change, Mode, Msg};
use super::{number, txn, Replicas};
use crate::cluster::paxos::Ballot;
use crate::cluster::peer;
use crate::cluster::slot::{self, parse_ranges};
use crate::command::data::DataCommand;
use crate::command::spec::{self, Lookup};
use crate::command::{self};
use crate::db::{now_ms, Db, WatchFlag};
use crate::reply::Reply;
use crate::session::Session;
use crate::shared::Shared;
use crate::store::{Entry, MemStore};

/// Commands on several keys that run key by key, and how replies combine.
const PER_KEY: &[&str] = &["mget", "mset", "del", "unlink", "exists", "touch"];

/// Redis Cluster's answer to a command or transaction over several slots.
fn crossslot() -> Reply {
    Reply::error("CROSSSLOT Keys in request don't hash to the same slot")
}

fn unsupported(what: &str) -> Reply {
    Reply::error(format!(
        "ERR '{what}' is not supported by a replicated kvd yet (docs/PROTOCOL.md, \"Replication\")"
    ))
}

pub async fn dispatch(
    shared: &Arc<Shared>,
    rep: &Arc<Replicas>,
    session: &mut Session,
    args: &[Bytes],
) -> Reply {
    if args[0].eq_ignore_ascii_case(b"kvd.reconfigure") {
        return reconfigure(rep, session, args).await;
    }
    if args[0].eq_ignore_ascii_case(b"kvd.copyslots") && session.cluster.peer.is_some() {
        // A reconfiguration's coordinator hands this old holder some of the
        // moving slots to copy ([`super::reconfigure`]).
        let text = |i: usize| args.get(i).and_then(|a| std::str::from_utf8(a).ok());
        let (Some(version), Some(target), Some(frozen), Some(slots)) = (
            text(1).and_then(|t| t.parse::<u64>().ok()),
            text(2),
            text(3),
            text(4).and_then(parse_ranges),
        ) else {
            return Reply::error("ERR wrong arguments for 'kvd.copyslots'");
        };
        let slots: Vec<u16> = slots.iter().flat_map(|&(a, b)| a..=b).collect();
        return rep.copy_slots_for(version, target, frozen, &slots).await;
    }
    if args[0].eq_ignore_ascii_case(b"kvd.partition") && super::failpoint("partition") {
        // Fault injection for tests: which peers this node cannot reach.
        rep.partition(
            args[1..]
                .iter()
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect(),
        );
        return Reply::OK;
    }
    if args[0].len() > 4 && args[0][..4].eq_ignore_ascii_case(b"kvd.") {
        return internal(shared, rep, session, args);
    }
    let spec = match spec::lookup(args) {
        Lookup::Found(s)
            if s.arity_ok(args.len()) && session.authenticated && !session.in_resp2_subscribed_mode() =>
        {
            s
        }
        _ => return command::execute(shared, session, args),
    };
    if let Some(refusal) = command::across::cluster_refusal(spec.name, args) {
        return refusal;
    }
    match spec.name {
        "cluster|forget" => return rep.forget(&String::from_utf8_lossy(&args[2])).await,
        "cluster|leave" => {
            let me = rep.addr.clone();
            return rep.forget(&me).await;
        }
        "cluster|countkeysinslot" | "cluster|getkeysinslot" => {
            return keys_in_slot(shared, rep, spec.name, args)
        }
        name if name.starts_with("cluster|") => {
            if let Some(reply) = rep.cluster_command(spec, args, session.tls) {
                return reply;
            }
        }
        // As in Redis Cluster, a message reaches the subscribers of every
        // node; the reply counts this node's.
        "publish" if session.multi.is_none() && session.authenticated => {
            let reply = command::execute_found(shared, session, spec, args);
            if !reply.is_error() {
                rep.broadcast(&args[1], &args[2]);
            }
            return reply;
        }
        // Cluster clients send these to a node before reading from it; any
        // node serves every key.
        "readonly" | "readwrite" | "asking" => return Reply::OK,
        "exec" => return exec(shared, rep, session, args).await,
        "watch" if session.multi.is_none() => return watch(shared, rep, session, args).await,
        "unwatch" | "discard" | "reset" => {
            session.cluster.watched.clear();
            session.cluster.txn_slot = None;
            return command::execute(shared, session, args);
        }
        // As on a Redis Cluster node, these act on the keys this node holds
        // (with no more nodes than R, every key).
        "dbsize" if session.multi.is_none() => return Reply::Int(count_held_keys(shared, rep)),
        "randomkey" if session.multi.is_none() => return random_held_key(shared, rep),
        "flushall" | "flushdb" if session.multi.is_none() => {
            let mode_ok = |a: &Bytes| a.eq_ignore_ascii_case(b"async") || a.eq_ignore_ascii_case(b"sync");
            if args.len() > 2 || !args[1..].iter().all(mode_ok) {
                return Reply::error("ERR syntax error");
            }
            let mut keys = Vec::new();
            for_each_held_key(shared, rep, |key| {
                keys.push(key);
                true
            });
            for key in keys {
                let del = [Bytes::from_static(b"DEL"), key.clone()];
                let reply = one_key(shared, rep, session, "del", &del, &key).await;
                if reply.is_error() {
                    return reply;
                }
            }
            return Reply::OK;
        }
        "flushall" | "flushdb" | "randomkey" | "dbsize" => {
            return unsupported(&format!("{} in MULTI", spec.name))
        }
        "scan" | "keys" if session.multi.is_none() => {
            let reply = command::execute(shared, session, args);
            return hide_deleted(shared, rep, reply);
        }
        _ => {}
    }
    let positions = spec.key_positions(args.len());
    let slots = positions.iter().map(|&i| slot::key_slot(&args[i]));
    let one_slot = slots.clone().min() == slots.clone().max();
    if let Some(multi) = &mut session.multi {
        // Queued (or refused) as on a single node; EXEC runs them. As in
        // Redis Cluster, a transaction's keys share one slot.
        if let Some(first) = slots.clone().next() {
            if !one_slot || session.cluster.txn_slot.is_some_and(|s| s != first) {
                multi.failed = true;
                return crossslot();
            }
            session.cluster.txn_slot = Some(first);
        }
        return command::execute(shared, session, args);
    }
    let Some(&first) = positions.first() else {
        return command::execute_found(shared, session, spec, args);
    };
    if positions.iter().all(|&i| args[i] == args[first]) {
        return one_key(shared, rep, session, spec.name, args, &args[first]).await;
    }
    if !PER_KEY.contains(&spec.name) {
        if !one_slot {
            return crossslot();
        }
        // Several keys of one slot (RENAME, SMOVE, LMOVE, ...): one
        // transaction, atomic as in Redis Cluster.
        match DataCommand::parse(spec.name, args) {
            None => return unsupported(&format!("{} on several keys", spec.name)),
            Some(Err(reply)) => return reply,
            Some(Ok(_)) => {}
        }
        let keys = positions.iter().map(|&i| args[i].clone()).collect();
        let queue = vec![args.to_vec()];
        return match exec_several(shared, rep, session, keys, &[], queue, vec![None]).await {
            Reply::Array(mut replies) if replies.len() == 1 => replies.pop().expect("one reply"),
            other => other,
        };
    }
    // Malformed requests get Redis's error before anything is split.
    if let Some(Err(reply)) = DataCommand::parse(spec.name, args) {
        return reply;
    }
    let step = if spec.name == "mset" { 2 } else { 1 };
    let single = match spec.name {
        "mget" => "GET",
        "mset" => "SET",
        other => other,
    };
    let mut replies = Vec::new();
    for part in args[1..].chunks(step) {
        let mut sub = vec![Bytes::copy_from_slice(single.as_bytes())];
        sub.extend(part.iter().cloned());
        let name = single.to_ascii_lowercase();
        let reply = one_key(shared, rep, session, &name, &sub, &part[0]).await;
        if reply.is_error() && spec.name != "mget" {
            return reply;
        }
        replies.push(reply);
    }
    match spec.name {
        "mget" => Reply::Array(replies),
        "mset" => Reply::OK,
        _ => Reply::Int(
            replies
                .iter()
                .filter_map(|r| if let Reply::Int(n) = r { Some(*n) } else { None })
                .sum(),
        ),
    }
}

/// A key's scratch copy: a one-key database holding its current value, on
/// which the command code runs as on a single node, watched so that a
/// change of the same value still counts as one.
struct Scratch<'k> {
    key: &'k Bytes,
    db: Db,
    touched: Arc<WatchFlag>,
}

impl<'k> Scratch<'k> {
    fn new(key: &'k Bytes, current: Option<&Entry>) -> Scratch<'k> {
        let db = Db::new(Arc::new(MemStore::new()));
        if let Some(e) = current {
            // A memory store cannot fail.
            let _ = db.set(key, e.value.clone(), e.expires_at);
        }
        let touched = Arc::new(WatchFlag::default());
        db.watch(key, &touched);
        Scratch { key, db, touched }
    }

    /// What the commands run on it made of the key.
    fn change(&self, reply: Reply) -> Change {
        let now = now_ms();
        let value = self
            .db
            .store()
            .get(self.key)
            .ok()
            .flatten()
            .filter(|e| e.expires_at.is_none_or(|t| t > now));
        Change {
            reply,
            value,
            touched: self.touched.is_dirty(),
            lock: None,
        }
    }
}

/// Runs one command on one key as a CASPaxos round.
async fn one_key(
    shared: &Arc<Shared>,
    rep: &Arc<Replicas>,
    session: &mut Session,
    name: &str,
    args: &[Bytes],
    key: &Bytes,
) -> Reply {
    match DataCommand::parse(name, args) {
        Some(Ok(_)) => {}
        Some(Err(reply)) => return reply,
        None => return unsupported(name),
    }
    let read_only = spec::lookup(args)
        .found()
        .is_some_and(|s| s.flags.contains(&"readonly"));
    let max_len = session.max_bulk_len;
    let mut f = |current: &Record| {
        let cmd = match DataCommand::parse(name, args) {
            Some(Ok(cmd)) => cmd,
            _ => return Change::none(Reply::error("ERR the command stopped parsing"), current),
        };
        let scratch = Scratch::new(key, current.live(now_ms()));
        scratch.change(cmd.apply(&scratch.db, max_len))
    };
    let mode = if read_only { Mode::Read } else { Mode::Write };
    let net = NodeNetwork::new(rep, shared);
    let reply = rep
        .txns
        .propose(&rep.proposer, &net, key, mode, None, &mut f)
        .await;
    if !read_only && !reply.is_error() {
        // Our own acceptor's write reaches the disk before the reply goes out.
        session.wrote = true;
    }
    reply
}

/// WATCH: remembers each key's accepted ballot as a majority shows it.
async fn watch(shared: &Arc<Shared>, rep: &Arc<Replicas>, session: &mut Session, args: &[Bytes]) -> Reply {
    for key in &args[1..] {
        match rep
            .proposer
            .chosen_ballot(&NodeNetwork::new(rep, shared), key)
            .await
        {
            Ok(seen) => session.cluster.watched.push((key.clone(), seen)),
            Err(reply) => return reply,
        }
    }
    Reply::OK
}

async fn exec(shared: &Arc<Shared>, rep: &Arc<Replicas>, session: &mut Session, args: &[Bytes]) -> Reply {
    if session.multi.is_none() || args.len() != 1 {
        return command::execute(shared, session, args);
    }
    let multi = session.end_multi().expect("checked above");
    let watched = std::mem::take(&mut session.cluster.watched);
    session.cluster.txn_slot = None;
    if multi.failed {
        return Reply::error("EXECABORT Transaction discarded because of previous errors.");
    }
    // Every queued command must be a data command on one key, or one on no
    // key (PING, ECHO, ...), which runs here, in its place among the replies.
    let mut keys: Vec<Bytes> = Vec::new();
    let mut keyless: Vec<Option<Reply>> = Vec::new();
    for q in &multi.queue {
        let Lookup::Found(s) = spec::lookup(q) else {
            return unsupported("this command inside MULTI");
        };
        let positions = s.key_positions(q.len());
        if positions.is_empty() {
            keyless.push(Some(Reply::Nil));
            continue;
        }
        keyless.push(None);
        if DataCommand::parse(s.name, q).is_none() {
            return unsupported(&format!("{} inside MULTI", s.name));
        }
        for &i in &positions {
            if !keys.contains(&q[i]) {
                keys.push(q[i].clone());
            }
        }
    }
    for (q, reply) in multi.queue.iter().zip(&mut keyless) {
        if reply.is_some() {
            *reply = Some(command::execute(shared, session, q));
        }
    }
    if keys.len() != 1 || watched.iter().any(|(k, _)| *k != keys[0]) {
        return exec_several(shared, rep, session, keys, &watched, multi.queue, keyless).await;
    }
    let key = keys.pop().expect("one key");
    let expected = watched.first().map(|(_, b)| *b);
    let max_len = session.max_bulk_len;
    let queue = multi.queue;
    let mut f = |current: &Record| {
        if expected.is_some_and(|b| b != current.accepted) {
            return Change::none(Reply::NilArray, current);
        }
        let scratch = Scratch::new(&key, current.live(now_ms()));
        let replies = run_queue(&queue, &keyless, &scratch.db, max_len);
        scratch.change(Reply::Array(replies))
    };
    let mode = if expected.is_some() {
        Mode::Guarded
    } else {
        Mode::Write
    };
    let net = NodeNetwork::new(rep, shared);
    let reply = rep
        .txns
        .propose(&rep.proposer, &net, &key, mode, None, &mut f)
        .await;
    if !reply.is_error() {
        session.wrote = true;
    }
    reply
}

/// The replies of a transaction's queued commands run on `db` (a scratch
/// copy of its keys), in order; a keyless command's reply was made already.
fn run_queue(queue: &[Vec<Bytes>], keyless: &[Option<Reply>], db: &Db, max_len: i64) -> Vec<Reply> {
    queue
        .iter()
        .zip(keyless)
        .map(|(q, local)| {
            if let Some(reply) = local {
                return reply.clone();
            }
            let name = spec::lookup(q).found().map(|s| s.name).unwrap_or("");
            match DataCommand::parse(name, q) {
                Some(Ok(cmd)) => cmd.apply(db, max_len),
                Some(Err(reply)) => reply,
                None => Reply::error("ERR not a data command"),
            }
        })
        .collect()
}

/// EXEC of a transaction over several keys of one slot (and the keys it
/// WATCHes): atomic, as in Redis Cluster ([`super::txn`]).
async fn exec_several(
    shared: &Arc<Shared>,
    rep: &Arc<Replicas>,
    session: &mut Session,
    mut keys: Vec<Bytes>,
    watched: &[(Bytes, Ballot)],
    queue: Vec<Vec<Bytes>>,
    keyless: Vec<Option<Reply>>,
) -> Reply {
    keys.extend(watched.iter().map(|(k, _)| k.clone()));
    let slots: Vec<u16> = keys.iter().map(|k| slot::key_slot(k)).collect();
    if slots.iter().any(|&s| s != slots[0]) {
        return crossslot();
    }
    let max_len = session.max_bulk_len;
    let mut run = |values: &[(Bytes, Option<Entry>)]| -> txn::Ran {
        let db = Db::new(Arc::new(MemStore::new()));
        for (key, entry) in values {
            if let Some(e) = entry {
                // A memory store cannot fail.
                let _ = db.set(key, e.value.clone(), e.expires_at);
            }
        }
        let replies = run_queue(&queue, &keyless, &db, max_len);
        let now = now_ms();
        let after = values
            .iter()
            .map(|(key, _)| {
                let entry = db.store().get(key).ok().flatten();
                (
                    key.clone(),
                    entry.filter(|e| e.expires_at.is_none_or(|t| t > now)),
                )
            })
            .collect();
        (Reply::Array(replies), after)
    };
    let net = NodeNetwork::new(rep, shared);
    let read_only = queue.iter().zip(&keyless).all(|(q, local)| {
        local.is_some()
            || spec::lookup(q)
                .found()
                .is_some_and(|s| s.flags.contains(&"readonly"))
    });
    if read_only {
        if let Some(reply) = rep
            .txns
            .read(&rep.proposer, &net, keys.clone(), watched, &mut run)
            .await
        {
            return reply;
        }
    }
    let reply = rep.txns.exec(&rep.proposer, &net, keys, watched, &mut run).await;
    if !reply.is_error() {
        session.wrote = true;
    }
    reply
}

/// Whether a client sees `key` in SCAN, KEYS, DBSIZE and RANDOMKEY: held
/// here, live, and not a transaction's status key.
fn visible(rep: &Replicas, db: &Db, key: &Bytes, now: u64) -> bool {
    !txn::is_status_key(key) && rep.acceptor.holds_live(db, key, now)
}

/// Visits the live keys of this node's replicas (not deleted, not expired:
/// [`super::acceptor::Acceptor::holds_live`]) until `visit` answers false.
fn for_each_held_key(shared: &Shared, rep: &Replicas, mut visit: impl FnMut(Bytes) -> bool) {
    let now = now_ms();
    let db = shared.dbs.zero();
    let (mut batch, mut cursor) = (Vec::new(), 0);
    loop {
        batch.clear();
        cursor = db.store().scan(cursor, 1000, &mut batch);
        for (key, _) in batch.drain(..) {
            if visible(rep, &db, &key, now) && !visit(key) {
                return;
            }
        }
        if cursor == 0 {
            return;
        }
    }
}

fn count_held_keys(shared: &Shared, rep: &Replicas) -> i64 {
    let mut n = 0;
    for_each_held_key(shared, rep, |_| {
        n += 1;
        true
    });
    n
}

/// CLUSTER COUNTKEYSINSLOT slot / GETKEYSINSLOT slot count: the keys of the
/// slot this node holds, as a Redis Cluster node answers for its own.
fn keys_in_slot(shared: &Shared, rep: &Replicas, name: &str, args: &[Bytes]) -> Reply {
    let number = |i: usize| std::str::from_utf8(&args[i]).ok()?.parse::<i64>().ok();
    let Some(wanted) = number(2).filter(|&s| (0..slot::SLOTS as i64).contains(&s)) else {
        return Reply::error(if name == "cluster|countkeysinslot" {
            "ERR Invalid slot"
        } else {
            "ERR Invalid slot or number of keys"
        });
    };
    let limit = if name == "cluster|countkeysinslot" {
        usize::MAX
    } else {
        match number(3).filter(|&n| n >= 0) {
            Some(n) => n as usize,
            None => return Reply::error("ERR Invalid slot or number of keys"),
        }
    };
    let (mut count, mut keys) = (0, Vec::new());
    if limit > 0 {
        for_each_held_key(shared, rep, |key| {
            if slot::key_slot(&key) as i64 == wanted {
                count += 1;
                if limit != usize::MAX {
                    keys.push(Reply::Bulk(key));
                }
            }
            count < limit
        });
    }
    if name == "cluster|countkeysinslot" {
        Reply::Int(count as i64)
    } else {
        Reply::Array(keys)
    }
}

/// RANDOMKEY over this node's live keys: a few random draws, then the first
/// live key, so tombstones never answer.
fn random_held_key(shared: &Shared, rep: &Replicas) -> Reply {
    let now = now_ms();
    let db = shared.dbs.zero();
    for _ in 0..16 {
        let Some(key) = db.store().random_key() else {
            return Reply::Nil;
        };
        if visible(rep, &db, &key, now) {
            return Reply::Bulk(key);
        }
    }
    let mut first = None;
    for_each_held_key(shared, rep, |key| {
        first = Some(key);
        false
    });
    first.map_or(Reply::Nil, Reply::Bulk)
}

/// SCAN and KEYS list what this node stores: leave out deleted and expired keys.
fn hide_deleted(shared: &Shared, rep: &Replicas, reply: Reply) -> Reply {
    let now = now_ms();
    let db = shared.dbs.zero();
    let live = |k: &Reply| match k {
        Reply::Bulk(key) => visible(rep, &db, key, now),
        _ => true,
    };
    match reply {
        Reply::Array(mut parts) if parts.len() == 2 && matches!(parts[1], Reply::Array(_)) => {
            if let Reply::Array(keys) = &mut parts[1] {
                keys.retain(live);
            }
            Reply::Array(parts)
        }
        Reply::Array(mut keys) => {
            keys.retain(live);
            Reply::Array(keys)
        }
        other => other,
    }
}

/// `KVD.RECONFIGURE node [node ...]` (an operator's command, not a peer's):
/// makes the list the cluster's nodes ([`super::reconfigure`]).
async fn reconfigure(rep: &Arc<Replicas>, session: &Session, args: &[Bytes]) -> Reply {
    if !session.authenticated {
        return Reply::error("NOAUTH Authentication required.");
    }
    if args.len() < 2 {
        return Reply::error("ERR wrong number of arguments for 'kvd.reconfigure' command");
    }
    let nodes: Vec<String> = args[1..]
        .iter()
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    rep.reconfigure(nodes).await
}

/// The server side of the handshake that makes a connection a peer's:
/// `KVD.PEER CHALLENGE` answers a random challenge, `KVD.PEER AUTH <id>
/// <proof>` checks the HMAC of it under `secret` (a wrong proof closes the
/// connection). `None` for any other command.
fn handshake(secret: &str, session: &mut Session, args: &[Bytes]) -> Option<Reply> {
    if !args[0].eq_ignore_ascii_case(b"kvd.peer") {
        return None;
    }
    let sub = args.get(1).map(|a| a.to_ascii_lowercase());
    let text = |i: usize| String::from_utf8_lossy(&args[i]).into_owned();
    match (sub.as_deref(), args.len()) {
        (Some(b"challenge"), 2) => {
            let c = peer::challenge();
            session.cluster.challenge = Some(c.clone());
            Some(Reply::bulk_str(&c))
        }
        (Some(b"auth"), 4) => {
            let Some(challenge) = session.cluster.challenge.take() else {
                return Some(Reply::error("ERR KVD.PEER AUTH without a challenge"));
            };
            if !peer::verify(secret, &challenge, &text(3)) {
                tracing::warn!(
                    client = session.client.id,
                    "a peer failed the cluster secret check"
                );
                session.close = true;
                return Some(Reply::error("ERR invalid cluster secret"));
            }
            session.cluster.peer = Some(text(2));
            session.set_authenticated(true);
            Some(Reply::OK)
        }
        _ => None,
    }
}

/// `KVD.*`: peer authentication, the acceptor's three phases, and a
/// reconfiguration's steps.
fn internal(shared: &Arc<Shared>, rep: &Arc<Replicas>, session: &mut Session, args: &[Bytes]) -> Reply {
    let name = String::from_utf8_lossy(&args[0]).to_ascii_lowercase();
    if let Some(reply) = handshake(&rep.secret, session, args) {
        return reply;
    }
    if session.cluster.peer.is_none() {
        return Reply::error("NOPERM KVD.* commands are for cluster peers");
    }
    let bad = || Reply::error(format!("ERR wrong arguments for '{name}'"));
    let ballot = |i: usize| -> Option<Ballot> {
        Some(Ballot {
            counter: number(args, i)?,
            proposer: number(args, i + 1)?,
        })
    };
    if name == "kvd.digests" && args.len() == 1 {
        let digests = rep.acceptor.digests();
        let mut raw = Vec::with_capacity(digests.len() * 8);
        for d in digests {
            raw.extend_from_slice(&d.to_le_bytes());
        }
        return Reply::Bulk(Bytes::from(raw));
    }
    if name == "kvd.publish" && args.len() == 3 {
        shared.pubsub.publish(&args[1], &args[2]);
        return Reply::Int(0);
    }
    let msg = match (name.as_str(), args.len()) {
        ("kvd.query", 3) => match number(args, 2) {
            Some(v) => Msg::Query(v),
            None => return bad(),
        },
        ("kvd.config", 1) => return Reply::Bulk(Bytes::from(rep.layout().encode())),
        ("kvd.gossip", 2) => return rep.answer_gossip(&args[1]),
        ("kvd.config", 3) if args[1].eq_ignore_ascii_case(b"set") => {
            let layout = std::str::from_utf8(&args[2])
                .ok()
                .and_then(|t| Layout::decode(t, &rep.addr));
            return match layout {
                Some(l) => match rep.adopt(l) {
                    Ok(_) => Reply::OK,
                    Err(reply) => reply,
                },
                None => bad(),
            };
        }
        ("kvd.vote", 4) => {
            return match (number(args, 1), ballot(2)) {
                (Some(version), Some(b)) => match rep.vote_promise(version, b) {
                    Ok(Some((voted, target))) => Reply::Bulk(Bytes::from(format!(
                        "{} {} {target}",
                        voted.counter, voted.proposer
                    ))),
                    Ok(None) => Reply::Bulk(Bytes::from_static(b"none")),
                    Err(reply) => reply,
                },
                _ => bad(),
            };
        }
        ("kvd.freeze", 6) => {
            let target = std::str::from_utf8(&args[4])
                .ok()
                .filter(|t| Layout::decode(t, &rep.addr).is_some());
            let slots = std::str::from_utf8(&args[5]).ok().and_then(parse_ranges);
            return match (number(args, 1), ballot(2), target, slots) {
                (Some(version), Some(b), Some(target), Some(slots)) => {
                    match rep.freeze(version, b, target, &slots) {
                        Ok(()) => Reply::OK,
                        Err(reply) => reply,
                    }
                }
                _ => bad(),
            };
        }
        ("kvd.slotrecords", 5) => return super::reconfigure::slot_records(shared, rep, args),
        // `KVD.HEADS version key [key ...]`: each key's record header (nil:
        // none), for catch-up to compare replicas a batch at a time.
        ("kvd.heads", n) if n >= 3 => {
            let layout_version = rep.layout().version;
            if number(args, 1) != Some(layout_version) {
                return super::version_refusal(layout_version);
            }
            let zero = shared.dbs.zero();
            let mut heads = Vec::with_capacity(n - 2);
            for key in &args[2..] {
                heads.push(match rep.acceptor.head(&zero, key) {
                    Ok(Some(head)) => Reply::Bulk(head),
                    Ok(None) => Reply::Nil,
                    Err(e) => Reply::error(e.to_string()),
                });
            }
            return Reply::Array(heads);
        }
        // `KVD.INSTALL key record [key record ...]`: one answer per key, in
        // an array (a reconfiguration sends a node its keys in batches).
        ("kvd.install", n) if n >= 3 && n % 2 == 1 => {
            let mut records = Vec::with_capacity(n / 2);
            for pair in args[1..].chunks(2) {
                let Some(record) = Record::decode(&pair[1]) else {
                    return bad();
                };
                records.push((&pair[0], record));
            }
            let version = rep.layout().version;
            if records.iter().any(|(_, r)| epoch(r.accepted) <= version) {
                return super::version_refusal(version);
            }
            session.wrote = true;
            let zero = shared.dbs.zero();
            let answers = records
                .into_iter()
                .map(|(key, record)| match rep.acceptor.install(&zero, key, record) {
                    Ok(()) => Reply::OK,
                    Err(Ok(beaten)) => network::ballot_error(beaten),
                    Err(Err(e)) => Reply::error(e.to_string()),
                })
                .collect();
            return Reply::Array(answers);
        }
        ("kvd.join", 2) => return rep.join(String::from_utf8_lossy(&args[1]).into_owned()),
        ("kvd.forgotten", 1) => {
            rep.left.store(true, std::sync::atomic::Ordering::Relaxed);
            return Reply::OK;
        }
        // The change that was to take it out failed: it stays a member.
        ("kvd.forgotten", 2) if args[1].eq_ignore_ascii_case(b"no") => {
            rep.left.store(false, std::sync::atomic::Ordering::Relaxed);
            return Reply::OK;
        }
        ("kvd.purge", 3) => {
            let Some(dead) = Record::decode(&args[2]) else {
                return bad();
            };
            session.wrote = true;
            return match rep.acceptor.purge(&shared.dbs.zero(), &args[1], &dead) {
                Ok(purged) => Reply::Int(purged as i64),
                Err(e) => Reply::error(e.to_string()),
            };
        }
        ("kvd.prepare", 4) => match ballot(2) {
            Some(b) => Msg::Prepare(b),
            None => return bad(),
        },
        ("kvd.accept", 5 | 7) => {
            let next = match args.len() {
                7 => match ballot(5) {
                    Some(n) => Some(n),
                    None => return bad(),
                },
                _ => None,
            };
            match (ballot(2), Record::decode(&args[4])) {
                (Some(b), Some(r)) => {
                    session.wrote = true;
                    Msg::Accept(Record { accepted: b, ..r }, next)
                }
                _ => return bad(),
            }
        }
        _ => return Reply::error(format!("ERR unknown command '{name}'")),
    };
    network::local(shared, rep, &args[1], &msg)
}
