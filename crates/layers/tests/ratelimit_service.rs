//! Service-level tests of the rate-limit layer: a `service_fn` upstream, a real `MemoryStore`, paused
//! time. What a reservation becomes is read back from the store.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use gateway_core::limits::{
    Admission, LimitCheck, LimitStore, Limits, MemoryStore, Reservation, StoreError, Usage,
};
use gateway_core::operation::Operation;
use gateway_core::pool::{Backend, BackendPool, PoolSettings};
use gateway_core::request::RequestJson;
use gateway_core::tokens::{self, Encoding};
use gateway_layers::BoxError;
use gateway_layers::FailoverLayer;
use gateway_layers::auth::ConsumerKeys;
use gateway_layers::context::RequestContext;
use gateway_layers::ratelimit::{ConsumerLimits, OnStoreError, RateLimitLayer};
use gateway_layers::record::{Limit, Record};
use gateway_layers::{ConsumerAuthLayer, RequestContextLayer};
use http::{Request, Response};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use tokio::sync::mpsc;
use tokio::time::Instant;

use common::ChannelBody;
use tower::{Service, ServiceBuilder, ServiceExt, service_fn};

type UpstreamBody = BoxBody<Bytes, BoxError>;

const CHAT: &str = r#"{"messages":[{"role":"user","content":"Hello there"}],"max_tokens":10}"#;
const STREAM: &str =
    r#"{"messages":[{"role":"user","content":"Hello there"}],"max_tokens":10,"stream":true}"#;
const CONTENT: &str =
    "data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"},\"index\":0}],\"usage\":null}\n\n";
/// A usage chunk as Python's json writes it: spaces after colons.
const USAGE: &str = "data: {\"choices\": [], \"usage\": {\"prompt_tokens\": 9, \"completion_tokens\": 2, \"total_tokens\": 11}}\n\n";
const DONE: &str = "data: [DONE]\n\n";
/// A long prompt: its bound (bytes) is well above its exact count.
const LONG: &str = r#"{"messages":[{"role":"user","content":"The quick brown fox jumps over the lazy dog, again and again, until the dog finally wakes up."}],"max_tokens":10,"stream":true}"#;

