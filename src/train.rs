//! `atmorep train`: trains the multiformer on batches streamed from one or more loaders, writes
//! checkpoints and per-step metrics into an output folder, and continues a run with `--resume`.
//!
//! Which shard of the loaders' stream a process trains on: `--rank R --world-size N` for
//! processes launched independently (a Kubernetes indexed Job; each trains alone on its shard),
//! or, built with the `mpi` feature and launched by `mpirun -np N`, the MPI world, whose ranks
//! train one model data-parallel (see `atmorep_trainer::train`); built with the `nccl` feature,
//! `--nccl-root HOST:PORT --rank R --world-size N` makes the N processes one data-parallel run
//! over NCCL, one GPU each, that meet at rank 0's HOST:PORT.
//!
//! `--device` (or `ATMOREP_DEVICE`) says where the model computes: `cpu` (the default), or, in a
//! build with the `cuda` feature, `cuda` / `cuda:N`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use atmorep_proto::client::{ClientConfig, LoaderClient};
use atmorep_trainer::checkpoint;
use atmorep_trainer::collective::{Collective, SingleProcess};
use atmorep_trainer::{DeviceSpec, RunOptions, TrainConfig, Trainer};
use clap::Args;

use crate::bars::StepBar;

/// Forward passes alone timed after a `--bench` run.
const FORWARD_PASSES: usize = 8;

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Training config (TOML; see examples/train.toml). Optional with --resume, which then uses
    /// the checkpoint's.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Loader endpoint(s), comma-separated; the client fails over between them.
    #[arg(long, value_delimiter = ',', required = true)]
    loader: Vec<String>,
    /// Stop once this many optimizer steps have been taken in all (default: the config's
    /// `steps`, which the LR schedule spans either way).
    #[arg(long)]
    steps: Option<u64>,
    /// Output folder for checkpoints and metrics (default: the resumed run's folder, or
    /// `runs/train`).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue from a checkpoint: a checkpoint folder or a run's output folder (its latest).
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Print tokens/s and the step-time breakdown (data wait, forward, backward, optimizer),
    /// then time forward passes alone (as eval and infer run the model) over the last batch.
    #[arg(long)]
    bench: bool,
    /// Batches the client keeps ready per task stream.
    #[arg(long, default_value_t = 4)]
    prefetch: usize,
    /// HTTP/2 flow-control window per loader stream, in KiB: how much encoded data the
    /// transport may hold beyond --prefetch (default: the client's, 8 MiB). Smaller bounds the
    /// trainer's memory for large batches; it is also how far a trainer runs on after its
    /// loader died before it notices and reconnects.
    #[arg(long)]
    stream_window_kib: Option<u32>,
    /// Bearer token for the loaders.
    #[arg(long, env = "ATMOREP_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Serve the training metrics for Prometheus on this address (`/metrics`).
    #[arg(long)]
    metrics_bind: Option<SocketAddr>,
    /// Where the model computes: `cpu`, or `cuda` (GPU 0) / `cuda:N` in a build with the `cuda`
    /// feature. Bit-exact resumes are guaranteed on the CPU.
    #[arg(long, env = "ATMOREP_DEVICE", default_value = "cpu")]
    device: DeviceSpec,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    /// This process's shard of the loaders' stream, in 0 .. --world-size (replaces the
    /// request's `rank`), for processes launched independently. Under `mpirun` the MPI rank.
    #[arg(long, requires = "world_size")]
    rank: Option<u32>,
    /// The number of shards (replaces the request's `world_size`). Under `mpirun` the MPI world
    /// size.
    #[arg(long, requires = "rank")]
    world_size: Option<u32>,
    /// Train one model data-parallel over NCCL with the other ranks of --world-size: rank 0
    /// listens on this HOST:PORT's port and hands the NCCL id to the others, which connect to
    /// it. Each rank uses GPU `LOCAL_RANK` (or rank modulo the node's GPUs).
    #[cfg(feature = "nccl")]
    #[arg(long, requires = "rank", value_name = "HOST:PORT")]
    nccl_root: Option<String>,
    /// How long the ranks wait for each other at the NCCL rendezvous, in seconds.
    #[cfg(feature = "nccl")]
    #[arg(long, default_value_t = 300)]
    nccl_timeout_s: u64,
}

