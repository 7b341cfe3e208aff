//! Application priority on shared backends: a backend keeps headroom for higher tiers.
//!
//! An enterprise PTU pool is shared by many applications, and the organisation decides which of
//! them see latency rise first. Each consumer has a [`Tier`]; a shared backend may keep a share of
//! its capacity for the tiers above some: once its known remaining capacity falls below a tier's
//! share, that tier's requests stop being sent there and move on to the next backend (typically
//! Standard), or get the gateway's 429 when nothing else is left. Critical traffic keeps PTU latency.
//!
//! The remaining share of a (backend, deployment) comes from the freshest source known:
//! 1. `azure-openai-deployment-utilization` (a PTU deployment's share in use), read within 15 s;
//! 2. `x-ratelimit-remaining-tokens` less what was sent since, against the backend's `tpm`, and
//!    `x-ratelimit-remaining-requests` against its 10-second request window (`rpm / 6`), read
//!    within 15 s: the smaller share counts;
//! 3. the gateway's own count of what it sent in the last minute, against `tpm` and `rpm`.
//!
//! Without any of them (no headers, no known limits) nothing spills.
//!
//! ```
//! use std::collections::BTreeMap;
//! use std::time::Instant;
//! use gateway_core::pool::{Backend, BackendPool, Headroom, PoolSettings, Route, Selection, Tier};
//!
//! let backend = |name: &str, priority| Backend {
//!     name: name.to_owned(),
//!     region: "France Central".to_owned(),
//!     endpoint: format!("https://{name}.openai.azure.com"),
//!     priority,
//!     weight: 1,
//!     deployments: BTreeMap::from([("gpt-4o".to_owned(), "gpt-4o".to_owned())]),
//!     credential: None,
//! };
//! // The pool keeps its last 30 % for critical and standard traffic.
//! let pool = BackendPool::new(vec![backend("ptu-pool", 1), backend("standard", 2)], PoolSettings::default())
//!     .keep_headroom("ptu-pool", Headroom::new().keep(Tier::Low, 0.30))
//!     .tiers([("batch-job", Tier::Low), ("claims-bot", Tier::Critical)]);
//! let now = Instant::now();
//! let ptu = pool.id_of("ptu-pool").unwrap();
//! // The PTU deployment says it is 80 % busy.
//! pool.observe_utilization(ptu, "gpt-4o", 80.0, now);
//! let pick = |consumer| match pool.select_routed("gpt-4o", &[], None, Route::consumer(consumer), now) {
//!     Selection::Backend(id) => pool.get(id).name.clone(),
//!     Selection::Exhausted(e) => panic!("{e:?}"),
//! };
//! assert_eq!(pick("claims-bot"), "ptu-pool");
//! assert_eq!(pick("batch-job"), "standard");
//! ```

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::{BackendId, BackendPool, QUOTA_FRESHNESS, lock};

/// A consumer's priority on shared backends; higher tiers keep PTU latency longest.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Tier {
    /// Mission-critical: spills last.
    Critical,
    /// The default.
    #[default]
    Standard,
    /// Spills first.
    Low,
}

/// Why a tier was not sent to a backend: which source said its remaining capacity was too low.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SpillReason {
    /// `azure-openai-deployment-utilization`.
    Utilization,
    /// `x-ratelimit-remaining-tokens` (less what was sent since) against `tpm`.
    RemainingTokens,
    /// `x-ratelimit-remaining-requests` against the 10-second window of `rpm`.
    RemainingRequests,
    /// The gateway's own count of the last minute against `tpm`/`rpm`.
    GatewayCount,
}

/// The headroom a backend keeps for higher tiers, and the capacity it is measured against.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Headroom {
    /// Tokens per minute the backend's deployments take (the policy's `tpm`).
    pub tpm: Option<u64>,
    /// Requests per minute (the policy's `rpm`).
    pub rpm: Option<u64>,
    /// Per tier, in [`Tier`] order: the share of capacity (0 to 1) below which that tier is no
    /// longer sent to the backend.
    pub keep: [Option<f64>; 3],
}

/// One tier's spilling on one backend, for a status page and metrics.
#[derive(Debug, Clone, PartialEq)]
pub struct TierStatus {
    /// The tier.
    pub tier: Tier,
    /// The share it needs left to be sent there.
    pub keep: f64,
    /// Whether it would be turned away now, given the share known now.
    pub spilling: bool,
    /// Requests of this tier turned away from the backend, by reason.
    pub spills: Vec<(SpillReason, u64)>,
    /// The last time one was, how long ago and why.
    pub last_spill: Option<(Duration, SpillReason)>,
}

