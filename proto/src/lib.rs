//! `atmorep-proto` owns the contract between the atmorep-rs loader service and everything that
//! consumes its token stream (trainers, downstream clients): the gRPC schema, the small pure code
//! both sides must agree on bit for bit, and the client. Today that is
//!
//! - [`pb`]: the messages and the `Loader` service of `atmorep.loader.v1`
//!   (`proto/atmorep/loader/v1/loader.proto`, compiled at build time by `protox` and
//!   `tonic-prost-build`), with [`pb::loader_client`] and [`pb::loader_server`]; the encoded
//!   schema is [`FILE_DESCRIPTOR_SET`] (for gRPC reflection);
//! - [`tensor`]: tensors on the wire (little-endian f32 / bf16 bytes) to and from `f32`;
//! - [`batch`]: typed, decoded batches, the splitting of a batch into message parts (server
//!   side) and their reassembly (client side);
//! - [`client`]: the streaming client (prefetch, reconnect across endpoints, exact resume,
//!   striping across loaders);
//! - [`request`]: a `StreamBatches` request as a TOML file;
//! - [`convert`]: conversions between generated enums and this crate's types;
//! - [`geometry`]: how a field sample is cut into tokens (token counts and sizes per axis, token
//!   order (level, t, lat, lon), value order inside a token (t, lat, lon));
//! - [`tokenize`]: windows to tokens and back;
//! - [`stitch`]: global fields back from a tiles-mode stream;
//! - [`era5`]: ERA5's parameter names (short, long, paramId, units) and the resolution of a
//!   requested name against a store's variables;
//! - [`calendar`]: UTC calendar arithmetic on unix seconds (no time-zone database), and ISO 8601
//!   text to and from unix seconds;
//! - [`token_info`]: the 8 floats of metadata every token carries (docs/design.md §3);
//! - [`positional`]: the positional encodings of the seed's ablation (global, local, standard,
//!   info+standard, none);
//! - [`statistics`]: the loader's global normalization statistics, to map normalized values
//!   back to physical units;
//! - [`pool`]: buffers of `f32` kept for reuse, backed by transparent huge pages
//!   ([`huge_pages`]) where they are large enough.
//!
//! No Zarr and no candle: trainers and downstream tools depend on this crate alone. The pure
//! modules (geometry, calendar, token info, positional) are deterministic and computed in `f64`
//! before being handed out as `f32`; only [`client`] needs a tokio runtime.

pub mod batch;
pub mod calendar;
pub mod client;
pub mod codec;
pub mod convert;
pub mod era5;
pub mod error;
pub mod geometry;
pub mod huge_pages;
pub mod pool;
pub mod positional;
pub mod request;
pub mod statistics;
pub mod stitch;
pub mod tensor;
pub mod tls;
pub mod token_info;
pub mod tokenize;

/// The generated `atmorep.loader.v1` messages, enums, client ([`pb::loader_client`]) and server
/// ([`pb::loader_server`]).
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod pb {
    tonic::include_proto!("atmorep.loader.v1");
}

/// The encoded `google.protobuf.FileDescriptorSet` of the schema this crate was built from, for
/// `tonic-reflection`'s `register_encoded_file_descriptor_set`.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(
    env!("OUT_DIR"),
    "/atmorep_loader_v1_descriptor.bin"
));

pub use batch::{Batch, BatchAssembler, BatchError, FieldBatch, StreamCursor, Window};
pub use client::{ClientConfig, ClientError, LoaderClient, LoaderStream, StreamStats};
pub use error::{ProtoError, Result};
pub use geometry::{FieldGeometry, TokenGeometry};
pub use pb::Dtype;
pub use positional::{GlobalOffsets, PeInputs, PeMode};
pub use request::{FieldRequestConfig, MaskConfig, RequestConfig, RequestConfigError};
pub use statistics::{MonthlyStatistics, StatisticsError};
pub use tensor::TensorError;
pub use token_info::{TOKEN_INFO_LEN, TokenInfo, WindowCoords};

#[cfg(test)]
mod tests {
    use prost::Message;

    #[test]
    fn descriptor_set_describes_the_service() {
        // Any well-formed protobuf decodes as an empty message (unknown fields are skipped);
        // the names prove it is this schema.
        assert!(!super::FILE_DESCRIPTOR_SET.is_empty());
        let text = String::from_utf8_lossy(super::FILE_DESCRIPTOR_SET);
        for name in [
            "atmorep/loader/v1/loader.proto",
            "atmorep.loader.v1",
            "StreamBatches",
        ] {
            assert!(text.contains(name), "{name} missing");
        }
        let empty = super::pb::ListDatasetsRequest::decode(super::FILE_DESCRIPTOR_SET);
        assert!(empty.is_ok());
    }
}
