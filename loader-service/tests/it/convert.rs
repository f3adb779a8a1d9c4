//! `convert` on real ERA5 samples (cfgrib's GRIB1 messages, their GRIB2 re-encoding, and the
//! NetCDF4 and int16-packed NetCDF3 files xarray wrote from them; `tests/data/era5/`): every
//! converted store, read back through the loader's canonical view, holds exactly the float32
//! values xarray reads from the same file (`reference.json`); many files go into one store in
//! time order; `--append` extends a store; bad input (a corrupt GRIB, a missing variable, grids
//! that differ, overlapping times, a reduced Gaussian grid, an ensemble without `--member`) is
//! refused naming the file, and leaves no store (nor a temporary sibling) behind.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use atmorep_loader::Dataset;
use atmorep_loader::Hyperslab;
use atmorep_loader::convert::{ConvertError, ConvertOptions, Selection, convert};
use atmorep_loader::progress::NoProgress;
use serde_json::Value;

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/data/era5")
        .join(name)
}

fn reference() -> Value {
    let text = std::fs::read_to_string(data("reference.json")).expect("reference.json");
    serde_json::from_str(&text).expect("reference JSON")
}

fn member(m: Option<i64>) -> ConvertOptions {
    ConvertOptions {
        selection: Selection {
            variables: Vec::new(),
            member: m,
        },
        ..ConvertOptions::default()
    }
}

fn run(inputs: &[&str], out: &Path, options: &ConvertOptions) -> Result<(), ConvertError> {
    let inputs: Vec<PathBuf> = inputs.iter().map(|n| data(n)).collect();
    convert(&inputs, out, options, &NoProgress).map(drop)
}

/// Everything in `dir` other than the store itself: a failed run must leave nothing.
fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

/// Checks variable `name` of the store at `out`, times `[t0, t0 + n)`, against xarray's
/// reading `want` of one file.
async fn assert_equal_to_xarray(out: &Path, name: &str, t0: usize, want: &Value) {
    let ds = Dataset::open(out.to_str().unwrap()).await.unwrap();
    let var = ds.variable(name).unwrap();
    let shape: Vec<usize> = serde_json::from_value(want["shape"].clone()).unwrap();
    let times: Vec<i64> = serde_json::from_value(want["times"].clone()).unwrap();
    let levels: Vec<f64> = serde_json::from_value(want["levels"].clone()).unwrap();
    assert_eq!(
        &ds.times[t0..t0 + shape[0]],
        times.as_slice(),
        "{name} times"
    );
    assert_eq!(var.levels, levels, "{name} levels");
    assert_eq!((ds.lats.len(), ds.lons.len()), (shape[2], shape[3]));
    assert_eq!([ds.lats[0], ds.lats[shape[2] - 1]], [90.0, -90.0]);
    assert_eq!([ds.lons[0], ds.lons[shape[3] - 1]], [0.0, 357.0]);
    assert_eq!(var.units.as_deref(), want["units"].as_str());
    let mut slab = Hyperslab::full(&ds, var);
    slab.time = t0..t0 + shape[0];
    let got = ds.read(&slab).await.unwrap();
    let bytes: Vec<u8> = got.iter().flat_map(|v| v.to_le_bytes()).collect();
    let first: Vec<f64> = serde_json::from_value(want["first"].clone()).unwrap();
    let got_first: Vec<f64> = got[..4].iter().map(|v| f64::from(*v)).collect();
    assert_eq!(got_first, first, "{name}: first values");
    let nan = got.iter().filter(|v| v.is_nan()).count();
    assert_eq!(
        nan as u64,
        want["nan_count"].as_u64().unwrap(),
        "{name}: NaNs"
    );
    let sum: f64 = got
        .iter()
        .filter(|v| !v.is_nan())
        .map(|v| f64::from(*v))
        .sum();
    let want_sum = want["sum_f64"].as_f64().unwrap();
    assert!(
        (sum - want_sum).abs() <= 1e-9 * want_sum.abs(),
        "{name}: sum {sum} vs {want_sum}"
    );
    assert_eq!(
        u64::from(crc32fast::hash(&bytes)),
        want["crc32"].as_u64().unwrap(),
        "{name}: the values differ from xarray's"
    );
}

