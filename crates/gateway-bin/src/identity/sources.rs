//! Where the gateway's Entra ID tokens come from, chosen from the environment in the order
//! `DefaultAzureCredential` tries them, and the documented REST call of each.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use gateway_core::secret::Secret;
use gateway_policy::secret::SecretSource;
use serde::Deserialize;
use tokio::time::Instant;

use super::certificate::ClientCertificate;

/// Microsoft Entra ID's public-cloud authority, unless `AZURE_AUTHORITY_HOST` says otherwise.
const DEFAULT_AUTHORITY: &str = "https://login.microsoftonline.com";
/// The instance metadata service, unless `AZURE_POD_IDENTITY_AUTHORITY_HOST` says otherwise.
const DEFAULT_IMDS: &str = "http://169.254.169.254";

/// One way of getting tokens. `Debug` never shows a secret.
#[derive(Clone)]
pub(crate) enum TokenSource {
    /// `AZURE_TENANT_ID`, `AZURE_CLIENT_ID`, `AZURE_CLIENT_SECRET`.
    ClientSecret {
        authority: String,
        tenant: String,
        client_id: String,
        secret: Secret,
    },
    /// `AZURE_TENANT_ID`, `AZURE_CLIENT_ID`, `AZURE_CLIENT_CERTIFICATE_PATH` (a PEM file).
    ClientCertificate {
        authority: String,
        tenant: String,
        client_id: String,
        certificate: Arc<ClientCertificate>,
    },
    /// `AZURE_FEDERATED_TOKEN_FILE`, `AZURE_CLIENT_ID`, `AZURE_TENANT_ID` (AKS workload identity).
    /// The file is read for each request: the kubelet rotates it.
    WorkloadIdentity {
        authority: String,
        tenant: String,
        client_id: String,
        token_file: String,
    },
    /// `IDENTITY_ENDPOINT` and `IDENTITY_HEADER` (App Service, Container Apps, Functions).
    AppService {
        endpoint: String,
        header: Secret,
        client_id: Option<String>,
    },
    /// The VM's instance metadata service.
    Imds {
        base: String,
        client_id: Option<String>,
    },
}

/// A token and when it stops being valid.
pub(crate) struct AccessToken {
    pub(crate) token: Secret,
    pub(crate) expires_at: Instant,
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    #[serde(default)]
    expires_in: Option<serde_json::Value>,
    #[serde(default)]
    expires_on: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct AadError {
    #[serde(default)]
    error: Option<String>,
}

// === impl TokenSource ===

impl TokenSource {
    /// The first source the environment configures, in `DefaultAzureCredential`'s order: a service
    /// principal, workload identity, the App Service identity endpoint, and last the instance
    /// metadata service (a managed identity on a VM, system-assigned unless `AZURE_CLIENT_ID`
    /// names a user-assigned one).
    pub(crate) fn from_env(env: &dyn SecretSource) -> Result<Self, String> {
        let var = |name: &str| env.env(name).filter(|v| !v.trim().is_empty());
        let authority = var("AZURE_AUTHORITY_HOST")
            .unwrap_or_else(|| DEFAULT_AUTHORITY.to_owned())
            .trim_end_matches('/')
            .to_owned();
        let tenant = var("AZURE_TENANT_ID");
        let client_id = var("AZURE_CLIENT_ID");
        if let (Some(tenant), Some(client_id)) = (&tenant, &client_id) {
            if let Some(secret) = var("AZURE_CLIENT_SECRET") {
                return Ok(Self::ClientSecret {
                    authority,
                    tenant: tenant.clone(),
                    client_id: client_id.clone(),
                    secret: Secret::new(secret),
                });
            }
            if let Some(path) = var("AZURE_CLIENT_CERTIFICATE_PATH") {
                let pem = env.read_file(Path::new(&path)).map_err(|e| {
                    format!("cannot read AZURE_CLIENT_CERTIFICATE_PATH `{path}`: {e}")
                })?;
                return Ok(Self::ClientCertificate {
                    authority,
                    tenant: tenant.clone(),
                    client_id: client_id.clone(),
                    certificate: Arc::new(ClientCertificate::from_pem(pem.as_bytes())?),
                });
            }
            if let Some(token_file) = var("AZURE_FEDERATED_TOKEN_FILE") {
                return Ok(Self::WorkloadIdentity {
                    authority,
                    tenant: tenant.clone(),
                    client_id: client_id.clone(),
                    token_file,
                });
            }
        }
        if let (Some(endpoint), Some(header)) = (var("IDENTITY_ENDPOINT"), var("IDENTITY_HEADER")) {
            return Ok(Self::AppService {
                endpoint,
                header: Secret::new(header),
                client_id,
            });
        }
        let base = var("AZURE_POD_IDENTITY_AUTHORITY_HOST")
            .unwrap_or_else(|| DEFAULT_IMDS.to_owned())
            .trim_end_matches('/')
            .to_owned();
        Ok(Self::Imds { base, client_id })
    }

