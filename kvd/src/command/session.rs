//! Commands about the connection and the server rather than the keyspace:
//! handshake and auth, transactions, pub/sub, client management, introspection.

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use super::args::{syntax, Args, ParseResult};
use super::spec::{self, Spec, COMMANDS};
use super::{info, run};
use crate::glob;
use crate::reply::{Protocol, Reply};
use crate::session::Session;
use crate::shared::{Shared, REDIS_VERSION};

/// A parsed non-keyspace command.
#[derive(Debug)]
pub enum SessionCommand {
    Ping(Option<Bytes>),
    Echo(Bytes),
    Auth {
        user: Option<Bytes>,
        pass: Bytes,
    },
    Hello {
        proto: Option<i64>,
        auth: Option<(Bytes, Bytes)>,
        name: Option<Bytes>,
    },
    Select(i64),
    Quit,
    Reset,
    Multi,
    Exec,
    Discard,
    Watch(Vec<Bytes>),
    Unwatch,
    Publish(Bytes, Bytes),
    Subscribe(Vec<Bytes>),
    Unsubscribe(Vec<Bytes>),
    PSubscribe(Vec<Bytes>),
    PUnsubscribe(Vec<Bytes>),
    PubsubChannels(Option<Bytes>),
    PubsubNumsub(Vec<Bytes>),
    PubsubNumpat,
    ClientId,
    ClientSetName(Bytes),
    ClientGetName,
    ClientList {
        kind: Option<String>,
        ids: Vec<u64>,
    },
    ClientInfo,
    ClientReply(crate::session::ReplyMode),
    Monitor,
    ClientSetInfo(String, Bytes),
    ClientKill(KillFilter),
    Info(Vec<String>),
    Time,
    /// Compacts the log in the background (Redis rewrites its AOF).
    BgRewriteAof,
    Shutdown {
        abort: bool,
    },
    ConfigGet(Vec<Bytes>),
    ConfigSet(Vec<(String, String)>),
    ConfigResetStat,
    CommandAll,
    CommandCount,
    CommandInfo(Vec<Bytes>),
    CommandDocs(Vec<Bytes>),
    CommandList(Option<(String, Bytes)>),
    CommandGetKeys(Vec<Bytes>),
    Help(&'static str),
}

/// Which clients CLIENT KILL disconnects.
#[derive(Debug, Default)]
pub struct KillFilter {
    /// The old `CLIENT KILL ip:port` form, which answers OK or an error.
    legacy: bool,
    id: Option<u64>,
    addr: Option<String>,
    laddr: Option<String>,
    kind: Option<String>,
    skipme: bool,
}

fn client_name_ok(name: &[u8]) -> bool {
    name.iter().all(|&c| (b'!'..=b'~').contains(&c))
}

impl SessionCommand {
    pub fn parse(spec: &Spec, args: &[Bytes]) -> ParseResult<SessionCommand> {
        use SessionCommand::*;
        let skip = if spec.name.contains('|') { 2 } else { 1 };
        let mut a = Args::new(args, skip);
        Ok(match spec.name {
            "ping" => {
                if a.remaining() > 1 {
                    return Err(Reply::error("ERR wrong number of arguments for 'ping' command"));
                }
                Ping(a.peek().cloned())
            }
            "echo" => Echo(a.bytes()?),
            "auth" => match a.remaining() {
                1 => Auth {
                    user: None,
                    pass: a.bytes()?,
                },
                2 => Auth {
                    user: Some(a.bytes()?),
                    pass: a.bytes()?,
                },
                _ => return Err(syntax()),
            },
            "hello" => {
                let mut proto = None;
                let (mut auth, mut name) = (None, None);
                if !a.is_empty() {
                    proto = Some(a.i64().map_err(|_| {
                        Reply::error("ERR Protocol version is not an integer or out of range")
                    })?);
                }
                while !a.is_empty() {
                    let raw = a.bytes()?;
                    let opt = String::from_utf8_lossy(&raw).to_ascii_uppercase();
                    match opt.as_str() {
                        "AUTH" if a.remaining() >= 2 => auth = Some((a.bytes()?, a.bytes()?)),
                        "SETNAME" if a.remaining() >= 1 => name = Some(a.bytes()?),
                        _ => {
                            return Err(super::error_quoting(
                                "ERR Syntax error in HELLO option '",
                                &raw,
                                "'",
                            ))
                        }
                    }
                }
                Hello { proto, auth, name }
            }
            "select" => Select(a.i64()?),
            "quit" => Quit,
            "reset" => Reset,
            "multi" => Multi,
            "exec" => Exec,
            "discard" => Discard,
            "watch" => Watch(a.rest()),
            "unwatch" => Unwatch,
            "publish" => Publish(a.bytes()?, a.bytes()?),
            "subscribe" => Subscribe(a.rest()),
            "unsubscribe" => Unsubscribe(a.rest()),
            "psubscribe" => PSubscribe(a.rest()),
            "punsubscribe" => PUnsubscribe(a.rest()),
            "pubsub|channels" => {
                if a.remaining() > 1 {
                    return Err(Reply::error(
                        "ERR unknown subcommand or wrong number of arguments for 'CHANNELS'. Try PUBSUB HELP.",
                    ));
                }
                PubsubChannels(a.peek().cloned())
            }
            "pubsub|numsub" => PubsubNumsub(a.rest()),
            "pubsub|numpat" => PubsubNumpat,
            "client|id" => ClientId,
            "client|setname" => ClientSetName(a.bytes()?),
            "client|getname" => ClientGetName,
            "client|info" => ClientInfo,
            "monitor" => Monitor,
            "client|reply" => ClientReply(match a.word()?.as_str() {
                "ON" => crate::session::ReplyMode::On,
                "OFF" => crate::session::ReplyMode::Off,
                "SKIP" => crate::session::ReplyMode::SkipArmed,
                _ => return Err(Reply::error("ERR syntax error")),
            }),
            "client|list" => {
                let (mut kind, mut ids) = (None, Vec::new());
                while !a.is_empty() {
                    match a.word()?.as_str() {
                        "TYPE" if a.remaining() == 1 => {
                            let t = a.word()?.to_ascii_lowercase();
                            if !["normal", "master", "replica", "slave", "pubsub"].contains(&t.as_str()) {
                                return Err(Reply::error(format!("ERR Unknown client type '{t}'")));
                            }
                            kind = Some(t);
                        }
                        "ID" if a.remaining() >= 1 => {
                            while !a.is_empty() {
                                // Ids that cannot exist (0, negative) just match nothing.
                                let id = a.i64().map_err(|_| Reply::error("ERR Invalid client ID"))?;
                                ids.push(id.max(0) as u64);
                            }
                        }
                        _ => return Err(syntax()),
                    }
                }
                ClientList { kind, ids }
            }
            "client|setinfo" => {
                let attr = a.word()?;
                let value = a.bytes()?;
                if attr != "LIB-NAME" && attr != "LIB-VER" {
                    return Err(super::error_quoting("ERR Unrecognized option '", &args[2], "'"));
                }
                if !client_name_ok(&value) {
                    return Err(Reply::error(format!(
                        "ERR {} cannot contain spaces, newlines or special characters.",
                        attr
                    )));
                }
                ClientSetInfo(attr, value)
            }
            "client|kill" => {
                let mut f = KillFilter {
                    skipme: true,
                    ..Default::default()
                };
                if a.remaining() == 1 {
                    f.legacy = true;
                    f.skipme = false;
                    f.addr = Some(String::from_utf8_lossy(&a.bytes()?).into_owned());
                } else {
                    while !a.is_empty() {
                        let opt = a.word()?;
                        if a.is_empty() {
                            return Err(syntax());
                        }
                        let val = String::from_utf8_lossy(&a.bytes()?).into_owned();
                        match opt.as_str() {
                            "ID" => {
                                f.id =
                                    Some(val.parse().ok().filter(|&n: &u64| n > 0).ok_or_else(|| {
                                        Reply::error("ERR client-id should be greater than 0")
                                    })?)
                            }
                            "ADDR" => f.addr = Some(val),
                            "LADDR" => f.laddr = Some(val),
                            "TYPE" => f.kind = Some(val.to_ascii_lowercase()),
                            "USER" => {
                                if val != "default" {
                                    return Err(Reply::error(format!("ERR No such user '{val}'")));
                                }
                            }
                            "SKIPME" => {
                                f.skipme = match val.to_ascii_lowercase().as_str() {
                                    "yes" => true,
                                    "no" => false,
                                    _ => return Err(syntax()),
                                }
                            }
                            _ => return Err(syntax()),
                        }
                    }
                }
                ClientKill(f)
            }
            "client|help" => Help("client"),
            "memory|help" => Help("memory"),
            "info" => Info(
                a.rest()
                    .iter()
                    .map(|s| String::from_utf8_lossy(s).to_ascii_lowercase())
                    .collect(),
            ),
            "time" => Time,
            "bgrewriteaof" => BgRewriteAof,
            "shutdown" => {
                let mut abort = false;
                while !a.is_empty() {
                    match a.word()?.as_str() {
                        "NOSAVE" | "SAVE" | "NOW" | "FORCE" => {}
                        "ABORT" => abort = true,
                        _ => return Err(syntax()),
                    }
                }
                Shutdown { abort }
            }
            "config|get" => ConfigGet(a.rest()),
            "config|set" => {
                let rest = a.rest();
                if !rest.len().is_multiple_of(2) {
                    return Err(Reply::error(
                        "ERR wrong number of arguments for 'config|set' command",
                    ));
                }
                ConfigSet(
                    rest.chunks(2)
                        .map(|p| {
                            (
                                String::from_utf8_lossy(&p[0]).to_ascii_lowercase(),
                                String::from_utf8_lossy(&p[1]).into_owned(),
                            )
                        })
                        .collect(),
                )
            }
            "config|resetstat" => ConfigResetStat,
            "config|help" => Help("config"),
            "command" => CommandAll,
            "command|count" => CommandCount,
            "command|info" => CommandInfo(a.rest()),
            "command|docs" => CommandDocs(a.rest()),
            "command|list" => {
                if a.is_empty() {
                    CommandList(None)
                } else {
                    if a.remaining() != 3 || !a.word()?.eq("FILTERBY") {
                        return Err(syntax());
                    }
                    let kind = a.word()?;
                    if !["MODULE", "ACLCAT", "PATTERN"].contains(&kind.as_str()) {
                        return Err(syntax());
                    }
                    CommandList(Some((kind, a.bytes()?)))
                }
            }
            "command|getkeys" => CommandGetKeys(a.rest()),
            "command|help" => Help("command"),
            // A cluster node answers these before they get here (crate::replica::dispatch).
            n if n.starts_with("cluster|") || matches!(n, "readonly" | "readwrite" | "asking") => {
                return Err(Reply::error("ERR This instance has cluster support disabled"))
            }
            other => return Err(Reply::error(format!("ERR unknown command '{other}'"))),
        })
    }

