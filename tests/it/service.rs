//! The gRPC loader service across processes: every test starts a real `atmorep loader serve`
//! on `127.0.0.1:0` (reading the port from its `listening on ADDR` line) over a tiny synthetic
//! store and talks to it with the real client library (`atmorep_proto::client`), raw tonic
//! clients (health, reflection) or `atmorep loader pull` in another process.
//!
//! Covered: a table of malformed requests and the gRPC code and field each one is
//! answered with, after which the same server still streams; a corrupt chunk in one dataset
//! (DATA_LOSS naming the chunk) while a stream on another dataset finishes its epoch; eight
//! concurrent clients under a small cache and memory budget (peak resident memory bounded, every
//! epoch complete); a slow client beside a fast one; resume from a mid-epoch cursor (same ids,
//! same bytes); `kill -9` of the server mid-epoch and a restart on another endpoint (every id
//! exactly once); the bearer token, alone on loopback and with TLS (accepted, wrong or missing
//! token, plaintext client against TLS); health, reflection, `GetSample` by id and by centre,
//! `ListDatasets`, `GetDatasetInfo` and the Prometheus endpoint.
//!
//! Server processes (and `pull` children) live in guards that kill them on drop, so a failing
//! test leaves nothing running; a failing test also prints the tail of the server's log.

use std::collections::HashSet;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use atmorep_loader::pipeline::normalization::GlobalStats;
use atmorep_loader::progress::NoProgress;
use atmorep_loader::tools::synth::{SynthConfig, write_store};
use atmorep_proto::batch::{Batch, StreamCursor};
use atmorep_proto::client::{ClientConfig, ClientError};
use atmorep_proto::pb;
use atmorep_testkit::prometheus::{free_port, metric, scrape};
use atmorep_testkit::streams::{
    STREAM_TIMEOUT, assert_whole_epoch, client_config, collect, connect, ids,
};
use atmorep_testkit::tiny::{request, request_toml, store_with_stats, tiny_config};
use atmorep_testkit::{ChildGuard, Server, atmorep_bin, workspace_root};
use serde_json::Value;
use tempfile::TempDir;
use tonic::Code;

// ---------------------------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------------------------

/// A child process killed (SIGKILL) and reaped when dropped, so a failed assertion never leaves
/// a server or a `pull` behind.
/// `atmorep loader pull ENDPOINTS --request FILE --json ARGS` as a child (stdout/stderr piped).
fn spawn_pull(endpoints: &[String], request: &Path, args: &[&str]) -> ChildGuard {
    let child = Command::new(atmorep_bin())
        .args(["loader", "pull", &endpoints.join(",")])
        .arg("--request")
        .arg(request)
        .arg("--json")
        .args(args)
        .env("RUST_LOG", "warn")
        .env_remove("ATMOREP_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting atmorep loader pull");
    ChildGuard(Some(child))
}

/// Runs `pull --check-epoch` to completion and returns its JSON report, after checking the
/// process succeeded and verified the epoch.
async fn pull_epoch(endpoints: &[String], request: &Path, args: &[&str]) -> Value {
    let mut all = vec!["--check-epoch"];
    all.extend_from_slice(args);
    let child = spawn_pull(endpoints, request, &all);
    let output = tokio::task::spawn_blocking(move || child.wait_output())
        .await
        .expect("the pull waiter");
    pull_report(&output)
}

fn pull_report(output: &Output) -> Value {
    assert!(
        output.status.success(),
        "pull failed ({}):\nstdout: {}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let report: Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "pull printed no JSON ({e}): {}",
            String::from_utf8_lossy(&output.stdout)
        )
    });
    assert_eq!(report["epoch_checked"], Value::Bool(true), "{report}");
    report
}

// ---------------------------------------------------------------------------------------------
// Stores and requests
// ---------------------------------------------------------------------------------------------

fn path_str(path: &Path) -> &str {
    path.to_str().expect("test paths are UTF-8")
}

/// `--dataset NAME=PATH`.
fn dataset_arg(name: &str, path: &Path) -> Vec<String> {
    vec!["--dataset".into(), format!("{name}={}", path_str(path))]
}

/// Writes [`request_toml`] to `dir/file` for `atmorep loader pull`.
fn request_file(dir: &Path, file: &str, toml: &str) -> PathBuf {
    let path = dir.join(file);
    std::fs::write(&path, toml).expect("writing the request file");
    path
}

/// The raw bytes of sample `i` of a batch, field by field (sources, targets, token info, PE):
/// what "the same sample" means when comparing two streams.
pub(crate) fn sample_bytes(batch: &Batch, i: usize) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for field in &batch.fields {
        let bits = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        out.push(bits(field.source_of(i)));
        out.push(bits(field.target_of(i)));
        out.push(bits(field.token_info_of(i)));
        out.push(bits(field.pe_of(i)));
        out.push(
            field.masked_indices[i]
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect(),
        );
    }
    out
}

/// (epoch, id) → the sample's bytes, for a whole stream.
fn samples_by_id(batches: &[Batch]) -> std::collections::HashMap<(u64, u64), Vec<Vec<u8>>> {
    let mut map = std::collections::HashMap::new();
    for batch in batches {
        for i in 0..batch.len() {
            map.insert(
                (batch.sample_epochs[i], batch.sample_ids[i]),
                sample_bytes(batch, i),
            );
        }
    }
    map
}

// ---------------------------------------------------------------------------------------------
// 1. Malformed requests
// ---------------------------------------------------------------------------------------------

/// One malformed call and how the server must answer it.
struct BadCall {
    what: &'static str,
    call: Call,
    code: Code,
    /// How the message must name the offending field.
    names: &'static str,
}

