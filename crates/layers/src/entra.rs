//! Entra ID access tokens from clients, as API Management's `validate-azure-ad-token` checks them
//! (Cargo feature `entra`).
//!
//! [`EntraAuthLayer`] looks at `Authorization: Bearer` values shaped like a JWT (three base64url
//! parts, the first starting `eyJ`) on requests without an `api-key` header. It checks the RS256
//! signature against the tenant's signing keys, the tenant (`tid`), the issuer, the audience, and
//! `exp`/`nbf` with a clock skew, then puts a [`TokenIdentity`] in the request extensions for
//! [`ConsumerAuthLayer`](crate::auth::ConsumerAuthLayer), below it, to map to a consumer. Any other
//! request passes through untouched, so keys keep working next to tokens. A token that fails a
//! check is answered with a 401 in Azure's error shape saying which check failed (never the token),
//! logged once.
//!
//! The signing keys come from OpenID discovery: `{authority}/{tenant}/v2.0/.well-known/openid-configuration`
//! names the `jwks_uri`. They are fetched on the first token, then kept: a token is checked without
//! any I/O. A token signed with a key not in the cache (`kid` unknown: Entra ID rotates its keys)
//! causes one refresh, shared by every request waiting for it, and at most one such refresh per
//! [`EntraConfig::key_refresh_min`], so a flood of made-up `kid`s cannot hammer the issuer. Keys
//! older than a day are refreshed in the background.
//!
//! # Example
//!
//! ```
//! use std::sync::Arc;
//! use axum::{Router, body::Body, routing::post};
//! use gateway_layers::auth::{ConsumerAuthLayer, ConsumerKeys};
//! use gateway_layers::entra::{EntraAuthLayer, EntraConfig, EntraValidator};
//! use tower::{ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let tenant = "72f988bf-86f1-41af-91ab-2d7cd011db47";
//! let config = EntraConfig::new(tenant, ["api://my-gateway"]);
//! let validator = Arc::new(EntraValidator::new(config));
//! let keys = ConsumerKeys::new()
//!     .consumer("billing-app", ["s3cret"], None)
//!     .token_ids("billing-app", ["11111111-2222-3333-4444-555555555555"], [] as [&str; 0]);
//! let app = Router::new()
//!     .route("/openai/v1/chat/completions", post(|| async { "ok" }))
//!     .layer(ServiceBuilder::new()
//!         .layer(EntraAuthLayer::new(validator))
//!         .layer(ConsumerAuthLayer::new(Arc::new(keys))));
//!
//! // A key still works next to tokens; a token that is no JWT is taken for a key and refused.
//! let call = |name: &str, value: &str| {
//!     http::Request::post("/openai/v1/chat/completions").header(name, value).body(Body::empty()).unwrap()
//! };
//! assert_eq!(app.clone().oneshot(call("api-key", "s3cret")).await.unwrap().status(), 200);
//! assert_eq!(app.oneshot(call("authorization", "Bearer guess")).await.unwrap().status(), 401);
//! # }
//! ```

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode, header};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use pin_project_lite::pin_project;
use serde::Deserialize;
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};

pub use crate::auth::TokenIdentity;
use crate::error::azure_error;

/// Keys older than this are refreshed in the background (Microsoft's guidance: at least daily).
const KEYS_MAX_AGE: Duration = Duration::from_secs(24 * 3600);
/// After a failed fetch, how long before another may be tried.
const FAILED_FETCH_BACKOFF: Duration = Duration::from_secs(10);
/// One discovery or key fetch may take this long.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// What tokens are accepted. See the [module docs](self).
#[derive(Clone, Debug)]
pub struct EntraConfig {
    tenant: String,
    audiences: HashSet<String>,
    issuers: HashSet<String>,
    discovery_url: String,
    clock_skew: Duration,
    key_refresh_min: Duration,
}

