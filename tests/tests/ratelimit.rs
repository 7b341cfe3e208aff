//! Consumer limits through the whole gateway (in-memory store): TPM, RPM, quotas, reconciliation of
//! JSON and streamed answers, release on failure, and proactive failover on backend quota headers.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use futures_util::StreamExt;
use gateway_e2e::*;
use serde_json::{Value, json};
use simulator::{Fault, RegionConfig, RunningRegion};

/// Per-minute counts start over with each minute of the clock: a scenario starts with room for
/// itself in the current one.
const SCENARIO: Duration = Duration::from_secs(10);

async fn limited(consumer_toml: &str) -> (RunningRegion, Gateway) {
    limited_with(consumer_toml, |c| c).await
}

async fn limited_with(
    consumer_toml: &str,
    adjust: impl FnOnce(RegionConfig) -> RegionConfig,
) -> (RunningRegion, Gateway) {
    let started = sweden_with(1_000_000, consumer_toml, adjust).await;
    minute_room(SCENARIO).await;
    started
}

fn header(res: &reqwest::Response, name: &str) -> u64 {
    res.headers()[name].to_str().unwrap().parse().unwrap()
}

#[tokio::test]
async fn requests_per_minute_are_enforced_with_azure_shaped_429() {
    let (sim, gw) = limited("[consumers.limits]\nrequests_per_minute = 3\n").await;
    for left in [2, 1, 0] {
        let res = gw.chat("gpt-4o", &chat("hi")).await;
        assert_eq!(res.status(), 200);
        assert_eq!(header(&res, "x-ratelimit-remaining-requests"), left);
        assert_eq!(header(&res, "x-ratelimit-limit-requests"), 3);
    }
    let res = gw.chat("gpt-4o", &chat("hi")).await;
    assert_eq!(res.status(), 429);
    assert_eq!(res.headers()["x-gateway-limit"], "requests");
    let ms = header(&res, "retry-after-ms");
    let secs = header(&res, "retry-after");
    assert!((1..=60_000).contains(&ms), "{ms}");
    assert_eq!(secs, ms.div_ceil(1000));
    let (code, msg) = azure_error(res).await;
    assert_eq!(code, "429");
    assert!(
        msg.contains("call rate limit of 3 requests per minute"),
        "{msg}"
    );
    assert_eq!(
        sim.handle().request_count(),
        3,
        "the refused call never reached Azure"
    );
    gw.stop().await;
}

#[tokio::test]
async fn tokens_are_reserved_then_reconciled_with_real_usage() {
    let (_sim, gw) = limited("[consumers.limits]\ntokens_per_minute = 100000\n").await;
    let body = json!({"messages": [{"role": "user", "content": "Write a haiku about failover"}], "max_tokens": 500});
    let first = gw.chat("gpt-4o", &body).await;
    assert_eq!(first.status(), 200);
    let remaining1 = header(&first, "x-ratelimit-remaining-tokens");
    let consumed1 = header(&first, "x-gateway-tokens-consumed");
    let usage: Value = first.json().await.unwrap();
    assert_eq!(consumed1, usage["usage"]["total_tokens"].as_u64().unwrap());
    // The reservation (prompt + 500) was larger than the real usage.
    assert!(100_000 - remaining1 > consumed1);

    let second = gw.chat("gpt-4o", &body).await;
    let remaining2 = header(&second, "x-ratelimit-remaining-tokens");
    // The first call now counts for what it really used; the second holds the same reservation.
    assert_eq!(remaining1 - remaining2, consumed1);
    gw.stop().await;
}

#[tokio::test]
async fn tokens_per_minute_refuse_what_does_not_fit() {
    let (sim, gw) = limited("[consumers.limits]\ntokens_per_minute = 300\n").await;
    let body = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 200});
    assert_eq!(gw.chat("gpt-4o", &body).await.status(), 200);
    // What is left cannot hold another 200-token reservation, whatever the first really used.
    let big = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 290});
    let res = gw.chat("gpt-4o", &big).await;
    assert_eq!(res.status(), 429);
    assert_eq!(res.headers()["x-gateway-limit"], "tokens");
    let (_, msg) = azure_error(res).await;
    assert!(
        msg.contains("token rate limit of 300 tokens per minute"),
        "{msg}"
    );
    assert_eq!(sim.handle().request_count(), 1);
    gw.stop().await;
}

