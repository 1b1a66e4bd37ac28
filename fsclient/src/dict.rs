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

/// A RESP store reached through the `redis` crate: kvd, redis-server, Valkey.
///
/// Connections are pooled (one per concurrent caller); a connection that
/// errors is dropped and a new one made on the next call, so a restarted server
/// is picked up. The root swap uses WATCH / GET / MULTI / SET / EXEC on one
/// dedicated connection, since WATCH state belongs to the connection.
pub struct RespDict {
    client: redis::Client,
    pool: Mutex<Vec<redis::Connection>>,
}

fn backend(e: redis::RedisError) -> DictError {
    DictError::Backend(e.to_string())
}

impl RespDict {
    /// Connects to `redis://[:password@]host:port[/db]` (or `rediss://` where
    /// the build has TLS).
    pub fn open(url: &str) -> DictResult<RespDict> {
        let client = redis::Client::open(url).map_err(backend)?;
        let dict = RespDict {
            client,
            pool: Mutex::new(Vec::new()),
        };
        // Fail early with a clear error if the store is not there.
        dict.with_conn(|c| redis::cmd("PING").query::<String>(c))?;
        Ok(dict)
    }

    fn with_conn<T>(&self, f: impl FnOnce(&mut redis::Connection) -> redis::RedisResult<T>) -> DictResult<T> {
        let pooled = self.pool.lock().pop();
        let mut conn = match pooled {
            Some(c) => c,
            None => {
                let c = self
                    .client
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
}

impl Dict for RespDict {
    fn get(&self, key: &str) -> DictResult<Option<Bytes>> {
        self.with_conn(|c| redis::cmd("GET").arg(key).query::<Option<Vec<u8>>>(c))
            .map(|v| v.map(Bytes::from))
    }

    fn get_many(&self, keys: &[String]) -> DictResult<Vec<Option<Bytes>>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        self.with_conn(|c| {
            let mut pipe = redis::pipe();
            for k in keys {
                pipe.cmd("GET").arg(k);
            }
            pipe.query::<Vec<Option<Vec<u8>>>>(c)
        })
        .map(|vs| vs.into_iter().map(|v| v.map(Bytes::from)).collect())
    }

    fn put_if_absent(&self, key: &str, value: Bytes) -> DictResult<()> {
        self.with_conn(|c| {
            redis::cmd("SET")
                .arg(key)
                .arg(&value[..])
                .arg("NX")
                .query::<Option<String>>(c)
        })
        .map(|_| ())
    }

    fn put_many_if_absent(&self, items: Vec<(String, Bytes)>) -> DictResult<()> {
        if items.is_empty() {
            return Ok(());
        }
        self.with_conn(|c| {
            let mut pipe = redis::pipe();
            for (k, v) in &items {
                pipe.cmd("SET").arg(k).arg(&v[..]).arg("NX").ignore();
            }
            pipe.query::<()>(c)
        })
    }

    fn delete(&self, key: &str) -> DictResult<()> {
        self.with_conn(|c| redis::cmd("DEL").arg(key).query::<i64>(c))
            .map(|_| ())
    }

    fn contains(&self, key: &str) -> DictResult<bool> {
        self.with_conn(|c| redis::cmd("EXISTS").arg(key).query::<i64>(c))
            .map(|n| n > 0)
    }

    fn compare_and_swap(&self, key: &str, expected: Option<&[u8]>, new: &[u8]) -> DictResult<bool> {
        self.with_conn(|c| {
            redis::cmd("WATCH").arg(key).query::<()>(c)?;
            let current: Option<Vec<u8>> = redis::cmd("GET").arg(key).query(c)?;
            if current.as_deref() != expected {
                redis::cmd("UNWATCH").query::<()>(c)?;
                return Ok(false);
            }
            let result: Option<Vec<String>> = redis::pipe().atomic().cmd("SET").arg(key).arg(new).query(c)?;
            // EXEC answers nil when the watched key changed meanwhile.
            Ok(result.is_some())
        })
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
