//! Accounting that survives real backends (issue 9): streams without usage are charged the
//! tokenizer's count of their prompt and of the text they streamed, whatever the JSON's spacing;
//! the consumer's store, `gateway_tokens_total` and the access log's figure agree, and say whether
//! the figure is the backend's or the gateway's own.
//!
//! Metrics are process-wide: each test names its backend apart (`gateway_tokens_total` is labelled
//! by backend), so tests running side by side never count into each other's series.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use futures_util::StreamExt;
use gateway_core::tokens::{Encoding, count};
use gateway_e2e::*;
use serde_json::{Value, json};
use simulator::{RegionConfig, RunningRegion};

/// Per-minute counts start over with each minute of the clock: a scenario starts with room for
/// itself in the current one.
const SCENARIO: Duration = Duration::from_secs(10);

const PROMPT: &str = "Tell me a story about a gateway that counted every token";

/// A region `backend` (its own name in the metrics) behind a gateway; the consumer `tester` gets
/// `consumer_toml` (limits, or none).
async fn start(
    backend: &str,
    consumer_toml: &str,
    adjust: impl FnOnce(RegionConfig) -> RegionConfig,
) -> (RunningRegion, Gateway) {
    let region = format!("Region {backend}");
    let sim = region_with(&region, &[("m", 1_000_000)], adjust).await;
    let b = backend_toml(backend, &sim, &region, 1, 1, &[("gpt-4o", "m")]);
    let gw = gateway(
        &policy_with_limits(&["gpt-4o"], &[b], "", consumer_toml),
        &[&region],
    )
    .await;
    minute_room(SCENARIO).await;
    (sim, gw)
}

const LIMITS: &str = "[consumers.limits]\ntokens_per_minute = 100000\n";

fn o200k(text: &str) -> u64 {
    count(Encoding::O200k, text)
}

/// The prompt of [`story`], counted the way OpenAI documents chat prompts (reply priming, and per
/// message its framing, role and content), independently of the gateway's code.
fn story_prompt() -> u64 {
    3 + 3 + o200k("user") + o200k(PROMPT)
}

fn story(include_usage: bool) -> Value {
    let mut body = json!({
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": 300,
        "stream": true
    });
    if include_usage {
        body["stream_options"] = json!({"include_usage": true});
    }
    body
}

async fn read_stream(res: reqwest::Response) -> String {
    let mut text = String::new();
    let mut body = res.bytes_stream();
    while let Some(chunk) = body.next().await {
        text.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
    }
    text
}

/// Every JSON chunk of a stream.
fn chunks(text: &str) -> Vec<Value> {
    text.split("\n\n")
        .filter_map(|e| e.trim().strip_prefix("data:"))
        .map(str::trim)
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap_or_else(|err| panic!("{err}: {d}")))
        .collect()
}

/// The streamed text of the first choice.
fn content(text: &str) -> String {
    chunks(text)
        .iter()
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect()
}

fn usage_chunks(text: &str) -> usize {
    chunks(text)
        .iter()
        .filter(|c| c["usage"].is_object())
        .count()
}

/// The value of the series `name` with exactly `labels`, from the gateway's `/metrics`.
async fn metric(gw: &Gateway, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let text = client()
        .get(gw.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let mut want: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    want.sort();
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?.strip_prefix('{')?;
        let (set, value) = rest.rsplit_once("} ")?;
        let mut have: Vec<String> = set.split(',').map(str::to_owned).collect();
        have.sort();
        (have == want).then(|| value.parse().unwrap())
    })
}

/// `gateway_tokens_total` of consumer `tester` on `gpt-4o` served by `backend`.
async fn tokens(gw: &Gateway, backend: &str, kind: &str, estimated: bool) -> Option<f64> {
    let estimated = if estimated { "true" } else { "false" };
    let labels = [
        ("kind", kind),
        ("consumer", "tester"),
        ("deployment", "gpt-4o"),
        ("backend", backend),
        ("estimated", estimated),
    ];
    metric(gw, "gateway_tokens_total", &labels).await
}

