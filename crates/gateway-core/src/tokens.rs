//! Estimating a request's tokens before the call, and reading the real usage after it.
//!
//! Azure meters every deployment in tokens per minute and counts a request **on arrival**, from its
//! prompt and its `max_tokens` (reference, section 2). The gateway does the same: [`estimate`] counts
//! the prompt with the model's tokenizer ([`encoding_for_model`]; `o200k_base` unless the model is
//! known to use `cl100k_base`) and reserves room for the output. After the call, [`usage_from_json`]
//! (a JSON body) or [`usage_from_sse_data`] (the final usage frame of a stream) give the real figures
//! to reconcile with. [`supports_stream_usage`] says whether the gateway may ask for that frame.
//!
//! Each encoding is loaded once per process (tiktoken-rs' singletons), on first use or by
//! [`Encoding::warm_up`]; nothing is loaded per request. Bodies are parsed into small borrowed
//! structures (strings without escapes are not copied), not into a `serde_json::Value` tree.
//!
//! # How the prompt is counted
//!
//! Chat completions, the way OpenAI documents it for its chat models (and the way the `simulator`
//! counts, so tests can compare exactly):
//!
//! ```text
//! prompt = 3                                         // reply priming: <|start|>assistant<|message|>
//!        + Σ over messages ( 3                       // <|start|>, <|message|>, <|end|>
//!                          + tokens(role)
//!                          + tokens(content)         // a string, or the text of each part
//!                          + tokens(name) + 1 if a name is given
//!                          + Σ over tool_calls ( 3 + tokens(function name) + tokens(arguments) ) )
//!        + tokens(JSON of `tools`) + tokens(JSON of `functions`)
//! ```
//!
//! Approximations, all documented on the constants they use:
//! - An image part counts a fixed [`TOKENS_PER_IMAGE`] (85, the cost of a low-detail image). A
//!   high-detail image costs more (85 + 170 per 512 px tile); the image is not fetched or decoded
//!   here, so its size is unknown. Audio and file parts count nothing.
//! - Tool and function definitions count the tokens of their compact JSON serialisation. OpenAI
//!   renders them in a terser internal form, so this overestimates them (by 30 to 40% against the
//!   OpenAI cookbook's estimate in the tests), which is the safe side for a reservation.
//! - A tool call in an assistant message counts [`TOKENS_PER_TOOL_CALL`] plus its function's name and
//!   arguments.
//!
//! Legacy completions count their `prompt` (a string, strings, or token ids); embeddings their
//! `input` (a string, strings, or arrays of token ids, which count one token per id). The Responses
//! API counts its `input` like the simulator does: a string input as plain text, an array of items
//! with the chat formula above (an item's `content`, `name`, and a function call's `arguments` or
//! `output`), plus the plain text of `instructions` and the JSON of `tools`. Azure wraps a string
//! input and the instructions in messages, a few tokens more; the reconciliation after the call
//! corrects that.
//!
//! # What is reserved for the output
//!
//! Chat: `max_completion_tokens`, else `max_tokens`, else `default_completion`, times `n`.
//! Completions: `max_tokens`, else `default_completion`, times the larger of `n` and `best_of` (Azure
//! counts `best_of`, which generates that many completions). Responses: `max_output_tokens`, else
//! `default_completion`. Embeddings: nothing. Other operations (audio, images, files...) are not
//! estimated: their estimate is zero.
//!
//! # When the body cannot be read
//!
//! Invalid JSON, or a field of an unexpected shape (say a number where a message's `content` should
//! be), never panics: the prompt is then estimated as the raw body's length in bytes divided by 4
//! (rounded up), a rough figure for English text in these encodings, and the output reservation is
//! `default_completion` (nothing for embeddings). Azure rejects such a request with a 400 anyway, and
//! the reservation is released then.
//!
//! ```
//! use gateway_core::operation::Operation;
//! use gateway_core::tokens::{Encoding, count, estimate};
//!
//! let body = br#"{"messages":[{"role":"user","content":"Hello there"}],"max_tokens":50,"n":2}"#;
//! let e = estimate(Operation::ChatCompletions, "gpt-4o", body, 16);
//! let expected = 3 + 3 + count(Encoding::O200k, "user") + count(Encoding::O200k, "Hello there");
//! assert_eq!(e.prompt, expected);
//! assert_eq!(e.completion, 100);
//! assert_eq!(e.total(), expected + 100);
//! ```

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;

