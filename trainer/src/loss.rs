//! Losses on the masked tokens, all differentiable.
//!
//! Predictions come as `[B, T, E, V]` (E ensemble members; 1 without an ensemble), targets as
//! the loader sends them: `[M, V]`, the masked tokens of all samples in order, each sample's in
//! its `masked_indices` order. [`gather_masked`] brings predictions into that layout,
//! `[M, E, V]`, and the losses compare there.

use candle_core::{D, Tensor};

use crate::error::{Result, input_err};

/// The predictions of the masked tokens, `[M, E, V]`, from `pred` `[B, T, E, V]` and per sample
/// the indices of its masked tokens.
pub fn gather_masked(pred: &Tensor, masked_indices: &[Vec<u32>]) -> Result<Tensor> {
    let (b, t, e, v) = pred.dims4()?;
    if masked_indices.len() != b {
        return Err(input_err(
            "masked_indices",
            format!(
                "{} samples of indices for a batch of {b}",
                masked_indices.len()
            ),
        ));
    }
    let mut rows = Vec::with_capacity(masked_indices.iter().map(Vec::len).sum());
    for (i, sample) in masked_indices.iter().enumerate() {
        for &k in sample {
            if k as usize >= t {
                return Err(input_err(
                    format!("masked_indices[{i}]"),
                    format!("index {k} is outside 0..{t}"),
                ));
            }
            rows.push((i * t) as u32 + k);
        }
    }
    let m = rows.len();
    let rows = Tensor::from_vec(rows, m, pred.device())?;
    Ok(pred.reshape((b * t, e, v))?.index_select(&rows, 0)?)
}

fn check_target(members: &Tensor, target: &Tensor) -> Result<(usize, usize, usize)> {
    let (m, e, v) = members.dims3()?;
    if target.dims() != [m, v] {
        return Err(input_err(
            "target",
            format!("expected shape [{m}, {v}], got {:?}", target.dims()),
        ));
    }
    Ok((m, e, v))
}

/// A zero that still belongs to the graph of `x`, for batches without masked tokens: the
/// training step can run unchanged (all gradients zero) instead of dividing by zero.
fn graph_zero(x: &Tensor) -> Result<Tensor> {
    Ok(x.sum_all()?.affine(0.0, 0.0)?)
}

/// Mean squared error between `pred` and `target` of the same shape.
pub fn mse(pred: &Tensor, target: &Tensor) -> Result<Tensor> {
    if pred.dims() != target.dims() {
        return Err(input_err(
            "target",
            format!("shape {:?} vs prediction {:?}", target.dims(), pred.dims()),
        ));
    }
    if pred.elem_count() == 0 {
        return graph_zero(pred);
    }
    Ok((pred - target)?.sqr()?.mean_all()?)
}

/// MSE of the ensemble mean: `members` `[M, E, V]`, `target` `[M, V]`. With `E = 1` this is
/// the plain MSE.
pub fn ensemble_mse(members: &Tensor, target: &Tensor) -> Result<Tensor> {
    check_target(members, target)?;
    mse(&members.mean(1)?, target)
}

/// CRPS, energy form, averaged over tokens and values: for members `x_1 … x_E` and truth `y`,
/// `(1/E) Σ_i |x_i − y| − 1/(2E²) Σ_i Σ_j |x_i − x_j|` (the ensemble's empirical distribution;
/// not the "fair" `E(E−1)` variant, so that `E = 1` is defined and equals the MAE).
pub fn crps(members: &Tensor, target: &Tensor) -> Result<Tensor> {
    let (m, e, v) = check_target(members, target)?;
    if m * v == 0 {
        return graph_zero(members);
    }
    let skill = members
        .broadcast_sub(&target.unsqueeze(1)?)?
        .abs()?
        .mean_all()?;
    if e == 1 {
        return Ok(skill);
    }
    // [M, E, 1, V] − [M, 1, E, V] → every pair.
    let spread = members
        .unsqueeze(2)?
        .broadcast_sub(&members.unsqueeze(1)?)?
        .abs()?
        .sum(D::Minus1)?
        .sum_all()?
        .affine(1.0 / (2.0 * (e * e * m * v) as f64), 0.0)?;
    Ok((skill - spread)?)
}

