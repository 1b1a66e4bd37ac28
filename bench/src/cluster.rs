//! The kvd cluster against its peers, in one run: redis-benchmark GET/SET
//! through a 3-node kvd cluster — plain (one node, forwarding) and
//! `--cluster` (routed by slot) — against one kvd node and a 3-node Redis
//! Cluster on the same machine; and the placement simulation.

use std::time::Instant;

use anyhow::Result;
use protocol_tests::{require_redis, KvdCluster, RedisCluster, Server};
use serde::Serialize;

use crate::redis_benchmark_args;

#[derive(Serialize)]
pub struct Throughput {
    test: String,
    pipeline: u32,
    /// Medians over the rounds, requests/s.
    kvd_one_node: f64,
    kvd_cluster_forwarded: f64,
    kvd_cluster_direct: f64,
    redis_cluster_direct: f64,
    /// kvd routed ÷ Redis Cluster routed. Target ≥ 1.0.
    direct_vs_redis_cluster: crate::rounds::Compared,
    /// Forwarded through one node ÷ routed. Target ≥ 0.5.
    forwarded_vs_direct: crate::rounds::Compared,
}

#[derive(Serialize)]
pub struct Simulation {
    nodes: usize,
    join_moved_fraction: f64,
    leave_moved_fraction: f64,
    ideal_fraction: f64,
    max_over_mean_after_join: f64,
    max_over_mean_after_leave: f64,
    /// The best any placement can do: ⌈mean⌉ / mean.
    best_possible_max_over_mean: f64,
    seconds_to_compute: f64,
}

#[derive(Serialize)]
pub struct Report {
    throughput: Vec<Throughput>,
    simulation: Vec<Simulation>,
    note: String,
}

pub fn run(requests: u64, rounds: usize) -> Result<Report> {
    require_redis();
    let mut throughput = Vec::new();
    {
        let one = Server::kvd(&["--storage", "memory"])?;
        let kvd = KvdCluster::start(3, &["--storage", "memory"])?;
        let redis = RedisCluster::start(3)?;
        // The four setups, measured in turn within each round.
        let setups: [(u16, &[&str]); 4] = [
            (one.port, &[]),
            (kvd.nodes[0].port, &[]),
            (kvd.nodes[0].port, &["--cluster"]),
            (redis.nodes[0].port, &["--cluster"]),
        ];
        for pipeline in [1u32, 16] {
            let n = requests * pipeline as u64;
            let runs = crate::rounds::run(4, rounds, |side| {
                let (port, extra) = setups[side];
                redis_benchmark_args(port, extra, "set,get", n, pipeline)
            })?;
            for test in runs.tests() {
                let median = |side: usize| runs.median_of(side, &test);
                let row = Throughput {
                    test: test.clone(),
                    pipeline,
                    kvd_one_node: median(0),
                    kvd_cluster_forwarded: median(1),
                    kvd_cluster_direct: median(2),
                    redis_cluster_direct: median(3),
                    direct_vs_redis_cluster: runs.compare(&test, 2, 3),
                    forwarded_vs_direct: runs.compare(&test, 1, 2),
                };
                println!(
                    "{:<4} P{:<3} one kvd {:>9.0}  forwarded {:>9.0}  direct {:>9.0}  redis cluster {:>9.0}  direct/redis {:.2}  forwarded/direct {:.2}",
                    row.test,
                    pipeline,
                    row.kvd_one_node,
                    row.kvd_cluster_forwarded,
                    row.kvd_cluster_direct,
                    row.redis_cluster_direct,
                    row.direct_vs_redis_cluster.ratio,
                    row.forwarded_vs_direct.ratio
                );
                throughput.push(row);
            }
        }
    }
    let mut simulation = Vec::new();
    for n in [3usize, 10, 100, 1000, 10_000] {
        let t = Instant::now();
        let (join, leave) = kvd::cluster::ring::simulate(n);
        let mean = 16384.0 / n as f64;
        let s = Simulation {
            nodes: n,
            join_moved_fraction: join.moved_fraction,
            leave_moved_fraction: leave.moved_fraction,
            ideal_fraction: 1.0 / (n + 1) as f64,
            max_over_mean_after_join: join.max_over_mean,
            max_over_mean_after_leave: leave.max_over_mean,
            best_possible_max_over_mean: mean.ceil() / mean,
            seconds_to_compute: t.elapsed().as_secs_f64() / 3.0,
        };
        println!(
            "sim {:>6} nodes: join moves {:.4} (ideal {:.4}), leave {:.4}; max/mean {:.3} / {:.3} (best possible {:.3}); {:.2} s per map",
            n,
            s.join_moved_fraction,
            s.ideal_fraction,
            s.leave_moved_fraction,
            s.max_over_mean_after_join,
            s.max_over_mean_after_leave,
            s.best_possible_max_over_mean,
            s.seconds_to_compute
        );
        simulation.push(s);
    }
    Ok(Report {
        throughput,
        simulation,
        note: "All servers and redis-benchmark share one 2-core machine, so a cluster of 3 is \
               not faster than one node here; the ratios compare like with like. kvd nodes use \
               the memory engine, Redis Cluster nodes no persistence."
            .into(),
    })
}
