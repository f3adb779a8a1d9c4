//! Hyperslab reads in canonical order. A request names a variable, a time range, level indices,
//! a latitude range (canonical, north→south) and a longitude window that may wrap across
//! 0°/360°. Only the chunks the window touches are fetched, concurrently; they decode in
//! parallel on the rayon pool (through the shared cache) and are scattered into one contiguous
//! f32 buffer of shape (time, level, lat, lon).

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use futures::{StreamExt, TryStreamExt};
use rayon::prelude::*;

use crate::error::{Result, StoreError};
use crate::progress::Progress;
use crate::store::block_read::{ChunkData, touched_ranges};
use crate::store::dataset::{Dataset, Role, Variable};
use crate::store::decode::run_on_rayon;

/// How many chunk fetches one read keeps in flight.
pub const FETCH_CONCURRENCY: usize = 32;

/// A canonical read request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hyperslab {
    /// Variable name.
    pub variable: String,
    /// Time indices.
    pub time: Range<usize>,
    /// Level indices into the variable's levels; empty for a surface variable.
    pub levels: Vec<usize>,
    /// Canonical latitude indices (0 = northernmost).
    pub lat: Range<usize>,
    /// First canonical longitude index (0 = the longitude nearest 0° east).
    pub lon_start: usize,
    /// Number of longitudes; the window wraps past the last longitude back to index 0.
    pub lon_len: usize,
}

impl Hyperslab {
    /// The whole variable.
    pub fn full(dataset: &Dataset, variable: &Variable) -> Self {
        Self {
            variable: variable.name.clone(),
            time: 0..dataset.times.len(),
            levels: (0..variable.levels.len()).collect(),
            lat: 0..dataset.lats.len(),
            lon_start: 0,
            lon_len: dataset.lons.len(),
        }
    }

    /// Output shape (time, level, lat, lon); level is 1 for surface variables.
    pub fn shape(&self) -> [usize; 4] {
        [
            self.time.len(),
            self.levels.len().max(1),
            self.lat.len(),
            self.lon_len,
        ]
    }

    /// Number of output values.
    pub fn len(&self) -> usize {
        self.shape().iter().product()
    }

    /// Whether the request selects nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Per store axis: (canonical output index, index within the chunk) pairs, for one chunk along
/// that axis.
pub(crate) type AxisPairs = Vec<(usize, usize)>;

/// The value ranges of a chunk that a read touches.
type Touched = Vec<Range<usize>>;

struct ChunkPlan {
    indices: Vec<u64>,
    pairs: Vec<AxisPairs>,
}

/// Where a window's points land in an output buffer. The offset of canonical point
/// (time, level, lat, lon) is the sum of one offset per axis; plain canonical order and the
/// token order of docs/design.md §3 both have this form, so one scatter serves both and a window
/// can be cut from the decoded chunks straight into tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputLayout {
    /// Per canonical axis (time, level, lat, lon): output offset of each index.
    offsets: [Vec<usize>; 4],
}

impl OutputLayout {
    /// Canonical C order over `shape` (time, level, lat, lon).
    pub fn canonical(shape: [usize; 4]) -> Self {
        let strides = [
            shape[1] * shape[2] * shape[3],
            shape[2] * shape[3],
            shape[3],
            1,
        ];
        Self {
            offsets: std::array::from_fn(|a| (0..shape[a]).map(|i| i * strides[a]).collect()),
        }
    }

    /// Token order of `field`: tokens (level, t, lat, lon), values (t, lat, lon) inside each.
    pub fn tokens(field: &atmorep_proto::FieldGeometry) -> Self {
        // A value's position in token order is a sum of one term per axis.
        let g = &field.geometry;
        let [wt, wy, wx] = g.window();
        Self {
            offsets: [
                (0..wt).map(|t| g.value_position(0, [t, 0, 0])).collect(),
                (0..field.num_levels())
                    .map(|l| g.value_position(l, [0, 0, 0]))
                    .collect(),
                (0..wy).map(|y| g.value_position(0, [0, y, 0])).collect(),
                (0..wx).map(|x| g.value_position(0, [0, 0, x])).collect(),
            ],
        }
    }

    /// The output offset of time step `t`'s first value.
    pub fn time_offset(&self, t: usize) -> usize {
        self.offsets[0][t]
    }

    /// The output offset of level `l`'s first value.
    pub fn level_offset(&self, l: usize) -> usize {
        self.offsets[1][l]
    }

    /// The window shape (time, level, lat, lon) this layout covers.
    pub fn shape(&self) -> [usize; 4] {
        std::array::from_fn(|a| self.offsets[a].len())
    }
}

