//! A simulated Azure OpenAI resource in one region, for end-to-end tests, demos and benchmarks.
//!
//! It serves the classic deployment routes (`/openai/deployments/{d}/chat/completions`,
//! `/completions`, `/embeddings`, with `api-version` required), the v1 routes
//! (`/openai/v1/chat/completions`, `/openai/v1/embeddings`, deployment in the body's `model`) and the
//! Responses API (`/openai/responses`, `/openai/v1/responses`, non-streaming), with Azure's headers,
//! error bodies, SSE framing and per-deployment TPM/RPM limits counted on arrival. Tokens are
//! counted with tiktoken's `o200k_base` ([`tokens`]); generated text and embeddings are
//! deterministic for a seed. Faults ([`Fault`]) can be injected at start-up, through [`SimHandle`]
//! or over HTTP (`/sim/*`, see the [`admin`] module docs). [`Variants`] make a region answer the
//! way real backends do where they differ from Azure's documents (spaced JSON, seconds-only 429s,
//! streams without usage or content-type, a bare `[DONE]`); all are off by default.
//!
//! # Example
//!
//! ```
//! use simulator::{DeploymentConfig, Fault, RegionConfig};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> std::io::Result<()> {
//! let config = RegionConfig::new("Sweden Central", "test-key")
//!     .deployment(DeploymentConfig::chat("gpt-4o", 30_000))
//!     .deployment(DeploymentConfig::embeddings("text-embedding-3-small", 100_000))
//!     .seed(42);
//! let region = simulator::spawn(config, "127.0.0.1:0".parse().unwrap()).await?;
//! let sim = region.handle();
//!
//! // The next two requests get a 503.
//! sim.set_faults(vec![Fault::status(503).count(2)]);
//! assert_eq!(sim.faults().len(), 1);
//! assert!(region.url().starts_with("http://127.0.0.1:"));
//! assert_eq!(sim.request_count(), 0);
//! region.shutdown().await;
//! # Ok(())
//! # }
//! ```
//!
//! [`spawn_tls`] serves a region over HTTPS instead, with a [`ServerTls`] certificate.
//!
//! The `aoai-sim` binary serves one region from the command line (`aoai-sim --help`).

pub mod admin;
mod azure;
mod config;
pub mod faults;
mod handlers;
mod limits;
mod server;
mod state;
mod streaming;
pub mod tokens;

pub use config::{
    DEFAULT_CHAT_MODEL, DEFAULT_DIMENSIONS, DEFAULT_EMBEDDINGS_MODEL, DeploymentConfig,
    DeploymentKind, DoneEnding, RegionConfig, ResetFormat, Variants,
};
pub use faults::{Fault, FaultKind};
pub use server::{RunningRegion, ServerTls, router, spawn, spawn_tls};
pub use state::{RECENT_REQUESTS, RecordedRequest, SimHandle};
