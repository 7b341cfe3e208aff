//! The `/openai/*` surface: routing, faults, auth, limits and the answers.
//!
//! Order of checks for each request (each step answers on failure):
//! 1. count the request; unknown path or method: 404 `Resource not found`;
//! 2. faults (they simulate the infrastructure, so they come before everything else);
//! 3. `api-version` on classic deployment paths: 404 `Resource not found`;
//! 4. credentials: 401;
//! 5. JSON body: 400 `BadRequest`; deployment: 404 `DeploymentNotFound`; operation: 400
//!    `OperationNotSupported`; required fields: 400 `BadRequest`;
//! 6. rate limits, on the arrival estimate: 429;
//! 7. content filter marker: 400 `content_filter`;
//! 8. the answer (JSON or SSE).

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::to_bytes;
use axum::extract::{Request, State};
use axum::response::Response;
use bytes::Bytes;
use http::header::AUTHORIZATION;
use http::request::Parts;
use http::{HeaderMap, Method, StatusCode};
use serde::Serialize;
use serde_json::{Value, json};

use crate::azure::{
    Operation, Reply, completion_filter_results, prompt_filter_results, random_id, unix_now,
};
use crate::config::DeploymentKind;
use crate::faults::FaultKind;
use crate::limits::Admission;
use crate::server::ConnectionKill;
use crate::state::{Deployment, Shared, lock};
use crate::streaming::{self, StreamMeta};
use crate::tokens::{self, Generated, Prompt};

/// Largest request body read (larger ones get 413).
const MAX_BODY: usize = 64 << 20;

/// Azure's reservation for completion tokens when the request sets no maximum.
const DEFAULT_ESTIMATE_COMPLETION: u64 = 16;

/// What to do with a request once it has been looked at.
enum Outcome {
    Respond(Response),
    Drop,
    Hang,
}

/// Where a request goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Route<'a> {
    op: Operation,
    /// From the path on classic routes; `None` means the body's `model`.
    deployment: Option<&'a str>,
    /// A `/openai/deployments/...` path, which requires `api-version`.
    classic: bool,
}

/// What a request asks for, read from its body.
struct Plan {
    prompt: Prompt,
    max_tokens: Option<u64>,
    n: u64,
    stream: bool,
    include_usage: bool,
    /// `service_tier` as requested.
    service_tier: Option<String>,
}

/// Handles every request under `/openai/`.
pub(crate) async fn openai(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    shared.count_request();
    let (parts, body) = request.into_parts();
    let kill = parts.extensions.get::<ConnectionKill>().cloned();
    let outcome = match to_bytes(body, MAX_BODY).await {
        Ok(body) => {
            let outcome = handle(&shared, &parts, &body).await;
            (outcome, body)
        }
        Err(_) => {
            let reply = Reply::new(&shared, None);
            let response = reply.error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "BadRequest",
                "The request body could not be read or is too large.",
            );
            (Outcome::Respond(response), Bytes::new())
        }
    };
    let (outcome, body) = outcome;
    let Parts {
        method,
        uri,
        headers,
        ..
    } = parts;
    match outcome {
        Outcome::Respond(response) => {
            shared.record(method, uri, headers, body, response.status().as_u16());
            response
        }
        Outcome::Drop => {
            shared.record(method, uri, headers, body, 0);
            shared.count_drop();
            match kill {
                Some(kill) => {
                    kill.trigger();
                    std::future::pending().await
                }
                // Not served by `spawn` (no handle on the connection): break the body instead.
                None => Response::new(streaming::truncated_body(b"")),
            }
        }
        Outcome::Hang => {
            shared.record(method, uri, headers, body, 0);
            std::future::pending().await
        }
    }
}

/// Answers anything outside `/openai/*` and `/sim/*`.
pub(crate) async fn not_found(State(shared): State<Arc<Shared>>) -> Response {
    Reply::new(&shared, None).resource_not_found()
}

