//! `atmorep track` end to end: a real loader process serves a synthetic store with two cyclones
//! (one crossing 180° in the north, one crossing 0° in the south), the tracker in another
//! process asks it for global tiles, and its tracks are scored against the store's truth.

use std::path::{Path, PathBuf};
use std::process::Output;

use atmorep_loader::progress::NoProgress;
use atmorep_loader::tools::synth::{SynthConfig, write_store};
use atmorep_testkit::Server;
use atmorep_testkit::cli::atmorep;
use atmorep_track::{EvalConfig, evaluate, read_reference, read_tracks_csv};
use serde_json::Value;
use tempfile::TempDir;

/// 2° grid, 49 three-hourly steps (6 days), the variables the tracker needs.
/// The store and its truth tracks.
fn store(dir: &Path, variables: &[&str]) -> (PathBuf, PathBuf) {
    store_named(dir, variables, false)
}

/// [`store`], its arrays named by ERA5's long names (`vorticity`, `geopotential` …) when
/// `long_names`, as ARCO-ERA5 and WeatherBench2 name them.
fn store_named(dir: &Path, variables: &[&str], long_names: bool) -> (PathBuf, PathBuf) {
    let config = SynthConfig {
        grid_deg: 2.0,
        variables: variables.iter().map(|v| v.to_string()).collect(),
        long_names,
        ..SynthConfig::default()
    };
    let path = dir.join("era5.zarr");
    let summary = write_store(&config, &path, &NoProgress).expect("writing the synthetic store");
    (path, summary.tracks_csv)
}

fn serve(dir: &Path, store: &Path) -> Server {
    let dataset = format!("era5={}", store.to_str().expect("UTF-8 path"));
    Server::start(&["--dataset".into(), dataset], &dir.join("server.log"))
}

