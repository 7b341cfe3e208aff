//! The gateway's own Entra ID identity: tokens for backends that use `[backends.entra]`, and the
//! `keyvault:` references of the policy, read at start-up and kept fresh in the background.
//!
//! Built on the documented REST calls (the token endpoints of Entra ID, App Service and the instance
//! metadata service, and Key Vault's `GET {vault}/secrets/{name}/{version}?api-version=7.4`) with the
//! `reqwest` client the gateway already has, rather than the Azure SDK crates: those refuse bearer
//! tokens over `http://` and check that a vault's challenge names a real Key Vault host, so they
//! cannot be pointed at the loopback stand-ins the tests serve.
//!
//! - [`resolve_secrets`] reads every `keyvault:` reference the policy makes (start-up fails, naming
//!   the policy location, when one cannot be read), then resolves the policy's secrets.
//! - [`keep_fresh`] fetches the first Entra ID token of each scope the backends need (start-up fails
//!   when it cannot) and spawns the renewals: tokens are renewed in the background before they
//!   expire (5 minutes before, or at half their life when shorter), never per request; Key Vault
//!   secrets are read again every `[key_vault] refresh_seconds`. A failure keeps the last good value
//!   (a token until it expires, after which its backends fail over as on a 401), is logged once per
//!   outage and counted in `gateway_credential_refresh_failures_total{kind}`.
//!
//! Nothing here runs unless the policy uses Entra ID or Key Vault, so no other test or deployment
//! ever reaches an identity endpoint.

mod certificate;
mod keyvault;
mod sources;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use gateway_core::secret::{CredentialKind, LiveCredential, Secret};
use gateway_policy::secret::{KeyVaultRef, SecretRef, SecretSource};
use gateway_policy::{Policy, ResolvedSecrets};
use tokio::time::Instant;

use self::keyvault::Vault;
use self::sources::{AccessToken, TokenSource};

/// Failed renewals of Entra ID tokens (`kind="entra_token"`) and Key Vault reads
/// (`kind="key_vault"`).
pub const REFRESH_FAILURES: &str = "gateway_credential_refresh_failures_total";

/// The gateway's identity: where its tokens come from, and the client that fetches them.
#[derive(Clone, Debug)]
pub struct Identity {
    source: Arc<TokenSource>,
    client: reqwest::Client,
    vault: Vault,
    /// The `keyvault:` references resolved once into plain values (consumer keys, the admin key,
    /// the Redis URL): a rotation of one of them asks for a policy reload ([`Refreshers::rotated`]).
    resolved_once: Arc<std::collections::BTreeSet<KeyVaultRef>>,
}

/// The Key Vault secrets a policy refers to, read once, answering [`SecretSource::key_vault`] over
/// another source.
struct Fetched<'a> {
    values: BTreeMap<KeyVaultRef, Result<String, String>>,
    inner: &'a dyn SecretSource,
}

// === impl Identity ===

impl Identity {
    /// The identity the environment (read through `env`) configures; see the README for the
    /// variables. Nothing is fetched yet.
    pub fn from_env(env: &dyn SecretSource) -> Result<Self, String> {
        let source = TokenSource::from_env(env)?;
        let vault = Vault::from_env(env)?;
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| format!("cannot build the identity's HTTP client: {e}"))?;
        Ok(Self {
            source: Arc::new(source),
            client,
            vault,
            resolved_once: Arc::default(),
        })
    }

    async fn token(&self, scope: &str) -> Result<AccessToken, String> {
        self.source.fetch(&self.client, scope).await
    }
}

