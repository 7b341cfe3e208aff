//! Fixed windows in UTC: the minute, and the calendar period of a quota.
//!
//! Indices count whole windows since the Unix epoch, so they only grow:
//!
//! | window | index | starts |
//! |---|---|---|
//! | minute | `unix_seconds / 60` | every minute |
//! | [`QuotaPeriod::Hourly`] | hours since 1970-01-01 | every hour at :00 |
//! | [`QuotaPeriod::Daily`] | days since 1970-01-01 | 00:00 UTC |
//! | [`QuotaPeriod::Weekly`] | ISO weeks since Monday 1969-12-29 | Monday 00:00 UTC |
//! | [`QuotaPeriod::Monthly`] | months since January 1970 | the 1st, 00:00 UTC |
//!
//! At any instant after 1970-01-05 the current indices are strictly ordered (months < weeks < days
//! < hours), so they never coincide. The stores rely on this: a quota counter is keyed by its period
//! index alone (a [`Reservation`](super::Reservation) records no period kind), so changing a
//! consumer's quota period starts a fresh counter instead of reusing another period's.
//!
//! The Redis store computes the same windows in Lua from the Redis server's clock; its tests check
//! that both agree.
//!
//! ```
//! use gateway_core::limits::{QuotaPeriod, minute_bounds, period_bounds};
//!
//! // 2024-02-29T12:34:56Z, a Thursday in a leap year.
//! let t = 1_709_210_096;
//! assert_eq!(minute_bounds(t), (28_486_834, 1_709_210_040, 1_709_210_100));
//! let (_, start, end) = period_bounds(QuotaPeriod::Monthly, t);
//! assert_eq!((start, end), (1_706_745_600, 1_709_251_200)); // Feb 1 .. Mar 1
//! let (_, start, _) = period_bounds(QuotaPeriod::Weekly, t);
//! assert_eq!(start, 1_708_905_600); // Monday 2024-02-26
//! ```

use super::QuotaPeriod;

const MINUTE: u64 = 60;
const HOUR: u64 = 3_600;
const DAY: u64 = 86_400;
const WEEK: u64 = 7 * DAY;
/// 1970-01-01 was a Thursday: the ISO week containing it began 3 days earlier.
const EPOCH_WEEKDAY_OFFSET: u64 = 3;

/// The minute window containing `unix_seconds`: `(index, start_secs, end_secs)`.
pub fn minute_bounds(unix_seconds: u64) -> (u64, u64, u64) {
    let i = unix_seconds / MINUTE;
    (i, i * MINUTE, i * MINUTE + MINUTE)
}

/// The quota period containing `unix_seconds`: `(index, start_secs, end_secs)`, with `end`
/// exclusive. See the module docs for what the index counts. (The first ISO week began before the
/// epoch; its start saturates at 0.)
pub fn period_bounds(period: QuotaPeriod, unix_seconds: u64) -> (i64, u64, u64) {
    let fixed = |len: u64| {
        let i = unix_seconds / len;
        (to_index(i), i * len, i * len + len)
    };
    match period {
        QuotaPeriod::Hourly => fixed(HOUR),
        QuotaPeriod::Daily => fixed(DAY),
        QuotaPeriod::Weekly => {
            let days = unix_seconds / DAY + EPOCH_WEEKDAY_OFFSET;
            let week = days / 7;
            let start = (week * 7).saturating_sub(EPOCH_WEEKDAY_OFFSET) * DAY;
            let end = (week * 7 + 7 - EPOCH_WEEKDAY_OFFSET) * DAY;
            debug_assert!(end - start <= WEEK);
            (to_index(week), start, end)
        }
        QuotaPeriod::Monthly => {
            let days = to_index(unix_seconds / DAY);
            let (year, month, _) = civil_from_days(days);
            let index = (year - 1970) * 12 + (month - 1);
            let (next_year, next_month) = if month == 12 {
                (year + 1, 1)
            } else {
                (year, month + 1)
            };
            let start = days_from_civil(year, month, 1);
            let end = days_from_civil(next_year, next_month, 1);
            (index, to_secs(start), to_secs(end))
        }
    }
}

