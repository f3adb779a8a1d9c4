//! The sample pipeline: from the canonical store view to token samples. Reads are planned by
//! time block: the split's time axis is cut into blocks of `block_steps`, `samples_per_block`
//! samples are drawn inside each block, and an epoch visits blocks through a bounded shuffle
//! buffer ([`crate::epoch::BlockShuffle`]), so each block's chunks are decoded once (they stay in
//! the shared chunk cache while the block is open) and many samples are cut from them. Every
//! random choice is a pure function of (seed, epoch, sample id, field).

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::Ordering as AtomicOrdering;

use atmorep_proto::calendar::parse_iso;
pub use atmorep_proto::pool::BufferPool;
use atmorep_proto::positional::{GlobalOffsets, PeInputs, encode};
use atmorep_proto::token_info::{WindowCoords, flatten, token_infos};
use atmorep_proto::tokenize::tokenize_into;
use atmorep_proto::{FieldGeometry, PeMode, TokenGeometry};
use futures::StreamExt;
use futures::future::try_join_all;
use serde::{Deserialize, Serialize};

use crate::blur::GaussianBlur;
use crate::dataset::Dataset;
use crate::epoch::{
    BlockParams, EpochCursor, EpochPlan, EpochStream, Ordering, Purpose, SampleId, sample_rng,
};
use crate::hyperslab::{Hyperslab, OutputLayout};
use crate::local_stats::LocalStats;
use crate::masking::{MaskGeometry, MaskSpec, try_apply_in_place};
use crate::normalization::{GlobalStats, year_month};
use crate::sampler::{Centre, FieldWindow, LatitudeWeighting, Sampler, Tiling};

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

/// Why a request cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Store(#[from] crate::error::StoreError),
    #[error("field `{field}`: {detail}")]
    Field { field: String, detail: String },
    #[error("invalid request: {0}")]
    Request(String),
    /// The request is fine; the statistics it needs were never computed.
    #[error("field `{field}`: {detail}")]
    MissingStatistics { field: String, detail: String },
    #[error(transparent)]
    Epoch(#[from] crate::epoch::EpochError),
    #[error(transparent)]
    Normalization(#[from] crate::normalization::NormalizationError),
}

/// A field's normalization needs statistics the server does not have.
fn stats_err(field: &str, detail: impl std::fmt::Display) -> PipelineError {
    PipelineError::MissingStatistics {
        field: field.to_string(),
        detail: detail.to_string(),
    }
}

fn field_err(field: &str, detail: impl std::fmt::Display) -> PipelineError {
    PipelineError::Field {
        field: field.to_string(),
        detail: detail.to_string(),
    }
}

/// A field with everything resolved against the store.
#[derive(Debug, Clone)]
struct PreparedField {
    config: FieldConfig,
    level_indices: Vec<usize>,
    level_values: Vec<f64>,
    geometry: FieldGeometry,
    mask_geometry: MaskGeometry,
    blur: Option<GaussianBlur>,
    /// Where each window point lands in token order.
    layout: OutputLayout,
    /// The positional encoding when it is the same for every window (computing its sines
    /// per sample took a tenth of the cut).
    fixed_pe: Option<Vec<f32>>,
}

/// One field of one sample.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldSample {
    pub name: String,
    /// Tokens after masking, (tokens, token values).
    pub source: Vec<f32>,
    /// Original values of the masked tokens, in `masked_indices` order.
    pub target: Vec<f32>,
    pub masked_indices: Vec<u32>,
    /// (tokens, 8) token info.
    pub token_info: Vec<f32>,
    /// (tokens, pe_width) positional encoding.
    pub pe: Vec<f32>,
    pub window: FieldWindow,
}

/// One sample: all fields around one centre.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub id: SampleId,
    pub epoch: u64,
    pub fields: Vec<FieldSample>,
}

impl Sample {
    /// Bytes of token payload (sources) in f32.
    pub fn payload_bytes(&self) -> usize {
        self.fields.iter().map(|f| f.source.len() * 4).sum()
    }
}

/// What [`Pipeline::batches`] streams.
#[derive(Debug, Clone)]
pub struct BatchSpec {
    pub rank: u32,
    pub world: u32,
    /// Where to start (a resume cursor, or the start of an epoch).
    pub start: EpochCursor,
    /// Stop before this epoch; `None` streams forever.
    pub end_epoch: Option<u64>,
    pub batch_size: usize,
    /// Samples assembled at once.
    pub sample_concurrency: usize,
    /// Finished batches kept ready ahead of the consumer.
    pub prefetch_batches: usize,
    /// A budget shared with other streams for samples in flight and batches not yet consumed.
    pub memory: Option<MemoryBudget>,
}

