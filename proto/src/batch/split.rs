//! Cutting a batch into the parts of `StreamBatches` (server side): consecutive samples per part,
//! every part with all fields, each part's encoded size within the limit.
//!
//! The server holds every sample in buffers of its own (a [`SampleField`] per field). A sample
//! that fills a part alone travels in those very buffers (F32 on little-endian machines: no
//! copy; they go back to the pool once the message has been encoded and dropped); smaller samples
//! are gathered into one pooled buffer per tensor. At a pull's gigabyte per second the encode
//! copy is a hot spot, so no value is copied twice.

use std::sync::Arc;

use bytes::Bytes;

use super::{Batch, BatchError, StreamCursor, Window, field_err};
use crate::pb::{self, Dtype};
use crate::pool::BufferPool;
use crate::tensor::{Recycle, element_size, encode_f32, encode_f32_recycled};
use crate::token_info::TOKEN_INFO_LEN;

/// One field of one sample, as the server assembled it. `N` tokens of `V` values, `W` the
/// positional-encoding width, `M` the masked tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct SampleField {
    /// Tokens after masking, `[N, V]`.
    pub source: Vec<f32>,
    /// The masked tokens' original values, `[M, V]`, in `masked_indices` order.
    pub target: Vec<f32>,
    /// The ascending indices (in `0..N`) of the masked tokens.
    pub masked_indices: Vec<u32>,
    /// Token info, `[N, 8]`.
    pub token_info: Vec<f32>,
    /// Positional encoding, `[N, W]`.
    pub pe: Vec<f32>,
    /// Where the sample was cut.
    pub window: Window,
}

/// One sample to send: its id, its epoch and every field, in request order.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct OutgoingSample {
    pub id: u64,
    pub epoch: u64,
    pub fields: Vec<SampleField>,
}

/// The shape every sample of a stream has in one field (the shape of an empty part, too).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FieldShape {
    pub name: String,
    /// `N`: tokens per sample.
    pub num_tokens: usize,
    /// `V`: values per token.
    pub token_numel: usize,
    /// `W`: positional-encoding width.
    pub pe_width: usize,
}

/// What a batch's parts carry besides the samples (the cursor and the end of the stream only
/// in the last part).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PartHeader {
    /// Batch number within the call.
    pub sequence: u64,
    /// Resume here to continue right after the batch.
    pub cursor_after: StreamCursor,
    /// The last batch of a finite stream.
    pub end_of_stream: bool,
}

/// An upper bound of a sample's share of an encoded part: its tensor bytes plus the varint and
/// tag overhead of its id, epoch, masked indices and windows.
fn sample_cost(sample: &OutgoingSample, elem: usize) -> usize {
    let fields: usize = sample
        .fields
        .iter()
        .map(|f| {
            (f.source.len() + f.target.len() + f.pe.len()) * elem
                + f.token_info.len() * 4
                + f.masked_indices.len() * 5
                + 5
                + 72
        })
        .sum();
    fields + 24
}

/// Cuts a batch of `samples` (fields shaped as `fields`, in that order) into parts of at most
/// about `max_bytes` encoded bytes each: `source`, `target` and `pe` as `dtype`, token info
/// always as F32 (years and days of year need its precision). A batch that fits is one part; a
/// single sample larger than `max_bytes` still gets a part of its own — raise the message limit
/// for such geometries; no samples make one empty part, which still carries the cursor. The
/// batch's epoch is its first sample's (the cursor's without samples). Sample buffers that are
/// not sent as they are go back to `pool`.
///
/// # Panics
/// On `DTYPE_UNSPECIFIED` (requests map it to F32 before encoding), or when a sample has fewer
/// fields than `fields`.
pub fn split_samples(
    samples: Vec<OutgoingSample>,
    fields: &[FieldShape],
    header: PartHeader,
    dtype: Dtype,
    max_bytes: usize,
    pool: &Arc<BufferPool>,
) -> Vec<pb::Batch> {
    let elem = element_size(dtype).unwrap_or(4);
    let overhead = 256 + fields.iter().map(|f| f.name.len() + 128).sum::<usize>();
    let budget = max_bytes.saturating_sub(overhead);
    let epoch = samples
        .first()
        .map_or(header.cursor_after.epoch, |s| s.epoch);
    let mut groups: Vec<Vec<OutgoingSample>> = Vec::new();
    let mut group_bytes = 0;
    for sample in samples {
        let bytes = sample_cost(&sample, elem);
        match groups.last_mut() {
            Some(group) if group_bytes + bytes <= budget => {
                group.push(sample);
                group_bytes += bytes;
            }
            _ => {
                groups.push(vec![sample]);
                group_bytes = bytes;
            }
        }
    }
    if groups.is_empty() {
        groups.push(Vec::new());
    }
    let parts = groups.len() as u32;
    let recycle: Arc<dyn Recycle> = pool.clone();
    groups
        .into_iter()
        .enumerate()
        .map(|(k, mut group)| {
            let last = k + 1 == parts as usize;
            let fields = fields
                .iter()
                .enumerate()
                .map(|(f, shape)| field_part(&mut group, f, shape, dtype, pool, &recycle))
                .collect();
            pb::Batch {
                sequence: header.sequence,
                epoch,
                sample_ids: group.iter().map(|s| s.id).collect(),
                sample_epochs: group.iter().map(|s| s.epoch).collect(),
                fields,
                cursor_after: last.then(|| header.cursor_after.into()),
                part: k as u32,
                parts,
                end_of_stream: last && header.end_of_stream,
            }
        })
        .collect()
}

