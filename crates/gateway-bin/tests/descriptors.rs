//! The gateway out of file descriptors, with the real binary under a low `ulimit -n`: the accept
//! loop backs off instead of spinning, counts what it could not accept, and upstream connections it
//! could not open are never held against the backends (issue 11, finding 2: at the descriptor limit
//! every circuit opened and `/readyz` stayed 503 after the clients left).
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs::File;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use gateway_e2e::{CLIENT_KEY, eventually, region_with};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends one chat request on a kept-alive connection and reads its answer whole (by its
/// `content-length`); returns the status line and body.
async fn chat_on(tcp: &mut TcpStream) -> (String, String) {
    let body = r#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":5}"#;
    let head = format!(
        "POST /openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21 HTTP/1.1\r\nhost: x\r\napi-key: {CLIENT_KEY}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let read = async {
        loop {
            let mut chunk = [0u8; 4096];
            let n = tcp.read(&mut chunk).await.unwrap();
            assert!(
                n > 0,
                "connection closed: {}",
                String::from_utf8_lossy(&buf)
            );
            buf.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&buf).into_owned();
            if let Some((head, rest)) = text.split_once("\r\n\r\n") {
                let length: usize = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length: ")
                            .map(|v| v.trim().parse().unwrap())
                    })
                    .unwrap();
                if rest.len() >= length {
                    return (head.lines().next().unwrap().to_owned(), rest.to_owned());
                }
            }
        }
    };
    tokio::time::timeout(gateway_e2e::PATIENCE, read)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_descriptors_the_gateway_backs_off_and_never_blames_a_backend() {
    let sim = region_with("Region A", &[("m", 100_000_000)], |c| c).await;
    let policy = common::policy_file(
        &[&sim],
        "[gateway]\nheader_read_timeout_ms = 60000\n\n[[consumers]]\nname = \"app\"\nkeys = [\"env:CLIENT_KEY\"]\n",
    );
    let port = common::free_port();
    let log = policy.path.with_file_name("stderr.log");
    let serve = common::serve_command(&policy, port, [("CLIENT_KEY", CLIENT_KEY)]);
    let args: Vec<String> = serve
        .get_args()
        .map(|a| format!("'{}'", a.to_string_lossy()))
        .collect();
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg(format!(
            "ulimit -n 64 && exec '{}' {}",
            common::GATEWAY,
            args.join(" ")
        ))
        .envs(serve.get_envs().filter_map(|(k, v)| Some((k, v?))))
        .stdout(Stdio::null())
        .stderr(Stdio::from(File::create(&log).unwrap()));
    let (gw, base) = common::spawn_gateway(&mut command, port).await;

    // A client connected before the descriptors run out.
    let mut worker = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    // Idle connections until the gateway cannot accept more.
    let mut fillers = Vec::new();
    for _ in 0..100 {
        fillers.push(TcpStream::connect(("127.0.0.1", port)).await.unwrap());
    }
    eventually("the gateway saying it is out of descriptors", || async {
        let stderr = std::fs::read_to_string(&log).unwrap();
        stderr.contains("out of file descriptors").then_some(())
    })
    .await;
    let exhausted = Instant::now();

    // Every upstream connect fails for want of a descriptor: the client is told, the backend is
    // not blamed (five failures in a row would eject it).
    for _ in 0..6 {
        let (status, body) = chat_on(&mut worker).await;
        assert!(status.contains(" 502 "), "{status} {body}");
        assert!(body.contains("out of connections"), "{body}");
    }

    // Let the gateway sit at its limit a moment, then let the clients go.
    tokio::time::sleep(Duration::from_secs(1)).await;
    drop(fillers);
    drop(worker);
    let held = exhausted.elapsed();

    let client = reqwest::Client::new();
    let health = eventually("the backend health answering", || async {
        let res = client
            .get(format!("{base}/healthz/backends"))
            .send()
            .await
            .ok()?;
        Some((res.status(), res.text().await.ok()?))
    })
    .await;
    assert_eq!(health.0, 200, "{}", health.1);
    assert!(health.1.contains("\"available\":1"), "{}", health.1);
    let metrics = client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let errors: f64 = metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix("gateway_accept_errors_total{kind=\"descriptors\"}")?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no accept errors counted:\n{metrics}"));
    assert!(errors >= 1.0);
    // Backing off from 10 ms to 1 s: a few a second at most. A spinning loop makes thousands.
    let bound = 20.0 * (held.as_secs_f64() + 1.0) + 20.0;
    assert!(errors <= bound, "{errors} accept errors in {held:?}");
    // And the answer was the gateway's own problem in the log, not the backend's.
    let stderr = std::fs::read_to_string(&log).unwrap();
    assert!(!stderr.contains("circuit opened"), "{stderr}");
    drop(gw);
}
