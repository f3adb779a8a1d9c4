//! Shared helpers for the cross-process tests of atmorep-rs.
//!
//! The main helper is [`S3TestServer`]: a real S3-compatible HTTP server
//! ([`s3s`] + [`s3s_fs`]) serving a local directory, so tests can exercise the
//! `object_store` S3 code paths — in-process through [`S3TestServer::object_store`],
//! or from a CLI subprocess through [`S3TestServer::s3_env`] /
//! [`S3TestServer::configure_command`] — without any network access or cloud
//! account. [`atmorep_bin`] builds (once per test process) and locates the
//! `atmorep` CLI for tests that run it as a subprocess, and [`Server`] runs
//! `atmorep loader serve` as one.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::thread::JoinHandle;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use hyper_util::server::graceful::GracefulShutdown;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use s3s::auth::SimpleAuth;
use s3s::service::{S3Service, S3ServiceBuilder};
use tokio::sync::oneshot;

pub mod loader_process;
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

/// The `atmorep` CLI binary, built on first use (once per test process) in the profile these
/// tests were built with (`--release` unless debug assertions are on).
///
/// Runs `$CARGO build --bin atmorep [--release] --manifest-path <workspace>/Cargo.toml` (`cargo`
/// when `CARGO` is unset; under `cargo test` it is set) and returns
/// `<target>/{release,debug}/atmorep`, where `<target>` is `CARGO_TARGET_DIR` (relative to the
/// workspace root when relative) or `<workspace>/target`.
///
/// # Panics
///
/// If the build fails (its output is in the message) or the binary is not where expected.
pub fn atmorep_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(build_atmorep_bin).clone()
}

fn build_atmorep_bin() -> PathBuf {
    let root = workspace_root();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let release = !cfg!(debug_assertions);
    let mut cmd = Command::new(&cargo);
    cmd.current_dir(&root)
        // The whole workspace with all targets: the same feature set `cargo test --workspace`
        // just built, so only the binary itself is linked rather than every dependency rebuilt
        // with the plain-build features.
        .args(["build", "--workspace", "--all-targets", "--manifest-path"])
        .arg(root.join("Cargo.toml"));
    if release {
        cmd.arg("--release");
    }
    // Cargo gives this test process the variables of the package under test. Passed on, some
    // build scripts see them as changed inputs, and the next `cargo test` rebuilds half the
    // dependency tree; the nested build gets the environment a user's shell would have.
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        let package_specific = key.starts_with("CARGO_PKG_")
            || key.starts_with("CARGO_BIN_")
            || matches!(
                key,
                "CARGO_MANIFEST_DIR"
                    | "CARGO_MANIFEST_PATH"
                    | "CARGO_MANIFEST_LINKS"
                    | "CARGO_CRATE_NAME"
                    | "CARGO_PRIMARY_PACKAGE"
                    | "CARGO_TARGET_TMPDIR"
                    | "CARGO_RUSTC_CURRENT_DIR"
                    | "OUT_DIR"
            );
        if package_specific {
            cmd.env_remove(key);
        }
    }
    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", Path::new(&cargo).display()));
    assert!(
        output.status.success(),
        "building the atmorep binary failed ({}):\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let target = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => root.join(dir),
        _ => root.join("target"),
    };
    let bin = target
        .join(if release { "release" } else { "debug" })
        .join(format!("atmorep{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.is_file(),
        "cargo built atmorep but {} does not exist",
        bin.display()
    );
    bin
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
/// The server stops on [`S3TestServer::shutdown`] or on drop.
#[derive(Debug)]
pub struct S3TestServer {
    root: PathBuf,
    addr: SocketAddr,
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
    service: S3Service,
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
