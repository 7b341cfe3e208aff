//! Run: `cargo run -p gateway-layers --example auth`
//!
//! A plain axum app where two applications authenticate with their own keys; one may only call
//! embeddings.

use std::sync::Arc;

use axum::routing::post;
use axum::{Extension, Router};
use gateway_layers::auth::{Consumer, ConsumerKeys};
use gateway_layers::{ConsumerAuthLayer, RequestContextLayer};
use tower::ServiceBuilder;

type Error = Box<dyn std::error::Error + Send + Sync>;

/// Serves the app on a free port, calls it as different consumers, and returns the statuses.
pub(crate) async fn run() -> Result<String, Error> {
    let keys = ConsumerKeys::new()
        .consumer("chatbot", ["chatbot-key"], None)
        .consumer(
            "indexer",
            ["indexer-key"],
            Some(vec!["text-embedding-3-small".into()]),
        );
    let app = Router::new()
        .route(
            "/openai/{*path}",
            post(|Extension(c): Extension<Consumer>| async move { format!("hello {}", c.name) }),
        )
        // The context layer finds the deployment, which the auth layer checks against each consumer.
        .layer(
            ServiceBuilder::new()
                .layer(RequestContextLayer::new(64 * 1024))
                .layer(ConsumerAuthLayer::new(Arc::new(keys))),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });

    let chat =
        format!("http://{addr}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21");
    let client = reqwest::Client::new();
    let mut lines = Vec::new();
    for key in ["chatbot-key", "indexer-key", "wrong-key"] {
        let res = client
            .post(&chat)
            .header("api-key", key)
            .body("{}")
            .send()
            .await?;
        lines.push(format!(
            "{key}: {} {}",
            res.status().as_u16(),
            res.text().await?
        ));
    }
    Ok(lines.join("\n"))
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    println!("{}", run().await?);
    Ok(())
}
