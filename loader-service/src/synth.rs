//! Synthetic ERA5-like stores with physical structure, deterministic from a seed.
//!
//! The flow is built from a streamfunction ψ and a velocity potential χ on the sphere: zonal
//! jets, eastward-propagating planetary waves, a diurnal divergent circulation that follows the
//! sun, and tropical cyclones (Gaussian vortices) moving along known paths. Winds come from ψ and
//! χ, vorticity and divergence are the discrete curl and divergence of that wind, geopotential
//! is a standard atmosphere plus a meridional gradient plus the linearly balanced `f ψ`, and
//! temperature is hydrostatically consistent with the cyclones' warm cores. True cyclone tracks
//! are written as an IBTrACS-like CSV beside the store.

use std::f64::consts::PI;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use atmorep_proto::calendar::{TimeFormat, format_time};
use indicatif::{ProgressBar, ProgressStyle};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde_json::{Value, json};
use zarrs::array::{Array, ArrayMetadata, ArrayMetadataV2, ArrayMetadataV3, ArraySubset};
use zarrs::filesystem::FilesystemStore;

use crate::cf_time::CfTimeUnits;
use crate::dataset::Layout;
use crate::error::{Result, StoreError};

const EARTH_RADIUS: f64 = 6.371e6;
const OMEGA: f64 = 7.292e-5;
const GRAVITY: f64 = 9.80665;
const R_DRY: f64 = 287.05;
/// ERA5's CF time encoding.
pub const TIME_UNITS: &str = "hours since 1900-01-01 00:00:00";

/// Variables the generator can write (ERA5 short names).
pub const VARIABLES: &[(&str, &str, &str)] = &[
    ("z", "Geopotential", "m**2 s**-2"),
    ("t", "Temperature", "K"),
    ("u", "U component of wind", "m s**-1"),
    ("v", "V component of wind", "m s**-1"),
    ("vo", "Vorticity (relative)", "s**-1"),
    ("d", "Divergence", "s**-1"),
];

/// Zarr format version to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZarrFormat {
    V2,
    V3,
}

impl FromStr for ZarrFormat {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "2" | "v2" => Ok(Self::V2),
            "3" | "v3" => Ok(Self::V3),
            _ => Err(format!("zarr format `{s}`: expected 2 or 3")),
        }
    }
}

/// Chunk compression.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    /// Blosc with lz4 or zstd; `bitshuffle` selects bit- instead of byte-shuffle.
    Blosc {
        zstd: bool,
        bitshuffle: bool,
    },
    Zstd,
    Gzip,
    None,
}

impl FromStr for Codec {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Ok(match s {
            "blosc-lz4" | "blosc" => Self::Blosc {
                zstd: false,
                bitshuffle: false,
            },
            "blosc-lz4-bitshuffle" => Self::Blosc {
                zstd: false,
                bitshuffle: true,
            },
            "blosc-zstd" => Self::Blosc {
                zstd: true,
                bitshuffle: false,
            },
            "blosc-zstd-bitshuffle" => Self::Blosc {
                zstd: true,
                bitshuffle: true,
            },
            "zstd" => Self::Zstd,
            "gzip" => Self::Gzip,
            "none" => Self::None,
            _ => {
                return Err(format!(
                    "codec `{s}`: expected blosc-lz4, blosc-lz4-bitshuffle, blosc-zstd, \
                     blosc-zstd-bitshuffle, zstd, gzip or none"
                ));
            }
        })
    }
}

impl std::fmt::Display for Codec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Blosc { zstd, bitshuffle } => write!(
                f,
                "blosc-{}{}",
                if *zstd { "zstd" } else { "lz4" },
                if *bitshuffle { "-bitshuffle" } else { "" }
            ),
            Self::Zstd => f.write_str("zstd"),
            Self::Gzip => f.write_str("gzip"),
            Self::None => f.write_str("none"),
        }
    }
}

impl Codec {
    /// All codecs, for round-trip tests and benchmarks.
    pub const ALL: [Codec; 7] = [
        Codec::Blosc {
            zstd: false,
            bitshuffle: false,
        },
        Codec::Blosc {
            zstd: false,
            bitshuffle: true,
        },
        Codec::Blosc {
            zstd: true,
            bitshuffle: false,
        },
        Codec::Blosc {
            zstd: true,
            bitshuffle: true,
        },
        Codec::Zstd,
        Codec::Gzip,
        Codec::None,
    ];

