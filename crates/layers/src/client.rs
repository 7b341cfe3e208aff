//! The HTTP client service that sends each upstream attempt.
//!
//! [`ReqwestClient`] adapts a `reqwest::Client` to a tower `Service` of `http` types, so the failover
//! layer can be written against any client (a hyper client or a test `service_fn` work too).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tower::Service;

/// A tower `Service` sending `http::Request`s with reqwest and streaming the response body back.
#[derive(Clone, Debug)]
pub struct ReqwestClient {
    client: reqwest::Client,
}

/// Response future of [`ReqwestClient`].
pub type ClientFuture =
    Pin<Box<dyn Future<Output = Result<Response<reqwest::Body>, reqwest::Error>> + Send>>;

// === impl ReqwestClient ===

impl ReqwestClient {
    /// A client suited to a gateway: no redirects, no decompression, no overall timeout (the
    /// failover layer bounds each attempt), idle connections closed before Azure's 4-minute cut-off.
    ///
    /// # Panics
    ///
    /// If the TLS backend cannot initialise, which only happens at start-up; see [`Self::try_new`].
    #[allow(clippy::expect_used)]
    pub fn new() -> Self {
        Self::try_new().expect("the HTTP client's TLS backend initialises")
    }

    /// Like [`new`](Self::new), returning the error instead of panicking.
    pub fn try_new() -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder()
            // A redirect could carry the backend's credential to another host.
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(5))
            .pool_idle_timeout(Duration::from_secs(90))
            .tcp_nodelay(true)
            .build()?;
        Ok(Self { client })
    }

    /// Uses a client you configured yourself.
    pub fn from_client(client: reqwest::Client) -> Self {
        Self { client }
    }
}

impl Default for ReqwestClient {
    fn default() -> Self {
        Self::new()
    }
}

impl Service<Request<Full<Bytes>>> for ReqwestClient {
    type Response = Response<reqwest::Body>;
    type Error = reqwest::Error;
    type Future = ClientFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // reqwest queues internally; it is always ready.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Full<Bytes>>) -> Self::Future {
        let client = self.client.clone();
        Box::pin(async move {
            // `Full` is always ready: this takes its bytes back so reqwest sends a sized, reusable body.
            let req = req.map(|body| {
                body.collect()
                    .now_or_never()
                    .and_then(Result::ok)
                    .map(|c| c.to_bytes())
                    .unwrap_or_default()
            });
            let req = reqwest::Request::try_from(req)?;
            let res = client.execute(req).await?;
            Ok(Response::from(res))
        })
    }
}
