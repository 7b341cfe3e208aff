use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use super::*;

const DEP: &str = "gpt-4o";

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn backend(name: &str, priority: u32, weight: u32) -> Backend {
    backend_for(name, priority, weight, &[DEP])
}

fn backend_for(name: &str, priority: u32, weight: u32, deployments: &[&str]) -> Backend {
    Backend {
        name: name.to_owned(),
        region: format!("{name}-region"),
        endpoint: format!("https://{name}.openai.azure.com"),
        priority,
        weight,
        deployments: deployments
            .iter()
            .map(|d| ((*d).to_owned(), format!("{d}-{name}")))
            .collect(),
        credential: None,
    }
}

fn settings() -> PoolSettings {
    PoolSettings {
        default_cooldown: secs(10),
        max_cooldown: secs(60),
        circuit: CircuitSettings {
            failure_percentage: 50,
            request_volume: 10,
            consecutive_failures: 3,
            interval: secs(10),
            base_ejection: secs(30),
            max_ejection: secs(300),
            max_ejection_percent: 50,
        },
        probe_timeout: secs(5),
        not_found_cooldown: secs(60),
    }
}

/// One backend, `a`, with these settings.
fn pool_with(settings: PoolSettings) -> BackendPool {
    BackendPool::new(vec![backend("a", 1, 1)], settings)
}

fn pool(backends: Vec<Backend>) -> BackendPool {
    BackendPool::new(backends, settings()).with_rng_seed(42)
}

#[track_caller]
fn pick(pool: &BackendPool, tried: &[BackendId], now: Instant) -> BackendId {
    match pool.select(DEP, tried, now) {
        Selection::Backend(id) => id,
        Selection::Exhausted(e) => panic!("expected a backend, got {e:?}"),
    }
}

#[track_caller]
fn exhausted(pool: &BackendPool, tried: &[BackendId], now: Instant) -> Exhausted {
    match pool.select(DEP, tried, now) {
        Selection::Exhausted(e) => e,
        Selection::Backend(id) => panic!("expected exhaustion, got backend {id}"),
    }
}

fn state(pool: &BackendPool, id: BackendId, now: Instant) -> BackendState {
    pool.snapshot(now)[id.0].state
}

fn fail_n(pool: &BackendPool, id: BackendId, n: usize, now: Instant) {
    for _ in 0..n {
        pool.record(id, DEP, Outcome::Timeout, now);
    }
}

const A: BackendId = BackendId(0);
const B: BackendId = BackendId(1);
const C: BackendId = BackendId(2);

// --- routing ---

#[test]
fn lowest_priority_number_wins() {
    let pool = pool(vec![
        backend("a", 2, 1),
        backend("b", 1, 1),
        backend("c", 3, 1),
    ]);
    let now = Instant::now();
    for _ in 0..100 {
        assert_eq!(pick(&pool, &[], now), B);
    }
    assert_eq!(pick(&pool, &[B], now), A);
    assert_eq!(pick(&pool, &[B, A], now), C);
    let e = exhausted(&pool, &[B, A, C], now);
    assert_eq!(
        e,
        Exhausted {
            tried: 3,
            ..Exhausted::default()
        }
    );
}

#[test]
fn lower_priority_only_when_the_whole_group_is_out() {
    let pool = pool(vec![
        backend("a", 1, 1),
        backend("b", 1, 1),
        backend("c", 2, 1),
    ]);
    let now = Instant::now();
    pool.record(A, DEP, Outcome::Throttled { hint: None }, now);
    for _ in 0..100 {
        assert_eq!(pick(&pool, &[], now), B);
    }
    fail_n(&pool, B, 3, now);
    assert_eq!(pick(&pool, &[], now), C);
}

#[test]
fn weights_spread_load_in_proportion() {
    let pool = pool(vec![
        backend("a", 1, 3),
        backend("b", 1, 1),
        backend("c", 2, 100),
    ]);
    let now = Instant::now();
    let n = 10_000;
    let a = (0..n).filter(|_| pick(&pool, &[], now) == A).count();
    let share = a as f64 / n as f64;
    assert!(
        (share - 0.75).abs() < 0.03,
        "share of weight 3 of 4: {share}"
    );
}

#[test]
fn equal_weights_spread_evenly_whatever_the_order() {
    let pool = pool(vec![
        backend("a", 1, 1),
        backend("b", 1, 1),
        backend("c", 1, 1),
    ]);
    let now = Instant::now();
    let mut counts = [0usize; 3];
    for _ in 0..9_000 {
        counts[pick(&pool, &[], now).0] += 1;
    }
    for count in counts {
        assert!((2_700..=3_300).contains(&count), "{counts:?}");
    }
}

#[test]
fn thread_rng_also_spreads() {
    let pool = BackendPool::new(vec![backend("a", 1, 1), backend("b", 1, 1)], settings());
    let now = Instant::now();
    let a = (0..1_000).filter(|_| pick(&pool, &[], now) == A).count();
    assert!((300..=700).contains(&a), "{a}");
}

