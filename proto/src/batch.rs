//! Typed, decoded batches and the part protocol of `StreamBatches`.
//!
//! On the wire a batch is a [`pb::Batch`]; one too large for the message limit travels as
//! several consecutive messages (parts), each with a contiguous subset of the samples and all
//! fields. [`split_parts`] cuts a batch into parts (server side, zero-copy: parts slice the
//! original tensor buffers), [`BatchAssembler`] puts them back together and decodes them into a
//! [`Batch`] (client side). Only a complete batch carries a usable `cursor_after`, so a client
//! that loses a stream mid-batch resumes before that batch and receives it whole.

use std::sync::Arc;

use prost::Message;
use serde::{Deserialize, Serialize};

use crate::pb;
use crate::pb::Dtype;
use crate::pool::BufferPool;
use crate::tensor::TensorError;
use crate::token_info::TOKEN_INFO_LEN;

/// A stream position: the next sample to deliver is the `position`-th of this rank's shard of
/// `epoch` (the loader's `epoch::EpochCursor`). In tiles mode the epoch is 0 and the position the
/// tile index.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord, Serialize, Deserialize,
)]
pub struct StreamCursor {
    pub epoch: u64,
    pub position: u64,
}

impl From<pb::Cursor> for StreamCursor {
    fn from(c: pb::Cursor) -> Self {
        Self {
            epoch: c.epoch,
            position: c.position,
        }
    }
}

impl From<StreamCursor> for pb::Cursor {
    fn from(c: StreamCursor) -> Self {
        Self {
            epoch: c.epoch,
            position: c.position,
        }
    }
}

/// Where a field sample was cut (the loader's `sampler::FieldWindow`): start indices on the
/// canonical grid and the size in grid points along (time, lat, lon); the longitude window wraps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Window {
    pub time_start: usize,
    pub lat_start: usize,
    pub lon_start: usize,
    pub size: [usize; 3],
}

impl From<Window> for pb::Window {
    fn from(w: Window) -> Self {
        Self {
            time_start: w.time_start as u64,
            lat_start: w.lat_start as u64,
            lon_start: w.lon_start as u64,
            size: w.size.iter().map(|&s| s as u64).collect(),
        }
    }
}

impl TryFrom<&pb::Window> for Window {
    type Error = String;

    fn try_from(w: &pb::Window) -> Result<Self, String> {
        let idx = |v: u64| usize::try_from(v).map_err(|_| format!("window index {v} overflows"));
        let size: [u64; 3] = w.size.as_slice().try_into().map_err(|_| {
            format!(
                "window size must have 3 values (time, lat, lon), got {:?}",
                w.size
            )
        })?;
        Ok(Self {
            time_start: idx(w.time_start)?,
            lat_start: idx(w.lat_start)?,
            lon_start: idx(w.lon_start)?,
            size: [idx(size[0])?, idx(size[1])?, idx(size[2])?],
        })
    }
}

/// Why a batch message cannot be decoded, reassembled, encoded or split.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum BatchError {
    /// A tensor of a field is malformed or has the wrong shape.
    #[error("field `{field}`: {source}")]
    Tensor {
        field: String,
        #[source]
        source: TensorError,
    },
    /// A field's parts do not fit together (counts, indices, windows).
    #[error("field `{field}`: {detail}")]
    Field { field: String, detail: String },
    /// The batch as a whole is inconsistent.
    #[error("batch {sequence}: {detail}")]
    Malformed { sequence: u64, detail: String },
    /// Parts arrived out of order, or a new batch started before the previous one completed.
    #[error("batch {sequence}: got part {got} of {parts}, expected part {expected}")]
    PartOrder {
        sequence: u64,
        got: u32,
        parts: u32,
        expected: u32,
    },
    /// The last part of a batch has no `cursor_after`, so the stream could not be resumed.
    #[error("batch {sequence}: the last part carries no cursor_after")]
    MissingCursor { sequence: u64 },
}

