//! The framework-free heart of the Azure OpenAI gateway.
//!
//! - [`policy`]: the policy file model (TOML), its parsing with precise errors, and semantic validation.
//! - [`secret`]: secret references (`env:NAME`, `file:PATH`) resolved at start-up.
//! - [`pool`]: the backend pool, per-backend state (cooldowns, circuit breakers) and routing decisions.
//! - [`retry_after`]: reading Azure's throttling headers into a cooldown.
//!
//! Nothing here depends on an HTTP framework: the layers crate adapts these types to tower and axum.

pub mod policy;
pub mod pool;
pub mod retry_after;
pub mod secret;
