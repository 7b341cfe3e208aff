//! The rate-limit layer at its edges: an SSE answer that announces its length while the usage chunk
//! is taken out of it, and a request abandoned before its answer's headers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use bytes::Bytes;
use gateway_core::limits::{LimitStore, Limits, MemoryStore};
use gateway_layers::BoxError;
use gateway_layers::auth::ConsumerKeys;
use gateway_layers::ratelimit::{ConsumerLimits, RateLimitLayer};
use gateway_layers::{ConsumerAuthLayer, RequestContextLayer};
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tower::{ServiceBuilder, ServiceExt, service_fn};

const STREAM: &str =
    r#"{"messages":[{"role":"user","content":"Hello there"}],"max_tokens":10,"stream":true}"#;
const CONTENT: &str =
    "data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"},\"index\":0}],\"usage\":null}\n\n";
const USAGE: &str = "data: {\"choices\": [], \"usage\": {\"prompt_tokens\": 9, \"completion_tokens\": 2, \"total_tokens\": 11}}\n\n";
const DONE: &str = "data: [DONE]\n\n";

fn layer() -> RateLimitLayer<MemoryStore> {
    let limits = Limits {
        tokens_per_minute: Some(10_000),
        ..Limits::default()
    };
    RateLimitLayer::new(Arc::new(MemoryStore::new())).consumer("app", ConsumerLimits::all(limits))
}

fn chat() -> Request<Full<Bytes>> {
    Request::post("/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21")
        .header("api-key", "k")
        .body(Full::new(Bytes::from(STREAM)))
        .unwrap()
}

async fn tokens_used(layer: &RateLimitLayer<MemoryStore>) -> u64 {
    let check = layer.limits("app").unwrap().own_check("app").unwrap();
    layer
        .store()
        .usage(&check)
        .await
        .unwrap()
        .tokens_this_minute
}

#[tokio::test(start_paused = true)]
async fn an_sse_answer_with_a_length_loses_the_length_with_its_usage_chunk() {
    let layer = layer();
    let keys = Arc::new(ConsumerKeys::new().consumer("app", ["k"], None));
    let whole = format!("{CONTENT}{USAGE}{DONE}");
    let gw = ServiceBuilder::new()
        .layer(RequestContextLayer::new(1 << 20))
        .layer(ConsumerAuthLayer::new(keys))
        .layer(layer.clone())
        .service(service_fn(move |_req: Request<Full<Bytes>>| {
            let whole = whole.clone();
            async move {
                // A backend (or a proxy in front of it) that buffered the stream and says how long.
                Response::builder()
                    .header("content-type", "text/event-stream")
                    .header("content-length", whole.len())
                    .body(Full::new(Bytes::from(whole)).map_err(|e| match e {}))
                    .map_err(BoxError::from)
            }
        }));
    let res = gw.oneshot(chat()).await.unwrap();
    let announced = res.headers().get("content-length").cloned();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, Bytes::from(format!("{CONTENT}{DONE}")));
    // Either no length or the true one: never the backend's, which counted the usage chunk.
    if let Some(length) = announced {
        assert_eq!(length.to_str().unwrap(), body.len().to_string());
    }
    layer.settled().await;
    assert_eq!(tokens_used(&layer).await, 11);
}

#[tokio::test(start_paused = true)]
async fn a_request_abandoned_before_its_answer_releases_its_reservation() {
    let layer = layer();
    let keys = Arc::new(ConsumerKeys::new().consumer("app", ["k"], None));
    let (called_tx, called_rx) = tokio::sync::oneshot::channel::<()>();
    let called_tx = Arc::new(std::sync::Mutex::new(Some(called_tx)));
    let gw = ServiceBuilder::new()
        .layer(RequestContextLayer::new(1 << 20))
        .layer(ConsumerAuthLayer::new(keys))
        .layer(layer.clone())
        .service(service_fn(move |_req: Request<Full<Bytes>>| {
            let called = called_tx.lock().unwrap().take();
            async move {
                if let Some(called) = called {
                    let _ = called.send(());
                }
                // The backend never answers.
                std::future::pending::<()>().await;
                Ok::<Response<Full<Bytes>>, BoxError>(Response::new(Full::default()))
            }
        }));
    let call = tokio::spawn(gw.oneshot(chat()));
    // The request reached the backend: its reservation is made.
    called_rx.await.unwrap();
    assert!(tokens_used(&layer).await > 0, "reserved while waiting");
    // The client goes away: the server drops the request's future.
    call.abort();
    assert!(call.await.is_err_and(|e| e.is_cancelled()));
    layer.settled().await;
    assert_eq!(tokens_used(&layer).await, 0);
}