/// Streams [`story`] to a region that never sends usage, once with and once without the client
/// asking for it: the consumer is charged, and the metrics count, the tokenizer's count of the
/// prompt and of the text streamed, marked estimated; no usage chunk reaches the client.
async fn no_usage_stream_is_counted_with_the_tokenizer(
    backend: &str,
    consumer_toml: &str,
    spaced: bool,
) {
    let (_sim, gw) = start(backend, consumer_toml, |c| {
        c.ignore_include_usage(true).spaced_json(spaced)
    })
    .await;
    let (mut prompt, mut completion) = (0, 0);
    for include_usage in [false, true] {
        let res = gw.chat("gpt-4o", &story(include_usage)).await;
        assert_eq!(res.status(), 200);
        let text = read_stream(res).await;
        if spaced {
            assert!(
                text.contains(r#""delta": {"#),
                "the region spaced it: {text}"
            );
        }
        assert_eq!(
            usage_chunks(&text),
            0,
            "include_usage {include_usage}: {text}"
        );
        let streamed = content(&text);
        assert!(!streamed.is_empty());
        gw.stream_let_go().await;
        prompt += story_prompt();
        completion += o200k(&streamed);
        if !consumer_toml.is_empty() {
            assert_eq!(gw.tokens_this_minute("tester").await, prompt + completion);
        }
        // Counted when the response ends, which the gateway sees on its own time.
        let want = (prompt as f64, completion as f64);
        eventually("the stream's tokens in the metrics", || async {
            let seen = (
                tokens(&gw, backend, "prompt", true).await?,
                tokens(&gw, backend, "completion", true).await?,
            );
            (seen == want).then_some(())
        })
        .await;
    }
    assert_eq!(
        tokens(&gw, backend, "prompt", false).await,
        None,
        "never reported"
    );
    gw.stop().await;
}

#[tokio::test]
async fn a_stream_without_usage_is_charged_the_tokenizers_count_of_prompt_and_streamed_text() {
    no_usage_stream_is_counted_with_the_tokenizer("nousage", LIMITS, false).await;
}

#[tokio::test]
async fn a_spaced_stream_without_usage_is_counted_the_same_way() {
    no_usage_stream_is_counted_with_the_tokenizer("nousage_spaced", LIMITS, true).await;
}

#[tokio::test]
async fn a_consumer_without_limits_gets_its_streams_counted_with_the_tokenizer_too() {
    // No limit needed an exact prompt before the call: it is counted when the stream ends.
    no_usage_stream_is_counted_with_the_tokenizer("nousage_unlimited", "", false).await;
}

#[tokio::test]
async fn a_spaced_usage_chunk_is_counted_as_reported_and_not_as_an_estimate() {
    let backend = "spaced_usage";
    let (_sim, gw) = start(backend, LIMITS, |c| c.spaced_json(true)).await;
    let res = gw.chat("gpt-4o", &story(true)).await;
    let text = read_stream(res).await;
    let shown: Vec<Value> = chunks(&text)
        .into_iter()
        .filter(|c| c["usage"].is_object())
        .collect();
    assert_eq!(shown.len(), 1, "{text}");
    let usage = &shown[0]["usage"];
    gw.stream_let_go().await;
    assert_eq!(
        gw.tokens_this_minute("tester").await,
        usage["total_tokens"].as_u64().unwrap()
    );
    let want = (
        usage["prompt_tokens"].as_f64().unwrap(),
        usage["completion_tokens"].as_f64().unwrap(),
    );
    eventually("the stream's reported tokens in the metrics", || async {
        let seen = (
            tokens(&gw, backend, "prompt", false).await?,
            tokens(&gw, backend, "completion", false).await?,
        );
        (seen == want).then_some(())
    })
    .await;
    assert_eq!(tokens(&gw, backend, "prompt", true).await, None);
    gw.stop().await;
}

/// Sends a Responses call through the gateway's v1 path.
async fn respond(gw: &Gateway, body: &Value) -> reqwest::Response {
    client()
        .post(gw.url("/openai/v1/responses"))
        .header("api-key", CLIENT_KEY)
        .json(body)
        .send()
        .await
        .unwrap()
}

/// The `data:` payloads of a stream whose events may be named (`event:` lines).
fn payloads(text: &str) -> Vec<Value> {
    text.split("\n\n")
        .filter_map(|e| e.lines().find_map(|l| l.strip_prefix("data:")))
        .map(str::trim)
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap_or_else(|err| panic!("{err}: {d}")))
        .collect()
}

#[tokio::test]
async fn responses_usage_is_counted_like_chat_usage_in_json_and_in_streams() {
    let backend = "responses";
    let (_sim, gw) = start(backend, LIMITS, |c| c.spaced_json(true)).await;
    let input = "Tell me about gateways";

    // A JSON answer: `input_tokens`/`output_tokens`.
    let res = respond(
        &gw,
        &json!({"model": "gpt-4o", "input": input, "max_output_tokens": 200}),
    )
    .await;
    assert_eq!(res.status(), 200);
    let v: Value = res.json().await.unwrap();
    let json_usage = v["usage"].clone();
    assert_eq!(json_usage["input_tokens"], o200k(input));

    // A stream: the usage of its `response.completed` event.
    let body = json!({"model": "gpt-4o", "input": input, "max_output_tokens": 200, "stream": true});
    let res = respond(&gw, &body).await;
    assert_eq!(res.status(), 200);
    let text = read_stream(res).await;
    let events = payloads(&text);
    let completed = events.last().unwrap();
    assert_eq!(completed["type"], "response.completed", "{text}");
    let stream_usage = completed["response"]["usage"].clone();
    gw.stream_let_go().await;

    let total = |u: &Value| u["total_tokens"].as_u64().unwrap();
    assert_eq!(
        gw.tokens_this_minute("tester").await,
        total(&json_usage) + total(&stream_usage)
    );
    let sum = |key: &str| {
        (json_usage[key].as_u64().unwrap() + stream_usage[key].as_u64().unwrap()) as f64
    };
    let want = (sum("input_tokens"), sum("output_tokens"));
    eventually("the Responses tokens in the metrics", || async {
        let seen = (
            tokens(&gw, backend, "prompt", false).await?,
            tokens(&gw, backend, "completion", false).await?,
        );
        (seen == want).then_some(())
    })
    .await;
    assert_eq!(tokens(&gw, backend, "prompt", true).await, None);
    gw.stop().await;
}

