//! Public cloud stores read anonymously: ARCO-ERA5 (`gs://gcp-public-data-arco-era5/…`, Zarr v3
//! with inline consolidated metadata) and WeatherBench2 (`gs://weatherbench2/…`, Zarr v2 with
//! `.zmetadata`) as an anonymous reader sees them — plain HTTP GETs of `BUCKET/PATH` with no
//! listing — served by an in-process file server on 127.0.0.1:0. The stores are laid out like
//! the published ones: one array per variable named by ERA5's long names, dims (time, level,
//! latitude, longitude), latitude from 90 down to −90, time as int64 hours since 1900-01-01.

use std::path::Path;
use std::sync::Arc;

use atmorep_loader::progress::NoProgress;
use atmorep_loader::store::zarr_meta::ZarrFormat;
use atmorep_loader::tools::synth::{SynthConfig, write_store};
use atmorep_loader::{ChunkCache, Dataset, Hyperslab, StoreLocation};
use atmorep_testkit::http_files::HttpFileServer;
use serde_json::{Value, json};
use tempfile::TempDir;

const WB2: &str =
    "weatherbench2/datasets/era5/1959-2023_01_10-wb13-6h-1440x721_with_derived_variables.zarr";
const ARCO: &str = "gcp-public-data-arco-era5/ar/full_37-1h-0p25deg-chunk-1.zarr-v3";

/// Folds the arrays' `zarr.json` into the root group's inline consolidated metadata, as
/// zarr-python 3 (and so xarray) writes it.
fn consolidate_v3(store: &Path) {
    let mut metadata = serde_json::Map::new();
    for entry in std::fs::read_dir(store).unwrap() {
        let path = entry.unwrap().path().join("zarr.json");
        if path.exists() {
            let name = path
                .parent()
                .unwrap()
                .file_name()
                .unwrap()
                .to_string_lossy()
                .to_string();
            let meta: Value =
                serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            metadata.insert(name, meta);
        }
    }
    let root = store.join("zarr.json");
    let mut group: Value = serde_json::from_str(&std::fs::read_to_string(&root).unwrap()).unwrap();
    group["consolidated_metadata"] =
        json!({"kind": "inline", "must_understand": false, "metadata": metadata});
    std::fs::write(&root, serde_json::to_string(&group).unwrap()).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_buckets_read_anonymously_over_http() {
    let dir = TempDir::new().unwrap();
    let root = dir.path().join("buckets");
    for (path, format) in [(WB2, ZarrFormat::V2), (ARCO, ZarrFormat::V3)] {
        let store = root.join(path);
        std::fs::create_dir_all(store.parent().unwrap()).unwrap();
        let config = SynthConfig {
            grid_deg: 10.0,
            steps: 8,
            step_hours: 6,
            levels: vec![850, 500],
            variables: vec!["z".into(), "t".into()],
            long_names: true,
            format,
            ..SynthConfig::default()
        };
        write_store(&config, &store, &NoProgress).unwrap();
        if format == ZarrFormat::V3 {
            consolidate_v3(&store);
        }
    }
    let server = HttpFileServer::start(&root).unwrap();
    let endpoint = server.url();
    // No Google credentials at all: only the endpoint of the test server.
    let env = |name: &str| (name == "ATMOREP_GCS_ENDPOINT").then(|| endpoint.clone());
    for path in [WB2, ARCO] {
        let local = Dataset::open(root.join(path).to_str().unwrap())
            .await
            .unwrap();
        for url in [format!("gs://{path}"), format!("{endpoint}/{path}")] {
            let location = StoreLocation::open_with_env(&url, &env).unwrap();
            let remote = Dataset::open_location(location, Arc::new(ChunkCache::new(1 << 28)))
                .await
                .unwrap_or_else(|e| panic!("{url}: {e} ({e:?})"));
            assert!(remote.metadata.consolidated, "{url}");
            let names: Vec<&str> = remote.variables.keys().map(String::as_str).collect();
            assert_eq!(names, ["geopotential", "temperature"], "{url}");
            assert_eq!(remote.times, local.times, "{url}");
            assert_eq!(remote.lats, local.lats, "{url}");
            assert_eq!((remote.lats[0], remote.lats[18]), (90.0, -90.0));
            assert!(!remote.lat_ascending && remote.lon_periodic(), "{url}");
            assert_eq!(remote.variables["temperature"].levels, [850.0, 500.0]);
            // A request's short name finds the long one.
            let name = remote.resolve_name("t").unwrap();
            let variable = remote.variable(name).unwrap();
            let values = remote
                .read(&Hyperslab::full(&remote, variable))
                .await
                .unwrap();
            let want = local
                .read(&Hyperslab::full(&local, local.variable(name).unwrap()))
                .await
                .unwrap();
            assert_eq!(values, want, "{url}");
        }
    }
    // The CLI, with no Google credentials in its environment, inspects the bucket by its gs://
    // URL.
    let mut inspect = std::process::Command::new(atmorep_testkit::atmorep_bin());
    inspect
        .args(["loader", "inspect", &format!("gs://{WB2}"), "--json"])
        .env("ATMOREP_GCS_ENDPOINT", &endpoint)
        .env("HOME", dir.path())
        .env("RUST_LOG", "warn");
    for var in [
        "GOOGLE_SERVICE_ACCOUNT",
        "GOOGLE_SERVICE_ACCOUNT_PATH",
        "GOOGLE_SERVICE_ACCOUNT_KEY",
        "GOOGLE_APPLICATION_CREDENTIALS",
    ] {
        inspect.env_remove(var);
    }
    let out = inspect.output().unwrap();
    let report: Value =
        serde_json::from_str(&atmorep_testkit::cli::stdout_of_success(&out)).unwrap();
    assert_eq!(report["variables"][1]["name"], "temperature", "{report}");
    assert_eq!(report["time"]["steps"], 8, "{report}");

    let requests = server.requests();
    assert!(
        requests
            .iter()
            .all(|r| r.starts_with("/weatherbench2/datasets/era5/")
                || r.starts_with("/gcp-public-data-arco-era5/ar/")),
        "{requests:?}"
    );
    assert!(
        requests.contains(&format!("/{WB2}/.zmetadata")),
        "{requests:?}"
    );
    assert!(
        requests.contains(&format!("/{ARCO}/zarr.json")),
        "{requests:?}"
    );
}
