//! One `StreamBatches` call: a task that turns the pipeline's batches into wire parts and
//! queues them for tonic, holding each batch's share of the memory budget until tonic takes it,
//! and ending the stream with UNAVAILABLE when the server shuts down.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use atmorep_proto::pb;
use tokio::sync::OwnedSemaphorePermit;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use super::request::StreamRequest;
use super::wire::to_wire;
use super::{failed, status};
use crate::pipeline::{Pipeline, SampleBatch};
use crate::store::dataset::Dataset;

/// A reply and its batch's share of the memory budget.
type Reply = (Result<pb::Batch, Status>, Option<Arc<OwnedSemaphorePermit>>);

/// A reply queued for tonic. The stream's task keeps a handle on the slot, so that when the client
/// stops reading it can empty the slot — freeing the batch and its budget — although tonic still
/// holds the queue.
pub(super) struct Outgoing(Arc<Mutex<Option<Reply>>>);

impl Outgoing {
    fn new(
        reply: Result<pb::Batch, Status>,
        reservation: Option<Arc<OwnedSemaphorePermit>>,
    ) -> Self {
        Self(Arc::new(Mutex::new(Some((reply, reservation)))))
    }

    pub(super) fn error(status: Status) -> Self {
        Self::new(Err(status), None)
    }

    /// Replaces a reply not yet taken by `status`, dropping its batch and reservation.
    fn withdraw(slot: &Mutex<Option<Reply>>, status: Status) {
        let mut slot = slot.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if slot.is_some() {
            *slot = Some((Err(status), None));
        }
    }
}

/// The replies of one `StreamBatches` call. A batch's reservation ends when tonic takes its last
/// part: tonic encodes a message in the same poll that takes it, so that is when the batch's
/// memory is freed, and not before (a queued batch waiting for a slow client still counts).
pub struct Replies(pub(super) ReceiverStream<Outgoing>);

impl std::fmt::Debug for Replies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replies").finish_non_exhaustive()
    }
}

impl futures::Stream for Replies {
    type Item = Result<pb::Batch, Status>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        std::pin::Pin::new(&mut self.0).poll_next(cx).map(|next| {
            next.map(|Outgoing(slot)| {
                let taken = slot
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .take();
                match taken {
                    Some((reply, reservation)) => {
                        drop(reservation);
                        reply
                    }
                    None => Err(Status::internal("stream: a reply was taken twice")),
                }
            })
        })
    }
}

pub(super) struct StreamTask {
    pub(super) pipeline: Arc<Pipeline>,
    pub(super) batches: crate::pipeline::PipelineStream,
    pub(super) tx: tokio::sync::mpsc::Sender<Outgoing>,
    pub(super) parsed: StreamRequest,
    pub(super) max_bytes: usize,
    pub(super) dataset: Arc<Dataset>,
    pub(super) shutdown: tokio::sync::watch::Receiver<bool>,
    /// How long a part may wait for the client to take it before the stream is dropped.
    pub(super) idle_timeout: Duration,
    /// This stream's place among the server's `max_streams`, given back when the task ends.
    pub(super) _slot: OwnedSemaphorePermit,
}

