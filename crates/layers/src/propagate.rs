//! Header propagation: which headers cross the gateway, in each direction.
//!
//! On the way in, only allow-listed client headers stay on the request (by default `traceparent`,
//! `tracestate`, `x-ms-client-request-id`, `x-request-id`, `content-type`, `accept`, `user-agent`);
//! the client's credentials (`api-key`, `Authorization`) and hop-by-hop headers are always removed,
//! whatever the list says. On the way out, only allow-listed upstream headers reach the client (by default
//! `apim-request-id`, `x-ms-region`, `retry-after*`, `x-ratelimit-*`, `x-ms-deployment-name`), plus the
//! body's framing headers and the gateway's own (`x-served-by`, `x-gateway-*`, `x-request-id`). Rules
//! then set, append or delete headers like API Management's `set-header exists-action`.
//!
//! Place it inside authentication (which needs the client's key) and outside the failover layer (which
//! copies the remaining request headers onto every attempt).
//!
//! # Example
//!
//! ```
//! use axum::{Router, body::Body, http::HeaderMap, routing::get};
//! use gateway_layers::propagate::{ExistsAction, HeaderRules, PropagateHeadersLayer};
//! use tower::ServiceExt;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! // The handler stands in for the upstream: it echoes which request headers reached it.
//! async fn upstream(headers: HeaderMap) -> ([(&'static str, &'static str); 2], String) {
//!     let mut seen: Vec<_> = headers.keys().map(|k| k.as_str()).collect();
//!     seen.sort();
//!     ([("x-ms-region", "Sweden Central"), ("set-cookie", "internal=1")], seen.join(","))
//! }
//!
//! let rules = HeaderRules::default()
//!     .set_request("x-gateway-name", "edge-1", ExistsAction::Override)
//!     .unwrap();
//! let app = Router::new().route("/", get(upstream)).layer(PropagateHeadersLayer::new(rules));
//!
//! let req = http::Request::get("/")
//!     .header("api-key", "client-secret")
//!     .header("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
//!     .header("cookie", "a=b")
//!     .body(Body::empty())
//!     .unwrap();
//! let res = app.oneshot(req).await.unwrap();
//! assert_eq!(res.headers()["x-ms-region"], "Sweden Central");
//! assert!(res.headers().get("set-cookie").is_none());
//! let body = axum::body::to_bytes(res.into_body(), 1024).await.unwrap();
//! assert_eq!(&body[..], b"traceparent,x-gateway-name");
//! # }
//! ```

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::header::{self, InvalidHeaderName, InvalidHeaderValue};
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use crate::headers::{X_GATEWAY_THROTTLED, is_gateway_owned, never_forwarded};

/// What a rule does when the header already exists (API Management's `exists-action`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExistsAction {
    /// Replace any existing value.
    Override,
    /// Set only when absent.
    Skip,
    /// Add another value.
    Append,
    /// Remove the header.
    Delete,
}

/// A header name, or a prefix written `x-ratelimit-*`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HeaderPattern {
    /// Exactly this header.
    Exact(HeaderName),
    /// Every header starting with this (lower-case) prefix.
    Prefix(String),
}

/// One set/append/delete rule.
#[derive(Clone, Debug)]
pub struct HeaderRule {
    /// The header.
    pub name: HeaderName,
    /// The value to set or append; unused by [`ExistsAction::Delete`].
    pub value: HeaderValue,
    /// What to do.
    pub action: ExistsAction,
}

/// Which headers cross the gateway and how they are rewritten.
#[derive(Clone, Debug)]
pub struct HeaderRules {
    forward: Vec<HeaderPattern>,
    returned: Vec<HeaderPattern>,
    request_rules: Vec<HeaderRule>,
    response_rules: Vec<HeaderRule>,
}

/// Layer applying [`HeaderRules`]. See the [module docs](self).
#[derive(Clone, Debug)]
pub struct PropagateHeadersLayer {
    rules: Arc<HeaderRules>,
}

