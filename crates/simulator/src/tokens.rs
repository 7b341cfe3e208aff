//! Token counting with tiktoken's `o200k_base`, and deterministic generated text and embeddings.
//!
//! The encoding is loaded once per process (tiktoken-rs' singleton); [`count_tokens`] is the plain
//! count of a text. Chat prompts are counted the way OpenAI documents it for gpt-4o-style models
//! ([`chat_prompt_tokens`]):
//!
//! ```text
//! prompt_tokens = 3                                        // reply priming: <|start|>assistant<|message|>
//!               + Σ over messages ( 3                      // <|start|>, <|message|>, <|end|>
//!                                 + tokens(role)
//!                                 + tokens(content)        // a string, or the `text` of each part
//!                                 + tokens(name) + 1 if a name is given )
//! ```
//!
//! ```
//! use serde_json::json;
//! use simulator::tokens::{chat_prompt_tokens, count_tokens};
//!
//! let messages = json!([{"role": "user", "content": "Hello there"}]);
//! let expected = 3 + 3 + count_tokens("user") + count_tokens("Hello there");
//! assert_eq!(chat_prompt_tokens(&messages), expected);
//! ```

use serde_json::Value;
use tiktoken_rs::{CoreBPE, Rank};

/// A user message containing this marker is answered with Azure's content-filter 400.
pub const CONTENT_FILTER_MARKER: &str = "[[content_filter]]";

/// Tokens added per chat message.
pub const TOKENS_PER_MESSAGE: u64 = 3;
/// Tokens added when a message has a `name`.
pub const TOKENS_PER_NAME: u64 = 1;
/// Tokens priming the assistant's reply.
pub const REPLY_PRIMING_TOKENS: u64 = 3;

/// Words generated text is made of.
const WORDS: &[&str] = &[
    "the",
    "gateway",
    "routes",
    "each",
    "request",
    "to",
    "a",
    "healthy",
    "region",
    "and",
    "model",
    "answers",
    "with",
    "tokens",
    "quota",
    "is",
    "shared",
    "across",
    "deployments",
    "when",
    "limits",
    "are",
    "reached",
    "traffic",
    "moves",
    "elsewhere",
    "quickly",
    "latency",
    "stays",
    "low",
    "for",
    "every",
    "client",
    "stream",
    "of",
    "text",
    "arrives",
    "in",
    "small",
    "chunks",
    "retry",
    "after",
    "seconds",
    "backend",
    "pool",
    "priority",
    "weight",
    "circuit",
    "breaker",
    "opens",
    "closes",
    "simulated",
    "azure",
    "openai",
    "resource",
    "tests",
    "run",
    "fast",
    "deterministic",
    "output",
];

fn bpe() -> &'static CoreBPE {
    tiktoken_rs::o200k_base_singleton()
}

/// Loads the encoding now, so the first request does not pay for it.
pub fn warm_up() {
    let _ = bpe();
}

/// Number of `o200k_base` tokens in `text` (special tokens are counted as plain text).
pub fn count_tokens(text: &str) -> u64 {
    bpe().encode_ordinary(text).len() as u64
}

/// Prompt tokens of a chat `messages` array, by the formula in the [module docs](self).
///
/// Anything other than an array counts as no messages (only the reply priming).
pub fn chat_prompt_tokens(messages: &Value) -> u64 {
    chat_prompt(messages, false).tokens
}

/// What the handlers need to know about a prompt.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Prompt {
    /// Prompt tokens.
    pub(crate) tokens: u64,
    /// Hash of the prompt text, seeding generated text.
    pub(crate) hash: u64,
    /// The last user message (or the prompt) carries [`CONTENT_FILTER_MARKER`].
    pub(crate) flagged: bool,
    /// Count a token per four bytes of text ([`Variants::approximate_tokens`](crate::Variants)).
    pub(crate) approximate: bool,
}

