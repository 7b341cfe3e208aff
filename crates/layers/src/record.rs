//! The one record of a request: what happened to it, built once and read by every observer.
//!
//! [`RequestContextLayer`](crate::RequestContextLayer) creates one [`Record`] per request and puts it,
//! as an `Arc<Record>`, in the request extensions (for the layers that learn something) and in the
//! response extensions (for the observers outside). Each fact has one writer:
//!
//! | fact | written by |
//! |---|---|
//! | request id, operation, deployment, stream, `max_tokens` | the context layer ([`Record::request`]) |
//! | the consumer | [`ConsumerAuthLayer`](crate::ConsumerAuthLayer) |
//! | estimate, limit verdict, real usage, the tokens charged | [`RateLimitLayer`](crate::RateLimitLayer) |
//! | who served, every attempt | [`FailoverLayer`](crate::FailoverLayer) |
//!
//! The context layer's response body, [`RecordBody`], is the one place that sees the end of the
//! response: when the body ends, breaks, or is dropped by a client that went away, it calls every hook
//! registered with [`Record::on_end`], once. Metrics, access logs and trace spans are such hooks.
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use axum::{Router, body::Body, routing::post};
//! use gateway_layers::RequestContextLayer;
//! use gateway_layers::record::{End, Record};
//! use http_body_util::BodyExt;
//! use tower::ServiceExt;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let app = Router::new()
//!     .route("/openai/deployments/{d}/embeddings", post(|| async { "{}" }))
//!     .layer(RequestContextLayer::new(1 << 20));
//! let req = http::Request::post("/openai/deployments/emb/embeddings")
//!     .body(Body::from(r#"{"input":"hi"}"#))
//!     .unwrap();
//! let res = app.oneshot(req).await.unwrap();
//!
//! let seen = Arc::new(Mutex::new(None));
//! let record = res.extensions().get::<Arc<Record>>().unwrap().clone();
//! let s = seen.clone();
//! record.on_end(move |record, end| {
//!     let deployment = record.request().and_then(|r| r.deployment.clone());
//!     *s.lock().unwrap() = Some((deployment, end));
//! });
//! res.into_body().collect().await.unwrap();
//! assert_eq!(*seen.lock().unwrap(), Some((Some("emb".to_string()), End::Complete)));
//! # }
//! ```

use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::task::{Context, Poll};

use bytes::Buf;
use gateway_core::operation::Operation;
use gateway_core::tokens::{Estimate, Usage};
use http::HeaderValue;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::context::RequestContext;
use crate::failover::FailoverReport;

/// What happened to one request. See the [module docs](self).
pub struct Record {
    request_id: HeaderValue,
    request: Option<RequestSummary>,
    consumer: OnceLock<Arc<str>>,
    failover: OnceLock<FailoverReport>,
    limit: OnceLock<Limit>,
    estimate: OnceLock<Estimate>,
    usage: OnceLock<Usage>,
    estimated_usage: OnceLock<Usage>,
    service_tier: OnceLock<ServiceTier>,
    /// Set when the server cut the response at the end of its shutdown grace.
    shutdown: OnceLock<()>,
    end: Mutex<EndState>,
}

/// A `service_tier`, as requested or as served, among the values Azure documents; any other is
/// [`Other`](ServiceTier::Other), so labels made of it stay few.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ServiceTier {
    /// `auto`.
    Auto,
    /// `default`: standard processing.
    Default,
    /// `flex`.
    Flex,
    /// `priority`.
    Priority,
    /// Any other value.
    Other,
}

/// The tokens a request was charged: what the consumer's limits counted, what metrics and the
/// access log show. See [`Record::charged`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Charge {
    /// The tokens.
    pub usage: Usage,
    /// True when the backend never reported usage and the gateway measured it itself.
    pub estimated: bool,
}

/// What observers need of the request: a few small values, not its body or its parse.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestSummary {
    /// The kind of call.
    pub operation: Operation,
    /// The logical deployment the client called, if any.
    pub deployment: Option<String>,
    /// Whether the client asked for a stream.
    pub stream: bool,
    /// The output limit the request named.
    pub max_tokens: Option<u64>,
    /// The `service_tier` the request asked for, if it named one.
    pub service_tier: Option<ServiceTier>,
}

/// Which of the consumer's limits the gateway answered with, on its own 429 or 403.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    /// Tokens per minute.
    Tokens,
    /// Requests per minute.
    Requests,
    /// The token quota of the period.
    Quota,
}

/// How a response ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// Sent whole.
    Complete,
    /// The body failed mid-way.
    Error,
    /// The client went away first.
    ClientClosed,
}

type Hook = Box<dyn FnOnce(&Record, End) + Send>;

enum EndState {
    Open(Vec<Hook>),
    Ended(End),
}

pin_project! {
    /// Response body of the context layer: passes the body through untouched, and ends the
    /// [`Record`] once it ends, breaks, or is dropped unfinished.
    pub struct RecordBody<B> {
        // Declared first, so dropped first: a body inside that settles its accounting when dropped
        // (a stream the client left) has written to the record before the hooks read it.
        #[pin]
        inner: B,
        pending: Pending,
    }
}

