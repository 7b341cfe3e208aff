//! The Redis store and shared backend cooldowns, for a fleet of gateway instances.
//!
//! # Keys
//!
//! Every name starts with the configured prefix and a schema version, `{prefix}:v1:`:
//!
//! | key | type | holds | expires |
//! |---|---|---|---|
//! | `{prefix}:v1:minute:{key}:{minute}` | hash | fields `tokens`, `requests` of minute `unix_seconds / 60` | 2 minutes after the minute ends |
//! | `{prefix}:v1:quota:{key}:{period}` | string | tokens counted in quota period `period` ([`period_bounds`] index) | 1 hour after the period ends |
//! | `{prefix}:v1:cooldown:{backend}` | string | the Unix time in ms until which `backend` is throttled | then |
//! | `{prefix}:v1:cooldowns` | pub/sub channel | messages `{backend} {until_unix_ms}` | |
//!
//! `{key}` is a [`LimitCheck::key`] verbatim (it may contain `:`; the window is always the last
//! segment). A new layout gets a new version, so instances of two versions never misread each other.
//!
//! # Atomicity and time
//!
//! A reservation is one Lua script: it reads the Redis server's clock (`TIME`), derives the minute
//! and each quota's period (the same arithmetic as [`period_bounds`], calendar months included),
//! checks every key and counts under all of them only if the request fits all of them. Reconciling is
//! one script too. Replicas therefore share exact limits, whatever their own clocks say.
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
use std::sync::{Arc, LazyLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, RedisResult, Script};
use tokio::runtime::Handle;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep, timeout};

use super::QuotaPeriod;
use super::memory::QUOTA_RETENTION_SECS;
use super::{
    Admission, LimitCheck, LimitKind, LimitStore, Remaining, Reservation, StoreError, Usage,
};

/// How long a connection attempt may take (the per-call timeout bounds what callers wait).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How often the cooldown listener checks that its pub/sub connection is alive.
const LISTENER_PING_EVERY: Duration = Duration::from_secs(5);
const LISTENER_MIN_BACKOFF: Duration = Duration::from_millis(100);
const LISTENER_MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Window arithmetic shared by the scripts; must match `window.rs` (tests check it does).
/// Lua 5.1 numbers are doubles: exact for every integer used here (< 2^53).
macro_rules! window_lua {
    () => {
        r#"
local function days_from_civil(y, m, d)
  if m <= 2 then y = y - 1 end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local mp = (m + 9) % 12
  local doy = math.floor((153 * mp + 2) / 5) + d - 1
  local doe = yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end

local function civil_from_days(z)
  z = z + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524)
    - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local m = mp - 9
  if mp < 10 then m = mp + 3 end
  local y = yoe + era * 400
  if m <= 2 then y = y + 1 end
  return y, m
end

-- period: 1 hourly, 2 daily, 3 weekly (ISO, Monday), 4 monthly. Returns index, start, end (seconds).
local function period_bounds(p, s)
  if p == 1 then
    local i = math.floor(s / 3600)
    return i, i * 3600, i * 3600 + 3600
  elseif p == 2 then
    local i = math.floor(s / 86400)
    return i, i * 86400, i * 86400 + 86400
  elseif p == 3 then
    local w = math.floor((math.floor(s / 86400) + 3) / 7)
    local start = (w * 7 - 3) * 86400
    if start < 0 then start = 0 end
    return w, start, (w * 7 + 4) * 86400
  end
  local y, m = civil_from_days(math.floor(s / 86400))
  local ny, nm = y, m + 1
  if nm == 13 then ny, nm = y + 1, 1 end
  return (y - 1970) * 12 + m - 1, days_from_civil(y, m, 1) * 86400, days_from_civil(ny, nm, 1) * 86400
end

-- Exact integer to string (tostring would print 1e+15).
local function int(n)
  return string.format('%d', n)
end

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"#
    };
}

