//! Token embedding of one field: token values plus token info (per [`AuxInfo`]) plus the
//! stream's positional encoding.

use candle_core::{D, Module, Result, Tensor};
use candle_nn::{Init, Linear, VarBuilder};

use crate::batch::PREDICTED_PRIOR_KINDS;
use crate::config::{AuxInfo, FieldSpec, ModelConfig, Prior};
use crate::fused::gelu;
use crate::ops::linear;

/// Floats of token info per token (`atmorep_proto::token_info::TOKEN_INFO_LEN`).
pub const TOKEN_INFO_LEN: usize = 8;

/// Features the model sees per token, made from the 8 floats of token info by
/// [`info_features`].
pub const INFO_FEATURES: usize = 13;

/// `[B, T, 8]` raw token info (year, day of year, hour, level, lat, lon, time step h, grid
/// spacing °) → `[B, T, INFO_FEATURES]`, each at order 1: raw years (~2000) and levels
/// (~850 hPa) would otherwise swamp a freshly initialized projection.
///
/// The cyclic quantities enter as sine and cosine — day of year, hour (UTC), longitude, and
/// local solar time (hour + longitude / 15°) — so that 359° sits next to 1° and 23 h next to
/// 0 h. Local solar time is what the diurnal cycle follows (the sun heats the surface where it
/// is noon); from UTC hour and longitude alone the model would have to learn their sum inside
/// a cosine.
///
/// | # | feature |
/// |---|---|
/// | 0 | (year − 2000) / 50 |
/// | 1, 2 | sin, cos (2π · day of year / 365.25) |
/// | 3, 4 | sin, cos (2π · hour / 24) |
/// | 5 | level / 500 − 1 |
/// | 6 | lat / 90 |
/// | 7, 8 | sin, cos (lon) |
/// | 9, 10 | sin, cos (2π · (hour / 24 + lon / 360)) |
/// | 11 | time step / 24 h |
/// | 12 | grid spacing (°) |
pub fn info_features(info: &Tensor) -> Result<Tensor> {
    use std::f64::consts::TAU;
    let col = |i: usize| info.narrow(D::Minus1, i, 1);
    let (year, doy, hour, level, lat, lon, step, spacing) = (
        col(0)?,
        col(1)?,
        col(2)?,
        col(3)?,
        col(4)?,
        col(5)?,
        col(6)?,
        col(7)?,
    );
    let doy = doy.affine(TAU / 365.25, 0.0)?;
    let hour_angle = hour.affine(TAU / 24.0, 0.0)?;
    let lon = lon.affine(TAU / 360.0, 0.0)?;
    let solar = (&hour_angle + &lon)?;
    Tensor::cat(
        &[
            &year.affine(1.0 / 50.0, -40.0)?,
            &doy.sin()?,
            &doy.cos()?,
            &hour_angle.sin()?,
            &hour_angle.cos()?,
            &level.affine(1.0 / 500.0, -1.0)?,
            &lat.affine(1.0 / 90.0, 0.0)?,
            &lon.sin()?,
            &lon.cos()?,
            &solar.sin()?,
            &solar.cos()?,
            &step.affine(1.0 / 24.0, 0.0)?,
            &spacing,
        ],
        D::Minus1,
    )
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
    /// `Linear(INFO_FEATURES → d_info)` (appending variants) or `Linear(INFO_FEATURES → D)`
    /// (class token).
    info: Option<Linear>,
    /// The second layer of [`AuxInfo::ProjectBeforeAppend`]'s info network.
    info_out: Option<Linear>,
    class_token: Option<Tensor>,
    /// `Linear(W → D)` when the positional encoding is not `D` wide.
    pe: Option<Linear>,
    /// Under [`Prior::Temporal`], `Linear(K → value width)` of how a token's values were made
    /// (the fraction of each kind of prior among them): the values embedded are the prior's,
    /// which for a hidden token are a guess the model must know to be one.
    hidden: Option<Linear>,
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
                Some(linear(vb.pp("info"), INFO_FEATURES, d_info, true)?),
                None,
                None,
            ),
            AuxInfo::ProjectBeforeAppend => (
                Some(linear(vb.pp("info"), INFO_FEATURES, d_info, true)?),
                Some(linear(vb.pp("info_out"), d_info, d_info, true)?),
                None,
            ),
            AuxInfo::ClassToken => (
                Some(linear(vb.pp("info"), INFO_FEATURES, d, true)?),
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
        let hidden = match cfg.prior {
            Prior::None => None,
            Prior::Temporal => Some(linear(
                vb.pp("hidden"),
                PREDICTED_PRIOR_KINDS.len(),
                value_width,
                false,
            )?),
        };
        Ok(Self {
            variant,
            values: linear(vb.pp("values"), v, value_width, true)?,
            info,
            info_out,
            class_token,
            pe,
            hidden,
        })
    }

    /// Embeds `source` `[B, T, V]` with its `token_info` `[B, T, 8]` (raw, as the loader sends
    /// it) and positional encoding `pe` `[B, T, W]`. Under a temporal prior `source` is the
    /// prior's values and `hidden` `[B, T, K]` the fraction of each kind of prior among each
    /// token's values (all zero for a visible token).
    pub fn forward(
        &self,
        source: &Tensor,
        token_info: &Tensor,
        pe: &Tensor,
        hidden: Option<&Tensor>,
    ) -> Result<Embedded> {
        let mut values = self.values.forward(source)?;
        match (&self.hidden, hidden) {
            (Some(proj), Some(kinds)) => values = values.broadcast_add(&proj.forward(kinds)?)?,
            (None, None) => {}
            (Some(_), None) => {
                candle_core::bail!("this embedding takes the kinds of a temporal prior")
            }
            (None, Some(_)) => candle_core::bail!("this embedding has no temporal prior"),
        }
        let info = info_features(token_info)?;
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

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    /// Two tokens by hand: noon UTC on the Greenwich meridian (local noon), and 18 UTC at 270°E
    /// (local noon again: 270°E is 18 hours ahead of Greenwich in solar time).
    #[test]
    fn info_features_by_hand() -> Result<()> {
        let raw = [
            [2021.0f32, 0.0, 12.0, 850.0, 45.0, 0.0, 6.0, 0.25],
            [1975.0, 91.3125, 18.0, 500.0, -90.0, 270.0, 1.0, 1.0],
        ];
        let info = Tensor::new(&raw, &Device::Cpu)?.unsqueeze(0)?;
        let got = info_features(&info)?.squeeze(0)?.to_vec2::<f32>()?;
        let want = [
            [
                0.42, 0.0, 1.0, 0.0, -1.0, 0.7, 0.5, 0.0, 1.0, 0.0, -1.0, 0.25, 0.25,
            ],
            // Day 91.3125 is a quarter of the year; 18 h + 270°/15 = 36 h ≡ local noon.
            [
                -0.5,
                1.0,
                0.0,
                -1.0,
                0.0,
                0.0,
                -1.0,
                -1.0,
                0.0,
                0.0,
                -1.0,
                1.0 / 24.0,
                1.0,
            ],
        ];
        for (row, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g.len(), INFO_FEATURES);
            for (k, (a, b)) in g.iter().zip(w).enumerate() {
                assert!((a - b).abs() < 1e-5, "token {row} feature {k}: {a} vs {b}");
            }
        }
        Ok(())
    }

    /// Longitude and local solar time are continuous across the 0°/360° seam.
    #[test]
    fn info_features_are_continuous_across_the_seam() -> Result<()> {
        let raw = [
            [2000.0f32, 10.0, 3.0, 850.0, 0.0, 359.9, 6.0, 1.0],
            [2000.0, 10.0, 3.0, 850.0, 0.0, 0.1, 6.0, 1.0],
        ];
        let info = Tensor::new(&raw, &Device::Cpu)?.unsqueeze(0)?;
        let f = info_features(&info)?.squeeze(0)?.to_vec2::<f32>()?;
        for (k, (a, b)) in f[0].iter().zip(&f[1]).enumerate() {
            assert!((a - b).abs() < 1e-2, "feature {k} jumps at the seam");
        }
        Ok(())
    }
}