/// A byte budget shared by every stream of a server: a sample reserves its size before it is
/// assembled and the reservation travels with its batch until the batch is dropped, so memory
/// held by samples in flight and batches waiting for slow clients stays bounded no matter how
/// many clients connect.
#[derive(Debug, Clone)]
pub struct MemoryBudget {
    semaphore: Arc<tokio::sync::Semaphore>,
    /// Permits are KiB so that budgets up to terabytes fit the semaphore's counter.
    total_kib: u32,
}

impl MemoryBudget {
    /// A budget of `bytes`.
    pub fn new(bytes: u64) -> Self {
        let total_kib = (bytes / 1024).clamp(1, u64::from(u32::MAX >> 3)) as u32;
        Self {
            semaphore: Arc::new(tokio::sync::Semaphore::new(total_kib as usize)),
            total_kib,
        }
    }

    /// Waits until `bytes` (capped at the whole budget, so one oversized sample still runs
    /// alone) are free and reserves them.
    pub async fn reserve(&self, bytes: u64) -> tokio::sync::OwnedSemaphorePermit {
        let kib = (bytes.div_ceil(1024) as u32).clamp(1, self.total_kib);
        self.semaphore
            .clone()
            .acquire_many_owned(kib)
            .await
            .expect("the budget's semaphore is never closed")
    }

    /// Bytes not reserved right now.
    pub fn available_bytes(&self) -> u64 {
        self.semaphore.available_permits() as u64 * 1024
    }

    /// The whole budget in bytes.
    pub fn total_bytes(&self) -> u64 {
        u64::from(self.total_kib) * 1024
    }
}

/// One batch from [`Pipeline::batches`].
#[derive(Debug, Default)]
pub struct SampleBatch {
    pub samples: Vec<Sample>,
    /// The stream cursor after the batch's last sample: resuming there continues exactly.
    pub cursor_after: EpochCursor,
    /// The last batch of a finite stream.
    pub last: bool,
    /// This batch's share of the [`MemoryBudget`], released when the batch is dropped.
    pub reservation: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// Batches assembled ahead of the consumer by a background task; dropping it stops the task.
#[derive(Debug)]
pub struct PipelineStream {
    rx: tokio::sync::mpsc::Receiver<Result<SampleBatch, PipelineError>>,
    task: tokio::task::JoinHandle<()>,
}

impl PipelineStream {
    /// The next batch; `None` when the stream is finished.
    pub async fn next(&mut self) -> Option<Result<SampleBatch, PipelineError>> {
        self.rx.recv().await
    }
}

impl futures::Stream for PipelineStream {
    type Item = Result<SampleBatch, PipelineError>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx)
    }
}

impl Drop for PipelineStream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A prepared request against one dataset.
#[derive(Debug)]
pub struct Pipeline {
    dataset: Arc<Dataset>,
    config: PipelineConfig,
    fields: Vec<PreparedField>,
    stats: Option<Arc<GlobalStats>>,
    local: Option<Arc<LocalStats>>,
    split_range: Range<usize>,
    blocks: u64,
    plan: EpochPlan,
    /// The tiles of [`SampleMode::Tiles`]; `None` in training mode.
    tiling: Option<Tiling>,
    time_step_h: f64,
    grid_spacing: f64,
    /// Window and token buffers returned by finished samples. Reusing them spares the kernel
    /// zeroing fresh pages for every sample, which otherwise costs more than the decoding.
    pool: Arc<BufferPool>,
}

impl Pipeline {
    /// Validates `config` against the dataset (and the global statistics when a field
    /// normalizes globally).
    pub fn new(
        dataset: Arc<Dataset>,
        config: PipelineConfig,
        stats: Option<Arc<GlobalStats>>,
    ) -> Result<Self, PipelineError> {
        Self::with_statistics(dataset, config, stats, None)
    }

