//! `atmorep infer`: global inference. The loader's ordered global tiles (normalized, unmasked)
//! go through the model — every token predicted from the others (`atmorep_trainer::infer`) —
//! back to physical units with the loader's statistics, stitched into global fields (overlaps
//! averaged) and written as a Zarr store that `atmorep loader serve` serves like any other, so
//! downstream clients (the cyclone tracker) run on the model's output.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use atmorep_loader::store::writer::{GridAxes, StoreWriter, VariableSpec};
use atmorep_proto::MaskConfig;
use atmorep_proto::calendar::{TimeFormat, format_time, parse_iso};
use atmorep_proto::request::{ModeName, UnitsName};
use atmorep_proto::stitch::{StitchedStep, TileField, TileStitcher, TimeAxis};
use atmorep_track::Grid;
use atmorep_trainer::collective::SingleProcess;
use atmorep_trainer::eval::{self, FieldLayout};
use atmorep_trainer::infer::Hidden;
use atmorep_trainer::{DeviceSpec, Trainer, infer};
use clap::Args;

use crate::saved_run::{SavedRun, connect};

#[derive(Debug, Args)]
pub struct InferArgs {
    /// A checkpoint folder, or a run folder (its latest checkpoint).
    ckpt: PathBuf,
    /// Loader endpoint(s), comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    loader: Vec<String>,
    /// The Zarr store to write (replaced when it exists, only once the new one is complete).
    #[arg(long)]
    out: PathBuf,
    /// First time step (ISO 8601 UTC; default: the dataset's first).
    #[arg(long)]
    start: Option<String>,
    /// Last time step (default: the dataset's last).
    #[arg(long)]
    end: Option<String>,
    /// Interleaved masked passes per tile: each token is predicted in the pass that masks it.
    #[arg(long, default_value_t = 2, conflicts_with = "forecast")]
    passes: usize,
    /// A forecast instead: each tile's last time-token slice is hidden and predicted from the
    /// slices before it (the forecast task); tiles overlap in time so that every step is the
    /// last of one. The output starts where the first tile has a full past.
    #[arg(long)]
    forecast: bool,
    /// The checkpoint's model as it was before training (its config's seeded initial weights):
    /// what the temporal prior alone gives, to compare against what the network learned.
    #[arg(long)]
    untrained: bool,
    /// Tiles per batch.
    #[arg(long, default_value_t = 16)]
    batch: u32,
    /// Bearer token for the loaders.
    #[arg(long, env = "ATMOREP_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Where the model computes: `cpu`, or `cuda` (GPU 0) / `cuda:N` in a build with the `cuda`
    /// feature.
    #[arg(long, env = "ATMOREP_DEVICE", default_value = "cpu")]
    device: DeviceSpec,
}

