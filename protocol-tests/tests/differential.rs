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

fn run_all(resp3: bool) {
    require_redis();
    let kvd = Server::kvd(&[]).expect("start kvd");
    // kvd runs its default, persistent engine; so does its peer.
    let redis = Server::redis(&["--appendonly", "yes"]).expect("start redis-server");
    let mut failures = Vec::new();
    let mut cases = 0;
    for (name, mut lines) in scripts() {
        let mut k = kvd.connect().unwrap();
        let mut r = redis.connect().unwrap();
        for conn in [&mut k, &mut r] {
            conn.cmd("FLUSHALL").unwrap();
        }
        if resp3 {
            lines.insert(0, script::parse("~ HELLO 3").unwrap().remove(0));
        }
        cases += lines.len();
        match script::run(&lines, &mut k, &mut r) {
            Ok(mismatches) => failures.extend(mismatches.into_iter().map(|m| format!("{name} {m}"))),
            Err(e) => failures.push(format!("{name}: {e:#}")),
        }
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

#[test]
fn resp2_scripts_match_redis() {
    run_all(false);
}

#[test]
fn resp3_scripts_match_redis() {
    run_all(true);
}