async fn handle(shared: &Shared, parts: &Parts, body: &Bytes) -> Outcome {
    let route = (parts.method == Method::POST)
        .then(|| parse_route(parts.uri.path()))
        .flatten();
    let Some(route) = route else {
        return Outcome::Respond(Reply::new(shared, None).resource_not_found());
    };
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    let name = route.deployment.or_else(|| {
        parsed
            .as_ref()
            .and_then(|b| b.get("model"))
            .and_then(Value::as_str)
    });
    let deployment = name.and_then(|n| shared.deployments.get(n));
    let mut reply = Reply::new(shared, deployment);
    let api_version = query_param(parts.uri.query(), "api-version");
    let version_label = api_version.unwrap_or("v1");

    let mut abort_after = None;
    match shared.faults.pick(name) {
        None => {}
        Some(FaultKind::Status {
            status,
            retry_after_ms,
        }) => {
            tracing::debug!(status, "fault: status");
            let response = reply.fault_status(status, retry_after_ms, route.op, version_label);
            return Outcome::Respond(response);
        }
        Some(FaultKind::Drop) => return Outcome::Drop,
        Some(FaultKind::Hang) => return Outcome::Hang,
        Some(FaultKind::DelayFirstByte { delay_ms }) => {
            tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        }
        Some(FaultKind::AbortStream { after_chunks }) => abort_after = Some(after_chunks),
    }

    if route.classic && api_version.is_none() {
        return Outcome::Respond(reply.resource_not_found());
    }
    if !authorized(&parts.headers, &shared.api_keys) {
        return Outcome::Respond(reply.unauthorized());
    }
    let Some(request) = parsed.as_ref().filter(|v| v.is_object()) else {
        return Outcome::Respond(reply.bad_request(
            "We could not parse the JSON body of your request. The API expects a JSON object in \
             the request body.",
        ));
    };
    if name.is_none() {
        return Outcome::Respond(reply.bad_request("Missing required parameter: 'model'."));
    }
    let Some(deployment) = deployment else {
        return Outcome::Respond(reply.deployment_not_found());
    };
    let wanted = match route.op {
        Operation::Embeddings => DeploymentKind::Embeddings,
        _ => DeploymentKind::Chat,
    };
    if deployment.config.kind != wanted {
        let response = reply.operation_not_supported(route.op, &deployment.config.model);
        return Outcome::Respond(response);
    }
    // Flex capacity is out: a Flex request gets a 429, as Azure answers it without falling back.
    if shared.variants.flex_429
        && request.get("service_tier").and_then(Value::as_str) == Some("flex")
    {
        let response = reply.fault_status(429, Some(1_000), route.op, version_label);
        return Outcome::Respond(response);
    }
    let plan = match plan(route.op, request, shared.variants.approximate_tokens) {
        Ok(plan) => plan,
        Err(message) => return Outcome::Respond(reply.bad_request(&message)),
    };

    let estimate = match route.op {
        Operation::Embeddings => plan.prompt.tokens,
        _ => plan.prompt.tokens.saturating_add(
            plan.max_tokens
                .unwrap_or(DEFAULT_ESTIMATE_COMPLETION)
                .saturating_mul(plan.n),
        ),
    };
    let admission = lock(&deployment.limits).admit(Instant::now(), estimate);
    match admission {
        Admission::Admitted(snapshot) => reply.set_snapshot(snapshot),
        Admission::Rejected(rejection) => {
            tracing::debug!(deployment = %deployment.config.name, ?rejection.breach, "429");
            let response = reply.rate_limited(route.op, version_label, &rejection);
            return Outcome::Respond(response);
        }
    }
    if plan.prompt.flagged {
        return Outcome::Respond(reply.content_filtered());
    }

    let response = match route.op {
        Operation::Chat => chat(shared, deployment, &reply, &plan, abort_after),
        Operation::Completions => completions(shared, deployment, &reply, &plan, abort_after),
        Operation::Embeddings => embeddings(shared, deployment, &reply, request, &plan),
        Operation::Responses => responses(shared, deployment, &reply, request, &plan, abort_after),
    };
    let response = match (abort_after, plan.stream) {
        (Some(_), false) => truncate(response).await,
        _ => response,
    };
    Outcome::Respond(response)
}

