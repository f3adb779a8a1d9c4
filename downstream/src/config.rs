//! What the tracker can be told, with the defaults of docs/design.md §6 (TempestExtremes' settings for
//! 6-hourly reanalysis, detection on 850 hPa vorticity).
//!
//! Every struct deserializes from TOML/JSON with any key left out taking its default, and rejects
//! unknown keys so that a misspelt threshold is an error rather than a silent default:
//!
//! ```toml
//! [detect]
//! vorticity_threshold = 3.5e-5
//! max_abs_lat = 50.0
//! [detect.closed_contour]
//! delta = 150.0
//! distance_deg = 5.5
//! [stitch]
//! min_lifetime_hours = 54.0
//! ```

use serde::{Deserialize, Serialize};

use crate::error::{Result, TrackError};

/// Detection and stitching settings.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrackConfig {
    pub detect: DetectConfig,
    pub stitch: StitchConfig,
}

impl TrackConfig {
    /// Checks every value for range.
    pub fn validate(&self) -> Result<()> {
        self.detect.validate()?;
        self.stitch.validate()
    }
}

/// Candidate detection and the checks a candidate must pass, per time step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DetectConfig {
    /// Relative-vorticity variable (s⁻¹).
    pub vorticity: String,
    /// Geopotential variable (m² s⁻²).
    pub geopotential: String,
    /// Temperature variable (K): the warm-core check falls back on it when geopotential is
    /// missing at the upper levels.
    pub temperature: String,
    /// Level of the vorticity maxima and the closed geopotential contour (hPa).
    pub level: f64,
    /// Smallest cyclonic vorticity (s⁻¹, sign flipped south of the equator) of a candidate.
    pub vorticity_threshold: f64,
    /// Candidates poleward of this latitude (degrees) are extratropical by definition here.
    pub max_abs_lat: f64,
    /// Candidates closer than this (degrees of great-circle arc) are one system; the stronger
    /// one stays.
    pub merge_distance_deg: f64,
    /// The geopotential at `level` must rise around the candidate (a closed low).
    pub closed_contour: ContourConfig,
    /// The upper-level thickness must fall around the candidate (a warm core).
    pub warm_core: WarmCoreConfig,
    /// Bearings along which a closed contour is checked; more rays catch narrower gaps in the
    /// contour.
    pub rays: usize,
    /// Spacing of the samples along a ray (degrees); `None`: half the grid spacing.
    pub ray_step_deg: Option<f64>,
    /// Refine the vorticity maximum between grid points (a parabola through the maximum and
    /// its neighbours, per axis); off: positions are grid points.
    pub refine: bool,
}

impl Default for DetectConfig {
    fn default() -> Self {
        Self {
            vorticity: "vo".into(),
            geopotential: "z".into(),
            temperature: "t".into(),
            level: 850.0,
            vorticity_threshold: 3.5e-5,
            max_abs_lat: 50.0,
            merge_distance_deg: 6.0,
            closed_contour: ContourConfig::default(),
            warm_core: WarmCoreConfig::default(),
            rays: 32,
            ray_step_deg: None,
            refine: true,
        }
    }
}

impl DetectConfig {
    /// Checks every value for range.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: String| Err(TrackError::Config(what));
        if !(self.vorticity_threshold.is_finite() && self.vorticity_threshold >= 0.0) {
            return bad(format!(
                "detect.vorticity_threshold {} must be finite and non-negative",
                self.vorticity_threshold
            ));
        }
        if !(0.0..=90.0).contains(&self.max_abs_lat) {
            return bad(format!(
                "detect.max_abs_lat {} must lie in 0 … 90",
                self.max_abs_lat
            ));
        }
        if !(self.merge_distance_deg >= 0.0 && self.merge_distance_deg <= 180.0) {
            return bad(format!(
                "detect.merge_distance_deg {} must lie in 0 … 180",
                self.merge_distance_deg
            ));
        }
        if self.rays < 4 {
            return bad(format!("detect.rays {} must be at least 4", self.rays));
        }
        if let Some(step) = self.ray_step_deg
            && !(step > 0.0 && step.is_finite())
        {
            return bad(format!("detect.ray_step_deg {step} must be positive"));
        }
        self.closed_contour.validate("detect.closed_contour")?;
        self.warm_core.contour().validate("detect.warm_core")?;
        if self.warm_core.upper_level == self.warm_core.lower_level {
            return bad("detect.warm_core: upper and lower level are the same".into());
        }
        Ok(())
    }
}

