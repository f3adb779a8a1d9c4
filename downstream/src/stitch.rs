//! Global fields back from a tiles-mode token stream.
//!
//! In `mode = "tiles"` the loader cuts every time step of a range into windows that cover the
//! globe (overlapping where the grid does not divide evenly, longitude windows wrapping past
//! 360°) and streams them time-major. [`TileStitcher`] undoes that: it puts each sample's tokens
//! back on the grid ([`untokenize`]) at the sample's [`Window`], checks that tiles sharing a
//! grid point agree, and hands out a [`Snapshot`] per time step as soon as no later tile can
//! touch it any more — so a long stream is tracked with a few time steps in memory, not all.
//!
//! The request must ask for physical units and no masking (the stitcher reads `source`), and
//! for the whole stream (`world_size = 1`): a rank's shard leaves holes, reported as missing
//! tiles.

use std::collections::BTreeMap;

use atmorep_proto::batch::{Batch, Window};
use atmorep_proto::geometry::TokenGeometry;
use atmorep_proto::pb;
use atmorep_proto::request::FieldRequestConfig;

use crate::error::{Result, TrackError};
use crate::field::{Field, Grid, Snapshot};
use crate::time::format_iso;

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

/// Puts one sample's tokens (`[levels × tokens per level, token values]`, token order (level,
/// t, lat, lon), values (t, lat, lon)) back into its window: `(level, t, lat, lon)` row-major over
/// `geometry.window()`.
pub fn untokenize(geometry: &TokenGeometry, levels: usize, tokens: &[f32]) -> Vec<f32> {
    let mut out = vec![0.0; tokens.len()];
    for_each_token_value(geometry, levels, |token_pos, window_pos| {
        out[window_pos] = tokens[token_pos];
    });
    out
}

/// The inverse of [`untokenize`]: a `(level, t, lat, lon)` window cut into tokens.
pub fn tokenize(geometry: &TokenGeometry, levels: usize, window: &[f32]) -> Vec<f32> {
    let mut out = vec![0.0; window.len()];
    for_each_token_value(geometry, levels, |token_pos, window_pos| {
        out[token_pos] = window[window_pos];
    });
    out
}

/// Calls `f(position in token order, position in window order)` for every value of a sample.
fn for_each_token_value(geometry: &TokenGeometry, levels: usize, mut f: impl FnMut(usize, usize)) {
    let [nt, ny, nx] = geometry.num_tokens;
    let [st, sy, sx] = geometry.token_size;
    let [wt, wy, wx] = geometry.window();
    let mut k = 0;
    for l in 0..levels {
        for t in 0..nt {
            for y in 0..ny {
                for x in 0..nx {
                    for dt in 0..st {
                        for dy in 0..sy {
                            let row = ((l * wt + t * st + dt) * wy + y * sy + dy) * wx + x * sx;
                            for dx in 0..sx {
                                f(k, row + dx);
                                k += 1;
                            }
                        }
                    }
                }
            }
        }
    }
}

/// One (field, level) plane of a time step under construction.
#[derive(Debug)]
struct Plane {
    values: Vec<f32>,
    covered: Vec<bool>,
    count: usize,
}

/// Reassembles global fields per time step from tiles-mode batches; see the [module
/// documentation](self).
#[derive(Debug)]
pub struct TileStitcher {
    fields: Vec<TileField>,
    grid: Grid,
    time: TimeAxis,
    rel_tolerance: f32,
    /// Per time index, one plane per (field, level) in `fields` order.
    pending: BTreeMap<usize, Vec<Plane>>,
    /// The next time index to hand out (`None` before the first): every one below it is out.
    next: Option<usize>,
    /// Largest window start seen: tiles are time-major, so no later tile reaches below it.
    latest_start: Option<usize>,
}

impl TileStitcher {
    /// A stitcher for `fields` (the request's fields, in any order; batch fields not listed are
    /// ignored) on `grid` and `time`.
    pub fn new(fields: Vec<TileField>, grid: Grid, time: TimeAxis) -> Result<Self> {
        grid.validate()?;
        if fields.is_empty() {
            return Err(TrackError::Config(
                "tile stitching needs at least one field".into(),
            ));
        }
        for (k, f) in fields.iter().enumerate() {
            if fields[..k].iter().any(|g| g.name == f.name) {
                return Err(TrackError::tile(&f.name, "listed twice"));
            }
            f.geometry
                .validate()
                .map_err(|e| TrackError::tile(&f.name, e.to_string()))?;
            let [_, wy, wx] = f.geometry.window();
            if wy > grid.nlat || wx > grid.nlon {
                return Err(TrackError::tile(
                    &f.name,
                    format!(
                        "a window of {wy} × {wx} points is larger than the {} × {} grid",
                        grid.nlat, grid.nlon
                    ),
                ));
            }
        }
        if time.step_seconds <= 0 {
            return Err(TrackError::Config(format!(
                "time step of {} s must be positive",
                time.step_seconds
            )));
        }
        Ok(Self {
            fields,
            grid,
            time,
            rel_tolerance: 1e-6,
            pending: BTreeMap::new(),
            next: None,
            latest_start: None,
        })
    }

    /// How far (relative to the larger magnitude) two tiles may disagree on a shared point.
    /// Default 1e-6: the loader cuts both from the same decoded values, so only a broken
    /// stream disagrees.
    pub fn with_tolerance(mut self, rel_tolerance: f32) -> Self {
        self.rel_tolerance = rel_tolerance;
        self
    }

