//! The backend pool: per-backend state (cooldowns, circuit breakers) and routing decisions.
//!
//! The failover layer asks [`BackendPool::select`] for a backend, sends the attempt, and tells the pool
//! how it went with [`BackendPool::record`]. The pool never sleeps and runs no timers: every decision is
//! derived from the `Instant` passed in, which also makes it testable with explicit instants.
//!
//! Routing, in the spirit of APIM backend pools and Microsoft's "smart load balancing" samples:
//! - Candidates are the backends that serve the deployment, were not tried yet for this request, are not
//!   cooling down, whose circuit is not open, and that did not answer `DeploymentNotFound` for it lately.
//! - The lowest priority number with any candidate wins; inside it a backend is drawn at random in
//!   proportion to its weight. A weight of 0 makes a backend a last resort of its priority group.
//! - When nothing is left, [`Exhausted`] says why, and when the soonest cooling backend comes back, so
//!   the client can be answered 429 with a `Retry-After`.
//!
//! With the `redis` feature, `RedisCooldowns` shares what one gateway instance learns from a 429
//! with every other instance (see its module, `shared`).
//!
//! ```
//! use std::collections::BTreeMap;
//! use std::time::{Duration, Instant};
//! use gateway_core::pool::{Backend, BackendPool, Outcome, PoolSettings, Selection};
//!
//! let backend = |name: &str, priority| Backend {
//!     name: name.to_owned(),
//!     region: "Sweden Central".to_owned(),
//!     endpoint: format!("https://{name}.openai.azure.com"),
//!     priority,
//!     weight: 1,
//!     deployments: BTreeMap::from([("gpt-4o".to_owned(), "gpt-4o-2024-08-06".to_owned())]),
//!     credential: None,
//! };
//! let pool = BackendPool::new(vec![backend("ptu", 1), backend("paygo", 2)], PoolSettings::default());
//! let now = Instant::now();
//!
//! let Selection::Backend(ptu) = pool.select("gpt-4o", &[], now) else { unreachable!() };
//! assert_eq!(pool.get(ptu).name, "ptu");
//!
//! // The PTU deployment is throttled for 2 s: traffic spills over to the lower priority.
//! pool.record(ptu, "gpt-4o", Outcome::Throttled { hint: Some(Duration::from_secs(2)) }, now);
//! let Selection::Backend(paygo) = pool.select("gpt-4o", &[], now) else { unreachable!() };
//! assert_eq!(pool.get(paygo).name, "paygo");
//!
//! // Both are out: the client is told to come back in 2 s.
//! pool.record(paygo, "gpt-4o", Outcome::Throttled { hint: Some(Duration::from_secs(5)) }, now);
//! let Selection::Exhausted(exhausted) = pool.select("gpt-4o", &[], now) else { unreachable!() };
//! assert_eq!(exhausted.shortest_cooldown, Some(Duration::from_secs(2)));
//!
//! // Cooldowns end on their own.
//! let later = now + Duration::from_secs(2);
//! assert_eq!(pool.select("gpt-4o", &[], later), Selection::Backend(ptu));
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::secret::Credential;

use self::health::{Availability, CircuitChange, Health};

mod handover;
mod health;
#[cfg(feature = "redis")]
mod shared;
#[cfg(test)]
mod tests;

#[cfg(feature = "redis")]
pub use shared::{RedisCooldowns, unix_ms};

/// How long a backend's reported remaining tokens are trusted for quota-aware routing. Azure counts
/// tokens per minute without saying when its minute started: a short trust keeps a backend whose
/// window has already reset from being skipped for long.
pub const QUOTA_FRESHNESS: Duration = Duration::from_secs(15);

/// How long a backend is skipped for a deployment after it answered `DeploymentNotFound`.
const DEFAULT_NOT_FOUND_COOLDOWN: Duration = Duration::from_secs(60);

/// Index of a backend in its [`BackendPool`], in the order given to [`BackendPool::new`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendId(pub usize);

/// One Azure OpenAI resource in one region, with its credential resolved.
#[derive(Debug, Clone)]
pub struct Backend {
    /// Unique name, shown in `x-served-by`.
    pub name: String,
    /// Azure region, e.g. `Sweden Central`.
    pub region: String,
    /// Base URL of the resource, e.g. `https://my-aoai.openai.azure.com`.
    pub endpoint: String,
    /// Priority group: lower numbers are preferred.
    pub priority: u32,
    /// Relative share of traffic inside the priority group; 0 means "only when nothing else in the
    /// group is available".
    pub weight: u32,
    /// Logical deployment name -> this backend's own deployment name.
    pub deployments: BTreeMap<String, String>,
    /// How the gateway authenticates to this backend; `None` when it sends no credential.
    pub credential: Option<Credential>,
}

