//! The one error type of the tracker.

use std::path::PathBuf;

/// `Result` with [`TrackError`].
pub type Result<T, E = TrackError> = std::result::Result<T, E>;

/// Everything that can go wrong between a tile stream and a track file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrackError {
    /// A field's grid or value count does not fit what it is combined with.
    #[error("grid: {0}")]
    Grid(String),
    /// A time step lacks a field the detector needs.
    #[error("time step {time}: no field `{variable}` at {level} hPa")]
    MissingField {
        /// ISO 8601 UTC.
        time: String,
        variable: String,
        level: f64,
    },
    /// A tile (field sample) of a batch does not fit the stitcher's geometry or grid.
    #[error("tile stitching, field `{field}`: {detail}")]
    Tile { field: String, detail: String },
    /// A time step whose tiles stopped arriving before every grid point was covered.
    #[error(
        "tile stitching: time step {time_index} ({time}) of `{field}` at level {level} is missing \
         {missing} of {total} grid points (first uncovered: row {row}, column {column})"
    )]
    MissingTiles {
        time_index: usize,
        time: String,
        field: String,
        level: f64,
        missing: usize,
        total: usize,
        row: usize,
        column: usize,
    },
    /// Two tiles disagree on the value of a grid point they share.
    #[error(
        "tile stitching: tiles disagree at time step {time_index}, `{field}` level {level}, row \
         {row}, column {column}: {first} vs {second}"
    )]
    InconsistentOverlap {
        time_index: usize,
        field: String,
        level: f64,
        row: usize,
        column: usize,
        first: f32,
        second: f32,
    },
    /// A malformed line of a track CSV (ours, synthetic truth or IBTrACS).
    #[error("{source_name}:{line}: {detail}")]
    Csv {
        /// The file (or `<string>`) the line came from.
        source_name: String,
        /// 1-based line number.
        line: usize,
        detail: String,
    },
    /// A configuration value out of range.
    #[error("configuration: {0}")]
    Config(String),
    /// Reading or writing a file.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl TrackError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn tile(field: &str, detail: impl Into<String>) -> Self {
        Self::Tile {
            field: field.to_string(),
            detail: detail.into(),
        }
    }
}
