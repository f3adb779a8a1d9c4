//! Multi-head attention with fused projections, able to hand back its attention weights.
//!
//! The query/key/value projections have no bias: a key bias adds the same score to every key of
//! a query, which softmax ignores, and a value bias reappears unchanged in the output (weights
//! sum to 1), where the output projection's bias already is. Both would only collect gradients
//! that are zero up to rounding.
//!
//! Weights come back as `[B, heads, T, S]` (query tokens × key tokens, rows summing to 1) when
//! asked for: the plotting of attention maps per layer and head needs them. Otherwise the
//! context comes from the fused kernel ([`crate::fused_attention`]), which never stores them.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Linear, VarBuilder};

use crate::fused::softmax_scaled;
use crate::ops::{apply_linear, linear, residual_linear};

/// The context of `q` over `k`, `v` from the fused kernel of [`crate::fused_attention`], and
/// the weights (as [`scaled_dot_product`] gives them) when `want`: a model asked for its
/// attention maps predicts exactly what it predicts without them.
pub fn attend(q: &Tensor, k: &Tensor, v: &Tensor, want: bool) -> Result<(Tensor, Option<Tensor>)> {
    let ctx = crate::fused_attention::attention(q, k, v)?;
    let weights = want
        .then(|| scaled_dot_product(q, k, v).map(|(_, w)| w))
        .transpose()?;
    Ok((ctx, weights))
}

/// `[B, T, P·H·dh]` → `P` views `[B, H, T, dh]`: the queries, keys and values of a fused
/// projection. They are strided views of `x` (no copy when `x` is contiguous), which the fused
/// attention reads where they lie.
pub fn split_heads(x: &Tensor, parts: usize, heads: usize) -> Result<Vec<Tensor>> {
    let (b, t, d) = x.dims3()?;
    let x = x
        .contiguous()?
        .reshape((b, t, parts, heads, d / (parts * heads)))?;
    (0..parts)
        .map(|i| x.narrow(2, i, 1)?.squeeze(2)?.transpose(1, 2))
        .collect()
}

/// `[B, H, T, dh]` → `[B, T, H·dh]`.
pub fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (b, h, t, dh) = x.dims4()?;
    x.transpose(1, 2)?.contiguous()?.reshape((b, t, h * dh))
}

/// Scaled dot-product attention of `q` `[B, H, T, dh]` over `k`, `v` `[B, H, S, dh]`. Returns
/// the context `[B, H, T, dh]` and the weights `[B, H, T, S]`.
///
/// Inputs may be strided (head slices, concatenations along the token axis): candle's batched
/// matmul wants each matrix contiguous, and `contiguous()` costs nothing when they already are.
pub fn scaled_dot_product(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
    let dh = q.dim(3)?;
    let scores = q.contiguous()?.matmul(&k.transpose(2, 3)?.contiguous()?)?;
    let weights = softmax_scaled(&scores, 1.0 / (dh as f64).sqrt())?;
    let ctx = weights.matmul(&v.contiguous()?)?;
    Ok((ctx, weights))
}

/// Self-attention with one fused `Linear(D → 3·D)` for queries, keys and values.
#[derive(Debug, Clone)]
pub struct MultiHeadAttention {
    qkv: Linear,
    out: Linear,
    num_heads: usize,
}

impl MultiHeadAttention {
    pub fn new(vb: VarBuilder, d_model: usize, num_heads: usize) -> Result<Self> {
        Ok(Self {
            qkv: linear(vb.pp("qkv"), d_model, 3 * d_model, false)?,
            out: linear(vb.pp("out"), d_model, d_model, true)?,
            num_heads,
        })
    }

    pub fn num_heads(&self) -> usize {
        self.num_heads
    }

    /// Queries, keys and values of `x` `[B, T, D]`, each `[B, H, T, dh]`.
    pub fn project_qkv(&self, x: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let [q, k, v]: [Tensor; 3] = split_heads(&apply_linear(&self.qkv, x)?, 3, self.num_heads)?
            .try_into()
            .expect("three parts");
        Ok((q, k, v))
    }

    /// The output projection of a context `[B, H, T, dh]`, giving `[B, T, D]`.
    pub fn project_out(&self, ctx: &Tensor) -> Result<Tensor> {
        apply_linear(&self.out, &merge_heads(ctx)?)
    }

    /// `residual` plus the output projection of a context `[B, H, T, dh]`.
    pub fn project_out_residual(&self, residual: &Tensor, ctx: &Tensor) -> Result<Tensor> {
        residual_linear(residual, &self.out, &merge_heads(ctx)?)
    }

    /// `residual` plus the attention output of `x` `[B, T, D]`, and the weights `[B, H, T, T]`
    /// when `want`.
    pub fn residual(
        &self,
        residual: &Tensor,
        x: &Tensor,
        want: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let (q, k, v) = self.project_qkv(x)?;
        let (ctx, weights) = attend(&q, &k, &v, want)?;
        Ok((self.project_out_residual(residual, &ctx)?, weights))
    }

    /// The attention output `[B, T, D]` and weights `[B, H, T, T]`.
    pub fn forward_with_weights(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let (q, k, v) = self.project_qkv(x)?;
        let (ctx, weights) = attend(&q, &k, &v, true)?;
        Ok((self.project_out(&ctx)?, weights.expect("asked for")))
    }
}

