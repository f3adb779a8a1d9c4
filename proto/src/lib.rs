//! `atmorep-proto` owns the contract between the atmorep-rs loader service and everything that
//! consumes its token stream (trainers, downstream clients): the small, pure code both sides must
//! agree on bit for bit. Today that is
//!
//! - [`geometry`]: how a field sample is cut into tokens (token counts and sizes per axis, token
//!   order (level, t, lat, lon), value order inside a token (t, lat, lon));
//! - [`calendar`]: UTC calendar arithmetic on unix seconds (no time-zone database, no chrono);
//! - [`token_info`]: the 8 floats of metadata every token carries (DESIGN §3);
//! - [`positional`]: the positional encodings of the seed's ablation (global, local, standard,
//!   info+standard, none).
//!
//! The crate is I/O-free: no Zarr, no tensors, no async runtime. Everything here is deterministic
//! and computed in `f64` before being handed out as `f32`.

pub mod calendar;
pub mod error;
pub mod geometry;
pub mod positional;
pub mod token_info;

pub use error::{ProtoError, Result};
pub use geometry::{FieldGeometry, TokenGeometry};
pub use positional::{GlobalOffsets, PeInputs, PeMode};
pub use token_info::{TOKEN_INFO_LEN, TokenInfo, WindowCoords};
