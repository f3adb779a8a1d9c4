//! Reading the windows of many readers at once, one blosc block at a time (docs/performance.md,
//! "Cutting a group of samples"). The per-read path decodes whole chunks into the chunk cache
//! and every reader copies its rows out of them: a block's 1.5 GB of decoded chunks go to memory
//! and come back. Here each chunk's needed blocks are decoded one after another into a buffer
//! that stays in the core's cache, and every reader's rows are cut from a block while it is
//! there. A *lane* is one requested level of one variable: its values are a contiguous part of
//! every reader's output (token order is level-major), so lanes run in parallel on disjoint
//! slices, each walking its chunks in time order.
//!
//! Only local stores of f32 through exactly [bytes → blosc] (see [`Dataset::group_readable`])
//! take this path; a read that fails here (a missing chunk, a corrupt one, a store changed under
//! the server) fails as a whole, for the caller to redo the per-read way, which fills missing
//! chunks and names what is wrong.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use rayon::prelude::*;

use crate::error::{Result, StoreError};
use crate::store::blosc_blocks::{BloscIndex, FIRST_READ, MINI_HEADER_LEN};
use crate::store::cache::ChunkKey;
use crate::store::dataset::{Dataset, Role, Variable};
use crate::store::hyperslab::{
    AxisPairs, ChunkRows, Hyperslab, OutputLayout, PlaneAffine, canonical_axes, copy_mapped,
};
use crate::store::version::ObjectVersion;

/// The readers of one variable in a group read: every window has the same shape and levels,
/// placed by one layout.
#[derive(Debug)]
pub struct FieldReads<'a> {
    pub variable: &'a Variable,
    pub layout: &'a OutputLayout,
    /// Each reader's window and plane transforms (see [`Dataset::read_layout_into`]).
    pub windows: Vec<(Hyperslab, Option<&'a PlaneAffine>)>,
}

/// One lane: a requested level (output level index) of one field.
struct Lane {
    field: usize,
    level: usize,
}

/// A reader of one chunk: its index in its field, its (output, chunk) time indices in the chunk,
/// and its rows of one time step (the same in every chunk of the lane at these horizontal chunk
/// indices), placed in the lane's slice and sorted in chunk order.
struct Consumer {
    reader: usize,
    times: AxisPairs,
    rows: Arc<ChunkRows>,
}

/// Identifies a reader's rows of one time step: field, reader, level, and the chunk indices
/// after time.
type RowsKey = (usize, usize, usize, Vec<u64>);

/// One chunk a lane reads in a step, with the readers that need it.
struct ChunkJob {
    indices: Vec<u64>,
    consumers: Vec<Consumer>,
}

/// A consumer's rows of one chunk, with the runs each row copies.
struct Cuts<'a> {
    runs: &'a [(usize, usize, usize, usize)],
    rows: Vec<(usize, usize, usize)>,
    first: usize,
    last: usize,
}

/// What a lane keeps between chunks: the encoded bytes of the chunk being read, the byte
/// streams of the block being decoded and the decoded blocks' buffers.
#[derive(Default)]
struct Scratch {
    encoded: Vec<u8>,
    planes: Vec<u8>,
    blocks: Vec<Vec<f32>>,
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::default());
}

impl Dataset {
    /// Whether reads of `variable` placed by `layout` can take [`Self::read_group`]: a local
    /// store, f32 through exactly [bytes → blosc], axes (time, [level,] lat, lon), and each
    /// requested level a contiguous part of the output.
    pub fn group_readable(&self, variable: &Variable, layout: &OutputLayout) -> bool {
        let axes_ok = matches!(
            variable.roles.as_slice(),
            [Role::Time, Role::Level, Role::Lat, Role::Lon] | [Role::Time, Role::Lat, Role::Lon]
        );
        let shape = layout.shape();
        let per_level = shape.iter().product::<usize>() / shape[1].max(1);
        variable.blosc_blocks
            && axes_ok
            && self.location.local_root().is_some()
            && (0..shape[1]).all(|l| layout.level_offset(l) == l * per_level)
    }

