//! Entra ID to backends and Key Vault references, end to end: a gateway whose identity talks to the
//! stand-ins of `gateway_e2e::azure_stub` on 127.0.0.1 (token endpoints, Key Vault, a backend that
//! checks credentials). Token lifetimes and refresh intervals are short and real; every wait is a
//! bounded poll on what the stand-ins counted.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use gateway_e2e::azure_stub::{
    AOAI_SCOPE, AzureStub, CERT_PEM_PATH, CLIENT_ID, TENANT, VAULT_SCOPE,
};
use gateway_e2e::https::TestCa;
use gateway_e2e::{CLIENT_KEY, Gateway, Poller, chat, eventually, gateway_with_identity, policy};

const VAULT_REF: &str = "keyvault:https://stub-vault.vault.azure.net/secrets";

fn env(stub_env: Vec<(String, String)>, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut env = stub_env;
    env.push(("CLIENT_KEY".to_owned(), CLIENT_KEY.to_owned()));
    env.extend(
        extra
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    );
    env
}

fn served_by(res: &reqwest::Response) -> String {
    res.headers()["x-served-by"].to_str().unwrap().to_owned()
}

async fn metric(gw: &Gateway, line_start: &str) -> Option<f64> {
    let text = gateway_e2e::client()
        .get(gw.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test]
async fn backend_is_called_with_an_entra_token_renewed_before_it_expires() {
    // Renewed at half its life: about every second.
    let stub = AzureStub::start(Duration::from_secs(2)).await;
    let toml = policy(
        &["gpt-4o"],
        &[stub.backend_toml("aoai", 1, "[backends.entra]")],
        "",
    );
    let gw = gateway_with_identity(&toml, &env(stub.env(), &[]))
        .await
        .unwrap();
    assert_eq!(
        stub.token_fetches(AOAI_SCOPE),
        1,
        "fetched once at start-up"
    );

    let mut requests = 0u64;
    let mut poll = Poller::within("three token renewals", Duration::from_secs(30));
    while stub.token_fetches(AOAI_SCOPE) < 4 {
        let res = gw.chat("gpt-4o", &chat("hi")).await;
        assert_eq!(res.status(), 200, "every call is served with a valid token");
        requests += 1;
        poll.wait().await;
    }
    let seen = stub.seen();
    let mut tokens = seen.clone();
    tokens.dedup();
    assert!(
        tokens.len() >= 3,
        "the backend saw renewed tokens: {}",
        tokens.len()
    );
    assert_eq!(stub.refused(), 0, "no call went out with an expired token");
    // Never per request: a handful of fetches for many calls.
    let fetches = stub.token_fetches(AOAI_SCOPE);
    assert!(
        requests >= 4 * fetches,
        "{fetches} token fetches for {requests} requests"
    );
    gw.stop().await;
}

#[tokio::test]
async fn a_token_that_cannot_be_renewed_serves_until_it_expires_then_fails_over() {
    let stub = AzureStub::start(Duration::from_secs(5)).await;
    stub.accept_key("fallback-key", true);
    let toml = policy(
        &["gpt-4o"],
        &[
            stub.backend_toml("entra", 1, "[backends.entra]"),
            stub.backend_toml("keyed", 2, "api_key = \"env:FALLBACK_KEY\""),
        ],
        "[failover]\ndefault_cooldown_ms = 200\n",
    );
    let gw = gateway_with_identity(&toml, &env(stub.env(), &[("FALLBACK_KEY", "fallback-key")]))
        .await
        .unwrap();
    assert_eq!(
        served_by(&gw.chat("gpt-4o", &chat("hi")).await),
        "entra (Stub)"
    );

    // The identity's endpoint goes down: the cached token (5 s) keeps serving.
    stub.fail_tokens(true);
    let res = gw.chat("gpt-4o", &chat("hi")).await;
    assert_eq!(
        (res.status().as_u16(), served_by(&res)),
        (200, "entra (Stub)".to_owned())
    );

    // Once it expires, the backend is skipped as on a 401: the next one serves, nobody fails.
    let mut poll = Poller::within("the expired token failing over", Duration::from_secs(30));
    loop {
        let res = gw.chat("gpt-4o", &chat("hi")).await;
        assert_eq!(res.status(), 200);
        if served_by(&res) == "keyed (Stub)" {
            break;
        }
        poll.wait().await;
    }
    assert_eq!(stub.refused(), 0, "an expired token is never sent");
    let failures = metric(
        &gw,
        "gateway_credential_refresh_failures_total{kind=\"entra_token\"}",
    )
    .await
    .unwrap();
    assert!(failures >= 1.0);

    // The endpoint comes back: so does the backend.
    stub.fail_tokens(false);
    let mut poll = Poller::within("the renewed token serving again", Duration::from_secs(30));
    loop {
        let res = gw.chat("gpt-4o", &chat("hi")).await;
        assert_eq!(res.status(), 200);
        if served_by(&res) == "entra (Stub)" {
            break;
        }
        poll.wait().await;
    }
    gw.stop().await;
}

#[tokio::test]
async fn workload_identity_certificate_and_managed_identity_endpoints_serve_tokens() {
    let stub = AzureStub::start(Duration::from_secs(3600)).await;
    let toml = policy(
        &["gpt-4o"],
        &[stub.backend_toml(
            "aoai",
            1,
            "[backends.entra]\nscope = \"https://cognitiveservices.azure.com/.default\"",
        )],
        "",
    );
    // AKS workload identity: the federated token file is the client assertion.
    let token_file = std::env::temp_dir().join(format!("gw-federated-{}", std::process::id()));
    std::fs::write(&token_file, "federated-assertion-1\n").unwrap();
    let mut workload = stub.safe_env();
    workload.extend(
        [
            ("AZURE_TENANT_ID", TENANT),
            ("AZURE_CLIENT_ID", CLIENT_ID),
            ("AZURE_FEDERATED_TOKEN_FILE", token_file.to_str().unwrap()),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned())),
    );
    // A service principal with a certificate: a signed client assertion (the stand-in checks the
    // signature, thumbprint, audience and expiry).
    let mut certificate = stub.safe_env();
    certificate.extend(
        [
            ("AZURE_TENANT_ID", TENANT),
            ("AZURE_CLIENT_ID", CLIENT_ID),
            ("AZURE_CLIENT_CERTIFICATE_PATH", CERT_PEM_PATH),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned())),
    );
    // Then App Service / Container Apps, then a VM's instance metadata service (here, not
    // 169.254.169.254).
    for stub_env in [
        workload,
        certificate,
        stub.app_service_env(),
        stub.safe_env(),
    ] {
        let before = stub.token_fetches(AOAI_SCOPE);
        let gw = gateway_with_identity(&toml, &env(stub_env, &[]))
            .await
            .unwrap();
        assert_eq!(gw.chat("gpt-4o", &chat("hi")).await.status(), 200);
        assert_eq!(stub.token_fetches(AOAI_SCOPE), before + 1);
        gw.stop().await;
    }
    assert_eq!(stub.refused(), 0);
    std::fs::remove_file(token_file).unwrap();
}

