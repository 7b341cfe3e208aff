//! Client authentication: API keys that identify named consumers.
//!
//! Clients present their key as Azure's SDKs do, in `api-key` or `Authorization: Bearer`.
//! [`ConsumerAuthLayer`] answers 401 in Azure's shape for a missing or unknown key (the same answer for
//! both, so keys cannot be probed), compares keys in constant time, answers 403 when the consumer may not
//! call the requested deployment, and stores the [`Consumer`] in the request extensions (and its name
//! in the request's [`Record`], for observers).
//!
//! A consumer may also be identified by a verified token: when a layer above (the `entra` module's
//! `EntraAuthLayer`) has put a [`TokenIdentity`] in the request extensions, its application id or
//! object id is looked up instead of a key (see [`ConsumerKeys::token_ids`]). One consumer may have
//! both keys and token ids, so applications can move from keys to tokens one at a time.
//!
//! # Example
//!
//! ```
//! use std::sync::Arc;
//! use axum::{Extension, Router, body::Body, routing::post};
//! use gateway_layers::auth::{Consumer, ConsumerAuthLayer, ConsumerKeys};
//! use tower::ServiceExt;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let keys = ConsumerKeys::new().consumer("billing-app", ["s3cret"], None);
//! let app = Router::new()
//!     .route("/openai/v1/chat/completions", post(|Extension(c): Extension<Consumer>| async move { c.name.to_string() }))
//!     .layer(ConsumerAuthLayer::new(Arc::new(keys)));
//!
//! let call = |key: &'static str| {
//!     http::Request::post("/openai/v1/chat/completions").header("api-key", key).body(Body::empty()).unwrap()
//! };
//! let ok = app.clone().oneshot(call("s3cret")).await.unwrap();
//! assert_eq!(ok.status(), 200);
//! let denied = app.oneshot(call("guess")).await.unwrap();
//! assert_eq!(denied.status(), 401);
//! # }
//! ```

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::future::{Ready, ready};
use std::hash::BuildHasher;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::future::Either;
use http::{HeaderMap, Request, Response, StatusCode, header};
use tower::{Layer, Service};

use crate::context::RequestContext;
use crate::error::azure_error;
use crate::record::Record;

/// The authenticated caller, stored in request extensions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Consumer {
    /// The consumer's name from the policy.
    pub name: Arc<str>,
}

/// Who a verified token says the caller is (Entra ID's `appid`/`azp` and `oid`), put in the request
/// extensions by the layer that verified it. [`ConsumerAuthLayer`] maps it to a consumer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenIdentity {
    /// The client application id (`appid` in v1 tokens, `azp` in v2 tokens).
    pub app_id: Option<Arc<str>>,
    /// The object id of the caller (`oid`): a service principal, a managed identity or a user.
    pub object_id: Option<Arc<str>>,
}

/// The consumers the gateway knows and the keys each may present.
///
/// Lookups cost the same for 10 consumers or 100,000: keys are indexed by their hash under a key
/// drawn at random per process (SipHash), so the time a lookup takes tells nothing about the keys
/// held; the few candidates a hash finds are then compared in constant time.
#[derive(Clone, Default)]
pub struct ConsumerKeys {
    entries: Vec<Entry>,
    /// Entry indexes by key hash, in the order the keys were added (the first consumer wins).
    by_key: HashMap<u64, Vec<usize>>,
    /// Entry index by application id and by object id, lowercase (the first consumer wins).
    by_app_id: HashMap<String, usize>,
    by_object_id: HashMap<String, usize>,
    hasher: RandomState,
}

#[derive(Clone)]
struct Entry {
    consumer: Consumer,
    keys: Vec<Box<[u8]>>,
    app_ids: Vec<String>,
    object_ids: Vec<String>,
    deployments: Option<Vec<String>>,
}

