//! One connection's state: protocol version, authentication, MULTI, WATCH,
//! subscriptions, CLIENT REPLY, the selected database. The network loop
//! (`server`) owns one per connection and hands it to every command.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::clients::ClientHandle;
use crate::db::{Db, WatchFlag};
use crate::pubsub::{Message, Subscriber};
use crate::reply::{Protocol, Reply};
use crate::shared::Shared;

/// A MULTI in progress.
#[derive(Debug, Default)]
pub struct Multi {
    pub queue: Vec<Vec<Bytes>>,
    /// A command failed to queue: EXEC will answer EXECABORT.
    pub failed: bool,
}

/// Keys a client WATCHes, and whether one was touched.
struct Watching {
    flag: Arc<WatchFlag>,
    /// Each key with its database, and its expiry time if it was live when watched.
    keys: Vec<(usize, Bytes, Option<Option<u64>>)>,
}

/// CLIENT REPLY: whether the connection's replies are sent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ReplyMode {
    #[default]
    On,
    Off,
    /// CLIENT REPLY SKIP ran: the reply after its own is not sent.
    SkipArmed,
    /// This request's reply is not sent; then back to `On`.
    Skipping,
}

/// Per-connection state.
pub struct Session {
    pub client: Arc<ClientHandle>,
    pub proto: Protocol,
    pub authenticated: bool,
    pub multi: Option<Multi>,
    watching: Option<Watching>,
    channels: HashSet<Bytes>,
    patterns: HashSet<Bytes>,
    pub(crate) subscriber: Option<Subscriber>,
    pub(crate) messages: Option<mpsc::Receiver<Message>>,
    /// Close the connection after this reply (QUIT, CLIENT KILL of itself).
    pub close: bool,
    /// `proto-max-bulk-len`, refreshed from the config before each batch so the
    /// hot path does not take the config lock per command.
    pub max_bulk_len: i64,
    pub(crate) last_cmd: &'static str,
    /// A write ran since the store was last flushed.
    pub wrote: bool,
    /// The current request was refused before it ran (for INFO commandstats).
    pub rejected: bool,
    /// CLIENT REPLY.
    pub reply_mode: ReplyMode,
    /// `notify-keyspace-events`, refreshed from the config like `max_bulk_len`.
    pub notify_keyspace_events: u16,
    /// Cluster state of the connection (peer identity, redirects, where its
    /// transaction lives); unused outside cluster mode.
    pub cluster: crate::cluster::SessionState,
    /// The connection came in on the TLS port (CLUSTER SLOTS shows nodes at
    /// their TLS ports to it, at their plain ones to the others).
    pub tls: bool,
    /// The selected database (SELECT).
    pub db: usize,
    /// That database, and the [`crate::databases::Databases::generation`] it
    /// was looked up at: SWAPDB moves databases, and the hot path should not
    /// take the databases' lock for every command.
    selected: Option<(u64, Arc<Db>)>,
}

impl Session {
    pub fn new(client: Arc<ClientHandle>, shared: &Shared) -> Self {
        Session {
            client,
            proto: Protocol::Resp2,
            authenticated: shared.config.read().requirepass.is_none(),
            multi: None,
            watching: None,
            channels: HashSet::new(),
            patterns: HashSet::new(),
            subscriber: None,
            messages: None,
            close: false,
            max_bulk_len: shared.config.read().proto_max_bulk_len,
            last_cmd: "",
            wrote: false,
            rejected: false,
            reply_mode: ReplyMode::On,
            notify_keyspace_events: shared.config.read().notify_keyspace_events,
            cluster: crate::cluster::SessionState::default(),
            tls: false,
            db: 0,
            selected: None,
        }
    }

    /// The selected database, opened now if this is its first use.
    pub fn database(&mut self, shared: &Shared) -> Result<&Arc<Db>, Reply> {
        let generation = shared.dbs.generation();
        if self.selected.as_ref().is_none_or(|(g, _)| *g != generation) {
            let db = match shared.dbs.get(self.db) {
                Some(Ok(db)) => db,
                Some(Err(e)) => return Err(Reply::error(e.to_string())),
                None => return Err(Reply::error("ERR DB index is out of range")),
            };
            self.selected = Some((generation, db));
        }
        Ok(&self.selected.as_ref().expect("just set").1)
    }

