//! The `atmorep` command line: thin argument parsing over the atmorep-rs libraries.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use atmorep_loader::pipeline::normalization::{
    GLOBAL_FILE, GlobalStats, LOCAL_STORE, LocalStats, StatsSubset,
};
use atmorep_loader::store::zarr_meta::{Codec, ZarrFormat};
use atmorep_loader::tools::bench_pipeline::{self, reference_config};
use atmorep_loader::tools::bench_storage::{BenchChart, BenchConfig, run_bench};
use atmorep_loader::tools::inspect::{inspect, statistics_beside};
use atmorep_loader::tools::synth::{SynthConfig, write_store};
use atmorep_loader::{Dataset, Layout};
use atmorep_plot::{Bar, Series, lines_and_bars};
use atmorep_proto::calendar::parse_iso;
use clap::{Args, Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use bars::Bars;

#[cfg(feature = "trainer")]
mod ablate;
mod bars;
#[cfg(feature = "trainer")]
mod child;
mod convert;
#[cfg(feature = "trainer")]
mod demo;
#[cfg(feature = "trainer")]
mod embed;
#[cfg(feature = "trainer")]
mod eval;
#[cfg(feature = "trainer")]
mod infer;
#[cfg(feature = "trainer")]
mod plot;
mod pull;
#[cfg(feature = "trainer")]
mod saved_run;
mod serve;
#[cfg(feature = "track")]
mod track;
#[cfg(feature = "trainer")]
mod train;

// Decoding allocates and frees many multi-megabyte chunk buffers; mimalloc reuses them instead of
// returning pages to the OS and faulting them in again (tuned in `tune_allocator`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay` and `mi_option_allow_thp` (v3 option indices).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
const MI_OPTION_ALLOW_THP: libmimalloc_sys::mi_option_t = 43;

/// Tunes the allocator for the loader's buffers, unless the user's `MIMALLOC_*` variables say
/// otherwise (the measurements behind both: docs/performance.md#memory-and-the-allocator).
///
/// - **Purge delay** (`purge_delay_ms`, -1 = never). mimalloc returns freed memory to the OS 10 ms
///   after the last free by default. The loader frees and reallocates multi-megabyte chunk and
///   token buffers every few milliseconds, so each one came back as fresh pages the kernel had to
///   zero: ten seconds cover that, and a group cut's per-sample allocations a block (about a
///   second) apart. A model step frees its activations and gradients at its end
///   and allocates the same sizes again in the next step, seconds later: for the model's commands
///   freed memory is kept (the working set is the same every step).
/// - **Transparent huge pages off, unless asked for** (`--huge-pages`, or `MIMALLOC_ALLOW_THP=1`).
///   mimalloc asks for huge pages on its arenas (`madvise`), so each small allocation in a fresh
///   2 MiB region makes 2 MiB resident and freed memory comes back only in whole huge pages: the
///   eight-client service test peaks at 144 MiB with them against 67–77 without. A loader
///   cutting whole time blocks at once writes all over a gigabyte of sample buffers, and there
///   huge pages save TLB misses and page faults: `--huge-pages` keeps mimalloc's default and the
///   sample buffers advise huge pages themselves (`atmorep_proto::huge_pages`), measured in
///   docs/performance.md#huge-pages. Off, mimalloc reads its option when it starts, before
///   `main`, so this also does what it would then have done: mark the process THP-disabled
///   (`PR_SET_THP_DISABLE`, which covers mappings made earlier too).
fn tune_allocator(purge_delay_ms: std::ffi::c_long, huge_pages: bool) {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets a process-wide integer option of the allocator linked above; mimalloc
        // documents `mi_option_set` as callable at any time from any thread.
        #[allow(unsafe_code)]
        unsafe {
            libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, purge_delay_ms);
        }
    }
    if !huge_pages && std::env::var_os("MIMALLOC_ALLOW_THP").is_none() {
        // SAFETY: as above.
        #[allow(unsafe_code)]
        unsafe {
            libmimalloc_sys::mi_option_set(MI_OPTION_ALLOW_THP, 0);
        }
        #[cfg(target_os = "linux")]
        // SAFETY: PR_SET_THP_DISABLE takes integer arguments only and changes a flag of this
        // process's memory map; it cannot invalidate any memory.
        #[allow(unsafe_code)]
        unsafe {
            libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
        }
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "atmorep",
    version,
    about = "ERA5 Zarr → token batches → AtmoRep-style training"
)]
struct Cli {
    /// Back large buffers with transparent huge pages where the system allows them: faster
    /// group cuts (fewer TLB misses and page faults), more resident memory for small
    /// allocations (docs/performance.md#huge-pages).
    #[arg(long, global = true)]
    huge_pages: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The whole system on this machine: synthetic ERA5, statistics, the loader on loopback and
    /// a client streaming an epoch over gRPC.
    #[cfg(feature = "trainer")]
    Demo(demo::DemoArgs),
    /// The storage side: inspect, synthesize and benchmark ERA5 Zarr stores.
    Loader {
        #[command(subcommand)]
        command: LoaderCommand,
    },
    /// Train the multiformer on batches streamed from loaders; checkpoints, metrics, --resume.
    #[cfg(feature = "trainer")]
    Train(train::TrainArgs),
    /// Track tropical cyclones in a loader's global tiles (`track eval`: score tracks).
    #[cfg(feature = "track")]
    Track(track::TrackArgs),
    /// Score a checkpoint on a held-out split: masked-token RMSE in physical units against
    /// climatology, persistence and interpolation.
    #[cfg(feature = "trainer")]
    Eval(eval::EvalArgs),
    /// Global inference: the model's prediction of every token of the loader's global tiles,
    /// stitched and written as a Zarr store the loader can serve.
    #[cfg(feature = "trainer")]
    Infer(infer::InferArgs),
    /// Export the encoder's embedding of every token of a split's samples to Zarr.
    #[cfg(feature = "trainer")]
    Embed(embed::EmbedArgs),
    /// Pictures: attention maps, token evolution, training curves, fields on a map.
    #[cfg(feature = "trainer")]
    Plot(plot::PlotArgs),
    /// Ablation studies: train variants of one config (aux info, positional encoding, blur) on
    /// the same stream and compare them against the baselines (`--quick`: a built-in one).
    #[cfg(feature = "trainer")]
    Ablate(ablate::AblateArgs),
}

