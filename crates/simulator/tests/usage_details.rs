//! Responses streams, and the usage details real backends report: cached prompt tokens and
//! reasoning tokens.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use futures_util::StreamExt;
use reqwest::StatusCode;
use serde_json::{Value, json};
use simulator::DeploymentConfig;

/// The named events of a Responses stream: `(event name, data)`.
async fn named_events(response: reqwest::Response) -> Vec<(String, Value)> {
    let mut text = String::new();
    let mut body = response.bytes_stream();
    while let Some(chunk) = body.next().await {
        text.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
    }
    assert!(text.ends_with("\n\n"), "{text:?}");
    text.split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| {
            let (name, data) = e.split_once('\n').unwrap();
            let name = name.strip_prefix("event: ").unwrap().to_owned();
            let data = data.strip_prefix("data: ").unwrap();
            (name, serde_json::from_str(data).unwrap())
        })
        .collect()
}

#[tokio::test]
async fn a_responses_stream_sends_deltas_and_ends_with_the_usage_in_response_completed() {
    let s = start(config()).await;
    let body = json!({"model": "gpt-4o", "input": "Tell me a story", "stream": true});
    let res = s.post("/openai/v1/responses", &body).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(header(res.headers(), "content-type"), "text/event-stream");
    let events = named_events(res).await;
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names[..2], ["response.created", "response.in_progress"]);
    assert_eq!(names.last(), Some(&"response.completed"));
    for (i, (name, data)) in events.iter().enumerate() {
        assert_eq!(data["type"], name.as_str());
        assert_eq!(data["sequence_number"], i);
    }
    assert_eq!(events[0].1["response"]["usage"], Value::Null);
    let text: String = events
        .iter()
        .filter(|(n, _)| n == "response.output_text.delta")
        .map(|(_, d)| d["delta"].as_str().unwrap())
        .collect();
    assert!(!text.is_empty());
    let done = events
        .iter()
        .find(|(n, _)| n == "response.output_text.done");
    assert_eq!(done.unwrap().1["text"], text.as_str());
    let response = &events.last().unwrap().1["response"];
    assert_eq!(response["status"], "completed");
    assert_eq!(response["output"][0]["content"][0]["text"], text.as_str());
    let usage = &response["usage"];
    assert_eq!(usage["input_tokens"], count_tokens("Tell me a story"));
    assert_eq!(usage["output_tokens"], count_tokens(&text));
    s.region.shutdown().await;
}

#[tokio::test]
async fn a_reasoning_deployment_reports_reasoning_tokens_it_never_shows() {
    let config = config().deployment(DeploymentConfig::chat("o4-mini", 1_000_000).reasoning(true));
    let s = start(config).await;
    let (status, _, v) = s
        .call(&chat_path("o4-mini"), &user("Think about gateways"))
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let text = v["choices"][0]["message"]["content"].as_str().unwrap();
    let visible = count_tokens(text);
    let usage = &v["usage"];
    assert_eq!(
        usage["completion_tokens_details"]["reasoning_tokens"],
        visible
    );
    assert_eq!(usage["completion_tokens"], 2 * visible);
    // Responses too.
    let body = json!({"model": "o4-mini", "input": "Think"});
    let (_, _, v) = s.call("/openai/v1/responses", &body).await;
    let usage = &v["usage"];
    let reasoning = usage["output_tokens_details"]["reasoning_tokens"]
        .as_u64()
        .unwrap();
    assert!(reasoning > 0);
    assert_eq!(usage["output_tokens"], 2 * reasoning);
    // Not a reasoning model: none.
    let (_, _, v) = s.chat(&user("hi")).await;
    assert_eq!(
        v["usage"]["completion_tokens_details"]["reasoning_tokens"],
        0
    );
    s.region.shutdown().await;
}

#[tokio::test]
async fn a_long_prompt_seen_before_is_cached_in_steps_of_128_tokens() {
    let s = start(config().prompt_cache(true)).await;
    let long = "gateway ".repeat(1100);
    let prompt = expected_prompt_tokens(&[("user", &long)]);
    assert!(prompt >= 1024);
    let cached = |v: &Value| v["usage"]["prompt_tokens_details"]["cached_tokens"].clone();
    let (_, _, first) = s.chat(&user(&long)).await;
    assert_eq!(first["usage"]["prompt_tokens"], prompt);
    assert_eq!(cached(&first), 0, "the first time, nothing is cached");
    let (_, _, second) = s.chat(&user(&long)).await;
    assert_eq!(cached(&second), prompt / 128 * 128);
    // A short prompt is never cached, however often it is seen.
    for _ in 0..2 {
        let (_, _, v) = s.chat(&user("short")).await;
        assert_eq!(cached(&v), 0);
    }
    s.region.shutdown().await;
}

#[tokio::test]
async fn answers_name_the_service_tier_that_served_them() {
    let tier = |v: &Value| v["service_tier"].as_str().unwrap().to_owned();
    let ask = |tier: Option<&str>| {
        let mut body = user("hi");
        if let Some(tier) = tier {
            body["service_tier"] = json!(tier);
        }
        body
    };
    let s = start(config()).await;
    for (asked, served) in [
        (None, "default"),
        (Some("auto"), "default"),
        (Some("priority"), "priority"),
        (Some("flex"), "flex"),
    ] {
        let (_, _, v) = s.chat(&ask(asked)).await;
        assert_eq!(tier(&v), served, "{asked:?}");
    }
    s.region.shutdown().await;

    // A region that serves priority at standard says so, in answers and in every stream chunk.
    let s = start(config().priority_as_default(true)).await;
    let (_, _, v) = s.chat(&ask(Some("priority"))).await;
    assert_eq!(tier(&v), "default");
    let mut body = ask(Some("priority"));
    body["stream"] = json!(true);
    let (events, error) = read_sse(s.post(&chat_path("gpt-4o"), &body).await).await;
    assert!(error.is_none());
    let chunks: Vec<Value> = events
        .iter()
        .filter(|e| *e != "[DONE]")
        .map(|e| serde_json::from_str(e).unwrap())
        .filter(|c: &Value| c["id"] != "")
        .collect();
    assert!(!chunks.is_empty());
    assert!(chunks.iter().all(|c| c["service_tier"] == "default"));
    let body = json!({"model": "gpt-4o", "input": "hi", "service_tier": "priority"});
    let (_, _, v) = s.call("/openai/v1/responses", &body).await;
    assert_eq!(tier(&v), "default");
    s.region.shutdown().await;
}