/// Tuning of cooldowns and circuit breakers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolSettings {
    /// Cooldown after a throttle or auth failure that came without a usable hint.
    pub default_cooldown: Duration,
    /// Longest cooldown applied, whatever the backend's hint says (Azure may say 86400 s).
    pub max_cooldown: Duration,
    /// When a backend's circuit opens.
    pub circuit: CircuitSettings,
    /// How long a half-open probe may stay unanswered before another probe is let through.
    pub probe_timeout: Duration,
    /// How long a backend is skipped for a deployment after it answered `DeploymentNotFound`.
    pub not_found_cooldown: Duration,
}

/// Circuit breaker tuning: `failures` within `interval` open the circuit for `trip`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CircuitSettings {
    /// Failures within `interval` that open the circuit; 0 disables the circuit breaker.
    pub failures: u32,
    /// Sliding window in which failures are counted.
    pub interval: Duration,
    /// How long the circuit stays open before a single probe is let through.
    pub trip: Duration,
}

/// The set of backends and their shared state. `Send + Sync`: share it behind an `Arc`.
#[derive(Debug)]
pub struct BackendPool {
    backends: Vec<Backend>,
    /// One entry per backend, same order. Locked briefly, one at a time, never across `.await`.
    /// Behind an `Arc` so a pool built on reload can take an entry over (`handover`).
    health: Vec<Arc<Mutex<Health>>>,
    /// Attempts in flight per backend, same order; counted outside the health lock so that
    /// starting and ending an attempt never contends with routing.
    in_flight: Vec<Arc<AtomicU64>>,
    settings: PoolSettings,
    rng: RngSource,
}

/// The answer of [`BackendPool::select`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// Send the attempt there.
    Backend(BackendId),
    /// No backend can take the attempt now.
    Exhausted(Exhausted),
}

/// Why no backend was selected. Every backend serving the deployment is counted once, under the first
/// reason that applies in this order: `not_found`, `circuit_open`, `throttled`, `tried`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Exhausted {
    /// The least remaining cooldown among the backends serving the deployment that are cooling down
    /// after a throttle (429), tried or not (the client will come back later). `None` when none is
    /// throttled, e.g. every circuit is open or every backend failed or rejected the credential.
    pub shortest_cooldown: Option<Duration>,
    /// Backends cooling down after a throttle.
    pub throttled: usize,
    /// Backends cooling down for another reason: an auth failure, or a 5xx with a retry hint.
    pub cooling: usize,
    /// Backends whose circuit is open, or half-open with a probe already pending.
    pub circuit_open: usize,
    /// Backends skipped for this deployment after a `DeploymentNotFound`.
    pub not_found: usize,
    /// Otherwise available backends already tried for this request.
    pub tried: usize,
    /// Available backends whose last reported remaining tokens could not fit the request.
    pub insufficient_quota: usize,
    /// No backend serves this deployment at all.
    pub no_candidates: bool,
}

/// How an attempt on a backend ended, as told to [`BackendPool::record`].
///
/// Record it when the response headers arrive (or the attempt fails before them); a stream that breaks
/// later is recorded again as [`Outcome::StreamBroken`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A response the client can use (2xx, and 4xx that are the client's own fault).
    Success,
    /// 429. Cools the backend down; not a circuit failure.
    Throttled {
        /// From [`crate::retry_after::cooldown_hint`]; the default cooldown when `None`.
        hint: Option<Duration>,
    },
    /// 401/403 from the backend: a credential problem there. Cools it down; not a circuit failure.
    AuthFailure {
        /// From [`crate::retry_after::cooldown_hint`]; the default cooldown when `None`.
        hint: Option<Duration>,
    },
    /// 5xx. A circuit failure; with a hint it also cools the backend down.
    ServerError {
        /// From [`crate::retry_after::cooldown_hint`]; no cooldown when `None`.
        hint: Option<Duration>,
    },
    /// No response headers in time. A circuit failure.
    Timeout,
    /// Connecting or sending failed. A circuit failure.
    ConnectError,
    /// The response body broke after it started. A circuit failure.
    StreamBroken,
    /// 404 `DeploymentNotFound`: skip this backend for this deployment only, for a while.
    DeploymentNotFound,
}

