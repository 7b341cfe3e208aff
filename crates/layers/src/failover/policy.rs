//! What an upstream answer means: serve it, fail over, or look at a 404's body first.

use std::sync::Arc;
use std::time::SystemTime;

use gateway_core::pool::Outcome;
use gateway_core::retry_after::cooldown_hint;
use http::{HeaderMap, StatusCode};

use super::AttemptOutcome;

/// Decides, from an upstream answer's status and headers, whether the failover layer serves it or
/// tries the next backend, and what the pool learns about the backend that answered.
///
/// The decision is made before any byte of the body reaches the client, which is what lets the layer
/// fail over at all. [`AzurePolicy`] is the default and follows Azure OpenAI's semantics; replace it with
/// [`FailoverLayer::policy`](super::FailoverLayer::policy), as tower's `retry::Policy` or tower-http's
/// `classify` are replaced.
///
/// # Example
///
/// A team whose backends answer `501` when a model version is being rolled out, and wants that to fail
/// over too; everything else is decided as Azure's default does.
///
/// ```
/// use std::sync::Arc;
/// use bytes::Bytes;
/// use gateway_core::pool::{Backend, BackendPool, Outcome, PoolSettings};
/// use gateway_layers::RequestContextLayer;
/// use gateway_layers::failover::{AttemptOutcome, AzurePolicy, Decision, FailoverLayer, FailoverPolicy};
/// use http::{HeaderMap, Request, Response, StatusCode};
/// use http_body_util::Full;
/// use tower::{ServiceBuilder, ServiceExt, service_fn};
///
/// #[derive(Clone, Debug, Default)]
/// struct RolloutAware(AzurePolicy);
///
/// impl FailoverPolicy for RolloutAware {
///     fn classify(&self, status: StatusCode, headers: &HeaderMap) -> Decision {
///         match status {
///             StatusCode::NOT_IMPLEMENTED => Decision::FailOver {
///                 outcome: Outcome::ServerError { hint: None },
///                 reason: AttemptOutcome::ServerError,
///             },
///             _ => self.0.classify(status, headers),
///         }
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let backend = |name: &str, priority| Backend {
///     name: name.into(),
///     region: "Sweden Central".into(),
///     endpoint: format!("http://{name}.example"),
///     priority,
///     weight: 1,
///     deployments: [("gpt-4o".to_string(), "gpt-4o".to_string())].into(),
///     credential: None,
/// };
/// let pool = Arc::new(BackendPool::new(vec![backend("new", 1), backend("old", 2)], PoolSettings::default()));
/// // Stands in for the HTTP client: the backend being rolled out answers 501.
/// let upstream = service_fn(|req: Request<Full<Bytes>>| async move {
///     let status = match req.uri().host() {
///         Some("new.example") => StatusCode::NOT_IMPLEMENTED,
///         _ => StatusCode::OK,
///     };
///     let mut res = Response::new(Full::new(Bytes::from_static(b"{}")));
///     *res.status_mut() = status;
///     Ok::<_, std::convert::Infallible>(res)
/// });
/// let gateway = ServiceBuilder::new()
///     .layer(RequestContextLayer::new(1 << 20))
///     .layer(FailoverLayer::new(pool).policy(RolloutAware::default()))
///     .service(upstream);
///
/// let req = Request::post("/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21")
///     .body(Full::new(Bytes::from_static(br#"{"messages":[]}"#)))
///     .unwrap();
/// let res = gateway.oneshot(req).await.unwrap();
/// assert_eq!(res.status(), 200);
/// assert_eq!(res.headers()["x-served-by"], "old (Sweden Central)");
/// assert_eq!(res.headers()["x-gateway-attempts"], "2");
/// # }
/// ```
pub trait FailoverPolicy: Clone + Send + Sync + 'static {
    /// What to do with an answer of `status` with these `headers`.
    fn classify(&self, status: StatusCode, headers: &HeaderMap) -> Decision;
}

/// The answer of a [`FailoverPolicy`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Return the answer to the client, body streamed through; the backend counts as healthy
    /// ([`Outcome::Success`]).
    Serve,
    /// Try the next backend.
    FailOver {
        /// What the pool records for the backend: the cooldown (and its hint) or the circuit
        /// breaker failure it causes.
        outcome: Outcome,
        /// How the attempt is reported in the [`FailoverReport`](super::FailoverReport), metrics and
        /// spans; not [`AttemptOutcome::Served`]. A `Throttled` attempt that exhausts the budget makes
        /// the gateway answer 429 itself, an `AuthFailure` one 502; any other answer is returned as it
        /// is when no backend is left.
        reason: AttemptOutcome,
    },
    /// A 404 that fails over only if its body's error code is `DeploymentNotFound` (the backend lacks
    /// the deployment the gateway mapped the request to); any other 404 is served. The layer reads at
    /// most 64 KiB of the body, within the response header timeout, to tell.
    CheckDeploymentNotFound,
}

