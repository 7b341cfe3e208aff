//! Routing state per (backend, deployment), as Azure keeps it (issue 9): a throttle rests one
//! deployment of a region, never the region's others. Routing is proven by counting the calls each
//! simulated region received, per deployment.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use gateway_e2e::*;
use serde_json::json;
use simulator::{Fault, RunningRegion};

/// Calls `region` received for its own deployment `own`, by status.
fn calls(region: &RunningRegion, own: &str) -> Vec<u16> {
    let path = format!("/openai/deployments/{own}/");
    region
        .handle()
        .recent_requests()
        .into_iter()
        .filter(|r| r.path.starts_with(&path))
        .map(|r| r.status)
        .collect()
}

#[tokio::test]
async fn a_429_on_one_deployment_leaves_the_backends_other_deployments_in_use() {
    // Sweden serves chat and embeddings; East US 2 is the fallback for both.
    let sweden = region(
        "Sweden Central",
        &[("chat-swc", 1_000_000), ("embedding-swc", 1_000_000)],
    )
    .await;
    let eastus = region(
        "East US 2",
        &[("chat-eus", 1_000_000), ("embedding-eus", 1_000_000)],
    )
    .await;
    // Sweden's chat deployment is throttled for a minute; its embeddings deployment is not.
    sweden.handle().set_faults(vec![
        Fault::status_with_retry_after(429, 60_000).deployment("chat-swc"),
    ]);
    let map = |region: &str| {
        [
            ("gpt-4o", format!("chat-{region}")),
            ("embeddings", format!("embedding-{region}")),
        ]
    };
    let backend = |name, sim, region, priority, map: [(&str, String); 2]| {
        let map: Vec<(&str, &str)> = map.iter().map(|(l, o)| (*l, o.as_str())).collect();
        backend_toml(name, sim, region, priority, 1, &map)
    };
    let backends = [
        backend("swc", &sweden, "Sweden Central", 1, map("swc")),
        backend("eus", &eastus, "East US 2", 2, map("eus")),
    ];
    let gw = gateway(
        &policy(&["gpt-4o", "embeddings"], &backends, ""),
        &["Sweden Central", "East US 2"],
    )
    .await;

    // The first chat call meets the 429 and fails over; the second goes to East US 2 directly.
    for attempts in ["2", "1"] {
        let res = gw.chat("gpt-4o", &chat("hi")).await;
        assert_eq!(res.status(), 200);
        assert_eq!(res.headers()["x-served-by"], "eus (East US 2)");
        assert_eq!(res.headers()["x-gateway-attempts"], attempts);
    }
    // Embeddings stay in Sweden: its embeddings deployment was never throttled.
    for _ in 0..3 {
        let res = client()
            .post(gw.url("/openai/deployments/embeddings/embeddings?api-version=2024-10-21"))
            .header("api-key", CLIENT_KEY)
            .json(&json!({"input": "hello"}))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(res.headers()["x-served-by"], "swc (Sweden Central)");
        assert_eq!(res.headers()["x-gateway-attempts"], "1");
    }
    assert_eq!(calls(&sweden, "chat-swc"), [429]);
    assert_eq!(calls(&sweden, "embedding-swc"), [200, 200, 200]);
    assert_eq!(calls(&eastus, "chat-eus"), [200, 200]);
    assert!(calls(&eastus, "embedding-eus").is_empty());

    // The status page names the resting deployment by the backend's own name.
    let status = gw.status().await;
    let swc = &status["backends"][0];
    assert_eq!(swc["state"], "cooling_down", "{swc}");
    assert_eq!(swc["resting"][0]["deployment"], "chat-swc", "{swc}");
    assert_eq!(swc["resting"][0]["reason"], "throttled", "{swc}");
    gw.stop().await;
}

/// `[[consumers]]` for the workload `claims-bot`, whose key is that of the pseudo-region `Claims`
/// (the test gateway resolves region keys only).
const CLAIMS_BOT: &str = "[[consumers]]\nname = \"claims-bot\"\nkeys = [\"env:KEY_CLAIMS\"]\n";

