use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use gateway_core::pool::{BackendId, BackendPool, Outcome};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::BoxError;

pin_project! {
    /// Response body of the failover layer: the upstream body streamed through untouched, or an answer
    /// the gateway wrote itself.
    ///
    /// When an upstream body breaks mid-way, the backend is charged with a failure; a Server-Sent Events
    /// stream then ends with an `event: error` frame (and no `[DONE]`), so clients see it is incomplete.
    pub struct FailoverBody<B> {
        #[pin]
        upstream: Option<B>,
        full: Option<Bytes>,
        watch: Option<StreamWatch>,
    }
}

pub(super) struct StreamWatch {
    pub(super) pool: Arc<BackendPool>,
    pub(super) id: BackendId,
    pub(super) deployment: String,
    pub(super) sse: bool,
}

// === impl FailoverBody ===

impl<B> FailoverBody<B> {
    pub(super) fn upstream(body: B, watch: Option<StreamWatch>) -> Self {
        Self {
            upstream: Some(body),
            full: None,
            watch,
        }
    }

    /// A body the gateway wrote itself.
    pub fn full(data: Bytes) -> Self {
        Self {
            upstream: None,
            full: Some(data),
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
        let Some(upstream) = this.upstream.as_mut().as_pin_mut() else {
            return Poll::Ready(this.full.take().map(|d| Ok(Frame::data(d))));
        };
        match std::task::ready!(upstream.poll_frame(cx)) {
            Some(Ok(frame)) => Poll::Ready(Some(Ok(frame))),
            None => {
                this.upstream.set(None);
                Poll::Ready(None)
            }
            Some(Err(err)) => {
                let err: BoxError = err.into();
                this.upstream.set(None);
                let Some(watch) = this.watch.take() else {
                    return Poll::Ready(Some(Err(err)));
                };
                watch.pool.record(
                    watch.id,
                    &watch.deployment,
                    Outcome::StreamBroken,
                    Instant::now(),
                );
                let backend = &watch.pool.get(watch.id).name;
                tracing::warn!(%backend, error = %err, "upstream stream broke mid-way");
                if watch.sse {
                    Poll::Ready(Some(Ok(Frame::data(stream_error_event(backend)))))
                } else {
                    Poll::Ready(Some(Err(err)))
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.upstream {
            Some(b) => b.is_end_stream(),
            None => self.full.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match (&self.upstream, &self.full) {
            (Some(b), _) => b.size_hint(),
            (None, Some(d)) => SizeHint::with_exact(d.len() as u64),
            (None, None) => SizeHint::with_exact(0),
        }
    }
}

fn stream_error_event(backend: &str) -> Bytes {
    let data = serde_json::json!({
        "error": {
            "code": "upstream_stream_broken",
            "message": format!("The stream from backend '{backend}' broke before it completed; the response is incomplete."),
        }
    });
    Bytes::from(format!("event: error\ndata: {data}\n\n"))
}
