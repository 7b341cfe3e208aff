//! The failover layer as a service: a `service_fn` stands in for the HTTP client and every backend,
//! time is paused, and each behaviour is proved by counting the calls each backend received.
//!
//! Paused time moves only when every task waits on a timer (or on `advance`), so a timeout fires
//! exactly when it is due and durations are asserted with `==`.
#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use gateway_core::pool::{
    Backend, BackendId, BackendPool, BackendState, BackendStatus, CircuitSettings, Outcome,
    PoolSettings,
};
use gateway_layers::BoxError;
use gateway_layers::RequestContextLayer;
use gateway_layers::failover::{
    AttemptOutcome, AzurePolicy, Decision, FailoverBody, FailoverLayer, FailoverPolicy,
    FailoverReport,
};
use gateway_layers::record::{Record, RecordBody};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use tokio::sync::{Notify, mpsc};

use common::ChannelBody;
use tokio::time::Instant;
use tower::{Layer, Service, ServiceBuilder, ServiceExt};

const CHAT: &str = "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21";
const DEPLOYMENT_NOT_FOUND: &str = r#"{"error":{"code":"DeploymentNotFound","message":"The API deployment for this resource does not exist."}}"#;

type UpstreamBody = BoxBody<Bytes, BoxError>;
type GatewayResponse = Response<RecordBody<FailoverBody<UpstreamBody>>>;

// === the upstream ===

/// What a backend does with the next attempt it receives.
#[derive(Clone)]
enum Reply {
    /// Answers this status, these headers and this body.
    Answer(u16, Vec<(&'static str, String)>, &'static str),
    /// Fails as a refused connection does.
    Refuse,
    /// Never sends response headers.
    Hang,
    /// Answers an SSE stream whose events come from a channel (taken by the first attempt).
    Stream(Arc<Mutex<Option<mpsc::Receiver<Bytes>>>>),
    /// Answers this status with a JSON body whose bytes come from a channel (taken by the first
    /// attempt).
    Dribble(u16, Arc<Mutex<Option<mpsc::Receiver<Bytes>>>>),
    /// Says it was called, waits to be released, then answers 200.
    Held {
        called: Arc<Notify>,
        release: Arc<Notify>,
    },
}

/// Every backend of a test, behind one `service_fn`: attempts are told apart by host
/// (`http://{name}.test`), counted, and answered as scripted.
#[derive(Clone, Default)]
struct Upstream {
    replies: Arc<Mutex<HashMap<String, Reply>>>,
    calls: Arc<Mutex<HashMap<String, usize>>>,
    /// Every attempt's URI, in order.
    seen: Arc<Mutex<Vec<String>>>,
}

impl Reply {
    fn status(status: u16) -> Self {
        Reply::Answer(status, Vec::new(), "{}")
    }

    fn with_header(status: u16, name: &'static str, value: &str) -> Self {
        Reply::Answer(status, vec![(name, value.to_owned())], "{}")
    }

    async fn respond(self) -> Result<Response<UpstreamBody>, BoxError> {
        match self {
            Reply::Answer(status, headers, body) => {
                let mut res = Response::new(full(body));
                *res.status_mut() = StatusCode::from_u16(status)?;
                res.headers_mut()
                    .insert("content-type", "application/json".parse()?);
                for (name, value) in headers {
                    res.headers_mut().insert(name, value.parse()?);
                }
                Ok(res)
            }
            Reply::Refuse => Err("connection refused".into()),
            Reply::Hang => std::future::pending().await,
            Reply::Stream(rx) => {
                let rx = rx.lock().unwrap().take().ok_or("stream already taken")?;
                let mut res = Response::new(ChannelBody(rx).boxed());
                res.headers_mut()
                    .insert("content-type", "text/event-stream".parse()?);
                Ok(res)
            }
            Reply::Dribble(status, rx) => {
                let rx = rx.lock().unwrap().take().ok_or("body already taken")?;
                let mut res = Response::new(ChannelBody(rx).boxed());
                *res.status_mut() = StatusCode::from_u16(status)?;
                res.headers_mut()
                    .insert("content-type", "application/json".parse()?);
                Ok(res)
            }
            Reply::Held { called, release } => {
                called.notify_one();
                release.notified().await;
                Ok(Response::new(full("{}")))
            }
        }
    }
}

impl Upstream {
    fn set(&self, backend: &str, reply: Reply) {
        self.replies
            .lock()
            .unwrap()
            .insert(backend.to_owned(), reply);
    }

    fn calls(&self, backend: &str) -> usize {
        self.calls
            .lock()
            .unwrap()
            .get(backend)
            .copied()
            .unwrap_or(0)
    }

    fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }

    /// The HTTP client the failover layer sends attempts through. Unscripted backends answer 200.
    fn client(
        &self,
    ) -> impl Service<
        Request<Full<Bytes>>,
        Response = Response<UpstreamBody>,
        Error = BoxError,
        Future = impl Send,
    > + Clone
    + Send
    + 'static {
        let this = self.clone();
        tower::service_fn(move |req: Request<Full<Bytes>>| {
            let this = this.clone();
            async move {
                let host = req.uri().host().unwrap_or_default();
                let name = host.trim_end_matches(".test").to_owned();
                this.seen.lock().unwrap().push(req.uri().to_string());
                *this.calls.lock().unwrap().entry(name.clone()).or_default() += 1;
                let reply = this.replies.lock().unwrap().get(&name).cloned();
                reply.unwrap_or(Reply::status(200)).respond().await
            }
        })
    }
}

