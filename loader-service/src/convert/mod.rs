//! ERA5 as users download it — NetCDF and GRIB files from the Copernicus Climate Data Store —
//! converted into a Zarr v3 per-variable CF store the loader serves like any other
//! (`atmorep loader convert`, docs/convert.md).
//!
//! Every input is described first ([`input`]: its grid, levels, times, variables; GRIB through
//! ecCodes in [`grib`], NetCDF through libnetcdf in [`netcdf`]); the files are put in time order
//! and checked against each other (and against the store for `--append`) before anything is
//! written; then their fields are written step by step into a temporary sibling of the store
//! ([`output`]), renamed into place at the end.

pub mod grib;
pub mod input;
pub mod netcdf;
pub mod output;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use thiserror::Error;

pub use input::{Field, Format, InputFile, Selection, VarInfo};
pub use output::{Axes, TIME_UNITS};

use crate::progress::Progress;
use crate::store::zarr_meta::Codec;
use input::iso;
use output::Target;

/// What can go wrong in a conversion; each names the file (or store) at fault.
#[derive(Debug, Error)]
pub enum ConvertError {
    #[error("{}: {source}", file.display())]
    Io {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open {}: {detail}", file.display())]
    Open { file: PathBuf, detail: String },
    #[error("{}: GRIB message {message}: {detail}", file.display())]
    Grib {
        file: PathBuf,
        message: usize,
        detail: String,
    },
    #[error("{} has no variable `{name}` (it has: {available})", file.display())]
    MissingVariable {
        file: PathBuf,
        name: String,
        available: String,
    },
    #[error("{}: {detail}", file.display())]
    Unsupported { file: PathBuf, detail: String },
    #[error("{}: {detail}", file.display())]
    Ensemble { file: PathBuf, detail: String },
    #[error("{} and {} disagree: {detail}", first.display(), second.display())]
    Mismatch {
        first: PathBuf,
        second: PathBuf,
        detail: String,
    },
    #[error("{} and {} overlap in time: both hold {time}", first.display(), second.display())]
    Overlap {
        first: PathBuf,
        second: PathBuf,
        time: String,
    },
    #[error("cannot append to {}: {detail}", store.display())]
    Append { store: PathBuf, detail: String },
    #[error("store {}: {detail}", store.display())]
    Store { store: PathBuf, detail: String },
    #[error("{detail}")]
    Usage { detail: String },
}

impl ConvertError {
    pub(crate) fn io(file: &Path, source: std::io::Error) -> Self {
        Self::Io {
            file: file.to_path_buf(),
            source,
        }
    }
}

/// How to convert.
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    /// Variables and ensemble member to read.
    pub selection: Selection,
    /// Chunk shape `time, level, lat, lon` (default: `1, all levels, the globe`).
    pub chunks: Option<[u64; 4]>,
    pub codec: Codec,
    /// Extend the existing store at the destination instead of replacing it.
    pub append: bool,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        Self {
            selection: Selection::default(),
            chunks: None,
            codec: Codec::Blosc {
                zstd: false,
                bitshuffle: false,
            },
            append: false,
        }
    }
}

/// What a conversion did.
#[derive(Debug, Clone, PartialEq)]
pub struct ConvertReport {
    pub store: PathBuf,
    pub files: usize,
    pub variables: Vec<String>,
    /// Time steps written by this run, and in the store after it.
    pub new_steps: usize,
    pub total_steps: usize,
    pub levels: usize,
    pub grid: (usize, usize),
    /// Bytes of the input files, and of the f32 values written.
    pub input_bytes: u64,
    pub value_bytes: u64,
    pub seconds: f64,
}

impl ConvertReport {
    /// MB/s of values written (decoded f32), the figure comparable across input formats.
    pub fn throughput_mb_s(&self) -> f64 {
        self.value_bytes as f64 / 1e6 / self.seconds.max(1e-9)
    }
}

