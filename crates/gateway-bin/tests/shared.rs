//! Several `gateway` processes sharing one real `redis-server`: one global consumer limit, shared
//! backend cooldowns, and Redis going away and coming back.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{Proc, Redis, free_port};
use serde_json::{Value, json};
use simulator::{Fault, RunningRegion};

const CLIENT_KEY: &str = "shared-client-key";

async fn region(name: &str, tpm: u64) -> RunningRegion {
    common::spawn_region(common::chat_region(name, "backend-key", tpm)).await
}

/// A policy with the given regions (priority in order) and extra TOML.
fn policy_file(regions: &[&RunningRegion], extra: &str) -> PathBuf {
    common::write_policy(&(common::regions_policy(regions) + extra))
}

/// Starts a gateway process on a free port and waits until it is ready.
async fn gateway(policy: &Path) -> (Proc, String) {
    common::gateway_process(
        policy,
        &[("BACKEND_KEY", "backend-key"), ("CLIENT_KEY", CLIENT_KEY)],
    )
    .await
}

async fn chat(base: &str, max_tokens: u64) -> reqwest::Response {
    reqwest::Client::new()
        .post(common::chat_url(base))
        .header("api-key", CLIENT_KEY)
        .json(
            &json!({"messages": [{"role": "user", "content": "hello"}], "max_tokens": max_tokens}),
        )
        .send()
        .await
        .unwrap()
}

const QUOTA: u64 = 6_000;

fn limited_consumer(store: &str) -> String {
    format!(
        "{store}\n[[consumers]]\nname = \"app\"\nkeys = [\"env:CLIENT_KEY\"]\n[consumers.limits]\ntoken_quota = {QUOTA}\ntoken_quota_period = \"daily\"\n"
    )
}

/// Sends calls round-robin through `bases`, 6 at a time, until every gateway has refused one, and
/// returns the tokens the admitted calls consumed.
async fn drain_quota(bases: &[String]) -> u64 {
    let mut admitted = 0;
    let mut refused = vec![false; bases.len()];
    for round in 0..400 {
        let calls = (0..6).map(|i| {
            let base = bases[(round * 6 + i) % bases.len()].clone();
            async move { (base.clone(), chat(&base, 40).await) }
        });
        for (base, res) in futures_util::future::join_all(calls).await {
            match res.status().as_u16() {
                200 => {
                    admitted += res.headers()["x-gateway-tokens-consumed"]
                        .to_str()
                        .unwrap()
                        .parse::<u64>()
                        .unwrap();
                }
                403 => refused[bases.iter().position(|b| *b == base).unwrap()] = true,
                other => panic!("unexpected {other}: {}", res.text().await.unwrap()),
            }
        }
        if refused.iter().all(|r| *r) {
            return admitted;
        }
    }
    panic!("the quota never ran out");
}

