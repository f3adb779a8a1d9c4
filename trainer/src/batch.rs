//! From the loader's decoded batches (`atmorep_proto::Batch`) to the model's tensors.

use atmorep_proto::{Batch, FieldBatch, TOKEN_INFO_LEN};
use candle_core::{DType, Device, Tensor};

use crate::config::ModelConfig;
use crate::error::{Result, input_err};
use crate::model::FieldInput;

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
    /// Copies one field of a batch into tensors of `dtype` on `device`.
    pub fn from_field_batch(fb: &FieldBatch, dtype: DType, device: &Device) -> Result<Self> {
        fb.validate()
            .map_err(|e| input_err(format!("batch field `{}`", fb.name), e.to_string()))?;
        let t = |data: &[f32], dims: &[usize]| -> Result<Tensor> {
            Ok(Tensor::from_slice(data, dims, device)?.to_dtype(dtype)?)
        };
        Ok(Self {
            input: FieldInput {
                source: t(&fb.source, &fb.source_shape)?,
                token_info: t(&fb.token_info, &fb.token_info_shape())?,
                pe: t(&fb.pe, &fb.pe_shape())?,
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
            FieldTensors::from_field_batch(fb, dtype, device)
        })
        .collect()
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
}
