//! Each fused kernel against its primitive-op reference (values and gradients, f32 and f64) and
//! against central finite differences in f64; results independent of the thread count.

use candle_core::{DType, Device, Tensor, Var};

use super::*;

/// Deterministic values in about [-2, 2] of shape `dims`.
fn values(dims: &[usize], seed: u64, dtype: DType) -> Tensor {
    let n: usize = dims.iter().product();
    let v: Vec<f64> = (0..n as u64)
        .map(|i| {
            let h = (i + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ seed.wrapping_mul(0xBF58_476D);
            ((h >> 11) as f64 / (1u64 << 53) as f64) * 4.0 - 2.0
        })
        .collect();
    Tensor::from_vec(v, dims, &Device::Cpu)
        .and_then(|t| t.to_dtype(dtype))
        .unwrap()
}

fn flat(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn assert_close(a: &Tensor, b: &Tensor, tol: f64, what: &str) {
    assert_eq!(a.dims(), b.dims(), "{what}: shapes");
    for (i, (x, y)) in flat(a).iter().zip(flat(b)).enumerate() {
        assert!(
            (x - y).abs() <= tol * (1.0 + y.abs()),
            "{what}, element {i}: {x} vs {y}"
        );
    }
}

type Op = fn(&[Tensor]) -> candle_core::Result<Tensor>;

/// Values and gradients (of Σ w ⊙ op(inputs)) of the fused `fused` and the reference `reference`
/// on the same inputs agree.
fn check_against_reference(fused: Op, reference: Op, inputs: &[Tensor], dtype: DType, tol: f64) {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(&t.to_dtype(dtype).unwrap()).unwrap())
        .collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let (yf, yr) = (fused(&ts).unwrap(), reference(&ts).unwrap());
    assert_close(&yf, &yr, tol, "values");
    let w = values(yf.dims(), 99, dtype);
    let gf = (&yf * &w).unwrap().sum_all().unwrap().backward().unwrap();
    let gr = (&yr * &w).unwrap().sum_all().unwrap().backward().unwrap();
    for (i, v) in vars.iter().enumerate() {
        let (a, b) = (
            gf.get(v).expect("fused gradient"),
            gr.get(v).expect("reference gradient"),
        );
        assert_close(a, b, tol, &format!("gradient of input {i}"));
    }
}

/// The fused op's gradients match central differences of its own values, in f64.
fn check_finite_differences(fused: Op, inputs: &[Tensor]) {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(&t.to_dtype(DType::F64).unwrap()).unwrap())
        .collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = fused(&ts).unwrap();
    let w = values(y.dims(), 7, DType::F64);
    let loss = |ts: &[Tensor]| -> f64 {
        (fused(ts).unwrap() * &w)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar()
            .unwrap()
    };
    let grads = (&y * &w).unwrap().sum_all().unwrap().backward().unwrap();
    let h = 1e-6;
    for (i, v) in vars.iter().enumerate() {
        let g = flat(grads.get(v).expect("a gradient"));
        let x0 = flat(v.as_tensor());
        // Every element of small inputs, a spread of them otherwise.
        let step = (x0.len() / 40).max(1);
        for k in (0..x0.len()).step_by(step) {
            let at = |d: f64| {
                let mut x = x0.clone();
                x[k] += d;
                let mut moved = ts.to_vec();
                moved[i] = Tensor::from_vec(x, v.dims(), &Device::Cpu).unwrap();
                loss(&moved)
            };
            let fd = (at(h) - at(-h)) / (2.0 * h);
            assert!(
                (fd - g[k]).abs() <= 1e-6 * (1.0 + fd.abs()),
                "input {i} element {k}: analytic {} vs finite difference {fd}",
                g[k]
            );
        }
    }
}

const SCALE: f64 = 0.35;

