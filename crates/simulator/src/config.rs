//! What a simulated region serves: its name, credentials, deployments and start-up faults.

use std::time::Duration;

use crate::faults::Fault;

/// Default model reported by [`DeploymentConfig::chat`].
pub const DEFAULT_CHAT_MODEL: &str = "gpt-4o-2024-11-20";
/// Default model reported by [`DeploymentConfig::embeddings`].
pub const DEFAULT_EMBEDDINGS_MODEL: &str = "text-embedding-3-small";
/// Default embedding dimension of [`DeploymentConfig::embeddings`].
pub const DEFAULT_DIMENSIONS: usize = 1536;

/// One simulated Azure OpenAI resource in one region.
///
/// Built with [`RegionConfig::new`] and the builder-style setters, then served with
/// [`spawn`](crate::spawn) or [`router`](crate::router).
#[derive(Debug, Clone)]
pub struct RegionConfig {
    /// Region name, sent back in `x-ms-region` (e.g. `"Sweden Central"`).
    pub region: String,
    /// Accepted credentials, as an `api-key` header or `Authorization: Bearer KEY`. Empty accepts nothing.
    pub api_keys: Vec<String>,
    /// The deployments this resource has.
    pub deployments: Vec<DeploymentConfig>,
    /// Delay before each streamed token chunk; zero streams as fast as possible.
    pub token_delay: Duration,
    /// Seeds fault percentages and generated text, so runs repeat exactly.
    pub seed: u64,
    /// Faults active from start-up (see [`SimHandle::set_faults`](crate::SimHandle::set_faults)).
    pub faults: Vec<Fault>,
    /// How far the answers stray from the simulator's tidy defaults, the way real backends do.
    pub variants: Variants,
}

/// The shapes real backends give their answers where they differ from Azure's documented ones
/// (reference, section 8). Every switch is off by default: the simulator then answers as Azure
/// documents it. Set them with [`RegionConfig`]'s builder methods.
///
/// ```
/// use simulator::{DoneEnding, RegionConfig, ResetFormat};
///
/// let config = RegionConfig::new("Sweden Central", "key")
///     .spaced_json(true)
///     .seconds_only_429(true)
///     .reset_format(ResetFormat::Duration)
///     .ignore_include_usage(true)
///     .omit_stream_content_type(true)
///     .done_ending(DoneEnding::Bare);
/// assert!(config.variants.spaced_json);
/// assert_eq!(config.variants.done_ending, DoneEnding::Bare);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Variants {
    /// JSON written as Python's `json.dumps` writes it, a space after every `:` and `,`
    /// (`{"usage": {"prompt_tokens": 5, ...}}`), in answers, stream chunks and error bodies.
    pub spaced_json: bool,
    /// Answers never carry `retry-after-ms`: a 429 says when to come back only in `retry-after`
    /// (whole seconds, rounded up) and `x-ratelimit-reset-*`.
    pub seconds_only_429: bool,
    /// How `x-ratelimit-reset-requests` and `x-ratelimit-reset-tokens` are written.
    pub reset_format: ResetFormat,
    /// Streams carry no usage chunk (and no `"usage": null`) even when the request sets
    /// `stream_options.include_usage`, as before api-version `2024-09-01-preview`.
    pub ignore_include_usage: bool,
    /// Streamed answers have no `content-type` header.
    pub omit_stream_content_type: bool,
    /// What follows the final `data: [DONE]` of a stream.
    pub done_ending: DoneEnding,
    /// Prompt caching as Azure does it: a prompt of 1,024 tokens or more that this region has seen
    /// before reports `prompt_tokens_details.cached_tokens` (Responses:
    /// `input_tokens_details.cached_tokens`), the prompt rounded down to 128 tokens. Off, every
    /// answer reports 0 cached tokens.
    pub prompt_cache: bool,
    /// A request for `service_tier: "priority"` is served at standard, and its answer says
    /// `"service_tier": "default"`, as Azure does when priority traffic ramps up too fast.
    pub priority_as_default: bool,
    /// Flex capacity is exhausted: every request with `"service_tier": "flex"` is answered 429
    /// (Flex does not fall back by itself), whatever the quota; other tiers are served.
    pub flex_429: bool,
    /// Prompts are counted as a token per four bytes of text instead of with tiktoken: not a shape
    /// real backends show, a switch for benchmarks of large bodies, where counting a 1 MB prompt
    /// (~70 ms of CPU) would make the simulator, not what is measured, the bottleneck.
    pub approximate_tokens: bool,
}