/// Service produced by [`PropagateHeadersLayer`].
#[derive(Clone, Debug)]
pub struct PropagateHeaders<S> {
    inner: S,
    rules: Arc<HeaderRules>,
}

pin_project! {
    /// Response future of [`PropagateHeaders`]: filters the response headers.
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        rules: Arc<HeaderRules>,
    }
}

/// Client headers forwarded upstream unless configured otherwise.
pub const DEFAULT_FORWARD: &[&str] = &[
    "traceparent",
    "tracestate",
    "x-ms-client-request-id",
    "x-request-id",
    "content-type",
    "accept",
    "user-agent",
];

/// Upstream headers returned to the client unless configured otherwise.
pub const DEFAULT_RETURN: &[&str] = &[
    "apim-request-id",
    "x-ms-region",
    "retry-after*",
    "x-ms-retry-after-ms",
    "x-ratelimit-*",
    "x-ms-deployment-name",
];

/// Always returned: the body's framing, and the headers the gateway itself writes.
const ALWAYS_RETURN: &[HeaderName] = &[
    header::CONTENT_TYPE,
    header::CONTENT_LENGTH,
    header::CONTENT_ENCODING,
];

// === impl HeaderPattern ===

impl HeaderPattern {
    /// Parses `name` or `prefix*`.
    pub fn parse(s: &str) -> Result<Self, InvalidHeaderName> {
        match s.strip_suffix('*') {
            Some(prefix) => {
                // Validate the prefix as a header name so typos fail at start-up.
                HeaderName::from_bytes(prefix.as_bytes())?;
                Ok(HeaderPattern::Prefix(prefix.to_ascii_lowercase()))
            }
            None => Ok(HeaderPattern::Exact(HeaderName::from_bytes(s.as_bytes())?)),
        }
    }

    fn matches(&self, name: &HeaderName) -> bool {
        match self {
            HeaderPattern::Exact(n) => n == name,
            HeaderPattern::Prefix(p) => name.as_str().starts_with(p.as_str()),
        }
    }
}

// === impl HeaderRules ===

impl Default for HeaderRules {
    fn default() -> Self {
        let parse = |list: &[&str]| {
            list.iter()
                .filter_map(|s| HeaderPattern::parse(s).ok())
                .collect()
        };
        Self {
            forward: parse(DEFAULT_FORWARD),
            returned: parse(DEFAULT_RETURN),
            request_rules: Vec::new(),
            response_rules: Vec::new(),
        }
    }
}

impl HeaderRules {
    /// Replaces the list of client headers forwarded upstream (`name` or `prefix*`).
    pub fn forward<I, T>(mut self, patterns: I) -> Result<Self, InvalidHeaderName>
    where
        I: IntoIterator<Item = T>,
        T: AsRef<str>,
    {
        self.forward = patterns
            .into_iter()
            .map(|p| HeaderPattern::parse(p.as_ref()))
            .collect::<Result<_, _>>()?;
        Ok(self)
    }

    /// Replaces the list of upstream headers returned to the client (`name` or `prefix*`).
    pub fn return_headers<I, T>(mut self, patterns: I) -> Result<Self, InvalidHeaderName>
    where
        I: IntoIterator<Item = T>,
        T: AsRef<str>,
    {
        self.returned = patterns
            .into_iter()
            .map(|p| HeaderPattern::parse(p.as_ref()))
            .collect::<Result<_, _>>()?;
        Ok(self)
    }

    /// Adds a rule applied to requests going upstream.
    pub fn set_request(
        mut self,
        name: &str,
        value: &str,
        action: ExistsAction,
    ) -> Result<Self, RuleError> {
        self.request_rules
            .push(HeaderRule::new(name, value, action)?);
        Ok(self)
    }

