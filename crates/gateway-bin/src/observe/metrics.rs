//! Prometheus metrics: names, the process's recorder, and the per-backend gauges refreshed at scrape.
//!
//! Label values are bounded: deployments and consumers come from the policy (anything else is
//! `_unknown`), backends and regions from the pool, the rest from fixed lists.

use std::sync::OnceLock;
use std::time::Instant;

use gateway_core::pool::{BackendPool, BackendState};
use metrics::{Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Client requests, by `deployment`, `operation`, `consumer` and `status_class` (`2xx`..`5xx`).
pub const REQUESTS: &str = "gateway_requests_total";
/// Time from the request's arrival to the end of its response body, by `deployment`, `operation` and
/// `status_class`.
pub const REQUEST_DURATION: &str = "gateway_request_duration_seconds";
/// Upstream attempts, by `backend`, `region` and `outcome` (`served`, `throttled`, `server_error`,
/// `timeout`, `connect_error`, `auth_failure`, `deployment_not_found`).
pub const UPSTREAM_ATTEMPTS: &str = "gateway_upstream_attempts_total";
/// Attempts that failed and were followed by another, by `reason` (the failed attempt's outcome).
pub const FAILOVERS: &str = "gateway_failovers_total";
/// Time to response headers of each upstream attempt that got an answer, by `backend`.
pub const UPSTREAM_TTFB: &str = "gateway_upstream_ttfb_seconds";
/// Tokens charged, by `kind` (`prompt`, `completion`, and the parts of them `cached_prompt` and
/// `reasoning`), `consumer`, `deployment`, `backend` and `estimated` (`false`: the backend's usage;
/// `true`: the gateway's count of a stream that reported none).
pub const TOKENS: &str = "gateway_tokens_total";
/// Successful answers by `deployment`, the `service_tier` the request asked for (`requested`) and the
/// one the answer says served it (`served`): `auto`, `default`, `flex`, `priority`, `other` (any
/// other value), or `none` (not named). `requested="priority", served="default"` is priority
/// traffic Azure silently served at standard.
pub const SERVICE_TIER: &str = "gateway_service_tier_total";
/// Requests refused by the gateway's own consumer limits, by `consumer` and `limit` (`tokens`,
/// `requests`, `quota`).
pub const LIMIT_REJECTIONS: &str = "gateway_limit_rejections_total";
/// 1 for a backend's current `state` (`available`, `cooling_down`, `circuit_open`, `half_open`), 0
/// for the others, by `backend`, `region` and `state`.
pub const BACKEND_STATE: &str = "gateway_backend_state";
/// Seconds until a cooling backend takes traffic again (0 when it is not cooling down), by `backend`.
pub const BACKEND_COOLDOWN: &str = "gateway_backend_cooldown_seconds";
/// The backend's last reported `x-ratelimit-remaining-tokens`, by `backend`.
pub const BACKEND_REMAINING_TOKENS: &str = "gateway_backend_remaining_tokens";
/// The backend's last reported `x-ratelimit-remaining-requests`, by `backend`.
pub const BACKEND_REMAINING_REQUESTS: &str = "gateway_backend_remaining_requests";
/// Attempts sent to the backend whose response has not ended, by `backend`.
pub const BACKEND_IN_FLIGHT: &str = "gateway_backend_in_flight";
/// Client connections that ended, by `outcome` (`closed`, `header_timeout`, `idle_timeout`,
/// `body_timeout`, `rejected`, `shutdown`, `error`).
pub const CONNECTIONS: &str = "gateway_connections_total";
/// Client connections open now.
pub const CONNECTIONS_OPEN: &str = "gateway_connections_open";
/// Connections and requests refused by admission control, by `reason` (`connections`,
/// `in_flight`, `body_timeout`).
pub const REJECTED: &str = "gateway_rejected_total";
/// Failed `accept` calls on the listener, by `kind` (`descriptors`: out of file descriptors, `other`).
pub const ACCEPT_ERRORS: &str = "gateway_accept_errors_total";
/// Backend selections made in panic mode: every backend serving the deployment was ejected, and the
/// gateway tried them anyway rather than refuse.
pub const PANIC_SELECTIONS: &str = "gateway_panic_selections_total";
/// Counter: requests of a tier turned away from a backend keeping headroom for higher tiers, by
/// `backend`, `tier` and `reason` (`utilization`, `remaining_tokens`, `remaining_requests`,
/// `gateway_count`).
pub const SPILLS: &str = "gateway_spills_total";
/// Gauge: a backend's known remaining share of capacity, by `backend` and `deployment` (its own
/// name); only for backends keeping headroom.
pub const BACKEND_REMAINING_SHARE: &str = "gateway_backend_remaining_share";
/// Time to response headers minus the time spent waiting on upstream attempts: what the gateway
/// itself adds (authentication, limits, routing, reading a JSON answer whole).
pub const OVERHEAD: &str = "gateway_overhead_seconds";

/// From a fast cache-like answer to a long generation.
const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];
/// The gateway's own time is sub-millisecond when all is well.
const OVERHEAD_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

const STATES: [(BackendState, &str); 5] = [
    (BackendState::Available, "available"),
    (BackendState::CoolingDown, "cooling_down"),
    (BackendState::CircuitOpen, "circuit_open"),
    (BackendState::HalfOpen, "half_open"),
    (BackendState::Misconfigured, "misconfigured"),
];

