//! One parse of an Azure OpenAI request body: what routing, limits and edits need, read once.
//!
//! [`RequestJson::parse`] reads a JSON request body a single time and keeps:
//!
//! - the fields the gateway decides on: `model` (the deployment on v1 and Responses paths), `stream`,
//!   `stream_options.include_usage`, `max_tokens` and its variants, `n`, `best_of`;
//! - where the prompt fields are (`messages`, `prompt`, `input`, `instructions`, `tools`,
//!   `functions`): their bytes are skipped, not parsed, so a request that needs no exact count pays
//!   nothing for its prompt. [`RequestJson::prompt`] parses the fields of one operation, when a limit
//!   needs them, into the pieces a tokenizer counts ([`Prompt`]: text pieces are byte ranges into the
//!   body, only strings with escapes are copied, plus the fixed costs of the counting formula). See
//!   [`crate::tokens`] for the formula;
//! - where `model` and `stream_options` sit in the body, so that the edits a gateway makes (rewrite
//!   `model` per backend, ask for the stream's usage chunk) are spliced into the original bytes
//!   ([`RequestJson::edit`]) instead of parsing and serialising the whole body again.
//!
//! A body whose prompt has an unexpected shape (a number where a message's `content` should be) still
//! parses: its [`RequestJson::prompt`] is `None`, and estimates fall back to the body's length. Azure
//! rejects such a request anyway.
//!
//! ```
//! use bytes::Bytes;
//! use gateway_core::operation::Operation;
//! use gateway_core::request::{Edits, RequestJson};
//!
//! let body = Bytes::from_static(br#"{"model": "gpt-4o", "messages": [{"role": "user", "content": "Hi"}], "stream": true}"#);
//! let json = RequestJson::parse(&body).unwrap();
//! assert_eq!(json.model.as_deref(), Some("gpt-4o"));
//! assert!(json.stream && !json.include_usage);
//! let prompt = json.prompt(Operation::ChatCompletions, &body).unwrap();
//! assert_eq!(prompt.texts(&body).collect::<Vec<_>>(), ["user", "Hi"]);
//!
//! let edits = Edits { model: Some("gpt-4o-ptu"), include_usage: true, service_tier: None };
//! let sent = json.edit(&body, &edits);
//! let v: serde_json::Value = serde_json::from_slice(&sent).unwrap();
//! assert_eq!(v["model"], "gpt-4o-ptu");
//! assert_eq!(v["stream_options"]["include_usage"], true);
//! assert_eq!(v["messages"][0]["content"], "Hi");
//! ```

mod parse;

use std::ops::Range;

use bytes::Bytes;
use serde_json::{Map, Value};

use crate::operation::Operation;

/// The parsed view of one request body. See the [module docs](self).
#[derive(Clone, Debug, Default)]
pub struct RequestJson {
    /// `model`: the deployment on v1 and Responses paths.
    pub model: Option<String>,
    /// `stream`.
    pub stream: bool,
    /// `stream_options.include_usage` as the client sent it.
    pub include_usage: bool,
    /// `max_tokens`.
    pub max_tokens: Option<u64>,
    /// `max_completion_tokens` (chat; wins over `max_tokens`).
    pub max_completion_tokens: Option<u64>,
    /// `max_output_tokens` (Responses).
    pub max_output_tokens: Option<u64>,
    /// `n`: choices to generate.
    pub n: Option<u32>,
    /// Where the prompt fields are.
    prompt_fields: PromptFields,
    /// Where `model`'s value (with its quotes) sits in the body.
    model_at: Option<Span>,
    /// Where `stream_options`' value sits, and that value when it is an object.
    stream_options: Option<(Span, Option<Map<String, Value>>)>,
    /// Where `service_tier`'s value sits, and that value when it is a string.
    service_tier: Option<(Span, Option<String>)>,
    /// Where the body's closing brace is, and whether the object has no member.
    close: Close,
}

/// A request's prompt as a tokenizer counts it: fixed costs, text pieces and JSON definitions.
///
/// The pieces point into the body the prompt was parsed from; pass that body to read them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Prompt {
    /// Tokens the formula adds whatever the text: message framing, names, tool calls, images, token ids.
    pub fixed: u64,
    texts: Vec<Piece>,
    definitions: Vec<Span>,
}

/// Changes a gateway makes to a request body before sending it, applied by [`RequestJson::edit`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Edits<'a> {
    /// Replace `model` with this name (a backend's own deployment name).
    pub model: Option<&'a str>,
    /// Set `stream_options.include_usage` to `true`, keeping any other stream option.
    pub include_usage: bool,
    /// Replace the value of `service_tier`, when the body has one (a Flex request retried at the
    /// default tier).
    pub service_tier: Option<&'a str>,
}

/// Why a body is not a usable JSON request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParseError(pub String);

/// Where each prompt field's value sits in the body.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct PromptFields {
    messages: Option<Span>,
    prompt: Option<Span>,
    input: Option<Span>,
    instructions: Option<Span>,
    tools: Option<Span>,
    functions: Option<Span>,
    best_of: Option<Span>,
}

/// A byte range of the body. `u32` is plenty: bodies are capped far below 4 GiB.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Span {
    start: u32,
    end: u32,
}

/// One text of the prompt.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Piece {
    /// A string without escapes, read in place.
    At(Span),
    /// A string that had escapes, decoded.
    Decoded(Box<str>),
}

