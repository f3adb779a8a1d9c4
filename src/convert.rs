//! `atmorep loader convert`: ERA5 NetCDF and GRIB files from the Copernicus Climate Data Store
//! into a Zarr store (docs/convert.md). The readers need libnetcdf and libeccodes, so they come
//! with the `era5-files` feature; without it the command says how to get them.

use std::path::PathBuf;

use anyhow::Result;
use atmorep_loader::store::zarr_meta::Codec;
use clap::Args;

#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// Input files: GRIB (editions 1 and 2) and NetCDF (3 classic, 4/HDF5), in any order.
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
    /// The store to write (replaced if it exists, unless --append).
    #[arg(long)]
    out: PathBuf,
    /// Chunk shape time,level,lat,lon (default: 1,all levels,the globe, as ARCO-ERA5).
    #[arg(long, value_delimiter = ',')]
    chunks: Option<Vec<u64>>,
    /// blosc-lz4, blosc-lz4-bitshuffle, blosc-zstd, blosc-zstd-bitshuffle, zstd, gzip, none.
    #[arg(long, default_value = "blosc-lz4")]
    codec: Codec,
    /// Only these variables (ERA5 short names as in the files, e.g. `t,z`; default: all).
    #[arg(long, value_delimiter = ',')]
    variables: Vec<String>,
    /// The ensemble member (`number`) to read from files with several (refused without it).
    #[arg(long)]
    member: Option<i64>,
    /// Extend the existing store at --out with later times instead of replacing it.
    #[arg(long)]
    append: bool,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

#[cfg(feature = "era5-files")]
pub async fn convert(args: ConvertArgs) -> Result<()> {
    use atmorep_loader::convert::{ConvertOptions, Selection, convert};

    let options = ConvertOptions {
        selection: Selection {
            variables: args.variables,
            member: args.member,
        },
        chunks: crate::shape4("chunks", args.chunks)?,
        codec: args.codec,
        append: args.append,
    };
    let (inputs, out, quiet) = (args.inputs, args.out, args.quiet);
    let report = tokio::task::spawn_blocking(move || {
        convert(&inputs, &out, &options, &crate::bars::Bars::new(!quiet))
    })
    .await??;
    println!(
        "wrote {} ({} from {} file(s): {} steps × {} levels × {} × {}; {} steps in the store)",
        report.store.display(),
        report.variables.join(", "),
        report.files,
        report.new_steps,
        report.levels.max(1),
        report.grid.0,
        report.grid.1,
        report.total_steps
    );
    println!(
        "{:.1} MB of values from {:.1} MB of files in {:.2} s: {:.1} MB/s",
        report.value_bytes as f64 / 1e6,
        report.input_bytes as f64 / 1e6,
        report.seconds,
        report.throughput_mb_s()
    );
    Ok(())
}

#[cfg(not(feature = "era5-files"))]
pub async fn convert(args: ConvertArgs) -> Result<()> {
    let _ = args;
    anyhow::bail!(
        "this atmorep was built without NetCDF and GRIB support: rebuild with \
         `--features era5-files` (Debian/Ubuntu: apt-get install libnetcdf-dev libeccodes-dev \
         libclang-dev pkg-config; docs/convert.md)"
    )
}
