//! Server-wide counters: what INFO `stats`, `commandstats` and `errorstats`
//! report, in Redis's field names and formats.
//!
//! The per-command table is built once, with a row of atomics for every
//! command and subcommand in the command table, so counting a call is a
//! lookup in an immutable map and a few relaxed additions: no lock on the
//! request path. Error replies are counted by their first word (`ERR`,
//! `WRONGTYPE`, ...) under a mutex, as errors are rare; like Redis, at most
//! [`MAX_ERROR_CODES`] distinct words are kept.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;

use crate::command::spec::{self, Spec};
use crate::reply::Reply;

/// Redis's `ERROR_STATS_NUMBER`: distinct error codes tracked at most.
const MAX_ERROR_CODES: usize = 128;

/// One command's `cmdstat_<name>` row.
#[derive(Default)]
pub struct CommandStat {
    calls: AtomicU64,
    usec: AtomicU64,
    rejected: AtomicU64,
    failed: AtomicU64,
}

#[derive(Default)]
pub struct Stats {
    pub commands: AtomicU64,
    pub error_replies: AtomicU64,
    pub net_input_bytes: AtomicU64,
    pub net_output_bytes: AtomicU64,
    pub ops_per_sec: AtomicU64,
    pub peak_rss: AtomicU64,
    per_command: HashMap<&'static str, CommandStat>,
    errors: Mutex<BTreeMap<String, u64>>,
    /// INFO latencystats, while `latency-tracking` is on.
    pub latencies: crate::latency::Latencies,
    pub latency_tracking: std::sync::atomic::AtomicBool,
}

/// How a command ended, for its row.
pub enum Outcome {
    /// Refused before it ran (arity, authentication, a MULTI refusal...):
    /// `rejected_calls`.
    Rejected,
    /// Ran, in this long; `failed_calls` too if it answered an error.
    Ran(Duration),
}

impl Stats {
    pub fn new() -> Stats {
        let per_command = spec::all_names().map(|n| (n, CommandStat::default())).collect();
        Stats {
            per_command,
            latency_tracking: std::sync::atomic::AtomicBool::new(true),
            ..Default::default()
        }
    }

    /// Counts one command (`spec`: `None` for an unknown command, which only
    /// its error counts) and its reply.
    pub fn record(&self, spec: Option<&'static Spec>, outcome: Outcome, reply: &Reply) {
        let failed = self.record_reply(reply);
        let Some((name, row)) = spec.and_then(|s| self.per_command.get_key_value(s.name)) else {
            return;
        };
        match outcome {
            Outcome::Rejected => {
                row.rejected.fetch_add(1, Ordering::Relaxed);
            }
            Outcome::Ran(took) => {
                row.calls.fetch_add(1, Ordering::Relaxed);
                row.usec.fetch_add(took.as_micros() as u64, Ordering::Relaxed);
                if self.latency_tracking.load(Ordering::Relaxed) {
                    self.latencies.record(name, took);
                }
                if failed {
                    row.failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// Counts an error reply by its first word; returns whether it was one.
    pub fn record_reply(&self, reply: &Reply) -> bool {
        let code: &[u8] = match reply {
            Reply::Error(text) => text.as_bytes(),
            Reply::Raw(frame) if frame.first() == Some(&b'-') => &frame[1..],
            _ => return false,
        };
        self.error_replies.fetch_add(1, Ordering::Relaxed);
        let end = code
            .iter()
            .position(|&b| b == b' ' || b == b'\r')
            .unwrap_or(code.len());
        let code = String::from_utf8_lossy(&code[..end]);
        let mut errors = self.errors.lock();
        if let Some(n) = errors.get_mut(code.as_ref()) {
            *n += 1;
        } else if errors.len() < MAX_ERROR_CODES {
            errors.insert(code.into_owned(), 1);
        }
        true
    }

    /// CONFIG RESETSTAT.
    pub fn reset(&self) {
        for c in [
            &self.commands,
            &self.error_replies,
            &self.net_input_bytes,
            &self.net_output_bytes,
            &self.ops_per_sec,
        ] {
            c.store(0, Ordering::Relaxed);
        }
        for row in self.per_command.values() {
            for c in [&row.calls, &row.usec, &row.rejected, &row.failed] {
                c.store(0, Ordering::Relaxed);
            }
        }
        self.errors.lock().clear();
        self.latencies.reset();
    }

    /// INFO commandstats: a row for every command used since the last reset,
    /// sorted by name as Redis's dictionary order is not.
    pub fn commandstats(&self) -> String {
        let mut rows: Vec<(&str, &CommandStat)> = self
            .per_command
            .iter()
            .filter(|(_, r)| r.calls.load(Ordering::Relaxed) + r.rejected.load(Ordering::Relaxed) > 0)
            .map(|(n, r)| (*n, r))
            .collect();
        rows.sort_by_key(|(n, _)| *n);
        let mut out = String::new();
        for (name, r) in rows {
            let (calls, usec) = (r.calls.load(Ordering::Relaxed), r.usec.load(Ordering::Relaxed));
            let per_call = if calls == 0 {
                0.0
            } else {
                usec as f64 / calls as f64
            };
            let _ = write!(
                out,
                "cmdstat_{name}:calls={calls},usec={usec},usec_per_call={per_call:.2},rejected_calls={},failed_calls={}\r\n",
                r.rejected.load(Ordering::Relaxed),
                r.failed.load(Ordering::Relaxed),
            );
        }
        out
    }

    /// INFO errorstats: `errorstat_<CODE>:count=<n>`.
    pub fn errorstats(&self) -> String {
        let mut out = String::new();
        for (code, n) in self.errors.lock().iter() {
            let _ = write!(out, "errorstat_{code}:count={n}\r\n");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_count_calls_failures_and_rejections_and_errors_by_code() {
        let stats = Stats::new();
        let get = spec::find("get");
        let sub = spec::find("client|list");
        stats.record(get, Outcome::Ran(Duration::from_micros(10)), &Reply::Nil);
        stats.record(
            get,
            Outcome::Ran(Duration::from_micros(20)),
            &Reply::error("WRONGTYPE x"),
        );
        stats.record(
            get,
            Outcome::Rejected,
            &Reply::error("ERR wrong number of arguments"),
        );
        stats.record(sub, Outcome::Ran(Duration::from_micros(3)), &Reply::OK);
        stats.record(
            None,
            Outcome::Rejected,
            &Reply::error_bytes(b"ERR unknown command '\xff'"),
        );
        assert_eq!(
            stats.commandstats(),
            "cmdstat_client|list:calls=1,usec=3,usec_per_call=3.00,rejected_calls=0,failed_calls=0\r\n\
             cmdstat_get:calls=2,usec=30,usec_per_call=15.00,rejected_calls=1,failed_calls=1\r\n"
        );
        assert_eq!(
            stats.errorstats(),
            "errorstat_ERR:count=2\r\nerrorstat_WRONGTYPE:count=1\r\n"
        );
        stats.reset();
        assert_eq!(stats.commandstats(), "");
        assert_eq!(stats.errorstats(), "");
    }
}
