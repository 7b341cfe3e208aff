//! Helpers for the end-to-end tests: real simulated regions and a real gateway on 127.0.0.1, and
//! the fixtures and bounded waits the `gateway` binary's own tests share with them.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

pub mod azure_stub;
pub mod https;
pub mod issuer;
pub mod leaks;
mod poll;
mod regions;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use gateway_bin::store::Store;
use gateway_bin::{app, serve};
use gateway_core::pool::BackendPool;
use gateway_layers::RateLimitLayer;
use gateway_policy::Policy;
use gateway_policy::secret::{MapSecrets, NoSecrets, SystemSecrets};
use serde_json::{Value, json};
use simulator::{RegionConfig, RunningRegion};
use tokio::sync::oneshot;

pub use poll::{PATIENCE, POLL_EVERY, Poller, eventually, eventually_blocking, eventually_within};
pub use regions::{
    backend_env, backend_key, backend_toml, env_name, ranked_backends, region, region_with,
};

/// The key clients present to the gateway in these tests.
pub const CLIENT_KEY: &str = "client-key-1";

/// One simulated "Sweden Central" region serving `gpt-4o` (as `gpt4o-swc`, `chat_tpm` tokens per
/// minute) and `text-embedding-3-small` (as `embedding-swc`), behind a gateway whose consumer gets
/// `consumer_toml` appended (e.g. its `[consumers.limits]`).
pub async fn sweden(chat_tpm: u64, consumer_toml: &str) -> (RunningRegion, Gateway) {
    sweden_with(chat_tpm, consumer_toml, |c| c).await
}

