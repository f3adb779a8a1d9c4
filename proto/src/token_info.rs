//! The 8 floats of metadata every token carries (docs/design.md §3), in this order:
//!
//! | # | field | unit / convention |
//! |---|---|---|
//! | 0 | `year` | calendar year (UTC), e.g. 2021.0 |
//! | 1 | `day_of_year` | 0-based (1 January = 0), as AtmoRep (`tm_yday − 1`) |
//! | 2 | `hour` | hour of day UTC, fractional (09:30 → 9.5; whole hours on ERA5) |
//! | 3 | `level` | the level's value as the store names it (model level number, hPa) |
//! | 4 | `lat` | latitude of the token centre, degrees north |
//! | 5 | `lon` | longitude of the token centre, degrees east in [0, 360) |
//! | 6 | `time_step_h` | time between consecutive grid points of the window, hours |
//! | 7 | `grid_spacing_deg` | grid spacing, degrees |
//!
//! **Time of a token**: the *last* time step it covers (AtmoRep's convention: a token is dated by
//! its most recent data). **Spatial centre**: the mean of the coordinates of the first and last
//! grid point it covers (for AtmoRep's odd token sizes this is the middle grid point); longitude
//! takes the midpoint of the shorter arc, so a token from 359° to 1° is centred on 0°, not 180°.

use serde::{Deserialize, Serialize};

use crate::calendar::UtcDateTime;
use crate::error::{ProtoError, Result};
use crate::geometry::FieldGeometry;

/// Floats per token info.
pub const TOKEN_INFO_LEN: usize = 8;

/// The metadata of one token; see the [module docs](self) for units and conventions.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct TokenInfo {
    pub year: f32,
    pub day_of_year: f32,
    pub hour: f32,
    pub level: f32,
    pub lat: f32,
    pub lon: f32,
    pub time_step_h: f32,
    pub grid_spacing_deg: f32,
}

impl TokenInfo {
    /// The 8 floats in wire order (year, day of year, hour, level, lat, lon, time step, spacing).
    pub fn to_array(&self) -> [f32; TOKEN_INFO_LEN] {
        [
            self.year,
            self.day_of_year,
            self.hour,
            self.level,
            self.lat,
            self.lon,
            self.time_step_h,
            self.grid_spacing_deg,
        ]
    }

    /// The inverse of [`Self::to_array`].
    pub fn from_array(a: [f32; TOKEN_INFO_LEN]) -> Self {
        let [
            year,
            day_of_year,
            hour,
            level,
            lat,
            lon,
            time_step_h,
            grid_spacing_deg,
        ] = a;
        Self {
            year,
            day_of_year,
            hour,
            level,
            lat,
            lon,
            time_step_h,
            grid_spacing_deg,
        }
    }
}

impl From<TokenInfo> for [f32; TOKEN_INFO_LEN] {
    fn from(info: TokenInfo) -> Self {
        info.to_array()
    }
}

impl From<[f32; TOKEN_INFO_LEN]> for TokenInfo {
    fn from(a: [f32; TOKEN_INFO_LEN]) -> Self {
        Self::from_array(a)
    }
}

/// The coordinates of one field sample's window, the input of [`token_infos`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WindowCoords<'a> {
    /// Unix seconds (UTC) of each time step of the window: `nt·t` values.
    pub times_unix_s: &'a [i64],
    /// Value of each level, in the order of [`FieldGeometry::levels`]: one per level.
    pub level_values: &'a [f64],
    /// Latitude (degrees) of each grid row of the window, in window order: `nlat·lat` values.
    pub lats_deg: &'a [f64],
    /// Longitude (degrees, any convention) of each grid column of the window, in window order,
    /// possibly wrapping across 0°/360°: `nlon·lon` values.
    pub lons_deg: &'a [f64],
    /// Time step between consecutive window time steps, hours.
    pub time_step_h: f64,
    /// Grid spacing, degrees.
    pub grid_spacing_deg: f64,
}

