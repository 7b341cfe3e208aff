//! Request-context capture: reads a request once and records what every later layer needs.
//!
//! [`RequestContextLayer`] buffers the body (up to a cap, so it can be replayed on failover), parses it
//! once ([`RequestJson`]), works out the operation, the logical deployment (from the path, or the
//! body's `model` on v1 and Responses paths), the `api-version`, whether the call streams and the
//! requested `max_tokens`, and stores a [`RequestContext`] in the request extensions. It is the one
//! owner of the body: inner layers never parse it again, and record the edits they need (such as
//! asking a stream for its usage chunk) in the context, to be spliced in when each attempt is built
//! ([`RequestContext::body_for`]). It answers 413 for a body over the cap and 400 for
//! invalid JSON, both in Azure's error shape.
//!
//! # Paths
//!
//! Path segments are compared as Azure compares them: percent-decoded and case-insensitively, so
//! `chat/complet%69ons` and `Chat/Completions` are chat completions, estimated and limited like
//! `chat/completions`; under `/openai/deployments/{deployment}/` they are forwarded in that
//! canonical form (a v1 path is forwarded as sent, and a backend reads it as Azure does). Empty,
//! `.` and `..` segments and encoded separators (`%2F`, `%5C`, `%2E`) are refused with 400. The
//! known operations (`chat/completions`, `completions`, `embeddings`, `responses`) accept only
//! `POST`: another method gets 405 `MethodNotAllowed`.
//!
//! **Any other path is [`Operation::Other`]**, and one rule applies to it: under
//! `/openai/deployments/{deployment}/` it is forwarded (audio, images...) as a call to that
//! deployment, authorised for it and counted as one request against the consumer's request
//! limits, its tokens charged afterwards from the answer's `usage` when it reports one; without a
//! deployment in the path (`/openai/v1/models`, `/openai/files`...) there is nothing to route or
//! limit it by, and the failover layer refuses it with 404 in Azure's shape.
//!
//! # The record
//!
//! It also starts the request's one [`Record`], shared with inner layers
//! through the request extensions and with outer observers through the response extensions, and ends
//! it with the response body. From the record it writes, on every response, `x-request-id`,
//! `x-served-by` (`gateway` when no backend's answer is returned) and `x-gateway-attempts`.
//!
//! # Example
//!
//! ```
//! use axum::{Extension, Router, body::Body, routing::post};
//! use gateway_layers::context::{Operation, RequestContext, RequestContextLayer};
//! use tower::ServiceExt;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! async fn handler(Extension(ctx): Extension<RequestContext>) -> String {
//!     format!("{} {:?} stream={}", ctx.operation.as_str(), ctx.deployment, ctx.stream())
//! }
//!
//! let app = Router::new()
//!     .route("/openai/deployments/{d}/chat/completions", post(handler))
//!     .layer(RequestContextLayer::new(1024 * 1024));
//!
//! let req = http::Request::post("/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21")
//!     .header("x-request-id", "abc-123")
//!     .body(Body::from(r#"{"messages":[],"stream":true}"#))
//!     .unwrap();
//! let res = app.oneshot(req).await.unwrap();
//! assert_eq!(res.headers()["x-request-id"], "abc-123");
//! let body = axum::body::to_bytes(res.into_body(), 1024).await.unwrap();
//! assert_eq!(&body[..], b"chat Some(\"gpt-4o\") stream=true");
//! # }
//! ```

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use gateway_core::request::{Edits, RequestJson};
use http::request::Parts;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use tower::{Layer, Service};

use crate::BoxError;
use crate::error::azure_error;
use crate::failover::ServedBy;
use crate::headers::{
    X_GATEWAY_ATTEMPTS, X_MS_CLIENT_REQUEST_ID, X_REQUEST_ID, X_SERVED_BY, content_length,
};
use crate::record::{Record, RecordBody};
pub use gateway_core::operation::Operation;
use gateway_core::operation::path_eq;

/// Longest deployment name accepted (Azure allows 64 characters).
const MAX_DEPLOYMENT_NAME: usize = 128;

/// Where a request names its deployment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeploymentSource {
    /// In the path: `/openai/deployments/{deployment}/...`. `rest` is what follows the name.
    Path {
        /// The path after `/openai/deployments/{deployment}`, starting with `/`.
        rest: String,
    },
    /// In the JSON body's `model` field (v1 and Responses paths).
    Body,
    /// Nowhere: the request is not deployment-scoped.
    None,
}

