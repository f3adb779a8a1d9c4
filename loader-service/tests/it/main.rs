//! The loader's integration tests, in one test binary: real Zarr stores (written by the
//! synthetic generator, and by xarray + zarr-python for the fixtures) read through the public
//! API. A module per subject.

#[cfg(feature = "era5-files")]
mod convert;
mod fixtures;
mod pipeline;
mod roundtrip;
mod statistics;
mod synth_tracks;
