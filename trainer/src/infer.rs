//! Global inference: tokens of a tile predicted by the model from the tokens around it.
//!
//! [`Hidden`] says which: with [`Hidden::Checkerboard`] a tile's tokens are split into `passes`
//! interleaved groups by the parity of `level + t + lat + lon` (with two passes, a checkerboard
//! in all four token axes): in pass `j` group `j` is replaced by the mask value and predicted,
//! so each token is predicted once, from context the model saw in training (BERT masks of up to
//! half the tokens), and the output is the model's everywhere — but a hidden token's neighbours
//! in time are shown, so persistence alone predicts it well. With [`Hidden::Future`] one pass
//! hides the tile's last time slices, as the forecast task does: they are predicted from the
//! past alone, and tiles that overlap in time (each step the last of some tile) give a forecast
//! of every step. [`denormalize`] maps the predictions back to physical units with the loader's
//! statistics, for stitching and writing as a store the loader can serve.

use atmorep_proto::{Batch, MonthlyStatistics};
use candle_core::{DType, Device, Tensor};

use crate::batch::{batch_tensors, temporal_prior};
use crate::config::{Prior, TokenGrid};
use crate::error::{Result, input_err};
use crate::eval::{FieldLayout, TimeAxis, for_each_value};
use crate::model::{FieldInput, MultiFormer};

/// Which tokens [`reconstruct`] hides and predicts; see the [module documentation](self).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hidden {
    /// `passes` (≥ 2) interleaved groups, one hidden per pass: every token is predicted.
    Checkerboard { passes: usize },
    /// One pass hiding the last `slices` time-token slices of every level (at least one slice
    /// stays visible): only those are predicted.
    Future { slices: usize },
}

impl Hidden {
    fn passes(self) -> usize {
        match self {
            Self::Checkerboard { passes } => passes,
            Self::Future { .. } => 1,
        }
    }

    /// Whether pass `pass` hides token `k` of a field laid out as `layout`.
    fn hides(self, pass: usize, k: usize, layout: &FieldLayout) -> bool {
        let [nt, ny, nx] = layout.num_tokens;
        let (x, rest) = (k % nx, k / nx);
        let (y, rest) = (rest % ny, rest / ny);
        let (t, l) = (rest % nt, rest / nt);
        match self {
            Self::Checkerboard { passes } => (l + t + y + x) % passes == pass,
            Self::Future { slices } => t + slices >= nt,
        }
    }

    fn validate(self, layouts: &[FieldLayout]) -> Result<()> {
        match self {
            Self::Checkerboard { passes } if passes < 2 => Err(input_err(
                "passes",
                format!("{passes}: at least 2, so every token is predicted from others"),
            )),
            Self::Future { slices } => {
                for layout in layouts {
                    let nt = layout.num_tokens[0];
                    if slices == 0 || slices >= nt {
                        return Err(input_err(
                            format!("field `{}`", layout.name),
                            format!(
                                "hiding the last {slices} of {nt} time-token slices: at least one \
                                 must be hidden and one shown"
                            ),
                        ));
                    }
                }
                Ok(())
            }
            Self::Checkerboard { .. } => Ok(()),
        }
    }
}

