//! Fault injection for tests, switched on only by the `KVD_FAILPOINTS`
//! environment variable (a comma-separated list of names, read once).
//!
//! * `reconfigure-after-vote`, `reconfigure-after-freeze`: stop a
//!   reconfiguration half-way, as a coordinator that crashes there would;
//! * `reconfigure-one-step`: a change that goes in steps stops after its
//!   first, once per process, as a coordinator that dies between steps
//!   would (the coordinator of the cluster finishes it later);
//! * `forget-slowly`: `CLUSTER FORGET`/`LEAVE` answers 3 s after its change
//!   is made, as a member slowed by load would;
//! * `txn-abandon-locked`, `txn-abandon-committed`: a transaction over
//!   several keys stops after locking its keys, or after its commit, as a
//!   coordinator that crashed there would (its locks stay for others to
//!   resolve); `txn-pause-after-lock`: the first such transaction pauses
//!   2 s past the lock timeout between locking and committing, as a
//!   coordinator stalled there would;
//! * `partition`: enables `KVD.PARTITION`, which cuts peer links;
//! * `panic`: enables `KVD.PANIC`, which panics the connection that sends it,
//!   so a test can check that a bug in one connection costs only that
//!   connection (its client slot, subscriptions and watches are released).

/// Whether the failure named `name` is switched on.
pub fn failpoint(name: &str) -> bool {
    static POINTS: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    POINTS
        .get_or_init(|| {
            std::env::var("KVD_FAILPOINTS")
                .unwrap_or_default()
                .split(',')
                .map(str::to_string)
                .collect()
        })
        .iter()
        .any(|p| p == name)
}

/// [`failpoint`], firing only the first time it is asked.
pub fn failpoint_once(name: &str) -> bool {
    static FIRED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    failpoint(name) && !FIRED.swap(true, std::sync::atomic::Ordering::SeqCst)
}
