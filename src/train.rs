//! `atmorep train`: trains the multiformer on batches streamed from one or more loaders, writes
//! checkpoints and per-step metrics into an output folder, and continues a run with `--resume`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use atmorep_proto::client::{ClientConfig, LoaderClient};
use atmorep_trainer::checkpoint;
use atmorep_trainer::{Device, RunOptions, TrainConfig, Trainer};
use clap::Args;

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
    /// Print tokens/s and the step-time breakdown (data wait, forward, backward, optimizer).
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
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

/// The run folder a checkpoint folder (`RUN/checkpoints/step-N`) belongs to.
fn run_dir_of(checkpoint_dir: &Path) -> Option<PathBuf> {
    let parent = checkpoint_dir.parent()?;
    (parent.file_name()? == checkpoint::DIR).then(|| parent.parent().map(Path::to_path_buf))?
}

pub async fn train(args: TrainArgs) -> Result<()> {
    let config = args
        .config
        .as_deref()
        .map(TrainConfig::from_toml_file)
        .transpose()?;
    let (mut trainer, out) = match &args.resume {
        Some(path) => {
            let ckpt = checkpoint::load(path, &Device::Cpu)?;
            let out = args
                .out
                .clone()
                .or_else(|| run_dir_of(&ckpt.dir))
                .context("--out is needed: the checkpoint is not inside a run folder")?;
            println!("resuming {} at step {}", ckpt.dir.display(), ckpt.step);
            (Trainer::from_checkpoint(ckpt, config)?, out)
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
            (Trainer::new(config)?, out)
        }
    };
    if let Some(addr) = args.metrics_bind {
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
                progress: !args.quiet,
            },
        )
        .await?;
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
        print!("{}", summary.breakdown(skip).to_text());
    }
    Ok(())
}
