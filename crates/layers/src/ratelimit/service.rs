use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use gateway_core::limits::{
    Admission, LimitCheck, LimitKind, LimitStore, Limits, Remaining, Reservation, StoreError,
};
use gateway_core::operation::Operation;
use gateway_core::tokens::{self, Encoding, Estimate, Usage};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::BodyExt;
use tower::Service;

use super::body::{PromptTokens, Reconcile, UsageBody};
use super::{OnStoreError, Shared};
use crate::BoxError;
use crate::auth::Consumer;
use crate::context::{DeploymentSource, RequestContext};
use crate::error::{azure_error, set_retry_after, too_many_requests};
use crate::headers::{X_GATEWAY_LIMIT, content_length, is_event_stream};
use crate::record::{Limit, Record, ServiceTier};

/// Service produced by [`RateLimitLayer`](super::RateLimitLayer).
pub struct RateLimit<S, St> {
    inner: S,
    shared: Arc<Shared<St>>,
}

/// Response future of [`RateLimit`]: boxed, as it awaits the store before and after the call.
pub type RateLimitFuture<R, E> = Pin<Box<dyn Future<Output = Result<R, E>> + Send>>;

/// Why a call did not ask the store.
const RESTING: &str = "skipped: the store failed less than a second ago";

/// Largest reservation: far above any real request, far below what a counter can hold.
const MAX_RESERVATION: u64 = 1 << 40;

/// Largest non-streamed answer read whole to learn its usage (and send the tokens-consumed header);
/// larger ones stream through and keep their estimate.
const MAX_BUFFERED_ANSWER: u64 = 16 << 20;

// === impl RateLimit ===

impl<S, St> RateLimit<S, St> {
    pub(super) fn new(inner: S, shared: Arc<Shared<St>>) -> Self {
        Self { inner, shared }
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

impl<S, St: LimitStore> RateLimit<S, St> {
    /// A [`RateLimitLayer`](super::RateLimitLayer) accounting limits in `store`; configure it with
    /// its builder methods.
    pub fn layer(store: Arc<St>) -> super::RateLimitLayer<St> {
        super::RateLimitLayer::new(store)
    }
}

impl<S: Clone, St> Clone for RateLimit<S, St> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<S: std::fmt::Debug, St> std::fmt::Debug for RateLimit<S, St> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimit")
            .field("inner", &self.inner)
            .finish()
    }
}

impl<S, St, ReqB, ResB> Service<Request<ReqB>> for RateLimit<S, St>
where
    S: Service<Request<ReqB>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Send,
    St: LimitStore,
    ReqB: Send + 'static,
    ResB: Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError> + Send,
{
    type Response = Response<UsageBody<ResB>>;
    type Error = S::Error;
    type Future = RateLimitFuture<Self::Response, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let shared = self.shared.clone();
        Box::pin(run(shared, inner, req))
    }
}