/// MSE (of the ensemble mean) on the masked tokens: `pred` `[B, T, E, V]`, `target` `[M, V]`.
pub fn masked_mse(pred: &Tensor, target: &Tensor, masked_indices: &[Vec<u32>]) -> Result<Tensor> {
    ensemble_mse(&gather_masked(pred, masked_indices)?, target)
}

/// CRPS on the masked tokens: `pred` `[B, T, E, V]`, `target` `[M, V]`.
pub fn masked_crps(pred: &Tensor, target: &Tensor, masked_indices: &[Vec<u32>]) -> Result<Tensor> {
    crps(&gather_masked(pred, masked_indices)?, target)
}

/// Per value, the RMS error of the prior it was predicted from: `kind` `[B, T, V, K]` one-hot
/// (all zero for visible values, which get 1), `prior_error` `[K]` → `[B, T, 1, V]`, to divide
/// predictions `[B, T, E, V]` by.
pub fn prior_error_per_value(kind: &Tensor, prior_error: &Tensor) -> Result<Tensor> {
    let (b, t, v, k) = kind.dims4()?;
    let error = kind
        .broadcast_mul(&prior_error.reshape((1, 1, 1, k))?)?
        .sum(D::Minus1)?;
    let visible = kind.sum(D::Minus1)?.affine(-1.0, 1.0)?;
    Ok((error + visible)?.reshape((b, t, 1, v))?)
}

