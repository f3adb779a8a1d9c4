//! The loss a step minimizes: per field with masked tokens the MSE of the ensemble mean (plus
//! the CRPS with an ensemble), in units of each value's prior error under a temporal prior,
//! averaged over the fields; on data-parallel ranks each rank's part of the combined batch's
//! loss. Also the prior errors a fresh run measures on its first batches.

use atmorep_proto::Batch;
use candle_core::{DType, Tensor};

use super::Trainer;
use crate::batch::{FieldTensors, batch_tensors};
use crate::config::ModelConfig;
use crate::error::Result;
use crate::loss::{gather_masked, in_units_of, masked_crps, masked_mse, prior_error_per_value};
use crate::model::FieldInput;

impl Trainer {
    /// The training loss of one batch: per field with masked tokens the MSE of the ensemble
    /// mean (plus the CRPS with an ensemble), averaged over those fields.
    pub fn loss(&self, preds: &[Tensor], fields: &[FieldTensors]) -> Result<Tensor> {
        Ok(self.loss_per_field(preds, fields)?.0)
    }

    /// [`Self::loss`] and the fields' terms it averages, in the model's field order: `None` for
    /// a field without masked tokens in the batch. The values are read off the same tensor the
    /// loss sums, so the loss and its gradients are those of [`Self::loss`].
    pub fn loss_per_field(
        &self,
        preds: &[Tensor],
        fields: &[FieldTensors],
    ) -> Result<(Tensor, Vec<Option<f64>>)> {
        self.loss_of_share(preds, fields, None)
    }

    /// [`Self::loss_per_field`] as this rank's part of a batch spread over data-parallel ranks:
    /// with `share` `(weights, fields)`, each field's term is multiplied by its weight (the
    /// field's masked tokens here over those of the combined batch) and the sum divided by
    /// `fields` (the fields with masked tokens in the combined batch), so that the ranks' losses
    /// add up to the combined batch's. The returned terms are this rank's, unweighted.
    fn loss_of_share(
        &self,
        preds: &[Tensor],
        fields: &[FieldTensors],
        share: Option<(&[f64], usize)>,
    ) -> Result<(Tensor, Vec<Option<f64>>)> {
        let ensemble = self.config.model.ensemble > 1;
        let mut terms = Vec::new();
        let mut which = Vec::new();
        for (i, (p, f)) in preds.iter().zip(fields).enumerate() {
            if f.target.elem_count() == 0 {
                continue;
            }
            // Under a temporal prior, errors count in units of each value's prior error.
            let scaled = match (&f.input.prior, self.model.prior_error(i)) {
                (Some(prior), Some(error)) => Some(in_units_of(
                    p,
                    &f.target,
                    &f.masked_indices,
                    &prior_error_per_value(&prior.kind, &error.detach())?,
                )?),
                _ => None,
            };
            let (p, target) = match &scaled {
                Some((p, t)) => (p, t),
                None => (p, &f.target),
            };
            let mut l = masked_mse(p, target, &f.masked_indices)?;
            if ensemble {
                l = (l + masked_crps(p, target, &f.masked_indices)?)?;
            }
            terms.push(l);
            which.push(i);
        }
        let mut per_field = vec![None; fields.len()];
        if terms.is_empty() {
            // A batch without masked tokens: a zero that keeps the graph, all gradients zero.
            return Ok((preds[0].sum_all()?.affine(0.0, 0.0)?, per_field));
        }
        let mut n = terms.len();
        let mut stacked = Tensor::stack(&terms, 0)?;
        let values = stacked.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        for (&i, v) in which.iter().zip(values) {
            per_field[i] = Some(f64::from(v));
        }
        if let Some((weights, fields)) = share {
            n = fields;
            let w: Vec<f64> = which.iter().map(|&i| weights[i]).collect();
            // A whole batch (one rank) has weights of exactly 1: leave the graph as it was.
            if w.iter().any(|&w| w != 1.0) {
                let w = Tensor::new(w, &self.device)?.to_dtype(stacked.dtype())?;
                stacked = (stacked * w)?;
            }
        }
        let loss = stacked.sum_all()?.affine(1.0 / n as f64, 0.0)?;
        Ok((loss, per_field))
    }

