//! From a request's arguments to its reply.
//!
//! [`execute`] is the one entry point. It applies Redis's checks in Redis's order
//! (unknown command, arity, authentication, pub/sub context, MULTI queuing) so a
//! request that fails gets the same error it would from Redis, then runs the
//! command: keyspace commands are [`data::DataCommand`]s applied under the
//! database gate, everything that reads or changes the connection or the server
//! is a [`session::SessionCommand`].

pub mod across;
pub mod args;
pub mod data;
pub mod info;
pub mod session;
pub mod spec;

use bytes::Bytes;

use crate::reply::Reply;
use crate::session::Session;
use crate::shared::Shared;
use data::DataCommand;
use session::SessionCommand;
use spec::{Lookup, Spec};

/// Commands that run even inside MULTI instead of being queued.
pub const NOT_QUEUED: &[&str] = &["exec", "discard", "multi", "watch", "quit", "reset"];
/// Commands allowed to a RESP2 client in subscribed mode.
const SUBSCRIBED_ALLOWED: &[&str] = &[
    "subscribe",
    "psubscribe",
    "unsubscribe",
    "punsubscribe",
    "ping",
    "quit",
    "reset",
];

/// Runs one request and returns its reply.
pub fn execute(shared: &Shared, session: &mut Session, args: &[Bytes]) -> Reply {
    let spec = match spec::lookup(args) {
        Lookup::Found(spec) => spec,
        Lookup::UnknownCommand => return session.reject(unknown_command(args)),
        Lookup::UnknownSubcommand(parent) => {
            let help = format!("'. Try {} HELP.", parent.name.to_ascii_uppercase());
            return session.reject(error_quoting(
                "ERR unknown subcommand '",
                &args[1][..args[1].len().min(128)],
                &help,
            ));
        }
    };
    execute_found(shared, session, spec, args)
}

/// [`execute`] for a request whose command the caller has already looked up.
pub fn execute_found(shared: &Shared, session: &mut Session, spec: &'static Spec, args: &[Bytes]) -> Reply {
    if !spec.arity_ok(args.len()) {
        let text = format!("ERR wrong number of arguments for '{}' command", spec.name);
        if spec.name == "exec" {
            // Redis aborts a transaction whose EXEC itself is malformed, and says so.
            session.end_multi();
            let reason = text.trim_start_matches("ERR ");
            return Reply::error(format!("EXECABORT Transaction discarded because of: {reason}"));
        }
        return session.reject(Reply::error(text));
    }
    if !session.authenticated && !spec.flags.contains(&"no_auth") {
        return session.reject(Reply::error("NOAUTH Authentication required."));
    }
    if session.in_resp2_subscribed_mode() && !SUBSCRIBED_ALLOWED.contains(&spec.name) {
        return Reply::error(format!(
            "ERR Can't execute '{}': only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING / QUIT / RESET are allowed in this context",
            spec.name
        ));
    }
    session.note_command(spec.name);
    if let Some(multi) = session.multi.as_mut() {
        if spec.flags.contains(&"no_multi") {
            return session.reject(Reply::error("ERR Command not allowed inside a transaction"));
        }
        if !NOT_QUEUED.contains(&spec.name) {
            multi.queue.push(args.to_vec());
            let queued = multi.queue.len() as i64;
            session.client.state.lock().multi = queued;
            return Reply::QUEUED;
        }
    }
    let reply = run(shared, session, spec, args, false);
    // A write that was refused appended nothing; one that succeeded must reach
    // the log before its reply is sent (see `server::flush`).
    if (spec.flags.contains(&"write") || spec.name == "exec") && !reply.is_error() {
        session.wrote = true;
    }
    reply
}

