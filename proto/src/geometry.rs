//! How a field sample is cut into tokens (docs/design.md §3).
//!
//! A field sample is, for each of the field's levels, a box (window) of grid points along
//! (time, lat, lon) cut into `num_tokens = (nt, nlat, nlon)` tokens of `token_size = (t, lat, lon)`
//! grid points each. Axis arrays in this crate are always ordered **(time, lat, lon)**.
//!
//! - Token order in a sample is (level, t, lat, lon), row-major: token `(l, t, y, x)` has index
//!   `((l·nt + t)·nlat + y)·nlon + x`.
//! - Value order inside a token is (t, lat, lon), row-major.
//! - Token `(t, y, x)` covers window grid points `t·ts .. (t+1)·ts` in time (and likewise in
//!   lat and lon), see [`TokenGeometry::token_grid_start`].

use serde::{Deserialize, Serialize};

use crate::error::{ProtoError, Result};

/// Names of the three token axes, in the order of every `[_; 3]` in this crate.
pub const AXES: [&str; 3] = ["time", "lat", "lon"];

/// Token counts and token sizes along (time, lat, lon) of one level of a field sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TokenGeometry {
    /// Tokens along (time, lat, lon): `(nt, nlat, nlon)`.
    pub num_tokens: [usize; 3],
    /// Grid points per token along (time, lat, lon).
    pub token_size: [usize; 3],
}

impl Default for TokenGeometry {
    /// [`TokenGeometry::ATMOREP_2023`].
    fn default() -> Self {
        Self::ATMOREP_2023
    }
}

impl TokenGeometry {
    /// AtmoRep's 2023 default: 12×6×12 tokens of 3×9×9 grid points (36 h × 13.5° × 27° on the
    /// hourly 0.25° grid).
    pub const ATMOREP_2023: Self = Self::new([12, 6, 12], [3, 9, 9]);

    /// A geometry from its token counts and token sizes, both along (time, lat, lon).
    pub const fn new(num_tokens: [usize; 3], token_size: [usize; 3]) -> Self {
        Self {
            num_tokens,
            token_size,
        }
    }

    /// [`Self::ATMOREP_2023`].
    pub const fn atmorep_2023() -> Self {
        Self::ATMOREP_2023
    }

    /// Checks that every count and size is at least 1 and that the window's number of values
    /// fits in `usize`.
    pub fn validate(&self) -> Result<()> {
        self.validate_levels(1)
    }

    fn validate_levels(&self, levels: usize) -> Result<()> {
        for (what, extents) in [
            ("num_tokens", self.num_tokens),
            ("token_size", self.token_size),
        ] {
            if let Some(axis) = extents.iter().position(|&n| n == 0) {
                return Err(ProtoError::ZeroExtent {
                    what,
                    axis: AXES[axis],
                });
            }
        }
        let overflow = || ProtoError::Overflow {
            num_tokens: self.num_tokens,
            token_size: self.token_size,
            levels,
        };
        let mut numel = levels;
        for extent in self.num_tokens.iter().chain(&self.token_size) {
            numel = numel.checked_mul(*extent).ok_or_else(overflow)?;
        }
        Ok(())
    }

    /// Grid points the window covers along (time, lat, lon): `(nt·t, nlat·lat, nlon·lon)`.
    pub fn window(&self) -> [usize; 3] {
        [0, 1, 2].map(|a| self.num_tokens[a] * self.token_size[a])
    }

    /// Values of one level of the window (= of all tokens of one level).
    pub fn window_numel(&self) -> usize {
        self.window().iter().product()
    }

    /// Values per token: `t·lat·lon`.
    pub fn token_numel(&self) -> usize {
        self.token_size.iter().product()
    }

    /// Tokens per level: `nt·nlat·nlon`.
    pub fn tokens_per_level(&self) -> usize {
        self.num_tokens.iter().product()
    }

    /// Index within one level of token `(t, y, x)`, `None` when out of range.
    pub fn token_index(&self, t: usize, y: usize, x: usize) -> Option<usize> {
        row_major_index(self.num_tokens, [t, y, x])
    }

    /// The inverse of [`Self::token_index`]: `(t, y, x)` of the token at `index` within a level.
    pub fn token_coords(&self, index: usize) -> Option<[usize; 3]> {
        row_major_coords(self.num_tokens, index)
    }

    /// Index inside a token of the value at offset `(dt, dy, dx)` from the token's first grid
    /// point, `None` when out of range.
    pub fn value_index(&self, dt: usize, dy: usize, dx: usize) -> Option<usize> {
        row_major_index(self.token_size, [dt, dy, dx])
    }

    /// First window grid point (time, lat, lon) covered by token `(t, y, x)`:
    /// `(t·ts_t, y·ts_lat, x·ts_lon)`; the token covers `token_size` points from there.
    pub fn token_grid_start(&self, t: usize, y: usize, x: usize) -> [usize; 3] {
        let s = self.token_size;
        [t * s[0], y * s[1], x * s[2]]
    }

