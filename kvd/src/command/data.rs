//! Commands on the keyspace: strings, keys, expiry, scans.
//!
//! Each is parsed into a typed [`DataCommand`] and applied to a [`Db`]. They touch
//! nothing but the keyspace (no session state), which is what lets a cluster node
//! run them on behalf of a client connected elsewhere. The caller holds the
//! database gate: shared, or exclusive when [`DataCommand::exclusive`] says so.

use bytes::{Bytes, BytesMut};

use super::args::{parse_f64, parse_i64, syntax, Args, ParseResult, ERR_NOT_INTEGER};
use crate::db::{now_ms, Db};
use crate::glob;
use crate::reply::{format_human, Reply};
use crate::store::{Entry, StoreError, Update};

/// When a written key expires.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Expiry {
    /// Remove any expiry (a plain SET).
    Clear,
    /// Keep the current one (KEEPTTL, APPEND, INCR, ...).
    Keep,
    /// At this Unix time in milliseconds.
    At(u64),
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Condition {
    Always,
    IfAbsent,
    IfPresent,
}

/// EXPIRE's NX/XX/GT/LT options. Each given option is its own check and all
/// must pass, as in Redis's `expireGenericCommand`: `XX LT` on a key without a
/// TTL fails the XX check (an earlier version folded the options into one and
/// let LT alone decide, setting a TTL Redis refuses).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ExpireCondition {
    pub nx: bool,
    pub xx: bool,
    pub gt: bool,
    pub lt: bool,
}

impl ExpireCondition {
    /// Whether the new expiry time `at` may replace `current` (`None`: no TTL,
    /// which counts as infinitely far away).
    pub fn allows(&self, current: Option<i64>, at: i64) -> bool {
        !(self.nx && current.is_some()
            || self.xx && current.is_none()
            || self.gt && current.is_none_or(|c| at <= c)
            || self.lt && current.is_some_and(|c| at >= c))
    }
}

#[derive(Debug)]
pub enum DataCommand {
    Get(Bytes),
    Set {
        key: Bytes,
        value: Bytes,
        cond: Condition,
        get: bool,
        expiry: Expiry,
    },
    /// SETNX: like `SET NX`, but answers 1 or 0.
    SetNx(Bytes, Bytes),
    GetSet(Bytes, Bytes),
    GetDel(Bytes),
    GetEx(Bytes, Expiry),
    MGet(Vec<Bytes>),
    MSet(Vec<(Bytes, Bytes)>),
    MSetNx(Vec<(Bytes, Bytes)>),
    Strlen(Bytes),
    GetRange(Bytes, i64, i64),
    SetRange(Bytes, i64, Bytes),
    Append(Bytes, Bytes),
    IncrBy(Bytes, i64),
    IncrByFloat(Bytes, f64),
    Del(Vec<Bytes>),
    Exists(Vec<Bytes>),
    Type(Bytes),
    Rename {
        from: Bytes,
        to: Bytes,
        nx: bool,
    },
    Copy {
        from: Bytes,
        to: Bytes,
        replace: bool,
        /// The DB option: the target database (another one is
        /// [`super::across`]'s to copy to).
        db: Option<i64>,
    },
    Ttl {
        key: Bytes,
        millis: bool,
        absolute: bool,
    },
    Expire {
        key: Bytes,
        at: i64,
        cond: ExpireCondition,
    },
    Persist(Bytes),
    Keys(Bytes),
    Scan {
        cursor: u64,
        pattern: Option<Bytes>,
        count: usize,
        kind: Option<Bytes>,
    },
    RandomKey,
    DbSize,
    /// MEMORY USAGE: an estimate of the bytes the key costs.
    MemoryUsage(Bytes),
    Flush,
}

fn invalid_expire(cmd: &str) -> Reply {
    Reply::error(format!("ERR invalid expire time in '{cmd}' command"))
}

