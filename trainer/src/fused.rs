//! Fused CPU kernels with backward passes: the scaled softmax of attention, layer norm and GELU.
//!
//! Composed of primitive ops ([`crate::ops`]), each of these is a chain of element-wise maps,
//! broadcasts and reductions, every one of them a fresh tensor forward and several more backward;
//! in the `bench-mid` step those maps, their allocations and the page faults of touching them
//! cost more than the matrix multiplies. Here each is one pass over rows (rayon-parallel, a row
//! in cache) forward and one backward, as candle custom ops.
//!
//! The primitive versions stay the reference and the path on other devices: [`softmax_scaled`],
//! [`layer_norm`] and [`gelu`] take the fused kernel on the CPU only. The tests hold each kernel to
//! its reference (values and gradients) and to finite differences in f64.
//!
//! Determinism: every kernel computes each output from one row (or one element) in a fixed
//! order, and the one reduction across rows (layer norm's gain and shift gradients) sums fixed
//! blocks of rows and then the blocks in order, so results do not depend on the number of threads.

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor,
};
use num_traits::Float;
use rayon::prelude::*;

use crate::fused_attention::{Kernel, dispatch_wide};
use crate::ops;

/// Rows per rayon task: enough work per task to amortise scheduling.
const ROW_BLOCK: usize = 16;

/// `softmax(scale · x)` over the last dimension (`scale` > 0).
pub fn softmax_scaled(x: &Tensor, scale: f64) -> Result<Tensor> {
    if fused_here(x) {
        x.contiguous()?.apply_op1(Softmax { scale })
    } else {
        ops::softmax_last_dim(&x.affine(scale, 0.0)?)
    }
}

/// Layer normalization over the last dimension (see [`ops::layer_norm`]).
pub fn layer_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    if fused_here(x) && gamma.dtype() == x.dtype() && beta.dtype() == x.dtype() {
        x.contiguous()?
            .apply_op3(&gamma.contiguous()?, &beta.contiguous()?, LayerNorm { eps })
    } else {
        ops::layer_norm(x, gamma, beta, eps)
    }
}

/// GELU, tanh form (see [`ops::gelu`]).
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    if fused_here(x) {
        x.contiguous()?.apply_op1(Gelu)
    } else {
        ops::gelu(x)
    }
}

/// Whether the fused kernels are on: unless the environment sets `ATMOREP_FUSED=0`, which takes
/// the reference ops everywhere (to compare the two, or to rule the kernels out).
pub fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("ATMOREP_FUSED").map_or(true, |v| v.trim() != "0"))
}

/// `GELU(x + bias)`, the bias over the last dimension: the MLP's first layer and its activation.
pub fn bias_gelu(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    if fused_here(x) && bias.dtype() == x.dtype() {
        x.contiguous()?.apply_op2(&bias.contiguous()?, BiasGelu)
    } else {
        ops::gelu(&x.broadcast_add(bias)?)
    }
}

/// `x + y + bias`, the bias over the last dimension: a residual connection around a layer whose
/// last linear map has a bias.
pub fn residual_bias(x: &Tensor, y: &Tensor, bias: &Tensor) -> Result<Tensor> {
    if fused_here(x) && y.dtype() == x.dtype() && bias.dtype() == x.dtype() {
        x.contiguous()?
            .apply_op3(&y.contiguous()?, &bias.contiguous()?, ResidualBias)
    } else {
        x + y.broadcast_add(bias)?
    }
}

pub(crate) fn fused_here(x: &Tensor) -> bool {
    enabled() && x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64) && x.rank() > 0
}

/// The contiguous data of an operand, or an error naming the op.
pub(crate) fn data<'a, T: candle_core::WithDType>(
    op: &str,
    s: &'a CpuStorage,
    l: &Layout,
) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s.as_slice::<T>()?[a..b]),
        None => candle_core::bail!("{op}: operand not contiguous"),
    }
}

