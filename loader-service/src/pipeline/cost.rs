//! What a request costs the server, computed from the request and the dataset's extents before
//! anything is allocated: tokens per sample, positional-encoding bytes, read-window bytes (the
//! blur halo included), batch bytes, samples per epoch with the sample-order and read-plan
//! entries an epoch holds, and blur taps. Every product is checked: a request whose numbers do
//! not describe a sample of this dataset (a window larger than the grid, zero extents, products
//! that overflow, a blur halo beyond the grid) is [`CostError::Invalid`]; one that would cost
//! more than the server allows ([`RequestLimits`]) is [`CostError::OverLimit`]. Both name the
//! request field, its value and, when over a limit, the limit's configuration key.
//!
//! The pipeline builds positional encodings, epoch orders and tiles only after the cost is
//! known, so no request can make the server allocate what it cannot hold; operators set the limits
//! (docs/operations.md, "Request limits").

use std::ops::Range;

use super::{PipelineConfig, PipelineError, SampleMode, prepare};
use crate::store::dataset::Dataset;

/// Default of [`RequestLimits::max_tokens_per_sample`].
pub const DEFAULT_MAX_TOKENS_PER_SAMPLE: u64 = 131_072;
/// Default of [`RequestLimits::max_batch_mib`].
pub const DEFAULT_MAX_BATCH_MIB: u64 = 512;
/// Default of [`RequestLimits::max_window_mib`].
pub const DEFAULT_MAX_WINDOW_MIB: u64 = 64;
/// Default of [`RequestLimits::max_samples_per_epoch`].
pub const DEFAULT_MAX_SAMPLES_PER_EPOCH: u64 = 1 << 23;
/// Default of [`RequestLimits::max_blur_sigma`].
pub const DEFAULT_MAX_BLUR_SIGMA: f64 = 16.0;

/// Bytes of one sample-order entry (a sample id).
const ENTRY_BYTES: u64 = 8;
/// Token-info values per token (see `atmorep_proto::token_info`).
const TOKEN_INFO: u64 = 8;
const MIB: u64 = 1 << 20;

/// The server's limits on one request (the `max_*` keys of the server configuration).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RequestLimits {
    /// Tokens of one sample, summed over its fields and levels.
    pub max_tokens_per_sample: u64,
    /// One batch in memory: sources, targets, token info and positional encodings.
    pub max_batch_mib: u64,
    /// The server's memory budget: a batch larger than the whole budget could never be
    /// reserved, so it bounds batches too.
    pub memory_budget_mib: u64,
    /// The read windows of one sample (blur halos included), before tokenization.
    pub max_window_mib: u64,
    /// Samples in one epoch (training: blocks × samples per block; tiles: tiles), which bounds
    /// the epoch order each stream holds.
    pub max_samples_per_epoch: u64,
    /// Gaussian blur sigma in grid points.
    pub max_blur_sigma: f64,
}

impl Default for RequestLimits {
    fn default() -> Self {
        Self {
            max_tokens_per_sample: DEFAULT_MAX_TOKENS_PER_SAMPLE,
            max_batch_mib: DEFAULT_MAX_BATCH_MIB,
            memory_budget_mib: u64::MAX / MIB,
            max_window_mib: DEFAULT_MAX_WINDOW_MIB,
            max_samples_per_epoch: DEFAULT_MAX_SAMPLES_PER_EPOCH,
            max_blur_sigma: DEFAULT_MAX_BLUR_SIGMA,
        }
    }
}

impl RequestLimits {
    /// No limits at all: only nonsense is refused (the in-process pipeline).
    pub fn unlimited() -> Self {
        Self {
            max_tokens_per_sample: u64::MAX,
            max_batch_mib: u64::MAX / MIB,
            memory_budget_mib: u64::MAX / MIB,
            max_window_mib: u64::MAX / MIB,
            max_samples_per_epoch: u64::MAX,
            max_blur_sigma: f64::INFINITY,
        }
    }

    /// The largest batch in bytes and the key that sets it (the smaller of the batch limit
    /// and the memory budget).
    pub fn batch_limit(&self) -> (u64, String) {
        if self.memory_budget_mib < self.max_batch_mib {
            (
                self.memory_budget_mib.saturating_mul(MIB),
                format!(
                    "memory_budget_mib = {} ({})",
                    self.memory_budget_mib,
                    bytes(self.memory_budget_mib.saturating_mul(MIB))
                ),
            )
        } else {
            (
                self.max_batch_mib.saturating_mul(MIB),
                format!(
                    "max_batch_mib = {} ({})",
                    self.max_batch_mib,
                    bytes(self.max_batch_mib.saturating_mul(MIB))
                ),
            )
        }
    }

