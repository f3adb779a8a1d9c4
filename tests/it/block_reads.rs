//! Reading only the blosc blocks a request uses: a store chunked like ARCO-ERA5 (every chunk one
//! hour × all 16 levels × the globe, blosc-lz4 in blocks smaller than a level) read over plain
//! HTTP (the in-process file server, which counts the bytes it sends) and from local files.
//! Reads of 2 of the 16 levels give the same bits as whole-chunk reads of the same store, while
//! the server sends, and the loader decodes, little more than those levels.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use atmorep_loader::progress::NoProgress;
use atmorep_loader::tools::synth::{SynthConfig, write_store};
use atmorep_loader::{ChunkCache, Dataset, Hyperslab, StoreLocation};
use atmorep_testkit::http_files::HttpFileServer;
use tempfile::TempDir;
use zarrs::array::codec::bytes_to_bytes::blosc::{
    BloscCompressionLevel, BloscCompressor, BloscShuffleMode, blosc_compress_bytes,
    blosc_decompress_bytes, blosc_nbytes,
};

/// Blocks of 64 KiB: a level of a 1° grid is ~4 blocks. Blosc splits lz4 blocks into one
/// stream per byte of a float and enlarges the block size it is asked for by as much, so it is
/// asked for a quarter.
const BLOCK: usize = 1 << 16;
const ASKED_BLOCK: usize = BLOCK / 4;
/// zstd keeps the block size it is asked for.
const Z_BLOCK: usize = 2048;

/// A 1° store of `t` and `z` on 16 levels, chunked (1, 16, 181, 360), its chunks rewritten by
/// blosc in smaller blocks than the writer's (it lets blosc choose, which gives one block per
/// chunk this small): `t` blosc-lz4 in [`BLOCK`]-byte blocks, `z` blosc-zstd in blocks of 2 KiB,
/// 2 037 of them per chunk, more than the first read of a header covers. Returns the encoded and
/// decoded bytes of `t`'s chunks.
fn arco_like_store(store: &Path) -> (u64, u64) {
    store_in_small_blocks(store, [1, 16, 181, 360])
}

/// [`arco_like_store`]'s store in chunks of `chunks`.
pub(crate) fn store_in_small_blocks(store: &Path, chunks: [u64; 4]) -> (u64, u64) {
    let config = SynthConfig {
        grid_deg: 1.0,
        steps: 3,
        step_hours: 1,
        levels: vec![
            1000, 975, 950, 925, 900, 850, 800, 700, 600, 500, 400, 300, 250, 200, 150, 100,
        ],
        variables: vec!["t".into(), "z".into()],
        chunks: Some(chunks),
        ..SynthConfig::default()
    };
    write_store(&config, store, &NoProgress).unwrap();
    let (mut encoded, mut decoded) = (0, 0);
    for var in ["t", "z"] {
        let zarray = store.join(var).join(".zarray");
        let meta = std::fs::read_to_string(&zarray).unwrap();
        assert!(meta.contains("\"blocksize\": 0") || meta.contains("\"blocksize\":0"));
        let asked = if var == "t" { ASKED_BLOCK } else { Z_BLOCK };
        let meta = meta.replace("\"blocksize\": 0", &format!("\"blocksize\": {asked}"));
        let meta = if var == "t" {
            meta
        } else {
            meta.replace("\"lz4\"", "\"zstd\"")
        };
        std::fs::write(&zarray, meta).unwrap();
        for entry in std::fs::read_dir(store.join(var)).unwrap() {
            let path = entry.unwrap().path();
            if path.file_name().unwrap().to_string_lossy().starts_with('.') {
                continue;
            }
            let chunk = std::fs::read(&path).unwrap();
            let raw = blosc_decompress_bytes(&chunk, blosc_nbytes(&chunk).unwrap(), 1).unwrap();
            let level = BloscCompressionLevel::try_from(5u8).unwrap();
            let shuffle = BloscShuffleMode::Shuffle;
            let (codec, block) = if var == "t" {
                (BloscCompressor::LZ4, BLOCK)
            } else {
                (BloscCompressor::Zstd, Z_BLOCK)
            };
            let rewritten = blosc_compress_bytes(&raw, level, shuffle, 4, codec, asked, 1).unwrap();
            let blocksize = u32::from_le_bytes(rewritten[8..12].try_into().unwrap()) as usize;
            assert_eq!(blocksize, block);
            if var == "t" {
                encoded += rewritten.len() as u64;
                decoded += raw.len() as u64;
            }
            std::fs::write(&path, rewritten).unwrap();
        }
    }
    (encoded, decoded)
}

