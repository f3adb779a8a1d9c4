//! A stream of batches: the background task that reads `StreamBatches`, reassembles and
//! decodes batches into a bounded prefetch channel and resumes after a lost call (see the
//! [module documentation](super)), the striped variant's sub-streams and merge, and the
//! [`LoaderStream`] the consumer reads.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};

use prost::Message;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tonic::Status;
use tonic::transport::{Channel, Endpoint};

use super::retry::Retry;
use super::stripe::{Accepted, Stripe, StripeError, sub_shard};
use super::transport::{Grpc, Shared};
use super::{ClientError, is_retryable};
use crate::batch::{Batch, BatchAssembler, StreamCursor};
use crate::pb;
use crate::pool::BufferPool;

/// Counters of one stream, shared with its background task.
#[derive(Debug, Default)]
struct Counters {
    reconnects: AtomicU64,
    bytes_received: AtomicU64,
    messages_received: AtomicU64,
    batches_received: AtomicU64,
    discarded_messages: AtomicU64,
}

/// A snapshot of a [`LoaderStream`]'s counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StreamStats {
    /// Calls re-issued after a lost stream (or a failed first attempt).
    pub reconnects: u64,
    /// Encoded size of all messages received (before gRPC decompression is accounted).
    pub bytes_received: u64,
    /// Messages (parts) received.
    pub messages_received: u64,
    /// Complete batches received (delivered or waiting in the prefetch buffer).
    pub batches_received: u64,
    /// Batches handed to the consumer.
    pub batches_delivered: u64,
    /// Parts of batches cut short by a lost stream, dropped (the resumed call resends them).
    pub discarded_messages: u64,
}

/// How one call of `StreamBatches` ended.
enum Outcome {
    /// The stream is complete (`end_of_stream` or `end_epoch` reached).
    Finished,
    /// The consumer dropped the stream.
    ReceiverGone,
    /// Not worth retrying.
    Fatal(ClientError),
    /// The call failed or ended early; retry if the status says so.
    Lost(Status),
}

/// Per-stream state that survives reconnections.
struct StreamState {
    request: pb::BatchRequest,
    /// Stop once the cursor reaches this epoch (training mode only: tiles are one pass).
    end_epoch: Option<u64>,
    /// The cursor after the last complete batch, or the request's start.
    resume: Option<pb::Cursor>,
    assembler: BatchAssembler,
    tx: mpsc::Sender<Result<Batch, ClientError>>,
    counters: Arc<Counters>,
}

impl StreamState {
    fn finished(&self) -> bool {
        matches!((self.end_epoch, self.resume), (Some(end), Some(c)) if c.epoch >= end)
    }
}

/// Which endpoint a stream starts on and where it goes after a failure.
#[derive(Debug, Clone)]
enum Route {
    /// The client's current endpoint, shared by all its calls: a failure moves them all on.
    Shared,
    /// Sub-stream `k` of a stripe: starts on endpoint `k` and moves on by itself, so one dead
    /// loader does not push the other sub-streams off their live ones.
    ///
    /// It has a connection of its own to every endpoint (opened lazily). On a shared HTTP/2
    /// connection a sub-stream that failed over onto another loader would sit behind that
    /// loader's own sub-stream, which the round-robin merge holds back while it waits for the
    /// failed-over one: the held-back stream's unread bytes fill the connection window and
    /// neither can move again.
    Stripe { k: usize, channels: Arc<[Channel]> },
}

impl Route {
    fn stripe(shared: &Shared, k: usize) -> Self {
        Route::Stripe {
            k,
            channels: shared.builders.iter().map(Endpoint::connect_lazy).collect(),
        }
    }
}