/// A per-plane affine map `v ↦ (v - offset) · scale`, indexed by `time · levels + level`; how
/// normalization rides along with the copy instead of costing a pass of its own.
pub type PlaneAffine = [(f32, f32)];

/// Which canonical axis each store axis feeds (`None` for the stacked field axis).
pub(crate) fn canonical_axes(variable: &Variable) -> Vec<Option<usize>> {
    variable
        .roles
        .iter()
        .map(|role| match role {
            Role::Time => Some(0),
            Role::Level => Some(1),
            Role::Lat => Some(2),
            Role::Lon => Some(3),
            Role::Field(_) => None,
        })
        .collect()
}

impl Dataset {
    /// Reads `slab` into a new contiguous buffer of shape [`Hyperslab::shape`] in canonical
    /// order.
    pub async fn read(&self, slab: &Hyperslab) -> Result<Vec<f32>> {
        self.read_into(slab, vec![0.0; slab.len()]).await
    }

    /// Reads `slab` into `out` (resized to [`Hyperslab::len`]) and returns it. Reusing one buffer
    /// across reads spares the page faults of a fresh allocation, which at ERA5 sizes cost as
    /// much as decoding.
    pub async fn read_into(&self, slab: &Hyperslab, mut out: Vec<f32>) -> Result<Vec<f32>> {
        let variable = self.variable(&slab.variable)?;
        let (plans, chunks) = self.fetch_slab(variable, slab).await?;
        // Every element is overwritten below: each output point lies in exactly one chunk.
        out.resize(slab.len(), 0.0);
        let layout = Arc::new(OutputLayout::canonical(slab.shape()));
        let axes = canonical_axes(variable);
        let time_axis = axes.iter().position(|a| *a == Some(0)).unwrap_or(0);
        let time_stride = slab.shape()[1..].iter().product::<usize>();

        // Chunks that share a time chunk write one disjoint time slab of the output, so slabs
        // are filled in parallel without sharing mutable state.
        let mut by_time: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
        for (i, plan) in plans.iter().enumerate() {
            by_time.entry(plan.indices[time_axis]).or_default().push(i);
        }
        let out = run_on_rayon(move || {
            let mut rest: &mut [f32] = &mut out;
            let mut consumed = 0;
            let mut jobs = Vec::with_capacity(by_time.len());
            for members in by_time.values() {
                let times = &plans[members[0]].pairs[time_axis];
                let (first, last) = (times[0].0, times[times.len() - 1].0);
                let start = first * time_stride;
                let end = (last + 1) * time_stride;
                let (_, tail) = std::mem::take(&mut rest).split_at_mut(start - consumed);
                let (slab_out, tail) = tail.split_at_mut(end - start);
                rest = tail;
                consumed = end;
                jobs.push((slab_out, start, members));
            }
            jobs.into_par_iter().for_each(|(slab_out, base, members)| {
                for &i in members {
                    scatter(
                        &chunks[i],
                        &plans[i].pairs,
                        &axes,
                        &layout,
                        None,
                        slab_out,
                        base,
                    );
                }
            });
            out
        })
        .await?;
        self.counters
            .delivered_bytes
            .fetch_add((out.len() * 4) as u64, Ordering::Relaxed);
        Ok(out)
    }

    /// Reads all of `variable` one block of whole time chunks at a time (each chunk decoded once,
    /// memory bounded by one block) into `buffer`, hands `visit` each block's first time step
    /// and values (time, level, lat, lon), and reports the block's time steps to `progress`.
    pub(crate) async fn scan(
        &self,
        variable: &Variable,
        buffer: &mut Vec<f32>,
        progress: &dyn Progress,
        mut visit: impl FnMut(usize, &[f32]),
    ) -> Result<()> {
        for time in variable.time_blocks(self.times.len()) {
            let (first, steps) = (time.start, time.len() as u64);
            let slab = Hyperslab {
                time,
                ..Hyperslab::full(self, variable)
            };
            *buffer = self.read_into(&slab, std::mem::take(buffer)).await?;
            visit(first, buffer);
            progress.advance(steps);
        }
        Ok(())
    }

