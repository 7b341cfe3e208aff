//! Secret values the engine sends or compares: a backend's [`Credential`], a client key.
//!
//! Where they come from (a policy's `env:NAME` and `file:PATH` references) is the policy crate's
//! business; the engine only holds the resolved value, and never shows it.
//!
//! ```
//! use gateway_core::secret::{Credential, Secret};
//!
//! let credential = Credential::ApiKey(Secret::new("k-123"));
//! assert_eq!(credential.secret().expose(), "k-123");
//! assert_eq!(format!("{credential:?}"), "ApiKey(Secret(***))");
//! ```

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

// === impl Credential ===

impl Credential {
    /// The secret, whichever header it goes in.
    pub fn secret(&self) -> &Secret {
        match self {
            Self::ApiKey(secret) | Self::Bearer(secret) => secret,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_never_show_values() {
        let credential = Credential::Bearer(Secret::new("hunter2"));
        assert_eq!(format!("{credential:?}"), "Bearer(Secret(***))");
        assert_eq!(credential.secret().to_string(), "***");
    }
}
