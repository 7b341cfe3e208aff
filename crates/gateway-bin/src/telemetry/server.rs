//! The server span of each request, with OpenTelemetry's HTTP and GenAI attributes.
//!
//! Two layers, because the span's name (`{gen_ai.operation.name} {deployment}`) is only known once
//! the request body was read, and a span's name can no longer change once it has started:
//!
//! - [`ServerSpanLayer`], outermost, opens the span when the request arrives (so it covers the whole
//!   request, body upload included), makes the client's `traceparent` its parent, and fills in what
//!   the response tells (status, consumer, backend, tokens), read from the request's
//!   [`Record`]. The span ends with the response body, in a hook of that record, so a stream's
//!   tokens, known at its end, are on it.
//! - [`EnterServerSpanLayer`], right inside the request-context layer, names the span from the
//!   captured [`RequestContext`] and runs the rest of the stack inside it: each upstream attempt's
//!   client span is then its child.

use std::future::Future;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use gateway_core::pool::BackendPool;
use gateway_core::tokens::Usage;
use gateway_layers::context::RequestContext;
use gateway_layers::record::{End, Record};
use http::uri::Authority;
use http::{HeaderMap, Method, Request, Response, header};
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use pin_project_lite::pin_project;
use tower::{Layer, Service};
use tracing::Span;
use tracing::field::Empty;
use tracing::instrument::{Instrument, Instrumented};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// `gen_ai.provider.name` of Azure OpenAI in OpenTelemetry's GenAI conventions.
const PROVIDER: &str = "azure.ai.openai";

/// Layer that opens a server span per request. See the [`telemetry`](crate::telemetry) docs.
#[derive(Clone, Debug)]
pub struct ServerSpanLayer {
    pool: Arc<BackendPool>,
}

/// Service produced by [`ServerSpanLayer`].
#[derive(Clone, Debug)]
pub struct ServerSpan<S> {
    inner: S,
    pool: Arc<BackendPool>,
}

/// Layer that names the server span and runs the inner stack inside it. See the
/// [`telemetry`](crate::telemetry) docs.
#[derive(Clone, Copy, Debug, Default)]
pub struct EnterServerSpanLayer;

/// Service produced by [`EnterServerSpanLayer`].
#[derive(Clone, Debug)]
pub struct EnterServerSpan<S> {
    inner: S,
}

/// Carries the server span from [`ServerSpan`] to [`EnterServerSpan`] in the request extensions.
#[derive(Clone, Debug)]
struct RequestSpan(Span);

pin_project! {
    /// Response future of [`ServerSpan`].
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        span: Option<Span>,
        method: Method,
        pool: Arc<BackendPool>,
    }
}

struct HeaderExtractor<'a>(&'a HeaderMap);

// === impl ServerSpanLayer ===

impl ServerSpanLayer {
    /// Server spans for a gateway routing over `pool` (which names the backend that served).
    pub fn new(pool: Arc<BackendPool>) -> Self {
        Self { pool }
    }
}

impl<S> Layer<S> for ServerSpanLayer {
    type Service = ServerSpan<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ServerSpan {
            inner,
            pool: self.pool.clone(),
        }
    }
}

// === impl ServerSpan ===

impl<S> ServerSpan<S> {
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

impl<S, ReqB, ResB> Service<Request<ReqB>> for ServerSpan<S>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
{
    type Response = Response<ResB>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqB>) -> Self::Future {
        let span = server_span(&req);
        req.extensions_mut().insert(RequestSpan(span.clone()));
        let method = req.method().clone();
        // Not entered here: entering starts the span, and its name is not known yet.
        ResponseFuture {
            inner: self.inner.call(req),
            span: Some(span),
            method,
            pool: self.pool.clone(),
        }
    }
}

fn server_span<B>(req: &Request<B>) -> Span {
    let authority = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| Authority::from_str(h).ok())
        .or_else(|| req.uri().authority().cloned());
    let span = tracing::info_span!(
        parent: None,
        "request",
        otel.name = Empty,
        otel.kind = "server",
        otel.status_code = Empty,
        http.request.method = req.method().as_str(),
        url.path = req.uri().path(),
        server.address = authority.as_ref().map(Authority::host),
        server.port = authority.as_ref().and_then(Authority::port_u16).map(i64::from),
        http.response.status_code = Empty,
        gen_ai.operation.name = Empty,
        gen_ai.provider.name = PROVIDER,
        gen_ai.request.model = Empty,
        gen_ai.request.max_tokens = Empty,
        gen_ai.response.model = Empty,
        gen_ai.usage.input_tokens = Empty,
        gen_ai.usage.output_tokens = Empty,
        gateway.request_id = Empty,
        gateway.consumer = Empty,
        gateway.backend.name = Empty,
        gateway.backend.region = Empty,
        gateway.attempts = Empty,
        error.type = Empty,
    );
    // W3C trace context, the one propagator `init` installs; called directly rather than through
    // `opentelemetry::global`, whose lock every request would take (and bounce between cores).
    let parent = TraceContextPropagator::new().extract(&HeaderExtractor(req.headers()));
    if parent.span().span_context().is_valid() {
        // Fails only when traces are off (no OpenTelemetry layer): nothing to link then.
        let _ = span.set_parent(parent);
    }
    span
}