    /// Where window grid point `point` (time, lat, lon) of the level at position `level` sits
    /// in a sample's token-ordered values (`[tokens, token values]` row-major): token index ×
    /// [`Self::token_numel`] + value index. The point must lie in the window.
    #[inline]
    pub fn value_position(&self, level: usize, point: [usize; 3]) -> usize {
        let [nt, ny, nx] = self.num_tokens;
        let [st, sy, sx] = self.token_size;
        let [t, y, x] = point;
        debug_assert!(
            t < nt * st && y < ny * sy && x < nx * sx,
            "{point:?} leaves the window"
        );
        let token = ((level * nt + t / st) * ny + y / sy) * nx + x / sx;
        token * self.token_numel() + ((t % st) * sy + y % sy) * sx + x % sx
    }
}

/// The token geometry of one field together with the levels it is sampled at.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FieldGeometry {
    /// The field's vertical levels as the store names them (ERA5 model-level numbers such as
    /// 96…137, or pressure levels in hPa). A level's *position* in this list is its level
    /// index in token order; the token-index functions take that position, not the name.
    pub levels: Vec<usize>,
    /// Tokens of every level.
    pub geometry: TokenGeometry,
}

impl Default for FieldGeometry {
    /// [`FieldGeometry::atmorep_2023`].
    fn default() -> Self {
        Self::atmorep_2023()
    }
}

impl FieldGeometry {
    /// AtmoRep's 2023 default levels (ERA5 model levels).
    pub const ATMOREP_2023_LEVELS: [usize; 5] = [96, 105, 114, 123, 137];

    /// A field geometry from its levels and token geometry.
    pub fn new(levels: Vec<usize>, geometry: TokenGeometry) -> Self {
        Self { levels, geometry }
    }

    /// AtmoRep's 2023 default: model levels 96, 105, 114, 123, 137, each with
    /// [`TokenGeometry::ATMOREP_2023`].
    pub fn atmorep_2023() -> Self {
        Self::new(
            Self::ATMOREP_2023_LEVELS.to_vec(),
            TokenGeometry::ATMOREP_2023,
        )
    }

    /// Checks the token geometry, that there is at least one level, that no level is listed
    /// twice, and that the sample's number of values fits in `usize`.
    pub fn validate(&self) -> Result<()> {
        if self.levels.is_empty() {
            return Err(ProtoError::NoLevels);
        }
        for (i, level) in self.levels.iter().enumerate() {
            if self.levels[..i].contains(level) {
                return Err(ProtoError::DuplicateLevel(*level));
            }
        }
        self.geometry.validate_levels(self.levels.len())
    }

    /// Number of levels.
    pub fn num_levels(&self) -> usize {
        self.levels.len()
    }

    /// Tokens of the whole sample: levels × tokens per level.
    pub fn num_tokens_total(&self) -> usize {
        self.num_levels() * self.geometry.tokens_per_level()
    }

    /// Values of the whole sample: levels × window values.
    pub fn numel(&self) -> usize {
        self.num_levels() * self.geometry.window_numel()
    }

    /// Index in token order (level, t, lat, lon) of token `(t, y, x)` of the level at position
    /// `level` in [`Self::levels`]; `None` when any index is out of range.
    pub fn token_index(&self, level: usize, t: usize, y: usize, x: usize) -> Option<usize> {
        let [nt, ny, nx] = self.geometry.num_tokens;
        row_major_index([self.num_levels(), nt, ny, nx], [level, t, y, x])
    }

    /// The inverse of [`Self::token_index`]: `(level position, t, y, x)`.
    pub fn token_coords(&self, index: usize) -> Option<[usize; 4]> {
        let [nt, ny, nx] = self.geometry.num_tokens;
        row_major_coords([self.num_levels(), nt, ny, nx], index)
    }
}

fn row_major_index<const N: usize>(shape: [usize; N], coords: [usize; N]) -> Option<usize> {
    let mut index = 0usize;
    for (&n, &c) in shape.iter().zip(&coords) {
        if c >= n {
            return None;
        }
        index = index.checked_mul(n)?.checked_add(c)?;
    }
    Some(index)
}

