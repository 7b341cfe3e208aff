//! Azure-shaped responses: the headers every answer carries, and the error bodies.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::response::Response;
use http::header::{CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use serde_json::{Value, json};

use crate::config::ResetFormat;
use crate::limits::{Breach, Rejection, Snapshot, ceil_millis, ceil_secs};
use crate::state::{Deployment, Shared, lock};

pub(crate) const X_MS_REGION: HeaderName = HeaderName::from_static("x-ms-region");
pub(crate) const APIM_REQUEST_ID: HeaderName = HeaderName::from_static("apim-request-id");
pub(crate) const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub(crate) const X_MS_DEPLOYMENT_NAME: HeaderName = HeaderName::from_static("x-ms-deployment-name");
pub(crate) const REMAINING_TOKENS: HeaderName =
    HeaderName::from_static("x-ratelimit-remaining-tokens");
pub(crate) const REMAINING_REQUESTS: HeaderName =
    HeaderName::from_static("x-ratelimit-remaining-requests");
pub(crate) const LIMIT_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-limit-tokens");
pub(crate) const LIMIT_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-limit-requests");
pub(crate) const RESET_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-reset-tokens");
pub(crate) const RESET_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-reset-requests");
pub(crate) const RETRY_AFTER_MS: HeaderName = HeaderName::from_static("retry-after-ms");
pub(crate) const DEPLOYMENT_UTILIZATION: HeaderName =
    HeaderName::from_static("azure-openai-deployment-utilization");

pub(crate) const JSON: HeaderValue = HeaderValue::from_static("application/json");
pub(crate) const EVENT_STREAM: HeaderValue = HeaderValue::from_static("text/event-stream");

const QUOTA_INCREASE: &str = "Please go here: https://aka.ms/oai/quotaincrease if you would like to further increase the default rate limit.";

/// The operations the simulator serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Operation {
    Chat,
    Completions,
    Embeddings,
    Responses,
}

/// Builds responses for one request: common headers, and rate-limit headers for a known deployment.
pub(crate) struct Reply<'a> {
    shared: &'a Shared,
    deployment: Option<&'a Deployment>,
    snapshot: Option<Snapshot>,
}

// === impl Operation ===

impl Operation {
    /// Azure's operation id, as named in 429 messages.
    pub(crate) fn azure_name(self) -> &'static str {
        match self {
            Self::Chat => "ChatCompletions_Create",
            Self::Completions => "Completions_Create",
            Self::Embeddings => "Embeddings_Create",
            Self::Responses => "Responses_Create",
        }
    }

    /// The name used in OperationNotSupported messages.
    pub(crate) fn short_name(self) -> &'static str {
        match self {
            Self::Chat => "chatCompletion",
            Self::Completions => "completion",
            Self::Embeddings => "embeddings",
            Self::Responses => "responses",
        }
    }
}

// === impl Reply ===

impl<'a> Reply<'a> {
    pub(crate) fn new(shared: &'a Shared, deployment: Option<&'a Deployment>) -> Self {
        Self {
            shared,
            deployment,
            snapshot: None,
        }
    }

    /// Remaining capacity to report from now on (after admission or rejection).
    pub(crate) fn set_snapshot(&mut self, snapshot: Snapshot) {
        self.snapshot = Some(snapshot);
    }

