//! Commands that reach past the selected database: SELECT's checks, SWAPDB,
//! MOVE, COPY ... DB, and FLUSHALL. Each runs with the gate held exclusively
//! (or inside EXEC, which holds it), so it is atomic against every client of
//! every database. Texts are Redis 7's, including a cluster node's refusals.

use bytes::Bytes;

use super::args::{parse_i64, ERR_NOT_INTEGER};
use super::data::DataCommand;
use crate::db::Db;
use crate::reply::Reply;
use crate::session::Session;
use crate::shared::Shared;
use crate::store::StoreError;

/// Whether this node is part of a cluster (which keeps database 0 only).
fn clustered(shared: &Shared) -> bool {
    shared.cluster.get().is_some()
}

/// Redis's `getIntFromObjectOrReply`: an `int`, or its error (`msg` replacing
/// both texts when given).
pub fn int_arg(arg: &[u8], msg: Option<&str>) -> Result<i64, Reply> {
    let err = |text: &str| Reply::error(format!("ERR {}", msg.unwrap_or(text)));
    let n = parse_i64(arg).ok_or_else(|| match msg {
        Some(m) => Reply::error(format!("ERR {m}")),
        None => Reply::error(ERR_NOT_INTEGER),
    })?;
    if n < i32::MIN as i64 || n > i32::MAX as i64 {
        return Err(err(
            "value is out of range, value must between -2147483648 and 2147483647",
        ));
    }
    Ok(n)
}

/// The database at `index`, or Redis's out-of-range error.
fn database(shared: &Shared, index: i64) -> Result<(usize, std::sync::Arc<Db>), Reply> {
    let out_of_range = || Reply::error("ERR DB index is out of range");
    let i = usize::try_from(index).map_err(|_| out_of_range())?;
    match shared.dbs.get(i) {
        Some(Ok(db)) => Ok((i, db)),
        Some(Err(e)) => Err(store_error(e)),
        None => Err(out_of_range()),
    }
}

fn store_error(e: StoreError) -> Reply {
    Reply::error(e.to_string())
}

/// A cluster node's refusal of a command that needs another database than 0,
/// as Redis Cluster words it; `None` for every other command (malformed ones
/// included: those get their usual errors).
pub fn cluster_refusal(name: &str, args: &[Bytes]) -> Option<Reply> {
    let text = match name {
        "swapdb" => "ERR SWAPDB is not allowed in cluster mode",
        "move" => "ERR MOVE is not allowed in cluster mode",
        "copy" => match DataCommand::parse(name, args) {
            Some(Ok(DataCommand::Copy { db: Some(db), .. })) if db != 0 => {
                "ERR Copying to another database is not allowed in cluster mode"
            }
            _ => return None,
        },
        _ => return None,
    };
    Some(Reply::error(text))
}

/// SELECT `index`.
pub fn select(shared: &Shared, s: &mut Session, index: i64) -> Reply {
    if clustered(shared) && index != 0 {
        return Reply::error("ERR SELECT is not allowed in cluster mode");
    }
    let (i, _) = match database(shared, index) {
        Ok(found) => found,
        Err(reply) => return reply,
    };
    match s.select(shared, i) {
        Ok(()) => Reply::OK,
        Err(reply) => reply,
    }
}

/// Runs `name` if it is one of this module's commands (COPY only with a DB
/// option naming another database); `None` for every other command.
pub fn run(shared: &Shared, s: &mut Session, name: &str, args: &[Bytes], in_exec: bool) -> Option<Reply> {
    if clustered(shared) {
        return cluster_refusal(name, args);
    }
    let reply = match name {
        "swapdb" => swapdb(shared, args, in_exec),
        "move" => move_key(shared, s, args, in_exec),
        "flushall" => flush_all(shared, args, in_exec),
        "copy" => {
            let Some(Ok(DataCommand::Copy {
                from,
                to,
                replace,
                db: Some(target),
            })) = DataCommand::parse(name, args)
            else {
                return None;
            };
            if target == s.db as i64 {
                return None;
            }
            copy(shared, s, (from, to, replace, target), in_exec)
        }
        _ => return None,
    };
    Some(reply)
}

