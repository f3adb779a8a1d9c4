//! The gRPC loader service: datasets opened once, one decoded-chunk cache and one memory budget
//! shared by every stream, each stream assembled by its own task (so a slow client only slows
//! itself), health and reflection beside it, bearer-token auth and TLS when exposed. Library
//! errors become `Status` only here, in [`status`].

pub mod config;
pub mod request;
pub mod status;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use atmorep_proto::batch::{
    FieldShape, OutgoingSample, PartHeader, SampleField, StreamCursor, Window, split_samples,
};
use atmorep_proto::calendar::{TimeFormat, format_time};
use atmorep_proto::pb;
use atmorep_proto::pb::loader_server::{Loader, LoaderServer};
use tokio::net::TcpListener;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::codec::CompressionEncoding;
use tonic::transport::{Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status};

use crate::dataset::Dataset;
use crate::epoch::EpochCursor;
use crate::local_stats::{LOCAL_STORE, LocalStats};
use crate::normalization::{GLOBAL_FILE, GlobalStats};
use crate::pipeline::{BatchSpec, BufferPool, MemoryBudget, Pipeline, Sample, SampleBatch};
use crate::{ChunkCache, StoreLocation};
pub use config::{ConfigError, DatasetConfig, ServerConfig, TlsConfig};
use request::{Limits, StreamRequest};

/// Why a server cannot start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("dataset `{name}`: {source}")]
    Dataset {
        name: String,
        source: crate::error::StoreError,
    },
    #[error("dataset `{name}`: statistics: {detail}")]
    Statistics { name: String, detail: String },
    #[error("TLS: {0}")]
    Tls(String),
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("reflection: {0}")]
    Reflection(String),
}

/// One dataset as served.
#[derive(Debug)]
struct Served {
    config: DatasetConfig,
    dataset: Arc<Dataset>,
    stats: Option<Arc<GlobalStats>>,
    local: Option<Arc<LocalStats>>,
}

#[derive(Debug)]
struct State {
    config: ServerConfig,
    datasets: BTreeMap<String, Served>,
    budget: MemoryBudget,
    /// Sample buffers shared by every stream, holding at most a quarter of the budget's size.
    pool: Arc<BufferPool>,
    next_stream: AtomicU64,
    /// Flips to `true` on shutdown so endless streams end (with UNAVAILABLE, which clients
    /// answer by resuming elsewhere) instead of holding the server open.
    shutdown: tokio::sync::watch::Receiver<bool>,
    shutdown_tx: tokio::sync::watch::Sender<bool>,
}

/// The `Loader` service implementation.
#[derive(Debug, Clone)]
pub struct LoaderService {
    state: Arc<State>,
}

impl LoaderService {
    /// Opens every configured dataset (sharing one chunk cache) and loads the statistics found
    /// next to them.
    pub async fn open(config: ServerConfig) -> Result<Self, ServeError> {
        config.check()?;
        let cache = Arc::new(ChunkCache::new(config.cache_mib << 20));
        let mut datasets = BTreeMap::new();
        for d in &config.datasets {
            let open_err = |source| ServeError::Dataset {
                name: d.name.clone(),
                source,
            };
            let location = StoreLocation::open(&d.url).map_err(open_err)?;
            let dataset = Arc::new(
                Dataset::open_location(location, cache.clone())
                    .await
                    .map_err(open_err)?,
            );
            let dir = d
                .stats
                .clone()
                .unwrap_or_else(|| GlobalStats::default_dir(Path::new(&d.url)));
            let stats_err = |detail: String| ServeError::Statistics {
                name: d.name.clone(),
                detail,
            };
            let global = dir.join(GLOBAL_FILE);
            let stats = if global.exists() {
                Some(Arc::new(
                    GlobalStats::load(&global).map_err(|e| stats_err(e.to_string()))?,
                ))
            } else {
                None
            };
            let local_path = dir.join(LOCAL_STORE);
            let local = if local_path.exists() {
                Some(Arc::new(
                    LocalStats::load(&local_path).map_err(|e| stats_err(e.to_string()))?,
                ))
            } else {
                None
            };
            tracing::info!(
                dataset = %d.name,
                url = %d.url,
                variables = dataset.variables.len(),
                steps = dataset.times.len(),
                global_stats = stats.is_some(),
                local_stats = local.is_some(),
                "serving dataset"
            );
            datasets.insert(
                d.name.clone(),
                Served {
                    config: d.clone(),
                    dataset,
                    stats,
                    local,
                },
            );
        }
        let (shutdown_tx, shutdown) = tokio::sync::watch::channel(false);
        Ok(Self {
            state: Arc::new(State {
                budget: MemoryBudget::new(config.memory_budget_mib << 20),
                pool: Arc::new(BufferPool::new(
                    POOL_BUFFERS,
                    config.memory_budget_mib << 20,
                )),
                config,
                datasets,
                next_stream: AtomicU64::new(0),
                shutdown,
                shutdown_tx,
            }),
        })
    }

