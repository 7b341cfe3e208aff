//! Stand-ins for what a gateway with an Entra ID identity talks to, served on 127.0.0.1 by the
//! test: Entra ID's v2 token endpoint (`/{tenant}/oauth2/v2.0/token`), the App Service identity
//! endpoint (`/msi/token`), the instance metadata service (`/metadata/identity/oauth2/token`), Key
//! Vault's secrets API (`/secrets/{name}[/{version}]`, versions and rotation) and an Azure OpenAI
//! backend that accepts only valid keys or unexpired tokens and remembers every credential it saw.
//! [`AzureStub::env`] gives the variables that point a gateway's identity at it, the instance
//! metadata address included.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;
use tokio::time::Instant;

/// The tenant, client id and client secret of the stand-in's service principal.
pub const TENANT: &str = "00000000-test-tenant";
pub const CLIENT_ID: &str = "11111111-test-client";
pub const CLIENT_SECRET: &str = "sp-secret-Zq8~5p";
/// The `IDENTITY_HEADER` the stand-in's App Service endpoint expects.
pub const IDENTITY_HEADER: &str = "identity-header-7f3a";
/// Azure OpenAI's and Key Vault's scopes.
pub const AOAI_SCOPE: &str = "https://cognitiveservices.azure.com/.default";
pub const VAULT_SCOPE: &str = "https://vault.azure.net/.default";

/// The running stand-in.
pub struct AzureStub {
    pub addr: SocketAddr,
    state: Arc<StubState>,
    task: tokio::task::JoinHandle<()>,
}

struct Issued {
    scope: String,
    expires: Instant,
}

#[derive(Default)]
struct StubState {
    lifetime_ms: AtomicU64,
    fail_tokens: AtomicBool,
    fail_vault: AtomicBool,
    next: AtomicU64,
    issued: Mutex<HashMap<String, Issued>>,
    fetches: Mutex<BTreeMap<String, u64>>,
    secrets: Mutex<BTreeMap<String, Vec<(String, String)>>>,
    accepted_keys: Mutex<BTreeSet<String>>,
    seen: Mutex<Vec<String>>,
    refused: AtomicU64,
}

