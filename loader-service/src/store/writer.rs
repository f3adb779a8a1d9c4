//! Writing gridded fields as a Zarr store the loader can serve: per-variable CF arrays
//! `(time, level, latitude, longitude)` (or `(time, latitude, longitude)` at the surface) of
//! f32, one time step × one level × the globe per chunk (blosc-lz4), with CF time, level,
//! latitude and longitude coordinates and consolidated v2 metadata — the layout of
//! `atmorep loader synth`. Global inference writes the model's output through it.
//!
//! The store is built in a temporary sibling folder and renamed into place by
//! [`StoreWriter::finish`], so a failed or interrupted run never leaves a half-written store at
//! the destination.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{Value, json};
use zarrs::array::{Array, ArraySubset};
use zarrs::filesystem::FilesystemStore;

use crate::error::{Result, StoreError};
use crate::store::cf_time::{CfTimeUnits, TIME_UNITS};
use crate::store::zarr_meta::{
    ArraySpec, Codec, ZarrFormat, attrs, write_array_meta, write_err, write_group,
};

/// The grid and time axis of a store to write; latitudes north to south or south to north,
/// longitudes ascending.
#[derive(Debug, Clone, PartialEq)]
pub struct GridAxes {
    pub lats: Vec<f64>,
    pub lons: Vec<f64>,
    /// Unix seconds, ascending.
    pub times: Vec<i64>,
    /// Pressure levels (hPa) of the `level` coordinate shared by every level variable.
    pub levels: Vec<f64>,
}

/// One variable to write.
#[derive(Debug, Clone, PartialEq)]
pub struct VariableSpec {
    pub name: String,
    pub long_name: String,
    pub units: String,
    /// On the `level` axis (`false`: a surface variable).
    pub has_level: bool,
}

/// A store being written; see the module docs.
pub struct StoreWriter {
    out: PathBuf,
    tmp: PathBuf,
    axes: GridAxes,
    arrays: BTreeMap<String, (Array<FilesystemStore>, bool)>,
}

