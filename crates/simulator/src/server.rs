//! Serving a region: the router, and an accept loop that can kill single connections.
//!
//! `axum::serve` cannot close a connection from a handler, which the `drop` and `abort_stream`
//! faults need. So [`spawn`] runs its own accept loop: each connection is served by hyper's HTTP/1
//! builder in a task that races the connection against a per-connection [`ConnectionKill`]; the
//! kill switch travels to handlers in request extensions.

use std::fmt;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::{any, get, post};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::Service as _;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::{JoinHandle, JoinSet};

use crate::config::RegionConfig;
use crate::state::{Shared, SimHandle};
use crate::{admin, handlers, tokens};

/// A region served on a TCP port by [`spawn`].
pub struct RunningRegion {
    addr: SocketAddr,
    handle: SimHandle,
    task: JoinHandle<()>,
}

/// Closes one connection at once, without a response (inserted into each request's extensions).
#[derive(Clone, Debug, Default)]
pub(crate) struct ConnectionKill(Arc<Notify>);

/// The region's router and a handle on its state, for serving it yourself (e.g. with `axum::serve`).
///
/// Served this way, a `drop` fault cannot close the connection: it sends response headers and then
/// breaks the body instead. Use [`spawn`] for faithful connection faults.
pub fn router(config: RegionConfig) -> (Router, SimHandle) {
    tokens::warm_up();
    let shared = Arc::new(Shared::new(config));
    let router = Router::new()
        .route(
            "/sim/faults",
            post(admin::set_faults)
                .get(admin::list_faults)
                .delete(admin::clear_faults),
        )
        .route("/sim/stats", get(admin::stats))
        .route("/sim/reset", post(admin::reset))
        .route("/openai/{*path}", any(handlers::openai))
        .fallback(handlers::not_found)
        .with_state(Arc::clone(&shared));
    (router, SimHandle { shared })
}

/// Binds `addr` (port 0 picks a free port) and serves the region in a tokio task until
/// [`RunningRegion::shutdown`] (or the end of the runtime).
pub async fn spawn(config: RegionConfig, addr: SocketAddr) -> io::Result<RunningRegion> {
    let (router, handle) = router(config);
    let listener = TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    tracing::debug!(region = %handle.region(), %addr, "simulated region listening");
    let task = tokio::spawn(accept_loop(listener, router));
    Ok(RunningRegion { addr, handle, task })
}

async fn accept_loop(listener: TcpListener, router: Router) {
    // Dropping the set (when this task is aborted) aborts every connection task.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    connections.spawn(serve_connection(stream, router.clone()));
                }
                Err(error) => {
                    // Usually out of file descriptors: back off instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn serve_connection(stream: TcpStream, router: Router) {
    // Small SSE frames must leave at once.
    let _ = stream.set_nodelay(true);
    let kill = ConnectionKill::default();
    let service = TowerToHyperService::new(router);
    let request_kill = kill.clone();
    let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
        request.extensions_mut().insert(request_kill.clone());
        service.call(request)
    });
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .serve_connection(TokioIo::new(stream), service);
    tokio::select! {
        result = connection => {
            if let Err(error) = result {
                tracing::trace!(%error, "connection ended with an error");
            }
        }
        () = kill.0.notified() => tracing::trace!("connection killed by a fault"),
    }
}

// === impl ConnectionKill ===

impl ConnectionKill {
    /// Closes the connection (dropping it ends the TCP connection without a response).
    pub(crate) fn trigger(&self) {
        self.0.notify_one();
    }
}

// === impl RunningRegion ===

impl RunningRegion {
    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Base URL, e.g. `http://127.0.0.1:9001` (an unspecified bind address is shown as 127.0.0.1).
    pub fn url(&self) -> String {
        let mut addr = self.addr;
        if addr.ip().is_unspecified() {
            addr.set_ip(Ipv4Addr::LOCALHOST.into());
        }
        format!("http://{addr}")
    }

    /// A handle on the region's state.
    pub fn handle(&self) -> SimHandle {
        self.handle.clone()
    }

    /// Stops accepting connections and aborts the open ones.
    pub async fn shutdown(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

impl fmt::Debug for RunningRegion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RunningRegion")
            .field("addr", &self.addr)
            .field("region", &self.handle.region())
            .finish_non_exhaustive()
    }
}
