//! Where a store lives: a URL or plain path turned into an `object_store` handle plus the prefix
//! of the store inside it. Credentials and endpoints come from the environment (the usual
//! `AWS_*`, `GOOGLE_*`, `AZURE_*` variables), so the same command works on a laptop and a cluster.
//!
//! Remote stores retry what may be transient — 5xx answers, timeouts, connection resets, a body
//! cut off mid-transfer (resumed with a range request) — with exponential backoff and jitter, then
//! fail with an error that names the object. The policy is [`retry_config_from_env`]:
//!
//! | variable | default | meaning |
//! |---|---|---|
//! | `ATMOREP_STORE_MAX_RETRIES` | 10 | retries per request after the first try (0: none) |
//! | `ATMOREP_STORE_RETRY_TIMEOUT_SECS` | 180 | no new retry once this long has passed since the first try |
//! | `ATMOREP_STORE_BACKOFF_MS` | 100 | the first backoff |
//! | `ATMOREP_STORE_MAX_BACKOFF_MS` | 15000 | the longest backoff (each is up to twice the previous) |
//!
//! Each request (one try) has timeouts, from [`client_timeouts_from`]; a timed-out try is retried
//! like a 5xx:
//!
//! | variable | default | meaning |
//! |---|---|---|
//! | `ATMOREP_STORE_TIMEOUT_SECS` | 30 | one request, from connecting to the body's last byte |
//! | `ATMOREP_STORE_CONNECT_TIMEOUT_SECS` | 5 | establishing the connection |
//!
//! A 401 or 403 answer is not retried (object_store never retries 4xx answers): it fails at once
//! as `object_store::Error::Unauthenticated` / `PermissionDenied`, which the service turns into
//! UNAUTHENTICATED / PERMISSION_DENIED, codes its clients do not retry either. Concurrent reads of
//! one object share one request, and a refused object is answered from memory for
//! [`REFUSAL_MEMO`]: a stream's samples in flight, which share chunks, ask the store once.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::FutureExt;
use object_store::path::Path as ObjectPath;
use object_store::{BackoffConfig, ClientConfigKey, ObjectStore, ObjectStoreExt, RetryConfig};
use url::Url;

use crate::error::{Result, StoreError};
use crate::store::version::ObjectVersion;

/// An opened store location: the object store, the store's prefix in it, and the URL the user gave.
#[derive(Debug, Clone)]
pub struct StoreLocation {
    url: String,
    store: Arc<dyn ObjectStore>,
    prefix: ObjectPath,
    /// The store's folder when it is on a local filesystem.
    local_root: Option<Arc<std::path::Path>>,
    /// Reads in flight and objects refused lately, shared by every clone.
    gets: Arc<Gets>,
}

/// How long an object the store refused the server's credentials for (401/403) is answered from
/// memory: long enough that the samples in flight that need it, and the clients that come back,
/// do not ask again, short enough that fixed credentials or a fixed bucket policy are soon seen.
pub const REFUSAL_MEMO: Duration = Duration::from_secs(5);

type ReadOutcome = std::result::Result<Option<(Bytes, ObjectVersion)>, Arc<StoreError>>;
type SharedRead = futures::future::Shared<futures::future::BoxFuture<'static, ReadOutcome>>;

/// One read per object at a time: concurrent readers of an object share its read, which runs in
/// its own task, so a reader that gives up (a sample whose other read failed) cancels nothing
/// the others wait for; a refusal is remembered for [`REFUSAL_MEMO`]. Both maps change under one
/// lock, so a reader sees a read either in flight or finished, never neither.
#[derive(Default)]
struct Gets(std::sync::Mutex<GetState>);

#[derive(Default)]
struct GetState {
    in_flight: std::collections::HashMap<String, SharedRead>,
    refused: std::collections::HashMap<String, (std::time::Instant, Arc<StoreError>)>,
}

impl std::fmt::Debug for Gets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.lock();
        f.debug_struct("Gets")
            .field("in_flight", &state.in_flight.len())
            .field("refused", &state.refused.len())
            .finish()
    }
}

