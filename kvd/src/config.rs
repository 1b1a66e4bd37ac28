//! Server settings: from the command line, a Redis-style config file, and
//! `CONFIG GET` / `CONFIG SET` at run time.
//!
//! The config file has Redis's format: one `name value` per line, `#` comments,
//! names as in `CONFIG GET`. Every name is one kvd acts on; an unknown name is an
//! error rather than silently ignored, so a copied redis.conf fails loudly.

use std::path::PathBuf;

use crate::protocol::Limits;

/// When written data is fsynced (Redis's `appendfsync`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fsync {
    /// Before a write is acknowledged: it survives power loss.
    Always = 0,
    /// Once a second in the background: at most about a second is lost on power
    /// loss; nothing on a process crash (data is in the OS before the reply).
    EverySec = 1,
    /// When the OS decides.
    No = 2,
}

impl Fsync {
    pub fn parse(s: &str) -> Option<Fsync> {
        match s.to_ascii_lowercase().as_str() {
            "always" => Some(Fsync::Always),
            "everysec" => Some(Fsync::EverySec),
            "no" => Some(Fsync::No),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Fsync::Always => "always",
            Fsync::EverySec => "everysec",
            Fsync::No => "no",
        }
    }

    pub(crate) fn from_u8(v: u8) -> Fsync {
        match v {
            0 => Fsync::Always,
            1 => Fsync::EverySec,
            _ => Fsync::No,
        }
    }
}

/// Current settings. Read often, written rarely (`CONFIG SET`), so it lives behind
/// an `RwLock` in [`crate::shared::Shared`].
#[derive(Clone, Debug)]
pub struct Config {
    pub bind: String,
    pub port: u16,
    pub requirepass: Option<String>,
    pub maxclients: usize,
    pub dir: PathBuf,
    /// Close clients idle for this many seconds (0: never), like Redis's `timeout`.
    pub timeout: u64,
    pub proto_max_bulk_len: i64,
    pub client_query_buffer_limit: usize,
    /// Per-subscriber queue of pending pub/sub messages; a subscriber that falls this
    /// far behind is disconnected (Redis's `client-output-buffer-limit pubsub`).
    pub pubsub_queue_limit: usize,
    /// Worker threads (start-up only). Redis serves commands on one thread and
    /// advises I/O threads only with cores to spare; kvd's default, half the
    /// cores, likewise leaves room for the clients (fsclient hashes and chunks on
    /// the same desktop) instead of competing with them for every core.
    pub threads: usize,
    /// `disk` (default: the log in `dir`) or `memory` (nothing persisted).
    pub storage: Storage,
    /// Redis's `appendfsync`: `always`, `everysec` (default) or `no`.
    pub appendfsync: Fsync,
    /// Size at which a log segment is sealed and a new one started.
    pub segment_size: u64,
    /// Percentage of dead bytes at which a sealed segment is compacted.
    pub compact_dead_percent: u8,
    /// Redis's `notify-keyspace-events`, as flags ([`crate::notify`]).
    pub notify_keyspace_events: u16,
    /// How many databases SELECT may choose from (Redis's `databases`, 16 by
    /// default). A cluster node has database 0 only.
    pub databases: usize,
    /// Redis's `latency-tracking`: per-command latency histograms for INFO
    /// latencystats.
    pub latency_tracking: bool,
    /// Redis's `latency-tracking-info-percentiles`.
    pub latency_tracking_info_percentiles: Vec<f64>,
    /// Redis's `tls-port` (0: no TLS) and the files it serves with
    /// ([`crate::tls`]).
    pub tls_port: u16,
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    pub tls_ca_cert_file: Option<PathBuf>,
    pub tls_auth_clients: TlsAuthClients,
    /// Redis's `tls-replication`: a replicated cluster's links between nodes
    /// run over TLS, each side showing its certificate
    /// (`tls-client-cert-file`/`tls-client-key-file`, else the server's).
    /// Redis's `tls-cluster` (its cluster bus over TLS) sets the same: kvd's
    /// peer links carry both.
    pub tls_replication: bool,
    pub tls_client_cert_file: Option<PathBuf>,
    pub tls_client_key_file: Option<PathBuf>,
}

