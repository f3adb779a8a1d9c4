//! What the `atmorep loader` commands run beside serving: synthetic ERA5-like stores
//! ([`synth`]), store inspection ([`inspect`]), and the storage and pipeline benchmarks
//! ([`bench_storage`], [`bench_pipeline`]). Nothing here draws: long jobs report through
//! [`crate::progress::Progress`] and charts leave as data.

pub mod bench_pipeline;
pub mod bench_storage;
pub mod inspect;
pub mod synth;
