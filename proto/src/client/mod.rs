//! The client of the `Loader` service, for trainers and downstream tools.
//!
//! [`LoaderClient::stream`] returns a [`LoaderStream`]: a background task reads `StreamBatches`,
//! reassembles multi-part batches, decodes them to `f32` and keeps up to
//! [`ClientConfig::prefetch`] batches ready in a bounded channel. When that channel is full the
//! task stops reading, so HTTP/2 flow control pushes back to the server — a slow consumer holds
//! a bounded amount of memory, never an unbounded queue.
//!
//! When the stream is lost — UNAVAILABLE, a transport failure (connection reset, refused, a
//! keep-alive timeout), or a stream that ends without `end_of_stream` — the task waits (exponential
//! backoff with jitter), moves to the next endpoint of the list (round-robin) and re-issues the
//! request with `resume` set to the `cursor_after` of the last *complete* batch it received. A
//! batch cut short by the failure is dropped and arrives whole from the new call, so a loader
//! restart costs a pause, not a sample, and no sample arrives twice. Every other status (a bad
//! request, a missing dataset, a rejected token) ends the stream with that error at once.
//!
//! # Striping across loaders
//!
//! With [`ClientConfig::stripe`] and K > 1 endpoints, a training-mode stream is spread over the
//! loaders: K sub-streams, sub-stream `k` asking for its own slice of the rank's shard (see
//! [`stripe`]) and starting on endpoint `k`, each with its own prefetch of
//! [`ClientConfig::prefetch`] batches, its own cursor, its own HTTP/2 connections and its own
//! failover to the other endpoints (round-robin from `k + 1`, resuming from its own cursor). A
//! merge task delivers their batches in a fixed round-robin order, so the stream is still a pure
//! function of the request (and K) — which also means a slow loader slows the whole stream to its
//! pace. The stream's [`StreamCursor`](crate::batch::StreamCursor) encodes every sub-stream's
//! position (see [`stripe`]); it is meaningful only with the same number of endpoints and batch
//! size. [`StreamStats`] sum over the sub-streams. Tiles-mode streams are never striped: their
//! order is the tiling's.
//!
//! Unary calls ([`LoaderClient::list_datasets`], [`LoaderClient::dataset_info`],
//! [`LoaderClient::sample`]) retry the same failures across endpoints under the same policy.

mod config;
mod error;
mod retry;
mod stream;
pub mod stripe;
mod transport;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use tonic::Status;
use tonic::metadata::{AsciiMetadataValue, MetadataValue};

pub use config::{ClientConfig, Compression, ReconnectPolicy};
pub use error::{ClientError, is_retryable};
pub use stream::{LoaderStream, StreamStats};

use crate::batch::Batch;
use crate::pb;
use retry::Retry;
use transport::{BearerAuth, Grpc, Shared, endpoint};

/// A client of one or more equivalent loaders. Cheap to clone; clones share connections.
#[derive(Debug, Clone)]
pub struct LoaderClient {
    shared: Arc<Shared>,
}

impl LoaderClient {
    /// Validates the configuration and prepares a channel per endpoint. Connections are opened
    /// lazily by the first call, so a loader that is still starting is no error here.
    pub async fn connect(config: ClientConfig) -> Result<Self, ClientError> {
        if config.endpoints.is_empty() {
            return Err(ClientError::NoEndpoints);
        }
        let auth = match &config.bearer_token {
            Some(token) => {
                let mut value: AsciiMetadataValue =
                    MetadataValue::try_from(format!("Bearer {token}"))
                        .map_err(|_| ClientError::InvalidToken)?;
                value.set_sensitive(true);
                BearerAuth(Some(value))
            }
            None => BearerAuth(None),
        };
        let builders = config
            .endpoints
            .iter()
            .map(|raw| endpoint(raw, &config))
            .collect::<Result<Vec<_>, ClientError>>()?;
        let endpoints = config
            .endpoints
            .iter()
            .zip(&builders)
            .map(|(raw, ep)| (raw.clone(), ep.connect_lazy()))
            .collect();
        Ok(Self {
            shared: Arc::new(Shared {
                endpoints,
                builders,
                auth,
                config,
                current: AtomicUsize::new(0),
            }),
        })
    }

    /// The configuration the client was built with.
    pub fn config(&self) -> &ClientConfig {
        &self.shared.config
    }

    /// The datasets the loader serves.
    pub async fn list_datasets(&self) -> Result<Vec<pb::DatasetSummary>, ClientError> {
        self.unary(|mut c| async move { c.list_datasets(pb::ListDatasetsRequest {}).await })
            .await
            .map(|r| r.datasets)
    }