async fn chat_as(gw: &Gateway, key: &str) -> reqwest::Response {
    client()
        .post(gw.chat_url("gpt-4o"))
        .header("api-key", key)
        .json(&chat("hi"))
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_reserved_backend_is_never_used_by_another_consumer() {
    let ptu = region("Claims PTU", &[("m", 1_000_000)]).await;
    let pool = region("Pool", &[("m", 1_000_000)]).await;
    let mut reserved = backend_toml("claims-ptu", &ptu, "Claims PTU", 1, 1, &[("gpt-4o", "m")]);
    reserved = reserved.replace(
        "[backends.deployments]",
        "reserved_for = [\"claims-bot\"]\n[backends.deployments]",
    );
    let backends = [
        reserved,
        backend_toml("pool", &pool, "Pool", 2, 1, &[("gpt-4o", "m")]),
    ];
    let gw = gateway(
        &policy(&["gpt-4o"], &backends, CLAIMS_BOT),
        &["Claims PTU", "Pool", "Claims"],
    )
    .await;
    let claims_key = backend_key("Claims");

    // The workload is served by its own PTU; everyone else by the pool, at the first attempt.
    let res = chat_as(&gw, &claims_key).await;
    assert_eq!(res.headers()["x-served-by"], "claims-ptu (Claims PTU)");
    for _ in 0..3 {
        let res = chat_as(&gw, CLIENT_KEY).await;
        assert_eq!(res.status(), 200);
        assert_eq!(res.headers()["x-served-by"], "pool (Pool)");
        assert_eq!(res.headers()["x-gateway-attempts"], "1");
    }
    assert_eq!(ptu.handle().request_count(), 1);
    assert_eq!(pool.handle().request_count(), 3);

    // The PTU throttles briefly: the workload fails over to the pool, its next tier.
    ptu.handle()
        .set_faults(vec![Fault::status_with_retry_after(429, 2_000)]);
    let res = chat_as(&gw, &claims_key).await;
    assert_eq!(res.headers()["x-served-by"], "pool (Pool)");
    assert_eq!(res.headers()["x-gateway-attempts"], "2");

    // The pool throttles for longer. The other consumer is told the pool's wait, not the reserved
    // PTU's shorter one, which is none of its business.
    pool.handle()
        .set_faults(vec![Fault::status_with_retry_after(429, 30_000)]);
    let res = chat_as(&gw, CLIENT_KEY).await;
    assert_eq!(res.status(), 429);
    assert_eq!(res.headers()["x-gateway-throttled"], "true");
    let wait: u64 = res.headers()["retry-after-ms"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(wait > 2_000, "the reserved PTU's hint leaked: {wait} ms");
    assert_eq!(res.headers()["x-gateway-attempts"], "1");
    // Still only the workload's two calls ever reached its PTU.
    assert_eq!(ptu.handle().request_count(), 2);
    gw.stop().await;
}

#[tokio::test]
async fn a_backend_refusing_the_gateways_key_is_misconfigured_and_rests() {
    let a = region("Region A", &[("m", 1_000_000)]).await;
    let b = region("Region B", &[("m", 1_000_000)]).await;
    // A is given the key of another region: it answers 401.
    let wrong = backend_toml("a", &a, "Region A", 1, 1, &[("gpt-4o", "m")])
        .replace("env:KEY_REGION_A", "env:KEY_ELSEWHERE");
    let backends = [
        wrong,
        backend_toml("b", &b, "Region B", 2, 1, &[("gpt-4o", "m")]),
    ];
    let gw = gateway(
        &policy(&["gpt-4o"], &backends, ""),
        &["Region A", "Region B", "Elsewhere"],
    )
    .await;

    // The first call meets the 401 and fails over; the next ones skip A altogether.
    for attempts in ["2", "1", "1"] {
        let res = gw.chat("gpt-4o", &chat("hi")).await;
        assert_eq!(res.status(), 200);
        assert_eq!(res.headers()["x-served-by"], "b (Region B)");
        assert_eq!(res.headers()["x-gateway-attempts"], attempts);
    }
    assert_eq!(a.handle().request_count(), 1);
    assert_eq!(a.handle().recent_requests()[0].status, 401);

    let status = gw.status().await;
    assert_eq!(status["backends"][0]["state"], "misconfigured", "{status}");
    let metrics = client()
        .get(gw.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(
            "gateway_backend_state{backend=\"a\",region=\"Region A\",state=\"misconfigured\"} 1"
        ),
        "{metrics}"
    );
    gw.stop().await;
}

#[tokio::test]
async fn a_low_tier_consumer_spills_before_a_critical_one_as_the_pools_headroom_shrinks() {
    // The shared pool takes 10,000 tokens a minute; it keeps its last half from the low tier and
    // its last fifth from the standard tier. Standard is the next group.
    let pool = region("Pool", &[("m", 10_000)]).await;
    let standard = region("Standard", &[("m", 1_000_000)]).await;
    let shared = backend_toml("pool", &pool, "Pool", 1, 1, &[("gpt-4o", "m")]).replace(
        "[backends.deployments]",
        "tpm = 10000\n[backends.headroom]\nlow = 0.5\nstandard = 0.2\n[backends.deployments]",
    );
    let backends = [
        shared,
        backend_toml("std", &standard, "Standard", 2, 1, &[("gpt-4o", "m")]),
    ];
    let batch = "[[consumers]]\nname = \"batch\"\nkeys = [\"env:KEY_BATCH\"]\ntier = \"low\"\n";
    let gw = gateway(
        &policy_with_limits(&["gpt-4o"], &backends, batch, "tier = \"critical\"\n"),
        &["Pool", "Standard", "Batch"],
    )
    .await;
    minute_room(std::time::Duration::from_secs(10)).await;
    let batch_key = backend_key("Batch");
    let big = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1000});
    let served = |res: &reqwest::Response| {
        assert_eq!(res.status(), 200);
        assert_eq!(
            res.headers()["x-gateway-attempts"],
            "1",
            "spilling costs no round trip"
        );
        res.headers()["x-served-by"].to_str().unwrap().to_owned()
    };
    let mut batch_served = Vec::new();
    let mut critical_served = Vec::new();
    for _ in 0..4 {
        for (key, log) in [
            (&batch_key, &mut batch_served),
            (&CLIENT_KEY.to_owned(), &mut critical_served),
        ] {
            let res = client()
                .post(gw.chat_url("gpt-4o"))
                .header("api-key", key.as_str())
                .json(&big)
                .send()
                .await
                .unwrap();
            log.push(served(&res));
        }
    }
    let on_pool = |log: &[String]| log.iter().filter(|s| s.starts_with("pool")).count();
    // The low tier left the pool once half its minute was spent; the critical tier stayed.
    assert!(on_pool(&batch_served) >= 1, "{batch_served:?}");
    assert!(on_pool(&batch_served) < 4, "{batch_served:?}");
    assert_eq!(on_pool(&critical_served), 4, "{critical_served:?}");
    let first_spill = batch_served
        .iter()
        .position(|s| s.starts_with("std"))
        .unwrap();
    assert!(
        batch_served[first_spill..]
            .iter()
            .all(|s| s.starts_with("std")),
        "{batch_served:?}"
    );
    // Counted at the regions: every call went to one region once.
    let batch_on_pool = u64::try_from(on_pool(&batch_served)).unwrap();
    assert_eq!(pool.handle().request_count(), 4 + batch_on_pool);
    assert_eq!(standard.handle().request_count(), 4 - batch_on_pool);

    // The status page and the metrics say when and why.
    let status = gw.status().await;
    let low = &status["backends"][0]["headroom"]["tiers"][1];
    assert_eq!(low["tier"], "low", "{status}");
    assert_eq!(low["spilling"], true, "{status}");
    assert_eq!(
        low["spills"]["remaining_tokens"],
        4 - batch_on_pool,
        "{status}"
    );
    let metrics = client()
        .get(gw.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let line = format!(
        "gateway_spills_total{{backend=\"pool\",tier=\"low\",reason=\"remaining_tokens\"}} {}",
        4 - batch_on_pool
    );
    assert!(metrics.contains(&line), "{metrics}");
    gw.stop().await;
}

/// The `service_tier` each call to `region` carried, in order.
fn tiers_seen(region: &RunningRegion) -> Vec<Option<String>> {
    region
        .handle()
        .recent_requests()
        .iter()
        .map(|r| {
            let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
            body["service_tier"].as_str().map(str::to_owned)
        })
        .collect()
}

#[tokio::test]
async fn flex_falls_back_to_the_default_tier_or_the_next_backend_as_the_policy_says() {
    for (fallback, served_by) in [
        ("default_tier", "a (Region A)"),
        ("next_backend", "b (Region B)"),
    ] {
        // A's Flex capacity is out; its default tier is not.
        let a = region_with("Region A", &[("m", 1_000_000)], |c| c.flex_429(true)).await;
        let b = region("Region B", &[("m", 1_000_000)]).await;
        let backends = [
            backend_toml("a", &a, "Region A", 1, 1, &[("gpt-4o", "m")]),
            backend_toml("b", &b, "Region B", 2, 1, &[("gpt-4o", "m")]),
        ];
        let failover = format!("[failover]\nflex_fallback = \"{fallback}\"\n");
        let gw = gateway(
            &policy(&["gpt-4o"], &backends, &failover),
            &["Region A", "Region B"],
        )
        .await;

        let flex = json!({"messages": [{"role": "user", "content": "hi"}], "service_tier": "flex"});
        let res = gw.chat("gpt-4o", &flex).await;
        assert_eq!(res.status(), 200, "{fallback}");
        assert_eq!(res.headers()["x-served-by"], served_by, "{fallback}");
        assert_eq!(res.headers()["x-gateway-attempts"], "2", "{fallback}");
        let flex_tier = Some("flex".to_owned());
        match fallback {
            "default_tier" => {
                assert_eq!(tiers_seen(&a), [flex_tier, Some("default".to_owned())]);
                assert_eq!(b.handle().request_count(), 0);
            }
            _ => {
                // Passed through unchanged to the next backend.
                assert_eq!(tiers_seen(&a), std::slice::from_ref(&flex_tier));
                assert_eq!(tiers_seen(&b), [flex_tier]);
            }
        }
        // A Flex 429 rests nothing: default-tier traffic still goes to A at the first attempt.
        let res = gw.chat("gpt-4o", &chat("hi")).await;
        assert_eq!(res.headers()["x-served-by"], "a (Region A)", "{fallback}");
        assert_eq!(res.headers()["x-gateway-attempts"], "1", "{fallback}");
        gw.stop().await;
    }
}