/// Windows of 2 of the 16 levels: the globe, and a window across 0° east.
fn slabs(dataset: &Dataset) -> Vec<Hyperslab> {
    let variable = dataset.variable("t").unwrap();
    let full = Hyperslab::full(dataset, variable);
    vec![
        Hyperslab {
            levels: vec![3, 11],
            ..full.clone()
        },
        Hyperslab {
            levels: vec![12, 4],
            lat: 40..100,
            lon_start: 330,
            lon_len: 60,
            ..full
        },
    ]
}

async fn open(url: &str) -> Dataset {
    let location = StoreLocation::open(url).unwrap();
    Dataset::open_location(location, Arc::new(ChunkCache::new(1 << 30)))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_of_sixteen_levels_fetch_and_decode_little_more_than_those_levels() {
    let dir = TempDir::new().unwrap();
    let store = dir.path().join("arco.zarr");
    let (encoded, decoded) = arco_like_store(&store);
    let server = HttpFileServer::start(dir.path()).unwrap();
    let local_url = store.to_str().unwrap().to_string();
    let http_url = format!("{}/arco.zarr", server.url());

    // The whole-chunk path gives the reference values.
    let whole = open(&local_url).await;
    whole.set_block_reads(false);
    let mut expected = Vec::new();
    for slab in slabs(&whole) {
        expected.push(whole.read(&slab).await.unwrap());
    }
    assert_eq!(
        whole.counters.fetched_bytes.load(Ordering::Relaxed),
        encoded,
        "the whole path reads every chunk of t whole"
    );

    for url in [&local_url, &http_url] {
        let blocks = open(url).await;
        let served_before = server.served_bytes();
        let slabs = slabs(&blocks);
        let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        // 2 of the 16 levels, the whole globe.
        let got = blocks.read(&slabs[0]).await.unwrap();
        assert_eq!(bits(&got), bits(&expected[0]), "{url}");
        let delivered = got.len() as u64 * 4;
        let counters = &blocks.counters;
        let fetched = counters.fetched_bytes.load(Ordering::Relaxed);
        let decoded_now = counters.decoded_bytes.load(Ordering::Relaxed);
        let requests = counters.fetch_requests.load(Ordering::Relaxed);
        assert_eq!(counters.fetched_chunks.load(Ordering::Relaxed), 0, "{url}");
        // Each level's ~4 blocks and at most one more where it starts mid-block.
        assert!(
            (decoded_now as f64) <= 1.3 * delivered as f64,
            "{url}: decoded {decoded_now} for {delivered} delivered"
        );
        let ratio = encoded as f64 / decoded as f64;
        let headers = 3 * 4096;
        assert!(
            (fetched as f64) <= 1.5 * delivered as f64 * ratio + headers as f64,
            "{url}: fetched {fetched} for {delivered} delivered, compressed {ratio:.2}:1"
        );
        assert!(fetched < encoded / 4, "{url}: {fetched} of {encoded}");
        // Per chunk one header and one request per level: its blocks are stored back to back.
        assert_eq!(requests, 3 + 3 * 2, "{url}");
        assert!(
            counters.fetched_blocks.load(Ordering::Relaxed) >= 3 * 2 * 4,
            "{url}"
        );
        if url == &http_url {
            assert_eq!(server.served_bytes() - served_before, fetched, "{url}");
        }
        // A window across 0° east of 2 other levels: block by block too, the same bits.
        let got = blocks.read(&slabs[1]).await.unwrap();
        assert_eq!(bits(&got), bits(&expected[1]), "{url}");
        assert_eq!(counters.fetched_chunks.load(Ordering::Relaxed), 0, "{url}");
        let more = counters.decoded_bytes.load(Ordering::Relaxed) - decoded_now;
        // Per chunk and level, the blocks of its 60 whole rows (rows are contiguous in a
        // chunk, so a window's rows are read whole) and at most two partly used ones.
        assert_eq!(got.len(), 3 * 2 * 60 * 60);
        let needed = 3 * 2 * 60 * 360 * 4;
        assert!(
            more <= needed + 3 * 2 * 2 * BLOCK as u64,
            "{url}: {more} decoded for {needed}"
        );
    }
}

/// A chunk read whole, then by blocks (and the other way round) is the same version of the
/// same object: the store-version check lets both through.
/// A chunk of one step and one level (the globe, as the peer's ARCO-like store): every read of
/// it, however small its window, is whole — the samples of a block cover most of such a chunk
/// between them, and reading it block by block measured 0.6× as fast (docs/performance.md).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_of_one_level_is_read_whole_even_for_a_small_window() {
    let dir = TempDir::new().unwrap();
    let store = dir.path().join("levels.zarr");
    store_in_small_blocks(&store, [1, 1, 181, 360]);
    let dataset = open(store.to_str().unwrap()).await;
    let window = slabs(&dataset).pop().unwrap();
    dataset.read(&window).await.unwrap();
    let counters = &dataset.counters;
    assert_eq!(counters.fetched_blocks.load(Ordering::Relaxed), 0);
    // One chunk per time step and level of the window, each read whole.
    assert_eq!(counters.fetched_chunks.load(Ordering::Relaxed), 3 * 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_and_block_reads_of_one_chunk_agree_on_its_version() {
    let dir = TempDir::new().unwrap();
    let store = dir.path().join("arco.zarr");
    arco_like_store(&store);
    let server = HttpFileServer::start(dir.path()).unwrap();
    for url in [
        store.to_str().unwrap().to_string(),
        format!("{}/arco.zarr", server.url()),
    ] {
        let dataset = open(&url).await;
        let variable = dataset.variable("t").unwrap();
        let full = Hyperslab::full(&dataset, variable);
        let part = slabs(&dataset).remove(0);
        let all = dataset.read(&full).await.unwrap();
        dataset.cache().clear();
        let some = dataset.read(&part).await.unwrap();
        dataset.cache().clear();
        assert_eq!(dataset.read(&full).await.unwrap(), all, "{url}");
        assert_eq!(dataset.read(&part).await.unwrap(), some, "{url}");
        assert!(!dataset.store_changed_seen(), "{url}");
        assert!(dataset.counters.fetched_blocks.load(Ordering::Relaxed) > 0);
    }
}

/// A chunk rewritten after its header was read is refused on the next block read, as a whole
/// read refuses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_rewritten_under_block_reads_is_refused() {
    let dir = TempDir::new().unwrap();
    let store = dir.path().join("arco.zarr");
    arco_like_store(&store);
    let dataset = open(store.to_str().unwrap()).await;
    let part = slabs(&dataset).remove(1);
    let before = dataset.read(&part).await.unwrap();
    let chunk = store.join("t").join("1.0.0.0");
    let bytes = std::fs::read(&chunk).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    std::fs::write(&chunk, &bytes).unwrap();
    dataset.cache().clear();
    let err = dataset.read(&part).await.unwrap_err().to_string();
    assert!(err.contains("1.0.0.0"), "{err}");
    assert!(dataset.store_changed_seen());
    assert_eq!(before.len(), part.len());
}

/// A chunk of more blocks than the first read of a header covers (2 037 × 2 KiB blocks of
/// blosc-zstd): its block table is completed by a second read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_table_longer_than_the_first_read_is_read_whole() {
    let dir = TempDir::new().unwrap();
    let store = dir.path().join("arco.zarr");
    arco_like_store(&store);
    let server = HttpFileServer::start(dir.path()).unwrap();
    let whole = open(store.to_str().unwrap()).await;
    whole.set_block_reads(false);
    let variable = whole.variable("z").unwrap();
    let full = Hyperslab::full(&whole, variable);
    let part = Hyperslab {
        levels: vec![0, 15],
        lat: 0..30,
        ..full
    };
    let want = whole.read(&part).await.unwrap();
    for url in [
        store.to_str().unwrap().to_string(),
        format!("{}/arco.zarr", server.url()),
    ] {
        let blocks = open(&url).await;
        let got = blocks.read(&part).await.unwrap();
        assert_eq!(got, want, "{url}");
        let counters = &blocks.counters;
        let fetched_blocks = counters.fetched_blocks.load(Ordering::Relaxed);
        // Per chunk: two header reads, then one read of the blocks of 30 rows per level.
        assert_eq!(
            counters.fetch_requests.load(Ordering::Relaxed),
            3 * 2 + 3 * 2,
            "{url}"
        );
        assert!(
            (40..=3 * 2 * 23).contains(&fetched_blocks),
            "{url}: {fetched_blocks}"
        );
    }
}

