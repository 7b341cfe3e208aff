//! Entra ID access tokens from clients, through the whole gateway: an OpenID issuer on 127.0.0.1
//! serves the tenant's signing keys; tokens map to consumers (limits included), keys keep working
//! next to them, bad tokens get 401s that say what was wrong, and an unknown `kid` refreshes the
//! keys exactly once.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use gateway_e2e::issuer::{Issuer, OTHER_TENANT, TENANT, now};
use gateway_e2e::*;
use serde_json::{Value, json};
use simulator::RunningRegion;

/// `tester` (keys and this application id) and `limited` (this managed identity, one request a
/// minute).
const APP: &str = "aaaaaaaa-1111-4111-8111-000000000001";
const LIMITED_OID: &str = "bbbbbbbb-2222-4222-8222-000000000002";
const STRANGER: &str = "cccccccc-3333-4333-8333-000000000003";

async fn gateway_for(issuer: &Issuer) -> (RunningRegion, Gateway) {
    let sim = region("Sweden Central", &[("gpt4o-swc", 1_000_000)]).await;
    let b = backend_toml(
        "swc",
        &sim,
        "Sweden Central",
        1,
        1,
        &[("gpt-4o", "gpt4o-swc")],
    );
    let consumers = format!(
        "entra_app_ids = [\"{APP}\"]\n\n\
         [[consumers]]\nname = \"limited\"\nentra_object_ids = [\"{LIMITED_OID}\"]\n\
         [consumers.limits]\nrequests_per_minute = 1\n"
    );
    let policy = policy_with_limits(&["gpt-4o"], &[b], &issuer.entra_toml(), &consumers);
    let gw = gateway(&policy, &["Sweden Central"]).await;
    (sim, gw)
}

async fn call(gw: &Gateway, token: &str) -> reqwest::Response {
    client()
        .post(gw.chat_url("gpt-4o"))
        .bearer_auth(token)
        .json(&chat("hi"))
        .send()
        .await
        .unwrap()
}

