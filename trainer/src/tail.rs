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
/// ([`PREDICTED_PRIOR_KINDS`]), each with a learned factor, and adds the chosen one's output
/// to the prior. Interpolation errs far less than persistence: with one projection the larger
/// residuals would set every update, and one factor would make the correction too weak for
/// the one or noise on top of the other.
#[derive(Debug, Clone)]
pub struct Tail {
    ln: LayerNorm,
    /// One projection, or one per predicted prior kind.
    proj: Vec<Linear>,
    /// `[K]`: the factor of each kind's correction (temporal prior only).
    prior_scale: Option<Tensor>,
    ensemble: usize,
    token_numel: usize,
}

/// The names of the per-kind projections, in [`PREDICTED_PRIOR_KINDS`] order.
const PRIOR_PROJ: [&str; 3] = ["proj_interpolated", "proj_one_sided", "proj_climatology"];

impl Tail {
    pub fn new(vb: VarBuilder, field: &FieldSpec, cfg: &ModelConfig) -> Result<Self> {
        let (d, e, v) = (cfg.d_model, cfg.ensemble, field.token_numel);
        let (proj, prior_scale) = match cfg.prior {
            Prior::None => (vec![linear(vb.pp("proj"), d, e * v, true)?], None),
            Prior::Temporal => (
                PRIOR_PROJ
                    .iter()
                    .map(|name| linear(vb.pp(name), d, e * v, true))
                    .collect::<Result<_>>()?,
                Some(vb.get(PREDICTED_PRIOR_KINDS.len(), "prior_scale")?),
            ),
        };
        Ok(Self {
            ln: LayerNorm::new(vb.pp("ln"), d, cfg.layer_norm_eps)?,
            proj,
            prior_scale,
            ensemble: e,
            token_numel: v,
        })
    }

    /// `[B, T, D]` → `[B, T, E, V]`: `prior + Σ_k kind_k · scale_k · proj_k(LN(x))`.
    pub fn forward_with_prior(&self, x: &Tensor, prior: &PriorInput) -> Result<Tensor> {
        let scale = self
            .prior_scale
            .as_ref()
            .expect("a tail of a temporal-prior model has its scales");
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
                .broadcast_mul(&scale.narrow(0, k, 1)?)?
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
        if self.prior_scale.is_some() {
            candle_core::bail!("this tail corrects a temporal prior: use forward_with_prior");
        }
        let (b, t, _) = x.dims3()?;
        self.proj[0]
            .forward(&self.ln.forward(x)?)?
            .reshape((b, t, self.ensemble, self.token_numel))
    }
}
