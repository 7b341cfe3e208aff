//! Per-deployment rate limits, counted on arrival like Azure.
//!
//! Tokens are counted in a fixed 60 s window and requests in a fixed 10 s window allowing `rpm / 6`
//! requests (at least 1). A window starts with the first request admitted into it and resets when its
//! length has passed. A rejected request consumes nothing.

use std::time::{Duration, Instant};

/// Length of the token window.
pub(crate) const TOKEN_WINDOW: Duration = Duration::from_secs(60);
/// Length of the request window.
pub(crate) const REQUEST_WINDOW: Duration = Duration::from_secs(10);

/// A counter that resets a fixed time after the first use that started it.
#[derive(Debug, Clone)]
pub(crate) struct FixedWindow {
    length: Duration,
    limit: u64,
    used: u64,
    started: Option<Instant>,
}

/// The two windows of one deployment.
#[derive(Debug, Clone)]
pub(crate) struct DeploymentLimits {
    tokens: FixedWindow,
    requests: FixedWindow,
}

/// Which limit a request breached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Breach {
    /// The token estimate did not fit the minute window.
    Tokens,
    /// The 10-second request window was full.
    Requests,
}

/// The outcome of [`DeploymentLimits::admit`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Admission {
    /// Admitted; the windows now include the request.
    Admitted(Snapshot),
    /// Rejected; nothing was consumed.
    Rejected(Rejection),
}

/// Remaining capacity, as reported in `x-ratelimit-remaining-*`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Snapshot {
    pub(crate) remaining_tokens: u64,
    pub(crate) remaining_requests: u64,
    /// Share of the capacity in use, in percent (the fuller of the two windows), as a PTU
    /// deployment reports it in `azure-openai-deployment-utilization`.
    pub(crate) utilization_percent: u64,
}

/// Why and for how long a request was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Rejection {
    pub(crate) breach: Breach,
    /// Until the breached window resets.
    pub(crate) retry_after: Duration,
    /// Until the token window resets.
    pub(crate) reset_tokens: Duration,
    /// Until the request window resets.
    pub(crate) reset_requests: Duration,
    pub(crate) snapshot: Snapshot,
}

/// Usage of one deployment's windows, for `/sim/stats`.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct Usage {
    pub(crate) tokens_used: u64,
    pub(crate) tokens_limit: u64,
    pub(crate) tokens_reset_ms: u64,
    pub(crate) requests_used: u64,
    pub(crate) requests_limit: u64,
    pub(crate) requests_reset_ms: u64,
}

// === impl FixedWindow ===

impl FixedWindow {
    pub(crate) fn new(length: Duration, limit: u64) -> Self {
        Self {
            length,
            limit,
            used: 0,
            started: None,
        }
    }

    /// Resets the window if its time has passed.
    pub(crate) fn roll(&mut self, now: Instant) {
        let expired = self
            .started
            .is_some_and(|started| now.saturating_duration_since(started) >= self.length);
        if expired {
            self.started = None;
            self.used = 0;
        }
    }

    pub(crate) fn remaining(&self) -> u64 {
        self.limit.saturating_sub(self.used)
    }

    /// Percent of the limit used, rounded up (a deployment in use never shows 0%), at most 100.
    pub(crate) fn percent_used(&self) -> u64 {
        if self.limit == 0 {
            return 100;
        }
        let percent = u128::from(self.used) * 100;
        let percent = percent.div_ceil(u128::from(self.limit)).min(100);
        u64::try_from(percent).unwrap_or(100)
    }

    pub(crate) fn fits(&self, amount: u64) -> bool {
        amount <= self.remaining()
    }

    pub(crate) fn consume(&mut self, now: Instant, amount: u64) {
        self.started.get_or_insert(now);
        self.used = self.used.saturating_add(amount);
    }

    /// Time until the window resets; a window not yet started would last its full length.
    pub(crate) fn reset_in(&self, now: Instant) -> Duration {
        match self.started {
            Some(started) => (started + self.length).saturating_duration_since(now),
            None => self.length,
        }
    }

    pub(crate) fn clear(&mut self) {
        self.started = None;
        self.used = 0;
    }
}

// === impl DeploymentLimits ===

impl DeploymentLimits {
    /// Limits for `tpm` tokens and `rpm` requests a minute.
    pub(crate) fn new(tpm: u64, rpm: u64) -> Self {
        Self {
            tokens: FixedWindow::new(TOKEN_WINDOW, tpm),
            requests: FixedWindow::new(REQUEST_WINDOW, (rpm / 6).max(1)),
        }
    }