    /// A short name for logs.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Self::ClientSecret { .. } => "service principal (client secret)",
            Self::ClientCertificate { .. } => "service principal (certificate)",
            Self::WorkloadIdentity { .. } => "workload identity",
            Self::AppService { .. } => "managed identity (identity endpoint)",
            Self::Imds { .. } => "managed identity (instance metadata service)",
        }
    }

    /// Fetches a token for `scope` (e.g. `https://cognitiveservices.azure.com/.default`). The error
    /// says what failed, never a secret.
    pub(crate) async fn fetch(
        &self,
        client: &reqwest::Client,
        scope: &str,
    ) -> Result<AccessToken, String> {
        // Managed identity endpoints take a resource, not a scope.
        let resource = scope.strip_suffix("/.default").unwrap_or(scope);
        let request = match self {
            Self::ClientSecret {
                authority,
                tenant,
                client_id,
                secret,
            } => client
                .post(format!("{authority}/{tenant}/oauth2/v2.0/token"))
                .header("content-type", "application/x-www-form-urlencoded")
                .body(form(&[
                    ("grant_type", "client_credentials"),
                    ("client_id", client_id),
                    ("client_secret", secret.expose()),
                    ("scope", scope),
                ])),
            Self::ClientCertificate {
                authority,
                tenant,
                client_id,
                certificate,
            } => {
                let endpoint = format!("{authority}/{tenant}/oauth2/v2.0/token");
                let assertion = certificate.assertion(client_id, &endpoint)?;
                client
                    .post(endpoint)
                    .header("content-type", "application/x-www-form-urlencoded")
                    .body(form(&[
                        ("grant_type", "client_credentials"),
                        ("client_id", client_id),
                        (
                            "client_assertion_type",
                            "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                        ),
                        ("client_assertion", &assertion),
                        ("scope", scope),
                    ]))
            }
            Self::WorkloadIdentity {
                authority,
                tenant,
                client_id,
                token_file,
            } => {
                let assertion = tokio::fs::read_to_string(token_file)
                    .await
                    .map_err(|e| format!("cannot read AZURE_FEDERATED_TOKEN_FILE: {e}"))?;
                client
                    .post(format!("{authority}/{tenant}/oauth2/v2.0/token"))
                    .header("content-type", "application/x-www-form-urlencoded")
                    .body(form(&[
                        ("grant_type", "client_credentials"),
                        ("client_id", client_id),
                        (
                            "client_assertion_type",
                            "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                        ),
                        ("client_assertion", assertion.trim()),
                        ("scope", scope),
                    ]))
            }
            Self::AppService {
                endpoint,
                header,
                client_id,
            } => {
                let mut query = vec![("api-version", "2019-08-01"), ("resource", resource)];
                query.extend(client_id.as_deref().map(|id| ("client_id", id)));
                let mut header = reqwest::header::HeaderValue::from_str(header.expose())
                    .map_err(|_| "IDENTITY_HEADER cannot be sent as a header".to_owned())?;
                header.set_sensitive(true);
                client
                    .get(format!("{endpoint}?{}", form(&query)))
                    .header("x-identity-header", header)
            }
            Self::Imds { base, client_id } => {
                let mut query = vec![("api-version", "2018-02-01"), ("resource", resource)];
                query.extend(client_id.as_deref().map(|id| ("client_id", id)));
                client
                    .get(format!(
                        "{base}/metadata/identity/oauth2/token?{}",
                        form(&query)
                    ))
                    .header("metadata", "true")
            }
        };
        let sent = Instant::now();
        let response = request
            .send()
            .await
            .map_err(|e| format!("{}: {}", self.name(), crate::identity::chain(&e)))?;
        let status = response.status();
        let body = response
            .bytes()
            .await
            .map_err(|e| format!("{}: {}", self.name(), crate::identity::chain(&e)))?;
        if !status.is_success() {
            // Only the error code: a description may quote what was sent.
            let code = serde_json::from_slice::<AadError>(&body)
                .ok()
                .and_then(|e| e.error)
                .map(|code| format!(" ({code})"))
                .unwrap_or_default();
            return Err(format!(
                "{}: the token endpoint answered {status}{code}",
                self.name()
            ));
        }
        let parsed: TokenResponse = serde_json::from_slice(&body).map_err(|_| {
            format!(
                "{}: the token endpoint's answer is not a token",
                self.name()
            )
        })?;
        let lifetime = lifetime(&parsed)
            .ok_or_else(|| format!("{}: the token endpoint's answer has no expiry", self.name()))?;
        Ok(AccessToken {
            token: Secret::new(parsed.access_token),
            expires_at: sent + lifetime,
        })
    }
}

impl std::fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// `expires_in` (seconds, a number or a string), else `expires_on` (Unix seconds) less now.
fn lifetime(token: &TokenResponse) -> Option<Duration> {
    let seconds = |value: &serde_json::Value| match value {
        serde_json::Value::Number(n) => n.as_u64(),
        serde_json::Value::String(s) => s.trim().parse().ok(),
        _ => None,
    };
    if let Some(secs) = token.expires_in.as_ref().and_then(seconds) {
        return Some(Duration::from_secs(secs));
    }
    let on = token.expires_on.as_ref().and_then(seconds)?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).ok()?.as_secs();
    Some(Duration::from_secs(on.saturating_sub(now)))
}

