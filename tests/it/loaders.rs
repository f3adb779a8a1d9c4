//! Many loaders: one stream striped across several real `atmorep loader serve`
//! processes serving the same tiny synthetic store, through the real client library
//! (`ClientConfig::stripe`) and `atmorep loader pull --stripe`.
//!
//! Covered: a striped epoch arrives exactly once and each loader serves exactly its sub-shard
//! (counted by its Prometheus endpoint); the same request twice gives the same order; `pull
//! --stripe --check-epoch`; resuming from mid-epoch striped cursors (including ones after the
//! short batches of an epoch's last round, and in the second epoch) gives exactly the remainder
//! with the same cursors; `kill -9` of one of three loaders mid-epoch, never restarted, and the
//! epoch still arrives exactly once, in the order of an uninterrupted striped stream.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use atmorep_proto::batch::{Batch, StreamCursor};
use atmorep_proto::client::ClientConfig;
use atmorep_testkit::prometheus::{free_port, scrape};
use atmorep_testkit::streams::{
    STREAM_TIMEOUT, assert_whole_epoch, client_config, collect, connect, cursors, ids,
};
use atmorep_testkit::tiny::{request, request_toml, store_with_stats, tiny_config};
use atmorep_testkit::{ChildGuard, Server, atmorep_bin};
use serde_json::Value;
use tempfile::TempDir;

fn path_str(path: &Path) -> &str {
    path.to_str().expect("test paths are UTF-8")
}

/// Three loaders over `store`, each with a metrics endpoint; (servers, metrics ports).
fn three_loaders(dir: &Path, store: &Path) -> (Vec<Server>, Vec<u16>) {
    (0..3)
        .map(|i| {
            let port = free_port();
            let args = vec![
                "--dataset".to_string(),
                format!("era5={}", path_str(store)),
                "--metrics-bind".into(),
                format!("127.0.0.1:{port}"),
            ];
            (
                Server::start(&args, &dir.join(format!("loader{i}.log"))),
                port,
            )
        })
        .unzip()
}

/// A striped client over `endpoints` that retries briefly (tests must fail, not hang).
fn striped(endpoints: Vec<String>) -> ClientConfig {
    let mut config = client_config(endpoints);
    config.stripe = true;
    config
}

/// `atmorep_samples_served_total` of the dataset on the metrics endpoint `port`, once it
/// reads `expected` (the counter is bumped just after the send, so it may trail the client by
/// a moment); the last value read when it never does within 10 s.
async fn samples_served(port: u16, expected: f64) -> Option<f64> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let served = scrape(port).and_then(|text| {
            text.lines()
                .filter(|l| !l.starts_with('#'))
                .find(|l| l.starts_with("atmorep_samples_served_total{dataset=\"era5\"}"))
                .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        });
        if served == Some(expected) || Instant::now() > deadline {
            return served;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A striped epoch of 50 samples over three loaders (sub-shards of 17, 17 and 16 in batches of
/// 4: every sub-stream ends on a short batch) arrives exactly once; each loader served exactly
/// its sub-shard; the same request again gives the same order; `pull --stripe --check-epoch`
/// over the same loaders verifies its epoch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_striped_epoch_arrives_once_and_each_loader_serves_its_share() {
    let dir = TempDir::new().unwrap();
    let store = store_with_stats(dir.path(), "era5.zarr", &tiny_config(16)).await;
    let (servers, metrics) = three_loaders(dir.path(), &store);
    let endpoints: Vec<String> = servers.iter().map(Server::endpoint).collect();
    let client = connect(striped(endpoints.clone())).await;

    let mut stream = client.stream(request("era5", 4, 25, "end_epoch = 1"));
    assert_eq!(stream.sub_streams(), 3);
    let first = collect(&mut stream).await;
    assert_whole_epoch(&ids(&first), 0, 50);
    assert!(first.last().is_some_and(|b| b.end_of_stream));
    assert!(first[..first.len() - 1].iter().all(|b| !b.end_of_stream));
    assert_eq!(
        first.last().unwrap().cursor_after,
        StreamCursor {
            epoch: 1,
            position: 0
        }
    );
    let stats = stream.stats();
    assert_eq!(stats.batches_delivered, first.len() as u64);
    assert_eq!(stats.reconnects, 0, "{stats:?}");

    // Loader k served sub-shard k: ⌈(50 − k) / 3⌉ samples.
    for (k, (&port, expected)) in metrics.iter().zip([17.0, 17.0, 16.0]).enumerate() {
        assert_eq!(
            samples_served(port, expected).await,
            Some(expected),
            "samples served by loader {k}"
        );
    }

    let again = collect(&mut client.stream(request("era5", 4, 25, "end_epoch = 1"))).await;
    assert_eq!(ids(&again), ids(&first), "the same request, the same order");
    assert_eq!(cursors(&again), cursors(&first));

    let request_file = dir.path().join("request.toml");
    std::fs::write(&request_file, request_toml("era5", 4, 25, "")).unwrap();
    let child = Command::new(atmorep_bin())
        .args([
            "loader",
            "pull",
            &endpoints.join(","),
            "--stripe",
            "--check-epoch",
        ])
        .arg("--request")
        .arg(&request_file)
        .arg("--json")
        .env("RUST_LOG", "warn")
        .env_remove("ATMOREP_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting atmorep loader pull");
    let output = tokio::task::spawn_blocking(move || ChildGuard(Some(child)).wait_output())
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "pull failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: Value = serde_json::from_slice(&output.stdout).expect("pull prints JSON");
    assert_eq!(report["epoch_checked"], Value::Bool(true), "{report}");
    assert_eq!(report["samples"], 50, "{report}");
    assert_eq!(report["sub_streams"], 3, "{report}");
    let pulled: Vec<(u64, u64)> =
        serde_json::from_value(report["ids"].clone()).expect("ids in the report");
    assert_eq!(pulled, ids(&first), "pull sees the library's order");
}

/// Two striped epochs of 50 samples in batches of 5 over three loaders (sub-shards 17, 17, 16:
/// each epoch ends with a round of short batches of 2, 2 and 1), then new streams from cursors
/// in the middle of epoch 0, right after the short batches of its last round, at the epoch
/// boundary and in epoch 1: each delivers exactly the rest, with the same cursors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resuming_a_striped_stream_mid_epoch_delivers_exactly_the_remainder() {
    let dir = TempDir::new().unwrap();
    let store = store_with_stats(dir.path(), "era5.zarr", &tiny_config(16)).await;
    let (servers, _) = three_loaders(dir.path(), &store);
    let endpoints: Vec<String> = servers.iter().map(Server::endpoint).collect();
    let client = connect(striped(endpoints)).await;

    let whole = collect(&mut client.stream(request("era5", 5, 25, "end_epoch = 2"))).await;
    let all = ids(&whole);
    assert_whole_epoch(&all[..50], 0, 50);
    assert_whole_epoch(&all[50..], 1, 50);
    assert_eq!(whole.len(), 24, "12 merged batches per epoch");
    let sizes: Vec<usize> = whole[9..12].iter().map(Batch::len).collect();
    assert_eq!(sizes, [2, 2, 1], "the last round of an epoch");

    for cut in [1, 4, 9, 10, 12, 17] {
        let cursor = whole[cut - 1].cursor_after;
        let mut resumed_request = request("era5", 5, 25, "end_epoch = 2");
        resumed_request.resume = Some(cursor.into());
        let resumed = collect(&mut client.stream(resumed_request)).await;
        let done: usize = whole[..cut].iter().map(Batch::len).sum();
        assert_eq!(ids(&resumed), all[done..], "ids after {cursor:?}");
        assert_eq!(
            cursors(&resumed),
            cursors(&whole)[cut..],
            "cursors after {cursor:?}"
        );
    }
}

