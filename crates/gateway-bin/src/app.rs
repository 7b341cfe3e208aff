//! Composition: policy in, axum `Router` out.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use gateway_core::limits::{Limits, MemoryStore, RedisCooldowns, RedisStore};
use gateway_core::policy::{
    HeaderAction, HeaderSettings, Policy, ResolvedSecrets, StoreFailure, StoreKind,
};
use gateway_core::pool::{Backend, BackendPool, BackendState, PoolSettings};
use gateway_layers::auth::ConsumerKeys;
use gateway_layers::client::ReqwestClient;
use gateway_layers::error::azure_error;
use gateway_layers::propagate::{ExistsAction, HeaderRules};
use gateway_layers::ratelimit::{ConsumerLimits, LimitHeaders, OnStoreError};
use gateway_layers::{
    ConsumerAuthLayer, FailoverLayer, PropagateHeadersLayer, RateLimitLayer, RequestContextLayer,
};
use http::{HeaderName, StatusCode};
use metrics_exporter_prometheus::PrometheusHandle;
use tower::ServiceBuilder;

use crate::admin::Admin;
use crate::observe::ObserveLayer;
use crate::store::{Store, share_cooldowns};
use crate::telemetry::{EnterServerSpanLayer, InjectTraceContextLayer, ServerSpanLayer};

/// A composed gateway: its router and the shared state worth observing from outside.
#[derive(Clone)]
pub struct Gateway {
    /// Serve this.
    pub router: Router,
    /// Backend health, shared with the failover layer.
    pub pool: Arc<BackendPool>,
    /// Set when shutdown begins, so `/readyz` turns away new traffic.
    pub draining: Arc<AtomicBool>,
    /// `/metrics`, `/admin/status` and `/admin` when `admin.listen` gives them a listener of their
    /// own; `None` when they are routes of `router`.
    pub admin: Option<AdminEndpoints>,
    /// The Prometheus recorder behind `/metrics`; `serve` runs its upkeep.
    pub metrics: PrometheusHandle,
}

/// The operator endpoints, to be served on their own listener.
#[derive(Clone)]
pub struct AdminEndpoints {
    /// Where to listen (`admin.listen`).
    pub listen: std::net::SocketAddr,
    /// Serve this there.
    pub router: Router,
}

/// The policy could not be turned into layers (what validation cannot see, e.g. header values).
#[derive(Debug)]
pub struct BuildError(pub String);

impl std::fmt::Display for BuildError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BuildError {}