/// Applies `f` to `$t`-typed data for an f32 or f64 storage; other dtypes are an error (and an
/// operand of another dtype fails `as_slice::<$t>`).
macro_rules! by_dtype {
    ($op:expr, $s:expr, |$t:ident| $body:expr) => {
        match $s {
            CpuStorage::F32(_) => {
                type $t = f32;
                $body
            }
            CpuStorage::F64(_) => {
                type $t = f64;
                $body
            }
            _ => candle_core::bail!("{}: no fused kernel for this dtype", $op),
        }
    };
}
pub(crate) use by_dtype;

fn last_dim(l: &Layout) -> usize {
    l.dims().last().copied().unwrap_or(1).max(1)
}

// ---------------------------------------------------------------------------------------------
// softmax

struct Softmax {
    scale: f64,
}

fn softmax_fwd<T: Float + Send + Sync>(x: &[T], n: usize, scale: T) -> Vec<T> {
    let mut y = vec![T::zero(); x.len()];
    y.par_chunks_mut(n * ROW_BLOCK)
        .zip(x.par_chunks(n * ROW_BLOCK))
        .for_each(|(yb, xb)| {
            for (y, x) in yb.chunks_mut(n).zip(xb.chunks(n)) {
                let max = x.iter().fold(T::neg_infinity(), |m, &v| m.max(v));
                let mut sum = T::zero();
                for (y, &x) in y.iter_mut().zip(x) {
                    *y = ((x - max) * scale).exp();
                    sum = sum + *y;
                }
                let inv = T::one() / sum;
                y.iter_mut().for_each(|y| *y = *y * inv);
            }
        });
    y
}

/// `dx = scale · y ⊙ (g − Σ g ⊙ y)` row by row.
fn softmax_bwd<T: Float + Send + Sync>(y: &[T], g: &[T], n: usize, scale: T) -> Vec<T> {
    let mut dx = vec![T::zero(); y.len()];
    dx.par_chunks_mut(n * ROW_BLOCK)
        .zip(y.par_chunks(n * ROW_BLOCK).zip(g.par_chunks(n * ROW_BLOCK)))
        .for_each(|(db, (yb, gb))| {
            for (d, (y, g)) in db.chunks_mut(n).zip(yb.chunks(n).zip(gb.chunks(n))) {
                let dot = y.iter().zip(g).fold(T::zero(), |a, (&y, &g)| a + y * g);
                for ((d, &y), &g) in d.iter_mut().zip(y).zip(g) {
                    *d = scale * y * (g - dot);
                }
            }
        });
    dx
}

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "fused-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let n = last_dim(l);
        let out = by_dtype!(self.name(), s, |T| {
            let x = data::<T>(self.name(), s, l)?;
            <T as candle_core::WithDType>::to_cpu_storage_owned(softmax_fwd(x, n, self.scale as T))
        });
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let op = SoftmaxBwd { scale: self.scale };
        Ok(Some(y.apply_op2_no_bwd(&g.contiguous()?, &op)?))
    }
}

struct SoftmaxBwd {
    scale: f64,
}

impl CustomOp2 for SoftmaxBwd {
    fn name(&self) -> &'static str {
        "fused-softmax-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let n = last_dim(l1);
        let out = by_dtype!(self.name(), s1, |T| {
            let y = data::<T>(self.name(), s1, l1)?;
            let g = data::<T>(self.name(), s2, l2)?;
            <T as candle_core::WithDType>::to_cpu_storage_owned(softmax_bwd(
                y,
                g,
                n,
                self.scale as T,
            ))
        });
        Ok((out, l1.shape().clone()))
    }
}

// ---------------------------------------------------------------------------------------------
// layer norm

struct LayerNorm {
    eps: f64,
}

/// Mean and 1/σ of a row, σ² the biased variance (as [`ops::layer_norm`]).
fn moments<T: Float>(x: &[T], eps: T) -> (T, T) {
    let n = T::from(x.len()).expect("a row length is a number");
    let mean = x.iter().fold(T::zero(), |a, &v| a + v) / n;
    let var = x
        .iter()
        .fold(T::zero(), |a, &v| a + (v - mean) * (v - mean))
        / n;
    (mean, T::one() / (var + eps).sqrt())
}