/// How the request is sharded and how the processes train together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// As the config says.
    Config,
    /// Shard `rank` of `world`, trained alone.
    Shard { rank: u32, world: u32 },
    /// One model trained data-parallel by the `world` ranks of an MPI world.
    DataParallel { world: u32 },
}

/// The layout from `--rank`/`--world-size` and the MPI world (`(rank, size)` when launched by
/// `mpirun`).
fn layout(flags: Option<(u32, u32)>, mpi: Option<(u32, u32)>) -> Result<Layout> {
    if let Some((rank, world)) = flags {
        if world == 0 {
            bail!("--world-size must be at least 1");
        }
        if rank >= world {
            bail!("--rank {rank} must be below --world-size {world}");
        }
    }
    match (flags, mpi) {
        (Some(flags), Some(mpi)) if mpi.1 > 1 && flags != mpi => bail!(
            "--rank {} --world-size {} disagree with the MPI world, in which this process is \
             rank {} of {} (leave the flags out under mpirun)",
            flags.0,
            flags.1,
            mpi.0,
            mpi.1
        ),
        (_, Some((_, world))) if world > 1 => Ok(Layout::DataParallel { world }),
        (Some((rank, world)), _) => Ok(Layout::Shard { rank, world }),
        (None, _) => Ok(Layout::Config),
    }
}

impl Layout {
    /// `config` with the request sharded as laid out.
    fn apply(self, mut config: TrainConfig) -> TrainConfig {
        match self {
            Layout::Config => {}
            Layout::Shard { rank, world } => {
                config.request.rank = rank;
                config.request.world_size = world;
            }
            // The trainer streams each rank's own shard of this layout.
            Layout::DataParallel { world } => {
                config.request.rank = 0;
                config.request.world_size = world;
            }
        }
        config
    }
}

/// Whether an MPI launcher (`mpirun`, `srun`) started this process: only then is MPI
/// initialized, so that a plain `atmorep train` of an MPI build runs without one.
#[cfg(feature = "mpi")]
fn launched_by_mpi() -> bool {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"]
        .iter()
        .any(|v| std::env::var_os(v).is_some())
}

pub async fn train(args: TrainArgs) -> Result<()> {
    #[cfg(feature = "nccl")]
    if let Some(root) = args.nccl_root.clone() {
        return train_nccl(args, root).await;
    }
    #[cfg(feature = "mpi")]
    if launched_by_mpi() {
        return train_mpi(args).await;
    }
    train_in(args, Box::new(SingleProcess)).await
}

#[cfg(feature = "mpi")]
async fn train_mpi(args: TrainArgs) -> Result<()> {
    use atmorep_trainer::collective::MpiSession;
    let session = MpiSession::init()?;
    let world = session.world();
    let ranks = world.world_size();
    match train_in(args, Box::new(world)).await {
        Err(e) if ranks > 1 => {
            eprintln!("Error (rank {} of {ranks}): {e:#}", world.rank());
            session.abort(1)
        }
        result => result,
    }
}

/// One rank of an NCCL run. A rank that fails exits; the others then fail in their next
/// collective (NCCL reports the lost peer) or are ended by whatever launched them.
#[cfg(feature = "nccl")]
async fn train_nccl(args: TrainArgs, root: String) -> Result<()> {
    use atmorep_trainer::collective::Nccl;
    let (Some(rank), Some(world)) = (args.rank, args.world_size) else {
        bail!("--nccl-root needs --rank and --world-size");
    };
    let timeout = std::time::Duration::from_secs(args.nccl_timeout_s);
    // The model's GPU, when it computes on one, is also the collective's.
    let gpu = match args.device {
        DeviceSpec::Cuda(n) => Some(n),
        DeviceSpec::Cpu => None,
    };
    let nccl = tokio::task::spawn_blocking(move || Nccl::init(&root, rank, world, gpu, timeout))
        .await
        .context("the NCCL rendezvous task")??;
    train_in(args, Box::new(nccl))
        .await
        .with_context(|| format!("rank {rank} of {world}"))
}

/// The run folder a checkpoint folder (`RUN/checkpoints/step-N`) belongs to.
fn run_dir_of(checkpoint_dir: &Path) -> Option<PathBuf> {
    let parent = checkpoint_dir.parent()?;
    (parent.file_name()? == checkpoint::DIR).then(|| parent.parent().map(Path::to_path_buf))?
}