enum Call {
    /// `StreamBatches` through the client library.
    Stream(pb::BatchRequest),
    /// `StreamBatches` through the generated tonic client, for requests the library settles
    /// without asking (it ends a stream whose resume epoch is past `end_epoch` by itself).
    RawStream(pb::BatchRequest),
    Sample(pb::SampleRequest),
    Info(&'static str),
}

/// The base request (16 samples per epoch) with `edit` applied.
fn edited(edit: impl FnOnce(&mut pb::BatchRequest)) -> pb::BatchRequest {
    let mut r = request("era5", 4, 8, "end_epoch = 1");
    edit(&mut r);
    r
}

fn bad(edit: impl FnOnce(&mut pb::BatchRequest)) -> Call {
    Call::Stream(edited(edit))
}

fn bad_sample(edit: impl FnOnce(&mut pb::SampleRequest)) -> Call {
    let mut r = pb::SampleRequest::by_id(request("era5", 1, 8, ""), 0, 0);
    edit(&mut r);
    Call::Sample(r)
}

fn bert(r: &mut pb::BatchRequest) -> &mut pb::BertMask {
    match r.fields[0].mask.as_mut().and_then(|m| m.kind.as_mut()) {
        Some(pb::mask::Kind::Bert(b)) => b,
        other => panic!("field 0 of the base request is BERT-masked, not {other:?}"),
    }
}

fn split(r: &mut pb::BatchRequest) -> &mut pb::SplitSpec {
    r.split.get_or_insert_with(Default::default)
}

fn tiles(r: &mut pb::BatchRequest, overlap: Vec<u32>) {
    r.mode = pb::Mode::Tiles as i32;
    r.tiles = Some(pb::TileOptions {
        overlap,
        ..Default::default()
    });
}

fn by_centre(time: Option<pb::sample_by_centre::Time>, lat: f64) -> Call {
    bad_sample(|s| {
        s.selector = Some(pb::sample_request::Selector::ByCentre(pb::SampleByCentre {
            time,
            lat,
            lon: 0.0,
        }));
    })
}

/// The table: one malformed call per row, against the tiny store served as `era5` (16 samples
/// per epoch, `z` on 850 and 500 hPa as field 0, `t` on 500 hPa as field 1, 19 × 36 grid).
/// Where the pipeline (not the request parser) finds the problem, the message names the
/// variable (`` `z` ``) or the request part (`split`, `cursor`, `tiles`) rather than a path.
#[rustfmt::skip]
fn bad_calls() -> Vec<BadCall> {
    use Code::{InvalidArgument as Invalid, NotFound};
    use pb::sample_by_centre::Time;
    let row = |what, call, code, names| BadCall { what, call, code, names };
    vec![
        row("unknown dataset", bad(|r| r.dataset = "era6".into()), NotFound, "dataset"),
        row("no fields", bad(|r| r.fields.clear()), Invalid, "fields"),
        row("empty field name", bad(|r| r.fields[0].name.clear()), Invalid, "fields[0].name"),
        row("field twice", bad(|r| r.fields[1].name = "z".into()), Invalid, "fields[1].name"),
        row("unknown variable", bad(|r| r.fields[0].name = "q".into()), NotFound, "fields[0].name"),
        row("unknown level", bad(|r| r.fields[1].levels = vec![123.0]), NotFound, "fields[1].levels[0]"),
        row("NaN level", bad(|r| r.fields[0].levels[1] = f64::NAN), Invalid, "fields[0].levels[1]"),
        row("no levels", bad(|r| r.fields[0].levels.clear()), Invalid, "fields[0].levels"),
        row("two num_tokens", bad(|r| r.fields[0].num_tokens = vec![2, 3]), Invalid, "fields[0].num_tokens"),
        row("zero token_size", bad(|r| r.fields[0].token_size[1] = 0), Invalid, "fields[0].token_size"),
        row("huge geometry", bad(|r| {
            r.fields[1].num_tokens = vec![u32::MAX; 3];
            r.fields[1].token_size = vec![u32::MAX; 3];
        }), Invalid, "`t`"),
        row("negative blur", bad(|r| r.fields[0].blur_sigma = -1.0), Invalid, "fields[0].blur_sigma"),
        row("NaN blur", bad(|r| r.fields[1].blur_sigma = f64::NAN), Invalid, "fields[1].blur_sigma"),
        row("unknown normalization", bad(|r| r.fields[0].normalization = 42), Invalid, "fields[0].normalization"),
        row("PE unspecified", bad(|r| r.fields[0].pe = 0), Invalid, "fields[0].pe"),
        row("unknown PE", bad(|r| r.fields[1].pe = 99), Invalid, "fields[1].pe"),
        row("odd PE width", bad(|r| r.fields[0].pe_width = 7), Invalid, "fields[0].pe_width"),
        row("zero PE width", bad(|r| r.fields[1].pe_width = 0), Invalid, "fields[1].pe_width"),
        row("huge PE width", bad(|r| r.fields[0].pe_width = 1 << 20), Invalid, "fields[0].pe_width"),
        row("BERT r_max ≥ 1", bad(|r| bert(r).r_max = 1.5), Invalid, "fields[0].mask.bert.r_max"),
        row("BERT r_max < 0", bad(|r| bert(r).r_max = -0.1), Invalid, "fields[0].mask.bert.r_max"),
        row("BERT noise > 1", bad(|r| bert(r).noise_fraction = Some(2.0)), Invalid, "fields[0].mask.bert.noise_fraction"),
        row("BERT mask value ∞", bad(|r| bert(r).mask_value = f32::INFINITY), Invalid, "fields[0].mask.bert.mask_value"),
        row("forecast longer than the window", bad(|r| {
            let forecast = pb::mask::Kind::Forecast(pb::ForecastMask { steps: 5 });
            r.fields[1].mask = Some(pb::Mask { kind: Some(forecast) });
        }), Invalid, "`t`"),
        row("batch size 0", bad(|r| r.batch_size = 0), Invalid, "batch_size"),
        row("batch size over the limit", bad(|r| r.batch_size = 100_000), Invalid, "batch_size"),
        row("unknown dtype", bad(|r| r.dtype = 9), Invalid, "dtype"),
        row("rank = world size", bad(|r| (r.rank, r.world_size) = (2, 2)), Invalid, "rank"),
        row("rank without world size", bad(|r| r.rank = 1), Invalid, "rank"),
        row("unknown units", bad(|r| r.units = 9), Invalid, "units"),
        row("unknown split", bad(|r| split(r).split = 9), Invalid, "split.split"),
        row("one split fraction", bad(|r| split(r).fractions = vec![0.5]), Invalid, "split.fractions"),
        row("split fractions over 1", bad(|r| split(r).fractions = vec![0.9, 0.5]), Invalid, "split_fractions"),
        row("train_end alone", bad(|r| split(r).train_end = Some("2020-09-02".into())), Invalid, "split"),
        row("split date not a date", bad(|r| {
            split(r).train_end = Some("yesterday".into());
            split(r).validation_end = Some("2020-09-03".into());
        }), Invalid, "train_end"),
        row("unknown mode", bad(|r| r.mode = 9), Invalid, "mode"),
        row("tile overlap of two axes", bad(|r| tiles(r, vec![1, 2])), Invalid, "tiles.overlap"),
        row("tile overlap as large as the window", bad(|r| tiles(r, vec![0, 9, 18])), Invalid, "tiles"),
        row("tiles with two windows", bad(|r| {
            tiles(r, vec![0, 0, 0]);
            r.fields[1].num_tokens = vec![2, 3, 3];
        }), Invalid, "`t`"),
        row("unknown latitude weighting", bad(|r| r.latitude_weighting = 9), Invalid, "latitude_weighting"),
        // 7 × 3 = 21 latitudes on a grid of 19.
        row("window taller than the grid", bad(|r| r.fields[0].num_tokens = vec![2, 7, 6]), Invalid, "`z`"),
        // 13 × 3 = 39 longitudes on a grid of 36.
        row("window wider than the grid", bad(|r| r.fields[1].num_tokens = vec![2, 3, 13]), Invalid, "`t`"),
        // A 14-step window in the 13-step training split.
        row("time range with no room", bad(|r| {
            r.fields.iter_mut().for_each(|f| f.num_tokens[0] = 14);
        }), Invalid, "split"),
        row("block shorter than the window", bad(|r| {
            r.read_plan = Some(pb::ReadPlan { block_steps: 1, samples_per_block: 8, buffer_blocks: 1 });
        }), Invalid, "block_steps"),
        row("end_epoch before resume", Call::RawStream(edited(|r| {
            r.resume = Some(pb::Cursor { epoch: 3, position: 0 });
            r.end_epoch = Some(2);
        })), Invalid, "end_epoch"),
        // The shard (the epoch) has 16 samples: 16 is its end, 17 is beyond.
        row("resume cursor beyond the shard", bad(|r| {
            r.resume = Some(pb::Cursor { epoch: 0, position: 17 });
        }), Invalid, "cursor"),
        row("more ranks than samples", bad(|r| r.world_size = 1000), Invalid, "1000 ranks"),
        // GetSample and GetDatasetInfo.
        row("sample without request", bad_sample(|s| s.request = None), Invalid, "request"),
        row("sample without selector", bad_sample(|s| s.selector = None), Invalid, "selector"),
        row("sample id beyond the epoch", bad_sample(|s| {
            s.selector = Some(pb::sample_request::Selector::ById(pb::SampleById { epoch: 0, id: 16 }));
        }), Invalid, "by_id.id"),
        row("sample of a bad request", bad_sample(|s| {
            s.request.as_mut().expect("request").fields[0].pe_width = 3;
        }), Invalid, "fields[0].pe_width"),
        row("centre without time", by_centre(None, 0.0), Invalid, "by_centre.time"),
        row("centre time index beyond the axis", by_centre(Some(Time::TimeIndex(16)), 0.0), Invalid, "by_centre.time_index"),
        row("centre time not a date", by_centre(Some(Time::IsoTime("noon".into())), 0.0), Invalid, "by_centre.iso_time"),
        row("centre time not in the store", by_centre(Some(Time::IsoTime("1999-01-01".into())), 0.0), NotFound, "by_centre.iso_time"),
        row("centre latitude beyond the pole", by_centre(Some(Time::TimeIndex(4)), 95.0), Invalid, "centre"),
        // A 2-step window around step 0 starts at step -1.
        row("centre window leaving the time axis", by_centre(Some(Time::TimeIndex(0)), 0.0), Invalid, "time index 0"),
        row("info of an unknown dataset", Call::Info("era6"), NotFound, "dataset"),
    ]
}

/// Bad input: every malformed request is answered with its code and a message naming
/// the offending field; none of them hurts the server, which then streams a valid epoch to the
/// client library and to `atmorep loader pull` in another process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_their_code_and_field_and_the_server_carries_on() {
    let dir = TempDir::new().unwrap();
    let store = store_with_stats(dir.path(), "era5.zarr", &tiny_config(16)).await;
    let mut server = Server::start(&dataset_arg("era5", &store), &dir.path().join("server.log"));
    let mut config = client_config(vec![server.endpoint()]);
    // One attempt: a request that crashed the server must fail its row, not be retried.
    config.reconnect.max_attempts = Some(1);
    let client = connect(config).await;
    let mut raw = pb::loader_client::LoaderClient::connect(server.endpoint())
        .await
        .expect("a plain tonic channel");

