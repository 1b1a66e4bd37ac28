//! INFO: the server's state in Redis's `field:value` sections, with Redis's field
//! names so monitoring tools and client libraries that parse INFO work.

use std::fmt::Write;
use std::sync::atomic::Ordering;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::shared::{Shared, REDIS_VERSION};

/// Every section, in Redis 7.0's order.
const SECTIONS: &[&str] = &[
    "server",
    "clients",
    "memory",
    "persistence",
    "stats",
    "replication",
    "cpu",
    "modules",
    "commandstats",
    "errorstats",
    "latencystats",
    "cluster",
    "keyspace",
];
/// Renders the requested sections (`default` when none are named; `all` and
/// `everything` for every section). Unknown names render nothing, as in Redis.
pub fn render(shared: &Shared, requested: &[String]) -> String {
    let wanted: Vec<&str> = if requested.iter().any(|s| s == "all" || s == "everything") {
        SECTIONS.to_vec()
    } else if requested.is_empty() || requested.iter().any(|s| s == "default") {
        // What `INFO` and `INFO default` show: all but the per-command
        // sections, as in Redis.
        SECTIONS
            .iter()
            .copied()
            .filter(|s| *s != "commandstats" && *s != "latencystats")
            .collect()
    } else {
        SECTIONS
            .iter()
            .copied()
            .filter(|s| requested.iter().any(|r| r == s))
            .collect()
    };
    let mut out = String::new();
    for section in wanted {
        let body = match section {
            "server" => server(shared),
            "clients" => clients(shared),
            "memory" => memory(shared),
            "persistence" => persistence(shared),
            "stats" => stats(shared),
            "replication" => replication(shared),
            "cpu" => cpu(),
            "modules" => String::new(),
            "commandstats" => shared.stats.commandstats(),
            "errorstats" => shared.stats.errorstats(),
            "latencystats" => {
                let percentiles = shared.config.read().latency_tracking_info_percentiles.clone();
                shared.stats.latencies.info(&percentiles)
            }
            "cluster" => match shared.cluster.get() {
                Some(r) => format!("cluster_enabled:1\r\n{}", r.info()),
                None => "cluster_enabled:0\r\n".to_string(),
            },
            "keyspace" => keyspace(shared),
            _ => continue,
        };
        if !out.is_empty() {
            out.push_str("\r\n");
        }
        let mut title = section.to_string();
        title[..1].make_ascii_uppercase();
        if section == "cpu" {
            title = "CPU".to_string();
        }
        let _ = write!(out, "# {title}\r\n{body}");
    }
    out
}

fn server(shared: &Shared) -> String {
    let uptime = shared.started.elapsed().as_secs();
    let now_us = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros())
        .unwrap_or(0);
    let exe = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let port = shared.config.read().port;
    format!(
        "redis_version:{REDIS_VERSION}\r\nkvd_version:{}\r\nredis_git_sha1:00000000\r\nredis_git_dirty:0\r\n\
         redis_build_id:0\r\nredis_mode:standalone\r\nos:{} {}\r\narch_bits:64\r\nmonotonic_clock:POSIX clock_gettime\r\n\
         multiplexing_api:epoll\r\natomicvar_api:c11-builtin\r\ngcc_version:0.0.0\r\nprocess_id:{}\r\n\
         process_supervised:no\r\nrun_id:{}\r\ntcp_port:{port}\r\nserver_time_usec:{now_us}\r\n\
         uptime_in_seconds:{uptime}\r\nuptime_in_days:{}\r\nhz:10\r\nconfigured_hz:10\r\nlru_clock:{}\r\n\
         executable:{exe}\r\nconfig_file:{}\r\nio_threads_active:0\r\n",
        env!("CARGO_PKG_VERSION"),
        std::env::consts::OS,
        std::env::consts::ARCH,
        std::process::id(),
        shared.run_id,
        uptime / 86400,
        (now_us / 1_000_000) as u64 & ((1 << 24) - 1),
        shared.config_file.as_deref().unwrap_or(""),
    )
}

fn clients(shared: &Shared) -> String {
    let config = shared.config.read();
    format!(
        "connected_clients:{}\r\ncluster_connections:0\r\nmaxclients:{}\r\nclient_recent_max_input_buffer:0\r\n\
         client_recent_max_output_buffer:0\r\nblocked_clients:0\r\ntracking_clients:0\r\nclients_in_timeout_table:0\r\n",
        shared.clients.len(),
        config.maxclients
    )
}

/// Resident set size in bytes, from /proc (0 where unavailable).
pub fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1).and_then(|p| p.parse::<u64>().ok()))
        .map_or(0, |pages| pages * 4096)
}

fn human(bytes: u64) -> String {
    let b = bytes as f64;
    if b < 1024.0 {
        format!("{bytes}B")
    } else if b < 1024.0 * 1024.0 {
        format!("{:.2}K", b / 1024.0)
    } else if b < 1024.0 * 1024.0 * 1024.0 {
        format!("{:.2}M", b / 1024.0 / 1024.0)
    } else {
        format!("{:.2}G", b / 1024.0 / 1024.0 / 1024.0)
    }
}