/// Runs one `StreamBatches` request to its end, reconnecting on failures; `true` when it
/// finished, `false` when it ended with an error (sent through `tx`) or the receiver left.
async fn run_stream(
    shared: Arc<Shared>,
    request: pb::BatchRequest,
    tx: mpsc::Sender<Result<Batch, ClientError>>,
    counters: Arc<Counters>,
    pool: Arc<BufferPool>,
    route: Route,
) -> bool {
    let tiles = request.mode == pb::Mode::Tiles as i32;
    let mut state = StreamState {
        end_epoch: if tiles { None } else { request.end_epoch },
        resume: request.resume,
        request,
        assembler: BatchAssembler::with_pool(pool),
        tx,
        counters,
    };
    let mut retry = Retry::new(&shared.config.reconnect);
    let endpoints = shared.endpoints.len();
    let mut index = match route {
        Route::Shared => shared.current(),
        Route::Stripe { k, .. } => k % endpoints,
    };
    let stripe = match route {
        Route::Shared => None,
        Route::Stripe { k, .. } => Some(k),
    };
    let mut first = true;
    loop {
        if state.finished() {
            return true;
        }
        if !first {
            state.counters.reconnects.fetch_add(1, Ordering::Relaxed);
            tracing::info!(
                endpoint = shared.endpoints[index].0.as_str(),
                stripe,
                resume = ?state.resume,
                "resuming the stream"
            );
        }
        first = false;
        let grpc = match &route {
            Route::Shared => shared.grpc(index),
            Route::Stripe { channels, .. } => shared.grpc_on(channels[index].clone()),
        };
        let status = match pump(grpc, &mut state, &mut retry).await {
            Outcome::Finished => return true,
            Outcome::ReceiverGone => return false,
            Outcome::Fatal(err) => {
                let _ = state.tx.send(Err(err)).await;
                return false;
            }
            Outcome::Lost(status) => status,
        };
        if state.tx.is_closed() {
            // The consumer dropped the stream (a process shutting down tears the connection
            // down under the call): nothing to retry, and no failure to warn about.
            return false;
        }
        // The rest of a half-received batch comes again, whole, from the resumed call.
        state.counters.discarded_messages.fetch_add(
            u64::from(state.assembler.pending_parts()),
            Ordering::Relaxed,
        );
        state.assembler.reset();
        if state.finished() {
            return true;
        }
        if !is_retryable(&status) {
            let _ = state.tx.send(Err(status.into())).await;
            return false;
        }
        match retry.after_failure(status, shared.endpoints[index].0.as_str()) {
            Ok(delay) => {
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = state.tx.closed() => return false,
                }
                index = match route {
                    Route::Shared => shared.rotate(index),
                    Route::Stripe { .. } => (index + 1) % endpoints,
                };
            }
            Err(err) => {
                let _ = state.tx.send(Err(err)).await;
                return false;
            }
        }
    }
}

/// Sub-stream `k` of a stripe: one call per epoch (`end_epoch = e + 1`) from `start` until
/// `end_epoch`, so no batch straddles two epochs and the merge can keep epochs apart.
#[allow(clippy::too_many_arguments)]
async fn run_sub_stream(
    shared: Arc<Shared>,
    request: pb::BatchRequest,
    k: usize,
    start: StreamCursor,
    end_epoch: Option<u64>,
    tx: mpsc::Sender<Result<Batch, ClientError>>,
    counters: Arc<Counters>,
    pool: Arc<BufferPool>,
) {
    let route = Route::stripe(&shared, k);
    let mut at = start;
    while end_epoch.is_none_or(|end| at.epoch < end) {
        let mut call = request.clone();
        call.resume = Some(at.into());
        call.end_epoch = Some(at.epoch + 1);
        if !run_stream(
            shared.clone(),
            call,
            tx.clone(),
            counters.clone(),
            pool.clone(),
            route.clone(),
        )
        .await
        {
            return;
        }
        at = StreamCursor {
            epoch: at.epoch + 1,
            position: 0,
        };
    }
}

/// Aborts the sub-stream tasks when the merge task ends or is aborted.
struct SubTasks(Vec<JoinHandle<()>>);