async fn run<S, St, ReqB, ResB>(
    shared: Arc<Shared<St>>,
    mut inner: S,
    mut req: Request<ReqB>,
) -> Result<Response<UsageBody<ResB>>, S::Error>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
    St: LimitStore,
    ResB: Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    let config = &shared.config;
    let Some(ctx) = req.extensions().get::<RequestContext>() else {
        // Without a captured context there is nothing to count: the layer is documented to sit
        // inside RequestContextLayer.
        return Ok(inner.call(req).await?.map(UsageBody::passthrough));
    };
    let deployment = ctx.deployment.clone();
    let consumer = req.extensions().get::<Consumer>().map(|c| c.name.clone());
    let entry = consumer
        .as_deref()
        .and_then(|c| config.consumers.get(c).map(|l| (c, l)));
    let checks = match entry {
        Some((name, entry)) => checks(name, deployment.as_deref(), &entry.limits),
        None => Vec::new(),
    };
    let room = entry.map(|(_, l)| &l.room);
    let default_completion = config.default_completion_tokens;
    let encoding = model_encoding(ctx, config);
    let record = req.extensions().get::<Arc<Record>>().cloned();
    let name = consumer.as_deref().unwrap_or_default();
    // Exact counting only where a limit needs it: tokenizing a long prompt costs more than
    // everything else the gateway does for a request. Routing can do with a rough figure, and a
    // limit far above the prompt's length in bytes with that length (see `Counted`).
    let mut counted = if checks.is_empty() {
        Counted::rough(rough(ctx, default_completion))
    } else {
        let room = room.map_or(u64::MAX, |r| r.load(Ordering::Relaxed));
        Counted::for_limits(ctx, encoding, default_completion, &checks, room)
    };
    // An absurd max_tokens must not overflow a counter (a store error would fail open).
    // A bound is at most a sixteenth of every token limit, so only an exact figure can be over one.
    let mut need = counted.reserved.total().min(MAX_RESERVATION);
    if let Some(res) = never_fits(name, &checks, need) {
        if let Some(record) = &record {
            record.set_estimate(counted.reserved);
        }
        return Ok(res);
    }
    let mut stored = ask_store(&shared, &checks, need).await;
    if counted.is_bound() && refused_for_tokens(&stored) {
        // The bound did not fit where the exact figure may: count, and ask again.
        counted = Counted::exact(ctx, encoding, default_completion);
        need = counted.reserved.total().min(MAX_RESERVATION);
        stored = ask_store(&shared, &checks, need).await;
    }
    if let (Some(room), Some(Ok(admission))) = (room, &stored) {
        room.store(tokens_left(admission), Ordering::Relaxed);
    }
    if let Some(record) = &record {
        record.set_estimate(counted.reserved);
    }
    // A stream that ends without usage is charged its prompt, counted exactly: now if the
    // reservation needed it, else only then (most streams report usage and never need it).
    let prompt = if checks.is_empty() && cfg!(feature = "tokenizer") && ctx.stream() {
        let ctx = ctx.clone();
        PromptTokens::Later(Box::new(move || {
            exact(&ctx, encoding, default_completion).prompt
        }))
    } else if let Some(recount) = counted.recount.clone() {
        PromptTokens::Later(Box::new(move || recount.count().prompt))
    } else {
        PromptTokens::Counted(counted.reserved.prompt)
    };
    // Chat only: whether Azure's legacy Completions accept `stream_options` is not documented.
    let stream_requested = ctx.stream();
    let streaming_chat = stream_requested && ctx.operation == Operation::ChatCompletions;
    let v1 = ctx.deployment_source == DeploymentSource::Body;
    let wants_usage_chunk = streaming_chat
        && tokens::supports_stream_usage(ctx.api_version.as_deref(), v1)
        && !ctx.json().is_some_and(|j| j.include_usage);
    req.extensions_mut().insert(counted.route);

    let (reservation, remaining) = match stored {
        None => (None, Remaining::default()),
        Some(result) => match result {
            Ok(admission) => {
                if shared.store_down.swap(false, Ordering::Relaxed) {
                    tracing::info!("limit store reachable again");
                    metrics::gauge!("gateway_limit_store_up").set(1.0);
                }
                match admission {
                    Admission::Admitted {
                        reservation,
                        remaining,
                    } => (Some(reservation), remaining),
                    Admission::Limited {
                        key,
                        kind,
                        retry_after,
                        remaining,
                    } => {
                        tracing::info!(consumer = name, %key, ?kind, "rejected: consumer rate limit");
                        if let Some(record) = &record {
                            record.set_limit(match kind {
                                LimitKind::Tokens => Limit::Tokens,
                                LimitKind::Requests => Limit::Requests,
                            });
                        }
                        let mut res = limited(name, &checks, kind, retry_after);
                        stamp(res.headers_mut(), config, &checks, &remaining);
                        return Ok(res);
                    }
                    Admission::QuotaExceeded {
                        key,
                        resets_in,
                        remaining,
                    } => {
                        tracing::info!(consumer = name, %key, "rejected: consumer quota");
                        if let Some(record) = &record {
                            record.set_limit(Limit::Quota);
                        }
                        let mut res = quota_exceeded(name, &checks, resets_in);
                        stamp(res.headers_mut(), config, &checks, &remaining);
                        return Ok(res);
                    }
                }
            }
            Err(err) => {
                if !shared.store_down.swap(true, Ordering::Relaxed) {
                    tracing::error!(error = %err, policy = ?config.on_store_error, "limit store unreachable");
                    metrics::gauge!("gateway_limit_store_up").set(0.0);
                }
                if config.on_store_error == OnStoreError::FailClosed {
                    let mut res = azure_error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "ServiceUnavailable",
                        "The gateway cannot check rate limits right now. Please retry later.",
                    );
                    // The store is not asked again before its rest is over: come back then.
                    set_retry_after(res.headers_mut(), shared.store_rest_left());
                    return Ok(res);
                }
                (None, Remaining::default())
            }
        },
    };

    // Ask for the final usage chunk, so a stream is accounted with real usage, not an estimate. The
    // edit is only recorded here; it is spliced in when each attempt's body is built.
    let mut strip_usage = false;
    if wants_usage_chunk {
        if let Some(ctx) = req.extensions_mut().get_mut::<RequestContext>() {
            ctx.ask_for_usage = true;
            strip_usage = true;
        }
    }

    // A client that goes away before the answer's headers drops this future: the reservation
    // is then released, as for a failed call, instead of holding the consumer's minute.
    let mut held = Held {
        shared: shared.clone(),
        reservation,
    };
    let res = match inner.call(req).await {
        Ok(res) => res,
        Err(err) => {
            settle(&shared, held.take().as_ref(), 0).await;
            return Err(err);
        }
    };
    let (mut parts, body) = res.into_parts();
    if held.reservation.is_some() {
        stamp(&mut parts.headers, config, &checks, &remaining);
    }
    if !parts.status.is_success() {
        // Azure does not bill refused or failed calls.
        settle(&shared, held.take().as_ref(), 0).await;
        return Ok(Response::from_parts(parts, UsageBody::passthrough(body)));
    }
    // Some backends send a stream without its content type: the request says it is one too.
    if is_event_stream(&parts.headers) || stream_requested {
        // Usage arrives at the very end of a stream: account for it from the body, when it ends.
        let reconcile = held.take().map(|r| reconciler(shared.clone(), r));
        if strip_usage {
            // The usage chunk comes out: the length the backend announced would be a lie.
            parts.headers.remove(http::header::CONTENT_LENGTH);
        }
        let counting = cfg!(feature = "tokenizer").then_some(encoding);
        let body = UsageBody::sse(body, strip_usage, prompt, counting, record, reconcile);
        return Ok(Response::from_parts(parts, body));
    }
    let size = content_length(&parts.headers).or(body.size_hint().upper());
    if size.is_none_or(|n| n > MAX_BUFFERED_ANSWER) {
        // Unknown or huge: stream it through and keep the estimate (the reservation stands).
        let charged = counted.charged();
        charged_estimate(record.as_deref(), charged.prompt, charged.completion);
        if counted.is_bound() {
            // What was reserved is a bound: charge the estimate instead, without holding the
            // answer's headers for the store.
            if let Some(reservation) = held.take() {
                reconciler(shared.clone(), reservation).fire(charged.total());
            }
        }
        let _kept = held.take();
        return Ok(Response::from_parts(parts, UsageBody::passthrough(body)));
    }
    // A JSON answer arrives whole once generation is done: reading it adds no latency worth the
    // name, and gives the tokens-consumed header and an exact reconciliation before the next call.
    // The read is bounded by the body below, not here: the failover layer's body ends one that is
    // silent too long or late for the request's deadline, the one place that deadline is known.
    match body.collect().await {
        Ok(collected) => {
            let bytes = collected.to_bytes();
            let answer = tokens::answer_from_json(&bytes);
            if let (Some(record), Some(tier)) = (&record, answer.service_tier.as_deref()) {
                record.set_service_tier(ServiceTier::from_name(tier));
            }
            let consumed = match answer.usage {
                Some(usage) => {
                    parts.headers.insert(
                        config.headers.tokens_consumed.clone(),
                        HeaderValue::from(usage.total),
                    );
                    if let Some(record) = &record {
                        record.set_usage(usage);
                    }
                    usage.total
                }
                None => {
                    let charged = counted.charged();
                    charged_estimate(record.as_deref(), charged.prompt, charged.completion);
                    charged.total()
                }
            };
            settle(&shared, held.take().as_ref(), consumed).await;
            Ok(Response::from_parts(parts, UsageBody::full(bytes)))
        }
        Err(err) => {
            let err: BoxError = err.into();
            if timed_out(&*err) {
                // The body below (the failover layer's) ran into its idle timeout or the request's
                // deadline, and said so in its log. Nothing was sent yet: the client gets a 504,
                // and as for any failed call, the reservation is released.
                tracing::debug!(error = %err, "upstream answer not complete in time");
                settle(&shared, held.take().as_ref(), 0).await;
                return Ok(azure_error(
                    StatusCode::GATEWAY_TIMEOUT,
                    "GatewayTimeout",
                    "The backend's answer did not arrive in time.",
                ));
            }
            tracing::warn!(error = %err, "upstream answer broke while being read");
            let charged = counted.charged();
            charged_estimate(record.as_deref(), charged.prompt, 0);
            settle(&shared, held.take().as_ref(), charged.prompt).await;
            Ok(azure_error(
                StatusCode::BAD_GATEWAY,
                "BadGateway",
                "The backend's answer broke before it was complete.",
            ))
        }
    }
}

