//! The streaming client against a real tonic server on 127.0.0.1: prefetch bounds, multi-part
//! reassembly, reconnection with exact resume after the server dies, early stream ends, status
//! handling and the bearer token.
//!
//! The test server implements the generated `Loader` trait deterministically: epoch `e` has
//! `samples_per_epoch` samples whose ids are their positions, so the cursor alone says which
//! sample comes next, and every sample's values are a function of (epoch, id) that the tests
//! recompute to check what arrived.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use atmorep_proto::batch::{Batch, FieldBatch, StreamCursor, Window};
use atmorep_proto::client::{ClientConfig, ClientError, Compression, LoaderClient};
use atmorep_proto::pb::loader_server::{Loader, LoaderServer};
use atmorep_proto::{Dtype, pb};
use futures::{Stream, StreamExt};
use tokio::sync::oneshot;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::codec::CompressionEncoding;
use tonic::{Code, Request, Response, Status};

const N: usize = 4;
const PE_WIDTH: usize = 2;

/// How the test server behaves.
#[derive(Debug, Clone)]
struct Behaviour {
    samples_per_epoch: u64,
    /// Values per token (makes batches as large as a test needs).
    token_numel: usize,
    /// Pause before each batch.
    delay: Duration,
    /// Split batches into parts of at most this many bytes (0: never).
    max_part_bytes: usize,
    /// End each call cleanly, without `end_of_stream`, after this many batches.
    batches_per_call: Option<u64>,
    /// Reject calls without `authorization: Bearer <token>`.
    token: Option<String>,
    /// After this many messages of a call, hang (a server about to die mid-batch).
    stall_after_messages: Option<u64>,
}

impl Default for Behaviour {
    fn default() -> Self {
        Self {
            samples_per_epoch: 10,
            token_numel: 3,
            delay: Duration::ZERO,
            max_part_bytes: 0,
            batches_per_call: None,
            token: None,
            stall_after_messages: None,
        }
    }
}

/// What the server saw; shared by the servers of one test, across restarts.
#[derive(Debug, Default)]
struct Seen {
    batches_produced: AtomicU64,
    /// `authorization` header of each call.
    auth: Mutex<Vec<Option<String>>>,
    /// `resume` of each `StreamBatches` call.
    resumes: Mutex<Vec<Option<StreamCursor>>>,
}

#[derive(Debug, Clone)]
struct TestLoader {
    behaviour: Behaviour,
    seen: Arc<Seen>,
}

/// The field of sample (`epoch`, `id`): token `k` value `j` is `epoch·1000 + id + k/8 + j/64`
/// (exact in f32), `id % 3` masked tokens (the even ones), targets the original tokens.
fn expected_field(epoch: u64, id: u64, token_numel: usize) -> FieldBatch {
    let base = (epoch * 1000 + id) as f32;
    let original: Vec<f32> = (0..N * token_numel)
        .map(|i| base + (i / token_numel) as f32 / 8.0 + (i % token_numel) as f32 / 64.0)
        .collect();
    let masked: Vec<u32> = (0..(id % 3) as u32).map(|k| 2 * k).collect();
    let mut source = original.clone();
    let mut target = Vec::new();
    for &k in &masked {
        let token = k as usize * token_numel..(k as usize + 1) * token_numel;
        target.extend_from_slice(&original[token.clone()]);
        source[token].fill(0.0);
    }
    FieldBatch {
        name: "t".into(),
        source,
        source_shape: [1, N, token_numel],
        target,
        masked_indices: vec![masked],
        token_info: (0..N * 8).map(|i| 2020.0 + i as f32).collect(),
        pe: (0..N * PE_WIDTH).map(|i| id as f32 + i as f32).collect(),
        pe_width: PE_WIDTH,
        windows: vec![Window {
            time_start: id as usize,
            lat_start: 1,
            lon_start: epoch as usize,
            size: [3, 9, 9],
        }],
    }
}

/// Concatenates single-sample fields into one batch field.
fn concat(fields: Vec<FieldBatch>, token_numel: usize) -> FieldBatch {
    let mut out = FieldBatch {
        name: "t".into(),
        source_shape: [0, N, token_numel],
        pe_width: PE_WIDTH,
        ..FieldBatch::default()
    };
    for f in fields {
        out.source_shape[0] += 1;
        out.source.extend(f.source);
        out.target.extend(f.target);
        out.masked_indices.extend(f.masked_indices);
        out.token_info.extend(f.token_info);
        out.pe.extend(f.pe);
        out.windows.extend(f.windows);
    }
    out
}

