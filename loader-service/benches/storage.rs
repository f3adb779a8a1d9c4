//! Criterion benches of the storage layer on an ARCO-ERA5-shaped synthetic store: 0.25° grid,
//! one time step × one level × full globe per chunk, blosc-lz4, 48 hourly steps, 5 levels.
//!
//! `decode/one-chunk` is the single-core decode limit; `hyperslab/36-step-block` reads a 36-step
//! time block of one level with a cold cache on all cores. Their throughput ratio divided by the
//! core count is the figure `atmorep loader bench-storage` prints as its headline.
//! Set `ATMOREP_BENCH_STORE` to reuse a store between runs.

use std::path::PathBuf;

use atmorep_loader::progress::NoProgress;
use atmorep_loader::store::decode::chunk_codec_options;
use atmorep_loader::tools::synth::{SynthConfig, write_store};
use atmorep_loader::{Dataset, Hyperslab};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use zarrs::array::ArrayToBytesCodecTraits;

// The same allocator as the `atmorep` binary, so the figures match what users run.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn store() -> PathBuf {
    let path = std::env::var_os("ATMOREP_BENCH_STORE")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("atmorep-bench-arco-025.zarr"));
    if !path.join(".zmetadata").exists() {
        let cfg = SynthConfig {
            grid_deg: 0.25,
            steps: 48,
            step_hours: 1,
            levels: vec![1000, 850, 700, 500, 300],
            variables: vec!["t".into()],
            ..SynthConfig::default()
        };
        eprintln!("writing the benchmark store {}", path.display());
        write_store(&cfg, &path, &NoProgress).expect("write the benchmark store");
    }
    path
}

fn benches(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let path = store();
    let dataset = runtime
        .block_on(Dataset::open(path.to_str().expect("utf-8 path")))
        .expect("open store");
    let variable = dataset.variable("t").expect("t").clone();
    let array = variable.node.array.clone();
    let key = array.chunk_key(&[0, 0, 0, 0]).to_string();
    let encoded = runtime
        .block_on(dataset.location().get(&key))
        .expect("get")
        .expect("chunk exists");
    let shape = array.chunk_shape(&[0, 0, 0, 0]).expect("shape");
    let chunk_bytes = shape.iter().map(|n| n.get()).product::<u64>() * 4;

    let mut group = c.benchmark_group("decode");
    group.throughput(Throughput::Bytes(chunk_bytes));
    group.sample_size(20);
    group.bench_function("one-chunk", |b| {
        b.iter(|| {
            array
                .codecs()
                .decode(
                    std::borrow::Cow::Borrowed(&encoded[..]),
                    &shape,
                    array.data_type(),
                    array.fill_value(),
                    &chunk_codec_options(),
                )
                .expect("decode")
        })
    });
    group.finish();

    let slab = Hyperslab {
        time: 0..36,
        levels: vec![0],
        ..Hyperslab::full(&dataset, &variable)
    };
    let mut group = c.benchmark_group("hyperslab");
    group.throughput(Throughput::Bytes(slab.len() as u64 * 4));
    group.sample_size(10);
    group.bench_function("36-step-block", |b| {
        let mut buffer = Vec::new();
        b.iter(|| {
            dataset.cache().clear();
            buffer = runtime
                .block_on(dataset.read_into(&slab, std::mem::take(&mut buffer)))
                .expect("read");
        })
    });
    group.bench_function("sample-window-warm", |b| {
        let window = Hyperslab {
            time: 6..42,
            lat: 300..354,
            lon_start: 1400,
            lon_len: 108,
            ..slab.clone()
        };
        runtime.block_on(dataset.read(&window)).expect("warm up");
        b.iter(|| runtime.block_on(dataset.read(&window)).expect("read"))
    });
    group.finish();
}

criterion_group!(storage, benches);
criterion_main!(storage);
