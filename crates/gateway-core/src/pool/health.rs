//! One backend's mutable state: cooldown, circuit breaker, not-found marks and the last quota seen.
//!
//! Nothing here runs on a timer: every state is derived from the `now` passed in. When the circuit
//! opens is the outlier detector's rule (see `outlier`).

use std::time::{Duration, Instant};

use super::outlier::Window;
use super::{BackendState, Outcome, PoolSettings, RemainingQuota};

/// The shortest cooldown applied: a `retry-after: 0` from a backend that just refused would otherwise
/// send the next request straight back to it, and every request would pay a wasted round trip.
pub(super) const MIN_COOLDOWN: Duration = Duration::from_millis(100);

/// Mutable state of one backend, kept behind a `Mutex` by the pool.
#[derive(Debug)]
pub(super) struct Health {
    /// Not selectable before this instant (throttled, auth failure, or a 5xx with a hint).
    cooling_until: Option<Instant>,
    /// The part of the cooldown due to throttling (429s), which a client can wait out: only that
    /// becomes the gateway's own 429 with a retry-after.
    throttled_until: Option<Instant>,
    /// Attempts and failures within the circuit interval.
    window: Window,
    /// Failures since the last success, for the status page only.
    consecutive_failures: u32,
    /// Connection failures and timeouts in a row: any answer from the backend resets it.
    consecutive_unreachable: u32,
    /// Recent ejections, which lengthen the next one; one is forgotten per healthy interval.
    ejections: u32,
    /// When the circuit last closed, to forget ejections.
    closed_at: Option<Instant>,
    /// Set while the circuit is not closed: open before this instant, half-open from it on.
    open_until: Option<Instant>,
    /// When the pending half-open probe was let through.
    probe_started: Option<Instant>,
    /// Deployments this backend answered `DeploymentNotFound` for, and until when they are skipped.
    not_found: Vec<(Box<str>, Instant)>,
    remaining_tokens: Option<(u64, Instant)>,
    remaining_requests: Option<(u64, Instant)>,
    /// Per deployment (Azure counts quota per deployment): the last remaining tokens reported, when,
    /// and the estimates sent there since.
    headroom: Vec<Headroom>,
}

#[derive(Debug)]
struct Headroom {
    deployment: Box<str>,
    remaining: u64,
    at: Instant,
    sent_since: u64,
}

/// Whether a backend can take a request for one deployment right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Availability {
    /// Closed circuit, no cooldown.
    Ready,
    /// Half-open and no probe pending: it may take exactly one request.
    Probe,
    /// Skipped for this deployment after a `DeploymentNotFound`.
    NotFound,
    /// Circuit open, or half-open with a probe pending.
    CircuitOpen,
    /// Cooling down for this much longer; `throttled` when a throttle (429) accounts for it.
    CoolingDown(Duration, bool),
}

/// A circuit breaker transition caused by an outcome, reported so the pool can log it outside the lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum CircuitChange {
    Opened,
    Reopened,
    Closed,
    /// An ejection rule was met: the pool decides whether the priority group has room for it.
    Tripped,
    /// An ejection rule was met but the group already has its share of backends ejected.
    Refused,
}

/// What a recorded outcome changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Recorded {
    /// The cooldown applied by this outcome (before merging with a longer one in force).
    pub(super) cooldown: Option<Duration>,
    pub(super) circuit: Option<CircuitChange>,
}

/// A read-only copy of the state for [`super::BackendPool::snapshot`].
#[derive(Debug)]
pub(super) struct HealthView {
    pub(super) state: BackendState,
    pub(super) cooldown_remaining: Option<Duration>,
    pub(super) circuit_open_remaining: Option<Duration>,
    pub(super) consecutive_failures: u32,
    pub(super) window_failures: u32,
    pub(super) not_found: Vec<String>,
    pub(super) remaining_tokens: Option<RemainingQuota>,
    pub(super) remaining_requests: Option<RemainingQuota>,
}

/// `now + d`, saturating far in the future instead of panicking on an absurd duration.
pub(super) fn later(now: Instant, d: Duration) -> Instant {
    const CENTURY: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
    now.checked_add(d)
        .or_else(|| now.checked_add(CENTURY))
        .unwrap_or(now)
}

// === impl Health ===

