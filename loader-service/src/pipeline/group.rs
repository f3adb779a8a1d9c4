//! Cutting a group of samples together: a stream whose batches cover a time block cuts the
//! block's samples in one pass over its chunks ([`Dataset::read_group`]), each blosc block
//! decoded once into the core's cache and every sample's rows cut from it there, instead of
//! decoding whole chunks into the chunk cache for each sample to copy from. Masks, token info
//! and encodings are then added per sample exactly as on the per-sample path, so a sample is the
//! same bits either way. Fields the group read cannot serve (blurred, normalized per grid point,
//! other codecs, remote stores) are cut per sample beside it; a group read that fails is redone
//! sample by sample, which fills missing chunks and reports errors as it always does.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use futures::{StreamExt, TryStreamExt};
use rayon::prelude::*;

use super::assemble::Cut;
use super::epoch::SampleId;
use super::{BatchSpec, FieldSample, Normalization, Pipeline, PipelineError, Sample};
use crate::store::decode::run_on_rayon;
use crate::store::group_read::FieldReads;
use crate::store::hyperslab::Hyperslab;

/// Samples cut at once by the per-sample path when a group falls back to it.
const FALLBACK_CONCURRENCY: usize = 16;

impl Pipeline {
    /// Turns group cutting on (the default) or off: off, every sample is cut on its own.
    pub fn set_group_cut(&self, on: bool) {
        self.group_cut.store(on, Ordering::Relaxed);
    }

    /// How many batches of a stream of `spec` are cut as one group; `None` cuts sample by
    /// sample. A group covers a time block's samples (fewer where the memory budget cannot hold
    /// them twice); a group of less than half a block would decode its chunks' blocks more
    /// often than the per-sample path, whose chunk cache keeps them for the block.
    pub(super) fn group_batches(&self, spec: &BatchSpec) -> Option<usize> {
        if !self.group_cut.load(Ordering::Relaxed)
            || self.tiling.is_some()
            || self.config.buffer_blocks != 1
            || !(0..self.fields.len()).any(|i| self.groupable(i))
        {
            return None;
        }
        let per_block = self.config.samples_per_block as usize;
        let mut batches = per_block.div_ceil(spec.batch_size);
        if let Some(budget) = &spec.memory {
            let batch_bytes = self.sample_bytes() * spec.batch_size as u64;
            batches = batches.min((budget.total_bytes() / 2 / batch_bytes.max(1)) as usize);
        }
        (batches >= 1 && 2 * batches * spec.batch_size >= per_block).then_some(batches)
    }

    /// Whether field `i` is read by the group read.
    fn groupable(&self, i: usize) -> bool {
        let field = &self.fields[i];
        field.blur.is_none()
            && matches!(
                field.config.normalization,
                Normalization::Global | Normalization::None
            )
            && self
                .dataset
                .variable(&field.config.name)
                .is_ok_and(|v| self.dataset.group_readable(v, &field.layout))
    }

