//! Helpers shared by the integration tests: start a region, speak to it over real HTTP.
#![allow(dead_code, unreachable_pub, missing_docs)]

use std::time::Duration;

use futures_util::StreamExt;
use reqwest::header::HeaderMap;
use reqwest::{Client, Response, StatusCode};
use serde_json::Value;
use simulator::{DeploymentConfig, RegionConfig, RunningRegion, SimHandle};

pub const KEY: &str = "test-key";
pub const API_VERSION: &str = "2024-10-21";

pub struct Sim {
    pub region: RunningRegion,
    pub sim: SimHandle,
    pub url: String,
    pub client: Client,
}

/// A region with chat deployment `gpt-4o` and embeddings deployment `embed` (64 dimensions).
pub fn config() -> RegionConfig {
    RegionConfig::new("Sweden Central", KEY)
        .deployment(DeploymentConfig::chat("gpt-4o", 1_000_000).rpm(60_000))
        .deployment(
            DeploymentConfig::embeddings("embed", 1_000_000)
                .rpm(60_000)
                .dimensions(64),
        )
        .seed(42)
}

pub async fn start(config: RegionConfig) -> Sim {
    let region = simulator::spawn(config, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    Sim {
        sim: region.handle(),
        url: region.url(),
        region,
        client: Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap(),
    }
}

pub fn chat_path(deployment: &str) -> String {
    format!("/openai/deployments/{deployment}/chat/completions?api-version={API_VERSION}")
}

pub fn user(text: &str) -> Value {
    serde_json::json!({"messages": [{"role": "user", "content": text}]})
}

impl Sim {
    /// Sends a POST with the right key; panics on transport errors.
    pub async fn post(&self, path: &str, body: &Value) -> Response {
        self.try_post(&self.client, path, body).await.unwrap()
    }

    pub async fn try_post(
        &self,
        client: &Client,
        path: &str,
        body: &Value,
    ) -> reqwest::Result<Response> {
        client
            .post(format!("{}{path}", self.url))
            .header("api-key", KEY)
            .header("content-type", "application/json")
            .body(serde_json::to_vec(body).unwrap())
            .send()
            .await
    }

    /// POST and read the JSON answer.
    pub async fn call(&self, path: &str, body: &Value) -> (StatusCode, HeaderMap, Value) {
        json(self.post(path, body).await).await
    }

    pub async fn chat(&self, body: &Value) -> (StatusCode, HeaderMap, Value) {
        self.call(&chat_path("gpt-4o"), body).await
    }

    /// GETs `path` (an admin route such as `/sim/stats`) and reads the JSON answer.
    pub async fn get_json(&self, path: &str) -> Value {
        let response = self
            .client
            .get(format!("{}{path}", self.url))
            .send()
            .await
            .unwrap();
        json(response).await.2
    }
}

pub async fn json(response: Response) -> (StatusCode, HeaderMap, Value) {
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = response.bytes().await.unwrap();
    let value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&bytes)));
    (status, headers, value)
}

pub fn header<'a>(headers: &'a HeaderMap, name: &str) -> &'a str {
    headers
        .get(name)
        .unwrap_or_else(|| panic!("missing header {name}"))
        .to_str()
        .unwrap()
}

pub fn header_u64(headers: &HeaderMap, name: &str) -> u64 {
    header(headers, name).parse().unwrap()
}

/// Reads SSE `data:` payloads until the body ends; returns them and the body error, if any.
pub async fn read_sse(response: Response) -> (Vec<String>, Option<reqwest::Error>) {
    let mut stream = response.bytes_stream();
    let mut buffer = Vec::new();
    let mut events = Vec::new();
    let mut error = None;
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(bytes) => buffer.extend_from_slice(&bytes),
            Err(e) => {
                error = Some(e);
                break;
            }
        }
        take_events(&mut buffer, &mut events);
    }
    (events, error)
}

/// Moves complete `data: ...\n\n` events out of `buffer`.
pub fn take_events(buffer: &mut Vec<u8>, events: &mut Vec<String>) {
    while let Some(end) = buffer.windows(2).position(|w| w == b"\n\n") {
        let event: Vec<u8> = buffer.drain(..end + 2).collect();
        let text = String::from_utf8(event).unwrap();
        let data = text
            .trim_end()
            .strip_prefix("data: ")
            .unwrap_or_else(|| panic!("not a data event: {text:?}"));
        events.push(data.to_owned());
    }
}

/// The chat prompt formula, computed directly with tiktoken.
pub fn expected_prompt_tokens(messages: &[(&str, &str)]) -> u64 {
    let bpe = tiktoken_rs::o200k_base_singleton();
    let count = |s: &str| bpe.encode_ordinary(s).len() as u64;
    3 + messages
        .iter()
        .map(|(role, content)| 3 + count(role) + count(content))
        .sum::<u64>()
}

pub fn count_tokens(text: &str) -> u64 {
    tiktoken_rs::o200k_base_singleton()
        .encode_ordinary(text)
        .len() as u64
}