#[tokio::test]
async fn quota_exhaustion_is_403_with_the_reset() {
    let (_sim, gw) =
        limited("[consumers.limits]\ntoken_quota = 120\ntoken_quota_period = \"daily\"\n").await;
    let body = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 50});
    let mut refused = None;
    for _ in 0..10 {
        let res = gw.chat("gpt-4o", &body).await;
        if res.status() != 200 {
            refused = Some(res);
            break;
        }
        assert!(
            res.headers()
                .contains_key("x-ratelimit-remaining-quota-tokens")
        );
    }
    let res = refused.expect("a 120-token daily quota runs out within 10 calls");
    assert_eq!(res.status(), 403);
    assert_eq!(res.headers()["x-gateway-limit"], "quota");
    let (code, msg) = azure_error(res).await;
    assert_eq!(code, "QuotaExceeded");
    assert!(msg.contains("daily token quota of 120 tokens"), "{msg}");
    assert!(msg.contains("resets in"), "{msg}");
    gw.stop().await;
}

#[tokio::test]
async fn deployment_limits_apply_on_top_of_consumer_limits() {
    let (_sim, gw) = limited(
        "[consumers.limits]\nrequests_per_minute = 100\n[consumers.deployment_limits.gpt-4o]\nrequests_per_minute = 1\n",
    )
    .await;
    assert_eq!(gw.chat("gpt-4o", &chat("hi")).await.status(), 200);
    assert_eq!(gw.chat("gpt-4o", &chat("hi")).await.status(), 429);
    // Embeddings are only under the consumer-wide limit.
    let res = client()
        .post(
            gw.url("/openai/deployments/text-embedding-3-small/embeddings?api-version=2024-10-21"),
        )
        .header("api-key", CLIENT_KEY)
        .json(&json!({"input": "hello"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(header(&res, "x-gateway-tokens-consumed"), 1);
    gw.stop().await;
}

async fn read_stream(res: reqwest::Response) -> String {
    let mut text = String::new();
    let mut body = res.bytes_stream();
    while let Some(chunk) = body.next().await {
        text.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
    }
    text
}

/// What the gateway counts as generated in a stream it saw without usage, from the same text the
/// client got: the tokenizer's count (`gpt-4o`: `o200k_base`) of the content streamed.
fn generated(text: &str) -> u64 {
    let mut content = String::new();
    for data in text.split("\n\n").filter_map(|e| e.strip_prefix("data: ")) {
        let Ok(v) = serde_json::from_str::<Value>(data) else {
            continue;
        };
        for c in v["choices"].as_array().into_iter().flatten() {
            content.push_str(c["delta"]["content"].as_str().unwrap_or_default());
        }
    }
    gateway_core::tokens::count(gateway_core::tokens::Encoding::O200k, &content)
}

/// The prompt of a chat `body` counted as the gateway counts it with the tokenizer: what a stream
/// without usage is charged for its prompt.
fn prompt_tokens(body: &Value) -> u64 {
    let bytes = serde_json::to_vec(body).unwrap();
    let op = gateway_core::operation::Operation::ChatCompletions;
    gateway_core::tokens::estimate(op, "gpt-4o", &bytes, 0).prompt
}

fn usage_chunks(text: &str) -> usize {
    text.split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter(|v| v["usage"].is_object())
        .count()
}

#[tokio::test]
async fn streams_are_reconciled_from_a_usage_chunk_the_client_does_not_see() {
    let (sim, gw) = limited("[consumers.limits]\ntokens_per_minute = 100000\n").await;
    let stream = json!({
        "messages": [{"role": "user", "content": "Tell me a story"}],
        "max_tokens": 400,
        "stream": true
    });
    let res = gw.chat("gpt-4o", &stream).await;
    assert_eq!(res.status(), 200);
    let remaining_during = header(&res, "x-ratelimit-remaining-tokens");
    let text = read_stream(res).await;
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    assert_eq!(
        usage_chunks(&text),
        0,
        "the client did not ask for usage: {text}"
    );
    // The gateway asked the backend for it.
    let sent: Value = serde_json::from_slice(&sim.handle().recent_requests()[0].body).unwrap();
    assert_eq!(sent["stream_options"]["include_usage"], true);

    // One chunk per generated token.
    let generated = text
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .is_some_and(|c| !c.is_empty())
        })
        .count() as u64;
    assert!(generated > 0 && generated < 400);

    // The stream's reservation (prompt + 400) is reconciled when its body ends, in a task: await
    // it, check the store no longer holds the reservation, then make the same call without
    // streaming, which reserves the same amount again.
    let reserved = 100_000 - remaining_during;
    gw.stream_let_go().await;
    assert_ne!(gw.tokens_this_minute("tester").await, reserved);
    let next = gw
        .chat(
            "gpt-4o",
            &json!({"messages": [{"role": "user", "content": "Tell me a story"}], "max_tokens": 400}),
        )
        .await;
    let remaining_next = header(&next, "x-ratelimit-remaining-tokens");
    // Unreconciled, the stream would still hold `reserved`; reconciled, it holds its real usage, which
    // is the prompt plus what it generated: the difference is the unused part of the 400, and the
    // part of the reservation above the prompt's real count (a consumer this far from its limit
    // reserves an upper bound of the prompt, its length in bytes, instead of counting it).
    let released = remaining_next - (100_000 - 2 * reserved);
    let prompt = prompt_tokens(&stream);
    assert!(
        reserved - 400 > prompt,
        "the reservation is the prompt's upper bound"
    );
    assert_eq!(released, reserved - prompt - generated);
    gw.stop().await;
}

#[tokio::test]
async fn a_client_that_asks_for_usage_keeps_its_usage_chunk() {
    let (_sim, gw) = limited("[consumers.limits]\ntokens_per_minute = 100000\n").await;
    let stream = json!({
        "messages": [{"role": "user", "content": "Tell me a story"}],
        "max_tokens": 20,
        "stream": true,
        "stream_options": {"include_usage": true}
    });
    let text = read_stream(gw.chat("gpt-4o", &stream).await).await;
    assert_eq!(usage_chunks(&text), 1, "{text}");
    gw.stop().await;
}

#[tokio::test]
async fn a_failed_call_releases_its_tokens() {
    let (sim, gw) = limited("[consumers.limits]\ntokens_per_minute = 100000\n").await;
    let body = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1000});
    let first = gw.chat("gpt-4o", &body).await;
    let reserved = 100_000 - header(&first, "x-ratelimit-remaining-tokens");
    let consumed = header(&first, "x-gateway-tokens-consumed");

    sim.handle().set_faults(vec![
        serde_json::from_value::<Fault>(json!({"kind": "status", "status": 500})).unwrap(),
    ]);
    let failed = gw.chat("gpt-4o", &body).await;
    assert_eq!(failed.status(), 500, "the last upstream answer is returned");
    sim.handle().clear_faults();

    let third = gw.chat("gpt-4o", &body).await;
    assert_eq!(third.status(), 200);
    // Only the first call's real usage and the third's reservation count: the failure cost nothing.
    assert_eq!(
        100_000 - header(&third, "x-ratelimit-remaining-tokens"),
        consumed + reserved
    );
    gw.stop().await;
}

