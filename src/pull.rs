//! `atmorep loader pull`: a stream consumer in its own process that reports what a trainer would
//! see — samples/s, token GB/s, the gaps between batches — and optionally checks that an epoch
//! arrived exactly once.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use atmorep_proto::client::{ClientConfig, LoaderClient};
use atmorep_proto::request::RequestConfig;
use clap::Args;
use serde::Serialize;

#[derive(Debug, Args)]
pub struct PullArgs {
    /// Loader endpoint(s), comma-separated (`http://127.0.0.1:50051`; `https://` with TLS); the
    /// client fails over between them, or with `--stripe` streams from all of them at once.
    #[arg(value_delimiter = ',', required = true)]
    endpoints: Vec<String>,
    /// Spread the stream over all endpoints (one sub-stream each, merged in a fixed order; each
    /// fails over to the others). Its cursors resume only with the same endpoint count.
    #[arg(long)]
    stripe: bool,
    /// The request as TOML (dataset, fields, batch size, …).
    #[arg(long)]
    request: PathBuf,
    /// Stop after this many batches (default: the request's end epoch, or forever).
    #[arg(long)]
    batches: Option<u64>,
    /// Stream exactly one epoch (the resume epoch) and verify every sample id arrived once.
    #[arg(long)]
    check_epoch: bool,
    /// Bearer token.
    #[arg(long, env = "ATMOREP_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// CA certificate (PEM) that signed the server's certificate.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Server name to verify in its certificate (default: the endpoint's host).
    #[arg(long)]
    domain: Option<String>,
    /// Batches kept ready ahead of the consumer.
    #[arg(long, default_value_t = 4)]
    prefetch: usize,
    /// Simulated work per batch in milliseconds (a slow consumer).
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Add a checksum of every batch's values to the report (see [`batch_checksums`]), for
    /// clients in other languages to compare what they received with.
    #[arg(long)]
    checksums: bool,
}

/// What a pull measured.
#[derive(Debug, Serialize)]
pub struct PullReport {
    pub batches: u64,
    pub samples: u64,
    pub seconds: f64,
    pub samples_per_second: f64,
    pub token_gbps: f64,
    pub gap_p50_ms: f64,
    pub gap_p99_ms: f64,
    pub reconnects: u64,
    /// Loader calls the stream made in parallel (the endpoint count when striped, else 1).
    pub sub_streams: usize,
    pub epoch_checked: bool,
    /// (epoch, id) of every sample, in arrival order, when `--check-epoch`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ids: Vec<(u64, u64)>,
    /// Per batch, [`batch_checksums`], when `--checksums`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub checksums: Vec<Vec<u64>>,
}

/// How to consume a stream.
#[derive(Debug, Clone, Copy, Default)]
pub struct Consume {
    pub max_batches: Option<u64>,
    pub check_epoch: bool,
    pub delay: Duration,
    pub checksums: bool,
}

/// Position-weighted sum of the bit patterns (`Σ bits[i] · (i + 1)`, wrapping): any change of a
/// value or of the order changes it, and numpy computes the same in one vectorized line
/// (python/tests).
fn weighted_sum(bits: impl Iterator<Item = u32>) -> u64 {
    bits.zip(1u64..).fold(0u64, |acc, (b, w)| {
        acc.wrapping_add(u64::from(b).wrapping_mul(w))
    })
}

/// Checksums of a batch, field by field in request order: `source`, `target`, the masked
/// indices (flattened), `token_info` and `pe` (the `f32` values' bits), then the sample ids.
pub fn batch_checksums(batch: &atmorep_proto::Batch) -> Vec<u64> {
    let mut sums = Vec::with_capacity(batch.fields.len() * 5 + 1);
    for field in &batch.fields {
        sums.push(weighted_sum(field.source.iter().map(|v| v.to_bits())));
        sums.push(weighted_sum(field.target.iter().map(|v| v.to_bits())));
        sums.push(weighted_sum(field.masked_indices.iter().flatten().copied()));
        sums.push(weighted_sum(field.token_info.iter().map(|v| v.to_bits())));
        sums.push(weighted_sum(field.pe.iter().map(|v| v.to_bits())));
    }
    sums.push(weighted_sum(batch.sample_ids.iter().map(|&id| id as u32)));
    sums
}