/// Describes `inputs`, orders them by time and checks that they make one store.
pub fn plan(inputs: &[PathBuf], selection: &Selection) -> Result<Vec<InputFile>, ConvertError> {
    if inputs.is_empty() {
        return Err(ConvertError::Usage {
            detail: "no input files".into(),
        });
    }
    let mut files = inputs
        .iter()
        .map(|p| InputFile::open(p, selection))
        .collect::<Result<Vec<_>, _>>()?;
    files.sort_by_key(|f| f.times[0]);
    let first = &files[0];
    for f in &files[1..] {
        check_same(first, f)?;
    }
    for pair in files.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        if let Some(t) = b.times.iter().find(|t| a.times.binary_search(t).is_ok()) {
            return Err(ConvertError::Overlap {
                first: a.path.clone(),
                second: b.path.clone(),
                time: iso(*t),
            });
        }
        if b.times[0] <= *a.times.last().expect("a file has times") {
            return Err(ConvertError::Overlap {
                first: a.path.clone(),
                second: b.path.clone(),
                time: format!("interleaved times from {}", iso(b.times[0])),
            });
        }
    }
    Ok(files)
}

fn check_same(a: &InputFile, b: &InputFile) -> Result<(), ConvertError> {
    let mismatch = |detail: String| ConvertError::Mismatch {
        first: a.path.clone(),
        second: b.path.clone(),
        detail,
    };
    if a.lats != b.lats || a.lons != b.lons {
        return Err(mismatch(format!(
            "grids differ ({} × {} from {}..{}°N, {}..{}°E against {} × {} from {}..{}°N, \
             {}..{}°E)",
            a.lats.len(),
            a.lons.len(),
            a.lats[0],
            a.lats[a.lats.len() - 1],
            a.lons[0],
            a.lons[a.lons.len() - 1],
            b.lats.len(),
            b.lons.len(),
            b.lats[0],
            b.lats[b.lats.len() - 1],
            b.lons[0],
            b.lons[b.lons.len() - 1],
        )));
    }
    if a.levels != b.levels {
        return Err(mismatch(format!(
            "pressure levels differ ({:?} against {:?} hPa)",
            a.levels, b.levels
        )));
    }
    let names = |f: &InputFile| f.variables.keys().cloned().collect::<Vec<_>>();
    if names(a) != names(b) {
        return Err(mismatch(format!(
            "variables differ ({} against {}); convert them separately or pick common ones \
             with --variables",
            names(a).join(", "),
            names(b).join(", ")
        )));
    }
    Ok(())
}

/// Converts `inputs` into the store `out` (or extends it with `--append`); see the module docs.
pub fn convert(
    inputs: &[PathBuf],
    out: &Path,
    options: &ConvertOptions,
    progress: &dyn Progress,
) -> Result<ConvertReport, ConvertError> {
    let started = Instant::now();
    let files = plan(inputs, &options.selection)?;
    let first = &files[0];
    let new_times: Vec<i64> = files.iter().flat_map(|f| f.times.iter().copied()).collect();
    let mut vars: Vec<(String, String, String, bool)> = first
        .variables
        .iter()
        .map(|(n, v)| (n.clone(), v.units.clone(), v.long_name.clone(), v.has_level))
        .collect();
    let history = format!(
        "{} atmorep loader convert: {} file(s), {} to {}",
        chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ"),
        files.len(),
        iso(new_times[0]),
        iso(*new_times.last().expect("times"))
    );
    let (target, offset) = if options.append && out.exists() {
        let existing = output::existing(out)?;
        check_append(out, &existing, first, &new_times)?;
        let offset = existing.axes.times.len();
        let mut axes = existing.axes;
        axes.times.extend(&new_times);
        vars.retain(|v| existing.variables.contains_key(&v.0));
        (Target::append(out, axes, &history)?, offset)
    } else {
        let axes = Axes {
            lats: first.lats.clone(),
            lons: first.lons.clone(),
            levels: first.levels.clone(),
            times: new_times.clone(),
        };
        let target = Target::create(out, axes, &vars, options.chunks, options.codec, &history)?;
        (target, 0)
    };
    let steps: usize = files
        .iter()
        .map(|f| f.times.len() * f.variables.len())
        .sum();
    progress.start("convert", steps as u64);
    let mut value_bytes = 0u64;
    let mut index = offset;
    for file in &files {
        tracing::info!(
            file = %file.path.display(),
            steps = file.times.len(),
            from = %iso(file.times[0]),
            "converting"
        );
        value_bytes += write_file(file, &target, index, progress)?;
        index += file.times.len();
    }
    progress.finish();
    let store = target.commit()?;
    Ok(ConvertReport {
        store,
        files: files.len(),
        variables: vars.into_iter().map(|v| v.0).collect(),
        new_steps: new_times.len(),
        total_steps: index,
        levels: first.levels.len(),
        grid: (first.lats.len(), first.lons.len()),
        input_bytes: files.iter().map(|f| f.bytes).sum(),
        value_bytes,
        seconds: started.elapsed().as_secs_f64(),
    })
}

