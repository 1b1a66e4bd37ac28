//! The `kvd` binary: parse settings, start the server, stop cleanly on SIGINT,
//! SIGTERM or SHUTDOWN.

use std::path::PathBuf;

use clap::Parser;
use kvd::config::Config;

/// kvd — a Redis-protocol keystore server, the storage layer of dictfs.
///
/// Start it and talk to it with redis-cli, redis-benchmark or any Redis client:
///
///     kvd --port 7379 &
///     redis-cli -p 7379 set greeting hello
///
/// Settings come from the command line and from an optional Redis-style config
/// file (`name value` per line, the names CONFIG GET shows); the command line wins.
#[derive(Parser, Debug)]
#[command(version, about, long_about, verbatim_doc_comment)]
struct Cli {
    /// Config file with one `name value` per line (Redis's format).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Serve Prometheus metrics at http://HOST:PORT/metrics: INFO's numbers,
    /// per-command calls, errors and latency histograms (docs/OPERATIONS.md).
    #[arg(long, value_name = "HOST:PORT")]
    metrics_addr: Option<String>,
    /// Addresses to listen on, space separated. Keep the loopback default unless
    /// you also set --requirepass.
    #[arg(long)]
    bind: Option<String>,
    /// TCP port (7379 by default, so kvd never clashes with a local Redis on 6379).
    #[arg(long)]
    port: Option<u16>,
    /// Also serve clients over TLS on this port (Redis's `tls-port`; needs
    /// --tls-cert-file and --tls-key-file). `--port 0` leaves only TLS.
    #[arg(long, value_name = "PORT")]
    tls_port: Option<u16>,
    /// The server's certificate chain (PEM).
    #[arg(long, value_name = "FILE")]
    tls_cert_file: Option<PathBuf>,
    /// The server's private key (PEM).
    #[arg(long, value_name = "FILE")]
    tls_key_file: Option<PathBuf>,
    /// CA certificates (PEM) that client certificates must be signed by.
    #[arg(long, value_name = "FILE")]
    tls_ca_cert_file: Option<PathBuf>,
    /// With --tls-ca-cert-file: `yes` (the default, as Redis) requires a
    /// client certificate, `optional` checks one if offered, `no` never asks.
    #[arg(long, value_name = "yes|no|optional")]
    tls_auth_clients: Option<String>,
    /// `yes`: a replicated cluster's links between nodes run over TLS (each
    /// node's address is then its --tls-port; needs --tls-ca-cert-file).
    #[arg(long, value_name = "yes|no")]
    tls_replication: Option<String>,
    /// The same as --tls-replication, by Redis Cluster's name for it (kvd's
    /// links between nodes carry what Redis's cluster bus and replication do).
    #[arg(long, value_name = "yes|no")]
    tls_cluster: Option<String>,
    /// The certificate (PEM) a node shows its peers (else --tls-cert-file).
    #[arg(long, value_name = "FILE")]
    tls_client_cert_file: Option<PathBuf>,
    /// Its private key (PEM) (else --tls-key-file).
    #[arg(long, value_name = "FILE")]
    tls_client_key_file: Option<PathBuf>,
    /// Password clients must give with AUTH or HELLO ... AUTH.
    #[arg(long, env = "KVD_REQUIREPASS", hide_env_values = true)]
    requirepass: Option<String>,
    /// Most clients connected at once; more are refused with Redis's error.
    #[arg(long)]
    maxclients: Option<usize>,
    /// Data directory.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Databases SELECT may choose from (16 by default, as Redis). Database 0
    /// is the data directory; database N lives in <dir>/db<N>/, created on
    /// first use. A cluster node keeps database 0 only.
    #[arg(long)]
    databases: Option<usize>,
    /// Close clients idle for this many seconds (0: never).
    #[arg(long)]
    timeout: Option<u64>,
    /// Worker threads serving connections. Default: half the CPU cores (at least
    /// one), leaving the rest to the clients that usually share the machine.
    #[arg(long)]
    threads: Option<usize>,
    /// Storage engine: `disk` (an append-only log in --dir) or `memory` (nothing
    /// persisted).
    #[arg(long, value_name = "ENGINE")]
    storage: Option<String>,
    /// When writes reach the disk, as in Redis: `always` (before the reply:
    /// survives power loss), `everysec` (default: at most ~1 s lost on power
    /// loss, nothing on a crash), `no` (the OS decides).
    #[arg(long, value_name = "POLICY")]
    appendfsync: Option<String>,
    /// Size at which a log segment is sealed and a new one started, e.g. 64mb.
    #[arg(long, value_name = "SIZE")]
    segment_size: Option<String>,
    /// Largest bulk string a request may carry (Redis's proto-max-bulk-len), e.g. 512mb.
    #[arg(long, value_name = "SIZE")]
    proto_max_bulk_len: Option<String>,
    /// Run as a cluster node: every key on --replicas nodes, each change a
    /// CASPaxos round on the key's replicas, so a key stays readable and
    /// writable while a majority of its replicas is up. On its first start a
    /// node founds a new cluster (alone, or with --peers), or asks to be added
    /// through --seed; after that its membership is kept in --dir.
    #[arg(long)]
    cluster: bool,
    /// A member of the cluster to ask to be added by, as HOST:PORT (its client
    /// port): for a new node, or one taken out while it was away. Repeat or
    /// comma-separate. (A Redis-style HOST:PORT@BUSPORT is read as HOST:PORT.)
    #[arg(long, value_name = "HOST:PORT", value_delimiter = ',')]
    seed: Vec<String>,
    /// Shared secret of the cluster: peers prove they know it before they may
    /// forward, vote or copy data. Required with --cluster.
    #[arg(long, env = "KVD_CLUSTER_SECRET", hide_env_values = true)]
    cluster_secret: Option<String>,
    /// HOST:PORT other nodes and clients should use for this node (default:
    /// the first --bind address and --port).
    #[arg(long, value_name = "HOST:PORT")]
    cluster_announce: Option<String>,
    /// How many nodes keep each key (with fewer nodes than R, every node keeps
    /// every key). Implies --cluster.
    #[arg(long, value_name = "R")]
    replicas: Option<usize>,
    /// How long a member may not answer before it counts as gone for good and
    /// its replicas are re-homed on the live nodes (when they can hold R
    /// copies), e.g. 10m, 90s. Until then it is only suspect: desktops sleep
    /// and reboot.
    #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = parse_duration)]
    down_after: std::time::Duration,
    /// Found a new cluster with these nodes, HOST:PORT, comma-separated, this
    /// node included: the same list on every one of them. Read on a node's
    /// first start only; after that the membership recorded in --dir is used.
    /// Implies --cluster.
    #[arg(
        long,
        value_name = "HOST:PORT,...",
        value_delimiter = ',',
        conflicts_with = "seed"
    )]
    peers: Vec<String>,
}