    /// The server-wide memory budget (tests check it holds).
    pub fn budget(&self) -> &MemoryBudget {
        &self.state.budget
    }

    fn served(&self, name: &str) -> Result<&Served, Status> {
        self.state.datasets.get(name).ok_or_else(|| {
            Status::not_found(format!(
                "dataset: no dataset `{name}` (this server has {})",
                self.state
                    .datasets
                    .keys()
                    .map(String::as_str)
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })
    }

    fn limits(&self) -> Limits {
        Limits {
            max_batch_size: self.state.config.max_batch_size,
        }
    }

    /// Parses `request` and prepares its pipeline.
    fn prepare(
        &self,
        request: &pb::BatchRequest,
        limits: Limits,
    ) -> Result<(StreamRequest, Arc<Pipeline>), Status> {
        let served = self.served(&request.dataset)?;
        let parsed =
            StreamRequest::parse(request, &served.dataset, limits).map_err(status::from_request)?;
        let pipeline = Pipeline::with_statistics(
            served.dataset.clone(),
            parsed.pipeline.clone(),
            served.stats.clone(),
            served.local.clone(),
        )
        .map_err(|e| status::from_pipeline(&e))?
        .with_pool(self.state.pool.clone());
        Ok((parsed, Arc::new(pipeline)))
    }

    /// Everything `StreamBatches` checks before it streams: the request, its pipeline and the
    /// start of its sample plan (INVALID_ARGUMENT, NOT_FOUND, …). Reads no sample; the fuzzer's
    /// entry to the validation path.
    pub fn check_batch_request(&self, request: &pb::BatchRequest) -> Result<(), Status> {
        let (parsed, pipeline) = self.prepare(request, self.limits())?;
        let mut ids = pipeline
            .ids(parsed.rank, parsed.world, parsed.resume)
            .map_err(|e| status::from_pipeline(&e))?;
        if let Some(end) = parsed.end_epoch {
            ids = ids.with_end_epoch(end);
        }
        // The first samples of the plan, as the stream would draw them.
        for _ in ids.take(parsed.batch_size.min(4)) {}
        Ok(())
    }

    /// Everything `GetSample` checks before it reads the sample (see
    /// [`Self::check_batch_request`]).
    pub fn check_sample_request(&self, request: pb::SampleRequest) -> Result<(), Status> {
        let (_, pipeline) = self.prepare_sample(request.request)?;
        sample_target(&pipeline, request.selector)?;
        Ok(())
    }

    /// `GetSample`'s request: a batch request of one sample by default.
    fn prepare_sample(
        &self,
        request: Option<pb::BatchRequest>,
    ) -> Result<(StreamRequest, Arc<Pipeline>), Status> {
        let mut inner = request.ok_or_else(|| Status::invalid_argument("request: missing"))?;
        if inner.batch_size == 0 {
            inner.batch_size = 1;
        }
        self.prepare(&inner, self.limits())
    }
}

/// The sample a `GetSample` selector names.
#[derive(Debug, Clone, Copy, PartialEq)]
enum SampleTarget {
    ById {
        epoch: u64,
        id: u64,
    },
    ByCentre {
        time_index: usize,
        lat: f64,
        lon: f64,
    },
}

fn sample_target(
    pipeline: &Pipeline,
    selector: Option<pb::sample_request::Selector>,
) -> Result<SampleTarget, Status> {
    match selector {
        Some(pb::sample_request::Selector::ById(by)) => {
            if by.id >= pipeline.num_samples() {
                return Err(Status::invalid_argument(format!(
                    "by_id.id: sample {} is outside 0..{}",
                    by.id,
                    pipeline.num_samples()
                )));
            }
            Ok(SampleTarget::ById {
                epoch: by.epoch,
                id: by.id,
            })
        }
        Some(pb::sample_request::Selector::ByCentre(at)) => {
            let times = &pipeline.dataset().times;
            let time_index = match at.time {
                Some(pb::sample_by_centre::Time::TimeIndex(i)) => usize::try_from(i)
                    .ok()
                    .filter(|&i| i < times.len())
                    .ok_or_else(|| {
                        Status::invalid_argument(format!(
                            "by_centre.time_index: {i} is outside 0..{}",
                            times.len()
                        ))
                    }),
                Some(pb::sample_by_centre::Time::IsoTime(text)) => {
                    atmorep_proto::calendar::parse_iso(&text)
                        .map_err(|e| Status::invalid_argument(format!("by_centre.iso_time: {e}")))
                        .and_then(|t| {
                            times.binary_search(&t).map_err(|_| {
                                Status::not_found(format!(
                                    "by_centre.iso_time: the dataset has no step at {text}"
                                ))
                            })
                        })
                }
                None => Err(Status::invalid_argument("by_centre.time: missing")),
            }?;
            Ok(SampleTarget::ByCentre {
                time_index,
                lat: at.lat,
                lon: at.lon,
            })
        }
        None => Err(Status::invalid_argument("selector: missing")),
    }
}

/// Counts a failed call by its code, logs it and passes it on.
fn failed(status: Status) -> Status {
    metrics::counter!("atmorep_errors_total", "code" => format!("{:?}", status.code()))
        .increment(1);
    tracing::warn!(code = ?status.code(), message = status.message(), "request failed");
    status
}

/// Bytes of a message part the server aims for: large enough that per-message costs vanish,
/// small enough that samples of this size or larger travel without being copied into a batch.
const PART_BYTES: usize = 4 << 20;

/// Most sample buffers the server-wide pool keeps (its byte limit usually binds first).
const POOL_BUFFERS: usize = 4096;

/// The wire form of a batch: consecutive parts of at most `max_bytes` (and about
/// [`PART_BYTES`]) each, cut by the contract's splitter (a sample that fills a part alone travels
/// in its own buffers, which go back to the pipeline's pool once tonic has encoded them).
fn to_wire(
    pipeline: &Pipeline,
    samples: Vec<Sample>,
    sequence: u64,
    cursor_after: EpochCursor,
    end_of_stream: bool,
    dtype: pb::Dtype,
    max_bytes: usize,
) -> Vec<pb::Batch> {
    let fields: Vec<FieldShape> = pipeline
        .field_geometries()
        .into_iter()
        .map(|(name, token_numel, num_tokens, pe_width)| FieldShape {
            name,
            num_tokens,
            token_numel,
            pe_width,
        })
        .collect();
    let samples = samples
        .into_iter()
        .map(|s| OutgoingSample {
            id: s.id,
            epoch: s.epoch,
            fields: s
                .fields
                .into_iter()
                .map(|f| SampleField {
                    source: f.source,
                    target: f.target,
                    masked_indices: f.masked_indices,
                    token_info: f.token_info,
                    pe: f.pe,
                    window: Window {
                        time_start: f.window.time_start,
                        lat_start: f.window.lat_start,
                        lon_start: f.window.lon_start,
                        size: f.window.size,
                    },
                })
                .collect(),
        })
        .collect();
    let header = PartHeader {
        sequence,
        cursor_after: StreamCursor {
            epoch: cursor_after.epoch,
            position: cursor_after.position,
        },
        end_of_stream,
    };
    let max_bytes = max_bytes.min(PART_BYTES);
    split_samples(samples, &fields, header, dtype, max_bytes, pipeline.pool())
}

#[tonic::async_trait]
impl Loader for LoaderService {
    async fn list_datasets(
        &self,
        _request: Request<pb::ListDatasetsRequest>,
    ) -> Result<Response<pb::ListDatasetsResponse>, Status> {
        let datasets = self
            .state
            .datasets
            .values()
            .map(|s| {
                let (start, end) = time_bounds(&s.dataset);
                pb::DatasetSummary {
                    name: s.config.name.clone(),
                    description: s.config.description.clone(),
                    variables: s.dataset.variables.keys().cloned().collect(),
                    time_start: start,
                    time_end: end,
                }
            })
            .collect();
        Ok(Response::new(pb::ListDatasetsResponse { datasets }))
    }

    async fn get_dataset_info(
        &self,
        request: Request<pb::DatasetInfoRequest>,
    ) -> Result<Response<pb::DatasetInfo>, Status> {
        let served = self.served(&request.get_ref().dataset).map_err(failed)?;
        Ok(Response::new(dataset_info(served, self.limits())))
    }

    type StreamBatchesStream = Replies;

    async fn stream_batches(
        &self,
        request: Request<pb::BatchRequest>,
    ) -> Result<Response<Self::StreamBatchesStream>, Status> {
        let request = request.into_inner();
        let (parsed, pipeline) = self.prepare(&request, self.limits()).map_err(failed)?;
        let config = &self.state.config;
        let batches = pipeline
            .batches(BatchSpec {
                rank: parsed.rank,
                world: parsed.world,
                start: parsed.resume,
                end_epoch: parsed.end_epoch,
                batch_size: parsed.batch_size,
                sample_concurrency: config.sample_concurrency,
                prefetch_batches: config.prefetch_batches,
                memory: Some(self.state.budget.clone()),
            })
            .map_err(|e| failed(status::from_pipeline(&e)))?;
        let stream_id = self.state.next_stream.fetch_add(1, Ordering::Relaxed);
        let span = tracing::info_span!("stream", id = stream_id, dataset = %parsed.dataset);
        tracing::info!(
            parent: &span,
            rank = parsed.rank,
            world = parsed.world,
            batch_size = parsed.batch_size,
            resume = ?parsed.resume,
            end_epoch = ?parsed.end_epoch,
            "stream opened"
        );
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let max_bytes = config.max_message_mib << 20;
        let dataset = self.served(&parsed.dataset)?.dataset.clone();
        let shutdown = self.state.shutdown.clone();
        tokio::spawn(tracing::Instrument::instrument(
            serve_stream(StreamTask {
                pipeline,
                batches,
                tx,
                parsed,
                max_bytes,
                dataset,
                shutdown,
            }),
            span,
        ));
        Ok(Response::new(Replies(ReceiverStream::new(rx))))
    }

    async fn get_sample(
        &self,
        request: Request<pb::SampleRequest>,
    ) -> Result<Response<pb::Batch>, Status> {
        let request = request.into_inner();
        let (parsed, pipeline) = self.prepare_sample(request.request).map_err(failed)?;
        let sample = match sample_target(&pipeline, request.selector).map_err(failed)? {
            SampleTarget::ById { epoch, id } => pipeline.sample(epoch, id).await,
            SampleTarget::ByCentre {
                time_index,
                lat,
                lon,
            } => pipeline.sample_at(0, time_index, lat, lon).await,
        }
        .map_err(|e| failed(status::from_pipeline(&e)))?;
        let cursor = EpochCursor::default();
        // One message whatever its size: a unary reply has no parts.
        let mut parts = to_wire(
            &pipeline,
            vec![sample],
            0,
            cursor,
            true,
            parsed.dtype,
            usize::MAX,
        );
        let message = parts.pop().expect("one sample makes one part");
        Ok(Response::new(message))
    }

    async fn get_statistics(
        &self,
        request: Request<pb::StatisticsRequest>,
    ) -> Result<Response<pb::Statistics>, Status> {
        let request = request.into_inner();
        let served = self.served(&request.dataset).map_err(failed)?;
        let stats = served.stats.as_ref().ok_or_else(|| {
            failed(Status::failed_precondition(format!(
                "dataset: `{}` has no global statistics (run `atmorep loader stats` on its store)",
                request.dataset
            )))
        })?;
        for name in &request.variables {
            if !served.dataset.variables.contains_key(name) {
                return Err(failed(Status::not_found(format!(
                    "variables: dataset `{}` has no variable `{name}`",
                    request.dataset
                ))));
            }
            if !stats.iter().any(|(field, ..)| field == name) {
                return Err(failed(Status::failed_precondition(format!(
                    "variables: `{name}` of dataset `{}` has no global statistics",
                    request.dataset
                ))));
            }
        }
        let global = stats
            .iter()
            .filter(|(field, ..)| {
                request.variables.is_empty() || request.variables.iter().any(|v| v == field)
            })
            .map(|(field, level, year, month, m)| pb::MonthlyMoments {
                variable: field.to_string(),
                level,
                year,
                month,
                count: m.count,
                mean: m.mean,
                std: m.std(),
                min: m.min,
                max: m.max,
            })
            .collect();
        Ok(Response::new(pb::Statistics { global }))
    }
}

/// A reply queued for tonic, holding its batch's share of the memory budget.
struct Outgoing {
    reply: Result<pb::Batch, Status>,
    reservation: Option<Arc<tokio::sync::OwnedSemaphorePermit>>,
}

impl Outgoing {
    fn new(
        reply: Result<pb::Batch, Status>,
        reservation: Option<Arc<tokio::sync::OwnedSemaphorePermit>>,
    ) -> Self {
        Self { reply, reservation }
    }

    fn error(status: Status) -> Self {
        Self::new(Err(status), None)
    }
}

/// The replies of one `StreamBatches` call. A batch's reservation ends when tonic takes its last
/// part: tonic encodes a message in the same poll that takes it, so that is when the batch's
/// memory is freed, and not before (a queued batch waiting for a slow client still counts).
pub struct Replies(ReceiverStream<Outgoing>);

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
            next.map(|Outgoing { reply, reservation }| {
                drop(reservation);
                reply
            })
        })
    }
}

