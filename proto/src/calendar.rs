//! UTC calendar arithmetic on unix seconds, proleptic Gregorian, without a time-zone database,
//! and the one way atmorep-rs reads and writes instants as text ([`parse_iso`], [`format_time`]).
//!
//! The day/civil-date conversions are Howard Hinnant's `days_from_civil` / `civil_from_days`
//! algorithms (exact for every `i64` day count whose year fits `i64`). Day of year is
//! **0-based** (1 January = 0, 31 December = 364 or 365), as in AtmoRep's token info.

/// Seconds in a UTC day (no leap seconds, as in unix time).
pub const SECONDS_PER_DAY: i64 = 86_400;

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

/// How [`format_time`] writes an instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TimeFormat {
    /// `2020-09-01T06:00:00Z`: ISO 8601 / RFC 3339 in UTC, as the loader announces times.
    Iso,
    /// `2020-09-01 06:00:00`: IBTrACS' `ISO_TIME`, as track files and messages spell it.
    Spaced,
    /// `2020-09-01 06:00`: to the minute, for titles and labels.
    Minutes,
}

/// Unix seconds as text in `format` (UTC).
pub fn format_time(unix: i64, format: TimeFormat) -> String {
    let t = UtcDateTime::from_unix_seconds(unix);
    let date = format!("{:04}-{:02}-{:02}", t.year, t.month, t.day);
    match format {
        TimeFormat::Iso => format!("{date}T{:02}:{:02}:{:02}Z", t.hour, t.minute, t.second),
        TimeFormat::Spaced => format!("{date} {:02}:{:02}:{:02}", t.hour, t.minute, t.second),
        TimeFormat::Minutes => format!("{date} {:02}:{:02}", t.hour, t.minute),
    }
}

/// Text that [`parse_iso`] does not read as a UTC instant.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not an ISO 8601 time such as 2021-06-01T06:00:00Z")]
pub struct TimeParseError(pub String);

/// The years [`parse_iso`] accepts (those of `chrono`, which wrote and read the loader's times),
/// so that no day count can overflow.
const MAX_YEAR: i64 = 262_143;

/// Parses an ISO 8601 instant to unix seconds: a date `YYYY-MM-DD` (month and day of one or two
/// digits, the year with an optional sign), optionally followed by `T`, `t` or spaces and a
/// clock `HH[:MM[:SS[.fraction]]]`, then optionally `Z` or an offset `±HH:MM` (UTC when none).
/// Surrounding whitespace is ignored, an empty clock field reads as 0, fractions of a second are
/// dropped and a leap second `:60` reads as `:59`. Dates that do not exist (2021-02-30) are
/// errors.
pub fn parse_iso(text: &str) -> Result<i64, TimeParseError> {
    let s = text.trim();
    parse_trimmed(s).ok_or_else(|| TimeParseError(s.to_string()))
}

fn parse_trimmed(s: &str) -> Option<i64> {
    let zulu = s.trim_end_matches(['Z', 'z']);
    let (s, zulu) = (zulu.trim_end(), zulu.len() < s.len());
    // The year may carry a sign, so the date ends at the first separator after its first byte.
    let date_end = s
        .char_indices()
        .skip(1)
        .find(|&(_, c)| c == 'T' || c == 't' || c.is_whitespace())
        .map_or(s.len(), |(k, _)| k);
    let (date, rest) = s.split_at(date_end);
    let (year, month, day) = parse_date(date)?;
    let mut rest = rest.chars();
    rest.next();
    let mut clock = rest.as_str().trim();
    let mut offset = 0;
    if !zulu && let Some((head, seconds)) = split_offset(clock) {
        clock = head.trim_end();
        offset = seconds;
    }
    let mut parts = clock.split(':');
    let mut part = |max: u32| -> Option<u32> {
        match parts.next() {
            None | Some("") => Some(0),
            Some(p) => digits(p).filter(|v| *v <= max),
        }
    };
    let (hour, minute) = (part(23)?, part(59)?);
    let second = match parts.next() {
        None | Some("") => 0,
        Some(p) => {
            // Fractions are dropped: unix seconds are whole (`chrono`'s `timestamp` floors).
            let whole = match p.split_once('.') {
                Some((whole, fraction))
                    if !fraction.is_empty() && fraction.bytes().all(|b| b.is_ascii_digit()) =>
                {
                    whole
                }
                Some(_) => return None,
                None => p,
            };
            digits(whole).filter(|v| *v <= 60)?.min(59)
        }
    };
    if parts.next().is_some() {
        return None;
    }
    let t = UtcDateTime {
        year,
        month,
        day,
        day_of_year: 0,
        hour,
        minute,
        second,
    };
    let unix = t.to_unix_seconds();
    // Rejects 2021-02-30 and the like, which the day count would silently roll over.
    let back = UtcDateTime::from_unix_seconds(unix);
    (back.month == month && back.day == day).then_some(unix - offset)
}

/// `(year, month, day)` of `YYYY-MM-DD`.
fn parse_date(date: &str) -> Option<(i64, u32, u32)> {
    let (negative, unsigned) = match date.as_bytes().first()? {
        b'-' => (true, &date[1..]),
        b'+' => (false, &date[1..]),
        _ => (false, date),
    };
    let mut fields = unsigned.split('-');
    let year = i64::from(digits(fields.next()?)?);
    let month = digits(fields.next()?)?;
    let day = digits(fields.next()?)?;
    let valid = fields.next().is_none()
        && year <= MAX_YEAR
        && (1..=12).contains(&month)
        && (1..=31).contains(&day);
    valid.then_some((if negative { -year } else { year }, month, day))
}