fn parse_route(path: &str) -> Option<Route<'_>> {
    let rest = path.strip_prefix("/openai/")?;
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if let Some(rest) = rest.strip_prefix("deployments/") {
        let (name, op) = rest.split_once('/')?;
        let op = match op {
            "chat/completions" => Operation::Chat,
            "completions" => Operation::Completions,
            "embeddings" => Operation::Embeddings,
            _ => return None,
        };
        return (!name.is_empty()).then_some(Route {
            op,
            deployment: Some(name),
            classic: true,
        });
    }
    let op = match rest {
        "v1/chat/completions" => Operation::Chat,
        "v1/completions" => Operation::Completions,
        "v1/embeddings" => Operation::Embeddings,
        "v1/responses" | "responses" => Operation::Responses,
        _ => return None,
    };
    Some(Route {
        op,
        deployment: None,
        classic: false,
    })
}

fn query_param<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (key == name && !value.is_empty()).then_some(value)
    })
}

fn authorized(headers: &HeaderMap, keys: &[String]) -> bool {
    let api_key = headers.get("api-key").and_then(|v| v.to_str().ok());
    let bearer = || {
        let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
        let (scheme, token) = value.split_once(' ')?;
        scheme
            .eq_ignore_ascii_case("bearer")
            .then_some(token.trim())
    };
    api_key
        .or_else(bearer)
        .is_some_and(|key| keys.iter().any(|k| k == key))
}

fn plan(op: Operation, request: &Value, approximate: bool) -> Result<Plan, String> {
    let uint = |key: &str| request.get(key).and_then(Value::as_u64);
    let stream = request.get("stream").and_then(Value::as_bool) == Some(true);
    let include_usage = request
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        == Some(true);
    let n = uint("n").unwrap_or(1).clamp(1, 128);
    let service_tier = request
        .get("service_tier")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let required = |key: &str| format!("'{key}' is a required property");
    let plan = match op {
        Operation::Chat => {
            let messages = request.get("messages").filter(|m| m.is_array());
            let messages = messages.ok_or_else(|| required("messages"))?;
            Plan {
                prompt: tokens::chat_prompt(messages, approximate),
                max_tokens: uint("max_completion_tokens").or_else(|| uint("max_tokens")),
                n,
                stream,
                include_usage,
                service_tier: service_tier.clone(),
            }
        }
        Operation::Completions => {
            let prompt = request.get("prompt").ok_or_else(|| required("prompt"))?;
            Plan {
                prompt: tokens::text_prompt(prompt, approximate)
                    .ok_or("'prompt' must be a string or array")?,
                max_tokens: uint("max_tokens"),
                n,
                stream,
                include_usage,
                service_tier: service_tier.clone(),
            }
        }
        Operation::Embeddings => {
            let input = request.get("input").ok_or_else(|| required("input"))?;
            Plan {
                prompt: tokens::text_prompt(input, approximate)
                    .ok_or("'input' must be a string or array")?,
                max_tokens: None,
                n: 1,
                stream: false,
                include_usage: false,
                service_tier: None,
            }
        }
        Operation::Responses => {
            let input = request.get("input").ok_or_else(|| required("input"))?;
            let mut prompt = match input {
                Value::Array(_) => tokens::chat_prompt(input, approximate),
                _ => tokens::text_prompt(input, approximate)
                    .ok_or("'input' must be a string or array")?,
            };
            if let Some(instructions) = request.get("instructions").and_then(Value::as_str) {
                prompt.add_extra(instructions);
            }
            Plan {
                prompt,
                max_tokens: uint("max_output_tokens"),
                n: 1,
                stream,
                include_usage: false,
                service_tier: service_tier.clone(),
            }
        }
    };
    Ok(plan)
}