    /// Reads `slab` straight into `layout` order (e.g. [`OutputLayout::tokens`]), applying
    /// `affine` per (time, level) plane on the way, into `out` (resized). One pass over the
    /// decoded chunks replaces read, normalize and tokenize. The copy runs on the calling thread:
    /// callers assemble many samples concurrently, which keeps the cores busy without splitting
    /// one window's small planes across threads.
    pub async fn read_layout_into(
        &self,
        slab: &Hyperslab,
        layout: &OutputLayout,
        affine: Option<&PlaneAffine>,
        mut out: Vec<f32>,
    ) -> Result<Vec<f32>> {
        let variable = self.variable(&slab.variable)?;
        if layout.shape() != slab.shape() {
            return Err(StoreError::InvalidHyperslab {
                variable: variable.name.clone(),
                detail: format!(
                    "output layout {:?} does not match the window {:?}",
                    layout.shape(),
                    slab.shape()
                ),
            });
        }
        if let Some(affine) = affine {
            let planes = slab.shape()[0] * slab.shape()[1];
            if affine.len() != planes {
                return Err(StoreError::InvalidHyperslab {
                    variable: variable.name.clone(),
                    detail: format!("{} plane transforms for {planes} planes", affine.len()),
                });
            }
        }
        let (plans, chunks) = self.fetch_slab(variable, slab).await?;
        out.resize(slab.len(), 0.0);
        let axes = canonical_axes(variable);
        for (plan, chunk) in plans.iter().zip(&chunks) {
            scatter(chunk, &plan.pairs, &axes, layout, affine, &mut out, 0);
        }
        self.counters
            .delivered_bytes
            .fetch_add((out.len() * 4) as u64, Ordering::Relaxed);
        Ok(out)
    }

    /// Plans which chunks `slab` touches and fetches them (through the cache), concurrently.
    async fn fetch_slab(
        &self,
        variable: &Variable,
        slab: &Hyperslab,
    ) -> Result<(Vec<ChunkPlan>, Vec<ChunkData>)> {
        let array = &variable.node.array;
        let per_axis = self.slab_pairs(variable, slab)?;
        let mut plans = vec![ChunkPlan {
            indices: Vec::new(),
            pairs: Vec::new(),
        }];
        for groups in &per_axis {
            plans = plans
                .into_iter()
                .flat_map(|plan| {
                    groups.iter().map(move |(c, pairs)| {
                        let mut indices = plan.indices.clone();
                        indices.push(*c);
                        let mut all = plan.pairs.clone();
                        all.push(pairs.clone());
                        ChunkPlan {
                            indices,
                            pairs: all,
                        }
                    })
                })
                .collect();
        }
        debug_assert!(
            plans
                .iter()
                .all(|p| p.indices.len() == array.dimensionality())
        );

        // Owned indices keep the future `Send` (a borrowed closure argument trips the
        // higher-ranked lifetime check when the read runs in a spawned task). A small part of a
        // blosc chunk is read block by block: the value ranges it touches go along.
        let reads: Vec<(Vec<u64>, Option<Touched>)> = plans
            .iter()
            .map(|plan| {
                let touched = variable.blosc_blocks.then(|| plan_ranges(variable, plan));
                let touched = touched
                    .filter(|(_, values, share)| self.wants_blocks(variable, *values, *share));
                (plan.indices.clone(), touched.map(|(ranges, ..)| ranges))
            })
            .collect();
        let chunks: Vec<ChunkData> = futures::stream::iter(reads)
            .map(|(idx, touched)| async move {
                match touched {
                    Some(ranges) => self.chunk_blocks(variable, &idx, &ranges).await,
                    None => Ok(ChunkData::Whole(self.chunk(variable, &idx).await?)),
                }
            })
            .buffered(FETCH_CONCURRENCY)
            .try_collect()
            .await?;
        Ok((plans, chunks))
    }

    /// Per store axis of `variable`: the (output index, index within the chunk) pairs of
    /// `slab`, grouped by chunk index along that axis. The chunks `slab` touches are the
    /// cartesian product of the axes' groups.
    pub(crate) fn slab_pairs(
        &self,
        variable: &Variable,
        slab: &Hyperslab,
    ) -> Result<Vec<BTreeMap<u64, AxisPairs>>> {
        self.validate(variable, slab)?;
        let chunk_shape = variable.chunk_shape();
        let nlon = self.lons.len();

        // For every store axis: (output index, store index) pairs.
        let axis_pairs: Vec<Vec<(usize, usize)>> = variable
            .roles
            .iter()
            .map(|role| match *role {
                Role::Time => slab.time.clone().enumerate().collect(),
                Role::Level => slab.levels.iter().copied().enumerate().collect(),
                Role::Lat => slab
                    .lat
                    .clone()
                    .enumerate()
                    .map(|(i, y)| (i, self.store_lat(y)))
                    .collect(),
                Role::Lon => (0..slab.lon_len)
                    .map(|i| (i, self.store_lon((slab.lon_start + i) % nlon)))
                    .collect(),
                Role::Field(f) => vec![(0, f as usize)],
            })
            .collect();

        // Group each axis's pairs by chunk; the touched chunks are their cartesian product.
        Ok(axis_pairs
            .iter()
            .zip(&chunk_shape)
            .map(|(pairs, &cs)| {
                let mut groups: BTreeMap<u64, AxisPairs> = BTreeMap::new();
                for &(out, store) in pairs {
                    groups
                        .entry(store as u64 / cs)
                        .or_default()
                        .push((out, (store as u64 % cs) as usize));
                }
                groups
            })
            .collect())
    }

