use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use gateway_core::pool::{
    Backend, BackendId, BackendPool, Exhausted, Outcome, Route, Selection, parse_utilization,
};
use gateway_core::retry_after::{parse_remaining, parse_reset};
use gateway_core::tokens::Estimate;
use http::request::Parts;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body::Body;
use http_body_util::{BodyExt, Full, Limited};
// tokio's clock, so that paused and advanced time drives deadlines, header timeouts, cooldowns and
// circuits alike; the pool takes its `std` form.
use tokio::time::Instant;
use tower::{Service, ServiceExt};
use tracing::Instrument;

use super::body::{BodyLimits, StreamWatch};
use super::flex::{DEFAULT_TIER, FLEX};
use super::{
    Attempt, AttemptOutcome, AzurePolicy, Decision, FailoverBody, FailoverLayer, FailoverPolicy,
    FailoverReport, FlexFallback, ServedBy, Shared,
};
use crate::BoxError;
use crate::client::{Chain, ErrorCause, UpstreamUrl};
use crate::context::{DeploymentSource, RequestContext};
use crate::error::{azure_error, set_retry_after, too_many_requests};
use crate::headers::{
    X_GATEWAY_ATTEMPTS, X_GATEWAY_THROTTLED, X_RATELIMIT_REMAINING_REQUESTS,
    X_RATELIMIT_REMAINING_TOKENS, X_SERVED_BY, is_event_stream, never_forwarded,
};
use crate::record::Record;

/// Service produced by [`FailoverLayer`]: sends each request to one backend after another until one
/// serves it, as the policy `P` decides.
#[derive(Clone, Debug)]
pub struct Failover<S, P = AzurePolicy> {
    inner: S,
    shared: Arc<Shared>,
    policy: P,
}

/// Response future of [`Failover`]: boxed, because the service awaits inside it (each attempt's
/// response headers, a 404's body, the timeouts between them), and that loop reads best as one `async`
/// block; the one allocation is small beside an upstream round trip.
pub type FailoverFuture<B> =
    Pin<Box<dyn Future<Output = Result<Response<FailoverBody<B>>, Infallible>> + Send>>;

/// Why the last attempt did not serve.
enum LastFailure<B> {
    /// A 5xx or 408: Azure's own answer, returned as it is when nothing better is left.
    Response(BackendId, Response<B>),
    /// A 429: the client should come back once the shortest throttle is over.
    Throttled,
    /// A 401/403: the backend refused the gateway's credential (never the client's problem). Which
    /// backend is logged, not told.
    Rejected,
    /// A 404 `DeploymentNotFound`: the policy maps the deployment to a name the backend lacks.
    NotFound,
    Timeout,
    /// No answer: what the client is told is only the category, never the error's text (which names
    /// the backend's URL and deployment).
    Connect(ErrorCause),
    /// The gateway could not build the attempt (an invalid mapped deployment name, say).
    Build,
    /// A 404 whose body could not be read to tell what it meant.
    Unreadable,
}

/// Largest error body read to tell a `DeploymentNotFound` 404 from another.
const MAX_ERROR_BODY: usize = 64 * 1024;

// === impl Failover ===

impl<S> Failover<S> {
    /// A [`FailoverLayer`] over `pool`, with Azure's failover semantics.
    pub fn layer(pool: Arc<BackendPool>) -> FailoverLayer {
        FailoverLayer::new(pool)
    }
}

impl<S, P> Failover<S, P> {
    pub(super) fn new(inner: S, shared: Arc<Shared>, policy: P) -> Self {
        Self {
            inner,
            shared,
            policy,
        }
    }