    /// [`Pipeline::new`] with local (per-grid-point) statistics for fields that use them.
    pub fn with_statistics(
        dataset: Arc<Dataset>,
        config: PipelineConfig,
        stats: Option<Arc<GlobalStats>>,
        local: Option<Arc<LocalStats>>,
    ) -> Result<Self, PipelineError> {
        if config.fields.is_empty() {
            return Err(PipelineError::Request("no fields requested".into()));
        }
        let nt = dataset.times.len();
        let (train_end, val_end) = match &config.split_dates {
            Some(dates) => {
                let parse = |name: &str, text: &str| {
                    parse_iso(text)
                        .map_err(|e| PipelineError::Request(format!("split_dates.{name}: {e}")))
                };
                let train = parse("train_end", &dates.train_end)?;
                let val = parse("validation_end", &dates.validation_end)?;
                if val < train {
                    return Err(PipelineError::Request(format!(
                        "split_dates: validation_end {} is before train_end {}",
                        dates.validation_end, dates.train_end
                    )));
                }
                (
                    dataset.times.partition_point(|&t| t < train),
                    dataset.times.partition_point(|&t| t < val),
                )
            }
            None => {
                let [f_train, f_val] = config.split_fractions;
                if !(0.0..=1.0).contains(&f_train)
                    || !(0.0..=1.0).contains(&f_val)
                    || f_train + f_val > 1.0
                {
                    return Err(PipelineError::Request(format!(
                        "split_fractions {:?} must be in [0, 1] and sum to at most 1",
                        config.split_fractions
                    )));
                }
                (
                    (nt as f64 * f_train).round() as usize,
                    (nt as f64 * (f_train + f_val)).round() as usize,
                )
            }
        };
        let split_range = match config.split {
            Split::Train => 0..train_end,
            Split::Validation => train_end..val_end,
            Split::Test => val_end..nt,
        };
        if config.block_steps == 0 || config.samples_per_block == 0 || config.buffer_blocks == 0 {
            return Err(PipelineError::Request(
                "block_steps, samples_per_block and buffer_blocks must be positive".into(),
            ));
        }
        let mut fields = Vec::new();
        for fc in &config.fields {
            let variable = dataset.variable(&fc.name)?;
            let mut level_indices = Vec::new();
            for level in &fc.levels {
                let index = variable
                    .levels
                    .iter()
                    .position(|l| l == level)
                    .ok_or_else(|| {
                        field_err(
                            &fc.name,
                            format!(
                                "the store has no level {level} (it has {:?})",
                                variable.levels
                            ),
                        )
                    })?;
                level_indices.push(index);
            }
            if variable.has_level() && level_indices.is_empty() {
                return Err(field_err(&fc.name, "no levels requested"));
            }
            let level_values = if variable.has_level() {
                fc.levels.clone()
            } else {
                vec![0.0]
            };
            let geometry = FieldGeometry::new(
                (0..level_values.len()).collect(),
                TokenGeometry::new(fc.num_tokens, fc.token_size),
            );
            geometry.validate().map_err(|e| field_err(&fc.name, e))?;
            atmorep_proto::positional::check_width(fc.pe_width)
                .map_err(|e| field_err(&fc.name, e))?;
            let mask_geometry = MaskGeometry {
                levels: level_values.len(),
                nt: fc.num_tokens[0],
                nlat: fc.num_tokens[1],
                nlon: fc.num_tokens[2],
                token_numel: geometry.geometry.token_numel(),
            };
            fc.mask
                .validate(&mask_geometry)
                .map_err(|e| field_err(&fc.name, e))?;
            let blur = if fc.blur_sigma > 0.0 {
                Some(GaussianBlur::new(fc.blur_sigma).map_err(|e| field_err(&fc.name, e))?)
            } else if fc.blur_sigma < 0.0 || !fc.blur_sigma.is_finite() {
                return Err(field_err(
                    &fc.name,
                    format!("blur_sigma {} must be ≥ 0", fc.blur_sigma),
                ));
            } else {
                None
            };
            if fc.normalization == Normalization::Global {
                let stats = stats.as_ref().ok_or_else(|| {
                    stats_err(
                        &fc.name,
                        "global normalization needs statistics (run `atmorep loader stats`)",
                    )
                })?;
                for &unix in &dataset.times[split_range.clone()] {
                    let (year, month) = year_month(unix);
                    for &level in &level_values {
                        if stats.get(&fc.name, level, year, month).is_none() {
                            return Err(stats_err(
                                &fc.name,
                                format!("statistics lack level {level} in {year}-{month:02}"),
                            ));
                        }
                    }
                }
            }
            if fc.normalization == Normalization::Local {
                let local = local.as_ref().ok_or_else(|| {
                    stats_err(&fc.name, "local normalization needs local statistics (`atmorep loader stats --local`)")
                })?;
                if (local.nlat, local.nlon) != (dataset.lats.len(), dataset.lons.len()) {
                    return Err(stats_err(
                        &fc.name,
                        "local statistics were computed on another grid",
                    ));
                }
                let stats = local
                    .fields
                    .get(&fc.name)
                    .ok_or_else(|| stats_err(&fc.name, "local statistics lack this field"))?;
                let plane = local.nlat * local.nlon;
                for &unix in &dataset.times[split_range.clone()] {
                    let (year, month) = year_month(unix);
                    for &level in &level_values {
                        let l = stats.levels.iter().position(|v| *v == level);
                        let covered = l.is_some_and(|l| {
                            stats.std[((month as usize - 1) * stats.levels.len() + l) * plane]
                                .is_finite()
                        });
                        if !covered {
                            return Err(stats_err(
                                &fc.name,
                                format!("local statistics lack level {level} in {year}-{month:02}"),
                            ));
                        }
                    }
                }
            }
            let fixed_pe = if fc.pe.depends_on_window() {
                None
            } else {
                Some(
                    encode(fc.pe, &geometry, fc.pe_width, &PeInputs::default())
                        .map_err(|e| field_err(&fc.name, e))?,
                )
            };
            fields.push(PreparedField {
                fixed_pe,
                layout: OutputLayout::tokens(&geometry),
                config: fc.clone(),
                level_indices,
                level_values,
                geometry,
                mask_geometry,
                blur,
            });
        }
        let max_steps = fields
            .iter()
            .map(|f| f.geometry.geometry.window()[0])
            .max()
            .unwrap_or(1);
        let (blocks, plan, tiling) = match &config.mode {
            SampleMode::Training => {
                if config.block_steps < max_steps {
                    return Err(PipelineError::Request(format!(
                        "block_steps {} is shorter than the longest window ({max_steps} steps)",
                        config.block_steps
                    )));
                }
                // Blocks tile the split; a short tail that cannot hold a window is dropped.
                let mut blocks = (split_range.len() / config.block_steps) as u64;
                if split_range.len() % config.block_steps >= max_steps {
                    blocks += 1;
                }
                if blocks == 0 {
                    return Err(PipelineError::Request(format!(
                        "the {:?} split ({} steps) has no room for one {max_steps}-step window",
                        config.split,
                        split_range.len()
                    )));
                }
                let plan = EpochPlan::new(config.seed, blocks * config.samples_per_block)
                    .with_ordering(Ordering::BlockLocal(BlockParams {
                        samples_per_block: config.samples_per_block,
                        buffer_blocks: config.buffer_blocks,
                    }));
                (blocks, plan, None)
            }
            SampleMode::Tiles {
                overlap,
                time_start,
                time_end,
            } => {
                let window = fields[0].geometry.geometry.window();
                if let Some(other) = fields
                    .iter()
                    .find(|f| f.geometry.geometry.window() != window)
                {
                    return Err(field_err(
                        &other.config.name,
                        format!(
                            "tiles need one window for all fields: {:?} here, {window:?} for `{}`",
                            other.geometry.geometry.window(),
                            fields[0].config.name
                        ),
                    ));
                }
                let bound = |name: &str, text: &Option<String>| {
                    text.as_deref()
                        .map(|t| {
                            parse_iso(t)
                                .map_err(|e| PipelineError::Request(format!("tiles.{name}: {e}")))
                        })
                        .transpose()
                };
                let start = bound("time_start", time_start)?.map_or(split_range.start, |t| {
                    dataset.times.partition_point(|&x| x < t)
                });
                let end = bound("time_end", time_end)?.map_or(split_range.end, |t| {
                    dataset.times.partition_point(|&x| x <= t)
                });
                let tiling = Tiling::new(
                    dataset.lats.len(),
                    dataset.lons.len(),
                    start..end.max(start),
                    window,
                    *overlap,
                )
                .map_err(|e| PipelineError::Request(format!("tiles: {e}")))?;
                let plan = EpochPlan::new(config.seed, tiling.tiles().len() as u64)
                    .with_ordering(Ordering::Sequential);
                (0, plan, Some(tiling))
            }
        };
        let pipeline = Self {
            time_step_h: if nt > 1 {
                (dataset.times[1] - dataset.times[0]) as f64 / 3600.0
            } else {
                1.0
            },
            grid_spacing: (dataset.lats[0] - dataset.lats[1]).abs(),
            plan,
            tiling,
            // Enough for every sample in flight of one stream; more would only hold memory.
            pool: Arc::new(BufferPool::new(64, u64::MAX)),
            dataset,
            stats,
            local,
            split_range,
            blocks,
            fields,
            config,
        };
        pipeline.plan.validate()?;
        if pipeline.tiling.is_none() {
            // One sampler up front so geometry errors surface at request time.
            pipeline.sampler(0)?;
        }
        Ok(pipeline)
    }

