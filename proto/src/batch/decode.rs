//! Decoding and reassembly (client side): the parts of a batch, validated against each other,
//! decoded to `f32` straight into one batch's buffers (taken from a pool when the consumer hands
//! batches back).

use std::sync::Arc;

use super::{Batch, BatchError, FieldBatch, StreamCursor, Window, field_err, tensor_err};
use crate::pb;
use crate::pool::BufferPool;
use crate::token_info::TOKEN_INFO_LEN;

impl FieldBatch {
    /// Decodes one message's field holding `b` samples, into buffers from `pool` with room for
    /// `parts` such parts (the batch's later parts are appended without growing them).
    pub(super) fn from_proto(
        fb: &pb::FieldBatch,
        b: usize,
        parts: usize,
        pool: &BufferPool,
    ) -> Result<Self, BatchError> {
        let layout = FieldLayout::of(fb, b)?;
        let err = tensor_err(&fb.name);
        let name = &fb.name;
        let source = fb.source.as_ref().expect("checked by FieldLayout");
        let pe = fb.pe.as_ref().expect("checked by FieldLayout");
        let info = fb.token_info.as_ref().expect("checked by FieldLayout");
        let mut masked_indices = Vec::with_capacity(b);
        let mut rest = &fb.masked_indices[..];
        for &count in &layout.counts {
            let (mine, tail) = rest.split_at(count as usize);
            masked_indices.push(mine.to_vec());
            rest = tail;
        }
        let windows = fb
            .windows
            .iter()
            .map(Window::try_from)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| field_err(name, e))?;
        let decode = |tensor: &pb::Tensor| -> Result<Vec<f32>, BatchError> {
            let mut values = pool.take_capacity(tensor.numel().map_err(&err)? * parts);
            tensor.extend_f32(&mut values).map_err(&err)?;
            Ok(values)
        };
        Ok(Self {
            name: name.clone(),
            source: decode(source)?,
            source_shape: [b, layout.n, layout.v],
            target: match &fb.target {
                Some(t) => decode(t)?,
                None => Vec::new(),
            },
            masked_indices,
            token_info: decode(info)?,
            pe: decode(pe)?,
            pe_width: layout.w,
            windows,
        })
    }

    /// Appends the `b` samples of `fb` (the next part of the same field), decoding its tensors
    /// straight onto this field's: a decoded part of its own would be one more copy of every
    /// value and a fresh buffer per part.
    fn append_proto(&mut self, fb: &pb::FieldBatch, b: usize) -> Result<(), BatchError> {
        if fb.name != self.name {
            return Err(field_err(
                &self.name,
                format!("a later part names this field `{}`", fb.name),
            ));
        }
        let layout = FieldLayout::of(fb, b)?;
        if b == 0 {
            return Ok(());
        }
        if self.source_shape[0] == 0 {
            *self = Self::from_proto(fb, b, 1, &BufferPool::new(0, 0))?;
            return Ok(());
        }
        if [layout.n, layout.v] != self.source_shape[1..] || layout.w != self.pe_width {
            return Err(field_err(
                &self.name,
                format!(
                    "parts disagree on the sample shape: [N, V] {:?} / width {} vs {:?} / width {}",
                    &self.source_shape[1..],
                    self.pe_width,
                    [layout.n, layout.v],
                    layout.w
                ),
            ));
        }
        let windows = fb
            .windows
            .iter()
            .map(Window::try_from)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| field_err(&self.name, e))?;
        // A part that fails leaves the field half appended; the assembler then drops the whole
        // batch, so nothing of it is ever seen.
        let err = tensor_err(&fb.name);
        fn tensor(t: &Option<pb::Tensor>) -> &pb::Tensor {
            t.as_ref().expect("checked by FieldLayout")
        }
        tensor(&fb.source)
            .extend_f32(&mut self.source)
            .map_err(&err)?;
        if let Some(t) = &fb.target {
            t.extend_f32(&mut self.target).map_err(&err)?;
        }
        tensor(&fb.token_info)
            .extend_f32(&mut self.token_info)
            .map_err(&err)?;
        tensor(&fb.pe).extend_f32(&mut self.pe).map_err(&err)?;
        let mut rest = &fb.masked_indices[..];
        for &count in &layout.counts {
            let (mine, tail) = rest.split_at(count as usize);
            self.masked_indices.push(mine.to_vec());
            rest = tail;
        }
        self.windows.extend(windows);
        self.source_shape[0] += b;
        Ok(())
    }
}