    /// The numcodecs compressor JSON of a Zarr v2 `.zarray`.
    pub fn v2_compressor(&self, typesize: usize) -> Value {
        let _ = typesize;
        match self {
            Self::Blosc { zstd, bitshuffle } => json!({
                "id": "blosc",
                "cname": if *zstd { "zstd" } else { "lz4" },
                "clevel": 5,
                "shuffle": if *bitshuffle { 2 } else { 1 },
                "blocksize": 0
            }),
            Self::Zstd => json!({"id": "zstd", "level": 3}),
            Self::Gzip => json!({"id": "gzip", "level": 5}),
            Self::None => Value::Null,
        }
    }

    /// The bytes-to-bytes codecs of a Zarr v3 codec chain.
    pub fn v3_codecs(&self, typesize: usize) -> Vec<Value> {
        match self {
            Self::Blosc { zstd, bitshuffle } => vec![json!({
                "name": "blosc",
                "configuration": {
                    "cname": if *zstd { "zstd" } else { "lz4" },
                    "clevel": 5,
                    "shuffle": if *bitshuffle { "bitshuffle" } else { "shuffle" },
                    "typesize": typesize,
                    "blocksize": 0
                }
            })],
            Self::Zstd => {
                vec![json!({"name": "zstd", "configuration": {"level": 3, "checksum": false}})]
            }
            Self::Gzip => vec![json!({"name": "gzip", "configuration": {"level": 5}})],
            Self::None => vec![],
        }
    }
}

/// One synthetic tropical cyclone: a vortex moving along a parabolic path.
#[derive(Debug, Clone, PartialEq)]
pub struct Cyclone {
    /// Storm id as in IBTrACS' SID column.
    pub sid: String,
    /// Hours after the store's first time step when the storm forms.
    pub genesis_hours: f64,
    /// Hours the storm lives.
    pub lifetime_hours: f64,
    /// Position at genesis (degrees north, degrees east 0…360).
    pub lat0: f64,
    pub lon0: f64,
    /// Motion in degrees per hour; `dlat_accel` bends tracks poleward (degrees per hour²).
    pub dlat: f64,
    pub dlon: f64,
    pub dlat_accel: f64,
    /// Peak streamfunction amplitude at 850 hPa (m² s⁻¹).
    pub strength: f64,
    /// Vortex radius (degrees of great-circle distance).
    pub radius_deg: f64,
}

impl Cyclone {
    /// Position (lat, lon 0…360) and intensity (0…1) at `hours` after the first time step.
    pub fn state(&self, hours: f64) -> Option<(f64, f64, f64)> {
        let s = hours - self.genesis_hours;
        if s < 0.0 || s > self.lifetime_hours {
            return None;
        }
        let lat = self.lat0 + self.dlat * s + 0.5 * self.dlat_accel * s * s;
        let lon = (self.lon0 + self.dlon * s).rem_euclid(360.0);
        let intensity = 0.6 + 0.4 * (PI * s / self.lifetime_hours).sin();
        Some((lat, lon, intensity))
    }
}

/// Everything `atmorep loader synth` can be told.
#[derive(Debug, Clone)]
pub struct SynthConfig {
    /// Grid spacing in degrees (0.25 is ERA5's grid); 180 and 360 must be multiples of it.
    pub grid_deg: f64,
    /// First time step, seconds since the Unix epoch.
    pub start_unix: i64,
    /// Number of time steps.
    pub steps: usize,
    /// Hours between steps.
    pub step_hours: u32,
    /// Pressure levels (hPa), in store order.
    pub levels: Vec<u32>,
    /// Variables to write (a subset of [`VARIABLES`]).
    pub variables: Vec<String>,
    pub format: ZarrFormat,
    pub layout: Layout,
    /// Chunk shape (time, level, lat, lon); `None` = one time step × one level × full globe
    /// (per-variable) or AtmoRep's (8, all, all, full globe).
    pub chunks: Option<[u64; 4]>,
    pub codec: Codec,
    /// Zarr v3 only: inner chunk shape (time, level, lat, lon); `chunks` become shards.
    pub shard_inner: Option<[u64; 4]>,
    /// Number of cyclones (the first two are fixed: one per hemisphere, crossing 180° and 0°).
    pub cyclones: usize,
    pub seed: u64,
    /// Show a progress bar.
    pub progress: bool,
}