    /// The inner (HTTP client) service.
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

impl<S, P, ReqB, ResB> Service<Request<ReqB>> for Failover<S, P>
where
    S: Service<Request<Full<Bytes>>, Response = Response<ResB>> + Clone + Send + 'static,
    P: FailoverPolicy,
    S::Error: Into<BoxError>,
    S::Future: Send,
    ReqB: Send + 'static,
    ResB: Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    type Response = Response<FailoverBody<ResB>>;
    type Error = Infallible;
    type Future = FailoverFuture<ResB>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Each attempt readies its own clone of the client before calling it (see `attempt`), so
        // there is nothing to reserve here; backend availability is decided per request in `call`.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        let inner = self.inner.clone();
        let shared = self.shared.clone();
        let policy = self.policy.clone();
        let record = req.extensions().get::<Arc<Record>>().cloned();
        Box::pin(async move {
            let mut res = run(shared, policy, inner, req).await;
            // With a request record, the report is the record's: observers read it there.
            if let Some(record) = record {
                if let Some(report) = res.extensions_mut().remove::<FailoverReport>() {
                    record.set_failover(report);
                }
            }
            Ok(res)
        })
    }
}

async fn run<S, P, ReqB, ResB>(
    shared: Arc<Shared>,
    policy: P,
    mut inner: S,
    req: Request<ReqB>,
) -> Response<FailoverBody<ResB>>
where
    S: Service<Request<Full<Bytes>>, Response = Response<ResB>> + Send,
    S::Error: Into<BoxError>,
    S::Future: Send,
    P: FailoverPolicy,
    ResB: Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    // The context layer owns the body: what arrives here is a copy of `ctx.body`, not needed.
    let (mut parts, _) = req.into_parts();
    let Some(ctx) = parts.extensions.remove::<RequestContext>() else {
        return missing_context(&shared);
    };
    let Some(deployment) = ctx.deployment.as_deref() else {
        let res = match ctx.deployment_source {
            DeploymentSource::Body => azure_error(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                "The request body must name the deployment in 'model'.",
            ),
            _ => azure_error(
                StatusCode::NOT_FOUND,
                "404",
                "Resource not found: the gateway serves deployment-scoped operations only.",
            ),
        };
        return gateway_answer(res, FailoverReport::default());
    };

    let config = &shared.config;
    let pool = &shared.pool;
    // Set by the rate-limit layer: lets the pool skip backends that reported too little quota left.
    let need_tokens = parts.extensions.get::<Estimate>().map(Estimate::total);
    // Written by the auth layer: backends reserved for other consumers are left out of everything
    // this request sees, retry hints included.
    let record = parts.extensions.get::<Arc<Record>>().cloned();
    let route = Route::for_consumer(record.as_ref().and_then(|r| r.consumer()).map(|c| &**c));
    // From here, not from arrival: a slow upload must not eat the upstream's time.
    let deadline = Instant::now() + config.deadline;
    let mut tried: Vec<BackendId> = Vec::with_capacity(config.max_attempts as usize);
    let mut report = FailoverReport::default();
    let mut last: Option<LastFailure<ResB>> = None;
    let mut exhausted: Option<Exhausted> = None;
    // A Flex request throttled once goes on at the default tier, on the same backend first.
    let flex = ctx.service_tier() == Some(FLEX);
    let mut tier: Option<&str> = None;
    let mut retry_same: Option<BackendId> = None;
    let mut waited = false;

    while report.attempts.len() < config.max_attempts as usize {
        let now = Instant::now();
        if now >= deadline {
            last = Some(LastFailure::Timeout);
            break;
        }
        let selected = match retry_same.take() {
            Some(id) => Selection::Backend(id),
            None => pool.select_routed(deployment, &tried, need_tokens, route, now.into_std()),
        };
        let id = match selected {
            Selection::Backend(id) => id,
            Selection::Exhausted(e) => {
                // Every backend left rests after a 429, and the first is back soon: hold the
                // request rather than bounce it (once; the deadline still bounds it). Spills are
                // no rest that ends, so they never wait.
                let wait = e.shortest_cooldown.filter(|wait| {
                    !waited
                        && e.throttled > 0
                        && e.spilled == 0
                        && *wait <= config.throttle_wait
                        && now + *wait < deadline
                });
                if let Some(wait) = wait {
                    waited = true;
                    tokio::time::sleep(wait).await;
                    // The rests are over: every backend may be asked again, within the budget.
                    tried.clear();
                    continue;
                }
                exhausted = Some(e);
                break;
            }
        };
        tried.push(id);
        let in_flight = pool.begin(id);
        let up = &shared.upstreams[id.0];
        let Ok(credential) = up.credential.header() else {
            // Its token expired before it could be renewed (the renewal logs why): the backend
            // would refuse the gateway, so this request fails over as on a 401. Nothing is
            // recorded against the backend: it is not misconfigured, and the first request after
            // the renewal uses it again.
            tracing::debug!(backend = %up.name, "no valid credential for this backend; failing over");
            report.attempts.push(Attempt {
                backend: id,
                backend_name: up.name.clone(),
                status: None,
                outcome: AttemptOutcome::AuthFailure,
                elapsed: Duration::ZERO,
            });
            last = Some(LastFailure::Rejected);
            continue;
        };
        let mapped = pool.get(id).deployment_name(deployment);
        let req = match build_attempt(&parts, &ctx, up, credential, mapped, tier) {
            Ok(req) => req,
            Err(msg) => {
                tracing::error!(backend = %up.name, %msg, "could not build upstream request");
                last = Some(LastFailure::Build);
                continue;
            }
        };

        let timeout = config.response_header_timeout.min(deadline - now);
        let backend = pool.get(id);
        let model = backend.deployment_name(deployment).unwrap_or(deployment);
        let span = attempt_span(&ctx, backend, model, &req, report.attempts.len() + 1);
        let call = attempt(&mut inner, req).instrument(span.clone());
        let result = tokio::time::timeout(timeout, call).await;
        let elapsed = now.elapsed();
        let mut record = |status: Option<u16>, outcome: AttemptOutcome| {
            record_outcome(&span, status, outcome);
            report.attempts.push(Attempt {
                backend: id,
                backend_name: up.name.clone(),
                status,
                outcome,
                elapsed,
            });
        };
        let res = match result {
            Err(_) => {
                tracing::warn!(backend = %up.name, ?timeout, "no response headers in time; failing over");
                pool.record(id, deployment, Outcome::Timeout, Instant::now().into_std());
                record(None, AttemptOutcome::Timeout);
                last = Some(LastFailure::Timeout);
                continue;
            }
            Ok(Err(err)) => {
                let cause = ErrorCause::of(&*err);
                // The one line that names the backend and the root cause; the client gets the
                // category only.
                tracing::warn!(backend = %up.name, %cause, error = %Chain(&*err), "upstream connection failed; failing over");
                // Running out of descriptors is the gateway's own trouble, never the backend's.
                let outcome = if cause == ErrorCause::ResourceExhausted {
                    Outcome::LocalError
                } else {
                    Outcome::ConnectError
                };
                pool.record(id, deployment, outcome, Instant::now().into_std());
                record(None, AttemptOutcome::ConnectError);
                last = Some(LastFailure::Connect(cause));
                continue;
            }
            Ok(Ok(res)) => res,
        };

        let status = res.status();
        let headers = res.headers();
        let remaining = |name: &http::HeaderName| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .and_then(parse_remaining)
        };
        let remaining_requests = remaining(&X_RATELIMIT_REMAINING_REQUESTS);
        // A PTU deployment's own word on how busy it is: what keeps headroom for higher tiers.
        if let Some(percent) = headers
            .get("azure-openai-deployment-utilization")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_utilization)
        {
            pool.observe_utilization(id, deployment, percent, Instant::now().into_std());
        }
        pool.observe_remaining(
            id,
            deployment,
            remaining(&X_RATELIMIT_REMAINING_TOKENS),
            remaining_requests,
            Instant::now().into_std(),
        );
        // The window's last request: the next would be a doomed 429 round trip (often a
        // cross-region one). Rest the deployment until the window resets, as its 429 would.
        if remaining_requests == Some(0) && status != StatusCode::TOO_MANY_REQUESTS {
            let reset = headers
                .get("x-ratelimit-reset-requests")
                .and_then(|v| v.to_str().ok())
                .and_then(parse_reset);
            let rest = pool.requests_spent(id, deployment, reset, Instant::now().into_std());
            if let (Some(rest), Some(hook)) = (rest, &shared.on_cooldown) {
                hook(&up.name, own_deployment(pool, id, deployment), rest);
            }
        }

        match policy.classify(status, headers) {
            Decision::Serve => {
                pool.record(id, deployment, Outcome::Success, Instant::now().into_std());
                record(Some(status.as_u16()), AttemptOutcome::Served);
                report.served_by = Some(id);
                // A stream's generation may outlast the deadline for its headers; an answer that
                // is not a stream was complete when its headers came, so it must arrive by then.
                // Some backends send streams without a content type: the request says it too, and
                // a broken one then ends with an error event all the same.
                let sse = is_event_stream(res.headers()) || ctx.stream();
                let limits = BodyLimits {
                    idle: config.stream_idle_timeout,
                    deadline: (!sse).then_some(deadline),
                    sse,
                };
                let watch = StreamWatch {
                    pool: pool.clone(),
                    id,
                    deployment: deployment.to_owned(),
                    _in_flight: in_flight,
                };
                let res = res.map(|b| FailoverBody::upstream(b, limits, Some(watch)));
                return served(res, up.served_by.clone(), report);
            }
            Decision::FailOver {
                outcome: Outcome::Throttled { .. },
                reason: kind,
            } if flex && tier.is_none() => {
                // Flex capacity is short, not the deployment's quota: nothing rests.
                record(Some(status.as_u16()), kind);
                last = Some(LastFailure::Throttled);
                if config.flex_fallback == FlexFallback::DefaultTier {
                    tracing::info!(backend = %up.name, "flex tier throttled; retrying at the default tier");
                    tier = Some(DEFAULT_TIER);
                    retry_same = Some(id);
                } else {
                    tracing::info!(backend = %up.name, "flex tier throttled; failing over at flex");
                }
            }
            Decision::FailOver {
                outcome,
                reason: kind,
            } => {
                tracing::info!(backend = %up.name, status = status.as_u16(), "failing over");
                let cooldown = pool.record(id, deployment, outcome, Instant::now().into_std());
                // Only throttles are shared: another instance has its own credentials and errors.
                let throttled = matches!(outcome, Outcome::Throttled { .. });
                if let (true, Some(cooldown), Some(hook)) =
                    (throttled, cooldown, &shared.on_cooldown)
                {
                    hook(&up.name, own_deployment(pool, id, deployment), cooldown);
                }
                record(Some(status.as_u16()), kind);
                last = Some(match kind {
                    AttemptOutcome::Throttled => LastFailure::Throttled,
                    AttemptOutcome::AuthFailure => LastFailure::Rejected,
                    _ => LastFailure::Response(id, res),
                });
            }
            Decision::CheckDeploymentNotFound => {
                let (mut head, body) = res.into_parts();
                // Bounded in size and time: a stalled error body must not hang the request.
                let left = deadline.saturating_duration_since(Instant::now());
                let read = Limited::new(body, MAX_ERROR_BODY).collect();
                let bytes = match tokio::time::timeout(
                    config.response_header_timeout.min(left),
                    read,
                )
                .await
                {
                    Ok(Ok(c)) => c.to_bytes(),
                    _ => {
                        tracing::warn!(backend = %up.name, "unreadable 404 body from backend");
                        pool.record(
                            id,
                            deployment,
                            Outcome::ServerError { hint: None },
                            Instant::now().into_std(),
                        );
                        record(Some(404), AttemptOutcome::ServerError);
                        last = Some(LastFailure::Unreadable);
                        continue;
                    }
                };
                if is_deployment_not_found(&bytes) {
                    tracing::warn!(backend = %up.name, deployment, "backend lacks the deployment; check its mapping");
                    pool.record(
                        id,
                        deployment,
                        Outcome::DeploymentNotFound,
                        Instant::now().into_std(),
                    );
                    record(Some(404), AttemptOutcome::DeploymentNotFound);
                    last = Some(LastFailure::NotFound);
                } else {
                    pool.record(id, deployment, Outcome::Success, Instant::now().into_std());
                    record(Some(404), AttemptOutcome::Served);
                    report.served_by = Some(id);
                    // The body is whole now: its length is known again from the bytes.
                    head.headers.remove(header::CONTENT_LENGTH);
                    let res = Response::from_parts(head, FailoverBody::full(bytes));
                    return served(res, up.served_by.clone(), report);
                }
            }
        }
    }

    let now = Instant::now().into_std();
    give_up(
        &shared, deployment, route, exhausted, last, report, now, deadline,
    )
}

