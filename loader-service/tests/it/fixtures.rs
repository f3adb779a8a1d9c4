//! Interoperability with stores written by xarray + zarr-python: the fixture stores under
//! `tests/fixtures/` (see its README) must open with the right metadata, and every variable must
//! decode to exactly the values the Python side wrote to `expected/<store>/<var>.f32`, in the
//! canonical view (time, level, lat north→south, lon 0→360 east).

use std::path::{Path, PathBuf};

use atmorep_loader::progress::NoProgress;
use atmorep_loader::tools::inspect::inspect;
use atmorep_loader::{Dataset, Hyperslab, StoreError, Variable};
use serde_json::Value;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures");

/// Relative tolerance for the statistics (the Python side accumulates in f64 in another order).
const STATS_RTOL: f64 = 1e-6;

/// One fixture store and what the Python side says about it.
struct Fixture {
    name: &'static str,
    store: PathBuf,
    expected: Value,
}

impl Fixture {
    fn load(name: &'static str) -> Self {
        let root = Path::new(FIXTURES);
        let json_path = root.join("expected").join(format!("{name}.json"));
        let text = std::fs::read_to_string(&json_path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", json_path.display()));
        let expected: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{} is not JSON: {e}", json_path.display()));
        Self {
            name,
            store: root.join(format!("{name}.zarr")),
            expected,
        }
    }

    async fn open(&self) -> Dataset {
        let url = self.store.to_str().expect("fixture path is UTF-8");
        Dataset::open(url)
            .await
            .unwrap_or_else(|e| panic!("opening {}: {e}", self.name))
    }

    fn variables(&self) -> &serde_json::Map<String, Value> {
        self.expected["variables"]
            .as_object()
            .expect("`variables` is an object")
    }

    /// The expected canonical values of `var` (raw little-endian f32).
    fn values(&self, var: &str) -> Vec<f32> {
        let file = self.variables()[var]["file"]
            .as_str()
            .expect("`file` is a string");
        let path = Path::new(FIXTURES).join("expected").join(file);
        let bytes =
            std::fs::read(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        assert_eq!(bytes.len() % 4, 0, "{} is not whole f32s", path.display());
        bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect()
    }
}

fn f64s(value: &Value) -> Vec<f64> {
    value
        .as_array()
        .expect("an array")
        .iter()
        .map(|v| v.as_f64().expect("a number"))
        .collect()
}

fn u64s(value: &Value) -> Vec<u64> {
    value
        .as_array()
        .expect("an array")
        .iter()
        .map(|v| v.as_u64().expect("an unsigned integer"))
        .collect()
}

fn unix_seconds(iso: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(iso)
        .unwrap_or_else(|e| panic!("`{iso}` is not RFC 3339: {e}"))
        .timestamp()
}

/// numpy's name for a Zarr v2 dtype string (`<i2` → `int16`); v3 names pass through.
fn numpy_dtype(stored: &str) -> String {
    let code = stored.trim_start_matches(['<', '>', '|', '=']);
    match code {
        "f4" => "float32",
        "f8" => "float64",
        "i1" => "int8",
        "i2" => "int16",
        "i4" => "int32",
        "i8" => "int64",
        "u1" => "uint8",
        "u2" => "uint16",
        "u4" => "uint32",
        "u8" => "uint64",
        other => other,
    }
    .to_string()
}

/// Bitwise equality, except that any NaN equals any NaN (fill → NaN, payload irrelevant).
fn same_value(a: f32, b: f32) -> bool {
    (a.is_nan() && b.is_nan()) || a.to_bits() == b.to_bits()
}

/// Asserts two canonical buffers are identical, reporting the first differences precisely.
fn assert_same_values(actual: &[f32], expected: &[f32], what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}: number of values");
    let diffs: Vec<usize> = (0..actual.len())
        .filter(|&i| !same_value(actual[i], expected[i]))
        .collect();
    if diffs.is_empty() {
        return;
    }
    let details: Vec<String> = diffs
        .iter()
        .take(8)
        .map(|&i| {
            let (a, e) = (actual[i], expected[i]);
            let ulps = (i64::from(a.to_bits() as i32) - i64::from(e.to_bits() as i32)).abs();
            format!(
                "[{i}] actual {a:e} ({:#010x}) expected {e:e} ({:#010x}), {ulps} ulp apart",
                a.to_bits(),
                e.to_bits()
            )
        })
        .collect();
    panic!(
        "{what}: {} of {} values differ; first: \n  {}",
        diffs.len(),
        actual.len(),
        details.join("\n  ")
    );
}

fn assert_close(actual: f64, expected: f64, what: &str) {
    let tolerance = STATS_RTOL * expected.abs();
    assert!(
        (actual - expected).abs() <= tolerance,
        "{what}: actual {actual:e}, expected {expected:e} (relative tolerance {STATS_RTOL:e})"
    );
}

/// The part of a full canonical read (shape `full_shape`) that `slab` selects.
fn slice_of_full(full: &[f32], full_shape: [usize; 4], slab: &Hyperslab) -> Vec<f32> {
    let [_, nlev, nlat, nlon] = full_shape;
    let levels: Vec<usize> = if slab.levels.is_empty() {
        vec![0]
    } else {
        slab.levels.clone()
    };
    let mut out = Vec::with_capacity(slab.len());
    for t in slab.time.clone() {
        for &l in &levels {
            for y in slab.lat.clone() {
                for i in 0..slab.lon_len {
                    let x = (slab.lon_start + i) % nlon;
                    out.push(full[((t * nlev + l) * nlat + y) * nlon + x]);
                }
            }
        }
    }
    out
}

/// Windows that exercise the edges of the canonical grid for `variable`.
fn edge_slabs(dataset: &Dataset, variable: &Variable) -> Vec<(&'static str, Hyperslab)> {
    let full = Hyperslab::full(dataset, variable);
    let (nt, nlat, nlon) = (dataset.times.len(), dataset.lats.len(), dataset.lons.len());
    let reversed_levels: Vec<usize> = full.levels.iter().rev().copied().collect();
    vec![
        (
            "window wrapping across lon 0",
            Hyperslab {
                lon_start: nlon - 2,
                lon_len: 5,
                ..full.clone()
            },
        ),
        (
            "north pole row",
            Hyperslab {
                lat: 0..1,
                ..full.clone()
            },
        ),
        (
            "south pole row",
            Hyperslab {
                lat: nlat - 1..nlat,
                ..full.clone()
            },
        ),
        (
            "north pole, wrapping window, later times",
            Hyperslab {
                time: nt.saturating_sub(2)..nt,
                lat: 0..2,
                lon_start: nlon - 1,
                lon_len: 3,
                ..full.clone()
            },
        ),
        (
            "south pole, whole globe starting at the last longitude, levels reversed",
            Hyperslab {
                time: nt - 1..nt,
                levels: reversed_levels,
                lat: nlat - 2..nlat,
                lon_start: nlon - 1,
                lon_len: nlon,
                ..full.clone()
            },
        ),
        (
            "single point at lon 0 south pole",
            Hyperslab {
                time: 0..1,
                levels: full.levels.iter().take(1).copied().collect(),
                lat: nlat - 1..nlat,
                lon_start: 0,
                lon_len: 1,
                ..full
            },
        ),
    ]
}

async fn check_metadata(name: &'static str) {
    let fx = Fixture::load(name);
    let ds = fx.open().await;
    let exp = &fx.expected;

    assert_eq!(
        u64::from(ds.metadata.zarr_format),
        exp["zarr_format"].as_u64().unwrap(),
        "{name}: zarr_format"
    );
    assert_eq!(
        ds.metadata.consolidated,
        exp["consolidated"].as_bool().unwrap(),
        "{name}: consolidated"
    );

    let times: Vec<i64> = exp["times_utc"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| unix_seconds(t.as_str().unwrap()))
        .collect();
    assert_eq!(ds.times, times, "{name}: times");
    assert_eq!(
        ds.time_units,
        exp["time_units"].as_str().unwrap(),
        "{name}: time units"
    );

    assert_eq!(ds.lats, f64s(&exp["lats"]), "{name}: canonical lats");
    assert_eq!(ds.lons, f64s(&exp["lons"]), "{name}: canonical lons");
    assert_eq!(ds.lats.first(), Some(&90.0), "{name}: lats start north");

    // The canonical → store index maps point at the stored coordinates.
    let stored_lats = f64s(&exp["stored_lats"]);
    let stored_lons = f64s(&exp["stored_lons"]);
    assert_eq!(
        ds.lat_ascending,
        stored_lats[1] > stored_lats[0],
        "{name}: lat_ascending"
    );
    for (y, lat) in ds.lats.iter().enumerate() {
        assert_eq!(stored_lats[ds.store_lat(y)], *lat, "{name}: store_lat({y})");
    }
    for (x, lon) in ds.lons.iter().enumerate() {
        assert_eq!(
            stored_lons[ds.store_lon(x)].rem_euclid(360.0),
            *lon,
            "{name}: store_lon({x})"
        );
    }

    let levels = f64s(&exp["levels"]);
    let names: Vec<&String> = fx.variables().keys().collect();
    let mut have: Vec<&String> = ds.variables.keys().collect();
    have.sort();
    let mut want = names.clone();
    want.sort();
    assert_eq!(have, want, "{name}: variables");

    for (var, e) in fx.variables() {
        let v = &ds.variables[var];
        let has_level = e["has_level"].as_bool().unwrap();
        assert_eq!(v.has_level(), has_level, "{name}/{var}: has_level");
        if has_level {
            assert_eq!(v.levels, levels, "{name}/{var}: levels");
        } else {
            assert!(v.levels.is_empty(), "{name}/{var}: surface has no levels");
        }
        assert_eq!(
            numpy_dtype(&v.stored_dtype),
            e["stored_dtype"].as_str().unwrap(),
            "{name}/{var}: stored dtype (`{}`)",
            v.stored_dtype
        );
        assert_eq!(
            v.canonical_shape(&ds).iter().product::<usize>(),
            u64s(&e["canonical_shape"]).iter().product::<u64>() as usize,
            "{name}/{var}: canonical size"
        );
        match e.get("packing") {
            Some(p) if !p.is_null() => {
                assert_eq!(
                    v.packing.scale,
                    p["scale_factor"].as_f64().unwrap(),
                    "{name}/{var}: scale_factor"
                );
                assert_eq!(
                    v.packing.offset,
                    p["add_offset"].as_f64().unwrap(),
                    "{name}/{var}: add_offset"
                );
                let fill = p["_FillValue"].as_f64().unwrap();
                assert!(
                    v.packing.missing.contains(&fill),
                    "{name}/{var}: missing values {:?} lack _FillValue {fill}",
                    v.packing.missing
                );
            }
            _ => {
                assert_eq!(v.packing.scale, 1.0, "{name}/{var}: no scale");
                assert_eq!(v.packing.offset, 0.0, "{name}/{var}: no offset");
            }
        }
    }
}

async fn check_full_reads(name: &'static str) {
    let fx = Fixture::load(name);
    let ds = fx.open().await;
    for (var, e) in fx.variables() {
        let v = &ds.variables[var];
        let slab = Hyperslab::full(&ds, v);
        let shape: Vec<usize> = slab.shape().to_vec();
        let mut want_shape = u64s(&e["canonical_shape"]);
        if want_shape.len() == 3 {
            want_shape.insert(1, 1);
        }
        assert_eq!(
            shape,
            want_shape.iter().map(|&n| n as usize).collect::<Vec<_>>(),
            "{name}/{var}: canonical shape"
        );
        let values = ds
            .read(&slab)
            .await
            .unwrap_or_else(|err| panic!("{name}/{var}: full read: {err}"));
        let expected = fx.values(var);
        assert_same_values(&values, &expected, &format!("{name}/{var}: full read"));
        let nan = values.iter().filter(|v| v.is_nan()).count() as u64;
        assert_eq!(
            nan,
            e["nan_count"].as_u64().unwrap(),
            "{name}/{var}: NaN count"
        );
    }
}

async fn check_spots(name: &'static str) {
    let fx = Fixture::load(name);
    let ds = fx.open().await;
    for (var, e) in fx.variables() {
        let v = &ds.variables[var];
        let full_slab = Hyperslab::full(&ds, v);
        let shape = full_slab.shape();
        let full = ds.read(&full_slab).await.unwrap();
        let spots = e["spot"].as_array().unwrap();
        assert!(!spots.is_empty(), "{name}/{var}: no spot checks");
        for spot in spots {
            let t = spot["time_index"].as_u64().unwrap() as usize;
            assert_eq!(
                ds.times[t],
                unix_seconds(spot["time_utc"].as_str().unwrap()),
                "{name}/{var}: spot time {spot}"
            );
            let level = spot["level_index"].as_u64().map(|l| l as usize);
            assert_eq!(level.is_some(), v.has_level(), "{name}/{var}: spot {spot}");
            if let Some(l) = level {
                assert_eq!(
                    v.levels[l],
                    spot["level"].as_f64().unwrap(),
                    "{name}/{var}: spot level {spot}"
                );
            }
            let lat = spot["lat"].as_f64().unwrap();
            let lon = spot["lon"].as_f64().unwrap();
            let y = ds
                .lats
                .iter()
                .position(|&l| l == lat)
                .unwrap_or_else(|| panic!("{name}: no latitude {lat}"));
            let x = ds
                .lons
                .iter()
                .position(|&l| l == lon)
                .unwrap_or_else(|| panic!("{name}: no longitude {lon}"));
            let stored_lons = f64s(&fx.expected["stored_lons"]);
            assert_eq!(
                stored_lons[ds.store_lon(x)],
                spot["stored_lon"].as_f64().unwrap(),
                "{name}/{var}: stored longitude of spot {spot}"
            );
            let want = spot["value"].as_f64().map_or(f32::NAN, |v| v as f32);

            let l = level.unwrap_or(0);
            let from_full = full[((t * shape[1] + l) * shape[2] + y) * shape[3] + x];
            assert!(
                same_value(from_full, want),
                "{name}/{var}: full read has {from_full:e} at spot {spot}"
            );

            let point = Hyperslab {
                variable: var.clone(),
                time: t..t + 1,
                levels: level.into_iter().collect(),
                lat: y..y + 1,
                lon_start: x,
                lon_len: 1,
            };
            let got = ds.read(&point).await.unwrap();
            assert_eq!(got.len(), 1);
            assert!(
                same_value(got[0], want),
                "{name}/{var}: point read gives {:e} at spot {spot}",
                got[0]
            );
        }
    }
}

async fn check_inspect_stats(name: &'static str) {
    let fx = Fixture::load(name);
    let ds = fx.open().await;
    let report = inspect(&ds, true, &NoProgress)
        .await
        .unwrap_or_else(|e| panic!("{name}: inspect: {e}"));
    let exp = &fx.expected;
    assert_eq!(
        u64::from(report.zarr_format),
        exp["zarr_format"].as_u64().unwrap()
    );
    assert_eq!(report.consolidated, exp["consolidated"].as_bool().unwrap());
    assert_eq!(
        report.time.steps,
        exp["times_utc"].as_array().unwrap().len()
    );
    assert_eq!(report.grid.nlat, ds.lats.len());
    assert_eq!(report.grid.nlon, ds.lons.len());
    assert_eq!(report.variables.len(), fx.variables().len());

    for (var, e) in fx.variables() {
        let info = report
            .variables
            .iter()
            .find(|v| &v.name == var)
            .unwrap_or_else(|| panic!("{name}: inspect lacks {var}"));
        let what = format!("{name}/{var}");
        if e["has_level"].as_bool().unwrap() {
            assert_eq!(info.levels, f64s(&exp["levels"]), "{what}: levels");
        }
        let stats = info.stats.unwrap_or_else(|| panic!("{what}: no stats"));
        assert_eq!(stats.count, e["count"].as_u64().unwrap(), "{what}: count");
        assert_eq!(
            stats.missing,
            e["nan_count"].as_u64().unwrap(),
            "{what}: missing"
        );
        assert_close(
            stats.mean,
            e["mean"].as_f64().unwrap(),
            &format!("{what}: mean"),
        );
        assert_close(
            stats.std(),
            e["std"].as_f64().unwrap(),
            &format!("{what}: std"),
        );
        assert_close(
            stats.min,
            e["min"].as_f64().unwrap(),
            &format!("{what}: min"),
        );
        assert_close(
            stats.max,
            e["max"].as_f64().unwrap(),
            &format!("{what}: max"),
        );

        // The array itself: dims, shape and (outer) chunk shape as stored.
        let array = report
            .arrays
            .iter()
            .find(|a| &a.name == var)
            .unwrap_or_else(|| panic!("{what}: inspect lists no array"));
        let dims: Vec<String> = e["stored_dims"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_str().unwrap().to_string())
            .collect();
        assert_eq!(array.dims.as_ref(), Some(&dims), "{what}: dims");
        assert_eq!(array.shape, u64s(&e["stored_shape"]), "{what}: shape");
        let outer = if e["stored_shards"].is_null() {
            &e["stored_chunks"]
        } else {
            &e["stored_shards"]
        };
        assert_eq!(array.chunks, u64s(outer), "{what}: chunks");
    }
}

async fn check_edge_hyperslabs(name: &'static str) {
    let fx = Fixture::load(name);
    let ds = fx.open().await;
    for var in fx.variables().keys() {
        let v = &ds.variables[var];
        let full_slab = Hyperslab::full(&ds, v);
        let full = ds.read(&full_slab).await.unwrap();
        let expected_full = fx.values(var);
        for (label, slab) in edge_slabs(&ds, v) {
            let what = format!("{name}/{var}: {label} {slab:?}");
            let got = ds
                .read(&slab)
                .await
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(got.len(), slab.len(), "{what}: length");
            let want = slice_of_full(&full, full_slab.shape(), &slab);
            assert_same_values(&got, &want, &what);
            // And against the Python values directly.
            let want = slice_of_full(&expected_full, full_slab.shape(), &slab);
            assert_same_values(&got, &want, &format!("{what} (vs expected file)"));
        }
        // A fresh dataset (cold cache) reads the same windows identically.
        let cold = fx.open().await;
        for (label, slab) in edge_slabs(&cold, v) {
            let got = cold.read(&slab).await.unwrap();
            let want = slice_of_full(&full, full_slab.shape(), &slab);
            assert_same_values(&got, &want, &format!("{name}/{var}: cold {label}"));
        }
    }
}

macro_rules! fixture_tests {
    ($($store:ident),* $(,)?) => {
        $(
            mod $store {
                #[tokio::test]
                async fn metadata() {
                    super::check_metadata(stringify!($store)).await;
                }

                #[tokio::test]
                async fn full_reads_equal_expected_files() {
                    super::check_full_reads(stringify!($store)).await;
                }

                #[tokio::test]
                async fn spot_checks() {
                    super::check_spots(stringify!($store)).await;
                }

                #[tokio::test]
                async fn inspect_stats() {
                    super::check_inspect_stats(stringify!($store)).await;
                }

                #[tokio::test]
                async fn edge_hyperslabs_equal_full_read() {
                    super::check_edge_hyperslabs(stringify!($store)).await;
                }
            }
        )*
    };
}

fixture_tests!(xr_v2_packed, xr_v3_sharded, xr_v2_gzip);

#[tokio::test]
async fn a_folder_without_zarr_metadata_is_not_a_zarr_store() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("readme.txt"), "not a store").unwrap();
    std::fs::create_dir(dir.path().join("t")).unwrap();
    std::fs::write(dir.path().join("t/0.0.0"), [0u8; 16]).unwrap();
    let url = dir.path().to_str().unwrap();
    match Dataset::open(url).await {
        Err(StoreError::NotAZarrStore { url: named }) => assert_eq!(named, url),
        other => panic!("expected NotAZarrStore, got {other:?}"),
    }

    // The fixtures' `expected/` folder (JSON files, no Zarr metadata) is not one either.
    let expected = format!("{FIXTURES}/expected");
    let err = Dataset::open(&expected).await.unwrap_err();
    assert!(
        matches!(err, StoreError::NotAZarrStore { .. }),
        "expected NotAZarrStore, got {err:?}"
    );
    assert!(err.to_string().contains(&expected), "message: {err}");
}

#[tokio::test]
async fn an_unknown_variable_is_named_in_the_error() {
    let fx = Fixture::load("xr_v2_packed");
    let ds = fx.open().await;
    let err = ds.variable("no_such_var").unwrap_err();
    match &err {
        StoreError::UnknownVariable {
            name, available, ..
        } => {
            assert_eq!(name, "no_such_var");
            for var in fx.variables().keys() {
                assert!(available.contains(var.as_str()), "available: {available}");
            }
        }
        other => panic!("expected UnknownVariable, got {other:?}"),
    }
    assert!(err.to_string().contains("no_such_var"), "message: {err}");

    let slab = Hyperslab {
        variable: "no_such_var".into(),
        ..Hyperslab::full(&ds, &ds.variables["t"])
    };
    let err = ds.read(&slab).await.unwrap_err();
    assert!(
        matches!(&err, StoreError::UnknownVariable { name, .. } if name == "no_such_var"),
        "expected UnknownVariable, got {err:?}"
    );
    assert!(err.to_string().contains("no_such_var"), "message: {err}");
}