impl Health {
    pub(super) fn new(now: Instant) -> Self {
        Self {
            cooling_until: None,
            throttled_until: None,
            window: Window::new(now),
            consecutive_failures: 0,
            consecutive_unreachable: 0,
            ejections: 0,
            closed_at: None,
            open_until: None,
            probe_started: None,
            not_found: Vec::new(),
            remaining_tokens: None,
            headroom: Vec::new(),
            remaining_requests: None,
        }
    }

    /// Whether the circuit is open now (ejected), half-open not included.
    pub(super) fn is_ejected(&self, now: Instant) -> bool {
        self.open_until.is_some_and(|until| now < until)
    }

    pub(super) fn availability(
        &self,
        deployment: &str,
        now: Instant,
        settings: &PoolSettings,
    ) -> Availability {
        self.availability_with(deployment, now, settings, false)
    }

    /// In panic mode the circuit is ignored (open or half-open alike); cooldowns still apply.
    pub(super) fn availability_with(
        &self,
        deployment: &str,
        now: Instant,
        settings: &PoolSettings,
        panic: bool,
    ) -> Availability {
        if self.is_not_found(deployment, now) {
            return Availability::NotFound;
        }
        let half_open = match self.open_until {
            _ if panic => false,
            Some(until) if now < until => return Availability::CircuitOpen,
            Some(_) => true,
            None => false,
        };
        if let Some(remaining) = self.cooldown_remaining(now) {
            let throttled = self.throttled_until.is_some_and(|until| until > now);
            return Availability::CoolingDown(remaining, throttled);
        }
        if !half_open {
            return Availability::Ready;
        }
        match self.probe_started {
            Some(started) if now.saturating_duration_since(started) < settings.probe_timeout => {
                Availability::CircuitOpen
            }
            _ => Availability::Probe,
        }
    }

    /// How long until this backend can take a request for `deployment` again, when it cannot now for
    /// a reason that passes with time: an open circuit, a probe out, a cooldown.
    pub(super) fn recovers_in(
        &self,
        deployment: &str,
        now: Instant,
        settings: &PoolSettings,
    ) -> Option<Duration> {
        match self.availability(deployment, now, settings) {
            Availability::CoolingDown(left, _) => Some(left),
            Availability::CircuitOpen => match (self.open_until, self.probe_started) {
                (Some(until), _) if now < until => Some(until - now),
                // Half-open with a probe out: the slot frees when the probe times out at the latest.
                (_, Some(started)) => Some(settings.probe_timeout.saturating_sub(now - started))
                    .filter(|d| !d.is_zero()),
                _ => None,
            },
            Availability::Ready | Availability::Probe | Availability::NotFound => None,
        }
    }

    /// Re-checks availability under the same lock and, for a half-open backend, takes the probe slot.
    /// `false` when another thread changed the state since the scan. In panic mode an open circuit
    /// is no obstacle, and no probe slot is taken.
    pub(super) fn claim(
        &mut self,
        deployment: &str,
        now: Instant,
        settings: &PoolSettings,
        panic: bool,
    ) -> bool {
        match self.availability_with(deployment, now, settings, panic) {
            Availability::Ready => true,
            Availability::Probe => {
                self.probe_started = Some(now);
                true
            }
            _ => false,
        }
    }

    pub(super) fn record(
        &mut self,
        deployment: &str,
        outcome: Outcome,
        now: Instant,
        settings: &PoolSettings,
    ) -> Recorded {
        let mut recorded = Recorded::default();
        match outcome {
            Outcome::Success => {
                self.consecutive_failures = 0;
                self.consecutive_unreachable = 0;
                self.window.add(false, now, settings.circuit.interval);
                recorded.circuit = self.success(now);
            }
            // The rest is the deployment's, kept by the pool (`rests`): Azure throttles each
            // deployment of a resource on its own.
            Outcome::Throttled { .. } => {
                self.forget_headroom(deployment);
                self.release_probe(now);
            }
            Outcome::AuthFailure { hint } => {
                recorded.cooldown = Some(self.cool_down(hint, false, now, settings));
                self.release_probe(now);
            }
            Outcome::ServerError { hint } => {
                if hint.is_some() {
                    recorded.cooldown = Some(self.cool_down(hint, false, now, settings));
                }
                // It answered: reachable, whatever it said.
                self.consecutive_unreachable = 0;
                recorded.circuit = self.failure(now, settings);
            }
            Outcome::Timeout | Outcome::ConnectError => {
                self.consecutive_unreachable = self.consecutive_unreachable.saturating_add(1);
                recorded.circuit = self.failure(now, settings);
            }
            // Neither is the backend's fault as far as the breaker is concerned: a stream that broke
            // was already charged by its attempt's success, and the gateway's own exhaustion says
            // nothing about the backend. A probe that met either may go again.
            Outcome::StreamBroken | Outcome::LocalError => self.release_probe(now),
            Outcome::DeploymentNotFound => {
                self.mark_not_found(deployment, now, settings);
                self.release_probe(now);
            }
        }
        recorded
    }