/// How many nodes keep each key unless --replicas says otherwise.
const DEFAULT_REPLICAS: usize = 3;

/// Cluster settings from the command line, if this is a cluster node.
fn cluster_options(cli: &Cli, config: &Config) -> anyhow::Result<Option<kvd::replica::Options>> {
    if !cli.cluster && cli.replicas.is_none() && cli.peers.is_empty() {
        if !cli.seed.is_empty() {
            anyhow::bail!("--seed needs --cluster");
        }
        return Ok(None);
    }
    let replicas = cli.replicas.unwrap_or(DEFAULT_REPLICAS);
    let Some(secret) = cli.cluster_secret.clone().filter(|s| !s.is_empty()) else {
        anyhow::bail!("--cluster needs --cluster-secret (or KVD_CLUSTER_SECRET): peers authenticate with it");
    };
    if replicas == 0 {
        anyhow::bail!("--replicas must be at least 1");
    }
    let host = config.bind.split_whitespace().next().unwrap_or("127.0.0.1");
    let tls = kvd::tls::peer_connector(config)?;
    // With TLS between nodes, a node's address is its TLS port: that is
    // where its peers connect.
    let port = if tls.is_some() {
        config.tls_port
    } else {
        config.port
    };
    if port == 0 {
        anyhow::bail!("--cluster needs a port peers can reach: --port, or --tls-port with tls-replication");
    }
    let me = cli.cluster_announce.clone().unwrap_or(format!("{host}:{port}"));
    // Redis Cluster names a node HOST:PORT@BUSPORT; kvd has no bus port.
    let seeds: Vec<String> = cli
        .seed
        .iter()
        .map(|s| s.split_once('@').map_or(s.as_str(), |(addr, _)| addr).to_string())
        .collect();
    let first_start = if !cli.peers.is_empty() {
        kvd::replica::FirstStart::Peers(cli.peers.clone())
    } else if seeds.is_empty() {
        kvd::replica::FirstStart::Alone
    } else {
        kvd::replica::FirstStart::Join
    };
    Ok(Some(kvd::replica::Options {
        me,
        tls,
        first_start,
        replicas,
        secret,
        dir: config.dir.clone(),
        seeds,
        down_after: cli.down_after,
        client_ports: kvd::replica::gossip::ClientPorts {
            plain: config.port,
            tls: config.tls_port,
        },
    }))
}

