//! Bodies, headers, errors, streaming and recording of the `/openai/*` surface.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use reqwest::StatusCode;
use serde_json::{Value, json};
use simulator::DeploymentConfig;

fn assert_uuid(value: &str) {
    assert_eq!(value.len(), 36, "{value}");
    let groups: Vec<_> = value.split('-').map(str::len).collect();
    assert_eq!(groups, [8, 4, 4, 4, 12], "{value}");
}

#[tokio::test]
async fn chat_completion_body_headers_and_usage() {
    let s = start(config()).await;
    let body = json!({
        "messages": [
            {"role": "system", "content": "You are a terse assistant."},
            {"role": "user", "content": "Say something about gateways, please."},
        ],
        "max_tokens": 400,
    });
    let (status, headers, v) = s.chat(&body).await;
    assert_eq!(status, StatusCode::OK, "{v}");

    assert_eq!(header(&headers, "content-type"), "application/json");
    assert_eq!(header(&headers, "x-ms-region"), "Sweden Central");
    assert_eq!(header(&headers, "x-ms-deployment-name"), "gpt-4o");
    assert_uuid(header(&headers, "apim-request-id"));
    assert_uuid(header(&headers, "x-request-id"));
    assert_eq!(header_u64(&headers, "x-ratelimit-limit-tokens"), 1_000_000);
    assert_eq!(header_u64(&headers, "x-ratelimit-limit-requests"), 60_000);

    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "gpt-4o-2024-11-20");
    assert!(v["created"].as_u64().unwrap() > 1_700_000_000);
    assert!(v["system_fingerprint"].as_str().unwrap().starts_with("fp_"));
    assert_eq!(v["prompt_filter_results"][0]["prompt_index"], 0);
    assert_eq!(
        v["prompt_filter_results"][0]["content_filter_results"]["hate"],
        json!({"filtered": false, "severity": "safe"})
    );
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 1);
    assert_eq!(choices[0]["index"], 0);
    assert_eq!(choices[0]["finish_reason"], "stop");
    assert_eq!(choices[0]["message"]["role"], "assistant");
    let content = choices[0]["message"]["content"].as_str().unwrap();
    let words = content.split_whitespace().count();
    assert!((20..=60).contains(&words), "{words} words: {content}");

    let prompt = expected_prompt_tokens(&[
        ("system", "You are a terse assistant."),
        ("user", "Say something about gateways, please."),
    ]);
    assert_eq!(v["usage"]["prompt_tokens"], prompt);
    assert_eq!(v["usage"]["completion_tokens"], count_tokens(content));
    assert_eq!(v["usage"]["total_tokens"], prompt + count_tokens(content));
    assert_eq!(
        simulator::tokens::chat_prompt_tokens(&body["messages"]),
        prompt
    );

    // Same seed and prompt: same text.
    let (_, _, again) = s.chat(&body).await;
    assert_eq!(again["choices"][0]["message"]["content"], content);
    s.region.shutdown().await;
}

#[tokio::test]
async fn chat_max_tokens_n_and_v1_route() {
    let s = start(config()).await;
    let mut body = user("hello");
    body["max_completion_tokens"] = json!(5);
    body["n"] = json!(2);
    let (status, _, v) = s.chat(&body).await;
    assert_eq!(status, StatusCode::OK);
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 2);
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
        assert_eq!(c["finish_reason"], "length");
        assert_eq!(count_tokens(c["message"]["content"].as_str().unwrap()), 5);
    }
    assert_eq!(v["usage"]["completion_tokens"], 10);

    // v1: deployment in `model`, no api-version.
    let mut body = user("hello");
    body["model"] = json!("gpt-4o");
    let (status, headers, v) = s.call("/openai/v1/chat/completions", &body).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(header(&headers, "x-ms-deployment-name"), "gpt-4o");
    s.region.shutdown().await;
}