    fn validate(&self, variable: &Variable, slab: &Hyperslab) -> Result<()> {
        let bad = |detail: String| StoreError::InvalidHyperslab {
            variable: variable.name.clone(),
            detail,
        };
        if slab.time.is_empty() || slab.time.end > self.times.len() {
            return Err(bad(format!(
                "time range {:?} is empty or outside 0..{}",
                slab.time,
                self.times.len()
            )));
        }
        if variable.has_level() {
            if slab.levels.is_empty() {
                return Err(bad("no level selected".into()));
            }
            if let Some(l) = slab.levels.iter().find(|&&l| l >= variable.levels.len()) {
                return Err(bad(format!(
                    "level index {l} outside 0..{}",
                    variable.levels.len()
                )));
            }
        } else if !slab.levels.is_empty() && slab.levels != [0] {
            return Err(bad("a surface variable has no levels to select".into()));
        }
        if slab.lat.is_empty() || slab.lat.end > self.lats.len() {
            return Err(bad(format!(
                "latitude range {:?} is empty or outside 0..{}",
                slab.lat,
                self.lats.len()
            )));
        }
        if slab.lon_len == 0 || slab.lon_len > self.lons.len() || slab.lon_start >= self.lons.len()
        {
            return Err(bad(format!(
                "longitude window start {} length {} does not fit {} longitudes",
                slab.lon_start,
                slab.lon_len,
                self.lons.len()
            )));
        }
        Ok(())
    }
}

/// The copies that move a read's part of one chunk into its output: runs of the innermost axis,
/// contiguous on both sides and within one plane, repeated for each row (point of the outer
/// axes). Rows come in the order of the read's pairs.
pub(crate) struct ChunkRows {
    /// (output offset, chunk offset, length, plane contribution) of each run within a row.
    pub runs: Vec<(usize, usize, usize, usize)>,
    /// (output offset, chunk offset, plane index) of each row.
    pub rows: Vec<(usize, usize, usize)>,
    /// The span of a row the runs read, relative to the row's chunk offset (a window wrapping
    /// across 0° reads both ends).
    pub first: usize,
    pub last: usize,
}

impl ChunkRows {
    /// The rows and runs of `pairs` (per store axis) in a chunk of `shape`, placed by `layout`.
    pub(crate) fn new(
        shape: &[usize],
        pairs: &[AxisPairs],
        axes: &[Option<usize>],
        layout: &OutputLayout,
    ) -> Self {
        let ndim = shape.len();
        let mut chunk_strides = vec![1usize; ndim];
        for a in (0..ndim - 1).rev() {
            chunk_strides[a] = chunk_strides[a + 1] * shape[a + 1];
        }
        let levels = layout.offsets[1].len();
        // Per store axis: (output offset, chunk offset, plane index contribution) of each pair.
        let steps: Vec<Vec<(usize, usize, usize)>> = pairs
            .iter()
            .zip(axes)
            .enumerate()
            .map(|(a, (pairs, axis))| {
                pairs
                    .iter()
                    .map(|&(o, c)| {
                        let (offset, plane) = match *axis {
                            Some(0) => (layout.offsets[0][o], o * levels),
                            Some(1) => (layout.offsets[1][o], o),
                            Some(k) => (layout.offsets[k][o], 0),
                            None => (0, 0),
                        };
                        (offset, c * chunk_strides[a], plane)
                    })
                    .collect()
            })
            .collect();
        let mut runs: Vec<(usize, usize, usize, usize)> = Vec::new();
        for &(o, c, p) in &steps[ndim - 1] {
            match runs.last_mut() {
                Some((ro, rc, len, rp)) if *ro + *len == o && *rc + *len == c && *rp == p => {
                    *len += 1
                }
                _ => runs.push((o, c, 1, p)),
            }
        }
        let mut rows: Vec<(usize, usize, usize)> = Vec::new();
        walk(0, ndim - 1, &steps, 0, 0, 0, &mut |o, c, p| {
            rows.push((o, c, p))
        });
        let first = runs.iter().map(|r| r.1).min().unwrap_or(0);
        let last = runs.iter().map(|r| r.1 + r.2).max().unwrap_or(0);
        Self {
            runs,
            rows,
            first,
            last,
        }
    }
}

