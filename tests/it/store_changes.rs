//! A store rewritten while a real `atmorep loader serve` serves it, locally and over the
//! in-process S3 server: one chunk of `z` is rewritten by zarrs (values far outside the field's
//! range, so a batch holding any of them is recognised) while a stream is open. The streams that
//! read it afterwards fail with DATA_LOSS "store changed" naming the dataset, the array and the
//! chunk; no batch delivered before the failure holds a new value; a new stream fails alike until
//! the loader is restarted (the documented reopen), after which the new values are served. The
//! chunk cache is off (`cache_mib = 0`) so every read goes to the store.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use atmorep_proto::batch::Batch;
use atmorep_testkit::prometheus::{free_port, metric, scrape};
use atmorep_testkit::streams::{assert_whole_epoch, client_config, collect, connect, ids};
use atmorep_testkit::tiny::{request, store_with_stats, tiny_config};
use atmorep_testkit::{S3TestServer, Server};
use tonic::Code;

/// The rewritten chunk: step 2 of `z`, both levels' first (Zarr v2, `.` separator), which every
/// epoch of the test request reads.
const CHUNK: [u64; 4] = [2, 0, 0, 0];
const CHUNK_KEY: &str = "z/2.0.0.0";
/// The rewritten chunk's values: normalized, still far beyond any value of the synthetic `z`.
const NEW_VALUE: f32 = 1.0e9;
/// A normalized value this large comes from the rewritten chunk.
const NEW_THRESHOLD: f32 = 1.0e3;

/// Rewrites [`CHUNK`] of the store at `path` with [`NEW_VALUE`], through zarrs.
fn rewrite_chunk(path: &Path) {
    let store = Arc::new(zarrs::filesystem::FilesystemStore::new(path).unwrap());
    let array = zarrs::array::Array::open(store, "/z").unwrap();
    let n: u64 = array
        .chunk_shape(&CHUNK)
        .unwrap()
        .iter()
        .map(|d| d.get())
        .product();
    array
        .store_chunk(&CHUNK, vec![NEW_VALUE; n as usize])
        .unwrap();
}

/// Whether `batch` holds a value of the rewritten chunk.
fn has_new_values(batch: &Batch) -> bool {
    batch
        .fields
        .iter()
        .flat_map(|f| f.source.iter().chain(&f.target))
        .any(|v| v.abs() > NEW_THRESHOLD)
}

/// Reads `stream` to its end or first error (within a minute): the batches, and the error.
async fn until_error(
    stream: &mut atmorep_proto::client::LoaderStream,
) -> (Vec<Batch>, Option<atmorep_proto::client::ClientError>) {
    tokio::time::timeout(Duration::from_secs(60), async {
        let mut batches = Vec::new();
        while let Some(next) = stream.next().await {
            match next {
                Ok(batch) => batches.push(batch),
                Err(e) => return (batches, Some(e)),
            }
        }
        (batches, None)
    })
    .await
    .expect("the stream is answered")
}

fn assert_store_changed(err: Option<atmorep_proto::client::ClientError>, what: &str) {
    let err = err.unwrap_or_else(|| panic!("{what}: the stream ended without reading the chunk"));
    println!("{what}: {err}");
    assert_eq!(err.code(), Some(Code::DataLoss), "{what}: {err}");
    let text = err.to_string();
    for part in ["store changed", "`era5`", "`z`", &format!("`{CHUNK_KEY}`")] {
        assert!(
            text.contains(part),
            "{what}: the error names {part}: {text}"
        );
    }
}

fn config(dir: &Path, url: &str, stats: &Path) -> std::path::PathBuf {
    let path = dir.join("loader.toml");
    std::fs::write(
        &path,
        format!(
            "cache_mib = 0\n\n[[datasets]]\nname = \"era5\"\nurl = \"{url}\"\nstats = \"{}\"\n",
            stats.display()
        ),
    )
    .unwrap();
    path
}

fn start(config: &Path, env: &[(&str, &str)], log: &Path, metrics_port: u16) -> Server {
    Server::start_with_env(
        "127.0.0.1:0",
        &[
            "--config".into(),
            config.display().to_string(),
            "--metrics-bind".into(),
            format!("127.0.0.1:{metrics_port}"),
        ],
        env,
        log,
    )
}

