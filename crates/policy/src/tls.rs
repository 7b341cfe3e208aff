//! Resolving the listeners' TLS certificates, apart from the other secrets: the gateway re-reads
//! them while it runs, so a renewed certificate is served without a restart.

use std::path::Path;

use super::locate::{Locator, field};
use super::{Policy, PolicyErrors, TlsSettings};
use crate::secret::{Secret, SecretRef, SecretSource};

/// A PEM certificate chain and its PEM private key, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificatePair {
    /// The certificate chain, leaf first.
    pub certificate: Secret,
    /// The private key.
    pub private_key: Secret,
}

/// The listeners' certificates, resolved.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsSecrets {
    /// `gateway.tls`.
    pub gateway: Option<CertificatePair>,
    /// `admin.tls`.
    pub admin: Option<CertificatePair>,
}

// === impl Policy ===

impl Policy {
    /// Resolves `gateway.tls` and `admin.tls` through `src`, as [`Policy::resolve_secrets`] does
    /// for the other secrets (relative `file:` paths joined to `policy_dir` or the policy's
    /// directory). Every unresolvable reference is reported, located, never with a secret value.
    ///
    /// ```
    /// use gateway_policy::Policy;
    /// use gateway_policy::secret::{MapSecrets, NoSecrets};
    ///
    /// let text = r#"
    /// [gateway.tls]
    /// certificate = "env:CERT"
    /// private_key = "file:key.pem"
    ///
    /// [[deployments]]
    /// name = "gpt-4o"
    ///
    /// [[backends]]
    /// name = "sweden"
    /// region = "Sweden Central"
    /// endpoint = "https://sweden.openai.azure.com"
    /// api_key = "env:SWEDEN_KEY"
    /// deployments = { gpt-4o = "gpt-4o" }
    /// "#;
    /// let policy = Policy::from_toml_str(text, "p.toml").unwrap();
    /// let src = MapSecrets::with_fallback(NoSecrets)
    ///     .with_env("CERT", "-----BEGIN CERTIFICATE-----")
    ///     .with_file("/etc/gw/key.pem", "-----BEGIN PRIVATE KEY-----");
    /// let tls = policy.resolve_tls(&src, Some("/etc/gw".as_ref())).unwrap();
    /// assert!(tls.gateway.is_some() && tls.admin.is_none());
    /// ```
    pub fn resolve_tls(
        &self,
        src: &dyn SecretSource,
        policy_dir: Option<&Path>,
    ) -> Result<TlsSecrets, PolicyErrors> {
        let locator = Locator::new(&self.source);
        let dir = policy_dir.or(self.source.dir());
        let mut errors = Vec::new();
        let mut pair = |path: &str, tls: &Option<TlsSettings>| {
            let tls = tls.as_ref()?;
            let mut resolve = |key: &str, reference: &str| match SecretRef::parse(reference)
                .and_then(|parsed| parsed.resolve(src, dir))
            {
                Ok(secret) => Some(secret),
                Err(error) => {
                    errors.push(locator.at_value(&field(path, key), error.to_string()));
                    None
                }
            };
            let certificate = resolve("certificate", &tls.certificate);
            let private_key = resolve("private_key", &tls.private_key);
            Some(CertificatePair {
                certificate: certificate?,
                private_key: private_key?,
            })
        };
        let gateway = pair("gateway.tls", &self.gateway.tls);
        let admin = pair("admin.tls", &self.admin.tls);
        if errors.is_empty() {
            Ok(TlsSecrets { gateway, admin })
        } else {
            errors.sort_by_key(|error| (error.line, error.column));
            Err(PolicyErrors(errors))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_shows_placeholders_for_the_certificate_and_key() {
        let pair = CertificatePair {
            certificate: Secret::new("MIIDGzCCAgOgAwIBAgIU certificate body"),
            private_key: Secret::new("MIIEvQIBADANBgkqhkiG key body"),
        };
        let secrets = TlsSecrets {
            gateway: Some(pair.clone()),
            admin: Some(pair),
        };
        let shown = format!("{secrets:?}");
        assert!(shown.contains("Secret(***)"), "{shown}");
        assert!(!shown.contains("MII"), "{shown}");
    }
}
