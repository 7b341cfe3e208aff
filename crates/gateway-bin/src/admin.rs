//! Operator endpoints: `/metrics` for Prometheus, `/admin/status` (the live state as JSON) and
//! `/admin` (a dependency-free page that shows it and refreshes itself every second).
//!
//! They are served on the main listener, or on their own when the policy sets `admin.listen`. With
//! `admin.key`, `/admin` and `/admin/status` answer only callers presenting it as `api-key`,
//! `Authorization: Bearer` or `?key=` (the page passes its own `?key=` on to its fetches); others get
//! a 401 in Azure's error shape. `/metrics` stays open for scrapers: put it on an internal
//! `admin.listen` to keep it private.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Query, State};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use gateway_core::limits::{LimitStore, Limits, QuotaPeriod, StoreError, Usage};
use gateway_core::pool::{BackendPool, BackendState, BackendStatus, RemainingQuota};
use gateway_core::secret::Secret;
use gateway_layers::error::azure_error;
use gateway_layers::ratelimit::ConsumerLimits;
use http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::{Deserialize, Serialize};

use crate::app::PolicyVersion;
use crate::observe::{Latency, Rfc3339};
use crate::store::Store;

/// The status page, compiled in: one file, inline CSS and JS, nothing fetched from elsewhere.
const PAGE: &str = include_str!("admin.html");

/// What the operator endpoints read. Build it with [`Admin::new`], then [`Admin::router`].
pub struct Admin {
    pool: Arc<BackendPool>,
    store: Arc<Store>,
    latency: Arc<Latency>,
    metrics: PrometheusHandle,
    key: Option<Secret>,
    /// Each consumer with its limits, as the rate-limit layer enforces them.
    consumers: Vec<(String, ConsumerLimits)>,
    /// The policy being served, when known.
    policy: Option<PolicyVersion>,
}

#[derive(Deserialize)]
struct KeyParam {
    key: Option<String>,
}

#[derive(Serialize)]
struct Status<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    policy: Option<PolicyView>,
    backends: Vec<BackendView<'a>>,
    consumers: Vec<ConsumerView<'a>>,
}

#[derive(Serialize)]
struct BackendView<'a> {
    name: String,
    region: String,
    priority: u32,
    weight: u32,
    deployments: Vec<&'a str>,
    state: &'static str,
    cooldown_remaining_ms: Option<u64>,
    circuit_open_remaining_ms: Option<u64>,
    consecutive_failures: u32,
    window_failures: u32,
    not_found: Vec<String>,
    remaining_tokens: Option<QuotaView>,
    remaining_requests: Option<QuotaView>,
    in_flight: u64,
    ttfb_ms: Option<LatencyView>,
    /// Deployments (the backend's own names) resting after a 429 or a spent request window.
    resting: Vec<RestView>,
    /// The consumers it is reserved for; absent when every consumer shares it.
    #[serde(skip_serializing_if = "Option::is_none")]
    reserved_for: Option<Vec<&'a str>>,
    /// The headroom it keeps for higher tiers; absent when it keeps none.
    #[serde(skip_serializing_if = "Option::is_none")]
    headroom: Option<HeadroomView>,
}

#[derive(Serialize)]
struct HeadroomView {
    /// Per deployment (the backend's own names): the known remaining share and its source.
    remaining: Vec<ShareView>,
    tiers: Vec<TierView>,
}

#[derive(Serialize)]
struct ShareView {
    deployment: String,
    share: f64,
    source: &'static str,
}

#[derive(Serialize)]
struct TierView {
    tier: &'static str,
    keep: f64,
    /// Whether this tier is turned away now.
    spilling: bool,
    /// Requests turned away so far, by reason.
    spills: BTreeMap<&'static str, u64>,
    last_spill: Option<LastSpillView>,
}

#[derive(Serialize)]
struct LastSpillView {
    ago_ms: u64,
    reason: &'static str,
}

#[derive(Serialize)]
struct RestView {
    deployment: String,
    remaining_ms: u64,
    reason: &'static str,
}

#[derive(Serialize)]
struct PolicyView {
    sha256: String,
    #[serde(serialize_with = "display")]
    loaded_at: Rfc3339,
}

#[derive(Serialize)]
struct QuotaView {
    value: u64,
    age_ms: u64,
}

#[derive(Serialize)]
struct LatencyView {
    last: f64,
    ewma: f64,
}

#[derive(Serialize)]
struct ConsumerView<'a> {
    name: &'a str,
    limits: Option<LimitsView>,
    usage: Option<UsageView>,
    deployments: Vec<DeploymentView<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

