//! Resolving a request against a dataset before any sample is cut: the split's time steps, each
//! field's levels, geometry, mask, blur, positional encoding and the statistics its
//! normalization needs, and the epoch plan (time blocks when training, ordered tiles
//! otherwise). Every error a request can cause surfaces here, when it is made.

use std::ops::Range;

use atmorep_proto::calendar::parse_iso;
use atmorep_proto::positional::{PeInputs, encode};
use atmorep_proto::{FieldGeometry, TokenGeometry};

use super::blur::GaussianBlur;
use super::epoch::{BlockParams, EpochPlan, Ordering};
use super::masking::MaskGeometry;
use super::normalization::{GlobalStats, LocalStats, year_month};
use super::sampler::Tiling;
use super::{
    FieldConfig, Normalization, PipelineConfig, PipelineError, SampleMode, Split, field_err,
    stats_err,
};
use crate::store::dataset::Dataset;
use crate::store::hyperslab::OutputLayout;

/// A field with everything resolved against the store.
#[derive(Debug, Clone)]
pub(super) struct PreparedField {
    pub(super) config: FieldConfig,
    pub(super) level_indices: Vec<usize>,
    pub(super) level_values: Vec<f64>,
    pub(super) geometry: FieldGeometry,
    pub(super) mask_geometry: MaskGeometry,
    pub(super) blur: Option<GaussianBlur>,
    /// Where each window point lands in token order.
    pub(super) layout: OutputLayout,
    /// The positional encoding when it is the same for every window (computing its sines
    /// per sample took a tenth of the cut).
    pub(super) fixed_pe: Option<Vec<f32>>,
}

/// The time steps of the requested split: cut by `split_dates` when given, else by
/// `split_fractions` of the time axis.
pub(super) fn split_range(
    dataset: &Dataset,
    config: &PipelineConfig,
) -> Result<Range<usize>, PipelineError> {
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
    Ok(match config.split {
        Split::Train => 0..train_end,
        Split::Validation => train_end..val_end,
        Split::Test => val_end..nt,
    })
}

impl PreparedField {
    /// Resolves `fc` against `dataset`; the statistics its normalization uses must cover every
    /// level of every month in `split`.
    pub(super) fn new(
        dataset: &Dataset,
        fc: &FieldConfig,
        split: &Range<usize>,
        stats: Option<&GlobalStats>,
        local: Option<&LocalStats>,
    ) -> Result<Self, PipelineError> {
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
        atmorep_proto::positional::check_width(fc.pe_width).map_err(|e| field_err(&fc.name, e))?;
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
        match fc.normalization {
            Normalization::Global => {
                check_global_statistics(dataset, fc, &level_values, split, stats)?
            }
            Normalization::Local => {
                check_local_statistics(dataset, fc, &level_values, split, local)?
            }
            Normalization::None => {}
        }
        let fixed_pe = if fc.pe.depends_on_window() {
            None
        } else {
            Some(
                encode(fc.pe, &geometry, fc.pe_width, &PeInputs::default())
                    .map_err(|e| field_err(&fc.name, e))?,
            )
        };
        Ok(Self {
            fixed_pe,
            layout: OutputLayout::tokens(&geometry),
            config: fc.clone(),
            level_indices,
            level_values,
            geometry,
            mask_geometry,
            blur,
        })
    }
}

/// Global statistics exist and cover `levels` in every month of `split`.
fn check_global_statistics(
    dataset: &Dataset,
    fc: &FieldConfig,
    levels: &[f64],
    split: &Range<usize>,
    stats: Option<&GlobalStats>,
) -> Result<(), PipelineError> {
    let stats = stats.ok_or_else(|| {
        stats_err(
            &fc.name,
            "global normalization needs statistics (run `atmorep loader stats`)",
        )
    })?;
    for &unix in &dataset.times[split.clone()] {
        let (year, month) = year_month(unix);
        for &level in levels {
            if stats.get(&fc.name, level, year, month).is_none() {
                return Err(stats_err(
                    &fc.name,
                    format!("statistics lack level {level} in {year}-{month:02}"),
                ));
            }
        }
    }
    Ok(())
}

