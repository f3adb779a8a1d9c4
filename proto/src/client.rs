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
//! [`crate::stripe`]) and starting on endpoint `k`, each with its own prefetch of
//! [`ClientConfig::prefetch`] batches, its own cursor, its own HTTP/2 connections and its own
//! failover to the other endpoints (round-robin from `k + 1`, resuming from its own cursor). A
//! merge task delivers their batches in a fixed round-robin order, so the stream is still a pure
//! function of the request (and K) — which also means a slow loader slows the whole stream to its
//! pace. The stream's [`StreamCursor`] encodes every sub-stream's position (see [`crate::stripe`]); it
//! is meaningful only with the same number of endpoints and batch size. [`StreamStats`] sum over
//! the sub-streams. Tiles-mode streams are never striped: their order is the tiling's.
//!
//! Unary calls ([`LoaderClient::list_datasets`], [`LoaderClient::dataset_info`],
//! [`LoaderClient::sample`]) retry the same failures across endpoints under the same policy.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use prost::Message;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tonic::codec::CompressionEncoding;
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Status};

use crate::batch::{Batch, BatchAssembler, BatchError, StreamCursor};
use crate::pb;
use crate::pool::BufferPool;
use crate::stripe::{Accepted, Stripe, StripeError, sub_shard};

/// gRPC compression of the batches the server sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Compression {
    Gzip,
    Zstd,
}

impl From<Compression> for CompressionEncoding {
    fn from(c: Compression) -> Self {
        match c {
            Compression::Gzip => Self::Gzip,
            Compression::Zstd => Self::Zstd,
        }
    }
}

/// When and how often to reconnect. Failures count from the last batch received: every complete
/// batch resets both the attempt counter and the deadline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ReconnectPolicy {
    /// Wait before the first retry; doubles with every consecutive failure.
    #[serde(rename = "initial_backoff_ms", with = "millis")]
    pub initial_backoff: Duration,
    /// Longest wait between two attempts.
    #[serde(rename = "max_backoff_ms", with = "millis")]
    pub max_backoff: Duration,
    /// Give up after this many consecutive failed attempts (`None`: never for this reason).
    pub max_attempts: Option<u32>,
    /// Give up when no batch arrived for this long (`None`: never for this reason).
    #[serde(rename = "give_up_after_ms", with = "opt_millis")]
    pub give_up_after: Option<Duration>,
}

impl Default for ReconnectPolicy {
    /// 100 ms doubling to 5 s, unlimited attempts within 10 minutes: long enough for a loader
    /// to restart and reopen its stores.
    fn default() -> Self {
        Self {
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            max_attempts: None,
            give_up_after: Some(Duration::from_secs(600)),
        }
    }
}

impl ReconnectPolicy {
    /// The wait before retry number `attempt` (1-based), without jitter.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let factor = 2u32.saturating_pow(attempt.saturating_sub(1));
        self.initial_backoff
            .saturating_mul(factor)
            .min(self.max_backoff)
    }
}

