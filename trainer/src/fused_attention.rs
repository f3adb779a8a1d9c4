//! Fused scaled dot-product attention for the CPU: the context `softmax(q kᵀ / √dh) v` in one
//! kernel, forward and backward, without keeping the attention weights.
//!
//! The primitive path ([`crate::attention::scaled_dot_product`]) materialises the score and
//! weight matrices of every head (`[B, H, T, S]`), keeps them for the backward pass (most of a
//! GiB over `bench-mid`'s layers), and every matrix product of it allocates a zeroed output and
//! copies transposed operands. Here one task takes one (batch, head): its scores live in a
//! `T × S` scratch that stays in cache while the softmax and the weighted sum run over it, and
//! the backward pass recomputes them from `q` and `k` (as flash attention does) instead of
//! storing them. The products are `gemm` calls (the GEMM candle itself uses), single-threaded
//! inside a task, reading strided operands (head slices of a wider tensor) where they lie.
//!
//! Determinism: each (batch, head) is computed by one thread in a fixed order, so results do not
//! depend on the number of threads.

use candle_core::{
    CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Storage, Tensor, WithDType,
};
use num_traits::Float;
use rayon::prelude::*;

use crate::fused::{by_dtype, fused_here};
use crate::product::{Mat, as_uninit, filled, mat, product};

/// Products inside a task run on its thread: the tasks (batch × heads) are the parallelism.
const ONE_THREAD: gemm::Parallelism = gemm::Parallelism::None;

/// The context `[B, H, T, dh]` of queries `q` `[B, H, T, dh]` over keys and values `k`, `v`
/// `[B, H, S, dh]` (see [`crate::attention::scaled_dot_product`], which also returns the
/// weights). Operands may be strided except along `dh`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let same = k.dtype() == q.dtype() && v.dtype() == q.dtype();
    if fused_here(q) && same && q.rank() == 4 && k.rank() == 4 && v.rank() == 4 {
        let scale = 1.0 / (q.dim(3)? as f64).sqrt();
        rows_contiguous(q)?.apply_op3(
            &rows_contiguous(k)?,
            &rows_contiguous(v)?,
            Attention { scale },
        )
    } else {
        Ok(crate::attention::scaled_dot_product(q, k, v)?.0)
    }
}

/// `t` itself when its last dimension is contiguous (the kernel reads any other strides).
fn rows_contiguous(t: &Tensor) -> Result<Tensor> {
    if t.stride().last() == Some(&1) {
        Ok(t.clone())
    } else {
        t.contiguous()
    }
}

/// Where the `[N, dh]` matrix of each (batch, head) of a `[B, H, N, dh]` operand lies.
#[derive(Debug, Clone, Copy)]
struct Heads {
    batch: usize,
    heads: usize,
    rows: usize,
    dh: usize,
    start: usize,
    batch_stride: usize,
    head_stride: usize,
    row_stride: usize,
}

impl Heads {
    fn of(op: &str, what: &str, l: &Layout) -> Result<Self> {
        let (&[batch, heads, rows, dh], &[batch_stride, head_stride, row_stride, 1]) =
            (l.dims(), l.stride())
        else {
            candle_core::bail!(
                "{op}: {what} must be [B, H, N, dh] with dh contiguous, got {:?} strides {:?}",
                l.dims(),
                l.stride()
            );
        };
        Ok(Self {
            batch,
            heads,
            rows,
            dh,
            start: l.start_offset(),
            batch_stride,
            head_stride,
            row_stride,
        })
    }