    let calls = bad_calls();
    assert!(calls.len() >= 20, "the table has {} rows", calls.len());
    let mut failures = Vec::new();
    for BadCall {
        what,
        call,
        code,
        names,
    } in calls
    {
        let outcome: Result<(), ClientError> = match call {
            Call::Stream(r) => match client.stream(r).next().await {
                Some(Err(e)) => Err(e),
                Some(Ok(_)) | None => Ok(()),
            },
            Call::RawStream(r) => match raw.stream_batches(r).await {
                Ok(mut answer) => match answer.get_mut().message().await {
                    Err(status) => Err(status.into()),
                    Ok(_) => Ok(()),
                },
                Err(status) => Err(status.into()),
            },
            Call::Sample(r) => client.sample(r).await.map(|_| ()),
            Call::Info(name) => client.dataset_info(name).await.map(|_| ()),
        };
        match outcome {
            Ok(()) => failures.push(format!("{what}: accepted")),
            Err(e) => {
                let message = e
                    .status()
                    .map_or_else(|| e.to_string(), |s| s.message().to_string());
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
    assert!(
        failures.is_empty(),
        "rows that failed:\n{}",
        failures.join("\n")
    );

    // The same server, still up, serves a whole epoch to the library…
    let mut stream = client.stream(request("era5", 4, 8, "end_epoch = 1"));
    assert_whole_epoch(&ids(&collect(&mut stream).await), 0, 16);
    // …and to a client in another process.
    let file = request_file(dir.path(), "req.toml", &request_toml("era5", 4, 8, ""));
    let report = pull_epoch(&[server.endpoint()], &file, &[]).await;
    assert_eq!(report["samples"], 16, "{report}");
    assert!(server.is_running());
}

/// Global normalization on a dataset served without statistics, and local normalization on one
/// without local statistics: the requests are well formed, the server lacks what they need
/// (`atmorep loader stats [--local]` was not run), so FAILED_PRECONDITION, the code
/// `service/status.rs` reserves for missing statistics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_statistics_are_a_failed_precondition() {
    let dir = TempDir::new().unwrap();
    let store = dir.path().join("bare.zarr");
    write_store(&tiny_config(16), &store, &NoProgress).expect("writing the store");
    let server = Server::start(&dataset_arg("bare", &store), &dir.path().join("server.log"));
    let mut config = client_config(vec![server.endpoint()]);
    config.reconnect.max_attempts = Some(1);
    let client = connect(config).await;
    for normalization in [pb::Normalization::Global, pb::Normalization::Local] {
        let mut r = request("bare", 4, 8, "end_epoch = 1");
        r.fields[0].normalization = normalization as i32;
        let err = match client.stream(r).next().await {
            Some(Err(e)) => e,
            other => panic!("{normalization:?} without statistics gave {other:?}"),
        };
        assert_eq!(
            err.code(),
            Some(Code::FailedPrecondition),
            "{normalization:?}: {err}"
        );
        assert!(err.to_string().contains("statistics"), "{err}");
    }
    let err = client.statistics("bare", &[]).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::FailedPrecondition), "{err}");
    assert!(err.to_string().contains("`bare`"), "{err}");
}

/// `GetStatistics` hands out the server's global statistics exactly as the store's Parquet file
/// has them (the moments a client denormalizes with); unknown datasets and variables are
/// NOT_FOUND by name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statistics_arrive_exactly_as_the_store_has_them() {
    let dir = TempDir::new().unwrap();
    let store = store_with_stats(dir.path(), "era5.zarr", &tiny_config(16)).await;
    let server = Server::start(&dataset_arg("era5", &store), &dir.path().join("server.log"));
    let mut config = client_config(vec![server.endpoint()]);
    config.reconnect.max_attempts = Some(1);
    let client = connect(config).await;
    let local = GlobalStats::load(
        &GlobalStats::default_dir(&store)
            .join(atmorep_loader::pipeline::normalization::GLOBAL_FILE),
    )
    .unwrap();
    let all = client.statistics("era5", &[]).await.unwrap();
    assert_eq!(all.iter().count(), local.iter().count());
    for ((v, l, y, m, got), (lv, ll, ly, lm, want)) in all.iter().zip(local.iter()) {
        assert_eq!((v, l, y, m), (lv, ll, ly, lm));
        assert_eq!(
            (got.count, got.mean, got.std, got.min, got.max),
            (want.count, want.mean, want.std(), want.min, want.max)
        );
    }
    let z = client.statistics("era5", &["z".to_string()]).await.unwrap();
    assert!(z.has_variable("z") && !z.has_variable("t"));
    assert!(z.iter().count() > 0);
    let err = client
        .statistics("era5", &["q".to_string()])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::NotFound), "{err}");
    assert!(err.to_string().contains("`q`"), "{err}");
    let err = client.statistics("nope", &[]).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::NotFound), "{err}");
}

