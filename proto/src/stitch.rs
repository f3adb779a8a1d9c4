//! Global fields back from a tiles-mode token stream.
//!
//! In `mode = "tiles"` the loader cuts every time step of a range into windows that cover the
//! globe (overlapping where the grid does not divide evenly, longitude windows wrapping past
//! 360°; see [`tile_starts`]) and streams them time-major. [`TileStitcher`] undoes that: it puts
//! each sample's tokens back on the grid ([`untokenize`]) at the sample's [`Window`], checks that
//! tiles sharing a grid point agree (or averages them, for a model's predictions), and hands out
//! a [`StitchedStep`] per time step as soon as no later tile can touch it any more — so a long
//! stream is processed with a few time steps in memory, not all.
//!
//! The request must ask for no masking (the stitcher reads `source`), and for the whole stream
//! (`world_size = 1`): a rank's shard leaves holes, reported as missing tiles.

use std::collections::BTreeMap;

use crate::batch::{Batch, Window};
use crate::calendar::{TimeFormat, format_time};
use crate::geometry::{FieldGeometry, TokenGeometry};
use crate::pb;
use crate::request::FieldRequestConfig;
use crate::tokenize::untokenize;

/// `Result` with [`StitchError`].
pub type Result<T, E = StitchError> = std::result::Result<T, E>;

/// Why tiles cannot be stitched.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum StitchError {
    /// The stitcher's fields, grid or time axis cannot work.
    #[error("configuration: {0}")]
    Config(String),
    /// A tile (field sample) of a batch does not fit the stitcher's geometry or grid.
    #[error("tile stitching, field `{field}`: {detail}")]
    Tile { field: String, detail: String },
    /// A time step whose tiles stopped arriving before every grid point was covered.
    #[error(
        "tile stitching: time step {time_index} ({time}) of `{field}` at level {level} is missing \
         {missing} of {total} grid points (first uncovered: row {row}, column {column})"
    )]
    MissingTiles {
        time_index: usize,
        /// `YYYY-MM-DD HH:MM:SS` (UTC).
        time: String,
        field: String,
        level: f64,
        missing: usize,
        total: usize,
        row: usize,
        column: usize,
    },
    /// Two tiles disagree on the value of a grid point they share.
    #[error(
        "tile stitching: tiles disagree at time step {time_index}, `{field}` level {level}, row \
         {row}, column {column}: {first} vs {second}"
    )]
    InconsistentOverlap {
        time_index: usize,
        field: String,
        level: f64,
        row: usize,
        column: usize,
        first: f32,
        second: f32,
    },
}

impl StitchError {
    fn tile(field: &str, detail: impl Into<String>) -> Self {
        Self::Tile {
            field: field.to_string(),
            detail: detail.into(),
        }
    }
}

/// Starts of tiles of `window` points with `overlap` covering `n` points, as the loader tiles
/// each axis: the last tile ends at `n` (non-periodic, so it may overlap its neighbour more) or
/// the tiles wrap around (periodic, longitude).
pub fn tile_starts(n: usize, window: usize, overlap: usize, periodic: bool) -> Vec<usize> {
    let step = window - overlap;
    if periodic {
        return (0..n.div_ceil(step)).map(|i| i * step).collect();
    }
    let mut starts: Vec<usize> = (0..)
        .map(|i| i * step)
        .take_while(|s| s + window < n)
        .collect();
    starts.push(n - window);
    starts.dedup();
    starts
}

/// One field of the tile request: its name, levels and token geometry.
#[derive(Debug, Clone, PartialEq)]
pub struct TileField {
    pub name: String,
    /// Level values in token order; empty for a surface field.
    pub levels: Vec<f64>,
    pub geometry: TokenGeometry,
}

impl TileField {
    pub fn new(name: impl Into<String>, levels: Vec<f64>, geometry: TokenGeometry) -> Self {
        Self {
            name: name.into(),
            levels,
            geometry,
        }
    }

    /// The field as the request file asks for it.
    pub fn from_request(f: &FieldRequestConfig) -> Self {
        let n = |a: [u32; 3]| a.map(|v| v as usize);
        Self::new(
            f.name.clone(),
            f.levels.clone(),
            TokenGeometry::new(n(f.num_tokens), n(f.token_size)),
        )
    }

    /// The level keys of the field's planes: one `None` for a surface field.
    fn level_keys(&self) -> Vec<Option<f64>> {
        if self.levels.is_empty() {
            vec![None]
        } else {
            self.levels.iter().map(|&l| Some(l)).collect()
        }
    }
}

