//! Observation of every `/openai` request: Prometheus metrics and the access log.
//!
//! [`ObserveLayer`] wraps the whole `/openai` stack, outside the request-context layer. It reads the
//! request's one [`Record`](gateway_layers::record::Record) (in the response extensions), which the
//! inner layers filled in (request, consumer, attempts, limit verdict, usage), and:
//!
//! - when the response headers are ready, counts the upstream attempts, failovers and limit
//!   rejections, records each backend's time to first byte and the gateway's own overhead, and keeps
//!   a per-backend [`Latency`] for the status page;
//! - when the response body ends (for a stream: its last event; or when the client goes away), in a
//!   hook of the record, counts the request with its status class, duration and tokens, and writes
//!   one JSON access log line to stdout.
//!
//! The metric names are in [`metrics`]; values go to the global `metrics` recorder, see
//! [`metrics::recorder`].
//!
//! # Example
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//! use axum::body::Body;
//! use gateway_bin::observe::ObserveLayer;
//! use gateway_core::pool::{Backend, BackendId, BackendPool, PoolSettings};
//! use gateway_layers::failover::{Attempt, AttemptOutcome, FailoverReport};
//! use gateway_layers::record::{Record, RecordBody};
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let sweden = Backend {
//!     name: "sweden".into(),
//!     region: "Sweden Central".into(),
//!     endpoint: "https://sweden.openai.azure.com".into(),
//!     priority: 1,
//!     weight: 1,
//!     deployments: [("gpt-4o".to_string(), "gpt-4o".to_string())].into(),
//!     credential: None,
//! };
//! let pool = BackendPool::new(vec![sweden], PoolSettings::default());
//! // A stand-in for the gateway's stack: one attempt on Sweden that got its headers in 40 ms.
//! let stack = service_fn(|_req: http::Request<Body>| async {
//!     let record = Arc::new(Record::new(http::HeaderValue::from_static("req-1"), None));
//!     record.set_failover(FailoverReport {
//!         served_by: Some(BackendId(0)),
//!         attempts: vec![Attempt {
//!             backend: BackendId(0),
//!             backend_name: Arc::from("sweden"),
//!             status: Some(200),
//!             outcome: AttemptOutcome::Served,
//!             elapsed: Duration::from_millis(40),
//!         }],
//!     });
//!     let mut res = http::Response::new(RecordBody::new(Body::from("{}"), record.clone(), None));
//!     res.extensions_mut().insert(record);
//!     Ok::<_, std::convert::Infallible>(res)
//! });
//! let observe = ObserveLayer::new(&pool).deployments(["gpt-4o"]).access_log(false);
//! let latency = observe.latency();
//! let svc = ServiceBuilder::new().layer(observe).service(stack);
//!
//! let res = svc.oneshot(http::Request::new(Body::empty())).await.unwrap();
//! axum::body::to_bytes(Body::new(res.into_body()), usize::MAX).await.unwrap();
//! assert_eq!(latency.get(BackendId(0)).unwrap().last, Duration::from_millis(40));
//! # }
//! ```

mod access_log;
mod latency;
pub mod metrics;
mod observation;
mod service;

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use ::metrics::{Counter, Histogram, SharedString};
use gateway_core::pool::{BackendId, BackendPool};
use gateway_layers::failover::AttemptOutcome;
use tower::Layer;

pub use access_log::flush as flush_access_log;
pub use latency::{Latency, Recent};
pub use service::{Observe, ResponseFuture};

pub(crate) use access_log::Rfc3339;

/// Label value for what is not in the policy, or absent: keeps label sets bounded.
const UNKNOWN: &str = "_unknown";
/// Consumer label value when `telemetry.consumer_label` is off.
const HIDDEN: &str = "_";
/// Consumer label value when no consumer was authenticated.
const NO_CONSUMER: &str = "_none";

/// Layer that records metrics and writes the access log. See the [module docs](self).
#[derive(Clone, Debug)]
pub struct ObserveLayer {
    shared: Arc<Shared>,
}

#[derive(Clone, Debug)]
struct Shared {
    /// Per backend, by [`BackendId`]: its name and region as label values, made once.
    backends: Vec<BackendLabels>,
    /// Declared deployments, as label values made once.
    deployments: HashMap<String, SharedString>,
    latency: Arc<Latency>,
    access_log: bool,
    consumer_label: bool,
    /// The handles of the series whose labels are fixed by the pool, registered on first use.
    handles: Arc<Handles>,
}

#[derive(Clone, Debug)]
struct BackendLabels {
    name: SharedString,
    region: SharedString,
}

/// Registered metric handles, kept so that a request does not build a label set, hash it and look
/// it up in the recorder's registry for each of them (docs/benchmarks.md, "Profile of the hot
/// path"). Each is registered when first used, as the `counter!` it replaces did: a series appears
/// on `/metrics` only once it has been counted.
#[derive(Debug, Default)]
struct Handles {
    overhead: OnceLock<Histogram>,
    /// By failed attempt outcome ([`outcome_index`]).
    failovers: [OnceLock<Counter>; OUTCOMES],
    /// By [`BackendId`].
    backends: Vec<BackendHandles>,
}

#[derive(Debug, Default)]
struct BackendHandles {
    ttfb: OnceLock<Histogram>,
    /// By attempt outcome ([`outcome_index`]).
    attempts: [OnceLock<Counter>; OUTCOMES],
}

/// The number of [`AttemptOutcome`]s.
const OUTCOMES: usize = 7;

/// An outcome's place in the handle arrays.
fn outcome_index(outcome: AttemptOutcome) -> usize {
    match outcome {
        AttemptOutcome::Served => 0,
        AttemptOutcome::Throttled => 1,
        AttemptOutcome::AuthFailure => 2,
        AttemptOutcome::ServerError => 3,
        AttemptOutcome::DeploymentNotFound => 4,
        AttemptOutcome::Timeout => 5,
        AttemptOutcome::ConnectError => 6,
    }
}

// === impl ObserveLayer ===

impl ObserveLayer {
    /// Observes requests routed over `pool`'s backends. Every deployment is labelled `_unknown` until
    /// declared with [`deployments`](Self::deployments); the access log is on, consumers are labelled.
    pub fn new(pool: &BackendPool) -> Self {
        let backends = pool
            .backends()
            .iter()
            .map(|b| BackendLabels {
                name: SharedString::from(b.name.clone()),
                region: SharedString::from(b.region.clone()),
            })
            .collect::<Vec<_>>();
        let handles = Handles {
            backends: backends.iter().map(|_| BackendHandles::default()).collect(),
            ..Handles::default()
        };
        Self {
            shared: Arc::new(Shared {
                latency: Arc::new(Latency::new(backends.len())),
                backends,
                deployments: HashMap::new(),
                access_log: true,
                consumer_label: true,
                handles: Arc::new(handles),
            }),
        }
    }

    /// The logical deployments worth a label of their own; any other is labelled `_unknown`.
    pub fn deployments<I, D>(self, names: I) -> Self
    where
        I: IntoIterator<Item = D>,
        D: Into<String>,
    {
        self.with(|s| {
            for name in names {
                let name = name.into();
                s.deployments.insert(name.clone(), SharedString::from(name));
            }
        })
    }

    /// Whether metrics carry the consumer's name (off: `_`, for gateways with many consumers).
    pub fn consumer_label(self, on: bool) -> Self {
        self.with(|s| s.consumer_label = on)
    }

    /// Whether to write one JSON line per request to stdout.
    pub fn access_log(self, on: bool) -> Self {
        self.with(|s| s.access_log = on)
    }

    /// Recent time to first byte per backend, kept by this layer.
    pub fn latency(&self) -> Arc<Latency> {
        self.shared.latency.clone()
    }

    fn with(self, f: impl FnOnce(&mut Shared)) -> Self {
        let mut shared = Arc::unwrap_or_clone(self.shared);
        f(&mut shared);
        Self {
            shared: Arc::new(shared),
        }
    }
}

impl<S> Layer<S> for ObserveLayer {
    type Service = Observe<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Observe::new(inner, self.shared.clone())
    }
}

// === impl Shared ===

impl Shared {
    fn backend(&self, id: BackendId) -> Option<&BackendLabels> {
        self.backends.get(id.0)
    }

    fn deployment(&self, name: Option<&str>) -> SharedString {
        name.and_then(|n| self.deployments.get(n))
            .cloned()
            .unwrap_or(SharedString::const_str(UNKNOWN))
    }

    fn consumer(&self, name: Option<&Arc<str>>) -> SharedString {
        match name {
            _ if !self.consumer_label => SharedString::const_str(HIDDEN),
            Some(name) => SharedString::from(name.clone()),
            None => SharedString::const_str(NO_CONSUMER),
        }
    }
}