/// Converts a relative or absolute expire argument to Unix milliseconds, with
/// Redis's checks (`getExpireMillisecondsOrReply`).
fn expire_at(cmd: &str, raw: &Bytes, seconds: bool, relative: bool) -> ParseResult<Expiry> {
    let n = parse_i64(raw).ok_or_else(|| Reply::error(ERR_NOT_INTEGER))?;
    if n <= 0 || (seconds && n > i64::MAX / 1000) {
        return Err(invalid_expire(cmd));
    }
    let ms = if seconds { n * 1000 } else { n };
    let at = if relative {
        ms.checked_add(now_ms() as i64)
    } else {
        Some(ms)
    };
    match at {
        Some(t) if t > 0 => Ok(Expiry::At(t as u64)),
        _ => Err(invalid_expire(cmd)),
    }
}

fn pairs(rest: Vec<Bytes>, cmd: &str) -> ParseResult<Vec<(Bytes, Bytes)>> {
    if !rest.len().is_multiple_of(2) {
        return Err(Reply::error(format!(
            "ERR wrong number of arguments for '{cmd}' command"
        )));
    }
    Ok(rest.chunks(2).map(|p| (p[0].clone(), p[1].clone())).collect())
}

impl DataCommand {
    /// Names of the commands parsed here.
    pub const NAMES: &'static [&'static str] = &[
        "get",
        "set",
        "setnx",
        "setex",
        "psetex",
        "getset",
        "getdel",
        "getex",
        "mget",
        "mset",
        "msetnx",
        "strlen",
        "getrange",
        "setrange",
        "append",
        "incr",
        "decr",
        "incrby",
        "decrby",
        "incrbyfloat",
        "del",
        "unlink",
        "exists",
        "touch",
        "type",
        "rename",
        "renamenx",
        "copy",
        "ttl",
        "pttl",
        "expiretime",
        "pexpiretime",
        "expire",
        "pexpire",
        "expireat",
        "pexpireat",
        "persist",
        "keys",
        "scan",
        "randomkey",
        "dbsize",
        "flushdb",
        "flushall",
        "memory|usage",
    ];

    /// For keyspace notifications: whether the command sets an expiry (SET
    /// EX..., GETEX EX...) and whether it removes one (GETEX PERSIST).
    pub fn expiry_options(&self) -> (bool, bool) {
        match self {
            DataCommand::Set { expiry, .. } => (matches!(expiry, Expiry::At(_)), false),
            DataCommand::GetEx(_, e) => (matches!(e, Expiry::At(_)), *e == Expiry::Clear),
            _ => (false, false),
        }
    }

    /// Parses a data command, or returns `None` if `name` is not one.
    pub fn parse(name: &str, args: &[Bytes]) -> Option<ParseResult<DataCommand>> {
        Self::parse_named(name, &mut Args::new(args, 1)).transpose()
    }

    fn parse_named(name: &str, a: &mut Args) -> ParseResult<Option<DataCommand>> {
        use DataCommand::*;
        Ok(Some(match name {
            "get" => Get(a.bytes()?),
            "set" => Self::parse_set(a)?,
            "setnx" => SetNx(a.bytes()?, a.bytes()?),
            "setex" | "psetex" => {
                let key = a.bytes()?;
                let expiry = expire_at(name, &a.bytes()?, name == "setex", true)?;
                Set {
                    key,
                    value: a.bytes()?,
                    cond: Condition::Always,
                    get: false,
                    expiry,
                }
            }
            "getset" => GetSet(a.bytes()?, a.bytes()?),
            "getdel" => GetDel(a.bytes()?),
            "getex" => Self::parse_getex(a)?,
            "mget" => MGet(a.rest()),
            "mset" => MSet(pairs(a.rest(), name)?),
            "msetnx" => MSetNx(pairs(a.rest(), name)?),
            "strlen" => Strlen(a.bytes()?),
            "getrange" => GetRange(a.bytes()?, a.i64()?, a.i64()?),
            "setrange" => SetRange(a.bytes()?, a.i64()?, a.bytes()?),
            "append" => Append(a.bytes()?, a.bytes()?),
            "incr" => IncrBy(a.bytes()?, 1),
            "decr" => IncrBy(a.bytes()?, -1),
            "incrby" => IncrBy(a.bytes()?, a.i64()?),
            "decrby" => {
                let key = a.bytes()?;
                let n = a.i64()?;
                if n == i64::MIN {
                    return Err(Reply::error("ERR decrement would overflow"));
                }
                IncrBy(key, -n)
            }
            "incrbyfloat" => {
                let key = a.bytes()?;
                let by =
                    parse_f64(&a.bytes()?).ok_or_else(|| Reply::error("ERR value is not a valid float"))?;
                IncrByFloat(key, by)
            }
            "del" | "unlink" => Del(a.rest()),
            "exists" | "touch" => Exists(a.rest()),
            "type" => Type(a.bytes()?),
            "rename" | "renamenx" => Rename {
                from: a.bytes()?,
                to: a.bytes()?,
                nx: name == "renamenx",
            },
            "copy" => Self::parse_copy(a)?,
            "ttl" | "pttl" | "expiretime" | "pexpiretime" => Ttl {
                key: a.bytes()?,
                millis: name.starts_with('p'),
                absolute: name.ends_with("time"),
            },
            "expire" | "pexpire" | "expireat" | "pexpireat" => Self::parse_expire(name, a)?,
            "persist" => Persist(a.bytes()?),
            "keys" => Keys(a.bytes()?),
            "scan" => Self::parse_scan(a)?,
            "randomkey" => RandomKey,
            "dbsize" => DbSize,
            "memory|usage" => {
                a.bytes()?; // USAGE
                let key = a.bytes()?;
                if !a.is_empty() {
                    let opt = a.bytes()?;
                    if !opt.eq_ignore_ascii_case(b"SAMPLES") || a.remaining() != 1 {
                        return Err(Reply::error("ERR syntax error"));
                    }
                    a.i64().map_err(|_| Reply::error(ERR_NOT_INTEGER))?;
                }
                MemoryUsage(key)
            }
            "flushdb" | "flushall" => {
                if let Some(mode) = a.peek() {
                    if a.remaining() > 1
                        || !(mode.eq_ignore_ascii_case(b"async") || mode.eq_ignore_ascii_case(b"sync"))
                    {
                        return Err(syntax());
                    }
                }
                Flush
            }
            _ => return Ok(None),
        }))
    }

    fn parse_set(a: &mut Args) -> ParseResult<DataCommand> {
        let key = a.bytes()?;
        let value = a.bytes()?;
        let (mut cond, mut get, mut keepttl) = (Condition::Always, false, false);
        // (raw value, in seconds, relative)
        let mut exp: Option<(Bytes, bool, bool)> = None;
        while !a.is_empty() {
            let opt = a.word()?;
            let has_next = a.remaining() > 0;
            match opt.as_str() {
                "NX" if cond != Condition::IfPresent => cond = Condition::IfAbsent,
                "XX" if cond != Condition::IfAbsent => cond = Condition::IfPresent,
                "GET" => get = true,
                "KEEPTTL" if exp.is_none() => keepttl = true,
                "EX" | "PX" | "EXAT" | "PXAT"
                    if !keepttl
                        && has_next
                        && exp
                            .as_ref()
                            .is_none_or(|(_, s, r)| (opt.starts_with('E'), opt.len() == 2) == (*s, *r)) =>
                {
                    exp = Some((a.bytes()?, opt.starts_with('E'), opt.len() == 2));
                }
                _ => return Err(syntax()),
            }
        }
        let expiry = match exp {
            Some((raw, seconds, relative)) => expire_at("set", &raw, seconds, relative)?,
            None if keepttl => Expiry::Keep,
            None => Expiry::Clear,
        };
        Ok(DataCommand::Set {
            key,
            value,
            cond,
            get,
            expiry,
        })
    }

    fn parse_getex(a: &mut Args) -> ParseResult<DataCommand> {
        let key = a.bytes()?;
        let mut expiry = Expiry::Keep;
        let mut persist = false;
        let mut exp: Option<(Bytes, bool, bool)> = None;
        while !a.is_empty() {
            let opt = a.word()?;
            let has_next = a.remaining() > 0;
            match opt.as_str() {
                "PERSIST" if exp.is_none() => persist = true,
                "EX" | "PX" | "EXAT" | "PXAT"
                    if !persist
                        && has_next
                        && exp
                            .as_ref()
                            .is_none_or(|(_, s, r)| (opt.starts_with('E'), opt.len() == 2) == (*s, *r)) =>
                {
                    exp = Some((a.bytes()?, opt.starts_with('E'), opt.len() == 2));
                }
                _ => return Err(syntax()),
            }
        }
        if let Some((raw, seconds, relative)) = exp {
            expiry = expire_at("getex", &raw, seconds, relative)?;
        } else if persist {
            expiry = Expiry::Clear;
        }
        Ok(DataCommand::GetEx(key, expiry))
    }

    fn parse_copy(a: &mut Args) -> ParseResult<DataCommand> {
        let (from, to) = (a.bytes()?, a.bytes()?);
        let mut replace = false;
        let mut db = None;
        while !a.is_empty() {
            match a.word()?.as_str() {
                "REPLACE" => replace = true,
                "DB" if a.remaining() > 0 => db = Some(super::across::int_arg(&a.bytes()?, None)?),
                _ => return Err(syntax()),
            }
        }
        Ok(DataCommand::Copy {
            from,
            to,
            replace,
            db,
        })
    }

    fn parse_expire(name: &str, a: &mut Args) -> ParseResult<DataCommand> {
        let key = a.bytes()?;
        let raw = a.bytes()?;
        let (mut nx, mut xx, mut gt, mut lt) = (false, false, false, false);
        while !a.is_empty() {
            let opt = a.bytes()?;
            match String::from_utf8_lossy(&opt).to_ascii_uppercase().as_str() {
                "NX" => nx = true,
                "XX" => xx = true,
                "GT" => gt = true,
                "LT" => lt = true,
                _ => return Err(super::error_quoting("ERR Unsupported option ", &opt, "")),
            }
        }
        if nx && (xx || gt || lt) {
            return Err(Reply::error(
                "ERR NX and XX, GT or LT options at the same time are not compatible",
            ));
        }
        if gt && lt {
            return Err(Reply::error(
                "ERR GT and LT options at the same time are not compatible",
            ));
        }
        let cond = ExpireCondition { nx, xx, gt, lt };
        let n = parse_i64(&raw).ok_or_else(|| Reply::error(ERR_NOT_INTEGER))?;
        let seconds = !name.starts_with('p');
        let relative = !name.ends_with("at");
        let mut ms = n;
        if seconds {
            ms = n.checked_mul(1000).ok_or_else(|| invalid_expire(name))?;
        }
        if relative {
            ms = ms
                .checked_add(now_ms() as i64)
                .ok_or_else(|| invalid_expire(name))?;
        }
        Ok(DataCommand::Expire { key, at: ms, cond })
    }

    fn parse_scan(a: &mut Args) -> ParseResult<DataCommand> {
        let raw = a.bytes()?;
        let cursor = parse_cursor(&raw).ok_or_else(|| Reply::error("ERR invalid cursor"))?;
        let (mut pattern, mut count, mut kind) = (None, 10usize, None);
        while !a.is_empty() {
            let opt = a.word()?;
            if a.is_empty() {
                return Err(syntax());
            }
            match opt.as_str() {
                "MATCH" => pattern = Some(a.bytes()?),
                "COUNT" => {
                    let n = a.i64()?;
                    if n < 1 {
                        return Err(syntax());
                    }
                    count = n as usize;
                }
                "TYPE" => kind = Some(a.bytes()?),
                _ => return Err(syntax()),
            }
        }
        Ok(DataCommand::Scan {
            cursor,
            pattern,
            count,
            kind,
        })
    }

    /// Whether this command must run with the database gate held exclusively
    /// (it writes several keys, or reads several that must be a snapshot).
    pub fn exclusive(&self) -> bool {
        use DataCommand::*;
        match self {
            MGet(keys) | Del(keys) | Exists(keys) => keys.len() > 1,
            MSet(_) | MSetNx(_) | Rename { .. } | Copy { .. } | Flush => true,
            _ => false,
        }
    }

    /// Runs the command. `max_len` is `proto-max-bulk-len`, the largest value
    /// APPEND and SETRANGE may create.
    pub fn apply(self, db: &Db, max_len: i64) -> Reply {
        self.run(db, max_len)
            .unwrap_or_else(|e| Reply::error(e.to_string()))
    }

    fn run(self, db: &Db, max_len: i64) -> Result<Reply, StoreError> {
        use DataCommand::*;
        Ok(match self {
            Get(key) => Reply::from_opt(db.lookup_read(&key)?.map(|e| e.value)),
            Set {
                key,
                value,
                cond,
                get,
                expiry,
            } => {
                let apply = |old: Option<&Entry>| {
                    let ok = match cond {
                        Condition::Always => true,
                        Condition::IfAbsent => old.is_none(),
                        Condition::IfPresent => old.is_some(),
                    };
                    let reply = if get {
                        Reply::from_opt(old.map(|e| e.value.clone()))
                    } else if ok {
                        Reply::OK
                    } else {
                        Reply::Nil
                    };
                    if !ok {
                        return (Update::Keep, reply);
                    }
                    let expires_at = resolve(expiry, old);
                    (
                        Update::Put(Entry {
                            value: value.clone(),
                            expires_at,
                        }),
                        reply,
                    )
                };
                // Only SET ... GET needs the old value itself.
                if get {
                    db.update(&key, apply)?
                } else {
                    db.update_blind(&key, apply)?
                }
            }
            SetNx(key, value) => db.update_blind(&key, |old| match old {
                Some(_) => (Update::Keep, Reply::Int(0)),
                None => (
                    Update::Put(Entry {
                        value: value.clone(),
                        expires_at: None,
                    }),
                    Reply::Int(1),
                ),
            })?,
            GetSet(key, value) => db.update(&key, |old| {
                let reply = Reply::from_opt(old.map(|e| e.value.clone()));
                (
                    Update::Put(Entry {
                        value: value.clone(),
                        expires_at: None,
                    }),
                    reply,
                )
            })?,
            GetDel(key) => db.update(&key, |old| match old {
                Some(e) => (Update::Remove, Reply::Bulk(e.value.clone())),
                None => (Update::Keep, Reply::Nil),
            })?,
            GetEx(key, expiry) => db.update(&key, |old| match old {
                None => (Update::Keep, Reply::Nil),
                Some(e) if expiry == Expiry::Keep => (Update::Keep, Reply::Bulk(e.value.clone())),
                // PERSIST of a key without a TTL changes nothing: no write, no
                // `persist` notification, no touched WATCH (as Redis).
                Some(e) if expiry == Expiry::Clear && e.expires_at.is_none() => {
                    (Update::Keep, Reply::Bulk(e.value.clone()))
                }
                Some(e) => {
                    let expires_at = resolve(expiry, old);
                    let update = if expires_at.is_some_and(|t| t <= now_ms()) {
                        Update::Remove
                    } else {
                        Update::Put(Entry {
                            value: e.value.clone(),
                            expires_at,
                        })
                    };
                    (update, Reply::Bulk(e.value.clone()))
                }
            })?,
            MGet(keys) => {
                let mut values = Vec::with_capacity(keys.len());
                for k in &keys {
                    values.push(Reply::from_opt(db.lookup_read(k)?.map(|e| e.value)));
                }
                Reply::Array(values)
            }
            MSet(pairs) => {
                for (k, v) in pairs {
                    db.set(&k, v, None)?;
                }
                Reply::OK
            }
            MSetNx(pairs) => {
                if pairs.iter().any(|(k, _)| db.exists(k)) {
                    return Ok(Reply::Int(0));
                }
                for (k, v) in pairs {
                    db.set(&k, v, None)?;
                }
                Reply::Int(1)
            }
            Strlen(key) => Reply::Int(db.get(&key)?.map_or(0, |e| e.value.len() as i64)),
            GetRange(key, start, end) => {
                let value = db.lookup_read(&key)?.map(|e| e.value).unwrap_or_default();
                Reply::Bulk(substr(&value, start, end))
            }
            SetRange(key, offset, value) => {
                if offset < 0 {
                    return Ok(Reply::error("ERR offset is out of range"));
                }
                db.update(&key, |old| {
                    let cur = old.map(|e| e.value.clone()).unwrap_or_default();
                    if value.is_empty() {
                        return (Update::Keep, Reply::Int(cur.len() as i64));
                    }
                    let end = offset as u64 + value.len() as u64;
                    if end > max_len as u64 {
                        return (Update::Keep, too_big());
                    }
                    let mut buf = BytesMut::from(&cur[..]);
                    if buf.len() < end as usize {
                        buf.resize(end as usize, 0);
                    }
                    buf[offset as usize..end as usize].copy_from_slice(&value);
                    let len = buf.len() as i64;
                    let expires_at = old.and_then(|e| e.expires_at);
                    (
                        Update::Put(Entry {
                            value: buf.freeze(),
                            expires_at,
                        }),
                        Reply::Int(len),
                    )
                })?
            }
            Append(key, value) => db.update(&key, |old| {
                let cur = old.map(|e| e.value.clone()).unwrap_or_default();
                if cur.len() as u64 + value.len() as u64 > max_len as u64 {
                    return (Update::Keep, too_big());
                }
                let mut buf = BytesMut::with_capacity(cur.len() + value.len());
                buf.extend_from_slice(&cur);
                buf.extend_from_slice(&value);
                let len = buf.len() as i64;
                let expires_at = old.and_then(|e| e.expires_at);
                (
                    Update::Put(Entry {
                        value: buf.freeze(),
                        expires_at,
                    }),
                    Reply::Int(len),
                )
            })?,
            IncrBy(key, by) => db.update(&key, |old| {
                let cur = match old {
                    None => 0,
                    Some(e) => match parse_i64(&e.value) {
                        Some(n) => n,
                        None => return (Update::Keep, Reply::error(ERR_NOT_INTEGER)),
                    },
                };
                let Some(new) = cur.checked_add(by) else {
                    return (
                        Update::Keep,
                        Reply::error("ERR increment or decrement would overflow"),
                    );
                };
                let value = Bytes::from(new.to_string());
                let expires_at = old.and_then(|e| e.expires_at);
                (Update::Put(Entry { value, expires_at }), Reply::Int(new))
            })?,
            IncrByFloat(key, by) => db.update(&key, |old| {
                let cur = match old {
                    None => 0.0,
                    Some(e) => match parse_f64(&e.value) {
                        Some(n) => n,
                        None => return (Update::Keep, Reply::error("ERR value is not a valid float")),
                    },
                };
                let new = cur + by;
                if !new.is_finite() {
                    return (
                        Update::Keep,
                        Reply::error("ERR increment would produce NaN or Infinity"),
                    );
                }
                let value = Bytes::from(format_human(new));
                let expires_at = old.and_then(|e| e.expires_at);
                (
                    Update::Put(Entry {
                        value: value.clone(),
                        expires_at,
                    }),
                    Reply::Bulk(value),
                )
            })?,
            Del(keys) => {
                let mut n = 0;
                for k in &keys {
                    n += db.remove(k)? as i64;
                }
                Reply::Int(n)
            }
            Exists(keys) => Reply::Int(keys.iter().filter(|k| db.exists(k)).count() as i64),
            Type(key) => Reply::Simple(if db.exists(&key) { "string" } else { "none" }),
            Rename { from, to, nx } => {
                let Some(entry) = db.get(&from)? else {
                    return Ok(Reply::error("ERR no such key"));
                };
                if from == to {
                    return Ok(if nx { Reply::Int(0) } else { Reply::OK });
                }
                if nx && db.exists(&to) {
                    return Ok(Reply::Int(0));
                }
                db.update_blind(&to, |_| (Update::Put(entry.clone()), ()))?;
                db.remove(&from)?;
                if nx {
                    Reply::Int(1)
                } else {
                    Reply::OK
                }
            }
            Copy {
                from, to, replace, ..
            } => {
                if from == to {
                    return Ok(Reply::error("ERR source and destination objects are the same"));
                }
                let Some(entry) = db.get(&from)? else {
                    return Ok(Reply::Int(0));
                };
                if !replace && db.exists(&to) {
                    return Ok(Reply::Int(0));
                }
                db.update_blind(&to, |_| (Update::Put(entry.clone()), ()))?;
                Reply::Int(1)
            }
            Ttl {
                key,
                millis,
                absolute,
            } => match db.expiry(&key) {
                None => Reply::Int(-2),
                Some(None) => Reply::Int(-1),
                Some(Some(t)) => {
                    let t = if absolute { t } else { t.saturating_sub(now_ms()) };
                    Reply::Int(if millis {
                        t
                    } else {
                        (t + if absolute { 0 } else { 500 }) / 1000
                    } as i64)
                }
            },
            Expire { key, at, cond } => db.update(&key, |old| {
                let Some(e) = old else {
                    return (Update::Keep, Reply::Int(0));
                };
                let current = e.expires_at.map(|t| t as i64);
                if !cond.allows(current, at) {
                    return (Update::Keep, Reply::Int(0));
                }
                if at <= now_ms() as i64 {
                    return (Update::Remove, Reply::Int(1));
                }
                let entry = Entry {
                    value: e.value.clone(),
                    expires_at: Some(at as u64),
                };
                (Update::Put(entry), Reply::Int(1))
            })?,
            Persist(key) => db.update(&key, |old| match old {
                Some(e) if e.expires_at.is_some() => {
                    let entry = Entry {
                        value: e.value.clone(),
                        expires_at: None,
                    };
                    (Update::Put(entry), Reply::Int(1))
                }
                _ => (Update::Keep, Reply::Int(0)),
            })?,
            Keys(pattern) => {
                let now = now_ms();
                let all_keys = pattern.as_ref() == b"*";
                let mut out = Vec::new();
                let mut cursor = 0;
                loop {
                    let mut batch = Vec::new();
                    cursor = db.store().scan(cursor, 1024, &mut batch);
                    out.extend(
                        batch
                            .into_iter()
                            .filter(|(k, e)| {
                                e.expires_at.is_none_or(|t| t > now)
                                    && (all_keys || glob::matches(&pattern, k, false))
                            })
                            .map(|(k, _)| Reply::Bulk(k)),
                    );
                    if cursor == 0 {
                        break;
                    }
                }
                Reply::Array(out)
            }
            Scan {
                cursor,
                pattern,
                count,
                kind,
            } => {
                let now = now_ms();
                let mut batch = Vec::new();
                let next = db.store().scan(cursor, count, &mut batch);
                let type_ok = kind.as_ref().is_none_or(|t| t.eq_ignore_ascii_case(b"string"));
                let keys = batch
                    .into_iter()
                    .filter(|(k, e)| {
                        type_ok
                            && e.expires_at.is_none_or(|t| t > now)
                            && pattern.as_ref().is_none_or(|p| glob::matches(p, k, false))
                    })
                    .map(|(k, _)| Reply::Bulk(k))
                    .collect();
                Reply::Array(vec![
                    Reply::Bulk(Bytes::from(next.to_string())),
                    Reply::Array(keys),
                ])
            }
            RandomKey => {
                // A sampled key may have expired; try a few before giving up, as
                // Redis does.
                for _ in 0..100 {
                    match db.store().random_key() {
                        None => return Ok(Reply::Nil),
                        Some(k) if db.exists(&k) => return Ok(Reply::Bulk(k)),
                        Some(_) => {}
                    }
                }
                Reply::Nil
            }
            DbSize => Reply::Int(db.len() as i64),
            MemoryUsage(key) => match db.lookup_read(&key)? {
                // Redis counts the key, the value and its allocations'
                // headers; kvd's value lives on disk, so this is the key and
                // value bytes and Redis's usual per-key overhead (56 bytes
                // for a short string), enough for `redis-cli --memkeys`.
                Some(e) => Reply::Int((key.len() + e.value.len() + 56) as i64),
                None => Reply::Nil,
            },
            Flush => {
                db.flush()?;
                Reply::OK
            }
        })
    }
}

