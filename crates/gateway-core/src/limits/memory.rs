//! The in-process store: counters in sharded maps, for a single gateway instance.

use std::collections::HashMap;
use std::future::{Future, ready};
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::window::{minute_bounds, period_bounds};
use super::{
    Admission, LimitCheck, LimitKind, LimitStore, Remaining, Reservation, StoreError, Usage,
};

const SHARDS: usize = 16;
/// A minute counter is kept until this long after its minute ended, for late reconciliations.
const MINUTE_RETENTION_SECS: u64 = 120;
/// A quota counter is kept until this long after its period ended.
pub(super) const QUOTA_RETENTION_SECS: u64 = 3_600;
/// A shard sweeps idle keys every this many writes, or when its map doubled since the last sweep.
const SWEEP_EVERY_WRITES: u64 = 1_024;
const SWEEP_MIN_LEN: usize = 1_024;

type Clock = dyn Fn() -> SystemTime + Send + Sync;

/// The in-process [`LimitStore`]: exact and fast, but each gateway instance counts alone (use
/// `RedisStore`, feature `redis`, for a fleet).
///
/// Counters live in 16 shards, each a `std::sync::Mutex<HashMap>` chosen by the key's hash; locks are
/// held only for a few map operations and never across an `.await`. A `reserve` locks every shard its
/// keys fall in, in ascending shard order (so two reserves can never deadlock), checks every limit
/// and only then counts, so it is all-or-nothing across its keys while reserves on other shards run
/// in parallel.
///
/// Memory stays bounded: a minute counter is dropped two minutes after its minute ended, a quota
/// counter an hour after its period ended, and a key with no live counter is removed. Each key drops
/// its stale counters when it is written; each shard sweeps its idle keys every 1,024 writes or
/// when its map has doubled since the last sweep. A reconciliation that arrives after its minute
/// counter was dropped leaves that minute alone (the quota is still corrected).
///
/// Keys in one `reserve` should be distinct (each is checked against the counts before the request).
/// Cloning is cheap and clones share the counters.
///
/// ```
/// use gateway_core::limits::{Admission, LimitCheck, LimitStore, Limits, MemoryStore};
///
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let store = MemoryStore::new();
/// let check = LimitCheck {
///     key: "consumer:billing".into(),
///     limits: Limits { tokens_per_minute: Some(1_000), ..Limits::default() },
/// };
/// let Ok(Admission::Admitted { reservation, remaining }) = store.reserve(&[check.clone()], 600).await
/// else { panic!() };
/// assert_eq!(remaining.tokens, Some(400));
/// assert!(matches!(store.reserve(&[check.clone()], 600).await, Ok(Admission::Limited { .. })));
/// store.reconcile(&reservation, 100).await.unwrap(); // the call used only 100 tokens
/// assert!(matches!(store.reserve(&[check], 600).await, Ok(Admission::Admitted { .. })));
/// # });
/// ```
#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

struct Inner {
    shards: [Mutex<Shard>; SHARDS],
    hasher: RandomState,
    clock: Box<Clock>,
}

#[derive(Default)]
struct Shard {
    keys: HashMap<String, Counters>,
    writes: u64,
    sweep_at_len: usize,
}

/// Everything counted under one key.
#[derive(Default)]
struct Counters {
    /// At most the last three minutes.
    minutes: Vec<MinuteCount>,
    /// Usually one period (two around a period change).
    quotas: Vec<QuotaCount>,
}

struct MinuteCount {
    minute: u64,
    tokens: u64,
    requests: u64,
}

struct QuotaCount {
    period: i64,
    tokens: u64,
    /// Unix seconds after which the counter is dropped.
    expires_at: u64,
}

/// The time of one operation.
#[derive(Clone, Copy)]
struct Now {
    ms: u64,
    secs: u64,
    minute: u64,
    minute_end_ms: u64,
}

/// A check's counts before the request, as read under the lock.
struct Looked {
    tokens: u64,
    requests: u64,
    quota: Option<(i64, u64, u64)>, // (period index, used, period end secs)
}

// === impl MemoryStore ===