    /// The largest blur sigma on a grid of `nlat` latitudes: the configured maximum, and no
    /// more than keeps the halo (`ceil(4σ)` rows) inside the grid.
    pub fn blur_sigma_on(&self, nlat: usize) -> f64 {
        self.max_blur_sigma
            .min(nlat.saturating_sub(1) as f64 / 4.0)
            .max(0.0)
    }
}

/// Why a request is refused before anything is allocated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CostError {
    /// The request does not describe a sample of this dataset: INVALID_ARGUMENT.
    #[error("{message}")]
    Invalid { field: String, message: String },
    /// The request is sound but costs more than the server allows: RESOURCE_EXHAUSTED.
    #[error("{message}")]
    OverLimit {
        field: String,
        limit: &'static str,
        message: String,
    },
}

impl CostError {
    /// The request field the error names.
    pub fn field(&self) -> &str {
        match self {
            Self::Invalid { field, .. } | Self::OverLimit { field, .. } => field,
        }
    }
}

fn invalid(field: String, message: String) -> CostError {
    CostError::Invalid { field, message }
}

/// The extents a cost is computed against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GridExtent {
    /// Time steps of the dataset.
    pub steps: usize,
    pub nlat: usize,
    pub nlon: usize,
}

/// One field's share of a sample.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldCost {
    /// The variable, as the store names it.
    pub name: String,
    pub levels: u64,
    /// Grid points along (time, lat, lon).
    pub window: [u64; 3],
    pub tokens: u64,
    /// Values of the window over all levels.
    pub values: u64,
    /// Positional encoding of one sample, f32.
    pub pe_bytes: u64,
    /// The read window of one sample with its blur halo, f32.
    pub window_bytes: u64,
    /// Blur halo in grid points (`ceil(4σ)`; 0 without blur).
    pub blur_radius: u64,
    /// Kernel taps per grid point, both passes (0 without blur).
    pub blur_taps: u64,
}

/// What an epoch of the request visits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EpochShape {
    Training { blocks: u64, samples_per_block: u64 },
    Tiles { tiles: [u64; 3] },
}

/// Everything one request costs, per sample, per batch and per epoch.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestCost {
    pub fields: Vec<FieldCost>,
    pub batch_size: u64,
    pub tokens_per_sample: u64,
    /// One sample in memory: sources, targets, token info and positional encodings (the share
    /// of the memory budget a sample reserves).
    pub sample_bytes: u64,
    pub batch_bytes: u64,
    pub pe_bytes_per_batch: u64,
    /// Read windows of one sample.
    pub window_bytes: u64,
    pub samples_per_epoch: u64,
    /// Sample ids of the open blocks' shuffle buffer (training) or the tile list (tiles).
    pub read_plan_entries: u64,
    /// The epoch order, a rank's shard of it and the read plan, as sample ids.
    pub plan_bytes: u64,
    pub epoch: EpochShape,
}

/// Bytes a sample of one field holds while it is assembled and sent, in f32: sources and
/// targets, token info and the positional encoding.
pub fn field_sample_bytes(values: u64, tokens: u64, pe_width: u64) -> Option<u64> {
    let per_token = TOKEN_INFO.checked_add(pe_width)?;
    values
        .checked_mul(2)?
        .checked_add(tokens.checked_mul(per_token)?)?
        .checked_mul(4)
}

/// Tiles of `tile_starts` along an axis of `n` points, without listing them.
pub fn tile_count(n: u64, window: u64, overlap: u64, periodic: bool) -> u64 {
    let step = window.saturating_sub(overlap).max(1);
    if periodic {
        return n.div_ceil(step);
    }
    // Starts `i · step` with `i · step + window < n`, then `n − window`.
    let inner = if n > window {
        (n - window - 1) / step + 1
    } else {
        0
    };
    inner + 1
}

impl RequestCost {
    /// The cost of `config` in batches of `batch_size` against `dataset`, or why it is nonsense.
    pub fn of(
        dataset: &Dataset,
        config: &PipelineConfig,
        batch_size: usize,
    ) -> Result<Self, PipelineError> {
        let split = prepare::split_range(dataset, config)?;
        let steps = match &config.mode {
            SampleMode::Training => split,
            SampleMode::Tiles {
                time_start,
                time_end,
                ..
            } => prepare::tile_time_range(dataset, &split, [time_start, time_end])?,
        };
        let grid = GridExtent {
            steps: dataset.times.len(),
            nlat: dataset.lats.len(),
            nlon: dataset.lons.len(),
        };
        Ok(Self::compute(config, batch_size, grid, steps)?)
    }

