//! `atmorep eval`: scores a checkpoint on a held-out split of the loader's stream — masked-token
//! RMSE per task, field and level in physical units beside the training split's per-point
//! climatology, the global mean, persistence and interpolation, each with a 95 % bootstrap
//! interval — as a table on stdout (or JSON) and a Parquet file.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use atmorep_trainer::collective::SingleProcess;
use atmorep_trainer::eval::{self, EvalOptions, EvalRow};
use atmorep_trainer::{DeviceSpec, Trainer, checkpoint};

use crate::saved_run::{SavedRun, connect, parse_split};
use clap::Args;

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// A checkpoint folder, or a run folder (its latest checkpoint).
    ckpt: PathBuf,
    /// Loader endpoint(s), comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    loader: Vec<String>,
    /// The time split to score: train, validation or test.
    #[arg(long, default_value = "test")]
    split: String,
    /// Batches per task at most (fewer when the split's epoch is shorter).
    #[arg(long, default_value_t = 32)]
    batches: u64,
    /// The Parquet report (default: `eval-SPLIT.parquet` in the checkpoint folder).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Print the rows as JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Bearer token for the loaders.
    #[arg(long, env = "ATMOREP_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Where the model computes: `cpu`, or `cuda` (GPU 0) / `cuda:N` in a build with the `cuda`
    /// feature.
    #[arg(long, env = "ATMOREP_DEVICE", default_value = "cpu")]
    device: DeviceSpec,
}

/// [`SavedRun::load`] with the model on `device` (for `eval` and `embed`): the checkpoint's
/// tensors are loaded straight onto it.
pub(crate) fn load_on(path: &Path, device: DeviceSpec) -> Result<SavedRun> {
    let device = device.open()?;
    let ckpt = checkpoint::load(path, &device)?;
    let (dir, step) = (ckpt.dir.clone(), ckpt.step);
    let trainer = Trainer::from_checkpoint_in(ckpt, None, Box::new(SingleProcess), &device)?;
    Ok(SavedRun { dir, step, trainer })
}

pub async fn eval(args: EvalArgs) -> Result<Vec<EvalRow>> {
    let split = parse_split(&args.split)?;
    let SavedRun { dir, step, trainer } = load_on(&args.ckpt, args.device)?;
    let client = connect(&args.loader, args.token.as_deref()).await?;
    let scores = eval::evaluate_on(
        trainer.model(),
        trainer.config(),
        &client,
        &EvalOptions {
            split,
            batches: args.batches,
            climatology: None,
        },
        trainer.device(),
    )
    .await
    .with_context(|| format!("evaluating {}", dir.display()))?;
    let rows = scores.rows();
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| dir.join(format!("eval-{}.parquet", args.split)));
    eval::write_parquet(&out, &rows)?;
    if args.json {
        let json: Vec<serde_json::Value> = rows
            .iter()
            .map(|r| {
                serde_json::json!({
                    "task": r.task, "field": r.field, "level": r.level,
                    "baseline": r.baseline.name(), "values": r.values, "samples": r.samples,
                    "model_rmse": r.model_rmse, "model_rmse_ci": r.model_ci,
                    "baseline_rmse": r.baseline_rmse, "baseline_rmse_ci": r.baseline_ci,
                    "skill": r.skill(), "skill_ci": r.skill_ci,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&json)?);
    } else {
        println!(
            "{} at step {step} on the {} split (physical units):",
            dir.display(),
            args.split
        );
        print!("{}", eval::table(&rows));
        println!("report: {}", out.display());
    }
    Ok(rows)
}