async fn assert_file(out: &Path, t0: usize, want: &Value) {
    let vars: BTreeMap<String, Value> = serde_json::from_value(want.clone()).unwrap();
    for (name, v) in &vars {
        assert_equal_to_xarray(out, name, t0, v).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_sample_converts_to_what_xarray_reads() {
    let dir = tempfile::tempdir().unwrap();
    let reference = reference();
    for (file, key, m) in [
        ("era5-pl-a.grib", "era5-pl-a.grib#member0", Some(0)),
        ("era5-pl-b.grib", "era5-pl-b.grib#member0", None),
        ("era5-pl-a0.grib2", "era5-pl-a0.grib2#member0", None),
        ("era5-pl.nc", "era5-pl.nc", None),
        ("era5-pl-legacy.nc", "era5-pl-legacy.nc", None),
    ] {
        let out = dir.path().join(format!("{file}.zarr"));
        run(&[file], &out, &member(m)).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_file(&out, 0, &reference[key]).await;
    }
    // The packed NetCDF3 has missing points: xarray's NaNs, where _FillValue was stored.
    assert_eq!(reference["era5-pl-legacy.nc"]["t"]["nan_count"], 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_in_any_order_make_one_store_in_time_order() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("era5.zarr");
    let mut options = member(Some(0));
    options.chunks = Some([3, 1, 30, 120]);
    options.codec = "blosc-zstd".parse().unwrap();
    let inputs = [data("era5-pl-b.grib"), data("era5-pl-a.grib")];
    let progress = Steps::default();
    let report = convert(&inputs, &out, &options, &progress).unwrap();
    // One progress step per variable and time, as the bar's total said.
    let steps = progress.0.lock().unwrap().clone();
    assert_eq!(steps, (Some(("convert".to_string(), 8)), 8, true));
    assert_eq!(
        (report.files, report.new_steps, report.total_steps),
        (2, 4, 4)
    );
    assert_eq!(report.value_bytes, 2 * 4 * 2 * 61 * 120 * 4);
    assert!(report.throughput_mb_s() > 0.0);
    let reference = reference();
    assert_file(&out, 0, &reference["era5-pl-a.grib#member0"]).await;
    assert_file(&out, 2, &reference["era5-pl-b.grib#member0"]).await;
    let ds = Dataset::open(out.to_str().unwrap()).await.unwrap();
    assert_eq!(ds.times.len(), 4);
    assert_eq!(ds.variable("t").unwrap().chunk_shape(), vec![3, 1, 30, 120]);
    assert_eq!(ds.metadata.zarr_format, 3);
    assert!(ds.metadata.consolidated, "inline consolidated metadata");
    assert_eq!(leftovers(dir.path()), vec!["era5.zarr"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn append_extends_the_store_and_a_failed_append_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("era5.zarr");
    let options = member(Some(0));
    run(&["era5-pl-a.grib"], &out, &options).unwrap();
    let before = snapshot(&out);
    let append = ConvertOptions {
        append: true,
        ..options.clone()
    };
    for (bad, says) in [
        (&["era5-pl-a0.grib2"][..], "not after the store's last time"),
        (&["era5-levels-corrupted.grib"][..], "GRIB message 1"),
        (&["era5-pl-nh.nc"][..], "another grid"),
    ] {
        let err = run(bad, &out, &append).unwrap_err().to_string();
        assert!(err.contains(says) && err.contains(bad[0]), "{err}");
        assert_eq!(
            snapshot(&out),
            before,
            "a failed append of {bad:?} changed the store"
        );
        assert_eq!(leftovers(dir.path()), vec!["era5.zarr"]);
    }
    run(&["era5-pl-b.grib"], &out, &append).unwrap();
    let reference = reference();
    assert_file(&out, 0, &reference["era5-pl-a.grib#member0"]).await;
    assert_file(&out, 2, &reference["era5-pl-b.grib#member0"]).await;
    assert_eq!(leftovers(dir.path()), vec!["era5.zarr"]);
    // NetCDF data appends to a GRIB-made store like any other.
    let nc_out = dir.path().join("nc.zarr");
    run(&["era5-pl-legacy.nc"], &nc_out, &member(None)).unwrap();
    let err = run(
        &["era5-pl.nc"],
        &nc_out,
        &ConvertOptions {
            append: true,
            ..member(None)
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("not after"), "{err}");
}

/// Records what a job reports: (its start, steps advanced, finished).
#[derive(Debug, Default)]
#[allow(clippy::type_complexity)]
struct Steps(std::sync::Mutex<(Option<(String, u64)>, u64, bool)>);

impl atmorep_loader::progress::Progress for Steps {
    fn start(&self, what: &str, total: u64) {
        self.0.lock().unwrap().0 = Some((what.to_string(), total));
    }
    fn advance(&self, steps: u64) {
        self.0.lock().unwrap().1 += steps;
    }
    fn finish(&self) {
        self.0.lock().unwrap().2 = true;
    }
}

/// Every file of a store with its bytes.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.insert(p.clone(), std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

#[test]
fn bad_input_is_refused_naming_the_file_and_leaves_no_store() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bad.zarr");
    let cases: [(&[&str], ConvertOptions, &[&str]); 7] = [
        (
            &["era5-levels-corrupted.grib"],
            member(None),
            &[
                "era5-levels-corrupted.grib",
                "GRIB message 1",
                "truncated or corrupt",
            ],
        ),
        (
            &["era5-pl.nc"],
            ConvertOptions {
                selection: Selection {
                    variables: vec!["t".into(), "q".into()],
                    member: None,
                },
                ..member(None)
            },
            &["era5-pl.nc", "no variable `q`", "t, z"],
        ),
        (
            &["era5-pl.nc", "era5-pl-nh.nc"],
            member(None),
            &[
                "era5-pl.nc",
                "era5-pl-nh.nc",
                "grids differ",
                "61 × 120",
                "31 × 120",
            ],
        ),
        (
            &["era5-pl-legacy.nc", "era5-pl.nc"],
            member(None),
            &[
                "era5-pl-legacy.nc",
                "era5-pl.nc",
                "overlap",
                "2017-01-01T00:00:00Z",
            ],
        ),
        (
            &["reduced_gg.grib"],
            member(None),
            &["reduced_gg.grib", "message 1", "reduced Gaussian grid"],
        ),
        (
            &["era5-pl-a.grib"],
            member(None),
            &["era5-pl-a.grib", "2 ensemble members (0, 1)", "--member"],
        ),
        (
            &["era5-pl-b.grib"],
            member(Some(4)),
            &["era5-pl-b.grib", "no member 4 (members: 0)"],
        ),
    ];
    for (inputs, options, says) in cases {
        let err = run(inputs, &out, &options).unwrap_err().to_string();
        for s in says {
            assert!(err.contains(s), "{inputs:?}: `{err}` lacks `{s}`");
        }
        assert!(
            leftovers(dir.path()).is_empty(),
            "{inputs:?} left {:?}",
            leftovers(dir.path())
        );
    }
    // A failed conversion over an existing store leaves that store as it was.
    run(&["era5-pl-legacy.nc"], &out, &member(None)).unwrap();
    let before = snapshot(&out);
    run(&["era5-levels-corrupted.grib"], &out, &member(None)).unwrap_err();
    assert_eq!(snapshot(&out), before);
    assert_eq!(leftovers(dir.path()), vec!["bad.zarr"]);
}

/// A single-level field (ERA5 2 m temperature on a regional 0.25° grid): the converted array,
/// read raw in file order, is xarray's reading; its name is cfgrib's (`t2m`, not ecCodes' `2t`).
#[test]
fn a_single_level_grib_field_converts_to_what_xarray_reads() {
    use std::sync::Arc;
    use zarrs::array::{Array, ArraySubset};
    use zarrs::filesystem::FilesystemStore;

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("t2m.zarr");
    run(&["era5-single-level-scalar-time.grib"], &out, &member(None)).unwrap();
    let want = &reference()["era5-single-level-scalar-time.grib#member0"]["t2m"];
    let store = Arc::new(FilesystemStore::new(&out).unwrap());
    let read = |name: &str| -> (Vec<u64>, Vec<f64>) {
        let a = Array::open(store.clone(), &format!("/{name}")).unwrap();
        let subset = ArraySubset::new_with_shape(a.shape().to_vec());
        (
            a.shape().to_vec(),
            a.retrieve_array_subset(&subset).unwrap(),
        )
    };
    let (_, lats) = read("latitude");
    let (_, lons) = read("longitude");
    assert_eq!([lats[0], lats[lats.len() - 1]], [60.0, 30.0]);
    assert_eq!([lons[0], lons[lons.len() - 1]], [-10.0, 40.0]);
    let t2m = Array::open(store.clone(), "/t2m").unwrap();
    assert_eq!(t2m.shape(), &[1, 121, 201]);
    let values: Vec<f32> = t2m
        .retrieve_array_subset(&ArraySubset::new_with_shape(vec![1, 121, 201]))
        .unwrap();
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    assert_eq!(
        u64::from(crc32fast::hash(&bytes)),
        want["crc32"].as_u64().unwrap()
    );
    let time = Array::open(store, "/time").unwrap();
    let times: Vec<i64> = time
        .retrieve_array_subset(&ArraySubset::new_with_shape(vec![1]))
        .unwrap();
    assert_eq!(times, vec![want["times"][0].as_i64().unwrap()]);
}
