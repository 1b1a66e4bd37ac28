//! The kvd cluster, on real kvd processes over loopback: commands through any
//! node, cluster clients routing directly, nodes joining and leaving under a
//! write load, transactions from every node, and the cluster secret.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use protocol_tests::{KvdCluster, Value};

fn sum_info(c: &KvdCluster, field: &str) -> u64 {
    (0..c.nodes.len())
        .filter_map(|i| c.info(i).ok())
        .map(|info| info.get(field).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0))
        .sum()
}

/// SET `<prefix><k>` to `k` for k in 0..n, pipelined.
fn set_numbered(conn: &mut protocol_tests::Conn, prefix: &str, n: usize) {
    for k in 0..n {
        conn.send(&["SET", &format!("{prefix}{k}"), &k.to_string()])
            .unwrap();
    }
    for _ in 0..n {
        assert_eq!(
            Value::parse(&conn.read_reply_raw().unwrap(), false)
                .unwrap()
                .as_str(),
            "OK"
        );
    }
}

fn bulk(v: &str) -> Value {
    Value::Bulk(v.as_bytes().to_vec())
}

#[test]
fn every_command_works_through_every_node() {
    let c = KvdCluster::start(3, &[]).expect("cluster");
    let n = c.nodes.len();
    for i in 0..n {
        let mut a = c.nodes[i].connect().unwrap();
        let mut b = c.nodes[(i + 1) % n].connect().unwrap();
        // Keys spread over all nodes: written through one, read through another.
        for k in 0..100 {
            assert_eq!(
                a.call(&["SET", &format!("n{i}:k{k}"), &format!("v{k}")])
                    .unwrap()
                    .as_str(),
                "OK"
            );
        }
        for k in 0..100 {
            assert_eq!(
                b.call(&["GET", &format!("n{i}:k{k}")]).unwrap(),
                bulk(&format!("v{k}"))
            );
        }
        // Multi-key commands over several slots are split and joined.
        let keys: Vec<String> = (0..10).map(|k| format!("n{i}:k{k}")).collect();
        let mut mget = vec!["MGET".to_string()];
        mget.extend(keys.iter().cloned());
        mget.push("missing".into());
        let Value::Array(got) = b.call(&mget).unwrap() else {
            panic!("MGET")
        };
        assert_eq!(got.len(), 11);
        assert_eq!(got[3], bulk("v3"));
        assert_eq!(got[10], Value::Nil);
        assert_eq!(
            a.call(&["MSET", "x1", "1", "x2", "2", "x3", "3"])
                .unwrap()
                .as_str(),
            "OK"
        );
        assert_eq!(
            b.call(&["EXISTS", "x1", "x2", "x3", "nope"]).unwrap(),
            Value::Int(3)
        );
        assert_eq!(b.call(&["DEL", "x1", "x2", "nope"]).unwrap(), Value::Int(2));
        // Counters, expiry, strings: forwarded as if local.
        assert_eq!(
            a.call(&["INCRBY", "counter", "5"]).unwrap(),
            Value::Int(5 * (i as i64 + 1))
        );
        assert_eq!(
            b.call(&["APPEND", &format!("s{i}"), "abc"]).unwrap(),
            Value::Int(3)
        );
        assert_eq!(
            a.call(&["EXPIRE", &format!("s{i}"), "100"]).unwrap(),
            Value::Int(1)
        );
        assert!(b.call(&["TTL", &format!("s{i}")]).unwrap().as_int().unwrap() > 90);
        // Cross-slot commands that cannot be split: Redis Cluster's error.
        let e = a.call(&["RENAME", "alpha", "beta"]).unwrap();
        assert!(e.as_str().starts_with("CROSSSLOT"), "{e:?}");
        a.call(&["SET", "{t}alpha", "1"]).unwrap();
        assert_eq!(b.call(&["RENAME", "{t}alpha", "{t}beta"]).unwrap().as_str(), "OK");
        assert_eq!(a.call(&["GET", "{t}beta"]).unwrap(), bulk("1"));
        // A transaction on one slot, from a node that may not serve it.
        assert_eq!(a.cmd("MULTI").unwrap().as_str(), "OK");
        assert_eq!(a.call(&["INCR", "{t}n"]).unwrap().as_str(), "QUEUED");
        assert_eq!(a.call(&["INCR", "{t}n"]).unwrap().as_str(), "QUEUED");
        assert_eq!(
            a.call(&["EXEC"]).unwrap(),
            Value::Array(vec![Value::Int(2 * i as i64 + 1), Value::Int(2 * i as i64 + 2)])
        );
        assert_eq!(a.cmd("MULTI").unwrap().as_str(), "OK");
        a.call(&["SET", "{t}a", "1"]).unwrap();
        let e = a.call(&["SET", "{u}b", "1"]).unwrap();
        assert!(e.as_str().starts_with("CROSSSLOT"), "{e:?}");
        assert!(a.cmd("EXEC").unwrap().as_str().starts_with("EXECABORT"));
        // WATCH lives where the key lives: a write through another node breaks it.
        a.call(&["WATCH", "{t}w"]).unwrap();
        b.call(&["SET", "{t}w", "changed"]).unwrap();
        a.cmd("MULTI").unwrap();
        a.call(&["SET", "{t}w", "mine"]).unwrap();
        assert_eq!(a.cmd("EXEC").unwrap(), Value::Nil);
        assert_eq!(b.call(&["GET", "{t}w"]).unwrap(), bulk("changed"));
        // RESP3 replies pass through in RESP3.
        let mut r3 = c.nodes[i].connect().unwrap();
        r3.cmd("HELLO 3").unwrap();
        for k in 0..20 {
            let raw = r3.call_raw(&["GET", &format!("absent{k}")], 1).unwrap();
            assert_eq!(raw[0], b"_\r\n");
        }
        // Topology commands.
        let slot = a.call(&["CLUSTER", "KEYSLOT", "foo"]).unwrap();
        assert_eq!(slot, Value::Int(12182));
        let nodes = a.cmd("CLUSTER NODES").unwrap().as_str();
        assert_eq!(nodes.lines().count(), 3, "{nodes}");
        assert_eq!(nodes.lines().filter(|l| l.contains("myself")).count(), 1);
        let Value::Array(ranges) = a.cmd("CLUSTER SLOTS").unwrap() else {
            panic!()
        };
        let covered: i64 = ranges
            .iter()
            .map(|r| match r {
                Value::Array(p) => p[1].as_int().unwrap() - p[0].as_int().unwrap() + 1,
                _ => 0,
            })
            .sum();
        assert_eq!(covered, 16384);
        assert!(a
            .cmd("CLUSTER INFO")
            .unwrap()
            .as_str()
            .contains("cluster_state:ok"));
    }
    // COUNTKEYSINSLOT / GETKEYSINSLOT answer for the keys a node holds.
    let slot = c.nodes[0]
        .connect()
        .unwrap()
        .call(&["CLUSTER", "KEYSLOT", "n0:k5"])
        .unwrap()
        .as_int()
        .unwrap();
    let slot = slot.to_string();
    let mut holders = 0;
    for i in 0..n {
        let mut conn = c.nodes[i].connect().unwrap();
        let count = conn
            .call(&["CLUSTER", "COUNTKEYSINSLOT", &slot])
            .unwrap()
            .as_int()
            .unwrap();
        if count > 0 {
            holders += 1;
            let keys = conn
                .call(&["CLUSTER", "GETKEYSINSLOT", &slot, "100"])
                .unwrap()
                .text();
            assert!(keys.split(' ').any(|k| k == "n0:k5"), "{keys}");
        }
        let e = conn.call(&["CLUSTER", "COUNTKEYSINSLOT", "16384"]).unwrap();
        assert_eq!(e, Value::Error("ERR Invalid slot".into()));
    }
    assert_eq!(holders, 1, "one node holds the slot's keys");
    let ids: std::collections::HashSet<String> = (0..n)
        .map(|i| {
            c.nodes[i]
                .connect()
                .unwrap()
                .cmd("CLUSTER MYID")
                .unwrap()
                .as_str()
        })
        .collect();
    assert_eq!(ids.len(), 3);
    assert!(
        sum_info(&c, "kvd_cluster_forwarded_commands") > 0,
        "plain clients were forwarded"
    );
}

