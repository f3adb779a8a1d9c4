//! Global normalization statistics: per field, level and calendar month (year, month), the
//! count, mean, standard deviation, minimum and maximum over the globe, computed in one parallel
//! streaming pass (f64 accumulation, Chan merge), kept beside the store as Parquet, and applied
//! to windows as `(x − mean) / std` for the month each time step falls in.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::{Array as _, Float64Array, Int32Array, StringArray, UInt64Array};
use arrow_schema::{DataType as ArrowType, Field, Schema};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::subset::{Coverage, StatsSubset};
use super::{Moments, NormalizationError, statistics_levels, year_month};
use crate::error::{Result, StoreError};
use crate::progress::Progress;
use crate::store::dataset::Dataset;
use crate::store::hyperslab::Hyperslab;
use crate::store::table::write_parquet;

/// File name of the global statistics table inside a statistics folder.
pub const GLOBAL_FILE: &str = "global_stats.parquet";
const MANIFEST_FILE: &str = "manifest.json";

/// (field, level value as f64 bits, year, month).
type Key = (String, u64, i32, u32);

/// Global statistics of a store.
#[derive(Debug, Clone, Default)]
pub struct GlobalStats {
    entries: BTreeMap<Key, Moments>,
    /// What the table was computed from, when known (tables from before subsets were
    /// possible have no record of it).
    coverage: Option<Coverage>,
}

/// What a statistics folder was computed from; a rerun on the same store is a no-op.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Manifest {
    store: String,
    first_time: i64,
    last_time: i64,
    steps: usize,
    variables: Vec<String>,
    /// The subset asked for; absent in folders written before subsets existed (all of it).
    #[serde(default)]
    subset: StatsSubset,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    coverage: Option<Coverage>,
}

impl GlobalStats {
    /// Computes the statistics of every variable (or of `only`), reporting the time steps read
    /// to `progress`.
    pub async fn compute(
        dataset: &Dataset,
        only: Option<&[String]>,
        progress: &dyn Progress,
    ) -> Result<Self> {
        let subset = StatsSubset {
            variables: only.map(<[String]>::to_vec).unwrap_or_default(),
            ..StatsSubset::default()
        };
        Self::compute_subset(dataset, &subset, progress).await
    }

    /// Computes the statistics of `subset` of `dataset`, reporting the time steps read to
    /// `progress`. Only the chunks that hold a step of the subset are read: with one step per
    /// time chunk (ARCO-ERA5, WeatherBench2), every K-th step costs 1/K of a full pass.
    pub async fn compute_subset(
        dataset: &Dataset,
        subset: &StatsSubset,
        progress: &dyn Progress,
    ) -> Result<Self> {
        let resolved = subset.resolve(dataset)?;
        progress.start(
            "stats",
            (resolved.variables.len() * resolved.steps.len()) as u64,
        );
        let mut entries: BTreeMap<Key, Moments> = BTreeMap::new();
        let mut buffer = Vec::new();
        let nplane = dataset.lats.len() * dataset.lons.len();
        for (name, level_indices) in &resolved.variables {
            let variable = dataset.variable(name)?;
            let all_levels = statistics_levels(variable);
            let levels: Vec<f64> = if level_indices.is_empty() {
                all_levels
            } else {
                level_indices.iter().map(|&i| all_levels[i]).collect()
            };
            let full = Hyperslab::full(dataset, variable);
            let mut next = 0;
            for block in variable.time_blocks(dataset.times.len()) {
                let first = next;
                while next < resolved.steps.len() && resolved.steps[next] < block.end {
                    next += 1;
                }
                let steps = &resolved.steps[first..next];
                let (Some(&lo), Some(&hi)) = (steps.first(), steps.last()) else {
                    continue;
                };
                let slab = Hyperslab {
                    time: lo..hi + 1,
                    levels: level_indices.clone(),
                    ..full.clone()
                };
                buffer = dataset
                    .read_into(&slab, std::mem::take(&mut buffer))
                    .await?;
                let per_step = levels.len() * nplane;
                let planes: Vec<(usize, usize, Moments)> = steps
                    .par_iter()
                    .flat_map(|&step| {
                        let at = (step - lo) * per_step;
                        let buffer = &buffer;
                        (0..levels.len()).into_par_iter().map(move |l| {
                            let plane = &buffer[at + l * nplane..at + (l + 1) * nplane];
                            (step, l, Moments::from_values(plane))
                        })
                    })
                    .collect();
                for (step, level, m) in planes {
                    let (year, month) = year_month(dataset.times[step]);
                    let key = (name.clone(), levels[level].to_bits(), year, month);
                    let entry = entries.entry(key).or_default();
                    *entry = entry.merge(m);
                }
                progress.advance(steps.len() as u64);
            }
        }
        progress.finish();
        Ok(Self {
            entries,
            coverage: Some(resolved.coverage(dataset, subset)),
        })
    }

    /// What the statistics were computed from, when the folder recorded it.
    pub fn coverage(&self) -> Option<&Coverage> {
        self.coverage.as_ref()
    }