    /// The cost of `config` on `grid`, its epochs drawn from the time steps `epoch_steps`.
    pub fn compute(
        config: &PipelineConfig,
        batch_size: usize,
        grid: GridExtent,
        epoch_steps: Range<usize>,
    ) -> Result<Self, CostError> {
        let overflow = |field: String, what: &str| {
            let message = format!("{field}: {what} overflows 64 bits");
            invalid(field, message)
        };
        let fields = config
            .fields
            .iter()
            .enumerate()
            .map(|(i, f)| field_cost(i, f, grid))
            .collect::<Result<Vec<_>, _>>()?;
        let batch = batch_size as u64;
        if batch == 0 {
            return Err(invalid(
                "batch_size".into(),
                "batch_size = 0: must be positive".into(),
            ));
        }
        let mut tokens_per_sample = 0u64;
        let mut sample_bytes = 0u64;
        let mut window_bytes = 0u64;
        let mut pe_bytes = 0u64;
        for (i, (f, fc)) in fields.iter().zip(&config.fields).enumerate() {
            let at = format!("fields[{i}]");
            let bytes = field_sample_bytes(f.values, f.tokens, fc.pe_width as u64)
                .ok_or_else(|| overflow(format!("{at}.pe_width"), "the sample's bytes"))?;
            let sums = [
                tokens_per_sample.checked_add(f.tokens),
                sample_bytes.checked_add(bytes),
                window_bytes.checked_add(f.window_bytes),
                pe_bytes.checked_add(f.pe_bytes),
            ];
            let [Some(t), Some(s), Some(w), Some(p)] = sums else {
                return Err(overflow(format!("{at}.num_tokens"), "the sample's size"));
            };
            (tokens_per_sample, sample_bytes, window_bytes, pe_bytes) = (t, s, w, p);
        }
        let batch_bytes = sample_bytes
            .checked_mul(batch)
            .ok_or_else(|| overflow("batch_size".into(), "the batch's bytes"))?;
        let pe_bytes_per_batch = pe_bytes
            .checked_mul(batch)
            .ok_or_else(|| overflow("batch_size".into(), "the batch's bytes"))?;
        let (epoch, samples_per_epoch, read_plan_entries) =
            epoch_cost(config, &fields, grid, &epoch_steps)?;
        let plan_bytes = samples_per_epoch
            .checked_mul(2)
            .and_then(|n| n.checked_add(read_plan_entries))
            .and_then(|n| n.checked_mul(ENTRY_BYTES))
            .ok_or_else(|| overflow("read_plan.samples_per_block".into(), "the epoch order"))?;
        Ok(Self {
            fields,
            batch_size: batch,
            tokens_per_sample,
            sample_bytes,
            batch_bytes,
            pe_bytes_per_batch,
            window_bytes,
            samples_per_epoch,
            read_plan_entries,
            plan_bytes,
            epoch,
        })
    }

    /// Checks the cost against the server's `limits`; the error names the request field that
    /// pays most of what is over.
    pub fn check(&self, config: &PipelineConfig, limits: &RequestLimits) -> Result<(), CostError> {
        let over = |field: String, limit: &'static str, message: String| CostError::OverLimit {
            field,
            limit,
            message,
        };
        let largest = |key: fn(&FieldCost) -> u64| {
            // The first of equals: the field the client listed first.
            (0..self.fields.len())
                .max_by_key(|&i| (key(&self.fields[i]), std::cmp::Reverse(i)))
                .unwrap_or(0)
        };

        if self.tokens_per_sample > limits.max_tokens_per_sample {
            let i = largest(|f| f.tokens);
            let (f, fc) = (&self.fields[i], &config.fields[i]);
            return Err(over(
                format!("fields[{i}].num_tokens"),
                "max_tokens_per_sample",
                format!(
                    "fields[{i}].num_tokens = {:?} gives {} tokens per sample ({} levels of \
                     `{}`; {} tokens in all), over the limit max_tokens_per_sample = {}",
                    fc.num_tokens,
                    f.tokens,
                    f.levels,
                    f.name,
                    self.tokens_per_sample,
                    limits.max_tokens_per_sample
                ),
            ));
        }

        for (i, fc) in config.fields.iter().enumerate() {
            if fc.blur_sigma > limits.max_blur_sigma {
                let f = &self.fields[i];
                return Err(over(
                    format!("fields[{i}].blur_sigma"),
                    "max_blur_sigma",
                    format!(
                        "fields[{i}].blur_sigma = {} gives `{}` a blur halo of {} grid points \
                         and {} kernel taps per grid point, over the limit max_blur_sigma = {}",
                        fc.blur_sigma, f.name, f.blur_radius, f.blur_taps, limits.max_blur_sigma
                    ),
                ));
            }
        }

