//! The file system's only view of storage: a dictionary with one atomic
//! compare-and-swap.
//!
//! [`Dict`] has two backends: [`MemoryDict`] (for tests of the core) and
//! [`RespDict`] (production: kvd, redis-server, anything speaking RESP).

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use redis::ConnectionLike;

#[derive(Clone, Debug, thiserror::Error)]
pub enum DictError {
    #[error("store unreachable or failed: {0}")]
    Backend(String),
    /// The store refuses writes for want of room: Redis's `OOM command not
    /// allowed` (maxmemory with noeviction), a full disk under kvd or a
    /// Redis AOF. A writer sees `ENOSPC`, as on a full local disk.
    #[error("store full: {0}")]
    Full(String),
}

impl DictError {
    /// Classifies an error text a store sent.
    pub fn from_store(text: String) -> DictError {
        if text.starts_with("OOM")
            || text.contains("OOM command not allowed")
            || text.contains("No space left on device")
        {
            DictError::Full(text)
        } else {
            DictError::Backend(text)
        }
    }
}

pub type DictResult<T> = Result<T, DictError>;

/// A key-value store with an atomic compare-and-swap of single keys.
pub trait Dict: Send + Sync {
    fn get(&self, key: &str) -> DictResult<Option<Bytes>>;
    /// Several gets in one round trip where the backend can.
    fn get_many(&self, keys: &[String]) -> DictResult<Vec<Option<Bytes>>> {
        keys.iter().map(|k| self.get(k)).collect()
    }
    /// Stores `value` unless `key` exists (blobs are immutable: an existing one
    /// is never rewritten).
    fn put_if_absent(&self, key: &str, value: Bytes) -> DictResult<()>;
    /// Several puts in one round trip where the backend can.
    fn put_many_if_absent(&self, items: Vec<(String, Bytes)>) -> DictResult<()> {
        items.into_iter().try_for_each(|(k, v)| self.put_if_absent(&k, v))
    }
    fn delete(&self, key: &str) -> DictResult<()>;
    fn contains(&self, key: &str) -> DictResult<bool>;
    /// Sets `key` to `new` if its current value is `expected` (`None`: absent).
    /// Returns whether it did; linearizable with every other access to `key`.
    fn compare_and_swap(&self, key: &str, expected: Option<&[u8]>, new: &[u8]) -> DictResult<bool>;
    /// The store's capacity and free space in bytes, where it can tell.
    fn capacity(&self) -> DictResult<Option<(u64, u64)>> {
        Ok(None)
    }

    // What garbage collection needs (see `crate::gc`). The defaults say the
    // backend cannot; a file system on such a store works, but cannot be collected.

    /// Calls `each` with batches of the keys starting with `prefix`, on every node
    /// of a cluster. A key present for the whole scan is reported at least once.
    fn scan_prefix(
        &self,
        prefix: &str,
        each: &mut dyn FnMut(Vec<String>) -> DictResult<()>,
    ) -> DictResult<()> {
        let _ = (prefix, each);
        Err(unsupported("listing keys"))
    }
    /// The byte lengths of values (`None`: absent), in one round trip where it can.
    fn sizes(&self, keys: &[String]) -> DictResult<Vec<Option<u64>>> {
        let _ = keys;
        Err(unsupported("value sizes"))
    }
    /// Deletes keys, in one round trip where it can.
    fn delete_many(&self, keys: &[String]) -> DictResult<()> {
        keys.iter().try_for_each(|k| self.delete(k))
    }
    /// Appends `value` to the string at `key` (absent: empty).
    fn append(&self, key: &str, value: &[u8]) -> DictResult<()> {
        let _ = (key, value);
        Err(unsupported("appending"))
    }
    /// Adds one to the integer at `key` (absent counts as 0); returns the result.
    fn incr(&self, key: &str) -> DictResult<u64> {
        let _ = key;
        Err(unsupported("counters"))
    }
    /// Sets `key` to `value`, expiring after `ttl`; with `only_if_absent`, only if
    /// it does not exist. Returns whether it was set.
    fn put_expiring(&self, key: &str, value: &[u8], ttl: Duration, only_if_absent: bool) -> DictResult<bool> {
        let _ = (key, value, ttl, only_if_absent);
        Err(unsupported("expiring keys"))
    }
    /// Atomically: reads the integer at `counter` (absent: 0), appends `record` to
    /// `log` and makes `log` expire after `ttl`. Returns the counter. The two keys
    /// must be in one cluster slot (a shared `{hash tag}`).
    fn read_and_append(&self, counter: &str, log: &str, record: &[u8], ttl: Duration) -> DictResult<u64> {
        let _ = (counter, log, record, ttl);
        Err(unsupported("atomic appends"))
    }
}