/// Redis's `tls-auth-clients`: whether TLS clients must show a certificate
/// signed by `tls-ca-cert-file`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsAuthClients {
    Yes,
    No,
    Optional,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Storage {
    Disk,
    Memory,
}

impl Default for Config {
    fn default() -> Self {
        let limits = Limits::default();
        Config {
            bind: "127.0.0.1".into(),
            port: 7379,
            requirepass: None,
            maxclients: 10000,
            dir: PathBuf::from("."),
            timeout: 0,
            proto_max_bulk_len: limits.max_bulk_len,
            client_query_buffer_limit: limits.query_buffer_limit,
            pubsub_queue_limit: 10000,
            threads: std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1)),
            storage: Storage::Disk,
            appendfsync: Fsync::EverySec,
            segment_size: 64 * 1024 * 1024,
            compact_dead_percent: 50,
            notify_keyspace_events: 0,
            databases: 16,
            latency_tracking: true,
            latency_tracking_info_percentiles: vec![50.0, 99.0, 99.9],
            tls_port: 0,
            tls_cert_file: None,
            tls_key_file: None,
            tls_ca_cert_file: None,
            tls_auth_clients: TlsAuthClients::Yes,
            tls_replication: false,
            tls_client_cert_file: None,
            tls_client_key_file: None,
        }
    }
}

/// A `yes`/`no` setting as CONFIG GET prints it.
fn yes_no(on: bool) -> String {
    if on { "yes" } else { "no" }.into()
}

/// A `yes`/`no` setting (any case), with Redis's error text otherwise.
fn parse_yes_no(value: &str) -> Result<bool, String> {
    match value.to_ascii_lowercase().as_str() {
        "yes" => Ok(true),
        "no" => Ok(false),
        _ => Err("argument must be 'yes' or 'no'".into()),
    }
}

fn path_text(p: &Option<PathBuf>) -> String {
    p.as_ref().map(|p| p.display().to_string()).unwrap_or_default()
}

fn path_setting(value: &str) -> Option<PathBuf> {
    (!value.is_empty()).then(|| PathBuf::from(value))
}

/// Names `CONFIG GET` answers, in the order it lists them.
pub const NAMES: &[&str] = &[
    "bind",
    "port",
    "requirepass",
    "maxclients",
    "dir",
    "timeout",
    "proto-max-bulk-len",
    "client-query-buffer-limit",
    "pubsub-queue-limit",
    "threads",
    "storage",
    "appendfsync",
    "segment-size",
    "compact-dead-percent",
    "notify-keyspace-events",
    "latency-tracking",
    "latency-tracking-info-percentiles",
    "databases",
    "tls-port",
    "tls-cert-file",
    "tls-key-file",
    "tls-ca-cert-file",
    "tls-auth-clients",
    "tls-replication",
    "tls-cluster",
    "tls-client-cert-file",
    "tls-client-key-file",
    // Read-only facts clients such as redis-benchmark ask about: kvd writes no RDB
    // snapshots and no AOF.
    "save",
    "appendonly",
];

impl Config {
    pub fn limits(&self) -> Limits {
        Limits {
            max_bulk_len: self.proto_max_bulk_len,
            query_buffer_limit: self.client_query_buffer_limit,
        }
    }