/// ERA5's names, either way round: one server serves the same synthetic store written with the
/// short names (`z`, `t`) and with ARCO-ERA5's long names (`geopotential`, `temperature`). A
/// request naming either serves from either, the batches carry the names the request used,
/// and the values are the same bytes; statistics come back under the name asked for; the same
/// variable under two names is one variable requested twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn era5_short_and_long_names_serve_either_store() {
    let dir = TempDir::new().unwrap();
    let short = store_with_stats(dir.path(), "short.zarr", &tiny_config(16)).await;
    let long_config = SynthConfig {
        long_names: true,
        ..tiny_config(16)
    };
    let long = store_with_stats(dir.path(), "long.zarr", &long_config).await;
    let mut args = dataset_arg("short", &short);
    args.extend(dataset_arg("long", &long));
    let server = Server::start(&args, &dir.path().join("server.log"));
    let mut config = client_config(vec![server.endpoint()]);
    config.reconnect.max_attempts = Some(1);
    let client = connect(config).await;
    let info = client.dataset_info("long").await.unwrap();
    let names: Vec<&str> = info.variables.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(names, ["geopotential", "temperature"]);

    let renamed = |dataset: &str, names: [&str; 2]| {
        let mut r = request(dataset, 4, 8, "end_epoch = 1");
        r.fields[0].name = names[0].into();
        r.fields[1].name = names[1].into();
        r
    };
    let first = |r: pb::BatchRequest| {
        let client = &client;
        async move {
            let mut stream = client.stream(r);
            collect(&mut stream).await
        }
    };
    let reference = first(renamed("short", ["z", "t"])).await;
    for (dataset, asked) in [
        ("long", ["z", "t"]),
        ("long", ["geopotential", "temperature"]),
        ("short", ["geopotential", "temperature"]),
        ("long", ["z", "temperature"]),
    ] {
        let batches = first(renamed(dataset, asked)).await;
        assert_eq!(batches.len(), reference.len(), "{dataset} {asked:?}");
        for (got, want) in batches.iter().zip(&reference) {
            let got_names: Vec<&str> = got.fields.iter().map(|f| f.name.as_str()).collect();
            assert_eq!(got_names, asked, "batches carry the request's names");
            for i in 0..got.len() {
                assert_eq!(
                    sample_bytes(got, i),
                    sample_bytes(want, i),
                    "{dataset} {asked:?}"
                );
            }
        }
    }

    let t = client.statistics("long", &["t".to_string()]).await.unwrap();
    assert!(t.has_variable("t") && !t.has_variable("temperature"));
    let z = client
        .statistics("short", &["geopotential".to_string()])
        .await
        .unwrap();
    assert!(z.has_variable("geopotential"));
    assert_eq!(
        z.iter().count(),
        client
            .statistics("short", &["z".to_string()])
            .await
            .unwrap()
            .iter()
            .count()
    );

    let twice = renamed("long", ["t", "temperature"]);
    let err = match client.stream(twice).next().await {
        Some(Err(e)) => e,
        other => panic!(
            "one variable under two names gave {:?}",
            other.map(|b| b.map(|b| b.len()))
        ),
    };
    assert_eq!(err.code(), Some(Code::InvalidArgument), "{err}");
    assert!(err.to_string().contains("fields[1].name"), "{err}");
    assert!(err.to_string().contains("requested twice"), "{err}");
    let absent = renamed("long", ["vo", "t"]);
    let err = match client.stream(absent).next().await {
        Some(Err(e)) => e,
        other => panic!(
            "an absent variable gave {:?}",
            other.map(|b| b.map(|b| b.len()))
        ),
    };
    assert_eq!(err.code(), Some(Code::NotFound), "{err}");
    assert!(
        err.to_string().contains("fields[0].name")
            && err
                .to_string()
                .contains("`vo` nor its ERA5 aliases `vorticity`"),
        "{err}"
    );
}

/// `atmorep loader stats` on a subset (every 3rd step of `temperature` at 500 hPa, by its long
/// name on a short-name store): the command, `inspect` and `GetDatasetInfo` all say what the
/// statistics cover.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statistics_of_a_subset_say_what_they_cover() {
    use atmorep_testkit::cli::{atmorep, stdout_of_success};
    let dir = TempDir::new().unwrap();
    let store = dir.path().join("era5.zarr");
    write_store(&tiny_config(16), &store, &NoProgress).expect("writing the store");
    let stats = atmorep(&[
        "loader",
        "stats",
        path_str(&store),
        "--every-steps",
        "3",
        "--variables",
        "temperature",
        "--levels",
        "500",
    ]);
    let text = stdout_of_success(&stats);
    assert!(
        text.contains("statistics cover 6 of 16 time steps (every 3, ")
            && text.contains(") of t at levels [500.0]"),
        "{text}"
    );
    let inspect = atmorep(&["loader", "inspect", path_str(&store), "--json"]);
    let report: Value = serde_json::from_str(&stdout_of_success(&inspect)).unwrap();
    let coverage = &report["statistics"]["coverage"];
    assert_eq!(coverage["steps_read"], 6, "{report}");
    assert_eq!(coverage["every_steps"], 3, "{report}");
    let inspect = atmorep(&["loader", "inspect", path_str(&store)]);
    assert!(
        stdout_of_success(&inspect).contains("6 of 16 time steps"),
        "{}",
        stdout_of_success(&inspect)
    );

    let server = Server::start(&dataset_arg("era5", &store), &dir.path().join("server.log"));
    let mut config = client_config(vec![server.endpoint()]);
    config.reconnect.max_attempts = Some(1);
    let client = connect(config).await;
    let info = client.dataset_info("era5").await.unwrap();
    let summary = info.statistics.expect("a statistics summary");
    assert_eq!(summary.global, ["t"]);
    let coverage = summary.global_coverage.expect("the coverage is reported");
    assert_eq!(
        (
            coverage.steps_read,
            coverage.store_steps,
            coverage.every_steps
        ),
        (6, 16, 3)
    );
    assert_eq!(coverage.variables, ["t"]);
    assert_eq!(coverage.levels, [500.0]);
    assert_eq!(coverage.first_step, info.time.unwrap().start);
}

/// A level named twice in one field (`levels = [850, 850]`) is malformed: the sample would carry
/// the same level twice under two token ranges. It must be INVALID_ARGUMENT naming
/// `fields[0].levels[1]`, like every other malformed request field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_level_listed_twice_is_rejected() {
    let dir = TempDir::new().unwrap();
    let store = store_with_stats(dir.path(), "era5.zarr", &tiny_config(16)).await;
    let server = Server::start(&dataset_arg("era5", &store), &dir.path().join("server.log"));
    let mut config = client_config(vec![server.endpoint()]);
    config.reconnect.max_attempts = Some(1);
    let client = connect(config).await;
    let twice = edited(|r| r.fields[0].levels = vec![850.0, 850.0]);
    let err = match client.stream(twice).next().await {
        Some(Err(e)) => e,
        other => panic!(
            "a level listed twice gave {:?}",
            other.map(|b| b.map(|b| b.len()))
        ),
    };
    assert_eq!(err.code(), Some(Code::InvalidArgument), "{err}");
    assert!(err.to_string().contains("fields[0].levels[1]"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// 2. A corrupt chunk in one dataset, another dataset unharmed
// ---------------------------------------------------------------------------------------------

/// Dataset A has its first `z` chunk (8 steps × 850 hPa × globe: every sample of time block 0
/// needs it) overwritten with garbage. A stream on A fails with DATA_LOSS naming the chunk key;
/// `pull` on dataset B of the same server, running meanwhile, completes its epoch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_chunk_fails_only_its_stream() {
    let dir = TempDir::new().unwrap();
    // Chunks of 8 steps: chunk `z/0.0.0.0` is all of block 0 at 850 hPa.
    let chunked = SynthConfig {
        chunks: Some([8, 1, 19, 36]),
        ..tiny_config(16)
    };
    let a = store_with_stats(dir.path(), "a.zarr", &chunked).await;
    let b = store_with_stats(dir.path(), "b.zarr", &tiny_config(16)).await;
    let key = "z/0.0.0.0";
    let chunk = a.join(key);
    assert!(chunk.is_file(), "{} is not a chunk file", chunk.display());
    std::fs::write(&chunk, b"this is not a blosc frame, nor anything else").unwrap();

    let mut args = dataset_arg("a", &a);
    args.extend(dataset_arg("b", &b));
    let mut server = Server::start(&args, &dir.path().join("server.log"));

    // B: 64 samples in 32 batches, 40 ms of "work" each: over a second, long enough to be
    // running while A fails.
    let file = request_file(dir.path(), "b.toml", &request_toml("b", 2, 32, ""));
    let pull_b = spawn_pull(
        &[server.endpoint()],
        &file,
        &["--check-epoch", "--delay-ms", "40"],
    );

    let client = connect(client_config(vec![server.endpoint()])).await;
    let mut stream_a = client.stream(request("a", 4, 16, "end_epoch = 1"));
    let failure = tokio::time::timeout(STREAM_TIMEOUT, async {
        while let Some(batch) = stream_a.next().await {
            if let Err(e) = batch {
                return e;
            }
        }
        panic!("the stream on the corrupt dataset ended without an error");
    })
    .await
    .expect("the stream on A neither failed nor ended");
    assert_eq!(failure.code(), Some(Code::DataLoss), "{failure}");
    let message = failure.status().expect("a status").message();
    assert!(
        message.contains(key),
        "the message does not name `{key}`: {message}"
    );

    let mut pull_b = pull_b;
    assert!(
        pull_b.is_running(),
        "the stream on B finished before A failed: the two did not overlap"
    );
    let output = tokio::task::spawn_blocking(move || pull_b.wait_output())
        .await
        .unwrap();
    let report = pull_report(&output);
    assert_eq!(report["samples"], 64, "{report}");
    assert_eq!(report["reconnects"], 0, "{report}");

    // Only that stream failed: the server is up and A's metadata still answers.
    assert!(server.is_running());
    let names: Vec<String> = client
        .list_datasets()
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.name)
        .collect();
    assert_eq!(names, ["a", "b"]);
}