use serde::Deserialize;
use serde::de::value::MapAccessDeserializer;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::Value;
use tiktoken_rs::CoreBPE;

use crate::operation::Operation;

/// Tokens added per chat message (`<|start|>`, `<|message|>`, `<|end|>`).
pub const TOKENS_PER_MESSAGE: u64 = 3;
/// Tokens added when a message has a `name`.
pub const TOKENS_PER_NAME: u64 = 1;
/// Tokens priming the assistant's reply, once per chat request.
pub const REPLY_PRIMING_TOKENS: u64 = 3;
/// Tokens counted per image part: the fixed cost of a low-detail image (an approximation: a
/// high-detail image costs 85 + 170 per 512 px tile, and its size is not known here).
pub const TOKENS_PER_IMAGE: u64 = 85;
/// Tokens added per tool call in an assistant message, besides its name and arguments (framing, an
/// approximation).
pub const TOKENS_PER_TOOL_CALL: u64 = 3;
/// Bytes per token assumed when a body cannot be parsed.
pub const FALLBACK_BYTES_PER_TOKEN: u64 = 4;

/// The first api-version with `stream_options.include_usage` (`2024-09-01-preview`), as a date.
const STREAM_USAGE_SINCE: (u16, u8, u8) = (2024, 9, 1);

/// A request's token estimate, reserved before the call.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Estimate {
    /// Prompt tokens.
    pub prompt: u64,
    /// Tokens reserved for the output: `max_tokens` (or its variants) times `n`, or the default.
    pub completion: u64,
}

impl Estimate {
    /// Prompt and reserved output together.
    pub fn total(&self) -> u64 {
        self.prompt.saturating_add(self.completion)
    }
}

/// The real token usage a backend reported.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Usage {
    /// Prompt (input) tokens.
    pub prompt: u64,
    /// Completion (output) tokens; 0 for embeddings.
    pub completion: u64,
    /// Total tokens, as reported (or prompt + completion when not reported).
    pub total: u64,
}

/// A tiktoken encoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Encoding {
    /// `o200k_base`: gpt-4o, gpt-4.1, gpt-5, the o-series, and unknown models.
    O200k,
    /// `cl100k_base`: gpt-4 (not 4o), gpt-3.5, text-embedding-ada-002 and text-embedding-3-*.
    Cl100k,
}

impl Encoding {
    /// tiktoken's name for the encoding.
    pub fn name(self) -> &'static str {
        match self {
            Encoding::O200k => "o200k_base",
            Encoding::Cl100k => "cl100k_base",
        }
    }

    /// Loads the encoding now (once per process), so the first request does not pay for it.
    pub fn warm_up(self) {
        let _ = self.bpe();
    }

    fn bpe(self) -> &'static CoreBPE {
        match self {
            Encoding::O200k => tiktoken_rs::o200k_base_singleton(),
            Encoding::Cl100k => tiktoken_rs::cl100k_base_singleton(),
        }
    }
}