fn advance(c: StreamCursor, n: u64) -> StreamCursor {
    if c.position + 1 >= n {
        StreamCursor {
            epoch: c.epoch + 1,
            position: 0,
        }
    } else {
        StreamCursor {
            epoch: c.epoch,
            position: c.position + 1,
        }
    }
}

type BatchStreamOf = Pin<Box<dyn Stream<Item = Result<pb::Batch, Status>> + Send>>;

impl TestLoader {
    fn check_auth<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let header = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        self.seen.auth.lock().unwrap().push(header.clone());
        match &self.behaviour.token {
            Some(token) if header.as_deref() != Some(&format!("Bearer {token}")) => {
                Err(Status::unauthenticated("missing or wrong bearer token"))
            }
            _ => Ok(()),
        }
    }

    /// The next batch from `cursor`, or `None` when `end_epoch` is reached.
    fn batch(
        &self,
        sequence: u64,
        cursor: &mut StreamCursor,
        size: u32,
        end: Option<u64>,
    ) -> Batch {
        let b = &self.behaviour;
        let (mut ids, mut epochs, mut fields) = (Vec::new(), Vec::new(), Vec::new());
        while ids.len() < size as usize && end.is_none_or(|e| cursor.epoch < e) {
            ids.push(cursor.position);
            epochs.push(cursor.epoch);
            fields.push(expected_field(cursor.epoch, cursor.position, b.token_numel));
            *cursor = advance(*cursor, b.samples_per_epoch);
        }
        Batch {
            sequence,
            epoch: epochs.first().copied().unwrap_or(cursor.epoch),
            sample_ids: ids,
            sample_epochs: epochs,
            fields: vec![concat(fields, b.token_numel)],
            cursor_after: *cursor,
            end_of_stream: end.is_some_and(|e| cursor.epoch >= e),
        }
    }
}

#[tonic::async_trait]
impl Loader for TestLoader {
    type StreamBatchesStream = BatchStreamOf;

    async fn list_datasets(
        &self,
        request: Request<pb::ListDatasetsRequest>,
    ) -> Result<Response<pb::ListDatasetsResponse>, Status> {
        self.check_auth(&request)?;
        Ok(Response::new(pb::ListDatasetsResponse {
            datasets: vec![pb::DatasetSummary {
                name: "demo".into(),
                variables: vec!["t".into()],
                ..Default::default()
            }],
        }))
    }

    async fn get_dataset_info(
        &self,
        request: Request<pb::DatasetInfoRequest>,
    ) -> Result<Response<pb::DatasetInfo>, Status> {
        self.check_auth(&request)?;
        let name = request.into_inner().dataset;
        if name != "demo" {
            return Err(Status::not_found(format!("no dataset `{name}`")));
        }
        Ok(Response::new(pb::DatasetInfo {
            name,
            ..Default::default()
        }))
    }