thread_local! {
    /// The packet of the last pipelined write on this thread, reused: fresh
    /// memory costs a page fault and the zeroing of each page.
    static PACKET: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `SET key value NX` for each item, as RESP, into `out` (emptied first).
fn pack_set_nx(items: &[(String, Bytes)], out: &mut Vec<u8>) {
    use std::io::Write;
    out.clear();
    let framing = 64;
    out.reserve(items.iter().map(|(k, v)| k.len() + v.len() + framing).sum());
    for (k, v) in items {
        let _ = write!(out, "*4\r\n$3\r\nSET\r\n${}\r\n", k.len());
        out.extend_from_slice(k.as_bytes());
        let _ = write!(out, "\r\n${}\r\n", v.len());
        out.extend_from_slice(v);
        out.extend_from_slice(b"\r\n$2\r\nNX\r\n");
    }
}

fn unsupported(what: &str) -> DictError {
    DictError::Backend(format!("this store does not support {what}"))
}

/// The integer a counter key holds (absent or unreadable: 0).
fn counter_value(raw: Option<&[u8]>) -> u64 {
    raw.and_then(|v| std::str::from_utf8(v).ok()?.parse().ok())
        .unwrap_or(0)
}

/// An in-process dictionary, for unit tests. Expiry times are recorded, not
/// acted on (no test lives that long).
#[derive(Default)]
pub struct MemoryDict {
    map: Mutex<HashMap<String, Bytes>>,
}

impl MemoryDict {
    pub fn new() -> Self {
        Self::default()
    }

    /// Replaces a stored value without any check (tests simulating damage).
    pub fn overwrite(&self, key: &str, value: Bytes) {
        self.map.lock().insert(key.to_string(), value);
    }

    pub fn keys(&self) -> Vec<String> {
        self.map.lock().keys().cloned().collect()
    }
}

impl Dict for MemoryDict {
    fn get(&self, key: &str) -> DictResult<Option<Bytes>> {
        Ok(self.map.lock().get(key).cloned())
    }

    fn put_if_absent(&self, key: &str, value: Bytes) -> DictResult<()> {
        self.map.lock().entry(key.to_string()).or_insert(value);
        Ok(())
    }

    fn delete(&self, key: &str) -> DictResult<()> {
        self.map.lock().remove(key);
        Ok(())
    }

    fn contains(&self, key: &str) -> DictResult<bool> {
        Ok(self.map.lock().contains_key(key))
    }

    fn compare_and_swap(&self, key: &str, expected: Option<&[u8]>, new: &[u8]) -> DictResult<bool> {
        let mut map = self.map.lock();
        if map.get(key).map(|v| &v[..]) != expected {
            return Ok(false);
        }
        map.insert(key.to_string(), Bytes::copy_from_slice(new));
        Ok(true)
    }

    fn scan_prefix(
        &self,
        prefix: &str,
        each: &mut dyn FnMut(Vec<String>) -> DictResult<()>,
    ) -> DictResult<()> {
        let keys: Vec<String> = self
            .map
            .lock()
            .keys()
            .filter(|k| k.starts_with(prefix))
            .cloned()
            .collect();
        for batch in keys.chunks(100) {
            each(batch.to_vec())?;
        }
        Ok(())
    }

    fn sizes(&self, keys: &[String]) -> DictResult<Vec<Option<u64>>> {
        let map = self.map.lock();
        Ok(keys.iter().map(|k| map.get(k).map(|v| v.len() as u64)).collect())
    }

    fn append(&self, key: &str, value: &[u8]) -> DictResult<()> {
        let mut map = self.map.lock();
        let mut joined = map.get(key).map(|v| v.to_vec()).unwrap_or_default();
        joined.extend_from_slice(value);
        map.insert(key.to_string(), Bytes::from(joined));
        Ok(())
    }

    fn incr(&self, key: &str) -> DictResult<u64> {
        let mut map = self.map.lock();
        let n = counter_value(map.get(key).map(|v| &v[..])) + 1;
        map.insert(key.to_string(), Bytes::from(n.to_string()));
        Ok(n)
    }

    fn put_expiring(
        &self,
        key: &str,
        value: &[u8],
        _ttl: Duration,
        only_if_absent: bool,
    ) -> DictResult<bool> {
        let mut map = self.map.lock();
        if only_if_absent && map.contains_key(key) {
            return Ok(false);
        }
        map.insert(key.to_string(), Bytes::copy_from_slice(value));
        Ok(true)
    }

    fn read_and_append(&self, counter: &str, log: &str, record: &[u8], _ttl: Duration) -> DictResult<u64> {
        let mut map = self.map.lock();
        let n = counter_value(map.get(counter).map(|v| &v[..]));
        let mut joined = map.get(log).map(|v| v.to_vec()).unwrap_or_default();
        joined.extend_from_slice(record);
        map.insert(log.to_string(), Bytes::from(joined));
        Ok(n)
    }
}

/// A RESP store reached through the `redis` crate: kvd, redis-server, Valkey,
/// or a Redis Cluster (detected at connect: `INFO cluster` says
/// `cluster_enabled:1`).
///
/// Single server: connections are pooled (one per concurrent caller); one that
/// errors is dropped and a new one made on the next call, so a restarted server
/// is picked up. Cluster: the `redis` crate's cluster client routes each key to
/// its slot's node and follows `MOVED`/`ASK`. The root swap uses WATCH / GET /
/// MULTI / SET / EXEC on one dedicated connection, since WATCH state belongs to
/// the connection; in a cluster that connection goes straight to the node that
/// owns the root key's slot.
pub struct RespDict {
    url: String,
    /// The server plain connections go to: the URL's, or, for a replicated
    /// kvd whose node stopped answering, another member (see `alternates`).
    single: Mutex<(String, redis::Client)>,
    /// Every node of a replicated kvd (each serves every key): where plain
    /// connections go next when the current node stops answering.
    alternates: Mutex<Vec<String>>,
    pool: Mutex<Vec<redis::Connection>>,
    cluster: Option<Mutex<redis::cluster::ClusterConnection>>,
    /// Addresses to reconnect a cluster through: the URL's, and every node
    /// (masters and replicas) the last CLUSTER SLOTS named.
    seeds: Mutex<Vec<String>>,
    /// Direct connections to the node of a hash tag (cluster only), for the
    /// multi-key transactions of garbage collection; dropped on any error.
    tagged: Mutex<HashMap<String, redis::Connection>>,
    /// The store is a replicated kvd (it names its members in INFO).
    replicated_kvd: bool,
}

/// How long a command refused with `-TRYAGAIN` is tried again before the
/// error is passed on.
const TRYAGAIN_FOR: Duration = Duration::from_secs(15);

fn backend(e: redis::RedisError) -> DictError {
    let full = e.code() == Some("OOM");
    let text = e.to_string();
    if full {
        DictError::Full(text)
    } else {
        DictError::from_store(text)
    }
}

/// Whether an error says a cluster node is gone or the cluster is between
/// maps (as during a failover), rather than refusing the command.
fn node_failed(e: &redis::RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_refusal()
        || e.is_connection_dropped()
        || e.is_timeout()
        || e.is_cluster_error()
        || matches!(e.code(), Some("CLUSTERDOWN" | "MASTERDOWN" | "TRYAGAIN"))
}

/// Whether two store URLs name the same host and port.
fn same_address(a: &str, b: &str) -> bool {
    let hostport = |u: &str| {
        let rest = u.split_once("://").map_or(u, |(_, r)| r);
        let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
        rest.split('/').next().unwrap_or(rest).to_string()
    };
    hostport(a) == hostport(b)
}

/// `url` with its host and port replaced (credentials kept).
fn with_address(url: &str, host: &str, port: u16) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("redis", url));
    let creds = rest
        .split_once('@')
        .map(|(c, _)| format!("{c}@"))
        .unwrap_or_default();
    format!("{scheme}://{creds}{host}:{port}")
}

