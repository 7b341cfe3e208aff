//! Serving a region: the router, and an accept loop that can kill single connections.
//!
//! `axum::serve` cannot close a connection from a handler, which the `drop` and `abort_stream`
//! faults need. So [`spawn`] runs its own accept loop: each connection is served by hyper's HTTP/1
//! builder in a task that races the connection against a per-connection [`ConnectionKill`]; the
//! kill switch travels to handlers in request extensions.
//!
//! [`spawn_tls`] serves the same over HTTPS (rustls, HTTP/1.1 only), as Azure's endpoints are
//! reached in production: a benchmark or test then pays for the handshake and the encryption on the
//! gateway's upstream leg too.

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
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::crypto::aws_lc_rs;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::{ServerConfig, version};

use crate::config::RegionConfig;
use crate::state::{Shared, SimHandle};
use crate::{admin, handlers, tokens};

/// A client that opened a connection has this long to finish its TLS handshake: a stalled one
/// must not hold a task forever.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A region served on a TCP port by [`spawn`] or [`spawn_tls`].
pub struct RunningRegion {
    addr: SocketAddr,
    handle: SimHandle,
    task: JoinHandle<()>,
    https: bool,
}

/// A certificate and its key for [`spawn_tls`]: rustls with the aws-lc-rs provider, TLS 1.3 and
/// 1.2, ALPN `http/1.1`.
#[derive(Clone)]
pub struct ServerTls {
    config: Arc<ServerConfig>,
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
    bind(config, addr, None).await
}

/// Like [`spawn`], serving HTTPS with `tls`. Connection faults work as over plain HTTP: the TCP
/// connection is dropped, without a TLS `close_notify`.
pub async fn spawn_tls(
    config: RegionConfig,
    addr: SocketAddr,
    tls: ServerTls,
) -> io::Result<RunningRegion> {
    bind(config, addr, Some(TlsAcceptor::from(tls.config))).await
}

async fn bind(
    config: RegionConfig,
    addr: SocketAddr,
    tls: Option<TlsAcceptor>,
) -> io::Result<RunningRegion> {
    let (router, handle) = router(config);
    let listener = TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let https = tls.is_some();
    tracing::debug!(region = %handle.region(), %addr, https, "simulated region listening");
    let task = tokio::spawn(accept_loop(listener, router, tls));
    Ok(RunningRegion {
        addr,
        handle,
        task,
        https,
    })
}

async fn accept_loop(listener: TcpListener, router: Router, tls: Option<TlsAcceptor>) {
    // Dropping the set (when this task is aborted) aborts every connection task.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    // Small SSE frames must leave at once, encrypted or not.
                    let _ = stream.set_nodelay(true);
                    let router = router.clone();
                    match &tls {
                        None => {
                            connections.spawn(serve_connection(stream, router));
                        }
                        Some(acceptor) => {
                            connections.spawn(handshake_and_serve(acceptor.clone(), stream, router));
                        }
                    }
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

/// The handshake runs in the connection's task, so a slow client does not hold up the accept loop.
async fn handshake_and_serve(acceptor: TlsAcceptor, stream: TcpStream, router: Router) {
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(stream)) => serve_connection(stream, router).await,
        Ok(Err(error)) => tracing::debug!(%error, "TLS handshake failed"),
        Err(_) => tracing::debug!("TLS handshake timed out"),
    }
}

async fn serve_connection<S>(stream: S, router: Router)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
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

// === impl ServerTls ===

impl ServerTls {
    /// A PEM certificate chain (leaf first) and its PEM private key (PKCS#8, PKCS#1 or SEC1). The
    /// error says what is wrong with them, never their content.
    pub fn from_pem(certificate: &[u8], private_key: &[u8]) -> Result<Self, String> {
        let certs = CertificateDer::pem_slice_iter(certificate)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("the certificate is not valid PEM: {e}"))?;
        if certs.is_empty() {
            return Err("the certificate file holds no PEM certificate".into());
        }
        let key = PrivateKeyDer::from_pem_slice(private_key)
            .map_err(|e| format!("the key file holds no PEM private key: {e}"))?;
        let mut config =
            ServerConfig::builder_with_provider(Arc::new(aws_lc_rs::default_provider()))
                .with_protocol_versions(&[&version::TLS13, &version::TLS12])
                .map_err(|e| format!("TLS: {e}"))?
                .with_no_client_auth()
                .with_single_cert(certs, key)
                .map_err(|e| format!("the private key does not fit the certificate: {e}"))?;
        // HTTP/1.1 only: a `drop` fault closes one connection, which under HTTP/2 would end every
        // request multiplexed on it.
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self {
            config: Arc::new(config),
        })
    }
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the key.
        f.debug_struct("ServerTls").finish_non_exhaustive()
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

    /// Base URL, e.g. `http://127.0.0.1:9001`, or `https://` when served by [`spawn_tls`] (an
    /// unspecified bind address is shown as 127.0.0.1).
    pub fn url(&self) -> String {
        let mut addr = self.addr;
        if addr.ip().is_unspecified() {
            addr.set_ip(Ipv4Addr::LOCALHOST.into());
        }
        let scheme = if self.https { "https" } else { "http" };
        format!("{scheme}://{addr}")
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
            .field("https", &self.https)
            .field("region", &self.handle.region())
            .finish_non_exhaustive()
    }
}