fn softmax_fused(t: &[Tensor]) -> candle_core::Result<Tensor> {
    softmax_scaled(&t[0], SCALE)
}
fn softmax_reference(t: &[Tensor]) -> candle_core::Result<Tensor> {
    ops::softmax_last_dim(&t[0].affine(SCALE, 0.0)?)
}
fn layer_norm_fused(t: &[Tensor]) -> candle_core::Result<Tensor> {
    layer_norm(&t[0], &t[1], &t[2], 1e-5)
}
fn layer_norm_reference(t: &[Tensor]) -> candle_core::Result<Tensor> {
    ops::layer_norm(&t[0], &t[1], &t[2], 1e-5)
}
fn gelu_fused(t: &[Tensor]) -> candle_core::Result<Tensor> {
    gelu(&t[0])
}
fn gelu_reference(t: &[Tensor]) -> candle_core::Result<Tensor> {
    ops::gelu(&t[0])
}

fn bias_gelu_fused(t: &[Tensor]) -> candle_core::Result<Tensor> {
    bias_gelu(&t[0], &t[1])
}
fn bias_gelu_reference(t: &[Tensor]) -> candle_core::Result<Tensor> {
    ops::gelu(&t[0].broadcast_add(&t[1])?)
}
/// Queries `t[0]` over keys `t[1]` and values `t[2]`; or, given two inputs, over the keys and
/// values held by `t[1]`: 5 heads of which heads 1..4 are used, as the encoder slices its heads.
fn attention_fused(t: &[Tensor]) -> candle_core::Result<Tensor> {
    let (k, v) = attention_keys_values(t)?;
    crate::fused_attention::attention(&t[0], &k, &v)
}
fn attention_reference(t: &[Tensor]) -> candle_core::Result<Tensor> {
    let (k, v) = attention_keys_values(t)?;
    Ok(crate::attention::scaled_dot_product(&t[0], &k, &v)?.0)
}
fn attention_keys_values(t: &[Tensor]) -> candle_core::Result<(Tensor, Tensor)> {
    match t.get(2) {
        Some(v) => Ok((t[1].clone(), v.clone())),
        None => {
            let heads = t[1].narrow(1, 1, 3)?;
            Ok((heads.narrow(3, 0, 4)?, heads.narrow(3, 4, 4)?))
        }
    }
}

fn matmul_t_fused(t: &[Tensor]) -> candle_core::Result<Tensor> {
    crate::fused_linear::matmul_t(&t[0], &t[1])
}
fn matmul_t_reference(t: &[Tensor]) -> candle_core::Result<Tensor> {
    ops::matmul_t_reference(&t[0], &t[1])
}

fn residual_bias_fused(t: &[Tensor]) -> candle_core::Result<Tensor> {
    residual_bias(&t[0], &t[1], &t[2])
}
fn residual_bias_reference(t: &[Tensor]) -> candle_core::Result<Tensor> {
    &t[0] + t[1].broadcast_add(&t[2])?
}

/// Rows over several of the kernels' row blocks, one of them partial.
const DIMS: [usize; 3] = [3, 13, 37];

#[test]
fn softmax_matches_its_reference_and_finite_differences() {
    let x = [values(&DIMS, 1, DType::F64).affine(4.0, 0.0).unwrap()];
    check_against_reference(softmax_fused, softmax_reference, &x, DType::F64, 1e-12);
    check_against_reference(softmax_fused, softmax_reference, &x, DType::F32, 1e-5);
    check_finite_differences(softmax_fused, &[values(&[2, 3, 9], 2, DType::F64)]);
    // Rows sum to one; large scores do not overflow.
    let big = (values(&[4, 50], 3, DType::F32) * 200.0).unwrap();
    let y = softmax_scaled(&big, 1.0).unwrap();
    for s in flat(&y.sum(1).unwrap()) {
        assert!((s - 1.0).abs() < 1e-5, "{s}");
    }
}

#[test]
fn layer_norm_matches_its_reference_and_finite_differences() {
    let inputs = |dims: &[usize]| {
        let n = *dims.last().unwrap();
        [
            values(dims, 4, DType::F64),
            values(&[n], 5, DType::F64),
            values(&[n], 6, DType::F64),
        ]
    };
    let x = inputs(&DIMS);
    check_against_reference(
        layer_norm_fused,
        layer_norm_reference,
        &x,
        DType::F64,
        1e-12,
    );
    check_against_reference(layer_norm_fused, layer_norm_reference, &x, DType::F32, 1e-4);
    check_finite_differences(layer_norm_fused, &inputs(&[2, 21, 6]));
}