/// Certificates for `rediss://` from the environment, read once:
/// `DICTFS_TLS_CA_CERT_FILE` (the CA the store's certificate must be signed
/// by; else the system's roots or `SSL_CERT_FILE`), and
/// `DICTFS_TLS_CERT_FILE` with `DICTFS_TLS_KEY_FILE` (a client certificate,
/// for a store with `tls-auth-clients yes`). All PEM. `None` when none is
/// set; an unreadable file is an error naming it.
fn tls_certificates() -> redis::RedisResult<Option<redis::TlsCertificates>> {
    static CERTS: std::sync::OnceLock<Result<Option<redis::TlsCertificates>, String>> =
        std::sync::OnceLock::new();
    let read = |var: &str| -> Result<Option<Vec<u8>>, String> {
        match std::env::var_os(var) {
            None => Ok(None),
            Some(path) => std::fs::read(&path)
                .map(Some)
                .map_err(|e| format!("{var} {}: {e}", std::path::Path::new(&path).display())),
        }
    };
    let loaded = CERTS.get_or_init(|| {
        let root_cert = read("DICTFS_TLS_CA_CERT_FILE")?;
        let client_tls = match (read("DICTFS_TLS_CERT_FILE")?, read("DICTFS_TLS_KEY_FILE")?) {
            (Some(client_cert), Some(client_key)) => Some(redis::ClientTlsConfig {
                client_cert,
                client_key,
            }),
            (None, None) => None,
            _ => return Err("DICTFS_TLS_CERT_FILE and DICTFS_TLS_KEY_FILE go together".into()),
        };
        Ok(
            (root_cert.is_some() || client_tls.is_some()).then_some(redis::TlsCertificates {
                client_tls,
                root_cert,
            }),
        )
    });
    loaded
        .clone()
        .map_err(|e| redis::RedisError::from((redis::ErrorKind::InvalidClientConfig, "TLS", e)))
}

/// A client for `url`, with the certificates of [`tls_certificates`] for
/// `rediss://`.
fn client(url: &str) -> redis::RedisResult<redis::Client> {
    match tls_certificates()? {
        Some(certs) if url.starts_with("rediss://") => redis::Client::build_with_tls(url, certs),
        _ => redis::Client::open(url),
    }
}

/// A cluster client seeded with `url`, likewise.
/// The `(host, port)` of every node a CLUSTER SLOTS reply names, in order,
/// each once.
fn slot_nodes(ranges: Vec<redis::Value>) -> Vec<(String, u16)> {
    let mut nodes = Vec::new();
    for range in ranges {
        let redis::Value::Array(parts) = range else {
            continue;
        };
        for node in parts.iter().skip(2) {
            let redis::Value::Array(node) = node else { continue };
            if let (Some(redis::Value::BulkString(host)), Some(redis::Value::Int(port))) =
                (node.first(), node.get(1))
            {
                let node = (String::from_utf8_lossy(host).into_owned(), *port as u16);
                if !nodes.contains(&node) {
                    nodes.push(node);
                }
            }
        }
    }
    nodes
}

fn cluster_client(url: &str) -> redis::RedisResult<redis::cluster::ClusterClient> {
    let builder = redis::cluster::ClusterClient::builder(vec![url]);
    match tls_certificates()? {
        Some(certs) if url.starts_with("rediss://") => builder.certs(certs).build(),
        _ => builder.build(),
    }
}

