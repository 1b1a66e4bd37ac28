//! `--metrics-addr`: kvd's state for Prometheus at `http://ADDR/metrics`.
//!
//! The numbers are INFO's, read at each scrape from the same text INFO
//! prints, so the two never disagree (the way redis_exporter reads Redis):
//! every numeric `field:value` of the server, clients, memory, persistence,
//! stats, replication, CPU and cluster sections becomes `kvd_<field>`
//! (monotonic ones counters, the rest gauges), commandstats and errorstats
//! become labelled counters, keyspace labelled gauges, and each command's
//! latency histogram (the one `INFO latencystats` reads) a Prometheus
//! histogram in seconds. Encoded by `prometheus-client` in the Prometheus
//! text format (0.0.4, which every scraper reads); served over HTTP by `tiny_http` on a thread of its own, so a
//! scrape never waits for or holds up a worker.

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::shared::Shared;

/// INFO fields that only grow: exported as counters (`kvd_<name>_total`,
/// without a `total_` prefix).
const COUNTERS: &[&str] = &[
    "total_connections_received",
    "total_commands_processed",
    "total_net_input_bytes",
    "total_net_output_bytes",
    "total_error_replies",
    "rejected_connections",
    "expired_keys",
    "evicted_keys",
    "keyspace_hits",
    "keyspace_misses",
    "used_cpu_sys",
    "used_cpu_user",
    "kvd_compactions",
    "kvd_commands_waited_for_moves",
    "kvd_tombstones_purged",
];

/// Numeric INFO fields that identify rather than measure: not exported.
const NOT_MEASURES: &[&str] = &[
    "redis_git_sha1",
    "redis_git_dirty",
    "redis_build_id",
    "arch_bits",
    "process_id",
    "process_supervised",
    "tcp_port",
    "server_time_usec",
    "uptime_in_days",
    "hz",
    "configured_hz",
    "lru_clock",
    "rdb_last_save_time",
    "master_replid",
    "master_replid2",
];

/// Sections whose numeric fields are exported one metric each.
const PLAIN_SECTIONS: &[&str] = &[
    "server",
    "clients",
    "memory",
    "persistence",
    "stats",
    "replication",
    "cpu",
    "cluster",
];

/// Upper bounds of the latency histograms' buckets, in seconds.
const LATENCY_BOUNDS: &[f64] = &[
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0,
];

/// Starts serving `/metrics` on `addr`; fails if it cannot listen there.
pub fn serve(shared: Arc<Shared>, addr: &str) -> std::io::Result<()> {
    let server = tiny_http::Server::http(addr)
        .map_err(|e| std::io::Error::other(format!("cannot listen on {addr} for metrics: {e}")))?;
    tracing::info!("metrics at http://{addr}/metrics");
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
                    tiny_http::Response::from_string(scrape(&shared)).with_header(content_type)
                } else {
                    tiny_http::Response::from_string("kvd serves /metrics only\n").with_status_code(404)
                };
                if let Err(e) = request.respond(response) {
                    tracing::debug!("metrics response not sent: {e}");
                }
            }
        })?;
    Ok(())
}

/// The metrics in the Prometheus text format.
pub fn scrape(shared: &Arc<Shared>) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Info(shared.clone())));
    let mut out = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut out, &registry).expect("writing to a String");
    out
}

/// Reads INFO at each scrape.
struct Info(Arc<Shared>);

impl std::fmt::Debug for Info {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Info")
    }
}

/// `name:value` lines of one INFO section.
fn fields(text: &str) -> impl Iterator<Item = (&str, &str)> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.trim_end_matches('\r').split_once(':'))
}

/// `a=1,b=2` into pairs.
fn pairs(value: &str) -> impl Iterator<Item = (&str, &str)> {
    value.split(',').filter_map(|kv| kv.split_once('='))
}

/// A metric name from an INFO field: `kvd_` first (once), and only the
/// characters Prometheus allows.
fn metric_name(field: &str) -> String {
    let clean: String = field
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if clean.starts_with("kvd_") {
        clean
    } else {
        format!("kvd_{clean}")
    }
}

fn counter(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: f64) -> std::fmt::Result {
    let c = ConstCounter::new(value);
    c.encode(encoder.encode_descriptor(name, help, None, c.metric_type())?)
}

fn gauge(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: f64) -> std::fmt::Result {
    let g = ConstGauge::new(value);
    g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)
}

/// One labelled family: `(label value, metric value)` per series.
fn family(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    label: &str,
    series: &[(String, f64)],
) -> std::fmt::Result {
    if series.is_empty() {
        return Ok(());
    }
    let mut metric = encoder.encode_descriptor(name, help, None, kind)?;
    for (value_of_label, v) in series {
        let labels = [(label, value_of_label.as_str())];
        let mut one = metric.encode_family(&labels)?;
        match kind {
            MetricType::Counter => ConstCounter::new(*v).encode(one)?,
            _ => one.encode_gauge(v)?,
        }
    }
    Ok(())
}