/// The answer when no [`RequestContext`] came with the request: the stack is assembled wrong, which
/// no client can fix, so it is said once in the log and every request gets a 500.
fn missing_context<B>(shared: &Shared) -> Response<FailoverBody<B>> {
    if !shared.missing_context_logged.swap(true, Ordering::Relaxed) {
        tracing::error!(
            "the failover layer found no RequestContext in a request: wrap it in RequestContextLayer; answering 500 to every such request"
        );
    }
    let res = azure_error(
        StatusCode::INTERNAL_SERVER_ERROR,
        "InternalServerError",
        "The gateway is misconfigured: the failover layer must be wrapped by the RequestContextLayer.",
    );
    // No context layer outside to say who answered: say it here.
    let mut res = gateway_answer(res, FailoverReport::default());
    let h = res.headers_mut();
    h.insert(X_SERVED_BY.clone(), HeaderValue::from_static("gateway"));
    h.insert(X_GATEWAY_ATTEMPTS.clone(), HeaderValue::from_static("0"));
    res
}

async fn attempt<S, ResB>(
    inner: &mut S,
    req: Request<Full<Bytes>>,
) -> Result<Response<ResB>, BoxError>
where
    S: Service<Request<Full<Bytes>>, Response = Response<ResB>>,
    S::Error: Into<BoxError>,
{
    inner
        .ready()
        .await
        .map_err(Into::into)?
        .call(req)
        .await
        .map_err(Into::into)
}

