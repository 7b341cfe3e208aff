//! Rests kept per (backend, deployment): Azure counts quota and throttles each deployment of a
//! resource on its own, so a 429 on Sweden's `gpt-4o` says nothing about Sweden's embeddings.
//!
//! Keyed by the backend's own deployment name, the thing Azure throttles: two logical deployments the
//! policy maps to one backend deployment rest together. The backend as a whole (its circuit) stays
//! in `health`, except the long rest of a backend that refused the gateway's credential
//! (misconfigured), which is kept here beside them so a selection locks one more mutex, not two.

use std::time::{Duration, Instant};

use super::health::{MIN_COOLDOWN, later};

/// Why a deployment on a backend takes no traffic for a while.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RestReason {
    /// It answered 429 (or another instance saw it do so).
    Throttled,
    /// It said `x-ratelimit-remaining-requests: 0`: the next request would be a 429.
    RequestsSpent,
}

/// One deployment resting on a backend, as shown on a status page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeploymentRest {
    /// The backend's own deployment name.
    pub deployment: String,
    /// Time left.
    pub remaining: Duration,
    /// Why.
    pub reason: RestReason,
}

/// The rests of one backend's deployments. Usually empty or a handful of entries: a scan is cheaper
/// than a map.
#[derive(Debug, Default)]
pub(super) struct Rests {
    entries: Vec<Rest>,
    /// Set by a 401/403, cleared by the next success: the backend refuses the gateway's credential.
    misconfigured: bool,
    /// Not selectable before this instant while misconfigured.
    misconfigured_until: Option<Instant>,
}

#[derive(Debug)]
struct Rest {
    deployment: Box<str>,
    until: Instant,
    reason: RestReason,
}

// === impl RestReason ===

impl RestReason {
    /// The name used on the status page and in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Throttled => "throttled",
            Self::RequestsSpent => "requests_spent",
        }
    }
}

// === impl Rests ===

impl Rests {
    /// Time left resting for `deployment`, if it rests.
    pub(super) fn remaining(&self, deployment: &str, now: Instant) -> Option<Duration> {
        self.entries
            .iter()
            .find(|r| &*r.deployment == deployment)
            .map(|r| r.until.saturating_duration_since(now))
            .filter(|d| !d.is_zero())
    }

    /// Rests `deployment` for `duration` (at least [`MIN_COOLDOWN`], at most `max`), returns the rest
    /// applied. A rest in force that ends later is kept: a shorter hint never shortens it.
    pub(super) fn rest(
        &mut self,
        deployment: &str,
        duration: Duration,
        max: Duration,
        reason: RestReason,
        now: Instant,
    ) -> Duration {
        let duration = duration.max(MIN_COOLDOWN).min(max);
        let until = later(now, duration);
        self.entries.retain(|r| r.until > now);
        match self
            .entries
            .iter_mut()
            .find(|r| &*r.deployment == deployment)
        {
            Some(r) if r.until >= until => {}
            Some(r) => {
                r.until = until;
                r.reason = reason;
            }
            None => self.entries.push(Rest {
                deployment: deployment.into(),
                until,
                reason,
            }),
        }
        duration
    }

    /// Marks the backend misconfigured (it refused the gateway's credential) and rests it for
    /// `rest`. `true` when it was not misconfigured before: the transition to report, once.
    pub(super) fn misconfigure(&mut self, rest: Duration, now: Instant) -> bool {
        self.misconfigured_until = Some(later(now, rest));
        !std::mem::replace(&mut self.misconfigured, true)
    }

    /// A success: the credential works (again). `true` when it was misconfigured.
    pub(super) fn configured(&mut self) -> bool {
        self.misconfigured_until = None;
        std::mem::replace(&mut self.misconfigured, false)
    }

    /// Ends a misconfigured backend's rest now (a reloaded policy may carry a fixed credential):
    /// it is tried on the next selection, and stays marked until it serves.
    pub(super) fn end_misconfigured_rest(&mut self) {
        self.misconfigured_until = None;
    }