    /// Samples per epoch.
    pub fn num_samples(&self) -> u64 {
        self.plan.num_samples
    }

    /// The epoch plan (ordering and shards).
    pub fn plan(&self) -> &EpochPlan {
        &self.plan
    }

    /// The dataset.
    pub fn dataset(&self) -> &Arc<Dataset> {
        &self.dataset
    }

    /// Time steps of block `block`.
    fn block_range(&self, block: u64) -> Range<usize> {
        let start = self.split_range.start + block as usize * self.config.block_steps;
        start..(start + self.config.block_steps).min(self.split_range.end)
    }

    fn sampler(&self, block: u64) -> Result<Sampler, PipelineError> {
        let windows: Vec<(String, [usize; 3])> = self
            .fields
            .iter()
            .map(|f| (f.config.name.clone(), f.geometry.geometry.window()))
            .collect();
        Sampler::new(
            &self.dataset.lats,
            self.dataset.lons.len(),
            self.dataset.times.len(),
            self.block_range(block),
            &windows,
            self.config.latitude_weighting,
        )
        .map_err(|e| match e {
            crate::sampler::SamplerError::WindowTooLarge { ref field, .. }
            | crate::sampler::SamplerError::NoRoomInTime { ref field, .. } => field_err(field, &e),
            other => PipelineError::Request(other.to_string()),
        })
    }