/// The client span of one attempt, a child of the current (server) span. It carries OpenTelemetry's
/// GenAI and HTTP client attributes; the outcome is filled in by [`record_outcome`]. It ends when the
/// attempt is decided (response headers or failure); the response body belongs to the server span.
/// Integers are recorded as `i64`: OpenTelemetry has no unsigned attributes.
fn attempt_span(
    ctx: &RequestContext,
    backend: &Backend,
    model: &str,
    req: &Request<Full<Bytes>>,
    number: usize,
) -> tracing::Span {
    let op = ctx.operation.gen_ai_name();
    let uri = req.uri();
    let default_port = if uri.scheme_str() == Some("https") {
        443
    } else {
        80
    };
    let port = uri.port_u16().unwrap_or(default_port);
    tracing::info_span!(
        "upstream attempt",
        otel.name = %format_args!("{} {model}", op.unwrap_or(req.method().as_str())),
        otel.kind = "client",
        otel.status_code = tracing::field::Empty,
        gen_ai.operation.name = op,
        gen_ai.provider.name = "azure.ai.openai",
        gen_ai.request.model = model,
        gen_ai.request.max_tokens = ctx.max_tokens().and_then(|t| i64::try_from(t).ok()),
        http.request.method = req.method().as_str(),
        server.address = uri.host(),
        server.port = i64::from(port),
        gateway.backend.name = backend.name.as_str(),
        gateway.backend.region = backend.region.as_str(),
        gateway.attempt = i64::try_from(number).unwrap_or(i64::MAX),
        http.response.status_code = tracing::field::Empty,
        gateway.failover.reason = tracing::field::Empty,
        error.type = tracing::field::Empty,
    )
}