impl RespDict {
    /// Connects to `redis://[[user]:password@]host:port[/db]`, or with TLS to
    /// `rediss://…` (the server's certificate is checked against the system's
    /// roots, the file `SSL_CERT_FILE` names, or `DICTFS_TLS_CA_CERT_FILE`;
    /// `DICTFS_TLS_CERT_FILE`/`DICTFS_TLS_KEY_FILE` give a client certificate;
    /// `rediss://…/#insecure` skips the check, for self-signed test setups only).
    pub fn open(url: &str) -> DictResult<RespDict> {
        if url.starts_with("rediss://") {
            // rustls needs its cryptography chosen once per process; an error
            // means one was chosen already.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let single = client(url).map_err(backend)?;
        let mut dict = RespDict {
            url: url.to_string(),
            single: Mutex::new((url.to_string(), single)),
            alternates: Mutex::new(Vec::new()),
            pool: Mutex::new(Vec::new()),
            cluster: None,
            seeds: Mutex::new(vec![url.to_string()]),
            tagged: Mutex::new(HashMap::new()),
            replicated_kvd: false,
        };
        // Fail early with a clear error if the store is not there.
        let info: String = dict.with_conn(|c| redis::cmd("INFO").arg("cluster").query(c))?;
        let kvd_members = info.lines().find_map(|l| l.strip_prefix("kvd_replica_members:"));
        if let Some(members) = kvd_members {
            // A replicated kvd: every node serves every key, so any member can
            // stand in for the one in the URL. CLUSTER SLOTS names them at
            // the ports for a client of this one's kind (plain or TLS; a
            // member's address is its TLS port when the links between nodes
            // are TLS); INFO's list of addresses is the fallback.
            let shown = dict
                .with_conn(|c| redis::cmd("CLUSTER").arg("SLOTS").query::<Vec<redis::Value>>(c))
                .map(slot_nodes)
                .unwrap_or_default();
            let listed: Vec<(String, u16)> = members
                .trim()
                .split(',')
                .filter_map(|addr| {
                    let (host, port) = addr.rsplit_once(':')?;
                    Some((host.to_string(), port.parse().ok()?))
                })
                .collect();
            let mut alternates = vec![url.to_string()];
            for (host, port) in if shown.is_empty() { listed } else { shown } {
                let alt = with_address(url, &host, port);
                if !alternates.contains(&alt) && !same_address(&alt, url) {
                    alternates.push(alt);
                }
            }
            *dict.alternates.lock() = alternates;
            dict.replicated_kvd = true;
        }
        // A Redis Cluster: route by slot, follow failovers. A kvd cluster says
        // cluster_enabled:1 too, but any of its nodes runs any key's round, so
        // the members above are all it needs: a slot's first holder being
        // down costs nothing then, where a slot-routing client would fail
        // until the cluster's view of that node changed.
        if info.contains("cluster_enabled:1") && kvd_members.is_none() {
            let client = cluster_client(url).map_err(backend)?;
            dict.cluster = Some(Mutex::new(client.get_connection().map_err(backend)?));
            dict.learn_seeds();
        }
        Ok(dict)
    }

    /// Runs `f` on the cluster connection. When a node does not answer
    /// (refused, reset, timed out) or the cluster says it is down, the
    /// connection is made anew through the seeds, so its slot map is fresh,
    /// and `f` runs again, for up to [`TRYAGAIN_FOR`]: a failover promotes a
    /// replica within seconds, while the old connection went on sending to
    /// the dead master for good (issue 24: a mount dead after a failover).
    /// What runs here is idempotent (SET NX of blobs, reads) or harmless to
    /// repeat (a lease counter's INCR).
    fn cluster_call<T>(
        &self,
        mut f: impl FnMut(&mut redis::cluster::ClusterConnection) -> redis::RedisResult<T>,
    ) -> DictResult<T> {
        let cluster = self.cluster.as_ref().expect("cluster_call on a cluster");
        let deadline = std::time::Instant::now() + TRYAGAIN_FOR;
        let mut pause = Duration::from_millis(100);
        loop {
            let result = f(&mut cluster.lock());
            match result {
                Ok(v) => return Ok(v),
                Err(e) if node_failed(&e) && std::time::Instant::now() < deadline => {
                    tracing::warn!("cluster node failed ({e}); reconnecting through the seeds");
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_secs(1));
                    self.reconnect_cluster();
                }
                Err(e) => return Err(backend(e)),
            }
        }
    }

    /// Replaces the cluster connection with one made through the first seed
    /// that answers (best effort: on failure the old one stays).
    fn reconnect_cluster(&self) {
        let Some(cluster) = &self.cluster else { return };
        let seeds = self.seeds.lock().clone();
        for seed in seeds {
            let Ok(client) = cluster_client(&seed) else {
                continue;
            };
            if let Ok(conn) = client.get_connection() {
                *cluster.lock() = conn;
                // Direct connections to nodes may be to the dead one.
                self.tagged.lock().clear();
                self.learn_seeds();
                return;
            }
        }
    }

    /// Remembers every node CLUSTER SLOTS names (with the URL first), so the
    /// mount can reconnect even when the address it was given is gone.
    fn learn_seeds(&self) {
        let Some(cluster) = &self.cluster else { return };
        let Ok(ranges) = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query::<Vec<redis::Value>>(&mut *cluster.lock())
        else {
            return;
        };
        let mut seeds = vec![self.url.clone()];
        for (host, port) in slot_nodes(ranges) {
            let url = with_address(&self.url, &host, port);
            if !seeds.contains(&url) {
                seeds.push(url);
            }
        }
        *self.seeds.lock() = seeds;
    }