/// Whether a body broke because it took too long: an [`std::io::Error`] of kind `TimedOut` anywhere
/// in its chain, as the failover layer's body ends one that is silent too long or late for the
/// request's deadline.
fn timed_out(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(err);
    while let Some(err) = next {
        if err
            .downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::TimedOut)
        {
            return true;
        }
        next = err.source();
    }
    false
}

/// Reserving an upper bound of the prompt instead of counting it is harmless while the bound is a
/// small share of every token limit and of what the consumer's last request left: requests in
/// flight then over-reserve (the bound is about four times the count for English text) only while
/// the consumer is far from its limits, and once what is left falls under this many bounds, prompts
/// are counted, so the room the over-reservations leave still admits what exact counts would, until
/// the limit is near. When the store refuses a bound, the prompt is counted and asked for again.
const BOUND_SHARE: u64 = 16;

/// The tokens an admission or refusal says are left: per minute or of the quota, the lower.
fn tokens_left(admission: &Admission) -> u64 {
    let remaining = match admission {
        Admission::Admitted { remaining, .. }
        | Admission::Limited { remaining, .. }
        | Admission::QuotaExceeded { remaining, .. } => remaining,
    };
    match (remaining.tokens, remaining.quota_tokens) {
        (Some(a), Some(b)) => a.min(b),
        (Some(a), None) | (None, Some(a)) => a,
        (None, None) => u64::MAX,
    }
}

