//! The `/admin` status page as a newcomer sees it during `gateway demo`: loaded in headless Chromium,
//! it lists the demo's regions, shows the priority-1 region cooling down once it is throttled, and
//! available again once its cooldown is over.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Proc, free_port};
use gateway_e2e::eventually_within;
use serde_json::{Value, json};

/// The page's DOM after its script has fetched `/admin/status` (a virtual-time budget lets its
/// timers and fetches run without waiting in real time).
fn dump_dom(url: &str) -> String {
    let profile = std::env::temp_dir().join(format!(
        "gw-chromium-{}-{}",
        std::process::id(),
        free_port()
    ));
    let out = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--virtual-time-budget=3000",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(url)
        .stderr(Stdio::null())
        .output();
    let _ = std::fs::remove_dir_all(&profile);
    let out = match out {
        Ok(out) => out,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            panic!("chromium is not installed: run ./scripts/test, which installs it")
        }
        Err(err) => panic!("cannot run chromium: {err}"),
    };
    assert!(out.status.success(), "chromium failed: {:?}", out.status);
    String::from_utf8(out.stdout).unwrap()
}

/// The state the page shows for `backend`, from its row's `data-state`.
fn shown_state(dom: &str, backend: &str) -> Option<String> {
    let marker = format!("data-backend=\"{backend}\" data-state=\"");
    let start = dom.find(&marker)? + marker.len();
    let len = dom[start..].find('"')?;
    Some(dom[start..start + len].to_owned())
}

async fn sweden_state(base: &str) -> String {
    let status: Value = reqwest::get(format!("{base}/admin/status"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    status["backends"][0]["state"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_the_demo_regions_turn_from_available_to_cooling_down_and_back() {
    let port = free_port();
    let mut demo = Proc::spawn(
        common::demo_command(port)
            .env("RUST_LOG", "warn")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
    );
    let (_banner, mut out) = common::demo_banner(&mut demo);
    // Keep reading the access log, so the demo never blocks on a full pipe.
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut out, &mut std::io::sink());
    });
    let base = format!("http://127.0.0.1:{port}");
    let page = format!("{base}/admin");

    let dom = dump_dom(&page);
    for backend in ["ptu-sweden", "ptu-pool-france", "standard-eastus2"] {
        assert_eq!(
            shown_state(&dom, backend).as_deref(),
            Some("available"),
            "{backend} in\n{dom}"
        );
    }
    assert!(dom.contains("Sweden Central"), "{dom}");
    assert!(dom.contains("demo-limited"), "consumers are listed:\n{dom}");

    // The priority-1 region takes three calls per 10 s: a few more throttle it.
    let client = reqwest::Client::new();
    let call = || {
        client
            .post(common::chat_url(&base))
            .header("api-key", "demo-key")
            .json(&json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 100}))
            .send()
    };
    let mut failed_over = false;
    for _ in 0..8 {
        let res = call().await.unwrap();
        assert_eq!(res.status(), 200);
        if res.headers()["x-served-by"] != "ptu-sweden (Sweden Central)" {
            failed_over = true;
            break;
        }
    }
    assert!(
        failed_over,
        "the demo's priority-1 region was never throttled"
    );

    let dom = dump_dom(&page);
    assert_eq!(
        shown_state(&dom, "ptu-sweden").as_deref(),
        Some("cooling_down"),
        "{dom}"
    );
    assert!(dom.contains(">cooling down<"), "{dom}");
    assert_eq!(
        shown_state(&dom, "ptu-pool-france").as_deref(),
        Some("available")
    );

    // Its retry-after is at most the 10 s window: bounded wait for it to come back.
    eventually_within(
        "ptu-sweden available again",
        Duration::from_secs(20),
        || async { (sweden_state(&base).await == "available").then_some(()) },
    )
    .await;
    let dom = dump_dom(&page);
    assert_eq!(
        shown_state(&dom, "ptu-sweden").as_deref(),
        Some("available"),
        "{dom}"
    );
}