fn layer_norm_fwd<T: Float + Send + Sync>(x: &[T], gamma: &[T], beta: &[T], eps: T) -> Vec<T> {
    let n = gamma.len();
    let mut y = vec![T::zero(); x.len()];
    y.par_chunks_mut(n * ROW_BLOCK)
        .zip(x.par_chunks(n * ROW_BLOCK))
        .for_each(|(yb, xb)| {
            for (y, x) in yb.chunks_mut(n).zip(xb.chunks(n)) {
                let (mean, rstd) = moments(x, eps);
                for (((y, &x), &g), &b) in y.iter_mut().zip(x).zip(gamma).zip(beta) {
                    *y = (x - mean) * rstd * g + b;
                }
            }
        });
    y
}

/// `dx`, then `dγ = Σ g ⊙ x̂` and `dβ = Σ g` over rows, as one buffer of `rows + 2` rows.
fn layer_norm_bwd<T: Float + Send + Sync>(x: &[T], gamma: &[T], g: &[T], eps: T) -> Vec<T> {
    let n = gamma.len();
    let rows = x.len() / n;
    let mut out = vec![T::zero(); x.len() + 2 * n];
    let (dx, dparams) = out.split_at_mut(x.len());
    let nf = T::from(n).expect("a row length is a number");
    // Per block of rows: dx, and the block's partial sums of dγ and dβ.
    let partials: Vec<Vec<T>> = dx
        .par_chunks_mut(n * ROW_BLOCK)
        .zip(x.par_chunks(n * ROW_BLOCK).zip(g.par_chunks(n * ROW_BLOCK)))
        .map(|(db, (xb, gb))| {
            let mut part = vec![T::zero(); 2 * n];
            let mut xhat = vec![T::zero(); n];
            for (d, (x, g)) in db.chunks_mut(n).zip(xb.chunks(n).zip(gb.chunks(n))) {
                let (mean, rstd) = moments(x, eps);
                let (mut sum_gh, mut sum_ghx) = (T::zero(), T::zero());
                for i in 0..n {
                    xhat[i] = (x[i] - mean) * rstd;
                    let gh = g[i] * gamma[i];
                    sum_gh = sum_gh + gh;
                    sum_ghx = sum_ghx + gh * xhat[i];
                    part[i] = part[i] + g[i] * xhat[i];
                    part[n + i] = part[n + i] + g[i];
                }
                let (mean_gh, mean_ghx) = (sum_gh / nf, sum_ghx / nf);
                for i in 0..n {
                    d[i] = rstd * (g[i] * gamma[i] - mean_gh - xhat[i] * mean_ghx);
                }
            }
            part
        })
        .collect();
    debug_assert_eq!(partials.len(), rows.div_ceil(ROW_BLOCK));
    for part in &partials {
        for (a, &p) in dparams.iter_mut().zip(part) {
            *a = *a + p;
        }
    }
    out
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "fused-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let n = last_dim(l1);
        if l2.shape().elem_count() != n || l3.shape().elem_count() != n {
            candle_core::bail!(
                "{}: gain {:?} and shift {:?} must have the input's last dimension {n}",
                self.name(),
                l2.shape(),
                l3.shape()
            );
        }
        let out = by_dtype!(self.name(), s1, |T| {
            let x = data::<T>(self.name(), s1, l1)?;
            let gamma = data::<T>(self.name(), s2, l2)?;
            let beta = data::<T>(self.name(), s3, l3)?;
            <T as candle_core::WithDType>::to_cpu_storage_owned(layer_norm_fwd(
                x,
                gamma,
                beta,
                self.eps as T,
            ))
        });
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let n = gamma.elem_count();
        let rows = x.elem_count() / n;
        let op = LayerNormBwd { eps: self.eps };
        let all = x.apply_op3_no_bwd(&gamma.contiguous()?, &g.contiguous()?, &op)?;
        let dx = all.narrow(0, 0, rows)?.reshape(x.shape())?;
        let dgamma = all.narrow(0, rows, 1)?.reshape(gamma.shape())?;
        let dbeta = all.narrow(0, rows + 1, 1)?.reshape(gamma.shape())?;
        Ok((Some(dx), Some(dgamma), Some(dbeta)))
    }
}

