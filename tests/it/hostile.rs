//! Hostile clients against a real `atmorep loader serve`: valid-but-huge requests (a positional
//! encoding of hundreds of megabytes per sample, a billion samples per block, a blur wider than
//! the globe, a batch over the memory limit, a window larger than the grid, …), each refused
//! from its cost before the server allocates anything for it — RESOURCE_EXHAUSTED over a
//! configured limit, INVALID_ARGUMENT for nonsense — with a message naming the request field.
//! The same server then streams a well-behaved client's epoch exactly once. Each case's
//! response time is printed (not asserted: the CI machine's speed is not ours to promise).

use std::time::{Duration, Instant};

use atmorep_proto::client::{ClientError, LoaderClient};
use atmorep_proto::pb;
use atmorep_testkit::Server;
use atmorep_testkit::streams::{assert_whole_epoch, client_config, collect, connect, ids};
use atmorep_testkit::tiny::{request, store_with_stats, tiny_config};
use tempfile::TempDir;
use tonic::Code;

/// Limits small enough for the tiny 10° store (19 × 36 points, 40 steps) to reach; batches keep
/// the defaults (512 MiB, and the 1 GiB memory budget).
const LIMITS: &str = "
max_tokens_per_sample = 50000
max_samples_per_epoch = 10000
max_blur_sigma = 1.0
";

/// One hostile call: what it asks, the code it must get and the field its message must name.
struct Hostile {
    what: &'static str,
    call: Call,
    code: Code,
    names: &'static str,
}

enum Call {
    Stream(pb::BatchRequest),
    Sample(pb::SampleRequest),
}

/// The well-behaved request (2 fields, 2-step windows, 32 samples per epoch) with `edit`.
fn edited(edit: impl FnOnce(&mut pb::BatchRequest)) -> pb::BatchRequest {
    let mut r = request("era5", 4, 8, "end_epoch = 1");
    edit(&mut r);
    r
}

fn stream(edit: impl FnOnce(&mut pb::BatchRequest)) -> Call {
    Call::Stream(edited(edit))
}

/// Field 0 (`z`, 850 and 500 hPa) alone, cut in one-point tokens over `num_tokens`.
fn points(r: &mut pb::BatchRequest, num_tokens: [u32; 3]) {
    r.fields.truncate(1);
    r.fields[0].num_tokens = num_tokens.to_vec();
    r.fields[0].token_size = vec![1, 1, 1];
}

fn read_plan(r: &mut pb::BatchRequest, samples_per_block: u64) {
    r.read_plan = Some(pb::ReadPlan {
        block_steps: 0,
        samples_per_block,
        buffer_blocks: 0,
    });
}

