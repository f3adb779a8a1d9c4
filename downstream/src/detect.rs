//! Tropical-cyclone detection on one time step, in the TempestExtremes tradition (docs/design.md §6).
//!
//! 1. Candidates are local maxima of *cyclonic* relative vorticity at 850 hPa — the sign flipped
//!    south of the equator, where cyclones turn clockwise — above a threshold and within a
//!    latitude band.
//! 2. Candidates closer than the merge distance are one system; the strongest stays.
//! 3. A candidate is kept when the 850 hPa geopotential has a closed contour around it: along
//!    every ray from the centre the geopotential rises by at least `delta` within the radius.
//!    Rays (rather than a flood fill) keep the check local and cheap; with 32 of them a gap in
//!    the contour narrower than ~11° of bearing is the only thing they can miss.
//! 4. Where both upper levels exist, the 300–500 hPa thickness must fall the same way around
//!    its maximum near the centre: a warm core. By default the thickness is taken as a
//!    deviation from its zonal mean, so that a planetary-scale meridional gradient steeper than
//!    the storm's own anomaly does not open every contour on the equatorward side (see
//!    [`crate::WarmCoreConfig::zonal_anomaly`]). Without geopotential aloft the thickness comes
//!    from the layer-mean temperature (hypsometric equation); without either the check is
//!    skipped and the detection says so.
//!
//! Distances are great-circle distances; longitude is periodic throughout.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::config::{ContourConfig, DetectConfig};
use crate::error::Result;
use crate::field::{Field, FieldSnapshot, Grid};
use crate::geo::{destination, distance_deg, wrap_360};

/// Gas constant of dry air (J kg⁻¹ K⁻¹), for thickness from temperature.
const R_DRY: f64 = 287.05;

/// A cyclone centre found at one time step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Detection {
    /// Valid time, unix seconds (UTC).
    pub time_unix: i64,
    /// Centre latitude (degrees north).
    pub lat: f64,
    /// Centre longitude (degrees east, [0, 360)).
    pub lon: f64,
    /// Relative vorticity at the maximum grid point (s⁻¹, signed: negative in the south).
    pub vorticity: f64,
    /// Geopotential at the centre (m² s⁻²): the contour's reference value.
    pub z_centre: f64,
    /// Smallest rise of geopotential over all rays (m² s⁻²): how deep the closed low is.
    pub closed_contour: f64,
    /// Smallest fall of thickness over all rays (m² s⁻²); `None` when not checked.
    pub warm_core: Option<f64>,
}

/// Detections of every time step (in parallel over steps), in the order of `snapshots`.
pub fn detect(snapshots: &[FieldSnapshot], cfg: &DetectConfig) -> Result<Vec<Vec<Detection>>> {
    cfg.validate()?;
    snapshots
        .par_iter()
        .map(|s| detect_step_unchecked(s, cfg))
        .collect()
}

/// Detections of one time step, strongest first.
pub fn detect_step(snapshot: &FieldSnapshot, cfg: &DetectConfig) -> Result<Vec<Detection>> {
    cfg.validate()?;
    detect_step_unchecked(snapshot, cfg)
}

fn detect_step_unchecked(snapshot: &FieldSnapshot, cfg: &DetectConfig) -> Result<Vec<Detection>> {
    let vo = snapshot.require(&cfg.vorticity, cfg.level)?;
    let z = snapshot.require(&cfg.geopotential, cfg.level)?;
    let thickness = Thickness::of(snapshot, cfg);
    let grid = vo.grid();
    let step = cfg.ray_step_deg.unwrap_or(grid.spacing() / 2.0);
    let mut out = Vec::new();
    for c in merge(grid, candidates(vo, cfg), cfg.merge_distance_deg) {
        let (lat, lon) = if cfg.refine {
            refine(vo, c.j, c.i)
        } else {
            (grid.lat(c.j), grid.lon(c.i))
        };
        let at = |lat: f64, lon: f64| z.interpolate(lat, lon);
        let Some((z_centre, depth)) =
            closed_contour(&at, grid, lat, lon, &cfg.closed_contour, cfg.rays, step)
        else {
            continue;
        };
        let warm_core = match &thickness {
            Some(th) if cfg.warm_core.enabled => {
                // A maximum that must fall off: the same test on the negated thickness.
                let neg = |lat: f64, lon: f64| -th.at(lat, lon);
                let contour = cfg.warm_core.contour();
                match closed_contour(&neg, grid, lat, lon, &contour, cfg.rays, step) {
                    Some((_, fall)) => Some(fall),
                    None => continue,
                }
            }
            _ => None,
        };
        out.push(Detection {
            time_unix: snapshot.time_unix,
            lat,
            lon,
            vorticity: f64::from(vo.get(c.j, c.i)),
            z_centre,
            closed_contour: depth,
            warm_core,
        });
    }
    Ok(out)
}