impl Command {
    /// The allocator's purge delay for this command ([`tune_allocator`]): never for the model's
    /// own commands, one second for the loader and the commands that run one in-process.
    fn purge_delay_ms(&self) -> std::ffi::c_long {
        match self {
            #[cfg(feature = "trainer")]
            Command::Train(_)
            | Command::Eval(_)
            | Command::Infer(_)
            | Command::Embed(_)
            | Command::Ablate(_) => -1,
            _ => 10_000,
        }
    }
}

#[derive(Debug, Subcommand)]
enum LoaderCommand {
    /// Describe a store: variables, dims, chunking, codecs, time, grid, levels, sizes.
    Inspect {
        /// Store URL or path (file://, s3://, gs://, az://, http(s)://).
        url: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Also read every variable fully and print count/mean/std/min/max.
        #[arg(long)]
        stats: bool,
    },
    /// Compute global normalization statistics (per field, level, year and month) as Parquet.
    Stats {
        /// Store URL or path.
        url: String,
        /// Output folder (default for a local store: `STORE.stats` beside it).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Recompute even when the folder already holds statistics of this store.
        #[arg(long)]
        force: bool,
        /// Also compute per-grid-point monthly statistics (`local_stats.zarr`).
        #[arg(long)]
        local: bool,
        #[command(flatten)]
        subset: StatsSubsetArgs,
    },
    /// Write a synthetic ERA5-like store (and its cyclone tracks as CSV beside it).
    Synth(SynthArgs),
    /// Convert ERA5 NetCDF and GRIB files (as the Copernicus data store delivers them) into a
    /// Zarr v3 store (feature `era5-files`).
    Convert(convert::ConvertArgs),
    /// Measure object GETs vs concurrency, decode speed per codec and hyperslab reads.
    BenchStorage(BenchArgs),
    /// Serve datasets over gRPC until SIGTERM or Ctrl-C.
    Serve(serve::ServeArgs),
    /// Consume a loader stream in this process and report throughput (and check an epoch).
    Pull(pull::PullArgs),
    /// Run the sample pipeline in-process and compare it with the decode limit.
    BenchPipeline {
        /// Store URL or path.
        url: String,
        /// Pipeline request as TOML (default: two fields × 5 levels, AtmoRep geometry).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Fields of the default request.
        #[arg(long, value_delimiter = ',', default_value = "t,z")]
        fields: Vec<String>,
        /// Statistics folder (default: `STORE.stats`, computed if missing).
        #[arg(long)]
        stats: Option<PathBuf>,
        /// Decoded-chunk cache in MiB.
        #[arg(long, default_value_t = 4096)]
        cache_mib: u64,
        /// Samples to run per epoch (default: all).
        #[arg(long)]
        samples: Option<u64>,
        /// Epochs to run, each reported on its own: the first in a fresh process, the others
        /// with its buffers reused.
        #[arg(long, default_value_t = 2)]
        epochs: u64,
        /// Samples in flight.
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        /// Read small parts of blosc chunks block by block (`on`), whole chunks only (`off`),
        /// or run each epoch both ways, whole chunks first (`both`).
        #[arg(long, value_enum, default_value = "on")]
        block_reads: BlockReadsArg,
        /// Cut a time block's samples at once where the request allows (`group`), each sample
        /// on its own (`sample`), or run each epoch both ways, sample by sample first (`both`).
        #[arg(long, value_enum, default_value = "group")]
        cut: CutArg,
        /// Skip the decode limit after each epoch (for a profile of the pipeline alone).
        #[arg(long)]
        no_decode_limit: bool,
    },
}