#[rustfmt::skip]
fn hostile_calls() -> Vec<Hostile> {
    use Code::{InvalidArgument as Invalid, ResourceExhausted as Exhausted};
    let row = |what, call, code, names| Hostile { what, call, code, names };
    vec![
        // The request that took the loader down: 10⁶ tokens of standard PE, width 4096.
        row("PE of 10⁶ tokens × 4096 on a 19 × 36 grid", stream(|r| {
            points(r, [1, 1000, 1000]);
            r.fields[0].pe = pb::PeMode::Standard as i32;
            r.fields[0].pe_width = 4096;
        }), Invalid, "fields[0].num_tokens"),
        // 2 levels × 30 × 19 × 36 tokens × 4096 channels × 4 bytes = 672 MB for one sample.
        row("PE of 672 MB per sample", stream(|r| {
            points(r, [30, 19, 36]);
            r.fields[0].pe_width = 4096;
            r.batch_size = 1;
        }), Exhausted, "fields[0].pe_width"),
        row("PE of 672 MB by GetSample", Call::Sample(pb::SampleRequest::by_id(
            edited(|r| {
                points(r, [30, 19, 36]);
                r.fields[0].pe_width = 4096;
                r.batch_size = 1;
            }), 0, 0)), Exhausted, "fields[0].pe_width"),
        // 256 samples of 3 MB: 755 MB, over max_batch_mib = 512.
        row("batch of 755 MB", stream(|r| {
            points(r, [30, 19, 36]);
            r.batch_size = 256;
        }), Exhausted, "batch_size"),
        row("10⁹ samples per block", stream(|r| read_plan(r, 1_000_000_000)), Exhausted, "read_plan.samples_per_block"),
        row("u64::MAX samples per block", stream(|r| read_plan(r, u64::MAX)), Invalid, "read_plan.samples_per_block"),
        row("blur sigma 10 000", stream(|r| r.fields[0].blur_sigma = 10_000.0), Invalid, "fields[0].blur_sigma"),
        row("blur sigma 3 over max_blur_sigma", stream(|r| r.fields[1].blur_sigma = 3.0), Exhausted, "fields[1].blur_sigma"),
        row("window taller than the grid", stream(|r| r.fields[0].num_tokens = vec![2, 7, 6]), Invalid, "fields[0].num_tokens"),
        row("window wider than the grid", stream(|r| r.fields[1].num_tokens = vec![2, 3, 13]), Invalid, "fields[1].num_tokens"),
        row("window longer than the time axis", stream(|r| r.fields[1].num_tokens = vec![41, 3, 6]), Invalid, "fields[1].num_tokens"),
        row("extents overflowing 64 bits", stream(|r| {
            r.fields[1].num_tokens = vec![u32::MAX; 3];
            r.fields[1].token_size = vec![u32::MAX; 3];
        }), Invalid, "fields[1].num_tokens"),
        // 41 040 + 20 520 tokens per sample.
        row("61 560 tokens per sample", stream(|r| {
            for f in &mut r.fields {
                f.num_tokens = vec![30, 19, 36];
                f.token_size = vec![1, 1, 1];
            }
        }), Exhausted, "fields[0].num_tokens"),
        // One-point tiles: 32 × 19 × 36 = 21 888 per epoch.
        row("21 888 one-point tiles", stream(|r| {
            points(r, [1, 1, 1]);
            r.mode = pb::Mode::Tiles as i32;
        }), Exhausted, "tiles.overlap"),
    ]
}

async fn answer(client: &LoaderClient, call: Call) -> Result<(), ClientError> {
    match call {
        Call::Stream(r) => match client.stream(r).next().await {
            Some(Err(e)) => Err(e),
            Some(Ok(_)) | None => Ok(()),
        },
        Call::Sample(r) => client.sample(r).await.map(|_| ()),
    }
}