impl fmt::Display for Encoding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The encoding of a model, by name (case-insensitive; a deployment name such as `gpt-4o-ptu` works
/// when it starts with the model's name).
///
/// `cl100k_base` for `gpt-4` and its variants other than `gpt-4o`/`gpt-4.1`/`gpt-4.5`, `gpt-35-turbo`
/// and `gpt-3.5*`, `text-embedding-ada-002`, `text-embedding-3-*`, `davinci-002` and `babbage-002`;
/// `o200k_base` for everything else: `gpt-4o*`, `gpt-4.1*`, `gpt-5*`, `o1*`, `o3*`, `o4*` and unknown
/// names.
pub fn encoding_for_model(model: &str) -> Encoding {
    let model = model.trim();
    let starts = |prefix: &str| {
        model
            .get(..prefix.len())
            .is_some_and(|head| head.eq_ignore_ascii_case(prefix))
    };
    if starts("gpt-4o") || starts("gpt-4.") {
        return Encoding::O200k;
    }
    const CL100K: [&str; 7] = [
        "gpt-4",
        "gpt-35",
        "gpt-3.5",
        "text-embedding-ada-002",
        "text-embedding-3-",
        "davinci-002",
        "babbage-002",
    ];
    if CL100K.iter().any(|prefix| starts(prefix)) {
        Encoding::Cl100k
    } else {
        Encoding::O200k
    }
}

/// Tokens in `text` (`encode_ordinary`: special tokens count as plain text).
pub fn count(encoding: Encoding, text: &str) -> u64 {
    if text.is_empty() {
        return 0;
    }
    encoding.bpe().encode_ordinary(text).len() as u64
}

/// Estimates the tokens of a request to `operation` on a deployment of `model`, from its JSON body.
///
/// `default_completion` is reserved for the output when the body sets no limit. See the
/// [module docs](self) for the rules and approximations.
pub fn estimate(
    operation: Operation,
    model: &str,
    body: &[u8],
    default_completion: u64,
) -> Estimate {
    let encoding = encoding_for_model(model);
    let parsed = match operation {
        Operation::ChatCompletions => chat(encoding, body, default_completion),
        Operation::Completions => completions(encoding, body, default_completion),
        Operation::Embeddings => embeddings(encoding, body),
        Operation::Responses => responses(encoding, body, default_completion),
        Operation::Other => return Estimate::default(),
    };
    parsed.unwrap_or_else(|_| Estimate {
        prompt: (body.len() as u64).div_ceil(FALLBACK_BYTES_PER_TOKEN),
        completion: match operation {
            Operation::Embeddings => 0,
            _ => default_completion,
        },
    })
}

/// A free estimate, with no tokenizer: the body's length over four for the prompt, and
/// `max_tokens` (or `default_completion`) times `n` for the answer. Good enough to route by (is there
/// room on that backend?) when no limit needs an exact reservation; tokenizing a long prompt costs
/// far more than the rest of the gateway's work on a request.
pub fn rough_estimate(
    operation: Operation,
    body_len: usize,
    max_tokens: Option<u64>,
    n: Option<u32>,
    default_completion: u64,
) -> Estimate {
    let completion = match operation {
        Operation::Embeddings | Operation::Other => 0,
        _ => max_tokens
            .unwrap_or(default_completion)
            .saturating_mul(u64::from(n.unwrap_or(1).max(1))),
    };
    match operation {
        Operation::Other => Estimate::default(),
        _ => Estimate {
            prompt: (body_len as u64).div_ceil(FALLBACK_BYTES_PER_TOKEN),
            completion,
        },
    }
}

/// The usage in a JSON response body: `usage.{prompt_tokens, completion_tokens, total_tokens}`
/// (chat, completions; embeddings have no `completion_tokens`) or `usage.{input_tokens,
/// output_tokens, total_tokens}` (Responses). `None` when there is none or the body is not JSON.
pub fn usage_from_json(body: &[u8]) -> Option<Usage> {
    serde_json::from_slice::<WithUsage>(body)
        .ok()?
        .usage?
        .into_usage()
}

/// The usage in one SSE `data:` payload (without the `data:` prefix).
///
/// It is the final usage chunk of a chat or completions stream (`"choices": []` with a non-null
/// `usage`, sent when `stream_options.include_usage` is set), or the `response.usage` of a Responses
/// `response.completed` event (also of `response.incomplete` and `response.failed`, the other
/// terminal events, when they carry one). `None` for every other frame, for `[DONE]`, and for junk.
/// Cheap on ordinary frames: those without the word `usage` are not parsed.
pub fn usage_from_sse_data(data: &str) -> Option<Usage> {
    let data = data.trim();
    if !data.starts_with('{') || !data.contains("\"usage\"") {
        return None;
    }
    let frame: Frame<'_> = serde_json::from_str(data).ok()?;
    match frame.kind.as_ref().map(|kind| kind.0.as_ref()) {
        Some("response.completed" | "response.incomplete" | "response.failed") => {
            frame.response?.usage?.into_usage()
        }
        _ if frame.choices.is_some_and(|choices| choices.is_empty()) => frame.usage?.into_usage(),
        _ => None,
    }
}

/// Whether a backend accepts `stream_options.include_usage` for this api-version.
///
/// It exists from `2024-09-01-preview` on (so in GA `2024-10-21` and later) and on the v1 paths,
/// where the api-version is optional. A `-preview` version counts as its date. On a classic path,
/// no api-version or one that is not `YYYY-MM-DD` or `YYYY-MM-DD-preview` means no.
pub fn supports_stream_usage(api_version: Option<&str>, v1_path: bool) -> bool {
    if v1_path {
        return true;
    }
    api_version
        .and_then(version_date)
        .is_some_and(|date| date >= STREAM_USAGE_SINCE)
}

/// The date of an api-version `YYYY-MM-DD` or `YYYY-MM-DD-preview`.
fn version_date(version: &str) -> Option<(u16, u8, u8)> {
    let version = version.trim();
    let date = version.strip_suffix("-preview").unwrap_or(version);
    let mut parts = date.split('-');
    let mut next = |len: usize| {
        parts
            .next()
            .filter(|p| p.len() == len && p.bytes().all(|b| b.is_ascii_digit()))
    };
    let year = next(4)?.parse().ok()?;
    let month = next(2)?.parse().ok()?;
    let day = next(2)?.parse().ok()?;
    if parts.next().is_some() || !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return None;
    }
    Some((year, month, day))
}