/// `90s`, `10m`, `2h`, or plain seconds.
fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => text.split_at(i),
        None => (text, "s"),
    };
    let n: u64 = number
        .parse()
        .map_err(|_| format!("'{text}' is not a duration such as 90s or 10m"))?;
    let secs = match unit {
        "ms" => return Ok(std::time::Duration::from_millis(n)),
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => return Err(format!("'{text}': the unit must be ms, s, m or h")),
    };
    Ok(std::time::Duration::from_secs(secs))
}

fn build_config(cli: &Cli) -> anyhow::Result<Config> {
    let mut config = Config::default();
    if let Some(path) = &cli.config {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read config file {}: {e}", path.display()))?;
        config
            .load_file_text(&text)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    }
    let mut set = |name: &str, value: Option<String>| -> anyhow::Result<()> {
        if let Some(v) = value {
            config
                .set(name, &v, false)
                .map_err(|e| anyhow::anyhow!("--{name} {v}: {e}"))?;
        }
        Ok(())
    };
    set("bind", cli.bind.clone())?;
    set("port", cli.port.map(|p| p.to_string()))?;
    set("requirepass", cli.requirepass.clone())?;
    set("maxclients", cli.maxclients.map(|n| n.to_string()))?;
    set("dir", cli.dir.as_ref().map(|d| d.display().to_string()))?;
    set("databases", cli.databases.map(|n| n.to_string()))?;
    set("tls-port", cli.tls_port.map(|n| n.to_string()))?;
    let path = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string());
    set("tls-cert-file", path(&cli.tls_cert_file))?;
    set("tls-key-file", path(&cli.tls_key_file))?;
    set("tls-ca-cert-file", path(&cli.tls_ca_cert_file))?;
    set("tls-auth-clients", cli.tls_auth_clients.clone())?;
    set("tls-replication", cli.tls_replication.clone())?;
    set("tls-cluster", cli.tls_cluster.clone())?;
    set("tls-client-cert-file", path(&cli.tls_client_cert_file))?;
    set("tls-client-key-file", path(&cli.tls_client_key_file))?;
    set("timeout", cli.timeout.map(|n| n.to_string()))?;
    set("threads", cli.threads.map(|n| n.to_string()))?;
    set("storage", cli.storage.clone())?;
    set("appendfsync", cli.appendfsync.clone())?;
    set("segment-size", cli.segment_size.clone())?;
    set("proto-max-bulk-len", cli.proto_max_bulk_len.clone())?;
    Ok(config)
}

/// Logs to stderr, filtered by `KVD_LOG` (else `RUST_LOG`, else `info`;
/// tracing's env-filter syntax). Colour only on a terminal: a log file or a
/// journal gets plain text. `KVD_LOG_FORMAT=json` writes one JSON object
/// per line instead, for log collectors.
fn init_logging() {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_env("KVD_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| "info".into());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::env::var("KVD_LOG_FORMAT").is_ok_and(|f| f == "json") {
        logs.json().init();
    } else {
        logs.with_ansi(std::io::stderr().is_terminal()).init();
    }
}

fn main() -> std::process::ExitCode {
    init_logging();
    let cli = Cli::parse();
    let config = match build_config(&cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("kvd: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.threads)
        .thread_name("kvd-worker")
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kvd: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let cluster = match cluster_options(&cli, &config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("kvd: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let config_file = cli.config.as_ref().map(|p| p.display().to_string());
    let metrics_addr = cli.metrics_addr.clone();
    let result = runtime.block_on(async move {
        // The handlers are in place before the server can say it is ready: a
        // SIGTERM right after READY=1 (a service manager, a test) would
        // otherwise find none and end the process with no clean stop.
        let signals = Signals::register();
        let (shared, task) = kvd::server::start(config, config_file, cluster).await?;
        if let Some(addr) = &metrics_addr {
            kvd::metrics::serve(shared.clone(), addr)?;
        }
        let stop = shared.shutdown.clone();
        tokio::spawn(async move {
            signals.wait().await;
            tracing::info!("received a stop signal, shutting down");
            stop.cancel();
        });
        task.await?
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kvd: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// SIGINT and SIGTERM, registered.
struct Signals {
    term: Option<tokio::signal::unix::Signal>,
    interrupt: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn register() -> Signals {
        use tokio::signal::unix::{signal, SignalKind};
        Signals {
            term: signal(SignalKind::terminate()).ok(),
            interrupt: signal(SignalKind::interrupt()).ok(),
        }
    }

    /// Until either arrives (never, for one that could not be registered).
    async fn wait(mut self) {
        let term = async {
            match &mut self.term {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        };
        let interrupt = async {
            match &mut self.interrupt {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = term => {}
            _ = interrupt => {}
        }
    }
}