fn swapdb(shared: &Shared, args: &[Bytes], in_exec: bool) -> Reply {
    let a = match int_arg(&args[1], Some("invalid first DB index")) {
        Ok(n) => n,
        Err(reply) => return reply,
    };
    let b = match int_arg(&args[2], Some("invalid second DB index")) {
        Ok(n) => n,
        Err(reply) => return reply,
    };
    let count = shared.dbs.count() as i64;
    if !(0..count).contains(&a) || !(0..count).contains(&b) {
        return Reply::error("ERR DB index is out of range");
    }
    let _gate = (!in_exec).then(|| shared.dbs.exclusive());
    match shared.dbs.swap(a as usize, b as usize) {
        Ok(()) => Reply::OK,
        Err(e) => store_error(e),
    }
}

/// MOVE key db. The key is written to the target and made durable there
/// before it is removed from the source, so a crash in between leaves it in
/// both databases, never in neither.
fn move_key(shared: &Shared, s: &mut Session, args: &[Bytes], in_exec: bool) -> Reply {
    let key = &args[1];
    let target = match int_arg(&args[2], None) {
        Ok(n) => n,
        Err(reply) => return reply,
    };
    let (dst_index, dst) = match database(shared, target) {
        Ok(found) => found,
        Err(reply) => return reply,
    };
    let src_index = s.db;
    let src = match s.database(shared) {
        Ok(db) => db.clone(),
        Err(reply) => return reply,
    };
    if src_index == dst_index {
        return Reply::error("ERR source and destination objects are the same");
    }
    let _gate = (!in_exec).then(|| shared.dbs.exclusive());
    let moved = (|| -> Result<bool, StoreError> {
        let Some(entry) = src.get(key)? else {
            return Ok(false);
        };
        if dst.exists(key) {
            return Ok(false);
        }
        dst.set(key, entry.value, entry.expires_at)?;
        dst.store().flush()?;
        src.remove(key)?;
        Ok(true)
    })();
    match moved {
        Ok(false) => Reply::Int(0),
        Ok(true) => {
            let flags = s.notify_keyspace_events;
            let generic = crate::notify::GENERIC;
            crate::notify::publish(
                &shared.pubsub,
                flags,
                src_index,
                vec![(generic, "move_from", key.clone())],
            );
            crate::notify::publish(
                &shared.pubsub,
                flags,
                dst_index,
                vec![(generic, "move_to", key.clone())],
            );
            Reply::Int(1)
        }
        Err(e) => store_error(e),
    }
}

/// COPY source destination DB n [REPLACE], with n another database.
fn copy(
    shared: &Shared,
    s: &mut Session,
    (from, to, replace, target): (Bytes, Bytes, bool, i64),
    in_exec: bool,
) -> Reply {
    let (dst_index, dst) = match database(shared, target) {
        Ok(found) => found,
        Err(reply) => return reply,
    };
    let src = match s.database(shared) {
        Ok(db) => db.clone(),
        Err(reply) => return reply,
    };
    let _gate = (!in_exec).then(|| shared.dbs.exclusive());
    let copied = (|| -> Result<bool, StoreError> {
        let Some(entry) = src.get(&from)? else {
            return Ok(false);
        };
        if !replace && dst.exists(&to) {
            return Ok(false);
        }
        dst.set(&to, entry.value, entry.expires_at)?;
        Ok(true)
    })();
    match copied {
        Ok(false) => Reply::Int(0),
        Ok(true) => {
            let flags = s.notify_keyspace_events;
            crate::notify::publish(
                &shared.pubsub,
                flags,
                dst_index,
                vec![(crate::notify::GENERIC, "copy_to", to)],
            );
            Reply::Int(1)
        }
        Err(e) => store_error(e),
    }
}

/// FLUSHALL [ASYNC | SYNC]: every database.
fn flush_all(shared: &Shared, args: &[Bytes], in_exec: bool) -> Reply {
    // The option's checks are FLUSHDB's.
    if let Some(Err(reply)) = DataCommand::parse("flushall", args) {
        return reply;
    }
    let _gate = (!in_exec).then(|| shared.dbs.exclusive());
    for (_, db) in shared.dbs.opened() {
        if let Err(e) = db.flush() {
            return store_error(e);
        }
    }
    Reply::OK
}