/// Resolves `policy`'s secrets through `src`, reading its `keyvault:` references first with the
/// identity `src`'s environment configures. `Ok((secrets, None))` when the policy needs no identity.
pub async fn resolve_secrets(
    policy: &Policy,
    src: &(dyn SecretSource + Sync),
) -> Result<(ResolvedSecrets, Option<Identity>), String> {
    let references = key_vault_references(policy);
    let mut identity =
        if references.is_empty() && !policy.backends.iter().any(|b| b.entra.is_some()) {
            None
        } else {
            Some(Identity::from_env(src)?)
        };
    let mut values = BTreeMap::new();
    if let Some(identity) = identity.as_ref().filter(|_| !references.is_empty()) {
        let tokens = vault_tokens(identity, &references).await;
        for reference in references {
            let token = tokens
                .get(Vault::scope(&reference))
                .cloned()
                .unwrap_or_else(|| Err("no token".to_owned()));
            let value = match token {
                Ok(token) => identity
                    .vault
                    .read(&identity.client, &reference, &token.token)
                    .await
                    .map(|s| s.expose().to_owned()),
                Err(error) => Err(format!("no Entra ID token for Key Vault: {error}")),
            };
            values.insert(reference, value);
        }
    }
    let fetched = Fetched { values, inner: src };
    let mut secrets = policy
        .resolve_secrets(&fetched, None)
        .map_err(|e| e.to_string())?;
    // Every other Key Vault value rides along too, so that `keep_fresh` reads it again: the
    // listeners' certificates, resolved by the TLS loader through `tls_source`, and the values
    // resolved once (consumer keys, the admin key, the Redis URL), whose rotation asks for a reload.
    let live: std::collections::BTreeSet<KeyVaultRef> =
        secrets.key_vault.iter().map(|(r, _)| r.clone()).collect();
    let tls = tls_key_vault_references(policy);
    let resolved_once: std::collections::BTreeSet<KeyVaultRef> = key_vault_references(policy)
        .into_iter()
        .filter(|r| !live.contains(r) && !tls.iter().any(|(_, t)| t == r))
        .collect();
    for (reference, value) in &fetched.values {
        if let (true, Ok(value)) = (resolved_once.contains(reference), value) {
            // Only its value is read (to notice a rotation), never sent in a header.
            let live = LiveCredential::new(CredentialKind::ApiKey, Some(Secret::new(value)));
            secrets.key_vault.push((reference.clone(), live));
        }
    }
    if let Some(identity) = &mut identity {
        identity.resolved_once = Arc::new(resolved_once);
    }
    for (field, reference) in tls {
        if secrets.key_vault.iter().any(|(r, _)| *r == reference) {
            continue;
        }
        match fetched.values.get(&reference) {
            Some(Ok(value)) => {
                // Only its value is read (by `tls_source`), never sent in a header.
                let live = LiveCredential::new(CredentialKind::ApiKey, Some(Secret::new(value)));
                secrets.key_vault.push((reference, live));
            }
            Some(Err(error)) => {
                return Err(format!(
                    "{}: {field}: cannot read `keyvault:{}`: {error}",
                    policy.source.name(),
                    reference.url()
                ));
            }
            None => {}
        }
    }
    Ok((secrets, identity))
}

/// A source for what is resolved again while the gateway runs (the listeners' certificates, see
/// [`crate::tls::keep_renewed`]): a `keyvault:` reference answers the value [`keep_fresh`] keeps
/// current, anything else is read from `inner`.
pub fn tls_source(
    secrets: &ResolvedSecrets,
    inner: Arc<dyn SecretSource + Send + Sync>,
) -> Arc<dyn SecretSource + Send + Sync> {
    Arc::new(LiveVault {
        values: secrets.key_vault.iter().cloned().collect(),
        inner,
    })
}

/// See [`tls_source`].
struct LiveVault {
    values: BTreeMap<KeyVaultRef, LiveCredential>,
    inner: Arc<dyn SecretSource + Send + Sync>,
}

impl SecretSource for LiveVault {
    fn env(&self, name: &str) -> Option<String> {
        self.inner.env(name)
    }

    fn read_file(&self, path: &std::path::Path) -> std::io::Result<String> {
        self.inner.read_file(path)
    }

    fn key_vault(&self, reference: &KeyVaultRef) -> Result<String, String> {
        match self.values.get(reference).and_then(LiveCredential::current) {
            Some(value) => Ok(value.expose().to_owned()),
            None => self.inner.key_vault(reference),
        }
    }
}