struct LayerNormBwd {
    eps: f64,
}

impl CustomOp3 for LayerNormBwd {
    fn name(&self) -> &'static str {
        "fused-layer-norm-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let n = l2.shape().elem_count();
        let rows = l1.shape().elem_count() / n.max(1);
        let out = by_dtype!(self.name(), s1, |T| {
            let x = data::<T>(self.name(), s1, l1)?;
            let gamma = data::<T>(self.name(), s2, l2)?;
            let g = data::<T>(self.name(), s3, l3)?;
            <T as candle_core::WithDType>::to_cpu_storage_owned(layer_norm_bwd(
                x,
                gamma,
                g,
                self.eps as T,
            ))
        });
        Ok((out, Shape::from((rows + 2, n))))
    }
}

// ---------------------------------------------------------------------------------------------
// GELU

struct Gelu;

/// Elements per rayon task.
const ELEM_BLOCK: usize = 4096;

/// `tanh` through one `exp` (glibc's `tanhf` goes through the slower `expm1f`; f32 takes the
/// vectorizable [`crate::fused_attention::exp_f32`]); saturates to ±1 without NaN, since
/// `2 / (e^{2y} + 1)` goes to 0 and 2 at the ends.
#[inline(always)]
fn tanh<T: Kernel>(y: T) -> T {
    let two = T::one() + T::one();
    T::one() - two / (T::exp_fast(two * y) + T::one())
}

fn gelu_consts<T: Float>() -> (T, T) {
    let c = T::from((2.0 / std::f64::consts::PI).sqrt()).expect("a constant");
    (c, T::from(0.044715).expect("a constant"))
}

fn gelu_fwd<T: Kernel>(x: &[T]) -> Vec<T> {
    let (c, a) = gelu_consts::<T>();
    let half = T::from(0.5).expect("a constant");
    let mut y = vec![T::zero(); x.len()];
    y.par_chunks_mut(ELEM_BLOCK)
        .zip(x.par_chunks(ELEM_BLOCK))
        .for_each(|(y, x)| gelu_block(y, x, &[], (c, a, half)));
    y
}

dispatch_wide! {
    /// `y = GELU(x + bias)` over rows of `bias.len()` (no bias when it is empty).
    fn gelu_block<T: Kernel>(y: &mut [T], x: &[T], bias: &[T], consts: (T, T, T)) => gelu_rows
}

#[inline(always)]
fn gelu_rows<T: Kernel>(y: &mut [T], x: &[T], bias: &[T], (c, a, half): (T, T, T)) {
    let gelu = |x: T| half * x * (T::one() + tanh(c * (x + a * x * x * x)));
    if bias.is_empty() {
        y.iter_mut().zip(x).for_each(|(y, &x)| *y = gelu(x));
        return;
    }
    for (y, x) in y.chunks_mut(bias.len()).zip(x.chunks(bias.len())) {
        for ((y, &x), &b) in y.iter_mut().zip(x).zip(bias) {
            *y = gelu(x + b);
        }
    }
}

dispatch_wide! {
    /// `d = g · GELU'(x + bias)` over rows of `bias.len()` (no bias when it is empty).
    fn gelu_grad_block<T: Kernel>(d: &mut [T], x: &[T], g: &[T], bias: &[T], consts: (T, T, T))
        => gelu_grad_rows
}

#[inline(always)]
fn gelu_grad_rows<T: Kernel>(d: &mut [T], x: &[T], g: &[T], bias: &[T], (c, a, half): (T, T, T)) {
    let three = T::one() + T::one() + T::one();
    if bias.is_empty() {
        for ((d, &x), &g) in d.iter_mut().zip(x).zip(g) {
            *d = g * gelu_grad(x, c, a, half, three);
        }
        return;
    }
    let n = bias.len();
    for ((d, x), g) in d.chunks_mut(n).zip(x.chunks(n)).zip(g.chunks(n)) {
        for (((d, &x), &g), &b) in d.iter_mut().zip(x).zip(g).zip(bias) {
            *d = g * gelu_grad(x + b, c, a, half, three);
        }
    }
}

