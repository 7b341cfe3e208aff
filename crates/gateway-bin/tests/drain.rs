//! Shutdown as load balancers and clients see it, with the real binary: on SIGTERM the gateway
//! drains (`/readyz` answers 503 while new connections are still accepted), then closes its
//! listener; a stream still running when the grace ends gets an error event, not a silent cut
//! (issue 11, finding 8).
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs::File;
use std::process::Stdio;
use std::time::Duration;

use futures_util::StreamExt;
use gateway_e2e::{CLIENT_KEY, eventually, region_with};

fn chat_body(max_tokens: u32, stream: bool) -> String {
    format!(
        r#"{{"messages":[{{"role":"user","content":"story"}}],"max_tokens":{max_tokens},"stream":{stream}}}"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_with_readyz_503_then_closes_the_listener() {
    let sim = region_with("Region A", &[("m", 100_000_000)], |c| c).await;
    let policy = common::policy_file(
        &[&sim],
        "[gateway]\ndrain_seconds = 5\n\n[[consumers]]\nname = \"app\"\nkeys = [\"env:CLIENT_KEY\"]\n",
    );
    let port = common::free_port();
    let log = policy.path.with_file_name("stderr.log");
    let (mut gw, base) = common::spawn_gateway(
        common::serve_command(
            &policy,
            port,
            [("CLIENT_KEY", CLIENT_KEY), ("RUST_LOG", "info")],
        )
        .stderr(Stdio::from(File::create(&log).unwrap())),
        port,
    )
    .await;
    assert_eq!(
        reqwest::get(format!("{base}/readyz"))
            .await
            .unwrap()
            .status(),
        200
    );

    common::sigterm(&gw);
    // Each look is a new connection: the listener still accepts while /readyz says 503.
    eventually("/readyz answering 503", || async {
        let res = reqwest::get(format!("{base}/readyz")).await.ok()?;
        (res.status() == 503).then_some(())
    })
    .await;
    let res = reqwest::Client::new()
        .post(common::chat_url(&base))
        .header("api-key", CLIENT_KEY)
        .header("content-type", "application/json")
        .body(chat_body(5, false))
        .send()
        .await
        .unwrap();
    assert_eq!(
        res.status(),
        200,
        "a new connection during the drain is served"
    );

    // After the drain the listener closes and the process exits cleanly.
    let status = common::wait_exit(&mut gw, Duration::from_secs(30));
    assert!(status.success(), "{status:?}");
    assert!(reqwest::get(format!("{base}/healthz")).await.is_err());
    let stderr = std::fs::read_to_string(&log).unwrap();
    assert!(stderr.contains("draining"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_cut_at_the_end_of_the_grace_ends_with_an_error_event() {
    // 100 tokens, 200 ms apart: far longer than the 1 s grace.
    let sim = region_with("Region A", &[("m", 100_000_000)], |c| {
        c.token_delay(Duration::from_millis(200))
    })
    .await;
    let policy = common::policy_file(
        &[&sim],
        "[gateway]\ndrain_seconds = 0\nshutdown_grace_seconds = 1\n\n[[consumers]]\nname = \"app\"\nkeys = [\"env:CLIENT_KEY\"]\n",
    );
    let port = common::free_port();
    let access_log = policy.path.with_file_name("access.log");
    let (mut gw, base) = common::spawn_gateway(
        common::serve_command(&policy, port, [("CLIENT_KEY", CLIENT_KEY)])
            .stdout(Stdio::from(File::create(&access_log).unwrap())),
        port,
    )
    .await;
    let res = reqwest::Client::new()
        .post(common::chat_url(&base))
        .header("api-key", CLIENT_KEY)
        .header("content-type", "application/json")
        .body(chat_body(100, true))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let mut body = res.bytes_stream();
    let mut text = String::from_utf8_lossy(&body.next().await.unwrap().unwrap()).into_owned();

    common::sigterm(&gw);
    while let Some(chunk) = body.next().await {
        text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
    }
    let last = text.trim_end().rsplit("\n\n").next().unwrap();
    assert!(last.starts_with("event: error\ndata: "), "{text}");
    let event: serde_json::Value =
        serde_json::from_str(last.trim_start_matches("event: error\ndata: ")).unwrap();
    assert_eq!(event["error"]["code"], "gateway_shutdown");
    assert!(!text.contains("[DONE]"), "{text}");

    let status = common::wait_exit(&mut gw, Duration::from_secs(30));
    assert!(status.success(), "{status:?}");
    let log = std::fs::read_to_string(&access_log).unwrap();
    let line: serde_json::Value = serde_json::from_str(log.lines().last().unwrap()).unwrap();
    assert_eq!(line["shutdown"], true, "{log}");
    assert_eq!(line["client_closed"], false, "{log}");
    assert_eq!(line["stream"], true, "{log}");
}
