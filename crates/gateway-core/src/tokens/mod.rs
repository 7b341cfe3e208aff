//! Estimating a request's tokens before the call, and reading the real usage after it.
//!
//! Azure meters every deployment in tokens per minute and counts a request **on arrival**, from its
//! prompt and its `max_tokens` (reference, section 2). The gateway does the same: [`estimate`] counts
//! the prompt with the model's tokenizer ([`encoding_for_model`]; `o200k_base` unless the model is
//! known to use `cl100k_base`) and reserves room for the output. After the call, [`usage_from_json`]
//! (a JSON body) or [`usage_from_sse_data`] (the final usage frame of a stream) give the real figures
//! to reconcile with. [`supports_stream_usage`] says whether the gateway may ask for that frame.
//!
//! The body is parsed once, by [`RequestJson::parse`](crate::request::RequestJson::parse), into the
//! pieces of its prompt; [`estimate_parsed`] counts them. Each encoding is loaded once per process
//! (a compact copy of tiktoken's tables, about 5 MB for `o200k_base`), on first use or by
//! [`Encoding::warm_up`]; nothing is loaded per request.
//!
//! Counting needs the `tokenizer` feature (tiktoken's tables). Without it, [`rough_estimate`] (the
//! body's length over four) is what there is.
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
//! # #[cfg(feature = "tokenizer")] {
//! use gateway_core::operation::Operation;
//! use gateway_core::tokens::{Encoding, count, estimate};
//!
//! let body = br#"{"messages":[{"role":"user","content":"Hello there"}],"max_tokens":50,"n":2}"#;
//! let e = estimate(Operation::ChatCompletions, "gpt-4o", body, 16);
//! let expected = 3 + 3 + count(Encoding::O200k, "user") + count(Encoding::O200k, "Hello there");
//! assert_eq!(e.prompt, expected);
//! assert_eq!(e.completion, 100);
//! assert_eq!(e.total(), expected + 100);
//! # }
//! ```

#[cfg(feature = "tokenizer")]
mod compact;
mod encoding;
mod usage;

#[cfg(feature = "tokenizer")]
pub use encoding::count;
pub use encoding::{Encoding, encoding_for_model};
pub use usage::{
    Answer, answer_from_json, supports_stream_usage, usage_from_json, usage_from_sse_data,
};

use crate::operation::Operation;
#[cfg(feature = "tokenizer")]
use crate::request::RequestJson;

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
    /// Prompt tokens served from the prompt cache (`prompt_tokens_details.cached_tokens`, Responses
    /// `input_tokens_details.cached_tokens`): part of `prompt`, 0 when not reported.
    pub cached_prompt: u64,
    /// Output tokens spent on reasoning (`completion_tokens_details.reasoning_tokens`, Responses
    /// `output_tokens_details.reasoning_tokens`): part of `completion`, 0 when not reported.
    pub reasoning: u64,
}

/// Estimates the tokens of a request to `operation` on a deployment of `model`, from its JSON body.
///
/// Parses the body; a gateway that already has its [`RequestJson`] calls [`estimate_parsed`].
/// `default_completion` is reserved for the output when the body sets no limit. See the
/// [module docs](self) for the rules and approximations.
#[cfg(feature = "tokenizer")]
pub fn estimate(
    operation: Operation,
    model: &str,
    body: &[u8],
    default_completion: u64,
) -> Estimate {
    if operation == Operation::Other {
        return Estimate::default();
    }
    match RequestJson::parse(body) {
        Ok(json) => estimate_parsed(
            operation,
            encoding_for_model(model),
            &json,
            body,
            default_completion,
        ),
        Err(_) => fallback(operation, body.len(), default_completion),
    }
}

/// Estimates the tokens of a request whose body (`body`) was parsed into `json`, counting its prompt
/// with `encoding`. See [`estimate`].
#[cfg(feature = "tokenizer")]
pub fn estimate_parsed(
    operation: Operation,
    encoding: Encoding,
    json: &RequestJson,
    body: &[u8],
    default_completion: u64,
) -> Estimate {
    estimate_with(
        operation,
        encoding,
        json,
        body,
        default_completion,
        |text| count(encoding, text),
    )
}