impl Default for SynthConfig {
    fn default() -> Self {
        Self {
            grid_deg: 1.0,
            // 2020-09-01T00:00:00Z, in the Atlantic/Pacific cyclone season.
            start_unix: 1_598_918_400,
            steps: 49,
            step_hours: 3,
            levels: vec![850, 500, 300],
            variables: VARIABLES.iter().map(|v| v.0.to_string()).collect(),
            format: ZarrFormat::V2,
            layout: Layout::PerVariable,
            chunks: None,
            codec: Codec::Blosc {
                zstd: false,
                bitshuffle: false,
            },
            shard_inner: None,
            cyclones: 2,
            seed: 42,
            progress: false,
        }
    }
}

/// What [`write_store`] wrote.
#[derive(Debug, Clone)]
pub struct SynthSummary {
    pub store: PathBuf,
    pub tracks_csv: PathBuf,
    pub cyclones: Vec<Cyclone>,
    pub shape: [usize; 4],
    pub decoded_bytes: u64,
}

impl SynthConfig {
    fn nlat(&self) -> usize {
        (180.0 / self.grid_deg).round() as usize + 1
    }
    fn nlon(&self) -> usize {
        (360.0 / self.grid_deg).round() as usize
    }

    fn validate(&self) -> std::result::Result<(), String> {
        let check = |n: f64| ((n / self.grid_deg).round() * self.grid_deg - n).abs() < 1e-9;
        if !(self.grid_deg > 0.0 && self.grid_deg <= 30.0 && check(180.0) && check(360.0)) {
            return Err(format!(
                "grid spacing {}° must divide 180° and 360° and be at most 30°",
                self.grid_deg
            ));
        }
        if self.steps == 0 || self.step_hours == 0 {
            return Err("need at least one time step and a positive step".into());
        }
        if self.levels.is_empty() || self.levels.iter().any(|&l| !(1..=1100).contains(&l)) {
            return Err("levels must be pressures between 1 and 1100 hPa".into());
        }
        for v in &self.variables {
            if !VARIABLES.iter().any(|k| k.0 == v) {
                return Err(format!(
                    "unknown variable `{v}` (can write {})",
                    VARIABLES.iter().map(|k| k.0).collect::<Vec<_>>().join(", ")
                ));
            }
        }
        if self.variables.is_empty() {
            return Err("no variables selected".into());
        }
        if self.shard_inner.is_some() && self.format == ZarrFormat::V2 {
            return Err("sharding needs Zarr v3".into());
        }
        if let Some(c) = self.chunks {
            if c.contains(&0) {
                return Err("chunk sizes must be positive".into());
            }
            if let Some(inner) = self.shard_inner
                && inner.iter().zip(c).any(|(i, o)| *i == 0 || o % i != 0)
            {
                return Err("the shard shape must be a multiple of the inner chunk shape".into());
            }
        }
        Ok(())
    }

