//! The circuit breaker (outlier detection) seen through the failover layer: a `service_fn` stands in
//! for every backend, time is paused, and each behaviour is proved by counting the calls each backend
//! received and reading the pool's state.
//!
//! The issue this answers: a breaker that opened on 5 failures in 10 s, whatever the volume, turned 5%
//! of 503s on every region into an outage.
#![allow(missing_docs, clippy::unwrap_used)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use gateway_core::pool::{Backend, BackendPool, BackendState, PoolSettings};
use gateway_layers::{BoxError, FailoverLayer, RequestContextLayer};
use http::{Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use tower::{Service, ServiceBuilder, ServiceExt};

const CHAT: &str = "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21";

type UpstreamBody = BoxBody<Bytes, BoxError>;

/// What a backend does with its n-th call (counting from 0).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Behaviour {
    /// 200, except a 503 on every `every`-th call.
    ServerErrorEvery(usize),
    /// Refuses every connection.
    Refuse,
    /// Fails every connection as a gateway out of file descriptors does (EMFILE).
    OutOfDescriptors,
    /// Starts a stream, then breaks it after one event.
    BreakStreams,
    /// 200.
    Healthy,
}

/// Every backend, behind one `service_fn`, told apart by host (`http://{name}.test`).
#[derive(Clone, Default)]
struct Upstream {
    behaviour: Arc<Mutex<HashMap<String, Behaviour>>>,
    calls: Arc<Mutex<HashMap<String, usize>>>,
}

impl Upstream {
    fn set(&self, backend: &str, behaviour: Behaviour) {
        self.behaviour
            .lock()
            .unwrap()
            .insert(backend.to_owned(), behaviour);
    }

    fn calls(&self, backend: &str) -> usize {
        self.calls
            .lock()
            .unwrap()
            .get(backend)
            .copied()
            .unwrap_or(0)
    }

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
                let name = req.uri().host().unwrap_or_default();
                let name = name.trim_end_matches(".test").to_owned();
                let n = {
                    let mut calls = this.calls.lock().unwrap();
                    let n = calls.entry(name.clone()).or_default();
                    *n += 1;
                    *n - 1
                };
                let behaviour = this.behaviour.lock().unwrap().get(&name).copied();
                respond(behaviour.unwrap_or(Behaviour::Healthy), n)
            }
        })
    }
}

fn respond(behaviour: Behaviour, n: usize) -> Result<Response<UpstreamBody>, BoxError> {
    let status = match behaviour {
        Behaviour::ServerErrorEvery(every) if n % every == every - 1 => 503,
        Behaviour::Refuse => return Err(std::io::Error::from_raw_os_error(111).into()),
        Behaviour::OutOfDescriptors => return Err(std::io::Error::from_raw_os_error(24).into()),
        Behaviour::BreakStreams => {
            let mut res = Response::new(BreakingBody(0).boxed());
            res.headers_mut()
                .insert("content-type", "text/event-stream".parse()?);
            return Ok(res);
        }
        _ => 200,
    };
    let body = Full::new(Bytes::from_static(b"{}"))
        .map_err(|never| match never {})
        .boxed();
    let mut res = Response::new(body);
    *res.status_mut() = StatusCode::from_u16(status)?;
    res.headers_mut()
        .insert("content-type", "application/json".parse()?);
    Ok(res)
}

/// One SSE event, then a reset connection.
struct BreakingBody(u8);

impl http_body::Body for BreakingBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.0 += 1;
        Poll::Ready(match self.0 {
            1 => Some(Ok(Frame::data(Bytes::from_static(
                b"data: {\"choices\":[]}\n\n",
            )))),
            2 => Some(Err(std::io::Error::from_raw_os_error(104).into())),
            _ => None,
        })
    }
}

/// Backends `(name, priority)`, each serving `gpt-4o`, with the default (policy) settings.
fn pool(backends: &[(&str, u32)]) -> Arc<BackendPool> {
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
    Arc::new(BackendPool::new(backends, PoolSettings::default()).with_rng_seed(7))
}

type Gateway = Response<
    gateway_layers::record::RecordBody<gateway_layers::failover::FailoverBody<UpstreamBody>>,
>;

fn gateway(
    pool: &Arc<BackendPool>,
    upstream: &Upstream,
) -> impl Service<Request<Full<Bytes>>, Response = Gateway, Error = Infallible> + Clone {
    ServiceBuilder::new()
        .layer(RequestContextLayer::new(1 << 20))
        .layer(FailoverLayer::new(pool.clone()))
        .service(upstream.client())
}

/// Sends one chat call and reads its body whole; the status and who served it.
async fn call<S>(gateway: &S) -> (u16, String)
where
    S: Service<Request<Full<Bytes>>, Response = Gateway, Error = Infallible> + Clone,
{
    let req = Request::post(CHAT)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(
            br#"{"messages":[{"role":"user","content":"Hello"}],"max_tokens":10}"#,
        )))
        .unwrap();
    let res = gateway.clone().oneshot(req).await.unwrap();
    let status = res.status().as_u16();
    let served_by = res
        .headers()
        .get("x-served-by")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    // A broken body is an error here: that is what the client sees too.
    let _ = res.into_body().collect().await;
    (status, served_by)
}

fn state(pool: &BackendPool, name: &str) -> BackendState {
    let now = tokio::time::Instant::now().into_std();
    pool.snapshot(now)
        .into_iter()
        .find(|s| s.name == name)
        .unwrap()
        .state
}

