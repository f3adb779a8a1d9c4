//! How a client reaches its loaders: endpoints, TLS, the bearer token, message and HTTP/2
//! limits, prefetch, compression and the reconnect policy, readable from TOML or JSON.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tonic::codec::CompressionEncoding;

/// gRPC compression of the batches the server sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Compression {
    Gzip,
    Zstd,
}

impl From<Compression> for CompressionEncoding {
    fn from(c: Compression) -> Self {
        match c {
            Compression::Gzip => Self::Gzip,
            Compression::Zstd => Self::Zstd,
        }
    }
}

/// When and how often to reconnect. Failures count from the last batch received: every complete
/// batch resets both the attempt counter and the deadline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ReconnectPolicy {
    /// Wait before the first retry; doubles with every consecutive failure.
    #[serde(rename = "initial_backoff_ms", with = "millis")]
    pub initial_backoff: Duration,
    /// Longest wait between two attempts.
    #[serde(rename = "max_backoff_ms", with = "millis")]
    pub max_backoff: Duration,
    /// Give up after this many consecutive failed attempts (`None`: never for this reason).
    pub max_attempts: Option<u32>,
    /// Give up when no batch arrived for this long (`None`: never for this reason).
    #[serde(rename = "give_up_after_ms", with = "opt_millis")]
    pub give_up_after: Option<Duration>,
}

impl Default for ReconnectPolicy {
    /// 100 ms doubling to 5 s, unlimited attempts within 10 minutes: long enough for a loader
    /// to restart and reopen its stores.
    fn default() -> Self {
        Self {
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            max_attempts: None,
            give_up_after: Some(Duration::from_secs(600)),
        }
    }
}

impl ReconnectPolicy {
    /// The wait before retry number `attempt` (1-based), without jitter.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let factor = 2u32.saturating_pow(attempt.saturating_sub(1));
        self.initial_backoff
            .saturating_mul(factor)
            .min(self.max_backoff)
    }
}

/// How to reach the loader.
#[derive(Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct ClientConfig {
    /// Loader addresses, tried round-robin: `http://host:port`, `https://host:port`, or
    /// `host:port` (https when TLS is configured, http otherwise).
    pub endpoints: Vec<String>,
    /// Sent as `authorization: Bearer <token>` with every call.
    pub bearer_token: Option<String>,
    /// PEM of the CA that signed the servers' certificates (enables TLS).
    pub tls_ca_pem: Option<Vec<u8>>,
    /// Name to verify the server certificate against, when it differs from the endpoint's host.
    pub tls_domain: Option<String>,
    /// Largest message accepted or sent (tonic's default of 4 MiB is far below one batch).
    pub max_message_bytes: usize,
    /// Decoded batches kept ready ahead of the consumer (at least 1).
    pub prefetch: usize,
    pub reconnect: ReconnectPolicy,
    /// Ask the server to compress batches (worth it only on slow links: it costs CPU on both
    /// sides). Requests are never compressed, so any server accepts them.
    pub compression: Option<Compression>,
    #[serde(rename = "connect_timeout_ms", with = "millis")]
    pub connect_timeout: Duration,
    /// HTTP/2 flow-control windows. Large windows keep a fast link busy; they also bound how
    /// much undecoded data sits in the transport when the consumer is slow.
    pub stream_window_bytes: u32,
    pub connection_window_bytes: u32,
    /// Largest HTTP/2 frame the server may send us (16 KiB to 16 MiB − 1). The protocol's
    /// default of 16 KiB cuts a batch into thousands of frames that both sides handle one by
    /// one (docs/performance.md measures the sizes).
    pub max_frame_bytes: u32,
    /// HTTP/2 keep-alive pings, so a server that vanished without closing the connection is
    /// noticed (`None`: no pings).
    #[serde(rename = "keepalive_interval_ms", with = "opt_millis")]
    pub keepalive_interval: Option<Duration>,
    #[serde(rename = "keepalive_timeout_ms", with = "millis")]
    pub keepalive_timeout: Duration,
    /// Spread each training-mode stream over all endpoints at once (see the module docs)
    /// instead of using one at a time. Off by default: an endpoint list has always meant
    /// replicas to fail over between, and a striped stream has another order and another
    /// meaning of its cursor, so turning it on silently would break the resumption of existing
    /// checkpoints. Has no effect with a single endpoint.
    pub stripe: bool,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            endpoints: Vec::new(),
            bearer_token: None,
            tls_ca_pem: None,
            tls_domain: None,
            max_message_bytes: 256 << 20,
            prefetch: 4,
            reconnect: ReconnectPolicy::default(),
            compression: None,
            connect_timeout: Duration::from_secs(5),
            stream_window_bytes: 8 << 20,
            connection_window_bytes: 16 << 20,
            max_frame_bytes: 1 << 20,
            keepalive_interval: Some(Duration::from_secs(20)),
            keepalive_timeout: Duration::from_secs(20),
            stripe: false,
        }
    }
}

impl ClientConfig {
    /// The defaults with these endpoints.
    pub fn new<S: Into<String>>(endpoints: impl IntoIterator<Item = S>) -> Self {
        Self {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            ..Self::default()
        }
    }
}

impl fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the token: configs end up in logs.
        f.debug_struct("ClientConfig")
            .field("endpoints", &self.endpoints)
            .field(
                "bearer_token",
                &self.bearer_token.as_ref().map(|_| "<redacted>"),
            )
            .field("tls_ca_pem", &self.tls_ca_pem.as_ref().map(Vec::len))
            .field("tls_domain", &self.tls_domain)
            .field("max_message_bytes", &self.max_message_bytes)
            .field("prefetch", &self.prefetch)
            .field("reconnect", &self.reconnect)
            .field("compression", &self.compression)
            .field("connect_timeout", &self.connect_timeout)
            .field("stream_window_bytes", &self.stream_window_bytes)
            .field("connection_window_bytes", &self.connection_window_bytes)
            .field("max_frame_bytes", &self.max_frame_bytes)
            .field("keepalive_interval", &self.keepalive_interval)
            .field("keepalive_timeout", &self.keepalive_timeout)
            .field("stripe", &self.stripe)
            .finish()
    }
}

/// `Duration` as integer milliseconds (readable in TOML).
mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

/// `Option<Duration>` as integer milliseconds.
mod opt_millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&(d.as_millis() as u64)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Option::<u64>::deserialize(d).map(|ms| ms.map(Duration::from_millis))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let p = ReconnectPolicy {
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
            ..ReconnectPolicy::default()
        };
        let ms: Vec<u128> = (1..=6).map(|a| p.backoff(a).as_millis()).collect();
        assert_eq!(ms, vec![100, 200, 400, 800, 1000, 1000]);
        assert_eq!(p.backoff(200), Duration::from_secs(1));
    }

    #[test]
    fn config_serde_and_debug() {
        let mut config = ClientConfig::new(["127.0.0.1:50051"]);
        config.bearer_token = Some("secret".into());
        config.compression = Some(Compression::Zstd);
        let json = serde_json::to_string(&config).unwrap();
        assert!(json.contains("\"initial_backoff_ms\":100"), "{json}");
        let back: ClientConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(back.reconnect, config.reconnect);
        assert_eq!(back.compression, Some(Compression::Zstd));
        let partial: ClientConfig =
            serde_json::from_str(r#"{"endpoints": ["a:1"], "prefetch": 2}"#).unwrap();
        assert_eq!(partial.prefetch, 2);
        assert_eq!(partial.max_message_bytes, 256 << 20);
        assert!(!format!("{config:?}").contains("secret"));
    }
}
