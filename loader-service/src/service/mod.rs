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
            request: self.state.config.request_limits(),
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
        // Priced before anything is allocated for it (docs/operations.md, "Request limits").
        let cost = RequestCost::of(&served.dataset, &parsed.pipeline, parsed.batch_size)
            .map_err(|e| status::from_pipeline(&e))?;
        cost.check(&parsed.pipeline, &limits.request)
            .map_err(|e| status::from_cost(&e))?;
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

/// Counts a failed call by its code, logs it and passes it on.
fn failed(status: Status) -> Status {
    metrics::counter!("atmorep_errors_total", "code" => format!("{:?}", status.code()))
        .increment(1);
    tracing::warn!(code = ?status.code(), message = status.message(), "request failed");
    status
}

/// Most sample buffers the server-wide pool keeps (its byte limit usually binds first).
const POOL_BUFFERS: usize = 4096;