    /// A response with the common headers.
    pub(crate) fn respond(
        &self,
        status: StatusCode,
        content_type: HeaderValue,
        body: Body,
    ) -> Response {
        let mut response = Response::new(body);
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, content_type);
        self.common_headers(headers);
        response
    }

    /// A streamed (SSE) response; without `content-type` when the region omits it.
    pub(crate) fn stream(&self, body: Body) -> Response {
        let mut response = self.respond(StatusCode::OK, EVENT_STREAM, body);
        if self.shared.variants.omit_stream_content_type {
            response.headers_mut().remove(CONTENT_TYPE);
        }
        response
    }

    /// A JSON response.
    pub(crate) fn json(&self, status: StatusCode, value: &Value) -> Response {
        let body = serde_json::to_vec(value).unwrap_or_default();
        self.json_bytes(status, body)
    }

    /// A JSON response from compact serde_json output, spaced when the region writes it so.
    pub(crate) fn json_bytes(&self, status: StatusCode, compact: Vec<u8>) -> Response {
        let body = if self.shared.variants.spaced_json {
            spaced(&compact)
        } else {
            compact
        };
        self.respond(status, JSON, Body::from(body))
    }

    /// `{"error":{"code":..,"message":..}}`.
    pub(crate) fn error(&self, status: StatusCode, code: &str, message: &str) -> Response {
        self.json(
            status,
            &json!({"error": {"code": code, "message": message}}),
        )
    }

    pub(crate) fn resource_not_found(&self) -> Response {
        self.error(StatusCode::NOT_FOUND, "404", "Resource not found")
    }

    pub(crate) fn unauthorized(&self) -> Response {
        self.error(
            StatusCode::UNAUTHORIZED,
            "401",
            "Access denied due to invalid subscription key or wrong API endpoint. Make sure to \
             provide a valid key for an active subscription and use a correct regional API \
             endpoint for your resource.",
        )
    }

    pub(crate) fn bad_request(&self, message: &str) -> Response {
        self.error(StatusCode::BAD_REQUEST, "BadRequest", message)
    }

    pub(crate) fn deployment_not_found(&self) -> Response {
        self.error(
            StatusCode::NOT_FOUND,
            "DeploymentNotFound",
            "The API deployment for this resource does not exist. If you created the deployment \
             within the last 5 minutes, please wait a moment and try again.",
        )
    }

    pub(crate) fn operation_not_supported(&self, op: Operation, model: &str) -> Response {
        let message = format!(
            "The {} operation does not work with the specified model, {model}. Please choose \
             different model and try again. You can learn more about which models can be used \
             with each operation here: https://go.microsoft.com/fwlink/?linkid=2197993.",
            op.short_name()
        );
        self.error(StatusCode::BAD_REQUEST, "OperationNotSupported", &message)
    }

    /// Azure's 400 for a prompt caught by the content filter.
    pub(crate) fn content_filtered(&self) -> Response {
        let safe = json!({"filtered": false, "severity": "safe"});
        self.json(
            StatusCode::BAD_REQUEST,
            &json!({"error": {
                "code": "content_filter",
                "message": "The response was filtered due to the prompt triggering Azure OpenAI's \
                    content management policy. Please modify your prompt and retry. To learn more \
                    about our content filtering policies please read our documentation: \
                    https://go.microsoft.com/fwlink/?linkid=2198766",
                "param": "prompt",
                "status": 400,
                "innererror": {
                    "code": "ResponsibleAIPolicyViolation",
                    "content_filter_result": {
                        "hate": {"filtered": true, "severity": "high"},
                        "jailbreak": {"filtered": false, "detected": false},
                        "self_harm": safe,
                        "sexual": safe,
                        "violence": safe,
                    }
                }
            }}),
        )
    }

    /// Azure's 429 for a breached limit, with `retry-after`, `retry-after-ms` and the reset headers.
    pub(crate) fn rate_limited(
        &mut self,
        op: Operation,
        api_version: &str,
        rejection: &Rejection,
    ) -> Response {
        self.set_snapshot(rejection.snapshot);
        let what = match rejection.breach {
            Breach::Tokens => "token rate limit",
            Breach::Requests => "call rate limit",
        };
        let secs = ceil_secs(rejection.retry_after);
        let mut response = self.too_many_requests(op, api_version, what, secs);
        let format = self.shared.variants.reset_format;
        let headers = response.headers_mut();
        if !self.shared.variants.seconds_only_429 {
            headers.insert(
                RETRY_AFTER_MS,
                HeaderValue::from(ceil_millis(rejection.retry_after)),
            );
        }
        headers.insert(RESET_TOKENS, reset_value(rejection.reset_tokens, format));
        headers.insert(
            RESET_REQUESTS,
            reset_value(rejection.reset_requests, format),
        );
        response
    }

    /// The answer of a `status` fault.
    pub(crate) fn fault_status(
        &self,
        status: u16,
        retry_after_ms: Option<u64>,
        op: Operation,
        api_version: &str,
    ) -> Response {
        let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let retry_after_ms = match code {
            StatusCode::TOO_MANY_REQUESTS => Some(retry_after_ms.unwrap_or(1000)),
            _ => retry_after_ms,
        };
        let secs = retry_after_ms.map(|ms| ms.div_ceil(1000).max(1));
        let mut response = match code {
            StatusCode::TOO_MANY_REQUESTS => {
                self.too_many_requests(op, api_version, "call rate limit", secs.unwrap_or(1))
            }
            StatusCode::INTERNAL_SERVER_ERROR => self.error(
                code,
                "InternalServerError",
                "The server had an error while processing your request. Sorry about that!",
            ),
            StatusCode::SERVICE_UNAVAILABLE => self.error(
                code,
                "ServiceUnavailable",
                "The service is temporarily unable to process your request. Please try again later.",
            ),
            _ => self.error(
                code,
                code.as_str(),
                &format!(
                    "Simulated fault: {}",
                    code.canonical_reason().unwrap_or("error")
                ),
            ),
        };
        if let (Some(ms), Some(secs)) = (retry_after_ms, secs) {
            let variants = self.shared.variants;
            let headers = response.headers_mut();
            headers.insert(RETRY_AFTER, HeaderValue::from(secs));
            if !variants.seconds_only_429 {
                headers.insert(RETRY_AFTER_MS, HeaderValue::from(ms));
            }
            if code == StatusCode::TOO_MANY_REQUESTS {
                let reset = reset_value(Duration::from_millis(ms), variants.reset_format);
                headers.insert(RESET_REQUESTS, reset.clone());
                headers.insert(RESET_TOKENS, reset);
            }
        }
        response
    }

    fn too_many_requests(
        &self,
        op: Operation,
        api_version: &str,
        what: &str,
        secs: u64,
    ) -> Response {
        let message = format!(
            "Requests to the {} Operation under Azure OpenAI API version {api_version} have \
             exceeded {what} of your current OpenAI S0 pricing tier. Please retry after {secs} \
             seconds. {QUOTA_INCREASE}",
            op.azure_name()
        );
        let mut response = self.error(StatusCode::TOO_MANY_REQUESTS, "429", &message);
        response
            .headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from(secs));
        response
    }

    fn common_headers(&self, headers: &mut HeaderMap) {
        headers.insert(X_MS_REGION, self.shared.region_header.clone());
        headers.insert(APIM_REQUEST_ID, uuid());
        headers.insert(X_REQUEST_ID, uuid());
        if let Some(deployment) = self.deployment {
            if let Some(name) = &deployment.name_header {
                headers.insert(X_MS_DEPLOYMENT_NAME, name.clone());
            }
            let snapshot = self
                .snapshot
                .unwrap_or_else(|| lock(&deployment.limits).snapshot(Instant::now()));
            headers.insert(
                REMAINING_TOKENS,
                HeaderValue::from(snapshot.remaining_tokens),
            );
            headers.insert(
                REMAINING_REQUESTS,
                HeaderValue::from(snapshot.remaining_requests),
            );
            headers.insert(LIMIT_TOKENS, deployment.limit_tokens.clone());
            headers.insert(LIMIT_REQUESTS, deployment.limit_requests.clone());
            if deployment.config.ptu {
                let percent = format!("{}%", snapshot.utilization_percent);
                if let Ok(value) = HeaderValue::from_str(&percent) {
                    headers.insert(DEPLOYMENT_UTILIZATION, value);
                }
            }
        }
    }
}

