//! The disk engine through real kvd processes: restarts, `kill -9`, torn logs,
//! compaction under load, and a full disk.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use protocol_tests::{Conn, Server, Value};

fn bulk(s: &str) -> Value {
    Value::Bulk(s.as_bytes().to_vec())
}

fn log_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    files.sort();
    files
}

/// Bytes the log really occupies (segments are sparse while active).
fn disk_usage(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    log_files(dir)
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().blocks() * 512)
        .sum()
}

#[test]
fn restart_keeps_values_deletes_and_expiry() {
    let dir = tempfile::tempdir().unwrap();
    let mut kvd = Server::kvd_in(dir.path(), &[]).unwrap();
    let mut c = kvd.connect().unwrap();
    c.cmd("MSET a 1 b 2 c 3").unwrap();
    c.cmd("DEL b").unwrap();
    c.cmd("SET ttl v EX 1000").unwrap();
    c.cmd("SET short v PX 300").unwrap();
    c.cmd("APPEND a 0").unwrap();
    c.call(&["SET", "big", &"x".repeat(1 << 20)]).unwrap();
    assert!(kvd.terminate(), "kvd did not exit cleanly on SIGTERM");
    std::thread::sleep(Duration::from_millis(400));
    let kvd = Server::kvd_in(dir.path(), &[]).unwrap();
    let mut c = kvd.connect().unwrap();
    assert_eq!(c.cmd("GET a").unwrap(), bulk("10"));
    assert_eq!(c.cmd("GET b").unwrap(), Value::Nil);
    assert_eq!(c.cmd("GET c").unwrap(), bulk("3"));
    let ttl = c.cmd("TTL ttl").unwrap().as_int().unwrap();
    assert!((990..=1000).contains(&ttl), "TTL after restart: {ttl}");
    assert_eq!(
        c.cmd("GET short").unwrap(),
        Value::Nil,
        "an expired key came back"
    );
    assert_eq!(c.cmd("STRLEN big").unwrap(), Value::Int(1 << 20));
    assert_eq!(c.cmd("DBSIZE").unwrap(), Value::Int(4));
}

/// Writers record every acknowledged SET; kvd is killed with SIGKILL mid-load;
/// after a restart every acknowledged key must read back with its value.
fn kill9_loses_no_acknowledged_write(fsync: &str) {
    let dir = tempfile::tempdir().unwrap();
    let mut kvd = Server::kvd_in(dir.path(), &["--appendfsync", fsync]).unwrap();
    // Per key: the last acknowledged value. Per writer: the write in flight when
    // kvd died, which may or may not have reached the log.
    let acked: Arc<Mutex<HashMap<String, String>>> = Arc::default();
    let in_flight: Arc<Mutex<HashMap<String, String>>> = Arc::default();
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let port = kvd.port;
            let (acked, in_flight) = (acked.clone(), in_flight.clone());
            std::thread::spawn(move || {
                let mut c = Conn::connect(port).unwrap();
                for i in 0.. {
                    let (k, v) = (format!("w{w}:k{}", i % 500), format!("{w}-{i}"));
                    in_flight.lock().unwrap().insert(k.clone(), v.clone());
                    match c.call(&["SET", &k, &v]) {
                        Ok(Value::Status(s)) if s == "OK" => {
                            in_flight.lock().unwrap().remove(&k);
                            acked.lock().unwrap().insert(k, v);
                        }
                        _ => return i,
                    }
                }
                unreachable!()
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(800));
    kvd.kill9();
    let written: usize = writers.into_iter().map(|w| w.join().unwrap()).sum();
    assert!(written > 100, "the load did not run ({written} writes)");
    let kvd = Server::kvd_in(dir.path(), &[]).unwrap();
    let mut c = kvd.connect().unwrap();
    let acked = acked.lock().unwrap();
    let in_flight = in_flight.lock().unwrap();
    assert_eq!(in_flight.len(), 4, "each writer had one write in flight");
    for (k, v) in acked.iter() {
        let got = c.call(&["GET", k]).unwrap();
        let newer = in_flight.get(k).map(|v| bulk(v));
        assert!(
            got == bulk(v) || Some(&got) == newer.as_ref(),
            "{fsync}: acknowledged {k}={v} lost after kill -9 (read {got:?})"
        );
    }
}

#[test]
fn kill9_with_appendfsync_always_loses_nothing_acknowledged() {
    kill9_loses_no_acknowledged_write("always");
}

#[test]
fn kill9_with_appendfsync_everysec_loses_nothing_acknowledged() {
    // Replies are sent only after the write() to the log, so a process crash
    // (as opposed to power loss) loses nothing even without fsync.
    kill9_loses_no_acknowledged_write("everysec");
}

#[test]
fn a_torn_tail_is_cut_at_start_up_and_logged() {
    let dir = tempfile::tempdir().unwrap();
    let mut kvd = Server::kvd_in(dir.path(), &["--appendfsync", "always"]).unwrap();
    let mut c = kvd.connect().unwrap();
    for i in 0..100 {
        c.call(&["SET", &format!("k{i}"), &format!("v{i}")]).unwrap();
    }
    c.call(&["SET", "last", &"z".repeat(1000)]).unwrap();
    kvd.kill9();
    // Cut inside the last record, as a crash mid-write would.
    let last = log_files(dir.path()).pop().unwrap();
    let data = std::fs::read(&last).unwrap();
    let end = data.iter().rposition(|&b| b != 0).unwrap() + 1;
    std::fs::write(&last, &data[..end - 500]).unwrap();
    let kvd = Server::kvd_in(dir.path(), &[]).unwrap();
    let mut c = kvd.connect().unwrap();
    for i in 0..100 {
        assert_eq!(
            c.call(&["GET", &format!("k{i}")]).unwrap(),
            bulk(&format!("v{i}"))
        );
    }
    assert_eq!(c.cmd("GET last").unwrap(), Value::Nil);
    let info = c.cmd("INFO persistence").unwrap().as_str();
    assert!(!info.contains("kvd_startup_truncated_bytes:0\r\n"), "{info}");
}

#[test]
fn compaction_under_write_and_delete_load_keeps_latest_values_and_frees_disk() {
    let dir = tempfile::tempdir().unwrap();
    let mut kvd = Server::kvd_in(dir.path(), &["--segment-size", "256kb"]).unwrap();
    let mut c = kvd.connect().unwrap();
    let value = "v".repeat(1000);
    for round in 0..4 {
        for i in 0..1000 {
            c.call(&["SET", &format!("k{i}"), &format!("{round}{value}")])
                .unwrap();
        }
    }
    let before = disk_usage(dir.path());
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (port, stop) = (kvd.port, stop.clone());
        std::thread::spawn(move || {
            let mut w = Conn::connect(port).unwrap();
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let i = n % 1000;
                if i % 2 == 0 {
                    w.call(&["DEL", &format!("k{i}")]).unwrap();
                } else {
                    w.call(&["SET", &format!("k{i}"), &format!("final-{i}")]).unwrap();
                }
                n += 1;
            }
            n
        })
    };
    for _ in 0..5 {
        assert_eq!(
            c.cmd("BGREWRITEAOF").unwrap(),
            Value::Status("Background append only file rewriting started".into())
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    stop.store(true, Ordering::Relaxed);
    let ops = load.join().unwrap();
    assert!(ops >= 1000, "the load covered every key ({ops} ops)");
    // Let the last compaction finish.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        c.cmd("BGREWRITEAOF").unwrap();
        std::thread::sleep(Duration::from_millis(300));
        let info = c.cmd("INFO persistence").unwrap().as_str();
        if info.contains("kvd_compaction_in_progress:0") && disk_usage(dir.path()) < before / 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "disk use did not drop: {before} -> {}\n{info}",
            disk_usage(dir.path())
        );
    }
    let check = |c: &mut Conn| {
        for i in 0..1000 {
            let got = c.call(&["GET", &format!("k{i}")]).unwrap();
            let want = if i % 2 == 0 {
                Value::Nil
            } else {
                bulk(&format!("final-{i}"))
            };
            assert_eq!(got, want, "k{i}");
        }
    };
    check(&mut c);
    kvd.kill9();
    let kvd = Server::kvd_in(dir.path(), &[]).unwrap();
    check(&mut kvd.connect().unwrap());
}