#[test]
fn cluster_clients_route_directly() {
    let c = KvdCluster::start(3, &[]).expect("cluster");
    let urls: Vec<String> = c
        .nodes
        .iter()
        .map(|s| format!("redis://127.0.0.1:{}/", s.port))
        .collect();
    let client = redis::cluster::ClusterClient::new(urls).unwrap();
    let mut conn = client.get_connection().unwrap();
    for k in 0..10_000 {
        let _: () = redis::cmd("SET")
            .arg(format!("key:{k}"))
            .arg(k)
            .query(&mut conn)
            .unwrap();
    }
    for k in (0..10_000).step_by(7) {
        let v: i64 = redis::cmd("GET")
            .arg(format!("key:{k}"))
            .query(&mut conn)
            .unwrap();
        assert_eq!(v, k);
    }
    let forwarded = sum_info(&c, "kvd_cluster_forwarded_commands");
    eprintln!("redis crate cluster client: {forwarded} of ~11,400 commands forwarded");
    assert!(
        forwarded < 100,
        "a cluster client should route by CLUSTER SLOTS: {forwarded} forwarded"
    );
    // Every node agrees: read back through plain connections too.
    let mut plain = c.nodes[1].connect().unwrap();
    assert_eq!(
        plain.call(&["GET", "key:9999"]).unwrap(),
        Value::Bulk(b"9999".to_vec())
    );

    // redis-py's RedisCluster (scripts/setup.sh installs it) routes by slot too.
    let before = sum_info(&c, "kvd_cluster_forwarded_commands");
    let script = format!(
        "import redis\n\
         rc = redis.cluster.RedisCluster(host='127.0.0.1', port={})\n\
         for i in range(10000): rc.set(f'py:{{i}}', i)\n\
         bad = [i for i in range(10000) if rc.get(f'py:{{i}}') != str(i).encode()]\n\
         print(len(bad))\n",
        c.nodes[2].port
    );
    let out = std::process::Command::new("python3")
        .args(["-c", &script])
        .output()
        .expect("python3 (scripts/setup.sh installs it and redis-py)");
    assert!(
        out.status.success(),
        "redis-py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "0",
        "redis-py read back wrong values"
    );
    let py_forwarded = sum_info(&c, "kvd_cluster_forwarded_commands") - before;
    eprintln!("redis-py RedisCluster: {py_forwarded} of 20,000 commands forwarded");
    assert!(py_forwarded < 100, "{py_forwarded} forwarded");
    assert_eq!(
        plain.call(&["GET", "py:4242"]).unwrap(),
        Value::Bulk(b"4242".to_vec())
    );

    // redis-cli -c cannot be told from plain redis-cli, so by default it is
    // forwarded (and works); with --cluster-redirect it follows MOVED.
    let port = c.nodes[0].port.to_string();
    let out = std::process::Command::new("redis-cli")
        .args(["-c", "-p", &port, "GET", "key:1234"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1234");

    let r = KvdCluster::start(3, &["--cluster-redirect"]).expect("cluster");
    let port = r.nodes[0].port.to_string();
    for k in 0..200 {
        let out = std::process::Command::new("redis-cli")
            .args(["-c", "-p", &port, "SET", &format!("k{k}"), &k.to_string()])
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "OK");
    }
    for k in 0..200 {
        let out = std::process::Command::new("redis-cli")
            .args(["-c", "-p", &port, "GET", &format!("k{k}")])
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), k.to_string());
    }
    assert_eq!(sum_info(&r, "kvd_cluster_forwarded_commands"), 0);
    assert!(
        sum_info(&r, "kvd_cluster_moved_replies") > 100,
        "redis-cli -c followed MOVED"
    );
    // The same switch at run time: plain clients are forwarded again.
    for node in &r.nodes {
        let mut conn = node.connect().unwrap();
        assert_eq!(
            conn.call(&["CONFIG", "GET", "cluster-redirect"]).unwrap().text(),
            "cluster-redirect yes"
        );
        assert_eq!(
            conn.call(&["CONFIG", "SET", "cluster-redirect", "no"])
                .unwrap()
                .as_str(),
            "OK"
        );
    }
    let mut plain = r.nodes[0].connect().unwrap();
    for k in 0..200 {
        assert_eq!(
            plain.call(&["GET", &format!("k{k}")]).unwrap(),
            Value::Bulk(k.to_string().into_bytes())
        );
    }
    assert!(sum_info(&r, "kvd_cluster_forwarded_commands") > 0);
    let e = plain
        .call(&["CONFIG", "SET", "cluster-redirect", "maybe"])
        .unwrap();
    assert!(e.as_str().contains("'yes' or 'no'"), "{e:?}");
}

