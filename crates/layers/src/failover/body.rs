use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use gateway_core::pool::{BackendId, BackendPool, InFlight, Outcome};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::BoxError;
use crate::body::MaybeFull;

pin_project! {
    /// Response body of the failover layer: the upstream body streamed through untouched, or an answer
    /// the gateway wrote itself.
    ///
    /// When an upstream body breaks mid-way, the backend is charged with a failure; a Server-Sent Events
    /// stream then ends with an `event: error` frame (and no `[DONE]`), so clients see it is incomplete.
    /// A body silent for longer than the idle timeout counts as broken too.
    pub struct FailoverBody<B> {
        #[pin]
        inner: MaybeFull<B>,
        #[pin]
        idle: Option<tokio::time::Sleep>,
        watch: Option<StreamWatch>,
    }
}

pub(super) struct StreamWatch {
    pub(super) pool: Arc<BackendPool>,
    pub(super) id: BackendId,
    pub(super) deployment: String,
    pub(super) sse: bool,
    pub(super) idle_timeout: Duration,
    /// Keeps the attempt counted as in flight on its backend until the body ends or breaks.
    pub(super) _in_flight: InFlight,
}

// === impl FailoverBody ===

impl<B> FailoverBody<B> {
    pub(super) fn upstream(body: B, watch: Option<StreamWatch>) -> Self {
        let idle = watch.as_ref().map(|w| tokio::time::sleep(w.idle_timeout));
        Self {
            inner: MaybeFull::stream(body),
            idle,
            watch,
        }
    }

    /// A body the gateway wrote itself.
    pub fn full(data: Bytes) -> Self {
        Self {
            inner: MaybeFull::full(data),
            idle: None,
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
                if let (Some(idle), Some(watch)) =
                    (this.idle.as_mut().as_pin_mut(), this.watch.as_ref())
                {
                    idle.reset(tokio::time::Instant::now() + watch.idle_timeout);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                this.inner.end();
                this.idle.set(None);
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(err))) => {
                this.inner.end();
                this.idle.set(None);
                Poll::Ready(broken(this.watch.take(), err.into()))
            }
            Poll::Pending => {
                let silent_too_long = this
                    .idle
                    .as_mut()
                    .as_pin_mut()
                    .is_some_and(|idle| idle.poll(cx).is_ready());
                if !silent_too_long {
                    return Poll::Pending;
                }
                this.inner.end();
                this.idle.set(None);
                let secs = this.watch.as_ref().map_or(0, |w| w.idle_timeout.as_secs());
                let err: BoxError = format!("no data from upstream for {secs} s").into();
                Poll::Ready(broken(this.watch.take(), err))
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

/// Charges the backend with a broken stream and decides what the client sees: an SSE error event,
/// or (for other bodies) the error, which aborts the connection.
fn broken(watch: Option<StreamWatch>, err: BoxError) -> Option<Result<Frame<Bytes>, BoxError>> {
    let Some(watch) = watch else {
        return Some(Err(err));
    };
    watch.pool.record(
        watch.id,
        &watch.deployment,
        Outcome::StreamBroken,
        // tokio's clock, as for every other outcome the layer records.
        tokio::time::Instant::now().into_std(),
    );
    let backend = &watch.pool.get(watch.id).name;
    tracing::warn!(%backend, error = %err, "upstream stream broke mid-way");
    if watch.sse {
        Some(Ok(Frame::data(stream_error_event(backend))))
    } else {
        Some(Err(err))
    }
}

fn stream_error_event(backend: &str) -> Bytes {
    let data = serde_json::json!({
        "error": {
            "code": "upstream_stream_broken",
            "message": format!("The stream from backend '{backend}' broke before it completed; the response is incomplete."),
        }
    });
    // The blank lines first end any event the upstream left half-written, so this one is seen whole.
    Bytes::from(format!("\n\nevent: error\ndata: {data}\n\n"))
}