/// Layer that authenticates consumers. See the [module docs](self).
#[derive(Clone, Debug)]
pub struct ConsumerAuthLayer {
    keys: Arc<ConsumerKeys>,
}

/// Service produced by [`ConsumerAuthLayer`].
#[derive(Clone, Debug)]
pub struct ConsumerAuth<S> {
    inner: S,
    keys: Arc<ConsumerKeys>,
}

enum Verdict<'a> {
    Allowed(&'a Consumer),
    Unauthenticated,
    /// A verified token whose application and object are no consumer's.
    UnknownApplication(String),
    Forbidden(&'a Consumer, String),
}

// === impl ConsumerKeys ===

impl ConsumerKeys {
    /// No consumers: every request is refused.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a consumer with its keys; `deployments` restricts which logical deployments it may call.
    pub fn consumer<K: AsRef<str>>(
        mut self,
        name: &str,
        keys: impl IntoIterator<Item = K>,
        deployments: Option<Vec<String>>,
    ) -> Self {
        let index = self.entries.len();
        let keys: Vec<Box<[u8]>> = keys
            .into_iter()
            .map(|k| k.as_ref().as_bytes().into())
            .collect();
        for key in &keys {
            let hash = self.hasher.hash_one(&**key);
            self.by_key.entry(hash).or_default().push(index);
        }
        self.entries.push(Entry {
            consumer: Consumer {
                name: Arc::from(name),
            },
            keys,
            app_ids: Vec::new(),
            object_ids: Vec::new(),
            deployments,
        });
        self
    }

    /// Lets consumer `name` (added with [`consumer`](Self::consumer), perhaps with no keys) be
    /// identified by a verified token's application ids or object ids (compared without regard to
    /// case, as GUIDs). Does nothing when no consumer has that name.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use gateway_layers::auth::{ConsumerKeys, TokenIdentity};
    ///
    /// let keys = ConsumerKeys::new()
    ///     .consumer("billing-app", ["s3cret"], None)
    ///     .token_ids("billing-app", ["11111111-2222-3333-4444-555555555555"], [] as [&str; 0]);
    /// let id = TokenIdentity { app_id: Some(Arc::from("11111111-2222-3333-4444-555555555555")), object_id: None };
    /// assert_eq!(&*keys.find_token(&id).unwrap().name, "billing-app");
    /// ```
    pub fn token_ids<A: AsRef<str>, O: AsRef<str>>(
        mut self,
        name: &str,
        app_ids: impl IntoIterator<Item = A>,
        object_ids: impl IntoIterator<Item = O>,
    ) -> Self {
        let Some(index) = self.entries.iter().position(|e| &*e.consumer.name == name) else {
            return self;
        };
        let lower = |s: &str| s.to_ascii_lowercase();
        for id in app_ids.into_iter().map(|a| lower(a.as_ref())) {
            self.by_app_id.entry(id.clone()).or_insert(index);
            self.entries[index].app_ids.push(id);
        }
        for id in object_ids.into_iter().map(|o| lower(o.as_ref())) {
            self.by_object_id.entry(id.clone()).or_insert(index);
            self.entries[index].object_ids.push(id);
        }
        self
    }

    /// The consumer a verified token identifies: by its application id first, else by its object
    /// id.
    pub fn find_token(&self, id: &TokenIdentity) -> Option<&Consumer> {
        self.token_entry(id).map(|i| &self.entries[i].consumer)
    }

    fn token_entry(&self, id: &TokenIdentity) -> Option<usize> {
        let lookup = |index: &HashMap<String, usize>, value: &Option<Arc<str>>| {
            let value = value.as_deref()?;
            // Ids are GUIDs, held lowercase; a token's are usually lowercase already.
            match index.get(value) {
                Some(&i) => Some(i),
                None => index.get(&value.to_ascii_lowercase()).copied(),
            }
        };
        lookup(&self.by_app_id, &id.app_id).or_else(|| lookup(&self.by_object_id, &id.object_id))
    }

    /// The consumer whose key is `presented`, comparing the candidate keys in constant time.
    pub fn find(&self, presented: &[u8]) -> Option<&Consumer> {
        self.key_entry(presented).map(|i| &self.entries[i].consumer)
    }

    fn key_entry(&self, presented: &[u8]) -> Option<usize> {
        let candidates = self.by_key.get(&self.hasher.hash_one(presented))?;
        let mut found = None;
        // No early exit among the candidates: the time taken must not depend on which matched.
        for &index in candidates {
            for key in &self.entries[index].keys {
                if constant_time_eq(key, presented) && found.is_none() {
                    found = Some(index);
                }
            }
        }
        found
    }

    fn verdict(
        &self,
        headers: &HeaderMap,
        token: Option<&TokenIdentity>,
        deployment: Option<&str>,
    ) -> Verdict<'_> {
        let index = match token {
            Some(id) => match self.token_entry(id) {
                Some(index) => index,
                None => return Verdict::UnknownApplication(unknown_application(id)),
            },
            None => {
                let Some(presented) = presented_key(headers) else {
                    return Verdict::Unauthenticated;
                };
                let Some(index) = self.key_entry(presented) else {
                    return Verdict::Unauthenticated;
                };
                index
            }
        };
        let entry = &self.entries[index];
        let consumer = &entry.consumer;
        if let (Some(allowed), Some(d)) = (entry.deployments.as_ref(), deployment) {
            if !allowed.iter().any(|a| a == d) {
                return Verdict::Forbidden(
                    consumer,
                    format!(
                        "Consumer '{}' is not allowed to call deployment '{d}'.",
                        consumer.name
                    ),
                );
            }
        }
        Verdict::Allowed(consumer)
    }
}

