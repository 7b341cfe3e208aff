use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use gateway_core::pool::BackendPool;
use tower::Layer;

use super::{AzurePolicy, Failover, FailoverPolicy, Upstream};

/// Layer that fails over between backends. See the [module docs](super).
///
/// Built with [`FailoverLayer::new`] and configured with its `self -> Self` methods; what an upstream
/// answer means is decided by a [`FailoverPolicy`], [`AzurePolicy`] unless replaced with
/// [`policy`](Self::policy).
#[derive(Clone)]
pub struct FailoverLayer<P = AzurePolicy> {
    pool: Arc<BackendPool>,
    config: Config,
    policy: P,
    on_cooldown: Option<CooldownHook>,
}

/// Called with a backend's name, its own name for the deployment that rests, and the rest its answer
/// put that deployment into (see [`FailoverLayer::on_cooldown`]).
pub type CooldownHook = Arc<dyn Fn(&str, &str, Duration) + Send + Sync>;

/// How the layer bounds attempts.
#[derive(Clone, Debug)]
pub(super) struct Config {
    pub(super) max_attempts: u32,
    pub(super) deadline: Duration,
    pub(super) response_header_timeout: Duration,
    pub(super) stream_idle_timeout: Duration,
    pub(super) flex_fallback: super::FlexFallback,
    pub(super) throttle_wait: Duration,
}

/// What every service of one layer shares.
pub(super) struct Shared {
    pub(super) pool: Arc<BackendPool>,
    pub(super) config: Config,
    pub(super) upstreams: Vec<Upstream>,
    pub(super) on_cooldown: Option<CooldownHook>,
    /// Set once the missing `RequestContext` was logged: a misassembled stack fails every request,
    /// and one log line says why as well as a million would.
    pub(super) missing_context_logged: AtomicBool,
}

// === impl Config ===

impl Default for Config {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            deadline: Duration::from_secs(120),
            response_header_timeout: Duration::from_secs(30),
            stream_idle_timeout: Duration::from_secs(120),
            flex_fallback: super::FlexFallback::default(),
            throttle_wait: Duration::ZERO,
        }
    }
}

// === impl FailoverLayer ===

impl FailoverLayer {
    /// Fails over between the backends of `pool` with Azure's semantics ([`AzurePolicy`]) and the
    /// policy file's defaults: 5 attempts, a 120 s deadline, a 30 s response header timeout and a
    /// 120 s stream idle timeout.
    ///
    /// The layer needs a [`RequestContext`](crate::context::RequestContext) in the request
    /// extensions: put a [`RequestContextLayer`](crate::RequestContextLayer) outside it. Without one
    /// every request is answered 500.
    pub fn new(pool: Arc<BackendPool>) -> Self {
        Self {
            pool,
            config: Config::default(),
            policy: AzurePolicy::default(),
            on_cooldown: None,
        }
    }

    /// The statuses that fail over besides 429, 401 and 403 (by default 408, 500, 502, 503 and
    /// 504); see [`AzurePolicy::on_status`].
    pub fn on_status(mut self, statuses: impl IntoIterator<Item = u16>) -> Self {
        self.policy = self.policy.on_status(statuses);
        self
    }
}

impl<P> FailoverLayer<P> {
    /// Decides with `policy` what an upstream answer means, instead of the current policy.
    pub fn policy<Q: FailoverPolicy>(self, policy: Q) -> FailoverLayer<Q> {
        FailoverLayer {
            pool: self.pool,
            config: self.config,
            policy,
            on_cooldown: self.on_cooldown,
        }
    }

    /// Most attempts for one client request (at least 1; default 5).
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.config.max_attempts = attempts.max(1);
        self
    }

    /// Overall time until response headers, across attempts (default 120 s). It starts when the
    /// layer is called, so a slow upload does not eat the upstreams' time. A body that is not a
    /// stream (a JSON answer, an error passed through) must also have arrived by then, or it is
    /// broken off; a stream's generation is bounded by the idle timeout instead.
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.config.deadline = deadline;
        self
    }

    /// How long one attempt may wait for response headers, the time-to-first-byte limit, before the
    /// next backend is tried (default 30 s).
    pub fn response_header_timeout(mut self, timeout: Duration) -> Self {
        self.config.response_header_timeout = timeout;
        self
    }

    /// Longest silence allowed inside any upstream response body, errors passed through included
    /// (default 120 s); then the body is broken off (an SSE stream gets an `event: error`). It is
    /// not counted against the backend's circuit: the attempt already counted when its headers came.
    pub fn stream_idle_timeout(mut self, timeout: Duration) -> Self {
        self.config.stream_idle_timeout = timeout;
        self
    }

    /// Longest wait for a resting deployment (default 0: none). When every backend left for a
    /// request rests after a 429 and the first rest ends within this, the request waits it out
    /// (once, inside the deadline) and tries again rather than get the gateway's 429 at once:
    /// rests of a few tens of milliseconds cost a client less held than bounced, and a client
    /// that comes straight back would only meet the same rest again.
    pub fn throttle_wait(mut self, wait: Duration) -> Self {
        self.config.throttle_wait = wait;
        self
    }

    /// What a `"service_tier": "flex"` request does after a 429 (default: retry the same
    /// deployment at the default tier); see [`FlexFallback`](super::FlexFallback).
    pub fn flex_fallback(mut self, fallback: super::FlexFallback) -> Self {
        self.config.flex_fallback = fallback;
        self
    }

    /// Calls `hook(backend, deployment, cooldown)` whenever a 429 (or
    /// `x-ratelimit-remaining-requests: 0`) rests a deployment on a backend, `deployment` being the
    /// backend's own name for it: the way to tell other gateway instances, e.g. through Redis. (Auth
    /// failures and 5xx are this instance's own.)
    pub fn on_cooldown(
        mut self,
        hook: impl Fn(&str, &str, Duration) + Send + Sync + 'static,
    ) -> Self {
        self.on_cooldown = Some(Arc::new(hook));
        self
    }

    /// The pool this layer routes over.
    pub fn pool(&self) -> &Arc<BackendPool> {
        &self.pool
    }
}

impl<S, P: Clone> Layer<S> for FailoverLayer<P> {
    type Service = Failover<S, P>;

    fn layer(&self, inner: S) -> Self::Service {
        let shared = Shared {
            pool: self.pool.clone(),
            config: self.config.clone(),
            upstreams: self.pool.backends().iter().map(Upstream::new).collect(),
            on_cooldown: self.on_cooldown.clone(),
            missing_context_logged: AtomicBool::new(false),
        };
        Failover::new(inner, Arc::new(shared), self.policy.clone())
    }
}

impl<P> std::fmt::Debug for FailoverLayer<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FailoverLayer")
            .field("pool", &self.pool)
            .field("config", &self.config)
            .field("policy", &std::any::type_name::<P>())
            .field("on_cooldown", &self.on_cooldown.is_some())
            .finish()
    }
}

// === impl Shared ===

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("pool", &self.pool)
            .field("config", &self.config)
            .field("on_cooldown", &self.on_cooldown.is_some())
            .finish()
    }
}