        let window_limit = limits.max_window_mib.saturating_mul(MIB);
        if self.window_bytes > window_limit {
            let i = largest(|f| f.window_bytes);
            let (f, fc) = (&self.fields[i], &config.fields[i]);
            let (field, value) = if f.blur_radius > 0 && f.values.saturating_mul(4) <= window_limit
            {
                ("blur_sigma", fc.blur_sigma.to_string())
            } else {
                ("num_tokens", format!("{:?}", fc.num_tokens))
            };
            return Err(over(
                format!("fields[{i}].{field}"),
                "max_window_mib",
                format!(
                    "fields[{i}].{field} = {value} gives {} of read window per sample (`{}`: \
                     {} levels × {:?} grid points, a blur halo of {}; {} for the whole \
                     sample), over the limit max_window_mib = {} ({})",
                    bytes(f.window_bytes),
                    f.name,
                    f.levels,
                    f.window,
                    f.blur_radius,
                    bytes(self.window_bytes),
                    limits.max_window_mib,
                    bytes(window_limit)
                ),
            ));
        }

        let (batch_limit, batch_key) = limits.batch_limit();
        if self.batch_bytes > batch_limit {
            let limit = if batch_key.starts_with("memory") {
                "memory_budget_mib"
            } else {
                "max_batch_mib"
            };
            // The field's biggest part: its positional encoding, or its sources and targets.
            let parts = self.fields.iter().enumerate().flat_map(|(i, f)| {
                let pe = (
                    f.pe_bytes,
                    format!("fields[{i}].pe_width"),
                    config.fields[i].pe_width.to_string(),
                    "of positional encoding",
                );
                let values = (
                    f.values.saturating_mul(8),
                    format!("fields[{i}].num_tokens"),
                    format!("{:?}", config.fields[i].num_tokens),
                    "of sources and targets",
                );
                [pe, values]
            });
            let (part, field, value, what) = parts
                .enumerate()
                .max_by_key(|(k, p)| (p.0, std::cmp::Reverse(*k)))
                .map(|(_, p)| p)
                .expect("a request has at least one field");
            let part_per_batch = part.saturating_mul(self.batch_size);
            return Err(if self.sample_bytes > batch_limit {
                over(
                    field.clone(),
                    limit,
                    format!(
                        "{field} = {value} gives {} {what} per sample ({} per sample in all), \
                         over the limit {batch_key} even for a batch of one",
                        bytes(part),
                        bytes(self.sample_bytes)
                    ),
                )
            } else {
                over(
                    "batch_size".into(),
                    limit,
                    format!(
                        "batch_size = {} gives {} per batch ({} per sample; the largest part, \
                         {field} = {value}, gives {} {what} per batch), over the limit \
                         {batch_key}: at most {} samples fit",
                        self.batch_size,
                        bytes(self.batch_bytes),
                        bytes(self.sample_bytes),
                        bytes(part_per_batch),
                        batch_limit / self.sample_bytes.max(1)
                    ),
                )
            });
        }

        if self.samples_per_epoch > limits.max_samples_per_epoch {
            let (field, value, detail) = match self.epoch {
                EpochShape::Training {
                    blocks,
                    samples_per_block,
                } => (
                    "read_plan.samples_per_block",
                    samples_per_block.to_string(),
                    format!(
                        "{blocks} blocks of read_plan.block_steps = {} steps",
                        config.block_steps
                    ),
                ),
                EpochShape::Tiles { tiles } => (
                    "tiles.overlap",
                    match &config.mode {
                        SampleMode::Tiles { overlap, .. } => format!("{overlap:?}"),
                        SampleMode::Training => String::new(),
                    },
                    format!("{tiles:?} tiles along (time, lat, lon)"),
                ),
            };
            return Err(over(
                field.into(),
                "max_samples_per_epoch",
                format!(
                    "{field} = {value} gives {} samples per epoch ({detail}; {} of sample \
                     order per stream), over the limit max_samples_per_epoch = {}",
                    self.samples_per_epoch,
                    bytes(self.plan_bytes),
                    limits.max_samples_per_epoch
                ),
            ));
        }
        Ok(())
    }
}

