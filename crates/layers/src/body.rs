//! The response body both body-changing layers build on: an upstream body passed through, or bytes
//! the gateway holds whole (its own answers, or an answer it had to read).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

pin_project! {
    /// An upstream body, or whole bytes. [`end`](Self::end) drops the upstream body (and with it the
    /// connection) as soon as it is over.
    #[project = MaybeFullProj]
    pub(crate) enum MaybeFull<B> {
        Stream { #[pin] body: B },
        Full { data: Option<Bytes> },
    }
}

impl<B> MaybeFull<B> {
    pub(crate) fn stream(body: B) -> Self {
        MaybeFull::Stream { body }
    }

    pub(crate) fn full(data: Bytes) -> Self {
        MaybeFull::Full { data: Some(data) }
    }

    /// Ends the body: nothing more is read from an upstream.
    pub(crate) fn end(mut self: Pin<&mut Self>) {
        self.set(MaybeFull::Full { data: None });
    }
}

impl<B: Body<Data = Bytes>> MaybeFull<B> {
    /// The next frame: the upstream's, or the whole bytes once.
    pub(crate) fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.project() {
            MaybeFullProj::Stream { body } => body.poll_frame(cx),
            MaybeFullProj::Full { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
        }
    }

    /// Whether an upstream body is still being passed through.
    pub(crate) fn is_stream(&self) -> bool {
        matches!(self, MaybeFull::Stream { .. })
    }

    pub(crate) fn is_end_stream(&self) -> bool {
        match self {
            MaybeFull::Stream { body } => body.is_end_stream(),
            MaybeFull::Full { data } => data.is_none(),
        }
    }

    pub(crate) fn size_hint(&self) -> SizeHint {
        match self {
            MaybeFull::Stream { body } => body.size_hint(),
            MaybeFull::Full { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
        }
    }
}
