//! Local normalization statistics: mean and standard deviation per grid point, level and
//! calendar month (all years pooled), computed in one streaming pass with per-point Welford
//! updates in f64, kept beside the store as a Zarr v3 store (`local_stats.zarr`, one group per
//! field with `mean` and `std` arrays shaped (month, level, lat, lon), NaN for months the store
//! does not cover), and applied to windows as `(x − mean) / std` point by point.

use std::path::Path;
use std::sync::Arc;

use rayon::prelude::*;
use serde_json::json;
use zarrs::array::{Array, ArraySubset};
use zarrs::filesystem::FilesystemStore;

use super::{NormalizationError, statistics_levels, year_month};
use crate::error::{Result, StoreError};
use crate::progress::Progress;
use crate::store::dataset::Dataset;
use crate::store::zarr_meta::{
    ArraySpec, Codec, ZarrFormat, array_from_json, attrs, metadata_json, write_err, write_group,
};

/// Folder name of the local statistics inside a statistics folder.
pub const LOCAL_STORE: &str = "local_stats.zarr";

/// Per-point monthly statistics of one field.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalField {
    pub levels: Vec<f64>,
    /// (12, levels, nlat, nlon), f32.
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

/// Per-point monthly statistics of a store.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LocalStats {
    pub nlat: usize,
    pub nlon: usize,
    pub fields: std::collections::BTreeMap<String, LocalField>,
}

impl LocalStats {
    /// Computes the statistics of `names` (all variables when empty) in one pass per variable,
    /// reporting the time steps read to `progress`.
    pub async fn compute(
        dataset: &Dataset,
        names: &[String],
        progress: &dyn Progress,
    ) -> Result<Self> {
        let names: Vec<String> = if names.is_empty() {
            dataset.variables.keys().cloned().collect()
        } else {
            names.to_vec()
        };
        let (nlat, nlon) = (dataset.lats.len(), dataset.lons.len());
        let plane = nlat * nlon;
        progress.start("local", (names.len() * dataset.times.len()) as u64);
        let mut fields = std::collections::BTreeMap::new();
        let mut buffer = Vec::new();
        for name in &names {
            let variable = dataset.variable(name)?;
            let levels = statistics_levels(variable);
            let nl = levels.len();
            let mut count = vec![0u64; 12 * nl];
            let mut mean = vec![0f64; 12 * nl * plane];
            let mut m2 = vec![0f64; 12 * nl * plane];
            dataset
                .scan(variable, &mut buffer, progress, |t, block| {
                    for (k, values) in block.chunks(plane).enumerate() {
                        let (_, month) = year_month(dataset.times[t + k / nl]);
                        let slot = (month as usize - 1) * nl + k % nl;
                        count[slot] += 1;
                        let n = count[slot] as f64;
                        let (mean, m2) = (
                            &mut mean[slot * plane..(slot + 1) * plane],
                            &mut m2[slot * plane..(slot + 1) * plane],
                        );
                        // Welford per point; rows in parallel.
                        mean.par_chunks_mut(nlon)
                            .zip(m2.par_chunks_mut(nlon))
                            .zip(values.par_chunks(nlon))
                            .for_each(|((mean, m2), x)| {
                                for i in 0..x.len() {
                                    let x = x[i] as f64;
                                    let delta = x - mean[i];
                                    mean[i] += delta / n;
                                    m2[i] += delta * (x - mean[i]);
                                }
                            });
                    }
                })
                .await?;
            let mut out_mean = vec![f32::NAN; 12 * nl * plane];
            let mut out_std = vec![f32::NAN; 12 * nl * plane];
            for (slot, &n) in count.iter().enumerate() {
                if n == 0 {
                    continue;
                }
                for i in slot * plane..(slot + 1) * plane {
                    out_mean[i] = mean[i] as f32;
                    out_std[i] = (m2[i] / n as f64).sqrt() as f32;
                }
            }
            fields.insert(
                name.clone(),
                LocalField {
                    levels,
                    mean: out_mean,
                    std: out_std,
                },
            );
        }
        progress.finish();
        Ok(Self { nlat, nlon, fields })
    }

