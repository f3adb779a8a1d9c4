//! `atmorep ablate`: trains every variant of an ablation config for the same budget on the same
//! loader stream from each of its model seeds, evaluates each run on the same unblurred test
//! batches against the baselines, and writes a
//! markdown table, Parquet, a bar chart and the overlaid loss curves. `--quick` brings its own
//! synthetic store and loader process (examples/ablation-quick.toml).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use atmorep_loader::Dataset;
use atmorep_loader::pipeline::normalization::GlobalStats;
use atmorep_loader::progress::NoProgress;
use atmorep_loader::tools::synth::{SynthConfig, write_store};
use atmorep_plot::ablation::{bar_chart, loss_chart};
use atmorep_proto::client::{ClientConfig, LoaderClient};
use atmorep_trainer::ablation::{AblationConfig, AblationReport, SeedRun, VariantResult};
use atmorep_trainer::eval::{EvalOptions, FieldLayout, evaluate};
use atmorep_trainer::{RunOptions, Trainer};
use clap::Args;

use crate::bars::Bars;
use crate::bars::StepBar;
use crate::child::{Guard, start_loader};

/// The `--quick` ablation (its base config serves dataset `quick`).
const QUICK: &str = include_str!("../examples/ablation-quick.toml");

#[derive(Debug, Args)]
pub struct AblateArgs {
    /// Ablation config (TOML; see examples/ablation-quick.toml).
    #[arg(long, required_unless_present = "quick", conflicts_with = "quick")]
    config: Option<PathBuf>,
    /// The built-in quick ablation (ten variants of a small model, under 15 minutes on 2 CPU
    /// cores): writes a synthetic store into --out and serves it from its own loader process.
    #[arg(long)]
    quick: bool,
    /// Loader endpoint(s), comma-separated (needed with --config).
    #[arg(long, value_delimiter = ',')]
    loader: Vec<String>,
    /// Output folder: the table, Parquet, charts, and each variant's run under `runs/`.
    #[arg(long, default_value = "ablation")]
    out: PathBuf,
    /// Optimizer steps per variant (overrides the config's).
    #[arg(long)]
    steps: Option<u64>,
    /// Only the variants with these names (comma-separated; `base` is always run).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Bearer token for the loaders.
    #[arg(long, env = "ATMOREP_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// No progress bars.
    #[arg(long)]
    quiet: bool,
}

/// Writes the quick ablation's synthetic store and statistics under `out` and serves it from a
/// loader process; returns the process and its endpoint.
async fn quick_loader(out: &Path, quiet: bool) -> Result<(Guard, String)> {
    let store = out.join("quick.zarr");
    if !store.join(".zattrs").exists() && !store.join("zarr.json").exists() {
        println!("synthetic store → {}", store.display());
        let synth = SynthConfig {
            grid_deg: 2.0,
            steps: 121,
            step_hours: 6,
            levels: vec![850, 500],
            variables: ["t", "z"].map(String::from).to_vec(),
            ..SynthConfig::default()
        };
        let written = store.clone();
        tokio::task::spawn_blocking(move || write_store(&synth, &written, &NoProgress))
            .await?
            .context("writing the synthetic store")?;
    }
    let url = store.to_str().context("non-UTF-8 path")?.to_string();
    let dataset = Dataset::open(&url).await?;
    GlobalStats::compute_into(
        &dataset,
        &GlobalStats::default_dir(&store),
        false,
        &Bars::new(!quiet),
    )
    .await?;
    let log = out.join("loader.log");
    let (guard, endpoint) = start_loader(&[("quick", &store)], &log)?;
    println!("loader {endpoint} (log: {})", log.display());
    Ok((guard, endpoint))
}

