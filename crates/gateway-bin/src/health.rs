//! Two questions, two endpoints, answered apart on purpose.
//!
//! - `/readyz`: is *this gateway* ready for traffic? It is when it listens (it answers at all), its
//!   policy is loaded (it was built from one), and it is not draining. Backend health never enters
//!   into it: when a region of Azure is down every replica sees the same, and an orchestrator that
//!   pulled them all for it would turn a partial outage into a total one.
//! - `/healthz/backends`: can the backends behind this gateway serve? For a global load balancer
//!   (Azure Front Door, Traffic Manager) choosing between gateway deployments in several regions: 200
//!   while every deployment has at least one backend that can take a request now, 503 otherwise, with
//!   a JSON body of counts per deployment. It names deployments as clients call them, never backends,
//!   their URLs or their own deployment names.
//!
//! ```
//! use std::collections::BTreeMap;
//! use std::time::Instant;
//! use gateway_bin::health::backend_health;
//! use gateway_core::pool::{Backend, BackendPool, Outcome, PoolSettings};
//!
//! let backend = Backend {
//!     name: "sweden".to_owned(),
//!     region: "Sweden Central".to_owned(),
//!     endpoint: "https://sweden.openai.azure.com".to_owned(),
//!     priority: 1,
//!     weight: 1,
//!     deployments: BTreeMap::from([("gpt-4o".to_owned(), "gpt-4o-swc".to_owned())]),
//!     credential: None,
//! };
//! let pool = BackendPool::new(vec![backend], PoolSettings::default());
//! let now = Instant::now();
//! let (healthy, body) = backend_health(&pool, now);
//! assert!(healthy);
//! assert_eq!(body["deployments"][0]["name"], "gpt-4o");
//! assert_eq!(body["deployments"][0]["available"], 1);
//!
//! let id = pool.id_of("sweden").unwrap();
//! for _ in 0..5 {
//!     pool.record(id, "gpt-4o", Outcome::ConnectError, now);
//! }
//! let (healthy, body) = backend_health(&pool, now);
//! assert!(!healthy);
//! assert_eq!(body["status"], "unavailable");
//! assert!(!body.to_string().contains("sweden"));
//! ```

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use axum::Json;
use axum::response::{IntoResponse, Response};
use gateway_core::pool::{BackendPool, BackendState};
use http::StatusCode;
use serde_json::{Value, json};

/// `/readyz`: 200 `ready` unless the gateway is draining (503 `draining`).
pub async fn readyz(draining: Arc<AtomicBool>) -> Response {
    if draining.load(Ordering::Relaxed) {
        (StatusCode::SERVICE_UNAVAILABLE, "draining").into_response()
    } else {
        (StatusCode::OK, "ready").into_response()
    }
}

/// `/healthz/backends`: 200 while every deployment has a backend that can serve, else 503; the body
/// is [`backend_health`]'s.
pub async fn backends(pool: Arc<BackendPool>) -> Response {
    let (healthy, body) = backend_health(&pool, Instant::now());
    let status = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut res = (status, Json(body)).into_response();
    // A probe must see the state now, never a cached one.
    res.headers_mut().insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    res
}

/// Whether every deployment has a backend that can take a request at `now` (available, or half-open
/// and due a probe: not ejected, not cooling down, not skipped for that deployment), and the JSON
/// body that says so: `{"status": "ok" | "degraded" | "unavailable", "deployments": [{"name",
/// "backends", "available"}]}`. `degraded` means every deployment can be served, but some backend
/// cannot.
pub fn backend_health(pool: &BackendPool, now: Instant) -> (bool, Value) {
    // Logical deployment -> (backends serving it, of which available).
    let mut counts: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    let snapshot = pool.snapshot(now);
    for (backend, status) in pool.backends().iter().zip(&snapshot) {
        let up = matches!(
            status.state,
            BackendState::Available | BackendState::HalfOpen
        );
        for deployment in backend.deployments.keys() {
            let entry = counts.entry(deployment).or_default();
            entry.0 += 1;
            if up && !status.not_found.iter().any(|d| d == deployment) {
                entry.1 += 1;
            }
        }
    }
    let healthy = counts.values().all(|&(_, available)| available > 0);
    let whole = counts
        .values()
        .all(|&(serving, available)| serving == available);
    let state = match (healthy, whole) {
        (true, true) => "ok",
        (true, false) => "degraded",
        (false, _) => "unavailable",
    };
    let deployments: Vec<Value> = counts
        .iter()
        .map(|(name, (serving, available))| {
            json!({"name": name, "backends": serving, "available": available})
        })
        .collect();
    (
        healthy,
        json!({"status": state, "deployments": deployments}),
    )
}