/// One field's cost; nonsense (zero or overflowing extents, a window or blur halo larger than
/// the grid) is an error naming `fields[i]`.
fn field_cost(i: usize, fc: &super::FieldConfig, grid: GridExtent) -> Result<FieldCost, CostError> {
    let at = format!("fields[{i}]");
    let name = &fc.name;
    let (num_tokens, token_size) = (fc.num_tokens, fc.token_size);
    for (key, extents) in [("num_tokens", num_tokens), ("token_size", token_size)] {
        if extents.contains(&0) {
            return Err(invalid(
                format!("{at}.{key}"),
                format!("{at}.{key} = {extents:?} (field `{name}`): every extent must be positive"),
            ));
        }
    }
    let geometry = format!(
        "{at}.num_tokens = {num_tokens:?} × {at}.token_size = {token_size:?} (field `{name}`)"
    );
    let mut window = [0u64; 3];
    for a in 0..3 {
        window[a] = (num_tokens[a] as u64)
            .checked_mul(token_size[a] as u64)
            .ok_or_else(|| {
                invalid(
                    format!("{at}.num_tokens"),
                    format!("{geometry}: the window overflows 64 bits"),
                )
            })?;
    }
    for (a, axis, n) in [
        (0, "time steps", grid.steps),
        (1, "latitudes", grid.nlat),
        (2, "longitudes", grid.nlon),
    ] {
        if window[a] > n as u64 {
            return Err(invalid(
                format!("{at}.num_tokens"),
                format!(
                    "{geometry} is a window of {window:?} grid points, which does not fit the \
                     dataset: {} {axis}, more than its {n}",
                    window[a]
                ),
            ));
        }
    }
    // A surface variable is one level; a level variable without levels is refused elsewhere.
    let levels = fc.levels.len().max(1) as u64;
    let too_big = || {
        invalid(
            format!("{at}.num_tokens"),
            format!("{geometry}: the sample's size overflows 64 bits"),
        )
    };
    let tokens = num_tokens
        .iter()
        .try_fold(levels, |n, &k| n.checked_mul(k as u64))
        .ok_or_else(too_big)?;
    let values = window
        .iter()
        .try_fold(levels, |n, &k| n.checked_mul(k))
        .ok_or_else(too_big)?;
    let pe_bytes = tokens
        .checked_mul(fc.pe_width as u64)
        .and_then(|n| n.checked_mul(4))
        .ok_or_else(|| {
            invalid(
                format!("{at}.pe_width"),
                format!(
                    "{at}.pe_width = {}: the positional encoding overflows 64 bits",
                    fc.pe_width
                ),
            )
        })?;

    let sigma = fc.blur_sigma;
    if !sigma.is_finite() || sigma < 0.0 {
        return Err(invalid(
            format!("{at}.blur_sigma"),
            format!("{at}.blur_sigma = {sigma}: must be finite and ≥ 0"),
        ));
    }
    // The blur's truncation radius, `ceil(4σ)`: the halo a window reads around itself.
    let radius_f = (4.0 * sigma).ceil();
    if radius_f >= grid.nlat as f64 {
        return Err(invalid(
            format!("{at}.blur_sigma"),
            format!(
                "{at}.blur_sigma = {sigma} (field `{name}`) needs a blur halo of {radius_f} grid \
                 points, beyond the dataset's {} latitudes (sigma at most {} here)",
                grid.nlat,
                grid.nlat.saturating_sub(1) as f64 / 4.0
            ),
        ));
    }
    let radius = radius_f as u64;
    let blur_taps = if radius > 0 { 2 * (2 * radius + 1) } else { 0 };
    // As `window_tokens` reads it: the halo clipped at the poles, and in longitude to what
    // leaves the window's own columns once.
    let (nlat, nlon) = (grid.nlat as u64, grid.nlon as u64);
    let rows = (window[1] + 2 * radius).min(nlat);
    let cols = window[2] + 2 * radius.min((nlon - window[2]) / 2);
    let window_bytes = [window[0], rows, cols, 4]
        .iter()
        .try_fold(levels, |n, &k| n.checked_mul(k))
        .ok_or_else(too_big)?;
    Ok(FieldCost {
        name: name.clone(),
        levels,
        window,
        tokens,
        values,
        pe_bytes,
        window_bytes,
        blur_radius: radius,
        blur_taps,
    })
}

/// (shape, samples per epoch, read-plan entries) of the request's epochs over `steps`.
fn epoch_cost(
    config: &PipelineConfig,
    fields: &[FieldCost],
    grid: GridExtent,
    steps: &Range<usize>,
) -> Result<(EpochShape, u64, u64), CostError> {
    let len = steps.len() as u64;
    match &config.mode {
        SampleMode::Training => {
            let max_steps = fields.iter().map(|f| f.window[0]).max().unwrap_or(1);
            let block_steps = config.block_steps as u64;
            let spb = config.samples_per_block;
            // A block shorter than the window is refused by the planner, which allocates
            // nothing before it does.
            let blocks = if block_steps == 0 || block_steps < max_steps {
                0
            } else {
                len / block_steps + u64::from(len % block_steps >= max_steps)
            };
            let samples = blocks.checked_mul(spb).ok_or_else(|| {
                invalid(
                    "read_plan.samples_per_block".into(),
                    format!(
                        "read_plan.samples_per_block = {spb}: {blocks} blocks × {spb} samples \
                         overflows 64 bits"
                    ),
                )
            })?;
            let open = config.buffer_blocks.min(blocks).saturating_mul(spb);
            Ok((
                EpochShape::Training {
                    blocks,
                    samples_per_block: spb,
                },
                samples,
                open,
            ))
        }
        SampleMode::Tiles { overlap, .. } => {
            let window = fields.first().map_or([1; 3], |f| f.window);
            if overlap.iter().zip(window).any(|(&o, w)| o as u64 >= w) {
                return Err(invalid(
                    "tiles.overlap".into(),
                    format!(
                        "tiles.overlap = {overlap:?}: each must be smaller than the window \
                         {window:?}"
                    ),
                ));
            }
            // A window longer than the range is refused by the tiling, before it lists tiles.
            if window[0] > len {
                return Ok((EpochShape::Tiles { tiles: [0; 3] }, 0, 0));
            }
            let tiles = [
                tile_count(len, window[0], overlap[0] as u64, false),
                tile_count(grid.nlat as u64, window[1], overlap[1] as u64, false),
                tile_count(grid.nlon as u64, window[2], overlap[2] as u64, true),
            ];
            let count = tiles
                .iter()
                .try_fold(1u64, |n, &k| n.checked_mul(k))
                .ok_or_else(|| {
                    invalid(
                        "tiles.overlap".into(),
                        format!("tiles.overlap = {overlap:?}: the tile count overflows 64 bits"),
                    )
                })?;
            Ok((EpochShape::Tiles { tiles }, count, count))
        }
    }
}