/// ARGV: prefix, tokens, n, then n times: key, tpm, rpm, quota, period (-1 / 0 when unset).
/// Replies `{0, minute, rem_t, rem_r, rem_q, period_1..period_n}` (admitted; -1 = none),
/// `{1, key_index, kind (1 tokens, 2 requests), retry_after_ms, rem_t, rem_r, rem_q}` or
/// `{2, key_index, resets_in_ms, rem_t, rem_r, rem_q}`.
const RESERVE_LUA: &str = concat!(
    window_lua!(),
    r#"
local prefix, tokens_arg = ARGV[1], ARGV[2]
local tokens, n = tonumber(ARGV[2]), tonumber(ARGV[3])
local ms = now_ms()
local s = math.floor(ms / 1000)
local minute = math.floor(s / 60)
local rem_t, rem_r, rem_q = -1, -1, -1
local function lower(cur, v)
  if v < 0 then v = 0 end
  if cur < 0 or v < cur then return v end
  return cur
end
local checks = {}
local quota_fail, minute_fail = nil, nil
for i = 1, n do
  local b = 3 + (i - 1) * 5
  local c = { key = ARGV[b + 1], tpm = tonumber(ARGV[b + 2]), rpm = tonumber(ARGV[b + 3]),
              quota = tonumber(ARGV[b + 4]), period = tonumber(ARGV[b + 5]), pidx = -1 }
  c.mkey = prefix .. ':v1:minute:' .. c.key .. ':' .. int(minute)
  local counts = redis.call('HMGET', c.mkey, 'tokens', 'requests')
  local used_t, used_r = tonumber(counts[1]) or 0, tonumber(counts[2]) or 0
  if c.tpm >= 0 then
    rem_t = lower(rem_t, c.tpm - used_t)
    if not minute_fail and used_t + tokens > c.tpm then minute_fail = { i, 1 } end
  end
  if c.rpm >= 0 then
    rem_r = lower(rem_r, c.rpm - used_r)
    if not minute_fail and used_r + 1 > c.rpm then minute_fail = { i, 2 } end
  end
  if c.period > 0 and c.quota >= 0 then
    local pidx, _, pend = period_bounds(c.period, s)
    c.pidx, c.pend = pidx, pend
    c.qkey = prefix .. ':v1:quota:' .. c.key .. ':' .. int(pidx)
    local used_q = tonumber(redis.call('GET', c.qkey)) or 0
    rem_q = lower(rem_q, c.quota - used_q)
    if not quota_fail and used_q + tokens > c.quota then quota_fail = { i, pend * 1000 - ms } end
  end
  checks[i] = c
end
if quota_fail then
  return { 2, quota_fail[1], quota_fail[2], rem_t, rem_r, rem_q }
end
if minute_fail then
  return { 1, minute_fail[1], minute_fail[2], (minute + 1) * 60000 - ms, rem_t, rem_r, rem_q }
end
local reply = { 0, minute, -1, -1, -1 }
if rem_t >= 0 then reply[3] = rem_t - tokens end
if rem_r >= 0 then reply[4] = rem_r - 1 end
if rem_q >= 0 then reply[5] = rem_q - tokens end
for i = 1, n do
  local c = checks[i]
  redis.call('HINCRBY', c.mkey, 'tokens', tokens_arg)
  redis.call('HINCRBY', c.mkey, 'requests', 1)
  redis.call('EXPIREAT', c.mkey, int((minute + 3) * 60))
  if c.qkey then
    redis.call('INCRBY', c.qkey, tokens_arg)
    redis.call('EXPIREAT', c.qkey, int(c.pend + 3600))
  end
  reply[5 + i] = c.pidx
end
return reply
"#
);

// The reserve script keeps quota counters for QUOTA_RETENTION_SECS after their period.
const _: () = assert!(QUOTA_RETENTION_SECS == 3_600);

