//! `atmorep track`: tropical cyclones from a loader's ordered global tiles, and `atmorep track
//! eval`: tracks against reference tracks (docs/design.md §6). The tracker reads no store: it asks the
//! loader for 850 hPa vorticity and geopotential (plus 500 and 300 hPa geopotential for the warm
//! core, where the dataset has them) in physical units, stitches the tiles back into global
//! fields and hands them to `atmorep-track`.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use atmorep_plot::{MapConfig, draw_map};
use atmorep_proto::stitch::{TileField, TileStitcher, TimeAxis};
use atmorep_proto::{ClientConfig, LoaderClient, RequestConfig, pb};
use atmorep_track::{
    EvalConfig, EvalReport, FieldSnapshot, Grid, TrackConfig, evaluate, read_reference,
    read_tracks_csv, write_tracks_csv,
};
use clap::{Args, Subcommand};

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct TrackArgs {
    #[command(subcommand)]
    pub command: Option<TrackCommand>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Debug, Subcommand)]
pub enum TrackCommand {
    /// Score tracks against reference tracks (synthetic truth or IBTrACS CSV)
    Eval(EvalArgs),
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Loader endpoint(s), comma-separated (failover in order)
    #[arg(long, value_delimiter = ',')]
    pub loader: Vec<String>,
    /// Dataset name on the loader
    #[arg(long, default_value = "era5")]
    pub dataset: String,
    /// First time step (ISO date or date-time, UTC); default: the dataset's first
    #[arg(long)]
    pub start: Option<String>,
    /// Last time step (inclusive); default: the dataset's last
    #[arg(long)]
    pub end: Option<String>,
    /// Where to write the tracks (CSV, IBTrACS-like columns)
    #[arg(long, default_value = "tracks.csv")]
    pub out: PathBuf,
    /// Also draw the tracks on a map (PNG)
    #[arg(long)]
    pub map: Option<PathBuf>,
    /// Reference tracks to score against and draw dashed on the map
    #[arg(long)]
    pub truth: Option<PathBuf>,
    /// Detection and stitching thresholds (TOML; left out: docs/design.md §6 defaults)
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Track on every this many hours (docs/design.md §6: 6-hourly); steps in between are skipped
    #[arg(long, default_value_t = 6)]
    pub every_hours: u32,
    /// Bearer token
    #[arg(long, env = "ATMOREP_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// CA certificate (PEM) that signed the loader's certificate
    #[arg(long)]
    pub ca: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Our tracks (CSV written by `atmorep track`)
    pub tracks: PathBuf,
    /// Reference tracks: synthetic truth CSV or IBTrACS CSV
    #[arg(long)]
    pub truth: PathBuf,
    /// Print the report as JSON
    #[arg(long)]
    pub json: bool,
}

pub async fn track(args: TrackArgs) -> Result<()> {
    match args.command {
        Some(TrackCommand::Eval(eval)) => evaluate_files(&eval),
        None => run(&args.run).await,
    }
}

fn evaluate_files(args: &EvalArgs) -> Result<()> {
    let tracks = read_tracks_csv(&args.tracks)?;
    let period = atmorep_track::eval::period_of(&tracks);
    let reference = read_reference(&args.truth, period)?;
    let report = evaluate(&tracks, &reference, &EvalConfig::default())?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{report}");
    }
    Ok(())
}

/// Points `detect`'s variable names at the dataset's own: each name (the configuration's, or
/// the defaults `vo`, `z`, `t`) may be any ERA5 name of its parameter, so a store with the long
/// names of ARCO-ERA5 (`vorticity`, `geopotential`, `temperature`) needs no configuration. A
/// temperature the dataset lacks is left as it is (the warm core then uses geopotential or is
/// skipped).
pub fn resolve_detect_names(
    info: &pb::DatasetInfo,
    detect: &mut atmorep_track::DetectConfig,
) -> Result<()> {
    let names = || info.variables.iter().map(|v| v.name.as_str());
    for (key, name) in [
        ("vorticity", &mut detect.vorticity),
        ("geopotential", &mut detect.geopotential),
    ] {
        let stored = atmorep_proto::era5::resolve(name, names()).map_err(|e| {
            anyhow::anyhow!(
                "detect.{key}: dataset `{}`: {e}; cyclone detection needs it (name the \
                 variable with `[detect] {key} = …` in --config)",
                info.name
            )
        })?;
        *name = stored.to_string();
    }
    if let Ok(stored) = atmorep_proto::era5::resolve(&detect.temperature, names()) {
        detect.temperature = stored.to_string();
    }
    Ok(())
}

