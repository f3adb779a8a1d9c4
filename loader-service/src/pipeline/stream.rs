//! Batches of samples assembled ahead of the consumer by a background task: whole batches
//! reserve their share of a [`MemoryBudget`] before their samples are cut, a bounded number
//! are kept ready, and each carries the cursor that resumes the stream right after it.

use std::sync::Arc;

use futures::StreamExt;

use super::assemble::off_worker;
use super::epoch::EpochCursor;
use super::{MemoryBudget, Pipeline, PipelineError, Sample};
use crate::panic::Panicked;

/// What [`Pipeline::batches`] streams.
#[derive(Debug, Clone)]
pub struct BatchSpec {
    pub rank: u32,
    pub world: u32,
    /// Where to start (a resume cursor, or the start of an epoch).
    pub start: EpochCursor,
    /// Stop before this epoch; `None` streams forever.
    pub end_epoch: Option<u64>,
    pub batch_size: usize,
    /// Samples assembled at once.
    pub sample_concurrency: usize,
    /// Finished batches kept ready ahead of the consumer.
    pub prefetch_batches: usize,
    /// A budget shared with other streams for samples in flight and batches not yet consumed.
    pub memory: Option<MemoryBudget>,
}

/// One batch from [`Pipeline::batches`].
#[derive(Debug, Default)]
pub struct SampleBatch {
    pub samples: Vec<Sample>,
    /// The stream cursor after the batch's last sample: resuming there continues exactly.
    pub cursor_after: EpochCursor,
    /// The last batch of a finite stream.
    pub last: bool,
    /// This batch's share of the [`MemoryBudget`], released when the batch is dropped.
    pub reservation: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// Batches assembled ahead of the consumer by a background task; dropping it stops the task.
#[derive(Debug)]
pub struct PipelineStream {
    rx: tokio::sync::mpsc::Receiver<Result<SampleBatch, PipelineError>>,
    task: tokio::task::JoinHandle<()>,
}

impl PipelineStream {
    /// The next batch; `None` when the stream is finished.
    pub async fn next(&mut self) -> Option<Result<SampleBatch, PipelineError>> {
        self.rx.recv().await
    }
}

impl futures::Stream for PipelineStream {
    type Item = Result<SampleBatch, PipelineError>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx)
    }
}

