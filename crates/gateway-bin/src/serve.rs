//! Serving with graceful shutdown.

use std::future::Future;
use std::io;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::app::Gateway;

/// Serves `gateway` on `listener` until `shutdown` resolves; then stops accepting and lets in-flight
/// requests (streams included) finish for at most `grace` before dropping them.
pub async fn serve(
    listener: TcpListener,
    gateway: Gateway,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> io::Result<()> {
    let (tx, mut rx) = watch::channel(false);
    let draining = gateway.draining.clone();
    tokio::spawn(async move {
        shutdown.await;
        draining.store(true, Ordering::Relaxed);
        let _ = tx.send(true);
    });
    let mut graceful_rx = rx.clone();
    let server = axum::serve(listener, gateway.router)
        .with_graceful_shutdown(async move {
            let _ = graceful_rx.wait_for(|v| *v).await;
        })
        .into_future();
    tokio::pin!(server);
    tokio::select! {
        res = &mut server => res,
        _ = async {
            let _ = rx.wait_for(|v| *v).await;
            tracing::info!(grace_seconds = grace.as_secs_f64(), "shutting down: draining in-flight requests");
            tokio::time::sleep(grace).await;
        } => {
            tracing::warn!("grace period over; closing the remaining connections");
            Ok(())
        }
    }
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