/// How to reach the loader.
#[derive(Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct ClientConfig {
    /// Loader addresses, tried round-robin: `http://host:port`, `https://host:port`, or
    /// `host:port` (https when TLS is configured, http otherwise).
    pub endpoints: Vec<String>,
    /// Sent as `authorization: Bearer <token>` with every call.
    pub bearer_token: Option<String>,
    /// PEM of the CA that signed the servers' certificates (enables TLS).
    pub tls_ca_pem: Option<Vec<u8>>,
    /// Name to verify the server certificate against, when it differs from the endpoint's host.
    pub tls_domain: Option<String>,
    /// Largest message accepted or sent (tonic's default of 4 MiB is far below one batch).
    pub max_message_bytes: usize,
    /// Decoded batches kept ready ahead of the consumer (at least 1).
    pub prefetch: usize,
    pub reconnect: ReconnectPolicy,
    /// Ask the server to compress batches (worth it only on slow links: it costs CPU on both
    /// sides). Requests are never compressed, so any server accepts them.
    pub compression: Option<Compression>,
    #[serde(rename = "connect_timeout_ms", with = "millis")]
    pub connect_timeout: Duration,
    /// HTTP/2 flow-control windows. Large windows keep a fast link busy; they also bound how
    /// much undecoded data sits in the transport when the consumer is slow.
    pub stream_window_bytes: u32,
    pub connection_window_bytes: u32,
    /// Largest HTTP/2 frame the server may send us (16 KiB to 16 MiB − 1). The protocol's
    /// default of 16 KiB cuts a batch into thousands of frames that both sides handle one by
    /// one: 1 MiB frames raised `pull` of the reference case from 78–82 to 104–117 samples/s.
    pub max_frame_bytes: u32,
    /// HTTP/2 keep-alive pings, so a server that vanished without closing the connection is
    /// noticed (`None`: no pings).
    #[serde(rename = "keepalive_interval_ms", with = "opt_millis")]
    pub keepalive_interval: Option<Duration>,
    #[serde(rename = "keepalive_timeout_ms", with = "millis")]
    pub keepalive_timeout: Duration,
    /// Spread each training-mode stream over all endpoints at once (see the module docs)
    /// instead of using one at a time. Off by default: an endpoint list has always meant
    /// replicas to fail over between, and a striped stream has another order and another
    /// meaning of its cursor, so turning it on silently would break the resumption of existing
    /// checkpoints. Has no effect with a single endpoint.
    pub stripe: bool,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            endpoints: Vec::new(),
            bearer_token: None,
            tls_ca_pem: None,
            tls_domain: None,
            max_message_bytes: 256 << 20,
            prefetch: 4,
            reconnect: ReconnectPolicy::default(),
            compression: None,
            connect_timeout: Duration::from_secs(5),
            stream_window_bytes: 8 << 20,
            connection_window_bytes: 16 << 20,
            max_frame_bytes: 1 << 20,
            keepalive_interval: Some(Duration::from_secs(20)),
            keepalive_timeout: Duration::from_secs(20),
            stripe: false,
        }
    }
}

impl ClientConfig {
    /// The defaults with these endpoints.
    pub fn new<S: Into<String>>(endpoints: impl IntoIterator<Item = S>) -> Self {
        Self {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            ..Self::default()
        }
    }
}

impl fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the token: configs end up in logs.
        f.debug_struct("ClientConfig")
            .field("endpoints", &self.endpoints)
            .field(
                "bearer_token",
                &self.bearer_token.as_ref().map(|_| "<redacted>"),
            )
            .field("tls_ca_pem", &self.tls_ca_pem.as_ref().map(Vec::len))
            .field("tls_domain", &self.tls_domain)
            .field("max_message_bytes", &self.max_message_bytes)
            .field("prefetch", &self.prefetch)
            .field("reconnect", &self.reconnect)
            .field("compression", &self.compression)
            .field("connect_timeout", &self.connect_timeout)
            .field("stream_window_bytes", &self.stream_window_bytes)
            .field("connection_window_bytes", &self.connection_window_bytes)
            .field("max_frame_bytes", &self.max_frame_bytes)
            .field("keepalive_interval", &self.keepalive_interval)
            .field("keepalive_timeout", &self.keepalive_timeout)
            .field("stripe", &self.stripe)
            .finish()
    }
}

