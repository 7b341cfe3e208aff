//! Rate-limit accounting: tokens and requests per minute and token quotas, per consumer.
//!
//! In the spirit of API Management's `llm-token-limit`, but accurate:
//!
//! - **Before the call** the layer estimates the request's tokens (prompt counted with the model's
//!   tokenizer, plus `max_tokens` times `n`) and reserves them, with one request, atomically under every
//!   limit that applies: the consumer's own, and the consumer's for that deployment. Over a per-minute
//!   limit the answer is 429 with `retry-after` and `retry-after-ms` saying when the request would fit;
//!   over a quota it is 403 saying when the quota resets. A request far from every token limit
//!   (its prompt's length in bytes, an upper bound of its tokens, at most a sixteenth of each, and of
//!   what the consumer's last request left) reserves that bound instead of being tokenized; if the
//!   store refuses the bound, the prompt is counted and the exact figure asked for again.
//! - **After the call** the reservation is reconciled with the real `usage`: from the JSON body, or for
//!   streams from the final usage chunk, which the layer asks for (`stream_options.include_usage`) when
//!   the api-version supports it and removes from the stream when the client did not ask for it. A
//!   failed call releases its reservation; a stream that ends without usage is charged its prompt
//!   and what it generated, both counted with the model's tokenizer (the text streamed is kept,
//!   bounded, and counted only then), and that figure goes to the [`Record`](crate::record::Record)
//!   as an estimate. A JSON answer is read whole before it
//!   is sent, bounded by the body below it (the [`FailoverLayer`](crate::FailoverLayer)'s idle
//!   timeout and deadline): one that is not complete in time is a 504 `GatewayTimeout`.
//! - The consumer's `x-ratelimit-remaining-tokens`, `x-ratelimit-remaining-requests`,
//!   `x-ratelimit-limit-*` and the tokens consumed go back in response headers (names configurable).
//!
//! The estimate is also stored in the request extensions as a [`gateway_core::tokens::Estimate`], so
//! the failover layer can skip backends that cannot fit it; the estimate, the limit verdict and the
//! real usage go to the request's [`Record`](crate::record::Record) for observers.
//!
//! Counting happens in a [`LimitStore`]: in memory for one instance, in Redis for many.
//!
//! Place it inside [`RequestContextLayer`](crate::RequestContextLayer) (it reads the captured body) and
//! [`ConsumerAuthLayer`](crate::ConsumerAuthLayer) (limits are per consumer). It never rewrites the
//! body: asking for the usage chunk is recorded in the [`RequestContext`](crate::context::RequestContext),
//! and whatever sends the request upstream builds its body with
//! [`RequestContext::body_for`](crate::context::RequestContext::body_for), as
//! [`FailoverLayer`](crate::FailoverLayer) does for every attempt.
//!
//! # Example
//!
//! ```
//! use std::sync::Arc;
//! use axum::{Router, body::Body, routing::post};
//! use gateway_core::limits::{Limits, MemoryStore};
//! use gateway_layers::auth::ConsumerKeys;
//! use gateway_layers::ratelimit::{ConsumerLimits, RateLimitLayer};
//! use gateway_layers::{ConsumerAuthLayer, RequestContextLayer};
//! use tower::{ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let limits = Limits { requests_per_minute: Some(2), ..Limits::default() };
//! let app = Router::new()
//!     .route("/openai/{*path}", post(|| async { r#"{"usage":{"prompt_tokens":5,"completion_tokens":1,"total_tokens":6}}"# }))
//!     .layer(
//!         ServiceBuilder::new()
//!             .layer(RequestContextLayer::new(1 << 20))
//!             .layer(ConsumerAuthLayer::new(Arc::new(ConsumerKeys::new().consumer("app", ["k"], None))))
//!             .layer(RateLimitLayer::new(Arc::new(MemoryStore::new())).consumer("app", ConsumerLimits::all(limits))),
//!     );
//! let call = || {
//!     http::Request::post("/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21")
//!         .header("api-key", "k")
//!         .body(Body::from(r#"{"messages":[{"role":"user","content":"hi"}]}"#))
//!         .unwrap()
//! };
//! assert_eq!(app.clone().oneshot(call()).await.unwrap().status(), 200);
//! let second = app.clone().oneshot(call()).await.unwrap();
//! assert_eq!(second.headers()["x-ratelimit-remaining-requests"], "0");
//! assert_eq!(second.headers()["x-gateway-tokens-consumed"], "6");
//! let third = app.oneshot(call()).await.unwrap();
//! assert_eq!(third.status(), 429);
//! assert!(third.headers().contains_key("retry-after-ms"));
//! # }
//! ```

mod body;
mod generated;
mod service;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use gateway_core::limits::{LimitCheck, LimitStore, Limits};
use http::HeaderName;
use tokio::sync::Notify;
use tokio::time::Instant;
use tower::Layer;