/// Parses and applies one command whose checks have passed. `in_exec` is set for
/// commands run by EXEC, which already holds the database gate exclusively.
pub fn run(
    shared: &Shared,
    session: &mut Session,
    spec: &'static Spec,
    args: &[Bytes],
    in_exec: bool,
) -> Reply {
    if let Some(reply) = across::run(shared, session, spec.name, args, in_exec) {
        return reply;
    }
    if let Some(parsed) = DataCommand::parse(spec.name, args) {
        let cmd = match parsed {
            Ok(cmd) => cmd,
            Err(reply) => return reply,
        };
        let max_len = session.max_bulk_len;
        let notify = session.notify_keyspace_events;
        let index = session.db;
        let db = match session.database(shared) {
            Ok(db) => &**db,
            Err(reply) => return reply,
        };
        let gate = &shared.dbs;
        let apply = |cmd: DataCommand| {
            if in_exec {
                cmd.apply(db, max_len)
            } else if cmd.exclusive() {
                let _gate = gate.exclusive();
                cmd.apply(db, max_len)
            } else {
                let _gate = gate.shared();
                cmd.apply(db, max_len)
            }
        };
        if notify == 0 {
            return apply(cmd);
        }
        // Keyspace notifications: the command's changes, named as Redis names
        // them, published once it has run (and its gate is released).
        let (expiry, persist) = cmd.expiry_options();
        let plan = crate::notify::Plan::new(spec.name, expiry, persist);
        let (reply, changes) = db.recording(|| apply(cmd));
        crate::notify::publish(&shared.pubsub, notify, index, plan.events(changes));
        return reply;
    }
    match SessionCommand::parse(spec, args) {
        Ok(cmd) => cmd.apply(shared, session, in_exec),
        Err(reply) => reply,
    }
}

/// Redis's text for an unknown command, quoting up to 128 bytes of arguments
/// as sent (not made valid UTF-8).
fn unknown_command(args: &[Bytes]) -> Reply {
    let mut quoted = Vec::new();
    for arg in &args[1..] {
        if quoted.len() >= 128 {
            break;
        }
        let room = 128 - quoted.len();
        quoted.push(b'\'');
        quoted.extend_from_slice(c_str(arg, room));
        quoted.extend_from_slice(b"' ");
    }
    let mut text = b"ERR unknown command '".to_vec();
    text.extend_from_slice(c_str(&args[0], 128));
    text.extend_from_slice(b"', with args beginning with: ");
    text.extend_from_slice(&quoted);
    Reply::error_bytes(&text)
}

/// An error that quotes a client's argument the way Redis's `%s` does: as
/// sent, up to its first NUL byte.
pub fn error_quoting(before: &str, arg: &[u8], after: &str) -> Reply {
    let mut text = before.as_bytes().to_vec();
    text.extend_from_slice(c_str(arg, arg.len()));
    text.extend_from_slice(after.as_bytes());
    Reply::error_bytes(&text)
}

/// What Redis's `%.<max>s` prints of an argument: up to `max` bytes, ending at
/// the first NUL byte (the argument is formatted as a C string).
fn c_str(arg: &[u8], max: usize) -> &[u8] {
    let arg = &arg[..arg.len().min(max)];
    match memchr::memchr(0, arg) {
        Some(nul) => &arg[..nul],
        None => arg,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_data_command_is_in_the_table_and_parsed() {
        for name in DataCommand::NAMES {
            assert!(spec::find(name).is_some(), "{name} has no spec");
            let args: Vec<Bytes> = [*name, "k", "1", "1"].iter().map(|s| Bytes::from(*s)).collect();
            assert!(DataCommand::parse(name, &args).is_some(), "{name} is not parsed");
        }
        assert!(DataCommand::parse("ping", &[Bytes::from("ping")]).is_none());
    }

    #[test]
    fn unknown_command_text_matches_redis() {
        let args = vec![Bytes::from("foo"), Bytes::from("a"), Bytes::from("b")];
        assert_eq!(
            unknown_command(&args),
            Reply::error_bytes(b"ERR unknown command 'foo', with args beginning with: 'a' 'b' ")
        );
        let args = vec![Bytes::from_static(b"f\xffo\x00x"), Bytes::from_static(b"\xfe")];
        assert_eq!(
            unknown_command(&args),
            Reply::error_bytes(b"ERR unknown command 'f\xffo', with args beginning with: '\xfe' ")
        );
    }
}
