//! `atmorep loader bench-pipeline`: the sample pipeline in-process on a real store. It reports
//! samples/s, token payload GB/s and read amplification, and compares the run's wall time with
//! the time the same machine needs to decode, on all cores, exactly the chunks the run fetched
//! (the decode limit measured in the same process right after the run). It runs several epochs
//! in one process: the first pays for faulting in fresh memory (a new process's buffers), the
//! later ones show the steady state a long training run sees. It also reports the bytes fetched
//! and decoded per byte delivered, and can run each epoch with and without block reads
//! ([`BlockReads`]) for a side-by-side comparison in one process.

use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use rayon::prelude::*;

use crate::error::StoreError;
use crate::pipeline::epoch::EpochCursor;
use crate::pipeline::normalization::GlobalStats;
use crate::pipeline::{BatchSpec, Normalization, Pipeline, PipelineConfig, PipelineError};
use crate::progress::Progress;
use crate::store::cache::DecodedChunk;
use crate::store::dataset::{Dataset, Variable};
use crate::store::decode::{decode_chunk, run_on_rayon};
use crate::{ChunkCache, StoreLocation};

/// Which read path the benchmark's epochs take for small parts of blosc chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BlockReads {
    /// Block reads where they apply (the default of every reader).
    #[default]
    On,
    /// Whole chunks always.
    Off,
    /// Each epoch twice: whole chunks, then block reads.
    Both,
}

impl BlockReads {
    fn modes(self) -> &'static [bool] {
        match self {
            Self::On => &[true],
            Self::Off => &[false],
            Self::Both => &[false, true],
        }
    }
}

/// How the benchmark's epochs cut samples.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Cut {
    /// A time block's samples at once where the request allows (the default of every stream).
    #[default]
    Group,
    /// Each sample on its own.
    Sample,
    /// Each epoch twice: sample by sample, then in groups.
    Both,
}

impl Cut {
    fn modes(self) -> &'static [bool] {
        match self {
            Self::Group => &[true],
            Self::Sample => &[false],
            Self::Both => &[false, true],
        }
    }
}

/// A benchmark run's figures.
#[derive(Debug, Clone)]
pub struct PipelineBenchReport {
    pub epoch: u64,
    /// Whether small parts of blosc chunks were read block by block.
    pub block_reads: bool,
    /// Whether the pipeline was allowed to cut groups of samples at once.
    pub group_cut: bool,
    /// Bytes fetched from storage (whole chunks, chunk headers, blocks) and the requests.
    pub fetched_bytes: u64,
    pub fetch_requests: u64,
    /// Bytes of decoded values produced, and of values delivered by the store's reads.
    pub decoded_bytes: u64,
    pub delivered_bytes: u64,
    pub samples: u64,
    pub seconds: f64,
    pub samples_per_second: f64,
    pub token_gbps: f64,
    pub read_amplification: f64,
    pub decode_seconds: f64,
    pub decode_gbps: f64,
    /// `decode_seconds / seconds`: 1 means the pipeline runs at the decode limit.
    pub ratio: f64,
    /// The same chunks decoded again, every chunk's values kept until the last is decoded: a
    /// limit whose output goes to memory, as the pipeline's does.
    pub resident_seconds: f64,
    /// `resident_seconds / seconds`.
    pub resident_ratio: f64,
    pub cores: usize,
}

/// Runs `samples` samples (the whole epoch when `None`) of each of `epochs` epochs of `config`
/// on the store at `url`, one report per epoch.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    url: &str,
    config: PipelineConfig,
    stats_dir: Option<&Path>,
    cache_bytes: u64,
    samples: Option<u64>,
    epochs: u64,
    concurrency: usize,
    block_reads: BlockReads,
    cut: Cut,
    decode_limit: bool,
    progress: &dyn Progress,
) -> Result<Vec<PipelineBenchReport>, PipelineError> {
    let location = StoreLocation::open(url)?;
    let dataset =
        Arc::new(Dataset::open_location(location, Arc::new(ChunkCache::new(cache_bytes))).await?);
    let needs_stats = config
        .fields
        .iter()
        .any(|f| f.normalization == Normalization::Global);
    let stats = if needs_stats {
        let dir = match stats_dir {
            Some(d) => d.to_path_buf(),
            None => GlobalStats::default_dir(Path::new(url)),
        };
        Some(Arc::new(
            GlobalStats::compute_into(&dataset, &dir, false, progress)
                .await?
                .0,
        ))
    } else {
        None
    };
    let pipeline = Arc::new(Pipeline::new(dataset.clone(), config, stats)?);
    let total = samples
        .unwrap_or(pipeline.num_samples())
        .min(pipeline.num_samples());

    let mut reports = Vec::new();
    for epoch in 0..epochs.max(1) {
        for &group in cut.modes() {
            pipeline.set_group_cut(group);
            for &on in block_reads.modes() {
                dataset.set_block_reads(on);
                let mut report = run_epoch(
                    &dataset,
                    &pipeline,
                    epoch,
                    total,
                    concurrency,
                    decode_limit,
                    progress,
                )
                .await?;
                report.block_reads = on;
                report.group_cut = group;
                reports.push(report);
            }
        }
    }
    Ok(reports)
}