/// A writer through node 0 that records what was acknowledged.
struct Load {
    stop: Arc<AtomicBool>,
    /// Asked to stop between writes / stopped between writes.
    pause: Arc<AtomicBool>,
    parked: Arc<AtomicBool>,
    acked: Arc<Mutex<HashMap<String, String>>>,
    retries: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<Vec<String>>>,
}

impl Load {
    fn start(port: u16) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let acked: Arc<Mutex<HashMap<String, String>>> = Arc::default();
        let retries = Arc::new(AtomicU64::new(0));
        let pause = Arc::new(AtomicBool::new(false));
        let parked = Arc::new(AtomicBool::new(false));
        let (s, a, r) = (stop.clone(), acked.clone(), retries.clone());
        let (p, pk) = (pause.clone(), parked.clone());
        let thread = std::thread::spawn(move || {
            let mut conn = protocol_tests::Conn::connect(port).unwrap();
            let mut errors = Vec::new();
            let mut i = 0u64;
            while !s.load(Ordering::Relaxed) {
                if p.load(Ordering::Acquire) {
                    pk.store(true, Ordering::Release);
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
                pk.store(false, Ordering::Release);
                let key = format!("load:{}", i % 3000);
                let value = format!("v{i}");
                match conn.call(&["SET", &key, &value]) {
                    Ok(Value::Status(ok)) if ok == "OK" => {
                        a.lock().unwrap().insert(key, value);
                    }
                    Ok(Value::Error(e)) if e.starts_with("TRYAGAIN") => {
                        r.fetch_add(1, Ordering::Relaxed);
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    }
                    other => errors.push(format!("{key}: {other:?}")),
                }
                i += 1;
            }
            errors
        });
        Load {
            stop,
            pause,
            parked,
            acked,
            retries,
            thread: Some(thread),
        }
    }