    pub fn get(&self, name: &str) -> Option<String> {
        Some(match name {
            "bind" => self.bind.clone(),
            "port" => self.port.to_string(),
            "requirepass" => self.requirepass.clone().unwrap_or_default(),
            "maxclients" => self.maxclients.to_string(),
            "dir" => std::fs::canonicalize(&self.dir)
                .unwrap_or_else(|_| self.dir.clone())
                .display()
                .to_string(),
            "timeout" => self.timeout.to_string(),
            "proto-max-bulk-len" => self.proto_max_bulk_len.to_string(),
            "client-query-buffer-limit" => self.client_query_buffer_limit.to_string(),
            "pubsub-queue-limit" => self.pubsub_queue_limit.to_string(),
            "threads" => self.threads.to_string(),
            "storage" => match self.storage {
                Storage::Disk => "disk".into(),
                Storage::Memory => "memory".into(),
            },
            "appendfsync" => self.appendfsync.name().into(),
            "segment-size" => self.segment_size.to_string(),
            "compact-dead-percent" => self.compact_dead_percent.to_string(),
            "notify-keyspace-events" => crate::notify::format(self.notify_keyspace_events),
            "save" => String::new(),
            "appendonly" => if self.storage == Storage::Disk {
                "yes"
            } else {
                "no"
            }
            .into(),
            "databases" => self.databases.to_string(),
            "tls-port" => self.tls_port.to_string(),
            "tls-cert-file" => path_text(&self.tls_cert_file),
            "tls-key-file" => path_text(&self.tls_key_file),
            "tls-ca-cert-file" => path_text(&self.tls_ca_cert_file),
            "tls-auth-clients" => match self.tls_auth_clients {
                TlsAuthClients::Yes => "yes",
                TlsAuthClients::No => "no",
                TlsAuthClients::Optional => "optional",
            }
            .into(),
            "tls-replication" | "tls-cluster" => yes_no(self.tls_replication),
            "tls-client-cert-file" => path_text(&self.tls_client_cert_file),
            "tls-client-key-file" => path_text(&self.tls_client_key_file),
            "latency-tracking" => yes_no(self.latency_tracking),
            "latency-tracking-info-percentiles" => self
                .latency_tracking_info_percentiles
                .iter()
                .map(|p| crate::latency::format_percentile(*p))
                .collect::<Vec<_>>()
                .join(" "),
            _ => return None,
        })
    }

    /// Sets one setting. `at_runtime` refuses the ones that only apply at start-up.
    /// The error is the text after `ERR` that `CONFIG SET` reports.
    pub fn set(&mut self, name: &str, value: &str, at_runtime: bool) -> Result<(), String> {
        let bad = |why: &str| format!("argument couldn't be parsed into an integer{why}");
        match name {
            "requirepass" => self.requirepass = (!value.is_empty()).then(|| value.to_string()),
            "maxclients" => self.maxclients = parse_size(value).ok_or_else(|| bad(""))? as usize,
            "timeout" => self.timeout = value.parse().map_err(|_| bad(""))?,
            "proto-max-bulk-len" => {
                let n = parse_size(value).ok_or_else(|| bad(""))?;
                if n < 1024 * 1024 {
                    return Err("argument must be between 1048576 and 9223372036854775807 inclusive".into());
                }
                self.proto_max_bulk_len = n as i64;
            }
            "client-query-buffer-limit" => {
                let n = parse_size(value).ok_or_else(|| bad(""))?;
                if n < 1024 * 1024 {
                    return Err("argument must be between 1048576 and 9223372036854775807 inclusive".into());
                }
                self.client_query_buffer_limit = n as usize;
            }
            "pubsub-queue-limit" => {
                self.pubsub_queue_limit = parse_size(value).ok_or_else(|| bad(""))?.max(1) as usize
            }
            "appendfsync" => {
                self.appendfsync = Fsync::parse(value).ok_or_else(|| {
                    "argument(s) must be one of the following: always, everysec, no".to_string()
                })?
            }
            "compact-dead-percent" => {
                self.compact_dead_percent = value
                    .parse()
                    .ok()
                    .filter(|&n: &u8| (1..=100).contains(&n))
                    .ok_or_else(|| "argument must be between 1 and 100 inclusive".to_string())?
            }
            "notify-keyspace-events" => {
                self.notify_keyspace_events = crate::notify::parse(value)
                    .ok_or_else(|| "Invalid event class character. Use 'Ag$lshzxeKEtmdn'.".to_string())?
            }
            "latency-tracking" => self.latency_tracking = parse_yes_no(value)?,
            "latency-tracking-info-percentiles" => {
                self.latency_tracking_info_percentiles =
                    crate::latency::parse_percentiles(value).ok_or_else(|| {
                        "latency-tracking-info-percentiles parameters should sit between [0.0,100.0]"
                            .to_string()
                    })?
            }
            "bind"
            | "port"
            | "dir"
            | "threads"
            | "storage"
            | "segment-size"
            | "databases"
            | "tls-port"
            | "tls-cert-file"
            | "tls-key-file"
            | "tls-ca-cert-file"
            | "tls-auth-clients"
            | "tls-replication"
            | "tls-cluster"
            | "tls-client-cert-file"
            | "tls-client-key-file"
                if at_runtime =>
            {
                return Err("can't set immutable config".into())
            }
            "tls-port" => self.tls_port = value.parse().map_err(|_| bad(""))?,
            "tls-cert-file" => self.tls_cert_file = path_setting(value),
            "tls-key-file" => self.tls_key_file = path_setting(value),
            "tls-ca-cert-file" => self.tls_ca_cert_file = path_setting(value),
            "tls-client-cert-file" => self.tls_client_cert_file = path_setting(value),
            "tls-client-key-file" => self.tls_client_key_file = path_setting(value),
            "tls-replication" | "tls-cluster" => self.tls_replication = parse_yes_no(value)?,
            "tls-auth-clients" => {
                self.tls_auth_clients = match value.to_ascii_lowercase().as_str() {
                    "yes" => TlsAuthClients::Yes,
                    "no" => TlsAuthClients::No,
                    "optional" => TlsAuthClients::Optional,
                    _ => return Err("argument(s) must be one of the following: no, yes, optional".into()),
                }
            }
            "threads" => {
                self.threads = value
                    .parse()
                    .ok()
                    .filter(|&n| (1..=1024).contains(&n))
                    .ok_or_else(|| "argument must be between 1 and 1024 inclusive".to_string())?
            }
            "bind" => self.bind = value.to_string(),
            "port" => self.port = value.parse().map_err(|_| bad(""))?,
            "dir" => self.dir = PathBuf::from(value),
            "storage" => {
                self.storage = match value.to_ascii_lowercase().as_str() {
                    "disk" => Storage::Disk,
                    "memory" => Storage::Memory,
                    _ => return Err("argument(s) must be one of the following: disk, memory".into()),
                }
            }
            "segment-size" => {
                let n = parse_size(value).ok_or_else(|| bad(""))?;
                if n < 4096 {
                    return Err("argument must be at least 4096".into());
                }
                self.segment_size = n;
            }
            "databases" => {
                self.databases = value
                    .parse()
                    .ok()
                    .filter(|&n| (1..=i32::MAX as usize).contains(&n))
                    .ok_or_else(|| "argument must be between 1 and 2147483647 inclusive".to_string())?
            }
            "save" | "appendonly" => return Err("can't set immutable config".into()),
            _ => return Err("Unknown option".into()),
        }
        Ok(())
    }

