//! Faults contained to the stream that hit them, against a real `atmorep loader serve`: a panic
//! injected into the decodes of one dataset (the `ATMOREP_FAULT_DECODE_PANIC` test hook) fails
//! that dataset's stream and `GetSample` with INTERNAL, logs it and counts it in
//! `atmorep_panics_total`, while another client's stream on the same server, running at the same
//! time, delivers its epoch exactly once; a panic injected into the sample tasks of one dataset
//! (`ATMOREP_FAULT_SAMPLE_PANIC`) likewise. A chunk deleted from a store reads as the fill value
//! (reported once) or, under `missing_chunks = "error"`, fails the stream with DATA_LOSS naming
//! it.

use std::path::Path;
use std::time::Duration;

use atmorep_proto::pb;
use atmorep_testkit::Server;
use atmorep_testkit::prometheus::{free_port, metric, scrape};
use atmorep_testkit::streams::{assert_whole_epoch, client_config, collect, connect, ids};
use atmorep_testkit::tiny::{request, store_with_stats, tiny_config};
use tempfile::TempDir;
use tonic::Code;

fn log_of(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("server.log")).unwrap_or_default()
}

/// A server of two tiny datasets, `good` and `bad`, with the panic hook `hook` set for `bad`;
/// a stream of each at once. The good stream delivers its epoch exactly once, the bad one fails
/// with INTERNAL saying `panic in {place}` and ends there.
struct Panicked {
    dir: TempDir,
    server: Server,
    metrics_port: u16,
    client: atmorep_proto::client::LoaderClient,
}

async fn panic_beside_a_good_stream(hook: &str, place: &str) -> Panicked {
    let dir = TempDir::new().unwrap();
    let good = store_with_stats(dir.path(), "good.zarr", &tiny_config(40)).await;
    let bad = store_with_stats(dir.path(), "bad.zarr", &tiny_config(40)).await;
    let metrics_port = free_port();
    let server = Server::start_with_env(
        "127.0.0.1:0",
        &[
            "--dataset".into(),
            format!("good={}", good.display()),
            "--dataset".into(),
            format!("bad={}", bad.display()),
            "--metrics-bind".into(),
            format!("127.0.0.1:{metrics_port}"),
        ],
        &[(hook, "bad.zarr")],
        &dir.path().join("server.log"),
    );
    let client = connect(client_config(vec![server.endpoint()])).await;

    // Both streams at once: the panics happen on the decode pool and the runtime the good
    // stream uses too.
    let mut good_stream = client.stream(request("good", 4, 8, "end_epoch = 1"));
    let mut bad_stream = client.stream(request("bad", 4, 8, "end_epoch = 1"));
    let (good_batches, bad_first) = tokio::join!(collect(&mut good_stream), async {
        tokio::time::timeout(Duration::from_secs(60), bad_stream.next())
            .await
            .expect("the panicking stream is answered")
    });
    assert_whole_epoch(&ids(&good_batches), 0, 32);
    let err = match bad_first {
        Some(Err(e)) => e,
        other => panic!("the panicking stream must fail, got {other:?}"),
    };
    println!("panicking stream: {err}");
    assert_eq!(err.code(), Some(Code::Internal), "{err}");
    assert!(
        err.to_string().contains(&format!("panic in {place}")),
        "{err}"
    );
    assert!(bad_stream.next().await.is_none(), "nothing after the error");
    Panicked {
        dir,
        server,
        metrics_port,
        client,
    }
}

