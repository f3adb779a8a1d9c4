//! The wire form of a batch: samples gathered into `Batch` messages of bounded size, their
//! tensors encoded in the requested dtype.

use std::sync::Arc;

use atmorep_proto::pb;
use atmorep_proto::tensor::{encode_f32, encode_f32_recycled};
use atmorep_proto::token_info::TOKEN_INFO_LEN;
use bytes::Bytes;

use crate::pipeline::epoch::Cursor;
use crate::pipeline::{FieldSample, Pipeline, Sample};

/// Bytes of a message part the server aims for: large enough that per-message costs vanish,
/// small enough that samples of this size or larger travel without being copied into a batch.
const PART_BYTES: usize = 4 << 20;

/// The wire form of a batch: consecutive parts of at most `max_bytes` (and about
/// [`PART_BYTES`]) each. A sample that fills a part alone travels in its own buffers, which go
/// back to the pipeline's pool once tonic has encoded them; smaller samples are gathered into one
/// buffer per tensor.
pub(super) fn to_wire(
    pipeline: &Pipeline,
    samples: Vec<Sample>,
    sequence: u64,
    cursor_after: Cursor,
    end_of_stream: bool,
    dtype: pb::Dtype,
    max_bytes: usize,
) -> Vec<pb::Batch> {
    let elem = if dtype == pb::Dtype::Bf16 { 2 } else { 4 };
    let wire_bytes = |s: &Sample| -> usize {
        s.fields
            .iter()
            .map(|f| {
                (f.source.len() + f.target.len() + f.pe.len()) * elem
                    + f.token_info.len() * 4
                    + f.masked_indices.len() * 5
                    + 128
            })
            .sum::<usize>()
            + 64
    };
    let limit = max_bytes.saturating_sub(1024).clamp(1, PART_BYTES);
    let mut groups: Vec<Vec<Sample>> = Vec::new();
    let mut group_bytes = 0;
    for sample in samples {
        let bytes = wire_bytes(&sample);
        match groups.last_mut() {
            Some(group) if group_bytes + bytes <= limit => {
                group.push(sample);
                group_bytes += bytes;
            }
            _ => {
                groups.push(vec![sample]);
                group_bytes = bytes;
            }
        }
    }
    let epoch = groups
        .first()
        .and_then(|g| g.first())
        .map_or(cursor_after.epoch, |s| s.epoch);
    if groups.is_empty() {
        // An empty batch still carries its cursor and the end of the stream.
        groups.push(Vec::new());
    }
    let parts = groups.len() as u32;
    let geometry = pipeline.field_geometries();
    let pool: Arc<dyn atmorep_proto::tensor::Recycle> = pipeline.pool().clone();
    groups
        .into_iter()
        .enumerate()
        .map(|(k, mut group)| {
            let last = k + 1 == parts as usize;
            let fields = geometry
                .iter()
                .enumerate()
                .map(|(f, (name, numel, tokens, pe_width))| {
                    let (g, n) = (group.len() as u64, *tokens as u64);
                    let masked_counts: Vec<u32> = group
                        .iter()
                        .map(|s| s.fields[f].masked_indices.len() as u32)
                        .collect();
                    let masked = u64::from(masked_counts.iter().sum::<u32>());
                    let tensor = |shape: Vec<u64>, data: Bytes, dtype: pb::Dtype| pb::Tensor {
                        shape,
                        dtype: dtype as i32,
                        data,
                    };
                    let mut gather = |part: fn(&mut FieldSample) -> &mut Vec<f32>| {
                        if let [only] = group.as_mut_slice() {
                            std::mem::take(part(&mut only.fields[f]))
                        } else {
                            let mut out = pipeline.pool().take();
                            for s in group.iter_mut() {
                                let values = std::mem::take(part(&mut s.fields[f]));
                                out.extend_from_slice(&values);
                                pipeline.pool().give(values);
                            }
                            out
                        }
                    };
                    let source = gather(|f| &mut f.source);
                    let target = gather(|f| &mut f.target);
                    let info = gather(|f| &mut f.token_info);
                    let pe = gather(|f| &mut f.pe);
                    pb::FieldBatch {
                        name: name.clone(),
                        source: Some(tensor(
                            vec![g, n, *numel as u64],
                            encode_f32_recycled(source, dtype, &pool),
                            dtype,
                        )),
                        target: Some(tensor(
                            vec![masked, *numel as u64],
                            encode_f32_recycled(target, dtype, &pool),
                            dtype,
                        )),
                        masked_indices: group
                            .iter()
                            .flat_map(|s| s.fields[f].masked_indices.iter().copied())
                            .collect(),
                        masked_counts,
                        token_info: Some(tensor(
                            vec![g, n, TOKEN_INFO_LEN as u64],
                            encode_f32(info, pb::Dtype::F32),
                            pb::Dtype::F32,
                        )),
                        pe: Some(tensor(
                            vec![g, n, *pe_width as u64],
                            encode_f32(pe, dtype),
                            dtype,
                        )),
                        windows: group
                            .iter()
                            .map(|s| {
                                let w = &s.fields[f].window;
                                pb::Window {
                                    time_start: w.time_start as u64,
                                    lat_start: w.lat_start as u64,
                                    lon_start: w.lon_start as u64,
                                    size: w.size.iter().map(|&d| d as u64).collect(),
                                }
                            })
                            .collect(),
                    }
                })
                .collect();
            pb::Batch {
                sequence,
                epoch,
                sample_ids: group.iter().map(|s| s.id).collect(),
                sample_epochs: group.iter().map(|s| s.epoch).collect(),
                fields,
                cursor_after: last.then_some(pb::Cursor {
                    epoch: cursor_after.epoch,
                    position: cursor_after.position,
                }),
                part: k as u32,
                parts,
                end_of_stream: last && end_of_stream,
            }
        })
        .collect()
}
