//! The crate's error type.

/// Why a model could not be configured, built or run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A configuration setting is impossible; `setting` names it (`d_model`, `fields[1].pe_width`).
    #[error("model config: {setting}: {reason}")]
    Config { setting: String, reason: String },
    /// The model config file could not be parsed.
    #[error("model config `{path}`: {source}")]
    ConfigFile {
        path: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// An input tensor or index list does not fit the model or the other inputs.
    #[error("input: {what}: {detail}")]
    Input { what: String, detail: String },
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn config_err(setting: impl Into<String>, reason: impl Into<String>) -> Error {
    Error::Config {
        setting: setting.into(),
        reason: reason.into(),
    }
}

pub(crate) fn input_err(what: impl Into<String>, detail: impl Into<String>) -> Error {
    Error::Input {
        what: what.into(),
        detail: detail.into(),
    }
}
