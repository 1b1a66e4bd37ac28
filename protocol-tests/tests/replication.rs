//! A kvd cluster (`--cluster`, every key on R nodes): real processes,
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
    // Two down: a clear error at once (not a hang), and nothing changed.
    c.kill9(1);
    let asked = Instant::now();
    let refused = a.cmd("SET refused 1").unwrap();
    assert!(refused.as_str().starts_with("CLUSTERDOWN"), "{refused:?}");
    assert!(a.cmd("GET n").unwrap().as_str().starts_with("CLUSTERDOWN"));
    assert!(
        asked.elapsed() < Duration::from_secs(1),
        "two refusals took {:?}",
        asked.elapsed()
    );
    // Back up: everything acknowledged is there, through every node; the
    // refused write is not.
    c.restart(1);
    c.restart(2);
    // Two frozen (SIGSTOP: their sockets accept and never answer): the error
    // comes when the peer calls time out, not never.
    c.freeze(1, true);
    c.freeze(2, true);
    let asked = Instant::now();
    let refused = c.conn(0).cmd("SET refused 1").unwrap();
    let waited = asked.elapsed();
    c.freeze(1, false);
    c.freeze(2, false);
    assert!(refused.is_error(), "{refused:?}");
    eprintln!("with two of three frozen, a write was refused after {waited:?}: {refused:?}");
    assert!(
        waited < Duration::from_secs(5),
        "a write with two of three frozen waited {waited:?}"
    );
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
        info.contains("cluster_enabled:1") && info.contains("kvd_replicas:3"),
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

/// Clients of one node write the same few keys (SET and INCR) while clients of
/// the other two nodes read them and every node's anti-entropy scans them. No
/// client contends with another node's writer, so no write may end uncertain
/// ("may or may not take effect") and no read may fail: before the fix, two
/// clients of one node raced each other's ballots, and a read or a repair
/// that saw a write still on its way to the third replica prepared a higher
/// ballot and cut it off after one replica had taken it.
#[test]
fn one_nodes_writers_are_never_cut_off_by_each_other_by_readers_or_by_repair() {
    let c = Replicated::start(3, 3);
    let ports = c.ports.clone();
    let stop = Arc::new(AtomicBool::new(false));
    const KEYS: usize = 8;
    let writers: Vec<_> = (0..8)
        .map(|t| {
            let (stop, port) = (stop.clone(), ports[0]);
            std::thread::spawn(move || {
                let mut conn = Conn::connect(port).unwrap();
                let (mut incrs, mut errors) = (vec![0i64; KEYS], Vec::new());
                let mut n = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let k = (n * 7 + t) % KEYS;
                    let reply = if n.is_multiple_of(2) {
                        conn.call(&["INCR", &format!("counter{k}")]).unwrap()
                    } else {
                        conn.call(&["SET", &format!("key{k}"), &format!("{t}:{n}")])
                            .unwrap()
                    };
                    if reply.is_error() {
                        errors.push(reply.as_str());
                    } else if n.is_multiple_of(2) {
                        incrs[k] += 1;
                    }
                }
                (n, incrs, errors)
            })
        })
        .collect();
    let readers: Vec<_> = (0..4)
        .map(|t| {
            let (stop, port) = (stop.clone(), ports[1 + t % 2]);
            std::thread::spawn(move || {
                let mut conn = Conn::connect(port).unwrap();
                let (mut reads, mut errors) = (0usize, Vec::new());
                while !stop.load(Ordering::Relaxed) {
                    reads += 1;
                    let reply = conn.call(&["GET", &format!("counter{}", reads % KEYS)]).unwrap();
                    if reply.is_error() {
                        errors.push(reply.as_str());
                    }
                }
                (reads, errors)
            })
        })
        .collect();
    // Long enough for every node's anti-entropy to pass over the keys a few times.
    std::thread::sleep(Duration::from_secs(8));
    stop.store(true, Ordering::Relaxed);
    let mut incrs = [0i64; KEYS];
    let (mut writes, mut errors) = (0, Vec::new());
    for w in writers {
        let (n, mine, errs) = w.join().unwrap();
        writes += n;
        errors.extend(errs);
        for (k, v) in mine.iter().enumerate() {
            incrs[k] += v;
        }
    }
    let mut reads = 0;
    for r in readers {
        let (n, errs) = r.join().unwrap();
        reads += n;
        errors.extend(errs);
    }
    eprintln!("{writes} writes and {reads} reads, {} errors", errors.len());
    assert!(
        errors.is_empty(),
        "{} errors, the first: {:?}",
        errors.len(),
        &errors[..errors.len().min(3)]
    );
    assert!(writes > 200 && reads > 200, "{writes} writes, {reads} reads");
    for i in 0..3 {
        let mut conn = c.conn(i);
        for (k, want) in incrs.iter().enumerate() {
            let got = conn.call(&["GET", &format!("counter{k}")]).unwrap().as_str();
            assert_eq!(got.parse::<i64>().unwrap_or(0), *want, "counter{k} via node {i}");
        }
    }
}

/// Pipelined SETs of `prefix:i` = `value` for `i` in `range`, through `conn`.
fn pipelined_sets(conn: &mut Conn, prefix: &str, range: std::ops::Range<usize>, value: &str) {
    let keys: Vec<usize> = range.collect();
    for chunk in keys.chunks(500) {
        for i in chunk {
            conn.send(&["SET", &format!("{prefix}:{i}"), value]).unwrap();
        }
        for _ in chunk {
            let reply = conn.read_reply_raw().unwrap();
            assert_eq!(reply, b"+OK\r\n", "{}", String::from_utf8_lossy(&reply));
        }
    }
}

/// Keys node `i` stores itself that start with `prefix` (KEYS on a
/// replicated node lists its own records).
fn stored_keys(c: &Replicated, i: usize, prefix: &str) -> usize {
    match c.conn(i).call(&["KEYS", &format!("{prefix}*")]).unwrap() {
        Value::Array(keys) => keys.len(),
        other => panic!("KEYS: {other:?}"),
    }
}

/// Anti-entropy compares slot digests first (`KVD.DIGESTS`): replicas in
/// agreement cost no key-by-key comparison at all. With 3,000 keys settled
/// on three nodes, a whole pass compares no key; a node away while 300 keys
/// changed is caught up through the slots those keys are in, after which
/// every slot agrees again on every node. (Without the digests, each pass
/// compared all 3,000 keys with every other holder.)
#[test]
fn replicas_in_agreement_are_compared_by_slot_digest() {
    let mut c = Replicated::start(3, 3);
    let mut a = c.conn(0);
    for i in 0..3000 {
        a.send(&["SET", &format!("d:{i}"), "v"]).unwrap();
    }
    for _ in 0..3000 {
        a.read_reply_raw().unwrap();
    }
    let number = |c: &Replicated, i: usize, f: &str| info(c, i, f).parse::<u64>().unwrap();
    let all_agree = |c: &Replicated| (0..3).all(|i| number(c, i, "kvd_repair_slots_in_agreement") == 16384);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !all_agree(&c) {
        assert!(Instant::now() < deadline, "the slots never all agreed");
        std::thread::sleep(Duration::from_millis(200));
    }
    // Whole passes later, still no key compared one by one.
    let checked: Vec<u64> = (0..3).map(|i| number(&c, i, "kvd_repair_keys_checked")).collect();
    let passes: Vec<u64> = (0..3).map(|i| number(&c, i, "kvd_repair_passes")).collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    while (0..3).any(|i| number(&c, i, "kvd_repair_passes") < passes[i] + 2) {
        assert!(Instant::now() < deadline, "no two passes in 30 s");
        std::thread::sleep(Duration::from_millis(200));
    }
    let after: Vec<u64> = (0..3).map(|i| number(&c, i, "kvd_repair_keys_checked")).collect();
    assert_eq!(
        after, checked,
        "keys compared one by one although every slot agreed"
    );
    // A node away while 300 keys changed catches up by itself.
    c.kill9(2);
    for i in 0..300 {
        assert_eq!(a.call(&["SET", &format!("d:{i}"), "new"]).unwrap().as_str(), "OK");
    }
    c.restart(2);
    // Caught up when, in passes that began after the restart, every node
    // finds every slot in agreement: node 2's digests are the others'.
    let since: Vec<u64> = (0..3).map(|i| number(&c, i, "kvd_repair_passes")).collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !((0..3).all(|i| number(&c, i, "kvd_repair_passes") >= since[i] + 2) && all_agree(&c)) {
        assert!(
            Instant::now() < deadline,
            "node 2 did not catch up: its slots never agreed again"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut z = c.conn(2);
    for i in (0..300).step_by(7) {
        assert_eq!(
            z.call(&["GET", &format!("d:{i}")]).unwrap().as_str(),
            "new",
            "d:{i}"
        );
    }
    let compared = number(&c, 0, "kvd_repair_keys_checked") - after[0];
    eprintln!("node 0 compared {compared} keys one by one to catch node 2 up");
    assert!(compared < 3000, "node 0 compared every key again ({compared})");
}

/// A node away while 5,000 keys were written comes back and catches up by
/// itself: the others compare record headers with it a thousand keys per
/// call (`KVD.HEADS`) and send only what it lacks. Prints the catch-up
/// rate, keys and bytes a second (it walked every key with a round trip
/// each before: about 2,000 keys a second at most).
#[test]
fn a_node_back_from_an_absence_catches_up_on_what_it_missed() {
    let mut c = Replicated::start(3, 3);
    let mut a = c.conn(0);
    let value = "y".repeat(1024);
    pipelined_sets(&mut a, "old", 0..5000, "v1");
    c.kill9(2);
    pipelined_sets(&mut a, "new", 0..5000, &value);
    c.restart(2);
    let back = Instant::now();
    let deadline = back + Duration::from_secs(120);
    while stored_keys(&c, 2, "new:") < 5000 {
        assert!(Instant::now() < deadline, "node 2 did not catch up");
        std::thread::sleep(Duration::from_millis(250));
    }
    let took = back.elapsed();
    eprintln!(
        "caught up on 5000 keys in {took:?}: {:.0} keys/s, {:.1} MB/s",
        5000.0 / took.as_secs_f64(),
        5000.0 * 1024.0 / took.as_secs_f64() / 1e6
    );
    assert_eq!(stored_keys(&c, 2, "old:"), 5000);
    // What it caught up on is what was written: with node 0 stopped, the
    // others' majority answers (node 1 and the one that was away).
    c.freeze(0, true);
    let mut n2 = c.conn(2);
    for i in (0..5000).step_by(97) {
        assert_eq!(n2.call(&["GET", &format!("new:{i}")]).unwrap().as_str(), value);
    }
    c.freeze(0, false);
}

/// A pipeline through a replicated node (issue 23's ordering bug, for this
/// mode): replies come back in order, commands on one key take effect in the
/// order sent (SET, GET, SET, GET reads each value just set; INCRs count
/// up), and a transaction in the middle of a pipeline sees what came before
/// it. Both RESP versions. (Tried with the rounds of commands on different
/// slots run at once: this test fails if two commands on one slot overlap.)
#[test]
fn pipelined_commands_keep_their_order_while_their_rounds_overlap() {
    let c = Replicated::start(3, 3);
    for resp3 in [false, true] {
        let mut conn = c.conn(1);
        if resp3 {
            conn.cmd("HELLO 3").unwrap();
        }
        let tag = if resp3 { "r3" } else { "r2" };
        let mut expect: Vec<String> = Vec::new();
        let mut counters = [0i64; 7];
        for i in 0..600 {
            let key = format!("{tag}:p:{}", i % 40);
            conn.send(&["SET", &key, &i.to_string()]).unwrap();
            expect.push("OK".into());
            conn.send(&["GET", &key]).unwrap();
            expect.push(i.to_string());
            let counter = i % 7;
            counters[counter] += 1;
            conn.send(&["INCR", &format!("{tag}:c:{counter}")]).unwrap();
            expect.push(counters[counter].to_string());
            if i == 300 {
                for part in [
                    vec!["MULTI".to_string()],
                    vec!["GET".into(), key.clone()],
                    vec!["SET".into(), key.clone(), "in-multi".into()],
                    vec!["EXEC".into()],
                    vec!["GET".into(), key.clone()],
                ] {
                    conn.send(&part).unwrap();
                }
                expect.extend(["OK", "QUEUED", "QUEUED", "[300, OK]", "in-multi"].map(String::from));
            }
        }
        let got: Vec<String> = expect
            .iter()
            .map(|_| {
                let raw = conn.read_reply_raw().unwrap();
                match Value::parse(&raw, resp3).unwrap() {
                    Value::Array(items) => format!(
                        "[{}]",
                        items.iter().map(|v| v.as_str()).collect::<Vec<_>>().join(", ")
                    ),
                    v => v.as_str(),
                }
            })
            .collect();
        for (n, (want, got)) in expect.iter().zip(&got).enumerate() {
            assert_eq!(want, got, "{tag}: reply {n} of the pipeline");
        }
    }
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
    let acks = Acks::default();
    let writers: Vec<_> = (0..4)
        .map(|t| {
            let (stop, ports, acks) = (stop.clone(), ports.clone(), acks.clone());
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
                            acks.lock().unwrap().push(Instant::now());
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
    let killed = Instant::now();
    std::thread::sleep(Duration::from_millis(1500));
    let (kill_from, kill_to) = (killed, Instant::now());
    c.restart(1);
    std::thread::sleep(Duration::from_millis(1500));
    stop.store(true, Ordering::Relaxed);
    let results: Vec<_> = writers.into_iter().map(|w| w.join().unwrap()).collect();
    // Writes went on while the node was down, not only before and after.
    assert_served_during(
        &acks,
        kill_from,
        kill_to,
        50,
        "one of three killed under plain writes",
    );
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
    eprintln!("{total} acknowledged writes, none lost");
}

/// Compare-and-swap increments (WATCH, GET, MULTI, SET, EXEC) from clients on
/// every node, while a node is killed and restarted, and then another is cut
/// off (frozen with SIGSTOP: its peers' calls time out) and comes back: every
/// key's recorded history is linearizable. A CAS whose outcome is unknown (its
/// node died, or the write reached only a minority) is recorded as such.
type History = Arc<Mutex<HashMap<&'static str, Vec<Event>>>>;

/// Six clients doing CAS increments (WATCH, GET, MULTI, SET, EXEC) on `keys`
/// through the nodes at `ports` until `stop`, recording every read and every
/// CAS (with an unknown outcome where the reply says so) in `history`; each
/// thread answers how many CAS succeeded.
fn cas_clients(
    ports: Vec<u16>,
    keys: &'static [&'static str],
    stop: Arc<AtomicBool>,
    history: History,
    acks: Acks,
    waits: Waits,
) -> Vec<std::thread::JoinHandle<u64>> {
    (0..6)
        .map(|t| {
            let (stop, history, ports, acks, waits) = (
                stop.clone(),
                history.clone(),
                ports.clone(),
                acks.clone(),
                waits.clone(),
            );
            std::thread::spawn(move || {
                let mut node = t % ports.len();
                let mut successes = 0;
                let mut n = 0usize;
                'outer: while !stop.load(Ordering::Relaxed) {
                    let Ok(mut conn) = Conn::connect(ports[node]) else {
                        node = (node + 1) % ports.len();
                        std::thread::sleep(Duration::from_millis(20));
                        continue;
                    };
                    while !stop.load(Ordering::Relaxed) {
                        let key = keys[(n * 7 + t) % keys.len()];
                        n += 1;
                        let Ok(w) = conn.call(&["WATCH", key]) else { break };
                        if w.is_error() {
                            // Refused (no majority from this node): not a busy loop.
                            std::thread::sleep(Duration::from_millis(5));
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
                        waits.lock().unwrap().push(Wait {
                            node,
                            invoked,
                            completed,
                        });
                        let cas = Op::Cas {
                            expected: value,
                            new: next,
                        };
                        let mut h = history.lock().unwrap();
                        let events = h.entry(key).or_default();
                        match exec {
                            Ok(Value::Array(_)) => {
                                successes += 1;
                                acks.lock().unwrap().push(completed);
                                events.push(Event {
                                    op: cas,
                                    invoked,
                                    completed: Some(completed),
                                });
                            }
                            Ok(Value::Nil) => {}
                            // Refusals that changed nothing: no replica took the write.
                            Ok(e)
                                if e.as_str().starts_with("CLUSTERDOWN")
                                    || e.as_str().starts_with("TRYAGAIN") => {}
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
                                node = (node + 1) % ports.len();
                                continue 'outer;
                            }
                        }
                    }
                    node = (node + 1) % ports.len();
                }
                successes
            })
        })
        .collect()
}

/// When each acknowledged write of a load completed.
type Acks = Arc<Mutex<Vec<Instant>>>;

/// One transaction's EXEC, whatever it answered: through which node, and
/// how long its client waited.
#[derive(Clone, Copy)]
struct Wait {
    node: usize,
    invoked: Instant,
    completed: Instant,
}
type Waits = Arc<Mutex<Vec<Wait>>>;

/// Checks that no client of a node other than `except` waited longer than
/// [`MAX_PAUSE_WITH_A_MINORITY_DOWN`] for an EXEC that began and ended in
/// `[from, to]`, whatever it answered: a write that needs a sleeping replica
/// must not stall its client (a refusal or an uncertain answer must come
/// soon too). Clients of the sleeping node itself wait for it, as they would
/// for any stopped server.
fn assert_no_long_wait(waits: &Waits, from: Instant, to: Instant, except: usize, what: &str) {
    let longest = waits
        .lock()
        .unwrap()
        .iter()
        .filter(|w| w.node != except && w.invoked >= from && w.completed <= to)
        .map(|w| w.completed - w.invoked)
        .max()
        .unwrap_or_default();
    eprintln!("{what}: longest EXEC through the other nodes {longest:?}");
    assert!(
        longest <= MAX_PAUSE_WITH_A_MINORITY_DOWN,
        "{what}: a client of a live node waited {longest:?} for its EXEC (bound {MAX_PAUSE_WITH_A_MINORITY_DOWN:?})"
    );
}

/// How long kvd waits for a replica it has no reason to doubt before it
/// counts it as not answering (`PHASE_TIMEOUT` in kvd's proposer).
const KVD_PHASE_TIMEOUT: Duration = Duration::from_secs(1);

/// The longest time the cluster may go without acknowledging any write while
/// a minority of each slot's replicas is down, frozen or cut off: the design
/// promises that such a node's slots keep serving from the other replicas
/// (a request to it times out and goes elsewhere). The first request that
/// needs a node that has just stopped waits out one phase timeout (after
/// that the node is suspect and asked with a much shorter one); the rest of
/// the bound is room for a loaded CI machine (a run there measured 1.003 s).
/// Measured on a quiet machine: under 50 ms.
const MAX_PAUSE_WITH_A_MINORITY_DOWN: Duration = Duration::from_millis(1500);

/// The longest time the cluster may go without acknowledging any write while
/// a join moves slots: a step freezes its slots (at most 2,048) while their
/// records are copied, and the writers, on random keys, all land in frozen
/// slots now and then. Measured with the debug build the tests run: 0.9–1.1 s
/// alone on a quiet machine (the kvd of before this session's changes too),
/// 2.3–2.8 s beside the nemesis test on two cores (both kvds; the 1.5 s bound
/// used before failed there). A client's retry budget (fsclient's 15 s, a
/// command's own 10 s wait for a move) is what it must stay under; the
/// release build's step took 293 ms in `bench replication`.
const MAX_PAUSE_DURING_A_MOVE_STEP: Duration = Duration::from_secs(4);

/// Checks that writes went on during a fault: at least `min` acknowledgements
/// inside `[from, to]`, and no gap longer than [`MAX_PAUSE_WITH_A_MINORITY_DOWN`]
/// (counting from the window's start and to its end). Returns (count, longest gap).
fn assert_served_during(
    acks: &Acks,
    from: Instant,
    to: Instant,
    min: usize,
    what: &str,
) -> (usize, Duration) {
    assert_served_within(acks, from, to, min, MAX_PAUSE_WITH_A_MINORITY_DOWN, what)
}

/// [`assert_served_during`] with another bound on the longest pause.
fn assert_served_within(
    acks: &Acks,
    from: Instant,
    to: Instant,
    min: usize,
    bound: Duration,
    what: &str,
) -> (usize, Duration) {
    let mut inside: Vec<Instant> = acks
        .lock()
        .unwrap()
        .iter()
        .copied()
        .filter(|t| *t >= from && *t <= to)
        .collect();
    inside.sort();
    let mut longest = Duration::ZERO;
    let mut last = from;
    for t in inside.iter().copied().chain(std::iter::once(to)) {
        longest = longest.max(t.duration_since(last));
        last = t;
    }
    eprintln!(
        "{what}: {} writes acknowledged in {:?}, longest pause {longest:?}",
        inside.len(),
        to - from
    );
    assert!(
        inside.len() >= min,
        "{what}: only {} writes acknowledged during the fault",
        inside.len()
    );
    assert!(
        longest <= bound,
        "{what}: no write acknowledged for {longest:?} during the fault (bound {bound:?})"
    );
    (inside.len(), longest)
}

/// [`cas_clients`] running in the background until [`CasLoad::finish`].
struct CasLoad {
    keys: &'static [&'static str],
    /// Also for other load threads of the test, to stop with the clients.
    stop: Arc<AtomicBool>,
    history: History,
    acks: Acks,
    waits: Waits,
    threads: Vec<std::thread::JoinHandle<u64>>,
}

impl CasLoad {
    fn start(c: &Replicated, keys: &'static [&'static str]) -> CasLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let history = History::default();
        let acks = Acks::default();
        let waits = Waits::default();
        let threads = cas_clients(
            c.ports.clone(),
            keys,
            stop.clone(),
            history.clone(),
            acks.clone(),
            waits.clone(),
        );
        CasLoad {
            keys,
            stop,
            history,
            acks,
            waits,
            threads,
        }
    }

    /// Stops the clients, checks every key's history is linearizable, and
    /// answers how many CAS succeeded.
    fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let successes = self.threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert_linearizable(&self.history, self.keys);
        successes
    }
}

