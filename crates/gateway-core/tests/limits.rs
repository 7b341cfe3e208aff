//! The limit stores through the public API: the same scenarios against `MemoryStore` (on a clock
//! moved by hand) and `RedisStore` (against real `redis-server` processes started here), then what
//! only Redis has: several instances, outages, and shared cooldowns.
//!
//! No assertion here depends on how fast the machine is: times the stores compute are checked
//! against the clock read before and after the call, timeouts are measured in paused Tokio time,
//! and what other tasks do is polled for, bounded.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::ops::RangeInclusive;
use std::panic::AssertUnwindSafe;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, UNIX_EPOCH};

use futures_util::FutureExt;

use gateway_core::limits::{
    Admission, LimitCheck, LimitKind, LimitStore, Limits, MemoryStore, Quota, QuotaPeriod,
    RedisStore, Remaining, Reservation, minute_bounds, period_bounds,
};
use gateway_core::pool::{RedisCooldowns, unix_ms};

// === harness ===

/// A `redis-server` on a free 127.0.0.1 port, killed on drop.
struct RedisServer {
    port: u16,
    child: Option<Child>,
}

impl RedisServer {
    fn start() -> Self {
        for _ in 0..5 {
            let mut server = Self {
                port: free_port(),
                child: None,
            };
            if server.spawn() {
                return server;
            }
        }
        panic!("redis-server did not start on any of 5 free ports");
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Starts the server on `self.port` and waits until it answers PING; false if it exited.
    fn spawn(&mut self) -> bool {
        let port = self.port.to_string();
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port,
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let child = match child {
            Ok(child) => child,
            Err(e) if e.kind() == ErrorKind::NotFound => panic!(
                "redis-server is not installed; run ./scripts/test, which installs it \
                 (or `apt-get install redis-server`)"
            ),
            Err(e) => panic!("cannot start redis-server: {e}"),
        };
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.pong() {
                return true;
            }
            if let Some(child) = self.child.as_mut() {
                if matches!(child.try_wait(), Ok(Some(_))) {
                    self.child = None;
                    return false;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "redis-server on port {} did not answer PING within 10 s",
            self.port
        );
    }

    fn pong(&self) -> bool {
        let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
        let mut reply = [0; 7];
        stream.write_all(b"PING\r\n").is_ok()
            && stream.read_exact(&mut reply).is_ok()
            && &reply == b"+PONG\r\n"
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn restart(&mut self) {
        self.kill();
        assert!(
            self.spawn(),
            "redis-server did not restart on port {}",
            self.port
        );
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local addr").port()
}

async fn redis_store(server: &RedisServer) -> RedisStore {
    connect(&server.url(), "test").await
}

async fn connect(url: &str, prefix: &str) -> RedisStore {
    RedisStore::connect(url, prefix)
        .await
        .expect("connect to redis")
}

/// Polls `probe` every 20 ms until it returns `Some`, for at most 15 s, failing with `what`
/// otherwise: the bounded wait for what a listener task or a restarted server does.
async fn eventually<T, Fut>(what: &str, mut probe: impl FnMut() -> Fut) -> T
where
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(Instant::now() < deadline, "{what}: not within 15 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs `call`, which must end within `limit` of Tokio time. Call it with the clock paused: then
/// only timers move time, each straight to its deadline, so the store's own timeout firing first
/// is exact, however slow the machine.
async fn within<T>(what: &str, limit: Duration, call: impl Future<Output = T>) -> T {
    tokio::select! {
        biased;
        out = call => out,
        () = tokio::time::sleep(limit) => panic!("{what}: still running after {limit:?} of Tokio time"),
    }
}

/// Redis counts minutes on its own clock (this machine's): waits until at least `secs` are left in
/// the current minute, and returns that minute.
async fn minute_room(secs: u64) -> u64 {
    let now = unix_ms();
    let left = minute_bounds(now / 1000).2 * 1000 - now;
    if left < secs * 1000 {
        tokio::time::sleep(Duration::from_millis(left + 100)).await;
    }
    unix_ms() / 60_000
}

/// Runs a Redis scenario, given a key prefix of its own, inside one minute. It starts with 10 s
/// left in the minute, far more than it takes; should a stalled machine carry it into the next
/// minute anyway, its per-minute counts started over and a failure says nothing, so it runs once
/// more, on a new prefix, from the start of a minute.
async fn in_one_minute<F, Fut>(mut scenario: F)
where
    F: FnMut(String) -> Fut,
    Fut: Future<Output = ()>,
{
    for (attempt, room) in [10, 59].into_iter().enumerate() {
        let minute = minute_room(room).await;
        let outcome = AssertUnwindSafe(scenario(format!("test{attempt}")))
            .catch_unwind()
            .await;
        match outcome {
            Ok(()) => return,
            Err(_) if attempt == 0 && unix_ms() / 60_000 != minute => {
                eprintln!(
                    "the scenario ran into the next minute: once more, from a minute's start"
                );
            }
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

/// 2024-02-29T12:34:10Z: 10 s into a minute, in a leap-year February.
const T: u64 = 1_709_210_050_000;

/// A hand-moved clock in Unix ms.
#[derive(Clone)]
struct Clock(Arc<AtomicU64>);

impl Clock {
    fn at(ms: u64) -> Self {
        Self(Arc::new(AtomicU64::new(ms)))
    }
    fn ms(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
    fn advance(&self, by: Duration) {
        self.0.fetch_add(by.as_millis() as u64, Ordering::SeqCst);
    }
    fn store(&self) -> MemoryStore {
        let clock = self.clone();
        MemoryStore::with_clock(move || UNIX_EPOCH + Duration::from_millis(clock.ms()))
    }
}

/// What a scenario needs besides the store: the store's notion of now.
struct Env {
    now_ms: Box<dyn Fn() -> u64 + Send + Sync>,
}

fn memory() -> (MemoryStore, Env) {
    let clock = Clock::at(T);
    let store = clock.store();
    (
        store,
        Env {
            now_ms: Box::new(move || clock.ms()),
        },
    )
}

fn redis_env() -> Env {
    Env {
        now_ms: Box::new(unix_ms),
    }
}

/// Runs `call` and returns its output with the store's clock read just before and just after it:
/// the instant the store counted at lies in between (Redis reads the same clock as this process).
async fn timed<T>(env: &Env, call: impl Future<Output = T>) -> (T, RangeInclusive<u64>) {
    let before = (env.now_ms)();
    let out = call.await;
    let after = (env.now_ms)();
    (out, before..=after)
}

fn check(
    key: &str,
    tpm: Option<u64>,
    rpm: Option<u64>,
    quota: Option<(u64, QuotaPeriod)>,
) -> LimitCheck {
    LimitCheck {
        key: key.into(),
        limits: Limits {
            tokens_per_minute: tpm,
            requests_per_minute: rpm,
            quota: quota.map(|(tokens, period)| Quota { tokens, period }),
        },
    }
}

async fn admit(
    store: &impl LimitStore,
    checks: &[LimitCheck],
    tokens: u64,
) -> (Reservation, Remaining) {
    match store.reserve(checks, tokens).await {
        Ok(Admission::Admitted {
            reservation,
            remaining,
        }) => (reservation, remaining),
        other => panic!("expected admission of {tokens} tokens, got {other:?}"),
    }
}

/// Asserts that `actual` is the time from a store instant in `at` to `end_ms`.
fn assert_until(what: &str, actual: Duration, end_ms: u64, at: &RangeInclusive<u64>) {
    let actual = actual.as_millis() as u64;
    let expected = end_ms - at.end()..=end_ms - at.start();
    assert!(
        expected.contains(&actual),
        "{what}: {actual} ms, expected {expected:?} ms"
    );
}

/// Runs a scenario against a `MemoryStore` and against a `RedisStore`.
macro_rules! both_stores {
    ($($name:ident),* $(,)?) => {
        mod memory_store {
            $(
                #[tokio::test]
                async fn $name() {
                    let (store, env) = super::memory();
                    super::$name(&store, &env).await;
                }
            )*
        }
        mod redis_store {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let server = super::RedisServer::start();
                    let url = server.url();
                    super::in_one_minute(|prefix| {
                        let url = url.clone();
                        async move {
                            let store = super::connect(&url, &prefix).await;
                            super::$name(&store, &super::redis_env()).await;
                        }
                    })
                    .await;
                }
            )*
        }
    };
}

both_stores!(
    tokens_per_minute,
    requests_per_minute,
    quotas_of_every_period,
    quota_refusal_wins_over_minute_refusal,
    all_or_nothing_across_keys,
    remaining_is_the_minimum_per_field,
    reconcile_both_directions,
    concurrent_reservations_never_exceed_the_limit,
);

// === scenarios for both stores ===

async fn tokens_per_minute(store: &impl LimitStore, env: &Env) {
    let c = [check("tpm", Some(1_000), None, None)];
    let (reservation, remaining) = admit(store, &c, 600).await;
    assert_eq!(
        remaining,
        Remaining {
            tokens: Some(400),
            requests: None,
            quota_tokens: None
        }
    );
    assert_eq!(reservation.keys, ["tpm"]);
    assert_eq!(reservation.tokens, 600);
    assert_eq!(reservation.quota_periods, [None]);
    assert_eq!(reservation.minute.abs_diff((env.now_ms)() / 60_000), 0);

    // 600 + 500 > 1,000: refused until the minute ends, with nothing counted.
    let (refused, at) = timed(env, store.reserve(&c, 500)).await;
    let minute_end = minute_bounds(at.start() / 1000).2 * 1000;
    match refused {
        Ok(Admission::Limited {
            key,
            kind,
            retry_after,
            remaining,
        }) => {
            assert_eq!((key.as_str(), kind), ("tpm", LimitKind::Tokens));
            assert!(retry_after > Duration::ZERO && retry_after <= Duration::from_secs(60));
            assert_until("retry_after", retry_after, minute_end, &at);
            assert_eq!(remaining.tokens, Some(400));
        }
        other => panic!("{other:?}"),
    }
    // Exactly up to the limit fits.
    let (_, remaining) = admit(store, &c, 400).await;
    assert_eq!(remaining.tokens, Some(0));
    assert!(matches!(
        store.reserve(&c, 1).await,
        Ok(Admission::Limited { .. })
    ));

    // A request larger than the whole limit never fits: it gets the minute's end too.
    let big = [check("tpm-big", Some(1_000), None, None)];
    match store.reserve(&big, 1_001).await {
        Ok(Admission::Limited {
            kind: LimitKind::Tokens,
            retry_after,
            remaining,
            ..
        }) => {
            assert!(retry_after <= Duration::from_secs(60));
            assert_eq!(remaining.tokens, Some(1_000));
        }
        other => panic!("{other:?}"),
    }
    let usage = store.usage(&big[0]).await.expect("usage");
    assert_eq!(
        (usage.tokens_this_minute, usage.requests_this_minute),
        (0, 0)
    );
    let usage = store.usage(&c[0]).await.expect("usage");
    assert_eq!(
        (usage.tokens_this_minute, usage.requests_this_minute),
        (1_000, 2)
    );
}

async fn requests_per_minute(store: &impl LimitStore, _env: &Env) {
    let c = [check("rpm", None, Some(3), None)];
    for left in [2, 1, 0] {
        let (_, remaining) = admit(store, &c, 10).await;
        assert_eq!(
            remaining,
            Remaining {
                tokens: None,
                requests: Some(left),
                quota_tokens: None
            }
        );
    }
    match store.reserve(&c, 0).await {
        Ok(Admission::Limited {
            key,
            kind: LimitKind::Requests,
            retry_after,
            remaining,
        }) => {
            assert_eq!(key, "rpm");
            assert!(retry_after > Duration::ZERO && retry_after <= Duration::from_secs(60));
            assert_eq!(remaining.requests, Some(0));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        store
            .usage(&c[0])
            .await
            .expect("usage")
            .requests_this_minute,
        3
    );
}

async fn quotas_of_every_period(store: &impl LimitStore, env: &Env) {
    for (i, period) in [
        QuotaPeriod::Hourly,
        QuotaPeriod::Daily,
        QuotaPeriod::Weekly,
        QuotaPeriod::Monthly,
    ]
    .into_iter()
    .enumerate()
    {
        let c = [check(
            &format!("quota-{i}"),
            None,
            None,
            Some((1_000, period)),
        )];
        let (reservation, remaining) = admit(store, &c, 700).await;
        let now = (env.now_ms)();
        let (index, _, end) = period_bounds(period, now / 1000);
        assert_eq!(reservation.quota_periods, [Some(index)], "{period:?}");
        assert_eq!(
            remaining,
            Remaining {
                tokens: None,
                requests: None,
                quota_tokens: Some(300)
            }
        );

        let (refused, at) = timed(env, store.reserve(&c, 301)).await;
        match refused {
            Ok(Admission::QuotaExceeded {
                key,
                resets_in,
                remaining,
            }) => {
                assert_eq!(key, c[0].key);
                assert_until(&format!("{period:?} resets_in"), resets_in, end * 1000, &at);
                assert_eq!(remaining.quota_tokens, Some(300));
            }
            other => panic!("{period:?}: {other:?}"),
        }
        let (_, remaining) = admit(store, &c, 300).await;
        assert_eq!(remaining.quota_tokens, Some(0));
        assert_eq!(
            store.usage(&c[0]).await.expect("usage").quota_tokens_used,
            1_000
        );
    }
}

async fn quota_refusal_wins_over_minute_refusal(store: &impl LimitStore, _env: &Env) {
    let c = [
        check("minute", Some(100), None, None),
        check("quota", None, None, Some((100, QuotaPeriod::Daily))),
    ];
    // Over both: the quota answers, because waiting a minute would not help.
    match store.reserve(&c, 150).await {
        Ok(Admission::QuotaExceeded { key, remaining, .. }) => {
            assert_eq!(key, "quota");
            assert_eq!(remaining.tokens, Some(100));
            assert_eq!(remaining.quota_tokens, Some(100));
        }
        other => panic!("{other:?}"),
    }
}

async fn all_or_nothing_across_keys(store: &impl LimitStore, _env: &Env) {
    let a = check(
        "consumer:a",
        Some(1_000),
        None,
        Some((10_000, QuotaPeriod::Monthly)),
    );
    let b = check("consumer:a:gpt-4o", Some(500), Some(2), None);
    let both = [a.clone(), b.clone()];
    let (_, remaining) = admit(store, &both, 400).await;
    assert_eq!(remaining.tokens, Some(100)); // min(1,000 - 400, 500 - 400)

    // Fits `a` (800 <= 1,000) but not `b` (800 > 500): nothing is counted anywhere.
    match store.reserve(&both, 400).await {
        Ok(Admission::Limited {
            key,
            kind: LimitKind::Tokens,
            ..
        }) => assert_eq!(key, b.key),
        other => panic!("{other:?}"),
    }
    let usage_a = store.usage(&a).await.expect("usage");
    assert_eq!(
        (
            usage_a.tokens_this_minute,
            usage_a.requests_this_minute,
            usage_a.quota_tokens_used
        ),
        (400, 1, 400)
    );
    let usage_b = store.usage(&b).await.expect("usage");
    assert_eq!(
        (usage_b.tokens_this_minute, usage_b.requests_this_minute),
        (400, 1)
    );

    // `b` alone still has room for exactly one more request of 100.
    admit(store, &both, 100).await;
    match store.reserve(&both, 0).await {
        Ok(Admission::Limited {
            key,
            kind: LimitKind::Requests,
            ..
        }) => assert_eq!(key, b.key),
        other => panic!("{other:?}"),
    }
    // `a` alone is not limited by `b`.
    admit(store, std::slice::from_ref(&a), 500).await;
    assert_eq!(
        store.usage(&a).await.expect("usage").tokens_this_minute,
        1_000
    );
}

async fn remaining_is_the_minimum_per_field(store: &impl LimitStore, _env: &Env) {
    let c = [
        check("min:a", Some(1_000), Some(10), None),
        check(
            "min:b",
            Some(5_000),
            Some(2),
            Some((800, QuotaPeriod::Weekly)),
        ),
        check("min:c", None, None, Some((5_000, QuotaPeriod::Hourly))),
    ];
    let (reservation, remaining) = admit(store, &c, 100).await;
    assert_eq!(
        remaining,
        Remaining {
            tokens: Some(900),
            requests: Some(1),
            quota_tokens: Some(700)
        }
    );
    assert_eq!(reservation.quota_periods.len(), 3);
    assert!(reservation.quota_periods[0].is_none());
    assert!(reservation.quota_periods[1].is_some() && reservation.quota_periods[2].is_some());

    // Over `a`'s TPM and `b`'s quota: the quota answers, and remaining (nothing reserved) is still
    // the minimum of each field.
    match store.reserve(&c, 901).await {
        Ok(Admission::QuotaExceeded { key, remaining, .. }) => {
            assert_eq!(key, "min:b");
            assert_eq!(
                remaining,
                Remaining {
                    tokens: Some(900),
                    requests: Some(1),
                    quota_tokens: Some(700)
                }
            );
        }
        other => panic!("{other:?}"),
    }
    match store.reserve(&c, 701).await {
        Ok(Admission::QuotaExceeded { key, .. }) => assert_eq!(key, "min:b"),
        other => panic!("{other:?}"),
    }
    let (_, remaining) = admit(store, &c, 700).await;
    assert_eq!(
        remaining,
        Remaining {
            tokens: Some(200),
            requests: Some(0),
            quota_tokens: Some(0)
        }
    );
}

async fn reconcile_both_directions(store: &impl LimitStore, _env: &Env) {
    let c = [check(
        "rec",
        Some(1_000),
        None,
        Some((2_000, QuotaPeriod::Daily)),
    )];
    let usage = || async { store.usage(&c[0]).await.expect("usage") };

    // Reserved 500, used 200: 300 come back to the minute and the quota.
    let (reservation, _) = admit(store, &c, 500).await;
    store.reconcile(&reservation, 200).await.expect("reconcile");
    let u = usage().await;
    assert_eq!(
        (
            u.tokens_this_minute,
            u.requests_this_minute,
            u.quota_tokens_used
        ),
        (200, 1, 200)
    );

    // Reserved 100, used 900: the counters grow past the estimate, up to the limit.
    let (reservation, _) = admit(store, &c, 100).await;
    store.reconcile(&reservation, 900).await.expect("reconcile");
    let u = usage().await;
    assert_eq!((u.tokens_this_minute, u.quota_tokens_used), (1_100, 1_100));
    match store.reserve(&c, 0).await {
        Ok(Admission::Limited { remaining, .. }) => assert_eq!(remaining.tokens, Some(0)),
        other => panic!("over the limit after reconciling: {other:?}"),
    }

    // Equal: nothing changes.
    store.reconcile(&reservation, 100).await.expect("reconcile");
    assert_eq!(usage().await.tokens_this_minute, 1_100);

    // Giving back more than is counted saturates at 0.
    let d = [check(
        "rec-zero",
        Some(1_000),
        None,
        Some((2_000, QuotaPeriod::Daily)),
    )];
    let (reservation, _) = admit(store, &d, 300).await;
    store.reconcile(&reservation, 0).await.expect("reconcile");
    store.reconcile(&reservation, 0).await.expect("reconcile");
    let u = store.usage(&d[0]).await.expect("usage");
    assert_eq!(
        (
            u.tokens_this_minute,
            u.requests_this_minute,
            u.quota_tokens_used
        ),
        (0, 1, 0)
    );

    // Reconciling keys that were never counted does nothing (and creates nothing).
    let ghost = Reservation {
        keys: vec!["never".into()],
        minute: reservation.minute,
        quota_periods: vec![Some(1)],
        tokens: 0,
    };
    store.reconcile(&ghost, 50).await.expect("reconcile");
    let never = check("never", Some(10), None, None);
    assert_eq!(
        store.usage(&never).await.expect("usage").tokens_this_minute,
        0
    );
}

/// Reserves `tokens` under `checks` 200 times at once, through `stores` in turn, and returns how
/// many were admitted; every other answer must be a minute limit's refusal.
async fn race(stores: &[impl LimitStore + Clone], checks: &[LimitCheck], tokens: u64) -> usize {
    let checks: Arc<[LimitCheck]> = checks.into();
    let admitted = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let store = stores[i % stores.len()].clone();
            let (checks, admitted) = (checks.clone(), admitted.clone());
            tokio::spawn(async move {
                match store.reserve(&checks, tokens).await {
                    Ok(Admission::Admitted { .. }) => {
                        admitted.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(Admission::Limited { .. }) => {}
                    other => panic!("{other:?}"),
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("task");
    }
    admitted.load(Ordering::SeqCst)
}

async fn concurrent_reservations_never_exceed_the_limit(
    store: &(impl LimitStore + Clone),
    _env: &Env,
) {
    let c = [
        check("race", Some(1_000), Some(150), None),
        check("race:q", None, None, Some((2_000, QuotaPeriod::Monthly))),
    ];
    assert_eq!(
        race(std::slice::from_ref(store), &c, 10).await,
        100,
        "1,000 TPM / 10 tokens"
    );
    let u = store.usage(&c[0]).await.expect("usage");
    assert_eq!((u.tokens_this_minute, u.requests_this_minute), (1_000, 100));
    assert_eq!(
        store.usage(&c[1]).await.expect("usage").quota_tokens_used,
        1_000
    );
}

// === MemoryStore only ===

#[tokio::test]
async fn memory_reconcile_after_the_minute_rolled() {
    let clock = Clock::at(T);
    let store = clock.store();
    let c = [check(
        "roll",
        Some(1_000),
        None,
        Some((10_000, QuotaPeriod::Daily)),
    )];
    let (old, _) = admit(&store, &c, 800).await;

    clock.advance(Duration::from_secs(60));
    let (new, remaining) = admit(&store, &c, 900).await;
    assert_eq!(remaining.tokens, Some(100), "a new minute starts empty");
    assert_eq!(new.minute, old.minute + 1);

    // The old call used 100: the old minute and the quota shrink; the new minute does not.
    store.reconcile(&old, 100).await.expect("reconcile");
    let u = store.usage(&c[0]).await.expect("usage");
    assert_eq!((u.tokens_this_minute, u.quota_tokens_used), (900, 1_000));

    // Long after: the minute counter is gone, the reconciliation still corrects the quota.
    clock.advance(Duration::from_secs(60));
    let (late, _) = admit(&store, &c, 1_000).await;
    clock.advance(Duration::from_secs(10 * 60));
    store.reconcile(&late, 0).await.expect("reconcile");
    let u = store.usage(&c[0]).await.expect("usage");
    assert_eq!(
        (
            u.tokens_this_minute,
            u.requests_this_minute,
            u.quota_tokens_used
        ),
        (0, 0, 1_000)
    );
    admit(&store, &c, 1_000).await;

    // The next day the quota starts over.
    clock.advance(Duration::from_secs(24 * 3600));
    let (_, remaining) = admit(&store, &c, 1).await;
    assert_eq!(remaining.quota_tokens, Some(9_999));
}

#[tokio::test]
async fn memory_windows_follow_the_clock() {
    let clock = Clock::at(T);
    let store = clock.store();
    let c = [check(
        "w",
        Some(100),
        Some(1),
        Some((150, QuotaPeriod::Hourly)),
    )];
    admit(&store, &c, 100).await;
    match store.reserve(&c, 1).await {
        Ok(Admission::Limited { retry_after, .. }) => {
            assert_eq!(retry_after, Duration::from_secs(50))
        }
        other => panic!("{other:?}"),
    }
    clock.advance(Duration::from_secs(50)); // 12:35:00, a new minute
    match store.reserve(&c, 51).await {
        // 12:35 -> the hour ends at 13:00.
        Ok(Admission::QuotaExceeded { resets_in, .. }) => {
            assert_eq!(resets_in, Duration::from_secs(25 * 60));
        }
        other => panic!("{other:?}"),
    }
    admit(&store, &c, 50).await;
}

// === RedisStore only ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_two_instances_share_one_limit() {
    let server = RedisServer::start();
    let url = server.url();
    in_one_minute(|prefix| {
        let url = url.clone();
        async move {
            // Two gateways: separate stores, separate connections, one Redis.
            let a = connect(&url, &prefix).await;
            let b = connect(&url, &prefix).await;
            let c = [check("shared", Some(2_000), None, None)];
            assert_eq!(
                race(&[a.clone(), b.clone()], &c, 15).await,
                133,
                "2,000 TPM / 15 tokens"
            );
            assert_eq!(
                a.usage(&c[0]).await.expect("usage").tokens_this_minute,
                1_995
            );
            assert_eq!(
                b.usage(&c[0]).await.expect("usage").tokens_this_minute,
                1_995
            );

            // A different prefix is a different set of counters.
            let other = connect(&url, &format!("{prefix}-other")).await;
            assert_eq!(
                other.usage(&c[0]).await.expect("usage").tokens_this_minute,
                0
            );
        }
    })
    .await;
}

// Paused time needs the current-thread runtime.
#[tokio::test]
async fn redis_outage_fails_fast_and_recovers() {
    let mut server = RedisServer::start();
    let store = redis_store(&server).await;
    let c = [check(
        "outage",
        Some(1_000_000),
        None,
        Some((1_000_000, QuotaPeriod::Daily)),
    )];
    let (reservation, _) = admit(&store, &c, 10).await;

    // Every call fails within the store's timeout (an error as soon as the connection is refused,
    // or the timeout itself), never after reconnect attempts. In paused time: exact.
    server.kill();
    tokio::time::pause();
    let bound = RedisStore::DEFAULT_TIMEOUT + Duration::from_millis(1);
    for _ in 0..3 {
        let error = within("reserve", bound, store.reserve(&c, 10))
            .await
            .expect_err("reserve with redis down");
        assert!(
            error.to_string().starts_with("limit store: redis reserve"),
            "{error}"
        );
        within("reconcile", bound, store.reconcile(&reservation, 5))
            .await
            .expect_err("reconcile with redis down");
        within("usage", bound, store.usage(&c[0]))
            .await
            .expect_err("usage with redis down");
        within("ping", bound, store.ping())
            .await
            .expect_err("ping with redis down");
    }
    tokio::time::resume();

    // Same port, empty Redis (no persistence): the same store reconnects by itself.
    server.restart();
    eventually(
        "the store admitting again after Redis came back",
        || async {
            matches!(store.reserve(&c, 10).await, Ok(Admission::Admitted { .. })).then_some(())
        },
    )
    .await;
    // The scripts were loaded again (EVALSHA falls back to loading them).
    assert_eq!(
        store.usage(&c[0]).await.expect("usage").quota_tokens_used,
        10
    );
}

// Paused time (for the timeouts) needs the current-thread runtime.
#[tokio::test(start_paused = true)]
async fn redis_start_up_with_redis_down() {
    let port = free_port();
    let url = format!("redis://127.0.0.1:{port}/");
    // Nothing listens: connecting fails within the store's timeout (in paused time: exact).
    let bound = RedisStore::DEFAULT_TIMEOUT + Duration::from_millis(1);
    let error = within("connect", bound, RedisStore::connect(&url, "test"))
        .await
        .expect_err("nothing listens");
    assert!(error.to_string().contains("redis"), "{error}");
    assert!(RedisStore::connect("not a url", "test").await.is_err());

    // Lazy: starts without Redis, fails within its own timeout while it is down, works once it is up.
    let timeout = Duration::from_millis(300);
    let store = RedisStore::connect_lazy(&url, "test")
        .expect("lazy")
        .with_timeout(timeout);
    let c = [check("lazy", Some(100), None, None)];
    within(
        "reserve",
        timeout + Duration::from_millis(1),
        store.reserve(&c, 1),
    )
    .await
    .expect_err("redis down");

    tokio::time::resume();
    let mut server = RedisServer { port, child: None };
    assert!(server.spawn(), "redis-server on port {port}");
    eventually("the lazy store connecting", || async {
        matches!(store.reserve(&c, 1).await, Ok(Admission::Admitted { .. })).then_some(())
    })
    .await;
}

#[test]
fn redis_store_outside_a_runtime_is_an_error() {
    let error = RedisStore::connect_lazy("redis://127.0.0.1:1/", "x").expect_err("no runtime");
    assert!(error.to_string().contains("Tokio runtime"), "{error}");
    assert!(RedisCooldowns::connect_lazy("redis://127.0.0.1:1/", "x").is_err());
}

// === RedisCooldowns ===

type Seen = Arc<Mutex<Vec<(String, u64)>>>;

async fn cooldowns(server: &RedisServer, prefix: &str) -> RedisCooldowns {
    RedisCooldowns::connect(&server.url(), prefix)
        .await
        .expect("connect to redis")
}

fn recorder() -> (Seen, impl Fn(String, String, u64) + Send + Sync + 'static) {
    let seen: Seen = Arc::default();
    let sink = seen.clone();
    // Backend and deployment as `backend/deployment`, to compare in one string.
    (seen, move |backend, deployment, until| {
        sink.lock()
            .expect("lock")
            .push((format!("{backend}/{deployment}"), until))
    })
}

async fn wait_for(seen: &Seen, entry: (&str, u64)) {
    let what = format!("the listener reporting {entry:?}");
    eventually(&what, || async {
        let seen = seen.lock().expect("lock");
        seen.iter()
            .any(|(b, u)| (b.as_str(), *u) == entry)
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cooldowns_are_shared_between_instances() {
    let mut server = RedisServer::start();
    let one = cooldowns(&server, "gw").await;
    let two = cooldowns(&server, "gw").await;

    // Published before a listener starts: the listener's catch-up reports it.
    let early = unix_ms() + 60_000;
    one.publish("ptu-sweden", "gpt-4o", early)
        .await
        .expect("publish");
    let (seen_one, on_one) = recorder();
    let (seen_two, on_two) = recorder();
    let listener_one = one.spawn_listener(on_one);
    let listener_two = two.spawn_listener(on_two);
    wait_for(&seen_one, ("ptu-sweden/gpt-4o", early)).await;
    wait_for(&seen_two, ("ptu-sweden/gpt-4o", early)).await;

    // Published by one instance: both listeners hear it (names may contain spaces).
    let until = unix_ms() + 30_000;
    two.publish("pool france", "gpt-4o: mini", until)
        .await
        .expect("publish");
    wait_for(&seen_one, ("pool france/gpt-4o: mini", until)).await;
    wait_for(&seen_two, ("pool france/gpt-4o: mini", until)).await;

    let mut live = one.current().await.expect("current");
    live.sort();
    let own = |b: &str, d: &str, until| (b.to_owned(), d.to_owned(), until);
    assert_eq!(
        live,
        [
            own("pool france", "gpt-4o: mini", until),
            own("ptu-sweden", "gpt-4o", early)
        ]
    );

    // A time already past is not published: announcements arrive in order, so had "past" been
    // announced, the listener would have heard it before "brief".
    one.publish("past", "gpt-4o", unix_ms() - 1_000)
        .await
        .expect("publish");
    let short = unix_ms() + 300;
    one.publish("brief", "gpt-4o", short)
        .await
        .expect("publish");
    wait_for(&seen_two, ("brief/gpt-4o", short)).await;
    assert!(
        seen_two
            .lock()
            .expect("lock")
            .iter()
            .all(|(b, _)| b != "past/gpt-4o"),
        "{:?}",
        seen_two.lock().expect("lock")
    );
    let live = two.current().await.expect("current");
    assert!(live.iter().all(|(b, _, _)| b != "past"), "{live:?}");
    // Cooldowns expire with their time, not before.
    eventually("the brief cooldown expiring", || async {
        let live = two.current().await.expect("current");
        live.iter().all(|(b, _, _)| b != "brief").then_some(())
    })
    .await;
    assert!(unix_ms() >= short, "expired before its time");

    // Redis restarts empty: publishing and listening resume on the same objects.
    server.kill();
    assert!(
        one.publish("down", "gpt-4o", unix_ms() + 60_000)
            .await
            .is_err()
    );
    assert!(two.current().await.is_err());
    server.restart();
    let after = unix_ms() + 60_000;
    eventually("publishing again after Redis came back", || async {
        one.publish("standard-eastus2", "gpt-4o", after).await.ok()
    })
    .await;
    // Heard live or through the catch-up after the listener reconnected.
    wait_for(&seen_one, ("standard-eastus2/gpt-4o", after)).await;
    wait_for(&seen_two, ("standard-eastus2/gpt-4o", after)).await;
    assert_eq!(
        two.current().await.expect("current"),
        [own("standard-eastus2", "gpt-4o", after)]
    );

    // And later announcements reach the reconnected listeners live.
    let later = unix_ms() + 90_000;
    two.publish("ptu-sweden", "gpt-4o", later)
        .await
        .expect("publish");
    wait_for(&seen_one, ("ptu-sweden/gpt-4o", later)).await;
    wait_for(&seen_two, ("ptu-sweden/gpt-4o", later)).await;

    listener_one.abort();
    listener_two.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cooldowns_keep_prefixes_apart() {
    let server = RedisServer::start();
    let a = cooldowns(&server, "a*").await;
    let b = cooldowns(&server, "ab").await;
    let until = unix_ms() + 60_000;
    a.publish("x", "gpt-4o", until).await.expect("publish");
    b.publish("y", "gpt-4o", until).await.expect("publish");
    assert_eq!(
        a.current().await.expect("current"),
        [("x".to_owned(), "gpt-4o".to_owned(), until)]
    );
    assert_eq!(
        b.current().await.expect("current"),
        [("y".to_owned(), "gpt-4o".to_owned(), until)]
    );
}
