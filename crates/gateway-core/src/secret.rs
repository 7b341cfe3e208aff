//! Secret values the engine sends or compares: a backend's [`Credential`], a client key.
//!
//! Where they come from (a policy's `env:`, `file:` and `keyvault:` references, an Entra ID token
//! endpoint) is other crates' business; the engine only holds the resolved value, and never shows it.
//! A value that changes while the gateway runs (a rotated Key Vault secret, a renewed Entra ID
//! token) is a [`LiveCredential`]: whoever renews it swaps the value, and the failover layer reads
//! the current one for each attempt.
//!
//! ```
//! use gateway_core::secret::{Credential, CredentialKind, LiveCredential, Secret};
//!
//! let credential = Credential::ApiKey(Secret::new("k-123"));
//! assert_eq!(credential.current().unwrap().expose(), "k-123");
//! assert_eq!(format!("{credential:?}"), "ApiKey(Secret(***))");
//!
//! let live = LiveCredential::new(CredentialKind::Bearer, Some(Secret::new("token-1")));
//! let credential = Credential::Live(live.clone());
//! live.set(Secret::new("token-2"));
//! assert_eq!(credential.current().unwrap().expose(), "token-2");
//! live.clear(); // expired, nothing to send: the backend is treated as refusing the gateway
//! assert!(credential.current().is_none());
//! assert!(!format!("{credential:?}").contains("token"));
//! ```

use std::fmt;
use std::sync::{Arc, PoisonError, RwLock};

/// A resolved secret value. Its `Debug` and `Display` never show the value. Cheap to clone.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Arc<str>);

/// How the gateway authenticates to a backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Credential {
    /// Sent as the `api-key` header.
    ApiKey(Secret),
    /// Sent as `Authorization: Bearer <token>`.
    Bearer(Secret),
    /// A value renewed while the gateway runs, read for each attempt.
    Live(LiveCredential),
}

/// Which header a credential goes in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CredentialKind {
    /// The `api-key` header.
    ApiKey,
    /// `Authorization: Bearer <value>`.
    Bearer,
}

/// A credential whose value is swapped while the gateway runs; clones share the value.
///
/// `None` means there is nothing valid to send (an Entra ID token that expired before it could be
/// renewed). Reading takes an uncontended read lock and clones an `Arc`: cheap enough per attempt.
#[derive(Clone)]
pub struct LiveCredential {
    kind: CredentialKind,
    value: Arc<RwLock<Option<Secret>>>,
}

// === impl Secret ===

impl Secret {
    /// Wraps a resolved value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(Arc::from(value.into()))
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
    /// The value to send now, whichever header it goes in; `None` when a live credential has none.
    pub fn current(&self) -> Option<Secret> {
        match self {
            Self::ApiKey(secret) | Self::Bearer(secret) => Some(secret.clone()),
            Self::Live(live) => live.current(),
        }
    }

    /// Which header it goes in.
    pub fn kind(&self) -> CredentialKind {
        match self {
            Self::ApiKey(_) => CredentialKind::ApiKey,
            Self::Bearer(_) => CredentialKind::Bearer,
            Self::Live(live) => live.kind(),
        }
    }
}

// === impl LiveCredential ===

impl LiveCredential {
    /// A credential sent in `kind`'s header, starting with `initial`.
    pub fn new(kind: CredentialKind, initial: Option<Secret>) -> Self {
        Self {
            kind,
            value: Arc::new(RwLock::new(initial)),
        }
    }

    /// Which header it goes in.
    pub fn kind(&self) -> CredentialKind {
        self.kind
    }

    /// The value to send now, if any.
    pub fn current(&self) -> Option<Secret> {
        // A writer cannot panic while holding the lock (it only assigns), so poison is harmless.
        self.value
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Replaces the value: the next attempt sends it.
    pub fn set(&self, secret: Secret) {
        *self.value.write().unwrap_or_else(PoisonError::into_inner) = Some(secret);
    }

    /// Withdraws the value (it expired): attempts on this backend fail over as a 401 would.
    pub fn clear(&self) {
        *self.value.write().unwrap_or_else(PoisonError::into_inner) = None;
    }
}

impl PartialEq for LiveCredential {
    /// The same shared value, not an equal one: two live credentials are renewed independently.
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.value, &other.value)
    }
}

impl Eq for LiveCredential {}

impl fmt::Debug for LiveCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = if self.current().is_some() {
            "Secret(***)"
        } else {
            "none"
        };
        write!(f, "LiveCredential({:?}, {state})", self.kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_never_show_values() {
        let credential = Credential::Bearer(Secret::new("hunter2"));
        assert_eq!(format!("{credential:?}"), "Bearer(Secret(***))");
        assert_eq!(credential.current().unwrap().to_string(), "***");
        let live = Credential::Live(LiveCredential::new(
            CredentialKind::ApiKey,
            Some(Secret::new("hunter2")),
        ));
        assert_eq!(
            format!("{live:?}"),
            "Live(LiveCredential(ApiKey, Secret(***)))"
        );
    }

    #[test]
    fn clones_share_one_value() {
        let live = LiveCredential::new(CredentialKind::ApiKey, None);
        let copy = live.clone();
        assert!(copy.current().is_none());
        live.set(Secret::new("v2"));
        assert_eq!(copy.current().unwrap().expose(), "v2");
        assert_eq!(live, copy);
        assert_ne!(live, LiveCredential::new(CredentialKind::ApiKey, None));
    }
}
