//! The physics of the synthetic fields: a streamfunction ψ and a velocity potential χ on the
//! sphere (zonal jets, eastward-propagating planetary waves, a diurnal divergent circulation
//! that follows the sun, Gaussian cyclone vortices), winds from ψ and χ, vorticity and
//! divergence as their discrete curl and divergence, geopotential from a standard atmosphere, a
//! meridional gradient and the linearly balanced `f ψ`, and temperature hydrostatically
//! consistent with the cyclones' warm cores.

use std::f64::consts::PI;

use super::{Cyclone, SynthConfig};

const EARTH_RADIUS: f64 = 6.371e6;
const OMEGA: f64 = 7.292e-5;
const GRAVITY: f64 = 9.80665;
const R_DRY: f64 = 287.05;

/// Standard-atmosphere height (m) of pressure `p` (hPa), troposphere formula.
fn standard_height(p: f64) -> f64 {
    44_330.8 * (1.0 - (p / 1013.25).powf(0.190_263))
}

/// Standard-atmosphere temperature (K) at pressure `p` (hPa).
fn standard_temperature(p: f64) -> f64 {
    (288.15 * (p / 1013.25).powf(0.190_263)).max(216.65)
}

/// Vertical profile of the cyclone vortex: 1 at 850 hPa, weakening with height (linear in ln p).
fn vortex_profile(p: f64) -> f64 {
    (1.0 - VORTEX_SLOPE * (850.0 / p).ln()).clamp(0.15, 1.0)
}
const VORTEX_SLOPE: f64 = 0.577;

/// Analytic 850 hPa vorticity (s⁻¹) and geopotential anomaly (m² s⁻²) at the centre of
/// cyclone `c` at latitude `lat` with `intensity`: the Gaussian vortex has ∇²ψ = 2A/R² and
/// Z' = f ψ there.
pub(super) fn centre_values_850(c: &Cyclone, lat: f64, intensity: f64) -> (f64, f64) {
    let r = c.radius_deg.to_radians() * EARTH_RADIUS;
    let amp = -lat.signum() * c.strength * intensity * vortex_profile(850.0);
    let vort = -2.0 * amp / (r * r);
    let z_anom = 2.0 * OMEGA * lat.to_radians().sin() * amp;
    (vort, z_anom)
}

/// All variables at one time and level.
pub(super) struct LevelFields {
    z: Vec<f32>,
    t: Vec<f32>,
    u: Vec<f32>,
    v: Vec<f32>,
    vo: Vec<f32>,
    d: Vec<f32>,
}

pub(super) struct Grid {
    pub(super) nlat: usize,
    pub(super) nlon: usize,
    phi: Vec<f64>,
    lam: Vec<f64>,
    dphi: f64,
    dlam: f64,
}

impl Grid {
    pub(super) fn new(cfg: &SynthConfig) -> Self {
        let (nlat, nlon) = (cfg.nlat(), cfg.nlon());
        let g = cfg.grid_deg;
        Self {
            nlat,
            nlon,
            phi: (0..nlat)
                .map(|j| (90.0 - g * j as f64).to_radians())
                .collect(),
            lam: (0..nlon).map(|i| (g * i as f64).to_radians()).collect(),
            dphi: g.to_radians(),
            dlam: g.to_radians(),
        }
    }

    pub(super) fn lat_deg(&self, j: usize) -> f64 {
        self.phi[j].to_degrees()
    }

    /// d/dφ by centred differences (one-sided at the poles); rows run north→south.
    fn d_dphi(&self, f: &[f64], j: usize, i: usize) -> f64 {
        let n = self.nlon;
        let (a, b, span) = if j == 0 {
            (0, 1, 1.0)
        } else if j == self.nlat - 1 {
            (j - 1, j, 1.0)
        } else {
            (j - 1, j + 1, 2.0)
        };
        (f[a * n + i] - f[b * n + i]) / (span * self.dphi)
    }