/// The `keyvault:` references of `[gateway.tls]` and `[admin.tls]`, with the field of each.
fn tls_key_vault_references(policy: &Policy) -> Vec<(String, KeyVaultRef)> {
    let listeners = [
        ("gateway.tls", &policy.gateway.tls),
        ("admin.tls", &policy.admin.tls),
    ];
    listeners
        .into_iter()
        .filter_map(|(path, tls)| Some((path, tls.as_ref()?)))
        .flat_map(|(path, tls)| {
            [
                (format!("{path}.certificate"), &tls.certificate),
                (format!("{path}.private_key"), &tls.private_key),
            ]
        })
        .filter_map(|(field, r)| match SecretRef::parse(r) {
            Ok(SecretRef::KeyVault(reference)) => Some((field, reference)),
            _ => None,
        })
        .collect()
}

/// The background renewals [`keep_fresh`] started; dropping it stops them (a reloaded policy's
/// gateway replaced the one whose credentials they renewed).
#[derive(Debug, Default)]
pub struct Refreshers {
    tasks: Vec<tokio::task::AbortHandle>,
    rotated: Arc<tokio::sync::Notify>,
}

impl Refreshers {
    /// Notified when a Key Vault value that was resolved once (a consumer key, the admin key, the
    /// Redis URL) rotated: only a policy reload puts the new value in use.
    pub fn rotated(&self) -> Arc<tokio::sync::Notify> {
        self.rotated.clone()
    }
}

impl Drop for Refreshers {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Fetches the first token of every Entra ID scope in `secrets` (an error names the scope), then
/// spawns the background renewals of those tokens and of the Key Vault values, on the current
/// runtime, for as long as the returned [`Refreshers`] is kept.
pub async fn keep_fresh(
    identity: &Identity,
    secrets: &ResolvedSecrets,
    key_vault_refresh: Duration,
) -> Result<Refreshers, String> {
    let mut tasks = Refreshers::default();
    metrics::describe_counter!(
        REFRESH_FAILURES,
        "Failed renewals of Entra ID tokens and failed Key Vault reads, by kind"
    );
    for (scope, live) in &secrets.entra {
        let token = identity.token(scope).await.map_err(|e| {
            format!("cannot get an Entra ID token for the backends (scope `{scope}`): {e}")
        })?;
        live.set(token.token);
        tracing::info!(source = identity.source.name(), %scope, "Entra ID token for the backends");
        let task = tokio::spawn(renew_token(
            identity.clone(),
            scope.clone(),
            live.clone(),
            token.expires_at,
        ));
        tasks.tasks.push(task.abort_handle());
    }
    let mut by_reference: BTreeMap<KeyVaultRef, Vec<LiveCredential>> = BTreeMap::new();
    for (reference, live) in &secrets.key_vault {
        by_reference
            .entry(reference.clone())
            .or_default()
            .push(live.clone());
    }
    for (reference, lives) in by_reference {
        let rotated = identity
            .resolved_once
            .contains(&reference)
            .then(|| tasks.rotated.clone());
        let task = tokio::spawn(refresh_secret(
            identity.clone(),
            reference,
            lives,
            key_vault_refresh,
            rotated,
        ));
        tasks.tasks.push(task.abort_handle());
    }
    Ok(tasks)
}

/// Every `keyvault:` reference in the policy, once each.
fn key_vault_references(policy: &Policy) -> Vec<KeyVaultRef> {
    let backends = policy
        .backends
        .iter()
        .flat_map(|b| b.api_key.iter().chain(&b.bearer_token));
    let consumers = policy.consumers.iter().flat_map(|c| &c.keys);
    let others = policy.admin.key.iter().chain(&policy.rate_limit.redis_url);
    let mut references: Vec<KeyVaultRef> = backends
        .chain(consumers)
        .chain(others)
        .filter_map(|r| match SecretRef::parse(r) {
            Ok(SecretRef::KeyVault(reference)) => Some(reference),
            _ => None,
        })
        .chain(tls_key_vault_references(policy).into_iter().map(|(_, r)| r))
        .collect();
    references.sort();
    references.dedup();
    references
}

/// One token per Key Vault scope the references need (one cloud, in practice).
async fn vault_tokens(
    identity: &Identity,
    references: &[KeyVaultRef],
) -> BTreeMap<&'static str, Result<Arc<AccessToken>, String>> {
    let mut tokens = BTreeMap::new();
    for reference in references {
        let scope = Vault::scope(reference);
        if !tokens.contains_key(scope) {
            tokens.insert(scope, identity.token(scope).await.map(Arc::new));
        }
    }
    tokens
}