impl std::fmt::Debug for StoreWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreWriter")
            .field("out", &self.out)
            .field("variables", &self.arrays.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl StoreWriter {
    /// Creates the coordinates and the (empty) variables; `title` goes into the root's
    /// attributes. An existing store at `out` is replaced only by [`Self::finish`].
    pub fn create(
        out: &Path,
        axes: GridAxes,
        variables: &[VariableSpec],
        title: &str,
    ) -> Result<Self> {
        let fail = |detail: String| write_err(out, detail);
        if axes.lats.is_empty() || axes.lons.is_empty() || axes.times.is_empty() {
            return Err(fail(
                "the grid and the time axis need at least one point".into(),
            ));
        }
        if variables.is_empty() {
            return Err(fail("no variables to write".into()));
        }
        if variables.iter().any(|v| v.has_level) && axes.levels.is_empty() {
            return Err(fail("level variables need at least one level".into()));
        }
        let name = out
            .file_name()
            .ok_or_else(|| fail("the store path has no final component".into()))?
            .to_string_lossy()
            .into_owned();
        let tmp = out.with_file_name(format!(".{name}.partial-{}", std::process::id()));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| StoreError::io(&tmp, e))?;
        }
        std::fs::create_dir_all(&tmp).map_err(|e| StoreError::io(&tmp, e))?;
        let store = Arc::new(FilesystemStore::new(&tmp).map_err(|e| write_err(out, e))?);
        let (nt, nlev, nlat, nlon) = (
            axes.times.len(),
            axes.levels.len(),
            axes.lats.len(),
            axes.lons.len(),
        );
        let format = ZarrFormat::V2;
        let mut written: Vec<(String, Value)> = Vec::new();
        let units = CfTimeUnits::parse(TIME_UNITS, Some("gregorian")).expect("valid units");
        let hours: Vec<f64> = axes.times.iter().map(|&t| units.encode(t)).collect();
        let coord = |name: &'static str, n: usize, a: serde_json::Map<String, Value>| {
            ArraySpec::coordinate(name, n, "f64", a)
        };
        let mut coords = vec![
            (
                coord(
                    "time",
                    nt,
                    attrs(&[
                        ("units", json!(TIME_UNITS)),
                        ("calendar", json!("gregorian")),
                        ("standard_name", json!("time")),
                    ]),
                ),
                hours,
            ),
            (
                coord(
                    "latitude",
                    nlat,
                    attrs(&[
                        ("units", json!("degrees_north")),
                        ("standard_name", json!("latitude")),
                    ]),
                ),
                axes.lats.clone(),
            ),
            (
                coord(
                    "longitude",
                    nlon,
                    attrs(&[
                        ("units", json!("degrees_east")),
                        ("standard_name", json!("longitude")),
                    ]),
                ),
                axes.lons.clone(),
            ),
        ];
        if nlev > 0 {
            coords.push((
                coord(
                    "level",
                    nlev,
                    attrs(&[
                        ("units", json!("hPa")),
                        ("standard_name", json!("air_pressure")),
                        ("positive", json!("down")),
                    ]),
                ),
                axes.levels.clone(),
            ));
        }
        for (spec, values) in coords {
            let array = write_array_meta(&mut written, &store, out, format, &spec)?;
            array
                .store_array_subset(&ArraySubset::new_with_shape(spec.shape.clone()), values)
                .map_err(|e| write_err(out, e))?;
        }
        let mut arrays = BTreeMap::new();
        for v in variables {
            let (shape, chunks, dims) = if v.has_level {
                (
                    vec![nt as u64, nlev as u64, nlat as u64, nlon as u64],
                    vec![1, 1, nlat as u64, nlon as u64],
                    vec!["time", "level", "latitude", "longitude"],
                )
            } else {
                (
                    vec![nt as u64, nlat as u64, nlon as u64],
                    vec![1, nlat as u64, nlon as u64],
                    vec!["time", "latitude", "longitude"],
                )
            };
            let spec = ArraySpec {
                name: &v.name,
                shape,
                chunks,
                shard_inner: None,
                dtype: "f32",
                dims,
                codec: Codec::Blosc {
                    zstd: false,
                    bitshuffle: false,
                },
                attributes: attrs(&[("units", json!(v.units)), ("long_name", json!(v.long_name))]),
            };
            let array = write_array_meta(&mut written, &store, out, format, &spec)?;
            if arrays
                .insert(v.name.clone(), (array, v.has_level))
                .is_some()
            {
                return Err(fail(format!("variable `{}` listed twice", v.name)));
            }
        }
        write_group(
            format,
            &tmp,
            &attrs(&[("title", json!(title)), ("Conventions", json!("CF-1.6"))]),
            &written,
        )?;
        Ok(Self {
            out: out.to_path_buf(),
            tmp,
            axes,
            arrays,
        })
    }

    pub fn axes(&self) -> &GridAxes {
        &self.axes
    }

    /// Writes one time step of `variable`: `[levels, lat, lon]` values (`[lat, lon]` at the
    /// surface) in the axes' order.
    pub fn write_step(&self, variable: &str, time_index: usize, values: &[f32]) -> Result<()> {
        let (array, has_level) = self.arrays.get(variable).ok_or_else(|| {
            write_err(
                &self.out,
                format!("`{variable}` is not a variable of this store"),
            )
        })?;
        let (nt, nlat, nlon) = (
            self.axes.times.len(),
            self.axes.lats.len(),
            self.axes.lons.len(),
        );
        let nlev = if *has_level {
            self.axes.levels.len()
        } else {
            1
        };
        if time_index >= nt || values.len() != nlev * nlat * nlon {
            return Err(write_err(
                &self.out,
                format!(
                    "`{variable}` step {time_index}: {} values for a step of {nlev} × {nlat} × {nlon} \
                     (steps 0..{nt})",
                    values.len()
                ),
            ));
        }
        let (start, shape) = if *has_level {
            (
                vec![time_index as u64, 0, 0, 0],
                vec![1, nlev as u64, nlat as u64, nlon as u64],
            )
        } else {
            (
                vec![time_index as u64, 0, 0],
                vec![1, nlat as u64, nlon as u64],
            )
        };
        let subset =
            ArraySubset::new_with_start_shape(start, shape).map_err(|e| write_err(&self.out, e))?;
        array
            .store_array_subset(&subset, values.to_vec())
            .map_err(|e| write_err(&self.out, e))
    }

    /// Moves the finished store into place (replacing what was there).
    pub fn finish(self) -> Result<PathBuf> {
        if self.out.exists() {
            std::fs::remove_dir_all(&self.out).map_err(|e| StoreError::io(&self.out, e))?;
        }
        std::fs::rename(&self.tmp, &self.out).map_err(|e| StoreError::io(&self.out, e))?;
        Ok(self.out)
    }
}

/// A dense f32 array for [`write_arrays`].
#[derive(Debug, Clone, PartialEq)]
pub struct DenseArray {
    pub name: String,
    pub dims: Vec<String>,
    pub shape: Vec<u64>,
    /// Row-major, `shape.product()` values.
    pub data: Vec<f32>,
    pub attributes: serde_json::Map<String, Value>,
}

