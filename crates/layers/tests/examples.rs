//! Every example in `examples/` runs, and says what it should.
#![allow(missing_docs, clippy::unwrap_used)]

#[allow(dead_code)]
#[path = "../examples/context.rs"]
mod context;

#[allow(dead_code)]
#[path = "../examples/auth.rs"]
mod auth;

#[allow(dead_code)]
#[path = "../examples/propagate.rs"]
mod propagate;

#[allow(dead_code)]
#[path = "../examples/failover.rs"]
mod failover;

#[tokio::test]
async fn context_example() {
    let out = context::run().await.unwrap();
    assert!(out.contains(r#""request_id":"example-1""#), "{out}");
    assert!(out.contains(r#""deployment":"gpt-4o""#), "{out}");
    assert!(out.contains(r#""operation":"chat""#), "{out}");
    assert!(out.contains(r#""stream":true"#), "{out}");
    assert!(out.contains("invalid JSON: 400 Bad Request"), "{out}");
}

#[tokio::test]
async fn auth_example() {
    let out = auth::run().await.unwrap();
    assert!(out.contains("chatbot-key: 200 hello chatbot"), "{out}");
    assert!(out.contains("indexer-key: 403"), "{out}");
    assert!(out.contains("wrong-key: 401"), "{out}");
}

#[tokio::test]
async fn propagate_example() {
    let out = propagate::run().await.unwrap();
    assert!(
        out.contains("reached the handler: accept,traceparent,x-gateway\n"),
        "{out}"
    );
    assert!(out.contains("cache-control"), "{out}");
    assert!(out.contains("x-ms-region"), "{out}");
    assert!(!out.contains("x-internal-debug"), "{out}");
}

#[tokio::test]
async fn failover_example() {
    let out = failover::run().await.unwrap();
    assert!(
        out.contains("before: 200 served by ptu-sweden (Sweden Central)"),
        "{out}"
    );
    assert!(
        out.contains("Sweden throttled: 200 served by std-france (France Central)"),
        "{out}"
    );
    assert!(
        out.contains("still cooling down: 200 served by std-france"),
        "{out}"
    );
    assert!(
        out.contains("calls that reached Sweden: 2, France: 2"),
        "{out}"
    );
}

#[allow(dead_code)]
#[path = "../examples/ratelimit.rs"]
mod ratelimit;

#[tokio::test]
async fn ratelimit_example() {
    let out = ratelimit::run().await.unwrap();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 4, "{out}");
    assert!(lines[0].starts_with("200 remaining-requests=2 "), "{out}");
    assert!(lines[0].contains("consumed=30"), "{out}");
    assert!(lines[2].starts_with("200 remaining-requests=0 "), "{out}");
    assert!(lines[3].starts_with("429 "), "{out}");
    assert!(!lines[3].ends_with("retry-after=-"), "{out}");
}
