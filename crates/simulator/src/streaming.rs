//! Server-sent events the way Azure frames them, and the streaming body that paces or breaks them.
//!
//! A chat stream is: a prompt-annotation frame (empty `id`, `model` and `object`, `choices: []`,
//! `prompt_filter_results`); per choice a first chunk with `delta {role, content: ""}`, one chunk per
//! token and a finish chunk (`delta {}`, `finish_reason`); a usage chunk (`choices: []`) when
//! `stream_options.include_usage` is set; then `data: [DONE]`. A region's [`Variants`] may space
//! the JSON, leave the usage chunk out, or end `[DONE]` without its blank line.
//!
//! A Responses stream is named events (`event: response.output_text.delta` then its `data:`), from
//! `response.created` to `response.completed` (or `response.incomplete`), which carries the whole
//! response with its `usage`; it has no `[DONE]`.
//!
//! [`Variants`]: crate::Variants

use std::io;
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use futures_util::stream;
use serde_json::{Value, json};

use crate::azure::{prompt_filter_results, spaced};
use crate::config::DoneEnding;
use crate::tokens::Generated;

/// SSE events written back to back into one buffer, with the end of each event.
#[derive(Debug, Default)]
pub(crate) struct Frames {
    buf: Vec<u8>,
    /// End offset of each event, and whether to sleep the token delay before sending it.
    ends: Vec<(usize, bool)>,
    /// Re-write each event's JSON with Python's spacing.
    spaced: bool,
}

/// Identity of a streamed completion, repeated in every chunk.
pub(crate) struct StreamMeta<'a> {
    pub(crate) id: &'a str,
    pub(crate) created: u64,
    pub(crate) model: &'a str,
    pub(crate) system_fingerprint: &'a str,
    pub(crate) include_usage: bool,
    pub(crate) usage: Value,
    /// The tier the answer says served it, in every chunk.
    pub(crate) service_tier: &'a str,
    /// JSON written with a space after every `:` and `,`.
    pub(crate) spaced: bool,
    /// How the final `data: [DONE]` ends.
    pub(crate) done: DoneEnding,
}

/// `content_filter_results` of a harmless token, pre-serialised (keys sorted like serde_json's).
const SAFE_FILTER: &str = r#"{"hate":{"filtered":false,"severity":"safe"},"self_harm":{"filtered":false,"severity":"safe"},"sexual":{"filtered":false,"severity":"safe"},"violence":{"filtered":false,"severity":"safe"}}"#;

// === impl Frames ===

impl Frames {
    fn with_capacity(events: usize, spaced: bool) -> Self {
        Self {
            buf: Vec::with_capacity(events * 320),
            ends: Vec::with_capacity(events),
            spaced,
        }
    }

    /// `data: {json}\n\n`.
    fn push_json(&mut self, value: &Value, paced: bool) {
        self.buf.extend_from_slice(b"data: ");
        // Writing a Value into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut self.buf, value);
        self.end(paced);
    }

    /// `data: {head}"escaped text"{tail}\n\n`, the hot path of token chunks.
    fn push_text(&mut self, head: &str, text: &str, tail: &str, paced: bool) {
        self.buf.extend_from_slice(b"data: ");
        self.buf.extend_from_slice(head.as_bytes());
        // Writing a string into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut self.buf, text);
        self.buf.extend_from_slice(tail.as_bytes());
        self.end(paced);
    }

    fn push_done(&mut self, ending: DoneEnding) {
        self.buf.extend_from_slice(b"data: [DONE]");
        self.buf.extend_from_slice(match ending {
            DoneEnding::BlankLine => b"\n\n".as_slice(),
            DoneEnding::Newline => b"\n",
            DoneEnding::Bare => b"",
        });
        self.ends.push((self.buf.len(), false));
    }

    fn end(&mut self, paced: bool) {
        if self.spaced {
            // The event's JSON starts after the previous event and its `data: `.
            let start = self.ends.last().map_or(0, |&(end, _)| end) + b"data: ".len();
            let json = spaced(&self.buf[start..]);
            self.buf.truncate(start);
            self.buf.extend_from_slice(&json);
        }
        self.buf.extend_from_slice(b"\n\n");
        self.ends.push((self.buf.len(), paced));
    }
}

impl Frames {
    /// `event: {name}\ndata: {json}\n\n`, the framing of Responses streams.
    fn push_named(&mut self, name: &str, value: &Value, paced: bool) {
        self.buf.extend_from_slice(b"event: ");
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.extend_from_slice(b"\ndata: ");
        // Writing a Value into a Vec cannot fail.
        let compact = serde_json::to_vec(value).unwrap_or_default();
        if self.spaced {
            self.buf.extend_from_slice(&spaced(&compact));
        } else {
            self.buf.extend_from_slice(&compact);
        }
        self.buf.extend_from_slice(b"\n\n");
        self.ends.push((self.buf.len(), paced));
    }
}