fn field_err(field: &str, detail: impl Into<String>) -> BatchError {
    BatchError::Field {
        field: field.to_string(),
        detail: detail.into(),
    }
}

fn tensor_err(field: &str) -> impl Fn(TensorError) -> BatchError + '_ {
    move |source| BatchError::Tensor {
        field: field.to_string(),
        source,
    }
}

/// One field of every sample of a batch, decoded to `f32`. `B` samples, `N` tokens per sample
/// (token order (level, t, lat, lon)), `V` values per token ((t, lat, lon) order), `W` the
/// positional-encoding width.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct FieldBatch {
    pub name: String,
    /// Model input after masking, `[B, N, V]` row-major.
    pub source: Vec<f32>,
    /// `[B, N, V]`.
    pub source_shape: [usize; 3],
    /// Original values of the masked tokens, `[M, V]` with `M` the total masked count: sample by
    /// sample, each in its `masked_indices` order.
    pub target: Vec<f32>,
    /// Per sample, the ascending indices (in `0..N`) of its masked tokens.
    pub masked_indices: Vec<Vec<u32>>,
    /// Token info, `[B, N, 8]` (see [`crate::token_info`]).
    pub token_info: Vec<f32>,
    /// Positional encoding, `[B, N, W]`.
    pub pe: Vec<f32>,
    /// `W`.
    pub pe_width: usize,
    /// Per sample, the window it was cut from.
    pub windows: Vec<Window>,
}

impl FieldBatch {
    /// `B`.
    pub fn batch_size(&self) -> usize {
        self.source_shape[0]
    }

    /// `N`: tokens per sample.
    pub fn num_tokens(&self) -> usize {
        self.source_shape[1]
    }

    /// `V`: values per token.
    pub fn token_numel(&self) -> usize {
        self.source_shape[2]
    }

    /// `M`: masked tokens over all samples.
    pub fn num_masked(&self) -> usize {
        self.masked_indices.iter().map(Vec::len).sum()
    }

    /// `[M, V]`.
    pub fn target_shape(&self) -> [usize; 2] {
        [self.num_masked(), self.token_numel()]
    }

    /// `[B, N, 8]`.
    pub fn token_info_shape(&self) -> [usize; 3] {
        [self.batch_size(), self.num_tokens(), TOKEN_INFO_LEN]
    }

    /// `[B, N, W]`.
    pub fn pe_shape(&self) -> [usize; 3] {
        [self.batch_size(), self.num_tokens(), self.pe_width]
    }

    /// Sample `i`'s source, `[N, V]`.
    pub fn source_of(&self, i: usize) -> &[f32] {
        let len = self.num_tokens() * self.token_numel();
        &self.source[i * len..(i + 1) * len]
    }

    /// Sample `i`'s target, `[M_i, V]`.
    pub fn target_of(&self, i: usize) -> &[f32] {
        let v = self.token_numel();
        let start: usize = self.masked_indices[..i].iter().map(Vec::len).sum();
        &self.target[start * v..(start + self.masked_indices[i].len()) * v]
    }

    /// Sample `i`'s token info, `[N, 8]`.
    pub fn token_info_of(&self, i: usize) -> &[f32] {
        let len = self.num_tokens() * TOKEN_INFO_LEN;
        &self.token_info[i * len..(i + 1) * len]
    }

    /// Sample `i`'s positional encoding, `[N, W]`.
    pub fn pe_of(&self, i: usize) -> &[f32] {
        let len = self.num_tokens() * self.pe_width;
        &self.pe[i * len..(i + 1) * len]
    }

    /// Checks that every vector matches the shapes.
    pub fn validate(&self) -> Result<(), BatchError> {
        let [b, n, v] = self.source_shape;
        let checks = [
            ("source", self.source.len(), b * n * v),
            ("target", self.target.len(), self.num_masked() * v),
            ("token_info", self.token_info.len(), b * n * TOKEN_INFO_LEN),
            ("pe", self.pe.len(), b * n * self.pe_width),
            ("masked_indices (samples)", self.masked_indices.len(), b),
            ("windows", self.windows.len(), b),
        ];
        for (what, got, expected) in checks {
            if got != expected {
                return Err(field_err(
                    &self.name,
                    format!("{what}: expected {expected} values, got {got}"),
                ));
            }
        }
        if let Some(bad) = self
            .masked_indices
            .iter()
            .flatten()
            .find(|&&i| i as usize >= n)
        {
            return Err(field_err(
                &self.name,
                format!("masked index {bad} is outside 0..{n}"),
            ));
        }
        Ok(())
    }