/// `GELU'(x)`.
#[inline(always)]
fn gelu_grad<T: Kernel>(x: T, c: T, a: T, half: T, three: T) -> T {
    let t = tanh(c * (x + a * x * x * x));
    let inner = c * (T::one() + three * a * x * x);
    half * ((T::one() + t) + x * (T::one() - t * t) * inner)
}

/// `g · GELU'(x)`.
fn gelu_bwd<T: Kernel>(x: &[T], g: &[T]) -> Vec<T> {
    let (c, a) = gelu_consts::<T>();
    let half = T::from(0.5).expect("a constant");
    let mut dx = vec![T::zero(); x.len()];
    dx.par_chunks_mut(ELEM_BLOCK)
        .zip(x.par_chunks(ELEM_BLOCK).zip(g.par_chunks(ELEM_BLOCK)))
        .for_each(|(d, (x, g))| gelu_grad_block(d, x, g, &[], (c, a, half)));
    dx
}

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "fused-gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = by_dtype!(self.name(), s, |T| {
            <T as candle_core::WithDType>::to_cpu_storage_owned(gelu_fwd(data::<T>(
                self.name(),
                s,
                l,
            )?))
        });
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&g.contiguous()?, &GeluBwd)?))
    }
}

struct GeluBwd;

impl CustomOp2 for GeluBwd {
    fn name(&self) -> &'static str {
        "fused-gelu-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = by_dtype!(self.name(), s1, |T| {
            let x = data::<T>(self.name(), s1, l1)?;
            <T as candle_core::WithDType>::to_cpu_storage_owned(gelu_bwd(
                x,
                data::<T>(self.name(), s2, l2)?,
            ))
        });
        Ok((out, l1.shape().clone()))
    }
}

// ---------------------------------------------------------------------------------------------
// bias + GELU, residual + bias

/// Sums rows of `n` into one row: fixed blocks of rows in parallel, then the blocks in order.
fn column_sums<T: Float + Send + Sync>(x: &[T], n: usize) -> Vec<T> {
    let partials: Vec<Vec<T>> = x
        .par_chunks(n * ROW_BLOCK)
        .map(|b| {
            let mut part = vec![T::zero(); n];
            for row in b.chunks(n) {
                for (p, &v) in part.iter_mut().zip(row) {
                    *p = *p + v;
                }
            }
            part
        })
        .collect();
    let mut sum = vec![T::zero(); n];
    for part in &partials {
        for (s, &p) in sum.iter_mut().zip(part) {
            *s = *s + p;
        }
    }
    sum
}

struct BiasGelu;

fn bias_gelu_fwd<T: Kernel>(x: &[T], bias: &[T]) -> Vec<T> {
    let (c, a) = gelu_consts::<T>();
    let half = T::from(0.5).expect("a constant");
    let n = bias.len();
    let mut y = vec![T::zero(); x.len()];
    y.par_chunks_mut(n * ROW_BLOCK)
        .zip(x.par_chunks(n * ROW_BLOCK))
        .for_each(|(yb, xb)| gelu_block(yb, xb, bias, (c, a, half)));
    y
}

/// `dx = g · GELU'(x + bias)` and, as one more row, `dbias = Σ dx` over rows.
fn bias_gelu_bwd<T: Kernel>(x: &[T], bias: &[T], g: &[T]) -> Vec<T> {
    let (c, a) = gelu_consts::<T>();
    let half = T::from(0.5).expect("a constant");
    let n = bias.len();
    let mut out = vec![T::zero(); x.len() + n];
    let (dx, dbias) = out.split_at_mut(x.len());
    dx.par_chunks_mut(n * ROW_BLOCK)
        .zip(x.par_chunks(n * ROW_BLOCK).zip(g.par_chunks(n * ROW_BLOCK)))
        .for_each(|(db, (xb, gb))| gelu_grad_block(db, xb, gb, bias, (c, a, half)));
    dbias.copy_from_slice(&column_sums(dx, n));
    out
}

