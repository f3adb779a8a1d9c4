//! What the converter needs to know about one input file before writing anything — its grid,
//! times, levels and variables — and the fields it then yields, whatever the format. A file is
//! recognised by its first bytes (`GRIB`, `CDF`, HDF5's signature), not by its name.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use super::{ConvertError, grib, netcdf};

/// The formats read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// GRIB edition 1 or 2 (ecCodes).
    Grib,
    /// NetCDF3 classic or NetCDF4/HDF5 (libnetcdf).
    NetCdf,
}

impl Format {
    /// Sniffs the format of `path` from its first bytes.
    pub fn detect(path: &Path) -> Result<Self, ConvertError> {
        let mut head = [0u8; 8];
        let mut file = std::fs::File::open(path).map_err(|e| ConvertError::io(path, e))?;
        let n = file
            .read(&mut head)
            .map_err(|e| ConvertError::io(path, e))?;
        let head = &head[..n];
        if head.starts_with(b"GRIB") {
            Ok(Self::Grib)
        } else if head.starts_with(b"CDF") || head.starts_with(b"\x89HDF\r\n\x1a\n") {
            Ok(Self::NetCdf)
        } else {
            Err(ConvertError::Unsupported {
                file: path.to_path_buf(),
                detail: "neither GRIB (`GRIB`) nor NetCDF (`CDF`, HDF5) by its first bytes".into(),
            })
        }
    }
}

/// One variable of an input file.
#[derive(Debug, Clone, PartialEq)]
pub struct VarInfo {
    pub units: String,
    pub long_name: String,
    /// On pressure levels (`false`: a single-level field).
    pub has_level: bool,
}

/// An input file's description, from its metadata (GRIB: one pass over the message headers).
#[derive(Debug, Clone)]
pub struct InputFile {
    pub path: PathBuf,
    pub format: Format,
    /// Latitudes in file order (north→south for ERA5).
    pub lats: Vec<f64>,
    /// Longitudes in file order.
    pub lons: Vec<f64>,
    /// Pressure levels (hPa) of the level variables, high pressure first.
    pub levels: Vec<f64>,
    /// Valid times, Unix seconds, ascending.
    pub times: Vec<i64>,
    /// Variables by ERA5 short name (after `--variables`).
    pub variables: BTreeMap<String, VarInfo>,
    /// The ensemble member read (`number`), when the file has that dimension.
    pub member: Option<i64>,
    /// Size on disk.
    pub bytes: u64,
}

/// One field read from a file: a variable at one valid time, either one pressure level
/// (`level: Some`, GRIB) or every level of the store in its order (or the single level).
#[derive(Debug)]
pub struct Field {
    pub variable: String,
    pub time: i64,
    pub level: Option<f64>,
    /// Row-major `[levels,] lat, lon` in the file's grid order, physical values.
    pub values: Vec<f32>,
}

/// What to read of each file.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    /// Only these variables (all when empty).
    pub variables: Vec<String>,
    /// The ensemble member to read where a file has several.
    pub member: Option<i64>,
}

impl InputFile {
    /// Describes `path`.
    pub fn open(path: &Path, selection: &Selection) -> Result<Self, ConvertError> {
        let mut file = match Format::detect(path)? {
            Format::Grib => grib::describe(path, selection.member)?,
            Format::NetCdf => netcdf::describe(path, selection.member)?,
        };
        file.bytes = std::fs::metadata(path)
            .map_err(|e| ConvertError::io(path, e))?
            .len();
        if !selection.variables.is_empty() {
            for name in &selection.variables {
                if !file.variables.contains_key(name) {
                    return Err(ConvertError::MissingVariable {
                        file: path.to_path_buf(),
                        name: name.clone(),
                        available: file
                            .variables
                            .keys()
                            .cloned()
                            .collect::<Vec<_>>()
                            .join(", "),
                    });
                }
            }
            file.variables
                .retain(|name, _| selection.variables.contains(name));
        }
        if file.variables.is_empty() {
            return Err(ConvertError::Unsupported {
                file: path.to_path_buf(),
                detail: "no gridded variable (time × latitude × longitude) found".into(),
            });
        }
        if !file.variables.values().any(|v| v.has_level) {
            file.levels.clear();
        }
        Ok(file)
    }

    /// Reads every selected field in file order and hands it to `sink`.
    pub fn read(
        &self,
        sink: &mut dyn FnMut(Field) -> Result<(), ConvertError>,
    ) -> Result<(), ConvertError> {
        match self.format {
            Format::Grib => grib::read(self, sink),
            Format::NetCdf => netcdf::read(self, sink),
        }
    }

    /// The number of values of one time step of `variable` over all its levels.
    pub fn step_len(&self, variable: &VarInfo) -> usize {
        let nlev = if variable.has_level {
            self.levels.len()
        } else {
            1
        };
        nlev * self.lats.len() * self.lons.len()
    }
}

/// Pressure in hPa of a level given in `units` (hPa, millibars, Pa).
pub(crate) fn to_hpa(value: f64, units: &str) -> f64 {
    match units.trim() {
        "Pa" | "pa" | "pascal" | "Pascal" => value / 100.0,
        _ => value,
    }
}

/// Rounds a coordinate computed from a first point and an increment to a micro-degree, so that
/// grids of different files compare equal where they are.
pub(crate) fn round_coord(x: f64) -> f64 {
    (x * 1e6).round() / 1e6
}

/// ISO 8601 of Unix seconds, for messages.
pub(crate) fn iso(t: i64) -> String {
    chrono::DateTime::from_timestamp(t, 0)
        .map(|d| d.format("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_else(|| format!("{t} s"))
}
