//! The training loop: per step, a task per micro-batch, batches from each task's stream,
//! forward and backward passes, the gradients summed over the ranks, clipping and AdamW; then
//! validation, metrics and checkpoints at their cadence.

use std::time::Instant;

use atmorep_proto::Batch;
use atmorep_proto::client::{LoaderClient, LoaderStream};
use atmorep_proto::request::RequestConfig;
use candle_core::{DType, Tensor};
use rand::Rng;

use super::objective::FieldMeans;
use super::{ForwardOnly, RunOptions, RunSummary, Trainer};
use crate::config::Prior;
use crate::error::{Error, Result};
use crate::metrics_log::{self, StepRecord};
use crate::optim::Grads;

impl Trainer {
    /// Sets every rank's weights to rank 0's, so a data-parallel run starts from one model
    /// whatever each rank initialized or loaded.
    fn broadcast_weights(&self) -> Result<()> {
        if self.collective.world_size() == 1 {
            return Ok(());
        }
        let vars = self.opt.vars();
        let flat: Vec<Tensor> = vars
            .iter()
            .map(|(_, v)| v.as_tensor().flatten_all())
            .collect::<candle_core::Result<_>>()?;
        let flat = self
            .collective
            .broadcast_from_root(&Tensor::cat(&flat, 0)?)?;
        let mut offset = 0;
        for (_, var) in vars {
            let n = var.elem_count();
            var.set(&flat.narrow(0, offset, n)?.reshape(var.dims())?)?;
            offset += n;
        }
        Ok(())
    }

    /// Sums the accumulated gradients over the ranks: one all-reduce of one flat buffer holding
    /// every gradient (zeros where a rank has none) and, per variable, how many ranks had one;
    /// a variable no rank had a gradient for keeps none, as in one process.
    fn all_reduce_grads(&self, acc: &mut Grads) -> Result<()> {
        if self.collective.world_size() == 1 {
            return Ok(());
        }
        let vars = self.opt.vars();
        acc.0.resize(vars.len(), None);
        let mut parts = Vec::with_capacity(vars.len() + 1);
        for ((_, var), g) in vars.iter().zip(&acc.0) {
            parts.push(match g {
                Some(g) => g.flatten_all()?.to_dtype(self.dtype)?,
                None => Tensor::zeros(var.elem_count(), self.dtype, &self.device)?,
            });
        }
        let has: Vec<f32> = acc
            .0
            .iter()
            .map(|g| f32::from(u8::from(g.is_some())))
            .collect();
        parts.push(Tensor::from_vec(has, vars.len(), &self.device)?.to_dtype(self.dtype)?);
        let summed = self.collective.all_reduce_sum(&Tensor::cat(&parts, 0)?)?;
        let total: usize = vars.iter().map(|(_, v)| v.elem_count()).sum();
        let had = summed
            .narrow(0, total, vars.len())?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?;
        let mut offset = 0;
        for (((_, var), g), had) in vars.iter().zip(&mut acc.0).zip(had) {
            let n = var.elem_count();
            *g = if had > 0.0 {
                Some(summed.narrow(0, offset, n)?.reshape(var.dims())?)
            } else {
                None
            };
            offset += n;
        }
        Ok(())
    }
    /// `request` as this rank streams it: its own shard of a data-parallel run's layout.
    pub(super) fn shard(&self, mut request: RequestConfig) -> RequestConfig {
        if self.collective.world_size() > 1 {
            request.rank = self.collective.rank();
        }
        request
    }

    fn pick_task(&mut self, weights: &[f64]) -> usize {
        let total: f64 = weights.iter().sum();
        let mut x = self.rng.random::<f64>() * total;
        for (i, w) in weights.iter().enumerate() {
            if x < *w {
                return i;
            }
            x -= w;
        }
        weights.len() - 1
    }

