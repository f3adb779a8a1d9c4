//! Criterion benches of the sample pipeline's steps.
//!
//! - `blur/globe-0.25deg` blurs one full 0.25° plane (721×1440 f32) with sigma 2 grid points,
//!   the cost paid per time step × level when blur is enabled; throughput is the plane's bytes.
//! - `tokenize/atmorep-2023` reorders one field window of AtmoRep's default geometry (5 levels
//!   × 12×6×12 tokens of 3×9×9) into token order.
//! - `sample/assembly-warm` builds one two-field sample (5 levels each, AtmoRep geometry, global
//!   normalization, BERT masking, local PE) from a 1° synthetic store whose chunks are cached:
//!   everything the pipeline does after decoding.

use std::sync::Arc;

use atmorep_loader::pipeline::Pipeline;
use atmorep_loader::pipeline::blur::GaussianBlur;
use atmorep_loader::pipeline::normalization::GlobalStats;
use atmorep_loader::progress::NoProgress;
use atmorep_loader::tools::bench_pipeline::reference_config;
use atmorep_loader::tools::synth::{SynthConfig, write_store};
use atmorep_loader::{ChunkCache, Dataset, StoreLocation};
use atmorep_proto::FieldGeometry;
use atmorep_proto::tokenize::tokenize_into;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

// The same allocator as the `atmorep` binary, so the figures match what users run.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const NLAT: usize = 721;
const NLON: usize = 1440;

fn plane() -> Vec<f32> {
    (0..NLAT * NLON)
        .map(|k| {
            let (lat, lon) = ((k / NLON) as f32 * 0.25, (k % NLON) as f32 * 0.25);
            250.0 + 40.0 * lat.to_radians().sin() + 5.0 * (3.0 * lon.to_radians()).cos()
        })
        .collect()
}

fn benches(c: &mut Criterion) {
    let blur = GaussianBlur::new(2.0).expect("valid sigma");
    let mut field = plane();
    let mut scratch = Vec::new();

    let mut group = c.benchmark_group("blur");
    group.throughput(Throughput::Bytes((NLAT * NLON * 4) as u64));
    group.bench_function("globe-0.25deg", |b| {
        // Blurring in place repeatedly only smooths the field further; the cost is data-independent.
        b.iter(|| {
            blur.apply_globe_with_scratch(&mut field, NLAT, NLON, &mut scratch)
                .expect("blur")
        })
    });
    group.finish();

    let field = FieldGeometry::new((0..5).collect(), Default::default());
    let window: Vec<f32> = (0..field.numel()).map(|i| i as f32).collect();
    let mut tokens = Vec::new();
    let mut group = c.benchmark_group("tokenize");
    group.throughput(Throughput::Bytes((field.numel() * 4) as u64));
    group.bench_function("atmorep-2023", |b| {
        b.iter(|| tokens = tokenize_into(&field, &window, std::mem::take(&mut tokens)))
    });
    group.finish();

    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("bench.zarr");
    let cfg = SynthConfig {
        steps: 48,
        step_hours: 1,
        levels: vec![1000, 850, 700, 500, 300],
        variables: vec!["t".into(), "z".into()],
        ..SynthConfig::default()
    };
    write_store(&cfg, &path, &NoProgress).expect("write the benchmark store");
    let pipeline = runtime.block_on(async {
        let location = StoreLocation::open(path.to_str().expect("utf-8 path")).expect("open");
        let dataset = Arc::new(
            Dataset::open_location(location, Arc::new(ChunkCache::new(1 << 30)))
                .await
                .expect("dataset"),
        );
        let stats = Arc::new(
            GlobalStats::compute(&dataset, None, &NoProgress)
                .await
                .expect("stats"),
        );
        let levels = dataset.variable("t").expect("t").levels.clone();
        let request = reference_config(["t", "z"], levels, dataset.times.len());
        let pipeline = Pipeline::new(dataset, request, Some(stats)).expect("pipeline");
        pipeline.sample(0, 0).await.expect("warm the cache");
        pipeline
    });
    let bytes = runtime
        .block_on(pipeline.sample(0, 1))
        .expect("sample")
        .payload_bytes();
    let mut group = c.benchmark_group("sample");
    group.throughput(Throughput::Bytes(bytes as u64));
    group.sample_size(20);
    let mut id = 0;
    group.bench_function("assembly-warm", |b| {
        b.iter(|| {
            id = (id + 1) % 128;
            runtime.block_on(pipeline.sample(0, id)).expect("sample")
        })
    });
    group.finish();
}

criterion_group!(pipeline, benches);
criterion_main!(pipeline);
