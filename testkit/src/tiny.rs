//! The tiny synthetic ERA5 store of the cross-process tests: a 10° grid, `z` and `t` on 850 and
//! 500 hPa, steps of 6 h, written by the loader's own synthetic writer, with its global
//! statistics (which a loader needs before it serves normalized samples).

use std::path::{Path, PathBuf};

use atmorep_proto::pb;
use atmorep_proto::request::RequestConfig;

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

/// The request file of every test: `z` on both levels (BERT-masked) and `t` on 500 hPa, 2×3×6
/// tokens of 1×3×3 points (a 2-step × 90° × 180° window on the 10° grid). The training split of
/// the tiny store is 13 steps, cut into 2 blocks of 8, so an epoch has `2 · samples_per_block`
/// samples. `extra` holds more top-level keys (`end_epoch`, `resume`, …).
pub fn request_toml(dataset: &str, batch_size: u32, samples_per_block: u64, extra: &str) -> String {
    format!(
        r#"
dataset = "{dataset}"
batch_size = {batch_size}
seed = 7
samples_per_block = {samples_per_block}
{extra}

[[fields]]
name = "z"
levels = [850, 500]
num_tokens = [2, 3, 6]
token_size = [1, 3, 3]
pe = "local"
pe_width = 8
mask = {{ kind = "bert", r_max = 0.5 }}

[[fields]]
name = "t"
levels = [500]
num_tokens = [2, 3, 6]
token_size = [1, 3, 3]
pe = "global"
pe_width = 8
"#
    )
}

/// [`request_toml`] as the wire request the client library sends.
/// [`request_toml`] as the request message.
pub fn request(
    dataset: &str,
    batch_size: u32,
    samples_per_block: u64,
    extra: &str,
) -> pb::BatchRequest {
    RequestConfig::from_toml(&request_toml(dataset, batch_size, samples_per_block, extra))
        .expect("the test request parses")
        .to_proto()
}
