//! The HTTP client service that sends each upstream attempt.
//!
//! [`ReqwestClient`] adapts a `reqwest::Client` to a tower `Service` of `http` types, so the failover
//! layer can be written against any client (a hyper client or a test `service_fn` work too).
//!
//! [`ErrorCause`] reads an attempt's error, whatever the client, down its `source()` chain: the
//! client is told only the category ("connection refused"), never the error itself, which names the
//! backend's URL and deployment; the log gets the whole [`Chain`] down to its root cause.
//!
//! ```
//! use gateway_layers::client::{Chain, ErrorCause};
//!
//! let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
//! let err = std::io::Error::other(Wrapped("error sending request for url (http://10.0.0.7/x)", refused));
//! assert_eq!(ErrorCause::of(&err), ErrorCause::ConnectionRefused);
//! assert_eq!(ErrorCause::of(&err).as_str(), "connection refused");
//! assert!(Chain(&err).to_string().ends_with(": connection refused"));
//!
//! # #[derive(Debug)]
//! # struct Wrapped(&'static str, std::io::Error);
//! # impl std::fmt::Display for Wrapped {
//! #     fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result { f.write_str(self.0) }
//! # }
//! # impl std::error::Error for Wrapped {
//! #     fn source(&self) -> Option<&(dyn std::error::Error + 'static)> { Some(&self.1) }
//! # }
//! ```

use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::io;
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

/// An attempt's URL, already parsed, in the request's extensions: [`ReqwestClient`] then sends the
/// request to it rather than parse the request's URI again. It must be that URI; the failover layer
/// adds it to the attempts it builds.
#[derive(Clone, Debug)]
pub struct UpstreamUrl(pub reqwest::Url);

/// What made an upstream attempt fail, in words fit for the client: a category, never the error's
/// own text (which names the backend's URL and deployment).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorCause {
    /// The backend's host refused the connection (nothing listens on the port).
    ConnectionRefused,
    /// Connecting or waiting timed out.
    TimedOut,
    /// The TLS handshake failed (certificate, protocol).
    Tls,
    /// The backend's host name did not resolve.
    Dns,
    /// The connection was reset or closed before an answer.
    ConnectionReset,
    /// The gateway itself ran out of file descriptors: not the backend's fault.
    ResourceExhausted,
    /// Anything else.
    Other,
}

/// Displays an error and its `source()` chain, `outer: inner: root`. For logs only: the outer
/// levels may name internal URLs.
#[derive(Clone, Copy)]
pub struct Chain<'a>(pub &'a (dyn StdError + 'static));

/// `EMFILE` and `ENFILE` (Linux, the BSDs and macOS agree).
const TOO_MANY_OPEN_FILES: [i32; 2] = [24, 23];

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
        Ok(Self {
            client: Self::builder().build()?,
        })
    }

    /// The builder behind [`new`](Self::new), for adding to its settings (e.g. CA certificates
    /// with `tls_certs_merge`) before [`from_client`](Self::from_client).
    pub fn builder() -> reqwest::ClientBuilder {
        reqwest::Client::builder()
            // A redirect could carry the backend's credential to another host.
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(5))
            .pool_idle_timeout(Duration::from_secs(90))
            .tcp_nodelay(true)
    }

    /// Uses a client you configured yourself.
    pub fn from_client(client: reqwest::Client) -> Self {
        Self { client }
    }
}

// === impl ErrorCause ===

impl ErrorCause {
    /// Reads `err` and its sources. Running out of descriptors wins wherever it appears, so the
    /// gateway's own exhaustion is never told as a backend failure. Then typed evidence (an
    /// `io::Error`'s kind, reqwest's flags) wins over words in an error's text, and among texts the
    /// innermost, the most specific, wins.
    pub fn of(err: &(dyn StdError + 'static)) -> Self {
        let mut typed = None;
        let mut text = None;
        let mut level = Some(err);
        while let Some(e) = level {
            match Self::of_level(e) {
                (ErrorCause::ResourceExhausted, _) => return ErrorCause::ResourceExhausted,
                (ErrorCause::Other, _) => {}
                (cause, true) => typed = typed.or(Some(cause)),
                (cause, false) => text = Some(cause),
            }
            level = e.source();
        }
        typed.or(text).unwrap_or(ErrorCause::Other)
    }

    /// The cause one level of a chain shows, and whether it is typed (not read from text).
    fn of_level(e: &(dyn StdError + 'static)) -> (Self, bool) {
        if let Some(io) = e.downcast_ref::<io::Error>() {
            if io
                .raw_os_error()
                .is_some_and(|n| TOO_MANY_OPEN_FILES.contains(&n))
            {
                return (ErrorCause::ResourceExhausted, true);
            }
            let typed = match io.kind() {
                io::ErrorKind::ConnectionRefused => ErrorCause::ConnectionRefused,
                io::ErrorKind::TimedOut => ErrorCause::TimedOut,
                io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionAborted
                | io::ErrorKind::BrokenPipe
                | io::ErrorKind::UnexpectedEof => ErrorCause::ConnectionReset,
                _ => ErrorCause::Other,
            };
            if typed != ErrorCause::Other {
                return (typed, true);
            }
        }
        if let Some(re) = e.downcast_ref::<reqwest::Error>() {
            // Its text holds the URL, whose host name could contain any word: read its flags only.
            let cause = if re.is_timeout() {
                ErrorCause::TimedOut
            } else {
                ErrorCause::Other
            };
            return (cause, true);
        }
        // hyper-util and rustls say what failed in their text only ("dns error", "invalid peer
        // certificate"); those levels carry no URL.
        let text = e.to_string().to_ascii_lowercase();
        let cause = if text.contains("too many open files") {
            ErrorCause::ResourceExhausted
        } else if text.contains("dns error") || text.contains("failed to lookup address") {
            ErrorCause::Dns
        } else if text.contains("certificate") || text.contains("tls") || text.contains("handshake")
        {
            ErrorCause::Tls
        } else if text.contains("timed out") {
            ErrorCause::TimedOut
        } else if text.contains("connection refused") {
            ErrorCause::ConnectionRefused
        } else {
            ErrorCause::Other
        };
        (cause, false)
    }

    /// The category as the client is told it.
    pub fn as_str(&self) -> &'static str {
        match self {
            ErrorCause::ConnectionRefused => "connection refused",
            ErrorCause::TimedOut => "timed out",
            ErrorCause::Tls => "TLS failure",
            ErrorCause::Dns => "DNS failure",
            ErrorCause::ConnectionReset => "connection reset",
            ErrorCause::ResourceExhausted => "the gateway is out of connections",
            ErrorCause::Other => "connection failed",
        }
    }
}

impl fmt::Display for ErrorCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

// === impl Chain ===

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut level = self.0.source();
        while let Some(e) = level {
            write!(f, ": {e}")?;
            level = e.source();
        }
        Ok(())
    }
}

