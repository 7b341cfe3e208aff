//! Several `gateway` processes sharing one real `redis-server`: one global consumer limit, shared
//! backend cooldowns, and Redis going away and coming back.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{PolicyFile, Proc, Redis, free_port, policy_file};
use gateway_e2e::{Poller, eventually};
use serde_json::{Value, json};
use simulator::{Fault, RunningRegion};

const CLIENT_KEY: &str = "shared-client-key";

async fn region(name: &str, tpm: u64) -> RunningRegion {
    gateway_e2e::region(name, &[("m", tpm)]).await
}

/// Starts a gateway process on a free port and waits until it is ready.
async fn gateway(policy: &PolicyFile) -> (Proc, String) {
    common::gateway_process(policy, &[("CLIENT_KEY", CLIENT_KEY)]).await
}

/// Starts `n` gateway processes on `policy`; returns them and their base URLs.
async fn gateways(policy: &PolicyFile, n: usize) -> (Vec<Proc>, Vec<String>) {
    let mut procs = Vec::new();
    let mut bases = Vec::new();
    for _ in 0..n {
        let (p, b) = gateway(policy).await;
        procs.push(p);
        bases.push(b);
    }
    (procs, bases)
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
    let (procs, bases) = gateways(&shared, n).await;
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
    let (_procs, bases) = gateways(&local, n).await;
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
    let prefix = format!("t{}", free_port());
    let policy = policy_file(
        &[&a, &b],
        &format!(
            "[rate_limit]\nstore = \"redis\"\nredis_url = \"{}\"\nkey_prefix = \"{prefix}\"\n\n[[consumers]]\nname = \"app\"\nkeys = [\"env:CLIENT_KEY\"]\n",
            redis.url(),
        ),
    );
    let (_p1, one) = gateway(&policy).await;
    let (_p2, two) = gateway(&policy).await;
    // Both cooldown listeners subscribe, so that the throttle below travels live (a listener that
    // subscribed later would read it in its catch-up instead).
    let channel = format!("{prefix}:v2:cooldowns");
    eventually(
        "both gateways subscribed to the cooldown channel",
        || async { (redis.subscribers(&channel) == 2).then_some(()) },
    )
    .await;
    let throttle: Fault = serde_json::from_value(
        json!({"kind": "status", "status": 429, "retry_after_ms": 20000, "count": 1}),
    )
    .unwrap();
    a.handle().set_faults(vec![throttle]);

    let res = chat(&one, 5).await;
    assert_eq!(res.headers()["x-served-by"], "r1 (Region 1)");
    assert_eq!(a.handle().request_count(), 1);
    // Gateway one publishes the cooldown in a task of its own; gateway two applies it on hearing it.
    eventually("gateway two showing region 0 cooling down", || async {
        let status: Value = reqwest::get(format!("{two}/admin/status"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        (status["backends"][0]["state"] == "cooling_down").then_some(())
    })
    .await;

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

/// Calls until one is answered with `want` (bounded).
async fn until_status(base: &str, want: u16) {
    eventually(&format!("a call answered {want}"), || async {
        (chat(base, 5).await.status().as_u16() == want).then_some(())
    })
    .await;
}

/// A Redis, a region and a gateway counting a generous RPM limit in that Redis, doing
/// `on_store_error` when it goes away.
async fn gateway_on_redis(on_store_error: &str) -> (Redis, RunningRegion, Proc, String) {
    let redis = Redis::start();
    let sim = region("Region 0", 100_000_000).await;
    let policy = policy_file(
        &[&sim],
        &format!(
            "[rate_limit]\nstore = \"redis\"\nredis_url = \"{}\"\non_store_error = \"{on_store_error}\"\n\n[[consumers]]\nname = \"app\"\nkeys = [\"env:CLIENT_KEY\"]\n[consumers.limits]\nrequests_per_minute = 100000\n",
            redis.url()
        ),
    );
    let (proc, base) = gateway(&policy).await;
    (redis, sim, proc, base)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_fails_open_when_configured_and_recovers() {
    let (mut redis, _sim, _p, base) = gateway_on_redis("fail-open").await;
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
    let mut poll = Poller::new("limits coming back after Redis did");
    loop {
        let res = chat(&base, 5).await;
        assert_eq!(res.status(), 200);
        if res.headers().contains_key("x-ratelimit-remaining-requests") {
            break;
        }
        poll.wait().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_fails_closed_when_configured_and_recovers() {
    let (mut redis, sim, _p, base) = gateway_on_redis("fail-closed").await;
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
    // Recovered after Redis came back.
    until_status(&base, 200).await;
}
