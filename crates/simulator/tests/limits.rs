//! TPM and RPM limits over real HTTP.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use reqwest::StatusCode;
use reqwest::header::HeaderMap;
use serde_json::json;
use simulator::{DeploymentConfig, RegionConfig};

fn limited(tpm: u64, rpm: u64) -> RegionConfig {
    RegionConfig::new("Sweden Central", KEY)
        .deployment(DeploymentConfig::chat("gpt-4o", tpm).rpm(rpm))
        .deployment(
            DeploymentConfig::embeddings("embed", tpm)
                .rpm(rpm)
                .dimensions(8),
        )
}

fn request(max_tokens: u64) -> serde_json::Value {
    let mut body = user("hello");
    body["max_tokens"] = json!(max_tokens);
    body
}

fn estimate(max_tokens: u64) -> u64 {
    expected_prompt_tokens(&[("user", "hello")]) + max_tokens
}

/// retry-after, retry-after-ms and the reset headers, checked for consistency.
fn check_retry_headers(headers: &HeaderMap, window_secs: u64) -> u64 {
    let secs = header_u64(headers, "retry-after");
    let ms = header_u64(headers, "retry-after-ms");
    assert!(secs >= 1);
    assert!(ms >= 1 && ms <= window_secs * 1000, "{ms}");
    assert_eq!(
        secs,
        ms.div_ceil(1000).max(1),
        "retry-after {secs} vs retry-after-ms {ms}"
    );
    let reset_tokens = header_u64(headers, "x-ratelimit-reset-tokens");
    let reset_requests = header_u64(headers, "x-ratelimit-reset-requests");
    assert!((1..=60).contains(&reset_tokens));
    assert!((1..=10).contains(&reset_requests));
    secs
}

#[tokio::test]
async fn token_limit_breach() {
    let s = start(limited(1000, 6000)).await;
    let cost = estimate(300);
    let mut remaining = 1000;
    let mut admitted = 0;
    // Bounded: at most 1000 / cost requests can fit.
    loop {
        let (status, headers, v) = s.chat(&request(300)).await;
        if status == StatusCode::TOO_MANY_REQUESTS {
            let message = v["error"]["message"].as_str().unwrap();
            assert_eq!(v["error"]["code"], "429");
            assert!(message.contains("token rate limit"), "{message}");
            assert!(message.starts_with(&format!(
                "Requests to the ChatCompletions_Create Operation under Azure OpenAI API version {API_VERSION} have exceeded"
            )), "{message}");
            let secs = check_retry_headers(&headers, 60);
            assert!(
                message.contains(&format!("Please retry after {secs} seconds")),
                "{message}"
            );
            // A rejection consumes nothing, and says so.
            assert_eq!(
                header_u64(&headers, "x-ratelimit-remaining-tokens"),
                remaining
            );
            assert_eq!(header(&headers, "x-ms-region"), "Sweden Central");
            break;
        }
        assert_eq!(status, StatusCode::OK, "{v}");
        admitted += 1;
        assert!(
            admitted <= 1000 / cost,
            "admitted more than the limit allows"
        );
        let now = header_u64(&headers, "x-ratelimit-remaining-tokens");
        assert_eq!(
            now,
            remaining - cost,
            "remaining tokens drop by the estimate"
        );
        remaining = now;
    }
    assert_eq!(admitted, 1000 / cost);

    // Something small still fits in what is left.
    let (status, headers, _) = s.chat(&request(1)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        header_u64(&headers, "x-ratelimit-remaining-tokens"),
        remaining - estimate(1)
    );

    // Embeddings have their own operation name.
    let path = format!("/openai/deployments/embed/embeddings?api-version={API_VERSION}");
    let big = "word ".repeat(1200);
    let (status, headers, v) = s.call(&path, &json!({"input": big})).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Embeddings_Create")
    );
    // An empty window: the whole minute.
    assert_eq!(header_u64(&headers, "retry-after"), 60);

    // Reset over HTTP empties the windows.
    let reset = s
        .client
        .post(format!("{}/sim/reset", s.url))
        .send()
        .await
        .unwrap();
    assert!(reset.status().is_success());
    let (status, headers, _) = s.chat(&request(300)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        header_u64(&headers, "x-ratelimit-remaining-tokens"),
        1000 - cost
    );
    s.region.shutdown().await;
}

#[tokio::test]
async fn request_limit_breach() {
    // 30 RPM: 5 requests per 10-second window.
    let s = start(limited(1_000_000, 30)).await;
    for expected in (0..5).rev() {
        let (status, headers, _) = s.chat(&request(1)).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            header_u64(&headers, "x-ratelimit-remaining-requests"),
            expected
        );
        assert_eq!(header_u64(&headers, "x-ratelimit-limit-requests"), 30);
    }
    let (status, headers, v) = s.chat(&request(1)).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    let message = v["error"]["message"].as_str().unwrap();
    assert!(message.contains("call rate limit"), "{message}");
    assert!(message.contains("ChatCompletions_Create"), "{message}");
    let secs = check_retry_headers(&headers, 10);
    assert!(secs <= 10);
    assert_eq!(header_u64(&headers, "x-ratelimit-remaining-requests"), 0);

    // The handle resets too; other deployments have their own windows.
    let path = format!("/openai/deployments/embed/embeddings?api-version={API_VERSION}");
    let (status, _, _) = s.call(&path, &json!({"input": "x"})).await;
    assert_eq!(status, StatusCode::OK);
    s.sim.reset_limits();
    let (status, headers, _) = s.chat(&request(1)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(header_u64(&headers, "x-ratelimit-remaining-requests"), 4);
    s.region.shutdown().await;
}

#[tokio::test]
async fn default_estimate_is_sixteen_per_choice() {
    let s = start(limited(100_000, 6000)).await;
    let mut body = user("hello");
    body["n"] = json!(3);
    let (status, headers, _) = s.chat(&body).await;
    assert_eq!(status, StatusCode::OK);
    let expected = 100_000 - expected_prompt_tokens(&[("user", "hello")]) - 16 * 3;
    assert_eq!(
        header_u64(&headers, "x-ratelimit-remaining-tokens"),
        expected
    );

    let stats = s.get_json("/sim/stats").await;
    assert_eq!(
        stats["deployments"]["gpt-4o"]["window"]["tokens_used"],
        100_000 - expected
    );
    assert_eq!(stats["deployments"]["gpt-4o"]["window"]["requests_used"], 1);
    s.region.shutdown().await;
}