// === counting ===

/// Adds up tokens with one encoding.
struct Counter {
    encoding: Encoding,
    tokens: u64,
}

impl Counter {
    fn new(encoding: Encoding) -> Self {
        Counter {
            encoding,
            tokens: 0,
        }
    }

    fn add(&mut self, tokens: u64) {
        self.tokens = self.tokens.saturating_add(tokens);
    }

    fn text(&mut self, text: &str) {
        self.add(count(self.encoding, text));
    }

    fn opt_text(&mut self, text: Option<&Text<'_>>) {
        if let Some(text) = text {
            self.text(&text.0);
        }
    }

    fn content(&mut self, content: &Content<'_>) {
        match content {
            Content::None => {}
            Content::Text(text) => self.text(&text.0),
            Content::Parts(parts) => {
                for part in parts {
                    match part {
                        Part::Text(text) => self.text(&text.0),
                        Part::Object(part) => self.part(part),
                    }
                }
            }
        }
    }

    fn part(&mut self, part: &PartObject<'_>) {
        let kind = part.kind.as_ref().map(|kind| kind.0.as_ref());
        if matches!(kind, Some("image_url" | "input_image" | "image")) {
            self.add(TOKENS_PER_IMAGE);
        }
        self.opt_text(part.text.as_ref());
        self.opt_text(part.refusal.as_ref());
    }

    /// One chat message or Responses input item, by the chat formula.
    fn message(&mut self, message: &Message<'_>) {
        self.add(TOKENS_PER_MESSAGE);
        self.opt_text(message.role.as_ref());
        self.content(&message.content);
        if let Some(name) = &message.name {
            self.text(&name.0);
            self.add(TOKENS_PER_NAME);
        }
        let calls = message
            .tool_calls
            .iter()
            .flatten()
            .filter_map(|c| c.function.as_ref());
        for call in calls.chain(message.function_call.as_ref()) {
            self.add(TOKENS_PER_TOOL_CALL);
            self.opt_text(call.name.as_ref());
            self.opt_text(call.arguments.as_ref());
        }
        // Responses `function_call` and `function_call_output` items.
        self.opt_text(message.arguments.as_ref());
        self.content(&message.output);
    }

    /// Tool or function definitions: the tokens of their JSON.
    fn definitions(&mut self, definitions: Option<&Value>) {
        match definitions {
            None | Some(Value::Null) => {}
            Some(Value::Array(items)) if items.is_empty() => {}
            Some(value) => self.text(&value.to_string()),
        }
    }

