//! The server's TOML configuration (`atmorep loader serve --config loader.toml`).

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::pipeline::cost::{self, RequestLimits};
use crate::store::missing::MissingChunks;

/// Everything a loader server needs to start.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// gRPC address; loopback unless TLS and a token are configured.
    #[serde(default = "default_bind")]
    pub bind: SocketAddr,
    /// Prometheus scrape address (`/metrics`); none when absent.
    #[serde(default)]
    pub metrics_bind: Option<SocketAddr>,
    /// Decoded-chunk cache shared by every dataset and stream.
    #[serde(default = "default_cache_mib")]
    pub cache_mib: u64,
    /// Read only the blosc blocks a sample needs when it uses a small part of a chunk (by byte
    /// range, then decoding those blocks alone); off, every read fetches and decodes whole
    /// chunks (docs/performance.md, "Reading only the blosc blocks a request uses").
    #[serde(default = "default_block_reads")]
    pub block_reads: bool,
    /// Samples in flight plus batches waiting to be sent, over all streams.
    #[serde(default = "default_budget_mib")]
    pub memory_budget_mib: u64,
    /// Target size of one gRPC message; bigger batches are split into parts (by sample). Smaller
    /// parts keep the encode buffers small enough to be reused instead of faulted in afresh.
    #[serde(default = "default_message_mib")]
    pub max_message_mib: usize,
    /// Finished batches each stream keeps ready.
    #[serde(default = "default_prefetch")]
    pub prefetch_batches: usize,
    /// Samples each stream assembles at once.
    #[serde(default = "default_concurrency")]
    pub sample_concurrency: usize,
    /// Largest batch a request may ask for.
    #[serde(default = "default_max_batch")]
    pub max_batch_size: u32,
    /// Tokens of one sample, summed over its fields and levels.
    #[serde(default = "default_max_tokens")]
    pub max_tokens_per_sample: u64,
    /// One batch in memory (sources, targets, token info, positional encodings); batches are
    /// also bounded by `memory_budget_mib`.
    #[serde(default = "default_max_batch_mib")]
    pub max_batch_mib: u64,
    /// The read windows of one sample, blur halos included.
    #[serde(default = "default_max_window_mib")]
    pub max_window_mib: u64,
    /// Samples in one epoch (training: blocks × samples per block; tiles: tiles).
    #[serde(default = "default_max_samples_per_epoch")]
    pub max_samples_per_epoch: u64,
    /// Gaussian blur sigma in grid points (also kept below a quarter of the grid's latitudes).
    #[serde(default = "default_max_blur_sigma")]
    pub max_blur_sigma: f64,
    /// Concurrent HTTP/2 streams (calls) one connection may open (HTTP/2
    /// `SETTINGS_MAX_CONCURRENT_STREAMS`: a client queues calls beyond it).
    #[serde(default = "default_max_streams_per_connection")]
    pub max_streams_per_connection: u32,
    /// `StreamBatches` calls open at once over all connections; one more → RESOURCE_EXHAUSTED.
    #[serde(default = "default_max_streams")]
    pub max_streams: u32,
    /// Open connections; one more is closed as soon as it is accepted.
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
    /// HTTP/2 keep-alive: a ping after this many seconds without a frame from the client.
    #[serde(default = "default_keepalive_interval_s")]
    pub keepalive_interval_s: u64,
    /// HTTP/2 keep-alive: a connection whose ping is not answered within this is closed.
    #[serde(default = "default_keepalive_timeout_s")]
    pub keepalive_timeout_s: u64,
    /// A connection from which nothing arrives for this long is closed (a live HTTP/2 client
    /// answers keep-alive pings, so this catches sockets that never speak HTTP/2).
    #[serde(default = "default_idle_timeout_s")]
    pub connection_idle_timeout_s: u64,
    /// A stream whose client takes nothing for this long is dropped, and its memory budget with
    /// it.
    #[serde(default = "default_idle_timeout_s")]
    pub stream_idle_timeout_s: u64,
    /// Bearer token clients must send (`authorization: Bearer …`).
    #[serde(default)]
    pub token: Option<String>,
    /// Name of an environment variable holding the token (keeps it out of the file).
    #[serde(default)]
    pub token_env: Option<String>,
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Allows a non-loopback bind without TLS and a token (a private network you trust).
    #[serde(default)]
    pub allow_insecure: bool,
    /// May be empty in a file whose datasets come from the command line (`serve --dataset`).
    #[serde(default)]
    pub datasets: Vec<DatasetConfig>,
}

