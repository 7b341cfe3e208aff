//! Admission control: what the gateway accepts from clients, and for how long it waits on them.
//!
//! The accept loop and each connection's driver live here, so that no client can hold the
//! gateway's resources for free:
//! - **A slow head** (slowloris): a connection that started a request head, or a new connection
//!   that sends nothing, is closed `header_read_timeout` later if the head is not complete.
//! - **An idle keep-alive connection** is closed after `idle_timeout` without a request.
//! - **A stalled body**: `body_timeout` of silence inside a request body ends it with 408 (Azure's
//!   error shape, from the context layer) and closes the connection.
//! - **Too many connections**: beyond `max_connections`, a new connection is answered 503 with
//!   `retry-after` and closed at once (or, when even those answers are too many, closed unanswered);
//!   it is never queued.
//! - **Too many requests in flight**: beyond `max_in_flight` requests to `/openai/`, a request is
//!   answered 503 with `retry-after` in Azure's error shape. Health, metrics and admin paths are
//!   exempt, so probes still see the gateway.
//! - **Out of file descriptors** (`accept` fails with EMFILE/ENFILE): the loop backs off (up to 1 s)
//!   instead of spinning, counts it, and says it is the gateway's problem.
//!
//! hyper's own `header_read_timeout` is not used: hyper starts it as soon as a keep-alive connection
//! turns idle, so it would close idle connections at the header timeout and no idle timeout of its
//! own could be longer. The connection driver below tells the two apart by whether a byte of the
//! next head has arrived.
//!
//! At the end of the shutdown grace, a stream still running is ended with an SSE `error` event
//! (Azure's error shape, no `[DONE]`) rather than cut mid-way, and its access log line says
//! `"shutdown": true`. Other bodies still running are aborted.
//!
//! With `[gateway.tls]`, the same driver serves the connection after its TLS handshake (which must
//! finish within `header_read_timeout`), with HTTP/2 when the client offers it through ALPN. On
//! HTTP/2 the in-flight count is per stream, so the idle and head timeouts apply between requests
//! as on HTTP/1.1 (a client's PING counts as the start of a head).
//!
//! Every outcome is counted: `gateway_connections_total{outcome}` (`closed`, `header_timeout`,
//! `idle_timeout`, `body_timeout`, `rejected`, `shutdown`, `error`, `tls_handshake`), `gateway_connections_open`,
//! `gateway_rejected_total{reason}` (`connections`, `in_flight`, `body_timeout`) and
//! `gateway_accept_errors_total{kind}` (`descriptors`, `other`).
//!
//! ```
//! use std::time::Duration;
//! use gateway_bin::serve::Admission;
//!
//! let admission = Admission {
//!     max_in_flight: 100,
//!     ..Admission::default()
//! };
//! assert_eq!(admission.header_read_timeout, Duration::from_secs(10));
//! assert_eq!(admission.max_connections, 8_192);
//! ```

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use bytes::Bytes;
use gateway_layers::BoxError;
use gateway_layers::context::new_request_id;
use gateway_layers::error::{azure_error, set_retry_after};
use gateway_layers::headers::X_REQUEST_ID;
use gateway_layers::record::Record;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use metrics::{counter, gauge};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::{Instant, Sleep};
use tower::Service;

use crate::observe::metrics::{ACCEPT_ERRORS, CONNECTIONS, CONNECTIONS_OPEN, REJECTED};
use crate::tls::Tls;

/// How long a client told 503 at connect time is asked to wait.
const RETRY_AFTER: Duration = Duration::from_secs(1);
/// Connections beyond the cap that are still answered 503 (the rest are closed unanswered).
const MAX_OVERFLOW_ANSWERS: usize = 64;
/// How long an overflow answer waits for the client to read it before closing.
const OVERFLOW_LINGER: Duration = Duration::from_secs(1);
/// The accept loop's back-off after an error doubles from this...
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
/// ...up to this.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Client-side limits and timeouts (see the [module docs](self)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admission {
    /// Longest wait for a request head once its first byte came, or for the first request on a new
    /// connection.
    pub header_read_timeout: Duration,
    /// Longest silence inside a request body.
    pub body_timeout: Duration,
    /// Longest idle time of a keep-alive connection between requests.
    pub idle_timeout: Duration,
    /// Most client connections open at once.
    pub max_connections: usize,
    /// Most `/openai/` requests being served at once.
    pub max_in_flight: usize,
}

