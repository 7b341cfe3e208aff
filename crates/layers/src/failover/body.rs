use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use gateway_core::pool::{BackendId, BackendPool, InFlight, Outcome};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::Instant;

use crate::BoxError;
use crate::body::MaybeFull;

pin_project! {
    /// Response body of the failover layer: the upstream body streamed through untouched, or an answer
    /// the gateway wrote itself.
    ///
    /// Every upstream body is bounded in time. A body silent for longer than the stream idle timeout
    /// is broken off; so is a body that is not a stream (a JSON answer, an error passed through) and
    /// is still arriving at the request's deadline, since its headers promised the answer was done.
    /// A Server-Sent Events body then ends with an `event: error` frame (and no `[DONE]`), so clients
    /// see it is incomplete; any other body ends with an error, which aborts it. That error is an
    /// [`std::io::Error`] of kind [`TimedOut`](std::io::ErrorKind::TimedOut), so a layer that reads
    /// the body whole can answer 504 rather than 502. A body the backend served that breaks is
    /// reported to the pool as [`Outcome::StreamBroken`], which the circuit breaker does not count.
    pub struct FailoverBody<B> {
        #[pin]
        inner: MaybeFull<B>,
        // One timer for both bounds: it fires at the next frame's idle limit or the deadline,
        // whichever comes first.
        #[pin]
        timer: Option<tokio::time::Sleep>,
        limits: BodyLimits,
        watch: Option<StreamWatch>,
    }
}

/// How long an upstream body may take.
#[derive(Clone, Copy, Debug)]
pub(super) struct BodyLimits {
    /// Longest silence between frames.
    pub(super) idle: Duration,
    /// When the whole body must have arrived; `None` for a stream, whose generation takes as long as
    /// it takes (the idle timeout still bounds it).
    pub(super) deadline: Option<Instant>,
    /// A Server-Sent Events body: it ends with an error event rather than an abort.
    pub(super) sse: bool,
}

/// A body the backend served: its failure is reported to the pool, and it holds the backend's
/// in-flight count until it ends.
pub(super) struct StreamWatch {
    pub(super) pool: Arc<BackendPool>,
    pub(super) id: BackendId,
    pub(super) deployment: String,
    /// Keeps the attempt counted as in flight on its backend until the body ends or breaks.
    pub(super) _in_flight: InFlight,
}

// === impl FailoverBody ===

impl<B> FailoverBody<B> {
    /// An upstream body bounded by `limits`; `watch` when the backend served it (rather than an
    /// error passed through as it is, already charged).
    pub(super) fn upstream(body: B, limits: BodyLimits, watch: Option<StreamWatch>) -> Self {
        Self {
            inner: MaybeFull::stream(body),
            timer: Some(tokio::time::sleep_until(limits.next_limit(Instant::now()))),
            limits,
            watch,
        }
    }

    /// A body the gateway wrote itself.
    pub fn full(data: Bytes) -> Self {
        Self {
            inner: MaybeFull::full(data),
            timer: None,
            limits: BodyLimits {
                idle: Duration::MAX,
                deadline: None,
                sse: false,
            },
            watch: None,
        }
    }
}

impl<B> From<Bytes> for FailoverBody<B> {
    fn from(data: Bytes) -> Self {
        Self::full(data)
    }
}

impl<B> Body for FailoverBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        if !this.inner.is_stream() {
            return this.inner.poll_frame(cx).map_err(Into::into);
        }
        match this.inner.as_mut().poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(timer) = this.timer.as_mut().as_pin_mut() {
                    timer.reset(this.limits.next_limit(Instant::now()));
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                this.inner.end();
                this.timer.set(None);
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(err))) => {
                this.inner.end();
                this.timer.set(None);
                Poll::Ready(broken(this.watch.take(), this.limits.sse, err.into()))
            }
            Poll::Pending => {
                let due = this
                    .timer
                    .as_mut()
                    .as_pin_mut()
                    .is_some_and(|timer| timer.poll(cx).is_ready());
                if !due {
                    return Poll::Pending;
                }
                this.inner.end();
                this.timer.set(None);
                let err = this.limits.timed_out(Instant::now());
                Poll::Ready(broken(this.watch.take(), this.limits.sse, err))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

// === impl BodyLimits ===

impl BodyLimits {
    /// When the body is cut if no frame comes before: the idle limit, or the deadline if sooner.
    fn next_limit(&self, now: Instant) -> Instant {
        let idle = now.checked_add(self.idle).unwrap_or_else(far_future);
        self.deadline.map_or(idle, |deadline| deadline.min(idle))
    }

    /// The error for a body cut at `now`: which bound it ran into.
    fn timed_out(&self, now: Instant) -> BoxError {
        let message = match self.deadline {
            Some(deadline) if now >= deadline => {
                "the upstream body was not complete by the request's deadline".to_owned()
            }
            _ => format!("no data from upstream for {} ms", self.idle.as_millis()),
        };
        Box::new(std::io::Error::new(std::io::ErrorKind::TimedOut, message))
    }
}

/// Far enough to never fire, near enough not to overflow the timer (about 30 years, as tokio does).
fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86400 * 365 * 30)
}

/// Reports a broken body the backend served (logged; no circuit failure), and decides what the
/// client sees: an SSE error event, or (for other bodies) the error, which aborts the connection.
fn broken(
    watch: Option<StreamWatch>,
    sse: bool,
    err: BoxError,
) -> Option<Result<Frame<Bytes>, BoxError>> {
    let backend = watch.as_ref().map(|watch| {
        watch.pool.record(
            watch.id,
            &watch.deployment,
            Outcome::StreamBroken,
            // tokio's clock, as for every other outcome the layer records.
            Instant::now().into_std(),
        );
        watch.pool.get(watch.id).name.clone()
    });
    let name = backend.as_deref().unwrap_or("the backend");
    tracing::warn!(backend = name, error = %err, "upstream body broke mid-way");
    if sse {
        Some(Ok(Frame::data(stream_error_event(backend.as_deref()))))
    } else {
        Some(Err(err))
    }
}

fn stream_error_event(backend: Option<&str>) -> Bytes {
    let message = match backend {
        Some(backend) => format!(
            "The stream from backend '{backend}' broke before it completed; the response is incomplete."
        ),
        None => "The stream broke before it completed; the response is incomplete.".to_owned(),
    };
    let data = serde_json::json!({
        "error": {
            "code": "upstream_stream_broken",
            "message": message,
        }
    });
    // The blank lines first end any event the upstream left half-written, so this one is seen whole.
    Bytes::from(format!("\n\nevent: error\ndata: {data}\n\n"))
}
