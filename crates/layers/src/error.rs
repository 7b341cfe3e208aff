//! Answers in Azure OpenAI's error shape: `{"error":{"code":..,"message":..}}`.
//!
//! Clients and SDKs parse this shape, so every answer the gateway makes itself uses it.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};

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
