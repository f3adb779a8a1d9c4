//! CF-convention time decoding: `units: "<unit> since <reference>"` with a `calendar`, values
//! integer or float, turned into UTC seconds since the Unix epoch.

use chrono::{DateTime, NaiveDate, NaiveDateTime, NaiveTime, TimeZone, Utc};

/// ERA5's CF time encoding, which the stores this crate writes use.
pub const TIME_UNITS: &str = "hours since 1900-01-01 00:00:00";

/// A parsed CF time encoding.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CfTimeUnits {
    /// Seconds per unit step.
    pub seconds_per_unit: f64,
    /// The reference instant as seconds since the Unix epoch.
    pub reference_unix: i64,
}

/// Why a CF time encoding could not be understood.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CfTimeError {
    #[error("units `{0}` are not of the form `<unit> since <date>`")]
    Malformed(String),
    #[error(
        "unknown time unit `{0}` (expected nanoseconds, microseconds, milliseconds, seconds, minutes, hours or days)"
    )]
    UnknownUnit(String),
    #[error("cannot parse reference date `{0}`")]
    BadReference(String),
    #[error("calendar `{0}` is not supported (standard, gregorian and proleptic_gregorian are)")]
    UnsupportedCalendar(String),
    #[error(
        "calendar `standard` with a reference before 1582-10-15 mixes Julian and Gregorian dates"
    )]
    MixedCalendar,
    #[error("time value {0} is not finite")]
    NotFinite(f64),
    #[error("time value {0} is outside the representable range of instants")]
    OutOfRange(f64),
}

impl CfTimeUnits {
    /// Parses `units` (e.g. `"hours since 1900-01-01 00:00:00.0"`) under `calendar`
    /// (`None` means `standard`).
    pub fn parse(units: &str, calendar: Option<&str>) -> Result<Self, CfTimeError> {
        let calendar = calendar.unwrap_or("standard").trim().to_ascii_lowercase();
        let (unit, reference) = units
            .split_once(" since ")
            .ok_or_else(|| CfTimeError::Malformed(units.to_string()))?;
        let seconds_per_unit = match unit.trim().to_ascii_lowercase().as_str() {
            // numpy's datetime64 encodings as xarray writes them (`nanoseconds since …`), and
            // the finer units pandas uses.
            "nanoseconds" | "nanosecond" | "nsecs" | "nsec" | "ns" => 1e-9,
            "microseconds" | "microsecond" | "usecs" | "usec" | "us" | "µs" => 1e-6,
            "milliseconds" | "millisecond" | "msecs" | "msec" | "ms" => 1e-3,
            "seconds" | "second" | "secs" | "sec" | "s" => 1.0,
            "minutes" | "minute" | "mins" | "min" => 60.0,
            "hours" | "hour" | "hrs" | "hr" | "h" => 3600.0,
            "days" | "day" | "d" => 86400.0,
            other => return Err(CfTimeError::UnknownUnit(other.to_string())),
        };
        let reference = parse_reference(reference.trim())?;
        match calendar.as_str() {
            "proleptic_gregorian" => {}
            "standard" | "gregorian" => {
                let switch = NaiveDate::from_ymd_opt(1582, 10, 15).expect("valid date");
                if reference.date_naive() < switch {
                    return Err(CfTimeError::MixedCalendar);
                }
            }
            other => return Err(CfTimeError::UnsupportedCalendar(other.to_string())),
        }
        Ok(Self {
            seconds_per_unit,
            reference_unix: reference.timestamp(),
        })
    }

    /// Decodes one value to seconds since the Unix epoch, rounded to the nearest second.
    pub fn decode(&self, value: f64) -> Result<i64, CfTimeError> {
        if !value.is_finite() {
            return Err(CfTimeError::NotFinite(value));
        }
        // `as` saturates; a sum past i64 is no instant either (and overflowed before).
        let offset = (value * self.seconds_per_unit).round();
        if offset.abs() >= i64::MAX as f64 {
            return Err(CfTimeError::OutOfRange(value));
        }
        self.reference_unix
            .checked_add(offset as i64)
            .ok_or(CfTimeError::OutOfRange(value))
    }

