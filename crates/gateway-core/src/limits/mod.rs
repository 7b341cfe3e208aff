//! Accounting stores for consumer limits: tokens and requests per minute, token quotas per period.
//!
//! A request reserves its estimated tokens (and one request) on arrival, atomically across every
//! limit that applies to it; after the response, the reservation is reconciled with the tokens
//! really consumed. Windows are fixed: the minute (`unix_seconds / 60`) and the quota's UTC calendar
//! period. A reservation remembers its windows, so a reconciliation that lands after the minute
//! rolled over corrects the window it was counted in.
//!
//! Two stores implement [`LimitStore`]: [`MemoryStore`] (one process) and `RedisStore` (every
//! gateway instance sharing one Redis; atomic Lua scripts on Redis server time, so replicas never
//! multiply the limit; needs the `redis` feature).

use std::future::Future;
use std::time::Duration;

use serde::Deserialize;

mod memory;
#[cfg(feature = "redis")]
mod redis;
mod window;

pub use memory::MemoryStore;
#[cfg(feature = "redis")]
pub use redis::RedisStore;
pub use window::{minute_bounds, period_bounds};

/// The limits that apply under one counter key.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    /// Tokens per minute.
    pub tokens_per_minute: Option<u64>,
    /// Requests per minute.
    pub requests_per_minute: Option<u64>,
    /// Tokens per calendar period.
    pub quota: Option<Quota>,
}

/// A token quota.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quota {
    /// Tokens allowed per period.
    pub tokens: u64,
    /// The period.
    pub period: QuotaPeriod,
}

/// A token quota's period, in UTC calendar units (weeks start on Monday).
///
/// It deserializes from its lowercase name (`"daily"`), the name a policy file uses, so the policy
/// model reuses this one definition instead of keeping a copy to translate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuotaPeriod {
    /// Each clock hour.
    Hourly,
    /// Each UTC day.
    Daily,
    /// Each ISO week (Monday 00:00 UTC).
    Weekly,
    /// Each calendar month.
    Monthly,
}

/// One counter key and its limits, e.g. `consumer:billing` or `consumer:billing:gpt-4o`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LimitCheck {
    /// The counter key (the store adds its own prefix).
    pub key: String,
    /// What applies under it.
    pub limits: Limits,
}

/// What a store admitted and must later reconcile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reservation {
    /// The checks reserved against, in order.
    pub keys: Vec<String>,
    /// The minute window (`unix_seconds / 60`) the reservation was counted in.
    pub minute: u64,
    /// Per key: the quota period index it was counted in, if that key has a quota.
    pub quota_periods: Vec<Option<i64>>,
    /// Tokens reserved.
    pub tokens: u64,
}

/// What is left under the most constraining check, for response headers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Remaining {
    /// Tokens left in this minute (after this request), if a TPM limit applies.
    pub tokens: Option<u64>,
    /// Requests left in this minute (after this request), if an RPM limit applies.
    pub requests: Option<u64>,
    /// Quota tokens left in the period, if a quota applies.
    pub quota_tokens: Option<u64>,
}

/// Which limit refused a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LimitKind {
    /// Tokens per minute.
    Tokens,
    /// Requests per minute.
    Requests,
}

/// A store's answer to [`LimitStore::reserve`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Reserved; reconcile it after the call.
    Admitted {
        /// What to reconcile.
        reservation: Reservation,
        /// What is left.
        remaining: Remaining,
    },
    /// Over a per-minute limit: nothing was reserved.
    Limited {
        /// The key that refused.
        key: String,
        /// Tokens or requests.
        kind: LimitKind,
        /// When the request would fit (the current minute's end; a request larger than the whole
        /// limit never fits and gets the minute's end too).
        retry_after: Duration,
        /// What is left.
        remaining: Remaining,
    },
    /// Over a quota: nothing was reserved.
    QuotaExceeded {
        /// The key that refused.
        key: String,
        /// When the quota period resets.
        resets_in: Duration,
        /// What is left.
        remaining: Remaining,
    },
}

/// Usage under one key now, for a status page.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Tokens counted in the current minute.
    pub tokens_this_minute: u64,
    /// Requests counted in the current minute.
    pub requests_this_minute: u64,
    /// Tokens counted in the current quota period (0 without a quota).
    pub quota_tokens_used: u64,
}

/// The store could not be reached or answered nonsense.
#[derive(Debug)]
pub struct StoreError(pub String);

/// Where limits are counted. Implementations are cheap to clone or shared behind an `Arc`.
pub trait LimitStore: Send + Sync + 'static {
    /// Atomically checks every check and, only if the request fits all of them, reserves `tokens`
    /// and one request under each.
    fn reserve(
        &self,
        checks: &[LimitCheck],
        tokens: u64,
    ) -> impl Future<Output = Result<Admission, StoreError>> + Send;

    /// Corrects a reservation to the tokens really `consumed` (less or more than reserved). A call
    /// that failed before any token was generated passes what the backend still billed, often 0.
    /// The request count stays.
    fn reconcile(
        &self,
        reservation: &Reservation,
        consumed: u64,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Current usage under `check`.
    fn usage(&self, check: &LimitCheck) -> impl Future<Output = Result<Usage, StoreError>> + Send;
}

// === impl Limits ===

impl Limits {
    /// Whether any limit is set.
    pub fn is_empty(&self) -> bool {
        self.tokens_per_minute.is_none()
            && self.requests_per_minute.is_none()
            && self.quota.is_none()
    }
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "limit store: {}", self.0)
    }
}

impl std::error::Error for StoreError {}