#[test]
fn gelu_matches_its_reference_and_finite_differences() {
    let x = [values(&DIMS, 8, DType::F64).affine(2.0, 0.0).unwrap()];
    check_against_reference(gelu_fused, gelu_reference, &x, DType::F64, 1e-12);
    check_against_reference(gelu_fused, gelu_reference, &x, DType::F32, 1e-5);
    check_finite_differences(gelu_fused, &[values(&[5, 11], 9, DType::F64)]);
}

#[test]
fn bias_gelu_matches_its_reference_and_finite_differences() {
    let inputs = |dims: &[usize]| {
        let n = *dims.last().unwrap();
        [values(dims, 15, DType::F64), values(&[n], 16, DType::F64)]
    };
    let x = inputs(&DIMS);
    check_against_reference(bias_gelu_fused, bias_gelu_reference, &x, DType::F64, 1e-12);
    check_against_reference(bias_gelu_fused, bias_gelu_reference, &x, DType::F32, 1e-4);
    check_finite_differences(bias_gelu_fused, &inputs(&[2, 19, 5]));
}

#[test]
fn residual_bias_matches_its_reference_and_finite_differences() {
    let inputs = |dims: &[usize]| {
        let n = *dims.last().unwrap();
        [
            values(dims, 17, DType::F64),
            values(dims, 18, DType::F64),
            values(&[n], 19, DType::F64),
        ]
    };
    let x = inputs(&DIMS);
    check_against_reference(
        residual_bias_fused,
        residual_bias_reference,
        &x,
        DType::F64,
        1e-12,
    );
    check_against_reference(
        residual_bias_fused,
        residual_bias_reference,
        &x,
        DType::F32,
        1e-5,
    );
    check_finite_differences(residual_bias_fused, &inputs(&[2, 19, 5]));
    let wrong = residual_bias(&x[0], &x[1], &values(&[4], 1, DType::F64)).unwrap_err();
    assert!(wrong.to_string().contains("bias"), "{wrong}");
}

#[test]
fn attention_matches_its_reference_and_finite_differences() {
    let inputs = |s: usize| {
        [
            values(&[2, 3, 5, 4], 20, DType::F64)
                .affine(1.5, 0.0)
                .unwrap(),
            values(&[2, 3, s, 4], 21, DType::F64)
                .affine(1.5, 0.0)
                .unwrap(),
            values(&[2, 3, s, 4], 22, DType::F64),
        ]
    };
    let x = inputs(7);
    check_against_reference(attention_fused, attention_reference, &x, DType::F64, 1e-12);
    check_against_reference(attention_fused, attention_reference, &x, DType::F32, 1e-5);
    check_finite_differences(attention_fused, &inputs(6));
    // Keys and values read in place from head and column slices of a wider tensor.
    let strided = [x[0].clone(), values(&[2, 5, 7, 8], 23, DType::F64)];
    assert!(!attention_keys_values(&strided).unwrap().0.is_contiguous());
    check_against_reference(
        attention_fused,
        attention_reference,
        &strided,
        DType::F64,
        1e-12,
    );
    check_against_reference(
        attention_fused,
        attention_reference,
        &strided,
        DType::F32,
        1e-5,
    );
    // Shapes that do not fit name the operand.
    let wrong = crate::fused_attention::attention(&x[0], &x[1], &inputs(6)[2]).unwrap_err();
    assert!(wrong.to_string().contains("values"), "{wrong}");
}

#[test]
fn matmul_t_matches_its_reference_and_finite_differences() {
    let inputs = |dims: &[usize], n: usize| {
        let k = *dims.last().unwrap();
        [
            values(dims, 24, DType::F64),
            values(&[n, k], 25, DType::F64),
        ]
    };
    let x = inputs(&DIMS, 11);
    check_against_reference(matmul_t_fused, matmul_t_reference, &x, DType::F64, 1e-12);
    check_against_reference(matmul_t_fused, matmul_t_reference, &x, DType::F32, 1e-5);
    check_finite_differences(matmul_t_fused, &inputs(&[2, 3, 5], 4));
    // A transposed (strided) input, made contiguous first.
    let t = [values(&[37, 13], 26, DType::F64).t().unwrap(), x[1].clone()];
    check_against_reference(matmul_t_fused, matmul_t_reference, &t, DType::F64, 1e-12);
    let wrong = crate::fused_linear::matmul_t(&x[0], &values(&[11, 5], 1, DType::F64)).unwrap_err();
    assert!(wrong.to_string().contains("weight"), "{wrong}");
}

