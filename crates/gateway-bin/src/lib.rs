//! The `gateway` service: turns a policy into a running Azure OpenAI gateway.
//!
//! - [`app`] composes the layers of `gateway-layers` into an axum `Router`, in one function that reads
//!   top to bottom.
//! - [`serve`] serves it with graceful shutdown.
//! - [`demo`] runs the gateway in front of three simulated regions, for a first contact.
//! - [`store`] picks the limit store (memory or Redis) and shares backend cooldowns.
//! - [`cli`] parses the command line.

pub mod app;
pub mod cli;
pub mod demo;
pub mod serve;
pub mod store;