/// PEM files of the server's certificate chain and key.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// One dataset the server offers.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetConfig {
    pub name: String,
    /// Store URL or path.
    pub url: String,
    #[serde(default)]
    pub description: String,
    /// Statistics folder (`STORE.stats` next to a local store when absent).
    #[serde(default)]
    pub stats: Option<PathBuf>,
    /// What a read of a chunk the store lacks does: `fill` (the fill value, Zarr's rule) or
    /// `error` (DATA_LOSS naming the chunk).
    #[serde(default)]
    pub missing_chunks: MissingChunks,
}

fn default_bind() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 50051))
}
fn default_cache_mib() -> u64 {
    4096
}
fn default_block_reads() -> bool {
    true
}
fn default_budget_mib() -> u64 {
    1024
}
fn default_message_mib() -> usize {
    16
}
fn default_prefetch() -> usize {
    2
}
fn default_concurrency() -> usize {
    16
}
fn default_max_batch() -> u32 {
    256
}
fn default_max_tokens() -> u64 {
    cost::DEFAULT_MAX_TOKENS_PER_SAMPLE
}
fn default_max_batch_mib() -> u64 {
    cost::DEFAULT_MAX_BATCH_MIB
}
fn default_max_window_mib() -> u64 {
    cost::DEFAULT_MAX_WINDOW_MIB
}
fn default_max_samples_per_epoch() -> u64 {
    cost::DEFAULT_MAX_SAMPLES_PER_EPOCH
}
fn default_max_blur_sigma() -> f64 {
    cost::DEFAULT_MAX_BLUR_SIGMA
}
fn default_max_streams_per_connection() -> u32 {
    32
}
fn default_max_streams() -> u32 {
    128
}
fn default_max_connections() -> u32 {
    256
}
fn default_keepalive_interval_s() -> u64 {
    30
}
fn default_keepalive_timeout_s() -> u64 {
    20
}
fn default_idle_timeout_s() -> u64 {
    120
}

/// Why a configuration cannot start a server.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read `{path}`: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("bad configuration `{path}`: {detail}")]
    Parse { path: PathBuf, detail: String },
    #[error("configuration: {0}")]
    Invalid(String),
}

impl ServerConfig {
    /// Reads and checks a TOML file.
    pub fn load(path: &std::path::Path) -> Result<Self, ConfigError> {
        let config = Self::read(path)?;
        config.check()?;
        Ok(config)
    }

    /// Reads a TOML file without checking it, for a caller that completes it first (datasets
    /// given on the command line) and then calls [`ServerConfig::check`].
    pub fn read(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let config: Self = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?;
        Ok(config)
    }

    /// A configuration serving `datasets` with defaults for everything else.
    pub fn with_datasets(datasets: Vec<DatasetConfig>) -> Self {
        Self {
            bind: default_bind(),
            metrics_bind: None,
            cache_mib: default_cache_mib(),
            block_reads: default_block_reads(),
            memory_budget_mib: default_budget_mib(),
            max_message_mib: default_message_mib(),
            prefetch_batches: default_prefetch(),
            sample_concurrency: default_concurrency(),
            max_batch_size: default_max_batch(),
            max_tokens_per_sample: default_max_tokens(),
            max_batch_mib: default_max_batch_mib(),
            max_window_mib: default_max_window_mib(),
            max_samples_per_epoch: default_max_samples_per_epoch(),
            max_blur_sigma: default_max_blur_sigma(),
            max_streams_per_connection: default_max_streams_per_connection(),
            max_streams: default_max_streams(),
            max_connections: default_max_connections(),
            keepalive_interval_s: default_keepalive_interval_s(),
            keepalive_timeout_s: default_keepalive_timeout_s(),
            connection_idle_timeout_s: default_idle_timeout_s(),
            stream_idle_timeout_s: default_idle_timeout_s(),
            token: None,
            token_env: None,
            tls: None,
            allow_insecure: false,
            datasets,
        }
    }

