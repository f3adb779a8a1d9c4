//! Server start-up: the `Loader` service and reflection (v1 and v1alpha) behind bearer-token
//! auth, health beside them open to probes, message, stream and connection limits, compression
//! and TLS, and a graceful shutdown.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use atmorep_proto::pb::loader_server::LoaderServer;
use tokio::net::TcpListener;
use tonic::codec::CompressionEncoding;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Identity, Server, ServerTlsConfig};

use super::auth::BearerAuth;
use super::connections::{ConnectionLimits, incoming};
use super::{LoaderService, ServeError};

/// Serves `service` on `listener` until `shutdown` resolves, then ends open streams with
/// UNAVAILABLE and returns once connections have drained.
pub async fn run(
    service: LoaderService,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let config = service.state.config.clone();
    let max_message = config.max_message_mib << 20;
    let auth = BearerAuth {
        expected: config.bearer_token()?.map(Arc::from),
    };
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<LoaderServer<LoaderService>>().await;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(atmorep_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection()
        .build_v1()
        .map_err(|e| ServeError::Reflection(e.to_string()))?;
    // grpcurl and other older tools still ask v1alpha only.
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .map_err(|e| ServeError::Reflection(e.to_string()))?;
    let loader = LoaderServer::new(service.clone())
        // Requests are small; a large limit only invites abuse.
        .max_decoding_message_size(1 << 20)
        // Batches are split into parts of about `max_message` bytes; a single sample larger
        // than that still goes out whole.
        .max_encoding_message_size(max_message.max(1 << 29))
        .accept_compressed(CompressionEncoding::Gzip)
        .accept_compressed(CompressionEncoding::Zstd)
        .send_compressed(CompressionEncoding::Gzip)
        .send_compressed(CompressionEncoding::Zstd);
    // Reflection lists every RPC and message of the service: behind the same token as the
    // loader. Health stays open, so that probes (Kubernetes' gRPC probe sends no token) work.
    let reflection_v1 = InterceptedService::new(reflection_v1, auth.clone());
    let reflection_v1alpha = InterceptedService::new(reflection_v1alpha, auth.clone());
    let loader = InterceptedService::new(loader, auth);

    let mut builder = Server::builder()
        // Windows large enough that one stream can keep a few batches in the pipe.
        .initial_stream_window_size(Some(8 << 20))
        .initial_connection_window_size(Some(32 << 20))
        // Connection and stream limits: docs/operations.md, "Connections and streams".
        .max_concurrent_streams(Some(config.max_streams_per_connection))
        .http2_keepalive_interval(Some(Duration::from_secs(config.keepalive_interval_s)))
        .http2_keepalive_timeout(Some(Duration::from_secs(config.keepalive_timeout_s)));
    if let Some(tls) = &config.tls {
        atmorep_proto::tls::install_crypto_provider();
        let read = |p: &Path| {
            std::fs::read(p).map_err(|e| ServeError::Tls(format!("{}: {e}", p.display())))
        };
        let identity = Identity::from_pem(read(&tls.cert)?, read(&tls.key)?);
        builder = builder
            .tls_config(ServerTlsConfig::new().identity(identity))
            .map_err(|e| ServeError::Tls(e.to_string()))?;
    }
    let connection_limits = ConnectionLimits {
        max_connections: config.max_connections as usize,
        idle_timeout: Duration::from_secs(config.connection_idle_timeout_s),
    };
    let addr = listener.local_addr().ok();
    tracing::info!(?addr, tls = config.tls.is_some(), "loader listening");
    let state = service.state.clone();
    let stop = async move {
        shutdown.await;
        tracing::info!("shutting down: ending open streams");
        let _ = state.shutdown_tx.send(true);
    };
    builder
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(loader)
        .serve_with_incoming_shutdown(incoming(listener, connection_limits), stop)
        .await?;
    Ok(())
}
