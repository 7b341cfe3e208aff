use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use gateway_core::tokens::{self, Usage};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::BoxError;
use crate::body::MaybeFull;
use crate::record::Record;

/// Reconciles a reservation with the tokens really consumed; runs at most once.
pub(crate) struct Reconcile(Option<Box<dyn FnOnce(u64) + Send>>);

pin_project! {
    /// Response body of the rate-limit layer: passes the answer through, and for streams reads the
    /// usage chunk as it goes by (removing it when the client did not ask for it), then reconciles.
    pub struct UsageBody<B> {
        // Declared first, so dropped first: a stream the client left is settled (its reconcile
        // started) before the upstream body inside, and with it the backend's in-flight count, goes.
        sse: Option<Box<SseWatch>>,
        #[pin]
        inner: MaybeFull<B>,
    }
}

/// What the layer tracks on a Server-Sent Events answer.
pub(crate) struct SseWatch {
    /// Bytes of an event not yet complete (only kept while events are being filtered or parsed).
    pending: Vec<u8>,
    strip_usage: bool,
    usage: Option<Usage>,
    /// Chunks that carried generated text: about one token each, the consumption of a stream that
    /// ends without its usage chunk.
    content_chunks: u64,
    prompt_estimate: u64,
    /// Tokens reserved: the least a stream that never told its usage is charged.
    reserved: u64,
    /// Set when an event grew past [`MAX_PENDING`]: the stream is passed on without being read.
    gave_up: bool,
    /// Where the backend's usage goes, for observers.
    record: Option<Arc<Record>>,
    reconcile: Option<Reconcile>,
}

/// Largest incomplete event kept while looking for its end; SSE events are small, and a body that
/// never ends one must not grow the gateway's memory.
const MAX_PENDING: usize = 1 << 20;

// === impl Reconcile ===

impl Reconcile {
    pub(crate) fn new(f: impl FnOnce(u64) + Send + 'static) -> Self {
        Self(Some(Box::new(f)))
    }

    fn fire(&mut self, consumed: u64) {
        if let Some(f) = self.0.take() {
            f(consumed);
        }
    }
}

// === impl UsageBody ===

impl<B> UsageBody<B> {
    pub(crate) fn passthrough(inner: B) -> Self {
        Self {
            inner: MaybeFull::stream(inner),
            sse: None,
        }
    }

    pub(crate) fn full(data: Bytes) -> Self {
        Self {
            inner: MaybeFull::full(data),
            sse: None,
        }
    }

    pub(crate) fn sse(
        inner: B,
        strip_usage: bool,
        prompt_estimate: u64,
        reserved: u64,
        record: Option<Arc<Record>>,
        reconcile: Option<Reconcile>,
    ) -> Self {
        Self {
            inner: MaybeFull::stream(inner),
            sse: Some(Box::new(SseWatch {
                pending: Vec::new(),
                strip_usage,
                usage: None,
                content_chunks: 0,
                prompt_estimate,
                reserved,
                gave_up: false,
                record,
                reconcile,
            })),
        }
    }
}

impl<B> From<Bytes> for UsageBody<B> {
    fn from(data: Bytes) -> Self {
        Self::full(data)
    }
}

