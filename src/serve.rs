//! `atmorep loader serve`: the loader service in the foreground until SIGTERM or Ctrl-C.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use atmorep_loader::service::{self, DatasetConfig, LoaderService, ServerConfig};
use clap::Args;

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Server configuration (TOML: bind, datasets, cache, budget, TLS, token).
    #[arg(long)]
    config: Option<PathBuf>,
    /// A dataset as NAME=URL (repeatable); with --config, added to its datasets.
    #[arg(long = "dataset")]
    datasets: Vec<String>,
    /// Override the configured gRPC address (port 0 picks a free one).
    #[arg(long)]
    bind: Option<SocketAddr>,
    /// Override the Prometheus address.
    #[arg(long)]
    metrics_bind: Option<SocketAddr>,
    /// Override the configured `block_reads`: `off` fetches and decodes whole chunks only.
    #[arg(long, value_enum)]
    block_reads: Option<Switch>,
    /// Also shut down when standard input closes: a parent that started this loader over a
    /// pipe takes it along when it exits, even when it is killed.
    #[arg(long)]
    until_stdin_closes: bool,
}

/// `serve --block-reads`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Switch {
    On,
    Off,
}

pub async fn serve(args: ServeArgs) -> Result<()> {
    let config = server_config(&args)?;
    // Before anything listens: a token named by `token_env` but missing is a refusal to start.
    config.bearer_token()?;
    if let Some(addr) = config.metrics_bind {
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(addr)
            .install()
            .with_context(|| format!("starting the Prometheus endpoint on {addr}"))?;
        tracing::info!(%addr, "Prometheus metrics at /metrics");
    }
    let listener = tokio::net::TcpListener::bind(config.bind)
        .await
        .with_context(|| format!("binding {}", config.bind))?;
    let addr = listener.local_addr()?;
    let service = LoaderService::open(config).await?;
    // Scripts and tests read the address from this line (the port may have been 0).
    println!("listening on {addr}");
    service::run(service, listener, shutdown_signal(args.until_stdin_closes)).await?;
    Ok(())
}

/// The configuration file (if any) completed by the command line, then checked: a file may
/// leave its datasets to `--dataset`.
fn server_config(args: &ServeArgs) -> Result<ServerConfig> {
    let mut config = match &args.config {
        Some(path) => ServerConfig::read(path)?,
        None => ServerConfig::with_datasets(Vec::new()),
    };
    for spec in &args.datasets {
        let Some((name, url)) = spec.split_once('=') else {
            bail!("--dataset `{spec}`: expected NAME=URL");
        };
        config.datasets.push(DatasetConfig {
            name: name.into(),
            url: url.into(),
            description: String::new(),
            stats: None,
            missing_chunks: Default::default(),
        });
    }
    if let Some(bind) = args.bind {
        config.bind = bind;
    }
    if let Some(bind) = args.metrics_bind {
        config.metrics_bind = Some(bind);
    }
    if let Some(switch) = args.block_reads {
        config.block_reads = switch == Switch::On;
    }
    config.check()?;
    Ok(config)
}

/// Resolves once standard input reaches its end (or fails).
async fn stdin_closed() {
    let (tx, rx) = tokio::sync::oneshot::channel();
    // A plain thread, not `spawn_blocking`: the runtime waits for blocking tasks when it shuts
    // down, and this read may never return.
    std::thread::spawn(move || {
        use std::io::Read;
        let mut buf = [0u8; 256];
        let mut stdin = std::io::stdin();
        while matches!(stdin.read(&mut buf), Ok(n) if n > 0) {}
        let _ = tx.send(());
    });
    let _ = rx.await;
}

async fn shutdown_signal(until_stdin_closes: bool) {
    let stdin = async {
        if until_stdin_closes {
            stdin_closed().await;
            tracing::info!("standard input closed: shutting down");
        } else {
            std::future::pending::<()>().await;
        }
    };
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
        _ = stdin => {},
    }
}

#[cfg(test)]
mod tests {
    use super::{ServeArgs, Switch, server_config};
    use atmorep_loader::service::ServerConfig;
    use atmorep_proto::request::RequestConfig;

    /// The README points users at these files; they must stay valid.
    #[test]
    fn the_example_configurations_parse() {
        let server = ServerConfig::load(std::path::Path::new("examples/loader.toml")).unwrap();
        assert_eq!(server.datasets[0].name, "era5");
        let request = RequestConfig::load(std::path::Path::new("examples/request.toml")).unwrap();
        assert_eq!(request.dataset, "era5");
        assert_eq!(request.fields.len(), 2);
        let reference =
            RequestConfig::load(std::path::Path::new("examples/reference.toml")).unwrap();
        assert_eq!(reference.fields[0].num_tokens, [12, 6, 12]);
    }

    fn args(config: Option<&std::path::Path>, datasets: &[&str]) -> ServeArgs {
        ServeArgs {
            config: config.map(std::path::Path::to_path_buf),
            datasets: datasets.iter().map(|d| d.to_string()).collect(),
            bind: None,
            metrics_bind: None,
            block_reads: None,
            until_stdin_closes: false,
        }
    }

    #[test]
    fn a_config_file_may_leave_its_datasets_to_the_command_line() {
        let dir = tempfile::TempDir::new().unwrap();
        let file = dir.path().join("loader.toml");
        std::fs::write(&file, "prefetch_batches = 4\nsample_concurrency = 32\n").unwrap();
        let config = server_config(&args(Some(&file), &["arco=/data/arco.zarr"])).unwrap();
        assert_eq!(
            (config.prefetch_batches, config.sample_concurrency),
            (4, 32)
        );
        assert_eq!(config.datasets[0].name, "arco");
        assert_eq!(config.datasets[0].url, "/data/arco.zarr");
        // Datasets from neither place: still refused, by name.
        let err = server_config(&args(Some(&file), &[])).unwrap_err();
        assert!(err.to_string().contains("no [[datasets]]"), "{err}");
        assert!(config.block_reads);
        let off = server_config(&ServeArgs {
            block_reads: Some(Switch::Off),
            ..args(Some(&file), &["arco=/data/arco.zarr"])
        })
        .unwrap();
        assert!(!off.block_reads);
        let err = server_config(&args(None, &["no-equals-sign"])).unwrap_err();
        assert!(err.to_string().contains("expected NAME=URL"), "{err}");
    }
}
