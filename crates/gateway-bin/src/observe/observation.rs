//! What the observer keeps of a request from its response headers to the end of its body.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use gateway_layers::record::{End, Record, ServiceTier};
use metrics::{SharedString, counter, histogram};

use super::metrics::{REQUEST_DURATION, REQUESTS, SERVICE_TIER, TOKENS};
use super::{Shared, UNKNOWN, access_log};

/// What the end of a request needs besides its [`Record`], taken when its headers were ready.
pub(super) struct Observation {
    pub(super) shared: Arc<Shared>,
    pub(super) start: Instant,
    pub(super) wall: SystemTime,
    pub(super) ttfb: Duration,
    pub(super) overhead: Duration,
    pub(super) status: u16,
    /// The deployment's label value (`_unknown` when not in the policy).
    pub(super) deployment: SharedString,
    /// The name the client used, when it is not in the policy.
    pub(super) undeclared: Option<String>,
    /// The peer's address, when the server recorded it.
    pub(super) client: Option<IpAddr>,
}

// === impl Observation ===

impl Observation {
    /// Counts the request and writes its access log line: `record` is what happened to it (`None`
    /// when no context layer ran inside the observer).
    pub(super) fn finish(self, record: Option<&Record>, end: End) {
        let total = self.start.elapsed();
        let shared = &self.shared;
        let class = status_class(self.status);
        let consumer = shared.consumer(record.and_then(Record::consumer));
        let operation = record
            .and_then(Record::request)
            .map_or(UNKNOWN, |r| r.operation.as_str());
        counter!(
            REQUESTS,
            "deployment" => self.deployment.clone(),
            "operation" => operation,
            "consumer" => consumer.clone(),
            "status_class" => class,
        )
        .increment(1);
        histogram!(
            REQUEST_DURATION,
            "deployment" => self.deployment.clone(),
            "operation" => operation,
            "status_class" => class,
        )
        .record(total.as_secs_f64());
        // What the call was charged, the figure the consumer's limits counted: the backend's usage,
        // or the gateway's measure of a stream that never told it.
        if let Some(charge) = record.and_then(Record::charged) {
            let backend = self
                .served_by(record)
                .map_or(SharedString::const_str(UNKNOWN), |b| b.name.clone());
            let usage = charge.usage;
            let estimated = if charge.estimated { "true" } else { "false" };
            // Cached and reasoning tokens are parts of prompt and completion, split out as API
            // Management does; only when the backend reported some.
            let kinds = [
                ("prompt", usage.prompt),
                ("completion", usage.completion),
                ("cached_prompt", usage.cached_prompt),
                ("reasoning", usage.reasoning),
            ];
            for (i, (kind, n)) in kinds.into_iter().enumerate() {
                if i >= 2 && n == 0 {
                    continue;
                }
                counter!(
                    TOKENS,
                    "kind" => kind,
                    "consumer" => consumer.clone(),
                    "deployment" => self.deployment.clone(),
                    "backend" => backend.clone(),
                    "estimated" => estimated,
                )
                .increment(n);
            }
        }
        if let Some(record) = record.filter(|_| class == "2xx") {
            let requested = record.request().and_then(|r| r.service_tier);
            counter!(
                SERVICE_TIER,
                "deployment" => self.deployment.clone(),
                "requested" => tier_label(requested),
                "served" => tier_label(record.service_tier()),
            )
            .increment(1);
        }
        if shared.access_log {
            access_log::write(&self, record, end, total);
        }
    }

    /// The labels of the backend whose answer the client got, if one did.
    pub(super) fn served_by(&self, record: Option<&Record>) -> Option<&super::BackendLabels> {
        let id = record?.failover()?.served_by?;
        self.shared.backend(id)
    }
}

/// A tier's label value: its name, or `none` when not named.
pub(super) fn tier_label(tier: Option<ServiceTier>) -> &'static str {
    tier.map_or("none", |t| t.as_str())
}

fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}