fn full(body: &'static str) -> UpstreamBody {
    Full::new(Bytes::from_static(body.as_bytes()))
        .map_err(|never| match never {})
        .boxed()
}

// === the gateway ===

/// Backends `(name, priority)`, each serving `gpt-4o` as `gpt-4o-{name}` at `http://{name}.test`.
fn pool(backends: &[(&str, u32)], settings: PoolSettings) -> Arc<BackendPool> {
    let backends = backends
        .iter()
        .map(|&(name, priority)| Backend {
            name: name.to_owned(),
            region: "Test".to_owned(),
            endpoint: format!("http://{name}.test"),
            priority,
            weight: 1,
            deployments: [("gpt-4o".to_owned(), format!("gpt-4o-{name}"))].into(),
            credential: None,
        })
        .collect();
    Arc::new(BackendPool::new(backends, settings))
}

/// `ptu` first, `paygo` second, default settings.
fn two_backends() -> Arc<BackendPool> {
    pool(&[("ptu", 1), ("paygo", 2)], PoolSettings::default())
}

/// The layer under test, with the context layer outside it as it must be.
fn gateway<P: FailoverPolicy>(
    failover: FailoverLayer<P>,
    upstream: &Upstream,
) -> impl Service<
    Request<Full<Bytes>>,
    Response = GatewayResponse,
    Error = Infallible,
    Future = impl Future<Output = Result<GatewayResponse, Infallible>> + Send,
> + Clone
+ Send
+ 'static {
    ServiceBuilder::new()
        .layer(RequestContextLayer::new(1 << 20))
        .layer(failover)
        .service(upstream.client())
}

fn chat() -> Request<Full<Bytes>> {
    Request::post(CHAT)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(
            br#"{"messages":[{"role":"user","content":"Hello"}],"max_tokens":10}"#,
        )))
        .unwrap()
}

async fn call<S>(gateway: &S) -> GatewayResponse
where
    S: Service<Request<Full<Bytes>>, Response = GatewayResponse, Error = Infallible> + Clone,
{
    gateway.clone().oneshot(chat()).await.unwrap()
}

fn header<'a, B>(res: &'a Response<B>, name: &str) -> &'a str {
    res.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
}

fn report(res: &GatewayResponse) -> &FailoverReport {
    let record = res.extensions().get::<Arc<Record>>().unwrap();
    record.failover().unwrap()
}

/// `(status, outcome)` of every attempt.
fn attempts(res: &GatewayResponse) -> Vec<(Option<u16>, AttemptOutcome)> {
    report(res)
        .attempts
        .iter()
        .map(|a| (a.status, a.outcome))
        .collect()
}

async fn body<B>(res: Response<B>) -> String
where
    B: http_body::Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(bytes.to_vec()).unwrap()
}

fn status(pool: &BackendPool, name: &str) -> BackendStatus {
    let now = Instant::now().into_std();
    pool.snapshot(now)
        .into_iter()
        .find(|s| s.name == name)
        .unwrap()
}

// === the failover triggers ===

#[tokio::test(start_paused = true)]
async fn a_throttle_cools_the_backend_down_exactly_as_long_as_retry_after_ms_says() {
    let upstream = Upstream::default();
    upstream.set("ptu", Reply::with_header(429, "retry-after-ms", "5000"));
    let pool = two_backends();
    let cooldowns = Arc::new(Mutex::new(Vec::new()));
    let hook = {
        let cooldowns = cooldowns.clone();
        move |backend: &str, deployment: &str, cooldown| {
            cooldowns
                .lock()
                .unwrap()
                .push((format!("{backend}/{deployment}"), cooldown))
        }
    };
    let gw = gateway(
        FailoverLayer::new(pool.clone()).on_cooldown(hook),
        &upstream,
    );

    let res = call(&gw).await;
    assert_eq!(res.status(), 200);
    assert_eq!(header(&res, "x-served-by"), "paygo (Test)");
    assert_eq!(header(&res, "x-gateway-attempts"), "2");
    assert_eq!(
        attempts(&res),
        [
            (Some(429), AttemptOutcome::Throttled),
            (Some(200), AttemptOutcome::Served)
        ]
    );
    assert_eq!(report(&res).served_by, Some(BackendId(1)));
    // The same request, each time with the backend's own deployment name.
    assert_eq!(
        upstream.seen(),
        [
            "http://ptu.test/openai/deployments/gpt-4o-ptu/chat/completions?api-version=2024-10-21",
            "http://paygo.test/openai/deployments/gpt-4o-paygo/chat/completions?api-version=2024-10-21",
        ]
    );
    let ptu = status(&pool, "ptu");
    assert_eq!(ptu.state, BackendState::CoolingDown);
    assert_eq!(ptu.cooldown_remaining, Some(Duration::from_millis(5000)));
    assert_eq!(ptu.window_failures, 0, "a throttle is no circuit failure");
    assert_eq!(
        *cooldowns.lock().unwrap(),
        [("ptu/gpt-4o-ptu".to_owned(), Duration::from_millis(5000))]
    );

    // Still resting one millisecond before the hint runs out: not even tried.
    upstream.set("ptu", Reply::status(200));
    tokio::time::advance(Duration::from_millis(4999)).await;
    let res = call(&gw).await;
    assert_eq!(header(&res, "x-served-by"), "paygo (Test)");
    assert_eq!(header(&res, "x-gateway-attempts"), "1");
    assert_eq!(upstream.calls("ptu"), 1);

    // Back once it has passed.
    tokio::time::advance(Duration::from_millis(1)).await;
    let res = call(&gw).await;
    assert_eq!(header(&res, "x-served-by"), "ptu (Test)");
    assert_eq!(upstream.calls("ptu"), 2);
    assert_eq!(upstream.calls("paygo"), 2);
    assert_eq!(status(&pool, "ptu").state, BackendState::Available);
}

