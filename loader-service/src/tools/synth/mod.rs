//! Synthetic ERA5-like stores with physical structure, deterministic from a seed.
//!
//! The flow is built from a streamfunction ψ and a velocity potential χ on the sphere: zonal
//! jets, eastward-propagating planetary waves, a diurnal divergent circulation that follows the
//! sun, and tropical cyclones (Gaussian vortices) moving along known paths. Winds come from ψ and
//! χ, vorticity and divergence are the discrete curl and divergence of that wind, geopotential
//! is a standard atmosphere plus a meridional gradient plus the linearly balanced `f ψ`, and
//! temperature is hydrostatically consistent with the cyclones' warm cores. True cyclone tracks
//! are written as an IBTrACS-like CSV beside the store.

mod physics;

use std::f64::consts::PI;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use atmorep_proto::calendar::{TimeFormat, format_time};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde_json::{Value, json};
use zarrs::array::{Array, ArraySubset};
use zarrs::filesystem::FilesystemStore;

use crate::error::{Result, StoreError};
use crate::progress::Progress;
use crate::store::cf_time::{CfTimeUnits, TIME_UNITS};
use crate::store::dataset::Layout;
use crate::store::zarr_meta::{
    ArraySpec, Codec, ZarrFormat, attrs, write_array_meta, write_err, write_group,
};
use physics::{Grid, LevelFields, centre_values_850, compute_level, pick};