#[derive(Serialize)]
struct DeploymentView<'a> {
    deployment: &'a str,
    limits: LimitsView,
    usage: Option<UsageView>,
}

#[derive(Serialize)]
struct LimitsView {
    tokens_per_minute: Option<u64>,
    requests_per_minute: Option<u64>,
    token_quota: Option<u64>,
    token_quota_period: Option<&'static str>,
}

#[derive(Serialize)]
struct UsageView {
    tokens_this_minute: u64,
    requests_this_minute: u64,
    quota_tokens_used: u64,
}

// === impl Admin ===

impl Admin {
    /// Endpoints over `pool`, the limit `store`, the observe layer's `latency` and the `metrics`
    /// recorder; unprotected and without consumers until told otherwise.
    pub fn new(
        pool: Arc<BackendPool>,
        store: Arc<Store>,
        latency: Arc<Latency>,
        metrics: PrometheusHandle,
    ) -> Self {
        Self {
            pool,
            store,
            latency,
            metrics,
            key: None,
            consumers: Vec::new(),
            policy: None,
        }
    }

    /// Requires `key` for `/admin` and `/admin/status`.
    pub fn key(mut self, key: Option<Secret>) -> Self {
        self.key = key;
        self
    }

    /// Shows the version of the policy being served (its SHA-256 and load time).
    pub fn policy(mut self, version: PolicyVersion) -> Self {
        self.policy = Some(version);
        self
    }

    /// Reports a consumer's usage against its limits (which may be empty: it is listed all the same).
    pub fn consumer(mut self, name: &str, limits: ConsumerLimits) -> Self {
        self.consumers.push((name.to_owned(), limits));
        self
    }

    /// The routes: `/metrics`, `/admin`, `/admin/status`.
    pub fn router(self) -> Router {
        Router::new()
            .route("/metrics", get(metrics))
            .route("/admin", get(page))
            .route("/admin/status", get(status))
            .with_state(Arc::new(self))
    }

    /// Whether the caller presented the admin key, when there is one. Compared in constant time, so
    /// response timing does not reveal how much of a guess was right.
    fn allows(&self, headers: &HeaderMap, uri: &Uri) -> bool {
        let Some(key) = &self.key else {
            return true;
        };
        // A malformed query string just means no key was given there.
        let param = Query::<KeyParam>::try_from_uri(uri).ok();
        let query = param.as_ref().and_then(|p| p.key.as_deref());
        let header = |name| {
            headers
                .get(name)
                .and_then(|v: &HeaderValue| v.to_str().ok())
        };
        let bearer = header(header::AUTHORIZATION.as_str()).and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        });
        [header("api-key"), bearer, query]
            .into_iter()
            .flatten()
            .any(|given| same(given.as_bytes(), key.expose().as_bytes()))
    }

    async fn status(&self) -> Status<'_> {
        let now = Instant::now();
        let backends = self
            .pool
            .snapshot(now)
            .into_iter()
            .map(|b| self.backend_view(b))
            .collect();
        let mut consumers = Vec::with_capacity(self.consumers.len());
        for c in &self.consumers {
            consumers.push(self.consumer_view(c).await);
        }
        Status {
            policy: self.policy.as_ref().map(|v| PolicyView {
                sha256: v.sha256.clone(),
                loaded_at: Rfc3339(v.loaded_at),
            }),
            backends,
            consumers,
        }
    }

    fn backend_view(&self, b: BackendStatus) -> BackendView<'_> {
        let quota = |q: Option<RemainingQuota>| {
            q.map(|q| QuotaView {
                value: q.value,
                age_ms: millis(q.age),
            })
        };
        BackendView {
            deployments: self
                .pool
                .get(b.id)
                .deployments
                .keys()
                .map(String::as_str)
                .collect(),
            state: state_name(b.state),
            cooldown_remaining_ms: b.cooldown_remaining.map(millis),
            circuit_open_remaining_ms: b.circuit_open_remaining.map(millis),
            consecutive_failures: b.consecutive_failures,
            window_failures: b.window_failures,
            remaining_tokens: quota(b.remaining_tokens),
            remaining_requests: quota(b.remaining_requests),
            in_flight: b.in_flight,
            ttfb_ms: self.latency.get(b.id).map(|r| LatencyView {
                last: r.last.as_micros() as f64 / 1000.0,
                ewma: r.ewma.as_micros() as f64 / 1000.0,
            }),
            name: b.name,
            region: b.region,
            priority: b.priority,
            weight: b.weight,
            not_found: b.not_found,
            headroom: b.headroom.map(|h| HeadroomView {
                remaining: h
                    .remaining
                    .into_iter()
                    .map(|(deployment, share, source)| ShareView {
                        deployment,
                        share,
                        source: source.as_str(),
                    })
                    .collect(),
                tiers: h
                    .tiers
                    .into_iter()
                    .map(|t| TierView {
                        tier: t.tier.as_str(),
                        keep: t.keep,
                        spilling: t.spilling,
                        spills: t.spills.iter().map(|(r, n)| (r.as_str(), *n)).collect(),
                        last_spill: t.last_spill.map(|(ago, reason)| LastSpillView {
                            ago_ms: millis(ago),
                            reason: reason.as_str(),
                        }),
                    })
                    .collect(),
            }),
            reserved_for: self
                .pool
                .reserved_for(b.id)
                .map(|r| r.iter().map(|c| &**c).collect()),
            resting: b
                .resting
                .into_iter()
                .map(|r| RestView {
                    remaining_ms: millis(r.remaining),
                    reason: r.reason.as_str(),
                    deployment: r.deployment,
                })
                .collect(),
        }
    }

    async fn consumer_view<'a>(&self, (name, c): &'a (String, ConsumerLimits)) -> ConsumerView<'a> {
        let mut error = None;
        let mut usage = |result: Result<Usage, StoreError>| match result {
            Ok(u) => Some(UsageView::from(u)),
            Err(e) => {
                error = Some(e.to_string());
                None
            }
        };
        let all = match c.own_check(name) {
            Some(check) => usage(self.store.usage(&check).await),
            None => None,
        };
        let mut deployments = Vec::with_capacity(c.per_deployment.len());
        for (d, limits) in &c.per_deployment {
            let used = match c.deployment_check(name, d) {
                Some(check) => usage(self.store.usage(&check).await),
                None => None,
            };
            deployments.push(DeploymentView {
                deployment: d,
                limits: LimitsView::from(limits),
                usage: used,
            });
        }
        ConsumerView {
            name,
            limits: (!c.all.is_empty()).then(|| LimitsView::from(&c.all)),
            usage: all,
            deployments,
            error,
        }
    }
}

