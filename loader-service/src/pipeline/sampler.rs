//! Where samples come from. A sample is one centre shared by all fields; each field cuts its own
//! window (its own token geometry) around it. Centres are drawn per docs/design.md §3: time uniform over
//! the positions where every field's window fits the time range (never a negative index),
//! latitude weighted by area (cos φ) unless configured uniform, longitude uniform with windows
//! wrapping across 0°/360°, and windows near a pole shifted inward to stay on the grid. Tiling
//! covers the globe with (optionally overlapping) windows in time order; the contract's
//! `atmorep_proto::stitch::TileStitcher` is its inverse.

use std::ops::Range;

use atmorep_proto::stitch::tile_starts;
use rand::Rng;
use serde::{Deserialize, Serialize};

/// A window size in grid points: (time steps, latitudes, longitudes).
pub type Window = [usize; 3];

/// How centre latitudes are drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LatitudeWeighting {
    /// Proportional to the area a grid row represents (cos φ): every square kilometre equally.
    #[default]
    Area,
    /// Every grid row equally (over-samples the poles on a regular grid).
    Uniform,
}

/// Why a sampler cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SamplerError {
    #[error("field `{field}`: window {window:?} does not fit the grid ({nlat} × {nlon})")]
    WindowTooLarge {
        field: String,
        window: Window,
        nlat: usize,
        nlon: usize,
    },
    #[error("time range {range:?} has no room for a {steps}-step window (field `{field}`)")]
    NoRoomInTime {
        field: String,
        range: Range<usize>,
        steps: usize,
    },
    #[error("time range {range:?} is outside the store's {len} time steps")]
    TimeRange { range: Range<usize>, len: usize },
    #[error("no fields given")]
    NoFields,
    #[error("tile overlap {overlap:?} must be smaller than the window {window:?}")]
    Overlap { overlap: Window, window: Window },
}

/// The window of one field for one sample: start indices in canonical grid coordinates; the
/// longitude window wraps past the last longitude.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldWindow {
    pub time_start: usize,
    pub lat_start: usize,
    pub lon_start: usize,
    pub size: Window,
}

/// A sample centre in grid indices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Centre {
    pub time: usize,
    pub lat: usize,
    pub lon: usize,
}

/// Draws sample centres and cuts each field's window around them.
#[derive(Debug, Clone)]
pub struct Sampler {
    nlat: usize,
    nlon: usize,
    time_range: Range<usize>,
    windows: Vec<Window>,
    /// Admissible centre times (inclusive bounds).
    centre_times: (usize, usize),
    /// Cumulative weights of the centre latitude rows.
    lat_cdf: Vec<f64>,
}

impl Sampler {
    /// A sampler over `time_range` of a grid with canonical latitudes `lats` (degrees,
    /// north→south) and `nlon` longitudes, for fields with the given windows.
    pub fn new(
        lats: &[f64],
        nlon: usize,
        ntimes: usize,
        time_range: Range<usize>,
        fields: &[(String, Window)],
        weighting: LatitudeWeighting,
    ) -> Result<Self, SamplerError> {
        let nlat = lats.len();
        if fields.is_empty() {
            return Err(SamplerError::NoFields);
        }
        if time_range.end > ntimes || time_range.is_empty() {
            return Err(SamplerError::TimeRange {
                range: time_range,
                len: ntimes,
            });
        }
        let (mut lo, mut hi) = (time_range.start as isize, time_range.end as isize - 1);
        for (name, w) in fields {
            if w.contains(&0) || w[1] > nlat || w[2] > nlon {
                return Err(SamplerError::WindowTooLarge {
                    field: name.clone(),
                    window: *w,
                    nlat,
                    nlon,
                });
            }
            // The window starts at centre − ⌊w/2⌋ and must end inside the range.
            let half = (w[0] / 2) as isize;
            lo = lo.max(time_range.start as isize + half);
            hi = hi.min(time_range.end as isize - w[0] as isize + half);
            if w[0] > time_range.len() || lo > hi {
                return Err(SamplerError::NoRoomInTime {
                    field: name.clone(),
                    range: time_range,
                    steps: w[0],
                });
            }
        }
        let weights: Vec<f64> = lats
            .iter()
            .map(|lat| match weighting {
                // Pole rows represent half a cell: weight them by the cap they stand for.
                LatitudeWeighting::Area => lat.to_radians().cos().max(0.0) + cap_weight(lats, *lat),
                LatitudeWeighting::Uniform => 1.0,
            })
            .collect();
        let mut acc = 0.0;
        let lat_cdf = weights
            .iter()
            .map(|w| {
                acc += w;
                acc
            })
            .collect();
        Ok(Self {
            nlat,
            nlon,
            time_range,
            windows: fields.iter().map(|f| f.1).collect(),
            centre_times: (lo as usize, hi as usize),
            lat_cdf,
        })
    }