    fn take_buffer(&self) -> Vec<f32> {
        self.pool.take()
    }

    fn return_buffer(&self, buffer: Vec<f32>) {
        self.pool.give(buffer);
    }

    /// Takes buffers from (and returns them to) `pool` instead of a pool of its own.
    pub fn with_pool(mut self, pool: Arc<BufferPool>) -> Self {
        self.pool = pool;
        self
    }

    /// The pool this pipeline's sample buffers come from and go back to.
    pub fn pool(&self) -> &Arc<BufferPool> {
        &self.pool
    }

    /// Builds sample `id` of `epoch`.
    pub async fn sample(&self, epoch: u64, id: SampleId) -> Result<Sample, PipelineError> {
        if id >= self.num_samples() {
            return Err(PipelineError::Request(format!(
                "sample id {id} is outside 0..{}",
                self.num_samples()
            )));
        }
        let windows: Vec<FieldWindow> = match &self.tiling {
            Some(tiling) => vec![tiling.tiles()[id as usize]; self.fields.len()],
            None => {
                let block = id / self.config.samples_per_block;
                let sampler = self.sampler(block)?;
                let centre = sampler.draw(&mut sample_rng(
                    self.config.seed,
                    epoch,
                    id,
                    0,
                    Purpose::Centre,
                ));
                (0..self.fields.len())
                    .map(|i| sampler.window(i, centre))
                    .collect()
            }
        };
        self.assemble(epoch, id, windows).await
    }