    /// Normalizes a window (time, level, lat, lon) of `field`: `times` are the window's time
    /// steps (Unix s), `levels` the level values, `lats`/`lons` canonical grid indices.
    pub fn normalize(
        &self,
        field: &str,
        times: &[i64],
        levels: &[f64],
        lats: std::ops::Range<usize>,
        lon_start: usize,
        values: &mut [f32],
    ) -> Result<(), NormalizationError> {
        let stats = self
            .fields
            .get(field)
            .ok_or_else(|| NormalizationError::Missing {
                field: field.to_string(),
                level: f64::NAN,
                year: 0,
                month: 0,
            })?;
        let (wy, plane) = (lats.len(), self.nlat * self.nlon);
        let wx = values.len() / (times.len() * levels.len() * wy);
        let mut k = 0;
        for &unix in times {
            let (year, month) = year_month(unix);
            for &level in levels {
                let l = stats.levels.iter().position(|v| *v == level).ok_or(
                    NormalizationError::Missing {
                        field: field.to_string(),
                        level,
                        year,
                        month,
                    },
                )?;
                let base = ((month as usize - 1) * stats.levels.len() + l) * plane;
                for y in lats.clone() {
                    for x in 0..wx {
                        let i = base + y * self.nlon + (lon_start + x) % self.nlon;
                        let (m, s) = (stats.mean[i], stats.std[i]);
                        if s.is_nan() || s <= 0.0 {
                            return Err(NormalizationError::ZeroSpread {
                                field: field.to_string(),
                                level,
                                year,
                                month,
                            });
                        }
                        values[k] = (values[k] - m) / s;
                        k += 1;
                    }
                }
            }
        }
        Ok(())
    }

    /// Writes the statistics as a Zarr v3 store at `path` (replaced).
    pub fn write(&self, path: &Path) -> Result<()> {
        if path.exists() {
            std::fs::remove_dir_all(path).map_err(|e| StoreError::io(path, e))?;
        }
        std::fs::create_dir_all(path).map_err(|e| StoreError::io(path, e))?;
        let store = Arc::new(FilesystemStore::new(path).map_err(|e| write_err(path, e))?);
        let format = ZarrFormat::V3;
        let grid = attrs(&[("nlat", json!(self.nlat)), ("nlon", json!(self.nlon))]);
        write_group(format, path, &grid, &[])?;
        for (name, field) in &self.fields {
            let levels = attrs(&[("levels", json!(field.levels))]);
            let group = path.join(name);
            std::fs::create_dir_all(&group).map_err(|e| StoreError::io(path, e))?;
            write_group(format, &group, &levels, &[])?;
            let shape = vec![
                12u64,
                field.levels.len() as u64,
                self.nlat as u64,
                self.nlon as u64,
            ];
            for (array, values) in [("mean", &field.mean), ("std", &field.std)] {
                let spec = ArraySpec {
                    name: &format!("{name}/{array}"),
                    shape: shape.clone(),
                    chunks: vec![1, 1, self.nlat as u64, self.nlon as u64],
                    shard_inner: None,
                    dtype: "f32",
                    dims: vec!["month", "level", "latitude", "longitude"],
                    codec: Codec::Zstd,
                    attributes: levels.clone(),
                };
                let zarr = array_from_json(
                    &store,
                    path,
                    spec.name,
                    format,
                    metadata_json(format, &spec),
                )?;
                zarr.store_array_subset(
                    &ArraySubset::new_with_shape(shape.clone()),
                    values.as_slice(),
                )
                .map_err(|e| write_err(path, e))?;
            }
        }
        Ok(())
    }

    /// Reads statistics written by [`LocalStats::write`].
    pub fn load(path: &Path) -> Result<Self> {
        let err = |e: &dyn std::fmt::Display| StoreError::metadata(path.display().to_string(), e);
        let root: serde_json::Value = serde_json::from_slice(
            &std::fs::read(path.join("zarr.json")).map_err(|e| StoreError::io(path, e))?,
        )
        .map_err(|e| err(&e))?;
        let dim = |k: &str| {
            root["attributes"][k]
                .as_u64()
                .map(|v| v as usize)
                .ok_or_else(|| err(&format!("no `{k}`")))
        };
        let (nlat, nlon) = (dim("nlat")?, dim("nlon")?);
        let store = Arc::new(FilesystemStore::new(path).map_err(|e| err(&e))?);
        let mut fields = std::collections::BTreeMap::new();
        for entry in std::fs::read_dir(path).map_err(|e| StoreError::io(path, e))? {
            let entry = entry.map_err(|e| StoreError::io(path, e))?;
            if !entry.path().is_dir() {
                continue;
            }
            let name = entry.file_name().to_string_lossy().to_string();
            let read = |array: &str| -> Result<(Vec<f32>, Vec<f64>)> {
                let zarr =
                    Array::open(store.clone(), &format!("/{name}/{array}")).map_err(|e| err(&e))?;
                let levels = zarr.attributes()["levels"]
                    .as_array()
                    .map(|l| l.iter().filter_map(serde_json::Value::as_f64).collect())
                    .unwrap_or_default();
                let values: Vec<f32> = zarr
                    .retrieve_array_subset(&zarr.subset_all())
                    .map_err(|e| err(&e))?;
                Ok((values, levels))
            };
            let (mean, levels) = read("mean")?;
            let (std, _) = read("std")?;
            fields.insert(name, LocalField { levels, mean, std });
        }
        Ok(Self { nlat, nlon, fields })
    }
}
