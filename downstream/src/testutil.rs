//! Analytic cyclone fields for the tests: Gaussian vortices with a vorticity peak, a geopotential
//! low and a thickness anomaly (warm or cold core), on a calm background with a weak planetary
//! wave.

use crate::field::{Field, FieldSnapshot, Grid};
use crate::geo::distance_deg;

/// One analytic vortex.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Vortex {
    pub lat: f64,
    pub lon: f64,
    pub radius_deg: f64,
    /// Peak cyclonic vorticity (s⁻¹, positive; the sign follows the hemisphere).
    pub vorticity: f64,
    /// Depth of the 850 hPa geopotential low (m² s⁻²).
    pub z_depth: f64,
    /// 300–500 hPa thickness anomaly at the centre (m² s⁻²): positive = warm core.
    pub thickness: f64,
}

impl Vortex {
    /// A tropical cyclone: strong, closed low, warm core.
    pub fn tc(lat: f64, lon: f64) -> Self {
        Self {
            lat,
            lon,
            radius_deg: 2.5,
            vorticity: 2.0e-4,
            z_depth: 400.0,
            thickness: 100.0,
        }
    }

    /// Gaussian shape at (`lat`, `lon`) and r²/R².
    fn shape(&self, lat: f64, lon: f64) -> Option<(f64, f64)> {
        if (lat - self.lat).abs() > 6.0 * self.radius_deg {
            return None;
        }
        let r = distance_deg(lat, lon, self.lat, self.lon) / self.radius_deg;
        (r < 6.0).then(|| ((-0.5 * r * r).exp(), r * r))
    }
}

/// Which upper-level fields the snapshot carries.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Upper {
    Geopotential,
    Temperature,
    None,
}

/// Hypsometric factor of the 300–500 hPa layer: thickness = factor · (T300 + T500).
pub(crate) fn thickness_factor() -> f64 {
    287.05 * (500.0f64 / 300.0).ln() / 2.0
}

/// The fields of one time step with `vortices` on `grid`.
pub(crate) fn snapshot(
    grid: Grid,
    time_unix: i64,
    vortices: &[Vortex],
    upper: Upper,
) -> FieldSnapshot {
    let sum = |lat: f64, lon: f64, f: &dyn Fn(&Vortex, f64, f64) -> f64| -> f64 {
        vortices
            .iter()
            .filter_map(|v| v.shape(lat, lon).map(|(g, r2)| f(v, g, r2)))
            .sum()
    };
    let field = |f: &dyn Fn(f64, f64) -> f64| Field::from_fn(grid, f).unwrap();
    let vo = field(&|lat, lon| {
        let wave = 1.0e-5 * (3.0 * lon.to_radians()).sin() * lat.to_radians().cos();
        // The Laplacian of a Gaussian streamfunction, scaled to the peak.
        wave + sum(lat, lon, &|v, g, r2| {
            v.lat.signum() * v.vorticity * (1.0 - 0.5 * r2) * g
        })
    });
    let cos2 = |lat: f64| lat.to_radians().cos().powi(2);
    let z_low = |lat: f64, lon: f64| sum(lat, lon, &|v, g, _| -v.z_depth * g);
    let warm = |lat: f64, lon: f64| sum(lat, lon, &|v, g, _| v.thickness * g);
    let mut s = FieldSnapshot::new(time_unix)
        .with("vo", Some(850.0), vo)
        .unwrap()
        .with(
            "z",
            Some(850.0),
            field(&|lat, lon| 14_000.0 + 400.0 * cos2(lat) + z_low(lat, lon)),
        )
        .unwrap();
    let z500 = |lat: f64, lon: f64| 55_000.0 + 2_000.0 * cos2(lat) + 0.7 * z_low(lat, lon);
    match upper {
        Upper::Geopotential => {
            s.insert("z", Some(500.0), field(&z500)).unwrap();
            s.insert(
                "z",
                Some(300.0),
                field(&|lat, lon| z500(lat, lon) + 35_000.0 + 300.0 * cos2(lat) + warm(lat, lon)),
            )
            .unwrap();
        }
        Upper::Temperature => {
            let k = thickness_factor();
            s.insert("t", Some(500.0), field(&|lat, _| 250.0 + 2.0 * cos2(lat)))
                .unwrap();
            s.insert(
                "t",
                Some(300.0),
                field(&|lat, lon| 225.0 + cos2(lat) + warm(lat, lon) / k),
            )
            .unwrap();
        }
        Upper::None => {}
    }
    s
}
