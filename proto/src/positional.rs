//! Positional encodings of a field sample's tokens — the seed's ablation (docs/design.md §3).
//!
//! Every encoding is returned as a row-major `Vec<f32>` of shape `(num_tokens_total, width)`, one
//! row per token in token order (level, t, lat, lon). `width` (`D`) must be even and at least 2.
//! Values are computed in `f64` and rounded to `f32` once, at the end.
//!
//! Throughout, `div_i = exp(2i · (−ln 10000 / D))` for `i = 0 … D/2 − 1` (see [`div_term`]).
//!
//! - [`PeMode::Global`] ([`global_pe`], the seed's formula, reproduced exactly):
//!   `pe[2i] = sin(T·div_i) + 0.5·sin(Y·div_i)`, `pe[2i+1] = cos(T·div_i) + 0.5·sin(X·div_i)`
//!   with `(T, Y, X)` the token's *global* (time, lat, lon) token indices, see [`GlobalOffsets`].
//! - [`PeMode::Local`] ([`local_pe`]): the channels are split into three contiguous groups for
//!   the local t, lat and lon token index (in that order); see [`local_split`] for the exact
//!   widths. Each group of width `w` is a standard 1-D encoding of its index `k` with its own
//!   `div_j = exp(2j · (−ln 10000 / w))`: `g[2j] = sin(k·div_j)`, `g[2j+1] = cos(k·div_j)`.
//! - [`PeMode::Standard`] ([`standard_pe`], Vaswani et al.): `pe[2i] = sin(p·div_i)`,
//!   `pe[2i+1] = cos(p·div_i)` with `p = (t·nlat + y)·nlon + x` the token's position in the
//!   flattened (t, lat, lon) sequence of its level.
//! - [`PeMode::InfoStandard`] ([`info_standard_pe`]): the standard encoding plus a fixed,
//!   weight-free sin/cos feature map of the token's [`TokenInfo`], see [`info_phases`].
//! - [`PeMode::None`] ([`none_pe`]): zeros of the same shape, so consumers can always add the
//!   encoding without a special case.
//!
//! **Levels**: tokens of different levels at the same (t, lat, lon) get the same global, local
//! and standard encoding (the level is not a position; it reaches the model through the token
//! info). Only `info+standard` differs between levels, through the info's level value.

use std::f64::consts::PI;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{ProtoError, Result};
use crate::geometry::FieldGeometry;
use crate::token_info::TokenInfo;

/// Which positional encoding a field's tokens get.
///
/// Names (serde, [`FromStr`], [`fmt::Display`]): `global`, `local`, `standard`, `info+standard`
/// (`info-standard` also accepted when parsing), `none`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PeMode {
    /// The seed's encoding of global time/lat/lon token indices.
    Global,
    /// Sinusoids of the local (t, lat, lon) token index in split channel groups.
    Local,
    /// 1-D sinusoids of the position in the flattened sequence.
    Standard,
    /// Standard plus a fixed sin/cos map of the token info.
    #[serde(rename = "info+standard", alias = "info-standard")]
    InfoStandard,
    /// No positional encoding (zeros).
    None,
}

impl PeMode {
    /// Every mode, in ablation order.
    pub const ALL: [Self; 5] = [
        Self::Global,
        Self::Local,
        Self::Standard,
        Self::InfoStandard,
        Self::None,
    ];

    /// Whether the encoding depends on the window (its global position or its tokens' info);
    /// the others are one fixed table per field geometry and width.
    pub const fn depends_on_window(self) -> bool {
        matches!(self, Self::Global | Self::InfoStandard)
    }

    /// The mode's canonical name.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Global => "global",
            Self::Local => "local",
            Self::Standard => "standard",
            Self::InfoStandard => "info+standard",
            Self::None => "none",
        }
    }
}

impl fmt::Display for PeMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for PeMode {
    type Err = ProtoError;

