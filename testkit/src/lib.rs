//! Shared helpers for the cross-process tests of atmorep-rs.
//!
//! The main helper is [`S3TestServer`]: a real S3-compatible HTTP server
//! ([`s3s`] + [`s3s_fs`]) serving a local directory, so tests can exercise the
//! `object_store` S3 code paths — in-process through [`S3TestServer::object_store`],
//! or from a CLI subprocess through [`S3TestServer::s3_env`] /
//! [`S3TestServer::configure_command`] — without any network access or cloud
//! account. Its [`FaultInjector`] (see [`S3TestServer::faults`]) makes chosen objects fail the
//! way real object storage does — 5xx answers, latency, bodies cut off mid-transfer or served
//! short — and logs every object request, so tests can check retries and error reports.
//! [`atmorep_bin`] locates the `atmorep` CLI that cargo built for the tests that run it as a
//! subprocess, and [`Server`] runs
//! `atmorep loader serve` as one; [`streams`] has the client side: a briefly retrying client
//! and the checks that an epoch arrived exactly once; [`tiny`] writes and serves the tiny
//! synthetic store most of them use; [`http_files`] serves a folder over plain HTTP, as a public
//! bucket looks to an anonymous reader.

use std::future::Future;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::task::{Context, Poll};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use hyper_util::server::graceful::GracefulShutdown;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use s3s::auth::SimpleAuth;
use s3s::service::{S3Service, S3ServiceBuilder};
use s3s::{HttpError, HttpResponse};
use tokio::sync::oneshot;

pub mod cli;
pub mod http_files;
pub mod loader_process;
pub mod prometheus;
pub mod streams;
pub mod tiny;
pub use loader_process::{ChildGuard, Server};

/// Access key id accepted by every [`S3TestServer`].
pub const TEST_ACCESS_KEY: &str = "atmorep-test-access-key";
/// Secret access key accepted by every [`S3TestServer`].
pub const TEST_SECRET_KEY: &str = "atmorep-test-secret-key";
/// Region reported to clients (s3s does not check it, but SigV4 signs with it).
pub const TEST_REGION: &str = "us-east-1";

/// How long a stopping server waits for open connections to finish.
const GRACEFUL_TIMEOUT: Duration = Duration::from_secs(5);

/// The workspace root (the folder of the root `Cargo.toml`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the integration-test crate lives in a folder of the workspace")
        .to_path_buf()
}

/// The `atmorep` CLI binary of the test process's build.
///
/// The cross-process tests are integration tests of the `atmorep` package, so cargo builds the
/// binary, with the features under test, before it runs them and puts it in the profile folder
/// above the test executable (`target/<profile>/deps/it-…` → `target/<profile>/atmorep`). Looked
/// up from the test executable rather than from `CARGO_BIN_EXE_atmorep` because this library
/// is compiled before, and apart from, the tests that use it.
///
/// # Panics
///
/// If the binary is not there: a test binary run from elsewhere than cargo's target folder.
pub fn atmorep_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let exe = std::env::current_exe().expect("the test executable's path");
        let profile_dir = exe
            .parent()
            .and_then(|deps| deps.parent())
            .expect("test executables live in target/<profile>/deps");
        let bin = profile_dir.join(format!("atmorep{}", std::env::consts::EXE_SUFFIX));
        assert!(
            bin.is_file(),
            "{} does not exist: run the tests with `cargo test -p atmorep` (or `scripts/test`), \
             which builds it",
            bin.display()
        );
        bin
    })
    .clone()
}