impl AzureStub {
    /// Starts the stand-in; tokens live `token_lifetime`.
    pub async fn start(token_lifetime: Duration) -> Self {
        let state = Arc::new(StubState::default());
        state.set_lifetime(token_lifetime);
        let app = Router::new()
            .route("/{tenant}/oauth2/v2.0/token", post(aad))
            .route("/msi/token", get(app_service))
            .route("/metadata/identity/oauth2/token", get(imds))
            .route("/secrets/{name}", get(vault_latest))
            .route("/secrets/{name}/", get(vault_latest))
            .route("/secrets/{name}/{version}", get(vault_version))
            .route(
                "/openai/deployments/{deployment}/chat/completions",
                post(chat),
            )
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Self { addr, state, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A service principal with a client secret, Key Vault read here, and the instance metadata
    /// address on this stand-in too (never 169.254.169.254).
    pub fn env(&self) -> Vec<(String, String)> {
        let mut env = self.safe_env();
        env.extend([
            ("AZURE_TENANT_ID".to_owned(), TENANT.to_owned()),
            ("AZURE_CLIENT_ID".to_owned(), CLIENT_ID.to_owned()),
            ("AZURE_CLIENT_SECRET".to_owned(), CLIENT_SECRET.to_owned()),
        ]);
        env
    }

    /// The App Service / Container Apps identity endpoint, here.
    pub fn app_service_env(&self) -> Vec<(String, String)> {
        let mut env = self.safe_env();
        env.extend([
            (
                "IDENTITY_ENDPOINT".to_owned(),
                format!("{}/msi/token", self.url()),
            ),
            ("IDENTITY_HEADER".to_owned(), IDENTITY_HEADER.to_owned()),
        ]);
        env
    }

    /// Only the redirections: authority host, instance metadata and Key Vault, all here.
    pub fn safe_env(&self) -> Vec<(String, String)> {
        vec![
            ("AZURE_AUTHORITY_HOST".to_owned(), self.url()),
            ("AZURE_POD_IDENTITY_AUTHORITY_HOST".to_owned(), self.url()),
            ("GATEWAY_KEYVAULT_URL_OVERRIDE".to_owned(), self.url()),
        ]
    }

    pub fn set_token_lifetime(&self, lifetime: Duration) {
        self.state.set_lifetime(lifetime);
    }

    /// Makes the token endpoints answer 500 (or work again).
    pub fn fail_tokens(&self, fail: bool) {
        self.state.fail_tokens.store(fail, Ordering::SeqCst);
    }

    /// Makes Key Vault answer 500 (or work again).
    pub fn fail_vault(&self, fail: bool) {
        self.state.fail_vault.store(fail, Ordering::SeqCst);
    }

    /// Tokens handed out for `scope` so far.
    pub fn token_fetches(&self, scope: &str) -> u64 {
        let fetches = self.state.fetches.lock().unwrap();
        fetches.get(scope).copied().unwrap_or(0)
    }

    /// Every token handed out, any scope.
    pub fn issued_tokens(&self) -> Vec<String> {
        self.state.issued.lock().unwrap().keys().cloned().collect()
    }

    /// Adds a new version of a Key Vault secret (the latest from now on); returns its version.
    pub fn put_secret(&self, name: &str, value: &str) -> String {
        let mut secrets = self.state.secrets.lock().unwrap();
        let versions = secrets.entry(name.to_owned()).or_default();
        let version = format!("v{:032}", versions.len() + 1);
        versions.push((version.clone(), value.to_owned()));
        version
    }

    /// Makes the backend accept (or stop accepting) an `api-key`.
    pub fn accept_key(&self, key: &str, accept: bool) {
        let mut keys = self.state.accepted_keys.lock().unwrap();
        if accept {
            keys.insert(key.to_owned());
        } else {
            keys.remove(key);
        }
    }

    /// The credentials the backend was called with, in order (`api-key` values, bearer tokens).
    pub fn seen(&self) -> Vec<String> {
        self.state.seen.lock().unwrap().clone()
    }

    /// Calls the backend refused.
    pub fn refused(&self) -> u64 {
        self.state.refused.load(Ordering::SeqCst)
    }

    /// A `[[backends]]` table for the backend here, serving `gpt-4o`, with `credential` (e.g.
    /// `api_key = "keyvault:..."` or `[backends.entra]`) as its credential lines.
    pub fn backend_toml(&self, name: &str, priority: u32, credential: &str) -> String {
        format!(
            "[[backends]]\nname = \"{name}\"\nregion = \"Stub\"\nendpoint = \"{}\"\npriority = {priority}\ndeployments = {{ gpt-4o = \"gpt-4o\" }}\n{credential}\n",
            self.url()
        )
    }

    pub fn stop(self) {
        self.task.abort();
    }
}

impl StubState {
    fn set_lifetime(&self, lifetime: Duration) {
        self.lifetime_ms.store(
            u64::try_from(lifetime.as_millis()).unwrap(),
            Ordering::SeqCst,
        );
    }

    /// A new token for `scope`; `None` when the endpoints are failing.
    fn issue(&self, scope: &str) -> Option<(String, Duration)> {
        if self.fail_tokens.load(Ordering::SeqCst) {
            return None;
        }
        let n = self.next.fetch_add(1, Ordering::SeqCst);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let token = format!("eyJ0eXAi.stub-token-{n}-{nanos:09}.sig");
        let lifetime = Duration::from_millis(self.lifetime_ms.load(Ordering::SeqCst));
        self.issued.lock().unwrap().insert(
            token.clone(),
            Issued {
                scope: scope.to_owned(),
                expires: Instant::now() + lifetime,
            },
        );
        *self
            .fetches
            .lock()
            .unwrap()
            .entry(scope.to_owned())
            .or_default() += 1;
        Some((token, lifetime))
    }

    fn valid_token(&self, headers: &HeaderMap, scope: &str) -> Option<String> {
        let token = headers
            .get("authorization")?
            .to_str()
            .ok()?
            .strip_prefix("Bearer ")?;
        let issued = self.issued.lock().unwrap();
        let found = issued.get(token)?;
        (found.scope == scope && found.expires > Instant::now()).then(|| token.to_owned())
    }
}

fn error(status: StatusCode, code: &str) -> Response {
    (
        status,
        axum::Json(json!({"error": {"code": code, "message": code}})),
    )
        .into_response()
}

fn decode_form(body: &str) -> HashMap<String, String> {
    let decode = |s: &str| {
        let bytes = s.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            match bytes[i] {
                b'%' if i + 2 < bytes.len() => {
                    let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap();
                    out.push(u8::from_str_radix(hex, 16).unwrap());
                    i += 3;
                }
                b'+' => {
                    out.push(b' ');
                    i += 1;
                }
                b => {
                    out.push(b);
                    i += 1;
                }
            }
        }
        String::from_utf8(out).unwrap()
    };
    body.split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (decode(k), decode(v)))
        .collect()
}