/// Everything captured from one client request. Stored in the request extensions.
#[derive(Clone, Debug)]
pub struct RequestContext {
    /// The client's `x-request-id` / `x-ms-client-request-id` when valid, else a new UUID.
    pub request_id: HeaderValue,
    /// When the gateway received the request.
    pub received_at: Instant,
    /// The kind of call.
    pub operation: Operation,
    /// The logical deployment the client called, if any.
    pub deployment: Option<String>,
    /// Where the deployment name came from; the failover layer rewrites it there per backend.
    pub deployment_source: DeploymentSource,
    /// The `api-version` query parameter.
    pub api_version: Option<String>,
    /// The body's one parse, for the operations whose body is JSON; `None` for the others. Private
    /// with the body: the parse's byte ranges point into that very body.
    json: Option<Arc<RequestJson>>,
    /// Set by a layer that needs a stream's final usage chunk (the rate-limit layer): every attempt's
    /// body then asks for it (`stream_options.include_usage`).
    pub ask_for_usage: bool,
    /// The whole request body as received, replayable on every attempt.
    body: Bytes,
}

/// Why a request could not be captured.
#[derive(Debug)]
pub enum CaptureError {
    /// The body exceeds the configured cap.
    TooLarge {
        /// The cap in bytes.
        limit: usize,
    },
    /// JSON was required and the body is not a valid JSON object.
    InvalidJson(String),
    /// The body could not be read from the client.
    Body(BoxError),
    /// The path has empty, `.` or `..` segments, or encoded separators: it could address something
    /// other than what the gateway routes and authorises.
    InvalidPath,
    /// The operation is known and the method is not valid for it (all of them are `POST`).
    MethodNotAllowed {
        /// The method the client used.
        method: Method,
    },
}

/// Layer that captures a [`RequestContext`] for each request. See the [module docs](self).
#[derive(Clone, Debug)]
pub struct RequestContextLayer {
    max_body_bytes: usize,
}

/// Service produced by [`RequestContextLayer`].
#[derive(Clone, Debug)]
pub struct CaptureContext<S> {
    inner: S,
    max_body_bytes: usize,
}

/// Response future of [`CaptureContext`]: boxed, since it awaits the body before calling the inner service.
pub type CaptureFuture<R, E> = Pin<Box<dyn Future<Output = Result<R, E>> + Send>>;

// === impl RequestContext ===