    /// Parses a canonical name, ASCII case-insensitively; `info-standard` is an alias of
    /// `info+standard`.
    fn from_str(s: &str) -> Result<Self> {
        let lower = s.trim().to_ascii_lowercase();
        if lower == "info-standard" {
            return Ok(Self::InfoStandard);
        }
        Self::ALL
            .into_iter()
            .find(|m| m.as_str() == lower)
            .ok_or_else(|| ProtoError::UnknownPeMode(s.to_owned()))
    }
}

/// Checks that `width` is even and at least 2.
pub fn check_width(width: usize) -> Result<()> {
    if width >= 2 && width.is_multiple_of(2) {
        Ok(())
    } else {
        Err(ProtoError::InvalidWidth(width))
    }
}

/// `div_i = exp(2i · (−ln 10000 / width))` for `i = 0 … width/2 − 1` (`arange(0, D, 2)` in the
/// seed); for an odd width, `(width + 1) / 2` terms.
pub fn div_term(width: usize) -> Vec<f64> {
    let scale = -(10_000f64.ln()) / width as f64;
    (0..width.div_ceil(2))
        .map(|i| ((2 * i) as f64 * scale).exp())
        .collect()
}

/// Where a sample's window sits in the whole dataset, in (possibly fractional) token units: the
/// global token index of the window's first token along time, lat and lon.
///
/// A window need not start on a multiple of the token size; [`Self::from_grid_start`] turns a
/// window's first grid indices into token units (`grid index / token size`).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct GlobalOffsets {
    /// Global time token index of the window's first token.
    pub t: f64,
    /// Global latitude token index of the window's first token (from the first grid row).
    pub lat: f64,
    /// Global longitude token index of the window's first token (from the first grid column).
    pub lon: f64,
    /// Tokens around the globe in longitude. When set, the global longitude index of every token
    /// is wrapped into `[0, lon_period)`, so a token gets the same encoding whichever window it
    /// is seen from, also across 0°/360°. `None` (or a period ≤ 0): no wrapping (regional
    /// grids).
    pub lon_period: Option<f64>,
}

impl GlobalOffsets {
    /// Offsets of a window whose first grid point is `grid_start` (time, lat, lon indices in the
    /// dataset) for tokens of `token_size` points; `lon_grid_len` is the number of longitudes of
    /// a global grid (1440 at 0.25°), `None` for a regional grid.
    pub fn from_grid_start(
        grid_start: [usize; 3],
        token_size: [usize; 3],
        lon_grid_len: Option<usize>,
    ) -> Self {
        let tok = |a: usize| grid_start[a] as f64 / token_size[a] as f64;
        Self {
            t: tok(0),
            lat: tok(1),
            lon: tok(2),
            lon_period: lon_grid_len.map(|n| n as f64 / token_size[2] as f64),
        }
    }
}

/// The inputs some modes need beyond the geometry: [`PeMode::Global`] needs `global_offsets`,
/// [`PeMode::InfoStandard`] needs `token_infos` (one per token, token order).
#[derive(Debug, Clone, Copy, Default)]
pub struct PeInputs<'a> {
    pub global_offsets: Option<GlobalOffsets>,
    pub token_infos: Option<&'a [TokenInfo]>,
}

/// The encoding of `mode` for all tokens of a field sample: shape `(num_tokens_total, width)`.
pub fn encode(
    mode: PeMode,
    field: &FieldGeometry,
    width: usize,
    inputs: &PeInputs<'_>,
) -> Result<Vec<f32>> {
    match mode {
        PeMode::Global => {
            let offsets = inputs
                .global_offsets
                .as_ref()
                .ok_or(ProtoError::MissingPeInput {
                    mode,
                    what: "the window's global token offsets",
                })?;
            global_pe(field, offsets, width)
        }
        PeMode::Local => local_pe(field, width),
        PeMode::Standard => standard_pe(field, width),
        PeMode::InfoStandard => {
            let infos = inputs.token_infos.ok_or(ProtoError::MissingPeInput {
                mode,
                what: "the token infos",
            })?;
            info_standard_pe(field, infos, width)
        }
        PeMode::None => none_pe(field, width),
    }
}