    fn prompt(&mut self, prompt: &PromptInput<'_>) {
        for text in &prompt.texts {
            self.text(&text.0);
        }
        self.add(prompt.token_ids);
    }
}

/// Reserved output: `max` (or the default) times `n`.
fn reserve(max: Option<u64>, default_completion: u64, n: Option<u64>) -> u64 {
    max.unwrap_or(default_completion)
        .saturating_mul(n.unwrap_or(1).max(1))
}

fn chat(encoding: Encoding, body: &[u8], default_completion: u64) -> serde_json::Result<Estimate> {
    let request: ChatRequest<'_> = serde_json::from_slice(body)?;
    let mut counter = Counter::new(encoding);
    counter.add(REPLY_PRIMING_TOKENS);
    for message in &request.messages {
        counter.message(message);
    }
    counter.definitions(request.tools.as_ref());
    counter.definitions(request.functions.as_ref());
    Ok(Estimate {
        prompt: counter.tokens,
        completion: reserve(
            request.max_completion_tokens.or(request.max_tokens),
            default_completion,
            request.n,
        ),
    })
}

fn completions(
    encoding: Encoding,
    body: &[u8],
    default_completion: u64,
) -> serde_json::Result<Estimate> {
    let request: CompletionsRequest<'_> = serde_json::from_slice(body)?;
    let mut counter = Counter::new(encoding);
    counter.prompt(&request.prompt);
    let n = request.n.unwrap_or(1).max(request.best_of.unwrap_or(1));
    Ok(Estimate {
        prompt: counter.tokens,
        completion: reserve(request.max_tokens, default_completion, Some(n)),
    })
}

fn embeddings(encoding: Encoding, body: &[u8]) -> serde_json::Result<Estimate> {
    let request: EmbeddingsRequest<'_> = serde_json::from_slice(body)?;
    let mut counter = Counter::new(encoding);
    counter.prompt(&request.input);
    Ok(Estimate {
        prompt: counter.tokens,
        completion: 0,
    })
}

fn responses(
    encoding: Encoding,
    body: &[u8],
    default_completion: u64,
) -> serde_json::Result<Estimate> {
    let request: ResponsesRequest<'_> = serde_json::from_slice(body)?;
    let mut counter = Counter::new(encoding);
    match &request.input {
        ResponsesInput::None => {}
        ResponsesInput::Text(text) => counter.text(&text.0),
        ResponsesInput::Items(items) => {
            counter.add(REPLY_PRIMING_TOKENS);
            for item in items {
                counter.message(item);
            }
        }
    }
    counter.content(&request.instructions);
    counter.definitions(request.tools.as_ref());
    Ok(Estimate {
        prompt: counter.tokens,
        completion: reserve(request.max_output_tokens, default_completion, None),
    })
}

// === request bodies ===

#[derive(Deserialize)]
struct ChatRequest<'a> {
    #[serde(borrow, default)]
    messages: Vec<Message<'a>>,
    tools: Option<Value>,
    functions: Option<Value>,
    max_completion_tokens: Option<u64>,
    max_tokens: Option<u64>,
    n: Option<u64>,
}

#[derive(Deserialize)]
struct CompletionsRequest<'a> {
    #[serde(borrow, default)]
    prompt: PromptInput<'a>,
    max_tokens: Option<u64>,
    n: Option<u64>,
    best_of: Option<u64>,
}

#[derive(Deserialize)]
struct EmbeddingsRequest<'a> {
    #[serde(borrow, default)]
    input: PromptInput<'a>,
}

#[derive(Deserialize)]
struct ResponsesRequest<'a> {
    #[serde(borrow, default)]
    input: ResponsesInput<'a>,
    #[serde(borrow, default)]
    instructions: Content<'a>,
    tools: Option<Value>,
    max_output_tokens: Option<u64>,
}