/// State shared by every connection of one listener.
struct Shared {
    router: Router,
    admission: Admission,
    /// `/openai/` requests being served.
    in_flight: AtomicUsize,
    connections: Arc<Semaphore>,
    overflow: Arc<Semaphore>,
    /// Turns true when the shutdown grace is over: streams still running end with an error event.
    cut: watch::Receiver<bool>,
}

/// One connection's timing, read by its driver and written by its requests.
#[derive(Default)]
struct ConnState {
    times: Mutex<Times>,
    /// Woken when a request ends or a head starts: the driver's deadline changed.
    changed: Notify,
    /// Set when a request body stalled: the connection is counted as `body_timeout`.
    body_timed_out: AtomicBool,
}

#[derive(Default)]
struct Times {
    /// Requests of this connection being served (their response bodies not yet ended).
    in_flight: usize,
    /// When the connection last became idle: no request in flight. `None` before the first request.
    idle_since: Option<Instant>,
    /// When the first byte of the next head arrived, while idle.
    head_started: Option<Instant>,
}

/// How a connection ended, as counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Closed,
    HeaderTimeout,
    IdleTimeout,
    BodyTimeout,
    Shutdown,
    Error,
    /// The TLS handshake failed or did not finish within `header_read_timeout`.
    TlsHandshake,
}

/// The socket (TCP, or TLS over TCP), noting when a head starts arriving on an idle connection.
struct Tracked<S> {
    tcp: S,
    state: Arc<ConnState>,
}

/// The per-request service: in-flight cap, body timeout, peer address, connection bookkeeping.
#[derive(Clone)]
struct Admit {
    shared: Arc<Shared>,
    conn: Arc<ConnState>,
    peer: SocketAddr,
}

/// Counts a request in flight (on its connection, and globally for `/openai/`) until dropped with
/// its response body.
struct InFlight {
    conn: Arc<ConnState>,
    global: Option<Arc<Shared>>,
}

pin_project_lite::pin_project! {
    /// A request body that fails with `TimedOut` after `timeout` without a frame.
    struct StallBody {
        #[pin]
        inner: Incoming,
        timeout: Duration,
        sleep: Option<Pin<Box<Sleep>>>,
    }
}

pin_project_lite::pin_project! {
    /// A response body that holds its request's [`InFlight`] until it ends, and ends a stream with
    /// an error event when the server cuts it at shutdown.
    struct Guarded {
        #[pin]
        inner: Body,
        guard: Option<InFlight>,
        // Set for event streams: resolves when the shutdown grace is over.
        cut: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
        record: Option<Arc<Record>>,
        ended: bool,
    }
}

// === impl Admission ===

impl Default for Admission {
    /// The policy file's defaults: heads within 10 s, bodies silent at most 15 s, keep-alive
    /// connections idle at most 120 s, 8,192 connections, 4,096 requests in flight.
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(15),
            idle_timeout: Duration::from_secs(120),
            max_connections: 8_192,
            max_in_flight: 4_096,
        }
    }
}

/// Accepts connections on `listener` and serves `router` on each, within `admission`, until `stop`
/// turns true; then tells every connection to finish its requests and close, and returns once all
/// have. Dropping the future drops every connection. With `tls`, each connection is served after
/// its handshake, HTTP/2 or HTTP/1.1 as ALPN chose.
pub(super) async fn serve(
    listener: TcpListener,
    router: Router,
    admission: Admission,
    tls: Option<Arc<Tls>>,
    mut stop: watch::Receiver<bool>,
    cut: watch::Receiver<bool>,
) -> io::Result<()> {
    let shared = Arc::new(Shared {
        router,
        cut,
        connections: Arc::new(Semaphore::new(admission.max_connections)),
        overflow: Arc::new(Semaphore::new(MAX_OVERFLOW_ANSWERS)),
        admission,
        in_flight: AtomicUsize::new(0),
    });
    let mut connections = JoinSet::new();
    let mut backoff = ACCEPT_BACKOFF_MIN;
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.wait_for(|v| *v) => break,
            // Reap finished connections as they go, so the set stays as small as what is open.
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let (tcp, peer) = match accepted {
            Ok(accepted) => {
                backoff = ACCEPT_BACKOFF_MIN;
                accepted
            }
            Err(err) => {
                accept_failed(&err, backoff);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                continue;
            }
        };
        // Without TCP_NODELAY the last small write of a stream waits for the client's delayed
        // ACK: measured as +40 ms per streamed answer on a reused connection
        // (docs/benchmarks.md).
        if let Err(err) = tcp.set_nodelay(true) {
            tracing::debug!(%err, "could not set TCP_NODELAY");
        }
        match shared.connections.clone().try_acquire_owned() {
            Ok(permit) => {
                let conn = connection(tcp, peer, shared.clone(), tls.clone(), stop.clone());
                connections.spawn(async move {
                    let _permit = permit;
                    conn.await;
                });
            }
            Err(_) => overflow(tcp, peer, &shared),
        }
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
    Ok(())
}