fn row_major_coords<const N: usize>(shape: [usize; N], mut index: usize) -> Option<[usize; N]> {
    let mut coords = [0; N];
    for a in (0..N).rev() {
        if shape[a] == 0 {
            return None;
        }
        coords[a] = index % shape[a];
        index /= shape[a];
    }
    (index == 0).then_some(coords)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atmorep_default() {
        let g = TokenGeometry::default();
        assert_eq!(g, TokenGeometry::atmorep_2023());
        assert_eq!(g.window(), [36, 54, 108]);
        assert_eq!(g.token_numel(), 243);
        assert_eq!(g.tokens_per_level(), 864);
        assert_eq!(g.window_numel(), 36 * 54 * 108);
        let f = FieldGeometry::default();
        assert_eq!(f.levels, vec![96, 105, 114, 123, 137]);
        assert_eq!(f.num_tokens_total(), 5 * 864);
        assert_eq!(f.numel(), 5 * 864 * 243);
        f.validate().unwrap();
    }

    #[test]
    fn validation() {
        let bad = TokenGeometry::new([2, 0, 2], [1, 1, 1]);
        assert_eq!(
            bad.validate(),
            Err(ProtoError::ZeroExtent {
                what: "num_tokens",
                axis: "lat"
            })
        );
        let bad = TokenGeometry::new([2, 2, 2], [1, 1, 0]);
        assert!(matches!(
            bad.validate(),
            Err(ProtoError::ZeroExtent {
                what: "token_size",
                axis: "lon"
            })
        ));
        let huge = TokenGeometry::new([usize::MAX, 2, 1], [1, 1, 1]);
        assert!(matches!(huge.validate(), Err(ProtoError::Overflow { .. })));
        let g = TokenGeometry::new([2, 2, 2], [1, 1, 1]);
        assert_eq!(
            FieldGeometry::new(vec![], g).validate(),
            Err(ProtoError::NoLevels)
        );
        assert_eq!(
            FieldGeometry::new(vec![850, 500, 850], g).validate(),
            Err(ProtoError::DuplicateLevel(850))
        );
        // 2^(BITS-1) values per level fit a usize, two levels do not.
        let half = usize::BITS / 2;
        let many = TokenGeometry::new([1 << (half - 1), 1 << half, 1], [1, 1, 1]);
        many.validate().unwrap();
        assert!(matches!(
            FieldGeometry::new(vec![1, 2], many).validate(),
            Err(ProtoError::Overflow { .. })
        ));
    }

    #[test]
    fn token_index_round_trip() {
        let f = FieldGeometry::new(
            vec![850, 500, 300],
            TokenGeometry::new([2, 3, 4], [3, 9, 9]),
        );
        let mut expected = 0;
        for l in 0..3 {
            for t in 0..2 {
                for y in 0..3 {
                    for x in 0..4 {
                        // Token order (level, t, lat, lon): the index counts up in loop order.
                        assert_eq!(f.token_index(l, t, y, x), Some(expected));
                        assert_eq!(f.token_coords(expected), Some([l, t, y, x]));
                        expected += 1;
                    }
                }
            }
        }
        assert_eq!(expected, f.num_tokens_total());
        assert_eq!(f.token_coords(expected), None);
        assert_eq!(f.token_index(3, 0, 0, 0), None);
        assert_eq!(f.token_index(0, 2, 0, 0), None);
        assert_eq!(f.token_index(0, 0, 3, 0), None);
        assert_eq!(f.token_index(0, 0, 0, 4), None);
        assert_eq!(f.token_index(1, 1, 2, 3), Some(24 + 12 + 8 + 3));

        let g = f.geometry;
        for i in 0..g.tokens_per_level() {
            let [t, y, x] = g.token_coords(i).unwrap();
            assert_eq!(g.token_index(t, y, x), Some(i));
        }
        let mut expected = 0;
        for dt in 0..3 {
            for dy in 0..9 {
                for dx in 0..9 {
                    // Values (t, lat, lon) row-major: the index counts up in loop order.
                    assert_eq!(g.value_index(dt, dy, dx), Some(expected));
                    expected += 1;
                }
            }
        }
        assert_eq!(expected, g.token_numel());
        assert_eq!(g.value_index(1, 2, 3), Some(81 + 18 + 3));
        assert_eq!(g.value_index(3, 0, 0), None);
        assert_eq!(g.token_grid_start(1, 2, 3), [3, 18, 27]);
    }

    #[test]
    fn value_positions_follow_token_order_and_add_up_by_axis() {
        let f = FieldGeometry::new(vec![850, 500], TokenGeometry::new([2, 3, 4], [3, 2, 5]));
        let g = f.geometry;
        let [wt, wy, wx] = g.window();
        let mut seen = vec![false; f.numel()];
        for l in 0..2 {
            for t in 0..wt {
                for y in 0..wy {
                    for x in 0..wx {
                        let p = g.value_position(l, [t, y, x]);
                        let [t0, y0, x0] = [t / 3, y / 2, x / 5];
                        let token = f.token_index(l, t0, y0, x0).unwrap();
                        let value = g.value_index(t % 3, y % 2, x % 5).unwrap();
                        assert_eq!(p, token * g.token_numel() + value);
                        let terms = g.value_position(l, [0, 0, 0])
                            + g.value_position(0, [t, 0, 0])
                            + g.value_position(0, [0, y, 0])
                            + g.value_position(0, [0, 0, x]);
                        assert_eq!(p, terms);
                        assert!(!std::mem::replace(&mut seen[p], true));
                    }
                }
            }
        }
        assert!(seen.iter().all(|&s| s));
    }

    #[test]
    fn serde_round_trip() {
        let f = FieldGeometry::atmorep_2023();
        let json = serde_json::to_string(&f).unwrap();
        assert_eq!(
            json,
            r#"{"levels":[96,105,114,123,137],"geometry":{"num_tokens":[12,6,12],"token_size":[3,9,9]}}"#
        );
        assert_eq!(serde_json::from_str::<FieldGeometry>(&json).unwrap(), f);
    }
}