/// The dataset's time axis: instant of time index 0 and the step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeAxis {
    pub start_unix: i64,
    pub step_seconds: i64,
}

impl TimeAxis {
    /// The axis the loader announces in `DatasetInfo.time`.
    pub fn from_proto(t: &pb::TimeAxis) -> Self {
        Self {
            start_unix: t.start_unix,
            step_seconds: (t.step_hours * 3600.0).round() as i64,
        }
    }

    /// Unix seconds of time index `index`.
    pub fn time_of(&self, index: usize) -> i64 {
        self.start_unix + index as i64 * self.step_seconds
    }
}

/// One (field, level) plane of a stitched time step: `nlat × nlon` values, row-major (row =
/// latitude, the loader's canonical grid).
#[derive(Debug, Clone, PartialEq)]
pub struct StitchedPlane {
    pub field: String,
    /// The level value; `None` for a surface field.
    pub level: Option<f64>,
    pub values: Vec<f32>,
}

/// The global fields of one time step, one plane per (field, level) in the stitcher's field
/// order.
#[derive(Debug, Clone, PartialEq)]
pub struct StitchedStep {
    pub time_index: usize,
    /// Valid time, unix seconds (UTC).
    pub time_unix: i64,
    pub planes: Vec<StitchedPlane>,
}

impl StitchedStep {
    /// The values of `field` at `level`, if stitched. Levels travel as `f64` and as `f32` token
    /// info, so they match within 1e-3 (hPa values are whole numbers).
    pub fn plane(&self, field: &str, level: Option<f64>) -> Option<&[f32]> {
        self.planes
            .iter()
            .find(|p| {
                p.field == field
                    && match (p.level, level) {
                        (None, None) => true,
                        (Some(a), Some(b)) => (a - b).abs() < 1e-3,
                        _ => false,
                    }
            })
            .map(|p| p.values.as_slice())
    }
}

/// One (field, level) plane of a time step under construction.
#[derive(Debug)]
struct Plane {
    values: Vec<f32>,
    covered: Vec<bool>,
    count: usize,
    /// Tiles that covered each point, when overlaps are averaged (empty otherwise).
    hits: Vec<u16>,
}

/// How far (relative to the larger magnitude) two tiles may disagree on a shared point: the
/// loader cuts both from the same decoded values, so only a broken stream disagrees.
const OVERLAP_TOLERANCE: f32 = 1e-6;

/// Reassembles global fields per time step from tiles-mode batches; see the [module
/// documentation](self).
#[derive(Debug)]
pub struct TileStitcher {
    fields: Vec<TileField>,
    /// Per field, its geometry with the levels as positions, to untokenize its samples.
    geometries: Vec<FieldGeometry>,
    nlat: usize,
    nlon: usize,
    time: TimeAxis,
    /// Overlapping tiles are averaged instead of checked against each other.
    average: bool,
    /// Per time index, one plane per (field, level) in `fields` order.
    pending: BTreeMap<usize, Vec<Plane>>,
    /// The next time index to hand out (`None` before the first): every one below it is out.
    next: Option<usize>,
    /// Per field, the largest window start seen: tiles are time-major, so no later tile of
    /// that field reaches below it.
    latest_start: Vec<Option<usize>>,
    /// The epoch of the first sample: the tiling's one pass.
    epoch: Option<u64>,
    /// A later epoch has begun: everything is out, further batches are ignored.
    done: bool,
}

impl TileStitcher {
    /// A stitcher for `fields` (the request's fields, in any order; batch fields not listed are
    /// ignored) on the loader's `nlat × nlon` grid (longitude periodic) and `time`.
    pub fn new(fields: Vec<TileField>, nlat: usize, nlon: usize, time: TimeAxis) -> Result<Self> {
        if nlat == 0 || nlon == 0 {
            return Err(StitchError::Config(format!(
                "tile stitching needs a grid, not {nlat} × {nlon} points"
            )));
        }
        if fields.is_empty() {
            return Err(StitchError::Config(
                "tile stitching needs at least one field".into(),
            ));
        }
        for (k, f) in fields.iter().enumerate() {
            if fields[..k].iter().any(|g| g.name == f.name) {
                return Err(StitchError::tile(&f.name, "listed twice"));
            }
            f.geometry
                .validate()
                .map_err(|e| StitchError::tile(&f.name, e.to_string()))?;
            let [_, wy, wx] = f.geometry.window();
            if wy > nlat || wx > nlon {
                return Err(StitchError::tile(
                    &f.name,
                    format!(
                        "a window of {wy} × {wx} points is larger than the {nlat} × {nlon} grid"
                    ),
                ));
            }
        }
        if time.step_seconds <= 0 {
            return Err(StitchError::Config(format!(
                "time step of {} s must be positive",
                time.step_seconds
            )));
        }
        Ok(Self {
            latest_start: vec![None; fields.len()],
            geometries: fields
                .iter()
                .map(|f| FieldGeometry::new((0..f.level_keys().len()).collect(), f.geometry))
                .collect(),
            fields,
            nlat,
            nlon,
            time,
            average: false,
            pending: BTreeMap::new(),
            next: None,
            epoch: None,
            done: false,
        })
    }