/// The clock before a trailing offset `±HH:MM` (also with U+2212 as the minus sign), and the
/// offset in seconds east of UTC.
fn split_offset(clock: &str) -> Option<(&str, i64)> {
    let k = clock.rfind(['+', '-', '\u{2212}'])?;
    let (head, zone) = clock.split_at(k);
    let sign = if zone.starts_with('+') { 1 } else { -1 };
    let (hours, minutes) = zone[zone.chars().next()?.len_utf8()..].split_once(':')?;
    let valid = hours.len() == 2 && minutes.len() == 2;
    let (hours, minutes) = (digits(hours)?, digits(minutes)?);
    (valid && hours <= 23 && minutes <= 59)
        .then(|| (head, sign * i64::from(hours * 3600 + minutes * 60)))
}

/// A field of ASCII digits (no sign, no spaces), at most nine of them so that it fits.
fn digits(field: &str) -> Option<u32> {
    let ok = !field.is_empty() && field.len() <= 9 && field.bytes().all(|b| b.is_ascii_digit());
    ok.then(|| field.parse().ok()).flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether `year` is a leap year of the proleptic Gregorian calendar.
    const fn is_leap_year(year: i64) -> bool {
        (year % 4 == 0 && year % 100 != 0) || year % 400 == 0
    }

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

    #[test]
    fn iso_round_trip() {
        let t = 1_598_918_400 + 6 * 3600;
        assert_eq!(format_time(t, TimeFormat::Spaced), "2020-09-01 06:00:00");
        assert_eq!(format_time(t, TimeFormat::Iso), "2020-09-01T06:00:00Z");
        assert_eq!(format_time(t + 59, TimeFormat::Minutes), "2020-09-01 06:00");
        assert_eq!(format_time(-1, TimeFormat::Iso), "1969-12-31T23:59:59Z");
        assert_eq!(parse_iso("2020-09-01 06:00:00"), Ok(t));
        assert_eq!(parse_iso("2020-09-01T06:00:00Z"), Ok(t));
        assert_eq!(parse_iso("2020-09-01 06:00"), Ok(t));
        assert_eq!(parse_iso("2020-09-01"), Ok(1_598_918_400));
        assert!(parse_iso("2021-02-30 00:00:00").is_err());
        assert!(parse_iso("2020-09-01 25:00:00").is_err());
        assert!(parse_iso("yesterday").is_err());
        assert!(parse_iso("").is_err());
        for unix in [t, 0, -1, 951_825_600, -2_203_891_200] {
            for format in [TimeFormat::Iso, TimeFormat::Spaced] {
                assert_eq!(parse_iso(&format_time(unix, format)), Ok(unix));
            }
        }
    }

    /// Every form the loader's request times, the tracker's track files and the command line
    /// have accepted reads as the same instant.
    #[test]
    fn accepted_forms() {
        let t = 1_622_527_200; // 2021-06-01T06:00:00Z
        let day = 1_622_505_600; // 2021-06-01T00:00:00Z
        for text in [
            "2021-06-01T06:00:00Z",
            "2021-06-01t06:00:00z",
            "2021-06-01T06:00:00",
            "2021-06-01T06:00",
            "2021-06-01T06:00Z",
            "2021-06-01 06:00:00",
            "2021-06-01 06:00",
            "2021-06-01   06:00",
            "2021-06-01 06",
            "2021-06-01 06:00 Z",
            " 2021-06-01T06:00:00Z\n",
            "2021-06-01T06:00:00.75Z",
            "2021-06-01T06:00:00.123456789123Z",
            "2021-06-01T06:00:00ZZ",
            "2021-06-01T08:00:00+02:00",
            "2021-06-01T04:30:00-01:30",
            "2021-06-01T04:30:00\u{2212}01:30",
            "2021-06-01T08:00+02:00",
            "2021-6-1T6:0:0Z",
            "+2021-06-01T06:00:00Z",
        ] {
            assert_eq!(parse_iso(text), Ok(t), "{text:?}");
        }
        for text in [
            "2021-06-01",
            "2021-06-01Z",
            "2021-06-01T",
            "2021-06-01 00:00:00+00:00",
        ] {
            assert_eq!(parse_iso(text), Ok(day), "{text:?}");
        }
        // A leap second is the second before it, as `chrono` reads it.
        assert_eq!(parse_iso("2016-12-31T23:59:60Z"), Ok(1_483_228_799));
        assert_eq!(
            parse_iso("-0001-03-01"),
            Ok(days_from_civil(-1, 3, 1) * SECONDS_PER_DAY)
        );
        assert_eq!(parse_iso("1900-03-01"), Ok(-2_203_891_200));
    }

    #[test]
    fn rejected_forms_name_the_text() {
        for text in [
            "2021-06-01T06:00:00+2",
            "2021-06-01T06:00:00+24:00",
            "2021-06-01T06:00:00.Z",
            "2021-06-01T06:00:00:00",
            "2021-06-01T06:60",
            "2021-13-01",
            "2021-00-01",
            "2021-06-00",
            "2021-06",
            "2021-06-01-02",
            "2021-06-01 six",
            "2021-06-01\u{3000}06:00x",
            "999999999-01-01",
            "Z",
            "-",
            "T06:00",
        ] {
            assert!(parse_iso(text).is_err(), "{text:?}");
        }
        let e = parse_iso(" soon ").unwrap_err();
        assert_eq!(
            e.to_string(),
            "`soon` is not an ISO 8601 time such as 2021-06-01T06:00:00Z"
        );
    }
}
