//! The tail: model width back to token values, one set per ensemble member.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Linear, VarBuilder};

use crate::config::{FieldSpec, ModelConfig};
use crate::ops::{LayerNorm, linear};

/// `LayerNorm`, then `Linear(D → E·V)`, reshaped to `[B, T, E, V]`.
#[derive(Debug, Clone)]
pub struct Tail {
    ln: LayerNorm,
    proj: Linear,
    ensemble: usize,
    token_numel: usize,
}

impl Tail {
    pub fn new(vb: VarBuilder, field: &FieldSpec, cfg: &ModelConfig) -> Result<Self> {
        let (d, e, v) = (cfg.d_model, cfg.ensemble, field.token_numel);
        Ok(Self {
            ln: LayerNorm::new(vb.pp("ln"), d, cfg.layer_norm_eps)?,
            proj: linear(vb.pp("proj"), d, e * v, true)?,
            ensemble: e,
            token_numel: v,
        })
    }
}

impl Module for Tail {
    /// `[B, T, D]` → `[B, T, E, V]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        self.proj
            .forward(&self.ln.forward(x)?)?
            .reshape((b, t, self.ensemble, self.token_numel))
    }
}