    pub fn apply(self, shared: &Shared, s: &mut Session, in_exec: bool) -> Reply {
        use SessionCommand::*;
        match self {
            Ping(msg) => {
                if s.in_resp2_subscribed_mode() {
                    return Reply::Array(vec![
                        Reply::bulk_str("pong"),
                        Reply::Bulk(msg.unwrap_or_default()),
                    ]);
                }
                msg.map_or(Reply::Simple("PONG"), Reply::Bulk)
            }
            Echo(msg) => Reply::Bulk(msg),
            Auth { user, pass } => {
                let required = shared.config.read().requirepass.clone();
                match (required, &user) {
                    (None, None) => Reply::error(
                        "ERR AUTH <password> called without any password configured for the default user. \
                         Are you sure your configuration is correct?",
                    ),
                    (required, _) => {
                        if check_password(required.as_deref(), user.as_deref(), &pass) {
                            s.set_authenticated(true);
                            Reply::OK
                        } else {
                            Reply::error("WRONGPASS invalid username-password pair or user is disabled.")
                        }
                    }
                }
            }
            Hello { proto, auth, name } => {
                let version = match proto {
                    None => None,
                    Some(2) => Some(Protocol::Resp2),
                    Some(3) => Some(Protocol::Resp3),
                    Some(_) => return Reply::error("NOPROTO unsupported protocol version"),
                };
                if let Some((user, pass)) = auth {
                    let required = shared.config.read().requirepass.clone();
                    if !check_password(required.as_deref(), Some(&user), &pass) {
                        return Reply::error("WRONGPASS invalid username-password pair or user is disabled.");
                    }
                    s.set_authenticated(true);
                }
                if !s.authenticated {
                    return Reply::error(
                        "NOAUTH HELLO must be called with the client already authenticated, otherwise the HELLO AUTH <user> <pass> \
                         option can be used to authenticate the client and select the RESP protocol version at the \
                         same time",
                    );
                }
                if let Some(name) = name {
                    if !client_name_ok(&name) {
                        return Reply::error(
                            "ERR Client names cannot contain spaces, newlines or special characters.",
                        );
                    }
                    s.client.state.lock().name = String::from_utf8_lossy(&name).into_owned();
                }
                if let Some(v) = version {
                    s.set_protocol(v);
                }
                let proto_num = if s.proto == Protocol::Resp3 { 3 } else { 2 };
                Reply::Map(vec![
                    (Reply::bulk_str("server"), Reply::bulk_str("redis")),
                    (Reply::bulk_str("version"), Reply::bulk_str(REDIS_VERSION)),
                    (Reply::bulk_str("proto"), Reply::Int(proto_num)),
                    (Reply::bulk_str("id"), Reply::Int(s.client.id as i64)),
                    (Reply::bulk_str("mode"), Reply::bulk_str("standalone")),
                    (Reply::bulk_str("role"), Reply::bulk_str("master")),
                    (Reply::bulk_str("modules"), Reply::Array(vec![])),
                ])
            }
            Select(n) if n > i32::MAX as i64 || n < i32::MIN as i64 => {
                Reply::error("ERR value is out of range, value must between -2147483648 and 2147483647")
            }
            Select(n) => super::across::select(shared, s, n),
            Quit => {
                s.close = true;
                Reply::OK
            }
            Reset => {
                s.reset(shared);
                Reply::Simple("RESET")
            }
            Multi => {
                if s.multi.is_some() {
                    return Reply::error("ERR MULTI calls can not be nested");
                }
                s.begin_multi();
                Reply::OK
            }
            Discard => {
                if s.multi.is_none() {
                    return Reply::error("ERR DISCARD without MULTI");
                }
                s.end_multi();
                s.unwatch_all(shared);
                Reply::OK
            }
            Exec => exec(shared, s),
            Watch(keys) => {
                if s.multi.is_some() {
                    return Reply::error("ERR WATCH inside MULTI is not allowed");
                }
                s.watch(shared, keys);
                Reply::OK
            }
            Unwatch => {
                s.unwatch_all(shared);
                Reply::OK
            }
            Publish(channel, msg) => Reply::Int(shared.pubsub.publish(&channel, &msg) as i64),
            Subscribe(chs) => Reply::Many(chs.into_iter().map(|c| s.subscribe(shared, c, false)).collect()),
            PSubscribe(pats) => Reply::Many(pats.into_iter().map(|p| s.subscribe(shared, p, true)).collect()),
            Unsubscribe(chs) => s.unsubscribe(shared, chs, false),
            PUnsubscribe(pats) => s.unsubscribe(shared, pats, true),
            PubsubChannels(pattern) => Reply::Array(
                shared
                    .pubsub
                    .channels(pattern.as_deref())
                    .into_iter()
                    .map(Reply::Bulk)
                    .collect(),
            ),
            // A flat array even in RESP3, as Redis 7.0 sends it.
            PubsubNumsub(chs) => Reply::Array(
                chs.into_iter()
                    .flat_map(|c| {
                        let n = shared.pubsub.numsub(&c) as i64;
                        [Reply::Bulk(c), Reply::Int(n)]
                    })
                    .collect(),
            ),
            PubsubNumpat => Reply::Int(shared.pubsub.numpat() as i64),
            ClientId => Reply::Int(s.client.id as i64),
            ClientSetName(name) => {
                if !client_name_ok(&name) {
                    return Reply::error(
                        "ERR Client names cannot contain spaces, newlines or special characters.",
                    );
                }
                s.client.state.lock().name = String::from_utf8_lossy(&name).into_owned();
                Reply::OK
            }
            ClientGetName => {
                let name = s.client.state.lock().name.clone();
                if name.is_empty() {
                    Reply::Nil
                } else {
                    Reply::bulk(name)
                }
            }
            Monitor => {
                s.monitor(shared);
                Reply::OK
            }
            ClientReply(mode) => {
                s.reply_mode = mode;
                match mode {
                    crate::session::ReplyMode::On => Reply::OK,
                    // OFF and SKIP are not answered.
                    _ => Reply::Many(Vec::new()),
                }
            }
            ClientInfo => Reply::Verbatim("txt", Bytes::from(format!("{}\n", s.client.info_line()))),
            ClientList { kind, ids } => {
                let mut text = String::new();
                for c in shared.clients.all() {
                    if !ids.is_empty() && !ids.contains(&c.id) {
                        continue;
                    }
                    if kind.as_ref().is_some_and(|k| !c.is_kind(k)) {
                        continue;
                    }
                    text.push_str(&c.info_line());
                    text.push('\n');
                }
                Reply::Verbatim("txt", Bytes::from(text))
            }
            ClientSetInfo(attr, value) => {
                let value = String::from_utf8_lossy(&value).into_owned();
                let mut st = s.client.state.lock();
                if attr == "LIB-NAME" {
                    st.lib_name = value;
                } else {
                    st.lib_ver = value;
                }
                Reply::OK
            }
            ClientKill(f) => {
                let mut killed = 0;
                for c in shared.clients.all() {
                    if f.skipme && c.id == s.client.id {
                        continue;
                    }
                    let matches = f.id.is_none_or(|id| id == c.id)
                        && f.addr.as_ref().is_none_or(|a| *a == c.addr.to_string())
                        && f.laddr.as_ref().is_none_or(|a| *a == c.laddr.to_string())
                        && f.kind.as_ref().is_none_or(|k| c.is_kind(k));
                    if matches {
                        if c.id == s.client.id {
                            s.close = true;
                        } else {
                            c.kill.notify_one();
                        }
                        killed += 1;
                    }
                }
                if f.legacy {
                    if killed == 0 {
                        Reply::error("ERR No such client")
                    } else {
                        Reply::OK
                    }
                } else {
                    Reply::Int(killed)
                }
            }
            Info(sections) => Reply::Verbatim("txt", Bytes::from(info::render(shared, &sections))),
            Time => {
                let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
                Reply::Array(vec![
                    Reply::bulk(now.as_secs().to_string()),
                    Reply::bulk(now.subsec_micros().to_string()),
                ])
            }
            BgRewriteAof => {
                for (_, db) in shared.dbs.opened() {
                    if let Err(e) = db.store().compact() {
                        return Reply::error(e.to_string());
                    }
                }
                Reply::Simple("Background append only file rewriting started")
            }
            Shutdown { abort } => {
                if abort {
                    return Reply::error("ERR No shutdown in progress.");
                }
                if in_exec {
                    return Reply::error("ERR Command not allowed inside a transaction");
                }
                tracing::warn!("SHUTDOWN requested by client {}", s.client.id);
                shared.shutdown.cancel();
                s.close = true;
                // Redis closes the connection without a reply when it shuts down.
                Reply::Many(vec![])
            }
            ConfigGet(patterns) => {
                let config = shared.config.read();
                let mut pairs = Vec::new();
                for name in crate::config::NAMES {
                    if patterns.iter().any(|p| glob::matches(p, name.as_bytes(), true)) {
                        if let Some(v) = config.get(name) {
                            pairs.push((Reply::bulk_str(name), Reply::bulk(v)));
                        }
                    }
                }
                Reply::Map(pairs)
            }
            ConfigSet(pairs) => {
                let mut config = shared.config.read().clone();
                for (name, value) in &pairs {
                    if !crate::config::NAMES.contains(&name.as_str()) {
                        return Reply::error(format!(
                            "ERR Unknown option or number of arguments for CONFIG SET - '{name}'"
                        ));
                    }
                    if let Err(e) = config.set(name, value, true) {
                        return Reply::error(format!(
                            "ERR CONFIG SET failed (possibly related to argument '{name}') - {e}"
                        ));
                    }
                }
                for (name, _) in &pairs {
                    for (_, db) in shared.dbs.opened() {
                        if let Err(e) = db.store().configure(name, &config) {
                            return Reply::error(format!(
                                "ERR CONFIG SET failed (possibly related to argument '{name}') - {e}"
                            ));
                        }
                    }
                }
                shared
                    .stats
                    .latency_tracking
                    .store(config.latency_tracking, std::sync::atomic::Ordering::Relaxed);
                // This connection's own copies take effect at once (others'
                // at their next read).
                s.max_bulk_len = config.proto_max_bulk_len;
                s.notify_keyspace_events = config.notify_keyspace_events;
                *shared.config.write() = config;
                Reply::OK
            }
            ConfigResetStat => {
                shared.stats.reset();
                Reply::OK
            }
            CommandAll => Reply::Array(COMMANDS.iter().map(|c| command_info(c, s.proto)).collect()),
            CommandCount => Reply::Int(COMMANDS.len() as i64),
            CommandInfo(names) => {
                if names.is_empty() {
                    return Reply::Array(COMMANDS.iter().map(|c| command_info(c, s.proto)).collect());
                }
                Reply::Array(
                    names
                        .iter()
                        .map(
                            |n| match spec::find(&String::from_utf8_lossy(n).to_ascii_lowercase()) {
                                Some(c) => command_info(c, s.proto),
                                None => Reply::NilArray,
                            },
                        )
                        .collect(),
                )
            }
            CommandDocs(names) => {
                let specs: Vec<&Spec> = if names.is_empty() {
                    COMMANDS.iter().collect()
                } else {
                    names
                        .iter()
                        .filter_map(|n| spec::find(&String::from_utf8_lossy(n).to_ascii_lowercase()))
                        .collect()
                };
                Reply::Map(
                    specs
                        .into_iter()
                        .map(|c| (Reply::bulk_str(c.name), command_docs(c)))
                        .collect(),
                )
            }
            CommandList(filter) => {
                let mut names = Vec::new();
                for c in COMMANDS {
                    for spec in std::iter::once(c).chain(c.subcommands.iter()) {
                        let keep = match &filter {
                            None => true,
                            Some((kind, arg)) => match kind.as_str() {
                                "MODULE" => false,
                                "ACLCAT" => {
                                    let cat =
                                        format!("@{}", String::from_utf8_lossy(arg).to_ascii_lowercase());
                                    spec.acl_categories().contains(&cat.as_str())
                                }
                                _ => glob::matches(arg, spec.name.as_bytes(), true),
                            },
                        };
                        if keep {
                            names.push(Reply::bulk_str(spec.name));
                        }
                    }
                }
                Reply::Array(names)
            }
            CommandGetKeys(cmd) => {
                let Some(target) = (match spec::lookup(&cmd) {
                    spec::Lookup::Found(t) => Some(t),
                    _ => None,
                }) else {
                    return Reply::error("ERR Invalid command specified");
                };
                if target.first_key <= 0 {
                    return Reply::error("ERR The command has no key arguments");
                }
                if !target.arity_ok(cmd.len()) {
                    return Reply::error("ERR Invalid number of arguments specified for command");
                }
                let keys = target.key_positions(cmd.len());
                Reply::Array(keys.into_iter().map(|i| Reply::Bulk(cmd[i].clone())).collect())
            }
            Help(container) => help(container),
        }
    }
}

/// Checks a password against `requirepass`. The only user is `default`; with no
/// password configured it accepts any password, as Redis's `nopass` user does.
fn check_password(required: Option<&str>, user: Option<&[u8]>, pass: &[u8]) -> bool {
    if user.is_some_and(|u| u != b"default") {
        return false;
    }
    match required {
        None => true,
        Some(p) => constant_time_eq(p.as_bytes(), pass),
    }
}

/// Compares without an early exit, so response time does not reveal how much of a
/// guessed password was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        diff |= (a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(1)) as usize;
    }
    diff == 0
}