/// The seed's global encoding (see the [module docs](self)).
pub fn global_pe(field: &FieldGeometry, offsets: &GlobalOffsets, width: usize) -> Result<Vec<f32>> {
    check(field, width)?;
    let div = div_term(width);
    let lon_index = |x: usize| {
        let g = offsets.lon + x as f64;
        match offsets.lon_period {
            Some(p) if p > 0.0 => g.rem_euclid(p),
            _ => g,
        }
    };
    let level = per_level(field, width, |[t, y, x], row| {
        let (gt, gy, gx) = (offsets.t + t as f64, offsets.lat + y as f64, lon_index(x));
        for (i, d) in div.iter().enumerate() {
            row[2 * i] = (gt * d).sin() + 0.5 * (gy * d).sin();
            row[2 * i + 1] = (gt * d).cos() + 0.5 * (gx * d).sin();
        }
    });
    Ok(repeat_levels(field, level))
}

/// Channel widths of the (t, lat, lon) groups of the local encoding for width `D`: the `D/2`
/// sin/cos pairs are shared out as equally as possible, the remainder going to time first, then
/// latitude: with `q = D/2 div 3`, `r = D/2 mod 3`, the widths are
/// `2·(q + [r > 0])`, `2·(q + [r > 1])`, `2·q`. E.g. 2 → (2, 0, 0), 4 → (2, 2, 0),
/// 6 → (2, 2, 2), 8 → (4, 2, 2), 256 → (86, 86, 84). A group of width 0 is left out.
pub fn local_split(width: usize) -> [usize; 3] {
    let pairs = width / 2;
    let (q, r) = (pairs / 3, pairs % 3);
    [
        2 * (q + usize::from(r > 0)),
        2 * (q + usize::from(r > 1)),
        2 * q,
    ]
}

/// The local encoding (see the [module docs](self) and [`local_split`]).
pub fn local_pe(field: &FieldGeometry, width: usize) -> Result<Vec<f32>> {
    check(field, width)?;
    let split = local_split(width);
    let divs = split.map(div_term);
    let level = per_level(field, width, |coords, row| {
        let mut start = 0;
        for a in 0..3 {
            let k = coords[a] as f64;
            for (j, d) in divs[a].iter().enumerate() {
                row[start + 2 * j] = (k * d).sin();
                row[start + 2 * j + 1] = (k * d).cos();
            }
            start += split[a];
        }
    });
    Ok(repeat_levels(field, level))
}

/// The standard 1-D encoding of the position within a level (see the [module docs](self)).
pub fn standard_pe(field: &FieldGeometry, width: usize) -> Result<Vec<f32>> {
    check(field, width)?;
    Ok(repeat_levels(field, standard_level(field, width)))
}

/// Weight of the token-info features added to the standard encoding in `info+standard` (half
/// amplitude, as the seed weights its secondary lat/lon terms).
pub const INFO_WEIGHT: f64 = 0.5;

/// The phases (radians) the `info+standard` encoding takes from a token info, one per field:
///
/// | # | info | phase | range mapped |
/// |---|---|---|---|
/// | 0 | year | `π·(year − 1900)/200` | 1900…2100 → [0, π] |
/// | 1 | day of year (0-based) | `2π·day/365.25` | periodic |
/// | 2 | hour | `2π·hour/24` | periodic |
/// | 3 | level | `π·level/1000` | 0…1000 (hPa or model level number) → [0, π] |
/// | 4 | latitude | `π·(lat + 90)/180` | −90…90 → [0, π] |
/// | 5 | longitude | `2π·lon/360` | periodic |
/// | 6 | time step (h) | `π·step/24` | 0…24 h → [0, π] |
/// | 7 | grid spacing (°) | `π·spacing/10` | 0…10° → [0, π] |
///
/// Non-periodic quantities map their expected range onto [0, π], where the cosine is monotonic.
pub fn info_phases(info: &TokenInfo) -> [f64; 8] {
    let v = info.to_array().map(f64::from);
    [
        PI * (v[0] - 1900.0) / 200.0,
        2.0 * PI * v[1] / 365.25,
        2.0 * PI * v[2] / 24.0,
        PI * v[3] / 1000.0,
        PI * (v[4] + 90.0) / 180.0,
        2.0 * PI * v[5] / 360.0,
        PI * v[6] / 24.0,
        PI * v[7] / 10.0,
    ]
}

