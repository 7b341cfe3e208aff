use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use gateway_core::tokens::{self, Encoding, Usage};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use super::generated::GeneratedText;

use crate::BoxError;
use crate::body::MaybeFull;
use crate::record::{Record, ServiceTier};

/// Reconciles a reservation with the tokens really consumed; runs at most once.
pub(crate) struct Reconcile(Option<Box<dyn FnOnce(u64) + Send>>);

/// A request's prompt tokens, for a stream that ends without usage: counted already (the
/// reservation needed an exact figure), or counted only then (most streams report usage, and
/// never need it).
pub(crate) enum PromptTokens {
    Counted(u64),
    Later(Box<dyn FnOnce() -> u64 + Send>),
}

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
    /// The text generated so far (content, tool-call arguments, Responses deltas).
    generated: GeneratedText,
    prompt: PromptTokens,
    /// Set once the stream was accounted: at its end, when it broke, or when it was dropped.
    finished: bool,
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

    pub(crate) fn fire(&mut self, consumed: u64) {
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

    /// A stream to read along (removing the usage chunk when `strip_usage`), accounted at its end;
    /// without usage it is charged `prompt` and its text counted with `encoding`.
    pub(crate) fn sse(
        inner: B,
        strip_usage: bool,
        prompt: PromptTokens,
        encoding: Option<Encoding>,
        record: Option<Arc<Record>>,
        reconcile: Option<Reconcile>,
    ) -> Self {
        Self {
            inner: MaybeFull::stream(inner),
            sse: Some(Box::new(SseWatch::new(
                strip_usage,
                prompt,
                encoding,
                record,
                reconcile,
            ))),
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
            // A body that knows it is over after this frame may never be polled again (the
            // record's observers then see the end at once): account now, not on the next poll.
            let over = this.inner.is_end_stream();
            if !watch.strip_usage {
                // Nothing to remove: forward at once and only read along.
                watch.read(&data);
                if over {
                    watch.finish();
                }
                return Poll::Ready(Some(Ok(Frame::data(data))));
            }
            let out = watch.filter(&data);
            if over && watch.pending.is_empty() {
                watch.finish();
            }
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
    fn new(
        strip_usage: bool,
        prompt: PromptTokens,
        encoding: Option<Encoding>,
        record: Option<Arc<Record>>,
        reconcile: Option<Reconcile>,
    ) -> Self {
        Self {
            pending: Vec::new(),
            strip_usage,
            usage: None,
            generated: GeneratedText::new(encoding),
            prompt,
            finished: false,
            gave_up: false,
            record,
            reconcile,
        }
    }

    /// Reads complete events in `data` (with what was pending), forwarding nothing.
    fn read(&mut self, data: &[u8]) {
        if self.gave_up {
            return;
        }
        self.pending.extend_from_slice(data);
        let mut start = 0;
        while let Some(end) = find_event_end(&self.pending[start..]) {
            let event = &self.pending[start..start + end];
            let usage = inspect(event, &mut self.generated);
            self.note(usage);
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
            let usage = inspect(event, &mut self.generated);
            if usage.is_none() {
                out.extend_from_slice(event);
            }
            self.note(usage);
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

    fn note(&mut self, usage: Option<Usage>) {
        if let Some(usage) = usage {
            self.usage = Some(usage);
            // At once: observers may see the response end before this body is polled to its end.
            if let Some(record) = &self.record {
                record.set_usage(usage);
            }
        }
    }

    /// Accounts the stream, once.
    fn finish(&mut self) {
        if std::mem::replace(&mut self.finished, true) {
            return;
        }
        if let (Some(record), Some(tier)) = (&self.record, self.generated.service_tier()) {
            record.set_service_tier(ServiceTier::from_name(tier));
        }
        // Without the backend's own figure (a stream that broke, that the client left, or whose
        // api-version has no usage chunk) the charge is what Azure bills for it: the prompt and
        // what was generated before it ended, not the `max_tokens` that was never produced.
        let consumed = match self.usage {
            Some(usage) => {
                if let Some(record) = &self.record {
                    record.set_usage(usage);
                }
                usage.total
            }
            None => {
                let prompt = self.prompt.take();
                let completion = self.generated.tokens();
                let usage = Usage {
                    prompt,
                    completion,
                    total: prompt.saturating_add(completion),
                    ..Usage::default()
                };
                // The one figure charged, shown by every observer as an estimate.
                if let Some(record) = &self.record {
                    record.set_estimated_usage(usage);
                }
                usage.total
            }
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

/// The usage if this event is a final usage chunk; its generated text goes to `generated`.
fn inspect(event: &[u8], generated: &mut GeneratedText) -> Option<Usage> {
    let Ok(text) = std::str::from_utf8(event) else {
        return None;
    };
    let mut usage = None;
    for line in text.lines() {
        let Some(data) = line.strip_prefix("data:") else {
            continue;
        };
        let data = data.trim_start();
        if !data.starts_with('{') {
            continue;
        }
        // Parsed as JSON, whatever its spacing. An event with text is no usage chunk (that one has
        // no choices), so the usage parse is spared on the stream's ordinary events.
        if !generated.read(data) {
            usage = tokens::usage_from_sse_data(data).or(usage);
        }
    }
    usage
}

// === impl PromptTokens ===

impl PromptTokens {
    /// The count, counting now if it was left for later.
    fn take(&mut self) -> u64 {
        let tokens = match std::mem::replace(self, PromptTokens::Counted(0)) {
            PromptTokens::Counted(n) => n,
            PromptTokens::Later(count) => count(),
        };
        *self = PromptTokens::Counted(tokens);
        tokens
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    fn watch(strip: bool) -> (SseWatch, Arc<Mutex<Option<u64>>>) {
        watch_counting(strip, None)
    }

    /// A watch whose prompt is 10 tokens, counting generated text with `encoding` (`None`: roughly).
    fn watch_counting(
        strip: bool,
        encoding: Option<Encoding>,
    ) -> (SseWatch, Arc<Mutex<Option<u64>>>) {
        let seen = Arc::new(Mutex::new(None));
        let s = seen.clone();
        let record = Arc::new(Record::new(http::HeaderValue::from_static("t"), None));
        let reconcile = Reconcile::new(move |n| *s.lock().unwrap() = Some(n));
        let prompt = PromptTokens::Counted(10);
        let watch = SseWatch::new(strip, prompt, encoding, Some(record), Some(reconcile));
        (watch, seen)
    }

    /// Rough generated tokens of one event: a token per four bytes, at least one.
    fn rough(event: &str) -> (Option<Usage>, u64) {
        let mut generated = GeneratedText::new(None);
        let usage = inspect(event.as_bytes(), &mut generated);
        (usage, generated.tokens())
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
    fn a_stream_dropped_without_usage_pays_its_prompt_and_what_was_generated() {
        let (mut w, seen) = watch(false);
        w.read(CHUNK.as_bytes());
        w.read(CHUNK.as_bytes());
        drop(w);
        // The prompt (10) and two one-token chunks; never the max_tokens that was not produced.
        assert_eq!(*seen.lock().unwrap(), Some(12));
    }

    #[test]
    fn generated_text_is_measured_whatever_its_shape() {
        // Azure's content filter sends text in batches: 40 bytes are about 10 tokens, not 1.
        let batched = "data: {\"choices\": [{\"delta\": {\"content\": \"0123456789012345678901234567890123456789\"}, \"index\": 0}], \"usage\": null}\n\n";
        let tool = "data: {\"choices\":[{\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"{\\\"city\\\":\\\"Paris\\\"}\"}}]},\"index\":0}]}\n\n";
        let legacy = "data: {\"choices\":[{\"text\":\"Hello\",\"index\":0}]}\n\n";
        let responses = "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"Hi!\"}\n\n";
        let nothing = "data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"index\":0}],\"prompt_filter_results\":[]}\n\n";
        assert_eq!(rough(batched), (None, 10));
        assert_eq!(rough(tool), (None, 4));
        assert_eq!(rough(legacy), (None, 2));
        assert_eq!(rough(responses), (None, 1));
        assert_eq!(rough(nothing), (None, 0));
        assert_eq!(rough(DONE), (None, 0));
        assert_eq!(rough(USAGE).1, 0);
        let audio = "data: {\"type\":\"response.audio.delta\",\"delta\":\"UklGRiQAAABXQVZF\"}\n\n";
        assert_eq!(rough(audio), (None, 0), "base64 audio is not text");

        let (mut w, seen) = watch(false);
        w.read(format!("{batched}{CHUNK}{nothing}").as_bytes());
        w.finish();
        // 10 + 42 bytes / 4, rounded up: a token per four bytes beats a token per chunk here.
        assert_eq!(*seen.lock().unwrap(), Some(10 + 11));
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
        let charged = record.charged().unwrap();
        assert!(charged.estimated);
        assert_eq!((charged.usage.prompt, charged.usage.total), (10, 13));
    }

    #[cfg(feature = "tokenizer")]
    #[test]
    fn a_stream_without_usage_is_counted_with_the_tokenizer() {
        use gateway_core::tokens::count;
        let o200k = Encoding::O200k;
        // Pieces that cut words apart, of several choices interleaved, escapes included.
        let pieces = [
            (0, "Once up"),
            (1, "Il était"),
            (0, "on a ti"),
            (1, " une fois"),
            (0, "me, \\\"quoted\\\""),
        ];
        let (mut w, seen) = watch_counting(false, Some(o200k));
        for (index, piece) in pieces {
            let event = format!(
                "data: {{\"choices\":[{{\"delta\":{{\"content\":\"{piece}\"}},\"index\":{index}}}]}}\n\n"
            );
            w.read(event.as_bytes());
        }
        w.read(DONE.as_bytes());
        drop(w);
        let expected =
            10 + count(o200k, "Once upon a time, \"quoted\"") + count(o200k, "Il était une fois");
        assert_eq!(*seen.lock().unwrap(), Some(expected));
    }

    #[cfg(feature = "tokenizer")]
    #[test]
    fn a_long_text_is_counted_in_blocks_as_exactly_as_whole() {
        use gateway_core::tokens::count;
        let o200k = Encoding::O200k;
        let word = "tokenization ";
        let (mut w, seen) = watch_counting(false, Some(o200k));
        let mut whole = String::new();
        for i in 0..12_000 {
            let piece = format!("{word}{i} ");
            whole.push_str(&piece);
            let event = format!(
                "data: {{\"choices\":[{{\"delta\":{{\"content\":\"{piece}\"}},\"index\":0}}]}}\n\n"
            );
            w.read(event.as_bytes());
        }
        assert!(whole.len() > 2 * super::super::generated::KEEP_BYTES_FOR_TESTS);
        w.finish();
        assert_eq!(*seen.lock().unwrap(), Some(10 + count(o200k, &whole)));
    }

    #[test]
    fn the_last_service_tier_a_stream_names_is_recorded() {
        use crate::record::ServiceTier;
        let (mut w, _) = watch(false);
        let created = "event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"service_tier\":\"auto\",\"usage\":null}}\n\n";
        let delta = "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"Hi\"}\n\n";
        let done = "event: response.completed\ndata: {\"type\": \"response.completed\", \"response\": {\"service_tier\": \"default\", \"usage\": {\"input_tokens\": 3, \"output_tokens\": 1}}}\n\n";
        w.read(format!("{created}{delta}{done}").as_bytes());
        w.finish();
        let record = w.record.as_ref().unwrap();
        assert_eq!(record.service_tier(), Some(ServiceTier::Default));
        assert_eq!(
            record.charged().map(|c| (c.usage.total, c.estimated)),
            Some((4, false))
        );

        let (mut w, _) = watch(true);
        let chunk = "data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"},\"index\":0}],\"service_tier\":\"priority\"}\n\n";
        w.filter(format!("{chunk}{DONE}").as_bytes());
        w.finish();
        assert_eq!(
            w.record.as_ref().unwrap().service_tier(),
            Some(ServiceTier::Priority)
        );
    }

    #[test]
    fn a_stream_with_usage_is_charged_it_and_not_estimated() {
        let (mut w, seen) = watch_counting(true, Some(Encoding::O200k));
        w.filter(format!("{CHUNK}{USAGE}").as_bytes());
        w.finish();
        assert_eq!(*seen.lock().unwrap(), Some(11));
        let charged = w.record.as_ref().unwrap().charged().unwrap();
        assert!(!charged.estimated);
        assert_eq!(charged.usage.total, 11);
    }
}
