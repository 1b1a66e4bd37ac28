//! The kvd cluster (`--cluster`: every key on R nodes, each change a CASPaxos
//! round on its replicas), on real kvd processes over loopback: every
//! command through any node, transactions from every node, the cluster
//! secret, and the Redis Cluster texts a cluster node answers with. Faults,
//! joins, leaves and repair are in `replication.rs`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use protocol_tests::{Replicated, Value};

/// The members a node's INFO cluster lists.
fn members(conn: &mut protocol_tests::Conn) -> String {
    let info = conn.cmd("INFO cluster").unwrap().as_str();
    info.lines()
        .find_map(|l| l.strip_prefix("kvd_replica_members:"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

fn bulk(v: &str) -> Value {
    Value::Bulk(v.as_bytes().to_vec())
}

#[test]
fn every_command_works_through_every_node() {
    let c = Replicated::start(4, 3);
    let n = 4;
    for i in 0..n {
        let mut a = c.conn(i);
        let mut b = c.conn((i + 1) % n);
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
        // Counters, expiry, strings: as on one node.
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
        // Commands on several keys of one slot run as one transaction.
        a.call(&["SET", "{t}from", &format!("v{i}")]).unwrap();
        assert_eq!(a.call(&["RENAME", "{t}from", "{t}to"]).unwrap().as_str(), "OK");
        assert_eq!(b.call(&["GET", "{t}to"]).unwrap().as_str(), format!("v{i}"));
        assert_eq!(b.call(&["EXISTS", "{t}from"]).unwrap().as_int(), Some(0));
        // A transaction on one slot, from any node.
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
        // A write through another node breaks a WATCH.
        a.call(&["WATCH", "{t}w"]).unwrap();
        b.call(&["SET", "{t}w", "changed"]).unwrap();
        a.cmd("MULTI").unwrap();
        a.call(&["SET", "{t}w", "mine"]).unwrap();
        assert_eq!(a.cmd("EXEC").unwrap(), Value::Nil);
        assert_eq!(b.call(&["GET", "{t}w"]).unwrap(), bulk("changed"));
        // RESP3 replies in RESP3.
        let mut r3 = c.conn(i);
        r3.cmd("HELLO 3").unwrap();
        for k in 0..20 {
            let raw = r3.call_raw(&["GET", &format!("absent{k}")], 1).unwrap();
            assert_eq!(raw[0], b"_\r\n");
        }
        // Topology commands.
        let slot = a.call(&["CLUSTER", "KEYSLOT", "foo"]).unwrap();
        assert_eq!(slot, Value::Int(12182));
        let nodes = a.cmd("CLUSTER NODES").unwrap().as_str();
        assert_eq!(nodes.lines().count(), 4, "{nodes}");
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
    let slot = c
        .conn(0)
        .call(&["CLUSTER", "KEYSLOT", "n0:k5"])
        .unwrap()
        .as_int()
        .unwrap();
    let slot = slot.to_string();
    let mut holders = 0;
    for i in 0..n {
        let mut conn = c.conn(i);
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
    assert_eq!(holders, 3, "three nodes hold the slot's keys");
    let ids: std::collections::HashSet<String> = (0..n)
        .map(|i| c.conn(i).cmd("CLUSTER MYID").unwrap().as_str())
        .collect();
    assert_eq!(ids.len(), 4);
}

#[test]
fn watch_multi_exec_increments_from_every_node_are_exact() {
    let c = Replicated::start(3, 3);
    let successes = Arc::new(AtomicU64::new(0));
    let unknown = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();
    for t in 0..6 {
        let port = c.ports[t % 3];
        let successes = successes.clone();
        let unknown = unknown.clone();
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
                    // Beaten by a concurrent EXEC after its write reached a
                    // minority: the one answer a CASPaxos write can give that
                    // Redis never does.
                    Value::Error(e) if e.contains("may or may not take effect") => {
                        unknown.fetch_add(1, Ordering::Relaxed);
                    }
                    // Refused with nothing written, after too many conflicts:
                    // Redis Cluster's "try again".
                    Value::Error(e) if e.starts_with("TRYAGAIN") => {}
                    other => panic!("EXEC: {other:?}"),
                }
            }
        }));
    }
    for t in threads {
        t.join().unwrap();
    }
    let total = successes.load(Ordering::Relaxed) as i64;
    let unknown = unknown.load(Ordering::Relaxed) as i64;
    assert_eq!(total, 240);
    for i in 0..3 {
        let counter = c.conn(i).call(&["GET", "counter"]).unwrap().as_int().unwrap();
        assert!(
            (total..=total + unknown).contains(&counter),
            "node {i}: counter {counter}, {total} acknowledged, {unknown} unknown"
        );
    }
}