    /// Encodes the field: `source`, `target` and `pe` as `dtype`, token info always as F32 (years
    /// and days of year need its precision).
    pub fn into_proto(self, dtype: Dtype) -> Result<pb::FieldBatch, BatchError> {
        self.validate()?;
        let [b, n, v] = self.source_shape;
        let name = self.name.clone();
        let err = tensor_err(&name);
        let masked_counts = self.masked_indices.iter().map(|m| m.len() as u32).collect();
        let target_shape = self.target_shape();
        Ok(pb::FieldBatch {
            source: Some(pb::Tensor::from_f32(&[b, n, v], self.source, dtype).map_err(&err)?),
            target: Some(pb::Tensor::from_f32(&target_shape, self.target, dtype).map_err(&err)?),
            masked_indices: self.masked_indices.into_iter().flatten().collect(),
            masked_counts,
            token_info: Some(
                pb::Tensor::from_f32(&[b, n, TOKEN_INFO_LEN], self.token_info, Dtype::F32)
                    .map_err(&err)?,
            ),
            pe: Some(pb::Tensor::from_f32(&[b, n, self.pe_width], self.pe, dtype).map_err(&err)?),
            windows: self.windows.into_iter().map(pb::Window::from).collect(),
            name: self.name,
        })
    }

    /// Decodes one message's field holding `b` samples, into buffers from `pool` with room for
    /// `parts` such parts (the batch's later parts are appended without growing them).
    pub fn from_proto(
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

/// A decoded batch: every field of `sample_ids.len()` samples, and the stream position after it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Batch {
    /// Batch number within the call that delivered it (restarts at 0 on every call).
    pub sequence: u64,
    /// Epoch of the first sample.
    pub epoch: u64,
    pub sample_ids: Vec<u64>,
    /// Epoch of each sample (a batch may straddle an epoch boundary).
    pub sample_epochs: Vec<u64>,
    /// In request order.
    pub fields: Vec<FieldBatch>,
    /// Resume here to continue right after this batch.
    pub cursor_after: StreamCursor,
    /// The last batch of a finite stream.
    pub end_of_stream: bool,
}

impl Batch {
    /// Number of samples.
    pub fn len(&self) -> usize {
        self.sample_ids.len()
    }

    /// No samples (the server's closing message of a finite stream may be empty).
    pub fn is_empty(&self) -> bool {
        self.sample_ids.is_empty()
    }

    /// The field called `name`.
    pub fn field(&self, name: &str) -> Option<&FieldBatch> {
        self.fields.iter().find(|f| f.name == name)
    }

    /// Bytes of token payload (sources) in f32.
    pub fn payload_bytes(&self) -> usize {
        self.fields.iter().map(|f| f.source.len() * 4).sum()
    }

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

    /// Hands the batch's buffers to `pool` for the batches decoded after it (a consumer done
    /// with a batch passes it to [`LoaderStream::recycle`](crate::client::LoaderStream::recycle)).
    pub fn recycle(self, pool: &BufferPool) {
        for field in self.fields {
            for buffer in [field.source, field.target, field.token_info, field.pe] {
                pool.give(buffer);
            }
        }
    }

