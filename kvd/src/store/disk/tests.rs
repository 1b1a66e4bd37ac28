//! Tests that attack the engine's invariants: restarts, torn and corrupt logs,
//! deletes and expiry across restarts, compaction racing writers.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;

use super::*;

fn opts(segment_size: u64) -> Options {
    Options {
        fsync: Fsync::Always,
        segment_size,
        compact_dead_fraction: 0.5,
    }
}

fn put(s: &DiskStore, k: &str, v: &str) {
    let e = Entry {
        value: Bytes::copy_from_slice(v.as_bytes()),
        expires_at: None,
    };
    s.update(&Bytes::copy_from_slice(k.as_bytes()), false, &mut |_| {
        Update::Put(e.clone())
    })
    .unwrap();
}

fn del(s: &DiskStore, k: &str) {
    s.update(&Bytes::copy_from_slice(k.as_bytes()), false, &mut |_| {
        Update::Remove
    })
    .unwrap();
}

fn get(s: &DiskStore, k: &str) -> Option<String> {
    s.get(&Bytes::copy_from_slice(k.as_bytes()))
        .unwrap()
        .map(|e| String::from_utf8(e.value.to_vec()).unwrap())
}

/// Waits for the work after each seal (fsync, hint file) to finish: until it
/// has, compaction leaves a segment alone.
fn settle(s: &DiskStore) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let active = s.active.read().id;
    while s
        .segments
        .read()
        .values()
        .any(|seg| seg.id != active && !seg.settled.load(Ordering::Acquire))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "sealed segments never settled"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

fn reopen(dir: &Path, store: Arc<DiskStore>, segment_size: u64) -> Arc<DiskStore> {
    store.flush().unwrap();
    drop(store);
    DiskStore::open(dir, opts(segment_size)).unwrap()
}

#[test]
fn restart_keeps_values_deletes_and_overwrites() {
    let dir = tempfile::tempdir().unwrap();
    let s = DiskStore::open(dir.path(), opts(1 << 20)).unwrap();
    for i in 0..1000 {
        put(&s, &format!("k{i}"), &format!("v{i}"));
    }
    for i in 0..1000 {
        if i % 3 == 0 {
            del(&s, &format!("k{i}"));
        } else if i % 3 == 1 {
            put(&s, &format!("k{i}"), "new");
        }
    }
    let s = reopen(dir.path(), s, 1 << 20);
    for i in 0..1000 {
        let want = match i % 3 {
            0 => None,
            1 => Some("new".to_string()),
            _ => Some(format!("v{i}")),
        };
        assert_eq!(get(&s, &format!("k{i}")), want, "k{i}");
    }
    assert_eq!(s.len(), 666);
}

#[test]
fn many_segments_restart_from_hint_files() {
    let dir = tempfile::tempdir().unwrap();
    // Tiny segments: every few writes rotate and leave a hint file.
    let s = DiskStore::open(dir.path(), opts(4096)).unwrap();
    for i in 0..2000 {
        put(&s, &format!("key{i}"), &"x".repeat(100));
    }
    // Hint files are written in the background after sealing.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let s = reopen(dir.path(), s, 4096);
    assert!(s.startup_stats().from_hints > 10, "{:?}", s.startup_stats());
    for i in 0..2000 {
        assert_eq!(get(&s, &format!("key{i}")).map(|v| v.len()), Some(100), "key{i}");
    }
}