    pub(super) fn observe_remaining(
        &mut self,
        deployment: &str,
        tokens: Option<u64>,
        requests: Option<u64>,
        now: Instant,
    ) {
        if let Some(tokens) = tokens {
            self.remaining_tokens = Some((tokens, now));
            match self
                .headroom
                .iter_mut()
                .find(|h| &*h.deployment == deployment)
            {
                Some(h) => {
                    h.remaining = tokens;
                    h.at = now;
                    h.sent_since = 0;
                }
                None => self.headroom.push(Headroom {
                    deployment: deployment.into(),
                    remaining: tokens,
                    at: now,
                    sent_since: 0,
                }),
            }
        }
        if let Some(requests) = requests {
            self.remaining_requests = Some((requests, now));
        }
    }

    /// Tokens `deployment` on this backend can still take, as far as its last
    /// `x-ratelimit-remaining-tokens` and what was sent since tell; `None` when never seen or older
    /// than `fresh_for`.
    pub(super) fn headroom(
        &self,
        deployment: &str,
        now: Instant,
        fresh_for: Duration,
    ) -> Option<u64> {
        let h = self
            .headroom
            .iter()
            .find(|h| &*h.deployment == deployment)?;
        (now.saturating_duration_since(h.at) <= fresh_for)
            .then(|| h.remaining.saturating_sub(h.sent_since))
    }

    /// Counts an estimate sent to `deployment` on this backend against its headroom.
    pub(super) fn note_sent(&mut self, deployment: &str, tokens: u64) {
        if let Some(h) = self
            .headroom
            .iter_mut()
            .find(|h| &*h.deployment == deployment)
        {
            h.sent_since = h.sent_since.saturating_add(tokens);
        }
    }

    /// A throttle's cooldown says when the backend takes traffic again: a remaining count seen with
    /// it must not keep the deployment skipped beyond that.
    fn forget_headroom(&mut self, deployment: &str) {
        self.headroom.retain(|h| &*h.deployment != deployment);
    }

    pub(super) fn view(&self, now: Instant, settings: &PoolSettings) -> HealthView {
        let cooldown_remaining = self.cooldown_remaining(now);
        let circuit_open_remaining = self
            .open_until
            .map(|until| until.saturating_duration_since(now))
            .filter(|d| !d.is_zero());
        let state = match (self.open_until, circuit_open_remaining, cooldown_remaining) {
            (_, Some(_), _) => BackendState::CircuitOpen,
            (_, None, Some(_)) => BackendState::CoolingDown,
            (Some(_), None, None) => BackendState::HalfOpen,
            (None, None, None) => BackendState::Available,
        };
        let quota = |seen: Option<(u64, Instant)>| {
            seen.map(|(value, at)| RemainingQuota {
                value,
                age: now.saturating_duration_since(at),
            })
        };
        HealthView {
            state,
            cooldown_remaining,
            circuit_open_remaining,
            consecutive_failures: self.consecutive_failures,
            window_failures: self.window.counts(now, settings.circuit.interval).1,
            not_found: self
                .not_found
                .iter()
                .filter(|(_, until)| now < *until)
                .map(|(deployment, _)| deployment.to_string())
                .collect(),
            remaining_tokens: quota(self.remaining_tokens),
            remaining_requests: quota(self.remaining_requests),
        }
    }

    fn is_not_found(&self, deployment: &str, now: Instant) -> bool {
        // Usually empty: no cost in the common path.
        self.not_found
            .iter()
            .any(|(name, until)| now < *until && &**name == deployment)
    }