/// Builds the gateway for `policy`, whose secrets are already resolved.
pub fn build(policy: &Policy, secrets: &ResolvedSecrets) -> Result<Gateway, BuildError> {
    // A credential that cannot be a header value would silently go unsent: refuse it at start-up.
    for (spec, credential) in policy.backends.iter().zip(&secrets.backends) {
        let value = credential.secret().expose();
        if value.is_empty() || value.bytes().any(|b| b.is_ascii_control()) {
            return Err(BuildError(format!(
                "backends `{}`: its credential holds characters that cannot be sent in a header",
                spec.name
            )));
        }
    }
    let backends = policy
        .backends
        .iter()
        .zip(&secrets.backends)
        .map(|(spec, cred)| Backend::from_spec(spec, Some(cred.clone())))
        .collect();
    let pool = Arc::new(BackendPool::new(
        backends,
        PoolSettings::from_policy(&policy.failover, &policy.circuit_breaker),
    ));

    let keys = policy.consumers.iter().zip(&secrets.consumers).fold(
        ConsumerKeys::new(),
        |keys, (spec, secrets)| {
            keys.consumer(
                &spec.name,
                secrets.iter().map(|s| s.expose()),
                spec.deployments.clone(),
            )
        },
    );

    let mut failover_layer = FailoverLayer::new(pool.clone())
        .max_attempts(policy.failover.max_attempts)
        .deadline(Duration::from_millis(policy.failover.deadline_ms))
        .response_header_timeout(Duration::from_millis(
            policy.failover.response_header_timeout_ms,
        ))
        .on_status(policy.failover.on_status.iter().copied())
        .stream_idle_timeout(Duration::from_millis(
            policy.failover.stream_idle_timeout_ms,
        ));

    warm_up_tokenizers(policy);
    let redis_url = secrets.redis_url.as_ref().map(|s| s.expose());
    let store = match (policy.rate_limit.store, redis_url) {
        (StoreKind::Redis, Some(url)) => Store::Redis(
            RedisStore::connect_lazy(url, &policy.rate_limit.key_prefix)
                .map_err(|e| BuildError(format!("rate_limit.redis_url: {e}")))?,
        ),
        _ => Store::Memory(MemoryStore::new()),
    };
    // Shared with the status page, which reports consumers' usage from it.
    let store = Arc::new(store);
    if let (StoreKind::Redis, Some(url)) = (policy.rate_limit.store, redis_url) {
        // Every instance learns of a throttled region from the first 429 any instance sees.
        let cooldowns = RedisCooldowns::connect_lazy(url, &policy.rate_limit.key_prefix)
            .map_err(|e| BuildError(format!("rate_limit.redis_url: {e}")))?;
        failover_layer = failover_layer.on_cooldown(share_cooldowns(cooldowns, pool.clone()));
    }

    let consumer_limits = consumer_limits(policy);
    let metrics = crate::observe::metrics::recorder();
    let observe = ObserveLayer::new(&pool)
        .deployments(policy.deployments.iter().map(|d| d.name.clone()))
        .consumer_label(policy.telemetry.consumer_label)
        .access_log(policy.telemetry.access_log);
    let proxy = ServiceBuilder::new()
        // Outermost: the server span opens on arrival, under the client's traceparent, and ends
        // with the response body, so it covers everything below, rejections included.
        .layer(ServerSpanLayer::new(pool.clone()))
        // Metrics and the access log, from what the layers below leave in the response: above the
        // context capture, so its own rejections (413, 400) are counted too.
        .layer(observe.clone())
        // Read the request once, so every answer below, errors included, carries the request id,
        // and every inner layer sees the deployment and a replayable body.
        .layer(RequestContextLayer::new(policy.gateway.max_body_bytes))
        // Now that the deployment is known: name the server span and run what follows inside it.
        .layer(EnterServerSpanLayer)
        // Authenticate before anything reaches an upstream. It reads the client's key, so it sits
        // above header propagation, which removes that key.
        .layer(ConsumerAuthLayer::new(Arc::new(keys)))
        // Consumer limits: reserve before any upstream work, reconcile with the real usage after.
        // It sits outside header propagation so its x-ratelimit-* headers reach the client.
        .layer(rate_limit_layer(store.clone(), policy, &consumer_limits)?)
        // Only allow-listed headers go upstream (never client credentials) or come back.
        .layer(PropagateHeadersLayer::new(header_rules(&policy.headers)?))
        // Innermost policy: choose a backend, replay the request as a new one, fail over.
        .layer(failover_layer)
        // Each attempt runs in its own client span: its backend gets that span's traceparent.
        .layer(InjectTraceContextLayer)
        .service(ReqwestClient::new());

    let draining = Arc::new(AtomicBool::new(false));
    let ready = {
        let pool = pool.clone();
        let draining = draining.clone();
        move || readyz(pool.clone(), draining.clone())
    };
    let mut admin = Admin::new(pool.clone(), store, observe.latency(), metrics.clone())
        .key(secrets.admin_key.clone());
    for (name, limits) in consumer_limits {
        admin = admin.consumer(&name, limits);
    }
    let not_found = || async {
        azure_error::<axum::body::Body>(StatusCode::NOT_FOUND, "404", "Resource not found")
    };
    let mut router = Router::new()
        .route_service("/openai/{*path}", proxy)
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready));
    let admin = match policy.admin.listen {
        Some(listen) => Some(AdminEndpoints {
            listen,
            router: admin.router().fallback(not_found),
        }),
        None => {
            router = router.merge(admin.router());
            None
        }
    };
    Ok(Gateway {
        router: router.fallback(not_found),
        pool,
        draining,
        admin,
        metrics,
    })
}

