//! `bench routed`: what a cluster-aware client gets from a replicated kvd
//! cluster against the Redis Cluster people would run for the same safety:
//! redis-benchmark `--cluster` (routed by slot) SET/GET, pipeline 1 and 16,
//! on 3 kvd nodes keeping every key on 3 (R = 3, the disk engine with
//! `appendfsync everysec`) and on a Redis Cluster of 3 masters with one
//! replica each (`appendonly yes`, `appendfsync everysec`). Not the same
//! promise: kvd answers a write once a majority of its replicas has it in
//! their logs; Redis Cluster answers once the master has it in memory and
//! replicates afterwards (a master that dies can take acknowledged writes
//! with it).

use anyhow::Result;
use protocol_tests::{require_redis, RedisCluster, Replicated};
use serde::Serialize;

use crate::redis_benchmark_args;

#[derive(Serialize)]
pub struct Row {
    test: String,
    pipeline: u32,
    /// kvd R = 3 ÷ Redis Cluster with one replica per master.
    kvd_vs_redis_cluster: crate::rounds::Compared,
}

#[derive(Serialize)]
pub struct Report {
    requests: u64,
    rows: Vec<Row>,
    note: String,
}

pub fn run(requests: u64, rounds: usize) -> Result<Report> {
    require_redis();
    let kvd = Replicated::start(3, 3);
    let redis = RedisCluster::start_replicated(3, &["--appendonly", "yes"])?;
    let ports = [kvd.ports[0], redis.nodes[0].port];
    let mut rows = Vec::new();
    for pipeline in [1u32, 16] {
        let n = requests * pipeline as u64;
        let runs = crate::rounds::run(2, rounds, |side| {
            redis_benchmark_args(ports[side], &["--cluster"], "set,get", n, pipeline)
        })?;
        for test in runs.tests() {
            let row = Row {
                test: test.clone(),
                pipeline,
                kvd_vs_redis_cluster: runs.compare(&test, 0, 1),
            };
            let c = &row.kvd_vs_redis_cluster;
            println!(
                "{:<4} P{:<3} kvd R=3 {:>9.0}  redis cluster 3+3 {:>9.0}  ratio {:.2}",
                row.test, pipeline, c.ours, c.peer, c.ratio
            );
            rows.push(row);
        }
    }
    Ok(Report {
        requests,
        rows,
        note: "All six Redis processes, the three kvd nodes and redis-benchmark share one 2-core \
               machine. kvd acknowledges a write after a majority of its 3 replicas logged it; \
               Redis Cluster after its master did, replicating afterwards."
            .into(),
    })
}