    /// SELECT: `index` must be a database that exists (checked by the caller).
    pub fn select(&mut self, shared: &Shared, index: usize) -> Result<(), Reply> {
        let previous = self.db;
        self.db = index;
        self.selected = None;
        if let Err(e) = self.database(shared) {
            self.db = previous;
            self.selected = None;
            return Err(e);
        }
        self.client.state.lock().db = index;
        Ok(())
    }

    /// Answers a request refused before it ran; inside MULTI this also dooms the
    /// transaction, as in Redis.
    pub fn reject(&mut self, reply: Reply) -> Reply {
        if let Some(m) = self.multi.as_mut() {
            m.failed = true;
        }
        self.rejected = true;
        reply
    }

    /// Remembers the command for CLIENT LIST; published to the client registry
    /// once per batch rather than per command.
    pub fn note_command(&mut self, name: &'static str) {
        self.last_cmd = name;
    }

    /// Whether the reply to the request just run is sent (CLIENT REPLY),
    /// moving a SKIP along.
    pub fn send_reply(&mut self) -> bool {
        match self.reply_mode {
            ReplyMode::On => true,
            ReplyMode::Off => false,
            ReplyMode::SkipArmed => {
                self.reply_mode = ReplyMode::Skipping;
                true
            }
            ReplyMode::Skipping => {
                self.reply_mode = ReplyMode::On;
                false
            }
        }
    }

    pub fn in_resp2_subscribed_mode(&self) -> bool {
        self.proto == Protocol::Resp2 && !(self.channels.is_empty() && self.patterns.is_empty())
    }

    pub fn set_authenticated(&mut self, yes: bool) {
        self.authenticated = yes;
    }

    pub fn set_protocol(&mut self, proto: Protocol) {
        self.proto = proto;
        self.client.state.lock().resp = if proto == Protocol::Resp3 { 3 } else { 2 };
    }

    pub fn begin_multi(&mut self) {
        self.multi = Some(Multi::default());
        self.client.state.lock().multi = 0;
    }

    pub fn end_multi(&mut self) -> Option<Multi> {
        self.client.state.lock().multi = -1;
        self.multi.take()
    }

    pub fn watch(&mut self, shared: &Shared, keys: Vec<Bytes>) {
        let w = self.watching.get_or_insert_with(|| Watching {
            flag: Arc::new(WatchFlag::default()),
            keys: Vec::new(),
        });
        let index = self.db;
        let Some(Ok(db)) = shared.dbs.get(index) else {
            return;
        };
        for key in keys {
            if w.keys.iter().any(|(i, k, _)| *i == index && *k == key) {
                continue;
            }
            let state = db.watch(&key, &w.flag);
            w.keys.push((index, key, state));
        }
        self.client.state.lock().watching = w.keys.len();
    }

    pub fn is_watching(&self) -> bool {
        self.watching.is_some()
    }

    pub fn unwatch_all(&mut self, shared: &Shared) {
        if let Some(w) = self.watching.take() {
            let mut by_db: std::collections::BTreeMap<usize, Vec<Bytes>> = Default::default();
            for (i, k, _) in w.keys {
                by_db.entry(i).or_default().push(k);
            }
            for (i, keys) in by_db {
                if let Some(Ok(db)) = shared.dbs.get(i) {
                    db.unwatch(&keys, &w.flag);
                }
            }
        }
        self.client.state.lock().watching = 0;
    }

    /// Whether EXEC must fail: a watched key was touched, or a key that was live
    /// when watched has expired since. Called with the gate held exclusively.
    pub fn watch_broken(&self, shared: &Shared) -> bool {
        let Some(w) = &self.watching else {
            return false;
        };
        if w.flag.is_dirty() {
            return true;
        }
        let now = crate::db::now_ms();
        w.keys
            .iter()
            .any(|(index, key, state)| match (state, shared.dbs.get(*index)) {
                (Some(_), Some(Ok(db))) => db.store().expiry(key).is_none_or(|t| t.is_some_and(|t| t <= now)),
                (Some(_), _) => true,
                (None, _) => false,
            })
    }

