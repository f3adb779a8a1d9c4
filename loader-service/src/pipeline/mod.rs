//! The sample pipeline: from the canonical store view to token samples. Reads are planned by
//! time block: the split's time axis is cut into blocks of `block_steps`, `samples_per_block`
//! samples are drawn inside each block, and an epoch visits blocks through a bounded shuffle
//! buffer ([`epoch::BlockShuffle`]), so each block's chunks are decoded once (they stay in the
//! shared chunk cache while the block is open) and many samples are cut from them. Where the
//! request and store allow, a stream cuts a block's samples together instead ([`group`]): each
//! blosc block decoded once into cache and every sample's rows cut from it there. Every random
//! choice is a pure function of (seed, epoch, sample id, field) ([`seeding`]).
//!
//! Its parts: [`normalization`] statistics, the Gaussian [`blur`], the [`sampler`] of windows
//! and tiles (tokens are cut by `atmorep_proto::tokenize`), [`masking`], [`seeding`], and
//! [`epoch`] plans with resumable cursors. The [`Pipeline`] itself is a request
//! ([`PipelineConfig`]) resolved against a dataset, which cuts samples and streams them in
//! batches ([`Pipeline::batches`]) under a [`MemoryBudget`].

pub mod blur;
pub mod cost;
pub mod epoch;
pub mod masking;
pub mod normalization;
pub mod sampler;
pub mod seeding;

mod assemble;
mod config;
mod group;
mod memory_budget;
mod prepare;
mod stream;

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::Ordering as AtomicOrdering;

pub use assemble::{FieldSample, Sample};
pub use atmorep_proto::pool::BufferPool;
pub use config::{FieldConfig, Normalization, PipelineConfig, SampleMode, Split, SplitDates};
pub use memory_budget::MemoryBudget;
pub use stream::{BatchSpec, PipelineStream, SampleBatch};

use crate::store::dataset::Dataset;
use epoch::{EpochCursor, EpochPlan, EpochStream};
use normalization::{GlobalStats, LocalStats};
use prepare::{EpochLayout, PreparedField};
use sampler::{Sampler, Tiling};

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
    Epoch(#[from] epoch::EpochError),
    #[error(transparent)]
    Normalization(#[from] normalization::NormalizationError),
    /// The request is nonsense for this dataset, or costs more than the server allows.
    #[error(transparent)]
    Cost(#[from] cost::CostError),
    /// A panic in a sample's or a batch's task: a bug, contained to the stream that hit it.
    #[error(transparent)]
    Panicked(#[from] crate::panic::Panicked),
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

/// A prepared request against one dataset.
#[derive(Debug)]
pub struct Pipeline {
    dataset: Arc<Dataset>,
    config: PipelineConfig,
    /// Shared with the blocking threads that finish samples.
    fields: Arc<[PreparedField]>,
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
    /// Whether streams cut whole groups of samples at once where they can ([`group`]).
    group_cut: std::sync::atomic::AtomicBool,
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
        // Windows, tiles, the sampler and the positional encodings all wrap in longitude.
        if !dataset.lon_periodic() {
            let lons = &dataset.lons;
            return Err(PipelineError::Request(format!(
                "dataset `{}` is a regional grid (longitudes {}° … {}°, {} columns, not once \
                 around the globe): samples and tiles wrap in longitude, so only global grids \
                 are served",
                dataset.url(),
                lons.first().copied().unwrap_or(f64::NAN),
                lons.last().copied().unwrap_or(f64::NAN),
                lons.len()
            )));
        }
        // Its cost first: the steps below allocate encodings, orders and tiles by its numbers.
        cost::RequestCost::of(&dataset, &config, 1)?;
        let split_range = prepare::split_range(&dataset, &config)?;
        if config.block_steps == 0 || config.samples_per_block == 0 || config.buffer_blocks == 0 {
            return Err(PipelineError::Request(
                "block_steps, samples_per_block and buffer_blocks must be positive".into(),
            ));
        }
        let fields = config
            .fields
            .iter()
            .map(|fc| {
                PreparedField::new(
                    &dataset,
                    fc,
                    &split_range,
                    stats.as_deref(),
                    local.as_deref(),
                )
            })
            .collect::<Result<Arc<[_]>, _>>()?;
        let EpochLayout {
            blocks,
            plan,
            tiling,
        } = prepare::plan_epochs(&dataset, &config, &fields, &split_range)?;
        let nt = dataset.times.len();
        let pipeline = Self {
            time_step_h: if nt > 1 {
                (dataset.times[1] - dataset.times[0]) as f64 / 3600.0
            } else {
                1.0
            },
            grid_spacing: (dataset.lats[0] - dataset.lats[1]).abs(),
            plan,
            tiling,
            // Enough for every sample in flight of one stream (a group: a block's samples, a
            // source and a target per field, the group's and the one being consumed); more
            // would only hold memory.
            pool: Arc::new(BufferPool::new(
                (4 * config.fields.len() * config.samples_per_block as usize).clamp(64, 4096),
                u64::MAX,
            )),
            group_cut: std::sync::atomic::AtomicBool::new(true),
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
            sampler::SamplerError::WindowTooLarge { ref field, .. }
            | sampler::SamplerError::NoRoomInTime { ref field, .. } => field_err(field, &e),
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

    /// Per field: (name, values per token, tokens, PE width), in request order.
    pub fn field_geometries(&self) -> Vec<(String, usize, usize, usize)> {
        self.fields
            .iter()
            .map(|f| {
                (
                    f.config.reply_name().to_string(),
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
                // Bounded by the request's cost, checked when the pipeline was made.
                cost::field_sample_bytes(values, tokens, f.config.pe_width as u64)
                    .unwrap_or(u64::MAX)
            })
            .fold(0, u64::saturating_add)
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