#[test]
fn a_torn_tail_is_cut_and_earlier_records_survive() {
    let dir = tempfile::tempdir().unwrap();
    let s = DiskStore::open(dir.path(), opts(1 << 20)).unwrap();
    put(&s, "a", "1");
    put(&s, "b", "2");
    put(&s, "c", "3");
    s.flush().unwrap();
    let seg = s.active.read().clone();
    let path = seg.path.clone();
    let len = seg.len();
    drop(seg);
    drop(s);
    // The file is preallocated; cut it as a crash mid-write of "c" would leave it.
    let bytes = std::fs::read(&path).unwrap();
    for cut in 1..(HEADER as u64 + 2) {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(
            tmp.path().join(path.file_name().unwrap()),
            &bytes[..(len - cut) as usize],
        )
        .unwrap();
        let s = DiskStore::open(tmp.path(), opts(1 << 20)).unwrap();
        assert_eq!(get(&s, "a").as_deref(), Some("1"), "cut {cut}");
        assert_eq!(get(&s, "b").as_deref(), Some("2"), "cut {cut}");
        assert_eq!(get(&s, "c"), None, "cut {cut}");
        assert!(s.startup_stats().truncated_bytes > 0);
        // And the store keeps working after the repair.
        put(&s, "d", "4");
        let s = reopen(tmp.path(), s, 1 << 20);
        assert_eq!(get(&s, "d").as_deref(), Some("4"));
    }
}

#[test]
fn a_corrupt_record_in_the_middle_is_skipped_not_fatal() {
    let dir = tempfile::tempdir().unwrap();
    let s = DiskStore::open(dir.path(), opts(1 << 20)).unwrap();
    put(&s, "before", "1");
    put(&s, "victim", "2");
    put(&s, "after", "3");
    s.flush().unwrap();
    let path = s.active.read().path.clone();
    drop(s);
    let mut bytes = std::fs::read(&path).unwrap();
    // Flip a byte inside the victim's value.
    let at = bytes.windows(6).position(|w| w == b"victim").unwrap() + 6;
    bytes[at] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
    let s = DiskStore::open(dir.path(), opts(1 << 20)).unwrap();
    assert_eq!(get(&s, "before").as_deref(), Some("1"));
    assert_eq!(get(&s, "victim"), None);
    assert_eq!(get(&s, "after").as_deref(), Some("3"));
    assert!(s.startup_stats().skipped_bytes > 0);
}

#[test]
fn expiry_and_flushall_survive_restart() {
    let dir = tempfile::tempdir().unwrap();
    let s = DiskStore::open(dir.path(), opts(1 << 20)).unwrap();
    let far = now_ms() + 3_600_000;
    let k = Bytes::from_static(b"ttl");
    s.update(&k, false, &mut |_| {
        Update::Put(Entry {
            value: Bytes::from_static(b"v"),
            expires_at: Some(far),
        })
    })
    .unwrap();
    s.update(&Bytes::from_static(b"gone"), false, &mut |_| {
        Update::Put(Entry {
            value: Bytes::from_static(b"v"),
            expires_at: Some(now_ms() + 50),
        })
    })
    .unwrap();
    let s = reopen(dir.path(), s, 1 << 20);
    assert_eq!(s.get(&k).unwrap().unwrap().expires_at, Some(far));
    std::thread::sleep(std::time::Duration::from_millis(100));
    let s = reopen(dir.path(), s, 1 << 20);
    assert!(
        s.get(&Bytes::from_static(b"gone")).unwrap().is_none(),
        "expired key came back"
    );
    put(&s, "x", "1");
    s.clear().unwrap();
    put(&s, "after-flush", "2");
    let s = reopen(dir.path(), s, 1 << 20);
    assert_eq!(get(&s, "x"), None);
    assert_eq!(get(&s, "ttl"), None);
    assert_eq!(get(&s, "after-flush").as_deref(), Some("2"));
    assert_eq!(s.len(), 1);
}

