//! Stores on S3: the same store read through the real `object_store` S3 client (against the
//! in-process [`S3TestServer`]) and from the local file system must give the same canonical
//! view, the same values bit for bit and the same `inspect` report — in-process through
//! `StoreLocation::from_store`, and across processes through the `atmorep` CLI configured by
//! `AWS_*` environment variables.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use atmorep_loader::progress::NoProgress;
use atmorep_loader::store::zarr_meta::ZarrFormat;
use atmorep_loader::tools::inspect::inspect;
use atmorep_loader::tools::synth::{SynthConfig, write_store};
use atmorep_loader::{ChunkCache, Dataset, Hyperslab, StoreLocation};
use atmorep_testkit::{S3TestServer, atmorep_bin};
use serde_json::Value;

const BUCKET: &str = "era5-test";

/// The Python-written fixture stores (see `tests/fixtures/README.md`).
const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
const FIXTURE_STORES: [&str; 3] = ["xr_v2_packed.zarr", "xr_v3_sharded.zarr", "xr_v2_gzip.zarr"];

fn fixture(name: &str) -> PathBuf {
    Path::new(FIXTURES).join(name)
}

/// A small synthetic store: 10° grid, 6 steps of 6 h, two levels, two variables.
fn small_config() -> SynthConfig {
    SynthConfig {
        grid_deg: 10.0,
        steps: 6,
        step_hours: 6,
        levels: vec![850, 500],
        variables: vec!["z".into(), "vo".into()],
        ..Default::default()
    }
}

/// The same as Zarr v3 with shards of 2 steps × 1 level × the globe, inner chunks half a globe.
fn small_sharded_config() -> SynthConfig {
    SynthConfig {
        format: ZarrFormat::V3,
        chunks: Some([2, 1, 19, 36]),
        shard_inner: Some([1, 1, 19, 18]),
        ..small_config()
    }
}

fn write_synth(dir: &Path, name: &str, cfg: &SynthConfig) -> PathBuf {
    let out = dir.join(name);
    write_store(cfg, &out, &NoProgress).unwrap_or_else(|e| panic!("writing {name}: {e}"));
    out
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("test paths are UTF-8")
}

async fn open_local(path: &Path) -> Dataset {
    Dataset::open(path_str(path))
        .await
        .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()))
}

/// Opens `prefix` in the test bucket through the S3 client, in this process.
async fn open_s3(server: &S3TestServer, prefix: &str) -> Dataset {
    let location = StoreLocation::from_store(
        server.url(BUCKET, prefix),
        Arc::new(server.object_store(BUCKET)),
        prefix,
    );
    Dataset::open_location(location, Arc::new(ChunkCache::new(64 << 20)))
        .await
        .unwrap_or_else(|e| panic!("opening {} over S3: {e}", server.url(BUCKET, prefix)))
}

/// An inspect report as JSON without `url` (which necessarily differs).
fn report_without_url(report: &atmorep_loader::tools::inspect::InspectReport) -> Value {
    let mut json = serde_json::to_value(report).expect("the report serializes");
    json.as_object_mut()
        .expect("the report is an object")
        .remove("url")
        .expect("the report has a url");
    json
}

fn assert_bits_equal(remote: &[f32], local: &[f32], what: &str) {
    assert_eq!(remote.len(), local.len(), "{what}: number of values");
    if let Some(i) = (0..local.len()).find(|&i| remote[i].to_bits() != local[i].to_bits()) {
        panic!(
            "{what}: value {i} differs: over S3 {:e} ({:#010x}), local {:e} ({:#010x})",
            remote[i],
            remote[i].to_bits(),
            local[i],
            local[i].to_bits()
        );
    }
}

