//! The one error type of the tracker.

use std::path::PathBuf;

use atmorep_proto::stitch::StitchError;

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
    /// Tiles that cannot be stitched into global fields.
    #[error(transparent)]
    Stitch(#[from] StitchError),
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
}
