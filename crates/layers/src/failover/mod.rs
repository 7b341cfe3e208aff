//! Failover across Azure OpenAI backends.
//!
//! [`FailoverLayer`] turns one client request into one or more upstream attempts. Each attempt is a new
//! request built from the captured [`RequestContext`](crate::context::RequestContext) (API Management's
//! `send-request mode="new"`): the backend's URL, its own deployment name (in the path, or in `model` on
//! v1 and Responses calls), its credential, the request headers that reached this layer, the same body.
//!
//! - Backends are chosen by the shared [`BackendPool`]: lowest priority group first, weighted inside a
//!   group, skipping backends that cool down after a throttle or whose circuit is open.
//! - An attempt fails over at once, with no sleep, on 429, 401/403, the configured statuses (408, 500,
//!   502, 503, 504 by default), a connection error, or no response headers within the header timeout.
//!   A 404 `DeploymentNotFound` takes the backend out for that deployment and tries the next. 400 (such
//!   as `content_filter`) and other answers pass through untouched. That decision is a
//!   [`FailoverPolicy`]: [`AzurePolicy`] by default, replaceable with [`FailoverLayer::policy`].
//! - The decision is made on status and headers, before any byte reaches the client; the body then
//!   streams through without buffering. A body that breaks mid-way is logged (it does not count
//!   against the backend's circuit) and a Server-Sent Events stream ends with an `event: error` frame and no `[DONE]`.
//! - When no backend is left and some were throttled, the answer is a 429 with `retry-after` and
//!   `retry-after-ms` set to the shortest remaining cooldown and `x-gateway-throttled: true`; otherwise
//!   502, 503 or 504 with the cause, in Azure's error shape. Never a hang: an attempt budget and an
//!   overall deadline bound the work.
//!
//! The layer replays the body captured by [`RequestContextLayer`](crate::RequestContextLayer), which
//! must wrap it (one owner of the body): without a [`RequestContext`](crate::context::RequestContext)
//! in the request extensions it answers 500 `InternalServerError`, and logs why once.
//!
//! The [`FailoverReport`] of the request (who served, every attempt) goes to its
//! [`Record`](crate::record::Record); a backend's response carries a [`ServedBy`] extension. From
//! these the context layer writes `x-served-by` (`name (region)` of the backend that answered, or
//! `gateway` when the gateway made the answer) and `x-gateway-attempts` on every response: one
//! writer for both.
//!
//! Deadlines, timeouts and cooldowns are read from tokio's clock, so they follow
//! `tokio::time::pause` and `advance` in tests.
//!
//! # Example
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//! use axum::{Router, body::Body};
//! use gateway_core::pool::{Backend, BackendPool, PoolSettings};
//! use gateway_layers::{FailoverLayer, RequestContextLayer, client::ReqwestClient};
//! use simulator::{DeploymentConfig, RegionConfig};
//! use tower::ServiceBuilder;
//!
//! # #[tokio::main]
//! # async fn main() {
//! // One simulated Azure OpenAI region that serves `gpt-4o` as `gpt-4o-east`.
//! let region = simulator::spawn(
//!     RegionConfig::new("East US", "backend-key").deployment(DeploymentConfig::chat("gpt-4o-east", 100_000)),
//!     "127.0.0.1:0".parse().unwrap(),
//! )
//! .await
//! .unwrap();
//! let backend = Backend {
//!     name: "east".into(),
//!     region: "East US".into(),
//!     endpoint: region.url(),
//!     priority: 1,
//!     weight: 1,
//!     deployments: [("gpt-4o".to_string(), "gpt-4o-east".to_string())].into(),
//!     credential: Some(gateway_core::secret::Credential::ApiKey(gateway_core::secret::Secret::new("backend-key"))),
//! };
//! let pool = Arc::new(BackendPool::new(vec![backend], PoolSettings::default()));
//! let proxy = ServiceBuilder::new()
//!     // Captures the replayable body the failover layer sends on every attempt.
//!     .layer(RequestContextLayer::new(4 << 20))
//!     .layer(
//!         FailoverLayer::new(pool)
//!             .max_attempts(3)
//!             .deadline(Duration::from_secs(60))
//!             .response_header_timeout(Duration::from_secs(10))
//!             .on_status([408, 429, 500, 502, 503, 504]),
//!     )
//!     .service(ReqwestClient::new());
//! let app = Router::new().route_service("/openai/{*path}", proxy);
//!
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
//! let addr = listener.local_addr().unwrap();
//! tokio::spawn(async move { axum::serve(listener, app).await });
//!
//! let res = reqwest::Client::new()
//!     .post(format!("http://{addr}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"))
//!     .body(r#"{"messages":[{"role":"user","content":"Hello"}]}"#)
//!     .send()
//!     .await
//!     .unwrap();
//! assert_eq!(res.status(), 200);
//! assert_eq!(res.headers()["x-served-by"], "east (East US)");
//! assert_eq!(res.headers()["x-gateway-attempts"], "1");
//! # }
//! ```
//!
//! [`BackendPool`]: gateway_core::pool::BackendPool

mod body;
mod flex;
mod layer;
mod policy;
mod service;

use std::sync::Arc;
use std::time::Duration;

use gateway_core::pool::BackendId;
use gateway_core::secret::{Credential, CredentialKind, LiveCredential, Secret};
use http::{HeaderName, HeaderValue};

use self::layer::Shared;

