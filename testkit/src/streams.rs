//! Helpers for tests that consume loader streams through the real client library: a client
//! that retries briefly (a test must fail, not hang), a deadline on every stream, and the
//! checks that an epoch arrived exactly once.

use std::collections::HashSet;
use std::time::Duration;

use atmorep_proto::batch::{Batch, StreamCursor};
use atmorep_proto::client::{ClientConfig, LoaderClient, LoaderStream, ReconnectPolicy};

/// How long a test waits for a finite stream to end.
pub const STREAM_TIMEOUT: Duration = Duration::from_secs(60);

/// A client of `endpoints` that retries a lost connection briefly: 8 attempts within 30 s.
pub fn client_config(endpoints: Vec<String>) -> ClientConfig {
    let mut config = ClientConfig::new(endpoints);
    config.reconnect = ReconnectPolicy {
        initial_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(500),
        max_attempts: Some(8),
        give_up_after: Some(Duration::from_secs(30)),
    };
    config.connect_timeout = Duration::from_secs(5);
    config
}

/// The client of `config`, which must be valid.
pub async fn connect(config: ClientConfig) -> LoaderClient {
    LoaderClient::connect(config)
        .await
        .expect("the client configuration is valid")
}

/// Every batch of a finite stream, within [`STREAM_TIMEOUT`].
pub async fn collect(stream: &mut LoaderStream) -> Vec<Batch> {
    let all = async {
        let mut batches = Vec::new();
        while let Some(batch) = stream.next().await {
            batches.push(batch.unwrap_or_else(|e| panic!("stream failed: {e}")));
        }
        batches
    };
    tokio::time::timeout(STREAM_TIMEOUT, all)
        .await
        .expect("the stream did not finish in time")
}

/// (epoch, id) of every sample, in arrival order.
pub fn ids(batches: &[Batch]) -> Vec<(u64, u64)> {
    batches
        .iter()
        .flat_map(|b| {
            b.sample_epochs
                .iter()
                .copied()
                .zip(b.sample_ids.iter().copied())
        })
        .collect()
}

/// The cursor after each batch.
pub fn cursors(batches: &[Batch]) -> Vec<StreamCursor> {
    batches.iter().map(|b| b.cursor_after).collect()
}

/// Checks that `ids` is epoch `epoch` exactly: `0..n`, each once.
pub fn assert_whole_epoch(ids: &[(u64, u64)], epoch: u64, n: u64) {
    assert_eq!(ids.len() as u64, n, "sample count of epoch {epoch}");
    let unique: HashSet<_> = ids.iter().copied().collect();
    assert_eq!(unique.len(), ids.len(), "a sample arrived twice: {ids:?}");
    let expected: HashSet<(u64, u64)> = (0..n).map(|id| (epoch, id)).collect();
    assert_eq!(unique, expected, "ids of epoch {epoch}");
}
