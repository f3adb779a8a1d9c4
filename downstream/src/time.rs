//! Instants as unix seconds (UTC), written and read the way IBTrACS spells them.

use atmorep_proto::calendar::UtcDateTime;

/// `YYYY-MM-DD HH:MM:SS`, IBTrACS' `ISO_TIME`.
pub fn format_iso(unix: i64) -> String {
    let t = UtcDateTime::from_unix_seconds(unix);
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        t.year, t.month, t.day, t.hour, t.minute, t.second
    )
}

/// Parses `YYYY-MM-DD HH:MM[:SS]`, also with `T` between date and time and a trailing `Z`, or a
/// bare date; `None` when it is not such a UTC instant.
pub fn parse_iso(text: &str) -> Option<i64> {
    let text = text.trim();
    let text = text.strip_suffix('Z').unwrap_or(text);
    let (date, clock) = match text.find([' ', 'T']) {
        Some(k) => (&text[..k], text[k + 1..].trim()),
        None => (text, ""),
    };
    let mut d = date.split('-');
    let year: i64 = d.next()?.parse().ok()?;
    let month: u32 = d.next()?.parse().ok()?;
    let day: u32 = d.next()?.parse().ok()?;
    if d.next().is_some() || !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return None;
    }
    let mut c = clock.split(':');
    let mut part = |max: u32| -> Option<u32> {
        match c.next() {
            None | Some("") => Some(0),
            Some(s) => s.parse().ok().filter(|v| *v <= max),
        }
    };
    let (hour, minute, second) = (part(23)?, part(59)?, part(60)?);
    if c.next().is_some() {
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
    (back.month == month && back.day == day).then_some(unix)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso_round_trip() {
        let t = 1_598_918_400 + 6 * 3600;
        assert_eq!(format_iso(t), "2020-09-01 06:00:00");
        assert_eq!(parse_iso("2020-09-01 06:00:00"), Some(t));
        assert_eq!(parse_iso("2020-09-01T06:00:00Z"), Some(t));
        assert_eq!(parse_iso("2020-09-01 06:00"), Some(t));
        assert_eq!(parse_iso("2020-09-01"), Some(1_598_918_400));
        assert_eq!(parse_iso("2021-02-30 00:00:00"), None);
        assert_eq!(parse_iso("2020-09-01 25:00:00"), None);
        assert_eq!(parse_iso("yesterday"), None);
        assert_eq!(parse_iso(""), None);
    }
}
