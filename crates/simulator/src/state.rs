//! The state a region shares between its connections, and the [`SimHandle`] that tests use to see
//! and steer it.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Uri};
use serde_json::{Value, json};

use crate::config::{DeploymentConfig, RegionConfig, Variants};
use crate::faults::{Fault, FaultState};
use crate::limits::DeploymentLimits;
use crate::tokens::fnv;

/// How many requests [`SimHandle::recent_requests`] keeps.
pub const RECENT_REQUESTS: usize = 256;

/// Locks a mutex, ignoring poisoning (every critical section here leaves its data consistent).
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Everything a region's handlers share.
pub(crate) struct Shared {
    pub(crate) region: String,
    pub(crate) region_header: HeaderValue,
    pub(crate) api_keys: Vec<String>,
    pub(crate) deployments: HashMap<String, Deployment>,
    pub(crate) token_delay: Duration,
    pub(crate) seed: u64,
    pub(crate) faults: FaultState,
    pub(crate) variants: Variants,
    request_count: AtomicU64,
    /// Requests whose connection a `drop` fault closed unanswered.
    dropped_count: AtomicU64,
    recent: Mutex<VecDeque<Recorded>>,
    /// Hashes of the long prompts seen, for [`Variants::prompt_cache`].
    prompts_seen: Mutex<HashSet<u64>>,
}

/// Fewest prompt tokens Azure caches, and the steps it caches them in.
const CACHE_MIN_TOKENS: u64 = 1024;
const CACHE_STEP_TOKENS: u64 = 128;
/// Most prompts remembered; then the cache starts over (the simulator's memory stays bounded).
const CACHE_PROMPTS: usize = 10_000;

/// One deployment at run time.
pub(crate) struct Deployment {
    pub(crate) config: DeploymentConfig,
    pub(crate) name_header: Option<HeaderValue>,
    pub(crate) limit_tokens: HeaderValue,
    pub(crate) limit_requests: HeaderValue,
    pub(crate) system_fingerprint: String,
    pub(crate) limits: Mutex<DeploymentLimits>,
}

/// A request as received, kept cheaply (clones of reference-counted parts).
struct Recorded {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
    status: u16,
}

/// A request the region received on `/openai/*`, as returned by [`SimHandle::recent_requests`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedRequest {
    /// HTTP method, e.g. `"POST"`.
    pub method: String,
    /// Path, e.g. `"/openai/deployments/gpt-4o/chat/completions"`.
    pub path: String,
    /// Raw query string without `?` (empty when there was none).
    pub query: String,
    /// Headers in arrival order, names lower-case (values decoded lossily as UTF-8).
    pub headers: Vec<(String, String)>,
    /// The request body.
    pub body: Bytes,
    /// Status answered, or 0 when no response was sent (`drop` and `hang` faults).
    pub status: u16,
}

/// A cheap, cloneable handle on a running region: counters, recorded requests, faults and limits.
#[derive(Clone)]
pub struct SimHandle {
    pub(crate) shared: Arc<Shared>,
}

// === impl Shared ===

impl Shared {
    pub(crate) fn new(config: RegionConfig) -> Self {
        let deployments = config
            .deployments
            .into_iter()
            .map(|d| (d.name.clone(), Deployment::new(d, config.seed)))
            .collect();
        Self {
            region_header: HeaderValue::from_str(&config.region)
                .unwrap_or_else(|_| HeaderValue::from_static("unknown")),
            region: config.region,
            api_keys: config.api_keys,
            deployments,
            token_delay: config.token_delay,
            seed: config.seed,
            faults: FaultState::new(config.seed, config.faults),
            variants: config.variants,
            request_count: AtomicU64::new(0),
            dropped_count: AtomicU64::new(0),
            recent: Mutex::new(VecDeque::with_capacity(RECENT_REQUESTS)),
            prompts_seen: Mutex::new(HashSet::new()),
        }
    }

    /// The cached tokens of a prompt of `tokens` tokens hashing to `hash`: with
    /// [`Variants::prompt_cache`], a prompt of 1,024 tokens or more seen before is cached in steps
    /// of 128 tokens; the first time it is remembered and nothing is cached.
    pub(crate) fn cached_prompt_tokens(&self, hash: u64, tokens: u64) -> u64 {
        if !self.variants.prompt_cache || tokens < CACHE_MIN_TOKENS {
            return 0;
        }
        let mut seen = lock(&self.prompts_seen);
        if seen.contains(&hash) {
            return tokens / CACHE_STEP_TOKENS * CACHE_STEP_TOKENS;
        }
        if seen.len() >= CACHE_PROMPTS {
            seen.clear();
        }
        seen.insert(hash);
        0
    }