/// A backend's state as a whole (deployment-specific not-found marks aside).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackendState {
    /// Takes traffic.
    Available,
    /// Skipped until its cooldown ends.
    CoolingDown,
    /// Skipped until its trip duration ends.
    CircuitOpen,
    /// Trip ended: takes a single probe request, which closes or reopens the circuit.
    HalfOpen,
}

/// One backend as shown on a status page or in metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendStatus {
    /// Its id in the pool.
    pub id: BackendId,
    /// Its name.
    pub name: String,
    /// Its region.
    pub region: String,
    /// Its priority group.
    pub priority: u32,
    /// Its weight in the group.
    pub weight: u32,
    /// Its state now.
    pub state: BackendState,
    /// Time left cooling down, if it is.
    pub cooldown_remaining: Option<Duration>,
    /// Time left before an open circuit turns half-open, if it is open.
    pub circuit_open_remaining: Option<Duration>,
    /// Circuit failures since the last success.
    pub consecutive_failures: u32,
    /// Circuit failures within the circuit interval, counting towards opening it.
    pub window_failures: u32,
    /// Deployments it is skipped for after a `DeploymentNotFound`.
    pub not_found: Vec<String>,
    /// Last `x-ratelimit-remaining-tokens` seen.
    pub remaining_tokens: Option<RemainingQuota>,
    /// Last `x-ratelimit-remaining-requests` seen.
    pub remaining_requests: Option<RemainingQuota>,
    /// Attempts sent to it whose response has not ended yet (see [`BackendPool::begin`]).
    pub in_flight: u64,
}

/// One attempt in flight on a backend, from [`BackendPool::begin`]: the count goes down when it is
/// dropped, so hold it until the attempt's response body ends.
#[derive(Debug)]
pub struct InFlight(Arc<AtomicU64>);

/// A quota counter as last reported by a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemainingQuota {
    /// The value reported.
    pub value: u64,
    /// How long ago it was reported.
    pub age: Duration,
}

/// Where random draws come from: the thread-local generator, or a seeded one for reproducible tests.
#[derive(Debug)]
enum RngSource {
    Thread,
    Seeded(Mutex<fastrand::Rng>),
}

/// The outcome of one pass over the backends.
struct Scan {
    chosen: Option<BackendId>,
    exhausted: Exhausted,
}

// === impl BackendId ===

impl fmt::Display for BackendId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

// === impl Backend ===

impl Backend {
    /// This backend's own name for the logical deployment, if it serves it.
    pub fn deployment_name(&self, logical: &str) -> Option<&str> {
        self.deployments.get(logical).map(String::as_str)
    }
}

// === impl PoolSettings ===

impl Default for PoolSettings {
    /// The policy file's defaults: a 10 s cooldown without a hint, hints capped at 5 minutes, a
    /// circuit that opens after 5 failures within 10 s for 30 s, and a probe given 30 s (the default
    /// response header timeout) to answer.
    fn default() -> Self {
        Self {
            default_cooldown: Duration::from_secs(10),
            max_cooldown: Duration::from_secs(300),
            circuit: CircuitSettings::default(),
            probe_timeout: Duration::from_secs(30),
            not_found_cooldown: DEFAULT_NOT_FOUND_COOLDOWN,
        }
    }
}

// === impl CircuitSettings ===

impl Default for CircuitSettings {
    /// The policy file's defaults: 5 failures within 10 s open the circuit for 30 s.
    fn default() -> Self {
        Self {
            failures: 5,
            interval: Duration::from_secs(10),
            trip: Duration::from_secs(30),
        }
    }
}

// === impl BackendPool ===

impl BackendPool {
    /// A pool over `backends`, all available.
    pub fn new(backends: Vec<Backend>, settings: PoolSettings) -> Self {
        let health = backends
            .iter()
            .map(|_| Arc::new(Mutex::new(Health::new(&settings))))
            .collect();
        let in_flight = backends.iter().map(|_| Arc::default()).collect();
        Self {
            backends,
            health,
            in_flight,
            settings,
            rng: RngSource::Thread,
        }
    }