    /// Trains until `opts.stop_at` (or the config's `steps`), pulling batches from `client`.
    pub async fn run(&mut self, client: &LoaderClient, opts: &RunOptions) -> Result<RunSummary> {
        let stop = opts.stop_at.unwrap_or(self.config.steps);
        let tasks = self.config.tasks();
        let weights: Vec<f64> = tasks.iter().map(|t| t.weight).collect();
        // One HTTP/2 connection per stream. A stream the loop is not reading keeps up to its
        // flow-control window of batches in the transport, and streams on one connection share
        // the connection's window: two idle task streams of small batches filled it and the
        // validation stream, opened on the same connection, never received a byte.
        let mut streams = Vec::with_capacity(tasks.len());
        for i in 0..tasks.len() {
            let mut r = self.shard(self.config.task_request(i));
            r.resume = self.cursors[i];
            streams.push(own_connection(client).await?.stream(r.to_proto()));
        }
        if self.step() == 0 && self.config.model.prior == Prior::Temporal {
            // The first batch of every task, on streams of their own: the run's streams and
            // cursors stay as they were.
            let mut first = Vec::with_capacity(tasks.len());
            for (i, task) in tasks.iter().enumerate() {
                let r = self.shard(self.config.task_request(i));
                let mut stream = own_connection(client).await?.stream(r.to_proto());
                first.push(next_batch(&mut stream, &task.name, &mut 0).await?);
            }
            self.measure_prior_error(&first)?;
        }
        let validation_client = own_connection(client).await?;
        let mut delivered = vec![0u64; tasks.len()];
        self.broadcast_weights()?;
        let root = self.collective.rank() == 0;
        let progress = opts.progress.as_deref().filter(|_| root);
        if let Some(p) = progress {
            p.start(self.step(), stop);
        }
        let mut summary = RunSummary::default();
        let mut unwritten: Vec<StepRecord> = Vec::new();
        let accumulation = self.config.optimizer.accumulation;
        let mut saved_at = None;
        // Reconnects of the validation streams, which end with each validation.
        let mut validation_reconnects = 0;
        let mut last_batch = None;

        while self.step() < stop {
            let started = Instant::now();
            let step = self.step();
            let lr = self.config.optimizer.lr_at(step, self.config.steps);
            let mut acc = Grads::default();
            let mut record = StepRecord {
                step: step + 1,
                tasks: String::new(),
                loss: 0.0,
                lr,
                grad_norm: 0.0,
                tokens: 0,
                step_s: 0.0,
                data_wait_s: 0.0,
                forward_s: 0.0,
                backward_s: 0.0,
                optimizer_s: 0.0,
                val_loss: None,
                field_losses: Vec::new(),
                val_field_losses: Vec::new(),
            };
            let mut names = Vec::with_capacity(accumulation);
            let mut per_field = FieldMeans::new(self.config.model.fields.len());
            for _ in 0..accumulation {
                let task = self.pick_task(&weights);
                names.push(tasks[task].name.as_str());
                let t = Instant::now();
                let batch =
                    next_batch(&mut streams[task], &tasks[task].name, &mut delivered[task]).await?;
                record.data_wait_s += t.elapsed().as_secs_f64();

                let t = Instant::now();
                let (loss, fields, tokens) = self.forward_loss(&batch)?;
                record.loss += f64::from(loss.to_dtype(DType::F32)?.to_scalar::<f32>()?);
                per_field.add(&fields);
                record.tokens += tokens;
                record.forward_s += t.elapsed().as_secs_f64();

                let t = Instant::now();
                let store = loss.backward()?;
                acc.accumulate(Grads::from_store(
                    &store,
                    self.opt.vars(),
                    1.0 / accumulation as f64,
                )?)?;
                record.backward_s += t.elapsed().as_secs_f64();
                self.cursors[task] = Some(batch.cursor_after);
                if opts.forward_passes > 0 && step + 1 == stop {
                    last_batch = Some(batch);
                } else {
                    streams[task].recycle(batch);
                }
            }
            // The combined batch's loss, terms and tokens: the ranks' parts add up to them.
            let mut sums = vec![record.loss, record.tokens as f64];
            sums.extend(per_field.0.iter().map(|(sum, _)| *sum));
            self.collective.all_reduce_sum_f64(&mut sums)?;
            record.loss = sums[0] / accumulation as f64;
            record.tokens = sums[1] as u64;
            for (acc, sum) in per_field.0.iter_mut().zip(&sums[2..]) {
                acc.0 = *sum;
            }
            record.field_losses = per_field.means(&self.config.model);
            record.tasks = names.join("+");

            let t = Instant::now();
            self.all_reduce_grads(&mut acc)?;
            record.grad_norm = acc.clip(self.config.optimizer.grad_clip_norm)?;
            self.opt.step(&acc, lr)?;
            record.optimizer_s = t.elapsed().as_secs_f64();
            record.step_s = started.elapsed().as_secs_f64();

            let done = self.step();
            let every = self.config.validation.every;
            if every > 0 && done.is_multiple_of(every) {
                let (v, reconnects) = self.validate_counting(&validation_client).await?;
                validation_reconnects += reconnects;
                record.val_loss = Some(v.loss);
                record.val_field_losses = v.fields;
            }
            record.record();
            let reconnects =
                validation_reconnects + streams.iter().map(LoaderStream::reconnects).sum::<u64>();
            if reconnects > summary.reconnects {
                // The client logs each failed call; the counter says the run went on past them.
                metrics::counter!("atmorep_train_loader_reconnects_total")
                    .increment(reconnects - summary.reconnects);
                summary.reconnects = reconnects;
            }
            if let Some(p) = progress {
                p.step(&record);
            }
            summary.steps.push(record.clone());
            unwritten.push(record);

            let every = self.config.checkpoint.every;
            if let Some(out) = &opts.out
                && ((every > 0 && done.is_multiple_of(every)) || done == stop)
            {
                summary.checkpoint = self.save_checkpoint_all_ranks(out)?;
                if root {
                    summary
                        .metrics_files
                        .extend(metrics_log::write_steps(out, &unwritten)?);
                }
                unwritten.clear();
                saved_at = Some(done);
            }
        }
        if let Some(out) = &opts.out
            && saved_at != Some(self.step())
        {
            // Nothing to train (already at `stop`): still leave a checkpoint of where it stands.
            summary.checkpoint = self.save_checkpoint_all_ranks(out)?;
            if root {
                summary
                    .metrics_files
                    .extend(metrics_log::write_steps(out, &unwritten)?);
            }
        }
        if let Some(batch) = last_batch {
            summary.forward_only = Some(self.time_forward(&batch, opts.forward_passes)?);
        }
        if let Some(p) = progress {
            p.finish();
        }
        Ok(summary)
    }
}

