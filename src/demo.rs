//! `atmorep demo`: the whole system on one machine with an embedded default. A synthetic ERA5
//! store with cyclones and its statistics; the loader service as a **separate process** on
//! loopback; one epoch streamed over gRPC and checked; the trainer as a **separate process**
//! training the multiformer on the loader's stream (600 steps, 2½–4 minutes on 2 cores); evaluation
//! out of sample (the store's weather after the training split is new) against the training
//! split's climatology, the global mean, persistence and interpolation, with bootstrap intervals;
//! global inference written back as a Zarr
//! store; cyclones tracked in the reanalysis and in the model's output (each through a loader);
//! figures of the run — training curves, attention and tokens of a test sample, vorticity at
//! 850 hPa with the tracks — drawn by `atmorep plot` as child processes; everything in one
//! folder.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, Result};
use atmorep_loader::Dataset;
use atmorep_loader::pipeline::normalization::GlobalStats;
use atmorep_loader::progress::NoProgress;
use atmorep_loader::tools::synth::{SynthConfig, write_store};
use atmorep_proto::calendar::{TimeFormat, format_time, parse_iso};
use atmorep_proto::client::{ClientConfig, LoaderClient};
use atmorep_proto::request::RequestConfig;
use atmorep_track::EvalReport;
use atmorep_track::tracks::{Track, read_tracks_csv};
use clap::Args;

use crate::bars::Bars;
use crate::child::{path_arg, run_child, start_loader};
use crate::pull::{Consume, consume};

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Output folder (the store, its statistics, the run, reports and pictures go here).
    #[arg(long, default_value = "demo")]
    out: PathBuf,
    /// Grid spacing of the synthetic store in degrees.
    #[arg(long, default_value_t = 1.0)]
    grid: f64,
    /// Optimizer steps of the training run (the default takes 2½–4 minutes on 2 cores).
    #[arg(long, default_value_t = 600)]
    steps: u64,
}

/// The demo's pull check: two fields on two pressure levels, BERT-masked temperature and
/// forecast-masked geopotential, 12-hour windows of 4×8 tokens.
const DEMO_REQUEST: &str = r#"
dataset = "demo"
batch_size = 8
seed = 1
[[fields]]
name = "t"
levels = [850, 500]
num_tokens = [2, 4, 8]
token_size = [1, 6, 6]
pe = "local"
pe_width = 16
mask = { kind = "bert", r_max = 0.5 }
[[fields]]
name = "z"
levels = [850, 500]
num_tokens = [2, 4, 8]
token_size = [1, 6, 6]
pe = "global"
pe_width = 16
mask = { kind = "forecast", steps = 1 }
"#;

/// Days of the demo store in the training split: its end is `train_end` of [`DEMO_TRAIN`] and
/// the store's unseen weather begins there.
const DEMO_TRAIN_DAYS: f64 = 21.0;

/// The demo's training run: `t`, `z` and `vo` (so the tracker can run on the model's output)
/// at 850 and 500 hPa, windows of 4 steps × 15° × 20° in tokens of 1 × 5 × 5 points; BERT,
/// forecast and interpolation tasks.
const DEMO_TRAIN: &str = r#"
steps = STEPS
seed = 0

[model]
d_model = 48
num_heads = 4
cross_heads = 2
encoder_layers = 2
decoder_layers = 1
d_info = 8
prior = "temporal"
fields = [
  { name = "vo", token_numel = 25, num_tokens = 96, pe_width = 16, grid = { num_tokens = [4, 3, 4], token_size = [1, 5, 5] } },
  { name = "z", token_numel = 25, num_tokens = 96, pe_width = 16, grid = { num_tokens = [4, 3, 4], token_size = [1, 5, 5] } },
  { name = "t", token_numel = 25, num_tokens = 96, pe_width = 16, grid = { num_tokens = [4, 3, 4], token_size = [1, 5, 5] } },
]

[[tasks]]
name = "bert"
weight = 2
mask = { kind = "bert", r_max = 0.5, noise_fraction = 0.1, mask_value = 0.0 }