/// A chat message, or a Responses input item (messages, function calls and their outputs).
#[derive(Deserialize)]
struct Message<'a> {
    #[serde(borrow)]
    role: Option<Text<'a>>,
    #[serde(borrow, default)]
    content: Content<'a>,
    #[serde(borrow)]
    name: Option<Text<'a>>,
    #[serde(borrow)]
    tool_calls: Option<Vec<ToolCall<'a>>>,
    /// The legacy single function call of an assistant message.
    #[serde(borrow)]
    function_call: Option<FunctionCall<'a>>,
    /// A Responses `function_call` item's arguments.
    #[serde(borrow)]
    arguments: Option<Text<'a>>,
    /// A Responses `function_call_output` item's output (a string or content parts).
    #[serde(borrow, default)]
    output: Content<'a>,
}

#[derive(Deserialize)]
struct ToolCall<'a> {
    #[serde(borrow)]
    function: Option<FunctionCall<'a>>,
}

#[derive(Deserialize)]
struct FunctionCall<'a> {
    #[serde(borrow)]
    name: Option<Text<'a>>,
    #[serde(borrow)]
    arguments: Option<Text<'a>>,
}

#[derive(Deserialize)]
struct PartObject<'a> {
    #[serde(rename = "type", borrow)]
    kind: Option<Text<'a>>,
    #[serde(borrow)]
    text: Option<Text<'a>>,
    #[serde(borrow)]
    refusal: Option<Text<'a>>,
}

// === response bodies ===

#[derive(Deserialize)]
struct WithUsage {
    usage: Option<RawUsage>,
}

#[derive(Deserialize)]
struct Frame<'a> {
    #[serde(rename = "type", borrow)]
    kind: Option<Text<'a>>,
    choices: Option<Vec<IgnoredAny>>,
    usage: Option<RawUsage>,
    response: Option<WithUsage>,
}

#[derive(Deserialize)]
struct RawUsage {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    total_tokens: Option<u64>,
}

impl RawUsage {
    fn into_usage(self) -> Option<Usage> {
        let prompt = self.prompt_tokens.or(self.input_tokens);
        let completion = self.completion_tokens.or(self.output_tokens);
        if prompt.is_none() && completion.is_none() && self.total_tokens.is_none() {
            return None;
        }
        let total = self.total_tokens;
        let prompt =
            prompt.unwrap_or_else(|| total.unwrap_or(0).saturating_sub(completion.unwrap_or(0)));
        let completion =
            completion.unwrap_or_else(|| total.map_or(0, |total| total.saturating_sub(prompt)));
        Some(Usage {
            prompt,
            completion,
            total: total.unwrap_or_else(|| prompt.saturating_add(completion)),
        })
    }
}

// === lenient, borrowing field types ===

/// A JSON string, borrowed from the body when it has no escapes.
struct Text<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TextVisitor<'a>(PhantomData<&'a ()>);

        impl<'de: 'a, 'a> Visitor<'de> for TextVisitor<'a> {
            type Value = Text<'a>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }

            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Text(Cow::Borrowed(v)))
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Text(Cow::Owned(v.to_owned())))
            }

            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(Text(Cow::Owned(v)))
            }
        }

        deserializer.deserialize_str(TextVisitor(PhantomData))
    }
}

/// A message's `content`: absent or null, a string, or an array of parts.
#[derive(Default)]
enum Content<'a> {
    #[default]
    None,
    Text(Text<'a>),
    Parts(Vec<Part<'a>>),
}

/// One content part: a bare string, or an object (`{"type": "text", "text": ...}`, an image...).
enum Part<'a> {
    Text(Text<'a>),
    Object(PartObject<'a>),
}

/// A completions `prompt` or an embeddings `input`: a string, or an array of strings, token ids and
/// arrays of token ids.
#[derive(Default)]
struct PromptInput<'a> {
    texts: Vec<Text<'a>>,
    token_ids: u64,
}

/// A Responses `input`: a string or an array of items.
#[derive(Default)]
enum ResponsesInput<'a> {
    #[default]
    None,
    Text(Text<'a>),
    Items(Vec<Message<'a>>),
}

/// Implements the string cases of a visitor whose value wraps a [`Text`].
macro_rules! visit_strings {
    ($wrap:expr) => {
        fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
            Ok($wrap(Text(Cow::Borrowed(v))))
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Ok($wrap(Text(Cow::Owned(v.to_owned()))))
        }

        fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
            Ok($wrap(Text(Cow::Owned(v))))
        }
    };
}