#[tokio::test(start_paused = true)]
async fn auth_failures_fail_over_and_cool_the_backend_down() {
    for code in [401, 403] {
        let upstream = Upstream::default();
        upstream.set("ptu", Reply::status(code));
        let pool = two_backends();
        let gw = gateway(FailoverLayer::new(pool.clone()), &upstream);

        let res = call(&gw).await;
        assert_eq!(res.status(), 200, "{code}");
        assert_eq!(header(&res, "x-served-by"), "paygo (Test)");
        assert_eq!(
            attempts(&res),
            [
                (Some(code), AttemptOutcome::AuthFailure),
                (Some(200), AttemptOutcome::Served)
            ]
        );
        // Misconfigured (issue 9: it was `CoolingDown`), resting long; with no hint in the answer
        // its cooldown is the pool's default besides.
        let ptu = status(&pool, "ptu");
        assert_eq!(ptu.state, BackendState::Misconfigured);
        assert_eq!(
            ptu.cooldown_remaining,
            Some(pool.settings().default_cooldown)
        );
        assert_eq!((upstream.calls("ptu"), upstream.calls("paygo")), (1, 1));
    }
}

#[tokio::test(start_paused = true)]
async fn a_credential_every_backend_refuses_is_the_gateways_502() {
    let upstream = Upstream::default();
    upstream.set("ptu", Reply::status(401));
    upstream.set("paygo", Reply::status(403));
    let gw = gateway(FailoverLayer::new(two_backends()), &upstream);

    let res = call(&gw).await;
    assert_eq!(res.status(), 502);
    assert_eq!(header(&res, "x-served-by"), "gateway");
    assert_eq!(header(&res, "x-gateway-attempts"), "2");
    assert!(body(res).await.contains(r#""code":"BadGateway""#));
}

#[tokio::test(start_paused = true)]
async fn each_configured_status_fails_over_and_counts_against_the_circuit() {
    for code in [408, 500, 502, 503, 504] {
        let upstream = Upstream::default();
        upstream.set("ptu", Reply::status(code));
        let pool = two_backends();
        let gw = gateway(FailoverLayer::new(pool.clone()), &upstream);

        let res = call(&gw).await;
        assert_eq!(res.status(), 200, "{code}");
        assert_eq!(header(&res, "x-served-by"), "paygo (Test)", "{code}");
        assert_eq!(header(&res, "x-gateway-attempts"), "2", "{code}");
        assert_eq!(
            attempts(&res),
            [
                (Some(code), AttemptOutcome::ServerError),
                (Some(200), AttemptOutcome::Served)
            ]
        );
        assert_eq!(status(&pool, "ptu").window_failures, 1, "{code}");
        assert_eq!((upstream.calls("ptu"), upstream.calls("paygo")), (1, 1));
    }
}

#[tokio::test(start_paused = true)]
async fn a_5xx_not_in_the_list_passes_through() {
    // 501 is not in the default list.
    let upstream = Upstream::default();
    upstream.set("ptu", Reply::status(501));
    let pool = two_backends();
    let gw = gateway(FailoverLayer::new(pool.clone()), &upstream);
    let res = call(&gw).await;
    assert_eq!(res.status(), 501);
    assert_eq!(header(&res, "x-served-by"), "ptu (Test)");
    assert_eq!(attempts(&res), [(Some(501), AttemptOutcome::Served)]);
    assert_eq!(upstream.calls("paygo"), 0);
    assert_eq!(status(&pool, "ptu").window_failures, 0);

    // A configured list replaces the default one: 500 now passes, 503 still fails over.
    let upstream = Upstream::default();
    upstream.set("ptu", Reply::status(500));
    let gw = gateway(
        FailoverLayer::new(two_backends()).on_status([429, 503]),
        &upstream,
    );
    let res = call(&gw).await;
    assert_eq!(res.status(), 500);
    assert_eq!(header(&res, "x-served-by"), "ptu (Test)");
    assert_eq!(upstream.calls("paygo"), 0);
    upstream.set("ptu", Reply::status(503));
    let res = call(&gw).await;
    assert_eq!(header(&res, "x-served-by"), "paygo (Test)");
    assert_eq!(upstream.calls("paygo"), 1);
}

#[tokio::test(start_paused = true)]
async fn a_400_passes_through_untouched() {
    let filtered = r#"{"error":{"code":"content_filter","message":"filtered"}}"#;
    let upstream = Upstream::default();
    upstream.set("ptu", Reply::Answer(400, Vec::new(), filtered));
    let pool = two_backends();
    let gw = gateway(FailoverLayer::new(pool.clone()), &upstream);

    let res = call(&gw).await;
    assert_eq!(res.status(), 400);
    assert_eq!(header(&res, "x-served-by"), "ptu (Test)");
    assert_eq!(attempts(&res), [(Some(400), AttemptOutcome::Served)]);
    assert_eq!(body(res).await, filtered);
    assert_eq!(upstream.calls("paygo"), 0);
    assert_eq!(status(&pool, "ptu").state, BackendState::Available);
}

#[tokio::test(start_paused = true)]
async fn deployment_not_found_fails_over_and_skips_the_backend_for_that_deployment() {
    let upstream = Upstream::default();
    upstream.set("ptu", Reply::Answer(404, Vec::new(), DEPLOYMENT_NOT_FOUND));
    let pool = two_backends();
    let gw = gateway(FailoverLayer::new(pool.clone()), &upstream);

    let res = call(&gw).await;
    assert_eq!(res.status(), 200);
    assert_eq!(header(&res, "x-served-by"), "paygo (Test)");
    assert_eq!(
        attempts(&res),
        [
            (Some(404), AttemptOutcome::DeploymentNotFound),
            (Some(200), AttemptOutcome::Served)
        ]
    );
    let ptu = status(&pool, "ptu");
    assert_eq!(ptu.not_found, ["gpt-4o"]);
    assert_eq!(ptu.state, BackendState::Available, "only that deployment");

    let res = call(&gw).await;
    assert_eq!(header(&res, "x-served-by"), "paygo (Test)");
    assert_eq!(header(&res, "x-gateway-attempts"), "1");
    assert_eq!(upstream.calls("ptu"), 1);
}

#[tokio::test(start_paused = true)]
async fn a_plain_404_is_served_with_its_body() {
    let not_found = r#"{"error":{"code":"404","message":"Resource not found"}}"#;
    let upstream = Upstream::default();
    upstream.set("ptu", Reply::Answer(404, Vec::new(), not_found));
    let pool = two_backends();
    let gw = gateway(FailoverLayer::new(pool.clone()), &upstream);

    let res = call(&gw).await;
    assert_eq!(res.status(), 404);
    assert_eq!(header(&res, "x-served-by"), "ptu (Test)");
    assert_eq!(attempts(&res), [(Some(404), AttemptOutcome::Served)]);
    assert_eq!(body(res).await, not_found);
    assert_eq!(upstream.calls("paygo"), 0);
    assert!(status(&pool, "ptu").not_found.is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_connection_error_fails_over() {
    let upstream = Upstream::default();
    upstream.set("ptu", Reply::Refuse);
    let pool = two_backends();
    let gw = gateway(FailoverLayer::new(pool.clone()), &upstream);

    let res = call(&gw).await;
    assert_eq!(res.status(), 200);
    assert_eq!(header(&res, "x-served-by"), "paygo (Test)");
    assert_eq!(
        attempts(&res),
        [
            (None, AttemptOutcome::ConnectError),
            (Some(200), AttemptOutcome::Served)
        ]
    );
    assert_eq!(status(&pool, "ptu").window_failures, 1);

    // Nobody reachable: 502 from the gateway.
    upstream.set("paygo", Reply::Refuse);
    let res = call(&gw).await;
    assert_eq!(res.status(), 502);
    assert_eq!(header(&res, "x-served-by"), "gateway");
    assert!(
        body(res)
            .await
            .contains("could be reached (connection refused).")
    );
}

#[tokio::test(start_paused = true)]
async fn no_response_headers_within_the_header_timeout_fails_over() {
    let upstream = Upstream::default();
    upstream.set("ptu", Reply::Hang);
    let pool = two_backends();
    let timeout = Duration::from_secs(2);
    let gw = gateway(
        FailoverLayer::new(pool.clone()).response_header_timeout(timeout),
        &upstream,
    );

    let start = Instant::now();
    let res = call(&gw).await;
    assert_eq!(start.elapsed(), timeout);
    assert_eq!(res.status(), 200);
    assert_eq!(header(&res, "x-served-by"), "paygo (Test)");
    assert_eq!(
        attempts(&res),
        [
            (None, AttemptOutcome::Timeout),
            (Some(200), AttemptOutcome::Served)
        ]
    );
    let elapsed: Vec<_> = report(&res).attempts.iter().map(|a| a.elapsed).collect();
    assert_eq!(elapsed, [timeout, Duration::ZERO]);
    assert_eq!(status(&pool, "ptu").window_failures, 1);
}

// === the bounds ===

#[tokio::test(start_paused = true)]
async fn the_deadline_bounds_every_attempt_together() {
    let upstream = Upstream::default();
    let backends = [("a", 1), ("b", 2), ("c", 3), ("d", 4)];
    for (name, _) in backends {
        upstream.set(name, Reply::Hang);
    }
    let gw = gateway(
        FailoverLayer::new(pool(&backends, PoolSettings::default()))
            .max_attempts(10)
            .deadline(Duration::from_secs(5))
            .response_header_timeout(Duration::from_secs(2)),
        &upstream,
    );

    let start = Instant::now();
    let res = call(&gw).await;
    assert_eq!(start.elapsed(), Duration::from_secs(5));
    assert_eq!(res.status(), 504);
    assert_eq!(header(&res, "x-served-by"), "gateway");
    assert_eq!(header(&res, "x-gateway-attempts"), "3");
    // The third attempt gets only what is left of the deadline.
    let elapsed: Vec<_> = report(&res).attempts.iter().map(|a| a.elapsed).collect();
    assert_eq!(
        elapsed,
        [2, 2, 1].map(Duration::from_secs),
        "2 s, 2 s, then the 1 s left"
    );
    assert_eq!(upstream.calls("d"), 0);
    assert!(body(res).await.contains(r#""code":"GatewayTimeout""#));
}

#[tokio::test(start_paused = true)]
async fn the_attempt_budget_bounds_attempts_and_azures_last_5xx_is_returned() {
    let upstream = Upstream::default();
    let backends = [("a", 1), ("b", 2), ("c", 3)];
    for (name, _) in backends {
        upstream.set(name, Reply::status(503));
    }
    let gw = gateway(
        FailoverLayer::new(pool(&backends, PoolSettings::default())).max_attempts(2),
        &upstream,
    );

    let res = call(&gw).await;
    assert_eq!(res.status(), 503);
    assert_eq!(header(&res, "x-served-by"), "b (Test)");
    assert_eq!(header(&res, "x-gateway-attempts"), "2");
    assert_eq!(report(&res).served_by, Some(BackendId(1)));
    assert_eq!(
        [
            upstream.calls("a"),
            upstream.calls("b"),
            upstream.calls("c")
        ],
        [1, 1, 0]
    );
}

#[tokio::test(start_paused = true)]
async fn a_budget_spent_on_throttles_is_the_gateways_429_with_the_shortest_wait() {
    let upstream = Upstream::default();
    upstream.set("a", Reply::with_header(429, "retry-after-ms", "7000"));
    upstream.set("b", Reply::with_header(429, "retry-after-ms", "3000"));
    let backends = [("a", 1), ("b", 2), ("c", 3)];
    let gw = gateway(
        FailoverLayer::new(pool(&backends, PoolSettings::default())).max_attempts(2),
        &upstream,
    );

    let res = call(&gw).await;
    assert_eq!(res.status(), 429);
    assert_eq!(header(&res, "x-served-by"), "gateway");
    assert_eq!(header(&res, "x-gateway-throttled"), "true");
    assert_eq!(header(&res, "retry-after-ms"), "3000");
    assert_eq!(header(&res, "retry-after"), "3");
    assert_eq!(upstream.calls("c"), 0);
}

// === the circuit breaker ===

/// Pool settings whose circuit opens once `volume` attempts within 10 s all failed, for `trip`
/// (twice as long the second time).
/// Both backends rest `rest` after a 429, as if other requests had just met it.
fn rest_both(pool: &BackendPool, rest: Duration) -> Instant {
    let now = Instant::now();
    for name in ["ptu", "paygo"] {
        let id = pool.id_of(name).unwrap();
        let throttled = Outcome::Throttled { hint: Some(rest) };
        pool.record(id, "gpt-4o", throttled, now.into_std());
    }
    now
}

#[tokio::test(start_paused = true)]
async fn a_request_waits_out_a_rest_that_ends_within_the_throttle_wait() {
    let upstream = Upstream::default();
    let pool = two_backends();
    let gw = gateway(
        FailoverLayer::new(pool.clone()).throttle_wait(Duration::from_millis(500)),
        &upstream,
    );
    let start = rest_both(&pool, Duration::from_millis(150));

    let res = call(&gw).await;
    assert_eq!(res.status(), 200);
    assert_eq!(header(&res, "x-gateway-attempts"), "1");
    assert!(start.elapsed() >= Duration::from_millis(150));
    assert_eq!(upstream.calls("ptu") + upstream.calls("paygo"), 1);
}

#[tokio::test(start_paused = true)]
async fn a_rest_longer_than_the_throttle_wait_is_the_gateways_429_at_once() {
    let upstream = Upstream::default();
    let pool = two_backends();
    let gw = gateway(
        FailoverLayer::new(pool.clone()).throttle_wait(Duration::from_millis(500)),
        &upstream,
    );
    let start = rest_both(&pool, Duration::from_secs(2));

    let res = call(&gw).await;
    assert_eq!(res.status(), 429);
    assert_eq!(header(&res, "x-gateway-throttled"), "true");
    assert_eq!(start.elapsed(), Duration::ZERO);
    assert_eq!(upstream.calls("ptu") + upstream.calls("paygo"), 0);
}

#[tokio::test(start_paused = true)]
async fn a_request_waits_once_then_gets_the_gateways_429() {
    let upstream = Upstream::default();
    upstream.set("ptu", Reply::with_header(429, "retry-after-ms", "150"));
    upstream.set("paygo", Reply::with_header(429, "retry-after-ms", "150"));
    let pool = two_backends();
    let gw = gateway(
        FailoverLayer::new(pool.clone()).throttle_wait(Duration::from_millis(500)),
        &upstream,
    );

    let res = call(&gw).await;
    assert_eq!(res.status(), 429);
    assert_eq!(header(&res, "x-gateway-throttled"), "true");
    // Both, a wait, both again: the rests are over, so a backend that said 429 is asked again.
    assert_eq!([upstream.calls("ptu"), upstream.calls("paygo")], [2, 2]);
}

fn circuit(volume: u32, trip: Duration) -> PoolSettings {
    PoolSettings {
        circuit: CircuitSettings {
            request_volume: volume,
            interval: Duration::from_secs(10),
            base_ejection: trip,
            ..CircuitSettings::default()
        },
        ..PoolSettings::default()
    }
}

#[tokio::test(start_paused = true)]
async fn when_every_circuit_is_open_the_backends_are_tried_anyway() {
    let trip = Duration::from_secs(30);
    let pool = pool(&[("ptu", 1), ("paygo", 2)], circuit(1, trip));
    let upstream = Upstream::default();
    upstream.set("ptu", Reply::status(503));
    upstream.set("paygo", Reply::status(503));
    let gw = gateway(FailoverLayer::new(pool.clone()), &upstream);

    // One failure each opens both circuits; Azure's last 503 is passed through as it is.
    let res = call(&gw).await;
    assert_eq!(res.status(), 503);
    assert_eq!(header(&res, "x-served-by"), "paygo (Test)");
    assert_eq!(
        header(&res, "retry-after-ms"),
        "",
        "Azure's own answer said nothing"
    );
    assert_eq!(status(&pool, "ptu").state, BackendState::CircuitOpen);
    assert_eq!(status(&pool, "paygo").state, BackendState::CircuitOpen);

    // Ten seconds on, both are still ejected: panic mode tries them in priority order rather than
    // refuse, and ptu has recovered.
    tokio::time::advance(Duration::from_secs(10)).await;
    upstream.set("ptu", Reply::status(200));
    let res = call(&gw).await;
    assert_eq!(res.status(), 200);
    assert_eq!(header(&res, "x-served-by"), "ptu (Test)");
    assert_eq!(upstream.calls("ptu") + upstream.calls("paygo"), 3);
    assert_eq!(pool.panic_selections(), 1);
}

#[tokio::test(start_paused = true)]
async fn the_circuit_opens_then_lets_one_probe_through_which_reopens_or_closes_it() {
    let trip = Duration::from_secs(30);
    let pool = pool(&[("ptu", 1), ("paygo", 2)], circuit(3, trip));
    let upstream = Upstream::default();
    upstream.set("ptu", Reply::status(503));
    let gw = gateway(FailoverLayer::new(pool.clone()), &upstream);

    // Three failures open the circuit.
    for _ in 0..3 {
        assert_eq!(header(&call(&gw).await, "x-served-by"), "paygo (Test)");
    }
    assert_eq!(upstream.calls("ptu"), 3);
    let ptu = status(&pool, "ptu");
    assert_eq!(ptu.state, BackendState::CircuitOpen);
    assert_eq!(ptu.circuit_open_remaining, Some(trip));
    let res = call(&gw).await;
    assert_eq!(header(&res, "x-gateway-attempts"), "1");
    assert_eq!(upstream.calls("ptu"), 3, "open: not tried");

    // After the trip time, one probe; it fails, so the circuit opens again, for two trips.
    tokio::time::advance(trip).await;
    assert_eq!(status(&pool, "ptu").state, BackendState::HalfOpen);
    assert_eq!(header(&call(&gw).await, "x-served-by"), "paygo (Test)");
    assert_eq!(upstream.calls("ptu"), 4);
    let ptu = status(&pool, "ptu");
    assert_eq!(ptu.state, BackendState::CircuitOpen);
    assert_eq!(ptu.circuit_open_remaining, Some(trip * 2));
    call(&gw).await;
    assert_eq!(upstream.calls("ptu"), 4, "reopened: not tried");

    // After that, one probe again. While it is out, other requests go elsewhere.
    tokio::time::advance(trip * 2).await;
    let (called, release) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    upstream.set(
        "ptu",
        Reply::Held {
            called: called.clone(),
            release: release.clone(),
        },
    );
    let probe = tokio::spawn(gw.clone().oneshot(chat()));
    called.notified().await;
    let res = call(&gw).await;
    assert_eq!(header(&res, "x-served-by"), "paygo (Test)");
    assert_eq!(upstream.calls("ptu"), 5, "a single probe");

    // The probe succeeds: the circuit closes and the backend takes traffic again.
    release.notify_one();
    let res = probe.await.unwrap().unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(header(&res, "x-served-by"), "ptu (Test)");
    assert_eq!(status(&pool, "ptu").state, BackendState::Available);
    upstream.set("ptu", Reply::status(200));
    assert_eq!(header(&call(&gw).await, "x-served-by"), "ptu (Test)");
    assert_eq!(upstream.calls("ptu"), 6);
}

// === the response body ===

#[tokio::test(start_paused = true)]
async fn a_stream_that_goes_silent_ends_with_an_error_event_and_charges_the_backend() {
    let (tx, rx) = mpsc::channel(4);
    let upstream = Upstream::default();
    upstream.set("ptu", Reply::Stream(Arc::new(Mutex::new(Some(rx)))));
    let pool = two_backends();
    let idle = Duration::from_secs(5);
    let gw = gateway(
        FailoverLayer::new(pool.clone()).stream_idle_timeout(idle),
        &upstream,
    );
    let first = Bytes::from_static(b"data: {\"choices\":[]}\n\n");
    tx.send(first.clone()).await.unwrap();

    let res = call(&gw).await;
    assert_eq!(res.status(), 200);
    assert_eq!(header(&res, "x-served-by"), "ptu (Test)");
    assert_eq!(status(&pool, "ptu").in_flight, 1);
    let mut body = Box::pin(res.into_body());
    let frame = body.frame().await.unwrap().unwrap();
    assert_eq!(frame.into_data().unwrap(), first);

    // The upstream says nothing more (its sender is still open): cut after the idle timeout.
    let start = Instant::now();
    let frame = body.frame().await.unwrap().unwrap();
    assert_eq!(start.elapsed(), idle);
    let event = String::from_utf8(frame.into_data().unwrap().to_vec()).unwrap();
    assert!(event.starts_with("\n\nevent: error\n"), "{event}");
    assert!(event.contains("upstream_stream_broken"), "{event}");
    assert!(body.frame().await.is_none(), "no [DONE] after the error");
    drop(body);

    // The backend answered: a broken stream is no circuit failure (see tests/outlier_service.rs).
    let ptu = status(&pool, "ptu");
    assert_eq!(ptu.window_failures, 0);
    assert_eq!(ptu.consecutive_failures, 0);
    assert_eq!(ptu.in_flight, 0);
    drop(tx);
}

#[tokio::test(start_paused = true)]
async fn a_stream_that_keeps_talking_is_not_cut() {
    let (tx, rx) = mpsc::channel(4);
    let upstream = Upstream::default();
    upstream.set("ptu", Reply::Stream(Arc::new(Mutex::new(Some(rx)))));
    let pool = two_backends();
    let idle = Duration::from_secs(5);
    let gw = gateway(
        FailoverLayer::new(pool.clone()).stream_idle_timeout(idle),
        &upstream,
    );

    let res = call(&gw).await;
    let mut body = Box::pin(res.into_body());
    // Each event comes just before the idle timeout, which every event restarts.
    for i in 0..3 {
        tokio::time::advance(idle - Duration::from_millis(1)).await;
        let event = Bytes::from(format!("data: {i}\n\n"));
        tx.send(event.clone()).await.unwrap();
        let frame = body.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), event);
    }
    drop(tx);
    assert!(body.frame().await.is_none());
    drop(body);
    let ptu = status(&pool, "ptu");
    assert_eq!(ptu.window_failures, 0);
    assert_eq!(ptu.in_flight, 0);
}

/// A body answer whose bytes come from the returned sender.
fn dribble(status: u16) -> (Reply, mpsc::Sender<Bytes>) {
    let (tx, rx) = mpsc::channel(16);
    (Reply::Dribble(status, Arc::new(Mutex::new(Some(rx)))), tx)
}

/// Whether a body error is the failover layer's timeout (what the rate-limit layer turns into 504).
fn timed_out(err: &BoxError) -> bool {
    err.downcast_ref::<std::io::Error>()
        .is_some_and(|e| e.kind() == std::io::ErrorKind::TimedOut)
}

#[tokio::test(start_paused = true)]
async fn azures_last_5xx_passed_through_is_cut_when_its_body_goes_silent() {
    let upstream = Upstream::default();
    let (reply, tx) = dribble(503);
    upstream.set("a", reply);
    let idle = Duration::from_secs(5);
    let gw = gateway(
        FailoverLayer::new(pool(&[("a", 1)], PoolSettings::default())).stream_idle_timeout(idle),
        &upstream,
    );
    tx.send(Bytes::from_static(b"{\"error\":")).await.unwrap();

    let res = call(&gw).await;
    assert_eq!(res.status(), 503);
    assert_eq!(header(&res, "x-served-by"), "a (Test)");
    let mut body = Box::pin(res.into_body());
    let frame = body.frame().await.unwrap().unwrap();
    assert_eq!(frame.into_data().unwrap(), "{\"error\":");

    // The backend says nothing more and keeps the connection: the body is cut, not left hanging.
    let start = Instant::now();
    let next = tokio::time::timeout(10 * idle, body.frame()).await;
    let err = next.expect("the body must not hang").unwrap().unwrap_err();
    assert!(timed_out(&err), "{err}");
    assert_eq!(start.elapsed(), idle);
    assert!(body.frame().await.is_none());
    drop(tx);
}

#[tokio::test(start_paused = true)]
async fn a_json_body_still_arriving_at_the_deadline_is_cut() {
    let upstream = Upstream::default();
    let (reply, tx) = dribble(200);
    upstream.set("ptu", reply);
    let pool = two_backends();
    let deadline = Duration::from_secs(10);
    let gw = gateway(
        FailoverLayer::new(pool.clone())
            .deadline(deadline)
            .stream_idle_timeout(Duration::from_secs(5)),
        &upstream,
    );
    // A byte every 4 s: never silent for the idle timeout, never done.
    let backend = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(4)).await;
            if tx.send(Bytes::from_static(b" ")).await.is_err() {
                break;
            }
        }
    });

    let start = Instant::now();
    let res = call(&gw).await;
    assert_eq!(res.status(), 200);
    let mut body = Box::pin(res.into_body());
    let read = async {
        loop {
            match body.frame().await {
                Some(Ok(_)) => continue,
                Some(Err(err)) => return err,
                None => panic!("the body must end with an error, not complete"),
            }
        }
    };
    let err = tokio::time::timeout(deadline * 10, read)
        .await
        .expect("the body must be cut at the deadline");
    assert!(timed_out(&err), "{err}");
    assert_eq!(start.elapsed(), deadline);
    drop(body);
    // A body broken after its headers is no circuit failure (the attempt was counted as served).
    let ptu = status(&pool, "ptu");
    assert_eq!(ptu.window_failures, 0);
    assert_eq!(ptu.in_flight, 0);
    backend.abort();
}

