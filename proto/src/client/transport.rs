//! The connections to the loaders: one lazily connecting channel per endpoint (HTTP/2 settings,
//! TLS, keep-alive), the bearer token on every call, and the endpoint new calls start on.

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};

use tonic::Status;
use tonic::metadata::AsciiMetadataValue;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use super::{ClientConfig, ClientError};
use crate::pb;

/// Adds the bearer token to every call.
#[derive(Clone)]
pub(super) struct BearerAuth(pub(super) Option<AsciiMetadataValue>);

impl fmt::Debug for BearerAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() {
            "BearerAuth(<redacted>)"
        } else {
            "BearerAuth(none)"
        })
    }
}

impl Interceptor for BearerAuth {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

pub(super) type Grpc = pb::loader_client::LoaderClient<InterceptedService<Channel, BearerAuth>>;

#[derive(Debug)]
pub(super) struct Shared {
    /// (address as configured, lazily connecting channel).
    pub(super) endpoints: Vec<(String, Channel)>,
    /// The same endpoints, to open connections of their own (see [`Route::Stripe`]).
    pub(super) builders: Vec<Endpoint>,
    pub(super) auth: BearerAuth,
    pub(super) config: ClientConfig,
    /// The endpoint new calls start on: the last one that has not failed.
    pub(super) current: AtomicUsize,
}

impl Shared {
    pub(super) fn grpc(&self, index: usize) -> Grpc {
        self.grpc_on(self.endpoints[index].1.clone())
    }

    pub(super) fn grpc_on(&self, channel: Channel) -> Grpc {
        let mut client =
            pb::loader_client::LoaderClient::with_interceptor(channel, self.auth.clone())
                .max_decoding_message_size(self.config.max_message_bytes)
                .max_encoding_message_size(self.config.max_message_bytes);
        if let Some(c) = self.config.compression {
            client = client.accept_compressed(c.into());
        }
        client
    }

    pub(super) fn current(&self) -> usize {
        self.current.load(Ordering::Relaxed)
    }

    /// Moves new calls off `failed`; calls failing on the same endpoint at once move them once.
    pub(super) fn rotate(&self, failed: usize) -> usize {
        let next = (failed + 1) % self.endpoints.len();
        let _ = self
            .current
            .compare_exchange(failed, next, Ordering::Relaxed, Ordering::Relaxed);
        next
    }
}

/// HTTP/2's bounds on SETTINGS_MAX_FRAME_SIZE (RFC 9113 §6.5.2).
const MIN_FRAME_BYTES: u32 = 1 << 14;
const MAX_FRAME_BYTES: u32 = (1 << 24) - 1;

pub(super) fn endpoint(raw: &str, config: &ClientConfig) -> Result<Endpoint, ClientError> {
    let tls_configured = config.tls_ca_pem.is_some() || config.tls_domain.is_some();
    let uri = if raw.contains("://") {
        raw.to_string()
    } else if tls_configured {
        format!("https://{raw}")
    } else {
        format!("http://{raw}")
    };
    let https = uri.starts_with("https://");
    if tls_configured && !https {
        // tonic would silently connect in plaintext: refuse rather than leak the token.
        return Err(ClientError::Config(format!(
            "endpoint `{raw}` is not https:// but TLS is configured"
        )));
    }
    if !(MIN_FRAME_BYTES..=MAX_FRAME_BYTES).contains(&config.max_frame_bytes) {
        // h2 asserts on this range; a config must not be able to panic the client.
        return Err(ClientError::Config(format!(
            "max_frame_bytes = {} is outside HTTP/2's {MIN_FRAME_BYTES}..={MAX_FRAME_BYTES}",
            config.max_frame_bytes
        )));
    }
    let invalid = |source| ClientError::InvalidEndpoint {
        endpoint: raw.to_string(),
        source,
    };
    let mut ep = Endpoint::from_shared(uri)
        .map_err(invalid)?
        .connect_timeout(config.connect_timeout)
        .tcp_nodelay(true)
        .initial_stream_window_size(config.stream_window_bytes)
        .initial_connection_window_size(config.connection_window_bytes)
        .max_frame_size(config.max_frame_bytes);
    if let Some(interval) = config.keepalive_interval {
        ep = ep
            .http2_keep_alive_interval(interval)
            .keep_alive_timeout(config.keepalive_timeout);
    }
    if https {
        crate::tls::install_crypto_provider();
        let mut tls = ClientTlsConfig::new();
        tls = match &config.tls_ca_pem {
            Some(pem) => tls.ca_certificate(Certificate::from_pem(pem)),
            None => tls.with_enabled_roots(),
        };
        if let Some(domain) = &config.tls_domain {
            tls = tls.domain_name(domain.clone());
        }
        ep = ep.tls_config(tls).map_err(invalid)?;
    } else if config.bearer_token.is_some() {
        let host = ep.uri().host().unwrap_or_default();
        if !matches!(host, "127.0.0.1" | "localhost" | "[::1]" | "::1") {
            tracing::warn!(endpoint = raw, "sending the bearer token without TLS");
        }
    }
    Ok(ep)
}
