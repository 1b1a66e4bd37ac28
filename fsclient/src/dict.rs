//! The file system's only view of storage: a dictionary with one atomic
//! compare-and-swap.
//!
//! [`Dict`] has two backends: [`MemoryDict`] (for tests of the core) and
//! [`RespDict`] (production: kvd, redis-server, anything speaking RESP).

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;

#[derive(Debug, thiserror::Error)]
pub enum DictError {
    #[error("store unreachable or failed: {0}")]
    Backend(String),
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
}

/// An in-process dictionary, for unit tests.
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
    single: redis::Client,
    pool: Mutex<Vec<redis::Connection>>,
    cluster: Option<Mutex<redis::cluster::ClusterConnection>>,
}

fn backend(e: redis::RedisError) -> DictError {
    DictError::Backend(e.to_string())
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

impl RespDict {
    /// Connects to `redis://[[user]:password@]host:port[/db]`, or with TLS to
    /// `rediss://…` (the server's certificate is checked against the system's
    /// roots, or the file `SSL_CERT_FILE` names; `rediss://…/#insecure` skips
    /// the check, for self-signed test setups only).
    pub fn open(url: &str) -> DictResult<RespDict> {
        if url.starts_with("rediss://") {
            // rustls needs its cryptography chosen once per process; an error
            // means one was chosen already.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let single = redis::Client::open(url).map_err(backend)?;
        let mut dict = RespDict {
            url: url.to_string(),
            single,
            pool: Mutex::new(Vec::new()),
            cluster: None,
        };
        // Fail early with a clear error if the store is not there.
        let info: String = dict.with_conn(|c| redis::cmd("INFO").arg("cluster").query(c))?;
        if info.contains("cluster_enabled:1") {
            let client = redis::cluster::ClusterClient::new(vec![url]).map_err(backend)?;
            dict.cluster = Some(Mutex::new(client.get_connection().map_err(backend)?));
        }
        Ok(dict)
    }

    /// The server's `INFO <section>` text (of one node, for a cluster).
    pub fn server_info(&self, section: &str) -> DictResult<String> {
        self.with_conn(|c| redis::cmd("INFO").arg(section).query(c))
    }

    /// Whether the store is a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        self.cluster.is_some()
    }

    fn with_conn<T>(&self, f: impl FnOnce(&mut redis::Connection) -> redis::RedisResult<T>) -> DictResult<T> {
        let pooled = self.pool.lock().pop();
        let mut conn = match pooled {
            Some(c) => c,
            None => {
                let c = self
                    .single
                    .get_connection_with_timeout(Duration::from_secs(10))
                    .map_err(backend)?;
                c.set_read_timeout(Some(Duration::from_secs(60)))
                    .map_err(backend)?;
                c
            }
        };
        match f(&mut conn) {
            Ok(v) => {
                self.pool.lock().push(conn);
                Ok(v)
            }
            // The connection may be broken; do not reuse it.
            Err(e) => Err(backend(e)),
        }
    }

    /// Runs a keyed command on the right node: the pool for a single server, the
    /// cluster connection (which routes by key) for a cluster.
    fn run<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> DictResult<T> {
        match &self.cluster {
            Some(c) => cmd.query(&mut *c.lock()).map_err(backend),
            None => self.with_conn(|c| cmd.query(c)),
        }
    }

    /// A direct connection to the node serving `key`'s slot.
    fn connection_for(&self, key: &str) -> DictResult<redis::Connection> {
        let Some(cluster) = &self.cluster else {
            return self
                .single
                .get_connection_with_timeout(Duration::from_secs(10))
                .map_err(backend);
        };
        let mut c = cluster.lock();
        let slot: i64 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query(&mut *c)
            .map_err(backend)?;
        let ranges: Vec<redis::Value> = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query(&mut *c)
            .map_err(backend)?;
        drop(c);
        for range in ranges {
            let redis::Value::Array(parts) = range else {
                continue;
            };
            let num = |v: &redis::Value| match v {
                redis::Value::Int(n) => Some(*n),
                _ => None,
            };
            let (Some(start), Some(end)) = (parts.first().and_then(num), parts.get(1).and_then(num)) else {
                continue;
            };
            if slot < start || slot > end {
                continue;
            }
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
            let client = redis::Client::open(with_address(&self.url, &host, port as u16)).map_err(backend)?;
            return client
                .get_connection_with_timeout(Duration::from_secs(10))
                .map_err(backend);
        }
        Err(DictError::Backend(format!("no cluster node serves slot {slot}")))
    }
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
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let values: Vec<Option<Vec<u8>>> = match &self.cluster {
            Some(c) => {
                let mut pipe = redis::cluster::cluster_pipe();
                for k in keys {
                    pipe.cmd("GET").arg(k);
                }
                pipe.query(&mut c.lock()).map_err(backend)?
            }
            None => self.with_conn(|c| {
                let mut pipe = redis::pipe();
                for k in keys {
                    pipe.cmd("GET").arg(k);
                }
                pipe.query(c)
            })?,
        };
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
            Some(c) => {
                let mut pipe = redis::cluster::cluster_pipe();
                for (k, v) in &items {
                    pipe.cmd("SET").arg(k).arg(&v[..]).arg("NX").ignore();
                }
                pipe.query::<()>(&mut c.lock()).map_err(backend)
            }
            None => self.with_conn(|c| {
                let mut pipe = redis::pipe();
                for (k, v) in &items {
                    pipe.cmd("SET").arg(k).arg(&v[..]).arg("NX").ignore();
                }
                pipe.query::<()>(c)
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
            redis::cmd("WATCH").arg(key).query::<()>(c)?;
            let current: Option<Vec<u8>> = redis::cmd("GET").arg(key).query(c)?;
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
        let mut last = None;
        for _ in 0..5 {
            let mut conn = self.connection_for(key)?;
            match swap(&mut conn) {
                Ok(done) => return Ok(done),
                Err(e) if e.redirect_node().is_some() => {
                    last = Some(e);
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => return Err(backend(e)),
            }
        }
        Err(backend(last.expect("at least one attempt")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