static RECORDER: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process's Prometheus recorder, installed as the global `metrics` recorder on first use.
///
/// Metrics are process-wide by nature of the `metrics` facade: several gateways built in one process
/// (as in tests) share it. If another global recorder was installed first, this returns a handle of
/// an unused recorder, so `/metrics` stays valid but empty, and says so in the log.
pub fn recorder() -> PrometheusHandle {
    RECORDER
        .get_or_init(|| {
            let installed = builder().and_then(PrometheusBuilder::install_recorder);
            match installed {
                Ok(handle) => {
                    describe();
                    handle
                }
                Err(err) => {
                    tracing::warn!(error = %err, "cannot install the Prometheus recorder; /metrics will be empty");
                    PrometheusBuilder::new().build_recorder().handle()
                }
            }
        })
        .clone()
}

/// Renders the exposition text, after refreshing the per-backend gauges from `pool`.
pub fn render(handle: &PrometheusHandle, pool: &BackendPool) -> String {
    for b in pool.snapshot(Instant::now()) {
        let (backend, region) = (b.name, b.region);
        for (state, name) in STATES {
            gauge!(BACKEND_STATE, "backend" => backend.clone(), "region" => region.clone(), "state" => name)
                .set(if b.state == state { 1.0 } else { 0.0 });
        }
        gauge!(BACKEND_COOLDOWN, "backend" => backend.clone())
            .set(b.cooldown_remaining.map_or(0.0, |d| d.as_secs_f64()));
        // Unknown until the backend has reported them: no series rather than a made-up value.
        if let Some(q) = b.remaining_tokens {
            gauge!(BACKEND_REMAINING_TOKENS, "backend" => backend.clone()).set(q.value as f64);
        }
        if let Some(q) = b.remaining_requests {
            gauge!(BACKEND_REMAINING_REQUESTS, "backend" => backend.clone()).set(q.value as f64);
        }
        if let Some(headroom) = b.headroom {
            // Counted by the pool, which owns them: exported as they stand.
            for tier in headroom.tiers {
                for (reason, n) in tier.spills {
                    counter!(SPILLS, "backend" => backend.clone(), "tier" => tier.tier.as_str(), "reason" => reason.as_str())
                        .absolute(n);
                }
            }
            for (deployment, share, _) in headroom.remaining {
                gauge!(BACKEND_REMAINING_SHARE, "backend" => backend.clone(), "deployment" => deployment)
                    .set(share);
            }
        }
        gauge!(BACKEND_IN_FLIGHT, "backend" => backend).set(b.in_flight as f64);
    }
    counter!(PANIC_SELECTIONS).absolute(pool.panic_selections());
    handle.render()
}

fn builder() -> Result<PrometheusBuilder, metrics_exporter_prometheus::BuildError> {
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(OVERHEAD.into()), OVERHEAD_BUCKETS)?
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
}

fn describe() {
    describe_counter!(REQUESTS, Unit::Count, "Client requests.");
    describe_histogram!(
        REQUEST_DURATION,
        Unit::Seconds,
        "Time from a request's arrival to the end of its response body."
    );
    describe_counter!(UPSTREAM_ATTEMPTS, Unit::Count, "Upstream attempts.");
    describe_counter!(
        SPILLS,
        Unit::Count,
        "Requests of a tier turned away from a backend keeping headroom for higher tiers."
    );
    describe_gauge!(
        BACKEND_REMAINING_SHARE,
        "A backend deployment's known remaining share of capacity."
    );
    describe_counter!(
        FAILOVERS,
        Unit::Count,
        "Attempts that failed and were followed by another, by the failed attempt's outcome."
    );
    describe_histogram!(
        UPSTREAM_TTFB,
        Unit::Seconds,
        "Time to response headers of upstream attempts that got an answer."
    );
    describe_counter!(
        TOKENS,
        Unit::Count,
        "Tokens charged: the backends' usage, or the gateway's count when a stream reported none."
    );
    describe_counter!(
        SERVICE_TIER,
        Unit::Count,
        "Successful answers by the service tier requested and the one that served them."
    );
    describe_counter!(
        CONNECTIONS,
        Unit::Count,
        "Client connections that ended, by outcome."
    );
    describe_gauge!(
        CONNECTIONS_OPEN,
        Unit::Count,
        "Client connections open now."
    );
    describe_counter!(
        REJECTED,
        Unit::Count,
        "Connections and requests refused by admission control, by reason."
    );
    describe_counter!(
        ACCEPT_ERRORS,
        Unit::Count,
        "Failed accepts on the listener (descriptors: out of file descriptors)."
    );
    describe_counter!(
        PANIC_SELECTIONS,
        Unit::Count,
        "Selections made while every backend for the deployment was ejected (panic mode)."
    );
    describe_counter!(
        LIMIT_REJECTIONS,
        Unit::Count,
        "Requests refused by the gateway's own consumer limits."
    );
    describe_gauge!(
        BACKEND_STATE,
        "1 for the backend's current state, 0 for the others."
    );
    describe_gauge!(
        BACKEND_COOLDOWN,
        Unit::Seconds,
        "Time until a cooling backend takes traffic again."
    );
    describe_gauge!(
        BACKEND_REMAINING_TOKENS,
        "The backend's last reported x-ratelimit-remaining-tokens."
    );
    describe_gauge!(
        BACKEND_REMAINING_REQUESTS,
        "The backend's last reported x-ratelimit-remaining-requests."
    );
    describe_gauge!(
        BACKEND_IN_FLIGHT,
        "Attempts sent to the backend whose response has not ended."
    );
    describe_histogram!(
        OVERHEAD,
        Unit::Seconds,
        "Time to response headers minus the time spent waiting on upstream attempts."
    );
}