pub use body::UsageBody;
pub use service::{RateLimit, RateLimitFuture};

/// A consumer's limits: across all its calls, and per logical deployment.
#[derive(Clone, Debug, Default)]
pub struct ConsumerLimits {
    /// Limits over everything the consumer calls.
    pub all: Limits,
    /// Limits for one deployment, counted apart (both apply).
    pub per_deployment: BTreeMap<String, Limits>,
}

/// What to do when the store cannot be reached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OnStoreError {
    /// Admit the request unchecked.
    #[default]
    FailOpen,
    /// Refuse with 503.
    FailClosed,
}

/// Response header names, as API Management lets you choose them.
#[derive(Clone, Debug)]
pub struct LimitHeaders {
    /// Tokens left in the minute.
    pub remaining_tokens: HeaderName,
    /// Requests left in the minute.
    pub remaining_requests: HeaderName,
    /// The tokens-per-minute limit.
    pub limit_tokens: HeaderName,
    /// The requests-per-minute limit.
    pub limit_requests: HeaderName,
    /// Quota tokens left in the period.
    pub remaining_quota: HeaderName,
    /// Tokens the call consumed (non-streamed answers; streams learn it only at their end).
    pub tokens_consumed: HeaderName,
}

/// What [`RateLimitLayer`]'s builder methods set.
#[derive(Clone, Debug)]
struct RateLimitConfig {
    /// Limits by consumer name. A consumer without an entry is not limited (its tokens are still
    /// estimated for routing).
    consumers: HashMap<Arc<str>, Limited>,
    /// Logical deployment -> model name, to choose a tokenizer; the deployment name when absent.
    models: HashMap<String, String>,
    /// Completion tokens reserved when a request names no `max_tokens`.
    default_completion_tokens: u64,
    /// Store failure behaviour.
    on_store_error: OnStoreError,
    /// Response header names.
    headers: LimitHeaders,
}

/// A limited consumer: its limits, and the tokens its last admission or refusal left.
#[derive(Debug)]
struct Limited {
    limits: ConsumerLimits,
    /// Tokens left (per minute or of the quota, the lower) after the consumer's last request the
    /// store answered, `u64::MAX` before the first: whether a prompt's upper bound may be reserved
    /// instead of its count depends on it (the service's `Counted::for_limits`). A hint, shared by the
    /// consumer's requests to every deployment; the store has the truth.
    room: AtomicU64,
}

impl Clone for Limited {
    fn clone(&self) -> Self {
        Self {
            limits: self.limits.clone(),
            room: AtomicU64::new(u64::MAX),
        }
    }
}

/// Layer that accounts consumer limits. See the [module docs](self).
pub struct RateLimitLayer<St> {
    shared: Arc<Shared<St>>,
}

struct Shared<St> {
    store: Arc<St>,
    config: RateLimitConfig,
    /// Whether the store is failing, so an outage is logged once, not per request.
    store_down: AtomicBool,
    /// Until when (ms since `started`) the store is not asked after a failure: a black-holed store
    /// would otherwise cost every request the store's whole timeout.
    store_rest_until: AtomicU64,
    started: Instant,
    /// Reconciliations spawned at the end of streams and not finished yet, for [`RateLimitLayer::settled`].
    reconciling: AtomicUsize,
    reconciled: Notify,
}

/// How long the store rests after it failed.
const STORE_REST: Duration = Duration::from_secs(1);

impl<St> Shared<St> {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// What is left of the store's rest after a failure (zero when it is not resting).
    fn store_rest_left(&self) -> Duration {
        let until = self.store_rest_until.load(Ordering::Relaxed);
        Duration::from_millis(until.saturating_sub(self.now_ms()))
    }

    fn store_resting(&self) -> bool {
        self.now_ms() < self.store_rest_until.load(Ordering::Relaxed)
    }

    fn store_failed(&self) {
        metrics::counter!("gateway_limit_store_errors_total").increment(1);
        let until = self.now_ms() + STORE_REST.as_millis() as u64;
        self.store_rest_until.store(until, Ordering::Relaxed);
    }
}

// === impl ConsumerLimits ===

impl ConsumerLimits {
    /// Limits across every deployment.
    pub fn all(limits: Limits) -> Self {
        Self {
            all: limits,
            per_deployment: BTreeMap::new(),
        }
    }

    /// Adds limits for one deployment.
    pub fn deployment(mut self, name: impl Into<String>, limits: Limits) -> Self {
        self.per_deployment.insert(name.into(), limits);
        self
    }

    /// The store check of `consumer`'s own limits, if it has any.
    pub fn own_check(&self, consumer: &str) -> Option<LimitCheck> {
        (!self.all.is_empty()).then(|| LimitCheck {
            key: format!("consumer:{consumer}"),
            limits: self.all.clone(),
        })
    }

