//! The gRPC loader service: datasets opened once, one decoded-chunk cache and one memory budget
//! shared by every stream, each stream assembled by its own task (so a slow client only slows
//! itself), health and reflection beside it, bearer-token auth and TLS when exposed. Library
//! errors become `Status` only here, in [`status`].
//!
//! Here: the service and its datasets; beside it the RPC handlers, one task per streaming call,
//! the wire form of batches, auth and server start-up ([`run`]), the server's [`config`] and
//! the parsing of a stream [`request`].

pub mod config;
pub mod request;
pub mod status;

mod auth;
mod connections;
mod handlers;
mod server;
mod stream;
mod wire;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use atmorep_proto::pb;
use tonic::Status;

use crate::pipeline::cost::RequestCost;
use crate::pipeline::normalization::{GLOBAL_FILE, GlobalStats, LOCAL_STORE, LocalStats};
use crate::pipeline::{BufferPool, MemoryBudget, Pipeline};
use crate::store::dataset::Dataset;
use crate::{ChunkCache, StoreLocation};
pub use config::{ConfigError, DatasetConfig, ServerConfig, TlsConfig};
use handlers::sample_target;
use request::{Limits, StreamRequest};
pub use server::run;
pub use stream::Replies;

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
    /// One permit per `StreamBatches` call the server takes at once (`max_streams`).
    streams: Arc<tokio::sync::Semaphore>,
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
            let mut dataset = Dataset::open_location(location, cache.clone())
                .await
                .map_err(open_err)?;
            dataset.set_missing_chunks(&d.name, d.missing_chunks);
            dataset.set_block_reads(config.block_reads);
            let dataset = Arc::new(dataset);
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
                datasets,
                next_stream: AtomicU64::new(0),
                streams: Arc::new(tokio::sync::Semaphore::new(config.max_streams as usize)),
                shutdown,
                shutdown_tx,
                config,
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

    /// A place among the server's `max_streams`, or RESOURCE_EXHAUSTED naming the limit.
    fn stream_slot(&self) -> Result<tokio::sync::OwnedSemaphorePermit, Status> {
        self.state.streams.clone().try_acquire_owned().map_err(|_| {
            let max = self.state.config.max_streams;
            metrics::counter!("atmorep_refused_total", "limit" => "max_streams").increment(1);
            Status::resource_exhausted(format!(
                "max_streams = {max}: this loader already serves {max} streams; retry later \
                 or ask its operator to raise max_streams"
            ))
        })
    }

    /// `GetSample`'s share of the memory budget, taken before its pipeline is built: the
    /// pipeline's fixed positional encodings, the sample and the encoded copy tonic makes of it
    /// (three times the sample's bytes at most). Taken now or refused with RESOURCE_EXHAUSTED:
    /// a unary call does not queue.
    fn sample_reservation(
        &self,
        cost: &RequestCost,
    ) -> Result<tokio::sync::OwnedSemaphorePermit, Status> {
        let bytes = cost.sample_bytes.saturating_mul(3);
        let budget = &self.state.budget;
        budget.try_reserve(bytes).ok_or_else(|| {
            metrics::counter!("atmorep_refused_total", "limit" => "memory_budget_mib").increment(1);
            let mb = |b: u64| b as f64 / 1e6;
            Status::resource_exhausted(format!(
                "memory_budget_mib = {}: this sample needs {:.1} MB (with its encodings and \
                 encoded copy) and \
                 {:.1} MB of the loader's budget are free now; retry later",
                self.state.config.memory_budget_mib,
                mb(bytes.min(budget.total_bytes())),
                mb(budget.available_bytes())
            ))
        })
    }

    fn limits(&self) -> Limits {
        Limits {
            max_batch_size: self.state.config.max_batch_size,
            request: self.state.config.request_limits(),
        }
    }

    /// Parses `request` and prepares its pipeline.
    fn prepare(
        &self,
        request: &pb::BatchRequest,
        limits: Limits,
    ) -> Result<(StreamRequest, Arc<Pipeline>), Status> {
        let (parsed, _) = self.price(request, limits)?;
        let pipeline = self.build(&parsed)?;
        Ok((parsed, pipeline))
    }

    /// Parses `request` and prices it against the limits before anything is allocated for it
    /// (docs/operations.md, "Request limits").
    fn price(
        &self,
        request: &pb::BatchRequest,
        limits: Limits,
    ) -> Result<(StreamRequest, RequestCost), Status> {
        let served = self.served(&request.dataset)?;
        let parsed =
            StreamRequest::parse(request, &served.dataset, limits).map_err(status::from_request)?;
        let cost = RequestCost::of(&served.dataset, &parsed.pipeline, parsed.batch_size)
            .map_err(|e| status::from_pipeline(&e))?;
        cost.check(&parsed.pipeline, &limits.request)
            .map_err(|e| status::from_cost(&e))?;
        Ok((parsed, cost))
    }

    /// The pipeline of a priced request: its encodings, sample order and read plan. CPU work
    /// proportional to the request's cost; async handlers run it through [`Self::build_off_worker`].
    fn build(&self, parsed: &StreamRequest) -> Result<Arc<Pipeline>, Status> {
        let served = self.served(&parsed.dataset)?;
        let pipeline = Pipeline::with_statistics(
            served.dataset.clone(),
            parsed.pipeline.clone(),
            served.stats.clone(),
            served.local.clone(),
        )
        .map_err(|e| status::from_pipeline(&e))?
        .with_pool(self.state.pool.clone());
        Ok(Arc::new(pipeline))
    }

    /// [`Self::build`] on a blocking thread, so that a large encoding or epoch plan never holds
    /// a tokio worker (and the streams it serves) while it is computed.
    async fn build_off_worker(
        &self,
        parsed: StreamRequest,
    ) -> Result<(StreamRequest, Arc<Pipeline>), Status> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let pipeline = this.build(&parsed)?;
            Ok((parsed, pipeline))
        })
        .await
        .map_err(|e| Status::internal(format!("preparing the request failed: {e}")))?
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
        let (parsed, _) = self.price_sample(request)?;
        let pipeline = self.build(&parsed)?;
        Ok((parsed, pipeline))
    }

    /// [`Self::price`] of `GetSample`'s request.
    fn price_sample(
        &self,
        request: Option<pb::BatchRequest>,
    ) -> Result<(StreamRequest, RequestCost), Status> {
        let mut inner = request.ok_or_else(|| Status::invalid_argument("request: missing"))?;
        if inner.batch_size == 0 {
            inner.batch_size = 1;
        }
        self.price(&inner, self.limits())
    }
}

/// Counts a failed call by its code, logs it and passes it on.
fn failed(status: Status) -> Status {
    metrics::counter!("atmorep_errors_total", "code" => format!("{:?}", status.code()))
        .increment(1);
    tracing::warn!(code = ?status.code(), message = status.message(), "request failed");
    status
}

/// Most sample buffers the server-wide pool keeps (its byte limit usually binds first).
const POOL_BUFFERS: usize = 4096;