fn memory(shared: &Shared) -> String {
    let rss = rss_bytes();
    let dataset: u64 = shared
        .dbs
        .opened()
        .iter()
        .map(|(_, db)| db.store().used_bytes())
        .sum();
    let peak = shared.stats.peak_rss.fetch_max(rss, Ordering::Relaxed).max(rss);
    format!(
        "used_memory:{rss}\r\nused_memory_human:{}\r\nused_memory_rss:{rss}\r\nused_memory_rss_human:{}\r\n\
         used_memory_peak:{peak}\r\nused_memory_peak_human:{}\r\nused_memory_dataset:{dataset}\r\n\
         maxmemory:0\r\nmaxmemory_human:0B\r\nmaxmemory_policy:noeviction\r\nmem_allocator:libc\r\n",
        human(rss),
        human(rss),
        human(peak),
    )
}

fn persistence(shared: &Shared) -> String {
    let disk = shared.config.read().storage == crate::config::Storage::Disk;
    // Database 0's log: the others (SELECT) are smaller logs of the same engine
    // and settings, reported by the fields they share only through its status.
    let store = shared.dbs.zero().store().info();
    // kvd has one log and no snapshots: `rdb_last_bgsave_status` tells what
    // Redis's tells monitoring (whether the last attempt to persist worked),
    // from the same status as `aof_last_write_status`.
    let status = store
        .iter()
        .find(|(f, _)| *f == "aof_last_write_status")
        .map_or("ok", |(_, v)| v.as_str());
    let mut out = format!(
        "loading:0\r\nasync_loading:0\r\nrdb_changes_since_last_save:0\r\nrdb_bgsave_in_progress:0\r\n\
         rdb_last_save_time:0\r\nrdb_last_bgsave_status:{status}\r\naof_enabled:{}\r\naof_rewrite_in_progress:0\r\n",
        disk as u8
    );
    for (field, value) in store {
        let _ = write!(out, "{field}:{value}\r\n");
    }
    out
}

fn stats(shared: &Shared) -> String {
    let s = &shared.stats;
    let db = &shared.dbs.stats;
    format!(
        "total_connections_received:{}\r\ntotal_commands_processed:{}\r\ninstantaneous_ops_per_sec:{}\r\n\
         total_net_input_bytes:{}\r\ntotal_net_output_bytes:{}\r\nrejected_connections:{}\r\nexpired_keys:{}\r\n\
         evicted_keys:0\r\nkeyspace_hits:{}\r\nkeyspace_misses:{}\r\npubsub_channels:{}\r\npubsub_patterns:{}\r\n\
         total_error_replies:{}\r\nwatching_keys:{}\r\n",
        shared.clients.total_connections.load(Ordering::Relaxed),
        s.commands.load(Ordering::Relaxed),
        s.ops_per_sec.load(Ordering::Relaxed),
        s.net_input_bytes.load(Ordering::Relaxed),
        s.net_output_bytes.load(Ordering::Relaxed),
        shared.clients.rejected_connections.load(Ordering::Relaxed),
        db.expired.load(Ordering::Relaxed),
        db.hits.load(Ordering::Relaxed),
        db.misses.load(Ordering::Relaxed),
        shared.pubsub.channel_count(),
        shared.pubsub.numpat(),
        s.error_replies.load(Ordering::Relaxed),
        shared.dbs.opened().iter().map(|(_, db)| db.watched_keys()).sum::<usize>(),
    )
}

/// kvd has no master/replica pairs: a single node, and every node of a
/// cluster, is a master in Redis's sense (it takes writes for its slots), so
/// the Redis fields say `role:master` with no replicas attached. In a
/// replicated cluster each slot is held by R nodes as equals (leaderless
/// CASPaxos); that is reported by `kvd_replication` and INFO cluster, not as
/// Redis replicas, which would tell clients to send writes elsewhere.
fn replication(shared: &Shared) -> String {
    let mode = if shared.cluster.get().is_some() {
        "kvd_replication:leaderless (every slot on R equal nodes; see INFO cluster)\r\n"
    } else {
        "kvd_replication:none\r\n"
    };
    "role:master\r\nconnected_slaves:0\r\nmaster_failover_state:no-failover\r\n\
     master_replid:0000000000000000000000000000000000000000\r\n\
     master_replid2:0000000000000000000000000000000000000000\r\nmaster_repl_offset:0\r\n\
     second_repl_offset:-1\r\nrepl_backlog_active:0\r\nrepl_backlog_size:0\r\n\
     repl_backlog_first_byte_offset:0\r\nrepl_backlog_histlen:0\r\n"
        .to_string()
        + mode
}

fn cpu() -> String {
    // utime and stime are fields 14 and 15 of /proc/self/stat, in clock ticks
    // (100 per second on Linux).
    let (user, sys) = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            let after = s.rsplit_once(')')?.1.split_whitespace().collect::<Vec<_>>();
            Some((
                after.get(11)?.parse::<f64>().ok()?,
                after.get(12)?.parse::<f64>().ok()?,
            ))
        })
        .unwrap_or((0.0, 0.0));
    format!(
        "used_cpu_sys:{:.6}\r\nused_cpu_user:{:.6}\r\nused_cpu_sys_children:0.000000\r\nused_cpu_user_children:0.000000\r\n",
        sys / 100.0,
        user / 100.0
    )
}

fn keyspace(shared: &Shared) -> String {
    let mut out = String::new();
    for (i, db) in shared.dbs.opened() {
        let keys = db.len();
        if keys > 0 {
            let _ = write!(
                out,
                "db{i}:keys={keys},expires={},avg_ttl=0\r\n",
                db.store().expiring_len()
            );
        }
    }
    out
}
