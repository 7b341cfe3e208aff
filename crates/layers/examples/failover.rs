//! Run: `cargo run -p gateway-layers --example failover`
//!
//! A plain axum app that fails over between two simulated Azure OpenAI regions: the preferred one
//! is throttled, so the other serves, and the client only sees `x-served-by` change.

use std::sync::Arc;

use axum::Router;
use gateway_core::pool::{Backend, BackendPool, PoolSettings};
use gateway_core::secret::{Credential, Secret};
use gateway_layers::client::ReqwestClient;
use gateway_layers::{FailoverLayer, RequestContextLayer};
use simulator::{DeploymentConfig, Fault, RegionConfig};
use tower::ServiceBuilder;

type Error = Box<dyn std::error::Error + Send + Sync>;

/// Starts two regions and the app, throttles the first region, and returns who served each call.
pub(crate) async fn run() -> Result<String, Error> {
    let any_port = "127.0.0.1:0".parse()?;
    let sweden = simulator::spawn(
        RegionConfig::new("Sweden Central", "key-swc")
            .deployment(DeploymentConfig::chat("gpt-4o-ptu", 100_000)),
        any_port,
    )
    .await?;
    let france = simulator::spawn(
        RegionConfig::new("France Central", "key-frc")
            .deployment(DeploymentConfig::chat("gpt-4o-std", 100_000)),
        any_port,
    )
    .await?;
    let backend = |name: &str, region: &str, url: String, priority, own: &str, key: &str| Backend {
        name: name.into(),
        region: region.into(),
        endpoint: url,
        priority,
        weight: 1,
        deployments: [("gpt-4o".to_string(), own.to_string())].into(),
        credential: Some(Credential::ApiKey(Secret::new(key))),
    };
    let pool = Arc::new(BackendPool::new(
        vec![
            backend(
                "ptu-sweden",
                "Sweden Central",
                sweden.url(),
                1,
                "gpt-4o-ptu",
                "key-swc",
            ),
            backend(
                "std-france",
                "France Central",
                france.url(),
                2,
                "gpt-4o-std",
                "key-frc",
            ),
        ],
        PoolSettings::default(),
    ));
    let proxy = ServiceBuilder::new()
        // Captures the body once; the failover layer replays it on every attempt.
        .layer(RequestContextLayer::new(1 << 20))
        .layer(FailoverLayer::new(pool).max_attempts(3))
        .service(ReqwestClient::new());
    let app = Router::new().route_service("/openai/{*path}", proxy);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });

    let url =
        format!("http://{addr}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21");
    let call = || async {
        let res = reqwest::Client::new()
            .post(&url)
            .body(r#"{"messages":[{"role":"user","content":"Hello"}],"max_tokens":10}"#)
            .send()
            .await?;
        let served = res
            .headers()
            .get("x-served-by")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("?")
            .to_owned();
        Ok::<_, Error>(format!("{} served by {served}", res.status().as_u16()))
    };
    let mut lines = vec![format!("before: {}", call().await?)];
    let throttle: Fault =
        serde_json::from_str(r#"{"kind":"status","status":429,"retry_after_ms":30000}"#)?;
    sweden.handle().set_faults(vec![throttle]);
    lines.push(format!("Sweden throttled: {}", call().await?));
    lines.push(format!("still cooling down: {}", call().await?));
    lines.push(format!(
        "calls that reached Sweden: {}, France: {}",
        sweden.handle().request_count(),
        france.handle().request_count()
    ));
    Ok(lines.join("\n"))
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    println!("{}", run().await?);
    Ok(())
}