/// A backend's headroom as shown on a status page.
#[derive(Debug, Clone, PartialEq)]
pub struct HeadroomStatus {
    /// Remaining share of capacity per deployment (backend's own names), and its source.
    pub remaining: Vec<(String, f64, SpillReason)>,
    /// Per tier that keeps headroom.
    pub tiers: Vec<TierStatus>,
}

/// Headroom state of one backend: its policy, readings per deployment, and spill counts.
#[derive(Debug)]
pub(super) struct HeadroomState {
    policy: Headroom,
    readings: Mutex<Readings>,
    /// `[tier][reason]`.
    spills: [[AtomicU64; 4]; 3],
}

#[derive(Debug, Default)]
struct Readings {
    deployments: Vec<Reading>,
    last_spill: [Option<(Instant, SpillReason)>; 3],
}

#[derive(Debug)]
struct Reading {
    deployment: Box<str>,
    utilization: Option<(f64, Instant)>,
    remaining_requests: Option<(u64, Instant)>,
    /// Requests sent since `remaining_requests` was read: in flight, or answered without it.
    requests_since: u64,
    /// The gateway's own count: per second of the last minute, tokens and requests sent.
    window: Window,
}

/// Sixty one-second buckets of tokens and requests sent, sliding with time.
#[derive(Debug)]
struct Window {
    origin: Instant,
    /// Seconds since `origin` of the newest bucket.
    newest: u64,
    tokens: [u64; 60],
    requests: [u64; 60],
}

// === impl Tier ===

impl Tier {
    /// Every tier, highest first.
    pub const ALL: [Tier; 3] = [Tier::Critical, Tier::Standard, Tier::Low];

    /// The name used in the policy, on the status page and in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Critical => "critical",
            Self::Standard => "standard",
            Self::Low => "low",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

// === impl SpillReason ===

impl SpillReason {
    const ALL: [SpillReason; 4] = [
        Self::Utilization,
        Self::RemainingTokens,
        Self::RemainingRequests,
        Self::GatewayCount,
    ];

    /// The name used on the status page and in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Utilization => "utilization",
            Self::RemainingTokens => "remaining_tokens",
            Self::RemainingRequests => "remaining_requests",
            Self::GatewayCount => "gateway_count",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

// === impl Headroom ===

impl Headroom {
    /// No headroom kept, no capacity known.
    pub fn new() -> Self {
        Self::default()
    }

    /// Keeps `share` (0 to 1) of capacity from `tier`: below it, that tier goes elsewhere.
    pub fn keep(mut self, tier: Tier, share: f64) -> Self {
        self.keep[tier.index()] = Some(share);
        self
    }

    /// The backend's known limits, the capacity shares are measured against.
    pub fn limits(mut self, tpm: Option<u64>, rpm: Option<u64>) -> Self {
        self.tpm = tpm;
        self.rpm = rpm;
        self
    }

    fn keeps_any(&self) -> bool {
        self.keep.iter().any(Option::is_some)
    }
}

// === impl Window ===

impl Window {
    fn new(now: Instant) -> Self {
        Self {
            origin: now,
            newest: 0,
            tokens: [0; 60],
            requests: [0; 60],
        }
    }

    /// Moves the newest bucket to `now`, emptying the buckets that left the minute.
    fn slide(&mut self, now: Instant) {
        let second = now.saturating_duration_since(self.origin).as_secs();
        if second <= self.newest {
            return;
        }
        let gap = (second - self.newest).min(60);
        for s in 1..=gap {
            let i = ((self.newest + s) % 60) as usize;
            self.tokens[i] = 0;
            self.requests[i] = 0;
        }
        self.newest = second;
    }

    fn add(&mut self, tokens: u64, now: Instant) {
        self.slide(now);
        let i = (self.newest % 60) as usize;
        self.tokens[i] = self.tokens[i].saturating_add(tokens);
        self.requests[i] = self.requests[i].saturating_add(1);
    }

    fn totals(&mut self, now: Instant) -> (u64, u64) {
        self.slide(now);
        (self.tokens.iter().sum(), self.requests.iter().sum())
    }
}

// === impl HeadroomState ===

impl HeadroomState {
    pub(super) fn new(policy: Headroom) -> Option<Box<Self>> {
        policy.keeps_any().then(|| {
            Box::new(Self {
                policy,
                readings: Mutex::default(),
                spills: Default::default(),
            })
        })
    }