    /// Builds the sample centred on (`time` index, latitude, longitude in degrees): the nearest
    /// grid point, windows shifted inward at the poles. Masks and noise are drawn as for sample
    /// id `time · nlat · nlon + lat · nlon + lon` of `epoch` (for debugging and plotting).
    pub async fn sample_at(
        &self,
        epoch: u64,
        time: usize,
        lat_deg: f64,
        lon_deg: f64,
    ) -> Result<Sample, PipelineError> {
        let ds = &self.dataset;
        let (nlat, nlon) = (ds.lats.len(), ds.lons.len());
        if !(-90.0..=90.0).contains(&lat_deg) || !lon_deg.is_finite() {
            return Err(PipelineError::Request(format!(
                "centre ({lat_deg}, {lon_deg}) is not a latitude in [-90, 90] and a longitude"
            )));
        }
        let lat = (0..nlat)
            .min_by(|&a, &b| {
                (ds.lats[a] - lat_deg)
                    .abs()
                    .total_cmp(&(ds.lats[b] - lat_deg).abs())
            })
            .unwrap_or(0);
        let lon_step = 360.0 / nlon as f64;
        let lon = ((lon_deg - ds.lons[0]).rem_euclid(360.0) / lon_step).round() as usize % nlon;
        let sampler = Sampler::new(
            &ds.lats,
            nlon,
            ds.times.len(),
            0..ds.times.len(),
            &self
                .fields
                .iter()
                .map(|f| (f.config.name.clone(), f.geometry.geometry.window()))
                .collect::<Vec<_>>(),
            self.config.latitude_weighting,
        )
        .map_err(|e| PipelineError::Request(e.to_string()))?;
        let max_t = self
            .fields
            .iter()
            .map(|f| f.geometry.geometry.window()[0])
            .max()
            .unwrap_or(1);
        if time < max_t / 2 || time - max_t / 2 + max_t > ds.times.len() {
            return Err(PipelineError::Request(format!(
                "time index {time}: a {max_t}-step window around it leaves 0..{}",
                ds.times.len()
            )));
        }
        let centre = Centre { time, lat, lon };
        let windows = (0..self.fields.len())
            .map(|i| sampler.window(i, centre))
            .collect();
        let id = (time * nlat * nlon + lat * nlon + lon) as u64;
        self.assemble(epoch, id, windows).await
    }

    async fn assemble(
        &self,
        epoch: u64,
        id: SampleId,
        windows: Vec<FieldWindow>,
    ) -> Result<Sample, PipelineError> {
        let fields = try_join_all(
            self.fields
                .iter()
                .zip(windows)
                .enumerate()
                .map(|(i, (field, window))| self.field_sample(epoch, id, i as u32, field, window)),
        )
        .await?;
        Ok(Sample { id, epoch, fields })
    }

    async fn field_sample(
        &self,
        epoch: u64,
        id: SampleId,
        index: u32,
        field: &PreparedField,
        window: FieldWindow,
    ) -> Result<FieldSample, PipelineError> {
        let ds = &self.dataset;
        let nlon = ds.lons.len();
        let [wt, wy, wx] = window.size;
        let name = &field.config.name;
        let levels = if ds.variable(name)?.has_level() {
            field.level_indices.clone()
        } else {
            vec![]
        };
        let tokens = match (&field.blur, field.config.normalization) {
            // The common case cuts tokens straight from the decoded chunks, normalizing on the
            // way: one pass instead of read, normalize and tokenize.
            (None, Normalization::Global | Normalization::None) => {
                let slab = Hyperslab {
                    variable: name.clone(),
                    time: window.time_start..window.time_start + wt,
                    levels,
                    lat: window.lat_start..window.lat_start + wy,
                    lon_start: window.lon_start,
                    lon_len: wx,
                };
                let affine = match field.config.normalization {
                    Normalization::Global => {
                        let stats = self.stats.as_ref().expect("checked in Pipeline::new");
                        let mut affine = Vec::with_capacity(wt * field.level_values.len());
                        for t in 0..wt {
                            for &level in &field.level_values {
                                affine.push(stats.affine(
                                    name,
                                    level,
                                    ds.times[window.time_start + t],
                                )?);
                            }
                        }
                        Some(affine)
                    }
                    _ => None,
                };
                let out = self.pool.take_len(slab.len());
                ds.read_layout_into(&slab, &field.layout, affine.as_deref(), out)
                    .await?
            }
            _ => self.window_tokens(field, &window, levels).await?,
        };
        let mut rng = sample_rng(self.config.seed, epoch, id, index, Purpose::Mask);
        let masked = try_apply_in_place(
            &field.config.mask,
            &field.mask_geometry,
            tokens,
            self.take_buffer(),
            &mut rng,
        )
        .map_err(|e| field_err(name, e))?;
        let lats: Vec<f64> = (0..wy).map(|y| ds.lats[window.lat_start + y]).collect();
        let lons: Vec<f64> = (0..wx)
            .map(|x| ds.lons[(window.lon_start + x) % nlon])
            .collect();
        let infos = token_infos(
            &field.geometry,
            &WindowCoords {
                times_unix_s: &ds.times[window.time_start..window.time_start + wt],
                level_values: &field.level_values,
                lats_deg: &lats,
                lons_deg: &lons,
                time_step_h: self.time_step_h,
                grid_spacing_deg: self.grid_spacing,
            },
        )
        .map_err(|e| field_err(name, e))?;
        let pe = match &field.fixed_pe {
            Some(pe) => pe.clone(),
            None => {
                let offsets = GlobalOffsets::from_grid_start(
                    [window.time_start, window.lat_start, window.lon_start],
                    field.geometry.geometry.token_size,
                    Some(nlon),
                );
                encode(
                    field.config.pe,
                    &field.geometry,
                    field.config.pe_width,
                    &PeInputs {
                        global_offsets: Some(offsets),
                        token_infos: Some(&infos),
                    },
                )
                .map_err(|e| field_err(name, e))?
            }
        };
        Ok(FieldSample {
            name: name.clone(),
            source: masked.source,
            target: masked.target,
            masked_indices: masked.masked_indices,
            token_info: flatten(&infos),
            pe,
            window,
        })
    }