/// One timed epoch and the decode limit of the chunks it fetched.
async fn run_epoch(
    dataset: &Arc<Dataset>,
    pipeline: &Arc<Pipeline>,
    epoch: u64,
    total: u64,
    concurrency: usize,
    decode_limit: bool,
    progress: &dyn Progress,
) -> Result<PipelineBenchReport, PipelineError> {
    dataset.cache().clear();
    dataset.record_fetches(true);
    let counters = &dataset.counters;
    let count = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    let before = [
        count(&counters.decoded_bytes),
        count(&counters.fetched_bytes),
        count(&counters.fetch_requests),
        count(&counters.delivered_bytes),
    ];
    progress.start("samples", total);
    let started = Instant::now();
    // The same batch stream the service sends: samples assembled `concurrency` at a time on the
    // runtime's workers while chunks decode on the rayon pool, batches of 16 kept ready.
    let mut batches = pipeline.batches(BatchSpec {
        rank: 0,
        world: 1,
        start: EpochCursor::start_of(epoch),
        end_epoch: Some(epoch + 1),
        batch_size: 16,
        sample_concurrency: concurrency,
        prefetch_batches: 2,
        memory: None,
    })?;
    let mut payload = 0u64;
    let mut delivered = 0u64;
    while delivered < total {
        let Some(batch) = batches.next().await else {
            break;
        };
        for sample in batch?.samples {
            if delivered == total {
                break;
            }
            payload += sample.payload_bytes() as u64;
            delivered += 1;
            pipeline.recycle(sample);
            progress.advance(1);
        }
    }
    drop(batches);
    let seconds = started.elapsed().as_secs_f64();
    progress.finish();
    // Lanes of a group read log a chunk holding several of their levels once each.
    let mut fetched = dataset.record_fetches(false);
    fetched.sort();
    fetched.dedup();
    if !decode_limit {
        // Skipped (for profiles of the pipeline alone): the report says n/a.
        fetched.clear();
    }
    let [decoded, fetched_bytes, fetch_requests, delivered_bytes] = [
        count(&counters.decoded_bytes) - before[0],
        count(&counters.fetched_bytes) - before[1],
        count(&counters.fetch_requests) - before[2],
        count(&counters.delivered_bytes) - before[3],
    ];

    // The decode limit: fetch the same chunks' bytes first, then decode them all in parallel.
    let mut encoded = Vec::with_capacity(fetched.len());
    for (name, indices) in &fetched {
        let variable = dataset.variable(name)?;
        let key = variable.node.array.chunk_key(indices).to_string();
        let bytes = dataset.location().get(&key).await?;
        encoded.push((variable.clone(), key, indices.clone(), bytes));
    }
    let encoded = Arc::new((encoded, dataset.url().to_string()));
    let limit = |keep: bool| {
        let encoded = encoded.clone();
        async move {
            let started = Instant::now();
            let decoded = run_on_rayon(move || {
                let (chunks, url) = &*encoded;
                decode_all(url, chunks, keep)
            })
            .await;
            (started.elapsed().as_secs_f64(), decoded)
        }
    };
    let (decode_seconds, decoded_limit) = limit(false).await;
    let (decoded_limit, _) = decoded_limit??;
    // The limit that keeps its output: its chunks are freed after the clock stops.
    let (resident_seconds, kept) = limit(true).await;
    drop(kept??);
    Ok(PipelineBenchReport {
        epoch,
        block_reads: false,
        group_cut: false,
        fetched_bytes,
        fetch_requests,
        decoded_bytes: decoded,
        delivered_bytes,
        samples: delivered,
        seconds,
        samples_per_second: delivered as f64 / seconds,
        token_gbps: payload as f64 / seconds / 1e9,
        read_amplification: decoded as f64 / payload.max(1) as f64,
        decode_seconds,
        decode_gbps: decoded_limit as f64 / decode_seconds / 1e9,
        // Block reads are not in the fetch log: the limit covers whole chunks only.
        ratio: if decoded_limit > 0 {
            decode_seconds / seconds
        } else {
            0.0
        },
        resident_seconds,
        resident_ratio: if decoded_limit > 0 {
            resident_seconds / seconds
        } else {
            0.0
        },
        cores: rayon::current_num_threads(),
    })
}

