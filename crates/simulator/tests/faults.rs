//! Fault injection and the admin API over real HTTP.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use reqwest::StatusCode;
use serde_json::json;
use simulator::{Fault, FaultKind};

#[tokio::test]
async fn status_faults_with_count() {
    let s = start(config()).await;
    s.sim.set_faults(vec![Fault::status(500).count(2)]);
    for _ in 0..2 {
        let (status, headers, v) = s.chat(&user("hi")).await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(v["error"]["code"], "InternalServerError");
        assert_eq!(header(&headers, "x-ms-region"), "Sweden Central");
        assert_eq!(header(&headers, "x-ms-deployment-name"), "gpt-4o");
        assert!(headers.get("retry-after").is_none());
    }
    let (status, _, _) = s.chat(&user("hi")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(s.sim.faults().is_empty(), "the fault expired");

    s.sim
        .set_faults(vec![Fault::status_with_retry_after(503, 2500).count(1)]);
    let (status, headers, v) = s.chat(&user("hi")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(v["error"]["code"], "ServiceUnavailable");
    assert_eq!(header_u64(&headers, "retry-after"), 3);
    assert_eq!(header_u64(&headers, "retry-after-ms"), 2500);

    s.sim.set_faults(vec![Fault::status(429).count(1)]);
    let (status, headers, v) = s.chat(&user("hi")).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(v["error"]["code"], "429");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("rate limit")
    );
    assert_eq!(header_u64(&headers, "retry-after"), 1);
    assert_eq!(header_u64(&headers, "retry-after-ms"), 1000);

    // Faults come before auth and limits, and 429s from faults consume nothing.
    s.sim.set_faults(vec![Fault::status(503)]);
    let response = s
        .client
        .post(format!("{}{}", s.url, chat_path("gpt-4o")))
        .header("api-key", "wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    s.sim.clear_faults();
    let (status, _, _) = s.chat(&user("hi")).await;
    assert_eq!(status, StatusCode::OK);
    s.region.shutdown().await;
}

#[tokio::test]
async fn percent_is_deterministic_and_deployment_filter_works() {
    let s = start(config()).await;
    let run = || async {
        s.sim.set_faults(vec![Fault::status(503).percent(50.0)]);
        let mut statuses = Vec::new();
        for _ in 0..40 {
            statuses.push(s.chat(&user("hi")).await.0.as_u16());
        }
        statuses
    };
    let first = run().await;
    let second = run().await;
    assert_eq!(first, second, "the same seed gives the same sequence");
    let failed = first.iter().filter(|s| **s == 503).count();
    assert!((5..=35).contains(&failed), "{failed} of 40 failed");
    assert!(first.iter().all(|s| *s == 503 || *s == 200));

    // Only the embeddings deployment is affected.
    s.sim
        .set_faults(vec![Fault::status(500).deployment("embed")]);
    let (status, _, _) = s.chat(&user("hi")).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _, _) = s
        .call(
            "/openai/v1/embeddings",
            &json!({"model": "embed", "input": "x"}),
        )
        .await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    s.region.shutdown().await;
}

#[tokio::test]
async fn start_up_faults_from_config() {
    let s = start(config().fault(Fault::status(502).count(1))).await;
    let (status, _, _) = s.chat(&user("hi")).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    let (status, _, _) = s.chat(&user("hi")).await;
    assert_eq!(status, StatusCode::OK);
    s.region.shutdown().await;
}

#[tokio::test]
async fn drop_closes_the_connection_without_an_answer() {
    let s = start(config()).await;
    s.sim.set_faults(vec![Fault::drop_connection().count(1)]);
    let result = s
        .try_post(&s.client, &chat_path("gpt-4o"), &user("hi"))
        .await;
    let error = result.expect_err("a dropped connection cannot answer");
    assert!(!error.is_timeout(), "{error:?}");
    assert!(error.is_request() || error.is_connect(), "{error:?}");
    // The region still serves new connections.
    let (status, _, _) = s.chat(&user("hi")).await;
    assert_eq!(status, StatusCode::OK);
    let recent = s.sim.recent_requests();
    assert_eq!(recent[0].status, 0);
    assert_eq!(recent[1].status, 200);
    // Counted apart, so a client's connection errors can be matched against the region's count.
    assert_eq!((s.sim.request_count(), s.sim.dropped_count()), (2, 1));
    assert_eq!(s.sim.stats()["dropped_count"], 1);
    s.region.shutdown().await;
}

#[tokio::test]
async fn hang_never_answers() {
    let s = start(config()).await;
    s.sim.set_faults(vec![Fault::hang().count(1)]);
    let (path, body) = (chat_path("gpt-4o"), user("hi"));
    let mut hung = Box::pin(s.try_post(&s.client, &path, &body));
    // Until the region holds the request, a call still pending proves nothing: wait for that
    // (bounded) while the call runs, and it must not answer meanwhile.
    let arrived = async {
        let deadline = Instant::now() + Duration::from_secs(10);
        while s.sim.request_count() == 0 {
            assert!(Instant::now() < deadline, "the request never arrived");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::select! {
        answer = &mut hung => panic!("a hung request cannot answer: {answer:?}"),
        () = arrived => {}
    }
    // From then on, no answer comes, however long one waits; 300 ms stand for that.
    let more = tokio::time::timeout(Duration::from_millis(300), &mut hung).await;
    assert!(more.is_err(), "a hung request cannot answer: {more:?}");
    drop(hung);
    assert_eq!(s.sim.request_count(), 1);
    let (status, _, _) = s.chat(&user("hi")).await;
    assert_eq!(status, StatusCode::OK);
    s.region.shutdown().await;
}

#[tokio::test]
async fn delay_first_byte_then_normal_answer() {
    let s = start(config()).await;
    s.sim
        .set_faults(vec![Fault::delay_first_byte(200).count(1)]);
    let started = Instant::now();
    let (status, _, v) = s.chat(&user("hi")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v["object"], "chat.completion");
    // A sleep never ends early.
    assert!(started.elapsed() >= Duration::from_millis(200));
    s.region.shutdown().await;
}

#[tokio::test]
async fn abort_stream_breaks_the_body() {
    let s = start(config()).await;
    let mut body = user("hi");
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});

    s.sim.set_faults(vec![Fault::abort_stream(3).count(1)]);
    let response = s.post(&chat_path("gpt-4o"), &body).await;
    assert_eq!(response.status(), StatusCode::OK);
    let (events, error) = read_sse(response).await;
    let error = error.expect("the body must end with an error, not cleanly");
    assert!(
        error.is_body() || error.is_decode() || error.is_request(),
        "{error:?}"
    );
    assert!(!events.iter().any(|e| e == "[DONE]"));
    assert_eq!(events.len(), 3, "{events:?}");

    // The fault expired: the next stream is complete.
    let (events, error) = read_sse(s.post(&chat_path("gpt-4o"), &body).await).await;
    assert!(error.is_none());
    assert_eq!(events.last().unwrap(), "[DONE]");

    // With a token delay the frames are paced, and the abort still breaks the body.
    let slow = start(config().token_delay(Duration::from_millis(5))).await;
    slow.sim.set_faults(vec![Fault::abort_stream(4)]);
    let (events, error) = read_sse(slow.post(&chat_path("gpt-4o"), &body).await).await;
    assert!(error.is_some());
    assert_eq!(events.len(), 4);
    slow.region.shutdown().await;

    // A non-streaming answer is cut short.
    s.sim.set_faults(vec![Fault::abort_stream(1).count(1)]);
    let response = s.post(&chat_path("gpt-4o"), &user("hi")).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.bytes().await.is_err());
    s.region.shutdown().await;
}