    /// Averages where tiles overlap instead of requiring them to agree: for tiles that are a
    /// model's predictions, not cuts of one stored field (the inverse of an overlapping tiling
    /// for global inference). A NaN in a tile is then "no prediction here" and skipped, so that
    /// tiles predicting only part of their window (a forecast of their last time steps) stitch
    /// into the steps they predict; a time step no tile predicts at all is not handed out.
    pub fn with_averaged_overlaps(mut self) -> Self {
        self.average = true;
        self
    }

    /// Adds the tiles of one batch; returns the time steps it completed, in time order.
    ///
    /// The tiling is one pass (epoch); a stream that goes on into the next epoch repeats it, so
    /// samples of a later epoch than the first sample's are not used: they complete the stitcher
    /// ([`Self::is_done`]), which then hands out every remaining step and ignores further
    /// batches.
    pub fn push(&mut self, batch: &Batch) -> Result<Vec<StitchedStep>> {
        if batch.is_empty() || self.done {
            return Ok(Vec::new());
        }
        let epoch = *self
            .epoch
            .get_or_insert(batch.sample_epochs.first().copied().unwrap_or(batch.epoch));
        let take = if batch.sample_epochs.is_empty() {
            batch.len()
        } else {
            batch
                .sample_epochs
                .iter()
                .take_while(|&&e| e == epoch)
                .count()
        };
        for k in 0..self.fields.len() {
            let name = self.fields[k].name.clone();
            let fb = batch.field(&name).ok_or_else(|| {
                StitchError::tile(&name, format!("missing from batch {}", batch.sequence))
            })?;
            fb.validate()
                .map_err(|e| StitchError::tile(&name, e.to_string()))?;
            let f = &self.fields[k];
            let levels = f.level_keys().len();
            let g = f.geometry;
            let expected = [levels * g.tokens_per_level(), g.token_numel()];
            if fb.source_shape[1..] != expected {
                return Err(StitchError::tile(
                    &name,
                    format!(
                        "samples are [N, V] = {:?}, the geometry {:?} × {levels} levels gives {expected:?}",
                        &fb.source_shape[1..],
                        g
                    ),
                ));
            }
            for (b, w) in fb.windows.iter().enumerate().take(take) {
                let values = untokenize(&self.geometries[k], fb.source_of(b));
                self.add_tile(k, w, &values)?;
            }
            let latest = fb.windows.iter().take(take).map(|w| w.time_start).max();
            self.latest_start[k] = self.latest_start[k].max(latest);
        }
        if take < batch.len() {
            self.done = true;
            return self.release(self.pending_end());
        }
        // A step is final once every field has moved past it.
        let sealed = self
            .latest_start
            .iter()
            .map(|s| s.unwrap_or(0))
            .min()
            .unwrap_or(0);
        self.release(sealed)
    }

    /// Whether the tiling is complete: the stream has moved on to its next epoch, and every
    /// time step has been handed out. Stop reading then.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Ends the stream: returns the remaining time steps, or an error if any lacks tiles.
    pub fn finish(mut self) -> Result<Vec<StitchedStep>> {
        let end = self.pending_end();
        self.release(end)
    }

    /// One past the last pending time index.
    fn pending_end(&self) -> usize {
        self.pending.keys().next_back().map_or(0, |&t| t + 1)
    }

