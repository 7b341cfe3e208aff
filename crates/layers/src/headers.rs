//! The header names the gateway owns, and the few header facts several layers decide on.
//!
//! Every name the gateway writes or reads for its own purposes is defined here once, so that a layer
//! that filters headers (see [`propagate`](crate::propagate)) can tell the gateway's own from the
//! backend's, and no layer spells a name by hand.
//!
//! ```
//! use gateway_layers::headers::{X_SERVED_BY, is_gateway_owned, never_forwarded};
//!
//! assert!(is_gateway_owned(&X_SERVED_BY));
//! assert!(never_forwarded(&http::HeaderName::from_static("api-key")));
//! assert!(!never_forwarded(&http::HeaderName::from_static("traceparent")));
//! ```

use http::{HeaderMap, HeaderName, header};

/// `x-request-id`: the id the gateway answers with and sends upstream.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// `x-ms-client-request-id`: Azure SDKs' own request id, accepted when `x-request-id` is absent.
pub static X_MS_CLIENT_REQUEST_ID: HeaderName = HeaderName::from_static("x-ms-client-request-id");
/// `x-served-by`: which backend (`name (region)`) answered, or `gateway` when the gateway did.
pub static X_SERVED_BY: HeaderName = HeaderName::from_static("x-served-by");
/// `x-gateway-attempts`: how many upstream attempts the gateway made for this request.
pub static X_GATEWAY_ATTEMPTS: HeaderName = HeaderName::from_static("x-gateway-attempts");
/// `x-gateway-throttled`: set on a 429 the gateway made because every backend was cooling down.
pub static X_GATEWAY_THROTTLED: HeaderName = HeaderName::from_static("x-gateway-throttled");
/// `x-gateway-limit`: set on the gateway's own answer to a consumer over its limits
/// (`tokens`, `requests` or `quota`).
pub static X_GATEWAY_LIMIT: HeaderName = HeaderName::from_static("x-gateway-limit");
/// `retry-after-ms`: Azure's millisecond retry hint, which the gateway's own 429s carry too.
pub static RETRY_AFTER_MS: HeaderName = HeaderName::from_static("retry-after-ms");
/// `api-key`: how Azure OpenAI clients present a key.
pub static API_KEY: HeaderName = HeaderName::from_static("api-key");
/// `x-ratelimit-remaining-tokens`: a deployment's (or a consumer's) tokens left in the minute.
pub static X_RATELIMIT_REMAINING_TOKENS: HeaderName =
    HeaderName::from_static("x-ratelimit-remaining-tokens");
/// `x-ratelimit-remaining-requests`: a deployment's (or a consumer's) requests left.
pub static X_RATELIMIT_REMAINING_REQUESTS: HeaderName =
    HeaderName::from_static("x-ratelimit-remaining-requests");

/// Whether the gateway writes this header itself (`x-served-by`, `x-request-id`, `x-gateway-*`):
/// such a header is never taken from a backend's answer by a filter, nor stripped from the gateway's.
pub fn is_gateway_owned(name: &HeaderName) -> bool {
    let s = name.as_str();
    s == "x-served-by" || s == "x-request-id" || s.starts_with("x-gateway-")
}

/// Whether a client header must never reach a backend, whatever a policy says: the client's
/// credentials (the backend gets the gateway's own), and hop-by-hop and framing headers, which the
/// HTTP client computes anew for each attempt (RFC 9110 7.6.1).
pub fn never_forwarded(name: &HeaderName) -> bool {
    matches!(
        *name,
        header::AUTHORIZATION
            | header::CONNECTION
            | header::HOST
            | header::CONTENT_LENGTH
            | header::TE
            | header::TRAILER
            | header::TRANSFER_ENCODING
            | header::UPGRADE
    ) || name == API_KEY
        || name == "keep-alive"
        || name.as_str().starts_with("proxy-")
}

/// Whether the answer is a Server-Sent Events stream.
pub fn is_event_stream(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"))
}

/// The declared body length, if any and valid.
pub fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}