/// The upper-level thickness, from geopotential or (hypsometrically) from temperature, as a
/// deviation from its zonal mean when so configured.
struct Thickness<'a> {
    source: ThicknessSource<'a>,
    /// Zonal mean per grid row, subtracted from every value; empty: none.
    zonal_mean: Vec<f64>,
    grid: Grid,
}

enum ThicknessSource<'a> {
    Geopotential {
        upper: &'a Field,
        lower: &'a Field,
    },
    Temperature {
        upper: &'a Field,
        lower: &'a Field,
        factor: f64,
    },
}

impl<'a> ThicknessSource<'a> {
    fn combine(&self, up: f64, low: f64) -> f64 {
        match self {
            Self::Geopotential { .. } => up - low,
            Self::Temperature { factor, .. } => factor * (up + low),
        }
    }

    fn fields(&self) -> (&'a Field, &'a Field) {
        match self {
            Self::Geopotential { upper, lower } | Self::Temperature { upper, lower, .. } => {
                (upper, lower)
            }
        }
    }
}

impl<'a> Thickness<'a> {
    fn of(s: &'a FieldSnapshot, cfg: &DetectConfig) -> Option<Self> {
        let (up, low) = (cfg.warm_core.upper_level, cfg.warm_core.lower_level);
        let pair = |var: &str| Some((s.get(var, Some(up))?, s.get(var, Some(low))?));
        let source = if let Some((upper, lower)) = pair(&cfg.geopotential) {
            ThicknessSource::Geopotential { upper, lower }
        } else {
            // Hypsometric: Φ_up − Φ_low = R_d · T̄ · ln(p_low / p_up), T̄ ≈ the mean of the two
            // levels.
            let (upper, lower) = pair(&cfg.temperature)?;
            ThicknessSource::Temperature {
                upper,
                lower,
                factor: R_DRY * (low / up).ln() / 2.0,
            }
        };
        let (upper, lower) = source.fields();
        let grid = *upper.grid();
        let zonal_mean = if cfg.warm_core.zonal_anomaly {
            let mean = |f: &Field, j: usize| {
                let row = &f.values()[j * grid.nlon..(j + 1) * grid.nlon];
                row.iter().map(|&v| f64::from(v)).sum::<f64>() / grid.nlon as f64
            };
            (0..grid.nlat)
                .map(|j| source.combine(mean(upper, j), mean(lower, j)))
                .collect()
        } else {
            Vec::new()
        };
        Some(Self {
            source,
            zonal_mean,
            grid,
        })
    }

    fn at(&self, lat: f64, lon: f64) -> f64 {
        let (upper, lower) = self.source.fields();
        let raw = self
            .source
            .combine(upper.interpolate(lat, lon), lower.interpolate(lat, lon));
        if self.zonal_mean.is_empty() {
            return raw;
        }
        let y = self
            .grid
            .row_of(lat)
            .clamp(0.0, (self.grid.nlat - 1) as f64);
        let j0 = y.floor() as usize;
        let j1 = (j0 + 1).min(self.grid.nlat - 1);
        let fy = y - y.floor();
        raw - ((1.0 - fy) * self.zonal_mean[j0] + fy * self.zonal_mean[j1])
    }
}

/// A local maximum of cyclonic vorticity at grid point (`j`, `i`).
#[derive(Debug, Clone, Copy)]
struct Candidate {
    j: usize,
    i: usize,
    cyclonic: f32,
}

/// Sign that makes cyclonic vorticity positive at latitude `lat`.
fn hemisphere_sign(lat: f64) -> f32 {
    if lat < 0.0 { -1.0 } else { 1.0 }
}

fn candidates(vo: &Field, cfg: &DetectConfig) -> Vec<Candidate> {
    let g = vo.grid();
    let threshold = cfg.vorticity_threshold as f32;
    let mut out = Vec::new();
    // The first and last rows lack a neighbour row; they are poles or a grid edge, never a
    // tropical centre.
    for j in 1..g.nlat - 1 {
        let lat = g.lat(j);
        if lat.abs() > cfg.max_abs_lat {
            continue;
        }
        let sign = hemisphere_sign(lat);
        for i in 0..g.nlon {
            let c = sign * vo.get(j, i);
            if c.is_nan() || c < threshold {
                continue;
            }
            let is_max = (-1isize..=1).all(|dj| {
                (-1isize..=1).all(|di| {
                    let jj = (j as isize + dj) as usize;
                    let ii = g.wrap_col(i as isize + di);
                    (dj == 0 && di == 0) || c >= sign * vo.get(jj, ii)
                })
            });
            if is_max {
                out.push(Candidate { j, i, cyclonic: c });
            }
        }
    }
    out
}