/// ARGV: prefix, delta (signed), minute, n, then n times: key, period index ("" when none).
/// Adjusts only counters that still exist, never below 0, keeping their expiry.
const RECONCILE_LUA: &str = r#"
local prefix, delta, minute, n = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
for i = 1, n do
  local key, period = ARGV[4 + 2 * i - 1], ARGV[4 + 2 * i]
  local mkey = prefix .. ':v1:minute:' .. key .. ':' .. minute
  if redis.call('EXISTS', mkey) == 1 then
    if redis.call('HINCRBY', mkey, 'tokens', delta) < 0 then
      redis.call('HSET', mkey, 'tokens', 0)
    end
  end
  if period ~= '' then
    local qkey = prefix .. ':v1:quota:' .. key .. ':' .. period
    if redis.call('EXISTS', qkey) == 1 then
      if redis.call('INCRBY', qkey, delta) < 0 then
        redis.call('SET', qkey, 0, 'KEEPTTL')
      end
    end
  end
end
return 1
"#;

/// ARGV: prefix, key, period (0 when none). Replies `{tokens, requests, quota_used}`.
const USAGE_LUA: &str = concat!(
    window_lua!(),
    r#"
local prefix, key, period = ARGV[1], ARGV[2], tonumber(ARGV[3])
local s = math.floor(now_ms() / 1000)
local counts = redis.call('HMGET', prefix .. ':v1:minute:' .. key .. ':' .. int(math.floor(s / 60)),
  'tokens', 'requests')
local used_q = 0
if period > 0 then
  local pidx = period_bounds(period, s)
  used_q = tonumber(redis.call('GET', prefix .. ':v1:quota:' .. key .. ':' .. int(pidx))) or 0
end
return { tonumber(counts[1]) or 0, tonumber(counts[2]) or 0, used_q }
"#
);

static RESERVE: LazyLock<Script> = LazyLock::new(|| Script::new(RESERVE_LUA));
static RECONCILE: LazyLock<Script> = LazyLock::new(|| Script::new(RECONCILE_LUA));
static USAGE: LazyLock<Script> = LazyLock::new(|| Script::new(USAGE_LUA));

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

/// Backend throttle state shared through Redis: the first instance that sees a 429 publishes the
/// cooldown, and every instance's listener learns of it at once.
///
/// Each cooldown is a key `{prefix}:v1:cooldown:{backend}` holding the end time in Unix ms (it
/// expires then), announced on the channel `{prefix}:v1:cooldowns` as `{backend} {until_unix_ms}`.
/// Times are wall-clock milliseconds, so instances' clocks should be synchronised (NTP).
#[derive(Clone)]
pub struct RedisCooldowns {
    client: Client,
    conn: ConnectionManager,
    runtime: Handle,
    prefix: Arc<str>,
    timeout: Duration,
}

// === impl RedisStore ===

impl RedisStore {
    /// The default bound on every Redis call.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(500);

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

// === impl RedisCooldowns ===

impl RedisCooldowns {
    /// Cooldowns on `url` under `prefix`, after checking that Redis answers a `PING`. Must be called
    /// inside a Tokio runtime.
    pub async fn connect(url: &str, prefix: &str) -> Result<Self, StoreError> {
        let cooldowns = Self::connect_lazy(url, prefix)?;
        ping(&cooldowns.conn, cooldowns.timeout).await?;
        Ok(cooldowns)
    }

    /// Cooldowns on `url` under `prefix` that connect on first use. Must be called inside a Tokio
    /// runtime (the listener is spawned on it).
    pub fn connect_lazy(url: &str, prefix: &str) -> Result<Self, StoreError> {
        let (client, conn, runtime) = manager(url)?;
        Ok(Self {
            client,
            conn,
            runtime,
            prefix: prefix.into(),
            timeout: RedisStore::DEFAULT_TIMEOUT,
        })
    }