#[test]
fn weight_zero_is_a_last_resort_in_its_group() {
    let pool = pool(vec![
        backend("a", 1, 0),
        backend("b", 1, 1),
        backend("c", 2, 1),
    ]);
    let now = Instant::now();
    for _ in 0..100 {
        assert_eq!(pick(&pool, &[], now), B);
    }
    assert_eq!(pick(&pool, &[B], now), A);
    assert_eq!(pick(&pool, &[A, B], now), C);
}

#[test]
fn tried_backends_are_excluded() {
    let pool = pool(vec![
        backend("a", 1, 1),
        backend("b", 1, 1),
        backend("c", 1, 1),
    ]);
    let now = Instant::now();
    for _ in 0..200 {
        let id = pick(&pool, &[A, C], now);
        assert_eq!(id, B);
        assert_ne!(pick(&pool, &[B], now), B);
    }
}

#[test]
fn only_backends_serving_the_deployment_are_candidates() {
    let pool = pool(vec![
        backend_for("a", 1, 1, &["other"]),
        backend_for("b", 2, 1, &[DEP, "other"]),
    ]);
    let now = Instant::now();
    assert_eq!(pick(&pool, &[], now), B);
    assert_eq!(pool.get(B).deployment_name(DEP), Some("gpt-4o-b"));
    assert_eq!(pool.get(A).deployment_name(DEP), None);

    let Selection::Exhausted(e) = pool.select("unknown", &[], now) else {
        panic!("unknown deployment selected a backend");
    };
    assert!(e.no_candidates);
    assert_eq!(e.shortest_cooldown, None);
    assert!(!exhausted(&pool, &[B], now).no_candidates);
}

#[test]
fn empty_pool_is_exhausted() {
    let pool = pool(vec![]);
    assert!(exhausted(&pool, &[], Instant::now()).no_candidates);
}

// --- cooldowns ---

#[test]
fn throttle_cools_down_for_the_hint_and_expires_on_its_own() {
    let pool = pool(vec![backend("a", 1, 1), backend("b", 2, 1)]);
    let t0 = Instant::now();
    pool.record(
        A,
        DEP,
        Outcome::Throttled {
            hint: Some(ms(2_500)),
        },
        t0,
    );
    assert_eq!(state(&pool, A, t0), BackendState::CoolingDown);
    assert_eq!(pool.snapshot(t0)[0].cooldown_remaining, Some(ms(2_500)));
    assert_eq!(pick(&pool, &[], t0 + ms(2_499)), B);
    assert_eq!(pick(&pool, &[], t0 + ms(2_500)), A);
    assert_eq!(state(&pool, A, t0 + ms(2_500)), BackendState::Available);
}

#[test]
fn cooldown_defaults_and_is_clamped() {
    let pool = pool(vec![
        backend("a", 1, 1),
        backend("b", 1, 1),
        backend("c", 1, 1),
    ]);
    let t0 = Instant::now();
    pool.record(A, DEP, Outcome::Throttled { hint: None }, t0);
    pool.record(
        B,
        DEP,
        Outcome::Throttled {
            hint: Some(secs(86_400)),
        },
        t0,
    );
    pool.record(C, DEP, Outcome::AuthFailure { hint: None }, t0);
    let snapshot = pool.snapshot(t0);
    assert_eq!(snapshot[0].cooldown_remaining, Some(secs(10)));
    assert_eq!(snapshot[1].cooldown_remaining, Some(secs(60)));
    assert_eq!(snapshot[2].cooldown_remaining, Some(secs(10)));
}

#[test]
fn server_errors_cool_down_only_with_a_hint() {
    let pool = pool(vec![backend("a", 1, 1), backend("b", 1, 1)]);
    let t0 = Instant::now();
    pool.record(A, DEP, Outcome::ServerError { hint: None }, t0);
    pool.record(
        B,
        DEP,
        Outcome::ServerError {
            hint: Some(secs(3)),
        },
        t0,
    );
    let snapshot = pool.snapshot(t0);
    assert_eq!(snapshot[0].state, BackendState::Available);
    assert_eq!(snapshot[1].cooldown_remaining, Some(secs(3)));
    // Both still counted as circuit failures.
    assert_eq!(snapshot[0].window_failures, 1);
    assert_eq!(snapshot[1].window_failures, 1);
}

#[test]
fn a_shorter_hint_never_shortens_a_cooldown() {
    let pool = pool(vec![backend("a", 1, 1)]);
    let t0 = Instant::now();
    pool.record(
        A,
        DEP,
        Outcome::Throttled {
            hint: Some(secs(30)),
        },
        t0,
    );
    pool.record(
        A,
        DEP,
        Outcome::Throttled {
            hint: Some(secs(1)),
        },
        t0 + secs(1),
    );
    assert_eq!(
        pool.snapshot(t0 + secs(2))[0].cooldown_remaining,
        Some(secs(28))
    );
    // A longer one extends it.
    pool.record(
        A,
        DEP,
        Outcome::Throttled {
            hint: Some(secs(40)),
        },
        t0 + secs(2),
    );
    assert_eq!(
        pool.snapshot(t0 + secs(2))[0].cooldown_remaining,
        Some(secs(40))
    );
    // A success (from a request sent earlier) does not end it either.
    pool.record(A, DEP, Outcome::Success, t0 + secs(3));
    assert_eq!(state(&pool, A, t0 + secs(3)), BackendState::CoolingDown);
}