    /// The time range samples are drawn from.
    pub fn time_range(&self) -> &Range<usize> {
        &self.time_range
    }

    /// Draws a centre.
    pub fn draw(&self, rng: &mut impl Rng) -> Centre {
        let time = rng.random_range(self.centre_times.0..=self.centre_times.1);
        let total = *self.lat_cdf.last().expect("non-empty grid");
        let u = rng.random::<f64>() * total;
        let lat = self.lat_cdf.partition_point(|&c| c <= u).min(self.nlat - 1);
        let lon = rng.random_range(0..self.nlon);
        Centre { time, lat, lon }
    }

    /// The window of field `index` around `centre`, shifted inward at the poles.
    pub fn window(&self, index: usize, centre: Centre) -> FieldWindow {
        let [wt, wy, wx] = self.windows[index];
        let lat_start = centre.lat.saturating_sub(wy / 2).min(self.nlat - wy);
        FieldWindow {
            time_start: centre.time - wt / 2,
            lat_start,
            lon_start: (centre.lon + self.nlon - wx / 2) % self.nlon,
            size: [wt, wy, wx],
        }
    }
}

/// Extra weight of a pole row: on a grid that includes the poles, the pole row stands for the
/// polar cap of half a grid spacing, whose area cos φ (= 0) does not capture.
fn cap_weight(lats: &[f64], lat: f64) -> f64 {
    if lats.len() < 2 || (lat.abs() - 90.0).abs() > 1e-9 {
        return 0.0;
    }
    let half = ((lats[0] - lats[1]).abs() / 2.0).to_radians();
    // Cap area relative to a cos φ · Δφ band: (1 − cos h) / Δφ with Δφ = 2h.
    (1.0 - half.cos()) / (2.0 * half)
}

/// A whole-globe tiling of one field's windows, in time order, for inference and downstream use.
#[derive(Debug, Clone)]
pub struct Tiling {
    pub window: Window,
    pub overlap: Window,
    pub nlat: usize,
    pub nlon: usize,
    pub time_range: Range<usize>,
    tiles: Vec<FieldWindow>,
}

impl Tiling {
    /// Tiles covering every grid point of `time_range` at least once.
    pub fn new(
        nlat: usize,
        nlon: usize,
        time_range: Range<usize>,
        window: Window,
        overlap: Window,
    ) -> Result<Self, SamplerError> {
        if overlap.iter().zip(window).any(|(o, w)| *o >= w) {
            return Err(SamplerError::Overlap { overlap, window });
        }
        if window[1] > nlat || window[2] > nlon || window.contains(&0) {
            return Err(SamplerError::WindowTooLarge {
                field: "tiling".into(),
                window,
                nlat,
                nlon,
            });
        }
        if window[0] > time_range.len() {
            return Err(SamplerError::NoRoomInTime {
                field: "tiling".into(),
                range: time_range,
                steps: window[0],
            });
        }
        let times = tile_starts(time_range.len(), window[0], overlap[0], false);
        let lats = tile_starts(nlat, window[1], overlap[1], false);
        let lons = tile_starts(nlon, window[2], overlap[2], true);
        let mut tiles = Vec::new();
        for &t in &times {
            for &y in &lats {
                for &x in &lons {
                    tiles.push(FieldWindow {
                        time_start: time_range.start + t,
                        lat_start: y,
                        lon_start: x % nlon,
                        size: window,
                    });
                }
            }
        }
        Ok(Self {
            window,
            overlap,
            nlat,
            nlon,
            time_range,
            tiles,
        })
    }