#[tokio::test(start_paused = true)]
async fn a_stream_may_outlast_the_deadline_while_it_keeps_talking() {
    let (tx, rx) = mpsc::channel(4);
    let upstream = Upstream::default();
    upstream.set("ptu", Reply::Stream(Arc::new(Mutex::new(Some(rx)))));
    let pool = two_backends();
    let gw = gateway(
        FailoverLayer::new(pool.clone())
            .deadline(Duration::from_secs(10))
            .stream_idle_timeout(Duration::from_secs(5)),
        &upstream,
    );

    let start = Instant::now();
    let res = call(&gw).await;
    let mut body = Box::pin(res.into_body());
    // Generation takes as long as it takes: the deadline bounds the wait for headers only.
    for i in 0..6 {
        tokio::time::advance(Duration::from_secs(4)).await;
        let event = Bytes::from(format!("data: {i}\n\n"));
        tx.send(event.clone()).await.unwrap();
        let frame = body.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), event);
    }
    assert_eq!(start.elapsed(), Duration::from_secs(24));
    drop(tx);
    assert!(body.frame().await.is_none());
    assert_eq!(status(&pool, "ptu").window_failures, 0);
}

// === stacking and policies ===

#[tokio::test(start_paused = true)]
async fn without_the_context_layer_the_answer_is_a_500_and_no_backend_is_called() {
    let upstream = Upstream::default();
    let gw = FailoverLayer::new(two_backends()).layer(upstream.client());

    for _ in 0..2 {
        let res = gw.clone().oneshot(chat()).await.unwrap();
        assert_eq!(res.status(), 500);
        assert_eq!(header(&res, "x-served-by"), "gateway");
        assert_eq!(header(&res, "x-gateway-attempts"), "0");
        let body = body(res).await;
        assert!(body.contains(r#""code":"InternalServerError""#), "{body}");
        assert!(body.contains("RequestContextLayer"), "{body}");
    }
    assert!(upstream.seen().is_empty());
}

/// Serves throttles as they are, for clients that back off on their own.
#[derive(Clone, Debug, Default)]
struct PassThrottles(AzurePolicy);

impl FailoverPolicy for PassThrottles {
    fn classify(&self, status: StatusCode, headers: &HeaderMap) -> Decision {
        match status {
            StatusCode::TOO_MANY_REQUESTS => Decision::Serve,
            _ => self.0.classify(status, headers),
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_custom_policy_replaces_azures_decisions() {
    let upstream = Upstream::default();
    upstream.set("ptu", Reply::with_header(429, "retry-after-ms", "5000"));
    let pool = two_backends();
    let gw = gateway(
        FailoverLayer::new(pool.clone()).policy(PassThrottles::default()),
        &upstream,
    );

    let res = call(&gw).await;
    assert_eq!(res.status(), 429);
    assert_eq!(header(&res, "x-served-by"), "ptu (Test)");
    assert_eq!(header(&res, "retry-after-ms"), "5000");
    assert_eq!(upstream.calls("paygo"), 0);
    assert_eq!(status(&pool, "ptu").state, BackendState::Available);

    // What it leaves to Azure's policy still fails over.
    upstream.set("ptu", Reply::status(503));
    let res = call(&gw).await;
    assert_eq!(header(&res, "x-served-by"), "paygo (Test)");
    assert_eq!(
        PassThrottles::default().classify(StatusCode::BAD_GATEWAY, &HeaderMap::new()),
        Decision::FailOver {
            outcome: Outcome::ServerError { hint: None },
            reason: AttemptOutcome::ServerError
        }
    );
}