pub async fn pull(args: PullArgs) -> Result<()> {
    let config = RequestConfig::load(&args.request)?;
    let mut client_config = ClientConfig::new(args.endpoints.clone());
    client_config.bearer_token = args.token.clone();
    client_config.prefetch = args.prefetch;
    client_config.stripe = args.stripe;
    client_config.tls_domain = args.domain.clone();
    if let Some(ca) = &args.ca {
        client_config.tls_ca_pem =
            Some(std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?);
    }
    let client = LoaderClient::connect(client_config).await?;
    let report = consume(
        &client,
        &config,
        Consume {
            max_batches: args.batches,
            check_epoch: args.check_epoch,
            delay: Duration::from_millis(args.delay_ms),
            checksums: args.checksums,
        },
    )
    .await?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.to_text());
    }
    Ok(())
}

/// Streams `config` from `client` and measures it; with `check_epoch`, exactly one epoch (the
/// resume epoch) whose ids must each arrive once.
pub async fn consume(
    client: &LoaderClient,
    config: &RequestConfig,
    how: Consume,
) -> Result<PullReport> {
    let mut request = config.to_proto();
    if how.check_epoch {
        let epoch = request.resume.map_or(0, |c| c.epoch);
        request.end_epoch = Some(epoch + 1);
    }
    let mut stream = client.stream(request);

    let started = Instant::now();
    let mut last = started;
    let mut gaps = Vec::new();
    let (mut batches, mut samples, mut bytes) = (0u64, 0u64, 0u64);
    let mut seen = HashSet::new();
    let mut ids = Vec::new();
    let mut checksums = Vec::new();
    while how.max_batches.is_none_or(|n| batches < n) {
        let Some(batch) = stream.next().await else {
            break;
        };
        let batch = batch?;
        let now = Instant::now();
        gaps.push(now - last);
        batches += 1;
        samples += batch.len() as u64;
        bytes += batch.payload_bytes() as u64;
        if how.check_epoch {
            for (&id, &epoch) in batch.sample_ids.iter().zip(&batch.sample_epochs) {
                if !seen.insert((epoch, id)) {
                    bail!("sample {id} of epoch {epoch} arrived twice");
                }
                ids.push((epoch, id));
            }
        }
        if how.checksums {
            checksums.push(batch_checksums(&batch));
        }
        if !how.delay.is_zero() {
            tokio::time::sleep(how.delay).await;
        }
        last = Instant::now();
        if batch.end_of_stream {
            break;
        }
        stream.recycle(batch);
    }
    let seconds = started.elapsed().as_secs_f64();
    if how.check_epoch {
        let mut sorted: Vec<u64> = ids.iter().map(|&(_, id)| id).collect();
        sorted.sort_unstable();
        if config.world_size <= 1 && sorted.iter().enumerate().any(|(i, &id)| id != i as u64) {
            bail!(
                "the epoch is incomplete: {} ids arrived, not 0..{}",
                sorted.len(),
                sorted.len()
            );
        }
    }
    let mut millis: Vec<f64> = gaps.iter().map(|g| g.as_secs_f64() * 1e3).collect();
    millis.sort_by(f64::total_cmp);
    let quantile = |q: f64| {
        if millis.is_empty() {
            0.0
        } else {
            millis[((millis.len() - 1) as f64 * q).round() as usize]
        }
    };
    Ok(PullReport {
        batches,
        samples,
        seconds,
        samples_per_second: samples as f64 / seconds,
        token_gbps: bytes as f64 / seconds / 1e9,
        gap_p50_ms: quantile(0.5),
        gap_p99_ms: quantile(0.99),
        reconnects: stream.reconnects(),
        sub_streams: stream.sub_streams(),
        epoch_checked: how.check_epoch,
        ids,
        checksums,
    })
}

impl PullReport {
    /// The figures as text.
    pub fn to_text(&self) -> String {
        let mut s = format!(
            "batches            {}\nsamples            {} in {:.2} s\nsamples/s          {:.1}\n\
             token payload      {:.3} GB/s\nbatch gap          p50 {:.1} ms, p99 {:.1} ms\n\
             reconnects         {}\nsub-streams        {}\n",
            self.batches,
            self.samples,
            self.seconds,
            self.samples_per_second,
            self.token_gbps,
            self.gap_p50_ms,
            self.gap_p99_ms,
            self.reconnects,
            self.sub_streams
        );
        if self.epoch_checked {
            s.push_str(&format!(
                "epoch check        every one of {} sample ids arrived exactly once\n",
                self.ids.len()
            ));
        }
        s
    }
}