    /// The operand's data from the first element of item `i` = (batch `i / H`, head `i % H`).
    fn item<'a, T>(&self, data: &'a [T], i: usize) -> &'a [T] {
        let (b, h) = (i / self.heads, i % self.heads);
        &data[self.start + b * self.batch_stride + h * self.head_stride..]
    }

    fn check_against(&self, op: &str, q: &Heads, what: &str, same_rows: bool) -> Result<()> {
        if self.batch != q.batch
            || self.heads != q.heads
            || self.dh != q.dh
            || (same_rows && self.rows != q.rows)
        {
            candle_core::bail!(
                "{op}: {what} [{}, {}, {}, {}] does not fit the queries [{}, {}, {}, {}]",
                self.batch,
                self.heads,
                self.rows,
                self.dh,
                q.batch,
                q.heads,
                q.rows,
                q.dh
            );
        }
        Ok(())
    }
}

/// `p = softmax(scale · q kᵀ)` of one (batch, head): `p` is `T × S`.
fn weights<T: Kernel>(
    p: &mut [T],
    q: Mat<'_, T>,
    k: Mat<'_, T>,
    dims: (usize, usize, usize),
    scale: T,
) {
    let (t, s, dh) = dims;
    product(
        (t, s, dh),
        as_uninit(p),
        s,
        q,
        mat(k.data, 1, k.rs),
        scale,
        ONE_THREAD,
    );
    softmax(p, s);
}

dispatch_wide! {
    /// Each row of `s` scores in `p` replaced by its softmax.
    fn softmax<T: Kernel>(p: &mut [T], s: usize) => softmax_rows
}

#[inline(always)]
fn softmax_rows<T: Kernel>(p: &mut [T], s: usize) {
    for row in p.chunks_mut(s) {
        // A plain comparison (not `max`, whose NaN rule costs a compare and a blend per vector).
        let max = lanes(row, T::neg_infinity(), |m, v| if v > m { v } else { m });
        let inv = T::one() / T::exp_shifted_sum(row, max);
        row.iter_mut().for_each(|x| *x = *x * inv);
    }
}

dispatch_wide! {
    /// The softmax's backward pass in place of `dp` (`T × S`) given the weights `p`:
    /// `ds = p ⊙ (dp − Σ g ⊙ o) · scale`, the sum over each row of the output `o` and its
    /// gradient `g` (`T × dh`).
    fn softmax_grad<T: Kernel>(dp: &mut [T], p: &[T], go: (&[T], &[T]), dh: usize, scale: T)
        => softmax_grad_rows
}

#[inline(always)]
fn softmax_grad_rows<T: Kernel>(dp: &mut [T], p: &[T], (g, o): (&[T], &[T]), dh: usize, scale: T) {
    let s = p.len() / (g.len() / dh);
    let rows = dp.chunks_mut(s).zip(p.chunks(s));
    for ((dpr, pr), (gr, or)) in rows.zip(g.chunks(dh).zip(o.chunks(dh))) {
        let d = gr.iter().zip(or).fold(T::zero(), |a, (&g, &o)| a + g * o);
        for (x, &p) in dpr.iter_mut().zip(pr) {
            *x = p * (*x - d) * scale;
        }
    }
}

/// Defines `fn $name<T: Kernel>(args)`, which calls `$body(args)` (an `#[inline(always)]`
/// function) compiled for AVX-512 where the CPU has it, else for the build's baseline (SSE2).
/// Both give the same bits: the same IEEE operations in the same order (Rust never fuses a
/// multiply and an add on its own). Inlined, `$body` and what it calls are compiled into the
/// AVX-512 function with its features.
macro_rules! dispatch_wide {
    ($(#[$m:meta])* fn $name:ident<T: Kernel>($($arg:ident: $ty:ty),* $(,)?) => $body:ident) => {
        $(#[$m])*
        fn $name<T: Kernel>($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx512f") {
                #[target_feature(enable = "avx512f")]
                fn avx512<T: Kernel>($($arg: $ty),*) {
                    $body($($arg),*)
                }
                // SAFETY: the CPU has AVX-512F, checked just above.
                #[allow(unsafe_code)]
                return unsafe { avx512($($arg),*) };
            }
            $body($($arg),*)
        }
    };
}
pub(crate) use dispatch_wide;

/// Partial results of [`lanes`]: one AVX-512 vector of f32.
const LANES: usize = 16;

/// The reduction `f` of `xs` over [`LANES`] interleaved partial results, then those in order: a
/// fixed order (so the same bits on every run) that the compiler can keep in vector registers.
#[inline(always)]
fn lanes<T: Float>(xs: &[T], init: T, f: impl Fn(T, T) -> T) -> T {
    let mut acc = [init; LANES];
    let chunks = xs.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a = f(*a, x);
        }
    }
    let mut total = acc.iter().fold(init, |a, &x| f(a, x));
    for &x in tail {
        total = f(total, x);
    }
    total
}