    /// Admits a request estimated at `tokens`, or says why not.
    pub(crate) fn admit(&mut self, now: Instant, tokens: u64) -> Admission {
        self.tokens.roll(now);
        self.requests.roll(now);
        let breach = if !self.requests.fits(1) {
            Some(Breach::Requests)
        } else if !self.tokens.fits(tokens) {
            Some(Breach::Tokens)
        } else {
            None
        };
        match breach {
            None => {
                self.tokens.consume(now, tokens);
                self.requests.consume(now, 1);
                Admission::Admitted(self.current())
            }
            Some(breach) => {
                let reset_tokens = self.tokens.reset_in(now);
                let reset_requests = self.requests.reset_in(now);
                Admission::Rejected(Rejection {
                    breach,
                    retry_after: match breach {
                        Breach::Tokens => reset_tokens,
                        Breach::Requests => reset_requests,
                    },
                    reset_tokens,
                    reset_requests,
                    snapshot: self.current(),
                })
            }
        }
    }

    /// Remaining capacity now, without consuming anything.
    pub(crate) fn snapshot(&mut self, now: Instant) -> Snapshot {
        self.tokens.roll(now);
        self.requests.roll(now);
        self.current()
    }

    /// Window usage now, for statistics.
    pub(crate) fn usage(&mut self, now: Instant) -> Usage {
        self.tokens.roll(now);
        self.requests.roll(now);
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        Usage {
            tokens_used: self.tokens.used,
            tokens_limit: self.tokens.limit,
            tokens_reset_ms: ms(self.tokens.reset_in(now)),
            requests_used: self.requests.used,
            requests_limit: self.requests.limit,
            requests_reset_ms: ms(self.requests.reset_in(now)),
        }
    }

    /// Empties both windows.
    pub(crate) fn reset(&mut self) {
        self.tokens.clear();
        self.requests.clear();
    }

    fn current(&self) -> Snapshot {
        Snapshot {
            remaining_tokens: self.tokens.remaining(),
            remaining_requests: self.requests.remaining(),
            utilization_percent: self.tokens.percent_used().max(self.requests.percent_used()),
        }
    }
}

/// Whole seconds for `retry-after` and `x-ratelimit-reset-*`: rounded up, at least 1.
pub(crate) fn ceil_secs(d: Duration) -> u64 {
    let ms = ceil_millis(d);
    ms.div_ceil(1000).max(1)
}