impl Module for MultiHeadAttention {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (q, k, v) = self.project_qkv(x)?;
        self.project_out(&attend(&q, &k, &v, false)?.0)
    }
}

/// Attention of one sequence's queries into another ("memory"): `Linear(D → D)` for queries,
/// one fused `Linear(D → 2·D)` for keys and values.
#[derive(Debug, Clone)]
pub struct CrossAttention {
    q: Linear,
    kv: Linear,
    out: Linear,
    num_heads: usize,
}

impl CrossAttention {
    pub fn new(vb: VarBuilder, d_model: usize, num_heads: usize) -> Result<Self> {
        Ok(Self {
            q: linear(vb.pp("q"), d_model, d_model, false)?,
            kv: linear(vb.pp("kv"), d_model, 2 * d_model, false)?,
            out: linear(vb.pp("out"), d_model, d_model, true)?,
            num_heads,
        })
    }

    /// The output `[B, T, D]` for queries from `x` `[B, T, D]` and keys/values from `memory`
    /// `[B, S, D]`, and the weights `[B, H, T, S]`.
    pub fn forward_with_weights(&self, x: &Tensor, memory: &Tensor) -> Result<(Tensor, Tensor)> {
        let (ctx, weights) = self.context(x, memory, true)?;
        Ok((apply_linear(&self.out, &ctx)?, weights.expect("asked for")))
    }

    pub fn forward(&self, x: &Tensor, memory: &Tensor) -> Result<Tensor> {
        apply_linear(&self.out, &self.context(x, memory, false)?.0)
    }

    /// `residual` plus [`Self::forward_with_weights`]'s output, and the weights when `want`.
    pub fn residual(
        &self,
        residual: &Tensor,
        x: &Tensor,
        memory: &Tensor,
        want: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let (ctx, weights) = self.context(x, memory, want)?;
        Ok((residual_linear(residual, &self.out, &ctx)?, weights))
    }

    /// The merged context `[B, T, D]` before the output projection, and the weights when `want`.
    fn context(&self, x: &Tensor, memory: &Tensor, want: bool) -> Result<(Tensor, Option<Tensor>)> {
        let [q]: [Tensor; 1] = split_heads(&apply_linear(&self.q, x)?, 1, self.num_heads)?
            .try_into()
            .expect("one part");
        let [k, v]: [Tensor; 2] = split_heads(&apply_linear(&self.kv, memory)?, 2, self.num_heads)?
            .try_into()
            .expect("two parts");
        let (ctx, weights) = attend(&q, &k, &v, want)?;
        Ok((merge_heads(&ctx)?, weights))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    use crate::init::initialize;

    fn assert_rows_sum_to_one(w: &Tensor) -> Result<()> {
        let sums: Vec<f32> = w.sum(3)?.flatten_all()?.to_vec1()?;
        for s in sums {
            assert!((s - 1.0).abs() < 1e-5, "row sums to {s}");
        }
        let min: f32 = w.flatten_all()?.min(0)?.to_scalar()?;
        assert!(min >= 0.0);
        Ok(())
    }

    #[test]
    fn weights_have_shape_and_rows_sum_to_one() -> Result<()> {
        let dev = Device::Cpu;
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
        let mha = MultiHeadAttention::new(vb.pp("self"), 16, 4)?;
        let xa = CrossAttention::new(vb.pp("cross"), 16, 4)?;
        initialize(&vm, 3).unwrap();
        let x = Tensor::randn(0f32, 1.0, (2, 5, 16), &dev)?;
        let mem = Tensor::randn(0f32, 1.0, (2, 7, 16), &dev)?;
        let (y, w) = mha.forward_with_weights(&x)?;
        assert_eq!(y.dims(), &[2, 5, 16]);
        assert_eq!(w.dims(), &[2, 4, 5, 5]);
        assert_rows_sum_to_one(&w)?;
        let (y, w) = xa.forward_with_weights(&x, &mem)?;
        assert_eq!(y.dims(), &[2, 5, 16]);
        assert_eq!(w.dims(), &[2, 4, 5, 7]);
        assert_rows_sum_to_one(&w)?;
        Ok(())
    }

    #[test]
    fn heads_round_trip() -> Result<()> {
        let x = Tensor::arange(0f32, 24.0, &Device::Cpu)?.reshape((1, 3, 8))?;
        let h = split_heads(&x, 1, 2)?.remove(0);
        assert_eq!(h.dims(), &[1, 2, 3, 4]);
        // Head 1 of token 2 holds channels 4..8 of token 2.
        assert_eq!(
            h.get(0)?.get(1)?.get(2)?.to_vec1::<f32>()?,
            [20.0, 21.0, 22.0, 23.0]
        );
        assert_eq!(merge_heads(&h)?.to_vec3::<f32>()?, x.to_vec3::<f32>()?);
        // Two parts (keys and values): the second part's head 0 of token 1 is channels 12..14.
        let kv = split_heads(&x, 2, 2)?;
        assert_eq!(kv[1].dims(), &[1, 2, 3, 2]);
        assert_eq!(
            kv[1].get(0)?.get(0)?.get(1)?.to_vec1::<f32>()?,
            [12.0, 13.0]
        );
        Ok(())
    }
}
