//! MONITOR: every command a client sends, as Redis prints it, to every
//! connection that asked.
//!
//! A line is `+<unix time>.<microseconds> [<db> <client address>] "arg" ...`
//! with each argument quoted the way Redis's `sdscatrepr` quotes it. Like
//! Redis, commands flagged `admin` (CONFIG, CLIENT KILL, MONITOR itself...)
//! are not shown, and AUTH's and HELLO's credentials are `(redacted)`.
//!
//! In a cluster a command is shown by the node the client sent it to (with
//! the client's own address), whether that node runs it or forwards it; a
//! node does not show what other nodes forward to it, so a monitor on any
//! node sees exactly what clients asked of that node.
//!
//! Monitors get lines through their pub/sub queue; a monitor that does not
//! keep up is disconnected, as a slow subscriber is (see [`crate::pubsub`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use parking_lot::RwLock;

use crate::clients::ClientHandle;
use crate::command::spec::Spec;
use crate::pubsub::{Message, Subscriber};

#[derive(Default)]
pub struct Monitors {
    subs: RwLock<HashMap<u64, Subscriber>>,
    /// How many monitors there are, read without the lock on every request.
    count: AtomicUsize,
}

impl Monitors {
    pub fn add(&self, sub: Subscriber) {
        let mut subs = self.subs.write();
        subs.insert(sub.client.id, sub);
        self.count.store(subs.len(), Ordering::Relaxed);
    }

    pub fn remove(&self, client: u64) {
        let mut subs = self.subs.write();
        if subs.remove(&client).is_some() {
            self.count.store(subs.len(), Ordering::Relaxed);
        }
    }

    /// Whether anyone is watching (the only cost MONITOR adds to a request
    /// when nobody is).
    pub fn active(&self) -> bool {
        self.count.load(Ordering::Relaxed) > 0
    }

    /// Shows one request of `client` to every monitor.
    /// `db`: the client's selected database after the request ran, as Redis shows it.
    pub fn feed(&self, client: &ClientHandle, db: usize, spec: Option<&Spec>, args: &[Bytes]) {
        if spec.is_some_and(|s| s.flags.contains(&"admin")) {
            return;
        }
        let line = Message::Monitor(line(SystemTime::now(), db as u32, &client.addr.to_string(), args));
        for sub in self.subs.read().values() {
            crate::pubsub::deliver(sub, line.clone());
        }
    }
}

/// One MONITOR line, with its `+` and CRLF.
pub fn line(at: SystemTime, db: u32, addr: &str, args: &[Bytes]) -> Bytes {
    let t = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    let mut out = format!("+{}.{:06} [{db} {addr}]", t.as_secs(), t.subsec_micros()).into_bytes();
    let redact_from = match args.first() {
        Some(name) if name.eq_ignore_ascii_case(b"auth") => 1,
        // HELLO's protocol version is shown, AUTH and what follows it are not.
        Some(name) if name.eq_ignore_ascii_case(b"hello") => args
            .iter()
            .position(|a| a.eq_ignore_ascii_case(b"auth"))
            .map_or(args.len(), |i| i + 1),
        _ => args.len(),
    };
    for (i, arg) in args.iter().enumerate() {
        out.push(b' ');
        if i >= redact_from {
            out.extend_from_slice(b"\"(redacted)\"");
        } else {
            repr(&mut out, arg);
        }
    }
    out.extend_from_slice(b"\r\n");
    Bytes::from(out)
}

/// Redis's `sdscatrepr`: a quoted string with `\\`, `\"`, `\n`, `\r`, `\t`,
/// `\a`, `\b` escaped, other printable ASCII as is, and `\xHH` for the rest.
fn repr(out: &mut Vec<u8>, arg: &[u8]) {
    out.push(b'"');
    for &c in arg {
        match c {
            b'\\' | b'"' => out.extend_from_slice(&[b'\\', c]),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            7 => out.extend_from_slice(b"\\a"),
            8 => out.extend_from_slice(b"\\b"),
            0x20..=0x7e => out.push(c),
            _ => out.extend_from_slice(format!("\\x{c:02x}").as_bytes()),
        }
    }
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn lines_quote_like_redis_and_hide_credentials() {
        let at = UNIX_EPOCH + Duration::from_micros(1_339_518_083_107_412);
        let args = |v: &[&[u8]]| v.iter().map(|a| Bytes::copy_from_slice(a)).collect::<Vec<_>>();
        assert_eq!(
            line(at, 0, "127.0.0.1:60866", &args(&[b"set", b"k\"\\", b"a\r\n\t\x07\x08\x00\xff"])),
            Bytes::from_static(b"+1339518083.107412 [0 127.0.0.1:60866] \"set\" \"k\\\"\\\\\" \"a\\r\\n\\t\\a\\b\\x00\\xff\"\r\n")
        );
        assert_eq!(
            line(at, 0, "a:1", &args(&[b"AUTH", b"user", b"secret"])),
            Bytes::from_static(b"+1339518083.107412 [0 a:1] \"AUTH\" \"(redacted)\" \"(redacted)\"\r\n")
        );
        assert_eq!(
            line(at, 0, "a:1", &args(&[b"hello", b"3", b"AUTH", b"u", b"p"])),
            Bytes::from_static(
                b"+1339518083.107412 [0 a:1] \"hello\" \"3\" \"AUTH\" \"(redacted)\" \"(redacted)\"\r\n"
            )
        );
    }
}
