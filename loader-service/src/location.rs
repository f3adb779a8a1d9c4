//! Where a store lives: a URL or plain path turned into an `object_store` handle plus the prefix
//! of the store inside it. Credentials and endpoints come from the environment (the usual
//! `AWS_*`, `GOOGLE_*`, `AZURE_*` variables), so the same command works on a laptop and a cluster.

use std::sync::Arc;

use bytes::Bytes;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt};
use url::Url;

use crate::error::{Result, StoreError};

/// An opened store location: the object store, the store's prefix in it, and the URL the user gave.
#[derive(Debug, Clone)]
pub struct StoreLocation {
    url: String,
    store: Arc<dyn ObjectStore>,
    prefix: ObjectPath,
}

impl StoreLocation {
    /// Opens `url`: a plain path, `file://`, `s3://bucket/prefix` (custom endpoint through
    /// `AWS_ENDPOINT_URL`, anonymous access through `AWS_SKIP_SIGNATURE=true`), `gs://`, `az://`
    /// (also `abfs://`, `azure://`) or `http(s)://`.
    pub fn open(url: &str) -> Result<Self> {
        let invalid = |detail: String| StoreError::InvalidUrl {
            url: url.to_string(),
            detail,
        };
        let trimmed = url.trim_end_matches('/');
        let parsed = Url::parse(trimmed).ok().filter(|u| u.scheme().len() > 1);
        let Some(parsed) = parsed else {
            return Self::local(url, std::path::Path::new(trimmed));
        };
        let prefix =
            ObjectPath::from_url_path(parsed.path()).map_err(|e| invalid(e.to_string()))?;
        let store: Arc<dyn ObjectStore> = match parsed.scheme() {
            "file" => {
                let path = parsed
                    .to_file_path()
                    .map_err(|()| invalid("not a local file path".into()))?;
                return Self::local(url, &path);
            }
            "s3" | "s3a" => Arc::new(
                object_store::aws::AmazonS3Builder::from_env()
                    .with_url(trimmed)
                    .build()
                    .map_err(|e| invalid(e.to_string()))?,
            ),
            "gs" => Arc::new(
                object_store::gcp::GoogleCloudStorageBuilder::from_env()
                    .with_url(trimmed)
                    .build()
                    .map_err(|e| invalid(e.to_string()))?,
            ),
            "az" | "abfs" | "abfss" | "azure" | "adl" => Arc::new(
                object_store::azure::MicrosoftAzureBuilder::from_env()
                    .with_url(trimmed)
                    .build()
                    .map_err(|e| invalid(e.to_string()))?,
            ),
            "http" | "https" => {
                let mut base = parsed.clone();
                base.set_path("");
                let store = object_store::http::HttpBuilder::new()
                    .with_url(base.as_str())
                    .build()
                    .map_err(|e| invalid(e.to_string()))?;
                Arc::new(store)
            }
            other => return Err(invalid(format!("unsupported URL scheme `{other}`"))),
        };
        Ok(Self {
            url: url.to_string(),
            store,
            prefix,
        })
    }

    fn local(url: &str, path: &std::path::Path) -> Result<Self> {
        let canonical = std::fs::canonicalize(path).map_err(|e| StoreError::InvalidUrl {
            url: url.to_string(),
            detail: e.to_string(),
        })?;
        let store =
            object_store::local::LocalFileSystem::new_with_prefix(&canonical).map_err(|e| {
                StoreError::InvalidUrl {
                    url: url.to_string(),
                    detail: e.to_string(),
                }
            })?;
        Ok(Self {
            url: url.to_string(),
            store: Arc::new(store),
            prefix: ObjectPath::default(),
        })
    }

    /// Wraps an existing object store (tests, custom clients).
    pub fn from_store(url: impl Into<String>, store: Arc<dyn ObjectStore>, prefix: &str) -> Self {
        Self {
            url: url.into(),
            store,
            prefix: ObjectPath::from(prefix),
        }
    }

    /// The URL the store was opened from.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The underlying object store.
    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// The object path of `key` (a Zarr key relative to the store root).
    pub fn path(&self, key: &str) -> ObjectPath {
        let mut parts: Vec<String> = self
            .prefix
            .parts()
            .map(|p| p.as_ref().to_string())
            .collect();
        parts.extend(key.split('/').filter(|s| !s.is_empty()).map(str::to_string));
        ObjectPath::from_iter(parts)
    }

    /// Reads a whole object; `Ok(None)` when it does not exist.
    pub async fn get(&self, key: &str) -> Result<Option<Bytes>> {
        let path = self.path(key);
        let fetched = async { self.store.get(&path).await?.bytes().await }.await;
        match fetched {
            Ok(bytes) => Ok(Some(bytes)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(source) => Err(self.error(key, source)),
        }
    }

    /// Lists the immediate children ("folders") of `key` (empty for the root).
    pub async fn list_children(&self, key: &str) -> Result<Vec<String>> {
        let path = self.path(key);
        let listing = self
            .store
            .list_with_delimiter(Some(&path))
            .await
            .map_err(|e| self.error(key, e))?;
        Ok(listing
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename().map(str::to_string))
            .collect())
    }

    /// An object-store error that names the full URL of the object.
    pub fn error(&self, key: &str, source: object_store::Error) -> StoreError {
        StoreError::ObjectStore {
            url: format!("{}/{}", self.url.trim_end_matches('/'), key),
            source,
        }
    }
}
