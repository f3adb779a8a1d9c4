//! Checks a `BatchRequest` field by field and turns it into a [`PipelineConfig`] and stream
//! parameters. Every problem names the request field it comes from, so a client sees
//! `fields[1].token_size: …` rather than a generic failure.

use atmorep_proto::pb;
use atmorep_proto::{PeMode, StreamCursor};

use crate::pipeline::epoch::EpochCursor;
use crate::pipeline::masking::MaskSpec;
use crate::pipeline::sampler::LatitudeWeighting;
use crate::pipeline::{FieldConfig, Normalization, PipelineConfig, SampleMode, Split, SplitDates};
use crate::store::dataset::Dataset;

/// A request the service can stream.
#[derive(Debug, Clone)]
pub struct StreamRequest {
    pub dataset: String,
    pub pipeline: PipelineConfig,
    pub batch_size: usize,
    pub dtype: pb::Dtype,
    pub rank: u32,
    pub world: u32,
    pub resume: EpochCursor,
    pub end_epoch: Option<u64>,
}

/// What is wrong with a request, and with which part of it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// Malformed: INVALID_ARGUMENT.
    #[error("{field}: {detail}")]
    Invalid { field: String, detail: String },
    /// Names something the server does not have: NOT_FOUND.
    #[error("{field}: {detail}")]
    NotFound { field: String, detail: String },
}

fn invalid(field: impl Into<String>, detail: impl Into<String>) -> RequestError {
    RequestError::Invalid {
        field: field.into(),
        detail: detail.into(),
    }
}

fn triple(field: &str, values: &[u32]) -> Result<[usize; 3], RequestError> {
    match values {
        [a, b, c] if *a > 0 && *b > 0 && *c > 0 => Ok([*a as usize, *b as usize, *c as usize]),
        _ => Err(invalid(
            field,
            format!("needs three positive values (time, lat, lon), got {values:?}"),
        )),
    }
}

fn mask(field: &str, mask: Option<&pb::Mask>) -> Result<MaskSpec, RequestError> {
    use pb::mask::Kind;
    Ok(match mask.and_then(|m| m.kind.as_ref()) {
        None | Some(Kind::None(_)) => MaskSpec::None,
        Some(Kind::Bert(b)) => {
            if !(0.0..1.0).contains(&b.r_max) {
                return Err(invalid(
                    format!("{field}.bert.r_max"),
                    format!("{} is outside [0, 1)", b.r_max),
                ));
            }
            let noise = b.noise_fraction.unwrap_or(0.1);
            if !(0.0..=1.0).contains(&noise) {
                return Err(invalid(
                    format!("{field}.bert.noise_fraction"),
                    format!("{noise} is outside [0, 1]"),
                ));
            }
            if !b.mask_value.is_finite() {
                return Err(invalid(
                    format!("{field}.bert.mask_value"),
                    "must be finite",
                ));
            }
            MaskSpec::Bert {
                r_max: b.r_max,
                noise_fraction: noise,
                mask_value: b.mask_value,
            }
        }
        Some(Kind::Forecast(f)) => MaskSpec::Forecast {
            k: f.steps as usize,
        },
        Some(Kind::Interpolation(i)) => MaskSpec::Interpolation {
            k: i.steps as usize,
        },
    })
}

/// Server-side limits a request must respect.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_batch_size: u32,
    /// What one request may cost (checked on its [`RequestCost`](crate::pipeline::cost::RequestCost)).
    pub request: crate::pipeline::cost::RequestLimits,
}

/// Widest positional encoding a request may ask for.
pub const MAX_PE_WIDTH: u32 = 4096;

/// Server defaults for the read plan when a request leaves it at zero.
const DEFAULT_SAMPLES_PER_BLOCK: u64 = 128;
const DEFAULT_BUFFER_BLOCKS: u64 = 2;

