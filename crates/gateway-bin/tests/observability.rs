//! Metrics, access log and status JSON of the real `gateway serve` binary in front of simulated
//! regions: scraped and read after scripted scenarios whose every count is known in advance or
//! observed by the client.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{PolicyFile, Proc, free_port};
use futures_util::StreamExt;
use gateway_e2e::eventually;
use serde_json::{Value, json};
use simulator::{Fault, RunningRegion};

const CLIENT_KEY: &str = "obs-client-key";
const LIMITED_KEY: &str = "obs-limited-key";
const ADMIN_KEY: &str = "obs-admin-key";
/// Sent as prompt content: must never reach the access log.
const PROMPT: &str = "a confidential prompt";

async fn region(name: &str, token_delay: Duration) -> RunningRegion {
    gateway_e2e::region_with(name, &[("m", 10_000_000)], |c| c.token_delay(token_delay)).await
}

/// A policy with regions r0, r1.. (priority in order), the consumers `app` and `limited` (one
/// request per minute), and `extra` TOML.
fn policy_file(regions: &[&RunningRegion], extra: &str) -> PolicyFile {
    common::policy_file(
        regions,
        &format!(
            "[[consumers]]\nname = \"app\"\nkeys = [\"env:CLIENT_KEY\"]\n\n\
             [[consumers]]\nname = \"limited\"\nkeys = [\"env:LIMITED_KEY\"]\n\
             [consumers.limits]\nrequests_per_minute = 1\ntoken_quota = 1000000\ntoken_quota_period = \"monthly\"\n\n{extra}"
        ),
    )
}

/// A `gateway serve` process, killed on drop, whose stdout lines (the access log) are collected.
struct Gateway {
    _proc: Proc,
    base: String,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Gateway {
    async fn start(policy: &PolicyFile, admin_port: Option<u16>) -> Self {
        let port = free_port();
        let mut proc = Proc::spawn(
            common::serve_command(
                policy,
                port,
                [
                    ("CLIENT_KEY", CLIENT_KEY),
                    ("LIMITED_KEY", LIMITED_KEY),
                    ("ADMIN_KEY", ADMIN_KEY),
                ],
            )
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .stdout(Stdio::piped()),
        );
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stdout = proc.0.stdout.take().unwrap();
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                sink.lock().unwrap().push(line);
            }
        });
        let gw = Gateway {
            _proc: proc,
            base: format!("http://127.0.0.1:{port}"),
            lines,
        };
        let ready = [Some(port), admin_port];
        for port in ready.into_iter().flatten() {
            common::wait_until_answers(&format!("http://127.0.0.1:{port}/metrics")).await;
        }
        gw
    }

    async fn chat(&self, key: &str, id: &str, body: Value) -> reqwest::Response {
        reqwest::Client::new()
            .post(common::chat_url(&self.base))
            .header("api-key", key)
            .header("x-request-id", id)
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    /// The access log line of request `id`, waiting for it a bounded time (the line is written
    /// when the response ends, which the client may see first).
    async fn log_line(&self, id: &str) -> Value {
        let what = format!("the access log line of {id}");
        let line = eventually(&what, || async {
            self.lines
                .lock()
                .unwrap()
                .iter()
                .find(|l| l.contains(&format!("\"request_id\":\"{id}\"")))
                .cloned()
        })
        .await;
        let backend_keys = ["Region 0", "Region 1"].map(gateway_e2e::backend_key);
        for secret in [CLIENT_KEY, LIMITED_KEY, PROMPT]
            .into_iter()
            .chain(backend_keys.iter().map(String::as_str))
        {
            assert!(
                !line.contains(secret),
                "the access log leaks {secret}: {line}"
            );
        }
        serde_json::from_str(&line).unwrap()
    }

    async fn metrics(&self) -> Metrics {
        let text = reqwest::get(format!("{}/metrics", self.base))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        Metrics::parse(&text)
    }
}

fn message(max_tokens: u64) -> Value {
    json!({"messages": [{"role": "user", "content": PROMPT}], "max_tokens": max_tokens})
}

/// Samples of the exposition text, keyed by name and sorted labels.
struct Metrics {
    samples: BTreeMap<(String, Vec<(String, String)>), f64>,
    text: String,
}

