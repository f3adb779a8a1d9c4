//! `x · Wᵀ`, the matrix product of a linear layer, as one CPU op with its backward pass.
//!
//! Composed in candle ([`crate::ops::matmul_t`]'s reference path) it is a reshape, a transpose,
//! a matmul into a zeroed output and a reshape back: four nodes of the autograd graph, each of
//! whose gradients candle's backward pass creates as zeros and adds into, and a matmul backward
//! that multiplies by transposed copies. Here it is one node: the forward product and the two
//! backward products (`dx = g · W`, `dW = gᵀ · x`) are GEMM calls on the operands where they lie,
//! into outputs written once.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, WithDType};
use gemm::Parallelism;
use num_traits::Float;

use crate::fused::{by_dtype, data, fused_here};
use crate::product::{filled, mat, product};

/// `x · Wᵀ` for `x` `[…, K]` and `w` `[N, K]`, giving `[…, N]`.
pub fn matmul_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if fused_here(x) && w.dtype() == x.dtype() && w.rank() == 2 {
        x.contiguous()?.apply_op2(&w.contiguous()?, MatmulT)
    } else {
        crate::ops::matmul_t_reference(x, w)
    }
}

/// The parallelism of one product: candle's matmul uses as many threads as rayon.
fn threads() -> Parallelism {
    match rayon::current_num_threads() {
        0 | 1 => Parallelism::None,
        n => Parallelism::Rayon(n),
    }
}

/// `(rows, K, N)` of `x` `[…, K]` and `w` `[N, K]`, or an error naming the op.
fn dims(op: &str, x: &Layout, w: &Layout) -> Result<(usize, usize, usize)> {
    let k = x.dims().last().copied().unwrap_or(0);
    match *w.dims() {
        [n, wk] if wk == k && k > 0 && n > 0 => Ok((x.shape().elem_count() / k, k, n)),
        _ => candle_core::bail!(
            "{op}: weight {:?} does not fit input {:?} (want [N, {k}])",
            w.dims(),
            x.dims()
        ),
    }
}

fn forward<T: Float + 'static>(x: &[T], w: &[T], (rows, k, n): (usize, usize, usize)) -> Vec<T> {
    if rows == 0 {
        return Vec::new();
    }
    filled(rows * n, |y| {
        product(
            (rows, n, k),
            y,
            n,
            mat(x, k, 1),
            mat(w, 1, k),
            T::one(),
            threads(),
        )
    })
}

/// `dx` (`rows × K`) then `dW` (`N × K`) in one buffer.
fn backward<T: Float + 'static>(
    x: &[T],
    w: &[T],
    g: &[T],
    (rows, k, n): (usize, usize, usize),
) -> Vec<T> {
    if rows == 0 {
        return vec![T::zero(); n * k];
    }
    filled((rows + n) * k, |out| {
        let (dx, dw) = out.split_at_mut(rows * k);
        product(
            (rows, k, n),
            dx,
            k,
            mat(g, n, 1),
            mat(w, k, 1),
            T::one(),
            threads(),
        );
        product(
            (n, k, rows),
            dw,
            k,
            mat(g, 1, n),
            mat(x, k, 1),
            T::one(),
            threads(),
        );
    })
}

struct MatmulT;

impl CustomOp2 for MatmulT {
    fn name(&self) -> &'static str {
        "fused-matmul-t"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let op = self.name();
        let (rows, k, n) = dims(op, l1, l2)?;
        let out = by_dtype!(op, s1, |T| {
            let (x, w) = (data::<T>(op, s1, l1)?, data::<T>(op, s2, l2)?);
            <T as WithDType>::to_cpu_storage_owned(forward(x, w, (rows, k, n)))
        });
        let mut shape = l1.dims().to_vec();
        *shape.last_mut().expect("dims checks the rank") = n;
        Ok((out, Shape::from(shape)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grads = x.apply_op3_no_bwd(w, &g.contiguous()?, &MatmulTBwd)?;
        let nx = x.elem_count();
        let dx = grads.narrow(0, 0, nx)?.reshape(x.shape())?;
        let dw = grads.narrow(0, nx, w.elem_count())?.reshape(w.shape())?;
        Ok((Some(dx), Some(dw)))
    }
}

/// The gradients of [`MatmulT`] for `x`, `w` and the output's gradient `g`.
struct MatmulTBwd;

impl CustomOp3 for MatmulTBwd {
    fn name(&self) -> &'static str {
        "fused-matmul-t-bwd"
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
        let op = self.name();
        let (rows, k, n) = dims(op, l1, l2)?;
        if l3.shape().elem_count() != rows * n {
            candle_core::bail!("{op}: gradient {:?} is not [{rows}, {n}]", l3.dims());
        }
        let out = by_dtype!(op, s1, |T| {
            let (x, w) = (data::<T>(op, s1, l1)?, data::<T>(op, s2, l2)?);
            let g = data::<T>(op, s3, l3)?;
            <T as WithDType>::to_cpu_storage_owned(backward(x, w, g, (rows, k, n)))
        });
        Ok((out, Shape::from((rows + n) * k)))
    }
}