impl MemoryStore {
    /// A store on the system clock.
    pub fn new() -> Self {
        Self::with_clock(SystemTime::now)
    }

    /// A store on the given clock (tests move time by hand).
    pub fn with_clock(clock: impl Fn() -> SystemTime + Send + Sync + 'static) -> Self {
        Self {
            inner: Arc::new(Inner {
                shards: std::array::from_fn(|_| Mutex::new(Shard::default())),
                hasher: RandomState::new(),
                clock: Box::new(clock),
            }),
        }
    }

    fn now(&self) -> Now {
        let ms = (self.inner.clock)()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let secs = ms / 1_000;
        let (minute, _, end) = minute_bounds(secs);
        Now {
            ms,
            secs,
            minute,
            minute_end_ms: end.saturating_mul(1_000),
        }
    }

    fn shard_of(&self, key: &str) -> usize {
        // The low bits of a SipHash are well mixed; SHARDS is a power of two.
        (self.inner.hasher.hash_one(key) as usize) % SHARDS
    }

    fn lock(&self, shard: usize) -> MutexGuard<'_, Shard> {
        // A panic while holding a shard lock cannot leave a counter half-written: keep counting.
        self.inner.shards[shard]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn reserve_now(&self, checks: &[LimitCheck], tokens: u64) -> Admission {
        let now = self.now();
        let shard_ids: Vec<usize> = checks.iter().map(|c| self.shard_of(&c.key)).collect();
        let mut order = shard_ids.clone();
        order.sort_unstable();
        order.dedup();
        // Ascending shard order: every reserve takes its locks in the same global order.
        let mut guards: Vec<(usize, MutexGuard<'_, Shard>)> =
            order.iter().map(|&s| (s, self.lock(s))).collect();
        let slot = |shard: usize| order.binary_search(&shard).unwrap_or(0);

        let looked: Vec<Looked> = checks
            .iter()
            .zip(&shard_ids)
            .map(|(check, &s)| look(&guards[slot(s)].1, check, now))
            .collect();

        let mut remaining = Remaining::default();
        let mut quota_refusal = None;
        let mut minute_refusal = None;
        for (check, seen) in checks.iter().zip(&looked) {
            let limits = &check.limits;
            if let Some(tpm) = limits.tokens_per_minute {
                remaining.tokens = lower(remaining.tokens, tpm.saturating_sub(seen.tokens));
                if minute_refusal.is_none() && seen.tokens.saturating_add(tokens) > tpm {
                    minute_refusal = Some((check, LimitKind::Tokens));
                }
            }
            if let Some(rpm) = limits.requests_per_minute {
                remaining.requests = lower(remaining.requests, rpm.saturating_sub(seen.requests));
                if minute_refusal.is_none() && seen.requests.saturating_add(1) > rpm {
                    minute_refusal = Some((check, LimitKind::Requests));
                }
            }
            if let (Some(quota), Some((_, used, end))) = (limits.quota, seen.quota) {
                remaining.quota_tokens =
                    lower(remaining.quota_tokens, quota.tokens.saturating_sub(used));
                if quota_refusal.is_none() && used.saturating_add(tokens) > quota.tokens {
                    quota_refusal = Some((check, end));
                }
            }
        }

        // A quota refusal wins: waiting for the next minute would not help.
        if let Some((check, end)) = quota_refusal {
            return Admission::QuotaExceeded {
                key: check.key.clone(),
                resets_in: Duration::from_millis(end.saturating_mul(1_000).saturating_sub(now.ms)),
                remaining,
            };
        }
        if let Some((check, kind)) = minute_refusal {
            return Admission::Limited {
                key: check.key.clone(),
                kind,
                retry_after: Duration::from_millis(now.minute_end_ms.saturating_sub(now.ms)),
                remaining,
            };
        }

        for ((check, seen), &s) in checks.iter().zip(&looked).zip(&shard_ids) {
            let shard = &mut *guards[slot(s)].1;
            let counters = match shard.keys.get_mut(check.key.as_str()) {
                Some(counters) => counters,
                None => shard.keys.entry(check.key.clone()).or_default(),
            };
            counters.prune(now);
            match counters.minutes.iter_mut().find(|m| m.minute == now.minute) {
                Some(m) => {
                    m.tokens = m.tokens.saturating_add(tokens);
                    m.requests = m.requests.saturating_add(1);
                }
                None => counters.minutes.push(MinuteCount {
                    minute: now.minute,
                    tokens,
                    requests: 1,
                }),
            }
            if let Some((period, _, end)) = seen.quota {
                match counters.quotas.iter_mut().find(|q| q.period == period) {
                    Some(q) => q.tokens = q.tokens.saturating_add(tokens),
                    None => counters.quotas.push(QuotaCount {
                        period,
                        tokens,
                        expires_at: end.saturating_add(QUOTA_RETENTION_SECS),
                    }),
                }
            }
        }
        for (_, shard) in &mut guards {
            shard.after_write(now);
        }
        drop(guards);

        Admission::Admitted {
            reservation: Reservation {
                keys: checks.iter().map(|c| c.key.clone()).collect(),
                minute: now.minute,
                quota_periods: looked.iter().map(|l| l.quota.map(|(p, _, _)| p)).collect(),
                tokens,
            },
            remaining: Remaining {
                tokens: remaining.tokens.map(|t| t.saturating_sub(tokens)),
                requests: remaining.requests.map(|r| r.saturating_sub(1)),
                quota_tokens: remaining.quota_tokens.map(|q| q.saturating_sub(tokens)),
            },
        }
    }

    fn reconcile_now(&self, reservation: &Reservation, consumed: u64) {
        let now = self.now();
        let adjust = |value: &mut u64| {
            *value = if consumed >= reservation.tokens {
                value.saturating_add(consumed - reservation.tokens)
            } else {
                value.saturating_sub(reservation.tokens - consumed)
            };
        };
        for (i, key) in reservation.keys.iter().enumerate() {
            let mut shard = self.lock(self.shard_of(key));
            let Some(counters) = shard.keys.get_mut(key.as_str()) else {
                continue;
            };
            counters.prune(now);
            if let Some(m) = counters
                .minutes
                .iter_mut()
                .find(|m| m.minute == reservation.minute)
            {
                adjust(&mut m.tokens);
            }
            if let Some(Some(period)) = reservation.quota_periods.get(i) {
                if let Some(q) = counters.quotas.iter_mut().find(|q| q.period == *period) {
                    adjust(&mut q.tokens);
                }
            }
        }
    }

    fn usage_now(&self, check: &LimitCheck) -> Usage {
        let now = self.now();
        let shard = self.lock(self.shard_of(&check.key));
        let seen = look(&shard, check, now);
        Usage {
            tokens_this_minute: seen.tokens,
            requests_this_minute: seen.requests,
            quota_tokens_used: seen.quota.map_or(0, |(_, used, _)| used),
        }
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore")
            .field("shards", &SHARDS)
            .finish_non_exhaustive()
    }
}

impl LimitStore for MemoryStore {
    fn reserve(
        &self,
        checks: &[LimitCheck],
        tokens: u64,
    ) -> impl Future<Output = Result<Admission, StoreError>> + Send {
        ready(Ok(self.reserve_now(checks, tokens)))
    }