/// What can go wrong talking to the loader.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    #[error("no loader endpoints configured")]
    NoEndpoints,
    #[error("invalid endpoint `{endpoint}`: {source}")]
    InvalidEndpoint {
        endpoint: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("the bearer token is not a valid header value")]
    InvalidToken,
    #[error("client configuration: {0}")]
    Config(String),
    /// The loader (or the transport, for a failure not worth retrying) answered with this status.
    #[error("loader call failed with {}: {}", .0.code(), .0.message())]
    Status(Box<Status>),
    /// Retryable failures went on past the reconnect policy.
    #[error(
        "gave up after {attempts} failed attempts over {elapsed:?}; last: {}: {}",
        last.code(),
        last.message()
    )]
    RetriesExhausted {
        attempts: u32,
        elapsed: Duration,
        last: Box<Status>,
    },
    /// The server sent a batch that cannot be decoded or reassembled.
    #[error("malformed batch from the loader: {0}")]
    Batch(#[from] BatchError),
    /// A striped stream cannot start (an unstriped cursor) or its sub-streams disagree.
    #[error("striped stream: {0}")]
    Stripe(#[from] StripeError),
}

impl ClientError {
    /// The gRPC status behind the error, if any.
    pub fn status(&self) -> Option<&Status> {
        match self {
            Self::Status(s) | Self::RetriesExhausted { last: s, .. } => Some(s),
            _ => None,
        }
    }

    /// The gRPC code behind the error, if any.
    pub fn code(&self) -> Option<Code> {
        self.status().map(Status::code)
    }
}

impl From<Status> for ClientError {
    fn from(status: Status) -> Self {
        Self::Status(Box::new(status))
    }
}

/// Whether a failed call is worth repeating (on the next endpoint): UNAVAILABLE, or a status the
/// client synthesized from a transport failure. Statuses the server sent carry no error source;
/// those tonic builds from connection, HTTP/2 or I/O errors do, whatever code they map to.
pub fn is_retryable(status: &Status) -> bool {
    match status.code() {
        Code::Unavailable => true,
        Code::Unknown | Code::Internal | Code::Cancelled | Code::Aborted => {
            std::error::Error::source(status).is_some()
        }
        _ => false,
    }
}

/// Adds the bearer token to every call.
#[derive(Clone)]
struct BearerAuth(Option<AsciiMetadataValue>);

impl fmt::Debug for BearerAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() {
            "BearerAuth(<redacted>)"
        } else {
            "BearerAuth(none)"
        })
    }
}

impl Interceptor for BearerAuth {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

type Grpc = pb::loader_client::LoaderClient<InterceptedService<Channel, BearerAuth>>;

#[derive(Debug)]
struct Shared {
    /// (address as configured, lazily connecting channel).
    endpoints: Vec<(String, Channel)>,
    /// The same endpoints, to open connections of their own (see [`Route::Stripe`]).
    builders: Vec<Endpoint>,
    auth: BearerAuth,
    config: ClientConfig,
    /// The endpoint new calls start on: the last one that has not failed.
    current: AtomicUsize,
}

impl Shared {
    fn grpc(&self, index: usize) -> Grpc {
        self.grpc_on(self.endpoints[index].1.clone())
    }

    fn grpc_on(&self, channel: Channel) -> Grpc {
        let mut client =
            pb::loader_client::LoaderClient::with_interceptor(channel, self.auth.clone())
                .max_decoding_message_size(self.config.max_message_bytes)
                .max_encoding_message_size(self.config.max_message_bytes);
        if let Some(c) = self.config.compression {
            client = client.accept_compressed(c.into());
        }
        client
    }

    fn current(&self) -> usize {
        self.current.load(Ordering::Relaxed)
    }

