//! Per-command latency percentiles: INFO `latencystats`, as Redis 7 keeps them
//! (`latency-tracking yes`, `latency-tracking-info-percentiles "50 99 99.9"`).
//!
//! Like Redis, each command's latencies go into an HDR histogram of
//! nanoseconds from 1 ns to 1 s with two significant digits, and INFO prints
//! the chosen percentiles in microseconds with three decimals:
//! `latency_percentiles_usec_get:p50=1.003,p99=3.007,p99.9=11.007`.
//!
//! A command's histogram is made on its first call (most of the table is
//! never used), split in a few shards picked by thread, so worker threads
//! recording the same command rarely wait for each other; INFO merges them.

use std::collections::HashMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use hdrhistogram::Histogram;
use parking_lot::Mutex;

use crate::command::spec;

/// Redis's `LATENCY_HISTOGRAM_MIN_VALUE` / `MAX_VALUE` / `PRECISION`.
const LOWEST_NS: u64 = 1;
const HIGHEST_NS: u64 = 1_000_000_000;
const SIGNIFICANT_DIGITS: u8 = 2;
/// Histograms per command; a thread always records into the same one.
const SHARDS: usize = 4;

type Shards = Box<[Mutex<Histogram<u64>>]>;

pub struct Latencies {
    per_command: HashMap<&'static str, OnceLock<Shards>>,
}

impl Default for Latencies {
    fn default() -> Self {
        Latencies::new()
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(LOWEST_NS, HIGHEST_NS, SIGNIFICANT_DIGITS).expect("valid histogram bounds")
}

fn shard() -> usize {
    thread_local! {
        static SHARD: usize = {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS
        };
    }
    SHARD.with(|s| *s)
}

impl Latencies {
    pub fn new() -> Latencies {
        let per_command = spec::all_names().map(|n| (n, OnceLock::new())).collect();
        Latencies { per_command }
    }

    /// Records one call of `name` that took `took` (clamped to the histogram's range).
    pub fn record(&self, name: &str, took: Duration) {
        let Some(cell) = self.per_command.get(name) else {
            return;
        };
        let shards = cell.get_or_init(|| (0..SHARDS).map(|_| Mutex::new(histogram())).collect());
        let ns = (took.as_nanos() as u64).clamp(LOWEST_NS, HIGHEST_NS);
        shards[shard()].lock().saturating_record(ns);
    }

    /// CONFIG RESETSTAT.
    pub fn reset(&self) {
        for shards in self.per_command.values().filter_map(OnceLock::get) {
            for h in shards.iter() {
                h.lock().reset();
            }
        }
    }

    /// INFO latencystats: a line for every command called since the last
    /// reset, sorted by name, with `percentiles` (e.g. `[50.0, 99.0, 99.9]`).
    pub fn info(&self, percentiles: &[f64]) -> String {
        let mut out = String::new();
        for (name, h) in self.merged() {
            let _ = write!(out, "latency_percentiles_usec_{name}:");
            for (i, p) in percentiles.iter().enumerate() {
                let usec = h.value_at_quantile(p / 100.0) as f64 / 1000.0;
                let sep = if i == 0 { "" } else { "," };
                let _ = write!(out, "{sep}p{}={usec:.3}", format_percentile(*p));
            }
            out.push_str("\r\n");
        }
        out
    }
}

impl Latencies {
    /// Each command called since the last reset with its histogram (its
    /// shards merged; nanoseconds), sorted by name.
    pub fn merged(&self) -> Vec<(&'static str, Histogram<u64>)> {
        let mut rows: Vec<(&'static str, Histogram<u64>)> = Vec::new();
        for (name, cell) in &self.per_command {
            let Some(shards) = cell.get() else { continue };
            let mut merged = histogram();
            for h in shards.iter() {
                let _ = merged.add(&*h.lock());
            }
            if merged.is_empty() {
                continue;
            }
            rows.push((name, merged));
        }
        rows.sort_by_key(|(n, _)| *n);
        rows
    }
}

/// A percentile as Redis names it: `50`, `99.9` (`%f` with the zeros trimmed).
pub fn format_percentile(p: f64) -> String {
    let text = format!("{p:.6}");
    text.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// Parses `latency-tracking-info-percentiles`: numbers from 0 to 100,
/// space separated (none is allowed).
pub fn parse_percentiles(value: &str) -> Option<Vec<f64>> {
    value
        .split_whitespace()
        .map(|w| w.parse::<f64>().ok().filter(|p| (0.0..=100.0).contains(p)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_each_command_in_redis_format() {
        let l = Latencies::new();
        for us in 1..=100u64 {
            l.record("get", Duration::from_micros(us));
        }
        l.record("client|list", Duration::from_nanos(1500));
        l.record("no-such-command", Duration::from_micros(1));
        let info = l.info(&[50.0, 99.0, 99.9]);
        let lines: Vec<&str> = info.lines().collect();
        assert_eq!(lines.len(), 2, "{info}");
        assert_eq!(
            lines[0],
            "latency_percentiles_usec_client|list:p50=1.503,p99=1.503,p99.9=1.503"
        );
        // Two significant digits: 50 us is in the bucket ending at 50.175 us.
        assert!(
            lines[1].starts_with("latency_percentiles_usec_get:p50=50.175,p99=99.327,p99.9=100.351"),
            "{info}"
        );
        l.reset();
        assert_eq!(l.info(&[50.0]), "");
    }

    #[test]
    fn percentile_names_and_the_setting_parse_as_redis() {
        assert_eq!(format_percentile(50.0), "50");
        assert_eq!(format_percentile(99.9), "99.9");
        assert_eq!(format_percentile(99.99), "99.99");
        assert_eq!(parse_percentiles("50 99 99.9"), Some(vec![50.0, 99.0, 99.9]));
        assert_eq!(parse_percentiles(""), Some(vec![]));
        assert_eq!(parse_percentiles("101"), None);
        assert_eq!(parse_percentiles("x"), None);
    }
}