/// A record not ended yet. Dropping it unended means the client left before the end.
struct Pending {
    record: Option<Arc<Record>>,
    /// Bytes still to send when the length is known: the body is complete once they are sent, even
    /// if the server never polls it again to learn so.
    remaining: Option<u64>,
}

// === impl Record ===

impl Record {
    /// A record of the request `request` (summed up: neither its body nor its parse is kept),
    /// answered with `request_id`.
    pub fn new(request_id: HeaderValue, request: Option<&RequestContext>) -> Self {
        Self {
            request_id,
            request: request.map(|ctx| RequestSummary {
                operation: ctx.operation,
                deployment: ctx.deployment.clone(),
                stream: ctx.stream(),
                max_tokens: ctx.max_tokens(),
                service_tier: ctx
                    .json()
                    .and_then(|j| j.service_tier())
                    .map(ServiceTier::from_name),
            }),
            consumer: OnceLock::new(),
            failover: OnceLock::new(),
            limit: OnceLock::new(),
            estimate: OnceLock::new(),
            usage: OnceLock::new(),
            estimated_usage: OnceLock::new(),
            service_tier: OnceLock::new(),
            shutdown: OnceLock::new(),
            end: Mutex::new(EndState::Open(Vec::new())),
        }
    }

    /// The id the request is answered with.
    pub fn request_id(&self) -> &HeaderValue {
        &self.request_id
    }

    /// The captured request, summed up; `None` when it was refused before it could be read.
    pub fn request(&self) -> Option<&RequestSummary> {
        self.request.as_ref()
    }

    /// The consumer that called, once authenticated.
    pub fn consumer(&self) -> Option<&Arc<str>> {
        self.consumer.get()
    }

    /// Records the consumer (the first call wins).
    pub fn set_consumer(&self, name: Arc<str>) {
        let _ = self.consumer.set(name);
    }

    /// The backend that served and every attempt made, once the failover layer answered.
    pub fn failover(&self) -> Option<&FailoverReport> {
        self.failover.get()
    }

    /// Records the failover report. The first call wins: a stack that calls the failover service
    /// more than once per request (a retry around it) is not supported.
    pub fn set_failover(&self, report: FailoverReport) {
        let _ = self.failover.set(report);
    }

    /// The limit the gateway refused the request on, if it did.
    pub fn limit(&self) -> Option<Limit> {
        self.limit.get().copied()
    }

    /// Records a refusal on a consumer limit.
    pub fn set_limit(&self, limit: Limit) {
        let _ = self.limit.set(limit);
    }

    /// What the request was estimated (and reserved) at before the call.
    pub fn estimate(&self) -> Option<Estimate> {
        self.estimate.get().copied()
    }

    /// Records the estimate.
    pub fn set_estimate(&self, estimate: Estimate) {
        let _ = self.estimate.set(estimate);
    }

    /// The usage the backend reported: at once for a JSON answer, at its end for a stream; `None`
    /// when it never told (a stream cut short or without a usage chunk).
    pub fn usage(&self) -> Option<Usage> {
        self.usage.get().copied()
    }

    /// Records the backend's usage.
    pub fn set_usage(&self, usage: Usage) {
        let _ = self.usage.set(usage);
    }

    /// Records what the call was charged when the backend did not say (a stream without a usage
    /// chunk, one cut short, a JSON answer without `usage`): the gateway's own measure. The first
    /// call wins, and the backend's usage, when it is known, wins over it.
    pub fn set_estimated_usage(&self, usage: Usage) {
        let _ = self.estimated_usage.set(usage);
    }

    /// The tokens the call was charged: the backend's usage when it told, else the gateway's
    /// estimate of what was consumed; `None` when nothing was charged (a refused or failed call, or
    /// no rate-limit layer). The consumer's limits, metrics and the access log all use this figure.
    ///
    /// ```
    /// use gateway_core::tokens::Usage;
    /// use gateway_layers::record::{Charge, Record};
    ///
    /// let record = Record::new(http::HeaderValue::from_static("r"), None);
    /// assert_eq!(record.charged(), None);
    /// let measured = Usage { prompt: 9, completion: 3, total: 12, ..Usage::default() };
    /// record.set_estimated_usage(measured);
    /// assert_eq!(record.charged(), Some(Charge { usage: measured, estimated: true }));
    /// let told = Usage { prompt: 9, completion: 4, total: 13, ..Usage::default() };
    /// record.set_usage(told);
    /// assert_eq!(record.charged(), Some(Charge { usage: told, estimated: false }));
    /// ```
    pub fn charged(&self) -> Option<Charge> {
        match (self.usage.get(), self.estimated_usage.get()) {
            (Some(&usage), _) => Some(Charge {
                usage,
                estimated: false,
            }),
            (None, Some(&usage)) => Some(Charge {
                usage,
                estimated: true,
            }),
            (None, None) => None,
        }
    }

