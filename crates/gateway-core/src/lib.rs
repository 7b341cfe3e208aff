//! The framework-free heart of the Azure OpenAI gateway.
//!
//! - [`policy`]: the policy file model (TOML), its parsing with precise errors, and semantic validation.
//! - [`secret`]: secret references (`env:NAME`, `file:PATH`) resolved at start-up.
//! - [`pool`]: the backend pool, per-backend state (cooldowns, circuit breakers) and routing decisions.
//! - [`limits`]: accounting stores for consumer limits (memory and Redis).
//! - [`operation`]: the kinds of Azure OpenAI calls.
//! - [`request`]: one parse of a request body: routing fields, prompt pieces, edits spliced in place.
//! - [`retry_after`]: reading Azure's throttling headers into a cooldown.
//! - [`tokens`]: token estimates before a call (tiktoken, `tokenizer` feature) and the real usage
//!   read after it.
//!
//! Nothing here depends on an HTTP framework: the layers crate adapts these types to tower and axum.

pub mod limits;
pub mod operation;
pub mod policy;
pub mod pool;
pub mod request;
pub mod retry_after;
pub mod secret;
pub mod tokens;