#[test]
fn a_zero_hint_still_rests_the_backend_briefly() {
    let pool = pool(vec![backend("a", 1, 1)]);
    let t0 = Instant::now();
    pool.record(
        A,
        DEP,
        Outcome::Throttled {
            hint: Some(Duration::ZERO),
        },
        t0,
    );
    assert_eq!(
        exhausted(&pool, &[], t0).shortest_cooldown,
        Some(health::MIN_COOLDOWN)
    );
    assert_eq!(pick(&pool, &[], t0 + health::MIN_COOLDOWN), A);
}

#[test]
fn only_throttles_count_as_a_wait_the_client_can_sit_out() {
    let pool = pool(vec![backend("a", 1, 1), backend("b", 1, 1)]);
    let t0 = Instant::now();
    pool.record(A, DEP, Outcome::AuthFailure { hint: None }, t0);
    pool.record(
        BackendId(1),
        DEP,
        Outcome::ServerError {
            hint: Some(secs(5)),
        },
        t0,
    );
    let e = exhausted(&pool, &[], t0);
    // A refused credential is a misconfiguration (issue 9), not a wait either.
    assert_eq!(
        (e.throttled, e.cooling, e.misconfigured, e.shortest_cooldown),
        (0, 1, 1, None)
    );
    pool.record(
        BackendId(1),
        DEP,
        Outcome::Throttled {
            hint: Some(secs(3)),
        },
        t0,
    );
    let e = exhausted(&pool, &[], t0);
    // b's 5 s cooldown stands (the longest wins) and it is a throttle now too.
    assert_eq!(
        (e.throttled, e.misconfigured, e.shortest_cooldown),
        (1, 1, Some(secs(5)))
    );
}

#[test]
fn absurd_durations_do_not_panic() {
    let mut settings = settings();
    settings.max_cooldown = Duration::MAX;
    settings.circuit.base_ejection = Duration::MAX;
    settings.circuit.max_ejection = Duration::MAX;
    settings.not_found_cooldown = Duration::MAX;
    let pool = BackendPool::new(vec![backend("a", 1, 1)], settings);
    let t0 = Instant::now();
    pool.record(
        A,
        DEP,
        Outcome::Throttled {
            hint: Some(Duration::MAX),
        },
        t0,
    );
    pool.record(A, DEP, Outcome::DeploymentNotFound, t0);
    fail_n(&pool, A, 3, t0);
    assert!(
        pool.snapshot(t0 + secs(86_400))[0]
            .cooldown_remaining
            .is_some()
    );
}

#[test]
fn all_throttled_reports_the_shortest_cooldown() {
    let pool = pool(vec![
        backend("a", 1, 1),
        backend("b", 2, 1),
        backend("c", 3, 1),
    ]);
    let t0 = Instant::now();
    pool.record(
        A,
        DEP,
        Outcome::Throttled {
            hint: Some(secs(5)),
        },
        t0,
    );
    pool.record(
        B,
        DEP,
        Outcome::Throttled {
            hint: Some(secs(2)),
        },
        t0,
    );
    pool.record(
        C,
        DEP,
        Outcome::Throttled {
            hint: Some(secs(8)),
        },
        t0,
    );
    let e = exhausted(&pool, &[], t0 + secs(1));
    assert_eq!(
        e,
        Exhausted {
            shortest_cooldown: Some(secs(1)),
            throttled: 3,
            ..Exhausted::default()
        }
    );
    // Tried backends count too: the client will come back later, not within this request.
    let e = exhausted(&pool, &[B], t0 + secs(1));
    assert_eq!(e.shortest_cooldown, Some(secs(1)));
}

#[test]
fn exhaustion_without_cooldowns_has_no_retry_hint() {
    let pool = pool(vec![
        backend("a", 1, 1),
        backend("b", 1, 1),
        backend("c", 1, 1),
    ]);
    let t0 = Instant::now();
    fail_n(&pool, A, 3, t0);
    pool.record(B, DEP, Outcome::DeploymentNotFound, t0);
    // A was tried too, or panic mode would send the attempt there.
    let e = exhausted(&pool, &[A, C], t0);
    assert_eq!(
        e,
        Exhausted {
            circuit_open: 1,
            not_found: 1,
            tried: 1,
            ..Exhausted::default()
        }
    );
}

#[test]
fn circuit_open_and_cooling_counts_as_circuit_open() {
    let pool = pool(vec![backend("a", 1, 1), backend("b", 1, 1)]);
    let t0 = Instant::now();
    for _ in 0..10 {
        pool.record(
            A,
            DEP,
            Outcome::ServerError {
                hint: Some(secs(1)),
            },
            t0,
        );
    }
    pool.record(
        B,
        DEP,
        Outcome::Throttled {
            hint: Some(secs(4)),
        },
        t0,
    );
    let e = exhausted(&pool, &[], t0);
    assert_eq!(e.circuit_open, 1);
    assert_eq!(e.throttled, 1);
    assert_eq!(e.shortest_cooldown, Some(secs(4)));
}

