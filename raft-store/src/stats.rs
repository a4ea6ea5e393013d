//! Lock-free histograms for the store's hot paths (fsync, group commit, apply),
//! read by the broker's metrics endpoint at scrape time. Recording is a few
//! relaxed atomic adds: no lock and no allocation, because the flusher thread
//! and the state machine task record on every round.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Bucket bounds for latencies, in seconds: 50 µs to 10 s, covering a page-cache
/// fsync, a disk fsync under load and a stalled round.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// Bucket bounds for batch sizes (records, entries): powers of two up to 4096.
pub const SIZE_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0,
];

/// A fixed-bucket histogram of non-negative values. Buckets hold per-bucket (not
/// cumulative) counts; the last, implicit one is +Inf.
#[derive(Debug)]
pub struct AtomicHistogram {
    bounds: &'static [f64],
    /// `bounds.len() + 1` counters, the last for values above every bound.
    counts: Box<[AtomicU64]>,
    /// The sum of observations, as `f64` bits (updated with a CAS loop).
    sum_bits: AtomicU64,
}

/// What a scrape reads of an [`AtomicHistogram`].
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    pub sum: f64,
    pub count: u64,
    /// (upper bound, count in this bucket alone), the last bound `f64::MAX` (+Inf),
    /// as prometheus-client's encoder takes them.
    pub buckets: Vec<(f64, u64)>,
}

impl AtomicHistogram {
    pub fn new(bounds: &'static [f64]) -> AtomicHistogram {
        AtomicHistogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_bits: AtomicU64::new(0f64.to_bits()),
        }
    }

    /// A latency histogram ([`LATENCY_BUCKETS`], seconds).
    pub fn latency() -> AtomicHistogram {
        AtomicHistogram::new(LATENCY_BUCKETS)
    }

    /// A batch-size histogram ([`SIZE_BUCKETS`]).
    pub fn sizes() -> AtomicHistogram {
        AtomicHistogram::new(SIZE_BUCKETS)
    }

    pub fn observe(&self, value: f64) {
        let at = self.bounds.partition_point(|b| *b < value);
        self.counts[at].fetch_add(1, Ordering::Relaxed);
        // fetch_update cannot fail with a closure that always returns Some.
        let _ = self
            .sum_bits
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                Some((f64::from_bits(bits) + value).to_bits())
            });
    }

    pub fn observe_duration(&self, d: Duration) {
        self.observe(d.as_secs_f64());
    }

    /// The counts as of now. Buckets and sum are read one after another, so a
    /// scrape racing an observation may see it in one and not the other; the
    /// count is the buckets' sum, so `_count` and `+Inf` always agree.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let counts: Vec<u64> = self.counts.iter().map(|c| c.load(Ordering::Relaxed)).collect();
        let buckets = self
            .bounds
            .iter()
            .copied()
            .chain(std::iter::once(f64::MAX))
            .zip(counts.iter().copied())
            .collect();
        HistogramSnapshot {
            sum: f64::from_bits(self.sum_bits.load(Ordering::Relaxed)),
            count: counts.iter().sum(),
            buckets,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_land_in_the_first_bucket_at_or_above_them() {
        let h = AtomicHistogram::new(&[1.0, 10.0]);
        for v in [0.5, 1.0, 3.0, 10.0, 11.0] {
            h.observe(v);
        }
        let s = h.snapshot();
        assert_eq!(s.count, 5);
        assert_eq!(s.sum, 25.5);
        assert_eq!(s.buckets, vec![(1.0, 2), (10.0, 2), (f64::MAX, 1)]);
    }
}