async fn train_in(args: TrainArgs, collective: Box<dyn Collective>) -> Result<()> {
    let (rank, ranks) = (collective.rank(), collective.world_size());
    let layout = layout(
        args.rank.zip(args.world_size),
        (ranks > 1).then_some((rank, ranks)),
    )?;
    let root = rank == 0;
    let device = args.device.open()?;
    tracing::info!(device = %args.device, "model device");
    let config = args
        .config
        .as_deref()
        .map(TrainConfig::from_toml_file)
        .transpose()?
        .map(|c| layout.apply(c));
    let (mut trainer, out) = match &args.resume {
        Some(path) => {
            let ckpt = checkpoint::load(path, &device)?;
            let out = args
                .out
                .clone()
                .or_else(|| run_dir_of(&ckpt.dir))
                .context("--out is needed: the checkpoint is not inside a run folder")?;
            if root {
                println!("resuming {} at step {}", ckpt.dir.display(), ckpt.step);
            }
            // The layout replaces the checkpoint's own when given; the identity check then
            // names a run resumed with another one.
            let config = match (config, layout) {
                (None, Layout::Config) => None,
                (config, _) => Some(layout.apply(config.unwrap_or_else(|| ckpt.config.clone()))),
            };
            (
                Trainer::from_checkpoint_in(ckpt, config, collective, &device)?,
                out,
            )
        }
        None => {
            let Some(config) = config else {
                bail!("--config is needed unless --resume names a checkpoint");
            };
            let out = args
                .out
                .clone()
                .unwrap_or_else(|| PathBuf::from("runs/train"));
            if checkpoint::has_checkpoints(&out) {
                bail!(
                    "{} already holds a run's checkpoints: continue it with --resume {0} or \
                     choose another --out",
                    out.display()
                );
            }
            (Trainer::new_in(config, collective, &device)?, out)
        }
    };
    // Ranks on one machine cannot share the port; their gauges are rank 0's anyway.
    if let Some(addr) = args.metrics_bind.filter(|_| root) {
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(addr)
            .install()
            .with_context(|| format!("starting the Prometheus endpoint on {addr}"))?;
        tracing::info!(%addr, "Prometheus metrics at /metrics");
    }
    let mut client_config = ClientConfig::new(args.loader.clone());
    client_config.prefetch = args.prefetch;
    if let Some(kib) = args.stream_window_kib {
        // Every task stream has a connection of its own, so the connection needs no more.
        let bytes = kib.saturating_mul(1024).max(64 * 1024);
        client_config.stream_window_bytes = bytes;
        client_config.connection_window_bytes = bytes;
    }
    client_config.bearer_token = args.token.clone();
    let client = LoaderClient::connect(client_config).await?;

    let start = trainer.step();
    let summary = trainer
        .run(
            &client,
            &RunOptions {
                stop_at: args.steps,
                out: Some(out.clone()),
                progress: StepBar::unless(args.quiet),
                forward_passes: if args.bench { FORWARD_PASSES } else { 0 },
            },
        )
        .await?;
    if ranks > 1 {
        // Every rank: that they ended with the same weights can be checked from outside.
        println!(
            "rank {rank} of {ranks}: weights digest {:016x}",
            trainer.weights_digest()?
        );
    }
    if !root {
        return Ok(());
    }
    let losses = summary.losses();
    if let (Some(first), Some(last)) = (losses.first(), losses.last()) {
        println!(
            "steps {}..{}: loss {first:.4} → {last:.4}",
            start + 1,
            trainer.step()
        );
    }
    if let Some(v) = summary.steps.iter().rev().find_map(|s| s.val_loss) {
        println!("last validation loss {v:.4}");
    }
    if let Some(ckpt) = &summary.checkpoint {
        println!("checkpoint: {}", ckpt.display());
    }
    // Each is a pause in which the client reconnected and resumed from its cursor: nothing lost,
    // nothing repeated.
    println!("loader reconnects: {}", summary.reconnects);
    println!(
        "metrics: {}",
        out.join(atmorep_trainer::metrics_log::DIR).display()
    );
    if args.bench {
        // The first steps fill caches and the loader's pipeline; they say little about speed.
        let skip = (summary.steps.len() / 5).min(10);
        let cfg = trainer.config();
        println!(
            "model: d_model {}, {} + {} layers, {} fields × {} tokens; batch {} × {} accumulation",
            cfg.model.d_model,
            cfg.model.encoder_layers,
            cfg.model.decoder_layers,
            cfg.model.fields.len(),
            cfg.tokens_per_sample() / cfg.model.fields.len().max(1) as u64,
            cfg.request.batch_size,
            cfg.optimizer.accumulation
        );
        let per_token = cfg.model.forward_flops_per_sample() / cfg.tokens_per_sample() as f64;
        print!(
            "{}",
            summary.breakdown_with_flops(skip, per_token).to_text()
        );
        if let Some(f) = summary.forward_only {
            // One forward pass, not the step's three (forward, and backward at twice its cost).
            println!(
                "forward only: {:.0} tokens/s, {:.1} GFLOP/s over {} passes of the last batch",
                f.tokens_per_s(),
                per_token * f.tokens_per_s() / 1e9,
                f.passes
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_layout_comes_from_the_flags_or_the_mpi_world() {
        assert_eq!(layout(None, None).unwrap(), Layout::Config);
        assert_eq!(
            layout(Some((2, 3)), None).unwrap(),
            Layout::Shard { rank: 2, world: 3 }
        );
        // An MPI world of one process is no data-parallel run.
        assert_eq!(
            layout(Some((1, 2)), Some((0, 1))).unwrap(),
            Layout::Shard { rank: 1, world: 2 }
        );
        assert_eq!(
            layout(None, Some((1, 4))).unwrap(),
            Layout::DataParallel { world: 4 }
        );
        assert_eq!(
            layout(Some((1, 4)), Some((1, 4))).unwrap(),
            Layout::DataParallel { world: 4 }
        );
        for (flags, mpi, flag) in [
            ((3, 3), None, "--rank 3"),
            ((0, 0), None, "--world-size"),
            ((0, 2), Some((1, 2)), "--rank 0 --world-size 2"),
            ((1, 3), Some((1, 2)), "--rank 1 --world-size 3"),
        ] {
            let e = layout(Some(flags), mpi).unwrap_err().to_string();
            assert!(e.contains(flag), "{e}");
        }
    }

    /// `atmorep train`'s arguments from a command line.
    fn parse(args: &[&str]) -> Result<TrainArgs, clap::Error> {
        use clap::Parser;
        #[derive(Debug, Parser)]
        struct Cli {
            #[command(flatten)]
            train: TrainArgs,
        }
        let line = ["atmorep-train", "--loader", "http://127.0.0.1:1"];
        Cli::try_parse_from(line.iter().chain(args)).map(|c| c.train)
    }

    #[test]
    fn the_device_is_the_cpu_unless_named() {
        if std::env::var_os("ATMOREP_DEVICE").is_none() {
            assert_eq!(parse(&[]).unwrap().device, DeviceSpec::Cpu);
        }
        assert_eq!(parse(&["--device", "cpu"]).unwrap().device, DeviceSpec::Cpu);
        let e = parse(&["--device", "gpu"]).unwrap_err().to_string();
        assert!(e.contains("`gpu`") && e.contains("`cuda:N`"), "{e}");
        let cuda = parse(&["--device", "cuda:1"]);
        if cfg!(feature = "cuda") {
            assert_eq!(cuda.unwrap().device, DeviceSpec::Cuda(1));
        } else {
            let e = cuda.unwrap_err().to_string();
            assert!(
                e.contains("`cuda:1`") && e.contains("--features cuda"),
                "{e}"
            );
        }
    }

    #[test]
    fn a_layout_sets_the_requests_shard() {
        let config = TrainConfig::example();
        let sharded = Layout::Shard { rank: 1, world: 3 }.apply(config.clone());
        assert_eq!((sharded.request.rank, sharded.request.world_size), (1, 3));
        let dp = Layout::DataParallel { world: 2 }.apply(sharded);
        assert_eq!((dp.request.rank, dp.request.world_size), (0, 2));
        assert_eq!(Layout::Config.apply(config.clone()), config);
    }
}