fn to_index(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn to_secs(days: i64) -> u64 {
    u64::try_from(days).unwrap_or(0).saturating_mul(DAY)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's `days_from_civil`).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400; // [0, 399]
    let mp = (month + 9) % 12; // March = 0
    let doy = (153 * mp + 2) / 5 + day - 1; // [0, 365]
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy; // [0, 146096]
    era * 146_097 + doe - 719_468
}

/// The date `(year, month 1..=12, day 1..=31)` of a day count since 1970-01-01 (`civil_from_days`).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097; // [0, 146096]
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365]
    let mp = (5 * doy + 2) / 153; // [0, 11], March = 0
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [QuotaPeriod; 4] = [
        QuotaPeriod::Hourly,
        QuotaPeriod::Daily,
        QuotaPeriod::Weekly,
        QuotaPeriod::Monthly,
    ];

    fn is_leap(y: i64) -> bool {
        (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
    }

    fn month_len(y: i64, m: i64) -> i64 {
        match m {
            2 if is_leap(y) => 29,
            2 => 28,
            4 | 6 | 9 | 11 => 30,
            _ => 31,
        }
    }

    #[test]
    fn civil_round_trips_day_by_day_from_1970_to_2400() {
        // Walk the calendar one day at a time: every date follows the previous one.
        let (mut y, mut m, mut d) = (1970, 1, 1);
        for days in 0..days_from_civil(2400, 1, 1) {
            assert_eq!(civil_from_days(days), (y, m, d), "day {days}");
            assert_eq!(days_from_civil(y, m, d), days);
            d += 1;
            if d > month_len(y, m) {
                d = 1;
                m += 1;
                if m > 12 {
                    m = 1;
                    y += 1;
                }
            }
        }
    }

    #[test]
    fn known_dates() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
    }

    #[test]
    fn months_cover_leap_years_and_year_ends() {
        let cases = [
            // (year, month, days in month)
            (2023, 2, 28),
            (2024, 2, 29),
            (1900 + 200, 2, 28), // 2100 is not a leap year
            (2000, 2, 29),       // 2000 is
            (2023, 12, 31),
            (2024, 1, 31),
            (2024, 4, 30),
        ];
        for (y, m, len) in cases {
            let start = to_secs(days_from_civil(y, m, 1));
            let (index, s, e) = period_bounds(QuotaPeriod::Monthly, start);
            assert_eq!(index, (y - 1970) * 12 + m - 1);
            assert_eq!((s, e), (start, start + len as u64 * DAY), "{y}-{m}");
            // The last second of the month is still in it; the next one is not.
            assert_eq!(period_bounds(QuotaPeriod::Monthly, e - 1), (index, s, e));
            assert_eq!(period_bounds(QuotaPeriod::Monthly, e).0, index + 1);
        }
        // New Year 2024 00:00:00 UTC.
        let ny = 1_704_067_200;
        assert_eq!(period_bounds(QuotaPeriod::Monthly, ny - 1).1, 1_701_388_800); // Dec 1
        assert_eq!(period_bounds(QuotaPeriod::Monthly, ny).1, ny);
    }

    #[test]
    fn weeks_start_on_monday() {
        // 1970-01-01 (Thursday) is in the week of Monday 1969-12-29, which saturates to 0.
        assert_eq!(period_bounds(QuotaPeriod::Weekly, 0), (0, 0, 4 * DAY));
        // Monday 1970-01-05 starts week 1.
        assert_eq!(
            period_bounds(QuotaPeriod::Weekly, 4 * DAY),
            (1, 4 * DAY, 11 * DAY)
        );
        // Monday 2024-01-01 00:00 UTC, and the Sunday second before it.
        let monday = 1_704_067_200;
        let (i, s, e) = period_bounds(QuotaPeriod::Weekly, monday);
        assert_eq!((s, e), (monday, monday + WEEK));
        assert_eq!(period_bounds(QuotaPeriod::Weekly, monday - 1).0, i - 1);
        assert_eq!(period_bounds(QuotaPeriod::Weekly, monday + WEEK - 1).0, i);
    }

    #[test]
    fn every_period_contains_its_instant_and_tiles_time() {
        // Property-style: pseudo-random instants from 1970 to ~2200, fixed seed.
        let mut rng = fastrand::Rng::with_seed(0x5eed);
        for _ in 0..200_000 {
            let t = rng.u64(0..7_258_118_400);
            let (mi, ms, me) = minute_bounds(t);
            assert!(ms <= t && t < me && me - ms == MINUTE && mi == ms / MINUTE);
            for period in ALL {
                let (i, s, e) = period_bounds(period, t);
                assert!(s <= t && t < e, "{period:?} {t}: {s}..{e}");
                // The next period starts where this one ends, with the next index.
                let (ni, ns, _) = period_bounds(period, e);
                assert_eq!((ni, ns), (i + 1, e), "{period:?} {t}");
                // The instant before the start is in the previous period.
                if s > 0 {
                    assert_eq!(period_bounds(period, s - 1).0, i - 1, "{period:?} {t}");
                }
                match period {
                    QuotaPeriod::Hourly => assert_eq!(e - s, HOUR),
                    QuotaPeriod::Daily => assert_eq!(e - s, DAY),
                    QuotaPeriod::Weekly if s > 0 => {
                        assert_eq!(e - s, WEEK);
                        // Monday: (days since epoch + 3) % 7 == 0.
                        assert_eq!((s / DAY + EPOCH_WEEKDAY_OFFSET) % 7, 0);
                    }
                    QuotaPeriod::Weekly => {}
                    QuotaPeriod::Monthly => {
                        let (y, m, d) = civil_from_days(to_index(s / DAY));
                        assert_eq!(d, 1);
                        assert_eq!((e - s) / DAY, month_len(y, m) as u64);
                    }
                }
            }
        }
    }

    #[test]
    fn current_period_indices_never_coincide() {
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..100_000 {
            let t = rng.u64(4 * DAY..7_258_118_400);
            let [h, d, w, m] = ALL.map(|p| period_bounds(p, t).0);
            assert!(m < w && w < d && d < h, "{t}: {m} {w} {d} {h}");
        }
    }
}
