//! The `gateway` binary as a user runs it: `check`, `serve` with graceful shutdown, and `demo`.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{GATEWAY, Proc};
use futures_util::StreamExt;

fn policies_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policies")
}

#[test]
fn every_policy_in_policies_checks() {
    let mut checked = 0;
    for entry in std::fs::read_dir(policies_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        let out = Command::new(GATEWAY)
            .args(["check", "--skip-secrets", "--policy"])
            .arg(&path)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains("policy OK"), "{stdout}");
        assert!(stdout.contains("priority 1"), "{stdout}");
        checked += 1;
    }
    assert!(
        checked >= 2,
        "policies/ holds demo.toml and azure-multi-region.toml"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_unresolvable_secrets_with_their_location() {
    // The policy reads Key Vault with the gateway's identity: both are the test's stand-in, on
    // 127.0.0.1, and nothing of the ambient environment is passed on.
    let stub =
        gateway_e2e::azure_stub::AzureStub::start(std::time::Duration::from_secs(3600)).await;
    stub.put_secret("aoai-key-std-weu", "weu-key-12345");
    let out = Command::new(GATEWAY)
        .args(["check", "--policy"])
        .arg(policies_dir().join("azure-multi-region.toml"))
        .env_clear()
        .envs(stub.env())
        .envs([
            ("GATEWAY_KEY_SUPPORT_CHATBOT", "k1"),
            ("GATEWAY_KEY_SEARCH_INDEXER", "k2"),
            ("GATEWAY_KEY_SEARCH_INDEXER_NEXT", "k3"),
            ("GATEWAY_KEY_NIGHTLY_REPORTS", "k5"),
            ("GATEWAY_ADMIN_KEY", "k4"),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    // The line of that reference in the example policy, which others edit.
    let text = std::fs::read_to_string(policies_dir().join("azure-multi-region.toml")).unwrap();
    let line = 1 + text
        .lines()
        .position(|l| l.contains("secrets/aoai-key-std-eus2\""))
        .unwrap();
    assert_eq!(
        stderr.lines().next().unwrap(),
        format!("policies/azure-multi-region.toml:{line}:11: backends[2].api_key: cannot read Key Vault secret \
         `https://contoso-aoai-kv.vault.azure.net/secrets/aoai-key-std-eus2`: Key Vault answered 404 Not Found (SecretNotFound)")
            .replace("policies/", &format!("{}/", policies_dir().display())),
        "{stderr}"
    );
    assert!(!stderr.contains("weu-key-12345"), "{stderr}");
}

#[test]
fn check_refuses_what_serve_would_refuse() {
    let dir = common::temp_dir();
    let file = dir.join("p.toml");
    let policy = |extra: &str| {
        format!(
            "[[deployments]]\nname = \"gpt-4o\"\n\n[[backends]]\nname = \"a\"\nregion = \"r\"\nendpoint = \"https://a.openai.azure.com\"\napi_key = \"env:CHECK_KEY\"\ndeployments = {{ gpt-4o = \"g\" }}\n\n[[consumers]]\nname = \"app\"\nkeys = [\"env:CHECK_CLIENT\"]\n{extra}"
        )
    };
    let check = |env: &[(&str, &str)]| {
        let mut command = Command::new(GATEWAY);
        command.args(["check", "--policy"]).arg(&file);
        command
            .env("CHECK_KEY", "backend-key")
            .env("CHECK_CLIENT", "client-key");
        for (k, v) in env {
            command.env(k, v);
        }
        command.output().unwrap()
    };

    std::fs::write(&file, policy("")).unwrap();
    let out = check(&[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A backend key with a newline inside: `serve` cannot send it as a header.
    let out = check(&[("CHECK_KEY", "abc\ndef")]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("backends `a`"), "{stderr}");
    assert!(
        !stderr.contains("abc"),
        "the key itself is never shown: {stderr}"
    );

    // A Redis URL the client cannot use.
    std::fs::write(
        &file,
        policy("\n[rate_limit]\nstore = \"redis\"\nredis_url = \"env:CHECK_REDIS\"\n"),
    )
    .unwrap();
    let out = check(&[("CHECK_REDIS", "not a url")]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("rate_limit.redis_url"), "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn check_reports_policy_errors_precisely() {
    let dir = common::temp_dir();
    let file = dir.join("bad.toml");
    std::fs::write(
        &file,
        "[[deployments]]\nname = \"gpt-4o\"\n\n[[backends]]\nname = \"a\"\nregion = \"r\"\nendpoint = \"ftp://x\"\napi_key = \"sk-literal\"\nweight = 0\ndeployments = { gpt-4o = \"g\" }\n",
    )
    .unwrap();
    let out = Command::new(GATEWAY)
        .args(["check", "--policy"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 3, "{stderr}");
    assert!(
        lines[0].contains("bad.toml:7:12: backends[0].endpoint:"),
        "{stderr}"
    );
    assert!(
        lines[1].contains("bad.toml:8:11: backends[0].api_key:"),
        "{stderr}"
    );
    assert!(
        lines[2].contains("bad.toml:9:10: backends[0].weight:"),
        "{stderr}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_command_lines_print_usage() {
    let out = Command::new(GATEWAY).arg("serve").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--policy"));
    let out = Command::new(GATEWAY).arg("--help").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("gateway demo"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_an_in_flight_stream_finish() {
    let sim = gateway_e2e::region_with("Sweden Central", &[("gpt4o", 100_000)], |c| {
        c.token_delay(Duration::from_millis(40))
    })
    .await;
    let dir = common::temp_dir();
    let port = common::free_port();
    let policy = dir.join("serve.toml");
    std::fs::write(
        &policy,
        format!(
            "[gateway]\nlisten = \"127.0.0.1:{port}\"\nshutdown_grace_seconds = 20\n\n[[deployments]]\nname = \"gpt-4o\"\n\n{}\n[[consumers]]\nname = \"t\"\nkeys = [\"file:client.key\"]\n",
            gateway_e2e::backend_toml(
                "swc",
                &sim,
                "Sweden Central",
                1,
                1,
                &[("gpt-4o", "gpt4o")]
            ),
        ),
    )
    .unwrap();
    std::fs::write(dir.join("client.key"), "client-secret\n").unwrap();

    // The policy sets the listen address: no `--listen`.
    let (mut child, base) = common::spawn_gateway(
        Command::new(GATEWAY)
            .args(["serve", "--policy"])
            .arg(&policy)
            .envs(gateway_e2e::backend_env(&[&sim]))
            .stderr(Stdio::piped()),
        port,
    )
    .await;
    let client = reqwest::Client::new();

    // About 30 tokens x 40 ms: the stream is still running when SIGTERM arrives.
    let res = client
        .post(common::chat_url(&base))
        .header("api-key", "client-secret")
        .body(r#"{"messages":[{"role":"user","content":"story"}],"max_tokens":30,"stream":true}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let mut body = res.bytes_stream();
    let first = body.next().await.unwrap().unwrap();
    assert!(!first.is_empty());
    common::sigterm(&child);

    let mut text = String::from_utf8_lossy(&first).into_owned();
    while let Some(chunk) = body.next().await {
        text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
    }
    assert!(
        text.trim_end().ends_with("data: [DONE]"),
        "stream was cut: {text}"
    );
    let status = common::wait_exit(&mut child, Duration::from_secs(20));
    assert!(status.success(), "{status:?}");
    assert!(
        client.get(format!("{base}/healthz")).send().await.is_err(),
        "no longer accepting"
    );
    let mut stderr = String::new();
    child
        .0
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(stderr.contains("SIGTERM"), "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Extracts the shell commands the demo prints: lines from `curl`/`for` up to the last one not
/// ending in a backslash.
fn printed_commands(banner: &str) -> Vec<String> {
    let mut commands = Vec::new();
    let mut current: Option<String> = None;
    for line in banner.lines() {
        if let Some(cmd) = current.as_mut() {
            cmd.push('\n');
            cmd.push_str(line);
        } else if line.starts_with("curl ") || line.starts_with("for ") {
            current = Some(line.to_owned());
        } else {
            continue;
        }
        if !line.ends_with('\\') {
            commands.extend(current.take());
        }
    }
    commands
}

#[test]
fn demo_prints_curl_lines_that_work() {
    let port = common::free_port();
    let mut child = Proc::spawn(&mut common::demo_command(port));
    let (banner, _stdout) = common::demo_banner(&mut child);
    let commands = printed_commands(&banner);
    assert_eq!(
        commands.len(),
        6,
        "chat, stream, embeddings, failover loop, consumer limit loop, tier loop:\n{banner}"
    );
    let run = |cmd: &str| {
        let out = Command::new("sh").arg("-c").arg(cmd).output().unwrap();
        assert!(out.status.success(), "{cmd}");
        String::from_utf8(out.stdout).unwrap()
    };

    let chat = run(&commands[0]);
    assert!(chat.starts_with("HTTP/1.1 200"), "{chat}");
    assert!(
        chat.contains("x-served-by: ptu-sweden (Sweden Central)"),
        "{chat}"
    );
    assert!(chat.contains("\"chat.completion\""), "{chat}");

    let stream = run(&commands[1]);
    assert!(stream.contains("chat.completion.chunk"), "{stream}");
    assert!(stream.trim_end().ends_with("data: [DONE]"), "{stream}");

    let embeddings = run(&commands[2]);
    assert!(embeddings.starts_with("HTTP/1.1 200"), "{embeddings}");
    assert!(embeddings.contains("\"embedding\""), "{embeddings}");

    // Sweden's small quota is spent by the calls above and the loop: traffic moves to France.
    let served: Vec<String> = run(&commands[3])
        .lines()
        .map(|l| l.trim().to_ascii_lowercase())
        .collect();
    assert_eq!(served.len(), 8, "{served:?}");
    assert!(
        served.iter().all(|l| l.starts_with("x-served-by:")),
        "{served:?}"
    );
    assert!(
        served.iter().any(|l| l.contains("ptu-pool-france")),
        "{served:?}"
    );

    // The demo's limited consumer may make 3 calls a minute, counted in calendar minutes: its loop
    // starts with room for itself in the current one.
    std::thread::sleep(gateway_e2e::minute_wait(Duration::from_secs(10)));
    let limited = run(&commands[4]).to_ascii_lowercase();
    assert_eq!(limited.matches("http/1.1 200").count(), 3, "{limited}");
    assert!(limited.contains("http/1.1 429"), "{limited}");
    assert!(limited.contains("x-gateway-limit: requests"), "{limited}");
    assert!(limited.contains("retry-after:"), "{limited}");

    // Tiers: the low-tier batch consumer leaves the shared pool for Standard, the critical one
    // stays on PTU. Both PTUs said their request window was spent above: once they take traffic
    // again.
    let status = format!("curl -s http://127.0.0.1:{port}/admin/status");
    gateway_e2e::eventually_blocking("both PTUs available", Duration::from_secs(30), || {
        let status: serde_json::Value = serde_json::from_str(&run(&status)).ok()?;
        let available = |i: usize| status["backends"][i]["state"] == "available";
        (available(0) && available(1)).then_some(())
    });
    let tiers = run(&commands[5]).to_ascii_lowercase();
    let (batch, critical): (Vec<&str>, Vec<&str>) =
        tiers.lines().partition(|l| l.starts_with("demo-key-batch"));
    assert_eq!((batch.len(), critical.len()), (5, 5), "{tiers}");
    assert!(
        batch.iter().any(|l| l.contains("standard-eastus2")),
        "{tiers}"
    );
    assert!(critical.iter().all(|l| l.contains("ptu-")), "{tiers}");

    common::sigterm(&child);
    assert!(common::wait_exit(&mut child, Duration::from_secs(15)).success());
}