/// A closed-contour criterion: along every ray from the candidate, the field must change by at
/// least `delta` (away from the candidate's extremum) within `distance_deg`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ContourConfig {
    /// Required change, in the field's units (positive).
    pub delta: f64,
    /// Radius within which it must happen (degrees of great-circle arc).
    pub distance_deg: f64,
    /// The reference value is the field's extremum within this distance of the candidate
    /// (degrees); 0: the value at the candidate.
    pub offset_deg: f64,
}

impl Default for ContourConfig {
    /// The 850 hPa geopotential low: +150 m² s⁻² within 5.5°.
    fn default() -> Self {
        Self {
            delta: 150.0,
            distance_deg: 5.5,
            offset_deg: 0.0,
        }
    }
}

impl ContourConfig {
    fn validate(&self, what: &str) -> Result<()> {
        let ok = self.delta.is_finite()
            && self.delta >= 0.0
            && self.distance_deg > 0.0
            && self.distance_deg <= 90.0
            && (0.0..self.distance_deg).contains(&self.offset_deg);
        if ok {
            Ok(())
        } else {
            Err(TrackError::Config(format!(
                "{what}: need delta ≥ 0, 0 < distance_deg ≤ 90 and 0 ≤ offset_deg < distance_deg, \
                 got {self:?}"
            )))
        }
    }
}

/// The warm-core criterion on the geopotential thickness between two upper levels.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WarmCoreConfig {
    /// Off: no candidate is checked for a warm core.
    pub enabled: bool,
    /// Top of the layer (hPa).
    pub upper_level: f64,
    /// Bottom of the layer (hPa).
    pub lower_level: f64,
    /// The thickness must *fall* by `delta` m² s⁻² …
    pub delta: f64,
    /// … within this distance (degrees of great-circle arc) …
    pub distance_deg: f64,
    /// … of its maximum within this distance of the candidate (degrees).
    pub offset_deg: f64,
    /// Test the thickness minus its zonal mean. The criterion is about the storm's own warm
    /// anomaly; where the planetary-scale meridional gradient of thickness over 6.5° exceeds
    /// the anomaly (as in the synthetic stores), the raw thickness keeps rising equatorward
    /// and no warm core would ever close. Off: TempestExtremes' raw thickness.
    pub zonal_anomaly: bool,
}

impl WarmCoreConfig {
    /// The criterion as a contour on the thickness (which must fall, not rise).
    pub fn contour(&self) -> ContourConfig {
        ContourConfig {
            delta: self.delta,
            distance_deg: self.distance_deg,
            offset_deg: self.offset_deg,
        }
    }
}

impl Default for WarmCoreConfig {
    /// 300–500 hPa thickness falling by 58.8 m² s⁻² within 6.5° of its maximum within 1°.
    fn default() -> Self {
        Self {
            enabled: true,
            upper_level: 300.0,
            lower_level: 500.0,
            delta: 58.8,
            distance_deg: 6.5,
            offset_deg: 1.0,
            zonal_anomaly: true,
        }
    }
}