    /// Tokens of a field window through a window buffer: the path for blurred fields (the blur
    /// needs a halo and whole planes) and local normalization (per grid point).
    async fn window_tokens(
        &self,
        field: &PreparedField,
        window: &FieldWindow,
        levels: Vec<usize>,
    ) -> Result<Vec<f32>, PipelineError> {
        let ds = &self.dataset;
        let (nlat, nlon) = (ds.lats.len(), ds.lons.len());
        let [wt, wy, wx] = window.size;
        let name = &field.config.name;
        // A halo for the blur, wrapping in longitude and clipped at the poles.
        let r = field.blur.as_ref().map_or(0, GaussianBlur::radius);
        let halo_x = r.min((nlon - wx) / 2);
        let y0 = window.lat_start.saturating_sub(r);
        let y1 = (window.lat_start + wy + r).min(nlat);
        let slab = Hyperslab {
            variable: name.clone(),
            time: window.time_start..window.time_start + wt,
            levels,
            lat: y0..y1,
            lon_start: (window.lon_start + nlon - halo_x) % nlon,
            lon_len: wx + 2 * halo_x,
        };
        let mut values = ds.read_into(&slab, self.pool.take_len(slab.len())).await?;
        let nl = field.level_values.len();
        let (py, px) = (y1 - y0, wx + 2 * halo_x);
        if let Some(blur) = &field.blur {
            for plane in values.chunks_mut(py * px) {
                if px == nlon {
                    blur.apply_globe(plane, py, px)
                        .map_err(|e| field_err(name, e))?;
                } else {
                    blur.apply_window(plane, py, px)
                        .map_err(|e| field_err(name, e))?;
                }
            }
        }
        // Crop the halo: (time, level, lat, lon) over the window.
        let (oy, ox) = (window.lat_start - y0, halo_x);
        let mut cropped = if (py, px) == (wy, wx) {
            values
        } else {
            let mut cropped = self.take_buffer();
            cropped.clear();
            for plane in values.chunks(py * px) {
                for y in 0..wy {
                    let row = (oy + y) * px + ox;
                    cropped.extend_from_slice(&plane[row..row + wx]);
                }
            }
            self.return_buffer(values);
            cropped
        };
        match field.config.normalization {
            Normalization::Global => {
                let stats = self.stats.as_ref().expect("checked in Pipeline::new");
                for (k, plane) in cropped.chunks_mut(wy * wx).enumerate() {
                    let (t, l) = (k / nl, k % nl);
                    stats.normalize(
                        name,
                        field.level_values[l],
                        ds.times[window.time_start + t],
                        plane,
                    )?;
                }
            }
            Normalization::Local => {
                let local = self
                    .local
                    .as_ref()
                    .expect("checked in Pipeline::with_statistics");
                local.normalize(
                    name,
                    &ds.times[window.time_start..window.time_start + wt],
                    &field.level_values,
                    window.lat_start..window.lat_start + wy,
                    window.lon_start,
                    &mut cropped,
                )?;
            }
            Normalization::None => {}
        }
        let tokens = tokenize_into(&field.geometry, &cropped, self.pool.take_len(cropped.len()));
        self.return_buffer(cropped);
        Ok(tokens)
    }

    /// Hands a finished sample's large buffers back for reuse by later samples.
    pub fn recycle(&self, sample: Sample) {
        for field in sample.fields {
            self.return_buffer(field.source);
            self.return_buffer(field.target);
        }
    }