/// The tier an answer says served it: the one asked for, `default` for `auto` or none, and
/// `default` for `priority` when the region serves priority at standard.
fn served_tier<'a>(shared: &Shared, plan: &'a Plan) -> &'a str {
    match plan.service_tier.as_deref() {
        None | Some("auto") => "default",
        Some("priority") if shared.variants.priority_as_default => "default",
        Some(tier) => tier,
    }
}

fn generate(shared: &Shared, plan: &Plan, max_tokens: Option<u64>) -> Vec<Generated> {
    (0..plan.n)
        .map(|i| tokens::generate(shared.seed, plan.prompt.hash, i, max_tokens))
        .collect()
}

/// What a call cost beyond its prompt and its visible output: cached prompt tokens, and the
/// reasoning tokens a reasoning model spent (part of the completion, never shown).
#[derive(Clone, Copy)]
struct Details {
    cached: u64,
    reasoning: u64,
}

impl Details {
    /// A reasoning deployment thinks as many tokens as it writes; a long prompt seen before is
    /// cached when the region caches prompts.
    fn of(shared: &Shared, deployment: &Deployment, plan: &Plan, visible: u64) -> Self {
        Self {
            cached: shared.cached_prompt_tokens(plan.prompt.hash, plan.prompt.tokens),
            reasoning: if deployment.config.reasoning {
                visible
            } else {
                0
            },
        }
    }
}

fn usage(prompt: u64, visible: u64, details: Details) -> Value {
    let completion = visible + details.reasoning;
    json!({
        "completion_tokens": completion,
        "completion_tokens_details": {"accepted_prediction_tokens": 0, "audio_tokens": 0,
            "reasoning_tokens": details.reasoning, "rejected_prediction_tokens": 0},
        "prompt_tokens": prompt,
        "prompt_tokens_details": {"audio_tokens": 0, "cached_tokens": details.cached},
        "total_tokens": prompt + completion,
    })
}

fn chat(
    shared: &Shared,
    deployment: &Deployment,
    reply: &Reply<'_>,
    plan: &Plan,
    abort_after: Option<usize>,
) -> Response {
    let choices = generate(shared, plan, plan.max_tokens);
    let visible: u64 = choices.iter().map(Generated::tokens).sum();
    let id = random_id("chatcmpl-");
    let created = unix_now();
    let details = Details::of(shared, deployment, plan, visible);
    let usage = usage(plan.prompt.tokens, visible, details);
    if plan.stream {
        let meta = StreamMeta {
            id: &id,
            created,
            model: &deployment.config.model,
            system_fingerprint: &deployment.system_fingerprint,
            include_usage: plan.include_usage && !shared.variants.ignore_include_usage,
            usage,
            service_tier: served_tier(shared, plan),
            spaced: shared.variants.spaced_json,
            done: shared.variants.done_ending,
        };
        let frames = streaming::chat_frames(&meta, &choices);
        let body = streaming::body(frames, shared.token_delay, abort_after);
        return reply.stream(body);
    }
    let filter = completion_filter_results();
    let choices: Vec<Value> = choices
        .iter()
        .enumerate()
        .map(|(index, choice)| {
            json!({
                "content_filter_results": filter,
                "finish_reason": choice.finish_reason,
                "index": index,
                "logprobs": null,
                "message": {"annotations": [], "content": choice.text(), "refusal": null,
                    "role": "assistant"},
            })
        })
        .collect();
    reply.json(
        StatusCode::OK,
        &json!({
            "choices": choices,
            "created": created,
            "id": id,
            "model": deployment.config.model,
            "object": "chat.completion",
            "prompt_filter_results": prompt_filter_results(),
            "service_tier": served_tier(shared, plan),
            "system_fingerprint": deployment.system_fingerprint,
            "usage": usage,
        }),
    )
}

