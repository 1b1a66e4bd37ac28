//! The registry of connected clients: what CLIENT LIST / INFO / KILL and INFO
//! clients report, and the handle through which one client can be disconnected
//! by another.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;
use tokio::sync::Notify;

/// Per-client facts that change while it runs.
#[derive(Debug, Default, Clone)]
pub struct ClientState {
    pub name: String,
    pub lib_name: String,
    pub lib_ver: String,
    /// Last command, lowercase, `container|sub` for subcommands.
    pub last_cmd: &'static str,
    pub subscriptions: usize,
    pub pattern_subscriptions: usize,
    /// Commands queued in MULTI, or -1 outside MULTI.
    pub multi: i64,
    pub resp: u8,
    pub watching: usize,
    /// The selected database.
    pub db: usize,
}

#[derive(Debug)]
pub struct ClientHandle {
    pub id: u64,
    pub addr: SocketAddr,
    pub laddr: SocketAddr,
    pub created: Instant,
    /// Milliseconds since `created` of the last command.
    pub last_interaction_ms: AtomicU64,
    pub state: Mutex<ClientState>,
    /// Notified by CLIENT KILL; the connection closes at its next await.
    pub kill: Notify,
    /// Set once the server has decided to drop this client (slow subscriber), so
    /// the decision is logged once.
    pub dropping: std::sync::atomic::AtomicBool,
}

impl ClientHandle {
    pub fn touch(&self) {
        self.last_interaction_ms
            .store(self.created.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    pub fn idle_secs(&self) -> u64 {
        let last = self.last_interaction_ms.load(Ordering::Relaxed);
        (self.created.elapsed().as_millis() as u64).saturating_sub(last) / 1000
    }

    /// Whether the client is of a CLIENT LIST / KILL `TYPE` (`normal`, `pubsub`;
    /// kvd has no replica or master links, so those types match nothing).
    pub fn is_kind(&self, kind: &str) -> bool {
        let pubsub = {
            let st = self.state.lock();
            st.subscriptions + st.pattern_subscriptions > 0
        };
        match kind {
            "normal" => !pubsub,
            "pubsub" => pubsub,
            _ => false,
        }
    }

    /// One line of CLIENT LIST / CLIENT INFO, fields in Redis 7's order. Fields
    /// about Redis internals kvd does not have (query buffer sizes, output lists)
    /// are reported as 0 so parsers find every field.
    pub fn info_line(&self) -> String {
        let s = self.state.lock().clone();
        let flags = if s.multi >= 0 {
            "x"
        } else if s.subscriptions + s.pattern_subscriptions > 0 {
            "P"
        } else {
            "N"
        };
        let cmd = if s.last_cmd.is_empty() { "NULL" } else { s.last_cmd };
        format!(
            "id={} addr={} laddr={} fd=0 name={} age={} idle={} flags={} db={} sub={} psub={} ssub=0 multi={} \
             qbuf=0 qbuf-free=0 argv-mem=0 multi-mem=0 rbs=0 rbp=0 obl=0 oll=0 omem=0 tot-mem=0 events=r \
             cmd={} user=default redir=-1 resp={} lib-name={} lib-ver={}",
            self.id,
            self.addr,
            self.laddr,
            s.name,
            self.created.elapsed().as_secs(),
            self.idle_secs(),
            flags,
            s.db,
            s.subscriptions,
            s.pattern_subscriptions,
            s.multi,
            cmd,
            s.resp,
            s.lib_name,
            s.lib_ver,
        )
    }
}

/// All connected clients, and counters over their lifetime.
#[derive(Default)]
pub struct Clients {
    next_id: AtomicU64,
    map: Mutex<BTreeMap<u64, Arc<ClientHandle>>>,
    pub total_connections: AtomicU64,
    pub rejected_connections: AtomicU64,
    pub pubsub_clients: AtomicUsize,
}

impl Clients {
    pub fn register(&self, addr: SocketAddr, laddr: SocketAddr) -> Arc<ClientHandle> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let handle = Arc::new(ClientHandle {
            id,
            addr,
            laddr,
            created: Instant::now(),
            last_interaction_ms: AtomicU64::new(0),
            state: Mutex::new(ClientState {
                multi: -1,
                resp: 2,
                ..Default::default()
            }),
            kill: Notify::new(),
            dropping: Default::default(),
        });
        self.map.lock().insert(id, handle.clone());
        self.total_connections.fetch_add(1, Ordering::Relaxed);
        handle
    }

    pub fn unregister(&self, id: u64) {
        self.map.lock().remove(&id);
    }

    pub fn len(&self) -> usize {
        self.map.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn all(&self) -> Vec<Arc<ClientHandle>> {
        self.map.lock().values().cloned().collect()
    }

    pub fn get(&self, id: u64) -> Option<Arc<ClientHandle>> {
        self.map.lock().get(&id).cloned()
    }
}