/// `n` gateway processes sharing one Redis hold one quota; the same `n` counting alone admit about
/// `n` times as much.
async fn gateways_sharing_redis_hold_one_limit(n: usize) {
    let redis = Redis::start();
    let sim = region("Region 0", 100_000_000).await;
    let shared = policy_file(
        &[&sim],
        &limited_consumer(&format!(
            "[rate_limit]\nstore = \"redis\"\nredis_url = \"{}\"\nkey_prefix = \"t{}\"\n",
            redis.url(),
            free_port()
        )),
    );
    let mut procs = Vec::new();
    let mut bases = Vec::new();
    for _ in 0..n {
        let (p, b) = gateway(&shared).await;
        procs.push(p);
        bases.push(b);
    }
    let admitted = drain_quota(&bases).await;
    // Each call reserves about 50 tokens and uses at most that: admission stops within one call of
    // the quota, across all the processes.
    assert!(
        admitted <= QUOTA,
        "{n} gateways admitted {admitted} of {QUOTA}"
    );
    assert!(
        admitted >= QUOTA * 95 / 100,
        "{n} gateways admitted only {admitted} of {QUOTA}"
    );
    drop(procs);

    let local = policy_file(&[&sim], &limited_consumer(""));
    let mut procs = Vec::new();
    let mut bases = Vec::new();
    for _ in 0..n {
        let (p, b) = gateway(&local).await;
        procs.push(p);
        bases.push(b);
    }
    let admitted_locally = drain_quota(&bases).await;
    let n = n as u64;
    assert!(
        admitted_locally >= QUOTA * (n * 10 - 2) / 10,
        "{n} local-only limiters admitted {admitted_locally}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_sharing_redis_hold_one_limit_where_local_limiters_would_not() {
    gateways_sharing_redis_hold_one_limit(2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_gateways_sharing_redis_hold_one_limit_where_local_limiters_would_not() {
    gateways_sharing_redis_hold_one_limit(3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttle_seen_by_one_gateway_is_known_to_all() {
    let redis = Redis::start();
    let a = region("Region 0", 100_000_000).await;
    let b = region("Region 1", 100_000_000).await;
    let policy = policy_file(
        &[&a, &b],
        &format!(
            "[rate_limit]\nstore = \"redis\"\nredis_url = \"{}\"\nkey_prefix = \"t{}\"\n\n[[consumers]]\nname = \"app\"\nkeys = [\"env:CLIENT_KEY\"]\n",
            redis.url(),
            free_port()
        ),
    );
    let (_p1, one) = gateway(&policy).await;
    let (_p2, two) = gateway(&policy).await;
    // Let both listeners subscribe.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let throttle: Fault = serde_json::from_value(
        json!({"kind": "status", "status": 429, "retry_after_ms": 20000, "count": 1}),
    )
    .unwrap();
    a.handle().set_faults(vec![throttle]);

    let res = chat(&one, 5).await;
    assert_eq!(res.headers()["x-served-by"], "r1 (Region 1)");
    assert_eq!(a.handle().request_count(), 1);
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Gateway two never saw the 429, yet it goes straight to region 1.
    for _ in 0..3 {
        let res = chat(&two, 5).await;
        assert_eq!(res.headers()["x-served-by"], "r1 (Region 1)");
        assert_eq!(res.headers()["x-gateway-attempts"], "1");
    }
    assert_eq!(a.handle().request_count(), 1);
}

async fn statuses(base: &str, n: usize) -> Vec<u16> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(chat(base, 5).await.status().as_u16());
    }
    out
}

async fn until_status(base: &str, want: u16) -> bool {
    for _ in 0..100 {
        if chat(base, 5).await.status().as_u16() == want {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

fn rpm_consumer(store: &str) -> String {
    format!(
        "{store}\n[[consumers]]\nname = \"app\"\nkeys = [\"env:CLIENT_KEY\"]\n[consumers.limits]\nrequests_per_minute = 100000\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_fails_open_when_configured_and_recovers() {
    let mut redis = Redis::start();
    let sim = region("Region 0", 100_000_000).await;
    let policy = policy_file(
        &[&sim],
        &rpm_consumer(&format!(
            "[rate_limit]\nstore = \"redis\"\nredis_url = \"{}\"\non_store_error = \"fail-open\"\n",
            redis.url()
        )),
    );
    let (_p, base) = gateway(&policy).await;
    let res = chat(&base, 5).await;
    assert_eq!(res.status(), 200);
    assert!(res.headers().contains_key("x-ratelimit-remaining-requests"));

    redis.kill();
    assert_eq!(
        statuses(&base, 3).await,
        [200, 200, 200],
        "fail-open admits unchecked"
    );

    redis.restart();
    // Counting resumes: the consumer's headers come back once Redis answers again.
    let mut counted = false;
    for _ in 0..100 {
        let res = chat(&base, 5).await;
        assert_eq!(res.status(), 200);
        if res.headers().contains_key("x-ratelimit-remaining-requests") {
            counted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(counted, "limits never came back after Redis did");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_fails_closed_when_configured_and_recovers() {
    let mut redis = Redis::start();
    let sim = region("Region 0", 100_000_000).await;
    let policy = policy_file(
        &[&sim],
        &rpm_consumer(&format!(
            "[rate_limit]\nstore = \"redis\"\nredis_url = \"{}\"\non_store_error = \"fail-closed\"\n",
            redis.url()
        )),
    );
    let (_p, base) = gateway(&policy).await;
    assert_eq!(chat(&base, 5).await.status(), 200);
    redis.kill();
    let res = chat(&base, 5).await;
    assert_eq!(res.status(), 503);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["error"]["code"], "ServiceUnavailable");
    let before = sim.handle().request_count();
    assert_eq!(statuses(&base, 2).await, [503, 503]);
    assert_eq!(
        sim.handle().request_count(),
        before,
        "nothing reaches Azure unchecked"
    );
    redis.restart();
    assert!(
        until_status(&base, 200).await,
        "never recovered after Redis came back"
    );
}
