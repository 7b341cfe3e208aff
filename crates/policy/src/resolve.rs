//! Resolving a policy's secret references into the credentials and keys the gateway uses.
//!
//! A backend credential that changes while the gateway runs (a `keyvault:` reference, an Entra ID
//! token) resolves to a [`LiveCredential`] listed in [`ResolvedSecrets`], for the binary to keep
//! fresh; everything else is read once.

use std::path::Path;

use super::locate::{Locator, field, index};
use super::{Policy, PolicyErrors};
use crate::secret::{Credential, KeyVaultRef, Secret, SecretRef, SecretSource};
use gateway_core::secret::{CredentialKind, LiveCredential};

/// The secrets a policy refers to, resolved.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResolvedSecrets {
    /// Each backend's credential, parallel to [`Policy::backends`].
    pub backends: Vec<Credential>,
    /// Each consumer's keys, parallel to [`Policy::consumers`] and to each consumer's `keys`.
    pub consumers: Vec<Vec<Secret>>,
    /// `rate_limit.redis_url`, resolved when it is a reference.
    pub redis_url: Option<Secret>,
    /// `admin.key`, resolved.
    pub admin_key: Option<Secret>,
    /// The Entra ID tokens the backends need, one per scope, still empty: whoever holds the
    /// gateway's identity fetches them and keeps them renewed. Backends with the same scope share
    /// one credential.
    pub entra: Vec<(String, LiveCredential)>,
    /// Backend credentials read from Key Vault, to be read again periodically (rotation).
    pub key_vault: Vec<(KeyVaultRef, LiveCredential)>,
}

// === impl Policy ===

impl Policy {
    /// Resolves every backend credential and consumer key through `src`. Relative `file:` paths
    /// are joined to `policy_dir`, else to the directory of the file given to [`Policy::load`],
    /// else left relative to the current directory.
    ///
    /// Every unresolvable reference is reported, located at its value and naming the reference
    /// (never a secret value).
    pub fn resolve_secrets(
        &self,
        src: &dyn SecretSource,
        policy_dir: Option<&Path>,
    ) -> Result<ResolvedSecrets, PolicyErrors> {
        let locator = Locator::new(&self.source);
        let dir = policy_dir.or(self.source.dir());
        let mut errors = Vec::new();
        let resolve = |path: &str, reference: &str| {
            SecretRef::parse(reference)
                .and_then(|parsed| parsed.resolve(src, dir))
                .map_err(|error| locator.at_value(path, error.to_string()))
        };

        let mut backends = Vec::with_capacity(self.backends.len());
        let mut entra: Vec<(String, LiveCredential)> = Vec::new();
        let mut key_vault = Vec::new();
        // A `keyvault:` credential is live: it is read again while the gateway runs.
        let mut backend_secret = |path: &str, reference: &str, kind: CredentialKind| {
            let secret = resolve(path, reference)?;
            Ok(match SecretRef::parse(reference) {
                Ok(SecretRef::KeyVault(vault)) => {
                    let live = LiveCredential::new(kind, Some(secret));
                    key_vault.push((vault, live.clone()));
                    Credential::Live(live)
                }
                _ if kind == CredentialKind::ApiKey => Credential::ApiKey(secret),
                _ => Credential::Bearer(secret),
            })
        };
        for (i, backend) in self.backends.iter().enumerate() {
            let path = index("backends", i);
            let credential = match (&backend.api_key, &backend.bearer_token, &backend.entra) {
                (Some(api_key), None, None) => {
                    backend_secret(&field(&path, "api_key"), api_key, CredentialKind::ApiKey)
                }
                (None, Some(token), None) => {
                    backend_secret(&field(&path, "bearer_token"), token, CredentialKind::Bearer)
                }
                (None, None, Some(spec)) => {
                    let scope = spec.scope();
                    let live = match entra.iter().find(|(s, _)| s == scope) {
                        Some((_, live)) => live.clone(),
                        None => {
                            let live = LiveCredential::new(CredentialKind::Bearer, None);
                            entra.push((scope.to_owned(), live.clone()));
                            live
                        }
                    };
                    Ok(Credential::Live(live))
                }
                _ => Err(locator.at_value(
                    &path,
                    "set exactly one of `api_key`, `bearer_token` or `[backends.entra]`",
                )),
            };
            match credential {
                Ok(credential) => backends.push(credential),
                Err(error) => errors.push(error),
            }
        }

        let mut consumers = Vec::with_capacity(self.consumers.len());
        for (i, consumer) in self.consumers.iter().enumerate() {
            let keys = field(&index("consumers", i), "keys");
            let mut resolved = Vec::with_capacity(consumer.keys.len());
            for (j, key) in consumer.keys.iter().enumerate() {
                match resolve(&index(&keys, j), key) {
                    Ok(secret) => resolved.push(secret),
                    Err(error) => errors.push(error),
                }
            }
            consumers.push(resolved);
        }

        let redis_url = match &self.rate_limit.redis_url {
            Some(url)
                if url.starts_with("env:")
                    || url.starts_with("file:")
                    || url.starts_with("keyvault:") =>
            {
                match resolve("rate_limit.redis_url", url) {
                    Ok(secret) => Some(secret),
                    Err(error) => {
                        errors.push(error);
                        None
                    }
                }
            }
            Some(url) => Some(Secret::new(url.clone())),
            None => None,
        };

        let admin_key = match &self.admin.key {
            Some(reference) => match resolve("admin.key", reference) {
                Ok(secret) => Some(secret),
                Err(error) => {
                    errors.push(error);
                    None
                }
            },
            None => None,
        };

        if errors.is_empty() {
            Ok(ResolvedSecrets {
                backends,
                consumers,
                redis_url,
                admin_key,
                entra,
                key_vault,
            })
        } else {
            errors.sort_by_key(|error| (error.line, error.column));
            Err(PolicyErrors(errors))
        }
    }
}
