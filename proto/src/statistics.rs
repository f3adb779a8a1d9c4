//! The loader's global normalization statistics on the client side: per variable, level and
//! calendar month (year, month), the moments the loader normalizes with. A client uses them to
//! map normalized values — a model's output — back to physical units, and as the climatology
//! an evaluation compares against.

use std::collections::BTreeMap;

use crate::calendar::UtcDateTime;
use crate::pb;

/// (variable, level as f64 bits, year, month).
type Key = (String, u64, i32, u32);

/// Mean and standard deviation of one (variable, level, year, month).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Moments {
    pub count: u64,
    pub mean: f64,
    pub std: f64,
    pub min: f64,
    pub max: f64,
}

/// A month's moments are missing or unusable.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StatisticsError {
    #[error("no statistics for `{variable}` at level {level} in {year}-{month:02}")]
    Missing {
        variable: String,
        level: f64,
        year: i32,
        month: u32,
    },
    #[error(
        "statistics for `{variable}` at level {level} in {year}-{month:02} have std {std}, not > 0"
    )]
    ZeroSpread {
        variable: String,
        level: f64,
        year: i32,
        month: u32,
        std: f64,
    },
}

/// The global statistics of a dataset, as `GetStatistics` returns them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MonthlyStatistics {
    entries: BTreeMap<Key, Moments>,
}

impl MonthlyStatistics {
    pub fn from_proto(msg: &pb::Statistics) -> Self {
        let mut stats = Self::default();
        for m in &msg.global {
            stats.insert(
                &m.variable,
                m.level,
                m.year,
                m.month,
                Moments {
                    count: m.count,
                    mean: m.mean,
                    std: m.std,
                    min: m.min,
                    max: m.max,
                },
            );
        }
        stats
    }

    pub fn to_proto(&self) -> pb::Statistics {
        pb::Statistics {
            global: self
                .iter()
                .map(|(variable, level, year, month, m)| pb::MonthlyMoments {
                    variable: variable.to_string(),
                    level,
                    year,
                    month,
                    count: m.count,
                    mean: m.mean,
                    std: m.std,
                    min: m.min,
                    max: m.max,
                })
                .collect(),
        }
    }

    pub fn insert(&mut self, variable: &str, level: f64, year: i32, month: u32, m: Moments) {
        self.entries
            .insert((variable.to_string(), level.to_bits(), year, month), m);
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Every entry as (variable, level, year, month, moments), sorted.
    pub fn iter(&self) -> impl Iterator<Item = (&str, f64, i32, u32, &Moments)> {
        self.entries
            .iter()
            .map(|((v, l, y, m), x)| (v.as_str(), f64::from_bits(*l), *y, *m, x))
    }

    /// Whether any entry is for `variable`.
    pub fn has_variable(&self, variable: &str) -> bool {
        self.entries.keys().any(|(v, ..)| v == variable)
    }

    /// `(mean, std)` of `variable` at `level` for the month that contains unix time `unix`:
    /// physical `= normalized · std + mean`.
    pub fn affine(
        &self,
        variable: &str,
        level: f64,
        unix: i64,
    ) -> Result<(f64, f64), StatisticsError> {
        let t = UtcDateTime::from_unix_seconds(unix);
        let (year, month) = (t.year as i32, t.month);
        let m = self
            .entries
            .get(&(variable.to_string(), level.to_bits(), year, month))
            .ok_or_else(|| StatisticsError::Missing {
                variable: variable.to_string(),
                level,
                year,
                month,
            })?;
        if m.std.is_nan() || m.std <= 0.0 {
            return Err(StatisticsError::ZeroSpread {
                variable: variable.to_string(),
                level,
                year,
                month,
                std: m.std,
            });
        }
        Ok((m.mean, m.std))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn moments(mean: f64, std: f64) -> Moments {
        Moments {
            count: 10,
            mean,
            std,
            min: mean - 2.0 * std,
            max: mean + 2.0 * std,
        }
    }

    #[test]
    fn affine_picks_the_month_of_the_time_and_round_trips_the_wire() {
        let mut s = MonthlyStatistics::default();
        s.insert("t", 850.0, 2020, 1, moments(270.0, 5.0));
        s.insert("t", 850.0, 2020, 2, moments(275.0, 4.0));
        s.insert("z", 0.0, 2020, 1, moments(1.0, 0.0));
        // 2020-01-31T23:00Z and 2020-02-01T00:00Z.
        let jan = 1_580_511_600;
        assert_eq!(s.affine("t", 850.0, jan).unwrap(), (270.0, 5.0));
        assert_eq!(s.affine("t", 850.0, jan + 3600).unwrap(), (275.0, 4.0));
        let err = s.affine("t", 500.0, jan).unwrap_err();
        assert!(
            err.to_string().contains("`t` at level 500 in 2020-01"),
            "{err}"
        );
        let err = s.affine("z", 0.0, jan).unwrap_err();
        assert!(matches!(err, StatisticsError::ZeroSpread { .. }), "{err}");
        assert!(s.has_variable("z") && !s.has_variable("q"));
        assert_eq!(MonthlyStatistics::from_proto(&s.to_proto()), s);
    }
}