/// `bench-pipeline --cut`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum CutArg {
    Group,
    Sample,
    Both,
}

/// `bench-pipeline --block-reads`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum BlockReadsArg {
    On,
    Off,
    Both,
}

/// Global statistics of a part of the store (docs/loader.md, "Statistics of a subset").
#[derive(Debug, Args)]
struct StatsSubsetArgs {
    /// First time step to consider (ISO date or date-time, UTC); default: the store's first.
    #[arg(long)]
    start: Option<String>,
    /// Last time step to consider (inclusive); default: the store's last.
    #[arg(long)]
    end: Option<String>,
    /// Read every K-th time step of the range (pick K coprime with the steps per day, e.g. 25
    /// or 7 for hourly data, so that every hour of the day is sampled).
    #[arg(long, default_value_t = 1)]
    every_steps: usize,
    /// Variables (either ERA5 name); default: all.
    #[arg(long, value_delimiter = ',')]
    variables: Vec<String>,
    /// Levels of the variables with levels; default: all.
    #[arg(long, value_delimiter = ',')]
    levels: Vec<f64>,
}

impl StatsSubsetArgs {
    fn to_subset(&self) -> Result<StatsSubset> {
        let time = |flag: &str, text: &Option<String>| -> Result<Option<i64>> {
            text.as_deref()
                .map(|t| {
                    parse_iso(t).with_context(|| format!("--{flag} `{t}` is not an ISO 8601 time"))
                })
                .transpose()
        };
        if self.every_steps == 0 {
            bail!("--every-steps must be at least 1");
        }
        Ok(StatsSubset {
            start: time("start", &self.start)?,
            end: time("end", &self.end)?,
            every_steps: self.every_steps,
            variables: self.variables.clone(),
            levels: self.levels.clone(),
        })
    }
}

