//! The variants real backends show (`RegionConfig`'s switches), over real HTTP: each one on, and
//! the tidy default it departs from. Bodies are parsed, except where their byte layout is the point.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use reqwest::StatusCode;
use reqwest::header::HeaderMap;
use serde_json::{Value, json};
use simulator::{DeploymentConfig, DoneEnding, Fault, RegionConfig, ResetFormat};

/// A region whose chat deployment allows 1,000 tokens a minute (plenty of requests).
fn small() -> RegionConfig {
    RegionConfig::new("Sweden Central", KEY)
        .deployment(DeploymentConfig::chat("gpt-4o", 1000).rpm(6000))
        .seed(42)
}

fn stream_body(include_usage: bool) -> Value {
    let mut body = user("stream please");
    body["stream"] = json!(true);
    body["max_tokens"] = json!(30);
    if include_usage {
        body["stream_options"] = json!({"include_usage": true});
    }
    body
}

/// POSTs and returns status, headers and the raw body text.
async fn raw(s: &Sim, path: &str, body: &Value) -> (StatusCode, HeaderMap, String) {
    let response = s.post(path, body).await;
    let status = response.status();
    let headers = response.headers().clone();
    (status, headers, response.text().await.unwrap())
}

/// The `data:` payloads of an SSE body, whether or not its last event ends with a blank line.
fn events(body: &str) -> Vec<&str> {
    body.split("\n\n")
        .map(str::trim_end)
        .filter(|e| !e.is_empty())
        .map(|e| {
            e.strip_prefix("data: ")
                .unwrap_or_else(|| panic!("not a data event: {e:?}"))
        })
        .collect()
}

/// The JSON chunks of a stream (every event but `[DONE]`), parsed.
fn chunks(body: &str) -> Vec<Value> {
    let events = events(body);
    assert_eq!(events.last(), Some(&"[DONE]"), "{body}");
    events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap_or_else(|err| panic!("{err}: {e}")))
        .collect()
}

/// How JSON text separates its tokens outside strings.
#[derive(Debug, PartialEq, Eq)]
enum Layout {
    /// No whitespace at all (serde_json's compact output).
    Compact,
    /// Exactly one space after every `:` and `,`, and no other whitespace (Python's `json.dumps`).
    Python,
    /// Anything else.
    Other,
}

fn layout(text: &str) -> Layout {
    let bytes = text.as_bytes();
    let (mut in_string, mut escaped) = (false, false);
    let (mut compact, mut python) = (true, true);
    for (i, &b) in bytes.iter().enumerate() {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b':' | b',' => {
                compact &= bytes.get(i + 1) != Some(&b' ');
                python &= bytes.get(i + 1) == Some(&b' ') && bytes.get(i + 2) != Some(&b' ');
            }
            b' ' => python &= i > 0 && matches!(bytes[i - 1], b':' | b','),
            b'\t' | b'\n' | b'\r' => python = false,
            _ => {}
        }
        compact &= !b.is_ascii_whitespace();
    }
    match (compact, python) {
        (true, _) => Layout::Compact,
        (false, true) => Layout::Python,
        _ => Layout::Other,
    }
}