    async fn stream_batches(
        &self,
        request: Request<pb::BatchRequest>,
    ) -> Result<Response<Self::StreamBatchesStream>, Status> {
        self.check_auth(&request)?;
        let request = request.into_inner();
        if request.batch_size == 0 {
            return Err(Status::invalid_argument("batch_size must be at least 1"));
        }
        let mut cursor: StreamCursor = request.resume.map(Into::into).unwrap_or_default();
        self.seen
            .resumes
            .lock()
            .unwrap()
            .push(request.resume.map(Into::into));
        if cursor.position >= self.behaviour.samples_per_epoch {
            cursor = StreamCursor {
                epoch: cursor.epoch + 1,
                position: 0,
            };
        }
        let loader = self.clone();
        let stall = self.behaviour.stall_after_messages;
        let state = (loader, cursor, 0u64, false);
        let stream =
            futures::stream::unfold(state, move |(loader, mut cursor, seq, done)| async move {
                let b = &loader.behaviour;
                if done || b.batches_per_call.is_some_and(|n| seq >= n) {
                    return None;
                }
                tokio::time::sleep(b.delay).await;
                let batch = loader.batch(seq, &mut cursor, request.batch_size, request.end_epoch);
                let end = batch.end_of_stream;
                loader.seen.batches_produced.fetch_add(1, Ordering::SeqCst);
                let max = if b.max_part_bytes > 0 {
                    b.max_part_bytes
                } else {
                    usize::MAX
                };
                let parts = batch
                    .into_parts(Dtype::F32, max)
                    .expect("consistent test batch");
                let items: Vec<Result<pb::Batch, Status>> = parts.into_iter().map(Ok).collect();
                Some((futures::stream::iter(items), (loader, cursor, seq + 1, end)))
            })
            .flatten()
            .enumerate()
            .then(move |(i, item)| async move {
                if stall.is_some_and(|n| i as u64 >= n) {
                    futures::future::pending::<()>().await;
                }
                item
            });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn get_sample(
        &self,
        request: Request<pb::SampleRequest>,
    ) -> Result<Response<pb::Batch>, Status> {
        self.check_auth(&request)?;
        let Some(pb::sample_request::Selector::ById(sel)) = request.into_inner().selector else {
            return Err(Status::invalid_argument(
                "selector: only by_id is served here",
            ));
        };
        let mut cursor = StreamCursor {
            epoch: sel.epoch,
            position: sel.id,
        };
        let batch = self.batch(0, &mut cursor, 1, None);
        Ok(Response::new(
            batch.into_parts(Dtype::Bf16, usize::MAX).unwrap().remove(0),
        ))
    }

    async fn get_statistics(
        &self,
        request: Request<pb::StatisticsRequest>,
    ) -> Result<Response<pb::Statistics>, Status> {
        self.check_auth(&request)?;
        Err(Status::failed_precondition(
            "dataset: this test loader has no statistics",
        ))
    }
}

/// A loader in its own runtime, so that killing it drops every connection at once, as a dying
/// process would.
struct TestServer {
    runtime: Option<tokio::runtime::Runtime>,
    addr: SocketAddr,
    _shutdown: oneshot::Sender<()>,
}

impl TestServer {
    fn start(loader: TestLoader) -> Self {
        Self::start_on(loader, bind())
    }

    fn start_on(loader: TestLoader, listener: std::net::TcpListener) -> Self {
        Self::start_with(loader, listener, None)
    }