    fn reconcile(
        &self,
        reservation: &Reservation,
        consumed: u64,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        self.reconcile_now(reservation, consumed);
        ready(Ok(()))
    }

    fn usage(&self, check: &LimitCheck) -> impl Future<Output = Result<Usage, StoreError>> + Send {
        ready(Ok(self.usage_now(check)))
    }
}

// === impl Shard ===

impl Shard {
    fn after_write(&mut self, now: Now) {
        self.writes = self.writes.wrapping_add(1);
        if self.writes % SWEEP_EVERY_WRITES == 0 || self.keys.len() >= self.sweep_at_len {
            self.keys.retain(|_, counters| {
                counters.prune(now);
                !counters.minutes.is_empty() || !counters.quotas.is_empty()
            });
            self.sweep_at_len = SWEEP_MIN_LEN.max(self.keys.len().saturating_mul(2));
        }
    }
}

// === impl Counters ===

impl Counters {
    fn prune(&mut self, now: Now) {
        // Minute m ends at (m + 1) * 60 and is kept MINUTE_RETENTION_SECS longer.
        let keep_minutes = (MINUTE_RETENTION_SECS / 60) + 1;
        self.minutes
            .retain(|m| m.minute.saturating_add(keep_minutes) > now.minute);
        self.quotas.retain(|q| q.expires_at > now.secs);
    }
}

/// The counts under `check` at `now` (no counting).
fn look(shard: &Shard, check: &LimitCheck, now: Now) -> Looked {
    let counters = shard.keys.get(check.key.as_str());
    let minute = counters.and_then(|c| c.minutes.iter().find(|m| m.minute == now.minute));
    let quota = check.limits.quota.map(|quota| {
        let (period, _, end) = period_bounds(quota.period, now.secs);
        let used = counters
            .and_then(|c| c.quotas.iter().find(|q| q.period == period))
            .map_or(0, |q| q.tokens);
        (period, used, end)
    });
    Looked {
        tokens: minute.map_or(0, |m| m.tokens),
        requests: minute.map_or(0, |m| m.requests),
        quota,
    }
}

/// The smaller of two optional remainders.
pub(super) fn lower(current: Option<u64>, value: u64) -> Option<u64> {
    Some(current.map_or(value, |c| c.min(value)))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;
    use crate::limits::{Limits, Quota, QuotaPeriod};

    fn keys_held(store: &MemoryStore) -> usize {
        (0..SHARDS).map(|s| store.lock(s).keys.len()).sum()
    }

    fn check(key: String, quota: bool) -> LimitCheck {
        let quota = quota.then_some(Quota {
            tokens: 1_000_000,
            period: QuotaPeriod::Daily,
        });
        LimitCheck {
            key,
            limits: Limits {
                tokens_per_minute: Some(1_000),
                quota,
                ..Limits::default()
            },
        }
    }

    #[test]
    fn idle_keys_are_swept() {
        let now = Arc::new(AtomicU64::new(1_709_210_050));
        let clock = now.clone();
        let store = MemoryStore::with_clock(move || {
            UNIX_EPOCH + Duration::from_secs(clock.load(Ordering::SeqCst))
        });
        for i in 0..10_000 {
            store.reserve_now(&[check(format!("minute-only-{i}"), false)], 1);
        }
        for i in 0..100 {
            store.reserve_now(&[check(format!("with-quota-{i}"), true)], 1);
        }
        assert_eq!(keys_held(&store), 10_100);

        // Three minutes later the minute counters are dead; enough writes make every shard sweep
        // (a shard sweeps on its writes: 1,024 keys spread writes over all of them).
        now.fetch_add(180, Ordering::SeqCst);
        for i in 0..(SWEEP_EVERY_WRITES as usize * SHARDS * 4) {
            store.reserve_now(&[check(format!("busy-{}", i % 1_024), false)], 0);
        }
        // Only the busy keys and the quota counters (alive until the day ends) are left.
        assert_eq!(keys_held(&store), 1_124);

        // After the day (and the retention hour), the quota counters go too.
        now.fetch_add(86_400 + QUOTA_RETENTION_SECS, Ordering::SeqCst);
        for i in 0..(SWEEP_EVERY_WRITES as usize * SHARDS * 4) {
            store.reserve_now(&[check(format!("busy-{}", i % 1_024), false)], 0);
        }
        assert_eq!(keys_held(&store), 1_024);
    }

    #[test]
    fn a_key_keeps_at_most_three_minutes() {
        let now = Arc::new(AtomicU64::new(1_709_210_050));
        let clock = now.clone();
        let store = MemoryStore::with_clock(move || {
            UNIX_EPOCH + Duration::from_secs(clock.load(Ordering::SeqCst))
        });
        for _ in 0..10 {
            store.reserve_now(&[check("k".into(), false)], 1);
            now.fetch_add(60, Ordering::SeqCst);
        }
        let shard = store.lock(store.shard_of("k"));
        assert!(shard.keys["k"].minutes.len() <= 3);
    }
}