/// `pred` `[B, T, E, V]` and `target` `[M, V]` divided, value by value, by `scale`
/// `[B, T, 1, V]` (see [`prior_error_per_value`]): the MSE and CRPS of the results are those of
/// the errors in units of each value's prior error.
pub fn in_units_of(
    pred: &Tensor,
    target: &Tensor,
    masked_indices: &[Vec<u32>],
    scale: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let target_scale = gather_masked(scale, masked_indices)?.squeeze(1)?;
    Ok((
        pred.broadcast_div(scale)?,
        target.broadcast_div(&target_scale)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn scalar(t: &Tensor) -> f64 {
        t.to_scalar::<f64>().unwrap()
    }

    #[test]
    fn masked_mse_by_hand() -> Result<()> {
        let dev = Device::Cpu;
        // B = 2, T = 3, E = 1, V = 2; prediction value = 10·b + 2·t + v.
        let p: Vec<f64> = (0..2)
            .flat_map(|b| {
                (0..3).flat_map(move |t| (0..2).map(move |v| (10 * b + 2 * t + v) as f64))
            })
            .collect();
        let pred = Var::from_vec(p, (2, 3, 1, 2), &dev)?;
        let masked = vec![vec![0, 2], vec![1]];
        // Masked predictions: (0,0) → [0, 1]; (0,2) → [4, 5]; (1,1) → [12, 13].
        let target = Tensor::new(&[[1.0f64, 1.0], [4.0, 3.0], [10.0, 13.0]], &dev)?;
        let loss = masked_mse(pred.as_tensor(), &target, &masked)?;
        // Errors: (-1, 0), (0, 2), (2, 0) → (1 + 0 + 0 + 4 + 4 + 0) / 6.
        assert!((scalar(&loss) - 9.0 / 6.0).abs() < 1e-12);
        // Only masked tokens get a gradient: d/dp = 2 (p − y) / 6.
        let g = loss
            .backward()?
            .get(&pred)
            .unwrap()
            .flatten_all()?
            .to_vec1::<f64>()?;
        let mut want = vec![0.0; 12];
        for (i, d) in [(0, -1.0), (1, 0.0), (4, 0.0), (5, 2.0), (8, 2.0), (9, 0.0)] {
            want[i] = 2.0 * d / 6.0;
        }
        assert_eq!(g, want);
        Ok(())
    }

    #[test]
    fn errors_in_units_of_each_values_prior_error() -> Result<()> {
        let dev = Device::Cpu;
        // B = 1, T = 2, E = 1, V = 2: token 0 masked, token 1 visible.
        let pred = Tensor::new(&[[[[1.0f64, 2.0]], [[5.0, 6.0]]]], &dev)?;
        let target = Tensor::new(&[[3.0f64, -2.0]], &dev)?;
        // Value 0 interpolated, value 1 climatology; token 1 visible.
        let kind = Tensor::new(
            &[[
                [[1.0f64, 0.0, 0.0], [0.0, 0.0, 1.0]],
                [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]],
            ]],
            &dev,
        )?;
        let error = Tensor::new(&[2.0f64, 4.0, 0.5], &dev)?;
        let scale = prior_error_per_value(&kind, &error)?;
        assert_eq!(scale.flatten_all()?.to_vec1::<f64>()?, [2.0, 0.5, 1.0, 1.0]);
        let (p, t) = in_units_of(&pred, &target, &[vec![0]], &scale)?;
        let loss = masked_mse(&p, &t, &[vec![0]])?;
        // Errors −2 (in units of 2) and 4 (in units of 0.5): (1 + 64) / 2.
        assert!((scalar(&loss) - 32.5).abs() < 1e-12, "{}", scalar(&loss));
        Ok(())
    }

    #[test]
    fn ensemble_mse_uses_the_mean() -> Result<()> {
        let dev = Device::Cpu;
        let members = Tensor::new(&[[[0.0f64, 2.0], [2.0, 6.0]]], &dev)?; // [1, 2, 2]
        let target = Tensor::new(&[[1.0f64, 1.0]], &dev)?;
        // Mean [1, 4]; errors (0, 3) → 4.5.
        assert!((scalar(&ensemble_mse(&members, &target)?) - 4.5).abs() < 1e-12);
        Ok(())
    }

    #[test]
    fn crps_single_member_is_mae_and_ensemble_by_hand() -> Result<()> {
        let dev = Device::Cpu;
        let one = Tensor::new(&[[[1.0f64, -2.0]], [[0.5, 4.0]]], &dev)?; // [2, 1, 2]
        let target = Tensor::new(&[[0.0f64, 0.0], [1.0, 1.0]], &dev)?;
        let mae = (1.0 + 2.0 + 0.5 + 3.0) / 4.0;
        assert!((scalar(&crps(&one, &target)?) - mae).abs() < 1e-12);
        // E = 2, one value: members 0 and 2, truth 1 → skill 1, spread ½·(2·2)/4 = 0.5.
        let two = Tensor::new(&[[[0.0f64], [2.0]]], &dev)?;
        let y = Tensor::new(&[[1.0f64]], &dev)?;
        assert!((scalar(&crps(&two, &y)?) - 0.5).abs() < 1e-12);
        // CRPS is differentiable with respect to the members.
        let var = Var::from_tensor(&two)?;
        let g = crps(var.as_tensor(), &y)?.backward()?;
        assert!(g.get(&var).is_some());
        Ok(())
    }

    #[test]
    fn bad_indices_and_empty_masks() -> Result<()> {
        let dev = Device::Cpu;
        let pred = Tensor::zeros((2, 3, 1, 2), candle_core::DType::F64, &dev)?;
        let t = Tensor::zeros((1, 2), candle_core::DType::F64, &dev)?;
        let err = masked_mse(&pred, &t, &[vec![3], vec![]]).unwrap_err();
        assert!(err.to_string().contains("masked_indices[0]"), "{err}");
        assert!(masked_mse(&pred, &t, &[vec![0]]).is_err());
        let none = Tensor::zeros((0, 2), candle_core::DType::F64, &dev)?;
        assert_eq!(scalar(&masked_mse(&pred, &none, &[vec![], vec![]])?), 0.0);
        assert_eq!(scalar(&masked_crps(&pred, &none, &[vec![], vec![]])?), 0.0);
        Ok(())
    }
}