/// The standard encoding plus the token info: sin/cos pair `j` (channels `2j`, `2j + 1`) gets
/// `INFO_WEIGHT · (sin(h·φ_k), cos(h·φ_k))` added, with `k = j mod 8` the info field and
/// `h = j div 8 + 1` the harmonic, `φ` from [`info_phases`]. The pairs thus cycle through the 8
/// infos (year, day, hour, level, lat, lon, step, spacing, year at twice the frequency, …), so
/// any even width works; below 16 only the first `D/2` infos are encoded.
pub fn info_standard_pe(
    field: &FieldGeometry,
    infos: &[TokenInfo],
    width: usize,
) -> Result<Vec<f32>> {
    check(field, width)?;
    if infos.len() != field.num_tokens_total() {
        return Err(ProtoError::LengthMismatch {
            what: "info+standard positional encoding: token infos",
            expected: field.num_tokens_total(),
            got: infos.len(),
        });
    }
    let standard = standard_level(field, width);
    let per_level = field.geometry.tokens_per_level();
    let mut out = Vec::with_capacity(infos.len() * width);
    for (token, info) in infos.iter().enumerate() {
        let p = token % per_level;
        let phases = info_phases(info);
        for j in 0..width / 2 {
            let phase = (j / 8 + 1) as f64 * phases[j % 8];
            let (sin, cos) = phase.sin_cos();
            out.push((standard[p * width + 2 * j] + INFO_WEIGHT * sin) as f32);
            out.push((standard[p * width + 2 * j + 1] + INFO_WEIGHT * cos) as f32);
        }
    }
    Ok(out)
}

/// No positional encoding: zeros of shape `(num_tokens_total, width)`.
pub fn none_pe(field: &FieldGeometry, width: usize) -> Result<Vec<f32>> {
    check(field, width)?;
    Ok(vec![0.0; field.num_tokens_total() * width])
}

fn check(field: &FieldGeometry, width: usize) -> Result<()> {
    check_width(width)?;
    field.validate()?;
    field
        .num_tokens_total()
        .checked_mul(width)
        .map(|_| ())
        .ok_or(ProtoError::EncodingTooLarge {
            tokens: field.num_tokens_total(),
            width,
        })
}

/// The standard encoding of one level, in f64.
fn standard_level(field: &FieldGeometry, width: usize) -> Vec<f64> {
    let div = div_term(width);
    let [_, ny, nx] = field.geometry.num_tokens;
    per_level(field, width, |[t, y, x], row| {
        let p = ((t * ny + y) * nx + x) as f64;
        for (i, d) in div.iter().enumerate() {
            row[2 * i] = (p * d).sin();
            row[2 * i + 1] = (p * d).cos();
        }
    })
}

/// One level's `(tokens_per_level, width)` block, filled row by row from the token's (t, y, x).
fn per_level(
    field: &FieldGeometry,
    width: usize,
    mut fill: impl FnMut([usize; 3], &mut [f64]),
) -> Vec<f64> {
    let g = &field.geometry;
    let mut block = vec![0.0; g.tokens_per_level() * width];
    for (index, row) in block.chunks_exact_mut(width).enumerate() {
        let coords = g.token_coords(index).expect("index within the level");
        fill(coords, row);
    }
    block
}