    /// Stops the writer between two writes, checks every acknowledged value
    /// through every node, and lets it go on.
    fn pause_and_check(&self, c: &KvdCluster) {
        self.pause.store(true, Ordering::Release);
        while !self.parked.load(Ordering::Acquire) {
            std::thread::sleep(Duration::from_millis(5));
        }
        let acked = self.acked.lock().unwrap().clone();
        for i in 0..c.nodes.len() {
            let mut conn = c.nodes[i].connect().unwrap();
            for (k, v) in acked.iter() {
                assert_eq!(
                    conn.call(&["GET", k]).unwrap(),
                    Value::Bulk(v.as_bytes().to_vec()),
                    "{k} through node {i}"
                );
            }
        }
        self.pause.store(false, Ordering::Release);
    }

    fn finish(mut self) -> Vec<String> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }
}

#[test]
fn nodes_join_and_leave_under_a_write_load_without_losing_a_key() {
    let mut c = KvdCluster::start(3, &[]).expect("cluster");
    set_numbered(&mut c.nodes[0].connect().unwrap(), "pre:", 20_000);
    let load = Load::start(c.nodes[0].port);
    std::thread::sleep(Duration::from_millis(500));
    for joiner in [3, 4] {
        let before = sum_info(&c, "kvd_cluster_keys_moved_in");
        let total = (0..c.nodes.len())
            .map(|i| {
                c.nodes[i]
                    .connect()
                    .unwrap()
                    .cmd("DBSIZE")
                    .unwrap()
                    .as_int()
                    .unwrap()
            })
            .sum::<i64>();
        c.add_node().unwrap();
        c.wait_settled(Duration::from_secs(60)).unwrap();
        let moved = sum_info(&c, "kvd_cluster_keys_moved_in") - before;
        eprintln!(
            "join of node {}: {moved} of {total} keys moved = {:.3} (1/n = {:.3})",
            joiner + 1,
            moved as f64 / total as f64,
            1.0 / (joiner + 1) as f64
        );
        let frac = moved as f64 / total as f64;
        assert!(
            frac > 0.5 / (joiner + 1) as f64 && frac < 2.0 / (joiner + 1) as f64,
            "{frac}"
        );
        load.pause_and_check(&c);
        let mut conn = c.nodes[joiner].connect().unwrap();
        for k in (0..20_000).step_by(97) {
            assert_eq!(
                conn.call(&["GET", &format!("pre:{k}")]).unwrap(),
                Value::Bulk(k.to_string().into_bytes())
            );
        }
    }
    // Node 2 leaves: it hands its slots off, then says it has left.
    assert_eq!(
        c.nodes[2]
            .connect()
            .unwrap()
            .cmd("CLUSTER LEAVE")
            .unwrap()
            .as_str(),
        "OK"
    );
    c.wait_settled(Duration::from_secs(60)).unwrap();
    assert_eq!(c.info(2).unwrap()["kvd_cluster_status"], "left");
    assert_eq!(
        c.nodes[2].connect().unwrap().cmd("DBSIZE").unwrap(),
        Value::Int(0)
    );
    assert!(c.nodes[2].terminate());
    let gone = c.nodes.remove(2);
    drop(gone);
    std::thread::sleep(Duration::from_millis(500));
    let retries = load.retries.load(Ordering::Relaxed);
    let acked_count = load.acked.lock().unwrap().len();
    load.pause_and_check(&c);
    let errors = load.finish();
    assert!(
        errors.is_empty(),
        "the writer saw errors: {:?}",
        &errors[..errors.len().min(5)]
    );
    eprintln!("writer: {acked_count} keys acknowledged, {retries} TRYAGAIN retries");
    for i in 0..c.nodes.len() {
        let mut conn = c.nodes[i].connect().unwrap();
        for k in (0..20_000).step_by(31) {
            assert_eq!(
                conn.call(&["GET", &format!("pre:{k}")]).unwrap(),
                Value::Bulk(k.to_string().into_bytes())
            );
        }
    }
    let total: i64 = (0..c.nodes.len())
        .map(|i| {
            c.nodes[i]
                .connect()
                .unwrap()
                .cmd("DBSIZE")
                .unwrap()
                .as_int()
                .unwrap()
        })
        .sum();
    assert_eq!(total, 20_000 + 3000, "every key on exactly one node");
}