    /// The cyclones this configuration places: two fixed ones that cross 180° (north) and 0°
    /// (south), then seeded random ones in the tropics of both hemispheres.
    pub fn cyclones(&self) -> Vec<Cyclone> {
        let hours = ((self.steps - 1) as f64 * self.step_hours as f64).max(1.0);
        let radius = (2.5f64).max(2.0 * self.grid_deg);
        let base = |sid: &str, lat0: f64, lon0: f64, dlat: f64, dlon: f64, accel: f64| Cyclone {
            sid: sid.to_string(),
            genesis_hours: 0.0,
            lifetime_hours: hours,
            lat0,
            lon0,
            dlat,
            dlon,
            dlat_accel: accel,
            strength: 1.16e7 * (radius / 2.5).powi(2),
            radius_deg: radius,
        };
        // Both fixed storms travel ~16° west over the store, so they cross their meridian.
        let span = 16.0 / hours;
        let mut out = Vec::new();
        if self.cyclones >= 1 {
            out.push(base("SYN0001N", 14.0, 188.0, 6.0 / hours, -span, 0.0));
        }
        if self.cyclones >= 2 {
            out.push(base("SYN0002S", -16.0, 8.0, -5.0 / hours, -span, 0.0));
        }
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed ^ 0x7c_u64);
        for i in 2..self.cyclones {
            let south = i % 2 == 1;
            let lat0 = rng.random_range(10.0..22.0) * if south { -1.0 } else { 1.0 };
            let lon0 = rng.random_range(0.0..360.0);
            let life = hours * rng.random_range(0.6..1.0);
            let genesis = (hours - life) * rng.random::<f64>();
            let mut c = base(
                &format!("SYN{:04}{}", i + 1, if south { 'S' } else { 'N' }),
                lat0,
                lon0,
                rng.random_range(2.0..8.0) / life * lat0.signum(),
                -rng.random_range(5.0..15.0) / life,
                0.0,
            );
            c.genesis_hours = genesis;
            c.lifetime_hours = life;
            out.push(c);
        }
        out
    }
}

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

/// All variables at one time and level.
struct LevelFields {
    z: Vec<f32>,
    t: Vec<f32>,
    u: Vec<f32>,
    v: Vec<f32>,
    vo: Vec<f32>,
    d: Vec<f32>,
}

struct Grid {
    nlat: usize,
    nlon: usize,
    phi: Vec<f64>,
    lam: Vec<f64>,
    dphi: f64,
    dlam: f64,
}

impl Grid {
    fn new(cfg: &SynthConfig) -> Self {
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

    fn lat_deg(&self, j: usize) -> f64 {
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
fn compute_level(
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
                w += (k * lam - omega * hours + seed_phase * k).cos() / k;
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
pub fn great_circle(phi1: f64, lam1: f64, phi2: f64, lam2: f64) -> f64 {
    let dphi = phi2 - phi1;
    let dlam = lam2 - lam1;
    let h = (dphi / 2.0).sin().powi(2) + phi1.cos() * phi2.cos() * (dlam / 2.0).sin().powi(2);
    2.0 * h.sqrt().min(1.0).asin()
}

fn pick<'a>(fields: &'a LevelFields, var: &str) -> &'a [f32] {
    match var {
        "z" => &fields.z,
        "t" => &fields.t,
        "u" => &fields.u,
        "v" => &fields.v,
        "vo" => &fields.vo,
        _ => &fields.d,
    }
}

pub(crate) fn write_err(path: &Path, e: impl std::fmt::Display) -> StoreError {
    StoreError::Write {
        path: path.display().to_string(),
        detail: e.to_string(),
    }
}

/// Builds a store-less array from metadata JSON; one path for v2 and v3.
pub(crate) fn array_from_json(
    store: &Arc<FilesystemStore>,
    out: &Path,
    name: &str,
    format: ZarrFormat,
    meta: Value,
) -> Result<Array<FilesystemStore>> {
    let metadata = match format {
        ZarrFormat::V2 => ArrayMetadata::V2(
            serde_json::from_value::<ArrayMetadataV2>(meta).map_err(|e| write_err(out, e))?,
        ),
        ZarrFormat::V3 => ArrayMetadata::V3(
            serde_json::from_value::<ArrayMetadataV3>(meta).map_err(|e| write_err(out, e))?,
        ),
    };
    let array = Array::new_with_metadata(store.clone(), &format!("/{name}"), metadata)
        .map_err(|e| write_err(out, e))?;
    array.store_metadata().map_err(|e| write_err(out, e))?;
    Ok(array)
}

pub(crate) struct ArraySpec<'a> {
    pub(crate) name: &'a str,
    pub(crate) shape: Vec<u64>,
    pub(crate) chunks: Vec<u64>,
    pub(crate) shard_inner: Option<Vec<u64>>,
    pub(crate) dtype: &'a str,
    pub(crate) dims: Vec<&'a str>,
    pub(crate) codec: Codec,
    pub(crate) attributes: serde_json::Map<String, Value>,
}

pub(crate) fn metadata_json(format: ZarrFormat, spec: &ArraySpec<'_>) -> Value {
    let (v2_dtype, v3_dtype, size, fill) = match spec.dtype {
        "f32" => ("<f4", "float32", 4, json!("NaN")),
        "f64" => ("<f8", "float64", 8, json!("NaN")),
        "i32" => ("<i4", "int32", 4, json!(0)),
        _ => ("<i8", "int64", 8, json!(0)),
    };
    match format {
        ZarrFormat::V2 => {
            let mut attrs = spec.attributes.clone();
            attrs.insert("_ARRAY_DIMENSIONS".into(), json!(spec.dims));
            json!({
                "zarr_format": 2,
                "shape": spec.shape,
                "chunks": spec.chunks,
                "dtype": v2_dtype,
                "compressor": spec.codec.v2_compressor(size),
                "fill_value": fill,
                "order": "C",
                "filters": null,
                "dimension_separator": ".",
                "attributes": attrs,
            })
        }
        ZarrFormat::V3 => {
            let mut inner = vec![json!({"name": "bytes", "configuration": {"endian": "little"}})];
            inner.extend(spec.codec.v3_codecs(size));
            let codecs = match &spec.shard_inner {
                Some(chunk_shape) => vec![json!({
                    "name": "sharding_indexed",
                    "configuration": {
                        "chunk_shape": chunk_shape,
                        "codecs": inner,
                        "index_codecs": [
                            {"name": "bytes", "configuration": {"endian": "little"}},
                            {"name": "crc32c"}
                        ],
                        "index_location": "end"
                    }
                })],
                None => inner,
            };
            json!({
                "zarr_format": 3,
                "node_type": "array",
                "shape": spec.shape,
                "data_type": v3_dtype,
                "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": spec.chunks}},
                "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
                "fill_value": fill,
                "codecs": codecs,
                "dimension_names": spec.dims,
                "attributes": spec.attributes,
            })
        }
    }
}