/// Local statistics exist on the dataset's grid and cover `levels` in every month of `split`.
fn check_local_statistics(
    dataset: &Dataset,
    fc: &FieldConfig,
    levels: &[f64],
    split: &Range<usize>,
    local: Option<&LocalStats>,
) -> Result<(), PipelineError> {
    let local = local.ok_or_else(|| {
        stats_err(
            &fc.name,
            "local normalization needs local statistics (`atmorep loader stats --local`)",
        )
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
    for &unix in &dataset.times[split.clone()] {
        let (year, month) = year_month(unix);
        for &level in levels {
            let l = stats.levels.iter().position(|v| *v == level);
            let covered = l.is_some_and(|l| {
                stats.std[((month as usize - 1) * stats.levels.len() + l) * plane].is_finite()
            });
            if !covered {
                return Err(stats_err(
                    &fc.name,
                    format!("local statistics lack level {level} in {year}-{month:02}"),
                ));
            }
        }
    }
    Ok(())
}

/// What an epoch of the request visits: the number of time blocks, the epoch plan, and the
/// tiles when the request asks for them.
pub(super) struct EpochLayout {
    pub(super) blocks: u64,
    pub(super) plan: EpochPlan,
    pub(super) tiling: Option<Tiling>,
}

/// The epochs of `config` over `split`: blocks of `block_steps` with `samples_per_block`
/// samples each when training, the ordered tiles of the globe otherwise.
pub(super) fn plan_epochs(
    dataset: &Dataset,
    config: &PipelineConfig,
    fields: &[PreparedField],
    split: &Range<usize>,
) -> Result<EpochLayout, PipelineError> {
    match &config.mode {
        SampleMode::Training => training_epochs(config, fields, split),
        SampleMode::Tiles {
            overlap,
            time_start,
            time_end,
        } => tile_epochs(
            dataset,
            config,
            fields,
            split,
            *overlap,
            [time_start, time_end],
        ),
    }
}

fn training_epochs(
    config: &PipelineConfig,
    fields: &[PreparedField],
    split: &Range<usize>,
) -> Result<EpochLayout, PipelineError> {
    let max_steps = fields
        .iter()
        .map(|f| f.geometry.geometry.window()[0])
        .max()
        .unwrap_or(1);
    if config.block_steps < max_steps {
        return Err(PipelineError::Request(format!(
            "block_steps {} is shorter than the longest window ({max_steps} steps)",
            config.block_steps
        )));
    }
    // Blocks tile the split; a short tail that cannot hold a window is dropped.
    let mut blocks = (split.len() / config.block_steps) as u64;
    if split.len() % config.block_steps >= max_steps {
        blocks += 1;
    }
    if blocks == 0 {
        return Err(PipelineError::Request(format!(
            "the {:?} split ({} steps) has no room for one {max_steps}-step window",
            config.split,
            split.len()
        )));
    }
    let plan = EpochPlan::new(config.seed, blocks * config.samples_per_block).with_ordering(
        Ordering::BlockLocal(BlockParams {
            samples_per_block: config.samples_per_block,
            buffer_blocks: config.buffer_blocks,
        }),
    );
    Ok(EpochLayout {
        blocks,
        plan,
        tiling: None,
    })
}

/// The time steps tiles cover: the split, or the request's (inclusive ISO) bounds.
pub(super) fn tile_time_range(
    dataset: &Dataset,
    split: &Range<usize>,
    [time_start, time_end]: [&Option<String>; 2],
) -> Result<Range<usize>, PipelineError> {
    let bound = |name: &str, text: &Option<String>| {
        text.as_deref()
            .map(|t| parse_iso(t).map_err(|e| PipelineError::Request(format!("tiles.{name}: {e}"))))
            .transpose()
    };
    let start = bound("time_start", time_start)?
        .map_or(split.start, |t| dataset.times.partition_point(|&x| x < t));
    let end = bound("time_end", time_end)?
        .map_or(split.end, |t| dataset.times.partition_point(|&x| x <= t));
    Ok(start..end.max(start))
}

fn tile_epochs(
    dataset: &Dataset,
    config: &PipelineConfig,
    fields: &[PreparedField],
    split: &Range<usize>,
    overlap: [usize; 3],
    [time_start, time_end]: [&Option<String>; 2],
) -> Result<EpochLayout, PipelineError> {
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
    let tiling = Tiling::new(
        dataset.lats.len(),
        dataset.lons.len(),
        tile_time_range(dataset, split, [time_start, time_end])?,
        window,
        overlap,
    )
    .map_err(|e| PipelineError::Request(format!("tiles: {e}")))?;
    let plan = EpochPlan::new(config.seed, tiling.tiles().len() as u64)
        .with_ordering(Ordering::Sequential);
    Ok(EpochLayout {
        blocks: 0,
        plan,
        tiling: Some(tiling),
    })
}
