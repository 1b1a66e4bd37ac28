//! `bench replication`: a 3-node replicated kvd with R = 1 and R = 3 in the
//! same run — SET throughput and latency (redis-benchmark), compare-and-swap
//! (WATCH/GET/MULTI/SET/EXEC) throughput and latency — and the longest pause in
//! acknowledged writes while a node is killed with SIGKILL.

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use protocol_tests::{Conn, Replicated, Value};
use serde::Serialize;

#[derive(Serialize)]
pub struct Report {
    rounds: usize,
    /// Each side's medians over the rounds (R = 1, then R = 3).
    rows: Vec<Row>,
    /// R = 3 ÷ R = 1, the median of the per-round ratios, every round kept.
    set_r3_over_r1: crate::rounds::Compared,
    cas_r3_over_r1: crate::rounds::Compared,
    failover: Failover,
    reconfigure: Reconfigure,
    catch_up: CatchUp,
    rehome: Rehome,
}

/// Adding a fourth node to a loaded 3-node cluster with `KVD.RECONFIGURE`.
#[derive(Serialize)]
struct Reconfigure {
    keys: u64,
    value_bytes: usize,
    slots_moved: u64,
    /// Membership versions the change went through (each moves at most
    /// 2,048 slots).
    steps: u64,
    keys_copied: u64,
    seconds: f64,
    copied_mb_per_s: f64,
    /// Eight writers through the three old nodes during the change.
    writes_acknowledged: u64,
    longest_write_pause_ms: f64,
}

/// A node of four (R = 3) killed for good under `--down-after 2s`: how long
/// until it is taken out and every slot has three copies again, and who sent
/// the copies.
#[derive(Serialize)]
struct Rehome {
    keys: u64,
    value_bytes: usize,
    /// Logical bytes on the lost node (its replicas' values).
    lost_node_mb: f64,
    /// From the kill until a node names it down (`kvd_replica_down_nodes`):
    /// the re-homing starts then.
    seconds_to_down: f64,
    /// From the kill until no slot is short of copies and no change is under way.
    seconds_to_three_copies: f64,
    /// Keys each surviving node installed on new holders.
    keys_copied_per_node: Vec<u64>,
    /// Copying time only (from "down" to three copies), per surviving node.
    mb_per_s_per_node: Vec<f64>,
}

#[derive(Serialize)]
struct Row {
    replicas: usize,
    set_rps: f64,
    set_p50_ms: f64,
    set_p99_ms: f64,
    cas_per_s: f64,
    cas_p50_ms: f64,
    cas_p99_ms: f64,
}

/// A node away while keys were written, back: how fast it caught up.
#[derive(Serialize)]
struct CatchUp {
    keys_written_while_away: u64,
    value_bytes: usize,
    /// Keys the node held already (the replicas agree on them: compared by
    /// header only).
    keys_held_before: u64,
    /// From its restart until it stores every key written while it was away.
    seconds: f64,
    keys_per_s: f64,
    mb_per_s: f64,
}

#[derive(Serialize)]
struct Failover {
    acknowledged_writes: u64,
    longest_pause_ms: f64,
}

/// redis-benchmark SET: (requests/s, p50 ms, p99 ms).
fn set_bench(port: u16, requests: u64) -> Result<(f64, f64, f64)> {
    let out = Command::new("redis-benchmark")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-t", "set"])
        // Random keys (-r): one key for every request would measure contention
        // on a single register, not replication.
        .args([
            "-d",
            "64",
            "-c",
            "50",
            "-r",
            "1000000",
            "-n",
            &requests.to_string(),
            "--csv",
        ])
        .output()
        .context("running redis-benchmark")?;
    let text = String::from_utf8_lossy(&out.stdout);
    for line in text.lines() {
        let f: Vec<&str> = line.split(',').map(|f| f.trim_matches('"')).collect();
        if f.len() >= 7 && f[0] == "SET" {
            return Ok((f[1].parse()?, f[4].parse()?, f[6].parse()?));
        }
    }
    bail!(
        "no SET row in redis-benchmark output: {text} (stderr: {})",
        String::from_utf8_lossy(&out.stderr).trim()
    )
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p) as usize].as_secs_f64() * 1e3
}

