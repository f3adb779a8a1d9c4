//! Normalization statistics: global ones per field, level and calendar month over the globe
//! ([`GlobalStats`], Parquet), local ones per grid point, level and calendar month
//! ([`LocalStats`], Zarr), both computed in one streaming pass over a store with f64
//! accumulation ([`Moments`]), kept beside the store and applied to sample windows.

mod global;
mod local;
mod moments;
mod subset;

pub use global::{GLOBAL_FILE, GlobalStats};
pub use local::{LOCAL_STORE, LocalField, LocalStats};
pub use moments::Moments;
pub use subset::{Coverage, ResolvedSubset, StatsSubset};

use crate::store::dataset::Variable;

/// Calendar (year, month) of a Unix time (UTC), proleptic Gregorian.
pub fn year_month(unix: i64) -> (i32, u32) {
    let t = atmorep_proto::calendar::UtcDateTime::from_unix_seconds(unix);
    (t.year as i32, t.month)
}

/// Normalization that cannot be applied.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum NormalizationError {
    #[error("no statistics for field `{field}` level {level} in {year}-{month:02}")]
    Missing {
        field: String,
        level: f64,
        year: i32,
        month: u32,
    },
    #[error("field `{field}` level {level} in {year}-{month:02} has zero spread")]
    ZeroSpread {
        field: String,
        level: f64,
        year: i32,
        month: u32,
    },
}

/// The levels statistics are kept for: the variable's, or a single level 0 at the surface.
fn statistics_levels(variable: &Variable) -> Vec<f64> {
    if variable.levels.is_empty() {
        vec![0.0]
    } else {
        variable.levels.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calendar_months_of_unix_times() {
        assert_eq!(year_month(0), (1970, 1));
        assert_eq!(year_month(951_782_400), (2000, 2)); // 2000-02-29
        assert_eq!(year_month(951_868_800), (2000, 3)); // 2000-03-01
        assert_eq!(year_month(-946_771_200), (1940, 1)); // 1940-01-01
        assert_eq!(year_month(1_609_459_199), (2020, 12)); // 2020-12-31T23:59:59
    }
}