    /// Hands out every pending time index below `end`, which must be complete.
    fn release(&mut self, end: usize) -> Result<Vec<StitchedStep>> {
        let mut out = Vec::new();
        while let Some(entry) = self.pending.first_entry() {
            let t = *entry.key();
            if t >= end {
                break;
            }
            // Steps between the last released one and this were never touched: no tile at all.
            if let Some(next) = self.next
                && t > next
            {
                return Err(self.missing(next, 0, None));
            }
            let planes = entry.remove();
            if self.average && planes.iter().all(|p| p.count == 0) {
                self.next = Some(t + 1);
                continue;
            }
            if let Some(p) = planes.iter().position(|p| p.count < self.nlat * self.nlon) {
                return Err(self.missing(t, p, Some(&planes[p])));
            }
            let keys = self
                .fields
                .iter()
                .flat_map(|f| f.level_keys().into_iter().map(|l| (f.name.clone(), l)));
            let planes = keys
                .zip(planes)
                .map(|((field, level), plane)| {
                    let mut values = plane.values;
                    if self.average {
                        for (v, &h) in values.iter_mut().zip(&plane.hits) {
                            *v /= f32::from(h.max(1));
                        }
                    }
                    StitchedPlane {
                        field,
                        level,
                        values,
                    }
                })
                .collect();
            out.push(StitchedStep {
                time_index: t,
                time_unix: self.time.time_of(t),
                planes,
            });
            self.next = Some(t + 1);
        }
        Ok(out)
    }

    fn missing(&self, t: usize, plane: usize, data: Option<&Plane>) -> StitchError {
        let (field, level) = self.plane_name(plane);
        let first = data
            .and_then(|d| d.covered.iter().position(|c| !c))
            .unwrap_or(0);
        let total = self.nlat * self.nlon;
        StitchError::MissingTiles {
            time_index: t,
            time: format_time(self.time.time_of(t), TimeFormat::Spaced),
            field,
            level,
            missing: data.map_or(total, |d| total - d.count),
            total,
            row: first / self.nlon,
            column: first % self.nlon,
        }
    }

    fn plane_name(&self, plane: usize) -> (String, f64) {
        let mut p = 0;
        for f in &self.fields {
            for level in f.level_keys() {
                if p == plane {
                    return (f.name.clone(), level.unwrap_or(f64::NAN));
                }
                p += 1;
            }
        }
        (String::new(), f64::NAN)
    }