// ---------------------------------------------------------------------------------------------
// 3. Eight concurrent clients under a memory budget
// ---------------------------------------------------------------------------------------------

/// Chunk cache and memory budget of the server in the eight-client tests.
const CACHE_MIB: u64 = 8;
const BUDGET_MIB: u64 = 8;

/// What the server process may hold beyond its idle resident set, its cache and its memory
/// budget: tokio, blocking-I/O and rayon threads with their stacks and allocator heaps (the
/// loader keeps freed memory for a second, for reuse) and eight HTTP/2 connections. Measured on
/// the 2-core machines with tiny samples (12 KB, where neither cache nor budget fill up): idle
/// 26–31 MiB, one client 62 MiB, eight clients 70–78 MiB.
const BASELINE_MIB: u64 = 48;

/// Server memory around eight concurrent epochs, in MiB.
#[derive(Debug)]
struct EightClients {
    idle_mib: u64,
    peak_mib: u64,
    seconds: f64,
}

/// Eight clients (eight connections) stream a whole epoch each at once from a server with an
/// 8 MiB chunk cache and an 8 MiB memory budget, consuming with 50 ms of work per batch so that
/// batches queue up in the server. Each sample is about 0.5 MB (a 4-step × 180° × 360° window
/// on a 2.5° grid of 24 steps, whose decoded chunks, 8 MiB, do not all fit the cache); an epoch
/// is 12 samples in 6 batches. Checks that every client got every sample of its epoch exactly
/// once and returns the server's idle and peak (`VmHWM`) resident memory.
async fn eight_clients_stream_an_epoch_each(dir: &Path) -> EightClients {
    let synth = SynthConfig {
        grid_deg: 2.5,
        steps: 24,
        ..tiny_config(16)
    };
    let store = store_with_stats(dir, "era5.zarr", &synth).await;
    let head = format!("cache_mib = {CACHE_MIB}\nmemory_budget_mib = {BUDGET_MIB}\n");
    let server = Server::start(&config_args(dir, &head, &store), &dir.join("server.log"));
    let idle_kib = server.proc_status_kib("VmRSS");

    // 2×8×16 tokens of 2×9×9 points: a 4-step window of 72 × 144 points. The 19 training steps
    // hold one 16-step block, 12 samples of it per epoch.
    let samples = 12;
    let streams = (0..8u64).map(|k| {
        let endpoint = server.endpoint();
        tokio::spawn(async move {
            // A client per task: eight connections, as eight trainers would open.
            let mut config = client_config(vec![endpoint]);
            config.prefetch = 1;
            let client = connect(config).await;
            let mut r = request("era5", 2, samples, "end_epoch = 1");
            for field in &mut r.fields {
                field.num_tokens = vec![2, 8, 16];
                field.token_size = vec![2, 9, 9];
            }
            // Different seeds, so the streams do not cut the same windows.
            r.seed = k;
            let mut stream = client.stream(r);
            let consumed = async {
                let mut ids = Vec::new();
                while let Some(batch) = stream.next().await {
                    let batch = batch.unwrap_or_else(|e| panic!("client {k}: {e}"));
                    ids.extend(batch.sample_epochs.iter().copied().zip(batch.sample_ids));
                    // A trainer's step.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                ids
            };
            tokio::time::timeout(STREAM_TIMEOUT, consumed)
                .await
                .expect("the stream did not finish in time")
        })
    });
    let started = Instant::now();
    for (k, ids) in futures::future::join_all(streams)
        .await
        .into_iter()
        .enumerate()
    {
        let ids = ids.unwrap_or_else(|e| panic!("client {k}: {e}"));
        assert_whole_epoch(&ids, 0, samples);
    }
    let report = EightClients {
        idle_mib: idle_kib / 1024,
        peak_mib: server.proc_status_kib("VmHWM") / 1024,
        seconds: started.elapsed().as_secs_f64(),
    };
    println!(
        "8 × {samples} samples of 0.5 MB in {:.2} s; server resident memory: idle {} MiB, \
         peak {} MiB (cache {CACHE_MIB} MiB, budget {BUDGET_MIB} MiB)",
        report.seconds, report.idle_mib, report.peak_mib
    );
    report
}

/// Eight concurrent clients, each with its own connection, all get their whole epoch, exactly
/// once, from one server with a small cache and memory budget (see
/// [`eight_clients_stream_an_epoch_each`]; the memory bound is checked separately below).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_concurrent_clients_each_get_their_whole_epoch() {
    let dir = TempDir::new().unwrap();
    eight_clients_stream_an_epoch_each(dir.path()).await;
}

/// The same eight clients: the server's peak resident memory stays under its idle resident set
/// + cache + budget + [`BASELINE_MIB`]. Measured: peak 67–77 MiB against a limit of 87. (With
/// mimalloc's transparent huge pages, which the binary turns off unless `--huge-pages`, 117–144
/// MiB: each fresh 2 MiB region became resident whole.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_concurrent_clients_stay_within_the_memory_budget() {
    let dir = TempDir::new().unwrap();
    let run = eight_clients_stream_an_epoch_each(dir.path()).await;
    let limit_mib = run.idle_mib + CACHE_MIB + BUDGET_MIB + BASELINE_MIB;
    assert!(
        run.peak_mib <= limit_mib,
        "peak resident memory {} MiB exceeds idle {} + cache {CACHE_MIB} + budget {BUDGET_MIB} \
         + baseline {BASELINE_MIB} = {limit_mib} MiB",
        run.peak_mib,
        run.idle_mib
    );
}

/// Transparent huge pages (`THP_enabled` in /proc/PID/status) are off for the loader unless
/// `--huge-pages` asks for them: mimalloc's arenas then take huge pages, which costs the eight
/// clients above their memory bound (144 MiB against 102), and the group cut gains from them
/// (docs/performance.md#huge-pages).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_pages_are_off_unless_asked_for() {
    let dir = TempDir::new().unwrap();
    let store = dir.path().join("pages.zarr");
    write_store(&tiny_config(16), &store, &NoProgress).expect("writing the store");
    let mut args = dataset_arg("pages", &store);
    let plain = Server::start(&args, &dir.path().join("plain.log"));
    args.push("--huge-pages".into());
    let huge = Server::start(&args, &dir.path().join("huge.log"));
    assert_eq!(plain.proc_status_kib("THP_enabled"), 0);
    assert_eq!(huge.proc_status_kib("THP_enabled"), 1);
}

// ---------------------------------------------------------------------------------------------
// 4. A slow client next to a fast one
// ---------------------------------------------------------------------------------------------