impl<B> Body for UsageBody<B>
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
        loop {
            if !this.inner.is_stream() {
                return this.inner.poll_frame(cx).map_err(Into::into);
            }
            let frame = match std::task::ready!(this.inner.as_mut().poll_frame(cx)) {
                Some(Ok(frame)) => frame,
                // The accounting starts before the upstream body (and the backend's in-flight count
                // it holds) goes: whoever sees the stream let go sees its accounting started.
                Some(Err(err)) => {
                    if let Some(watch) = this.sse.as_mut() {
                        watch.finish();
                    }
                    this.inner.as_mut().end();
                    return Poll::Ready(Some(Err(err.into())));
                }
                None => {
                    let Some(watch) = this.sse.as_mut() else {
                        this.inner.as_mut().end();
                        return Poll::Ready(None);
                    };
                    // An unterminated last event still belongs to the client.
                    let rest = std::mem::take(&mut watch.pending);
                    watch.finish();
                    this.inner.as_mut().end();
                    if watch.strip_usage && !rest.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(Bytes::from(rest)))));
                    }
                    return Poll::Ready(None);
                }
            };
            let Some(watch) = this.sse.as_mut() else {
                return Poll::Ready(Some(Ok(frame)));
            };
            let data = match frame.into_data() {
                Ok(data) => data,
                Err(frame) => return Poll::Ready(Some(Ok(frame))),
            };
            if !watch.strip_usage {
                // Nothing to remove: forward at once and only read along.
                watch.read(&data);
                return Poll::Ready(Some(Ok(Frame::data(data))));
            }
            let out = watch.filter(&data);
            if !out.is_empty() {
                return Poll::Ready(Some(Ok(Frame::data(out))));
            }
            // The frame held only part of an event, or only the usage chunk: read on.
        }
    }

    fn is_end_stream(&self) -> bool {
        // An unterminated last event may still be owed to the client.
        self.inner.is_end_stream() && self.sse.as_ref().is_none_or(|w| w.pending.is_empty())
    }

    fn size_hint(&self) -> SizeHint {
        // Removing the usage chunk changes the length: only an unfiltered body keeps its hint.
        let filtered = self.inner.is_stream() && self.sse.as_ref().is_some_and(|w| w.strip_usage);
        if filtered {
            SizeHint::default()
        } else {
            self.inner.size_hint()
        }
    }
}

// === impl SseWatch ===

impl SseWatch {
    /// Reads complete events in `data` (with what was pending), forwarding nothing.
    fn read(&mut self, data: &[u8]) {
        if self.gave_up {
            return;
        }
        self.pending.extend_from_slice(data);
        let mut start = 0;
        while let Some(end) = find_event_end(&self.pending[start..]) {
            let event = &self.pending[start..start + end];
            let (usage, content) = inspect(event);
            self.note(usage, content);
            start += end;
        }
        self.pending.drain(..start);
        if self.pending.len() > MAX_PENDING {
            self.give_up();
        }
    }

    /// Returns the complete events in `data` (with what was pending) minus the usage chunk.
    fn filter(&mut self, data: &[u8]) -> Bytes {
        if self.gave_up {
            return Bytes::copy_from_slice(data);
        }
        self.pending.extend_from_slice(data);
        let mut out = Vec::with_capacity(self.pending.len());
        let mut start = 0;
        while let Some(end) = find_event_end(&self.pending[start..]) {
            let event = &self.pending[start..start + end];
            let (usage, content) = inspect(event);
            if usage.is_none() {
                out.extend_from_slice(event);
            }
            self.note(usage, content);
            start += end;
        }
        self.pending.drain(..start);
        if self.pending.len() > MAX_PENDING {
            out.append(&mut self.pending);
            self.give_up();
        }
        Bytes::from(out)
    }

    fn give_up(&mut self) {
        tracing::warn!("an SSE event grew past 1 MiB; passing the stream on without reading it");
        self.pending = Vec::new();
        self.gave_up = true;
    }

    fn note(&mut self, usage: Option<Usage>, content: bool) {
        if let Some(usage) = usage {
            self.usage = Some(usage);
            // At once: observers may see the response end before this body is polled to its end.
            if let Some(record) = &self.record {
                record.set_usage(usage);
            }
        }
        if content {
            self.content_chunks += 1;
        }
    }

    fn finish(&mut self) {
        let counted = Usage {
            prompt: self.prompt_estimate,
            completion: self.content_chunks,
            total: self.prompt_estimate + self.content_chunks,
        };
        // Without the backend's own figure the chunk count is a floor (chunks may hold several
        // tokens, tool calls, other fields): never charge less than was reserved.
        let consumed = match self.usage {
            Some(usage) => {
                // Only what the backend said is usage; outer layers show the estimate otherwise.
                if let Some(record) = &self.record {
                    record.set_usage(usage);
                }
                usage.total
            }
            None => counted.total.max(self.reserved),
        };
        if let Some(reconcile) = self.reconcile.as_mut() {
            reconcile.fire(consumed);
        }
    }
}

impl Drop for SseWatch {
    /// A client that goes away mid-stream still pays for the stream: settle with what was seen.
    fn drop(&mut self) {
        self.finish();
    }
}