    /// Sets each field's `prior_error` (see [`crate::tail::PRIOR_ERROR`]) to the RMS error of
    /// each kind of temporal prior on the masked values of `batches` (a fresh run's first of
    /// every task, summed over the ranks); a kind they lack keeps its value.
    pub(super) fn measure_prior_error(&mut self, batches: &[Batch]) -> Result<()> {
        let k = crate::batch::PREDICTED_PRIOR_KINDS.len();
        let n_fields = self.config.model.fields.len();
        let mut sums = vec![0.0f64; 2 * k * n_fields];
        for batch in batches {
            let fields = batch_tensors(batch, &self.config.model, self.dtype, &self.device)?;
            for (f, field) in fields.iter().enumerate() {
                if let Some((sq, n)) = prior_error_sums(field)? {
                    for c in 0..k {
                        sums[2 * k * f + c] += sq[c];
                        sums[2 * k * f + k + c] += n[c];
                    }
                }
            }
        }
        self.collective.all_reduce_sum_f64(&mut sums)?;
        for f in 0..n_fields {
            let Some(error) = self.model.prior_error(f) else {
                continue;
            };
            let mut values: Vec<f64> = error.to_dtype(DType::F64)?.to_vec1()?;
            for (kind, value) in values.iter_mut().enumerate() {
                let (sq, n) = (sums[2 * k * f + kind], sums[2 * k * f + k + kind]);
                if n > 0.0 {
                    // A floor, so a prior that happens to be exact cannot divide by zero.
                    *value = (sq / n).sqrt().max(1e-6);
                }
            }
            let name = format!(
                "tail.{}.{}",
                self.config.model.fields[f].name,
                crate::tail::PRIOR_ERROR
            );
            tracing::info!(field = %self.config.model.fields[f].name, ?values, "prior error");
            self.varmap.set_one(
                &name,
                Tensor::new(values, &self.device)?.to_dtype(self.dtype)?,
            )?;
        }
        Ok(())
    }

    /// This rank's batch through the model: its part of the loss of the ranks' batches
    /// together (all of it with one rank), the fields' terms of the combined loss weighted by
    /// this rank's share (`Some(0.0)` for a field masked only on other ranks; the ranks' values
    /// add up to the combined batch's terms) and the tokens read here. Every rank calls it for
    /// its micro-batch at the same time: the ranks exchange their masked-token counts.
    pub(super) fn forward_loss(&self, batch: &Batch) -> Result<(Tensor, Vec<Option<f64>>, u64)> {
        let fields = batch_tensors(batch, &self.config.model, self.dtype, &self.device)?;
        let local: Vec<f64> = fields
            .iter()
            .map(|f| {
                if f.target.elem_count() == 0 {
                    0.0
                } else {
                    f.target.dims()[0] as f64
                }
            })
            .collect();
        let mut global = local.clone();
        self.collective.all_reduce_sum_f64(&mut global)?;
        let weights: Vec<f64> = local
            .iter()
            .zip(&global)
            .map(|(l, g)| if *l > 0.0 { l / g } else { 0.0 })
            .collect();
        let masked = global.iter().filter(|g| **g > 0.0).count();

        let inputs: Vec<FieldInput> = fields.iter().map(|f| f.input.clone()).collect();
        let preds = self.model.forward(&inputs)?;
        let tokens = batch.len() as u64 * self.config.tokens_per_sample();
        let (loss, terms) = self.loss_of_share(&preds, &fields, Some((&weights, masked)))?;
        let shares = terms
            .iter()
            .zip(&weights)
            .zip(&global)
            .map(|((t, w), g)| match t {
                // Exactly the term with one rank (w = 1).
                Some(t) => Some(if *w == 1.0 { *t } else { t * w }),
                None => (*g > 0.0).then_some(0.0),
            })
            .collect();
        Ok((loss, shares, tokens))
    }
}

/// Per field, the sum and count of its loss terms over some batches.
pub(super) struct FieldMeans(pub(super) Vec<(f64, u64)>);

impl FieldMeans {
    pub(super) fn new(fields: usize) -> Self {
        Self(vec![(0.0, 0); fields])
    }

    pub(super) fn add(&mut self, terms: &[Option<f64>]) {
        for (acc, t) in self.0.iter_mut().zip(terms) {
            if let Some(v) = t {
                acc.0 += v;
                acc.1 += 1;
            }
        }
    }

    /// `(name, mean)` of the fields with at least one term, in the model's order.
    pub(super) fn means(&self, model: &ModelConfig) -> Vec<(String, f64)> {
        model
            .fields
            .iter()
            .zip(&self.0)
            .filter(|(_, (_, n))| *n > 0)
            .map(|(f, (sum, n))| (f.name.clone(), sum / *n as f64))
            .collect()
    }
}