fn check_append(
    out: &Path,
    existing: &output::Existing,
    first: &InputFile,
    new_times: &[i64],
) -> Result<(), ConvertError> {
    let fail = |detail: String| ConvertError::Append {
        store: out.to_path_buf(),
        detail,
    };
    let a = &existing.axes;
    if a.lats != first.lats || a.lons != first.lons {
        return Err(fail(format!(
            "{} is on another grid ({} × {} against the store's {} × {})",
            first.path.display(),
            first.lats.len(),
            first.lons.len(),
            a.lats.len(),
            a.lons.len()
        )));
    }
    if a.levels != first.levels {
        return Err(fail(format!(
            "{} has levels {:?}, the store {:?} hPa",
            first.path.display(),
            first.levels,
            a.levels
        )));
    }
    let store_vars: Vec<&String> = existing.variables.keys().collect();
    let file_vars: Vec<&String> = first.variables.keys().collect();
    if store_vars != file_vars {
        return Err(fail(format!(
            "{} has variables {:?}, the store {:?} (pick them with --variables)",
            first.path.display(),
            file_vars,
            store_vars
        )));
    }
    let last = *a.times.last().expect("a store has times");
    if new_times[0] <= last {
        return Err(fail(format!(
            "{} starts at {}, not after the store's last time {}",
            first.path.display(),
            iso(new_times[0]),
            iso(last)
        )));
    }
    Ok(())
}

/// Writes every field of `file`; GRIB's single-level messages are gathered per time step so
/// that each chunk is written once. Returns the bytes of values written.
fn write_file(
    file: &InputFile,
    target: &Target,
    offset: usize,
    progress: &dyn Progress,
) -> Result<u64, ConvertError> {
    let npoints = file.lats.len() * file.lons.len();
    let mut pending: BTreeMap<(String, i64), (Vec<f32>, usize)> = BTreeMap::new();
    let mut written = 0u64;
    let mut steps = 0usize;
    let mut put = |name: &str, time: i64, values: Vec<f32>| -> Result<(), ConvertError> {
        let t = file
            .times
            .binary_search(&time)
            .map_err(|_| ConvertError::Unsupported {
                file: file.path.clone(),
                detail: format!("`{name}` at {} is not among its times", iso(time)),
            })?;
        written += values.len() as u64 * 4;
        steps += 1;
        target.write_step(name, offset + t, values)?;
        progress.advance(1);
        Ok(())
    };
    file.read(&mut |field: Field| {
        let info = &file.variables[&field.variable];
        let step = file.step_len(info);
        match field.level {
            None if field.values.len() == step => put(&field.variable, field.time, field.values),
            Some(level) if field.values.len() == npoints => {
                let l = file
                    .levels
                    .iter()
                    .position(|x| *x == level)
                    .ok_or_else(|| ConvertError::Unsupported {
                        file: file.path.clone(),
                        detail: format!("`{}` at {level} hPa: not a level of it", field.variable),
                    })?;
                let key = (field.variable.clone(), field.time);
                let entry = pending
                    .entry(key.clone())
                    .or_insert_with(|| (vec![f32::NAN; step], 0));
                entry.0[l * npoints..(l + 1) * npoints].copy_from_slice(&field.values);
                entry.1 += 1;
                if entry.1 == file.levels.len() {
                    let (values, _) = pending.remove(&key).expect("present");
                    put(&field.variable, field.time, values)?;
                }
                Ok(())
            }
            _ => Err(ConvertError::Unsupported {
                file: file.path.clone(),
                detail: format!(
                    "`{}` at {}: {} values where {} were expected",
                    field.variable,
                    iso(field.time),
                    field.values.len(),
                    if field.level.is_some() { npoints } else { step }
                ),
            }),
        }
    })?;
    let want = file.times.len() * file.variables.len();
    if steps != want {
        return Err(ConvertError::Unsupported {
            file: file.path.clone(),
            detail: format!("{steps} complete time steps of {want} were found in it"),
        });
    }
    Ok(written)
}