/// A request's tokens, as the layer knows them before the call.
struct Counted {
    /// Reserved against the consumer's limits, and recorded as the request's estimate.
    reserved: Estimate,
    /// Given to routing (headroom): the exact figure when counted, else the rough one.
    route: Estimate,
    /// Set when `reserved` is an upper bound: what counts the prompt if a charge needs it.
    recount: Option<Recount>,
}

/// A request kept to be counted later.
#[derive(Clone)]
struct Recount(Arc<(RequestContext, Encoding, u64)>);

impl Recount {
    fn count(&self) -> Estimate {
        let (ctx, encoding, default_completion) = &*self.0;
        exact(ctx, *encoding, *default_completion)
    }
}

impl Counted {
    /// No limit applies: the rough figure for everything.
    fn rough(estimate: Estimate) -> Self {
        Self {
            reserved: estimate,
            route: estimate,
            recount: None,
        }
    }

    /// The prompt counted with the tokenizer.
    fn exact(ctx: &RequestContext, encoding: Encoding, default_completion: u64) -> Self {
        let estimate = exact(ctx, encoding, default_completion);
        Self {
            reserved: estimate,
            route: estimate,
            recount: None,
        }
    }

    /// What limits `checks` need: an upper bound (the prompt's length in bytes) when it is far
    /// below every token limit and the tokens the consumer's last request left (`left`), else the
    /// exact count.
    fn for_limits(
        ctx: &RequestContext,
        encoding: Encoding,
        default_completion: u64,
        checks: &[LimitCheck],
        left: u64,
    ) -> Self {
        let Some(bound) = upper_bound(ctx, encoding, default_completion) else {
            return Self::exact(ctx, encoding, default_completion);
        };
        let room = bound.total().saturating_mul(BOUND_SHARE);
        let far = room <= left
            && checks.iter().all(|c| {
                c.limits.tokens_per_minute.is_none_or(|tpm| room <= tpm)
                    && c.limits.quota.is_none_or(|q| room <= q.tokens)
            });
        if !far {
            return Self::exact(ctx, encoding, default_completion);
        }
        Self {
            reserved: bound,
            route: rough(ctx, default_completion),
            recount: Some(Recount(Arc::new((
                ctx.clone(),
                encoding,
                default_completion,
            )))),
        }
    }

