use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use gateway_layers::auth::Consumer;
use gateway_layers::context::RequestContext;
use gateway_layers::failover::FailoverReport;
use gateway_layers::headers::{X_GATEWAY_LIMIT, X_REQUEST_ID};
use gateway_layers::ratelimit::UsageReport;
use http::{Request, Response, header};
use http_body::Body;
use metrics::{counter, histogram};
use pin_project_lite::pin_project;
use tower::Service;

use super::body::{ObserveBody, Record};
use super::metrics::{FAILOVERS, LIMIT_REJECTIONS, OVERHEAD, UPSTREAM_ATTEMPTS, UPSTREAM_TTFB};
use super::{Shared, UNKNOWN};

/// Service produced by [`ObserveLayer`](super::ObserveLayer).
#[derive(Clone, Debug)]
pub struct Observe<S> {
    inner: S,
    shared: Arc<Shared>,
}

pin_project! {
    /// Response future of [`Observe`]: records what is known once the response headers are ready,
    /// and hands the rest to the [`ObserveBody`].
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        start: Instant,
        wall: SystemTime,
        shared: Arc<Shared>,
    }
}

// === impl Observe ===

impl<S> Observe<S> {
    pub(super) fn new(inner: S, shared: Arc<Shared>) -> Self {
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

impl<S, ReqB, ResB> Service<Request<ReqB>> for Observe<S>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
    ResB: Body,
{
    type Response = Response<ObserveBody<ResB>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        ResponseFuture {
            start: Instant::now(),
            wall: SystemTime::now(),
            inner: self.inner.call(req),
            shared: self.shared.clone(),
        }
    }
}

// === impl ResponseFuture ===

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: Body,
{
    type Output = Result<Response<ObserveBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let res = std::task::ready!(this.inner.poll(cx))?;
        let record = on_headers(this.shared, &res, *this.start, *this.wall);
        let length = content_length(&res);
        Poll::Ready(Ok(res.map(|body| ObserveBody::new(body, record, length))))
    }
}

/// Records what the response headers tell, and captures what the end of the body will need.
fn on_headers<B>(
    shared: &Arc<Shared>,
    res: &Response<B>,
    start: Instant,
    wall: SystemTime,
) -> Box<Record> {
    let ttfb = start.elapsed();
    let ext = res.extensions();
    let ctx = ext.get::<RequestContext>();
    let consumer = ext.get::<Consumer>();
    let report = ext.get::<FailoverReport>().cloned();
    let limit = res
        .headers()
        .get(&X_GATEWAY_LIMIT)
        .and_then(|v| match v.as_bytes() {
            b"tokens" => Some("tokens"),
            b"requests" => Some("requests"),
            b"quota" => Some("quota"),
            _ => None,
        });

    let mut upstream = Duration::ZERO;
    if let Some(report) = &report {
        let last = report.attempts.len().saturating_sub(1);
        for (i, a) in report.attempts.iter().enumerate() {
            upstream += a.elapsed;
            let Some(labels) = shared.backend(a.backend) else {
                continue;
            };
            counter!(
                UPSTREAM_ATTEMPTS,
                "backend" => labels.name.clone(),
                "region" => labels.region.clone(),
                "outcome" => a.outcome.as_str(),
            )
            .increment(1);
            // A timeout or a refused connection has no first byte to time.
            if a.status.is_some() {
                histogram!(UPSTREAM_TTFB, "backend" => labels.name.clone())
                    .record(a.elapsed.as_secs_f64());
                shared.latency.observe(a.backend, a.elapsed);
            }
            if i < last {
                counter!(FAILOVERS, "reason" => a.outcome.as_str()).increment(1);
            }
        }
    }
    let overhead = ttfb.saturating_sub(upstream);
    histogram!(OVERHEAD).record(overhead.as_secs_f64());
    if let Some(limit) = limit {
        counter!(LIMIT_REJECTIONS, "consumer" => shared.consumer(consumer.map(|c| &c.name)), "limit" => limit)
            .increment(1);
    }

    let deployment_name = ctx.and_then(|c| c.deployment.as_deref());
    let deployment = shared.deployment(deployment_name);
    // The log names what the client asked for; a copy is made only when it is not in the policy.
    let undeclared = deployment_name
        .filter(|_| &*deployment == UNKNOWN)
        .map(str::to_owned);
    Box::new(Record {
        shared: shared.clone(),
        start,
        wall,
        ttfb,
        overhead,
        status: res.status().as_u16(),
        request_id: res.headers().get(&X_REQUEST_ID).cloned(),
        operation: ctx.map_or(UNKNOWN, |c| c.operation.as_str()),
        deployment,
        undeclared,
        stream: ctx.is_some_and(RequestContext::stream),
        consumer: consumer.map(|c| c.name.clone()),
        usage: ext.get::<UsageReport>().cloned(),
        report,
        limit,
    })
}

/// The body length the client was promised, if any: the body is complete once that much went out,
/// whether or not the server polls it again.
fn content_length<B: Body>(res: &Response<B>) -> Option<u64> {
    res.headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .or_else(|| res.body().size_hint().exact())
}