// --- circuit breaker ---

#[test]
fn consecutive_connection_failures_open_the_circuit() {
    let pool = pool(vec![backend("a", 1, 1), backend("b", 2, 1)]);
    let t0 = Instant::now();
    pool.record(A, DEP, Outcome::Timeout, t0);
    pool.record(A, DEP, Outcome::ConnectError, t0 + secs(4));
    assert_eq!(state(&pool, A, t0 + secs(4)), BackendState::Available);
    // However far apart: a run is a run.
    let t1 = t0 + secs(60);
    pool.record(A, DEP, Outcome::ConnectError, t1);
    assert_eq!(state(&pool, A, t1), BackendState::CircuitOpen);
    assert_eq!(pool.snapshot(t1)[0].circuit_open_remaining, Some(secs(30)));
    assert_eq!(pick(&pool, &[], t1), B);
}

#[test]
fn any_answer_breaks_a_run_of_connection_failures() {
    let pool = pool(vec![backend("a", 1, 1)]);
    let t0 = Instant::now();
    for answer in [
        Outcome::Success,
        Outcome::ServerError { hint: None },
        Outcome::Success,
    ] {
        fail_n(&pool, A, 2, t0);
        pool.record(A, DEP, answer, t0);
    }
    assert_eq!(state(&pool, A, t0), BackendState::Available);
}

#[test]
fn broken_streams_and_local_errors_never_count() {
    let pool = pool(vec![backend("a", 1, 1)]);
    let t0 = Instant::now();
    for _ in 0..1_000 {
        pool.record(A, DEP, Outcome::Success, t0);
        pool.record(A, DEP, Outcome::StreamBroken, t0);
        pool.record(A, DEP, Outcome::LocalError, t0);
    }
    let status = &pool.snapshot(t0)[0];
    assert_eq!(status.state, BackendState::Available);
    assert_eq!(status.window_failures, 0);
    // Nor do they break a run of connection failures, nor make one.
    fail_n(&pool, A, 2, t0);
    pool.record(A, DEP, Outcome::LocalError, t0);
    assert_eq!(state(&pool, A, t0), BackendState::Available);
    fail_n(&pool, A, 1, t0);
    assert_eq!(state(&pool, A, t0), BackendState::CircuitOpen);
}

#[test]
fn a_few_server_errors_among_many_answers_never_open() {
    let pool = pool(vec![backend("a", 1, 1)]);
    let t0 = Instant::now();
    // 5% of 1,000 answers over 10 s, in bursts: never 50% of any window.
    for i in 0..1_000u64 {
        let outcome = if i % 20 == 19 {
            Outcome::ServerError { hint: None }
        } else {
            Outcome::Success
        };
        pool.record(A, DEP, outcome, t0 + ms(i * 10));
    }
    let end = t0 + ms(10_000);
    assert_eq!(state(&pool, A, end), BackendState::Available);
    // The window slides by tenths: it holds the last 9 to 10 s.
    assert_eq!(pool.snapshot(end)[0].window_failures, 45);
}

#[test]
fn a_failure_ratio_opens_only_over_the_request_volume() {
    let pool = pool(vec![backend("a", 1, 1)]);
    let t0 = Instant::now();
    // 9 of 9 failed: under the volume of 10.
    for _ in 0..9 {
        pool.record(A, DEP, Outcome::ServerError { hint: None }, t0);
    }
    assert_eq!(state(&pool, A, t0), BackendState::Available);
    // Half of 10 failed: the threshold.
    let pool = pool_with(settings());
    for i in 0..10 {
        let outcome = if i % 2 == 1 {
            Outcome::ServerError { hint: None }
        } else {
            Outcome::Success
        };
        pool.record(A, DEP, outcome, t0);
    }
    assert_eq!(state(&pool, A, t0), BackendState::CircuitOpen);
}

#[test]
fn failures_spread_beyond_the_interval_do_not_open() {
    let pool = pool(vec![backend("a", 1, 1)]);
    let t0 = Instant::now();
    for i in 0..20 {
        pool.record(A, DEP, Outcome::ServerError { hint: None }, t0 + secs(i));
    }
    // One a second: the 10th within 10 s reaches the volume, all failed.
    assert_eq!(state(&pool, A, t0 + secs(9)), BackendState::CircuitOpen);

    let pool = pool_with(settings());
    for i in 0..20 {
        pool.record(
            A,
            DEP,
            Outcome::ServerError { hint: None },
            t0 + secs(2 * i),
        );
    }
    let end = t0 + secs(38);
    assert_eq!(state(&pool, A, end), BackendState::Available);
    let status = &pool.snapshot(end)[0];
    assert_eq!(status.window_failures, 5);
    assert_eq!(status.consecutive_failures, 20);
}

