//! Serving with graceful shutdown.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use axum::middleware::Next;
use axum::response::Response;
use axum::serve::ListenerExt;
use gateway_layers::context::{client_request_id, new_request_id};
use gateway_layers::headers::X_REQUEST_ID;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::app::Gateway;
use crate::reload::Current;

/// How often the Prometheus recorder folds recorded histogram samples in: keeps memory bounded
/// between scrapes.
const METRICS_UPKEEP: Duration = Duration::from_secs(5);

/// Serves `gateway` on `listener` until `shutdown` resolves; then stops accepting and lets in-flight
/// requests (streams included) finish for at most `grace` before dropping them.
///
/// When the gateway has admin endpoints of their own (`admin.listen`), they are served there too,
/// and stop with the rest.
pub async fn serve(
    listener: TcpListener,
    gateway: Gateway,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> io::Result<()> {
    let (_fixed, current) = watch::channel(gateway);
    serve_current(listener, current, shutdown, grace).await
}

/// Like [`serve`], for the gateway current in `gateways` when each request arrives: a policy
/// reload ([`crate::reload`]) swaps it while requests in flight finish on theirs. The admin
/// listener, metrics upkeep and draining flag are the first gateway's, which reloads keep.
pub async fn serve_current(
    listener: TcpListener,
    gateways: watch::Receiver<Gateway>,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> io::Result<()> {
    // Only what outlives reloads is taken from the first gateway: holding it whole would keep its
    // stack (and its tasks) alive after a reload replaced it.
    let (admin_listen, draining, metrics) = {
        let first = gateways.borrow();
        let listen = first.admin.as_ref().map(|a| a.listen);
        (listen, first.draining.clone(), first.metrics.clone())
    };
    // Bound before anything else starts, so a taken admin port fails start-up as a whole.
    let admin = match admin_listen {
        Some(addr) => {
            let listener = TcpListener::bind(addr).await.map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("cannot listen on admin.listen {addr}: {e}"),
                )
            })?;
            tracing::info!(%addr, "admin endpoints listening");
            Some((listener, Current::admin(gateways.clone())))
        }
        None => None,
    };
    let (tx, mut rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        draining.store(true, Ordering::Relaxed);
        let _ = tx.send(true);
    });
    let admin = admin.map(|(listener, router)| {
        let mut stop = rx.clone();
        tokio::spawn(
            axum::serve(listener, Router::new().fallback_service(router))
                .with_graceful_shutdown(async move {
                    let _ = stop.wait_for(|v| *v).await;
                })
                .into_future(),
        )
    });
    let upkeep = tokio::spawn(async move {
        let mut every = tokio::time::interval(METRICS_UPKEEP);
        loop {
            every.tick().await;
            metrics.run_upkeep();
        }
    });
    let mut graceful_rx = rx.clone();
    // Without TCP_NODELAY the last small write of a stream waits for the client's delayed ACK:
    // measured as +40 ms per streamed answer on a reused connection (docs/benchmarks.md).
    let listener = listener.tap_io(|tcp| {
        if let Err(err) = tcp.set_nodelay(true) {
            tracing::debug!(%err, "could not set TCP_NODELAY");
        }
    });
    // The peer's address rides in each request's extensions (`ConnectInfo`), for the access log.
    let app = Router::new()
        .fallback_service(Current::main(gateways))
        .layer(axum::middleware::from_fn(stamp_request_id))
        .into_make_service_with_connect_info::<SocketAddr>();
    let server = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = graceful_rx.wait_for(|v| *v).await;
        })
        .into_future();
    tokio::pin!(server);
    let result = tokio::select! {
        res = &mut server => res,
        _ = async {
            let _ = rx.wait_for(|v| *v).await;
            tracing::info!(grace_seconds = grace.as_secs_f64(), "shutting down: draining in-flight requests");
            tokio::time::sleep(grace).await;
        } => {
            tracing::warn!("grace period over; closing the remaining connections");
            Ok(())
        }
    };
    upkeep.abort();
    if let Some(admin) = admin {
        // The status page holds keep-alive connections open: they must not outlive the gateway.
        admin.abort();
    }
    result
}

/// Gives the answers made outside the proxy stack (health, metrics, admin, the 404 fallback) the
/// `x-request-id` every proxied answer carries: the client's own when valid, else a new one.
///
/// The 431 and 414 that hyper writes itself, for a request head it could not parse (over 100
/// headers or its header buffer, a URI over 64 KiB), cannot carry one: hyper answers them with a bare
/// status line before any service runs, and offers no hook to add a header. Nothing was parsed to
/// log either, so there is no log line to correlate an id with.
async fn stamp_request_id(req: Request, next: Next) -> Response {
    // A `HeaderValue` clone only counts a reference: an id is made only for an answer without one.
    let asked = client_request_id(req.headers());
    let mut res = next.run(req).await;
    if !res.headers().contains_key(&X_REQUEST_ID) {
        let id = asked.unwrap_or_else(new_request_id);
        res.headers_mut().insert(X_REQUEST_ID.clone(), id);
    }
    res
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(err) = tokio::signal::ctrl_c().await {
            tracing::error!(%err, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(err) => {
                tracing::error!(%err, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("received SIGINT"),
        _ = term => tracing::info!("received SIGTERM"),
    }
}
