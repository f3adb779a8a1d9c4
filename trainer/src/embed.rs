//! Token embedding of one field: token values plus token info (per [`AuxInfo`]) plus the
//! stream's positional encoding.

use candle_core::{D, Module, Result, Tensor};
use candle_nn::{Init, Linear, VarBuilder};

use crate::config::{AuxInfo, FieldSpec, ModelConfig};
use crate::ops::{gelu, linear};

/// Floats of token info per token (`atmorep_proto::token_info::TOKEN_INFO_LEN`).
pub const TOKEN_INFO_LEN: usize = 8;

/// Fixed affine map `info · scale + offset` applied to the raw token info (year, day of year,
/// hour, level, lat, lon, time step h, grid spacing °) so that each lands at order 1: raw years
/// (~2000) and levels (~850 hPa) would otherwise swamp a freshly initialized projection and
/// saturate everything after it.
pub const INFO_SCALE: [f64; TOKEN_INFO_LEN] = [
    1.0 / 50.0,
    1.0 / 183.0,
    1.0 / 12.0,
    1.0 / 500.0,
    1.0 / 90.0,
    1.0 / 180.0,
    1.0 / 24.0,
    1.0,
];
/// See [`INFO_SCALE`].
pub const INFO_OFFSET: [f64; TOKEN_INFO_LEN] = [-40.0, -1.0, -1.0, -1.0, 0.0, -1.0, 0.0, 0.0];

/// `[B, T, 8]` raw token info → normalized (see [`INFO_SCALE`]).
pub fn normalize_info(info: &Tensor) -> Result<Tensor> {
    let scale = Tensor::new(&INFO_SCALE, info.device())?.to_dtype(info.dtype())?;
    let offset = Tensor::new(&INFO_OFFSET, info.device())?.to_dtype(info.dtype())?;
    info.broadcast_mul(&scale)?.broadcast_add(&offset)
}

/// A field's embedded tokens.
#[derive(Debug, Clone)]
pub struct Embedded {
    /// `[B, T + extra, D]` (`extra` = 1 class token for [`AuxInfo::ClassToken`], else 0).
    pub tokens: Tensor,
    /// `[B, T, d_info]`: the info embedding, kept for [`AuxInfo::Reappend`].
    pub info: Option<Tensor>,
}

/// The embedding of one field's tokens.
#[derive(Debug, Clone)]
pub struct TokenEmbedding {
    variant: AuxInfo,
    /// `Linear(V → D − d_info)` or `Linear(V → D)`.
    values: Linear,
    /// `Linear(8 → d_info)` (appending variants) or `Linear(8 → D)` (class token).
    info: Option<Linear>,
    /// The second layer of [`AuxInfo::ProjectBeforeAppend`]'s info network.
    info_out: Option<Linear>,
    class_token: Option<Tensor>,
    /// `Linear(W → D)` when the positional encoding is not `D` wide.
    pe: Option<Linear>,
}

impl TokenEmbedding {
    pub fn new(vb: VarBuilder, field: &FieldSpec, cfg: &ModelConfig) -> Result<Self> {
        let (d, d_info, v) = (cfg.d_model, cfg.d_info, field.token_numel);
        let variant = cfg.aux_info;
        let value_width = if variant.appends_info() {
            d - d_info
        } else {
            d
        };
        let (info, info_out, class_token) = match variant {
            AuxInfo::Concat | AuxInfo::Reappend => (
                Some(linear(vb.pp("info"), TOKEN_INFO_LEN, d_info, true)?),
                None,
                None,
            ),
            AuxInfo::ProjectBeforeAppend => (
                Some(linear(vb.pp("info"), TOKEN_INFO_LEN, d_info, true)?),
                Some(linear(vb.pp("info_out"), d_info, d_info, true)?),
                None,
            ),
            AuxInfo::ClassToken => (
                Some(linear(vb.pp("info"), TOKEN_INFO_LEN, d, true)?),
                None,
                Some(vb.get_with_hints(d, "class_token", Init::Const(0.0))?),
            ),
            AuxInfo::None => (None, None, None),
        };
        let pe = if field.pe_width == d {
            None
        } else {
            Some(linear(vb.pp("pe"), field.pe_width, d, false)?)
        };
        Ok(Self {
            variant,
            values: linear(vb.pp("values"), v, value_width, true)?,
            info,
            info_out,
            class_token,
            pe,
        })
    }

    /// Embeds `source` `[B, T, V]` with its `token_info` `[B, T, 8]` (raw, as the loader sends
    /// it) and positional encoding `pe` `[B, T, W]`.
    pub fn forward(&self, source: &Tensor, token_info: &Tensor, pe: &Tensor) -> Result<Embedded> {
        let values = self.values.forward(source)?;
        let info = normalize_info(token_info)?;
        let pe = match &self.pe {
            Some(proj) => proj.forward(pe)?,
            None => pe.clone(),
        };
        let info_net = self.info.as_ref();
        let (tokens, kept_info) = match self.variant {
            AuxInfo::None => (values.broadcast_add(&pe)?, None),
            AuxInfo::Concat | AuxInfo::Reappend | AuxInfo::ProjectBeforeAppend => {
                let mut emb = info_net.expect("built for the variant").forward(&info)?;
                if let Some(out) = &self.info_out {
                    emb = out.forward(&gelu(&emb)?)?;
                }
                let tokens = Tensor::cat(&[&values, &emb], D::Minus1)?.broadcast_add(&pe)?;
                let keep = (self.variant == AuxInfo::Reappend).then_some(emb);
                (tokens, keep)
            }
            AuxInfo::ClassToken => {
                // One class token per sample, shifted by the sample's mean info: the info
                // reaches every token only through attention to it.
                let (b, _, d) = values.dims3()?;
                let mean_info = info.mean_keepdim(1)?;
                let cls = info_net
                    .expect("built for the variant")
                    .forward(&mean_info)?
                    .broadcast_add(self.class_token.as_ref().expect("built for the variant"))?;
                let cls = cls.reshape((b, 1, d))?;
                (Tensor::cat(&[&cls, &values.broadcast_add(&pe)?], 1)?, None)
            }
        };
        Ok(Embedded {
            tokens,
            info: kept_info,
        })
    }
}