#[test]
fn watch_multi_exec_increments_from_every_node_are_exact() {
    let c = KvdCluster::start(3, &[]).expect("cluster");
    let successes = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();
    for t in 0..6 {
        let port = c.nodes[t % 3].port;
        let successes = successes.clone();
        threads.push(std::thread::spawn(move || {
            let mut conn = protocol_tests::Conn::connect(port).unwrap();
            let mut done = 0;
            while done < 40 {
                conn.call(&["WATCH", "counter"]).unwrap();
                let n = conn.call(&["GET", "counter"]).unwrap().as_int().unwrap_or(0);
                conn.cmd("MULTI").unwrap();
                conn.call(&["SET", "counter", &(n + 1).to_string()]).unwrap();
                match conn.cmd("EXEC").unwrap() {
                    Value::Array(_) => {
                        done += 1;
                        successes.fetch_add(1, Ordering::Relaxed);
                    }
                    Value::Nil => {}
                    other => panic!("EXEC: {other:?}"),
                }
            }
        }));
    }
    for t in threads {
        t.join().unwrap();
    }
    let total = successes.load(Ordering::Relaxed) as i64;
    assert_eq!(total, 240);
    for i in 0..3 {
        assert_eq!(
            c.nodes[i]
                .connect()
                .unwrap()
                .call(&["GET", "counter"])
                .unwrap()
                .as_int(),
            Some(total)
        );
    }
}

#[test]
fn the_cluster_secret_keeps_strangers_out() {
    let mut c = KvdCluster::start(3, &[]).expect("cluster");
    // A node with the wrong secret is not heard and gets no slots.
    let stranger = c.add_node_with_secret("wrong secret").unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let info = c.info(stranger).unwrap();
    assert_eq!(info["kvd_cluster_slots_owned"], "0");
    assert_eq!(info["kvd_cluster_nodes"], "1", "it heard nobody");
    for i in 0..3 {
        assert_eq!(
            c.info(i).unwrap()["kvd_cluster_nodes"],
            "3",
            "node {i} heard the stranger"
        );
    }
    let e = c.nodes[stranger].connect().unwrap().call(&["GET", "x"]).unwrap();
    assert!(e.as_str().starts_with("CLUSTERDOWN"), "{e:?}");
    // Peer commands need the secret.
    let mut conn = c.nodes[0].connect().unwrap();
    let e = conn.call(&["KVD.HANDOFF", "0-16383"]).unwrap();
    assert!(e.as_str().starts_with("NOPERM"), "{e:?}");
    let challenge = conn.call(&["KVD.PEER", "CHALLENGE"]).unwrap().as_str();
    assert_eq!(challenge.len(), 32);
    let e = conn.call(&["KVD.PEER", "AUTH", "me", &"00".repeat(32)]).unwrap();
    assert_eq!(e, Value::Error("ERR invalid cluster secret".into()));
    assert!(conn.closed_within(Duration::from_secs(2)));
    // Garbage on the gossip port and on the client port harms nobody.
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    for g in &c.gossip[..3] {
        for n in 0..50u8 {
            udp.send_to(&vec![n; 1 + n as usize * 20], ("127.0.0.1", *g))
                .unwrap();
        }
    }
    let mut junk = c.nodes[1].connect().unwrap();
    junk.send_raw(b"*3\r\n$9999999999\r\nKVD.PEER\r\n\x00\xff garbage\r\n")
        .unwrap();
    assert!(junk.closed_within(Duration::from_secs(2)));
    std::thread::sleep(Duration::from_secs(1));
    let mut a = c.nodes[0].connect().unwrap();
    for k in 0..100 {
        a.call(&["SET", &format!("after{k}"), "1"]).unwrap();
    }
    for i in 0..3 {
        assert_eq!(c.info(i).unwrap()["kvd_cluster_nodes_live"], "3");
        let mut conn = c.nodes[i].connect().unwrap();
        assert_eq!(
            conn.call(&["EXISTS", "after7", "after42", "after99"]).unwrap(),
            Value::Int(3)
        );
    }
}

