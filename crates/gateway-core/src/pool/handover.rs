//! Handing a pool's state over to the pool that replaces it when the policy is reloaded.
//!
//! A backend keeps what the gateway learnt about it (circuit and ejections, the rests of its
//! deployments after 429s and `DeploymentNotFound`, a refused credential, the quota headroom its
//! headers reported, attempts in flight) across a reload, as long as it is still the same backend:
//! same name and same endpoint. Its entry is *shared*, not copied: an attempt that started on the
//! old pool and ends after the swap (a long stream) still reports to the entry the new pool reads.
//! Whatever state a backend gains later rides along without a change here, since the whole entry is
//! taken over.
//!
//! ```
//! use std::collections::BTreeMap;
//! use std::time::{Duration, Instant};
//! use gateway_core::pool::{Backend, BackendPool, BackendState, Outcome, PoolSettings};
//!
//! let backend = |name: &str| Backend {
//!     name: name.to_owned(),
//!     region: "Sweden Central".to_owned(),
//!     endpoint: format!("https://{name}.openai.azure.com"),
//!     priority: 1,
//!     weight: 1,
//!     deployments: BTreeMap::from([("gpt-4o".to_owned(), "gpt-4o".to_owned())]),
//!     credential: None,
//! };
//! let now = Instant::now();
//! let old = BackendPool::new(vec![backend("swc")], PoolSettings::default());
//! let hint = Some(Duration::from_secs(20));
//! old.record(old.id_of("swc").unwrap(), "gpt-4o", Outcome::Throttled { hint }, now);
//!
//! // Reloaded with one more backend: `swc` is still cooling down, `frc` starts fresh.
//! let new = BackendPool::new(vec![backend("frc"), backend("swc")], PoolSettings::default())
//!     .take_over(&old);
//! let states: Vec<_> = new.snapshot(now).into_iter().map(|b| (b.name, b.state)).collect();
//! assert_eq!(
//!     states,
//!     [("frc".to_owned(), BackendState::Available), ("swc".to_owned(), BackendState::CoolingDown)]
//! );
//! ```

use super::BackendPool;

// === impl BackendPool ===

impl BackendPool {
    /// Takes over `previous`'s state for every backend that has the same name and endpoint in both
    /// pools; the others keep their fresh state. The two pools then share those entries, so
    /// outcomes recorded on `previous` by requests still in flight are seen here too.
    pub fn take_over(mut self, previous: &BackendPool) -> Self {
        for (i, backend) in self.backends.iter().enumerate() {
            let same = previous
                .backends
                .iter()
                .position(|b| b.name == backend.name && b.endpoint == backend.endpoint);
            if let Some(j) = same {
                self.health[i] = previous.health[j].clone();
                self.rests[i] = previous.rests[j].clone();
                // A refused credential is retried at once: the reload may be what fixed it.
                super::lock(&self.rests[i]).end_misconfigured_rest();
                self.in_flight[i] = previous.in_flight[j].clone();
            }
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::{Duration, Instant};

    use crate::pool::{Backend, BackendPool, BackendState, Outcome, PoolSettings};

    fn backend(name: &str, endpoint: &str) -> Backend {
        Backend {
            name: name.to_owned(),
            region: "r".to_owned(),
            endpoint: endpoint.to_owned(),
            priority: 1,
            weight: 1,
            deployments: BTreeMap::from([("gpt-4o".to_owned(), "g".to_owned())]),
            credential: None,
        }
    }

    fn state(pool: &BackendPool, name: &str, now: Instant) -> BackendState {
        pool.snapshot(now)
            .into_iter()
            .find(|b| b.name == name)
            .map(|b| b.state)
            .unwrap()
    }

    #[test]
    fn open_circuits_in_flight_counts_and_later_outcomes_carry_over() {
        let now = Instant::now();
        let old = BackendPool::new(
            vec![backend("a", "https://a"), backend("b", "https://b")],
            PoolSettings::default(),
        );
        let a = old.id_of("a").unwrap();
        // Five connections refused in a row eject it (five 5xx alone no longer do).
        for _ in 0..5 {
            old.record(a, "gpt-4o", Outcome::ConnectError, now);
        }
        let streaming = old.begin(old.id_of("b").unwrap());
        let new = BackendPool::new(
            vec![backend("b", "https://b"), backend("a", "https://a")],
            PoolSettings::default(),
        )
        .take_over(&old);
        assert_eq!(state(&new, "a", now), BackendState::CircuitOpen);
        let in_flight = |pool: &BackendPool| {
            pool.snapshot(now)
                .into_iter()
                .find(|b| b.name == "b")
                .map(|b| b.in_flight)
                .unwrap()
        };
        assert_eq!(in_flight(&new), 1);
        // The stream that began on the old pool ends after the swap: the new pool sees it end.
        drop(streaming);
        assert_eq!(in_flight(&new), 0);
        // An attempt sent before the swap that is throttled afterwards cools the new pool's entry.
        old.record(
            old.id_of("b").unwrap(),
            "gpt-4o",
            Outcome::Throttled {
                hint: Some(Duration::from_secs(5)),
            },
            now,
        );
        assert_eq!(state(&new, "b", now), BackendState::CoolingDown);
    }

    #[test]
    fn a_backend_moved_to_another_endpoint_starts_fresh() {
        let now = Instant::now();
        let old = BackendPool::new(vec![backend("a", "https://a")], PoolSettings::default());
        let hint = Some(Duration::from_secs(5));
        old.record(
            old.id_of("a").unwrap(),
            "gpt-4o",
            Outcome::Throttled { hint },
            now,
        );
        let moved = BackendPool::new(vec![backend("a", "https://a2")], PoolSettings::default())
            .take_over(&old);
        assert_eq!(state(&moved, "a", now), BackendState::Available);
    }
}