/// Mounts a tiny tmpfs as the data directory and fills it. Needs root, as
/// the mount tests do (CI runs as root); without it the test fails, saying
/// why, rather than passing without having run.
#[test]
fn a_full_disk_is_an_error_reply_and_loses_nothing_acknowledged() {
    let mnt = tempfile::tempdir().unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"])
        .arg(mnt.path())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        mounted,
        "cannot mount a tmpfs at {}: this test needs root (as the mount tests do); run it as root",
        mnt.path().display()
    );
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(self.0).status();
        }
    }
    let _unmount = Unmount(mnt.path());
    let mut kvd = Server::kvd_in(mnt.path(), &["--segment-size", "1mb"]).unwrap();
    let mut acked = Vec::new();
    let mut refusal = None;
    let value = "d".repeat(64 * 1024);
    for i in 0..200 {
        let mut c = kvd.connect().unwrap();
        match c.call(&["SET", &format!("k{i}"), &value]) {
            Ok(Value::Status(s)) if s == "OK" => acked.push(i),
            Ok(Value::Error(e)) => {
                refusal = Some(e);
                break;
            }
            // A batch whose write failed is not acknowledged at all.
            Ok(other) => panic!("unexpected reply {other:?}"),
            Err(_) => {
                refusal = Some("connection closed".into());
                let mut again = kvd.connect().unwrap();
                if let Value::Error(e) = again.call(&["SET", "again", "x"]).unwrap() {
                    refusal = Some(e);
                }
                break;
            }
        }
    }
    let refusal = refusal.expect("a 4 MB disk never filled");
    assert!(refusal.starts_with("MISCONF"), "{refusal}");
    assert!(kvd.alive(), "kvd died on a full disk");
    assert!(acked.len() > 10);
    // Reads keep working, and everything acknowledged survives a restart.
    let mut c = kvd.connect().unwrap();
    assert_eq!(c.cmd("STRLEN k0").unwrap(), Value::Int(value.len() as i64));
    // INFO tells monitoring that persisting fails (it said `ok` whatever happened).
    let persistence = c.cmd("INFO persistence").unwrap().as_str();
    assert!(
        persistence.contains("aof_last_write_status:err")
            && persistence.contains("rdb_last_bgsave_status:err"),
        "{persistence}"
    );
    kvd.kill9();
    let kvd = Server::kvd_in(mnt.path(), &[]).unwrap();
    let mut c = kvd.connect().unwrap();
    for i in &acked {
        assert_eq!(
            c.call(&["STRLEN", &format!("k{i}")]).unwrap(),
            Value::Int(value.len() as i64),
            "k{i}"
        );
    }
}

#[test]
fn two_servers_cannot_share_a_data_directory() {
    let dir = tempfile::tempdir().unwrap();
    let _first = Server::kvd_in(dir.path(), &[]).unwrap();
    let second = Server::kvd_in(dir.path(), &[]);
    assert!(second.is_err(), "a second kvd opened the same data directory");
}