    /// The bearer token, from the file or the named environment variable.
    pub fn bearer_token(&self) -> Result<Option<String>, ConfigError> {
        if let Some(token) = &self.token {
            return Ok(Some(token.clone()));
        }
        match &self.token_env {
            Some(var) => std::env::var(var).map(Some).map_err(|_| {
                ConfigError::Invalid(format!(
                    "token_env: environment variable `{var}` is not set"
                ))
            }),
            None => Ok(None),
        }
    }

    /// The limits every request is checked against before anything is allocated for it.
    pub fn request_limits(&self) -> RequestLimits {
        RequestLimits {
            max_tokens_per_sample: self.max_tokens_per_sample,
            max_batch_mib: self.max_batch_mib,
            memory_budget_mib: self.memory_budget_mib,
            max_window_mib: self.max_window_mib,
            max_samples_per_epoch: self.max_samples_per_epoch,
            max_blur_sigma: self.max_blur_sigma,
        }
    }

    /// Refuses configurations that would expose data unprotected or cannot work.
    pub fn check(&self) -> Result<(), ConfigError> {
        if self.datasets.is_empty() {
            return Err(ConfigError::Invalid("no [[datasets]] configured".into()));
        }
        let mut names = std::collections::HashSet::new();
        for d in &self.datasets {
            if d.name.is_empty() || !names.insert(d.name.as_str()) {
                return Err(ConfigError::Invalid(format!(
                    "dataset names must be unique and non-empty (`{}`)",
                    d.name
                )));
            }
        }
        if self.max_message_mib == 0 || self.max_batch_size == 0 || self.memory_budget_mib == 0 {
            return Err(ConfigError::Invalid(
                "max_message_mib, max_batch_size and memory_budget_mib must be positive".into(),
            ));
        }
        let limits = [
            ("max_tokens_per_sample", self.max_tokens_per_sample),
            ("max_batch_mib", self.max_batch_mib),
            ("max_window_mib", self.max_window_mib),
            ("max_samples_per_epoch", self.max_samples_per_epoch),
        ];
        if let Some((key, _)) = limits.iter().find(|(_, v)| *v == 0) {
            return Err(ConfigError::Invalid(format!("{key} must be positive")));
        }
        let connection_limits = [
            (
                "max_streams_per_connection",
                u64::from(self.max_streams_per_connection),
            ),
            ("max_streams", u64::from(self.max_streams)),
            ("max_connections", u64::from(self.max_connections)),
            ("keepalive_interval_s", self.keepalive_interval_s),
            ("keepalive_timeout_s", self.keepalive_timeout_s),
            ("connection_idle_timeout_s", self.connection_idle_timeout_s),
            ("stream_idle_timeout_s", self.stream_idle_timeout_s),
        ];
        if let Some((key, _)) = connection_limits.iter().find(|(_, v)| *v == 0) {
            return Err(ConfigError::Invalid(format!("{key} must be positive")));
        }
        // A live client's only traffic may be its answers to keep-alive pings.
        if self.connection_idle_timeout_s <= self.keepalive_interval_s {
            return Err(ConfigError::Invalid(format!(
                "connection_idle_timeout_s = {} must exceed keepalive_interval_s = {} (an idle \
                 but live client only answers keep-alive pings)",
                self.connection_idle_timeout_s, self.keepalive_interval_s
            )));
        }
        if !(self.max_blur_sigma.is_finite() && self.max_blur_sigma >= 0.0) {
            return Err(ConfigError::Invalid(format!(
                "max_blur_sigma = {} must be finite and ≥ 0",
                self.max_blur_sigma
            )));
        }
        let protected = self.tls.is_some() && self.bearer_token()?.is_some();
        if !self.bind.ip().is_loopback() && !protected && !self.allow_insecure {
            return Err(ConfigError::Invalid(format!(
                "bind {} is beyond loopback: configure [tls] and a token (or allow_insecure = true)",
                self.bind
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_minimal_file_gets_defaults_and_exposure_is_refused() {
        let config: ServerConfig = toml::from_str(
            r#"
            [[datasets]]
            name = "era5"
            url = "demo.zarr"
            "#,
        )
        .unwrap();
        assert_eq!(config.bind, default_bind());
        config.check().unwrap();

        let exposed = ServerConfig {
            bind: "0.0.0.0:50051".parse().unwrap(),
            ..config.clone()
        };
        assert!(exposed.check().unwrap_err().to_string().contains("[tls]"));
        let trusted = ServerConfig {
            allow_insecure: true,
            ..exposed
        };
        trusted.check().unwrap();

        let twice = ServerConfig {
            datasets: vec![config.datasets[0].clone(), config.datasets[0].clone()],
            ..config
        };
        assert!(twice.check().is_err());
        assert!(toml::from_str::<ServerConfig>("bogus = 1\ndatasets = []").is_err());
    }

    #[test]
    fn request_limits_come_from_the_file_and_nonsense_limits_are_refused() {
        let config: ServerConfig = toml::from_str(
            r#"
            memory_budget_mib = 32
            max_tokens_per_sample = 1000
            max_batch_mib = 64
            max_blur_sigma = 2.5
            [[datasets]]
            name = "era5"
            url = "demo.zarr"
            "#,
        )
        .unwrap();
        config.check().unwrap();
        let limits = config.request_limits();
        assert_eq!(limits.max_tokens_per_sample, 1000);
        assert_eq!(limits.max_blur_sigma, 2.5);
        assert_eq!(limits.max_window_mib, cost::DEFAULT_MAX_WINDOW_MIB);
        // The memory budget is the smaller, so it bounds batches.
        let (bytes, key) = limits.batch_limit();
        assert_eq!(
            (bytes, key.as_str()),
            (32 << 20, "memory_budget_mib = 32 (33.6 MB)")
        );
        // A sigma whose halo leaves a 19-latitude grid is capped by the grid.
        assert_eq!(limits.blur_sigma_on(19), 2.5);
        assert_eq!(limits.blur_sigma_on(5), 1.0);

        let zero = ServerConfig {
            max_samples_per_epoch: 0,
            ..config.clone()
        };
        assert!(
            zero.check()
                .unwrap_err()
                .to_string()
                .contains("max_samples_per_epoch")
        );
        let nan = ServerConfig {
            max_blur_sigma: f64::NAN,
            ..config
        };
        assert!(
            nan.check()
                .unwrap_err()
                .to_string()
                .contains("max_blur_sigma")
        );
    }

    #[test]
    fn connection_limits_have_defaults_and_an_idle_timeout_must_outlast_keep_alive() {
        let config: ServerConfig = toml::from_str(
            r#"
            max_streams = 8
            keepalive_interval_s = 10
            connection_idle_timeout_s = 11
            [[datasets]]
            name = "era5"
            url = "demo.zarr"
            "#,
        )
        .unwrap();
        config.check().unwrap();
        assert_eq!(config.max_streams, 8);
        assert_eq!(config.max_streams_per_connection, 32);
        assert_eq!(config.stream_idle_timeout_s, 120);
        let short = ServerConfig {
            connection_idle_timeout_s: 10,
            ..config.clone()
        };
        let message = short.check().unwrap_err().to_string();
        assert!(
            message.contains("connection_idle_timeout_s = 10"),
            "{message}"
        );
        let zero = ServerConfig {
            max_connections: 0,
            ..config
        };
        assert!(
            zero.check()
                .unwrap_err()
                .to_string()
                .contains("max_connections")
        );
    }

    #[test]
    fn block_reads_are_on_by_default_and_a_file_may_turn_them_off() {
        let minimal = "[[datasets]]\nname = \"era5\"\nurl = \"demo.zarr\"\n";
        let config: ServerConfig = toml::from_str(minimal).unwrap();
        assert!(config.block_reads);
        assert!(ServerConfig::with_datasets(Vec::new()).block_reads);
        let off: ServerConfig = toml::from_str(&format!("block_reads = false\n{minimal}")).unwrap();
        assert!(!off.block_reads);
        off.check().unwrap();
        // A misspelt key is refused by name rather than silently leaving block reads on.
        let err = toml::from_str::<ServerConfig>(&format!("block_read = false\n{minimal}"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("block_read"), "{err}");
        let err = toml::from_str::<ServerConfig>(&format!("block_reads = \"no\"\n{minimal}"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("block_reads"), "{err}");
    }
}