impl Drop for SubTasks {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// The merge task of a striped stream: starts one sub-stream per endpoint and delivers their
/// batches in [`Stripe`]'s order, each with the merged cursor.
async fn run_striped(
    shared: Arc<Shared>,
    request: pb::BatchRequest,
    tx: mpsc::Sender<Result<Batch, ClientError>>,
    counters: Arc<Counters>,
    pool: Arc<BufferPool>,
) {
    let subs = shared.endpoints.len();
    let start = request.resume.map(StreamCursor::from).unwrap_or_default();
    let end_epoch = request.end_epoch;
    let mut stripe = match Stripe::resume(start, subs, u64::from(request.batch_size)) {
        Ok(stripe) => stripe,
        Err(err) => {
            let _ = tx.send(Err(err.into())).await;
            return;
        }
    };
    let prefetch = shared.config.prefetch.max(1);
    let mut receivers = Vec::with_capacity(subs);
    let mut tasks = SubTasks(Vec::with_capacity(subs));
    for (k, at) in stripe.sub_starts().into_iter().enumerate() {
        let mut sub = request.clone();
        (sub.rank, sub.world_size) =
            sub_shard(request.rank, request.world_size, k as u32, subs as u32);
        let (sub_tx, sub_rx) = mpsc::channel(prefetch);
        tasks.0.push(tokio::spawn(run_sub_stream(
            shared.clone(),
            sub,
            k,
            at,
            end_epoch,
            sub_tx,
            counters.clone(),
            pool.clone(),
        )));
        receivers.push(sub_rx);
    }
    tracing::debug!(subs, start = ?start, "striped stream opened");
    while end_epoch.is_none_or(|end| stripe.cursor().epoch < end) {
        let k = stripe.next_sub();
        let item = tokio::select! {
            item = receivers[k].recv() => item,
            () = tx.closed() => return,
        };
        let mut batch = match item {
            Some(Ok(batch)) => batch,
            Some(Err(err)) => {
                let _ = tx.send(Err(err)).await;
                return;
            }
            None => {
                let _ = tx
                    .send(Err(StripeError::SubStreamEnded { sub: k }.into()))
                    .await;
                return;
            }
        };
        match stripe.accept(k, batch.cursor_after) {
            Ok(Accepted::Discard) => {}
            Ok(Accepted::Deliver(cursor)) => {
                batch.cursor_after = cursor;
                batch.end_of_stream = end_epoch.is_some_and(|end| cursor.epoch >= end);
                if tx.send(Ok(batch)).await.is_err() {
                    return;
                }
            }
            Err(err) => {
                let _ = tx.send(Err(err.into())).await;
                return;
            }
        }
    }
    drop(tasks);
}

/// One call of `StreamBatches`, from `state.resume` until it ends.
async fn pump(mut grpc: Grpc, state: &mut StreamState, retry: &mut Retry<'_>) -> Outcome {
    let mut request = state.request.clone();
    request.resume = state.resume;
    let mut stream = match grpc.stream_batches(request).await {
        Ok(response) => response.into_inner(),
        Err(status) => return Outcome::Lost(status),
    };
    loop {
        // Claim a slot before reading: with the buffer full nothing more is read, and the
        // transport's flow control stalls the server.
        let Ok(permit) = state.tx.reserve().await else {
            return Outcome::ReceiverGone;
        };
        let batch = loop {
            let msg = match stream.message().await {
                Ok(Some(msg)) => msg,
                Ok(None) => {
                    return Outcome::Lost(Status::unavailable(
                        "the stream ended before end_of_stream",
                    ));
                }
                Err(status) => return Outcome::Lost(status),
            };
            let c = &state.counters;
            c.messages_received.fetch_add(1, Ordering::Relaxed);
            c.bytes_received
                .fetch_add(msg.encoded_len() as u64, Ordering::Relaxed);
            match state.assembler.push(msg) {
                Ok(Some(batch)) => break batch,
                Ok(None) => {}
                Err(err) => return Outcome::Fatal(err.into()),
            }
        };
        retry.progress();
        state
            .counters
            .batches_received
            .fetch_add(1, Ordering::Relaxed);
        state.resume = Some(batch.cursor_after.into());
        let end = batch.end_of_stream;
        if !batch.is_empty() {
            permit.send(Ok(batch));
        }
        if end || state.finished() {
            return Outcome::Finished;
        }
    }
}

/// Batches of one `StreamBatches` request, prefetched by a background task that reconnects and
/// resumes on failures. Dropping the stream stops the task and the call.
///
/// Read it with [`LoaderStream::next`] or as a [`futures::Stream`]. It ends (`None`) after the
/// last batch of a finite request, or after yielding an error.
#[derive(Debug)]
pub struct LoaderStream {
    rx: mpsc::Receiver<Result<Batch, ClientError>>,
    task: JoinHandle<()>,
    counters: Arc<Counters>,
    /// Buffers of consumed batches, for the next ones (see [`LoaderStream::recycle`]).
    pool: Arc<BufferPool>,
    cursor: Option<StreamCursor>,
    delivered: u64,
    sub_streams: usize,
}

impl LoaderStream {
    /// Starts the background task of `request` on `shared`'s endpoints.
    pub(super) fn start(shared: Arc<Shared>, request: pb::BatchRequest) -> Self {
        let counters = Arc::new(Counters::default());
        // Room for the buffers of the batches a consumer can hold while the prefetched ones
        // wait: four tensors per field.
        let pool = Arc::new(BufferPool::new(
            4 * request.fields.len().max(1) * (shared.config.prefetch.max(1) + 2),
            u64::MAX,
        ));
        let striped = shared.config.stripe
            && shared.endpoints.len() > 1
            && request.mode != pb::Mode::Tiles as i32;
        let (rx, task) = if striped {
            // The sub-streams hold the prefetch; the merge only hands over one batch at a time.
            let (tx, rx) = mpsc::channel(1);
            let task = tokio::spawn(run_striped(
                shared.clone(),
                request,
                tx,
                counters.clone(),
                pool.clone(),
            ));
            (rx, task)
        } else {
            let (tx, rx) = mpsc::channel(shared.config.prefetch.max(1));
            let (shared, c, p) = (shared.clone(), counters.clone(), pool.clone());
            let task = tokio::spawn(async move {
                run_stream(shared, request, tx, c, p, Route::Shared).await;
            });
            (rx, task)
        };
        Self {
            rx,
            task,
            counters,
            pool,
            cursor: None,
            delivered: 0,
            sub_streams: if striped { shared.endpoints.len() } else { 1 },
        }
    }