    /// Encodes seconds since the Unix epoch as a value in these units.
    pub fn encode(&self, unix: i64) -> f64 {
        // In i128: the difference of two i64 instants can exceed i64.
        (i128::from(unix) - i128::from(self.reference_unix)) as f64 / self.seconds_per_unit
    }
}

fn parse_reference(text: &str) -> Result<DateTime<Utc>, CfTimeError> {
    let bad = || CfTimeError::BadReference(text.to_string());
    // Offsets such as "+00:00" or a trailing "Z"/"UTC"; only UTC offsets occur in reanalysis.
    let mut body = text.trim();
    let mut offset_seconds = 0i64;
    for suffix in ["UTC", "utc", "Z", "z"] {
        if let Some(stripped) = body.strip_suffix(suffix) {
            body = stripped.trim_end();
        }
    }
    if let Some(pos) = body.rfind(['+', '-']).filter(|&p| p > 10) {
        let (main, offset) = body.split_at(pos);
        let sign = if offset.starts_with('-') { -1 } else { 1 };
        let digits: Vec<i64> = offset[1..]
            .split(':')
            .map(|s| s.trim().parse::<i64>())
            .collect::<Result<_, _>>()
            .map_err(|_| bad())?;
        let (h, m) = match digits.as_slice() {
            [h] if *h >= 100 => (h / 100, h % 100),
            [h] => (*h, 0),
            [h, m] => (*h, *m),
            _ => return Err(bad()),
        };
        // Real UTC offsets are within ±14 h; anything past a day is not an offset (and huge
        // ones overflowed the seconds below).
        if !(0..24).contains(&h) || !(0..60).contains(&m) {
            return Err(bad());
        }
        offset_seconds = sign * (h * 3600 + m * 60);
        body = main.trim_end();
    }
    let (date_part, time_part) = match body.split_once(['T', ' ']) {
        Some((d, t)) => (d, t.trim()),
        None => (body, ""),
    };
    let mut ymd = date_part.split('-');
    let (Some(y), Some(m), Some(d), None) = (ymd.next(), ymd.next(), ymd.next(), ymd.next()) else {
        return Err(bad());
    };
    let date = NaiveDate::from_ymd_opt(
        y.parse().map_err(|_| bad())?,
        m.parse().map_err(|_| bad())?,
        d.parse().map_err(|_| bad())?,
    )
    .ok_or_else(bad)?;
    let time = if time_part.is_empty() {
        NaiveTime::MIN
    } else {
        let mut hms = time_part.split(':');
        let h: u32 = hms.next().unwrap_or("0").parse().map_err(|_| bad())?;
        let m: u32 = hms.next().unwrap_or("0").parse().map_err(|_| bad())?;
        let s: f64 = hms.next().unwrap_or("0").parse().map_err(|_| bad())?;
        NaiveTime::from_hms_opt(h, m, s.trunc() as u32).ok_or_else(bad)?
    };
    let naive = NaiveDateTime::new(date, time);
    // Checked: at the ends of chrono's range of dates, the offset leaves it.
    Utc.from_utc_datetime(&naive)
        .checked_sub_signed(chrono::TimeDelta::seconds(offset_seconds))
        .ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unix(s: &str) -> i64 {
        DateTime::parse_from_rfc3339(s).unwrap().timestamp()
    }

    #[test]
    fn era5_hours_since_1900() {
        let u = CfTimeUnits::parse("hours since 1900-01-01 00:00:00.0", Some("gregorian")).unwrap();
        // 2020-01-01T00 is 1,051,896 hours after 1900-01-01 (ARCO-ERA5's first 2020 step).
        assert_eq!(u.decode(1_051_896.0).unwrap(), unix("2020-01-01T00:00:00Z"));
        assert_eq!(u.encode(unix("2020-01-01T06:00:00Z")), 1_051_902.0);
    }

    #[test]
    fn seconds_and_days_with_offsets() {
        let s = CfTimeUnits::parse("seconds since 1970-01-01T00:00:00Z", None).unwrap();
        assert_eq!(s.decode(86_400.5).unwrap(), 86_401);
        let d = CfTimeUnits::parse("days since 1999-01-01", Some("proleptic_gregorian")).unwrap();
        assert_eq!(d.decode(364.25).unwrap(), unix("1999-12-31T06:00:00Z"));
        let o = CfTimeUnits::parse("hours since 2000-01-01 06:00:00 +06:00", None).unwrap();
        assert_eq!(o.decode(0.0).unwrap(), unix("2000-01-01T00:00:00Z"));
        let m = CfTimeUnits::parse("minutes since 2000-1-1", None).unwrap();
        assert_eq!(m.decode(90.0).unwrap(), unix("2000-01-01T01:30:00Z"));
    }

    #[test]
    fn milli_micro_and_nanoseconds() {
        let t = unix("2020-01-01T06:00:00Z");
        for (units, per_second) in [
            ("milliseconds since 1970-01-01", 1e3),
            ("ms since 1970-01-01", 1e3),
            ("microseconds since 1970-01-01 00:00:00", 1e6),
            ("µs since 1970-01-01", 1e6),
            ("nanoseconds since 1970-01-01", 1e9),
            ("ns since 1970-01-01T00:00:00Z", 1e9),
        ] {
            let u = CfTimeUnits::parse(units, None).unwrap();
            // As the int64 coordinate holds it, converted to f64 on reading.
            let stored = (t * per_second as i64) as f64;
            assert_eq!(u.decode(stored).unwrap(), t, "{units}");
            assert_eq!(u.encode(t), stored, "{units}");
            // Sub-second parts round to the nearest second.
            assert_eq!(
                u.decode(stored + 0.6 * per_second).unwrap(),
                t + 1,
                "{units}"
            );
        }
        // ns since 1900 for 2100: 6.3e18, still inside i64.
        let u = CfTimeUnits::parse("nanoseconds since 1900-01-01", None).unwrap();
        assert_eq!(
            u.decode(6_311_433_600e9).unwrap(),
            unix("2100-01-01T00:00:00Z")
        );
    }

    #[test]
    fn rejects_what_it_cannot_decode() {
        assert!(matches!(
            CfTimeUnits::parse("hours after 1900-01-01", None),
            Err(CfTimeError::Malformed(_))
        ));
        assert!(matches!(
            CfTimeUnits::parse("fortnights since 1900-01-01", None),
            Err(CfTimeError::UnknownUnit(_))
        ));
        assert!(matches!(
            CfTimeUnits::parse("days since 2000-01-01", Some("noleap")),
            Err(CfTimeError::UnsupportedCalendar(_))
        ));
        assert!(matches!(
            CfTimeUnits::parse("days since 1500-01-01", Some("standard")),
            Err(CfTimeError::MixedCalendar)
        ));
        assert!(CfTimeUnits::parse("days since 1500-01-01", Some("proleptic_gregorian")).is_ok());
        assert!(matches!(
            CfTimeUnits::parse("days since yesterday", None),
            Err(CfTimeError::BadReference(_))
        ));
        let u = CfTimeUnits::parse("days since 2000-01-01", None).unwrap();
        assert!(u.decode(f64::NAN).is_err());
    }

    /// Inputs that panicked (overflow, chrono's range) before: errors now.
    #[test]
    fn extreme_offsets_and_values_are_errors_not_panics() {
        for units in [
            "hours since 2000-01-01 00:00:00+999999999999999999",
            "hours since 2000-01-01 00:00:00-99:00",
            "hours since 2000-01-01 00:00:00+05:75",
            "days since 262142-12-31 23:00:00-02:00",
        ] {
            assert!(
                matches!(
                    CfTimeUnits::parse(units, None),
                    Err(CfTimeError::BadReference(_))
                ),
                "{units}"
            );
        }
        let u = CfTimeUnits::parse("seconds since 2000-01-01", None).unwrap();
        // The last one fits i64 but not added to the reference (2000-01-01).
        for v in [9.3e18, -9.3e18, 1e300, 9.223_372_036e18] {
            assert!(
                matches!(u.decode(v), Err(CfTimeError::OutOfRange(_))),
                "{v}"
            );
        }
        let d = CfTimeUnits::parse("days since 2000-01-01", None).unwrap();
        assert!(d.decode(1e17).is_err());
        assert!(d.encode(i64::MIN).is_finite() && d.encode(i64::MAX).is_finite());
    }
}
