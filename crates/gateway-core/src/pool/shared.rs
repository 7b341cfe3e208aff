//! Deployment cooldowns shared between gateway instances through Redis.
//!
//! The first instance that sees a deployment's 429 publishes the cooldown; every instance's listener
//! applies it to its own [`BackendPool`](super::BackendPool) at once, so the fleet stops sending to a
//! throttled deployment after one 429 instead of one per instance.
//!
//! # Keys
//!
//! Under the same prefix as the limit store, in schema version `v2`:
//!
//! | key | type | holds | expires |
//! |---|---|---|---|
//! | `{prefix}:v2:cooldown:{backend}:{deployment}` | string | the Unix time in ms until which that deployment on `backend` is throttled | then |
//! | `{prefix}:v2:cooldowns` | pub/sub channel | messages `{backend} {deployment} {until_unix_ms}` | |
//!
//! `deployment` is the backend's own deployment name (what Azure throttles). In keys and messages
//! both names are escaped: `%` as `%25`, `:` as `%3A` and a space as `%20`, so that neither can
//! run into the other.
//!
//! **Why `v2`.** Version 1 (`{prefix}:v1:cooldown:{backend}`, messages `{backend} {until}`) named
//! the backend only, and a v1 instance reading `a b 5` would take `a b` for a backend. The new
//! shapes live under new names instead: during a rolling upgrade, old and new instances each share
//! cooldowns among themselves and simply do not see the other version's (each still learns from its
//! own 429s), and neither misreads the other. The limit store's keys keep `v1`: their shape did not
//! change.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use redis::Client;
use redis::aio::ConnectionManager;
use tokio::runtime::Handle;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep};

use crate::limits::StoreError;
use crate::redis_conn::{self, CONNECT_TIMEOUT, bounded, manager, ping};