/// An in-process S3-compatible server over real HTTP on `127.0.0.1:<random port>`.
///
/// Every sub-folder of the served root directory is a bucket and every file
/// below it an object (key = path relative to the bucket folder, `/`-separated).
/// Requests must be SigV4-signed with [`TEST_ACCESS_KEY`] / [`TEST_SECRET_KEY`].
///
/// The server runs on its own OS thread with its own tokio runtime, so it keeps
/// answering while the test thread blocks (e.g. waiting on a CLI subprocess with
/// [`std::process::Command::output`]), and it works from both `#[test]` and
/// `#[tokio::test]` functions.
///
/// s3s-fs keeps optional sidecar files (`.bucket-*.object-*.json`, `.tmp.*`) in
/// the *root* folder, never inside bucket folders; objects written straight to
/// disk (see [`S3TestServer::upload_dir`]) are fully served without them: the
/// ETag is then computed from the file's MD5 on demand.
///
/// Every request passes through the server's [`FaultInjector`] ([`S3TestServer::faults`]),
/// which serves it unchanged until a test injects faults.
///
/// The server stops on [`S3TestServer::shutdown`] or on drop.
#[derive(Debug)]
pub struct S3TestServer {
    root: PathBuf,
    addr: SocketAddr,
    faults: FaultInjector,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl S3TestServer {
    /// Starts a server for the directory `root` (created if missing).
    ///
    /// The server does not run on the caller's runtime (see the type docs), so
    /// this does not need to be awaited from any particular runtime flavour; it
    /// is `async` only for call-site symmetry with other async setup code.
    /// [`S3TestServer::start_blocking`] is the same for synchronous tests.
    pub async fn start(root: &Path) -> io::Result<Self> {
        Self::start_blocking(root)
    }

    /// Synchronous twin of [`S3TestServer::start`].
    pub fn start_blocking(root: &Path) -> io::Result<Self> {
        std::fs::create_dir_all(root)?;
        let root = root.canonicalize()?;

        let fs = s3s_fs::FileSystem::new(&root).map_err(|e| {
            io::Error::other(format!("s3s-fs cannot serve {}: {e:?}", root.display()))
        })?;
        let service = {
            let mut builder = S3ServiceBuilder::new(fs);
            builder.set_auth(SimpleAuth::from_single(TEST_ACCESS_KEY, TEST_SECRET_KEY));
            builder.build()
        };
        let faults = FaultInjector::default();
        let service = FaultyS3 {
            inner: service,
            faults: faults.clone(),
        };

        // Bind here so that the port is known (and listening) before we return.
        let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;

        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("s3-test-server-worker")
            .enable_all()
            .build()?;
        let (stop_tx, stop_rx) = oneshot::channel();
        let thread = std::thread::Builder::new()
            .name(format!("s3-test-server-{}", addr.port()))
            .spawn(move || {
                runtime.block_on(serve(listener, service, stop_rx));
                // tokio::fs work runs on blocking threads; don't hang on them.
                runtime.shutdown_timeout(Duration::from_secs(1));
            })?;

        Ok(Self {
            root,
            addr,
            faults,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// Stops accepting connections, lets open ones finish (bounded by a few
    /// seconds) and joins the server thread. Dropping the server does the same.
    pub fn shutdown(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        if let Some(stop) = self.stop.take() {
            // The server may already be gone (e.g. its listener failed); fine.
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }

    /// The fault injector in front of this server: inject faults on objects and read the log of
    /// object requests.
    pub fn faults(&self) -> &FaultInjector {
        &self.faults
    }

    /// The served root directory (canonicalized).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The folder backing `bucket`: `root/bucket`.
    pub fn bucket_dir(&self, bucket: &str) -> PathBuf {
        self.root.join(bucket)
    }

    /// The socket address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`, for path-style requests.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The accepted access key id ([`TEST_ACCESS_KEY`]).
    pub fn access_key(&self) -> &str {
        TEST_ACCESS_KEY
    }

    /// The accepted secret access key ([`TEST_SECRET_KEY`]).
    pub fn secret_key(&self) -> &str {
        TEST_SECRET_KEY
    }

    /// The region clients should sign for ([`TEST_REGION`], `us-east-1`).
    pub fn region(&self) -> &str {
        TEST_REGION
    }

    /// Creates the bucket `name` (its folder under the root); idempotent.
    ///
    /// `name` must be a valid S3 bucket name (3–63 chars of lowercase letters,
    /// digits, `-`, `.`), otherwise s3s would reject requests for it anyway.
    pub fn create_bucket(&self, name: &str) -> io::Result<()> {
        if !s3s::path::check_bucket_name(name) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("invalid S3 bucket name: {name:?}"),
            ));
        }
        std::fs::create_dir_all(self.bucket_dir(name))
    }

    /// A builder preconfigured for this server and `bucket` (path-style, plain
    /// HTTP, test credentials), for tests that need to tweak it further.
    pub fn object_store_builder(&self, bucket: &str) -> AmazonS3Builder {
        AmazonS3Builder::new()
            .with_endpoint(self.endpoint())
            .with_allow_http(true)
            .with_virtual_hosted_style_request(false)
            .with_bucket_name(bucket)
            .with_access_key_id(TEST_ACCESS_KEY)
            .with_secret_access_key(TEST_SECRET_KEY)
            .with_region(TEST_REGION)
    }

    /// An `object_store` S3 client for `bucket` on this server.
    ///
    /// # Panics
    ///
    /// If `object_store` rejects the configuration (it does not: every value
    /// is fixed and valid).
    pub fn object_store(&self, bucket: &str) -> AmazonS3 {
        self.object_store_builder(bucket)
            .build()
            .expect("the S3 test-server configuration is valid")
    }

    /// `s3://bucket/prefix` (or `s3://bucket` for an empty prefix).
    pub fn url(&self, bucket: &str, prefix: &str) -> String {
        let prefix = prefix.trim_matches('/');
        if prefix.is_empty() {
            format!("s3://{bucket}")
        } else {
            format!("s3://{bucket}/{prefix}")
        }
    }

    /// The `AWS_*` environment variables that make
    /// `object_store::aws::AmazonS3Builder::from_env()` (object_store 0.14)
    /// talk to this server: endpoint (both `AWS_ENDPOINT_URL` and
    /// `AWS_ENDPOINT`), credentials, region (`AWS_REGION` and
    /// `AWS_DEFAULT_REGION`), `AWS_ALLOW_HTTP=true` and
    /// `AWS_VIRTUAL_HOSTED_STYLE_REQUEST=false`. The bucket is not included
    /// (pass it in the `s3://bucket/...` URL).
    ///
    /// Note that a subprocess also inherits the parent's other `AWS_*`
    /// variables (e.g. `AWS_SESSION_TOKEN`, `AWS_ENDPOINT_URL_S3`), which would
    /// break or redirect requests; [`S3TestServer::configure_command`] removes
    /// them.
    pub fn s3_env(&self) -> Vec<(String, String)> {
        let endpoint = self.endpoint();
        [
            ("AWS_ENDPOINT_URL", endpoint.as_str()),
            ("AWS_ENDPOINT", endpoint.as_str()),
            ("AWS_ACCESS_KEY_ID", TEST_ACCESS_KEY),
            ("AWS_SECRET_ACCESS_KEY", TEST_SECRET_KEY),
            ("AWS_REGION", TEST_REGION),
            ("AWS_DEFAULT_REGION", TEST_REGION),
            ("AWS_ALLOW_HTTP", "true"),
            ("AWS_VIRTUAL_HOSTED_STYLE_REQUEST", "false"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    }

    /// Points a subprocess at this server: removes every `AWS_*` variable the
    /// current process has and sets [`S3TestServer::s3_env`]. For a
    /// `tokio::process::Command`, configure the std one and convert it with
    /// `tokio::process::Command::from`.
    pub fn configure_command<'a>(&self, cmd: &'a mut Command) -> &'a mut Command {
        for (key, _) in std::env::vars_os() {
            if key.to_str().is_some_and(|k| k.starts_with("AWS_")) {
                cmd.env_remove(key);
            }
        }
        cmd.envs(self.s3_env())
    }

    /// Copies the directory tree `local_dir` into `bucket` under `prefix`
    /// (plain file copies to `root/bucket/prefix/...`; the bucket folder is
    /// created if missing). Object keys are `prefix/<relative path>`; an empty
    /// prefix puts the tree at the bucket's top level. Returns the number of
    /// files copied. Symlinks are followed.
    pub fn upload_dir(&self, local_dir: &Path, bucket: &str, prefix: &str) -> io::Result<usize> {
        self.create_bucket(bucket)?;
        let mut dest = self.bucket_dir(bucket);
        for part in prefix.split('/').filter(|p| !p.is_empty()) {
            if part == "." || part == ".." {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("invalid object prefix: {prefix:?}"),
                ));
            }
            dest.push(part);
        }
        copy_tree(local_dir, &dest)
    }
}