/// Milliseconds for `retry-after-ms`: rounded up, at least 1.
pub(crate) fn ceil_millis(d: Duration) -> u64 {
    let nanos = d.as_nanos().div_ceil(1_000_000);
    u64::try_from(nanos).unwrap_or(u64::MAX).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn tokens_fill_and_reset_after_a_minute_from_first_use() {
        let t0 = Instant::now();
        let mut limits = DeploymentLimits::new(1000, 600); // 100 requests per 10 s
        let Admission::Admitted(s) = limits.admit(t0, 600) else {
            panic!("first request rejected")
        };
        assert_eq!(s.remaining_tokens, 400);
        assert_eq!(s.remaining_requests, 99);

        // 30 s later the same window is still running: 600 does not fit in 400.
        let Admission::Rejected(r) = limits.admit(t0 + secs(30), 600) else {
            panic!("should be rejected")
        };
        assert_eq!(r.breach, Breach::Tokens);
        assert_eq!(r.retry_after, secs(30));
        assert_eq!(r.reset_tokens, secs(30));
        // The request window started at t0 and has already reset at t0 + 30 s.
        assert_eq!(r.reset_requests, secs(10));
        assert_eq!(r.snapshot.remaining_tokens, 400);

        // Exactly fitting is allowed.
        assert!(
            matches!(limits.admit(t0 + secs(31), 400), Admission::Admitted(s) if s.remaining_tokens == 0)
        );

        // At t0 + 60 s the window resets.
        let Admission::Admitted(s) = limits.admit(t0 + secs(60), 600) else {
            panic!("window did not reset")
        };
        assert_eq!(s.remaining_tokens, 400);
    }

    #[test]
    fn rejected_requests_consume_nothing() {
        let t0 = Instant::now();
        let mut limits = DeploymentLimits::new(100, 60);
        assert!(matches!(limits.admit(t0, 90), Admission::Admitted(_)));
        for i in 0..5 {
            assert!(matches!(
                limits.admit(t0 + secs(i), 20),
                Admission::Rejected(_)
            ));
        }
        assert_eq!(limits.snapshot(t0 + secs(5)).remaining_tokens, 10);
        assert!(matches!(
            limits.admit(t0 + secs(5), 10),
            Admission::Admitted(_)
        ));
    }

    #[test]
    fn requests_use_ten_second_windows_of_rpm_over_six() {
        let t0 = Instant::now();
        let mut limits = DeploymentLimits::new(1_000_000, 30); // 5 per 10 s
        for i in 0..5 {
            assert!(matches!(
                limits.admit(t0 + Duration::from_millis(i), 1),
                Admission::Admitted(_)
            ));
        }
        let Admission::Rejected(r) = limits.admit(t0 + secs(4), 1) else {
            panic!("sixth request admitted")
        };
        assert_eq!(r.breach, Breach::Requests);
        assert_eq!(r.retry_after, secs(6));
        assert_eq!(r.snapshot.remaining_requests, 0);
        assert!(
            matches!(limits.admit(t0 + secs(10), 1), Admission::Admitted(s) if s.remaining_requests == 4)
        );
    }

    #[test]
    fn utilization_is_the_fuller_window_rounded_up() {
        let t0 = Instant::now();
        let mut limits = DeploymentLimits::new(1000, 60); // 10 requests per 10 s
        assert_eq!(limits.snapshot(t0).utilization_percent, 0);
        let Admission::Admitted(s) = limits.admit(t0, 1) else {
            panic!("rejected")
        };
        // 1 token in 1,000 rounds up to 1%; 1 request in 10 is 10%.
        assert_eq!(s.utilization_percent, 10);
        let Admission::Admitted(s) = limits.admit(t0, 994) else {
            panic!("rejected")
        };
        assert_eq!(s.utilization_percent, 100, "995 of 1,000 tokens");
        let Admission::Rejected(r) = limits.admit(t0, 10) else {
            panic!("admitted")
        };
        assert_eq!(r.snapshot.utilization_percent, 100);
    }

    #[test]
    fn tiny_rpm_still_allows_one_request_per_window() {
        let t0 = Instant::now();
        let mut limits = DeploymentLimits::new(1000, 1);
        assert!(matches!(limits.admit(t0, 1), Admission::Admitted(s) if s.remaining_requests == 0));
        assert!(matches!(limits.admit(t0, 1), Admission::Rejected(_)));
    }

    #[test]
    fn oversized_request_on_an_empty_window_waits_a_full_window() {
        let t0 = Instant::now();
        let mut limits = DeploymentLimits::new(100, 60);
        let Admission::Rejected(r) = limits.admit(t0, 101) else {
            panic!("oversized request admitted")
        };
        assert_eq!(r.retry_after, TOKEN_WINDOW);
        assert_eq!(limits.snapshot(t0).remaining_tokens, 100);
    }

    #[test]
    fn reset_empties_windows() {
        let t0 = Instant::now();
        let mut limits = DeploymentLimits::new(100, 6);
        assert!(matches!(limits.admit(t0, 100), Admission::Admitted(_)));
        limits.reset();
        assert!(matches!(limits.admit(t0, 100), Admission::Admitted(_)));
    }

    #[test]
    fn rounding() {
        assert_eq!(ceil_secs(Duration::from_millis(1)), 1);
        assert_eq!(ceil_secs(Duration::ZERO), 1);
        assert_eq!(ceil_secs(Duration::from_millis(1000)), 1);
        assert_eq!(ceil_secs(Duration::from_millis(1001)), 2);
        assert_eq!(ceil_millis(Duration::from_micros(1500)), 2);
        assert_eq!(ceil_millis(Duration::from_millis(59_000)), 59_000);
    }

    #[test]
    fn property_remaining_never_exceeds_limit_and_used_never_exceeds_limit() {
        let mut rng = fastrand::Rng::with_seed(11);
        let t0 = Instant::now();
        let mut limits = DeploymentLimits::new(5000, 120);
        let mut now = t0;
        let mut admitted_in_window = 0u64;
        let mut window_start: Option<Instant> = None;
        for _ in 0..10_000 {
            now += Duration::from_millis(rng.u64(0..200));
            if window_start.is_some_and(|start| now.duration_since(start) >= TOKEN_WINDOW) {
                window_start = None;
                admitted_in_window = 0;
            }
            let cost = rng.u64(0..800);
            match limits.admit(now, cost) {
                Admission::Admitted(s) => {
                    window_start.get_or_insert(now);
                    admitted_in_window += cost;
                    assert!(admitted_in_window <= 5000);
                    assert_eq!(s.remaining_tokens, 5000 - admitted_in_window);
                    assert!(s.remaining_requests < 20);
                }
                Admission::Rejected(r) => {
                    assert!(r.retry_after > Duration::ZERO);
                    assert!(r.retry_after <= TOKEN_WINDOW);
                    if r.breach == Breach::Tokens {
                        assert!(cost > 5000 - admitted_in_window);
                    }
                }
            }
        }
    }
}