    fn with_reading<T>(
        &self,
        deployment: &str,
        now: Instant,
        f: impl FnOnce(&mut Reading) -> T,
    ) -> T {
        let mut readings = lock(&self.readings);
        let at = match readings
            .deployments
            .iter()
            .position(|r| &*r.deployment == deployment)
        {
            Some(at) => at,
            None => {
                readings.deployments.push(Reading {
                    deployment: deployment.into(),
                    utilization: None,
                    remaining_requests: None,
                    requests_since: 0,
                    window: Window::new(now),
                });
                readings.deployments.len() - 1
            }
        };
        f(&mut readings.deployments[at])
    }

    /// The remaining share of `deployment` and its source; `remaining_tokens` is the pool's
    /// per-deployment headroom (reported less sent since), when fresh.
    fn remaining(
        &self,
        deployment: &str,
        remaining_tokens: Option<u64>,
        now: Instant,
    ) -> Option<(f64, SpillReason)> {
        let fresh = |at: Instant| now.saturating_duration_since(at) <= QUOTA_FRESHNESS;
        let Headroom { tpm, rpm, .. } = self.policy;
        self.with_reading(deployment, now, |r| {
            if let Some((percent, _)) = r.utilization.filter(|(_, at)| fresh(*at)) {
                return Some((
                    (100.0 - percent).clamp(0.0, 100.0) / 100.0,
                    SpillReason::Utilization,
                ));
            }
            let tokens = remaining_tokens
                .zip(tpm)
                .map(|(left, tpm)| (share(left, tpm), SpillReason::RemainingTokens));
            let requests = r
                .remaining_requests
                .filter(|(_, at)| fresh(*at))
                .zip(rpm)
                .map(|((left, _), rpm)| {
                    let left = left.saturating_sub(r.requests_since);
                    (
                        share(left, (rpm / 6).max(1)),
                        SpillReason::RemainingRequests,
                    )
                });
            if let Some(known) = lowest(tokens, requests) {
                return Some(known);
            }
            let (sent_tokens, sent_requests) = r.window.totals(now);
            let by_tokens = tpm.map(|tpm| {
                (
                    share(tpm.saturating_sub(sent_tokens), tpm),
                    SpillReason::GatewayCount,
                )
            });
            let by_requests = rpm.map(|rpm| {
                (
                    share(rpm.saturating_sub(sent_requests), rpm),
                    SpillReason::GatewayCount,
                )
            });
            lowest(by_tokens, by_requests)
        })
    }

    /// Whether `tier` must not be sent to `deployment` now, and why.
    pub(super) fn spills(
        &self,
        deployment: &str,
        tier: Tier,
        remaining_tokens: Option<u64>,
        now: Instant,
    ) -> Option<SpillReason> {
        let keep = self.policy.keep[tier.index()]?;
        let (share, reason) = self.remaining(deployment, remaining_tokens, now)?;
        (share < keep).then_some(reason)
    }

    /// Counts a request of `tier` turned away for `reason`.
    pub(super) fn count_spill(&self, tier: Tier, reason: SpillReason, now: Instant) {
        self.spills[tier.index()][reason.index()].fetch_add(1, Ordering::Relaxed);
        lock(&self.readings).last_spill[tier.index()] = Some((now, reason));
    }

    pub(super) fn note_sent(&self, deployment: &str, tokens: u64, now: Instant) {
        self.with_reading(deployment, now, |r| {
            r.window.add(tokens, now);
            r.requests_since = r.requests_since.saturating_add(1);
        });
    }

    pub(super) fn observe(
        &self,
        deployment: &str,
        utilization: Option<f64>,
        remaining_requests: Option<u64>,
        now: Instant,
    ) {
        self.with_reading(deployment, now, |r| {
            if let Some(u) = utilization {
                r.utilization = Some((u, now));
            }
            if let Some(left) = remaining_requests {
                r.remaining_requests = Some((left, now));
                r.requests_since = 0;
            }
        });
    }

