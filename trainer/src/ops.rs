//! Differentiable building blocks written from primitive tensor ops.
//!
//! candle-nn 0.11's fused `LayerNorm::forward`, `ops::softmax_last_dim` and rope kernels have no
//! backward pass: a model built on them trains silently with no gradient for whatever sits
//! before them. Everything here is composed of ops that candle's autograd knows (exp, sums,
//! broadcasts, tanh, matmul), so gradients flow through all of it; the gradient-completeness
//! test of the model checks that this stays true.
//!
//! The model's layers ([`LayerNorm`], [`Mlp`]) run the fused CPU kernels of [`crate::fused`],
//! which these functions are the reference of.

use candle_core::{D, Module, Result, Tensor};
use candle_nn::{Init, Linear, VarBuilder};

/// `softmax` over the last dimension.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    // Subtracting the row maximum keeps exp() finite and leaves the result (and its gradient)
    // unchanged; detaching it spares the backward pass a max-gradient that cancels anyway.
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// Layer normalization over the last dimension with gain `gamma` and shift `beta`.
pub fn layer_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let centred = x.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centred.broadcast_div(&(var + eps)?.sqrt()?)?;
    normed.broadcast_mul(gamma)?.broadcast_add(beta)
}

/// GELU, tanh form: `0.5 x (1 + tanh(√(2/π) (x + 0.044715 x³)))`.
///
/// candle's own `gelu` has a backward pass, but with 6-digit constants that disagree with the
/// forward in f64; composing it keeps the gradient exact (the finite-difference test needs that).
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    let c = (2.0 / std::f64::consts::PI).sqrt();
    let inner = (x + (x.sqr()? * x)?.affine(0.044715, 0.0)?)?.affine(c, 0.0)?;
    ((inner.tanh()? + 1.0)? * x)?.affine(0.5, 0.0)
}

/// Pre-norm layer normalization with learnable gain (`weight`) and shift (`bias`).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn new(vb: VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vb.get_with_hints(dim, "weight", Init::Const(1.0))?,
            bias: vb.get_with_hints(dim, "bias", Init::Const(0.0))?,
            eps,
        })
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        crate::fused::layer_norm(x, &self.weight, &self.bias, self.eps)
    }
}

/// A linear layer whose variables are created as zeros; real values come from
/// [`crate::init`] (candle's own initializers draw from an RNG that cannot be seeded) or from a
/// checkpoint the `VarBuilder` reads.
pub fn linear(vb: VarBuilder, in_dim: usize, out_dim: usize, bias: bool) -> Result<Linear> {
    let weight = vb.get_with_hints((out_dim, in_dim), "weight", Init::Const(0.0))?;
    let bias = if bias {
        Some(vb.get_with_hints(out_dim, "bias", Init::Const(0.0))?)
    } else {
        None
    };
    Ok(Linear::new(weight, bias))
}

/// `x · Wᵀ` of a linear layer, without its bias: the fused op of [`crate::fused_linear`] on the
/// CPU, else [`matmul_t_reference`].
pub fn matmul_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    crate::fused_linear::matmul_t(x, w)
}

