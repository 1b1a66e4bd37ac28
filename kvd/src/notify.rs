//! Keyspace notifications, as Redis's `notify-keyspace-events` makes them.
//!
//! With the setting on, every change to a key is published on pub/sub:
//! `__keyspace@0__:<key>` carries the event's name, `__keyevent@0__:<event>`
//! the key. Which events are sent is chosen by class (`g` generic, `$`
//! string, `x` expired, `n` new key, `A` for all but `n` and `m`) and where
//! by `K` (keyspace channels) and `E` (keyevent channels), with Redis's
//! letters, parsing and `CONFIG GET` text. A client such as fsclient can then
//! learn of a volume's new root without polling.
//!
//! How events are found: while a command runs with notifications on, the
//! database records each change it makes (a key created, updated, removed or
//! found expired; [`crate::db::Change`]); [`Plan`] names those changes the
//! way Redis's commands do (`SET` a `set`, `INCR` an `incrby`, `RENAME` a
//! `rename_from` and a `rename_to`, ...), in Redis's order.
//!
//! Notifications are per node, as in Redis Cluster: a cluster node publishes
//! the changes it applies.

use bytes::Bytes;

use crate::db::{Change, ChangeKind};
use crate::pubsub::PubSub;

pub const KEYSPACE: u16 = 1 << 0; // K
pub const KEYEVENT: u16 = 1 << 1; // E
pub const GENERIC: u16 = 1 << 2; // g
pub const STRING: u16 = 1 << 3; // $
pub const LIST: u16 = 1 << 4; // l
pub const SET: u16 = 1 << 5; // s
pub const HASH: u16 = 1 << 6; // h
pub const ZSET: u16 = 1 << 7; // z
pub const EXPIRED: u16 = 1 << 8; // x
pub const EVICTED: u16 = 1 << 9; // e
pub const STREAM: u16 = 1 << 10; // t
pub const KEY_MISS: u16 = 1 << 11; // m
pub const MODULE: u16 = 1 << 13; // d
pub const NEW: u16 = 1 << 14; // n
/// `A`: every class but `m` and `n`.
pub const ALL: u16 = GENERIC | STRING | LIST | SET | HASH | ZSET | EXPIRED | EVICTED | STREAM | MODULE;

/// Redis's `keyspaceEventsStringToFlags`; `None` for an unknown letter.
pub fn parse(text: &str) -> Option<u16> {
    let mut flags = 0;
    for c in text.chars() {
        flags |= match c {
            'A' => ALL,
            'g' => GENERIC,
            '$' => STRING,
            'l' => LIST,
            's' => SET,
            'h' => HASH,
            'z' => ZSET,
            'x' => EXPIRED,
            'e' => EVICTED,
            'K' => KEYSPACE,
            'E' => KEYEVENT,
            't' => STREAM,
            'm' => KEY_MISS,
            'd' => MODULE,
            'n' => NEW,
            _ => return None,
        };
    }
    Some(flags)
}

/// Redis's `keyspaceEventsFlagsToString` (what `CONFIG GET` shows).
pub fn format(flags: u16) -> String {
    let mut out = String::new();
    if flags & ALL == ALL {
        out.push('A');
    } else {
        for (bit, c) in [
            (GENERIC, 'g'),
            (STRING, '$'),
            (LIST, 'l'),
            (SET, 's'),
            (HASH, 'h'),
            (ZSET, 'z'),
            (EXPIRED, 'x'),
            (EVICTED, 'e'),
            (STREAM, 't'),
            (MODULE, 'd'),
            (NEW, 'n'),
        ] {
            if flags & bit != 0 {
                out.push(c);
            }
        }
    }
    if flags & KEYSPACE != 0 {
        out.push('K');
    }
    if flags & KEYEVENT != 0 {
        out.push('E');
    }
    if flags & KEY_MISS != 0 {
        out.push('m');
    }
    out
}

/// What a command's changes are called.
pub struct Plan {
    name: &'static str,
    /// SET / SETEX with an expiry, GETEX with one: an `expire` follows the set.
    expiry: bool,
    /// GETEX PERSIST.
    persist: bool,
}

