//! A backend credential renewed while the gateway runs (`Credential::Live`): the failover layer
//! reads it for every attempt, and a backend whose credential has no value (an expired Entra ID
//! token) is skipped as if it had answered 401, without being called. A `service_fn` stands in
//! for the backends and records the credential header of every attempt; time is paused.
#![allow(missing_docs, clippy::unwrap_used)]

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use gateway_core::pool::{Backend, BackendPool, PoolSettings};
use gateway_core::secret::{Credential, CredentialKind, LiveCredential, Secret};
use gateway_layers::failover::{AttemptOutcome, FailoverLayer};
use gateway_layers::record::Record;
use gateway_layers::{BoxError, RequestContextLayer};
use http::{Request, Response};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use tower::{ServiceBuilder, ServiceExt};

fn backend(name: &str, priority: u32, credential: Credential) -> Backend {
    Backend {
        name: name.to_owned(),
        region: "Test".to_owned(),
        endpoint: format!("http://{name}.test"),
        priority,
        weight: 1,
        deployments: [("gpt-4o".to_owned(), "gpt-4o".to_owned())].into(),
        credential: Some(credential),
    }
}

#[tokio::test(start_paused = true)]
async fn each_attempt_reads_the_current_value_and_an_empty_one_fails_over() {
    let token = LiveCredential::new(CredentialKind::Bearer, Some(Secret::new("token-1")));
    let pool = Arc::new(BackendPool::new(
        vec![
            backend("entra", 1, Credential::Live(token.clone())),
            backend("keyed", 2, Credential::ApiKey(Secret::new("key-2"))),
        ],
        PoolSettings::default(),
    ));
    // (backend host, credential header) of every attempt.
    let seen: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let recorder = seen.clone();
    let upstream = tower::service_fn(move |req: Request<Full<Bytes>>| {
        let seen = recorder.clone();
        async move {
            let header = |name: &str| {
                req.headers()
                    .get(name)
                    .map(|v| v.to_str().unwrap().to_owned())
            };
            let credential = header("authorization").or_else(|| header("api-key"));
            seen.lock().unwrap().push((
                req.uri().host().unwrap().to_owned(),
                credential.unwrap_or_default(),
            ));
            let body: BoxBody<Bytes, BoxError> = Full::new(Bytes::from_static(b"{}"))
                .map_err(|never| match never {})
                .boxed();
            Ok::<_, BoxError>(Response::new(body))
        }
    });
    let gateway = ServiceBuilder::new()
        .layer(RequestContextLayer::new(1 << 20))
        .layer(FailoverLayer::new(pool))
        .service(upstream);
    let chat = || {
        Request::post("/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(br#"{"messages":[]}"#)))
            .unwrap()
    };
    let last = |seen: &Arc<Mutex<Vec<(String, String)>>>| seen.lock().unwrap().last().cloned();

    let res = gateway.clone().oneshot(chat()).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(
        last(&seen),
        Some(("entra.test".into(), "Bearer token-1".into()))
    );

    // Renewed: the next attempt sends the new value, with no new layer or pool.
    token.set(Secret::new("token-2"));
    gateway.clone().oneshot(chat()).await.unwrap();
    assert_eq!(
        last(&seen),
        Some(("entra.test".into(), "Bearer token-2".into()))
    );

    // Expired before it could be renewed: not sent, the next backend serves.
    token.clear();
    let res = gateway.clone().oneshot(chat()).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(seen.lock().unwrap().len(), 3, "one call: the keyed backend");
    assert_eq!(last(&seen), Some(("keyed.test".into(), "key-2".into())));
    let record = res.extensions().get::<Arc<Record>>().unwrap();
    let outcomes: Vec<_> = record
        .failover()
        .unwrap()
        .attempts
        .iter()
        .map(|a| (a.backend_name.to_string(), a.status, a.outcome))
        .collect();
    assert_eq!(
        outcomes,
        [
            ("entra".to_owned(), None, AttemptOutcome::AuthFailure),
            ("keyed".to_owned(), Some(200), AttemptOutcome::Served),
        ]
    );
}