/// Every hostile request is answered promptly with its code and field while a well-behaved
/// client's stream flows on another connection (its rate before and during the attack printed,
/// and batches during it asserted); the server neither dies nor grows, reports its limits in
/// `GetDatasetInfo`, and streams a whole epoch afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_requests_are_refused_by_their_cost_and_the_server_carries_on() {
    let dir = TempDir::new().unwrap();
    let store = store_with_stats(dir.path(), "era5.zarr", &tiny_config(40)).await;
    let config = dir.path().join("loader.toml");
    std::fs::write(&config, LIMITS).unwrap();
    let mut server = Server::start(
        &[
            "--config".into(),
            config.display().to_string(),
            "--dataset".into(),
            format!("era5={}", store.display()),
        ],
        &dir.path().join("server.log"),
    );
    let mut client_cfg = client_config(vec![server.endpoint()]);
    // One attempt: a request that crashed the server must fail its row, not be retried.
    client_cfg.reconnect.max_attempts = Some(1);
    let client = connect(client_cfg).await;

    let info = client.dataset_info("era5").await.unwrap();
    let limits = info.geometry.expect("the servable geometry");
    assert_eq!(limits.max_tokens, 50_000);
    assert_eq!(limits.max_samples_per_epoch, 10_000);
    assert_eq!(limits.max_batch_bytes, 512 << 20);
    assert_eq!(limits.max_window_bytes, 64 << 20);
    assert_eq!(limits.max_blur_sigma, 1.0);

    // A well-behaved client on a connection of its own streams throughout the attack.
    let mut flowing = connect(client_config(vec![server.endpoint()]))
        .await
        .stream(request("era5", 4, 8, ""));
    let before = throughput(&mut flowing, Duration::from_secs(1)).await;

    // The attack: rounds of the whole table, for at least a second, so that the stream's rate
    // during it is measured over more than a batch or two.
    let rows = hostile_calls().len();
    let mut samples_during = 0;
    let (failures, times, codes, attack_took) = {
        let attack = async {
            let mut failures = Vec::new();
            let mut times = vec![Vec::new(); rows];
            let mut codes = vec![String::new(); rows];
            let start = Instant::now();
            while times[0].is_empty() || start.elapsed() < Duration::from_secs(1) {
                let round = times[0].len();
                for (i, hostile) in hostile_calls().into_iter().enumerate() {
                    let Hostile {
                        what,
                        call,
                        code,
                        names,
                    } = hostile;
                    let asked = Instant::now();
                    let outcome = answer(&client, call).await;
                    times[i].push(asked.elapsed());
                    match outcome {
                        Ok(()) => failures.push(format!("{what}: accepted")),
                        Err(e) => {
                            let message = e
                                .status()
                                .map_or_else(|| e.to_string(), |s| s.message().to_string());
                            codes[i] = e.code().map_or_else(|| "none".into(), |c| format!("{c:?}"));
                            if round == 0 {
                                println!("{what}: {message}");
                            }
                            if e.code() != Some(code) || !message.contains(names) {
                                failures.push(format!(
                                "{what}: expected {code:?} naming `{names}`, got {:?}: {message}",
                                e.code()
                            ));
                            }
                        }
                    }
                    assert!(server.is_running(), "the server died on `{what}`");
                }
            }
            (failures, times, codes, start.elapsed())
        };
        tokio::pin!(attack);
        loop {
            tokio::select! {
                done = &mut attack => break done,
                batch = flowing.next() => {
                    samples_during +=
                        batch.expect("endless").expect("the stream flows").sample_ids.len();
                }
            }
        }
    };
    let during = samples_during as f64 / attack_took.as_secs_f64();

    let rounds = times[0].len();
    println!("| case | code | first response | median of {rounds} | slowest of {rounds} |");
    println!("|---|---|---|---|---|");
    for (hostile, (mut took, code)) in hostile_calls().iter().zip(times.into_iter().zip(codes)) {
        let first = took[0];
        took.sort();
        println!(
            "| {} | {code} | {} | {} | {} |",
            hostile.what,
            ms(first),
            ms(took[took.len() / 2]),
            ms(took[took.len() - 1])
        );
    }
    println!(
        "well-behaved stream: {before:.0} samples/s before, {during:.0} during the attack \
         ({rounds} rounds of {rows} requests in {})",
        ms(attack_took)
    );
    assert!(
        failures.is_empty(),
        "rows that failed:\n{}",
        failures.join("\n")
    );
    assert!(
        samples_during > 0,
        "the well-behaved stream delivered nothing during the attack"
    );
    drop(flowing);

    // Nothing was allocated for them: the server's peak resident set stays small.
    let peak_kib = server.proc_status_kib("VmHWM");
    println!(
        "server peak RSS after the hostile requests: {} MiB",
        peak_kib / 1024
    );
    assert!(peak_kib < 1 << 20, "peak RSS {peak_kib} KiB");

    // The same server streams a well-behaved client's epoch exactly once.
    let start = Instant::now();
    let mut stream = client.stream(request("era5", 4, 8, "end_epoch = 1"));
    let batches = tokio::time::timeout(Duration::from_secs(120), collect(&mut stream))
        .await
        .expect("the well-behaved stream finishes");
    assert_whole_epoch(&ids(&batches), 0, 32);
    println!(
        "well-behaved epoch (32 samples) after the attack: {:.0} ms",
        start.elapsed().as_secs_f64() * 1e3
    );
    assert!(server.is_running());
}

// Streams and connections: limits on streams per connection and in all, on connections, and
// idle timeouts for connections that never speak and streams whose client stops reading.

