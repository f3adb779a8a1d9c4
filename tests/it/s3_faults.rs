//! Object storage that fails: the real S3 client against the in-process [`S3TestServer`] with
//! faults injected on chosen objects ([`Fault`]). Transient failures (5xx answers, latency, a
//! body cut off mid-transfer) are retried with backoff and the read is bit-equal to the local
//! store; persistent ones are reported naming the object; a short body is an error, never
//! silently wrong data. In-process through `StoreLocation::from_store` with a fast retry policy,
//! and across processes through the `atmorep` CLI, whose policy comes from the
//! `ATMOREP_STORE_*` variables (`loader-service/src/location.rs`). A store that answers 403 fails
//! a real loader's stream at once with PERMISSION_DENIED: neither the loader's object-store
//! client nor the gRPC client retries it.

use std::error::Error;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use atmorep_loader::progress::NoProgress;
use atmorep_loader::store::zarr_meta::Codec;
use atmorep_loader::tools::synth::{SynthConfig, write_store};
use atmorep_loader::{ChunkCache, Dataset, Hyperslab, StoreError, StoreLocation};
use atmorep_testkit::streams::{client_config, connect};
use atmorep_testkit::tiny::{request, store_with_stats, tiny_config};
use atmorep_testkit::{Fault, S3TestServer, Server, atmorep_bin};
use object_store::{BackoffConfig, RetryConfig};

const BUCKET: &str = "era5-faults";
const PREFIX: &str = "synth.zarr";
/// The first chunk of `z` (Zarr v2, one step × one level × the globe, `.` separator).
const CHUNK: &str = "z/0.0.0.0";
/// The synthetic stores' default codec.
const BLOSC: Codec = Codec::Blosc {
    zstd: false,
    bitshuffle: false,
};
/// The retries of the in-process client.
const RETRIES: usize = 3;
/// Its first backoff (each later one is at least as long).
const BACKOFF: Duration = Duration::from_millis(20);

/// A small synthetic store: 10° grid, 4 steps of 6 h, two levels, `z` and `t`.
fn config(codec: Codec) -> SynthConfig {
    SynthConfig {
        grid_deg: 10.0,
        steps: 4,
        step_hours: 6,
        levels: vec![850, 500],
        variables: vec!["z".into(), "t".into()],
        codec,
        ..Default::default()
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    local: PathBuf,
    server: S3TestServer,
}

impl Fixture {
    fn new(codec: Codec) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let local = dir.path().join(PREFIX);
        write_store(&config(codec), &local, &NoProgress).expect("writing the synthetic store");
        let server = S3TestServer::start_blocking(&dir.path().join("s3")).unwrap();
        server.upload_dir(&local, BUCKET, PREFIX).unwrap();
        Self {
            _dir: dir,
            local,
            server,
        }
    }

    /// The object key of `key` inside the store.
    fn key(&self, key: &str) -> String {
        format!("{PREFIX}/{key}")
    }

    /// The URL of `key` inside the store, as errors name it.
    fn url(&self, key: &str) -> String {
        format!("{}/{key}", self.server.url(BUCKET, PREFIX))
    }

    fn retry() -> RetryConfig {
        RetryConfig {
            backoff: BackoffConfig {
                init_backoff: BACKOFF,
                max_backoff: BACKOFF * 4,
                base: 2.0,
            },
            max_retries: RETRIES,
            retry_timeout: Duration::from_secs(60),
        }
    }

    /// The store over S3 with the fast retry policy, in this process.
    async fn open_s3(&self) -> Result<Dataset, StoreError> {
        let store = self
            .server
            .object_store_builder(BUCKET)
            .with_retry(Self::retry())
            .build()
            .expect("a valid S3 client configuration");
        let location =
            StoreLocation::from_store(self.server.url(BUCKET, PREFIX), Arc::new(store), PREFIX);
        Dataset::open_location(location, Arc::new(ChunkCache::new(64 << 20))).await
    }

    async fn open_local(&self) -> Dataset {
        Dataset::open(self.local.to_str().unwrap()).await.unwrap()
    }
}