/// Sends one stream's batches until it ends, fails, the client leaves or the server stops.
pub(super) async fn serve_stream(mut task: StreamTask) {
    let labels = [("dataset", task.parsed.dataset.clone())];
    let mut sequence = 0u64;
    // The last part handed to tonic's queue and when, until the client takes it.
    let mut queued: Option<Queued> = None;
    metrics::gauge!("atmorep_streams_active").increment(1.0);
    loop {
        let next = tokio::select! {
            next = task.batches.next() => next,
            _ = async { task.shutdown.wait_for(|stop| *stop).await.map(|_| ()) } => {
                let _ = task.tx.send(Outgoing::error(Status::unavailable("the loader is shutting down"))).await;
                break;
            }
            // Waiting for a batch that waits for budget this stream's unread batch holds.
            () = stalled(queued.as_ref(), task.idle_timeout) => {
                drop_stalled(queued.as_ref(), task.idle_timeout, sequence);
                return;
            }
        };
        let Some(next) = next else {
            if sequence == 0 && task.parsed.end_epoch.is_some() {
                // Resumed at the very end: say so, or the client would take silence for a loss.
                let mut empty = to_wire(
                    &task.pipeline,
                    Vec::new(),
                    0,
                    task.parsed.resume,
                    true,
                    task.parsed.dtype,
                    task.max_bytes,
                );
                let _ = task.tx.send(Outgoing::new(Ok(empty.remove(0)), None)).await;
            }
            break;
        };
        let SampleBatch {
            samples,
            cursor_after,
            last,
            reservation,
        } = match next {
            Ok(batch) => batch,
            Err(e) => {
                let status = failed(status::from_pipeline(&e));
                let _ = task.tx.send(Outgoing::error(status)).await;
                break;
            }
        };
        let n = samples.len() as u64;
        let message = to_wire(
            &task.pipeline,
            samples,
            sequence,
            cursor_after,
            last,
            task.parsed.dtype,
            task.max_bytes,
        );
        let bytes: usize = message
            .iter()
            .flat_map(|m| &m.fields)
            .flat_map(|f| [&f.source, &f.target, &f.token_info, &f.pe])
            .map(|t| t.as_ref().map_or(0, |t| t.data.len()))
            .sum();
        let waiting = Instant::now();
        // Every part keeps the batch's share of the budget until tonic takes it for encoding.
        let reservation = reservation.map(Arc::new);
        for part in message {
            let outgoing = Outgoing::new(Ok(part), reservation.clone());
            let slot = outgoing.0.clone();
            let sent = tokio::select! {
                sent = task.tx.send(outgoing) => Some(sent.is_ok()),
                () = stalled(queued.as_ref(), task.idle_timeout) => None,
            };
            match sent {
                Some(true) => queued = Some((slot, Instant::now())),
                Some(false) => {
                    tracing::info!(batches = sequence, "client went away");
                    metrics::gauge!("atmorep_streams_active").decrement(1.0);
                    return;
                }
                // The part being sent went with the send.
                None => {
                    drop_stalled(queued.as_ref(), task.idle_timeout, sequence);
                    return;
                }
            }
        }
        // Time a finished batch waited for the client: this stream's lag.
        metrics::histogram!("atmorep_stream_send_wait_seconds", &labels)
            .record(waiting.elapsed().as_secs_f64());
        metrics::counter!("atmorep_samples_served_total", &labels).increment(n);
        metrics::counter!("atmorep_bytes_served_total", &labels).increment(bytes as u64);
        record_dataset_gauges(&task.dataset, &labels);
        sequence += 1;
        if last {
            break;
        }
    }
    tracing::info!(batches = sequence, "stream closed");
    metrics::gauge!("atmorep_streams_active").decrement(1.0);
}

/// A part in tonic's queue and when it was queued.
type Queued = (Arc<Mutex<Option<Reply>>>, Instant);

/// Resolves once `queued` has waited `idle` for the client; never while nothing waits. Tonic's
/// queue holds one part, so a part still there after `idle` means the client took nothing
/// since it was queued.
async fn stalled(queued: Option<&Queued>, idle: Duration) {
    let Some((slot, since)) = queued else {
        return std::future::pending().await;
    };
    tokio::time::sleep_until((*since + idle).into()).await;
    let waiting = slot
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .is_some();
    if !waiting {
        std::future::pending::<()>().await;
    }
}

/// Ends a stream whose client stopped reading. Its unread part still waits in tonic's queue,
/// which only the client's reading would drain: emptying it frees the batch and its budget now,
/// and the stream's pipeline goes when the task returns (docs/operations.md, "Connections and
/// streams").
fn drop_stalled(queued: Option<&Queued>, idle: Duration, sequence: u64) {
    let seconds = idle.as_secs();
    let status = Status::unavailable(format!(
        "stream dropped: the client took nothing for {seconds} s (stream_idle_timeout_s = \
         {seconds}); resume from the last cursor"
    ));
    if let Some((slot, _)) = queued {
        Outgoing::withdraw(slot, status);
    }
    tracing::warn!(
        batches = sequence,
        "stream dropped: the client took nothing for stream_idle_timeout_s = {seconds}"
    );
    metrics::counter!("atmorep_streams_idle_dropped_total").increment(1);
    metrics::gauge!("atmorep_streams_active").decrement(1.0);
}

fn record_dataset_gauges(dataset: &Dataset, labels: &[(&'static str, String); 1]) {
    let stats = dataset.cache().stats();
    let lookups = stats.hits + stats.misses;
    if lookups > 0 {
        metrics::gauge!("atmorep_cache_hit_ratio").set(stats.hits as f64 / lookups as f64);
    }
    metrics::gauge!("atmorep_cache_resident_bytes").set(stats.resident_bytes as f64);
    let counters = &dataset.counters;
    let decoded = counters.decoded_bytes.load(Ordering::Relaxed);
    let delivered = counters.delivered_bytes.load(Ordering::Relaxed);
    if delivered > 0 {
        metrics::gauge!("atmorep_read_amplification", labels)
            .set(decoded as f64 / delivered as f64);
    }
    metrics::gauge!("atmorep_decode_seconds_total", labels)
        .set(counters.decode_nanos.load(Ordering::Relaxed) as f64 * 1e-9);
}