/// Field `f` of the samples of one part, their buffers taken (see the module documentation).
fn field_part(
    group: &mut [OutgoingSample],
    f: usize,
    shape: &FieldShape,
    dtype: Dtype,
    pool: &BufferPool,
    recycle: &Arc<dyn Recycle>,
) -> pb::FieldBatch {
    let (g, n) = (group.len() as u64, shape.num_tokens as u64);
    let masked_counts: Vec<u32> = group
        .iter()
        .map(|s| s.fields[f].masked_indices.len() as u32)
        .collect();
    let masked = u64::from(masked_counts.iter().sum::<u32>());
    let tensor = |shape: Vec<u64>, data: Bytes, dtype: Dtype| pb::Tensor {
        shape,
        dtype: dtype as i32,
        data,
    };
    let mut gather = |part: fn(&mut SampleField) -> &mut Vec<f32>| {
        if let [only] = &mut *group {
            std::mem::take(part(&mut only.fields[f]))
        } else {
            let mut out = pool.take();
            for s in group.iter_mut() {
                let values = std::mem::take(part(&mut s.fields[f]));
                out.extend_from_slice(&values);
                pool.give(values);
            }
            out
        }
    };
    let source = gather(|f| &mut f.source);
    let target = gather(|f| &mut f.target);
    let info = gather(|f| &mut f.token_info);
    let pe = gather(|f| &mut f.pe);
    let v = shape.token_numel as u64;
    pb::FieldBatch {
        name: shape.name.clone(),
        source: Some(tensor(
            vec![g, n, v],
            encode_f32_recycled(source, dtype, recycle),
            dtype,
        )),
        target: Some(tensor(
            vec![masked, v],
            encode_f32_recycled(target, dtype, recycle),
            dtype,
        )),
        masked_indices: group
            .iter()
            .flat_map(|s| s.fields[f].masked_indices.iter().copied())
            .collect(),
        masked_counts,
        token_info: Some(tensor(
            vec![g, n, TOKEN_INFO_LEN as u64],
            encode_f32(info, Dtype::F32),
            Dtype::F32,
        )),
        pe: Some(tensor(
            vec![g, n, shape.pe_width as u64],
            encode_f32(pe, dtype),
            dtype,
        )),
        windows: group
            .iter()
            .map(|s| pb::Window::from(s.fields[f].window))
            .collect(),
    }
}

