//! Cutting a time block's samples at once (each blosc block decoded once, every sample's rows
//! cut from it in cache) gives the same bytes as cutting the samples one by one, over stores
//! chunked one level per chunk, many levels per chunk (ARCO-ERA5's layout, in blocks smaller
//! than a level), several steps and a quarter of the globe per chunk; with a blurred field
//! beside, a stream resumed mid-block, a memory budget, and a missing chunk (the group is redone
//! sample by sample, which fills it).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use atmorep_loader::pipeline::epoch::EpochCursor;
use atmorep_loader::pipeline::masking::MaskSpec;
use atmorep_loader::pipeline::normalization::GlobalStats;
use atmorep_loader::pipeline::{
    BatchSpec, FieldConfig, MemoryBudget, Normalization, Pipeline, PipelineConfig, Sample, Split,
};
use atmorep_loader::progress::NoProgress;
use atmorep_loader::tools::synth::{SynthConfig, write_store};
use atmorep_loader::{ChunkCache, Dataset, StoreLocation};
use tempfile::TempDir;

fn write(store: &Path, chunks: Option<[u64; 4]>) {
    let config = SynthConfig {
        grid_deg: 1.0,
        steps: 14,
        step_hours: 3,
        levels: vec![850, 700, 500, 300],
        variables: vec!["t".into(), "z".into()],
        chunks,
        ..SynthConfig::default()
    };
    write_store(&config, store, &NoProgress).unwrap();
}

async fn open(store: &Path) -> Arc<Dataset> {
    let location = StoreLocation::open(store.to_str().unwrap()).unwrap();
    Arc::new(
        Dataset::open_location(location, Arc::new(ChunkCache::new(1 << 30)))
            .await
            .unwrap(),
    )
}

fn field(name: &str, mask: MaskSpec, normalization: Normalization, blur: f64) -> FieldConfig {
    FieldConfig {
        name: name.into(),
        reply_name: None,
        levels: vec![300.0, 850.0, 500.0],
        num_tokens: [2, 4, 8],
        token_size: [3, 9, 9],
        blur_sigma: blur,
        normalization,
        pe: atmorep_proto::PeMode::Local,
        pe_width: 16,
        mask,
    }
}

fn config(fields: Vec<FieldConfig>) -> PipelineConfig {
    PipelineConfig {
        fields,
        split: Split::Train,
        split_fractions: [1.0, 0.0],
        split_dates: None,
        mode: Default::default(),
        seed: 11,
        block_steps: 7,
        samples_per_block: 10,
        buffer_blocks: 1,
        latitude_weighting: Default::default(),
    }
}

fn bert() -> MaskSpec {
    MaskSpec::Bert {
        r_max: 0.5,
        noise_fraction: 0.2,
        mask_value: 0.0,
    }
}

/// Every sample of the stream from `start` to the end of epoch `end_epoch - 1`.
async fn stream(
    pipeline: &Arc<Pipeline>,
    start: EpochCursor,
    end_epoch: u64,
    memory: Option<MemoryBudget>,
) -> Vec<Sample> {
    let mut batches = pipeline
        .batches(BatchSpec {
            rank: 0,
            world: 1,
            start,
            end_epoch: Some(end_epoch),
            batch_size: 4,
            sample_concurrency: 8,
            prefetch_batches: 2,
            memory,
        })
        .unwrap();
    let mut samples = Vec::new();
    while let Some(batch) = batches.next().await {
        samples.extend(batch.unwrap().samples);
    }
    samples
}

/// The samples' bytes, bit for bit.
fn bits(samples: &[Sample]) -> Vec<(u64, u64, Vec<Vec<u32>>)> {
    samples
        .iter()
        .map(|s| {
            let fields = s
                .fields
                .iter()
                .flat_map(|f| {
                    [
                        f.source.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        f.target.iter().map(|v| v.to_bits()).collect(),
                        f.masked_indices.clone(),
                        f.token_info.iter().map(|v| v.to_bits()).collect(),
                        f.pe.iter().map(|v| v.to_bits()).collect(),
                    ]
                })
                .collect();
            (s.epoch, s.id, fields)
        })
        .collect()
}