fn completions(
    shared: &Shared,
    deployment: &Deployment,
    reply: &Reply<'_>,
    plan: &Plan,
    abort_after: Option<usize>,
) -> Response {
    // Legacy completions stop at 16 tokens unless told otherwise.
    let max = Some(plan.max_tokens.unwrap_or(DEFAULT_ESTIMATE_COMPLETION));
    let choices = generate(shared, plan, max);
    let completion: u64 = choices.iter().map(Generated::tokens).sum();
    let id = random_id("cmpl-");
    let created = unix_now();
    let usage = json!({
        "completion_tokens": completion,
        "prompt_tokens": plan.prompt.tokens,
        "total_tokens": plan.prompt.tokens + completion,
    });
    if plan.stream {
        let meta = StreamMeta {
            id: &id,
            created,
            model: &deployment.config.model,
            system_fingerprint: &deployment.system_fingerprint,
            include_usage: plan.include_usage && !shared.variants.ignore_include_usage,
            usage,
            service_tier: served_tier(shared, plan),
            spaced: shared.variants.spaced_json,
            done: shared.variants.done_ending,
        };
        let frames = streaming::completion_frames(&meta, &choices);
        let body = streaming::body(frames, shared.token_delay, abort_after);
        return reply.stream(body);
    }
    let filter = completion_filter_results();
    let choices: Vec<Value> = choices
        .iter()
        .enumerate()
        .map(|(index, choice)| {
            json!({
                "content_filter_results": filter,
                "finish_reason": choice.finish_reason,
                "index": index,
                "logprobs": null,
                "text": choice.text(),
            })
        })
        .collect();
    reply.json(
        StatusCode::OK,
        &json!({
            "choices": choices,
            "created": created,
            "id": id,
            "model": deployment.config.model,
            "object": "text_completion",
            "prompt_filter_results": prompt_filter_results(),
            "usage": usage,
        }),
    )
}

/// An embeddings answer, serialised directly (vectors are large).
#[derive(Serialize)]
struct EmbeddingsBody<'a> {
    object: &'static str,
    data: Vec<EmbeddingItem>,
    model: &'a str,
    usage: EmbeddingsUsage,
}

#[derive(Serialize)]
struct EmbeddingItem {
    object: &'static str,
    index: usize,
    embedding: EmbeddingValue,
}

#[derive(Serialize)]
#[serde(untagged)]
enum EmbeddingValue {
    Floats(Vec<f32>),
    Base64(String),
}

#[derive(Serialize)]
struct EmbeddingsUsage {
    prompt_tokens: u64,
    total_tokens: u64,
}

fn embeddings(
    shared: &Shared,
    deployment: &Deployment,
    reply: &Reply<'_>,
    request: &Value,
    plan: &Plan,
) -> Response {
    let dimensions = request
        .get("dimensions")
        .and_then(Value::as_u64)
        .and_then(|d| usize::try_from(d).ok())
        .filter(|d| (1..=deployment.config.dimensions).contains(d))
        .unwrap_or(deployment.config.dimensions);
    let base64 = request.get("encoding_format").and_then(Value::as_str) == Some("base64");
    let inputs = tokens::inputs(request.get("input").unwrap_or(&Value::Null));
    let data = inputs
        .iter()
        .enumerate()
        .map(|(index, input)| {
            let vector = tokens::embedding(shared.seed, input, dimensions);
            EmbeddingItem {
                object: "embedding",
                index,
                embedding: if base64 {
                    EmbeddingValue::Base64(base64_f32(&vector))
                } else {
                    EmbeddingValue::Floats(vector)
                },
            }
        })
        .collect();
    let body = EmbeddingsBody {
        object: "list",
        data,
        model: &deployment.config.model,
        usage: EmbeddingsUsage {
            prompt_tokens: plan.prompt.tokens,
            total_tokens: plan.prompt.tokens,
        },
    };
    let bytes = serde_json::to_vec(&body).unwrap_or_default();
    reply.json_bytes(StatusCode::OK, bytes)
}

