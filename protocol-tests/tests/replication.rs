//! A replicated kvd cluster (`--replicas 3 --peers ...`): real processes,
//! nodes killed with SIGKILL by the test.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use protocol_tests::linearizability::{check, Event, Op};
use protocol_tests::{Conn, Replicated, Value};

#[test]
fn every_node_serves_every_key_and_a_majority_is_enough() {
    let mut c = Replicated::start(3, 3);
    let (mut a, mut b, mut z) = (c.conn(0), c.conn(1), c.conn(2));
    assert_eq!(a.cmd("SET greeting hello").unwrap().as_str(), "OK");
    assert_eq!(b.cmd("GET greeting").unwrap().as_str(), "hello");
    assert_eq!(z.cmd("INCR n").unwrap().as_int(), Some(1));
    assert_eq!(a.cmd("INCRBY n 4").unwrap().as_int(), Some(5));
    assert_eq!(b.cmd("MSET x 1 y 2").unwrap().as_str(), "OK");
    assert_eq!(
        z.cmd("MGET x y nothing").unwrap(),
        Value::Array(vec![
            Value::Bulk(b"1".to_vec()),
            Value::Bulk(b"2".to_vec()),
            Value::Nil
        ])
    );
    assert_eq!(a.cmd("DEL x y nothing").unwrap().as_int(), Some(2));
    assert_eq!(b.cmd("EXISTS x y greeting").unwrap().as_int(), Some(1));
    assert_eq!(z.cmd("APPEND greeting !").unwrap().as_int(), Some(6));
    assert_eq!(a.cmd("SET soon v PX 50").unwrap().as_str(), "OK");
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(b.cmd("GET soon").unwrap(), Value::Nil);
    // Deleted and expired keys are not listed. (Each node lists what it holds;
    // a replica may still be receiving a write, so the union is compared.)
    let mut all = std::collections::BTreeSet::new();
    for i in 0..3 {
        let Value::Array(keys) = c.conn(i).cmd("KEYS *").unwrap() else {
            panic!()
        };
        all.extend(keys.iter().map(Value::as_str));
    }
    assert_eq!(all.into_iter().collect::<Vec<_>>(), ["greeting", "n"]);
    // WATCH is broken by a write through another node.
    a.cmd("WATCH n").unwrap();
    a.cmd("MULTI").unwrap();
    a.cmd("INCR n").unwrap();
    b.cmd("SET n 100").unwrap();
    assert_eq!(a.cmd("EXEC").unwrap(), Value::Nil);
    a.cmd("WATCH n").unwrap();
    a.cmd("MULTI").unwrap();
    a.cmd("INCR n").unwrap();
    assert_eq!(a.cmd("EXEC").unwrap(), Value::Array(vec![Value::Int(101)]));

    // One node down: everything still works through the others.
    c.kill9(2);
    assert_eq!(a.cmd("SET while-down yes").unwrap().as_str(), "OK");
    assert_eq!(b.cmd("GET while-down").unwrap().as_str(), "yes");
    assert_eq!(b.cmd("INCR n").unwrap().as_int(), Some(102));
    // Two down: a clear error, and nothing changed.
    c.kill9(1);
    let refused = a.cmd("SET refused 1").unwrap();
    assert!(refused.as_str().starts_with("CLUSTERDOWN"), "{refused:?}");
    assert!(a.cmd("GET n").unwrap().as_str().starts_with("CLUSTERDOWN"));
    // Back up: everything acknowledged is there, through every node; the
    // refused write is not.
    c.restart(1);
    c.restart(2);
    for i in 0..3 {
        let mut conn = c.conn(i);
        assert_eq!(conn.cmd("GET greeting").unwrap().as_str(), "hello!", "node {i}");
        assert_eq!(conn.cmd("GET n").unwrap().as_int(), Some(102), "node {i}");
        assert_eq!(conn.cmd("GET while-down").unwrap().as_str(), "yes", "node {i}");
        assert_eq!(conn.cmd("GET refused").unwrap(), Value::Nil, "node {i}");
    }
    // INFO cluster counts the rounds; clients are not sent elsewhere.
    let info = c.conn(0).cmd("INFO cluster").unwrap().as_str();
    assert!(
        info.contains("cluster_enabled:0") && info.contains("kvd_replicas:3"),
        "{info}"
    );
    let rounds: u64 = info
        .lines()
        .find_map(|l| l.strip_prefix("kvd_paxos_rounds:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap();
    assert!(rounds > 10, "{info}");
    // Peers only: the acceptor's commands need the cluster secret.
    assert!(c
        .conn(0)
        .cmd("KVD.QUERY n")
        .unwrap()
        .as_str()
        .starts_with("NOPERM"));
}

/// Writers on every node SET fresh keys and INCR counters; one node is
/// killed with SIGKILL and later restarted. Every acknowledged write reads
/// back through every node afterwards, each counter equals its acknowledged
/// increments (plus at most the ones whose outcome was unknown), and the
/// restarted node comes to hold every key again by itself.
#[test]
fn a_node_killed_during_a_write_load_loses_no_acknowledged_write() {
    let mut c = Replicated::start(3, 3);
    let ports = c.ports.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let last_ack = Arc::new(Mutex::new(Instant::now()));
    let longest_pause = Arc::new(Mutex::new(Duration::ZERO));
    let writers: Vec<_> = (0..4)
        .map(|t| {
            let (stop, ports) = (stop.clone(), ports.clone());
            let (last_ack, longest_pause) = (last_ack.clone(), longest_pause.clone());
            std::thread::spawn(move || {
                let mut acked: Vec<(String, String)> = Vec::new();
                let (mut incr_acked, mut incr_unknown) = (0i64, 0i64);
                let mut node = t % ports.len();
                let mut conn: Option<Conn> = None;
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    let Some(cn) = conn.as_mut() else {
                        match Conn::connect(ports[node]) {
                            Ok(cn) => conn = Some(cn),
                            Err(_) => {
                                node = (node + 1) % ports.len();
                                std::thread::sleep(Duration::from_millis(20));
                            }
                        }
                        continue;
                    };
                    n += 1;
                    let (key, value) = (format!("w{t}:{n}"), format!("v{t}:{n}"));
                    let incr = n % 3 == 0;
                    let result = if incr {
                        cn.call(&["INCR", &format!("counter{t}")])
                    } else {
                        cn.call(&["SET", &key, &value])
                    };
                    match result {
                        Ok(v) if !v.is_error() => {
                            let now = Instant::now();
                            let mut last = last_ack.lock().unwrap();
                            let gap = now - *last;
                            *last = now;
                            let mut longest = longest_pause.lock().unwrap();
                            *longest = (*longest).max(gap);
                            if incr {
                                incr_acked += 1;
                            } else {
                                acked.push((key, value));
                            }
                        }
                        Ok(v) => {
                            // Refused with nothing changed, or an unknown outcome.
                            let text = v.as_str();
                            assert!(
                                text.starts_with("CLUSTERDOWN") || text.contains("may or may not"),
                                "{text}"
                            );
                            if incr && !text.starts_with("CLUSTERDOWN") {
                                incr_unknown += 1;
                            }
                        }
                        Err(_) => {
                            // Our node died mid-request: the outcome is unknown.
                            if incr {
                                incr_unknown += 1;
                            }
                            conn = None;
                            node = (node + 1) % ports.len();
                        }
                    }
                }
                (acked, incr_acked, incr_unknown)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1500));
    c.kill9(1);
    std::thread::sleep(Duration::from_millis(1500));
    c.restart(1);
    std::thread::sleep(Duration::from_millis(1500));
    stop.store(true, Ordering::Relaxed);
    let results: Vec<_> = writers.into_iter().map(|w| w.join().unwrap()).collect();
    let mut total = 0;
    for i in 0..3 {
        let mut conn = c.conn(i);
        for (t, (acked, incr_acked, incr_unknown)) in results.iter().enumerate() {
            for (key, value) in acked {
                assert_eq!(
                    &conn.call(&["GET", key]).unwrap().as_str(),
                    value,
                    "{key} via node {i}"
                );
            }
            let counter = conn.call(&["GET", &format!("counter{t}")]).unwrap().as_str();
            let counter: i64 = counter.parse().unwrap_or(0);
            assert!(
                counter >= *incr_acked && counter <= incr_acked + incr_unknown,
                "counter{t} via node {i}: {counter}, acknowledged {incr_acked} (+{incr_unknown} unknown)"
            );
            if i == 0 {
                total += acked.len() + *incr_acked as usize;
            }
        }
    }
    assert!(total > 300, "only {total} writes acknowledged");
    // Anti-entropy brings the restarted node back to holding every key itself
    // (KEYS lists what a node stores), without anything being read.
    let wanted: std::collections::HashSet<String> = results
        .iter()
        .flat_map(|(acked, _, _)| acked.iter().map(|(k, _)| k.clone()))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let Value::Array(held) = c.conn(1).cmd("KEYS w*").unwrap() else {
            panic!("KEYS answers an array")
        };
        let held: std::collections::HashSet<String> = held.iter().map(Value::as_str).collect();
        let missing = wanted.difference(&held).count();
        if missing == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the restarted node still lacks {missing} of {} keys",
            wanted.len()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    eprintln!(
        "{total} acknowledged writes, none lost; longest pause between acknowledgements {:?}",
        *longest_pause.lock().unwrap()
    );
}

/// Compare-and-swap increments (WATCH, GET, MULTI, SET, EXEC) from clients on
/// every node, while a node is killed and restarted, and then another is cut
/// off (frozen with SIGSTOP: its peers' calls time out) and comes back: every
/// key's recorded history is linearizable. A CAS whose outcome is unknown (its
/// node died, or the write reached only a minority) is recorded as such.
#[test]
fn cas_histories_stay_linearizable_while_a_node_is_killed_or_cut_off() {
    let mut c = Replicated::start(3, 3);
    let ports = c.ports.clone();
    let keys = ["lin:a", "lin:b", "lin:c"];
    let stop = Arc::new(AtomicBool::new(false));
    let history: Arc<Mutex<HashMap<&'static str, Vec<Event>>>> = Arc::default();
    let threads: Vec<_> = (0..6)
        .map(|t| {
            let (stop, history, ports) = (stop.clone(), history.clone(), ports.clone());
            std::thread::spawn(move || {
                let mut node = t % 3;
                let mut successes = 0;
                let mut n = 0usize;
                'outer: while !stop.load(Ordering::Relaxed) {
                    let Ok(mut conn) = Conn::connect(ports[node]) else {
                        node = (node + 1) % 3;
                        std::thread::sleep(Duration::from_millis(20));
                        continue;
                    };
                    while !stop.load(Ordering::Relaxed) {
                        let key = keys[(n * 7 + t) % keys.len()];
                        n += 1;
                        let Ok(w) = conn.call(&["WATCH", key]) else { break };
                        if w.is_error() {
                            continue;
                        }
                        let read_start = Instant::now();
                        let Ok(v) = conn.call(&["GET", key]) else { break };
                        let read_end = Instant::now();
                        let value = match v {
                            Value::Nil => None,
                            v if v.is_error() => {
                                let _ = conn.cmd("UNWATCH");
                                continue;
                            }
                            other => Some(other.as_int().unwrap_or_else(|| panic!("GET {key}: {other:?}"))),
                        };
                        history.lock().unwrap().entry(key).or_default().push(Event {
                            op: Op::Read(value),
                            invoked: read_start,
                            completed: Some(read_end),
                        });
                        let next = value.unwrap_or(0) + 1;
                        let invoked = Instant::now();
                        let exec = conn
                            .cmd("MULTI")
                            .and_then(|_| conn.call(&["SET", key, &next.to_string()]))
                            .and_then(|_| conn.cmd("EXEC"));
                        let completed = Instant::now();
                        let cas = Op::Cas {
                            expected: value,
                            new: next,
                        };
                        let mut h = history.lock().unwrap();
                        let events = h.entry(key).or_default();
                        match exec {
                            Ok(Value::Array(_)) => {
                                successes += 1;
                                events.push(Event {
                                    op: cas,
                                    invoked,
                                    completed: Some(completed),
                                });
                            }
                            Ok(Value::Nil) => {}
                            Ok(e) if e.as_str().starts_with("CLUSTERDOWN") => {}
                            Ok(_) => events.push(Event {
                                op: cas,
                                invoked,
                                completed: None,
                            }),
                            Err(_) => {
                                events.push(Event {
                                    op: cas,
                                    invoked,
                                    completed: None,
                                });
                                drop(h);
                                node = (node + 1) % 3;
                                continue 'outer;
                            }
                        }
                    }
                    node = (node + 1) % 3;
                }
                successes
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1500));
    c.kill9(1);
    std::thread::sleep(Duration::from_millis(1500));
    c.restart(1);
    std::thread::sleep(Duration::from_millis(1500));
    c.freeze(2, true);
    std::thread::sleep(Duration::from_millis(2500));
    c.freeze(2, false);
    std::thread::sleep(Duration::from_millis(1500));
    stop.store(true, Ordering::Relaxed);
    let successes: u64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
    let history = history.lock().unwrap();
    for key in keys {
        let events = &history[key];
        assert!(
            check(events, None),
            "{key}: the history of {} operations is not linearizable",
            events.len()
        );
    }
    eprintln!(
        "{successes} successful CAS over {} keys, linearizable",
        keys.len()
    );
    assert!(successes > 100, "only {successes} CAS succeeded");
}

/// fsclient writes files through one node while another is killed and
/// restarted; afterwards every file it committed reads back intact and fsck
/// finds nothing damaged.
#[test]
fn a_file_system_on_top_survives_a_killed_node() {
    let mut c = Replicated::start(3, 3);
    let url = format!("redis://127.0.0.1:{}", c.ports[0]);
    let ok = |args: &[&str]| {
        let out = protocol_tests::fsclient_at(&url, args);
        assert!(
            out.status.success(),
            "fsclient {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    ok(&["mkfs"]);
    let dir = tempfile::tempdir().unwrap();
    let mut committed = Vec::new();
    let start = Instant::now();
    let mut i = 0;
    while start.elapsed() < Duration::from_secs(5) {
        i += 1;
        if i == 5 {
            c.kill9(2);
        }
        if i == 15 {
            c.restart(2);
        }
        let path = dir.path().join(format!("f{i}"));
        let data: Vec<u8> = (0..50_000u32).map(|x| (x * i) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        ok(&["put", path.to_str().unwrap(), &format!("/f{i}")]);
        committed.push((format!("/f{i}"), data));
    }
    assert!(committed.len() >= 15, "only {} commits", committed.len());
    for (path, data) in &committed {
        let out = protocol_tests::fsclient_at(&url, &["cat", path]);
        assert!(out.status.success() && out.stdout == *data, "{path}");
    }
    assert!(ok(&["fsck"]).contains(", 0 damaged paths"));
}
