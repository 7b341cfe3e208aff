//! Recent upstream latency per backend, for the status page.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use gateway_core::pool::BackendId;

/// Weight of a new sample in the moving average, as 1/N: a backend's figure follows its last ~10
/// answers, so a region that slows down shows it within seconds of traffic.
const EWMA_DIVISOR: u64 = 5;

/// Time to first byte of each backend's answers: the last one and an exponentially weighted moving
/// average. Lock-free, indexed by [`BackendId`], shared by the observe layer and the status page.
#[derive(Debug)]
pub struct Latency {
    backends: Vec<Entry>,
}

#[derive(Debug, Default)]
struct Entry {
    /// Microseconds; 0 until the first sample.
    last_us: AtomicU64,
    /// Microseconds; 0 until the first sample.
    ewma_us: AtomicU64,
}

/// One backend's recent time to first byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Recent {
    /// The last answer's.
    pub last: Duration,
    /// The moving average.
    pub ewma: Duration,
}

// === impl Latency ===

impl Latency {
    /// A table for `backends` backends, all without samples.
    pub fn new(backends: usize) -> Self {
        Self {
            backends: (0..backends).map(|_| Entry::default()).collect(),
        }
    }

    /// Adds a sample for backend `id`; an `id` from another pool is ignored.
    pub fn observe(&self, id: BackendId, ttfb: Duration) {
        let Some(entry) = self.backends.get(id.0) else {
            return;
        };
        // At least 1 µs, so 0 keeps meaning "no sample yet".
        let sample = u64::try_from(ttfb.as_micros()).unwrap_or(u64::MAX).max(1);
        entry.last_us.store(sample, Ordering::Relaxed);
        let _ = entry
            .ewma_us
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |old| {
                Some(if old == 0 {
                    sample
                } else {
                    let next =
                        old.saturating_mul(EWMA_DIVISOR - 1).saturating_add(sample) / EWMA_DIVISOR;
                    next.max(1)
                })
            });
    }

    /// Backend `id`'s recent latency, if it has answered since start-up.
    pub fn get(&self, id: BackendId) -> Option<Recent> {
        let entry = self.backends.get(id.0)?;
        let last = entry.last_us.load(Ordering::Relaxed);
        let ewma = entry.ewma_us.load(Ordering::Relaxed);
        (last > 0 && ewma > 0).then(|| Recent {
            last: Duration::from_micros(last),
            ewma: Duration::from_micros(ewma),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_sample_sets_both_then_the_average_moves_a_fifth_of_the_way() {
        let latency = Latency::new(2);
        let a = BackendId(0);
        assert_eq!(latency.get(a), None);
        latency.observe(a, Duration::from_millis(100));
        assert_eq!(
            latency.get(a),
            Some(Recent {
                last: Duration::from_millis(100),
                ewma: Duration::from_millis(100)
            })
        );
        latency.observe(a, Duration::from_millis(200));
        let recent = latency.get(a).unwrap();
        assert_eq!(recent.last, Duration::from_millis(200));
        assert_eq!(recent.ewma, Duration::from_millis(120));
        assert_eq!(latency.get(BackendId(1)), None);
        latency.observe(BackendId(9), Duration::from_millis(1));
        assert_eq!(latency.get(BackendId(9)), None);
    }
}