    /// d/dλ by centred differences, periodic.
    fn d_dlam(&self, f: &[f64], j: usize, i: usize) -> f64 {
        let n = self.nlon;
        (f[j * n + (i + 1) % n] - f[j * n + (i + n - 1) % n]) / (2.0 * self.dlam)
    }
}

// Grid loops index several parallel arrays by (j, i); iterators would obscure the stencils.
#[allow(clippy::needless_range_loop)]
pub(super) fn compute_level(
    cfg: &SynthConfig,
    grid: &Grid,
    cyclones: &[Cyclone],
    hours: f64,
    p: f64,
) -> LevelFields {
    let (nlat, nlon) = (grid.nlat, grid.nlon);
    let a = EARTH_RADIUS;
    let height = ((1000.0 / p).ln() / (1000.0f64 / 300.0).ln()).max(0.0);
    let jet = 10.0 + 25.0 * height; // m/s at the jet core
    let wave_amp = 1.0e7 * (0.6 + 0.7 * height);
    let diurnal_chi = 1.0e7 * (1.0 - 2.0 * height).clamp(-1.0, 1.0);
    let seed_phase = (cfg.seed % 1000) as f64 * 0.001 * 2.0 * PI;
    // Unseen weather: the waves move to new phases over the day after `unseen_after_hours`.
    let unseen = cfg
        .unseen_after_hours
        .map_or(0.0, |after| ((hours - after) / 24.0).clamp(0.0, 1.0));
    let unseen = unseen * unseen * (3.0 - 2.0 * unseen);

    // Zonal streamfunction from u(φ) = jet · sin²(2φ): ψ(φ) = −a ∫ u dφ, integrated north→south.
    let mut psi_zonal = vec![0.0; nlat];
    for j in 1..nlat {
        let um = 0.5 * (zonal_u(jet, grid.phi[j - 1]) + zonal_u(jet, grid.phi[j]));
        psi_zonal[j] = psi_zonal[j - 1] + a * um * grid.dphi; // φ decreases going south
    }
    let mut psi = vec![0.0; nlat * nlon];
    let mut chi = vec![0.0; nlat * nlon];
    let sun_lon = PI - 2.0 * PI * hours / 24.0; // local noon longitude
    let mut cyclone_psi = vec![0.0; nlat * nlon];
    for j in 0..nlat {
        let phi = grid.phi[j];
        let envelope = (2.0 * phi).sin().powi(2);
        for i in 0..nlon {
            let lam = grid.lam[i];
            let mut w = 0.0;
            for (k, speed_deg_per_day) in [(3.0f64, 6.0f64), (4.0, 8.0), (5.0, 10.0)] {
                let omega = k * speed_deg_per_day.to_radians() / 24.0;
                let shift = unseen * PI * (k - 2.0) / 2.0;
                w += (k * lam - omega * hours + seed_phase * k + shift).cos() / k;
            }
            psi[j * nlon + i] = psi_zonal[j] + wave_amp * envelope * w;
            chi[j * nlon + i] = diurnal_chi * phi.cos() * (lam - sun_lon).cos();
        }
    }
    let profile = vortex_profile(p);
    for c in cyclones {
        let Some((clat, clon, intensity)) = c.state(hours) else {
            continue;
        };
        let (cphi, clam) = (clat.to_radians(), clon.to_radians());
        let r = c.radius_deg.to_radians();
        // Cyclonic: positive vorticity in the north (ψ minimum), negative in the south.
        let amp = -clat.signum() * c.strength * intensity * profile;
        let inflow = 0.3 * c.strength * intensity * (1.0 - 2.0 * height).clamp(-1.0, 1.0);
        for j in 0..nlat {
            if (grid.phi[j] - cphi).abs() > 6.0 * r {
                continue;
            }
            for i in 0..nlon {
                let dist = great_circle(grid.phi[j], grid.lam[i], cphi, clam);
                if dist < 6.0 * r {
                    let shape = (-0.5 * (dist / r).powi(2)).exp();
                    cyclone_psi[j * nlon + i] += amp * shape;
                    // Inflow below, outflow aloft: χ peaks at the centre low down (convergence)
                    // and dips aloft (divergence).
                    chi[j * nlon + i] += inflow * shape;
                }
            }
        }
    }
    for (p_, c_) in psi.iter_mut().zip(&cyclone_psi) {
        *p_ += c_;
    }

    let mut u = vec![0.0; nlat * nlon];
    let mut v = vec![0.0; nlat * nlon];
    for j in 0..nlat {
        let cos = grid.phi[j].cos();
        for i in 0..nlon {
            let k = j * nlon + i;
            let (zonal, merid) = if cos > 1e-9 {
                (
                    grid.d_dlam(&chi, j, i) / (a * cos),
                    grid.d_dlam(&psi, j, i) / (a * cos),
                )
            } else {
                (0.0, 0.0)
            };
            u[k] = -grid.d_dphi(&psi, j, i) / a + zonal;
            v[k] = merid + grid.d_dphi(&chi, j, i) / a;
        }
    }
    let ucos: Vec<f64> = (0..nlat * nlon)
        .map(|k| u[k] * grid.phi[k / nlon].cos())
        .collect();
    let vcos: Vec<f64> = (0..nlat * nlon)
        .map(|k| v[k] * grid.phi[k / nlon].cos())
        .collect();
    let mut vo = vec![0.0; nlat * nlon];
    let mut dv = vec![0.0; nlat * nlon];
    for j in 1..nlat - 1 {
        let acos = a * grid.phi[j].cos();
        for i in 0..nlon {
            let k = j * nlon + i;
            vo[k] = (grid.d_dlam(&v, j, i) - grid.d_dphi(&ucos, j, i)) / acos;
            dv[k] = (grid.d_dlam(&u, j, i) + grid.d_dphi(&vcos, j, i)) / acos;
        }
    }
    for (pole, next) in [(0, 1), (nlat - 1, nlat - 2)] {
        let mean = |f: &[f64]| f[next * nlon..(next + 1) * nlon].iter().sum::<f64>() / nlon as f64;
        let (mvo, mdv) = (mean(&vo), mean(&dv));
        vo[pole * nlon..(pole + 1) * nlon].fill(mvo);
        dv[pole * nlon..(pole + 1) * nlon].fill(mdv);
    }

    let z0 = GRAVITY * standard_height(p);
    let t0 = standard_temperature(p);
    let merid_z = 8000.0 * height.max(0.15);
    let merid_t = 40.0 - 15.0 * height;
    let diurnal_t = 3.0 * (p / 1000.0).powi(3);
    let mut z = vec![0f32; nlat * nlon];
    let mut t = vec![0f32; nlat * nlon];
    for j in 0..nlat {
        let phi = grid.phi[j];
        let f = 2.0 * OMEGA * phi.sin();
        for i in 0..nlon {
            let k = j * nlon + i;
            let wave = psi[k] - psi_zonal[j] - cyclone_psi[k];
            // Linear balance for waves and vortices; f ψ' is a low for cyclones in both
            // hemispheres because f and ψ' change sign together.
            let z_anom = f * (wave + cyclone_psi[k]);
            z[k] = (z0 + merid_z * (phi.cos().powi(2) - 0.5) + z_anom) as f32;
            // Hydrostatic: T' = −(1/R) ∂Z'/∂ln p; the vortex part gives the warm core.
            let warm = f * cyclone_psi[k] * VORTEX_SLOPE / profile.max(1e-6) / R_DRY;
            let solar = (grid.lam[i] - sun_lon).cos().max(0.0) * phi.cos();
            t[k] = (t0 - 20.0
                + merid_t * phi.cos().powi(2)
                + diurnal_t * solar
                + f * wave * 1.0e-2 / GRAVITY
                - warm) as f32;
        }
    }
    let f32s = |x: Vec<f64>| x.into_iter().map(|v| v as f32).collect::<Vec<f32>>();
    LevelFields {
        z,
        t,
        u: f32s(u),
        v: f32s(v),
        vo: f32s(vo),
        d: f32s(dv),
    }
}