/// Pipeline samples (global normalization, BERT masking) of 2 of the 16 levels are the same
/// bytes whether the chunks are read whole or block by block, from files and over HTTP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipeline_samples_are_the_same_bytes_with_block_reads() {
    use atmorep_loader::pipeline::masking::MaskSpec;
    use atmorep_loader::pipeline::normalization::GlobalStats;
    use atmorep_loader::pipeline::{FieldConfig, Normalization, Pipeline, PipelineConfig, Split};

    let dir = TempDir::new().unwrap();
    let store = dir.path().join("arco.zarr");
    arco_like_store(&store);
    let server = HttpFileServer::start(dir.path()).unwrap();
    let whole = Arc::new(open(store.to_str().unwrap()).await);
    whole.set_block_reads(false);
    let stats = Arc::new(
        GlobalStats::compute(&whole, None, &NoProgress)
            .await
            .unwrap(),
    );
    let field = |name: &str| FieldConfig {
        name: name.into(),
        reply_name: None,
        levels: vec![850.0, 300.0],
        num_tokens: [1, 6, 12],
        token_size: [3, 9, 9],
        blur_sigma: 0.0,
        normalization: Normalization::Global,
        pe: atmorep_proto::PeMode::Local,
        pe_width: 16,
        mask: MaskSpec::Bert {
            r_max: 0.5,
            noise_fraction: 0.1,
            mask_value: 0.0,
        },
    };
    let config = PipelineConfig {
        fields: vec![field("t"), field("z")],
        split: Split::Train,
        split_fractions: [1.0, 0.0],
        split_dates: None,
        mode: Default::default(),
        seed: 5,
        block_steps: 3,
        samples_per_block: 6,
        buffer_blocks: 1,
        latitude_weighting: Default::default(),
    };
    let reference = Pipeline::new(whole.clone(), config.clone(), Some(stats.clone())).unwrap();
    for url in [
        store.to_str().unwrap().to_string(),
        format!("{}/arco.zarr", server.url()),
    ] {
        let blocks = Arc::new(open(&url).await);
        let pipeline = Pipeline::new(blocks.clone(), config.clone(), Some(stats.clone())).unwrap();
        for id in 0..6 {
            let want = reference.sample(0, id).await.unwrap();
            assert_eq!(pipeline.sample(0, id).await.unwrap(), want, "{url}: {id}");
        }
        let counters = &blocks.counters;
        assert_eq!(counters.fetched_chunks.load(Ordering::Relaxed), 0, "{url}");
        assert!(counters.fetched_blocks.load(Ordering::Relaxed) > 0, "{url}");
    }
}

