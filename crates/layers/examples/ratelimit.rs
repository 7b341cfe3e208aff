//! Run: `cargo run -p gateway-layers --example ratelimit`
//!
//! A plain axum app that limits each consumer's requests and tokens per minute, counted in memory.
//! The handler stands in for Azure OpenAI and reports usage the way Azure does.

use std::sync::Arc;

use axum::Router;
use axum::routing::post;
use gateway_core::limits::{Limits, MemoryStore};
use gateway_layers::auth::ConsumerKeys;
use gateway_layers::ratelimit::ConsumerLimits;
use gateway_layers::{ConsumerAuthLayer, RateLimitLayer, RequestContextLayer};
use tower::ServiceBuilder;

type Error = Box<dyn std::error::Error + Send + Sync>;

async fn fake_azure() -> ([(&'static str, &'static str); 1], &'static str) {
    (
        [("content-type", "application/json")],
        r#"{"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":21,"total_tokens":30}}"#,
    )
}

/// Serves the app on a free port, calls it until the limit bites, and returns what it answered.
pub(crate) async fn run() -> Result<String, Error> {
    let keys = ConsumerKeys::new().consumer("chatbot", ["chatbot-key"], None);
    let limits = ConsumerLimits::all(Limits {
        requests_per_minute: Some(3),
        tokens_per_minute: Some(10_000),
        ..Limits::default()
    });
    let app = Router::new()
        .route("/openai/{*path}", post(fake_azure))
        .layer(
            ServiceBuilder::new()
                // The limits layer reads the captured body (to estimate tokens) and the consumer.
                .layer(RequestContextLayer::new(64 * 1024))
                .layer(ConsumerAuthLayer::new(Arc::new(keys)))
                .layer(
                    RateLimitLayer::new(Arc::new(MemoryStore::new())).consumer("chatbot", limits),
                ),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });

    let url =
        format!("http://{addr}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21");
    let mut lines = Vec::new();
    for _ in 0..4 {
        let res = reqwest::Client::new()
            .post(&url)
            .header("api-key", "chatbot-key")
            .body(r#"{"messages":[{"role":"user","content":"Hello"}],"max_tokens":100}"#)
            .send()
            .await?;
        let header = |name: &str| {
            res.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-")
                .to_owned()
        };
        lines.push(format!(
            "{} remaining-requests={} remaining-tokens={} consumed={} retry-after={}",
            res.status().as_u16(),
            header("x-ratelimit-remaining-requests"),
            header("x-ratelimit-remaining-tokens"),
            header("x-gateway-tokens-consumed"),
            header("retry-after"),
        ));
    }
    Ok(lines.join("\n"))
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    println!("{}", run().await?);
    Ok(())
}