/// Copies `src` into `dst` through the plane's affine map, if any: the one arithmetic every
/// cut uses, so that every path gives the same bits.
#[inline]
pub(crate) fn copy_mapped(dst: &mut [f32], src: &[f32], affine: Option<(f32, f32)>) {
    match affine {
        None => dst.copy_from_slice(src),
        Some((offset, scale)) => {
            for (d, s) in dst.iter_mut().zip(src) {
                *d = (*s - offset) * scale;
            }
        }
    }
}

/// Copies the selected part of one decoded chunk into `out`, which starts at output offset
/// `base`, placing each point where `layout` says and mapping it through its plane's `affine`.
/// The innermost store axis is copied in runs that are contiguous on both sides.
fn scatter(
    chunk: &ChunkData,
    pairs: &[AxisPairs],
    axes: &[Option<usize>],
    layout: &OutputLayout,
    affine: Option<&PlaneAffine>,
    out: &mut [f32],
    base: usize,
) {
    let values = chunk.values();
    let ChunkRows {
        runs,
        rows,
        first,
        last,
    } = ChunkRows::new(chunk.shape(), pairs, axes, layout);
    // The rows first, so that each row's source can be prefetched a few rows ahead: a window's
    // rows lie a whole grid row apart in the chunk, in different pages, and copying them one by
    // one ran at memory latency.
    for (i, &(out_off, chunk_off, plane)) in rows.iter().enumerate() {
        if let (Some(values), Some(&(_, ahead, _))) = (values, rows.get(i + PREFETCH_ROWS)) {
            prefetch(&values[ahead + first..ahead + last]);
        }
        for &(o, c, len, p) in &runs {
            let dst = out_off + o - base;
            let dst = &mut out[dst..dst + len];
            let affine = affine.map(|a| a[plane + p]);
            chunk.pieces(chunk_off + c, len, |at, src| {
                copy_mapped(&mut dst[at..at + src.len()], src, affine);
            });
        }
    }
}

/// The value ranges of its chunk that `plan` touches, and the chunk's number of values.
/// The value ranges `plan` touches in its chunk, the chunk's number of values, and the share of
/// the chunk the read's non-horizontal indices (time, level) select, the two horizontal axes
/// taken whole: what every read of the same steps and levels touches together, as the samples of
/// a block cover the globe.
fn plan_ranges(variable: &Variable, plan: &ChunkPlan) -> (Vec<Range<usize>>, usize, f64) {
    let shape: Vec<usize> = variable
        .node
        .array
        .chunk_shape(&plan.indices)
        .map(|s| s.iter().map(|n| n.get() as usize).collect())
        .unwrap_or_default();
    let Some((inner, outer)) = plan.pairs.split_last() else {
        return (Vec::new(), 0, 1.0);
    };
    let outer: Vec<Vec<usize>> = outer
        .iter()
        .map(|pairs| pairs.iter().map(|&(_, c)| c).collect())
        .collect();
    let first = inner.iter().map(|&(_, c)| c).min().unwrap_or(0);
    let last = inner.iter().map(|&(_, c)| c + 1).max().unwrap_or(0);
    let values = shape.iter().product();
    let vertical = outer.len().saturating_sub(1);
    let share = outer[..vertical]
        .iter()
        .zip(&shape)
        .map(|(indices, &n)| {
            let distinct: BTreeSet<usize> = indices.iter().copied().collect();
            distinct.len() as f64 / n.max(1) as f64
        })
        .product();
    (touched_ranges(&shape, &outer, first..last), values, share)
}

/// How many rows ahead [`scatter`] prefetches.
const PREFETCH_ROWS: usize = 4;

/// Asks the CPU to start loading `values` into cache (a hint: no effect on results).
#[inline]
#[allow(unsafe_code)]
fn prefetch(values: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    for line in values.chunks(16) {
        // SAFETY: prefetching is a hint that never faults, and the pointer is in bounds.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                line.as_ptr().cast(),
            );
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = values;
}

fn walk(
    axis: usize,
    inner_axis: usize,
    steps: &[Vec<(usize, usize, usize)>],
    out_off: usize,
    chunk_off: usize,
    plane: usize,
    visit: &mut impl FnMut(usize, usize, usize),
) {
    if axis == inner_axis {
        visit(out_off, chunk_off, plane);
        return;
    }
    for &(o, c, p) in &steps[axis] {
        walk(
            axis + 1,
            inner_axis,
            steps,
            out_off + o,
            chunk_off + c,
            plane + p,
            visit,
        );
    }
}
