//! Storage: where a store lives ([`location`]), what its metadata says ([`discovery`],
//! [`cf_time`]), the canonical view of it ([`dataset`]), turning its chunks into values
//! ([`decode`], [`cache`]), reading canonical hyperslabs ([`hyperslab`]) — the windows of many
//! readers at once block by block ([`group_read`]) — and writing Zarr stores
//! ([`zarr_meta`], [`writer`]), with Parquet tables (statistics, benchmark figures) beside them;
//! a store rewritten while served is noticed through the versions of its chunks ([`version`]).

mod block_read;
pub mod blosc_blocks;
pub mod cache;
pub mod cf_time;
pub mod dataset;
pub mod decode;
pub mod discovery;
mod fetch;
pub(crate) mod group_read;
pub mod hyperslab;
pub mod location;
pub mod missing;
pub(crate) mod table;
pub mod version;
pub mod writer;
pub mod zarr_meta;