async fn aad(
    State(state): State<Arc<StubState>>,
    Path(tenant): Path<String>,
    body: String,
) -> Response {
    let form = decode_form(&body);
    let field = |name: &str| form.get(name).map(String::as_str);
    let authenticated = field("client_secret") == Some(CLIENT_SECRET)
        || field("client_assertion").is_some_and(|a| {
            a.starts_with("federated-")
                || (field("client_assertion_type")
                    == Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
                    && valid_certificate_assertion(a, &tenant))
        });
    if tenant != TENANT
        || field("grant_type") != Some("client_credentials")
        || field("client_id") != Some(CLIENT_ID)
        || !authenticated
    {
        return (
            StatusCode::UNAUTHORIZED,
            axum::Json(json!({"error": "invalid_client", "error_description": "AADSTS7000215"})),
        )
            .into_response();
    }
    let Some(scope) = field("scope") else {
        return error(StatusCode::BAD_REQUEST, "invalid_scope");
    };
    match state.issue(scope) {
        Some((token, lifetime)) => axum::Json(json!({
            "token_type": "Bearer",
            "expires_in": lifetime.as_secs_f64().ceil() as u64,
            "ext_expires_in": lifetime.as_secs(),
            "access_token": token,
        }))
        .into_response(),
        None => error(StatusCode::INTERNAL_SERVER_ERROR, "temporarily_unavailable"),
    }
}

/// The test certificate (`tests/fixtures/sp-cert.pem`: a throwaway self-signed certificate and its
/// key, for these tests only): its SHA-1 thumbprint, base64url, and its RSA public key (PKCS#1 DER).
pub const CERT_PEM_PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/sp-cert.pem");
const CERT_THUMBPRINT: &str = "k9Np9jnRkinY-LC42wjMLJLZ6dc";
const CERT_PUBLIC_KEY: &[u8] = include_bytes!("fixtures/sp-cert.pub.der");

/// An RS256 JWT signed by the test certificate's key, with its thumbprint as `x5t`, for this
/// client at this tenant's token endpoint, and not expired.
fn valid_certificate_assertion(jwt: &str, tenant: &str) -> bool {
    let parts: Vec<&str> = jwt.split('.').collect();
    let [header, claims, signature] = parts[..] else {
        return false;
    };
    let (Some(header_json), Some(claims_json), Some(signature)) = (
        base64url_decode(header),
        base64url_decode(claims),
        base64url_decode(signature),
    ) else {
        return false;
    };
    let header: serde_json::Value = serde_json::from_slice(&header_json).unwrap_or_default();
    let claims: serde_json::Value = serde_json::from_slice(&claims_json).unwrap_or_default();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let key = aws_lc_rs::signature::UnparsedPublicKey::new(
        &aws_lc_rs::signature::RSA_PKCS1_2048_8192_SHA256,
        CERT_PUBLIC_KEY,
    );
    header["alg"] == "RS256"
        && header["x5t"] == CERT_THUMBPRINT
        && claims["iss"] == CLIENT_ID
        && claims["sub"] == CLIENT_ID
        && claims["aud"]
            .as_str()
            .is_some_and(|aud| aud.ends_with(&format!("/{tenant}/oauth2/v2.0/token")))
        && claims["exp"].as_u64().is_some_and(|exp| exp > now)
        && key
            .verify(format!("{}.{}", parts[0], parts[1]).as_bytes(), &signature)
            .is_ok()
}