/// When to renew a token that is valid for `left`: 5 minutes before it expires, or at half its
/// remaining life when that is shorter than 10 minutes (never sooner than 50 ms, so a token
/// endpoint that hands out nearly-expired tokens is not hammered).
fn renew_after(left: Duration) -> Duration {
    const AHEAD: Duration = Duration::from_secs(300);
    let after = if left > 2 * AHEAD {
        left - AHEAD
    } else {
        left / 2
    };
    after.max(Duration::from_millis(50))
}

/// When to try again after a failed renewal: a quarter of the token's remaining life, between
/// 100 ms and 30 s, and never after it expires; every 5 s once it has.
fn retry_after(left: Duration) -> Duration {
    if left.is_zero() {
        return Duration::from_secs(5);
    }
    (left / 4)
        .clamp(Duration::from_millis(100), Duration::from_secs(30))
        .min(left)
}

/// Keeps `live` holding a valid token for `scope`, renewing ahead of expiry.
async fn renew_token(identity: Identity, scope: String, live: LiveCredential, expires: Instant) {
    let mut expires_at = expires;
    let mut outage = Outage::new("entra_token");
    loop {
        let left = expires_at.saturating_duration_since(Instant::now());
        let wait = if outage.failing {
            retry_after(left)
        } else {
            renew_after(left)
        };
        tokio::time::sleep(wait).await;
        if Instant::now() >= expires_at && live.current().is_some() {
            live.clear();
            tracing::error!(%scope, "the Entra ID token expired before it could be renewed; its backends fail over until it is");
        }
        match identity.token(&scope).await {
            Ok(token) => {
                live.set(token.token);
                expires_at = token.expires_at;
                outage.ended(&scope);
            }
            Err(error) => outage.failed(&scope, &error),
        }
    }
}

/// Reads `reference` again every `every`, swapping a rotated value into `lives`.
async fn refresh_secret(
    identity: Identity,
    reference: KeyVaultRef,
    lives: Vec<LiveCredential>,
    every: Duration,
    reload: Option<Arc<tokio::sync::Notify>>,
) {
    let scope = Vault::scope(&reference);
    let url = reference.url();
    let mut token: Option<AccessToken> = None;
    let mut outage = Outage::new("key_vault");
    loop {
        tokio::time::sleep(every).await;
        // The vault's token is kept here and renewed when a read finds it near expiry: reads are
        // minutes apart, so there is nothing to gain from a renewal task of its own.
        let fresh = token
            .as_ref()
            .is_some_and(|t| t.expires_at.saturating_duration_since(Instant::now()) > every * 2);
        if !fresh {
            match identity.token(scope).await {
                Ok(new) => token = Some(new),
                Err(error) => {
                    outage.failed(&url, &format!("no Entra ID token for Key Vault: {error}"));
                    continue;
                }
            }
        }
        let Some(bearer) = token.as_ref().map(|t| t.token.clone()) else {
            continue;
        };
        match identity
            .vault
            .read(&identity.client, &reference, &bearer)
            .await
        {
            Ok(value) => {
                let changed = lives
                    .iter()
                    .any(|live| live.current().as_ref() != Some(&value));
                if changed {
                    for live in &lives {
                        live.set(value.clone());
                    }
                    if let Some(reload) = &reload {
                        tracing::info!(secret = %url, "Key Vault secret rotated; reloading the policy to use it");
                        reload.notify_one();
                    } else {
                        tracing::info!(secret = %url, "Key Vault secret rotated; the new value is in use");
                    }
                }
                outage.ended(&url);
            }
            Err(error) => {
                // A refused token may simply be stale: fetch a new one next time.
                token = None;
                outage.failed(&url, &error);
            }
        }
    }
}