impl Drop for S3TestServer {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// Recursively copies `src` into `dest` (created), returning the file count.
fn copy_tree(src: &Path, dest: &Path) -> io::Result<usize> {
    std::fs::create_dir_all(dest)?;
    let mut files = 0;
    for entry in std::fs::read_dir(src)? {
        let entry = entry?;
        let from = entry.path();
        let to = dest.join(entry.file_name());
        if std::fs::metadata(&from)?.is_dir() {
            files += copy_tree(&from, &to)?;
        } else {
            std::fs::copy(&from, &to)?;
            files += 1;
        }
    }
    Ok(files)
}

/// The accept loop: one hyper connection (HTTP/1 or HTTP/2) per socket, until
/// `stop` fires or its sender is dropped; then a bounded graceful shutdown.
async fn serve(
    listener: std::net::TcpListener,
    service: FaultyS3,
    mut stop: oneshot::Receiver<()>,
) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(listener) => listener,
        Err(err) => {
            eprintln!("s3 test server: cannot register listener: {err}");
            return;
        }
    };
    let http = ConnBuilder::new(TokioExecutor::new());
    let graceful = GracefulShutdown::new();

    loop {
        let socket = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((socket, _)) => socket,
                Err(err) => {
                    eprintln!("s3 test server: accept failed: {err}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            _ = &mut stop => break,
        };
        let conn = http.serve_connection(TokioIo::new(socket), service.clone());
        let conn = graceful.watch(conn.into_owned());
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }

    drop(listener);
    let _ = tokio::time::timeout(GRACEFUL_TIMEOUT, graceful.shutdown()).await;
}