#[tokio::test(start_paused = true)]
async fn five_percent_503s_on_every_region_never_open_a_circuit() {
    let pool = pool(&[("sweden", 1), ("france", 2), ("eastus", 3)]);
    let upstream = Upstream::default();
    for name in ["sweden", "france", "eastus"] {
        upstream.set(name, Behaviour::ServerErrorEvery(20));
    }
    let gw = gateway(&pool, &upstream);
    let mut served = 0;
    for _ in 0..1_000 {
        if call(&gw).await.0 == 200 {
            served += 1;
        }
        for name in ["sweden", "france", "eastus"] {
            assert_eq!(state(&pool, name), BackendState::Available, "{name}");
        }
        tokio::time::advance(Duration::from_millis(10)).await;
    }
    // Every 503 failed over; the priority region took nearly everything.
    assert_eq!(served, 1_000);
    assert_eq!(upstream.calls("sweden"), 1_000);
    assert_eq!(upstream.calls("france"), 50);
    assert_eq!(pool.panic_selections(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_backend_failing_every_request_is_ejected_once_over_the_volume() {
    let pool = pool(&[("sweden", 1), ("france", 2)]);
    let upstream = Upstream::default();
    upstream.set("sweden", Behaviour::ServerErrorEvery(1));
    let gw = gateway(&pool, &upstream);
    for i in 1..=19 {
        assert_eq!(call(&gw).await, (200, "france (Test)".to_owned()));
        assert_eq!(state(&pool, "sweden"), BackendState::Available, "{i}");
    }
    // The 20th failure reaches the default request volume, all failed: ejected for 30 s.
    call(&gw).await;
    assert_eq!(state(&pool, "sweden"), BackendState::CircuitOpen);
    for _ in 0..10 {
        assert_eq!(call(&gw).await, (200, "france (Test)".to_owned()));
    }
    assert_eq!(upstream.calls("sweden"), 20);
    tokio::time::advance(Duration::from_secs(30)).await;
    assert_eq!(state(&pool, "sweden"), BackendState::HalfOpen);
}

#[tokio::test(start_paused = true)]
async fn consecutive_connection_failures_eject_a_backend() {
    let pool = pool(&[("sweden", 1), ("france", 2)]);
    let upstream = Upstream::default();
    upstream.set("sweden", Behaviour::Refuse);
    let gw = gateway(&pool, &upstream);
    for _ in 0..5 {
        assert_eq!(call(&gw).await, (200, "france (Test)".to_owned()));
    }
    assert_eq!(state(&pool, "sweden"), BackendState::CircuitOpen);
    for _ in 0..10 {
        call(&gw).await;
    }
    assert_eq!(upstream.calls("sweden"), 5);
}

#[tokio::test(start_paused = true)]
async fn broken_streams_never_count_against_a_backend() {
    let pool = pool(&[("sweden", 1), ("france", 2)]);
    let upstream = Upstream::default();
    upstream.set("sweden", Behaviour::BreakStreams);
    let gw = gateway(&pool, &upstream);
    for _ in 0..100 {
        assert_eq!(call(&gw).await, (200, "sweden (Test)".to_owned()));
    }
    assert_eq!(state(&pool, "sweden"), BackendState::Available);
    assert_eq!(upstream.calls("sweden"), 100);
    assert_eq!(upstream.calls("france"), 0);
}

#[tokio::test(start_paused = true)]
async fn running_out_of_descriptors_never_counts_against_a_backend() {
    let pool = pool(&[("sweden", 1), ("france", 2)]);
    let upstream = Upstream::default();
    upstream.set("sweden", Behaviour::OutOfDescriptors);
    upstream.set("france", Behaviour::OutOfDescriptors);
    let gw = gateway(&pool, &upstream);
    for _ in 0..50 {
        assert_eq!(call(&gw).await.0, 502);
    }
    assert_eq!(state(&pool, "sweden"), BackendState::Available);
    assert_eq!(state(&pool, "france"), BackendState::Available);
    assert_eq!(upstream.calls("sweden"), 50);
}

#[tokio::test(start_paused = true)]
async fn ejection_never_takes_more_than_half_of_a_priority_group() {
    let names = ["a", "b", "c", "d"];
    let pool = pool(&[("a", 1), ("b", 1), ("c", 1), ("d", 1), ("paygo", 2)]);
    let upstream = Upstream::default();
    for name in names {
        upstream.set(name, Behaviour::Refuse);
    }
    let gw = gateway(&pool, &upstream);
    for _ in 0..50 {
        assert_eq!(call(&gw).await, (200, "paygo (Test)".to_owned()));
    }
    let ejected = names
        .iter()
        .filter(|name| state(&pool, name) == BackendState::CircuitOpen)
        .count();
    assert_eq!(ejected, 2);
    // The two left in rotation are still tried, and still fail over.
    let calls: usize = names.iter().map(|name| upstream.calls(name)).sum();
    assert!(calls > 10 + 50, "{calls}");
}

#[tokio::test(start_paused = true)]
async fn with_every_backend_ejected_the_gateway_still_serves() {
    let pool = pool(&[("sweden", 1), ("france", 2)]);
    let upstream = Upstream::default();
    upstream.set("sweden", Behaviour::Refuse);
    upstream.set("france", Behaviour::Refuse);
    let gw = gateway(&pool, &upstream);
    for _ in 0..5 {
        assert_eq!(call(&gw).await.0, 502);
    }
    assert_eq!(state(&pool, "sweden"), BackendState::CircuitOpen);
    assert_eq!(state(&pool, "france"), BackendState::CircuitOpen);

    // They come back before their ejection ends: panic mode finds out at once.
    upstream.set("sweden", Behaviour::Healthy);
    upstream.set("france", Behaviour::Healthy);
    assert_eq!(call(&gw).await, (200, "sweden (Test)".to_owned()));
    assert_eq!(pool.panic_selections(), 1);
}
