//! Rests kept per (backend, deployment): Azure counts quota and throttles each deployment of a
//! resource on its own, so a 429 on Sweden's `gpt-4o` says nothing about Sweden's embeddings.
//!
//! Keyed by the backend's own deployment name, the thing Azure throttles: two logical deployments the
//! policy maps to one backend deployment rest together. The backend as a whole (its circuit, a
//! credential it refuses) stays in `health`.

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