    /// The tiles, time-major.
    pub fn tiles(&self) -> &[FieldWindow] {
        &self.tiles
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn era5_lats(step: f64) -> Vec<f64> {
        let n = (180.0 / step) as usize + 1;
        (0..n).map(|j| 90.0 - step * j as f64).collect()
    }

    #[test]
    fn windows_never_leave_the_grid_and_reach_poles_and_seam() {
        let lats = era5_lats(1.0);
        let fields = vec![
            ("t".to_string(), [36, 54, 108]),
            ("z".to_string(), [12, 27, 27]),
        ];
        let s = Sampler::new(&lats, 360, 100, 10..90, &fields, LatitudeWeighting::Area).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let (mut north, mut south, mut seam) = (false, false, false);
        for _ in 0..20_000 {
            let c = s.draw(&mut rng);
            for f in 0..2 {
                let w = s.window(f, c);
                assert!(
                    w.time_start >= 10 && w.time_start + w.size[0] <= 90,
                    "{w:?}"
                );
                assert!(w.lat_start + w.size[1] <= 181);
                assert!(w.lon_start < 360);
                north |= w.lat_start == 0;
                south |= w.lat_start + w.size[1] == 181;
                seam |= w.lon_start + w.size[2] > 360;
            }
        }
        assert!(north && south && seam);
    }

    #[test]
    fn centre_latitudes_follow_area() {
        let lats = era5_lats(10.0);
        let s = Sampler::new(
            &lats,
            36,
            10,
            0..10,
            &[("t".into(), [1, 1, 1])],
            LatitudeWeighting::Area,
        )
        .unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let n = 200_000;
        let mut counts = vec![0f64; lats.len()];
        for _ in 0..n {
            counts[s.draw(&mut rng).lat] += 1.0;
        }
        // Expected: area of each row's band on the sphere (the poles get their caps).
        let band = |j: usize| {
            let top = (lats[j] + 5.0).min(90.0).to_radians().sin();
            let bottom = (lats[j] - 5.0).max(-90.0).to_radians().sin();
            top - bottom
        };
        let total: f64 = (0..lats.len()).map(band).sum();
        let chi2: f64 = (0..lats.len())
            .map(|j| {
                let e = band(j) / total * n as f64;
                (counts[j] - e).powi(2) / e
            })
            .sum();
        // 18 degrees of freedom: the 0.999 quantile is 42.3.
        assert!(chi2 < 42.3, "chi² = {chi2}, counts {counts:?}");
        // Uniform weighting puts far more mass on the pole rows.
        let u = Sampler::new(
            &lats,
            36,
            10,
            0..10,
            &[("t".into(), [1, 1, 1])],
            LatitudeWeighting::Uniform,
        )
        .unwrap();
        let poles = (0..n).filter(|_| {
            let c = u.draw(&mut rng);
            c.lat == 0 || c.lat == 18
        });
        assert!(poles.count() as f64 > 0.09 * n as f64);
    }

    #[test]
    fn bad_geometry_is_named() {
        let lats = era5_lats(10.0);
        let err = Sampler::new(
            &lats,
            36,
            10,
            0..10,
            &[("vo".into(), [3, 20, 5])],
            LatitudeWeighting::Area,
        )
        .unwrap_err();
        assert!(err.to_string().contains("vo"));
        let err = Sampler::new(
            &lats,
            36,
            10,
            2..6,
            &[("d".into(), [5, 3, 3])],
            LatitudeWeighting::Area,
        )
        .unwrap_err();
        assert!(matches!(err, SamplerError::NoRoomInTime { .. }) && err.to_string().contains('d'));
        assert!(
            Sampler::new(
                &lats,
                36,
                10,
                0..11,
                &[("d".into(), [1, 1, 1])],
                LatitudeWeighting::Area
            )
            .is_err()
        );
    }

    #[test]
    fn tiling_covers_every_grid_point() {
        let (nt, ny, nx) = (7, 19, 36);
        for overlap in [[0, 0, 0], [1, 3, 4]] {
            let tiling = Tiling::new(ny, nx, 2..2 + nt, [3, 6, 10], overlap).unwrap();
            let mut hits = vec![0u32; nt * ny * nx];
            let mut last_time = 0;
            for tile in tiling.tiles() {
                assert_eq!(tile.size, [3, 6, 10]);
                assert!(
                    tile.time_start >= 2 && tile.time_start + 3 <= 2 + nt,
                    "{tile:?}"
                );
                assert!(tile.lat_start + 6 <= ny && tile.lon_start < nx, "{tile:?}");
                assert!(tile.time_start >= last_time, "tiles come time-major");
                last_time = tile.time_start;
                for t in 0..3 {
                    for y in 0..6 {
                        for x in 0..10 {
                            let (tt, yy, xx) = (
                                tile.time_start - 2 + t,
                                tile.lat_start + y,
                                (tile.lon_start + x) % nx,
                            );
                            hits[(tt * ny + yy) * nx + xx] += 1;
                        }
                    }
                }
            }
            assert!(hits.iter().all(|&h| h > 0), "overlap {overlap:?}");
            if overlap == [0, 0, 0] {
                // Only where the axis does not divide evenly do tiles overlap.
                assert!(hits.contains(&1));
            }
        }
        assert!(Tiling::new(ny, nx, 0..nt, [3, 6, 10], [3, 0, 0]).is_err());
    }
}
