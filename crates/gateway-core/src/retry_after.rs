//! Reading Azure's throttling headers into a cooldown.
//!
//! Azure OpenAI says when to come back in several headers, with several formats, and uses `-1` for
//! "unknown" (see the reference, section 2). [`cooldown_hint`] reads them in order of precision and
//! skips any value it cannot trust; [`parse_remaining`] reads the `x-ratelimit-remaining-*` counters.
//!
//! ```
//! use std::time::{Duration, SystemTime};
//! use gateway_core::retry_after::{cooldown_hint, parse_remaining};
//!
//! // `retry-after-ms` is unknown (-1), so the less precise `retry-after` is used.
//! let headers = [("retry-after-ms", "-1"), ("retry-after", "6")];
//! let lookup = |name: &str| headers.iter().find(|(n, _)| *n == name).map(|(_, v)| *v);
//! assert_eq!(cooldown_hint(lookup, SystemTime::now()), Some(Duration::from_secs(6)));
//! assert_eq!(parse_remaining("-1"), None);
//! ```

use std::time::{Duration, SystemTime};

const NANOS_PER_MILLI: u128 = 1_000_000;
const NANOS_PER_SEC: u128 = 1_000_000_000;
const NANOS_PER_MIN: u128 = 60 * NANOS_PER_SEC;
const NANOS_PER_HOUR: u128 = 60 * NANOS_PER_MIN;

/// Fraction digits beyond this are ignored (they are far below a nanosecond for every unit used here).
const MAX_FRACTION_DIGITS: usize = 18;

/// How long a backend asks to be left alone, read from its response headers.
///
/// `header` looks a header up by its lower-case name. Headers are read in this order, and the first
/// usable one wins:
///
/// 1. `retry-after-ms`, then `x-ms-retry-after-ms`: milliseconds, integer or decimal (`1500`, `12.5`).
/// 2. `retry-after`: seconds, integer or decimal, or an HTTP date (RFC 9110) taken relative to `now`;
///    a date in the past means zero.
/// 3. `x-ratelimit-reset-requests`, then `x-ratelimit-reset-tokens`: `6` (seconds), `6s`, `1.5s`,
///    `250ms`, `1m30s`, `1h`.
///
/// A negative (Azure's `-1` means unknown), empty or unparseable value is skipped in favour of the next
/// header. Returns `None` when no header gives a usable value. Values are not capped here: an absurdly
/// large one saturates to [`Duration::MAX`], and the caller clamps (see
/// [`PoolSettings::max_cooldown`](crate::pool::PoolSettings::max_cooldown)).
pub fn cooldown_hint<'a>(
    header: impl Fn(&str) -> Option<&'a str>,
    now: SystemTime,
) -> Option<Duration> {
    let millis = |name: &str| header(name).and_then(|v| parse_decimal(v.trim(), NANOS_PER_MILLI));
    let reset = |name: &str| header(name).and_then(parse_reset);

    millis("retry-after-ms")
        .or_else(|| millis("x-ms-retry-after-ms"))
        .or_else(|| header("retry-after").and_then(|v| parse_retry_after(v, now)))
        .or_else(|| reset("x-ratelimit-reset-requests"))
        .or_else(|| reset("x-ratelimit-reset-tokens"))
}

/// Reads an `x-ratelimit-remaining-tokens` or `x-ratelimit-remaining-requests` value.
///
/// Returns `None` for `-1` (Azure's "unknown"), any other negative number, and anything that is not a
/// plain non-negative integer.
pub fn parse_remaining(value: &str) -> Option<u64> {
    let value = value.trim();
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // Only digits: the parse fails only on overflow, where the backend clearly has plenty left.
    Some(value.parse().unwrap_or(u64::MAX))
}

