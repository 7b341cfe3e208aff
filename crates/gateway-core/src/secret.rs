//! Secret references (`env:NAME`, `file:PATH`) and the resolved secrets they name.
//!
//! Policy files never hold a secret literally; they hold a reference resolved once at start-up.

use std::fmt;

/// A resolved secret value. Its `Debug` and `Display` never show the value.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

/// How the gateway authenticates to a backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Credential {
    /// Sent as the `api-key` header.
    ApiKey(Secret),
    /// Sent as `Authorization: Bearer <token>`.
    Bearer(Secret),
}

// === impl Secret ===

impl Secret {
    /// Wraps a resolved value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret value itself; call only where it is sent or compared.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}
