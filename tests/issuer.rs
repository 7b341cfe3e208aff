//! An Entra ID stand-in on 127.0.0.1: OpenID discovery and a JSON Web Key Set for a tenant, RSA keys
//! made in the test, and RS256 tokens signed with them (built by hand, not by the gateway's JWT
//! library, so the two are checked against each other). Counts key-set fetches.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::rsa::{KeyPair, KeySize};
use aws_lc_rs::signature::{KeyPair as _, RSA_PKCS1_SHA256};
use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};

/// The tenant the test gateways accept.
pub const TENANT: &str = "7a3c1d2e-0000-4000-8000-0000000000aa";
/// Another tenant.
pub const OTHER_TENANT: &str = "0b0b0b0b-0000-4000-8000-0000000000bb";
/// The audience the test gateways accept.
pub const AUDIENCE: &str = "api://aoai-gateway";

/// A running issuer.
pub struct Issuer {
    addr: SocketAddr,
    state: Arc<IssuerState>,
    /// Signs tokens whose `kid` it does not publish.
    unpublished: Arc<KeyPair>,
}

struct IssuerState {
    keys: Mutex<Vec<(String, Arc<KeyPair>)>>,
    fetches: AtomicU64,
    addr: Mutex<Option<SocketAddr>>,
}

impl Issuer {
    /// Starts an issuer publishing one key, `kid-1`.
    pub async fn start() -> Self {
        let state = Arc::new(IssuerState {
            keys: Mutex::new(vec![("kid-1".into(), Arc::new(rsa_key()))]),
            fetches: AtomicU64::new(0),
            addr: Mutex::new(None),
        });
        let app = Router::new()
            .route(
                "/{tenant}/v2.0/.well-known/openid-configuration",
                get(discovery),
            )
            .route("/{tenant}/discovery/v2.0/keys", get(jwks))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        *state.addr.lock().unwrap() = Some(addr);
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self {
            addr,
            state,
            unpublished: Arc::new(rsa_key()),
        }
    }

    /// `authority` for `[gateway.entra]`.
    pub fn authority(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The `[gateway.entra]` table accepting [`TENANT`]'s tokens for [`AUDIENCE`] from this issuer.
    pub fn entra_toml(&self) -> String {
        format!(
            "[gateway.entra]\ntenant = \"{TENANT}\"\naudiences = [\"{AUDIENCE}\"]\nauthority = \"{}\"\n",
            self.authority()
        )
    }

    /// Publishes another key.
    pub fn add_key(&self, kid: &str) {
        self.state
            .keys
            .lock()
            .unwrap()
            .push((kid.into(), Arc::new(rsa_key())));
    }

    /// How many times the key set was fetched.
    pub fn jwks_fetches(&self) -> u64 {
        self.state.fetches.load(Ordering::SeqCst)
    }

    /// Valid v2 claims of [`TENANT`] for [`AUDIENCE`]: `azp` is `app_id`, `oid` is `object_id`,
    /// valid from a minute ago for an hour.
    pub fn claims(app_id: &str, object_id: &str) -> Value {
        let now = now();
        json!({
            "aud": AUDIENCE,
            "iss": format!("https://login.microsoftonline.com/{TENANT}/v2.0"),
            "tid": TENANT,
            "azp": app_id,
            "oid": object_id,
            "iat": now - 60,
            "nbf": now - 60,
            "exp": now + 3600,
            "ver": "2.0",
        })
    }

    /// A token with `claims`, signed with the published key `kid`, or with a key this issuer does
    /// not publish when it has no such key.
    pub fn token(&self, kid: &str, claims: &Value) -> String {
        let key = self
            .state
            .keys
            .lock()
            .unwrap()
            .iter()
            .find(|(k, _)| k == kid)
            .map(|(_, key)| key.clone())
            .unwrap_or_else(|| self.unpublished.clone());
        sign(&key, kid, claims)
    }

    /// A token naming the published `kid` but signed with another key.
    pub fn forged(&self, kid: &str, claims: &Value) -> String {
        sign(&self.unpublished, kid, claims)
    }
}

/// Seconds since the epoch.
pub fn now() -> i64 {
    i64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs(),
    )
    .unwrap()
}

fn rsa_key() -> KeyPair {
    KeyPair::generate(KeySize::Rsa2048).unwrap()
}

fn sign(key: &KeyPair, kid: &str, claims: &Value) -> String {
    let header = json!({"alg": "RS256", "typ": "JWT", "kid": kid});
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let mut signature = vec![0; key.public_modulus_len()];
    key.sign(
        &RSA_PKCS1_SHA256,
        &SystemRandom::new(),
        input.as_bytes(),
        &mut signature,
    )
    .unwrap();
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(signature))
}

async fn discovery(
    State(state): State<Arc<IssuerState>>,
    axum::extract::Path(tenant): axum::extract::Path<String>,
) -> Json<Value> {
    let addr = state.addr.lock().unwrap().unwrap();
    Json(json!({
        "issuer": format!("https://login.microsoftonline.com/{tenant}/v2.0"),
        "jwks_uri": format!("http://{addr}/{tenant}/discovery/v2.0/keys"),
        "id_token_signing_alg_values_supported": ["RS256"],
    }))
}

async fn jwks(State(state): State<Arc<IssuerState>>) -> Json<Value> {
    state.fetches.fetch_add(1, Ordering::SeqCst);
    let keys: Vec<Value> = state
        .keys
        .lock()
        .unwrap()
        .iter()
        .map(|(kid, key)| {
            let public = key.public_key();
            json!({
                "kty": "RSA",
                "use": "sig",
                "kid": kid,
                "n": URL_SAFE_NO_PAD.encode(public.modulus().big_endian_without_leading_zero()),
                "e": URL_SAFE_NO_PAD.encode(public.exponent().big_endian_without_leading_zero()),
            })
        })
        .collect();
    Json(json!({ "keys": keys }))
}