/// A fault an object answers with, in place of (or on top of) its real response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// An S3 error answer with this HTTP status and no object: 500 `InternalError`, 503
    /// `SlowDown`, 403 `AccessDenied`, 404 `NoSuchKey`, others `InjectedFault`.
    Status(u16),
    /// The real answer, after this delay.
    Latency(Duration),
    /// The real status and headers (the full `Content-Length`), then only the first `n` bytes
    /// of the body (at most all but one), then the connection drops: a transfer cut off, which
    /// the client sees as an incomplete body. GET only.
    CutBody(usize),
    /// A complete, well-formed answer carrying only the first `n` bytes of the body, with a
    /// `Content-Length` to match (ETag unchanged): what a torn write or a lying proxy serves,
    /// which no HTTP client can detect; only the reader of the bytes can. GET only.
    ShortBody(usize),
}

impl Fault {
    fn applies_to(self, method: &http::Method) -> bool {
        match self {
            Fault::Status(_) | Fault::Latency(_) => {
                method == http::Method::GET || method == http::Method::HEAD
            }
            Fault::CutBody(_) | Fault::ShortBody(_) => method == http::Method::GET,
        }
    }
}

/// One request for an object that reached the server (listings and bucket requests are not
/// logged).
#[derive(Debug, Clone)]
pub struct ObjectRequest {
    /// `GET` or `HEAD` (other methods are logged too, but never faulted).
    pub method: String,
    pub bucket: String,
    /// The object key (percent-decoded).
    pub key: String,
    /// The `Range` header, if any (`bytes=START-END`).
    pub range: Option<String>,
    /// The fault injected on this request, if any.
    pub fault: Option<Fault>,
    /// When the request arrived.
    pub at: Instant,
}

#[derive(Debug)]
struct FaultRule {
    bucket: String,
    /// An exact key, or a prefix when `prefix` is set.
    key: String,
    prefix: bool,
    fault: Fault,
    /// Requests this rule still applies to; `None`: every one.
    remaining: Option<usize>,
}