/// A client that takes 200 ms per batch (small prefetch and HTTP/2 window, so the server feels
/// it at once) and a fast one stream the same dataset from one server: the fast one finishes its
/// epoch while the slow one has not got a third of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_client_does_not_hold_back_a_fast_one() {
    let dir = TempDir::new().unwrap();
    let store = store_with_stats(dir.path(), "era5.zarr", &tiny_config(16)).await;
    let server = Server::start(&dataset_arg("era5", &store), &dir.path().join("server.log"));

    let mut slow_config = client_config(vec![server.endpoint()]);
    slow_config.prefetch = 1;
    slow_config.stream_window_bytes = 64 << 10;
    slow_config.connection_window_bytes = 64 << 10;
    let slow_client = connect(slow_config).await;
    let fast_client = connect(client_config(vec![server.endpoint()])).await;

    // 64 samples in batches of 2: 32 batches, 6.4 s for the slow client.
    let total = 32usize;
    let (progress_tx, progress) = tokio::sync::watch::channel(0usize);
    let mut slow_stream = slow_client.stream(request("era5", 2, 32, "end_epoch = 1"));
    let slow = tokio::spawn(async move {
        let mut received = 0;
        while let Some(batch) = slow_stream.next().await {
            batch.expect("the slow stream");
            received += 1;
            let _ = progress_tx.send(received);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        received
    });
    // Let the slow stream start and fill its buffers first.
    let mut watch = progress.clone();
    tokio::time::timeout(STREAM_TIMEOUT, watch.wait_for(|&n| n >= 1))
        .await
        .expect("the slow client got no batch")
        .expect("the slow task ended");

    let started = Instant::now();
    let mut fast = fast_client.stream(request("era5", 2, 32, "end_epoch = 1"));
    let fast_batches = collect(&mut fast).await;
    let fast_seconds = started.elapsed().as_secs_f64();
    let slow_done = *progress.borrow();
    assert_whole_epoch(&ids(&fast_batches), 0, 64);
    println!("fast epoch in {fast_seconds:.3} s; the slow client had {slow_done}/{total} batches");
    assert!(
        slow_done < total / 3,
        "the slow client had {slow_done} of {total} batches when the fast one finished: \
         the fast one was held back (or the slow one was not slow)"
    );
    assert!(!slow.is_finished());
    slow.abort();
}

/// A tiles stream without an end epoch is one pass over the globe: it ends by itself, with every
/// tile once, in the same order as a request that asks for exactly one pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tiles_stream_is_one_pass_unless_asked_for_more() {
    let dir = TempDir::new().unwrap();
    let store = store_with_stats(dir.path(), "era5.zarr", &tiny_config(16)).await;
    let server = Server::start(&dataset_arg("era5", &store), &dir.path().join("server.log"));
    let client = connect(client_config(vec![server.endpoint()])).await;

    let mut open_ended = request("era5", 4, 8, "");
    tiles(&mut open_ended, vec![0, 0, 0]);
    let mut one_pass = request("era5", 4, 8, "end_epoch = 1");
    tiles(&mut one_pass, vec![0, 0, 0]);
    let open_ended = ids(&collect(&mut client.stream(open_ended)).await);
    let one_pass = ids(&collect(&mut client.stream(one_pass)).await);
    assert!(!open_ended.is_empty());
    assert_whole_epoch(&open_ended, 0, open_ended.len() as u64);
    assert_eq!(open_ended, one_pass);
}

// ---------------------------------------------------------------------------------------------
// 5. Resume from a mid-epoch cursor
// ---------------------------------------------------------------------------------------------

/// An uninterrupted epoch, then a new stream from the `cursor_after` of a batch in its middle:
/// the resumed stream delivers exactly the tail of the epoch, in the same order, and every
/// sample with the same bytes (sources, masks, targets, token info, PE).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resuming_from_a_mid_epoch_cursor_continues_exactly() {
    let dir = TempDir::new().unwrap();
    let store = store_with_stats(dir.path(), "era5.zarr", &tiny_config(16)).await;
    let server = Server::start(&dataset_arg("era5", &store), &dir.path().join("server.log"));
    let client = connect(client_config(vec![server.endpoint()])).await;

    // 48 samples in batches of 5: the last batch is short, and the cut below is not a multiple
    // of anything but the batch size.
    let whole = collect(&mut client.stream(request("era5", 5, 24, "end_epoch = 1"))).await;
    let all_ids = ids(&whole);
    assert_whole_epoch(&all_ids, 0, 48);
    assert!(whole.last().is_some_and(|b| b.end_of_stream));

    let cut = 4; // batches before the cursor
    let cursor: StreamCursor = whole[cut - 1].cursor_after;
    assert_eq!((cursor.epoch, cursor.position), (0, 20));
    let mut resumed_request = request("era5", 5, 24, "end_epoch = 1");
    resumed_request.resume = Some(cursor.into());
    let resumed = collect(&mut client.stream(resumed_request)).await;

    assert_eq!(ids(&resumed), all_ids[cut * 5..], "ids after the cursor");
    let expected = samples_by_id(&whole);
    for (key, bytes) in samples_by_id(&resumed) {
        assert!(
            expected[&key] == bytes,
            "sample {key:?} differs after resuming"
        );
    }
    // The resumed stream's cursors continue the uninterrupted ones.
    let cursors = |b: &[Batch]| b.iter().map(|b| b.cursor_after).collect::<Vec<_>>();
    assert_eq!(cursors(&resumed), cursors(&whole)[cut..]);
}

// ---------------------------------------------------------------------------------------------
// 6. kill -9 mid-epoch, restart elsewhere, every id exactly once
// ---------------------------------------------------------------------------------------------