    fn is_bound(&self) -> bool {
        self.recount.is_some()
    }

    /// What to charge when the backend did not say: the exact estimate (counted now if the
    /// reservation was a bound).
    fn charged(&self) -> Estimate {
        self.recount.as_ref().map_or(self.reserved, Recount::count)
    }
}

/// An upper bound of the exact estimate, from the body's one parse; `None` without the tokenizer
/// (the rough figure is all there is then) or a parse.
#[cfg(feature = "tokenizer")]
fn upper_bound(
    ctx: &RequestContext,
    encoding: Encoding,
    default_completion: u64,
) -> Option<Estimate> {
    let json = ctx.json()?;
    Some(tokens::upper_bound_parsed(
        ctx.operation,
        encoding,
        json,
        ctx.body(),
        default_completion,
    ))
}

#[cfg(not(feature = "tokenizer"))]
fn upper_bound(_: &RequestContext, _: Encoding, _: u64) -> Option<Estimate> {
    None
}

/// Asks the store for `need` tokens under `checks`: `None` when no limit applies, a store error
/// without asking while the store rests.
async fn ask_store<St: LimitStore>(
    shared: &Shared<St>,
    checks: &[LimitCheck],
    need: u64,
) -> Option<Result<Admission, StoreError>> {
    if checks.is_empty() {
        None
    } else if shared.store_resting() {
        Some(Err(StoreError(RESTING.into())))
    } else {
        let result = shared.store.reserve(checks, need).await;
        if result.is_err() {
            // Only a real failure starts a rest: skipped calls must not prolong it forever.
            shared.store_failed();
        }
        Some(result)
    }
}

/// Whether the store refused for want of tokens (which a smaller figure may change).
fn refused_for_tokens(stored: &Option<Result<Admission, StoreError>>) -> bool {
    matches!(
        stored,
        Some(Ok(Admission::Limited {
            kind: LimitKind::Tokens,
            ..
        } | Admission::QuotaExceeded { .. }))
    )
}

/// What routing needs: no tokenizer, the body's length over four plus the output limit.
fn rough(ctx: &RequestContext, default_completion: u64) -> Estimate {
    tokens::rough_estimate(
        ctx.operation,
        ctx.body().len(),
        ctx.max_tokens(),
        ctx.n(),
        default_completion,
    )
}

/// The tokenizer of the deployment's model (the deployment's own name when no model is set).
fn model_encoding(ctx: &RequestContext, config: &super::RateLimitConfig) -> Encoding {
    let model = ctx
        .deployment
        .as_deref()
        .map(|d| config.models.get(d).map_or(d, String::as_str))
        .unwrap_or_default();
    tokens::encoding_for_model(model)
}