/// Far enough to never fire (a guarded `select!` branch is not polled when its guard is false).
fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86_400 * 365)
}

/// Counts and logs a failed `accept`; running out of descriptors is the gateway's own problem.
fn accept_failed(err: &io::Error, backoff: Duration) {
    const EMFILE: i32 = 24;
    const ENFILE: i32 = 23;
    let descriptors = matches!(err.raw_os_error(), Some(EMFILE | ENFILE));
    let kind = if descriptors { "descriptors" } else { "other" };
    counter!(ACCEPT_ERRORS, "kind" => kind).increment(1);
    // Once per run of failures, not once per retry.
    if backoff == ACCEPT_BACKOFF_MIN {
        if descriptors {
            tracing::error!(%err, "cannot accept connections: the gateway is out of file descriptors (raise its limit, or lower gateway.max_connections); backing off");
        } else {
            tracing::warn!(%err, "accept failed; backing off");
        }
    }
}

/// A connection beyond `max_connections`: answered 503 and closed, never queued.
fn overflow(mut tcp: TcpStream, peer: SocketAddr, shared: &Shared) {
    counter!(REJECTED, "reason" => "connections").increment(1);
    counter!(CONNECTIONS, "outcome" => "rejected").increment(1);
    tracing::debug!(%peer, max = shared.admission.max_connections, "connection refused: too many connections");
    let Ok(permit) = shared.overflow.clone().try_acquire_owned() else {
        // Even the answers are too many: close at once, the cheapest refusal there is.
        return;
    };
    tokio::spawn(async move {
        let _permit = permit;
        let body = serde_json::json!({"error": {
            "code": "ServiceUnavailable",
            "message": "The gateway has too many open connections. Retry later.",
        }})
        .to_string();
        let id = new_request_id();
        let head = format!(
            "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: {}\r\nretry-after-ms: {}\r\nx-request-id: {}\r\nx-served-by: gateway\r\nconnection: close\r\ncontent-length: {}\r\n\r\n",
            RETRY_AFTER.as_secs(),
            RETRY_AFTER.as_millis(),
            id.to_str().unwrap_or_default(),
            body.len()
        );
        let answer = async {
            tcp.write_all(head.as_bytes()).await?;
            tcp.write_all(body.as_bytes()).await?;
            tcp.shutdown().await?;
            // Read what the client sent until it closes, so the close does not reset the
            // connection before the answer is read.
            let mut sink = [0u8; 4096];
            while tcp.read(&mut sink).await? > 0 {}
            io::Result::Ok(())
        };
        let _ = tokio::time::timeout(OVERFLOW_LINGER, answer).await;
    });
}

/// One accepted connection, from its TLS handshake (if any) to its close, counted.
async fn connection(
    tcp: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    tls: Option<Arc<Tls>>,
    stop: watch::Receiver<bool>,
) {
    gauge!(CONNECTIONS_OPEN).increment(1.0);
    let opened = Instant::now();
    let outcome = match tls {
        None => drive(tcp, false, peer, &shared, opened, stop).await,
        Some(tls) => {
            // The certificate is read per handshake: a renewed one reaches new connections.
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.config());
            let handshake = acceptor.accept(tcp);
            match tokio::time::timeout(shared.admission.header_read_timeout, handshake).await {
                Ok(Ok(stream)) => {
                    let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2".as_slice());
                    drive(stream, h2, peer, &shared, opened, stop).await
                }
                Ok(Err(err)) => {
                    tracing::debug!(%peer, %err, "TLS handshake failed");
                    Outcome::TlsHandshake
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    Outcome::TlsHandshake
                }
            }
        }
    };
    counter!(CONNECTIONS, "outcome" => outcome.as_str()).increment(1);
    gauge!(CONNECTIONS_OPEN).decrement(1.0);
}

