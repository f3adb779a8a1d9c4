//! From the loader's decoded batches (`atmorep_proto::Batch`) to the model's tensors.

use atmorep_proto::{Batch, FieldBatch, TOKEN_INFO_LEN, TokenGeometry};
use candle_core::{DType, Device, Tensor};

use crate::config::{ModelConfig, Prior, TokenGrid};
use crate::error::{Result, input_err};
use crate::model::{FieldInput, PriorInput};

/// One field of a batch as tensors: the model's input and what the loss compares against.
#[derive(Debug, Clone)]
pub struct FieldTensors {
    pub input: FieldInput,
    /// `[M, V]`: original values of the masked tokens, sample by sample.
    pub target: Tensor,
    /// Per sample, the indices of its masked tokens.
    pub masked_indices: Vec<Vec<u32>>,
}

impl FieldTensors {
    /// Copies one field of a batch into tensors of `dtype` on `device`, with the temporal prior
    /// of its visible values when `grid` is given.
    pub fn from_field_batch(
        fb: &FieldBatch,
        grid: Option<&TokenGrid>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let what = || format!("batch field `{}`", fb.name);
        fb.validate()
            .map_err(|e| input_err(what(), e.to_string()))?;
        let t = |data: &[f32], dims: &[usize]| -> Result<Tensor> {
            Ok(Tensor::from_slice(data, dims, device)?.to_dtype(dtype)?)
        };
        let prior = match grid {
            Some(grid) => {
                let window = [0, 1, 2].map(|a| grid.num_tokens[a] * grid.token_size[a]);
                if let Some(w) = fb.windows.iter().find(|w| w.size != window) {
                    return Err(input_err(
                        what(),
                        format!(
                            "a window of {:?} grid points; the model's token grid makes {window:?}",
                            w.size
                        ),
                    ));
                }
                let hidden =
                    |i: usize, k: usize| fb.masked_indices[i].binary_search(&(k as u32)).is_ok();
                let prior = temporal_prior(&fb.source, fb.source_shape, grid, hidden);
                Some(prior.to_input(fb.source_shape, dtype, device)?)
            }
            None => None,
        };
        Ok(Self {
            input: FieldInput {
                source: t(&fb.source, &fb.source_shape)?,
                token_info: t(&fb.token_info, &fb.token_info_shape())?,
                pe: t(&fb.pe, &fb.pe_shape())?,
                prior,
            },
            target: t(&fb.target, &fb.target_shape())?,
            masked_indices: fb.masked_indices.clone(),
        })
    }
}

/// The fields of `batch` that `cfg` names, in the config's order (a batch may carry them in
/// another order, or carry more), with their shapes checked against the config.
pub fn batch_tensors(
    batch: &Batch,
    cfg: &ModelConfig,
    dtype: DType,
    device: &Device,
) -> Result<Vec<FieldTensors>> {
    debug_assert_eq!(TOKEN_INFO_LEN, crate::embed::TOKEN_INFO_LEN);
    cfg.fields
        .iter()
        .map(|spec| {
            let fb = batch.field(&spec.name).ok_or_else(|| {
                input_err(
                    format!("batch field `{}`", spec.name),
                    format!(
                        "the model needs it; the batch has {:?}",
                        batch.fields.iter().map(|f| &f.name).collect::<Vec<_>>()
                    ),
                )
            })?;
            let want = (spec.num_tokens, spec.token_numel, spec.pe_width);
            let got = (fb.num_tokens(), fb.token_numel(), fb.pe_width);
            if want != got {
                return Err(input_err(
                    format!("batch field `{}`", spec.name),
                    format!(
                        "(tokens, values per token, PE width) are {got:?}, the model expects {want:?}"
                    ),
                ));
            }
            let grid = match cfg.prior {
                Prior::Temporal => spec.grid.as_ref(),
                Prior::None => None,
            };
            FieldTensors::from_field_batch(fb, grid, dtype, device)
        })
        .collect()
}

/// How a value's temporal prior was made; the model scales its correction by a learned factor
/// per kind, since the prior's error differs by orders of magnitude between them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum PriorKind {
    /// The value is visible: it is its own prior and nothing is predicted.
    Visible = 0,
    /// Linear interpolation between visible values before and after.
    Interpolated = 1,
    /// The nearest visible value, which lies on one side only (persistence at a forecast edge).
    OneSided = 2,
    /// No visible value of the grid point in the window: 0, the normalized climatology.
    Climatology = 3,
}

