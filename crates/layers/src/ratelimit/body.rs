use std::fmt;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use gateway_core::tokens::{self, Usage};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use serde::Deserialize;
use serde::de::{Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

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
    /// Events that carried generated text: at least one token each.
    content_chunks: u64,
    /// Bytes of generated text (content, tool-call arguments, Responses deltas), decoded from JSON.
    generated_bytes: u64,
    prompt_estimate: u64,
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
                generated_bytes: 0,
                prompt_estimate,
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
            let (usage, generated) = inspect(event);
            self.note(usage, generated);
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
            let (usage, generated) = inspect(event);
            if usage.is_none() {
                out.extend_from_slice(event);
            }
            self.note(usage, generated);
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

    fn note(&mut self, usage: Option<Usage>, generated: usize) {
        if let Some(usage) = usage {
            self.usage = Some(usage);
            // At once: observers may see the response end before this body is polled to its end.
            if let Some(record) = &self.record {
                record.set_usage(usage);
            }
        }
        if generated > 0 {
            self.content_chunks += 1;
            self.generated_bytes += generated as u64;
        }
    }

    /// Tokens generated so far, by the text streamed: a token per four bytes (the rough measure the
    /// estimate uses too), and never less than one per event that carried text.
    fn generated(&self) -> u64 {
        self.content_chunks.max(self.generated_bytes.div_ceil(4))
    }

    fn finish(&mut self) {
        // Without the backend's own figure (a stream that broke, that the client left, or whose
        // api-version has no usage chunk) the charge is what Azure bills for it: the prompt and
        // what was generated before it ended, not the `max_tokens` that was never produced.
        let consumed = match self.usage {
            Some(usage) => {
                // Only what the backend said is usage; outer layers show the estimate otherwise.
                if let Some(record) = &self.record {
                    record.set_usage(usage);
                }
                usage.total
            }
            None => self.prompt_estimate.saturating_add(self.generated()),
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

/// The usage if this event is a final usage chunk, and the bytes of text it generated.
fn inspect(event: &[u8]) -> (Option<Usage>, usize) {
    let Ok(text) = std::str::from_utf8(event) else {
        return (None, 0);
    };
    let mut usage = None;
    let mut generated = 0;
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
        let text = serde_json::from_str::<Generated>(data).map_or(0, |g| g.bytes());
        if text > 0 {
            generated += text;
        } else {
            usage = tokens::usage_from_sse_data(data).or(usage);
        }
    }
    (usage, generated)
}

// === generated text ===

/// The generated text of one streamed event, measured as it is parsed and never copied: chat and
/// completions `choices[].delta.content`, `delta.refusal`, `delta.tool_calls[].function.arguments`
/// and `choices[].text`; a Responses event's `delta`.
#[derive(Deserialize)]
struct Generated {
    #[serde(default)]
    choices: Sum<Choice>,
    #[serde(default)]
    delta: TextLen,
}

#[derive(Deserialize)]
struct Choice {
    #[serde(default)]
    delta: Option<Delta>,
    #[serde(default)]
    text: TextLen,
}

#[derive(Deserialize)]
struct Delta {
    #[serde(default)]
    content: TextLen,
    #[serde(default)]
    refusal: TextLen,
    #[serde(default)]
    tool_calls: Sum<ToolCall>,
}

#[derive(Deserialize)]
struct ToolCall {
    #[serde(default)]
    function: Option<Function>,
}

#[derive(Deserialize)]
struct Function {
    #[serde(default)]
    arguments: TextLen,
}

/// Something with a length of generated text.
trait TextBytes {
    fn bytes(&self) -> usize;
}

/// The length in bytes of a JSON string; any other value (null, an object) counts nothing.
#[derive(Default)]
struct TextLen(usize);

/// The summed lengths of the elements of a JSON array (null counts nothing), without keeping them.
struct Sum<T>(usize, PhantomData<T>);

impl Generated {
    fn bytes(&self) -> usize {
        self.choices.0 + self.delta.0
    }
}

impl TextBytes for Choice {
    fn bytes(&self) -> usize {
        self.text.0 + self.delta.as_ref().map_or(0, TextBytes::bytes)
    }
}

impl TextBytes for Delta {
    fn bytes(&self) -> usize {
        self.content.0 + self.refusal.0 + self.tool_calls.0
    }
}

impl TextBytes for ToolCall {
    fn bytes(&self) -> usize {
        self.function.as_ref().map_or(0, |f| f.arguments.0)
    }
}

impl<T> Default for Sum<T> {
    fn default() -> Self {
        Sum(0, PhantomData)
    }
}

impl<'de> Deserialize<'de> for TextLen {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = TextLen;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_str<E>(self, v: &str) -> Result<TextLen, E> {
                Ok(TextLen(v.len()))
            }
            fn visit_bool<E>(self, _: bool) -> Result<TextLen, E> {
                Ok(TextLen(0))
            }
            fn visit_i64<E>(self, _: i64) -> Result<TextLen, E> {
                Ok(TextLen(0))
            }
            fn visit_u64<E>(self, _: u64) -> Result<TextLen, E> {
                Ok(TextLen(0))
            }
            fn visit_f64<E>(self, _: f64) -> Result<TextLen, E> {
                Ok(TextLen(0))
            }
            fn visit_unit<E>(self) -> Result<TextLen, E> {
                Ok(TextLen(0))
            }
            fn visit_none<E>(self) -> Result<TextLen, E> {
                Ok(TextLen(0))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<TextLen, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(TextLen(0))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<TextLen, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(TextLen(0))
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de, T: Deserialize<'de> + TextBytes> Deserialize<'de> for Sum<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de> + TextBytes> Visitor<'de> for V<T> {
            type Value = Sum<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an array or null")
            }
            fn visit_unit<E>(self) -> Result<Sum<T>, E> {
                Ok(Sum::default())
            }
            fn visit_none<E>(self) -> Result<Sum<T>, E> {
                Ok(Sum::default())
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Sum<T>, A::Error> {
                let mut total = 0;
                while let Some(item) = seq.next_element::<T>()? {
                    total += item.bytes();
                }
                Ok(Sum(total, PhantomData))
            }
        }
        d.deserialize_any(V(PhantomData))
    }
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
                generated_bytes: 0,
                prompt_estimate: 10,
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
        assert_eq!(inspect(batched.as_bytes()), (None, 40));
        assert_eq!(inspect(tool.as_bytes()), (None, 16));
        assert_eq!(inspect(legacy.as_bytes()), (None, 5));
        assert_eq!(inspect(responses.as_bytes()), (None, 3));
        assert_eq!(inspect(nothing.as_bytes()), (None, 0));
        assert_eq!(inspect(DONE.as_bytes()), (None, 0));
        assert_eq!(inspect(USAGE.as_bytes()).1, 0);

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
    }
}
