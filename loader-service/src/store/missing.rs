//! Chunks the metadata promises but the store does not have. Zarr reads such a chunk as the fill
//! value, which is right for a sparse store and silently wrong for a store with a failed upload;
//! each dataset says which it is (`missing_chunks = "fill" | "error"`, docs/operations.md). Either
//! way each missing chunk is logged and counted (`atmorep_missing_chunks_total{dataset}`) once,
//! however often it is read: the cache may evict and re-read it, and one line per read would
//! flood the log.

use std::collections::HashSet;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::error::StoreError;

/// What a read of a missing chunk does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MissingChunks {
    /// The chunk reads as the array's fill value (Zarr's rule).
    #[default]
    Fill,
    /// The read fails, naming the dataset, array and chunk.
    Error,
}

/// A dataset's policy for missing chunks and the chunks it has already reported.
#[derive(Debug, Default)]
pub struct MissingChunkPolicy {
    pub(crate) mode: MissingChunks,
    /// The served dataset's name for logs, metrics and errors; the store URL when unset.
    dataset: Option<String>,
    seen: Mutex<HashSet<String>>,
}

impl MissingChunkPolicy {
    pub(crate) fn new(dataset: &str, mode: MissingChunks) -> Self {
        Self {
            mode,
            dataset: Some(dataset.to_string()),
            seen: Mutex::default(),
        }
    }

    /// Notes that the missing chunk `key` of `array` in the store at `url` was read as the fill
    /// value: logged and counted the first time.
    pub(crate) fn filled(&self, url: &str, array: &str, key: &str) {
        self.note(url, array, key, "read as the fill value");
    }

    /// The error for a read of the missing chunk `key` under [`MissingChunks::Error`], logged
    /// and counted the first time.
    pub(crate) fn refused(&self, url: &str, array: &str, key: &str) -> StoreError {
        self.note(url, array, key, "reads fail (missing_chunks = \"error\")");
        StoreError::MissingChunk {
            dataset: self.dataset(url).to_string(),
            array: array.to_string(),
            key: key.to_string(),
        }
    }

    pub(crate) fn dataset<'a>(&'a self, url: &'a str) -> &'a str {
        self.dataset.as_deref().unwrap_or(url)
    }

    fn note(&self, url: &str, array: &str, key: &str, action: &str) {
        let first = self
            .seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(key.to_string());
        if first {
            let dataset = self.dataset(url);
            tracing::warn!(
                dataset,
                array,
                chunk = key,
                store = url,
                "missing chunk: {action}"
            );
            metrics::counter!("atmorep_missing_chunks_total", "dataset" => dataset.to_string())
                .increment(1);
        }
    }

    /// How many distinct missing chunks were reported.
    pub fn reported(&self) -> usize {
        self.seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_chunk_is_reported_once_and_errors_name_dataset_array_and_chunk() {
        let fill = MissingChunkPolicy::new("era5", MissingChunks::Fill);
        for _ in 0..3 {
            fill.filled("/s.zarr", "z", "z/2.0.0.0");
        }
        fill.filled("/s.zarr", "z", "z/3.0.0.0");
        assert_eq!(fill.reported(), 2);

        let strict = MissingChunkPolicy::new("era5", MissingChunks::Error);
        for _ in 0..2 {
            let err = strict.refused("/s.zarr", "z", "z/2.0.0.0");
            let text = err.to_string();
            for part in ["`era5`", "`z`", "`z/2.0.0.0`"] {
                assert!(text.contains(part), "{text} names {part}");
            }
        }
        assert_eq!(strict.reported(), 1);
    }

    #[test]
    fn the_setting_reads_from_toml() {
        #[derive(Deserialize)]
        struct Dataset {
            missing_chunks: MissingChunks,
        }
        let strict: Dataset = toml::from_str("missing_chunks = \"error\"").unwrap();
        assert_eq!(strict.missing_chunks, MissingChunks::Error);
        let err = toml::from_str::<Dataset>("missing_chunks = \"zero\"")
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("fill") && err.contains("error"), "{err}");
    }
}