    /// Scatters one tile of field `k` (values `(t, level, lat, lon)` over its window).
    fn add_tile(&mut self, k: usize, w: &Window, values: &[f32]) -> Result<()> {
        let f = &self.fields[k];
        let name = f.name.clone();
        if w.size != f.geometry.window() {
            return Err(StitchError::tile(
                &name,
                format!(
                    "a window of {:?} points, the geometry's is {:?}",
                    w.size,
                    f.geometry.window()
                ),
            ));
        }
        let [wt, wy, wx] = w.size;
        if w.lat_start + wy > self.nlat || w.lon_start >= self.nlon {
            return Err(StitchError::tile(
                &name,
                format!("window {w:?} leaves the {} × {} grid", self.nlat, self.nlon),
            ));
        }
        if let Some(next) = self.next
            && w.time_start < next
        {
            return Err(StitchError::tile(
                &name,
                format!(
                    "a tile starting at time index {} arrived after time index {} was handed out \
                     (tiles must come time-major, from one unsharded stream)",
                    w.time_start,
                    next - 1
                ),
            ));
        }
        let levels = f.level_keys().len();
        let first_plane: usize = self.fields[..k].iter().map(|g| g.level_keys().len()).sum();
        let planes_per_step: usize = self.fields.iter().map(|g| g.level_keys().len()).sum();
        let (nlat, nlon) = (self.nlat, self.nlon);
        let n = nlat * nlon;
        let average = self.average;
        for l in 0..levels {
            for t in 0..wt {
                let ti = w.time_start + t;
                let planes = self.pending.entry(ti).or_insert_with(|| {
                    (0..planes_per_step)
                        .map(|_| Plane {
                            values: vec![f32::NAN; n],
                            covered: vec![false; n],
                            count: 0,
                            hits: if average { vec![0; n] } else { Vec::new() },
                        })
                        .collect()
                });
                let plane = &mut planes[first_plane + l];
                for y in 0..wy {
                    let row = w.lat_start + y;
                    let src = ((t * levels + l) * wy + y) * wx;
                    for x in 0..wx {
                        let col = (w.lon_start + x) % nlon;
                        let at = row * nlon + col;
                        let v = values[src + x];
                        if average {
                            if v.is_nan() {
                                continue;
                            }
                            if !plane.covered[at] {
                                plane.covered[at] = true;
                                plane.values[at] = 0.0;
                                plane.count += 1;
                            }
                            plane.values[at] += v;
                            plane.hits[at] = plane.hits[at].saturating_add(1);
                        } else if plane.covered[at] {
                            let old = plane.values[at];
                            let same = old == v
                                || (old.is_nan() && v.is_nan())
                                || (old - v).abs() <= OVERLAP_TOLERANCE * old.abs().max(v.abs());
                            if !same {
                                return Err(StitchError::InconsistentOverlap {
                                    time_index: ti,
                                    field: name,
                                    level: f.level_keys()[l].unwrap_or(f64::NAN),
                                    row,
                                    column: col,
                                    first: old,
                                    second: v,
                                });
                            }
                        } else {
                            plane.covered[at] = true;
                            plane.values[at] = v;
                            plane.count += 1;
                        }
                    }
                }
                debug_assert!(plane.count <= nlat * nlon);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::{FieldBatch, StreamCursor};
    use crate::tokenize::tokenize;

    /// Stitches a whole finite stream of batches, as a client reads one.
    trait StitchAll {
        fn stitch_all<I: IntoIterator<Item = Batch>>(self, batches: I)
        -> Result<Vec<StitchedStep>>;
    }

    impl StitchAll for TileStitcher {
        fn stitch_all<I: IntoIterator<Item = Batch>>(
            mut self,
            batches: I,
        ) -> Result<Vec<StitchedStep>> {
            let mut out = Vec::new();
            for b in batches {
                out.extend(self.push(&b)?);
                if self.is_done() {
                    break;
                }
            }
            out.extend(self.finish()?);
            Ok(out)
        }
    }

    /// The loader's grid of a 2° dataset: 91 latitudes (poles included) × 180 longitudes.
    #[derive(Debug, Clone, Copy)]
    struct Grid {
        nlat: usize,
        nlon: usize,
    }

    const GRID: Grid = Grid {
        nlat: 91,
        nlon: 180,
    };

    const T0: i64 = 1_598_918_400;
    const STEP: i64 = 3 * 3600;

    fn axis() -> TimeAxis {
        TimeAxis {
            start_unix: T0,
            step_seconds: STEP,
        }
    }

    /// Two fields with one window of 2 × 15 × 28 points but different tokens.
    fn fields() -> Vec<TileField> {
        vec![
            TileField::new("vo", vec![850.0], TokenGeometry::new([2, 3, 4], [1, 5, 7])),
            TileField::new(
                "z",
                vec![850.0, 500.0, 300.0],
                TokenGeometry::new([1, 3, 2], [2, 5, 14]),
            ),
        ]
    }

    /// The value of field `k`, level `l` at time index `t`, grid point (`j`, `i`).
    fn truth(k: usize, l: usize, t: usize, j: usize, i: usize) -> f32 {
        let (lat, lon) = (90.0 - 2.0 * j as f32, 2.0 * i as f32);
        (k * 10_000 + l * 1_000 + t * 100) as f32
            + lat.to_radians().sin() * 50.0
            + (lon.to_radians() * 3.0).cos() * 7.0
    }

    /// Tiles-mode batches of `batch_size` over time indices `times` (time-major, as the
    /// loader sends them), with `overlap`.
    fn stream(
        grid: &Grid,
        times: std::ops::Range<usize>,
        overlap: [usize; 3],
        batch_size: usize,
    ) -> Vec<Batch> {
        let fs = fields();
        let window = fs[0].geometry.window();
        let mut windows = Vec::new();
        for t in tile_starts(times.len(), window[0], overlap[0], false) {
            for y in tile_starts(grid.nlat, window[1], overlap[1], false) {
                for x in tile_starts(grid.nlon, window[2], overlap[2], true) {
                    windows.push(Window {
                        time_start: times.start + t,
                        lat_start: y,
                        lon_start: x % grid.nlon,
                        size: window,
                    });
                }
            }
        }
        let n_tiles = windows.len();
        windows
            .chunks(batch_size)
            .enumerate()
            .map(|(seq, ws)| {
                let fields = fs
                    .iter()
                    .enumerate()
                    .map(|(k, f)| {
                        let levels = f.levels.len();
                        let mut source = Vec::new();
                        for w in ws {
                            let mut values = Vec::new();
                            for t in 0..window[0] {
                                for l in 0..levels {
                                    for y in 0..window[1] {
                                        for x in 0..window[2] {
                                            values.push(truth(
                                                k,
                                                l,
                                                w.time_start + t,
                                                w.lat_start + y,
                                                (w.lon_start + x) % grid.nlon,
                                            ));
                                        }
                                    }
                                }
                            }
                            let geometry = FieldGeometry::new((0..levels).collect(), f.geometry);
                            source.extend(tokenize(&geometry, &values));
                        }
                        let n = levels * f.geometry.tokens_per_level();
                        let b = ws.len();
                        FieldBatch {
                            name: f.name.clone(),
                            source,
                            source_shape: [b, n, f.geometry.token_numel()],
                            target: Vec::new(),
                            masked_indices: vec![Vec::new(); b],
                            token_info: vec![0.0; b * n * 8],
                            pe: vec![0.0; b * n * 2],
                            pe_width: 2,
                            windows: ws.to_vec(),
                        }
                    })
                    .collect();
                let first = seq * batch_size;
                Batch {
                    sequence: seq as u64,
                    epoch: 0,
                    sample_ids: (first as u64..(first + ws.len()) as u64).collect(),
                    sample_epochs: vec![0; ws.len()],
                    fields,
                    cursor_after: StreamCursor {
                        epoch: 0,
                        position: (first + ws.len()) as u64,
                    },
                    end_of_stream: first + ws.len() == n_tiles,
                }
            })
            .collect()
    }

    fn check_exact(steps: &[StitchedStep], times: std::ops::Range<usize>) {
        check_close(steps, times, 0.0);
    }

    /// Every value within `rel_tolerance` of the truth (relative to its magnitude).
    fn check_close(steps: &[StitchedStep], times: std::ops::Range<usize>, rel_tolerance: f32) {
        assert_eq!(steps.len(), times.len());
        for (s, t) in steps.iter().zip(times) {
            assert_eq!(s.time_unix, T0 + t as i64 * STEP);
            assert_eq!(s.time_index, t);
            for (k, f) in fields().iter().enumerate() {
                for (l, &level) in f.levels.iter().enumerate() {
                    let plane = s.plane(&f.name, Some(level)).unwrap();
                    assert_eq!(plane.len(), GRID.nlat * GRID.nlon);
                    for j in 0..GRID.nlat {
                        for i in 0..GRID.nlon {
                            let (got, want) = (plane[j * GRID.nlon + i], truth(k, l, t, j, i));
                            assert!(
                                (got - want).abs() <= rel_tolerance * want.abs(),
                                "{k} {l} {t} {j} {i}: {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn stitching_tiles_reproduces_the_fields_exactly() {
        let grid = GRID;
        // Lat (91 rows) and lon (180 columns) do not divide by the 15 × 28 window: the last
        // row of tiles overlaps, the last column of tiles wraps past 360° onto the first; time
        // indices 5 … 11 (7 steps) overlap in the last time block too.
        let batches = stream(&grid, 5..12, [0, 0, 0], 7);
        let mut stitcher = TileStitcher::new(fields(), grid.nlat, grid.nlon, axis()).unwrap();
        let mut early = 0;
        let mut out = Vec::new();
        for (k, b) in batches.iter().enumerate() {
            let done = stitcher.push(b).unwrap();
            if k + 1 < batches.len() {
                early += done.len();
            }
            out.extend(done);
        }
        out.extend(stitcher.finish().unwrap());
        // Steps are handed out while the stream goes on, not all at its end.
        assert!(early >= 4, "{early}");
        check_exact(&out, 5..12);

        // With overlap in every direction, in one go.
        let batches = stream(&grid, 0..6, [1, 4, 6], 16);
        let out = TileStitcher::new(fields(), grid.nlat, grid.nlon, axis())
            .unwrap()
            .stitch_all(batches.clone())
            .unwrap();
        check_exact(&out, 0..6);
        // Averaged where they overlap (up to 8 tiles on a point): the fields again.
        let out = TileStitcher::new(fields(), grid.nlat, grid.nlon, axis())
            .unwrap()
            .with_averaged_overlaps()
            .stitch_all(batches)
            .unwrap();
        check_close(&out, 0..6, 1e-6);
    }

    /// Tiles that predict only their last time step (a forecast, NaN elsewhere), overlapping
    /// in time so that every step is some tile's last: averaged, they give each step that has
    /// a past exactly; the first step, which no tile predicts, is not handed out.
    #[test]
    fn tiles_predicting_their_last_step_stitch_into_the_steps_they_predict() {
        let grid = GRID;
        let forecast = |mut batches: Vec<Batch>| {
            for b in &mut batches {
                for (f, field) in b.fields.iter_mut().zip(fields()) {
                    let geometry =
                        FieldGeometry::new((0..field.levels.len()).collect(), field.geometry);
                    let [_, wy, wx] = field.geometry.window();
                    let per_step = field.levels.len() * wy * wx;
                    let n = f.source_shape[1] * f.source_shape[2];
                    for sample in f.source.chunks_mut(n) {
                        let mut values = untokenize(&geometry, sample);
                        values[..per_step].fill(f32::NAN);
                        sample.copy_from_slice(&tokenize(&geometry, &values));
                    }
                }
            }
            batches
        };
        let batches = forecast(stream(&grid, 3..9, [1, 0, 0], 16));
        let stitch = |batches: Vec<Batch>| {
            TileStitcher::new(fields(), grid.nlat, grid.nlon, axis())
                .unwrap()
                .with_averaged_overlaps()
                .stitch_all(batches)
        };
        check_exact(&stitch(batches.clone()).unwrap(), 4..9);
        // Without averaging, NaN is a value like any other, which overlapping tiles disagree on.
        let err = TileStitcher::new(fields(), grid.nlat, grid.nlon, axis())
            .unwrap()
            .stitch_all(batches.clone())
            .unwrap_err();
        assert!(
            matches!(err, StitchError::InconsistentOverlap { .. }),
            "{err}"
        );
        // A point one tile left unpredicted in a step others predict is a missing tile.
        let mut holed = batches;
        let f = &mut holed[0].fields[0];
        let n = f.source_shape[1] * f.source_shape[2];
        let geometry = FieldGeometry::new(vec![0], fields()[0].geometry);
        let mut values = untokenize(&geometry, &f.source[..n]);
        let last = values.len() - 1;
        values[last] = f32::NAN;
        f.source[..n].copy_from_slice(&tokenize(&geometry, &values));
        let err = stitch(holed).unwrap_err();
        assert!(
            matches!(
                err,
                StitchError::MissingTiles {
                    time_index: 4,
                    missing: 1,
                    row: 14,
                    column: 27,
                    ..
                }
            ),
            "{err}"
        );
    }

    /// `a` followed by the samples of `b`, as one batch.
    fn concat(mut a: Batch, b: &Batch) -> Batch {
        a.sample_ids.extend(&b.sample_ids);
        a.sample_epochs.extend(&b.sample_epochs);
        for (f, g) in a.fields.iter_mut().zip(&b.fields) {
            f.source.extend(&g.source);
            f.source_shape[0] += g.source_shape[0];
            f.masked_indices.extend(g.masked_indices.iter().cloned());
            f.token_info.extend(&g.token_info);
            f.pe.extend(&g.pe);
            f.windows.extend(&g.windows);
        }
        a.cursor_after = b.cursor_after;
        a
    }

    #[test]
    fn a_stream_going_on_into_the_next_epoch_ends_the_tiling() {
        let grid = GRID;
        let mut batches = stream(&grid, 0..4, [0, 0, 0], 8);
        // The loader without `end_epoch` starts the tiling over (epoch 1) within a batch.
        let mut again = batches[0].clone();
        again.sample_epochs.fill(1);
        let last = batches.pop().unwrap();
        batches.push(concat(last, &again));
        batches.push(again.clone());
        let mut stitcher = TileStitcher::new(fields(), grid.nlat, grid.nlon, axis()).unwrap();
        let mut out = Vec::new();
        for b in &batches {
            out.extend(stitcher.push(b).unwrap());
        }
        assert!(stitcher.is_done());
        assert!(stitcher.finish().unwrap().is_empty());
        check_exact(&out, 0..4);
        let out = TileStitcher::new(fields(), grid.nlat, grid.nlon, axis())
            .unwrap()
            .stitch_all(batches)
            .unwrap();
        check_exact(&out, 0..4);
    }

    #[test]
    fn a_missing_tile_is_reported() {
        let grid = GRID;
        let mut batches = stream(&grid, 0..4, [0, 0, 0], 1);
        // Drops one tile of the first time block (time indices 0 and 1).
        batches.remove(10);
        let e = TileStitcher::new(fields(), grid.nlat, grid.nlon, axis())
            .unwrap()
            .stitch_all(batches)
            .unwrap_err();
        assert!(
            matches!(
                e,
                StitchError::MissingTiles {
                    time_index: 0,
                    missing: 420,
                    total: 16380,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("2020-09-01 00:00:00"), "{e}");
        // The end of the stream: the last block incomplete.
        let mut batches = stream(&grid, 0..4, [0, 0, 0], 1);
        batches.pop();
        let e = TileStitcher::new(fields(), grid.nlat, grid.nlon, axis())
            .unwrap()
            .stitch_all(batches)
            .unwrap_err();
        assert!(
            matches!(e, StitchError::MissingTiles { time_index: 2, .. }),
            "{e}"
        );
    }

    #[test]
    fn inconsistent_overlaps_and_disorder_are_errors() {
        let grid = GRID;
        let mut batches = stream(&grid, 0..2, [0, 0, 0], 1);
        // The last row of tiles starts at row 76 and overlaps the one before (75 … 89).
        let k = batches
            .iter()
            .position(|b| b.fields[0].windows[0].lat_start == 76)
            .unwrap();
        batches[k].fields[0].source[0] += 1.0;
        let e = TileStitcher::new(fields(), grid.nlat, grid.nlon, axis())
            .unwrap()
            .stitch_all(batches)
            .unwrap_err();
        assert!(
            matches!(&e, StitchError::InconsistentOverlap { row: 76, field, .. } if field == "vo"),
            "{e}"
        );

        // Averaged instead: the disagreeing point is the mean of its two tiles, every other
        // point exact.
        let mut batches = stream(&grid, 0..2, [0, 0, 0], 1);
        batches[k].fields[0].source[0] += 1.0;
        let w = batches[k].fields[0].windows[0];
        let covers = |v: &Window| {
            let [wt, wy, wx] = v.size;
            (v.time_start..v.time_start + wt).contains(&w.time_start)
                && (v.lat_start..v.lat_start + wy).contains(&76)
                && (0..wx).any(|x| (v.lon_start + x) % grid.nlon == w.lon_start)
        };
        let hits = batches
            .iter()
            .filter(|b| covers(&b.fields[0].windows[0]))
            .count();
        assert!(hits >= 2, "{hits}");
        let out = TileStitcher::new(fields(), grid.nlat, grid.nlon, axis())
            .unwrap()
            .with_averaged_overlaps()
            .stitch_all(batches)
            .unwrap();
        let vo = out[w.time_start].plane("vo", Some(850.0)).unwrap();
        let want = truth(0, 0, w.time_start, 76, w.lon_start);
        assert!((vo[76 * grid.nlon + w.lon_start] - (want + 1.0 / hits as f32)).abs() < 1e-4);
        assert_eq!(
            vo[77 * grid.nlon + w.lon_start],
            truth(0, 0, w.time_start, 77, w.lon_start)
        );

        // A tile of the first time block again after the second block has begun.
        let mut batches = stream(&grid, 0..4, [0, 0, 0], 9);
        let again = batches[0].clone();
        batches.insert(batches.len() - 1, again);
        let e = TileStitcher::new(fields(), grid.nlat, grid.nlon, axis())
            .unwrap()
            .stitch_all(batches)
            .unwrap_err();
        assert!(e.to_string().contains("time-major"), "{e}");
    }

    #[test]
    fn mismatched_requests_are_errors() {
        let grid = GRID;
        let batches = stream(&grid, 0..2, [0, 0, 0], 4);
        let mut wrong = fields();
        wrong[1].geometry = TokenGeometry::new([1, 3, 2], [2, 5, 7]);
        wrong[1].geometry.num_tokens = [1, 3, 4];
        let e = TileStitcher::new(wrong, grid.nlat, grid.nlon, axis())
            .unwrap()
            .push(&batches[0])
            .unwrap_err();
        assert!(
            matches!(&e, StitchError::Tile { field, .. } if field == "z"),
            "{e}"
        );
        let mut absent = fields();
        absent[0].name = "t".into();
        let e = TileStitcher::new(absent, grid.nlat, grid.nlon, axis())
            .unwrap()
            .push(&batches[0])
            .unwrap_err();
        assert!(e.to_string().contains("`t`: missing from batch 0"), "{e}");
        // Extra fields in the batch are fine.
        let only_vo = vec![fields().remove(0)];
        let out = TileStitcher::new(only_vo, grid.nlat, grid.nlon, axis())
            .unwrap()
            .stitch_all(batches)
            .unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].planes.len(), 1);
        assert!(TileStitcher::new(Vec::new(), grid.nlat, grid.nlon, axis()).is_err());
        assert!(TileStitcher::new(fields(), 0, grid.nlon, axis()).is_err());
        let too_big = TileField::new("vo", vec![], TokenGeometry::new([1, 1, 1], [1, 100, 1]));
        assert!(TileStitcher::new(vec![too_big], grid.nlat, grid.nlon, axis()).is_err());
    }

    #[test]
    fn fields_from_a_request_file() {
        let req: crate::RequestConfig = toml::from_str(
            "dataset = \"era5\"\nmode = \"tiles\"\nunits = \"physical\"\n\
             [[fields]]\nname = \"vo\"\nlevels = [850]\nnum_tokens = [2, 3, 4]\n\
             token_size = [1, 5, 7]\npe = \"none\"\npe_width = 2\n",
        )
        .unwrap();
        let f = TileField::from_request(&req.fields[0]);
        assert_eq!(f, fields()[0]);
        let t = TimeAxis::from_proto(&pb::TimeAxis {
            start_unix: T0,
            step_hours: 3.0,
            ..Default::default()
        });
        assert_eq!(t, axis());
        assert_eq!(t.time_of(2), T0 + 6 * 3600);
    }
}