/// Keeps the strongest candidate of every group closer than `distance` degrees.
fn merge(grid: &Grid, mut candidates: Vec<Candidate>, distance: f64) -> Vec<Candidate> {
    // Grid order breaks ties, so equal maxima (plateaus) merge the same way every run.
    candidates.sort_by(|a, b| {
        b.cyclonic
            .total_cmp(&a.cyclonic)
            .then((a.j, a.i).cmp(&(b.j, b.i)))
    });
    let mut kept: Vec<(Candidate, f64, f64)> = Vec::new();
    for c in candidates {
        let (lat, lon) = (grid.lat(c.j), grid.lon(c.i));
        if kept
            .iter()
            .all(|&(_, klat, klon)| distance_deg(lat, lon, klat, klon) > distance)
        {
            kept.push((c, lat, lon));
        }
    }
    kept.into_iter().map(|k| k.0).collect()
}

/// Sub-grid position of the maximum at (`j`, `i`): a parabola through the maximum and its two
/// neighbours along each axis. On a sampled Gaussian this lands within a few hundredths of a
/// grid spacing of the true centre, where the grid point alone can be half a spacing off.
fn refine(vo: &Field, j: usize, i: usize) -> (f64, f64) {
    let g = vo.grid();
    let sign = f64::from(hemisphere_sign(g.lat(j)));
    let v = |jj: usize, ii: isize| sign * f64::from(vo.get(jj, g.wrap_col(ii)));
    let vertex = |a: f64, b: f64, c: f64| {
        let curvature = a - 2.0 * b + c;
        if curvature < 0.0 {
            (0.5 * (a - c) / curvature).clamp(-0.5, 0.5)
        } else {
            0.0
        }
    };
    let ii = i as isize;
    let dy = vertex(v(j - 1, ii), v(j, ii), v(j + 1, ii));
    let dx = vertex(v(j, ii - 1), v(j, ii), v(j, ii + 1));
    (
        g.lat(j) + dy * g.lat_step,
        wrap_360(g.lon(i) + dx * g.lon_step),
    )
}

/// The closed-contour test of a *minimum* of `at` near (`lat`, `lon`): the reference is the
/// smallest value within `cc.offset_deg` (or the value at the centre); along each of `rays`
/// bearings, sampled every `step` degrees out to `cc.distance_deg`, the field must rise to at
/// least reference + `cc.delta`. Returns the reference and the smallest rise over the rays when
/// the contour closes.
fn closed_contour(
    at: &dyn Fn(f64, f64) -> f64,
    grid: &Grid,
    lat: f64,
    lon: f64,
    cc: &ContourConfig,
    rays: usize,
    step: f64,
) -> Option<(f64, f64)> {
    let (mut reference, mut c_lat, mut c_lon) = (at(lat, lon), lat, lon);
    if cc.offset_deg > 0.0 {
        for (plat, plon) in points_within(grid, lat, lon, cc.offset_deg) {
            let v = at(plat, plon);
            if v < reference {
                (reference, c_lat, c_lon) = (v, plat, plon);
            }
        }
    }
    if !reference.is_finite() {
        return None;
    }
    let samples = (cc.distance_deg / step).ceil().max(1.0) as usize;
    let mut shallowest = f64::INFINITY;
    for r in 0..rays {
        let bearing = 360.0 * r as f64 / rays as f64;
        let mut rise = f64::NEG_INFINITY;
        for k in 1..=samples {
            let d = (k as f64 * step).min(cc.distance_deg);
            let (plat, plon) = destination(c_lat, c_lon, bearing, d);
            // No early exit at `delta`: the whole ray gives the contour's true depth, the
            // intensity proxy the detection reports.
            rise = rise.max(at(plat, plon) - reference);
        }
        // `max` skips NaN samples (missing data); a ray of nothing but NaN stays at −∞ and fails.
        if rise < cc.delta {
            return None;
        }
        shallowest = shallowest.min(rise);
    }
    Some((reference, shallowest))
}