fn base64url_decode(text: &str) -> Option<Vec<u8>> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'-' => Some(62),
        b'_' => Some(63),
        _ => None,
    };
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for c in text.bytes() {
        acc = (acc << 6) | u32::from(value(c)?);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push(u8::try_from((acc >> bits) & 0xff).unwrap());
        }
    }
    Some(out)
}

/// Managed identity endpoints answer a resource; the token's scope is `{resource}/.default`.
fn managed_identity(state: &StubState, query: &HashMap<String, String>) -> Response {
    let Some(resource) = query.get("resource") else {
        return error(StatusCode::BAD_REQUEST, "invalid_resource");
    };
    let scope = format!("{resource}/.default");
    match state.issue(&scope) {
        Some((token, lifetime)) => {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_secs();
            axum::Json(json!({
                "access_token": token,
                "expires_on": (now + lifetime.as_secs()).to_string(),
                "resource": resource,
                "token_type": "Bearer",
            }))
            .into_response()
        }
        None => error(StatusCode::INTERNAL_SERVER_ERROR, "unavailable"),
    }
}

async fn app_service(
    State(state): State<Arc<StubState>>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    if headers
        .get("x-identity-header")
        .and_then(|v| v.to_str().ok())
        != Some(IDENTITY_HEADER)
        || query.get("api-version").map(String::as_str) != Some("2019-08-01")
    {
        return error(StatusCode::UNAUTHORIZED, "bad_identity_header");
    }
    managed_identity(&state, &query)
}

async fn imds(
    State(state): State<Arc<StubState>>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    if headers.get("metadata").and_then(|v| v.to_str().ok()) != Some("true") {
        return error(StatusCode::BAD_REQUEST, "missing_metadata_header");
    }
    managed_identity(&state, &query)
}

fn vault(state: &StubState, headers: &HeaderMap, name: &str, version: Option<&str>) -> Response {
    if state.fail_vault.load(Ordering::SeqCst) {
        return error(StatusCode::INTERNAL_SERVER_ERROR, "InternalError");
    }
    if state.valid_token(headers, VAULT_SCOPE).is_none() {
        return error(StatusCode::UNAUTHORIZED, "Unauthorized");
    }
    let secrets = state.secrets.lock().unwrap();
    let versions = secrets.get(name);
    let found = match version {
        None => versions.and_then(|v| v.last()),
        Some(version) => versions.and_then(|v| v.iter().find(|(id, _)| id == version)),
    };
    match found {
        Some((id, value)) => axum::Json(json!({
            "value": value,
            "id": format!("https://stub.vault.azure.net/secrets/{name}/{id}"),
            "attributes": {"enabled": true},
        }))
        .into_response(),
        None => error(StatusCode::NOT_FOUND, "SecretNotFound"),
    }
}

async fn vault_latest(
    State(state): State<Arc<StubState>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    vault(&state, &headers, &name, None)
}

async fn vault_version(
    State(state): State<Arc<StubState>>,
    Path((name, version)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    vault(&state, &headers, &name, Some(&version))
}

async fn chat(State(state): State<Arc<StubState>>, headers: HeaderMap) -> Response {
    let key = headers.get("api-key").and_then(|v| v.to_str().ok());
    let credential = match key {
        Some(key) => {
            let accepted = state.accepted_keys.lock().unwrap().contains(key);
            accepted.then(|| key.to_owned())
        }
        None => state.valid_token(&headers, AOAI_SCOPE),
    };
    let Some(credential) = credential else {
        state.refused.fetch_add(1, Ordering::SeqCst);
        return error(StatusCode::UNAUTHORIZED, "401");
    };
    state.seen.lock().unwrap().push(credential);
    axum::Json(json!({
        "id": "chatcmpl-stub",
        "object": "chat.completion",
        "created": 0,
        "model": "gpt-4o",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
    }))
    .into_response()
}