    /// Cuts samples `items` ((epoch, id) in stream order) together.
    pub(super) async fn cut_group(
        self: &Arc<Self>,
        items: Vec<(u64, SampleId)>,
    ) -> Result<Vec<Sample>, PipelineError> {
        let windows = items
            .iter()
            .map(|&(epoch, id)| self.windows(epoch, id))
            .collect::<Result<Vec<_>, _>>()?;
        let grouped: Vec<usize> = (0..self.fields.len())
            .filter(|&i| self.groupable(i))
            .collect();
        // Each grouped field's windows and plane transforms, per sample.
        let mut reads = Vec::with_capacity(grouped.len());
        for &i in &grouped {
            let field = &self.fields[i];
            let per_sample = windows
                .iter()
                .map(|w| {
                    let window = &w[i];
                    Ok((
                        self.field_slab(field, window)?,
                        self.plane_affine(field, window)?,
                    ))
                })
                .collect::<Result<Vec<_>, PipelineError>>()?;
            reads.push(per_sample);
        }
        let outputs: Vec<Vec<Vec<f32>>> = reads
            .iter()
            .map(|per_sample| {
                per_sample
                    .iter()
                    .map(|(slab, _)| self.pool.take_len(slab.len()))
                    .collect()
            })
            .collect();
        let pipeline = self.clone();
        let grouped_fields = grouped.clone();
        let (outputs, read) = run_on_rayon(move || {
            let mut outputs = outputs;
            let ds = &pipeline.dataset;
            let fields = grouped_fields
                .iter()
                .zip(&reads)
                .map(|(&i, per_sample)| {
                    let field = &pipeline.fields[i];
                    Ok(FieldReads {
                        variable: ds.variable(&field.config.name)?,
                        layout: &field.layout,
                        windows: per_sample
                            .iter()
                            .map(|(slab, affine)| (slab.clone(), affine.as_deref()))
                            .collect(),
                    })
                })
                .collect::<crate::error::Result<Vec<_>>>();
            let read = fields.and_then(|fields| ds.read_group(&fields, &mut outputs));
            (outputs, read)
        })
        .await?;
        if let Err(e) = read {
            tracing::debug!(error = %e, "group read failed: cutting its samples one by one");
            for buffer in outputs.into_iter().flatten() {
                self.return_buffer(buffer);
            }
            let jobs: Vec<_> = items
                .into_iter()
                .map(|(epoch, id)| {
                    let pipeline = self.clone();
                    async move { pipeline.sample(epoch, id).await }
                })
                .collect();
            return futures::stream::iter(jobs)
                .buffered(FALLBACK_CONCURRENCY)
                .try_collect()
                .await;
        }
        // Masks, token info and encodings of the grouped fields, on the rayon pool.
        let mut cuts = Vec::with_capacity(items.len() * grouped.len());
        for (g, per_sample) in outputs.into_iter().enumerate() {
            for (s, tokens) in per_sample.into_iter().enumerate() {
                let (epoch, id) = items[s];
                let cut = Cut {
                    pipeline: self.shared(),
                    field: grouped[g],
                    epoch,
                    id,
                    window: windows[s][grouped[g]],
                };
                cuts.push((s, g, cut, tokens));
            }
        }
        let finished: Vec<(usize, usize, Result<FieldSample, PipelineError>)> =
            run_on_rayon(move || {
                cuts.into_par_iter()
                    .map(|(s, g, cut, tokens)| (s, g, cut.finish(tokens)))
                    .collect()
            })
            .await?;
        let mut fields: Vec<Vec<Option<FieldSample>>> = (0..items.len())
            .map(|_| (0..self.fields.len()).map(|_| None).collect())
            .collect();
        for (s, g, field) in finished {
            fields[s][grouped[g]] = Some(field?);
        }
        // The other fields, sample by sample.
        let others: Vec<usize> = (0..self.fields.len())
            .filter(|i| !grouped.contains(i))
            .collect();
        if !others.is_empty() {
            let mut jobs = Vec::with_capacity(items.len() * others.len());
            for (s, &(epoch, id)) in items.iter().enumerate() {
                for &i in &others {
                    let pipeline = self.clone();
                    let window = windows[s][i];
                    jobs.push(async move {
                        let field = &pipeline.fields[i];
                        let sample = pipeline
                            .field_sample(epoch, id, i as u32, field, window)
                            .await?;
                        Ok::<_, PipelineError>((s, i, sample))
                    });
                }
            }
            let cut: Vec<_> = futures::stream::iter(jobs)
                .buffered(FALLBACK_CONCURRENCY)
                .try_collect()
                .await?;
            for (s, i, sample) in cut {
                fields[s][i] = Some(sample);
            }
        }
        Ok(items
            .iter()
            .zip(fields)
            .map(|(&(epoch, id), fields)| Sample {
                id,
                epoch,
                fields: fields
                    .into_iter()
                    .map(|f| f.expect("every field of every sample is cut"))
                    .collect(),
            })
            .collect())
    }

    /// The window of `field` a sample reads, as a hyperslab.
    pub(super) fn field_slab(
        &self,
        field: &super::prepare::PreparedField,
        window: &super::sampler::FieldWindow,
    ) -> Result<Hyperslab, PipelineError> {
        let [wt, wy, wx] = window.size;
        let name = &field.config.name;
        let levels = if self.dataset.variable(name)?.has_level() {
            field.level_indices.clone()
        } else {
            vec![]
        };
        Ok(Hyperslab {
            variable: name.clone(),
            time: window.time_start..window.time_start + wt,
            levels,
            lat: window.lat_start..window.lat_start + wy,
            lon_start: window.lon_start,
            lon_len: wx,
        })
    }
}