fn text(output: &Output) -> String {
    format!(
        "status {}\nstdout: {}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// `atmorep track --loader SERVER --out OUT EXTRA…`.
fn track(server: &Server, out: &Path, extra: &[&str]) -> Output {
    let endpoint = server.endpoint();
    let mut args = vec![
        "track",
        "--loader",
        &endpoint,
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    atmorep(&args)
}

/// A failed run that wrote nothing and whose error says `what`.
fn assert_refused(run: &Output, out: &Path, what: &[&str]) {
    assert!(!run.status.success(), "{}", text(run));
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        what.iter().all(|w| stderr.contains(w)),
        "the error does not say {what:?}: {}",
        text(run)
    );
    assert!(!out.exists(), "nothing is written on error");
}

#[test]
fn the_tracker_finds_both_storms_through_the_loader_and_nothing_else() {
    let dir = TempDir::new().unwrap();
    let (store, truth) = store(dir.path(), &["z", "vo"]);
    let server = serve(dir.path(), &store);
    let out = dir.path().join("tracks.csv");
    let map = dir.path().join("tracks.png");
    let run = track(
        &server,
        &out,
        &[
            "--dataset",
            "era5",
            "--map",
            map.to_str().unwrap(),
            "--truth",
            truth.to_str().unwrap(),
        ],
    );
    assert!(run.status.success(), "{}", text(&run));
    assert!(
        String::from_utf8_lossy(&run.stdout).contains("2 tracks in 25 time steps"),
        "{}",
        text(&run)
    );
    let png = std::fs::read(&map).expect("the map was written");
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");

    let tracks = read_tracks_csv(&out).expect("our CSV reads back");
    let reference = read_reference(&truth, None).expect("the truth reads");
    let report = evaluate(&tracks, &reference, &EvalConfig::default()).unwrap();
    assert_eq!(
        (report.hits, report.misses, report.false_alarms),
        (2, 0, 0),
        "{report}"
    );
    // Half a grid spacing: 1° of great circle.
    let error = report.mean_error_km.expect("matched storms have an error");
    assert!(error < 111.0, "mean position error {error} km: {report}");
    // The storm crossing 180° is one track, not two pieces.
    assert!(
        report.matches.iter().all(|m| m.points >= 20),
        "a storm was split: {report}"
    );

    // `track eval` reads the same files and agrees.
    let eval = atmorep(&[
        "track",
        "eval",
        out.to_str().unwrap(),
        "--truth",
        truth.to_str().unwrap(),
        "--json",
    ]);
    assert!(eval.status.success(), "{}", text(&eval));
    let json: Value = serde_json::from_slice(&eval.stdout).expect("JSON report");
    assert_eq!(json["hits"], 2, "{json}");
    assert_eq!(json["false_alarms"], 0, "{json}");
}

/// A store with ERA5's long names (`vorticity`, `geopotential`, `temperature`) tracks with no
/// configuration at all, and finds the same storms.
#[test]
fn a_store_with_long_names_tracks_with_no_config() {
    let dir = TempDir::new().unwrap();
    let (store, truth) = store_named(dir.path(), &["z", "vo", "t"], true);
    let server = serve(dir.path(), &store);
    let out = dir.path().join("tracks.csv");
    let run = track(&server, &out, &[]);
    assert!(run.status.success(), "{}", text(&run));
    let tracks = read_tracks_csv(&out).expect("our CSV reads back");
    let reference = read_reference(&truth, None).expect("the truth reads");
    let report = evaluate(&tracks, &reference, &EvalConfig::default()).unwrap();
    assert_eq!(
        (report.hits, report.misses, report.false_alarms),
        (2, 0, 0),
        "{report}"
    );
}

/// The `[detect]` names of `--config` are the ones asked for: names of the store's own work
/// (either ERA5 name), and a name the store lacks is refused naming the key and the name.
#[test]
fn the_detect_names_of_the_config_are_honoured() {
    let dir = TempDir::new().unwrap();
    let (store, _) = store_named(dir.path(), &["z", "vo"], true);
    let server = serve(dir.path(), &store);
    let config = dir.path().join("track.toml");
    std::fs::write(
        &config,
        "[detect]\nvorticity = \"vo\"\ngeopotential = \"geopotential\"\n",
    )
    .unwrap();
    let out = dir.path().join("tracks.csv");
    let run = track(&server, &out, &["--config", config.to_str().unwrap()]);
    assert!(run.status.success(), "{}", text(&run));
    assert!(
        String::from_utf8_lossy(&run.stdout).contains("2 tracks"),
        "{}",
        text(&run)
    );

    std::fs::write(&config, "[detect]\nvorticity = \"relvort\"\n").unwrap();
    let out = dir.path().join("none.csv");
    let run = track(&server, &out, &["--config", config.to_str().unwrap()]);
    assert_refused(
        &run,
        &out,
        &[
            "detect.vorticity",
            "no variable `relvort`",
            "geopotential, vorticity",
        ],
    );
}

#[test]
fn a_dataset_without_vorticity_is_refused_by_name() {
    let dir = TempDir::new().unwrap();
    let (store, _) = store(dir.path(), &["z", "t"]);
    let server = serve(dir.path(), &store);
    let out = dir.path().join("tracks.csv");
    let run = track(&server, &out, &[]);
    assert_refused(
        &run,
        &out,
        &[
            "detect.vorticity",
            "no variable `vo` nor its ERA5 aliases `vorticity`",
        ],
    );
}

#[test]
fn a_time_range_outside_the_dataset_is_a_clear_error() {
    let dir = TempDir::new().unwrap();
    let (store, _) = store(dir.path(), &["z", "vo"]);
    let server = serve(dir.path(), &store);
    let out = dir.path().join("tracks.csv");
    let run = track(
        &server,
        &out,
        &["--start", "2030-01-01", "--end", "2030-01-02"],
    );
    assert_refused(
        &run,
        &out,
        &["from 2030-01-01 to 2030-01-02", "invalid argument"],
    );
}