pub(crate) fn attrs(pairs: &[(&str, Value)]) -> serde_json::Map<String, Value> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

/// Writes the store described by `cfg` at `out` (a local directory, replaced if it exists) and
/// the cyclone tracks beside it.
pub fn write_store(cfg: &SynthConfig, out: &Path) -> Result<SynthSummary> {
    cfg.validate().map_err(|e| write_err(out, e))?;
    if out.exists() {
        std::fs::remove_dir_all(out).map_err(|e| StoreError::io(out, e))?;
    }
    std::fs::create_dir_all(out).map_err(|e| StoreError::io(out, e))?;
    let store = Arc::new(FilesystemStore::new(out).map_err(|e| write_err(out, e))?);
    let grid = Grid::new(cfg);
    let (nlat, nlon, nlev, nt) = (grid.nlat, grid.nlon, cfg.levels.len(), cfg.steps);
    let cyclones = cfg.cyclones();
    let time_units = CfTimeUnits::parse(TIME_UNITS, Some("gregorian")).expect("valid units");
    let times: Vec<i64> = (0..nt)
        .map(|s| cfg.start_unix + s as i64 * cfg.step_hours as i64 * 3600)
        .collect();
    let hours_enc: Vec<i64> = times.iter().map(|&t| time_units.encode(t) as i64).collect();
    let lats: Vec<f64> = (0..nlat).map(|j| grid.lat_deg(j)).collect();
    let lons: Vec<f64> = (0..nlon).map(|i| cfg.grid_deg * i as f64).collect();
    let levels: Vec<i32> = cfg.levels.iter().map(|&l| l as i32).collect();
    let none = Codec::None;

    let coord =
        |name: &'static str, n: usize, dtype: &'static str, a: serde_json::Map<String, Value>| {
            ArraySpec {
                name,
                shape: vec![n as u64],
                chunks: vec![n as u64],
                shard_inner: None,
                dtype,
                dims: vec![name],
                codec: none,
                attributes: a,
            }
        };
    let time_attrs = attrs(&[
        ("units", json!(TIME_UNITS)),
        ("calendar", json!("gregorian")),
        ("standard_name", json!("time")),
        ("long_name", json!("time")),
    ]);
    let root_attrs = attrs(&[
        ("title", json!("atmorep-rs synthetic ERA5")),
        ("seed", json!(cfg.seed)),
        ("grid_deg", json!(cfg.grid_deg)),
        ("Conventions", json!("CF-1.6")),
    ]);
    let mut specs_written: Vec<(String, Value)> = Vec::new();
    let mut write_array = |spec: ArraySpec<'_>, data: ArrayData| -> Result<()> {
        let array = write_array_meta(&mut specs_written, &store, out, cfg.format, &spec)?;
        let subset = ArraySubset::new_with_shape(spec.shape.clone());
        match data {
            ArrayData::F64(v) => array.store_array_subset(&subset, v),
            ArrayData::I64(v) => array.store_array_subset(&subset, v),
            ArrayData::I32(v) => array.store_array_subset(&subset, v),
        }
        .map_err(|e| write_err(out, e))
    };

    let main_arrays: Vec<(String, ArraySpec<'_>)> = match cfg.layout {
        Layout::PerVariable => {
            write_array(
                coord("time", nt, "i64", time_attrs),
                ArrayData::I64(hours_enc),
            )?;
            write_array(
                coord(
                    "level",
                    nlev,
                    "i32",
                    attrs(&[
                        ("units", json!("hPa")),
                        ("long_name", json!("pressure_level")),
                        ("standard_name", json!("air_pressure")),
                        ("positive", json!("down")),
                    ]),
                ),
                ArrayData::I32(levels.clone()),
            )?;
            write_array(
                coord(
                    "latitude",
                    nlat,
                    "f64",
                    attrs(&[
                        ("units", json!("degrees_north")),
                        ("standard_name", json!("latitude")),
                    ]),
                ),
                ArrayData::F64(lats.clone()),
            )?;
            write_array(
                coord(
                    "longitude",
                    nlon,
                    "f64",
                    attrs(&[
                        ("units", json!("degrees_east")),
                        ("standard_name", json!("longitude")),
                    ]),
                ),
                ArrayData::F64(lons.clone()),
            )?;
            let chunks = cfg.chunks.unwrap_or([1, 1, nlat as u64, nlon as u64]);
            cfg.variables
                .iter()
                .map(|var| {
                    let (_, long, units) =
                        VARIABLES.iter().find(|k| k.0 == var).expect("validated");
                    let spec = ArraySpec {
                        name: VARIABLES.iter().find(|k| k.0 == var).expect("validated").0,
                        shape: vec![nt as u64, nlev as u64, nlat as u64, nlon as u64],
                        chunks: chunks.to_vec(),
                        shard_inner: cfg.shard_inner.map(|s| s.to_vec()),
                        dtype: "f32",
                        dims: vec!["time", "level", "latitude", "longitude"],
                        codec: cfg.codec,
                        attributes: attrs(&[
                            ("units", json!(units)),
                            ("long_name", json!(long)),
                            ("short_name", json!(var)),
                        ]),
                    };
                    (var.clone(), spec)
                })
                .collect()
        }
        Layout::Atmorep => {
            write_array(
                coord("time", nt, "i64", time_attrs),
                ArrayData::I64(hours_enc),
            )?;
            let colat: Vec<f64> = lats.iter().map(|l| 90.0 - l).collect();
            write_array(
                coord(
                    "lats",
                    nlat,
                    "f64",
                    attrs(&[("units", json!("degrees colatitude"))]),
                ),
                ArrayData::F64(colat),
            )?;
            write_array(
                coord(
                    "lons",
                    nlon,
                    "f64",
                    attrs(&[("units", json!("degrees_east"))]),
                ),
                ArrayData::F64(lons.clone()),
            )?;
            let nf = cfg.variables.len() as u64;
            let c = cfg.chunks.map(|c| [c[0], nf, c[1], c[2], c[3]]).unwrap_or([
                8,
                nf,
                nlev as u64,
                nlat as u64,
                nlon as u64,
            ]);
            let spec = ArraySpec {
                name: "data",
                shape: vec![nt as u64, nf, nlev as u64, nlat as u64, nlon as u64],
                chunks: c.to_vec(),
                shard_inner: cfg.shard_inner.map(|s| vec![s[0], nf, s[1], s[2], s[3]]),
                dtype: "f32",
                dims: vec!["time", "field", "level", "lat", "lon"],
                codec: cfg.codec,
                attributes: attrs(&[
                    ("fields", json!(cfg.variables)),
                    ("levels", json!(levels)),
                    (
                        "units",
                        json!(
                            cfg.variables
                                .iter()
                                .map(|v| VARIABLES.iter().find(|k| k.0 == v).map(|k| k.2))
                                .collect::<Vec<_>>()
                        ),
                    ),
                ]),
            };
            vec![("data".to_string(), spec)]
        }
    };

    // Write the data in blocks of whole time chunks so every chunk is encoded exactly once.
    let block_t = main_arrays[0].1.chunks[0] as usize;
    let data_arrays: Vec<(String, Array<FilesystemStore>, Vec<u64>)> = main_arrays
        .into_iter()
        .map(|(var, spec)| {
            let shape = spec.shape.clone();
            write_array_meta(&mut specs_written, &store, out, cfg.format, &spec)
                .map(|a| (var, a, shape))
        })
        .collect::<Result<_>>()?;
    let bar = progress_bar(cfg.progress, nt as u64, "synth");
    let plane = nlat * nlon;
    for t0 in (0..nt).step_by(block_t) {
        let t1 = (t0 + block_t).min(nt);
        let jobs: Vec<(usize, usize)> = (t0..t1)
            .flat_map(|s| (0..nlev).map(move |l| (s, l)))
            .collect();
        let fields: Vec<LevelFields> = jobs
            .par_iter()
            .map(|&(s, l)| {
                let hours = (s * cfg.step_hours as usize) as f64;
                compute_level(cfg, &grid, &cyclones, hours, cfg.levels[l] as f64)
            })
            .collect();
        let at = |s: usize, l: usize| &fields[(s - t0) * nlev + l];
        for (var, array, shape) in &data_arrays {
            let mut block =
                Vec::with_capacity((t1 - t0) * shape[1..].iter().product::<u64>() as usize);
            match cfg.layout {
                Layout::PerVariable => {
                    for s in t0..t1 {
                        for l in 0..nlev {
                            block.extend_from_slice(pick(at(s, l), var));
                        }
                    }
                }
                Layout::Atmorep => {
                    for s in t0..t1 {
                        for v in &cfg.variables {
                            for l in 0..nlev {
                                block.extend_from_slice(pick(at(s, l), v));
                            }
                        }
                    }
                }
            }
            debug_assert_eq!(block.len() % plane, 0);
            let mut start = vec![0; shape.len()];
            start[0] = t0 as u64;
            let mut sub_shape = shape.clone();
            sub_shape[0] = (t1 - t0) as u64;
            let subset = ArraySubset::new_with_start_shape(start, sub_shape)
                .map_err(|e| write_err(out, e))?;
            array
                .store_array_subset(&subset, block)
                .map_err(|e| write_err(out, e))?;
        }
        bar.inc((t1 - t0) as u64);
    }
    bar.finish_and_clear();

    write_root(cfg.format, out, &root_attrs, &specs_written)?;
    let tracks_csv = tracks_path(out);
    write_tracks(&tracks_csv, cfg, &cyclones, &times)?;
    Ok(SynthSummary {
        store: out.to_path_buf(),
        tracks_csv,
        cyclones,
        shape: [nt, nlev, nlat, nlon],
        decoded_bytes: (nt * nlev * plane * 4 * cfg.variables.len()) as u64,
    })
}

