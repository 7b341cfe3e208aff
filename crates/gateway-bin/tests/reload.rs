//! Policy reload in the real `gateway serve`: SIGHUP and a watched policy file swap the policy in
//! without dropping a request; an invalid policy leaves the old one serving; what the gateway
//! learnt (consumer counters, backend health) carries over.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{GATEWAY, Proc};
use futures_util::StreamExt;
use gateway_bin::app::sha256_hex;
use gateway_e2e::eventually;
use serde_json::Value;
use simulator::{Fault, RunningRegion};

/// A gateway process serving a policy file in its own directory, its stderr kept in a file.
struct Served {
    proc: Proc,
    base: String,
    dir: PathBuf,
    client: reqwest::Client,
}

impl Served {
    async fn start(sim: &RunningRegion, consumers: &str, args: &[&str]) -> Self {
        let dir = common::temp_dir();
        std::fs::write(dir.join("a.key"), "key-a\n").unwrap();
        std::fs::write(dir.join("b.key"), "key-b\n").unwrap();
        std::fs::write(dir.join("c.key"), "key-c\n").unwrap();
        std::fs::write(dir.join("policy.toml"), policy(sim, consumers)).unwrap();
        let port = common::free_port();
        let stderr = std::fs::File::create(dir.join("stderr.log")).unwrap();
        let (proc, base) = common::spawn_gateway(
            Command::new(GATEWAY)
                .args([
                    "serve",
                    "--listen",
                    &format!("127.0.0.1:{port}"),
                    "--policy",
                ])
                .arg(dir.join("policy.toml"))
                .args(args)
                .env("RUST_LOG", "info")
                .envs(gateway_e2e::backend_env(&[sim]))
                .stdout(Stdio::null())
                .stderr(stderr),
            port,
        )
        .await;
        Self {
            proc,
            base,
            dir,
            client: reqwest::Client::new(),
        }
    }

    fn policy_path(&self) -> PathBuf {
        self.dir.join("policy.toml")
    }

    fn write_policy(&self, text: &str) {
        std::fs::write(self.policy_path(), text).unwrap();
    }