impl Batch {
    /// Decodes an unsplit batch message (as `GetSample` returns).
    pub fn from_proto(msg: pb::Batch) -> Result<Self, BatchError> {
        if msg.parts > 1 {
            return Err(BatchError::Malformed {
                sequence: msg.sequence,
                detail: format!("is part {} of {}, not a whole batch", msg.part, msg.parts),
            });
        }
        let mut assembler = BatchAssembler::default();
        Ok(assembler
            .push(msg)?
            .expect("a one-part batch completes at once"))
    }

    /// Each sample's epoch (one for all when the message gives only the batch's).
    fn sample_epochs_of(msg: &pb::Batch) -> Result<Vec<u64>, BatchError> {
        let b = msg.sample_ids.len();
        if msg.sample_epochs.is_empty() {
            Ok(vec![msg.epoch; b])
        } else if msg.sample_epochs.len() == b {
            Ok(msg.sample_epochs.clone())
        } else {
            Err(BatchError::Malformed {
                sequence: msg.sequence,
                detail: format!(
                    "{b} sample ids but {} sample epochs",
                    msg.sample_epochs.len()
                ),
            })
        }
    }

    /// Decodes the samples of one part (without the cursor, which only the last part has).
    fn from_part(msg: &pb::Batch, pool: &BufferPool) -> Result<Self, BatchError> {
        let parts = msg.parts.max(1) as usize;
        let b = msg.sample_ids.len();
        let sample_epochs = Self::sample_epochs_of(msg)?;
        Ok(Self {
            sequence: msg.sequence,
            epoch: msg.epoch,
            sample_ids: msg.sample_ids.clone(),
            sample_epochs,
            fields: msg
                .fields
                .iter()
                .map(|f| FieldBatch::from_proto(f, b, parts, pool))
                .collect::<Result<_, _>>()?,
            cursor_after: StreamCursor::default(),
            end_of_stream: false,
        })
    }
}

/// The shape of one message's field, validated against its `b` samples.
struct FieldLayout {
    n: usize,
    v: usize,
    w: usize,
    /// Masked tokens per sample (zeros when the message omits the counts of an unmasked field).
    counts: Vec<u32>,
}

impl FieldLayout {
    fn of(fb: &pb::FieldBatch, b: usize) -> Result<Self, BatchError> {
        let name = &fb.name;
        let err = tensor_err(name);
        let missing = |what: &str| field_err(name, format!("{what} tensor missing"));
        let source = fb.source.as_ref().ok_or_else(|| missing("source"))?;
        let pe = fb.pe.as_ref().ok_or_else(|| missing("pe"))?;
        let info = fb
            .token_info
            .as_ref()
            .ok_or_else(|| missing("token_info"))?;
        let b64 = b as u64;
        source.validate().map_err(&err)?;
        source
            .expect_shape("source", &[Some(b64), None, None])
            .map_err(&err)?;
        let dim = |d: u64| usize::try_from(d).map_err(|_| field_err(name, "dimension overflows"));
        let (n, v) = (dim(source.shape[1])?, dim(source.shape[2])?);
        info.validate().map_err(&err)?;
        info.expect_shape(
            "token_info",
            &[Some(b64), Some(n as u64), Some(TOKEN_INFO_LEN as u64)],
        )
        .map_err(&err)?;
        pe.validate().map_err(&err)?;
        pe.expect_shape("pe", &[Some(b64), Some(n as u64), None])
            .map_err(&err)?;
        let w = dim(pe.shape[2])?;
        let counts = if fb.masked_counts.is_empty() && fb.masked_indices.is_empty() {
            vec![0; b]
        } else if fb.masked_counts.len() == b {
            fb.masked_counts.clone()
        } else {
            return Err(field_err(
                name,
                format!("{} masked counts for {b} samples", fb.masked_counts.len()),
            ));
        };
        let m: u64 = counts.iter().map(|&c| u64::from(c)).sum();
        if m != fb.masked_indices.len() as u64 {
            return Err(field_err(
                name,
                format!(
                    "masked counts sum to {m}, but there are {} masked indices",
                    fb.masked_indices.len()
                ),
            ));
        }
        if let Some(bad) = fb.masked_indices.iter().find(|&&i| i as usize >= n) {
            return Err(field_err(
                name,
                format!("masked index {bad} is outside 0..{n}"),
            ));
        }
        match &fb.target {
            Some(t) => {
                t.validate().map_err(&err)?;
                t.expect_shape("target", &[Some(m), Some(v as u64)])
                    .map_err(&err)?;
            }
            None if m == 0 => {}
            None => return Err(missing("target")),
        }
        if fb.windows.len() != b {
            return Err(field_err(
                name,
                format!("{} windows for {b} samples", fb.windows.len()),
            ));
        }
        Ok(Self { n, v, w, counts })
    }
}