/// The length of the first complete event (through its blank line, `\n\n` or `\r\n\r\n`), if `buf`
/// holds one.
fn find_event_end(buf: &[u8]) -> Option<usize> {
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4);
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The usage total if this event is a final usage chunk, and whether it carried generated text.
fn inspect(event: &[u8]) -> (Option<Usage>, bool) {
    let Ok(text) = std::str::from_utf8(event) else {
        return (None, false);
    };
    let mut usage = None;
    let mut content = false;
    for line in text.lines() {
        let Some(data) = line.strip_prefix("data:") else {
            continue;
        };
        let data = data.trim_start();
        // Parsed as JSON, whatever its spacing; frames without the word `usage` are skipped unparsed.
        usage = tokens::usage_from_sse_data(data).or(usage);
        if data.contains("\"content\":\"") && !data.contains("\"content\":\"\"") {
            content = true;
        }
    }
    (usage, content)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    fn watch(strip: bool) -> (SseWatch, Arc<Mutex<Option<u64>>>) {
        let seen = Arc::new(Mutex::new(None));
        let s = seen.clone();
        (
            SseWatch {
                pending: Vec::new(),
                strip_usage: strip,
                usage: None,
                content_chunks: 0,
                prompt_estimate: 10,
                reserved: 0,
                gave_up: false,
                record: Some(Arc::new(Record::new(
                    http::HeaderValue::from_static("t"),
                    None,
                ))),
                reconcile: Some(Reconcile::new(move |n| *s.lock().unwrap() = Some(n))),
            },
            seen,
        )
    }

    const CHUNK: &str =
        "data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"},\"index\":0}],\"usage\":null}\n\n";
    const USAGE: &str = "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":2,\"total_tokens\":11}}\n\n";
    const DONE: &str = "data: [DONE]\n\n";

    #[test]
    fn usage_chunk_is_removed_across_frame_boundaries() {
        let (mut w, seen) = watch(true);
        let all = format!("{CHUNK}{CHUNK}{USAGE}{DONE}");
        let mut out = Vec::new();
        for piece in all.as_bytes().chunks(7) {
            out.extend_from_slice(&w.filter(piece));
        }
        w.finish();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            format!("{CHUNK}{CHUNK}{DONE}")
        );
        assert_eq!(*seen.lock().unwrap(), Some(11));
    }

    #[test]
    fn crlf_framed_events_are_understood() {
        let (mut w, seen) = watch(true);
        let crlf = |e: &str| e.replace("\n\n", "\r\n\r\n");
        let out = w.filter(format!("{}{}{}", crlf(CHUNK), crlf(USAGE), crlf(DONE)).as_bytes());
        assert_eq!(
            String::from_utf8(out.to_vec()).unwrap(),
            format!("{}{}", crlf(CHUNK), crlf(DONE))
        );
        w.finish();
        assert_eq!(*seen.lock().unwrap(), Some(11));
    }

    #[test]
    fn a_stream_dropped_without_usage_pays_at_least_its_reservation() {
        let (mut w, seen) = watch(false);
        w.reserved = 100;
        w.read(CHUNK.as_bytes());
        drop(w);
        assert_eq!(*seen.lock().unwrap(), Some(100));
    }

    #[test]
    fn an_endless_event_is_passed_on_unread() {
        let (mut w, _) = watch(true);
        let big = vec![b'x'; MAX_PENDING + 10];
        let out = w.filter(&big);
        assert_eq!(out.len(), big.len());
        assert!(w.gave_up && w.pending.is_empty());
        assert_eq!(w.filter(b"more").as_ref(), b"more");
    }

    #[test]
    fn reading_along_keeps_everything_and_finds_usage() {
        let (mut w, seen) = watch(false);
        w.read(CHUNK.as_bytes());
        w.read(&USAGE.as_bytes()[..20]);
        w.read(&USAGE.as_bytes()[20..]);
        w.finish();
        assert_eq!(*seen.lock().unwrap(), Some(11));
    }

    #[test]
    fn a_stream_without_usage_counts_prompt_and_chunks() {
        let (mut w, seen) = watch(false);
        w.read(format!("{CHUNK}{CHUNK}{CHUNK}").as_bytes());
        w.finish();
        w.finish();
        assert_eq!(*seen.lock().unwrap(), Some(13));
        let record = w.record.as_ref().unwrap();
        assert_eq!(record.usage(), None, "the backend never told its usage");
    }
}
