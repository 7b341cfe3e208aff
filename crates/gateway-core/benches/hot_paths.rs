//! Micro-benchmarks of the engine's per-request work: `cargo bench -p gateway-core --bench hot_paths`.
//!
//! Each one is a piece every request (or every streamed frame) goes through: parsing the body once
//! into a [`RequestJson`], choosing a backend among 3 and 100, reading Azure's throttling and
//! remaining-quota headers, estimating a small and a ~4,000-token prompt with the tokenizer, and
//! reading the usage out of SSE frames. No assertion depends on timing; a broken input panics, so a
//! benchmark cannot silently measure an error path.
#![allow(missing_docs)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::{Instant, SystemTime};

use criterion::{Criterion, criterion_group, criterion_main};
use gateway_core::operation::Operation;
use gateway_core::pool::{Backend, BackendPool, PoolSettings, Selection};
use gateway_core::request::RequestJson;
use gateway_core::retry_after::{cooldown_hint, parse_remaining};
use gateway_core::tokens::{Encoding, estimate, usage_from_sse_data};

/// A typical chat body: system and user messages, a limit, streaming options.
fn chat_body(pad_sentences: usize) -> Vec<u8> {
    let pad =
        " The quick brown fox jumps over the lazy dog by the river bank.".repeat(pad_sentences);
    format!(
        r#"{{"messages":[{{"role":"system","content":"You are a helpful assistant."}},{{"role":"user","content":"Say hello in five words.{pad}"}}],"max_tokens":16,"temperature":0.7,"stream":false}}"#
    )
    .into_bytes()
}

fn context_capture(c: &mut Criterion) {
    let body = chat_body(0);
    assert!(RequestJson::parse(&body).is_ok());
    c.bench_function("request_json_parse/chat_small", |b| {
        b.iter(|| RequestJson::parse(black_box(&body)))
    });
}

fn pool(n: usize) -> BackendPool {
    let backends = (0..n)
        .map(|i| Backend {
            name: format!("backend-{i}"),
            region: "Sweden Central".to_owned(),
            endpoint: format!("https://aoai-{i}.openai.azure.com"),
            priority: 1 + (i % 3) as u32,
            weight: 1,
            deployments: BTreeMap::from([("gpt-4o".to_owned(), format!("gpt-4o-{i}"))]),
            credential: None,
        })
        .collect();
    BackendPool::new(backends, PoolSettings::default())
}

fn selection(c: &mut Criterion) {
    for n in [3, 100] {
        let pool = pool(n);
        let now = Instant::now();
        assert!(matches!(
            pool.select("gpt-4o", &[], now),
            Selection::Backend(_)
        ));
        c.bench_function(&format!("select/{n}_backends"), |b| {
            b.iter(|| pool.select(black_box("gpt-4o"), &[], now))
        });
    }
}

fn headers(c: &mut Criterion) {
    let now = SystemTime::now();
    let throttled = [("retry-after-ms", "-1"), ("retry-after", "6")];
    let lookup = |name: &str| throttled.iter().find(|(n, _)| *n == name).map(|(_, v)| *v);
    assert!(cooldown_hint(lookup, now).is_some());
    c.bench_function("retry_after/cooldown_hint", |b| {
        b.iter(|| cooldown_hint(black_box(lookup), now))
    });
    let reset = [("x-ratelimit-reset-requests", "1m30.5s")];
    let lookup = |name: &str| reset.iter().find(|(n, _)| *n == name).map(|(_, v)| *v);
    assert!(cooldown_hint(lookup, now).is_some());
    c.bench_function("retry_after/reset_duration", |b| {
        b.iter(|| cooldown_hint(black_box(lookup), now))
    });
    assert_eq!(parse_remaining("149984"), Some(149_984));
    c.bench_function("ratelimit/parse_remaining", |b| {
        b.iter(|| parse_remaining(black_box("149984")))
    });
}

fn token_estimation(c: &mut Criterion) {
    Encoding::O200k.warm_up();
    // ~25 tokens, and ~4,000 (285 sentences of ~14 tokens).
    for (name, pad) in [("small", 0), ("4000_tokens", 285)] {
        let body = chat_body(pad);
        let e = estimate(Operation::ChatCompletions, "gpt-4o", &body, 16);
        assert!(e.prompt > 0);
        c.bench_function(&format!("estimate/{name}"), |b| {
            b.iter(|| estimate(Operation::ChatCompletions, "gpt-4o", black_box(&body), 16))
        });
    }
}

fn sse_usage(c: &mut Criterion) {
    let usage = r#"{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"gpt-4o","choices":[],"usage":{"prompt_tokens":25,"completion_tokens":16,"total_tokens":41}}"#;
    let content = r#"{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"gpt-4o","choices":[{"index":0,"delta":{"content":"Hello"},"finish_reason":null}]}"#;
    assert!(usage_from_sse_data(usage).is_some());
    assert!(usage_from_sse_data(content).is_none());
    c.bench_function("sse_usage/usage_chunk", |b| {
        b.iter(|| usage_from_sse_data(black_box(usage)))
    });
    c.bench_function("sse_usage/content_chunk", |b| {
        b.iter(|| usage_from_sse_data(black_box(content)))
    });
}

criterion_group!(
    hot_paths,
    context_capture,
    selection,
    headers,
    token_estimation,
    sse_usage
);
criterion_main!(hot_paths);