/// Checks tokens against the tenant's signing keys, which it fetches and caches.
#[derive(Debug)]
pub struct EntraValidator {
    config: EntraConfig,
    /// Built once: the signature, `exp`/`nbf` and `aud` checks every token goes through.
    validation: Validation,
    http: reqwest::Client,
    keys: RwLock<Keys>,
    /// Held while fetching, so concurrent requests that need keys share one fetch.
    refresh: tokio::sync::Mutex<RefreshState>,
}

#[derive(Default)]
struct Keys {
    by_kid: HashMap<String, DecodingKey>,
    fetched: Option<Instant>,
    /// Successful fetches so far: a request that waited for the refresh lock sees whether another
    /// fetched meanwhile.
    generation: u64,
}

#[derive(Debug, Default)]
struct RefreshState {
    /// Set once keys were fetched successfully: afterwards only an unknown `kid` refreshes, and
    /// at most once per `key_refresh_min`.
    loaded: bool,
    /// No fetch before this instant.
    not_before: Option<Instant>,
}

/// Why a token was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenError {
    /// Not a well-formed JWT, or a required claim is missing or malformed.
    Malformed(String),
    /// Signed with an algorithm other than RS256.
    UnsupportedAlgorithm,
    /// `exp` (plus the clock skew) is past.
    Expired,
    /// `nbf` (minus the clock skew) is still ahead.
    NotYetValid,
    /// `aud` is none of the accepted audiences.
    WrongAudience,
    /// `tid` is another tenant.
    ForeignTenant,
    /// `iss` is none of the accepted issuers.
    WrongIssuer,
    /// The signature does not verify with the key its `kid` names.
    BadSignature,
    /// Its `kid` is none of the tenant's signing keys, even after a refresh.
    UnknownSigningKey,
    /// Neither `appid`/`azp` nor `oid`: nothing to map to a consumer.
    NoIdentity,
    /// The signing keys could not be fetched: the gateway cannot check any token.
    KeysUnavailable,
}

/// The result of checking a token with the cached keys only.
enum Cached {
    Checked(Result<TokenIdentity, TokenError>),
    /// Its `kid` is not cached: a refresh may find it.
    NeedKeys,
}

#[derive(Deserialize)]
struct Claims {
    tid: Option<String>,
    iss: Option<String>,
    appid: Option<String>,
    azp: Option<String>,
    oid: Option<String>,
}

#[derive(Deserialize)]
struct Discovery {
    jwks_uri: String,
}

/// Layer that verifies Entra ID bearer tokens. See the [module docs](self).
#[derive(Clone, Debug)]
pub struct EntraAuthLayer {
    validator: Arc<EntraValidator>,
}