#[tokio::test]
async fn a_rotated_key_vault_secret_is_picked_up_under_load_with_no_request_failing() {
    let stub = AzureStub::start(Duration::from_secs(3600)).await;
    stub.put_secret("aoai-key", "kv-key-1");
    stub.accept_key("kv-key-1", true);
    let toml = policy(
        &["gpt-4o"],
        &[stub.backend_toml("aoai", 1, &format!("api_key = \"{VAULT_REF}/aoai-key\""))],
        "[key_vault]\nrefresh_seconds = 1\n",
    );
    let gw = Arc::new(
        gateway_with_identity(&toml, &env(stub.env(), &[]))
            .await
            .unwrap(),
    );
    assert_eq!(stub.token_fetches(VAULT_SCOPE), 1);

    let stop = Arc::new(AtomicBool::new(false));
    let (sent, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let load: Vec<_> = (0..4)
        .map(|_| {
            let (gw, stop, sent, failed) = (gw.clone(), stop.clone(), sent.clone(), failed.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::SeqCst) {
                    let res = gw.chat("gpt-4o", &chat("hi")).await;
                    sent.fetch_add(1, Ordering::SeqCst);
                    if res.status() != 200 {
                        failed.fetch_add(1, Ordering::SeqCst);
                    }
                }
            })
        })
        .collect();
    let seen_count = || stub.seen().len();
    eventually("load flowing", || async {
        (seen_count() > 20).then_some(())
    })
    .await;

    // Rotation as Azure does it: the new key is valid first, then stored, then the old one revoked.
    stub.accept_key("kv-key-2", true);
    stub.put_secret("aoai-key", "kv-key-2");
    eventually("the rotated key in use", || async {
        (stub.seen().last().map(String::as_str) == Some("kv-key-2")).then_some(())
    })
    .await;
    let rotated_at = seen_count();
    eventually("load after the rotation", || async {
        (seen_count() > rotated_at + 20).then_some(())
    })
    .await;
    stub.accept_key("kv-key-1", false);

    // Key Vault goes away: the last good value keeps serving, the failure is counted.
    stub.fail_vault(true);
    eventually("a failed refresh counted", || async {
        metric(
            &gw,
            "gateway_credential_refresh_failures_total{kind=\"key_vault\"}",
        )
        .await
        .filter(|n| *n >= 1.0)
    })
    .await;
    let failed_at = seen_count();
    eventually("load while Key Vault is down", || async {
        (seen_count() > failed_at + 20).then_some(())
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    for task in load {
        task.await.unwrap();
    }
    assert_eq!(
        failed.load(Ordering::SeqCst),
        0,
        "of {} requests",
        sent.load(Ordering::SeqCst)
    );
    assert_eq!(stub.refused(), 0);
    assert!(stub.seen()[failed_at..].iter().all(|k| k == "kv-key-2"));
}

#[tokio::test]
async fn start_up_fails_naming_the_policy_location_of_an_unreadable_reference() {
    let stub = AzureStub::start(Duration::from_secs(3600)).await;
    stub.put_secret("present", "v");
    let toml = policy(
        &["gpt-4o"],
        &[
            stub.backend_toml("a", 1, &format!("api_key = \"{VAULT_REF}/present\"")),
            stub.backend_toml("b", 1, &format!("api_key = \"{VAULT_REF}/missing\"")),
        ],
        "",
    );
    let error = gateway_with_identity(&toml, &env(stub.env(), &[]))
        .await
        .err()
        .expect("start-up fails");
    assert!(
        error.contains("backends[1].api_key: cannot read Key Vault secret `https://stub-vault.vault.azure.net/secrets/missing`: Key Vault answered 404 Not Found (SecretNotFound)"),
        "{error}"
    );
    assert!(error.starts_with("test.toml:"), "{error}");
    assert!(!error.contains("backends[0]"), "{error}");

    // No identity at all (the token endpoint refuses): the scope is named.
    stub.fail_tokens(true);
    let toml = policy(
        &["gpt-4o"],
        &[stub.backend_toml("a", 1, "[backends.entra]")],
        "",
    );
    let error = gateway_with_identity(&toml, &env(stub.env(), &[]))
        .await
        .err()
        .expect("start-up fails");
    assert!(
        error.contains("cannot get an Entra ID token for the backends (scope `https://cognitiveservices.azure.com/.default`): service principal (client secret): the token endpoint answered 500 Internal Server Error"),
        "{error}"
    );
}

#[tokio::test]
async fn a_listener_certificate_from_key_vault_is_served_and_its_rotation_reaches_new_connections()
{
    let stub = AzureStub::start(Duration::from_secs(3600)).await;
    stub.accept_key("kv-key-1", true);
    stub.put_secret("aoai-key", "kv-key-1");
    let ca = TestCa::new();
    let first = ca.leaf();
    // One secret holds the certificate and its key, as Key Vault stores a PEM certificate.
    stub.put_secret(
        "gateway-tls",
        &format!("{}{}", first.cert_pem, first.key_pem),
    );
    let tls = format!(
        "[key_vault]\nrefresh_seconds = 1\n\n[gateway.tls]\ncertificate = \"{VAULT_REF}/gateway-tls\"\nprivate_key = \"{VAULT_REF}/gateway-tls\"\nreload_seconds = 1\n"
    );
    let toml = policy(
        &["gpt-4o"],
        &[stub.backend_toml("aoai", 1, &format!("api_key = \"{VAULT_REF}/aoai-key\""))],
        &tls,
    );
    let gw = gateway_with_identity(&toml, &env(stub.env(), &[]))
        .await
        .unwrap();
    let peer = |res: &reqwest::Response| {
        res.extensions()
            .get::<reqwest::tls::TlsInfo>()
            .and_then(|info| info.peer_certificate())
            .map(<[u8]>::to_vec)
    };
    let client = ca.client().build().unwrap();
    let res = client
        .post(gw.url("/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"))
        .header("api-key", CLIENT_KEY)
        .json(&chat("hi"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(peer(&res), Some(first.der.clone()));

    // Renewed in Key Vault: read again by the identity, then loaded for new handshakes.
    let second = ca.leaf();
    stub.put_secret(
        "gateway-tls",
        &format!("{}{}", second.cert_pem, second.key_pem),
    );
    eventually("the renewed certificate on a new connection", || async {
        let fresh = ca.client().build().unwrap();
        let res = fresh.get(gw.url("/healthz")).send().await.ok()?;
        (peer(&res) == Some(second.der.clone())).then_some(())
    })
    .await;
    gw.stop().await;
    stub.stop();
}

#[tokio::test]
async fn a_listener_certificate_missing_from_key_vault_stops_start_up_naming_the_field() {
    let stub = AzureStub::start(Duration::from_secs(3600)).await;
    let tls = format!(
        "[gateway.tls]\ncertificate = \"{VAULT_REF}/absent\"\nprivate_key = \"{VAULT_REF}/absent\"\n"
    );
    let toml = policy(
        &["gpt-4o"],
        &[stub.backend_toml("aoai", 1, "api_key = \"env:CLIENT_KEY\"")],
        &tls,
    );
    let error = match gateway_with_identity(&toml, &env(stub.env(), &[])).await {
        Ok(_) => panic!("start-up must fail"),
        Err(error) => error,
    };
    assert!(
        error.contains("gateway.tls.certificate") && error.contains("SecretNotFound"),
        "{error}"
    );
    stub.stop();
}
