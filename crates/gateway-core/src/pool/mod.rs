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
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::secret::Credential;

use self::headroom::HeadroomState;
use self::health::{Availability, CircuitChange, Health};
use self::rests::Rests;
use self::routes::Reservation;

mod handover;
mod headroom;
mod health;
mod outlier;
mod rests;
mod routes;
#[cfg(feature = "redis")]
mod shared;
#[cfg(test)]
mod tests;

pub use headroom::{Headroom, HeadroomStatus, SpillReason, Tier, TierStatus, parse_utilization};
pub use outlier::CircuitSettings;
pub use rests::{DeploymentRest, RestReason};
pub use routes::Route;
#[cfg(feature = "redis")]
pub use shared::{RedisCooldowns, unix_ms};

/// How long a backend's reported remaining tokens are trusted for quota-aware routing. Azure counts
/// tokens per minute without saying when its minute started: a short trust keeps a backend whose
/// window has already reset from being skipped for long.
pub const QUOTA_FRESHNESS: Duration = Duration::from_secs(15);

/// How long a deployment rests after `x-ratelimit-remaining-requests: 0` came without an
/// `x-ratelimit-reset-requests`: Azure counts requests in 10-second windows.
pub const REQUEST_WINDOW: Duration = Duration::from_secs(10);

/// What a request turned away from every backend by headroom kept for higher tiers is told to
/// wait: headroom is read again with every answer.
pub const SPILL_RETRY: Duration = Duration::from_secs(1);

/// How long a backend that refused the gateway's credential (401/403) rests before it is tried
/// again: a key is not fixed in seconds, and a reload starts it afresh anyway.
pub const MISCONFIGURED_REST: Duration = Duration::from_secs(300);

/// How long a backend is skipped for a deployment after it answered `DeploymentNotFound`: a
/// deployment is not created in seconds, and a reload starts afresh (issue 9: it was 60 s).
const DEFAULT_NOT_FOUND_COOLDOWN: Duration = Duration::from_secs(300);

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

/// The set of backends and their shared state. `Send + Sync`: share it behind an `Arc`.
#[derive(Debug)]
pub struct BackendPool {
    backends: Vec<Backend>,
    /// One entry per backend, same order. Locked briefly, one at a time, never across `.await`.
    /// Behind an `Arc` so a pool built on reload can take an entry over (`handover`).
    health: Vec<Arc<Mutex<Health>>>,
    /// One entry per backend, same order: the rests of its deployments (429s, spent request
    /// windows, a refused credential). Locked after `health`, never together with it. Behind an
    /// `Arc`, as `health`, for the hand-over on reload.
    rests: Vec<Arc<Mutex<Rests>>>,
    /// One entry per backend, same order: the consumers it is reserved for (see `routes`).
    reserved: Vec<Reservation>,
    /// How long a backend rests after refusing the gateway's credential.
    misconfigured_rest: Duration,
    /// One entry per backend, same order: the headroom it keeps for higher tiers (see `headroom`).
    headroom: Vec<Option<Box<HeadroomState>>>,
    /// Consumers' tiers; a consumer not listed is `Standard`.
    tiers: Vec<(Box<str>, Tier)>,
    /// Attempts in flight per backend, same order; counted outside the health lock so that
    /// starting and ending an attempt never contends with routing.
    in_flight: Vec<Arc<AtomicU64>>,
    settings: PoolSettings,
    rng: RngSource,
    /// Held while deciding an ejection, so a priority group never loses more than its share.
    ejection_gate: Mutex<()>,
    panic_selections: AtomicU64,
    /// Whether the last selection was made in panic mode, to log a run of them once.
    in_panic: AtomicBool,
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
/// reason that applies in this order: `misconfigured`, `not_found`, `circuit_open`, `throttled`,
/// `tried`, `spilled`, `insufficient_quota`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Exhausted {
    /// The least remaining cooldown among the backends serving the deployment that are cooling down
    /// after a throttle (429), tried or not (the client will come back later), and [`SPILL_RETRY`]
    /// when a backend kept its headroom from the request's tier. `None` when none is throttled,
    /// e.g. every circuit is open or every backend failed or rejected the credential.
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
    /// Backends resting after they refused the gateway's credential (401/403).
    pub misconfigured: usize,
    /// Available backends keeping their remaining capacity for higher tiers than the request's.
    pub spilled: usize,
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
    /// No response headers in time. A circuit failure, and one of a run of unreachable answers.
    Timeout,
    /// Connecting or sending failed. A circuit failure, and one of a run of unreachable answers.
    ConnectError,
    /// The response body broke after it started. Not a circuit failure: the attempt was already
    /// counted when its headers came, and ejecting for it only moves load onto the others.
    StreamBroken,
    /// The gateway itself failed to make the attempt (out of file descriptors, say). Never held
    /// against the backend.
    LocalError,
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
    /// It refused the gateway's credential (401/403): skipped for a long rest, then tried again;
    /// the state holds until it serves.
    Misconfigured,
}

