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
    /// A training configuration setting is impossible or inconsistent; `setting` names it
    /// (`request.fields[0].num_tokens`, `optimizer.lr`).
    #[error("train config: {setting}: {reason}")]
    TrainConfig { setting: String, reason: String },
    /// A checkpoint cannot be used: `path` names the file or folder, `what` the problem
    /// (missing, corrupt, wrong version, a tensor of the wrong shape, another config).
    #[error("checkpoint `{path}`: {what}")]
    Checkpoint { path: String, what: String },
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The loader stream failed (after the client's own retries).
    #[error("loader: {0}")]
    Loader(#[from] atmorep_proto::ClientError),
    /// The loader stream ended before training did.
    #[error("loader: the {what} stream ended after {batches} batches")]
    StreamEnded { what: String, batches: u64 },
    /// Writing the metrics table failed.
    #[error("metrics `{path}`: {detail}")]
    Metrics { path: String, detail: String },
    /// The ranks of a data-parallel run cannot work together (MPI could not start, the ranks
    /// disagree about their layout or diverged).
    #[error("data-parallel: {0}")]
    Collective(String),
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

pub(crate) fn train_config_err(setting: impl Into<String>, reason: impl Into<String>) -> Error {
    Error::TrainConfig {
        setting: setting.into(),
        reason: reason.into(),
    }
}

pub(crate) fn checkpoint_err(path: &std::path::Path, what: impl Into<String>) -> Error {
    Error::Checkpoint {
        path: path.display().to_string(),
        what: what.into(),
    }
}

pub(crate) fn io_err(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.display().to_string(),
        source,
    }
}