/// Records what a call was charged when the backend did not say: the gateway's own figure.
fn charged_estimate(record: Option<&Record>, prompt: u64, completion: u64) {
    if let Some(record) = record {
        record.set_estimated_usage(Usage {
            prompt,
            completion,
            total: prompt.saturating_add(completion),
            ..Usage::default()
        });
    }
}

/// What a limit reserves: the prompt counted with the deployment's tokenizer, from the body's one
/// parse. Without the `tokenizer` feature, the rough figure.
#[cfg(feature = "tokenizer")]
fn exact(ctx: &RequestContext, encoding: Encoding, default_completion: u64) -> Estimate {
    let Some(json) = ctx.json() else {
        return rough(ctx, default_completion);
    };
    tokens::estimate_parsed(
        ctx.operation,
        encoding,
        json,
        ctx.body(),
        default_completion,
    )
}

#[cfg(not(feature = "tokenizer"))]
fn exact(ctx: &RequestContext, _: Encoding, default_completion: u64) -> Estimate {
    rough(ctx, default_completion)
}

/// Reconciles now; a store error is logged, never shown to the client, whose call already happened.
async fn settle<St: LimitStore>(
    shared: &Shared<St>,
    reservation: Option<&Reservation>,
    consumed: u64,
) {
    let Some(reservation) = reservation else {
        return;
    };
    if consumed == reservation.tokens {
        return;
    }
    if let Err(err) = shared.store.reconcile(reservation, consumed).await {
        tracing::warn!(error = %err, "could not reconcile a reservation");
    }
}

/// A reservation not settled yet. Dropped while it still holds one (the request's future was
/// dropped: the client left before the answer's headers), it releases it in the background.
struct Held<St: LimitStore> {
    shared: Arc<Shared<St>>,
    reservation: Option<Reservation>,
}

impl<St: LimitStore> Held<St> {
    /// The reservation, to settle now: this guard lets go of it.
    fn take(&mut self) -> Option<Reservation> {
        self.reservation.take()
    }
}

impl<St: LimitStore> Drop for Held<St> {
    fn drop(&mut self) {
        if let Some(reservation) = self.reservation.take() {
            tracing::debug!("request dropped before its answer: releasing its reservation");
            reconciler(self.shared.clone(), reservation).fire(0);
        }
    }
}

