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
