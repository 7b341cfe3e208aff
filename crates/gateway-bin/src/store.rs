//! The limit store a policy chooses, and backend cooldowns shared between instances.

use std::sync::Arc;
use std::time::{Duration, Instant};

use gateway_core::limits::{
    Admission, LimitCheck, LimitStore, MemoryStore, RedisStore, Reservation, StoreError, Usage,
};
use gateway_core::pool::{BackendPool, RedisCooldowns, unix_ms};
use tokio::task::JoinHandle;

/// The store chosen by `rate_limit.store`.
#[derive(Debug)]
pub enum Store {
    /// Counted in this process.
    Memory(MemoryStore),
    /// Counted in Redis, shared by every instance.
    Redis(RedisStore),
}

impl LimitStore for Store {
    async fn reserve(&self, checks: &[LimitCheck], tokens: u64) -> Result<Admission, StoreError> {
        match self {
            Store::Memory(s) => s.reserve(checks, tokens).await,
            Store::Redis(s) => s.reserve(checks, tokens).await,
        }
    }

    async fn reconcile(&self, reservation: &Reservation, consumed: u64) -> Result<(), StoreError> {
        match self {
            Store::Memory(s) => s.reconcile(reservation, consumed).await,
            Store::Redis(s) => s.reconcile(reservation, consumed).await,
        }
    }

    async fn usage(&self, check: &LimitCheck) -> Result<Usage, StoreError> {
        match self {
            Store::Memory(s) => s.usage(check).await,
            Store::Redis(s) => s.usage(check).await,
        }
    }
}

/// Shares backend cooldowns through Redis: what this instance learns from a 429 is published, and
/// what any instance publishes is applied to `pool`. Returns the hook for the failover layer, and
/// the listener's task, to be aborted when `pool` is replaced (a policy reload).
pub fn share_cooldowns(
    cooldowns: RedisCooldowns,
    pool: Arc<BackendPool>,
) -> (
    impl Fn(&str, &str, Duration) + Send + Sync + 'static,
    JoinHandle<()>,
) {
    let listener_pool = pool.clone();
    let listener = cooldowns.spawn_listener(move |backend, deployment, until_ms| {
        let Some(id) = listener_pool.id_of(&backend) else {
            return;
        };
        let left = until_ms.saturating_sub(unix_ms());
        if left > 0 {
            let rest = Duration::from_millis(left);
            listener_pool.cool_down(id, &deployment, rest, Instant::now());
        }
    });
    let hook = move |backend: &str, deployment: &str, cooldown: Duration| {
        let until =
            unix_ms().saturating_add(u64::try_from(cooldown.as_millis()).unwrap_or(u64::MAX));
        let cooldowns = cooldowns.clone();
        let backend = backend.to_owned();
        let deployment = deployment.to_owned();
        // Publishing must not delay the failover it follows.
        tokio::spawn(async move {
            if let Err(err) = cooldowns.publish(&backend, &deployment, until).await {
                tracing::debug!(error = %err, %backend, "could not share a cooldown");
            }
        });
    };
    (hook, listener)
}
