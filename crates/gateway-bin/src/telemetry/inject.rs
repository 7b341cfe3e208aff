//! `traceparent` for each upstream attempt.

use std::task::{Context, Poll};

use http::{HeaderMap, HeaderName, HeaderValue, Request};
use opentelemetry::propagation::{Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tower::{Layer, Service};
use tracing_opentelemetry::OpenTelemetrySpanExt;

static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
static TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// Layer that writes the current span's trace context into each outgoing request.
///
/// Put it directly around the HTTP client, below the failover layer: every attempt runs inside its
/// own client span, so each backend sees the `traceparent` of the attempt that reached it. The
/// client's own `traceparent`/`tracestate` (forwarded by header propagation) are replaced; they are
/// already the parent of the gateway's server span. Without trace export there is no span context
/// and requests pass unchanged.
#[derive(Clone, Copy, Debug, Default)]
pub struct InjectTraceContextLayer;

/// Service produced by [`InjectTraceContextLayer`].
#[derive(Clone, Debug)]
pub struct InjectTraceContext<S> {
    inner: S,
}

struct HeaderInjector<'a>(&'a mut HeaderMap);

// === impl InjectTraceContextLayer ===

impl<S> Layer<S> for InjectTraceContextLayer {
    type Service = InjectTraceContext<S>;

    fn layer(&self, inner: S) -> Self::Service {
        InjectTraceContext { inner }
    }
}

// === impl InjectTraceContext ===

impl<S> InjectTraceContext<S> {
    /// Wraps `inner`.
    pub fn new(inner: S) -> Self {
        Self { inner }
    }

    /// An [`InjectTraceContextLayer`].
    pub fn layer() -> InjectTraceContextLayer {
        InjectTraceContextLayer
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, B> Service<Request<B>> for InjectTraceContext<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        inject(req.headers_mut());
        self.inner.call(req)
    }
}

fn inject(headers: &mut HeaderMap) {
    let cx = tracing::Span::current().context();
    if !cx.span().span_context().is_valid() {
        return;
    }
    headers.remove(&TRACEPARENT);
    headers.remove(&TRACESTATE);
    // The propagator `init` installs, without the global lock (see `server_span`).
    TraceContextPropagator::new().inject_context(&cx, &mut HeaderInjector(headers));
}

// === impl HeaderInjector ===

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(key.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}