    pub(crate) fn count_request(&self) {
        self.request_count.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_drop(&self) {
        self.dropped_count.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn record(
        &self,
        method: Method,
        uri: Uri,
        headers: HeaderMap,
        body: Bytes,
        status: u16,
    ) {
        let mut recent = lock(&self.recent);
        if recent.len() == RECENT_REQUESTS {
            recent.pop_front();
        }
        recent.push_back(Recorded {
            method,
            uri,
            headers,
            body,
            status,
        });
    }

    pub(crate) fn stats(&self) -> Value {
        let now = Instant::now();
        let deployments: serde_json::Map<String, Value> = self
            .deployments
            .iter()
            .map(|(name, d)| {
                let usage = lock(&d.limits).usage(now);
                (
                    name.clone(),
                    json!({
                        "model": d.config.model,
                        "tpm": d.config.tpm,
                        "rpm": d.config.requests_per_minute(),
                        "window": usage,
                    }),
                )
            })
            .collect();
        json!({
            "region": self.region,
            "request_count": self.request_count.load(Ordering::Relaxed),
            "dropped_count": self.dropped_count.load(Ordering::Relaxed),
            "deployments": deployments,
            "faults": self.faults.list(),
        })
    }

    pub(crate) fn reset_limits(&self) {
        for d in self.deployments.values() {
            lock(&d.limits).reset();
        }
    }
}

// === impl Deployment ===

impl Deployment {
    fn new(config: DeploymentConfig, seed: u64) -> Self {
        let rpm = config.requests_per_minute();
        let fingerprint = fnv(
            fnv(0xcbf2_9ce4_8422_2325, &seed.to_le_bytes()),
            config.model.as_bytes(),
        );
        Self {
            name_header: HeaderValue::from_str(&config.name).ok(),
            limit_tokens: HeaderValue::from(config.tpm),
            limit_requests: HeaderValue::from(rpm),
            system_fingerprint: format!("fp_{:010x}", fingerprint & 0xff_ffff_ffff),
            limits: Mutex::new(DeploymentLimits::new(config.tpm, rpm)),
            config,
        }
    }
}

// === impl Recorded ===

impl Recorded {
    fn to_public(&self) -> RecordedRequest {
        RecordedRequest {
            method: self.method.to_string(),
            path: self.uri.path().to_owned(),
            query: self.uri.query().unwrap_or_default().to_owned(),
            headers: self
                .headers
                .iter()
                .map(|(k, v)| {
                    (
                        k.as_str().to_owned(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect(),
            body: self.body.clone(),
            status: self.status,
        }
    }
}

// === impl RecordedRequest ===

impl RecordedRequest {
    /// The first value of header `name` (give it lower-case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body parsed as JSON, if it is JSON.
    pub fn json(&self) -> Option<Value> {
        serde_json::from_slice(&self.body).ok()
    }
}

// === impl SimHandle ===

impl SimHandle {
    /// The region's name.
    pub fn region(&self) -> &str {
        &self.shared.region
    }

    /// Requests received on `/openai/*`, including those answered with faults, 429 or 401.
    pub fn request_count(&self) -> u64 {
        self.shared.request_count.load(Ordering::Relaxed)
    }

    /// Requests (among [`request_count`](Self::request_count)) whose connection a `drop` fault
    /// closed without an answer: a client sees them as connection errors, not as answers.
    pub fn dropped_count(&self) -> u64 {
        self.shared.dropped_count.load(Ordering::Relaxed)
    }

    /// The last 256 requests received on `/openai/*`, oldest first.
    pub fn recent_requests(&self) -> Vec<RecordedRequest> {
        lock(&self.shared.recent)
            .iter()
            .map(Recorded::to_public)
            .collect()
    }

    /// Replaces the active faults (and restarts the seeded RNG that rolls their percentages).
    pub fn set_faults(&self, faults: Vec<Fault>) {
        self.shared.faults.set(faults);
    }

    /// Removes every active fault.
    pub fn clear_faults(&self) {
        self.shared.faults.set(Vec::new());
    }

    /// The active faults, with their remaining counts.
    pub fn faults(&self) -> Vec<Fault> {
        self.shared.faults.list()
    }

    /// Empties every deployment's token and request windows.
    pub fn reset_limits(&self) {
        self.shared.reset_limits();
    }

    /// The statistics `GET /sim/stats` answers: request count, per-deployment window usage, faults.
    pub fn stats(&self) -> Value {
        self.shared.stats()
    }
}

impl fmt::Debug for SimHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimHandle")
            .field("region", &self.shared.region)
            .field("request_count", &self.request_count())
            .finish_non_exhaustive()
    }
}