impl Trainer {
    /// `passes` forward passes alone over `batch`, after one untimed (as [`Self::run`]'s own
    /// steps, the first of a kind fills caches).
    fn time_forward(&self, batch: &Batch, passes: usize) -> Result<ForwardOnly> {
        let (loss, _, tokens_per_pass) = self.forward_loss(batch)?;
        drop(loss);
        let started = Instant::now();
        for _ in 0..passes {
            let (loss, _, _) = self.forward_loss(batch)?;
            // The value, as eval reads it: the pass is not done until the loss is.
            loss.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        }
        Ok(ForwardOnly {
            passes,
            tokens_per_pass,
            seconds: started.elapsed().as_secs_f64(),
        })
    }
}

/// A client like `client` on a connection of its own.
async fn own_connection(client: &LoaderClient) -> Result<LoaderClient> {
    Ok(LoaderClient::connect(client.config().clone()).await?)
}

/// The next batch with samples (a finite stream's closing message may have none).
pub(super) async fn next_batch(
    stream: &mut LoaderStream,
    what: &str,
    delivered: &mut u64,
) -> Result<Batch> {
    loop {
        match stream.next().await {
            Some(Ok(batch)) if batch.is_empty() && !batch.end_of_stream => continue,
            Some(Ok(batch)) if batch.is_empty() => break,
            Some(Ok(batch)) => {
                *delivered += 1;
                return Ok(batch);
            }
            Some(Err(e)) => return Err(e.into()),
            None => break,
        }
    }
    Err(Error::StreamEnded {
        what: what.to_string(),
        batches: *delivered,
    })
}
