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

    /// The operation a path suffix names: `chat/completions`, `completions`, `embeddings`, `responses`.
    pub fn from_suffix(suffix: &str) -> Self {
        match suffix {
            "chat/completions" => Operation::ChatCompletions,
            "completions" => Operation::Completions,
            "embeddings" => Operation::Embeddings,
            "responses" => Operation::Responses,
            _ => Operation::Other,
        }
    }
}