impl FaultRule {
    fn matches(&self, bucket: &str, key: &str, method: &http::Method) -> bool {
        self.remaining != Some(0)
            && self.bucket == bucket
            && if self.prefix {
                key.starts_with(&self.key)
            } else {
                key == self.key
            }
            && self.fault.applies_to(method)
    }
}

#[derive(Debug, Default)]
struct FaultState {
    rules: Vec<FaultRule>,
    log: Vec<ObjectRequest>,
}

/// Injects faults on chosen objects of an [`S3TestServer`] and logs the requests for objects.
///
/// A rule names a bucket, an object key (or, with a trailing `*`, a key prefix), a [`Fault`]
/// and how many matching requests it spoils (`Some(n)`: the next `n`; `None`: all). A request
/// takes the fault of the first rule, in the order they were added, that matches it and has
/// requests left; with none, it is served as usual. Cloning gives another handle on the same
/// rules and log.
#[derive(Debug, Clone, Default)]
pub struct FaultInjector {
    state: Arc<Mutex<FaultState>>,
}

impl FaultInjector {
    fn lock(&self) -> std::sync::MutexGuard<'_, FaultState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds a rule: `fault` on the next `times` requests (`None`: every request) for `key` in
    /// `bucket`; `key` ending in `*` matches every key with that prefix.
    pub fn inject(&self, bucket: &str, key: &str, fault: Fault, times: Option<usize>) {
        let (key, prefix) = match key.strip_suffix('*') {
            Some(prefix) => (prefix, true),
            None => (key, false),
        };
        self.lock().rules.push(FaultRule {
            bucket: bucket.to_owned(),
            key: key.to_owned(),
            prefix,
            fault,
            remaining: times,
        });
    }

    /// `fault` on the next `n` requests for `key` (see [`FaultInjector::inject`]).
    pub fn times(&self, bucket: &str, key: &str, fault: Fault, n: usize) {
        self.inject(bucket, key, fault, Some(n));
    }

    /// `fault` on every request for `key` from now on (see [`FaultInjector::inject`]).
    pub fn always(&self, bucket: &str, key: &str, fault: Fault) {
        self.inject(bucket, key, fault, None);
    }

    /// Removes every rule (the log stays).
    pub fn clear(&self) {
        self.lock().rules.clear();
    }

    /// Empties the request log.
    pub fn clear_log(&self) {
        self.lock().log.clear();
    }

    /// Every logged object request so far, in arrival order.
    pub fn log(&self) -> Vec<ObjectRequest> {
        self.lock().log.clone()
    }

    /// The logged requests for `key` in `bucket` (exact key), in arrival order.
    pub fn requests(&self, bucket: &str, key: &str) -> Vec<ObjectRequest> {
        self.lock()
            .log
            .iter()
            .filter(|r| r.bucket == bucket && r.key == key)
            .cloned()
            .collect()
    }