    /// Adds a rule applied to responses going back to the client.
    pub fn set_response(
        mut self,
        name: &str,
        value: &str,
        action: ExistsAction,
    ) -> Result<Self, RuleError> {
        self.response_rules
            .push(HeaderRule::new(name, value, action)?);
        Ok(self)
    }

    /// Filters and rewrites request headers in place.
    pub fn apply_request(&self, headers: &mut HeaderMap) {
        retain(headers, |name| {
            !never_forwarded(name) && self.forward.iter().any(|p| p.matches(name))
        });
        apply_rules(headers, &self.request_rules);
    }

    /// Filters and rewrites response headers in place.
    pub fn apply_response(&self, headers: &mut HeaderMap) {
        // On the gateway's own 429 the wait is the whole message: keep it whatever the list says.
        let gateway_throttled = headers.contains_key(&X_GATEWAY_THROTTLED);
        retain(headers, |name| {
            ALWAYS_RETURN.contains(name)
                || is_gateway_owned(name)
                || (gateway_throttled && name.as_str().starts_with("retry-after"))
                || self.returned.iter().any(|p| p.matches(name))
        });
        apply_rules(headers, &self.response_rules);
    }
}

/// A header rule whose name or value is not a valid header.
#[derive(Debug)]
pub enum RuleError {
    /// The name is not a valid header name.
    Name(InvalidHeaderName),
    /// The value is not a valid header value.
    Value(InvalidHeaderValue),
}

impl std::fmt::Display for RuleError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RuleError::Name(e) => write!(f, "invalid header name: {e}"),
            RuleError::Value(e) => write!(f, "invalid header value: {e}"),
        }
    }
}

impl std::error::Error for RuleError {}

// === impl HeaderRule ===

impl HeaderRule {
    /// A rule; fails on an invalid name or value.
    pub fn new(name: &str, value: &str, action: ExistsAction) -> Result<Self, RuleError> {
        Ok(Self {
            name: HeaderName::from_bytes(name.as_bytes()).map_err(RuleError::Name)?,
            value: HeaderValue::from_str(value).map_err(RuleError::Value)?,
            action,
        })
    }
}

// === impl PropagateHeadersLayer ===

impl PropagateHeadersLayer {
    /// Applies `rules`.
    pub fn new(rules: HeaderRules) -> Self {
        Self {
            rules: Arc::new(rules),
        }
    }
}

impl<S> Layer<S> for PropagateHeadersLayer {
    type Service = PropagateHeaders<S>;

    fn layer(&self, inner: S) -> Self::Service {
        PropagateHeaders {
            inner,
            rules: self.rules.clone(),
        }
    }
}

// === impl PropagateHeaders ===