struct StreamTask {
    pipeline: Arc<Pipeline>,
    batches: crate::pipeline::PipelineStream,
    tx: tokio::sync::mpsc::Sender<Outgoing>,
    parsed: StreamRequest,
    max_bytes: usize,
    dataset: Arc<Dataset>,
    shutdown: tokio::sync::watch::Receiver<bool>,
}

/// Sends one stream's batches until it ends, fails, the client leaves or the server stops.
async fn serve_stream(mut task: StreamTask) {
    let labels = [("dataset", task.parsed.dataset.clone())];
    let mut sequence = 0u64;
    metrics::gauge!("atmorep_streams_active").increment(1.0);
    loop {
        let next = tokio::select! {
            next = task.batches.next() => next,
            _ = async { task.shutdown.wait_for(|stop| *stop).await.map(|_| ()) } => {
                let _ = task.tx.send(Outgoing::error(Status::unavailable("the loader is shutting down"))).await;
                break;
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
            if task.tx.send(outgoing).await.is_err() {
                tracing::info!(batches = sequence, "client went away");
                metrics::gauge!("atmorep_streams_active").decrement(1.0);
                return;
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

fn time_bounds(dataset: &Dataset) -> (String, String) {
    let iso = |t: i64| format_time(t, TimeFormat::Iso);
    (
        dataset.times.first().map(|&t| iso(t)).unwrap_or_default(),
        dataset.times.last().map(|&t| iso(t)).unwrap_or_default(),
    )
}

fn dataset_info(served: &Served, limits: Limits) -> pb::DatasetInfo {
    let ds = &served.dataset;
    let (start, end) = time_bounds(ds);
    let step_hours = if ds.times.len() > 1 {
        (ds.times[1] - ds.times[0]) as f64 / 3600.0
    } else {
        0.0
    };
    let lon_step = if ds.lons.len() > 1 {
        ds.lons[1] - ds.lons[0]
    } else {
        0.0
    };
    let lat_step = if ds.lats.len() > 1 {
        ds.lats[1] - ds.lats[0]
    } else {
        0.0
    };
    let mut global: Vec<String> = Vec::new();
    let (mut first, mut last) = (i32::MAX, i32::MIN);
    if let Some(stats) = &served.stats {
        for (field, _, year, _, _) in stats.iter() {
            if !global.iter().any(|g| g == field) {
                global.push(field.to_string());
            }
            first = first.min(year);
            last = last.max(year);
        }
    }
    pb::DatasetInfo {
        name: served.config.name.clone(),
        description: served.config.description.clone(),
        variables: ds
            .variables
            .values()
            .map(|v| pb::VariableInfo {
                name: v.name.clone(),
                long_name: v.long_name.clone().unwrap_or_default(),
                units: v.units.clone().unwrap_or_default(),
                levels: v.levels.clone(),
                dims: v
                    .roles
                    .iter()
                    .map(|r| format!("{r:?}").to_lowercase())
                    .collect(),
                chunk_shape: v.chunk_shape(),
                stored_dtype: v.stored_dtype.clone(),
            })
            .collect(),
        grid: Some(pb::Grid {
            nlat: ds.lats.len() as u32,
            nlon: ds.lons.len() as u32,
            lat_first: ds.lats.first().copied().unwrap_or_default(),
            lat_step,
            lon_first: ds.lons.first().copied().unwrap_or_default(),
            lon_step,
        }),
        time: Some(pb::TimeAxis {
            start,
            end,
            start_unix: ds.times.first().copied().unwrap_or_default(),
            end_unix: ds.times.last().copied().unwrap_or_default(),
            step_hours,
            count: ds.times.len() as u64,
        }),
        statistics: Some(pb::StatisticsSummary {
            global,
            local: served
                .local
                .as_ref()
                .map(|l| l.fields.keys().cloned().collect())
                .unwrap_or_default(),
            global_first_year: if first <= last { first } else { 0 },
            global_last_year: if first <= last { last } else { 0 },
        }),
        geometry: Some(pb::ServableGeometry {
            max_window: vec![
                ds.times.len() as u32,
                ds.lats.len() as u32,
                ds.lons.len() as u32,
            ],
            max_tokens: (ds.times.len() * ds.lats.len() * ds.lons.len()) as u64,
            max_batch_size: limits.max_batch_size,
            pe_modes: atmorep_proto::PeMode::ALL
                .iter()
                .map(|&m| pb::PeMode::from(m) as i32)
                .collect(),
            max_pe_width: 4096,
        }),
    }
}

/// Checks `authorization: Bearer <token>` on every Loader call.
#[derive(Debug, Clone)]
struct BearerAuth {
    expected: Option<Arc<str>>,
}

impl tonic::service::Interceptor for BearerAuth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(expected) = &self.expected else {
            return Ok(request);
        };
        let given = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match given {
            Some(token) if constant_time_eq(token.as_bytes(), expected.as_bytes()) => Ok(request),
            Some(_) => Err(failed(Status::unauthenticated(
                "authorization: wrong token",
            ))),
            None => Err(failed(Status::unauthenticated(
                "authorization: a bearer token is required",
            ))),
        }
    }
}

/// Compares without an early exit, so response timing does not leak the token's prefix.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Serves `service` on `listener` until `shutdown` resolves, then ends open streams with
/// UNAVAILABLE and returns once connections have drained.
pub async fn run(
    service: LoaderService,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let config = service.state.config.clone();
    let max_message = config.max_message_mib << 20;
    let auth = BearerAuth {
        expected: config.bearer_token()?.map(Arc::from),
    };
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<LoaderServer<LoaderService>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(atmorep_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| ServeError::Reflection(e.to_string()))?;
    let loader = LoaderServer::new(service.clone())
        // Requests are small; a large limit only invites abuse.
        .max_decoding_message_size(1 << 20)
        // Batches are split into parts of about `max_message` bytes; a single sample larger
        // than that still goes out whole.
        .max_encoding_message_size(max_message.max(1 << 29))
        .accept_compressed(CompressionEncoding::Gzip)
        .accept_compressed(CompressionEncoding::Zstd)
        .send_compressed(CompressionEncoding::Gzip)
        .send_compressed(CompressionEncoding::Zstd);
    let loader = tonic::service::interceptor::InterceptedService::new(loader, auth);

    let mut builder = Server::builder()
        // Windows large enough that one stream can keep a few batches in the pipe.
        .initial_stream_window_size(Some(8 << 20))
        .initial_connection_window_size(Some(32 << 20))
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)));
    if let Some(tls) = &config.tls {
        atmorep_proto::tls::install_crypto_provider();
        let read = |p: &Path| {
            std::fs::read(p).map_err(|e| ServeError::Tls(format!("{}: {e}", p.display())))
        };
        let identity = Identity::from_pem(read(&tls.cert)?, read(&tls.key)?);
        builder = builder
            .tls_config(ServerTlsConfig::new().identity(identity))
            .map_err(|e| ServeError::Tls(e.to_string()))?;
    }
    let addr = listener.local_addr().ok();
    tracing::info!(?addr, tls = config.tls.is_some(), "loader listening");
    let state = service.state.clone();
    let stop = async move {
        shutdown.await;
        tracing::info!("shutting down: ending open streams");
        let _ = state.shutdown_tx.send(true);
    };
    builder
        .add_service(health_service)
        .add_service(reflection)
        .add_service(loader)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), stop)
        .await?;
    Ok(())
}
