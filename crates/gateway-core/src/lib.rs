//! The framework-free engine of the Azure OpenAI gateway.
//!
//! - [`pool`]: the backend pool, per-backend state (cooldowns, circuit breakers), routing decisions,
//!   and cooldowns shared between instances through Redis.
//! - [`limits`]: accounting stores for consumer limits (memory and Redis).
//! - [`operation`]: the kinds of Azure OpenAI calls.
//! - [`request`]: one parse of a request body: routing fields, prompt pieces, edits spliced in place.
//! - [`retry_after`]: reading Azure's throttling headers into a cooldown.
//! - [`secret`]: secret values (a backend's credential); never shown in logs.
//! - [`tokens`]: token estimates before a call (tiktoken, `tokenizer` feature) and the real usage
//!   read after it.
//!
//! Nothing here depends on an HTTP framework: the layers crate adapts these types to tower and axum.
//! Nor does anything here know the policy file: the engine takes plain values (a [`pool::Backend`],
//! [`pool::PoolSettings`], [`limits::Limits`]), which the `gateway` binary builds from the policy
//! (the `gateway-policy` crate) in one place.
//!
//! ```
//! use std::collections::BTreeMap;
//! use std::time::Instant;
//! use gateway_core::limits::{Limits, Quota, QuotaPeriod};
//! use gateway_core::pool::{Backend, BackendPool, PoolSettings, Selection};
//!
//! let backend = Backend {
//!     name: "ptu-sweden".to_owned(),
//!     region: "Sweden Central".to_owned(),
//!     endpoint: "https://sweden.openai.azure.com".to_owned(),
//!     priority: 1,
//!     weight: 1,
//!     deployments: BTreeMap::from([("gpt-4o".to_owned(), "gpt-4o-ptu".to_owned())]),
//!     credential: None,
//! };
//! let pool = BackendPool::new(vec![backend], PoolSettings::default());
//! assert!(matches!(pool.select("gpt-4o", &[], Instant::now()), Selection::Backend(_)));
//!
//! let limits = Limits {
//!     tokens_per_minute: Some(10_000),
//!     quota: Some(Quota { tokens: 1_000_000, period: QuotaPeriod::Monthly }),
//!     ..Limits::default()
//! };
//! assert!(!limits.is_empty());
//! ```
//!
//! # Cargo features
//!
//! - `redis` (on by default): `limits::RedisStore`, limits shared by every gateway instance, and
//!   `pool::RedisCooldowns`, backend cooldowns shared the same way. Without it the engine has the
//!   in-memory store only and compiles no Redis client (nor Tokio).

pub mod limits;
pub mod operation;
pub mod pool;
#[cfg(feature = "redis")]
mod redis_conn;
pub mod request;
pub mod retry_after;
pub mod secret;
pub mod tokens;