    /// Bounds every Redis call by `timeout` instead of [`RedisStore::DEFAULT_TIMEOUT`].
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Tells every instance that `backend` is throttled until `until_unix_ms`: sets the cooldown
    /// key (expiring then) and announces it on the channel, atomically. A time already past does
    /// nothing.
    pub async fn publish(&self, backend: &str, until_unix_ms: u64) -> Result<(), StoreError> {
        let ttl_ms = until_unix_ms.saturating_sub(unix_ms());
        if ttl_ms == 0 {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("SET")
            .arg(self.key(backend))
            .arg(until_unix_ms)
            .arg("PX")
            .arg(ttl_ms)
            .ignore()
            .cmd("PUBLISH")
            .arg(self.channel())
            .arg(format!("{backend} {until_unix_ms}"))
            .ignore();
        let mut conn = self.conn.clone();
        bounded(
            "publish cooldown",
            self.timeout,
            pipe.query_async::<()>(&mut conn),
        )
        .await
    }

    /// Every live cooldown, as `(backend, until_unix_ms)` (a `SCAN` of the cooldown keys, each call
    /// bounded by the timeout). For start-up and after a reconnect; the listener calls it itself.
    pub async fn current(&self) -> Result<Vec<(String, u64)>, StoreError> {
        let key_prefix = self.key("");
        let pattern = format!("{}*", glob_escape(&key_prefix));
        let mut conn = self.conn.clone();
        let mut keys: Vec<String> = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let mut scan = redis::cmd("SCAN");
            scan.arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1_000);
            let (next, batch): (u64, Vec<String>) =
                bounded("scan cooldowns", self.timeout, scan.query_async(&mut conn)).await?;
            keys.extend(batch);
            if next == 0 {
                break;
            }
            cursor = next;
        }
        keys.sort_unstable();
        keys.dedup(); // SCAN may return a key twice
        let mut live = Vec::with_capacity(keys.len());
        for chunk in keys.chunks(500) {
            let mut mget = redis::cmd("MGET");
            mget.arg(chunk);
            let values: Vec<Option<String>> =
                bounded("read cooldowns", self.timeout, mget.query_async(&mut conn)).await?;
            for (key, value) in chunk.iter().zip(values) {
                // A key may expire between SCAN and MGET; a foreign value is skipped.
                let Some(until) = value.and_then(|v| v.parse::<u64>().ok()) else {
                    continue;
                };
                if let Some(backend) = key.strip_prefix(&key_prefix) {
                    live.push((backend.to_owned(), until));
                }
            }
        }
        Ok(live)
    }

    /// Spawns a task that listens for cooldowns published by any instance and calls
    /// `on_cooldown(backend, until_unix_ms)` for each, and for every [`current`](Self::current)
    /// cooldown after each (re)connection (so nothing published during an outage is missed).
    ///
    /// The task keeps its own pub/sub connection, pings it every 5 s, and reconnects with
    /// exponential backoff (100 ms to 5 s) when Redis goes away, logging once when the outage begins
    /// and once when it ends. It runs until the handle is aborted; the callback should be quick and
    /// must not panic.
    pub fn spawn_listener(
        &self,
        on_cooldown: impl Fn(String, u64) + Send + Sync + 'static,
    ) -> JoinHandle<()> {
        let this = self.clone();
        self.runtime
            .spawn(async move { this.listen(on_cooldown).await })
    }

    async fn listen(self, on_cooldown: impl Fn(String, u64)) {
        let channel = self.channel();
        let mut outage = false;
        let mut backoff = LISTENER_MIN_BACKOFF;
        loop {
            let reason = match self.subscribe(&channel).await {
                Ok(pubsub) => {
                    if outage {
                        tracing::info!(%channel, "redis cooldown channel: reconnected");
                        outage = false;
                    }
                    backoff = LISTENER_MIN_BACKOFF;
                    match self.current().await {
                        Ok(live) => live
                            .into_iter()
                            .for_each(|(b, until)| on_cooldown(b, until)),
                        Err(error) => tracing::warn!(%error, "redis cooldowns: cannot read them"),
                    }
                    self.relay(pubsub, &on_cooldown).await
                }
                Err(error) => error,
            };
            if !outage {
                tracing::warn!(
                    %channel,
                    error = %reason,
                    "redis cooldown channel lost: cooldowns are not shared until it is back; retrying"
                );
                outage = true;
            }
            let jitter = Duration::from_millis(fastrand::u64(0..=backoff.as_millis() as u64 / 2));
            sleep(backoff + jitter).await;
            backoff = (backoff * 2).min(LISTENER_MAX_BACKOFF);
        }
    }

