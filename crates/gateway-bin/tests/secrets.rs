//! The secret grep: `gateway serve` at TRACE level with every kind of secret it handles (backend
//! keys from env, file and Key Vault, an Entra ID token and the service principal's secret behind
//! it, consumer keys from env, file and Key Vault, the admin key), driven through successes,
//! refusals and a backend that refuses the gateway; then logs, the access log, exported traces,
//! `/metrics`, `/admin/status`, every error body and `gateway check` are searched for every value.
//! A second run adds HTTPS on both listeners (private keys from `file:` and Key Vault) and Entra ID
//! tokens from clients, valid and refused.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::routing::post;
use common::{GATEWAY, free_port, spawn_gateway, temp_dir};
use gateway_e2e::azure_stub::{AzureStub, CLIENT_SECRET};
use gateway_e2e::leaks::assert_no_secrets;
use gateway_e2e::{eventually, eventually_within};

const KV_BACKEND_KEY: &str = "kv-backend-key-5d2c91";
const ENV_BACKEND_KEY: &str = "env-backend-key-a1f7e0";
const FILE_BACKEND_KEY: &str = "file-backend-key-93be4d";
const WRONG_BACKEND_KEY: &str = "wrong-backend-key-0c6e11";
const KV_CLIENT_KEY: &str = "kv-client-key-7a7a31";
const ENV_CLIENT_KEY: &str = "env-client-key-4e04c2";
const FILE_CLIENT_KEY: &str = "file-client-key-b88d95";
const ADMIN_KEY: &str = "admin-key-31f9aa";