/// The format of `x-ratelimit-reset-requests` and `x-ratelimit-reset-tokens` (the reference,
/// section 2: Azure's format is unconfirmed; `6`, `6s`, `1m30s` and `250ms` are all seen).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ResetFormat {
    /// Whole seconds, rounded up: `6` (what Microsoft's samples parse).
    #[default]
    Seconds,
    /// A Go-style duration to the millisecond: `250ms`, `6s`, `1.5s`, `1m30s` (OpenAI's format).
    Duration,
}

/// How a stream's last event, `data: [DONE]`, ends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DoneEnding {
    /// `data: [DONE]` and a blank line, like every other event.
    #[default]
    BlankLine,
    /// `data: [DONE]` and one newline: the event is never closed by a blank line.
    Newline,
    /// `data: [DONE]` and nothing after it.
    Bare,
}

/// One model deployment and its quota.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeploymentConfig {
    /// Deployment name: the path segment of classic routes, the body's `model` on v1 routes.
    pub name: String,
    /// Model reported in response bodies, e.g. `"gpt-4o-2024-11-20"`.
    pub model: String,
    /// Which operations the deployment serves.
    pub kind: DeploymentKind,
    /// Tokens per minute.
    pub tpm: u64,
    /// Requests per minute; `None` means Azure's ratio of 6 RPM per 1,000 TPM (at least 1).
    pub rpm: Option<u64>,
    /// Length of embedding vectors (embeddings deployments only).
    pub dimensions: usize,
    /// A provisioned (PTU) deployment: every answer carries `azure-openai-deployment-utilization`.
    pub ptu: bool,
    /// A reasoning model (o-series): it thinks as many tokens as it writes, reported in
    /// `completion_tokens_details.reasoning_tokens` (Responses: `output_tokens_details`) and
    /// counted in the completion tokens, never streamed.
    pub reasoning: bool,
}

/// The operations a deployment serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeploymentKind {
    /// Chat completions, legacy completions and the Responses API.
    Chat,
    /// Embeddings.
    Embeddings,
}

// === impl RegionConfig ===

impl RegionConfig {
    /// A region with one accepted API key, no deployments, no token delay, seed 0 and no faults.
    pub fn new(region: impl Into<String>, api_key: impl Into<String>) -> Self {
        Self {
            region: region.into(),
            api_keys: vec![api_key.into()],
            deployments: Vec::new(),
            token_delay: Duration::ZERO,
            seed: 0,
            faults: Vec::new(),
            variants: Variants::default(),
        }
    }

    /// Adds a deployment.
    pub fn deployment(mut self, deployment: DeploymentConfig) -> Self {
        self.deployments.push(deployment);
        self
    }

    /// Accepts one more API key.
    pub fn api_key(mut self, key: impl Into<String>) -> Self {
        self.api_keys.push(key.into());
        self
    }

    /// Sets the delay before each streamed token chunk.
    pub fn token_delay(mut self, delay: Duration) -> Self {
        self.token_delay = delay;
        self
    }

    /// Sets the seed for fault percentages and generated text.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Adds a fault active from start-up.
    pub fn fault(mut self, fault: Fault) -> Self {
        self.faults.push(fault);
        self
    }

    /// Writes JSON with a space after every `:` and `,` ([`Variants::spaced_json`]).
    pub fn spaced_json(mut self, on: bool) -> Self {
        self.variants.spaced_json = on;
        self
    }

    /// Leaves `retry-after-ms` out of every answer ([`Variants::seconds_only_429`]).
    pub fn seconds_only_429(mut self, on: bool) -> Self {
        self.variants.seconds_only_429 = on;
        self
    }

    /// Sets the format of `x-ratelimit-reset-*` ([`Variants::reset_format`]).
    pub fn reset_format(mut self, format: ResetFormat) -> Self {
        self.variants.reset_format = format;
        self
    }

