//! Faults contained to the stream that hit them, against a real `atmorep loader serve`: a panic
//! injected into the decodes of one dataset (the `ATMOREP_FAULT_DECODE_PANIC` test hook) fails
//! that dataset's stream and `GetSample` with INTERNAL, logs it and counts it in
//! `atmorep_panics_total`, while another client's stream on the same server, running at the same
//! time, delivers its epoch exactly once.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::time::Duration;

use atmorep_proto::pb;
use atmorep_testkit::Server;
use atmorep_testkit::streams::{assert_whole_epoch, client_config, collect, connect, ids};
use atmorep_testkit::tiny::{request, store_with_stats, tiny_config};
use tempfile::TempDir;
use tonic::Code;

/// A port that was free a moment ago (`--metrics-bind` does not report its port).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("binding 127.0.0.1:0")
        .port()
}

/// The text of `GET /metrics` on `port`, or `None` while nothing answers there.
fn scrape(port: u16) -> Option<String> {
    let mut conn = TcpStream::connect(("127.0.0.1", port)).ok()?;
    conn.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut text = String::new();
    conn.read_to_string(&mut text).ok()?;
    Some(text)
}

/// The value of the Prometheus sample line that starts with `prefix` (name and labels).
fn metric(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

fn log_of(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("server.log")).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_a_decode_fails_only_its_stream() {
    let dir = TempDir::new().unwrap();
    let good = store_with_stats(dir.path(), "good.zarr", &tiny_config(40)).await;
    let bad = store_with_stats(dir.path(), "bad.zarr", &tiny_config(40)).await;
    let metrics_port = free_port();
    let mut server = Server::start_with_env(
        "127.0.0.1:0",
        &[
            "--dataset".into(),
            format!("good={}", good.display()),
            "--dataset".into(),
            format!("bad={}", bad.display()),
            "--metrics-bind".into(),
            format!("127.0.0.1:{metrics_port}"),
        ],
        &[("ATMOREP_FAULT_DECODE_PANIC", "bad.zarr")],
        &dir.path().join("server.log"),
    );
    let client = connect(client_config(vec![server.endpoint()])).await;

    // Both streams at once: the panics happen on the decode pool the good stream uses too.
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
    assert!(err.to_string().contains("panic in decode"), "{err}");
    assert!(bad_stream.next().await.is_none(), "nothing after the error");

    // GetSample runs the same decode in its handler: INTERNAL too, and the connection lives.
    let sample = client
        .sample(pb::SampleRequest::by_id(request("bad", 1, 8, ""), 0, 0))
        .await
        .expect_err("a sample of the panicking dataset fails");
    assert_eq!(sample.code(), Some(Code::Internal), "{sample}");

    // The server carries on: a second good epoch after the panics, on the same connection.
    let mut again = client.stream(request("good", 4, 8, "end_epoch = 1"));
    assert_whole_epoch(&ids(&collect(&mut again).await), 0, 32);
    assert!(
        server.is_running(),
        "the server died:\n{}",
        log_of(dir.path())
    );

    let log = log_of(dir.path());
    assert!(
        log.contains("panic contained") && log.contains("ERROR"),
        "no error line for the panic:\n{log}"
    );
    let text = scrape(metrics_port).expect("the metrics endpoint answers");
    let panics = metric(&text, "atmorep_panics_total{place=\"decode\"}");
    println!("atmorep_panics_total{{place=\"decode\"}} = {panics:?}");
    assert!(panics.is_some_and(|n| n >= 2.0), "{text}");
}