#[test]
fn layout_tells_compact_from_python() {
    assert_eq!(layout(r#"{"a":[1,2],"b":"x: y, z"}"#), Layout::Compact);
    assert_eq!(layout(r#"{"a": [1, 2], "b": "x:y,z"}"#), Layout::Python);
    assert_eq!(layout(r#"{"a":  [1, 2]}"#), Layout::Other);
    assert_eq!(layout("{\"a\": [1,\n 2]}"), Layout::Other);
}

#[tokio::test]
async fn spaced_json_in_answers_stream_chunks_and_error_bodies() {
    let s = start(config().spaced_json(true)).await;
    let tidy = start(config()).await;
    for (sim, expected) in [(&s, Layout::Python), (&tidy, Layout::Compact)] {
        // A JSON answer: spaced, and the same JSON once parsed.
        let (status, _, text) = raw(sim, &chat_path("gpt-4o"), &user("hello")).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(layout(&text), expected, "{text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert!(v["usage"]["total_tokens"].as_u64().unwrap() > 0);
        if expected == Layout::Python {
            // What a byte pattern looking for `"usage":{` would miss.
            assert!(
                text.contains(r#""usage": {"completion_tokens": "#),
                "{text}"
            );
        }

        // Every chunk of a stream, the usage chunk included.
        let (_, _, text) = raw(sim, &chat_path("gpt-4o"), &stream_body(true)).await;
        for event in events(&text).iter().filter(|e| **e != "[DONE]") {
            assert_eq!(layout(event), expected, "{event}");
        }
        let parsed = chunks(&text);
        let usage = parsed.last().unwrap();
        assert_eq!(usage["choices"], json!([]));
        assert!(usage["usage"]["completion_tokens"].as_u64().unwrap() > 0);

        // Embeddings and error bodies.
        let embed = "/openai/deployments/embed/embeddings?api-version=2024-10-21";
        let (status, _, text) = raw(sim, embed, &json!({"input": ["a", "b"]})).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(layout(&text), expected);
        let (status, _, text) = raw(sim, &chat_path("missing"), &user("hi")).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(layout(&text), expected, "{text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["error"]["code"], "DeploymentNotFound");
    }
}

#[tokio::test]
async fn seconds_only_429s_carry_retry_after_and_reset_headers_but_no_retry_after_ms() {
    let s = start(small().seconds_only_429(true)).await;
    let mut body = user("hello");
    body["max_tokens"] = json!(400);
    // The first two fit in 1,000 tokens; the third cannot.
    let mut answers = Vec::new();
    for _ in 0..3 {
        answers.push(s.chat(&body).await);
    }
    let (status, headers, v) = answers.pop().unwrap();
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{v}");
    assert_eq!(v["error"]["code"], "429");
    assert!(headers.get("retry-after-ms").is_none());
    let secs = header_u64(&headers, "retry-after");
    assert!((1..=60).contains(&secs), "{secs}");
    assert_eq!(header_u64(&headers, "x-ratelimit-reset-tokens"), secs);
    assert!((1..=10).contains(&header_u64(&headers, "x-ratelimit-reset-requests")));
    let message = v["error"]["message"].as_str().unwrap();
    assert!(
        message.contains(&format!("retry after {secs} seconds")),
        "{message}"
    );

    // Injected 429s and 5xx: their hint is rounded up to whole seconds, and only that is said.
    s.sim.reset_limits();
    s.sim.set_faults(vec![
        Fault::status_with_retry_after(429, 1500).count(1),
        Fault::status_with_retry_after(503, 200).count(1),
    ]);
    let (status, headers, _) = s.chat(&user("hi")).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert!(headers.get("retry-after-ms").is_none());
    assert_eq!(header_u64(&headers, "retry-after"), 2);
    assert_eq!(header_u64(&headers, "x-ratelimit-reset-requests"), 2);
    assert_eq!(header_u64(&headers, "x-ratelimit-reset-tokens"), 2);
    let (status, headers, _) = s.chat(&user("hi")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(headers.get("retry-after-ms").is_none());
    assert_eq!(header_u64(&headers, "retry-after"), 1);

    // By default the same fault says it to the millisecond too.
    let tidy = start(small()).await;
    tidy.sim
        .set_faults(vec![Fault::status_with_retry_after(429, 1500).count(1)]);
    let (_, headers, _) = tidy.chat(&user("hi")).await;
    assert_eq!(header_u64(&headers, "retry-after-ms"), 1500);
    assert_eq!(header_u64(&headers, "retry-after"), 2);
}

#[tokio::test]
async fn reset_headers_as_durations() {
    let s = start(
        small()
            .seconds_only_429(true)
            .reset_format(ResetFormat::Duration),
    )
    .await;
    s.sim
        .set_faults(vec![Fault::status_with_retry_after(429, 1500).count(1)]);
    let (status, headers, _) = s.chat(&user("hi")).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&headers, "x-ratelimit-reset-requests"), "1.5s");
    assert_eq!(header(&headers, "x-ratelimit-reset-tokens"), "1.5s");
    assert_eq!(header_u64(&headers, "retry-after"), 2);

    // A breached token window: under a minute, written in seconds (with milliseconds).
    let mut body = user("hello");
    body["max_tokens"] = json!(900);
    assert_eq!(s.chat(&body).await.0, StatusCode::OK);
    let (status, headers, _) = s.chat(&body).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    let reset = header(&headers, "x-ratelimit-reset-tokens");
    // `59.998s`, or `1m0s` when the window has just begun.
    let (minutes, secs) = reset
        .strip_suffix('s')
        .and_then(|r| r.split_once('m').or(Some(("0", r))))
        .unwrap_or_else(|| panic!("{reset}"));
    let minutes: f64 = minutes.parse().unwrap_or_else(|e| panic!("{reset}: {e}"));
    let secs: f64 = secs.parse().unwrap_or_else(|e| panic!("{reset}: {e}"));
    let total = minutes * 60.0 + secs;
    assert!(total > 0.0 && total <= 60.0 && secs < 60.0, "{reset}");
}

#[tokio::test]
async fn streams_can_ignore_include_usage() {
    let s = start(config().ignore_include_usage(true)).await;
    let (status, _, text) = raw(&s, &chat_path("gpt-4o"), &stream_body(true)).await;
    assert_eq!(status, StatusCode::OK);
    let parsed = chunks(&text);
    assert!(
        parsed.iter().all(|c| c.get("usage").is_none()),
        "no usage chunk, no `usage: null`: {text}"
    );
    let content = parsed
        .iter()
        .filter(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .is_some_and(|t| !t.is_empty())
        })
        .count();
    assert!(content > 0, "{text}");
    // Legacy completions alike; JSON answers keep their usage.
    let path = format!("/openai/deployments/gpt-4o/completions?api-version={API_VERSION}");
    let body = json!({"prompt": "hi", "stream": true, "max_tokens": 4,
        "stream_options": {"include_usage": true}});
    let (_, _, text) = raw(&s, &path, &body).await;
    assert!(
        chunks(&text).iter().all(|c| c.get("usage").is_none()),
        "{text}"
    );
    let (_, _, v) = s.chat(&user("hello")).await;
    assert!(v["usage"]["total_tokens"].as_u64().unwrap() > 0);

    // By default the same request ends with a usage chunk.
    let tidy = start(config()).await;
    let (_, _, text) = raw(&tidy, &chat_path("gpt-4o"), &stream_body(true)).await;
    assert!(chunks(&text).last().unwrap()["usage"].is_object());
}

#[tokio::test]
async fn streams_can_come_without_content_type() {
    let s = start(config().omit_stream_content_type(true)).await;
    let (status, headers, text) = raw(&s, &chat_path("gpt-4o"), &stream_body(false)).await;
    assert_eq!(status, StatusCode::OK);
    assert!(headers.get("content-type").is_none(), "{headers:?}");
    assert!(chunks(&text).len() > 3);
    // Only streams lose it.
    let (_, headers, _) = s.chat(&user("hello")).await;
    assert_eq!(header(&headers, "content-type"), "application/json");
    let tidy = start(config()).await;
    let (_, headers, _) = raw(&tidy, &chat_path("gpt-4o"), &stream_body(false)).await;
    assert_eq!(header(&headers, "content-type"), "text/event-stream");
}

#[tokio::test]
async fn done_can_end_without_its_blank_line() {
    for (ending, tail) in [
        (DoneEnding::BlankLine, "\n\ndata: [DONE]\n\n"),
        (DoneEnding::Newline, "\n\ndata: [DONE]\n"),
        (DoneEnding::Bare, "\n\ndata: [DONE]"),
    ] {
        let s = start(config().done_ending(ending)).await;
        // Paced, so the last event also arrives on its own.
        for sim in [
            &s,
            &start(
                config()
                    .done_ending(ending)
                    .token_delay(std::time::Duration::from_millis(1)),
            )
            .await,
        ] {
            let (_, _, text) = raw(sim, &chat_path("gpt-4o"), &stream_body(true)).await;
            assert!(text.ends_with(tail), "{ending:?}: {text:?}");
            assert!(
                !text.ends_with(&format!("{tail}\n")),
                "{ending:?}: {text:?}"
            );
            // Everything before it is unchanged: whole events, the usage chunk last.
            let parsed = chunks(&text);
            assert!(
                parsed.last().unwrap()["usage"]["total_tokens"]
                    .as_u64()
                    .unwrap()
                    > 0
            );
        }
    }
}

#[tokio::test]
async fn remaining_requests_reach_zero_on_the_last_request_a_window_admits() {
    // 18 RPM: 3 requests per 10-second window.
    let s = start(
        RegionConfig::new("Sweden Central", KEY)
            .deployment(DeploymentConfig::chat("gpt-4o", 1_000_000).rpm(18)),
    )
    .await;
    for left in [2, 1, 0] {
        let (status, headers, _) = s.chat(&user("hi")).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(header_u64(&headers, "x-ratelimit-remaining-requests"), left);
        assert_eq!(header_u64(&headers, "x-ratelimit-limit-requests"), 18);
    }
    let (status, headers, v) = s.chat(&user("hi")).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{v}");
    assert_eq!(header_u64(&headers, "x-ratelimit-remaining-requests"), 0);
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("call rate limit")
    );
}

fn utilization(headers: &HeaderMap) -> u64 {
    let value = header(headers, "azure-openai-deployment-utilization");
    value
        .strip_suffix('%')
        .unwrap_or_else(|| panic!("{value}"))
        .parse()
        .unwrap_or_else(|e| panic!("{value}: {e}"))
}

#[tokio::test]
async fn ptu_deployments_report_their_utilization_on_every_answer() {
    let s = start(
        RegionConfig::new("Sweden Central", KEY)
            .deployment(DeploymentConfig::chat("gpt-4o", 1000).rpm(6000).ptu(true))
            .deployment(DeploymentConfig::chat("standard", 1000).rpm(6000)),
    )
    .await;
    let mut body = user("hello");
    body["max_tokens"] = json!(300);
    let mut last = 0;
    loop {
        let (status, headers, v) = s.chat(&body).await;
        let percent = utilization(&headers);
        let used = 1000 - header_u64(&headers, "x-ratelimit-remaining-tokens");
        // The token window is the fuller one (1 request in 1,000 is 1%): used / 1,000, rounded up.
        assert_eq!(percent, (used * 100).div_ceil(1000), "{headers:?}");
        if status == StatusCode::TOO_MANY_REQUESTS {
            // A refusal consumed nothing and says how full the deployment is.
            assert_eq!(percent, last);
            break;
        }
        assert_eq!(status, StatusCode::OK, "{v}");
        assert!(percent > last);
        last = percent;
    }
    // Streams and errors carry it too; a Standard deployment never does.
    s.sim.reset_limits();
    let response = s.post(&chat_path("gpt-4o"), &stream_body(false)).await;
    assert!(utilization(response.headers()) > 0);
    s.sim.set_faults(vec![Fault::status(500).count(1)]);
    let (status, headers, _) = s.chat(&user("hi")).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    utilization(&headers);
    let (_, headers, _) = s.call(&chat_path("standard"), &user("hi")).await;
    assert!(headers.get("azure-openai-deployment-utilization").is_none());
}
