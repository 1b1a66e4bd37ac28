//! The same command scripts against a real kvd and a real redis-server, in RESP2
//! and again in RESP3: every reply must be byte-identical (or, where a line says
//! so, of the same type, sorted-equal, or scan-equal). See `scripts/`.

use std::path::PathBuf;

use protocol_tests::script::{self, Line};
use protocol_tests::{require_redis, Conn, Server};

fn scripts() -> Vec<(String, Vec<Line>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("scripts directory")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "txt"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).expect("readable script");
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            let lines = script::parse(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
            (name, lines)
        })
        .collect()
}

/// Runs one script against both connections (in RESP3 after a HELLO 3 when
/// asked), adding its mismatches to `failures`; returns the number of cases.
fn compare(
    name: &str,
    mut lines: Vec<script::Line>,
    resp3: bool,
    k: &mut Conn,
    r: &mut Conn,
    failures: &mut Vec<String>,
) -> usize {
    if resp3 {
        lines.insert(0, script::parse("~ HELLO 3").unwrap().remove(0));
    }
    match script::run(&lines, k, r) {
        Ok(mismatches) => failures.extend(mismatches.into_iter().map(|m| format!("{name} {m}"))),
        Err(e) => failures.push(format!("{name}: {e:#}")),
    }
    lines.len()
}

fn run_all(resp3: bool) {
    require_redis();
    let kvd = Server::kvd(&[]).expect("start kvd");
    // kvd runs its default, persistent engine; so does its peer.
    let redis = Server::redis(&["--appendonly", "yes"]).expect("start redis-server");
    let mut failures = Vec::new();
    let mut cases = 0;
    for (name, lines) in scripts() {
        let mut k = kvd.connect().unwrap();
        let mut r = redis.connect().unwrap();
        for conn in [&mut k, &mut r] {
            conn.cmd("FLUSHALL").unwrap();
        }
        cases += compare(&name, lines, resp3, &mut k, &mut r, &mut failures);
    }
    let proto = if resp3 { "RESP3" } else { "RESP2" };
    eprintln!("{proto}: {cases} cases, {} mismatches", failures.len());
    assert!(
        failures.is_empty(),
        "{proto}: kvd and redis-server disagree on {} of {cases} cases:\n{}",
        failures.len(),
        failures.join("\n")
    );
    // The check must be able to fail: one deliberately different pair.
    let mut k: Conn = kvd.connect().unwrap();
    let mut r = redis.connect().unwrap();
    k.cmd("SET canary kvd").unwrap();
    r.cmd("SET canary redis").unwrap();
    let lines = script::parse("GET canary").unwrap();
    assert_eq!(script::run(&lines, &mut k, &mut r).unwrap().len(), 1);
}

/// The cluster-only differences documented in docs/PROTOCOL.md ("Cluster"):
/// keyspace-wide commands act on one node, and commands, WATCHes and
/// transactions whose keys span slots (other than the split ones) answer
/// CROSSSLOT. `filter` drops exactly those lines from a script, tracking the
/// slot a WATCH/MULTI binds the connection to.
struct ClusterFilter {
    in_multi: bool,
    txn_slot: Option<u16>,
}

impl ClusterFilter {
    fn keep(&mut self, args: &[Vec<u8>]) -> bool {
        use kvd::command::spec::{lookup, Lookup};
        let args: Vec<bytes::Bytes> = args.iter().map(|a| bytes::Bytes::from(a.clone())).collect();
        let Lookup::Found(spec) = lookup(&args) else {
            return true;
        };
        if !spec.arity_ok(args.len()) {
            return true;
        }
        match spec.name {
            "scan" | "info" => return false,
            // A cluster node keeps database 0 only, as a Redis Cluster node
            // does (`cluster_nodes_keep_database_0_only` checks its refusals).
            "select" | "swapdb" | "move" => return false,
            "copy" if args.iter().any(|a| a.eq_ignore_ascii_case(b"db")) => return false,
            "multi" => self.in_multi = true,
            "exec" | "discard" | "reset" => {
                self.in_multi = false;
                self.txn_slot = None;
            }
            "unwatch" if !self.in_multi => self.txn_slot = None,
            _ => {}
        }
        let slots: Vec<u16> = spec
            .key_positions(args.len())
            .iter()
            .map(|&i| kvd::cluster::slot::key_slot(&args[i]))
            .collect();
        let Some(&first) = slots.first() else { return true };
        let one_slot = slots.iter().all(|&s| s == first);
        let bound = spec.name == "watch" || self.in_multi;
        if bound {
            if !one_slot || self.txn_slot.is_some_and(|s| s != first) {
                return false;
            }
            self.txn_slot = Some(first);
            return true;
        }
        one_slot || ["mget", "mset", "del", "unlink", "exists", "touch"].contains(&spec.name)
    }

    fn filter(lines: Vec<script::Line>) -> Vec<script::Line> {
        let mut f = ClusterFilter {
            in_multi: false,
            txn_slot: None,
        };
        lines
            .into_iter()
            .filter(|l| match &l.case {
                script::Case::Exact { args, .. }
                | script::Case::SameType(args)
                | script::Case::Sorted(args) => f.keep(args),
                script::Case::Scan(_) => false,
                script::Case::Sleep(_) => true,
            })
            .collect()
    }
}

/// The scripts through one node of a 3-node kvd cluster (every command a
/// CASPaxos round on its key's three replicas) against a standalone
/// redis-server, minus the documented cluster-only differences.
fn run_through_cluster(resp3: bool) {
    require_redis();
    let cluster = protocol_tests::Replicated::start(3, 3);
    let redis = Server::redis(&["--appendonly", "yes"]).expect("start redis-server");
    let mut failures = Vec::new();
    let (mut cases, mut skipped) = (0, 0);
    for (name, lines) in scripts() {
        for i in 0..3 {
            cluster.conn(i).cmd("FLUSHALL").unwrap();
        }
        let mut r = redis.connect().unwrap();
        r.cmd("FLUSHALL").unwrap();
        let mut k = cluster.conn(1);
        let total = lines.len();
        let lines = ClusterFilter::filter(lines);
        skipped += total - lines.len();
        cases += compare(&name, lines, resp3, &mut k, &mut r, &mut failures);
    }
    let info = cluster.conn(1).cmd("INFO cluster").unwrap().as_str();
    let rounds = protocol_tests::report_field(&info, "kvd_paxos_rounds:").unwrap_or(0);
    eprintln!("through a cluster node: {cases} cases, {skipped} cluster-only lines left out, {rounds} CASPaxos rounds, {} mismatches", failures.len());
    assert!(
        rounds > 100,
        "the commands should run as rounds on the keys' replicas"
    );
    assert!(
        failures.is_empty(),
        "a kvd cluster node and redis-server disagree on {} of {cases} cases:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn resp2_scripts_through_a_cluster_node_match_redis() {
    run_through_cluster(false);
}

#[test]
fn resp3_scripts_through_a_cluster_node_match_redis() {
    run_through_cluster(true);
}

#[test]
fn resp2_scripts_match_redis() {
    run_all(false);
}

#[test]
fn resp3_scripts_match_redis() {
    run_all(true);
}