    /// Draws weighted choices from a generator seeded with `seed`, for reproducible tests.
    pub fn with_rng_seed(mut self, seed: u64) -> Self {
        self.rng = RngSource::Seeded(Mutex::new(fastrand::Rng::with_seed(seed)));
        self
    }

    /// All backends, indexed by [`BackendId`].
    pub fn backends(&self) -> &[Backend] {
        &self.backends
    }

    /// The backend with this id.
    ///
    /// # Panics
    ///
    /// If `id` does not come from this pool.
    pub fn get(&self, id: BackendId) -> &Backend {
        &self.backends[id.0]
    }

    /// The settings in use.
    pub fn settings(&self) -> &PoolSettings {
        &self.settings
    }

    /// Picks the next backend for `deployment`, excluding `tried`.
    ///
    /// Choosing a half-open backend takes its single probe slot: the caller must send the attempt and
    /// [`record`](Self::record) its outcome.
    pub fn select(&self, deployment: &str, tried: &[BackendId], now: Instant) -> Selection {
        self.select_with(deployment, tried, None, now)
    }

    /// Like [`select`](Self::select), aware of quota: with `need_tokens` (the request's estimate), a
    /// backend whose last `x-ratelimit-remaining-tokens`, minus the estimates sent to it since, cannot
    /// fit the request is skipped before it answers 429; and inside a priority group whose backends all
    /// reported recently, the draw is weighted by weight times headroom, so the backend with the most
    /// headroom is preferred in proportion (equal headroom leaves the configured weights). Missing,
    /// unknown (`-1`) or stale values (older than [`QUOTA_FRESHNESS`]) fall back to plain selection.
    /// If every available backend is too short of quota, selection ignores quota rather than refuse:
    /// the estimate may be high, and a real 429 still fails over.
    pub fn select_with(
        &self,
        deployment: &str,
        tried: &[BackendId],
        need_tokens: Option<u64>,
        now: Instant,
    ) -> Selection {
        let mut exhausted = Exhausted::default();
        let mut need = need_tokens;
        // A claim fails only when another thread changed the chosen backend between the scan and the
        // claim (typically: took the same half-open probe slot); scan again, a bounded number of times.
        for _ in 0..=self.backends.len() + 1 {
            let scan = self.scan(deployment, tried, need, now);
            match scan.chosen {
                Some(id) if self.lock(id).claim(deployment, now, &self.settings) => {
                    if let Some(tokens) = need_tokens {
                        self.lock(id).note_sent(deployment, tokens);
                    }
                    return Selection::Backend(id);
                }
                Some(_) => exhausted = scan.exhausted,
                None if need.is_some() && scan.exhausted.insufficient_quota > 0 => {
                    need = None;
                    exhausted = scan.exhausted;
                }
                None => return Selection::Exhausted(scan.exhausted),
            }
        }
        Selection::Exhausted(exhausted)
    }

    /// Records how an attempt on backend `id` for `deployment` ended.
    ///
    /// - `Throttled`, `AuthFailure`, and `ServerError` with a hint cool the backend down for
    ///   `min(hint or default_cooldown, max_cooldown)`; a cooldown already in force that ends later is
    ///   kept (the longest wins).
    /// - `ServerError`, `Timeout`, `ConnectError` and `StreamBroken` are circuit failures; `failures`
    ///   of them within the sliding `interval` open the circuit for `trip`. Successes do not reset that
    ///   count. While open, further outcomes (from requests sent before the trip) change nothing.
    /// - Half-open: `Success` closes the circuit, a circuit failure reopens it, anything else frees the
    ///   probe slot for another probe.
    /// - `DeploymentNotFound` skips the backend for `deployment` only, for `not_found_cooldown`.
    ///
    /// An `id` from another pool is ignored.
    ///
    /// Returns the cooldown this outcome applied, if any, so it can be shared with other instances.
    pub fn record(
        &self,
        id: BackendId,
        deployment: &str,
        outcome: Outcome,
        now: Instant,
    ) -> Option<Duration> {
        let Some(health) = self.health.get(id.0) else {
            tracing::warn!(%id, "outcome recorded for an unknown backend id");
            return None;
        };
        let recorded = lock(health).record(deployment, outcome, now, &self.settings);

        let backend = &self.backends[id.0].name;
        if let Some(cooldown) = recorded.cooldown {
            tracing::debug!(
                backend,
                ?outcome,
                cooldown_ms = u64::try_from(cooldown.as_millis()).unwrap_or(u64::MAX),
                "backend cooling down"
            );
        }
        if outcome == Outcome::DeploymentNotFound {
            tracing::warn!(
                backend,
                deployment,
                "backend has no such deployment; skipping it for this deployment"
            );
        }
        match recorded.circuit {
            Some(CircuitChange::Opened) => tracing::warn!(
                backend,
                ?outcome,
                failures = self.settings.circuit.failures,
                "circuit opened"
            ),
            Some(CircuitChange::Reopened) => {
                tracing::warn!(
                    backend,
                    ?outcome,
                    "half-open probe failed; circuit reopened"
                )
            }
            Some(CircuitChange::Closed) => tracing::info!(backend, "circuit closed"),
            None => {}
        }
        recorded.cooldown
    }