impl CustomOp2 for BiasGelu {
    fn name(&self) -> &'static str {
        "fused-bias-gelu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        check_bias(self.name(), l1, l2)?;
        let out = by_dtype!(self.name(), s1, |T| {
            let x = data::<T>(self.name(), s1, l1)?;
            let bias = data::<T>(self.name(), s2, l2)?;
            <T as candle_core::WithDType>::to_cpu_storage_owned(bias_gelu_fwd(x, bias))
        });
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        bias: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let n = bias.elem_count();
        let rows = x.elem_count() / n;
        let all = x.apply_op3_no_bwd(bias, &g.contiguous()?, &BiasGeluBwd)?;
        let dx = all.narrow(0, 0, rows)?.reshape(x.shape())?;
        let dbias = all.narrow(0, rows, 1)?.reshape(bias.shape())?;
        Ok((Some(dx), Some(dbias)))
    }
}

fn check_bias(op: &str, x: &Layout, bias: &Layout) -> Result<()> {
    let n = last_dim(x);
    if bias.shape().elem_count() != n {
        candle_core::bail!(
            "{op}: bias {:?} must have the input's last dimension {n}",
            bias.shape()
        );
    }
    Ok(())
}

struct BiasGeluBwd;

impl CustomOp3 for BiasGeluBwd {
    fn name(&self) -> &'static str {
        "fused-bias-gelu-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let n = l2.shape().elem_count();
        let rows = l1.shape().elem_count() / n.max(1);
        let out = by_dtype!(self.name(), s1, |T| {
            let x = data::<T>(self.name(), s1, l1)?;
            let bias = data::<T>(self.name(), s2, l2)?;
            let g = data::<T>(self.name(), s3, l3)?;
            <T as candle_core::WithDType>::to_cpu_storage_owned(bias_gelu_bwd(x, bias, g))
        });
        Ok((out, Shape::from((rows + 1, n))))
    }
}

struct ResidualBias;

fn residual_bias_fwd<T: Float + Send + Sync>(x: &[T], y: &[T], bias: &[T]) -> Vec<T> {
    let n = bias.len();
    let mut out = vec![T::zero(); x.len()];
    out.par_chunks_mut(n * ROW_BLOCK)
        .zip(x.par_chunks(n * ROW_BLOCK).zip(y.par_chunks(n * ROW_BLOCK)))
        .for_each(|(ob, (xb, yb))| {
            for (o, (x, y)) in ob.chunks_mut(n).zip(xb.chunks(n).zip(yb.chunks(n))) {
                for (((o, &x), &y), &b) in o.iter_mut().zip(x).zip(y).zip(bias) {
                    *o = x + y + b;
                }
            }
        });
    out
}

impl CustomOp3 for ResidualBias {
    fn name(&self) -> &'static str {
        "fused-residual-bias"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        check_bias(self.name(), l1, l3)?;
        if l1.shape() != l2.shape() {
            candle_core::bail!(
                "{}: shapes {:?} and {:?} differ",
                self.name(),
                l1.shape(),
                l2.shape()
            );
        }
        let out = by_dtype!(self.name(), s1, |T| {
            let x = data::<T>(self.name(), s1, l1)?;
            let y = data::<T>(self.name(), s2, l2)?;
            let bias = data::<T>(self.name(), s3, l3)?;
            let out = residual_bias_fwd(x, y, bias);
            <T as candle_core::WithDType>::to_cpu_storage_owned(out)
        });
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _y: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let dbias = g.apply_op1_no_bwd(&ColumnSums)?.reshape(bias.shape())?;
        Ok((Some(g.clone()), Some(g), Some(dbias)))
    }
}

/// Sums over all dimensions but the last.
struct ColumnSums;

impl CustomOp1 for ColumnSums {
    fn name(&self) -> &'static str {
        "fused-column-sums"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let n = last_dim(l);
        let out = by_dtype!(self.name(), s, |T| {
            <T as candle_core::WithDType>::to_cpu_storage_owned(column_sums(
                data::<T>(self.name(), s, l)?,
                n,
            ))
        });
        Ok((out, Shape::from(n)))
    }
}

#[cfg(test)]
#[path = "fused_tests.rs"]
mod tests;
