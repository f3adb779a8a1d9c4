//! The multi-field encoder layer: one pre-LayerNorm transformer block per field, coupled by the
//! heads that attend across fields.
//!
//! Of each field's `H` heads, the first `H − C` attend within the field and the last `C` attend
//! across fields: their keys and values are the concatenation, along the token axis, of every
//! field's keys and values for those heads (each field computing its own with its own fused QKV,
//! so a field's cross heads see all fields, itself included). This is how AtmoRep couples its
//! per-field transformers.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Linear, VarBuilder};

use crate::attention::{MultiHeadAttention, attend};
use crate::config::{AuxInfo, ModelConfig};
use crate::ops::{LayerNorm, Mlp, linear};

/// One field's attention weights in one encoder layer.
#[derive(Debug, Clone)]
pub struct EncoderAttention {
    /// `[B, H − C, T, T]`: heads attending within the field; `None` when `C = H`.
    pub within: Option<Tensor>,
    /// `[B, C, T, ΣT]`: heads attending across fields, keys in field order; `None` when `C = 0`.
    pub across: Option<Tensor>,
}

/// One field's block of an encoder layer.
#[derive(Debug, Clone)]
struct FieldBlock {
    ln1: LayerNorm,
    attn: MultiHeadAttention,
    ln2: LayerNorm,
    mlp: Mlp,
    /// [`AuxInfo::Reappend`]'s per-layer `Linear(d_info → D)` of the info.
    reappend: Option<Linear>,
}

/// One encoder layer across all fields.
#[derive(Debug, Clone)]
pub struct EncoderLayer {
    blocks: Vec<FieldBlock>,
    within_heads: usize,
    cross_heads: usize,
}

impl EncoderLayer {
    /// Variables under `vb.pp(field name)` for each field.
    pub fn new(vb: VarBuilder, cfg: &ModelConfig) -> Result<Self> {
        let d = cfg.d_model;
        let blocks = cfg
            .fields
            .iter()
            .map(|f| {
                let vb = vb.pp(&f.name);
                Ok(FieldBlock {
                    ln1: LayerNorm::new(vb.pp("ln1"), d, cfg.layer_norm_eps)?,
                    attn: MultiHeadAttention::new(vb.pp("attn"), d, cfg.num_heads)?,
                    ln2: LayerNorm::new(vb.pp("ln2"), d, cfg.layer_norm_eps)?,
                    mlp: Mlp::new(vb.pp("mlp"), d, cfg.mlp_hidden())?,
                    reappend: match cfg.aux_info {
                        AuxInfo::Reappend => Some(linear(vb.pp("reappend"), cfg.d_info, d, false)?),
                        _ => None,
                    },
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            blocks,
            within_heads: cfg.within_heads(),
            cross_heads: cfg.cross_heads,
        })
    }

    /// Applies the layer to every field's tokens `xs[f]` `[B, T_f, D]`. `infos[f]` is the
    /// field's info embedding for [`AuxInfo::Reappend`] (ignored otherwise; may be empty).
    /// Attention weights are returned per field when `want_weights`.
    pub fn forward(
        &self,
        xs: &[Tensor],
        infos: &[Option<Tensor>],
        want_weights: bool,
    ) -> Result<(Vec<Tensor>, Option<Vec<EncoderAttention>>)> {
        let (hw, hc) = (self.within_heads, self.cross_heads);
        // Project every field first: cross heads need all fields' keys and values.
        let mut qkvs = Vec::with_capacity(xs.len());
        for (block, x) in self.blocks.iter().zip(xs) {
            qkvs.push(block.attn.project_qkv(&block.ln1.forward(x)?)?);
        }
        let (cross_k, cross_v) = if hc > 0 {
            let ks: Vec<Tensor> = qkvs
                .iter()
                .map(|(_, k, _)| k.narrow(1, hw, hc))
                .collect::<Result<_>>()?;
            let vs: Vec<Tensor> = qkvs
                .iter()
                .map(|(_, _, v)| v.narrow(1, hw, hc))
                .collect::<Result<_>>()?;
            (Some(Tensor::cat(&ks, 2)?), Some(Tensor::cat(&vs, 2)?))
        } else {
            (None, None)
        };

        let mut outs = Vec::with_capacity(xs.len());
        let mut weights = want_weights.then(Vec::new);
        for (f, (block, x)) in self.blocks.iter().zip(xs).enumerate() {
            let (q, k, v) = &qkvs[f];
            let mut ctxs = Vec::with_capacity(2);
            let mut maps = EncoderAttention {
                within: None,
                across: None,
            };
            let heads = |t: &Tensor, start, len| t.narrow(1, start, len);
            if hw > 0 {
                let (ctx, w) = attend(
                    &heads(q, 0, hw)?,
                    &heads(k, 0, hw)?,
                    &heads(v, 0, hw)?,
                    want_weights,
                )?;
                ctxs.push(ctx);
                maps.within = w;
            }
            if let (Some(ck), Some(cv)) = (&cross_k, &cross_v) {
                let (ctx, w) = attend(&heads(q, hw, hc)?, ck, cv, want_weights)?;
                ctxs.push(ctx);
                maps.across = w;
            }
            let ctx = if ctxs.len() == 1 {
                ctxs.pop().expect("one context")
            } else {
                Tensor::cat(&ctxs, 1)?
            };
            let mut h = block.attn.project_out_residual(x, &ctx)?;
            if let (Some(proj), Some(Some(info))) = (&block.reappend, infos.get(f)) {
                h = reappend_info(&h, proj, info)?;
            }
            let h = block.mlp.residual(&h, &block.ln2.forward(&h)?)?;
            outs.push(h);
            if let Some(w) = weights.as_mut() {
                w.push(maps);
            }
        }
        Ok((outs, weights))
    }
}

/// [`AuxInfo::Reappend`] after an attention sub-layer: adds the layer's projection of the info
/// embedding `info` `[B, T, d_info]` to `h` `[B, T, D]` (see [`AuxInfo::Reappend`] for why an
/// addition is an append).
pub(crate) fn reappend_info(h: &Tensor, proj: &Linear, info: &Tensor) -> Result<Tensor> {
    h + proj.forward(info)?
}