impl Metrics {
    fn parse(text: &str) -> Self {
        let mut samples = BTreeMap::new();
        for line in text
            .lines()
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
        {
            let (series, value) = line.rsplit_once(' ').unwrap();
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, rest.strip_suffix('}').unwrap()),
                None => (series, ""),
            };
            let mut pairs: Vec<(String, String)> = labels
                .split("\",")
                .filter(|p| !p.is_empty())
                .map(|p| {
                    let (k, v) = p.split_once("=\"").unwrap();
                    (k.to_owned(), v.trim_end_matches('"').to_owned())
                })
                .collect();
            pairs.sort();
            samples.insert((name.to_owned(), pairs), value.parse::<f64>().unwrap());
        }
        Metrics {
            samples,
            text: text.to_owned(),
        }
    }

    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut key: Vec<(String, String)> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        key.sort();
        self.samples.get(&(name.to_owned(), key)).copied()
    }

    /// The value of a series that must exist.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels)
            .unwrap_or_else(|| panic!("no {name}{labels:?} in\n{}", self.text))
    }

    /// Every series of `name`, for exact-set assertions.
    fn series(&self, name: &str) -> Vec<(Vec<(String, String)>, f64)> {
        self.samples
            .iter()
            .filter(|((n, _), _)| n == name)
            .map(|((_, l), v)| (l.clone(), *v))
            .collect()
    }
}

fn usage_of(v: &Value) -> (u64, u64) {
    (
        v["usage"]["prompt_tokens"].as_u64().unwrap(),
        v["usage"]["completion_tokens"].as_u64().unwrap(),
    )
}