#[test]
fn throttles_auth_failures_and_not_found_are_not_circuit_failures() {
    let pool = pool(vec![backend("a", 1, 1)]);
    let t0 = Instant::now();
    for _ in 0..10 {
        pool.record(A, DEP, Outcome::Throttled { hint: Some(ms(1)) }, t0);
        pool.record(A, DEP, Outcome::AuthFailure { hint: Some(ms(1)) }, t0);
        pool.record(A, DEP, Outcome::DeploymentNotFound, t0);
    }
    let status = &pool.snapshot(t0 + health::MIN_COOLDOWN)[0];
    // Out of rotation as misconfigured (issue 9), but no circuit failure.
    assert_eq!(status.state, BackendState::Misconfigured);
    assert_eq!(status.window_failures, 0);
    assert_eq!(status.consecutive_failures, 0);
}

#[test]
fn zero_thresholds_disable_the_circuit_breaker() {
    let mut settings = settings();
    settings.circuit.consecutive_failures = 0;
    settings.circuit.failure_percentage = 0;
    let pool = BackendPool::new(vec![backend("a", 1, 1)], settings);
    let t0 = Instant::now();
    fail_n(&pool, A, 100, t0);
    assert_eq!(state(&pool, A, t0), BackendState::Available);
}

#[test]
fn ejection_never_takes_more_than_the_share_of_a_group() {
    let mut settings = settings();
    settings.circuit.max_ejection_percent = 50;
    let pool = BackendPool::new(
        vec![
            backend("a", 1, 1),
            backend("b", 1, 1),
            backend("c", 1, 1),
            backend("d", 1, 1),
            backend("e", 2, 1),
        ],
        settings,
    );
    let t0 = Instant::now();
    for id in 0..5 {
        fail_n(&pool, BackendId(id), 3, t0);
    }
    let states: Vec<_> = pool.snapshot(t0).iter().map(|b| b.state).collect();
    use BackendState::{Available as Up, CircuitOpen as Out};
    // Two of the four in group 1; the lone backend of group 2 may always go.
    assert_eq!(states, [Out, Out, Up, Up, Out]);
    // When one comes back, another may go.
    let t1 = t0 + secs(30);
    pool.record(A, DEP, Outcome::Success, t1);
    fail_n(&pool, BackendId(2), 3, t1);
    assert_eq!(state(&pool, BackendId(2), t1), BackendState::CircuitOpen);
    assert_eq!(state(&pool, BackendId(3), t1), BackendState::Available);
}

#[test]
fn ejections_grow_with_repeats_up_to_the_cap() {
    let mut settings = settings();
    settings.circuit.max_ejection = secs(100);
    let pool = BackendPool::new(vec![backend("a", 1, 1)], settings);
    let mut now = Instant::now();
    let mut lengths = Vec::new();
    for _ in 0..5 {
        // Each probe fails: out again, for longer.
        fail_n(&pool, A, 3, now);
        let left = pool.snapshot(now)[0].circuit_open_remaining.unwrap();
        lengths.push(left.as_secs());
        now += left;
    }
    assert_eq!(lengths, [30, 60, 90, 100, 100]);
    // A healthy stretch forgets one ejection per interval: after 40 s, four of five.
    pool.record(A, DEP, Outcome::Success, now);
    now += secs(40);
    fail_n(&pool, A, 3, now);
    assert_eq!(pool.snapshot(now)[0].circuit_open_remaining, Some(secs(60)));
}

#[test]
fn panic_mode_tries_ejected_backends_rather_than_refuse() {
    let pool = pool(vec![backend("a", 1, 1), backend("b", 2, 1)]);
    let t0 = Instant::now();
    fail_n(&pool, A, 3, t0);
    fail_n(&pool, B, 3, t0);
    assert_eq!(state(&pool, A, t0), BackendState::CircuitOpen);
    assert_eq!(state(&pool, B, t0), BackendState::CircuitOpen);
    assert_eq!(pool.panic_selections(), 0);
    // Priority still applies; no probe slot is taken.
    assert_eq!(pick(&pool, &[], t0), A);
    assert_eq!(pick(&pool, &[A], t0), B);
    assert_eq!(pool.panic_selections(), 2);
    // Both tried: the refusal still says why.
    let e = exhausted(&pool, &[A, B], t0);
    assert_eq!(e.circuit_open, 2);
    assert_eq!(e.tried, 0);
    // A throttled backend is an answer of its own: the client is told when to come back.
    let pool = self::pool(vec![backend("a", 1, 1), backend("b", 2, 1)]);
    fail_n(&pool, A, 3, t0);
    pool.record(
        B,
        DEP,
        Outcome::Throttled {
            hint: Some(secs(2)),
        },
        t0,
    );
    let e = exhausted(&pool, &[], t0);
    assert_eq!(e.shortest_cooldown, Some(secs(2)));
}

