//! The kinds of Azure OpenAI calls the gateway tells apart.

/// What kind of Azure OpenAI call a request is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Operation {
    /// `chat/completions`.
    ChatCompletions,
    /// Legacy `completions`.
    Completions,
    /// `embeddings`.
    Embeddings,
    /// The Responses API.
    Responses,
    /// Anything else (audio, images, files, models...).
    Other,
}

// === impl Operation ===

impl Operation {
    /// A short, stable name for logs and metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            Operation::ChatCompletions => "chat",
            Operation::Completions => "completions",
            Operation::Embeddings => "embeddings",
            Operation::Responses => "responses",
            Operation::Other => "other",
        }
    }

    /// Azure's operation name, as used in its 429 messages.
    pub fn azure_name(&self) -> &'static str {
        match self {
            Operation::ChatCompletions => "ChatCompletions_Create",
            Operation::Completions => "Completions_Create",
            Operation::Embeddings => "Embeddings_Create",
            Operation::Responses => "Responses_Create",
            Operation::Other => "Other",
        }
    }

    /// The OpenTelemetry GenAI conventions' `gen_ai.operation.name`; the Responses API is a chat in
    /// their terms. `None` for operations they do not name.
    pub fn gen_ai_name(&self) -> Option<&'static str> {
        match self {
            Operation::ChatCompletions | Operation::Responses => Some("chat"),
            Operation::Completions => Some("text_completion"),
            Operation::Embeddings => Some("embeddings"),
            Operation::Other => None,
        }
    }

    /// The operation a path suffix names: `chat/completions`, `completions`, `embeddings`,
    /// `responses`. As Azure does, the suffix is matched case-insensitively after percent-decoding,
    /// so `Chat/Completions` and `chat/complet%69ons` are chat completions too; an encoded `/`
    /// never stands for a separator. Anything else is [`Operation::Other`].
    ///
    /// ```
    /// use gateway_core::operation::Operation;
    ///
    /// assert_eq!(Operation::from_suffix("chat/completions"), Operation::ChatCompletions);
    /// assert_eq!(Operation::from_suffix("Chat/Complet%69ons"), Operation::ChatCompletions);
    /// assert_eq!(Operation::from_suffix("chat%2Fcompletions"), Operation::Other);
    /// assert_eq!(Operation::from_suffix("audio/speech"), Operation::Other);
    /// ```
    pub fn from_suffix(suffix: &str) -> Self {
        [
            Operation::ChatCompletions,
            Operation::Completions,
            Operation::Embeddings,
            Operation::Responses,
        ]
        .into_iter()
        .find(|op| op.suffix().is_some_and(|s| path_eq(suffix, s)))
        .unwrap_or(Operation::Other)
    }

    /// The canonical path suffix of the operation (`chat/completions`...); `None` for
    /// [`Operation::Other`].
    pub fn suffix(&self) -> Option<&'static str> {
        match self {
            Operation::ChatCompletions => Some("chat/completions"),
            Operation::Completions => Some("completions"),
            Operation::Embeddings => Some("embeddings"),
            Operation::Responses => Some("responses"),
            Operation::Other => None,
        }
    }
}

/// Whether the raw path text `raw` (as it arrived, possibly percent-encoded) names the ASCII path
/// `canonical`, the way Azure compares paths: percent-decoded and case-insensitively. A `/` in
/// `canonical` matches only a literal `/`, never `%2F`, so an encoded separator cannot join two
/// segments. Allocates nothing.
///
/// ```
/// use gateway_core::operation::path_eq;
///
/// assert!(path_eq("Deployment%73", "deployments"));
/// assert!(!path_eq("deployment", "deployments"));
/// assert!(!path_eq("a%2fb", "a/b"));
/// ```
pub fn path_eq(raw: &str, canonical: &str) -> bool {
    let raw = raw.as_bytes();
    let mut want = canonical.bytes();
    let mut i = 0;
    while i < raw.len() {
        let (byte, literal) = match raw[i] {
            b'%' => match (raw.get(i + 1).and_then(hex), raw.get(i + 2).and_then(hex)) {
                (Some(hi), Some(lo)) => {
                    i += 3;
                    ((hi << 4) | lo, false)
                }
                // A stray `%` is itself, as Azure's front door would not decode it either.
                _ => {
                    i += 1;
                    (b'%', true)
                }
            },
            b => {
                i += 1;
                (b, true)
            }
        };
        match want.next() {
            Some(b'/') if !literal || byte != b'/' => return false,
            Some(w) if w.eq_ignore_ascii_case(&byte) => {}
            _ => return false,
        }
    }
    want.next().is_none()
}

fn hex(b: &u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suffixes_are_decoded_and_case_folded() {
        for (raw, op) in [
            ("chat/completions", Operation::ChatCompletions),
            ("CHAT/COMPLETIONS", Operation::ChatCompletions),
            ("chat/complet%69ons", Operation::ChatCompletions),
            ("%63hat/completions", Operation::ChatCompletions),
            ("Embedding%53", Operation::Embeddings),
            ("completions", Operation::Completions),
            ("responses", Operation::Responses),
            ("chat%2fcompletions", Operation::Other),
            ("chat/completions/", Operation::Other),
            ("chat/completion", Operation::Other),
            ("chat/completions%", Operation::Other),
            ("chat/completions%20", Operation::Other),
            ("", Operation::Other),
        ] {
            assert_eq!(Operation::from_suffix(raw), op, "{raw}");
        }
        // Non-ASCII after decoding never equals an ASCII name.
        assert_eq!(
            Operation::from_suffix("chat/c%C3%B6mpletions"),
            Operation::Other
        );
    }
}