/// Variables the generator can write (ERA5 short names).
pub const VARIABLES: &[(&str, &str, &str)] = &[
    ("z", "Geopotential", "m**2 s**-2"),
    ("t", "Temperature", "K"),
    ("u", "U component of wind", "m s**-1"),
    ("v", "V component of wind", "m s**-1"),
    ("vo", "Vorticity (relative)", "s**-1"),
    ("d", "Divergence", "s**-1"),
];

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
    /// Name the arrays by ERA5's long names (`temperature`, `vorticity` …, as ARCO-ERA5 and
    /// WeatherBench2 do) instead of the short ones of [`VARIABLES`].
    pub long_names: bool,
    /// Number of cyclones (the first two are fixed: one per hemisphere, crossing 180° and 0°).
    pub cyclones: usize,
    pub seed: u64,
    /// Hours after the first step from which on the store holds weather the earlier steps never
    /// saw, for out-of-sample tests (set it to the end of a training split): every storm of the
    /// earlier period dies at least a step before it, as many new storms are born after it
    /// elsewhere, and the planetary waves move to new phases (over a day, so the fields stay
    /// smooth). `None`: one period.
    pub unseen_after_hours: Option<f64>,
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
            long_names: false,
            cyclones: 2,
            seed: 42,
            unseen_after_hours: None,
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
    /// The name the store gives variable `var` (a short name of [`VARIABLES`]).
    fn stored_name(&self, var: &str) -> &'static str {
        let short = VARIABLES.iter().find(|k| k.0 == var).expect("validated").0;
        if self.long_names {
            atmorep_proto::era5::param(short).map_or(short, |p| p.long)
        } else {
            short
        }
    }

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
        if let Some(after) = self.unseen_after_hours {
            let (step, end) = (
                f64::from(self.step_hours),
                (self.steps.saturating_sub(1) * self.step_hours as usize) as f64,
            );
            if !(after >= 2.0 * step && after <= end - step) {
                return Err(format!(
                    "unseen weather from hour {after}: needs at least two steps before it and \
                     one after it (the store spans hours 0 to {end} in steps of {step})"
                ));
            }
        }
        Ok(())
    }

    /// The cyclones this configuration places: two fixed ones that cross 180° (north) and 0°
    /// (south), then seeded random ones in the tropics of both hemispheres; with
    /// `unseen_after_hours`, those die before it and as many random ones follow after it.
    pub fn cyclones(&self) -> Vec<Cyclone> {
        let end = ((self.steps - 1) as f64 * self.step_hours as f64).max(1.0);
        let Some(after) = self.unseen_after_hours else {
            return self.era_cyclones(0.0, end, 0, self.seed);
        };
        // The earlier storms die a step before `after`; the later ones are born after it.
        let step = f64::from(self.step_hours);
        let mut out = self.era_cyclones(0.0, (after - step).max(step), 0, self.seed);
        let later = self.era_cyclones(after, (end - after).max(step), self.cyclones, !self.seed);
        out.extend(later.into_iter().map(|mut c| {
            c.genesis_hours += after;
            c
        }));
        out
    }

    /// The `cyclones` storms of a period of `hours` (genesis relative to its start `start`, which
    /// only places the fixed pair: a later period gets random storms only), numbered from
    /// `first + 1`, drawn with `seed`.
    fn era_cyclones(&self, start: f64, hours: f64, first: usize, seed: u64) -> Vec<Cyclone> {
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
        let fixed = if start == 0.0 { 2 } else { 0 };
        if self.cyclones >= 1 && fixed > 0 {
            out.push(base("SYN0001N", 14.0, 188.0, 6.0 / hours, -span, 0.0));
        }
        if self.cyclones >= 2 && fixed > 0 {
            out.push(base("SYN0002S", -16.0, 8.0, -5.0 / hours, -span, 0.0));
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x7c_u64);
        for i in fixed.min(self.cyclones)..self.cyclones {
            let i = first + i;
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

/// Writes the store described by `cfg` at `out` (a local directory, replaced if it exists) and
/// the cyclone tracks beside it, reporting the time steps written to `progress`.
pub fn write_store(cfg: &SynthConfig, out: &Path, progress: &dyn Progress) -> Result<SynthSummary> {
    cfg.validate().map_err(|e| write_err(out, e))?;
    if out.exists() {
        std::fs::remove_dir_all(out).map_err(|e| StoreError::io(out, e))?;
    }
    std::fs::create_dir_all(out).map_err(|e| StoreError::io(out, e))?;
    let store = Arc::new(FilesystemStore::new(out).map_err(|e| write_err(out, e))?);
    let grid = Grid::new(cfg);
    let (nlat, nlon, nlev, nt) = (grid.nlat, grid.nlon, cfg.levels.len(), cfg.steps);
    let cyclones = cfg.cyclones();
    let times: Vec<i64> = (0..nt)
        .map(|s| cfg.start_unix + s as i64 * cfg.step_hours as i64 * 3600)
        .collect();
    let (coordinates, fields) = layout_arrays(cfg, &grid, &times);

    let mut written: Vec<(String, Value)> = Vec::new();
    for (spec, data) in coordinates {
        let array = write_array_meta(&mut written, &store, out, cfg.format, &spec)?;
        let subset = ArraySubset::new_with_shape(spec.shape.clone());
        match data {
            ArrayData::F64(v) => array.store_array_subset(&subset, v),
            ArrayData::I64(v) => array.store_array_subset(&subset, v),
            ArrayData::I32(v) => array.store_array_subset(&subset, v),
        }
        .map_err(|e| write_err(out, e))?;
    }
    // Blocks of whole time chunks, so that every chunk is encoded exactly once.
    let block_t = fields[0].1.chunks[0] as usize;
    let data_arrays: Vec<(String, Array<FilesystemStore>, Vec<u64>)> = fields
        .into_iter()
        .map(|(var, spec)| {
            let shape = spec.shape.clone();
            write_array_meta(&mut written, &store, out, cfg.format, &spec).map(|a| (var, a, shape))
        })
        .collect::<Result<_>>()?;
    write_fields(cfg, &grid, &cyclones, &data_arrays, block_t, out, progress)?;

    let root_attrs = attrs(&[
        ("title", json!("atmorep-rs synthetic ERA5")),
        ("seed", json!(cfg.seed)),
        ("grid_deg", json!(cfg.grid_deg)),
        ("Conventions", json!("CF-1.6")),
    ]);
    write_group(cfg.format, out, &root_attrs, &written)?;
    let tracks_csv = tracks_path(out);
    write_tracks(&tracks_csv, cfg, &cyclones, &times)?;
    Ok(SynthSummary {
        store: out.to_path_buf(),
        tracks_csv,
        cyclones,
        shape: [nt, nlev, nlat, nlon],
        decoded_bytes: (nt * nlev * nlat * nlon * 4 * cfg.variables.len()) as u64,
    })
}

/// The arrays of `cfg`'s layout: the coordinates with their values, and the field arrays (per
/// variable, or AtmoRep's one `data` array) by name.
#[allow(clippy::type_complexity)]
fn layout_arrays(
    cfg: &SynthConfig,
    grid: &Grid,
    times: &[i64],
) -> (
    Vec<(ArraySpec<'static>, ArrayData)>,
    Vec<(String, ArraySpec<'static>)>,
) {
    let (nlat, nlon, nlev, nt) = (grid.nlat, grid.nlon, cfg.levels.len(), cfg.steps);
    let time_units = CfTimeUnits::parse(TIME_UNITS, Some("gregorian")).expect("valid units");
    let hours_enc: Vec<i64> = times.iter().map(|&t| time_units.encode(t) as i64).collect();
    let lats: Vec<f64> = (0..nlat).map(|j| grid.lat_deg(j)).collect();
    let lons: Vec<f64> = (0..nlon).map(|i| cfg.grid_deg * i as f64).collect();
    let levels: Vec<i32> = cfg.levels.iter().map(|&l| l as i32).collect();
    let coord = ArraySpec::coordinate;
    let time_attrs = attrs(&[
        ("units", json!(TIME_UNITS)),
        ("calendar", json!("gregorian")),
        ("standard_name", json!("time")),
        ("long_name", json!("time")),
    ]);
    let mut coordinates = Vec::new();
    let mut coordinate = |spec: ArraySpec<'static>, data: ArrayData| coordinates.push((spec, data));

    let fields: Vec<(String, ArraySpec<'static>)> = match cfg.layout {
        Layout::PerVariable => {
            coordinate(
                coord("time", nt, "i64", time_attrs),
                ArrayData::I64(hours_enc),
            );
            coordinate(
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
            );
            coordinate(
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
            );
            coordinate(
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
            );
            let chunks = cfg.chunks.unwrap_or([1, 1, nlat as u64, nlon as u64]);
            cfg.variables
                .iter()
                .map(|var| {
                    let (_, long, units) =
                        VARIABLES.iter().find(|k| k.0 == var).expect("validated");
                    let spec = ArraySpec {
                        name: cfg.stored_name(var),
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
            coordinate(
                coord("time", nt, "i64", time_attrs),
                ArrayData::I64(hours_enc),
            );
            let colat: Vec<f64> = lats.iter().map(|l| 90.0 - l).collect();
            coordinate(
                coord(
                    "lats",
                    nlat,
                    "f64",
                    attrs(&[("units", json!("degrees colatitude"))]),
                ),
                ArrayData::F64(colat),
            );
            coordinate(
                coord(
                    "lons",
                    nlon,
                    "f64",
                    attrs(&[("units", json!("degrees_east"))]),
                ),
                ArrayData::F64(lons.clone()),
            );
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
                    (
                        "fields",
                        json!(
                            cfg.variables
                                .iter()
                                .map(|v| cfg.stored_name(v))
                                .collect::<Vec<_>>()
                        ),
                    ),
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

    (coordinates, fields)
}

/// Computes the fields and writes them into `data_arrays` (name, array, shape) in blocks of
/// `block_t` time steps.
fn write_fields(
    cfg: &SynthConfig,
    grid: &Grid,
    cyclones: &[Cyclone],
    data_arrays: &[(String, Array<FilesystemStore>, Vec<u64>)],
    block_t: usize,
    out: &Path,
    progress: &dyn Progress,
) -> Result<()> {
    let (nlat, nlon, nlev, nt) = (grid.nlat, grid.nlon, cfg.levels.len(), cfg.steps);
    progress.start("synth", nt as u64);
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
                compute_level(cfg, grid, cyclones, hours, cfg.levels[l] as f64)
            })
            .collect();
        let at = |s: usize, l: usize| &fields[(s - t0) * nlev + l];
        for (var, array, shape) in data_arrays {
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
        progress.advance((t1 - t0) as u64);
    }
    progress.finish();
    Ok(())
}

enum ArrayData {
    F64(Vec<f64>),
    I64(Vec<i64>),
    I32(Vec<i32>),
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
    for c in cyclones {
        for (s, &t) in times.iter().enumerate() {
            let hours = (s * cfg.step_hours as usize) as f64;
            let Some((lat, lon, intensity)) = c.state(hours) else {
                continue;
            };
            let (vort, z_anom) = centre_values_850(c, lat, intensity);
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

#[cfg(test)]
mod tests {
    use super::*;

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
    fn storms_after_the_unseen_hour_are_new_ones() {
        // 30 days of 6 h; the last 9 unseen.
        let after = 21.0 * 24.0;
        let cfg = SynthConfig {
            steps: 121,
            step_hours: 6,
            cyclones: 4,
            unseen_after_hours: Some(after),
            ..SynthConfig::default()
        };
        let cs = cfg.cyclones();
        assert_eq!(cs.len(), 8);
        let (before, later): (Vec<&Cyclone>, Vec<&Cyclone>) =
            cs.iter().partition(|c| c.genesis_hours < after);
        assert_eq!((before.len(), later.len()), (4, 4));
        // No earlier storm lives at the unseen hour or after; every later one is born then.
        for c in &before {
            assert!(c.genesis_hours + c.lifetime_hours <= after - 6.0, "{c:?}");
            assert!(c.state(after).is_none(), "{c:?}");
        }
        for c in &later {
            assert!(
                c.genesis_hours >= after && c.state(after - 6.0).is_none(),
                "{c:?}"
            );
            assert!(before.iter().all(|b| b.sid != c.sid), "{c:?}");
            // Somewhere else than any earlier storm was at its birth.
            let (lat, lon, _) = c.state(c.genesis_hours).unwrap();
            for b in &before {
                let (blat, blon, _) = b.state(b.genesis_hours).unwrap();
                assert!((lat - blat).abs() + (lon - blon).abs() > 1.0, "{c:?} {b:?}");
            }
        }
        // Both hemispheres, as before.
        assert!(later.iter().any(|c| c.lat0 > 0.0) && later.iter().any(|c| c.lat0 < 0.0));
        // Without the option the store is the one it always was.
        let plain = SynthConfig {
            unseen_after_hours: None,
            ..cfg.clone()
        };
        assert_eq!(plain.cyclones().len(), 4);
        assert_eq!(
            plain.cyclones(),
            SynthConfig {
                cyclones: 4,
                steps: 121,
                step_hours: 6,
                ..SynthConfig::default()
            }
            .cyclones()
        );
        for bad in [0.0, 6.0, 720.0] {
            let err = SynthConfig {
                unseen_after_hours: Some(bad),
                ..cfg.clone()
            }
            .validate()
            .unwrap_err();
            assert!(err.contains("unseen weather"), "{err}");
        }
        cfg.validate().unwrap();
    }

    #[test]
    fn the_written_tracks_of_the_unseen_period_are_new_storms() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = SynthConfig {
            grid_deg: 10.0,
            steps: 20,
            step_hours: 6,
            levels: vec![850],
            variables: vec!["vo".into()],
            unseen_after_hours: Some(72.0),
            ..SynthConfig::default()
        };
        let summary = write_store(
            &cfg,
            &dir.path().join("s.zarr"),
            &crate::progress::NoProgress,
        )
        .unwrap();
        let csv = std::fs::read_to_string(&summary.tracks_csv).unwrap();
        let header: Vec<&str> = csv.lines().next().unwrap().split(',').collect();
        let col = |name: &str| header.iter().position(|h| *h == name).unwrap();
        let (sid, time) = (col("SID"), col("ISO_TIME"));
        let mut seen = (
            std::collections::BTreeSet::new(),
            std::collections::BTreeSet::new(),
        );
        for line in csv.lines().skip(1) {
            let cells: Vec<&str> = line.split(',').collect();
            // 2020-09-04 00:00 is hour 72.
            if cells[time] < "2020-09-04" {
                seen.0.insert(cells[sid].to_string());
            } else {
                seen.1.insert(cells[sid].to_string());
            }
        }
        assert_eq!((seen.0.len(), seen.1.len()), (2, 2), "{csv}");
        assert!(seen.0.is_disjoint(&seen.1), "{seen:?}");
    }
}