/// Every key's history passes the linearizability checker.
fn assert_linearizable(history: &History, keys: &[&'static str]) {
    let history = history.lock().unwrap();
    let origin = history.values().flatten().map(|e| e.invoked).min();
    for key in keys {
        let events = &history[key];
        if !check(events, None) {
            // The history, for whoever has to find out why.
            let origin = origin.expect("events");
            let mut sorted: Vec<&Event> = events.iter().collect();
            sorted.sort_by_key(|e| e.invoked);
            for e in sorted {
                let ms = |t: Instant| t.duration_since(origin).as_secs_f64() * 1000.0;
                eprintln!(
                    "{key} {:>10.3} {:>10} {:?}",
                    ms(e.invoked),
                    e.completed.map(|c| format!("{:.3}", ms(c))).unwrap_or("-".into()),
                    e.op
                );
            }
        }
        assert!(
            check(events, None),
            "{key}: the history of {} operations is not linearizable",
            events.len()
        );
    }
}

#[test]
fn cas_histories_stay_linearizable_while_a_node_is_killed_or_cut_off() {
    let mut c = Replicated::start(3, 3);
    const KEYS: &[&str] = &["lin:a", "lin:b", "lin:c"];
    let load = CasLoad::start(&c, KEYS);
    let (acks, waits) = (load.acks.clone(), load.waits.clone());
    std::thread::sleep(Duration::from_millis(1500));
    c.kill9(1);
    let killed = Instant::now();
    std::thread::sleep(Duration::from_millis(1500));
    let (kill_from, kill_to) = (killed, Instant::now());
    c.restart(1);
    std::thread::sleep(Duration::from_millis(1500));
    c.freeze(2, true);
    let frozen = Instant::now();
    std::thread::sleep(Duration::from_millis(2500));
    let (freeze_from, freeze_to) = (frozen, Instant::now());
    c.freeze(2, false);
    std::thread::sleep(Duration::from_millis(1500));
    let successes = load.finish();
    eprintln!(
        "{successes} successful CAS over {} keys, linearizable",
        KEYS.len()
    );
    // Writes went on inside each fault window, not only before and after it.
    assert_served_during(&acks, kill_from, kill_to, 20, "one of three killed");
    assert_served_during(&acks, freeze_from, freeze_to, 20, "one of three frozen");
    assert_no_long_wait(&waits, freeze_from, freeze_to, 2, "one of three frozen");
}

/// Two clients on two nodes increment one key while the third replica
/// sleeps (SIGSTOP). Every increment that meets the other node's newer ballot
/// falls short of a majority among the two awake replicas and asks the
/// sleeper: it must not wait a full phase timeout each time (it did: a
/// sleeping replica was asked as if it were healthy, so every conflict
/// stalled its client for a second). No increment is lost or doubled: the
/// counter ends at the number acknowledged, plus at most those whose outcome
/// was reported unknown.
#[test]
fn contended_writes_do_not_wait_for_a_sleeping_replica_each_time() {
    let c = Replicated::start(3, 3);
    // The sleeper is known to be away once a call or a probe has missed it.
    c.freeze(2, true);
    assert_eq!(c.conn(0).cmd("SET hot 0").unwrap().as_str(), "OK");
    std::thread::sleep(Duration::from_millis(2500));
    let clients: Vec<_> = [0usize, 1]
        .into_iter()
        .map(|i| {
            let port = c.ports[i];
            std::thread::spawn(move || {
                let mut conn = Conn::connect(port).unwrap();
                let (mut acked, mut unknown, mut longest) = (0u64, 0u64, Duration::ZERO);
                for _ in 0..150 {
                    let t = Instant::now();
                    let reply = conn.cmd("INCR hot").unwrap();
                    longest = longest.max(t.elapsed());
                    match reply.as_int() {
                        Some(_) => acked += 1,
                        None => unknown += 1,
                    }
                }
                (acked, unknown, longest)
            })
        })
        .collect();
    let results: Vec<(u64, u64, Duration)> = clients.into_iter().map(|t| t.join().unwrap()).collect();
    let acked: u64 = results.iter().map(|r| r.0).sum();
    let unknown: u64 = results.iter().map(|r| r.1).sum();
    let longest = results.iter().map(|r| r.2).max().unwrap();
    eprintln!("{acked} increments acknowledged, {unknown} unknown, longest {longest:?}");
    let value = c.conn(0).cmd("GET hot").unwrap().as_int().unwrap() as u64;
    assert!(
        value >= acked && value <= acked + unknown,
        "the counter is {value} after {acked} acknowledged and {unknown} unknown increments"
    );
    assert!(
        longest < KVD_PHASE_TIMEOUT,
        "an increment waited {longest:?} with one replica known to be asleep: a whole phase timeout"
    );
    c.freeze(2, false);
}

/// Node 2 is cut off from the other two (a fault-injection hook on the peer
/// links: each side's calls to the other fail) while CAS clients keep talking
/// to all three: the cut-off node acknowledges nothing, the majority side goes
/// on, every history stays linearizable, and INFO counts the slots whose
/// replicas are out of reach until the partition heals.
#[test]
fn cas_histories_stay_linearizable_across_a_network_partition() {
    let c = Replicated::start_with_env(3, 3, &[("KVD_FAILPOINTS", "partition")]);
    const KEYS: &[&str] = &["part:a", "part:b", "part:c"];
    let load = CasLoad::start(&c, KEYS);
    let acks = load.acks.clone();
    let cut = |i: usize, from: &[usize]| partition(&c, i, from);
    std::thread::sleep(Duration::from_millis(1500));
    cut(2, &[0, 1]);
    cut(0, &[2]);
    cut(1, &[2]);
    let partitioned = Instant::now();
    let refused = c.conn(2).cmd("SET part:x 1").unwrap().as_str();
    assert!(
        refused.starts_with("CLUSTERDOWN"),
        "the cut-off node answered {refused}"
    );
    assert_eq!(c.conn(0).cmd("SET part:y 1").unwrap().as_str(), "OK");
    assert_eq!(c.conn(1).cmd("GET part:y").unwrap().as_str(), "1");
    assert_eq!(
        c.conn(2).cmd("GET part:y").unwrap().as_str().split(' ').next(),
        Some("CLUSTERDOWN")
    );
    let under: usize = info(&c, 0, "kvd_under_replicated_slots").parse().unwrap();
    assert_eq!(under, 16384, "every slot has a replica on the cut-off node");
    std::thread::sleep(Duration::from_millis(2500));
    let healed = Instant::now();
    for i in 0..3 {
        cut(i, &[]);
    }
    std::thread::sleep(Duration::from_millis(1500));
    load.finish();
    assert_served_during(&acks, partitioned, healed, 20, "one of three cut off");
    assert_eq!(c.conn(2).cmd("GET part:y").unwrap().as_str(), "1");
    let deadline = Instant::now() + Duration::from_secs(15);
    while info(&c, 0, "kvd_under_replicated_slots") != "0" {
        assert!(
            Instant::now() < deadline,
            "node 0 still counts under-replicated slots after the heal"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `INFO cluster` field of node `i`.
/// EXEC under WATCH decides on what a majority holds now, not on the node's
/// memory of its own last write: node 0 wrote the key last, then node 1
/// overwrote it while node 0's replica missed that (node 1's calls to node 0
/// were cut). The transaction aborts (a nil reply) instead of answering that
/// its write may or may not have taken effect, and node 1's value stays.
#[test]
fn a_watched_exec_after_another_nodes_write_aborts() {
    let c = Replicated::start_with_env(3, 3, &[("KVD_FAILPOINTS", "partition")]);
    let mut a = c.conn(0);
    let mut b = c.conn(1);
    assert_eq!(a.cmd("SET n 1").unwrap().as_str(), "OK");
    a.cmd("WATCH n").unwrap();
    a.cmd("MULTI").unwrap();
    a.cmd("INCR n").unwrap();
    partition(&c, 1, &[0]);
    assert_eq!(b.cmd("SET n 100").unwrap().as_str(), "OK");
    partition(&c, 1, &[]);
    assert_eq!(a.cmd("EXEC").unwrap(), Value::Nil);
    assert_eq!(c.conn(2).cmd("GET n").unwrap().as_str(), "100");
}

/// A write of the same value is still a write, as in Redis: a SET through
/// another node of the value the key already holds (or an APPEND of nothing)
/// fails a WATCH of the key. The round used to leave an unchanged key alone,
/// so its ballot stayed and the EXEC went through.
#[test]
fn a_watched_exec_aborts_after_a_write_of_the_same_value() {
    let c = Replicated::start(3, 3);
    let (mut a, mut b) = (c.conn(0), c.conn(1));
    assert_eq!(b.cmd("SET w same").unwrap().as_str(), "OK");
    let touches: [&[&str]; 3] = [
        &["SET", "w", "same"],
        &["APPEND", "w", ""],
        &["SET", "w", "same", "KEEPTTL"],
    ];
    for touch in touches {
        a.cmd("WATCH w").unwrap();
        assert!(!b.call(touch).unwrap().is_error(), "{touch:?}");
        a.cmd("MULTI").unwrap();
        a.cmd("SET w mine").unwrap();
        assert_eq!(a.cmd("EXEC").unwrap(), Value::Nil, "after {touch:?}");
        assert_eq!(c.conn(2).cmd("GET w").unwrap().as_str(), "same");
    }
    // Commands that change nothing leave the WATCH alone, as in Redis.
    for no_change in ["GET w", "SET w other NX", "EXPIRE nokey 10"] {
        a.cmd("WATCH w").unwrap();
        b.cmd(no_change).unwrap();
        a.cmd("MULTI").unwrap();
        a.cmd("SET w same").unwrap();
        assert_eq!(
            a.cmd("EXEC").unwrap(),
            Value::Array(vec![Value::Status("OK".into())]),
            "after {no_change}"
        );
    }
}

/// Cuts node `i`'s calls to the nodes `from` (none: heals), through the
/// fault-injection hook (`KVD_FAILPOINTS=partition`).
fn partition(c: &Replicated, i: usize, from: &[usize]) {
    let mut args = vec!["KVD.PARTITION".to_string()];
    args.extend(from.iter().map(|&j| c.addr(j)));
    assert_eq!(c.conn(i).call(&args).unwrap().as_str(), "OK");
}

/// The members node `i` lists (`kvd_replica_members`), sorted.
fn member_list(c: &Replicated, i: usize) -> Vec<String> {
    let mut m: Vec<String> = info(c, i, "kvd_replica_members")
        .split(',')
        .filter(|m| !m.is_empty())
        .map(String::from)
        .collect();
    m.sort();
    m
}

/// Whether node `i` lists `addr` as a member.
fn is_member(c: &Replicated, i: usize, addr: &str) -> bool {
    member_list(c, i).iter().any(|m| m == addr)
}

/// Whether node `i` is in no membership change: no slot frozen, no
/// transition under way (a large change goes in steps).
fn settled(c: &Replicated, i: usize) -> bool {
    info(c, i, "kvd_replica_frozen_slots") == "0" && info(c, i, "kvd_replica_change_in_progress") == "0"
}

/// Whether every node of `on` has taken `addr` out and counts no slot short
/// of its copies.
fn taken_out_and_rehomed(c: &Replicated, on: &[usize], addr: &str) -> bool {
    on.iter().all(|&i| !is_member(c, i, addr))
        && on
            .iter()
            .all(|&i| info(c, i, "kvd_under_replicated_slots") == "0")
}

fn info(c: &Replicated, i: usize, field: &str) -> String {
    let text = c.conn(i).cmd("INFO cluster").unwrap().as_str();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in INFO cluster of node {i}: {text}"))
        .trim()
        .to_string()
}

/// A node joins a 3-node cluster and another leaves (while it is down), with
/// CAS clients and a writer running throughout: every key written before,
/// every acknowledged write, and every deletion survive, the CAS histories stay
/// linearizable, the node that left learns it when it is back and (having
/// been taken out while away, not told to leave) is added again, and a change
/// that cannot reach a node it adds changes nothing.
#[test]
fn nodes_join_and_leave_under_load_and_nothing_acknowledged_is_lost() {
    let mut c = Replicated::start(3, 3);
    let new = c.add_node();
    let mut a = c.conn(0);
    seed(&mut a, "seed", 600);
    for i in 0..60 {
        assert_eq!(a.call(&["DEL", &format!("seed:{i}")]).unwrap().as_int(), Some(1));
    }
    let waiting = c.conn(new).cmd("GET seed:100").unwrap().as_str();
    assert!(
        waiting.starts_with("CLUSTERDOWN"),
        "a node not yet added answered {waiting}"
    );

    const KEYS: &[&str] = &["lin:a", "lin:b", "lin:c", "lin:d"];
    let load = CasLoad::start(&c, KEYS);
    let writer = {
        let (stop, ports) = (load.stop.clone(), c.ports.clone());
        std::thread::spawn(move || {
            let mut acked = Vec::new();
            let mut j = 0u64;
            while !stop.load(Ordering::Relaxed) {
                j += 1;
                let Ok(mut conn) = Conn::connect(ports[(j as usize) % 3 + 1]) else {
                    continue;
                };
                if let Ok(v) = conn.call(&["SET", &format!("w:{j}"), &j.to_string()]) {
                    if v.as_str() == "OK" {
                        acked.push(j);
                    }
                }
            }
            acked
        })
    };
    std::thread::sleep(Duration::from_millis(1000));

    // Join: node 3 becomes a member; every node learns version 2.
    let four: Vec<String> = (0..4).map(|i| c.addr(i)).collect();
    let mut args = vec!["KVD.RECONFIGURE".to_string()];
    args.extend(four.iter().cloned());
    let reply = c.conn(1).call(&args).unwrap();
    assert_eq!(reply.as_str(), "OK", "joining: {reply:?}");
    // A join moves three quarters of the slots: several versions, each
    // moving at most 2,048 slots; every node ends at the last.
    let joined = info(&c, 1, "kvd_replica_config_version");
    assert!(joined.parse::<u64>().unwrap() > 2, "a join in one step: {joined}");
    for i in 0..4 {
        assert_eq!(info(&c, i, "kvd_replica_config_version"), joined, "node {i}");
        assert_eq!(info(&c, i, "kvd_replica_members"), four.join(","), "node {i}");
        assert_eq!(info(&c, i, "kvd_replica_frozen_slots"), "0", "node {i}");
    }
    assert!(info(&c, 1, "kvd_reconfigure_slots_moved").parse::<u64>().unwrap() > 0);
    std::thread::sleep(Duration::from_millis(1000));

    // Leave, while the leaving node is down: a majority of every slot's
    // holders is still there to copy from.
    c.kill9(0);
    std::thread::sleep(Duration::from_millis(500));
    let three: Vec<String> = (1..4).map(|i| c.addr(i)).collect();
    let mut args = vec!["KVD.RECONFIGURE".to_string()];
    args.extend(three.iter().cloned());
    let reply = c.conn(new).call(&args).unwrap();
    assert_eq!(reply.as_str(), "OK", "leaving: {reply:?}");
    std::thread::sleep(Duration::from_millis(1000));
    let successes = load.finish();
    let acked = writer.join().unwrap();
    assert!(successes > 50, "only {successes} CAS succeeded");
    assert!(acked.len() > 50, "only {} writes were acknowledged", acked.len());

    // Everything, through every remaining node.
    for i in 1..4 {
        let mut conn = c.conn(i);
        for k in (0..600).step_by(7) {
            let got = conn.call(&["GET", &format!("seed:{k}")]).unwrap();
            if k < 60 {
                assert_eq!(got, Value::Nil, "seed:{k} was deleted (node {i})");
            } else {
                assert_eq!(got.as_str(), format!("v{k}"), "seed:{k} (node {i})");
            }
        }
    }
    let mut conn = c.conn(2);
    for j in &acked {
        assert_eq!(
            conn.call(&["GET", &format!("w:{j}")]).unwrap().as_str(),
            j.to_string(),
            "w:{j}"
        );
    }

    // The node that left comes back with its old membership: it learns the
    // new one from the others, and, taken out only because it was away (not
    // told to leave), asks to be added again: a member once more, serving
    // every key.
    c.restart(0);
    let mut want: Vec<String> = (0..4).map(|j| c.addr(j)).collect();
    want.sort();
    let four = |i: usize| member_list(&c, i) == want && settled(&c, i);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !(0..4).all(four) {
        assert!(Instant::now() < deadline, "node 0 was not added again");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(info(&c, 0, "kvd_replica_config_version").parse::<u64>().unwrap() >= 4);
    assert_eq!(c.conn(0).cmd("GET seed:300").unwrap().as_str(), "v300");

    // Adding a node that does not answer changes nothing.
    let version = info(&c, 1, "kvd_replica_config_version");
    let mut args = vec!["KVD.RECONFIGURE".to_string()];
    args.extend(info(&c, 1, "kvd_replica_members").split(',').map(String::from));
    args.push("127.0.0.1:1".into());
    let reply = c.conn(1).call(&args).unwrap();
    assert!(
        reply.as_str().starts_with("ERR cannot add 127.0.0.1:1"),
        "{reply:?}"
    );
    assert_eq!(info(&c, 1, "kvd_replica_config_version"), version);
    assert_eq!(c.conn(3).cmd("GET seed:300").unwrap().as_str(), "v300");
}

/// fsclient writes files through one node while another is killed and
/// restarted; afterwards every file it committed reads back intact and fsck
/// finds nothing damaged.
#[test]
fn a_file_system_on_top_survives_a_killed_node() {
    let mut c = Replicated::start(3, 3);
    let url = c.url(0);
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

/// fsclient talks to a kvd cluster through any member, not by slot: with
/// the node CLUSTER SLOTS lists first for the volume's root asleep, a put
/// through a live node succeeds. (A kvd cluster says
/// `cluster_enabled:1`; fsclient took that for a Redis Cluster and routed the
/// root to the dead node until the others noticed it, which failed the put
/// with EIO in a CI run.)
#[test]
fn fsclient_is_not_held_up_by_a_dead_first_holder() {
    let c = Replicated::start(3, 3);
    let ports = c.ports.clone();
    let url = |i: usize| format!("redis://127.0.0.1:{}", ports[i]);
    let put = |url: &str, name: &str| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(name);
        std::fs::write(&path, name.repeat(1000)).unwrap();
        protocol_tests::fsclient_at(url, &["put", path.to_str().unwrap(), &format!("/{name}")])
    };
    assert!(protocol_tests::fsclient_at(&url(0), &["mkfs"]).status.success());
    assert!(put(&url(0), "before").status.success());
    let slot = c
        .conn(0)
        .call(&["CLUSTER", "KEYSLOT", "dfs:v:main:root"])
        .unwrap()
        .as_int()
        .unwrap();
    let Value::Array(ranges) = c.conn(0).cmd("CLUSTER SLOTS").unwrap() else {
        panic!("CLUSTER SLOTS answers an array")
    };
    let first = ranges
        .iter()
        .find_map(|r| match r {
            Value::Array(p) if p[0].as_int()? <= slot && slot <= p[1].as_int()? => match &p[2] {
                Value::Array(node) => node[1].as_int(),
                _ => None,
            },
            _ => None,
        })
        .expect("the root's slot is listed");
    let dead = c.ports.iter().position(|&p| p as i64 == first).unwrap();
    let live = (dead + 1) % 3;
    // Stopped, not killed: its socket takes connections and never answers,
    // as a desktop that went to sleep.
    c.freeze(dead, true);
    let out = put(&url(live), "after");
    c.freeze(dead, false);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let cat = protocol_tests::fsclient_at(&url(live), &["cat", "/after"]);
    assert_eq!(cat.stdout, "after".repeat(1000).into_bytes());
}

/// Sets `{prefix}:{i}` to `v{i}` for i in 0..n.
fn seed(conn: &mut Conn, prefix: &str, n: usize) {
    for i in 0..n {
        let reply = conn
            .call(&["SET", &format!("{prefix}:{i}"), &format!("v{i}")])
            .unwrap();
        assert_eq!(reply.as_str(), "OK", "SET {prefix}:{i}");
    }
}

/// `KVD.RECONFIGURE` of `nodes` through node `via`. A change answers once
/// all its steps are done, which under a loaded CI machine can take longer
/// than a client's default 10 s: the tests bound the writers' pauses, not
/// the change's length.
fn reconfigure(c: &Replicated, via: usize, nodes: &[usize]) -> Value {
    let mut args = vec!["KVD.RECONFIGURE".to_string()];
    args.extend(nodes.iter().map(|&i| c.addr(i)));
    let mut conn = c.conn(via);
    conn.set_reply_timeout(Duration::from_secs(120)).unwrap();
    conn.call(&args).unwrap()
}

/// A node joining a 3-node cluster with R=3 changes the replica set of three
/// quarters of the slots. The change goes in steps of at most 2,048 slots,
/// each frozen only while its own copy runs, so writers to the other slots
/// go on: across three writers, the cluster never goes longer than
/// [`MAX_PAUSE_WITH_A_MINORITY_DOWN`] without acknowledging a write. (With every moving slot frozen for the whole copy,
/// as before, every writer waited for all of it: 2.5 s here.)
#[test]
fn a_join_moves_slots_in_steps_and_writers_go_on() {
    let mut c = Replicated::start(3, 3);
    let new = c.add_node();
    // Enough data that copying it takes a while: 20,000 keys of 1 KB.
    let mut a = c.conn(0);
    let value = "x".repeat(1000);
    for batch in 0..40 {
        for i in 0..500 {
            a.send(&["SET", &format!("bulk:{batch}:{i}"), &value]).unwrap();
        }
        for _ in 0..500 {
            let reply = a.read_reply_raw().unwrap();
            assert_eq!(reply, b"+OK\r\n", "{}", String::from_utf8_lossy(&reply));
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    let acks = Acks::default();
    let writers = plain_writers(c.ports[..3].to_vec(), stop.clone(), acks.clone());
    std::thread::sleep(Duration::from_millis(500));
    // What INFO on another node says while the change goes on.
    let progress = {
        let (port, stop) = (c.ports[2], stop.clone());
        std::thread::spawn(move || {
            let mut seen: Vec<(String, u64)> = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                if let Ok(Value::Bulk(text)) = Conn::connect(port).and_then(|mut c| c.cmd("INFO cluster")) {
                    let text = String::from_utf8_lossy(&text);
                    let field = |f: &str| {
                        text.lines()
                            .find_map(|l| l.strip_prefix(&format!("{f}:")))
                            .unwrap_or("")
                            .trim()
                            .to_string()
                    };
                    let left = field("kvd_replica_slots_left_to_move").parse().unwrap_or(0);
                    seen.push((field("kvd_replica_change_in_progress"), left));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            seen
        })
    };
    let from = Instant::now();
    let reply = reconfigure(&c, 1, &[0, 1, 2, new]);
    let to = Instant::now();
    assert_eq!(reply.as_str(), "OK", "{reply:?}");
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let acked: Vec<String> = writers.into_iter().flat_map(|w| w.join().unwrap()).collect();
    let seen = progress.join().unwrap();
    let during: Vec<u64> = seen.iter().filter(|(on, _)| on == "1").map(|(_, l)| *l).collect();
    assert!(
        during.iter().any(|&l| l > 0),
        "INFO never showed the change under way: {seen:?}"
    );
    assert!(
        during.windows(2).all(|w| w[1] <= w[0]),
        "slots left went up: {during:?}"
    );
    assert_eq!(seen.last().map(|(on, l)| (on.as_str(), *l)), Some(("0", 0)));
    let version: u64 = info(&c, 1, "kvd_replica_config_version").parse().unwrap();
    eprintln!("the join took {:?} in {} versions", to - from, version - 1);
    assert_served_within(
        &acks,
        from,
        to,
        10,
        MAX_PAUSE_DURING_A_MOVE_STEP,
        "a node joining",
    );
    assert!(version > 2, "the join went in one step");
    // The copies were made by the old holders, each its share, not all
    // relayed through the node that ran the change (node 1).
    let copied: Vec<u64> = (0..3)
        .map(|i| info(&c, i, "kvd_reconfigure_keys_copied").parse().unwrap())
        .collect();
    eprintln!("keys copied by nodes 0, 1, 2: {copied:?}");
    assert!(
        copied.iter().all(|&n| n > 0),
        "not every old holder copied: {copied:?}"
    );
    // Everything reads back through the new node.
    let mut n = c.conn(new);
    for key in acked.iter().step_by(13) {
        assert!(n.call(&["GET", key]).unwrap().as_str().starts_with('v'), "{key}");
    }
    for batch in (0..40).step_by(7) {
        assert_eq!(
            n.call(&["GET", &format!("bulk:{batch}:7")]).unwrap().as_str(),
            value
        );
    }
}

/// A change whose driver stops between its steps (a fail point makes the
/// first driver stop after one) rests half-way, every slot served by its old
/// or its new replicas; after 30 s the cluster's coordinator finishes it by
/// itself, and every key reads back through the new node.
#[test]
fn a_change_stopped_between_its_steps_is_finished_by_the_coordinator() {
    let mut c = Replicated::start_with_env(3, 3, &[("KVD_FAILPOINTS", "reconfigure-one-step")]);
    let new = c.add_node();
    let mut a = c.conn(0);
    pipelined_sets(&mut a, "k", 0..2000, "v");
    let reply = reconfigure(&c, 0, &[0, 1, 2, new]);
    assert!(reply.as_str().contains("stopped after one step"), "{reply:?}");
    assert_eq!(info(&c, 1, "kvd_replica_change_in_progress"), "1");
    let left: u64 = info(&c, 1, "kvd_replica_slots_left_to_move").parse().unwrap();
    assert!(left > 0, "nothing left to move after one step");
    // Half-way, every key is served.
    for i in (0..2000).step_by(41) {
        assert_eq!(a.call(&["GET", &format!("k:{i}")]).unwrap().as_str(), "v");
    }
    let stopped = Instant::now();
    let deadline = stopped + Duration::from_secs(90);
    while !(0..4).all(|i| settled(&c, i)) {
        assert!(Instant::now() < deadline, "the change was never finished");
        std::thread::sleep(Duration::from_millis(500));
    }
    eprintln!(
        "finished by the coordinator {:?} after it stopped",
        stopped.elapsed()
    );
    let four: Vec<String> = (0..4).map(|i| c.addr(i)).collect();
    assert_eq!(info(&c, new, "kvd_replica_members"), four.join(","));
    let mut n = c.conn(new);
    for i in (0..2000).step_by(41) {
        assert_eq!(n.call(&["GET", &format!("k:{i}")]).unwrap().as_str(), "v");
    }
}

/// Two reconfigurations started at once cannot both take effect (at most one
/// answers OK: the one that learns of the other's chosen layout finishes that
/// one instead of its own and says so), and a cluster can move to entirely new nodes: once
/// the old ones are all gone, every key written before reads back from the new
/// ones alone (so the copy, not the old replicas, holds the data).
#[test]
fn racing_reconfigurations_agree_and_data_moves_to_all_new_nodes() {
    let mut c = Replicated::start(3, 3);
    let mut a = c.conn(0);
    seed(&mut a, "k", 400);
    assert_eq!(a.cmd("DEL k:0").unwrap().as_int(), Some(1));
    let (d, e) = (c.add_node(), c.add_node());
    let version_before: u64 = info(&c, 0, "kvd_replica_config_version").parse().unwrap();
    // Two different changes at once, from two nodes.
    let (left, right) = std::thread::scope(|s| {
        let l = s.spawn(|| reconfigure(&c, 0, &[0, 1, 2, d]));
        let r = s.spawn(|| reconfigure(&c, 1, &[0, 1, 2, e]));
        (l.join().unwrap(), r.join().unwrap())
    });
    eprintln!("racing reconfigurations answered {left:?} and {right:?}");
    let (left_ok, right_ok) = (left.as_str() == "OK", right.as_str() == "OK");
    // A coordinator answers OK only once its own list is in force, and one
    // that meets the other's change finishes that one and says so: two OKs
    // would mean both changes took effect, one after the other.
    assert!(!(left_ok && right_ok), "both changes took effect");
    if left_ok || right_ok {
        // The one that answered OK is in force, whole: never a mix.
        let version: u64 = info(&c, 0, "kvd_replica_config_version").parse().unwrap();
        let members = info(&c, 0, "kvd_replica_members");
        let has = |i: usize| members.split(',').any(|m| m == c.addr(i));
        assert!(version > version_before);
        assert_eq!(has(d), left_ok, "members {members}");
        assert_eq!(has(e), right_ok, "members {members}");
    } else {
        assert!(left.is_error() && right.is_error(), "{left:?} {right:?}");
    }
    // Whatever happened, one more run settles it: every node agrees.
    let settle = reconfigure(&c, 2, &[0, 1, 2, d]);
    assert!(
        !settle.is_error() || settle.as_str().contains("finished an interrupted"),
        "{settle:?}"
    );
    let members = info(&c, 0, "kvd_replica_members");
    let version = info(&c, 0, "kvd_replica_config_version");
    for i in 1..3 {
        assert_eq!(info(&c, i, "kvd_replica_members"), members, "node {i}");
        assert_eq!(info(&c, i, "kvd_replica_config_version"), version, "node {i}");
    }
    assert!(members.split(',').count() == 4, "{members}");

    // Move everything to the two new nodes and one more, then take every old
    // node away.
    let f = c.add_node();
    let reply = reconfigure(&c, 0, &[d, e, f]);
    assert_eq!(reply.as_str(), "OK", "{reply:?}");
    for i in 0..3 {
        c.kill9(i);
    }
    let mut conn = c.conn(f);
    assert_eq!(conn.cmd("GET k:0").unwrap(), Value::Nil);
    for i in 1..400 {
        assert_eq!(
            conn.call(&["GET", &format!("k:{i}")]).unwrap().as_str(),
            format!("v{i}"),
            "k:{i}"
        );
    }
    assert_eq!(conn.cmd("SET after move").unwrap().as_str(), "OK");
    assert_eq!(c.conn(d).cmd("GET after").unwrap().as_str(), "move");
}

/// Issue 23, item 2: while a change of membership is under way, INFO cluster
/// says how many keys and bytes each node holds of the slots still to move
/// (each record counted with its header, kept as records change and counted
/// again at start), and both go back to 0 when the change is done.
#[test]
fn info_says_what_a_change_has_left_to_copy() {
    let mut c = Replicated::start(3, 3);
    c.restart_with_env(0, &[("KVD_FAILPOINTS", "reconfigure-after-freeze")]);
    let mut a = c.conn(1);
    let value = "x".repeat(1000);
    for i in 0..300 {
        assert_eq!(
            a.call(&["SET", &format!("k:{i}"), &value]).unwrap().as_str(),
            "OK"
        );
    }
    // Deleted and rewritten keys count once, at their record's size now.
    for i in 0..20 {
        assert_eq!(
            a.call(&["SET", &format!("k:{i}"), &value]).unwrap().as_str(),
            "OK"
        );
    }
    assert_eq!(
        info(&c, 1, "kvd_replica_keys_to_copy"),
        "0",
        "no change under way"
    );
    let d = c.add_node();
    let reply = reconfigure(&c, 0, &[0, 1, 2, d]);
    assert!(reply.as_str().contains("stopped after freezing"), "{reply:?}");
    let left = |c: &Replicated| -> (u64, u64, u64) {
        let n = |f: &str| info(c, 1, f).parse::<u64>().unwrap();
        (
            n("kvd_replica_slots_left_to_move") + n("kvd_replica_frozen_slots"),
            n("kvd_replica_keys_to_copy"),
            n("kvd_replica_bytes_to_copy"),
        )
    };
    let (slots, keys, bytes) = left(&c);
    assert!(slots > 0, "no slot frozen or left to move");
    // About a quarter of the slots move to the new node; with three nodes
    // every node holds every slot.
    assert!(keys > 30 && keys < 150, "{keys} keys to copy of 300");
    // Every record here is a 1,000-byte value and a 42-byte header (26 and
    // the base ballot).
    assert_eq!(bytes, keys * 1042);
    // Counted again from the disk at start: the same figures.
    c.restart(1);
    assert_eq!(left(&c), (slots, keys, bytes));
    let reply = reconfigure(&c, 1, &[0, 1, 2, d]);
    assert!(
        reply.as_str().contains("finished an interrupted reconfiguration") || reply.as_str() == "OK",
        "{reply:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while left(&c) != (0, 0, 0) {
        assert!(Instant::now() < deadline, "still to copy: {:?}", left(&c));
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A reconfiguration that stops half-way (its coordinator fails after the vote
/// and the freeze) leaves the moving slots refusing with TRYAGAIN, not serving
/// stale data; the next reconfiguration, whatever list it asks for, finishes
/// the interrupted one first, and nothing is lost.
#[test]
fn an_interrupted_reconfiguration_is_finished_by_the_next() {
    let mut c = Replicated::start(3, 3);
    c.restart_with_env(0, &[("KVD_FAILPOINTS", "reconfigure-after-freeze")]);
    c.restart_with_env(2, &[("KVD_FAILPOINTS", "reconfigure-after-vote")]);
    let mut a = c.conn(1);
    // The first command refused as moving waits out the move for up to 10 s
    // before the node calls the move stuck: longer than the default timeout.
    a.set_reply_timeout(Duration::from_secs(30)).unwrap();
    seed(&mut a, "k", 300);
    let (d, e) = (c.add_node(), c.add_node());
    let reply = reconfigure(&c, 0, &[0, 1, 2, d]);
    assert!(reply.as_str().contains("stopped after freezing"), "{reply:?}");
    assert_eq!(info(&c, 1, "kvd_replica_config_version"), "1");
    let frozen: usize = info(&c, 1, "kvd_replica_frozen_slots").parse().unwrap();
    assert!(frozen > 0, "no slot frozen");
    // Some key lives in a frozen slot: it is refused, not answered from a
    // replica that may be stale.
    let refused = (0..300)
        .filter(|i| {
            let v = a.call(&["GET", &format!("k:{i}")]).unwrap();
            assert!(
                v.as_str() == format!("v{i}") || v.as_str().starts_with("TRYAGAIN"),
                "k:{i}: {v:?}"
            );
            v.is_error()
        })
        .count();
    assert!(refused > 0, "no key of a frozen slot was refused");
    // A file system whose root pointer is in a frozen slot: fsclient waits
    // out TRYAGAIN (for a while) instead of failing.
    let volume = (0..100)
        .map(|i| format!("vol{i}"))
        .find(|v| {
            let root = format!("dfs:v:{v}:root");
            a.call(&["GET", &root]).unwrap().as_str().starts_with("TRYAGAIN")
        })
        .expect("some volume's root key is in a frozen slot");
    let url = c.url(2);
    let mkfs = {
        let (url, volume) = (url.clone(), volume.clone());
        std::thread::spawn(move || protocol_tests::fsclient_at(&url, &["--volume", &volume, "mkfs"]))
    };
    std::thread::sleep(Duration::from_millis(1000));
    // Another list, through another node: the interrupted change wins first.
    let reply = reconfigure(&c, 1, &[0, 1, 2, e]);
    assert!(
        reply.as_str().contains("finished an interrupted reconfiguration"),
        "{reply:?}"
    );
    let out = mkfs.join().unwrap();
    assert!(
        out.status.success(),
        "mkfs during the move: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = protocol_tests::fsclient_at(&url, &["--volume", &volume, "ls", "/"]);
    assert!(
        out.status.success(),
        "ls: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let members = [0, 1, 2, d].map(|i| c.addr(i)).join(",");
    for i in [0, 1, 2, d] {
        assert_eq!(info(&c, i, "kvd_replica_members"), members, "node {i}");
        assert_eq!(info(&c, i, "kvd_replica_frozen_slots"), "0", "node {i}");
    }
    for i in 0..300 {
        assert_eq!(
            a.call(&["GET", &format!("k:{i}")]).unwrap().as_str(),
            format!("v{i}"),
            "k:{i}"
        );
    }
    // Run again, it makes the change asked for.
    let reply = reconfigure(&c, 1, &[0, 1, 2, d, e]);
    assert_eq!(reply.as_str(), "OK", "{reply:?}");
    let five = [0, 1, 2, d, e].map(|i| c.addr(i)).join(",");
    assert_eq!(info(&c, e, "kvd_replica_members"), five);
    assert_eq!(
        info(&c, e, "kvd_replica_config_version"),
        info(&c, 1, "kvd_replica_config_version")
    );
    // A coordinator that stops after the vote's promises (before anything is
    // accepted or frozen) binds nobody: the next change is the one asked for.
    let reply = reconfigure(&c, 2, &[0, 1, 2]);
    assert!(reply.as_str().contains("stopped after the vote"), "{reply:?}");
    assert_eq!(info(&c, 1, "kvd_replica_frozen_slots"), "0");
    let reply = reconfigure(&c, 1, &[0, 1, 2, d]);
    assert_eq!(reply.as_str(), "OK", "{reply:?}");
    let members = [0, 1, 2, d].map(|i| c.addr(i)).join(",");
    assert_eq!(info(&c, 2, "kvd_replica_members"), members);
    assert_eq!(
        info(&c, 2, "kvd_replica_config_version"),
        info(&c, 1, "kvd_replica_config_version")
    );
}

/// Five nodes keeping each key on three: every key has its own three
/// replicas (not all nodes), and killing any one node (here two in turn, the
/// first restarted before the second goes) loses nothing and keeps CAS
/// histories linearizable.
#[test]
fn five_nodes_with_three_replicas_lose_nothing_when_one_is_killed() {
    let mut c = Replicated::start(5, 3);
    let mut a = c.conn(0);
    seed(&mut a, "k", 300);
    // Each node stores only the keys of its slots: about 3/5 of them. A
    // write is acknowledged once two of its three replicas have it, so the
    // third copy of the last keys may still be on its way: give it a moment.
    let count = || -> Vec<usize> { (0..5).map(|i| stored_keys(&c, i, "k:")).collect() };
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut stored = count();
    while stored.iter().sum::<usize>() < 900 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        stored = count();
    }
    assert_eq!(
        stored.iter().sum::<usize>(),
        900,
        "three copies of each key: {stored:?}"
    );
    assert!(
        stored.iter().all(|&n| n < 300),
        "some node holds every key: {stored:?}"
    );

    const KEYS: &[&str] = &["five:a", "five:b", "five:c", "five:d"];
    let load = CasLoad::start(&c, KEYS);
    let acks = load.acks.clone();
    std::thread::sleep(Duration::from_millis(1000));
    c.kill9(1);
    let first = Instant::now();
    std::thread::sleep(Duration::from_millis(1500));
    let first = (first, Instant::now());
    c.restart(1);
    std::thread::sleep(Duration::from_millis(1000));
    c.kill9(3);
    let second = Instant::now();
    std::thread::sleep(Duration::from_millis(1500));
    let second = (second, Instant::now());
    load.finish();
    assert_served_during(&acks, first.0, first.1, 20, "node 1 of 5 killed");
    assert_served_during(&acks, second.0, second.1, 20, "node 3 of 5 killed");
    for i in [0, 1, 2, 4] {
        let mut conn = c.conn(i);
        for k in (0..300).step_by(11) {
            assert_eq!(
                conn.call(&["GET", &format!("k:{k}")]).unwrap().as_str(),
                format!("v{k}"),
                "k:{k} via node {i}"
            );
        }
    }
}

/// Issue 23: tombstones are purged once it is safe, and only then. 100 keys
/// are written, one of the three replicas is killed, the keys are deleted
/// through the other two: while it is away nothing is purged (it still holds
/// the old values; purging the others' tombstones would let a later read
/// find only the old value and bring it back). Once it is back, anti-entropy
/// delivers the tombstones, then purges them from every replica: no record of
/// the keys is left on any node's disk, and no value comes back, through any
/// node, before or after every node restarts.
#[test]
fn tombstones_are_purged_from_every_replica_once_all_hold_them_and_nothing_comes_back() {
    let mut c = Replicated::start(3, 3);
    let mut a = c.conn(0);
    for i in 0..100 {
        assert_eq!(a.call(&["SET", &format!("d{i}"), "old"]).unwrap().as_str(), "OK");
    }
    c.kill9(2);
    for i in 0..100 {
        assert_eq!(a.call(&["DEL", &format!("d{i}")]).unwrap(), Value::Int(1));
    }
    let purged =
        |c: &Replicated, i: usize| -> u64 { info(c, i, "kvd_tombstones_purged").parse().unwrap_or(0) };
    let records = |c: &Replicated, i: usize| -> u64 {
        let text = c.conn(i).cmd("INFO keyspace").unwrap().as_str();
        text.lines()
            .find_map(|l| l.strip_prefix("db0:keys="))
            .and_then(|v| v.split(',').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    // Several anti-entropy passes (one every few seconds) with a replica away.
    std::thread::sleep(Duration::from_secs(6));
    assert_eq!(
        purged(&c, 0) + purged(&c, 1),
        0,
        "purged while a replica was away"
    );
    assert_eq!(records(&c, 0), 100, "the tombstones stay while a replica is away");
    c.restart(2);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left: u64 = (0..3).map(|i| records(&c, i)).sum();
        if left == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{left} records left on the three nodes"
        );
        for i in 0..100 {
            // Nothing comes back meanwhile, through any node.
            let got = c.conn(i % 3).call(&["GET", &format!("d{i}")]).unwrap();
            assert_eq!(got, Value::Nil, "d{i} via node {}", i % 3);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!((0..3).map(|i| purged(&c, i)).sum::<u64>() >= 100);
    for i in 0..3 {
        c.restart(i);
    }
    for node in 0..3 {
        let mut conn = c.conn(node);
        for i in 0..100 {
            assert_eq!(
                conn.call(&["GET", &format!("d{i}")]).unwrap(),
                Value::Nil,
                "d{i} via node {node}"
            );
        }
    }
    // Written again, a purged key is an ordinary key.
    assert_eq!(a_conn_set(&c, "d7", "new"), "OK");
    assert_eq!(c.conn(1).call(&["GET", "d7"]).unwrap().as_str(), "new");
}

fn a_conn_set(c: &Replicated, key: &str, value: &str) -> String {
    c.conn(0).call(&["SET", key, value]).unwrap().as_str()
}

/// Issue 23, "asleep versus gone": three nodes (R = 3, `--down-after 3s`), a
/// fourth started with `--seed` adds itself; one is then killed for good
/// while writers run. At once it is only *suspect* (still a member, its
/// slots served by the others); after `--down-after` the coordinator takes it
/// out and re-homes its replicas on the live nodes, with nobody acting: every
/// slot is back at three copies, and every acknowledged write and every
/// earlier key reads back through every live node. `CLUSTER FORGET` takes a
/// node out at once.
#[test]
fn a_node_gone_for_good_is_replaced_without_anyone_acting() {
    let mut c = Replicated::start_with_args(3, 3, &["--down-after", "3s"]);
    seed(&mut c.conn(0), "early", 500);
    let joined = c.add_seeded_node(0);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !(0..4).all(|i| is_member(&c, i, &c.addr(joined))) {
        assert!(Instant::now() < deadline, "the seeded node never became a member");
        std::thread::sleep(Duration::from_millis(200));
    }
    // Writers through the nodes that stay.
    let stop = Arc::new(AtomicBool::new(false));
    let ports = [c.ports[0], c.ports[2], c.ports[joined]];
    let writers: Vec<_> = (0..3)
        .map(|t| {
            let (stop, port) = (stop.clone(), ports[t]);
            std::thread::spawn(move || {
                let mut conn = Conn::connect(port).unwrap();
                let mut acked = Vec::new();
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let key = format!("w{t}:{n}");
                    let reply = conn.call(&["SET", &key, "v"]).unwrap();
                    if !reply.is_error() {
                        acked.push(key);
                    } else {
                        let text = reply.as_str();
                        // A command on a slot being moved waits for the move
                        // (no TRYAGAIN); a write that raced the move's freeze
                        // may still end with an unknown outcome (a later
                        // slice of the issue removes that race). Nothing else
                        // is allowed.
                        assert!(text.contains("may or may not"), "{text}");
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
                acked
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let gone = c.addr(1);
    c.kill9(1);
    // Suspect at once, not yet down: still a member.
    let killed = Instant::now();
    while !info(&c, 0, "kvd_replica_suspect_nodes").contains(&gone) {
        assert!(killed.elapsed() < Duration::from_secs(3), "never suspect");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(is_member(&c, 0, &gone), "taken out before --down-after");
    // Down after 3 s, then taken out and re-homed.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !taken_out_and_rehomed(&c, &[0, 2, joined], &gone) {
        assert!(
            Instant::now() < deadline,
            "the dead node's replicas were not re-homed"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let took = killed.elapsed();
    assert!(
        took >= Duration::from_secs(3),
        "re-homed after {took:?}, before --down-after"
    );
    eprintln!("killed node taken out and its replicas re-homed {took:?} after the kill");
    stop.store(true, Ordering::Relaxed);
    let acked: Vec<String> = writers.into_iter().flat_map(|w| w.join().unwrap()).collect();
    assert!(acked.len() > 100, "{} writes acknowledged", acked.len());
    let removed: u64 = [0, 2, joined]
        .iter()
        .map(|&i| info(&c, i, "kvd_down_members_removed").parse::<u64>().unwrap())
        .sum();
    assert_eq!(removed, 1, "one coordinator took it out");
    for &i in &[0, 2, joined] {
        let mut conn = c.conn(i);
        for k in 0..500 {
            assert_eq!(
                conn.call(&["GET", &format!("early:{k}")]).unwrap().as_str(),
                format!("v{k}"),
                "via node {i}"
            );
        }
        for key in &acked {
            assert_eq!(
                conn.call(&["GET", key]).unwrap().as_str(),
                "v",
                "{key} via node {i}"
            );
        }
    }
    // CLUSTER FORGET: at once, re-homing (three members left for R = 3).
    let forgotten = c.addr(joined);
    assert_eq!(
        c.conn(0)
            .call(&["CLUSTER", "FORGET", &forgotten])
            .unwrap()
            .as_str(),
        "OK"
    );
    assert!(!is_member(&c, 0, &forgotten) && !is_member(&c, 2, &forgotten));
    // Told to leave while it runs, it does not ask back in.
    std::thread::sleep(Duration::from_secs(5));
    assert!(
        !is_member(&c, 0, &forgotten) && !is_member(&c, 2, &forgotten),
        "the forgotten node was added again"
    );
    assert!(c
        .conn(0)
        .call(&["CLUSTER", "FORGET", "127.0.0.1:1"])
        .unwrap()
        .is_error());
    for k in (0..500).step_by(7) {
        assert_eq!(
            c.conn(2).call(&["GET", &format!("early:{k}")]).unwrap().as_str(),
            format!("v{k}")
        );
    }
}

/// Issue 23, item 4: cluster-aware clients route by slot to a replicated
/// cluster. `CLUSTER SLOTS` lists every slot once, each with its three
/// holders; redis-py's `RedisCluster` writes and reads through it; and after
/// a node is killed, its keys answer again through the same client within
/// 5 s (the live nodes list a live holder first for every slot).
#[test]
fn cluster_aware_clients_route_by_slot_and_ride_through_a_dead_node() {
    let mut c = Replicated::start(3, 3);
    let Value::Array(ranges) = c.conn(0).cmd("CLUSTER SLOTS").unwrap() else {
        panic!("CLUSTER SLOTS answers an array")
    };
    let mut covered = 0;
    for r in &ranges {
        let Value::Array(parts) = r else {
            panic!("a range is an array")
        };
        assert_eq!(parts.len(), 5, "start, end and three holders: {parts:?}");
        covered += parts[1].as_int().unwrap() - parts[0].as_int().unwrap() + 1;
    }
    assert_eq!(covered, 16384);
    let script = format!(
        "import sys, time\n\
         import redis.cluster\n\
         rc = redis.cluster.RedisCluster(host='127.0.0.1', port={}, socket_timeout=1)\n\
         for i in range(300):\n    rc.set(f'k{{i}}', str(i))\n\
         assert all(rc.get(f'k{{i}}') == str(i).encode() for i in range(300))\n\
         print('ready', flush=True)\n\
         sys.stdin.readline()\n\
         start = time.time()\n\
         pending = set(range(300))\n\
         while pending and time.time() - start < 30:\n\
         \x20   for i in list(pending):\n\
         \x20       try:\n\
         \x20           if rc.get(f'k{{i}}') == str(i).encode():\n\
         \x20               pending.discard(i)\n\
         \x20       except Exception:\n\
         \x20           time.sleep(0.05)\n\
         print(f'{{time.time() - start:.2f}} {{len(pending)}}', flush=True)\n",
        c.ports[0]
    );
    let mut py = std::process::Command::new("python3")
        .args(["-c", &script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3 (scripts/setup.sh installs it and redis-py)");
    let mut out = std::io::BufReader::new(py.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    assert_eq!(
        line.trim(),
        "ready",
        "redis-py RedisCluster could not write and read through the cluster"
    );
    c.kill9(1);
    std::io::Write::write_all(py.stdin.as_mut().unwrap(), b"go\n").unwrap();
    line.clear();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    assert!(py.wait().unwrap().success());
    let (secs, pending) = line.trim().split_once(' ').expect("seconds and keys left");
    let (secs, pending): (f64, usize) = (secs.parse().unwrap(), pending.parse().unwrap());
    eprintln!("redis-py RedisCluster read every key again {secs} s after a kill -9");
    assert_eq!(pending, 0, "keys never answered again");
    assert!(secs < 5.0, "the keys answered again only after {secs} s");
}

/// `fsclient status` (issue 20): on a healthy replicated cluster it lists
/// every node up and says all is well; with one node stopped it shows that
/// node as not answering and says what to do, while the volume (its size and
/// last commits) is still shown through the others.
#[test]
fn fsclient_status_shows_a_stopped_node_and_what_to_do() {
    let mut c = Replicated::start(3, 3);
    let url = c.url(0);
    let status = || {
        let out = protocol_tests::fsclient_at(&url, &["status"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(protocol_tests::fsclient_at(&url, &["mkfs"]).status.success());
    let local = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(local.path(), b"status check").unwrap();
    let put = protocol_tests::fsclient_at(&url, &["put", local.path().to_str().unwrap(), "/f"]);
    assert!(put.status.success());
    let healthy = status();
    assert!(
        healthy.contains("3 copies of every key over 3 nodes"),
        "{healthy}"
    );
    for i in 0..3 {
        assert!(healthy.contains(&format!("{:<24} up", c.addr(i))), "{healthy}");
    }
    assert!(healthy.contains("files 1,"), "{healthy}");
    assert!(healthy.contains("\"put /f\""), "{healthy}");
    assert!(healthy.contains("all is well"), "{healthy}");

    c.kill9(2);
    let stopped = c.addr(2);
    let deadline = Instant::now() + Duration::from_secs(20);
    let shown = loop {
        let s = status();
        if s.contains(&format!("{stopped:<24} suspect")) {
            break s;
        }
        assert!(Instant::now() < deadline, "the stopped node never showed: {s}");
        std::thread::sleep(Duration::from_millis(250));
    };
    assert!(
        shown.contains(&format!("to do:    {stopped} does not answer")),
        "{shown}"
    );
    // Three copies on three nodes: none is left to take its place.
    assert!(shown.contains("start it again, or add a node"), "{shown}");
    assert!(!shown.contains("all is well"), "{shown}");
}

/// kvd processes a test started by hand, killed when it ends however it ends.
struct KillOnDrop(Vec<std::process::Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One fault of the nemesis.
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// kill -9, restarted after the window.
    Kill(usize),
    /// SIGSTOP, SIGCONT after the window.
    Freeze(usize),
    /// The node's peer links cut both ways, healed after the window.
    Partition(usize),
    /// A new node started with `--seed`, until every member lists it.
    Join,
    /// kill -9 for good, until the others have taken it out (after
    /// `--down-after`) and every slot has its copies again.
    Leave(usize),
}

/// Plain writers: each SETs keys of its own through the nodes at `ports`
/// (the next one when its node does not answer) until `stop`; answers the
/// keys acknowledged, each with its value. Refusals that say the write did
/// not happen (CLUSTERDOWN, TRYAGAIN) or may not have (an unknown outcome)
/// are not acknowledgements; any other error fails the test.
fn plain_writers(
    ports: Vec<u16>,
    stop: Arc<AtomicBool>,
    acks: Acks,
) -> Vec<std::thread::JoinHandle<Vec<String>>> {
    (0..3)
        .map(|t| {
            let (ports, stop, acks) = (ports.clone(), stop.clone(), acks.clone());
            std::thread::spawn(move || {
                let mut node = t % ports.len();
                let mut acked = Vec::new();
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let Ok(mut conn) = Conn::connect(ports[node]) else {
                        node = (node + 1) % ports.len();
                        std::thread::sleep(Duration::from_millis(20));
                        continue;
                    };
                    while !stop.load(Ordering::Relaxed) {
                        n += 1;
                        let key = format!("plain:{t}:{n}");
                        match conn.call(&["SET", &key, &format!("v{n}")]) {
                            Ok(r) if !r.is_error() => {
                                acks.lock().unwrap().push(Instant::now());
                                acked.push(key);
                            }
                            Ok(r) => {
                                let text = r.as_str();
                                assert!(
                                    text.starts_with("CLUSTERDOWN")
                                        || text.starts_with("TRYAGAIN")
                                        || text.contains("may or may not"),
                                    "SET {key}: {text}"
                                );
                                std::thread::sleep(Duration::from_millis(5));
                            }
                            Err(_) => break,
                        }
                    }
                    node = (node + 1) % ports.len();
                }
                acked
            })
        })
        .collect()
}

/// The issue-23 nemesis: five nodes, three copies of every key, and a seeded
/// schedule of random faults (kill -9 and restart, SIGSTOP/SIGCONT, a peer
/// partition, a node joining, a node gone for good), one at a time, while CAS
/// clients, plain writers and a FUSE mount writing files run through the
/// nodes. During each fault writes keep being acknowledged within a stated
/// bound; afterwards every CAS history is linearizable, every acknowledged
/// write and every file whose fsync returned reads back, `fsclient fsck`
/// finds nothing damaged and every slot has its copies.
///
/// `NEMESIS_SEED` replays a schedule; `NEMESIS_STEPS` sets its length
/// (6 by default, about two minutes).
#[test]
fn a_nemesis_of_random_faults_loses_nothing_and_the_cluster_keeps_serving() {
    use rand::{Rng, SeedableRng};
    protocol_tests::require_fuse();
    let seed: u64 = std::env::var("NEMESIS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    let steps: usize = std::env::var("NEMESIS_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(6);
    eprintln!("nemesis: NEMESIS_SEED={seed} NEMESIS_STEPS={steps}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut c = Replicated::start_with(5, 3, &[("KVD_FAILPOINTS", "partition")], &["--down-after", "3s"]);
    let mut members: Vec<usize> = (0..5).collect();

    const KEYS: &[&str] = &[
        "nem:a", "nem:b", "nem:c", "nem:d", "nem:e", "nem:f", "nem:g", "nem:h",
    ];
    let load = CasLoad::start(&c, KEYS);
    let acks = load.acks.clone();
    let writers = plain_writers(c.ports.clone(), load.stop.clone(), acks.clone());

    // A mount through node 0, writing files and fsyncing each.
    let url = c.url(0);
    assert!(protocol_tests::fsclient_at(&url, &["mkfs"]).status.success());
    let mut mount = protocol_tests::Mount::start(&url, "main", &[]).unwrap();
    let root = mount.path().to_path_buf();
    let file_data = |n: u64| -> Vec<u8> { (0..20_000u64).map(|i| (i * 31 + n * 7) as u8).collect() };
    let file_writer = {
        let (stop, acks, root) = (load.stop.clone(), acks.clone(), root.clone());
        std::thread::spawn(move || {
            let (mut synced, mut failed) = (Vec::new(), 0u64);
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let path = root.join(format!("f{n}"));
                let written = std::fs::File::create(&path).and_then(|mut f| {
                    std::io::Write::write_all(&mut f, &file_data(n))?;
                    f.sync_all()
                });
                match written {
                    Ok(()) => {
                        acks.lock().unwrap().push(Instant::now());
                        synced.push(n);
                    }
                    Err(_) => {
                        failed += 1;
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            }
            (synced, failed)
        })
    };

    let (mut joined, mut left) = (false, false);
    std::thread::sleep(Duration::from_millis(1500));
    for step in 0..steps {
        let target = members[rng.gen_range(0..members.len())];
        let fault = match rng.gen_range(0..5) {
            3 if !joined => Fault::Join,
            4 if !left && members.len() > 4 => Fault::Leave(target),
            0 | 3 => Fault::Kill(target),
            1 | 4 => Fault::Freeze(target),
            _ => Fault::Partition(target),
        };
        eprintln!(
            "nemesis step {step}: {fault:?} ({})",
            match fault {
                Fault::Join => "a new node".to_string(),
                Fault::Kill(i) | Fault::Freeze(i) | Fault::Partition(i) | Fault::Leave(i) => c.addr(i),
            }
        );
        let window = Duration::from_millis(rng.gen_range(2000..4000));
        let from = Instant::now();
        let what = format!("step {step}: {fault:?}");
        match fault {
            Fault::Kill(i) => {
                c.kill9(i);
                std::thread::sleep(window);
                let to = Instant::now();
                c.restart(i);
                assert_served_during(&acks, from, to, 10, &what);
            }
            Fault::Freeze(i) => {
                c.freeze(i, true);
                std::thread::sleep(window);
                let to = Instant::now();
                c.freeze(i, false);
                assert_served_during(&acks, from, to, 10, &what);
            }
            Fault::Partition(i) => {
                let others: Vec<usize> = members.iter().copied().filter(|&j| j != i).collect();
                partition(&c, i, &others);
                for &j in &others {
                    partition(&c, j, &[i]);
                }
                std::thread::sleep(window);
                let to = Instant::now();
                for &j in &members {
                    partition(&c, j, &[]);
                }
                assert_served_during(&acks, from, to, 10, &what);
            }
            Fault::Join => {
                joined = true;
                let new = c.add_seeded_node(members[0]);
                let addr = c.addr(new);
                let deadline = Instant::now() + Duration::from_secs(60);
                while !members
                    .iter()
                    .chain(std::iter::once(&new))
                    .all(|&i| is_member(&c, i, &addr) && settled(&c, i))
                {
                    if Instant::now() > deadline {
                        for i in 0..c.ports.len() {
                            if let Ok(mut conn) = Conn::connect(c.ports[i]) {
                                let text = conn.cmd("INFO cluster").map(|v| v.as_str()).unwrap_or_default();
                                let fields: Vec<&str> = text
                                    .lines()
                                    .filter(|l| {
                                        l.starts_with("kvd_replica_members")
                                            || l.starts_with("kvd_replica_config_version")
                                    })
                                    .collect();
                                eprintln!("node {i} {}: {fields:?}", c.addr(i));
                            }
                        }
                        panic!("{what}: {addr} never became a member");
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
                members.push(new);
                // A join goes in steps, each freezing an eighth of the slots
                // at most: writers to the others never wait for it.
                assert_served_during(&acks, from, Instant::now(), 10, &what);
            }
            Fault::Leave(i) => {
                left = true;
                let addr = c.addr(i);
                c.kill9(i);
                members.retain(|&j| j != i);
                let deadline = Instant::now() + Duration::from_secs(90);
                while !taken_out_and_rehomed(&c, &members, &addr) {
                    assert!(
                        Instant::now() < deadline,
                        "{what}: {addr} was not taken out and re-homed"
                    );
                    std::thread::sleep(Duration::from_millis(200));
                }
                eprintln!(
                    "{what}: taken out and re-homed {:?} after the kill",
                    from.elapsed()
                );
                // Taken out in steps too; each waits out a short timeout for
                // the dead node, and freezes only its own slots meanwhile.
                assert_served_during(&acks, from, Instant::now(), 10, &what);
            }
        }
        // Healed: the next fault starts once every node is a member again
        // (one killed for longer than --down-after was taken out, and asks
        // back in when it restarts), all agree, and none is unreachable.
        let mut want: Vec<String> = members.iter().map(|&i| c.addr(i)).collect();
        want.sort();
        let deadline = Instant::now() + Duration::from_secs(60);
        while !members.iter().all(|&j| {
            member_list(&c, j) == want
                && info(&c, j, "kvd_replica_nodes_unreachable") == "0"
                && settled(&c, j)
        }) {
            assert!(
                Instant::now() < deadline,
                "after {what}: the members never agreed on {want:?} again: {:?}",
                members.iter().map(|&j| member_list(&c, j)).collect::<Vec<_>>()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        eprintln!("{what}: healed {:?} after the fault began", from.elapsed());
        std::thread::sleep(Duration::from_millis(1000));
    }

    let successes = load.finish();
    let acked: Vec<String> = writers.into_iter().flat_map(|w| w.join().unwrap()).collect();
    let (synced, failed) = file_writer.join().unwrap();
    eprintln!(
        "nemesis: {successes} CAS (linearizable), {} plain writes and {} fsynced files acknowledged, {failed} file writes failed",
        acked.len(),
        synced.len()
    );
    assert!(successes > 100 && acked.len() > 300 && synced.len() > 20);
    // Every acknowledged write reads back, through each member in turn.
    let mut conns: Vec<Conn> = members.iter().map(|&i| c.conn(i)).collect();
    for (k, key) in acked.iter().enumerate() {
        let n = key.rsplit(':').next().unwrap();
        let conn = &mut conns[k % members.len()];
        assert_eq!(
            conn.call(&["GET", key]).unwrap().as_str(),
            format!("v{n}"),
            "{key}"
        );
    }
    // Every file whose fsync returned reads back through the mount, and
    // after the unmount fsck finds nothing damaged.
    for &n in &synced {
        let got = std::fs::read(root.join(format!("f{n}"))).unwrap_or_default();
        assert!(
            got == file_data(n),
            "f{n} ({} bytes) is not what was fsynced",
            got.len()
        );
    }
    assert!(mount.stop(), "the mount did not stop cleanly");
    let url = c.url(members[0]);
    let fsck = protocol_tests::fsclient_at(&url, &["fsck"]);
    let report = String::from_utf8_lossy(&fsck.stdout);
    assert!(
        fsck.status.success() && report.contains(", 0 damaged paths"),
        "{report}"
    );
    for &i in &members {
        assert_eq!(info(&c, i, "kvd_under_replicated_slots"), "0", "node {i}");
    }
}

/// A desktop that sleeps longer than `--down-after` is taken out (its copies
/// made elsewhere) and, when it wakes up — the same process, not restarted —
/// asks to be added again and is a member once more; every key reads back
/// through it. Before, only a restart made it ask.
#[test]
fn a_node_asleep_past_down_after_is_taken_out_and_rejoins_when_it_wakes() {
    let c = Replicated::start_with_args(4, 3, &["--down-after", "2s"]);
    seed(&mut c.conn(0), "k", 200);
    let sleeper = c.addr(3);
    let member = |i: usize| is_member(&c, i, &sleeper);
    c.freeze(3, true);
    let deadline = Instant::now() + Duration::from_secs(60);
    while member(0) || info(&c, 0, "kvd_under_replicated_slots") != "0" {
        assert!(Instant::now() < deadline, "the sleeping node was not taken out");
        std::thread::sleep(Duration::from_millis(200));
    }
    c.freeze(3, false);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !(0..4).all(member) {
        assert!(
            Instant::now() < deadline,
            "the node that woke up was not added again"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut conn = c.conn(3);
    for i in 0..200 {
        assert_eq!(
            conn.call(&["GET", &format!("k:{i}")]).unwrap().as_str(),
            format!("v{i}")
        );
    }
}

/// Issue 23, item 2 (gossip): a member the coordinator cannot reach, but
/// the others can, is not gone. The link between the coordinator and one
/// node is cut both ways for well past `--down-after`; the node's heartbeat
/// comes round through the two others, so it stays a member and nothing is
/// re-homed. With every node probing every other instead (before gossip),
/// the coordinator found it silent for 2 s and took it out of the cluster.
#[test]
fn a_member_cut_off_from_the_coordinator_alone_is_not_taken_out() {
    let c = Replicated::start_with(4, 3, &[("KVD_FAILPOINTS", "partition")], &["--down-after", "2s"]);
    seed(&mut c.conn(0), "k", 50);
    // The coordinator: the first member in the membership's order.
    let order = info(&c, 0, "kvd_replica_members");
    let first = order.split(',').next().unwrap().to_string();
    let coordinator = (0..4).find(|&i| c.addr(i) == first).unwrap();
    let cut = (coordinator + 1) % 4;
    let version = info(&c, coordinator, "kvd_replica_config_version");
    partition(&c, coordinator, &[cut]);
    partition(&c, cut, &[coordinator]);
    let until = Instant::now() + Duration::from_secs(8);
    while Instant::now() < until {
        assert!(
            is_member(&c, coordinator, &c.addr(cut)),
            "the coordinator took out a member the others still reach"
        );
        assert_eq!(info(&c, coordinator, "kvd_replica_down_nodes"), "");
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(
        info(&c, coordinator, "kvd_replica_suspect_nodes").contains(&c.addr(cut)),
        "its own calls fail: suspect from where the coordinator stands"
    );
    assert_eq!(info(&c, coordinator, "kvd_replica_config_version"), version);
    partition(&c, coordinator, &[]);
    partition(&c, cut, &[]);
    let mut conn = c.conn(cut);
    for i in 0..50 {
        assert_eq!(
            conn.call(&["GET", &format!("k:{i}")]).unwrap().as_str(),
            format!("v{i}")
        );
    }
}

/// A node taken out with `CLUSTER FORGET` while it runs is told so before
/// the change, not after: told after, it could learn in between that it is
/// no member and ask to be added back, which a CI run saw. The fail point
/// makes the member answer 3 s after the change, as a loaded one might.
#[test]
fn a_forgotten_node_is_told_before_it_can_ask_back_in() {
    let c = Replicated::start_with(4, 3, &[("KVD_FAILPOINTS", "forget-slowly")], &[]);
    seed(&mut c.conn(0), "k", 20);
    let forgotten = c.addr(3);
    assert_eq!(
        c.conn(0)
            .call(&["CLUSTER", "FORGET", &forgotten])
            .unwrap()
            .as_str(),
        "OK"
    );
    std::thread::sleep(Duration::from_secs(4));
    for i in 0..3 {
        assert!(
            !is_member(&c, i, &forgotten),
            "the forgotten node was added again"
        );
    }
    let mut conn = c.conn(1);
    for i in 0..20 {
        assert_eq!(
            conn.call(&["GET", &format!("k:{i}")]).unwrap().as_str(),
            format!("v{i}")
        );
    }
}

/// Three nodes with `make_test_certificates`' files in `d`, linked over
/// mutually authenticated TLS (`links`: `--tls-replication` or Redis
/// Cluster's `--tls-cluster`), each node at its TLS port, with a plain
/// client port beside it where `plain` names one (0: none).
fn start_tls_cluster(d: &std::path::Path, plain: &[u16], tls: &[u16], links: &str) -> KillOnDrop {
    let peers: Vec<String> = tls.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let start = |i: usize| {
        let data = d.join(format!("node{i}"));
        std::fs::create_dir_all(&data).unwrap();
        std::process::Command::new(protocol_tests::kvd_bin())
            .args(["--bind", "127.0.0.1", "--port", &plain[i].to_string()])
            .args(["--tls-port", &tls[i].to_string()])
            .args(["--tls-cert-file", "node.crt", "--tls-key-file", "node.key"])
            .args(["--tls-ca-cert-file", "ca.crt"])
            .args(["--tls-auth-clients", "yes", links, "yes"])
            .args(["--replicas", "3", "--cluster-secret", "s"])
            .args(["--peers", &peers.join(",")])
            .arg("--dir")
            .arg(&data)
            .env("KVD_LOG", "warn")
            .current_dir(d)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    KillOnDrop((0..tls.len()).map(start).collect())
}

/// Issue 21, item 3: a replicated cluster that speaks only TLS, to clients
/// and between its nodes (`--port 0`, `tls-replication yes`,
/// `tls-auth-clients yes`: every link shows a certificate from the cluster's
/// CA). Writes need a majority of replicas, so an acknowledged SET proves the
/// peer links work over TLS; one node killed, the others go on.
#[test]
fn a_replicated_cluster_runs_over_tls_between_its_nodes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    protocol_tests::make_test_certificates(d);
    let ports: Vec<u16> = (0..3).map(|_| protocol_tests::free_port()).collect();
    let mut nodes = start_tls_cluster(d, &[0, 0, 0], &ports, "--tls-replication");
    for p in &ports {
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", *p)).is_err() {
            assert!(Instant::now() < deadline, "a TLS node did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let cli = |i: usize, args: &[&str]| -> String {
        let out = std::process::Command::new("redis-cli")
            .args(["-p", &ports[i].to_string(), "--tls", "--cacert", "ca.crt"])
            .args(["--cert", "node.crt", "--key", "node.key"])
            .args(args)
            .current_dir(d)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    // The first writes may wait for the links to be made.
    let deadline = Instant::now() + Duration::from_secs(20);
    while cli(0, &["set", "k", "over tls"]) != "OK" {
        assert!(
            Instant::now() < deadline,
            "no write reached a majority over TLS links"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(cli(2, &["get", "k"]), "over tls");
    assert_eq!(
        cli(1, &["config", "get", "tls-replication"]),
        "tls-replication\nyes"
    );
    let _ = nodes.0[1].kill();
    let _ = nodes.0[1].wait();
    assert_eq!(cli(0, &["set", "k2", "two of three"]), "OK");
    assert_eq!(cli(2, &["get", "k2"]), "two of three");
}

/// Issue 21, item 3: a cluster whose links between nodes are TLS
/// (`tls-cluster yes`, Redis Cluster's name; mutually authenticated) and
/// whose clients may come over plain TCP or TLS. A node's address is its TLS
/// port, where its peers connect; CLUSTER SLOTS shows each client the ports
/// of its own kind, as Redis Cluster does, so the `redis` crate's cluster
/// client routes over plain TCP and redis-cli `--tls` sees TLS ports. Before,
/// every client was shown the TLS ports, and a plain cluster client could
/// not connect to any node it was sent to.
#[test]
fn a_cluster_with_tls_links_shows_each_client_the_ports_of_its_kind() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    protocol_tests::make_test_certificates(d);
    let plain: Vec<u16> = (0..3).map(|_| protocol_tests::free_port()).collect();
    let tls: Vec<u16> = (0..3).map(|_| protocol_tests::free_port()).collect();
    let mut nodes = start_tls_cluster(d, &plain, &tls, "--tls-cluster");
    let cli = |port: u16, over_tls: bool, args: &[&str]| -> String {
        let mut cmd = std::process::Command::new("redis-cli");
        cmd.args(["-p", &port.to_string()]);
        if over_tls {
            cmd.args([
                "--tls", "--cacert", "ca.crt", "--cert", "node.crt", "--key", "node.key",
            ]);
        }
        let out = cmd.args(args).current_dir(d).output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    // The ports CLUSTER SLOTS shows (redis-cli prints one field a line: the
    // two slot numbers, then host, port, id, for each node of each run).
    let shown_ports = |port: u16, over_tls: bool| -> std::collections::BTreeSet<u16> {
        cli(port, over_tls, &["cluster", "slots"])
            .lines()
            .filter_map(|l| l.trim().parse::<u16>().ok())
            .filter(|p| plain.contains(p) || tls.contains(p))
            .collect()
    };
    let want_plain: std::collections::BTreeSet<u16> = plain.iter().copied().collect();
    let want_tls: std::collections::BTreeSet<u16> = tls.iter().copied().collect();
    // Gossip carries each node's ports within a few periods.
    let deadline = Instant::now() + Duration::from_secs(30);
    while shown_ports(plain[0], false) != want_plain || shown_ports(tls[1], true) != want_tls {
        assert!(
            Instant::now() < deadline,
            "CLUSTER SLOTS shows plain clients {:?} (want {want_plain:?}) and TLS clients {:?} (want {want_tls:?})",
            shown_ports(plain[0], false),
            shown_ports(tls[1], true)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        cli(plain[2], false, &["config", "get", "tls-cluster"]),
        "tls-cluster\nyes"
    );
    // A cluster-aware client over plain TCP connects to the nodes it is shown.
    let client = redis::cluster::ClusterClient::new(vec![format!("redis://127.0.0.1:{}", plain[0])]).unwrap();
    let mut conn = client.get_connection().unwrap();
    for i in 0..50 {
        let _: () = redis::cmd("SET")
            .arg(format!("k{i}"))
            .arg(i)
            .query(&mut conn)
            .unwrap();
    }
    for i in 0..50 {
        let v: i64 = redis::cmd("GET").arg(format!("k{i}")).query(&mut conn).unwrap();
        assert_eq!(v, i);
    }
    assert_eq!(cli(tls[2], true, &["get", "k7"]), "7");
    // fsclient takes the other members it may turn to from CLUSTER SLOTS
    // too: with the node in its URL killed, it reads through another one's
    // plain port (before, it was given their TLS ports, and failed).
    use fsclient::dict::Dict;
    let dict = fsclient::dict::RespDict::open(&format!("redis://127.0.0.1:{}", plain[0])).unwrap();
    assert_eq!(dict.get("k8").unwrap().as_deref(), Some(&b"8"[..]));
    let _ = nodes.0[0].kill();
    let _ = nodes.0[0].wait();
    assert_eq!(dict.get("k9").unwrap().as_deref(), Some(&b"9"[..]));
}

/// Issue 23, item 7: two nodes that each founded a cluster. Restarted with
/// `--seed` naming the other, a founder says clearly that it stays in its own
/// cluster and how to join or merge; `KVD.RECONFIGURE` listing both makes
/// them one cluster, and the keys of both read back through either.
#[test]
fn two_founders_are_told_apart_and_can_be_made_one_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let ports = [protocol_tests::free_port(), protocol_tests::free_port()];
    let addr = |i: usize| format!("127.0.0.1:{}", ports[i]);
    let start = |i: usize, extra: &[String]| {
        let data = dir.path().join(format!("node{i}"));
        std::fs::create_dir_all(&data).unwrap();
        let log = std::fs::File::create(dir.path().join(format!("node{i}.log"))).unwrap();
        let child = std::process::Command::new(protocol_tests::kvd_bin())
            .args(["--bind", "127.0.0.1", "--port", &ports[i].to_string()])
            .args(["--replicas", "3", "--cluster-secret", "s", "--dir"])
            .arg(&data)
            .args(extra)
            .env("KVD_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", ports[i])).is_err() {
            assert!(Instant::now() < deadline, "node {i} did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        child
    };
    let mut nodes = KillOnDrop(vec![
        start(0, &["--peers".into(), addr(0)]),
        start(1, &["--peers".into(), addr(1)]),
    ]);
    let conn = |i: usize| Conn::connect(ports[i]).unwrap();
    assert_eq!(conn(0).cmd("SET a 1").unwrap().as_str(), "OK");
    assert_eq!(conn(1).cmd("SET b 2").unwrap().as_str(), "OK");
    // Node 1 again, now seeded with node 0: it stays in its own cluster, and says so.
    let _ = nodes.0[1].kill();
    let _ = nodes.0[1].wait();
    nodes.0[1] = start(1, &["--seed".into(), addr(0)]);
    std::thread::sleep(Duration::from_millis(500));
    let log = std::fs::read_to_string(dir.path().join("node1.log")).unwrap();
    assert!(
        log.contains(&format!(
            "--seed {} is not a member of this node's cluster",
            addr(0)
        )),
        "{log}"
    );
    let members = |i: usize| -> String {
        let text = conn(i).cmd("INFO cluster").unwrap().as_str();
        text.lines()
            .find_map(|l| l.strip_prefix("kvd_replica_members:"))
            .unwrap()
            .trim()
            .to_string()
    };
    assert_eq!(members(1), addr(1));
    // Made one cluster by a reconfiguration listing both.
    let reply = conn(0).call(&["KVD.RECONFIGURE", &addr(0), &addr(1)]).unwrap();
    assert_eq!(reply.as_str(), "OK", "{reply:?}");
    let both = format!("{},{}", addr(0), addr(1));
    assert_eq!(members(0), both);
    assert_eq!(members(1), both);
    for i in 0..2 {
        assert_eq!(conn(i).cmd("GET a").unwrap().as_str(), "1", "a via node {i}");
        assert_eq!(conn(i).cmd("GET b").unwrap().as_str(), "2", "b via node {i}");
    }
}

/// One client's view of the bank test below: what its transactions saw.
#[derive(Default, Debug)]
struct Bank {
    /// Transactions that answered with their replies.
    done: usize,
    /// Answered with an error (a node killed under them, a timeout).
    failed: usize,
    /// WATCHed transactions that aborted (a nil reply).
    aborted: usize,
    /// Totals read inside a transaction that were not the starting total.
    torn: Vec<i64>,
}

/// One bank client through node port `port` until `stop`: transfers
/// between `keys` (kind 0: DECRBY and INCRBY in one MULTI, with an INCR of
/// the client's own counter `tally`; kind 1: WATCH
/// two accounts, read them, write both back in a MULTI), or (kind 2) reads
/// of every account in one MULTI, each checked against `total`.
fn bank_client(
    port: u16,
    keys: Vec<String>,
    tally: String,
    total: i64,
    kind: usize,
    seed: u64,
    stop: Arc<AtomicBool>,
) -> Bank {
    let mut bank = Bank::default();
    let mut x = seed | 1;
    let mut next = move |n: usize| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % n as u64) as usize
    };
    let mut conn = Conn::connect(port).ok();
    while !stop.load(Ordering::SeqCst) {
        let Some(c) = conn.as_mut() else {
            std::thread::sleep(Duration::from_millis(50));
            conn = Conn::connect(port).ok();
            continue;
        };
        let (i, j) = (next(keys.len()), next(keys.len()));
        let amount = (1 + next(20)).to_string();
        let result: anyhow::Result<Value> = (|| {
            match kind {
                0 => {
                    c.cmd("MULTI")?;
                    c.call(&["DECRBY", &keys[i], &amount])?;
                    c.call(&["INCRBY", &keys[j], &amount])?;
                    c.call(&["INCR", &tally])?;
                }
                1 => {
                    c.call(&["WATCH", &keys[i], &keys[j]])?;
                    let a = c.call(&["GET", &keys[i]])?.as_int().unwrap_or(0);
                    let b = c.call(&["GET", &keys[j]])?.as_int().unwrap_or(0);
                    let n: i64 = amount.parse().unwrap();
                    let (a, b) = if i == j { (a, b) } else { (a - n, b + n) };
                    c.cmd("MULTI")?;
                    c.call(&["SET", &keys[i], &a.to_string()])?;
                    c.call(&["SET", &keys[j], &b.to_string()])?;
                }
                _ => {
                    c.cmd("MULTI")?;
                    for k in &keys {
                        c.call(&["GET", k])?;
                    }
                }
            }
            c.cmd("EXEC")
        })();
        match result {
            Ok(Value::Array(replies)) => {
                bank.done += 1;
                if kind == 2 {
                    let sum: i64 = replies.iter().filter_map(Value::as_int).sum();
                    if sum != total {
                        bank.torn.push(sum);
                    }
                }
            }
            Ok(Value::Nil) => bank.aborted += 1,
            Ok(_) => {
                bank.failed += 1;
                // The connection may be inside MULTI still; start afresh.
                conn = Conn::connect(port).ok();
            }
            Err(_) => {
                bank.failed += 1;
                conn = Conn::connect(port).ok();
            }
        }
    }
    bank
}

/// A MULTI/EXEC over several keys of one slot is one atomic step, as in
/// Redis Cluster. Eight accounts of 100 each; clients through two of three
/// nodes move money between them (DECRBY and INCRBY in one transaction;
/// WATCHed read-modify-writes of two accounts) while other clients read all
/// eight in one transaction; the third node is killed and restarted under
/// them. Every read finds the total unchanged, and so does one at the end;
/// every transfer that answered took effect.
/// Before, such a transaction ran command by command (a reader saw money in
/// flight, and a transfer cut short by an error lost it), and WATCH of
/// several keys was refused.
#[test]
fn a_transaction_over_several_keys_of_one_slot_is_atomic() {
    let mut c = Replicated::start(3, 3);
    let keys: Vec<String> = (0..8).map(|i| format!("{{bank}}{i}")).collect();
    let total = 100 * keys.len() as i64;
    let mut setup = c.conn(0);
    for k in &keys {
        assert_eq!(setup.call(&["SET", k, "100"]).unwrap().as_str(), "OK");
    }
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..6)
        .map(|n| {
            let (port, keys, stop) = (c.ports[n % 2], keys.clone(), stop.clone());
            let tally = format!("{{bank}}tally{n}");
            std::thread::spawn(move || bank_client(port, keys, tally, total, n % 3, 77 + n as u64, stop))
        })
        .collect();
    std::thread::sleep(Duration::from_secs(3));
    c.kill9(2);
    std::thread::sleep(Duration::from_secs(3));
    c.restart(2);
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, Ordering::SeqCst);
    let banks: Vec<Bank> = clients.into_iter().map(|t| t.join().unwrap()).collect();
    let torn: Vec<i64> = banks.iter().flat_map(|b| b.torn.clone()).collect();
    assert!(
        torn.is_empty(),
        "reads inside a transaction saw totals {torn:?}: {banks:?}"
    );
    // Every kind ran (the checks above are about what they saw). In a CI
    // run beside the nemesis test only 33 transactions went through in the
    // 9 s; WATCHed ones abort often: every transfer moves its accounts'
    // ballots (reads of every account did too, until they became double
    // collects).
    for kind in 0..3 {
        let ran: usize = banks
            .iter()
            .skip(kind)
            .step_by(3)
            .map(|b| b.done + b.aborted)
            .sum();
        assert!(ran >= 2, "transactions of kind {kind} did not run: {banks:?}");
    }
    // Every node, outside any transaction, shows the same total.
    for i in 0..3 {
        let mut conn = c.conn(i);
        let values = conn.call(
            &[
                &["MGET"][..],
                &keys.iter().map(String::as_str).collect::<Vec<_>>(),
            ]
            .concat(),
        );
        let sum: i64 = match values.unwrap() {
            Value::Array(v) => v.iter().filter_map(Value::as_int).sum(),
            other => panic!("MGET: {other:?}"),
        };
        assert_eq!(sum, total, "node {i} after the run: {banks:?}");
    }
    // Each transfer that answered took effect whole (its tally counts it);
    // one that failed did, or did not.
    for (n, bank) in banks.iter().enumerate().filter(|(n, _)| n % 3 == 0) {
        let tally = c.conn(2).call(&["GET", &format!("{{bank}}tally{n}")]).unwrap();
        let tally = tally.as_int().unwrap_or(0) as usize;
        assert!(
            (bank.done..=bank.done + bank.failed).contains(&tally),
            "client {n}: {tally} transfers took effect: {bank:?}"
        );
    }
}

/// A transaction that only reads changes nothing, so it leaves another
/// client's WATCH of its keys alone, as reads do in Redis; a write still
/// aborts it. Over several keys such a transaction used to lock and roll
/// forward every key, which moved their ballots, and the watching client's
/// EXEC answered nil.
#[test]
fn a_read_only_transaction_over_several_keys_leaves_a_watch_alone() {
    let c = Replicated::start(3, 3);
    let (mut a, mut b) = (c.conn(0), c.conn(1));
    let ok = |v: Value| assert_eq!(v.as_str(), "OK", "{v:?}");
    ok(a.call(&["SET", "{t}x", "1"]).unwrap());
    ok(a.call(&["SET", "{t}y", "2"]).unwrap());
    let read_both = |b: &mut Conn| {
        ok(b.call(&["MULTI"]).unwrap());
        b.call(&["GET", "{t}x"]).unwrap();
        b.call(&["GET", "{t}y"]).unwrap();
        b.call(&["EXEC"]).unwrap()
    };

    ok(a.call(&["WATCH", "{t}x", "{t}y"]).unwrap());
    for _ in 0..3 {
        let read = read_both(&mut b);
        let Value::Array(values) = read else {
            panic!("EXEC of reads: {read:?}")
        };
        assert_eq!(
            values.iter().filter_map(Value::as_int).collect::<Vec<_>>(),
            [1, 2]
        );
    }
    ok(a.call(&["MULTI"]).unwrap());
    a.call(&["INCRBY", "{t}x", "10"]).unwrap();
    a.call(&["INCRBY", "{t}y", "10"]).unwrap();
    let exec = a.call(&["EXEC"]).unwrap();
    let Value::Array(after) = exec else {
        panic!("a read-only transaction aborted a WATCH: EXEC answered {exec:?}")
    };
    assert_eq!(
        after.iter().filter_map(Value::as_int).collect::<Vec<_>>(),
        [11, 12]
    );

    // A write between WATCH and EXEC aborts it, read-only or not.
    ok(b.call(&["WATCH", "{t}x", "{t}y"]).unwrap());
    ok(a.call(&["SET", "{t}y", "5"]).unwrap());
    assert_eq!(read_both(&mut b), Value::Nil);
    // And a read-only transaction sees the write.
    let read = read_both(&mut b);
    let Value::Array(values) = read else {
        panic!("EXEC of reads: {read:?}")
    };
    assert_eq!(
        values.iter().filter_map(Value::as_int).collect::<Vec<_>>(),
        [11, 5]
    );
}

/// A transaction whose coordinator stops half-way leaves its keys locked;
/// whoever meets a lock finishes the transaction the way its status key
/// says. Stopped after locking (node 0's fail point): undecided, so a reader
/// waits for the lock's timeout, aborts it, and sees every key as before.
/// Stopped after committing (node 1's): a reader sees every key as the
/// transaction left it, without waiting, and anti-entropy finishes it. A reader that ignored the locks
/// would see the first transaction's keys unchanged too, but the second's
/// unchanged as well.
#[test]
fn a_transaction_abandoned_by_its_coordinator_is_finished_by_whoever_meets_it() {
    let mut c = Replicated::start(3, 3);
    c.restart_with_env(0, &[("KVD_FAILPOINTS", "txn-abandon-locked")]);
    c.restart_with_env(1, &[("KVD_FAILPOINTS", "txn-abandon-committed")]);
    let mut reader = c.conn(2);
    assert_eq!(reader.cmd("MSET {t}a old-a {t}b old-b").unwrap().as_str(), "OK");

    let transfer = |conn: &mut Conn, a: &str, b: &str| {
        conn.cmd("MULTI").unwrap();
        conn.call(&["SET", "{t}a", a]).unwrap();
        conn.call(&["SET", "{t}b", b]).unwrap();
        conn.cmd("EXEC").unwrap()
    };
    let stopped = transfer(&mut c.conn(0), "new-a", "new-b");
    assert!(stopped.as_str().contains("after locking"), "{stopped:?}");
    let waited = Instant::now();
    assert_eq!(reader.cmd("GET {t}b").unwrap().as_str(), "old-b");
    assert_eq!(reader.cmd("GET {t}a").unwrap().as_str(), "old-a");
    // The lock was undecided: the read waited for its timeout (5 s from
    // when it was taken), then aborted it.
    assert!(
        waited.elapsed() >= Duration::from_secs(2),
        "{:?}",
        waited.elapsed()
    );

    let stopped = transfer(&mut c.conn(1), "c-a", "c-b");
    assert!(stopped.as_str().contains("after committing"), "{stopped:?}");
    assert_eq!(reader.cmd("GET {t}b").unwrap().as_str(), "c-b");
    assert_eq!(reader.cmd("GET {t}a").unwrap().as_str(), "c-a");
    // Anti-entropy finishes it: the first holder of the slot rolls its keys
    // forward and deletes its status key.
    let finished = |c: &Replicated| -> u64 {
        (0..3)
            .map(|i| info(c, i, "kvd_txns_finished").parse::<u64>().unwrap())
            .sum()
    };
    let until = Instant::now() + Duration::from_secs(30);
    while finished(&c) == 0 && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(finished(&c), 1, "anti-entropy did not finish the transaction");
    // A write meeting a lock takes the same path.
    let stopped = transfer(&mut c.conn(1), "d-a", "d-b");
    assert!(stopped.as_str().contains("after committing"), "{stopped:?}");
    assert_eq!(reader.cmd("APPEND {t}a +").unwrap().as_int(), Some(4));
    assert_eq!(reader.cmd("GET {t}a").unwrap().as_str(), "d-a+");
    assert_eq!(reader.cmd("GET {t}b").unwrap().as_str(), "d-b");
    // Status keys stay out of sight.
    let keys = reader.cmd("KEYS *").unwrap();
    assert_eq!(keys.text().split(' ').count(), 2, "{keys:?}");
    assert_eq!(reader.cmd("DBSIZE").unwrap().as_int(), Some(2));
}

/// A coordinator too slow between locking and committing (a fail point
/// pauses it 7 s) finds its transaction aborted by a reader that met one of
/// its locks past the 5 s timeout: its commit is refused, it releases its
/// keys and runs the transaction again under a new status key, so its
/// client still gets the answer, and the reader saw the value before.
#[test]
fn a_transaction_aborted_as_too_slow_runs_again() {
    let mut c = Replicated::start(3, 3);
    c.restart_with_env(0, &[("KVD_FAILPOINTS", "txn-pause-after-lock")]);
    let mut reader = c.conn(1);
    assert_eq!(reader.cmd("MSET {p}a 1 {p}b 1").unwrap().as_str(), "OK");
    let port = c.ports[0];
    let writer = std::thread::spawn(move || {
        let mut w = Conn::connect(port).unwrap();
        w.cmd("MULTI").unwrap();
        w.cmd("INCR {p}a").unwrap();
        w.cmd("INCR {p}b").unwrap();
        w.cmd("EXEC").unwrap()
    });
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(reader.cmd("GET {p}a").unwrap().as_str(), "1");
    let exec = writer.join().unwrap();
    assert_eq!(exec, Value::Array(vec![Value::Int(2), Value::Int(2)]));
    assert_eq!(reader.cmd("MGET {p}a {p}b").unwrap().text(), "2 2");
}