/// Drives one connection: serves it (HTTP/2 when `h2`, else HTTP/1.1), and closes it when a head
/// is late, it idles too long, or the listener stops (gracefully: its requests finish first).
async fn drive<S>(
    io: S,
    h2: bool,
    peer: SocketAddr,
    shared: &Arc<Shared>,
    opened: Instant,
    mut stop: watch::Receiver<bool>,
) -> Outcome
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let state = Arc::new(ConnState::default());
    let io = TokioIo::new(Tracked {
        tcp: io,
        state: state.clone(),
    });
    let service = TowerToHyperService::new(Admit {
        shared: shared.clone(),
        conn: state.clone(),
        peer,
    });
    // One protocol, chosen by ALPN (or plain HTTP/1.1): no sniffing of the first bytes.
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder = if h2 {
        builder.http2_only()
    } else {
        builder.http1_only()
    };
    builder.http1().keep_alive(true);
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    let admission = &shared.admission;
    let mut stopping = false;
    let outcome = loop {
        let deadline = state.deadline(opened, admission).map(|(at, _)| at);
        tokio::select! {
            res = conn.as_mut() => break match res {
                Ok(()) if stopping => Outcome::Shutdown,
                Ok(()) => Outcome::Closed,
                Err(err) => {
                    // A client that went away mid-request is its own business, not an error of ours.
                    let gone = err
                        .downcast_ref::<hyper::Error>()
                        .is_some_and(|e| e.is_incomplete_message() || e.is_closed());
                    if gone {
                        Outcome::Closed
                    } else {
                        tracing::debug!(%peer, %err, "client connection failed");
                        Outcome::Error
                    }
                }
            },
            _ = stop.wait_for(|v| *v), if !stopping => {
                stopping = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = tokio::time::sleep_until(deadline.unwrap_or_else(far_future)), if deadline.is_some() => {
                // Recomputed: a request may have begun since.
                if let Some((at, late)) = state.deadline(opened, admission) {
                    if at <= Instant::now() {
                        break late;
                    }
                }
            }
            _ = state.changed.notified() => {}
        }
    };
    let outcome = if state.body_timed_out.load(Ordering::Relaxed) {
        Outcome::BodyTimeout
    } else {
        outcome
    };
    if matches!(outcome, Outcome::HeaderTimeout | Outcome::IdleTimeout) {
        tracing::debug!(%peer, ?outcome, "closing a client connection");
    }
    outcome
}

// === impl ConnState ===

impl ConnState {
    fn times(&self) -> std::sync::MutexGuard<'_, Times> {
        self.times.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// When the connection must be closed if nothing changes, and as what; `None` while a request
    /// is in flight.
    fn deadline(&self, opened: Instant, admission: &Admission) -> Option<(Instant, Outcome)> {
        let times = self.times();
        if times.in_flight > 0 {
            return None;
        }
        Some(match (times.head_started, times.idle_since) {
            (Some(started), _) => (
                started + admission.header_read_timeout,
                Outcome::HeaderTimeout,
            ),
            (None, Some(idle)) => (idle + admission.idle_timeout, Outcome::IdleTimeout),
            // A new connection owes its first request within the header timeout.
            (None, None) => (
                opened + admission.header_read_timeout,
                Outcome::HeaderTimeout,
            ),
        })
    }

    fn begin(&self) {
        let mut times = self.times();
        times.in_flight += 1;
        times.head_started = None;
    }

    fn end(&self) {
        {
            let mut times = self.times();
            times.in_flight = times.in_flight.saturating_sub(1);
            if times.in_flight == 0 {
                times.idle_since = Some(Instant::now());
            }
        }
        self.changed.notify_one();
    }

    /// Bytes arrived: if idle, a head has started.
    fn read_some(&self) {
        let started = {
            let mut times = self.times();
            let idle = times.in_flight == 0 && times.head_started.is_none();
            if idle {
                times.head_started = Some(Instant::now());
            }
            idle
        };
        if started {
            self.changed.notify_one();
        }
    }
}

// === impl Outcome ===

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Closed => "closed",
            Outcome::HeaderTimeout => "header_timeout",
            Outcome::IdleTimeout => "idle_timeout",
            Outcome::BodyTimeout => "body_timeout",
            Outcome::Shutdown => "shutdown",
            Outcome::Error => "error",
            Outcome::TlsHandshake => "tls_handshake",
        }
    }
}

// === impl Tracked ===

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut self.tcp).poll_read(cx, buf);
        if matches!(res, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.state.read_some();
        }
        res
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }
}

// === impl Admit ===