    async fn subscribe(&self, channel: &str) -> Result<redis::aio::PubSub, StoreError> {
        let mut pubsub =
            bounded("connect", CONNECT_TIMEOUT, self.client.get_async_pubsub()).await?;
        bounded("subscribe", self.timeout, pubsub.subscribe(channel)).await?;
        Ok(pubsub)
    }

    /// Passes messages on until the connection fails; returns why.
    async fn relay(
        &self,
        pubsub: redis::aio::PubSub,
        on_cooldown: &impl Fn(String, u64),
    ) -> StoreError {
        let (mut sink, mut messages) = pubsub.split();
        let mut next_ping = Instant::now() + LISTENER_PING_EVERY;
        loop {
            tokio::select! {
                message = messages.next() => {
                    let Some(message) = message else {
                        return StoreError("redis cooldown channel: connection closed".into());
                    };
                    let payload = message.get_payload::<String>().unwrap_or_default();
                    match parse_announcement(&payload) {
                        Some((backend, until)) => on_cooldown(backend.to_owned(), until),
                        None => tracing::debug!(payload, "redis cooldowns: ignoring a malformed message"),
                    }
                }
                () = tokio::time::sleep_until(next_ping) => {
                    let ping = sink.ping::<redis::Value>();
                    if let Err(error) = bounded("PING", self.timeout, ping).await {
                        return error;
                    }
                    next_ping = Instant::now() + LISTENER_PING_EVERY;
                }
            }
        }
    }

    fn key(&self, backend: &str) -> String {
        format!("{}:v1:cooldown:{backend}", self.prefix)
    }

    fn channel(&self) -> String {
        format!("{}:v1:cooldowns", self.prefix)
    }
}

impl fmt::Debug for RedisCooldowns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisCooldowns")
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

// === helpers ===

/// A client, a lazy connection manager for `url`, and the runtime it runs on.
fn manager(url: &str) -> Result<(Client, ConnectionManager, Handle), StoreError> {
    let runtime = Handle::try_current().map_err(|_| {
        StoreError("redis: the store must be created inside a Tokio runtime".into())
    })?;
    let client = Client::open(url).map_err(|e| StoreError(format!("redis: bad URL: {e}")))?;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_number_of_retries(2)
        .set_min_delay(Duration::from_millis(50))
        .set_max_delay(Duration::from_millis(500));
    let conn = client
        .get_connection_manager_lazy(config)
        .map_err(|e| StoreError(format!("redis: {e}")))?;
    Ok((client, conn, runtime))
}

/// `PING` within `limit`.
async fn ping(conn: &ConnectionManager, limit: Duration) -> Result<(), StoreError> {
    let mut conn = conn.clone();
    let ping = redis::cmd("PING");
    bounded("PING", limit, ping.query_async::<String>(&mut conn)).await?;
    Ok(())
}

/// Runs one Redis call within `limit`.
async fn bounded<T>(
    what: &str,
    limit: Duration,
    call: impl Future<Output = RedisResult<T>>,
) -> Result<T, StoreError> {
    match timeout(limit, call).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(StoreError(format!("redis {what}: {error}"))),
        Err(_) => Err(StoreError(format!(
            "redis {what}: no answer within {} ms",
            limit.as_millis()
        ))),
    }
}

fn limit_arg(limit: Option<u64>) -> i64 {
    limit.map_or(-1, |l| i64::try_from(l).unwrap_or(i64::MAX))
}