    /// Computes and writes the statistics of `dataset` into `dir`, unless `dir` already holds
    /// statistics of the same store (then it loads them); `force` recomputes.
    pub async fn compute_into(
        dataset: &Dataset,
        dir: &Path,
        force: bool,
        progress: &dyn Progress,
    ) -> Result<(Self, bool)> {
        Self::compute_subset_into(dataset, dir, force, &StatsSubset::default(), progress).await
    }

    /// [`GlobalStats::compute_into`] for `subset` of `dataset`; a folder computed from another
    /// subset is recomputed.
    pub async fn compute_subset_into(
        dataset: &Dataset,
        dir: &Path,
        force: bool,
        subset: &StatsSubset,
        progress: &dyn Progress,
    ) -> Result<(Self, bool)> {
        let mut manifest = Manifest {
            store: dataset.url().to_string(),
            first_time: dataset.times[0],
            last_time: dataset.times[dataset.times.len() - 1],
            steps: dataset.times.len(),
            variables: dataset.variables.keys().cloned().collect(),
            subset: StatsSubset {
                every_steps: subset.every_steps.max(1),
                ..subset.clone()
            },
            coverage: None,
        };
        let manifest_path = dir.join(MANIFEST_FILE);
        if !force
            && let Ok(text) = std::fs::read_to_string(&manifest_path)
            && let Ok(old) = serde_json::from_str::<Manifest>(&text)
            && (Manifest {
                coverage: None,
                ..old
            }) == manifest
            && dir.join(GLOBAL_FILE).exists()
        {
            return Ok((Self::load(&dir.join(GLOBAL_FILE))?, false));
        }
        let stats = Self::compute_subset(dataset, subset, progress).await?;
        std::fs::create_dir_all(dir).map_err(|e| StoreError::io(dir, e))?;
        stats.write(&dir.join(GLOBAL_FILE))?;
        manifest.coverage = stats.coverage.clone();
        let text = serde_json::to_string_pretty(&manifest).expect("manifest serializes");
        std::fs::write(&manifest_path, text).map_err(|e| StoreError::io(&manifest_path, e))?;
        Ok((stats, true))
    }

    /// Moments of one (field, level, year, month).
    pub fn get(&self, field: &str, level: f64, year: i32, month: u32) -> Option<&Moments> {
        self.entries
            .get(&(field.to_string(), level.to_bits(), year, month))
    }

    /// Every entry as (field, level, year, month, moments).
    pub fn iter(&self) -> impl Iterator<Item = (&str, f64, i32, u32, &Moments)> {
        self.entries
            .iter()
            .map(|((f, l, y, m), v)| (f.as_str(), f64::from_bits(*l), *y, *m, v))
    }

    /// The moments that apply to `field` at `level` and time `unix`.
    fn at(&self, field: &str, level: f64, unix: i64) -> Result<&Moments, NormalizationError> {
        let (year, month) = year_month(unix);
        self.get(field, level, year, month)
            .ok_or_else(|| NormalizationError::Missing {
                field: field.to_string(),
                level,
                year,
                month,
            })
    }

    /// Normalizes one plane (or any slice) of `field` at `level` and time `unix` in place.
    pub fn normalize(
        &self,
        field: &str,
        level: f64,
        unix: i64,
        values: &mut [f32],
    ) -> Result<(), NormalizationError> {
        let (mean, scale) = self.affine(field, level, unix)?;
        for v in values {
            *v = (*v - mean) * scale;
        }
        Ok(())
    }

    /// The map [`GlobalStats::normalize`] applies, as `(mean, 1 / std)`: normalized
    /// `= (v - mean) · scale`.
    pub fn affine(
        &self,
        field: &str,
        level: f64,
        unix: i64,
    ) -> Result<(f32, f32), NormalizationError> {
        let m = self.at(field, level, unix)?;
        let (mean, std) = (m.mean, m.std());
        if std.is_nan() || std <= 0.0 {
            let (year, month) = year_month(unix);
            return Err(NormalizationError::ZeroSpread {
                field: field.to_string(),
                level,
                year,
                month,
            });
        }
        Ok((mean as f32, (1.0 / std) as f32))
    }

    /// Inverse of [`GlobalStats::normalize`].
    pub fn denormalize(
        &self,
        field: &str,
        level: f64,
        unix: i64,
        values: &mut [f32],
    ) -> Result<(), NormalizationError> {
        let m = self.at(field, level, unix)?;
        let (mean, std) = (m.mean as f32, m.std() as f32);
        for v in values {
            *v = *v * std + mean;
        }
        Ok(())
    }

