//! What the service-level tests share.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use gateway_layers::BoxError;
use http_body::Frame;
use tokio::sync::mpsc;

/// An upstream body fed by a channel: silent for as long as the sender sends nothing, over when it
/// is dropped.
pub(crate) struct ChannelBody(pub(crate) mpsc::Receiver<Bytes>);

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|c| Ok(Frame::data(c))))
    }
}