enum ArrayData {
    F64(Vec<f64>),
    I64(Vec<i64>),
    I32(Vec<i32>),
}

pub(crate) fn write_array_meta(
    written: &mut Vec<(String, Value)>,
    store: &Arc<FilesystemStore>,
    out: &Path,
    format: ZarrFormat,
    spec: &ArraySpec<'_>,
) -> Result<Array<FilesystemStore>> {
    let meta = metadata_json(format, spec);
    let array = array_from_json(store, out, spec.name, format, meta.clone())?;
    written.push((spec.name.to_string(), meta));
    Ok(array)
}

/// Root group metadata; v2 stores also get consolidated `.zmetadata` like xarray writes.
pub(crate) fn write_root(
    format: ZarrFormat,
    out: &Path,
    root_attrs: &serde_json::Map<String, Value>,
    arrays: &[(String, Value)],
) -> Result<()> {
    let put = |name: &str, value: &Value| {
        let path = out.join(name);
        let text = serde_json::to_string_pretty(value).expect("JSON values serialize");
        std::fs::write(&path, text).map_err(|e| StoreError::io(&path, e))
    };
    match format {
        ZarrFormat::V2 => {
            put(".zgroup", &json!({"zarr_format": 2}))?;
            put(".zattrs", &Value::Object(root_attrs.clone()))?;
            let mut entries = serde_json::Map::new();
            entries.insert(".zgroup".into(), json!({"zarr_format": 2}));
            entries.insert(".zattrs".into(), Value::Object(root_attrs.clone()));
            for (name, meta) in arrays {
                let mut zarray = meta.clone();
                let attributes = zarray
                    .as_object_mut()
                    .and_then(|o| o.remove("attributes"))
                    .unwrap_or_else(|| json!({}));
                entries.insert(format!("{name}/.zarray"), zarray);
                entries.insert(format!("{name}/.zattrs"), attributes);
            }
            put(
                ".zmetadata",
                &json!({"metadata": entries, "zarr_consolidated_format": 1}),
            )
        }
        ZarrFormat::V3 => put(
            "zarr.json",
            &json!({"zarr_format": 3, "node_type": "group", "attributes": root_attrs}),
        ),
    }
}

