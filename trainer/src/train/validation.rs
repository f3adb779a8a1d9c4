//! Validation: the mean loss, overall and per field, over the first batches of every task's
//! stream on the validation split — the same batches every time, touching no state of the run.

use atmorep_proto::client::LoaderClient;
use candle_core::DType;

use super::Trainer;
use super::objective::FieldMeans;
use super::run::next_batch;
use crate::error::Result;

impl Trainer {
    /// The mean loss over the first `validation.batches` batches of every task's validation
    /// stream (the same batches every time). Touches no state of the run. Give it a client
    /// whose connection carries no other stream that is not being read (see [`Self::run`]).
    pub async fn validate(&self, client: &LoaderClient) -> Result<f64> {
        Ok(self.validate_per_field(client).await?.loss)
    }

    /// [`Self::validate`], with each field's loss: the mean of its terms over the validation
    /// batches in which it had masked tokens.
    pub async fn validate_per_field(&self, client: &LoaderClient) -> Result<Validation> {
        Ok(self.validate_counting(client).await?.0)
    }

    /// [`Self::validate_per_field`] and the reconnects its streams needed.
    pub(super) async fn validate_counting(
        &self,
        client: &LoaderClient,
    ) -> Result<(Validation, u64)> {
        let mut reconnects = 0;
        let mut sum = 0.0;
        let mut n = 0u64;
        let mut per_field = FieldMeans::new(self.config.model.fields.len());
        for (i, task) in self.config.tasks().iter().enumerate() {
            let request = self.shard(self.config.validation_request(i));
            let mut stream = client.stream(request.to_proto());
            let what = format!("validation `{}`", task.name);
            let mut delivered = 0;
            for _ in 0..self.config.validation.batches {
                let batch = next_batch(&mut stream, &what, &mut delivered).await?;
                let (loss, fields, _) = self.forward_loss(&batch)?;
                stream.recycle(batch);
                sum += f64::from(loss.to_dtype(DType::F32)?.to_scalar::<f32>()?);
                per_field.add(&fields);
                n += 1;
            }
            reconnects += stream.reconnects();
        }
        // The ranks' parts of each combined batch's loss and terms add up to them.
        let mut sums = vec![sum];
        sums.extend(per_field.0.iter().map(|(s, _)| *s));
        self.collective.all_reduce_sum_f64(&mut sums)?;
        sum = sums[0];
        for (acc, s) in per_field.0.iter_mut().zip(&sums[1..]) {
            acc.0 = *s;
        }
        let validation = Validation {
            loss: sum / n.max(1) as f64,
            fields: per_field.means(&self.config.model),
        };
        Ok((validation, reconnects))
    }
}

/// What a validation measured.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Validation {
    /// The mean loss over the validation batches.
    pub loss: f64,
    /// Per field with masked tokens in some batch, in the model's field order, the mean of its
    /// loss terms over those batches.
    pub fields: Vec<(String, f64)>,
}
