//! Outlier detection, after Envoy's: when a backend's circuit opens (it is *ejected*), for how long,
//! and how many of a priority group may be out at once.
//!
//! A backend is ejected when, within the last `interval`:
//! - at least `request_volume` attempts were answered or failed, and `failure_percentage` percent or
//!   more of them failed (a 5xx, no headers in time, no connection); or
//! - `consecutive_failures` attempts in a row failed to connect or timed out (no answer at all).
//!
//! So a handful of 503s among thousands of answers never ejects a backend, while a dead one is out
//! after a few attempts. What is not the backend's fault never counts: a 429, a stream that broke
//! after its first byte (the client already has the answer's start; the breaker would only punish
//! load), and the gateway's own resource errors (out of file descriptors).
//!
//! Each ejection lasts `base_ejection` times the number of recent ejections, capped at
//! `max_ejection`: a backend that keeps failing stays out longer. Every `interval` without an
//! ejection forgets one. Ejection never takes more than `max_ejection_percent` of a priority group
//! out (at least one backend may always go), and when every backend serving a deployment is
//! ejected, selection ignores ejections (*panic mode*) rather than refuse the client.
//!
//! ```
//! use std::collections::BTreeMap;
//! use std::time::{Duration, Instant};
//! use gateway_core::pool::{Backend, BackendPool, BackendState, Outcome, PoolSettings};
//!
//! let backend = Backend {
//!     name: "sweden".to_owned(),
//!     region: "Sweden Central".to_owned(),
//!     endpoint: "https://sweden.openai.azure.com".to_owned(),
//!     priority: 1,
//!     weight: 1,
//!     deployments: BTreeMap::from([("gpt-4o".to_owned(), "gpt-4o".to_owned())]),
//!     credential: None,
//! };
//! let pool = BackendPool::new(vec![backend], PoolSettings::default());
//! let id = pool.id_of("sweden").unwrap();
//! let now = Instant::now();
//!
//! // One 503 in twenty is no reason to eject a backend...
//! for i in 0..1_000 {
//!     let outcome = if i % 20 == 0 { Outcome::ServerError { hint: None } } else { Outcome::Success };
//!     pool.record(id, "gpt-4o", outcome, now);
//! }
//! assert_eq!(pool.snapshot(now)[0].state, BackendState::Available);
//!
//! // ...five refused connections in a row are.
//! for _ in 0..5 {
//!     pool.record(id, "gpt-4o", Outcome::ConnectError, now);
//! }
//! assert_eq!(pool.snapshot(now)[0].state, BackendState::CircuitOpen);
//! assert_eq!(pool.snapshot(now)[0].circuit_open_remaining, Some(Duration::from_secs(30)));
//! ```

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::health::CircuitChange;
use super::{BackendId, BackendPool, lock};

/// Number of buckets the failure-ratio window is cut into: the window slides by a tenth of it.
const BUCKETS: usize = 10;

/// When a backend's circuit opens (see the [module docs](self)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CircuitSettings {
    /// Share of failed attempts, in percent, within `interval` that ejects a backend once
    /// `request_volume` is reached; 0 turns this rule off.
    pub failure_percentage: u32,
    /// Least attempts within `interval` before the failure share is judged.
    pub request_volume: u32,
    /// Connection failures and timeouts in a row that eject a backend; 0 turns this rule off.
    pub consecutive_failures: u32,
    /// The window in which the failure share is measured.
    pub interval: Duration,
    /// How long the first ejection lasts; the n-th recent one lasts n times as long.
    pub base_ejection: Duration,
    /// Cap on an ejection's length.
    pub max_ejection: Duration,
    /// Largest share of a priority group, in percent, ejected at once; at least one backend of a
    /// group may always be ejected.
    pub max_ejection_percent: u32,
}

/// Attempts and failures in the last `interval`, in [`BUCKETS`] buckets: a bounded, allocation-free
/// count whatever the traffic.
#[derive(Debug, Clone)]
pub(super) struct Window {
    /// Where bucket numbers count from.
    epoch: Instant,
    /// `(bucket number, attempts, failures)`; bucket `n` lives at `n % BUCKETS`.
    buckets: [(u64, u32, u32); BUCKETS],
}

// === impl CircuitSettings ===

impl Default for CircuitSettings {
    /// The policy file's defaults: 50% failures over at least 20 attempts within 10 s, or 5
    /// connection failures in a row, eject a backend for 30 s (then 60 s, 90 s... up to 300 s);
    /// at most half of a priority group is ejected at once.
    fn default() -> Self {
        Self {
            failure_percentage: 50,
            request_volume: 20,
            consecutive_failures: 5,
            interval: Duration::from_secs(10),
            base_ejection: Duration::from_secs(30),
            max_ejection: Duration::from_secs(300),
            max_ejection_percent: 50,
        }
    }
}

