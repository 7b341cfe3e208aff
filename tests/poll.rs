//! Bounded waits for what another task or process does. A test never sleeps "long enough": it
//! looks at the observable condition every [`POLL_EVERY`], up to a generous limit, and fails with a
//! message naming what never happened. On a fast machine the wait is one look; on a loaded one it
//! is as long as it takes, up to the limit.

use std::future::Future;
use std::time::{Duration, Instant};

/// How often a bounded poll looks again.
pub const POLL_EVERY: Duration = Duration::from_millis(20);

/// How long a bounded poll waits by default: far longer than anything it waits for takes, so
/// reaching it means the awaited thing is not going to happen.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// Polls `probe` until it returns `Some`, every [`POLL_EVERY`] for at most [`PATIENCE`], and returns
/// that value; fails the test naming `what` otherwise.
pub async fn eventually<T, F, Fut>(what: &str, probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    eventually_within(what, PATIENCE, probe).await
}

/// [`eventually`] with another limit, for conditions that include a known wait of their own (a
/// cooldown in another process, say).
pub async fn eventually_within<T, F, Fut>(what: &str, limit: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let mut poll = Poller::within(what, limit);
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        poll.wait().await;
    }
}

/// [`eventually_within`] for synchronous tests and helper threads: blocks between looks.
pub fn eventually_blocking<T>(
    what: &str,
    limit: Duration,
    mut probe: impl FnMut() -> Option<T>,
) -> T {
    let poll = Poller::within(what, limit);
    loop {
        if let Some(value) = probe() {
            return value;
        }
        poll.check();
        std::thread::sleep(POLL_EVERY);
    }
}

/// A bounded poll written as a loop, for probes that keep state from one look to the next (count
/// what they saw, assert on every answer):
///
/// ```ignore
/// let mut poll = Poller::new("region A serving again");
/// loop {
///     let res = gw.chat("gpt-4o", &chat("hi")).await;
///     if served_by(&res) == "a (Region A)" {
///         break;
///     }
///     poll.wait().await;
/// }
/// ```
#[derive(Debug)]
pub struct Poller {
    what: String,
    limit: Duration,
    deadline: Instant,
}

impl Poller {
    /// A poll for `what`, failing after [`PATIENCE`].
    pub fn new(what: impl Into<String>) -> Self {
        Self::within(what, PATIENCE)
    }

    /// A poll for `what`, failing after `limit`.
    pub fn within(what: impl Into<String>, limit: Duration) -> Self {
        Self {
            what: what.into(),
            limit,
            deadline: Instant::now() + limit,
        }
    }

    /// Waits until the next look, or fails the test once the limit has passed.
    pub async fn wait(&mut self) {
        self.check();
        tokio::time::sleep(POLL_EVERY).await;
    }

    fn check(&self) {
        assert!(
            Instant::now() < self.deadline,
            "{}: still not the case after {:?}",
            self.what,
            self.limit
        );
    }
}