impl Batch {
    /// The batch on the wire, as a server holding it typed sends it: parts of at most about
    /// `max_bytes` each (`usize::MAX`: one part), cut by [`split_samples`]. Checks first that
    /// every field holds the batch's samples and matches its shapes.
    pub fn into_parts(self, dtype: Dtype, max_bytes: usize) -> Result<Vec<pb::Batch>, BatchError> {
        let b = self.sample_ids.len();
        if self.sample_epochs.len() != b {
            return Err(BatchError::Malformed {
                sequence: self.sequence,
                detail: format!(
                    "{} sample ids but {} sample epochs",
                    b,
                    self.sample_epochs.len()
                ),
            });
        }
        for f in &self.fields {
            if f.batch_size() != b {
                return Err(field_err(
                    &f.name,
                    format!("holds {} samples, the batch {b}", f.batch_size()),
                ));
            }
            f.validate()?;
        }
        let shapes: Vec<FieldShape> = self
            .fields
            .iter()
            .map(|f| FieldShape {
                name: f.name.clone(),
                num_tokens: f.num_tokens(),
                token_numel: f.token_numel(),
                pe_width: f.pe_width,
            })
            .collect();
        let samples = (0..b)
            .map(|i| OutgoingSample {
                id: self.sample_ids[i],
                epoch: self.sample_epochs[i],
                fields: self
                    .fields
                    .iter()
                    .map(|f| SampleField {
                        source: f.source_of(i).to_vec(),
                        target: f.target_of(i).to_vec(),
                        masked_indices: f.masked_indices[i].clone(),
                        token_info: f.token_info_of(i).to_vec(),
                        pe: f.pe_of(i).to_vec(),
                        window: f.windows[i],
                    })
                    .collect(),
            })
            .collect();
        let header = PartHeader {
            sequence: self.sequence,
            cursor_after: self.cursor_after,
            end_of_stream: self.end_of_stream,
        };
        let pool = Arc::new(BufferPool::new(0, 0));
        Ok(split_samples(
            samples, &shapes, header, dtype, max_bytes, &pool,
        ))
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;
    use crate::batch::{BatchAssembler, test_batch};

    #[test]
    fn one_part_round_trip() {
        let original = test_batch(5);
        let mut parts = original.clone().into_parts(Dtype::F32, usize::MAX).unwrap();
        assert_eq!(parts.len(), 1);
        let msg = parts.remove(0);
        assert_eq!(msg.fields[0].masked_counts, vec![0, 1, 2, 0, 1]);
        assert_eq!(Batch::from_proto(msg).unwrap(), original);
        let f = &original.fields[0];
        assert_eq!(f.target_of(2), &f.target[6..18]);
        assert_eq!(f.source_of(1), &f.source[48..96]);
    }

    #[test]
    fn split_and_reassemble() {
        let original = test_batch(9);
        let whole = original.clone().into_parts(Dtype::F32, usize::MAX).unwrap()[0].encoded_len();
        let max = whole / 3;
        let parts = original.clone().into_parts(Dtype::F32, max).unwrap();
        assert!(parts.len() >= 3, "{} parts", parts.len());
        let mut assembler = BatchAssembler::default();
        let n = parts.len();
        for (k, part) in parts.into_iter().enumerate() {
            assert!(
                part.encoded_len() <= max,
                "part {k}: {} > {max}",
                part.encoded_len()
            );
            assert_eq!(part.cursor_after.is_some(), k + 1 == n);
            assert_eq!(part.end_of_stream, k + 1 == n);
            let out = assembler.push(part).unwrap();
            assert_eq!(out.is_some(), k + 1 == n);
            if let Some(b) = out {
                assert_eq!(b, original);
            }
        }
        assert_eq!(assembler.pending_parts(), 0);
    }

    #[test]
    fn a_recycled_batch_lends_its_buffers_to_the_next_and_leaves_nothing_behind() {
        let pool = Arc::new(BufferPool::new(64, u64::MAX));
        let mut assembler = BatchAssembler::with_pool(pool.clone());
        let assemble = |assembler: &mut BatchAssembler, original: &Batch| {
            let whole =
                original.clone().into_parts(Dtype::F32, usize::MAX).unwrap()[0].encoded_len();
            let max = whole / 3;
            let mut out = None;
            for part in original.clone().into_parts(Dtype::F32, max).unwrap() {
                out = assembler.push(part).unwrap();
            }
            out.expect("the last part completes the batch")
        };
        let first = assemble(&mut assembler, &test_batch(9));
        assert_eq!(first, test_batch(9));
        let lent: Vec<*const f32> = first
            .fields
            .iter()
            .flat_map(|f| [&f.source, &f.target, &f.token_info, &f.pe])
            .map(|b| b.as_ptr())
            .collect();
        first.recycle(&pool);
        assert!(pool.held_bytes() > 0);
        // A smaller batch with other values: decoded into the recycled buffers, equal to what
        // was sent (nothing of the first batch left in them).
        let mut second_sent = test_batch(7);
        for f in &mut second_sent.fields {
            f.source.iter_mut().for_each(|v| *v = -*v - 1.0);
        }
        let second = assemble(&mut assembler, &second_sent);
        assert_eq!(second, second_sent);
        for f in &second.fields {
            assert!(
                lent.contains(&f.source.as_ptr()),
                "field {}: its source is a fresh buffer",
                f.name
            );
        }
    }

    #[test]
    fn bf16_batch_keeps_token_info_exact() {
        let mut original = test_batch(2);
        original.fields[0].token_info[0] = 2021.0;
        let msg = original
            .clone()
            .into_parts(Dtype::Bf16, usize::MAX)
            .unwrap()
            .remove(0);
        assert_eq!(
            msg.fields[0].token_info.as_ref().unwrap().dtype,
            Dtype::F32 as i32
        );
        assert_eq!(
            msg.fields[0].source.as_ref().unwrap().dtype,
            Dtype::Bf16 as i32
        );
        let back = Batch::from_proto(msg).unwrap();
        assert_eq!(back.fields[0].token_info, original.fields[0].token_info);
        let parts = original.clone().into_parts(Dtype::Bf16, 1000).unwrap();
        assert!(parts.len() > 1);
        let mut assembler = BatchAssembler::default();
        let mut out = None;
        for p in parts {
            out = assembler.push(p).unwrap();
        }
        assert_eq!(out.unwrap(), back);
    }

    #[test]
    fn a_sample_alone_in_its_part_travels_in_its_own_buffer() {
        let shapes = [FieldShape {
            name: "t".into(),
            num_tokens: 4,
            token_numel: 100,
            pe_width: 2,
        }];
        let sample = |id: u64| OutgoingSample {
            id,
            epoch: 1,
            fields: vec![SampleField {
                source: vec![id as f32; 400],
                target: vec![],
                masked_indices: vec![],
                token_info: vec![0.5; 32],
                pe: vec![0.25; 8],
                window: Window {
                    time_start: id as usize,
                    lat_start: 0,
                    lon_start: 0,
                    size: [1, 2, 2],
                },
            }],
        };
        let samples = vec![sample(0), sample(1)];
        let alone = samples.clone();
        let sent: Vec<*const u8> = alone
            .iter()
            .map(|s| s.fields[0].source.as_ptr().cast())
            .collect();
        let pool = Arc::new(BufferPool::new(8, u64::MAX));
        let header = PartHeader {
            sequence: 3,
            cursor_after: StreamCursor {
                epoch: 1,
                position: 2,
            },
            end_of_stream: false,
        };
        // Room for one sample per part: each goes out in the buffer it was assembled in.
        let parts = split_samples(alone, &shapes, header, Dtype::F32, 2500, &pool);
        assert_eq!(parts.len(), 2);
        for (part, sent) in parts.iter().zip(&sent) {
            assert_eq!(part.fields[0].source.as_ref().unwrap().data.as_ptr(), *sent);
        }
        drop(parts);
        assert!(
            pool.held_bytes() >= 2 * 1600,
            "sent buffers return to the pool"
        );
        // Both in one part: gathered, and equal to what was sent.
        let parts = split_samples(samples, &shapes, header, Dtype::F32, usize::MAX, &pool);
        assert_eq!(parts.len(), 1);
        let batch = Batch::from_proto(parts.into_iter().next().unwrap()).unwrap();
        assert_eq!(batch.sample_ids, vec![0, 1]);
        assert_eq!(batch.epoch, 1);
        assert_eq!(batch.fields[0].source_of(1), &[1.0; 400][..]);
        assert_eq!(batch.cursor_after, header.cursor_after);
        // No samples: one empty part with the cursor, its epoch the cursor's.
        let parts = split_samples(Vec::new(), &shapes, header, Dtype::F32, 100, &pool);
        assert_eq!(parts.len(), 1);
        assert_eq!(parts[0].epoch, 1);
        assert_eq!(
            parts[0].fields[0].source.as_ref().unwrap().shape,
            vec![0, 4, 100]
        );
        let empty = Batch::from_proto(parts[0].clone()).unwrap();
        assert!(empty.is_empty());
        assert_eq!(empty.cursor_after, header.cursor_after);
    }
}