impl RequestContext {
    /// Reads `body` (at most `max_body_bytes`) and captures the context of a request.
    ///
    /// Used by [`RequestContextLayer`]; a service that does the layer's work itself calls it too.
    pub async fn capture<B>(
        parts: &Parts,
        body: B,
        max_body_bytes: usize,
    ) -> Result<Self, CaptureError>
    where
        B: Body<Data = Bytes>,
        B::Error: Into<BoxError>,
    {
        let received_at = Instant::now();
        if let Some(len) = content_length(&parts.headers) {
            if len > max_body_bytes as u64 {
                return Err(CaptureError::TooLarge {
                    limit: max_body_bytes,
                });
            }
        }
        let body = match Limited::new(body, max_body_bytes).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(err) if err.is::<LengthLimitError>() => {
                return Err(CaptureError::TooLarge {
                    limit: max_body_bytes,
                });
            }
            Err(err) => return Err(CaptureError::Body(err)),
        };
        Self::from_parts_and_body(parts, body, received_at)
    }

    /// Captures the context of a request whose body is already buffered.
    pub fn from_parts_and_body(
        parts: &Parts,
        body: Bytes,
        received_at: Instant,
    ) -> Result<Self, CaptureError> {
        let path = parts.uri.path();
        if !is_clean_path(path) {
            return Err(CaptureError::InvalidPath);
        }
        let (operation, path_deployment, deployment_source) = classify_path(path);
        // Every operation the gateway estimates is a POST: another method could carry a body
        // past the estimate, so it is refused as Azure refuses it.
        if operation != Operation::Other && parts.method != Method::POST {
            return Err(CaptureError::MethodNotAllowed {
                method: parts.method.clone(),
            });
        }
        let api_version = parts.uri.query().and_then(api_version);

        let wants_json = operation != Operation::Other
            && parts.method == Method::POST
            && !is_multipart(&parts.headers);
        let json = if wants_json {
            let json = RequestJson::parse(&body).map_err(|e| CaptureError::InvalidJson(e.0))?;
            Some(Arc::new(json))
        } else {
            None
        };

        let deployment = match deployment_source {
            DeploymentSource::Path { .. } => path_deployment,
            DeploymentSource::Body => json.as_ref().and_then(|j| j.model.clone()),
            DeploymentSource::None => None,
        };
        // Azure's deployment names have at most 64 characters; a longer one would only end up,
        // whole, in logs, span names and error messages.
        if deployment
            .as_ref()
            .is_some_and(|d| d.len() > MAX_DEPLOYMENT_NAME)
        {
            return Err(CaptureError::InvalidJson(format!(
                "the deployment name is longer than {MAX_DEPLOYMENT_NAME} characters"
            )));
        }
        Ok(RequestContext {
            request_id: request_id(&parts.headers),
            received_at,
            operation,
            deployment,
            deployment_source,
            api_version,
            json,
            ask_for_usage: false,
            body,
        })
    }

    /// The whole request body as received (see [`body_for`](Self::body_for) for what to send).
    pub fn body(&self) -> &Bytes {
        &self.body
    }

    /// The body's one parse, for the operations whose body is JSON.
    pub fn json(&self) -> Option<&RequestJson> {
        self.json.as_deref()
    }

    /// Whether the client asked for a Server-Sent Events stream.
    pub fn stream(&self) -> bool {
        self.json.as_ref().is_some_and(|j| j.stream)
    }

    /// `max_completion_tokens`, `max_tokens` or `max_output_tokens` from the body.
    pub fn max_tokens(&self) -> Option<u64> {
        self.json.as_ref().and_then(|j| j.output_limit())
    }

    /// `n` (choices) from the body.
    pub fn n(&self) -> Option<u32> {
        self.json.as_ref().and_then(|j| j.n)
    }

    /// The body to send to a backend: the body as received, with the recorded edits spliced in, and
    /// `model` replaced by `model` when given (a backend's own deployment name on v1 and Responses
    /// paths). Costs nothing when there is nothing to change.
    pub fn body_for(&self, model: Option<&str>) -> Bytes {
        self.body_at_tier(model, None)
    }

    /// Like [`body_for`](Self::body_for), with the body's `service_tier` replaced by
    /// `service_tier` when given (a Flex request retried at the default tier).
    pub fn body_at_tier(&self, model: Option<&str>, service_tier: Option<&str>) -> Bytes {
        match &self.json {
            Some(json) => json.edit(
                &self.body,
                &Edits {
                    model,
                    include_usage: self.ask_for_usage,
                    service_tier,
                },
            ),
            None => self.body.clone(),
        }
    }

    /// `service_tier` from the body, as the client sent it.
    pub fn service_tier(&self) -> Option<&str> {
        self.json.as_ref().and_then(|j| j.service_tier())
    }
}

// === impl CaptureError ===

impl CaptureError {
    /// The Azure-shaped answer for this error.
    pub fn into_response<B: From<Bytes>>(self) -> Response<B> {
        match self {
            CaptureError::TooLarge { limit } => azure_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "RequestEntityTooLarge",
                &format!("The request body exceeds the gateway's limit of {limit} bytes."),
            ),
            CaptureError::InvalidJson(msg) => azure_error(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                &format!("The request body is not valid JSON: {msg}"),
            ),
            CaptureError::InvalidPath => azure_error(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                "The request path is not valid: empty, '.' or '..' segments and encoded separators are not allowed.",
            ),
            CaptureError::MethodNotAllowed { method } => {
                let mut res: Response<B> = azure_error(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "MethodNotAllowed",
                    &format!("The method {method} is not allowed for this operation; use POST."),
                );
                res.headers_mut()
                    .insert(http::header::ALLOW, HeaderValue::from_static("POST"));
                res
            }
            // The server's body timeout (a client that stalled mid-body) says so with `TimedOut`.
            CaptureError::Body(err) if timed_out(&*err) => azure_error(
                StatusCode::REQUEST_TIMEOUT,
                "RequestTimeout",
                &format!("The request body stalled: {err}"),
            ),
            CaptureError::Body(err) => azure_error(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                &format!("The request body could not be read: {err}"),
            ),
        }
    }
}

/// Whether `err`, or an error it wraps, is an I/O time-out.
fn timed_out(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut level = Some(err);
    while let Some(e) = level {
        if e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
        {
            return true;
        }
        level = e.source();
    }
    false
}

