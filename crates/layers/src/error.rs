//! Answers in Azure OpenAI's error shape: `{"error":{"code":..,"message":..}}`.
//!
//! Clients and SDKs parse this shape, so every answer the gateway makes itself uses it.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response, StatusCode, header};

use crate::headers::RETRY_AFTER_MS;

/// Builds a JSON error response in Azure's shape.
///
/// ```
/// use gateway_layers::error::azure_error;
/// use http::StatusCode;
///
/// let res: http::Response<bytes::Bytes> =
///     azure_error(StatusCode::BAD_REQUEST, "BadRequest", "no body");
/// assert_eq!(res.status(), 400);
/// assert_eq!(
///     res.body().as_ref(),
///     br#"{"error":{"code":"BadRequest","message":"no body"}}"#
/// );
/// ```
pub fn azure_error<B: From<Bytes>>(status: StatusCode, code: &str, message: &str) -> Response<B> {
    let body = serde_json::json!({ "error": { "code": code, "message": message } });
    let mut res = Response::new(B::from(Bytes::from(body.to_string())));
    *res.status_mut() = status;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    res
}

/// A 429 the gateway makes itself, in Azure's shape: `message` followed by "Please retry after N
/// seconds.", with `retry-after` (whole seconds, rounded up) and `retry-after-ms` set to `wait`, as
/// Azure's own 429s carry them, so SDKs wait exactly as long.
///
/// ```
/// use std::time::Duration;
/// use gateway_layers::error::too_many_requests;
///
/// let res: http::Response<bytes::Bytes> =
///     too_many_requests("Every backend is rate limited.", Duration::from_millis(1500));
/// assert_eq!(res.status(), 429);
/// assert_eq!(res.headers()["retry-after"], "2");
/// assert_eq!(res.headers()["retry-after-ms"], "1500");
/// assert!(std::str::from_utf8(res.body()).unwrap().ends_with("Please retry after 2 seconds.\"}}"));
/// ```
pub fn too_many_requests<B: From<Bytes>>(message: &str, wait: Duration) -> Response<B> {
    let (secs, _) = retry_after_values(wait);
    let mut res = azure_error(
        StatusCode::TOO_MANY_REQUESTS,
        "429",
        &format!("{message} Please retry after {secs} seconds."),
    );
    set_retry_after(res.headers_mut(), wait);
    res
}

/// Sets `retry-after` (whole seconds, rounded up) and `retry-after-ms` to `wait` (at least 1 ms), as
/// Azure's own answers carry them: on any answer that knows when to come back (a 429, or a 503 when
/// a circuit reopens or a store rests), so SDKs wait that long rather than guess.
///
/// ```
/// use std::time::Duration;
/// use gateway_layers::error::set_retry_after;
///
/// let mut headers = http::HeaderMap::new();
/// set_retry_after(&mut headers, Duration::from_millis(2500));
/// assert_eq!(headers["retry-after"], "3");
/// assert_eq!(headers["retry-after-ms"], "2500");
/// ```
pub fn set_retry_after(headers: &mut HeaderMap, wait: Duration) {
    let (secs, ms) = retry_after_values(wait);
    headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
    headers.insert(RETRY_AFTER_MS.clone(), HeaderValue::from(ms));
}

fn retry_after_values(wait: Duration) -> (u64, u64) {
    let ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1);
    (ms.div_ceil(1000), ms)
}