    /// Encodes the batch as one message (part 0 of 1); see [`FieldBatch::into_proto`] for the
    /// element types.
    pub fn into_proto(self, dtype: Dtype) -> Result<pb::Batch, BatchError> {
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
        if let Some(f) = self.fields.iter().find(|f| f.batch_size() != b) {
            return Err(field_err(
                &f.name,
                format!("holds {} samples, the batch {b}", f.batch_size()),
            ));
        }
        Ok(pb::Batch {
            sequence: self.sequence,
            epoch: self.epoch,
            sample_ids: self.sample_ids,
            sample_epochs: self.sample_epochs,
            fields: self
                .fields
                .into_iter()
                .map(|f| f.into_proto(dtype))
                .collect::<Result<_, _>>()?,
            cursor_after: Some(self.cursor_after.into()),
            part: 0,
            parts: 1,
            end_of_stream: self.end_of_stream,
        })
    }

    /// Decodes the samples of one part (without the cursor, which only the last part has).
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
    /// Element sizes of source, target, pe (token info is F32).
    source_elem: usize,
    target_elem: usize,
    pe_elem: usize,
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
        let target_elem = match &fb.target {
            Some(t) => {
                t.validate().map_err(&err)?;
                t.expect_shape("target", &[Some(m), Some(v as u64)])
                    .map_err(&err)?;
                t.element_type().map_err(&err)?
            }
            None if m == 0 => Dtype::F32,
            None => return Err(missing("target")),
        };
        if fb.windows.len() != b {
            return Err(field_err(
                name,
                format!("{} windows for {b} samples", fb.windows.len()),
            ));
        }
        let size = |t: &pb::Tensor| {
            t.element_type()
                .map(|d| crate::tensor::element_size(d).unwrap_or(4))
                .map_err(&err)
        };
        Ok(Self {
            n,
            v,
            w,
            counts,
            source_elem: size(source)?,
            target_elem: crate::tensor::element_size(target_elem).unwrap_or(4),
            pe_elem: size(pe)?,
        })
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