impl Drop for PipelineStream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Pipeline {
    /// Batches of `spec.batch_size` samples of `rank`'s shard from `spec.start` on, assembled by a
    /// background task that keeps about `sample_concurrency` samples in flight (whole batches,
    /// at least one) and up to `prefetch_batches` finished batches ready. Dropping the stream stops
    /// the task. The stream ends after the last batch (flagged `last`) when an end epoch is set,
    /// and after the first error otherwise.
    pub fn batches(self: &Arc<Self>, spec: BatchSpec) -> Result<PipelineStream, PipelineError> {
        if spec.batch_size == 0 {
            return Err(PipelineError::Request("batch_size must be positive".into()));
        }
        let mut ids = self.ids(spec.rank, spec.world, spec.start)?;
        if let Some(end) = spec.end_epoch {
            ids = ids.with_end_epoch(end);
        }
        let (tx, rx) = tokio::sync::mpsc::channel(spec.prefetch_batches.max(1));
        let pipeline = self.clone();
        // A panic in the task itself (not in a sample) would otherwise close the channel, which
        // reads as the end of the stream: the consumer gets it as an error instead.
        let on_panic = tx.clone();
        let work = async move {
            let batch_bytes = pipeline.sample_bytes() * spec.batch_size as u64;
            let mut items = std::iter::from_fn(move || {
                let epoch = ids.cursor().epoch;
                ids.next().map(|(id, after)| (epoch, id, after))
            })
            .peekable();
            let batch_items = std::iter::from_fn(move || {
                let batch: Vec<_> = items.by_ref().take(spec.batch_size).collect();
                (!batch.is_empty()).then(|| (batch, items.peek().is_none()))
            });
            // Whole batches reserve their memory at once: a batch holding part of its share while
            // waiting for the rest could deadlock against other streams doing the same.
            let in_flight = spec.sample_concurrency.div_ceil(spec.batch_size).max(1);
            // Drawing ids builds each epoch's order (up to `max_samples_per_epoch` ids) when the
            // epoch begins: planning work, kept off the async worker like the samples' own.
            let batch_items = Box::pin(futures::stream::unfold(
                Some(batch_items),
                |items| async move {
                    let mut items = items?;
                    let (next, items) = off_worker(move || (items.next(), items)).await;
                    next.map(|batch| (batch, Some(items)))
                },
            ));
            if let Some(group) = pipeline.group_batches(&spec) {
                // Batches cut in groups: the group reserves its batches' memory at once and
                // hands its reservation to its last batch. The next group is cut while the last
                // one's batches go out, so that cutting and sending overlap: two groups live at
                // most (a turn each; under a budget, which holds two, their reservations too).
                let turns = Arc::new(tokio::sync::Semaphore::new(2));
                let mut groups = batch_items
                    .chunks(group)
                    .map(|group| {
                        let pipeline = pipeline.clone();
                        let memory = spec.memory.clone();
                        let turns = turns.clone();
                        async move {
                            let turn = turns
                                .acquire_owned()
                                .await
                                .expect("the turns are never closed");
                            let reservation = match &memory {
                                Some(budget) => {
                                    Some(budget.reserve(batch_bytes * group.len() as u64).await)
                                }
                                None => None,
                            };
                            let items: Vec<(u64, u64)> = group
                                .iter()
                                .flat_map(|(items, _)| items.iter().map(|&(e, id, _)| (e, id)))
                                .collect();
                            let mut samples = pipeline.cut_group(items).await?.into_iter();
                            let count = group.len();
                            let mut reservation = reservation;
                            let batches = group
                                .into_iter()
                                .enumerate()
                                .map(|(k, (items, last))| SampleBatch {
                                    samples: samples.by_ref().take(items.len()).collect(),
                                    cursor_after: items.last().expect("non-empty batch").2,
                                    last: last && spec.end_epoch.is_some(),
                                    reservation: if k + 1 == count {
                                        reservation.take()
                                    } else {
                                        None
                                    },
                                })
                                .collect::<Vec<_>>();
                            Ok::<_, PipelineError>((batches, turn))
                        }
                    })
                    .buffered(1);
                let (group_tx, mut group_rx) = tokio::sync::mpsc::channel(1);
                let cut = async move {
                    while let Some(group) = groups.next().await {
                        let failed = group.is_err();
                        if group_tx.send(group).await.is_err() || failed {
                            return;
                        }
                    }
                };
                let send = async move {
                    while let Some(group) = group_rx.recv().await {
                        match group {
                            Ok((batches, turn)) => {
                                for batch in batches {
                                    if tx.send(Ok(batch)).await.is_err() {
                                        return;
                                    }
                                }
                                drop(turn);
                            }
                            Err(e) => {
                                let _ = tx.send(Err(e)).await;
                                return;
                            }
                        }
                    }
                };
                // Sending ends the stream: once it stops (the consumer gone, an error sent),
                // nothing more is cut.
                let (cut, send) = (std::pin::pin!(cut), std::pin::pin!(send));
                if let futures::future::Either::Left(((), send)) =
                    futures::future::select(cut, send).await
                {
                    send.await;
                }
                return;
            }
            let mut batches = batch_items
                .map(|(items, last)| {
                    let pipeline = pipeline.clone();
                    let memory = spec.memory.clone();
                    async move {
                        let reservation = match &memory {
                            Some(budget) => Some(budget.reserve(batch_bytes).await),
                            None => None,
                        };
                        let cursor_after = items.last().expect("non-empty batch").2;
                        let tasks = items.into_iter().map(|(epoch, id, _)| {
                            let pipeline = pipeline.clone();
                            tokio::spawn(async move {
                                crate::panic::sample_hook(|| pipeline.dataset.url().to_string());
                                pipeline.sample(epoch, id).await
                            })
                        });
                        let mut samples = Vec::with_capacity(spec.batch_size);
                        for joined in futures::future::join_all(tasks).await {
                            let sample = match joined {
                                Ok(sample) => sample?,
                                Err(e) if e.is_panic() => {
                                    let payload = e.into_panic();
                                    return Err(Panicked::caught("sample task", &*payload).into());
                                }
                                // Cancelled: only when the runtime shuts down.
                                Err(e) => {
                                    return Err(PipelineError::Request(format!(
                                        "sample task cancelled: {e}"
                                    )));
                                }
                            };
                            samples.push(sample);
                        }
                        Ok::<_, PipelineError>(SampleBatch {
                            samples,
                            cursor_after,
                            last: last && spec.end_epoch.is_some(),
                            reservation,
                        })
                    }
                })
                .buffered(in_flight);
            while let Some(batch) = batches.next().await {
                let failed = batch.is_err();
                if tx.send(batch).await.is_err() || failed {
                    return;
                }
            }
        };
        let task = tokio::spawn(async move {
            if let Err(panicked) = crate::panic::contain("batch task", work).await {
                let _ = on_panic.send(Err(panicked.into())).await;
            }
        });
        Ok(PipelineStream { rx, task })
    }
}