fn zonal_u(jet: f64, phi: f64) -> f64 {
    jet * (2.0 * phi).sin().powi(2)
}

/// Great-circle distance (radians) between two points given in radians.
fn great_circle(phi1: f64, lam1: f64, phi2: f64, lam2: f64) -> f64 {
    let dphi = phi2 - phi1;
    let dlam = lam2 - lam1;
    let h = (dphi / 2.0).sin().powi(2) + phi1.cos() * phi2.cos() * (dlam / 2.0).sin().powi(2);
    2.0 * h.sqrt().min(1.0).asin()
}

pub(super) fn pick<'a>(fields: &'a LevelFields, var: &str) -> &'a [f32] {
    match var {
        "z" => &fields.z,
        "t" => &fields.t,
        "u" => &fields.u,
        "v" => &fields.v,
        "vo" => &fields.vo,
        _ => &fields.d,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_atmosphere_matches_era5_climatology() {
        assert!((standard_height(850.0) - 1457.0).abs() < 10.0);
        assert!((standard_height(500.0) - 5574.0).abs() < 10.0);
        assert!((standard_temperature(500.0) - 252.0).abs() < 2.0);
    }

    #[test]
    fn vortex_vorticity_matches_the_analytic_centre_value() {
        let cfg = SynthConfig {
            cyclones: 1,
            steps: 1,
            ..SynthConfig::default()
        };
        let grid = Grid::new(&cfg);
        let cs = cfg.cyclones();
        let f = compute_level(&cfg, &grid, &cs, 0.0, 850.0);
        let (lat, lon, intensity) = cs[0].state(0.0).unwrap();
        let j = (90.0 - lat).round() as usize;
        let i = lon.round() as usize;
        let r = cs[0].radius_deg.to_radians() * EARTH_RADIUS;
        let analytic = 2.0 * cs[0].strength * intensity / (r * r);
        let got = f.vo[j * grid.nlon + i] as f64;
        // Centred differences of a Gaussian sampled at R/Δ = 2.5 underestimate its peak Laplacian.
        assert!(
            (got - analytic).abs() / analytic < 0.25,
            "{got} vs {analytic}"
        );
        // Geopotential low and warm core above it.
        let z = f.z[j * grid.nlon + i];
        let z_far = f.z[j * grid.nlon + (i + 15) % grid.nlon];
        assert!(z < z_far);
    }

    #[test]
    fn waves_take_new_phases_only_after_the_unseen_hour() {
        let plain = SynthConfig {
            cyclones: 0,
            grid_deg: 5.0,
            ..SynthConfig::default()
        };
        let unseen = SynthConfig {
            unseen_after_hours: Some(48.0),
            ..plain.clone()
        };
        let grid = Grid::new(&plain);
        let z = |cfg: &SynthConfig, hours: f64| compute_level(cfg, &grid, &[], hours, 500.0).z;
        assert_eq!(z(&plain, 47.0), z(&unseen, 47.0));
        assert_eq!(z(&plain, 48.0), z(&unseen, 48.0));
        let rms = |a: &[f32], b: &[f32]| {
            (a.iter()
                .zip(b)
                .map(|(x, y)| f64::from(x - y).powi(2))
                .sum::<f64>()
                / a.len() as f64)
                .sqrt()
        };
        // A day later the waves stand elsewhere: differences of the order of the waves' own.
        let (p, u) = (z(&plain, 72.0), z(&unseen, 72.0));
        assert!(rms(&p, &u) > 100.0, "{}", rms(&p, &u));
        // Half an hour apart the unseen store changes smoothly, not by a jump.
        let step = rms(&z(&unseen, 60.0), &z(&unseen, 60.5));
        assert!(step < 0.1 * rms(&p, &u), "{step}");
    }
}