fn responses(
    shared: &Shared,
    deployment: &Deployment,
    reply: &Reply<'_>,
    request: &Value,
    plan: &Plan,
    abort_after: Option<usize>,
) -> Response {
    let choice = tokens::generate(shared.seed, plan.prompt.hash, 0, plan.max_tokens);
    let details = Details::of(shared, deployment, plan, choice.tokens());
    let output = choice.tokens() + details.reasoning;
    let complete = choice.finish_reason == "stop";
    let get = |key: &str| request.get(key).cloned().unwrap_or(Value::Null);
    let response = json!({
        "id": random_id("resp_"),
        "object": "response",
        "created_at": unix_now(),
        "status": if complete { "completed" } else { "incomplete" },
        "error": null,
        "incomplete_details": if complete { Value::Null } else { json!({"reason": "max_output_tokens"}) },
        "instructions": get("instructions"),
        "max_output_tokens": get("max_output_tokens"),
        "model": deployment.config.model,
        "output": [{
            "type": "message",
            "id": random_id("msg_"),
            "status": if complete { "completed" } else { "incomplete" },
            "role": "assistant",
            "content": [{"type": "output_text", "text": choice.text(), "annotations": []}],
        }],
        "parallel_tool_calls": true,
        "previous_response_id": get("previous_response_id"),
        "service_tier": served_tier(shared, plan),
        "temperature": 1.0,
        "tool_choice": "auto",
        "tools": [],
        "top_p": 1.0,
        "usage": {
            "input_tokens": plan.prompt.tokens,
            "input_tokens_details": {"cached_tokens": details.cached},
            "output_tokens": output,
            "output_tokens_details": {"reasoning_tokens": details.reasoning},
            "total_tokens": plan.prompt.tokens + output,
        },
        "metadata": {},
    });
    if plan.stream {
        let frames =
            streaming::responses_frames(&response, &choice.pieces, shared.variants.spaced_json);
        return reply.stream(streaming::body(frames, shared.token_delay, abort_after));
    }
    reply.json(StatusCode::OK, &response)
}

/// Cuts a complete JSON answer in half and breaks the connection after it (`abort_stream` on a
/// non-streaming request).
async fn truncate(response: Response) -> Response {
    let (parts, body) = response.into_parts();
    let full = to_bytes(body, usize::MAX).await.unwrap_or_default();
    Response::from_parts(parts, streaming::truncated_body(&full))
}

/// Standard base64 of the little-endian bytes of `values` (embeddings `encoding_format: base64`).
fn base64_f32(values: &[f32]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let r = parse_route("/openai/deployments/gpt-4o/chat/completions").unwrap();
        assert_eq!(
            (r.op, r.deployment, r.classic),
            (Operation::Chat, Some("gpt-4o"), true)
        );
        let r = parse_route("/openai/v1/embeddings").unwrap();
        assert_eq!(
            (r.op, r.deployment, r.classic),
            (Operation::Embeddings, None, false)
        );
        assert_eq!(
            parse_route("/openai/responses").unwrap().op,
            Operation::Responses
        );
        assert!(parse_route("/openai/deployments//chat/completions").is_none());
        assert!(parse_route("/openai/deployments/x/images/generations").is_none());
        assert!(parse_route("/other").is_none());
    }

    #[test]
    fn query() {
        assert_eq!(
            query_param(Some("a=1&api-version=2024-10-21"), "api-version"),
            Some("2024-10-21")
        );
        assert_eq!(query_param(Some("api-version="), "api-version"), None);
        assert_eq!(query_param(None, "api-version"), None);
    }

    #[test]
    fn base64() {
        assert_eq!(base64_f32(&[]), "");
        // 1.0f32 = 00 00 80 3f
        assert_eq!(base64_f32(&[1.0]), "AACAPw==");
        assert_eq!(base64_f32(&[1.0, 1.0]), "AACAPwAAgD8=");
    }
}