impl CircuitSettings {
    /// Whether neither rule can ever eject a backend.
    pub fn is_disabled(&self) -> bool {
        self.failure_percentage == 0 && self.consecutive_failures == 0
    }

    /// Whether `failures` out of `attempts` in the window eject a backend.
    pub(super) fn ratio_trips(&self, attempts: u32, failures: u32) -> bool {
        self.failure_percentage > 0
            && attempts >= self.request_volume.max(1)
            && u64::from(failures) * 100 >= u64::from(self.failure_percentage) * u64::from(attempts)
    }

    /// How long the `count`-th recent ejection lasts.
    pub(super) fn ejection_time(&self, count: u32) -> Duration {
        self.base_ejection
            .saturating_mul(count.max(1))
            .min(self.max_ejection.max(self.base_ejection))
    }

    /// How many of a group of `size` backends may be ejected at once.
    pub(super) fn max_ejected(&self, size: usize) -> usize {
        (size * self.max_ejection_percent.min(100) as usize / 100).max(1)
    }
}

// === impl Window ===

impl Window {
    pub(super) fn new(now: Instant) -> Self {
        Self {
            epoch: now,
            buckets: [(0, 0, 0); BUCKETS],
        }
    }

    /// Counts one attempt, failed or not.
    pub(super) fn add(&mut self, failed: bool, now: Instant, interval: Duration) {
        let n = self.bucket(now, interval);
        let slot = &mut self.buckets[(n % BUCKETS as u64) as usize];
        if slot.0 != n {
            *slot = (n, 0, 0);
        }
        slot.1 = slot.1.saturating_add(1);
        if failed {
            slot.2 = slot.2.saturating_add(1);
        }
    }

    /// `(attempts, failures)` within the last `interval`.
    pub(super) fn counts(&self, now: Instant, interval: Duration) -> (u32, u32) {
        let n = self.bucket(now, interval);
        self.buckets
            .iter()
            .filter(|(at, _, _)| *at <= n && n - *at < BUCKETS as u64)
            .fold((0u32, 0u32), |(a, f), (_, attempts, failures)| {
                (a.saturating_add(*attempts), f.saturating_add(*failures))
            })
    }

    pub(super) fn clear(&mut self) {
        self.buckets = [(0, 0, 0); BUCKETS];
    }

    fn bucket(&self, now: Instant, interval: Duration) -> u64 {
        let width = (interval / BUCKETS as u32).max(Duration::from_millis(1));
        let elapsed = now.saturating_duration_since(self.epoch);
        u64::try_from(elapsed.as_nanos() / width.as_nanos()).unwrap_or(u64::MAX)
    }
}

// === impl BackendPool ===

impl BackendPool {
    /// Ejects backend `id` if its priority group has room for one more ejection; called when its
    /// outcomes met an ejection rule. The gate serialises these decisions so that two backends
    /// failing at once cannot both take the group's last ejection slot.
    pub(super) fn eject_if_allowed(&self, id: BackendId, now: Instant) -> Option<CircuitChange> {
        let _gate = lock(&self.ejection_gate);
        let priority = self.backends[id.0].priority;
        let mut size = 0;
        let mut ejected = 0;
        for (i, backend) in self.backends.iter().enumerate() {
            if backend.priority != priority {
                continue;
            }
            size += 1;
            if i != id.0 && lock(&self.health[i]).is_ejected(now) {
                ejected += 1;
            }
        }
        if ejected >= self.settings.circuit.max_ejected(size) {
            return Some(CircuitChange::Refused);
        }
        lock(&self.health[id.0]).eject(now, &self.settings)
    }

    /// Notes a selection made in panic mode: counted, and logged when a run of them begins.
    pub(super) fn note_panic(&self, deployment: &str, panic: bool) {
        if !panic {
            if self.in_panic.load(Ordering::Relaxed) {
                self.in_panic.store(false, Ordering::Relaxed);
                tracing::info!(deployment, "a backend is selectable again; panic mode over");
            }
            return;
        }
        self.panic_selections.fetch_add(1, Ordering::Relaxed);
        if !self.in_panic.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                deployment,
                "every backend for the deployment is ejected; panic mode: trying them anyway"
            );
        }
    }

    /// Selections made in panic mode, when every backend serving a deployment was ejected and the
    /// gateway tried them anyway, since the pool was created.
    pub fn panic_selections(&self) -> u64 {
        self.panic_selections.load(Ordering::Relaxed)
    }
}