    /// Writes the table as Parquet.
    pub fn write(&self, path: &Path) -> Result<()> {
        let schema = Arc::new(Schema::new(vec![
            Field::new("field", ArrowType::Utf8, false),
            Field::new("level", ArrowType::Float64, false),
            Field::new("year", ArrowType::Int32, false),
            Field::new("month", ArrowType::Int32, false),
            Field::new("count", ArrowType::UInt64, false),
            Field::new("missing", ArrowType::UInt64, false),
            Field::new("mean", ArrowType::Float64, false),
            Field::new("std", ArrowType::Float64, false),
            Field::new("min", ArrowType::Float64, false),
            Field::new("max", ArrowType::Float64, false),
        ]));
        let rows: Vec<_> = self.iter().collect();
        write_parquet(
            path,
            schema,
            vec![
                Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.0))),
                Arc::new(Float64Array::from_iter_values(rows.iter().map(|r| r.1))),
                Arc::new(Int32Array::from_iter_values(rows.iter().map(|r| r.2))),
                Arc::new(Int32Array::from_iter_values(
                    rows.iter().map(|r| r.3 as i32),
                )),
                Arc::new(UInt64Array::from_iter_values(
                    rows.iter().map(|r| r.4.count),
                )),
                Arc::new(UInt64Array::from_iter_values(
                    rows.iter().map(|r| r.4.missing),
                )),
                Arc::new(Float64Array::from_iter_values(
                    rows.iter().map(|r| r.4.mean),
                )),
                Arc::new(Float64Array::from_iter_values(
                    rows.iter().map(|r| r.4.std()),
                )),
                Arc::new(Float64Array::from_iter_values(rows.iter().map(|r| r.4.min))),
                Arc::new(Float64Array::from_iter_values(rows.iter().map(|r| r.4.max))),
            ],
        )
    }

    /// Reads a table written by [`GlobalStats::write`].
    pub fn load(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| StoreError::io(path, e))?;
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
            .and_then(|b| b.build())
            .map_err(|e| StoreError::output(path, e))?;
        let mut entries = BTreeMap::new();
        for batch in reader {
            let batch = batch.map_err(|e| StoreError::output(path, e))?;
            let col = |name: &str| {
                batch
                    .column_by_name(name)
                    .ok_or_else(|| StoreError::output(path, format!("no column `{name}`")))
            };
            let bad = |name: &str| {
                StoreError::output(path, format!("column `{name}` has the wrong type"))
            };
            macro_rules! typed {
                ($name:literal, $t:ty) => {
                    col($name)?
                        .as_any()
                        .downcast_ref::<$t>()
                        .ok_or_else(|| bad($name))?
                };
            }
            let field = typed!("field", StringArray);
            let level = typed!("level", Float64Array);
            let year = typed!("year", Int32Array);
            let month = typed!("month", Int32Array);
            let count = typed!("count", UInt64Array);
            let missing = typed!("missing", UInt64Array);
            let mean = typed!("mean", Float64Array);
            let std = typed!("std", Float64Array);
            let min = typed!("min", Float64Array);
            let max = typed!("max", Float64Array);
            for i in 0..batch.num_rows() {
                let n = count.value(i);
                entries.insert(
                    (
                        field.value(i).to_string(),
                        level.value(i).to_bits(),
                        year.value(i),
                        month.value(i) as u32,
                    ),
                    Moments {
                        count: n,
                        mean: mean.value(i),
                        m2: std.value(i).powi(2) * n as f64,
                        min: min.value(i),
                        max: max.value(i),
                        missing: missing.value(i),
                    },
                );
            }
            debug_assert!(field.null_count() == 0);
        }
        Ok(Self {
            entries,
            coverage: Self::recorded_coverage(path),
        })
    }

    /// The coverage the manifest beside the table at `path` records. A folder written before
    /// subsets existed covers every step of the variables it lists.
    fn recorded_coverage(path: &Path) -> Option<Coverage> {
        let text = std::fs::read_to_string(path.with_file_name(MANIFEST_FILE)).ok()?;
        let manifest: Manifest = serde_json::from_str(&text).ok()?;
        Some(manifest.coverage.unwrap_or(Coverage {
            first_step: manifest.first_time,
            last_step: manifest.last_time,
            every_steps: 1,
            steps_read: manifest.steps,
            store_steps: manifest.steps,
            variables: manifest.variables,
            levels: Vec::new(),
        }))
    }

    /// Default statistics folder of a local store: `STORE.stats` beside it.
    pub fn default_dir(store: &Path) -> PathBuf {
        let name = store
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_else(|| "store".into());
        store.with_file_name(format!("{name}.stats"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_and_back() {
        let mut stats = GlobalStats::default();
        stats.entries.insert(
            ("t".into(), 850f64.to_bits(), 2020, 9),
            Moments::from_values(&[270.0, 280.0, 290.0]),
        );
        let mut v = vec![270.0, 290.0];
        let t = 1_598_918_400; // 2020-09-01
        stats.normalize("t", 850.0, t, &mut v).unwrap();
        let s = (200.0f64 / 3.0).sqrt() as f32;
        assert!((v[0] + 10.0 / s).abs() < 1e-5 && (v[1] - 10.0 / s).abs() < 1e-5);
        stats.denormalize("t", 850.0, t, &mut v).unwrap();
        assert!((v[0] - 270.0).abs() < 1e-3);
        let err = stats.normalize("t", 500.0, t, &mut v).unwrap_err();
        assert!(
            err.to_string().contains("`t` level 500 in 2020-09"),
            "{err}"
        );
    }
}
