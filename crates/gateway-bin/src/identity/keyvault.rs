//! Reading one Key Vault secret: `GET {vault}/secrets/{name}/{version}?api-version=7.4` with a
//! bearer token for the vault's scope; the value is the answer's `value`.

use gateway_core::secret::Secret;
use gateway_policy::secret::{KeyVaultRef, SecretSource};
use serde::Deserialize;

/// Set to a loopback base URL (`http://127.0.0.1:PORT`), every vault is read there instead: for
/// tests and local development only. Anything but a loopback address is refused.
pub(crate) const URL_OVERRIDE: &str = "GATEWAY_KEYVAULT_URL_OVERRIDE";

/// Where vaults are read: at their own URL, or at the loopback override.
#[derive(Clone, Debug)]
pub(crate) struct Vault {
    base_override: Option<String>,
}

#[derive(Deserialize)]
struct SecretBundle {
    value: String,
}

#[derive(Deserialize)]
struct VaultError {
    error: VaultErrorBody,
}

#[derive(Deserialize)]
struct VaultErrorBody {
    #[serde(default)]
    code: Option<String>,
}

// === impl Vault ===

impl Vault {
    pub(crate) fn from_env(env: &dyn SecretSource) -> Result<Self, String> {
        let base_override = match env.env(URL_OVERRIDE).filter(|v| !v.trim().is_empty()) {
            None => None,
            Some(base) => {
                let rest = base
                    .strip_prefix("http://")
                    .or_else(|| base.strip_prefix("https://"))
                    .unwrap_or("");
                let host = rest.split(['/', ':']).next().unwrap_or("");
                let loopback =
                    matches!(host, "127.0.0.1" | "localhost") || rest.starts_with("[::1]");
                if !loopback {
                    return Err(format!(
                        "{URL_OVERRIDE} must be a loopback URL such as http://127.0.0.1:8200 (it is for tests and local development)"
                    ));
                }
                Some(base.trim_end_matches('/').to_owned())
            }
        };
        Ok(Self { base_override })
    }

    /// The scope of a token for this vault's cloud: `https://vault.azure.net/.default` in Azure's
    /// public cloud.
    pub(crate) fn scope(reference: &KeyVaultRef) -> &'static str {
        let vault = reference.vault();
        if vault.ends_with(".vault.azure.cn") {
            "https://vault.azure.cn/.default"
        } else if vault.ends_with(".vault.usgovcloudapi.net") {
            "https://vault.usgovcloudapi.net/.default"
        } else if vault.ends_with(".vault.microsoftazure.de") {
            "https://vault.microsoftazure.de/.default"
        } else {
            "https://vault.azure.net/.default"
        }
    }

    /// Reads the secret's value (the latest version unless the reference pins one). The error
    /// names the status and Key Vault's error code, never a value.
    pub(crate) async fn read(
        &self,
        client: &reqwest::Client,
        reference: &KeyVaultRef,
        token: &Secret,
    ) -> Result<Secret, String> {
        let base = self.base_override.as_deref().unwrap_or(reference.vault());
        let url = format!(
            "{base}/secrets/{}/{}?api-version=7.4",
            reference.name(),
            reference.version().unwrap_or("")
        );
        let mut bearer =
            reqwest::header::HeaderValue::from_str(&format!("Bearer {}", token.expose()))
                .map_err(|_| "the Key Vault token cannot be sent as a header".to_owned())?;
        bearer.set_sensitive(true);
        let response = client
            .get(url)
            .header(reqwest::header::AUTHORIZATION, bearer)
            .send()
            .await
            .map_err(|e| super::chain(&e))?;
        let status = response.status();
        let body = response.bytes().await.map_err(|e| super::chain(&e))?;
        if !status.is_success() {
            let code = serde_json::from_slice::<VaultError>(&body)
                .ok()
                .and_then(|e| e.error.code)
                .map(|code| format!(" ({code})"))
                .unwrap_or_default();
            return Err(format!("Key Vault answered {status}{code}"));
        }
        let bundle: SecretBundle = serde_json::from_slice(&body)
            .map_err(|_| "Key Vault's answer has no `value`".to_owned())?;
        // As `env:` and `file:` values are: a trailing newline pasted into the portal is not part
        // of a key.
        let value = bundle.value.trim_end();
        if value.is_empty() {
            return Err("the secret is empty".to_owned());
        }
        Ok(Secret::new(value))
    }
}
