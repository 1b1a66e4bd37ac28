//! Write buffers kept for reuse.
//!
//! A sequential writer fills one extent until the file spills it (at 64 MiB by
//! default) and then starts the next. Allocated afresh, each new extent costs a
//! page fault for every 4 KiB it grows into, because the allocator gives a freed
//! buffer that large back to the kernel and takes new pages for the next one: a
//! 1 GiB write through the mount took 330k page faults in the mount's process,
//! two thirds of them filling extents (perf, 2026-12-04). Handing the buffer of
//! a spilled extent to the next one reuses pages that are already mapped.
//!
//! Only large buffers are kept, at most [`KEEP`], and for at most [`IDLE`]: a
//! mount that stops writing gives the memory back.

use parking_lot::Mutex;
use std::time::{Duration, Instant};

/// Buffers smaller than this are not worth keeping.
const MIN_CAPACITY: usize = 1 << 20;
/// One spare serves a sequential writer (the spilled extent's buffer becomes
/// the next extent's); two serve two writers at once.
const KEEP: usize = 2;
/// How long a spare is kept without being used.
const IDLE: Duration = Duration::from_secs(5);

pub struct Spares {
    kept: Mutex<Vec<(Vec<u8>, Instant)>>,
}

/// The process's spare buffers: every open file's new extents draw from them.
pub static SPARES: Spares = Spares::new();

impl Spares {
    pub const fn new() -> Self {
        Spares {
            kept: Mutex::new(Vec::new()),
        }
    }

    /// An empty buffer: a kept one (with its capacity) if there is one.
    pub fn take(&self) -> Vec<u8> {
        self.kept.lock().pop().map(|(buf, _)| buf).unwrap_or_default()
    }

    /// Keeps `buf` for a later [`Spares::take`] if it is large and there is room.
    pub fn give(&self, mut buf: Vec<u8>) {
        if buf.capacity() < MIN_CAPACITY {
            return;
        }
        buf.clear();
        let mut kept = self.kept.lock();
        if kept.len() < KEEP {
            kept.push((buf, Instant::now()));
        }
    }

    /// Lets go of buffers that have waited longer than [`IDLE`].
    pub fn trim(&self) {
        self.kept.lock().retain(|(_, since)| since.elapsed() < IDLE);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.kept.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_large_buffer_comes_back_empty_with_its_pages_and_small_ones_are_not_kept() {
        let spares = Spares::new();
        let mut big = vec![7u8; 2 << 20];
        let pages = big.as_mut_ptr();
        spares.give(big);
        spares.give(vec![1u8; 4096]);
        assert_eq!(spares.len(), 1);
        let again = spares.take();
        assert!(again.is_empty());
        assert_eq!(again.as_ptr(), pages as *const u8);
        assert!(again.capacity() >= 2 << 20);
        assert_eq!(spares.take().capacity(), 0, "nothing kept: a new, empty buffer");
    }

    #[test]
    fn at_most_keep_buffers_are_kept_and_trim_keeps_recent_ones() {
        let spares = Spares::new();
        for _ in 0..KEEP + 3 {
            spares.give(Vec::with_capacity(MIN_CAPACITY));
        }
        assert_eq!(spares.len(), KEEP);
        spares.trim();
        assert_eq!(spares.len(), KEEP, "just given: not idle yet");
        spares.kept.lock()[0].1 -= IDLE * 2;
        spares.trim();
        assert_eq!(spares.len(), KEEP - 1);
    }
}