/// Where the true tracks of a store at `store` are written: `NAME.tracks.csv` beside it.
pub fn tracks_path(store: &Path) -> PathBuf {
    let stem = store
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_else(|| "store".into());
    store.with_file_name(format!("{stem}.tracks.csv"))
}

fn write_tracks(path: &Path, cfg: &SynthConfig, cyclones: &[Cyclone], times: &[i64]) -> Result<()> {
    let mut csv = String::from("SID,ISO_TIME,LAT,LON,VORT850,Z850_ANOM\n");
    let r850 = vortex_profile(850.0);
    for c in cyclones {
        for (s, &t) in times.iter().enumerate() {
            let hours = (s * cfg.step_hours as usize) as f64;
            let Some((lat, lon, intensity)) = c.state(hours) else {
                continue;
            };
            // Analytic centre values of the Gaussian vortex: ∇²ψ = 2A/R², Z' = f ψ.
            let r = c.radius_deg.to_radians() * EARTH_RADIUS;
            let amp = -lat.signum() * c.strength * intensity * r850;
            let vort = -2.0 * amp / (r * r);
            let z_anom = 2.0 * OMEGA * lat.to_radians().sin() * amp;
            let lon180 = if lon > 180.0 { lon - 360.0 } else { lon };
            let _ = writeln!(
                csv,
                "{},{},{:.4},{:.4},{:.6e},{:.2}",
                c.sid,
                format_time(t, TimeFormat::Spaced),
                lat,
                lon180,
                vort,
                z_anom
            );
        }
    }
    std::fs::write(path, csv).map_err(|e| StoreError::io(path, e))
}

