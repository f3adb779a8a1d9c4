//! The store a conversion writes: Zarr v3, one CF array per variable `(time, level, latitude,
//! longitude)` (or `(time, latitude, longitude)`), ARCO-ERA5-like chunks (one time step × all
//! levels × the globe) unless `--chunks` says otherwise, `time` int64 seconds since 1970, and
//! the root `zarr.json` with inline consolidated metadata (what xarray writes), so a remote
//! reader opens it with one GET.
//!
//! It is always written in a temporary sibling (`.NAME.partial-PID`): a new store from nothing,
//! an appended one from a copy of the existing store, and [`Target::commit`] renames it into
//! place, so an interrupted or failed run leaves the destination as it was.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{Map, Value, json};
use zarrs::array::{Array, ArraySubset};
use zarrs::filesystem::FilesystemStore;

use super::ConvertError;
use crate::store::zarr_meta::{ArraySpec, Codec, ZarrFormat, attrs, metadata_json};

/// The time encoding of converted stores: exact for any ERA5 time step.
pub const TIME_UNITS: &str = "seconds since 1970-01-01 00:00:00";

/// Marks a store as written by the converter, so that `--append` knows its layout.
pub const MARK: &str = "atmorep_convert";

/// The axes of the store being written.
#[derive(Debug, Clone, PartialEq)]
pub struct Axes {
    pub lats: Vec<f64>,
    pub lons: Vec<f64>,
    pub levels: Vec<f64>,
    /// Every time of the finished store, Unix seconds ascending.
    pub times: Vec<i64>,
}

/// One variable's array.
#[derive(Debug)]
struct Var {
    array: Array<FilesystemStore>,
    has_level: bool,
}

/// A store under construction in its temporary sibling.
#[derive(Debug)]
pub struct Target {
    out: PathBuf,
    tmp: PathBuf,
    store: Arc<FilesystemStore>,
    axes: Axes,
    vars: BTreeMap<String, Var>,
    committed: bool,
}

fn err(out: &Path, detail: impl std::fmt::Display) -> ConvertError {
    ConvertError::Store {
        store: out.to_path_buf(),
        detail: detail.to_string(),
    }
}

/// `out`'s temporary sibling.
pub fn partial_path(out: &Path) -> Result<PathBuf, ConvertError> {
    let name = out
        .file_name()
        .ok_or_else(|| err(out, "the store path has no final component"))?
        .to_string_lossy()
        .into_owned();
    Ok(out.with_file_name(format!(".{name}.partial-{}", std::process::id())))
}

fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

/// What an existing converted store holds, for `--append`.
#[derive(Debug, Clone)]
pub struct Existing {
    pub axes: Axes,
    /// Variable name → on levels.
    pub variables: BTreeMap<String, bool>,
}

fn read_json(out: &Path, key: &str) -> Result<Value, ConvertError> {
    let path = out.join(key);
    let text = std::fs::read(&path).map_err(|e| err(out, format!("{}: {e}", path.display())))?;
    serde_json::from_slice(&text).map_err(|e| err(out, format!("{}: {e}", path.display())))
}

/// Reads the axes and variables of the converted store at `out`.
pub fn existing(out: &Path) -> Result<Existing, ConvertError> {
    let root = read_json(out, "zarr.json")?;
    if root.pointer(&format!("/attributes/{MARK}")).is_none() {
        return Err(err(
            out,
            "--append extends stores written by `atmorep loader convert` only (no \
             `atmorep_convert` attribute in its zarr.json)",
        ));
    }
    let store = Arc::new(FilesystemStore::new(out).map_err(|e| err(out, e))?);
    let read = |name: &str| -> Result<Vec<f64>, ConvertError> {
        let array = Array::open(store.clone(), &format!("/{name}")).map_err(|e| err(out, e))?;
        let subset = ArraySubset::new_with_shape(array.shape().to_vec());
        match name {
            "time" => Ok(array
                .retrieve_array_subset::<Vec<i64>>(&subset)
                .map_err(|e| err(out, e))?
                .into_iter()
                .map(|t| t as f64)
                .collect()),
            _ => array
                .retrieve_array_subset(&subset)
                .map_err(|e| err(out, e)),
        }
    };
    let entries = root
        .pointer("/consolidated_metadata/metadata")
        .and_then(Value::as_object)
        .ok_or_else(|| err(out, "zarr.json has no consolidated metadata"))?;
    let variables = entries
        .iter()
        .filter(|(name, _)| !["time", "level", "latitude", "longitude"].contains(&name.as_str()))
        .map(|(name, meta)| {
            (
                name.clone(),
                meta["shape"].as_array().map(Vec::len) == Some(4),
            )
        })
        .collect();
    Ok(Existing {
        axes: Axes {
            lats: read("latitude")?,
            lons: read("longitude")?,
            levels: if entries.contains_key("level") {
                read("level")?
            } else {
                Vec::new()
            },
            times: read("time")?.into_iter().map(|t| t as i64).collect(),
        },
        variables,
    })
}