#[test]
fn compaction_racing_writers_loses_nothing_and_frees_space() {
    let dir = tempfile::tempdir().unwrap();
    let s = DiskStore::open(dir.path(), opts(64 * 1024)).unwrap();
    for round in 0..5 {
        for i in 0..500 {
            put(&s, &format!("k{i}"), &format!("{round}-{}", "x".repeat(200)));
        }
    }
    for i in 0..250 {
        del(&s, &format!("k{i}"));
    }
    let before: u64 = s.segments.read().values().map(|x| x.bytes().len() as u64).sum();
    // Writers keep changing keys while compaction runs.
    let writer = {
        let s = s.clone();
        std::thread::spawn(move || {
            for i in 250..500 {
                put(&s, &format!("k{i}"), &format!("final-{i}"));
            }
            for i in 0..50 {
                put(&s, &format!("k{i}"), &format!("revived-{i}"));
            }
        })
    };
    settle(&s);
    let reclaimed = s.compact_now(0.3).unwrap();
    writer.join().unwrap();
    assert!(reclaimed > 0);
    let check = |s: &DiskStore| {
        for i in 0..500 {
            let want = if i < 50 {
                Some(format!("revived-{i}"))
            } else if i < 250 {
                None
            } else {
                Some(format!("final-{i}"))
            };
            assert_eq!(get(s, &format!("k{i}")), want, "k{i}");
        }
    };
    check(&s);
    let after: u64 = s.segments.read().values().map(|x| x.bytes().len() as u64).sum();
    assert!(after < before, "disk use {before} -> {after}");
    let s = reopen(dir.path(), s, 64 * 1024);
    check(&s);
    assert_eq!(s.len(), 300);
}

#[test]
fn live_bytes_track_what_the_index_points_at() {
    let dir = tempfile::tempdir().unwrap();
    let s = DiskStore::open(dir.path(), opts(1 << 20)).unwrap();
    put(&s, "a", "1");
    put(&s, "a", "2");
    del(&s, "a");
    put(&s, "b", "3");
    let (live, total) = s.space();
    assert_eq!(live, HEADER as u64 + 2);
    assert!(total > live);
    assert_eq!(s.active.read().live.load(Ordering::Relaxed), live);
}

#[test]
fn damage_after_start_up_is_an_error_not_bad_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let s = DiskStore::open(dir.path(), opts(4096)).unwrap();
    put(&s, "victim", &"v".repeat(100));
    for i in 0..100 {
        put(&s, &format!("filler{i}"), &"f".repeat(100));
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    // Restart from hint files (which do not check values), then rot a value.
    let s = reopen(dir.path(), s, 4096);
    let path = s.segments.read().values().next().unwrap().path.clone();
    let mut bytes = std::fs::read(&path).unwrap();
    let at = bytes.windows(6).position(|w| w == b"victim").unwrap() + 10;
    bytes[at] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    let victim = Bytes::from_static(b"victim");
    assert!(matches!(s.get(&victim), Err(StoreError::Corrupt(k)) if k == "victim"));
    // A read-modify-write is refused; a blind overwrite repairs the key.
    assert!(s.update(&victim, true, &mut |_| Update::Keep).is_err());
    put(&s, "victim", "fixed");
    assert_eq!(get(&s, "victim").as_deref(), Some("fixed"));
    assert_eq!(get(&s, "filler5").map(|v| v.len()), Some(100));
}

/// Writes `keys` keys `rounds` times over (300-byte values naming the round),
/// so all but the last round's segments end up wholly dead.
fn overwrite(s: &DiskStore, rounds: usize, keys: usize) {
    for round in 0..rounds {
        for i in 0..keys {
            put(s, &format!("k{i}"), &format!("{round}-{}", "x".repeat(300)));
        }
    }
}

/// Every key holds the last round's value.
fn check_last_round(s: &DiskStore, rounds: usize, keys: usize) {
    for i in 0..keys {
        let want = format!("{}-{}", rounds - 1, "x".repeat(300));
        assert_eq!(get(s, &format!("k{i}")), Some(want), "k{i}");
    }
}

#[test]
fn wholly_dead_segments_are_dropped_and_values_survive() {
    let dir = tempfile::tempdir().unwrap();
    let s = DiskStore::open(dir.path(), opts(8 * 1024)).unwrap();
    overwrite(&s, 20, 20);
    let segments_before = s.segments.read().len();
    settle(&s);
    // (The background thread may have dropped some of them already.)
    s.compact_now(0.99).unwrap();
    assert!(s.segments.read().len() < segments_before);
    check_last_round(&s, 20, 20);
    let s = reopen(dir.path(), s, 8 * 1024);
    check_last_round(&s, 20, 20);
}