pub use body::FailoverBody;
pub use flex::FlexFallback;
pub use layer::{CooldownHook, FailoverLayer};
pub use policy::{AzurePolicy, DEFAULT_ON_STATUS, Decision, FailoverPolicy};
pub use service::{Failover, FailoverFuture};

/// In the extensions of a response a backend made: its `name (region)`, the value of `x-served-by`.
/// An answer that replaces it (the gateway's own error) does not carry it.
#[derive(Clone, Debug)]
pub struct ServedBy(pub HeaderValue);

/// What happened to one upstream attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttemptOutcome {
    /// A response that was passed to the client.
    Served,
    /// 429 from the backend.
    Throttled,
    /// 401 or 403 from the backend.
    AuthFailure,
    /// A status the policy fails over on that is neither a throttle nor an auth failure: by default
    /// 408 and the 5xx of [`AzurePolicy::on_status`].
    ServerError,
    /// 404 `DeploymentNotFound`.
    DeploymentNotFound,
    /// No response headers within the header timeout or the deadline.
    Timeout,
    /// The connection failed.
    ConnectError,
}

/// One upstream attempt, for logs, metrics and traces.
#[derive(Clone, Debug)]
pub struct Attempt {
    /// The backend tried.
    pub backend: BackendId,
    /// Its name.
    pub backend_name: Arc<str>,
    /// The status it answered, if it answered.
    pub status: Option<u16>,
    /// What the layer made of it.
    pub outcome: AttemptOutcome,
    /// Time until response headers (or failure).
    pub elapsed: Duration,
}

/// Which backend served and every attempt made: in the request's [`Record`](crate::record::Record),
/// or in the response extensions when there is none.
#[derive(Clone, Debug, Default)]
pub struct FailoverReport {
    /// The backend whose response was returned, if any.
    pub served_by: Option<BackendId>,
    /// Every attempt in order.
    pub attempts: Vec<Attempt>,
}

/// What an attempt needs of a backend, computed once rather than per request.
#[derive(Clone, Debug)]
struct Upstream {
    base: String,
    /// `base` parsed once, when it is a bare origin (no path, query or fragment): each attempt's URL
    /// is then this with its path and query set, not the whole string parsed again.
    origin: Option<reqwest::Url>,
    credential: UpstreamCredential,
    served_by: HeaderValue,
    name: Arc<str>,
}

/// A backend's credential header: built once when it never changes, read per attempt when it is
/// renewed while the gateway runs.
#[derive(Clone, Debug)]
enum UpstreamCredential {
    None,
    Fixed(HeaderName, HeaderValue),
    Live(LiveCredential),
}

// === impl AttemptOutcome ===

impl AttemptOutcome {
    /// A short, stable name for logs and metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            AttemptOutcome::Served => "served",
            AttemptOutcome::Throttled => "throttled",
            AttemptOutcome::AuthFailure => "auth_failure",
            AttemptOutcome::ServerError => "server_error",
            AttemptOutcome::DeploymentNotFound => "deployment_not_found",
            AttemptOutcome::Timeout => "timeout",
            AttemptOutcome::ConnectError => "connect_error",
        }
    }
}

// === impl Upstream ===

impl Upstream {
    fn new(b: &gateway_core::pool::Backend) -> Self {
        let credential = match &b.credential {
            None => UpstreamCredential::None,
            Some(Credential::Live(live)) => UpstreamCredential::Live(live.clone()),
            Some(fixed) => fixed
                .current()
                .and_then(|secret| credential_header(fixed.kind(), &secret))
                .map_or(UpstreamCredential::None, |(name, value)| {
                    UpstreamCredential::Fixed(name, value)
                }),
        };
        let served_by = HeaderValue::from_str(&format!("{} ({})", b.name, b.region))
            .unwrap_or_else(|_| HeaderValue::from_static("backend"));
        let base = b.endpoint.trim_end_matches('/').to_owned();
        let origin = reqwest::Url::parse(&base).ok().filter(|u| {
            !u.cannot_be_a_base()
                && u.path() == "/"
                && u.query().is_none()
                && u.fragment().is_none()
        });
        Self {
            base,
            origin,
            credential,
            served_by,
            name: Arc::from(b.name.as_str()),
        }
    }
}

// === impl UpstreamCredential ===

impl UpstreamCredential {
    /// The header to send now. `Err` when a live credential has no value: the backend cannot be
    /// called, just as if it had refused the gateway's credential.
    fn header(&self) -> Result<Option<(HeaderName, HeaderValue)>, ()> {
        match self {
            Self::None => Ok(None),
            Self::Fixed(name, value) => Ok(Some((name.clone(), value.clone()))),
            Self::Live(live) => live
                .current()
                .and_then(|secret| credential_header(live.kind(), &secret))
                .map(Some)
                .ok_or(()),
        }
    }
}

/// `api-key: value` or `authorization: Bearer value`, marked sensitive so that no debug output of
/// the request shows it; `None` when the value cannot be a header.
fn credential_header(kind: CredentialKind, secret: &Secret) -> Option<(HeaderName, HeaderValue)> {
    let (name, value) = match kind {
        CredentialKind::ApiKey => (
            HeaderName::from_static("api-key"),
            HeaderValue::from_str(secret.expose()),
        ),
        CredentialKind::Bearer => (
            http::header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {}", secret.expose())),
        ),
    };
    let mut value = value.ok()?;
    value.set_sensitive(true);
    Some((name, value))
}