    /// Cools backend `id` down for `cooldown` (capped at the maximum), as learned from another gateway
    /// instance; a longer cooldown in force is kept. Unlike [`record`](Self::record) it is no outcome of
    /// this instance's: circuits and probes are untouched.
    pub fn cool_down(&self, id: BackendId, cooldown: Duration, now: Instant) {
        if let Some(health) = self.health.get(id.0) {
            lock(health).cool_down(Some(cooldown), true, now, &self.settings);
        }
    }

    /// The least time until a throttled backend serving `deployment` is available again, if any is
    /// throttled: what a client told to come back should wait.
    pub fn shortest_throttle(&self, deployment: &str, now: Instant) -> Option<Duration> {
        self.backends
            .iter()
            .enumerate()
            .filter(|(_, b)| b.deployments.contains_key(deployment))
            .filter_map(|(i, _)| {
                match self
                    .lock(BackendId(i))
                    .availability(deployment, now, &self.settings)
                {
                    Availability::CoolingDown(left, true) => Some(left),
                    _ => None,
                }
            })
            .min()
    }

    /// The least time until a backend serving `deployment` that is out of service (its circuit open,
    /// a probe out, or resting after a failure) takes traffic again, if any is: what a client refused
    /// with 503 should wait.
    pub fn shortest_recovery(&self, deployment: &str, now: Instant) -> Option<Duration> {
        self.backends
            .iter()
            .enumerate()
            .filter(|(_, b)| b.deployments.contains_key(deployment))
            .filter_map(|(i, _)| {
                self.lock(BackendId(i))
                    .recovers_in(deployment, now, &self.settings)
            })
            .min()
    }

    /// The id of the backend named `name`.
    pub fn id_of(&self, name: &str) -> Option<BackendId> {
        self.backends
            .iter()
            .position(|b| b.name == name)
            .map(BackendId)
    }

    /// Stores the last `x-ratelimit-remaining-*` values seen from backend `id` answering for
    /// `deployment` (Azure counts quota per deployment; see [`crate::retry_after::parse_remaining`]).
    /// A `None` keeps the previous value, which keeps its age.
    /// An `id` from another pool is ignored.
    pub fn observe_remaining(
        &self,
        id: BackendId,
        deployment: &str,
        tokens: Option<u64>,
        requests: Option<u64>,
        now: Instant,
    ) {
        if let Some(health) = self.health.get(id.0) {
            lock(health).observe_remaining(deployment, tokens, requests, now);
        }
    }

    /// Counts an attempt on backend `id` as in flight until the returned guard is dropped. An `id`
    /// from another pool is counted nowhere.
    pub fn begin(&self, id: BackendId) -> InFlight {
        let counter = self.in_flight.get(id.0).cloned().unwrap_or_default();
        counter.fetch_add(1, Ordering::Relaxed);
        InFlight(counter)
    }

    /// The state of every backend, for a status page or metrics.
    pub fn snapshot(&self, now: Instant) -> Vec<BackendStatus> {
        self.backends
            .iter()
            .zip(&self.health)
            .enumerate()
            .map(|(i, (backend, health))| {
                let view = lock(health).view(now, &self.settings);
                BackendStatus {
                    id: BackendId(i),
                    name: backend.name.clone(),
                    region: backend.region.clone(),
                    priority: backend.priority,
                    weight: backend.weight,
                    state: view.state,
                    cooldown_remaining: view.cooldown_remaining,
                    circuit_open_remaining: view.circuit_open_remaining,
                    consecutive_failures: view.consecutive_failures,
                    window_failures: view.window_failures,
                    not_found: view.not_found,
                    remaining_tokens: view.remaining_tokens,
                    remaining_requests: view.remaining_requests,
                    in_flight: self.in_flight[i].load(Ordering::Relaxed),
                }
            })
            .collect()
    }