fn record_outcome(span: &tracing::Span, status: Option<u16>, outcome: AttemptOutcome) {
    if let Some(status) = status {
        span.record("http.response.status_code", i64::from(status));
    }
    if outcome != AttemptOutcome::Served {
        span.record("gateway.failover.reason", outcome.as_str());
    }
    // As OpenTelemetry's HTTP client spans do: the status when it is an error, else what went wrong.
    match status {
        Some(s) if s >= 400 => span.record("error.type", tracing::field::display(s)),
        Some(_) => return,
        None => span.record("error.type", outcome.as_str()),
    };
    span.record("otel.status_code", "error");
}

/// The backend's own name for logical `deployment`: what Azure throttles, and what rests.
fn own_deployment<'a>(pool: &'a BackendPool, id: BackendId, deployment: &'a str) -> &'a str {
    pool.get(id)
        .deployment_name(deployment)
        .unwrap_or(deployment)
}

fn is_deployment_not_found(body: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Error {
        error: Code,
    }
    #[derive(serde::Deserialize)]
    struct Code {
        code: Option<String>,
    }
    serde_json::from_slice::<Error>(body)
        .is_ok_and(|e| e.error.code.as_deref() == Some("DeploymentNotFound"))
}

fn build_attempt(
    parts: &Parts,
    ctx: &RequestContext,
    up: &super::Upstream,
    credential: Option<(http::HeaderName, HeaderValue)>,
    mapped: Option<&str>,
    service_tier: Option<&str>,
) -> Result<Request<Full<Bytes>>, String> {
    let logical = ctx.deployment.as_deref().unwrap_or_default();
    let mapped = mapped.unwrap_or(logical);
    let path = parts.uri.path();
    let query = parts.uri.query();
    let mut uri = String::with_capacity(up.base.len() + path.len() + 64);
    uri.push_str(&up.base);
    let body = match &ctx.deployment_source {
        DeploymentSource::Path { rest } => {
            uri.push_str("/openai/deployments/");
            uri.push_str(mapped);
            uri.push_str(rest);
            ctx.body_at_tier(None, service_tier)
        }
        DeploymentSource::Body => {
            uri.push_str(path);
            ctx.body_at_tier(Some(mapped), service_tier)
        }
        DeploymentSource::None => {
            uri.push_str(path);
            ctx.body_at_tier(None, service_tier)
        }
    };
    if let Some(q) = query {
        uri.push('?');
        uri.push_str(q);
    }

    // The client's own URL type, made from the parsed origin: spares it parsing `uri` again.
    let url = up.origin.as_ref().map(|origin| {
        let (path, query) = match uri[up.base.len()..].split_once('?') {
            Some((path, query)) => (path, Some(query)),
            None => (&uri[up.base.len()..], None),
        };
        let mut url = origin.clone();
        url.set_path(path);
        url.set_query(query);
        UpstreamUrl(url)
    });
    let mut builder = Request::builder().method(parts.method.clone()).uri(uri);
    if let Some(url) = url {
        builder = builder.extension(url);
    }
    if let Some(headers) = builder.headers_mut() {
        headers.reserve(parts.headers.len() + 1);
        for (name, value) in &parts.headers {
            if !never_forwarded(name) {
                headers.append(name.clone(), value.clone());
            }
        }
        if let Some((name, value)) = credential {
            headers.insert(name, value);
        }
    }
    builder
        .body(Full::new(body))
        .map_err(|e| format!("invalid upstream request: {e}"))
}