/// Counts a chat `messages` array (also used for Responses API input items).
pub(crate) fn chat_prompt(messages: &Value, approximate: bool) -> Prompt {
    let mut prompt = Prompt {
        tokens: REPLY_PRIMING_TOKENS,
        hash: FNV_OFFSET,
        flagged: false,
        approximate,
    };
    let Some(messages) = messages.as_array() else {
        return prompt;
    };
    for message in messages {
        prompt.tokens += TOKENS_PER_MESSAGE;
        let role = message.get("role").and_then(Value::as_str).unwrap_or("");
        prompt.add_text(role);
        let mut content_flagged = false;
        if let Some(content) = message.get("content") {
            for_each_text(content, &mut |text| {
                prompt.add_text(text);
                content_flagged |= text.contains(CONTENT_FILTER_MARKER);
            });
        }
        if let Some(name) = message.get("name").and_then(Value::as_str) {
            prompt.add_text(name);
            prompt.tokens += TOKENS_PER_NAME;
        }
        if role == "user" {
            prompt.flagged = content_flagged;
        }
    }
    prompt
}

/// Counts a plain prompt: a string, an array of strings, or token arrays (legacy completions,
/// embeddings, Responses API string input). Returns `None` for another shape.
pub(crate) fn text_prompt(input: &Value, approximate: bool) -> Option<Prompt> {
    let mut prompt = Prompt {
        tokens: 0,
        hash: FNV_OFFSET,
        flagged: false,
        approximate,
    };
    match input {
        Value::String(s) => prompt.add_flagged_text(s),
        Value::Array(items) => {
            for item in items {
                match item {
                    Value::String(s) => prompt.add_flagged_text(s),
                    // A token array (embeddings and completions accept them).
                    Value::Array(tokens) => {
                        prompt.tokens += tokens.len() as u64;
                        prompt.hash = fnv(prompt.hash, item.to_string().as_bytes());
                    }
                    Value::Number(_) => {
                        prompt.tokens += 1;
                        prompt.hash = fnv(prompt.hash, item.to_string().as_bytes());
                    }
                    _ => return None,
                }
            }
        }
        _ => return None,
    }
    Some(prompt)
}

/// The strings of `input` (for embeddings: one vector per string or token array).
pub(crate) fn inputs(input: &Value) -> Vec<String> {
    match input {
        Value::String(s) => vec![s.clone()],
        Value::Array(items) if items.iter().all(Value::is_number) => vec![input.to_string()],
        Value::Array(items) => items
            .iter()
            .map(|i| i.as_str().map_or_else(|| i.to_string(), str::to_owned))
            .collect(),
        other => vec![other.to_string()],
    }
}

/// Calls `f` with each text of a message `content`: a string, or the `text` of each part.
fn for_each_text(content: &Value, f: &mut impl FnMut(&str)) {
    match content {
        Value::String(s) => f(s),
        Value::Array(parts) => {
            for part in parts {
                match part {
                    Value::String(s) => f(s),
                    Value::Object(_) => {
                        if let Some(text) = part.get("text").and_then(Value::as_str) {
                            f(text);
                        }
                    }
                    _ => {}
                }
            }
        }
        _ => {}
    }
}

// === impl Prompt ===

impl Prompt {
    fn add_text(&mut self, text: &str) {
        self.tokens += if self.approximate {
            (text.len() as u64).div_ceil(4)
        } else {
            count_tokens(text)
        };
        self.hash = fnv(self.hash, text.as_bytes());
    }

    fn add_flagged_text(&mut self, text: &str) {
        self.add_text(text);
        self.flagged |= text.contains(CONTENT_FILTER_MARKER);
    }

    /// Adds instructions or other extra text.
    pub(crate) fn add_extra(&mut self, text: &str) {
        self.add_text(text);
    }
}

/// A generated completion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Generated {
    /// The text, one entry per token (concatenated, they are the whole text).
    pub(crate) pieces: Vec<String>,
    /// `"stop"`, or `"length"` when cut at `max_tokens`.
    pub(crate) finish_reason: &'static str,
}

impl Generated {
    pub(crate) fn text(&self) -> String {
        self.pieces.concat()
    }

    pub(crate) fn tokens(&self) -> u64 {
        self.pieces.len() as u64
    }
}

