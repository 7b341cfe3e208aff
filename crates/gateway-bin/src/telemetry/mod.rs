//! Logs and traces: the `tracing` subscriber, and OpenTelemetry traces exported over OTLP/HTTP.
//!
//! [`init`] installs one subscriber for the process: log lines on stderr (`RUST_LOG`, `info` by
//! default), and, when an OTLP endpoint is configured, an OpenTelemetry layer that turns the gateway's
//! spans into OTLP spans. Each request gets a server span ([`ServerSpanLayer`]), each upstream attempt a
//! client span (made by the failover layer), and every attempt carries the attempt span's
//! `traceparent` to its backend ([`InjectTraceContext`]).
//!
//! Spans leave the process from a background thread in batches. Its queue is bounded: when the
//! collector is down or slow, spans are dropped and counted (`gateway_spans_dropped_total`), and a
//! request never waits for the exporter.

mod export;
mod inject;
mod server;

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Duration;

use gateway_policy::TelemetrySettings;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::Level;
use tracing_subscriber::filter::{EnvFilter, FilterExt, Targets, filter_fn};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, fmt};

pub use inject::{InjectTraceContext, InjectTraceContextLayer};
pub use server::{
    EnterServerSpan, EnterServerSpanLayer, ResponseFuture, ServerSpan, ServerSpanLayer,
};

/// Longest wait for the last spans to leave at shutdown: a dead collector must not hold up exit.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// The installed telemetry; call [`Telemetry::shutdown`] before the process exits.
#[derive(Debug)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
    backlog: Arc<export::Backlog>,
}

/// Installs the process-wide subscriber: logs on stderr, and trace export when `settings` or the
/// standard `OTEL_EXPORTER_OTLP_*` variables name an endpoint.
///
/// Call once, at start-up, inside the Tokio runtime.
pub fn init(settings: &TelemetrySettings) -> Result<Telemetry, String> {
    let backlog = Arc::new(export::Backlog::default());
    let provider = match traces_endpoint(settings) {
        Endpoint::None => None,
        endpoint => Some(provider(settings, endpoint, backlog.clone())?),
    };
    let otel = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("aoai-gateway"))
            // The gateway's own attributes say what matters; source locations and thread names do not.
            .with_location(false)
            .with_threads(false)
            .with_target(false)
            .with_tracked_inactivity(false)
            // Only the gateway's spans and the events inside them: never the HTTP stack underneath,
            // which the exporter itself uses (its events would feed back into the export).
            .with_filter(
                Targets::new()
                    .with_target("gateway_bin", Level::INFO)
                    .with_target("gateway_layers", Level::INFO),
            )
    });
    let env = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Log lines stay as they were: spans are for traces, and their many attributes would prefix every
    // line. RUST_LOG governs the logs only, so `RUST_LOG=warn` still exports every span.
    let logs = fmt::layer()
        .with_writer(std::io::stderr)
        // Colour codes only for a person watching; a log file or collector gets plain text.
        .with_ansi(std::io::stderr().is_terminal())
        .with_filter(env.and(filter_fn(|meta| meta.is_event())));
    if let Err(err) = tracing_subscriber::registry()
        .with(logs)
        .with(otel)
        .try_init()
    {
        if let Some(p) = provider {
            // Off the runtime's threads, where the exporter's blocking client must not run.
            std::thread::spawn(move || p.shutdown());
        }
        return Err(format!("cannot install the log subscriber: {err}"));
    }
    if provider.is_some() {
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        tracing::info!(service = %service_name(settings), "exporting traces over OTLP/HTTP");
    }
    Ok(Telemetry { provider, backlog })
}

// === impl Telemetry ===

impl Telemetry {
    /// Exports the spans still queued (waiting at most a few seconds) and stops the exporter.
    pub async fn shutdown(self) {
        let Some(provider) = self.provider else {
            return;
        };
        // The exporter's HTTP client is a blocking one: it must not be driven from a runtime thread.
        let task =
            tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(SHUTDOWN_TIMEOUT));
        match tokio::time::timeout(SHUTDOWN_TIMEOUT + Duration::from_secs(1), task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(err))) => {
                tracing::warn!(error = %err, "trace exporter did not shut down cleanly")
            }
            Ok(Err(err)) => tracing::warn!(error = %err, "trace exporter shutdown failed"),
            Err(_) => tracing::warn!("trace exporter shutdown timed out"),
        }
        // Whatever is still queued now never left the process.
        self.backlog.drop_remaining();
    }
}

/// Where spans go.
#[derive(Debug, PartialEq, Eq)]
enum Endpoint {
    /// The policy's `otlp_endpoint`, as the full URL of the traces resource.
    Policy(String),
    /// What the standard `OTEL_EXPORTER_OTLP_*` variables say, resolved by the exporter itself.
    Env,
    /// Nowhere: no spans are exported.
    None,
}

/// The policy's endpoint (a base URL, like `OTEL_EXPORTER_OTLP_ENDPOINT`), else the variables'.
fn traces_endpoint(settings: &TelemetrySettings) -> Endpoint {
    if let Some(base) = settings.otlp_endpoint.as_deref().filter(|s| !s.is_empty()) {
        let base = base.trim_end_matches('/');
        if base.ends_with("/v1/traces") {
            return Endpoint::Policy(base.to_owned());
        }
        return Endpoint::Policy(format!("{base}/v1/traces"));
    }
    let set = |name: &str| std::env::var(name).is_ok_and(|v| !v.trim().is_empty());
    if set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") || set("OTEL_EXPORTER_OTLP_ENDPOINT") {
        Endpoint::Env
    } else {
        Endpoint::None
    }
}

/// `OTEL_SERVICE_NAME` when set, else the policy's.
fn service_name(settings: &TelemetrySettings) -> String {
    std::env::var("OTEL_SERVICE_NAME")
        .ok()
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| settings.service_name.clone())
}

fn provider(
    settings: &TelemetrySettings,
    endpoint: Endpoint,
    backlog: Arc<export::Backlog>,
) -> Result<SdkTracerProvider, String> {
    let mut builder = opentelemetry_otlp::SpanExporter::builder().with_http();
    if let Endpoint::Policy(url) = endpoint {
        builder = builder.with_endpoint(url);
    }
    let exporter = builder
        .build()
        .map_err(|e| format!("telemetry: cannot build the OTLP exporter: {e}"))?;
    let resource = Resource::builder()
        .with_service_name(service_name(settings))
        .build();
    Ok(SdkTracerProvider::builder()
        .with_span_processor(export::BoundedProcessor::new(exporter, backlog))
        .with_resource(resource)
        .build())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_policy_endpoint_is_a_base_url_like_the_standard_variable() {
        let with = |url: &str| TelemetrySettings {
            otlp_endpoint: Some(url.into()),
            ..TelemetrySettings::default()
        };
        assert_eq!(
            traces_endpoint(&with("http://collector:4318")),
            Endpoint::Policy("http://collector:4318/v1/traces".into())
        );
        assert_eq!(
            traces_endpoint(&with("http://collector:4318/")),
            Endpoint::Policy("http://collector:4318/v1/traces".into())
        );
        assert_eq!(
            traces_endpoint(&with("http://collector:4318/v1/traces")),
            Endpoint::Policy("http://collector:4318/v1/traces".into())
        );
    }
}