#[tokio::test]
async fn a_responses_stream_cut_short_is_charged_the_tokenizers_count_of_its_deltas() {
    let backend = "responses_cut";
    let (sim, gw) = start(backend, LIMITS, |c| c).await;
    // Created, in progress, item and part added, then three deltas: then the connection breaks.
    sim.handle()
        .set_faults(vec![simulator::Fault::abort_stream(7)]);
    let input = "Tell me about gateways";
    let body = json!({"model": "gpt-4o", "input": input, "max_output_tokens": 200, "stream": true});
    let res = respond(&gw, &body).await;
    assert_eq!(res.status(), 200);
    let mut text = String::new();
    let mut stream = res.bytes_stream();
    while let Some(Ok(chunk)) = stream.next().await {
        text.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    let deltas: String = payloads(&text)
        .iter()
        .filter(|e| e["type"] == "response.output_text.delta")
        .map(|e| e["delta"].as_str().unwrap().to_owned())
        .collect();
    assert!(!deltas.is_empty(), "{text}");
    gw.stream_let_go().await;
    // A string input is counted as plain text.
    let (prompt, completion) = (o200k(input), o200k(&deltas));
    assert_eq!(gw.tokens_this_minute("tester").await, prompt + completion);
    let want = (prompt as f64, completion as f64);
    eventually("the cut stream's tokens in the metrics", || async {
        let seen = (
            tokens(&gw, backend, "prompt", true).await?,
            tokens(&gw, backend, "completion", true).await?,
        );
        (seen == want).then_some(())
    })
    .await;
    gw.stop().await;
}

#[tokio::test]
async fn cached_and_reasoning_tokens_are_counted_apart() {
    let backend = "details";
    let (_sim, gw) = start(backend, LIMITS, |mut c| {
        c.deployments[0].reasoning = true;
        c.prompt_cache(true)
    })
    .await;
    let long = "gateway ".repeat(1100);
    let body = json!({"messages": [{"role": "user", "content": long}], "max_tokens": 50});
    let (mut cached, mut reasoning, mut prompt) = (0, 0, 0);
    for _ in 0..2 {
        let res = gw.chat("gpt-4o", &body).await;
        assert_eq!(res.status(), 200);
        let v: Value = res.json().await.unwrap();
        let usage = &v["usage"];
        cached += usage["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap();
        reasoning += usage["completion_tokens_details"]["reasoning_tokens"]
            .as_u64()
            .unwrap();
        prompt += usage["prompt_tokens"].as_u64().unwrap();
    }
    // The second call found the first one's prompt cached.
    assert!(cached >= 1024 && reasoning > 0, "{cached} {reasoning}");
    let want = (cached as f64, reasoning as f64, prompt as f64);
    eventually("cached and reasoning tokens in the metrics", || async {
        let seen = (
            tokens(&gw, backend, "cached_prompt", false).await?,
            tokens(&gw, backend, "reasoning", false).await?,
            tokens(&gw, backend, "prompt", false).await?,
        );
        (seen == want).then_some(())
    })
    .await;
    gw.stop().await;
}

#[tokio::test]
async fn priority_traffic_served_at_standard_shows_in_the_metrics() {
    let backend = "tiers";
    let (_sim, gw) = start(backend, "", |c| c.priority_as_default(true)).await;
    let mut body = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 20,
        "service_tier": "priority"});
    let res = gw.chat("gpt-4o", &body).await;
    assert_eq!(res.status(), 200);
    let v: Value = res.json().await.unwrap();
    assert_eq!(
        v["service_tier"], "default",
        "passed through as the region said"
    );
    body["stream"] = json!(true);
    let text = read_stream(gw.chat("gpt-4o", &body).await).await;
    assert!(
        chunks(&text)
            .iter()
            .all(|c| c["id"] == "" || c["service_tier"] == "default")
    );
    gw.stream_let_go().await;
    let labels = [
        ("deployment", "gpt-4o"),
        ("requested", "priority"),
        ("served", "default"),
    ];
    eventually("priority served at default, counted", || async {
        (metric(&gw, "gateway_service_tier_total", &labels).await? == 2.0).then_some(())
    })
    .await;
    gw.stop().await;
}