/// Grid points within `radius` degrees of (`lat`, `lon`).
fn points_within(grid: &Grid, lat: f64, lon: f64, radius: f64) -> Vec<(f64, f64)> {
    let rows = (radius / grid.lat_step.abs()).ceil() as isize + 1;
    let row = grid.row_of(lat).round() as isize;
    // A degree of longitude shrinks with latitude; near the pole every column may be close.
    let cos = (lat.abs() + radius).min(89.0).to_radians().cos();
    let cols = ((radius / (grid.lon_step * cos)).ceil() as isize + 1).min(grid.nlon as isize / 2);
    let col = grid.col_of(lon).round() as isize;
    let mut out = Vec::new();
    for j in (row - rows).max(0)..=(row + rows).min(grid.nlat as isize - 1) {
        for i in col - cols..=col + cols {
            let (plat, plon) = (grid.lat(j as usize), grid.lon(grid.wrap_col(i)));
            if distance_deg(lat, lon, plat, plon) <= radius {
                out.push((plat, plon));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::geo::{KM_PER_DEG, distance_km};
    use crate::testutil::{Upper, Vortex, snapshot};

    fn grid() -> Grid {
        Grid::global(1.0)
    }

    /// The detection nearest to (`lat`, `lon`) and its distance (km).
    fn nearest(found: &[Detection], lat: f64, lon: f64) -> (&Detection, f64) {
        found
            .iter()
            .map(|d| (d, distance_km(d.lat, d.lon, lat, lon)))
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .expect("something was detected")
    }

    #[test]
    fn finds_every_cyclone_within_half_a_grid_spacing() {
        let storms = [
            Vortex::tc(15.3, 140.7),
            Vortex::tc(-12.6, 75.2),
            Vortex::tc(22.4, 300.8),
            // Straddles the grid's seam at 0°/360°.
            Vortex::tc(8.7, 359.6),
            // On the dateline, in the south.
            Vortex::tc(-25.1, 180.3),
        ];
        let s = snapshot(grid(), 0, &storms, Upper::Geopotential);
        let found = detect_step(&s, &DetectConfig::default()).unwrap();
        assert_eq!(found.len(), storms.len(), "{found:#?}");
        let half = 0.5 * KM_PER_DEG * grid().spacing();
        for v in &storms {
            let (d, km) = nearest(&found, v.lat, v.lon);
            assert!(km < half, "{v:?}: found at {d:?}, {km:.1} km off");
            // Cyclonic: positive vorticity in the north, negative in the south.
            assert_eq!(d.vorticity.signum(), v.lat.signum(), "{d:?}");
            assert!(
                d.closed_contour >= 150.0 && d.warm_core.unwrap() >= 58.8,
                "{d:?}"
            );
            assert!(
                (d.z_centre - (14_000.0 + 400.0 * v.lat.to_radians().cos().powi(2) - 400.0)).abs()
                    < 15.0
            );
        }
    }

    #[test]
    fn southern_hemisphere_cyclone_has_negative_vorticity_and_is_found() {
        let s = snapshot(grid(), 0, &[Vortex::tc(-18.0, 60.4)], Upper::Geopotential);
        let found = detect_step(&s, &DetectConfig::default()).unwrap();
        assert_eq!(found.len(), 1);
        assert!(found[0].vorticity < -1e-4, "{:?}", found[0]);
        assert!(distance_km(found[0].lat, found[0].lon, -18.0, 60.4) < 20.0);
    }

    #[test]
    fn decoys_are_rejected() {
        let storms = [
            Vortex::tc(14.0, 130.0),
            // A cold-core low: the thickness dips over the centre.
            Vortex {
                thickness: -100.0,
                ..Vortex::tc(18.0, 200.0)
            },
            // Poleward of 50°.
            Vortex::tc(58.0, 20.0),
            Vortex::tc(-55.0, 240.0),
            // A vorticity maximum without a closed low (a shear line, say).
            Vortex {
                z_depth: 60.0,
                ..Vortex::tc(12.0, 100.0)
            },
            // Too weak.
            Vortex {
                vorticity: 2.0e-5,
                ..Vortex::tc(10.0, 60.0)
            },
        ];
        let s = snapshot(grid(), 0, &storms, Upper::Geopotential);
        let found = detect_step(&s, &DetectConfig::default()).unwrap();
        assert_eq!(found.len(), 1, "{found:#?}");
        assert!(distance_km(found[0].lat, found[0].lon, 14.0, 130.0) < 20.0);
    }

    #[test]
    fn warm_core_from_temperature_when_geopotential_aloft_is_missing() {
        let storms = [
            Vortex::tc(14.0, 130.0),
            Vortex {
                thickness: -100.0,
                ..Vortex::tc(18.0, 200.0)
            },
        ];
        let s = snapshot(grid(), 0, &storms, Upper::Temperature);
        let found = detect_step(&s, &DetectConfig::default()).unwrap();
        assert_eq!(found.len(), 1, "{found:#?}");
        assert!((found[0].lon - 130.0).abs() < 0.2);
        assert!(
            (found[0].warm_core.unwrap() - 100.0).abs() < 15.0,
            "{:?}",
            found[0]
        );
    }

    #[test]
    fn warm_cores_on_a_steep_meridional_gradient_need_the_zonal_anomaly() {
        // Thickness rising 15 m² s⁻² per degree towards the equator: more than a 100 m² s⁻²
        // warm core falls off on its equatorward side.
        let mut s = snapshot(grid(), 0, &[Vortex::tc(16.0, 120.0)], Upper::Geopotential);
        let z300 = s.get("z", Some(300.0)).unwrap().clone();
        let sloped = Field::from_fn(grid(), |lat, lon| {
            z300.interpolate(lat, lon) - 15.0 * lat.abs()
        })
        .unwrap();
        s.insert("z", Some(300.0), sloped).unwrap();
        let found = detect_step(&s, &DetectConfig::default()).unwrap();
        assert_eq!(found.len(), 1);
        assert!(
            (found[0].warm_core.unwrap() - 100.0).abs() < 15.0,
            "{:?}",
            found[0]
        );
        let mut raw = DetectConfig::default();
        raw.warm_core.zonal_anomaly = false;
        assert!(detect_step(&s, &raw).unwrap().is_empty());
    }

    #[test]
    fn without_upper_levels_the_warm_core_is_not_checked() {
        let cold = Vortex {
            thickness: -100.0,
            ..Vortex::tc(18.0, 200.0)
        };
        let s = snapshot(grid(), 0, &[cold], Upper::None);
        let found = detect_step(&s, &DetectConfig::default()).unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].warm_core, None);
        let mut cfg = DetectConfig::default();
        cfg.warm_core.enabled = false;
        let s = snapshot(grid(), 0, &[cold], Upper::Geopotential);
        assert_eq!(detect_step(&s, &cfg).unwrap().len(), 1);
    }

    #[test]
    fn close_maxima_merge_into_the_stronger() {
        let storms = [
            Vortex::tc(15.0, 150.0),
            Vortex {
                vorticity: 1.2e-4,
                radius_deg: 1.5,
                z_depth: 100.0,
                thickness: 0.0,
                ..Vortex::tc(15.0, 155.0)
            },
        ];
        let s = snapshot(grid(), 0, &storms, Upper::Geopotential);
        let cfg = DetectConfig::default();
        let vo = s.require("vo", 850.0).unwrap();
        let maxima = candidates(vo, &cfg);
        assert_eq!(maxima.len(), 2, "{maxima:?}");
        let merged = merge(vo.grid(), maxima.clone(), 6.0);
        assert_eq!(merged.len(), 1);
        assert_eq!(vo.grid().lon(merged[0].i), 150.0);
        assert_eq!(merge(vo.grid(), maxima, 2.0).len(), 2);
        let found = detect_step(&s, &cfg).unwrap();
        assert_eq!(found.len(), 1, "{found:#?}");
        assert!((found[0].lon - 150.0).abs() < 0.2);
    }

    #[test]
    fn a_missing_field_is_named() {
        let s = snapshot(grid(), 0, &[], Upper::None);
        let cfg = DetectConfig {
            level: 700.0,
            ..DetectConfig::default()
        };
        let e = detect_step(&s, &cfg).unwrap_err().to_string();
        assert!(e.contains("`vo` at 700 hPa"), "{e}");
    }

    #[test]
    fn steps_are_detected_in_parallel_and_in_order() {
        let steps: Vec<FieldSnapshot> = (0..6)
            .map(|k| {
                snapshot(
                    Grid::global(2.0),
                    k * 21_600,
                    &[Vortex::tc(15.0, 140.0 - 2.0 * k as f64)],
                    Upper::Geopotential,
                )
            })
            .collect();
        let found = detect(&steps, &DetectConfig::default()).unwrap();
        assert_eq!(found.len(), 6);
        for (k, step) in found.iter().enumerate() {
            assert_eq!(step.len(), 1);
            assert_eq!(step[0].time_unix, k as i64 * 21_600);
            // Half a 2° grid spacing.
            assert!(distance_km(step[0].lat, step[0].lon, 15.0, 140.0 - 2.0 * k as f64) < 111.0);
        }
    }
}