#[tokio::test]
async fn legacy_completions() {
    let s = start(config()).await;
    let path = format!("/openai/deployments/gpt-4o/completions?api-version={API_VERSION}");
    let (status, _, v) = s
        .call(
            &path,
            &json!({"prompt": "Once upon a time", "max_tokens": 8}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert!(v["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(v["object"], "text_completion");
    let choice = &v["choices"][0];
    assert_eq!(choice["logprobs"], Value::Null);
    assert_eq!(choice["finish_reason"], "length");
    assert_eq!(count_tokens(choice["text"].as_str().unwrap()), 8);
    assert_eq!(
        v["usage"]["prompt_tokens"],
        count_tokens("Once upon a time")
    );
    assert_eq!(v["usage"]["completion_tokens"], 8);
    s.region.shutdown().await;
}

#[tokio::test]
async fn embeddings_string_and_array() {
    let s = start(config()).await;
    let path = format!("/openai/deployments/embed/embeddings?api-version={API_VERSION}");
    let (status, _, v) = s.call(&path, &json!({"input": "hello world"})).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["object"], "list");
    assert_eq!(v["model"], "text-embedding-3-small");
    assert_eq!(v["data"][0]["object"], "embedding");
    assert_eq!(v["data"][0]["index"], 0);
    let vector: Vec<f64> = serde_json::from_value(v["data"][0]["embedding"].clone()).unwrap();
    assert_eq!(vector.len(), 64);
    let norm: f64 = vector.iter().map(|x| x * x).sum();
    assert!((norm - 1.0).abs() < 1e-3, "{norm}");
    assert_eq!(v["usage"]["prompt_tokens"], count_tokens("hello world"));
    assert_eq!(v["usage"]["total_tokens"], count_tokens("hello world"));

    let (status, _, v) = s
        .call(
            "/openai/v1/embeddings",
            &json!({"model": "embed", "input": ["a", "hello world"]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let data = v["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    assert_eq!(data[1]["index"], 1);
    // Deterministic: the same input gives the same vector.
    let again: Vec<f64> = serde_json::from_value(data[1]["embedding"].clone()).unwrap();
    assert_eq!(again, vector);
    assert_eq!(
        v["usage"]["prompt_tokens"],
        count_tokens("a") + count_tokens("hello world")
    );
    s.region.shutdown().await;
}

#[tokio::test]
async fn responses_api() {
    let s = start(config()).await;
    for path in [
        "/openai/responses?api-version=2025-04-01-preview",
        "/openai/v1/responses",
    ] {
        let (status, _, v) = s
            .call(
                path,
                &json!({"model": "gpt-4o", "input": "Tell me a story"}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{v}");
        assert!(v["id"].as_str().unwrap().starts_with("resp_"));
        assert_eq!(v["object"], "response");
        assert_eq!(v["status"], "completed");
        let output = &v["output"][0];
        assert_eq!(output["type"], "message");
        assert_eq!(output["role"], "assistant");
        assert_eq!(output["content"][0]["type"], "output_text");
        let text = output["content"][0]["text"].as_str().unwrap();
        assert_eq!(v["usage"]["input_tokens"], count_tokens("Tell me a story"));
        assert_eq!(v["usage"]["output_tokens"], count_tokens(text));
        assert_eq!(
            v["usage"]["total_tokens"],
            count_tokens("Tell me a story") + count_tokens(text)
        );
    }
    s.region.shutdown().await;
}

#[tokio::test]
async fn auth_errors() {
    let s = start(config()).await;
    let url = format!("{}{}", s.url, chat_path("gpt-4o"));
    let body = serde_json::to_vec(&user("hi")).unwrap();
    for key in [Some("wrong"), None] {
        let mut request = s.client.post(&url).body(body.clone());
        if let Some(key) = key {
            request = request.header("api-key", key);
        }
        let (status, headers, v) = json(request.send().await.unwrap()).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(v["error"]["code"], "401");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .starts_with("Access denied")
        );
        assert_eq!(header(&headers, "x-ms-region"), "Sweden Central");
        assert_uuid(header(&headers, "apim-request-id"));
        // A known deployment: the limit headers are there too.
        header_u64(&headers, "x-ratelimit-remaining-tokens");
    }
    let response = s
        .client
        .post(&url)
        .bearer_auth(KEY)
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    s.region.shutdown().await;
}

#[tokio::test]
async fn not_found_and_bad_requests() {
    let s = start(config()).await;

    let (status, headers, v) = s.call(&chat_path("nope"), &user("hi")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(v["error"]["code"], "DeploymentNotFound");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("The API deployment for this resource does not exist.")
    );
    assert!(headers.get("x-ms-deployment-name").is_none());
    assert_eq!(header(&headers, "x-ms-region"), "Sweden Central");

    let (status, _, v) = s
        .call("/openai/deployments/gpt-4o/chat/completions", &user("hi"))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(
        v,
        json!({"error": {"code": "404", "message": "Resource not found"}})
    );

    let (status, _, v) = s
        .call(
            &format!("/openai/deployments/embed/chat/completions?api-version={API_VERSION}"),
            &user("hi"),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(v["error"]["code"], "OperationNotSupported");
    let (status, _, v) = s
        .call(
            &format!("/openai/deployments/gpt-4o/embeddings?api-version={API_VERSION}"),
            &json!({"input": "x"}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(v["error"]["code"], "OperationNotSupported");

    let response = s
        .client
        .post(format!("{}{}", s.url, chat_path("gpt-4o")))
        .header("api-key", KEY)
        .body("{not json")
        .send()
        .await
        .unwrap();
    let (status, _, v) = json(response).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(v["error"]["code"], "BadRequest");

    let (status, _, v) = s.chat(&json!({"max_tokens": 3})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(v["error"]["code"], "BadRequest");

    let (status, _, v) = s
        .call("/openai/v1/chat/completions", &user("no model"))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");

    let (status, _, v) = s
        .call(
            "/openai/deployments/gpt-4o/images/generations?api-version=1",
            &json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(v["error"]["code"], "404");
    s.region.shutdown().await;
}

#[tokio::test]
async fn content_filter_marker() {
    let s = start(config()).await;
    let (status, headers, v) = s.chat(&user("please [[content_filter]] this")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(v["error"]["code"], "content_filter");
    assert_eq!(v["error"]["param"], "prompt");
    assert_eq!(v["error"]["status"], 400);
    assert!(v["error"]["message"].as_str().unwrap().starts_with(
        "The response was filtered due to the prompt triggering Azure OpenAI's content management policy."
    ));
    assert_eq!(
        v["error"]["innererror"]["code"],
        "ResponsibleAIPolicyViolation"
    );
    assert_eq!(
        v["error"]["innererror"]["content_filter_result"]["hate"]["filtered"],
        true
    );
    header_u64(&headers, "x-ratelimit-remaining-tokens");
    s.region.shutdown().await;
}

#[tokio::test]
async fn requests_are_recorded() {
    let s = start(config()).await;
    let response = s
        .client
        .post(format!("{}{}", s.url, chat_path("gpt-4o")))
        .header("api-key", KEY)
        .header("X-Custom-Trace", "abc")
        .body(serde_json::to_vec(&user("record me")).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let (status, _, _) = s.chat(&user("[[content_filter]]")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    // Admin routes are not counted.
    s.get_json("/sim/stats").await;

    assert_eq!(s.sim.request_count(), 2);
    let recent = s.sim.recent_requests();
    assert_eq!(recent.len(), 2);
    let first = &recent[0];
    assert_eq!(first.method, "POST");
    assert_eq!(first.path, "/openai/deployments/gpt-4o/chat/completions");
    assert_eq!(first.query, format!("api-version={API_VERSION}"));
    assert_eq!(first.header("x-custom-trace"), Some("abc"));
    assert_eq!(first.header("api-key"), Some(KEY));
    assert_eq!(first.json().unwrap()["messages"][0]["content"], "record me");
    assert_eq!(first.status, 200);
    assert_eq!(recent[1].status, 400);

    // Only the last 256 are kept.
    for _ in 0..260 {
        s.chat(&json!({})).await;
    }
    assert_eq!(s.sim.recent_requests().len(), simulator::RECENT_REQUESTS);
    assert_eq!(s.sim.request_count(), 262);
    s.region.shutdown().await;
}

fn stream_body(include_usage: bool) -> Value {
    let mut body = user("stream please");
    body["stream"] = json!(true);
    if include_usage {
        body["stream_options"] = json!({"include_usage": true});
    }
    body
}

#[tokio::test]
async fn streaming_frame_order() {
    let s = start(config()).await;
    for include_usage in [false, true] {
        let response = s
            .post(&chat_path("gpt-4o"), &stream_body(include_usage))
            .await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            header(response.headers(), "content-type"),
            "text/event-stream"
        );
        assert!(response.headers().get("content-length").is_none());
        assert_eq!(header(response.headers(), "x-ms-region"), "Sweden Central");
        let (events, error) = read_sse(response).await;
        assert!(error.is_none());

        assert_eq!(events.last().unwrap(), "[DONE]");
        let frames: Vec<Value> = events[..events.len() - 1]
            .iter()
            .map(|e| serde_json::from_str(e).unwrap())
            .collect();
        // Annotation frame.
        let annotation = &frames[0];
        assert_eq!(annotation["id"], "");
        assert_eq!(annotation["model"], "");
        assert_eq!(annotation["object"], "");
        assert_eq!(annotation["created"], 0);
        assert_eq!(annotation["choices"], json!([]));
        assert_eq!(annotation["prompt_filter_results"][0]["prompt_index"], 0);
        // Role chunk.
        let role = &frames[1];
        assert_eq!(role["object"], "chat.completion.chunk");
        assert_eq!(role["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(role["choices"][0]["delta"]["content"], "");
        let id = role["id"].as_str().unwrap();
        assert!(id.starts_with("chatcmpl-"));

        let usage_frames = usize::from(include_usage);
        let finish_at = frames.len() - 1 - usage_frames;
        let tokens = &frames[2..finish_at];
        assert!(!tokens.is_empty());
        let mut text = String::new();
        for t in tokens {
            assert_eq!(t["id"], id);
            assert_eq!(t["model"], "gpt-4o-2024-11-20");
            assert_eq!(t["choices"][0]["finish_reason"], Value::Null);
            assert_eq!(
                t["choices"][0]["content_filter_results"]["hate"]["filtered"],
                false
            );
            assert_eq!(t.get("usage").is_some(), include_usage);
            text.push_str(t["choices"][0]["delta"]["content"].as_str().unwrap());
        }
        let finish = &frames[finish_at];
        assert_eq!(finish["choices"][0]["delta"], json!({}));
        assert_eq!(finish["choices"][0]["finish_reason"], "stop");

        if include_usage {
            let usage = &frames[frames.len() - 1];
            assert_eq!(usage["choices"], json!([]));
            assert_eq!(usage["usage"]["completion_tokens"], tokens.len());
            assert_eq!(usage["usage"]["completion_tokens"], count_tokens(&text));
            assert_eq!(
                usage["usage"]["prompt_tokens"],
                expected_prompt_tokens(&[("user", "stream please")])
            );
        } else {
            assert!(frames.iter().all(|f| f.get("usage").is_none()));
        }

        // The streamed text is the non-streamed text (same seed and prompt).
        let (_, _, whole) = s.chat(&user("stream please")).await;
        assert_eq!(whole["choices"][0]["message"]["content"], text);
    }

    // Legacy completions stream too.
    let path = format!("/openai/deployments/gpt-4o/completions?api-version={API_VERSION}");
    let response = s
        .post(
            &path,
            &json!({"prompt": "hi", "stream": true, "max_tokens": 4}),
        )
        .await;
    let (events, error) = read_sse(response).await;
    assert!(error.is_none());
    assert_eq!(events.len(), 1 + 4 + 1 + 1);
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunk: Value = serde_json::from_str(&events[1]).unwrap();
    assert_eq!(chunk["object"], "text_completion");
    let finish: Value = serde_json::from_str(&events[5]).unwrap();
    assert_eq!(finish["choices"][0]["finish_reason"], "length");
    s.region.shutdown().await;
}

#[tokio::test]
async fn streaming_is_incremental() {
    // A huge delay: if the body were built before sending, nothing would arrive for minutes.
    let s = start(config().token_delay(Duration::from_secs(600))).await;
    let response = s.post(&chat_path("gpt-4o"), &stream_body(false)).await;
    assert_eq!(response.status(), StatusCode::OK);
    let mut stream = response.bytes_stream();
    let mut buffer = Vec::new();
    let mut events = Vec::new();
    while events.len() < 2 {
        let chunk = stream.next().await.expect("stream ended early").unwrap();
        buffer.extend_from_slice(&chunk);
        take_events(&mut buffer, &mut events);
    }
    let role: Value = serde_json::from_str(&events[1]).unwrap();
    assert_eq!(role["choices"][0]["delta"]["role"], "assistant");
    // The stream is still open: the next token is 600 s away.
    let next = tokio::time::timeout(Duration::from_millis(200), stream.next()).await;
    assert!(
        next.is_err(),
        "stream should still be waiting for the next token"
    );
    drop(stream);
    s.region.shutdown().await;
}

#[tokio::test]
async fn several_keys_and_bearer() {
    let config = simulator::RegionConfig::new("East US", "k1")
        .api_key("k2")
        .deployment(DeploymentConfig::chat("c", 10_000));
    let s = start(config).await;
    for key in ["k1", "k2"] {
        let response = s
            .client
            .post(format!("{}{}", s.url, chat_path("c")))
            .header("authorization", format!("Bearer {key}"))
            .body(serde_json::to_vec(&user("x")).unwrap())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(header(response.headers(), "x-ms-region"), "East US");
    }
    let Sim {
        region,
        client,
        url,
        ..
    } = s;
    region.shutdown().await;
    // After shutdown, nothing listens.
    let after = client.post(format!("{url}{}", chat_path("c"))).send().await;
    assert!(after.is_err());
}