impl fmt::Debug for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
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
            let req = request(req)?;
            let res = client.execute(req).await?;
            Ok(Response::from(res))
        })
    }
}

/// The reqwest form of `req`: with the [`UpstreamUrl`] it carries when that is all its extensions,
/// else by reqwest's own conversion (which parses the URI and keeps the extensions).
fn request(mut req: Request<Bytes>) -> Result<reqwest::Request, reqwest::Error> {
    let url = req.extensions_mut().remove::<UpstreamUrl>();
    match url {
        Some(UpstreamUrl(url)) if req.extensions().is_empty() => {
            let (parts, body) = req.into_parts();
            let mut out = reqwest::Request::new(parts.method, url);
            *out.headers_mut() = parts.headers;
            *out.version_mut() = parts.version;
            *out.body_mut() = Some(body.into());
            Ok(out)
        }
        _ => reqwest::Request::try_from(req),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An error with a text and a source, as hyper-util's and reqwest's are.
    #[derive(Debug)]
    struct Wrapped(&'static str, Option<Box<dyn StdError + Send + Sync>>);

    impl fmt::Display for Wrapped {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.0)
        }
    }

    impl StdError for Wrapped {
        fn source(&self) -> Option<&(dyn StdError + 'static)> {
            self.1.as_deref().map(|e| e as &(dyn StdError + 'static))
        }
    }

    fn chain(levels: &[&'static str], root: io::Error) -> Wrapped {
        let mut err: Box<dyn StdError + Send + Sync> = Box::new(root);
        for text in levels.iter().rev() {
            err = Box::new(Wrapped(text, Some(err)));
        }
        Wrapped(
            "error sending request for url (https://aoai.example/openai/deployments/x)",
            Some(err),
        )
    }

    #[test]
    fn the_cause_is_read_down_the_chain() {
        let refused = chain(
            &["client error (Connect)", "tcp connect error"],
            io::Error::from(io::ErrorKind::ConnectionRefused),
        );
        assert_eq!(ErrorCause::of(&refused), ErrorCause::ConnectionRefused);
        let dns = chain(
            &["client error (Connect)", "dns error"],
            io::Error::other("failed to lookup address information: Name or service not known"),
        );
        assert_eq!(ErrorCause::of(&dns), ErrorCause::Dns);
        let tls = chain(
            &["client error (Connect)"],
            io::Error::new(
                io::ErrorKind::InvalidData,
                "invalid peer certificate: UnknownIssuer",
            ),
        );
        assert_eq!(ErrorCause::of(&tls), ErrorCause::Tls);
        let reset = chain(&[], io::Error::from(io::ErrorKind::ConnectionReset));
        assert_eq!(ErrorCause::of(&reset), ErrorCause::ConnectionReset);
        // Typed evidence wins over words: a handshake cut by a reset is told as the reset.
        let cut = chain(
            &["client error (Connect)", "tls handshake eof"],
            io::Error::from(io::ErrorKind::UnexpectedEof),
        );
        assert_eq!(ErrorCause::of(&cut), ErrorCause::ConnectionReset);
        let other = chain(&["client error (SendRequest)"], io::Error::other("boom"));
        assert_eq!(ErrorCause::of(&other), ErrorCause::Other);
    }

    #[test]
    fn descriptor_exhaustion_is_the_gateways_own_whatever_wraps_it() {
        let emfile = chain(
            &["client error (Connect)", "tcp open error"],
            io::Error::from_raw_os_error(24),
        );
        assert_eq!(ErrorCause::of(&emfile), ErrorCause::ResourceExhausted);
        assert!(Chain(&emfile).to_string().contains("tcp open error: "));
    }

    #[test]
    fn the_chain_names_every_level_down_to_the_root() {
        let err = chain(
            &["client error (Connect)", "tcp connect error"],
            io::Error::from(io::ErrorKind::ConnectionRefused),
        );
        assert_eq!(
            Chain(&err).to_string(),
            "error sending request for url (https://aoai.example/openai/deployments/x): client error (Connect): tcp connect error: connection refused"
        );
    }
}