/// Connection and stream limits small enough to reach in a test.
const CONNECTION_LIMITS: &str = "
max_streams_per_connection = 2
max_streams = 4
max_connections = 4
keepalive_interval_s = 1
keepalive_timeout_s = 2
connection_idle_timeout_s = 3
stream_idle_timeout_s = 2
memory_budget_mib = 32
";

/// A server on the tiny store (40 steps) with `config` as its configuration file.
async fn serve_with(dir: &TempDir, config: &str) -> Server {
    let store = store_with_stats(dir.path(), "era5.zarr", &tiny_config(40)).await;
    let path = dir.path().join("loader.toml");
    std::fs::write(&path, config).unwrap();
    Server::start(
        &[
            "--config".into(),
            path.display().to_string(),
            "--dataset".into(),
            format!("era5={}", store.display()),
        ],
        &dir.path().join("server.log"),
    )
}

type Raw = pb::loader_client::LoaderClient<tonic::transport::Channel>;

/// A bare tonic client on a connection of its own, with tonic's default (64 KiB) windows: what
/// it does not read stays on the server.
async fn raw_client(server: &Server) -> Raw {
    let channel = tonic::transport::Endpoint::from_shared(server.endpoint())
        .unwrap()
        .connect()
        .await
        .expect("connecting");
    Raw::new(channel).max_decoding_message_size(1 << 30)
}