    /// The next batch; `None` when the stream is complete.
    pub async fn next(&mut self) -> Option<Result<Batch, ClientError>> {
        std::future::poll_fn(|cx| self.poll_deliver(cx)).await
    }

    fn poll_deliver(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Batch, ClientError>>> {
        let item = ready!(self.rx.poll_recv(cx));
        if let Some(Ok(batch)) = &item {
            self.cursor = Some(batch.cursor_after);
            self.delivered += 1;
        }
        Poll::Ready(item)
    }

    /// Hands back a batch the consumer is done with: the next batches are decoded into its
    /// buffers instead of fresh memory (a batch's tensors are too large for the allocator to
    /// keep, so each fresh one came back as pages the kernel zeroes).
    /// Optional: a batch that is simply dropped frees its memory.
    pub fn recycle(&self, batch: Batch) {
        batch.recycle(&self.pool);
    }

    /// The pool [`LoaderStream::recycle`] fills, for a consumer that hands back single buffers
    /// rather than whole batches (the Python package returns each array's buffer when Python
    /// frees the array).
    pub fn buffer_pool(&self) -> &Arc<BufferPool> {
        &self.pool
    }

    /// The `cursor_after` of the last batch delivered: pass it as `resume` to continue in a new
    /// stream (e.g. after a trainer restart). `None` before the first batch.
    pub fn cursor(&self) -> Option<StreamCursor> {
        self.cursor
    }

    /// Loader calls running in parallel: the endpoint count for a striped stream, else 1.
    pub fn sub_streams(&self) -> usize {
        self.sub_streams
    }

    /// Calls re-issued after failures (summed over the sub-streams of a striped stream).
    pub fn reconnects(&self) -> u64 {
        self.counters.reconnects.load(Ordering::Relaxed)
    }

    /// Encoded bytes of all messages received.
    pub fn bytes_received(&self) -> u64 {
        self.counters.bytes_received.load(Ordering::Relaxed)
    }

    /// All counters.
    pub fn stats(&self) -> StreamStats {
        let c = &self.counters;
        StreamStats {
            reconnects: c.reconnects.load(Ordering::Relaxed),
            bytes_received: c.bytes_received.load(Ordering::Relaxed),
            messages_received: c.messages_received.load(Ordering::Relaxed),
            batches_received: c.batches_received.load(Ordering::Relaxed),
            batches_delivered: self.delivered,
            discarded_messages: c.discarded_messages.load(Ordering::Relaxed),
        }
    }
}

impl futures::Stream for LoaderStream {
    type Item = Result<Batch, ClientError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().poll_deliver(cx)
    }
}

impl Drop for LoaderStream {
    fn drop(&mut self) {
        self.task.abort();
    }
}