// === impl RequestContextLayer ===

impl RequestContextLayer {
    /// Captures contexts, rejecting bodies larger than `max_body_bytes` with 413.
    pub fn new(max_body_bytes: usize) -> Self {
        Self { max_body_bytes }
    }
}

impl<S> Layer<S> for RequestContextLayer {
    type Service = CaptureContext<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CaptureContext {
            inner,
            max_body_bytes: self.max_body_bytes,
        }
    }
}

// === impl CaptureContext ===

impl<S> CaptureContext<S> {
    /// Wraps `inner`.
    pub fn new(inner: S, max_body_bytes: usize) -> Self {
        Self {
            inner,
            max_body_bytes,
        }
    }

    /// A [`RequestContextLayer`] with this cap.
    pub fn layer(max_body_bytes: usize) -> RequestContextLayer {
        RequestContextLayer::new(max_body_bytes)
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, ReqB, ResB> Service<Request<ReqB>> for CaptureContext<S>
where
    S: Service<Request<ReqB>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send,
    ReqB: Body<Data = Bytes> + From<Bytes> + Send + 'static,
    ReqB::Error: Into<BoxError>,
    ResB: Body + From<Bytes>,
{
    type Response = Response<RecordBody<ResB>>;
    type Error = S::Error;
    type Future = CaptureFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        // Call the instance that was made ready; leave a fresh clone behind for the next request.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let max = self.max_body_bytes;
        Box::pin(async move {
            let (mut parts, body) = req.into_parts();
            let ctx = match RequestContext::capture(&parts, body, max).await {
                Ok(ctx) => ctx,
                Err(err) => {
                    tracing::info!(error = ?err, path = parts.uri.path(), "request rejected");
                    let record = Arc::new(Record::new(request_id(&parts.headers), None));
                    return Ok(finish(err.into_response(), record));
                }
            };
            // Upstreams see the same id the client gets back.
            parts
                .headers
                .insert(X_REQUEST_ID.clone(), ctx.request_id.clone());
            let record = Arc::new(Record::new(ctx.request_id.clone(), Some(&ctx)));
            let body = ReqB::from(ctx.body.clone());
            parts.extensions.insert(ctx);
            parts.extensions.insert(record.clone());
            let res = inner.call(Request::from_parts(parts, body)).await?;
            Ok(finish(res, record))
        })
    }
}

/// Stamps the response with who served it, and hands it the record, which its body ends.
fn finish<B: Body>(mut res: Response<B>, record: Arc<Record>) -> Response<RecordBody<B>> {
    // The one place these are written: every answer, including those made before any upstream was
    // tried, carries the request id and says who served it and after how many attempts.
    let served_by = res.extensions_mut().remove::<ServedBy>().map(|s| s.0);
    let h = res.headers_mut();
    h.insert(X_REQUEST_ID.clone(), record.request_id().clone());
    h.insert(
        X_SERVED_BY.clone(),
        served_by.unwrap_or_else(|| HeaderValue::from_static("gateway")),
    );
    let attempts = record.failover().map_or(0, |r| r.attempts.len());
    h.insert(X_GATEWAY_ATTEMPTS.clone(), HeaderValue::from(attempts));
    let length = content_length(res.headers());
    res.extensions_mut().insert(record.clone());
    res.map(|body| RecordBody::new(body, record, length))
}

/// The operation, the deployment named in the path, and where the deployment is named. Path
/// segments are compared as Azure compares them, percent-decoded and case-insensitively
/// ([`path_eq`]), so no spelling of an operation escapes its estimate and limits. A known
/// operation's deployment path is forwarded in its canonical form, the form that was estimated.
fn classify_path(path: &str) -> (Operation, Option<String>, DeploymentSource) {
    const NOT_ROUTED: (Operation, Option<String>, DeploymentSource) =
        (Operation::Other, None, DeploymentSource::None);
    let Some(rest) = path.strip_prefix("/openai/") else {
        return NOT_ROUTED;
    };
    let (first, after) = rest.split_once('/').unwrap_or((rest, ""));
    if path_eq(first, "deployments") {
        let (name, tail) = match after.find('/') {
            Some(i) => (&after[..i], &after[i..]),
            None => (after, ""),
        };
        if !name.is_empty() {
            let op = Operation::from_suffix(tail.trim_start_matches('/'));
            let rest = match op.suffix() {
                Some(canonical) => format!("/{canonical}"),
                None => tail.to_owned(),
            };
            return (op, Some(name.to_owned()), DeploymentSource::Path { rest });
        }
        return NOT_ROUTED;
    }
    if path_eq(first, "v1") {
        return match Operation::from_suffix(after) {
            Operation::Other => NOT_ROUTED,
            op => (op, None, DeploymentSource::Body),
        };
    }
    // `/openai/completions` etc. without `v1` are not Azure paths; only Responses lives there.
    match Operation::from_suffix(rest) {
        Operation::Responses => (Operation::Responses, None, DeploymentSource::Body),
        _ => NOT_ROUTED,
    }
}

/// No segment may be empty, `.` or `..`, nor hide a dot, slash or backslash behind percent-encoding:
/// the upstream URL is built from these segments, and a client must not reach a deployment other than
/// the one it was authorised and routed for.
fn is_clean_path(path: &str) -> bool {
    let Some(rest) = path.strip_prefix('/') else {
        return false;
    };
    rest.split('/').all(|segment| {
        !segment.is_empty()
            && segment != "."
            && segment != ".."
            && !segment.contains('\\')
            && !segment.to_ascii_lowercase().contains("%2e")
            && !segment.to_ascii_lowercase().contains("%2f")
            && !segment.to_ascii_lowercase().contains("%5c")
    })
}

fn api_version(query: &str) -> Option<String> {
    query
        .split('&')
        .find_map(|kv| kv.strip_prefix("api-version="))
        .map(str::to_owned)
}

fn is_multipart(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("multipart/"))
}