/// Reassembles the parts of `StreamBatches` into decoded batches.
#[derive(Debug)]
pub struct BatchAssembler {
    pending: Option<Pending>,
    /// Where a batch's buffers come from (see [`Batch::recycle`]).
    pool: Arc<BufferPool>,
}

impl Default for BatchAssembler {
    /// An assembler whose batches get buffers of their own.
    fn default() -> Self {
        Self::with_pool(Arc::new(BufferPool::new(0, 0)))
    }
}

#[derive(Debug)]
struct Pending {
    batch: Batch,
    next_part: u32,
    parts: u32,
}

impl BatchAssembler {
    /// An assembler that decodes batches into buffers taken from `pool`.
    pub fn with_pool(pool: Arc<BufferPool>) -> Self {
        Self {
            pending: None,
            pool,
        }
    }

    /// Feeds one message; returns the batch once its last part has arrived.
    pub fn push(&mut self, msg: pb::Batch) -> Result<Option<Batch>, BatchError> {
        let parts = msg.parts.max(1);
        let order_err = |expected| BatchError::PartOrder {
            sequence: msg.sequence,
            got: msg.part,
            parts,
            expected,
        };
        let mut pending = match self.pending.take() {
            None => {
                if msg.part != 0 {
                    return Err(order_err(0));
                }
                // Parts are about equally large: room for all of them now spares the repeated
                // grow-and-copy of appending hundreds of megabytes part by part.
                let batch = Batch::from_part(&msg, &self.pool)?;
                Pending {
                    batch,
                    next_part: 1,
                    parts,
                }
            }
            Some(mut p) => {
                if msg.sequence != p.batch.sequence || msg.part != p.next_part || parts != p.parts {
                    return Err(order_err(p.next_part));
                }
                if msg.fields.len() != p.batch.fields.len() {
                    return Err(BatchError::Malformed {
                        sequence: msg.sequence,
                        detail: format!(
                            "part {} has {} fields, part 0 had {}",
                            msg.part,
                            msg.fields.len(),
                            p.batch.fields.len()
                        ),
                    });
                }
                let b = msg.sample_ids.len();
                let sample_epochs = Batch::sample_epochs_of(&msg)?;
                for (mine, theirs) in p.batch.fields.iter_mut().zip(&msg.fields) {
                    mine.append_proto(theirs, b)?;
                }
                p.batch.sample_ids.extend(&msg.sample_ids);
                p.batch.sample_epochs.extend(sample_epochs);
                p.next_part += 1;
                p
            }
        };
        if pending.next_part < pending.parts {
            self.pending = Some(pending);
            return Ok(None);
        }
        let cursor = msg.cursor_after.ok_or(BatchError::MissingCursor {
            sequence: msg.sequence,
        })?;
        pending.batch.cursor_after = cursor.into();
        pending.batch.end_of_stream = msg.end_of_stream;
        Ok(Some(pending.batch))
    }

    /// Parts held of the incomplete batch (0 when none).
    pub fn pending_parts(&self) -> u32 {
        self.pending.as_ref().map_or(0, |p| p.next_part)
    }

