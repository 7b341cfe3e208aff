//! Composition: policy in, axum `Router` out.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use gateway_core::policy::{HeaderAction, HeaderSettings, Policy, ResolvedSecrets};
use gateway_core::pool::{Backend, BackendPool, BackendState, PoolSettings};
use gateway_layers::auth::ConsumerKeys;
use gateway_layers::client::ReqwestClient;
use gateway_layers::error::azure_error;
use gateway_layers::failover::FailoverConfig;
use gateway_layers::propagate::{ExistsAction, HeaderRules};
use gateway_layers::{
    ConsumerAuthLayer, FailoverLayer, PropagateHeadersLayer, RequestContextLayer,
};
use http::StatusCode;
use tower::ServiceBuilder;

/// A composed gateway: its router and the shared state worth observing from outside.
#[derive(Clone)]
pub struct Gateway {
    /// Serve this.
    pub router: Router,
    /// Backend health, shared with the failover layer.
    pub pool: Arc<BackendPool>,
    /// Set when shutdown begins, so `/readyz` turns away new traffic.
    pub draining: Arc<AtomicBool>,
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

    let failover = FailoverConfig {
        max_attempts: policy.failover.max_attempts,
        deadline: Duration::from_millis(policy.failover.deadline_ms),
        response_header_timeout: Duration::from_millis(policy.failover.response_header_timeout_ms),
        failover_on: policy.failover.on_status.clone(),
        max_body_bytes: policy.gateway.max_body_bytes,
    };

    let proxy = ServiceBuilder::new()
        // Outermost: read the request once, so every answer below, errors included, carries the
        // request id, and every inner layer sees the deployment and a replayable body.
        .layer(RequestContextLayer::new(policy.gateway.max_body_bytes))
        // Authenticate before anything reaches an upstream. It reads the client's key, so it sits
        // above header propagation, which removes that key.
        .layer(ConsumerAuthLayer::new(Arc::new(keys)))
        // Only allow-listed headers go upstream (never client credentials) or come back.
        .layer(PropagateHeadersLayer::new(header_rules(&policy.headers)?))
        // Innermost policy: choose a backend, replay the request as a new one, fail over.
        .layer(FailoverLayer::new(pool.clone(), failover))
        .service(ReqwestClient::new());

    let draining = Arc::new(AtomicBool::new(false));
    let ready = {
        let pool = pool.clone();
        let draining = draining.clone();
        move || readyz(pool.clone(), draining.clone())
    };
    let router = Router::new()
        .route_service("/openai/{*path}", proxy)
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .fallback(|| async {
            azure_error::<axum::body::Body>(StatusCode::NOT_FOUND, "404", "Resource not found")
        });
    Ok(Gateway {
        router,
        pool,
        draining,
    })
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