/// Service produced by [`EntraAuthLayer`].
#[derive(Clone, Debug)]
pub struct EntraAuth<S> {
    inner: S,
    validator: Arc<EntraValidator>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

pin_project! {
    /// Response future of [`EntraAuth`]: the inner service's, a refusal, or (rarely, when the
    /// signing keys must be fetched first) a boxed check followed by the inner call.
    pub struct ResponseFuture<F, T> {
        #[pin]
        state: State<F, T>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F, T> {
        // Token checked from the cache, or no token: the inner call.
        Inner { #[pin] fut: F },
        Refused { res: Option<T> },
        // Waiting for keys: the check, then the inner call.
        Fetching { fut: BoxFuture<T> },
    }
}

// === impl EntraConfig ===

impl EntraConfig {
    /// Tokens of `tenant` (its id, a GUID) for any of `audiences`, issued by the tenant's v1
    /// (`https://sts.windows.net/{tenant}/`) or v2 (`https://login.microsoftonline.com/{tenant}/v2.0`)
    /// issuer, with keys from `https://login.microsoftonline.com`, a 5-minute clock skew, and at
    /// most one unknown-`kid` refresh per 5 minutes.
    pub fn new<A: Into<String>>(tenant: &str, audiences: impl IntoIterator<Item = A>) -> Self {
        Self {
            tenant: tenant.to_ascii_lowercase(),
            audiences: audiences.into_iter().map(Into::into).collect(),
            issuers: [
                format!("https://sts.windows.net/{tenant}/"),
                format!("https://login.microsoftonline.com/{tenant}/v2.0"),
            ]
            .into(),
            discovery_url: discovery_url("https://login.microsoftonline.com", tenant),
            clock_skew: Duration::from_secs(300),
            key_refresh_min: Duration::from_secs(300),
        }
    }

    /// Reads OpenID discovery from `{authority}/{tenant}/v2.0/.well-known/openid-configuration`
    /// (a sovereign cloud's login host, or a test's issuer).
    pub fn authority(mut self, authority: &str) -> Self {
        self.discovery_url = discovery_url(authority, &self.tenant);
        self
    }

    /// Accepts exactly these `iss` values instead of the tenant's v1 and v2 issuers.
    pub fn issuers<I: Into<String>>(mut self, issuers: impl IntoIterator<Item = I>) -> Self {
        self.issuers = issuers.into_iter().map(Into::into).collect();
        self
    }

    /// Clock skew allowed on `exp` and `nbf` (whole seconds).
    pub fn clock_skew(mut self, skew: Duration) -> Self {
        self.clock_skew = skew;
        self
    }

    /// Least time between two refreshes caused by an unknown `kid`.
    pub fn key_refresh_min(mut self, interval: Duration) -> Self {
        self.key_refresh_min = interval;
        self
    }
}

fn discovery_url(authority: &str, tenant: &str) -> String {
    format!(
        "{}/{tenant}/v2.0/.well-known/openid-configuration",
        authority.trim_end_matches('/')
    )
}

// === impl EntraValidator ===

impl EntraValidator {
    /// A validator for `config`. It fetches nothing until the first token.
    pub fn new(config: EntraConfig) -> Self {
        let http = reqwest::Client::builder()
            .timeout(FETCH_TIMEOUT)
            .build()
            .unwrap_or_default();
        let mut validation = Validation::new(Algorithm::RS256);
        validation.leeway = config.clock_skew.as_secs();
        validation.validate_nbf = true;
        validation.required_spec_claims = ["exp", "aud"].map(String::from).into();
        validation.aud = Some(config.audiences.clone());
        Self {
            config,
            validation,
            http,
            keys: RwLock::new(Keys::default()),
            refresh: tokio::sync::Mutex::new(RefreshState::default()),
        }
    }

    /// Checks `token`, fetching the signing keys first when its `kid` is not cached (and a fetch
    /// is allowed).
    pub async fn validate(self: &Arc<Self>, token: &str) -> Result<TokenIdentity, TokenError> {
        let seen = self.read_keys().generation;
        if let Cached::Checked(result) = self.check_cached(token) {
            return result;
        }
        self.refresh_keys(seen).await?;
        match self.check_cached(token) {
            Cached::Checked(result) => result,
            Cached::NeedKeys => Err(TokenError::UnknownSigningKey),
        }
    }

    /// Checks `token` with the cached keys, without I/O.
    fn check_cached(self: &Arc<Self>, token: &str) -> Cached {
        let header = match jsonwebtoken::decode_header(token) {
            Ok(header) => header,
            Err(_) => return Cached::Checked(Err(TokenError::Malformed("not a JWT".into()))),
        };
        if header.alg != Algorithm::RS256 {
            return Cached::Checked(Err(TokenError::UnsupportedAlgorithm));
        }
        let Some(kid) = header.kid else {
            return Cached::Checked(Err(TokenError::Malformed("no `kid` in its header".into())));
        };
        let (result, stale) = {
            let keys = self.read_keys();
            let Some(key) = keys.by_kid.get(&kid) else {
                return Cached::NeedKeys;
            };
            let stale = keys.fetched.is_some_and(|at| at.elapsed() > KEYS_MAX_AGE);
            (self.check_with(token, key), stale)
        };
        if stale {
            let validator = self.clone();
            tokio::spawn(async move {
                // `try_lock`: a refresh already running will do.
                if let Ok(mut state) = validator.refresh.try_lock() {
                    let _ = validator.fetch_into(&mut state).await;
                }
            });
        }
        Cached::Checked(result)
    }

    fn read_keys(&self) -> std::sync::RwLockReadGuard<'_, Keys> {
        // A panic while holding the lock cannot leave the map half-written: it is replaced whole.
        match self.keys.read() {
            Ok(keys) => keys,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    fn check_with(&self, token: &str, key: &DecodingKey) -> Result<TokenIdentity, TokenError> {
        let claims = jsonwebtoken::decode::<Claims>(token, key, &self.validation)
            .map_err(|e| match e.kind() {
                ErrorKind::InvalidSignature => TokenError::BadSignature,
                ErrorKind::ExpiredSignature => TokenError::Expired,
                ErrorKind::ImmatureSignature => TokenError::NotYetValid,
                ErrorKind::InvalidAudience => TokenError::WrongAudience,
                ErrorKind::InvalidAlgorithm => TokenError::UnsupportedAlgorithm,
                ErrorKind::MissingRequiredClaim(claim) => {
                    TokenError::Malformed(format!("no `{claim}` claim"))
                }
                ErrorKind::InvalidClaimFormat(claim) => {
                    TokenError::Malformed(format!("its `{claim}` claim is malformed"))
                }
                _ => TokenError::Malformed("not a JWT".into()),
            })?
            .claims;
        if !claims
            .tid
            .as_deref()
            .is_some_and(|tid| tid.eq_ignore_ascii_case(&self.config.tenant))
        {
            return Err(TokenError::ForeignTenant);
        }
        if !claims
            .iss
            .as_deref()
            .is_some_and(|iss| self.config.issuers.contains(iss))
        {
            return Err(TokenError::WrongIssuer);
        }
        let identity = TokenIdentity {
            app_id: claims.appid.or(claims.azp).map(Arc::from),
            object_id: claims.oid.map(Arc::from),
        };
        if identity.app_id.is_none() && identity.object_id.is_none() {
            return Err(TokenError::NoIdentity);
        }
        Ok(identity)
    }

    /// Fetches the keys when allowed: always until a first success (after a short back-off on
    /// failure), then at most once per `key_refresh_min`. Waiters share the fetch in progress.
    async fn refresh_keys(&self, seen: u64) -> Result<(), TokenError> {
        let mut state = self.refresh.lock().await;
        if self.read_keys().generation != seen {
            // Another request fetched while this one waited: check against those keys.
            return Ok(());
        }
        if state.not_before.is_some_and(|t| Instant::now() < t) {
            // Fetched (or failed) a moment ago, maybe for this very request's kid.
            return if state.loaded {
                Ok(())
            } else {
                Err(TokenError::KeysUnavailable)
            };
        }
        self.fetch_into(&mut state).await
    }

    async fn fetch_into(&self, state: &mut RefreshState) -> Result<(), TokenError> {
        match self.fetch().await {
            Ok(by_kid) => {
                tracing::info!(keys = by_kid.len(), "Entra ID signing keys fetched");
                let mut keys = match self.keys.write() {
                    Ok(keys) => keys,
                    Err(poisoned) => poisoned.into_inner(),
                };
                let generation = keys.generation + 1;
                *keys = Keys {
                    by_kid,
                    fetched: Some(Instant::now()),
                    generation,
                };
                // The first load is not a refresh: the first unknown kid after it may look again.
                state.not_before = state
                    .loaded
                    .then(|| Instant::now() + self.config.key_refresh_min);
                state.loaded = true;
                Ok(())
            }
            Err(err) => {
                // The discovery URL is configuration, not a secret; the tenant's keys are public.
                tracing::warn!(url = %self.config.discovery_url, "cannot fetch Entra ID signing keys: {err}");
                state.not_before = Some(Instant::now() + FAILED_FETCH_BACKOFF);
                if state.loaded {
                    // The cached keys still serve the tokens they sign.
                    Ok(())
                } else {
                    Err(TokenError::KeysUnavailable)
                }
            }
        }
    }

    async fn fetch(&self) -> Result<HashMap<String, DecodingKey>, String> {
        let get = |url: String| async move {
            let res = self
                .http
                .get(&url)
                .send()
                .await
                .map_err(|e| format!("{url}: {e}"))?;
            if !res.status().is_success() {
                return Err(format!("{url}: status {}", res.status()));
            }
            res.bytes().await.map_err(|e| format!("{url}: {e}"))
        };
        let body = get(self.config.discovery_url.clone()).await?;
        let discovery: Discovery = serde_json::from_slice(&body)
            .map_err(|e| format!("the discovery document has no `jwks_uri`: {e}"))?;
        let body = get(discovery.jwks_uri).await?;
        let set: JwkSet =
            serde_json::from_slice(&body).map_err(|e| format!("not a JSON Web Key Set: {e}"))?;
        let mut by_kid = HashMap::new();
        for jwk in &set.keys {
            let signing = !matches!(
                jwk.common.public_key_use,
                Some(PublicKeyUse::Encryption | PublicKeyUse::Other(_))
            );
            let rsa = matches!(jwk.algorithm, AlgorithmParameters::RSA(_));
            if let (true, true, Some(kid)) = (signing, rsa, &jwk.common.key_id) {
                if let Ok(key) = DecodingKey::from_jwk(jwk) {
                    by_kid.insert(kid.clone(), key);
                }
            }
        }
        if by_kid.is_empty() {
            return Err("the key set holds no RSA signing key".into());
        }
        Ok(by_kid)
    }
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keys")
            .field("kids", &self.by_kid.keys().collect::<Vec<_>>())
            .field("fetched", &self.fetched)
            .finish()
    }
}

// === impl TokenError ===

impl TokenError {
    /// The status answered: 401, or 503 when the gateway cannot check tokens at all.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::KeysUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::UNAUTHORIZED,
        }
    }

    /// What the client is told (it never contains the token).
    pub fn message(&self) -> String {
        let why = match self {
            Self::Malformed(what) => format!("the bearer token is malformed: {what}"),
            Self::UnsupportedAlgorithm => "the token is not signed with RS256".into(),
            Self::Expired => "the token has expired".into(),
            Self::NotYetValid => "the token is not valid yet (nbf)".into(),
            Self::WrongAudience => {
                "the token's audience (aud) is not accepted by this gateway".into()
            }
            Self::ForeignTenant => "the token was issued for another tenant".into(),
            Self::WrongIssuer => "the token's issuer (iss) is not accepted by this gateway".into(),
            Self::BadSignature => "the token's signature is invalid".into(),
            Self::UnknownSigningKey => "the token is signed with an unknown key (kid)".into(),
            Self::NoIdentity => "the token names no application (appid/azp) or object (oid)".into(),
            Self::KeysUnavailable => {
                return "The gateway cannot check Entra ID tokens right now: its signing keys are unavailable. Please retry later.".into();
            }
        };
        format!("Access denied: {why}.")
    }
}

impl std::fmt::Display for TokenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message())
    }
}