    /// Logs the request and returns the fault it gets, using up one request of that rule.
    fn take(&self, req: &http::Request<hyper::body::Incoming>) -> Option<Fault> {
        let (bucket, key) = object_of(req.uri().path())?;
        let method = req.method();
        let mut state = self.lock();
        let fault = state
            .rules
            .iter_mut()
            .find(|rule| rule.matches(&bucket, &key, method))
            .map(|rule| {
                if let Some(left) = &mut rule.remaining {
                    *left -= 1;
                }
                rule.fault
            });
        state.log.push(ObjectRequest {
            method: method.to_string(),
            bucket,
            key,
            range: req
                .headers()
                .get(http::header::RANGE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
            fault,
            at: Instant::now(),
        });
        fault
    }
}

/// `(bucket, key)` of a path-style object URL path (`/bucket/key…`); `None` for the service
/// root and bucket-level requests.
fn object_of(path: &str) -> Option<(String, String)> {
    let (bucket, key) = path.strip_prefix('/')?.split_once('/')?;
    if bucket.is_empty() || key.is_empty() {
        return None;
    }
    Some((percent_decode(bucket), percent_decode(key)))
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The s3s service behind a [`FaultInjector`].
#[derive(Clone)]
struct FaultyS3 {
    inner: S3Service,
    faults: FaultInjector,
}

type ServiceFuture = Pin<Box<dyn Future<Output = Result<HttpResponse, HttpError>> + Send>>;

impl hyper::service::Service<http::Request<hyper::body::Incoming>> for FaultyS3 {
    type Response = HttpResponse;
    type Error = HttpError;
    type Future = ServiceFuture;

    fn call(&self, req: http::Request<hyper::body::Incoming>) -> Self::Future {
        let fault = self.faults.take(&req);
        let resource = req.uri().path().to_owned();
        let inner = self.inner.clone();
        let serve = move |req| hyper::service::Service::call(&inner, req);
        match fault {
            None => serve(req),
            Some(Fault::Status(code)) => Box::pin(async move { Ok(error_answer(code, &resource)) }),
            Some(Fault::Latency(delay)) => Box::pin(async move {
                tokio::time::sleep(delay).await;
                serve(req).await
            }),
            Some(Fault::CutBody(n)) => Box::pin(async move {
                let (mut parts, body) = serve(req).await?.into_parts();
                let full = collect(body).await?;
                if !parts.status.is_success() || full.is_empty() {
                    return Ok(HttpResponse::from_parts(parts, s3s::Body::from(full)));
                }
                parts.headers.insert(
                    http::header::CONTENT_LENGTH,
                    http::HeaderValue::from(full.len()),
                );
                let head = full.slice(..n.min(full.len() - 1));
                Ok(HttpResponse::from_parts(
                    parts,
                    s3s::Body::http_body(CutBody::new(head)),
                ))
            }),
            Some(Fault::ShortBody(n)) => Box::pin(async move {
                let (mut parts, body) = serve(req).await?.into_parts();
                let full = collect(body).await?;
                if !parts.status.is_success() {
                    return Ok(HttpResponse::from_parts(parts, s3s::Body::from(full)));
                }
                let short = full.slice(..n.min(full.len()));
                parts.headers.insert(
                    http::header::CONTENT_LENGTH,
                    http::HeaderValue::from(short.len()),
                );
                Ok(HttpResponse::from_parts(parts, s3s::Body::from(short)))
            }),
        }
    }
}

async fn collect(body: s3s::Body) -> Result<Bytes, HttpError> {
    body.collect()
        .await
        .map(|collected| collected.to_bytes())
        .map_err(HttpError::new)
}

/// An S3 error document for an injected status.
fn error_answer(code: u16, resource: &str) -> HttpResponse {
    let status =
        http::StatusCode::from_u16(code).unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
    let name = match status.as_u16() {
        500 => "InternalError",
        503 => "SlowDown",
        403 => "AccessDenied",
        404 => "NoSuchKey",
        _ => "InjectedFault",
    };
    let xml = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{name}</Code>\
         <Message>fault injected by the S3 test server</Message>\
         <Resource>{resource}</Resource><RequestId>injected</RequestId></Error>"
    );
    let mut answer = HttpResponse::new(s3s::Body::from(xml));
    *answer.status_mut() = status;
    answer.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/xml"),
    );
    answer
}

/// A body that yields its bytes, waits a moment (so the server flushes them to the socket) and
/// then fails, which makes the server drop the connection short of its `Content-Length`.
struct CutBody {
    head: Option<Bytes>,
    pause: Pin<Box<tokio::time::Sleep>>,
}

impl CutBody {
    fn new(head: Bytes) -> Self {
        Self {
            head: Some(head).filter(|h| !h.is_empty()),
            pause: Box::pin(tokio::time::sleep(Duration::from_millis(20))),
        }
    }
}

impl http_body::Body for CutBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, io::Error>>> {
        if let Some(head) = self.head.take() {
            return Poll::Ready(Some(Ok(http_body::Frame::data(head))));
        }
        match self.pause.as_mut().poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(()) => Poll::Ready(Some(Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "fault injected by the S3 test server: body cut off",
            )))),
        }
    }
}