#[test]
fn half_open_lets_exactly_one_probe_through() {
    let pool = pool(vec![backend("a", 1, 1), backend("b", 2, 1)]);
    let t0 = Instant::now();
    fail_n(&pool, A, 3, t0);
    let t1 = t0 + secs(29);
    assert_eq!(pick(&pool, &[], t1), B);

    let t2 = t0 + secs(30);
    assert_eq!(state(&pool, A, t2), BackendState::HalfOpen);
    assert_eq!(pick(&pool, &[], t2), A, "the probe");
    for _ in 0..10 {
        assert_eq!(pick(&pool, &[], t2 + ms(4_999)), B, "probe pending");
    }
    // The probe never answered: after probe_timeout another probe goes.
    assert_eq!(pick(&pool, &[], t2 + secs(5)), A, "second probe");
    assert_eq!(pick(&pool, &[], t2 + secs(6)), B);
}

#[test]
fn probe_success_closes_the_circuit_and_resets_the_count() {
    let pool = pool(vec![backend("a", 1, 1)]);
    let t0 = Instant::now();
    pool.record(A, DEP, Outcome::Timeout, t0);
    fail_n(&pool, A, 2, t0 + secs(1));
    let t1 = t0 + secs(31);
    assert_eq!(pick(&pool, &[], t1), A);
    pool.record(A, DEP, Outcome::Success, t1);
    assert_eq!(state(&pool, A, t1), BackendState::Available);
    for _ in 0..10 {
        assert_eq!(pick(&pool, &[], t1), A);
    }
    // A fresh count: two failures do not reopen it.
    fail_n(&pool, A, 2, t1);
    assert_eq!(state(&pool, A, t1), BackendState::Available);
    fail_n(&pool, A, 1, t1);
    assert_eq!(state(&pool, A, t1), BackendState::CircuitOpen);
}

#[test]
fn probe_failure_reopens_the_circuit_for_longer() {
    let pool = pool(vec![backend("a", 1, 1), backend("b", 2, 1)]);
    let t0 = Instant::now();
    fail_n(&pool, A, 3, t0);
    let t1 = t0 + secs(40);
    assert_eq!(pick(&pool, &[], t1), A);
    pool.record(A, DEP, Outcome::ConnectError, t1 + secs(2));
    let t2 = t1 + secs(2);
    assert_eq!(state(&pool, A, t2), BackendState::CircuitOpen);
    assert_eq!(pool.snapshot(t2)[0].circuit_open_remaining, Some(secs(60)));
    assert_eq!(pick(&pool, &[], t2 + ms(59_999)), B);
    assert_eq!(pick(&pool, &[], t2 + secs(60)), A);
}

#[test]
fn throttled_probe_frees_the_slot_after_its_cooldown() {
    let pool = pool(vec![backend("a", 1, 1), backend("b", 2, 1)]);
    let t0 = Instant::now();
    fail_n(&pool, A, 3, t0);
    let t1 = t0 + secs(30);
    assert_eq!(pick(&pool, &[], t1), A);
    pool.record(
        A,
        DEP,
        Outcome::Throttled {
            hint: Some(secs(1)),
        },
        t1,
    );
    assert_eq!(state(&pool, A, t1), BackendState::CoolingDown);
    assert_eq!(pick(&pool, &[], t1), B);
    // Still half-open: one probe after the cooldown, well before probe_timeout.
    let t2 = t1 + secs(1);
    assert_eq!(state(&pool, A, t2), BackendState::HalfOpen);
    assert_eq!(pick(&pool, &[], t2), A);
    assert_eq!(pick(&pool, &[], t2), B);
}

#[test]
fn stragglers_while_open_change_nothing() {
    let pool = pool(vec![backend("a", 1, 1)]);
    let t0 = Instant::now();
    fail_n(&pool, A, 3, t0);
    // Answers to requests sent before the trip.
    pool.record(A, DEP, Outcome::Success, t0 + secs(10));
    fail_n(&pool, A, 5, t0 + secs(20));
    assert_eq!(pool.snapshot(t0)[0].circuit_open_remaining, Some(secs(30)));
    assert_eq!(state(&pool, A, t0 + secs(30)), BackendState::HalfOpen);
}

