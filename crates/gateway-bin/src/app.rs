//! Composition: policy in, axum `Router` out.
//!
//! This is the one place where the policy file becomes engine values and layer arguments, as
//! linkerd's `app` crate does: [`build`] composes the stack top to bottom, and the functions below it
//! translate each policy section. `gateway-core` and `gateway-layers` never see a policy type.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::routing::get;
use gateway_core::limits::{Limits, MemoryStore, Quota, RedisStore};
use gateway_core::pool::{
    Backend, BackendPool, CircuitSettings, Headroom, PoolSettings, RedisCooldowns, Tier,
};
use gateway_layers::auth::ConsumerKeys;
use gateway_layers::client::ReqwestClient;
use gateway_layers::entra::{EntraAuthLayer, EntraConfig, EntraValidator};
use gateway_layers::error::azure_error;
use gateway_layers::failover::FlexFallback;
use gateway_layers::propagate::{ExistsAction, HeaderRules};
use gateway_layers::ratelimit::{ConsumerLimits, LimitHeaders, OnStoreError};
use gateway_layers::{
    ConsumerAuthLayer, FailoverLayer, PropagateHeadersLayer, RateLimitLayer, RequestContextLayer,
};
use gateway_policy::{
    CircuitBreakerSettings, EntraSettings, FailoverSettings, FlexFallbackSpec, GatewaySettings,
    HeaderAction, HeaderSettings, LimitsSpec, Policy, ResolvedSecrets, StoreFailure, StoreKind,
    TierSpec,
};
use http::{HeaderName, StatusCode};
use metrics_exporter_prometheus::PrometheusHandle;
use tower::ServiceBuilder;

use crate::admin::Admin;
use crate::health;
use crate::observe::ObserveLayer;
use crate::serve::Admission;
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
    /// The policy's listen address (`gateway.listen`), unless the command line overrides it.
    pub listen: SocketAddr,
    /// How long in-flight requests may run after shutdown begins (`gateway.shutdown_grace_seconds`).
    pub shutdown_grace: Duration,
    /// How long new connections are still accepted, `/readyz` answering 503, once shutdown begins
    /// (`gateway.drain_seconds`).
    pub drain: Duration,
    /// Client timeouts and limits (`[gateway]`).
    pub admission: Admission,
    /// The consumer limits, shared with the stack: [`RateLimitLayer::settled`] awaits the accounting
    /// of streams that ended.
    pub rate_limit: RateLimitLayer<Store>,
    /// Serve HTTPS with this (`gateway.tls`, loaded by [`crate::tls::load`]); plain HTTP when `None`.
    pub tls: Option<Arc<crate::tls::Tls>>,
    /// The policy this gateway was built from, as `/admin/status` shows it.
    pub version: PolicyVersion,
    /// The renewals of this gateway's Entra ID tokens and Key Vault values, when a reload started
    /// them: they stop when the last request on this gateway ends.
    pub refreshers: Option<Arc<crate::identity::Refreshers>>,
    /// What a gateway built on reload takes over from this one ([`build_from`]).
    handover: Handover,
}

/// The operator endpoints, to be served on their own listener.
#[derive(Clone)]
pub struct AdminEndpoints {
    /// Where to listen (`admin.listen`).
    pub listen: SocketAddr,
    /// Serve this there.
    pub router: Router,
    /// Serve HTTPS there with this (`admin.tls`); plain HTTP when `None`.
    pub tls: Option<Arc<crate::tls::Tls>>,
}

/// Which loaded policy a gateway serves: the SHA-256 of the policy file's bytes (what `sha256sum`
/// prints) and when it was loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyVersion {
    /// Lower-case hex SHA-256 of the policy text.
    pub sha256: String,
    /// When the gateway was built from it.
    pub loaded_at: SystemTime,
}

/// What a gateway built on reload may take over: the limit store when it is configured the same
/// way, and the task that applies other instances' cooldowns, which ends with this gateway.
#[derive(Clone)]
struct Handover {
    store: Arc<Store>,
    store_identity: StoreIdentity,
    _cooldown_listener: Option<Arc<AbortOnDrop>>,
}