#[test]
fn the_background_drops_dead_segments_well_before_compaction_and_leaves_no_stray_hints() {
    let dir = tempfile::tempdir().unwrap();
    let s = DiskStore::open(dir.path(), opts(8 * 1024)).unwrap();
    overwrite(&s, 40, 10);
    let segments_before = s.segments.read().len();
    assert!(segments_before > 10);
    // Compaction proper runs every 5 s; the tick that drops dead segments, every 100 ms.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(4);
    while s.segments.read().len() > 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "{} of {segments_before} segments left",
            s.segments.read().len()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    check_last_round(&s, 40, 10);
    // Every hint file belongs to a segment still there.
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if let Some(stem) = name.strip_suffix(".hint") {
            assert!(dir.path().join(format!("{stem}.log")).exists(), "stray {name}");
        }
    }
    let s = reopen(dir.path(), s, 8 * 1024);
    check_last_round(&s, 40, 10);
}

#[test]
fn start_up_removes_hint_files_whose_segment_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let s = DiskStore::open(dir.path(), opts(4096)).unwrap();
    put(&s, "a", "1");
    drop(s);
    let stray = dir.path().join(segment::hint_name(99_999));
    std::fs::write(&stray, b"KVDHINT1 left by a deleted segment").unwrap();
    let s = DiskStore::open(dir.path(), opts(4096)).unwrap();
    assert!(!stray.exists());
    assert_eq!(get(&s, "a").as_deref(), Some("1"));
}

