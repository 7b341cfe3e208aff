//! tower Layers for gateways in front of Azure OpenAI.
//!
//! Each layer is usable alone in any axum (or plain tower) application, and the `gateway` binary
//! composes them all:
//!
//! | module | layer | what it does |
//! |---|---|---|
//! | [`context`] | [`RequestContextLayer`] | reads a request once: request id, operation, deployment, replayable body |
//! | [`auth`] | [`ConsumerAuthLayer`] | authenticates client API keys as named consumers |
//! | [`ratelimit`] | [`RateLimitLayer`] | per-consumer token and request limits and quotas, reserved then reconciled |
//! | [`propagate`] | [`PropagateHeadersLayer`] | which headers cross the gateway in each direction |
//! | [`failover`] | [`FailoverLayer`] | picks a backend, replays the request, fails over on 429/5xx/timeouts |
//!
//! [`client::ReqwestClient`] is the HTTP client service the failover layer sends attempts through;
//! [`headers`] names every header the gateway owns; [`error`] builds answers in Azure's error shape;
//! [`record`] is the one record of each request that the layers fill in and observers read.
//!
//! # Example: a complete gateway in a plain axum app
//!
//! ```
//! use std::sync::Arc;
//! use gateway_core::pool::{Backend, BackendPool, PoolSettings};
//! use gateway_layers::{FailoverLayer, RequestContextLayer, client::ReqwestClient};
//! use tower::ServiceBuilder;
//!
//! let pool = Arc::new(BackendPool::new(vec![], PoolSettings::default()));
//! let proxy = ServiceBuilder::new()
//!     // Outside the failover layer: it owns the body the failover layer replays.
//!     .layer(RequestContextLayer::new(4 << 20))
//!     .layer(FailoverLayer::new(pool).max_attempts(3))
//!     .service(ReqwestClient::new());
//! let app: axum::Router = axum::Router::new().route_service("/openai/{*path}", proxy);
//! # let _ = app;
//! ```
//!
//! # Cargo features
//!
//! Take one layer without the rest: with `default-features = false` this crate compiles no Redis
//! client, no tokenizer tables and no JWT code.
//!
//! | feature | default | what it adds |
//! |---|---|---|
//! | `redis` | on | `gateway_core::limits::RedisStore` for [`RateLimitLayer`] (one limit across every instance) and `gateway_core::pool::RedisCooldowns` behind [`FailoverLayer`]'s cooldown hook; [`RateLimitLayer`] works with the in-memory store without it |
//! | `tokenizer` | on | exact prompt counting (tiktoken) for [`RateLimitLayer`]'s reservations; without it the layer reserves the body's length over four plus `max_tokens` |
//! | `entra` | on | `entra::EntraAuthLayer`: Entra ID access tokens from clients, mapped to consumers by [`ConsumerAuthLayer`] |
//!
//! [`RequestContextLayer`], [`ConsumerAuthLayer`], [`PropagateHeadersLayer`] and [`FailoverLayer`]
//! need no feature.

pub mod auth;
mod body;
pub mod client;
pub mod context;
#[cfg(feature = "entra")]
pub mod entra;
pub mod error;
pub mod failover;
pub mod headers;
pub mod propagate;
pub mod ratelimit;
pub mod record;

pub use auth::ConsumerAuthLayer;
pub use context::RequestContextLayer;
pub use failover::FailoverLayer;
pub use propagate::PropagateHeadersLayer;
pub use ratelimit::RateLimitLayer;

/// The error type layers use for bodies and inner services they do not know.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