#[test]
fn concurrent_selects_share_one_probe() {
    let pool = Arc::new(pool(vec![backend("a", 1, 1), backend("b", 2, 1)]));
    let t0 = Instant::now();
    fail_n(&pool, A, 3, t0);
    let probe_time = t0 + secs(30);
    let threads = 8;
    let barrier = Arc::new(Barrier::new(threads));
    let probes: usize = (0..threads)
        .map(|_| {
            let pool = Arc::clone(&pool);
            let barrier = Arc::clone(&barrier);
            thread::spawn(move || {
                barrier.wait();
                pool.select(DEP, &[], probe_time) == Selection::Backend(A)
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|handle| usize::from(handle.join().unwrap()))
        .sum();
    assert_eq!(probes, 1);
}

// --- not found ---

#[test]
fn not_found_excludes_a_backend_for_that_deployment_only() {
    let pool = pool(vec![
        backend_for("a", 1, 1, &[DEP, "embed"]),
        backend_for("b", 2, 1, &[DEP, "embed"]),
    ]);
    let t0 = Instant::now();
    pool.record(A, DEP, Outcome::DeploymentNotFound, t0);
    assert_eq!(pick(&pool, &[], t0), B);
    assert_eq!(pool.select("embed", &[], t0), Selection::Backend(A));
    assert_eq!(state(&pool, A, t0), BackendState::Available);
    assert_eq!(pool.snapshot(t0)[0].not_found, vec![DEP.to_owned()]);

    let e = exhausted(&pool, &[B], t0);
    assert_eq!(e.not_found, 1);
    assert_eq!(e.shortest_cooldown, None);

    let t1 = t0 + secs(60);
    assert_eq!(pick(&pool, &[], t1), A);
    assert!(pool.snapshot(t1)[0].not_found.is_empty());
}

// --- snapshot and quota ---

#[test]
fn snapshot_reports_identity_and_quota() {
    let pool = pool(vec![backend("a", 1, 3), backend("b", 2, 1)]);
    let t0 = Instant::now();
    pool.observe_remaining(A, DEP, Some(1_000), Some(50), t0);
    pool.observe_remaining(A, DEP, None, Some(49), t0 + secs(2));
    let snapshot = pool.snapshot(t0 + secs(3));
    let a = &snapshot[0];
    assert_eq!(
        (a.id, a.name.as_str(), a.region.as_str()),
        (A, "a", "a-region")
    );
    assert_eq!((a.priority, a.weight), (1, 3));
    assert_eq!(
        a.remaining_tokens,
        Some(RemainingQuota {
            value: 1_000,
            age: secs(3)
        })
    );
    assert_eq!(
        a.remaining_requests,
        Some(RemainingQuota {
            value: 49,
            age: secs(1)
        })
    );
    assert_eq!(snapshot[1].remaining_tokens, None);
    assert_eq!(snapshot[1].state, BackendState::Available);
}

#[test]
fn in_flight_counts_until_the_guard_is_dropped() {
    let pool = pool(vec![backend("a", 1, 1), backend("b", 2, 1)]);
    let now = Instant::now();
    let first = pool.begin(A);
    let second = pool.begin(A);
    let unknown = pool.begin(BackendId(7));
    let counts = |pool: &BackendPool| -> Vec<u64> {
        pool.snapshot(now).iter().map(|b| b.in_flight).collect()
    };
    assert_eq!(counts(&pool), [2, 0]);
    drop(first);
    drop(unknown);
    assert_eq!(counts(&pool), [1, 0]);
    drop(second);
    assert_eq!(counts(&pool), [0, 0]);
}

#[test]
fn unknown_ids_are_ignored_by_record_and_observe() {
    let pool = pool(vec![backend("a", 1, 1)]);
    let now = Instant::now();
    pool.record(BackendId(7), DEP, Outcome::Timeout, now);
    pool.observe_remaining(BackendId(7), DEP, Some(1), None, now);
    assert_eq!(pick(&pool, &[], now), A);
}

// --- settings and threads ---

#[test]
fn pool_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync + 'static>() {}
    assert_send_sync::<BackendPool>();
    assert_send_sync::<Selection>();
}

#[test]
fn concurrent_selects_and_records_smoke() {
    let pool = Arc::new(
        BackendPool::new(
            vec![backend("a", 1, 2), backend("b", 1, 1), backend("c", 2, 1)],
            PoolSettings {
                default_cooldown: ms(3),
                max_cooldown: ms(5),
                circuit: CircuitSettings {
                    consecutive_failures: 3,
                    interval: ms(20),
                    base_ejection: ms(5),
                    max_ejection: ms(10),
                    ..CircuitSettings::default()
                },
                probe_timeout: ms(2),
                not_found_cooldown: ms(5),
            },
        )
        .with_rng_seed(1),
    );
    let base = Instant::now();
    let handles: Vec<_> = (0..4u64)
        .map(|seed| {
            let pool = Arc::clone(&pool);
            thread::spawn(move || {
                let mut rng = fastrand::Rng::with_seed(seed);
                let mut selected = 0usize;
                // Each thread has its own clock: instants arrive out of order across threads.
                for i in 0..5_000 {
                    let now = base + ms(i);
                    let mut tried = Vec::new();
                    while let Selection::Backend(id) = pool.select(DEP, &tried, now) {
                        selected += 1;
                        let outcome = match rng.u8(0..10) {
                            0 => Outcome::Throttled { hint: None },
                            1 => Outcome::Timeout,
                            2 => Outcome::DeploymentNotFound,
                            3 => Outcome::ServerError { hint: Some(ms(1)) },
                            _ => Outcome::Success,
                        };
                        pool.record(id, DEP, outcome, now);
                        pool.observe_remaining(id, DEP, Some(rng.u64(..)), None, now);
                        if outcome == Outcome::Success {
                            break;
                        }
                        tried.push(id);
                    }
                    assert_eq!(pool.snapshot(now).len(), 3);
                }
                selected
            })
        })
        .collect();
    let selected: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
    assert!(selected > 5_000, "{selected}");

    // Long after, every backend is back (a tripped one as half-open, taking a probe).
    let later = base + secs(60);
    for status in pool.snapshot(later) {
        assert!(
            matches!(
                status.state,
                BackendState::Available | BackendState::HalfOpen
            ),
            "{status:?}"
        );
    }
    assert!(matches!(
        pool.select(DEP, &[], later),
        Selection::Backend(_)
    ));
}

#[track_caller]
fn pick_needing(pool: &BackendPool, need: u64, now: Instant) -> BackendId {
    match pool.select_with(DEP, &[], Some(need), now) {
        Selection::Backend(id) => id,
        Selection::Exhausted(e) => panic!("expected a backend, got {e:?}"),
    }
}

#[test]
fn a_backend_that_cannot_fit_the_estimate_is_skipped() {
    let pool = pool(vec![backend("ptu", 1, 1), backend("std", 2, 1)]);
    let t0 = Instant::now();
    pool.observe_remaining(BackendId(0), DEP, Some(500), None, t0);
    assert_eq!(pick_needing(&pool, 400, t0), BackendId(0));
    // 400 of the 500 are now spoken for: the next 400-token request goes to priority 2.
    assert_eq!(pick_needing(&pool, 400, t0), BackendId(1));
    // A fresh report restores the headroom.
    pool.observe_remaining(BackendId(0), DEP, Some(10_000), None, t0 + ms(10));
    assert_eq!(pick_needing(&pool, 400, t0 + ms(10)), BackendId(0));
    // Plain selection ignores quota.
    pool.observe_remaining(BackendId(0), DEP, Some(0), None, t0 + ms(20));
    assert_eq!(pick(&pool, &[], t0 + ms(20)), BackendId(0));
}

#[test]
fn stale_or_missing_quota_falls_back_to_plain_selection() {
    let pool = pool(vec![backend("ptu", 1, 1), backend("std", 2, 1)]);
    let t0 = Instant::now();
    assert_eq!(
        pick_needing(&pool, 1_000_000, t0),
        BackendId(0),
        "never reported"
    );
    pool.observe_remaining(BackendId(0), DEP, Some(0), None, t0);
    assert_eq!(pick_needing(&pool, 10, t0 + secs(1)), BackendId(1));
    let later = t0 + QUOTA_FRESHNESS + secs(1);
    assert_eq!(pick_needing(&pool, 10, later), BackendId(0), "stale report");
}

#[test]
fn when_no_backend_fits_selection_ignores_quota() {
    let pool = pool(vec![backend("a", 1, 1), backend("b", 2, 1)]);
    let t0 = Instant::now();
    pool.observe_remaining(BackendId(0), DEP, Some(5), None, t0);
    pool.observe_remaining(BackendId(1), DEP, Some(5), None, t0);
    assert_eq!(pick_needing(&pool, 100, t0), BackendId(0));
}

#[test]
fn headroom_weights_the_draw_inside_a_group_when_all_have_reported() {
    let pool = pool(vec![
        backend("a", 1, 1),
        backend("b", 1, 1),
        backend("c", 1, 1),
    ]);
    let t0 = Instant::now();
    pool.observe_remaining(BackendId(0), DEP, Some(100_000), None, t0);
    pool.observe_remaining(BackendId(1), DEP, Some(900_000), None, t0);
    // `c` has not reported: plain weights, about a third each.
    let count = |id: usize, need: Option<u64>| {
        (0..3000)
            .filter(|_| pool.select_with(DEP, &[], need, t0) == Selection::Backend(BackendId(id)))
            .count()
    };
    let a = count(0, Some(1));
    assert!((800..=1200).contains(&a), "{a}");
    // All reported: a 1 : b 9 : c 10 by headroom (the 1-token estimates barely move it).
    pool.observe_remaining(BackendId(2), DEP, Some(1_000_000), None, t0);
    let a = count(0, Some(1));
    assert!(
        (90..=220).contains(&a),
        "a has a twentieth of the headroom: {a}"
    );
    let b = count(1, Some(1));
    assert!((1150..=1550).contains(&b), "b has 9/20: {b}");
    // Without an estimate, quota plays no part.
    let a = count(0, None);
    assert!((800..=1200).contains(&a), "{a}");
}

#[test]
fn headroom_is_per_deployment_and_a_throttle_clears_it() {
    let pool = pool(vec![
        backend_for("ptu", 1, 1, &[DEP, "emb"]),
        backend_for("std", 2, 1, &[DEP, "emb"]),
    ]);
    let t0 = Instant::now();
    // The embeddings deployment is exhausted; gpt-4o on the same backend is not.
    pool.observe_remaining(BackendId(0), "emb", Some(0), None, t0);
    pool.observe_remaining(BackendId(0), DEP, Some(50_000), None, t0);
    assert_eq!(pick_needing(&pool, 1_000, t0), BackendId(0));
    assert_eq!(
        pool.select_with("emb", &[], Some(10), t0),
        Selection::Backend(BackendId(1))
    );
    // A 429 for gpt-4o: once its cooldown is over, the stale 'remaining 0' does not keep it away.
    pool.observe_remaining(BackendId(0), DEP, Some(0), None, t0);
    pool.record(
        BackendId(0),
        DEP,
        Outcome::Throttled {
            hint: Some(secs(1)),
        },
        t0,
    );
    assert_eq!(pick_needing(&pool, 1_000, t0 + secs(1)), BackendId(0));
}