/// One backend as shown on a status page or in metrics.
#[derive(Debug, Clone, PartialEq)]
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
    /// Its deployments resting after a 429 or a spent request window (by its own deployment
    /// names). While any rests, `state` says `CoolingDown` and `cooldown_remaining` is the longest.
    pub resting: Vec<DeploymentRest>,
    /// The headroom it keeps for higher tiers, when it keeps some: remaining shares and spills.
    pub headroom: Option<HeadroomStatus>,
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

/// How one selection pass looks at the backends: for whom (the consumer's tier), whether spills
/// are counted (the first pass only), and whether ejected backends count as available (panic mode).
#[derive(Clone, Copy)]
struct Pass {
    tier: Tier,
    count_spills: bool,
    panic: bool,
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
    /// The policy file's defaults: a 10 s cooldown without a hint, hints capped at 5 minutes, the
    /// default [`CircuitSettings`], and a probe given 30 s (the default response header timeout) to
    /// answer.
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

// === impl BackendPool ===

impl BackendPool {
    /// A pool over `backends`, all available.
    pub fn new(backends: Vec<Backend>, settings: PoolSettings) -> Self {
        let now = Instant::now();
        let health = backends
            .iter()
            .map(|_| Arc::new(Mutex::new(Health::new(now))))
            .collect();
        let in_flight = backends.iter().map(|_| Arc::default()).collect();
        let rests = backends.iter().map(|_| Arc::default()).collect();
        let reserved = backends.iter().map(|_| None).collect();
        let headroom = backends.iter().map(|_| None).collect();
        Self {
            backends,
            health,
            rests,
            reserved,
            misconfigured_rest: MISCONFIGURED_REST,
            headroom,
            tiers: Vec::new(),
            in_flight,
            settings,
            rng: RngSource::Thread,
            ejection_gate: Mutex::new(()),
            panic_selections: AtomicU64::new(0),
            in_panic: AtomicBool::new(false),
        }
    }