impl std::fmt::Debug for ConsumerKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The entries only: the key index holds hashes of keys.
        f.debug_struct("ConsumerKeys")
            .field("entries", &self.entries)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry")
            .field("consumer", &self.consumer)
            .field("keys", &self.keys.len())
            .field("app_ids", &self.app_ids)
            .field("object_ids", &self.object_ids)
            .field("deployments", &self.deployments)
            .finish()
    }
}

// === impl ConsumerAuthLayer ===

impl ConsumerAuthLayer {
    /// Authenticates against `keys`.
    pub fn new(keys: Arc<ConsumerKeys>) -> Self {
        Self { keys }
    }
}

impl<S> Layer<S> for ConsumerAuthLayer {
    type Service = ConsumerAuth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ConsumerAuth {
            inner,
            keys: self.keys.clone(),
        }
    }
}

// === impl ConsumerAuth ===

impl<S> ConsumerAuth<S> {
    /// A [`ConsumerAuthLayer`] authenticating against `keys`.
    pub fn layer(keys: Arc<ConsumerKeys>) -> ConsumerAuthLayer {
        ConsumerAuthLayer::new(keys)
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

impl<S, ReqB, ResB> Service<Request<ReqB>> for ConsumerAuth<S>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
    ResB: From<Bytes>,
{
    type Response = Response<ResB>;
    type Error = S::Error;
    type Future = Either<S::Future, Ready<Result<Response<ResB>, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqB>) -> Self::Future {
        let deployment = req
            .extensions()
            .get::<RequestContext>()
            .and_then(|c| c.deployment.as_deref());
        let token = req.extensions().get::<TokenIdentity>();
        let consumer = match self.keys.verdict(req.headers(), token, deployment) {
            Verdict::Allowed(c) => c.clone(),
            Verdict::UnknownApplication(msg) => {
                tracing::info!(path = req.uri().path(), "rejected: {msg}");
                return Either::Right(ready(Ok(azure_error(
                    StatusCode::UNAUTHORIZED,
                    "401",
                    &msg,
                ))));
            }
            Verdict::Unauthenticated => {
                tracing::info!(path = req.uri().path(), "rejected: missing or unknown key");
                return Either::Right(ready(Ok(azure_error(
                    StatusCode::UNAUTHORIZED,
                    "401",
                    "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a valid key for an active subscription and use a correct regional API endpoint for your resource.",
                ))));
            }
            Verdict::Forbidden(c, msg) => {
                tracing::info!(consumer = %c.name, "rejected: deployment not allowed");
                return Either::Right(ready(Ok(azure_error(
                    StatusCode::FORBIDDEN,
                    "Forbidden",
                    &msg,
                ))));
            }
        };
        if let Some(record) = req.extensions().get::<Arc<Record>>() {
            record.set_consumer(consumer.name.clone());
        }
        req.extensions_mut().insert(consumer);
        Either::Left(self.inner.call(req))
    }
}

/// Names the token's application and object (ids, not secrets) so the caller knows what to map.
fn unknown_application(id: &TokenIdentity) -> String {
    let app = id.app_id.as_deref().unwrap_or("none");
    let object = id.object_id.as_deref().unwrap_or("none");
    format!(
        "Access denied: the token is valid, but its application '{app}' (object '{object}') is not a consumer of this gateway."
    )
}

fn presented_key(headers: &HeaderMap) -> Option<&[u8]> {
    if let Some(v) = headers.get("api-key") {
        return Some(v.as_bytes());
    }
    let auth = headers.get(header::AUTHORIZATION)?.as_bytes();
    let scheme = auth.get(..7)?;
    scheme
        .eq_ignore_ascii_case(b"bearer ")
        .then(|| auth[7..].trim_ascii())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = u8::from(a.len() != b.len());
    for (i, x) in a.iter().enumerate() {
        diff |= x ^ b.get(i).copied().unwrap_or(!x);
    }
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn keys_and_token_ids_are_found_among_many_consumers_the_first_consumer_winning() {
        let keys = (0..10_000).fold(ConsumerKeys::new(), |keys, i| {
            keys.consumer(&format!("app-{i}"), [format!("key-{i}")], None)
        });
        let keys = keys
            .consumer("shared-1", ["same-key"], None)
            .consumer("shared-2", ["same-key"], None)
            .token_ids(
                "app-7",
                ["AAAAAAAA-2222-3333-4444-555555555555"],
                [] as [&str; 0],
            );
        let name = |c: Option<&Consumer>| c.map(|c| c.name.to_string());
        assert_eq!(name(keys.find(b"key-9999")), Some("app-9999".into()));
        assert_eq!(name(keys.find(b"key-10000")), None);
        assert_eq!(name(keys.find(b"key-999")), Some("app-999".into()));
        assert_eq!(name(keys.find(b"same-key")), Some("shared-1".into()));
        let token = |app: &str| TokenIdentity {
            app_id: Some(Arc::from(app)),
            object_id: None,
        };
        assert_eq!(
            name(keys.find_token(&token("aaaaaaaa-2222-3333-4444-555555555555"))),
            Some("app-7".into())
        );
        assert_eq!(
            name(keys.find_token(&token("AAAAAAAA-2222-3333-4444-555555555555"))),
            Some("app-7".into())
        );
        assert_eq!(
            name(keys.find_token(&token("bbbbbbbb-2222-3333-4444-555555555555"))),
            None
        );
    }

    fn headers(name: &'static str, value: &'static str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(name, HeaderValue::from_static(value));
        h
    }

    #[test]
    fn debug_counts_keys_without_showing_them() {
        let keys = ConsumerKeys::new().consumer("a", ["client-key-8f2e61"], None);
        let shown = format!("{keys:?}");
        assert!(shown.contains("keys: 1"), "{shown}");
        assert!(!shown.contains("client-key-8f2e61"), "{shown}");
        // Nor as the bytes a derived `Debug` of `Box<[u8]>` would print.
        assert!(!shown.contains("99, 108, 105"), "{shown}");
    }

    #[test]
    fn keys_match_only_exactly() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert!(!constant_time_eq(b"ab", b"abc"));
        assert!(!constant_time_eq(b"", b"x"));
    }