/// Loads the tokenizers the consumer limits will need, off the request path: the first exactly
/// counted request would otherwise wait ~0.3 s for the tables.
fn warm_up_tokenizers(policy: &Policy) {
    let models: Vec<String> = policy
        .consumers
        .iter()
        .filter(|c| c.limits.is_some() || !c.deployment_limits.is_empty())
        .flat_map(|_| policy.deployments.iter().map(|d| d.model_name().to_owned()))
        .collect();
    if models.is_empty() {
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("tokenizer-warm-up".into())
        .spawn(move || {
            for model in models {
                gateway_core::tokens::encoding_for_model(&model).warm_up();
            }
        });
    if let Err(err) = spawned {
        tracing::warn!(%err, "could not warm up the tokenizers; the first limited request will");
    }
}

/// Each consumer's limits, as the rate-limit layer enforces them and the status page reports them.
fn consumer_limits(policy: &Policy) -> Vec<(String, ConsumerLimits)> {
    policy
        .consumers
        .iter()
        .map(|consumer| {
            let limits = ConsumerLimits {
                all: consumer
                    .limits
                    .as_ref()
                    .map(Limits::from)
                    .unwrap_or_default(),
                per_deployment: consumer
                    .deployment_limits
                    .iter()
                    .map(|(d, l)| (d.clone(), Limits::from(l)))
                    .collect(),
            };
            (consumer.name.clone(), limits)
        })
        .collect()
}

/// The policy's `[rate_limit]` and consumer limits as the rate-limit layer.
fn rate_limit_layer(
    store: Arc<Store>,
    policy: &Policy,
    consumers: &[(String, ConsumerLimits)],
) -> Result<RateLimitLayer<Store>, BuildError> {
    let r = &policy.rate_limit;
    let name = |key: &str, value: &str| {
        HeaderName::from_bytes(value.as_bytes())
            .map_err(|e| BuildError(format!("rate_limit.{key}: {e}")))
    };
    let headers = LimitHeaders {
        remaining_tokens: name("remaining_tokens_header", &r.remaining_tokens_header)?,
        remaining_requests: name("remaining_requests_header", &r.remaining_requests_header)?,
        limit_tokens: name("limit_tokens_header", &r.limit_tokens_header)?,
        limit_requests: name("limit_requests_header", &r.limit_requests_header)?,
        remaining_quota: name("remaining_quota_header", &r.remaining_quota_header)?,
        tokens_consumed: name("tokens_consumed_header", &r.tokens_consumed_header)?,
    };
    let mut layer = RateLimitLayer::new(store)
        .default_completion_tokens(r.default_completion_tokens)
        .on_store_error(match r.on_store_error {
            StoreFailure::FailOpen => OnStoreError::FailOpen,
            StoreFailure::FailClosed => OnStoreError::FailClosed,
        })
        .headers(headers);
    for d in &policy.deployments {
        layer = layer.model(&d.name, d.model_name());
    }
    for (name, limits) in consumers {
        layer = layer.consumer(name, limits.clone());
    }
    Ok(layer)
}

/// The policy's `[headers]` as the propagation layer's rules.
fn header_rules(h: &HeaderSettings) -> Result<HeaderRules, BuildError> {
    let err = |what: &str, e: &dyn std::fmt::Display| BuildError(format!("headers.{what}: {e}"));
    let mut rules = HeaderRules::default();
    if let Some(list) = &h.forward {
        rules = rules.forward(list).map_err(|e| err("forward", &e))?;
    }
    if let Some(list) = &h.return_headers {
        rules = rules.return_headers(list).map_err(|e| err("return", &e))?;
    }
    let action = |a: HeaderAction| match a {
        HeaderAction::Override => ExistsAction::Override,
        HeaderAction::Skip => ExistsAction::Skip,
        HeaderAction::Append => ExistsAction::Append,
        HeaderAction::Delete => ExistsAction::Delete,
    };
    for r in &h.request {
        let value = r.value.as_deref().unwrap_or_default();
        rules = rules
            .set_request(&r.name, value, action(r.action))
            .map_err(|e| err("request", &e))?;
    }
    for r in &h.response {
        let value = r.value.as_deref().unwrap_or_default();
        rules = rules
            .set_response(&r.name, value, action(r.action))
            .map_err(|e| err("response", &e))?;
    }
    Ok(rules)
}

/// Ready while not draining and at least one backend can take traffic.
async fn readyz(pool: Arc<BackendPool>, draining: Arc<AtomicBool>) -> Response {
    if draining.load(Ordering::Relaxed) {
        return (StatusCode::SERVICE_UNAVAILABLE, "draining").into_response();
    }
    let now = Instant::now();
    let any = pool
        .snapshot(now)
        .iter()
        .any(|b| b.state != BackendState::CircuitOpen);
    if any {
        (StatusCode::OK, "ready").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "no backend available").into_response()
    }
}
