//! The `gateway` service: turns a policy into a running Azure OpenAI gateway.
//!
//! - [`app`] is the one place where the policy (`gateway-policy`) becomes engine values
//!   (`gateway-core`) and layer arguments (`gateway-layers`), and composes the layers into an axum
//!   `Router` in one function that reads top to bottom.
//! - [`serve`] serves it with graceful shutdown; [`tls`] over HTTPS (HTTP/2 and HTTP/1.1) with
//!   certificates renewed while serving; [`reload`] swaps in a reloaded policy without dropping a
//!   request.
//! - `demo` runs the gateway in front of three simulated regions, for a first contact (feature
//!   `demo`).
//! - [`identity`] is the gateway's Entra ID identity: tokens for backends, `keyvault:` references.
//! - [`store`] picks the limit store (memory or Redis) and shares backend cooldowns.
//! - [`cli`] parses the command line.
//! - [`observe`] records Prometheus metrics and writes the access log for every request.
//! - [`admin`] serves `/metrics`, the `/admin/status` JSON and the `/admin` status page.
//! - [`telemetry`] installs logs and OTLP trace export, and holds the server-span and trace-context
//!   layers.
//!
//! # Cargo features
//!
//! - `demo` (on by default): `gateway demo` and its simulated regions. A production build can leave
//!   it out (`--no-default-features`) and links no simulator; `gateway demo` then says so.
//! - `jemalloc` (on by default): jemalloc, with its background thread, as the global allocator of
//!   the `gateway` binary, which returns memory to the OS after a burst of streams where glibc's
//!   malloc keeps it (docs/benchmarks.md, "Memory"). It compiles jemalloc's C sources.
//! - `mimalloc` (off by default): mimalloc as the global allocator of the `gateway` binary instead
//!   (it takes precedence over `jemalloc`).

pub mod admin;
pub mod app;
pub mod cli;
#[cfg(feature = "demo")]
pub mod demo;
pub mod health;
pub mod identity;
pub mod observe;
pub mod reload;
pub mod serve;
pub mod store;
pub mod telemetry;
pub mod tls;
