//! What a sample request asks for: the fields (levels, token geometry, normalization, blur,
//! positional encoding, mask), the split of the time axis, where samples come from (training
//! draws or ordered tiles) and the read plan.

use atmorep_proto::PeMode;
use serde::{Deserialize, Serialize};

use super::masking::MaskSpec;
use super::sampler::LatitudeWeighting;

/// How a field is normalized.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Normalization {
    /// One mean/std per field, level and month over the globe.
    #[default]
    Global,
    /// One mean/std per grid point, level and calendar month.
    Local,
    /// Physical units.
    None,
}

/// One field of a sample request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FieldConfig {
    /// Variable name in the store.
    pub name: String,
    /// The name the request used when it differs from the store's (another ERA5 name of the
    /// same parameter): batches carry this one, so that clients find what they asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_name: Option<String>,
    /// Level values (as the store's level coordinate has them); empty for a surface variable.
    pub levels: Vec<f64>,
    /// Tokens along (time, lat, lon).
    pub num_tokens: [usize; 3],
    /// Grid points per token along (time, lat, lon).
    pub token_size: [usize; 3],
    /// Gaussian blur sigma in grid points (0 = none).
    #[serde(default)]
    pub blur_sigma: f64,
    #[serde(default)]
    pub normalization: Normalization,
    pub pe: PeMode,
    pub pe_width: usize,
    #[serde(default)]
    pub mask: MaskSpec,
}

impl FieldConfig {
    /// The name batches carry for this field: the request's.
    pub fn reply_name(&self) -> &str {
        self.reply_name.as_deref().unwrap_or(&self.name)
    }
}

/// Which part of the time axis a stream draws from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Split {
    #[default]
    Train,
    Validation,
    Test,
}

/// Dates (ISO 8601, UTC) that cut the time axis into splits: train before `train_end`,
/// validation from `train_end` to before `validation_end`, test from `validation_end` on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitDates {
    pub train_end: String,
    pub validation_end: String,
}

/// Where samples come from.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum SampleMode {
    /// Random centres, block-local shuffled epochs (training and validation).
    #[default]
    Training,
    /// Ordered tiles covering the globe, time-major, for inference and downstream clients. All
    /// fields share one window; `overlap` is in grid points per (time, lat, lon); the time range
    /// (inclusive ISO dates) defaults to the split.
    Tiles {
        #[serde(default)]
        overlap: [usize; 3],
        #[serde(default)]
        time_start: Option<String>,
        #[serde(default)]
        time_end: Option<String>,
    },
}

/// A sample request: fields, split and read plan.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PipelineConfig {
    pub fields: Vec<FieldConfig>,
    #[serde(default)]
    pub split: Split,
    /// Fractions of the time axis for (train, validation); test gets the rest.
    #[serde(default = "default_fractions")]
    pub split_fractions: [f64; 2],
    /// Split by dates instead of fractions.
    #[serde(default)]
    pub split_dates: Option<SplitDates>,
    #[serde(default)]
    pub mode: SampleMode,
    pub seed: u64,
    /// Time steps per planned block read.
    pub block_steps: usize,
    /// Samples cut from each block per epoch.
    pub samples_per_block: u64,
    /// Blocks open at once (the shuffle buffer).
    pub buffer_blocks: u64,
    #[serde(default)]
    pub latitude_weighting: LatitudeWeighting,
}

fn default_fractions() -> [f64; 2] {
    [0.8, 0.1]
}