/// A progress bar that draws only when asked to (CLI) and stays silent in tests.
pub fn progress_bar(show: bool, len: u64, what: &str) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix:>10} [{bar:40}] {pos}/{len} {elapsed_precise} eta {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_prefix(what.to_string());
    bar
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
    fn fixed_cyclones_cross_their_meridians() {
        let cfg = SynthConfig::default();
        let cs = cfg.cyclones();
        let hours = (cfg.steps - 1) as f64 * cfg.step_hours as f64;
        let (_, n_start, _) = cs[0].state(0.0).unwrap();
        let (_, n_end, _) = cs[0].state(hours).unwrap();
        assert!(
            n_start > 180.0 && n_end < 180.0,
            "north storm crosses the dateline"
        );
        let (_, s_start, _) = cs[1].state(0.0).unwrap();
        let (s_lat, s_end, _) = cs[1].state(hours).unwrap();
        assert!(s_start < 20.0 && s_end > 340.0, "south storm crosses 0°");
        assert!(s_lat < 0.0);
    }

    #[test]
    fn codecs_parse_and_print_round_trip() {
        for c in Codec::ALL {
            assert_eq!(c.to_string().parse::<Codec>().unwrap(), c);
        }
        assert!("lzma".parse::<Codec>().is_err());
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
}