#[derive(Debug, Args)]
struct SynthArgs {
    /// Output directory (replaced if it exists).
    out: PathBuf,
    /// Grid spacing in degrees (0.25 = ERA5).
    #[arg(long, default_value_t = 1.0)]
    grid: f64,
    /// First time step (UTC, RFC 3339).
    #[arg(long, default_value = "2020-09-01T00:00:00Z")]
    start: String,
    /// Number of time steps.
    #[arg(long, default_value_t = 49)]
    steps: usize,
    /// Hours between time steps.
    #[arg(long, default_value_t = 3)]
    step_hours: u32,
    /// Pressure levels in hPa.
    #[arg(long, value_delimiter = ',', default_value = "850,500,300")]
    levels: Vec<u32>,
    /// Variables (ERA5 short names: z, t, u, v, vo, d).
    #[arg(long, value_delimiter = ',', default_value = "z,t,u,v,vo,d")]
    variables: Vec<String>,
    /// Zarr format: 2 or 3.
    #[arg(long, default_value = "2")]
    format: ZarrFormat,
    /// Layout: per-variable (xarray/CF) or atmorep (one stacked `data` array).
    #[arg(long, default_value = "per-variable", value_parser = parse_layout)]
    layout: Layout,
    /// Chunk shape time,level,lat,lon (default: 1,1,full globe; AtmoRep: 8,all,full globe).
    #[arg(long, value_delimiter = ',')]
    chunks: Option<Vec<u64>>,
    /// blosc-lz4, blosc-lz4-bitshuffle, blosc-zstd, blosc-zstd-bitshuffle, zstd, gzip, none.
    #[arg(long, default_value = "blosc-lz4")]
    codec: Codec,
    /// Zarr v3 sharding: inner chunk shape time,level,lat,lon (the chunks become shards).
    #[arg(long, value_delimiter = ',')]
    shard: Option<Vec<u64>>,
    /// Name the arrays by ERA5's long names (temperature, vorticity, …) as ARCO-ERA5 does.
    #[arg(long)]
    long_names: bool,
    /// Number of tropical cyclones.
    #[arg(long, default_value_t = 2)]
    cyclones: usize,
    /// Random seed.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// From this time on (UTC, RFC 3339; e.g. a training split's end) the store holds storms
    /// and wave phases the earlier steps never saw: out-of-sample tests (docs/model.md).
    #[arg(long)]
    unseen_after: Option<String>,
}

#[derive(Debug, Args)]
struct BenchArgs {
    /// Store URL or path.
    url: String,
    /// Folder for the Parquet table and PNG plot.
    #[arg(long, default_value = "bench-storage")]
    out: PathBuf,
    /// Variable for the hyperslab reads (default: the first).
    #[arg(long)]
    variable: Option<String>,
    /// Time steps per hyperslab block read.
    #[arg(long, default_value_t = 36)]
    block: usize,
    /// Repetitions per measurement (the best is reported).
    #[arg(long, default_value_t = 3)]
    repeats: usize,
}

fn parse_layout(s: &str) -> Result<Layout, String> {
    match s {
        "per-variable" | "xarray" | "cf" => Ok(Layout::PerVariable),
        "atmorep" => Ok(Layout::Atmorep),
        _ => Err(format!("layout `{s}`: expected per-variable or atmorep")),
    }
}

fn shape4(name: &str, v: Option<Vec<u64>>) -> Result<Option<[u64; 4]>> {
    v.map(|v| {
        <[u64; 4]>::try_from(v.as_slice())
            .with_context(|| format!("--{name} needs four numbers: time,level,lat,lon"))
    })
    .transpose()
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    tune_allocator(cli.command.purge_delay_ms(), cli.huge_pages);
    // Storage reads run on tokio's blocking pool (object_store's local files), where every thread
    // keeps an allocator heap of its own: tokio's default of 512 threads let a burst of reads
    // hold tens of MiB of idle heaps. A few threads per core keep the disks just as busy.
    let cores = std::thread::available_parallelism().map_or(2, usize::from);
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(BLOCKING_THREADS_PER_CORE * cores)
        .build()
        .context("starting the tokio runtime")?
        .block_on(run(cli))
}

