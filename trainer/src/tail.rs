//! The tail: model width back to token values, one set per ensemble member.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Linear, VarBuilder};

use crate::batch::PREDICTED_PRIOR_KINDS;
use crate::config::{FieldSpec, ModelConfig, Prior};
use crate::model::PriorInput;
use crate::ops::{LayerNorm, linear};

/// `LayerNorm`, then `Linear(D → E·V)`, reshaped to `[B, T, E, V]`.
///
/// Under [`Prior::Temporal`] the tail has one such projection per way a prior is made
/// ([`PREDICTED_PRIOR_KINDS`]), and adds the chosen one's output, in units of that prior's
/// typical error (`prior_error`, see [`PRIOR_ERROR`]), to the prior. Interpolation errs far
/// less than persistence: with one projection the larger residuals would set every update.
#[derive(Debug, Clone)]
pub struct Tail {
    ln: LayerNorm,
    /// One projection, or one per predicted prior kind.
    proj: Vec<Linear>,
    /// `[K]`: the RMS error of each kind of prior, normalized units (temporal prior only).
    prior_error: Option<Tensor>,
    ensemble: usize,
    token_numel: usize,
}

/// The names of the per-kind projections, in [`PREDICTED_PRIOR_KINDS`] order.
const PRIOR_PROJ: [&str; PREDICTED_PRIOR_KINDS.len()] =
    ["proj_interpolated", "proj_one_sided", "proj_climatology"];

/// The name of a temporal-prior tail's `[K]` statistic: the RMS error, in normalized units, of
/// each kind of prior ([`PREDICTED_PRIOR_KINDS`] order), measured on the first batch of every
/// task of a fresh run (`Trainer::run`) and then fixed. Each kind's correction is predicted, and its loss counted,
/// in units of it, so that the projections work at order 1 whatever the field and the time
/// step: in normalized units, interpolation in time errs by ~0.004 on `z` and ~0.04 on `t`
/// with its diurnal cycle at 6-hourly steps, the climatological mean by the whole anomaly.
///
/// A statistic, not a weight: the optimizer leaves it alone. A learned factor in its place
/// starts where its projection is still noise, so its first gradients shrink it, and a factor
/// near zero stops its projection from learning (seen: from 0.01 to below 4 × 10⁻⁴ within
/// the first steps, on every field); a fixed one cannot suit fields whose priors err by
/// factors of ten apart.
pub const PRIOR_ERROR: &str = "prior_error";

/// `prior_error` until a run measures it, and for a kind its first batches lack (the
/// climatology kind is rare under BERT masking). Normalized values have unit spread, so the
/// climatological mean (0) errs by about 1; neighbours in time by a few hundredths.
pub const PRIOR_ERROR_DEFAULT: [f64; PREDICTED_PRIOR_KINDS.len()] = [1e-2, 1e-2, 1.0];

impl Tail {
    pub fn new(vb: VarBuilder, field: &FieldSpec, cfg: &ModelConfig) -> Result<Self> {
        let (d, e, v) = (cfg.d_model, cfg.ensemble, field.token_numel);
        let (proj, prior_error) = match cfg.prior {
            Prior::None => (vec![linear(vb.pp("proj"), d, e * v, true)?], None),
            Prior::Temporal => (
                PRIOR_PROJ
                    .iter()
                    .map(|name| linear(vb.pp(name), d, e * v, true))
                    .collect::<Result<_>>()?,
                Some(vb.get(PREDICTED_PRIOR_KINDS.len(), PRIOR_ERROR)?),
            ),
        };
        Ok(Self {
            ln: LayerNorm::new(vb.pp("ln"), d, cfg.layer_norm_eps)?,
            proj,
            prior_error,
            ensemble: e,
            token_numel: v,
        })
    }

    /// `[K]`: the RMS error of each kind of prior (see [`PRIOR_ERROR`]); `None` without a
    /// temporal prior.
    pub fn prior_error(&self) -> Option<&Tensor> {
        self.prior_error.as_ref()
    }

    /// `[B, T, D]` → `[B, T, E, V]`: `prior + Σ_k kind_k · error_k · proj_k(LN(x))` with
    /// `error_k` the kind's `prior_error`.
    pub fn forward_with_prior(&self, x: &Tensor, prior: &PriorInput) -> Result<Tensor> {
        let Some(error) = &self.prior_error else {
            candle_core::bail!("this tail has no prior to correct: use forward");
        };
        // A statistic: no gradient flows into it.
        let error = error.detach();
        let (b, t, _) = x.dims3()?;
        let h = self.ln.forward(x)?;
        let mut out = prior.values.unsqueeze(2)?;
        for (k, proj) in self.proj.iter().enumerate() {
            let correction = proj
                .forward(&h)?
                .reshape((b, t, self.ensemble, self.token_numel))?;
            // [B, T, 1, V]: where this kind applies, its factor; elsewhere 0.
            let factor = prior
                .kind
                .narrow(3, k, 1)?
                .squeeze(3)?
                .broadcast_mul(&error.narrow(0, k, 1)?)?
                .unsqueeze(2)?;
            out = out.broadcast_add(&correction.broadcast_mul(&factor)?)?;
        }
        Ok(out)
    }
}

impl Module for Tail {
    /// `[B, T, D]` → `[B, T, E, V]`; a temporal-prior tail needs
    /// [`Tail::forward_with_prior`].
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.prior_error.is_some() {
            candle_core::bail!("this tail corrects a temporal prior: use forward_with_prior");
        }
        let (b, t, _) = x.dims3()?;
        self.proj[0]
            .forward(&self.ln.forward(x)?)?
            .reshape((b, t, self.ensemble, self.token_numel))
    }
}