#[tokio::test]
async fn admin_api() {
    let s = start(config()).await;
    let admin = |path: &str| format!("{}/sim/{path}", s.url);

    // One fault.
    let response = s
        .client
        .post(admin("faults"))
        .body(r#"{"kind":"status","status":503,"percent":100,"retry_after_ms":2000,"count":null}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        s.sim.faults(),
        vec![Fault::status_with_retry_after(503, 2000).percent(100.0)]
    );
    let (status, headers, _) = s.chat(&user("hi")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(header_u64(&headers, "retry-after-ms"), 2000);

    // An array replaces.
    let response = s
        .client
        .post(admin("faults"))
        .body(r#"[{"kind":"drop","deployment":"other"},{"kind":"abort_stream","after_chunks":3,"count":2},{"kind":"delay_first_byte","delay_ms":1},{"kind":"hang","percent":0}]"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let listed = s.get_json("/sim/faults").await;
    assert_eq!(listed["faults"].as_array().unwrap().len(), 4);
    assert_eq!(
        listed["faults"][1],
        json!({"kind": "abort_stream", "after_chunks": 3, "count": 2})
    );
    assert!(matches!(s.sim.faults()[0].kind, FaultKind::Drop));

    // Invalid faults are refused and change nothing.
    for bad in [
        r#"{"kind":"explode"}"#,
        r#"{"kind":"status","status":42}"#,
        "nope",
    ] {
        let response = s
            .client
            .post(admin("faults"))
            .body(bad)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{bad}");
    }
    assert_eq!(s.sim.faults().len(), 4);

    // Delete.
    let response = s.client.delete(admin("faults")).send().await.unwrap();
    assert!(response.status().is_success());
    assert!(s.sim.faults().is_empty());

    // Stats.
    s.chat(&user("hi")).await;
    let stats = s.get_json("/sim/stats").await;
    assert_eq!(stats["region"], "Sweden Central");
    assert_eq!(stats["request_count"], 2);
    assert_eq!(stats["request_count"], s.sim.request_count());
    let window = &stats["deployments"]["gpt-4o"]["window"];
    assert_eq!(window["requests_used"], 1);
    assert_eq!(
        window["tokens_used"],
        expected_prompt_tokens(&[("user", "hi")]) + 16
    );
    assert_eq!(window["tokens_limit"], 1_000_000);
    assert_eq!(stats["deployments"]["embed"]["window"]["tokens_used"], 0);

    // Reset.
    let response = s.client.post(admin("reset")).send().await.unwrap();
    assert!(response.status().is_success());
    assert_eq!(
        s.sim.stats()["deployments"]["gpt-4o"]["window"]["tokens_used"],
        0
    );

    // Anything else is Azure's 404.
    let response = s.client.get(admin("nothing")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    s.region.shutdown().await;
}