/// The element types of the kernels: f32 (training) and f64 (the finite-difference tests).
pub(crate) trait Kernel: Float + Send + Sync + 'static {
    /// `x ← exp(x − shift)` for every `x` of `xs` (all of them ≤ `shift`), and their sum in
    /// the order of [`lanes`].
    fn exp_shifted_sum(xs: &mut [Self], shift: Self) -> Self;

    /// `exp(x)`: [`exp_f32`] for f32, the exact `exp` for f64.
    fn exp_fast(x: Self) -> Self;
}

impl Kernel for f64 {
    #[inline(always)]
    fn exp_shifted_sum(xs: &mut [f64], shift: f64) -> f64 {
        exp_sum(xs, |x| (x - shift).exp())
    }

    #[inline(always)]
    fn exp_fast(x: f64) -> f64 {
        x.exp()
    }
}

impl Kernel for f32 {
    #[inline(always)]
    fn exp_shifted_sum(xs: &mut [f32], shift: f32) -> f32 {
        exp_sum(xs, |x| exp_f32(x - shift))
    }

    #[inline(always)]
    fn exp_fast(x: f32) -> f32 {
        exp_f32(x)
    }
}

/// `x ← exp(x)` over `xs` and the sum of the results, in one pass, summed as [`lanes`] sums.
#[inline(always)]
fn exp_sum<T: Float>(xs: &mut [T], exp: impl Fn(T) -> T) -> T {
    let mut acc = [T::zero(); LANES];
    let mut chunks = xs.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for (a, x) in acc.iter_mut().zip(c) {
            *x = exp(*x);
            *a = *a + *x;
        }
    }
    let mut total = acc.iter().fold(T::zero(), |a, &x| a + x);
    for x in chunks.into_remainder() {
        *x = exp(*x);
        total = total + *x;
    }
    total
}

/// `exp(x)` for f32 in a form the compiler vectorizes (libm's `expf` is a call per element, a
/// tenth of the training step): `2^k · e^r` with `k = round(x / ln 2)`, `|r| ≤ ln 2 / 2`, and
/// Cephes' polynomial for `e^r` (within a few ulp of `exp`). Arguments below −87.3 give 2⁻¹²⁶
/// (≈ 1e-38) instead of a subnormal or zero.
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.3, 88.7);
    // Rounds to the nearest integer (ties to even) by adding 1.5 · 2²³, whose low mantissa bits
    // then hold `k` as an integer: all in vector instructions on the SSE2 baseline, where
    // `round_ties_even` is a libm call and a float-to-int cast is done one element at a time.
    const ROUND: f32 = 12_582_912.0;
    let shifted = x * std::f32::consts::LOG2_E + ROUND;
    let k = shifted - ROUND;
    let r = x - k * LN2_HI - k * LN2_LO;
    // Plain products and sums: `mul_add` is a libm call on a CPU baseline without FMA.
    let p = 1.987_569_1e-4_f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    // 2^k: the biased exponent `k + 127` in the exponent field (`k` is within −126..=128 here).
    let two_k = (shifted
        .to_bits()
        .wrapping_sub(ROUND.to_bits())
        .wrapping_add(127))
        << 23;
    e * f32::from_bits(two_k)
}

struct Attention {
    scale: f64,
}

