//! The real redis-cli and redis-benchmark binaries against kvd. A scripted
//! redis-cli session must print exactly what it prints against redis-server.

use std::io::Write;
use std::process::{Command, Stdio};

use protocol_tests::{require_redis, Server, Value};

fn redis_cli(port: u16, args: &[&str], stdin: &[u8]) -> String {
    let mut child = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("redis-cli runs (installed by scripts/setup.sh)");
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

const SESSION: &str = "\
SET greeting hello
GET greeting
SET counter 10
INCRBY counter 5
MSET a 1 b 2 c 3
MGET a b c nosuch
DEL a b
EXISTS a b c
SET t v EX 100
TTL t
TYPE t
MULTI
SET x 1
INCR x
GET x
EXEC
GET nosuch
SETRANGE s 3 abc
GET s
GETRANGE greeting 1 3
NOSUCHCOMMAND foo
SET k v NX XX
DBSIZE
FLUSHALL
DBSIZE
";

#[test]
fn a_redis_cli_session_prints_the_same_as_against_redis() {
    require_redis();
    let kvd = Server::kvd(&[]).unwrap();
    let redis = Server::redis(&[]).unwrap();
    for proto in [&[][..], &["-3"][..]] {
        let a = redis_cli(kvd.port, proto, SESSION.as_bytes());
        let b = redis_cli(redis.port, proto, SESSION.as_bytes());
        assert_eq!(a, b, "redis-cli {proto:?} output differs");
        assert!(a.contains("hello"), "{a}");
    }
    // Interactive-style formatting (what a person sees) through --no-raw.
    let a = redis_cli(kvd.port, &["--no-raw"], SESSION.as_bytes());
    let b = redis_cli(redis.port, &["--no-raw"], SESSION.as_bytes());
    assert_eq!(a, b);
    assert!(a.contains("(integer) 15"), "{a}");
}

#[test]
fn redis_cli_scan_and_info_work() {
    let kvd = Server::kvd(&[]).unwrap();
    redis_cli(kvd.port, &[], b"MSET user:1 a user:2 b other c\n");
    let mut keys: Vec<String> = redis_cli(kvd.port, &["--scan", "--pattern", "user:*"], b"")
        .lines()
        .map(String::from)
        .collect();
    keys.sort();
    assert_eq!(keys, ["user:1", "user:2"]);
    let info = redis_cli(kvd.port, &["INFO", "server"], b"");
    assert!(info.contains("redis_version:7."), "{info}");
    let keyspace = redis_cli(kvd.port, &["INFO", "keyspace"], b"");
    assert!(keyspace.contains("db0:keys=3,expires=0"), "{keyspace}");
}

#[test]
fn redis_cli_pipe_mass_insert() {
    let kvd = Server::kvd(&[]).unwrap();
    let mut input = Vec::new();
    for i in 0..20_000 {
        input.extend(protocol_tests::encode_request(&[
            "SET",
            &format!("key:{i}"),
            &format!("value:{i}"),
        ]));
    }
    let out = redis_cli(kvd.port, &["--pipe"], &input);
    assert!(out.contains("errors: 0, replies: 20000"), "{out}");
    let mut c = kvd.connect().unwrap();
    assert_eq!(c.cmd("DBSIZE").unwrap(), Value::Int(20_000));
    assert_eq!(
        c.cmd("GET key:12345").unwrap(),
        Value::Bulk(b"value:12345".to_vec())
    );
}

#[test]
fn redis_benchmark_runs_without_errors() {
    let kvd = Server::kvd(&[]).unwrap();
    let out = Command::new("redis-benchmark")
        .args([
            "-p",
            &kvd.port.to_string(),
            "-t",
            "set,get,incr,mset",
            "-n",
            "20000",
            "-c",
            "20",
            "-q",
        ])
        .args(["-P", "4"])
        .output()
        .expect("redis-benchmark runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    for test in ["SET", "GET", "INCR", "MSET"] {
        assert!(
            text.lines()
                .any(|l| l.contains(test) && l.contains("requests per second")),
            "no {test} result in:\n{text}"
        );
    }
    assert!(!text.to_lowercase().contains("error"), "{text}");
    let mut c = kvd.connect().unwrap();
    let counter = c.cmd("GET counter:__rand_int__").unwrap().as_int().unwrap();
    assert_eq!(counter, 20_000, "every INCR was applied");
}

/// Issue 18: `redis-cli --memkeys` (SCAN, TYPE and MEMORY USAGE per key)
/// finds the biggest key; it failed on the missing MEMORY USAGE before.
#[test]
fn redis_cli_memkeys_finds_the_biggest_key() {
    let kvd = Server::kvd(&[]).unwrap();
    let mut c = kvd.connect().unwrap();
    for i in 1..=20 {
        c.call(&["SET", &format!("key{i}"), &"x".repeat(i * 10)]).unwrap();
    }
    let out = redis_cli(kvd.port, &["--memkeys"], b"");
    assert!(out.contains("Biggest string found '\"key20\"'"), "{out}");
    assert!(out.contains("20 strings with"), "{out}");
}