impl Gets {
    fn lock(&self) -> std::sync::MutexGuard<'_, GetState> {
        // Every update is one call on a map: a poisoned lock holds consistent data.
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl StoreLocation {
    /// Opens `url`: a plain path, `file://`, `s3://bucket/prefix` (custom endpoint through
    /// `AWS_ENDPOINT_URL`, anonymous access through `AWS_SKIP_SIGNATURE=true`), `gs://` (see
    /// [`gcs_anonymous_endpoint`]), `az://` (also `abfs://`, `azure://`) or `http(s)://`.
    pub fn open(url: &str) -> Result<Self> {
        Self::open_with_env(url, &|name| std::env::var(name).ok())
    }

    /// [`StoreLocation::open`] with the environment read through `lookup`.
    pub fn open_with_env(url: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Result<Self> {
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
        let retry = || retry_config_from(|name| lookup(name)).map_err(&invalid);
        let timeouts = client_timeouts_from(|name| lookup(name)).map_err(&invalid)?;
        let store: Arc<dyn ObjectStore> = match parsed.scheme() {
            "file" => {
                let path = parsed
                    .to_file_path()
                    .map_err(|()| invalid("not a local file path".into()))?;
                return Self::local(url, &path);
            }
            "s3" | "s3a" => Arc::new(
                timeouts
                    .iter()
                    .fold(
                        object_store::aws::AmazonS3Builder::from_env(),
                        |b, (key, value)| {
                            b.with_config(object_store::aws::AmazonS3ConfigKey::Client(*key), value)
                        },
                    )
                    .with_url(trimmed)
                    .with_retry(retry()?)
                    .build()
                    .map_err(|e| invalid(e.to_string()))?,
            ),
            "gs" if let Some(endpoint) = gcs_anonymous_endpoint(lookup) => {
                // A public bucket read as plain HTTPS: `gs://BUCKET/PATH` is
                // `ENDPOINT/BUCKET/PATH`, no credentials, no signature.
                let bucket = parsed
                    .host_str()
                    .ok_or_else(|| invalid("no bucket".into()))?;
                let parts: Vec<String> = prefix.parts().map(|p| p.as_ref().to_string()).collect();
                let prefix = ObjectPath::from_iter(
                    std::iter::once(bucket).chain(parts.iter().map(String::as_str)),
                );
                let store = object_store::http::HttpBuilder::new()
                    .with_url(endpoint.trim_end_matches('/'))
                    .with_client_options(http_options(&endpoint, &timeouts))
                    .with_retry(retry()?)
                    .build()
                    .map_err(|e| invalid(e.to_string()))?;
                return Ok(Self {
                    url: url.to_string(),
                    store: Arc::new(store),
                    prefix,
                    local_root: None,
                    gets: Arc::default(),
                });
            }
            "gs" => Arc::new(
                timeouts
                    .iter()
                    .fold(
                        object_store::gcp::GoogleCloudStorageBuilder::from_env(),
                        |b, (key, value)| {
                            b.with_config(object_store::gcp::GoogleConfigKey::Client(*key), value)
                        },
                    )
                    .with_url(trimmed)
                    .with_retry(retry()?)
                    .build()
                    .map_err(|e| invalid(e.to_string()))?,
            ),
            "az" | "abfs" | "abfss" | "azure" | "adl" => Arc::new(
                timeouts
                    .iter()
                    .fold(
                        object_store::azure::MicrosoftAzureBuilder::from_env(),
                        |b, (key, value)| {
                            b.with_config(object_store::azure::AzureConfigKey::Client(*key), value)
                        },
                    )
                    .with_url(trimmed)
                    .with_retry(retry()?)
                    .build()
                    .map_err(|e| invalid(e.to_string()))?,
            ),
            "http" | "https" => {
                let mut base = parsed.clone();
                base.set_path("");
                let store = object_store::http::HttpBuilder::new()
                    .with_url(base.as_str())
                    .with_client_options(http_options(base.as_str(), &timeouts))
                    .with_retry(retry()?)
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
            local_root: None,
            gets: Arc::default(),
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
            local_root: Some(Arc::from(canonical.as_path())),
            gets: Arc::default(),
        })
    }

    /// Wraps an existing object store (tests, custom clients).
    pub fn from_store(url: impl Into<String>, store: Arc<dyn ObjectStore>, prefix: &str) -> Self {
        Self {
            url: url.into(),
            store,
            prefix: ObjectPath::from(prefix),
            local_root: None,
            gets: Arc::default(),
        }
    }

    /// The store's folder when it is on a local filesystem (read it with [`read_local`]).
    pub fn local_root(&self) -> Option<&Arc<std::path::Path>> {
        self.local_root.as_ref()
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
        Ok(self.get_versioned(key).await?.map(|(bytes, _)| bytes))
    }

    /// Reads a whole object with its version (from the same answer as its bytes); `Ok(None)`
    /// when it does not exist. Concurrent reads of one object share one request, and an object
    /// refused lately is not asked for again (see [`REFUSAL_MEMO`]).
    pub async fn get_versioned(&self, key: &str) -> Result<Option<(Bytes, ObjectVersion)>> {
        let read = {
            let mut state = self.gets.lock();
            if let Some((at, refusal)) = state.refused.get(key) {
                if at.elapsed() < REFUSAL_MEMO {
                    return Err(StoreError::Shared(refusal.clone()));
                }
                state.refused.remove(key);
            }
            match state.in_flight.get(key) {
                Some(read) => read.clone(),
                None => {
                    // Spawned while the lock is held: the task's own bookkeeping, under the
                    // same lock, comes after the entry is in place.
                    let (this, owned) = (self.clone(), key.to_string());
                    let task = tokio::spawn(async move {
                        let outcome = this.get_once(&owned).await.map_err(Arc::new);
                        let mut state = this.gets.lock();
                        state.in_flight.remove(&owned);
                        if let Err(refusal) = &outcome
                            && refusal.is_refusal()
                        {
                            if state.refused.len() >= 4096 {
                                state
                                    .refused
                                    .retain(|_, (at, _)| at.elapsed() < REFUSAL_MEMO);
                            }
                            state
                                .refused
                                .insert(owned, (std::time::Instant::now(), refusal.clone()));
                        }
                        outcome
                    });
                    let url = format!("{}/{key}", self.url.trim_end_matches('/'));
                    let read: SharedRead = async move {
                        task.await.unwrap_or_else(|e| {
                            Err(Arc::new(StoreError::Io {
                                path: url,
                                source: std::io::Error::other(format!("read task failed: {e}")),
                            }))
                        })
                    }
                    .boxed()
                    .shared();
                    state.in_flight.insert(key.to_string(), read.clone());
                    read
                }
            }
        };
        read.await.map_err(StoreError::unshare)
    }

    /// One request for `key`, not shared.
    async fn get_once(&self, key: &str) -> Result<Option<(Bytes, ObjectVersion)>> {
        let path = self.path(key);
        let fetched = async {
            let answer = self.store.get(&path).await?;
            let version = ObjectVersion::of_object(&answer.meta);
            Ok((answer.bytes().await?, version))
        }
        .await;
        match fetched {
            Ok(read) => Ok(Some(read)),
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

/// Client options for a plain HTTP(S) store at `base`, with `timeouts`: an `http://` URL was
/// asked for by name (a mirror, a test server), so it is allowed rather than refused as insecure.
fn http_options(base: &str, timeouts: &[(ClientConfigKey, String)]) -> object_store::ClientOptions {
    timeouts.iter().fold(
        object_store::ClientOptions::new().with_allow_http(base.starts_with("http://")),
        |options, (key, value)| options.with_config(*key, value),
    )
}

/// The request timeouts of remote stores set by `ATMOREP_STORE_TIMEOUT_SECS` and
/// `ATMOREP_STORE_CONNECT_TIMEOUT_SECS` (looked up by `var`), as client settings for the object
/// store builders; unset ones keep object_store's defaults (30 s and 5 s). The error names the
/// variable and its bad value.
pub fn client_timeouts_from(
    var: impl Fn(&str) -> Option<String>,
) -> std::result::Result<Vec<(ClientConfigKey, String)>, String> {
    let mut settings = Vec::new();
    for (name, key) in [
        ("ATMOREP_STORE_TIMEOUT_SECS", ClientConfigKey::Timeout),
        (
            "ATMOREP_STORE_CONNECT_TIMEOUT_SECS",
            ClientConfigKey::ConnectTimeout,
        ),
    ] {
        let Some(text) = var(name).filter(|t| !t.trim().is_empty()) else {
            continue;
        };
        match text.trim().parse::<u64>() {
            Ok(secs) if secs > 0 => settings.push((key, format!("{secs}s"))),
            _ => {
                return Err(format!(
                    "{name}={text:?} is not a positive whole number of seconds"
                ));
            }
        }
    }
    Ok(settings)
}

/// Google credentials `object_store` would look for; with none of them (and no gcloud
/// application-default credentials file), a `gs://` URL is read anonymously.
const GOOGLE_CREDENTIAL_VARIABLES: [&str; 4] = [
    "GOOGLE_SERVICE_ACCOUNT",
    "GOOGLE_SERVICE_ACCOUNT_PATH",
    "GOOGLE_SERVICE_ACCOUNT_KEY",
    "GOOGLE_APPLICATION_CREDENTIALS",
];

/// Where `gs://` URLs are read anonymously, if they are: public buckets (ARCO-ERA5,
/// WeatherBench2) need no account, and without one `object_store`'s GCS client would wait on a
/// metadata server that is not there. Anonymous when `ATMOREP_GCS_ANONYMOUS` is `true`, or
/// when no Google credentials are configured; the endpoint is `ATMOREP_GCS_ENDPOINT` (default
/// `https://storage.googleapis.com`, which serves `BUCKET/PATH` of public buckets).
pub fn gcs_anonymous_endpoint(lookup: &dyn Fn(&str) -> Option<String>) -> Option<String> {
    let set = |name: &str| lookup(name).is_some_and(|v| !v.trim().is_empty());
    let forced = lookup("ATMOREP_GCS_ANONYMOUS")
        .is_some_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes"));
    let adc = lookup("HOME").is_some_and(|home| {
        std::path::Path::new(&home)
            .join(".config/gcloud/application_default_credentials.json")
            .exists()
    });
    let credentials = GOOGLE_CREDENTIAL_VARIABLES.iter().any(|v| set(v)) || adc;
    (forced || !credentials).then(|| {
        lookup("ATMOREP_GCS_ENDPOINT")
            .filter(|e| !e.trim().is_empty())
            .unwrap_or_else(|| "https://storage.googleapis.com".to_string())
    })
}

/// The retry policy of remote stores: object_store's defaults (10 retries within 3 minutes,
/// backoff from 100 ms doubling up to 15 s, with jitter) unless the `ATMOREP_STORE_*` variables
/// in the module docs say otherwise. The error names the variable and its bad value.
pub fn retry_config_from_env() -> std::result::Result<RetryConfig, String> {
    retry_config_from(|name| std::env::var(name).ok())
}

/// [`retry_config_from_env`] with the variables looked up by `var` (tests, embedding).
pub fn retry_config_from(
    var: impl Fn(&str) -> Option<String>,
) -> std::result::Result<RetryConfig, String> {
    let number = |name: &str| -> std::result::Result<Option<u64>, String> {
        match var(name) {
            None => Ok(None),
            Some(text) if text.trim().is_empty() => Ok(None),
            Some(text) => text
                .trim()
                .parse::<u64>()
                .map(Some)
                .map_err(|_| format!("{name}={text:?} is not a whole number")),
        }
    };
    let defaults = RetryConfig::default();
    let max_retries = match number("ATMOREP_STORE_MAX_RETRIES")? {
        Some(n) => {
            usize::try_from(n).map_err(|_| format!("ATMOREP_STORE_MAX_RETRIES={n} is too large"))?
        }
        None => defaults.max_retries,
    };
    let retry_timeout = number("ATMOREP_STORE_RETRY_TIMEOUT_SECS")?
        .map_or(defaults.retry_timeout, Duration::from_secs);
    let init_backoff = number("ATMOREP_STORE_BACKOFF_MS")?
        .map_or(defaults.backoff.init_backoff, Duration::from_millis);
    let max_backoff = number("ATMOREP_STORE_MAX_BACKOFF_MS")?
        .map_or(defaults.backoff.max_backoff, Duration::from_millis)
        .max(init_backoff);
    Ok(RetryConfig {
        backoff: BackoffConfig {
            init_backoff,
            max_backoff,
            base: defaults.backoff.base,
        },
        max_retries,
        retry_timeout,
    })
}

/// Reads the object `key` of the local store at `root` (opened from `url`) into `buf`, replacing
/// its contents, and returns the file's version as it was after the read (a rewrite during the
/// read shows); `Ok(None)` when it does not exist. Chunk reads use this instead of the object
/// store's local reader, which zero-fills a new buffer per read on a blocking-pool thread: with
/// a buffer kept per decoding thread, a read touches no fresh memory (page faults were a third of
/// the pipeline's system time).
pub fn read_local(
    root: &std::path::Path,
    url: &str,
    key: &str,
    buf: &mut Vec<u8>,
) -> Result<Option<ObjectVersion>> {
    use std::io::Read as _;
    let mut path = root.to_path_buf();
    path.extend(key.split('/').filter(|s| !s.is_empty()));
    buf.clear();
    let read = std::fs::File::open(&path).and_then(|mut file| {
        file.read_to_end(buf)?;
        file.metadata()
    });
    local_outcome(read.map(|meta| ObjectVersion::of_file(&meta)), || {
        format!("{}/{}", url.trim_end_matches('/'), key)
    })
}

/// A local read's outcome as the object store reports one: a missing file is `None`, any other
/// failure an object-store error naming the object's URL.
pub(crate) fn local_outcome<T>(
    read: std::io::Result<T>,
    url: impl FnOnce() -> String,
) -> Result<Option<T>> {
    match read {
        Ok(value) => Ok(Some(value)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(StoreError::ObjectStore {
            url: url(),
            source: object_store::Error::Generic {
                store: "LocalFileSystem",
                source: Box::new(source),
            },
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_reads_replace_the_buffer_report_missing_objects_and_name_failures() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("t/c/0")).unwrap();
        std::fs::write(dir.path().join("t/c/0/1"), b"chunk").unwrap();
        let location = StoreLocation::open(dir.path().to_str().unwrap()).unwrap();
        let root = location
            .local_root()
            .expect("a path is a local store")
            .clone();
        let mut buf = b"left from an earlier, longer read".to_vec();
        let version = read_local(&root, "store.zarr", "t/c/0/1", &mut buf).unwrap();
        assert_eq!(buf, b"chunk");
        assert!(matches!(version, Some(ObjectVersion::Present(_))));
        assert_eq!(
            read_local(&root, "store.zarr", "t/c/0/2", &mut buf).unwrap(),
            None
        );
        // A key that is a folder cannot be read: the error names the object.
        let err = read_local(&root, "store.zarr/", "t/c/0", &mut buf).unwrap_err();
        assert!(err.to_string().contains("`store.zarr/t/c/0`"), "{err}");
        let remote = StoreLocation::from_store(
            "memory://",
            Arc::new(object_store::memory::InMemory::new()),
            "",
        );
        assert!(remote.local_root().is_none());
    }

    fn lookup(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let pairs: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        }
    }

    #[test]
    fn gs_is_anonymous_https_without_google_credentials() {
        let none = lookup(&[]);
        assert_eq!(
            gcs_anonymous_endpoint(&none).as_deref(),
            Some("https://storage.googleapis.com")
        );
        let with_key = lookup(&[("GOOGLE_APPLICATION_CREDENTIALS", "/k.json")]);
        assert_eq!(gcs_anonymous_endpoint(&with_key), None);
        let forced = lookup(&[
            ("GOOGLE_APPLICATION_CREDENTIALS", "/k.json"),
            ("ATMOREP_GCS_ANONYMOUS", "true"),
            ("ATMOREP_GCS_ENDPOINT", "http://127.0.0.1:9"),
        ]);
        assert_eq!(
            gcs_anonymous_endpoint(&forced).as_deref(),
            Some("http://127.0.0.1:9")
        );
        // Opening needs no credentials and no network: the bucket becomes the first part of
        // the path under the HTTPS endpoint.
        let arco = "gs://gcp-public-data-arco-era5/ar/full_37-1h-0p25deg-chunk-1.zarr-v3";
        let location = StoreLocation::open_with_env(arco, &none).unwrap();
        assert_eq!(location.url(), arco);
        assert_eq!(
            location.path(".zmetadata").as_ref(),
            "gcp-public-data-arco-era5/ar/full_37-1h-0p25deg-chunk-1.zarr-v3/.zmetadata"
        );
    }

    #[test]
    fn retry_defaults_are_object_stores() {
        let config = retry_config_from(lookup(&[])).unwrap();
        let defaults = RetryConfig::default();
        assert_eq!(config.max_retries, defaults.max_retries);
        assert_eq!(config.retry_timeout, defaults.retry_timeout);
        assert_eq!(config.backoff.init_backoff, defaults.backoff.init_backoff);
        assert_eq!(config.backoff.max_backoff, defaults.backoff.max_backoff);
    }

    #[test]
    fn retry_settings_from_variables() {
        let config = retry_config_from(lookup(&[
            ("ATMOREP_STORE_MAX_RETRIES", "3"),
            ("ATMOREP_STORE_RETRY_TIMEOUT_SECS", "20"),
            ("ATMOREP_STORE_BACKOFF_MS", "5"),
            ("ATMOREP_STORE_MAX_BACKOFF_MS", "50"),
        ]))
        .unwrap();
        assert_eq!(config.max_retries, 3);
        assert_eq!(config.retry_timeout, Duration::from_secs(20));
        assert_eq!(config.backoff.init_backoff, Duration::from_millis(5));
        assert_eq!(config.backoff.max_backoff, Duration::from_millis(50));
    }

    #[test]
    fn request_timeouts_from_variables_and_bad_ones_named() {
        assert!(client_timeouts_from(lookup(&[])).unwrap().is_empty());
        let set = client_timeouts_from(lookup(&[
            ("ATMOREP_STORE_TIMEOUT_SECS", "7"),
            ("ATMOREP_STORE_CONNECT_TIMEOUT_SECS", "2"),
        ]))
        .unwrap();
        assert_eq!(
            set,
            vec![
                (ClientConfigKey::Timeout, "7s".to_string()),
                (ClientConfigKey::ConnectTimeout, "2s".to_string())
            ]
        );
        // The builders take them: the options read back what was set.
        let options = http_options("http://127.0.0.1:9", &set);
        assert_eq!(
            options
                .get_config_value(&ClientConfigKey::Timeout)
                .as_deref(),
            Some("7s")
        );
        for bad in ["0", "soon", "-3"] {
            let err =
                client_timeouts_from(lookup(&[("ATMOREP_STORE_TIMEOUT_SECS", bad)])).unwrap_err();
            assert!(err.contains("ATMOREP_STORE_TIMEOUT_SECS"), "{err}");
            assert!(err.contains(bad), "{err}");
        }
        // Opening an S3 URL with a bad one fails naming the variable.
        let err = StoreLocation::open_with_env(
            "s3://bucket/store.zarr",
            &lookup(&[("ATMOREP_STORE_CONNECT_TIMEOUT_SECS", "x")]),
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("ATMOREP_STORE_CONNECT_TIMEOUT_SECS"),
            "{err}"
        );
    }

    #[test]
    fn bad_retry_setting_names_the_variable() {
        let err = retry_config_from(lookup(&[("ATMOREP_STORE_MAX_RETRIES", "many")])).unwrap_err();
        assert!(err.contains("ATMOREP_STORE_MAX_RETRIES"), "{err}");
        assert!(err.contains("many"), "{err}");
    }
}