/// Runs the queued commands of a transaction with the gate held exclusively.
fn exec(shared: &Shared, s: &mut Session) -> Reply {
    let Some(multi) = s.end_multi() else {
        return Reply::error("ERR EXEC without MULTI");
    };
    if multi.failed {
        s.unwatch_all(shared);
        return Reply::error("EXECABORT Transaction discarded because of previous errors.");
    }
    let _gate = shared.dbs.exclusive();
    if s.watch_broken(shared) {
        s.unwatch_all(shared);
        return Reply::NilArray;
    }
    let mut replies = Vec::with_capacity(multi.queue.len());
    for args in multi.queue {
        let reply = match spec::lookup(&args) {
            spec::Lookup::Found(spec) => run(shared, s, spec, &args, true),
            _ => Reply::error("ERR unknown command"),
        };
        replies.push(reply);
    }
    s.unwatch_all(shared);
    Reply::Array(replies)
}

/// One entry of COMMAND / COMMAND INFO, in Redis 7's ten-field layout.
fn command_info(c: &Spec, proto: Protocol) -> Reply {
    let status = |s: &str| Reply::Status(s.to_string());
    let key_specs = if c.first_key > 0 {
        let flags: Vec<Reply> = if c.flags.contains(&"write") {
            vec![status("RW"), status("UPDATE")]
        } else {
            vec![status("RO"), status("ACCESS")]
        };
        let lastkey = if c.last_key < 0 {
            c.last_key as i64
        } else {
            (c.last_key - c.first_key) as i64
        };
        vec![Reply::Map(vec![
            (Reply::bulk_str("flags"), Reply::Set(flags)),
            (
                Reply::bulk_str("begin_search"),
                Reply::Map(vec![
                    (Reply::bulk_str("type"), Reply::bulk_str("index")),
                    (
                        Reply::bulk_str("spec"),
                        Reply::Map(vec![(Reply::bulk_str("index"), Reply::Int(c.first_key as i64))]),
                    ),
                ]),
            ),
            (
                Reply::bulk_str("find_keys"),
                Reply::Map(vec![
                    (Reply::bulk_str("type"), Reply::bulk_str("range")),
                    (
                        Reply::bulk_str("spec"),
                        Reply::Map(vec![
                            (Reply::bulk_str("lastkey"), Reply::Int(lastkey)),
                            (Reply::bulk_str("keystep"), Reply::Int(c.step as i64)),
                            (Reply::bulk_str("limit"), Reply::Int(0)),
                        ]),
                    ),
                ]),
            ),
        ])]
    } else {
        vec![]
    };
    let _ = proto;
    Reply::Array(vec![
        Reply::bulk_str(c.name),
        Reply::Int(c.arity as i64),
        Reply::Set(c.flags.iter().map(|f| status(f)).collect()),
        Reply::Int(c.first_key as i64),
        Reply::Int(c.last_key as i64),
        Reply::Int(c.step as i64),
        Reply::Set(c.acl_categories().into_iter().map(status).collect()),
        Reply::Set(vec![]),
        Reply::Array(key_specs),
        Reply::Array(c.subcommands.iter().map(|sub| command_info(sub, proto)).collect()),
    ])
}