/// The frames of a streamed Responses answer: `response` is the finished response (with its
/// `usage`), `text` what its one message says, one delta per piece.
pub(crate) fn responses_frames(response: &Value, pieces: &[String], spaced: bool) -> Frames {
    let mut frames = Frames::with_capacity(pieces.len() + 8, spaced);
    let mut sequence = 0u64;
    let mut push = |frames: &mut Frames, kind: &str, mut event: Value, paced: bool| {
        event["type"] = json!(kind);
        event["sequence_number"] = json!(sequence);
        sequence += 1;
        frames.push_named(kind, &event, paced);
    };
    let mut started = response.clone();
    started["status"] = json!("in_progress");
    started["output"] = json!([]);
    started["usage"] = Value::Null;
    push(
        &mut frames,
        "response.created",
        json!({"response": started}),
        false,
    );
    push(
        &mut frames,
        "response.in_progress",
        json!({"response": started}),
        false,
    );
    let item = &response["output"][0];
    let item_id = item["id"].clone();
    let text = pieces.concat();
    let mut added = item.clone();
    added["status"] = json!("in_progress");
    added["content"] = json!([]);
    let at = json!({"item_id": item_id, "output_index": 0, "content_index": 0});
    let with = |extra: Value| {
        let mut v = at.clone();
        if let (Some(v), Some(extra)) = (v.as_object_mut(), extra.as_object()) {
            v.extend(extra.clone());
        }
        v
    };
    push(
        &mut frames,
        "response.output_item.added",
        json!({"output_index": 0, "item": added}),
        false,
    );
    let empty = json!({"type": "output_text", "text": "", "annotations": []});
    push(
        &mut frames,
        "response.content_part.added",
        with(json!({"part": empty})),
        false,
    );
    for piece in pieces {
        push(
            &mut frames,
            "response.output_text.delta",
            with(json!({"delta": piece})),
            true,
        );
    }
    push(
        &mut frames,
        "response.output_text.done",
        with(json!({"text": text})),
        false,
    );
    let part = json!({"type": "output_text", "text": text, "annotations": []});
    push(
        &mut frames,
        "response.content_part.done",
        with(json!({"part": part})),
        false,
    );
    push(
        &mut frames,
        "response.output_item.done",
        json!({"output_index": 0, "item": item}),
        false,
    );
    let last = if response["status"] == "completed" {
        "response.completed"
    } else {
        "response.incomplete"
    };
    push(&mut frames, last, json!({"response": response}), false);
    frames
}

fn annotation(frames: &mut Frames) {
    frames.push_json(
        &json!({
            "choices": [],
            "created": 0,
            "id": "",
            "model": "",
            "object": "",
            "prompt_filter_results": prompt_filter_results(),
        }),
        false,
    );
}

/// The fields after `choices` in every chunk, serialised without the opening brace:
/// `"created":..,"id":..,"model":..,"object":..,"system_fingerprint":..[,"usage":null]}`.
fn chunk_tail(meta: &StreamMeta<'_>, object: &str) -> String {
    let mut v = json!({
        "created": meta.created,
        "id": meta.id,
        "model": meta.model,
        "object": object,
        "service_tier": meta.service_tier,
        "system_fingerprint": meta.system_fingerprint,
    });
    if meta.include_usage {
        v["usage"] = Value::Null;
    }
    let text = v.to_string();
    text.strip_prefix('{').unwrap_or(&text).to_owned()
}

/// A whole chunk with one choice, for the rare (non-token) chunks.
fn push_chunk(frames: &mut Frames, choice: Value, tail: &str) {
    frames.buf.extend_from_slice(b"data: {\"choices\":[");
    let _ = serde_json::to_writer(&mut frames.buf, &choice);
    frames.buf.extend_from_slice(b"],");
    frames.buf.extend_from_slice(tail.as_bytes());
    frames.end(false);
}