pub async fn infer(args: InferArgs) -> Result<PathBuf> {
    let SavedRun {
        dir, mut trainer, ..
    } = crate::eval::load_on(&args.ckpt, args.device)?;
    if args.untrained {
        let device = trainer.device().clone();
        trainer = Trainer::new_in(trainer.config().clone(), Box::new(SingleProcess), &device)?;
    }
    let (model, config) = (trainer.model(), trainer.config());
    let client = connect(&args.loader, args.token.as_deref()).await?;
    let dataset = config.request.dataset.clone();
    let info = client.dataset_info(&dataset).await?;
    let axis = info.time.as_ref().context("the loader sent no time axis")?;
    let grid = Grid::from_proto(info.grid.as_ref().context("the loader sent no grid")?)?;
    let time = TimeAxis::from_proto(axis);

    // The model's fields as the checkpoint's request asks for them, as tiles.
    let mut request = config.request.clone();
    request.mode = ModeName::Tiles;
    request.units = UnitsName::Normalized;
    request.resume = None;
    request.end_epoch = None;
    request.batch_size = args.batch;
    let mut layouts = Vec::new();
    let mut tile_fields = Vec::new();
    let mut mask_value = 0.0;
    for spec in &model.config().fields {
        let f = request
            .fields
            .iter_mut()
            .find(|f| f.name == spec.name)
            .with_context(|| format!("the checkpoint's request has no field `{}`", spec.name))?;
        if let MaskConfig::Bert { mask_value: v, .. } = f.mask {
            mask_value = v;
        }
        f.mask = MaskConfig::None;
        layouts.push(FieldLayout::from_request(f)?);
        tile_fields.push(TileField::from_request(f));
    }
    request
        .fields
        .retain(|f| model.config().field_index(&f.name).is_some());
    let normalized: Vec<String> = layouts
        .iter()
        .filter(|l| l.normalized)
        .map(|l| l.name.clone())
        .collect();
    let hidden = if args.forecast {
        Hidden::Future { slices: 1 }
    } else {
        Hidden::Checkerboard {
            passes: args.passes,
        }
    };
    // A forecast's tiles step by one time token, so that each step is some tile's last; the
    // steps before the first tile's last have no past in the tiling.
    let past_steps = match hidden {
        Hidden::Future { slices } => {
            let [window, token] = [
                layouts[0].num_tokens[0] * layouts[0].token_size[0],
                layouts[0].token_size[0],
            ];
            if let Some(l) = layouts
                .iter()
                .find(|l| l.num_tokens[0] * l.token_size[0] != window || l.token_size[0] != token)
            {
                bail!(
                    "--forecast needs every field on one time tiling: `{}` has {} time tokens \
                     of {} steps, `{}` {} of {}",
                    layouts[0].name,
                    layouts[0].num_tokens[0],
                    token,
                    l.name,
                    l.num_tokens[0],
                    l.token_size[0]
                );
            }
            request.tile_overlap[0] = u32::try_from(window - slices * token)?;
            window - slices * token
        }
        Hidden::Checkerboard { .. } => 0,
    };
    let stats = if normalized.is_empty() {
        atmorep_proto::MonthlyStatistics::default()
    } else {
        client.statistics(&dataset, &normalized).await?
    };

    // The output's time axis: the steps the tiles cover.
    let parse = |what: &str, text: &str| {
        parse_iso(text).with_context(|| format!("--{what}: `{text}` is not an ISO 8601 time"))
    };
    let past = past_steps as i64 * time.step_seconds;
    let first = match &args.start {
        Some(s) => {
            let first = parse("start", s)?;
            if first - past < axis.start_unix {
                bail!(
                    "--start {s}: a forecast needs the {past_steps} steps before it, and \
                     `{dataset}` begins at {}",
                    axis.start
                );
            }
            first
        }
        None => axis.start_unix + past,
    };
    let last = match &args.end {
        Some(s) => parse("end", s)?,
        None => axis.end_unix,
    };
    let times: Vec<i64> = (0..axis.count as usize)
        .map(|i| time.time_of(i))
        .filter(|t| (first..=last).contains(t))
        .collect();
    // Explicit bounds: without them tiles cover the request's time split only.
    request.tile_time_start = Some(format_time(first - past, TimeFormat::Iso));
    request.tile_time_end = Some(format_time(last, TimeFormat::Iso));
    if times.is_empty() {
        bail!(
            "no time step of `{dataset}` ({} … {}) lies in {first} … {last}",
            axis.start,
            axis.end
        );
    }
    let mut levels: Vec<f64> = Vec::new();
    for l in layouts.iter().flat_map(|l| &l.levels) {
        if !levels.contains(l) {
            levels.push(*l);
        }
    }
    let var_info = |name: &str| info.variables.iter().find(|v| v.name == name);
    let variables: Vec<VariableSpec> = request
        .fields
        .iter()
        .map(|f| VariableSpec {
            name: f.name.clone(),
            long_name: format!(
                "{} (model output)",
                var_info(&f.name).map_or(f.name.as_str(), |v| v.long_name.as_str())
            ),
            units: var_info(&f.name).map_or(String::new(), |v| v.units.clone()),
            has_level: !f.levels.is_empty(),
        })
        .collect();
    let writer = StoreWriter::create(
        &args.out,
        GridAxes {
            lats: (0..grid.nlat).map(|j| grid.lat(j)).collect(),
            lons: (0..grid.nlon).map(|i| grid.lon(i)).collect(),
            times: times.clone(),
            levels: levels.clone(),
        },
        &variables,
        &format!("atmorep-rs global inference of {}", dir.display()),
    )?;
    let mut stitcher = TileStitcher::new(tile_fields.clone(), grid.nlat, grid.nlon, time)?
        .with_averaged_overlaps();
    let eval_time = eval::TimeAxis {
        start_unix: time.start_unix,
        step_s: time.step_seconds,
    };

    let started = Instant::now();
    let bar = indicatif::ProgressBar::new(times.len() as u64).with_style(
        indicatif::ProgressStyle::with_template(
            "{elapsed_precise} [{bar:30}] {pos}/{len} steps written",
        )
        .expect("a valid template")
        .progress_chars("=> "),
    );
    let mut written = 0usize;
    let mut tiles = 0usize;
    let mut write = |steps: Vec<StitchedStep>| -> Result<()> {
        for s in steps {
            let Ok(index) = times.binary_search(&s.time_unix) else {
                continue;
            };
            for (v, f) in variables.iter().zip(&request.fields) {
                let mut step = Vec::with_capacity(levels.len() * grid.len());
                let keys: Vec<Option<f64>> = if v.has_level {
                    levels.iter().map(|&l| Some(l)).collect()
                } else {
                    vec![None]
                };
                for key in keys {
                    match key.and_then(|l| (!f.levels.contains(&l)).then_some(l)) {
                        // A level another field has but this one does not: missing values.
                        Some(_) => step.extend(std::iter::repeat_n(f32::NAN, grid.len())),
                        None => {
                            let plane = s.plane(&v.name, key).with_context(|| {
                                format!("the stitched step has no `{}` at {key:?}", v.name)
                            })?;
                            step.extend_from_slice(plane);
                        }
                    }
                }
                writer.write_step(&v.name, index, &step)?;
            }
            written += 1;
            bar.inc(1);
        }
        Ok(())
    };
    let mut stream = client.stream(request.to_proto());
    while let Some(batch) = stream.next().await {
        let mut batch = batch.with_context(|| format!("global tiles of `{dataset}`"))?;
        if batch.is_empty() {
            if batch.end_of_stream {
                break;
            }
            continue;
        }
        tiles += batch.len();
        let preds = infer::reconstruct(
            model,
            &batch,
            &layouts,
            hidden,
            mask_value,
            trainer.device(),
        )?;
        for ((mut values, layout), spec) in
            preds.into_iter().zip(&layouts).zip(&model.config().fields)
        {
            let fb = batch
                .fields
                .iter_mut()
                .find(|f| f.name == spec.name)
                .expect("reconstruct found every field");
            infer::denormalize(&mut values, &fb.windows, layout, &stats, eval_time)?;
            fb.source = values;
        }
        write(stitcher.push(&batch)?)?;
        if batch.end_of_stream || stitcher.is_done() {
            break;
        }
    }
    write(stitcher.finish()?)?;
    bar.finish_and_clear();
    if written != times.len() {
        bail!(
            "the loader's tiles covered {written} of the {} time steps; nothing was written",
            times.len()
        );
    }
    let out = writer.finish()?;
    let secs = started.elapsed().as_secs_f64();
    let how = match hidden {
        Hidden::Checkerboard { passes } => format!("{passes} passes"),
        Hidden::Future { .. } => "the last time slice hidden".to_string(),
    };
    println!(
        "{}{tiles} tiles × {how} → {written} time steps of {} in {secs:.1} s ({:.1} steps/s) → {}",
        if args.untrained { "untrained: " } else { "" },
        variables
            .iter()
            .map(|v| v.name.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        written as f64 / secs.max(1e-9),
        out.display()
    );
    println!(
        "serve it: atmorep loader serve --dataset model={}",
        out.display()
    );
    Ok(out)
}