/// Tile-mode request for the tracker's fields, named as the dataset names them (see
/// [`resolve_detect_names`]). Tiles of 36 × 72 grid points (4 × 8 tokens of 9 × 9), one time
/// step each; the loader tiles the globe once over the time range.
pub fn tracker_request(
    info: &pb::DatasetInfo,
    detect: &atmorep_track::DetectConfig,
    start: Option<&str>,
    end: Option<&str>,
) -> Result<RequestConfig> {
    let levels_of = |name: &str| -> Option<Vec<f64>> {
        info.variables
            .iter()
            .find(|v| v.name == name)
            .map(|v| v.levels.clone())
    };
    let has = |name: &str, level: f64| {
        levels_of(name).is_some_and(|ls| ls.iter().any(|&l| (l - level).abs() < 1e-6))
    };
    let level = detect.level;
    for (key, name) in [
        ("vorticity", &detect.vorticity),
        ("geopotential", &detect.geopotential),
    ] {
        if !has(name, level) {
            bail!(
                "detect.{key}: dataset `{}` has no `{name}` at {level} hPa, which cyclone \
                 detection needs (variables: {})",
                info.name,
                info.variables
                    .iter()
                    .map(|v| format!("{} {:?}", v.name, v.levels))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    // The warm core needs the upper-layer thickness: from geopotential if it has both levels,
    // else from temperature; without either the check is skipped.
    let upper = [detect.warm_core.lower_level, detect.warm_core.upper_level];
    let mut z_levels = vec![level];
    let mut t_levels = Vec::new();
    if detect.warm_core.enabled {
        if upper.iter().all(|&l| has(&detect.geopotential, l)) {
            z_levels.extend(upper.iter().filter(|&&l| (l - level).abs() > 1e-6));
        } else if upper.iter().all(|&l| has(&detect.temperature, l)) {
            t_levels.extend(upper);
        }
    }
    // Tiles of 4 × 8 tokens of 9 × 9 points; on a grid too coarse for that, one token as large
    // as the grid allows (tiles are only transport here, stitched back before detection).
    let grid = info.grid.as_ref().context("the loader sent no grid")?;
    let (num_tokens, token_size) = if grid.nlat >= 36 && grid.nlon >= 72 {
        ([1, 4, 8], [1, 9, 9])
    } else {
        ([1, 1, 1], [1, grid.nlat.min(36), grid.nlon.min(72)])
    };
    let field = |name: &str, levels: &[f64]| {
        format!(
            "[[fields]]\nname = \"{name}\"\nlevels = {levels:?}\nnum_tokens = {num_tokens:?}\n\
             token_size = {token_size:?}\nnormalization = \"none\"\npe = \"none\"\npe_width = 2\n\n"
        )
    };
    let mut toml = format!(
        "dataset = \"{}\"\nbatch_size = 16\nmode = \"tiles\"\nunits = \"physical\"\n",
        info.name
    );
    let time = info.time.as_ref().context("the loader sent no time axis")?;
    let start = start.unwrap_or(&time.start);
    let end = end.unwrap_or(&time.end);
    toml += &format!("tile_time_start = \"{start}\"\ntile_time_end = \"{end}\"\n\n");
    toml += &field(&detect.vorticity, &[level]);
    toml += &field(&detect.geopotential, &z_levels);
    if !t_levels.is_empty() {
        toml += &field(&detect.temperature, &t_levels);
    }
    Ok(RequestConfig::from_toml(&toml)?)
}

async fn run(args: &RunArgs) -> Result<()> {
    if args.loader.is_empty() {
        bail!("--loader: give at least one loader endpoint");
    }
    let mut client_config = ClientConfig::new(args.loader.clone());
    client_config.bearer_token = args.token.clone();
    if let Some(ca) = &args.ca {
        client_config.tls_ca_pem =
            Some(std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?);
    }
    let client = LoaderClient::connect(client_config).await?;
    track_with(&client, args).await.map(drop)
}

/// Tracks `args.dataset` from `client`'s loader and writes what `args` asks for (the loader
/// and TLS settings of `args` are not used: the client is already connected); with
/// `args.truth`, returns the tracks' scores against it.
pub async fn track_with(client: &LoaderClient, args: &RunArgs) -> Result<Option<EvalReport>> {
    let mut cfg = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let cfg: TrackConfig =
                toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
            cfg.validate()
                .with_context(|| format!("checking {}", path.display()))?;
            cfg
        }
        None => TrackConfig::default(),
    };
    let info = client.dataset_info(&args.dataset).await?;
    resolve_detect_names(&info, &mut cfg.detect)?;
    let request = tracker_request(
        &info,
        &cfg.detect,
        args.start.as_deref(),
        args.end.as_deref(),
    )?;
    let grid = Grid::from_proto(info.grid.as_ref().context("the loader sent no grid")?)?;
    let time = TimeAxis::from_proto(info.time.as_ref().context("the loader sent no time axis")?);
    let fields: Vec<TileField> = request.fields.iter().map(TileField::from_request).collect();
    let mut stitcher = TileStitcher::new(fields, grid.nlat, grid.nlon, time)?;

    let started = Instant::now();
    let mut stream = client.stream(request.to_proto());
    let mut snapshots = Vec::new();
    let mut bytes = 0usize;
    let progress = indicatif::ProgressBar::new_spinner().with_message("receiving tiles");
    let window = format!(
        "global tiles of `{}` from {} to {}",
        args.dataset,
        args.start.as_deref().unwrap_or("the first step"),
        args.end.as_deref().unwrap_or("the last step")
    );
    // Detection runs on a fixed cadence from the first step; the loader still sends every step.
    let cadence = i64::from(args.every_hours.max(1)) * 3600;
    let mut first = None;
    while let Some(batch) = stream.next().await {
        let batch = batch.with_context(|| window.clone())?;
        bytes += batch.payload_bytes();
        for step in stitcher.push(&batch)? {
            let snapshot = FieldSnapshot::from_stitched(grid, step)?;
            let t0 = *first.get_or_insert(snapshot.time_unix);
            if (snapshot.time_unix - t0) % cadence == 0 {
                snapshots.push(snapshot);
            }
        }
        progress.set_message(format!("{} time steps stitched", snapshots.len()));
        progress.tick();
        if batch.end_of_stream || stitcher.is_done() {
            break;
        }
    }
    for step in stitcher.finish()? {
        let snapshot = FieldSnapshot::from_stitched(grid, step)?;
        let t0 = *first.get_or_insert(snapshot.time_unix);
        if (snapshot.time_unix - t0) % cadence == 0 {
            snapshots.push(snapshot);
        }
    }
    progress.finish_and_clear();
    if snapshots.is_empty() {
        bail!("{window}: the loader sent no complete time step");
    }
    let transfer = started.elapsed().as_secs_f64();

    let detecting = Instant::now();
    let tracks = atmorep_track::track(&snapshots, &cfg)?;
    let detection = detecting.elapsed().as_secs_f64();
    write_tracks_csv(&args.out, &tracks)?;
    let steps = snapshots.len();
    println!(
        "{} tracks in {steps} time steps → {}",
        tracks.len(),
        args.out.display()
    );
    println!(
        "{:.1} time steps/s end to end: transfer and stitching {transfer:.2} s \
         ({:.0} MB), detection and linking {detection:.2} s",
        steps as f64 / (transfer + detection).max(1e-9),
        bytes as f64 / 1e6,
    );
    let reference = match &args.truth {
        Some(path) => {
            let period = snapshots
                .first()
                .zip(snapshots.last())
                .map(|(a, b)| (a.time_unix, b.time_unix));
            Some(read_reference(path, period)?)
        }
        None => None,
    };
    let report = match &reference {
        Some(reference) => Some(evaluate(&tracks, reference, &EvalConfig::default())?),
        None => None,
    };
    if let Some(report) = &report {
        print!("{report}");
    }
    if let Some(map) = &args.map {
        draw_map(
            map,
            &tracks,
            reference.as_deref(),
            &MapConfig {
                title: format!("Tropical cyclones in `{}`", args.dataset),
                ..MapConfig::default()
            },
        )?;
        println!("map → {}", map.display());
    }
    Ok(report)
}