/// Asserts that the store read over S3 is the store read locally.
async fn assert_same_store(local: &Dataset, remote: &Dataset, what: &str) {
    assert!(
        remote.url().starts_with("s3://"),
        "{what}: {}",
        remote.url()
    );
    assert_eq!(
        remote.metadata.zarr_format, local.metadata.zarr_format,
        "{what}: zarr_format"
    );
    assert_eq!(
        remote.metadata.consolidated, local.metadata.consolidated,
        "{what}: consolidated"
    );
    assert_eq!(remote.layout, local.layout, "{what}: layout");
    assert_eq!(remote.times, local.times, "{what}: times");
    assert_eq!(remote.time_units, local.time_units, "{what}: time units");
    assert_eq!(remote.lats, local.lats, "{what}: lats");
    assert_eq!(remote.lons, local.lons, "{what}: lons");
    assert_eq!(
        remote.lat_ascending, local.lat_ascending,
        "{what}: lat_ascending"
    );
    assert_eq!(remote.lon_shift, local.lon_shift, "{what}: lon_shift");
    assert_eq!(
        remote.variables.keys().collect::<Vec<_>>(),
        local.variables.keys().collect::<Vec<_>>(),
        "{what}: variables"
    );
    assert!(!local.variables.is_empty(), "{what}: no variables");

    for (name, variable) in &local.variables {
        let remote_variable = &remote.variables[name];
        assert_eq!(
            remote_variable.levels, variable.levels,
            "{what}/{name}: levels"
        );
        assert_eq!(
            remote_variable.stored_dtype, variable.stored_dtype,
            "{what}/{name}: stored dtype"
        );

        let full = Hyperslab::full(local, variable);
        let local_values = local.read(&full).await.unwrap();
        let remote_values = remote
            .read(&full)
            .await
            .unwrap_or_else(|e| panic!("{what}/{name}: full read over S3: {e}"));
        assert_bits_equal(
            &remote_values,
            &local_values,
            &format!("{what}/{name}: full read"),
        );

        // A window that wraps across lon 0 at the south pole, over the later time steps.
        let (nt, nlat, nlon) = (local.times.len(), local.lats.len(), local.lons.len());
        let window = Hyperslab {
            time: nt / 2..nt,
            lat: nlat - 2..nlat,
            lon_start: nlon - 2,
            lon_len: 5.min(nlon),
            ..full
        };
        let local_window = local.read(&window).await.unwrap();
        let remote_window = remote.read(&window).await.unwrap();
        assert_bits_equal(
            &remote_window,
            &local_window,
            &format!("{what}/{name}: window"),
        );
    }
    assert!(
        remote
            .counters
            .fetched_chunks
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0,
        "{what}: nothing was fetched over S3"
    );

    let local_report = inspect(local, true, &NoProgress).await.unwrap();
    let remote_report = inspect(remote, true, &NoProgress)
        .await
        .unwrap_or_else(|e| panic!("{what}: inspect over S3: {e}"));
    assert_eq!(
        report_without_url(&remote_report),
        report_without_url(&local_report),
        "{what}: inspect reports differ"
    );
}

#[tokio::test]
async fn synthetic_v2_store_reads_identically_over_s3() {
    let dir = tempfile::tempdir().unwrap();
    let store = write_synth(dir.path(), "synth-v2.zarr", &small_config());
    let server = S3TestServer::start(&dir.path().join("s3")).await.unwrap();
    let prefix = "stores/synth-v2.zarr";
    assert!(server.upload_dir(&store, BUCKET, prefix).unwrap() > 0);

    let local = open_local(&store).await;
    let remote = open_s3(&server, prefix).await;
    assert_eq!(local.metadata.zarr_format, 2);
    assert_same_store(&local, &remote, "synthetic v2").await;
}

#[tokio::test]
async fn synthetic_v3_sharded_store_reads_identically_over_s3() {
    let dir = tempfile::tempdir().unwrap();
    let store = write_synth(dir.path(), "synth-v3.zarr", &small_sharded_config());
    let server = S3TestServer::start(&dir.path().join("s3")).await.unwrap();
    let prefix = "synth-v3.zarr";
    assert!(server.upload_dir(&store, BUCKET, prefix).unwrap() > 0);

    let local = open_local(&store).await;
    let remote = open_s3(&server, prefix).await;
    assert_eq!(local.metadata.zarr_format, 3);
    let report = inspect(&local, false, &NoProgress).await.unwrap();
    assert!(
        report
            .arrays
            .iter()
            .any(|a| a.codecs.iter().any(|c| c.starts_with("sharding"))),
        "the v3 store is not sharded: {:?}",
        report.arrays
    );
    assert_same_store(&local, &remote, "synthetic v3 sharded").await;
}

#[tokio::test]
async fn python_fixture_stores_read_identically_over_s3() {
    let dir = tempfile::tempdir().unwrap();
    let server = S3TestServer::start(dir.path()).await.unwrap();
    for name in FIXTURE_STORES {
        let prefix = format!("fixtures/{name}");
        assert!(server.upload_dir(&fixture(name), BUCKET, &prefix).unwrap() > 0);
        let local = open_local(&fixture(name)).await;
        let remote = open_s3(&server, &prefix).await;
        assert_same_store(&local, &remote, name).await;
    }
}

