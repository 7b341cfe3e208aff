//! Run: `cargo run -p gateway-layers --example propagate`
//!
//! A plain axum app that only lets chosen headers through, and stamps its own.

use axum::Router;
use axum::http::HeaderMap;
use axum::routing::get;
use gateway_layers::PropagateHeadersLayer;
use gateway_layers::propagate::{ExistsAction, HeaderRules};

type Error = Box<dyn std::error::Error + Send + Sync>;

/// Lists the request headers that reached it, and answers with a mix of headers.
async fn handler(headers: HeaderMap) -> ([(&'static str, &'static str); 2], String) {
    let mut names: Vec<_> = headers.keys().map(|k| k.as_str().to_owned()).collect();
    names.sort();
    (
        [
            ("x-ms-region", "Sweden Central"),
            ("x-internal-debug", "secret"),
        ],
        names.join(","),
    )
}

/// Serves the app on a free port, calls it, and returns which headers crossed.
pub(crate) async fn run() -> Result<String, Error> {
    let rules = HeaderRules::default()
        .set_request("x-gateway", "example", ExistsAction::Override)?
        .set_response("cache-control", "no-store", ExistsAction::Skip)?;
    let app = Router::new()
        .route("/", get(handler))
        .layer(PropagateHeadersLayer::new(rules));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });

    let res = reqwest::Client::new()
        .get(format!("http://{addr}/"))
        .header("api-key", "never-forwarded")
        .header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .send()
        .await?;
    let mut returned: Vec<_> = res
        .headers()
        .keys()
        .map(|k| k.as_str().to_owned())
        .collect();
    returned.sort();
    Ok(format!(
        "reached the handler: {}\nreturned to the client: {}",
        res.text().await?,
        returned.join(",")
    ))
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    println!("{}", run().await?);
    Ok(())
}
