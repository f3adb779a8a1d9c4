//! The per-field decoder layer: pre-LayerNorm self-attention within the field,
//! cross-attention into the field's encoder output, MLP.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Linear, VarBuilder};

use crate::attention::{CrossAttention, MultiHeadAttention};
use crate::config::{AuxInfo, ModelConfig};
use crate::encoder::reappend_info;
use crate::ops::{LayerNorm, Mlp, linear};

/// One field's attention weights in one decoder layer.
#[derive(Debug, Clone)]
pub struct DecoderAttention {
    /// `[B, H, T, T]`.
    pub self_attn: Tensor,
    /// `[B, H, T, S]` into the same field's encoder output (`S = T`: the field's own tokens,
    /// class token included where there is one).
    pub cross_attn: Tensor,
}

/// One decoder layer of one field.
#[derive(Debug, Clone)]
pub struct DecoderLayer {
    ln1: LayerNorm,
    self_attn: MultiHeadAttention,
    ln2: LayerNorm,
    /// The encoder output is an un-normalized residual stream; it gets its own norm.
    ln_memory: LayerNorm,
    cross_attn: CrossAttention,
    ln3: LayerNorm,
    mlp: Mlp,
    /// [`AuxInfo::Reappend`]: one projection after each of the two attention sub-layers.
    reappend: Option<(Linear, Linear)>,
}

impl DecoderLayer {
    pub fn new(vb: VarBuilder, cfg: &ModelConfig) -> Result<Self> {
        let (d, h, eps) = (cfg.d_model, cfg.num_heads, cfg.layer_norm_eps);
        let reappend = match cfg.aux_info {
            AuxInfo::Reappend => Some((
                linear(vb.pp("reappend_self"), cfg.d_info, d, false)?,
                linear(vb.pp("reappend_cross"), cfg.d_info, d, false)?,
            )),
            _ => None,
        };
        Ok(Self {
            ln1: LayerNorm::new(vb.pp("ln1"), d, eps)?,
            self_attn: MultiHeadAttention::new(vb.pp("self_attn"), d, h)?,
            ln2: LayerNorm::new(vb.pp("ln2"), d, eps)?,
            ln_memory: LayerNorm::new(vb.pp("ln_memory"), d, eps)?,
            cross_attn: CrossAttention::new(vb.pp("cross_attn"), d, h)?,
            ln3: LayerNorm::new(vb.pp("ln3"), d, eps)?,
            mlp: Mlp::new(vb.pp("mlp"), d, cfg.mlp_hidden())?,
            reappend,
        })
    }

    /// Applies the layer to `x` `[B, T, D]` attending into `memory` `[B, S, D]`; `info` is the
    /// field's info embedding for [`AuxInfo::Reappend`].
    pub fn forward(
        &self,
        x: &Tensor,
        memory: &Tensor,
        info: Option<&Tensor>,
        want_weights: bool,
    ) -> Result<(Tensor, Option<DecoderAttention>)> {
        let (mut h, self_w) = self
            .self_attn
            .residual(x, &self.ln1.forward(x)?, want_weights)?;
        if let (Some((p, _)), Some(info)) = (&self.reappend, info) {
            h = reappend_info(&h, p, info)?;
        }
        let memory = self.ln_memory.forward(memory)?;
        let (hc, cross_w) =
            self.cross_attn
                .residual(&h, &self.ln2.forward(&h)?, &memory, want_weights)?;
        h = hc;
        if let (Some((_, p)), Some(info)) = (&self.reappend, info) {
            h = reappend_info(&h, p, info)?;
        }
        let h = self.mlp.residual(&h, &self.ln3.forward(&h)?)?;
        let weights = match (self_w, cross_w) {
            (Some(self_attn), Some(cross_attn)) => Some(DecoderAttention {
                self_attn,
                cross_attn,
            }),
            _ => None,
        };
        Ok((h, weights))
    }
}