/// A linear layer applied to `x`: `x · Wᵀ (+ b)`.
pub fn apply_linear(lin: &Linear, x: &Tensor) -> Result<Tensor> {
    let y = matmul_t(x, lin.weight())?;
    match lin.bias() {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

/// `x · Wᵀ` from candle's ops (as `candle_nn::Linear` multiplies: one matrix product over all
/// leading dimensions of a contiguous `x`).
pub fn matmul_t_reference(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let w = w.t()?;
    match *x.dims() {
        [b, m, k] if x.is_contiguous() => x.reshape((b * m, k))?.matmul(&w)?.reshape((b, m, ())),
        [b, _, _] => x.matmul(&w.broadcast_left(b)?),
        _ => x.matmul(&w),
    }
}

/// `x + lin(y)`: the residual connection around a layer ending in `lin`, its bias added in the
/// same pass as the residual ([`crate::fused::residual_bias`]).
pub fn residual_linear(x: &Tensor, lin: &Linear, y: &Tensor) -> Result<Tensor> {
    let z = matmul_t(y, lin.weight())?;
    match lin.bias() {
        Some(b) => crate::fused::residual_bias(x, &z, b),
        None => x + z,
    }
}

/// The transformer MLP: `Linear(D → hidden)`, GELU, `Linear(hidden → D)`.
#[derive(Debug, Clone)]
pub struct Mlp {
    fc1: Linear,
    fc2: Linear,
}

impl Mlp {
    pub fn new(vb: VarBuilder, dim: usize, hidden: usize) -> Result<Self> {
        Ok(Self {
            fc1: linear(vb.pp("fc1"), dim, hidden, true)?,
            fc2: linear(vb.pp("fc2"), hidden, dim, true)?,
        })
    }

    /// `GELU(fc1(x))`, the bias added in the activation's pass.
    fn hidden(&self, x: &Tensor) -> Result<Tensor> {
        let h = matmul_t(x, self.fc1.weight())?;
        match self.fc1.bias() {
            Some(b) => crate::fused::bias_gelu(&h, b),
            None => crate::fused::gelu(&h),
        }
    }

    /// `residual + MLP(x)`.
    pub fn residual(&self, residual: &Tensor, x: &Tensor) -> Result<Tensor> {
        residual_linear(residual, &self.fc2, &self.hidden(x)?)
    }
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.fc2.forward(&self.hidden(x)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    fn close(a: &[f64], b: &[f64], tol: f64) {
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() <= tol, "element {i}: {x} vs {y}");
        }
    }

    #[test]
    fn softmax_matches_candle_and_has_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_vec(vec![1.0f64, 2.0, 3.0, -1.0, 0.0, 40.0], (2, 3), &dev)?;
        let ours = softmax_last_dim(x.as_tensor())?;
        let theirs = candle_nn::ops::softmax_last_dim(x.as_tensor())?;
        close(
            &ours.flatten_all()?.to_vec1()?,
            &theirs.flatten_all()?.to_vec1()?,
            1e-12,
        );
        // d/dx_j Σ_i w_i softmax(x)_i = s_j (w_j − Σ_i w_i s_i).
        let w = Tensor::new(&[[1.0f64, 0.0, 0.0], [0.0, 1.0, 0.0]], &dev)?;
        let grads = (ours.clone() * &w)?.sum_all()?.backward()?;
        let g = grads.get(&x).expect("softmax input has a gradient");
        let s: Vec<Vec<f64>> = ours.to_vec2()?;
        let wv: Vec<Vec<f64>> = w.to_vec2()?;
        let mut want = Vec::new();
        for r in 0..2 {
            let dot: f64 = (0..3).map(|i| wv[r][i] * s[r][i]).sum();
            want.extend((0..3).map(|j| s[r][j] * (wv[r][j] - dot)));
        }
        close(&g.flatten_all()?.to_vec1()?, &want, 1e-12);
        Ok(())
    }

    #[test]
    fn layer_norm_matches_candle_and_has_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_vec(
            (0..12).map(|i| ((i * 7) % 5) as f64 - 1.5).collect(),
            (3, 4),
            &dev,
        )?;
        let gamma = Var::from_vec(vec![1.0f64, 2.0, 0.5, -1.0], 4, &dev)?;
        let beta = Var::from_vec(vec![0.1f64, 0.0, -0.2, 0.3], 4, &dev)?;
        let ours = layer_norm(x.as_tensor(), gamma.as_tensor(), beta.as_tensor(), 1e-5)?;
        // The fused kernel has no f64 version: compare in f32.
        let f32 = |t: &Var| t.as_tensor().to_dtype(DType::F32);
        let theirs = candle_nn::LayerNorm::new(f32(&gamma)?, f32(&beta)?, 1e-5)
            .forward(&f32(&x)?)?
            .to_dtype(DType::F64)?;
        close(
            &ours.flatten_all()?.to_vec1()?,
            &theirs.flatten_all()?.to_vec1()?,
            1e-5,
        );
        let grads = ours.sqr()?.sum_all()?.backward()?;
        for v in [&x, &gamma, &beta] {
            let g = grads.get(v).expect("every input has a gradient");
            assert!(g.abs()?.sum_all()?.to_scalar::<f64>()? > 0.0);
        }
        Ok(())
    }

    #[test]
    fn gelu_values_and_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let xs = [-3.0f64, -1.0, 0.0, 0.5, 2.0];
        let x = Var::from_slice(&xs, 5, &dev)?;
        let y = gelu(x.as_tensor())?;
        let f = |v: f64| {
            let c = (2.0 / std::f64::consts::PI).sqrt();
            0.5 * v * (1.0 + (c * (v + 0.044715 * v * v * v)).tanh())
        };
        close(&y.to_vec1()?, &xs.map(f), 1e-14);
        let g = y.sum_all()?.backward()?.get(&x).unwrap().to_vec1::<f64>()?;
        let h = 1e-6;
        let fd = xs.map(|v| (f(v + h) - f(v - h)) / (2.0 * h));
        close(&g, &fd, 1e-8);
        // The fused op agrees on values (so the two are interchangeable in f32 inference).
        let fused = x.as_tensor().gelu()?.to_vec1::<f64>()?;
        close(&y.to_vec1()?, &fused, 1e-6);
        assert_eq!(y.dtype(), DType::F64);
        Ok(())
    }
}