/// Linking detections of consecutive time steps into tracks.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StitchConfig {
    /// Farthest a storm may move in `reference_step_hours` (degrees of great-circle arc); the
    /// limit scales with the time between two points.
    pub max_distance_deg: f64,
    /// The time step `max_distance_deg` refers to (hours).
    pub reference_step_hours: f64,
    /// Shortest track kept: hours from first to last point.
    pub min_lifetime_hours: f64,
    /// Longest time between two consecutive points of a track (hours); a storm missed at a few
    /// steps keeps its track.
    pub max_gap_hours: f64,
}

impl Default for StitchConfig {
    fn default() -> Self {
        Self {
            max_distance_deg: 8.0,
            reference_step_hours: 6.0,
            min_lifetime_hours: 54.0,
            max_gap_hours: 24.0,
        }
    }
}

impl StitchConfig {
    /// Checks every value for range.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("max_distance_deg", self.max_distance_deg),
            ("reference_step_hours", self.reference_step_hours),
            ("max_gap_hours", self.max_gap_hours),
        ];
        for (name, v) in positive {
            if !(v.is_finite() && v > 0.0) {
                return Err(TrackError::Config(format!(
                    "stitch.{name} {v} must be positive"
                )));
            }
        }
        if !(self.min_lifetime_hours.is_finite() && self.min_lifetime_hours >= 0.0) {
            return Err(TrackError::Config(format!(
                "stitch.min_lifetime_hours {} must be non-negative",
                self.min_lifetime_hours
            )));
        }
        Ok(())
    }

    /// The farthest two points `dt_hours` apart may be and still belong to one track.
    pub fn max_distance_for(&self, dt_hours: f64) -> f64 {
        self.max_distance_deg * dt_hours / self.reference_step_hours
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_design_section_6() {
        let c = TrackConfig::default();
        c.validate().unwrap();
        assert_eq!(c.detect.vorticity_threshold, 3.5e-5);
        assert_eq!(c.detect.max_abs_lat, 50.0);
        assert_eq!(c.detect.merge_distance_deg, 6.0);
        assert_eq!(
            (
                c.detect.closed_contour.delta,
                c.detect.closed_contour.distance_deg
            ),
            (150.0, 5.5)
        );
        let w = c.detect.warm_core;
        assert_eq!(
            (w.upper_level, w.lower_level, w.delta, w.distance_deg),
            (300.0, 500.0, 58.8, 6.5)
        );
        assert!(w.enabled && w.zonal_anomaly);
        assert_eq!(
            (
                c.stitch.max_distance_deg,
                c.stitch.min_lifetime_hours,
                c.stitch.max_gap_hours
            ),
            (8.0, 54.0, 24.0)
        );
        assert_eq!(c.stitch.max_distance_for(12.0), 16.0);
    }

    #[test]
    fn partial_toml_keeps_defaults_and_typos_are_errors() {
        let c: TrackConfig = toml::from_str(
            "[detect]\nmax_abs_lat = 40.0\n[detect.warm_core]\ndelta = 40.0\n[stitch]\nmax_gap_hours = 12.0\n",
        )
        .unwrap();
        assert_eq!(c.detect.max_abs_lat, 40.0);
        assert_eq!(c.detect.warm_core.delta, 40.0);
        assert_eq!(c.detect.warm_core.distance_deg, 6.5);
        assert_eq!(c.stitch.max_gap_hours, 12.0);
        assert_eq!(c.stitch.min_lifetime_hours, 54.0);
        assert!(toml::from_str::<TrackConfig>("[detect]\nvorticity_treshold = 1.0\n").is_err());
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<TrackConfig>(&json).unwrap(), c);
    }

    #[test]
    fn out_of_range_values_are_rejected() {
        let mut c = TrackConfig::default();
        c.detect.max_abs_lat = 95.0;
        assert!(c.validate().is_err());
        let mut c = TrackConfig::default();
        c.detect.closed_contour.offset_deg = 6.0;
        assert!(c.validate().is_err());
        let mut c = TrackConfig::default();
        c.stitch.max_gap_hours = 0.0;
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("max_gap_hours")
        );
    }
}