fn served_by(res: &reqwest::Response) -> String {
    res.headers()["x-served-by"].to_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_access_log_after_a_failover_a_stream_a_limit_and_a_throttle() {
    let r0 = region("Region 0", Duration::ZERO).await;
    let r1 = region("Region 1", Duration::ZERO).await;
    let gw = Gateway::start(&policy_file(&[&r0, &r1], ""), None).await;
    // Tokens by (consumer, backend), as the client saw them.
    let mut tokens: BTreeMap<(&str, &str), (u64, u64)> = BTreeMap::new();
    let mut add = |consumer, backend, (p, c): (u64, u64)| {
        let t = tokens.entry((consumer, backend)).or_default();
        t.0 += p;
        t.1 += c;
    };

    // 1. Region 0 answers 503 once: the call fails over to region 1.
    r0.handle().set_faults(vec![Fault::status(503).count(1)]);
    let res = gw.chat(CLIENT_KEY, "obs-failover", message(20)).await;
    assert_eq!(res.status(), 200);
    assert_eq!(served_by(&res), "r1 (Region 1)");
    let body: Value = res.json().await.unwrap();
    add("app", "r1", usage_of(&body));
    let failover_usage = usage_of(&body);

    // 2. A stream served by region 0, asking for its usage chunk.
    let res = gw
        .chat(
            CLIENT_KEY,
            "obs-stream",
            json!({"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 8,
                   "stream": true, "stream_options": {"include_usage": true}}),
        )
        .await;
    assert_eq!(served_by(&res), "r0 (Region 0)");
    let text = res.text().await.unwrap();
    let usage_chunk: Value = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .find(|v| v["usage"].is_object())
        .expect("a usage chunk");
    add("app", "r0", usage_of(&usage_chunk));
    let stream_usage = usage_of(&usage_chunk);

    // 3. The limited consumer (one request a minute): admitted, then refused by the gateway. A
    // minute that rolls over between two calls admits one more; the counts follow what was seen.
    let (mut limited_ok, mut limited_refused) = (0, 0);
    for i in 0..3 {
        let res = gw
            .chat(LIMITED_KEY, &format!("obs-limited-{i}"), message(20))
            .await;
        match res.status().as_u16() {
            200 => {
                assert_eq!(served_by(&res), "r0 (Region 0)");
                limited_ok += 1;
                add("limited", "r0", usage_of(&res.json().await.unwrap()));
            }
            429 => {
                assert_eq!(res.headers()["x-gateway-limit"], "requests");
                limited_refused += 1;
                break;
            }
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(limited_refused, 1, "the limited consumer was never refused");
    let refused_id = format!("obs-limited-{limited_ok}");

    // 4. Both regions throttle: the gateway answers 429 itself after trying each once.
    for r in [&r0, &r1] {
        r.handle()
            .set_faults(vec![Fault::status_with_retry_after(429, 60_000).count(1)]);
    }
    // Both rests begin when the 429s arrive, after this instant.
    let throttled = Instant::now();
    let res = gw.chat(CLIENT_KEY, "obs-throttled", message(20)).await;
    assert_eq!(res.status(), 429);
    assert_eq!(res.headers()["x-gateway-throttled"], "true");
    assert_eq!(res.headers()["x-gateway-attempts"], "2");
    res.bytes().await.unwrap();

    let m = gw.metrics().await;
    let requests = |consumer, class| {
        m.get(
            "gateway_requests_total",
            &[
                ("deployment", "gpt-4o"),
                ("operation", "chat"),
                ("consumer", consumer),
                ("status_class", class),
            ],
        )
        .unwrap_or(0.0)
    };
    assert_eq!(requests("app", "2xx"), 2.0);
    assert_eq!(requests("app", "4xx"), 1.0);
    assert_eq!(requests("limited", "2xx"), f64::from(limited_ok));
    assert_eq!(requests("limited", "4xx"), 1.0);
    assert_eq!(m.series("gateway_requests_total").len(), 4, "{}", m.text);

    let attempts = |backend, region, outcome| {
        m.value(
            "gateway_upstream_attempts_total",
            &[
                ("backend", backend),
                ("region", region),
                ("outcome", outcome),
            ],
        )
    };
    assert_eq!(attempts("r0", "Region 0", "server_error"), 1.0);
    assert_eq!(
        attempts("r0", "Region 0", "served"),
        1.0 + f64::from(limited_ok)
    );
    assert_eq!(attempts("r0", "Region 0", "throttled"), 1.0);
    assert_eq!(attempts("r1", "Region 1", "served"), 1.0);
    assert_eq!(attempts("r1", "Region 1", "throttled"), 1.0);
    assert_eq!(m.series("gateway_upstream_attempts_total").len(), 5);

    // Each failed attempt that was followed by another is one failover.
    assert_eq!(
        m.value("gateway_failovers_total", &[("reason", "server_error")]),
        1.0
    );
    assert_eq!(
        m.value("gateway_failovers_total", &[("reason", "throttled")]),
        1.0
    );
    assert_eq!(m.series("gateway_failovers_total").len(), 2);
    assert_eq!(
        m.value(
            "gateway_limit_rejections_total",
            &[("consumer", "limited"), ("limit", "requests")]
        ),
        1.0
    );

    for ((consumer, backend), (prompt, completion)) in &tokens {
        for (kind, n) in [("prompt", prompt), ("completion", completion)] {
            assert_eq!(
                m.value(
                    "gateway_tokens_total",
                    &[
                        ("kind", kind),
                        ("consumer", consumer),
                        ("deployment", "gpt-4o"),
                        ("backend", backend),
                        ("estimated", "false")
                    ]
                ),
                *n as f64,
                "{kind} tokens of {consumer} on {backend}"
            );
        }
    }
    assert_eq!(m.series("gateway_tokens_total").len(), 2 * tokens.len());

    // Histograms: one sample per answered attempt, per request, and per request's overhead.
    let total_requests = 3.0 + f64::from(limited_ok) + 1.0;
    assert_eq!(
        m.value("gateway_upstream_ttfb_seconds_count", &[("backend", "r0")]),
        3.0 + f64::from(limited_ok)
    );
    assert_eq!(
        m.value("gateway_upstream_ttfb_seconds_count", &[("backend", "r1")]),
        2.0
    );
    assert_eq!(
        m.value("gateway_overhead_seconds_count", &[]),
        total_requests
    );
    let durations: f64 = m
        .series("gateway_request_duration_seconds_count")
        .iter()
        .map(|(_, v)| v)
        .sum();
    assert_eq!(durations, total_requests);
    assert!(
        m.text
            .contains("gateway_request_duration_seconds_bucket{deployment=\"gpt-4o\",operation=\"chat\",status_class=\"2xx\",le=\"0.005\"}"),
        "latency buckets are configured:\n{}",
        m.text
    );

    // Per-backend gauges, read from the pool at scrape time: both regions rest for a minute.
    for (backend, region) in [("r0", "Region 0"), ("r1", "Region 1")] {
        let state = |s| {
            m.value(
                "gateway_backend_state",
                &[("backend", backend), ("region", region), ("state", s)],
            )
        };
        assert_eq!(state("cooling_down"), 1.0, "{backend}");
        assert_eq!(state("available"), 0.0, "{backend}");
        assert_eq!(state("circuit_open"), 0.0, "{backend}");
        assert_eq!(state("half_open"), 0.0, "{backend}");
        // What is left of the 60 s rest at the scrape: at most 60 s, and at least 60 s less the
        // time since the throttled call was sent (1 ms for rounding).
        let cooldown = m.value("gateway_backend_cooldown_seconds", &[("backend", backend)]);
        let since = throttled.elapsed().as_secs_f64();
        assert!(
            cooldown <= 60.0 && cooldown + 0.001 >= 60.0 - since,
            "{backend}: {cooldown} s left, {since} s after the throttled call"
        );
        assert_eq!(
            m.value("gateway_backend_in_flight", &[("backend", backend)]),
            0.0
        );
        assert!(m.value("gateway_backend_remaining_tokens", &[("backend", backend)]) > 0.0);
        assert!(
            m.value(
                "gateway_backend_remaining_requests",
                &[("backend", backend)]
            ) > 0.0
        );
    }

    // The access log: one line per request, with what the client could not see.
    let line = gw.log_line("obs-failover").await;
    assert_eq!(line["consumer"], "app");
    // The peer's address, from the accepted socket.
    assert_eq!(line["client"], "127.0.0.1", "{line}");
    assert_eq!(line["deployment"], "gpt-4o");
    assert_eq!(line["operation"], "chat");
    assert_eq!(line["stream"], false);
    assert_eq!(line["status"], 200);
    assert_eq!(line["backend"], "r1");
    assert_eq!(line["region"], "Region 1");
    assert_eq!(line["client_closed"], false);
    assert!(line.get("limit").is_none(), "{line}");
    let attempts = line["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2, "{line}");
    assert_eq!(
        (
            &attempts[0]["backend"],
            &attempts[0]["status"],
            &attempts[0]["outcome"]
        ),
        (&json!("r0"), &json!(503), &json!("server_error"))
    );
    assert_eq!(
        (
            &attempts[1]["backend"],
            &attempts[1]["status"],
            &attempts[1]["outcome"]
        ),
        (&json!("r1"), &json!(200), &json!("served"))
    );
    // Each attempt took time, and the gateway's overhead is what the attempts leave of the time
    // to headers (all three to the microsecond, hence the rounding allowance).
    let elapsed: Vec<f64> = attempts
        .iter()
        .map(|a| a["elapsed_ms"].as_f64().unwrap())
        .collect();
    assert!(elapsed.iter().all(|ms| *ms > 0.0), "{line}");
    assert_eq!(
        line["tokens"],
        json!({"prompt": failover_usage.0, "completion": failover_usage.1,
               "total": failover_usage.0 + failover_usage.1, "cached_prompt": 0, "reasoning": 0,
               "estimated": false})
    );
    let d = &line["durations"];
    let (ttfb, total, overhead) = (
        d["ttfb_ms"].as_f64().unwrap(),
        d["total_ms"].as_f64().unwrap(),
        d["overhead_ms"].as_f64().unwrap(),
    );
    assert!(0.0 < overhead && overhead <= ttfb && ttfb <= total, "{d}");
    let upstream: f64 = elapsed.iter().sum();
    assert!(
        (upstream + overhead - ttfb).abs() < 0.01,
        "attempts {elapsed:?} + overhead {overhead} = ttfb {ttfb}"
    );
    let ts = line["timestamp"].as_str().unwrap();
    assert!(
        ts.len() == 24 && ts.ends_with('Z') && ts.as_bytes()[10] == b'T',
        "{ts}"
    );

    let line = gw.log_line("obs-stream").await;
    assert_eq!(line["stream"], true);
    assert_eq!(line["backend"], "r0");
    assert_eq!(line["tokens"]["prompt"], stream_usage.0);
    assert_eq!(line["tokens"]["completion"], stream_usage.1);
    assert_eq!(line["client_closed"], false);

    let line = gw.log_line(&refused_id).await;
    assert_eq!(line["status"], 429);
    assert_eq!(line["consumer"], "limited");
    assert_eq!(line["limit"], "requests");
    assert_eq!(line["backend"], Value::Null);
    assert_eq!(line["attempts"], json!([]));

    let line = gw.log_line("obs-throttled").await;
    assert_eq!(line["status"], 429);
    assert_eq!(line["backend"], Value::Null);
    let outcomes: Vec<_> = line["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| (a["backend"].clone(), a["outcome"].clone()))
        .collect();
    assert_eq!(
        outcomes,
        [
            (json!("r0"), json!("throttled")),
            (json!("r1"), json!("throttled"))
        ]
    );
    assert_eq!(line["tokens"], Value::Null);

    assert_eq!(
        gw.lines.lock().unwrap().len() as f64,
        total_requests,
        "one line per request"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_the_client_drops_is_logged_and_counted_without_consumer_labels() {
    // 30 ms per token: a 200-token stream lasts seconds, long after the client has gone.
    let r0 = region("Region 0", Duration::from_millis(30)).await;
    let policy = policy_file(&[&r0], "[telemetry]\nconsumer_label = false\n");
    let gw = Gateway::start(&policy, None).await;

    let res = gw
        .chat(
            CLIENT_KEY,
            "obs-dropped",
            json!({"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 200, "stream": true}),
        )
        .await;
    assert_eq!(res.status(), 200);
    let mut body = res.bytes_stream();
    body.next().await.unwrap().unwrap();
    drop(body);

    let line = gw.log_line("obs-dropped").await;
    assert_eq!(line["client_closed"], true, "{line}");
    assert_eq!(line["status"], 200);
    assert_eq!(line["stream"], true);
    assert_eq!(line["backend"], "r0");
    // The backend never told the usage: the line carries the gateway's estimate, marked so, and
    // the metrics count that same figure, marked so too.
    assert_eq!(line["tokens"]["estimated"], true, "{line}");

    let m = gw.metrics().await;
    for kind in ["prompt", "completion"] {
        let labels = [
            ("kind", kind),
            ("consumer", "_"),
            ("deployment", "gpt-4o"),
            ("backend", "r0"),
            ("estimated", "true"),
        ];
        assert_eq!(
            m.value("gateway_tokens_total", &labels),
            line["tokens"][kind].as_f64().unwrap(),
            "{kind}: {line}"
        );
    }
    assert_eq!(
        m.value(
            "gateway_requests_total",
            &[
                ("deployment", "gpt-4o"),
                ("operation", "chat"),
                ("consumer", "_"),
                ("status_class", "2xx")
            ]
        ),
        1.0
    );
    // The dropped stream's upstream body is closed too: nothing stays in flight.
    eventually("the dropped stream no longer in flight", || async {
        let m = gw.metrics().await;
        (m.value("gateway_backend_in_flight", &[("backend", "r0")]) == 0.0).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_and_reasoning_tokens_and_the_served_tier_reach_the_access_log_and_metrics() {
    // A reasoning model behind a region that caches prompts and serves priority at standard.
    let r0 = gateway_e2e::region_with("Region 0", &[("m", 10_000_000)], |mut c| {
        c.deployments[0].reasoning = true;
        c.prompt_cache(true).priority_as_default(true)
    })
    .await;
    let gw = Gateway::start(&policy_file(&[&r0], ""), None).await;
    // Long enough to be cached (1,024 tokens or more); words only, nothing of the PROMPT secret.
    let long = "gateway ".repeat(1100);
    let body = json!({"messages": [{"role": "user", "content": long}], "max_tokens": 30,
        "service_tier": "priority"});
    let mut usage = Value::Null;
    for id in ["obs-details-1", "obs-details-2"] {
        let res = gw.chat(CLIENT_KEY, id, body.clone()).await;
        assert_eq!(res.status(), 200);
        usage = res.json::<Value>().await.unwrap()["usage"].clone();
    }
    let cached = usage["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    let reasoning = usage["completion_tokens_details"]["reasoning_tokens"]
        .as_u64()
        .unwrap();
    assert!(cached >= 1024 && reasoning > 0, "{usage}");

    let line = gw.log_line("obs-details-2").await;
    assert_eq!(line["tokens"]["cached_prompt"], cached, "{line}");
    assert_eq!(line["tokens"]["reasoning"], reasoning, "{line}");
    assert_eq!(
        line["tokens"]["completion"], usage["completion_tokens"],
        "{line}"
    );
    assert_eq!(line["tokens"]["estimated"], false, "{line}");
    assert_eq!(
        line["service_tier"],
        json!({"requested": "priority", "served": "default"}),
        "{line}"
    );
    let first = gw.log_line("obs-details-1").await;
    assert_eq!(
        first["tokens"]["cached_prompt"], 0,
        "the first call warmed the cache"
    );

    let m = gw.metrics().await;
    let tokens = |kind| {
        m.value(
            "gateway_tokens_total",
            &[
                ("kind", kind),
                ("consumer", "app"),
                ("deployment", "gpt-4o"),
                ("backend", "r0"),
                ("estimated", "false"),
            ],
        )
    };
    assert_eq!(tokens("cached_prompt"), cached as f64);
    // The same prompt gets the same answer: both calls reasoned as much.
    assert_eq!(tokens("reasoning"), 2.0 * reasoning as f64);
    assert_eq!(
        m.value(
            "gateway_service_tier_total",
            &[
                ("deployment", "gpt-4o"),
                ("requested", "priority"),
                ("served", "default")
            ]
        ),
        2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_json_on_the_admin_listener_shows_a_cooldown_and_its_end_behind_the_admin_key() {
    let r0 = region("Region 0", Duration::ZERO).await;
    let r1 = region("Region 1", Duration::ZERO).await;
    let admin_port = free_port();
    let policy = policy_file(
        &[&r0, &r1],
        &format!("[admin]\nlisten = \"127.0.0.1:{admin_port}\"\nkey = \"env:ADMIN_KEY\"\n"),
    );
    let gw = Gateway::start(&policy, Some(admin_port)).await;
    let admin = format!("http://127.0.0.1:{admin_port}");
    let client = reqwest::Client::new();
    let status = || async {
        let res = client
            .get(format!("{admin}/admin/status"))
            .header("api-key", ADMIN_KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        res.json::<Value>().await.unwrap()
    };
    let backend = |s: &Value, name: &str| -> Value {
        s["backends"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["name"] == name)
            .cloned()
            .unwrap()
    };

    // The key: required on /admin and /admin/status, in any of the three places; /metrics is open.
    for path in ["/admin", "/admin/status"] {
        let res = client.get(format!("{admin}{path}")).send().await.unwrap();
        assert_eq!(res.status(), 401, "{path}");
        let err: Value = res.json().await.unwrap();
        assert_eq!(err["error"]["code"], "401");
        let wrong = client
            .get(format!("{admin}{path}?key=nope"))
            .send()
            .await
            .unwrap();
        assert_eq!(wrong.status(), 401, "{path}");
        let by_query = client
            .get(format!("{admin}{path}?key={ADMIN_KEY}"))
            .send()
            .await
            .unwrap();
        assert_eq!(by_query.status(), 200, "{path}");
        let by_bearer = client
            .get(format!("{admin}{path}"))
            .bearer_auth(ADMIN_KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(by_bearer.status(), 200, "{path}");
    }
    let page = client
        .get(format!("{admin}/admin?key={ADMIN_KEY}"))
        .send()
        .await
        .unwrap();
    assert!(
        page.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    assert!(page.text().await.unwrap().contains("/status"));
    assert_eq!(
        client
            .get(format!("{admin}/metrics"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    // The admin endpoints live on their own listener only.
    let main = client
        .get(format!("{}/admin/status", gw.base))
        .send()
        .await
        .unwrap();
    assert_eq!(main.status(), 404);

    let before = status().await;
    for name in ["r0", "r1"] {
        let b = backend(&before, name);
        assert_eq!(b["state"], "available", "{b}");
        assert_eq!(b["in_flight"], 0);
        assert_eq!(b["ttfb_ms"], Value::Null);
    }
    assert_eq!(backend(&before, "r0")["region"], "Region 0");
    assert_eq!(backend(&before, "r1")["priority"], 2);

    // A call by the limited consumer is counted against its limits.
    let res = gw
        .chat(LIMITED_KEY, "obs-status-limited", message(10))
        .await;
    assert_eq!(res.status(), 200);
    let (p, c) = usage_of(&res.json().await.unwrap());
    let s = status().await;
    let limited = s["consumers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "limited")
        .cloned()
        .unwrap();
    assert_eq!(limited["limits"]["requests_per_minute"], 1);
    assert_eq!(limited["limits"]["token_quota"], 1_000_000);
    assert_eq!(limited["limits"]["token_quota_period"], "monthly");
    assert_eq!(limited["usage"]["quota_tokens_used"], p + c, "{limited}");
    let app = s["consumers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "app")
        .cloned()
        .unwrap();
    assert_eq!(app["limits"], Value::Null);
    assert!(backend(&s, "r0")["ttfb_ms"]["last"].as_f64().unwrap() > 0.0);

    // Region 0 throttles with a 3 s retry-after: it shows as cooling down, then available again.
    r0.handle()
        .set_faults(vec![Fault::status_with_retry_after(429, 3_000).count(1)]);
    // The rest begins when the 429 arrives, after this instant.
    let throttled = Instant::now();
    let res = gw.chat(CLIENT_KEY, "obs-status-429", message(10)).await;
    assert_eq!(served_by(&res), "r1 (Region 1)");
    let s = status().await;
    let b0 = backend(&s, "r0");
    assert_eq!(b0["state"], "cooling_down", "{b0}");
    // What is left of the 3 s: at most 3 s, at least 3 s less the time since the call was sent.
    let left = b0["cooldown_remaining_ms"].as_u64().unwrap();
    let since = u64::try_from(throttled.elapsed().as_millis()).unwrap();
    assert!(
        left <= 3_000 && left + since + 1 >= 3_000,
        "{b0} {since} ms later"
    );
    assert_eq!(backend(&s, "r1")["state"], "available");

    // Region 0 comes back in the status once its rest is over, not before.
    eventually("region 0 available again in the status", || async {
        (backend(&status().await, "r0")["state"] == "available").then_some(())
    })
    .await;
    let rested = throttled.elapsed();
    assert!(rested >= Duration::from_secs(3), "back after {rested:?}");
    assert_eq!(
        backend(&status().await, "r0")["cooldown_remaining_ms"],
        Value::Null
    );
}

#[tokio::test]
async fn an_unreachable_backend_is_logged_once_with_its_name_and_root_cause() {
    // A port nothing listens on: bound, then closed.
    let closed = free_port();
    let policy = PolicyFile {
        path: common::write_policy(&format!(
            "[[deployments]]\nname = \"gpt-4o\"\n\n\
             [[backends]]\nname = \"closed-backend\"\nregion = \"Region Z\"\n\
             endpoint = \"http://127.0.0.1:{closed}\"\napi_key = \"env:KEY_Z\"\n\
             [backends.deployments]\n\"gpt-4o\" = \"gpt4o-internal-name\"\n\n\
             [[consumers]]\nname = \"app\"\nkeys = [\"env:CLIENT_KEY\"]\n"
        )),
        env: vec![("KEY_Z".into(), "backend-key-z".into())],
    };
    let port = free_port();
    let mut proc = Proc::spawn(
        common::serve_command(&policy, port, [("CLIENT_KEY", CLIENT_KEY)])
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .stderr(Stdio::piped()),
    );
    let lines = Arc::new(Mutex::new(Vec::new()));
    let stderr = proc.0.stderr.take().unwrap();
    let sink = lines.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            sink.lock().unwrap().push(line);
        }
    });
    let base = format!("http://127.0.0.1:{port}");
    common::wait_until_answers(&format!("{base}/healthz")).await;

    let res = reqwest::Client::new()
        .post(common::chat_url(&base))
        .header("api-key", CLIENT_KEY)
        .json(&message(5))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 502);
    let body = res.text().await.unwrap();
    assert!(body.contains("(connection refused)"), "{body}");
    assert!(!body.contains("gpt4o-internal-name") && !body.contains(&closed.to_string()));

    let failed = |lines: &[String]| {
        lines
            .iter()
            .filter(|l| l.contains("upstream connection failed"))
            .cloned()
            .collect::<Vec<_>>()
    };
    let line = eventually("the failed attempt's log line", || async {
        failed(&lines.lock().unwrap()).into_iter().next()
    })
    .await;
    assert!(line.contains("WARN"), "{line}");
    assert!(line.contains("backend=closed-backend"), "{line}");
    assert!(line.contains("cause=connection refused"), "{line}");
    // The root cause, from the bottom of the error's chain, not just "error sending request".
    assert!(line.contains("Connection refused (os error"), "{line}");
    drop(proc);
    assert_eq!(
        failed(&lines.lock().unwrap()).len(),
        1,
        "one line per failed attempt"
    );
}