impl StreamRequest {
    /// Checks `request` against `dataset` (names, levels) and `limits`.
    pub fn parse(
        request: &pb::BatchRequest,
        dataset: &Dataset,
        limits: Limits,
    ) -> Result<Self, RequestError> {
        if request.fields.is_empty() {
            return Err(invalid("fields", "at least one field is required"));
        }
        let physical = match pb::Units::try_from(request.units) {
            Ok(pb::Units::Unspecified | pb::Units::Normalized) => false,
            Ok(pb::Units::Physical) => true,
            Err(_) => return Err(invalid("units", format!("unknown value {}", request.units))),
        };
        let mut fields = Vec::with_capacity(request.fields.len());
        let mut seen = std::collections::HashSet::new();
        for (i, f) in request.fields.iter().enumerate() {
            let at = format!("fields[{i}]");
            if f.name.is_empty() {
                return Err(invalid(format!("{at}.name"), "is empty"));
            }
            // Either ERA5 name works; the pipeline reads the store's, batches carry the
            // request's.
            let name = dataset
                .resolve_name(&f.name)
                .map_err(|e| RequestError::NotFound {
                    field: format!("{at}.name"),
                    detail: e.to_string(),
                })?;
            if !seen.insert(name) {
                return Err(invalid(
                    format!("{at}.name"),
                    if name == f.name {
                        format!("`{}` is requested twice", f.name)
                    } else {
                        format!("`{}` (the store's `{name}`) is requested twice", f.name)
                    },
                ));
            }
            let variable = dataset.variable(name).map_err(|e| RequestError::NotFound {
                field: format!("{at}.name"),
                detail: e.to_string(),
            })?;
            for (k, level) in f.levels.iter().enumerate() {
                if !level.is_finite() {
                    return Err(invalid(format!("{at}.levels[{k}]"), "is not finite"));
                }
                if f.levels[..k].contains(level) {
                    return Err(invalid(
                        format!("{at}.levels[{k}]"),
                        format!("level {level} is listed twice"),
                    ));
                }
                if !variable.levels.contains(level) {
                    return Err(RequestError::NotFound {
                        field: format!("{at}.levels[{k}]"),
                        detail: format!(
                            "`{}` has no level {level} (it has {:?})",
                            f.name, variable.levels
                        ),
                    });
                }
            }
            if variable.has_level() && f.levels.is_empty() {
                return Err(invalid(
                    format!("{at}.levels"),
                    format!("`{}` has levels {:?}; name some", f.name, variable.levels),
                ));
            }
            let num_tokens = triple(&format!("{at}.num_tokens"), &f.num_tokens)?;
            let token_size = triple(&format!("{at}.token_size"), &f.token_size)?;
            if !f.blur_sigma.is_finite() || f.blur_sigma < 0.0 {
                return Err(invalid(
                    format!("{at}.blur_sigma"),
                    format!("{} must be finite and ≥ 0", f.blur_sigma),
                ));
            }
            let normalization = match pb::Normalization::try_from(f.normalization) {
                _ if physical => Normalization::None,
                Ok(pb::Normalization::Unspecified | pb::Normalization::Global) => {
                    Normalization::Global
                }
                Ok(pb::Normalization::Local) => Normalization::Local,
                Ok(pb::Normalization::None) => Normalization::None,
                Err(_) => {
                    return Err(invalid(
                        format!("{at}.normalization"),
                        format!("unknown value {}", f.normalization),
                    ));
                }
            };
            let pe = pb::PeMode::try_from(f.pe)
                .ok()
                .and_then(|m| PeMode::try_from(m).ok())
                .ok_or_else(|| {
                    invalid(
                        format!("{at}.pe"),
                        format!("{} is not a positional encoding mode", f.pe),
                    )
                })?;
            if f.pe_width == 0 || f.pe_width % 2 == 1 || f.pe_width > MAX_PE_WIDTH {
                return Err(invalid(
                    format!("{at}.pe_width"),
                    format!(
                        "{} must be even, positive and at most {MAX_PE_WIDTH}",
                        f.pe_width
                    ),
                ));
            }
            fields.push(FieldConfig {
                name: name.to_string(),
                reply_name: (name != f.name).then(|| f.name.clone()),
                levels: f.levels.clone(),
                num_tokens,
                token_size,
                blur_sigma: f.blur_sigma,
                normalization,
                pe,
                pe_width: f.pe_width as usize,
                mask: mask(&format!("{at}.mask"), f.mask.as_ref())?,
            });
        }

        if request.batch_size == 0 || request.batch_size > limits.max_batch_size {
            return Err(invalid(
                "batch_size",
                format!(
                    "{} must be in 1..={}",
                    request.batch_size, limits.max_batch_size
                ),
            ));
        }
        let dtype = match pb::Dtype::try_from(request.dtype) {
            Ok(pb::Dtype::Unspecified | pb::Dtype::F32) => pb::Dtype::F32,
            Ok(pb::Dtype::Bf16) => pb::Dtype::Bf16,
            Err(_) => return Err(invalid("dtype", format!("unknown value {}", request.dtype))),
        };
        let world = request.world_size.max(1);
        if request.rank >= world {
            return Err(invalid(
                "rank",
                format!("{} is not below world_size {world}", request.rank),
            ));
        }

        let spec = request.split.clone().unwrap_or_default();
        let split = match pb::Split::try_from(spec.split) {
            Ok(pb::Split::Unspecified | pb::Split::Train) => Split::Train,
            Ok(pb::Split::Validation) => Split::Validation,
            Ok(pb::Split::Test) => Split::Test,
            Err(_) => {
                return Err(invalid(
                    "split.split",
                    format!("unknown value {}", spec.split),
                ));
            }
        };
        let split_fractions = match spec.fractions.as_slice() {
            [] => [0.8, 0.1],
            [train, validation] => [*train, *validation],
            other => {
                return Err(invalid(
                    "split.fractions",
                    format!("needs (train, validation), got {other:?}"),
                ));
            }
        };
        let split_dates = match (&spec.train_end, &spec.validation_end) {
            (None, None) => None,
            (Some(train_end), Some(validation_end)) => Some(SplitDates {
                train_end: train_end.clone(),
                validation_end: validation_end.clone(),
            }),
            _ => {
                return Err(invalid("split", "train_end and validation_end go together"));
            }
        };
        let mode = match pb::Mode::try_from(request.mode) {
            Ok(pb::Mode::Unspecified | pb::Mode::Training) => SampleMode::Training,
            Ok(pb::Mode::Tiles) => {
                let tiles = request.tiles.clone().unwrap_or_default();
                let overlap = match tiles.overlap.as_slice() {
                    [] => [0, 0, 0],
                    [t, y, x] => [*t as usize, *y as usize, *x as usize],
                    other => {
                        return Err(invalid(
                            "tiles.overlap",
                            format!("needs (time, lat, lon), got {other:?}"),
                        ));
                    }
                };
                let bound = |s: &str| (!s.is_empty()).then(|| s.to_string());
                SampleMode::Tiles {
                    overlap,
                    time_start: bound(&tiles.time_start),
                    time_end: bound(&tiles.time_end),
                }
            }
            Err(_) => return Err(invalid("mode", format!("unknown value {}", request.mode))),
        };
        let latitude_weighting = match pb::LatitudeWeighting::try_from(request.latitude_weighting) {
            Ok(pb::LatitudeWeighting::Unspecified | pb::LatitudeWeighting::Area) => {
                LatitudeWeighting::Area
            }
            Ok(pb::LatitudeWeighting::Uniform) => LatitudeWeighting::Uniform,
            Err(_) => {
                return Err(invalid(
                    "latitude_weighting",
                    format!("unknown value {}", request.latitude_weighting),
                ));
            }
        };
        let plan = request.read_plan.unwrap_or_default();
        let longest = fields
            .iter()
            .map(|f| f.num_tokens[0].saturating_mul(f.token_size[0]))
            .max()
            .unwrap_or(1);
        // A block of four windows lets 128 samples share each decoded chunk many times over.
        // (Saturating: a window beyond the time axis is refused by the request's cost.)
        let block_steps = match plan.block_steps {
            0 => longest
                .saturating_mul(4)
                .min(dataset.times.len())
                .max(longest),
            n => n as usize,
        };
        let samples_per_block = match plan.samples_per_block {
            0 => DEFAULT_SAMPLES_PER_BLOCK,
            n => n,
        };
        let buffer_blocks = match plan.buffer_blocks {
            0 => DEFAULT_BUFFER_BLOCKS,
            n => n,
        };
        let resume = request
            .resume
            .map(|c| {
                let c = StreamCursor::from(c);
                EpochCursor {
                    epoch: c.epoch,
                    position: c.position,
                }
            })
            .unwrap_or_default();
        if let Some(end) = request.end_epoch
            && end <= resume.epoch
            && !(end == resume.epoch && resume.position == 0 && end == 0)
        {
            return Err(invalid(
                "end_epoch",
                format!("{end} is not after the resume epoch {}", resume.epoch),
            ));
        }
        // Tiles cover the globe once per epoch: a tiles stream is one pass unless the request
        // asks for more (clients take the end of the stream as the end of the pass).
        let end_epoch = match (&mode, request.end_epoch) {
            (SampleMode::Tiles { .. }, None) => Some(resume.epoch + 1),
            (_, end) => end,
        };
        Ok(Self {
            dataset: request.dataset.clone(),
            pipeline: PipelineConfig {
                fields,
                split,
                split_fractions,
                split_dates,
                mode,
                seed: request.seed,
                block_steps,
                samples_per_block,
                buffer_blocks,
                latitude_weighting,
            },
            batch_size: request.batch_size as usize,
            dtype,
            rank: request.rank,
            world,
            resume,
            end_epoch,
        })
    }
}