#[test]
fn a_strided_input_is_made_contiguous_first() {
    let x = values(&[6, 10], 10, DType::F32);
    let t = x.t().unwrap();
    assert_close(&gelu(&t).unwrap(), &ops::gelu(&t).unwrap(), 1e-6, "gelu");
    assert_close(
        &softmax_scaled(&t, 1.0).unwrap(),
        &ops::softmax_last_dim(&t).unwrap(),
        1e-6,
        "softmax",
    );
}

#[test]
fn results_do_not_depend_on_the_number_of_threads() {
    let x = Var::from_tensor(&values(&[40, 48], 11, DType::F32)).unwrap();
    let gamma = Var::from_tensor(&values(&[48], 12, DType::F32)).unwrap();
    let beta = Var::from_tensor(&values(&[48], 13, DType::F32)).unwrap();
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let y = layer_norm(x.as_tensor(), gamma.as_tensor(), beta.as_tensor(), 1e-5).unwrap();
            let y = softmax_scaled(&gelu(&y).unwrap(), 0.5).unwrap();
            let y = bias_gelu(&y, beta.as_tensor()).unwrap();
            let y = residual_bias(&y, x.as_tensor(), gamma.as_tensor()).unwrap();
            let heads = y.reshape((2, 4, 5, 48)).unwrap();
            let y = crate::fused_attention::attention(&heads, &heads, &heads)
                .unwrap()
                .reshape((40, 48))
                .unwrap();
            let w = values(y.dims(), 14, DType::F32);
            let g = (&y * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let mut out = flat(&y);
            for v in [&x, &gamma, &beta] {
                out.extend(flat(g.get(v).unwrap()));
            }
            out
        })
    };
    let one = run(1);
    for threads in [2, 3, 5] {
        assert!(
            one.iter()
                .zip(run(threads))
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{threads} threads differ from one"
        );
    }
}

#[test]
fn the_vectorized_exp_is_within_a_few_ulp_of_libm() {
    let mut worst = 0.0f64;
    for i in 0..=200_000 {
        let x = -87.0 + 175.0 * i as f32 / 200_000.0;
        let (fast, exact) = (crate::fused_attention::exp_f32(x), (x as f64).exp());
        worst = worst.max((fast as f64 - exact).abs() / exact);
    }
    assert!(worst < 4.0 * f32::EPSILON as f64, "relative error {worst}");
    assert_eq!(crate::fused_attention::exp_f32(0.0), 1.0);
    assert!(crate::fused_attention::exp_f32(-1000.0) < 1e-37);
}

#[test]
fn gelu_gives_the_same_bits_in_its_avx512_and_baseline_builds() {
    let x: Vec<f32> = flat(&values(&[3, 40], 27, DType::F32))
        .iter()
        .map(|&v| v as f32 * 3.0)
        .collect();
    let g: Vec<f32> = flat(&values(&[3, 40], 28, DType::F32))
        .iter()
        .map(|&v| v as f32)
        .collect();
    let bias: Vec<f32> = (0..40).map(|i| i as f32 / 20.0 - 1.0).collect();
    let consts = (0.797_884_6, 0.044715, 0.5);
    for b in [&bias[..], &[]] {
        let (mut wide, mut base) = (vec![0f32; x.len()], vec![0f32; x.len()]);
        gelu_block(&mut wide, &x, b, consts);
        gelu_rows(&mut base, &x, b, consts);
        assert!(
            wide.iter()
                .zip(&base)
                .all(|(a, b)| a.to_bits() == b.to_bits())
        );
        gelu_grad_block(&mut wide, &x, &g, b, consts);
        gelu_grad_rows(&mut base, &x, &g, b, consts);
        assert!(
            wide.iter()
                .zip(&base)
                .all(|(a, b)| a.to_bits() == b.to_bits())
        );
    }
}
