//! Typed, decoded batches and the part protocol of `StreamBatches`.
//!
//! On the wire a batch is a [`pb::Batch`]; one too large for the message limit travels as
//! several consecutive messages (parts), each with a contiguous subset of the samples and all
//! fields. [`split_samples`] cuts a batch into parts (server side, `split`), [`BatchAssembler`]
//! puts them back together and decodes them into a [`Batch`] (client side, `decode`). Only a
//! complete batch carries a usable `cursor_after`, so a client that loses a stream mid-batch
//! resumes before that batch and receives it whole.

mod decode;
mod split;

use serde::{Deserialize, Serialize};

use crate::pb;
use crate::pool::BufferPool;
use crate::tensor::TensorError;
use crate::token_info::TOKEN_INFO_LEN;

pub use decode::BatchAssembler;
pub use split::{FieldShape, OutgoingSample, PartHeader, SampleField, split_samples};

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

pub(crate) fn field_err(field: &str, detail: impl Into<String>) -> BatchError {
    BatchError::Field {
        field: field.to_string(),
        detail: detail.into(),
    }
}

pub(crate) fn tensor_err(field: &str) -> impl Fn(TensorError) -> BatchError + '_ {
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

    /// Hands the batch's buffers to `pool` for the batches decoded after it (a consumer done
    /// with a batch passes it to [`LoaderStream::recycle`](crate::client::LoaderStream::recycle)).
    pub fn recycle(self, pool: &BufferPool) {
        for field in self.fields {
            for buffer in [field.source, field.target, field.token_info, field.pe] {
                pool.give(buffer);
            }
        }
    }
}

/// A batch of `b` samples of two fields with per-sample masks of `i % 3` tokens.
#[cfg(test)]
pub(crate) fn test_batch(b: usize) -> Batch {
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
