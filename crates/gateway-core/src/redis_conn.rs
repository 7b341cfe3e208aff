//! One way to reach Redis for the engine's two Redis users, the limit store and the shared
//! cooldowns: a lazy, self-reconnecting connection manager, and every call bounded by a timeout so a
//! dead Redis never hangs a request.

use std::future::Future;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, RedisResult};
use tokio::runtime::Handle;
use tokio::time::timeout;

use crate::limits::StoreError;

/// How long a connection attempt may take (the per-call timeout bounds what callers wait).
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// The default bound on every Redis call.
pub(crate) const DEFAULT_TIMEOUT: Duration = Duration::from_millis(500);

/// A client, a lazy connection manager for `url`, and the runtime it runs on.
pub(crate) fn manager(url: &str) -> Result<(Client, ConnectionManager, Handle), StoreError> {
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
pub(crate) async fn ping(conn: &ConnectionManager, limit: Duration) -> Result<(), StoreError> {
    let mut conn = conn.clone();
    let ping = redis::cmd("PING");
    bounded("PING", limit, ping.query_async::<String>(&mut conn)).await?;
    Ok(())
}

/// Runs one Redis call within `limit`.
pub(crate) async fn bounded<T>(
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
