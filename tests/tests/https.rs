//! The HTTPS listener: a real TLS handshake with a certificate from a test CA, HTTP/1.1 and HTTP/2
//! as the client offers, and a certificate renewed on disk served to new connections while an
//! open connection keeps working.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use gateway_e2e::https::{Leaf, TestCa, peer_certificate};
use gateway_e2e::*;
use simulator::RunningRegion;

/// A directory of its own for one test's certificate files.
fn scratch(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("gw-tls-{}-{test}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn write(dir: &Path, leaf: &Leaf) {
    std::fs::write(dir.join("key.pem"), &leaf.key_pem).unwrap();
    std::fs::write(dir.join("cert.pem"), &leaf.cert_pem).unwrap();
}

async fn https_gateway(dir: &Path, reload_seconds: u64) -> (RunningRegion, Gateway) {
    https_gateway_with(dir, reload_seconds, "").await
}

#[tokio::test]
async fn shutdown_lets_an_in_flight_https_stream_finish_and_stops_accepting() {
    let ca = TestCa::new();
    let dir = scratch("shutdown");
    write(&dir, &ca.leaf());
    let sim = region_with("Sweden Central", &[("gpt4o-swc", 1_000_000)], |c| {
        c.token_delay(std::time::Duration::from_millis(40))
    })
    .await;
    let b = backend_toml(
        "swc",
        &sim,
        "Sweden Central",
        1,
        1,
        &[("gpt-4o", "gpt4o-swc")],
    );
    let tls = format!(
        "[gateway.tls]\ncertificate = \"file:{}\"\nprivate_key = \"file:{}\"\n",
        dir.join("cert.pem").display(),
        dir.join("key.pem").display(),
    );
    let mut gw = gateway_https(&policy(&["gpt-4o"], &[b], &tls), &["Sweden Central"]).await;
    let http2 = ca.client().build().unwrap();
    // About 30 tokens x 40 ms: still streaming when the shutdown begins.
    let res = http2
        .post(gw.chat_url("gpt-4o"))
        .header("api-key", CLIENT_KEY)
        .json(&serde_json::json!({"messages": [{"role": "user", "content": "story"}], "max_tokens": 30, "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.version(), reqwest::Version::HTTP_2);
    let mut body = res.bytes_stream();
    let first = futures_util::StreamExt::next(&mut body)
        .await
        .unwrap()
        .unwrap();
    gw.begin_shutdown();
    let mut text = String::from_utf8_lossy(&first).into_owned();
    let mut chunks = 0;
    while let Some(chunk) = futures_util::StreamExt::next(&mut body).await {
        text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
        chunks += 1;
        if chunks == 5 {
            // Well after the shutdown began, the server still waits for this connection.
            assert!(
                !gw.has_stopped(),
                "the server returned with a stream in flight"
            );
        }
    }
    assert!(chunks > 5, "the stream outlived the check: {text}");
    assert!(
        text.trim_end().ends_with("data: [DONE]"),
        "stream was cut: {text}"
    );
    // No new connection is accepted.
    let fresh = ca.client().build().unwrap();
    eventually("the listener closed", || async {
        fresh
            .get(gw.url("/healthz"))
            .send()
            .await
            .is_err()
            .then_some(())
    })
    .await;
    gw.stop().await;
    let _ = std::fs::remove_dir_all(dir);
}

async fn https_gateway_with(
    dir: &Path,
    reload_seconds: u64,
    extra: &str,
) -> (RunningRegion, Gateway) {
    let sim = region("Sweden Central", &[("gpt4o-swc", 1_000_000)]).await;
    let b = backend_toml(
        "swc",
        &sim,
        "Sweden Central",
        1,
        1,
        &[("gpt-4o", "gpt4o-swc")],
    );
    let tls = format!(
        "[gateway.tls]\ncertificate = \"file:{}\"\nprivate_key = \"file:{}\"\nreload_seconds = {reload_seconds}\n",
        dir.join("cert.pem").display(),
        dir.join("key.pem").display(),
    );
    let gw = gateway_https(
        &policy(&["gpt-4o"], &[b], &format!("{tls}{extra}")),
        &["Sweden Central"],
    )
    .await;
    (sim, gw)
}

async fn chat_over(client: &reqwest::Client, gw: &Gateway) -> reqwest::Response {
    client
        .post(gw.chat_url("gpt-4o"))
        .header("api-key", CLIENT_KEY)
        .json(&chat("hi"))
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn https_is_served_on_http1_and_http2() {
    let ca = TestCa::new();
    let dir = scratch("versions");
    let leaf = ca.leaf();
    write(&dir, &leaf);
    // The admin listener has a certificate of its own.
    let admin_leaf = ca.leaf();
    std::fs::write(dir.join("admin-cert.pem"), &admin_leaf.cert_pem).unwrap();
    std::fs::write(dir.join("admin-key.pem"), &admin_leaf.key_pem).unwrap();
    let admin_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let admin = format!(
        "[admin]\nlisten = \"127.0.0.1:{admin_port}\"\n[admin.tls]\ncertificate = \"file:{}\"\nprivate_key = \"file:{}\"\n",
        dir.join("admin-cert.pem").display(),
        dir.join("admin-key.pem").display(),
    );
    let (sim, gw) = https_gateway_with(&dir, 60, &admin).await;
    assert!(gw.chat_url("gpt-4o").starts_with("https://127.0.0.1:"));

    let http1 = ca.client().http1_only().build().unwrap();
    let res = chat_over(&http1, &gw).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.version(), reqwest::Version::HTTP_11);
    assert_eq!(peer_certificate(&res), leaf.der);

    // A client that offers h2 in ALPN (reqwest does by default over TLS) gets it.
    let http2 = ca.client().build().unwrap();
    let res = chat_over(&http2, &gw).await;
    assert_eq!(res.version(), reqwest::Version::HTTP_2);
    assert_eq!(res.status(), 200);
    assert!(res.headers().contains_key("x-request-id"));
    let body: serde_json::Value = res.json().await.unwrap();
    assert!(body["choices"][0]["message"]["content"].is_string());
    // A streamed answer over HTTP/2 ends as Azure's does.
    let streamed = http2
        .post(gw.chat_url("gpt-4o"))
        .header("api-key", CLIENT_KEY)
        .json(&serde_json::json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 20, "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(streamed.version(), reqwest::Version::HTTP_2);
    assert!(
        streamed
            .text()
            .await
            .unwrap()
            .trim_end()
            .ends_with("data: [DONE]")
    );
    // Health and admin answers ride the same listener.
    let health = http2.get(gw.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);

    let metrics = eventually("the admin listener answering over HTTPS", || async {
        let url = format!("https://127.0.0.1:{admin_port}/metrics");
        http2.get(url).send().await.ok()
    })
    .await;
    assert_eq!(metrics.status(), 200);
    assert_eq!(peer_certificate(&metrics), admin_leaf.der);

    // A client that does not trust the test CA refuses the handshake.
    let stranger = reqwest::Client::builder().build().unwrap();
    assert!(stranger.get(gw.url("/healthz")).send().await.is_err());
    assert_eq!(sim.handle().request_count(), 3);
    gw.stop().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn a_renewed_certificate_reaches_new_connections_while_open_ones_keep_theirs() {
    let ca = TestCa::new();
    let dir = scratch("renewal");
    let old = ca.leaf();
    write(&dir, &old);
    let (_sim, gw) = https_gateway(&dir, 1).await;

    // A connection opened before the renewal (kept in this client's pool).
    let open = ca.client().http1_only().build().unwrap();
    let res = chat_over(&open, &gw).await;
    assert_eq!(
        (res.status().as_u16(), peer_certificate(&res)),
        (200, old.der.clone())
    );

    let new = ca.leaf();
    write(&dir, &new);
    eventually("the renewed certificate on a new connection", || async {
        // A client of its own each time: a new connection, a new handshake.
        let fresh = ca.client().build().unwrap();
        let res = fresh.get(gw.url("/healthz")).send().await.ok()?;
        (peer_certificate(&res) == new.der).then_some(())
    })
    .await;

    // The connection opened before still serves, with the certificate it started with: it was
    // neither dropped nor renegotiated.
    let res = chat_over(&open, &gw).await;
    assert_eq!(res.status(), 200);
    assert_eq!(peer_certificate(&res), old.der);
    gw.stop().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_key_that_does_not_fit_the_certificate_is_refused_at_start_up() {
    let ca = TestCa::new();
    let (a, b) = (ca.leaf(), ca.leaf());
    let policy_text = "[gateway.tls]\ncertificate = \"env:CERT\"\nprivate_key = \"env:KEY\"\n\n\
        [[deployments]]\nname = \"gpt-4o\"\n\n[[backends]]\nname = \"a\"\nregion = \"r\"\n\
        endpoint = \"https://a.openai.azure.com\"\napi_key = \"env:K\"\ndeployments = { gpt-4o = \"g\" }\n";
    let policy = gateway_policy::Policy::from_toml_str(policy_text, "p.toml").unwrap();
    let src = gateway_policy::secret::MapSecrets::with_fallback(gateway_policy::secret::NoSecrets)
        .with_env("CERT", &a.cert_pem)
        .with_env("KEY", &b.key_pem);
    let error = gateway_bin::tls::load(&policy, &src).unwrap_err();
    assert!(
        error.starts_with("p.toml: gateway.tls: the private key does not fit the certificate"),
        "{error}"
    );
    assert!(!error.contains("PRIVATE KEY"), "no secret in: {error}");
    let src = gateway_policy::secret::MapSecrets::with_fallback(gateway_policy::secret::NoSecrets)
        .with_env("CERT", &a.cert_pem)
        .with_env("KEY", &a.key_pem);
    let loaded = gateway_bin::tls::load(&policy, &src).unwrap();
    // `Tls` is Debug (so is what holds it): the private key is not in it.
    let debug = format!("{loaded:?}");
    let key_body = a.key_pem.lines().nth(1).unwrap();
    assert!(
        !debug.contains(key_body) && !debug.contains("PRIVATE"),
        "{debug}"
    );
    assert!(loaded.gateway.is_some());
}
