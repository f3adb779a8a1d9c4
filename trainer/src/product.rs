//! Matrix products written into uninitialised outputs, for the fused kernels.
//!
//! candle's matmul allocates a zeroed output for every product (a serial `memset` and, for a
//! fresh allocation, page faults) that the GEMM then overwrites. The fused kernels call the same
//! GEMM (`gemm`, which candle uses) directly: on strided operands where they lie, into output
//! buffers that are written once.

use std::mem::MaybeUninit;

use gemm::Parallelism;
use num_traits::Float;

/// A matrix operand of [`product`]: its data from the first element, and its row and column
/// strides.
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a, T> {
    pub data: &'a [T],
    pub rs: usize,
    pub cs: usize,
}

pub(crate) fn mat<T>(data: &[T], rs: usize, cs: usize) -> Mat<'_, T> {
    Mat { data, rs, cs }
}

/// The number of elements from the first to the last of a `rows × cols` matrix with strides.
fn extent(rows: usize, cols: usize, rs: usize, cs: usize) -> usize {
    (rows - 1) * rs + (cols - 1) * cs + 1
}

/// `dst = beta · lhs · rhs` for `lhs` `m × k` and `rhs` `k × n` into `dst` `m × n` (row stride
/// `dst_rs`, columns contiguous), every element of `dst` written and none read.
pub(crate) fn product<T: Float + 'static>(
    (m, n, k): (usize, usize, usize),
    dst: &mut [MaybeUninit<T>],
    dst_rs: usize,
    lhs: Mat<'_, T>,
    rhs: Mat<'_, T>,
    beta: T,
    parallelism: Parallelism,
) {
    assert!(m > 0 && n > 0 && k > 0, "empty product {m}×{k}·{k}×{n}");
    assert!(
        dst.len() >= extent(m, n, dst_rs, 1),
        "product: destination too short"
    );
    assert!(
        lhs.data.len() >= extent(m, k, lhs.rs, lhs.cs),
        "product: lhs too short"
    );
    assert!(
        rhs.data.len() >= extent(k, n, rhs.rs, rhs.cs),
        "product: rhs too short"
    );
    // SAFETY: the asserts above keep every element gemm touches inside the three slices (it
    // reads `lhs` and `rhs` at `i·rs + j·cs` within the given shapes and writes `dst` likewise);
    // `dst` is borrowed mutably and the operands shared, so they do not overlap; with
    // `read_dst = false` gemm writes `beta · lhs · rhs` to every element of `dst` without reading
    // it, so uninitialised memory is never read.
    #[allow(unsafe_code)]
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr().cast::<T>(),
            1,
            dst_rs as isize,
            false,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            T::zero(),
            beta,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// The same view of initialised data: `product` writes every element, so `T`s may be written
/// where `MaybeUninit<T>`s are expected.
pub(crate) fn as_uninit<T>(s: &mut [T]) -> &mut [MaybeUninit<T>] {
    // SAFETY: `MaybeUninit<T>` has the layout of `T`, and every write through the returned slice
    // (`product` only) stores an initialised `T`, so `s` stays initialised.
    #[allow(unsafe_code)]
    unsafe {
        std::slice::from_raw_parts_mut(s.as_mut_ptr().cast(), s.len())
    }
}

/// A vector of `n` elements, each written by `fill` (which must write all of them).
pub(crate) fn filled<T>(n: usize, fill: impl FnOnce(&mut [MaybeUninit<T>])) -> Vec<T> {
    let mut out = Vec::with_capacity(n);
    fill(&mut out.spare_capacity_mut()[..n]);
    // SAFETY: `fill` wrote every one of the first `n` elements (each caller hands every element
    // to `product`, which writes all of its destination).
    #[allow(unsafe_code)]
    unsafe {
        out.set_len(n);
    }
    out
}