impl Service<Request<Incoming>> for Admit {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        self.conn.begin();
        let mut guard = InFlight {
            conn: self.conn.clone(),
            global: None,
        };
        if req.uri().path().starts_with("/openai/") {
            let max = self.shared.admission.max_in_flight;
            if self.shared.in_flight.fetch_add(1, Ordering::AcqRel) >= max {
                self.shared.in_flight.fetch_sub(1, Ordering::AcqRel);
                counter!(REJECTED, "reason" => "in_flight").increment(1);
                tracing::debug!(peer = %self.peer, max, "request refused: too many requests in flight");
                let res = too_busy(&req);
                return Box::pin(async move { Ok(res.map(|b| guarded(b, guard, None, None))) });
            }
            guard.global = Some(self.shared.clone());
        }
        let timeout = self.shared.admission.body_timeout;
        let mut req = req.map(|inner| {
            Body::new(StallBody {
                inner,
                timeout,
                sleep: None,
            })
        });
        req.extensions_mut().insert(ConnectInfo(self.peer));
        let mut router = self.shared.router.clone();
        let conn = self.conn.clone();
        let cut = self.shared.cut.clone();
        Box::pin(async move {
            let Ok(mut res) = router.call(req).await;
            if res.status() == StatusCode::REQUEST_TIMEOUT {
                // The body stalled (the context layer answered): the rest of it is not worth
                // waiting for on this connection.
                conn.body_timed_out.store(true, Ordering::Relaxed);
                counter!(REJECTED, "reason" => "body_timeout").increment(1);
                res.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            let stream = res
                .headers()
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.starts_with("text/event-stream"));
            let record = res.extensions().get::<Arc<Record>>().cloned();
            let cut = stream.then(|| {
                let mut cut = cut;
                Box::pin(async move {
                    let _ = cut.wait_for(|v| *v).await;
                }) as Pin<Box<dyn Future<Output = ()> + Send>>
            });
            Ok(res.map(|b| guarded(b, guard, cut, record)))
        })
    }
}

/// The 503 for a request beyond `max_in_flight`.
fn too_busy<B>(req: &Request<B>) -> Response<Body> {
    let mut res: Response<Body> = azure_error(
        StatusCode::SERVICE_UNAVAILABLE,
        "ServiceUnavailable",
        "The gateway is serving too many requests. Retry later.",
    );
    set_retry_after(res.headers_mut(), RETRY_AFTER);
    let id =
        gateway_layers::context::client_request_id(req.headers()).unwrap_or_else(new_request_id);
    res.headers_mut().insert(X_REQUEST_ID.clone(), id);
    res.headers_mut().insert(
        gateway_layers::headers::X_SERVED_BY.clone(),
        HeaderValue::from_static("gateway"),
    );
    res
}

fn guarded(
    inner: Body,
    guard: InFlight,
    cut: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    record: Option<Arc<Record>>,
) -> Body {
    Body::new(Guarded {
        inner,
        guard: Some(guard),
        cut,
        record,
        ended: false,
    })
}

/// The event that ends a stream cut at shutdown, shaped as the failover layer's broken-stream event.
fn shutdown_event() -> Bytes {
    let data = serde_json::json!({"error": {
        "code": "gateway_shutdown",
        "message": "The gateway shut down before the stream completed; the response is incomplete. Retry the request.",
    }});
    // The blank lines first end any event left half-written, so this one is seen whole.
    Bytes::from(format!("\n\nevent: error\ndata: {data}\n\n"))
}

// === impl InFlight ===

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(shared) = &self.global {
            shared.in_flight.fetch_sub(1, Ordering::AcqRel);
        }
        self.conn.end();
    }
}

// === impl StallBody ===

impl http_body::Body for StallBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        match this.inner.poll_frame(cx) {
            Poll::Ready(frame) => {
                *this.sleep = None;
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => {
                let timeout = *this.timeout;
                let sleep = this
                    .sleep
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                match sleep.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        let message =
                            format!("no data from the client for {} ms", timeout.as_millis());
                        Poll::Ready(Some(Err(Box::new(io::Error::new(
                            io::ErrorKind::TimedOut,
                            message,
                        )))))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

// === impl Guarded ===

impl http_body::Body for Guarded {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = self.project();
        if *this.ended {
            return Poll::Ready(None);
        }
        if let Some(cut) = this.cut.as_mut() {
            if cut.as_mut().poll(cx).is_ready() {
                *this.ended = true;
                if let Some(record) = this.record.take() {
                    record.set_shutdown();
                }
                tracing::warn!("shutdown grace over: ending a stream with an error event");
                return Poll::Ready(Some(Ok(Frame::data(shutdown_event()))));
            }
        }
        let frame = this.inner.poll_frame(cx);
        if matches!(frame, Poll::Ready(None)) {
            // Ended: the connection is idle from now, not from when hyper drops the body.
            this.guard.take();
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        // An event may be added at shutdown: the length is not known for streams.
        if self.cut.is_some() {
            SizeHint::default()
        } else {
            self.inner.size_hint()
        }
    }
}
