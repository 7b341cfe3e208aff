//! The Python `openai` SDK with `azure_ad_token_provider` (the keyless pattern Microsoft documents)
//! against the gateway over HTTPS: served as the consumer its token's application maps to, with that
//! consumer's limits applied. `scripts/test` installs the pinned SDK.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use gateway_e2e::https::TestCa;
use gateway_e2e::issuer::Issuer;
use gateway_e2e::*;
use serde_json::Value;

const SDK_APP: &str = "dddddddd-4444-4444-8444-000000000004";
const SDK_OID: &str = "eeeeeeee-5555-4555-8555-000000000005";

#[tokio::test]
async fn the_openai_sdk_with_a_token_provider_is_served_as_its_consumer_with_its_limits() {
    let ca = TestCa::new();
    let dir = std::env::temp_dir().join(format!("gw-sdk-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let leaf = ca.leaf();
    std::fs::write(dir.join("cert.pem"), &leaf.cert_pem).unwrap();
    std::fs::write(dir.join("key.pem"), &leaf.key_pem).unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();

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
    let extra = format!(
        "{}\n[gateway.tls]\ncertificate = \"file:{}\"\nprivate_key = \"file:{}\"\n",
        issuer.entra_toml(),
        dir.join("cert.pem").display(),
        dir.join("key.pem").display(),
    );
    let consumers = format!(
        "\n[[consumers]]\nname = \"sdk-app\"\nentra_app_ids = [\"{SDK_APP}\"]\n\
         [consumers.limits]\nrequests_per_minute = 2\n"
    );
    let gw = gateway_https(
        &policy_with_limits(&["gpt-4o"], &[b], &extra, &consumers),
        &["Sweden Central"],
    )
    .await;
    minute_room(Duration::from_secs(30)).await;

    let token = issuer.token("kid-1", &Issuer::claims(SDK_APP, SDK_OID));
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/openai_entra.py");
    let endpoint = gw.url("");
    let ca_file = dir.join("ca.pem");
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new("python3")
            .arg(script)
            .env("GATEWAY_URL", endpoint)
            .env("CA_FILE", ca_file)
            .env("ENTRA_TOKEN", token)
            .env("CALLS", "3")
            .output()
            .expect("python3 (scripts/test installs the `openai` package)")
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the SDK script failed (scripts/test installs `openai`):\n{stderr}"
    );
    let lines: Vec<Value> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4, "{lines:#?}\n{stderr}");
    // Served, and counted against `sdk-app`'s two requests a minute.
    for (line, left) in lines[..2].iter().zip(["1", "0"]) {
        assert_eq!(line["status"], 200, "{line}");
        assert!(line["content"].as_str().is_some_and(|c| !c.is_empty()));
        assert_eq!(line["remaining_requests"], left, "{line}");
    }
    // Its third is refused by its own limit, in the shape the SDK turns into a RateLimitError.
    assert_eq!(lines[2]["status"], 429, "{}", lines[2]);
    assert!(
        lines[2]["error"].as_str().unwrap().contains("rate limit"),
        "{}",
        lines[2]
    );
    assert_eq!(
        lines[3]["tokens_provided"], 3,
        "one token per request, as the SDK asks"
    );
    assert_eq!(
        sim.handle().request_count(),
        2,
        "the 429 never reached Azure"
    );
    gw.stop().await;
    let _ = std::fs::remove_dir_all(dir);
}
