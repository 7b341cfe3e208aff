//! Fault injection: answers, hangs and broken connections on demand.
//!
//! A [`Fault`] is a [`FaultKind`] plus optional filters. Faults are checked in order for every request
//! on `/openai/*`, before authentication and rate limits (they simulate the infrastructure in front of
//! the model); the first one whose filters match applies. JSON shape (tagged by `kind`):
//!
//! ```json
//! {"kind":"status","status":503,"percent":100,"retry_after_ms":2000,"count":null}
//! {"kind":"drop"}
//! {"kind":"hang"}
//! {"kind":"delay_first_byte","delay_ms":500}
//! {"kind":"abort_stream","after_chunks":3}
//! ```
//!
//! Every fault also takes `percent` (default 100, rolled with the region's seeded RNG), `count` (apply
//! to the next N matching requests only, then expire) and `deployment` (match only that deployment).
//!
//! ```
//! use simulator::{Fault, FaultKind};
//!
//! let fault: Fault = serde_json::from_str(r#"{"kind":"status","status":503,"count":2}"#).unwrap();
//! assert_eq!(fault, Fault::status(503).count(2));
//! assert!(matches!(fault.kind, FaultKind::Status { status: 503, retry_after_ms: None }));
//! ```

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::{Deserialize, Serialize};

use crate::state::lock;

/// One injected fault: what happens, and to which requests.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fault {
    /// What happens to a matching request.
    #[serde(flatten)]
    pub kind: FaultKind,
    /// Chance (0 to 100) that a request otherwise matching is affected; `None` means 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<f64>,
    /// Affect only the next N matching requests, then expire; `None` means no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    /// Affect only requests for this deployment; `None` means all requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployment: Option<String>,
}

/// What a fault does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum FaultKind {
    /// Answer with this status and an Azure-shaped error body. A 429 says "call rate limit" and
    /// carries `retry-after`/`retry-after-ms` from `retry_after_ms` (default 1000); other statuses carry
    /// them only when `retry_after_ms` is given.
    Status {
        /// HTTP status to answer, 100 to 599.
        status: u16,
        /// Milliseconds for `retry-after-ms` (and `retry-after`, rounded up to seconds).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_after_ms: Option<u64>,
    },
    /// Close the TCP connection without answering.
    Drop,
    /// Never answer; the client has to time out.
    Hang,
    /// Wait this long, then handle the request normally (limits included).
    DelayFirstByte {
        /// Delay before handling, in milliseconds.
        delay_ms: u64,
    },
    /// Send this many SSE data frames, then abort the connection mid-body (no `[DONE]`). A
    /// non-streaming request gets a truncated body instead.
    AbortStream {
        /// Number of data frames sent before the abort.
        after_chunks: usize,
    },
}

/// The active faults of one region and the seeded RNG that rolls their percentages.
#[derive(Debug)]
pub(crate) struct FaultState {
    seed: u64,
    /// Fast path: no lock at all while no fault is active.
    any: AtomicBool,
    inner: Mutex<Active>,
}

#[derive(Debug)]
struct Active {
    rng: fastrand::Rng,
    faults: Vec<Fault>,
}

// === impl Fault ===

impl Fault {
    /// A fault of this kind affecting every request.
    pub fn new(kind: FaultKind) -> Self {
        Self {
            kind,
            percent: None,
            count: None,
            deployment: None,
        }
    }

    /// Answer `status` with an Azure-shaped body.
    pub fn status(status: u16) -> Self {
        Self::new(FaultKind::Status {
            status,
            retry_after_ms: None,
        })
    }

    /// Answer `status` with `retry-after-ms: retry_after_ms` (and `retry-after` in seconds).
    pub fn status_with_retry_after(status: u16, retry_after_ms: u64) -> Self {
        Self::new(FaultKind::Status {
            status,
            retry_after_ms: Some(retry_after_ms),
        })
    }

    /// Close the connection without answering.
    pub fn drop_connection() -> Self {
        Self::new(FaultKind::Drop)
    }

    /// Never answer.
    pub fn hang() -> Self {
        Self::new(FaultKind::Hang)
    }

    /// Delay the whole answer by `delay_ms`.
    pub fn delay_first_byte(delay_ms: u64) -> Self {
        Self::new(FaultKind::DelayFirstByte { delay_ms })
    }

    /// Abort the body after `after_chunks` SSE data frames.
    pub fn abort_stream(after_chunks: usize) -> Self {
        Self::new(FaultKind::AbortStream { after_chunks })
    }

    /// Affect only `percent` (0 to 100) of matching requests.
    pub fn percent(mut self, percent: f64) -> Self {
        self.percent = Some(percent);
        self
    }

    /// Affect only the next `count` matching requests.
    pub fn count(mut self, count: u64) -> Self {
        self.count = Some(count);
        self
    }

    /// Affect only requests for `deployment`.
    pub fn deployment(mut self, deployment: impl Into<String>) -> Self {
        self.deployment = Some(deployment.into());
        self
    }