/// An `x-ratelimit-reset-*` value: whole seconds rounded up (`6`), or a Go-style duration to the
/// millisecond (`250ms`, `6s`, `1.5s`, `1m30s`, `1h0m0s`).
pub(crate) fn reset_value(d: Duration, format: ResetFormat) -> HeaderValue {
    match format {
        ResetFormat::Seconds => HeaderValue::from(ceil_secs(d)),
        ResetFormat::Duration => {
            let text = go_duration(ceil_millis(d));
            HeaderValue::from_str(&text).unwrap_or_else(|_| HeaderValue::from(ceil_secs(d)))
        }
    }
}

/// `ms` written as Go's `time.Duration` writes it, to the millisecond.
fn go_duration(ms: u64) -> String {
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let (hours, rest) = (ms / 3_600_000, ms % 3_600_000);
    let (minutes, rest) = (rest / 60_000, rest % 60_000);
    let (secs, millis) = (rest / 1000, rest % 1000);
    let mut text = String::new();
    if hours > 0 {
        let _ = write!(text, "{hours}h");
    }
    if hours > 0 || minutes > 0 {
        let _ = write!(text, "{minutes}m");
    }
    let _ = write!(text, "{secs}");
    if millis > 0 {
        let fraction = format!("{millis:03}");
        let _ = write!(text, ".{}", fraction.trim_end_matches('0'));
    }
    text.push('s');
    text
}

