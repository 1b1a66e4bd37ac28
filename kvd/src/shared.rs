//! State every connection shares: the databases, the settings, the clients,
//! pub/sub, statistics, and (in a cluster) the cluster's node. It lives below
//! the layers that use it — the network loop (`server`), the commands, the
//! cluster's replication engine — so they import it and it imports none of
//! them but their shared types.

use std::sync::Arc;
use std::time::Instant;

use parking_lot::RwLock;
use tokio_util::sync::CancellationToken;

use crate::clients::Clients;
use crate::config::Config;
use crate::pubsub::PubSub;
use crate::stats::Stats;

/// The Redis version kvd reports (HELLO, INFO). kvd follows Redis 7.0's command
/// semantics, and its tests compare against a Redis 7.0 server.
pub const REDIS_VERSION: &str = "7.0.15";

/// What the layers below the cluster engine ask of it. The engine
/// (`crate::replica::Replicas`) lives above this module and implements it;
/// the network loop holds the engine itself and hands it each request.
pub trait ClusterInfo: Send + Sync {
    /// The `kvd_*` lines of INFO cluster.
    fn info(&self) -> String;
}

/// State shared by every connection.
pub struct Shared {
    /// The databases of SELECT; a cluster node uses database 0 only.
    pub dbs: crate::databases::Databases,
    pub config: RwLock<Config>,
    pub config_file: Option<String>,
    pub clients: Clients,
    pub pubsub: PubSub,
    pub monitors: crate::monitor::Monitors,
    pub stats: Stats,
    pub started: Instant,
    pub run_id: String,
    /// Cancelled by SHUTDOWN or a signal; every task watches it.
    pub shutdown: CancellationToken,
    /// Set when this node is part of a cluster (`--cluster`).
    pub cluster: std::sync::OnceLock<Arc<dyn ClusterInfo>>,
}

impl Shared {
    pub fn new(config: Config, config_file: Option<String>, dbs: crate::databases::Databases) -> Arc<Shared> {
        use rand::Rng;
        let run_id: String = (0..40)
            .map(|_| format!("{:x}", rand::thread_rng().gen_range(0..16)))
            .collect();
        Arc::new(Shared {
            dbs,
            config: RwLock::new(config),
            config_file,
            clients: Clients::default(),
            pubsub: PubSub::default(),
            monitors: Default::default(),
            stats: Stats::new(),
            started: Instant::now(),
            run_id,
            shutdown: CancellationToken::new(),
            cluster: std::sync::OnceLock::new(),
        })
    }
}