/// With caching off, a read still fetches each needed block once and serves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_cache_each_block_is_read_once() {
    let dir = TempDir::new().unwrap();
    let store = dir.path().join("arco.zarr");
    arco_like_store(&store);
    let reference = open(store.to_str().unwrap()).await;
    reference.set_block_reads(false);
    let part = slabs(&reference).remove(0);
    let want = reference.read(&part).await.unwrap();
    let location = StoreLocation::open(store.to_str().unwrap()).unwrap();
    let uncached = Dataset::open_location(location, Arc::new(ChunkCache::new(0)))
        .await
        .unwrap();
    assert_eq!(uncached.read(&part).await.unwrap(), want);
    let counters = &uncached.counters;
    // A header and one read per level of each of the 3 chunks.
    assert_eq!(counters.fetch_requests.load(Ordering::Relaxed), 3 + 3 * 2);
    assert_eq!(counters.fetched_chunks.load(Ordering::Relaxed), 0);
}

/// Over S3 (the in-process s3s server, whose objects carry ETags): block reads give the same
/// values as whole reads, and whole and range reads of one chunk agree on its version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_reads_over_s3_agree_with_whole_reads() {
    use atmorep_testkit::S3TestServer;
    let dir = TempDir::new().unwrap();
    let server = S3TestServer::start(&dir.path().join("s3")).await.unwrap();
    server.create_bucket("era5").unwrap();
    let store = server.bucket_dir("era5").join("arco.zarr");
    arco_like_store(&store);
    let location = StoreLocation::from_store(
        server.url("era5", "arco.zarr"),
        Arc::new(server.object_store("era5")),
        "arco.zarr",
    );
    let dataset = Dataset::open_location(location, Arc::new(ChunkCache::new(1 << 30)))
        .await
        .unwrap();
    let variable = dataset.variable("t").unwrap();
    let full = Hyperslab::full(&dataset, variable);
    let part = slabs(&dataset).remove(0);
    let blocks = dataset.read(&part).await.unwrap();
    assert_eq!(dataset.counters.fetched_chunks.load(Ordering::Relaxed), 0);
    assert_eq!(
        dataset.counters.fetch_requests.load(Ordering::Relaxed),
        3 + 3 * 2
    );
    // The whole chunks now, the same objects: no change is seen, the values agree.
    let all = dataset.read(&full).await.unwrap();
    assert_eq!(dataset.counters.fetched_chunks.load(Ordering::Relaxed), 3);
    assert!(!dataset.store_changed_seen());
    let levels = [3, 11];
    let plane = 181 * 360;
    for t in 0..3 {
        for (i, &l) in levels.iter().enumerate() {
            let got = &blocks[(t * 2 + i) * plane..][..plane];
            let want = &all[(t * 16 + l) * plane..][..plane];
            assert_eq!(got, want, "step {t} level {l}");
        }
    }
}