/// `application/x-www-form-urlencoded` (also a query string): unreserved bytes kept, others `%XX`.
pub(crate) fn form(pairs: &[(&str, &str)]) -> String {
    let mut out = String::new();
    for (i, (name, value)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        encode(&mut out, name);
        out.push('=');
        encode(&mut out, value);
    }
    out
}

fn encode(out: &mut String, value: &str) {
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use gateway_policy::secret::{MapSecrets, NoSecrets};

    fn source(vars: &[(&str, &str)]) -> Result<TokenSource, String> {
        let env = vars
            .iter()
            .fold(MapSecrets::with_fallback(NoSecrets), |env, (k, v)| {
                env.with_env(*k, *v)
            });
        TokenSource::from_env(&env)
    }

    #[test]
    fn chooses_in_default_azure_credential_order() {
        let sp = [
            ("AZURE_TENANT_ID", "t"),
            ("AZURE_CLIENT_ID", "c"),
            ("AZURE_CLIENT_SECRET", "s3cret"),
            ("AZURE_FEDERATED_TOKEN_FILE", "/var/run/token"),
            ("IDENTITY_ENDPOINT", "http://127.0.0.1:1/msi"),
            ("IDENTITY_HEADER", "h"),
        ];
        let chosen = source(&sp).unwrap();
        assert!(matches!(chosen, TokenSource::ClientSecret { .. }));
        assert!(!format!("{chosen:?}").contains("s3cret"));
        assert!(matches!(
            source(&sp[..2].iter().chain(&sp[3..]).copied().collect::<Vec<_>>()).unwrap(),
            TokenSource::WorkloadIdentity { .. }
        ));
        assert!(matches!(
            source(&sp[4..]).unwrap(),
            TokenSource::AppService {
                client_id: None,
                ..
            }
        ));
        let imds = source(&[
            ("AZURE_CLIENT_ID", "user-assigned"),
            ("AZURE_POD_IDENTITY_AUTHORITY_HOST", "http://127.0.0.1:9/"),
        ])
        .unwrap();
        let TokenSource::Imds { base, client_id } = imds else {
            panic!("not IMDS")
        };
        assert_eq!(base, "http://127.0.0.1:9");
        assert_eq!(client_id.as_deref(), Some("user-assigned"));
        assert!(
            source(&[
                ("AZURE_TENANT_ID", "t"),
                ("AZURE_CLIENT_ID", "c"),
                ("AZURE_CLIENT_CERTIFICATE_PATH", "/nonexistent/cert.pem"),
            ])
            .unwrap_err()
            .starts_with("cannot read AZURE_CLIENT_CERTIFICATE_PATH `/nonexistent/cert.pem`")
        );
    }

    #[test]
    fn form_encodes_reserved_bytes() {
        assert_eq!(
            form(&[("scope", "https://x/.default"), ("a b", "1+2&")]),
            "scope=https%3A%2F%2Fx%2F.default&a%20b=1%2B2%26"
        );
    }
}