/// Generates 20 to 60 words, determined by `seed`, the prompt hash and the choice index, cut to at
/// most `max_tokens` tokens.
pub(crate) fn generate(
    seed: u64,
    prompt_hash: u64,
    index: u64,
    max_tokens: Option<u64>,
) -> Generated {
    let mut rng = fastrand::Rng::with_seed(mix(seed, prompt_hash, index));
    let words = rng.usize(20..=60);
    let mut text = String::with_capacity(words * 8);
    for i in 0..words {
        let word = WORDS[rng.usize(..WORDS.len())];
        if i == 0 {
            let mut chars = word.chars();
            if let Some(first) = chars.next() {
                text.extend(first.to_uppercase());
                text.push_str(chars.as_str());
            }
        } else {
            text.push(' ');
            text.push_str(word);
        }
    }
    text.push('.');

    let mut tokens: Vec<Rank> = bpe().encode_ordinary(&text);
    let mut finish_reason = "stop";
    if let Some(max) = max_tokens {
        let max = usize::try_from(max).unwrap_or(usize::MAX);
        if tokens.len() > max {
            tokens.truncate(max);
            finish_reason = "length";
        }
    }
    let pieces = tokens
        .iter()
        .map(|t| {
            let bytes = bpe()
                .decode_bytes(std::slice::from_ref(t))
                .unwrap_or_default();
            String::from_utf8_lossy(&bytes).into_owned()
        })
        .collect();
    Generated {
        pieces,
        finish_reason,
    }
}

/// A deterministic unit vector of `dimensions` values for `input`.
pub(crate) fn embedding(seed: u64, input: &str, dimensions: usize) -> Vec<f32> {
    let mut rng = fastrand::Rng::with_seed(mix(seed, fnv(FNV_OFFSET, input.as_bytes()), 0));
    let mut v: Vec<f32> = (0..dimensions).map(|_| rng.f32() * 2.0 - 1.0).collect();
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
    v
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// FNV-1a, stable across runs and platforms.
pub(crate) fn fnv(mut hash: u64, bytes: &[u8]) -> u64 {
    for b in bytes {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

fn mix(seed: u64, a: u64, b: u64) -> u64 {
    let mut h = fnv(FNV_OFFSET, &seed.to_le_bytes());
    h = fnv(h, &a.to_le_bytes());
    fnv(h, &b.to_le_bytes())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn chat_formula() {
        let messages = json!([
            {"role": "system", "content": "You are helpful."},
            {"role": "user", "name": "ann", "content": [{"type": "text", "text": "Hi"}, {"type": "image_url"}]},
        ]);
        let expected = 3
            + (3 + count_tokens("system") + count_tokens("You are helpful."))
            + (3 + count_tokens("user") + count_tokens("Hi") + count_tokens("ann") + 1);
        assert_eq!(chat_prompt_tokens(&messages), expected);
        assert!(!chat_prompt(&messages, false).flagged);
    }

    #[test]
    fn flag_only_on_last_user_message() {
        let flagged = json!([
            {"role": "user", "content": "x [[content_filter]]"},
        ]);
        assert!(chat_prompt(&flagged, false).flagged);
        let earlier = json!([
            {"role": "user", "content": "x [[content_filter]]"},
            {"role": "assistant", "content": "no"},
            {"role": "user", "content": "fine"},
        ]);
        assert!(!chat_prompt(&earlier, false).flagged);
    }

    #[test]
    fn generation_is_deterministic_and_capped() {
        let a = generate(1, 2, 0, None);
        assert_eq!(a, generate(1, 2, 0, None));
        assert_ne!(a, generate(1, 2, 1, None));
        assert_eq!(count_tokens(&a.text()), a.tokens());
        assert_eq!(a.finish_reason, "stop");
        let cut = generate(1, 2, 0, Some(5));
        assert_eq!(cut.tokens(), 5);
        assert_eq!(cut.finish_reason, "length");
        assert!(a.text().starts_with(&cut.text()));
    }

    #[test]
    fn embeddings_are_unit_vectors() {
        let v = embedding(3, "hello", 64);
        assert_eq!(v.len(), 64);
        let norm: f32 = v.iter().map(|x| x * x).sum();
        assert!((norm - 1.0).abs() < 1e-4);
        assert_eq!(v, embedding(3, "hello", 64));
    }

    #[test]
    fn text_prompts() {
        let p = text_prompt(&json!(["ab", [1, 2, 3]]), false).unwrap();
        assert_eq!(p.tokens, count_tokens("ab") + 3);
        assert!(text_prompt(&json!({"x": 1}), false).is_none());
        // For benchmarks: a token per four bytes, rounded up, token arrays as they are.
        let p = text_prompt(&json!(["hello world", [1, 2, 3]]), true).unwrap();
        assert_eq!(p.tokens, 3 + 3);
        assert_eq!(inputs(&json!([1, 2])).len(), 1);
        assert_eq!(inputs(&json!(["a", "b"])), vec!["a", "b"]);
    }
}