/// Refused with 401 in Azure's shape, with a message containing `why` and never the token.
async fn refused(gw: &Gateway, token: &str, why: &str) {
    let res = call(gw, token).await;
    assert_eq!(res.status(), 401, "{why}");
    let body = res.text().await.unwrap();
    assert!(!body.contains(token), "the answer echoes the token: {body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["code"], "401");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains(why), "expected `{why}` in: {msg}");
}

fn with(mut claims: Value, changes: Value) -> Value {
    for (k, v) in changes.as_object().unwrap() {
        claims[k] = v.clone();
    }
    claims
}

#[tokio::test]
async fn tokens_are_served_as_their_consumer_with_its_limits_next_to_keys() {
    let issuer = Issuer::start().await;
    let (sim, gw) = gateway_for(&issuer).await;
    minute_room(Duration::from_secs(10)).await;

    // A v2 token (azp) of the mapped application.
    let v2 = issuer.token("kid-1", &Issuer::claims(APP, STRANGER));
    let res = call(&gw, &v2).await;
    assert_eq!(res.status(), 200);
    // A v1 token (appid, sts.windows.net issuer) of the same application.
    let mut v1 = Issuer::claims(APP, STRANGER);
    v1.as_object_mut().unwrap().remove("azp");
    let v1 = with(
        v1,
        json!({"appid": APP, "ver": "1.0", "iss": format!("https://sts.windows.net/{TENANT}/")}),
    );
    assert_eq!(call(&gw, &issuer.token("kid-1", &v1)).await.status(), 200);
    // The same consumer still accepts its key.
    assert_eq!(gw.chat("gpt-4o", &chat("hi")).await.status(), 200);

    // A managed identity (by object id) is `limited`: its second request this minute is refused
    // by its own limit, which only a token mapped to it can spend.
    let mi = issuer.token("kid-1", &Issuer::claims(STRANGER, LIMITED_OID));
    let first = call(&gw, &mi).await;
    assert_eq!(first.status(), 200);
    assert_eq!(first.headers()["x-ratelimit-remaining-requests"], "0");
    let second = call(&gw, &mi).await;
    assert_eq!(second.status(), 429);
    assert_eq!(second.headers()["x-gateway-limit"], "requests");
    assert_eq!(
        sim.handle().request_count(),
        4,
        "the 429 never reached Azure"
    );

    // The keys were fetched once, for the first token: checking is local after that.
    assert_eq!(issuer.jwks_fetches(), 1);
    gw.stop().await;
}

#[tokio::test]
async fn bad_tokens_are_refused_saying_what_was_wrong() {
    let issuer = Issuer::start().await;
    let (sim, gw) = gateway_for(&issuer).await;
    let good = Issuer::claims(APP, STRANGER);
    let now = now();

    let cases = [
        (json!({"aud": "api://someone-else"}), "audience"),
        (json!({"exp": now - 600}), "expired"),
        (json!({"nbf": now + 600}), "not valid yet"),
        (
            json!({"tid": OTHER_TENANT, "iss": format!("https://login.microsoftonline.com/{OTHER_TENANT}/v2.0")}),
            "another tenant",
        ),
        (json!({"iss": "https://evil.example/v2.0"}), "issuer"),
        (
            json!({"azp": STRANGER, "oid": STRANGER}),
            "application 'cccccccc-3333-4333-8333-000000000003'",
        ),
    ];
    for (changes, why) in cases {
        let token = issuer.token("kid-1", &with(good.clone(), changes));
        refused(&gw, &token, why).await;
    }
    refused(&gw, &issuer.forged("kid-1", &good), "signature").await;
    // Within the 5-minute clock skew, an expired token is still accepted.
    let skewed = issuer.token("kid-1", &with(good.clone(), json!({"exp": now - 60})));
    assert_eq!(call(&gw, &skewed).await.status(), 200);
    // And a valid one, for contrast.
    assert_eq!(call(&gw, &issuer.token("kid-1", &good)).await.status(), 200);
    assert_eq!(
        sim.handle().request_count(),
        2,
        "no refused call reached Azure"
    );
    gw.stop().await;
}

#[tokio::test]
async fn an_unknown_kid_refreshes_the_keys_once() {
    let issuer = Issuer::start().await;
    let (_sim, gw) = gateway_for(&issuer).await;
    let claims = Issuer::claims(APP, STRANGER);
    // The first tokens, all at once, share the first fetch.
    let first = issuer.token("kid-1", &claims);
    let gw_ref = &gw;
    let statuses = futures_util::future::join_all(
        (0..5).map(|_| async { call(gw_ref, &first).await.status() }),
    )
    .await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(issuer.jwks_fetches(), 1);

    // Entra ID rotates its keys: a token signed with the new one makes the gateway look again.
    issuer.add_key("kid-2");
    assert_eq!(
        call(&gw, &issuer.token("kid-2", &claims)).await.status(),
        200
    );
    assert_eq!(issuer.jwks_fetches(), 2);

    // Made-up kids, concurrently and one after another: no more fetches within the refresh
    // interval (5 minutes by default).
    let bogus = (0..10).map(|i| issuer.token(&format!("bogus-{i}"), &claims));
    let answers = futures_util::future::join_all(bogus.map(|t| async move {
        let res = call(gw_ref, &t).await;
        (res.status(), res.text().await.unwrap())
    }))
    .await;
    for (status, body) in answers {
        assert_eq!(status, 401);
        assert!(body.contains("unknown key"), "{body}");
    }
    assert_eq!(issuer.jwks_fetches(), 2);
    // Both keys keep working.
    assert_eq!(
        call(&gw, &issuer.token("kid-1", &claims)).await.status(),
        200
    );
    gw.stop().await;
}

#[tokio::test]
async fn unknown_kids_may_refresh_again_once_the_interval_has_passed() {
    let issuer = Issuer::start().await;
    let sim = region("Sweden Central", &[("gpt4o-swc", 1_000_000)]).await;
    let b = backend_toml(
        "swc",
        &sim,
        "Sweden Central",
        1,
        1,
        &[("gpt-4o", "gpt4o-swc")],
    );
    let entra = format!("{}key_refresh_min_seconds = 1\n", issuer.entra_toml());
    let consumer = format!("entra_app_ids = [\"{APP}\"]\n");
    let gw = gateway(
        &policy_with_limits(&["gpt-4o"], &[b], &entra, &consumer),
        &["Sweden Central"],
    )
    .await;
    let claims = Issuer::claims(APP, STRANGER);
    assert_eq!(
        call(&gw, &issuer.token("kid-1", &claims)).await.status(),
        200
    );
    refused(&gw, &issuer.token("bogus-1", &claims), "unknown key").await;
    assert_eq!(issuer.jwks_fetches(), 2, "the first unknown kid refreshes");
    refused(&gw, &issuer.token("bogus-2", &claims), "unknown key").await;
    assert_eq!(
        issuer.jwks_fetches(),
        2,
        "the next one waits out the interval"
    );
    // Once a second has passed, the next unknown kid looks again, and finds a new key.
    issuer.add_key("kid-2");
    let token = issuer.token("kid-2", &claims);
    eventually("a refresh after the interval", || async {
        (call(&gw, &token).await.status() == 200).then_some(())
    })
    .await;
    assert_eq!(issuer.jwks_fetches(), 3);
    gw.stop().await;
}

#[tokio::test]
async fn tokens_get_503_while_the_signing_keys_cannot_be_fetched() {
    // Nothing listens there: the issuer is down.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let sim = region("Sweden Central", &[("gpt4o-swc", 1_000_000)]).await;
    let b = backend_toml(
        "swc",
        &sim,
        "Sweden Central",
        1,
        1,
        &[("gpt-4o", "gpt4o-swc")],
    );
    let entra = format!(
        "[gateway.entra]\ntenant = \"{TENANT}\"\naudiences = [\"api://aoai-gateway\"]\nauthority = \"http://{closed}\"\n"
    );
    let consumer = format!("entra_app_ids = [\"{APP}\"]\n");
    let gw = gateway(
        &policy_with_limits(&["gpt-4o"], &[b], &entra, &consumer),
        &["Sweden Central"],
    )
    .await;
    let issuer = Issuer::start().await;
    let res = call(&gw, &issuer.token("kid-1", &Issuer::claims(APP, STRANGER))).await;
    assert_eq!(res.status(), 503);
    let (code, msg) = azure_error(res).await;
    assert_eq!(code, "ServiceUnavailable");
    assert!(
        msg.contains("cannot check Entra ID tokens right now"),
        "{msg}"
    );
    assert!(!msg.contains(&closed.to_string()), "no internal URL: {msg}");
    // Keys keep working meanwhile.
    assert_eq!(gw.chat("gpt-4o", &chat("hi")).await.status(), 200);
    gw.stop().await;
}