/// Compare-and-swap increments (WATCH, GET, MULTI, SET, EXEC) on a few keys
/// from clients on every node, while a fourth node joins and slots move: the
/// recorded history of every key must be linearizable (checked with the
/// Wing–Gong/Lowe search in `protocol_tests::linearizability`, whose own tests
/// show it rejects stale reads, lost updates and double CAS).
#[test]
fn cas_histories_stay_linearizable_while_slots_move() {
    use protocol_tests::linearizability::{check, Event, Op};
    use std::time::Instant;
    let mut c = KvdCluster::start(3, &[]).expect("cluster");
    let keys = ["lin:a", "lin:b", "lin:c", "lin:d"];
    let stop = Arc::new(AtomicBool::new(false));
    let history: Arc<Mutex<HashMap<&'static str, Vec<Event>>>> = Arc::default();
    let mut threads = Vec::new();
    for t in 0..6 {
        let port = c.nodes[t % 3].port;
        let (stop, history) = (stop.clone(), history.clone());
        threads.push(std::thread::spawn(move || {
            let mut conn = protocol_tests::Conn::connect(port).unwrap();
            let mut n = 0u64;
            let mut successes = 0;
            while !stop.load(Ordering::Relaxed) {
                let key = keys[(n as usize * 7 + t) % keys.len()];
                n += 1;
                let w = conn.call(&["WATCH", key]).unwrap();
                if w.is_error() {
                    // A slot in the middle of a hand-off: TRYAGAIN is allowed.
                    assert!(w.as_str().starts_with("TRYAGAIN"), "{w:?}");
                    continue;
                }
                let invoked = Instant::now();
                let read_start = Instant::now();
                let v = conn.call(&["GET", key]).unwrap();
                let read_end = Instant::now();
                let value = match v {
                    Value::Nil => None,
                    other => Some(other.as_int().unwrap_or_else(|| panic!("GET {key}: {other:?}"))),
                };
                let next = value.unwrap_or(0) + 1;
                conn.cmd("MULTI").unwrap();
                conn.call(&["SET", key, &next.to_string()]).unwrap();
                let exec = conn.cmd("EXEC").unwrap();
                let completed = Instant::now();
                let mut h = history.lock().unwrap();
                let events = h.entry(key).or_default();
                events.push(Event {
                    op: Op::Read(value),
                    invoked: read_start,
                    completed: Some(read_end),
                });
                match exec {
                    Value::Array(_) => {
                        successes += 1;
                        events.push(Event {
                            op: Op::Cas {
                                expected: value,
                                new: next,
                            },
                            invoked,
                            completed: Some(completed),
                        });
                    }
                    // Aborted: another client changed the key, or its slot moved.
                    Value::Nil => {}
                    other => panic!("EXEC: {other:?}"),
                }
            }
            successes
        }));
    }
    let holder = |c: &KvdCluster| -> usize {
        let slot = c.nodes[0]
            .connect()
            .unwrap()
            .call(&["CLUSTER", "KEYSLOT", "lin:a"])
            .unwrap()
            .as_str();
        (0..c.nodes.len())
            .find(|&i| {
                let mut conn = c.nodes[i].connect().unwrap();
                conn.call(&["CLUSTER", "COUNTKEYSINSLOT", &slot])
                    .unwrap()
                    .as_int()
                    == Some(1)
            })
            .expect("some node holds lin:a")
    };
    std::thread::sleep(Duration::from_secs(2));
    let before = holder(&c);
    // A join moves some slots; the node holding lin:a then leaving moves that one for sure.
    c.add_node().unwrap();
    c.wait_settled(Duration::from_secs(60)).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let leaver = holder(&c);
    c.nodes[leaver].connect().unwrap().cmd("CLUSTER LEAVE").unwrap();
    c.wait_settled(Duration::from_secs(60)).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let after = holder(&c);
    // The leave moved lin:a for sure (the join may have too, or may not).
    assert_ne!(
        after, leaver,
        "lin:a stayed on the node that left: {before} -> {leaver} -> {after}"
    );
    stop.store(true, Ordering::Relaxed);
    let successes: u64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
    let history = history.lock().unwrap();
    let mut total = 0;
    for key in keys {
        let events = &history[key];
        let cas = events.iter().filter(|e| matches!(e.op, Op::Cas { .. })).count() as i64;
        total += cas;
        assert!(
            check(events, None),
            "{key}: the history of {} operations is not linearizable",
            events.len()
        );
        // Every node agrees on the final value: the number of successful CAS.
        for i in 0..c.nodes.len() {
            let v = c.nodes[i]
                .connect()
                .unwrap()
                .call(&["GET", key])
                .unwrap()
                .as_int();
            assert_eq!(v, Some(cas), "{key} through node {i}");
        }
    }
    assert_eq!(total as u64, successes);
    let moved = sum_info(&c, "kvd_cluster_slots_moved_in");
    eprintln!(
        "{successes} successful CAS over {} keys, linearizable; {moved} slot moves in all",
        keys.len()
    );
    assert!(successes > 100);
}