/// A chunk whose blosc header is bad is refused by name: the array, the chunk and what is wrong.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_blosc_header_names_the_array_and_the_chunk() {
    let dir = TempDir::new().unwrap();
    let store = dir.path().join("arco.zarr");
    arco_like_store(&store);
    let chunk = store.join("t").join("2.0.0.0");
    let mut bytes = std::fs::read(&chunk).unwrap();
    bytes[0] = 7;
    std::fs::write(&chunk, &bytes).unwrap();
    let dataset = open(store.to_str().unwrap()).await;
    let part = slabs(&dataset).remove(0);
    let err = dataset.read(&part).await.unwrap_err().to_string();
    for word in ["arco.zarr/t", "2.0.0.0", "blosc format version 7"] {
        assert!(err.contains(word), "{word} not in: {err}");
    }
}

/// `atmorep loader serve` with `block_reads = false` in its file (over HTTP, which counts the
/// bytes it sends) serves the same bytes as a server with block reads on, fetching every chunk
/// its samples touch whole; the one with block reads fetches a fraction of them. `serve
/// --block-reads off` overrides a file that leaves them on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_with_block_reads_off_serves_the_same_samples_from_whole_chunks() {
    use atmorep_loader::pipeline::normalization::GlobalStats;
    use atmorep_proto::client::{ClientConfig, LoaderClient};
    use atmorep_proto::pb;
    use atmorep_proto::request::RequestConfig;
    use atmorep_testkit::Server;

    let dir = TempDir::new().unwrap();
    let store = dir.path().join("arco.zarr");
    arco_like_store(&store);
    let stats = dir.path().join("arco.zarr.stats");
    let local = open(store.to_str().unwrap()).await;
    GlobalStats::compute_into(&local, &stats, false, &NoProgress)
        .await
        .unwrap();
    // Every chunk file of both variables: a sample's window spans the store's 3 steps.
    let mut whole_bytes = 0;
    for var in ["t", "z"] {
        for entry in std::fs::read_dir(store.join(var)).unwrap() {
            let entry = entry.unwrap();
            if !entry.file_name().to_string_lossy().starts_with('.') {
                whole_bytes += entry.metadata().unwrap().len();
            }
        }
    }
    let files = HttpFileServer::start(dir.path()).unwrap();
    let config = |name: &str, block_reads: &str| {
        let file = dir.path().join(format!("{name}.toml"));
        let text = format!(
            "{block_reads}\n[[datasets]]\nname = \"arco\"\nurl = \"{}/arco.zarr\"\nstats = \"{}\"\n",
            files.url(),
            stats.display()
        );
        std::fs::write(&file, text).unwrap();
        vec!["--config".to_string(), file.to_str().unwrap().to_string()]
    };
    let request = RequestConfig::from_toml(
        r#"
dataset = "arco"
batch_size = 1
seed = 3
block_steps = 3
samples_per_block = 4
split_fractions = [1.0, 0.0]
[[fields]]
name = "t"
levels = [850, 300]
num_tokens = [1, 6, 12]
token_size = [3, 9, 9]
pe = "local"
pe_width = 16
mask = { kind = "bert", r_max = 0.5, noise_fraction = 0.1 }
[[fields]]
name = "z"
levels = [700, 200]
num_tokens = [1, 6, 12]
token_size = [3, 9, 9]
pe = "local"
pe_width = 16
"#,
    )
    .unwrap()
    .to_proto();

    // The samples of one server and the bytes the file server sent for them.
    let samples = |args: Vec<String>, log: &str| {
        let server = Server::start(&args, &dir.path().join(log));
        let files = &files;
        let request = request.clone();
        async move {
            let client = LoaderClient::connect(ClientConfig::new([server.endpoint()]))
                .await
                .unwrap();
            let before = files.served_bytes();
            let mut out = Vec::new();
            for id in 0..4 {
                let sample = pb::SampleRequest::by_id(request.clone(), 0, id);
                out.push(crate::service::sample_bytes(
                    &client.sample(sample).await.unwrap(),
                    0,
                ));
            }
            (out, files.served_bytes() - before)
        }
    };
    let (blocks, block_bytes) = samples(config("on", ""), "on.log").await;
    let (whole, whole_served) = samples(config("off", "block_reads = false"), "off.log").await;
    assert!(whole == blocks, "block_reads = false serves other bytes");
    assert_eq!(whole_served, whole_bytes, "whole chunks, each once");
    assert!(
        block_bytes * 3 < whole_bytes,
        "block reads fetched {block_bytes} of {whole_bytes}"
    );
    let mut flag = config("flag", "");
    flag.extend(["--block-reads".to_string(), "off".to_string()]);
    let (overridden, overridden_served) = samples(flag, "flag.log").await;
    assert!(overridden == blocks);
    assert_eq!(overridden_served, whole_bytes);
}