    #[test]
    fn bearer_and_api_key_are_both_accepted() {
        let keys = ConsumerKeys::new().consumer("a", ["k1", "k2"], None);
        assert!(matches!(
            keys.verdict(&headers("api-key", "k2"), None, None),
            Verdict::Allowed(_)
        ));
        assert!(matches!(
            keys.verdict(&headers("authorization", "Bearer k1"), None, None),
            Verdict::Allowed(_)
        ));
        assert!(matches!(
            keys.verdict(&headers("authorization", "Basic k1"), None, None),
            Verdict::Unauthenticated
        ));
        assert!(matches!(
            keys.verdict(&HeaderMap::new(), None, None),
            Verdict::Unauthenticated
        ));
    }

    #[test]
    fn tokens_map_by_app_id_then_object_id() {
        let keys = ConsumerKeys::new()
            .consumer("keys-and-token", ["k"], None)
            .token_ids(
                "keys-and-token",
                ["AAAAAAAA-0000-0000-0000-000000000001"],
                [] as [&str; 0],
            )
            .consumer("by-object", [] as [&str; 0], Some(vec!["gpt-4o".into()]))
            .token_ids(
                "by-object",
                [] as [&str; 0],
                ["bbbbbbbb-0000-0000-0000-000000000002"],
            );
        let id = |app: Option<&str>, oid: Option<&str>| TokenIdentity {
            app_id: app.map(Arc::from),
            object_id: oid.map(Arc::from),
        };
        let name = |v: Verdict<'_>| match v {
            Verdict::Allowed(c) => c.name.to_string(),
            Verdict::UnknownApplication(msg) => msg,
            Verdict::Forbidden(_, msg) => msg,
            Verdict::Unauthenticated => "unauthenticated".into(),
        };
        let app = id(
            Some("aaaaaaaa-0000-0000-0000-000000000001"),
            Some("bbbbbbbb-0000-0000-0000-000000000002"),
        );
        // The application id wins over the object id, and GUIDs compare without case.
        assert_eq!(
            name(keys.verdict(&HeaderMap::new(), Some(&app), None)),
            "keys-and-token"
        );
        let managed_identity = id(None, Some("bbbbbbbb-0000-0000-0000-000000000002"));
        assert_eq!(
            name(keys.verdict(&HeaderMap::new(), Some(&managed_identity), None)),
            "by-object"
        );
        // The token ids keep the consumer's deployment restriction.
        assert!(
            name(keys.verdict(&HeaderMap::new(), Some(&managed_identity), Some("o3")))
                .contains("'o3'")
        );
        // The same consumer still accepts its key.
        assert_eq!(
            name(keys.verdict(&headers("api-key", "k"), None, None)),
            "keys-and-token"
        );
        // A verified token decides alone: a key sent with it does not rescue an unknown application.
        let stranger = id(Some("cccccccc-0000-0000-0000-000000000003"), None);
        let msg = name(keys.verdict(&headers("api-key", "k"), Some(&stranger), None));
        assert!(
            msg.contains("application 'cccccccc-0000-0000-0000-000000000003'"),
            "{msg}"
        );
    }

    #[test]
    fn deployment_restriction_gives_forbidden() {
        let keys = ConsumerKeys::new().consumer("a", ["k"], Some(vec!["gpt-4o".into()]));
        let h = headers("api-key", "k");
        assert!(matches!(
            keys.verdict(&h, None, Some("gpt-4o")),
            Verdict::Allowed(_)
        ));
        match keys.verdict(&h, None, Some("o3")) {
            Verdict::Forbidden(c, msg) => {
                assert_eq!(&*c.name, "a");
                assert!(msg.contains("'o3'"));
            }
            _ => panic!("expected forbidden"),
        }
    }
}