[[tasks]]
name = "forecast"
weight = 1
mask = { kind = "forecast", steps = 1 }

[[tasks]]
name = "interpolation"
weight = 1
mask = { kind = "interpolation", steps = 1 }

[optimizer]
lr = 2e-3
min_lr = 1e-4
warmup_steps = 20
decay = "cosine"
weight_decay = 0.05
grad_clip_norm = 1.0

[validation]
every = 100
batches = 2

[checkpoint]
every = 0
keep = 1

[request]
dataset = "demo"
batch_size = 8
seed = 0
# 21 days of training (where the store's unseen weather begins), 4½ of validation, 4½ of test.
train_end = "2020-09-22T00:00:00Z"
validation_end = "2020-09-26T12:00:00Z"

[[request.fields]]
name = "vo"
levels = [850, 500]
num_tokens = [4, 3, 4]
token_size = [1, 5, 5]
pe = "local"
pe_width = 16

[[request.fields]]
name = "z"
levels = [850, 500]
num_tokens = [4, 3, 4]
token_size = [1, 5, 5]
pe = "local"
pe_width = 16

[[request.fields]]
name = "t"
levels = [850, 500]
num_tokens = [4, 3, 4]
token_size = [1, 5, 5]
pe = "local"
pe_width = 16
"#;

/// The point of `tracks` the demo draws a test sample around: the middle one, in the test split
/// (from `test_start`, unix seconds), of the storm with the most points there.
fn storm_in_test(tracks: &[Track], test_start: i64) -> Option<(i64, f64, f64)> {
    tracks
        .iter()
        .map(|t| {
            let points: Vec<_> = t
                .points
                .iter()
                .filter(|p| p.time_unix >= test_start)
                .collect();
            points
        })
        .max_by_key(|points| points.len())
        .and_then(|points| points.get(points.len() / 2).copied())
        .map(|p| (p.time_unix, p.lat, p.lon))
}

/// The tracker's scores in each source, one row each: what the network adds over the prior.
fn tracking_table(scores: &[(&str, EvalReport)]) -> String {
    let mut out = format!(
        "    {:<38} {:>4} {:>6} {:>12} {:>14}\n",
        "tracked in", "hits", "misses", "false alarms", "mean error km"
    );
    for (label, r) in scores {
        let error = r
            .mean_error_km
            .map_or("–".to_string(), |e| format!("{e:.1}"));
        out += &format!(
            "    {label:<38} {:>4} {:>6} {:>12} {error:>14}\n",
            r.hits, r.misses, r.false_alarms
        );
    }
    out
}

/// The store time (ISO 8601) at which the most of `tracks` have a point; the earliest of equals.
fn busiest_time(tracks: &[Track], times: &[i64]) -> Option<String> {
    let mut counts: BTreeMap<i64, usize> = BTreeMap::new();
    for point in tracks.iter().flat_map(|t| &t.points) {
        if times.binary_search(&point.time_unix).is_ok() {
            *counts.entry(point.time_unix).or_default() += 1;
        }
    }
    let most = counts.values().copied().max()?;
    let (&unix, _) = counts.iter().find(|(_, n)| **n == most)?;
    Some(format_time(unix, TimeFormat::Iso))
}

