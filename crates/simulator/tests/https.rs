//! HTTPS: a real TLS handshake on 127.0.0.1 with a leaf signed by a CA made for the test, the
//! same answers as over plain HTTP, and connection faults that still cut the connection.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use common::*;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, SanType};
use reqwest::{Client, StatusCode};
use serde_json::json;
use simulator::{Fault, ServerTls};

/// A CA, and a leaf it signed for `localhost` and 127.0.0.1 with its key (all PEM).
struct Certs {
    ca_pem: String,
    leaf_pem: String,
    key_pem: String,
}

fn certs() -> Certs {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::CommonName, "simulator test CA");
    let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
    let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    params
        .subject_alt_names
        .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
    let key = KeyPair::generate().unwrap();
    let leaf = params.signed_by(&key, &ca).unwrap();
    Certs {
        ca_pem: ca.pem(),
        leaf_pem: leaf.pem(),
        key_pem: key.serialize_pem(),
    }
}

/// A client trusting `ca_pem` only.
fn trusting(ca_pem: &str) -> Client {
    Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(ca_pem.as_bytes()).unwrap()])
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

async fn start_https(certs: &Certs) -> Sim {
    let tls = ServerTls::from_pem(certs.leaf_pem.as_bytes(), certs.key_pem.as_bytes()).unwrap();
    let region = simulator::spawn_tls(config(), "127.0.0.1:0".parse().unwrap(), tls)
        .await
        .unwrap();
    Sim {
        sim: region.handle(),
        url: region.url(),
        region,
        client: trusting(&certs.ca_pem),
    }
}

#[tokio::test]
async fn serves_chat_and_streams_over_https_to_a_client_trusting_the_ca() {
    let certs = certs();
    let s = start_https(&certs).await;
    assert!(s.url.starts_with("https://127.0.0.1:"), "{}", s.url);

    let response = s.post(&chat_path("gpt-4o"), &user("hello")).await;
    assert_eq!(response.version(), reqwest::Version::HTTP_11);
    let (status, headers, body) = json(response).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(header(&headers, "x-ms-region"), "Sweden Central");
    assert!(body["usage"]["completion_tokens"].as_u64().unwrap() > 0);

    let mut stream_body = user("count");
    stream_body["stream"] = json!(true);
    stream_body["max_tokens"] = json!(5);
    let response = s.post(&chat_path("gpt-4o"), &stream_body).await;
    assert_eq!(response.status(), StatusCode::OK);
    let (events, error) = read_sse(response).await;
    assert!(error.is_none(), "{error:?}");
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));

    // The admin API is on the same listener, over HTTPS too.
    let stats = s.get_json("/sim/stats").await;
    assert_eq!(stats["request_count"], 2, "{stats}");
    s.region.shutdown().await;
}

#[tokio::test]
async fn refuses_clients_that_do_not_trust_the_ca_or_speak_plain_http() {
    let certs = certs();
    let s = start_https(&certs).await;
    let path = chat_path("gpt-4o");

    let other_ca = trusting(&self::certs().ca_pem);
    let error = s
        .try_post(&other_ca, &path, &user("hi"))
        .await
        .expect_err("a certificate from an unknown CA is refused");
    assert!(error.is_connect(), "{error:?}");

    let plain = Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let plain_sim = Sim {
        url: s.url.replacen("https://", "http://", 1),
        ..s
    };
    let error = plain_sim
        .try_post(&plain, &path, &user("hi"))
        .await
        .expect_err("plain HTTP gets no answer from a TLS listener");
    assert!(!error.is_timeout(), "{error:?}");

    // Neither reached a handler.
    assert_eq!(plain_sim.sim.request_count(), 0);
    plain_sim.region.shutdown().await;
}

#[tokio::test]
async fn a_drop_fault_cuts_the_tls_connection_without_an_answer() {
    let certs = certs();
    let s = start_https(&certs).await;
    s.sim.set_faults(vec![Fault::drop_connection().count(1)]);
    let error = s
        .try_post(&s.client, &chat_path("gpt-4o"), &user("hi"))
        .await
        .expect_err("a dropped connection cannot answer");
    assert!(!error.is_timeout(), "{error:?}");
    // The fault was spent: the next request, on a new connection, is served.
    let (status, _, body) = s.chat(&user("hi")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    s.region.shutdown().await;
}

#[test]
fn unusable_certificates_are_refused_with_the_reason() {
    let certs = certs();
    let other = self::certs();
    let error = ServerTls::from_pem(b"not pem", certs.key_pem.as_bytes()).unwrap_err();
    assert!(error.contains("no PEM certificate"), "{error}");
    let error = ServerTls::from_pem(certs.leaf_pem.as_bytes(), b"").unwrap_err();
    assert!(error.contains("no PEM private key"), "{error}");
    let error =
        ServerTls::from_pem(certs.leaf_pem.as_bytes(), other.key_pem.as_bytes()).unwrap_err();
    assert!(error.contains("does not fit"), "{error}");
    assert!(!error.contains("PRIVATE KEY"), "{error}");
}