#[tokio::test]
async fn an_exhausted_backend_is_skipped_before_it_answers_429() {
    // Region A reports little quota left: 2,000 TPM, and each call reserves about 1,010 tokens there.
    let a = region("Region A", &[("m", 2_000)]).await;
    let b = region("Region B", &[("m", 1_000_000)]).await;
    let backends = [
        backend_toml("a", &a, "Region A", 1, 1, &[("gpt-4o", "m")]),
        backend_toml("b", &b, "Region B", 2, 1, &[("gpt-4o", "m")]),
    ];
    let gw = gateway(
        &policy_with_limits(
            &["gpt-4o"],
            &backends,
            "",
            "[consumers.limits]\ntokens_per_minute = 1000000\n",
        ),
        &["Region A", "Region B"],
    )
    .await;
    let body = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1000});
    let first = gw.chat("gpt-4o", &body).await;
    assert_eq!(first.headers()["x-served-by"], "a (Region A)");
    // A now reports about 990 tokens left: the next 1,000-token call goes straight to B.
    let second = gw.chat("gpt-4o", &body).await;
    assert_eq!(second.status(), 200);
    assert_eq!(second.headers()["x-served-by"], "b (Region B)");
    assert_eq!(
        second.headers()["x-gateway-attempts"],
        "1",
        "no 429 round trip to A"
    );
    assert_eq!(a.handle().request_count(), 1);
    // A small call still fits in A.
    let small = gw
        .chat(
            "gpt-4o",
            &json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}),
        )
        .await;
    assert_eq!(small.headers()["x-served-by"], "a (Region A)");
    gw.stop().await;
}