/// Per kind of temporal prior, the sum of squared errors of the prior on `field`'s masked
/// values and how many there are; `None` without a prior.
fn prior_error_sums(field: &FieldTensors) -> Result<Option<(Vec<f64>, Vec<f64>)>> {
    let Some(prior) = &field.input.prior else {
        return Ok(None);
    };
    let k = prior.kind.dim(3)?;
    if field.target.elem_count() == 0 {
        return Ok(Some((vec![0.0; k], vec![0.0; k])));
    }
    // Gathered as predictions are, [B, T, E, V] → [M, E, V]: the values with E = 1, the kinds
    // with each value's K channels side by side in the last axis.
    let (b, n, v, _) = prior.kind.dims4()?;
    let values = gather_masked(&prior.values.unsqueeze(2)?, &field.masked_indices)?.squeeze(1)?;
    let kind = gather_masked(
        &prior.kind.reshape((b, n, 1, v * k))?,
        &field.masked_indices,
    )?
    .reshape(((), v, k))?;
    let sq = (&field.target - &values)?.sqr()?.unsqueeze(2)?;
    let to_vec = |t: Tensor| -> Result<Vec<f64>> { Ok(t.to_dtype(DType::F64)?.to_vec1::<f64>()?) };
    let sums = to_vec(kind.broadcast_mul(&sq)?.sum((0, 1))?)?;
    let counts = to_vec(kind.sum((0, 1))?)?;
    Ok(Some((sums, counts)))
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;
    use crate::train::TrainConfig;

    #[test]
    fn the_loss_is_the_mean_of_the_masked_fields_terms() {
        let trainer = Trainer::new(TrainConfig::example()).unwrap();
        let model = &trainer.config().model;
        let (t, v, e) = (
            model.fields[0].num_tokens,
            model.fields[0].token_numel,
            model.ensemble,
        );
        let dev = Device::Cpu;
        let zeros = |dims: &[usize]| Tensor::zeros(dims, DType::F32, &dev).unwrap();
        // Predictions of zero; a field's masked tokens all hold `value`, so its MSE is value².
        let field = |masked: Vec<u32>, value: f32| FieldTensors {
            input: FieldInput {
                source: zeros(&[1, t, v]),
                token_info: zeros(&[1, t, 8]),
                pe: zeros(&[1, t, 1]),
                prior: None,
            },
            target: Tensor::full(value, (masked.len(), v), &dev).unwrap(),
            masked_indices: vec![masked],
        };
        let preds = vec![zeros(&[1, t, e, v]); model.fields.len()];
        let scalar = |l: &Tensor| l.to_scalar::<f32>().unwrap();

        let fields = vec![field(vec![0, 3], 2.0), field(vec![], 1.0)];
        let (loss, terms) = trainer.loss_per_field(&preds, &fields).unwrap();
        assert_eq!(terms, [Some(4.0), None]);
        assert_eq!(scalar(&loss), 4.0);
        assert_eq!(scalar(&trainer.loss(&preds, &fields).unwrap()), 4.0);

        let fields = vec![field(vec![1], 2.0), field(vec![0, 2], 1.0)];
        let (loss, terms) = trainer.loss_per_field(&preds, &fields).unwrap();
        assert_eq!(terms, [Some(4.0), Some(1.0)]);
        assert_eq!(scalar(&loss), 2.5);

        // No field masked: a zero loss and no terms.
        let fields = vec![field(vec![], 2.0), field(vec![], 1.0)];
        let (loss, terms) = trainer.loss_per_field(&preds, &fields).unwrap();
        assert_eq!(terms, [None, None]);
        assert_eq!(scalar(&loss), 0.0);

        let mut means = FieldMeans::new(2);
        means.add(&[Some(1.0), None]);
        means.add(&[Some(3.0), Some(5.0)]);
        means.add(&[None, None]);
        let names: Vec<_> = model.fields.iter().map(|f| f.name.clone()).collect();
        assert_eq!(
            means.means(model),
            [(names[0].clone(), 2.0), (names[1].clone(), 5.0)]
        );
        assert!(FieldMeans::new(2).means(model).is_empty());
    }

    /// A run's first batches set each field's `prior_error` to the RMS error of each kind of
    /// prior on its masked values (computed here value by value), the optimizer never touches
    /// it, and the loss then counts errors in its units.
    #[test]
    fn the_first_batch_measures_each_fields_prior_error() {
        let mut config = TrainConfig::example();
        // Per level 4 times × 2 latitudes (tokens (level, t, lat) in that order).
        config.model = config.model.with_temporal_prior([4, 2, 1]);
        let mut trainer = Trainer::new(config).unwrap();
        assert!(
            trainer
                .opt
                .vars()
                .iter()
                .all(|(name, _)| !name.ends_with(crate::tail::PRIOR_ERROR))
        );
        let model = trainer.config().model.clone();
        let b = 2;
        // Sample 0: token 2 between visible times (interpolated), 8 and 10 before the visible
        // 12 (one-sided); sample 1: 1, 3, 5, 7 every time of their point (climatology), and 12.
        let masked: Vec<Vec<u32>> = vec![vec![2, 8, 10], vec![1, 3, 5, 7, 12]];
        let fields: Vec<atmorep_proto::FieldBatch> = model
            .fields
            .iter()
            .enumerate()
            .map(|(f, spec)| {
                let (n, v) = (spec.num_tokens, spec.token_numel);
                let truth =
                    |i: usize| ((i * 7 + f * 3) % 11) as f32 * 0.1 + (i as f32 * 0.37).sin();
                let mut source: Vec<f32> = (0..b * n * v).map(truth).collect();
                let mut target = Vec::new();
                for (s, tokens) in masked.iter().enumerate() {
                    for &k in tokens {
                        let at = (s * n + k as usize) * v;
                        target.extend_from_slice(&source[at..at + v]);
                        source[at..at + v].fill(0.0);
                    }
                }
                atmorep_proto::FieldBatch {
                    name: spec.name.clone(),
                    source,
                    source_shape: [b, n, v],
                    target,
                    masked_indices: masked.clone(),
                    token_info: vec![2000.0; b * n * 8],
                    pe: vec![0.0; b * n * spec.pe_width],
                    pe_width: spec.pe_width,
                    windows: vec![
                        atmorep_proto::Window {
                            time_start: 0,
                            lat_start: 0,
                            lon_start: 0,
                            size: [4, 6, 4],
                        };
                        b
                    ],
                }
            })
            .collect();
        let batch = Batch {
            sample_ids: vec![0, 1],
            sample_epochs: vec![0, 0],
            fields,
            ..Default::default()
        };
        // Twice the same batch: sums over batches leave each RMS as it is.
        trainer
            .measure_prior_error(&[batch.clone(), batch.clone()])
            .unwrap();

        let tensors = batch_tensors(&batch, &model, DType::F32, &Device::Cpu).unwrap();
        let mut seen = [false; 3];
        for (f, (field, spec)) in tensors.iter().zip(&model.fields).enumerate() {
            let prior = field.input.prior.as_ref().unwrap();
            let values: Vec<Vec<Vec<f32>>> = prior.values.to_vec3().unwrap();
            let kind: Vec<f32> = prior.kind.flatten_all().unwrap().to_vec1().unwrap();
            let target: Vec<Vec<f32>> = field.target.to_vec2().unwrap();
            let (n, v) = (spec.num_tokens, spec.token_numel);
            let (mut sq, mut count) = ([0f64; 3], [0f64; 3]);
            let mut row = 0;
            for (s, tokens) in masked.iter().enumerate() {
                for &k in tokens {
                    let k = k as usize;
                    for j in 0..v {
                        let c = (0..3)
                            .find(|&c| kind[((s * n + k) * v + j) * 3 + c] == 1.0)
                            .expect("a masked value has a kind of prior");
                        let e = f64::from(target[row][j] - values[s][k][j]);
                        sq[c] += e * e;
                        count[c] += 1.0;
                    }
                    row += 1;
                }
            }
            let got: Vec<f32> = trainer.model().prior_error(f).unwrap().to_vec1().unwrap();
            for c in 0..3 {
                let want = if count[c] > 0.0 {
                    seen[c] = true;
                    (sq[c] / count[c]).sqrt().max(1e-6) as f32
                } else {
                    crate::tail::PRIOR_ERROR_DEFAULT[c] as f32
                };
                assert!(
                    (got[c] - want).abs() <= 1e-5 * want.max(1.0),
                    "field {f} kind {c}: {} vs {want}",
                    got[c]
                );
            }
        }
        assert!(seen.iter().all(|&s| s), "every kind occurs: {seen:?}");

        // The loss is the MSE in units of the measured errors: a prediction of the prior
        // itself scores (Σ_k n_k) / (values) = 1 per field.
        let preds: Vec<Tensor> = tensors
            .iter()
            .map(|f| f.input.prior.as_ref().unwrap().values.unsqueeze(2).unwrap())
            .collect();
        let (_, terms) = trainer.loss_per_field(&preds, &tensors).unwrap();
        for t in terms {
            assert!((t.unwrap() - 1.0).abs() < 1e-4, "{t:?}");
        }
    }
}