/// The token infos of all tokens of a field sample, in token order (level, t, lat, lon).
pub fn token_infos(field: &FieldGeometry, coords: &WindowCoords<'_>) -> Result<Vec<TokenInfo>> {
    field.validate()?;
    let g = &field.geometry;
    let [wt, wy, wx] = g.window();
    let [nt, ny, nx] = g.num_tokens;
    let [st, sy, sx] = g.token_size;
    for (what, expected, got) in [
        ("token info: window times", wt, coords.times_unix_s.len()),
        (
            "token info: level values",
            field.num_levels(),
            coords.level_values.len(),
        ),
        ("token info: window latitudes", wy, coords.lats_deg.len()),
        ("token info: window longitudes", wx, coords.lons_deg.len()),
    ] {
        if expected != got {
            return Err(ProtoError::LengthMismatch {
                what,
                expected,
                got,
            });
        }
    }

    let times: Vec<(f32, f32, f32)> = (0..nt)
        .map(|t| {
            let dt = UtcDateTime::from_unix_seconds(coords.times_unix_s[(t + 1) * st - 1]);
            (
                dt.year as f32,
                dt.day_of_year as f32,
                dt.fractional_hour() as f32,
            )
        })
        .collect();
    let lats: Vec<f32> = (0..ny)
        .map(|y| lat_centre(coords.lats_deg[y * sy], coords.lats_deg[(y + 1) * sy - 1]) as f32)
        .collect();
    let lons: Vec<f32> = (0..nx)
        .map(|x| lon_centre(coords.lons_deg[x * sx], coords.lons_deg[(x + 1) * sx - 1]) as f32)
        .collect();

    let mut infos = Vec::with_capacity(field.num_tokens_total());
    for &level in coords.level_values {
        for &(year, day_of_year, hour) in &times {
            for &lat in &lats {
                for &lon in &lons {
                    infos.push(TokenInfo {
                        year,
                        day_of_year,
                        hour,
                        level: level as f32,
                        lat,
                        lon,
                        time_step_h: coords.time_step_h as f32,
                        grid_spacing_deg: coords.grid_spacing_deg as f32,
                    });
                }
            }
        }
    }
    Ok(infos)
}

/// Token infos as one row-major `(tokens, 8)` buffer.
pub fn flatten(infos: &[TokenInfo]) -> Vec<f32> {
    infos.iter().flat_map(TokenInfo::to_array).collect()
}

/// Latitude centre of a token whose first and last grid rows are at `first` and `last`.
pub fn lat_centre(first: f64, last: f64) -> f64 {
    0.5 * (first + last)
}

/// Longitude centre, in [0, 360), of a token whose first and last grid columns are at `first`
/// and `last` (any convention): the midpoint of the shorter arc between them, so a token that
/// straddles 0°/360° (359° … 1°, or −1° … 1°) is centred on 0°.
pub fn lon_centre(first: f64, last: f64) -> f64 {
    // Signed shorter arc from first to last, in [-180, 180).
    let arc = (last - first + 180.0).rem_euclid(360.0) - 180.0;
    wrap_360(first + 0.5 * arc)
}

