//! `atmorep-loader` owns everything on the storage side of atmorep-rs: opening ERA5 Zarr stores on
//! any object store, discovering their layout from metadata, presenting one canonical view
//! (time, level, latitude north→south, longitude 0→360 east), reading hyperslabs through a shared
//! memory-bounded cache of decoded chunks, writing synthetic ERA5-like stores, and benchmarking
//! the storage they live on.

pub mod bench_pipeline;
pub mod bench_storage;
pub mod blur;
pub mod cache;
pub mod cf_time;
pub mod dataset;
pub mod discovery;
pub mod epoch;
pub mod error;
pub mod hyperslab;
pub mod inspect;
pub mod local_stats;
pub mod location;
pub mod masking;
pub mod normalization;
pub mod pipeline;
pub mod sampler;
pub mod service;
pub mod stats;
pub mod synth;
pub mod tokenizer;
pub mod writer;

pub use cache::ChunkCache;
pub use dataset::{Dataset, Layout, Variable};
pub use error::{Result, StoreError};
pub use hyperslab::Hyperslab;
pub use location::StoreLocation;