fn attention_fwd<T: Kernel>(
    (q, qh): (&[T], Heads),
    (k, kh): (&[T], Heads),
    (v, vh): (&[T], Heads),
    scale: T,
) -> Vec<T> {
    let (t, s, dh) = (qh.rows, kh.rows, qh.dh);
    let items = qh.batch * qh.heads;
    filled(items * t * dh, |out| {
        out.par_chunks_mut(t * dh).enumerate().for_each_init(
            || vec![T::zero(); t * s],
            |p, (i, o)| {
                let qm = mat(qh.item(q, i), qh.row_stride, 1);
                let km = mat(kh.item(k, i), kh.row_stride, 1);
                weights(p, qm, km, (t, s, dh), scale);
                product(
                    (t, dh, s),
                    o,
                    dh,
                    mat(p, s, 1),
                    mat(vh.item(v, i), vh.row_stride, 1),
                    T::one(),
                    ONE_THREAD,
                );
            },
        )
    })
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "fused-attention"
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
        let qh = Heads::of(op, "queries", l1)?;
        let kh = Heads::of(op, "keys", l2)?;
        let vh = Heads::of(op, "values", l3)?;
        kh.check_against(op, &qh, "keys", false)?;
        vh.check_against(op, &kh, "values", true)?;
        let out = by_dtype!(op, s1, |T| {
            <T as WithDType>::to_cpu_storage_owned(attention_fwd(
                (s1.as_slice::<T>()?, qh),
                (s2.as_slice::<T>()?, kh),
                (s3.as_slice::<T>()?, vh),
                self.scale as T,
            ))
        });
        Ok((out, Shape::from((qh.batch, qh.heads, qh.rows, qh.dh))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let op = AttentionBwd {
            q: q.clone(),
            k: k.clone(),
            v: v.clone(),
            scale: self.scale,
        };
        let grads = o.apply_op2_no_bwd(&g.contiguous()?, &op)?;
        let (nq, nk) = (q.elem_count(), k.elem_count());
        let part = |start: usize, like: &Tensor| {
            grads
                .narrow(0, start, like.elem_count())?
                .reshape(like.shape())
        };
        Ok((
            Some(part(0, q)?),
            Some(part(nq, k)?),
            Some(part(nq + nk, v)?),
        ))
    }
}

/// The gradients of [`Attention`] for its output `o` and the output's gradient `g` (both
/// contiguous `[B, H, T, dh]`): `dq`, `dk`, `dv` one after the other in one buffer.
struct AttentionBwd {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: f64,
}

#[allow(clippy::too_many_arguments)]
fn attention_bwd<T: Kernel>(
    (q, qh): (&[T], Heads),
    (k, kh): (&[T], Heads),
    (v, vh): (&[T], Heads),
    o: &[T],
    g: &[T],
    scale: T,
) -> Vec<T> {
    let (t, s, dh) = (qh.rows, kh.rows, qh.dh);
    let items = qh.batch * qh.heads;
    filled(items * (t + 2 * s) * dh, |out| {
        let (dq, rest) = out.split_at_mut(items * t * dh);
        let (dk, dv) = rest.split_at_mut(items * s * dh);
        dq.par_chunks_mut(t * dh)
            .zip(dk.par_chunks_mut(s * dh).zip(dv.par_chunks_mut(s * dh)))
            .enumerate()
            .for_each_init(
                || (vec![T::zero(); t * s], vec![T::zero(); t * s]),
                |(p, dp), (i, (dq, (dk, dv)))| {
                    let qm = mat(qh.item(q, i), qh.row_stride, 1);
                    let km = mat(kh.item(k, i), kh.row_stride, 1);
                    let vi = vh.item(v, i);
                    let (oi, gi) = (
                        &o[i * t * dh..(i + 1) * t * dh],
                        &g[i * t * dh..(i + 1) * t * dh],
                    );
                    weights(p, qm, km, (t, s, dh), scale);
                    // dv = pᵀ g
                    product(
                        (s, dh, t),
                        dv,
                        dh,
                        mat(p, 1, s),
                        mat(gi, dh, 1),
                        T::one(),
                        ONE_THREAD,
                    );
                    // dp = g vᵀ, then the softmax's backward in place: ds = p ⊙ (dp − Σ g ⊙ o) · scale
                    product(
                        (t, s, dh),
                        as_uninit(dp),
                        s,
                        mat(gi, dh, 1),
                        mat(vi, 1, vh.row_stride),
                        T::one(),
                        ONE_THREAD,
                    );
                    softmax_grad(dp, p, (gi, oi), dh, scale);
                    // dq = ds k, dk = dsᵀ q
                    product((t, dh, s), dq, dh, mat(dp, s, 1), km, T::one(), ONE_THREAD);
                    product((s, dh, t), dk, dh, mat(dp, 1, s), qm, T::one(), ONE_THREAD);
                },
            )
    })
}

/// The CPU data of an operand held by the op (not passed to `cpu_fwd`).
fn cpu_data<R>(
    op: &str,
    t: &Tensor,
    f: impl FnOnce(&CpuStorage, &Layout) -> Result<R>,
) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(s) => f(s, layout),
        _ => candle_core::bail!("{op}: operands on the CPU only"),
    }
}