/// Every variable read in full.
async fn read_all(dataset: &Dataset) -> Result<Vec<(String, Vec<f32>)>, StoreError> {
    let mut out = Vec::new();
    for (name, variable) in &dataset.variables {
        let values = dataset.read(&Hyperslab::full(dataset, variable)).await?;
        out.push((name.clone(), values));
    }
    Ok(out)
}

fn assert_bit_equal(remote: &[(String, Vec<f32>)], local: &[(String, Vec<f32>)]) {
    assert_eq!(remote.len(), local.len(), "number of variables");
    for ((name, r), (local_name, l)) in remote.iter().zip(local) {
        assert_eq!(name, local_name);
        assert_eq!(r.len(), l.len(), "{name}: number of values");
        let differs = r
            .iter()
            .zip(l)
            .position(|(a, b)| a.to_bits() != b.to_bits());
        assert_eq!(
            differs, None,
            "{name}: a value differs from the local store"
        );
    }
}

/// The error and all its sources, one per line.
fn chain(err: &dyn Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(inner) = source {
        text.push_str("\ncaused by: ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}

/// Asserts that consecutive requests were at least [`BACKOFF`] apart (object_store's first
/// backoff is exactly the initial one, later ones are longer; sleeps never end early).
fn assert_backed_off(requests: &[atmorep_testkit::ObjectRequest]) {
    for pair in requests.windows(2) {
        let gap = pair[1].at.duration_since(pair[0].at);
        assert!(
            gap >= BACKOFF,
            "a retry came {gap:?} after the previous try, sooner than the backoff {BACKOFF:?}"
        );
    }
}

#[tokio::test]
async fn transient_server_errors_are_retried_and_the_read_is_bit_equal() {
    let fx = Fixture::new(BLOSC);
    let faults = fx.server.faults();
    let chunk = fx.key(CHUNK);
    // 500, 503, 500 on the chunk: three failures, within the three retries.
    faults.times(BUCKET, &chunk, Fault::Status(500), 1);
    faults.times(BUCKET, &chunk, Fault::Status(503), 1);
    faults.times(BUCKET, &chunk, Fault::Status(500), 1);
    // Metadata fails too: opening the store retries as well.
    faults.times(BUCKET, &fx.key(".zmetadata"), Fault::Status(503), 2);

    let remote = fx.open_s3().await.expect("opening retries the metadata");
    let values = read_all(&remote).await.expect("the read retries the chunk");
    assert_bit_equal(&values, &read_all(&fx.open_local().await).await.unwrap());

    let tries = faults.requests(BUCKET, &chunk);
    let faulted: Vec<_> = tries.iter().map(|r| r.fault).collect();
    assert_eq!(
        faulted,
        [
            Some(Fault::Status(500)),
            Some(Fault::Status(503)),
            Some(Fault::Status(500)),
            None
        ],
        "the chunk was tried until it was served: {tries:?}"
    );
    assert_backed_off(&tries);
}

/// Sixteen concurrent reads of one object share one request, a slow one (latency) or a refused
/// one (403) alike; a refused object is then answered from memory, without another request,
/// while objects nobody refused are read as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_reads_of_one_object_share_one_request_and_a_refusal_is_remembered() {
    let fx = Fixture::new(BLOSC);
    let location = fx.open_s3().await.unwrap().location().clone();
    let faults = fx.server.faults();
    let read_16 = |key: &'static str| {
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let location = location.clone();
                tokio::spawn(async move { location.get_versioned(key).await })
            })
            .collect();
        futures::future::join_all(tasks)
    };

    let slow = fx.key("z/1.0.0.0");
    faults.times(BUCKET, &slow, Fault::Latency(Duration::from_millis(200)), 1);
    for read in read_16("z/1.0.0.0").await {
        assert!(read.unwrap().unwrap().is_some(), "the object is served");
    }
    assert_eq!(
        faults.requests(BUCKET, &slow).len(),
        1,
        "one request for 16 reads"
    );

    let refused = fx.key(CHUNK);
    faults.always(BUCKET, &refused, Fault::Status(403));
    for read in read_16(CHUNK).await {
        let err = read.unwrap().unwrap_err();
        assert!(err.is_refusal(), "{err}");
        assert!(
            chain(&err).contains(&fx.url(CHUNK)),
            "names the object: {err}"
        );
    }
    let again = location.get_versioned(CHUNK).await.unwrap_err();
    assert!(again.is_refusal(), "{again}");
    assert_eq!(
        faults.requests(BUCKET, &refused).len(),
        1,
        "one request for 17 reads of a refused object"
    );
    assert!(location.get_versioned("z/2.0.0.0").await.unwrap().is_some());
}