    /// Drops an incomplete batch (after a lost stream: the resumed call sends it again whole).
    pub fn reset(&mut self) {
        self.pending = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::{StreamCursor, test_batch};
    use crate::pb::Dtype;

    #[test]
    fn a_bad_later_part_is_rejected_and_names_its_field() {
        let parts = test_batch(6).into_parts(Dtype::F32, 1500).unwrap();
        assert!(parts.len() >= 3);
        let spoil = |f: &dyn Fn(&mut pb::Batch)| {
            let mut assembler = BatchAssembler::default();
            assembler.push(parts[0].clone()).unwrap();
            let mut bad = parts[1].clone();
            f(&mut bad);
            let err = assembler.push(bad).unwrap_err();
            assert_eq!(assembler.pending_parts(), 0, "the batch is dropped");
            err
        };
        let err = spoil(&|b| b.fields[1].name = "q".into());
        assert!(err.to_string().contains("`q`"), "{err}");
        let err = spoil(&|b| {
            b.fields[0].source.as_mut().unwrap().data = bytes::Bytes::from_static(&[0; 4])
        });
        assert!(
            matches!(&err, BatchError::Tensor { field, .. } if field == "t"),
            "{err}"
        );
        let err = spoil(&|b| b.fields[1].masked_indices[0] = 1000);
        assert!(
            matches!(&err, BatchError::Field { field, .. } if field == "z"),
            "{err}"
        );
        let err = spoil(&|b| {
            let pe = b.fields[0].pe.as_mut().unwrap();
            pe.shape[2] /= 2;
            pe.data = pe.data.slice(..pe.data.len() / 2);
        });
        assert!(err.to_string().contains("sample shape"), "{err}");
        let err = spoil(&|b| {
            b.fields.pop();
        });
        assert!(matches!(err, BatchError::Malformed { .. }), "{err}");
    }

    #[test]
    fn part_order_is_checked() {
        let parts = test_batch(6).into_parts(Dtype::F32, 1500).unwrap();
        assert!(parts.len() >= 3);
        let mut assembler = BatchAssembler::default();
        assert!(matches!(
            assembler.push(parts[1].clone()),
            Err(BatchError::PartOrder { expected: 0, .. })
        ));
        assembler.push(parts[0].clone()).unwrap();
        assert!(assembler.pending_parts() > 0);
        assert_eq!(assembler.pending_parts(), 1);
        assert!(matches!(
            assembler.push(parts[2].clone()),
            Err(BatchError::PartOrder { expected: 1, .. })
        ));
        assembler.reset();
        assert_eq!(assembler.pending_parts(), 0);
    }

    #[test]
    fn malformed_messages_are_rejected() {
        let good = test_batch(3)
            .into_parts(Dtype::F32, usize::MAX)
            .unwrap()
            .remove(0);
        let mut bad = good.clone();
        bad.fields[0].masked_counts[0] += 1;
        assert!(matches!(
            Batch::from_proto(bad),
            Err(BatchError::Field { .. })
        ));
        let mut bad = good.clone();
        bad.fields[1].masked_indices[0] = 4;
        assert!(Batch::from_proto(bad).is_err());
        let mut bad = good.clone();
        bad.fields[0].windows.pop();
        assert!(Batch::from_proto(bad).is_err());
        let mut bad = good.clone();
        bad.sample_ids.push(1);
        assert!(matches!(
            Batch::from_proto(bad),
            Err(BatchError::Malformed { .. })
        ));
        let mut bad = good.clone();
        bad.fields[0].source.as_mut().unwrap().data = bytes::Bytes::from_static(&[0; 4]);
        assert!(matches!(
            Batch::from_proto(bad),
            Err(BatchError::Tensor { .. })
        ));
        let mut bad = good.clone();
        bad.cursor_after = None;
        assert!(matches!(
            Batch::from_proto(bad),
            Err(BatchError::MissingCursor { sequence: 7 })
        ));
        let mut typed = test_batch(2);
        typed.fields[0].pe.pop();
        assert!(typed.into_parts(Dtype::F32, usize::MAX).is_err());
    }

    #[test]
    fn empty_closing_batch_decodes() {
        let msg = pb::Batch {
            sequence: 4,
            cursor_after: Some(pb::Cursor {
                epoch: 2,
                position: 0,
            }),
            end_of_stream: true,
            ..Default::default()
        };
        let b = Batch::from_proto(msg).unwrap();
        assert!(b.is_empty() && b.end_of_stream);
        assert_eq!(
            b.cursor_after,
            StreamCursor {
                epoch: 2,
                position: 0
            }
        );
    }
}