    /// The server's `INFO <section>` text (of one node, for a cluster).
    pub fn server_info(&self, section: &str) -> DictResult<String> {
        self.with_conn(|c| redis::cmd("INFO").arg(section).query(c))
    }

    /// `CLUSTER NODES` of the node the URL names (for `fsclient status`).
    pub fn cluster_nodes(&self) -> DictResult<String> {
        self.with_conn(|c| redis::cmd("CLUSTER").arg("NODES").query(c))
    }

    /// Whether the store is a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        self.cluster.is_some()
    }

    /// Runs `f` on a pooled connection. A `-TRYAGAIN` reply (the store
    /// refused and changed nothing: kvd while a slot's replicas change, Redis
    /// Cluster while a slot migrates) runs `f` again after a pause, for up to
    /// [`TRYAGAIN_FOR`].
    fn with_conn<T>(
        &self,
        mut f: impl FnMut(&mut redis::Connection) -> redis::RedisResult<T>,
    ) -> DictResult<T> {
        let deadline = std::time::Instant::now() + TRYAGAIN_FOR;
        let mut pause = Duration::from_millis(10);
        loop {
            let pooled = self.pool.lock().pop();
            let mut conn = match pooled {
                Some(c) => c,
                None => match self.new_conn() {
                    Ok(c) => c,
                    Err(e) if self.fail_over(&e, deadline) => continue,
                    Err(e) => return Err(backend(e)),
                },
            };
            match f(&mut conn) {
                Ok(v) => {
                    self.pool.lock().push(conn);
                    return Ok(v);
                }
                Err(e) if e.code() == Some("TRYAGAIN") && std::time::Instant::now() < deadline => {
                    // A reply like any other: the connection is fine, but a
                    // transaction left on it (WATCH) must not carry over.
                    let _ = redis::cmd("UNWATCH").query::<()>(&mut conn);
                    self.pool.lock().push(conn);
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(500));
                }
                // The node went away mid-command: another member runs it again.
                // (What runs here is idempotent, or a compare-and-swap that a
                // rerun answers from the root as it is now.)
                Err(e) if self.fail_over(&e, deadline) => {}
                // The connection may be broken; do not reuse it.
                Err(e) => return Err(backend(e)),
            }
        }
    }

    /// A new plain connection to the current server.
    fn new_conn(&self) -> redis::RedisResult<redis::Connection> {
        let client = self.single.lock().1.clone();
        let c = client.get_connection_with_timeout(Duration::from_secs(10))?;
        c.set_read_timeout(Some(Duration::from_secs(60)))?;
        Ok(c)
    }

    /// After `e`, whether to try again on another member of a replicated kvd:
    /// the node stopped answering, another one is known, and there is time.
    /// Switches plain connections to the next member (dropping the pool).
    fn fail_over(&self, e: &redis::RedisError, deadline: std::time::Instant) -> bool {
        let alternates = self.alternates.lock().clone();
        if alternates.len() < 2 || !node_failed(e) || std::time::Instant::now() >= deadline {
            return false;
        }
        let mut single = self.single.lock();
        let at = alternates.iter().position(|a| *a == single.0).unwrap_or(0);
        let next = alternates[(at + 1) % alternates.len()].clone();
        match client(next.as_str()) {
            Ok(client) => {
                tracing::warn!("store node {} failed ({e}); going on through {}", single.0, next);
                *single = (next, client);
                self.pool.lock().clear();
                drop(single);
                std::thread::sleep(Duration::from_millis(50));
                true
            }
            Err(_) => false,
        }
    }

    /// Runs a keyed command on the right node: the pool for a single server, the
    /// cluster connection (which routes by key) for a cluster.
    fn run<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> DictResult<T> {
        match &self.cluster {
            Some(_) => self.cluster_call(|c| cmd.query(c)),
            None => self.with_conn(|c| cmd.query(c)),
        }
    }

    /// The `(start, end, url)` of every slot range of a cluster, from CLUSTER SLOTS.
    fn slot_ranges(&self) -> DictResult<Vec<(i64, i64, String)>> {
        let ranges: Vec<redis::Value> = self.cluster_call(|c| redis::cmd("CLUSTER").arg("SLOTS").query(c))?;
        Ok(self.parse_slot_ranges(ranges))
    }

    /// `(start, end, url of the first node listed)` of each range of a CLUSTER
    /// SLOTS reply.
    fn parse_slot_ranges(&self, ranges: Vec<redis::Value>) -> Vec<(i64, i64, String)> {
        let num = |v: &redis::Value| match v {
            redis::Value::Int(n) => Some(*n),
            _ => None,
        };
        let mut out = Vec::new();
        for range in ranges {
            let redis::Value::Array(parts) = range else {
                continue;
            };
            let (Some(start), Some(end)) = (parts.first().and_then(num), parts.get(1).and_then(num)) else {
                continue;
            };
            let Some(redis::Value::Array(node)) = parts.get(2) else {
                continue;
            };
            let host = match node.first() {
                Some(redis::Value::BulkString(h)) => String::from_utf8_lossy(h).into_owned(),
                _ => continue,
            };
            let Some(port) = node.get(1).and_then(num) else {
                continue;
            };
            out.push((start, end, with_address(&self.url, &host, port as u16)));
        }
        out
    }

    /// A kvd cluster keeps each key on several members, and a member's SCAN
    /// lists only the keys it holds: scans every member CLUSTER SLOTS lists
    /// first for some slots, keeping from each the keys of those slots, so
    /// every key comes once. `None` for any other store.
    fn scan_kvd_cluster(
        &self,
        pattern: &str,
        each: &mut dyn FnMut(Vec<String>) -> DictResult<()>,
    ) -> Option<DictResult<()>> {
        if self.cluster.is_some() || self.alternates.lock().len() < 2 {
            return None;
        }
        let mut scan = || -> DictResult<()> {
            let ranges: Vec<redis::Value> =
                self.with_conn(|c| redis::cmd("CLUSTER").arg("SLOTS").query(c))?;
            let mut owner = vec![String::new(); SLOTS];
            for (start, end, url) in self.parse_slot_ranges(ranges) {
                for s in start.max(0)..=end.min(SLOTS as i64 - 1) {
                    owner[s as usize] = url.clone();
                }
            }
            let mut urls = owner.clone();
            urls.sort();
            urls.dedup();
            for url in urls.iter().filter(|u| !u.is_empty()) {
                let mut conn = Self::connect(url)?;
                scan_node(
                    &mut conn,
                    pattern,
                    &|k| owner[key_slot(k.as_bytes()) as usize] == *url,
                    each,
                )?;
            }
            Ok(())
        };
        Some(scan())
    }

    fn connect(url: &str) -> DictResult<redis::Connection> {
        let conn = client(url)
            .map_err(backend)?
            .get_connection_with_timeout(Duration::from_secs(10))
            .map_err(backend)?;
        conn.set_read_timeout(Some(Duration::from_secs(60)))
            .map_err(backend)?;
        Ok(conn)
    }

    /// A direct connection to the node serving `key`'s slot.
    fn connection_for(&self, key: &str) -> DictResult<redis::Connection> {
        let Some(cluster) = &self.cluster else {
            return self.new_conn().map_err(backend);
        };
        let _ = cluster;
        let slot: i64 = self.cluster_call(|c| redis::cmd("CLUSTER").arg("KEYSLOT").arg(key).query(c))?;
        let ranges = self.slot_ranges()?;
        match ranges
            .into_iter()
            .find(|(start, end, _)| (*start..=*end).contains(&slot))
        {
            Some((_, _, url)) => Self::connect(&url),
            None => Err(DictError::Backend(format!("no cluster node serves slot {slot}"))),
        }
    }

    /// Runs `f` on a connection to the node of `key`'s slot, kept for the next
    /// call with the same hash tag (a cluster) or taken from the pool (one server).
    fn on_node_of<T>(
        &self,
        key: &str,
        mut f: impl FnMut(&mut redis::Connection) -> redis::RedisResult<T>,
    ) -> DictResult<T> {
        if self.cluster.is_none() {
            return self.with_conn(f);
        }
        let tag = hash_tag(key).to_string();
        let cached = self.tagged.lock().remove(&tag);
        let mut conn = match cached {
            Some(c) => c,
            None => self.connection_for(key)?,
        };
        let out = f(&mut conn).map_err(backend)?;
        self.tagged.lock().insert(tag, conn);
        Ok(out)
    }

    /// Connections to every node that serves slots (the one server if not a cluster).
    fn every_node(&self) -> DictResult<Vec<redis::Connection>> {
        let Some(cluster) = &self.cluster else {
            let url = self.single.lock().0.clone();
            return Ok(vec![Self::connect(&url)?]);
        };
        let _ = cluster;
        let ranges = self.slot_ranges()?;
        let mut urls: Vec<String> = ranges.into_iter().map(|(_, _, url)| url).collect();
        urls.sort();
        urls.dedup();
        urls.iter().map(|u| Self::connect(u)).collect()
    }

    /// A pipeline of `cmd key` for every key, routed by key in a cluster.
    fn pipelined<T: redis::FromRedisValue>(&self, cmd: &str, keys: &[String]) -> DictResult<Vec<T>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        match &self.cluster {
            Some(_) => {
                let mut pipe = redis::cluster::cluster_pipe();
                for k in keys {
                    pipe.cmd(cmd).arg(k);
                }
                self.cluster_call(|c| pipe.query(c))
            }
            None => self.with_conn(|c| {
                let mut pipe = redis::pipe();
                for k in keys {
                    pipe.cmd(cmd).arg(k);
                }
                pipe.query(c)
            }),
        }
    }
}