/// An upper bound of [`estimate_parsed`] for the same request, without tokenizing its text: every
/// token is at least one byte, so a text counts at most its length in bytes. Message framing,
/// images and tool definitions (compact JSON can be longer than what was sent) are counted as
/// [`estimate_parsed`] counts them, and the output reservation is the same.
///
/// A limit far above this bound does not need the exact figure to admit the request: a
/// long prompt is then admitted for the price of summing a few lengths instead of ~100 ns per
/// token.
///
/// ```
/// use gateway_core::operation::Operation;
/// use gateway_core::request::RequestJson;
/// use gateway_core::tokens::{Encoding, estimate_parsed, upper_bound_parsed};
///
/// let body = br#"{"messages":[{"role":"user","content":"Hello there, how are you?"}],"max_tokens":50}"#;
/// let json = RequestJson::parse(body).unwrap();
/// let op = Operation::ChatCompletions;
/// let exact = estimate_parsed(op, Encoding::O200k, &json, body, 16);
/// let bound = upper_bound_parsed(op, Encoding::O200k, &json, body, 16);
/// assert!(bound.prompt >= exact.prompt);
/// assert_eq!(bound.prompt, 3 + 3 + "user".len() as u64 + "Hello there, how are you?".len() as u64);
/// assert_eq!(bound.completion, exact.completion);
/// ```
#[cfg(feature = "tokenizer")]
pub fn upper_bound_parsed(
    operation: Operation,
    encoding: Encoding,
    json: &RequestJson,
    body: &[u8],
    default_completion: u64,
) -> Estimate {
    estimate_with(
        operation,
        encoding,
        json,
        body,
        default_completion,
        |text| text.len() as u64,
    )
}

/// [`estimate_parsed`], counting each prompt text with `text_tokens`.
#[cfg(feature = "tokenizer")]
fn estimate_with(
    operation: Operation,
    encoding: Encoding,
    json: &RequestJson,
    body: &[u8],
    default_completion: u64,
    text_tokens: impl Fn(&str) -> u64,
) -> Estimate {
    let Some(prompt) = json.prompt(operation, body) else {
        return fallback(operation, body.len(), default_completion);
    };
    let mut tokens = prompt.fixed;
    for text in prompt.texts(body) {
        tokens = tokens.saturating_add(text_tokens(text));
    }
    for definitions in prompt.definitions(body) {
        // Counted as their compact JSON, as they were before the body was parsed once; counted
        // exactly by a bound too (a number may be longer re-serialised than as it was sent).
        if let Ok(value) = serde_json::from_str::<serde_json::Value>(definitions) {
            tokens = tokens.saturating_add(count(encoding, &value.to_string()));
        }
    }
    let reserve = |max: Option<u64>, n: Option<u64>| {
        max.unwrap_or(default_completion)
            .saturating_mul(n.unwrap_or(1).max(1))
    };
    let n = json.n.map(u64::from);
    let completion = match operation {
        Operation::ChatCompletions => reserve(json.max_completion_tokens.or(json.max_tokens), n),
        Operation::Completions => reserve(
            json.max_tokens,
            Some(n.unwrap_or(1).max(json.best_of(body).unwrap_or(1))),
        ),
        Operation::Responses => reserve(json.max_output_tokens, None),
        Operation::Embeddings | Operation::Other => 0,
    };
    Estimate {
        prompt: tokens,
        completion,
    }
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

/// The estimate of a body that could not be read: its length over four, and the default output.
#[cfg(feature = "tokenizer")]
fn fallback(operation: Operation, body_len: usize, default_completion: u64) -> Estimate {
    Estimate {
        prompt: (body_len as u64).div_ceil(FALLBACK_BYTES_PER_TOKEN),
        completion: match operation {
            Operation::Embeddings | Operation::Other => 0,
            _ => default_completion,
        },
    }
}

#[cfg(all(test, feature = "tokenizer"))]
mod tests;