impl Target {
    /// Starts a new store for `axes` and `variables` (name, units, long name, on levels).
    pub fn create(
        out: &Path,
        axes: Axes,
        variables: &[(String, String, String, bool)],
        chunks: Option<[u64; 4]>,
        codec: Codec,
        history: &str,
    ) -> Result<Self, ConvertError> {
        let tmp = partial_path(out)?;
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| err(out, e))?;
        }
        std::fs::create_dir_all(&tmp).map_err(|e| err(out, e))?;
        let mut target = Self::at(out, tmp, axes)?;
        let a = &target.axes;
        let (nt, nlev, nlat, nlon) = (
            a.times.len() as u64,
            a.levels.len() as u64,
            a.lats.len() as u64,
            a.lons.len() as u64,
        );
        let [ct, cl, cy, cx] = chunks.unwrap_or([1, nlev.max(1), nlat, nlon]);
        let clip = |c: u64, n: u64| c.clamp(1, n.max(1));
        for (name, units, long_name, has_level) in variables {
            let (shape, chunk, dims) = if *has_level {
                (
                    vec![nt, nlev, nlat, nlon],
                    vec![clip(ct, nt), clip(cl, nlev), clip(cy, nlat), clip(cx, nlon)],
                    vec!["time", "level", "latitude", "longitude"],
                )
            } else {
                (
                    vec![nt, nlat, nlon],
                    vec![clip(ct, nt), clip(cy, nlat), clip(cx, nlon)],
                    vec!["time", "latitude", "longitude"],
                )
            };
            let spec = ArraySpec {
                name,
                shape,
                chunks: chunk,
                shard_inner: None,
                dtype: "f32",
                dims,
                codec,
                attributes: attrs(&[("units", json!(units)), ("long_name", json!(long_name))]),
            };
            let array = target.array(&metadata_json(ZarrFormat::V3, &spec), name)?;
            target.vars.insert(
                name.clone(),
                Var {
                    array,
                    has_level: *has_level,
                },
            );
        }
        target.coordinates()?;
        let root = attrs(&[
            ("Conventions", json!("CF-1.7")),
            ("title", json!("ERA5 converted by atmorep loader convert")),
            ("history", json!([history])),
            (MARK, json!(1)),
        ]);
        std::fs::write(
            target.tmp.join("zarr.json"),
            json!({"zarr_format": 3, "node_type": "group", "attributes": root}).to_string(),
        )
        .map_err(|e| err(out, e))?;
        Ok(target)
    }

    /// Starts an append: a copy of the store at `out`, its arrays grown to `axes.times`.
    pub fn append(out: &Path, axes: Axes, history: &str) -> Result<Self, ConvertError> {
        let tmp = partial_path(out)?;
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| err(out, e))?;
        }
        copy_dir(out, &tmp)
            .map_err(|e| err(out, format!("copying it to {}: {e}", tmp.display())))?;
        let mut target = Self::at(out, tmp, axes)?;
        let mut root = read_json(&target.tmp, "zarr.json")?;
        let names: Vec<String> = root
            .pointer("/consolidated_metadata/metadata")
            .and_then(Value::as_object)
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default();
        let nt = target.axes.times.len() as u64;
        for name in names {
            if ["time", "level", "latitude", "longitude"].contains(&name.as_str()) {
                continue;
            }
            let mut array =
                Array::open(target.store.clone(), &format!("/{name}")).map_err(|e| err(out, e))?;
            let mut shape = array.shape().to_vec();
            shape[0] = nt;
            array.set_shape(shape).map_err(|e| err(out, e))?;
            array.store_metadata().map_err(|e| err(out, e))?;
            let has_level = array.dimensionality() == 4;
            target.vars.insert(name, Var { array, has_level });
        }
        target.coordinates()?;
        if let Some(h) = root
            .pointer_mut("/attributes/history")
            .and_then(Value::as_array_mut)
        {
            h.push(json!(history));
        }
        std::fs::write(target.tmp.join("zarr.json"), root.to_string()).map_err(|e| err(out, e))?;
        Ok(target)
    }

    fn at(out: &Path, tmp: PathBuf, axes: Axes) -> Result<Self, ConvertError> {
        let store = Arc::new(FilesystemStore::new(&tmp).map_err(|e| err(out, e))?);
        Ok(Self {
            out: out.to_path_buf(),
            tmp,
            store,
            axes,
            vars: BTreeMap::new(),
            committed: false,
        })
    }

    fn array(&self, meta: &Value, name: &str) -> Result<Array<FilesystemStore>, ConvertError> {
        crate::store::zarr_meta::array_from_json(
            &self.store,
            &self.out,
            name,
            ZarrFormat::V3,
            meta.clone(),
        )
        .map_err(|e| err(&self.out, e))
    }

    /// (Re)writes the coordinate arrays, each one uncompressed chunk.
    fn coordinates(&self) -> Result<(), ConvertError> {
        let a = &self.axes;
        let f64s: [(&str, &Vec<f64>, Map<String, Value>); 3] = [
            (
                "latitude",
                &a.lats,
                attrs(&[
                    ("units", json!("degrees_north")),
                    ("standard_name", json!("latitude")),
                ]),
            ),
            (
                "longitude",
                &a.lons,
                attrs(&[
                    ("units", json!("degrees_east")),
                    ("standard_name", json!("longitude")),
                ]),
            ),
            (
                "level",
                &a.levels,
                attrs(&[
                    ("units", json!("hPa")),
                    ("standard_name", json!("air_pressure")),
                    ("positive", json!("down")),
                ]),
            ),
        ];
        for (name, values, attributes) in f64s {
            if values.is_empty() {
                continue;
            }
            let spec = ArraySpec::coordinate(name, values.len(), "f64", attributes);
            let array = self.array(&metadata_json(ZarrFormat::V3, &spec), name)?;
            array
                .store_array_subset(
                    &ArraySubset::new_with_shape(spec.shape.clone()),
                    values.clone(),
                )
                .map_err(|e| err(&self.out, e))?;
        }
        let spec = ArraySpec::coordinate(
            "time",
            a.times.len(),
            "i64",
            attrs(&[
                ("units", json!(TIME_UNITS)),
                ("calendar", json!("proleptic_gregorian")),
                ("standard_name", json!("time")),
            ]),
        );
        let array = self.array(&metadata_json(ZarrFormat::V3, &spec), "time")?;
        array
            .store_array_subset(
                &ArraySubset::new_with_shape(spec.shape.clone()),
                a.times.clone(),
            )
            .map_err(|e| err(&self.out, e))
    }

    /// Writes one time step of `variable` (`[levels,] lat, lon` in the store's order).
    pub fn write_step(
        &self,
        variable: &str,
        time_index: usize,
        values: Vec<f32>,
    ) -> Result<(), ConvertError> {
        let var = self.vars.get(variable).ok_or_else(|| {
            err(
                &self.out,
                format!("`{variable}` is not a variable of the store"),
            )
        })?;
        let (nlat, nlon) = (self.axes.lats.len() as u64, self.axes.lons.len() as u64);
        let (start, shape) = if var.has_level {
            (
                vec![time_index as u64, 0, 0, 0],
                vec![1, self.axes.levels.len() as u64, nlat, nlon],
            )
        } else {
            (vec![time_index as u64, 0, 0], vec![1, nlat, nlon])
        };
        let subset =
            ArraySubset::new_with_start_shape(start, shape).map_err(|e| err(&self.out, e))?;
        var.array
            .store_array_subset(&subset, values)
            .map_err(|e| err(&self.out, format!("`{variable}` step {time_index}: {e}")))
    }

    /// Consolidates the metadata into the root `zarr.json` and moves the store into place.
    pub fn commit(mut self) -> Result<PathBuf, ConvertError> {
        let mut root = read_json(&self.tmp, "zarr.json")?;
        let mut entries = Map::new();
        for entry in std::fs::read_dir(&self.tmp).map_err(|e| err(&self.out, e))? {
            let entry = entry.map_err(|e| err(&self.out, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if entry.path().join("zarr.json").exists() {
                entries.insert(
                    name.clone(),
                    read_json(&self.tmp, &format!("{name}/zarr.json"))?,
                );
            }
        }
        root["consolidated_metadata"] =
            json!({"kind": "inline", "must_understand": false, "metadata": entries});
        std::fs::write(self.tmp.join("zarr.json"), root.to_string())
            .map_err(|e| err(&self.out, e))?;
        // The old store is moved aside first and removed only once the new one is in place; a
        // failed second rename puts it back.
        let name = self.out.file_name().unwrap_or_default().to_string_lossy();
        let old = self
            .out
            .with_file_name(format!(".{name}.old-{}", std::process::id()));
        let had_old = self.out.exists();
        if had_old {
            std::fs::rename(&self.out, &old).map_err(|e| err(&self.out, e))?;
        }
        if let Err(e) = std::fs::rename(&self.tmp, &self.out) {
            if had_old {
                let _ = std::fs::rename(&old, &self.out);
            }
            return Err(err(&self.out, e));
        }
        self.committed = true;
        if had_old {
            std::fs::remove_dir_all(&old).map_err(|e| err(&self.out, e))?;
        }
        Ok(self.out.clone())
    }
}

impl Drop for Target {
    /// A failed conversion removes its temporary sibling; the destination was never touched.
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}