    /// Reads every reader's window of every field in `fields` into `outputs` (per field, per
    /// reader, the layout's length), decoding each needed blosc block once and cutting every
    /// reader's rows from it while it is in cache. Synchronous: run it on the rayon pool.
    pub fn read_group(
        &self,
        fields: &[FieldReads<'_>],
        outputs: &mut [Vec<Vec<f32>>],
    ) -> Result<()> {
        // Each reader's pairs per store axis, grouped by chunk.
        let mut pairs: Vec<Vec<Vec<BTreeMap<u64, AxisPairs>>>> = Vec::with_capacity(fields.len());
        let mut lanes = Vec::new();
        let mut steps = BTreeSet::new();
        for (f, field) in fields.iter().enumerate() {
            if !self.group_readable(field.variable, field.layout) {
                return Err(StoreError::InvalidHyperslab {
                    variable: field.variable.name.clone(),
                    detail: "not readable as a group".into(),
                });
            }
            let per_reader = field
                .windows
                .iter()
                .map(|(slab, _)| {
                    if slab.shape() != field.layout.shape() {
                        return Err(StoreError::InvalidHyperslab {
                            variable: field.variable.name.clone(),
                            detail: format!(
                                "output layout {:?} does not match the window {:?}",
                                field.layout.shape(),
                                slab.shape()
                            ),
                        });
                    }
                    self.slab_pairs(field.variable, slab)
                })
                .collect::<Result<Vec<_>>>()?;
            for p in &per_reader {
                steps.extend(p[0].keys().copied());
            }
            pairs.push(per_reader);
            lanes.extend((0..field.layout.shape()[1]).map(|level| Lane { field: f, level }));
            if outputs[f].len() != field.windows.len() {
                return Err(StoreError::InvalidHyperslab {
                    variable: field.variable.name.clone(),
                    detail: format!(
                        "{} outputs for {} windows",
                        outputs[f].len(),
                        field.windows.len()
                    ),
                });
            }
            for out in &mut outputs[f] {
                out.resize(field.layout.shape().iter().product(), 0.0);
            }
        }
        // Each lane's slice of every reader's output of its field: lanes own disjoint parts of
        // the outputs, so each walks all its steps on its own, without waiting for the others.
        let mut lane_outputs: Vec<Vec<&mut [f32]>> = Vec::with_capacity(lanes.len());
        for (field, field_outputs) in fields.iter().zip(outputs.iter_mut()) {
            let levels = field.layout.shape()[1];
            let per_level = field.layout.shape().iter().product::<usize>() / levels;
            let mut by_level: Vec<Vec<&mut [f32]>> = (0..levels).map(|_| Vec::new()).collect();
            for out in field_outputs.iter_mut() {
                for (l, part) in out.chunks_exact_mut(per_level).enumerate() {
                    by_level[l].push(part);
                }
            }
            lane_outputs.extend(by_level);
        }
        lanes
            .par_iter()
            .with_max_len(1)
            .zip(lane_outputs)
            .try_for_each(|(lane, mut outs)| {
                let field = &fields[lane.field];
                let mut plans = std::collections::HashMap::new();
                for &step in &steps {
                    for job in self.lane_jobs(fields, &pairs, lane, step, &mut plans)? {
                        self.cut_chunk(field, &job, &mut outs)?;
                    }
                }
                Ok::<_, StoreError>(())
            })?;
        let delivered: usize = outputs.iter().flatten().map(Vec::len).sum();
        self.counters
            .delivered_bytes
            .fetch_add(delivered as u64 * 4, Ordering::Relaxed);
        Ok(())
    }

    /// The chunks lane `lane` reads in time-chunk `step`, with their readers; a reader's rows
    /// of a time step are planned once per lane and horizontal chunk, kept in `plans`.
    fn lane_jobs(
        &self,
        fields: &[FieldReads<'_>],
        pairs: &[Vec<Vec<BTreeMap<u64, AxisPairs>>>],
        lane: &Lane,
        step: u64,
        plans: &mut std::collections::HashMap<RowsKey, Arc<ChunkRows>>,
    ) -> Result<Vec<ChunkJob>> {
        let field = &fields[lane.field];
        let variable = field.variable;
        let has_level = variable.has_level();
        let axes = canonical_axes(variable);
        let base = field.layout.level_offset(lane.level);
        let mut jobs: BTreeMap<Vec<u64>, Vec<Consumer>> = BTreeMap::new();
        for (reader, reader_axes) in pairs[lane.field].iter().enumerate() {
            let Some(times) = reader_axes[0].get(&step) else {
                continue;
            };
            let (level_key, level_pairs) = if has_level {
                // The lane's level: one (output level, index in chunk) pair in one chunk.
                let found = reader_axes[1].iter().find_map(|(key, pairs)| {
                    pairs
                        .iter()
                        .find(|(o, _)| *o == lane.level)
                        .map(|&pair| (*key, pair))
                });
                let Some((key, pair)) = found else {
                    continue;
                };
                (Some(key), vec![pair])
            } else {
                (None, Vec::new())
            };
            let (lat_axis, lon_axis) = if has_level { (2, 3) } else { (1, 2) };
            for (&yc, lat_pairs) in &reader_axes[lat_axis] {
                for (&xc, lon_pairs) in &reader_axes[lon_axis] {
                    let mut indices = vec![step];
                    indices.extend(level_key);
                    indices.extend([yc, xc]);
                    let key = (lane.field, reader, lane.level, indices[1..].to_vec());
                    let rows = match plans.get(&key) {
                        Some(rows) => rows.clone(),
                        None => {
                            let shape: Vec<usize> = variable
                                .node
                                .array
                                .chunk_shape(&indices)
                                .map_err(|e| {
                                    let key = variable.node.array.chunk_key(&indices).to_string();
                                    self.corrupt(variable, &key, e.to_string())
                                })?
                                .iter()
                                .map(|n| n.get() as usize)
                                .collect();
                            // Time index 0 of the output and the chunk: steps add to it.
                            let mut chunk_pairs = vec![vec![(0, 0)]];
                            if has_level {
                                chunk_pairs.push(level_pairs.clone());
                            }
                            chunk_pairs.extend([lat_pairs.clone(), lon_pairs.clone()]);
                            let mut rows =
                                ChunkRows::new(&shape, &chunk_pairs, &axes, field.layout);
                            for row in &mut rows.rows {
                                row.0 -= base;
                            }
                            rows.rows.sort_unstable_by_key(|r| r.1);
                            let rows = Arc::new(rows);
                            plans.insert(key, rows.clone());
                            rows
                        }
                    };
                    let mut times = times.clone();
                    times.sort_unstable_by_key(|&(_, c)| c);
                    jobs.entry(indices).or_default().push(Consumer {
                        reader,
                        times,
                        rows,
                    });
                }
            }
        }
        Ok(jobs
            .into_iter()
            .map(|(indices, consumers)| ChunkJob { indices, consumers })
            .collect())
    }

    /// Reads the blocks of one chunk that its consumers need, decoding them one at a time and
    /// cutting each consumer's rows of the lane's level into `outs` (the lane's slice of each
    /// reader's output) as soon as the block holding a row's end is decoded.
    fn cut_chunk(
        &self,
        field: &FieldReads<'_>,
        job: &ChunkJob,
        outs: &mut [&mut [f32]],
    ) -> Result<()> {
        let variable = field.variable;
        let array = &variable.node.array;
        let store_key = array.chunk_key(&job.indices).to_string();
        let shape: Vec<usize> = array
            .chunk_shape(&job.indices)
            .map_err(|e| self.corrupt(variable, &store_key, e.to_string()))?
            .iter()
            .map(|n| n.get() as usize)
            .collect();
        // Each consumer's rows of every step in the chunk, in chunk order, with offsets into the
        // lane's slice.
        let time_stride: usize = shape[1..].iter().product();
        let levels = field.layout.shape()[1];
        let cuts: Vec<(usize, Cuts<'_>)> = job
            .consumers
            .iter()
            .map(|c| {
                let mut rows = Vec::with_capacity(c.times.len() * c.rows.rows.len());
                for &(t, ct) in &c.times {
                    let (o_t, c_t, p_t) =
                        (field.layout.time_offset(t), ct * time_stride, t * levels);
                    rows.extend(
                        c.rows
                            .rows
                            .iter()
                            .map(|&(o, c, p)| (o + o_t, c + c_t, p + p_t)),
                    );
                }
                let plan = &*c.rows;
                (
                    c.reader,
                    Cuts {
                        runs: &plan.runs,
                        rows,
                        first: plan.first,
                        last: plan.last,
                    },
                )
            })
            .collect();
        let values: usize = shape.iter().product();
        let root = self
            .location
            .local_root()
            .expect("group reads are local")
            .clone();
        let mut path = root.to_path_buf();
        path.extend(store_key.split('/').filter(|s| !s.is_empty()));
        let index = self.local_index(variable, &job.indices, &store_key, &path)?;
        if let Some(log) = self
            .fetch_log
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_mut()
        {
            log.push((variable.name.clone(), job.indices.clone()));
        }
        if index.nbytes != values * 4 || index.blocksize % 4 != 0 {
            return Err(self.corrupt(
                variable,
                &store_key,
                format!(
                    "blosc header says {} decoded bytes in blocks of {}, the chunk holds {} f32 values",
                    index.nbytes, index.blocksize, values
                ),
            ));
        }
        let block_len = index.blocksize / 4;
        let mut wanted = vec![false; index.nblocks()];
        for (_, rows) in &cuts {
            for &(_, c, _) in &rows.rows {
                for j in index.blocks_for((c + rows.first) * 4..(c + rows.last) * 4) {
                    wanted[j] = true;
                }
            }
        }
        let needed: Vec<usize> = (0..wanted.len()).filter(|&j| wanted[j]).collect();
        if needed.is_empty() {
            return Ok(());
        }
        // One positioned read of the encoded bytes from the first needed block to the last.
        let starts = needed.iter().map(|&j| index.encoded_range(j).start);
        let ends = needed.iter().map(|&j| index.encoded_range(j).end);
        let span = starts.min().unwrap_or(0)..ends.max().unwrap_or(0);
        // Read with the bytes before the first block, so that each block, decoded in order,
        // gets its one-block header written over the bytes before it instead of being copied.
        let prefix = MINI_HEADER_LEN.min(span.start);
        let in_place = prefix == MINI_HEADER_LEN && !index.memcpyed() && index.in_order();
        let read_start = span.start - prefix;
        SCRATCH.with_borrow_mut(|scratch| {
            self.read_local_span(
                variable,
                &store_key,
                &path,
                read_start..span.end,
                &mut scratch.encoded,
            )?;
            let started = std::time::Instant::now();
            let mut cursors = vec![0usize; cuts.len()];
            // The blocks a pending row may still read: a row spans at most `keep` blocks.
            let span_values = cuts
                .iter()
                .map(|(_, r)| r.last - r.first)
                .max()
                .unwrap_or(0);
            let keep = span_values.div_ceil(block_len) + 1;
            let mut recent: std::collections::VecDeque<(usize, Vec<f32>)> =
                std::collections::VecDeque::with_capacity(keep + 1);
            let mut decoded = 0u64;
            let native = index.native_f32();
            for &j in &needed {
                let r = index.encoded_range(j);
                let at = r.start - read_start;
                let mut block = if recent.len() == keep {
                    recent.pop_front().map(|(_, b)| b)
                } else {
                    scratch.blocks.pop()
                }
                .unwrap_or_default();
                let len = index.decoded_range(j).len() / 4;
                block.resize(len, 0.0);
                let done = if native {
                    index.decode_f32_block(
                        j,
                        &scratch.encoded[at..at + r.len()],
                        &mut block,
                        &mut scratch.planes,
                    )
                } else if in_place {
                    index
                        .decode_block_in_place(j, &mut scratch.encoded, at)
                        .map(|bytes| bytemuck::cast_slice_mut(&mut block).copy_from_slice(&bytes))
                } else {
                    index
                        .decode_block(j, &scratch.encoded[at..at + r.len()])
                        .map(|bytes| bytemuck::cast_slice_mut(&mut block).copy_from_slice(&bytes))
                };
                if let Err(e) = done {
                    scratch.blocks.extend(recent.into_iter().map(|(_, b)| b));
                    scratch.blocks.push(block);
                    return Err(self.corrupt(variable, &store_key, e.to_string()));
                }
                decoded += len as u64 * 4;
                recent.push_back((j, block));
                let start = j * block_len;
                let cur: &[f32] = &recent.back().expect("just pushed").1;
                let end = start + cur.len();
                for ((reader, rows), cursor) in cuts.iter().zip(&mut cursors) {
                    let out = &mut *outs[*reader];
                    let affine = field.windows[*reader].1;
                    while let Some(&(out_off, chunk_off, plane)) = rows.rows.get(*cursor) {
                        if chunk_off + rows.last > end {
                            break;
                        }
                        // Runs along longitude stay in their row's plane.
                        let affine = affine.map(|a| a[plane]);
                        if chunk_off + rows.first >= start {
                            let src = &cur[chunk_off - start.min(chunk_off)..];
                            let shift = start.saturating_sub(chunk_off);
                            for &(o, c, len, _) in rows.runs {
                                copy_mapped(
                                    &mut out[out_off + o..out_off + o + len],
                                    &src[c - shift..c - shift + len],
                                    affine,
                                );
                            }
                        } else {
                            for &(o, c, len, _) in rows.runs {
                                let dst = &mut out[out_off + o..out_off + o + len];
                                let at = chunk_off + c;
                                if at >= start {
                                    copy_mapped(dst, &cur[at - start..at - start + len], affine);
                                } else {
                                    copy_pieces(&recent, block_len, at, dst, affine);
                                }
                            }
                        }
                        *cursor += 1;
                    }
                }
            }
            scratch.blocks.extend(recent.into_iter().map(|(_, b)| b));
            debug_assert!(
                cursors
                    .iter()
                    .zip(&cuts)
                    .all(|(c, (_, r))| *c == r.rows.len())
            );
            let counters = &self.counters;
            counters
                .fetched_blocks
                .fetch_add(needed.len() as u64, Ordering::Relaxed);
            counters.decoded_bytes.fetch_add(decoded, Ordering::Relaxed);
            counters
                .decode_nanos
                .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
            Ok(())
        })
    }

    /// The block table of a local chunk: kept, or read from its first bytes.
    fn local_index(
        &self,
        variable: &Variable,
        indices: &[u64],
        store_key: &str,
        path: &std::path::Path,
    ) -> Result<Arc<BloscIndex>> {
        let key: ChunkKey = (self.cache_key(&variable.node), indices.to_vec());
        if let Some(index) = self.lock_indexes().get(&key) {
            return Ok(index.clone());
        }
        let bad = |e: crate::store::blosc_blocks::BloscIndexError| {
            self.corrupt(variable, store_key, e.to_string())
        };
        let mut first = Vec::new();
        self.read_local_span(variable, store_key, path, 0..FIRST_READ, &mut first)?;
        let header = BloscIndex::header_len(&first).map_err(bad)?;
        if first.len() < header {
            self.read_local_span(variable, store_key, path, 0..header, &mut first)?;
        }
        let index = Arc::new(BloscIndex::parse(&first).map_err(bad)?);
        self.lock_indexes().put(key, index.clone());
        Ok(index)
    }

    /// Reads bytes `range` of a local chunk file (fewer when the file ends before) into `buf`
    /// (replacing its contents; its memory is reused), checking the file's version.
    fn read_local_span(
        &self,
        variable: &Variable,
        store_key: &str,
        path: &std::path::Path,
        range: Range<usize>,
        buf: &mut Vec<u8>,
    ) -> Result<()> {
        use std::os::unix::fs::FileExt as _;
        let url = || format!("{}/{store_key}", self.url().trim_end_matches('/'));
        let read = std::fs::File::open(path).and_then(|file| {
            let len = file.metadata()?.len() as usize;
            let end = range.end.min(len);
            let n = end.saturating_sub(range.start);
            // Zeroes only what the buffer grows by: the bytes are overwritten by the read. A
            // lane's buffer holds a chunk's encoded blocks (megabytes): huge pages, as the
            // sample buffers it is cut into.
            if buf.capacity() < n {
                buf.reserve(n - buf.len());
                atmorep_proto::huge_pages::advise(buf);
            }
            buf.resize(n, 0);
            file.read_exact_at(buf, range.start as u64)?;
            Ok(ObjectVersion::of_file(&file.metadata()?))
        });
        let version = crate::store::location::local_outcome(read, url)?.ok_or_else(|| {
            StoreError::CorruptChunk {
                array: format!("{}/{}", self.url(), variable.node.name),
                key: store_key.to_string(),
                detail: "missing (group reads need every chunk)".into(),
            }
        })?;
        if let Err(changed) = self.versions.check(store_key, version) {
            return Err(self.store_changed(&variable.node.name, store_key, changed));
        }
        self.counters
            .fetched_bytes
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        self.counters.fetch_requests.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// Copies values `at..at + dst.len()` of a chunk from the decoded blocks in `recent` (each
/// `block_len` values but the last), for a run that starts in an earlier block than the last.
fn copy_pieces(
    recent: &std::collections::VecDeque<(usize, Vec<f32>)>,
    block_len: usize,
    at: usize,
    dst: &mut [f32],
    affine: Option<(f32, f32)>,
) {
    let mut done = 0;
    while done < dst.len() {
        let (j, offset) = ((at + done) / block_len, (at + done) % block_len);
        let block = &recent
            .iter()
            .find(|(k, _)| *k == j)
            .expect("a row's blocks are decoded and kept until the row is cut")
            .1;
        let values: &[f32] = block;
        let n = (values.len() - offset).min(dst.len() - done);
        copy_mapped(
            &mut dst[done..done + n],
            &values[offset..offset + n],
            affine,
        );
        done += n;
    }
}