/// What the upstream does with each call.
#[derive(Clone)]
enum Reply {
    Json(u16, &'static str),
    Fail,
    Stream(Arc<Mutex<Option<mpsc::Receiver<Bytes>>>>),
}

/// The upstream's calls: the bodies it would send.
type Seen = Arc<Mutex<Vec<Bytes>>>;

fn limits(tpm: u64, rpm: u64) -> ConsumerLimits {
    ConsumerLimits::all(Limits {
        tokens_per_minute: Some(tpm),
        requests_per_minute: Some(rpm),
        quota: None,
    })
}

/// Context, auth (key `k` is consumer `app`), the rate-limit layer, and an upstream answering
/// `reply`.
fn gateway<St: LimitStore>(
    layer: RateLimitLayer<St>,
    reply: Reply,
    seen: Seen,
) -> impl Service<
    Request<Full<Bytes>>,
    Response = Response<impl http_body::Body<Data = Bytes, Error = BoxError>>,
    Error = BoxError,
> + Clone {
    let keys = Arc::new(ConsumerKeys::new().consumer("app", ["k"], None));
    ServiceBuilder::new()
        .layer(RequestContextLayer::new(1 << 20))
        .layer(ConsumerAuthLayer::new(keys))
        .layer(layer)
        .service(service_fn(move |req: Request<Full<Bytes>>| {
            let reply = reply.clone();
            let seen = seen.clone();
            async move {
                // What a proxy below sends: the context's body with the recorded edits.
                let ctx = req.extensions().get::<RequestContext>().unwrap();
                seen.lock().unwrap().push(ctx.body_for(None));
                let res: Response<UpstreamBody> = match reply {
                    Reply::Json(status, body) => Response::builder()
                        .status(status)
                        .header("content-type", "application/json")
                        .header("content-length", body.len())
                        .body(Full::new(Bytes::from(body)).map_err(|e| match e {}).boxed())?,
                    Reply::Fail => return Err::<_, BoxError>("connection reset".into()),
                    Reply::Stream(rx) => {
                        let rx = rx.lock().unwrap().take().ok_or("stream taken")?;
                        Response::builder()
                            .header("content-type", "text/event-stream")
                            .body(ChannelBody(rx).boxed())?
                    }
                };
                Ok(res)
            }
        }))
}

fn chat(body: &'static str) -> Request<Full<Bytes>> {
    Request::post("/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21")
        .header("api-key", "k")
        .body(Full::new(Bytes::from(body)))
        .unwrap()
}

/// The exact estimate of `body`: its prompt counted with the tokenizer, plus its output limit.
fn exact(body: &str) -> u64 {
    tokens::estimate(Operation::ChatCompletions, "gpt-4o", body.as_bytes(), 16).total()
}

/// The upper bound of `body`'s estimate: its prompt's text counted one token per byte.
fn bound(body: &str) -> u64 {
    let json = RequestJson::parse(body.as_bytes()).unwrap();
    let op = Operation::ChatCompletions;
    tokens::upper_bound_parsed(op, Encoding::O200k, &json, body.as_bytes(), 16).total()
}

/// What the layer reserves for `body` under a tokens-per-minute limit of `tpm`: the bound when it is
/// at most a sixteenth of the limit, else the exact estimate.
fn reserved(body: &str, tpm: u64) -> u64 {
    if bound(body) * 16 <= tpm {
        bound(body)
    } else {
        exact(body)
    }
}

async fn used(layer: &RateLimitLayer<MemoryStore>) -> Usage {
    let check = layer.limits("app").unwrap().own_check("app").unwrap();
    layer.store().usage(&check).await.unwrap()
}

fn stream_reply() -> (Reply, mpsc::Sender<Bytes>) {
    let (tx, rx) = mpsc::channel(16);
    (Reply::Stream(Arc::new(Mutex::new(Some(rx)))), tx)
}

#[tokio::test(start_paused = true)]
async fn a_json_answer_is_reconciled_to_its_usage_before_it_is_sent() {
    let layer = RateLimitLayer::new(Arc::new(MemoryStore::new())).consumer("app", limits(1000, 10));
    let answer = r#"{"usage":{"prompt_tokens":5,"completion_tokens":1,"total_tokens":6}}"#;
    let gw = gateway(layer.clone(), Reply::Json(200, answer), Seen::default());

    let res = gw.oneshot(chat(CHAT)).await.unwrap();
    assert_eq!(res.headers()["x-gateway-tokens-consumed"], "6");
    let u = used(&layer).await;
    assert_eq!((u.tokens_this_minute, u.requests_this_minute), (6, 1));
    let record = res.extensions().get::<Arc<Record>>().unwrap();
    assert_eq!(record.usage().map(|u| u.total), Some(6));
    assert_eq!(
        record.estimate().map(|e| e.total()),
        Some(reserved(CHAT, 1000))
    );
}

#[tokio::test(start_paused = true)]
async fn far_from_every_limit_the_bound_is_reserved_and_the_usage_charged() {
    let tpm = 1_000_000;
    assert!(bound(LONG) > exact(LONG) + 50 && bound(LONG) * 16 <= tpm);
    let layer = RateLimitLayer::new(Arc::new(MemoryStore::new())).consumer("app", limits(tpm, 10));
    let (reply, tx) = stream_reply();
    let gw = gateway(layer.clone(), reply, Seen::default());

    let res = gw.oneshot(chat(LONG)).await.unwrap();
    // In flight, the consumer holds the bound, and the record says what was reserved.
    assert_eq!(used(&layer).await.tokens_this_minute, bound(LONG));
    let record = res.extensions().get::<Arc<Record>>().unwrap().clone();
    assert_eq!(record.estimate().map(|e| e.total()), Some(bound(LONG)));
    for chunk in [CONTENT, USAGE, DONE] {
        tx.send(Bytes::from(chunk)).await.unwrap();
    }
    drop(tx);
    res.into_body().collect().await.unwrap();
    layer.settled().await;
    assert_eq!(used(&layer).await.tokens_this_minute, 11);
}

#[tokio::test(start_paused = true)]
async fn as_what_is_left_shrinks_prompts_are_counted_so_bounds_in_flight_cost_little_room() {
    let (b, e) = (bound(LONG), exact(LONG));
    let tpm = b * 16 * 2;
    let layer =
        RateLimitLayer::new(Arc::new(MemoryStore::new())).consumer("app", limits(tpm, 1000));
    // Streams held open: every reservation stays in flight.
    let mut open = Vec::new();
    let mut estimates = Vec::new();
    loop {
        let (reply, tx) = stream_reply();
        let res = gateway(layer.clone(), reply, Seen::default())
            .oneshot(chat(LONG))
            .await
            .unwrap();
        if res.status() == 429 {
            break;
        }
        let record = res.extensions().get::<Arc<Record>>().unwrap().clone();
        estimates.push(record.estimate().unwrap().total());
        open.push((res, tx));
        assert!(open.len() < 1000, "never refused");
    }
    // A bound while what the last request left is at least 16 bounds (the first 17), then counts:
    // the bounds hold 17 b, and the rest of the minute is filled with exact reservations.
    let bounds = estimates.iter().filter(|&&t| t == b).count() as u64;
    assert_eq!(bounds, 17, "{estimates:?}");
    assert!(estimates[17..].iter().all(|&t| t == e), "{estimates:?}");
    assert_eq!(estimates.len() as u64, 17 + (tpm - 17 * b) / e);
    // Without the hint, every request would have reserved its bound: 32 in flight in all.
    assert!(estimates.len() as u64 > tpm / b);
}

#[tokio::test(start_paused = true)]
async fn near_a_limit_the_prompt_is_counted() {
    let tpm = bound(CHAT) * 16 - 1;
    let layer = RateLimitLayer::new(Arc::new(MemoryStore::new())).consumer("app", limits(tpm, 10));
    let gw = gateway(layer.clone(), Reply::Json(500, "{}"), Seen::default());

    let res = gw.oneshot(chat(CHAT)).await.unwrap();
    let record = res.extensions().get::<Arc<Record>>().unwrap();
    assert_eq!(record.estimate().map(|e| e.total()), Some(exact(CHAT)));
}

#[tokio::test(start_paused = true)]
async fn a_bound_the_store_refuses_is_counted_and_asked_for_again() {
    let tpm = bound(CHAT) * 16;
    // Two gateways sharing one store, as replicas share Redis: what one spends, the other has not
    // seen, so it still reserves a bound.
    let store = Arc::new(MemoryStore::new());
    let other = RateLimitLayer::new(store.clone()).consumer("app", limits(tpm, 10));
    let layer = RateLimitLayer::new(store).consumer("app", limits(tpm, 10));
    // The other's call leaves room for the exact estimate, not for the bound.
    let spent = tpm - exact(CHAT);
    assert!(tpm - spent < bound(CHAT));
    let first = format!(
        r#"{{"usage":{{"prompt_tokens":{spent},"completion_tokens":0,"total_tokens":{spent}}}}}"#
    );
    let first: &'static str = Box::leak(first.into_boxed_str());
    let gw = gateway(other, Reply::Json(200, first), Seen::default());
    assert_eq!(gw.oneshot(chat(CHAT)).await.unwrap().status(), 200);
    assert_eq!(used(&layer).await.tokens_this_minute, spent);

    let answer = r#"{"usage":{"prompt_tokens":9,"completion_tokens":1,"total_tokens":10}}"#;
    let gw = gateway(layer.clone(), Reply::Json(200, answer), Seen::default());
    let res = gw.clone().oneshot(chat(CHAT)).await.unwrap();
    assert_eq!(res.status(), 200);
    let record = res.extensions().get::<Arc<Record>>().unwrap();
    assert_eq!(record.estimate().map(|e| e.total()), Some(exact(CHAT)));
    let u = used(&layer).await;
    assert_eq!(
        (u.tokens_this_minute, u.requests_this_minute),
        (spent + 10, 2)
    );

    // Now not even the exact figure fits: 429.
    let res = gw.oneshot(chat(CHAT)).await.unwrap();
    assert_eq!(res.status(), 429);
}

#[tokio::test(start_paused = true)]
async fn an_answer_without_usage_is_charged_the_exact_estimate_not_the_bound() {
    let layer =
        RateLimitLayer::new(Arc::new(MemoryStore::new())).consumer("app", limits(1_000_000, 10));
    let gw = gateway(layer.clone(), Reply::Json(200, "{}"), Seen::default());

    let res = gw.oneshot(chat(CHAT)).await.unwrap();
    assert_eq!(res.status(), 200);
    assert!(bound(CHAT) > exact(CHAT));
    assert_eq!(used(&layer).await.tokens_this_minute, exact(CHAT));
    let record = res.extensions().get::<Arc<Record>>().unwrap();
    assert_eq!(record.charged().map(|c| c.usage.total), Some(exact(CHAT)));
}

#[tokio::test(start_paused = true)]
async fn a_failed_answer_releases_its_reservation() {
    let layer = RateLimitLayer::new(Arc::new(MemoryStore::new())).consumer("app", limits(1000, 10));
    let gw = gateway(layer.clone(), Reply::Json(500, "{}"), Seen::default());

    let res = gw.oneshot(chat(CHAT)).await.unwrap();
    assert_eq!(res.status(), 500);
    let u = used(&layer).await;
    assert_eq!((u.tokens_this_minute, u.requests_this_minute), (0, 1));
}

#[tokio::test(start_paused = true)]
async fn an_upstream_error_releases_its_reservation() {
    let layer = RateLimitLayer::new(Arc::new(MemoryStore::new())).consumer("app", limits(1000, 10));
    let gw = gateway(layer.clone(), Reply::Fail, Seen::default());

    assert!(gw.oneshot(chat(CHAT)).await.is_err());
    let u = used(&layer).await;
    assert_eq!((u.tokens_this_minute, u.requests_this_minute), (0, 1));
}

#[tokio::test(start_paused = true)]
async fn a_stream_is_charged_its_usage_and_the_unrequested_usage_chunk_is_hidden() {
    let layer = RateLimitLayer::new(Arc::new(MemoryStore::new())).consumer("app", limits(1000, 10));
    let (reply, tx) = stream_reply();
    let seen = Seen::default();
    let gw = gateway(layer.clone(), reply, seen.clone());

    let res = gw.oneshot(chat(STREAM)).await.unwrap();
    // The layer asked the backend for the usage chunk; the client did not.
    let sent: serde_json::Value = serde_json::from_slice(&seen.lock().unwrap()[0]).unwrap();
    assert_eq!(sent["stream_options"]["include_usage"], true);
    assert_eq!(sent["messages"][0]["content"], "Hello there");
    // While the stream runs, the reservation stands.
    assert_eq!(
        used(&layer).await.tokens_this_minute,
        reserved(STREAM, 1000)
    );

    for chunk in [CONTENT, USAGE, DONE] {
        tx.send(Bytes::from(chunk)).await.unwrap();
    }
    drop(tx);
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(
        std::str::from_utf8(&body).unwrap(),
        format!("{CONTENT}{DONE}")
    );
    layer.settled().await;
    assert_eq!(used(&layer).await.tokens_this_minute, 11);
}

#[tokio::test(start_paused = true)]
async fn a_stream_the_client_drops_is_charged_its_prompt_and_what_was_generated() {
    let layer = RateLimitLayer::new(Arc::new(MemoryStore::new())).consumer("app", limits(1000, 10));
    let (reply, tx) = stream_reply();
    let gw = gateway(layer.clone(), reply, Seen::default());

    let res = gw.oneshot(chat(STREAM)).await.unwrap();
    tx.send(Bytes::from(CONTENT)).await.unwrap();
    let mut body = res.into_body();
    assert!(body.frame().await.is_some());
    drop(body);
    layer.settled().await;
    // A usage chunk never came: the prompt and the one token generated, not the max_tokens that
    // was reserved and never produced.
    let prompt =
        tokens::estimate(Operation::ChatCompletions, "gpt-4o", STREAM.as_bytes(), 16).prompt;
    assert_eq!(used(&layer).await.tokens_this_minute, prompt + 1);
    assert!(prompt + 1 < reserved(STREAM, 1000));
}

#[tokio::test(start_paused = true)]
async fn over_the_request_limit_the_answer_is_429_and_the_record_says_why() {
    let layer = RateLimitLayer::new(Arc::new(MemoryStore::new())).consumer("app", limits(1000, 1));
    let gw = gateway(layer.clone(), Reply::Json(200, "{}"), Seen::default());

    assert_eq!(gw.clone().oneshot(chat(CHAT)).await.unwrap().status(), 200);
    let res = gw.oneshot(chat(CHAT)).await.unwrap();
    assert_eq!(res.status(), 429);
    assert_eq!(res.headers()["x-gateway-limit"], "requests");
    assert!(res.headers().contains_key("retry-after-ms"));
    let record = res.extensions().get::<Arc<Record>>().unwrap();
    assert_eq!(record.limit(), Some(Limit::Requests));
    assert_eq!(record.consumer().map(|c| &**c), Some("app"));
}

/// A store that always fails, counting how often it is asked.
#[derive(Default)]
struct DownStore {
    asked: AtomicUsize,
}

impl LimitStore for DownStore {
    async fn reserve(&self, _: &[LimitCheck], _: u64) -> Result<Admission, StoreError> {
        self.asked.fetch_add(1, Ordering::SeqCst);
        Err(StoreError("connection refused".into()))
    }