impl Panicked {
    /// A second good epoch on the same connection, the server alive, and the Prometheus text.
    async fn carries_on(&mut self) -> String {
        let mut again = self.client.stream(request("good", 4, 8, "end_epoch = 1"));
        assert_whole_epoch(&ids(&collect(&mut again).await), 0, 32);
        assert!(
            self.server.is_running(),
            "the server died:\n{}",
            log_of(self.dir.path())
        );
        scrape(self.metrics_port).expect("the metrics endpoint answers")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_a_decode_fails_only_its_stream() {
    let mut panicked = panic_beside_a_good_stream("ATMOREP_FAULT_DECODE_PANIC", "decode").await;

    // GetSample runs the same decode in its handler: INTERNAL too, and the connection lives.
    let sample = panicked
        .client
        .sample(pb::SampleRequest::by_id(request("bad", 1, 8, ""), 0, 0))
        .await
        .expect_err("a sample of the panicking dataset fails");
    assert_eq!(sample.code(), Some(Code::Internal), "{sample}");

    let text = panicked.carries_on().await;
    let log = log_of(panicked.dir.path());
    assert!(
        log.contains("panic contained") && log.contains("ERROR"),
        "no error line for the panic:\n{log}"
    );
    let panics = metric(&text, "atmorep_panics_total{place=\"decode\"}");
    println!("atmorep_panics_total{{place=\"decode\"}} = {panics:?}");
    assert!(panics.is_some_and(|n| n >= 2.0), "{text}");
}

/// A panic in a sample task (not in a decode: the `ATMOREP_FAULT_SAMPLE_PANIC` hook fires before
/// the sample reads anything) fails that stream with INTERNAL, counted under
/// `place="sample task"`, while the other dataset's stream, running at the same time, delivers
/// its epoch exactly once and the server keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_a_sample_task_fails_only_its_stream() {
    let mut panicked =
        panic_beside_a_good_stream("ATMOREP_FAULT_SAMPLE_PANIC", "sample task").await;
    let text = panicked.carries_on().await;
    let panics = metric(&text, "atmorep_panics_total{place=\"sample task\"}");
    println!("atmorep_panics_total{{place=\"sample task\"}} = {panics:?}");
    assert!(panics.is_some_and(|n| n >= 1.0), "{text}");
    assert_eq!(
        metric(&text, "atmorep_panics_total{place=\"decode\"}"),
        None,
        "no decode panicked"
    );
}

/// A store with one chunk deleted, served twice by one server: as `fill` (the default) and as
/// `strict` (`missing_chunks = "error"`), with the chunk cache off so every read goes to the
/// store. `fill` streams whole epochs (the chunk reads as the fill value) and reports the chunk
/// once however often it is read; `strict` fails with DATA_LOSS naming the dataset, the array
/// and the chunk, although `fill` read that very chunk first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_chunk_is_filled_and_reported_once_or_refused_by_name() {
    let dir = TempDir::new().unwrap();
    let store = store_with_stats(dir.path(), "era5.zarr", &tiny_config(40)).await;
    let chunk = store.join("z").join("2.0.0.0");
    std::fs::remove_file(&chunk).unwrap_or_else(|e| panic!("deleting {}: {e}", chunk.display()));
    let config = dir.path().join("loader.toml");
    std::fs::write(
        &config,
        format!(
            "cache_mib = 0\n\n\
             [[datasets]]\nname = \"fill\"\nurl = \"{url}\"\n\n\
             [[datasets]]\nname = \"strict\"\nurl = \"{url}\"\nmissing_chunks = \"error\"\n",
            url = store.display()
        ),
    )
    .unwrap();
    let metrics_port = free_port();
    let mut server = Server::start(
        &[
            "--config".into(),
            config.display().to_string(),
            "--metrics-bind".into(),
            format!("127.0.0.1:{metrics_port}"),
        ],
        &dir.path().join("server.log"),
    );
    let client = connect(client_config(vec![server.endpoint()])).await;

    for _ in 0..2 {
        let mut fill = client.stream(request("fill", 4, 8, "end_epoch = 1"));
        assert_whole_epoch(&ids(&collect(&mut fill).await), 0, 32);
    }
    for _ in 0..2 {
        let mut strict = client.stream(request("strict", 4, 8, "end_epoch = 1"));
        let first = tokio::time::timeout(Duration::from_secs(60), async {
            loop {
                match strict.next().await {
                    Some(Ok(_)) => continue,
                    other => return other,
                }
            }
        })
        .await
        .expect("the strict stream is answered");
        let err = match first {
            Some(Err(e)) => e,
            None => panic!("the strict stream never touched the missing chunk"),
            Some(Ok(_)) => unreachable!(),
        };
        println!("strict: {err}");
        assert_eq!(err.code(), Some(Code::DataLoss), "{err}");
        let text = err.to_string();
        for part in ["`strict`", "`z`", "`z/2.0.0.0`"] {
            assert!(text.contains(part), "the error names {part}: {text}");
        }
    }
    assert!(server.is_running());

    let log = log_of(dir.path());
    let filled = log.matches("missing chunk: read as the fill value").count();
    let refused = log.matches("missing chunk: reads fail").count();
    println!("log lines: {filled} filled, {refused} refused");
    assert_eq!(
        (filled, refused),
        (1, 1),
        "one line per chunk and dataset:\n{log}"
    );
    let text = scrape(metrics_port).expect("the metrics endpoint answers");
    for dataset in ["fill", "strict"] {
        let n = metric(
            &text,
            &format!("atmorep_missing_chunks_total{{dataset=\"{dataset}\"}}"),
        );
        assert_eq!(n, Some(1.0), "{dataset}:\n{text}");
    }
}