/// Blocking-pool threads per core (file reads and other blocking calls).
const BLOCKING_THREADS_PER_CORE: usize = 4;

async fn run(cli: Cli) -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match cli.command {
        #[cfg(feature = "trainer")]
        Command::Demo(args) => demo::demo(args).await,
        Command::Loader { command } => loader(command).await,
        #[cfg(feature = "trainer")]
        Command::Train(args) => train::train(args).await,
        #[cfg(feature = "track")]
        Command::Track(args) => track::track(args).await,
        #[cfg(feature = "trainer")]
        Command::Eval(args) => eval::eval(args).await.map(drop),
        #[cfg(feature = "trainer")]
        Command::Infer(args) => infer::infer(args).await.map(drop),
        #[cfg(feature = "trainer")]
        Command::Embed(args) => embed::embed(args).await.map(drop),
        #[cfg(feature = "trainer")]
        Command::Plot(args) => plot::plot(args).await,
        #[cfg(feature = "trainer")]
        Command::Ablate(args) => ablate::ablate(args).await.map(drop),
    }
}

async fn loader(command: LoaderCommand) -> Result<()> {
    match command {
        LoaderCommand::Serve(args) => serve::serve(args).await?,
        LoaderCommand::Pull(args) => pull::pull(args).await?,
        LoaderCommand::Convert(args) => convert::convert(args).await?,
        LoaderCommand::Inspect { url, json, stats } => {
            let dataset = Dataset::open(&url).await?;
            let mut report = inspect(&dataset, stats, &Bars::new(!json)).await?;
            if std::path::Path::new(&url).exists() {
                report.statistics = statistics_beside(std::path::Path::new(&url));
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.to_text());
            }
        }
        LoaderCommand::Stats {
            url,
            out,
            force,
            local,
            subset,
        } => {
            let subset = subset.to_subset()?;
            let out = match out {
                Some(dir) => dir,
                None if std::path::Path::new(&url).exists() => {
                    GlobalStats::default_dir(std::path::Path::new(&url))
                }
                None => bail!("--out is needed for a remote store"),
            };
            let dataset = Dataset::open(&url).await?;
            let (stats, computed) =
                GlobalStats::compute_subset_into(&dataset, &out, force, &subset, &Bars::new(true))
                    .await?;
            let rows = stats.iter().count();
            if local {
                let path = out.join(LOCAL_STORE);
                if force || !path.join("zarr.json").exists() {
                    LocalStats::compute(&dataset, &[], &Bars::new(true))
                        .await?
                        .write(&path)?;
                    println!("wrote per-point monthly statistics to {}", path.display());
                }
            }
            if let Some(c) = stats.coverage() {
                println!("statistics cover {c}");
            }
            if computed {
                println!("wrote {rows} rows to {}", out.join(GLOBAL_FILE).display());
            } else {
                println!(
                    "{} already holds statistics of {url} ({rows} rows); --force recomputes",
                    out.display()
                );
            }
        }
        LoaderCommand::Synth(args) => {
            let start = parse_iso(&args.start)
                .with_context(|| format!("--start `{}` is not an ISO 8601 time", args.start))?;
            let cfg = SynthConfig {
                grid_deg: args.grid,
                start_unix: start,
                steps: args.steps,
                step_hours: args.step_hours,
                levels: args.levels,
                variables: args.variables,
                format: args.format,
                layout: args.layout,
                chunks: shape4("chunks", args.chunks)?,
                codec: args.codec,
                shard_inner: shape4("shard", args.shard)?,
                long_names: args.long_names,
                cyclones: args.cyclones,
                seed: args.seed,
                unseen_after_hours: args
                    .unseen_after
                    .as_deref()
                    .map(|t| {
                        parse_iso(t)
                            .map(|u| (u - start) as f64 / 3600.0)
                            .with_context(|| format!("--unseen-after {t}"))
                    })
                    .transpose()?,
            };
            let started = std::time::Instant::now();
            let summary =
                tokio::task::spawn_blocking(move || write_store(&cfg, &args.out, &Bars::new(true)))
                    .await??;
            let [nt, nl, ny, nx] = summary.shape;
            println!(
                "wrote {} ({nt} steps × {nl} levels × {ny} × {nx}, {:.1} MB decoded) in {:.1} s",
                summary.store.display(),
                summary.decoded_bytes as f64 / 1e6,
                started.elapsed().as_secs_f64()
            );
            println!(
                "cyclone tracks: {} ({} storms)",
                summary.tracks_csv.display(),
                summary.cyclones.len()
            );
        }
        LoaderCommand::BenchPipeline {
            url,
            config,
            fields,
            stats,
            cache_mib,
            samples,
            epochs,
            concurrency,
            block_reads,
            cut,
            no_decode_limit,
        } => {
            let request = match config {
                Some(path) => {
                    let text = std::fs::read_to_string(&path)
                        .with_context(|| format!("cannot read {}", path.display()))?;
                    toml::from_str(&text)
                        .with_context(|| format!("bad request in {}", path.display()))?
                }
                None => {
                    let dataset = Dataset::open(&url).await?;
                    let [a, b] = <[String; 2]>::try_from(fields)
                        .map_err(|_| anyhow::anyhow!("--fields needs exactly two names"))?;
                    let levels = dataset.variable(&a)?.levels.clone();
                    reference_config([a.as_str(), b.as_str()], levels, dataset.times.len())
                }
            };
            let reports = bench_pipeline::run(
                &url,
                request,
                stats.as_deref(),
                cache_mib << 20,
                samples,
                epochs,
                concurrency,
                match block_reads {
                    BlockReadsArg::On => bench_pipeline::BlockReads::On,
                    BlockReadsArg::Off => bench_pipeline::BlockReads::Off,
                    BlockReadsArg::Both => bench_pipeline::BlockReads::Both,
                },
                match cut {
                    CutArg::Group => bench_pipeline::Cut::Group,
                    CutArg::Sample => bench_pipeline::Cut::Sample,
                    CutArg::Both => bench_pipeline::Cut::Both,
                },
                !no_decode_limit,
                &Bars::new(true),
            )
            .await?;
            for report in reports {
                print!("{}", report.to_text());
            }
        }
        LoaderCommand::BenchStorage(args) => {
            if args.block == 0 || args.repeats == 0 {
                bail!("--block and --repeats must be positive");
            }
            let report = run_bench(
                &BenchConfig {
                    url: args.url,
                    out: args.out,
                    variable: args.variable,
                    block: args.block,
                    repeats: args.repeats,
                },
                &Bars::new(true),
            )
            .await?;
            draw_bench_storage(&report.png, &report.chart())?;
            print!("{}", report.to_text());
        }
    }
    Ok(())
}

/// The bench-storage chart: GET throughput against concurrency beside bars of the decode and
/// hyperslab read rates.
fn draw_bench_storage(png: &std::path::Path, chart: &BenchChart) -> Result<()> {
    let get = Series {
        name: "object GET".into(),
        points: chart.get_throughput.clone(),
    };
    let bars: Vec<Bar> = chart
        .rates
        .iter()
        .map(|(label, value)| Bar {
            label: label.clone(),
            value: *value,
        })
        .collect();
    lines_and_bars(
        png,
        (1600, 700),
        &chart.title,
        "GET throughput vs concurrency",
        "requests in flight",
        "GB/s (encoded)",
        &[get],
        "decode (1 core) and hyperslab reads",
        "GB/s (decoded values)",
        &bars,
    )?;
    Ok(())
}
