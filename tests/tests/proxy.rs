//! The proxy path: forwarding, deployment-name mapping, credential swapping, streaming, errors.
//! Real simulated regions and a real gateway on 127.0.0.1, real HTTP.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use futures_util::StreamExt;
use gateway_e2e::*;
use serde_json::{Value, json};

async fn one_region() -> (simulator::RunningRegion, Gateway) {
    sweden(100_000, "").await
}

/// [`one_region`] streaming a token every 100 ms: 40 tokens take about 4 s.
async fn slow_sweden() -> (simulator::RunningRegion, Gateway) {
    sweden_with(100_000, "", |c| c.token_delay(Duration::from_millis(100))).await
}

#[tokio::test]
async fn chat_is_forwarded_with_mapped_name_and_swapped_credential() {
    let (sim, gw) = one_region().await;
    let res = client()
        .post(gw.chat_url("gpt-4o"))
        .header("api-key", CLIENT_KEY)
        .header("x-ms-client-request-id", "client-req-42")
        .header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .header("cookie", "session=secret")
        .json(&chat("Hello there"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["x-served-by"], "swc (Sweden Central)");
    assert_eq!(res.headers()["x-gateway-attempts"], "1");
    assert_eq!(res.headers()["x-ms-region"], "Sweden Central");
    assert_eq!(res.headers()["x-request-id"], "client-req-42");
    assert!(res.headers().contains_key("x-ratelimit-remaining-tokens"));
    assert!(res.headers().contains_key("apim-request-id"));
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["object"], "chat.completion");
    assert!(body["usage"]["prompt_tokens"].as_u64().unwrap() > 0);

    let seen = sim.handle().recent_requests();
    assert_eq!(seen.len(), 1);
    let up = &seen[0];
    assert_eq!(up.path, "/openai/deployments/gpt4o-swc/chat/completions");
    assert_eq!(up.query, "api-version=2024-10-21");
    let header = |name: &str| {
        up.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    // The backend's credential replaced the client's, which never leaves the gateway.
    assert_eq!(
        header("api-key"),
        Some(backend_key("Sweden Central").as_str())
    );
    assert!(up.headers.iter().all(|(_, v)| v != CLIENT_KEY));
    assert_eq!(
        header("traceparent"),
        Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    );
    assert_eq!(header("x-ms-client-request-id"), Some("client-req-42"));
    assert_eq!(header("cookie"), None);
    let sent: Value = serde_json::from_slice(&up.body).unwrap();
    assert_eq!(sent, chat("Hello there"));
    gw.stop().await;
}

#[tokio::test]
async fn bearer_client_credential_is_accepted_and_not_forwarded() {
    let (sim, gw) = one_region().await;
    let res = client()
        .post(gw.chat_url("gpt-4o"))
        .bearer_auth(CLIENT_KEY)
        .json(&chat("hi"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let up = &sim.handle().recent_requests()[0];
    assert!(up.headers.iter().all(|(k, _)| k != "authorization"));
    gw.stop().await;
}

#[tokio::test]
async fn v1_and_responses_map_the_model_in_the_body() {
    let (sim, gw) = one_region().await;
    let res = client()
        .post(gw.url("/openai/v1/embeddings"))
        .header("api-key", CLIENT_KEY)
        .json(&json!({"model": "text-embedding-3-small", "input": "The quick brown fox"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["object"], "list");
    assert!(!body["data"][0]["embedding"].as_array().unwrap().is_empty());

    let res = client()
        .post(gw.url("/openai/responses?api-version=2025-04-01-preview"))
        .header("api-key", CLIENT_KEY)
        .json(&json!({"model": "gpt-4o", "input": "Say hi", "max_output_tokens": 16}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["object"], "response");

    let seen = sim.handle().recent_requests();
    let models: Vec<Value> = seen
        .iter()
        .map(|r| serde_json::from_slice::<Value>(&r.body).unwrap()["model"].clone())
        .collect();
    assert_eq!(models, [json!("embedding-swc"), json!("gpt4o-swc")]);
    assert_eq!(seen[0].path, "/openai/v1/embeddings");
    assert_eq!(seen[1].path, "/openai/responses");
    gw.stop().await;
}

#[tokio::test]
async fn classic_embeddings_are_forwarded() {
    let (_sim, gw) = one_region().await;
    let res = client()
        .post(
            gw.url("/openai/deployments/text-embedding-3-small/embeddings?api-version=2024-10-21"),
        )
        .header("api-key", CLIENT_KEY)
        .json(&json!({"input": ["a", "b"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["data"].as_array().unwrap().len(), 2);
    gw.stop().await;
}

#[tokio::test]
async fn stream_reaches_the_client_before_the_upstream_finishes() {
    // 40 tokens at 100 ms each: the upstream needs about 4 s to finish.
    let (_sim, gw) = slow_sweden().await;

    let res = client()
        .post(gw.chat_url("gpt-4o"))
        .header("api-key", CLIENT_KEY)
        .json(&json!({
            "messages": [{"role": "user", "content": "Tell me a story"}],
            "max_tokens": 40,
            "stream": true,
            "stream_options": {"include_usage": true}
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert!(
        res.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let mut body = res.bytes_stream();
    let mut text = String::new();
    // Read until the first content chunk has arrived.
    while !text.contains("chat.completion.chunk") {
        let chunk = body.next().await.expect("stream ended early").unwrap();
        text.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    // Proof of streaming without timing: the upstream has not finished (no [DONE] yet anywhere),
    // yet the client already holds a chunk.
    assert!(!text.contains("[DONE]"));
    while let Some(chunk) = body.next().await {
        text.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
    }
    gw.stop().await;

    // And the other way round: kill the region after the first chunk. A gateway that buffered the
    // answer would still deliver it whole; a streaming one cannot.
    let (sim, gw) = slow_sweden().await;
    let res = gw
        .chat("gpt-4o", &json!({"messages": [{"role": "user", "content": "story"}], "max_tokens": 40, "stream": true}))
        .await;
    let mut body = res.bytes_stream();
    let mut cut = String::new();
    while !cut.contains("chat.completion.chunk") {
        cut.push_str(std::str::from_utf8(&body.next().await.unwrap().unwrap()).unwrap());
    }
    sim.shutdown().await;
    while let Some(Ok(chunk)) = body.next().await {
        cut.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    assert!(!cut.contains("[DONE]"), "{cut}");
    assert!(cut.contains("event: error"), "{cut}");
    let frames: Vec<&str> = text
        .split("\n\n")
        .filter(|f| !f.trim().is_empty())
        .collect();
    assert_eq!(*frames.last().unwrap(), "data: [DONE]");
    let usage: Value =
        serde_json::from_str(frames[frames.len() - 2].strip_prefix("data: ").unwrap()).unwrap();
    // Every token chunk went through: one frame per completion token.
    let content_frames = frames
        .iter()
        .filter_map(|f| serde_json::from_str::<Value>(f.strip_prefix("data: ")?).ok())
        .filter(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .is_some_and(|c| !c.is_empty())
        })
        .count();
    assert!(content_frames > 5);
    assert_eq!(usage["usage"]["completion_tokens"], content_frames);
    gw.stop().await;
}

#[tokio::test]
async fn gateway_errors_are_azure_shaped() {
    let (sim, gw) = one_region().await;
    let send = |url: String, key: Option<&'static str>, body: String| {
        let mut req = client()
            .post(url)
            .header("content-type", "application/json")
            .body(body);
        if let Some(k) = key {
            req = req.header("api-key", k);
        }
        req.send()
    };

    let res = send(gw.chat_url("gpt-4o"), None, chat("x").to_string())
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    assert_eq!(res.headers()["x-served-by"], "gateway");
    assert_eq!(res.headers()["x-gateway-attempts"], "0");
    assert!(res.headers().contains_key("x-request-id"));
    let (code, msg) = azure_error(res).await;
    assert_eq!(code, "401");
    assert!(msg.contains("Access denied"), "{msg}");

    let res = send(
        gw.chat_url("gpt-4o"),
        Some("wrong-key"),
        chat("x").to_string(),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 401);

    let res = send(gw.chat_url("gpt-4o"), Some(CLIENT_KEY), "{not json".into())
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    let (code, msg) = azure_error(res).await;
    assert_eq!(code, "BadRequest");
    assert!(msg.contains("not valid JSON"), "{msg}");

    // The policy caps bodies at 64 KiB.
    let huge = json!({"messages": [{"role": "user", "content": "x".repeat(70_000)}]});
    let res = send(gw.chat_url("gpt-4o"), Some(CLIENT_KEY), huge.to_string())
        .await
        .unwrap();
    assert_eq!(res.status(), 413);
    assert_eq!(azure_error(res).await.0, "RequestEntityTooLarge");

    let res = send(
        gw.chat_url("o3-unknown"),
        Some(CLIENT_KEY),
        chat("x").to_string(),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 404);
    let (code, msg) = azure_error(res).await;
    assert_eq!(code, "DeploymentNotFound");
    assert!(msg.contains("o3-unknown"), "{msg}");

    let res = client().get(gw.url("/not-openai")).send().await.unwrap();
    assert_eq!(res.status(), 404);
    assert_eq!(azure_error(res).await.0, "404");

    // None of the rejected requests reached the region.
    assert_eq!(sim.handle().request_count(), 0);
    gw.stop().await;
}

#[tokio::test]
async fn health_and_readiness() {
    let (_sim, gw) = one_region().await;
    let res = client().get(gw.url("/healthz")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let res = client().get(gw.url("/readyz")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    gw.stop().await;
}

#[tokio::test]
async fn upstream_errors_that_are_not_failover_triggers_pass_through() {
    let (sim, gw) = one_region().await;
    // Missing api-version: Azure answers 404 "Resource not found" (not DeploymentNotFound).
    let res = client()
        .post(gw.url("/openai/deployments/gpt-4o/chat/completions"))
        .header("api-key", CLIENT_KEY)
        .json(&chat("x"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 404);
    assert_eq!(res.headers()["x-served-by"], "swc (Sweden Central)");
    assert_eq!(sim.handle().request_count(), 1);
    gw.stop().await;
}

#[tokio::test]
async fn header_rules_from_the_policy_apply_both_ways() {
    let sim = region("Sweden Central", &[("gpt4o-swc", 100_000)]).await;
    let b = backend_toml(
        "swc",
        &sim,
        "Sweden Central",
        1,
        1,
        &[("gpt-4o", "gpt4o-swc")],
    );
    let extra = r#"
[headers]
forward = ["x-tenant-*", "content-type"]
return = ["x-ms-region"]

[[headers.request]]
name = "x-gateway-name"
value = "edge-1"

[[headers.response]]
name = "cache-control"
value = "no-store"
action = "skip"
"#;
    let gw = gateway(&policy(&["gpt-4o"], &[b], extra), &["Sweden Central"]).await;
    let res = client()
        .post(gw.chat_url("gpt-4o"))
        .header("api-key", CLIENT_KEY)
        .header("x-tenant-id", "contoso")
        .header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .json(&chat("hi"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["x-ms-region"], "Sweden Central");
    assert_eq!(res.headers()["cache-control"], "no-store");
    assert!(
        !res.headers().contains_key("apim-request-id"),
        "not in the return list"
    );
    // The gateway's own headers always come back.
    assert!(res.headers().contains_key("x-served-by"));
    assert!(res.headers().contains_key("x-request-id"));

    let up = &sim.handle().recent_requests()[0];
    let names: Vec<&str> = up.headers.iter().map(|(k, _)| k.as_str()).collect();
    assert!(names.contains(&"x-tenant-id"));
    assert!(names.contains(&"x-gateway-name"));
    assert!(
        !names.contains(&"traceparent"),
        "not in the forward list: {names:?}"
    );
    gw.stop().await;
}

/// Sends `method path` with the client key and `body` on a raw connection, so the path reaches the
/// gateway exactly as written (HTTP clients normalise paths), and returns the whole answer.
async fn raw(gw: &Gateway, method: &str, path: &str, body: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let req = format!(
        "{method} {path} HTTP/1.1\r\nhost: gateway\r\napi-key: {CLIENT_KEY}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut conn = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    conn.write_all(req.as_bytes()).await.unwrap();
    let mut answer = String::new();
    conn.read_to_string(&mut answer).await.unwrap();
    answer
}

const SPELLINGS: [&str; 4] = [
    "chat/completions",
    "chat/complet%69ons",
    "Chat/Completions",
    "CHAT/%63ompletions",
];

#[tokio::test]
async fn an_encoded_or_case_changed_operation_is_limited_like_the_canonical_one() {
    let (sim, gw) = sweden(100_000, "[consumers.limits]\ntokens_per_minute = 1000\n").await;
    // More than the consumer may ever use: refused before any backend is called, whatever the
    // spelling (an `other` path used to be forwarded unestimated).
    let too_big = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5000});
    for op in SPELLINGS {
        let path = format!("/openai/deployments/gpt-4o/{op}?api-version=2024-10-21");
        let answer = raw(&gw, "POST", &path, &too_big.to_string()).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{op}: {answer}");
        assert!(
            answer.contains("more than consumer 'tester' may use"),
            "{answer}"
        );
    }
    assert_eq!(sim.handle().request_count(), 0);
    // Within the limit, every spelling is served as a chat: estimated, limited and accounted.
    for op in SPELLINGS {
        let path = format!("/openai/deployments/gpt-4o/{op}?api-version=2024-10-21");
        let answer = raw(&gw, "POST", &path, &chat("hi").to_string()).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{op}: {answer}");
        assert!(
            answer.contains("x-ratelimit-limit-tokens: 1000"),
            "{answer}"
        );
        assert!(answer.contains("chat.completion"), "{answer}");
    }
    assert_eq!(sim.handle().request_count(), 4);
    gw.stop().await;
}

#[tokio::test]
async fn a_method_other_than_post_on_an_operation_is_405() {
    let (sim, gw) = one_region().await;
    for (method, op) in [("GET", "chat/completions"), ("PUT", "Embeddings")] {
        let path = format!("/openai/deployments/gpt-4o/{op}?api-version=2024-10-21");
        let answer = raw(&gw, method, &path, &chat("hi").to_string()).await;
        assert!(answer.starts_with("HTTP/1.1 405"), "{method}: {answer}");
        assert!(answer.contains("allow: POST"), "{answer}");
        assert!(answer.contains(r#""code":"MethodNotAllowed""#), "{answer}");
        assert!(answer.contains("x-request-id: "), "{answer}");
    }
    assert_eq!(sim.handle().request_count(), 0);
    gw.stop().await;
}

#[tokio::test]
async fn an_unknown_operation_without_a_deployment_is_refused_404() {
    let (sim, gw) = one_region().await;
    for path in [
        "/openai/v1/models",
        "/openai/v1/chat/completions%20",
        "/openai/files",
    ] {
        let answer = raw(&gw, "POST", path, &chat("hi").to_string()).await;
        assert!(answer.starts_with("HTTP/1.1 404"), "{path}: {answer}");
        assert!(answer.contains(r#""code":"404""#), "{answer}");
    }
    assert_eq!(sim.handle().request_count(), 0);
    gw.stop().await;
}

#[tokio::test]
async fn an_unknown_operation_of_a_deployment_is_forwarded_and_counted_as_a_request() {
    let (sim, gw) = sweden(100_000, "[consumers.limits]\nrequests_per_minute = 1\n").await;
    minute_room(Duration::from_secs(10)).await;
    // Forwarded as it came (the simulator knows no audio, and says so with its own 404).
    let answer = raw(
        &gw,
        "POST",
        "/openai/deployments/gpt-4o/audio/Speech?api-version=2024-10-21",
        r#"{"input":"hi","voice":"alloy"}"#,
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
    assert!(
        answer.contains("x-served-by: swc (Sweden Central)"),
        "{answer}"
    );
    assert_eq!(sim.handle().request_count(), 1);
    // It took the consumer's one request of the minute.
    let res = gw.chat("gpt-4o", &chat("hi")).await;
    assert_eq!(res.status(), 429);
    assert_eq!(res.headers()["x-gateway-limit"], "requests");
    assert_eq!(sim.handle().request_count(), 1);
    gw.stop().await;
}

#[tokio::test]
async fn answers_outside_the_proxy_carry_a_request_id_too() {
    let (_sim, gw) = one_region().await;
    let res = client()
        .get(gw.url("/no-such-path"))
        .header("x-request-id", "probe-1")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 404);
    assert_eq!(res.headers()["x-request-id"], "probe-1");
    let res = client().get(gw.url("/healthz")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["x-request-id"].len(), 36);
    // The proxy's own id is kept, not replaced.
    let res = client()
        .post(gw.chat_url("gpt-4o"))
        .header("api-key", CLIENT_KEY)
        .header("x-ms-client-request-id", "sdk-7")
        .json(&chat("hi"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.headers()["x-request-id"], "sdk-7");
    gw.stop().await;
}