/// Compact JSON re-written with a space after every `:` and `,` outside strings, as Python's
/// `json.dumps` separates them.
pub(crate) fn spaced(compact: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(compact.len() + compact.len() / 8);
    let mut in_string = false;
    let mut escaped = false;
    for &b in compact {
        out.push(b);
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
        } else if b == b'"' {
            in_string = true;
        } else if b == b':' || b == b',' {
            out.push(b' ');
        }
    }
    out
}

/// The content-filter annotations of a harmless completion.
pub(crate) fn completion_filter_results() -> Value {
    let safe = json!({"filtered": false, "severity": "safe"});
    json!({"hate": safe, "self_harm": safe, "sexual": safe, "violence": safe})
}

/// The `prompt_filter_results` of a harmless prompt.
pub(crate) fn prompt_filter_results() -> Value {
    let mut results = completion_filter_results();
    results["jailbreak"] = json!({"filtered": false, "detected": false});
    json!([{"prompt_index": 0, "content_filter_results": results}])
}

/// A random version-4 UUID, as a header value.
pub(crate) fn uuid() -> HeaderValue {
    let r = fastrand::u128(..);
    let r = (r & !(0xf << 76)) | (0x4 << 76);
    let r = (r & !(0x3 << 62)) | (0x2 << 62);
    let text = format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        r >> 96,
        (r >> 80) & 0xffff,
        (r >> 64) & 0xffff,
        (r >> 48) & 0xffff,
        r & 0xffff_ffff_ffff
    );
    HeaderValue::from_str(&text)
        .unwrap_or_else(|_| HeaderValue::from_static("00000000-0000-4000-8000-000000000000"))
}

/// A random id such as `chatcmpl-` followed by 29 letters and digits.
pub(crate) fn random_id(prefix: &str) -> String {
    let mut id = String::with_capacity(prefix.len() + 29);
    id.push_str(prefix);
    id.extend((0..29).map(|_| fastrand::alphanumeric()));
    id
}

/// Seconds since the Unix epoch.
pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spacing_follows_python_and_leaves_strings_alone() {
        let compact = br#"{"a":[1,2],"b":{"c":"x, y: \"z\",w"},"d":null}"#;
        let out = String::from_utf8(spaced(compact)).unwrap();
        assert_eq!(
            out,
            r#"{"a": [1, 2], "b": {"c": "x, y: \"z\",w"}, "d": null}"#
        );
        let back: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(back, serde_json::from_slice::<Value>(compact).unwrap());
    }

    #[test]
    fn reset_values() {
        let ms = Duration::from_millis;
        assert_eq!(reset_value(ms(250), ResetFormat::Seconds), "1");
        assert_eq!(reset_value(ms(6000), ResetFormat::Seconds), "6");
        assert_eq!(reset_value(ms(250), ResetFormat::Duration), "250ms");
        assert_eq!(reset_value(ms(6000), ResetFormat::Duration), "6s");
        assert_eq!(reset_value(ms(1500), ResetFormat::Duration), "1.5s");
        assert_eq!(reset_value(ms(90_000), ResetFormat::Duration), "1m30s");
        assert_eq!(reset_value(ms(360_000), ResetFormat::Duration), "6m0s");
        assert_eq!(
            reset_value(ms(3_600_001), ResetFormat::Duration),
            "1h0m0.001s"
        );
    }

    #[test]
    fn uuids_look_like_v4() {
        let u = uuid();
        let s = u.to_str().unwrap();
        assert_eq!(s.len(), 36);
        assert_eq!(&s[14..15], "4");
        assert!(matches!(&s[19..20], "8" | "9" | "a" | "b"));
    }
}