    pub(super) fn status(
        &self,
        deployments: &[(&str, Option<u64>)],
        now: Instant,
    ) -> HeadroomStatus {
        let remaining: Vec<(String, f64, SpillReason)> = deployments
            .iter()
            .filter_map(|(d, tokens)| {
                self.remaining(d, *tokens, now)
                    .map(|(share, why)| ((*d).to_owned(), share, why))
            })
            .collect();
        let last = lock(&self.readings).last_spill;
        let tiers = Tier::ALL
            .iter()
            .filter_map(|&tier| {
                let keep = self.policy.keep[tier.index()]?;
                Some(TierStatus {
                    tier,
                    keep,
                    spilling: remaining.iter().any(|(_, share, _)| *share < keep),
                    spills: SpillReason::ALL
                        .iter()
                        .map(|&r| {
                            (
                                r,
                                self.spills[tier.index()][r.index()].load(Ordering::Relaxed),
                            )
                        })
                        .filter(|(_, n)| *n > 0)
                        .collect(),
                    last_spill: last[tier.index()]
                        .map(|(at, why)| (now.saturating_duration_since(at), why)),
                })
            })
            .collect();
        HeadroomStatus { remaining, tiers }
    }
}

fn share(left: u64, capacity: u64) -> f64 {
    (left as f64 / capacity.max(1) as f64).min(1.0)
}

fn lowest(
    a: Option<(f64, SpillReason)>,
    b: Option<(f64, SpillReason)>,
) -> Option<(f64, SpillReason)> {
    match (a, b) {
        (Some(a), Some(b)) => Some(if b.0 < a.0 { b } else { a }),
        (a, b) => a.or(b),
    }
}

// === impl BackendPool ===

impl BackendPool {
    /// Keeps headroom on the backend named `backend` for the tiers above those `headroom` limits.
    /// An unknown name, or a headroom that keeps nothing, changes nothing.
    pub fn keep_headroom(mut self, backend: &str, headroom: Headroom) -> Self {
        if let Some(id) = self.id_of(backend) {
            self.headroom[id.0] = HeadroomState::new(headroom);
        }
        self
    }

    /// Gives consumers their tiers; a consumer not named is [`Tier::Standard`].
    pub fn tiers<S: Into<Box<str>>>(mut self, tiers: impl IntoIterator<Item = (S, Tier)>) -> Self {
        self.tiers = tiers.into_iter().map(|(c, t)| (c.into(), t)).collect();
        self
    }

    /// The tier of the consumer named `consumer`.
    pub fn tier_of(&self, consumer: Option<&str>) -> Tier {
        consumer
            .and_then(|c| self.tiers.iter().find(|(name, _)| &**name == c))
            .map_or(Tier::default(), |(_, t)| *t)
    }

    /// Stores `azure-openai-deployment-utilization` (a percentage, `87` for `87%`) and
    /// `x-ratelimit-remaining-requests` as seen from backend `id` answering for logical
    /// `deployment`; only backends keeping headroom keep them.
    pub fn observe_utilization(&self, id: BackendId, deployment: &str, percent: f64, now: Instant) {
        self.observe_capacity(id, deployment, Some(percent), None, now);
    }

    pub(super) fn observe_capacity(
        &self,
        id: BackendId,
        deployment: &str,
        utilization: Option<f64>,
        remaining_requests: Option<u64>,
        now: Instant,
    ) {
        if let Some(Some(state)) = self.headroom.get(id.0) {
            let own = self.own_name(id, deployment);
            state.observe(own, utilization, remaining_requests, now);
        }
    }

    /// The headroom of every backend keeping some, for a status page and metrics.
    pub fn headroom_status(&self, id: BackendId, now: Instant) -> Option<HeadroomStatus> {
        let state = self.headroom.get(id.0)?.as_ref()?;
        let backend = &self.backends[id.0];
        let health = self.lock(id);
        let deployments: Vec<(&str, Option<u64>)> = backend
            .deployments
            .iter()
            .map(|(logical, own)| (own.as_str(), health.headroom(logical, now, QUOTA_FRESHNESS)))
            .collect();
        drop(health);
        Some(state.status(&deployments, now))
    }