/// The part of `[rate_limit]` that decides where counters live.
#[derive(Clone, PartialEq, Eq)]
struct StoreIdentity {
    kind: StoreKind,
    redis_url: Option<String>,
    key_prefix: String,
}

/// Aborts a background task when the last gateway that needs it is dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl PolicyVersion {
    /// The version of `policy`, loaded now.
    pub fn of(policy: &Policy) -> Self {
        Self {
            sha256: sha256_hex(policy.source.text().as_bytes()),
            loaded_at: SystemTime::now(),
        }
    }
}

/// Lower-case hex SHA-256, from the crypto library rustls already links.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes);
    digest
        .as_ref()
        .iter()
        .fold(String::with_capacity(64), |mut hex, b| {
            let _ = write!(hex, "{b:02x}");
            hex
        })
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

/// The engine's tier for the policy's.
fn tier_of(tier: TierSpec) -> Tier {
    match tier {
        TierSpec::Critical => Tier::Critical,
        TierSpec::Standard => Tier::Standard,
        TierSpec::Low => Tier::Low,
    }
}

/// Builds the gateway for `policy`, whose secrets are already resolved.
pub fn build(policy: &Policy, secrets: &ResolvedSecrets) -> Result<Gateway, BuildError> {
    build_from(policy, secrets, None)
}

