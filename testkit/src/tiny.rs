//! The tiny synthetic ERA5 store of the cross-process tests: a 10° grid, `z` and `t` on 850 and
//! 500 hPa, steps of 6 h, written by the loader's own synthetic writer, with its global
//! statistics (which a loader needs before it serves normalized samples).

use std::path::{Path, PathBuf};

use atmorep_loader::Dataset;
use atmorep_loader::pipeline::normalization::GlobalStats;
use atmorep_loader::progress::NoProgress;
use atmorep_loader::tools::synth::{SynthConfig, write_store};

use crate::Server;

/// The tiny store's configuration with `steps` time steps.
pub fn tiny_config(steps: usize) -> SynthConfig {
    SynthConfig {
        grid_deg: 10.0,
        steps,
        step_hours: 6,
        levels: vec![850, 500],
        variables: vec!["z".into(), "t".into()],
        ..SynthConfig::default()
    }
}

/// The tiny store's configuration with 40 steps (room for the training examples' windows and a
/// validation split) of `variables`, in that order.
pub fn tiny_with(variables: &[&str]) -> SynthConfig {
    SynthConfig {
        variables: variables.iter().map(|v| v.to_string()).collect(),
        ..tiny_config(40)
    }
}

/// Writes the store of `config` at `dir/name` and computes its global statistics.
pub async fn store_with_stats(dir: &Path, name: &str, config: &SynthConfig) -> PathBuf {
    let path = dir.join(name);
    write_store(config, &path, &NoProgress).unwrap_or_else(|e| panic!("writing {name}: {e}"));
    let url = path.to_str().expect("test paths are UTF-8");
    let dataset = Dataset::open(url)
        .await
        .unwrap_or_else(|e| panic!("opening {name}: {e}"));
    GlobalStats::compute_into(
        &dataset,
        &GlobalStats::default_dir(&path),
        false,
        &NoProgress,
    )
    .await
    .unwrap_or_else(|e| panic!("statistics of {name}: {e}"));
    path
}

/// Writes `dir/tiny.zarr` (40 steps, room for the training examples' windows and a validation
/// split) with its statistics and serves it as dataset `tiny`, the log in `dir/server.log`.
pub async fn serve_tiny_store(dir: &Path) -> Server {
    let path = store_with_stats(dir, "tiny.zarr", &tiny_config(40)).await;
    let dataset = format!("tiny={}", path.display());
    Server::start(&["--dataset".into(), dataset], &dir.join("server.log"))
}