/// Without replication (the next issue) a node that is down makes its own
/// slots unavailable — with a clear error, never a wrong answer — while every
/// other slot keeps working; restarted, it comes back as the same node with
/// the same slots and keys (its id, slot authority and data are in its --dir).
#[test]
fn a_killed_node_comes_back_with_its_slots_and_keys() {
    let mut c = KvdCluster::start(3, &[]).expect("cluster");
    let mut conn = c.nodes[0].connect().unwrap();
    set_numbered(&mut conn, "k", 3000);
    let id = c.nodes[2]
        .connect()
        .unwrap()
        .cmd("CLUSTER MYID")
        .unwrap()
        .as_str();
    let owned = c.info(2).unwrap()["kvd_cluster_slots_owned"].clone();
    let on_2 = c.nodes[2]
        .connect()
        .unwrap()
        .cmd("DBSIZE")
        .unwrap()
        .as_int()
        .unwrap();
    assert!(on_2 > 0);
    c.kill9(2);
    let (mut ok, mut down) = (0, 0);
    let mut live_key = None;
    for k in 0..3000 {
        match conn.call(&["GET", &format!("k{k}")]).unwrap() {
            Value::Bulk(v) => {
                assert_eq!(v, k.to_string().into_bytes());
                ok += 1;
                live_key.get_or_insert(k);
            }
            Value::Error(e) => {
                assert!(e.starts_with("CLUSTERDOWN"), "{e}");
                down += 1;
            }
            other => panic!("k{k}: {other:?}"),
        }
    }
    assert_eq!(down as i64, on_2, "exactly the dead node's keys are unavailable");
    assert_eq!(ok + down, 3000);
    // Writes to live slots keep working.
    let live_key = format!("k{}", live_key.expect("two nodes are up"));
    assert_eq!(conn.call(&["SET", &live_key, "new"]).unwrap().as_str(), "OK");
    c.restart(2).unwrap();
    c.wait_settled(Duration::from_secs(60)).unwrap();
    let mut back = c.nodes[2].connect().unwrap();
    assert_eq!(back.cmd("CLUSTER MYID").unwrap().as_str(), id);
    assert_eq!(c.info(2).unwrap()["kvd_cluster_slots_owned"], owned);
    for k in 0..3000 {
        let key = format!("k{k}");
        let want = if key == live_key {
            "new".to_string()
        } else {
            k.to_string()
        };
        assert_eq!(conn.call(&["GET", &key]).unwrap(), Value::Bulk(want.into_bytes()));
    }
    assert_eq!(
        back.call(&["GET", &live_key]).unwrap(),
        Value::Bulk(b"new".to_vec())
    );
}

/// Issue 23: a plain client pipelining `SET k v1`, `GET k`, `SET k v2`,
/// `GET k` to a node that forwards `k` gets `OK, v1, OK, v2`, in both
/// protocols. Before, consecutive forwards took different pooled links and
/// ran out of order on the serving node (`v2, v2`, hundreds of times per run).
#[test]
fn forwarded_pipelines_keep_their_order() {
    let c = KvdCluster::start(3, &[]).expect("cluster");
    for resp3 in [false, true] {
        let mut conn = c.nodes[0].connect().unwrap();
        if resp3 {
            conn.call(&["HELLO", "3"]).unwrap();
        }
        // Keys node 0 does not serve: all forwarded.
        let keys: Vec<String> = (0..2000)
            .map(|k| format!("order{k}"))
            .filter(|k| {
                let mut direct = c.nodes[0].connect().unwrap();
                direct.call(&["READONLY"]).unwrap();
                direct.call(&["GET", k]).unwrap().text().starts_with("MOVED")
            })
            .take(100)
            .collect();
        assert_eq!(keys.len(), 100, "not enough keys on other nodes");
        let mut wrong = Vec::new();
        for round in 0..5 {
            let mut wire = Vec::new();
            for k in &keys {
                let (v1, v2) = (format!("{k}-{round}-a"), format!("{k}-{round}-b"));
                for args in [
                    vec!["SET", k, &v1],
                    vec!["GET", k],
                    vec!["SET", k, &v2],
                    vec!["GET", k],
                ] {
                    wire.extend(protocol_tests::encode_request(&args));
                }
            }
            conn.send_raw(&wire).unwrap();
            for k in &keys {
                let replies: Vec<Value> = (0..4)
                    .map(|_| Value::parse(&conn.read_reply_raw().unwrap(), resp3).unwrap())
                    .collect();
                let want = [
                    Value::Status("OK".into()),
                    bulk(&format!("{k}-{round}-a")),
                    Value::Status("OK".into()),
                    bulk(&format!("{k}-{round}-b")),
                ];
                if replies != want {
                    wrong.push(format!("{k} round {round}: {replies:?}"));
                }
            }
        }
        assert!(
            wrong.is_empty(),
            "{} of 500 forwarded pipelines out of order (resp3 {resp3}), e.g. {:?}",
            wrong.len(),
            &wrong[..wrong.len().min(3)]
        );
    }
}