    fn cooldown_remaining(&self, now: Instant) -> Option<Duration> {
        self.cooling_until
            .map(|until| until.saturating_duration_since(now))
            .filter(|d| !d.is_zero())
    }

    /// Cools down for `hint` (or the default), clamped to the maximum. A cooldown already in force that
    /// ends later is kept: a shorter hint never shortens it.
    pub(super) fn cool_down(
        &mut self,
        hint: Option<Duration>,
        throttle: bool,
        now: Instant,
        settings: &PoolSettings,
    ) -> Duration {
        let cooldown = hint
            .unwrap_or(settings.default_cooldown)
            .max(MIN_COOLDOWN)
            .min(settings.max_cooldown);
        let until = later(now, cooldown);
        if self.cooling_until.is_none_or(|current| current < until) {
            self.cooling_until = Some(until);
        }
        if throttle && self.throttled_until.is_none_or(|current| current < until) {
            self.throttled_until = Some(until);
        }
        cooldown
    }

    fn success(&mut self, now: Instant) -> Option<CircuitChange> {
        match self.open_until {
            // Still open: an answer to a request sent before the trip; it proves nothing new.
            Some(until) if now < until => None,
            Some(_) => {
                self.close(now);
                Some(CircuitChange::Closed)
            }
            None => None,
        }
    }

    fn failure(&mut self, now: Instant, settings: &PoolSettings) -> Option<CircuitChange> {
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        let circuit = &settings.circuit;
        self.window.add(true, now, circuit.interval);
        if circuit.is_disabled() {
            return None;
        }
        match self.open_until {
            // Already open: a straggler sent before the trip does not extend it.
            Some(until) if now < until => None,
            // The half-open probe failed: out again, for longer.
            Some(_) => {
                self.open(now, settings);
                Some(CircuitChange::Reopened)
            }
            None => {
                let (attempts, failures) = self.window.counts(now, circuit.interval);
                let unreachable = circuit.consecutive_failures > 0
                    && self.consecutive_unreachable >= circuit.consecutive_failures;
                (unreachable || circuit.ratio_trips(attempts, failures))
                    .then_some(CircuitChange::Tripped)
            }
        }
    }

    /// Opens a closed circuit, as the pool allowed after [`CircuitChange::Tripped`].
    pub(super) fn eject(&mut self, now: Instant, settings: &PoolSettings) -> Option<CircuitChange> {
        if self.open_until.is_some() {
            return None;
        }
        // Forget one past ejection per interval spent healthy since the circuit last closed.
        if let Some(closed) = self.closed_at {
            let interval = settings.circuit.interval.as_nanos().max(1);
            let healthy = now.saturating_duration_since(closed).as_nanos() / interval;
            let forget = u32::try_from(healthy).unwrap_or(u32::MAX);
            self.ejections = self.ejections.saturating_sub(forget);
        }
        self.open(now, settings);
        Some(CircuitChange::Opened)
    }

    fn open(&mut self, now: Instant, settings: &PoolSettings) {
        self.ejections = self.ejections.saturating_add(1);
        let time = settings.circuit.ejection_time(self.ejections);
        self.open_until = Some(later(now, time));
        self.probe_started = None;
        self.consecutive_unreachable = 0;
        self.window.clear();
    }

    fn close(&mut self, now: Instant) {
        self.open_until = None;
        self.probe_started = None;
        self.closed_at = Some(now);
        self.window.clear();
    }

    /// A half-open probe answered with something that is neither success nor failure (429, 401/403,
    /// 404): the circuit stays half-open and the next probe may go once the backend is selectable.
    fn release_probe(&mut self, now: Instant) {
        if self.open_until.is_some_and(|until| until <= now) {
            self.probe_started = None;
        }
    }

    fn mark_not_found(&mut self, deployment: &str, now: Instant, settings: &PoolSettings) {
        let until = later(now, settings.not_found_cooldown);
        self.not_found.retain(|(_, until)| now < *until);
        match self
            .not_found
            .iter_mut()
            .find(|(name, _)| &**name == deployment)
        {
            Some(entry) => entry.1 = entry.1.max(until),
            None => self.not_found.push((deployment.into(), until)),
        }
    }
}