    /// Moves new calls off `failed`; calls failing on the same endpoint at once move them once.
    fn rotate(&self, failed: usize) -> usize {
        let next = (failed + 1) % self.endpoints.len();
        let _ = self
            .current
            .compare_exchange(failed, next, Ordering::Relaxed, Ordering::Relaxed);
        next
    }
}

/// HTTP/2's bounds on SETTINGS_MAX_FRAME_SIZE (RFC 9113 §6.5.2).
const MIN_FRAME_BYTES: u32 = 1 << 14;
const MAX_FRAME_BYTES: u32 = (1 << 24) - 1;

fn endpoint(raw: &str, config: &ClientConfig) -> Result<Endpoint, ClientError> {
    let tls_configured = config.tls_ca_pem.is_some() || config.tls_domain.is_some();
    let uri = if raw.contains("://") {
        raw.to_string()
    } else if tls_configured {
        format!("https://{raw}")
    } else {
        format!("http://{raw}")
    };
    let https = uri.starts_with("https://");
    if tls_configured && !https {
        // tonic would silently connect in plaintext: refuse rather than leak the token.
        return Err(ClientError::Config(format!(
            "endpoint `{raw}` is not https:// but TLS is configured"
        )));
    }
    if !(MIN_FRAME_BYTES..=MAX_FRAME_BYTES).contains(&config.max_frame_bytes) {
        // h2 asserts on this range; a config must not be able to panic the client.
        return Err(ClientError::Config(format!(
            "max_frame_bytes = {} is outside HTTP/2's {MIN_FRAME_BYTES}..={MAX_FRAME_BYTES}",
            config.max_frame_bytes
        )));
    }
    let invalid = |source| ClientError::InvalidEndpoint {
        endpoint: raw.to_string(),
        source,
    };
    let mut ep = Endpoint::from_shared(uri)
        .map_err(invalid)?
        .connect_timeout(config.connect_timeout)
        .tcp_nodelay(true)
        .initial_stream_window_size(config.stream_window_bytes)
        .initial_connection_window_size(config.connection_window_bytes)
        .max_frame_size(config.max_frame_bytes);
    if let Some(interval) = config.keepalive_interval {
        ep = ep
            .http2_keep_alive_interval(interval)
            .keep_alive_timeout(config.keepalive_timeout);
    }
    if https {
        crate::tls::install_crypto_provider();
        let mut tls = ClientTlsConfig::new();
        tls = match &config.tls_ca_pem {
            Some(pem) => tls.ca_certificate(Certificate::from_pem(pem)),
            None => tls.with_enabled_roots(),
        };
        if let Some(domain) = &config.tls_domain {
            tls = tls.domain_name(domain.clone());
        }
        ep = ep.tls_config(tls).map_err(invalid)?;
    } else if config.bearer_token.is_some() {
        let host = ep.uri().host().unwrap_or_default();
        if !matches!(host, "127.0.0.1" | "localhost" | "[::1]" | "::1") {
            tracing::warn!(endpoint = raw, "sending the bearer token without TLS");
        }
    }
    Ok(ep)
}

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
        let counters = Arc::new(Counters::default());
        // Room for the buffers of the batches a consumer can hold while the prefetched ones
        // wait: four tensors per field.
        let pool = Arc::new(BufferPool::new(
            4 * request.fields.len().max(1) * (self.shared.config.prefetch.max(1) + 2),
            u64::MAX,
        ));
        let striped = self.shared.config.stripe
            && self.shared.endpoints.len() > 1
            && request.mode != pb::Mode::Tiles as i32;
        let (rx, task) = if striped {
            // The sub-streams hold the prefetch; the merge only hands over one batch at a time.
            let (tx, rx) = mpsc::channel(1);
            let task = tokio::spawn(run_striped(
                self.shared.clone(),
                request,
                tx,
                counters.clone(),
                pool.clone(),
            ));
            (rx, task)
        } else {
            let (tx, rx) = mpsc::channel(self.shared.config.prefetch.max(1));
            let (shared, c, p) = (self.shared.clone(), counters.clone(), pool.clone());
            let task = tokio::spawn(async move {
                run_stream(shared, request, tx, c, p, Route::Shared).await;
            });
            (rx, task)
        };
        LoaderStream {
            rx,
            task,
            counters,
            pool,
            cursor: None,
            delivered: 0,
            sub_streams: if striped {
                self.shared.endpoints.len()
            } else {
                1
            },
        }
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

/// Consecutive failures since the last progress.
struct Retry<'a> {
    policy: &'a ReconnectPolicy,
    failures: u32,
    since: Instant,
}

impl<'a> Retry<'a> {
    fn new(policy: &'a ReconnectPolicy) -> Self {
        Self {
            policy,
            failures: 0,
            since: Instant::now(),
        }
    }

