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

/// Every hostile request is answered promptly with its code and field; the server neither dies
/// nor grows, reports its limits in `GetDatasetInfo`, and streams a whole epoch afterwards.
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

    let calls = hostile_calls();
    let mut failures = Vec::new();
    let mut table = vec![
        "| case | code | response |".to_string(),
        "|---|---|---|".into(),
    ];
    for Hostile {
        what,
        call,
        code,
        names,
    } in calls
    {
        let start = Instant::now();
        let outcome = answer(&client, call).await;
        let took = start.elapsed();
        match outcome {
            Ok(()) => failures.push(format!("{what}: accepted")),
            Err(e) => {
                let message = e
                    .status()
                    .map_or_else(|| e.to_string(), |s| s.message().to_string());
                let got = e.code().map_or_else(|| "none".into(), |c| format!("{c:?}"));
                table.push(format!(
                    "| {what} | {got} | {:.1} ms |",
                    took.as_secs_f64() * 1e3
                ));
                println!("{what}: {message}");
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
    println!("{}", table.join("\n"));
    assert!(
        failures.is_empty(),
        "rows that failed:\n{}",
        failures.join("\n")
    );

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