    /// Fields, grid, time axis, chunking, statistics and servable geometry of `dataset`.
    pub async fn dataset_info(&self, dataset: &str) -> Result<pb::DatasetInfo, ClientError> {
        let request = pb::DatasetInfoRequest {
            dataset: dataset.to_string(),
        };
        self.unary(move |mut c| {
            let request = request.clone();
            async move { c.get_dataset_info(request).await }
        })
        .await
    }

    /// The global normalization statistics of `dataset` (of `variables`; all when empty).
    pub async fn statistics(
        &self,
        dataset: &str,
        variables: &[String],
    ) -> Result<crate::statistics::MonthlyStatistics, ClientError> {
        let request = pb::StatisticsRequest {
            dataset: dataset.to_string(),
            variables: variables.to_vec(),
        };
        let msg = self
            .unary(move |mut c| {
                let request = request.clone();
                async move { c.get_statistics(request).await }
            })
            .await?;
        Ok(crate::statistics::MonthlyStatistics::from_proto(&msg))
    }

    /// One sample (a batch of one), by id or by centre.
    pub async fn sample(&self, request: pb::SampleRequest) -> Result<Batch, ClientError> {
        let msg = self
            .unary(move |mut c| {
                let request = request.clone();
                async move { c.get_sample(request).await }
            })
            .await?;
        Ok(Batch::from_proto(msg)?)
    }

    /// Streams the batches of `request` (see the module docs for prefetch and reconnection).
    /// Starts at `request.resume` (the start of epoch 0 when absent). Must be called within a
    /// tokio runtime; errors arrive through the stream.
    pub fn stream(&self, request: pb::BatchRequest) -> LoaderStream {
        LoaderStream::start(self.shared.clone(), request)
    }

    async fn unary<T, F, Fut>(&self, mut call: F) -> Result<T, ClientError>
    where
        F: FnMut(Grpc) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let shared = &self.shared;
        let mut retry = Retry::new(&shared.config.reconnect);
        let mut index = shared.current();
        loop {
            match call(shared.grpc(index)).await {
                Ok(response) => return Ok(response.into_inner()),
                Err(status) if is_retryable(&status) => {
                    let delay = retry.after_failure(status, shared.endpoints[index].0.as_str())?;
                    tokio::time::sleep(delay).await;
                    index = shared.rotate(index);
                }
                Err(status) => return Err(status.into()),
            }
        }
    }
}

impl pb::SampleRequest {
    /// The sample the stream of `request` would serve as `id` in `epoch`.
    pub fn by_id(request: pb::BatchRequest, epoch: u64, id: u64) -> Self {
        Self {
            request: Some(request),
            selector: Some(pb::sample_request::Selector::ById(pb::SampleById {
                epoch,
                id,
            })),
        }
    }

    /// A sample centred at (`time`, `lat`, `lon`) (degrees).
    pub fn by_centre(
        request: pb::BatchRequest,
        time: pb::sample_by_centre::Time,
        lat: f64,
        lon: f64,
    ) -> Self {
        Self {
            request: Some(request),
            selector: Some(pb::sample_request::Selector::ByCentre(pb::SampleByCentre {
                time: Some(time),
                lat,
                lon,
            })),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connect_validates() {
        assert!(matches!(
            LoaderClient::connect(ClientConfig::default()).await,
            Err(ClientError::NoEndpoints)
        ));
        let mut tls = ClientConfig::new(["http://127.0.0.1:1"]);
        tls.tls_domain = Some("loader".into());
        assert!(matches!(
            LoaderClient::connect(tls).await,
            Err(ClientError::Config(_))
        ));
        let mut token = ClientConfig::new(["127.0.0.1:1"]);
        token.bearer_token = Some("bad\ntoken".into());
        assert!(matches!(
            LoaderClient::connect(token).await,
            Err(ClientError::InvalidToken)
        ));
        assert!(matches!(
            LoaderClient::connect(ClientConfig::new(["http://[bad"])).await,
            Err(ClientError::InvalidEndpoint { .. })
        ));
        for frame in [(1 << 14) - 1, 1 << 24] {
            let mut config = ClientConfig::new(["127.0.0.1:1"]);
            config.max_frame_bytes = frame;
            assert!(
                matches!(LoaderClient::connect(config).await, Err(ClientError::Config(m)) if m.contains("max_frame_bytes")),
                "frame size {frame} accepted"
            );
        }
        // Lazy: nothing listens there, and that is no error yet.
        assert!(
            LoaderClient::connect(ClientConfig::new(["127.0.0.1:1"]))
                .await
                .is_ok()
        );
    }
}