fn reconciler<St: LimitStore>(shared: Arc<Shared<St>>, reservation: Reservation) -> Reconcile {
    Reconcile::new(move |consumed| {
        if consumed == reservation.tokens {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        shared.reconciling.fetch_add(1, Ordering::AcqRel);
        rt.spawn(async move {
            if let Err(err) = shared.store.reconcile(&reservation, consumed).await {
                tracing::warn!(error = %err, "could not reconcile a reservation");
            }
            shared.reconciling.fetch_sub(1, Ordering::AcqRel);
            shared.reconciled.notify_waiters();
        });
    })
}

/// The limit checks for one call: the consumer's own limits, and its limits for the deployment.
fn checks(
    consumer: &str,
    deployment: Option<&str>,
    limits: &super::ConsumerLimits,
) -> Vec<LimitCheck> {
    let mut checks = Vec::with_capacity(2);
    checks.extend(limits.own_check(consumer));
    checks.extend(deployment.and_then(|d| limits.deployment_check(consumer, d)));
    checks
}

/// A request larger than a whole per-minute limit or quota would be told to retry forever: say so.
fn never_fits<B: From<Bytes>>(
    consumer: &str,
    checks: &[LimitCheck],
    need: u64,
) -> Option<Response<B>> {
    let (limit, what) = match (
        tightest(checks, |l| l.tokens_per_minute),
        tightest(checks, |l| l.quota.map(|q| q.tokens)),
    ) {
        (Some(tpm), _) if need > tpm => (tpm, "tokens per minute"),
        (_, Some(quota)) if need > quota => (quota, "tokens of quota"),
        _ => return None,
    };
    Some(azure_error(
        StatusCode::BAD_REQUEST,
        "BadRequest",
        &format!(
            "This request needs an estimated {need} tokens (prompt plus max_tokens times n), more than consumer '{consumer}' may use at all ({limit} {what}). Lower max_tokens or split the request."
        ),
    ))
}

fn tightest(checks: &[LimitCheck], f: impl Fn(&Limits) -> Option<u64>) -> Option<u64> {
    checks.iter().filter_map(|c| f(&c.limits)).min()
}

fn stamp(
    headers: &mut HeaderMap,
    config: &super::RateLimitConfig,
    checks: &[LimitCheck],
    r: &Remaining,
) {
    let h = &config.headers;
    // The consumer's figures replace the backend's, even those the consumer has no limit for.
    let mut set = |name: &http::HeaderName, value: Option<u64>| match value {
        Some(v) => {
            headers.insert(name.clone(), HeaderValue::from(v));
        }
        None => {
            headers.remove(name);
        }
    };
    set(&h.remaining_tokens, r.tokens);
    set(&h.remaining_requests, r.requests);
    set(&h.remaining_quota, r.quota_tokens);
    set(&h.limit_tokens, tightest(checks, |l| l.tokens_per_minute));
    set(
        &h.limit_requests,
        tightest(checks, |l| l.requests_per_minute),
    );
}

fn limited<B: From<Bytes>>(
    consumer: &str,
    checks: &[LimitCheck],
    kind: LimitKind,
    retry_after: Duration,
) -> Response<B> {
    let what = match kind {
        LimitKind::Tokens => format!(
            "token rate limit of {} tokens per minute",
            tightest(checks, |l| l.tokens_per_minute).unwrap_or_default()
        ),
        LimitKind::Requests => format!(
            "call rate limit of {} requests per minute",
            tightest(checks, |l| l.requests_per_minute).unwrap_or_default()
        ),
    };
    let mut res = too_many_requests(
        &format!("Consumer '{consumer}' exceeded its {what} at the gateway."),
        retry_after,
    );
    res.headers_mut().insert(
        X_GATEWAY_LIMIT.clone(),
        HeaderValue::from_static(match kind {
            LimitKind::Tokens => "tokens",
            LimitKind::Requests => "requests",
        }),
    );
    res
}

fn quota_exceeded<B: From<Bytes>>(
    consumer: &str,
    checks: &[LimitCheck],
    resets_in: Duration,
) -> Response<B> {
    let quota = checks
        .iter()
        .filter_map(|c| c.limits.quota)
        .min_by_key(|q| q.tokens);
    let (tokens, period) = quota.map_or((0, "period".to_string()), |q| {
        (q.tokens, format!("{:?}", q.period).to_lowercase())
    });
    let at = httpdate::fmt_http_date(SystemTime::now() + resets_in);
    let mut res = azure_error(
        StatusCode::FORBIDDEN,
        "QuotaExceeded",
        &format!(
            "Consumer '{consumer}' used its {period} token quota of {tokens} tokens. The quota resets in {} seconds, at {at}.",
            resets_in.as_secs().max(1)
        ),
    );
    res.headers_mut()
        .insert(X_GATEWAY_LIMIT.clone(), HeaderValue::from_static("quota"));
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_cover_consumer_and_deployment() {
        let limits = super::super::ConsumerLimits::all(Limits {
            tokens_per_minute: Some(100),
            ..Limits::default()
        })
        .deployment(
            "gpt-4o",
            Limits {
                requests_per_minute: Some(3),
                ..Limits::default()
            },
        );
        let c = checks("app", Some("gpt-4o"), &limits);
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].key, "consumer:app");
        assert_eq!(c[1].key, "consumer:app:deployment:gpt-4o");
        assert_eq!(checks("app", Some("o3"), &limits).len(), 1);
    }
}