#[tokio::test]
async fn latency_is_waited_out_and_the_read_is_bit_equal() {
    let fx = Fixture::new(BLOSC);
    // Every object of `t` answers late.
    fx.server.faults().always(
        BUCKET,
        &fx.key("t/*"),
        Fault::Latency(Duration::from_millis(150)),
    );
    let remote = fx.open_s3().await.unwrap();
    let values = read_all(&remote).await.unwrap();
    assert_bit_equal(&values, &read_all(&fx.open_local().await).await.unwrap());
    let slow = fx
        .server
        .faults()
        .log()
        .into_iter()
        .filter(|r| r.fault.is_some())
        .count();
    assert!(slow >= 8, "every chunk of t was slow: {slow} slow requests");
}

#[tokio::test]
async fn a_body_cut_off_mid_transfer_is_resumed_and_the_read_is_bit_equal() {
    let fx = Fixture::new(Codec::None);
    let chunk = fx.key(CHUNK);
    let size = std::fs::metadata(fx.local.join(CHUNK)).unwrap().len() as usize;
    let cut = size / 2;
    fx.server
        .faults()
        .times(BUCKET, &chunk, Fault::CutBody(cut), 1);

    let remote = fx.open_s3().await.unwrap();
    let values = read_all(&remote).await.expect("the cut body is resumed");
    assert_bit_equal(&values, &read_all(&fx.open_local().await).await.unwrap());

    let tries = fx.server.faults().requests(BUCKET, &chunk);
    assert_eq!(
        tries.len(),
        2,
        "one cut transfer, one resumption: {tries:?}"
    );
    assert_eq!(tries[0].fault, Some(Fault::CutBody(cut)));
    assert_eq!(tries[0].range, None);
    // The client asks only for what it is missing.
    assert_eq!(
        tries[1].range.as_deref(),
        Some(format!("bytes={cut}-{}", size - 1).as_str()),
        "{tries:?}"
    );
}

#[tokio::test]
async fn persistent_server_errors_are_reported_naming_the_chunk_after_the_retries() {
    for status in [503, 500] {
        let fx = Fixture::new(BLOSC);
        let chunk = fx.key(CHUNK);
        fx.server
            .faults()
            .always(BUCKET, &chunk, Fault::Status(status));

        let remote = fx.open_s3().await.unwrap();
        let err = read_all(&remote).await.expect_err("the chunk never comes");
        let text = chain(&err);
        assert!(
            matches!(&err, StoreError::ObjectStore { url, .. } if *url == fx.url(CHUNK)),
            "{status}: the error names the chunk's URL {}:\n{text}",
            fx.url(CHUNK)
        );
        assert!(text.contains(&status.to_string()), "{status}: {text}");

        let tries = fx.server.faults().requests(BUCKET, &chunk);
        assert_eq!(
            tries.len(),
            1 + RETRIES,
            "{status}: first try and every retry: {tries:?}"
        );
        assert_backed_off(&tries);
    }
}

#[tokio::test]
async fn a_body_cut_off_every_time_is_an_error_naming_the_chunk() {
    let fx = Fixture::new(Codec::None);
    let chunk = fx.key(CHUNK);
    fx.server
        .faults()
        .always(BUCKET, &chunk, Fault::CutBody(64));

    let remote = fx.open_s3().await.unwrap();
    let err = read_all(&remote)
        .await
        .expect_err("a cut body is never data");
    assert!(
        matches!(&err, StoreError::ObjectStore { url, .. } if *url == fx.url(CHUNK)),
        "the error names the chunk's URL {}:\n{}",
        fx.url(CHUNK),
        chain(&err)
    );
    assert!(fx.server.faults().requests(BUCKET, &chunk).len() > 1);
}