/// A variant's name as a folder name.
fn folder_name(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

pub async fn ablate(args: AblateArgs) -> Result<AblationReport> {
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let mut config = match &args.config {
        Some(path) => AblationConfig::from_toml_file(path)?,
        None => AblationConfig::from_toml_str(QUICK, None)?,
    };
    if args.steps.is_some() {
        config.steps = args.steps;
    }
    config.validate()?;
    let mut variants = config.expand();
    if !args.only.is_empty() {
        for name in &args.only {
            if !variants.iter().any(|v| &v.name == name) {
                bail!(
                    "--only: no variant `{name}` (the config has {})",
                    variants
                        .iter()
                        .map(|v| v.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
        }
        variants.retain(|v| v.name == "base" || args.only.contains(&v.name));
    }
    let (_loader, endpoints) = if args.quick {
        if !args.loader.is_empty() {
            bail!("--quick serves its own store: leave out --loader");
        }
        let (guard, endpoint) = quick_loader(&args.out, args.quiet).await?;
        (Some(guard), vec![endpoint])
    } else {
        if args.loader.is_empty() {
            bail!("--loader is needed with --config");
        }
        (None, args.loader.clone())
    };
    let mut client_config = ClientConfig::new(endpoints);
    client_config.bearer_token = args.token.clone();
    let client = LoaderClient::connect(client_config).await?;

    let resolved = args.out.join("ablation.toml");
    std::fs::write(
        &resolved,
        toml::to_string(&config).context("writing the ablation config")?,
    )?;
    let steps = config.steps.unwrap_or(config.base.steps);
    let mut report = AblationReport {
        fields: config
            .base
            .model
            .fields
            .iter()
            .map(|f| f.name.clone())
            .collect(),
        variants: Vec::new(),
        caption: format!(
            "Dataset `{}`, {} variants × {steps} steps (batch {}), {}, scored on {} batches \
             per task of the {} split, every variant on the same unblurred values.",
            config.base.request.dataset,
            variants.len(),
            config.base.request.batch_size,
            if config.seeds == 1 {
                format!(
                    "one model seed ({}) per variant — no spread over seeds, so differences \
                     between variants may be noise",
                    config.base.seed
                )
            } else {
                format!(
                    "{} model seeds per variant ({} to {}; mean ± standard deviation over them)",
                    config.seeds,
                    config.base.seed,
                    config.base.seed + config.seeds - 1
                )
            },
            config.eval.batches,
            format!("{:?}", config.eval.split).to_lowercase(),
        ),
    };
    // One climatology of the training split for every run: the split is the base's.
    let layouts = config
        .base
        .request
        .fields
        .iter()
        .filter(|f| config.base.model.fields.iter().any(|m| m.name == f.name))
        .map(FieldLayout::from_request)
        .collect::<Result<Vec<_>, _>>()?;
    let mut climatology = None;
    let runs = args.out.join("runs");
    for (i, variant) in variants.iter().enumerate() {
        let cfg = config.variant_config(variant)?;
        let mut result = VariantResult::new(&variant.name, &cfg);
        for k in 0..config.seeds {
            let cfg = config.seeded_config(variant, k)?;
            println!(
                "variant {}/{}: {} (aux info {}, PE {}, blur σ {})",
                i + 1,
                variants.len(),
                variant.name,
                result.aux_info,
                result.pe,
                result.blur_sigma
            );
            let run_dir = if k == 0 {
                runs.join(folder_name(&variant.name))
            } else {
                runs.join(format!("{}-seed{}", folder_name(&variant.name), cfg.seed))
            };
            if run_dir.exists() {
                std::fs::remove_dir_all(&run_dir)
                    .with_context(|| format!("clearing {}", run_dir.display()))?;
            }
            let started = Instant::now();
            let mut trainer = Trainer::new(cfg.clone())?;
            let summary = trainer
                .run(
                    &client,
                    &RunOptions {
                        stop_at: None,
                        out: Some(run_dir),
                        progress: StepBar::unless(args.quiet),
                        forward_passes: 0,
                    },
                )
                .await
                .with_context(|| format!("training variant `{}`", variant.name))?;
            let losses: Vec<(u64, f64)> = summary.steps.iter().map(|s| (s.step, s.loss)).collect();
            let mut val_losses: Vec<(u64, f64)> = summary
                .steps
                .iter()
                .filter_map(|s| Some((s.step, s.val_loss?)))
                .collect();
            if val_losses.last().map(|v| v.0) != Some(trainer.step()) {
                let val = trainer.validate(&client).await?;
                val_losses.push((trainer.step(), val));
            }
            // After the first training run, so a stream the loader refuses names the variant.
            let climatology = match &climatology {
                Some(c) => std::sync::Arc::clone(c),
                None => {
                    let c = atmorep_trainer::climatology::from_loader(
                        &client,
                        &config.base.request,
                        &layouts,
                    )
                    .await
                    .context("the training split's climatology")?;
                    climatology.insert(std::sync::Arc::new(c)).clone()
                }
            };
            let scores = evaluate(
                trainer.model(),
                trainer.config(),
                &client,
                &EvalOptions {
                    split: config.eval.split,
                    batches: config.eval.batches,
                    climatology: Some(climatology),
                },
            )
            .await
            .with_context(|| format!("evaluating variant `{}`", variant.name))?;
            let mut run = VariantResult::new(&variant.name, &cfg);
            run.losses = losses;
            run.val_losses = val_losses;
            run.eval = scores.rows();
            println!(
                "  seed {}: loss {:.4} → {:.4}, validation {:.4}; {:.0} s, {:.0} tokens/s in training",
                cfg.seed,
                run.losses.first().map_or(f64::NAN, |l| l.1),
                run.final_loss().unwrap_or(f64::NAN),
                run.val_losses.last().map_or(f64::NAN, |v| v.1),
                started.elapsed().as_secs_f64(),
                summary.breakdown(0).tokens_per_s,
            );
            if k == 0 {
                result = run;
            } else {
                result.other_seeds.push(SeedRun {
                    seed: cfg.seed,
                    final_loss: run.final_loss(),
                    eval: run.eval,
                });
            }
        }
        report.variants.push(result);
    }

    let table = report.markdown();
    let md = args.out.join("ablation.md");
    write_atomically(&md, table.as_bytes())?;
    report.write_parquet(&args.out.join("ablation.parquet"))?;
    let subtitle = format!(
        "{} · {steps} steps per variant · {}",
        config.base.request.dataset,
        args.out.display()
    );
    let bars = args.out.join("ablation-bars.png");
    bar_chart(&report, &bars, &subtitle)?;
    let curves = args.out.join("ablation-losses.png");
    loss_chart(&report, &curves, &subtitle)?;
    println!("\n{table}");
    println!(
        "table {}, Parquet {}, charts {} and {}",
        md.display(),
        args.out.join("ablation.parquet").display(),
        bars.display(),
        curves.display()
    );
    Ok(report)
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("md.tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
