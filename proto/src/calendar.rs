//! UTC calendar arithmetic on unix seconds, proleptic Gregorian, without a time-zone database.
//!
//! The day/civil-date conversions are Howard Hinnant's `days_from_civil` / `civil_from_days`
//! algorithms (exact for every `i64` day count whose year fits `i64`). Day of year is
//! **0-based** (1 January = 0, 31 December = 364 or 365), as in AtmoRep's token info.

/// Seconds in a UTC day (no leap seconds, as in unix time).
pub const SECONDS_PER_DAY: i64 = 86_400;

/// Whether `year` is a leap year of the proleptic Gregorian calendar.
pub const fn is_leap_year(year: i64) -> bool {
    (year % 4 == 0 && year % 100 != 0) || year % 400 == 0
}

/// Days since 1970-01-01 of the civil date `year-month-day` (`month` 1…12, `day` 1…31; other
/// values are extrapolated linearly and not checked).
pub const fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let m = month as i64;
    let d = day as i64;
    let y = if m <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400; // [0, 399]
    let mp = if m > 2 { m - 3 } else { m + 9 }; // March = 0
    let doy = (153 * mp + 2) / 5 + d - 1; // [0, 365]
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy; // [0, 146096]
    era * 146_097 + doe - 719_468
}

/// The civil date `(year, month 1…12, day 1…31)` of `days` since 1970-01-01.
pub const fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097; // [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365], March 1 = 0
    let mp = (5 * doy + 2) / 153; // [0, 11]
    let day = doy - (153 * mp + 2) / 5 + 1; // [1, 31]
    let month = if mp < 10 { mp + 3 } else { mp - 9 }; // [1, 12]
    let year = yoe + era * 400 + if month <= 2 { 1 } else { 0 };
    (year, month as u32, day as u32)
}

/// A UTC instant broken down into calendar fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct UtcDateTime {
    pub year: i64,
    /// 1…12.
    pub month: u32,
    /// 1…31.
    pub day: u32,
    /// 0-based: 1 January = 0.
    pub day_of_year: u32,
    /// 0…23.
    pub hour: u32,
    /// 0…59.
    pub minute: u32,
    /// 0…59.
    pub second: u32,
}

impl UtcDateTime {
    /// Breaks unix seconds (UTC, negative before 1970) into calendar fields.
    pub const fn from_unix_seconds(secs: i64) -> Self {
        let days = secs.div_euclid(SECONDS_PER_DAY);
        let sod = secs.rem_euclid(SECONDS_PER_DAY); // [0, 86399]
        let (year, month, day) = civil_from_days(days);
        let day_of_year = (days - days_from_civil(year, 1, 1)) as u32;
        Self {
            year,
            month,
            day,
            day_of_year,
            hour: (sod / 3600) as u32,
            minute: (sod % 3600 / 60) as u32,
            second: (sod % 60) as u32,
        }
    }

    /// Unix seconds of this instant (the inverse of [`Self::from_unix_seconds`]; `day_of_year`
    /// is ignored, the date comes from year, month and day).
    pub const fn to_unix_seconds(&self) -> i64 {
        days_from_civil(self.year, self.month, self.day) * SECONDS_PER_DAY
            + self.hour as i64 * 3600
            + self.minute as i64 * 60
            + self.second as i64
    }

    /// Hour of day with minutes and seconds as the fraction (09:30:00 → 9.5).
    pub fn fractional_hour(&self) -> f64 {
        f64::from(self.hour) + f64::from(self.minute) / 60.0 + f64::from(self.second) / 3600.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (unix seconds, year, month, day, 0-based day of year, hour), from Python's `datetime`.
    const KNOWN: [(i64, i64, u32, u32, u32, u32); 10] = [
        (0, 1970, 1, 1, 0, 0),
        (-1, 1969, 12, 31, 364, 23),
        (-946_771_200, 1940, 1, 1, 0, 0),
        (-941_565_600, 1940, 3, 1, 60, 6),
        (-915_152_400, 1940, 12, 31, 365, 23),
        (951_825_600, 2000, 2, 29, 59, 12),
        (1_609_455_600, 2020, 12, 31, 365, 23),
        (1_640_973_600, 2021, 12, 31, 364, 18),
        (-2_203_891_200, 1900, 3, 1, 59, 0),
        (1_721_035_800, 2024, 7, 15, 196, 9),
    ];

    #[test]
    fn known_timestamps() {
        for (secs, year, month, day, doy, hour) in KNOWN {
            let t = UtcDateTime::from_unix_seconds(secs);
            assert_eq!(
                (t.year, t.month, t.day, t.day_of_year, t.hour),
                (year, month, day, doy, hour),
                "{secs}"
            );
            assert_eq!(t.to_unix_seconds(), secs);
        }
        let t = UtcDateTime::from_unix_seconds(1_721_035_800);
        assert_eq!((t.minute, t.second), (30, 0));
        assert_eq!(t.fractional_hour(), 9.5);
        let t = UtcDateTime::from_unix_seconds(-1);
        assert_eq!((t.minute, t.second), (59, 59));
    }

    #[test]
    fn leap_years() {
        assert!(is_leap_year(1940));
        assert!(is_leap_year(2000));
        assert!(is_leap_year(2024));
        assert!(!is_leap_year(1900));
        assert!(!is_leap_year(2021));
        assert!(!is_leap_year(2100));
        for year in [1900, 1940, 1941, 2000, 2020, 2021, 2100] {
            let len = days_from_civil(year + 1, 1, 1) - days_from_civil(year, 1, 1);
            assert_eq!(len, if is_leap_year(year) { 366 } else { 365 }, "{year}");
        }
    }

    #[test]
    fn days_round_trip_and_step_by_one() {
        let mut prev = civil_from_days(-800_000);
        for days in -800_000..800_000_i64 {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
            if days > -800_000 {
                let next_day = (prev.0, prev.1, prev.2 + 1);
                let next_month = (prev.0, prev.1 + 1, 1);
                let next_year = (prev.0 + 1, 1, 1);
                assert!(
                    (y, m, d) == next_day || (y, m, d) == next_month || (y, m, d) == next_year,
                    "{prev:?} -> {:?}",
                    (y, m, d)
                );
            }
            prev = (y, m, d);
        }
    }
}
