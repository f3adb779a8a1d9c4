//! `atmorep plot`: fetches what a picture needs — a checkpoint and one loader sample, a run's
//! step log, a field of a store — and hands it to atmorep-plot, which draws it.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use atmorep_loader::Dataset;
use atmorep_loader::Hyperslab;
use atmorep_plot::{AttentionOptions, FieldMap, ModelRun, TokenOptions};
use atmorep_proto::calendar::{TimeFormat, format_time, parse_iso};
use atmorep_proto::client::LoaderClient;
use atmorep_proto::pb;
use atmorep_proto::request::RequestConfig;
use atmorep_trainer::config::Prior;
use atmorep_trainer::{TrainConfig, checkpoint, metrics_log};
use clap::{Args, Subcommand};

use crate::saved_run::{SavedRun, connect, parse_split};

#[derive(Debug, Args)]
pub struct PlotArgs {
    #[command(subcommand)]
    command: PlotCommand,
}

#[derive(Debug, Subcommand)]
enum PlotCommand {
    /// Encoder attention of one sample: every layer and head (within and across fields) as heat
    /// maps, and a query token's attention on the map.
    Attention {
        #[command(flatten)]
        sample: SampleArgs,
        /// The query token of the map figure, in the field's token order (default: the middle
        /// token of the first level at the last token time).
        #[arg(long)]
        query: Option<usize>,
    },
    /// One sample's source, masked input, prediction and target per time slice, per field and
    /// level (PNG and animated GIF).
    Tokens {
        #[command(flatten)]
        sample: SampleArgs,
        /// Only these levels, comma-separated, as the store names them (default: all).
        #[arg(long, value_delimiter = ',')]
        level: Vec<f64>,
    },
    /// Loss (per task and per field, with validation), learning rate, gradient norm and data
    /// wait of a training run, from its Parquet step log.
    Training {
        /// The run's output folder (`atmorep train --out`).
        run_dir: PathBuf,
        /// The PNG (default: RUN_DIR/training.png).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// A field at one level and time on a map in physical units, optionally with cyclone tracks.
    Field {
        /// Store URL or path.
        url: String,
        /// Variable name.
        #[arg(long)]
        var: String,
        /// Level as the store names it (e.g. 500); needed when the variable has levels.
        #[arg(long)]
        level: Option<f64>,
        /// Time: ISO 8601 UTC (one of the store's steps) or an index on its time axis.
        #[arg(long)]
        time: String,
        /// Cyclone tracks to draw on top (CSV as `atmorep track` or `loader synth` write).
        #[arg(long)]
        tracks: Option<PathBuf>,
        /// The PNG (default: field-VAR-LEVEL-TIME.png in the working folder).
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

/// Which model and which sample.
#[derive(Debug, Args)]
struct SampleArgs {
    /// A checkpoint folder, or a run folder (its latest checkpoint).
    ckpt: PathBuf,
    /// Loader endpoint(s), comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    loader: Vec<String>,
    /// The sample id (as the stream of the checkpoint's request numbers them).
    #[arg(long, required_unless_present = "at", conflicts_with = "at")]
    sample: Option<u64>,
    /// Instead of an id, the sample whose window is centred at `TIME,LAT,LON` (ISO 8601 UTC,
    /// degrees north and east), e.g. on a storm.
    #[arg(long, value_name = "TIME,LAT,LON")]
    at: Option<String>,
    /// The epoch the id belongs to (it decides the masks).
    #[arg(long, default_value_t = 0)]
    epoch: u64,
    /// The time split: train, validation or test.
    #[arg(long, default_value = "validation")]
    split: String,
    /// The task whose masking the sample gets (default: the config's first).
    #[arg(long)]
    task: Option<String>,
    /// Only these fields, comma-separated (default: all of the model's).
    #[arg(long, value_delimiter = ',')]
    field: Vec<String>,
    /// Output folder.
    #[arg(long, default_value = "plots")]
    out: PathBuf,
    /// Bearer token for the loaders.
    #[arg(long, env = "ATMOREP_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

pub async fn plot(args: PlotArgs) -> Result<()> {
    let figures = match args.command {
        PlotCommand::Attention { sample, query } => {
            let (run, subtitle) = model_run(&sample).await?;
            let opts = AttentionOptions {
                fields: sample.field.clone(),
                query,
                subtitle,
            };
            atmorep_plot::attention_figures(&run, &sample.out, &opts)?
        }
        PlotCommand::Tokens { sample, level } => {
            let (run, subtitle) = model_run(&sample).await?;
            let opts = TokenOptions {
                fields: sample.field.clone(),
                levels: level,
                subtitle,
            };
            let figs = atmorep_plot::token_figures(&run, &sample.out, &opts)?;
            for f in &figs {
                println!("wrote {}", f.path.with_extension("gif").display());
            }
            figs
        }
        PlotCommand::Training { run_dir, out } => vec![training(&run_dir, out)?],
        PlotCommand::Field {
            url,
            var,
            level,
            time,
            tracks,
            out,
        } => vec![field(&url, &var, level, &time, tracks.as_deref(), out).await?],
    };
    for f in figures {
        println!(
            "wrote {} ({}×{}, {} panels)",
            f.path.display(),
            f.width,
            f.height,
            f.panels
        );
    }
    Ok(())
}

/// Loads the checkpoint, fetches the sample its request cuts as `--sample` and runs the model
/// on it; returns the run and a subtitle naming what was drawn.
async fn model_run(args: &SampleArgs) -> Result<(ModelRun, String)> {
    let split = parse_split(&args.split)?;
    let SavedRun { dir, step, trainer } = SavedRun::load(&args.ckpt)?;
    let config = trainer.config();
    let tasks = config.tasks();
    let task = match &args.task {
        None => 0,
        Some(name) => tasks
            .iter()
            .position(|t| &t.name == name)
            .with_context(|| {
                format!(
                    "--task {name}: the checkpoint's tasks are {:?}",
                    tasks.iter().map(|t| &t.name).collect::<Vec<_>>()
                )
            })?,
    };
    let mut request = config.task_request(task);
    request.split = split;
    request.batch_size = 1;

    let client = connect(&args.loader, args.token.as_deref()).await?;
    let loader = args.loader.join(",");
    check_fields(&client, &request, &dir, &loader).await?;
    let (selector, which) = match (&args.at, args.sample) {
        (Some(at), _) => {
            let (time, lat, lon) = parse_at(at)?;
            let which = format!("the sample centred at {time}, {lat}° N {lon}° E");
            let time = pb::sample_by_centre::Time::IsoTime(time);
            (
                pb::SampleRequest::by_centre(request.to_proto(), time, lat, lon),
                which,
            )
        }
        (None, Some(id)) => (
            pb::SampleRequest::by_id(request.to_proto(), args.epoch, id),
            format!("sample {id} of epoch {}", args.epoch),
        ),
        (None, None) => bail!("give --sample ID or --at TIME,LAT,LON"),
    };
    let batch = client
        .sample(selector)
        .await
        .with_context(|| format!("fetching {which} ({} split) from {loader}", args.split))?;
    // Which window that is, in the dataset's coordinates.
    let info = client.dataset_info(&request.dataset).await?;
    if let (Some(grid), Some(axis), Some(w)) = (
        info.grid.as_ref(),
        info.time.as_ref(),
        batch.fields.first().and_then(|f| f.windows.first()),
    ) {
        let grid = atmorep_track::Grid::from_proto(grid)?;
        let time = atmorep_proto::stitch::TimeAxis::from_proto(axis);
        let [nt, ny, nx] = w.size;
        let (lats, lons) = (
            [grid.lat(w.lat_start), grid.lat(w.lat_start + ny - 1)],
            [
                grid.lon(w.lon_start),
                grid.lon((w.lon_start + nx - 1) % grid.nlon),
            ],
        );
        println!(
            "{which}: window {} … {}, latitude {:.2} … {:.2}° N, longitude {:.2} … {:.2}° E",
            format_time(time.time_of(w.time_start), TimeFormat::Iso),
            format_time(time.time_of(w.time_start + nt - 1), TimeFormat::Iso),
            lats[0].min(lats[1]),
            lats[0].max(lats[1]),
            lons[0],
            lons[1],
        );
    }
    let run = ModelRun::new(trainer.model(), &batch, &request)
        .with_context(|| format!("running the model of {}", dir.display()))?;
    let subtitle = format!(
        "{which}, {} split, {} masking · checkpoint {} (step {step})",
        args.split,
        tasks[task].name,
        dir.display()
    );
    Ok((run, subtitle))
}

/// `--at TIME,LAT,LON` as its parts.
fn parse_at(text: &str) -> Result<(String, f64, f64)> {
    let parts: Vec<&str> = text.split(',').map(str::trim).collect();
    let [time, lat, lon] = parts[..] else {
        bail!("--at `{text}`: expected TIME,LAT,LON (e.g. 2020-09-29T06:00:00Z,-21.5,90)");
    };
    parse_iso(time).with_context(|| format!("--at: `{time}` is not an ISO 8601 time"))?;
    let degrees = |what: &str, v: &str, limit: f64| -> Result<f64> {
        match v.parse::<f64>() {
            Ok(x) if x.abs() <= limit => Ok(x),
            _ => bail!("--at: {what} `{v}` is not a number of degrees within ±{limit}"),
        }
    };
    Ok((
        time.to_string(),
        degrees("latitude", lat, 90.0)?,
        degrees("longitude", lon, 360.0)?,
    ))
}

/// Fails, naming the field, when the loader's dataset lacks a field or level the checkpoint's
/// model was trained on.
async fn check_fields(
    client: &LoaderClient,
    request: &RequestConfig,
    ckpt: &Path,
    loader: &str,
) -> Result<()> {
    let info = client
        .dataset_info(&request.dataset)
        .await
        .with_context(|| {
            format!(
                "the checkpoint {} was trained on dataset `{}`, which {loader} does not serve",
                ckpt.display(),
                request.dataset
            )
        })?;
    for field in &request.fields {
        let Some(var) = info.variables.iter().find(|v| v.name == field.name) else {
            bail!(
                "the checkpoint {} needs field `{}`, but dataset `{}` at {loader} has only {:?}",
                ckpt.display(),
                field.name,
                request.dataset,
                info.variables.iter().map(|v| &v.name).collect::<Vec<_>>()
            );
        };
        if let Some(level) = field.levels.iter().find(|l| !var.levels.contains(l)) {
            bail!(
                "the checkpoint {} needs field `{}` at level {level}, but dataset `{}` at \
                 {loader} has it at {:?}",
                ckpt.display(),
                field.name,
                request.dataset,
                var.levels
            );
        }
    }
    Ok(())
}

fn training(run_dir: &Path, out: Option<PathBuf>) -> Result<atmorep_plot::Figure> {
    if !run_dir.is_dir() {
        bail!("run folder {} does not exist", run_dir.display());
    }
    let log = run_dir.join(metrics_log::DIR);
    if !log.is_dir() {
        bail!(
            "{} has no step log ({} is missing): not a training run's output folder",
            run_dir.display(),
            log.display()
        );
    }
    let rows = metrics_log::read_steps(run_dir)?;
    if rows.is_empty() {
        bail!(
            "the step log {} holds no steps (a run writes it at its checkpoints and at its end)",
            log.display()
        );
    }
    let out = out.unwrap_or_else(|| run_dir.join("training.png"));
    let subtitle = format!(
        "{} · steps {}–{}",
        run_dir.display(),
        rows.first().map_or(0, |r| r.step),
        rows.last().map_or(0, |r| r.step)
    );
    Ok(atmorep_plot::training_figure(
        &rows,
        &out,
        &subtitle,
        loss_unit(run_dir),
    )?)
}

/// The unit of a run's loss, from its newest checkpoint's config: under the temporal prior each
/// value's error counts in units of its prior's error; otherwise in normalized units.
fn loss_unit(run_dir: &Path) -> &'static str {
    let temporal = checkpoint::resolve(run_dir)
        .ok()
        .and_then(|dir| TrainConfig::from_toml_file(&dir.join(checkpoint::CONFIG_FILE)).ok())
        .is_some_and(|cfg| cfg.model.prior == Prior::Temporal);
    if temporal {
        "prior errors²"
    } else {
        "normalized units²"
    }
}

async fn field(
    url: &str,
    var: &str,
    level: Option<f64>,
    time: &str,
    tracks: Option<&Path>,
    out: Option<PathBuf>,
) -> Result<atmorep_plot::Figure> {
    // Tracks first: a bad CSV fails before the store is read.
    let tracks = match tracks {
        Some(path) => atmorep_track::tracks::read_tracks_csv(path)
            .with_context(|| format!("reading the tracks {}", path.display()))?,
        None => Vec::new(),
    };
    let dataset = Dataset::open(url).await?;
    let variable = dataset.variable(var)?;
    let levels = match (level, variable.has_level()) {
        (Some(l), true) => {
            vec![
                variable
                    .levels
                    .iter()
                    .position(|v| *v == l)
                    .with_context(|| {
                        format!(
                            "--level {l}: `{var}` of {url} has levels {:?}",
                            variable.levels
                        )
                    })?,
            ]
        }
        (None, true) => bail!(
            "--level is needed: `{var}` of {url} has levels {:?}",
            variable.levels
        ),
        (Some(l), false) => bail!("--level {l}: `{var}` of {url} is a surface field"),
        (None, false) => Vec::new(),
    };
    let times = &dataset.times;
    let range = || {
        format!(
            "{} steps from {} to {}",
            times.len(),
            format_time(times[0], TimeFormat::Minutes),
            format_time(times[times.len() - 1], TimeFormat::Minutes)
        )
    };
    let t = match time.parse::<usize>() {
        Ok(i) if i < times.len() => i,
        Ok(i) => bail!("--time {i} is outside the store's {}", range()),
        Err(_) => {
            let unix = parse_iso(time)
                .with_context(|| format!("--time `{time}` is neither an index nor an ISO time"))?;
            times.binary_search(&unix).map_err(|_| {
                anyhow::anyhow!("--time {time} is not among the store's {}", range())
            })?
        }
    };
    let slab = Hyperslab {
        variable: var.to_string(),
        time: t..t + 1,
        levels,
        lat: 0..dataset.lats.len(),
        lon_start: 0,
        lon_len: dataset.lons.len(),
    };
    let values = dataset
        .read(&slab)
        .await
        .with_context(|| format!("reading `{var}` from {url}"))?;
    let map = FieldMap {
        variable: var.to_string(),
        long_name: variable.long_name.clone(),
        units: variable.units.clone(),
        level,
        time_unix: times[t],
        lats: dataset.lats.clone(),
        lons: dataset.lons.clone(),
        values,
    };
    let out = out.unwrap_or_else(|| {
        let stamp = format_time(times[t], TimeFormat::Minutes)
            .replace([' ', ':'], "")
            .replace('-', "");
        let level = level.map_or(String::new(), |l| format!("-{l}"));
        PathBuf::from(format!("field-{var}{level}-{stamp}.png"))
    });
    let subtitle = format!(
        "{url} · {} tracks",
        if tracks.is_empty() {
            "no".to_string()
        } else {
            tracks.len().to_string()
        }
    );
    Ok(atmorep_plot::field_figure(&map, &tracks, &out, &subtitle)?)
}

#[cfg(test)]
mod tests {
    use atmorep_trainer::config::TokenGrid;
    use atmorep_trainer::{TrainConfig, Trainer};

    use super::*;

    /// The loss axes say which units a run's loss is in, from its checkpoint's config.
    #[test]
    fn the_loss_unit_follows_the_runs_prior() {
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("plain");
        Trainer::new(TrainConfig::example())
            .unwrap()
            .save_checkpoint(&plain)
            .unwrap();
        assert_eq!(loss_unit(&plain), "normalized units²");

        let mut cfg = TrainConfig::example();
        cfg.model.prior = Prior::Temporal;
        for f in &mut cfg.model.fields {
            f.grid = Some(TokenGrid {
                num_tokens: [2, 2, 2],
                token_size: [1, 3, 4],
            });
        }
        let prior = dir.path().join("prior");
        Trainer::new(cfg).unwrap().save_checkpoint(&prior).unwrap();
        assert_eq!(loss_unit(&prior), "prior errors²");
        // No checkpoint (a run that logged steps but never saved): normalized units.
        assert_eq!(loss_unit(dir.path()), "normalized units²");
    }
}