#[test]
fn a_long_compaction_does_not_hold_up_the_everysec_fsync() {
    use std::time::{Duration, Instant};
    let dir = tempfile::tempdir().unwrap();
    let options = Options {
        fsync: Fsync::EverySec,
        ..opts(1 << 20)
    };
    let s = DiskStore::open(dir.path(), options).unwrap();
    let start = Instant::now();
    // A compaction that runs from before the 5 s mark to 6.5 s (the lock is
    // what every compaction holds).
    let compacting = s.maintenance.lock();
    let mut mark = None;
    while start.elapsed() < Duration::from_millis(6500) {
        put(&s, "k", &format!("{:?}", start.elapsed()));
        s.active.read().flush().unwrap();
        if mark.is_none() && start.elapsed() > Duration::from_millis(5200) {
            mark = Some(s.active.read().len());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let synced = s.active.read().synced_len();
    drop(compacting);
    let mark = mark.unwrap();
    assert!(
        synced >= mark,
        "nothing written after 5.2 s was fsynced by 6.5 s ({synced} < {mark})"
    );
}

/// One run of the power-loss model: `ops` operations on a store whose file
/// operations go through [`files::CrashFiles`], each acknowledged as a
/// connection does (`flush` returned), power cut after `cut_at` of them,
/// the store reopened on what the cut left. Returns the keys whose
/// acknowledged state (a value, or deleted) did not survive, each with the
/// time since its acknowledgement at the cut.
fn power_cut_run(
    fsync: Fsync,
    skip_file_syncs: bool,
    cut_at: usize,
    pace: std::time::Duration,
) -> Vec<(String, std::time::Duration)> {
    let dir = tempfile::tempdir().unwrap();
    let files = Arc::new(if skip_file_syncs {
        files::CrashFiles::skipping_file_syncs()
    } else {
        files::CrashFiles::default()
    });
    let options = Options {
        fsync,
        // Small segments: a run rotates every dozen writes, so cuts fall right
        // after segments are created and sealed, and during their hint files.
        segment_size: 4096,
        compact_dead_fraction: 0.5,
    };
    let store = DiskStore::open_with(dir.path(), options.clone(), files.clone()).unwrap();
    // key -> (acknowledged value or None for deleted, when acknowledged)
    let mut model: std::collections::BTreeMap<String, (Option<String>, std::time::Instant)> =
        Default::default();
    for i in 0..cut_at {
        let key = format!("k{}", i % 23);
        if i % 7 == 6 {
            let victim = format!("k{}", (i * 3) % 23);
            del(&store, &victim);
            store.flush().unwrap();
            model.insert(victim, (None, std::time::Instant::now()));
        } else {
            let value = format!("v{i}-{}", "x".repeat(300));
            put(&store, &key, &value);
            store.flush().unwrap();
            model.insert(key, (Some(value), std::time::Instant::now()));
        }
        if i % 13 == 12 {
            settle(&store);
            store.compact_now(f64::MIN_POSITIVE).unwrap();
        }
        std::thread::sleep(pace);
    }
    files.power_off();
    let cut = std::time::Instant::now();
    drop(store);
    files.cut_power().unwrap();
    let store = DiskStore::open(dir.path(), options).unwrap();
    model
        .into_iter()
        .filter(|(k, (want, _))| get(&store, k) != *want)
        .map(|(k, (_, at))| (k, cut - at))
        .collect()
}

/// Issue 22: with `appendfsync always` every acknowledged write survives a
/// power cut after any number of operations (each cut point a run of its own:
/// right after a segment is created, sealed, compacted away). Before the
/// engine synced the data directory after creating a segment, a cut right
/// after a rotation took the new segment file, and the writes acknowledged in
/// it, with it.
#[test]
fn always_keeps_every_acknowledged_write_at_every_power_cut() {
    for cut_at in 0..=60 {
        let lost = power_cut_run(Fsync::Always, false, cut_at, std::time::Duration::ZERO);
        assert!(
            lost.is_empty(),
            "power cut after {cut_at} operations lost {lost:?}"
        );
    }
}

/// The check can fail: an engine whose file syncs do nothing (as if the sync
/// under `always` were removed) loses acknowledged writes at the cut.
#[test]
fn the_power_cut_check_catches_an_engine_that_does_not_sync() {
    let lost: usize = [10, 30, 60]
        .iter()
        .map(|&cut_at| power_cut_run(Fsync::Always, true, cut_at, std::time::Duration::ZERO).len())
        .sum();
    assert!(
        lost > 0,
        "no acknowledged write was lost without syncs: the check cannot fail"
    );
}

/// With `everysec`, a power cut loses at most about the last second: every
/// write acknowledged more than 1.5 s before the cut survives (the fsync runs
/// once a second, checked every 100 ms).
#[test]
fn everysec_loses_at_most_the_last_second_at_a_power_cut() {
    let lost = power_cut_run(Fsync::EverySec, false, 60, std::time::Duration::from_millis(50));
    let old: Vec<_> = lost
        .iter()
        .filter(|(_, age)| *age > std::time::Duration::from_millis(1500))
        .collect();
    assert!(
        old.is_empty(),
        "writes acknowledged more than 1.5 s before the cut were lost: {old:?}"
    );
}

/// A value's first bytes, from the unflushed tail and from the map alike,
/// whatever the value's size, and nothing for a key not stored.
#[test]
fn value_prefixes_come_from_the_tail_and_from_the_map() {
    let dir = tempfile::tempdir().unwrap();
    let s = DiskStore::open(dir.path(), opts(1 << 20)).unwrap();
    let prefix = |s: &DiskStore, k: &str, n: usize| {
        s.value_prefix(&Bytes::copy_from_slice(k.as_bytes()), n)
            .unwrap()
            .map(|b| String::from_utf8(b.to_vec()).unwrap())
    };
    put(&s, "short", "abc");
    put(&s, "long", &"0123456789".repeat(20_000));
    assert_eq!(prefix(&s, "short", 26).as_deref(), Some("abc"));
    assert_eq!(prefix(&s, "long", 12).as_deref(), Some("012345678901"));
    assert_eq!(prefix(&s, "absent", 5), None);
    let s = reopen(dir.path(), s, 1 << 20);
    assert_eq!(prefix(&s, "short", 2).as_deref(), Some("ab"));
    assert_eq!(prefix(&s, "long", 3).as_deref(), Some("012"));
    del(&s, "short");
    assert_eq!(prefix(&s, "short", 2), None);
}