/// The scenario, with `rewrite` changing the served chunk.
async fn rewritten_while_served(
    dir: &Path,
    url: &str,
    stats: &Path,
    env: &[(&str, &str)],
    rewrite: impl FnOnce(),
) {
    let config = config(dir, url, stats);
    let log = dir.join("server.log");
    let metrics_port = free_port();
    let mut server = start(&config, env, &log, metrics_port);
    let client = connect(client_config(vec![server.endpoint()])).await;

    // A whole epoch first: the server reads (and records) every chunk it touches, the
    // rewritten one among them.
    let mut first = client.stream(request("era5", 4, 8, "end_epoch = 1"));
    let before = collect(&mut first).await;
    assert_whole_epoch(&ids(&before), 0, 32);
    assert!(
        !before.iter().any(has_new_values),
        "new values before the rewrite"
    );

    // A stream open across the rewrite, endless: the server has read ahead of the client by
    // what flow control lets it, and goes on reading (chunk 2 in every epoch) after the rewrite.
    let mut open = client.stream(request("era5", 4, 8, ""));
    let head = open
        .next()
        .await
        .expect("a first batch")
        .expect("the first batch before the rewrite");
    rewrite();
    let (rest, err) = until_error(&mut open).await;
    println!(
        "open stream: {} batches delivered, then the error",
        rest.len() + 1
    );
    assert_store_changed(err, "the stream open across the rewrite");
    let mixed = std::iter::once(&head)
        .chain(&rest)
        .filter(|b| has_new_values(b))
        .count();
    assert_eq!(mixed, 0, "batches holding the rewritten chunk's new values");

    // A stream opened after the change fails alike: the chunk stays refused until a reopen.
    let mut later = client.stream(request("era5", 4, 8, "end_epoch = 1"));
    let (delivered, err) = until_error(&mut later).await;
    assert_store_changed(err, "a stream opened after the rewrite");
    assert!(!delivered.iter().any(has_new_values));
    assert!(server.is_running());

    let text = scrape(metrics_port).expect("the metrics endpoint answers");
    let changes = metric(&text, "atmorep_store_changes_total{dataset=\"era5\"}");
    println!("atmorep_store_changes_total{{dataset=\"era5\"}} = {changes:?}");
    assert_eq!(
        changes,
        Some(1.0),
        "one changed chunk, counted once:\n{text}"
    );
    let logged = std::fs::read_to_string(&log).unwrap();
    assert_eq!(
        logged
            .matches("store changed: chunk is not the version first read")
            .count(),
        1,
        "one line per changed chunk:\n{logged}"
    );

    // Reopen: a restarted loader serves the store as it is now, new values included.
    drop(server);
    let server = start(&config, env, &dir.join("server2.log"), free_port());
    let client = connect(client_config(vec![server.endpoint()])).await;
    let mut reopened = client.stream(request("era5", 4, 8, "end_epoch = 1"));
    let after = collect(&mut reopened).await;
    assert_whole_epoch(&ids(&after), 0, 32);
    assert!(
        after.iter().any(has_new_values),
        "the reopened store serves the rewritten chunk"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_chunk_rewritten_while_served_is_data_loss_and_never_mixed() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_with_stats(dir.path(), "era5.zarr", &tiny_config(40)).await;
    let stats = store.with_extension("zarr.stats");
    let url = store.display().to_string();
    rewritten_while_served(dir.path(), &url, &stats, &[], || rewrite_chunk(&store)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_s3_object_rewritten_while_served_is_data_loss_and_never_mixed() {
    let dir = tempfile::tempdir().unwrap();
    let local = store_with_stats(dir.path(), "tiny.zarr", &tiny_config(40)).await;
    let stats = local.with_extension("zarr.stats");
    let server = S3TestServer::start(&dir.path().join("s3")).await.unwrap();
    server.upload_dir(&local, "era5", "tiny.zarr").unwrap();
    let env = server.s3_env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let served = server.bucket_dir("era5").join("tiny.zarr");
    let url = server.url("era5", "tiny.zarr");
    // Rewritten in place in the bucket's folder: the object's ETag (its MD5) changes.
    rewritten_while_served(dir.path(), &url, &stats, &env, || rewrite_chunk(&served)).await;
}