fn served<B>(
    mut res: Response<FailoverBody<B>>,
    served_by: HeaderValue,
    report: FailoverReport,
) -> Response<FailoverBody<B>> {
    res.extensions_mut().insert(ServedBy(served_by));
    res.extensions_mut().insert(report);
    res
}

fn gateway_answer<B>(
    mut res: Response<FailoverBody<B>>,
    report: FailoverReport,
) -> Response<FailoverBody<B>> {
    res.extensions_mut().insert(report);
    res
}

#[allow(clippy::too_many_arguments)]
fn give_up<B>(
    shared: &Shared,
    deployment: &str,
    route: Route<'_>,
    exhausted: Option<Exhausted>,
    last: Option<LastFailure<B>>,
    mut report: FailoverReport,
    now: std::time::Instant,
    deadline: Instant,
) -> Response<FailoverBody<B>> {
    // Every candidate cools down after throttling: tell the client when to come back.
    if let Some(wait) = exhausted.as_ref().and_then(|e| e.shortest_cooldown) {
        return throttled(deployment, wait, report);
    }
    if let Some(e) = &exhausted {
        if e.no_candidates && report.attempts.is_empty() {
            let res = azure_error(
                StatusCode::NOT_FOUND,
                "DeploymentNotFound",
                &format!("The deployment '{deployment}' is not configured on this gateway."),
            );
            return gateway_answer(res, report);
        }
    }
    // Nothing tried, and what is out is out for refusing the gateway's credential: say so, as the
    // first refusal did, rather than "unavailable".
    let last = match (last, &exhausted) {
        (None, Some(e)) if e.misconfigured > 0 && e.circuit_open == 0 && e.cooling == 0 => {
            Some(LastFailure::Rejected)
        }
        (last, _) => last,
    };
    let res = match last {
        // Azure's own 5xx is more useful to the client than a summary of it.
        Some(LastFailure::Response(id, res)) => {
            let up = &shared.upstreams[id.0];
            // An error answer is no stream: bounded by the deadline as well as the idle timeout.
            let limits = BodyLimits {
                idle: shared.config.stream_idle_timeout,
                deadline: Some(deadline),
                sse: is_event_stream(res.headers()),
            };
            let res = res.map(|b| FailoverBody::upstream(b, limits, None));
            report.served_by = Some(id);
            return served(res, up.served_by.clone(), report);
        }
        // The attempt budget ran out on a throttle: the gateway answers with the soonest wait.
        Some(LastFailure::Throttled) => {
            let wait = shared
                .pool
                .shortest_throttle_for(deployment, route, now)
                .unwrap_or(Duration::from_secs(1));
            return throttled(deployment, wait, report);
        }
        // Client answers name only the deployment the client used and a category of cause: which
        // backend, its URL and its own deployment name are in the gateway's log.
        Some(LastFailure::Rejected) => azure_error(
            StatusCode::BAD_GATEWAY,
            "BadGateway",
            &format!(
                "A backend refused the gateway's credential and no other backend could serve deployment '{deployment}'. Check the backends' keys in the gateway's policy."
            ),
        ),
        Some(LastFailure::NotFound) => azure_error(
            StatusCode::BAD_GATEWAY,
            "BadGateway",
            &format!(
                "A backend has no deployment under the name the gateway's policy maps '{deployment}' to, and no other backend could serve it."
            ),
        ),
        Some(LastFailure::Timeout) => azure_error(
            StatusCode::GATEWAY_TIMEOUT,
            "GatewayTimeout",
            &format!(
                "No backend for deployment '{deployment}' answered in time ({} attempts).",
                report.attempts.len()
            ),
        ),
        Some(LastFailure::Connect(cause)) => azure_error(
            StatusCode::BAD_GATEWAY,
            "BadGateway",
            &format!("No backend for deployment '{deployment}' could be reached ({cause})."),
        ),
        Some(LastFailure::Build) => azure_error(
            StatusCode::BAD_GATEWAY,
            "BadGateway",
            &format!(
                "The gateway could not build a request to any backend for deployment '{deployment}'; check the gateway's policy."
            ),
        ),
        Some(LastFailure::Unreadable) => azure_error(
            StatusCode::BAD_GATEWAY,
            "BadGateway",
            &format!(
                "No backend for deployment '{deployment}' gave a readable answer (unreadable 404)."
            ),
        ),
        None => {
            let open = exhausted.as_ref().map_or(0, |e| e.circuit_open);
            let mut res: Response<FailoverBody<B>> = azure_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "ServiceUnavailable",
                &format!(
                    "No backend for deployment '{deployment}' is available ({open} with an open circuit). Retry later."
                ),
            );
            // When the first backend comes back is known: tell the client, as a 429 does.
            if let Some(wait) = shared.pool.shortest_recovery_for(deployment, route, now) {
                set_retry_after(res.headers_mut(), wait);
            }
            res
        }
    };
    gateway_answer(res, report)
}

