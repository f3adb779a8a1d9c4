//! Global statistics equal an f64 reference computed from the fixtures' expected values, survive
//! a Parquet round trip, and are not recomputed for the same store.

use std::path::PathBuf;

use atmorep_loader::Dataset;
use atmorep_loader::pipeline::normalization::{GLOBAL_FILE, GlobalStats, year_month};
use atmorep_loader::progress::NoProgress;

fn fixtures() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures"))
}

fn expected_values(store: &str, var: &str) -> Vec<f32> {
    let path = fixtures()
        .join("expected")
        .join(store)
        .join(format!("{var}.f32"));
    std::fs::read(path)
        .unwrap()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_stats_equal_an_f64_reference_and_round_trip() {
    for store in ["xr_v2_packed", "xr_v3_sharded", "xr_v2_gzip"] {
        let path = fixtures().join(format!("{store}.zarr"));
        let dataset = Dataset::open(path.to_str().unwrap()).await.unwrap();
        let stats = GlobalStats::compute(&dataset, None, &NoProgress)
            .await
            .unwrap();
        let plane = dataset.lats.len() * dataset.lons.len();
        let mut checked = 0;
        for (name, variable) in &dataset.variables {
            let values = expected_values(store, name);
            let levels: Vec<f64> = if variable.levels.is_empty() {
                vec![0.0]
            } else {
                variable.levels.clone()
            };
            // Group the planes of each (level, year, month) and compute in f64.
            for (l, &level) in levels.iter().enumerate() {
                let mut months: std::collections::BTreeMap<(i32, u32), Vec<f64>> =
                    Default::default();
                for (t, &unix) in dataset.times.iter().enumerate() {
                    let start = (t * levels.len() + l) * plane;
                    months.entry(year_month(unix)).or_default().extend(
                        values[start..start + plane]
                            .iter()
                            .filter(|v| !v.is_nan())
                            .map(|&v| v as f64),
                    );
                }
                for ((year, month), vals) in months {
                    let got = stats.get(name, level, year, month).expect("entry");
                    let n = vals.len() as f64;
                    let mean = vals.iter().sum::<f64>() / n;
                    let std = (vals.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n).sqrt();
                    assert_eq!(
                        got.count,
                        vals.len() as u64,
                        "{store} {name} {level} {year}-{month}"
                    );
                    assert!(
                        (got.mean - mean).abs() <= 1e-12 * mean.abs().max(1e-30),
                        "{store} {name} mean"
                    );
                    assert!(
                        (got.std() - std).abs() <= 1e-9 * std.max(1e-30),
                        "{store} {name} std"
                    );
                    let min = vals.iter().copied().fold(f64::INFINITY, f64::min);
                    assert_eq!(got.min, min);
                    checked += 1;
                }
            }
        }
        assert!(checked > 0);

        let dir = tempfile::tempdir().unwrap();
        let (_, computed) = GlobalStats::compute_into(&dataset, dir.path(), false, &NoProgress)
            .await
            .unwrap();
        assert!(computed);
        let modified = std::fs::metadata(dir.path().join(GLOBAL_FILE))
            .unwrap()
            .modified()
            .unwrap();
        let (again, computed) = GlobalStats::compute_into(&dataset, dir.path(), false, &NoProgress)
            .await
            .unwrap();
        assert!(!computed, "a rerun on the same store is a no-op");
        assert_eq!(
            modified,
            std::fs::metadata(dir.path().join(GLOBAL_FILE))
                .unwrap()
                .modified()
                .unwrap()
        );
        let original: Vec<_> = stats
            .iter()
            .map(|r| {
                (
                    r.0.to_string(),
                    r.1,
                    r.2,
                    r.3,
                    r.4.count,
                    r.4.mean,
                    r.4.min,
                    r.4.max,
                )
            })
            .collect();
        let loaded: Vec<_> = again
            .iter()
            .map(|r| {
                (
                    r.0.to_string(),
                    r.1,
                    r.2,
                    r.3,
                    r.4.count,
                    r.4.mean,
                    r.4.min,
                    r.4.max,
                )
            })
            .collect();
        assert_eq!(original, loaded);
        for ((_, _, _, _, a), (_, _, _, _, b)) in stats.iter().zip(again.iter()).map(|(a, b)| {
            (
                (a.0, a.1, a.2, a.3, a.4.std()),
                (b.0, b.1, b.2, b.3, b.4.std()),
            )
        }) {
            assert!((a - b).abs() <= 1e-12 * a.abs().max(1e-30));
        }
        let (_, computed) = GlobalStats::compute_into(&dataset, dir.path(), true, &NoProgress)
            .await
            .unwrap();
        assert!(computed, "--force recomputes");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_stats_equal_a_per_point_f64_reference_and_round_trip_through_zarr() {
    use atmorep_loader::pipeline::normalization::LocalStats;
    for store in ["xr_v2_gzip", "xr_v2_packed"] {
        let path = fixtures().join(format!("{store}.zarr"));
        let dataset = Dataset::open(path.to_str().unwrap()).await.unwrap();
        let local = LocalStats::compute(&dataset, &[], &NoProgress)
            .await
            .unwrap();
        let plane = dataset.lats.len() * dataset.lons.len();
        for (name, variable) in &dataset.variables {
            let values = expected_values(store, name);
            let nl = variable.levels.len().max(1);
            let field = &local.fields[name];
            for month in 1..=12u32 {
                for l in 0..nl {
                    let steps: Vec<usize> = (0..dataset.times.len())
                        .filter(|&t| year_month(dataset.times[t]).1 == month)
                        .collect();
                    for p in 0..plane {
                        let i = ((month as usize - 1) * nl + l) * plane + p;
                        let xs: Vec<f64> = steps
                            .iter()
                            .map(|&t| values[(t * nl + l) * plane + p] as f64)
                            .collect();
                        if xs.is_empty() {
                            assert!(field.mean[i].is_nan() && field.std[i].is_nan());
                            continue;
                        }
                        let n = xs.len() as f64;
                        let mean = xs.iter().sum::<f64>() / n;
                        let std = (xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n).sqrt();
                        if mean.is_nan() {
                            // A point with a fill value in that month has no statistics.
                            assert!(field.mean[i].is_nan(), "{store} {name}");
                            continue;
                        }
                        assert!(
                            (field.mean[i] as f64 - mean).abs() <= 1e-6 * mean.abs().max(1e-12),
                            "{store} {name} mean"
                        );
                        assert!(
                            (field.std[i] as f64 - std).abs()
                                <= 1e-5 * std.max(mean.abs() * 1e-6).max(1e-12),
                            "{store} {name} std"
                        );
                    }
                }
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("local_stats.zarr");
        local.write(&out).unwrap();
        let loaded = LocalStats::load(&out).unwrap();
        assert_eq!(loaded.fields.len(), local.fields.len());
        for (name, field) in &local.fields {
            let other = &loaded.fields[name];
            assert_eq!(other.levels, field.levels);
            for (a, b) in field
                .mean
                .iter()
                .zip(&other.mean)
                .chain(field.std.iter().zip(&other.std))
            {
                assert!(a.to_bits() == b.to_bits(), "{name}");
            }
        }
    }
}
