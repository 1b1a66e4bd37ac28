//! A mount's metrics for Prometheus (`fsclient mount --metrics-addr`): file
//! system operations by kind with their latency, bytes read and written,
//! commits (how many, how long, how many failed, how many merged another
//! client's changes), and the store side (blob cache hits and misses, bytes
//! waiting to be uploaded, upload rounds the store refused).
//!
//! The counters live here, below the layers that count (the FUSE adapter
//! times every request through [`Metrics::op`]; [`crate::vfs`] counts bytes
//! and commits); the store's own figures are read from
//! [`BlobStore::stats`](crate::store::BlobStore::stats) at each scrape.
//! Encoded by `prometheus-client` in the Prometheus text format.

use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::store::BlobStore;

type OpLabels = [(&'static str, &'static str); 1];

/// Latency buckets, in seconds: 10 µs to about 2.6 s.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_01, 4.0, 10))
}

pub struct Metrics {
    registry: Registry,
    ops: Family<OpLabels, Histogram, fn() -> Histogram>,
    read_bytes: Counter,
    written_bytes: Counter,
    commits: Counter,
    commits_failed: Counter,
    commits_merged: Counter,
    commit_seconds: Histogram,
}

impl Metrics {
    /// Metrics of a mount whose store is `store`.
    pub fn new(store: BlobStore) -> Metrics {
        let m = Metrics {
            registry: Registry::with_prefix("fsclient"),
            ops: Family::new_with_constructor(latency_histogram),
            read_bytes: Counter::default(),
            written_bytes: Counter::default(),
            commits: Counter::default(),
            commits_failed: Counter::default(),
            commits_merged: Counter::default(),
            commit_seconds: latency_histogram(),
        };
        let mut registry = m.registry;
        registry.register(
            "operation_seconds",
            "File system requests by kind (op) and how long each took",
            m.ops.clone(),
        );
        registry.register("read_bytes", "Bytes read through the mount", m.read_bytes.clone());
        registry.register(
            "written_bytes",
            "Bytes written through the mount",
            m.written_bytes.clone(),
        );
        registry.register("commits", "Commits that landed", m.commits.clone());
        registry.register(
            "commits_failed",
            "Commits that failed (the store refused or was away)",
            m.commits_failed.clone(),
        );
        registry.register(
            "commits_merged",
            "Commits that merged another client's changes",
            m.commits_merged.clone(),
        );
        registry.register(
            "commit_seconds",
            "How long commits took",
            m.commit_seconds.clone(),
        );
        registry.register_collector(Box::new(StoreFigures(store)));
        Metrics { registry, ..m }
    }

    /// One file system request of kind `op` that took `took`.
    pub fn op(&self, op: &'static str, took: Duration) {
        self.ops.get_or_create(&[("op", op)]).observe(took.as_secs_f64());
    }

    pub fn read(&self, bytes: usize) {
        self.read_bytes.inc_by(bytes as u64);
    }

    pub fn written(&self, bytes: usize) {
        self.written_bytes.inc_by(bytes as u64);
    }

    /// A commit attempt that took `took`: landed (`Ok(merged)`, whether it
    /// merged another client's changes) or failed.
    pub fn commit(&self, took: Duration, outcome: Result<bool, ()>) {
        self.commit_seconds.observe(took.as_secs_f64());
        match outcome {
            Ok(merged) => {
                self.commits.inc();
                if merged {
                    self.commits_merged.inc();
                }
            }
            Err(()) => {
                self.commits_failed.inc();
            }
        }
    }

    /// Everything, in the Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
            .expect("writing to a String");
        out
    }
}

/// The store's figures, read at each scrape.
struct StoreFigures(BlobStore);

impl std::fmt::Debug for StoreFigures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StoreFigures")
    }
}

impl Collector for StoreFigures {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = self.0.stats();
        for (name, help, value) in [
            ("cache_hits", "Blob reads the memory cache answered", s.cache_hits),
            (
                "cache_misses",
                "Blob reads that went to the store",
                s.cache_misses,
            ),
            (
                "upload_failures",
                "Upload rounds the store refused (sent again until stored)",
                s.upload_failures,
            ),
        ] {
            let c = ConstCounter::new(value);
            c.encode(encoder.encode_descriptor(name, help, None, c.metric_type())?)?;
        }
        for (name, help, value) in [
            (
                "uploads_pending_bytes",
                "Bytes handed to the uploader and not yet stored",
                s.uploads_pending_bytes as i64,
            ),
            (
                "uploads_failing",
                "1 while the store refuses uploads",
                i64::from(s.uploads_failing),
            ),
        ] {
            let g = ConstGauge::new(value);
            g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)?;
        }
        Ok(())
    }
}

/// Serves `metrics` at `http://addr/metrics` from a thread of its own; fails
/// if it cannot listen there.
pub fn serve(metrics: std::sync::Arc<Metrics>, addr: &str) -> std::io::Result<()> {
    let server = tiny_http::Server::http(addr)
        .map_err(|e| std::io::Error::other(format!("cannot listen on {addr} for metrics: {e}")))?;
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for request in server.incoming_requests() {
                let response = if request.url() == "/metrics" {
                    let content_type = tiny_http::Header::from_bytes(
                        &b"Content-Type"[..],
                        prometheus_client::encoding::prometheus_text::CONTENT_TYPE.as_bytes(),
                    )
                    .expect("a valid header");
                    tiny_http::Response::from_string(metrics.encode()).with_header(content_type)
                } else {
                    tiny_http::Response::from_string("fsclient serves /metrics only\n").with_status_code(404)
                };
                if let Err(e) = request.respond(response) {
                    tracing::debug!("metrics response not sent: {e}");
                }
            }
        })?;
    Ok(())
}