/// The stream cut in groups and sample by sample, each on a dataset of its own; returns the
/// group's dataset for its counters.
async fn compare(
    store: &Path,
    config: &PipelineConfig,
    start: EpochCursor,
    memory: Option<MemoryBudget>,
) -> Arc<Dataset> {
    let reference = open(store).await;
    let stats = Arc::new(
        GlobalStats::compute(&reference, None, &NoProgress)
            .await
            .unwrap(),
    );
    let one_by_one =
        Arc::new(Pipeline::new(reference, config.clone(), Some(stats.clone())).unwrap());
    one_by_one.set_group_cut(false);
    let grouped = open(store).await;
    let pipeline = Arc::new(Pipeline::new(grouped.clone(), config.clone(), Some(stats)).unwrap());
    let want = stream(&one_by_one, start, 2, memory.clone()).await;
    let got = stream(&pipeline, start, 2, memory).await;
    assert!(!want.is_empty());
    assert_eq!(got.len(), want.len());
    assert!(
        bits(&got) == bits(&want),
        "{}: samples differ",
        store.display()
    );
    grouped
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_cut_samples_are_the_same_bytes_as_one_by_one() {
    let dir = TempDir::new().unwrap();
    let fields = vec![
        field("t", bert(), Normalization::Global, 0.0),
        field("z", MaskSpec::Forecast { k: 1 }, Normalization::None, 0.0),
    ];
    for (name, chunks) in [
        // One step × one level × the globe per chunk (the peer's store).
        ("levels", None),
        // Four steps × one level × a quarter of the globe.
        ("quarters", Some([4, 1, 91, 180])),
    ] {
        let store = dir.path().join(format!("{name}.zarr"));
        write(&store, chunks);
        let grouped = compare(
            &store,
            &config(fields.clone()),
            EpochCursor::start_of(0),
            None,
        )
        .await;
        let counters = &grouped.counters;
        assert_eq!(
            counters.fetched_chunks.load(Ordering::Relaxed),
            0,
            "{name}: every chunk read block by block"
        );
        assert!(
            counters.fetched_blocks.load(Ordering::Relaxed) > 0,
            "{name}"
        );
    }
}

/// ARCO-ERA5's layout: every chunk one step × all levels × the globe, blosc-lz4 in blocks of 64
/// KiB (a level is 4 blocks) and blosc-zstd in blocks of 2 KiB (a row of the grid spans several).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_cut_of_all_level_chunks_in_small_blocks_is_the_same_bytes() {
    let dir = TempDir::new().unwrap();
    let store = dir.path().join("arco.zarr");
    crate::block_reads::store_in_small_blocks(&store, [1, 16, 181, 360]);
    let mut fields = vec![
        field("t", bert(), Normalization::Global, 0.0),
        field("z", bert(), Normalization::Global, 0.0),
    ];
    for f in &mut fields {
        f.levels = vec![850.0, 300.0];
        f.num_tokens = [1, 4, 8];
    }
    let config = PipelineConfig {
        block_steps: 3,
        samples_per_block: 6,
        ..config(fields)
    };
    let grouped = compare(&store, &config, EpochCursor::start_of(0), None).await;
    let counters = &grouped.counters;
    assert_eq!(counters.fetched_chunks.load(Ordering::Relaxed), 0);
    // 2 of 16 levels: a small part of each chunk's blocks.
    let decoded = counters.decoded_bytes.load(Ordering::Relaxed);
    let delivered = counters.delivered_bytes.load(Ordering::Relaxed);
    assert!(decoded < 4 * delivered, "{decoded} decoded for {delivered}");
}

/// A blurred field is cut sample by sample beside a grouped one; a stream resumed mid-block and
/// one under a memory budget (groups of fewer batches) give the same bytes too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_fields_resumed_streams_and_budgets_give_the_same_bytes() {
    let dir = TempDir::new().unwrap();
    let store = dir.path().join("levels.zarr");
    write(&store, None);
    let fields = vec![
        field("t", bert(), Normalization::Global, 0.0),
        field("z", bert(), Normalization::Global, 1.5),
    ];
    compare(
        &store,
        &config(fields.clone()),
        EpochCursor::start_of(0),
        None,
    )
    .await;
    let plain = config(vec![fields[0].clone()]);
    let resumed = EpochCursor {
        epoch: 0,
        position: 7,
    };
    compare(&store, &plain, resumed, None).await;
    let pipeline_bytes = {
        let dataset = open(&store).await;
        let stats = GlobalStats::compute(&dataset, None, &NoProgress)
            .await
            .unwrap();
        Pipeline::new(dataset, plain.clone(), Some(Arc::new(stats)))
            .unwrap()
            .sample_bytes()
    };
    // Room for two groups of two batches of 4: groups of 8 of the block's 10 samples.
    let budget = MemoryBudget::new(pipeline_bytes * 4 * 2 * 2);
    compare(&store, &plain, EpochCursor::start_of(0), Some(budget)).await;
}

/// A missing chunk fails the group read; the group is cut again sample by sample, which reads
/// the chunk as its fill value, as a stream without groups does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_chunk_is_filled_as_sample_by_sample() {
    let dir = TempDir::new().unwrap();
    let store = dir.path().join("levels.zarr");
    write(&store, None);
    let fields = vec![field("t", bert(), Normalization::None, 0.0)];
    // Step 2, level 500 hPa (index 2 of 850, 700, 500, 300).
    std::fs::remove_file(store.join("t").join("2.2.0.0")).unwrap();
    compare(&store, &config(fields), EpochCursor::start_of(0), None).await;
}