/// A chunk's variable, store key, chunk indices and encoded bytes.
type EncodedChunk = (Variable, String, Vec<u64>, Option<bytes::Bytes>);

/// Decodes every chunk in parallel: the decoded bytes, and with `keep` the decoded chunks
/// themselves, every one resident until the last is decoded (else each is dropped at once).
fn decode_all(
    url: &str,
    chunks: &[EncodedChunk],
    keep: bool,
) -> Result<(u64, Vec<DecodedChunk>), StoreError> {
    let decode = |(variable, key, indices, bytes): &EncodedChunk| {
        decode_chunk(
            url,
            &variable.node,
            key,
            indices,
            bytes.as_deref(),
            &variable.packing,
        )
    };
    let size = |c: &DecodedChunk| std::mem::size_of_val(c.values()) as u64;
    if keep {
        let kept = chunks
            .par_iter()
            .map(decode)
            .collect::<Result<Vec<_>, _>>()?;
        Ok((kept.iter().map(size).sum(), kept))
    } else {
        let bytes = chunks
            .par_iter()
            .map(|c| decode(c).map(|c| size(&c)))
            .sum::<Result<u64, StoreError>>()?;
        Ok((bytes, Vec::new()))
    }
}

/// The reference request of the pipeline issue: two fields × 5 levels, AtmoRep geometry
/// (12×6×12 tokens of 3×9×9), BERT masking, local PE, one planned block of the whole store.
pub fn reference_config(fields: [&str; 2], levels: Vec<f64>, steps: usize) -> PipelineConfig {
    let field = |name: &str| crate::pipeline::FieldConfig {
        name: name.into(),
        reply_name: None,
        levels: levels.clone(),
        num_tokens: [12, 6, 12],
        token_size: [3, 9, 9],
        blur_sigma: 0.0,
        normalization: Normalization::Global,
        pe: atmorep_proto::PeMode::Local,
        pe_width: 16,
        mask: crate::pipeline::masking::MaskSpec::Bert {
            r_max: 0.5,
            noise_fraction: 0.1,
            mask_value: 0.0,
        },
    };
    PipelineConfig {
        fields: vec![field(fields[0]), field(fields[1])],
        split: crate::pipeline::Split::Train,
        split_fractions: [1.0, 0.0],
        split_dates: None,
        mode: Default::default(),
        seed: 1,
        block_steps: steps,
        samples_per_block: 128,
        buffer_blocks: 1,
        latitude_weighting: Default::default(),
    }
}

impl PipelineBenchReport {
    /// The figures as text.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "epoch {}{}",
            self.epoch,
            if self.epoch == 0 {
                " (a fresh process: new buffers' pages are faulted in)"
            } else {
                " (buffers reused: the steady state)"
            }
        );
        let _ = writeln!(
            s,
            "read path          {}",
            if self.block_reads {
                "block reads where they apply"
            } else {
                "whole chunks"
            }
        );
        let _ = writeln!(
            s,
            "cut                {}",
            if self.group_cut {
                "a block's samples at once where the request allows"
            } else {
                "sample by sample"
            }
        );
        let _ = writeln!(
            s,
            "samples            {} in {:.2} s",
            self.samples, self.seconds
        );
        let _ = writeln!(s, "samples/s          {:.1}", self.samples_per_second);
        let _ = writeln!(s, "token payload      {:.3} GB/s", self.token_gbps);
        let _ = writeln!(
            s,
            "read amplification {:.2} (decoded bytes / delivered bytes)",
            self.read_amplification
        );
        let per = |bytes: u64| bytes as f64 / self.delivered_bytes.max(1) as f64;
        let _ = writeln!(
            s,
            "fetched/delivered  {:.2} ({:.1} MB in {} requests; delivered {:.1} MB of values)",
            per(self.fetched_bytes),
            self.fetched_bytes as f64 / 1e6,
            self.fetch_requests,
            self.delivered_bytes as f64 / 1e6
        );
        let _ = writeln!(
            s,
            "decoded/delivered  {:.2} ({:.1} MB decoded)",
            per(self.decoded_bytes),
            self.decoded_bytes as f64 / 1e6
        );
        if self.ratio > 0.0 {
            let _ = writeln!(
                s,
                "decode limit       {:.2} s to decode the same chunks on {} cores ({:.2} GB/s)",
                self.decode_seconds, self.cores, self.decode_gbps
            );
            let _ = writeln!(
                s,
                "resident limit     {:.2} s keeping every decoded chunk (ratio {:.3})",
                self.resident_seconds, self.resident_ratio
            );
        } else {
            let _ = writeln!(s, "decode limit       n/a (no whole chunk was fetched)");
        }
        let _ = writeln!(
            s,
            "ratio              {:.3} (decode time / pipeline time)",
            self.ratio
        );
        s
    }
}
