//! The one error type of the loader library. Every variant names the thing that is wrong (store
//! URL, array, chunk key, variable) so a message alone tells the user where to look.

use thiserror::Error;

/// Result alias used throughout the loader library.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// What can go wrong while opening, reading or writing a store.
#[derive(Debug, Error)]
pub enum StoreError {
    /// The URL could not be turned into an object store.
    #[error("cannot open store `{url}`: {detail}")]
    InvalidUrl { url: String, detail: String },

    /// Nothing at the location looks like Zarr metadata.
    #[error("`{url}` is not a Zarr store: no .zmetadata, .zgroup, .zarray or zarr.json found")]
    NotAZarrStore { url: String },

    /// The object store itself failed (network, permissions, missing bucket…).
    #[error("object store failure at `{url}`")]
    ObjectStore {
        url: String,
        #[source]
        source: object_store::Error,
    },

    /// Zarr or CF metadata that cannot be understood.
    #[error("bad metadata in `{path}`: {detail}")]
    Metadata { path: String, detail: String },

    /// A codec zarrs does not know (or was not built with).
    #[error("array `{array}` uses an unsupported codec: {detail}")]
    UnsupportedCodec { array: String, detail: String },

    /// A data type the canonical view cannot represent as f32.
    #[error("array `{array}` has unsupported data type `{dtype}`")]
    UnsupportedDataType { array: String, dtype: String },

    /// A chunk whose bytes do not decode.
    #[error("corrupt chunk `{key}` of array `{array}`: {detail}")]
    CorruptChunk {
        array: String,
        key: String,
        detail: String,
    },

    /// A chunk the metadata promises but the store lacks, under `missing_chunks = "error"` (the
    /// log line of the first read names the store's URL too).
    #[error(
        "dataset `{dataset}`: chunk `{key}` of array `{array}` is missing from its store (missing_chunks = \"error\")"
    )]
    MissingChunk {
        dataset: String,
        array: String,
        key: String,
    },

    /// A chunk whose object is not the version this server first read: the store was rewritten
    /// while served (`store::version`).
    #[error(
        "dataset `{dataset}`: store changed under the server: chunk `{key}` of array `{array}` is not the version it first read; restart the loader to serve the store as it is now"
    )]
    StoreChanged {
        dataset: String,
        array: String,
        key: String,
    },

    /// A failure shared by concurrent readers of one chunk (the cache reads it once for all).
    #[error(transparent)]
    Shared(std::sync::Arc<StoreError>),

    /// A variable the store does not have.
    #[error("store `{url}` has no variable `{name}` (available: {available})")]
    UnknownVariable {
        url: String,
        name: String,
        available: String,
    },

    /// A CF time encoding that cannot be decoded.
    #[error("cannot decode CF time of `{array}`: {detail}")]
    CfTime { array: String, detail: String },

    /// A read request that does not fit the store.
    #[error("invalid hyperslab for `{variable}`: {detail}")]
    InvalidHyperslab { variable: String, detail: String },

    /// A statistics subset (`loader stats --start/--end/--variables/--levels`) the store does
    /// not have.
    #[error("statistics of `{url}`: {detail}")]
    InvalidSubset { url: String, detail: String },

    /// Anything that fails while writing a store.
    #[error("cannot write `{path}`: {detail}")]
    Write { path: String, detail: String },

    /// Local file-system I/O (outputs such as CSV, Parquet, PNG).
    #[error("I/O error at `{path}`")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },

    /// A panic while decoding or reading, caught before it could take the process down.
    #[error(transparent)]
    Panicked(#[from] crate::panic::Panicked),

    /// Errors from writing tables and plots.
    #[error("cannot write output `{path}`: {detail}")]
    Output { path: String, detail: String },
}

impl StoreError {
    /// The failure itself, looking through [`StoreError::Shared`].
    pub fn root(&self) -> &StoreError {
        match self {
            Self::Shared(inner) => inner.root(),
            other => other,
        }
    }

    /// Whether the store refused the server's credentials (HTTP 401 or 403).
    pub fn is_refusal(&self) -> bool {
        matches!(
            self.root(),
            Self::ObjectStore {
                source: object_store::Error::PermissionDenied { .. }
                    | object_store::Error::Unauthenticated { .. },
                ..
            }
        )
    }

    /// The error of a read that concurrent readers may have shared: itself when nobody else
    /// holds it.
    pub(crate) fn unshare(shared: std::sync::Arc<StoreError>) -> Self {
        std::sync::Arc::try_unwrap(shared).unwrap_or_else(Self::Shared)
    }

    pub(crate) fn metadata(path: impl Into<String>, detail: impl std::fmt::Display) -> Self {
        Self::Metadata {
            path: path.into(),
            detail: detail.to_string(),
        }
    }

    pub(crate) fn io(path: impl AsRef<std::path::Path>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.as_ref().display().to_string(),
            source,
        }
    }

    pub(crate) fn output(
        path: impl AsRef<std::path::Path>,
        detail: impl std::fmt::Display,
    ) -> Self {
        Self::Output {
            path: path.as_ref().display().to_string(),
            detail: detail.to_string(),
        }
    }
}