#[derive(Clone, Copy, Debug, Default)]
struct Close {
    at: usize,
    empty: bool,
}

// === impl RequestJson ===

impl RequestJson {
    /// Parses a request body, once.
    ///
    /// Errors when the body is not a JSON object, a field appears twice, or a routing field (`model`,
    /// `stream`, `max_tokens`, ...) has the wrong type; the message says where.
    pub fn parse(body: &[u8]) -> Result<Self, ParseError> {
        parse::parse(body)
    }

    /// The prompt of this request to `operation`, parsed from `body` (the body this view was parsed
    /// from) into the pieces a tokenizer counts; `None` when a field the operation counts has an
    /// unexpected shape (the estimate then falls back to the body's length).
    pub fn prompt(&self, operation: Operation, body: &[u8]) -> Option<Prompt> {
        parse::prompt(operation, &self.prompt_fields, body)
    }

    /// `best_of` (legacy completions), when present and a count.
    pub fn best_of(&self, body: &[u8]) -> Option<u64> {
        parse::best_of(&self.prompt_fields, body).ok().flatten()
    }

    /// `max_completion_tokens`, else `max_tokens`, else `max_output_tokens`: the output limit the
    /// request names, whatever its operation calls it.
    pub fn output_limit(&self) -> Option<u64> {
        self.max_completion_tokens
            .or(self.max_tokens)
            .or(self.max_output_tokens)
    }

    /// `service_tier` as the client sent it (`auto`, `default`, `priority`, `flex`), when a string.
    pub fn service_tier(&self) -> Option<&str> {
        self.service_tier.as_ref()?.1.as_deref()
    }

    /// The body to send: `body` (the one this view was parsed from) with `edits` spliced in. Returns
    /// `body` itself, without copying, when there is nothing to change.
    pub fn edit(&self, body: &Bytes, edits: &Edits<'_>) -> Bytes {
        let mut splices: [Option<(Range<usize>, String)>; 3] = [None, None, None];
        if let (Some(tier), Some((at, _))) = (edits.service_tier, &self.service_tier) {
            splices[2] = Some((at.range(), quoted(tier)));
        }
        if let (Some(mapped), Some(at)) = (edits.model, self.model_at) {
            if self.model.as_deref() != Some(mapped) {
                splices[0] = Some((at.range(), quoted(mapped)));
            }
        }
        if edits.include_usage && !self.include_usage {
            splices[1] = Some(match &self.stream_options {
                Some((at, options)) => {
                    let mut options = options.clone().unwrap_or_default();
                    options.insert("include_usage".into(), Value::Bool(true));
                    (at.range(), Value::Object(options).to_string())
                }
                None => {
                    let comma = if self.close.empty { "" } else { "," };
                    (
                        self.close.at..self.close.at,
                        format!(r#"{comma}"stream_options":{{"include_usage":true}}"#),
                    )
                }
            });
        }
        let mut splices: Vec<_> = splices.into_iter().flatten().collect();
        if splices.is_empty() {
            return body.clone();
        }
        splices.sort_by_key(|(range, _)| range.start);
        let added: usize = splices.iter().map(|(_, text)| text.len()).sum();
        let mut out = Vec::with_capacity(body.len() + added);
        let mut from = 0;
        for (range, text) in splices {
            let Some(before) = body.get(from..range.start) else {
                // Spans come from parsing this very body; a mismatch means another body was passed.
                return body.clone();
            };
            out.extend_from_slice(before);
            out.extend_from_slice(text.as_bytes());
            from = range.end;
        }
        out.extend_from_slice(body.get(from..).unwrap_or_default());
        Bytes::from(out)
    }
}

// === impl Prompt ===

impl Prompt {
    /// Each text of the prompt, read from `body` (the body it was parsed from).
    pub fn texts<'b>(&'b self, body: &'b [u8]) -> impl Iterator<Item = &'b str> + 'b {
        self.texts.iter().filter_map(move |piece| match piece {
            Piece::At(span) => std::str::from_utf8(body.get(span.range())?).ok(),
            Piece::Decoded(text) => Some(text),
        })
    }

    /// The raw JSON of each tool or function definition list (`tools`, `functions`), as sent.
    pub fn definitions<'b>(&'b self, body: &'b [u8]) -> impl Iterator<Item = &'b str> + 'b {
        self.definitions
            .iter()
            .filter_map(move |span| std::str::from_utf8(body.get(span.range())?).ok())
    }
}

// === impl Span ===

impl Span {
    /// Where `inner`, a slice of `outer`, sits in it.
    fn of(outer: &[u8], inner: &[u8]) -> Option<Span> {
        let start = (inner.as_ptr() as usize).checked_sub(outer.as_ptr() as usize)?;
        let end = start.checked_add(inner.len())?;
        if end > outer.len() {
            return None;
        }
        Some(Span {
            start: u32::try_from(start).ok()?,
            end: u32::try_from(end).ok()?,
        })
    }

    fn range(self) -> Range<usize> {
        self.start as usize..self.end as usize
    }
}

// === impl ParseError ===

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ParseError {}

/// `name` as a JSON string.
fn quoted(name: &str) -> String {
    Value::String(name.to_owned()).to_string()
}

#[cfg(test)]
mod tests;
