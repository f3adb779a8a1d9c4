//! `atmorep-loader` owns the server side of atmorep-rs:
//!
//! - [`store`]: ERA5 Zarr stores on any object store — locating and discovering them, one
//!   canonical view (time, level, latitude north→south, longitude 0→360 east), chunk decoding,
//!   hyperslab reads through a shared memory-bounded cache of decoded chunks, and writing stores;
//! - [`pipeline`]: from that view to token samples — normalization, blur, sampling, masking,
//!   seeded resumable epochs, and the batches streamed under a shared memory budget;
//! - [`service`]: the gRPC loader service that serves those batches;
//! - `convert` (feature `era5-files`): ERA5 NetCDF and GRIB files from the Copernicus Climate
//!   Data Store into a Zarr store the loader serves;
//! - [`tools`]: what the `atmorep loader` commands run beside serving — synthetic ERA5-like
//!   stores, store inspection, and storage and pipeline benchmarks.
//!
//! Long jobs report through [`progress::Progress`]; drawing bars is the caller's business.

#[cfg(feature = "era5-files")]
pub mod convert;
pub mod error;
pub mod panic;
pub mod pipeline;
pub mod progress;
pub mod service;
pub mod store;
pub mod tools;

pub use error::{Result, StoreError};
pub use store::cache::ChunkCache;
pub use store::dataset::{Dataset, Layout, Variable};
pub use store::hyperslab::Hyperslab;
pub use store::location::StoreLocation;