    /// Whether some parts of an incomplete batch are held.
    pub fn is_partial(&self) -> bool {
        self.pending.is_some()
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

/// Cuts `msg` into parts of at most about `max_bytes` encoded bytes each (consecutive samples;
/// every part carries all fields; the tensor bytes are shared with `msg`, not copied). A batch
/// that already fits is returned as is. A single sample larger than `max_bytes` still gets a
/// part of its own — raise the message limit for such geometries.
pub fn split_parts(msg: pb::Batch, max_bytes: usize) -> Result<Vec<pb::Batch>, BatchError> {
    if msg.parts > 1 {
        return Err(BatchError::Malformed {
            sequence: msg.sequence,
            detail: "is already a part".into(),
        });
    }
    let b = msg.sample_ids.len();
    if msg.encoded_len() <= max_bytes || b <= 1 {
        return Ok(vec![msg]);
    }
    if !msg.sample_epochs.is_empty() && msg.sample_epochs.len() != b {
        return Err(BatchError::Malformed {
            sequence: msg.sequence,
            detail: format!(
                "{b} sample ids but {} sample epochs",
                msg.sample_epochs.len()
            ),
        });
    }
    let layouts = msg
        .fields
        .iter()
        .map(|f| FieldLayout::of(f, b))
        .collect::<Result<Vec<_>, _>>()?;
    // Upper bounds of each sample's share of the encoded message: tensor bytes plus varint and
    // tag overhead of its ids, indices and window.
    let cost: Vec<usize> = (0..b)
        .map(|i| {
            let per_field: usize = layouts
                .iter()
                .map(|l| {
                    let m = l.counts[i] as usize;
                    l.n * l.v * l.source_elem
                        + l.n * TOKEN_INFO_LEN * 4
                        + l.n * l.w * l.pe_elem
                        + m * l.v * l.target_elem
                        + m * 5
                        + 5
                        + 72
                })
                .sum();
            per_field + 24
        })
        .collect();
    let overhead = 256 + msg.fields.iter().map(|f| f.name.len() + 128).sum::<usize>();
    let budget = max_bytes.saturating_sub(overhead);
    let mut groups: Vec<std::ops::Range<usize>> = Vec::new();
    let (mut start, mut acc) = (0, 0usize);
    for (i, &c) in cost.iter().enumerate() {
        if i > start && acc + c > budget {
            groups.push(start..i);
            (start, acc) = (i, 0);
        }
        acc += c;
    }
    groups.push(start..b);
    let parts = groups.len() as u32;
    let mut out = Vec::with_capacity(groups.len());
    for (k, range) in groups.into_iter().enumerate() {
        let last = k + 1 == parts as usize;
        let fields = msg
            .fields
            .iter()
            .zip(&layouts)
            .map(|(f, l)| slice_field(f, l, range.clone()))
            .collect();
        out.push(pb::Batch {
            sequence: msg.sequence,
            epoch: msg.epoch,
            sample_ids: msg.sample_ids[range.clone()].to_vec(),
            sample_epochs: if msg.sample_epochs.is_empty() {
                Vec::new()
            } else {
                msg.sample_epochs[range.clone()].to_vec()
            },
            fields,
            cursor_after: if last { msg.cursor_after } else { None },
            part: k as u32,
            parts,
            end_of_stream: last && msg.end_of_stream,
        });
    }
    Ok(out)
}

/// Samples `range` of a validated field, slicing (not copying) its tensors.
fn slice_field(
    f: &pb::FieldBatch,
    l: &FieldLayout,
    range: std::ops::Range<usize>,
) -> pb::FieldBatch {
    let rows = |t: &pb::Tensor, row_bytes: usize, rows: std::ops::Range<usize>| {
        let mut shape = t.shape.clone();
        shape[0] = rows.len() as u64;
        pb::Tensor {
            shape,
            dtype: t.dtype,
            data: t.data.slice(rows.start * row_bytes..rows.end * row_bytes),
        }
    };
    let masked_before: usize = l.counts[..range.start].iter().map(|&c| c as usize).sum();
    let masked_here: usize = l.counts[range.clone()].iter().map(|&c| c as usize).sum();
    let masked = masked_before..masked_before + masked_here;
    let source = f.source.as_ref().expect("validated");
    let info = f.token_info.as_ref().expect("validated");
    let pe = f.pe.as_ref().expect("validated");
    pb::FieldBatch {
        name: f.name.clone(),
        source: Some(rows(source, l.n * l.v * l.source_elem, range.clone())),
        target: f
            .target
            .as_ref()
            .map(|t| rows(t, l.v * l.target_elem, masked.clone())),
        masked_indices: f.masked_indices.get(masked).unwrap_or_default().to_vec(),
        masked_counts: l.counts[range.clone()].to_vec(),
        token_info: Some(rows(info, l.n * TOKEN_INFO_LEN * 4, range.clone())),
        pe: Some(rows(pe, l.n * l.w * l.pe_elem, range.clone())),
        windows: f.windows[range].to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A batch of `b` samples of two fields with per-sample masks of `i % 3` tokens.
    fn batch(b: usize) -> Batch {
        let field = |name: &str, n: usize, v: usize, w: usize, offset: f32| {
            let masked_indices: Vec<Vec<u32>> = (0..b)
                .map(|i| (0..(i % 3) as u32).map(|k| k * 2).collect())
                .collect();
            let m: usize = masked_indices.iter().map(Vec::len).sum();
            FieldBatch {
                name: name.into(),
                source: (0..b * n * v).map(|k| k as f32 + offset).collect(),
                source_shape: [b, n, v],
                target: (0..m * v).map(|k| -(k as f32)).collect(),
                masked_indices,
                token_info: (0..b * n * 8).map(|k| k as f32 * 0.5).collect(),
                pe: (0..b * n * w).map(|k| (k as f32).sin()).collect(),
                pe_width: w,
                windows: (0..b)
                    .map(|i| Window {
                        time_start: i,
                        lat_start: 2 * i,
                        lon_start: 3 * i,
                        size: [3, 9, 9],
                    })
                    .collect(),
            }
        };
        Batch {
            sequence: 7,
            epoch: 2,
            sample_ids: (0..b as u64).map(|i| 100 + i).collect(),
            sample_epochs: (0..b).map(|i| 2 + (i >= b / 2) as u64).collect(),
            fields: vec![field("t", 8, 6, 4, 0.0), field("z", 4, 12, 2, 1000.0)],
            cursor_after: StreamCursor {
                epoch: 3,
                position: 5,
            },
            end_of_stream: true,
        }
    }

    #[test]
    fn one_part_round_trip() {
        let original = batch(5);
        let msg = original.clone().into_proto(Dtype::F32).unwrap();
        assert_eq!(msg.fields[0].masked_counts, vec![0, 1, 2, 0, 1]);
        assert_eq!(Batch::from_proto(msg).unwrap(), original);
        let f = &original.fields[0];
        assert_eq!(f.target_of(2), &f.target[6..18]);
        assert_eq!(f.source_of(1), &f.source[48..96]);
    }

    #[test]
    fn split_and_reassemble() {
        let original = batch(9);
        let msg = original.clone().into_proto(Dtype::F32).unwrap();
        let whole = msg.encoded_len();
        let max = whole / 3;
        let parts = split_parts(msg, max).unwrap();
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
        assert!(!assembler.is_partial());
    }

    #[test]
    fn a_recycled_batch_lends_its_buffers_to_the_next_and_leaves_nothing_behind() {
        let pool = Arc::new(BufferPool::new(64, u64::MAX));
        let mut assembler = BatchAssembler::with_pool(pool.clone());
        let assemble = |assembler: &mut BatchAssembler, original: &Batch| {
            let msg = original.clone().into_proto(Dtype::F32).unwrap();
            let max = msg.encoded_len() / 3;
            let mut out = None;
            for part in split_parts(msg, max).unwrap() {
                out = assembler.push(part).unwrap();
            }
            out.expect("the last part completes the batch")
        };
        let first = assemble(&mut assembler, &batch(9));
        assert_eq!(first, batch(9));
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
        let mut second_sent = batch(7);
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
    fn a_bad_later_part_is_rejected_and_names_its_field() {
        let parts = split_parts(batch(6).into_proto(Dtype::F32).unwrap(), 1500).unwrap();
        assert!(parts.len() >= 3);
        let spoil = |f: &dyn Fn(&mut pb::Batch)| {
            let mut assembler = BatchAssembler::default();
            assembler.push(parts[0].clone()).unwrap();
            let mut bad = parts[1].clone();
            f(&mut bad);
            let err = assembler.push(bad).unwrap_err();
            assert!(!assembler.is_partial(), "the batch is dropped");
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
    fn bf16_batch_keeps_token_info_exact() {
        let mut original = batch(2);
        original.fields[0].token_info[0] = 2021.0;
        let msg = original.clone().into_proto(Dtype::Bf16).unwrap();
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
        let parts = split_parts(original.clone().into_proto(Dtype::Bf16).unwrap(), 1000).unwrap();
        assert!(parts.len() > 1);
        let mut assembler = BatchAssembler::default();
        let mut out = None;
        for p in parts {
            out = assembler.push(p).unwrap();
        }
        assert_eq!(out.unwrap(), back);
    }

    #[test]
    fn part_order_is_checked() {
        let parts = split_parts(batch(6).into_proto(Dtype::F32).unwrap(), 1500).unwrap();
        assert!(parts.len() >= 3);
        let mut assembler = BatchAssembler::default();
        assert!(matches!(
            assembler.push(parts[1].clone()),
            Err(BatchError::PartOrder { expected: 0, .. })
        ));
        assembler.push(parts[0].clone()).unwrap();
        assert!(assembler.is_partial());
        assert_eq!(assembler.pending_parts(), 1);
        assert!(matches!(
            assembler.push(parts[2].clone()),
            Err(BatchError::PartOrder { expected: 1, .. })
        ));
        assembler.reset();
        assert!(!assembler.is_partial());
    }

    #[test]
    fn malformed_messages_are_rejected() {
        let good = batch(3).into_proto(Dtype::F32).unwrap();
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
        let mut typed = batch(2);
        typed.fields[0].pe.pop();
        assert!(typed.into_proto(Dtype::F32).is_err());
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