/// The client's request id when it is a sane token, else a new UUID.
fn request_id(headers: &HeaderMap) -> HeaderValue {
    client_request_id(headers).unwrap_or_else(new_request_id)
}

/// The client's `x-request-id` (or else `x-ms-client-request-id`) when it is a sane token: at most
/// 128 ASCII letters, digits and `-_.:`. For answers made outside [`RequestContextLayer`], which
/// carry the same id the layer would have used.
///
/// ```
/// use gateway_layers::context::client_request_id;
/// use http::{HeaderMap, HeaderValue};
///
/// let mut h = HeaderMap::new();
/// h.insert("x-ms-client-request-id", HeaderValue::from_static("sdk-1"));
/// assert_eq!(client_request_id(&h).unwrap(), "sdk-1");
/// h.insert("x-ms-client-request-id", HeaderValue::from_static("has spaces"));
/// assert!(client_request_id(&h).is_none());
/// ```
pub fn client_request_id(headers: &HeaderMap) -> Option<HeaderValue> {
    for name in [&X_REQUEST_ID, &X_MS_CLIENT_REQUEST_ID] {
        if let Some(v) = headers.get(name) {
            let b = v.as_bytes();
            if !b.is_empty()
                && b.len() <= 128
                && b.iter()
                    .all(|c| c.is_ascii_alphanumeric() || b"-_.:".contains(c))
            {
                return Some(v.clone());
            }
        }
    }
    None
}