impl CustomOp2 for AttentionBwd {
    fn name(&self) -> &'static str {
        "fused-attention-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let op = self.name();
        let (Some((o0, o1)), Some((g0, g1))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            candle_core::bail!("{op}: output and its gradient must be contiguous");
        };
        cpu_data(op, &self.q, |sq, lq| {
            cpu_data(op, &self.k, |sk, lk| {
                cpu_data(op, &self.v, |sv, lv| {
                    let qh = Heads::of(op, "queries", lq)?;
                    let kh = Heads::of(op, "keys", lk)?;
                    let vh = Heads::of(op, "values", lv)?;
                    let n = qh.batch * qh.heads * qh.rows * qh.dh;
                    if o1 - o0 != n || g1 - g0 != n {
                        candle_core::bail!("{op}: output or gradient not of the queries' shape");
                    }
                    let out = by_dtype!(op, sq, |T| {
                        <T as WithDType>::to_cpu_storage_owned(attention_bwd(
                            (sq.as_slice::<T>()?, qh),
                            (sk.as_slice::<T>()?, kh),
                            (sv.as_slice::<T>()?, vh),
                            &s1.as_slice::<T>()?[o0..o1],
                            &s2.as_slice::<T>()?[g0..g1],
                            self.scale as T,
                        ))
                    });
                    let len = n + 2 * kh.batch * kh.heads * kh.rows * kh.dh;
                    Ok((out, Shape::from(len)))
                })
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values in about [-8, 8], deterministic.
    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n as u32)
            .map(|i| ((i.wrapping_mul(2_654_435_761) ^ seed) % 10_000) as f32 / 625.0 - 8.0)
            .collect()
    }

    #[test]
    fn the_avx512_and_baseline_builds_give_the_same_bits() {
        let (t, s, dh) = (7, 37, 5);
        let scores = values(t * s, 1);
        let (mut wide, mut base) = (scores.clone(), scores);
        softmax(&mut wide, s);
        softmax_rows(&mut base, s);
        assert!(
            wide.iter()
                .zip(&base)
                .all(|(a, b)| a.to_bits() == b.to_bits())
        );
        let (g, o) = (values(t * dh, 2), values(t * dh, 3));
        let dp = values(t * s, 4);
        let (mut wide_dp, mut base_dp) = (dp.clone(), dp);
        softmax_grad(&mut wide_dp, &wide, (&g, &o), dh, 0.3);
        softmax_grad_rows(&mut base_dp, &base, (&g, &o), dh, 0.3);
        assert!(
            wide_dp
                .iter()
                .zip(&base_dp)
                .all(|(a, b)| a.to_bits() == b.to_bits())
        );
        assert_ne!(wide_dp, values(t * s, 4), "the gradient was computed");
    }
}