fn throttled<B>(
    deployment: &str,
    wait: Duration,
    report: FailoverReport,
) -> Response<FailoverBody<B>> {
    let mut res: Response<FailoverBody<B>> = too_many_requests(
        &format!(
            "Every backend for deployment '{deployment}' is rate limited; this 429 comes from the gateway, not from Azure OpenAI."
        ),
        wait,
    );
    res.headers_mut().insert(
        X_GATEWAY_THROTTLED.clone(),
        HeaderValue::from_static("true"),
    );
    gateway_answer(res, report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deployment_not_found_is_read_from_the_body() {
        assert!(is_deployment_not_found(
            br#"{"error":{"code":"DeploymentNotFound","message":"x"}}"#
        ));
        assert!(!is_deployment_not_found(
            br#"{"error":{"code":"404","message":"Resource not found"}}"#
        ));
        assert!(!is_deployment_not_found(b"not json"));
    }

    /// The URL handed to the client is the one reqwest would parse from the attempt's URI.
    #[test]
    fn the_parsed_url_is_the_attempts_uri() {
        let backend = |endpoint: &str| gateway_core::pool::Backend {
            name: "b".into(),
            region: "r".into(),
            endpoint: endpoint.into(),
            priority: 1,
            weight: 1,
            deployments: Default::default(),
            credential: None,
        };
        let paths = [
            "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21",
            "/openai/deployments/gpt-4o/embeddings",
            "/openai/deployments/gpt-4o/chat/completions?",
            "/openai/v1/chat/completions?api-version=preview&x=%20a%2Fb",
            "/openai/deployments/d%C3%A9j%C3%A0/chat/completions?a=1&a=2",
        ];
        for endpoint in ["http://127.0.0.1:8080", "https://x.openai.azure.com/"] {
            let up = super::super::Upstream::new(&backend(endpoint));
            assert!(up.origin.is_some(), "{endpoint} is a bare origin");
            for path in paths {
                let (parts, _) = Request::post(path).body(()).unwrap().into_parts();
                let ctx = RequestContext::from_parts_and_body(
                    &parts,
                    Bytes::from_static(b"{}"),
                    Instant::now().into_std(),
                )
                .unwrap();
                let req = build_attempt(&parts, &ctx, &up, None, None, None).unwrap();
                let url = &req.extensions().get::<UpstreamUrl>().unwrap().0;
                let parsed = reqwest::Url::parse(&req.uri().to_string()).unwrap();
                assert_eq!(url, &parsed, "{endpoint}{path}");
                assert_eq!(url.as_str(), parsed.as_str());
            }
        }
        // An endpoint with a path of its own is parsed whole, as before.
        let up = super::super::Upstream::new(&backend("http://127.0.0.1:8080/prefix"));
        assert!(up.origin.is_none());
    }
}
