//! The cross-process tests of atmorep-rs, in one test binary: the real `atmorep` binary (which
//! cargo builds with the features under test before it runs these) as loaders, trainers,
//! trackers and plotters, talking to each other over loopback gRPC and to the in-process S3
//! server of `atmorep-testkit`. A module per subject.

mod ablate;
mod block_reads;
mod contained;
// ERA5 NetCDF and GRIB conversion: needs libnetcdf and libeccodes (`.ci/run` installs them).
#[cfg(feature = "era5-files")]
mod convert;
mod deploy;
mod faults;
mod fuzz_seeds;
mod group_cut;
mod hostile;
mod infer;
mod loaders;
// Data-parallel training under `mpirun`: needs OpenMPI (`.ci/run` installs it from Debian).
#[cfg(feature = "mpi")]
mod mpi;
mod plot;
mod public_stores;
mod s3_faults;
mod s3_server;
mod s3_store;
mod scores;
mod service;
mod store_changes;
mod track;
mod train;
