//! Reading the real usage a backend reports, and whether it may be asked for on a stream.

use std::borrow::Cow;

use serde::Deserialize;
use serde::de::IgnoredAny;

use super::Usage;

/// The first api-version with `stream_options.include_usage` (`2024-09-01-preview`), as a date.
const STREAM_USAGE_SINCE: (u16, u8, u8) = (2024, 9, 1);

/// The usage in a JSON response body: `usage.{prompt_tokens, completion_tokens, total_tokens}`
/// (chat, completions; embeddings have no `completion_tokens`) or `usage.{input_tokens,
/// output_tokens, total_tokens}` (Responses). `None` when there is none or the body is not JSON.
pub fn usage_from_json(body: &[u8]) -> Option<Usage> {
    answer_from_json(body).usage
}

/// What a JSON answer says about what it cost: its usage ([`usage_from_json`]), and the
/// `service_tier` that served it, read in the same parse.
///
/// ```
/// use gateway_core::tokens::answer_from_json;
///
/// let body = br#"{"service_tier": "default", "usage": {"prompt_tokens": 5, "completion_tokens": 2}}"#;
/// let answer = answer_from_json(body);
/// assert_eq!(answer.usage.map(|u| u.total), Some(7));
/// assert_eq!(answer.service_tier.as_deref(), Some("default"));
/// ```
pub fn answer_from_json(body: &[u8]) -> Answer {
    let Ok(parsed) = serde_json::from_slice::<WithUsage>(body) else {
        return Answer::default();
    };
    Answer {
        usage: parsed.usage.and_then(RawUsage::into_usage),
        service_tier: parsed.service_tier.and_then(|t| match t {
            serde_json::Value::String(s) => Some(s),
            _ => None,
        }),
    }
}

/// See [`answer_from_json`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Answer {
    /// The usage, when the answer has one.
    pub usage: Option<Usage>,
    /// The answer's `service_tier`, when it is a string.
    pub service_tier: Option<String>,
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
    match frame.kind.as_deref() {
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

// === response bodies ===

#[derive(Deserialize)]
struct WithUsage {
    usage: Option<RawUsage>,
    #[serde(default)]
    service_tier: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct Frame<'a> {
    #[serde(rename = "type", borrow)]
    kind: Option<Cow<'a, str>>,
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
    #[serde(default, alias = "input_tokens_details")]
    prompt_tokens_details: Details,
    #[serde(default, alias = "output_tokens_details")]
    completion_tokens_details: Details,
}

/// `*_tokens_details`: only the figures the gateway reports. A detail of an unexpected shape (or
/// `null`) counts as absent rather than losing the whole usage.
#[derive(Default)]
struct Details {
    cached_tokens: Option<u64>,
    reasoning_tokens: Option<u64>,
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
            cached_prompt: self.prompt_tokens_details.cached_tokens.unwrap_or(0),
            reasoning: self.completion_tokens_details.reasoning_tokens.unwrap_or(0),
        })
    }
}

impl<'de> Deserialize<'de> for Details {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Raw {
            cached_tokens: Option<u64>,
            reasoning_tokens: Option<u64>,
        }
        // Anything but an object of numbers is ignored, not an error.
        let value = serde_json::Value::deserialize(d)?;
        Ok(serde_json::from_value::<Raw>(value).map_or_else(
            |_| Details::default(),
            |raw| Details {
                cached_tokens: raw.cached_tokens,
                reasoning_tokens: raw.reasoning_tokens,
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            prompt_tokens_details: Details::default(),
            completion_tokens_details: Details::default(),
        };
        assert_eq!(
            raw.into_usage(),
            Some(Usage {
                prompt: 7,
                completion: 0,
                total: 7,
                ..Usage::default()
            })
        );
    }

    #[test]
    fn usage_details_are_read_for_chat_and_responses_whatever_their_shape() {
        let chat =
            br#"{"usage": {"prompt_tokens": 2000, "completion_tokens": 300, "total_tokens": 2300,
            "prompt_tokens_details": {"audio_tokens": 0, "cached_tokens": 1920},
            "completion_tokens_details": {"reasoning_tokens": 256, "audio_tokens": 0}}}"#;
        let usage = usage_from_json(chat).unwrap();
        assert_eq!((usage.cached_prompt, usage.reasoning), (1920, 256));
        let responses = br#"{"usage":{"input_tokens":2000,"output_tokens":300,"total_tokens":2300,
            "input_tokens_details":{"cached_tokens":1024},"output_tokens_details":{"reasoning_tokens":64}}}"#;
        let usage = usage_from_json(responses).unwrap();
        assert_eq!((usage.prompt, usage.completion), (2000, 300));
        assert_eq!((usage.cached_prompt, usage.reasoning), (1024, 64));
        // A detail of a strange shape is ignored, the usage kept.
        let odd = br#"{"usage":{"prompt_tokens":5,"completion_tokens":1,"prompt_tokens_details":null,"completion_tokens_details":[1]}}"#;
        let usage = usage_from_json(odd).unwrap();
        assert_eq!(
            (usage.total, usage.cached_prompt, usage.reasoning),
            (6, 0, 0)
        );
    }
}
