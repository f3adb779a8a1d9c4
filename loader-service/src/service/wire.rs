//! The wire form of a batch: the pipeline's samples handed to the contract's splitter
//! (`atmorep_proto::batch::split_samples`), which cuts them into `Batch` messages of bounded
//! size with their tensors encoded in the requested dtype.

use atmorep_proto::batch::{
    FieldShape, OutgoingSample, PartHeader, SampleField, StreamCursor, Window, split_samples,
};
use atmorep_proto::pb;

use crate::pipeline::epoch::EpochCursor;
use crate::pipeline::{Pipeline, Sample};

/// Bytes of a message part the server aims for: large enough that per-message costs vanish,
/// small enough that samples of this size or larger travel without being copied into a batch.
const PART_BYTES: usize = 4 << 20;

/// The wire form of a batch: consecutive parts of at most `max_bytes` (and about
/// [`PART_BYTES`]) each, cut by the contract's splitter (a sample that fills a part alone travels
/// in its own buffers, which go back to the pipeline's pool once tonic has encoded them).
pub(super) fn to_wire(
    pipeline: &Pipeline,
    samples: Vec<Sample>,
    sequence: u64,
    cursor_after: EpochCursor,
    end_of_stream: bool,
    dtype: pb::Dtype,
    max_bytes: usize,
) -> Vec<pb::Batch> {
    let fields: Vec<FieldShape> = pipeline
        .field_geometries()
        .into_iter()
        .map(|(name, token_numel, num_tokens, pe_width)| FieldShape {
            name,
            num_tokens,
            token_numel,
            pe_width,
        })
        .collect();
    let samples = samples
        .into_iter()
        .map(|s| OutgoingSample {
            id: s.id,
            epoch: s.epoch,
            fields: s
                .fields
                .into_iter()
                .map(|f| SampleField {
                    source: f.source,
                    target: f.target,
                    masked_indices: f.masked_indices,
                    token_info: f.token_info,
                    pe: f.pe,
                    window: Window {
                        time_start: f.window.time_start,
                        lat_start: f.window.lat_start,
                        lon_start: f.window.lon_start,
                        size: f.window.size,
                    },
                })
                .collect(),
        })
        .collect();
    let header = PartHeader {
        sequence,
        cursor_after: StreamCursor {
            epoch: cursor_after.epoch,
            position: cursor_after.position,
        },
        end_of_stream,
    };
    let max_bytes = max_bytes.min(PART_BYTES);
    split_samples(samples, &fields, header, dtype, max_bytes, pipeline.pool())
}