/// The client knows two endpoints: the server it streams from, and a port where nothing listens
/// yet. After 4 of 32 batches the server is killed with SIGKILL and a new one started on the
/// second endpoint; the client reconnects there and resumes from its last complete batch. Every
/// id of the epoch arrives exactly once, in the order of an uninterrupted epoch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_epoch_then_restart_elsewhere_delivers_each_id_once() {
    let dir = TempDir::new().unwrap();
    let store = store_with_stats(dir.path(), "era5.zarr", &tiny_config(16)).await;
    let args = dataset_arg("era5", &store);
    let mut first = Server::start(&args, &dir.path().join("first.log"));
    let second_port = free_port();
    let second_endpoint = format!("http://127.0.0.1:{second_port}");

    let mut config = client_config(vec![first.endpoint(), second_endpoint.clone()]);
    // Small buffers: the server cannot run far ahead, so the kill cuts the epoch mid-way.
    config.prefetch = 1;
    config.stream_window_bytes = 64 << 10;
    config.connection_window_bytes = 64 << 10;
    config.reconnect.max_attempts = None;
    let client = connect(config).await;

    // 128 samples in batches of 4 (about 48 KB each): 32 batches.
    let samples = 128;
    let mut stream = client.stream(request("era5", 4, 64, "end_epoch = 1"));
    let mut batches = Vec::new();
    let mut second = None;
    let consumed = async {
        while let Some(batch) = stream.next().await {
            batches.push(batch.expect("the stream survives the restart"));
            if batches.len() == 4 {
                first.kill9();
                let (args, log) = (args.clone(), dir.path().join("second.log"));
                let bind = format!("127.0.0.1:{second_port}");
                let started =
                    tokio::task::spawn_blocking(move || Server::start_on(&bind, &args, &log));
                second = Some(started.await.expect("starting the second server"));
            }
            // A consumer with some work per batch.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(STREAM_TIMEOUT, consumed)
        .await
        .expect("the stream did not finish after the restart");
    let second = second.expect("the server was restarted");
    let arrived = ids(&batches);
    assert_whole_epoch(&arrived, 0, samples);
    assert!(
        stream.reconnects() >= 1,
        "the client never reconnected: the kill came too late ({:?})",
        stream.stats()
    );

    // The same order as an epoch nobody interrupted.
    let fresh = connect(client_config(vec![second.endpoint()])).await;
    let uninterrupted = collect(&mut fresh.stream(request("era5", 4, 64, "end_epoch = 1"))).await;
    assert_eq!(arrived, ids(&uninterrupted));
    println!(
        "reconnected {} time(s): {:?}",
        stream.reconnects(),
        stream.stats()
    );
}

// ---------------------------------------------------------------------------------------------
// 7. TLS and the bearer token
// ---------------------------------------------------------------------------------------------

const TOKEN: &str = "correct horse battery staple";

fn fixture(name: &str) -> PathBuf {
    workspace_root().join("proto/tests/fixtures").join(name)
}

fn tls_client_config(endpoint: &str, token: Option<&str>) -> ClientConfig {
    let mut config = client_config(vec![endpoint.to_string()]);
    config.tls_ca_pem = Some(std::fs::read(fixture("ca.pem")).expect("the test CA"));
    config.tls_domain = Some("loader.test".into());
    config.bearer_token = token.map(str::to_string);
    config.reconnect.max_attempts = Some(2);
    config
}

/// Writes a server configuration serving `store` as `era5`, `head` before its dataset table, and
/// returns the `serve` arguments that load it.
fn config_args(dir: &Path, head: &str, store: &Path) -> Vec<String> {
    let path = dir.join("loader.toml");
    let text = format!(
        "{head}\n[[datasets]]\nname = \"era5\"\nurl = \"{}\"\n",
        path_str(store)
    );
    std::fs::write(&path, text).expect("writing the server configuration");
    vec!["--config".into(), path_str(&path).into()]
}

/// A wrong and a missing token are UNAUTHENTICATED, with the reason, on unary, streaming and
/// sample calls alike. `config` makes a client configuration for a token.
async fn assert_tokens_rejected(config: impl Fn(Option<&str>) -> ClientConfig) {
    for (token, says) in [
        (Some("guess"), "wrong token"),
        (None, "bearer token is required"),
    ] {
        let client = connect(config(token)).await;
        let unary = client.list_datasets().await.expect_err("rejected");
        assert_eq!(unary.code(), Some(Code::Unauthenticated), "{unary}");
        assert!(unary.to_string().contains(says), "{unary}");
        let streamed = match client
            .stream(request("era5", 4, 8, "end_epoch = 1"))
            .next()
            .await
        {
            Some(Err(e)) => e,
            other => panic!("a stream with token {token:?} gave {other:?}"),
        };
        assert_eq!(streamed.code(), Some(Code::Unauthenticated), "{streamed}");
        let sample = client
            .sample(pb::SampleRequest::by_id(request("era5", 1, 8, ""), 0, 0))
            .await
            .expect_err("rejected");
        assert_eq!(sample.code(), Some(Code::Unauthenticated), "{sample}");
    }
}

/// A server with a bearer token (on loopback, where plaintext is allowed): the client library
/// and `pull --token` with the token stream an epoch; a wrong or missing token is
/// UNAUTHENTICATED; the health service stays open without a token (probes carry none).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bearer_token_admits_the_right_client_only() {
    let dir = TempDir::new().unwrap();
    let store = store_with_stats(dir.path(), "era5.zarr", &tiny_config(16)).await;
    let args = config_args(dir.path(), &format!("token = \"{TOKEN}\"\n"), &store);
    let mut server = Server::start(&args, &dir.path().join("server.log"));
    let config = |token: Option<&str>| {
        let mut config = client_config(vec![server.endpoint()]);
        config.bearer_token = token.map(str::to_string);
        config
    };

    let good = connect(config(Some(TOKEN))).await;
    let batches = collect(&mut good.stream(request("era5", 4, 8, "end_epoch = 1"))).await;
    assert_whole_epoch(&ids(&batches), 0, 16);
    let file = request_file(dir.path(), "req.toml", &request_toml("era5", 4, 8, ""));
    let report = pull_epoch(&[server.endpoint()], &file, &["--token", TOKEN]).await;
    assert_eq!(report["samples"], 16, "{report}");
    // Without the token `pull` fails, and says why.
    let output = spawn_pull(&[server.endpoint()], &file, &["--check-epoch"]).wait_output();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("bearer token is required"), "{stderr}");

    assert_tokens_rejected(config).await;

    let channel = tonic::transport::Endpoint::from_shared(server.endpoint())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let health = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: "atmorep.loader.v1.Loader".into(),
        })
        .await
        .expect("health needs no token");
    assert_eq!(
        health.into_inner().status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    assert!(server.is_running());
}

/// A server with `[tls]` (the fixture certificate for `loader.test`) and a token: a client with
/// the CA and the token lists datasets and streams an epoch (also `pull --ca --token` in another
/// process); a wrong or missing token is UNAUTHENTICATED; a plaintext client gets nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_token_accept_the_right_client_and_reject_the_others() {
    let dir = TempDir::new().unwrap();
    let store = store_with_stats(dir.path(), "era5.zarr", &tiny_config(16)).await;
    let head = format!(
        "token = \"{TOKEN}\"\n\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n",
        path_str(&fixture("server.pem")),
        path_str(&fixture("server.key")),
    );
    let args = config_args(dir.path(), &head, &store);
    let mut server = Server::start(&args, &dir.path().join("server.log"));
    let https = format!("https://127.0.0.1:{}", server.addr.port());

    // The right client.
    let good = connect(tls_client_config(&https, Some(TOKEN))).await;
    let datasets = good.list_datasets().await.expect("TLS + token is accepted");
    assert_eq!(datasets.len(), 1);
    let batches = collect(&mut good.stream(request("era5", 4, 8, "end_epoch = 1"))).await;
    assert_whole_epoch(&ids(&batches), 0, 16);
    let file = request_file(dir.path(), "req.toml", &request_toml("era5", 4, 8, ""));
    let ca = path_str(&fixture("ca.pem")).to_string();
    let report = pull_epoch(
        std::slice::from_ref(&https),
        &file,
        &["--ca", &ca, "--domain", "loader.test", "--token", TOKEN],
    )
    .await;
    assert_eq!(report["samples"], 16, "{report}");

    // Wrong and missing tokens, over TLS.
    assert_tokens_rejected(|token| tls_client_config(&https, token)).await;

    // Plaintext against the TLS port, with the right token: no answer at all.
    let mut plain = client_config(vec![format!("http://127.0.0.1:{}", server.addr.port())]);
    plain.bearer_token = Some(TOKEN.into());
    plain.reconnect.max_attempts = Some(2);
    let plain = connect(plain).await;
    let refused = tokio::time::timeout(Duration::from_secs(30), plain.list_datasets())
        .await
        .expect("the plaintext call did not end");
    assert!(
        refused.is_err(),
        "a plaintext client was answered: {refused:?}"
    );

    // None of this hurt the server.
    assert!(server.is_running());
    good.list_datasets()
        .await
        .expect("the server still answers");
}

// ---------------------------------------------------------------------------------------------
// 8. Health, reflection, unary calls and metrics
// ---------------------------------------------------------------------------------------------