/// How often the cooldown listener checks that its pub/sub connection is alive.
const LISTENER_PING_EVERY: Duration = Duration::from_secs(5);
const LISTENER_MIN_BACKOFF: Duration = Duration::from_millis(100);
const LISTENER_MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Deployment throttle state shared through Redis: the first instance that sees a 429 publishes the
/// cooldown, and every instance's listener learns of it at once.
///
/// Each cooldown is a key `{prefix}:v2:cooldown:{backend}:{deployment}` holding the end time in Unix
/// ms (it expires then), announced on the channel `{prefix}:v2:cooldowns` as
/// `{backend} {deployment} {until_unix_ms}` (names escaped, see the module docs). Times are wall-clock milliseconds, so instances' clocks should be synchronised (NTP).
#[derive(Clone)]
pub struct RedisCooldowns {
    client: Client,
    conn: ConnectionManager,
    runtime: Handle,
    prefix: Arc<str>,
    timeout: Duration,
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
            timeout: redis_conn::DEFAULT_TIMEOUT,
        })
    }

    /// Bounds every Redis call by `timeout` instead of the default 500 ms
    /// ([`RedisStore::DEFAULT_TIMEOUT`](crate::limits::RedisStore::DEFAULT_TIMEOUT)).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Tells every instance that `deployment` (the backend's own name for it) on `backend` is
    /// throttled until `until_unix_ms`: sets the cooldown key (expiring then) and announces it on the
    /// channel, atomically. A time already past does nothing.
    pub async fn publish(
        &self,
        backend: &str,
        deployment: &str,
        until_unix_ms: u64,
    ) -> Result<(), StoreError> {
        let ttl_ms = until_unix_ms.saturating_sub(unix_ms());
        if ttl_ms == 0 {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("SET")
            .arg(self.key(backend, deployment))
            .arg(until_unix_ms)
            .arg("PX")
            .arg(ttl_ms)
            .ignore()
            .cmd("PUBLISH")
            .arg(self.channel())
            .arg(format!(
                "{} {} {until_unix_ms}",
                escape(backend),
                escape(deployment)
            ))
            .ignore();
        let mut conn = self.conn.clone();
        bounded(
            "publish cooldown",
            self.timeout,
            pipe.query_async::<()>(&mut conn),
        )
        .await
    }

    /// Every live cooldown, as `(backend, deployment, until_unix_ms)` (a `SCAN` of the cooldown keys,
    /// each call bounded by the timeout). For start-up and after a reconnect; the listener calls it
    /// itself.
    pub async fn current(&self) -> Result<Vec<(String, String, u64)>, StoreError> {
        let key_prefix = self.key_prefix();
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
                let names = key
                    .strip_prefix(&key_prefix)
                    .and_then(|k| k.split_once(':'));
                if let Some((backend, deployment)) = names {
                    if let (Some(b), Some(d)) = (unescape(backend), unescape(deployment)) {
                        live.push((b, d, until));
                    }
                }
            }
        }
        Ok(live)
    }

    /// Spawns a task that listens for cooldowns published by any instance and calls
    /// `on_cooldown(backend, deployment, until_unix_ms)` for each, and for every [`current`](Self::current)
    /// cooldown after each (re)connection (so nothing published during an outage is missed).
    ///
    /// The task keeps its own pub/sub connection, pings it every 5 s, and reconnects with
    /// exponential backoff (100 ms to 5 s) when Redis goes away, logging once when the outage begins
    /// and once when it ends. It runs until the handle is aborted; the callback should be quick and
    /// must not panic.
    pub fn spawn_listener(
        &self,
        on_cooldown: impl Fn(String, String, u64) + Send + Sync + 'static,
    ) -> JoinHandle<()> {
        let this = self.clone();
        self.runtime
            .spawn(async move { this.listen(on_cooldown).await })
    }

    async fn listen(self, on_cooldown: impl Fn(String, String, u64)) {
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
                            .for_each(|(b, d, until)| on_cooldown(b, d, until)),
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
        on_cooldown: &impl Fn(String, String, u64),
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
                        Some((backend, deployment, until)) => on_cooldown(backend, deployment, until),
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

    fn key(&self, backend: &str, deployment: &str) -> String {
        format!(
            "{}{}:{}",
            self.key_prefix(),
            escape(backend),
            escape(deployment)
        )
    }

    fn key_prefix(&self) -> String {
        format!("{}:v2:cooldown:", self.prefix)
    }

    fn channel(&self) -> String {
        format!("{}:v2:cooldowns", self.prefix)
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

/// `"{backend} {deployment} {until_unix_ms}"`, names escaped.
fn parse_announcement(payload: &str) -> Option<(String, String, u64)> {
    let mut parts = payload.split(' ');
    let (backend, deployment, until) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || backend.is_empty() || deployment.is_empty() {
        return None;
    }
    Some((
        unescape(backend)?,
        unescape(deployment)?,
        until.parse().ok()?,
    ))
}

/// A name with `%`, `:` and spaces escaped, so it can sit between `:` in a key and between spaces
/// in a message.
fn escape(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for c in name.chars() {
        match c {
            '%' => out.push_str("%25"),
            ':' => out.push_str("%3A"),
            ' ' => out.push_str("%20"),
            c => out.push(c),
        }
    }
    out
}

/// The inverse of [`escape`]; `None` for an escape it never writes.
fn unescape(name: &str) -> Option<String> {
    let mut out = String::with_capacity(name.len());
    let mut rest = name;
    while let Some(at) = rest.find('%') {
        out.push_str(&rest[..at]);
        let code = rest.get(at + 1..at + 3)?;
        out.push(match code {
            "25" => '%',
            "3A" => ':',
            "20" => ' ',
            _ => return None,
        });
        rest = &rest[at + 3..];
    }
    out.push_str(rest);
    Some(out)
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

/// Now, in milliseconds since the Unix epoch: the clock cooldowns are announced in between instances
/// (which therefore need NTP).
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn announcements_parse() {
        let own = |b: &str, d: &str, t| Some((b.to_owned(), d.to_owned(), t));
        assert_eq!(
            parse_announcement("ptu-sweden gpt-4o-ptu 1700000000000"),
            own("ptu-sweden", "gpt-4o-ptu", 1_700_000_000_000)
        );
        assert_eq!(
            parse_announcement("a%20b c%3Ad%25 5"),
            own("a b", "c:d%", 5)
        );
        // A v1 message (`{backend} {until}`) is not misread as a v2 one.
        assert_eq!(parse_announcement("ptu-sweden 1700000000000"), None);
        assert_eq!(parse_announcement("nope"), None);
        assert_eq!(parse_announcement(" d 5"), None);
        assert_eq!(parse_announcement("x d -1"), None);
        assert_eq!(parse_announcement("x d%zz 1"), None);
    }

    #[test]
    fn names_escape_and_unescape() {
        for name in ["plain", "a b", "c:d", "100%", "%3A", ""] {
            let escaped = escape(name);
            assert!(!escaped.contains([' ', ':']), "{escaped}");
            assert_eq!(unescape(&escaped).as_deref(), Some(name));
        }
    }

    #[test]
    fn glob_metacharacters_are_escaped() {
        assert_eq!(glob_escape("gw*[1]:v1:"), r"gw\*\[1\]:v1:");
    }
}
