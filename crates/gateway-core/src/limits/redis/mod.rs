//! The Redis limit store, for a fleet of gateway instances.
//!
//! # Keys
//!
//! Every name starts with the configured prefix and a schema version, `{prefix}:v1:`:
//!
//! | key | type | holds | expires |
//! |---|---|---|---|
//! | `{prefix}:v1:minute:{key}:{minute}` | hash | fields `tokens`, `requests` of minute `unix_seconds / 60` | 2 minutes after the minute ends |
//! | `{prefix}:v1:quota:{key}:{period}` | string | tokens counted in quota period `period` ([`period_bounds`] index) | 1 hour after the period ends |
//!
//! `{key}` is a [`LimitCheck::key`] verbatim (it may contain `:`; the window is always the last
//! segment). A new layout gets a new version, so instances of two versions never misread each other.
//! Backend cooldowns shared through the same Redis have keys of their own (see
//! [`RedisCooldowns`](crate::pool::RedisCooldowns)).
//!
//! # Atomicity and time
//!
//! A reservation is one Lua script (in `scripts.rs`): it reads the Redis server's clock (`TIME`),
//! derives the minute and each quota's period (the same arithmetic as [`period_bounds`], calendar
//! months included), checks every key and counts under all of them only if the request fits all of
//! them. Reconciling is one script too. Replicas therefore share exact limits, whatever their own
//! clocks say.
//!
//! The scripts build their key names inside Lua, which Redis Cluster does not allow: use a
//! standalone Redis 6.0 or later (with replicas or Sentinel if you like) or a single-shard managed
//! Redis.
//!
//! # Failures
//!
//! Every call is bounded by a timeout ([`RedisStore::DEFAULT_TIMEOUT`], 500 ms): a dead or hung
//! Redis turns into a [`StoreError`] quickly and never hangs a request; the policy decides whether
//! that fails open or closed. A reserve that times out may still have been counted by Redis; that
//! reservation is never reconciled and simply expires with its window. The connection manager
//! reconnects by itself (in the background, with backoff) once Redis is back.
//!
//! [`period_bounds`]: super::period_bounds

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionManager;

use self::scripts::{RECONCILE, RESERVE, USAGE, period_code};
use super::{
    Admission, LimitCheck, LimitKind, LimitStore, Remaining, Reservation, StoreError, Usage,
};
use crate::redis_conn::{self, bounded, manager, ping};

mod scripts;

/// The Redis [`LimitStore`]: every gateway instance using the same Redis and prefix shares one set
/// of limits, counted atomically on the Redis server's clock (see the module docs for key names).
///
/// Start-up: [`RedisStore::connect`] checks that Redis answers (for a fail-closed policy, or to
/// report a wrong URL at once); [`RedisStore::connect_lazy`] does not wait for Redis at all, so a
/// fail-open gateway starts while Redis is down and begins counting when it comes up. Either way
/// the [`ConnectionManager`] then reconnects by itself. Cloning is cheap (one shared connection).
#[derive(Clone)]
pub struct RedisStore {
    conn: ConnectionManager,
    prefix: Arc<str>,
    timeout: Duration,
}

// === impl RedisStore ===

impl RedisStore {
    /// The default bound on every Redis call.
    pub const DEFAULT_TIMEOUT: Duration = redis_conn::DEFAULT_TIMEOUT;

    /// A store on `url` (`redis://[:password@]host:port[/db]`) under key prefix `prefix`, after
    /// checking that Redis answers a `PING` within the timeout. Must be called inside a Tokio runtime.
    pub async fn connect(url: &str, prefix: &str) -> Result<Self, StoreError> {
        let store = Self::connect_lazy(url, prefix)?;
        store.ping().await?;
        Ok(store)
    }

    /// A store on `url` under `prefix` that connects on first use (only the URL is checked now).
    /// Must be called inside a Tokio runtime.
    pub fn connect_lazy(url: &str, prefix: &str) -> Result<Self, StoreError> {
        let (_, conn, _) = manager(url)?;
        Ok(Self {
            conn,
            prefix: prefix.into(),
            timeout: Self::DEFAULT_TIMEOUT,
        })
    }

    /// Bounds every Redis call by `timeout` instead of [`Self::DEFAULT_TIMEOUT`].
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Checks that Redis answers (for health checks).
    pub async fn ping(&self) -> Result<(), StoreError> {
        ping(&self.conn, self.timeout).await
    }

    async fn reserve_in_redis(
        &self,
        checks: &[LimitCheck],
        tokens: u64,
    ) -> Result<Admission, StoreError> {
        let mut invocation = RESERVE.prepare_invoke();
        invocation.arg(&*self.prefix).arg(tokens).arg(checks.len());
        for check in checks {
            let limits = &check.limits;
            invocation
                .arg(&check.key)
                .arg(limit_arg(limits.tokens_per_minute))
                .arg(limit_arg(limits.requests_per_minute))
                .arg(limit_arg(limits.quota.map(|q| q.tokens)))
                .arg(limits.quota.map_or(0, |q| period_code(q.period)));
        }
        let mut conn = self.conn.clone();
        let reply: Vec<i64> =
            bounded("reserve", self.timeout, invocation.invoke_async(&mut conn)).await?;
        parse_admission(&reply, checks, tokens)
    }