/// `retry-after`: decimal seconds, or an HTTP date.
fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Some(d) = parse_decimal(value, NANOS_PER_SEC) {
        return Some(d);
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// Reads an `x-ratelimit-reset-*` value: a bare number of seconds, or a sequence of
/// `<decimal><unit>` parts with units `h`, `m`, `s` and `ms` (`1m30s`, `250ms`, `1.5s`).
///
/// ```
/// use std::time::Duration;
/// use gateway_core::retry_after::parse_reset;
///
/// assert_eq!(parse_reset("1m30s"), Some(Duration::from_secs(90)));
/// assert_eq!(parse_reset("-1"), None);
/// ```
pub fn parse_reset(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Some(d) = parse_decimal(value, NANOS_PER_SEC) {
        return Some(d);
    }

    let mut rest = value;
    let mut total = Duration::ZERO;
    while !rest.is_empty() {
        let number_len = rest
            .bytes()
            .position(|b| !(b.is_ascii_digit() || b == b'.'))
            .unwrap_or(rest.len());
        let (number, after) = rest.split_at(number_len);
        let unit_len = after
            .bytes()
            .position(|b| !b.is_ascii_alphabetic())
            .unwrap_or(after.len());
        let (unit, after) = after.split_at(unit_len);
        let unit_nanos = match unit {
            "h" => NANOS_PER_HOUR,
            "m" => NANOS_PER_MIN,
            "s" => NANOS_PER_SEC,
            "ms" => NANOS_PER_MILLI,
            _ => return None,
        };
        total = total.saturating_add(parse_decimal(number, unit_nanos)?);
        rest = after;
    }
    // An empty value never entered the loop.
    (!value.is_empty()).then_some(total)
}

/// Parses `digits[.digits]` (no sign, no exponent) as a number of `unit_nanos`, exactly, saturating to
/// [`Duration::MAX`].
fn parse_decimal(value: &str, unit_nanos: u128) -> Option<Duration> {
    let (int, frac) = match value.split_once('.') {
        Some((int, frac)) => (int, frac),
        None => (value, ""),
    };
    let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if (int.is_empty() && frac.is_empty()) || !all_digits(int) || !all_digits(frac) {
        return None;
    }
    // `1.` and `.5` are accepted; `.` alone is not.

    let mut nanos: u128 = 0;
    for digit in int.bytes() {
        let next = nanos
            .checked_mul(10)
            .and_then(|n| n.checked_add(u128::from(digit - b'0') * unit_nanos));
        match next {
            Some(n) => nanos = n,
            None => return Some(Duration::MAX),
        }
    }
    let int_nanos = nanos;

    let frac = &frac[..frac.len().min(MAX_FRACTION_DIGITS)];
    let mut frac_value: u128 = 0;
    let mut scale: u128 = 1;
    for digit in frac.bytes() {
        frac_value = frac_value * 10 + u128::from(digit - b'0');
        scale *= 10;
    }
    let frac_nanos = frac_value * unit_nanos / scale;

    Some(nanos_to_duration(int_nanos.saturating_add(frac_nanos)))
}

fn nanos_to_duration(nanos: u128) -> Duration {
    let secs = nanos / NANOS_PER_SEC;
    match u64::try_from(secs) {
        // Below one second, so it fits a u32.
        Ok(secs) => Duration::new(secs, (nanos % NANOS_PER_SEC) as u32),
        Err(_) => Duration::MAX,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn hint(headers: &[(&'static str, &'static str)], now: SystemTime) -> Option<Duration> {
        cooldown_hint(
            |name| headers.iter().find(|(n, _)| *n == name).map(|(_, v)| *v),
            now,
        )
    }

    #[test]
    fn decimal_table() {
        let cases: &[(&str, Option<Duration>)] = &[
            ("0", Some(Duration::ZERO)),
            ("1", Some(ms(1))),
            ("1500", Some(ms(1500))),
            ("12.5", Some(Duration::from_micros(12_500))),
            ("0.001", Some(Duration::from_micros(1))),
            ("1.", Some(ms(1))),
            (".5", Some(Duration::from_micros(500))),
            ("007", Some(ms(7))),
            ("", None),
            (".", None),
            ("-1", None),
            ("-0.5", None),
            ("+5", None),
            ("1e3", None),
            ("inf", None),
            ("NaN", None),
            ("1.2.3", None),
            ("1 2", None),
            ("0x10", None),
            ("１", None), // a full-width digit is not ASCII
        ];
        for (input, expected) in cases {
            assert_eq!(
                parse_decimal(input, NANOS_PER_MILLI),
                *expected,
                "input {input:?}"
            );
        }
    }

    #[test]
    fn decimal_saturates_instead_of_overflowing() {
        let huge = "9".repeat(60);
        assert_eq!(parse_decimal(&huge, NANOS_PER_SEC), Some(Duration::MAX));
        assert_eq!(
            parse_decimal(&format!("1.{huge}"), NANOS_PER_SEC),
            Some(Duration::from_nanos(1_999_999_999))
        );
        assert_eq!(
            parse_decimal("18446744073709551615", NANOS_PER_SEC),
            Some(Duration::from_secs(u64::MAX))
        );
        assert_eq!(
            parse_decimal("18446744073709551616", NANOS_PER_SEC),
            Some(Duration::MAX)
        );
    }

    #[test]
    fn decimal_round_trips_integers_and_millis() {
        // Property: for every n, "n" ms and "n/1000 . n%1000" s denote the same duration.
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..10_000 {
            let n = rng.u64(0..10_000_000_000);
            assert_eq!(parse_decimal(&n.to_string(), NANOS_PER_MILLI), Some(ms(n)));
            let secs = format!("{}.{:03}", n / 1000, n % 1000);
            assert_eq!(parse_decimal(&secs, NANOS_PER_SEC), Some(ms(n)), "{secs}");
            assert_eq!(parse_reset(&format!("{secs}s")), Some(ms(n)));
            assert_eq!(parse_reset(&format!("{n}ms")), Some(ms(n)));
        }
    }

    #[test]
    fn reset_table() {
        let cases: &[(&str, Option<Duration>)] = &[
            ("6", Some(Duration::from_secs(6))),
            ("6s", Some(Duration::from_secs(6))),
            ("1.5s", Some(ms(1500))),
            ("1.5", Some(ms(1500))),
            ("250ms", Some(ms(250))),
            ("1m30s", Some(Duration::from_secs(90))),
            ("1m", Some(Duration::from_secs(60))),
            ("2h", Some(Duration::from_secs(7200))),
            ("1h2m3s4ms", Some(Duration::from_millis(3_723_004))),
            ("0s", Some(Duration::ZERO)),
            (" 6s ", Some(Duration::from_secs(6))),
            ("", None),
            ("-1", None),
            ("-1s", None),
            ("s", None),
            ("6x", None),
            ("6 s", None),
            ("1m30", None),
            ("ms", None),
            ("6sec", None),
            ("6S", None),
        ];
        for (input, expected) in cases {
            assert_eq!(parse_reset(input), *expected, "input {input:?}");
        }
    }

    #[test]
    fn retry_after_seconds_and_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let in_90s = httpdate::fmt_http_date(now + Duration::from_secs(90));
        let ago_90s = httpdate::fmt_http_date(now - Duration::from_secs(90));
        assert_eq!(parse_retry_after("6", now), Some(Duration::from_secs(6)));
        assert_eq!(parse_retry_after("0.25", now), Some(ms(250)));
        assert_eq!(
            parse_retry_after(&in_90s, now),
            Some(Duration::from_secs(90))
        );
        assert_eq!(parse_retry_after(&ago_90s, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("-1", now), None);
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("6s", now), None);
    }

    #[test]
    fn header_precedence() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let all = [
            ("retry-after-ms", "1500"),
            ("x-ms-retry-after-ms", "2500"),
            ("retry-after", "3"),
            ("x-ratelimit-reset-requests", "4s"),
            ("x-ratelimit-reset-tokens", "5s"),
        ];
        // Removing the winning header each time exposes the next one in order.
        for (skip, expected) in [(0, 1500), (1, 2500), (2, 3000), (3, 4000), (4, 5000)] {
            let present: Vec<_> = all[skip..].to_vec();
            assert_eq!(hint(&present, now), Some(ms(expected)), "from {skip}");
        }
        assert_eq!(hint(&[], now), None);
    }

    #[test]
    fn unknown_values_fall_through() {
        let now = SystemTime::UNIX_EPOCH;
        let headers = [
            ("retry-after-ms", "-1"),
            ("x-ms-retry-after-ms", ""),
            ("retry-after", "later"),
            ("x-ratelimit-reset-requests", "-1"),
            ("x-ratelimit-reset-tokens", "1m30s"),
        ];
        assert_eq!(hint(&headers, now), Some(Duration::from_secs(90)));

        let nothing_usable = [("retry-after-ms", "-1"), ("x-ratelimit-reset-tokens", "-1")];
        assert_eq!(hint(&nothing_usable, now), None);
    }

    #[test]
    fn zero_is_a_usable_hint() {
        let headers = [("retry-after-ms", "0"), ("retry-after", "10")];
        assert_eq!(hint(&headers, SystemTime::UNIX_EPOCH), Some(Duration::ZERO));
    }

    #[test]
    fn decimal_milliseconds_header() {
        let headers = [("x-ms-retry-after-ms", "12.5")];
        assert_eq!(
            hint(&headers, SystemTime::UNIX_EPOCH),
            Some(Duration::from_micros(12_500))
        );
    }

    #[test]
    fn remaining_table() {
        let cases: &[(&str, Option<u64>)] = &[
            ("0", Some(0)),
            ("50", Some(50)),
            (" 120000 ", Some(120_000)),
            ("99999999999999999999999", Some(u64::MAX)),
            ("-1", None),
            ("-5", None),
            ("", None),
            ("12.0", None),
            ("+3", None),
            ("lots", None),
        ];
        for (input, expected) in cases {
            assert_eq!(parse_remaining(input), *expected, "input {input:?}");
        }
    }
}
