//! Serving with admission control, drain and graceful shutdown.

use std::future::Future;
use std::io;
use std::sync::atomic::Ordering;
use std::time::Duration;

mod admission;

pub use admission::Admission;

use axum::Router;
use axum::extract::Request;
use axum::middleware::Next;
use axum::response::Response;
use gateway_layers::context::{client_request_id, new_request_id};
use gateway_layers::headers::X_REQUEST_ID;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::app::Gateway;
use crate::reload::Current;

/// How often the Prometheus recorder folds recorded histogram samples in: keeps memory bounded
/// between scrapes.
const METRICS_UPKEEP: Duration = Duration::from_secs(5);
/// At the end of the shutdown grace, how long the streams' closing error events get to be sent.
const CUT_FLUSH: Duration = Duration::from_secs(1);

/// Serves `gateway` on `listener` until `shutdown` resolves; then drains: `/readyz` answers 503
/// while new connections are still accepted for `gateway.drain`, so load balancers see it; then
/// stops accepting and lets in-flight requests (streams included) finish for at most `grace` before
/// dropping them. Clients are held to `gateway.admission` throughout.
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
    // Listener-level settings (admission control, drain, certificates) are the first gateway's
    // too: a reload does not rebind or re-handshake.
    let (admin_listen, admin_tls, draining, drain, metrics, admission, tls) = {
        let first = gateways.borrow();
        let listen = first.admin.as_ref().map(|a| a.listen);
        let admin_tls = first.admin.as_ref().and_then(|a| a.tls.clone());
        (
            listen,
            admin_tls,
            first.draining.clone(),
            first.drain,
            first.metrics.clone(),
            first.admission.clone(),
            first.tls.clone(),
        )
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
            Some((listener, Current::admin(gateways.clone()), admin_tls))
        }
        None => None,
    };
    // `rx` turns true when the listener closes, after the drain.
    let (tx, mut rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        draining.store(true, Ordering::Relaxed);
        if !drain.is_zero() {
            tracing::info!(
                drain_seconds = drain.as_secs_f64(),
                "draining: /readyz answers 503, still accepting connections"
            );
            tokio::time::sleep(drain).await;
        }
        let _ = tx.send(true);
    });
    let admin = admin.map(|(listener, router, tls)| {
        let mut stop = rx.clone();
        let stop = async move {
            let _ = stop.wait_for(|v| *v).await;
        };
        let router = Router::new().fallback_service(router);
        match tls {
            Some(tls) => tokio::spawn(crate::tls::serve(listener, tls, router, stop)),
            None => tokio::spawn(
                axum::serve(listener, router)
                    .with_graceful_shutdown(stop)
                    .into_future(),
            ),
        }
    });
    let upkeep = tokio::spawn(async move {
        let mut every = tokio::time::interval(METRICS_UPKEEP);
        loop {
            every.tick().await;
            metrics.run_upkeep();
        }
    });
    // The peer's address rides in each request's extensions (`ConnectInfo`), for the access log.
    let app = Router::new()
        .fallback_service(Current::main(gateways))
        .layer(axum::middleware::from_fn(stamp_request_id));
    // `cut` turns true when the grace is over: streams still running end with an error event.
    let (cut_tx, cut_rx) = watch::channel(false);
    let server = admission::serve(listener, app, admission, tls, rx.clone(), cut_rx);
    tokio::pin!(server);
    let result = tokio::select! {
        res = &mut server => res,
        _ = async {
            let _ = rx.wait_for(|v| *v).await;
            tracing::info!(grace_seconds = grace.as_secs_f64(), "shutting down: draining in-flight requests");
            tokio::time::sleep(grace).await;
        } => {
            tracing::warn!("grace period over; ending the remaining streams and closing the connections");
            // Streams end with an error event; give their last bytes a moment to leave.
            let _ = cut_tx.send(true);
            let _ = tokio::time::timeout(CUT_FLUSH, &mut server).await;
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