/// Logs a refresh outage once, when it starts and when it ends, and counts every failure.
struct Outage {
    kind: &'static str,
    failing: bool,
}

impl Outage {
    fn new(kind: &'static str) -> Self {
        Self {
            kind,
            failing: false,
        }
    }

    fn failed(&mut self, what: &str, error: &str) {
        metrics::counter!(REFRESH_FAILURES, "kind" => self.kind).increment(1);
        if !self.failing {
            self.failing = true;
            tracing::warn!(kind = self.kind, %what, %error, "credential refresh failed; keeping the last good value");
        }
    }

    fn ended(&mut self, what: &str) {
        if self.failing {
            self.failing = false;
            tracing::info!(kind = self.kind, %what, "credential refresh works again");
        }
    }
}

// === impl Fetched ===

impl SecretSource for Fetched<'_> {
    fn env(&self, name: &str) -> Option<String> {
        self.inner.env(name)
    }

    fn read_file(&self, path: &std::path::Path) -> std::io::Result<String> {
        self.inner.read_file(path)
    }

    fn key_vault(&self, reference: &KeyVaultRef) -> Result<String, String> {
        match self.values.get(reference) {
            Some(value) => value.clone(),
            None => self.inner.key_vault(reference),
        }
    }
}

/// An error and its causes, `: `-separated (reqwest's own message stops at "error sending request").
pub(crate) fn chain(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use gateway_policy::secret::{MapSecrets, NoSecrets};

    #[test]
    fn debug_shows_no_credential_of_any_source() {
        // A throwaway certificate and key made for the tests (base64 lines only, not the armor).
        let pem = include_str!("../../../../tests/fixtures/sp-cert.pem");
        let key_lines: Vec<&str> = pem
            .lines()
            .skip_while(|l| !l.contains("PRIVATE KEY"))
            .filter(|l| !l.starts_with("-----") && l.len() >= 8)
            .collect();
        assert!(!key_lines.is_empty());
        let env = |vars: &[(&str, &str)]| {
            vars.iter().fold(
                MapSecrets::with_fallback(NoSecrets).with_file("/certs/sp.pem", pem),
                |env, (k, v)| env.with_env(*k, *v),
            )
        };
        let sp = [("AZURE_TENANT_ID", "t"), ("AZURE_CLIENT_ID", "c")];
        let secret = [&sp[..], &[("AZURE_CLIENT_SECRET", "s3cret-value")]].concat();
        let certificate = [
            &sp[..],
            &[("AZURE_CLIENT_CERTIFICATE_PATH", "/certs/sp.pem")],
        ]
        .concat();
        let app_service = [
            ("IDENTITY_ENDPOINT", "http://127.0.0.1:1/msi/token"),
            ("IDENTITY_HEADER", "identity-header-value"),
        ];
        for vars in [&secret[..], &certificate[..], &app_service[..]] {
            let identity = Identity::from_env(&env(vars)).unwrap();
            let shown = format!("{identity:?}");
            for value in ["s3cret-value", "identity-header-value"]
                .into_iter()
                .chain(key_lines.iter().copied())
            {
                assert!(!shown.contains(value), "{value} in {shown}");
            }
        }
        let shown = format!("{:?}", Identity::from_env(&env(&certificate)).unwrap());
        assert!(shown.contains("certificate"), "{shown}");
    }

    #[test]
    fn renews_ahead_of_expiry() {
        let s = Duration::from_secs;
        assert_eq!(renew_after(s(3600)), s(3300));
        assert_eq!(renew_after(s(600)), s(300));
        assert_eq!(renew_after(s(4)), s(2));
        assert_eq!(renew_after(Duration::ZERO), Duration::from_millis(50));
        assert_eq!(retry_after(s(400)), s(30));
        assert_eq!(retry_after(s(2)), Duration::from_millis(500));
        assert_eq!(
            retry_after(Duration::from_millis(50)),
            Duration::from_millis(50)
        );
        assert_eq!(retry_after(Duration::ZERO), s(5));
    }
}