    /// Sends no usage chunk in streams, whatever the request asks ([`Variants::ignore_include_usage`]).
    pub fn ignore_include_usage(mut self, on: bool) -> Self {
        self.variants.ignore_include_usage = on;
        self
    }

    /// Sends streams without `content-type` ([`Variants::omit_stream_content_type`]).
    pub fn omit_stream_content_type(mut self, on: bool) -> Self {
        self.variants.omit_stream_content_type = on;
        self
    }

    /// Sets how a stream's `data: [DONE]` ends ([`Variants::done_ending`]).
    pub fn done_ending(mut self, ending: DoneEnding) -> Self {
        self.variants.done_ending = ending;
        self
    }

    /// Serves priority requests at standard ([`Variants::priority_as_default`]).
    pub fn priority_as_default(mut self, on: bool) -> Self {
        self.variants.priority_as_default = on;
        self
    }

    /// Reports cached prompt tokens for long prompts seen before ([`Variants::prompt_cache`]).
    pub fn prompt_cache(mut self, on: bool) -> Self {
        self.variants.prompt_cache = on;
        self
    }

    /// Answers every Flex request 429 ([`Variants::flex_429`]).
    pub fn flex_429(mut self, on: bool) -> Self {
        self.variants.flex_429 = on;
        self
    }

    /// Counts prompts as a token per four bytes ([`Variants::approximate_tokens`]).
    pub fn approximate_tokens(mut self, on: bool) -> Self {
        self.variants.approximate_tokens = on;
        self
    }
}

// === impl DeploymentConfig ===

impl DeploymentConfig {
    /// A chat deployment reporting model `gpt-4o-2024-11-20`, with the default RPM ratio.
    pub fn chat(name: impl Into<String>, tpm: u64) -> Self {
        Self {
            name: name.into(),
            model: DEFAULT_CHAT_MODEL.to_owned(),
            kind: DeploymentKind::Chat,
            tpm,
            rpm: None,
            dimensions: 0,
            ptu: false,
            reasoning: false,
        }
    }

    /// An embeddings deployment reporting model `text-embedding-3-small`, 1536 dimensions.
    pub fn embeddings(name: impl Into<String>, tpm: u64) -> Self {
        Self {
            name: name.into(),
            model: DEFAULT_EMBEDDINGS_MODEL.to_owned(),
            kind: DeploymentKind::Embeddings,
            tpm,
            rpm: None,
            dimensions: DEFAULT_DIMENSIONS,
            ptu: false,
            reasoning: false,
        }
    }

    /// Sets the reported model.
    pub fn model(mut self, model: impl Into<String>) -> Self {
        self.model = model.into();
        self
    }

    /// Sets requests per minute explicitly.
    pub fn rpm(mut self, rpm: u64) -> Self {
        self.rpm = Some(rpm);
        self
    }

    /// Sets the embedding dimension.
    pub fn dimensions(mut self, dimensions: usize) -> Self {
        self.dimensions = dimensions;
        self
    }

    /// Marks the deployment as provisioned (PTU): its answers carry
    /// `azure-openai-deployment-utilization`, the share of its capacity in use, e.g. `87%`.
    pub fn ptu(mut self, on: bool) -> Self {
        self.ptu = on;
        self
    }

    /// Makes the deployment a reasoning model ([`reasoning`](Self::reasoning)).
    pub fn reasoning(mut self, on: bool) -> Self {
        self.reasoning = on;
        self
    }

    /// Effective requests per minute: `rpm`, or 6 per 1,000 TPM, and at least 1.
    pub fn requests_per_minute(&self) -> u64 {
        self.rpm
            .unwrap_or_else(|| self.tpm.saturating_mul(6) / 1000)
            .max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rpm_defaults_to_azure_ratio() {
        assert_eq!(
            DeploymentConfig::chat("a", 30_000).requests_per_minute(),
            180
        );
        assert_eq!(DeploymentConfig::chat("a", 100).requests_per_minute(), 1);
        assert_eq!(
            DeploymentConfig::chat("a", 1000)
                .rpm(7)
                .requests_per_minute(),
            7
        );
    }
}