    /// The store check of `consumer`'s limits for `deployment`, if it has any.
    pub fn deployment_check(&self, consumer: &str, deployment: &str) -> Option<LimitCheck> {
        let limits = self.per_deployment.get(deployment)?;
        (!limits.is_empty()).then(|| LimitCheck {
            key: format!("consumer:{consumer}:deployment:{deployment}"),
            limits: limits.clone(),
        })
    }
}

// === impl LimitHeaders ===

impl Default for LimitHeaders {
    fn default() -> Self {
        Self {
            remaining_tokens: HeaderName::from_static("x-ratelimit-remaining-tokens"),
            remaining_requests: HeaderName::from_static("x-ratelimit-remaining-requests"),
            limit_tokens: HeaderName::from_static("x-ratelimit-limit-tokens"),
            limit_requests: HeaderName::from_static("x-ratelimit-limit-requests"),
            remaining_quota: HeaderName::from_static("x-ratelimit-remaining-quota-tokens"),
            tokens_consumed: HeaderName::from_static("x-gateway-tokens-consumed"),
        }
    }
}

// === impl RateLimitConfig ===

impl Default for RateLimitConfig {
    fn default() -> Self {
        Self {
            consumers: HashMap::new(),
            models: HashMap::new(),
            default_completion_tokens: 16,
            on_store_error: OnStoreError::FailOpen,
            headers: LimitHeaders::default(),
        }
    }
}

// === impl RateLimitLayer ===

impl<St: LimitStore> RateLimitLayer<St> {
    /// Accounts limits in `store`, for no consumer yet: add them with [`consumer`](Self::consumer).
    /// Defaults: 16 completion tokens reserved when a request names no `max_tokens`, fail-open, and
    /// API Management's header names.
    pub fn new(store: Arc<St>) -> Self {
        Self {
            shared: Arc::new(Shared::new(store, RateLimitConfig::default())),
        }
    }

    /// Sets a consumer's limits. A consumer without limits is not limited (its tokens are still
    /// estimated, roughly, for routing).
    pub fn consumer(self, name: &str, limits: ConsumerLimits) -> Self {
        self.with(|c| {
            c.consumers.insert(
                Arc::from(name),
                Limited {
                    limits,
                    room: AtomicU64::new(u64::MAX),
                },
            );
        })
    }

    /// The model behind a logical deployment, to choose its tokenizer (the deployment's own name
    /// otherwise).
    pub fn model(self, deployment: &str, model: &str) -> Self {
        self.with(|c| {
            c.models.insert(deployment.to_owned(), model.to_owned());
        })
    }

    /// Completion tokens reserved when a request names no `max_tokens` (16 by default).
    pub fn default_completion_tokens(self, tokens: u64) -> Self {
        self.with(|c| c.default_completion_tokens = tokens)
    }

    /// What to do when the store cannot be reached (fail-open by default).
    pub fn on_store_error(self, behaviour: OnStoreError) -> Self {
        self.with(|c| c.on_store_error = behaviour)
    }

    /// The response header names.
    pub fn headers(self, headers: LimitHeaders) -> Self {
        self.with(|c| c.headers = headers)
    }

    /// The limits of `consumer`, as configured.
    pub fn limits(&self, consumer: &str) -> Option<&ConsumerLimits> {
        self.shared
            .config
            .consumers
            .get(consumer)
            .map(|c| &c.limits)
    }

    /// The store.
    pub fn store(&self) -> &Arc<St> {
        &self.shared.store
    }

    /// Resolves once every reconciliation started at the end of a stream has reached the store.
    /// A stream's accounting happens after its last byte went to the client; this is how to wait
    /// for it (in tests, or before reading the store).
    pub async fn settled(&self) {
        loop {
            let notified = self.shared.reconciled.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            if self.shared.reconciling.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }

    fn with(mut self, f: impl FnOnce(&mut RateLimitConfig)) -> Self {
        match Arc::get_mut(&mut self.shared) {
            Some(shared) => f(&mut shared.config),
            // Already handed to services: configure a copy, with counters of its own.
            None => {
                let mut config = self.shared.config.clone();
                f(&mut config);
                self.shared = Arc::new(Shared::new(self.shared.store.clone(), config));
            }
        }
        self
    }
}

// === impl Shared ===

impl<St> Shared<St> {
    fn new(store: Arc<St>, config: RateLimitConfig) -> Self {
        Self {
            store,
            config,
            store_down: AtomicBool::new(false),
            store_rest_until: AtomicU64::new(0),
            started: Instant::now(),
            reconciling: AtomicUsize::new(0),
            reconciled: Notify::new(),
        }
    }
}

impl<St> Clone for RateLimitLayer<St> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
        }
    }
}

impl<St> std::fmt::Debug for RateLimitLayer<St> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimitLayer")
            .field("consumers", &self.shared.config.consumers.len())
            .finish()
    }
}

impl<S, St> Layer<S> for RateLimitLayer<St> {
    type Service = RateLimit<S, St>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimit::new(inner, self.shared.clone())
    }
}