    pub(super) fn own_name<'a>(&'a self, id: BackendId, deployment: &'a str) -> &'a str {
        self.backends[id.0]
            .deployment_name(deployment)
            .unwrap_or(deployment)
    }
}

/// Parses `azure-openai-deployment-utilization`: `87%`, `87.5%` or `87`, as a percentage.
///
/// ```
/// use gateway_core::pool::parse_utilization;
///
/// assert_eq!(parse_utilization("87%"), Some(87.0));
/// assert_eq!(parse_utilization(" 12.5 "), Some(12.5));
/// assert_eq!(parse_utilization("busy"), None);
/// ```
pub fn parse_utilization(value: &str) -> Option<f64> {
    let value = value.trim();
    let number = value.strip_suffix('%').unwrap_or(value).trim();
    number
        .parse::<f64>()
        .ok()
        .filter(|p| p.is_finite() && *p >= 0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tier_with_nowhere_else_to_go_is_told_to_come_back_soon() {
        use crate::pool::{Backend, PoolSettings, Route, SPILL_RETRY, Selection};
        use std::collections::BTreeMap;

        let backend = Backend {
            name: "pool".to_owned(),
            region: "r".to_owned(),
            endpoint: "https://pool.openai.azure.com".to_owned(),
            priority: 1,
            weight: 1,
            deployments: BTreeMap::from([("gpt-4o".to_owned(), "gpt-4o".to_owned())]),
            credential: None,
        };
        let pool = BackendPool::new(vec![backend], PoolSettings::default())
            .keep_headroom("pool", Headroom::new().keep(Tier::Low, 0.5))
            .tiers([("batch", Tier::Low)]);
        let now = Instant::now();
        let id = BackendId(0);
        pool.observe_utilization(id, "gpt-4o", 60.0, now);
        let Selection::Exhausted(e) =
            pool.select_routed("gpt-4o", &[], None, Route::consumer("batch"), now)
        else {
            panic!("the low tier must not be sent");
        };
        assert_eq!((e.spilled, e.shortest_cooldown), (1, Some(SPILL_RETRY)));
        // Others still are; the spill is counted once, with its reason.
        let other = pool.select_routed("gpt-4o", &[], None, Route::consumer("app"), now);
        assert_eq!(other, Selection::Backend(id));
        let status = pool.headroom_status(id, now).unwrap();
        assert_eq!(status.tiers[0].spills, [(SpillReason::Utilization, 1)]);
        assert!(status.tiers[0].spilling);
    }

    #[test]
    fn the_window_counts_the_last_minute() {
        let t0 = Instant::now();
        let mut w = Window::new(t0);
        w.add(100, t0);
        w.add(50, t0 + Duration::from_secs(30));
        assert_eq!(w.totals(t0 + Duration::from_secs(59)), (150, 2));
        assert_eq!(w.totals(t0 + Duration::from_secs(60)), (50, 1));
        assert_eq!(w.totals(t0 + Duration::from_secs(500)), (0, 0));
    }

    #[test]
    fn sources_in_order_of_trust() {
        let t0 = Instant::now();
        let state = HeadroomState::new(
            Headroom::new()
                .keep(Tier::Low, 0.3)
                .keep(Tier::Standard, 0.1)
                .limits(Some(10_000), Some(60)),
        )
        .unwrap();
        // Nothing read, nothing sent: all the capacity is left by the gateway's own count.
        assert_eq!(
            state.remaining("d", None, t0),
            Some((1.0, SpillReason::GatewayCount))
        );
        for _ in 0..8 {
            state.note_sent("d", 1_000, t0);
        }
        assert_eq!(
            state.spills("d", Tier::Low, None, t0),
            Some(SpillReason::GatewayCount)
        );
        assert_eq!(state.spills("d", Tier::Standard, None, t0), None);
        assert_eq!(state.spills("d", Tier::Critical, None, t0), None);
        // The backend's remaining tokens say more room than our count: they win.
        assert_eq!(
            state.remaining("d", Some(5_000), t0),
            Some((0.5, SpillReason::RemainingTokens))
        );
        // Its request window (10 per 10 s) is nearly spent: the lower share wins.
        state.observe("d", None, Some(2), t0);
        assert_eq!(
            state.remaining("d", Some(5_000), t0),
            Some((0.2, SpillReason::RemainingRequests))
        );
        // Less what was sent since it said so.
        state.note_sent("d", 0, t0);
        assert_eq!(
            state.remaining("d", Some(5_000), t0),
            Some((0.1, SpillReason::RemainingRequests))
        );
        // A PTU's utilization is the most direct.
        state.observe("d", Some(95.0), None, t0);
        assert_eq!(
            state.spills("d", Tier::Standard, None, t0),
            Some(SpillReason::Utilization)
        );
        // Readings go stale; the own count then speaks again, its minute over.
        let later = t0 + Duration::from_secs(61);
        assert_eq!(
            state.remaining("d", None, later),
            Some((1.0, SpillReason::GatewayCount))
        );
    }
}