    /// Rests a backend that refused the gateway's credential for `rest` instead of
    /// [`MISCONFIGURED_REST`].
    pub fn with_misconfigured_rest(mut self, rest: Duration) -> Self {
        self.misconfigured_rest = rest;
        self
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
    /// the estimate may be high, and a real 429 still fails over. If nothing is left but backends
    /// whose circuit is open (none throttled), selection ignores circuits rather than refuse (panic
    /// mode; see [`panic_selections`](Self::panic_selections)).
    pub fn select_with(
        &self,
        deployment: &str,
        tried: &[BackendId],
        need_tokens: Option<u64>,
        now: Instant,
    ) -> Selection {
        self.select_routed(deployment, tried, need_tokens, Route::default(), now)
    }

    /// Like [`select_with`](Self::select_with), for `route`: backends reserved for other consumers
    /// (see [`reserve`](Self::reserve)) are left out as if they did not serve the deployment.
    pub fn select_routed(
        &self,
        deployment: &str,
        tried: &[BackendId],
        need_tokens: Option<u64>,
        route: Route<'_>,
        now: Instant,
    ) -> Selection {
        let mut exhausted = Exhausted::default();
        let mut need = need_tokens;
        let tier = self.tier_of(route.consumer_name());
        // Without panic mode: why nothing was selectable, which is what a refused client is told.
        let mut before_panic: Option<Exhausted> = None;
        // A claim fails only when another thread changed the chosen backend between the scan and the
        // claim (typically: took the same half-open probe slot); scan again, a bounded number of times.
        for pass in 0..=self.backends.len() + 2 {
            let panic = before_panic.is_some();
            // Spills are counted once per selection, not once per pass.
            let pass = Pass {
                tier,
                count_spills: pass == 0,
                panic,
            };
            let scan = self.scan(deployment, tried, need, route, pass, now);
            match scan.chosen {
                Some(id) if self.lock(id).claim(deployment, now, &self.settings, panic) => {
                    if let Some(tokens) = need_tokens {
                        self.lock(id).note_sent(deployment, tokens);
                    }
                    self.note_panic(deployment, panic);
                    if let Some(state) = &self.headroom[id.0] {
                        state.note_sent(
                            self.own_name(id, deployment),
                            need_tokens.unwrap_or(0),
                            now,
                        );
                    }
                    return Selection::Backend(id);
                }
                Some(_) => exhausted = scan.exhausted,
                None if need.is_some() && scan.exhausted.insufficient_quota > 0 => {
                    need = None;
                    exhausted = scan.exhausted;
                }
                // Throttled backends are excluded: a client told to come back when they are
                // rested has a good answer already.
                None if !panic
                    && scan.exhausted.circuit_open > 0
                    && scan.exhausted.throttled == 0 =>
                {
                    before_panic = Some(scan.exhausted);
                }
                None => return Selection::Exhausted(before_panic.unwrap_or(scan.exhausted)),
            }
        }
        Selection::Exhausted(exhausted)
    }

    /// Records how an attempt on backend `id` for `deployment` ended.
    ///
    /// - `Throttled`, `AuthFailure`, and `ServerError` with a hint cool the backend down for
    ///   `min(hint or default_cooldown, max_cooldown)`; a cooldown already in force that ends later is
    ///   kept (the longest wins).
    /// - `ServerError`, `Timeout` and `ConnectError` are circuit failures, `Success` is not; the
    ///   outlier rules (see [`CircuitSettings`]) decide when they open the circuit, within the
    ///   priority group's share of ejections. `StreamBroken` and `LocalError` are neither. While
    ///   open, further outcomes (from requests sent before the trip) change nothing.
    /// - Half-open: `Success` closes the circuit, a circuit failure reopens it for longer, anything
    ///   else frees the probe slot for another probe.
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
        let mut recorded = lock(health).record(deployment, outcome, now, &self.settings);
        if recorded.circuit == Some(CircuitChange::Tripped) {
            // Outside the backend's lock: the decision looks at its whole priority group.
            recorded.circuit = self.eject_if_allowed(id, now);
        }
        if let Outcome::Throttled { hint } = outcome {
            let rest = hint.unwrap_or(self.settings.default_cooldown);
            recorded.cooldown = Some(self.rest(id, deployment, rest, RestReason::Throttled, now));
        }
        self.note_credential(id, outcome, now);

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
            Some(CircuitChange::Opened) => {
                tracing::warn!(backend, ?outcome, "circuit opened: the backend is ejected")
            }
            Some(CircuitChange::Refused) => tracing::debug!(
                backend,
                ?outcome,
                "circuit not opened: its priority group already has its share of ejected backends"
            ),
            Some(CircuitChange::Tripped) => {}
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

    /// Rests the deployment named `own_deployment` *on backend `id`* (the backend's own name for it,
    /// as [`Backend::deployment_name`] gives) for `cooldown` (capped at the maximum), as learned from
    /// another gateway instance's 429; a longer rest in force is kept. Unlike
    /// [`record`](Self::record) it is no outcome of this instance's: circuits and probes are untouched.
    pub fn cool_down(&self, id: BackendId, own_deployment: &str, cooldown: Duration, now: Instant) {
        if let Some(rests) = self.rests.get(id.0) {
            lock(rests).rest(
                own_deployment,
                cooldown,
                self.settings.max_cooldown,
                RestReason::Throttled,
                now,
            );
        }
    }

    /// Backend `id` said `x-ratelimit-remaining-requests: 0` for `deployment`: it rests until its
    /// request window resets (`reset`, from `x-ratelimit-reset-requests`, else [`REQUEST_WINDOW`]),
    /// as a 429 would have made it, without the doomed round trip. Returns the rest applied.
    pub fn requests_spent(
        &self,
        id: BackendId,
        deployment: &str,
        reset: Option<Duration>,
        now: Instant,
    ) -> Option<Duration> {
        self.rests.get(id.0)?;
        let rest = reset.unwrap_or(REQUEST_WINDOW);
        Some(self.rest(id, deployment, rest, RestReason::RequestsSpent, now))
    }

    /// A 401/403 marks backend `id` (a valid id) misconfigured, a success clears it; each transition
    /// is logged once, the first loudly: no client can fix the gateway's credential.
    fn note_credential(&self, id: BackendId, outcome: Outcome, now: Instant) {
        let backend = &self.backends[id.0].name;
        match outcome {
            Outcome::AuthFailure { .. } => {
                let rest = self.misconfigured_rest;
                if lock(&self.rests[id.0]).misconfigure(rest, now) {
                    tracing::error!(
                        backend,
                        rest_s = rest.as_secs(),
                        "backend refused the gateway's credential (401/403): marked misconfigured; check its api_key or bearer_token; failing over, and trying it again after the rest or on reload"
                    );
                }
            }
            Outcome::Success if lock(&self.rests[id.0]).configured() => {
                tracing::info!(backend, "backend accepts the gateway's credential again");
            }
            _ => {}
        }
    }

    /// Rests logical `deployment` on backend `id` (a valid id), keyed by the backend's own name.
    fn rest(
        &self,
        id: BackendId,
        deployment: &str,
        rest: Duration,
        reason: RestReason,
        now: Instant,
    ) -> Duration {
        let own = self.backends[id.0]
            .deployment_name(deployment)
            .unwrap_or(deployment);
        lock(&self.rests[id.0]).rest(own, rest, self.settings.max_cooldown, reason, now)
    }

    /// Time left resting for logical `deployment` on backend `id` (a valid id), if it rests.
    fn resting(&self, id: BackendId, deployment: &str, now: Instant) -> Option<Duration> {
        self.rest_state(id, deployment, now).0
    }

    /// Time left resting for logical `deployment` on backend `id` (a valid id), and time left in
    /// the backend's rest as misconfigured; under one lock.
    fn rest_state(
        &self,
        id: BackendId,
        deployment: &str,
        now: Instant,
    ) -> (Option<Duration>, Option<Duration>) {
        let own = self.backends[id.0]
            .deployment_name(deployment)
            .unwrap_or(deployment);
        let rests = lock(&self.rests[id.0]);
        (
            rests.remaining(own, now),
            rests.misconfigured_remaining(now),
        )
    }

    /// The least time until a throttled backend serving `deployment` is available again, if any is
    /// throttled: what a client told to come back should wait.
    pub fn shortest_throttle(&self, deployment: &str, now: Instant) -> Option<Duration> {
        self.shortest_throttle_for(deployment, Route::default(), now)
    }

    /// Like [`shortest_throttle`](Self::shortest_throttle), among the backends `route` may use.
    pub fn shortest_throttle_for(
        &self,
        deployment: &str,
        route: Route<'_>,
        now: Instant,
    ) -> Option<Duration> {
        self.backends
            .iter()
            .enumerate()
            .filter(|(_, b)| b.deployments.contains_key(deployment))
            .filter(|(i, _)| self.admits(BackendId(*i), route))
            .filter_map(|(i, _)| self.resting(BackendId(i), deployment, now))
            .min()
    }

    /// The least time until a backend serving `deployment` that is out of service (its circuit open,
    /// a probe out, or resting after a failure) takes traffic again, if any is: what a client refused
    /// with 503 should wait.
    pub fn shortest_recovery(&self, deployment: &str, now: Instant) -> Option<Duration> {
        self.shortest_recovery_for(deployment, Route::default(), now)
    }

    /// Like [`shortest_recovery`](Self::shortest_recovery), among the backends `route` may use.
    pub fn shortest_recovery_for(
        &self,
        deployment: &str,
        route: Route<'_>,
        now: Instant,
    ) -> Option<Duration> {
        self.backends
            .iter()
            .enumerate()
            .filter(|(_, b)| b.deployments.contains_key(deployment))
            .filter(|(i, _)| self.admits(BackendId(*i), route))
            .filter_map(|(i, _)| {
                let id = BackendId(i);
                let health = self.lock(id).recovers_in(deployment, now, &self.settings);
                let (rest, misconfigured) = self.rest_state(id, deployment, now);
                // The backend is back only when all are over.
                [health, rest, misconfigured].into_iter().flatten().max()
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
            self.observe_capacity(id, deployment, None, requests, now);
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
                let (resting, misconfigured) = {
                    let rests = lock(&self.rests[i]);
                    (rests.view(now), rests.is_misconfigured())
                };
                let longest_rest = resting.iter().map(|r| r.remaining).max();
                let state = match view.state {
                    _ if misconfigured => BackendState::Misconfigured,
                    BackendState::Available | BackendState::HalfOpen if longest_rest.is_some() => {
                        BackendState::CoolingDown
                    }
                    state => state,
                };
                let cooldown_remaining = match (view.cooldown_remaining, longest_rest) {
                    (Some(a), Some(b)) => Some(a.max(b)),
                    (a, b) => a.or(b),
                };
                BackendStatus {
                    id: BackendId(i),
                    name: backend.name.clone(),
                    region: backend.region.clone(),
                    priority: backend.priority,
                    weight: backend.weight,
                    state,
                    cooldown_remaining,
                    circuit_open_remaining: view.circuit_open_remaining,
                    consecutive_failures: view.consecutive_failures,
                    window_failures: view.window_failures,
                    not_found: view.not_found,
                    remaining_tokens: view.remaining_tokens,
                    remaining_requests: view.remaining_requests,
                    in_flight: self.in_flight[i].load(Ordering::Relaxed),
                    resting,
                    headroom: self.headroom_status(BackendId(i), now),
                }
            })
            .collect()
    }

    /// One pass: classifies every backend serving `deployment` and draws among the best candidates by
    /// weighted reservoir sampling, so no candidate list is allocated. Each backend is locked once.
    /// In panic mode, circuits are ignored.
    fn scan(
        &self,
        deployment: &str,
        tried: &[BackendId],
        need: Option<u64>,
        route: Route<'_>,
        Pass {
            tier,
            count_spills,
            panic,
        }: Pass,
        now: Instant,
    ) -> Scan {
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
            let id = BackendId(i);
            if !backend.deployments.contains_key(deployment) || !self.admits(id, route) {
                continue;
            }
            serving += 1;
            let keeps = self.headroom[i].as_deref();
            let (mut availability, headroom) = {
                let health = self.lock(id);
                (
                    health.availability_with(deployment, now, &self.settings, panic),
                    (need.is_some() || keeps.is_some())
                        .then(|| health.headroom(deployment, now, QUOTA_FRESHNESS))
                        .flatten(),
                )
            };
            let (rest, misconfigured) = self.rest_state(id, deployment, now);
            if misconfigured.is_some() {
                exhausted.misconfigured += 1;
                continue;
            }
            // The deployment's own rest: a throttle the client can wait out, and the backend is
            // back only when both its cooldown and this rest are over.
            availability = match (availability, rest) {
                (Availability::Ready | Availability::Probe, Some(rest)) => {
                    Availability::CoolingDown(rest, true)
                }
                (Availability::CoolingDown(left, _), Some(rest)) => {
                    Availability::CoolingDown(left.max(rest), true)
                }
                (availability, _) => availability,
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
                    if keeps.is_some_and(|state| {
                        let own = self.own_name(id, deployment);
                        match state.spills(own, tier, headroom, now) {
                            Some(reason) if count_spills => {
                                state.count_spill(tier, reason, now);
                                true
                            }
                            spill => spill.is_some(),
                        }
                    }) =>
                {
                    exhausted.spilled += 1;
                    // Headroom is read again with every answer: a second is soon enough to look.
                    exhausted.shortest_cooldown = Some(
                        exhausted
                            .shortest_cooldown
                            .map_or(SPILL_RETRY, |d| d.min(SPILL_RETRY)),
                    );
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