    fn progress(&mut self) {
        self.failures = 0;
        self.since = Instant::now();
    }

    /// The wait before the next attempt, or the error to give up with.
    fn after_failure(&mut self, status: Status, endpoint: &str) -> Result<Duration, ClientError> {
        self.failures += 1;
        let elapsed = self.since.elapsed();
        let delay = jitter(self.policy.backoff(self.failures));
        let out_of_attempts = self
            .policy
            .max_attempts
            .is_some_and(|max| self.failures >= max);
        let out_of_time = self
            .policy
            .give_up_after
            .is_some_and(|limit| elapsed + delay > limit);
        if out_of_attempts || out_of_time {
            return Err(ClientError::RetriesExhausted {
                attempts: self.failures,
                elapsed,
                last: Box::new(status),
            });
        }
        tracing::warn!(
            endpoint,
            code = ?status.code(),
            message = status.message(),
            attempt = self.failures,
            delay_ms = delay.as_millis() as u64,
            "loader call failed; retrying"
        );
        Ok(delay)
    }
}

/// Scales `d` by a factor in [0.8, 1.2), so clients that lost the same server do not all come
/// back in the same instant. The clock's sub-second digits are random enough for that.
fn jitter(d: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |t| t.subsec_nanos());
    d.mul_f64(0.8 + 0.4 * f64::from(nanos % 1_000_000) / 1e6)
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
    /// keep, so each fresh one came back as pages the kernel zeroes: 3–4 % of a `pull`'s CPU).
    /// Optional: a batch that is simply dropped frees its memory.
    pub fn recycle(&self, batch: Batch) {
        batch.recycle(&self.pool);
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

/// `Duration` as integer milliseconds (readable in TOML).
mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

/// `Option<Duration>` as integer milliseconds.
mod opt_millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&(d.as_millis() as u64)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Option::<u64>::deserialize(d).map(|ms| ms.map(Duration::from_millis))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let p = ReconnectPolicy {
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
            ..ReconnectPolicy::default()
        };
        let ms: Vec<u128> = (1..=6).map(|a| p.backoff(a).as_millis()).collect();
        assert_eq!(ms, vec![100, 200, 400, 800, 1000, 1000]);
        assert_eq!(p.backoff(200), Duration::from_secs(1));
        for _ in 0..20 {
            let j = jitter(Duration::from_millis(1000)).as_millis();
            assert!((800..1200).contains(&j), "{j}");
        }
    }

    #[test]
    fn retryable_statuses() {
        assert!(is_retryable(&Status::unavailable("down")));
        // Sent by a server: no source.
        assert!(!is_retryable(&Status::internal("bug")));
        assert!(!is_retryable(&Status::invalid_argument("batch_size")));
        assert!(!is_retryable(&Status::unauthenticated("token")));
        // Built by tonic from an I/O failure: has a source.
        let io = std::io::Error::new(std::io::ErrorKind::BrokenPipe, "broken pipe");
        let status = Status::from_error(Box::new(io));
        assert!(std::error::Error::source(&status).is_some());
        assert!(is_retryable(&status), "{status:?}");
    }

    #[test]
    fn config_serde_and_debug() {
        let mut config = ClientConfig::new(["127.0.0.1:50051"]);
        config.bearer_token = Some("secret".into());
        config.compression = Some(Compression::Zstd);
        let json = serde_json::to_string(&config).unwrap();
        assert!(json.contains("\"initial_backoff_ms\":100"), "{json}");
        let back: ClientConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(back.reconnect, config.reconnect);
        assert_eq!(back.compression, Some(Compression::Zstd));
        let partial: ClientConfig =
            serde_json::from_str(r#"{"endpoints": ["a:1"], "prefetch": 2}"#).unwrap();
        assert_eq!(partial.prefetch, 2);
        assert_eq!(partial.max_message_bytes, 256 << 20);
        assert!(!format!("{config:?}").contains("secret"));
    }

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