/// Per model field, the predictions `[B, N, V]` (normalized units, the ensemble mean) of the
/// tokens of `batch` that `hidden` hides, each from the pass in which it was replaced by
/// `mask_value`; tokens no pass hides are NaN.
pub fn reconstruct(
    model: &MultiFormer,
    batch: &Batch,
    layouts: &[FieldLayout],
    hidden: Hidden,
    mask_value: f32,
    device: &Device,
) -> Result<Vec<Vec<f32>>> {
    hidden.validate(layouts)?;
    let cfg = model.config();
    if layouts.len() != cfg.fields.len() {
        return Err(input_err(
            "layouts",
            format!(
                "{} for a model of {} fields",
                layouts.len(),
                cfg.fields.len()
            ),
        ));
    }
    let fields = batch_tensors(batch, cfg, DType::F32, device)?;
    // Each pass hides other tokens, so the temporal prior is made again from what it shows.
    type Visible<'a> = Option<(Vec<f32>, [usize; 3], &'a TokenGrid)>;
    let raw: Vec<Visible> = fields
        .iter()
        .zip(&cfg.fields)
        .map(|(f, spec)| match (cfg.prior, &spec.grid) {
            (Prior::Temporal, Some(grid)) => {
                let (b, n, v) = f.input.source.dims3()?;
                Ok(Some((
                    f.input.source.flatten_all()?.to_vec1()?,
                    [b, n, v],
                    grid,
                )))
            }
            _ => Ok(None),
        })
        .collect::<Result<_>>()?;
    let mut out: Vec<Vec<f32>> = fields
        .iter()
        .map(|f| vec![f32::NAN; f.input.source.elem_count()])
        .collect();
    for pass in 0..hidden.passes() {
        let mut inputs = Vec::with_capacity(fields.len());
        let mut masks = Vec::with_capacity(fields.len());
        for ((f, layout), raw) in fields.iter().zip(layouts).zip(&raw) {
            let (_, n, _) = f.input.source.dims3()?;
            let masked: Vec<bool> = (0..n).map(|k| hidden.hides(pass, k, layout)).collect();
            let keep: Vec<f32> = masked.iter().map(|&m| if m { 0.0 } else { 1.0 }).collect();
            let keep = Tensor::from_vec(keep, (1, n, 1), device)?;
            let fill = keep.affine(-f64::from(mask_value), f64::from(mask_value))?;
            let source = f.input.source.broadcast_mul(&keep)?.broadcast_add(&fill)?;
            let prior = match raw {
                Some((values, shape, grid)) => Some(
                    temporal_prior(values, *shape, grid, |_, k| masked[k]).to_input(
                        *shape,
                        DType::F32,
                        device,
                    )?,
                ),
                None => None,
            };
            inputs.push(FieldInput {
                source,
                prior,
                ..f.input.clone()
            });
            masks.push(masked);
        }
        let preds = model.forward(&inputs)?;
        for ((pred, masked), o) in preds.iter().zip(&masks).zip(&mut out) {
            let (b, n, _, v) = pred.dims4()?;
            let values = pred.mean(2)?.flatten_all()?.to_vec1::<f32>()?;
            for i in 0..b {
                for (k, _) in masked.iter().enumerate().filter(|(_, m)| **m) {
                    let at = (i * n + k) * v;
                    o[at..at + v].copy_from_slice(&values[at..at + v]);
                }
            }
        }
    }
    Ok(out)
}