/// `deg` wrapped into [0, 360) (never −0.0, never 360.0).
pub fn wrap_360(deg: f64) -> f64 {
    let w = deg.rem_euclid(360.0);
    // rem_euclid can round up to exactly 360 for tiny negative inputs; + 0.0 turns −0.0 into 0.0.
    if w >= 360.0 { 0.0 } else { w + 0.0 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::geometry::TokenGeometry;

    #[test]
    fn array_round_trip() {
        let a = [2021.0, 364.0, 18.0, 137.0, 45.0, 359.5, 1.0, 0.25];
        let info = TokenInfo::from_array(a);
        assert_eq!(info.year, 2021.0);
        assert_eq!(info.grid_spacing_deg, 0.25);
        assert_eq!(info.to_array(), a);
        assert_eq!(<[f32; 8]>::from(TokenInfo::from(a)), a);
        assert_eq!(flatten(&[info, info]).len(), 16);
    }

    #[test]
    fn centres() {
        assert_eq!(lat_centre(90.0, 88.0), 89.0);
        assert_eq!(lon_centre(10.0, 12.0), 11.0);
        assert_eq!(lon_centre(359.0, 1.0), 0.0);
        assert!(lon_centre(359.0, 1.0).is_sign_positive());
        assert_eq!(lon_centre(-1.0, 1.0), 0.0);
        assert!(lon_centre(-1.0, 1.0).is_sign_positive());
        assert_eq!(lon_centre(358.0, 1.0), 359.5);
        assert_eq!(lon_centre(359.5, 2.5), 1.0);
        assert_eq!(lon_centre(-170.0, -168.0), 191.0);
        assert_eq!(lon_centre(179.0, -179.0), 180.0);
        // Descending longitudes: still the shorter arc.
        assert_eq!(lon_centre(1.0, 359.0), 0.0);
        assert_eq!(wrap_360(-1e-20), 0.0);
        assert_eq!(wrap_360(720.25), 0.25);
    }

    /// 2 levels, 2×2×2 tokens of 3×9×9 points on a 0.25° grid: a window that starts at the
    /// North Pole and straddles the 0° meridian in its first longitude token.
    #[test]
    fn token_infos_pole_and_meridian() {
        let field = FieldGeometry::new(vec![1, 0], TokenGeometry::new([2, 2, 2], [3, 9, 9]));
        // 2000-02-29T00:00Z, hourly.
        let t0 = 951_782_400;
        let times: Vec<i64> = (0..6).map(|i| t0 + 3600 * i).collect();
        let lats: Vec<f64> = (0..18).map(|i| 90.0 - 0.25 * f64::from(i)).collect();
        // 359.0 … 359.75, 0.0 … 3.25: the first token covers 359.0 … 1.0.
        let lons: Vec<f64> = (0..18)
            .map(|i| (359.0 + 0.25 * f64::from(i)) % 360.0)
            .collect();
        let coords = WindowCoords {
            times_unix_s: &times,
            level_values: &[500.0, 850.0],
            lats_deg: &lats,
            lons_deg: &lons,
            time_step_h: 1.0,
            grid_spacing_deg: 0.25,
        };
        let infos = token_infos(&field, &coords).unwrap();
        assert_eq!(infos.len(), 16);

        // Token (level 0, t 0, lat 0, lon 0): last time step 02:00, pole-adjacent rows
        // 90 … 88 → 89, longitudes 359 … 1 → 0.
        assert_eq!(
            infos[0].to_array(),
            [2000.0, 59.0, 2.0, 500.0, 89.0, 0.0, 1.0, 0.25]
        );
        // Token (level 1, t 1, lat 1, lon 1): last time step 05:00, rows 87.75 … 85.75 → 86.75,
        // longitudes 1.25 … 3.25 → 2.25.
        let i = field.token_index(1, 1, 1, 1).unwrap();
        assert_eq!(
            infos[i].to_array(),
            [2000.0, 59.0, 5.0, 850.0, 86.75, 2.25, 1.0, 0.25]
        );
        // Same t/lat/lon on the other level differs only in the level value.
        let j = field.token_index(0, 1, 1, 1).unwrap();
        assert_eq!(infos[j].level, 500.0);
        assert_eq!(
            TokenInfo {
                level: 850.0,
                ..infos[j]
            },
            infos[i]
        );
    }

    #[test]
    fn token_time_is_last_step_and_crosses_year() {
        // Tokens of 3 steps of 6 h starting 1940-12-31T06:00Z (1940 is a leap year).
        let field = FieldGeometry::new(vec![137], TokenGeometry::new([2, 1, 1], [3, 1, 1]));
        let t0 = -915_152_400 - 17 * 3600; // 1940-12-31T06:00Z
        let times: Vec<i64> = (0..6).map(|i| t0 + 6 * 3600 * i).collect();
        let coords = WindowCoords {
            times_unix_s: &times,
            level_values: &[137.0],
            lats_deg: &[-90.0],
            lons_deg: &[0.0],
            time_step_h: 6.0,
            grid_spacing_deg: 1.0,
        };
        let infos = token_infos(&field, &coords).unwrap();
        // First token: 06, 12, 18 h on 31 Dec 1940 → day 365, hour 18.
        assert_eq!(
            infos[0].to_array(),
            [1940.0, 365.0, 18.0, 137.0, -90.0, 0.0, 6.0, 1.0]
        );
        // Second token: 00, 06, 12 h on 1 Jan 1941 → day 0, hour 12.
        assert_eq!(
            infos[1].to_array(),
            [1941.0, 0.0, 12.0, 137.0, -90.0, 0.0, 6.0, 1.0]
        );
    }

    #[test]
    fn length_mismatch() {
        let field = FieldGeometry::new(vec![1], TokenGeometry::new([1, 1, 1], [2, 1, 1]));
        let coords = WindowCoords {
            times_unix_s: &[0],
            level_values: &[1.0],
            lats_deg: &[0.0],
            lons_deg: &[0.0],
            time_step_h: 1.0,
            grid_spacing_deg: 1.0,
        };
        assert_eq!(
            token_infos(&field, &coords),
            Err(ProtoError::LengthMismatch {
                what: "token info: window times",
                expected: 2,
                got: 1
            })
        );
        let coords = WindowCoords {
            times_unix_s: &[0, 3600],
            level_values: &[],
            ..coords
        };
        assert!(matches!(
            token_infos(&field, &coords),
            Err(ProtoError::LengthMismatch {
                expected: 1,
                got: 0,
                ..
            })
        ));
    }
}
