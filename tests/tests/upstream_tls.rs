//! A backend on HTTPS with a certificate from a private CA (a TLS-inspecting proxy's, an API
//! Management front's): refused by the gateway until `upstream.ca_file` trusts that CA, then
//! served, streams included. A real TLS handshake on the upstream leg, on 127.0.0.1.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use gateway_e2e::https::TestCa;
use gateway_e2e::*;
use gateway_policy::Policy;
use gateway_policy::secret::{MapSecrets, NoSecrets};
use simulator::{DeploymentConfig, RegionConfig, RunningRegion, ServerTls};

/// A directory of its own for one test's files.
fn scratch(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("gw-upstream-tls-{}-{test}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// "Sweden Central" serving `gpt4o-swc` over HTTPS, with a leaf `ca` signed.
async fn https_region(ca: &TestCa) -> RunningRegion {
    let leaf = ca.leaf();
    let tls = ServerTls::from_pem(leaf.cert_pem.as_bytes(), leaf.key_pem.as_bytes()).unwrap();
    let config = RegionConfig::new("Sweden Central", backend_key("Sweden Central"))
        .deployment(DeploymentConfig::chat("gpt4o-swc", 1_000_000));
    simulator::spawn_tls(config, "127.0.0.1:0".parse().unwrap(), tls)
        .await
        .unwrap()
}

/// The policy putting `sim` behind the gateway, with `extra` tables (e.g. `[upstream]`).
fn policy_for(sim: &RunningRegion, extra: &str) -> String {
    assert!(sim.url().starts_with("https://127.0.0.1:"), "{}", sim.url());
    let b = backend_toml(
        "swc",
        sim,
        "Sweden Central",
        1,
        1,
        &[("gpt-4o", "gpt4o-swc")],
    );
    policy(&["gpt-4o"], &[b], extra)
}

fn upstream_ca(path: &Path) -> String {
    format!("[upstream]\nca_file = \"{}\"\n", path.display())
}

#[tokio::test]
async fn a_private_ca_backend_is_refused_without_upstream_ca_file_and_served_with_it() {
    let ca = TestCa::new();
    let sim = https_region(&ca).await;
    let dir = scratch("served");

    // The system's roots do not know the test CA: the handshake fails, the client is told why in
    // a word, and the backend never sees the request.
    let gw = gateway(&policy_for(&sim, ""), &["Sweden Central"]).await;
    let res = gw.chat("gpt-4o", &chat("hi")).await;
    assert_eq!(res.status(), 502);
    let (code, message) = azure_error(res).await;
    assert_eq!(code, "BadGateway");
    assert!(message.contains("TLS failure"), "{message}");
    assert!(!message.contains("127.0.0.1"), "{message}");
    assert_eq!(sim.handle().request_count(), 0);
    gw.stop().await;

    // Another CA in the file does not help: the setting adds roots, it does not turn checks off.
    let other = dir.join("other-ca.pem");
    std::fs::write(&other, TestCa::new().pem()).unwrap();
    let gw = gateway(&policy_for(&sim, &upstream_ca(&other)), &["Sweden Central"]).await;
    let res = gw.chat("gpt-4o", &chat("hi")).await;
    assert_eq!(res.status(), 502);
    let (_, message) = azure_error(res).await;
    assert!(message.contains("TLS failure"), "{message}");
    assert_eq!(sim.handle().request_count(), 0);
    gw.stop().await;

    // The bundle holding the backend's CA (after another one): served.
    let bundle = dir.join("bundle.pem");
    std::fs::write(&bundle, format!("{}{}", TestCa::new().pem(), ca.pem())).unwrap();
    let gw = gateway(
        &policy_for(&sim, &upstream_ca(&bundle)),
        &["Sweden Central"],
    )
    .await;
    let res = gw.chat("gpt-4o", &chat("hi")).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["x-served-by"], "swc (Sweden Central)");
    let body: serde_json::Value = res.json().await.unwrap();
    assert!(
        body["usage"]["total_tokens"].as_u64().unwrap() > 0,
        "{body}"
    );

    let mut stream = chat("count");
    stream["stream"] = serde_json::json!(true);
    let res = gw.chat("gpt-4o", &stream).await;
    assert_eq!(res.status(), 200);
    let text = res.text().await.unwrap();
    assert!(
        text.trim_end().ends_with("data: [DONE]"),
        "stream was cut: {text}"
    );
    assert_eq!(sim.handle().request_count(), 2);
    gw.stop().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn an_unusable_upstream_ca_file_stops_the_build_naming_the_setting() {
    let ca = TestCa::new();
    let sim = https_region(&ca).await;
    let dir = scratch("unusable");
    let secrets = MapSecrets::with_fallback(NoSecrets)
        .with_env("CLIENT_KEY", CLIENT_KEY)
        .with_env(env_name("Sweden Central"), backend_key("Sweden Central"));
    let build = |ca_file: &Path| {
        let policy = Policy::from_toml_str(&policy_for(&sim, &upstream_ca(ca_file)), "test.toml")
            .unwrap_or_else(|e| panic!("{e}"));
        let resolved = policy.resolve_secrets(&secrets, None).unwrap();
        gateway_bin::app::build(&policy, &resolved)
            .map(drop)
            .unwrap_err()
            .to_string()
    };

    let missing = dir.join("missing.pem");
    let error = build(&missing);
    assert!(
        error.starts_with(&format!(
            "upstream.ca_file: {}: cannot read it:",
            missing.display()
        )),
        "{error}"
    );

    // A leaf's key instead of certificates.
    let key = dir.join("key.pem");
    std::fs::write(&key, ca.leaf().key_pem).unwrap();
    let error = build(&key);
    assert!(error.starts_with("upstream.ca_file: "), "{error}");
    assert!(error.contains("holds no PEM certificate"), "{error}");
    let _ = std::fs::remove_dir_all(dir);
}