    /// The `service_tier` the answer said it was served at (for a stream, its last event naming
    /// one), when it named one: `priority` traffic that Azure served at `default` shows here.
    pub fn service_tier(&self) -> Option<ServiceTier> {
        self.service_tier.get().copied()
    }

    /// Records the tier the answer was served at (the first call wins).
    pub fn set_service_tier(&self, tier: ServiceTier) {
        let _ = self.service_tier.set(tier);
    }

    /// Notes that the server cut the response because it shut down (its grace period ended), so
    /// that the end is not mistaken for the client's leaving. Call it before the body is dropped.
    pub fn set_shutdown(&self) {
        let _ = self.shutdown.set(());
    }

    /// Whether the server cut the response because it shut down.
    pub fn shutdown(&self) -> bool {
        self.shutdown.get().is_some()
    }

    /// Calls `hook` once when the response ends (at once if it already has).
    pub fn on_end(&self, hook: impl FnOnce(&Record, End) + Send + 'static) {
        let mut state = self.end.lock().unwrap_or_else(PoisonError::into_inner);
        match &mut *state {
            EndState::Open(hooks) => hooks.push(Box::new(hook)),
            EndState::Ended(end) => {
                let end = *end;
                drop(state);
                hook(self, end);
            }
        }
    }

    /// Ends the record: runs the hooks, once.
    fn finish(&self, end: End) {
        let hooks = {
            let mut state = self.end.lock().unwrap_or_else(PoisonError::into_inner);
            match std::mem::replace(&mut *state, EndState::Ended(end)) {
                EndState::Open(hooks) => hooks,
                // Already ended: keep the first ending.
                ended @ EndState::Ended(_) => {
                    *state = ended;
                    return;
                }
            }
        };
        for hook in hooks {
            hook(self, end);
        }
    }
}

impl std::fmt::Debug for Record {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Record")
            .field("request_id", &self.request_id)
            .field("consumer", &self.consumer.get())
            .field("limit", &self.limit.get())
            .field("usage", &self.usage.get())
            .finish_non_exhaustive()
    }
}

// === impl Limit ===

impl Limit {
    /// `tokens`, `requests` or `quota`: the value of `x-gateway-limit`, and a metric label.
    pub fn as_str(&self) -> &'static str {
        match self {
            Limit::Tokens => "tokens",
            Limit::Requests => "requests",
            Limit::Quota => "quota",
        }
    }
}

// === impl ServiceTier ===

impl ServiceTier {
    /// The tier named `name` (case-insensitive); [`Other`](ServiceTier::Other) when unknown.
    ///
    /// ```
    /// use gateway_layers::record::ServiceTier;
    ///
    /// assert_eq!(ServiceTier::from_name("priority"), ServiceTier::Priority);
    /// assert_eq!(ServiceTier::from_name("Default").as_str(), "default");
    /// assert_eq!(ServiceTier::from_name("scale-9000").as_str(), "other");
    /// ```
    pub fn from_name(name: &str) -> Self {
        let is = |known: &str| name.trim().eq_ignore_ascii_case(known);
        match () {
            _ if is("auto") => ServiceTier::Auto,
            _ if is("default") => ServiceTier::Default,
            _ if is("flex") => ServiceTier::Flex,
            _ if is("priority") => ServiceTier::Priority,
            _ => ServiceTier::Other,
        }
    }

    /// The tier's name, as Azure writes it (`other` for an unknown one): a metric label.
    pub fn as_str(&self) -> &'static str {
        match self {
            ServiceTier::Auto => "auto",
            ServiceTier::Default => "default",
            ServiceTier::Flex => "flex",
            ServiceTier::Priority => "priority",
            ServiceTier::Other => "other",
        }
    }
}

// === impl RecordBody ===

impl<B: Body> RecordBody<B> {
    /// Ends `record` with `inner`, whose length (when known) is `length`.
    pub fn new(inner: B, record: Arc<Record>, length: Option<u64>) -> Self {
        let mut pending = Pending {
            record: Some(record),
            remaining: length.or_else(|| inner.size_hint().exact()),
        };
        // The server never polls a body that is already over (e.g. an empty error answer).
        if inner.is_end_stream() || pending.remaining == Some(0) {
            pending.finish(End::Complete);
        }
        Self { inner, pending }
    }
}

impl<B: Body> Body for RecordBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let mut this = self.project();
        let polled = std::task::ready!(this.inner.as_mut().poll_frame(cx));
        match &polled {
            Some(Ok(frame)) => {
                if let (Some(data), Some(left)) =
                    (frame.data_ref(), this.pending.remaining.as_mut())
                {
                    *left = left.saturating_sub(data.remaining() as u64);
                }
                if this.inner.is_end_stream() || this.pending.remaining == Some(0) {
                    this.pending.finish(End::Complete);
                }
            }
            Some(Err(_)) => this.pending.finish(End::Error),
            None => this.pending.finish(End::Complete),
        }
        Poll::Ready(polled)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

// === impl Pending ===

impl Pending {
    fn finish(&mut self, end: End) {
        if let Some(record) = self.record.take() {
            record.finish(end);
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.finish(End::ClientClosed);
    }
}