/// A random (version 4) UUID, formatted as Azure's request ids are.
pub fn new_request_id() -> HeaderValue {
    let a = fastrand::u64(..);
    let b = fastrand::u64(..);
    let a = (a & 0xffff_ffff_ffff_0fff) | 0x4000;
    let b = (b & 0x3fff_ffff_ffff_ffff) | 0x8000_0000_0000_0000;
    let s = format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xffff,
        b >> 48,
        b & 0xffff_ffff_ffff
    );
    // Hex digits and dashes are always a valid header value.
    HeaderValue::from_str(&s).unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(method: Method, uri: &str) -> Parts {
        Request::builder()
            .method(method)
            .uri(uri)
            .body(())
            .unwrap()
            .into_parts()
            .0
    }

    fn capture(uri: &str, body: &str) -> Result<RequestContext, CaptureError> {
        RequestContext::from_parts_and_body(
            &parts(Method::POST, uri),
            Bytes::from(body.to_owned()),
            Instant::now(),
        )
    }

    #[test]
    fn classic_path_names_deployment_and_operation() {
        let ctx = capture(
            "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21",
            r#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":50,"stream":true}"#,
        )
        .unwrap();
        assert_eq!(ctx.operation, Operation::ChatCompletions);
        assert_eq!(ctx.deployment.as_deref(), Some("gpt-4o"));
        assert_eq!(ctx.api_version.as_deref(), Some("2024-10-21"));
        assert!(ctx.stream());
        assert_eq!(ctx.max_tokens(), Some(50));
        assert_eq!(
            ctx.deployment_source,
            DeploymentSource::Path {
                rest: "/chat/completions".into()
            }
        );
    }

    #[test]
    fn v1_and_responses_take_deployment_from_model() {
        let ctx = capture("/openai/v1/embeddings", r#"{"model":"emb","input":"x"}"#).unwrap();
        assert_eq!(ctx.operation, Operation::Embeddings);
        assert_eq!(ctx.deployment.as_deref(), Some("emb"));
        assert_eq!(ctx.deployment_source, DeploymentSource::Body);

        let ctx = capture(
            "/openai/responses?api-version=2025-04-01-preview",
            r#"{"model":"gpt-4o","input":"x","max_output_tokens":9}"#,
        )
        .unwrap();
        assert_eq!(ctx.operation, Operation::Responses);
        assert_eq!(ctx.deployment.as_deref(), Some("gpt-4o"));
        assert_eq!(ctx.max_tokens(), Some(9));
    }

    #[test]
    fn max_completion_tokens_wins_over_max_tokens() {
        let ctx = capture(
            "/openai/deployments/d/chat/completions",
            r#"{"max_tokens":5,"max_completion_tokens":7,"n":2}"#,
        )
        .unwrap();
        assert_eq!(ctx.max_tokens(), Some(7));
        assert_eq!(ctx.n(), Some(2));
    }

    #[test]
    fn invalid_json_is_rejected_with_a_reason() {
        let err = capture("/openai/deployments/d/chat/completions", "{nope").unwrap_err();
        match err {
            CaptureError::InvalidJson(msg) => assert!(msg.contains("line 1"), "{msg}"),
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(
            capture("/openai/deployments/d/embeddings", ""),
            Err(CaptureError::InvalidJson(_))
        ));
        assert!(matches!(
            capture("/openai/deployments/d/embeddings", "[1,2]"),
            Err(CaptureError::InvalidJson(_))
        ));
    }

    #[test]
    fn other_paths_need_no_json() {
        let ctx = capture("/openai/v1/models", "").unwrap();
        assert_eq!(ctx.operation, Operation::Other);
        assert_eq!(ctx.deployment, None);
        let ctx = capture(
            "/openai/deployments/whisper/audio/transcriptions",
            "--boundary",
        )
        .unwrap();
        assert_eq!(ctx.operation, Operation::Other);
        assert_eq!(ctx.deployment.as_deref(), Some("whisper"));
    }

    #[test]
    fn paths_that_could_escape_the_deployment_are_rejected() {
        for bad in [
            "/openai/deployments/gpt-4o/../secret/chat/completions",
            "/openai/deployments/gpt-4o/%2e%2e/secret/chat/completions",
            "/openai/deployments/gpt-4o/%2E./secret/chat/completions",
            "/openai/deployments//chat/completions",
            "/openai/deployments/./chat/completions",
            "/openai/deployments/a%2fb/chat/completions",
            "/openai/deployments/a%5Cb/chat/completions",
        ] {
            assert!(
                matches!(capture(bad, "{}"), Err(CaptureError::InvalidPath)),
                "{bad}"
            );
        }
        assert!(capture("/openai/deployments/gpt-4o.v2/chat/completions", "{}").is_ok());
    }

    #[test]
    fn encoded_or_case_changed_operations_are_the_operation() {
        let body = r#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":50}"#;
        for path in [
            "/openai/deployments/gpt-4o/chat/complet%69ons?api-version=2024-10-21",
            "/openai/deployments/gpt-4o/Chat/Completions",
            "/openai/Deployments/gpt-4o/CHAT/%63ompletions",
            "/openai/deployment%73/gpt-4o/chat/completions",
        ] {
            let ctx = capture(path, body).unwrap();
            assert_eq!(ctx.operation, Operation::ChatCompletions, "{path}");
            assert_eq!(ctx.deployment.as_deref(), Some("gpt-4o"), "{path}");
            assert_eq!(ctx.max_tokens(), Some(50), "{path}");
            // What is forwarded is what was estimated.
            assert_eq!(
                ctx.deployment_source,
                DeploymentSource::Path {
                    rest: "/chat/completions".into()
                },
                "{path}"
            );
        }
        let ctx = capture("/openai/V1/Embedding%73", r#"{"model":"emb","input":"x"}"#).unwrap();
        assert_eq!(ctx.operation, Operation::Embeddings);
        assert_eq!(ctx.deployment.as_deref(), Some("emb"));
        let ctx = capture("/openai/Responses", r#"{"model":"m","input":"x"}"#).unwrap();
        assert_eq!(ctx.operation, Operation::Responses);
        // A known operation's body must be JSON, whatever the spelling.
        assert!(matches!(
            capture("/openai/deployments/d/Chat/Completions", "{nope"),
            Err(CaptureError::InvalidJson(_))
        ));
    }

    #[test]
    fn unknown_operations_keep_their_path_and_only_deployment_paths_route() {
        let ctx = capture("/openai/deployments/d/audio/Speech", "{}").unwrap();
        assert_eq!(ctx.operation, Operation::Other);
        assert_eq!(ctx.deployment.as_deref(), Some("d"));
        assert_eq!(
            ctx.deployment_source,
            DeploymentSource::Path {
                rest: "/audio/Speech".into()
            }
        );
        for path in [
            "/openai/v1/models",
            "/openai/v1/chat/completions%20",
            "/openai/files",
        ] {
            let ctx = capture(path, "{}").unwrap();
            assert_eq!(ctx.operation, Operation::Other, "{path}");
            assert_eq!(ctx.deployment_source, DeploymentSource::None, "{path}");
        }
    }

    #[test]
    fn other_methods_on_a_known_operation_are_405() {
        for (method, path) in [
            (Method::GET, "/openai/deployments/d/chat/completions"),
            (Method::PUT, "/openai/deployments/d/Embeddings"),
            (Method::DELETE, "/openai/v1/chat/completions"),
            (Method::GET, "/openai/responses"),
        ] {
            let err = RequestContext::from_parts_and_body(
                &parts(method.clone(), path),
                Bytes::from_static(b"{}"),
                Instant::now(),
            )
            .unwrap_err();
            assert!(
                matches!(err, CaptureError::MethodNotAllowed { .. }),
                "{method} {path}"
            );
            let res: Response<Bytes> = err.into_response();
            assert_eq!(res.status(), StatusCode::METHOD_NOT_ALLOWED);
            assert_eq!(res.headers()[http::header::ALLOW], "POST");
            let body = std::str::from_utf8(res.body()).unwrap();
            assert!(body.contains(r#""code":"MethodNotAllowed""#), "{body}");
        }
        // Other operations keep their methods: a GET of a deployment-scoped resource is forwarded.
        let ok = RequestContext::from_parts_and_body(
            &parts(Method::GET, "/openai/deployments/d/batches"),
            Bytes::new(),
            Instant::now(),
        );
        assert!(ok.is_ok());
    }

    #[test]
    fn absurdly_long_deployment_names_are_refused() {
        let long = "m".repeat(200);
        let body = format!(r#"{{"model":"{long}","input":"x"}}"#);
        assert!(capture("/openai/v1/embeddings", &body).is_err());
        let path = format!("/openai/deployments/{long}/embeddings");
        assert!(capture(&path, "{}").is_err());
    }

    #[test]
    fn request_id_is_taken_from_client_when_sane() {
        let mut h = HeaderMap::new();
        h.insert(&X_MS_CLIENT_REQUEST_ID, HeaderValue::from_static("sdk-1"));
        assert_eq!(request_id(&h), "sdk-1");
        h.insert(
            &X_REQUEST_ID,
            HeaderValue::from_static("bad id with spaces"),
        );
        assert_eq!(request_id(&h), "sdk-1");
        let fresh = request_id(&HeaderMap::new());
        let s = fresh.to_str().unwrap();
        assert_eq!(s.len(), 36);
        assert_eq!(&s[14..15], "4");
    }

    #[tokio::test]
    async fn oversized_body_is_413() {
        let p = parts(Method::POST, "/openai/deployments/d/embeddings");
        let body = http_body_util::Full::new(Bytes::from(vec![b' '; 2048]));
        let err = RequestContext::capture(&p, body, 1024).await.unwrap_err();
        let res: Response<Bytes> = err.into_response();
        assert_eq!(res.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert!(
            std::str::from_utf8(res.body())
                .unwrap()
                .contains("RequestEntityTooLarge")
        );
    }
}