#[tokio::test]
async fn a_short_but_well_formed_body_is_an_error_naming_the_chunk() {
    // Neither compressed nor uncompressed chunks may turn into values when bytes are missing.
    for codec in [BLOSC, Codec::Zstd, Codec::None] {
        let fx = Fixture::new(codec);
        let chunk = fx.key(CHUNK);
        let size = std::fs::metadata(fx.local.join(CHUNK)).unwrap().len() as usize;
        fx.server
            .faults()
            .always(BUCKET, &chunk, Fault::ShortBody(size * 3 / 4));

        let remote = fx.open_s3().await.unwrap();
        let err = read_all(&remote)
            .await
            .expect_err("a short chunk must not decode");
        let text = chain(&err);
        assert!(
            matches!(&err, StoreError::CorruptChunk { key, .. } if key.ends_with(CHUNK)),
            "{codec:?}: a corrupt-chunk error naming {CHUNK}:\n{text}"
        );
        assert!(text.contains(CHUNK), "{codec:?}: {text}");
    }
}

/// `atmorep loader inspect` of the server's store with `var=value` fails, naming `var`.
fn assert_setting_refused(fx: &Fixture, var: &str, value: &str) {
    let mut cmd = Command::new(atmorep_bin());
    fx.server.configure_command(&mut cmd);
    let output = cmd
        .env(var, value)
        .args(["loader", "inspect", &fx.server.url(BUCKET, PREFIX)])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{var}={value} was accepted");
    assert!(stderr.contains(var), "{stderr}");
}

/// `atmorep loader inspect URL --json --stats` against the server, with the retry policy set
/// through the environment: 2 retries, 10 ms backoff.
fn cli_inspect(fx: &Fixture) -> std::process::Output {
    let mut cmd = Command::new(atmorep_bin());
    fx.server.configure_command(&mut cmd);
    cmd.env("ATMOREP_STORE_MAX_RETRIES", "2")
        .env("ATMOREP_STORE_BACKOFF_MS", "10")
        .env("ATMOREP_STORE_MAX_BACKOFF_MS", "40")
        .args([
            "loader",
            "inspect",
            &fx.server.url(BUCKET, PREFIX),
            "--json",
            "--stats",
        ]);
    cmd.output().expect("running atmorep")
}

#[test]
fn cli_retries_with_the_policy_from_the_environment_and_names_the_failing_chunk() {
    let fx = Fixture::new(BLOSC);
    let chunk = fx.key(CHUNK);

    // Two failures: within the two retries, the command succeeds.
    fx.server
        .faults()
        .times(BUCKET, &chunk, Fault::Status(503), 2);
    let output = cli_inspect(&fx);
    assert!(
        output.status.success(),
        "inspect with two transient failures:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(fx.server.faults().requests(BUCKET, &chunk).len(), 3);

    // Failing for good: reported after 1 + 2 tries, naming the chunk.
    fx.server.faults().clear_log();
    fx.server
        .faults()
        .always(BUCKET, &chunk, Fault::Status(503));
    let output = cli_inspect(&fx);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "inspect succeeded:\n{stderr}");
    assert!(
        stderr.contains(&fx.url(CHUNK)),
        "the message names {}:\n{stderr}",
        fx.url(CHUNK)
    );
    assert_eq!(
        fx.server.faults().requests(BUCKET, &chunk).len(),
        3,
        "ATMOREP_STORE_MAX_RETRIES=2: three tries"
    );

    // A bad setting is reported naming the variable.
    assert_setting_refused(&fx, "ATMOREP_STORE_MAX_RETRIES", "lots");
}