    /// Adds the tiles of one batch; returns the time steps it completed, in time order.
    pub fn push(&mut self, batch: &Batch) -> Result<Vec<Snapshot>> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        for k in 0..self.fields.len() {
            let name = self.fields[k].name.clone();
            let fb = batch.field(&name).ok_or_else(|| {
                TrackError::tile(&name, format!("missing from batch {}", batch.sequence))
            })?;
            fb.validate()
                .map_err(|e| TrackError::tile(&name, e.to_string()))?;
            let f = &self.fields[k];
            let levels = f.level_keys().len();
            let g = f.geometry;
            let expected = [levels * g.tokens_per_level(), g.token_numel()];
            if fb.source_shape[1..] != expected {
                return Err(TrackError::tile(
                    &name,
                    format!(
                        "samples are [N, V] = {:?}, the geometry {:?} × {levels} levels gives {expected:?}",
                        &fb.source_shape[1..],
                        g
                    ),
                ));
            }
            for (b, w) in fb.windows.iter().enumerate() {
                let values = untokenize(&g, levels, fb.source_of(b));
                self.add_tile(k, w, &values)?;
            }
        }
        let latest = batch
            .fields
            .iter()
            .flat_map(|f| f.windows.iter().map(|w| w.time_start))
            .max();
        self.latest_start = self.latest_start.max(latest);
        let sealed = self.latest_start.unwrap_or(0);
        self.release(sealed)
    }

    /// Ends the stream: returns the remaining time steps, or an error if any lacks tiles.
    pub fn finish(mut self) -> Result<Vec<Snapshot>> {
        let end = self.pending.keys().next_back().map_or(0, |&t| t + 1);
        self.release(end)
    }

    /// Stitches a whole finite stream of batches.
    pub fn stitch_all<I: IntoIterator<Item = Batch>>(
        mut self,
        batches: I,
    ) -> Result<Vec<Snapshot>> {
        let mut out = Vec::new();
        for b in batches {
            out.extend(self.push(&b)?);
        }
        out.extend(self.finish()?);
        Ok(out)
    }

    /// Hands out every pending time index below `end`, which must be complete.
    fn release(&mut self, end: usize) -> Result<Vec<Snapshot>> {
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
            let mut snapshot = Snapshot::new(self.time.time_of(t));
            let mut p = 0;
            for f in &self.fields {
                for level in f.level_keys() {
                    let plane = &planes[p];
                    if plane.count < self.grid.len() {
                        return Err(self.missing(t, p, Some(plane)));
                    }
                    let field = Field::new(self.grid, plane.values.clone())?;
                    snapshot.insert(&f.name, level, field)?;
                    p += 1;
                }
            }
            out.push(snapshot);
            self.next = Some(t + 1);
        }
        Ok(out)
    }

    fn missing(&self, t: usize, plane: usize, data: Option<&Plane>) -> TrackError {
        let (field, level) = self.plane_name(plane);
        let first = data
            .and_then(|d| d.covered.iter().position(|c| !c))
            .unwrap_or(0);
        TrackError::MissingTiles {
            time_index: t,
            time: format_iso(self.time.time_of(t)),
            field,
            level,
            missing: data.map_or(self.grid.len(), |d| self.grid.len() - d.count),
            total: self.grid.len(),
            row: first / self.grid.nlon,
            column: first % self.grid.nlon,
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

    /// Scatters one tile of field `k` (values `(level, t, lat, lon)` over its window).
    fn add_tile(&mut self, k: usize, w: &Window, values: &[f32]) -> Result<()> {
        let f = &self.fields[k];
        let name = f.name.clone();
        if w.size != f.geometry.window() {
            return Err(TrackError::tile(
                &name,
                format!(
                    "a window of {:?} points, the geometry's is {:?}",
                    w.size,
                    f.geometry.window()
                ),
            ));
        }
        let [wt, wy, wx] = w.size;
        if w.lat_start + wy > self.grid.nlat || w.lon_start >= self.grid.nlon {
            return Err(TrackError::tile(
                &name,
                format!(
                    "window {w:?} leaves the {} × {} grid",
                    self.grid.nlat, self.grid.nlon
                ),
            ));
        }
        if let Some(next) = self.next
            && w.time_start < next
        {
            return Err(TrackError::tile(
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
        let (nlat, nlon) = (self.grid.nlat, self.grid.nlon);
        let n = self.grid.len();
        let tol = self.rel_tolerance;
        for l in 0..levels {
            for t in 0..wt {
                let ti = w.time_start + t;
                let planes = self.pending.entry(ti).or_insert_with(|| {
                    (0..planes_per_step)
                        .map(|_| Plane {
                            values: vec![f32::NAN; n],
                            covered: vec![false; n],
                            count: 0,
                        })
                        .collect()
                });
                let plane = &mut planes[first_plane + l];
                for y in 0..wy {
                    let row = w.lat_start + y;
                    let src = ((l * wt + t) * wy + y) * wx;
                    for x in 0..wx {
                        let col = (w.lon_start + x) % nlon;
                        let at = row * nlon + col;
                        let v = values[src + x];
                        if plane.covered[at] {
                            let old = plane.values[at];
                            let same = old == v
                                || (old.is_nan() && v.is_nan())
                                || (old - v).abs() <= tol * old.abs().max(v.abs());
                            if !same {
                                return Err(TrackError::InconsistentOverlap {
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