impl Collector for Info {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let shared = &self.0;
        for section in PLAIN_SECTIONS {
            let text = crate::command::info::render(shared, &[section.to_string()]);
            for (field, value) in fields(&text) {
                let Ok(v) = value.parse::<f64>() else { continue };
                if NOT_MEASURES.contains(&field) {
                    continue;
                }
                let help = format!("INFO {section} {field}");
                if COUNTERS.contains(&field) {
                    let name = metric_name(field.strip_prefix("total_").unwrap_or(field));
                    counter(&mut encoder, &name, &help, v)?;
                } else {
                    gauge(&mut encoder, &metric_name(field), &help, v)?;
                }
            }
        }

        // Per command: calls, time, failures and refusals (INFO commandstats).
        let text = crate::command::info::render(shared, &["commandstats".to_string()]);
        let (mut calls, mut seconds, mut failed, mut rejected) = (vec![], vec![], vec![], vec![]);
        for (field, value) in fields(&text) {
            let Some(cmd) = field.strip_prefix("cmdstat_") else {
                continue;
            };
            for (k, v) in pairs(value) {
                let Ok(v) = v.parse::<f64>() else { continue };
                let series = (cmd.to_string(), v);
                match k {
                    "calls" => calls.push(series),
                    "usec" => seconds.push((cmd.to_string(), v / 1e6)),
                    "failed_calls" => failed.push(series),
                    "rejected_calls" => rejected.push(series),
                    _ => {}
                }
            }
        }
        let c = MetricType::Counter;
        family(
            &mut encoder,
            "kvd_command_calls",
            "Calls per command",
            c,
            "cmd",
            &calls,
        )?;
        family(
            &mut encoder,
            "kvd_command_seconds",
            "Time spent per command",
            c,
            "cmd",
            &seconds,
        )?;
        family(
            &mut encoder,
            "kvd_command_failed_calls",
            "Calls that answered an error",
            c,
            "cmd",
            &failed,
        )?;
        family(
            &mut encoder,
            "kvd_command_rejected_calls",
            "Calls refused before running",
            c,
            "cmd",
            &rejected,
        )?;

        // Error replies by their first word (INFO errorstats).
        let text = crate::command::info::render(shared, &["errorstats".to_string()]);
        let errors: Vec<(String, f64)> = fields(&text)
            .filter_map(|(field, value)| {
                let prefix = field.strip_prefix("errorstat_")?;
                let count = pairs(value).find(|(k, _)| *k == "count")?.1.parse().ok()?;
                Some((prefix.to_string(), count))
            })
            .collect();
        family(
            &mut encoder,
            "kvd_errors",
            "Error replies by kind",
            c,
            "kind",
            &errors,
        )?;

        // Keys per database (INFO keyspace).
        let text = crate::command::info::render(shared, &["keyspace".to_string()]);
        let (mut keys, mut expiring) = (vec![], vec![]);
        for (field, value) in fields(&text) {
            let Some(db) = field.strip_prefix("db") else {
                continue;
            };
            for (k, v) in pairs(value) {
                let Ok(v) = v.parse::<f64>() else { continue };
                match k {
                    "keys" => keys.push((db.to_string(), v)),
                    "expires" => expiring.push((db.to_string(), v)),
                    _ => {}
                }
            }
        }
        let g = MetricType::Gauge;
        family(&mut encoder, "kvd_keys", "Keys per database", g, "db", &keys)?;
        family(
            &mut encoder,
            "kvd_expiring_keys",
            "Keys with a TTL per database",
            g,
            "db",
            &expiring,
        )?;

        // Latency per command: the histograms INFO latencystats reads, as
        // Prometheus buckets in seconds (the sum is count × mean: an HDR
        // histogram keeps no exact sum).
        let histograms = shared.stats.latencies.merged();
        if !histograms.is_empty() {
            let mut metric = encoder.encode_descriptor(
                "kvd_command_latency_seconds",
                "Command latency",
                None,
                MetricType::Histogram,
            )?;
            for (cmd, h) in histograms {
                let mut below = 0;
                let mut buckets = Vec::with_capacity(LATENCY_BOUNDS.len() + 1);
                for bound in LATENCY_BOUNDS {
                    let upto = h.count_between(0, (bound * 1e9) as u64);
                    buckets.push((*bound, upto - below));
                    below = upto;
                }
                buckets.push((f64::INFINITY, h.len() - below));
                let sum = h.mean() * h.len() as f64 / 1e9;
                let labels = [("cmd", cmd)];
                metric
                    .encode_family(&labels)?
                    .encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                        sum,
                        h.len(),
                        &buckets,
                        None,
                    )?;
            }
        }
        Ok(())
    }
}