/// The predicted kinds, in the order of the one-hot channels of [`PriorInput::kind`].
pub const PREDICTED_PRIOR_KINDS: [PriorKind; 3] = [
    PriorKind::Interpolated,
    PriorKind::OneSided,
    PriorKind::Climatology,
];

/// The temporal prior of one field of a batch, `[B, N, V]` each.
#[derive(Debug, Clone, PartialEq)]
pub struct TemporalPrior {
    pub values: Vec<f32>,
    pub kind: Vec<PriorKind>,
}

impl TemporalPrior {
    /// As the model's input: values `[B, N, V]` and the kinds one-hot `[B, N, V, 3]`.
    pub fn to_input(&self, shape: [usize; 3], dtype: DType, device: &Device) -> Result<PriorInput> {
        let k = PREDICTED_PRIOR_KINDS.len();
        let mut one_hot = vec![0f32; self.kind.len() * k];
        for (i, kind) in self.kind.iter().enumerate() {
            if let Some(c) = PREDICTED_PRIOR_KINDS.iter().position(|p| p == kind) {
                one_hot[i * k + c] = 1.0;
            }
        }
        let [b, n, v] = shape;
        Ok(PriorInput {
            values: Tensor::from_slice(&self.values, (b, n, v), device)?.to_dtype(dtype)?,
            kind: Tensor::from_vec(one_hot, (b, n, v, k), device)?.to_dtype(dtype)?,
        })
    }
}