pub async fn demo(args: DemoArgs) -> Result<()> {
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let store = args.out.join("era5.zarr");
    // 30 days, 6-hourly: long enough for train, validation and test splits of 4-step windows.
    // Validation and test are out of sample: their storms and wave phases are new.
    let synth = SynthConfig {
        grid_deg: args.grid,
        steps: 121,
        step_hours: 6,
        levels: vec![850, 500, 300],
        variables: ["t", "z", "vo", "u", "v"].map(String::from).to_vec(),
        unseen_after_hours: Some(DEMO_TRAIN_DAYS * 24.0),
        ..SynthConfig::default()
    };
    println!("1/9 synthetic ERA5 → {}", store.display());
    let written = store.clone();
    let summary = tokio::task::spawn_blocking(move || write_store(&synth, &written, &NoProgress))
        .await?
        .context("writing the synthetic store")?;

    println!("2/9 normalization statistics");
    let url = store.to_str().context("non-UTF-8 path")?.to_string();
    let dataset = Dataset::open(&url).await?;
    GlobalStats::compute_into(
        &dataset,
        &GlobalStats::default_dir(&store),
        false,
        &Bars::new(true),
    )
    .await?;

    println!("3/9 the loader service, a separate process on loopback");
    let (_loader, endpoint) = start_loader(&[("demo", &store)], &args.out.join("loader.log"))?;
    println!(
        "    {endpoint} (log: {})",
        args.out.join("loader.log").display()
    );

    println!("4/9 one epoch streamed over gRPC and checked");
    let client = LoaderClient::connect(ClientConfig::new(vec![endpoint.clone()])).await?;
    let request = RequestConfig::from_toml(DEMO_REQUEST)?;
    let report = consume(
        &client,
        &request,
        Consume {
            check_epoch: true,
            ..Consume::default()
        },
    )
    .await?;
    print!("{}", report.to_text());
    let path = args.out.join("pull.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;

    println!("5/9 the trainer, a separate process: {} steps", args.steps);
    let config = args.out.join("train.toml");
    std::fs::write(
        &config,
        DEMO_TRAIN.replace("STEPS", &args.steps.to_string()),
    )?;
    let run = args.out.join("run");
    if run.exists() {
        std::fs::remove_dir_all(&run).with_context(|| format!("clearing {}", run.display()))?;
    }
    run_child(
        "atmorep train",
        &[
            "train".into(),
            "--config".into(),
            path_arg(&config),
            "--loader".into(),
            endpoint.clone(),
            "--out".into(),
            path_arg(&run),
            "--bench".into(),
        ],
    )
    .await?;

    println!("6/9 evaluation on the test split against the baselines (physical units)");
    run_child(
        "atmorep eval",
        &[
            "eval".into(),
            path_arg(&run),
            "--loader".into(),
            endpoint.clone(),
            "--out".into(),
            path_arg(&args.out.join("eval.parquet")),
        ],
    )
    .await?;

    println!(
        "7/9 global inference of the last week: trained and untrained, neighbours shown and forecast"
    );
    // What the tracker finds in each says what the network adds: the untrained model is the
    // temporal prior alone (plus its initial, small corrections); a forecast hides the future.
    let inferences = [
        (
            "model",
            "model.zarr",
            &[][..],
            "the model, neighbours in time shown",
        ),
        (
            "untrained",
            "untrained.zarr",
            &["--untrained"][..],
            "untrained (the prior alone), shown",
        ),
        (
            "forecast",
            "forecast.zarr",
            &["--forecast"][..],
            "the model, forecast (future hidden)",
        ),
        (
            "untrained-forecast",
            "untrained-forecast.zarr",
            &["--untrained", "--forecast"][..],
            "untrained, forecast (persistence)",
        ),
    ];
    for (_, zarr, flags, _) in &inferences {
        let mut infer_args = vec![
            "infer".into(),
            path_arg(&run),
            "--loader".into(),
            endpoint.clone(),
            "--out".into(),
            path_arg(&args.out.join(zarr)),
            // The last week (of 30 days): the test split and the days before it.
            "--start".into(),
            "2020-09-24T00:00:00Z".into(),
        ];
        infer_args.extend(flags.iter().map(|f| f.to_string()));
        run_child("atmorep infer", &infer_args).await?;
    }

    println!("8/9 tropical cyclones tracked in the reanalysis and in each inference");
    let mut scores = Vec::new();
    let sources = std::iter::once(("demo", None, "the reanalysis")).chain(
        inferences
            .iter()
            .map(|(name, zarr, _, label)| (*name, Some(args.out.join(zarr)), *label)),
    );
    for (name, store, label) in sources {
        let (model_loader, ep) = match &store {
            Some(store) => {
                let (guard, ep) = start_loader(
                    &[(name, store)],
                    &args.out.join(format!("{name}-loader.log")),
                )?;
                (Some(guard), ep)
            }
            None => (None, endpoint.clone()),
        };
        let client = LoaderClient::connect(ClientConfig::new(vec![ep])).await?;
        println!("  in `{name}`:");
        let prefix = if store.is_some() {
            format!("{name}-")
        } else {
            String::new()
        };
        let report = crate::track::track_with(
            &client,
            &crate::track::RunArgs {
                loader: Vec::new(),
                dataset: name.into(),
                start: None,
                end: None,
                out: args.out.join(format!("{prefix}tracks.csv")),
                map: Some(args.out.join(format!("{prefix}tracks.png"))),
                truth: Some(summary.tracks_csv.clone()),
                config: None,
                every_hours: 6,
                token: None,
                ca: None,
            },
        )
        .await?;
        drop(model_loader);
        scores.push((
            label,
            report.context("tracks scored against the synthetic truth")?,
        ));
    }
    let table = tracking_table(&scores);
    print!("{table}");
    std::fs::write(args.out.join("tracking.txt"), &table)?;
    println!("9/9 figures: training curves, a test sample through the model, vo at 850 hPa");
    let training_png = args.out.join("training.png");
    run_child(
        "atmorep plot training",
        &[
            "plot".into(),
            "training".into(),
            path_arg(&run),
            "--out".into(),
            path_arg(&training_png),
        ],
    )
    .await?;
    let figures = args.out.join("plots");
    let truth = read_tracks_csv(&summary.tracks_csv)
        .with_context(|| format!("reading the tracks {}", summary.tracks_csv.display()))?;
    // The test split begins where the training config's validation split ends.
    let test_start =
        atmorep_trainer::TrainConfig::from_toml_str(&std::fs::read_to_string(&config)?, None)?
            .request
            .validation_end
            .as_deref()
            .map(parse_iso)
            .transpose()?
            .context("the demo's training config has no validation_end")?;
    let (time, lat, lon) = storm_in_test(&truth, test_start)
        .context("the synthetic store has no storm in the test split")?;
    let at = format!("{},{lat:.2},{lon:.2}", format_time(time, TimeFormat::Iso));
    for kind in ["attention", "tokens"] {
        run_child(
            &format!("atmorep plot {kind}"),
            &[
                "plot".into(),
                kind.into(),
                path_arg(&run),
                "--loader".into(),
                endpoint.clone(),
                "--split".into(),
                "test".into(),
                "--at".into(),
                at.clone(),
                "--out".into(),
                path_arg(&figures),
            ],
        )
        .await?;
    }
    // Vorticity when the most storms were tracked, with the tracks found in the reanalysis
    // (the synthetic truth if none were).
    let tracked = args.out.join("tracks.csv");
    let mut overlay = tracked.clone();
    let mut tracks = read_tracks_csv(&tracked)
        .with_context(|| format!("reading the tracks {}", tracked.display()))?;
    if tracks.iter().all(|t| t.points.is_empty()) {
        overlay = summary.tracks_csv.clone();
        tracks = read_tracks_csv(&overlay)
            .with_context(|| format!("reading the tracks {}", overlay.display()))?;
    }
    let vo_png = figures.join("field-vo-850-tracks.png");
    let storm_time = busiest_time(&tracks, &dataset.times);
    match storm_time.clone() {
        Some(time) => {
            run_child(
                "atmorep plot field",
                &[
                    "plot".into(),
                    "field".into(),
                    url.clone(),
                    "--var".into(),
                    "vo".into(),
                    "--level".into(),
                    "850".into(),
                    "--time".into(),
                    time,
                    "--tracks".into(),
                    path_arg(&overlay),
                    "--out".into(),
                    path_arg(&vo_png),
                ],
            )
            .await?;
        }
        None => println!("    no storm at any of the store's times: no vorticity map"),
    }
    println!("    training curves: {}", training_png.display());
    println!(
        "    attention and tokens of the test sample on a storm at {at}: {}",
        figures.display()
    );
    if let Some(time) = storm_time {
        println!(
            "    vo at 850 hPa at {time} with the tracks: {}",
            vo_png.display()
        );
    }
    println!("everything is in {}", args.out.display());
    Ok(())
}
