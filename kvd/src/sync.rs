//! Synchronisation primitives, swappable for loom's in model-checking builds.
//!
//! Code whose correctness rests on its locks and atomic orderings (the log
//! segment's append / flush / read / seal protocol) takes its primitives from
//! here. Normal builds get `std` atomics and `parking_lot` locks; a test build
//! compiled with `--cfg loom` (see `scripts/loom.sh`) gets loom's, so loom can
//! explore every interleaving of the real code.

#[cfg(not(all(test, loom)))]
mod imp {
    pub use parking_lot::{Mutex, MutexGuard};
    pub use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    pub use std::sync::Arc;

    /// A file read or write about to happen (see the loom version).
    #[inline(always)]
    pub fn io_point() {}
}

#[cfg(all(test, loom))]
mod imp {
    pub use loom::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    pub use loom::sync::Arc;
    pub use loom::sync::MutexGuard;

    /// A file read or write about to happen. loom switches threads only at
    /// its own operations, so without this it runs the code between two of
    /// them, file writes included, as one step, and cannot see a write that
    /// comes after the atomic store publishing it: the store and the write
    /// would look simultaneous. Marking the write as a step of its own lets
    /// the models catch a broken publication order (docs/STORAGE.md).
    pub fn io_point() {
        loom::thread::yield_now();
    }

    /// loom's mutex with `parking_lot`'s signature (no poisoning).
    #[derive(Debug)]
    pub struct Mutex<T>(loom::sync::Mutex<T>);

    impl<T> Mutex<T> {
        pub fn new(value: T) -> Self {
            Mutex(loom::sync::Mutex::new(value))
        }

        pub fn lock(&self) -> MutexGuard<'_, T> {
            self.0.lock().expect("a panicking model thread poisoned the lock")
        }

        pub fn try_lock(&self) -> Option<MutexGuard<'_, T>> {
            self.0.try_lock().ok()
        }
    }
}

pub use imp::*;