    /// Applies a Redis-style config file's text.
    pub fn load_file_text(&mut self, text: &str) -> Result<(), String> {
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let args = crate::protocol::split_args(line.as_bytes())
                .ok_or_else(|| format!("line {}: unbalanced quotes", n + 1))?;
            let [name, value] = args.as_slice() else {
                return Err(format!("line {}: expected 'name value', got '{line}'", n + 1));
            };
            let name = String::from_utf8_lossy(name).to_ascii_lowercase();
            let value = String::from_utf8_lossy(value);
            self.set(&name, &value, false)
                .map_err(|e| format!("line {}: '{name}': {e}", n + 1))?;
        }
        Ok(())
    }
}

/// Parses `123`, `10kb`, `64mb`, `1gb` (Redis's memtoull; `k` = 1000, `kb` = 1024).
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.to_ascii_lowercase();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let mul: u64 = match unit {
        "" | "b" => 1,
        "k" => 1000,
        "kb" => 1024,
        "m" => 1000 * 1000,
        "mb" => 1024 * 1024,
        "g" => 1000 * 1000 * 1000,
        "gb" => 1024 * 1024 * 1024,
        _ => return None,
    };
    num.parse::<u64>().ok()?.checked_mul(mul)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_file_sets_known_names_and_rejects_unknown_ones() {
        let mut c = Config::default();
        c.load_file_text("# comment\nport 7000\nproto-max-bulk-len 1mb\nrequirepass \"a b\"\n")
            .unwrap();
        assert_eq!(c.port, 7000);
        assert_eq!(c.proto_max_bulk_len, 1024 * 1024);
        assert_eq!(c.requirepass.as_deref(), Some("a b"));
        assert!(c.load_file_text("maxmemory 1gb\n").is_err());
        c.load_file_text("appendfsync always\nstorage memory\n").unwrap();
        assert_eq!(c.storage, Storage::Memory);
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512mb"), Some(512 * 1024 * 1024));
        assert_eq!(parse_size("1k"), Some(1000));
        assert_eq!(parse_size("x"), None);
    }
}