/// An endless stream's first batch, or the status that refused it.
async fn open(
    client: &mut Raw,
    request: pb::BatchRequest,
) -> Result<tonic::Streaming<pb::Batch>, tonic::Status> {
    let mut stream = client.stream_batches(request).await?.into_inner();
    stream.message().await?.expect("a first batch");
    Ok(stream)
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

/// Over `max_streams` in all → RESOURCE_EXHAUSTED naming it; over `max_streams_per_connection`
/// the client's HTTP/2 holds the call back until one of its streams ends; the first streams keep
/// flowing and complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_beyond_the_limits_are_refused_or_held_back_while_the_first_ones_flow() {
    let dir = TempDir::new().unwrap();
    let mut server = serve_with(&dir, CONNECTION_LIMITS).await;
    let endless = || request("era5", 4, 8, "");
    let mut table = vec![
        "| case | code | response |".to_string(),
        "|---|---|---|".into(),
    ];

    let mut a = raw_client(&server).await;
    let mut a1 = open(&mut a, endless()).await.expect("stream a1");
    let mut a2 = open(&mut a, endless()).await.expect("stream a2");
    // A third call on the same connection: HTTP/2 allows two, so the client holds it back.
    let held = {
        let mut a = a.clone();
        tokio::spawn(async move {
            let start = Instant::now();
            let mut stream = a
                .stream_batches(request("era5", 4, 8, "end_epoch = 1"))
                .await?
                .into_inner();
            let mut samples = 0;
            while let Some(batch) = stream.message().await? {
                samples += batch.sample_ids.len();
            }
            Ok::<_, tonic::Status>((samples, start.elapsed()))
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !held.is_finished(),
        "a third stream on one connection was not held back"
    );
    table.push("| 3rd stream on a connection of max_streams_per_connection = 2 | held back by HTTP/2 | (until one ends) |".into());

    let mut b = raw_client(&server).await;
    let mut b1 = open(&mut b, endless()).await.expect("stream b1");
    let mut b2 = open(&mut b, endless()).await.expect("stream b2");
    // Four streams are open: a fifth, on a third connection, is refused.
    let mut c = raw_client(&server).await;
    let start = Instant::now();
    let refused = open(&mut c, endless())
        .await
        .expect_err("a fifth stream is refused");
    let took = start.elapsed();
    println!("fifth stream: {:?}: {}", refused.code(), refused.message());
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert!(
        refused.message().contains("max_streams = 4"),
        "{}",
        refused.message()
    );
    table.push(format!(
        "| 5th stream over max_streams = 4 | {:?} | {} |",
        refused.code(),
        ms(took)
    ));

    // The first ones keep flowing.
    for (name, s) in [
        ("a1", &mut a1),
        ("a2", &mut a2),
        ("b1", &mut b1),
        ("b2", &mut b2),
    ] {
        for _ in 0..5 {
            s.message()
                .await
                .unwrap_or_else(|e| panic!("{name}: {e}"))
                .expect("endless");
        }
    }
    // b's streams end; their places are free (the server notices at once: its tasks wait on
    // the full queues the client dropped).
    drop((b1, b2));
    tokio::time::sleep(Duration::from_millis(500)).await;
    // a1 ends: HTTP/2 lets the held-back call go, and the server has places for it.
    drop(a1);
    let (samples, took) = tokio::time::timeout(Duration::from_secs(60), held)
        .await
        .expect("the held-back stream finishes")
        .unwrap()
        .expect("the held-back stream succeeds");
    assert_eq!(samples, 32);
    println!(
        "held-back stream: a whole epoch, {} after it was sent",
        ms(took)
    );
    a2.message()
        .await
        .expect("a2 still flows")
        .expect("endless");
    println!("{}", table.join("\n"));
    assert!(server.is_running());
}

/// A client that opens a stream and never reads: after `stream_idle_timeout_s` the stream is
/// dropped and its budget released, so a stream that needs that budget gets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_whose_client_stops_reading_is_dropped_and_its_budget_released() {
    let dir = TempDir::new().unwrap();
    let mut server = serve_with(&dir, CONNECTION_LIMITS).await;
    // One sample of 41 040 tokens with a positional encoding of width 128: ≈ 22 MB a batch, so
    // the 32 MiB budget holds one batch at a time.
    let big = || {
        edited(|r| {
            points(r, [30, 19, 36]);
            r.fields[0].pe_width = 128;
            r.batch_size = 1;
            r.end_epoch = None;
        })
    };
    let mut stuck = raw_client(&server).await;
    let start = Instant::now();
    // Never read: the reply's headers come, its batches stay queued on the server.
    let unread = stuck.stream_batches(big()).await.expect("the stream opens");
    println!("stream opened and left unread ({})", ms(start.elapsed()));

    // Another client's stream needs the budget the unread one holds: it gets its first batch
    // once the unread stream is dropped.
    let mut client_cfg = client_config(vec![server.endpoint()]);
    client_cfg.reconnect.max_attempts = Some(1);
    let client = connect(client_cfg).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let start = Instant::now();
    let mut waiting = client.stream(big());
    let first = tokio::time::timeout(Duration::from_secs(60), waiting.next())
        .await
        .expect("the waiting stream gets its budget")
        .expect("a first batch")
        .expect("the waiting stream succeeds");
    assert_eq!(first.sample_ids.len(), 1);
    println!(
        "a stream needing the unread stream's budget: first batch after {} (stream_idle_timeout_s = 2)",
        ms(start.elapsed())
    );
    let log = std::fs::read_to_string(dir.path().join("server.log")).unwrap();
    assert!(
        log.contains("stream dropped: the client took nothing"),
        "the server did not say it dropped the unread stream:\n{log}"
    );
    drop(unread);
    assert!(server.is_running());
}

/// A client that connects and says nothing is closed after `connection_idle_timeout_s`; past
/// `max_connections` a connection is closed as soon as it is accepted; a gRPC client that idles
/// (answering keep-alive pings) keeps its connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_surplus_connections_are_closed_and_a_live_idle_client_keeps_its_own() {
    let dir = TempDir::new().unwrap();
    let mut server = serve_with(&dir, CONNECTION_LIMITS).await;
    let mut table = vec![
        "| case | outcome | response |".to_string(),
        "|---|---|---|".into(),
    ];

    // A gRPC client that connects, makes one call, then idles past the idle timeout.
    let mut live = raw_client(&server).await;
    live.list_datasets(pb::ListDatasetsRequest {})
        .await
        .expect("a first call");

    // Three silent sockets fill max_connections = 4; a fifth connection is closed at once.
    let mut silent = Vec::new();
    for _ in 0..3 {
        silent.push(tokio::net::TcpStream::connect(server.addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let start = Instant::now();
    let mut surplus = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), until_closed(&mut surplus))
        .await
        .expect("the surplus connection is closed");
    let took = start.elapsed();
    table.push(format!(
        "| 5th connection over max_connections = 4 | closed | {} |",
        ms(took)
    ));

    // The silent sockets are closed after connection_idle_timeout_s = 3.
    let start = Instant::now();
    for mut socket in silent {
        tokio::time::timeout(Duration::from_secs(30), until_closed(&mut socket))
            .await
            .expect("a silent connection is closed");
    }
    table.push(format!(
        "| a connection that never speaks (connection_idle_timeout_s = 3) | closed | {} |",
        ms(start.elapsed() + Duration::from_millis(200))
    ));

    // The live client idled as long, answering pings: its connection is still there.
    let start = Instant::now();
    live.list_datasets(pb::ListDatasetsRequest {})
        .await
        .expect("the idle gRPC client's connection lives");
    table.push(format!(
        "| a gRPC client idle for > 3 s (keep-alive pings every 1 s) | served | {} |",
        ms(start.elapsed())
    ));
    println!("{}", table.join("\n"));
    let log = std::fs::read_to_string(dir.path().join("server.log")).unwrap();
    assert!(log.contains("max_connections reached"), "{log}");
    assert!(server.is_running());
}

/// Reads (the server's HTTP/2 settings, if any) until the server closes the connection.
async fn until_closed(socket: &mut tokio::net::TcpStream) {
    use tokio::io::AsyncReadExt;
    let mut buffer = [0u8; 1024];
    while let Ok(n) = socket.read(&mut buffer).await {
        if n == 0 {
            return;
        }
    }
}

/// Samples per second of `stream` over `span`.
async fn throughput(stream: &mut atmorep_proto::client::LoaderStream, span: Duration) -> f64 {
    let start = Instant::now();
    let mut samples = 0;
    while start.elapsed() < span {
        let batch = stream
            .next()
            .await
            .expect("endless")
            .expect("the stream flows");
        samples += batch.sample_ids.len();
    }
    samples as f64 / start.elapsed().as_secs_f64()
}

/// `GetSample` of the largest sample the limits allow (41 040 tokens, 44 MB with its positional
/// encoding), 64 at once: each is answered, OK or RESOURCE_EXHAUSTED, from the memory budget;
/// the server's peak RSS stays under the budget plus a stated overhead, and a well-behaved
/// client's stream keeps flowing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_large_get_samples_stay_inside_the_budget_while_a_stream_flows() {
    const BUDGET_MIB: u64 = 128;
    // Idle server (≈ 30 MiB), the chunk cache (64 MiB), sample windows and pooled buffers,
    // allocator slack.
    const OVERHEAD_MIB: u64 = 256;
    let dir = TempDir::new().unwrap();
    let config = format!(
        "memory_budget_mib = {BUDGET_MIB}\ncache_mib = 64\nmax_tokens_per_sample = 50000\n\
         max_streams_per_connection = 128\n"
    );
    let mut server = serve_with(&dir, &config).await;
    let mut client_cfg = client_config(vec![server.endpoint()]);
    client_cfg.reconnect.max_attempts = Some(1);
    let client = connect(client_cfg).await;

    let mut flowing = client.stream(request("era5", 4, 8, ""));
    let before = throughput(&mut flowing, Duration::from_secs(2)).await;
    let rss_before = server.proc_status_kib("VmHWM") / 1024;

    let largest = pb::SampleRequest::by_id(
        edited(|r| {
            points(r, [30, 19, 36]);
            r.fields[0].pe_width = 256;
            r.batch_size = 1;
        }),
        0,
        0,
    );
    let calls = (0..64).map(|_| {
        let client = client.clone();
        let request = largest.clone();
        tokio::spawn(async move {
            let start = Instant::now();
            let outcome = client.sample(request).await;
            (outcome.map(|_| ()), start.elapsed())
        })
    });
    // The stream's rate while the attack lasts.
    let attack = futures::future::join_all(calls);
    tokio::pin!(attack);
    let (start, mut samples) = (Instant::now(), 0);
    let answers = loop {
        tokio::select! {
            answers = &mut attack => break answers,
            batch = flowing.next() => {
                samples += batch.expect("endless").expect("the stream flows").sample_ids.len();
            }
        }
    };
    let attack_took = start.elapsed();
    let during = samples as f64 / attack_took.as_secs_f64();
    let after = throughput(&mut flowing, Duration::from_secs(2)).await;

    let (mut ok, mut refused) = (Vec::new(), Vec::new());
    for answer in answers {
        let (outcome, took) = answer.unwrap();
        match outcome {
            Ok(()) => ok.push(took),
            Err(e) if e.code() == Some(Code::ResourceExhausted) => {
                assert!(e.to_string().contains("memory_budget_mib"), "{e}");
                refused.push(took);
            }
            Err(e) => panic!("GetSample: expected OK or RESOURCE_EXHAUSTED, got {e}"),
        }
    }
    let slowest = |v: &[Duration]| v.iter().max().map_or_else(|| "-".into(), |d| ms(*d));
    println!("| case | code | count | slowest response |");
    println!("|---|---|---|---|");
    println!(
        "| GetSample of 44 MB, 64 at once | OK | {} | {} |",
        ok.len(),
        slowest(&ok)
    );
    println!(
        "| GetSample of 44 MB, 64 at once | ResourceExhausted | {} | {} |",
        refused.len(),
        slowest(&refused)
    );
    println!(
        "well-behaved stream: {before:.0} samples/s before, {during:.0} during the attack ({}), \
         {after:.0} after",
        ms(attack_took)
    );
    let peak = server.proc_status_kib("VmHWM") / 1024;
    println!(
        "server peak RSS: {rss_before} MiB before, {peak} MiB after (budget {BUDGET_MIB} MiB + \
         overhead {OVERHEAD_MIB} MiB)"
    );
    assert!(!ok.is_empty(), "no GetSample was served");
    assert!(peak < BUDGET_MIB + OVERHEAD_MIB, "peak RSS {peak} MiB");
    assert!(server.is_running());
}