    fn start_with(
        loader: TestLoader,
        listener: std::net::TcpListener,
        tls: Option<tonic::transport::ServerTlsConfig>,
    ) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let addr = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            let service = LoaderServer::new(loader)
                .max_encoding_message_size(64 << 20)
                .send_compressed(CompressionEncoding::Zstd);
            let mut builder = tonic::transport::Server::builder();
            if let Some(tls) = tls {
                builder = builder.tls_config(tls).unwrap();
            }
            builder
                .add_service(service)
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                    let _ = rx.await;
                })
                .await
                .unwrap();
        });
        Self {
            runtime: Some(runtime),
            addr,
            _shutdown: tx,
        }
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Drops the server with all its connections and streams, mid-flight.
    fn kill(mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

fn bind() -> std::net::TcpListener {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap()
}

fn loader(behaviour: Behaviour) -> (TestLoader, Arc<Seen>) {
    let seen = Arc::new(Seen::default());
    (
        TestLoader {
            behaviour,
            seen: seen.clone(),
        },
        seen,
    )
}

fn request(batch_size: u32, end_epoch: Option<u64>) -> pb::BatchRequest {
    pb::BatchRequest {
        dataset: "demo".into(),
        batch_size,
        end_epoch,
        ..Default::default()
    }
}

fn fast_config(endpoints: Vec<String>) -> ClientConfig {
    let mut config = ClientConfig::new(endpoints);
    config.reconnect.initial_backoff = Duration::from_millis(20);
    config.reconnect.max_backoff = Duration::from_millis(200);
    config.reconnect.give_up_after = Some(Duration::from_secs(20));
    config
}

/// The (epoch, id) order an uninterrupted stream delivers from the start to `end_epoch`.
fn full_order(samples_per_epoch: u64, end_epoch: u64) -> Vec<(u64, u64)> {
    (0..end_epoch)
        .flat_map(|e| (0..samples_per_epoch).map(move |i| (e, i)))
        .collect()
}

/// Checks every sample's values and returns the (epoch, id) pairs in arrival order.
fn check_batch(batch: &Batch, token_numel: usize) -> Vec<(u64, u64)> {
    let field = batch.field("t").expect("field t");
    assert_eq!(field.batch_size(), batch.len());
    let mut out = Vec::new();
    for (i, (&id, &epoch)) in batch
        .sample_ids
        .iter()
        .zip(&batch.sample_epochs)
        .enumerate()
    {
        let want = expected_field(epoch, id, token_numel);
        assert_eq!(
            field.source_of(i),
            &want.source[..],
            "source of ({epoch}, {id})"
        );
        assert_eq!(
            field.target_of(i),
            &want.target[..],
            "target of ({epoch}, {id})"
        );
        assert_eq!(field.masked_indices[i], want.masked_indices[0]);
        assert_eq!(field.token_info_of(i), &want.token_info[..]);
        assert_eq!(field.pe_of(i), &want.pe[..]);
        assert_eq!(field.windows[i], want.windows[0]);
        out.push((epoch, id));
    }
    out
}

async fn collect_all(
    stream: &mut atmorep_proto::LoaderStream,
    token_numel: usize,
) -> Vec<(u64, u64)> {
    let mut ids = Vec::new();
    while let Some(batch) = stream.next().await {
        let batch = batch.expect("batch");
        ids.extend(check_batch(&batch, token_numel));
        // The next batches are decoded into this one's buffers: their values are checked too.
        stream.recycle(batch);
    }
    ids
}

async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(60), f)
        .await
        .unwrap_or_else(|_| panic!("{what} timed out"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finite_stream_delivers_every_sample_once() {
    let (loader, seen) = loader(Behaviour::default());
    let server = TestServer::start(loader);
    let client = LoaderClient::connect(fast_config(vec![server.endpoint()]))
        .await
        .unwrap();
    let mut stream = client.stream(request(4, Some(2)));
    let ids = within("stream", collect_all(&mut stream, 3)).await;
    assert_eq!(ids, full_order(10, 2));
    assert_eq!(
        stream.cursor(),
        Some(StreamCursor {
            epoch: 2,
            position: 0
        })
    );
    let stats = stream.stats();
    assert_eq!(stats.reconnects, 0);
    assert_eq!(stats.batches_delivered, 5);
    assert!(stats.bytes_received > 0);
    assert_eq!(seen.resumes.lock().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_part_batches_are_reassembled() {
    let (loader, _seen) = loader(Behaviour {
        samples_per_epoch: 13,
        token_numel: 50,
        max_part_bytes: 3000,
        ..Behaviour::default()
    });
    let server = TestServer::start(loader);
    let client = LoaderClient::connect(fast_config(vec![server.endpoint()]))
        .await
        .unwrap();
    let mut stream = client.stream(request(5, Some(2)));
    let ids = within("stream", collect_all(&mut stream, 50)).await;
    assert_eq!(ids, full_order(13, 2));
    let stats = stream.stats();
    assert!(
        stats.messages_received >= 2 * stats.batches_received,
        "batches were not split: {stats:?}"
    );
    assert_eq!(stats.batches_delivered, 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetch_is_bounded() {
    // ~100 KB batches against 64 KiB HTTP/2 windows: the transport holds less than a batch.
    let (loader, seen) = loader(Behaviour {
        samples_per_epoch: 1000,
        token_numel: 3000,
        ..Behaviour::default()
    });
    let server = TestServer::start(loader);
    let mut config = fast_config(vec![server.endpoint()]);
    config.prefetch = 2;
    config.stream_window_bytes = 65_535;
    config.connection_window_bytes = 65_535;
    let client = LoaderClient::connect(config).await.unwrap();
    let mut stream = client.stream(request(2, None));
    within("first batch", stream.next()).await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stats = stream.stats();
    let waiting = stats.batches_received - stats.batches_delivered;
    assert!(
        waiting <= 2,
        "{waiting} batches buffered with prefetch 2: {stats:?}"
    );
    assert_eq!(
        waiting, 2,
        "the prefetch buffer should have filled: {stats:?}"
    );
    let produced = seen.batches_produced.load(Ordering::SeqCst);
    assert!(
        produced <= stats.batches_received + 6,
        "the server ran ahead: produced {produced}, received {}",
        stats.batches_received
    );
    // Consuming frees room and the stream moves on.
    for _ in 0..5 {
        within("next batch", stream.next()).await.unwrap().unwrap();
    }
    assert_eq!(stream.stats().batches_delivered, 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_to_the_next_endpoint_and_resumes_exactly() {
    // One sample per part: 3 parts per batch. The first server sends 4 batches and the first
    // part of the 5th, then hangs until it is killed — so the client loses a half-received
    // batch and must get it again, whole, from the second server.
    let behaviour = Behaviour {
        samples_per_epoch: 25,
        token_numel: 40,
        max_part_bytes: 1200,
        stall_after_messages: Some(13),
        ..Behaviour::default()
    };
    let (loader_a, seen) = loader(behaviour);
    let mut loader_b = loader_a.clone();
    loader_b.behaviour.stall_after_messages = None;
    loader_b.behaviour.delay = Duration::from_millis(2);
    let server_a = TestServer::start(loader_a);
    // The replacement's port is known up front (it is the second endpoint) but nobody serves
    // it until the first server is dead.
    let listener_b = bind();
    let endpoint_b = format!("http://{}", listener_b.local_addr().unwrap());
    let mut config = fast_config(vec![server_a.endpoint(), endpoint_b]);
    config.prefetch = 8;
    let client = LoaderClient::connect(config).await.unwrap();
    let mut stream = client.stream(request(3, Some(3)));

    let mut ids = Vec::new();
    for _ in 0..2 {
        let batch = within("batch before the kill", stream.next())
            .await
            .unwrap()
            .unwrap();
        ids.extend(check_batch(&batch, 40));
    }
    within("the stall", async {
        while stream.stats().messages_received < 13 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    server_a.kill();
    tokio::time::sleep(Duration::from_millis(150)).await;
    let _server_b = TestServer::start_on(loader_b, listener_b);
    ids.extend(within("rest of the stream", collect_all(&mut stream, 40)).await);

    assert_eq!(ids, full_order(25, 3), "every id exactly once, in order");
    let stats = stream.stats();
    assert_eq!(stats.reconnects, 1, "{stats:?}");
    assert_eq!(stats.discarded_messages, 1, "{stats:?}");
    assert_eq!(stats.batches_delivered, 25, "{stats:?}");
    let resumes = seen.resumes.lock().unwrap().clone();
    assert_eq!(
        resumes,
        vec![
            None,
            Some(StreamCursor {
                epoch: 0,
                position: 12
            })
        ],
        "resumed after the 4th complete batch"
    );
    assert_eq!(
        stream.cursor(),
        Some(StreamCursor {
            epoch: 3,
            position: 0
        })
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_that_ends_early_is_resumed() {
    let (loader, seen) = loader(Behaviour {
        samples_per_epoch: 20,
        batches_per_call: Some(2),
        ..Behaviour::default()
    });
    let server = TestServer::start(loader);
    let client = LoaderClient::connect(fast_config(vec![server.endpoint()]))
        .await
        .unwrap();
    let mut stream = client.stream(request(3, Some(1)));
    let ids = within("stream", collect_all(&mut stream, 3)).await;
    assert_eq!(ids, full_order(20, 1));
    // 7 batches, 2 per call.
    assert_eq!(stream.reconnects(), 3);
    let resumes = seen.resumes.lock().unwrap().clone();
    assert_eq!(
        resumes,
        vec![
            None,
            Some(StreamCursor {
                epoch: 0,
                position: 6
            }),
            Some(StreamCursor {
                epoch: 0,
                position: 12
            }),
            Some(StreamCursor {
                epoch: 0,
                position: 18
            }),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_argument_surfaces_immediately() {
    let (loader, seen) = loader(Behaviour::default());
    let server = TestServer::start(loader);
    let client = LoaderClient::connect(fast_config(vec![server.endpoint()]))
        .await
        .unwrap();
    let mut stream = client.stream(request(0, None));
    let started = std::time::Instant::now();
    let err = within("error", stream.next()).await.unwrap().unwrap_err();
    assert_eq!(err.code(), Some(Code::InvalidArgument), "{err}");
    assert!(matches!(err, ClientError::Status(_)));
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(within("end", stream.next()).await.is_none());
    assert_eq!(stream.reconnects(), 0);
    assert_eq!(
        seen.auth.lock().unwrap().len(),
        1,
        "called once, not retried"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_token_reaches_the_server() {
    let (loader, seen) = loader(Behaviour {
        token: Some("s3cret".into()),
        ..Behaviour::default()
    });
    let server = TestServer::start(loader);
    let mut config = fast_config(vec![server.endpoint()]);
    config.bearer_token = Some("s3cret".into());
    let client = LoaderClient::connect(config).await.unwrap();
    let datasets = within("list", client.list_datasets()).await.unwrap();
    assert_eq!(datasets[0].name, "demo");
    let mut stream = client.stream(request(5, Some(1)));
    assert_eq!(
        within("stream", collect_all(&mut stream, 3)).await.len(),
        10
    );
    let auth = seen.auth.lock().unwrap().clone();
    assert_eq!(auth.len(), 2);
    assert!(
        auth.iter().all(|a| a.as_deref() == Some("Bearer s3cret")),
        "{auth:?}"
    );

    // Without the token: UNAUTHENTICATED, at once, not retried.
    let anonymous = LoaderClient::connect(fast_config(vec![server.endpoint()]))
        .await
        .unwrap();
    let mut stream = anonymous.stream(request(5, Some(1)));
    let err = within("rejection", stream.next())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::Unauthenticated));
    assert!(stream.next().await.is_none());
    let err = anonymous.list_datasets().await.unwrap_err();
    assert_eq!(err.code(), Some(Code::Unauthenticated));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unary_calls_fail_over_and_decode() {
    let (loader, _seen) = loader(Behaviour::default());
    let server = TestServer::start(loader);
    // Nothing listens on the first endpoint any more.
    let dead = format!("http://{}", bind().local_addr().unwrap());
    let client = LoaderClient::connect(fast_config(vec![dead, server.endpoint()]))
        .await
        .unwrap();
    let datasets = within("list", client.list_datasets()).await.unwrap();
    assert_eq!(datasets.len(), 1);
    let info = within("info", client.dataset_info("demo")).await.unwrap();
    assert_eq!(info.name, "demo");
    let err = within("missing", client.dataset_info("nope"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::NotFound));

    let sample = within(
        "sample",
        client.sample(pb::SampleRequest::by_id(request(1, None), 1, 7)),
    )
    .await
    .unwrap();
    assert_eq!(sample.sample_ids, vec![7]);
    assert_eq!(sample.sample_epochs, vec![1]);
    // Served as bf16: values within bf16 precision, token info exact.
    let field = sample.field("t").unwrap();
    let want = expected_field(1, 7, 3);
    for (got, want) in field.source.iter().zip(&want.source) {
        assert!((got - want).abs() <= want.abs() / 128.0, "{got} vs {want}");
    }
    assert_eq!(field.token_info, want.token_info);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_stream() {
    let (loader, _seen) = loader(Behaviour {
        token_numel: 200,
        ..Behaviour::default()
    });
    let server = TestServer::start(loader);
    let mut config = fast_config(vec![server.endpoint()]);
    config.compression = Some(Compression::Zstd);
    let client = LoaderClient::connect(config).await.unwrap();
    let mut stream = client.stream(request(4, Some(1)));
    assert_eq!(
        within("stream", collect_all(&mut stream, 200)).await,
        full_order(10, 1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gives_up_after_max_attempts() {
    let dead = format!("http://{}", bind().local_addr().unwrap());
    let mut config = fast_config(vec![dead]);
    config.reconnect.max_attempts = Some(3);
    let client = LoaderClient::connect(config).await.unwrap();
    let mut stream = client.stream(request(1, None));
    let err = within("give up", stream.next()).await.unwrap().unwrap_err();
    match &err {
        ClientError::RetriesExhausted { attempts, last, .. } => {
            assert_eq!(*attempts, 3);
            assert_eq!(last.code(), Code::Unavailable);
        }
        other => panic!("expected RetriesExhausted, got {other}"),
    }
    assert_eq!(stream.reconnects(), 2);
    assert!(stream.next().await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resuming_at_the_end_yields_nothing() {
    let (loader, seen) = loader(Behaviour::default());
    let server = TestServer::start(loader);
    let client = LoaderClient::connect(fast_config(vec![server.endpoint()]))
        .await
        .unwrap();
    let mut req = request(4, Some(2));
    req.resume = Some(pb::Cursor {
        epoch: 2,
        position: 0,
    });
    let mut stream = client.stream(req);
    assert!(within("end", stream.next()).await.is_none());
    assert!(seen.resumes.lock().unwrap().is_empty(), "no call needed");
    // Mid-epoch resume continues exactly there.
    let mut req = request(4, Some(1));
    req.resume = Some(pb::Cursor {
        epoch: 0,
        position: 7,
    });
    let mut stream = client.stream(req);
    assert_eq!(
        within("tail", collect_all(&mut stream, 3)).await,
        vec![(0, 7), (0, 8), (0, 9)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_private_ca() {
    let cert = include_bytes!("fixtures/server.pem");
    let key = include_bytes!("fixtures/server.key");
    let ca = include_bytes!("fixtures/ca.pem");
    let (loader, seen) = loader(Behaviour {
        token: Some("s3cret".into()),
        ..Behaviour::default()
    });
    // The test's server builds its TLS config before any client does.
    atmorep_proto::tls::install_crypto_provider();
    let tls = tonic::transport::ServerTlsConfig::new()
        .identity(tonic::transport::Identity::from_pem(cert, key));
    let server = TestServer::start_with(loader, bind(), Some(tls));
    // A bare host:port becomes https:// once TLS is configured.
    let mut config = fast_config(vec![server.addr.to_string()]);
    config.tls_ca_pem = Some(ca.to_vec());
    config.tls_domain = Some("loader.test".into());
    config.bearer_token = Some("s3cret".into());
    let client = LoaderClient::connect(config).await.unwrap();
    let mut stream = client.stream(request(4, Some(1)));
    assert_eq!(
        within("stream", collect_all(&mut stream, 3)).await,
        full_order(10, 1)
    );
    assert!(
        seen.auth
            .lock()
            .unwrap()
            .iter()
            .all(|a| a.as_deref() == Some("Bearer s3cret"))
    );

    // Without the CA the server's certificate is not trusted: the handshake fails (UNAVAILABLE,
    // retried until the policy gives up).
    let mut config = fast_config(vec![format!("https://{}", server.addr)]);
    config.tls_domain = Some("loader.test".into());
    config.reconnect.max_attempts = Some(2);
    let untrusting = LoaderClient::connect(config).await.unwrap();
    let err = within("untrusted", untrusting.list_datasets())
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::RetriesExhausted { .. }), "{err}");
    assert_eq!(err.code(), Some(Code::Unavailable));

    // Plaintext against the TLS port is no stream either.
    let mut config = fast_config(vec![format!("http://{}", server.addr)]);
    config.reconnect.max_attempts = Some(2);
    let plain = LoaderClient::connect(config).await.unwrap();
    let mut stream = plain.stream(request(4, Some(1)));
    assert!(within("plaintext", stream.next()).await.unwrap().is_err());
}

/// The SETTINGS_MAX_FRAME_SIZE a client announces in its first SETTINGS frame.
async fn announced_max_frame_size(config_frame: Option<u32>) -> Option<u32> {
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut config = ClientConfig::new([format!("http://{}", listener.local_addr().unwrap())]);
    if let Some(bytes) = config_frame {
        config.max_frame_bytes = bytes;
    }
    config.reconnect.give_up_after = Some(Duration::from_secs(2));
    let client = LoaderClient::connect(config).await.unwrap();
    // The stream never gets an answer from this listener; it only has to send its preface.
    let calling = tokio::spawn(async move {
        let mut stream = client.stream(request(1, Some(1)));
        let _ = stream.next().await;
    });
    let (mut socket, _) = within("connection", listener.accept()).await.unwrap();
    let mut preface = [0u8; 24];
    within("preface", socket.read_exact(&mut preface))
        .await
        .unwrap();
    assert_eq!(&preface, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
    let mut header = [0u8; 9];
    within("settings", socket.read_exact(&mut header))
        .await
        .unwrap();
    assert_eq!(
        header[3], 0x4,
        "the first frame after the preface is SETTINGS"
    );
    let len = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
    let mut payload = vec![0u8; len];
    within("settings payload", socket.read_exact(&mut payload))
        .await
        .unwrap();
    calling.abort();
    payload.chunks_exact(6).find_map(|entry| {
        (u16::from_be_bytes([entry[0], entry[1]]) == 0x5)
            .then(|| u32::from_be_bytes([entry[2], entry[3], entry[4], entry[5]]))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_asks_for_large_http2_frames() {
    // HTTP/2's default 16 KiB frames cut a batch into thousands of frames; the client's
    // default asks for 1 MiB ones, and a configured size goes on the wire as it is.
    assert_eq!(announced_max_frame_size(None).await, Some(1 << 20));
    assert_eq!(announced_max_frame_size(Some(65_536)).await, Some(65_536));
}