/// Issue 18: a cluster node keeps database 0 only, and says so as a Redis
/// Cluster node does (Redis 7's texts).
#[test]
fn cluster_nodes_keep_database_0_only() {
    let alone = Replicated::start(1, 3);
    let three = Replicated::start(3, 3);
    for mut c in [alone.conn(0), three.conn(0)] {
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

/// Issue 18: CLIENT REPLY OFF and SKIP silence the replies of commands a
/// cluster node runs as rounds on other nodes too: the same bytes as a
/// standalone redis-server for the same pipelined script.
#[test]
fn client_reply_silences_replies_of_rounds_on_other_nodes() {
    use std::io::{Read, Write};
    protocol_tests::require_redis();
    let c = Replicated::start(3, 3);
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
    let rounds = || {
        let info = c.conn(1).cmd("INFO cluster").unwrap().as_str();
        protocol_tests::report_field(&info, "kvd_paxos_rounds:").unwrap()
    };
    let before = rounds();
    let kvd = collect(c.ports[1]);
    assert!(rounds() - before >= 25, "the 25 keyed commands ran as rounds");
    assert_eq!(kvd, collect(redis.port));
    assert_eq!(kvd, "+OK\r\n$1\r\n1\r\n$1\r\n3\r\n+OK\r\n$1\r\n5\r\n+OK\r\n");
}

/// A node that does not know the cluster secret is never let in: started
/// with `--seed` naming a member, it stays outside and the members stay
/// three; the peer commands refuse a connection that has not proved the
/// secret; a wrong proof closes the connection; junk harms nobody.
#[test]
fn the_cluster_secret_keeps_strangers_out() {
    let c = Replicated::start(3, 3);
    let dir = tempfile::tempdir().unwrap();
    let port = protocol_tests::free_port();
    let seed = c.addr(0);
    let _stranger = protocol_tests::Server::kvd_with_env(
        port,
        dir.path(),
        &["--cluster", "--cluster-secret", "wrong secret", "--seed", &seed],
        &[],
    )
    .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let three = (0..3).map(|i| c.addr(i)).collect::<Vec<_>>().join(",");
    for i in 0..3 {
        assert_eq!(members(&mut c.conn(i)), three, "node {i} let the stranger in");
    }
    let mut stranger = protocol_tests::Conn::connect(port).unwrap();
    assert_eq!(members(&mut stranger), "", "the stranger is in no cluster");
    // Peer commands need the secret.
    let mut conn = c.conn(0);
    let e = conn.call(&["KVD.CONFIG"]).unwrap();
    assert!(e.as_str().starts_with("NOPERM"), "{e:?}");
    let challenge = conn.call(&["KVD.PEER", "CHALLENGE"]).unwrap().as_str();
    assert_eq!(challenge.len(), 32);
    let e = conn.call(&["KVD.PEER", "AUTH", "me", &"00".repeat(32)]).unwrap();
    assert_eq!(e, Value::Error("ERR invalid cluster secret".into()));
    assert!(conn.closed_within(Duration::from_secs(2)));
    let mut junk = c.conn(1);
    junk.send_raw(b"*3\r\n$9999999999\r\nKVD.PEER\r\n\x00\xff garbage\r\n")
        .unwrap();
    assert!(junk.closed_within(Duration::from_secs(2)));
    let mut a = c.conn(0);
    for k in 0..100 {
        assert_eq!(
            a.call(&["SET", &format!("after{k}"), "1"]).unwrap().as_str(),
            "OK"
        );
    }
    for i in 0..3 {
        assert_eq!(
            c.conn(i)
                .call(&["EXISTS", "after7", "after42", "after99"])
                .unwrap(),
            Value::Int(3)
        );
    }
}

/// As in Redis Cluster, a PUBLISH through one node reaches the subscribers
/// of every node (it used to reach only the node's own).
#[test]
fn publish_reaches_subscribers_on_every_node() {
    let c = Replicated::start(3, 3);
    let mut subscribers: Vec<protocol_tests::Conn> = (0..3).map(|i| c.conn(i)).collect();
    for s in &mut subscribers {
        s.cmd("SUBSCRIBE news").unwrap();
    }
    let mut publisher = c.conn(0);
    assert_eq!(
        publisher.cmd("PUBLISH news hello").unwrap(),
        Value::Int(1),
        "this node's subscriber"
    );
    for (i, s) in subscribers.iter_mut().enumerate() {
        s.set_reply_timeout(Duration::from_secs(5)).unwrap();
        let msg = Value::parse(&s.read_reply_raw().unwrap(), false).unwrap();
        assert_eq!(
            msg,
            Value::Array(vec![bulk("message"), bulk("news"), bulk("hello")]),
            "subscriber on node {i}"
        );
    }
}

/// DBSIZE, RANDOMKEY, FLUSHALL and the slot key counts read this node's
/// records; a deleted key leaves a tombstone record (its ballot must stay for
/// the rounds), and an expired key a record past its time: neither is a key.
#[test]
fn deleted_and_expired_keys_are_not_counted() {
    let c = Replicated::start(3, 3);
    let mut a = c.conn(0);
    for k in 0..10 {
        a.call(&["SET", &format!("k{k}"), "v"]).unwrap();
    }
    for k in 0..4 {
        assert_eq!(a.call(&["DEL", &format!("k{k}")]).unwrap(), Value::Int(1));
    }
    a.call(&["SET", "k4", "v", "PX", "1"]).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    let slot = a
        .call(&["CLUSTER", "KEYSLOT", "k0"])
        .unwrap()
        .as_int()
        .unwrap()
        .to_string();
    for i in 0..3 {
        let mut b = c.conn(i);
        assert_eq!(b.cmd("DBSIZE").unwrap(), Value::Int(5), "node {i}");
        assert_eq!(
            b.call(&["CLUSTER", "COUNTKEYSINSLOT", &slot]).unwrap(),
            Value::Int(0)
        );
        assert_eq!(
            b.call(&["CLUSTER", "GETKEYSINSLOT", &slot, "10"]).unwrap(),
            Value::Array(vec![])
        );
    }
    for k in 5..10 {
        assert_eq!(a.call(&["DEL", &format!("k{k}")]).unwrap(), Value::Int(1));
    }
    let rounds = |conn: &mut protocol_tests::Conn| {
        let info = conn.cmd("INFO cluster").unwrap().as_str();
        protocol_tests::report_field(&info, "kvd_paxos_rounds:").unwrap_or(0)
    };
    for i in 0..3 {
        let mut b = c.conn(i);
        assert_eq!(b.cmd("DBSIZE").unwrap(), Value::Int(0), "node {i}");
        assert_eq!(b.cmd("RANDOMKEY").unwrap(), Value::Nil, "node {i}");
        // Nothing left to delete: FLUSHALL runs no round.
        let before = rounds(&mut b);
        assert_eq!(b.cmd("FLUSHALL").unwrap().as_str(), "OK");
        assert_eq!(
            rounds(&mut b),
            before,
            "node {i}: FLUSHALL deleted tombstones again"
        );
    }
}

/// Membership travels on peer links that open with a challenge: a link
/// proves it knows the cluster secret by the HMAC of a random challenge the
/// node just chose. A captured exchange (here: a peer's, made with the
/// secret) replayed later on a new connection answers an old challenge:
/// refused, the connection closed, and the membership command behind it
/// never runs.
#[test]
fn a_captured_peer_exchange_replayed_later_changes_nothing() {
    let c = Replicated::start(3, 3);
    let mut conn = c.conn(0);
    let challenge = conn.call(&["KVD.PEER", "CHALLENGE"]).unwrap().as_str();
    let proof = kvd::cluster::peer::prove("test-secret", &challenge);
    // What went over the wire, as a recorder would keep it.
    let captured = [
        vec!["KVD.PEER", "AUTH", "127.0.0.1:1", proof.as_str()],
        vec!["KVD.JOIN", "127.0.0.1:9"],
    ];
    assert_eq!(
        conn.call(&captured[0]).unwrap().as_str(),
        "OK",
        "the exchange was a valid one"
    );
    let before = members(&mut c.conn(0));
    // Replayed on a new connection, after the node's own new challenge (or
    // without one): refused before the join is read.
    for ask_first in [true, false] {
        let mut replay = c.conn(0);
        if ask_first {
            replay.call(&["KVD.PEER", "CHALLENGE"]).unwrap();
        }
        let e = replay.call(&captured[0]).unwrap();
        assert!(e.is_error(), "replayed proof accepted: {e:?}");
        assert!(
            replay
                .call(&captured[1])
                .map_or(true, |r| r.as_str().starts_with("NOPERM")),
            "a replayed join ran"
        );
    }
    std::thread::sleep(Duration::from_secs(1));
    for i in 0..3 {
        assert_eq!(members(&mut c.conn(i)), before, "node {i}'s members changed");
    }
}

/// CLUSTER SHARDS as Redis 7 answers it: every slot in exactly one shard,
/// each shard a replica set of R nodes with one `master`.
#[test]
fn cluster_shards_lists_every_slot_once_with_its_replica_set() {
    let c = Replicated::start(4, 3);
    let Value::Array(shards) = c.conn(2).cmd("CLUSTER SHARDS").unwrap() else {
        panic!("CLUSTER SHARDS is an array")
    };
    assert!(shards.len() >= 4, "{} shards", shards.len());
    let ids: std::collections::HashSet<String> = (0..4)
        .map(|i| c.conn(i).cmd("CLUSTER MYID").unwrap().as_str())
        .collect();
    let mut covered = vec![0u32; 16384];
    for shard in &shards {
        // RESP2: a flat array of field, value pairs.
        let Value::Array(fields) = shard else {
            panic!("{shard:?}")
        };
        assert_eq!(fields[0].as_str(), "slots");
        assert_eq!(fields[2].as_str(), "nodes");
        let Value::Array(slots) = &fields[1] else { panic!() };
        for range in slots.chunks(2) {
            for s in range[0].as_int().unwrap()..=range[1].as_int().unwrap() {
                covered[s as usize] += 1;
            }
        }
        let Value::Array(nodes) = &fields[3] else { panic!() };
        assert_eq!(nodes.len(), 3, "a replica set of R = 3");
        let mut masters = 0;
        for node in nodes {
            let Value::Array(kv) = node else { panic!() };
            let field = |name: &str| {
                kv.chunks(2)
                    .find(|p| p[0].as_str() == name)
                    .map(|p| p[1].clone())
                    .unwrap_or_else(|| panic!("no {name} in {kv:?}"))
            };
            assert!(ids.contains(&field("id").as_str()));
            assert!(c.ports.contains(&(field("port").as_int().unwrap() as u16)));
            assert_eq!(field("health").as_str(), "online");
            masters += (field("role").as_str() == "master") as u32;
        }
        assert_eq!(masters, 1);
    }
    assert!(covered.iter().all(|&n| n == 1), "every slot in exactly one shard");
    // RESP3: maps.
    let mut r3 = c.conn(0);
    r3.cmd("HELLO 3").unwrap();
    let raw = r3.call_raw(&["CLUSTER", "SHARDS"], 1).unwrap();
    assert!(
        raw[0].starts_with(b"*") && raw[0].windows(2).any(|w| w == b"%2"),
        "{:?}",
        String::from_utf8_lossy(&raw[0][..64.min(raw[0].len())])
    );
}