// === impl ResponseFuture ===

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        let span = this.span.take().unwrap_or_else(Span::none);
        Poll::Ready(match result {
            Ok(res) => {
                let record = res.extensions().get::<Arc<Record>>();
                record_response(&span, &res, record.map(|r| &**r), this.pool, this.method);
                // The span ends when the record does: with the response body. Without a record
                // (no context layer inside), it ends now.
                if let Some(record) = record {
                    record.on_end(move |record, end| end_span(span, record, end));
                }
                Ok(res)
            }
            Err(err) => {
                span.record("error.type", "_OTHER");
                span.record("otel.status_code", "error");
                Err(err)
            }
        })
    }
}

/// Records what the response head and the record tell when the headers are ready.
fn record_response<B>(
    span: &Span,
    res: &Response<B>,
    record: Option<&Record>,
    pool: &BackendPool,
    method: &Method,
) {
    let status = res.status();
    span.record("http.response.status_code", i64::from(status.as_u16()));
    // For a server span only 5xx is an error: a 4xx is the client's doing.
    if status.is_server_error() {
        span.record("error.type", status.as_str());
        span.record("otel.status_code", "error");
    }
    let ctx = record.and_then(Record::request);
    if ctx.is_none() {
        // Refused before the context was captured (413, 400): the span was never named.
        span.record("otel.name", method.as_str());
    }
    if let Some(consumer) = record.and_then(Record::consumer) {
        span.record("gateway.consumer", &**consumer);
    }
    if let Some(report) = record.and_then(Record::failover) {
        span.record("gateway.attempts", int(report.attempts.len() as u64));
        if let Some(id) = report.served_by {
            let backend = pool.get(id);
            span.record("gateway.backend.name", backend.name.as_str());
            span.record("gateway.backend.region", backend.region.as_str());
            // The backend's own deployment name: the model behind it as far as the gateway knows.
            let own = ctx
                .and_then(|c| c.deployment.as_deref())
                .and_then(|d| backend.deployment_name(d));
            span.record("gen_ai.response.model", own);
        }
    }
}

/// Ends the server span with the response body, with the tokens the answer reported.
fn end_span(span: Span, record: &Record, end: End) {
    if end == End::Error {
        span.record("error.type", "response_body");
        span.record("otel.status_code", "error");
    }
    if let Some(usage) = record.usage() {
        record_usage(&span, usage);
    }
    drop(span);
}

fn record_usage(span: &Span, usage: Usage) {
    span.record("gen_ai.usage.input_tokens", int(usage.prompt));
    span.record("gen_ai.usage.output_tokens", int(usage.completion));
}

/// OpenTelemetry has no unsigned attributes (`tracing-opentelemetry` would record a `u64` as text).
fn int(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

// === impl EnterServerSpanLayer ===

impl<S> Layer<S> for EnterServerSpanLayer {
    type Service = EnterServerSpan<S>;

    fn layer(&self, inner: S) -> Self::Service {
        EnterServerSpan { inner }
    }
}

// === impl EnterServerSpan ===

impl<S> EnterServerSpan<S> {
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

impl<S, B> Service<Request<B>> for EnterServerSpan<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Instrumented<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let span = req
            .extensions()
            .get::<RequestSpan>()
            .map_or_else(Span::none, |s| s.0.clone());
        if let Some(ctx) = req.extensions().get::<RequestContext>() {
            name_span(&span, ctx, req.method());
        }
        let fut = span.in_scope(|| self.inner.call(req));
        fut.instrument(span)
    }
}

/// Names the span `{gen_ai.operation.name} {deployment}` as the GenAI conventions do, and records
/// what the request says.
fn name_span(span: &Span, ctx: &RequestContext, method: &Method) {
    let op = ctx.operation.gen_ai_name();
    let model = ctx.deployment.as_deref();
    let name = match (op, model) {
        (Some(op), Some(model)) => format!("{op} {model}"),
        (Some(op), None) => op.to_owned(),
        (None, _) => method.as_str().to_owned(),
    };
    span.record("otel.name", name);
    span.record("gen_ai.operation.name", op);
    span.record("gen_ai.request.model", model);
    span.record("gen_ai.request.max_tokens", ctx.max_tokens().map(int));
    span.record("gateway.request_id", ctx.request_id.to_str().ok());
}

// === impl HeaderExtractor ===

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}
