//! OpenTelemetry traces from the real `gateway` binary, received by an OTLP/HTTP collector the test
//! runs: the server span under the client's trace, one client span per upstream attempt, the
//! `traceparent` each backend received, and a collector that is down hurting nothing.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::routing::post;
use common::{PolicyFile, Proc};
use futures_util::StreamExt;
use gateway_e2e::{eventually, eventually_within};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::Span;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use prost::Message;
use serde_json::json;
use simulator::{Fault, RunningRegion};

const CLIENT_KEY: &str = "traces-client-key";
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN_ID: &str = "00f067aa0ba902b7";

/// A received span and the `service.name` of its resource.
#[derive(Clone, Debug)]
struct Received {
    service: String,
    span: Span,
}

/// An OTLP/HTTP trace receiver on a loopback port.
struct Collector {
    url: String,
    spans: Arc<Mutex<Vec<Received>>>,
}

impl Collector {
    async fn start() -> Self {
        let spans: Arc<Mutex<Vec<Received>>> = Arc::default();
        let sink = spans.clone();
        let app = Router::new().route(
            "/v1/traces",
            post(move |body: Bytes| {
                let sink = sink.clone();
                async move {
                    let req = ExportTraceServiceRequest::decode(body).unwrap();
                    let mut sink = sink.lock().unwrap();
                    for rs in req.resource_spans {
                        let service = rs
                            .resource
                            .as_ref()
                            .and_then(|r| string(&r.attributes, "service.name"))
                            .unwrap_or_default();
                        for ss in rs.scope_spans {
                            for span in ss.spans {
                                sink.push(Received {
                                    service: service.clone(),
                                    span,
                                });
                            }
                        }
                    }
                    (
                        [("content-type", "application/x-protobuf")],
                        ExportTraceServiceResponse::default().encode_to_vec(),
                    )
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Collector { url, spans }
    }

    /// The spans of one trace, once `done` says they are all there (bounded wait: batches leave
    /// the gateway every 50 ms here, so 15 s is far more than they take).
    async fn trace(&self, trace_id: &str, done: impl Fn(&[Received]) -> bool) -> Vec<Received> {
        let what = format!("the spans of trace {trace_id}");
        eventually_within(&what, Duration::from_secs(15), || async {
            let spans: Vec<Received> = self
                .spans
                .lock()
                .unwrap()
                .iter()
                .filter(|r| hex(&r.span.trace_id) == trace_id)
                .cloned()
                .collect();
            done(&spans).then_some(spans)
        })
        .await
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn value<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a any_value::Value> {
    attrs
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v| v.value.as_ref())
}

fn string(attrs: &[KeyValue], key: &str) -> Option<String> {
    match value(attrs, key)? {
        any_value::Value::StringValue(s) => Some(s.clone()),
        other => panic!("{key} is not a string: {other:?}"),
    }
}

fn int(attrs: &[KeyValue], key: &str) -> Option<i64> {
    match value(attrs, key)? {
        any_value::Value::IntValue(i) => Some(*i),
        other => panic!("{key} is not an integer: {other:?}"),
    }
}

fn kind(span: &Span, kind: SpanKind) -> bool {
    span.kind == kind as i32
}

async fn region(name: &str) -> RunningRegion {
    gateway_e2e::region(name, &[("m", 100_000_000)]).await
}

/// A policy with the given regions (priority in order) and one consumer, `app`.
fn policy_file(regions: &[&RunningRegion]) -> PolicyFile {
    common::policy_file(
        regions,
        "[[consumers]]\nname = \"app\"\nkeys = [\"env:CLIENT_KEY\"]\n",
    )
}

/// Starts `gateway serve` exporting to `otlp` and waits until it answers. Its stderr goes to the
/// returned file.
async fn gateway(policy: &PolicyFile, otlp: &str) -> (Proc, String, PathBuf) {
    let port = common::free_port();
    let log = policy.path.with_file_name("stderr.log");
    // Logs are not traces: spans are exported whatever RUST_LOG (`warn` here) says.
    let mut command = common::serve_command(
        policy,
        port,
        [
            ("CLIENT_KEY", CLIENT_KEY),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", otlp),
            ("OTEL_SERVICE_NAME", "gateway-under-test"),
            // Export every 50 ms rather than every 5 s, so the test waits less.
            ("OTEL_BSP_SCHEDULE_DELAY", "50"),
        ],
    );
    command
        .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        .stderr(std::fs::File::create(&log).unwrap());
    let (proc, base) = common::spawn_gateway(&mut command, port).await;
    (proc, base, log)
}

fn chat_request(base: &str, trace_id: &str, stream: bool) -> reqwest::RequestBuilder {
    reqwest::Client::new()
        .post(common::chat_url(base))
        .header("api-key", CLIENT_KEY)
        .header("traceparent", format!("00-{trace_id}-{CLIENT_SPAN_ID}-01"))
        .header("tracestate", "client=yes")
        .json(&json!({
            "messages": [{"role": "user", "content": "hello there"}],
            "max_tokens": 20,
            "stream": stream,
        }))
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_over_request_is_one_server_span_with_a_client_span_per_attempt() {
    let collector = Collector::start().await;
    let first = region("Region 0").await;
    let second = region("Region 1").await;
    let policy = policy_file(&[&first, &second]);
    let (_gw, base, _log) = gateway(&policy, &collector.url).await;
    let fault: Fault =
        serde_json::from_value(json!({"kind": "status", "status": 503, "count": 1})).unwrap();
    first.handle().set_faults(vec![fault]);

    let res = chat_request(&base, TRACE_ID, false).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["x-gateway-attempts"], "2");
    assert_eq!(res.headers()["x-served-by"], "r1 (Region 1)");

    let spans = collector
        .trace(TRACE_ID, |s| {
            s.iter().filter(|r| kind(&r.span, SpanKind::Client)).count() == 2
                && s.iter().any(|r| kind(&r.span, SpanKind::Server))
        })
        .await;
    assert_eq!(spans.len(), 3, "{spans:#?}");
    assert!(spans.iter().all(|r| r.service == "gateway-under-test"));

    // The server span continues the client's trace, under the client's span.
    let server = &spans
        .iter()
        .find(|r| kind(&r.span, SpanKind::Server))
        .unwrap()
        .span;
    assert_eq!(hex(&server.parent_span_id), CLIENT_SPAN_ID);
    assert_eq!(server.name, "chat gpt-4o");
    let a = &server.attributes;
    assert_eq!(string(a, "gen_ai.operation.name").as_deref(), Some("chat"));
    assert_eq!(
        string(a, "gen_ai.provider.name").as_deref(),
        Some("azure.ai.openai")
    );
    assert_eq!(string(a, "gen_ai.request.model").as_deref(), Some("gpt-4o"));
    assert_eq!(string(a, "gen_ai.response.model").as_deref(), Some("m"));
    assert_eq!(int(a, "gen_ai.request.max_tokens"), Some(20));
    assert!(int(a, "gen_ai.usage.input_tokens").unwrap() > 0);
    assert!(int(a, "gen_ai.usage.output_tokens").unwrap() > 0);
    assert_eq!(int(a, "http.response.status_code"), Some(200));
    assert_eq!(string(a, "http.request.method").as_deref(), Some("POST"));
    assert_eq!(
        string(a, "url.path").as_deref(),
        Some("/openai/deployments/gpt-4o/chat/completions")
    );
    assert_eq!(string(a, "server.address").as_deref(), Some("127.0.0.1"));
    assert_eq!(string(a, "gateway.consumer").as_deref(), Some("app"));
    assert_eq!(string(a, "gateway.backend.name").as_deref(), Some("r1"));
    assert_eq!(int(a, "gateway.attempts"), Some(2));
    assert_eq!(string(a, "error.type"), None);

    // One client span per attempt, siblings under the server span, in order.
    let mut attempts: Vec<&Span> = spans
        .iter()
        .map(|r| &r.span)
        .filter(|s| kind(s, SpanKind::Client))
        .collect();
    attempts.sort_by_key(|s| int(&s.attributes, "gateway.attempt"));
    for (n, span) in attempts.iter().enumerate() {
        assert_eq!(span.parent_span_id, server.span_id);
        assert_eq!(span.name, "chat m");
        let a = &span.attributes;
        assert_eq!(int(a, "gateway.attempt"), Some(n as i64 + 1));
        assert_eq!(string(a, "gen_ai.operation.name").as_deref(), Some("chat"));
        assert_eq!(string(a, "gen_ai.request.model").as_deref(), Some("m"));
        assert_eq!(string(a, "server.address").as_deref(), Some("127.0.0.1"));
        assert_eq!(
            string(a, "gateway.backend.region").as_deref(),
            Some(format!("Region {n}").as_str())
        );
    }
    let (failed, served) = (&attempts[0].attributes, &attempts[1].attributes);
    assert_eq!(
        string(failed, "gateway.backend.name").as_deref(),
        Some("r0")
    );
    assert_eq!(int(failed, "http.response.status_code"), Some(503));
    assert_eq!(
        string(failed, "gateway.failover.reason").as_deref(),
        Some("server_error")
    );
    assert_eq!(string(failed, "error.type").as_deref(), Some("503"));
    assert_eq!(
        string(served, "gateway.backend.name").as_deref(),
        Some("r1")
    );
    assert_eq!(int(served, "http.response.status_code"), Some(200));
    assert_eq!(string(served, "gateway.failover.reason"), None);
    assert_eq!(value(served, "error.type"), None);

    // Each backend got the traceparent of the attempt that reached it, not the client's.
    for (region, attempt) in [(&first, attempts[0]), (&second, attempts[1])] {
        let recent = region.handle().recent_requests();
        let seen = recent.last().unwrap();
        assert_eq!(
            header(&seen.headers, "traceparent"),
            Some(format!("00-{TRACE_ID}-{}-01", hex(&attempt.span_id)).as_str())
        );
        assert_eq!(header(&seen.headers, "tracestate"), Some("client=yes"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_keeps_its_server_span_open_until_the_usage_at_its_end() {
    const STREAM_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
    let collector = Collector::start().await;
    let only = region("Region 0").await;
    let policy = policy_file(&[&only]);
    let (_gw, base, _log) = gateway(&policy, &collector.url).await;

    let res = chat_request(&base, STREAM_TRACE, true)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let mut body = res.bytes_stream();
    let mut text = Vec::new();
    while let Some(chunk) = body.next().await {
        text.extend_from_slice(&chunk.unwrap());
    }
    assert!(String::from_utf8_lossy(&text).contains("data: [DONE]"));

    let spans = collector
        .trace(STREAM_TRACE, |s| {
            s.iter().any(|r| kind(&r.span, SpanKind::Server))
                && s.iter().any(|r| kind(&r.span, SpanKind::Client))
        })
        .await;
    let server = &spans
        .iter()
        .find(|r| kind(&r.span, SpanKind::Server))
        .unwrap()
        .span;
    let client = &spans
        .iter()
        .find(|r| kind(&r.span, SpanKind::Client))
        .unwrap()
        .span;
    // The tokens of a stream are only known at its end: the span was still open then.
    assert!(int(&server.attributes, "gen_ai.usage.output_tokens").unwrap() > 0);
    assert!(int(&server.attributes, "gen_ai.usage.input_tokens").unwrap() > 0);
    assert!(server.end_time_unix_nano >= client.end_time_unix_nano);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_is_down_costs_requests_nothing_and_spans_are_counted_as_dropped() {
    // Nothing listens there.
    let down = format!("http://127.0.0.1:{}", common::free_port());
    let only = region("Region 0").await;
    let policy = policy_file(&[&only]);
    let (mut gw, base, log) = gateway(&policy, &down).await;

    // Ten at a time, fifty in all: every one answered within the client's usual timeout.
    let client = gateway_e2e::client();
    for round in 0..5 {
        let calls = (0..10).map(|i| {
            let trace = format!("{:032x}", round * 10 + i + 1);
            chat_request(&base, &trace, false)
                .build()
                .map(|req| client.execute(req))
                .unwrap()
        });
        for res in futures_util::future::join_all(calls).await {
            assert_eq!(res.unwrap().status(), 200);
        }
    }

    // The exporter tries (and fails) in the background: wait, bounded, for its one warning.
    eventually("the exporter's warning on stderr", || async {
        let stderr = std::fs::read_to_string(&log).unwrap();
        stderr.contains("cannot export spans").then_some(())
    })
    .await;

    common::sigterm(&gw);
    let status = common::wait_exit(&mut gw, Duration::from_secs(30));
    assert!(status.success(), "exit status {status}");
    let stderr = std::fs::read_to_string(&log).unwrap();
    // Logged once per outage, not per batch.
    assert_eq!(stderr.matches("cannot export spans").count(), 1, "{stderr}");
    let dropped: HashMap<&str, &str> = stderr
        .lines()
        .filter(|l| l.contains("spans dropped in total"))
        .flat_map(|l| l.split_whitespace())
        .filter_map(|w| w.split_once('='))
        .collect();
    // Two spans per request (server and attempt), all lost.
    assert_eq!(dropped.get("dropped"), Some(&"100"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_accepts_and_never_answers_costs_requests_nothing() {
    // The worst collector: it takes the connection and then says nothing, so each export waits for
    // its whole timeout while spans keep coming.
    let hole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", hole.local_addr().unwrap());
    let held = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let keep = held.clone();
    std::thread::spawn(move || {
        for conn in hole.incoming().flatten() {
            keep.lock().unwrap().push(conn);
        }
    });
    let only = region("Region 0").await;
    let policy = policy_file(&[&only]);
    let (mut gw, base, log) = gateway(&policy, &url).await;

    // 1,200 requests make 2,400 spans: more than the 2,048 the exporter may hold.
    let client = gateway_e2e::client();
    let calls = futures_util::stream::iter(0..1200u32).map(|i| {
        let req = chat_request(&base, &format!("{:032x}", i + 1), false)
            .build()
            .unwrap();
        client.execute(req)
    });
    let mut calls = calls.buffer_unordered(16);
    let mut ok = 0;
    while let Some(res) = calls.next().await {
        assert_eq!(res.unwrap().status(), 200);
        ok += 1;
    }
    assert_eq!(ok, 1200);

    common::sigterm(&gw);
    let status = common::wait_exit(&mut gw, Duration::from_secs(30));
    assert!(status.success(), "exit status {status}");
    let stderr = std::fs::read_to_string(&log).unwrap();
    let dropped: u64 = stderr
        .lines()
        .filter(|l| l.contains("spans dropped in total"))
        .flat_map(|l| l.split_whitespace())
        .filter_map(|w| w.split_once('='))
        .find(|(k, _)| *k == "dropped")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or_else(|| panic!("no drop count logged: {stderr}"));
    assert!(
        (352..=2400).contains(&dropped),
        "the queue overflowed, and the overflow was counted: {dropped}"
    );
}