fn arg_doc(a: &spec::ArgDoc) -> Reply {
    let mut fields = vec![
        (Reply::bulk_str("name"), Reply::bulk(a.name.clone())),
        (Reply::bulk_str("type"), Reply::bulk_str(a.kind)),
    ];
    if a.kind == "key" {
        fields.push((Reply::bulk_str("key_spec_index"), Reply::Int(0)));
    }
    if let Some(t) = &a.token {
        fields.push((Reply::bulk_str("token"), Reply::bulk(t.clone())));
    }
    let mut flags = Vec::new();
    if a.optional {
        flags.push(Reply::Status("optional".into()));
    }
    if a.multiple {
        flags.push(Reply::Status("multiple".into()));
    }
    if !flags.is_empty() {
        fields.push((Reply::bulk_str("flags"), Reply::Set(flags)));
    }
    if !a.children.is_empty() {
        fields.push((
            Reply::bulk_str("arguments"),
            Reply::Array(a.children.iter().map(arg_doc).collect()),
        ));
    }
    Reply::Map(fields)
}

/// One command's COMMAND DOCS entry.
fn command_docs(c: &Spec) -> Reply {
    let mut fields = vec![
        (Reply::bulk_str("summary"), Reply::bulk_str(c.summary)),
        (Reply::bulk_str("since"), Reply::bulk_str(c.since)),
        (Reply::bulk_str("group"), Reply::bulk_str(c.group)),
        (Reply::bulk_str("complexity"), Reply::bulk_str(c.complexity)),
    ];
    let args = spec::parse_arg_docs(c.args);
    if !args.is_empty() {
        fields.push((
            Reply::bulk_str("arguments"),
            Reply::Array(args.iter().map(arg_doc).collect()),
        ));
    }
    if !c.subcommands.is_empty() {
        fields.push((
            Reply::bulk_str("subcommands"),
            Reply::Map(
                c.subcommands
                    .iter()
                    .map(|s| (Reply::bulk_str(s.name), command_docs(s)))
                    .collect(),
            ),
        ));
    }
    Reply::Map(fields)
}

/// `CLIENT HELP` and friends: the subcommands and their syntax, from the table.
fn help(container: &str) -> Reply {
    let Some(parent) = spec::find(container) else {
        return Reply::Array(vec![]);
    };
    let upper = container.to_ascii_uppercase();
    let mut lines = vec![Reply::Status(format!(
        "{upper} <subcommand> [<arg> [value] [opt] ...]. Subcommands are:"
    ))];
    for sub in parent.subcommands {
        let name = sub
            .name
            .split('|')
            .nth(1)
            .unwrap_or_default()
            .to_ascii_uppercase();
        lines.push(Reply::Status(
            format!("{name} {}", sub.args).trim_end().to_string(),
        ));
        lines.push(Reply::Status(format!("    {}", sub.summary)));
    }
    Reply::Array(lines)
}