    /// Whether the backend refused the gateway's credential and has not served since.
    pub(super) fn is_misconfigured(&self) -> bool {
        self.misconfigured
    }

    /// Time left in a misconfigured backend's rest.
    pub(super) fn misconfigured_remaining(&self, now: Instant) -> Option<Duration> {
        self.misconfigured_until
            .map(|until| until.saturating_duration_since(now))
            .filter(|d| !d.is_zero())
    }

    /// Every live rest, for a status page.
    pub(super) fn view(&self, now: Instant) -> Vec<DeploymentRest> {
        self.entries
            .iter()
            .filter(|r| r.until > now)
            .map(|r| DeploymentRest {
                deployment: r.deployment.to_string(),
                remaining: r.until - now,
                reason: r.reason,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rests_are_per_deployment_and_the_longest_wins() {
        let now = Instant::now();
        let max = Duration::from_secs(60);
        let mut rests = Rests::default();
        let s = Duration::from_secs;
        rests.rest("gpt-4o", s(5), max, RestReason::Throttled, now);
        assert_eq!(rests.remaining("gpt-4o", now), Some(s(5)));
        assert_eq!(rests.remaining("embeddings", now), None);
        // Shorter hint: kept at 5 s. Longer: extended, with its reason.
        rests.rest("gpt-4o", s(1), max, RestReason::Throttled, now);
        assert_eq!(rests.remaining("gpt-4o", now), Some(s(5)));
        rests.rest("gpt-4o", s(600), max, RestReason::RequestsSpent, now);
        assert_eq!(rests.remaining("gpt-4o", now), Some(max));
        assert_eq!(rests.view(now)[0].reason, RestReason::RequestsSpent);
        // Ends on its own.
        assert_eq!(rests.remaining("gpt-4o", now + max), None);
        assert!(rests.view(now + max).is_empty());
        // A zero hint still rests a little.
        rests.rest(
            "embeddings",
            Duration::ZERO,
            max,
            RestReason::Throttled,
            now,
        );
        assert_eq!(rests.remaining("embeddings", now), Some(MIN_COOLDOWN));
    }

    #[test]
    fn misconfiguration_is_one_transition_until_a_success() {
        let now = Instant::now();
        let rest = Duration::from_secs(300);
        let mut rests = Rests::default();
        assert!(
            rests.misconfigure(rest, now),
            "the first 401 is the transition"
        );
        assert!(
            !rests.misconfigure(rest, now + rest),
            "a 401 after the rest is not another"
        );
        assert!(rests.is_misconfigured());
        assert_eq!(rests.misconfigured_remaining(now + rest), Some(rest));
        assert_eq!(rests.misconfigured_remaining(now + rest * 2), None);
        assert!(rests.configured());
        assert!(!rests.configured());
        assert!(!rests.is_misconfigured());
    }

    /// Through the pool: a 401 takes the whole backend out for the long rest, then it is tried.
    #[test]
    fn a_refused_credential_rests_the_backend_long() {
        use crate::pool::{Backend, BackendPool, BackendState, Outcome, PoolSettings, Selection};
        use std::collections::BTreeMap;

        let backend = |name: &str, priority| Backend {
            name: name.to_owned(),
            region: "r".to_owned(),
            endpoint: format!("https://{name}.openai.azure.com"),
            priority,
            weight: 1,
            deployments: BTreeMap::from([("gpt-4o".to_owned(), "gpt-4o".to_owned())]),
            credential: None,
        };
        let rest = Duration::from_secs(120);
        let pool = BackendPool::new(
            vec![backend("a", 1), backend("b", 2)],
            PoolSettings::default(),
        )
        .with_misconfigured_rest(rest);
        let (a, b) = (pool.id_of("a").unwrap(), pool.id_of("b").unwrap());
        let now = Instant::now();
        pool.record(a, "gpt-4o", Outcome::AuthFailure { hint: None }, now);
        // Well past the 10 s default cooldown, still out.
        let later = now + Duration::from_secs(60);
        assert_eq!(pool.select("gpt-4o", &[], later), Selection::Backend(b));
        assert_eq!(pool.snapshot(later)[0].state, BackendState::Misconfigured);
        let Selection::Exhausted(e) = pool.select("gpt-4o", &[b], later) else {
            panic!()
        };
        assert_eq!((e.misconfigured, e.shortest_cooldown), (1, None));
        // After the rest it is tried; still misconfigured until it serves.
        assert_eq!(
            pool.select("gpt-4o", &[], now + rest),
            Selection::Backend(a)
        );
        assert_eq!(
            pool.snapshot(now + rest)[0].state,
            BackendState::Misconfigured
        );
        pool.record(a, "gpt-4o", Outcome::Success, now + rest);
        assert_eq!(pool.snapshot(now + rest)[0].state, BackendState::Available);
    }

    /// Through the pool: a throttle rests one deployment of a backend, never its others.
    #[test]
    fn a_throttle_rests_one_deployment_of_a_backend() {
        use crate::pool::{Backend, BackendPool, BackendState, Outcome, PoolSettings, Selection};
        use std::collections::BTreeMap;

        let backend = |name: &str, priority| Backend {
            name: name.to_owned(),
            region: "r".to_owned(),
            endpoint: format!("https://{name}.openai.azure.com"),
            priority,
            weight: 1,
            deployments: BTreeMap::from([
                ("gpt-4o".to_owned(), format!("gpt-4o-{name}")),
                ("embed".to_owned(), format!("embed-{name}")),
                // An alias on the same Azure deployment rests with it.
                ("gpt-4o-alias".to_owned(), format!("gpt-4o-{name}")),
            ]),
            credential: None,
        };
        let pool = BackendPool::new(
            vec![backend("swc", 1), backend("eus", 2)],
            PoolSettings::default(),
        );
        let (swc, eus) = (pool.id_of("swc").unwrap(), pool.id_of("eus").unwrap());
        let now = Instant::now();
        let s = Duration::from_secs;
        let hint = Some(s(5));
        assert_eq!(
            pool.record(swc, "gpt-4o", Outcome::Throttled { hint }, now),
            Some(s(5))
        );
        assert_eq!(pool.select("gpt-4o", &[], now), Selection::Backend(eus));
        assert_eq!(
            pool.select("gpt-4o-alias", &[], now),
            Selection::Backend(eus)
        );
        assert_eq!(pool.select("embed", &[], now), Selection::Backend(swc));
        assert_eq!(pool.shortest_throttle("gpt-4o", now), Some(s(5)));
        assert_eq!(pool.shortest_throttle("embed", now), None);
        let status = &pool.snapshot(now)[0];
        assert_eq!(status.state, BackendState::CoolingDown);
        assert_eq!(
            status.resting,
            [DeploymentRest {
                deployment: "gpt-4o-swc".to_owned(),
                remaining: s(5),
                reason: RestReason::Throttled,
            }]
        );
        assert_eq!(
            pool.select("gpt-4o", &[], now + s(5)),
            Selection::Backend(swc)
        );

        // A spent request window rests the deployment until its reset, without a 429.
        let later = now + s(10);
        assert_eq!(pool.requests_spent(eus, "embed", None, later), Some(s(10)));
        assert_eq!(
            pool.requests_spent(swc, "embed", Some(s(2)), later),
            Some(s(2))
        );
        assert!(
            matches!(pool.select("embed", &[], later), Selection::Exhausted(e) if e.throttled == 2)
        );
        assert_eq!(pool.shortest_throttle("embed", later), Some(s(2)));
        assert_eq!(pool.select("gpt-4o", &[], later), Selection::Backend(swc));

        // Learned from another instance, by the backend's own deployment name.
        pool.cool_down(swc, "gpt-4o-swc", s(3), later);
        assert_eq!(pool.select("gpt-4o", &[], later), Selection::Backend(eus));
    }
}