impl std::error::Error for TokenError {}

// === impl EntraAuthLayer ===

impl EntraAuthLayer {
    /// Verifies bearer tokens with `validator`.
    pub fn new(validator: Arc<EntraValidator>) -> Self {
        Self { validator }
    }
}

impl<S> Layer<S> for EntraAuthLayer {
    type Service = EntraAuth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        EntraAuth {
            inner,
            validator: self.validator.clone(),
        }
    }
}

// === impl EntraAuth ===

impl<S> EntraAuth<S> {
    /// An [`EntraAuthLayer`] verifying with `validator`.
    pub fn layer(validator: Arc<EntraValidator>) -> EntraAuthLayer {
        EntraAuthLayer::new(validator)
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, ReqB, ResB> Service<Request<ReqB>> for EntraAuth<S>
where
    S: Service<Request<ReqB>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Send,
    ReqB: Send + 'static,
    ResB: From<Bytes> + Send + 'static,
{
    type Response = Response<ResB>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, Result<Response<ResB>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqB>) -> Self::Future {
        let Some(token) = bearer_jwt(req.headers()) else {
            return ResponseFuture::new(State::Inner {
                fut: self.inner.call(req),
            });
        };
        match self.validator.check_cached(token) {
            Cached::Checked(Ok(identity)) => {
                req.extensions_mut().insert(identity);
                ResponseFuture::new(State::Inner {
                    fut: self.inner.call(req),
                })
            }
            Cached::Checked(Err(error)) => ResponseFuture::new(State::Refused {
                res: Some(Ok(refuse(&error, req.uri().path()))),
            }),
            Cached::NeedKeys => {
                let token = token.to_owned();
                let validator = self.validator.clone();
                // The service made ready is the one that will be called; a clone stays behind.
                let clone = self.inner.clone();
                let inner = std::mem::replace(&mut self.inner, clone);
                ResponseFuture::new(State::Fetching {
                    fut: Box::pin(async move {
                        match validator.validate(&token).await {
                            Ok(identity) => {
                                req.extensions_mut().insert(identity);
                                inner.oneshot(req).await
                            }
                            Err(error) => Ok(refuse(&error, req.uri().path())),
                        }
                    }),
                })
            }
        }
    }
}

fn refuse<B: From<Bytes>>(error: &TokenError, path: &str) -> Response<B> {
    tracing::info!(path, "rejected: Entra ID token: {error}");
    let code = match error.status() {
        StatusCode::UNAUTHORIZED => "401",
        _ => "ServiceUnavailable",
    };
    azure_error(error.status(), code, &error.message())
}

/// The bearer value when it looks like a JWT and no `api-key` is sent: a key never does.
fn bearer_jwt(headers: &HeaderMap) -> Option<&str> {
    if headers.contains_key("api-key") {
        return None;
    }
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let scheme = value.get(..7)?;
    let token = value[7..].trim();
    let jwt = scheme.eq_ignore_ascii_case("bearer ")
        && token.starts_with("eyJ")
        && token.bytes().filter(|b| *b == b'.').count() == 2;
    jwt.then_some(token)
}

// === impl ResponseFuture ===

impl<F, T> ResponseFuture<F, T> {
    fn new(state: State<F, T>) -> Self {
        Self { state }
    }
}

impl<F, T> Future for ResponseFuture<F, T>
where
    F: Future<Output = T>,
{
    type Output = T;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        match self.project().state.project() {
            StateProj::Inner { fut } => fut.poll(cx),
            StateProj::Refused { res } => match res.take() {
                Some(res) => Poll::Ready(res),
                None => Poll::Pending,
            },
            StateProj::Fetching { fut } => Poll::Ready(ready!(fut.as_mut().poll(cx))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn only_jwt_shaped_bearers_are_taken() {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer eyJhbGciOi.eyJ0aWQiOi.c2ln"),
        );
        assert_eq!(bearer_jwt(&h), Some("eyJhbGciOi.eyJ0aWQiOi.c2ln"));
        // An api-key decides: the client authenticates with its key.
        h.insert("api-key", HeaderValue::from_static("k"));
        assert_eq!(bearer_jwt(&h), None);
        for key in ["Bearer s3cret", "Bearer eyJ.only-one-dot", "Basic eyJa.b.c"] {
            let mut h = HeaderMap::new();
            h.insert(header::AUTHORIZATION, HeaderValue::from_static(key));
            assert_eq!(bearer_jwt(&h), None, "{key}");
        }
    }

    #[test]
    fn messages_say_what_was_wrong_and_statuses_fit() {
        assert_eq!(
            TokenError::Expired.message(),
            "Access denied: the token has expired."
        );
        assert!(
            TokenError::ForeignTenant
                .message()
                .contains("another tenant")
        );
        assert_eq!(TokenError::WrongAudience.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(
            TokenError::KeysUnavailable.status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }
}