/// gRPC health (`grpc.health.v1.Health/Check`) and reflection (v1 and v1alpha) through real tonic
/// clients; `ListDatasets` and `GetDatasetInfo` describe the tiny store; `GetSample` by id
/// returns the very sample the stream sent under that id, and by centre a window around the
/// centre; after the stream the Prometheus endpoint counts the samples served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reflection_unary_calls_and_metrics_answer() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let dir = TempDir::new().unwrap();
    let store = store_with_stats(dir.path(), "era5.zarr", &tiny_config(16)).await;
    let metrics_port = free_port();
    let mut args = dataset_arg("era5", &store);
    args.extend(["--metrics-bind".into(), format!("127.0.0.1:{metrics_port}")]);
    let server = Server::start(&args, &dir.path().join("server.log"));
    let channel = tonic::transport::Endpoint::from_shared(server.endpoint())
        .unwrap()
        .connect()
        .await
        .expect("connecting a plain tonic channel");

    // Health.
    let mut health = HealthClient::new(channel.clone());
    let check = |service: &str| HealthCheckRequest {
        service: service.into(),
    };
    let serving = health
        .check(check("atmorep.loader.v1.Loader"))
        .await
        .expect("Health/Check answers")
        .into_inner();
    assert_eq!(serving.status, ServingStatus::Serving as i32);
    let unknown = health
        .check(check("no.such.Service"))
        .await
        .expect_err("an unknown service has no health");
    assert_eq!(unknown.code(), Code::NotFound);

    // Reflection: the services, and the file that defines the loader.
    let mut reflection = ServerReflectionClient::new(channel);
    let ask = |request: MessageRequest| ServerReflectionRequest {
        host: String::new(),
        message_request: Some(request),
    };
    let mut answers = reflection
        .server_reflection_info(tokio_stream::iter([
            ask(MessageRequest::ListServices(String::new())),
            ask(MessageRequest::FileContainingSymbol(
                "atmorep.loader.v1.Loader".into(),
            )),
        ]))
        .await
        .expect("reflection answers")
        .into_inner();
    let services = match answers
        .message()
        .await
        .unwrap()
        .and_then(|r| r.message_response)
    {
        Some(MessageResponse::ListServicesResponse(list)) => {
            list.service.into_iter().map(|s| s.name).collect::<Vec<_>>()
        }
        other => panic!("ListServices answered {other:?}"),
    };
    for name in ["atmorep.loader.v1.Loader", "grpc.health.v1.Health"] {
        assert!(
            services.iter().any(|s| s == name),
            "{name} not in {services:?}"
        );
    }
    match answers
        .message()
        .await
        .unwrap()
        .and_then(|r| r.message_response)
    {
        Some(MessageResponse::FileDescriptorResponse(files)) => {
            assert!(!files.file_descriptor_proto.is_empty());
        }
        other => panic!("FileContainingSymbol answered {other:?}"),
    }

    // Reflection v1alpha (grpcurl and older tools ask it only) lists the same services.
    {
        use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
        use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
        let channel = tonic::transport::Endpoint::from_shared(server.endpoint())
            .unwrap()
            .connect()
            .await
            .expect("connecting a plain tonic channel");
        let mut answers = ServerReflectionClient::new(channel)
            .server_reflection_info(tokio_stream::iter([ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::ListServices(String::new())),
            }]))
            .await
            .expect("reflection v1alpha answers")
            .into_inner();
        match answers
            .message()
            .await
            .unwrap()
            .and_then(|r| r.message_response)
        {
            Some(MessageResponse::ListServicesResponse(list)) => assert!(
                list.service
                    .iter()
                    .any(|s| s.name == "atmorep.loader.v1.Loader"),
                "{list:?}"
            ),
            other => panic!("v1alpha ListServices answered {other:?}"),
        }
    }

    // ListDatasets and GetDatasetInfo.
    let client = connect(client_config(vec![server.endpoint()])).await;
    let list = client.list_datasets().await.unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].name, "era5");
    let mut variables = list[0].variables.clone();
    variables.sort();
    assert_eq!(variables, ["t", "z"]);
    assert_eq!(list[0].time_start, "2020-09-01T00:00:00Z");
    assert_eq!(list[0].time_end, "2020-09-04T18:00:00Z");
    let info = client.dataset_info("era5").await.unwrap();
    let grid = info.grid.expect("a grid");
    assert_eq!((grid.nlat, grid.nlon), (19, 36));
    assert!((grid.lat_step.abs() - 10.0).abs() < 1e-9, "{grid:?}");
    assert!((grid.lon_step - 10.0).abs() < 1e-9, "{grid:?}");
    let time = info.time.expect("a time axis");
    assert_eq!(time.count, 16);
    assert!((time.step_hours - 6.0).abs() < 1e-9);
    let z = info.variables.iter().find(|v| v.name == "z").expect("z");
    assert_eq!(z.levels, [850.0, 500.0]);
    assert!(!z.chunk_shape.is_empty());
    let stats = info.statistics.expect("a statistics summary");
    let mut global = stats.global.clone();
    global.sort();
    assert_eq!(global, ["t", "z"]);
    assert_eq!(
        (stats.global_first_year, stats.global_last_year),
        (2020, 2020)
    );
    let geometry = info.geometry.expect("the servable geometry");
    assert_eq!(geometry.max_window, [16, 19, 36]);
    assert!(geometry.max_batch_size > 0);
    // The default request limits, not the grid's size.
    assert_eq!(geometry.max_tokens, 131_072);
    assert_eq!(geometry.max_batch_bytes, 512 << 20);
    assert_eq!(geometry.max_samples_per_epoch, 1 << 23);
    // A 4σ halo inside 19 latitudes.
    assert_eq!(geometry.max_blur_sigma, 4.5);

    // A stream, then GetSample by id gives the same sample, byte for byte.
    let whole = collect(&mut client.stream(request("era5", 4, 8, "end_epoch = 1"))).await;
    assert_whole_epoch(&ids(&whole), 0, 16);
    let streamed = samples_by_id(&whole);
    for id in [0, 11] {
        let one = client
            .sample(pb::SampleRequest::by_id(request("era5", 1, 8, ""), 0, id))
            .await
            .unwrap();
        assert_eq!(
            (one.sample_ids.as_slice(), one.sample_epochs.as_slice()),
            (&[id][..], &[0][..])
        );
        assert!(
            sample_bytes(&one, 0) == streamed[&(0, id)],
            "GetSample({id}) differs from the stream"
        );
    }

    // GetSample by centre: the window's token centres surround the requested point, at the
    // requested time (step 4 = 2020-09-02T00:00Z; a token is dated by its last step).
    for time in [
        pb::sample_by_centre::Time::TimeIndex(4),
        pb::sample_by_centre::Time::IsoTime("2020-09-02T00:00:00Z".into()),
    ] {
        let one = client
            .sample(pb::SampleRequest::by_centre(
                request("era5", 1, 8, ""),
                time,
                30.0,
                120.0,
            ))
            .await
            .unwrap();
        assert_eq!(one.len(), 1);
        let t = one.field("t").expect("field t");
        let infos: Vec<&[f32]> = t.token_info_of(0).chunks(8).collect();
        assert_eq!(infos.len(), 2 * 3 * 6);
        let mean =
            |k: usize| infos.iter().map(|i| f64::from(i[k])).sum::<f64>() / infos.len() as f64;
        assert!(
            (mean(4) - 30.0).abs() <= 10.0,
            "token latitudes centre on {}",
            mean(4)
        );
        assert!(
            (mean(5) - 120.0).abs() <= 10.0,
            "token longitudes centre on {}",
            mean(5)
        );
        let days: HashSet<u32> = infos.iter().map(|i| i[1] as u32).collect();
        // 2020-09-01 is day 244 (0-based) of a leap year; the window spans steps 3..5.
        assert!(days.iter().all(|d| (244..=245).contains(d)), "{days:?}");
    }

    // The Prometheus endpoint has counted the streamed samples (and the two by id).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = scrape(metrics_port);
        let served = text
            .as_deref()
            .and_then(|t| metric(t, "atmorep_samples_served_total{dataset=\"era5\"}"));
        if served.is_some_and(|n| n >= 16.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no atmorep_samples_served_total ≥ 16 on :{metrics_port}: {served:?}\n{}",
            text.unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// 7. a loader started by another process goes when its parent goes

/// `--until-stdin-closes`: the demo and `ablate --quick` start their loader with a pipe on its
/// stdin; when the parent exits (even by SIGKILL, which runs no destructor) the pipe closes and
/// the loader shuts down instead of living on as an orphan holding its port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loader_started_with_until_stdin_closes_stops_when_its_stdin_closes() {
    let dir = TempDir::new().unwrap();
    let store = store_with_stats(dir.path(), "tiny.zarr", &tiny_config(16)).await;
    let mut child = Command::new(atmorep_bin())
        .args([
            "loader",
            "serve",
            "--bind",
            "127.0.0.1:0",
            "--until-stdin-closes",
        ])
        .args(dataset_arg("tiny", &store))
        .env("RUST_LOG", "info")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting the loader");
    let mut stdout = child.stdout.take().unwrap();
    let mut seen = String::new();
    let mut buf = [0u8; 256];
    while !seen.contains("listening on ") {
        let n = stdout.read(&mut buf).expect("reading the loader's stdout");
        assert!(n > 0, "the loader exited before listening: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    let stdin = child.stdin.take().unwrap();
    // Still serving while the pipe is open.
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        child.try_wait().unwrap().is_none(),
        "the loader stopped early"
    );
    drop(stdin);
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("the loader kept running after its stdin closed");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "a clean shutdown: {status}");
}
