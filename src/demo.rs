//! `atmorep demo`: the whole system on one machine with an embedded default — a synthetic ERA5
//! store with cyclones, its statistics, the loader service on loopback, and a client in the
//! same process that streams an epoch of token batches over real gRPC and checks it.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use atmorep_loader::Dataset;
use atmorep_loader::normalization::GlobalStats;
use atmorep_loader::service::{self, DatasetConfig, LoaderService, ServerConfig};
use atmorep_loader::synth::{SynthConfig, write_store};
use atmorep_proto::client::{ClientConfig, LoaderClient};
use atmorep_proto::request::RequestConfig;
use clap::Args;

use crate::pull::{Consume, consume};

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Output folder (the store, its statistics and reports go here).
    #[arg(long, default_value = "demo")]
    out: PathBuf,
    /// Grid spacing of the synthetic store in degrees.
    #[arg(long, default_value_t = 1.0)]
    grid: f64,
}

/// The demo's request: two fields on two pressure levels, BERT-masked temperature and
/// forecast-masked geopotential, 12-hour windows of 4×8 tokens.
const DEMO_REQUEST: &str = r#"
dataset = "demo"
batch_size = 8
seed = 1
[[fields]]
name = "t"
levels = [850, 500]
num_tokens = [4, 4, 8]
token_size = [3, 6, 6]
pe = "local"
pe_width = 16
mask = { kind = "bert", r_max = 0.5 }
[[fields]]
name = "z"
levels = [850, 500]
num_tokens = [4, 4, 8]
token_size = [3, 6, 6]
pe = "global"
pe_width = 16
mask = { kind = "forecast", steps = 1 }
"#;

pub async fn demo(args: DemoArgs) -> Result<()> {
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let store = args.out.join("era5.zarr");
    let synth = SynthConfig {
        grid_deg: args.grid,
        ..SynthConfig::default()
    };
    println!("1/5 synthetic ERA5 → {}", store.display());
    let written = store.clone();
    let summary = tokio::task::spawn_blocking(move || write_store(&synth, &written))
        .await?
        .context("writing the synthetic store")?;

    println!("2/5 normalization statistics");
    let url = store.to_str().context("non-UTF-8 path")?.to_string();
    let dataset = Arc::new(Dataset::open(&url).await?);
    let stats_dir = GlobalStats::default_dir(&store);
    GlobalStats::compute_into(&dataset, &stats_dir, false, true).await?;

    println!("3/5 loader service on loopback");
    let config = ServerConfig::with_datasets(vec![DatasetConfig {
        name: "demo".into(),
        url,
        description: "synthetic ERA5 with two tropical cyclones".into(),
        stats: Some(stats_dir),
    }]);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let service = LoaderService::open(config).await?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(service::run(service, listener, async {
        let _ = stopped.await;
    }));

    println!("4/5 one epoch streamed over gRPC from {addr}");
    let client = LoaderClient::connect(ClientConfig::new(vec![format!("http://{addr}")])).await?;
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
    println!("report: {}", path.display());

    println!("5/5 tropical cyclones tracked in the loader's global tiles");
    crate::track::track_with(
        &client,
        &crate::track::RunArgs {
            loader: Vec::new(),
            dataset: "demo".into(),
            start: None,
            end: None,
            out: args.out.join("tracks.csv"),
            map: Some(args.out.join("tracks.png")),
            truth: Some(summary.tracks_csv),
            config: None,
            every_hours: 6,
            token: None,
            ca: None,
        },
    )
    .await?;

    let _ = stop.send(());
    server.await??;
    Ok(())
}
