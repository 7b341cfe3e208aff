//! Helpers for the end-to-end tests: real simulated regions and a real gateway on 127.0.0.1.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use gateway_bin::{app, serve};
use gateway_core::pool::BackendPool;
use gateway_policy::Policy;
use gateway_policy::secret::{MapSecrets, NoSecrets};
use serde_json::{Value, json};
use simulator::{DeploymentConfig, RegionConfig, RunningRegion};
use tokio::sync::oneshot;

/// The key clients present to the gateway in these tests.
pub const CLIENT_KEY: &str = "client-key-1";

/// Starts a simulated region whose backend key is `key-<lowercased region>`.
pub async fn region(name: &str, deployments: &[(&str, u64)]) -> RunningRegion {
    region_with(name, deployments, |c| c).await
}

/// Like [`region`], with a chance to adjust the config (token delay, faults).
pub async fn region_with(
    name: &str,
    deployments: &[(&str, u64)],
    adjust: impl FnOnce(RegionConfig) -> RegionConfig,
) -> RunningRegion {
    let mut config = RegionConfig::new(name, backend_key(name));
    for (d, tpm) in deployments {
        config = config.deployment(if d.contains("embedding") {
            DeploymentConfig::embeddings(*d, *tpm)
        } else {
            DeploymentConfig::chat(*d, *tpm)
        });
    }
    simulator::spawn(adjust(config), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap()
}

/// One simulated "Sweden Central" region serving `gpt-4o` (as `gpt4o-swc`, `chat_tpm` tokens per
/// minute) and `text-embedding-3-small` (as `embedding-swc`), behind a gateway whose consumer gets
/// `consumer_toml` appended (e.g. its `[consumers.limits]`).
pub async fn sweden(chat_tpm: u64, consumer_toml: &str) -> (RunningRegion, Gateway) {
    let sim = region(
        "Sweden Central",
        &[("gpt4o-swc", chat_tpm), ("embedding-swc", 1_000_000)],
    )
    .await;
    let b = backend_toml(
        "swc",
        &sim,
        "Sweden Central",
        1,
        1,
        &[
            ("gpt-4o", "gpt4o-swc"),
            ("text-embedding-3-small", "embedding-swc"),
        ],
    );
    let gw = gateway(
        &policy_with_limits(
            &["gpt-4o", "text-embedding-3-small"],
            &[b],
            "",
            consumer_toml,
        ),
        &["Sweden Central"],
    )
    .await;
    (sim, gw)
}

/// The backend key a simulated region accepts.
pub fn backend_key(region: &str) -> String {
    format!("key-{}", region.to_lowercase().replace(' ', "-"))
}

/// A running gateway.
pub struct Gateway {
    pub addr: SocketAddr,
    pub pool: Arc<BackendPool>,
    shutdown: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

/// Starts a gateway for a policy text. `env:KEY_<REGION>` references resolve to [`backend_key`]s
/// for the listed regions, `env:CLIENT_KEY` to [`CLIENT_KEY`].
pub async fn gateway(policy_toml: &str, regions: &[&str]) -> Gateway {
    let policy = Policy::from_toml_str(policy_toml, "test.toml").unwrap_or_else(|e| panic!("{e}"));
    let mut secrets = MapSecrets::with_fallback(NoSecrets).with_env("CLIENT_KEY", CLIENT_KEY);
    for r in regions {
        secrets = secrets.with_env(env_name(r), backend_key(r));
    }
    let resolved = policy
        .resolve_secrets(&secrets, None)
        .unwrap_or_else(|e| panic!("{e}"));
    let gw = app::build(&policy, &resolved).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let pool = gw.pool.clone();
    let (tx, rx) = oneshot::channel();
    let task = tokio::spawn(serve::serve(
        listener,
        gw,
        async move {
            let _ = rx.await;
        },
        Duration::from_secs(5),
    ));
    Gateway {
        addr,
        pool,
        shutdown: Some(tx),
        task,
    }
}

/// The env var name a policy uses for a region's backend key.
pub fn env_name(region: &str) -> String {
    format!("KEY_{}", region.to_uppercase().replace(' ', "_"))
}

/// A `[[backends]]` table for a simulated region.
pub fn backend_toml(
    name: &str,
    sim: &RunningRegion,
    region: &str,
    priority: u32,
    weight: u32,
    map: &[(&str, &str)],
) -> String {
    let mut s = format!(
        "[[backends]]\nname = \"{name}\"\nregion = \"{region}\"\nendpoint = \"{}\"\npriority = {priority}\nweight = {weight}\napi_key = \"env:{}\"\n[backends.deployments]\n",
        sim.url(),
        env_name(region)
    );
    for (logical, own) in map {
        s.push_str(&format!("\"{logical}\" = \"{own}\"\n"));
    }
    s
}

/// A policy with the given deployments, backends and extra tables, and one consumer using [`CLIENT_KEY`].
pub fn policy(deployments: &[&str], backends: &[String], extra: &str) -> String {
    policy_with_limits(deployments, backends, extra, "")
}

/// Like [`policy`], with TOML appended to the consumer's table (e.g. `[consumers.limits]` ...).
pub fn policy_with_limits(
    deployments: &[&str],
    backends: &[String],
    extra: &str,
    consumer: &str,
) -> String {
    let mut s = String::from("[gateway]\nlisten = \"127.0.0.1:0\"\nmax_body_bytes = 65536\n\n");
    for d in deployments {
        s.push_str(&format!("[[deployments]]\nname = \"{d}\"\n\n"));
    }
    for b in backends {
        s.push_str(b);
        s.push('\n');
    }
    s.push_str(extra);
    // Access-log lines would go straight to the test output, around the harness's capture.
    s.push_str("\n[telemetry]\naccess_log = false\n");
    s.push_str("\n[[consumers]]\nname = \"tester\"\nkeys = [\"env:CLIENT_KEY\"]\n");
    s.push_str(consumer);
    s
}

impl Gateway {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn chat_url(&self, deployment: &str) -> String {
        self.url(&format!(
            "/openai/deployments/{deployment}/chat/completions?api-version=2024-10-21"
        ))
    }

    /// Sends a chat completion with the client key.
    pub async fn chat(&self, deployment: &str, body: &Value) -> reqwest::Response {
        client()
            .post(self.chat_url(deployment))
            .header("api-key", CLIENT_KEY)
            .json(body)
            .send()
            .await
            .unwrap()
    }

    /// Stops accepting and waits for the server to finish.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), &mut self.task).await;
    }
}

/// A client without connection reuse surprises: short timeouts so no test can hang.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// A small chat request body.
pub fn chat(content: &str) -> Value {
    json!({"messages": [{"role": "user", "content": content}], "max_tokens": 20})
}

/// Parses an Azure error body and returns `(code, message)`.
pub async fn azure_error(res: reqwest::Response) -> (String, String) {
    let v: Value = res.json().await.unwrap();
    let e = &v["error"];
    (
        e["code"]
            .as_str()
            .expect("error.code is a string")
            .to_owned(),
        e["message"]
            .as_str()
            .expect("error.message is a string")
            .to_owned(),
    )
}