/// `n` bytes for a message: "16.4 GB" (SI units, as `df -H` and memory errors print them).
fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["kB", "MB", "GB", "TB", "PB", "EB"];
    if n < 1000 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1000.0;
    let mut unit = 0;
    while value >= 1000.0 && unit + 1 < UNITS.len() {
        value /= 1000.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;
    use atmorep_proto::stitch::tile_starts;

    /// The 0.25° ERA5 grid with `steps` time steps.
    fn era5(steps: usize) -> GridExtent {
        GridExtent {
            steps,
            nlat: 721,
            nlon: 1440,
        }
    }

    /// examples/reference.toml: 2 fields × 5 levels, 12×6×12 tokens of 3×9×9, PE width 16,
    /// 128 samples per block of 48 steps (its batch size, 16, is the stream's).
    fn reference() -> PipelineConfig {
        toml::from_str(include_str!("../../../examples/reference.toml"))
            .expect("examples/reference.toml is a pipeline request")
    }

    fn cost(
        config: &PipelineConfig,
        batch: usize,
        grid: GridExtent,
    ) -> Result<RequestCost, CostError> {
        RequestCost::compute(config, batch, grid, 0..grid.steps)
    }

    fn over_limit(result: Result<(), CostError>) -> (String, &'static str, String) {
        match result {
            Err(CostError::OverLimit {
                field,
                limit,
                message,
            }) => (field, limit, message),
            other => panic!("expected a limit to be hit, got {other:?}"),
        }
    }

    fn nonsense(result: Result<RequestCost, CostError>) -> (String, String) {
        match result {
            Err(CostError::Invalid { field, message }) => (field, message),
            other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
        }
    }

    #[test]
    fn the_reference_request_fits_the_default_limits_comfortably() {
        let config = reference();
        let limits = RequestLimits {
            memory_budget_mib: 1024,
            ..RequestLimits::default()
        };
        // The reference store (48 hourly steps) and forty years of hourly ERA5.
        for steps in [48, 40 * 8766] {
            let c = cost(&config, 16, era5(steps)).unwrap();
            c.check(&config, &limits).unwrap();
            assert_eq!(c.tokens_per_sample, 2 * 5 * 12 * 6 * 12);
            assert_eq!(c.fields[0].window, [36, 54, 108]);
            assert_eq!(c.fields[0].values, 5 * 36 * 54 * 108);
            assert_eq!(c.fields[0].pe_bytes, 4 * 5 * 864 * 16);
            assert_eq!(
                c.sample_bytes,
                2 * 4 * (2 * 5 * 36 * 54 * 108 + 5 * 864 * 24)
            );
            assert_eq!(c.batch_bytes, 16 * c.sample_bytes);
            // Headroom: at least 1.5× on each bound.
            assert!(2 * c.batch_bytes < 3 * limits.batch_limit().0, "{c:?}");
            assert!(
                3 * c.tokens_per_sample < limits.max_tokens_per_sample,
                "{c:?}"
            );
            assert!(3 * c.window_bytes < limits.max_window_mib * MIB, "{c:?}");
            assert!(
                3 * c.samples_per_epoch < limits.max_samples_per_epoch,
                "{c:?}"
            );
            println!(
                "reference on {steps} steps: {} tokens/sample, {} per batch of 16, {} of \
                 windows per sample, {} samples/epoch ({} of order)",
                c.tokens_per_sample,
                bytes(c.batch_bytes),
                bytes(c.window_bytes),
                c.samples_per_epoch,
                bytes(c.plan_bytes)
            );
        }
        assert_eq!(cost(&config, 16, era5(48)).unwrap().samples_per_epoch, 128);
    }

    #[test]
    fn the_issue_request_is_refused_before_its_positional_encoding_is_built() {
        // num_tokens [1, 1000, 1000] of 1×1×1 points, standard PE of width 4096 on a 3° grid.
        let mut config = reference();
        config.fields.truncate(1);
        let f = &mut config.fields[0];
        (f.num_tokens, f.token_size, f.pe_width) = ([1, 1000, 1000], [1, 1, 1], 4096);
        f.pe = atmorep_proto::PeMode::Standard;
        let grid = GridExtent {
            steps: 4,
            nlat: 61,
            nlon: 120,
        };
        let (field, message) = nonsense(cost(&config, 1, grid));
        assert_eq!(field, "fields[0].num_tokens");
        assert!(
            message.contains("1000 latitudes, more than its 61"),
            "{message}"
        );
        assert!(message.contains("`t`"), "{message}");

        // The same PE on a window that fits: a single sample is over the batch limit.
        let f = &mut config.fields[0];
        (f.num_tokens, f.levels) = ([4, 61, 120], vec![1000.0, 850.0]);
        let c = cost(&config, 1, grid).unwrap();
        assert_eq!(c.fields[0].pe_bytes, 4 * 2 * 4 * 61 * 120 * 4096);
        let (field, limit, message) = over_limit(c.check(&config, &RequestLimits::default()));
        assert_eq!(
            (field.as_str(), limit),
            ("fields[0].pe_width", "max_batch_mib")
        );
        assert!(
            message.starts_with("fields[0].pe_width = 4096 gives 959.4 MB of positional"),
            "{message}"
        );
        assert!(
            message.contains("max_batch_mib = 512 (536.9 MB)"),
            "{message}"
        );
    }

    #[test]
    fn each_limit_is_hit_and_named() {
        let config = reference();
        let grid = era5(48);
        let c = cost(&config, 16, grid).unwrap();
        let limited = |edit: fn(&mut RequestLimits)| {
            let mut limits = RequestLimits::default();
            edit(&mut limits);
            over_limit(c.check(&config, &limits))
        };

        let (field, limit, message) = limited(|l| l.max_tokens_per_sample = 8000);
        assert_eq!(
            (field.as_str(), limit),
            ("fields[0].num_tokens", "max_tokens_per_sample")
        );
        assert!(
            message.contains("[12, 6, 12] gives 4320 tokens"),
            "{message}"
        );
        assert!(message.contains("8640 tokens in all"), "{message}");

        let (field, limit, message) = limited(|l| l.max_window_mib = 4);
        assert_eq!(
            (field.as_str(), limit),
            ("fields[0].num_tokens", "max_window_mib")
        );
        assert!(message.contains("max_window_mib = 4 (4.2 MB)"), "{message}");

        // 16 samples of 17.6 MB: the batch is over, one sample is not.
        let (field, limit, message) = limited(|l| l.max_batch_mib = 100);
        assert_eq!((field.as_str(), limit), ("batch_size", "max_batch_mib"));
        assert!(
            message.contains("batch_size = 16 gives 282.0 MB per batch"),
            "{message}"
        );
        assert!(message.contains("at most 5 samples fit"), "{message}");
        assert!(message.contains("fields[0].num_tokens"), "{message}");
        // The memory budget binds when it is the smaller.
        let (field, limit, message) = limited(|l| l.memory_budget_mib = 64);
        assert_eq!((field.as_str(), limit), ("batch_size", "memory_budget_mib"));
        assert!(
            message.contains("memory_budget_mib = 64 (67.1 MB)"),
            "{message}"
        );

        let (field, limit, message) = limited(|l| l.max_samples_per_epoch = 100);
        assert_eq!(
            (field.as_str(), limit),
            ("read_plan.samples_per_block", "max_samples_per_epoch")
        );
        assert!(
            message.contains("= 128 gives 128 samples per epoch"),
            "{message}"
        );

        // Blur: over the configured sigma, and its halo inflating the read window.
        let mut blurred = config.clone();
        blurred.fields[1].blur_sigma = 20.0;
        let c = cost(&blurred, 16, grid).unwrap();
        assert_eq!(c.fields[1].blur_radius, 80);
        assert_eq!(c.fields[1].blur_taps, 2 * 161);
        assert_eq!(
            c.fields[1].window_bytes,
            4 * 5 * 36 * (54 + 160) * (108 + 160)
        );
        let (field, limit, message) = over_limit(c.check(&blurred, &RequestLimits::default()));
        assert_eq!(
            (field.as_str(), limit),
            ("fields[1].blur_sigma", "max_blur_sigma")
        );
        assert!(
            message.contains("= 20 gives `z` a blur halo of 80"),
            "{message}"
        );
        let limits = RequestLimits {
            max_blur_sigma: 20.0,
            max_window_mib: 32,
            ..RequestLimits::default()
        };
        let (field, limit, _) = over_limit(c.check(&blurred, &limits));
        assert_eq!(
            (field.as_str(), limit),
            ("fields[1].blur_sigma", "max_window_mib")
        );
        c.check(
            &blurred,
            &RequestLimits {
                max_window_mib: 64,
                ..limits
            },
        )
        .unwrap();
    }

    #[test]
    fn nonsense_is_invalid_and_names_the_field() {
        let grid = era5(48);
        let edited = |edit: fn(&mut PipelineConfig)| {
            let mut config = reference();
            edit(&mut config);
            nonsense(cost(&config, 16, grid))
        };
        let (field, message) = edited(|c| c.fields[1].num_tokens = [12, 81, 12]);
        assert_eq!(field, "fields[1].num_tokens");
        assert!(
            message.contains("729 latitudes, more than its 721"),
            "{message}"
        );
        let (field, _) = edited(|c| c.fields[0].num_tokens = [12, 6, 161]);
        assert_eq!(field, "fields[0].num_tokens");
        let (field, _) = edited(|c| c.fields[0].num_tokens = [17, 6, 12]);
        assert_eq!(field, "fields[0].num_tokens");
        let (field, _) = edited(|c| c.fields[0].token_size = [3, 0, 9]);
        assert_eq!(field, "fields[0].token_size");
        // Extents whose product overflows.
        let (field, message) = edited(|c| {
            c.fields[0].num_tokens = [usize::MAX; 3];
            c.fields[0].token_size = [usize::MAX; 3];
        });
        assert_eq!(field, "fields[0].num_tokens");
        assert!(message.contains("overflows"), "{message}");
        let (field, message) = edited(|c| c.samples_per_block = u64::MAX);
        assert_eq!(field, "read_plan.samples_per_block");
        assert!(message.contains("overflows"), "{message}");
        // A blur halo beyond the grid: ceil(4 · 180.25) = 721 rows.
        let (field, message) = edited(|c| c.fields[0].blur_sigma = 180.25);
        assert_eq!(field, "fields[0].blur_sigma");
        assert!(
            message.contains("beyond the dataset's 721 latitudes"),
            "{message}"
        );
        let (field, _) = edited(|c| c.fields[0].blur_sigma = f64::NAN);
        assert_eq!(field, "fields[0].blur_sigma");
        assert!(cost(&reference(), 0, grid).is_err());
        // The largest sigma whose halo fits is accepted by the cost (a limit may still bind).
        let mut config = reference();
        config.fields[0].blur_sigma = RequestLimits::unlimited().blur_sigma_on(721);
        assert_eq!(config.fields[0].blur_sigma, 180.0);
        let c = cost(&config, 1, grid).unwrap();
        assert_eq!(c.fields[0].blur_radius, 720);
        c.check(&config, &RequestLimits::unlimited()).unwrap();
    }

    #[test]
    fn tiles_are_counted_without_listing_them() {
        for n in 1..40 {
            for window in 1..=n {
                for overlap in 0..window {
                    for periodic in [false, true] {
                        assert_eq!(
                            tile_count(n as u64, window as u64, overlap as u64, periodic),
                            tile_starts(n, window, overlap, periodic).len() as u64,
                            "n {n} window {window} overlap {overlap} periodic {periodic}"
                        );
                    }
                }
            }
        }
        // One-point tiles of a year of hourly 0.25° ERA5: 9.1 × 10⁹ samples per epoch.
        let mut config = reference();
        config.fields.truncate(1);
        (config.fields[0].num_tokens, config.fields[0].token_size) = ([1; 3], [1; 3]);
        config.mode = SampleMode::Tiles {
            overlap: [0; 3],
            time_start: None,
            time_end: None,
        };
        let c = cost(&config, 1, era5(8760)).unwrap();
        assert_eq!(c.samples_per_epoch, 8760 * 721 * 1440);
        let (field, limit, message) = over_limit(c.check(&config, &RequestLimits::default()));
        assert_eq!(
            (field.as_str(), limit),
            ("tiles.overlap", "max_samples_per_epoch")
        );
        assert!(message.contains("[8760, 721, 1440] tiles"), "{message}");
        config.mode = SampleMode::Tiles {
            overlap: [0, 1, 0],
            time_start: None,
            time_end: None,
        };
        assert_eq!(nonsense(cost(&config, 1, era5(8760))).0, "tiles.overlap");
    }

    #[test]
    fn sizes_read_as_people_write_them() {
        assert_eq!(bytes(999), "999 B");
        assert_eq!(bytes(32_768_000_000), "32.8 GB");
        assert_eq!(bytes(512 * MIB), "536.9 MB");
    }
}