/// Issue 23: a request forwarded to a node that is stopped (SIGSTOP, a
/// desktop asleep) gets an error within the forward timeout (5 s) instead of
/// waiting as long as the node is stopped.
#[test]
fn a_forward_to_a_stopped_node_answers_within_its_timeout() {
    let c = KvdCluster::start(3, &[]).expect("cluster");
    let key = (0..2000)
        .map(|k| format!("sleepy{k}"))
        .find(|k| {
            let mut direct = c.nodes[2].connect().unwrap();
            direct.call(&["READONLY"]).unwrap();
            !direct.call(&["GET", k]).unwrap().text().starts_with("MOVED")
        })
        .expect("a key node 2 serves");
    let mut conn = c.nodes[0].connect().unwrap();
    assert_eq!(conn.call(&["SET", &key, "v"]).unwrap().as_str(), "OK");
    // Enough forwards that node 0 keeps pooled links to node 2 (the fast path).
    for _ in 0..200 {
        assert_eq!(conn.call(&["GET", &key]).unwrap(), bulk("v"));
    }
    let pid = c.nodes[2].pid() as i32;
    // SAFETY: signalling a child process of this test.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    // The stop takes effect when each of its threads gets to it: a thread
    // already running may still serve a request (CI saw one answer).
    protocol_tests::wait_stopped(pid as u32);
    let asked = std::time::Instant::now();
    let reply = conn.call(&["GET", &key]);
    let waited = asked.elapsed();
    unsafe { libc::kill(pid, libc::SIGCONT) };
    let reply = reply.unwrap();
    eprintln!("with the serving node stopped, a forwarded GET answered after {waited:?}: {reply:?}");
    assert!(reply.text().starts_with("CLUSTERDOWN"), "{reply:?}");
    assert!(
        waited < Duration::from_secs(8),
        "the forwarded GET waited {waited:?}"
    );
    // Once the node is back, the same key answers again.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(conn.call(&["GET", &key]).unwrap(), bulk("v"));
}

/// Issue 18: a cluster node keeps database 0 only, and says so as a Redis
/// Cluster node does (Redis 7's texts), whether it shards (`--cluster`) or
/// replicates (`--replicas`).
#[test]
fn cluster_nodes_keep_database_0_only() {
    let sharded = protocol_tests::KvdCluster::start(1, &[]).unwrap();
    let replicated = protocol_tests::Replicated::start(3, 3);
    for mut c in [sharded.nodes[0].connect().unwrap(), replicated.conn(0)] {
        assert_eq!(c.cmd("SELECT 0").unwrap(), Value::Status("OK".into()));
        for (line, text) in [
            ("SELECT 1", "ERR SELECT is not allowed in cluster mode"),
            ("SWAPDB 0 1", "ERR SWAPDB is not allowed in cluster mode"),
            ("MOVE k 1", "ERR MOVE is not allowed in cluster mode"),
            (
                "COPY {k}a {k}b DB 1",
                "ERR Copying to another database is not allowed in cluster mode",
            ),
        ] {
            assert_eq!(c.cmd(line).unwrap(), Value::Error(text.into()), "{line}");
        }
    }
}

/// Issue 18: CLIENT REPLY OFF and SKIP silence replies to commands a cluster
/// node forwards to the key's owner too (they used to arrive anyway): the
/// same bytes as a standalone redis-server for the same pipelined script.
#[test]
fn client_reply_silences_forwarded_replies() {
    use std::io::{Read, Write};
    protocol_tests::require_redis();
    let c = KvdCluster::start(3, &[]).expect("cluster");
    let redis = protocol_tests::Server::redis(&[]).unwrap();
    let mut script = String::from("CLIENT REPLY OFF\r\n");
    for k in 0..20 {
        script += &format!("SET k{k} {k}\r\n");
    }
    script += "CLIENT REPLY ON\r\nGET k1\r\nCLIENT REPLY SKIP\r\nGET k2\r\nGET k3\r\n";
    script += "CLIENT REPLY OFF\r\nGET k4\r\nCLIENT REPLY ON\r\nGET k5\r\nQUIT\r\n";
    let collect = |port: u16| {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(script.as_bytes()).unwrap();
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got);
        String::from_utf8_lossy(&got).into_owned()
    };
    let before: u64 = c.info(1).unwrap()["kvd_cluster_forwarded_commands"]
        .parse()
        .unwrap();
    let kvd = collect(c.nodes[1].port);
    let after: u64 = c.info(1).unwrap()["kvd_cluster_forwarded_commands"]
        .parse()
        .unwrap();
    assert!(
        after - before >= 5,
        "most of the 25 keyed commands go to other nodes"
    );
    assert_eq!(kvd, collect(redis.port));
    assert_eq!(kvd, "+OK\r\n$1\r\n1\r\n$1\r\n3\r\n+OK\r\n$1\r\n5\r\n+OK\r\n");
}