/// The frames of a streamed chat completion.
pub(crate) fn chat_frames(meta: &StreamMeta<'_>, choices: &[Generated]) -> Frames {
    let object = "chat.completion.chunk";
    let tail = chunk_tail(meta, object);
    let tokens: usize = choices.iter().map(|c| c.pieces.len()).sum();
    let mut frames = Frames::with_capacity(tokens + 3 * choices.len() + 3, meta.spaced);
    annotation(&mut frames);
    let head =
        format!(r#"{{"choices":[{{"content_filter_results":{SAFE_FILTER},"delta":{{"content":"#);
    for (index, choice) in choices.iter().enumerate() {
        push_chunk(
            &mut frames,
            json!({
                "content_filter_results": {},
                "delta": {"content": "", "refusal": null, "role": "assistant"},
                "finish_reason": null,
                "index": index,
                "logprobs": null,
            }),
            &tail,
        );
        let token_tail =
            format!(r#"}},"finish_reason":null,"index":{index},"logprobs":null}}],{tail}"#);
        for piece in &choice.pieces {
            frames.push_text(&head, piece, &token_tail, true);
        }
        push_chunk(
            &mut frames,
            json!({
                "content_filter_results": {},
                "delta": {},
                "finish_reason": choice.finish_reason,
                "index": index,
                "logprobs": null,
            }),
            &tail,
        );
    }
    push_usage_and_done(&mut frames, meta, object);
    frames
}

/// The frames of a streamed legacy completion.
pub(crate) fn completion_frames(meta: &StreamMeta<'_>, choices: &[Generated]) -> Frames {
    let object = "text_completion";
    let tail = chunk_tail(meta, object);
    let tokens: usize = choices.iter().map(|c| c.pieces.len()).sum();
    let mut frames = Frames::with_capacity(tokens + choices.len() + 3, meta.spaced);
    annotation(&mut frames);
    let head = format!(
        r#"{{"choices":[{{"content_filter_results":{SAFE_FILTER},"finish_reason":null,"index":"#
    );
    for (index, choice) in choices.iter().enumerate() {
        let head = format!(r#"{head}{index},"logprobs":null,"text":"#);
        let token_tail = format!("}}],{tail}");
        for piece in &choice.pieces {
            frames.push_text(&head, piece, &token_tail, true);
        }
        push_chunk(
            &mut frames,
            json!({
                "content_filter_results": {},
                "finish_reason": choice.finish_reason,
                "index": index,
                "logprobs": null,
                "text": "",
            }),
            &tail,
        );
    }
    push_usage_and_done(&mut frames, meta, object);
    frames
}

fn push_usage_and_done(frames: &mut Frames, meta: &StreamMeta<'_>, object: &str) {
    if meta.include_usage {
        frames.push_json(
            &json!({
                "choices": [],
                "created": meta.created,
                "id": meta.id,
                "model": meta.model,
                "object": object,
                "service_tier": meta.service_tier,
                "system_fingerprint": meta.system_fingerprint,
                "usage": meta.usage,
            }),
            false,
        );
    }
    frames.push_done(meta.done);
}

/// A body made of the first half of `full` that then breaks (a non-streaming answer cut by
/// `abort_stream`, or a `drop` fault without a connection to kill).
pub(crate) fn truncated_body(full: &[u8]) -> Body {
    let frames = Frames {
        buf: full[..full.len() / 2].to_vec(),
        ends: vec![(full.len() / 2, false)],
        spaced: false,
    };
    body(frames, Duration::ZERO, Some(1))
}

/// A streaming body (chunked, no content-length) sending `frames`, sleeping `delay` before each
/// token chunk, and breaking the connection after `abort_after` frames when given.
pub(crate) fn body(frames: Frames, delay: Duration, abort_after: Option<usize>) -> Body {
    let all = Bytes::from(frames.buf);
    if delay.is_zero() && abort_after.is_none() {
        // Nothing to pace: one chunk (still a stream, so no content-length).
        let once = stream::once(std::future::ready(Ok::<_, io::Error>(all)));
        return Body::from_stream(once);
    }
    let mut start = 0;
    let events: Vec<(Bytes, bool)> = frames
        .ends
        .iter()
        .map(|&(end, paced)| {
            let event = all.slice(start..end);
            start = end;
            (event, paced)
        })
        .collect();
    let state = Pacer {
        events: events.into_iter(),
        delay,
        abort_after,
        sent: 0,
    };
    Body::from_stream(stream::unfold(Some(state), Pacer::next))
}

/// State of a paced or breaking stream.
struct Pacer {
    events: std::vec::IntoIter<(Bytes, bool)>,
    delay: Duration,
    abort_after: Option<usize>,
    sent: usize,
}

impl Pacer {
    async fn next(state: Option<Self>) -> Option<(io::Result<Bytes>, Option<Self>)> {
        let mut state = state?;
        if state.abort_after == Some(state.sent) {
            // Give the connection a chance to flush what was sent, then fail the body: hyper
            // closes the connection without finishing the chunked encoding.
            tokio::task::yield_now().await;
            let error = io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "simulated abort_stream fault",
            );
            return Some((Err(error), None));
        }
        let (event, paced) = state.events.next()?;
        if paced && !state.delay.is_zero() {
            tokio::time::sleep(state.delay).await;
        }
        state.sent += 1;
        Some((Ok(event), Some(state)))
    }
}