    /// Per field: (name, values per token, tokens, PE width), in request order.
    pub fn field_geometries(&self) -> Vec<(String, usize, usize, usize)> {
        self.fields
            .iter()
            .map(|f| {
                (
                    f.config.name.clone(),
                    f.geometry.geometry.token_numel(),
                    f.geometry.num_tokens_total(),
                    f.config.pe_width,
                )
            })
            .collect()
    }

    /// Bytes one sample holds at most while it is assembled and sent (sources, targets, token
    /// info and positional encodings in f32).
    pub fn sample_bytes(&self) -> u64 {
        self.fields
            .iter()
            .map(|f| {
                let tokens = f.geometry.num_tokens_total() as u64;
                let values = f.geometry.numel() as u64;
                4 * (2 * values + tokens * (8 + f.config.pe_width as u64))
            })
            .sum()
    }

    /// Batches of `spec.batch_size` samples of `rank`'s shard from `spec.start` on, assembled by a
    /// background task that keeps about `sample_concurrency` samples in flight (whole batches,
    /// at least one) and up to `prefetch_batches` finished batches ready. Dropping the stream stops
    /// the task. The stream ends after the last batch (flagged `last`) when an end epoch is set,
    /// and after the first error otherwise.
    pub fn batches(self: &Arc<Self>, spec: BatchSpec) -> Result<PipelineStream, PipelineError> {
        if spec.batch_size == 0 {
            return Err(PipelineError::Request("batch_size must be positive".into()));
        }
        let mut ids = self.ids(spec.rank, spec.world, spec.start)?;
        if let Some(end) = spec.end_epoch {
            ids = ids.with_end_epoch(end);
        }
        let (tx, rx) = tokio::sync::mpsc::channel(spec.prefetch_batches.max(1));
        let pipeline = self.clone();
        let task = tokio::spawn(async move {
            let batch_bytes = pipeline.sample_bytes() * spec.batch_size as u64;
            let mut items = std::iter::from_fn(move || {
                let epoch = ids.cursor().epoch;
                ids.next().map(|(id, after)| (epoch, id, after))
            })
            .peekable();
            let batch_items = std::iter::from_fn(move || {
                let batch: Vec<_> = items.by_ref().take(spec.batch_size).collect();
                (!batch.is_empty()).then(|| (batch, items.peek().is_none()))
            });
            // Whole batches reserve their memory at once: a batch holding part of its share while
            // waiting for the rest could deadlock against other streams doing the same.
            let in_flight = spec.sample_concurrency.div_ceil(spec.batch_size).max(1);
            let mut batches = futures::stream::iter(batch_items)
                .map(|(items, last)| {
                    let pipeline = pipeline.clone();
                    let memory = spec.memory.clone();
                    async move {
                        let reservation = match &memory {
                            Some(budget) => Some(budget.reserve(batch_bytes).await),
                            None => None,
                        };
                        let cursor_after = items.last().expect("non-empty batch").2;
                        let tasks = items.into_iter().map(|(epoch, id, _)| {
                            let pipeline = pipeline.clone();
                            tokio::spawn(async move { pipeline.sample(epoch, id).await })
                        });
                        let mut samples = Vec::with_capacity(spec.batch_size);
                        for joined in futures::future::join_all(tasks).await {
                            samples.push(joined.map_err(|e| {
                                PipelineError::Request(format!("sample task failed: {e}"))
                            })??);
                        }
                        Ok::<_, PipelineError>(SampleBatch {
                            samples,
                            cursor_after,
                            last: last && spec.end_epoch.is_some(),
                            reservation,
                        })
                    }
                })
                .buffered(in_flight);
            while let Some(batch) = batches.next().await {
                let failed = batch.is_err();
                if tx.send(batch).await.is_err() || failed {
                    return;
                }
            }
        });
        Ok(PipelineStream { rx, task })
    }

    /// The sample ids of `rank`'s shard from `start` on, with the cursor after each.
    pub fn ids(
        &self,
        rank: u32,
        world: u32,
        start: EpochCursor,
    ) -> Result<EpochStream, PipelineError> {
        Ok(EpochStream::new(self.plan, rank, world, start)?)
    }

    /// Blocks in the split.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// Decoded bytes per delivered byte since the dataset was opened.
    pub fn read_amplification(&self, delivered: u64) -> f64 {
        self.dataset
            .counters
            .decoded_bytes
            .load(AtomicOrdering::Relaxed) as f64
            / delivered.max(1) as f64
    }
}
