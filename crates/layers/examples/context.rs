//! Run: `cargo run -p gateway-layers --example context`
//!
//! A plain axum app whose handler reads the `RequestContext` the layer captured.

use axum::routing::post;
use axum::{Extension, Json, Router};
use gateway_layers::RequestContextLayer;
use gateway_layers::context::RequestContext;
use serde_json::{Value, json};

type Error = Box<dyn std::error::Error + Send + Sync>;

async fn describe(Extension(ctx): Extension<RequestContext>) -> Json<Value> {
    Json(json!({
        "request_id": ctx.request_id.to_str().unwrap_or_default(),
        "operation": ctx.operation.as_str(),
        "deployment": ctx.deployment,
        "api_version": ctx.api_version,
        "stream": ctx.stream(),
        "max_tokens": ctx.max_tokens(),
        "body_bytes": ctx.body().len(),
    }))
}

/// Serves the app on a free port, calls it twice, and returns what it answered.
pub(crate) async fn run() -> Result<String, Error> {
    let app = Router::new()
        .route("/openai/{*path}", post(describe))
        .layer(RequestContextLayer::new(64 * 1024));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });

    let client = reqwest::Client::new();
    let ok = client
        .post(format!(
            "http://{addr}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
        ))
        .header("x-request-id", "example-1")
        .body(r#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":64,"stream":true}"#)
        .send()
        .await?
        .text()
        .await?;
    let bad = client
        .post(format!("http://{addr}/openai/v1/chat/completions"))
        .body("{not json")
        .send()
        .await?;
    let status = bad.status();
    Ok(format!(
        "captured: {ok}\ninvalid JSON: {status} {}",
        bad.text().await?
    ))
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    println!("{}", run().await?);
    Ok(())
}