/// `ATMOREP_STORE_TIMEOUT_SECS=1`: a chunk that answers after 3 s is given up after 1 s and
/// asked again (a timeout is retried like a 5xx); the retry is answered and inspect succeeds well
/// before the slow answer would have come; a bad value is refused naming the variable.
#[test]
fn the_request_timeout_comes_from_the_environment_and_a_timeout_is_retried() {
    let fx = Fixture::new(BLOSC);
    let chunk = fx.key(CHUNK);
    let slow = Duration::from_secs(3);
    fx.server
        .faults()
        .times(BUCKET, &chunk, Fault::Latency(slow), 1);
    let started = std::time::Instant::now();
    let mut cmd = Command::new(atmorep_bin());
    fx.server.configure_command(&mut cmd);
    let output = cmd
        .env("ATMOREP_STORE_TIMEOUT_SECS", "1")
        .env("ATMOREP_STORE_BACKOFF_MS", "10")
        .args([
            "loader",
            "inspect",
            &fx.server.url(BUCKET, PREFIX),
            "--json",
            "--stats",
        ])
        .output()
        .unwrap();
    let took = started.elapsed();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let tries = fx.server.faults().requests(BUCKET, &chunk);
    println!(
        "timeout 1 s, answer after 3 s: {} tries, {took:?}",
        tries.len()
    );
    assert_eq!(tries.len(), 2, "the slow try and its retry");
    assert!(
        tries[1].at - tries[0].at < slow,
        "the retry came {:?} after the first try",
        tries[1].at - tries[0].at
    );

    assert_setting_refused(&fx, "ATMOREP_STORE_TIMEOUT_SECS", "soon");
}

/// A loader serving a store over S3 whose objects answer 403 `AccessDenied` once it is up:
/// the stream fails within seconds with PERMISSION_DENIED naming the object, every refused object
/// was asked for exactly once (object_store retries no 4xx; the 16 samples in flight, which share
/// chunks, share each chunk's one read and its failure, and stop with the stream), and the client
/// opened the stream once (it retries no PERMISSION_DENIED, though its policy allows 8 attempts).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_403_from_the_store_is_permission_denied_and_never_retried() {
    let dir = tempfile::tempdir().unwrap();
    let local = store_with_stats(dir.path(), "tiny.zarr", &tiny_config(40)).await;
    let server = S3TestServer::start(&dir.path().join("s3")).await.unwrap();
    server.upload_dir(&local, BUCKET, "tiny.zarr").unwrap();
    let config = dir.path().join("loader.toml");
    std::fs::write(
        &config,
        format!(
            "sample_concurrency = 16\n\n[[datasets]]\nname = \"era5\"\nurl = \"{}\"\nstats = \"{}.stats\"\n",
            server.url(BUCKET, "tiny.zarr"),
            local.display()
        ),
    )
    .unwrap();
    let env = server.s3_env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let log = dir.path().join("server.log");
    let mut loader = Server::start_with_env(
        "127.0.0.1:0",
        &["--config".into(), config.display().to_string()],
        &env,
        &log,
    );
    // From now on every object of the store is refused (its metadata was read at startup).
    server.faults().clear_log();
    server
        .faults()
        .always(BUCKET, "tiny.zarr/*", Fault::Status(403));

    let client = connect(client_config(vec![loader.endpoint()])).await;
    let started = std::time::Instant::now();
    let mut stream = client.stream(request("era5", 4, 8, "end_epoch = 1"));
    let first = tokio::time::timeout(Duration::from_secs(60), stream.next())
        .await
        .expect("the stream is answered");
    let took = started.elapsed();
    let err = match first {
        Some(Err(e)) => e,
        other => panic!("a stream over a 403 store must fail, got {other:?}"),
    };
    println!("403 store: {err} after {:.0} ms", took.as_secs_f64() * 1e3);
    assert_eq!(err.code(), Some(tonic::Code::PermissionDenied), "{err}");
    assert!(
        err.to_string().contains("tiny.zarr/"),
        "names the object: {err}"
    );
    assert!(took < Duration::from_secs(10), "fails fast, took {took:?}");

    let requests = server.faults().log();
    let refused: Vec<_> = requests.iter().filter(|r| r.fault.is_some()).collect();
    assert!(!refused.is_empty(), "the store was asked");
    let mut per_key = std::collections::BTreeMap::<&str, usize>::new();
    for r in &refused {
        *per_key.entry(r.key.as_str()).or_default() += 1;
    }
    println!("refused objects: {per_key:?}");
    assert!(
        per_key.values().all(|&n| n == 1),
        "a refused object was asked for more than once: {per_key:?}"
    );
    let opened = std::fs::read_to_string(&log)
        .unwrap()
        .matches("stream opened")
        .count();
    assert_eq!(opened, 1, "the client retried a PERMISSION_DENIED");
    assert!(loader.is_running());
}