/// Three loaders; after 4 of the 33 merged batches of an epoch of 128 samples loader 1 is
/// killed with SIGKILL and never restarted. Its sub-stream fails over to loader 2 and resumes
/// from its own cursor: every id arrives exactly once, in the order of an uninterrupted striped
/// stream (three sub-streams over the two survivors).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_one_loader_mid_epoch_still_delivers_each_id_once() {
    let dir = TempDir::new().unwrap();
    let store = store_with_stats(dir.path(), "era5.zarr", &tiny_config(16)).await;
    let (mut servers, _) = three_loaders(dir.path(), &store);
    let endpoints: Vec<String> = servers.iter().map(Server::endpoint).collect();

    let mut config = striped(endpoints.clone());
    // Small buffers: no loader can run far ahead, so the kill cuts its sub-stream mid-way. The
    // connection window is no larger than one stream's: after the failover two sub-streams talk
    // to loader 2 and the merge holds one back while it waits for the other, so on one shared
    // HTTP/2 connection the held-back stream's unread bytes would block the other's (this hung
    // before each sub-stream had its own connection).
    config.prefetch = 1;
    config.stream_window_bytes = 64 << 10;
    config.connection_window_bytes = 64 << 10;
    let client = connect(config).await;

    let mut stream = client.stream(request("era5", 4, 64, "end_epoch = 1"));
    let mut batches = Vec::new();
    let consumed = async {
        while let Some(batch) = stream.next().await {
            batches.push(batch.expect("the stream survives the kill"));
            if batches.len() == 4 {
                servers[1].kill9();
            }
            // A consumer with some work per batch.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(STREAM_TIMEOUT, consumed)
        .await
        .expect("the stream did not finish after the kill");
    assert!(!servers[1].is_running());
    let arrived = ids(&batches);
    assert_whole_epoch(&arrived, 0, 128);
    assert!(
        stream.reconnects() >= 1,
        "no sub-stream reconnected: the kill came too late ({:?})",
        stream.stats()
    );

    // Three sub-streams, the middle one on loader 2 from the start.
    let survivors = vec![
        endpoints[0].clone(),
        endpoints[2].clone(),
        endpoints[2].clone(),
    ];
    let fresh = connect(striped(survivors)).await;
    let uninterrupted = collect(&mut fresh.stream(request("era5", 4, 64, "end_epoch = 1"))).await;
    assert_eq!(arrived, ids(&uninterrupted));
    assert_eq!(cursors(&batches), cursors(&uninterrupted));
    println!("{:?}", stream.stats());
}
