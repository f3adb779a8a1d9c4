//! What can go wrong while turning data into pictures.

use std::path::PathBuf;

/// A plotting failure; every variant says what (and where) it concerns.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PlotError {
    /// The data cannot be drawn as asked (empty, mismatched shapes, unknown names).
    #[error("{what}: {detail}")]
    Input { what: String, detail: String },
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// plotters could not draw (an area too small for its labels, a backend failure).
    #[error("drawing {what}: {detail}")]
    Draw { what: String, detail: String },
    /// Encoding the PNG or GIF failed.
    #[error("encoding {}: {detail}", path.display())]
    Encode { path: PathBuf, detail: String },
    /// A tensor of the model could not be read.
    #[cfg(feature = "model")]
    #[error("reading the model's {what}: {source}")]
    Tensor {
        what: String,
        #[source]
        source: candle_core::Error,
    },
}

pub type Result<T, E = PlotError> = std::result::Result<T, E>;

pub(crate) fn input_err(what: impl Into<String>, detail: impl Into<String>) -> PlotError {
    PlotError::Input {
        what: what.into(),
        detail: detail.into(),
    }
}

/// Maps a plotters error of the figure `what`.
pub(crate) fn draw_err<E: std::fmt::Display>(what: &str) -> impl Fn(E) -> PlotError + '_ {
    move |e| PlotError::Draw {
        what: what.to_string(),
        detail: e.to_string(),
    }
}

#[cfg(feature = "model")]
pub(crate) fn tensor_err(what: &str) -> impl Fn(candle_core::Error) -> PlotError + '_ {
    move |source| PlotError::Tensor {
        what: what.to_string(),
        source,
    }
}