    /// One pass: classifies every backend serving `deployment` and draws among the best candidates by
    /// weighted reservoir sampling, so no candidate list is allocated. Each backend is locked once.
    fn scan(&self, deployment: &str, tried: &[BackendId], need: Option<u64>, now: Instant) -> Scan {
        let mut exhausted = Exhausted::default();
        let mut serving = 0usize;
        let mut best_priority: Option<u32> = None;
        let mut total_weight: u64 = 0;
        let mut chosen: Option<BackendId> = None;
        let mut zero_weight: Option<BackendId> = None;
        // Inside the best group, a second draw weighted by weight x headroom, used when every
        // candidate has reported its headroom.
        let mut roomy_total: u128 = 0;
        let mut roomy: Option<BackendId> = None;
        let mut all_known = true;

        for (i, backend) in self.backends.iter().enumerate() {
            if !backend.deployments.contains_key(deployment) {
                continue;
            }
            serving += 1;
            let id = BackendId(i);
            let (availability, headroom) = {
                let health = self.lock(id);
                (
                    health.availability(deployment, now, &self.settings),
                    need.and_then(|_| health.headroom(deployment, now, QUOTA_FRESHNESS)),
                )
            };
            match availability {
                Availability::NotFound => exhausted.not_found += 1,
                Availability::CircuitOpen => exhausted.circuit_open += 1,
                Availability::CoolingDown(_, false) => exhausted.cooling += 1,
                Availability::CoolingDown(remaining, true) => {
                    exhausted.throttled += 1;
                    exhausted.shortest_cooldown = Some(
                        exhausted
                            .shortest_cooldown
                            .map_or(remaining, |d| d.min(remaining)),
                    );
                }
                Availability::Ready | Availability::Probe if tried.contains(&id) => {
                    exhausted.tried += 1;
                }
                Availability::Ready | Availability::Probe
                    if need.zip(headroom).is_some_and(|(need, room)| room < need) =>
                {
                    exhausted.insufficient_quota += 1;
                }
                Availability::Ready | Availability::Probe => {
                    match best_priority {
                        Some(best) if backend.priority > best => continue,
                        Some(best) if backend.priority == best => {}
                        _ => {
                            best_priority = Some(backend.priority);
                            total_weight = 0;
                            chosen = None;
                            zero_weight = None;
                            roomy_total = 0;
                            roomy = None;
                            all_known = true;
                        }
                    }
                    match headroom {
                        Some(room) => {
                            let w = u128::from(backend.weight.max(1)) * u128::from(room.max(1));
                            roomy_total += w;
                            if self.rng.below_wide(roomy_total) < w {
                                roomy = Some(id);
                            }
                        }
                        None => all_known = false,
                    }
                    if backend.weight == 0 {
                        zero_weight = zero_weight.or(Some(id));
                    } else {
                        // Keep this candidate with probability weight / total so far: in the end each
                        // candidate is kept with probability weight / total.
                        let weight = u64::from(backend.weight);
                        total_weight += weight;
                        if self.rng.below(total_weight) < weight {
                            chosen = Some(id);
                        }
                    }
                }
            }
        }
        exhausted.no_candidates = serving == 0;
        let roomy = roomy.filter(|_| all_known && need.is_some());
        Scan {
            chosen: roomy.or(chosen).or(zero_weight),
            exhausted,
        }
    }

    fn lock(&self, id: BackendId) -> MutexGuard<'_, Health> {
        lock(&self.health[id.0])
    }
}

// === impl InFlight ===

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

// === impl RngSource ===

impl RngSource {
    /// A number in `0..n` for products of weights and token counts; `n` must be positive.
    fn below_wide(&self, n: u128) -> u128 {
        match self {
            Self::Thread => fastrand::u128(..n),
            Self::Seeded(rng) => lock(rng).u128(..n),
        }
    }

    /// A number in `0..n`; `n` must be positive.
    fn below(&self, n: u64) -> u64 {
        match self {
            Self::Thread => fastrand::u64(..n),
            Self::Seeded(rng) => lock(rng).u64(..n),
        }
    }
}

/// Locks a mutex, recovering from poisoning: the state behind it stays consistent between statements,
/// and a panic elsewhere must not take routing down.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