/// CAS increments on one key per client for `secs`: (per second, p50, p99).
fn cas_bench(ports: &[u16], clients: usize, secs: u64) -> Result<(f64, f64, f64)> {
    let stop = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = (0..clients)
        .map(|t| {
            let (stop, port) = (stop.clone(), ports[t % ports.len()]);
            std::thread::spawn(move || -> Result<Vec<Duration>> {
                let mut conn = Conn::connect(port)?;
                let key = format!("cas:{t}");
                let mut latencies = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let start = Instant::now();
                    conn.call(&["WATCH", &key])?;
                    let v = match conn.call(&["GET", &key])? {
                        Value::Nil => 0,
                        v => v.as_int().unwrap_or(0),
                    };
                    conn.cmd("MULTI")?;
                    conn.call(&["SET", &key, &(v + 1).to_string()])?;
                    if let Value::Array(_) = conn.cmd("EXEC")? {
                        latencies.push(start.elapsed());
                    }
                }
                Ok(latencies)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(secs));
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for t in threads {
        all.extend(t.join().expect("cas thread")?);
    }
    all.sort();
    Ok((
        all.len() as f64 / secs as f64,
        percentile(&all, 0.5),
        percentile(&all, 0.99),
    ))
}

/// Eight clients SETting keys of their own through `ports` until stopped,
/// keeping the longest time between any two acknowledged writes.
struct Writers {
    stop: Arc<AtomicBool>,
    longest: Arc<Mutex<Duration>>,
    threads: Vec<std::thread::JoinHandle<Result<u64>>>,
}

impl Writers {
    fn start(ports: &[u16]) -> Writers {
        let stop = Arc::new(AtomicBool::new(false));
        let last = Arc::new(Mutex::new(Instant::now()));
        let longest = Arc::new(Mutex::new(Duration::ZERO));
        let threads = (0..8)
            .map(|t| {
                let (stop, last, longest) = (stop.clone(), last.clone(), longest.clone());
                let port = ports[t % ports.len()];
                std::thread::spawn(move || -> Result<u64> {
                    let mut conn = Conn::connect(port)?;
                    let mut acked = 0;
                    while !stop.load(Ordering::Relaxed) {
                        let key = format!("f{t}:{acked}");
                        if !conn.call(&["SET", &key, "x"])?.is_error() {
                            acked += 1;
                            let now = Instant::now();
                            let mut l = last.lock().expect("lock");
                            let mut g = longest.lock().expect("lock");
                            *g = (*g).max(now - *l);
                            *l = now;
                        }
                    }
                    Ok(acked)
                })
            })
            .collect();
        Writers {
            stop,
            longest,
            threads,
        }
    }

    /// Stops them: how many writes were acknowledged, and the longest pause.
    fn finish(self) -> Result<(u64, Duration)> {
        self.stop.store(true, Ordering::Relaxed);
        let mut acknowledged = 0;
        for t in self.threads {
            acknowledged += t.join().expect("writer")?;
        }
        let longest = *self.longest.lock().expect("lock");
        Ok((acknowledged, longest))
    }
}

fn failover() -> Result<Failover> {
    let mut c = Replicated::start(3, 3);
    let writers = Writers::start(&[c.ports[0], c.ports[2]]);
    std::thread::sleep(Duration::from_secs(2));
    c.kill9(1);
    std::thread::sleep(Duration::from_secs(2));
    let (acknowledged, pause) = writers.finish()?;
    Ok(Failover {
        acknowledged_writes: acknowledged,
        longest_pause_ms: pause.as_secs_f64() * 1e3,
    })
}

/// Pipelined SETs of `prefix:i` for `i` below `n`.
fn load(conn: &mut Conn, prefix: &str, n: u64, value: &str) -> Result<()> {
    for start in (0..n).step_by(500) {
        let end = (start + 500).min(n);
        for i in start..end {
            conn.send(&["SET", &format!("{prefix}:{i}"), value])?;
        }
        for _ in start..end {
            let reply = conn.read_reply_raw()?;
            if reply != b"+OK\r\n" {
                bail!("SET: {}", String::from_utf8_lossy(&reply));
            }
        }
    }
    Ok(())
}

/// `held` keys on all three nodes; one is killed, `missed` keys of 4 KiB are
/// written, it is restarted: the time until it stores every one of them.
fn catch_up(held: u64, missed: u64) -> Result<CatchUp> {
    const VALUE: usize = 4096;
    let mut c = Replicated::start(3, 3);
    let mut conn = c.conn(0);
    load(&mut conn, "held", held, "x")?;
    c.kill9(2);
    load(&mut conn, "missed", missed, &"v".repeat(VALUE))?;
    c.restart(2);
    let back = Instant::now();
    loop {
        let Value::Array(keys) = c.conn(2).call(&["KEYS", "missed:*"])? else {
            bail!("KEYS answered something else");
        };
        if keys.len() as u64 >= missed {
            break;
        }
        if back.elapsed() > Duration::from_secs(600) {
            bail!(
                "the node back caught up on {} of {missed} keys in 10 minutes",
                keys.len()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let seconds = back.elapsed().as_secs_f64();
    Ok(CatchUp {
        keys_written_while_away: missed,
        value_bytes: VALUE,
        keys_held_before: held,
        seconds,
        keys_per_s: missed as f64 / seconds,
        mb_per_s: (missed * VALUE as u64) as f64 / seconds / 1e6,
    })
}

/// Four nodes, R = 3, `keys` keys of 4 KiB; node 3 killed for good.
fn rehome(keys: u64) -> Result<Rehome> {
    const VALUE: usize = 4096;
    let mut c = Replicated::start_with_args(4, 3, &["--down-after", "2s"]);
    let mut conn = c.conn(0);
    load(&mut conn, "k", keys, &"v".repeat(VALUE))?;
    let held = c.conn(3).cmd("DBSIZE")?.as_int().unwrap_or(0) as u64;
    let field = |c: &Replicated, i: usize, name: &str| -> Result<String> {
        let info = c.conn(i).cmd("INFO cluster")?.as_str();
        Ok(info
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:")))
            .unwrap_or("")
            .trim()
            .to_string())
    };
    let lost = c.addr(3);
    let copied_before: Vec<u64> = (0..3)
        .map(|i| field(&c, i, "kvd_reconfigure_keys_copied").map(|v| v.parse().unwrap_or(0)))
        .collect::<Result<_>>()?;
    c.kill9(3);
    let killed = Instant::now();
    let mut down = None;
    loop {
        for i in 0..3 {
            let named = field(&c, i, "kvd_replica_down_nodes")?;
            let members = field(&c, i, "kvd_replica_members")?;
            if down.is_none()
                && (named.split(',').any(|m| m == lost) || !members.split(',').any(|m| m == lost))
            {
                down = Some(killed.elapsed());
            }
        }
        let settled = (0..3).all(|i| {
            field(&c, i, "kvd_under_replicated_slots").is_ok_and(|v| v == "0")
                && field(&c, i, "kvd_replica_change_in_progress").is_ok_and(|v| v == "0")
                && field(&c, i, "kvd_replica_frozen_slots").is_ok_and(|v| v == "0")
        });
        if down.is_some() && settled {
            break;
        }
        if killed.elapsed() > Duration::from_secs(600) {
            bail!("the lost node's replicas were not re-homed within 10 minutes");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let total = killed.elapsed();
    let down = down.expect("set above");
    let copying = (total - down).as_secs_f64().max(1e-3);
    let keys_copied_per_node: Vec<u64> = (0..3)
        .map(|i| {
            field(&c, i, "kvd_reconfigure_keys_copied")
                .map(|v| v.parse::<u64>().unwrap_or(0) - copied_before[i])
        })
        .collect::<Result<_>>()?;
    Ok(Rehome {
        keys,
        value_bytes: VALUE,
        lost_node_mb: (held * VALUE as u64) as f64 / 1e6,
        seconds_to_down: down.as_secs_f64(),
        seconds_to_three_copies: total.as_secs_f64(),
        mb_per_s_per_node: keys_copied_per_node
            .iter()
            .map(|&k| (k * VALUE as u64) as f64 / copying / 1e6)
            .collect(),
        keys_copied_per_node,
    })
}

/// Loads about `keys` keys of 4 KiB into a 3-node R = 3 cluster, then times
/// adding a fourth node (the copy of every slot whose replicas change) while
/// eight writers go on, and keeps their longest pause.
fn reconfigure(keys: u64) -> Result<Reconfigure> {
    const VALUE: usize = 4096;
    let mut c = Replicated::start(3, 3);
    let out = Command::new("redis-benchmark")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &c.ports[0].to_string(),
            "-t",
            "set",
            "-q",
        ])
        .args(["-d", &VALUE.to_string(), "-c", "50", "-r", &keys.to_string()])
        .args(["-n", &(keys * 3).to_string()])
        .output()
        .context("running redis-benchmark")?;
    if !out.status.success() {
        bail!("redis-benchmark failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let new = c.add_node();
    let mut args: Vec<String> = vec!["KVD.RECONFIGURE".into()];
    args.extend((0..4).map(|i| c.addr(i)));
    let writers = Writers::start(&c.ports[..3]);
    std::thread::sleep(Duration::from_millis(500));
    let t = Instant::now();
    let reply = c.conn(0).call(&args)?;
    let seconds = t.elapsed().as_secs_f64();
    let (writes_acknowledged, pause) = writers.finish()?;
    if reply.is_error() {
        bail!("KVD.RECONFIGURE: {}", reply.as_str());
    }
    let info = c.conn(0).cmd("INFO cluster")?.as_str();
    let field = |name: &str| -> u64 {
        info.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    // Each old holder copies its share of the moving slots: count them all.
    let mut keys_copied = 0;
    for i in 0..=new {
        let info = c.conn(i).cmd("INFO cluster")?.as_str();
        keys_copied += info
            .lines()
            .find_map(|l| l.strip_prefix("kvd_reconfigure_keys_copied:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
    }
    Ok(Reconfigure {
        keys,
        value_bytes: VALUE,
        slots_moved: field("kvd_reconfigure_slots_moved"),
        steps: field("kvd_replica_config_version") - 1,
        keys_copied,
        seconds,
        writes_acknowledged,
        longest_write_pause_ms: pause.as_secs_f64() * 1e3,
        copied_mb_per_s: (keys_copied * VALUE as u64) as f64 / seconds / 1e6,
    })
}

pub fn run(requests: u64, rounds: usize) -> Result<Report> {
    // A fresh cluster for each side of each round (R = 1 or R = 3), so the
    // rounds alternate and only three nodes share the machine at a time: with
    // both clusters up, the idle one's background repair took enough CPU that
    // R = 3 writes missed the 1 s replica timeout and redis-benchmark stopped.
    let runs = crate::rounds::run(2, rounds, |side| {
        let c = Replicated::start(3, [1, 3][side]);
        let (set_rps, set_p50_ms, set_p99_ms) = set_bench(c.ports[0], requests)?;
        let (cas_per_s, cas_p50_ms, cas_p99_ms) = cas_bench(&c.ports, 12, 5)?;
        Ok(vec![
            ("set_rps".into(), set_rps),
            ("set_p50_ms".into(), set_p50_ms),
            ("set_p99_ms".into(), set_p99_ms),
            ("cas_per_s".into(), cas_per_s),
            ("cas_p50_ms".into(), cas_p50_ms),
            ("cas_p99_ms".into(), cas_p99_ms),
        ])
    })?;
    let median = |side: usize, figure: &str| runs.median_of(side, figure);
    let rows = [(0, 1), (1, 3)]
        .into_iter()
        .map(|(side, replicas)| Row {
            replicas,
            set_rps: median(side, "set_rps"),
            set_p50_ms: median(side, "set_p50_ms"),
            set_p99_ms: median(side, "set_p99_ms"),
            cas_per_s: median(side, "cas_per_s"),
            cas_p50_ms: median(side, "cas_p50_ms"),
            cas_p99_ms: median(side, "cas_p99_ms"),
        })
        .collect();
    let report = Report {
        rounds,
        rows,
        set_r3_over_r1: runs.compare("set_rps", 1, 0),
        cas_r3_over_r1: runs.compare("cas_per_s", 1, 0),
        failover: failover()?,
        reconfigure: reconfigure(20_000)?,
        catch_up: catch_up(20_000, 20_000)?,
        rehome: rehome(50_000)?,
    };
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(report)
}
