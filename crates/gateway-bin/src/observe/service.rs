use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use gateway_layers::record::{End, Record};
use http::{Request, Response};
use metrics::{counter, histogram};
use pin_project_lite::pin_project;
use tower::Service;

use super::metrics::{FAILOVERS, LIMIT_REJECTIONS, OVERHEAD, UPSTREAM_ATTEMPTS, UPSTREAM_TTFB};
use super::observation::Observation;
use super::{Shared, UNKNOWN};

/// Service produced by [`ObserveLayer`](super::ObserveLayer).
#[derive(Clone, Debug)]
pub struct Observe<S> {
    inner: S,
    shared: Arc<Shared>,
}

pin_project! {
    /// Response future of [`Observe`]: records what is known once the response headers are ready,
    /// and registers the rest with the request's [`Record`], to run when its body ends.
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        start: Instant,
        wall: SystemTime,
        shared: Arc<Shared>,
        client: Option<IpAddr>,
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
{
    type Response = Response<ResB>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        // Set by `serve` from the accepted socket; a copy of the address, no allocation.
        let client = req
            .extensions()
            .get::<axum::extract::ConnectInfo<SocketAddr>>()
            .map(|c| c.0.ip());
        ResponseFuture {
            client,
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
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let res = std::task::ready!(this.inner.poll(cx))?;
        let record = res.extensions().get::<Arc<Record>>();
        let observation = on_headers(
            this.shared,
            &res,
            record.map(|r| &**r),
            *this.start,
            *this.wall,
            *this.client,
        );
        match record {
            // The rest is known when the body ends: the record's one end-of-body hook.
            Some(record) => record.on_end(move |record, end| observation.finish(Some(record), end)),
            // No context layer inside: nothing will say when the body ends.
            None => observation.finish(None, End::Complete),
        }
        Poll::Ready(Ok(res))
    }
}

/// Records what the response headers tell, and keeps what the end of the body will need.
fn on_headers<B>(
    shared: &Arc<Shared>,
    res: &Response<B>,
    record: Option<&Record>,
    start: Instant,
    wall: SystemTime,
    client: Option<IpAddr>,
) -> Observation {
    let ttfb = start.elapsed();
    let mut upstream = Duration::ZERO;
    if let Some(report) = record.and_then(Record::failover) {
        let last = report.attempts.len().saturating_sub(1);
        for (i, a) in report.attempts.iter().enumerate() {
            upstream += a.elapsed;
            let (Some(labels), Some(handles)) = (
                shared.backend(a.backend),
                shared.handles.backends.get(a.backend.0),
            ) else {
                continue;
            };
            let outcome = super::outcome_index(a.outcome);
            handles.attempts[outcome]
                .get_or_init(|| {
                    counter!(
                        UPSTREAM_ATTEMPTS,
                        "backend" => labels.name.clone(),
                        "region" => labels.region.clone(),
                        "outcome" => a.outcome.as_str(),
                    )
                })
                .increment(1);
            // A timeout or a refused connection has no first byte to time.
            if a.status.is_some() {
                handles
                    .ttfb
                    .get_or_init(|| histogram!(UPSTREAM_TTFB, "backend" => labels.name.clone()))
                    .record(a.elapsed.as_secs_f64());
                shared.latency.observe(a.backend, a.elapsed);
            }
            if i < last {
                shared.handles.failovers[outcome]
                    .get_or_init(|| counter!(FAILOVERS, "reason" => a.outcome.as_str()))
                    .increment(1);
            }
        }
    }
    let overhead = ttfb.saturating_sub(upstream);
    shared
        .handles
        .overhead
        .get_or_init(|| histogram!(OVERHEAD))
        .record(overhead.as_secs_f64());
    if let Some(limit) = record.and_then(Record::limit) {
        let consumer = shared.consumer(record.and_then(Record::consumer));
        counter!(LIMIT_REJECTIONS, "consumer" => consumer, "limit" => limit.as_str()).increment(1);
    }

    let deployment_name = record
        .and_then(Record::request)
        .and_then(|c| c.deployment.as_deref());
    let deployment = shared.deployment(deployment_name);
    // The log names what the client asked for; a copy is made only when it is not in the policy.
    let undeclared = deployment_name
        .filter(|_| &*deployment == UNKNOWN)
        .map(str::to_owned);
    Observation {
        shared: shared.clone(),
        start,
        wall,
        ttfb,
        overhead,
        status: res.status().as_u16(),
        deployment,
        undeclared,
        client,
    }
}