impl<S> PropagateHeaders<S> {
    /// A [`PropagateHeadersLayer`] applying `rules`.
    pub fn layer(rules: HeaderRules) -> PropagateHeadersLayer {
        PropagateHeadersLayer::new(rules)
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

impl<S, ReqB, ResB> Service<Request<ReqB>> for PropagateHeaders<S>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
{
    type Response = Response<ResB>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqB>) -> Self::Future {
        self.rules.apply_request(req.headers_mut());
        ResponseFuture {
            inner: self.inner.call(req),
            rules: self.rules.clone(),
        }
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut res = std::task::ready!(this.inner.poll(cx))?;
        this.rules.apply_response(res.headers_mut());
        Poll::Ready(Ok(res))
    }
}

fn retain(headers: &mut HeaderMap, keep: impl Fn(&HeaderName) -> bool) {
    // HeaderMap has no `retain`; collect the names to drop (usually none or a few) and remove them.
    let drop: Vec<HeaderName> = headers.keys().filter(|n| !keep(n)).cloned().collect();
    for name in drop {
        headers.remove(&name);
    }
}

fn apply_rules(headers: &mut HeaderMap, rules: &[HeaderRule]) {
    for rule in rules {
        match rule.action {
            ExistsAction::Override => {
                headers.insert(rule.name.clone(), rule.value.clone());
            }
            ExistsAction::Skip => {
                if !headers.contains_key(&rule.name) {
                    headers.insert(rule.name.clone(), rule.value.clone());
                }
            }
            ExistsAction::Append => {
                headers.append(rule.name.clone(), rule.value.clone());
            }
            ExistsAction::Delete => {
                headers.remove(&rule.name);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn credentials_and_hop_by_hop_never_forwarded_even_if_listed() {
        let rules = HeaderRules::default()
            .forward([
                "api-key",
                "authorization",
                "connection",
                "x-custom",
                "x-team-*",
            ])
            .unwrap();
        let mut h = map(&[
            ("api-key", "k"),
            ("authorization", "Bearer t"),
            ("connection", "keep-alive"),
            ("x-custom", "1"),
            ("x-team-a", "2"),
            ("cookie", "c"),
        ]);
        rules.apply_request(&mut h);
        let mut names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        names.sort();
        assert_eq!(names, ["x-custom", "x-team-a"]);
    }

    #[test]
    fn default_return_list_keeps_azure_headers() {
        let rules = HeaderRules::default();
        let mut h = map(&[
            ("apim-request-id", "1"),
            ("x-ratelimit-remaining-tokens", "10"),
            ("retry-after-ms", "5"),
            ("retry-after", "1"),
            ("content-type", "application/json"),
            ("x-served-by", "a (b)"),
            ("set-cookie", "s"),
            ("x-internal", "i"),
        ]);
        rules.apply_response(&mut h);
        assert!(h.contains_key("apim-request-id"));
        assert!(h.contains_key("x-ratelimit-remaining-tokens"));
        assert!(h.contains_key("retry-after-ms"));
        assert!(h.contains_key("retry-after"));
        assert!(h.contains_key("content-type"));
        assert!(h.contains_key("x-served-by"));
        assert!(!h.contains_key("set-cookie"));
        assert!(!h.contains_key("x-internal"));
    }

    #[test]
    fn the_gateway_429_keeps_its_wait_with_any_return_list() {
        let rules = HeaderRules::default()
            .return_headers(["x-ms-region"])
            .unwrap();
        let mut h = map(&[
            ("x-gateway-throttled", "true"),
            ("retry-after", "4"),
            ("retry-after-ms", "3500"),
        ]);
        rules.apply_response(&mut h);
        assert!(h.contains_key("retry-after") && h.contains_key("retry-after-ms"));
        let mut upstream = map(&[("retry-after", "4")]);
        rules.apply_response(&mut upstream);
        assert!(!upstream.contains_key("retry-after"));
    }

    #[test]
    fn exists_actions() {
        let rules = HeaderRules::default()
            .return_headers(["x-a", "x-b", "x-c", "x-d"])
            .unwrap()
            .set_response("x-a", "new", ExistsAction::Override)
            .unwrap()
            .set_response("x-b", "new", ExistsAction::Skip)
            .unwrap()
            .set_response("x-c", "new", ExistsAction::Append)
            .unwrap()
            .set_response("x-d", "", ExistsAction::Delete)
            .unwrap()
            .set_response("x-e", "added", ExistsAction::Skip)
            .unwrap();
        let mut h = map(&[
            ("x-a", "old"),
            ("x-b", "old"),
            ("x-c", "old"),
            ("x-d", "old"),
        ]);
        rules.apply_response(&mut h);
        assert_eq!(h["x-a"], "new");
        assert_eq!(h["x-b"], "old");
        assert_eq!(h.get_all("x-c").iter().count(), 2);
        assert!(!h.contains_key("x-d"));
        assert_eq!(h["x-e"], "added");
    }

    #[test]
    fn bad_patterns_are_rejected() {
        assert!(HeaderPattern::parse("bad header").is_err());
        assert!(HeaderRule::new("x-a", "bad\nvalue", ExistsAction::Override).is_err());
    }
}
