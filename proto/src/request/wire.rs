//! The request on the wire: [`RequestConfig`] and its parts mapped onto [`pb::BatchRequest`],
//! names onto enum numbers, without judging the values (the server validates them).

use super::{FieldRequestConfig, MaskConfig, RequestConfig};
use crate::pb;

impl RequestConfig {
    /// The wire request. Enums are sent explicitly (never `*_UNSPECIFIED`); the read plan and
    /// the tile options are sent only when the file sets one of their values, since an absent
    /// message and one of zeros mean the same server default. Nothing is validated here.
    pub fn to_proto(&self) -> pb::BatchRequest {
        let read_plan =
            (self.block_steps != 0 || self.samples_per_block != 0 || self.buffer_blocks != 0)
                .then_some(pb::ReadPlan {
                    block_steps: self.block_steps,
                    samples_per_block: self.samples_per_block,
                    buffer_blocks: self.buffer_blocks,
                });
        // Sent whatever the mode: the server ignores tile options outside tiles mode.
        let tiles = (self.tile_overlap != [0; 3]
            || self.tile_time_start.is_some()
            || self.tile_time_end.is_some())
        .then(|| pb::TileOptions {
            overlap: self.tile_overlap.to_vec(),
            time_start: self.tile_time_start.clone().unwrap_or_default(),
            time_end: self.tile_time_end.clone().unwrap_or_default(),
        });
        pb::BatchRequest {
            dataset: self.dataset.clone(),
            fields: self
                .fields
                .iter()
                .map(FieldRequestConfig::to_proto)
                .collect(),
            batch_size: self.batch_size,
            dtype: self.dtype.into(),
            seed: self.seed,
            rank: self.rank,
            world_size: self.world_size,
            split: Some(pb::SplitSpec {
                split: self.split.into(),
                fractions: self.split_fractions.map(Vec::from).unwrap_or_default(),
                train_end: self.train_end.clone(),
                validation_end: self.validation_end.clone(),
            }),
            mode: self.mode.into(),
            units: self.units.into(),
            resume: self.resume.map(pb::Cursor::from),
            end_epoch: self.end_epoch,
            read_plan,
            latitude_weighting: self.latitude_weighting.into(),
            tiles,
        }
    }
}

impl FieldRequestConfig {
    /// The wire field request.
    pub fn to_proto(&self) -> pb::FieldRequest {
        pb::FieldRequest {
            name: self.name.clone(),
            levels: self.levels.clone(),
            num_tokens: self.num_tokens.to_vec(),
            token_size: self.token_size.to_vec(),
            blur_sigma: self.blur_sigma,
            normalization: self.normalization.into(),
            pe: pb::PeMode::from(self.pe).into(),
            pe_width: self.pe_width,
            mask: Some(self.mask.to_proto()),
        }
    }
}

impl MaskConfig {
    /// The wire mask. `None` is sent as an explicit `NoMask` (the same as an absent mask to the
    /// server, but says what the file said).
    pub const fn to_proto(self) -> pb::Mask {
        use pb::mask::Kind;
        let kind = match self {
            Self::None => Kind::None(pb::NoMask {}),
            Self::Bert {
                r_max,
                noise_fraction,
                mask_value,
            } => Kind::Bert(pb::BertMask {
                r_max,
                noise_fraction: Some(noise_fraction),
                mask_value,
            }),
            Self::Forecast { steps } => Kind::Forecast(pb::ForecastMask { steps }),
            Self::Interpolation { steps } => Kind::Interpolation(pb::InterpolationMask { steps }),
        };
        pb::Mask { kind: Some(kind) }
    }
}

impl From<&MaskConfig> for pb::Mask {
    fn from(mask: &MaskConfig) -> Self {
        mask.to_proto()
    }
}

impl From<&FieldRequestConfig> for pb::FieldRequest {
    fn from(field: &FieldRequestConfig) -> Self {
        field.to_proto()
    }
}

impl From<&RequestConfig> for pb::BatchRequest {
    fn from(config: &RequestConfig) -> Self {
        config.to_proto()
    }
}