impl Plan {
    /// `name`: the command's (lowercase) name, as in its spec; `expiry` and
    /// `persist`: its options ([`crate::command::data::DataCommand::expiry_options`]).
    pub fn new(name: &'static str, expiry: bool, persist: bool) -> Plan {
        Plan {
            name,
            expiry,
            persist,
        }
    }

    /// The events of a command's changes, in Redis's order: (class, event, key).
    pub fn events(&self, changes: Vec<Change>) -> Vec<(u16, &'static str, Bytes)> {
        let mut out = Vec::new();
        // RENAME: Redis adds the destination (`new`), then says `rename_from`
        // and `rename_to`, whatever order the store did them in.
        if matches!(self.name, "rename" | "renamenx") {
            let mut from = None;
            let mut to = None;
            for c in changes {
                match c.kind {
                    ChangeKind::Expired => out.push((EXPIRED, "expired", c.key)),
                    ChangeKind::Removed => from = Some(c.key),
                    ChangeKind::Created => {
                        out.push((NEW, "new", c.key.clone()));
                        to = Some(c.key)
                    }
                    ChangeKind::Updated => to = Some(c.key),
                }
            }
            if let (Some(from), Some(to)) = (from, to) {
                out.push((GENERIC, "rename_from", from));
                out.push((GENERIC, "rename_to", to));
            }
            return out;
        }
        for c in changes {
            match c.kind {
                ChangeKind::Expired => out.push((EXPIRED, "expired", c.key)),
                ChangeKind::Removed => out.push((GENERIC, "del", c.key)),
                ChangeKind::Created | ChangeKind::Updated => {
                    if c.kind == ChangeKind::Created {
                        out.push((NEW, "new", c.key.clone()));
                    }
                    for (class, event) in self.put_events() {
                        out.push((class, event, c.key.clone()));
                    }
                }
            }
        }
        out
    }

    fn put_events(&self) -> Vec<(u16, &'static str)> {
        match self.name {
            "set" if self.expiry => vec![(STRING, "set"), (GENERIC, "expire")],
            "set" | "setnx" | "getset" | "mset" | "msetnx" => vec![(STRING, "set")],
            "setex" | "psetex" => vec![(STRING, "set"), (GENERIC, "expire")],
            "getex" if self.persist => vec![(GENERIC, "persist")],
            "getex" if self.expiry => vec![(GENERIC, "expire")],
            "setrange" => vec![(STRING, "setrange")],
            "append" => vec![(STRING, "append")],
            "incr" | "decr" | "incrby" | "decrby" => vec![(STRING, "incrby")],
            "incrbyfloat" => vec![(STRING, "incrbyfloat")],
            "copy" => vec![(GENERIC, "copy_to")],
            "expire" | "pexpire" | "expireat" | "pexpireat" => vec![(GENERIC, "expire")],
            "persist" => vec![(GENERIC, "persist")],
            _ => Vec::new(),
        }
    }
}

/// Publishes `events` as `flags` asks.
pub fn publish(pubsub: &PubSub, flags: u16, db: usize, events: Vec<(u16, &'static str, Bytes)>) {
    for (class, event, key) in events {
        if flags & class == 0 {
            continue;
        }
        if flags & KEYSPACE != 0 {
            let mut channel = format!("__keyspace@{db}__:").into_bytes();
            channel.extend_from_slice(&key);
            pubsub.publish(&Bytes::from(channel), &Bytes::from_static(event.as_bytes()));
        }
        if flags & KEYEVENT != 0 {
            let channel = format!("__keyevent@{db}__:{event}");
            pubsub.publish(&Bytes::from(channel), &key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_parse_and_print_as_redis_does() {
        assert_eq!(parse("KEA"), Some(KEYSPACE | KEYEVENT | ALL));
        assert_eq!(format(parse("KEA").unwrap()), "AKE");
        assert_eq!(format(parse("Kx$g").unwrap()), "g$xK");
        assert_eq!(format(parse("nE").unwrap()), "nE");
        // As Redis 7.0 prints it: `n` is not shown next to `A`.
        assert_eq!(format(parse("nKEA").unwrap()), "AKE");
        assert_eq!(format(parse("mKg$x").unwrap()), "g$xKm");
        assert_eq!(parse("KEQ"), None);
        assert_eq!(format(0), "");
    }
}