/// An OTLP/HTTP receiver keeping every export's raw bytes (strings are verbatim in protobuf).
async fn collector() -> (String, Arc<Mutex<Vec<u8>>>) {
    let received: Arc<Mutex<Vec<u8>>> = Arc::default();
    let sink = received.clone();
    let app = Router::new().route(
        "/v1/traces",
        post(move |body: Bytes| {
            let sink = sink.clone();
            async move {
                sink.lock().unwrap().extend_from_slice(&body);
                [("content-type", "application/x-protobuf")]
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, received)
}

fn backend(name: &str, deployment: &str, stub: &AzureStub, credential: &str) -> String {
    format!(
        "[[backends]]\nname = \"{name}\"\nregion = \"Stub\"\nendpoint = \"{}\"\ndeployments = {{ {deployment} = \"{deployment}\" }}\n{credential}\n\n",
        stub.url()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_appears_in_any_output() {
    let stub = AzureStub::start(Duration::from_secs(3600)).await;
    stub.put_secret("backend-key", KV_BACKEND_KEY);
    stub.put_secret("client-key", KV_CLIENT_KEY);
    for key in [KV_BACKEND_KEY, ENV_BACKEND_KEY, FILE_BACKEND_KEY] {
        stub.accept_key(key, true);
    }
    let (otlp, exported) = collector().await;
    let dir = temp_dir();
    std::fs::write(dir.join("backend.key"), format!("{FILE_BACKEND_KEY}\n")).unwrap();
    std::fs::write(dir.join("client.key"), format!("{FILE_CLIENT_KEY}\n")).unwrap();
    let vault = "keyvault:https://stub-vault.vault.azure.net/secrets";
    let deployments = ["d-kv", "d-env", "d-file", "d-entra", "d-refused"];
    let mut policy = String::from("[key_vault]\nrefresh_seconds = 1\n\n");
    for d in deployments {
        policy.push_str(&format!("[[deployments]]\nname = \"{d}\"\n\n"));
    }
    policy.push_str(&backend(
        "kv",
        "d-kv",
        &stub,
        &format!("api_key = \"{vault}/backend-key\""),
    ));
    policy.push_str(&backend(
        "env",
        "d-env",
        &stub,
        "api_key = \"env:ENV_BACKEND_KEY\"",
    ));
    policy.push_str(&backend(
        "file",
        "d-file",
        &stub,
        "api_key = \"file:backend.key\"",
    ));
    policy.push_str(&backend("entra", "d-entra", &stub, "[backends.entra]"));
    policy.push_str(&backend(
        "refused",
        "d-refused",
        &stub,
        "api_key = \"env:WRONG_BACKEND_KEY\"",
    ));
    policy.push_str(&format!(
        "[[consumers]]\nname = \"app\"\nkeys = [\"{vault}/client-key\", \"env:ENV_CLIENT_KEY\", \"file:client.key\"]\n\n[admin]\nkey = \"env:ADMIN_KEY\"\n\n[telemetry]\notlp_endpoint = \"{otlp}\"\n"
    ));
    let policy_file = dir.join("policy.toml");
    std::fs::write(&policy_file, &policy).unwrap();

    let mut env = stub.env();
    env.extend(
        [
            ("ENV_BACKEND_KEY", ENV_BACKEND_KEY),
            ("WRONG_BACKEND_KEY", WRONG_BACKEND_KEY),
            ("ENV_CLIENT_KEY", ENV_CLIENT_KEY),
            ("ADMIN_KEY", ADMIN_KEY),
            ("RUST_LOG", "trace"),
            ("OTEL_BSP_SCHEDULE_DELAY", "50"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned())),
    );
    let (stdout_path, stderr_path) = (dir.join("stdout"), dir.join("stderr"));
    let port = free_port();
    let mut serve = Command::new(GATEWAY);
    serve
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--policy",
        ])
        .arg(&policy_file)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(std::fs::File::create(&stdout_path).unwrap())
        .stderr(std::fs::File::create(&stderr_path).unwrap());
    let (gateway, base) = spawn_gateway(&mut serve, port).await;

    let client = reqwest::Client::new();
    let mut bodies = String::new();
    let call = |deployment: &str, key: &str| {
        client
            .post(format!(
                "{base}/openai/deployments/{deployment}/chat/completions?api-version=2024-10-21"
            ))
            .header("api-key", key)
            .body(r#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":5}"#)
            .send()
    };
    // Every backend credential, with every client key (api-key and bearer alike).
    for d in ["d-kv", "d-env", "d-file", "d-entra"] {
        for key in [KV_CLIENT_KEY, ENV_CLIENT_KEY, FILE_CLIENT_KEY] {
            let res = call(d, key).await.unwrap();
            assert_eq!(res.status(), 200, "{d}");
            bodies.push_str(&res.text().await.unwrap());
        }
    }
    let res = client
        .post(format!(
            "{base}/openai/deployments/d-entra/chat/completions?api-version=2024-10-21"
        ))
        .bearer_auth(ENV_CLIENT_KEY)
        .body(r#"{"messages":[{"role":"user","content":"hi"}]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    // Refusals: a wrong client key, and a backend that refuses the gateway's key.
    let res = call("d-kv", "not-a-client-key").await.unwrap();
    assert_eq!(res.status(), 401);
    bodies.push_str(&res.text().await.unwrap());
    let res = call("d-refused", ENV_CLIENT_KEY).await.unwrap();
    assert_eq!(res.status(), 502);
    bodies.push_str(&res.text().await.unwrap());
    // The operator endpoints, with and without the admin key.
    let status = client
        .get(format!("{base}/admin/status"))
        .header("api-key", ADMIN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(status.status(), 200);
    let status = status.text().await.unwrap();
    let res = client
        .get(format!("{base}/admin/status"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    bodies.push_str(&res.text().await.unwrap());
    // Key Vault read again at least once (refresh every second), with its token.
    eventually_within("a Key Vault refresh", Duration::from_secs(15), || async {
        (stub.token_fetches(gateway_e2e::azure_stub::VAULT_SCOPE) >= 2 && stub.seen().len() >= 13)
            .then_some(())
    })
    .await;
    let metrics = client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    eventually("spans exported", || async {
        (!exported.lock().unwrap().is_empty()).then_some(())
    })
    .await;

    common::sigterm(&gateway);
    let mut gateway = gateway;
    let exit = common::wait_exit(&mut gateway, Duration::from_secs(20));
    assert!(exit.success(), "{exit:?}");
    let stdout = std::fs::read_to_string(&stdout_path).unwrap();
    let stderr = std::fs::read_to_string(&stderr_path).unwrap();
    // TRACE really was on: the upstream client's own lines are there.
    assert!(stderr.contains("TRACE"), "{stderr}");

    let check = Command::new(GATEWAY)
        .args(["check", "--policy"])
        .arg(&policy_file)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(check.status.success(), "{check:?}");
    let check = format!(
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    let exported = String::from_utf8_lossy(&exported.lock().unwrap()).into_owned();

    let tokens = stub.issued_tokens();
    assert!(
        tokens.len() >= 2,
        "a token for the backends and one for Key Vault"
    );
    let mut secrets = vec![
        ("Key Vault backend key", KV_BACKEND_KEY),
        ("env backend key", ENV_BACKEND_KEY),
        ("file backend key", FILE_BACKEND_KEY),
        ("refused backend key", WRONG_BACKEND_KEY),
        ("Key Vault client key", KV_CLIENT_KEY),
        ("env client key", ENV_CLIENT_KEY),
        ("file client key", FILE_CLIENT_KEY),
        ("admin key", ADMIN_KEY),
        ("service principal secret", CLIENT_SECRET),
    ];
    secrets.extend(tokens.iter().map(|t| ("Entra ID token", t.as_str())));
    assert_no_secrets(
        &secrets,
        &[
            ("the log (stderr, TRACE)", &stderr),
            ("the access log (stdout)", &stdout),
            ("exported spans", &exported),
            ("/metrics", &metrics),
            ("/admin/status", &status),
            ("error bodies", &bodies),
            ("gateway check", &check),
        ],
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The base64 lines of a PEM private key (not its armor): what a leaked key would show.
fn pem_body_lines(pem: &str) -> Vec<String> {
    pem.lines()
        .map(str::trim)
        .filter(|line| !line.starts_with("-----") && line.len() >= 8)
        .map(str::to_owned)
        .collect()
}

/// The same grep with HTTPS on both listeners (the gateway's key from `file:`, the admin
/// listener's from Key Vault) and Entra ID tokens from clients: one served as its consumer, and an
/// expired, a wrong-audience and a badly signed one refused. Each token, each token's signature
/// alone and each private key's base64 lines are searched for, with the secrets of the test above
/// that this setup has too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_token_or_private_key_appears_in_any_output() {
    use gateway_e2e::https::TestCa;
    use gateway_e2e::issuer::{AUDIENCE, Issuer, now};

    const APP: &str = "aaaaaaaa-1111-4111-8111-00000000000a";
    let stub = AzureStub::start(Duration::from_secs(3600)).await;
    stub.put_secret("backend-key", KV_BACKEND_KEY);
    stub.accept_key(KV_BACKEND_KEY, true);
    let issuer = Issuer::start().await;
    let ca = TestCa::new();
    let gateway_leaf = ca.leaf();
    let admin_leaf = ca.leaf();
    stub.put_secret(
        "admin-tls",
        &format!("{}{}", admin_leaf.cert_pem, admin_leaf.key_pem),
    );
    let (otlp, exported) = collector().await;
    let dir = temp_dir();
    std::fs::write(dir.join("gateway-cert.pem"), &gateway_leaf.cert_pem).unwrap();
    std::fs::write(dir.join("gateway-key.pem"), &gateway_leaf.key_pem).unwrap();
    let vault = "keyvault:https://stub-vault.vault.azure.net/secrets";
    let admin_port = free_port();
    let mut policy = format!(
        "[key_vault]\nrefresh_seconds = 1\n\n\
         [gateway.tls]\ncertificate = \"file:gateway-cert.pem\"\nprivate_key = \"file:gateway-key.pem\"\nreload_seconds = 1\n\n\
         {}\n\
         [[deployments]]\nname = \"d-kv\"\n\n[[deployments]]\nname = \"d-entra\"\n\n",
        issuer.entra_toml()
    );
    policy.push_str(&backend(
        "kv",
        "d-kv",
        &stub,
        &format!("api_key = \"{vault}/backend-key\""),
    ));
    policy.push_str(&backend("entra", "d-entra", &stub, "[backends.entra]"));
    policy.push_str(&format!(
        "[[consumers]]\nname = \"app\"\nkeys = [\"env:ENV_CLIENT_KEY\"]\nentra_app_ids = [\"{APP}\"]\n\n\
         [admin]\nlisten = \"127.0.0.1:{admin_port}\"\nkey = \"env:ADMIN_KEY\"\n\n\
         [admin.tls]\ncertificate = \"{vault}/admin-tls\"\nprivate_key = \"{vault}/admin-tls\"\nreload_seconds = 1\n\n\
         [telemetry]\notlp_endpoint = \"{otlp}\"\n"
    ));
    let policy_file = dir.join("policy.toml");
    std::fs::write(&policy_file, &policy).unwrap();

    let mut env = stub.env();
    env.extend(
        [
            ("ENV_CLIENT_KEY", ENV_CLIENT_KEY),
            ("ADMIN_KEY", ADMIN_KEY),
            ("RUST_LOG", "trace"),
            ("OTEL_BSP_SCHEDULE_DELAY", "50"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned())),
    );
    let (stdout_path, stderr_path) = (dir.join("stdout"), dir.join("stderr"));
    let port = free_port();
    let mut serve = Command::new(GATEWAY);
    serve
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--policy",
        ])
        .arg(&policy_file)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(std::fs::File::create(&stdout_path).unwrap())
        .stderr(std::fs::File::create(&stderr_path).unwrap());
    let gateway = common::Proc::spawn(&mut serve);
    let base = format!("https://127.0.0.1:{port}");
    let admin = format!("https://127.0.0.1:{admin_port}");
    // HTTP/2 by ALPN; HTTP/1.1 for the refusals, so both code paths are grepped.
    let http2 = ca.client().build().unwrap();
    let http1 = ca.client().http1_only().build().unwrap();
    eventually("the gateway answering over HTTPS", || async {
        http2.get(format!("{base}/healthz")).send().await.ok()
    })
    .await;

    let chat = |client: &reqwest::Client, deployment: &str, token: &str| {
        client
            .post(format!(
                "{base}/openai/deployments/{deployment}/chat/completions?api-version=2024-10-21"
            ))
            .bearer_auth(token)
            .body(r#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":5}"#)
            .send()
    };
    let with = |changes: serde_json::Value| {
        let mut claims = Issuer::claims(APP, "bbbbbbbb-2222-4222-8222-00000000000b");
        for (k, v) in changes.as_object().unwrap() {
            claims[k] = v.clone();
        }
        claims
    };
    let valid = issuer.token("kid-1", &with(serde_json::json!({})));
    let expired = issuer.token(
        "kid-1",
        &with(serde_json::json!({"iat": now() - 7200, "nbf": now() - 7200, "exp": now() - 3600})),
    );
    let wrong_audience = issuer.token(
        "kid-1",
        &with(serde_json::json!({"aud": "api://someone-else"})),
    );
    let bad_signature = issuer.forged("kid-1", &with(serde_json::json!({})));
    assert_ne!(AUDIENCE, "api://someone-else");

    let mut bodies = String::new();
    // The valid token is served as `app`, on both backends (a Key Vault key, an Entra ID token).
    for d in ["d-kv", "d-entra"] {
        let res = chat(&http2, d, &valid).await.unwrap();
        assert_eq!(res.status(), 200, "{d}");
        assert_eq!(res.version(), reqwest::Version::HTTP_2);
        bodies.push_str(&res.text().await.unwrap());
    }
    let res = chat(&http1, "d-kv", &valid).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.version(), reqwest::Version::HTTP_11);
    for (why, token) in [
        ("expired", &expired),
        ("wrong audience", &wrong_audience),
        ("bad signature", &bad_signature),
    ] {
        for client in [&http1, &http2] {
            let res = chat(client, "d-kv", token).await.unwrap();
            assert_eq!(res.status(), 401, "{why}");
            bodies.push_str(&res.text().await.unwrap());
        }
    }
    // A key still works next to tokens; a wrong one is refused.
    let res = chat(&http2, "d-kv", ENV_CLIENT_KEY).await.unwrap();
    assert_eq!(res.status(), 200);
    let res = chat(&http2, "d-kv", "not-a-client-key").await.unwrap();
    assert_eq!(res.status(), 401);
    bodies.push_str(&res.text().await.unwrap());

    // The operator endpoints, over the admin listener's own TLS.
    let status = eventually("the admin listener answering over HTTPS", || async {
        http2
            .get(format!("{admin}/admin/status"))
            .header("api-key", ADMIN_KEY)
            .send()
            .await
            .ok()
    })
    .await;
    assert_eq!(status.status(), 200);
    let status = status.text().await.unwrap();
    assert!(status.contains("\"app\""), "{status}");
    // The key in the URL, as the admin page passes it on: URLs are logged and traced too.
    let res = http1
        .get(format!("{admin}/admin/status?key={ADMIN_KEY}"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let res = http1
        .get(format!("{admin}/admin/status"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    bodies.push_str(&res.text().await.unwrap());
    // Key Vault read again (the admin certificate with it), with its token.
    eventually_within("a Key Vault refresh", Duration::from_secs(15), || async {
        (stub.token_fetches(gateway_e2e::azure_stub::VAULT_SCOPE) >= 2).then_some(())
    })
    .await;
    let metrics = http2
        .get(format!("{admin}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    eventually("spans exported", || async {
        (!exported.lock().unwrap().is_empty()).then_some(())
    })
    .await;

    common::sigterm(&gateway);
    let mut gateway = gateway;
    let exit = common::wait_exit(&mut gateway, Duration::from_secs(20));
    assert!(exit.success(), "{exit:?}");
    let stdout = std::fs::read_to_string(&stdout_path).unwrap();
    let stderr = std::fs::read_to_string(&stderr_path).unwrap();
    assert!(stderr.contains("TRACE"), "{stderr}");
    // The refusals were logged (so the log was there to leak them).
    assert!(stderr.contains("the token has expired"), "{stderr}");

    let check = Command::new(GATEWAY)
        .args(["check", "--policy"])
        .arg(&policy_file)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(check.status.success(), "{check:?}");
    let check = format!(
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    let exported = String::from_utf8_lossy(&exported.lock().unwrap()).into_owned();

    let mut secrets: Vec<(String, String)> = [
        ("Key Vault backend key", KV_BACKEND_KEY),
        ("env client key", ENV_CLIENT_KEY),
        ("admin key", ADMIN_KEY),
        ("service principal secret", CLIENT_SECRET),
    ]
    .map(|(label, value)| (label.to_owned(), value.to_owned()))
    .to_vec();
    for (label, token) in [
        ("valid client token", &valid),
        ("expired client token", &expired),
        ("wrong-audience client token", &wrong_audience),
        ("badly signed client token", &bad_signature),
    ] {
        let signature = token.rsplit('.').next().unwrap();
        secrets.push((label.to_owned(), token.clone()));
        secrets.push((format!("{label}'s signature"), signature.to_owned()));
    }
    for (label, pem) in [
        ("gateway TLS private key", &gateway_leaf.key_pem),
        ("admin TLS private key", &admin_leaf.key_pem),
    ] {
        let lines = pem_body_lines(pem);
        assert!(!lines.is_empty(), "{label} has no base64 lines");
        for (i, line) in lines.into_iter().enumerate() {
            secrets.push((format!("{label} (line {})", i + 1), line));
        }
    }
    let tokens = stub.issued_tokens();
    assert!(
        tokens.len() >= 2,
        "a token for the backends and one for Key Vault"
    );
    secrets.extend(tokens.into_iter().map(|t| ("Entra ID token".to_owned(), t)));
    let secrets: Vec<(&str, &str)> = secrets
        .iter()
        .map(|(label, value)| (label.as_str(), value.as_str()))
        .collect();
    assert_no_secrets(
        &secrets,
        &[
            ("the log (stderr, TRACE)", &stderr),
            ("the access log (stdout)", &stdout),
            ("exported spans", &exported),
            ("/metrics", &metrics),
            ("/admin/status", &status),
            ("error bodies", &bodies),
            ("gateway check", &check),
        ],
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