    async fn reconcile_in_redis(
        &self,
        reservation: &Reservation,
        consumed: u64,
    ) -> Result<(), StoreError> {
        let delta = i128::from(consumed) - i128::from(reservation.tokens);
        if delta == 0 || reservation.keys.is_empty() {
            return Ok(());
        }
        let delta = i64::try_from(delta).unwrap_or(if delta < 0 { i64::MIN } else { i64::MAX });
        let mut invocation = RECONCILE.prepare_invoke();
        invocation
            .arg(&*self.prefix)
            .arg(delta)
            .arg(reservation.minute)
            .arg(reservation.keys.len());
        for (i, key) in reservation.keys.iter().enumerate() {
            let period = reservation.quota_periods.get(i).copied().flatten();
            invocation
                .arg(key)
                .arg(period.map(|p| p.to_string()).unwrap_or_default());
        }
        let mut conn = self.conn.clone();
        bounded(
            "reconcile",
            self.timeout,
            invocation.invoke_async::<i64>(&mut conn),
        )
        .await?;
        Ok(())
    }

    async fn usage_in_redis(&self, check: &LimitCheck) -> Result<Usage, StoreError> {
        let mut invocation = USAGE.prepare_invoke();
        invocation
            .arg(&*self.prefix)
            .arg(&check.key)
            .arg(check.limits.quota.map_or(0, |q| period_code(q.period)));
        let mut conn = self.conn.clone();
        let reply: Vec<i64> =
            bounded("usage", self.timeout, invocation.invoke_async(&mut conn)).await?;
        match reply[..] {
            [tokens, requests, quota] => Ok(Usage {
                tokens_this_minute: u64::try_from(tokens).unwrap_or(0),
                requests_this_minute: u64::try_from(requests).unwrap_or(0),
                quota_tokens_used: u64::try_from(quota).unwrap_or(0),
            }),
            _ => Err(StoreError(format!(
                "redis usage: unexpected reply {reply:?}"
            ))),
        }
    }
}

impl LimitStore for RedisStore {
    fn reserve(
        &self,
        checks: &[LimitCheck],
        tokens: u64,
    ) -> impl Future<Output = Result<Admission, StoreError>> + Send {
        self.reserve_in_redis(checks, tokens)
    }

    fn reconcile(
        &self,
        reservation: &Reservation,
        consumed: u64,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        self.reconcile_in_redis(reservation, consumed)
    }

    fn usage(&self, check: &LimitCheck) -> impl Future<Output = Result<Usage, StoreError>> + Send {
        self.usage_in_redis(check)
    }
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

// === helpers ===

fn limit_arg(limit: Option<u64>) -> i64 {
    limit.map_or(-1, |l| i64::try_from(l).unwrap_or(i64::MAX))
}

/// The reserve script's reply as an [`Admission`] (see `RESERVE_LUA` for the layout).
fn parse_admission(
    reply: &[i64],
    checks: &[LimitCheck],
    tokens: u64,
) -> Result<Admission, StoreError> {
    let bad = || StoreError(format!("redis reserve: unexpected reply {reply:?}"));
    let at = |i: usize| reply.get(i).copied().ok_or_else(bad);
    let remaining = |i: usize| -> Result<Remaining, StoreError> {
        Ok(Remaining {
            tokens: u64::try_from(at(i)?).ok(),
            requests: u64::try_from(at(i + 1)?).ok(),
            quota_tokens: u64::try_from(at(i + 2)?).ok(),
        })
    };
    let key = |i: usize| -> Result<String, StoreError> {
        let index = usize::try_from(at(i)?).map_err(|_| bad())?;
        let check = index
            .checked_sub(1)
            .and_then(|i| checks.get(i))
            .ok_or_else(bad)?;
        Ok(check.key.clone())
    };
    let millis = |i: usize| -> Result<Duration, StoreError> {
        Ok(Duration::from_millis(u64::try_from(at(i)?).unwrap_or(0)))
    };
    match at(0)? {
        0 if reply.len() == 5 + checks.len() => Ok(Admission::Admitted {
            reservation: Reservation {
                keys: checks.iter().map(|c| c.key.clone()).collect(),
                minute: u64::try_from(at(1)?).map_err(|_| bad())?,
                quota_periods: reply[5..].iter().map(|&p| (p >= 0).then_some(p)).collect(),
                tokens,
            },
            remaining: remaining(2)?,
        }),
        1 => Ok(Admission::Limited {
            key: key(1)?,
            kind: match at(2)? {
                1 => LimitKind::Tokens,
                2 => LimitKind::Requests,
                _ => return Err(bad()),
            },
            retry_after: millis(3)?,
            remaining: remaining(4)?,
        }),
        2 => Ok(Admission::QuotaExceeded {
            key: key(1)?,
            resets_in: millis(2)?,
            remaining: remaining(3)?,
        }),
        _ => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_replies_are_errors_not_panics() {
        let check = LimitCheck {
            key: "k".into(),
            limits: super::super::Limits::default(),
        };
        let checks = [check];
        for reply in [
            &[][..],
            &[0, 5, -1, -1],
            &[1, 2, 1, 10, -1, -1, -1],
            &[1, 1, 3, 10, -1, -1, -1],
            &[9],
        ] {
            assert!(parse_admission(reply, &checks, 1).is_err(), "{reply:?}");
        }
        assert!(matches!(
            parse_admission(&[0, 7, 10, -1, -1, -1], &checks, 1),
            Ok(Admission::Admitted {
                reservation: Reservation { minute: 7, .. },
                ..
            })
        ));
    }
}