    fn subscription_count(&self) -> i64 {
        (self.channels.len() + self.patterns.len()) as i64
    }

    fn sync_sub_counts(&self, shared: &Shared) {
        let mut st = self.client.state.lock();
        let was = st.subscriptions + st.pattern_subscriptions > 0;
        st.subscriptions = self.channels.len();
        st.pattern_subscriptions = self.patterns.len();
        let is = st.subscriptions + st.pattern_subscriptions > 0;
        if was != is {
            if is {
                shared.clients.pubsub_clients.fetch_add(1, Ordering::Relaxed);
            } else {
                shared.clients.pubsub_clients.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    /// The connection's queue for messages pushed to it (pub/sub, MONITOR),
    /// made on first use.
    fn subscriber(&mut self, shared: &Shared) -> Subscriber {
        match &self.subscriber {
            Some(s) => s.clone(),
            None => {
                let cap = shared.config.read().pubsub_queue_limit;
                let (tx, rx) = mpsc::channel(cap);
                let s = Subscriber {
                    tx,
                    client: self.client.clone(),
                };
                self.subscriber = Some(s.clone());
                self.messages = Some(rx);
                s
            }
        }
    }

    /// MONITOR: from now on this connection is shown every command.
    pub fn monitor(&mut self, shared: &Shared) {
        let sub = self.subscriber(shared);
        shared.monitors.add(sub);
    }

    /// SUBSCRIBE / PSUBSCRIBE one name; returns its confirmation message.
    pub fn subscribe(&mut self, shared: &Shared, name: Bytes, pattern: bool) -> Reply {
        let sub = self.subscriber(shared);
        if pattern {
            shared.pubsub.psubscribe(&name, &sub);
            self.patterns.insert(name.clone());
        } else {
            shared.pubsub.subscribe(&name, &sub);
            self.channels.insert(name.clone());
        }
        self.sync_sub_counts(shared);
        let kind = if pattern { "psubscribe" } else { "subscribe" };
        Reply::Push(vec![
            Reply::bulk_str(kind),
            Reply::Bulk(name),
            Reply::Int(self.subscription_count()),
        ])
    }

    /// UNSUBSCRIBE / PUNSUBSCRIBE the names given, or all when none are.
    pub fn unsubscribe(&mut self, shared: &Shared, names: Vec<Bytes>, pattern: bool) -> Reply {
        let kind = if pattern { "punsubscribe" } else { "unsubscribe" };
        let names = if names.is_empty() {
            let set = if pattern { &self.patterns } else { &self.channels };
            set.iter().cloned().collect()
        } else {
            names
        };
        if names.is_empty() {
            return Reply::Push(vec![
                Reply::bulk_str(kind),
                Reply::Nil,
                Reply::Int(self.subscription_count()),
            ]);
        }
        let mut replies = Vec::new();
        for name in names {
            if pattern {
                shared.pubsub.punsubscribe(&name, self.client.id);
                self.patterns.remove(&name);
            } else {
                shared.pubsub.unsubscribe(&name, self.client.id);
                self.channels.remove(&name);
            }
            replies.push(Reply::Push(vec![
                Reply::bulk_str(kind),
                Reply::Bulk(name),
                Reply::Int(self.subscription_count()),
            ]));
        }
        self.sync_sub_counts(shared);
        Reply::Many(replies)
    }

    /// RESET, and the clean-up when the connection ends.
    pub fn reset(&mut self, shared: &Shared) {
        shared.monitors.remove(self.client.id);
        self.end_multi();
        self.unwatch_all(shared);
        self.unsubscribe(shared, Vec::new(), false);
        self.unsubscribe(shared, Vec::new(), true);
        self.set_protocol(Protocol::Resp2);
        self.reply_mode = ReplyMode::On;
        self.authenticated = shared.config.read().requirepass.is_none();
        self.client.state.lock().name.clear();
        self.db = 0;
        self.selected = None;
        self.client.state.lock().db = 0;
    }
}