/// Azure OpenAI's failover semantics, the default [`FailoverPolicy`].
///
/// - `429` fails over and cools the backend down for as long as its `retry-after-ms`,
///   `x-ms-retry-after-ms`, `retry-after` or `x-ratelimit-reset-*` headers say.
/// - `401` and `403` fail over: the backend refused the gateway's credential, which says nothing about
///   the client. The backend cools down too.
/// - `404` is checked for `DeploymentNotFound` ([`Decision::CheckDeploymentNotFound`]).
/// - `408` and the `5xx` in the [`on_status`](Self::on_status) list (by default 500, 502, 503 and
///   504) fail over and count towards the backend's circuit breaker; a `5xx` with a retry hint also
///   cools it down.
/// - Everything else is served, `400` (such as `content_filter`) included.
///
/// ```
/// use gateway_layers::failover::{AzurePolicy, Decision, FailoverPolicy};
/// use http::{HeaderMap, StatusCode};
///
/// let policy = AzurePolicy::default().on_status([429, 503]);
/// let headers = HeaderMap::new();
/// assert!(matches!(policy.classify(StatusCode::SERVICE_UNAVAILABLE, &headers), Decision::FailOver { .. }));
/// assert_eq!(policy.classify(StatusCode::BAD_GATEWAY, &headers), Decision::Serve);
/// assert_eq!(policy.classify(StatusCode::BAD_REQUEST, &headers), Decision::Serve);
/// ```
#[derive(Clone, Debug)]
pub struct AzurePolicy {
    /// Shared, not copied: every request's service clone holds the policy.
    on_status: Arc<[u16]>,
}

/// Statuses that fail over unless configured otherwise (429 always does).
pub const DEFAULT_ON_STATUS: [u16; 6] = [408, 429, 500, 502, 503, 504];

// === impl AzurePolicy ===

impl AzurePolicy {
    /// The statuses that fail over besides 429, 401 and 403. Only `408` and `5xx` are read from the
    /// list: 400 never fails over, 404 is checked for `DeploymentNotFound`. Replaces the default
    /// [`DEFAULT_ON_STATUS`].
    pub fn on_status(self, statuses: impl IntoIterator<Item = u16>) -> Self {
        Self {
            on_status: statuses.into_iter().collect(),
        }
    }

    fn fails_over_on(&self, status: u16) -> bool {
        self.on_status.contains(&status)
    }
}

impl Default for AzurePolicy {
    fn default() -> Self {
        Self {
            on_status: Arc::new(DEFAULT_ON_STATUS),
        }
    }
}

impl FailoverPolicy for AzurePolicy {
    fn classify(&self, status: StatusCode, headers: &HeaderMap) -> Decision {
        let hint = || {
            cooldown_hint(
                |name| headers.get(name).and_then(|v| v.to_str().ok()),
                SystemTime::now(),
            )
        };
        let fail_over = |outcome, reason| Decision::FailOver { outcome, reason };
        match status.as_u16() {
            429 => fail_over(
                Outcome::Throttled { hint: hint() },
                AttemptOutcome::Throttled,
            ),
            401 | 403 => fail_over(
                Outcome::AuthFailure { hint: hint() },
                AttemptOutcome::AuthFailure,
            ),
            404 => Decision::CheckDeploymentNotFound,
            408 if self.fails_over_on(408) => {
                fail_over(Outcome::Timeout, AttemptOutcome::ServerError)
            }
            s if s >= 500 && self.fails_over_on(s) => fail_over(
                Outcome::ServerError { hint: hint() },
                AttemptOutcome::ServerError,
            ),
            _ => Decision::Serve,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decisions_follow_the_failover_list() {
        let azure = AzurePolicy::default();
        let h = HeaderMap::new();
        let classify = |status: u16| {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::IM_A_TEAPOT);
            azure.classify(status, &h)
        };
        assert_eq!(classify(200), Decision::Serve);
        assert_eq!(classify(400), Decision::Serve);
        assert!(matches!(
            classify(429),
            Decision::FailOver {
                outcome: Outcome::Throttled { .. },
                reason: AttemptOutcome::Throttled
            }
        ));
        assert!(matches!(
            classify(401),
            Decision::FailOver {
                outcome: Outcome::AuthFailure { .. },
                ..
            }
        ));
        assert_eq!(classify(404), Decision::CheckDeploymentNotFound);
        assert_eq!(
            classify(408),
            Decision::FailOver {
                outcome: Outcome::Timeout,
                reason: AttemptOutcome::ServerError
            }
        );
        assert!(matches!(
            classify(503),
            Decision::FailOver {
                outcome: Outcome::ServerError { .. },
                ..
            }
        ));
        assert_eq!(classify(501), Decision::Serve);
        let only_429 = AzurePolicy::default().on_status([429]);
        assert_eq!(
            only_429.classify(StatusCode::BAD_GATEWAY, &h),
            Decision::Serve
        );
        assert_eq!(
            only_429.classify(StatusCode::REQUEST_TIMEOUT, &h),
            Decision::Serve
        );
    }
}