    /// Checks the values a fault cannot work with: a status outside 100..=599, a percent outside 0..=100.
    pub fn validate(&self) -> Result<(), String> {
        if let FaultKind::Status { status, .. } = self.kind {
            if !(100..=599).contains(&status) {
                return Err(format!("status {status} is not an HTTP status"));
            }
        }
        if let Some(p) = self.percent {
            if !(0.0..=100.0).contains(&p) {
                return Err(format!("percent {p} is not between 0 and 100"));
            }
        }
        Ok(())
    }

    fn matches_deployment(&self, deployment: Option<&str>) -> bool {
        match &self.deployment {
            None => true,
            Some(wanted) => deployment == Some(wanted.as_str()),
        }
    }
}

// === impl FaultState ===

impl FaultState {
    pub(crate) fn new(seed: u64, faults: Vec<Fault>) -> Self {
        let state = Self {
            seed,
            any: AtomicBool::new(false),
            inner: Mutex::new(Active {
                rng: fastrand::Rng::with_seed(seed),
                faults: Vec::new(),
            }),
        };
        state.set(faults);
        state
    }

    /// Replaces the active faults and restarts the percentage RNG from the seed.
    pub(crate) fn set(&self, faults: Vec<Fault>) {
        let mut active = lock(&self.inner);
        active.rng = fastrand::Rng::with_seed(self.seed);
        active.faults = faults.into_iter().filter(|f| f.count != Some(0)).collect();
        self.any.store(!active.faults.is_empty(), Ordering::Release);
    }

    /// The active faults, with their remaining counts.
    pub(crate) fn list(&self) -> Vec<Fault> {
        lock(&self.inner).faults.clone()
    }

    /// The fault that applies to a request for `deployment`, if any, consuming one of its `count`.
    pub(crate) fn pick(&self, deployment: Option<&str>) -> Option<FaultKind> {
        if !self.any.load(Ordering::Acquire) {
            return None;
        }
        let mut guard = lock(&self.inner);
        let Active { rng, faults } = &mut *guard;
        let index = faults.iter().position(|fault| {
            fault.matches_deployment(deployment)
                && match fault.percent {
                    None => true,
                    Some(p) if p >= 100.0 => true,
                    Some(p) => rng.f64() * 100.0 < p,
                }
        })?;
        let fault = &mut faults[index];
        let kind = fault.kind.clone();
        if let Some(count) = &mut fault.count {
            *count = count.saturating_sub(1);
            if *count == 0 {
                faults.remove(index);
                self.any.store(!faults.is_empty(), Ordering::Release);
            }
        }
        Some(kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_shapes() {
        let all = r#"[
            {"kind":"status","status":503,"percent":100,"retry_after_ms":2000,"count":null},
            {"kind":"drop"},
            {"kind":"hang","deployment":"gpt-4o"},
            {"kind":"delay_first_byte","delay_ms":500},
            {"kind":"abort_stream","after_chunks":3,"count":1}
        ]"#;
        let faults: Vec<Fault> = serde_json::from_str(all).unwrap();
        assert_eq!(
            faults,
            vec![
                Fault::status_with_retry_after(503, 2000).percent(100.0),
                Fault::drop_connection(),
                Fault::hang().deployment("gpt-4o"),
                Fault::delay_first_byte(500),
                Fault::abort_stream(3).count(1),
            ]
        );
        let round: Vec<Fault> =
            serde_json::from_value(serde_json::to_value(&faults).unwrap()).unwrap();
        assert_eq!(round, faults);
        assert!(serde_json::from_str::<Fault>(r#"{"kind":"explode"}"#).is_err());
        assert!(Fault::status(1000).validate().is_err());
        assert!(Fault::status(503).percent(101.0).validate().is_err());
    }

    #[test]
    fn count_expires_and_first_match_wins() {
        let state = FaultState::new(1, vec![Fault::status(500).count(2), Fault::status(503)]);
        let status = |k: Option<FaultKind>| match k {
            Some(FaultKind::Status { status, .. }) => status,
            other => panic!("{other:?}"),
        };
        assert_eq!(status(state.pick(None)), 500);
        assert_eq!(status(state.pick(None)), 500);
        assert_eq!(status(state.pick(None)), 503);
        assert_eq!(state.list().len(), 1);
    }

    #[test]
    fn deployment_filter() {
        let state = FaultState::new(1, vec![Fault::hang().deployment("a")]);
        assert_eq!(state.pick(Some("b")), None);
        assert_eq!(state.pick(None), None);
        assert_eq!(state.pick(Some("a")), Some(FaultKind::Hang));
    }

    #[test]
    fn percent_is_deterministic_per_seed() {
        let run = |seed| {
            let state = FaultState::new(seed, vec![Fault::drop_connection().percent(30.0)]);
            (0..1000)
                .map(|_| state.pick(None).is_some())
                .collect::<Vec<_>>()
        };
        let a = run(42);
        assert_eq!(a, run(42));
        let hits = a.iter().filter(|h| **h).count();
        assert!((200..400).contains(&hits), "{hits}");
        let none = FaultState::new(1, vec![Fault::drop_connection().percent(0.0)]);
        assert!((0..100).all(|_| none.pick(None).is_none()));
    }
}
