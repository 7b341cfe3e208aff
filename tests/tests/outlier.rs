//! The circuit breaker against real simulated regions: a few failures among many answers never take
//! a region out (finding 1 of issue 11: 5% of 503s on every region used to turn into an outage).
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use futures_util::StreamExt;
use gateway_core::pool::BackendState;
use gateway_e2e::*;
use serde_json::{Value, json};
use simulator::{Fault, RunningRegion};

fn fault(v: Value) -> Fault {
    serde_json::from_value(v).unwrap()
}

/// Three regions serving `gpt-4o` as `m`, A first, each with `faults`.
async fn three_faulty_regions(faults: Value) -> (Vec<RunningRegion>, Gateway) {
    let mut regions = Vec::new();
    for name in ["Region A", "Region B", "Region C"] {
        let faults = vec![fault(faults.clone())];
        // No generation delay: the test is about the breaker, not about waiting.
        let region = region_with(name, &[("m", 100_000_000)], |mut c| {
            c.token_delay = Duration::ZERO;
            c.faults = faults;
            c
        })
        .await;
        regions.push(region);
    }
    let backends: Vec<String> = regions
        .iter()
        .zip(["a", "b", "c"])
        .enumerate()
        .map(|(i, (sim, name))| {
            let region = format!("Region {}", name.to_uppercase());
            backend_toml(name, sim, &region, i as u32 + 1, 1, &[("gpt-4o", "m")])
        })
        .collect();
    let gw = gateway(
        &policy(&["gpt-4o"], &backends, ""),
        &["Region A", "Region B", "Region C"],
    )
    .await;
    (regions, gw)
}

/// One client for many calls: building one per call costs more than the call.
async fn post(client: &reqwest::Client, gw: &Gateway, body: &Value) -> reqwest::Response {
    client
        .post(gw.chat_url("gpt-4o"))
        .header("api-key", CLIENT_KEY)
        .json(body)
        .send()
        .await
        .unwrap()
}

fn states(gw: &Gateway) -> Vec<BackendState> {
    gw.pool
        .snapshot(std::time::Instant::now())
        .into_iter()
        .map(|b| b.state)
        .collect()
}

#[tokio::test]
async fn five_percent_503s_on_every_region_keep_availability_above_99_percent() {
    let (regions, gw) =
        three_faulty_regions(json!({"kind": "status", "status": 503, "percent": 5})).await;
    let n = 1_000;
    let body = chat("hi");
    let client = client();
    let mut pending = futures_util::stream::iter(0..n)
        .map(|_| post(&client, &gw, &body))
        .buffer_unordered(16);
    let mut served = 0;
    while let Some(res) = pending.next().await {
        if res.status() == 200 {
            served += 1;
        }
    }
    drop(pending);
    assert!(served * 100 > n * 99, "{served} of {n} served");
    assert_eq!(states(&gw), [BackendState::Available; 3]);
    assert_eq!(gw.pool.panic_selections(), 0);
    // Region A took every request first: it was never ejected.
    assert_eq!(regions[0].handle().request_count(), n as u64);
    gw.stop().await;
}

#[tokio::test]
async fn five_percent_broken_streams_never_eject_a_region() {
    let (regions, gw) =
        three_faulty_regions(json!({"kind": "abort_stream", "after_chunks": 1, "percent": 5}))
            .await;
    let n = 300;
    let body =
        json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "stream": true});
    let client = client();
    let mut pending = futures_util::stream::iter(0..n)
        .map(|_| async {
            let res = post(&client, &gw, &body).await;
            let served_by = res
                .headers()
                .get("x-served-by")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            let text = res.text().await.unwrap_or_default();
            (served_by, text.contains("data: [DONE]"))
        })
        .buffer_unordered(16);
    let mut complete = 0;
    while let Some((served_by, done)) = pending.next().await {
        assert_eq!(served_by, "a (Region A)");
        complete += usize::from(done);
    }
    drop(pending);
    assert!(
        complete * 100 > n * 85,
        "{complete} of {n} streams complete"
    );
    assert!(complete < n, "the fault broke some streams");
    assert_eq!(states(&gw), [BackendState::Available; 3]);
    assert_eq!(regions[1].handle().request_count(), 0);
    gw.stop().await;
}

#[tokio::test]
async fn readiness_ignores_backends_and_backend_health_reports_them() {
    let (regions, gw) = three_faulty_regions(json!({"kind": "drop"})).await;
    let client = client();
    let get = |path: &'static str| {
        let client = client.clone();
        let url = gw.url(path);
        async move { client.get(url).send().await.unwrap() }
    };
    let res = get("/healthz/backends").await;
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    assert_eq!(
        body,
        json!({"status": "ok", "deployments": [{"name": "gpt-4o", "backends": 3, "available": 3}]})
    );

    // Every region drops every connection: after five calls all three are ejected.
    for _ in 0..5 {
        assert_eq!(post(&client, &gw, &chat("hi")).await.status(), 502);
    }
    assert_eq!(states(&gw), [BackendState::CircuitOpen; 3]);
    assert!(regions.iter().all(|r| r.handle().request_count() == 5));

    // The gateway itself is fine: an orchestrator must not pull it.
    let res = get("/readyz").await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.text().await.unwrap(), "ready");
    // A global load balancer should send the traffic to another region's gateway.
    let res = get("/healthz/backends").await;
    assert_eq!(res.status(), 503);
    assert_eq!(res.headers()["cache-control"], "no-store");
    let text = res.text().await.unwrap();
    let body: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        body,
        json!({"status": "unavailable", "deployments": [{"name": "gpt-4o", "backends": 3, "available": 0}]})
    );
    // Logical names only: no backend, URL or backend deployment name.
    for secret in ["\"a\"", "Region", "127.0.0.1", "\"m\""] {
        assert!(!text.contains(secret), "{text}");
    }

    // Every backend ejected: the next call still tries them (panic mode), and it is counted.
    assert_eq!(post(&client, &gw, &chat("hi")).await.status(), 502);
    assert_eq!(regions[0].handle().request_count(), 6);
    assert_eq!(gw.pool.panic_selections(), 3);
    let metrics = get("/metrics").await.text().await.unwrap();
    let panics: f64 = metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix("gateway_panic_selections_total ")?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("{metrics}"));
    assert!(panics >= 3.0, "{metrics}");
    gw.stop().await;
}