impl<'de: 'a, 'a> Deserialize<'de> for Content<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ContentVisitor<'a>(PhantomData<&'a ()>);

        impl<'de: 'a, 'a> Visitor<'de> for ContentVisitor<'a> {
            type Value = Content<'a>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string, an array of content parts, or null")
            }

            visit_strings!(Content::Text);

            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(Content::None)
            }

            fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(Content::None)
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut parts = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
                while let Some(part) = seq.next_element()? {
                    parts.push(part);
                }
                Ok(Content::Parts(parts))
            }
        }

        deserializer.deserialize_any(ContentVisitor(PhantomData))
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Part<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct PartVisitor<'a>(PhantomData<&'a ()>);

        impl<'de: 'a, 'a> Visitor<'de> for PartVisitor<'a> {
            type Value = Part<'a>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a content part (an object or a string)")
            }

            visit_strings!(Part::Text);

            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                PartObject::deserialize(MapAccessDeserializer::new(map)).map(Part::Object)
            }
        }

        deserializer.deserialize_any(PartVisitor(PhantomData))
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for PromptInput<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        /// One element of a prompt array.
        enum Item<'a> {
            Text(Text<'a>),
            TokenIds(u64),
        }

        struct ItemVisitor<'a>(PhantomData<&'a ()>);

        impl<'de: 'a, 'a> Visitor<'de> for ItemVisitor<'a> {
            type Value = Item<'a>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string, a token id or an array of token ids")
            }

            visit_strings!(Item::Text);

            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
                Ok(Item::TokenIds(1))
            }

            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
                Ok(Item::TokenIds(1))
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut ids = 0u64;
                while seq.next_element::<IgnoredAny>()?.is_some() {
                    ids += 1;
                }
                Ok(Item::TokenIds(ids))
            }
        }

        impl<'de: 'a, 'a> Deserialize<'de> for Item<'a> {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                deserializer.deserialize_any(ItemVisitor(PhantomData))
            }
        }

        struct InputVisitor<'a>(PhantomData<&'a ()>);

        impl<'de: 'a, 'a> Visitor<'de> for InputVisitor<'a> {
            type Value = PromptInput<'a>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or an array of strings or token ids")
            }

            visit_strings!(|text| PromptInput {
                texts: vec![text],
                token_ids: 0,
            });

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut input = PromptInput::default();
                while let Some(item) = seq.next_element()? {
                    match item {
                        Item::Text(text) => input.texts.push(text),
                        Item::TokenIds(ids) => {
                            input.token_ids = input.token_ids.saturating_add(ids)
                        }
                    }
                }
                Ok(input)
            }
        }

        deserializer.deserialize_any(InputVisitor(PhantomData))
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for ResponsesInput<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct InputVisitor<'a>(PhantomData<&'a ()>);

        impl<'de: 'a, 'a> Visitor<'de> for InputVisitor<'a> {
            type Value = ResponsesInput<'a>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or an array of input items")
            }

            visit_strings!(ResponsesInput::Text);

            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(ResponsesInput::None)
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                Ok(ResponsesInput::Items(items))
            }
        }

        deserializer.deserialize_any(InputVisitor(PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn o200k(text: &str) -> u64 {
        count(Encoding::O200k, text)
    }

    fn chat_estimate(body: &str) -> Estimate {
        estimate(Operation::ChatCompletions, "gpt-4o", body.as_bytes(), 16)
    }

    #[test]
    fn strings_are_borrowed_unless_escaped() {
        let plain: Text<'_> = serde_json::from_str(r#""hello""#).unwrap();
        assert!(matches!(plain.0, Cow::Borrowed("hello")));
        let escaped: Text<'_> = serde_json::from_str(r#""a\nb""#).unwrap();
        assert!(matches!(escaped.0, Cow::Owned(ref s) if s == "a\nb"));
    }

    #[test]
    fn chat_formula_with_name_and_parts() {
        let e = chat_estimate(
            r#"{"messages":[
                {"role":"system","content":"You are helpful."},
                {"role":"user","name":"ann","content":[{"type":"text","text":"Hi"},"there",
                    {"type":"image_url","image_url":{"url":"https://x/y.png","detail":"low"}}]}
            ]}"#,
        );
        let expected = REPLY_PRIMING_TOKENS
            + (3 + o200k("system") + o200k("You are helpful."))
            + (3 + o200k("user") + o200k("Hi") + o200k("there") + TOKENS_PER_IMAGE)
            + o200k("ann")
            + TOKENS_PER_NAME;
        assert_eq!(e.prompt, expected);
        assert_eq!(e.completion, 16);
    }

    #[test]
    fn escaped_text_counts_the_decoded_string() {
        let e = chat_estimate(r#"{"messages":[{"role":"user","content":"line\none \u00e9"}]}"#);
        assert_eq!(e.prompt, 3 + 3 + o200k("user") + o200k("line\none é"));
    }

    #[test]
    fn null_content_and_tool_calls() {
        let e = chat_estimate(
            r#"{"messages":[{"role":"assistant","content":null,"tool_calls":[
                {"id":"call_1","type":"function","function":{"name":"get_weather","arguments":"{\"city\":\"Paris\"}"}}]},
                {"role":"tool","tool_call_id":"call_1","content":"18C"}]}"#,
        );
        let expected = 3
            + (3 + o200k("assistant"))
            + (TOKENS_PER_TOOL_CALL + o200k("get_weather") + o200k(r#"{"city":"Paris"}"#))
            + (3 + o200k("tool") + o200k("18C"));
        assert_eq!(e.prompt, expected);
    }

    #[test]
    fn tools_count_their_json() {
        let tools =
            r#"[{"type":"function","function":{"name":"f","parameters":{"type":"object"}}}]"#;
        let body = format!(r#"{{"messages":[],"tools":{tools}}}"#);
        let value: Value = serde_json::from_str(tools).unwrap();
        assert_eq!(chat_estimate(&body).prompt, 3 + o200k(&value.to_string()));
        assert_eq!(chat_estimate(r#"{"messages":[],"tools":[]}"#).prompt, 3);
    }

    #[test]
    fn unexpected_shapes_fall_back_to_length() {
        for body in [
            "not json",
            r#"{"messages":[{"role":"user","content":42}]}"#,
            r#"{"messages":"hi"}"#,
            r#"{"messages":[],"max_tokens":-1}"#,
            "[1,2,3]",
            "",
        ] {
            let e = chat_estimate(body);
            assert_eq!(e.prompt, (body.len() as u64).div_ceil(4), "{body}");
            assert_eq!(e.completion, 16, "{body}");
        }
        let e = estimate(
            Operation::Embeddings,
            "text-embedding-3-small",
            b"{\"input\":{}}",
            16,
        );
        assert_eq!(
            e,
            Estimate {
                prompt: 3,
                completion: 0
            }
        );
        let e = estimate(Operation::Other, "whisper", b"\x00\x01binary", 16);
        assert_eq!(e, Estimate::default());
    }

    #[test]
    fn version_dates() {
        assert_eq!(version_date("2024-10-21"), Some((2024, 10, 21)));
        assert_eq!(version_date("2025-04-01-preview"), Some((2025, 4, 1)));
        assert_eq!(version_date("2024-13-01"), None);
        assert_eq!(version_date("2024-1-01"), None);
        assert_eq!(version_date("2024-10-21-beta"), None);
        assert_eq!(version_date("latest"), None);
        assert_eq!(version_date(""), None);
    }

    #[test]
    fn usage_arithmetic() {
        let raw = RawUsage {
            prompt_tokens: Some(7),
            completion_tokens: None,
            input_tokens: None,
            output_tokens: None,
            total_tokens: Some(7),
        };
        assert_eq!(
            raw.into_usage(),
            Some(Usage {
                prompt: 7,
                completion: 0,
                total: 7
            })
        );
    }
}