#[tokio::test]
async fn a_request_that_can_never_fit_is_a_400_not_an_endless_429() {
    let (sim, gw) = limited("[consumers.limits]\ntokens_per_minute = 1000\n").await;
    let huge = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10_000_000_000_000_000_000u64});
    let res = gw.chat("gpt-4o", &huge).await;
    assert_eq!(res.status(), 400);
    let (code, msg) = azure_error(res).await;
    assert_eq!(code, "BadRequest");
    assert!(msg.contains("1000 tokens per minute"), "{msg}");
    assert_eq!(sim.handle().request_count(), 0);
    // The limiter still works for reasonable calls.
    assert_eq!(gw.chat("gpt-4o", &chat("hi")).await.status(), 200);
    gw.stop().await;
}

#[tokio::test]
async fn a_client_hanging_up_mid_stream_pays_its_prompt_and_what_was_generated() {
    let (_sim, gw) = limited_with("[consumers.limits]\ntokens_per_minute = 100000\n", |c| {
        c.token_delay(Duration::from_millis(50))
    })
    .await;
    let body = json!({"messages": [{"role": "user", "content": "story"}], "max_tokens": 300, "stream": true});
    let res = gw.chat("gpt-4o", &body).await;
    let reserved = 100_000 - header(&res, "x-ratelimit-remaining-tokens");
    let prompt = prompt_tokens(&body);
    // Read until some text came (the gateway saw it too), then hang up.
    let mut stream = res.bytes_stream();
    let mut text = String::new();
    while generated(&text) == 0 {
        text.push_str(std::str::from_utf8(&stream.next().await.unwrap().unwrap()).unwrap());
    }
    drop(stream);
    gw.stream_let_go().await;

    // Some tokens were generated, far fewer than the 300 reserved (they take 15 s to generate).
    let charged = gw.tokens_this_minute("tester").await;
    assert!(
        charged > prompt && charged < reserved,
        "charged {charged}, prompt {prompt}, reserved {reserved}"
    );
    gw.stop().await;
}

#[tokio::test]
async fn a_stream_that_breaks_is_charged_its_prompt_and_what_it_generated() {
    let (sim, gw) = limited("[consumers.limits]\ntokens_per_minute = 100000\n").await;
    sim.handle().set_faults(vec![Fault::abort_stream(3)]);
    let body = json!({"messages": [{"role": "user", "content": "story"}], "max_tokens": 300, "stream": true});
    let res = gw.chat("gpt-4o", &body).await;
    assert_eq!(res.status(), 200);
    let reserved = 100_000 - header(&res, "x-ratelimit-remaining-tokens");
    let mut text = String::new();
    let mut stream = res.bytes_stream();
    while let Some(Ok(chunk)) = stream.next().await {
        text.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    assert!(text.contains("upstream_stream_broken"), "{text}");
    assert!(!text.contains("[DONE]"), "{text}");
    gw.stream_let_go().await;

    // The prompt and the text that came before the break; not the 300 tokens reserved.
    let generated = generated(&text);
    assert!(generated > 0, "{text}");
    let charged = gw.tokens_this_minute("tester").await;
    assert_eq!(charged, prompt_tokens(&body) + generated);
    assert!(charged < reserved - 300, "{charged} of {reserved}");
    gw.stop().await;
}

#[tokio::test]
async fn an_old_api_version_gets_no_stream_options_and_is_charged_what_it_generated() {
    let (sim, gw) = limited("[consumers.limits]\ntokens_per_minute = 100000\n").await;
    let url = gw.url("/openai/deployments/gpt-4o/chat/completions?api-version=2024-06-01");
    let body = json!({"messages": [{"role": "user", "content": "story"}], "max_tokens": 300, "stream": true});
    let res = client()
        .post(&url)
        .header("api-key", CLIENT_KEY)
        .json(&body)
        .send()
        .await
        .unwrap();
    let text = read_stream(res).await;
    assert!(text.trim_end().ends_with("data: [DONE]"));
    let sent: Value = serde_json::from_slice(&sim.handle().recent_requests()[0].body).unwrap();
    assert!(sent.get("stream_options").is_none(), "{sent}");
    // The client read the stream to its end: once the gateway let go of it, await its accounting.
    gw.stream_let_go().await;
    // No usage chunk: the prompt and the text the stream carried, measured as the gateway does.
    assert_eq!(
        gw.tokens_this_minute("tester").await,
        prompt_tokens(&body) + generated(&text)
    );
    gw.stop().await;
}