/// Maps `values` (`[B, N, V]` in the field's normalized units, the samples cut at `windows`)
/// to physical units in place, each value with the statistics of its level and month.
pub fn denormalize(
    values: &mut [f32],
    windows: &[atmorep_proto::Window],
    layout: &FieldLayout,
    stats: &MonthlyStatistics,
    time: TimeAxis,
) -> Result<()> {
    if !layout.normalized {
        return Ok(());
    }
    let n = layout.levels.len() * layout.num_tokens.iter().product::<usize>();
    let v = layout.token_size.iter().product::<usize>();
    if values.len() != windows.len() * n * v {
        return Err(input_err(
            format!("field `{}`", layout.name),
            format!(
                "{} values for {} samples of {n} tokens × {v}",
                values.len(),
                windows.len()
            ),
        ));
    }
    for (i, w) in windows.iter().enumerate() {
        for k in 0..n {
            let mut failed = None;
            let token = &mut values[(i * n + k) * v..(i * n + k + 1) * v];
            for_each_value(k, layout, |j, l, t, _, _| {
                let unix = time.start_unix + (w.time_start + t) as i64 * time.step_s;
                match stats.affine(&layout.name, layout.levels[l], unix) {
                    Ok((mean, std)) => token[j] = (f64::from(token[j]) * std + mean) as f32,
                    Err(e) => failed = Some(e),
                }
            });
            if let Some(e) = failed {
                return Err(input_err(format!("field `{}`", layout.name), e.to_string()));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelConfig;
    use atmorep_proto::statistics::Moments;
    use atmorep_proto::{FieldBatch, TOKEN_INFO_LEN, Window};

    /// The tiny preset's field shape: 2 levels × 2×2×2 tokens of 1×3×4.
    fn layout(name: &str) -> FieldLayout {
        FieldLayout {
            name: name.into(),
            levels: vec![850.0, 500.0],
            num_tokens: [2, 2, 2],
            token_size: [1, 3, 4],
            normalized: true,
        }
    }

    fn batch(cfg: &ModelConfig, b: usize) -> Batch {
        let fields = cfg
            .fields
            .iter()
            .map(|spec| {
                let (n, v, w) = (spec.num_tokens, spec.token_numel, spec.pe_width);
                FieldBatch {
                    name: spec.name.clone(),
                    source: (0..b * n * v)
                        .map(|i| ((i * 7) % 11) as f32 * 0.1)
                        .collect(),
                    source_shape: [b, n, v],
                    target: vec![],
                    masked_indices: vec![vec![]; b],
                    token_info: vec![1.0; b * n * TOKEN_INFO_LEN],
                    pe: vec![0.5; b * n * w],
                    pe_width: w,
                    windows: vec![
                        Window {
                            time_start: 0,
                            lat_start: 0,
                            lon_start: 0,
                            size: [2, 6, 8],
                        };
                        b
                    ],
                }
            })
            .collect();
        Batch {
            sample_ids: (0..b as u64).collect(),
            sample_epochs: vec![0; b],
            fields,
            ..Default::default()
        }
    }

    #[test]
    fn each_pass_makes_the_temporal_prior_from_what_it_shows() {
        let cfg = ModelConfig::tiny().with_temporal_prior([2, 2, 2]);
        let (model, vm) = MultiFormer::seeded(&cfg, 3, DType::F32, &Device::Cpu).unwrap();
        // A tail that adds nothing: the output is the prior alone.
        for (name, var) in vm.data().lock().unwrap().iter() {
            if name.starts_with("tail.") && name.contains(".proj_") {
                var.set(&var.zeros_like().unwrap()).unwrap();
            }
        }
        let b = batch(&cfg, 2);
        let out = reconstruct(
            &model,
            &b,
            &[layout("t"), layout("z")],
            Hidden::Checkerboard { passes: 2 },
            0.0,
            &Device::Cpu,
        )
        .unwrap();
        // Two time tokens of one step, checkerboard passes: a token's only time neighbour is
        // shown when it is hidden, so its prior is that neighbour's value at the same point.
        let (n, v) = (16, 12);
        for (f, o) in b.fields.iter().zip(&out) {
            for i in 0..2 {
                for k in 0..n {
                    let other = k ^ 4; // t = 0 ↔ t = 1: token k = ((l·2 + t)·2 + y)·2 + x
                    let at = |k: usize| (i * n + k) * v;
                    assert_eq!(
                        &o[at(k)..at(k) + v],
                        &f.source[at(other)..at(other) + v],
                        "{} sample {i} token {k}",
                        f.name
                    );
                }
            }
        }
    }

    #[test]
    fn each_token_comes_from_the_pass_that_masked_it() {
        let cfg = ModelConfig::tiny();
        let (model, _) = MultiFormer::seeded(&cfg, 3, DType::F32, &Device::Cpu).unwrap();
        let layouts = [layout("t"), layout("z")];
        let b = batch(&cfg, 2);
        let two = Hidden::Checkerboard { passes: 2 };
        let out = reconstruct(&model, &b, &layouts, two, 0.0, &Device::Cpu).unwrap();
        // The same by hand: pass 0 masks the even-parity tokens, pass 1 the odd ones.
        let fields = batch_tensors(&b, &cfg, DType::F32, &Device::Cpu).unwrap();
        for pass in 0..2 {
            let inputs: Vec<FieldInput> = fields
                .iter()
                .zip(&layouts)
                .map(|(f, layout)| {
                    let mut src = f
                        .input
                        .source
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap();
                    let (n, v) = (16, 12);
                    for i in 0..2 {
                        for k in 0..n {
                            if two.hides(pass, k, layout) {
                                src[(i * n + k) * v..(i * n + k + 1) * v].fill(0.0);
                            }
                        }
                    }
                    FieldInput {
                        source: Tensor::from_vec(src, (2, n, v), &Device::Cpu).unwrap(),
                        ..f.input.clone()
                    }
                })
                .collect();
            let preds = model.forward(&inputs).unwrap();
            for ((p, o), layout) in preds.iter().zip(&out).zip(&layouts) {
                let p = p.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                for k in (0..32).filter(|k| two.hides(pass, k % 16, layout)) {
                    assert_eq!(
                        &o[k * 12..(k + 1) * 12],
                        &p[k * 12..(k + 1) * 12],
                        "token {k}"
                    );
                }
            }
        }
        // Neighbours along every token axis fall in different groups.
        let l = layout("t");
        // Token k = ((l·2 + t)·2 + y)·2 + x: a step along one axis adds 8, 4, 2 or 1 to k
        // where that coordinate is 0.
        for k in 0..16 {
            for (bit, d) in [(8, 8), (4, 4), (2, 2), (1, 1)] {
                if k & bit == 0 {
                    assert_ne!(two.hides(0, k, &l), two.hides(0, k + d, &l), "{k} {d}");
                }
            }
        }
        let one = Hidden::Checkerboard { passes: 1 };
        assert!(reconstruct(&model, &b, &layouts, one, 0.0, &Device::Cpu).is_err());
    }

    #[test]
    fn the_future_is_predicted_from_the_past_alone() {
        let cfg = ModelConfig::tiny().with_temporal_prior([2, 2, 2]);
        let (model, vm) = MultiFormer::seeded(&cfg, 3, DType::F32, &Device::Cpu).unwrap();
        let layouts = [layout("t"), layout("z")];
        let b = batch(&cfg, 2);
        let future = Hidden::Future { slices: 1 };
        let out = reconstruct(&model, &b, &layouts, future, 0.0, &Device::Cpu).unwrap();
        // The same by hand: the last time slice (t = 1: tokens 4..8 and 12..16) masked.
        let fields = batch_tensors(&b, &cfg, DType::F32, &Device::Cpu).unwrap();
        let (n, v) = (16, 12);
        let last = |k: usize| k & 4 != 0;
        let inputs: Vec<FieldInput> = fields
            .iter()
            .map(|f| {
                let values = f.input.source.flatten_all().unwrap().to_vec1().unwrap();
                let mut src = values.clone();
                for i in 0..2 {
                    for k in (0..n).filter(|&k| last(k)) {
                        src[(i * n + k) * v..(i * n + k + 1) * v].fill(0.0);
                    }
                }
                let grid = cfg.fields[0].grid.as_ref().unwrap();
                let prior = temporal_prior(&values, [2, n, v], grid, |_, k| last(k));
                FieldInput {
                    source: Tensor::from_vec(src, (2, n, v), &Device::Cpu).unwrap(),
                    prior: Some(prior.to_input([2, n, v], DType::F32, &Device::Cpu).unwrap()),
                    ..f.input.clone()
                }
            })
            .collect();
        let preds = model.forward(&inputs).unwrap();
        for (p, o) in preds.iter().zip(&out) {
            let p = p
                .mean(2)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            for k in 0..2 * n {
                let (got, want) = (&o[k * v..(k + 1) * v], &p[k * v..(k + 1) * v]);
                if last(k % n) {
                    assert_eq!(got, want, "token {k}");
                } else {
                    assert!(got.iter().all(|x| x.is_nan()), "token {k}: {got:?}");
                }
            }
        }
        // A tail that adds nothing: the forecast is persistence, the last shown step.
        for (name, var) in vm.data().lock().unwrap().iter() {
            if name.starts_with("tail.") && name.contains(".proj_") {
                var.set(&var.zeros_like().unwrap()).unwrap();
            }
        }
        let out = reconstruct(&model, &b, &layouts, future, 0.0, &Device::Cpu).unwrap();
        for (f, o) in b.fields.iter().zip(&out) {
            for k in (0..2 * n).filter(|k| last(k % n)) {
                assert_eq!(
                    &o[k * v..(k + 1) * v],
                    &f.source[(k - 4) * v..(k - 3) * v],
                    "{} token {k}",
                    f.name
                );
            }
        }
        for slices in [0, 2] {
            let err = reconstruct(
                &model,
                &b,
                &layouts,
                Hidden::Future { slices },
                0.0,
                &Device::Cpu,
            )
            .unwrap_err();
            assert!(err.to_string().contains("`t`"), "{err}");
        }
    }

    #[test]
    fn denormalize_uses_each_values_level_and_month() {
        let mut stats = MonthlyStatistics::default();
        let m = |mean, std| Moments {
            count: 1,
            mean,
            std,
            min: 0.0,
            max: 0.0,
        };
        stats.insert("t", 850.0, 2020, 1, m(280.0, 10.0));
        stats.insert("t", 500.0, 2020, 1, m(250.0, 5.0));
        stats.insert("t", 850.0, 2020, 2, m(275.0, 2.0));
        stats.insert("t", 500.0, 2020, 2, m(245.0, 1.0));
        // Step 0 is 2020-01-31T23:00Z, step 1 is in February.
        let time = TimeAxis {
            start_unix: 1_580_511_600,
            step_s: 3600,
        };
        let l = layout("t");
        let mut values = vec![1.0f32; 16 * 12];
        let w = Window {
            time_start: 0,
            lat_start: 0,
            lon_start: 0,
            size: [2, 6, 8],
        };
        denormalize(&mut values, &[w], &l, &stats, time).unwrap();
        // Token order (level, t, lat, lon): tokens 0..4 are 850 hPa step 0, 4..8 step 1,
        // 8..12 500 hPa step 0, 12..16 step 1.
        assert_eq!(values[0], 290.0);
        assert_eq!(values[4 * 12], 277.0);
        assert_eq!(values[8 * 12], 255.0);
        assert_eq!(values[12 * 12 + 11], 246.0);
        let mut short = vec![0.0; 5];
        assert!(denormalize(&mut short, &[w], &l, &stats, time).is_err());
        let time = TimeAxis {
            start_unix: 1_600_000_000,
            step_s: 3600,
        };
        let err = denormalize(&mut values, &[w], &l, &stats, time).unwrap_err();
        assert!(err.to_string().contains("`t`"), "{err}");
    }
}