fn period_code(period: QuotaPeriod) -> u8 {
    match period {
        QuotaPeriod::Hourly => 1,
        QuotaPeriod::Daily => 2,
        QuotaPeriod::Weekly => 3,
        QuotaPeriod::Monthly => 4,
    }
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

/// `"{backend} {until_unix_ms}"` (the backend name may contain spaces).
fn parse_announcement(payload: &str) -> Option<(&str, u64)> {
    let (backend, until) = payload.rsplit_once(' ')?;
    Some((backend, until.parse().ok()?)).filter(|(b, _)| !b.is_empty())
}

/// `text` with Redis glob metacharacters escaped, for `SCAN MATCH`.
fn glob_escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\' | '^') {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn announcements_parse() {
        assert_eq!(
            parse_announcement("ptu-sweden 1700000000000"),
            Some(("ptu-sweden", 1_700_000_000_000))
        );
        assert_eq!(parse_announcement("a b 5"), Some(("a b", 5)));
        assert_eq!(parse_announcement("nope"), None);
        assert_eq!(parse_announcement(" 5"), None);
        assert_eq!(parse_announcement("x -1"), None);
    }

    #[test]
    fn glob_metacharacters_are_escaped() {
        assert_eq!(glob_escape("gw*[1]:v1:"), r"gw\*\[1\]:v1:");
    }

    /// The Lua window arithmetic, run by a real `redis-server`, agrees with `window.rs`.
    #[tokio::test]
    async fn lua_windows_match_window_rs() {
        let server = TestServer::start();
        let client = Client::open(format!("redis://127.0.0.1:{}/", server.port)).expect("url");
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .expect("connect");
        let script = Script::new(concat!(
            window_lua!(),
            r#"
local out = {}
for i = 1, #ARGV, 2 do
  local idx, s, e = period_bounds(tonumber(ARGV[i]), tonumber(ARGV[i + 1]))
  table.insert(out, idx)
  table.insert(out, s)
  table.insert(out, e)
end
return out
"#
        ));
        // Every month start from 1970 to 2200, one second either side, then random instants.
        let mut instants = Vec::new();
        let mut t = 0;
        while t < 7_258_118_400 {
            let (_, _, end) = crate::limits::period_bounds(QuotaPeriod::Monthly, t);
            instants.extend([end - 1, end, end + 1]);
            t = end;
        }
        let mut rng = fastrand::Rng::with_seed(42);
        instants.extend((0..20_000).map(|_| rng.u64(0..7_258_118_400)));
        instants.extend([0, 1, 3 * 86_400 - 1, 4 * 86_400 - 1, 4 * 86_400]);

        let periods = [
            QuotaPeriod::Hourly,
            QuotaPeriod::Daily,
            QuotaPeriod::Weekly,
            QuotaPeriod::Monthly,
        ];
        let cases: Vec<(QuotaPeriod, u64)> = instants
            .iter()
            .flat_map(|&t| periods.map(|p| (p, t)))
            .collect();
        for batch in cases.chunks(2_000) {
            let mut invocation = script.prepare_invoke();
            for &(period, t) in batch {
                invocation.arg(period_code(period)).arg(t);
            }
            let reply: Vec<i64> = invocation.invoke_async(&mut conn).await.expect("eval");
            assert_eq!(reply.len(), batch.len() * 3);
            for (&(period, t), lua) in batch.iter().zip(reply.chunks(3)) {
                let (index, start, end) = crate::limits::period_bounds(period, t);
                let rust = [index, start as i64, end as i64];
                assert_eq!(lua, rust, "{period:?} at {t}");
            }
        }
    }

    /// A throwaway `redis-server` on a free port (the integration tests have the full harness).
    struct TestServer {
        port: u16,
        child: std::process::Child,
    }

    impl TestServer {
        fn start() -> Self {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("free port")
                .port();
            let child = std::process::Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("redis-server is not installed; run ./scripts/test, which installs it");
            let server = Self { port, child };
            for _ in 0..500 {
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return server;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            panic!("redis-server did not listen on {port}");
        }
    }

    impl Drop for TestServer {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

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