/// A SCAN cursor as Redis reads it (`strtoul`): optional sign, digits, no
/// overflow; a negative number wraps around as in C.
fn parse_cursor(raw: &[u8]) -> Option<u64> {
    let s = std::str::from_utf8(raw).ok()?;
    let (neg, digits) = match s.as_bytes().first()? {
        b'-' => (true, &s[1..]),
        b'+' => (false, &s[1..]),
        _ => (false, s),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(if neg { n.wrapping_neg() } else { n })
}

fn too_big() -> Reply {
    Reply::error("ERR string exceeds maximum allowed size (proto-max-bulk-len)")
}

/// The expiry a write leaves on the key.
fn resolve(expiry: Expiry, old: Option<&Entry>) -> Option<u64> {
    match expiry {
        Expiry::Clear => None,
        Expiry::Keep => old.and_then(|e| e.expires_at),
        Expiry::At(t) => Some(t),
    }
}

/// GETRANGE's index rules (Redis 7.0 `getrangeCommand`).
fn substr(value: &Bytes, mut start: i64, mut end: i64) -> Bytes {
    let len = value.len() as i64;
    if start < 0 && end < 0 && start > end {
        return Bytes::new();
    }
    if start < 0 {
        start += len;
    }
    if end < 0 {
        end += len;
    }
    start = start.max(0);
    end = end.max(0);
    if end >= len {
        end = len - 1;
    }
    if start > end || len == 0 {
        return Bytes::new();
    }
    value.slice(start as usize..=end as usize)
}

#[cfg(test)]
mod tests {
    #[test]
    fn expire_options_are_each_checked() {
        use super::ExpireCondition as C;
        let xx_lt = C {
            xx: true,
            lt: true,
            ..C::default()
        };
        assert!(
            !xx_lt.allows(None, 200),
            "XX refuses a key without a TTL whatever LT says"
        );
        assert!(xx_lt.allows(Some(300), 200));
        assert!(!xx_lt.allows(Some(100), 200));
        let xx_gt = C {
            xx: true,
            gt: true,
            ..C::default()
        };
        assert!(!xx_gt.allows(None, 200));
        assert!(xx_gt.allows(Some(100), 200));
        assert!(
            C {
                lt: true,
                ..C::default()
            }
            .allows(None, 200),
            "LT: no TTL is infinite"
        );
        assert!(
            !C {
                gt: true,
                ..C::default()
            }
            .allows(None, 200),
            "GT: no TTL is infinite"
        );
        assert!(C::default().allows(Some(1), 0));
    }

    use super::*;

    #[test]
    fn substr_follows_redis() {
        let v = Bytes::from_static(b"This is a string");
        assert_eq!(substr(&v, 0, 3), "This");
        assert_eq!(substr(&v, -3, -1), "ing");
        assert_eq!(substr(&v, 0, -1), v);
        assert_eq!(substr(&v, 10, 100), "string");
        assert_eq!(substr(&v, 5, 3), "");
    }
}
