use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use bytes::Buf;
use gateway_layers::failover::FailoverReport;
use gateway_layers::ratelimit::UsageReport;
use http::HeaderValue;
use http_body::{Body, Frame, SizeHint};
use metrics::{SharedString, counter, histogram};
use pin_project_lite::pin_project;

use super::metrics::{REQUEST_DURATION, REQUESTS, TOKENS};
use super::{Shared, UNKNOWN, access_log};

pin_project! {
    /// Response body of [`Observe`](super::Observe): passes the body through untouched, and records
    /// the request once it ends, breaks, or is dropped by a client that went away.
    pub struct ObserveBody<B> {
        #[pin]
        inner: B,
        pending: Pending,
    }
}

/// A request not recorded yet. Dropping it unrecorded means the client left before the end.
pub(super) struct Pending {
    record: Option<Box<Record>>,
    /// Bytes still to send when the length is known: the body is complete once they are sent, even if
    /// the server never polls it again to learn so.
    remaining: Option<u64>,
}

/// Everything the end of a request needs, captured when its headers were ready.
pub(super) struct Record {
    pub(super) shared: Arc<Shared>,
    pub(super) start: Instant,
    pub(super) wall: SystemTime,
    pub(super) ttfb: Duration,
    pub(super) overhead: Duration,
    pub(super) status: u16,
    pub(super) request_id: Option<HeaderValue>,
    pub(super) operation: &'static str,
    /// The deployment's label value (`_unknown` when not in the policy).
    pub(super) deployment: SharedString,
    /// The name the client used, when it is not in the policy.
    pub(super) undeclared: Option<String>,
    pub(super) stream: bool,
    pub(super) consumer: Option<Arc<str>>,
    pub(super) usage: Option<UsageReport>,
    pub(super) report: Option<FailoverReport>,
    pub(super) limit: Option<&'static str>,
}

/// How a response ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum End {
    /// Sent whole.
    Complete,
    /// The body failed mid-way.
    Error,
    /// The client went away first.
    ClientClosed,
}

// === impl ObserveBody ===

impl<B: Body> ObserveBody<B> {
    pub(super) fn new(inner: B, record: Box<Record>, length: Option<u64>) -> Self {
        let mut pending = Pending {
            record: Some(record),
            remaining: length,
        };
        // The server never polls a body that is already over (e.g. an empty error answer).
        if inner.is_end_stream() || length == Some(0) {
            pending.finish(End::Complete);
        }
        Self { inner, pending }
    }
}

impl<B: Body> Body for ObserveBody<B> {
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

// === impl Record ===

impl Record {
    fn finish(self: Box<Self>, end: End) {
        let total = self.start.elapsed();
        let shared = &self.shared;
        let class = status_class(self.status);
        let consumer = shared.consumer(self.consumer.as_ref());
        counter!(
            REQUESTS,
            "deployment" => self.deployment.clone(),
            "operation" => self.operation,
            "consumer" => consumer.clone(),
            "status_class" => class,
        )
        .increment(1);
        histogram!(
            REQUEST_DURATION,
            "deployment" => self.deployment.clone(),
            "operation" => self.operation,
            "status_class" => class,
        )
        .record(total.as_secs_f64());
        if let Some(usage) = self.usage.as_ref().and_then(UsageReport::usage) {
            let backend = self
                .served_by()
                .map_or(SharedString::const_str(UNKNOWN), |b| b.name.clone());
            for (kind, n) in [("prompt", usage.prompt), ("completion", usage.completion)] {
                counter!(
                    TOKENS,
                    "kind" => kind,
                    "consumer" => consumer.clone(),
                    "deployment" => self.deployment.clone(),
                    "backend" => backend.clone(),
                )
                .increment(n);
            }
        }
        if shared.access_log {
            access_log::write(&self, end, total);
        }
    }

    /// The labels of the backend whose answer the client got, if one did.
    pub(super) fn served_by(&self) -> Option<&super::BackendLabels> {
        let id = self.report.as_ref()?.served_by?;
        self.shared.backend(id)
    }
}

fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}