/// Like [`sweden`], with a chance to adjust the region's config (token delay, faults).
pub async fn sweden_with(
    chat_tpm: u64,
    consumer_toml: &str,
    adjust: impl FnOnce(RegionConfig) -> RegionConfig,
) -> (RunningRegion, Gateway) {
    let sim = region_with(
        "Sweden Central",
        &[("gpt4o-swc", chat_tpm), ("embedding-swc", 1_000_000)],
        adjust,
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

/// A running gateway.
pub struct Gateway {
    pub addr: SocketAddr,
    /// Served over HTTPS ([`gateway_https`]).
    pub https: bool,
    pub pool: Arc<BackendPool>,
    rate_limit: RateLimitLayer<Store>,
    shutdown: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

/// Starts a gateway for a policy text. `env:KEY_<REGION>` references resolve to [`backend_key`]s
/// for the listed regions, `env:CLIENT_KEY` to [`CLIENT_KEY`].
pub async fn gateway(policy_toml: &str, regions: &[&str]) -> Gateway {
    start(policy_toml, regions, false).await
}

/// Like [`gateway`], serving HTTPS with the policy's `[gateway.tls]` (and `[admin.tls]`), whose
/// `file:` references are read from disk and re-read every `reload_seconds`, as `gateway serve`
/// does.
pub async fn gateway_https(policy_toml: &str, regions: &[&str]) -> Gateway {
    start(policy_toml, regions, true).await
}

fn secrets_for(regions: &[&str]) -> MapSecrets<SystemSecrets> {
    let mut secrets = MapSecrets::with_fallback(SystemSecrets).with_env("CLIENT_KEY", CLIENT_KEY);
    for r in regions {
        secrets = secrets.with_env(env_name(r), backend_key(r));
    }
    secrets
}

async fn start(policy_toml: &str, regions: &[&str], https: bool) -> Gateway {
    let policy = Policy::from_toml_str(policy_toml, "test.toml").unwrap_or_else(|e| panic!("{e}"));
    let mut secrets = MapSecrets::with_fallback(NoSecrets).with_env("CLIENT_KEY", CLIENT_KEY);
    for r in regions {
        secrets = secrets.with_env(env_name(r), backend_key(r));
    }
    let resolved = policy
        .resolve_secrets(&secrets, None)
        .unwrap_or_else(|e| panic!("{e}"));
    let mut gw = app::build(&policy, &resolved).unwrap();
    if https {
        let tls = gateway_bin::tls::load(&policy, &secrets_for(regions)).unwrap();
        gateway_bin::tls::keep_renewed(&tls, &policy, Arc::new(secrets_for(regions)));
        gw.tls = tls.gateway;
        if let Some(admin) = &mut gw.admin {
            admin.tls = tls.admin;
        }
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let pool = gw.pool.clone();
    let rate_limit = gw.rate_limit.clone();
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
        https,
        pool,
        rate_limit,
        shutdown: Some(tx),
        task,
    }
}

/// Starts a gateway whose identity and secrets come from `env` alone (e.g. [`azure_stub::AzureStub::env`]
/// plus the policy's `env:` references), reading `keyvault:` references and fetching Entra ID tokens
/// as `gateway serve` does, and keeping them fresh. `Err` is the start-up error `serve` would print.
pub async fn gateway_with_identity(
    policy_toml: &str,
    env: &[(String, String)],
) -> Result<Gateway, String> {
    let policy = Policy::from_toml_str(policy_toml, "test.toml").unwrap_or_else(|e| panic!("{e}"));
    let secrets = env
        .iter()
        .fold(MapSecrets::with_fallback(FilesOnly), |s, (k, v)| {
            s.with_env(k.clone(), v.clone())
        });
    let (resolved, identity) = gateway_bin::identity::resolve_secrets(&policy, &secrets).await?;
    let mut refreshers = None;
    if let Some(identity) = &identity {
        let refresh = Duration::from_secs(policy.key_vault.refresh_seconds);
        refreshers = Some(gateway_bin::identity::keep_fresh(identity, &resolved, refresh).await?);
    }
    let mut gw = app::build(&policy, &resolved).map_err(|e| e.to_string())?;
    // Served as long as the gateway is.
    gw.refreshers = refreshers.map(Arc::new);
    // As `gateway serve`: certificates from Key Vault are read from the values kept fresh.
    let https = policy.gateway.tls.is_some();
    let tls_source = gateway_bin::identity::tls_source(&resolved, Arc::new(secrets));
    let tls = gateway_bin::tls::load(&policy, &*tls_source)?;
    gateway_bin::tls::keep_renewed(&tls, &policy, tls_source);
    gw.tls = tls.gateway;
    if let Some(admin) = &mut gw.admin {
        admin.tls = tls.admin;
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let pool = gw.pool.clone();
    let rate_limit = gw.rate_limit.clone();
    let (tx, rx) = oneshot::channel();
    let task = tokio::spawn(serve::serve(
        listener,
        gw,
        async move {
            let _ = rx.await;
        },
        Duration::from_secs(5),
    ));
    Ok(Gateway {
        addr,
        pool,
        rate_limit,
        shutdown: Some(tx),
        task,
        https,
    })
}

/// The real file system and no environment: what [`gateway_with_identity`] reads beneath its `env`.
struct FilesOnly;

impl gateway_policy::secret::SecretSource for FilesOnly {
    fn env(&self, _name: &str) -> Option<String> {
        None
    }

    fn read_file(&self, path: &std::path::Path) -> std::io::Result<String> {
        std::fs::read_to_string(path)
    }
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
    let mut s = String::from(
        "[gateway]\nlisten = \"127.0.0.1:0\"\nmax_body_bytes = 65536\ndrain_seconds = 0\n\n",
    );
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
    /// Resolves once the accounting of every stream that ended has reached the limit store.
    pub async fn settled(&self) {
        self.rate_limit.settled().await;
    }

    /// Waits until no stream is in flight anywhere (polled: the server lets go of a body, or notices
    /// a closed connection, on its own time; the rate-limit layer starts a stream's accounting
    /// before the backend's count goes down), then until that accounting has reached the store
    /// (awaited).
    pub async fn stream_let_go(&self) {
        eventually("the gateway letting go of the stream", || async {
            let status = self.status().await;
            let in_flight: u64 = status["backends"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| b["in_flight"].as_u64().unwrap())
                .sum();
            (in_flight == 0).then_some(())
        })
        .await;
        self.settled().await;
    }

    /// A consumer's tokens this minute, as its limit store holds them.
    pub async fn tokens_this_minute(&self, consumer: &str) -> u64 {
        let status = self.status().await;
        let found = status["consumers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == consumer)
            .cloned()
            .unwrap_or_else(|| panic!("no consumer {consumer} on the status page"));
        found["usage"]["tokens_this_minute"].as_u64().unwrap()
    }

    pub fn url(&self, path: &str) -> String {
        let scheme = if self.https { "https" } else { "http" };
        format!("{scheme}://{}{path}", self.addr)
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

    /// The gateway's `/admin/status` JSON (open: these policies set no admin key).
    pub async fn status(&self) -> Value {
        let res = client()
            .get(self.url("/admin/status"))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        res.json().await.unwrap()
    }

    /// Whether the server has returned (after a shutdown: once its connections are done).
    pub fn has_stopped(&self) -> bool {
        self.task.is_finished()
    }

    /// Begins the shutdown (as SIGTERM does) without waiting for it: in-flight requests may finish.
    pub fn begin_shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    /// Stops accepting and waits for the server to finish.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), &mut self.task).await;
    }
}

/// How long to wait until at least `room` is left in the current minute of this machine's clock.
/// Per-minute limits count in calendar minutes (the gateway's memory store and Redis alike): a
/// scenario that crossed into the next minute would see its counters start over. The scenarios
/// take milliseconds; `room` is what a loaded machine might stretch them to.
pub fn minute_wait(room: Duration) -> Duration {
    let since_epoch = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let into_minute =
        Duration::from_millis(u64::try_from(since_epoch.as_millis() % 60_000).unwrap());
    let left = Duration::from_secs(60) - into_minute;
    if left >= room {
        Duration::ZERO
    } else {
        // Into the next minute, past its first millisecond.
        left + Duration::from_millis(50)
    }
}

/// Waits until at least `room` is left in the current minute ([`minute_wait`]).
pub async fn minute_room(room: Duration) {
    tokio::time::sleep(minute_wait(room)).await;
}

/// A client without connection reuse surprises: short timeouts so no test can hang.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// A small chat request body.
/// After region A (backend `a`, preferred) was throttled at `throttled`, calls `gpt-4o` until A serves
/// again: until then every call must go to region B (backend `b`) in one attempt and A must receive
/// nothing; A must not serve sooner than `rest` after its 429. Counts calls at both regions, which
/// start at one each.
pub async fn until_a_serves_again(
    gw: &Gateway,
    a: &RunningRegion,
    b: &RunningRegion,
    throttled: std::time::Instant,
    rest: Duration,
) {
    let count = |sim: &RunningRegion| sim.handle().request_count();
    let served_by =
        |res: &reqwest::Response| res.headers()["x-served-by"].to_str().unwrap().to_owned();
    let mut poll = Poller::new("region A serving again after its cooldown");
    let mut served_by_b = 1;
    loop {
        let res = gw.chat("gpt-4o", &chat("hi")).await;
        if served_by(&res) == "a (Region A)" {
            let rested = throttled.elapsed();
            assert!(rested >= rest, "A served again {rested:?} after its 429");
            break;
        }
        assert_eq!(served_by(&res), "b (Region B)");
        assert_eq!(res.headers()["x-gateway-attempts"], "1", "A is resting");
        served_by_b += 1;
        assert_eq!((count(a), count(b)), (1, served_by_b));
        poll.wait().await;
    }
    assert_eq!(count(a), 2);
}

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