/// The part of a key that picks its cluster slot: the first non-empty `{tag}`,
/// else the whole key (Redis Cluster's rule).
fn hash_tag(key: &str) -> &str {
    if let Some(open) = key.find('{') {
        if let Some(len) = key[open + 1..].find('}') {
            if len > 0 {
                return &key[open + 1..open + 1 + len];
            }
        }
    }
    key
}

/// One node's keys matching `pattern` that `keep` keeps, a SCAN page at a time.
fn scan_node(
    conn: &mut redis::Connection,
    pattern: &str,
    keep: &dyn Fn(&str) -> bool,
    each: &mut dyn FnMut(Vec<String>) -> DictResult<()>,
) -> DictResult<()> {
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1000)
            .query(conn)
            .map_err(backend)?;
        let kept: Vec<String> = keys.into_iter().filter(|k| keep(k)).collect();
        if !kept.is_empty() {
            each(kept)?;
        }
        if next == 0 {
            return Ok(());
        }
        cursor = next;
    }
}

/// Redis Cluster's hash slots.
const SLOTS: usize = 16384;

/// Redis Cluster's slot of a key: CRC16-XMODEM of the key, or of its
/// `{hash tag}` when it has a non-empty one.
fn key_slot(key: &[u8]) -> u16 {
    let tagged = key.iter().position(|&b| b == b'{').and_then(|open| {
        let close = key[open + 1..].iter().position(|&b| b == b'}')?;
        (close > 0).then(|| &key[open + 1..open + 1 + close])
    });
    crc16::State::<crc16::XMODEM>::calculate(tagged.unwrap_or(key)) % SLOTS as u16
}