// === impl LimitsView ===

impl From<&Limits> for LimitsView {
    fn from(l: &Limits) -> Self {
        Self {
            tokens_per_minute: l.tokens_per_minute,
            requests_per_minute: l.requests_per_minute,
            token_quota: l.quota.map(|q| q.tokens),
            token_quota_period: l.quota.map(|q| match q.period {
                QuotaPeriod::Hourly => "hourly",
                QuotaPeriod::Daily => "daily",
                QuotaPeriod::Weekly => "weekly",
                QuotaPeriod::Monthly => "monthly",
            }),
        }
    }
}

// === impl UsageView ===

impl From<Usage> for UsageView {
    fn from(u: Usage) -> Self {
        Self {
            tokens_this_minute: u.tokens_this_minute,
            requests_this_minute: u.requests_this_minute,
            quota_tokens_used: u.quota_tokens_used,
        }
    }
}

// === handlers ===

async fn metrics(State(admin): State<Arc<Admin>>) -> Response {
    let text = crate::observe::metrics::render(&admin.metrics, &admin.pool);
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        text,
    )
        .into_response()
}

async fn page(State(admin): State<Arc<Admin>>, headers: HeaderMap, uri: Uri) -> Response {
    if !admin.allows(&headers, &uri) {
        return denied();
    }
    let mut res = Html(PAGE).into_response();
    res.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

async fn status(State(admin): State<Arc<Admin>>, headers: HeaderMap, uri: Uri) -> Response {
    if !admin.allows(&headers, &uri) {
        return denied();
    }
    let mut res = axum::Json(admin.status().await).into_response();
    res.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

fn denied() -> Response {
    azure_error(
        StatusCode::UNAUTHORIZED,
        "401",
        "Access denied due to a missing or invalid admin key. Send the policy's admin.key as the api-key header, as Authorization: Bearer, or as ?key= in the URL.",
    )
}

fn state_name(state: BackendState) -> &'static str {
    match state {
        BackendState::Available => "available",
        BackendState::CoolingDown => "cooling_down",
        BackendState::CircuitOpen => "circuit_open",
        BackendState::HalfOpen => "half_open",
        BackendState::Misconfigured => "misconfigured",
    }
}

fn display<T: std::fmt::Display, S: serde::Serializer>(value: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(value)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Equality in time that depends on the lengths only.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_compare_whole() {
        assert!(same(b"secret", b"secret"));
        assert!(!same(b"secret", b"secreT"));
        assert!(!same(b"secret", b"secret2"));
        assert!(!same(b"", b"x"));
    }
}