    fn sighup(&self) {
        let status = Command::new("kill")
            .args(["-HUP", &self.proc.0.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr.log")).unwrap()
    }

    async fn status(&self) -> Value {
        self.client
            .get(format!("{}/admin/status", self.base))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    async fn loaded_sha256(&self) -> String {
        self.status().await["policy"]["sha256"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// Waits until the gateway serves the policy file as it is now.
    async fn serving_the_file(&self) {
        let want = sha256_hex(&std::fs::read(self.policy_path()).unwrap());
        eventually("the reloaded policy being served", || async {
            (self.loaded_sha256().await == want).then_some(())
        })
        .await;
    }

    async fn reloads(&self, outcome: &str) -> u64 {
        let text = self
            .client
            .get(format!("{}/metrics", self.base))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let prefix = format!("gateway_reloads_total{{outcome=\"{outcome}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .map_or(0, |v| v.trim().parse().unwrap())
    }

    async fn chat(&self, key: &str, body: &'static str) -> reqwest::Response {
        self.client
            .post(common::chat_url(&self.base))
            .header("api-key", key)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap()
    }

    async fn chat_status(&self, key: &str) -> u16 {
        let res = self.chat(key, SHORT).await;
        let status = res.status().as_u16();
        res.bytes().await.unwrap();
        status
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

const SHORT: &str = r#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":5}"#;

/// One backend on `sim` serving `gpt-4o`, and `consumers` (TOML), whose keys are `file:a.key`
/// (`key-a`) and `file:b.key` (`key-b`).
fn policy(sim: &RunningRegion, consumers: &str) -> String {
    format!(
        "[[deployments]]\nname = \"gpt-4o\"\n\n{}\n{consumers}",
        gateway_e2e::backend_toml("swc", sim, "Sweden Central", 1, 1, &[("gpt-4o", "gpt4o")]),
    )
}

const BOTH_KEYS: &str = "[[consumers]]\nname = \"app\"\nkeys = [\"file:a.key\", \"file:b.key\"]\n";
const ONLY_B: &str = "[[consumers]]\nname = \"app\"\nkeys = [\"file:b.key\"]\n";

async fn slow_region() -> RunningRegion {
    gateway_e2e::region_with("Sweden Central", &[("gpt4o", 1_000_000)], |c| {
        c.token_delay(Duration::from_millis(30))
    })
    .await
}

/// Finding 4: SIGHUP ended the process, cutting its streams, and a revoked key kept working until a
/// restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_revokes_a_key_while_a_stream_opened_before_finishes_intact() {
    let sim = slow_region().await;
    let gw = Served::start(&sim, BOTH_KEYS, &[]).await;
    let first_version = gw.loaded_sha256().await;
    assert_eq!(
        first_version,
        sha256_hex(policy(&sim, BOTH_KEYS).as_bytes())
    );

    // About 150 tokens 30 ms apart: still streaming when the policy changes under it.
    let res = gw
        .chat(
            "key-a",
            r#"{"messages":[{"role":"user","content":"story"}],"max_tokens":150,"stream":true}"#,
        )
        .await;
    assert_eq!(res.status(), 200);
    let mut body = res.bytes_stream();
    let mut text = String::from_utf8_lossy(&body.next().await.unwrap().unwrap()).into_owned();

    gw.write_policy(&policy(&sim, ONLY_B));
    gw.sighup();
    gw.serving_the_file().await;
    // The stream began on the old policy, and is still open on the backend it started on.
    assert_eq!(gw.status().await["backends"][0]["in_flight"], 1);

    assert_eq!(gw.chat_status("key-a").await, 401, "the revoked key");
    assert_eq!(gw.chat_status("key-b").await, 200, "the key that stays");

    while let Some(chunk) = body.next().await {
        text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
    }
    assert!(
        text.trim_end().ends_with("data: [DONE]"),
        "the stream was cut: {text}"
    );
    assert!(!text.contains("\"error\""), "{text}");
    assert_eq!(gw.reloads("ok").await, 1);
    assert!(gw.stderr().contains("policy reloaded"), "{}", gw.stderr());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_policy_leaves_the_old_one_serving() {
    let sim = gateway_e2e::region("Sweden Central", &[("gpt4o", 1_000_000)]).await;
    let gw = Served::start(&sim, BOTH_KEYS, &[]).await;
    let version = gw.loaded_sha256().await;

    // Not a policy: an unknown field.
    gw.write_policy(&format!("{}\nbogus = 1\n", policy(&sim, ONLY_B)));
    gw.sighup();
    eventually("the failed reload counted", || async {
        (gw.reloads("error").await == 1).then_some(())
    })
    .await;
    assert_eq!(gw.loaded_sha256().await, version);
    assert_eq!(gw.chat_status("key-a").await, 200, "the old policy serves");

    // A valid policy whose secret cannot be resolved is refused too, before anything changes.
    gw.write_policy(&policy(
        &sim,
        "[[consumers]]\nname = \"app\"\nkeys = [\"file:missing.key\"]\n",
    ));
    gw.sighup();
    eventually("the second failed reload counted", || async {
        (gw.reloads("error").await == 2).then_some(())
    })
    .await;
    assert_eq!(gw.loaded_sha256().await, version);
    assert_eq!(gw.chat_status("key-a").await, 200);
    assert_eq!(gw.reloads("ok").await, 0);

    let log = gw.stderr();
    assert_eq!(
        log.matches("policy reload failed").count(),
        2,
        "each failure is logged once: {log}"
    );
    assert!(log.contains("bogus"), "the log says what is wrong: {log}");
    assert!(log.contains("missing.key"), "{log}");
    assert!(!log.contains("key-a"), "no secret in the log: {log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_counters_and_backend_health_carry_over() {
    let sim = gateway_e2e::region("Sweden Central", &[("gpt4o", 1_000_000)]).await;
    let limited = "[[consumers]]\nname = \"app\"\nkeys = [\"file:a.key\"]\n\
        [consumers.limits]\nrequests_per_minute = 2\n\n\
        [[consumers]]\nname = \"ops\"\nkeys = [\"file:b.key\"]\n";
    let gw = Served::start(&sim, limited, &[]).await;
    assert_eq!(gw.chat_status("key-a").await, 200);
    assert_eq!(gw.chat_status("key-a").await, 200);

    // The region throttles once (for 30 s): the backend rests.
    sim.handle()
        .set_faults(vec![Fault::status_with_retry_after(429, 30_000).count(1)]);
    assert_eq!(gw.chat_status("key-b").await, 429);
    assert_eq!(gw.status().await["backends"][0]["state"], "cooling_down");

    // Another consumer added; the first one's limits unchanged.
    let reloaded = format!("{limited}\n[[consumers]]\nname = \"new\"\nkeys = [\"file:c.key\"]\n");
    gw.write_policy(&policy(&sim, &reloaded));
    gw.sighup();
    gw.serving_the_file().await;

    let status = gw.status().await;
    assert_eq!(status["backends"][0]["state"], "cooling_down", "{status}");
    assert_eq!(
        status["consumers"][0]["usage"]["requests_this_minute"], 2,
        "{status}"
    );
    let res = gw.chat("key-a", SHORT).await;
    assert_eq!(
        res.status(),
        429,
        "the consumer's count survived the reload"
    );
    assert_eq!(res.headers()["x-gateway-limit"], "requests");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watched_policy_file_is_reloaded_when_it_changes() {
    let sim = gateway_e2e::region("Sweden Central", &[("gpt4o", 1_000_000)]).await;
    let gw = Served::start(&sim, BOTH_KEYS, &["--watch-policy"]).await;
    assert_eq!(gw.chat_status("key-a").await, 200);

    gw.write_policy(&policy(&sim, ONLY_B));
    gw.serving_the_file().await;
    assert_eq!(gw.chat_status("key-a").await, 401);

    // A broken edit is reported once, however long it stays.
    gw.write_policy("this is not toml");
    eventually("the failed reload counted", || async {
        (gw.reloads("error").await == 1).then_some(())
    })
    .await;
    assert_eq!(gw.chat_status("key-b").await, 200);
    // Long enough for the watch to look again several times.
    tokio::time::sleep(3 * gateway_bin::reload::WATCH_EVERY).await;
    assert_eq!(gw.reloads("error").await, 1);
    assert_eq!(gw.stderr().matches("policy reload failed").count(), 1);
}

/// A consumer key kept in Key Vault is read once into the consumers' key table: when it rotates,
/// the refresh notices and reloads the policy, so the new key is served and the old one refused,
/// with no SIGHUP and no restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_key_rotated_in_key_vault_reloads_the_policy() {
    let stub =
        gateway_e2e::azure_stub::AzureStub::start(std::time::Duration::from_secs(3600)).await;
    stub.accept_key("backend-key", true);
    stub.put_secret("app-key", "client-key-1");
    let vault = "keyvault:https://stub-vault.vault.azure.net/secrets";
    let dir = common::temp_dir();
    let policy = format!(
        "[gateway]\ndrain_seconds = 0\n\n[key_vault]\nrefresh_seconds = 1\n\n\
         [[deployments]]\nname = \"gpt-4o\"\n\n{}\n\
         [[consumers]]\nname = \"app\"\nkeys = [\"{vault}/app-key\"]\n",
        stub.backend_toml("aoai", 1, "api_key = \"env:BACKEND_KEY\"")
    );
    std::fs::write(dir.join("policy.toml"), policy).unwrap();
    let port = common::free_port();
    let stderr = std::fs::File::create(dir.join("stderr.log")).unwrap();
    let (_proc, base) = common::spawn_gateway(
        Command::new(GATEWAY)
            .args([
                "serve",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--policy",
            ])
            .arg(dir.join("policy.toml"))
            .env_clear()
            .envs(stub.env())
            .env("BACKEND_KEY", "backend-key")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(stderr),
        port,
    )
    .await;
    let client = reqwest::Client::new();
    let status = |key: &'static str| {
        let (client, base) = (client.clone(), base.clone());
        async move {
            client
                .post(common::chat_url(&base))
                .header("api-key", key)
                .json(&serde_json::json!({"messages":[{"role":"user","content":"hi"}]}))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(status("client-key-1").await, 200);
    assert_eq!(status("client-key-2").await, 401);

    stub.put_secret("app-key", "client-key-2");
    eventually("the rotated consumer key served", || async {
        (status("client-key-2").await == 200).then_some(())
    })
    .await;
    assert_eq!(status("client-key-1").await, 401);
    let log = std::fs::read_to_string(dir.join("stderr.log")).unwrap();
    assert!(
        log.contains("trigger=\"key_vault\"") || log.contains("trigger=key_vault"),
        "{log}"
    );
    assert!(!log.contains("client-key-"), "no key in the log: {log}");
    stub.stop();
}