/// Builds the gateway for `policy`, taking over `previous`'s state when the policy is reloaded:
/// backend health and rests for the backends still in the policy (same name and endpoint), the
/// consumers' counters when the limit store is configured the same way, and the draining flag.
/// Requests in flight keep the stack they started on; nothing of `previous` is changed.
pub fn build_from(
    policy: &Policy,
    secrets: &ResolvedSecrets,
    previous: Option<&Gateway>,
) -> Result<Gateway, BuildError> {
    let mut pool = BackendPool::new(
        backends(policy, secrets)?,
        pool_settings(&policy.failover, &policy.circuit),
    );
    if let Some(previous) = previous {
        pool = pool.take_over(&previous.pool);
    }
    // Per-workload routes: a reserved backend is left out of every other consumer's selection.
    // Application priority: a backend's headroom is kept from the tiers below its shares.
    let pool = policy.backends.iter().fold(pool, |pool, b| {
        let pool = match &b.reserved_for {
            Some(consumers) => pool.reserve(&b.name, consumers.iter().map(String::as_str)),
            None => pool,
        };
        match &b.headroom {
            Some(spec) => {
                // Azure grants 6 requests per minute per 1,000 TPM of quota: without an `rpm`,
                // that is the request capacity the remaining-requests header is measured against.
                let rpm = b.rpm.or(b.tpm.map(|tpm| tpm.saturating_mul(6) / 1000));
                let headroom = spec.shares().fold(
                    Headroom::new().limits(b.tpm, rpm),
                    |headroom, (tier, share)| headroom.keep(tier_of(tier), share),
                );
                pool.keep_headroom(&b.name, headroom)
            }
            None => pool,
        }
    });
    let consumer_tiers = policy
        .consumers
        .iter()
        .map(|c| (c.name.as_str(), tier_of(c.tier)));
    let pool = Arc::new(pool.tiers(consumer_tiers));

    let keys = policy.consumers.iter().zip(&secrets.consumers).fold(
        ConsumerKeys::new(),
        |keys, (spec, secrets)| {
            keys.consumer(
                &spec.name,
                secrets.iter().map(|s| s.expose()),
                spec.deployments.clone(),
            )
            .token_ids(&spec.name, &spec.entra_app_ids, &spec.entra_object_ids)
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
        ))
        .throttle_wait(Duration::from_millis(policy.failover.throttle_wait_ms))
        .flex_fallback(match policy.failover.flex_fallback {
            FlexFallbackSpec::DefaultTier => FlexFallback::DefaultTier,
            FlexFallbackSpec::NextBackend => FlexFallback::NextBackend,
        });

    warm_up_tokenizers(policy);
    let redis_url = secrets.redis_url.as_ref().map(|s| s.expose());
    let store_identity = StoreIdentity {
        kind: policy.rate_limit.store,
        redis_url: redis_url.map(str::to_owned),
        key_prefix: policy.rate_limit.key_prefix.clone(),
    };
    // Counters live in the store: a reload that keeps it keeps every consumer's usage.
    let kept = previous
        .map(|p| &p.handover)
        .filter(|h| h.store_identity == store_identity)
        .map(|h| h.store.clone());
    let store = match (kept, policy.rate_limit.store, redis_url) {
        (Some(store), _, _) => store,
        (None, StoreKind::Redis, Some(url)) => Arc::new(Store::Redis(
            RedisStore::connect_lazy(url, &policy.rate_limit.key_prefix)
                .map_err(|e| BuildError(format!("rate_limit.redis_url: {e}")))?,
        )),
        // Shared with the status page, which reports consumers' usage from it.
        (None, _, _) => Arc::new(Store::Memory(MemoryStore::new())),
    };
    let mut cooldown_listener = None;
    if let (StoreKind::Redis, Some(url)) = (policy.rate_limit.store, redis_url) {
        // Every instance learns of a throttled region from the first 429 any instance sees.
        let cooldowns = RedisCooldowns::connect_lazy(url, &policy.rate_limit.key_prefix)
            .map_err(|e| BuildError(format!("rate_limit.redis_url: {e}")))?;
        let (hook, listener) = share_cooldowns(cooldowns, pool.clone());
        failover_layer = failover_layer.on_cooldown(hook);
        cooldown_listener = Some(Arc::new(AbortOnDrop(listener)));
    }

    let consumer_limits = consumer_limits(policy);
    let rate_limit = rate_limit_layer(store.clone(), policy, &consumer_limits)?;
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
        // Authenticate before anything reaches an upstream. Both read the client's credential, so
        // they sit above header propagation, which removes it. A verified Entra ID token leaves the
        // caller's identity for the consumer lookup below it.
        .option_layer(policy.gateway.entra.as_ref().map(entra_layer))
        .layer(ConsumerAuthLayer::new(Arc::new(keys)))
        // Consumer limits: reserve before any upstream work, reconcile with the real usage after.
        // It sits outside header propagation so its x-ratelimit-* headers reach the client.
        .layer(rate_limit.clone())
        // Only allow-listed headers go upstream (never client credentials) or come back.
        .layer(PropagateHeadersLayer::new(header_rules(&policy.headers)?))
        // Innermost policy: choose a backend, replay the request as a new one, fail over.
        .layer(failover_layer)
        // Each attempt runs in its own client span: its backend gets that span's traceparent.
        .layer(InjectTraceContextLayer)
        .service(upstream_client(policy)?);

    let draining = previous.map_or_else(Arc::default, |p| p.draining.clone());
    let version = PolicyVersion::of(policy);
    let ready = {
        let draining = draining.clone();
        move || health::readyz(draining.clone())
    };
    let backend_health = {
        let pool = pool.clone();
        move || health::backends(pool.clone())
    };
    let mut admin = Admin::new(
        pool.clone(),
        store.clone(),
        observe.latency(),
        metrics.clone(),
    )
    .key(secrets.admin_key.clone())
    .policy(version.clone());
    for (name, limits) in consumer_limits {
        admin = admin.consumer(&name, limits);
    }
    let not_found = || async {
        azure_error::<axum::body::Body>(StatusCode::NOT_FOUND, "404", "Resource not found")
    };
    let mut router = Router::new()
        .route_service("/openai/{*path}", proxy)
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .route("/healthz/backends", get(backend_health));
    let admin = match policy.admin.listen {
        Some(listen) => Some(AdminEndpoints {
            listen,
            router: admin.router().fallback(not_found),
            tls: None,
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
        listen: policy.gateway.listen,
        shutdown_grace: Duration::from_secs(policy.gateway.shutdown_grace_seconds),
        drain: Duration::from_secs(policy.gateway.drain_seconds),
        admission: admission(&policy.gateway),
        rate_limit,
        tls: None,
        version,
        refreshers: None,
        handover: Handover {
            store,
            store_identity,
            _cooldown_listener: cooldown_listener,
        },
    })
}

/// `[gateway.entra]` as the token-checking layer.
fn entra_layer(entra: &EntraSettings) -> EntraAuthLayer {
    let config = EntraConfig::new(&entra.tenant, entra.audiences.iter().cloned())
        .authority(&entra.authority)
        .issuers(entra.accepted_issuers())
        .clock_skew(Duration::from_secs(entra.clock_skew_seconds))
        .key_refresh_min(Duration::from_secs(entra.key_refresh_min_seconds));
    EntraAuthLayer::new(Arc::new(EntraValidator::new(config)))
}

/// Client timeouts and limits from `[gateway]`.
fn admission(gateway: &GatewaySettings) -> Admission {
    Admission {
        header_read_timeout: Duration::from_millis(gateway.header_read_timeout_ms),
        body_timeout: Duration::from_millis(gateway.body_timeout_ms),
        idle_timeout: Duration::from_millis(gateway.idle_timeout_ms),
        max_connections: gateway.max_connections,
        max_in_flight: gateway.max_in_flight,
    }
}

/// The policy's backends, each with its resolved credential (parallel to `policy.backends`).
/// The client every backend is called with: the system's CA roots, plus `upstream.ca_file`'s.
fn upstream_client(policy: &Policy) -> Result<ReqwestClient, BuildError> {
    let roots = crate::tls::upstream_roots(policy).map_err(BuildError)?;
    let what = if roots.is_empty() {
        "the upstream HTTP client cannot start"
    } else {
        "upstream.ca_file: the upstream HTTP client cannot start with these certificates"
    };
    let client = ReqwestClient::builder()
        .tls_certs_merge(roots)
        .build()
        .map_err(|e| BuildError(format!("{what}: {}", gateway_layers::client::Chain(&e))))?;
    Ok(ReqwestClient::from_client(client))
}

fn backends(policy: &Policy, secrets: &ResolvedSecrets) -> Result<Vec<Backend>, BuildError> {
    let mut backends = Vec::with_capacity(policy.backends.len());
    for (spec, credential) in policy.backends.iter().zip(&secrets.backends) {
        // A credential that cannot be a header value would silently go unsent: refuse it at start-up.
        // (An Entra ID token not fetched yet has no value to check.)
        let value = credential.current();
        let value = value.as_ref().map_or("x", |v| v.expose());
        if value.is_empty() || value.bytes().any(|b| b.is_ascii_control()) {
            return Err(BuildError(format!(
                "backends `{}`: its credential holds characters that cannot be sent in a header",
                spec.name
            )));
        }
        backends.push(Backend {
            name: spec.name.clone(),
            region: spec.region.clone(),
            endpoint: spec.endpoint.clone(),
            priority: spec.priority,
            weight: spec.weight,
            deployments: spec.deployments.clone(),
            credential: Some(credential.clone()),
        });
    }
    Ok(backends)
}

/// Cooldowns and circuit breakers from `[failover]` and `[circuit]`. A half-open probe is
/// given the response header timeout to answer.
fn pool_settings(failover: &FailoverSettings, circuit: &CircuitBreakerSettings) -> PoolSettings {
    PoolSettings {
        default_cooldown: Duration::from_millis(failover.default_cooldown_ms),
        max_cooldown: Duration::from_millis(failover.max_cooldown_ms),
        circuit: CircuitSettings {
            failure_percentage: circuit.failure_percentage,
            request_volume: circuit.request_volume,
            consecutive_failures: circuit.consecutive_failures,
            interval: Duration::from_secs(circuit.interval_seconds),
            base_ejection: Duration::from_secs(circuit.base_ejection_seconds),
            max_ejection: Duration::from_secs(circuit.max_ejection_seconds),
            max_ejection_percent: circuit.max_ejection_percent,
        },
        probe_timeout: Duration::from_millis(failover.response_header_timeout_ms),
        // Not in the policy: the engine's default.
        ..PoolSettings::default()
    }
}

/// A `[consumers.limits]` (or `deployment_limits`) table as engine limits. A quota needs both its
/// size and its period (validation sees to it).
fn limits(spec: &LimitsSpec) -> Limits {
    Limits {
        tokens_per_minute: spec.tokens_per_minute,
        requests_per_minute: spec.requests_per_minute,
        quota: spec
            .token_quota
            .zip(spec.token_quota_period)
            .map(|(tokens, period)| Quota { tokens, period }),
    }
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
            // Together: the memory tiktoken takes while loading is returned once, for all.
            gateway_core::tokens::Encoding::warm_up_all(
                models
                    .iter()
                    .map(|m| gateway_core::tokens::encoding_for_model(m)),
            );
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
            let consumer_limits = ConsumerLimits {
                all: consumer.limits.as_ref().map(limits).unwrap_or_default(),
                per_deployment: consumer
                    .deployment_limits
                    .iter()
                    .map(|(d, l)| (d.clone(), limits(l)))
                    .collect(),
            };
            (consumer.name.clone(), consumer_limits)
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

#[cfg(test)]
mod tests {
    use gateway_core::limits::QuotaPeriod;
    use gateway_core::secret::{Credential, Secret};

    use super::*;

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn pool_settings_from_the_policy() {
        let failover = FailoverSettings {
            default_cooldown_ms: 1_500,
            max_cooldown_ms: 120_000,
            response_header_timeout_ms: 20_000,
            ..FailoverSettings::default()
        };
        let circuit = CircuitBreakerSettings {
            failure_percentage: 30,
            request_volume: 40,
            consecutive_failures: 4,
            interval_seconds: 15,
            base_ejection_seconds: 45,
            max_ejection_seconds: 90,
            max_ejection_percent: 34,
        };
        assert_eq!(
            pool_settings(&failover, &circuit),
            PoolSettings {
                default_cooldown: Duration::from_millis(1_500),
                max_cooldown: secs(120),
                circuit: CircuitSettings {
                    failure_percentage: 30,
                    request_volume: 40,
                    consecutive_failures: 4,
                    interval: secs(15),
                    base_ejection: secs(45),
                    max_ejection: secs(90),
                    max_ejection_percent: 34,
                },
                probe_timeout: secs(20),
                not_found_cooldown: secs(300),
            }
        );
    }

    /// The engine's defaults are written out in `gateway-core`; they must be the policy's.
    #[test]
    fn the_engine_defaults_are_the_policy_defaults() {
        assert_eq!(
            pool_settings(
                &FailoverSettings::default(),
                &CircuitBreakerSettings::default()
            ),
            PoolSettings::default()
        );
    }

    #[test]
    fn backends_carry_their_credentials() {
        let policy = Policy::from_toml_str(
            r#"
[[deployments]]
name = "gpt-4o"

[[backends]]
name = "swc"
region = "Sweden Central"
endpoint = "https://swc.openai.azure.com"
priority = 2
weight = 5
api_key = "env:KEY"
deployments = { gpt-4o = "gpt-4o-swc" }
"#,
            "test.toml",
        )
        .unwrap();
        let secrets = |value: &str| ResolvedSecrets {
            backends: vec![Credential::ApiKey(Secret::new(value))],
            consumers: vec![],
            redis_url: None,
            admin_key: None,
            ..ResolvedSecrets::default()
        };
        let built = backends(&policy, &secrets("k-1")).unwrap();
        assert_eq!(built[0].name, "swc");
        assert_eq!((built[0].priority, built[0].weight), (2, 5));
        assert_eq!(built[0].deployment_name("gpt-4o"), Some("gpt-4o-swc"));
        assert_eq!(
            built[0].credential,
            Some(Credential::ApiKey(Secret::new("k-1")))
        );
        let refused = backends(&policy, &secrets("k\n1")).unwrap_err();
        assert!(refused.0.contains("backends `swc`"), "{refused}");
    }

    #[test]
    fn limits_need_a_quota_and_its_period() {
        let spec = LimitsSpec {
            tokens_per_minute: Some(1_000),
            requests_per_minute: None,
            token_quota: Some(50_000),
            token_quota_period: Some(QuotaPeriod::Daily),
        };
        assert_eq!(
            limits(&spec),
            Limits {
                tokens_per_minute: Some(1_000),
                requests_per_minute: None,
                quota: Some(Quota {
                    tokens: 50_000,
                    period: QuotaPeriod::Daily
                }),
            }
        );
        let no_period = LimitsSpec {
            token_quota_period: None,
            ..spec
        };
        assert_eq!(limits(&no_period).quota, None);
        assert!(limits(&LimitsSpec::default()).is_empty());
    }
}
