//! The caching allocator's bookkeeping: size classes and per-class free lists.
//!
//! Device memory is obtained with `cuMemAlloc` in size-class units and never returned to the
//! driver while the process runs, except by `empty_cache` (or an out-of-memory retry). A freed
//! block goes back on its class's free list at once: every kernel, copy and cuBLAS call runs on
//! the device's one compute stream, so work queued later on that stream (the next user of the
//! block) cannot start before the work queued by the previous owner has finished.
//!
//! This file is pure bookkeeping (no driver calls), so it is unit-tested on any machine.

use std::collections::HashMap;

/// Smallest block handed out. Every block is its own `cuMemAlloc`, so every pointer is at
/// least 256-byte aligned whatever its class.
pub const MIN_BLOCK: usize = 512;
/// Above this size, classes are multiples of `LARGE_GRANULE` instead of geometric steps.
const LARGE_THRESHOLD: usize = 64 << 20;
const LARGE_GRANULE: usize = 2 << 20;

/// The size class of a request of `bytes` bytes (> 0): the block size actually reserved.
///
/// - up to 64 MiB: 8 geometric steps per power of two (waste ≤ 12.5 %), floor 512 bytes, so
///   tensors whose sizes differ slightly (sequence lengths of one step and the next) share
///   blocks;
/// - above 64 MiB: multiples of 2 MiB (waste ≤ 3 %), because large tensors (weights, logits
///   chunks, the KV cache) repeat with exactly the same size from step to step.
pub fn size_class(bytes: usize) -> usize {
    if bytes <= MIN_BLOCK {
        return MIN_BLOCK;
    }
    if bytes > LARGE_THRESHOLD {
        return bytes.div_ceil(LARGE_GRANULE) * LARGE_GRANULE;
    }
    // The power of two p with p/2 < bytes <= p; steps of p/16 inside (p/2, p].
    let p = bytes.next_power_of_two();
    let step = (p / 16).max(64);
    bytes.div_ceil(step) * step
}

/// Counters the benches and the trainer report.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AllocStats {
    /// Bytes (in size-class units) held by live tensors.
    pub in_use: usize,
    /// Highest `in_use` since creation or the last `reset_peak`.
    pub peak: usize,
    /// Bytes held in free lists, ready for reuse.
    pub cached: usize,
    /// Number of `cuMemAlloc` calls made.
    pub device_allocs: u64,
    /// Number of requests served from a free list.
    pub reuses: u64,
}

/// Free lists keyed by size class.
#[derive(Default)]
pub struct Pool {
    free: HashMap<usize, Vec<u64>>,
    pub stats: AllocStats,
}

impl Pool {
    /// A cached block of exactly `class` bytes, if any; counts it as in use.
    pub fn take(&mut self, class: usize) -> Option<u64> {
        let ptr = self.free.get_mut(&class)?.pop()?;
        self.stats.cached -= class;
        self.stats.reuses += 1;
        self.mark_used(class);
        Some(ptr)
    }

    /// Records a block fresh from the driver as in use.
    pub fn add_new(&mut self, class: usize) {
        self.stats.device_allocs += 1;
        self.mark_used(class);
    }

    fn mark_used(&mut self, class: usize) {
        self.stats.in_use += class;
        self.stats.peak = self.stats.peak.max(self.stats.in_use);
    }

    /// Returns a block to its free list.
    pub fn give_back(&mut self, ptr: u64, class: usize) {
        self.stats.in_use -= class;
        self.stats.cached += class;
        self.free.entry(class).or_default().push(ptr);
    }

    /// Removes every cached block, returning them (pointer, size class) for the caller to free.
    pub fn drain(&mut self) -> Vec<(u64, usize)> {
        self.stats.cached = 0;
        self.free.drain().flat_map(|(class, v)| v.into_iter().map(move |p| (p, class))).collect()
    }

    pub fn reset_peak(&mut self) {
        self.stats.peak = self.stats.in_use;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_classes_cover_the_request_with_bounded_waste() {
        let mut prev = 0;
        let mut sizes: Vec<usize> = (1..5000).chain((5000..(200 << 20)).step_by(7919)).collect();
        sizes.extend([64 << 20, (64 << 20) + 1, 1 << 30, (1 << 30) + 1]);
        sizes.sort();
        for bytes in sizes {
            let c = size_class(bytes);
            assert!(c >= bytes, "{bytes} -> {c}");
            assert_eq!(c % 64, 0, "{bytes} -> {c} not a multiple of 64");
            let waste = (c - bytes) as f64 / bytes as f64;
            assert!(bytes <= MIN_BLOCK || waste <= 0.125 + 1e-9, "{bytes} -> {c}: waste {waste}");
            assert!(c >= prev, "classes must be monotone");
            prev = c;
        }
        // Few distinct classes: nearby sizes share one.
        assert_eq!(size_class(1_000_000), size_class(1_010_000));
        assert_eq!(size_class(300 << 20), 300 << 20);
        assert_eq!(size_class((300 << 20) + 1), (302 << 20));
    }

    #[test]
    fn pool_reuses_and_counts() {
        let mut p = Pool::default();
        let c = size_class(1000);
        assert_eq!(p.take(c), None);
        p.add_new(c);
        assert_eq!(p.stats.in_use, c);
        p.give_back(0x1000, c);
        assert_eq!((p.stats.in_use, p.stats.cached, p.stats.peak), (0, c, c));
        assert_eq!(p.take(c), Some(0x1000));
        assert_eq!((p.stats.in_use, p.stats.cached, p.stats.reuses, p.stats.device_allocs), (c, 0, 1, 1));
        p.give_back(0x1000, c);
        p.reset_peak();
        assert_eq!(p.stats.peak, 0);
        assert_eq!(p.drain().iter().map(|b| b.0).collect::<Vec<_>>(), vec![0x1000]);
        assert_eq!(p.stats.cached, 0);
        assert_eq!(p.take(c), None);
    }
}