/// `prefix` with glob characters escaped, then `*`: a SCAN MATCH pattern.
fn prefix_pattern(prefix: &str) -> String {
    let mut out = String::with_capacity(prefix.len() + 2);
    for ch in prefix.chars() {
        if matches!(ch, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(ch);
    }
    out.push('*');
    out
}

impl Dict for RespDict {
    /// kvd says in `INFO persistence` how big its data directory's disk is;
    /// Redis cannot tell, nor can one node speak for a cluster.
    fn capacity(&self) -> DictResult<Option<(u64, u64)>> {
        if self.is_cluster() {
            return Ok(None);
        }
        let info = self.server_info("persistence")?;
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        match (field("kvd_disk_total_bytes"), field("kvd_disk_free_bytes")) {
            (Some(total), Some(free)) if total > 0 => Ok(Some((total, free))),
            _ => Ok(None),
        }
    }

    fn get(&self, key: &str) -> DictResult<Option<Bytes>> {
        self.run::<Option<Vec<u8>>>(redis::cmd("GET").arg(key))
            .map(|v| v.map(Bytes::from))
    }

    fn get_many(&self, keys: &[String]) -> DictResult<Vec<Option<Bytes>>> {
        let values: Vec<Option<Vec<u8>>> = self.pipelined("GET", keys)?;
        Ok(values.into_iter().map(|v| v.map(Bytes::from)).collect())
    }

    fn put_if_absent(&self, key: &str, value: Bytes) -> DictResult<()> {
        self.run::<Option<String>>(redis::cmd("SET").arg(key).arg(&value[..]).arg("NX"))
            .map(|_| ())
    }

    fn put_many_if_absent(&self, items: Vec<(String, Bytes)>) -> DictResult<()> {
        if items.is_empty() {
            return Ok(());
        }
        match &self.cluster {
            Some(_) => {
                let mut pipe = redis::cluster::cluster_pipe();
                for (k, v) in &items {
                    pipe.cmd("SET").arg(k).arg(&v[..]).arg("NX").ignore();
                }
                self.cluster_call(|c| pipe.query::<()>(c))
            }
            // Packed by hand: each value is copied once, into the packet (the
            // crate's pipeline copies it into a command and then again into
            // the packet), and the packet's memory is reused across calls.
            None => PACKET.with(|packet| {
                let mut packet = packet.borrow_mut();
                pack_set_nx(&items, &mut packet);
                let result = self.with_conn(|c| {
                    let replies = c.req_packed_commands(&packet, 0, items.len())?;
                    match replies.into_iter().find_map(|r| match r {
                        redis::Value::ServerError(e) => Some(e),
                        _ => None,
                    }) {
                        Some(e) => Err(e.into()),
                        None => Ok(()),
                    }
                });
                // A big packet is not kept past a round of bulk writing.
                if packet.capacity() > 64 << 20 {
                    *packet = Vec::new();
                }
                result
            }),
        }
    }

    fn delete(&self, key: &str) -> DictResult<()> {
        self.run::<i64>(redis::cmd("DEL").arg(key)).map(|_| ())
    }

    fn contains(&self, key: &str) -> DictResult<bool> {
        self.run::<i64>(redis::cmd("EXISTS").arg(key)).map(|n| n > 0)
    }

    fn compare_and_swap(&self, key: &str, expected: Option<&[u8]>, new: &[u8]) -> DictResult<bool> {
        let swap = |c: &mut redis::Connection| -> redis::RedisResult<bool> {
            // WATCH and GET in one round trip: the server runs them in order.
            let (current,): (Option<Vec<u8>>,) = redis::pipe()
                .cmd("WATCH")
                .arg(key)
                .ignore()
                .cmd("GET")
                .arg(key)
                .query(c)?;
            if current.as_deref() != expected {
                redis::cmd("UNWATCH").query::<()>(c)?;
                return Ok(false);
            }
            let result: Option<Vec<String>> = redis::pipe().atomic().cmd("SET").arg(key).arg(new).query(c)?;
            // EXEC answers nil when the watched key changed meanwhile.
            Ok(result.is_some())
        };
        if self.cluster.is_none() {
            return self.with_conn(swap);
        }
        // A slot can move between looking up its node and using it; the node then
        // answers MOVED, and the lookup is repeated.
        // A node that failed is retried the same way, through a fresh slot map,
        // until a failover has promoted its replica (see `cluster_call`).
        let deadline = std::time::Instant::now() + TRYAGAIN_FOR;
        let mut moves = 0;
        loop {
            let failure = match self.connection_for(key) {
                Ok(mut conn) => match swap(&mut conn) {
                    Ok(done) => return Ok(done),
                    Err(e) if e.redirect_node().is_some() && moves < 5 => {
                        moves += 1;
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                    // WATCH/GET/EXEC on a connection that broke: nothing was
                    // swapped unless EXEC ran, and an EXEC that ran and lost
                    // its reply is found out by the caller reading the root.
                    Err(e) if node_failed(&e) => backend(e),
                    Err(e) => return Err(backend(e)),
                },
                Err(e) => e,
            };
            if std::time::Instant::now() >= deadline {
                return Err(failure);
            }
            std::thread::sleep(Duration::from_millis(200));
            self.reconnect_cluster();
        }
    }

    fn scan_prefix(
        &self,
        prefix: &str,
        each: &mut dyn FnMut(Vec<String>) -> DictResult<()>,
    ) -> DictResult<()> {
        let pattern = prefix_pattern(prefix);
        if let Some(done) = self.scan_kvd_cluster(&pattern, each) {
            return done;
        }
        for mut conn in self.every_node()? {
            scan_node(&mut conn, &pattern, &|_| true, each)?;
        }
        Ok(())
    }

    fn sizes(&self, keys: &[String]) -> DictResult<Vec<Option<u64>>> {
        // STRLEN says 0 for a missing key; no stored value here is empty.
        let lengths: Vec<u64> = self.pipelined("STRLEN", keys)?;
        Ok(lengths.into_iter().map(|n| (n > 0).then_some(n)).collect())
    }

    fn delete_many(&self, keys: &[String]) -> DictResult<()> {
        self.pipelined::<i64>("DEL", keys).map(|_| ())
    }

    fn append(&self, key: &str, value: &[u8]) -> DictResult<()> {
        self.run::<i64>(redis::cmd("APPEND").arg(key).arg(value))
            .map(|_| ())
    }

    fn incr(&self, key: &str) -> DictResult<u64> {
        self.run(redis::cmd("INCR").arg(key))
    }

    fn put_expiring(&self, key: &str, value: &[u8], ttl: Duration, only_if_absent: bool) -> DictResult<bool> {
        let mut cmd = redis::cmd("SET");
        cmd.arg(key)
            .arg(value)
            .arg("PX")
            .arg(ttl.as_millis().max(1) as u64);
        if only_if_absent {
            cmd.arg("NX");
        }
        self.run::<Option<String>>(&cmd).map(|r| r.is_some())
    }

    fn read_and_append(&self, counter: &str, log: &str, record: &[u8], ttl: Duration) -> DictResult<u64> {
        let ms = ttl.as_millis().max(1) as u64;
        if self.replicated_kvd {
            // The lease protocol needs the order alone: the append, then the
            // read of the counter (docs/FORMAT.md, "Writers"). A kvd cluster
            // runs a MULTI over two keys as a transaction that locks both (2n
            // + 2 rounds), and every client's lease would wait on the lock
            // of the one epoch key: two requests of one round each instead.
            let _: (i64, i64) =
                self.with_conn(|c| lease_append(&mut redis::pipe(), log, record, ms).query(c))?;
            let value: Option<Vec<u8>> = self.with_conn(|c| redis::cmd("GET").arg(counter).query(c))?;
            return Ok(counter_value(value.as_deref()));
        }
        // The append comes first (the order the lease protocol needs, even
        // where a transaction runs command by command).
        let (_, _, value): (i64, i64, Option<Vec<u8>>) = self.on_node_of(log, |c| {
            lease_append(redis::pipe().atomic(), log, record, ms)
                .cmd("GET")
                .arg(counter)
                .query(c)
        })?;
        Ok(counter_value(value.as_deref()))
    }
}

/// `APPEND log record` and `PEXPIRE log ms` added to `pipe`: a lease's
/// append ([`Dict::read_and_append`]).
fn lease_append<'p>(
    pipe: &'p mut redis::Pipeline,
    log: &str,
    record: &[u8],
    ms: u64,
) -> &'p mut redis::Pipeline {
    pipe.cmd("APPEND")
        .arg(log)
        .arg(record)
        .cmd("PEXPIRE")
        .arg(log)
        .arg(ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The slots Redis Cluster's documentation gives, hash tags included.
    #[test]
    fn key_slots_match_redis_cluster() {
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"123456789"), 12739);
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
        // An empty tag is no tag: the whole key is hashed (Redis's examples).
        let whole = |k: &[u8]| crc16::State::<crc16::XMODEM>::calculate(k) % 16384;
        assert_eq!(key_slot(b"foo{}{bar}"), whole(b"foo{}{bar}"));
        // Only the first '{' counts, up to the first '}' after it.
        assert_eq!(key_slot(b"foo{{bar}}zap"), whole(b"{bar"));
        assert_eq!(key_slot(b"foo{bar}{zap}"), whole(b"bar"));
    }

    #[test]
    fn memory_cas_compares_exactly() {
        let d = MemoryDict::new();
        assert!(d.compare_and_swap("r", None, b"1").unwrap());
        assert!(!d.compare_and_swap("r", None, b"2").unwrap());
        assert!(!d.compare_and_swap("r", Some(b"0"), b"2").unwrap());
        assert!(d.compare_and_swap("r", Some(b"1"), b"2").unwrap());
        d.put_if_absent("b", Bytes::from_static(b"x")).unwrap();
        d.put_if_absent("b", Bytes::from_static(b"y")).unwrap();
        assert_eq!(d.get("b").unwrap().unwrap(), "x");
    }
}