/// Writes `arrays` as a consolidated Zarr v2 group at `out` (blosc-lz4, chunked along the first
/// axis by at most 64), built in a temporary sibling folder and renamed into place.
pub fn write_arrays(out: &Path, arrays: &[DenseArray], title: &str) -> Result<PathBuf> {
    let name = out
        .file_name()
        .ok_or_else(|| write_err(out, "the store path has no final component"))?
        .to_string_lossy()
        .into_owned();
    let tmp = out.with_file_name(format!(".{name}.partial-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| StoreError::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| StoreError::io(&tmp, e))?;
    let store = Arc::new(FilesystemStore::new(&tmp).map_err(|e| write_err(out, e))?);
    let mut written: Vec<(String, Value)> = Vec::new();
    for a in arrays {
        let n: u64 = a.shape.iter().product();
        if a.data.len() as u64 != n || a.dims.len() != a.shape.len() || a.shape.is_empty() {
            return Err(write_err(
                out,
                format!(
                    "array `{}`: {} values and dims {:?} for shape {:?}",
                    a.name,
                    a.data.len(),
                    a.dims,
                    a.shape
                ),
            ));
        }
        let mut chunks = a.shape.clone();
        chunks[0] = chunks[0].clamp(1, 64);
        let spec = ArraySpec {
            name: &a.name,
            shape: a.shape.clone(),
            chunks,
            shard_inner: None,
            dtype: "f32",
            dims: a.dims.iter().map(String::as_str).collect(),
            codec: Codec::Blosc {
                zstd: false,
                bitshuffle: false,
            },
            attributes: a.attributes.clone(),
        };
        let array = write_array_meta(&mut written, &store, out, ZarrFormat::V2, &spec)?;
        array
            .store_array_subset(
                &ArraySubset::new_with_shape(a.shape.clone()),
                a.data.clone(),
            )
            .map_err(|e| write_err(out, e))?;
    }
    write_group(
        ZarrFormat::V2,
        &tmp,
        &attrs(&[("title", json!(title))]),
        &written,
    )?;
    if out.exists() {
        std::fs::remove_dir_all(out).map_err(|e| StoreError::io(out, e))?;
    }
    std::fs::rename(&tmp, out).map_err(|e| StoreError::io(out, e))?;
    Ok(out.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::dataset::Dataset;
    use crate::store::hyperslab::Hyperslab;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_written_store_reads_back_exactly_through_the_loader() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("model.zarr");
        let axes = GridAxes {
            lats: vec![60.0, 30.0, 0.0, -30.0, -60.0],
            lons: (0..8).map(|i| i as f64 * 45.0).collect(),
            times: vec![1_598_918_400, 1_598_918_400 + 21_600],
            levels: vec![850.0, 500.0],
        };
        let vars = [
            VariableSpec {
                name: "z".into(),
                long_name: "geopotential".into(),
                units: "m**2 s**-2".into(),
                has_level: true,
            },
            VariableSpec {
                name: "msl".into(),
                long_name: "mean sea level pressure".into(),
                units: "Pa".into(),
                has_level: false,
            },
        ];
        let w = StoreWriter::create(&out, axes.clone(), &vars, "test").unwrap();
        assert!(!out.exists(), "nothing at the destination before finish");
        let z = |t: usize| -> Vec<f32> { (0..80).map(|i| (t * 1000 + i) as f32 * 0.5).collect() };
        for t in 0..2 {
            w.write_step("z", t, &z(t)).unwrap();
            w.write_step("msl", t, &[1e5 + t as f32; 40]).unwrap();
        }
        let err = w.write_step("z", 2, &z(0)).unwrap_err();
        assert!(err.to_string().contains("`z` step 2"), "{err}");
        let err = w.write_step("q", 0, &z(0)).unwrap_err();
        assert!(err.to_string().contains("`q`"), "{err}");
        w.finish().unwrap();

        let ds = Dataset::open(out.to_str().unwrap()).await.unwrap();
        assert_eq!(ds.times, axes.times);
        assert_eq!(ds.lats, axes.lats);
        assert_eq!(ds.lons, axes.lons);
        let var = ds.variable("z").unwrap();
        assert_eq!(var.levels, axes.levels);
        let got = ds.read(&Hyperslab::full(&ds, var)).await.unwrap();
        let want: Vec<f32> = (0..2).flat_map(z).collect();
        assert_eq!(got, want);
        let msl = ds.variable("msl").unwrap();
        assert!(!msl.has_level());
        let got = ds.read(&Hyperslab::full(&ds, msl)).await.unwrap();
        assert_eq!(got[40], 1e5 + 1.0);
    }

    #[test]
    fn dense_arrays_round_trip_through_zarrs() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("emb.zarr");
        let data: Vec<f32> = (0..3 * 70 * 4).map(|i| i as f32 * 0.25).collect();
        let a = DenseArray {
            name: "t/embedding".into(),
            dims: vec!["sample".into(), "token".into(), "channel".into()],
            shape: vec![70, 3, 4],
            data: data.clone(),
            attributes: Default::default(),
        };
        write_arrays(&out, std::slice::from_ref(&a), "test").unwrap();
        let store = Arc::new(FilesystemStore::new(&out).unwrap());
        let array = Array::open(store, "/t/embedding").unwrap();
        assert_eq!(array.shape(), &[70, 3, 4]);
        let got: Vec<f32> = array
            .retrieve_array_subset(&ArraySubset::new_with_shape(vec![70, 3, 4]))
            .unwrap();
        assert_eq!(got, data);
        let bad = DenseArray {
            shape: vec![71, 3, 4],
            ..a
        };
        let err = write_arrays(&out, &[bad], "test").unwrap_err();
        assert!(err.to_string().contains("t/embedding"), "{err}");
    }
}