/// With a token set, reflection (which lists every RPC and message) asks for it like the loader
/// does; health stays open for probes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_asks_for_the_token_and_health_does_not() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;

    const TOKEN: &str = "hostile-test-token";
    let dir = TempDir::new().unwrap();
    let mut server = serve_with(&dir, &format!("token = \"{TOKEN}\"\n")).await;
    let channel = tonic::transport::Endpoint::from_shared(server.endpoint())
        .unwrap()
        .connect()
        .await
        .expect("connecting");
    let list = || {
        tokio_stream::iter([ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        }])
    };
    let mut table = vec![
        "| case | code | response |".to_string(),
        "|---|---|---|".into(),
    ];

    let start = Instant::now();
    let refused = ServerReflectionClient::new(channel.clone())
        .server_reflection_info(list())
        .await
        .expect_err("reflection without the token is refused");
    table.push(format!(
        "| reflection without the token | {:?} | {} |",
        refused.code(),
        ms(start.elapsed())
    ));
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused}");

    let with_token = |mut request: tonic::Request<()>| {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
        Ok(request)
    };
    let start = Instant::now();
    let mut answers = ServerReflectionClient::with_interceptor(channel.clone(), with_token)
        .server_reflection_info(list())
        .await
        .expect("reflection with the token answers")
        .into_inner();
    let answer = answers.message().await.unwrap().expect("an answer");
    table.push(format!(
        "| reflection with the token | Ok | {} |",
        ms(start.elapsed())
    ));
    assert!(answer.message_response.is_some());

    let start = Instant::now();
    let health = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: "atmorep.loader.v1.Loader".into(),
        })
        .await
        .expect("health answers without a token")
        .into_inner();
    table.push(format!(
        "| health without the token | Ok | {} |",
        ms(start.elapsed())
    ));
    assert_eq!(health.status, 1, "SERVING");
    println!("{}", table.join("\n"));
    assert!(server.is_running());
}