    async fn reconcile(&self, _: &Reservation, _: u64) -> Result<(), StoreError> {
        Ok(())
    }

    async fn usage(&self, _: &LimitCheck) -> Result<Usage, StoreError> {
        Err(StoreError("connection refused".into()))
    }
}

#[tokio::test(start_paused = true)]
async fn a_failing_store_is_left_alone_for_a_second_then_asked_again() {
    let store = Arc::new(DownStore::default());
    let layer = RateLimitLayer::new(store.clone()).consumer("app", limits(1000, 10));
    let gw = gateway(layer, Reply::Json(200, "{}"), Seen::default());

    // Fail-open: admitted unchecked, and the store rests.
    assert_eq!(gw.clone().oneshot(chat(CHAT)).await.unwrap().status(), 200);
    assert_eq!(gw.clone().oneshot(chat(CHAT)).await.unwrap().status(), 200);
    assert_eq!(store.asked.load(Ordering::SeqCst), 1);

    tokio::time::advance(Duration::from_millis(999)).await;
    gw.clone().oneshot(chat(CHAT)).await.unwrap();
    assert_eq!(store.asked.load(Ordering::SeqCst), 1);

    tokio::time::advance(Duration::from_millis(1)).await;
    gw.clone().oneshot(chat(CHAT)).await.unwrap();
    assert_eq!(store.asked.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn a_failing_store_refuses_with_503_under_fail_closed() {
    let layer = RateLimitLayer::new(Arc::new(DownStore::default()))
        .consumer("app", limits(1000, 10))
        .on_store_error(OnStoreError::FailClosed);
    let gw = gateway(layer, Reply::Json(200, "{}"), Seen::default());

    // The store failed: it rests a second, and the 503 says to come back then.
    let res = gw.clone().oneshot(chat(CHAT)).await.unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(res.headers()["retry-after-ms"], "1000");
    assert_eq!(res.headers()["retry-after"], "1");

    tokio::time::advance(Duration::from_millis(400)).await;
    let res = gw.oneshot(chat(CHAT)).await.unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(res.headers()["retry-after-ms"], "600");
}

// === over the failover layer ===

#[tokio::test(start_paused = true)]
async fn a_json_answer_dribbled_past_the_deadline_is_a_504_and_releases_its_reservation() {
    let layer = RateLimitLayer::new(Arc::new(MemoryStore::new())).consumer("app", limits(1000, 10));
    let answer = r#"{"usage":{"prompt_tokens":5,"completion_tokens":1,"total_tokens":6}}"#;
    let (tx, rx) = mpsc::channel::<Bytes>(16);
    let rx = Arc::new(Mutex::new(Some(rx)));
    let upstream = service_fn(move |_: Request<Full<Bytes>>| {
        let rx = rx.lock().unwrap().take();
        async move {
            let rx = rx.ok_or("called twice")?;
            // Headers at once, promising the whole answer; the body comes a byte at a time.
            Response::builder()
                .header("content-type", "application/json")
                .header("content-length", answer.len())
                .body(ChannelBody(rx).boxed())
                .map_err(BoxError::from)
        }
    });
    let backend = Backend {
        name: "east".to_owned(),
        region: "Test".to_owned(),
        endpoint: "http://east.test".to_owned(),
        priority: 1,
        weight: 1,
        deployments: [("gpt-4o".to_owned(), "gpt-4o".to_owned())].into(),
        credential: None,
    };
    let pool = Arc::new(BackendPool::new(vec![backend], PoolSettings::default()));
    let keys = Arc::new(ConsumerKeys::new().consumer("app", ["k"], None));
    let gw = ServiceBuilder::new()
        .layer(RequestContextLayer::new(1 << 20))
        .layer(ConsumerAuthLayer::new(keys))
        .layer(layer.clone())
        .layer(
            FailoverLayer::new(pool)
                .deadline(Duration::from_secs(10))
                .stream_idle_timeout(Duration::from_secs(5)),
        )
        .service(upstream);
    // A byte every 4 s: never silent for the idle timeout, never done before the deadline.
    let backend = tokio::spawn(async move {
        for byte in answer.bytes() {
            tokio::time::sleep(Duration::from_secs(4)).await;
            if tx.send(Bytes::from(vec![byte])).await.is_err() {
                break;
            }
        }
    });

    let start = Instant::now();
    let res = gw.oneshot(chat(CHAT)).await.unwrap();
    assert_eq!(res.status(), 504);
    assert_eq!(start.elapsed(), Duration::from_secs(10));
    let body = res.into_body().collect().await.unwrap().to_bytes();
    let body = std::str::from_utf8(&body).unwrap();
    assert!(body.contains(r#""code":"GatewayTimeout""#), "{body}");
    assert!(!body.contains("east.test"), "{body}");
    let u = used(&layer).await;
    assert_eq!((u.tokens_this_minute, u.requests_this_minute), (0, 1));
    backend.abort();
}
