//! Hyperslab reads in canonical order. A request names a variable, a time range, level indices,
//! a latitude range (canonical, north→south) and a longitude window that may wrap across
//! 0°/360°. Only the chunks the window touches are fetched, concurrently; they decode in
//! parallel on the rayon pool (through the shared cache) and are scattered into one contiguous
//! f32 buffer of shape (time, level, lat, lon).

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use futures::{StreamExt, TryStreamExt};
use rayon::prelude::*;

use crate::cache::DecodedChunk;
use crate::dataset::{Dataset, Role, Variable, run_on_rayon};
use crate::error::{Result, StoreError};

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

/// Per store axis: (output index, index within the chunk) pairs, for one chunk along that axis.
type AxisPairs = Vec<(usize, usize)>;

struct ChunkPlan {
    indices: Vec<u64>,
    pairs: Vec<AxisPairs>,
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
        self.validate(variable, slab)?;
        // Every element is overwritten below: each output point lies in exactly one chunk.
        out.resize(slab.len(), 0.0);
        let shape = slab.shape();
        let out_strides = [
            shape[1] * shape[2] * shape[3],
            shape[2] * shape[3],
            shape[3],
            1,
        ];
        let array = &variable.node.array;
        let chunk_shape = variable.chunk_shape();
        let nlon = self.lons.len();

        // For every store axis: the output stride and (output index, store index) pairs.
        let mut axis_strides = Vec::with_capacity(variable.roles.len());
        let mut axis_pairs: Vec<Vec<(usize, usize)>> = Vec::with_capacity(variable.roles.len());
        let mut time_axis = 0;
        for (axis, role) in variable.roles.iter().enumerate() {
            let (stride, pairs): (usize, Vec<(usize, usize)>) = match *role {
                Role::Time => {
                    time_axis = axis;
                    (out_strides[0], slab.time.clone().enumerate().collect())
                }
                Role::Level => (
                    out_strides[1],
                    slab.levels.iter().copied().enumerate().collect(),
                ),
                Role::Lat => (
                    out_strides[2],
                    slab.lat
                        .clone()
                        .enumerate()
                        .map(|(i, y)| (i, self.store_lat(y)))
                        .collect(),
                ),
                Role::Lon => (
                    out_strides[3],
                    (0..slab.lon_len)
                        .map(|i| (i, self.store_lon((slab.lon_start + i) % nlon)))
                        .collect(),
                ),
                Role::Field(f) => (0, vec![(0, f as usize)]),
            };
            axis_strides.push(stride);
            axis_pairs.push(pairs);
        }

        // Group each axis's pairs by chunk; the touched chunks are their cartesian product.
        let per_axis: Vec<BTreeMap<u64, AxisPairs>> = axis_pairs
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
            .collect();
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
        // higher-ranked lifetime check when the read runs in a spawned task).
        let indices: Vec<Vec<u64>> = plans.iter().map(|p| p.indices.clone()).collect();
        let chunks: Vec<Arc<DecodedChunk>> = futures::stream::iter(indices)
            .map(|idx| async move { self.chunk(variable, &idx).await })
            .buffered(FETCH_CONCURRENCY)
            .try_collect()
            .await?;

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
                let start = first * out_strides[0];
                let end = (last + 1) * out_strides[0];
                let (_, tail) = std::mem::take(&mut rest).split_at_mut(start - consumed);
                let (slab_out, tail) = tail.split_at_mut(end - start);
                rest = tail;
                consumed = end;
                jobs.push((slab_out, start, members));
            }
            jobs.into_par_iter().for_each(|(slab_out, base, members)| {
                for &i in members {
                    scatter(&chunks[i], &plans[i].pairs, &axis_strides, slab_out, base);
                }
            });
            out
        })
        .await;
        self.counters
            .delivered_bytes
            .fetch_add((out.len() * 4) as u64, Ordering::Relaxed);
        Ok(out)
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

/// Copies the selected part of one decoded chunk into `out`, which starts at output offset
/// `base`. The innermost store axis is copied in runs that are contiguous on both sides.
fn scatter(
    chunk: &DecodedChunk,
    pairs: &[AxisPairs],
    out_strides: &[usize],
    out: &mut [f32],
    base: usize,
) {
    let values = chunk.values();
    let ndim = chunk.shape.len();
    let mut chunk_strides = vec![1usize; ndim];
    for a in (0..ndim - 1).rev() {
        chunk_strides[a] = chunk_strides[a + 1] * chunk.shape[a + 1];
    }
    let inner = &pairs[ndim - 1];
    let inner_stride = out_strides[ndim - 1];
    let mut runs: Vec<(usize, usize, usize)> = Vec::new(); // (out index, chunk index, length)
    for &(o, c) in inner {
        match runs.last_mut() {
            Some((ro, rc, len)) if inner_stride == 1 && *ro + *len == o && *rc + *len == c => {
                *len += 1
            }
            _ => runs.push((o, c, 1)),
        }
    }
    let mut visit = |out_off: usize, chunk_off: usize| {
        for &(o, c, len) in &runs {
            let dst = out_off + o * inner_stride - base;
            let src = chunk_off + c;
            if inner_stride == 1 {
                out[dst..dst + len].copy_from_slice(&values[src..src + len]);
            } else {
                for k in 0..len {
                    out[dst + k * inner_stride] = values[src + k];
                }
            }
        }
    };
    walk(
        0,
        ndim - 1,
        pairs,
        out_strides,
        &chunk_strides,
        0,
        0,
        &mut visit,
    );
}

#[allow(clippy::too_many_arguments)]
fn walk(
    axis: usize,
    inner_axis: usize,
    pairs: &[AxisPairs],
    out_strides: &[usize],
    chunk_strides: &[usize],
    out_off: usize,
    chunk_off: usize,
    visit: &mut impl FnMut(usize, usize),
) {
    if axis == inner_axis {
        visit(out_off, chunk_off);
        return;
    }
    for &(o, c) in &pairs[axis] {
        walk(
            axis + 1,
            inner_axis,
            pairs,
            out_strides,
            chunk_strides,
            out_off + o * out_strides[axis],
            chunk_off + c * chunk_strides[axis],
            visit,
        );
    }
}