/// The temporal prior of [`Prior::Temporal`] for `source` (`[B, N, V]` as `shape`, tokens laid
/// out by `grid`), where `hidden(sample, token)` tells which tokens the model cannot see. A
/// visible value is its own prior; a hidden one is interpolated linearly in time between the
/// nearest visible values of the same grid point, level and sample before and after it, takes
/// the nearest one when only one side has any, and is 0 (the normalized climatology) when
/// none does.
pub fn temporal_prior(
    source: &[f32],
    shape: [usize; 3],
    grid: &TokenGrid,
    hidden: impl Fn(usize, usize) -> bool,
) -> TemporalPrior {
    let [b, n, v] = shape;
    let geometry = TokenGeometry::new(grid.num_tokens, grid.token_size);
    debug_assert_eq!(v, geometry.token_numel());
    let levels = n / geometry.tokens_per_level();
    let [steps, wy, wx] = geometry.window();
    let mut out = source.to_vec();
    let mut kind = vec![PriorKind::Visible; source.len()];
    // A value's position is a sum of one term per axis (and its token the same sum divided by
    // the token's values, term by term), so each series adds the time step's term to its
    // grid point's.
    let time_term: Vec<usize> = (0..steps)
        .map(|tau| geometry.value_position(0, [tau, 0, 0]))
        .collect();
    let time_token: Vec<usize> = time_term.iter().map(|p| p / v).collect();
    // For each series: the flat index of each time step and whether it is visible.
    let mut at = vec![0usize; steps];
    let mut seen = vec![false; steps];
    let mut before: Vec<Option<usize>> = vec![None; steps];
    for i in 0..b {
        let hidden_token: Vec<bool> = (0..n).map(|k| hidden(i, k)).collect();
        for l in 0..levels {
            for row in 0..wy {
                for col in 0..wx {
                    let point = geometry.value_position(l, [0, row, col]);
                    let token = point / v;
                    for tau in 0..steps {
                        at[tau] = i * n * v + point + time_term[tau];
                        seen[tau] = !hidden_token[token + time_token[tau]];
                    }
                    let mut last = None;
                    for tau in 0..steps {
                        before[tau] = last;
                        if seen[tau] {
                            last = Some(tau);
                        }
                    }
                    let mut next = None;
                    for tau in (0..steps).rev() {
                        if seen[tau] {
                            next = Some(tau);
                            continue;
                        }
                        let value = |t: usize| source[at[t]];
                        (out[at[tau]], kind[at[tau]]) = match (before[tau], next) {
                            (Some(t0), Some(t1)) => {
                                let w = (tau - t0) as f32 / (t1 - t0) as f32;
                                let x = value(t0) + (value(t1) - value(t0)) * w;
                                (x, PriorKind::Interpolated)
                            }
                            (Some(t), None) | (None, Some(t)) => (value(t), PriorKind::OneSided),
                            (None, None) => (0.0, PriorKind::Climatology),
                        };
                    }
                }
            }
        }
    }
    TemporalPrior { values: out, kind }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loss::masked_mse;
    use crate::model::MultiFormer;

    fn field(name: &str, spec: &crate::FieldSpec, b: usize) -> FieldBatch {
        let (n, v, w) = (spec.num_tokens, spec.token_numel, spec.pe_width);
        let masked_indices: Vec<Vec<u32>> = (0..b).map(|i| vec![i as u32, 5]).collect();
        let m: usize = masked_indices.iter().map(Vec::len).sum();
        FieldBatch {
            name: name.into(),
            source: (0..b * n * v).map(|i| (i % 7) as f32 * 0.1).collect(),
            source_shape: [b, n, v],
            target: vec![0.5; m * v],
            masked_indices,
            token_info: vec![2000.0; b * n * TOKEN_INFO_LEN],
            pe: vec![0.25; b * n * w],
            pe_width: w,
            windows: vec![
                atmorep_proto::Window {
                    time_start: 0,
                    lat_start: 0,
                    lon_start: 0,
                    size: [1, 1, 1],
                };
                b
            ],
        }
    }

    #[test]
    fn batch_to_tensors_to_loss() {
        let cfg = ModelConfig::tiny();
        let (t, z) = (&cfg.fields[0], &cfg.fields[1]);
        // The batch lists the fields in the other order: matched by name.
        let batch = Batch {
            sample_ids: vec![0, 1],
            sample_epochs: vec![0, 0],
            fields: vec![field("z", z, 2), field("t", t, 2)],
            ..Default::default()
        };
        let tensors = batch_tensors(&batch, &cfg, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(tensors[0].input.source.dims(), &[2, 16, 12]);
        assert_eq!(tensors[0].target.dims(), &[4, 12]);
        assert_eq!(tensors[1].input.pe.dims(), &[2, 16, 8]);
        let (model, _) = MultiFormer::seeded(&cfg, 1, DType::F32, &Device::Cpu).unwrap();
        let inputs: Vec<FieldInput> = tensors.iter().map(|f| f.input.clone()).collect();
        let preds = model.forward(&inputs).unwrap();
        for (p, f) in preds.iter().zip(&tensors) {
            let l = masked_mse(p, &f.target, &f.masked_indices).unwrap();
            assert!(l.to_scalar::<f32>().unwrap().is_finite());
        }

        let mut missing = batch.clone();
        missing.fields.pop();
        let err = batch_tensors(&missing, &cfg, DType::F32, &Device::Cpu).unwrap_err();
        assert!(err.to_string().contains("`t`"), "{err}");
        let mut wrong = batch.clone();
        wrong.fields[0] = field(
            "z",
            &crate::FieldSpec {
                pe_width: 4,
                ..z.clone()
            },
            2,
        );
        let err = batch_tensors(&wrong, &cfg, DType::F32, &Device::Cpu).unwrap_err();
        assert!(
            err.to_string().contains("`z`") && err.to_string().contains("PE width"),
            "{err}"
        );
    }

    #[test]
    fn a_temporal_prior_model_gets_its_prior_and_checks_the_window() {
        let mut cfg = ModelConfig::tiny().with_temporal_prior([2, 2, 2]);
        let mut batch = Batch {
            sample_ids: vec![0, 1],
            sample_epochs: vec![0, 0],
            fields: vec![field("t", &cfg.fields[0], 2), field("z", &cfg.fields[1], 2)],
            ..Default::default()
        };
        // The helper's windows are 1×1×1 points: not what 2×2×2 tokens of 1×3×4 make.
        let err = batch_tensors(&batch, &cfg, DType::F32, &Device::Cpu).unwrap_err();
        assert!(
            err.to_string().contains("`t`") && err.to_string().contains("[2, 6, 8]"),
            "{err}"
        );
        for f in &mut batch.fields {
            for w in &mut f.windows {
                w.size = [2, 6, 8];
            }
        }
        let tensors = batch_tensors(&batch, &cfg, DType::F32, &Device::Cpu).unwrap();
        let prior = tensors[0].input.prior.as_ref().unwrap();
        assert_eq!(prior.values.dims(), &[2, 16, 12]);
        assert_eq!(prior.kind.dims(), &[2, 16, 12, 3]);
        // Without the prior in the config, none is made.
        cfg.prior = Prior::None;
        let tensors = batch_tensors(&batch, &cfg, DType::F32, &Device::Cpu).unwrap();
        assert!(tensors[0].input.prior.is_none());
    }

    /// Under a temporal prior the model sees a hidden token only through its prior: what the
    /// loader put in its place (mask value or noise) changes nothing, a visible value does.
    #[test]
    fn a_temporal_prior_model_sees_hidden_tokens_through_their_prior() {
        let cfg = ModelConfig::tiny().with_temporal_prior([2, 2, 2]);
        let (model, _) = MultiFormer::seeded(&cfg, 3, DType::F32, &Device::Cpu).unwrap();
        let mut batch = Batch {
            sample_ids: vec![0, 1],
            sample_epochs: vec![0, 0],
            fields: vec![field("t", &cfg.fields[0], 2), field("z", &cfg.fields[1], 2)],
            ..Default::default()
        };
        for f in &mut batch.fields {
            f.windows.iter_mut().for_each(|w| w.size = [2, 6, 8]);
        }
        let predict = |batch: &Batch| -> Vec<Vec<f32>> {
            let tensors = batch_tensors(batch, &cfg, DType::F32, &Device::Cpu).unwrap();
            let inputs: Vec<FieldInput> = tensors.iter().map(|f| f.input.clone()).collect();
            model
                .forward(&inputs)
                .unwrap()
                .iter()
                .map(|p| p.flatten_all().unwrap().to_vec1().unwrap())
                .collect()
        };
        let before = predict(&batch);
        // Token 5 of sample 0 is masked (the helper masks tokens i and 5 of sample i).
        let v = cfg.fields[0].token_numel;
        let mut noised = batch.clone();
        noised.fields[0].source[5 * v..6 * v].fill(7.5);
        assert!(
            predict(&noised) == before,
            "what the loader put in a masked token's place reached the model"
        );
        let mut changed = batch.clone();
        changed.fields[0].source[3 * v] += 1.0;
        assert!(
            predict(&changed)[0] != before[0],
            "a visible value did not reach the model"
        );
    }

    #[test]
    fn the_prior_interpolates_hidden_tokens_in_time_per_grid_point() {
        // One level, 3 time tokens of 2 steps × 1 × 2 points: the series of grid point x is
        // 10·x + τ for τ = 0..6.
        let grid = TokenGrid {
            num_tokens: [3, 1, 1],
            token_size: [2, 1, 2],
        };
        let source: Vec<f32> = (0..3)
            .flat_map(|tt| {
                (0..2).flat_map(move |dt| (0..2).map(move |x| (10 * x + 2 * tt + dt) as f32))
            })
            .collect();
        let series = |out: &[f32], x: usize| -> Vec<f32> {
            (0..6)
                .map(|tau| out[(tau / 2) * 4 + (tau % 2) * 2 + x])
                .collect()
        };
        // Middle token hidden: linear interpolation between τ = 1 and τ = 4, exact here.
        let out = temporal_prior(&source, [1, 3, 4], &grid, |_, k| k == 1);
        assert_eq!(out.values, source);
        let kinds = |p: &TemporalPrior, x: usize| -> Vec<PriorKind> {
            (0..6)
                .map(|tau| p.kind[(tau / 2) * 4 + (tau % 2) * 2 + x])
                .collect()
        };
        use PriorKind::*;
        assert_eq!(
            kinds(&out, 1),
            [
                Visible,
                Visible,
                Interpolated,
                Interpolated,
                Visible,
                Visible
            ]
        );
        // Last token hidden: persistence of τ = 3; first hidden: the first visible value, τ = 2.
        let out = temporal_prior(&source, [1, 3, 4], &grid, |_, k| k == 2);
        assert_eq!(series(&out.values, 1), [10.0, 11.0, 12.0, 13.0, 13.0, 13.0]);
        assert_eq!(kinds(&out, 1)[4..], [OneSided, OneSided]);
        let out = temporal_prior(&source, [1, 3, 4], &grid, |_, k| k == 0);
        assert_eq!(series(&out.values, 0), [2.0, 2.0, 2.0, 3.0, 4.0, 5.0]);
        // All hidden: the climatology, 0.
        let out = temporal_prior(&source, [1, 3, 4], &grid, |_, _| true);
        assert!(out.values.iter().all(|&x| x == 0.0));
        assert!(out.kind.iter().all(|&k| k == Climatology));
        // One-hot channels in PREDICTED_PRIOR_KINDS order; visible values in none.
        let input = temporal_prior(&source, [1, 3, 4], &grid, |_, k| k == 2)
            .to_input([1, 3, 4], DType::F32, &Device::Cpu)
            .unwrap();
        let one_hot: Vec<Vec<f32>> = input
            .kind
            .squeeze(0)
            .unwrap()
            .flatten_to(1)
            .unwrap()
            .to_vec2()
            .unwrap();
        assert_eq!(one_hot[0], [0.0, 0.0, 0.0]);
        assert_eq!(one_hot[8], [0.0, 1.0, 0.0]);
    }

    #[test]
    fn the_prior_matches_a_direct_search_on_random_masks() {
        use rand::{Rng, SeedableRng};
        let grid = TokenGrid {
            num_tokens: [4, 2, 3],
            token_size: [2, 2, 2],
        };
        let (b, levels) = (3, 2);
        let [nt, ny, nx] = grid.num_tokens;
        let [st, sy, sx] = grid.token_size;
        let (n, v) = (levels * nt * ny * nx, st * sy * sx);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let source: Vec<f32> = (0..b * n * v)
            .map(|_| rng.random_range(-2.0..2.0))
            .collect();
        let hidden: Vec<Vec<bool>> = (0..b)
            .map(|_| (0..n).map(|_| rng.random_bool(0.5)).collect())
            .collect();
        let prior = temporal_prior(&source, [b, n, v], &grid, |i, k| hidden[i][k]);
        let out = &prior.values;
        // Decode every value's coordinates and search along its own time axis.
        let coords = |k: usize, j: usize| {
            let (tx, ty, tt, l) = (k % nx, k / nx % ny, k / (nx * ny) % nt, k / (nx * ny * nt));
            let (dx, dy, dt) = (j % sx, j / sx % sy, j / (sx * sy));
            (l, tt * st + dt, ty * sy + dy, tx * sx + dx)
        };
        let find = |i: usize, want: (usize, usize, usize, usize)| -> Option<f32> {
            (0..n)
                .flat_map(|k| (0..v).map(move |j| (k, j)))
                .find_map(|(k, j)| {
                    (coords(k, j) == want && !hidden[i][k]).then(|| source[(i * n + k) * v + j])
                })
        };
        let mut interpolated = 0;
        for i in 0..b {
            for k in 0..n {
                for j in 0..v {
                    let got = out[(i * n + k) * v + j];
                    let (l, tau, y, x) = coords(k, j);
                    if !hidden[i][k] {
                        assert_eq!(got, source[(i * n + k) * v + j]);
                        continue;
                    }
                    let before = (0..tau)
                        .rev()
                        .find_map(|t| find(i, (l, t, y, x)).map(|s| (t, s)));
                    let after =
                        (tau + 1..nt * st).find_map(|t| find(i, (l, t, y, x)).map(|s| (t, s)));
                    let (want, kind) = match (before, after) {
                        (Some((t0, a)), Some((t1, c))) => {
                            interpolated += 1;
                            let x = a + (c - a) * (tau - t0) as f32 / (t1 - t0) as f32;
                            (x, PriorKind::Interpolated)
                        }
                        (Some((_, a)), None) | (None, Some((_, a))) => (a, PriorKind::OneSided),
                        (None, None) => (0.0, PriorKind::Climatology),
                    };
                    assert_eq!(prior.kind[(i * n + k) * v + j], kind);
                    assert!(
                        (got - want).abs() < 1e-6,
                        "sample {i} token {k} value {j}: {got} vs {want}"
                    );
                }
            }
        }
        assert!(
            interpolated > 50,
            "the masks exercise interpolation ({interpolated})"
        );
    }
}
