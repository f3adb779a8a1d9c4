//! Real ERA5 through the command line, as the README's quick start runs it: `atmorep loader
//! convert` of cfgrib's GRIB1 sample (two files, one ensemble member) and of the CDS-layout
//! NetCDF4 file, then `inspect`, `stats`, `serve` (both stores as two datasets of one server)
//! and `pull --check-epoch` against each; and a corrupt GRIB refused by the CLI with the file
//! and message named and no store written.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use atmorep_testkit::cli::{atmorep, stdout_of_success};
use atmorep_testkit::{Server, atmorep_bin, workspace_root};
use serde_json::Value;

fn sample(name: &str) -> String {
    workspace_root()
        .join("tests/data/era5")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 paths")
}

fn pull_epoch(endpoint: &str, dir: &Path, dataset: &str) -> Value {
    let request: PathBuf = dir.join(format!("{dataset}.toml"));
    // The README quick start's request, for each dataset of the server.
    let text = std::fs::read_to_string(sample("request.toml")).unwrap();
    let text = text.replace("dataset = \"era5\"", &format!("dataset = \"{dataset}\""));
    assert!(text.contains(dataset));
    std::fs::write(&request, text).unwrap();
    let out = Command::new(atmorep_bin())
        .args(["loader", "pull", endpoint, "--request", s(&request)])
        .args(["--json", "--check-epoch"])
        .env("RUST_LOG", "warn")
        .env_remove("ATMOREP_TOKEN")
        .stdin(Stdio::null())
        .output()
        .expect("running atmorep loader pull");
    serde_json::from_str(&stdout_of_success(&out)).expect("pull's JSON report")
}

#[test]
fn converted_grib_and_netcdf_are_inspected_served_and_pulled() {
    let dir = tempfile::tempdir().unwrap();
    let grib = dir.path().join("era5-grib.zarr");
    let nc = dir.path().join("era5-nc.zarr");
    let text = stdout_of_success(&atmorep(&[
        "loader",
        "convert",
        &sample("era5-pl-b.grib"),
        &sample("era5-pl-a.grib"),
        "--member",
        "0",
        "--out",
        s(&grib),
    ]));
    assert!(text.contains("4 steps × 2 levels × 61 × 120"), "{text}");
    assert!(text.contains("MB/s"), "{text}");
    stdout_of_success(&atmorep(&[
        "loader",
        "convert",
        &sample("era5-pl.nc"),
        "--out",
        s(&nc),
        "--chunks",
        "2,1,61,120",
        "--codec",
        "zstd",
    ]));

    let report: Value = serde_json::from_str(&stdout_of_success(&atmorep(&[
        "loader",
        "inspect",
        s(&nc),
        "--json",
    ])))
    .unwrap();
    assert_eq!(report["zarr_format"], 3);
    assert_eq!(report["time"]["steps"], 4);
    assert_eq!(report["time"]["start"], "2017-01-01T00:00:00Z");
    assert_eq!(report["grid"]["nlat"], 61);
    assert_eq!(report["grid"]["dlon"], 3.0);
    for store in [&grib, &nc] {
        let text = stdout_of_success(&atmorep(&["loader", "stats", s(store)]));
        assert!(text.contains("wrote 4 rows"), "{text}");
    }

    let server = Server::start(
        &[
            "--dataset".into(),
            format!("grib={}", s(&grib)),
            "--dataset".into(),
            format!("nc={}", s(&nc)),
        ],
        &dir.path().join("serve.log"),
    );
    for dataset in ["grib", "nc"] {
        let report = pull_epoch(&server.endpoint(), dir.path(), dataset);
        assert_eq!(report["epoch_checked"], true, "{dataset}: {report}");
        assert!(
            report["samples"].as_u64().unwrap_or(0) > 0,
            "{dataset}: {report}"
        );
    }
}

#[test]
fn a_corrupt_grib_is_refused_by_the_cli_without_a_store() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bad.zarr");
    let run = atmorep(&[
        "loader",
        "convert",
        &sample("era5-levels-corrupted.grib"),
        "--out",
        s(&out),
    ]);
    assert!(!run.status.success());
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(
        err.contains("era5-levels-corrupted.grib: GRIB message 1"),
        "{err}"
    );
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}