/// The level block repeated for every level, rounded to f32.
fn repeat_levels(field: &FieldGeometry, level: Vec<f64>) -> Vec<f32> {
    let level: Vec<f32> = level.into_iter().map(|v| v as f32).collect();
    level.repeat(field.num_levels())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::geometry::TokenGeometry;

    /// Two levels of 2×2×2 tokens (token size irrelevant to the encodings).
    fn tiny() -> FieldGeometry {
        FieldGeometry::new(vec![850, 500], TokenGeometry::new([2, 2, 2], [3, 9, 9]))
    }

    fn assert_close(got: &[f32], want: &[f64]) {
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (f64::from(*g) - w).abs() < 1e-6,
                "channel {i}: got {g}, want {w}"
            );
        }
    }

    /// Row of token (t, y, x) of level `l` in a tiny() encoding of width `w`.
    fn row(pe: &[f32], w: usize, l: usize, t: usize, y: usize, x: usize) -> &[f32] {
        let i = tiny().token_index(l, t, y, x).unwrap();
        &pe[i * w..(i + 1) * w]
    }

    #[test]
    fn div_term_width_4() {
        // exp(0) = 1 and exp(2 · (−ln 10000 / 4)) = 10000^(−1/2) = 0.01.
        let d = div_term(4);
        assert_eq!(d.len(), 2);
        assert_eq!(d[0], 1.0);
        assert!((d[1] - 0.01).abs() < 1e-15);
    }

    #[test]
    fn global_hand_computed() {
        let f = tiny();
        let off = GlobalOffsets {
            t: 10.0,
            lat: 3.0,
            lon: 5.0,
            lon_period: None,
        };
        let pe = global_pe(&f, &off, 4).unwrap();
        assert_eq!(pe.len(), 16 * 4);
        // Token (t 1, y 0, x 1): global (T, Y, X) = (11, 3, 6).
        let want = [
            11f64.sin() + 0.5 * 3f64.sin(),
            11f64.cos() + 0.5 * 6f64.sin(),
            0.11f64.sin() + 0.5 * 0.03f64.sin(),
            0.11f64.cos() + 0.5 * 0.06f64.sin(),
        ];
        assert_close(row(&pe, 4, 0, 1, 0, 1), &want);
        // Levels share the encoding.
        assert_eq!(row(&pe, 4, 0, 1, 0, 1), row(&pe, 4, 1, 1, 0, 1));
        // Token (0, 1, 0): (T, Y, X) = (10, 4, 5).
        let want = [
            10f64.sin() + 0.5 * 4f64.sin(),
            10f64.cos() + 0.5 * 5f64.sin(),
            0.1f64.sin() + 0.5 * 0.04f64.sin(),
            0.1f64.cos() + 0.5 * 0.05f64.sin(),
        ];
        assert_close(row(&pe, 4, 1, 0, 1, 0), &want);
    }

    #[test]
    fn global_wraps_longitude() {
        let f = tiny();
        // 160 tokens of 9 points around a 1440-point globe; the window starts on the last token.
        let off = GlobalOffsets::from_grid_start([30, 18, 1431], [3, 9, 9], Some(1440));
        assert_eq!(
            off,
            GlobalOffsets {
                t: 10.0,
                lat: 2.0,
                lon: 159.0,
                lon_period: Some(160.0),
            }
        );
        let pe = global_pe(&f, &off, 4).unwrap();
        // Token x = 1 is global lon token 160 ≡ 0: (T, Y, X) = (10, 2, 0).
        let want = [
            10f64.sin() + 0.5 * 2f64.sin(),
            10f64.cos() + 0.5 * 0f64.sin(),
            0.1f64.sin() + 0.5 * 0.02f64.sin(),
            0.1f64.cos() + 0.5 * 0f64.sin(),
        ];
        assert_close(row(&pe, 4, 0, 0, 0, 1), &want);
        // Same token seen from a window starting at lon token 0.
        let other = GlobalOffsets { lon: 0.0, ..off };
        let pe2 = global_pe(&f, &other, 4).unwrap();
        assert_eq!(row(&pe, 4, 0, 0, 0, 1), row(&pe2, 4, 0, 0, 0, 0));
    }

    #[test]
    fn local_hand_computed() {
        let f = tiny();
        // Width 4: groups (2, 2, 0): [sin t, cos t, sin y, cos y].
        let pe = local_pe(&f, 4).unwrap();
        assert_eq!(pe.len(), 16 * 4);
        assert_close(
            row(&pe, 4, 0, 1, 0, 1),
            &[1f64.sin(), 1f64.cos(), 0f64.sin(), 0f64.cos()],
        );
        // Width 6: (2, 2, 2): [sin t, cos t, sin y, cos y, sin x, cos x].
        let pe = local_pe(&f, 6).unwrap();
        assert_close(
            row(&pe, 6, 1, 0, 1, 1),
            &[0.0, 1.0, 1f64.sin(), 1f64.cos(), 1f64.sin(), 1f64.cos()],
        );
        // Width 8: (4, 2, 2); the time group has div (1, 0.01).
        let pe = local_pe(&f, 8).unwrap();
        let want = [
            1f64.sin(),
            1f64.cos(),
            0.01f64.sin(),
            0.01f64.cos(),
            0.0,
            1.0,
            1f64.sin(),
            1f64.cos(),
        ];
        assert_close(row(&pe, 8, 0, 1, 0, 1), &want);
        assert_eq!(row(&pe, 8, 0, 1, 0, 1), row(&pe, 8, 1, 1, 0, 1));
        // Width 2: time only.
        let pe = local_pe(&f, 2).unwrap();
        assert_close(row(&pe, 2, 0, 1, 1, 1), &[1f64.sin(), 1f64.cos()]);
    }

    #[test]
    fn local_split_widths() {
        assert_eq!(local_split(2), [2, 0, 0]);
        assert_eq!(local_split(4), [2, 2, 0]);
        assert_eq!(local_split(6), [2, 2, 2]);
        assert_eq!(local_split(8), [4, 2, 2]);
        assert_eq!(local_split(10), [4, 4, 2]);
        assert_eq!(local_split(256), [86, 86, 84]);
        for w in (2..300).step_by(2) {
            let s = local_split(w);
            assert_eq!(s.iter().sum::<usize>(), w);
            assert!(s.iter().all(|g| g % 2 == 0));
            assert!(s[0] >= s[1] && s[1] >= s[2] && s[0] - s[2] <= 2);
        }
    }

    #[test]
    fn standard_hand_computed() {
        let f = tiny();
        let pe = standard_pe(&f, 4).unwrap();
        assert_eq!(pe.len(), 16 * 4);
        // Token (t 1, y 0, x 1): p = (1·2 + 0)·2 + 1 = 5.
        let want = [5f64.sin(), 5f64.cos(), 0.05f64.sin(), 0.05f64.cos()];
        assert_close(row(&pe, 4, 0, 1, 0, 1), &want);
        assert_close(row(&pe, 4, 1, 1, 0, 1), &want);
        // Token (0, 0, 0): p = 0 → [0, 1, 0, 1].
        assert_eq!(row(&pe, 4, 1, 0, 0, 0), &[0.0, 1.0, 0.0, 1.0]);
        // Token (1, 1, 1): p = 7.
        assert_close(
            row(&pe, 4, 0, 1, 1, 1),
            &[7f64.sin(), 7f64.cos(), 0.07f64.sin(), 0.07f64.cos()],
        );
    }

    fn info(level: f32) -> TokenInfo {
        TokenInfo {
            year: 2000.0,
            day_of_year: 59.0,
            hour: 6.0,
            level,
            lat: 45.0,
            lon: 90.0,
            time_step_h: 1.0,
            grid_spacing_deg: 0.25,
        }
    }

    #[test]
    fn info_standard_hand_computed() {
        let f = tiny();
        let infos: Vec<TokenInfo> = (0..16)
            .map(|i| info(if i < 8 { 850.0 } else { 500.0 }))
            .collect();
        let pe = info_standard_pe(&f, &infos, 4).unwrap();
        assert_eq!(pe.len(), 16 * 4);
        // Width 4: pair 0 ← year (φ = π·100/200 = π/2), pair 1 ← day (φ = 2π·59/365.25).
        let year = PI / 2.0;
        let day = 2.0 * PI * 59.0 / 365.25;
        // Token (t 1, y 0, x 1): p = 5.
        let want = [
            5f64.sin() + 0.5 * year.sin(),
            5f64.cos() + 0.5 * year.cos(),
            0.05f64.sin() + 0.5 * day.sin(),
            0.05f64.cos() + 0.5 * day.cos(),
        ];
        assert_close(row(&pe, 4, 0, 1, 0, 1), &want);
        // Width 4 does not reach the level: both levels agree.
        assert_eq!(row(&pe, 4, 0, 1, 0, 1), row(&pe, 4, 1, 1, 0, 1));

        // Width 18: pair 3 ← level, pair 8 ← year at harmonic 2. Token (0, 0, 0): p = 0.
        let pe = info_standard_pe(&f, &infos, 18).unwrap();
        let r = row(&pe, 18, 0, 0, 0, 0);
        let level = PI * 850.0 / 1000.0;
        let (s, c) = standard_at(0.0, 18, 3);
        assert_close(&r[6..8], &[s + 0.5 * level.sin(), c + 0.5 * level.cos()]);
        let (s, c) = standard_at(0.0, 18, 8);
        assert_close(
            &r[16..18],
            &[s + 0.5 * (2.0 * year).sin(), c + 0.5 * (2.0 * year).cos()],
        );
        // Pair 5 ← longitude 90° → φ = π/2; pair 4 ← latitude 45° → φ = 3π/4.
        let (s, c) = standard_at(0.0, 18, 5);
        assert_close(&r[10..12], &[s + 0.5, c]);
        let (s, c) = standard_at(0.0, 18, 4);
        let lat = 0.75 * PI;
        assert_close(&r[8..10], &[s + 0.5 * lat.sin(), c + 0.5 * lat.cos()]);
        // The level differs on the second level.
        let r2 = row(&pe, 18, 1, 0, 0, 0);
        let level = PI * 500.0 / 1000.0;
        let (s, c) = standard_at(0.0, 18, 3);
        assert_close(&r2[6..8], &[s + 0.5 * level.sin(), c + 0.5 * level.cos()]);

        assert!(matches!(
            info_standard_pe(&f, &infos[..15], 4),
            Err(ProtoError::LengthMismatch {
                expected: 16,
                got: 15,
                ..
            })
        ));
    }

    /// Standard (sin, cos) of position `p`, pair `i`, width `w`, from the formula.
    fn standard_at(p: f64, w: usize, i: usize) -> (f64, f64) {
        let d = (-(10_000f64.ln()) * (2 * i) as f64 / w as f64).exp();
        ((p * d).sin(), (p * d).cos())
    }

    #[test]
    fn none_is_zeros() {
        let pe = none_pe(&tiny(), 4).unwrap();
        assert_eq!(pe, vec![0.0; 64]);
    }

    #[test]
    fn invalid_widths_rejected() {
        let f = tiny();
        let off = GlobalOffsets::default();
        let infos = vec![TokenInfo::default(); 16];
        let inputs = PeInputs {
            global_offsets: Some(off),
            token_infos: Some(&infos),
        };
        for width in [0, 1, 3, 5, 255] {
            for mode in PeMode::ALL {
                assert_eq!(
                    encode(mode, &f, width, &inputs),
                    Err(ProtoError::InvalidWidth(width)),
                    "{mode} {width}"
                );
            }
        }
        for mode in PeMode::ALL {
            assert_eq!(encode(mode, &f, 2, &inputs).unwrap().len(), 32);
            assert_eq!(
                encode(mode, &f, usize::MAX - 1, &inputs),
                Err(ProtoError::EncodingTooLarge {
                    tokens: 16,
                    width: usize::MAX - 1
                })
            );
        }
    }

    #[test]
    fn encode_dispatches_and_needs_inputs() {
        let f = tiny();
        let none = PeInputs::default();
        assert!(matches!(
            encode(PeMode::Global, &f, 4, &none),
            Err(ProtoError::MissingPeInput {
                mode: PeMode::Global,
                ..
            })
        ));
        assert!(matches!(
            encode(PeMode::InfoStandard, &f, 4, &none),
            Err(ProtoError::MissingPeInput {
                mode: PeMode::InfoStandard,
                ..
            })
        ));
        assert_eq!(
            encode(PeMode::Local, &f, 6, &none).unwrap(),
            local_pe(&f, 6).unwrap()
        );
        assert_eq!(
            encode(PeMode::Standard, &f, 6, &none).unwrap(),
            standard_pe(&f, 6).unwrap()
        );
        assert_eq!(encode(PeMode::None, &f, 6, &none).unwrap(), vec![0.0; 96]);
        let bad = FieldGeometry::new(vec![], f.geometry);
        assert_eq!(
            encode(PeMode::Local, &bad, 4, &none),
            Err(ProtoError::NoLevels)
        );
    }

    /// A mode that says it does not depend on the window gives the same table for any window
    /// (so the pipeline may compute it once); one that does, differs between two windows.
    #[test]
    fn modes_that_ignore_the_window_give_one_table() {
        let f = tiny();
        let window = |lon: f64, year: f32| {
            let infos: Vec<TokenInfo> = (0..16)
                .map(|_| TokenInfo {
                    year,
                    lon: lon as f32,
                    ..info(850.0)
                })
                .collect();
            (
                GlobalOffsets {
                    t: 3.0,
                    lat: 10.0,
                    lon,
                    lon_period: Some(160.0),
                },
                infos,
            )
        };
        let (a, b) = (window(7.0, 2001.0), window(90.0, 2017.0));
        for mode in PeMode::ALL {
            let pe = |(offsets, infos): &(GlobalOffsets, Vec<TokenInfo>)| {
                encode(
                    mode,
                    &f,
                    8,
                    &PeInputs {
                        global_offsets: Some(*offsets),
                        token_infos: Some(infos),
                    },
                )
                .unwrap()
            };
            if mode.depends_on_window() {
                assert_ne!(pe(&a), pe(&b), "{mode}");
            } else {
                assert_eq!(pe(&a), pe(&b), "{mode}");
                assert_eq!(pe(&a), encode(mode, &f, 8, &PeInputs::default()).unwrap());
            }
        }
    }

    #[test]
    fn mode_names() {
        for (mode, name) in
            PeMode::ALL
                .iter()
                .zip(["global", "local", "standard", "info+standard", "none"])
        {
            assert_eq!(mode.to_string(), name);
            assert_eq!(name.parse::<PeMode>().unwrap(), *mode);
            assert_eq!(serde_json::to_string(mode).unwrap(), format!("\"{name}\""));
            assert_eq!(
                serde_json::from_str::<PeMode>(&format!("\"{name}\"")).unwrap(),
                *mode
            );
        }
        assert_eq!(
            "info-standard".parse::<PeMode>().unwrap(),
            PeMode::InfoStandard
        );
        assert_eq!(" Global ".parse::<PeMode>().unwrap(), PeMode::Global);
        assert_eq!(
            serde_json::from_str::<PeMode>("\"info-standard\"").unwrap(),
            PeMode::InfoStandard
        );
        assert_eq!(
            "rope".parse::<PeMode>(),
            Err(ProtoError::UnknownPeMode("rope".into()))
        );
    }
}