/// Runs the CLI to completion.
fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// `atmorep loader inspect URL --json --stats`, checked to succeed, as JSON.
fn cli_inspect(cmd: &mut Command, url: &str) -> Value {
    let output = run(cmd.args(["loader", "inspect", url, "--json", "--stats"]));
    assert!(
        output.status.success(),
        "atmorep loader inspect {url} failed ({}):\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "inspect {url} printed no JSON ({e}):\n{}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

/// A report without what legitimately differs between two locations of one store.
fn comparable(mut report: Value, url: &str) -> Value {
    let object = report.as_object_mut().expect("the report is an object");
    assert_eq!(object.remove("url"), Some(Value::String(url.to_string())));
    for array in object["arrays"].as_array_mut().expect("`arrays` is a list") {
        array
            .as_object_mut()
            .expect("an array entry is an object")
            .remove("compressed_bytes");
    }
    report
}

#[test]
fn cli_inspect_over_s3_matches_local() {
    let dir = tempfile::tempdir().unwrap();
    let mut stores = vec![
        (
            "synth-v2.zarr".to_string(),
            write_synth(dir.path(), "synth-v2.zarr", &small_config()),
        ),
        (
            "synth-v3.zarr".to_string(),
            write_synth(dir.path(), "synth-v3.zarr", &small_sharded_config()),
        ),
    ];
    stores.extend(FIXTURE_STORES.map(|name| (name.to_string(), fixture(name))));

    let bin = atmorep_bin();
    let server = S3TestServer::start_blocking(&dir.path().join("s3")).unwrap();
    for (name, local) in &stores {
        let prefix = format!("cli/{name}");
        server.upload_dir(local, BUCKET, &prefix).unwrap();
        let url = server.url(BUCKET, &prefix);

        let remote_report = cli_inspect(server.configure_command(&mut Command::new(&bin)), &url);
        let local_report = cli_inspect(&mut Command::new(&bin), path_str(local));

        // Stats were computed for every variable.
        let variables = remote_report["variables"].as_array().unwrap();
        assert!(!variables.is_empty(), "{name}: no variables");
        for v in variables {
            assert!(v["stats"]["count"].as_u64().unwrap() > 0, "{name}: {v}");
        }
        assert_eq!(
            comparable(remote_report, &url),
            comparable(local_report, path_str(local)),
            "{name}: inspect over S3 differs from the local inspect"
        );
    }
}

#[test]
fn cli_inspect_of_a_missing_store_names_the_url() {
    let dir = tempfile::tempdir().unwrap();
    let server = S3TestServer::start_blocking(dir.path()).unwrap();
    server.create_bucket(BUCKET).unwrap();
    let url = server.url(BUCKET, "does-not-exist.zarr");

    let mut cmd = Command::new(atmorep_bin());
    server.configure_command(&mut cmd);
    let output = run(cmd.args(["loader", "inspect", &url, "--json"]));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "inspect of {url} succeeded:\n{stderr}"
    );
    assert!(
        stderr.contains(&url),
        "the message does not name {url}:\n{stderr}"
    );
    assert!(
        stderr.contains("not a Zarr store"),
        "the message does not say what is wrong:\n{stderr}"
    );
    assert!(
        output.stdout.is_empty(),
        "inspect printed a report for {url}"
    );
}

#[test]
fn cli_inspect_with_wrong_credentials_names_the_object_store_failure() {
    let dir = tempfile::tempdir().unwrap();
    let server = S3TestServer::start_blocking(&dir.path().join("s3")).unwrap();
    let prefix = "private/xr_v2_gzip.zarr";
    server
        .upload_dir(&fixture("xr_v2_gzip.zarr"), BUCKET, prefix)
        .unwrap();
    let url = server.url(BUCKET, prefix);

    let bin = atmorep_bin();
    for (key, value) in [
        ("AWS_SECRET_ACCESS_KEY", "not-the-secret"),
        ("AWS_ACCESS_KEY_ID", "nobody"),
    ] {
        let mut cmd = Command::new(&bin);
        server.configure_command(&mut cmd).env(key, value);
        let output = run(cmd.args(["loader", "inspect", &url, "--json"]));
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            !output.status.success(),
            "inspect with a wrong {key} succeeded:\n{stderr}"
        );
        assert!(
            stderr.contains("object store failure"),
            "wrong {key}: the message does not name the object store failure:\n{stderr}"
        );
        assert!(
            stderr.contains(&url),
            "wrong {key}: the message does not name {url}:\n{stderr}"
        );
        assert!(
            output.stdout.is_empty(),
            "wrong {key}: a report was printed"
        );
    }

    // The right credentials work on the very same store.
    let mut cmd = Command::new(&bin);
    server.configure_command(&mut cmd);
    let report = cli_inspect(&mut cmd, &url);
    assert_eq!(report["url"], Value::String(url));
}
